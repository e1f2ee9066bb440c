"""The INI reader: md_server 0.6 compatibility, defaults, and one-line errors."""

import os
import pickle

import pytest

from mdserver import config
from mdserver.errors import ConfigError

pytestmark = pytest.mark.unit

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)


def load_text(tmp_path, text: str) -> config.Config:
    path = tmp_path / "mdserver.conf"
    path.write_text(text)
    return config.load(str(path))


def error_of(tmp_path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    return str(info.value)


DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "schema1")


def test_shipped_config_is_the_generated_sample():
    with open(os.path.join(ROOT, "etc", "mdserver", "mdserver.conf")) as f:
        assert f.read() == config.render_sample()


def test_every_key_is_documented_with_its_default():
    sample = config.render_sample()
    for key in config.KEYS:
        assert f"# {key.name} = {key.default}".rstrip() in sample


def test_shipped_config_loads_to_the_defaults():
    cfg = config.load(os.path.join(ROOT, "etc", "mdserver", "mdserver.conf"))
    assert cfg.mdserver.port == 80
    assert cfg.mdserver.listen_address == "169.254.169.254"
    assert cfg.mdserver.db_file == "/var/lib/mdserver/db_file.json"
    assert cfg.mdserver.userdata_suffixes == (".yaml",)
    assert cfg.mdserver.imds_tokens == "optional"
    assert cfg.mdserver.region == "mds-1"
    assert cfg.dnsmasq.network.with_prefixlen == "10.122.0.0/16"
    assert cfg.dnsmasq.entry_order == ("base",)
    assert cfg.dnsmasq.prefix is None and cfg.dnsmasq.domain is None
    assert cfg.public_keys == ()
    assert cfg.warnings == ()


MD_SERVER_06 = """\
[mdserver]
port=80
listen_address=169.254.169.254
loglevel=info
debug=no
logfile=/var/log/mdserver.log
userdata_dir=/etc/mdserver/userdata
userdata_suffixes=:.yaml
password=$$6$$rounds=4096$$saltsalt$$hashhashhash
default_template=base.yaml
db_file=/var/lib/mdserver/db_file.json

[public-keys]
default = ssh-rsa AAAAB3Nza default@host
other = ssh-ed25519 AAAAC3Nza other@host

[template-data]
foo=bar
_config_items_ = 'dnsmasq.domain,dnsmasq.prefix'

[dnsmasq]
base_dir=/var/lib/mdserver/dnsmasq
net_name=mds
net_address=10.122.0.0
net_prefix=16
gateway=10.122.0.1
interface=br-mds
use_dns=yes
lease_len=3600
prefix=test-
domain=example.net
entry_order=prefix,domain,base
"""


def test_md_server_06_file_reads_with_the_same_meaning(tmp_path):
    cfg = load_text(tmp_path, MD_SERVER_06)
    md = cfg.mdserver
    assert md.password == "$6$rounds=4096$saltsalt$hashhashhash"  # $$ is a literal $
    assert md.userdata_suffixes == (".yaml",)  # the empty entry means "bare name"
    assert md.default_template == "/etc/mdserver/userdata/base.yaml"
    assert md.logfile == "/var/log/mdserver.log"
    assert cfg.public_keys == (("default", "ssh-rsa AAAAB3Nza default@host"),
                               ("other", "ssh-ed25519 AAAAC3Nza other@host"))
    assert dict(cfg.template_data) == {"foo": "bar", "domain": "example.net",
                                       "prefix": "test-"}
    dn = cfg.dnsmasq
    assert (dn.use_dns, dn.lease_len, dn.prefix, dn.domain) == (True, 3600, "test-",
                                                                 "example.net")
    assert dn.entry_order == ("prefix", "domain", "base")
    assert cfg.warnings == (f"{tmp_path}/mdserver.conf: [mdserver] debug: md_server 0.6 "
                            "setting not used by mdserver; ignored",)


def test_interpolation_and_default_section(tmp_path):
    cfg = load_text(tmp_path, "[DEFAULT]\nbase = /srv/md\n[mdserver]\n"
                              "db_file = ${base}/db.json\nuserdata_dir = ${base}/ud\n")
    assert cfg.mdserver.db_file == "/srv/md/db.json"
    assert cfg.mdserver.userdata_dir == "/srv/md/ud"


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    cfg = load_text(tmp_path, "[mdserver]\ndb_file = state/db.json\n")
    assert cfg.mdserver.db_file == f"{tmp_path}/state/db.json"
    assert cfg.mdserver.token_key_file == f"{tmp_path}/state/imds-token.key"


