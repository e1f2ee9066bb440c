"""The INI configuration: one table of keys, loaded once into frozen dataclasses."""

import configparser
import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from mdserver.errors import ConfigError
from mdserver.models import NETWORK_MODES, ROUTES

DEFAULT_PATH = "/etc/mdserver/mdserver.conf"
METADATA_ADDRESS = "169.254.169.254"

# cloud-init passes a password to `chpasswd -e` only when it matches this
# (cc_set_passwords); anything else, yescrypt `$y$` included, would be set as
# a plain-text password equal to the hash.
CRYPT_HASH = re.compile(r"^\$(1|2a|2y|5|6)(\$[^$:\s]+){2,3}$")
HOST_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
ENTRY_KINDS = ("base", "prefix", "domain", "fqdn")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")
IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Keys of md_server 0.6 that mdserver does not use: a file that has them
# still loads, with one warning each.
LEGACY_KEYS = {
    ("mdserver", "debug"), ("mdserver", "debug_userdata"),
    ("mdserver", "hostname_prefix"), ("mdserver", "hostname-prefix"),
    ("mdserver", "md-base"), ("dnsmasq", "run_dir"), ("dnsmasq", "listen_address"),
}
LEGACY_SECTIONS = ("loglevels", "service", "_files_")


# -- converters: str -> value, ValueError with a reason on bad input ---------

def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    def conv(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
        if not lo <= value <= hi:
            raise ValueError(f"{value} is outside {lo}..{hi}")
        return value
    return conv


def _bool(text: str) -> bool:
    states = configparser.ConfigParser.BOOLEAN_STATES
    if text.lower() not in states:
        raise ValueError(f"{text!r} is not one of yes/no/true/false/on/off/1/0")
    return states[text.lower()]


def _choice(*options: str) -> Callable[[str], str]:
    def conv(text: str) -> str:
        if text.lower() not in options:
            raise ValueError(f"{text!r} is not one of {', '.join(options)}")
        return text.lower()
    return conv


def _text(text: str) -> str:
    return text


def _optional_text(text: str) -> Optional[str]:
    # md_server 0.6 wrote "no" (or False) for "not set".
    return None if text.lower() in ("", "no", "none", "false") else text


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None


def _ipv4(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 address") from None


def _ip_list(text: str) -> Tuple[str, ...]:
    return tuple(_ip(t.strip()) for t in text.split(",") if t.strip())


def _password(text: str) -> Optional[str]:
    if _optional_text(text) is None:
        return None
    if not CRYPT_HASH.match(text):
        raise ValueError(
            "not a crypt hash that cloud-init recognises ($1$, $2a$, $2y$, $5$ or "
            "$6$, e.g. from `mkpasswd -m sha-512`; write each $ as $$)")
    return text


def _suffixes(text: str) -> Tuple[str, ...]:
    # md_server 0.6 format: colon-separated, an empty entry meaning "no suffix",
    # which the lookup always tries first anyway.
    out = tuple(s for s in text.split(":") if s)
    for s in out:
        if "/" in s or "\0" in s:
            raise ValueError(f"suffix {s!r} may not contain '/'")
    return out


def _label(text: str) -> Optional[str]:
    value = _optional_text(text)
    if value is not None and not all(HOST_LABEL.match(p) for p in value.split(".")):
        raise ValueError(f"{text!r} is not a valid DNS name")
    return value


def _prefix(text: str) -> Optional[str]:
    value = _optional_text(text)
    if value is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9-]{0,30}$", value):
        raise ValueError(f"{text!r} is not a host name prefix (letters, digits, '-')")
    return value


def _entry_order(text: str) -> Tuple[str, ...]:
    kinds = tuple(k.strip().lower() for k in text.split(",") if k.strip())
    if not kinds:
        raise ValueError("empty; use base, prefix, domain or fqdn")
    for k in kinds:
        if k not in ENTRY_KINDS:
            raise ValueError(f"{k!r} is not one of {', '.join(ENTRY_KINDS)}")
    return kinds


def _zone(text: str) -> str:
    if not re.match(r"^[a-z0-9][a-z0-9-]*[a-z]$", text):
        raise ValueError(f"{text!r} is not an availability zone like mds-1a")
    return text


def _region(text: str) -> Optional[str]:
    if text == "":
        return None
    if not re.match(r"^[a-z0-9][a-z0-9-]*$", text):
        raise ValueError(f"{text!r} is not a region name like mds-1")
    return text


def _path(text: str) -> str:
    return text


def _endpoints(text: str) -> Tuple[str, ...]:
    out = tuple(e.strip().rstrip("/") for e in text.split(",") if e.strip())
    for e in out:
        if not re.match(r"^https?://[^/\s]+$", e):
            raise ValueError(f"{e!r} is not an http:// or https:// URL (host:port, no path)")
    return out


def _store_prefix(text: str) -> str:
    if not re.match(r"^/[A-Za-z0-9_./-]*/$", text):
        raise ValueError(f"{text!r} is not a key prefix like /mdserver/ (starts and ends with /)")
    return text


def _host_name(text: str) -> str:
    if text and not HOST_LABEL.match(text):
        raise ValueError(f"{text!r} is not a host name (letters, digits, '-'; at most 63)")
    return text


def _optional_path(text: str) -> Optional[str]:
    return _optional_text(text)


def _listen(text: str) -> Optional[Tuple[str, int]]:
    """`host:port` or `[v6]:port` with an IP address, never a wildcard nor a
    link-local one (the metadata link); empty: None. Checked against the
    guests' addresses in build()."""
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9169)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, [::1]:9169")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    if address.is_unspecified:
        raise ValueError(f"{host} is a wildcard: it would also answer on the guests' "
                         "addresses; give a host-only address such as 127.0.0.1")
    if address.is_link_local:
        raise ValueError(f"{host} is link-local, the guests' metadata link")
    return str(address), _int_range(0, 65535)(port)


