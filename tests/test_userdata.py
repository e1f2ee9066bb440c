"""User-data: lookup order, context, caching, checking, and no path traversal."""

import os
import time

import pytest
import yaml

from helpers import make_instance, write_config
from golden import check
from mdserver import config, userdata
from mdserver.errors import TemplateError
from mdserver.view import Site
from mdserver.models import InstanceSettings

pytestmark = pytest.mark.unit

KEYS = "[public-keys]\nadmin = ssh-ed25519 AAAAC3Nza admin@host\nops = ssh-rsa AAAAB3 ops@h\n"
HASH = "$6$saltsalt$0123456789abcdef"


def setup(tmp_path, extra="", **md):
    cfg = config.load(write_config(tmp_path, KEYS + extra, **md))
    t = userdata.Templates(cfg.mdserver.userdata_dir, cfg.mdserver.userdata_suffixes,
                           cfg.mdserver.default_template)
    return cfg, t


def render(cfg, t, inst):
    return t.render(inst, userdata.context(inst, Site.from_config(cfg), cfg))


def test_builtin_template_golden_without_password(tmp_path):
    cfg, t = setup(tmp_path)
    path, text = render(cfg, t, make_instance(4))
    assert path == userdata.BUILTIN_NAME
    check("userdata_builtin.yaml", text)


def test_builtin_template_golden_with_password_and_domain(tmp_path):
    cfg, t = setup(tmp_path, "[dnsmasq]\ndomain = example.net\n",
                   password=HASH.replace("$", "$$"))
    _, text = render(cfg, t, make_instance(4))
    check("userdata_builtin_password.yaml", text)
    data = yaml.safe_load(text)
    assert data["password"] == HASH and data["ssh_pwauth"] is True
    assert data["fqdn"] == "vm4.example.net"
    assert data["ssh_authorized_keys"] == ["ssh-ed25519 AAAAC3Nza admin@host",
                                           "ssh-rsa AAAAB3 ops@h"]


def test_instance_password_overrides_config(tmp_path):
    cfg, t = setup(tmp_path, password=HASH.replace("$", "$$"))
    own = "$5$othersalt$abcdefghij"
    _, text = render(cfg, t, make_instance(4, settings=InstanceSettings(password=own)))
    assert yaml.safe_load(text)["password"] == own


def write(tmp_path, name, text):
    path = tmp_path / "userdata" / name
    path.write_text(text)
    return str(path)


def test_lookup_order(tmp_path):
    cfg, t = setup(tmp_path, default_template="base")
    inst = make_instance(4, settings=InstanceSettings(template="special"))
    order = ["special", "vm4", "vm4.yaml", inst.mac, inst.mac + ".yaml", "base"]
    assert t.candidates(inst) == [str(tmp_path / "userdata" / n) for n in order]
    for name in reversed(order):  # each file, once present, beats those after it
        write(tmp_path, name, f"#!/bin/sh\necho {name}\n")
        assert render(cfg, t, inst) == (str(tmp_path / "userdata" / name),
                                        f"#!/bin/sh\necho {name}\n")


def test_missing_instance_template_logs_warning_and_goes_on(tmp_path, caplog):
    cfg, t = setup(tmp_path)
    write(tmp_path, "vm4.yaml", "#!/bin/sh\n")
    inst = make_instance(4, settings=InstanceSettings(template="gone"))
    assert render(cfg, t, inst)[0].endswith("vm4.yaml")
    assert "template" in caplog.text and "gone" in caplog.text


@pytest.mark.parametrize("name", ["../etc/passwd", "/etc/passwd", "..", ".hidden",
                                  "a/b", "x\0y", ""])
def test_unsafe_names_never_become_paths(tmp_path, name):
    _, t = setup(tmp_path)
    inst = make_instance(4, name=name or "vm4", settings=InstanceSettings(template=name))
    for path in t.candidates(inst):
        assert os.path.dirname(path) == str(tmp_path / "userdata")
        assert os.path.basename(path) and not os.path.basename(path).startswith(".")


def test_context(tmp_path):
    cfg, t = setup(tmp_path, "[template-data]\nfoo = bar\n")
    inst = make_instance(4)
    ctx = userdata.context(inst, Site.from_config(cfg), cfg)
    assert ctx["public_key_admin"] == "ssh-ed25519 AAAAC3Nza admin@host"
    assert ctx["public_keys"] == {"admin": "ssh-ed25519 AAAAC3Nza admin@host",
                                  "ops": "ssh-rsa AAAAB3 ops@h"}
    assert ctx["public_key_list"] == list(ctx["public_keys"].values())
    assert (ctx["hostname"], ctx["name"], ctx["uuid"], ctx["mac"], ctx["ip"]) == (
        "vm4", "vm4", inst.uuid, inst.mac, inst.ipv4)
    assert ctx["foo"] == "bar"
    assert "mdserver_password" not in ctx


