#!/usr/bin/env bash
# Boot stock Debian 12 guests under qemu, one per route (aws, openstack,
# nocloud-net, configdrive), and check that mdserver configured them
# (tests/test_guest_boot.py), as root:
#   sudo ./scripts/guest-boot-test.sh [--image DIR] [--keep] [pytest args...]
# --image DIR  use an image already built there (see tests/guest/README.md)
# --keep       keep the last guests up after the checks, until Enter
#              (with `-k ROUTE` to choose which)
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --image) export MDSERVER_GUEST_IMAGE_DIR="$2"; shift 2 ;;
        --keep) export MDSERVER_GUEST_KEEP=1; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
exec ./scripts/run-tests.sh tests/test_guest_boot.py -s -v "${args[@]}"