# -- the table ---------------------------------------------------------------

@dataclass(frozen=True)
class Key:
    section: str
    name: str
    convert: Callable[[str], Any]
    default: str
    doc: str
    attr: str = ""  # dataclass field name when it differs from `name`


KEYS: Tuple[Key, ...] = (
    Key("mdserver", "port", _int_range(0, 65535), "80", "TCP port of the metadata service;\n"
        "0: any free port, written to a file beside admin_socket (admin.sock: admin.port)."),
    Key("mdserver", "listen_address", _ip, METADATA_ADDRESS,
        "Address the metadata service listens on. It may be absent when mdserver\n"
        "starts (the bridge comes up later): mdserver binds it anyway."),
    Key("mdserver", "loglevel", _choice(*LOG_LEVELS), "info",
        "Log level: debug, info, warning, error or critical."),
    Key("mdserver", "log_format", _choice(*LOG_FORMATS), "text",
        "text: one line per event, its stable fields (instance, uuid, ip, face,\n"
        "status, ...) appended as key=value; json: one JSON object per line with\n"
        "time, level, logger, message and those fields."),
    Key("mdserver", "logfile", _optional_path, "",
        "Log file, reopened on SIGHUP (logrotate). Empty: log to stderr (the journal)."),
    Key("mdserver", "userdata_dir", _path, "/etc/mdserver/userdata",
        "Directory searched for user-data templates."),
    Key("mdserver", "userdata_suffixes", _suffixes, ".yaml",
        "Colon-separated suffixes tried after the bare name, e.g. .yaml:.cfg"),
    Key("mdserver", "password", _password, "",
        "Crypt hash (not plain text) set as the default user's password, with SSH\n"
        "password login enabled. Write each $ as $$ (mkpasswd -m sha-512).\n"
        "Empty: no password."),
    Key("mdserver", "default_template", _optional_path, "",
        "Template used when nothing more specific is found (relative names are in\n"
        "userdata_dir). Empty: the built-in template."),
    Key("mdserver", "db_file", _path, "/var/lib/mdserver/db_file.json",
        "Instance database (a journal is kept beside it as <db_file>.journal)."),
    Key("mdserver", "imds_tokens", _choice("optional", "required"), "optional",
        "IMDSv2 session tokens: optional (guests may skip them, as non-AWS cloud-init\n"
        "does) or required (token-less requests get 401; locks out non-AWS guests)."),
    Key("mdserver", "token_key_file", _optional_path, "",
        "Secret that signs IMDSv2 tokens, created on first start.\n"
        "Empty: imds-token.key beside db_file."),
    Key("mdserver", "availability_zone", _zone, "mds-1a", "placement/availability-zone."),
    Key("mdserver", "region", _region, "",
        "placement/region. Empty: the availability zone without its last letter."),
    Key("mdserver", "instance_type", _text, "m1.small", "instance-type."),
    Key("mdserver", "ami_id", _text, "ami-00000000", "ami-id and the identity document's imageId."),
    Key("mdserver", "access_log", _bool, "no",
        "Log one line per request at info level (costs throughput)."),
    Key("mdserver", "workers", _int_range(0, 16), "0",
        "Worker processes that answer guests, each with its own copy of the\n"
        "database (kept current before every answer) and ~25 MB. 0: half the\n"
        "host's CPUs, 1 to 4, leaving the rest to the guests (docs/BENCHMARKS.md)."),
    Key("mdserver", "threads", _int_range(1, 64), "2",
        "Threads for guest requests that wait on the main process (registration\n"
        "from the host, a guest's password). Others run in the worker's event loop;\n"
        "the server's I/O is native (docs/server-choice.md)."),
    Key("mdserver", "guest_queue", _int_range(16, 65536), "256",
        "Requests one guest address may have waiting for its turn (guests are\n"
        "served in turn, so a flood delays only its sender); past it, 429 with\n"
        "Retry-After. A cloud-init crawl has one request at a time."),
    Key("mdserver", "max_connections", _int_range(64, 1048576), "4096",
        "Open guest connections served at once, idle ones included; needs as many\n"
        "file descriptors (LimitNOFILE)."),
    Key("mdserver", "header_timeout", _int_range(1, 300), "5",
        "Seconds a connection may take to send its request headers (and may sit\n"
        "idle between requests) before it is closed."),
    Key("mdserver", "backlog", _int_range(128, 65535), "1024", "Listen backlog."),
    Key("mdserver", "admin_socket", _path, "/run/mdserver/admin.sock",
        "Unix socket for registration and administration (the libvirt hook and\n"
        "mdserverctl use it); mode 0660, group of the daemon's user."),
    Key("mdserver", "network_config", _choice(*NETWORK_MODES), "dhcp",
        "Network configuration given to guests (OpenStack network_data.json, NoCloud\n"
        "network-config, seed images): dhcp (the instance's NIC, by MAC, with DHCP),\n"
        "static (its address, prefix, gateway and DNS: no DHCP needed after first\n"
        "boot) or none (cloud-init's own fallback). <mds:network> overrides it."),
    Key("mdserver", "vendor_data", _optional_path, "",
        "File with an operator cloud-config or script for every guest, sent through\n"
        "the vendor-data channel (OpenStack, NoCloud, seed images; EC2 has none),\n"
        "apart from user-data. Read at start-up. Empty: none."),
    Key("mdserver", "check_mac", _bool, "yes",
        "Answer a guest only if the host's neighbour table maps its address to the\n"
        "MAC of the instance that holds it (another guest taking that address gets\n"
        "403). Only addresses of [dnsmasq] net_address/net_prefix are checked."),
    Key("mdserver", "hop_limit", _int_range(0, 255), "1",
        "IP TTL of every answer from the metadata address (AWS's\n"
        "http-put-response-hop-limit, applied to all answers): 1 keeps them from\n"
        "crossing a router or NAT inside a guest (a container there gets no\n"
        "metadata and no token); 2 lets one such hop through. 0: off. Set by an\n"
        "nftables rule set (`mdserverctl nft`) that mdserver.service loads."),
    Key("libvirt", "route", _choice(*ROUTES), "openstack",
        "How a guest finds its data unless its <mds:route> says otherwise:\n"
        "openstack, ec2, nocloud-net (over HTTP), configdrive or nocloud (seed\n"
        "image on a CD-ROM), none. configdrive and nocloud instances get a seed image."),
    Key("libvirt", "uri", _text, "qemu:///system",
        "libvirt connection URI of mdserver-enroll (the enroller; never the daemon)."),
    Key("libvirt", "enroll", _choice("new", "all", "none"), "new",
        "Which domains on net_name mdserver-enroll gives their route: new (those\n"
        "mdserver has never registered), all (every one, on each definition) or\n"
        "none (register only, never edit a definition)."),
    Key("seeds", "dir", _optional_path, "",
        "Directory of the seed images (<domain UUID>.iso), kept current for every\n"
        "instance on the configdrive or nocloud route. Empty: seeds/ beside db_file."),
    Key("store", "backend", _choice("local", "etcd"), "local",
        "Where the instance registry lives: local (db_file, this host only) or etcd\n"
        "(shared by every hypervisor that names the same endpoints and prefix; this\n"
        "host answers guests from its copy, etcd-cache.json beside db_file)."),
    Key("store", "endpoints", _endpoints, "",
        "etcd client URLs, comma-separated, e.g. https://10.0.0.1:2379,https://10.0.0.2:2379\n"
        "(every member: one being down is then harmless). Needed with backend = etcd."),
    Key("store", "prefix", _store_prefix, "/mdserver/",
        "Key prefix of this registry in etcd (several registries may share a cluster)."),
    Key("store", "host", _host_name, "",
        "This hypervisor's name in the registry: it owns the instances it registers\n"
        "(DHCP entries, seed images, removal). Unique per hypervisor; one daemon at a\n"
        "time may use it. Empty: this machine's host name."),
    Key("store", "ca_file", _optional_path, "", "CA certificate that signed etcd's (https)."),
    Key("store", "cert_file", _optional_path, "", "Client certificate for etcd (with key_file)."),
    Key("store", "key_file", _optional_path, "", "Private key of cert_file."),
    Key("store", "username", _optional_text, "", "etcd user (etcd's auth enabled). Empty: none."),
    Key("store", "password_file", _optional_path, "",
        "File holding that user's password (kept out of this file and of logs)."),
    Key("metrics", "listen", _listen, "",
        "HOST:PORT of a host-only Prometheus listener (GET /metrics), e.g.\n"
        "127.0.0.1:9169 or [::1]:9169; never a wildcard, the metadata address or an\n"
        "address on the guests' network. Port 0: any free port (logged). Empty: no\n"
        "listener; the admin socket's GET /metrics answers either way."),
    Key("dnsmasq", "base_dir", _path, "/var/lib/mdserver/dnsmasq",
        "Directory for the generated dnsmasq configuration."),
    Key("dnsmasq", "user", _text, "mdserver", "User dnsmasq runs as (so mdserver can signal it)."),
    Key("dnsmasq", "net_name", _text, "mds", "libvirt network whose interface identifies an instance."),
    Key("dnsmasq", "net_address", _ipv4, "10.122.0.0", "Network address for IP allocation."),
    Key("dnsmasq", "net_prefix", _int_range(8, 30), "16", "Network prefix length."),
    Key("dnsmasq", "gateway", _ipv4, "10.122.0.1", "Gateway (the host's address on the network)."),
    Key("dnsmasq", "interface", _text, "br-mds", "Bridge that carries the network."),
    Key("dnsmasq", "use_dns", _bool, "no", "Tell guests to use mdserver's dnsmasq as DNS server."),
    Key("dnsmasq", "lease_len", _int_range(120, 31536000), "86400", "DHCP lease time, seconds."),
    Key("dnsmasq", "prefix", _prefix, "", "Prefix for DNS names (<prefix><name>). Empty: none."),
    Key("dnsmasq", "domain", _label, "",
        "Domain of the instances; also appended to local-hostname. Empty: none."),
    Key("dnsmasq", "entry_order", _entry_order, "base",
        "Names in each DNS host entry, in order: base, prefix, domain (or fqdn)."),
    Key("dnsmasq", "upstream_servers", _ip_list, "",
        "Comma-separated DNS servers for names dnsmasq does not own.\n"
        "Empty: the host's resolvers (/etc/resolv.conf)."),
)
KEY_TABLE: Dict[Tuple[str, str], Key] = {(k.section, k.name): k for k in KEYS}
SECTIONS = ("mdserver", "dnsmasq", "libvirt", "seeds", "store", "metrics")
FREE_SECTIONS = ("public-keys", "template-data")
INCLUDE = "_include_"


