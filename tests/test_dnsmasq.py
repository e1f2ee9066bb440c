"""dnsmasq rendering (golden files) and the file writer."""

import getpass
import os
import signal

import pytest

from helpers import make_instance, write_config
from golden import check
from mdserver import config, dnsmasq

pytestmark = pytest.mark.unit


def cfg_for(tmp_path, dn=""):
    cfg = config.load(write_config(tmp_path, "[dnsmasq]\n" + dn))
    return cfg


def normalised(text, tmp_path):
    return text.replace(str(tmp_path), "TMP").replace(f"user={getpass.getuser()}\n", "user=USER\n")


def test_conf_golden_defaults(tmp_path):
    cfg = cfg_for(tmp_path)
    check("dnsmasq_mds.conf", normalised(dnsmasq.render_conf(cfg), tmp_path))


def test_conf_golden_dns_domain_upstream(tmp_path):
    cfg = cfg_for(tmp_path, "use_dns = yes\ndomain = mds.example\nlease_len = 3600\n"
                            "upstream_servers = 192.0.2.53, 2001:db8::53\n")
    check("dnsmasq_mds_dns.conf", normalised(dnsmasq.render_conf(cfg), tmp_path))


def test_host_files_golden(tmp_path):
    cfg = cfg_for(tmp_path, "prefix = lab-\ndomain = mds.example\n"
                            "entry_order = prefix,domain,base\n")
    inst = make_instance(5)
    check("dnsmasq_dhcp_host", dnsmasq.render_dhcp_host(inst, cfg.dnsmasq))
    check("dnsmasq_host", dnsmasq.render_host(inst, cfg.dnsmasq))


def test_entry_order_rules(tmp_path):
    inst = make_instance(5)
    for dn, names in [
        ("", ["vm5"]),
        ("entry_order = prefix,domain,base\n", ["vm5"]),
        ("prefix = lab-\nentry_order = prefix,domain,base\n", ["lab-vm5", "vm5"]),
        ("domain = d.test\nentry_order = fqdn,base\n", ["vm5.d.test", "vm5"]),
        ("prefix = p\ndomain = d.test\nentry_order = base,domain\n", ["vm5", "pvm5.d.test"]),
    ]:
        sub = tmp_path / str(len(dn))
        sub.mkdir()
        assert dnsmasq.dns_names(inst, cfg_for(sub, dn).dnsmasq) == names, dn


def test_writer_sync_put_remove_and_reload(tmp_path):
    cfg = cfg_for(tmp_path)
    sent = []
    files = dnsmasq.DnsmasqFiles(cfg, kill=lambda pid, sig: sent.append((pid, sig)))
    a, b = make_instance(1), make_instance(2)
    assert files.sync([a, b]) is True
    base = cfg.dnsmasq.base_dir
    assert sorted(os.listdir(os.path.join(base, "dhcp-hosts"))) == sorted([a.uuid, b.uuid])
    assert oct(os.stat(os.path.join(base, "hosts", a.uuid)).st_mode & 0o777) == "0o644"
    assert files.sync([a, b]) is False  # nothing changed: nothing written
    assert files.put(a) is False
    assert files.put(a.updated(ipv4="10.122.9.9")) is True  # changed entry: needs SIGHUP
    assert files.put(make_instance(3)) is False  # new file: dnsmasq's watch sees it
    assert files.remove(b.uuid) is True
    assert files.reload() is False  # no pid file: nothing to signal
    with open(os.path.join(base, "dnsmasq.pid"), "w") as f:
        f.write("4242\n")
    assert files.reload() is True and sent == [(4242, signal.SIGHUP)]
    assert files.sync([a]) is True
    assert os.listdir(os.path.join(base, "dhcp-hosts")) == [a.uuid]
