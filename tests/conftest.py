"""Fixtures and hooks only (helpers live in helpers.py): configs, the tier check, a host tripwire, the hermetic check."""

import os
import sys
import time

import pytest

from helpers import write_config
from mdserver import config

# The hermetic check (tests/hermetic.py): a connect to the host's mdserver,
# libvirt or syslog, or to a host port no process of this run serves, fails
# the run; MDSERVER_HERMETIC=0 switches it off.
pytest_plugins = ["hermetic"]

# Every test belongs to exactly one tier (markers registered in pyproject.toml):
# `pytest -m unit` is the quick loop, `-m "not privileged"` needs no root.
TIERS = ("unit", "process", "privileged")

# Where a live mdserver or libvirt keeps its state on a hypervisor. Tests keep
# theirs in temp dirs and namespaces; one that appears here during the run
# means a test reached for the host's (a daemon started on default paths).
HOST_PATHS = ("/etc/mdserver", "/run/mdserver", "/var/lib/mdserver", "/run/libvirt",
              "/var/lib/libvirt", "/var/log/libvirt", "/var/cache/libvirt")
_absent_at_start = []


@pytest.fixture
def conf_path(tmp_path):
    return write_config(tmp_path, "[public-keys]\nadmin = ssh-ed25519 AAAAC3Nza admin@host\n")


@pytest.fixture
def cfg(conf_path):
    return config.load(conf_path)


@pytest.fixture
def now():
    return time.time()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Refuse a test without exactly one tier mark, before `-m` deselects anything."""
    wrong = []
    for item in items:
        tiers = sorted({m.name for m in item.iter_markers()} & set(TIERS))
        if len(tiers) != 1:
            wrong.append(f"{item.nodeid}: {', '.join(tiers) or 'no tier'}")
    if wrong:
        raise pytest.UsageError(
            "every test needs exactly one tier mark of " + ", ".join(TIERS)
            + " (module-level `pytestmark = pytest.mark.<tier>` or on the test):\n  "
            + "\n  ".join(wrong))


def pytest_sessionstart(session):
    _absent_at_start[:] = [p for p in HOST_PATHS if not os.path.lexists(p)]


def pytest_sessionfinish(session, exitstatus):
    """The tripwire for HOST_PATHS: fail the run (the paths are left for a look)."""
    appeared = [p for p in _absent_at_start if os.path.lexists(p)]
    if appeared:
        print(f"\nERROR: the tests created host paths: {', '.join(appeared)}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Let fixtures see whether their test failed (item.rep_call), to keep artifacts."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