@dataclass(frozen=True)
class MdserverSection:
    port: int
    listen_address: str
    loglevel: str
    logfile: Optional[str]
    userdata_dir: str
    userdata_suffixes: Tuple[str, ...]
    password: Optional[str]
    default_template: Optional[str]
    db_file: str
    imds_tokens: str
    token_key_file: str
    availability_zone: str
    region: str
    instance_type: str
    ami_id: str
    access_log: bool
    workers: int
    threads: int
    guest_queue: int
    max_connections: int
    header_timeout: int
    backlog: int
    admin_socket: str
    network_config: str
    vendor_data: Optional[str]
    check_mac: bool = True
    hop_limit: int = 1
    log_format: str = "text"


@dataclass(frozen=True)
class LibvirtSection:
    route: str
    uri: str = "qemu:///system"
    enroll: str = "new"


@dataclass(frozen=True)
class MetricsSection:
    listen: Optional[Tuple[str, int]] = None  # (address, port) of the host-only listener


@dataclass(frozen=True)
class SeedsSection:
    dir: str


@dataclass(frozen=True)
class StoreSection:
    backend: str = "local"
    endpoints: Tuple[str, ...] = ()
    prefix: str = "/mdserver/"
    host: str = ""
    ca_file: Optional[str] = None
    cert_file: Optional[str] = None
    key_file: Optional[str] = None
    username: Optional[str] = None
    password_file: Optional[str] = None


