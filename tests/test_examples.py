"""Shipped examples render to valid cloud-config."""

import os
import shutil

import pytest
import yaml

from helpers import make_instance, write_config
from mdserver import config, userdata
from mdserver.view import Site

pytestmark = pytest.mark.unit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_example_template_renders(tmp_path):
    cfg = config.load(write_config(
        tmp_path, "[public-keys]\nadmin = ssh-ed25519 AAAAC3Nza admin@host\n",
        password="$$6$$salt$$hashhash"))
    shutil.copy(os.path.join(ROOT, "etc", "mdserver", "userdata", "example.yaml"),
                tmp_path / "userdata" / "vm1.yaml")
    t = userdata.Templates(cfg.mdserver.userdata_dir, cfg.mdserver.userdata_suffixes, None)
    inst = make_instance(1)
    path, text = t.render(inst, userdata.context(inst, Site.from_config(cfg), cfg))
    data = yaml.safe_load(text)
    assert path.endswith("vm1.yaml")
    assert data["hostname"] == "vm1" and data["password"] == "$6$salt$hashhash"
    assert data["ssh_authorized_keys"] == ["ssh-ed25519 AAAAC3Nza admin@host"]
