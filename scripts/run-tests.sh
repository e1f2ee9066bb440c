#!/usr/bin/env bash
# Install everything the tests need (Debian/Ubuntu, as root), check types
# (mypy) and run the tests.
#   sudo ./scripts/run-tests.sh [pytest args...]
#   ./scripts/run-tests.sh -m unit        # the in-process tier only: seconds
#   ./scripts/run-tests.sh -m "not privileged"   # no root needed
# Tests that need root/namespaces skip when unprivileged, unless
# MDSERVER_REQUIRE_PRIVILEGED=1 (set in CI), which makes them fail instead.
# Every run checks that the tests stay hermetic (tests/hermetic.py; README,
# "Tests"); MDSERVER_HERMETIC=0 switches that off.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "run-tests: $*" >&2; exit 1; }

# cloud-init: its DataSourceEc2 is the client in the tests; dnsmasq-base and
# busybox (udhcpc, nslookup): DHCP/DNS tests; libvirt + qemu + iptables: the
# real libvirtd that runs the hook (not libvirt-daemon-system: it would pull
# in systemd-sysv and start a libvirtd of its own); systemd: systemd-analyze
# for the units (it does not become the init system); qemu-utils, mmdebstrap,
# e2fsprogs, openssh-client, openssl: the guest image and the guest boot test;
# xorriso and genisoimage (isoinfo): readers of the seed images independent of
# pycdlib (this kernel may have no iso9660 to mount them). libvirt-dev and
# pkg-config: pip builds libvirt-python (the `enroll` extra; mdserver-enroll's
# binding to libvirt) from source against the installed libvirt. etcd-server
# and etcd-client (etcdctl): the real etcd the tests start in a namespace of
# their own (tests/etcd_lab.py, ports 2379x/2380x); the package's own etcd
# service (localhost:2379, started on install where an init system runs) is
# never used by the tests. nftables (nft): the hop-limit rule set, loaded only
# into the namespaces the tests create. wrk: one guest's flood in the fairness
# test (tests/test_fairness_guests.py) and the benchmark suite's load.
# nginx-light: the benchmark suite's reference server (tests/test_bench.py runs
# `python -m bench --quick`, which starts an nginx of its own, own config, in a
# namespace of its own; the package's service, started on install where an
# init system runs, is never used).
# dpkg-dev, fakeroot, lintian: tests/test_package.py builds mdserver's own
# Debian package with scripts/build-deb.sh (which installs the rest of its
# build dependencies, those of debian/control, with apt-get build-dep) and
# installs it in a qemu guest, never on this host; debugfs (e2fsprogs) reads
# the guest image's dpkg status for it. groff-base (groff, man): the man
# pages' check (tests/test_manpages.py: no groff warning).
apt_packages=(iproute2 ca-certificates dnsmasq-base busybox libvirt-daemon
              libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 iptables
              systemd qemu-utils mmdebstrap e2fsprogs openssh-client openssl
              xorriso genisoimage libvirt-dev pkg-config etcd-server etcd-client nftables wrk
              nginx-light dpkg-dev fakeroot lintian groff-base)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    had_cloud_init=$(dpkg-query -W -f='${Status}' cloud-init 2>/dev/null | grep -c "ok installed" || true)
    missing=()
    for p in "${apt_packages[@]}" cloud-init python3-venv; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "run-tests: installing ${missing[*]}"
        apt-get update -qq || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
    fi
    if [ "$had_cloud_init" = 0 ] && [ -d /etc/cloud ] && [ ! -e /etc/cloud/cloud-init.disabled ]; then
        # The tests only import cloud-init's code; keep it from acting on this
        # host at its next boot.
        touch /etc/cloud/cloud-init.disabled
        echo "run-tests: cloud-init installed for its code only; disabled on this host" \
             "(/etc/cloud/cloud-init.disabled)"
    fi
else
    echo "run-tests: not root or no apt-get: using what is installed" >&2
fi

python=${PYTHON:-python3}
venv=${MDSERVER_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv" || die "cannot create a virtual environment with $python"
fi
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# The enroller's libvirt binding compiles against libvirt-dev, which only the
# root path above installs; without it the enroller's tests skip (and fail
# under MDSERVER_REQUIRE_PRIVILEGED=1) saying so.
extras="test"
if [ "$(id -u)" = 0 ] || pkg-config --exists libvirt 2>/dev/null; then
    extras="test,enroll"
fi
"$venv/bin/python" -m pip install -q -e ".[$extras]" || die "pip install failed"
# The type gate first ([tool.mypy] in pyproject.toml): seconds, and a type
# error fails the run before any test starts.
"$venv/bin/python" -m mypy mdserver || die "mypy found type errors in mdserver/"
exec "$venv/bin/python" -m pytest "$@"