@dataclass(frozen=True)
class DnsmasqSection:
    base_dir: str
    user: str
    net_name: str
    net_address: str
    net_prefix: int
    gateway: str
    interface: str
    use_dns: bool
    lease_len: int
    prefix: Optional[str]
    domain: Optional[str]
    entry_order: Tuple[str, ...]
    upstream_servers: Tuple[str, ...]

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{self.net_address}/{self.net_prefix}")


@dataclass(frozen=True)
class Config:
    mdserver: MdserverSection
    dnsmasq: DnsmasqSection
    libvirt: LibvirtSection
    seeds: SeedsSection
    public_keys: Tuple[Tuple[str, str], ...]
    template_data: Tuple[Tuple[str, str], ...]  # ordered pairs: picklable, immutable
    path: str = ""
    warnings: Tuple[str, ...] = field(default=(), compare=False)
    store: StoreSection = StoreSection(host="localhost")
    metrics: MetricsSection = MetricsSection()


# Names the user-data context defines itself; [template-data] may not shadow them.
RESERVED_TEMPLATE_NAMES = frozenset({
    "hostname", "fqdn", "name", "uuid", "mac", "ip", "instance_id",
    "public_keys", "public_key_list", "mdserver_password", "meta",
})


class _Source:
    """Raw values with the file each came from, for error messages."""

    def __init__(self) -> None:
        self.values: Dict[Tuple[str, str], Tuple[str, str]] = {}
        self.order: List[Tuple[str, str]] = []

    def read(self, path: str) -> None:
        # The md_server 0.6 reading: ExtendedInterpolation (so `$$` is a `$`
        # and ${section:key} refers), keys without value allowed, keys
        # lower-cased, later files win.
        parser = configparser.ConfigParser(
            interpolation=configparser.ExtendedInterpolation(), allow_no_value=True)
        try:
            with open(path, encoding="utf-8") as f:
                parser.read_file(f, source=path)
        except OSError as e:
            raise ConfigError(path, "", "", f"cannot read: {e.strerror}") from None
        # Line numbers only, never the line: it may hold a password hash.
        except configparser.MissingSectionHeaderError as e:
            raise ConfigError(path, "", "",
                              f"File contains no section headers (line {e.lineno})") from None
        except configparser.ParsingError as e:
            raise ConfigError(path, "", "", "cannot parse line "
                              + ", ".join(str(n) for n, _ in e.errors)) from None
        except (configparser.Error, UnicodeDecodeError) as e:
            raise ConfigError(path, "", "", _one_line(e)) from None
        # A second, raw reading lists only the keys each section really has:
        # [DEFAULT] entries only feed interpolation.
        raw = configparser.RawConfigParser(allow_no_value=True, default_section="\0")
        with open(path, encoding="utf-8") as f:
            raw.read_file(f, source=path)
        for section in raw.sections():
            if section == parser.default_section:
                continue
            for key in raw.options(section):
                try:
                    value = parser.get(section, key)
                except configparser.Error as e:
                    raise ConfigError(path, section, key,
                                      f"{_interpolation_problem(e)} (write a literal $ as $$)"
                                      ) from None
                if (section, key) not in self.values:
                    self.order.append((section, key))
                self.values[(section, key)] = ("" if value is None else value.strip(), path)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _interpolation_problem(e: configparser.Error) -> str:
    """What is wrong with a value's `$`, never the value (configparser's
    message quotes it): it may be a password hash, and the line goes to the
    journal."""
    if isinstance(e, configparser.InterpolationMissingOptionError):
        return f"${{{e.reference}}} refers to no key"
    if isinstance(e, configparser.InterpolationSyntaxError):
        return "'$' must be followed by '$' or '{'"
    return f"cannot expand its ${{...}} references ({type(e).__name__})"


