#!/usr/bin/env bash
# Builds the Debian package from this source tree, in one command:
#   sudo ./scripts/build-deb.sh [--out DIR] [--no-build-deps] [--no-lintian]
# 1. installs the build dependencies (debian/control) from Debian's archive
#    with apt-get (as root; --no-build-deps skips it);
# 2. copies the tree (tracked and untracked files, as git sees them; no
#    .venv, no .git) to a temporary directory and runs
#    `dpkg-buildpackage -us -uc -b` there, so the source tree is never
#    written to;
# 3. runs lintian on the result: any error fails the build, warnings are
#    printed;
# 4. leaves mdserver_<version>_<arch>.deb (and the .buildinfo and
#    .changes) in DIR (default dist/) and prints the .deb's path last.
# pip fetches the Python dependencies through this machine's pip
# configuration (index, proxy).
set -euo pipefail

die() { echo "build-deb: $*" >&2; exit 1; }
say() { echo "build-deb: $*" >&2; }

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$SRC/dist
DEPS=1
LINTIAN=1
while [ $# -gt 0 ]; do
    case $1 in
        --out) [ $# -ge 2 ] || die "--out needs a directory"; OUT=$2; shift 2 ;;
        --out=*) OUT=${1#*=}; shift ;;
        --no-build-deps) DEPS=0; shift ;;
        --no-lintian) LINTIAN=0; shift ;;
        -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
mkdir -p -- "$OUT"
OUT=$(cd -- "$OUT" && pwd)

# The package's version is mdserver's.
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$SRC/mdserver/__init__.py")
changelog=$(sed -n '1s/^mdserver (\([^)]*\)).*/\1/p' "$SRC/debian/changelog")
[ -n "$version" ] || die "no __version__ in mdserver/__init__.py"
[ "$version" = "$changelog" ] \
    || die "debian/changelog is at $changelog, mdserver/__init__.py at $version: add a changelog entry (dch -v $version)"

if [ "$DEPS" = 1 ]; then
    [ "$(id -u)" = 0 ] || die "installing the build dependencies needs root (or --no-build-deps)"
    # dpkg-dev, fakeroot: dpkg-buildpackage; lintian: the check after it.
    tools=(dpkg-dev fakeroot lintian)
    missing=()
    for p in "${tools[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    export DEBIAN_FRONTEND=noninteractive
    if [ ${#missing[@]} -gt 0 ] || ! dpkg-checkbuilddeps "$SRC/debian/control" 2>/dev/null; then
        say "installing build dependencies"
        apt-get update -qq || die "apt-get update failed"
        apt-get install -y -qq --no-install-recommends "${tools[@]}" >/dev/null \
            || die "apt-get install ${tools[*]} failed"
        apt-get build-dep -y -qq "$SRC" >/dev/null || die "apt-get build-dep failed"
    fi
fi
command -v dpkg-buildpackage >/dev/null || die "no dpkg-buildpackage (Debian package dpkg-dev)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mdserver-deb.XXXXXX")
trap 'rm -rf -- "$WORK"' EXIT
tree=$WORK/mdserver-$version
mkdir "$tree"
# What git would commit (tracked and untracked, ignored files left out), or
# the whole tree without the usual build litter when it is no git checkout.
if git -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$SRC" && git ls-files -z --cached --others --exclude-standard \
        | xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh \
        | tar --null -T - -cf -) | tar -C "$tree" -xf -
else
    tar -C "$SRC" --exclude=.git --exclude=.venv --exclude=dist --exclude=build \
        --exclude='*.egg-info' --exclude=__pycache__ --exclude=.mypy_cache \
        --exclude=.pytest_cache --exclude=.hypothesis -cf - . | tar -C "$tree" -xf -
fi

say "dpkg-buildpackage -us -uc -b in $tree"
(cd "$tree" && dpkg-buildpackage -us -uc -b) >"$WORK/build.log" 2>&1 || {
    tail -n 60 "$WORK/build.log" >&2
    die "dpkg-buildpackage failed (the last 60 lines of its log above)"
}
debs=("$WORK"/mdserver_"$version"_*.deb)
[ -f "${debs[0]}" ] || die "dpkg-buildpackage made no mdserver_${version}_*.deb"
deb=${debs[0]}
cp -f -- "$deb" "$WORK"/mdserver_"$version"_*.buildinfo "$WORK"/mdserver_"$version"_*.changes "$OUT"/
deb=$OUT/$(basename "$deb")

if [ "$LINTIAN" = 1 ]; then
    command -v lintian >/dev/null || die "no lintian (Debian package lintian; or --no-lintian)"
    say "lintian $(basename "$deb")"
    set +e
    lintian --fail-on error --tag-display-limit 0 "$deb" \
        > "$WORK/lintian.log" 2>&1
    status=$?
    set -e
    cat "$WORK/lintian.log" >&2
    cp -f -- "$WORK/lintian.log" "$OUT/lintian.log"
    [ "$status" = 0 ] || die "lintian found errors (above)"
    say "lintian: $(grep -c '^E: ' "$WORK/lintian.log" || true) errors, $(grep -c '^W: ' "$WORK/lintian.log" || true) warnings"
fi
echo "$deb"