def test_includes_later_values_win(tmp_path):
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "10-port.conf").write_text("[mdserver]\nport = 8081\n")
    (tmp_path / "conf.d" / "20-port.conf").write_text("[mdserver]\nport = 8082\n")
    (tmp_path / "conf.d" / "ignored.txt").write_text("[mdserver]\nport = 1\n")
    (tmp_path / "last.conf").write_text("[public-keys]\nextra = ssh-ed25519 X e@x\n")
    cfg = load_text(tmp_path, "[mdserver]\nport = 8080\n[_include_]\n"
                              "directories = conf.d\nfiles = last.conf\n")
    assert cfg.mdserver.port == 8082
    assert cfg.public_keys == (("extra", "ssh-ed25519 X e@x"),)


@pytest.mark.parametrize("text, where, why", [
    ("[mdserver]\nport = eighty\n", "[mdserver] port", "not a whole number"),
    ("[mdserver]\nport = 70000\n", "[mdserver] port", "outside 0..65535"),
    ("[mdserver]\nlisten_address = 300.1.1.1\n", "[mdserver] listen_address",
     "not an IP address"),
    ("[mdserver]\nloglevel = loud\n", "[mdserver] loglevel", "not one of"),
    ("[mdserver]\nimds_tokens = sometimes\n", "[mdserver] imds_tokens", "not one of"),
    ("[mdserver]\npassword = $$y$$j9T$$abc$$def\n", "[mdserver] password",
     "not a crypt hash"),
    ("[mdserver]\npassword = secret\n", "[mdserver] password", "not a crypt hash"),
    ("[mdserver]\npassword = $6$salt$hash\n", "[mdserver] password", "write a literal $ as $$"),
    ("[mdserver]\nfrobnicate = yes\n", "[mdserver] frobnicate", "unknown key"),
    ("[mystery]\nx = 1\n", "[mystery]", "unknown section"),
    ("[dnsmasq]\ngateway = 10.123.0.1\n", "[dnsmasq] gateway", "not a host address"),
    ("[dnsmasq]\ngateway = 10.122.255.255\n", "[dnsmasq] gateway", "not a host address"),
    ("[dnsmasq]\nnet_address = 10.122.0.5\n", "[dnsmasq] net_address",
     "not the network address"),
    ("[dnsmasq]\nuse_dns = maybe\n", "[dnsmasq] use_dns", "not one of yes/no"),
    ("[dnsmasq]\nentry_order = base,nickname\n", "[dnsmasq] entry_order", "not one of"),
    ("[dnsmasq]\ndomain = bad_domain!\n", "[dnsmasq] domain", "not a valid DNS name"),
    ("[template-data]\nhostname = x\n", "[template-data] hostname", "shadows"),
    ("[public-keys]\nempty =\n", "[public-keys] empty", "empty key"),
    ("[mdserver]\nnetwork_config = bridged\n", "[mdserver] network_config", "not one of"),
    ("[libvirt]\nroute = azure\n", "[libvirt] route", "not one of"),
    ("[libvirt]\nconnect = qemu:///system\n", "[libvirt] connect", "unknown key"),
    ("[seeds]\nformat = iso\n", "[seeds] format", "unknown key"),
    ("[template-data]\nmeta = x\n", "[template-data] meta", "shadows"),
    ("[mdserver\nport = 1\n", "", "File contains no section headers"),
    ("[store]\nbackend = consul\n", "[store] backend", "not one of local, etcd"),
    ("[store]\nbackend = etcd\n", "[store] endpoints", "needs at least one endpoint"),
    ("[store]\nendpoints = 10.0.0.1:2379\n", "[store] endpoints", "not an http:// or https://"),
    ("[store]\nprefix = mdserver\n", "[store] prefix", "not a key prefix"),
    ("[store]\nhost = hv_1\n", "[store] host", "not a host name"),
    ("[store]\ncert_file = c.pem\n", "[store] key_file", "go together"),
    ("[store]\nusername = md\n", "[store] password_file", "go together"),
    ("[store]\nbackend = etcd\nendpoints = http://10.0.0.1:2379\nca_file = ca.pem\n",
     "[store] endpoints", "use https://"),
])
def test_bad_values_name_file_section_and_key(tmp_path, text, where, why):
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path}/mdserver.conf: ")
    assert where in message and why in message
    assert "\n" not in message


