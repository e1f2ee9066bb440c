"""mdserver.pruning: which records a prune removes, and its two guards."""

import pytest

from mdserver import pruning

pytestmark = pytest.mark.unit


def recs(n):
    return [{"uuid": f"5e1f{i:04x}-aaaa-4bbb-8ccc-{i:012x}", "name": f"vm{i}"}
            for i in range(n)]


def uuids(records):
    return {r["uuid"] for r in records}


def test_nothing_gone_nothing_removed():
    r = recs(3)
    d = pruning.decide(r, uuids(r))
    assert (d.gone, d.remove, d.refused) == ((), (), None)


def test_within_ten_percent_removed():
    r = recs(20)
    d = pruning.decide(r, uuids(r[2:]))
    assert d.remove == tuple(r[:2]) and d.gone == d.remove and d.refused is None


def test_uuids_compare_case_insensitively():
    r = recs(3)
    d = pruning.decide(r, {u.upper() for u in uuids(r)})
    assert d.gone == ()


def test_more_than_ten_percent_needs_force():
    r = recs(20)
    d = pruning.decide(r, uuids(r[3:]))
    assert d.gone == tuple(r[:3]) and d.remove == ()
    assert "mdserverctl prune --yes" in d.refused
    forced = pruning.decide(r, uuids(r[3:]), force=True)
    assert forced.remove == tuple(r[:3]) and forced.refused is None


def test_at_least_one_record_may_go():
    # a small registry: 10% of 3 is no whole record; one is allowed
    r = recs(3)
    assert pruning.decide(r, uuids(r[1:])).remove == (r[0],)
    assert pruning.decide(r, uuids(r[2:])).remove == ()


def test_empty_libvirt_removes_nothing_even_forced():
    r = recs(5)
    for force in (False, True):
        d = pruning.decide(r, set(), force=force)
        assert d.remove == () and d.gone == tuple(r)
        assert "no domain at all" in d.refused


def test_only_this_hosts_records():
    r = [dict(x, host="b" if x["name"] == "vm0" else "a") for x in recs(4)]
    d = pruning.decide(r, uuids(r[2:]), "a", force=True)
    assert d.gone == (r[1],) == d.remove  # vm0 is host b's: never this host's to prune


def test_this_host():
    r = recs(3)
    assert all(pruning.this_host(x, None) for x in r)  # a registry of one host
    assert pruning.this_host(dict(r[0], host="a"), "a")
    assert not pruning.this_host(dict(r[0], host="b"), "a")
    assert pruning.this_host(r[0], "a")  # a record that names no host is this host's
    assert pruning.limit(9) == 1 and pruning.limit(10) == 1 and pruning.limit(30) == 3