def test_template_sees_context(tmp_path):
    cfg, t = setup(tmp_path, "[template-data]\nfoo = bar\n")
    write(tmp_path, "vm4", "#cloud-config\nhostname: {{hostname}}\nfoo: {{foo}}\n"
                           "keys: {{len(public_key_list)}}\n")
    assert yaml.safe_load(render(cfg, t, make_instance(4))[1]) == {
        "hostname": "vm4", "foo": "bar", "keys": 2}


def test_recompiled_when_file_changes(tmp_path):
    cfg, t = setup(tmp_path)
    path = write(tmp_path, "vm4", "#!/bin/sh\necho one\n")
    assert render(cfg, t, make_instance(4))[1] == "#!/bin/sh\necho one\n"
    first = t._compiled[path][1]
    assert render(cfg, t, make_instance(4)) and t._compiled[path][1] is first  # cached
    write(tmp_path, "vm4", "#!/bin/sh\necho two, longer\n")
    os.utime(path, ns=(time.time_ns() + 10**9,) * 2)
    assert render(cfg, t, make_instance(4))[1] == "#!/bin/sh\necho two, longer\n"


def counted_context(cfg, inst, calls):
    def build():
        calls.append(inst.uuid)
        return userdata.context(inst, Site.from_config(cfg), cfg)
    return build


def test_rendered_text_kept_until_record_or_template_changes(tmp_path):
    cfg, _ = setup(tmp_path)
    # A clock far past every mtime: directory listings are kept.
    t = userdata.Templates(cfg.mdserver.userdata_dir, cfg.mdserver.userdata_suffixes,
                           cfg.mdserver.default_template, clock=lambda: time.time() + 60)
    inst, calls = make_instance(4), []
    first = t.render(inst, counted_context(cfg, inst, calls))
    assert t.render(inst, counted_context(cfg, inst, calls)) == first and len(calls) == 1
    # The record replaced (any change to an instance makes a new record): rendered again.
    again = make_instance(4)
    assert t.render(again, counted_context(cfg, again, calls)) == first and len(calls) == 2
    # A template of its own appears: it is used at once.
    path = write(tmp_path, "vm4", "#!/bin/sh\necho {{hostname}}\n")
    assert t.render(again, counted_context(cfg, again, calls)) == (path, "#!/bin/sh\necho vm4\n")
    # ... edited in place (the directory does not change): the new text.
    write(tmp_path, "vm4", "#!/bin/sh\necho {{hostname}} two\n")
    os.utime(path, ns=(time.time_ns() + 10**9,) * 2)
    assert t.render(again, counted_context(cfg, again, calls))[1] == "#!/bin/sh\necho vm4 two\n"
    # ... and removed: back to the built-in one.
    os.unlink(path)
    assert t.render(again, counted_context(cfg, again, calls)) == first
    assert len(calls) == 5


def test_recent_directory_is_listed_again(tmp_path):
    """A file created within the directory's mtime granularity leaves its\n    stamp as it was: a directory changed less than RACY_SECONDS ago is\n    listed again at every request."""
    cfg, _ = setup(tmp_path)
    d = cfg.mdserver.userdata_dir
    mtime = os.stat(d).st_mtime_ns
    now = [mtime / 1e9 + userdata.RACY_SECONDS / 2]
    t = userdata.Templates(d, cfg.mdserver.userdata_suffixes, cfg.mdserver.default_template,
                           clock=lambda: now[0])
    inst = make_instance(4)
    assert render(cfg, t, inst)[0] == userdata.BUILTIN_NAME
    path = write(tmp_path, "vm4", "#!/bin/sh\n")
    os.utime(d, ns=(mtime, mtime))  # the same stamp as when it was listed
    assert render(cfg, t, inst)[0] == path


def test_invalid_cloud_config_is_an_error_with_line(tmp_path):
    cfg, t = setup(tmp_path)
    write(tmp_path, "vm4", "#cloud-config\nhostname: {{hostname}}\nruncmd:\n  - [a, b\n"
                           "packages: [x]\n")
    with pytest.raises(TemplateError, match=r"not valid YAML at line \d+"):
        render(cfg, t, make_instance(4))


def test_cloud_config_must_be_a_mapping(tmp_path):
    cfg, t = setup(tmp_path)
    write(tmp_path, "vm4", "#cloud-config\n- a\n- b\n")
    with pytest.raises(TemplateError, match="not a YAML mapping"):
        render(cfg, t, make_instance(4))


def test_template_code_errors_are_template_errors(tmp_path):
    cfg, t = setup(tmp_path)
    write(tmp_path, "vm4", "#!/bin/sh\necho {{undefined_name}}\n")
    with pytest.raises(TemplateError, match="NameError"):
        render(cfg, t, make_instance(4))


def test_non_cloud_config_is_passed_through(tmp_path):
    cfg, t = setup(tmp_path)
    write(tmp_path, "vm4", "#!/bin/sh\n: not yaml: [\n")
    assert render(cfg, t, make_instance(4))[1] == "#!/bin/sh\n: not yaml: [\n"