def _include_paths(source: _Source, main: str) -> List[str]:
    base = os.path.dirname(os.path.abspath(main))
    paths: List[str] = []
    dirs = source.values.get((INCLUDE, "directories"), ("", main))[0]
    files = source.values.get((INCLUDE, "files"), ("", main))[0]
    for d in filter(None, dirs.split(":")):
        d = os.path.join(base, d)
        if os.path.isdir(d):
            paths += [os.path.join(d, n) for n in sorted(os.listdir(d))
                      if n.endswith(".conf") and not n.startswith(".")
                      and os.path.isfile(os.path.join(d, n))]
    paths += [os.path.join(base, f) for f in filter(None, files.split(":"))]
    return paths


def load(path: str) -> Config:
    """Read `path` (and its includes) and validate everything, or raise ConfigError."""
    source = _Source()
    source.read(path)
    for extra in _include_paths(source, path):
        source.read(extra)
    return build(source.values, source.order, path)


def build(values: Mapping[Tuple[str, str], Tuple[str, str]],
          order: List[Tuple[str, str]], path: str) -> Config:
    """Validate raw (section, key) -> (text, file) values into a Config."""
    warnings: List[str] = []
    converted: Dict[Tuple[str, str], Any] = {}
    public_keys: List[Tuple[str, str]] = []
    template_data: Dict[str, str] = {}
    for section, key in order:
        text, origin = values[(section, key)]
        if (section, key) in KEY_TABLE:
            try:
                converted[(section, key)] = KEY_TABLE[(section, key)].convert(text)
            except ValueError as e:
                raise ConfigError(origin, section, key, str(e)) from None
        elif section == "public-keys":
            if not text:
                raise ConfigError(origin, section, key, "empty key")
            public_keys.append((key, text))
        elif section == "template-data":
            if key == "_config_items_":
                template_data.update(_config_items(text, values, origin))
            elif key in RESERVED_TEMPLATE_NAMES:
                raise ConfigError(origin, section, key,
                                  "shadows a name mdserver gives every template")
            else:
                template_data[key] = text
        elif section == INCLUDE and key in ("files", "directories"):
            pass
        elif (section, key) in LEGACY_KEYS or section in LEGACY_SECTIONS:
            warnings.append(f"{origin}: [{section}] {key}: md_server 0.6 setting "
                            "not used by mdserver; ignored")
        elif section in SECTIONS + (INCLUDE,):
            raise ConfigError(origin, section, key, "unknown key")
        else:
            raise ConfigError(origin, section, "", "unknown section")

    def get(section: str, name: str) -> Any:
        if (section, name) not in converted:
            converted[(section, name)] = KEY_TABLE[(section, name)].convert(
                KEY_TABLE[(section, name)].default)
        return converted[(section, name)]

    def origin_of(section: str, key: str) -> str:
        return values.get((section, key), ("", path))[1]

    base = os.path.dirname(os.path.abspath(path))
    md = {k.name: get("mdserver", k.name) for k in KEYS if k.section == "mdserver"}
    for key in ("userdata_dir", "db_file", "logfile", "token_key_file", "admin_socket",
                "vendor_data"):
        if md[key]:
            md[key] = os.path.join(base, md[key])
    if md["default_template"]:
        md["default_template"] = os.path.join(md["userdata_dir"], md["default_template"])
    if not md["token_key_file"]:
        md["token_key_file"] = os.path.join(os.path.dirname(md["db_file"]), "imds-token.key")
    if md["region"] is None:
        md["region"] = md["availability_zone"][:-1]
    dn = {k.name: get("dnsmasq", k.name) for k in KEYS if k.section == "dnsmasq"}
    dn["base_dir"] = os.path.join(base, dn["base_dir"])
    dnsmasq = DnsmasqSection(**dn)
    _check_network(dnsmasq, origin_of)
    seeds_dir = get("seeds", "dir")
    seeds_dir = os.path.join(base, seeds_dir) if seeds_dir else \
        os.path.join(os.path.dirname(md["db_file"]), "seeds")
    store = _store(base, {k.name: get("store", k.name) for k in KEYS if k.section == "store"},
                   origin_of)
    metrics = MetricsSection(listen=get("metrics", "listen"))
    _check_metrics(metrics, md["listen_address"], dnsmasq, origin_of)
    return Config(
        store=store,
        metrics=metrics,
        mdserver=MdserverSection(**md),
        dnsmasq=dnsmasq,
        libvirt=LibvirtSection(route=get("libvirt", "route"), uri=get("libvirt", "uri"),
                              enroll=get("libvirt", "enroll")),
        seeds=SeedsSection(dir=seeds_dir),
        public_keys=tuple(public_keys),
        template_data=tuple(template_data.items()),
        path=path,
        warnings=tuple(warnings),
    )