def test_error_names_the_included_file(tmp_path):
    (tmp_path / "extra.conf").write_text("[mdserver]\nport = -1\n")
    message = error_of(tmp_path, "[_include_]\nfiles = extra.conf\n")
    assert message.startswith(f"{tmp_path}/extra.conf: [mdserver] port: ")


def test_missing_file(tmp_path):
    message = error_of_path(str(tmp_path / "nope.conf"))
    assert "cannot read" in message


def error_of_path(path: str) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(path)
    return str(info.value)


def test_config_is_frozen(cfg):
    with pytest.raises(AttributeError):
        cfg.mdserver.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.template_data[0] = ("x", "y")  # type: ignore[index]
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # crosses into the server worker


def test_new_sections_defaults_and_relative_paths(tmp_path):
    cfg = load_text(tmp_path, "[mdserver]\ndb_file = db.json\n")
    assert (cfg.mdserver.network_config, cfg.mdserver.vendor_data) == ("dhcp", None)
    assert cfg.libvirt.route == "openstack"
    assert cfg.seeds.dir == os.path.join(str(tmp_path), "seeds")  # beside db_file
    path = tmp_path / "sub" / "mdserver.conf"
    path.parent.mkdir()
    path.write_text("[mdserver]\nvendor_data = vendor.yaml\nnetwork_config = static\n"
                    "[libvirt]\nroute = configdrive\n[seeds]\ndir = iso\n")
    cfg = config.load(str(path))
    assert cfg.mdserver.vendor_data == str(tmp_path / "sub" / "vendor.yaml")
    assert cfg.seeds.dir == str(tmp_path / "sub" / "iso")
    assert (cfg.mdserver.network_config, cfg.libvirt.route) == ("static", "configdrive")


def test_configuration_written_by_schema_1_loads_unchanged():
    """A copy of a configuration issue 3's mdserver wrote (every key set),
    and of its shipped sample: both load, with the same meaning."""
    cfg = config.load(os.path.join(DATA, "mdserver.conf"))
    assert cfg.warnings == ()
    assert (cfg.mdserver.password, cfg.dnsmasq.domain, cfg.dnsmasq.prefix) == (
        "$6$salt$hash", "example.net", "vm-")
    assert cfg.template_data == (("colour", "blue"), ("domain", "example.net"))
    assert cfg.mdserver.db_file == os.path.join(DATA, "db_file.json")
    assert cfg.libvirt.route == "openstack" and cfg.mdserver.network_config == "dhcp"
    assert config.load(os.path.join(DATA, "mdserver.conf.dist")).warnings == ()


def test_vendor_data_file_is_checked_at_start(tmp_path):
    from mdserver.wiring import read_vendor_data
    from mdserver.errors import ConfigError
    good = tmp_path / "v.yaml"
    good.write_text("#cloud-config\nruncmd: [x]\n")
    assert read_vendor_data(str(good)) == "#cloud-config\nruncmd: [x]\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text("#cloud-config\nruncmd: [x\n")
    for path, why in ((bad, "not valid YAML"), (tmp_path / "missing", "cannot read")):
        with pytest.raises(ConfigError) as e:
            read_vendor_data(str(path))
        assert "[mdserver] vendor_data" in str(e.value) and why in str(e.value)


def test_store_defaults_and_values(tmp_path):
    import socket
    st = load_text(tmp_path, "").store
    assert (st.backend, st.endpoints, st.prefix) == ("local", (), "/mdserver/")
    assert st.host == socket.gethostname().split(".")[0]
    st = load_text(tmp_path, "[store]\nbackend = etcd\nhost = hv2\nprefix = /lab/md/\n"
                             "endpoints = https://10.0.0.1:2379, https://10.0.0.2:2379/\n"
                             "ca_file = ca.pem\n").store
    assert st.endpoints == ("https://10.0.0.1:2379", "https://10.0.0.2:2379")
    assert (st.host, st.prefix, st.ca_file) == ("hv2", "/lab/md/", f"{tmp_path}/ca.pem")
