"""`mdserver --demo`'s configuration and hints, in-process (test_cli.py runs the demo daemon)."""

import pytest

from mdserver import config, demo
from mdserver.store import Store

pytestmark = pytest.mark.unit


def test_demo_config_is_loopback_port_8169(tmp_path):
    cfg = config.load(demo.write_demo(str(tmp_path / "state")))
    assert (cfg.mdserver.listen_address, cfg.mdserver.port) == ("127.0.0.1", 8169)
    assert cfg.mdserver.admin_socket == str(tmp_path / "state" / "admin.sock")
    assert config.load(demo.write_demo(str(tmp_path / "other"), port=0)).mdserver.port == 0


def test_demo_instance_and_hints(tmp_path, capsys):
    cfg = config.load(demo.write_demo(str(tmp_path)))
    store = Store(cfg.mdserver.db_file)
    try:
        demo.register_demo(store)
        demo.register_demo(store)  # again: still one
        assert [(i.name, i.ipv4) for i in store] == [("demo", "127.0.0.1")]
    finally:
        store.close()
    demo.print_hints("127.0.0.1", cfg.mdserver.port)
    out = capsys.readouterr().out
    assert "instance 'demo' is 127.0.0.1" in out
    assert "curl http://127.0.0.1:8169/latest/meta-data/" in out