def _config_items(text: str, values: Mapping, origin: str) -> Dict[str, str]:
    # md_server 0.6: "_config_items_ = 'dnsmasq.prefix,dnsmasq.domain'" copies
    # those settings into the template namespace under their bare key name.
    out = {}
    for item in filter(None, (i.strip() for i in text.strip("'\"").split(","))):
        section, _, key = item.partition(".")
        if not key:
            raise ConfigError(origin, "template-data", "_config_items_",
                              f"{item!r} is not section.key")
        if (section, key) in values:
            out[key] = values[(section, key)][0]
        elif (section, key) in KEY_TABLE:
            out[key] = KEY_TABLE[(section, key)].default
        else:
            raise ConfigError(origin, "template-data", "_config_items_",
                              f"{item!r} is not a known setting")
    return out


def _store(base: str, st: Dict[str, Any], origin: Callable[[str, str], str]) -> StoreSection:
    for key in ("ca_file", "cert_file", "key_file", "password_file"):
        if st[key]:
            st[key] = os.path.join(base, st[key])
    if not st["host"]:
        st["host"] = socket.gethostname().split(".")[0]
    if st["backend"] == "etcd" and not st["endpoints"]:
        raise ConfigError(origin("store", "endpoints"), "store", "endpoints",
                          "backend = etcd needs at least one endpoint")
    if bool(st["cert_file"]) != bool(st["key_file"]):
        missing = "key_file" if st["cert_file"] else "cert_file"
        raise ConfigError(origin("store", missing), "store", missing,
                          "cert_file and key_file go together")
    if bool(st["username"]) != bool(st["password_file"]):
        missing = "password_file" if st["username"] else "username"
        raise ConfigError(origin("store", missing), "store", missing,
                          "username and password_file go together")
    tls = st["ca_file"] or st["cert_file"]
    if tls and any(e.startswith("http://") for e in st["endpoints"]):
        raise ConfigError(origin("store", "endpoints"), "store", "endpoints",
                          "TLS files are set but an endpoint is http://; use https://")
    return StoreSection(**st)


def _check_metrics(metrics: MetricsSection, listen_address: str, dn: DnsmasqSection,
                   origin: Callable[[str, str], str]) -> None:
    """The metrics listener is never where guests can reach it."""
    if metrics.listen is None:
        return
    host = ipaddress.ip_address(metrics.listen[0])
    problem = None
    if host == ipaddress.ip_address(listen_address):
        problem = f"{host} is the metadata address ([mdserver] listen_address): guests reach it"
    elif host.version == 4 and (host in dn.network or host == ipaddress.IPv4Address(dn.gateway)):
        problem = f"{host} is on the guests' network {dn.network}: guests reach it"
    if problem:
        raise ConfigError(origin("metrics", "listen"), "metrics", "listen",
                          problem + "; give a host-only address such as 127.0.0.1")


def _check_network(dn: DnsmasqSection, origin: Callable[[str, str], str]) -> None:
    try:
        net = ipaddress.IPv4Network(f"{dn.net_address}/{dn.net_prefix}")
    except ValueError:
        raise ConfigError(origin("dnsmasq", "net_address"), "dnsmasq", "net_address",
                          f"{dn.net_address} is not the network address of a "
                          f"/{dn.net_prefix}") from None
    gw = ipaddress.IPv4Address(dn.gateway)
    if gw not in net or gw in (net.network_address, net.broadcast_address):
        raise ConfigError(origin("dnsmasq", "gateway"), "dnsmasq", "gateway",
                          f"{dn.gateway} is not a host address of {net}")


def render_sample() -> str:
    """The documented default configuration file, generated from KEYS."""
    out = ["# mdserver configuration. Every key is shown with its default value.",
           "# Values are read as md_server 0.6 read them: write a literal $ as $$,",
           "# ${section:key} refers to another value.", ""]
    for section in SECTIONS:
        out.append(f"[{section}]")
        for k in (k for k in KEYS if k.section == section):
            out += ["# " + line if line else "#" for line in k.doc.split("\n")]
            out += [f"# {k.name} = {k.default}".rstrip(), ""]
        if section == "mdserver":
            out += [
                "[public-keys]",
                "# name = ssh public key. Every key is served to every guest and given",
                "# to templates as public_key_<name>.",
                "# default = ssh-ed25519 AAAA... admin@host",
                "",
                "[template-data]",
                "# key = value pairs given to every user-data template.",
                "# _config_items_ = dnsmasq.domain  copies that setting in as 'domain'.",
                "# foo = bar",
                "",
            ]
    out += ["[_include_]",
            "# Colon-separated lists; directories' *.conf files are read in name",
            "# order, then the files; later values win.",
            "# directories = /etc/mdserver/mdserver.conf.d",
            "# files =", ""]
    return "\n".join(out)
