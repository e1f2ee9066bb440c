#!/usr/bin/env bash
# Installs mdserver on a libvirt/KVM host: a virtual environment with the
# daemon, the configuration, the systemd units, the libvirt hook, the system
# user and the state directory. Run as root; see --help.
set -euo pipefail
set -E
shopt -s nullglob

PROG=system-integration.sh
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
    cat <<'EOF'
Usage: system-integration.sh [OPTIONS]
       system-integration.sh --uninstall [--purge] [OPTIONS]

Installs mdserver from this source tree (run as root); the files beside the
Python code are those of packaging/files.list, which the Debian package
(debian/) installs as well:
  PREFIX                      virtual environment with mdserver (python3 -m venv,
                              pip install of this tree)
  /etc/mdserver/mdserver.conf configuration, only if absent (else the new default
                              goes beside it as mdserver.conf.dist); 0640 root:mdserver
  /etc/mdserver/userdata/     user-data templates, with example.yaml
  UNITDIR/mdserver.service, UNITDIR/mdserver-dnsmasq.service,
  UNITDIR/mdserver-enroll.service
                              systemd units, @BINDIR@ replaced by BINDIR
                              (mdserver-enroll needs libvirt's Python binding)
  /etc/libvirt/hooks/qemu.d/mdserver
                              the libvirt hook (0755)
  user and group mdserver     system user, no login shell, home /var/lib/mdserver
  /var/lib/mdserver           state directory, 0711 mdserver:mdserver
  /etc/mdserver/.install-manifest
                              what was installed, for --uninstall
Then runs `systemctl daemon-reload` when systemd runs. Running it again changes
nothing unless the source changed. Enable and start with
`systemctl enable --now mdserver.service`; libvirtd sees the hook after a
reload (SIGHUP) or restart.

Options:
  --prefix DIR      virtual environment (default /opt/mdserver)
  --bindir DIR      where the units find `mdserver` (default PREFIX/bin)
  --unitdir DIR     systemd unit directory (default /etc/systemd/system)
  --destdir DIR     stage everything under DIR (packagers; also env DESTDIR):
                    no user is created, nothing is chowned, systemctl is not
                    run; what would have been done is listed in the manifest
                    as "pending" lines
  --wheelhouse DIR  install from wheels in DIR only (pip --no-index
                    --find-links DIR); it must hold mdserver's dependencies
                    and setuptools. PIP_* variables are passed to pip as well.
  --python PY       interpreter for the virtual environment (default
                    /usr/bin/python3, else python3; or env PYTHON)
  --no-venv         do not create the virtual environment (mdserver is
                    installed some other way; also env MDSERVER_SKIP_VENV=1)
  --uninstall       remove exactly what the manifest lists, but keep
                    /etc/mdserver/mdserver.conf, /var/lib/mdserver, the user
                    and a manifest of just those (honours --destdir; the
                    prefix is read from the manifest)
  --purge           with --uninstall (implies it): remove those too
  -h, --help        this text

Substitution: the unit files in systemd/ contain @BINDIR@, replaced with the
absolute BINDIR (no spaces or shell/sed special characters allowed).
EOF
}

die() { echo "$PROG: $*" >&2; exit 1; }
on_error() {
    local status=$1 line=$2 cmd=$3
    trap - ERR
    echo "$PROG: failed (exit status $status) at line $line: $cmd" >&2
    exit "$status"
}
trap 'on_error $? $LINENO "$BASH_COMMAND"' ERR

say() { echo "$PROG: $*"; }

# ---------------------------------------------------------------- options
PREFIX=/opt/mdserver
BINDIR=
UNITDIR=/etc/systemd/system
DESTDIR=${DESTDIR:-}
WHEELHOUSE=
# The system's interpreter by default: a service must not depend on a
# personal one (pyenv, conda), which ProtectHome= would hide anyway.
if [ -x /usr/bin/python3 ]; then PYTHON=${PYTHON:-/usr/bin/python3}; else PYTHON=${PYTHON:-python3}; fi
SKIP_VENV=${MDSERVER_SKIP_VENV:-0}
UNINSTALL=0
PURGE=0

need_arg() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"; }
while [ $# -gt 0 ]; do
    case $1 in
        --prefix) need_arg "$@"; PREFIX=$2; shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --bindir) need_arg "$@"; BINDIR=$2; shift 2 ;;
        --bindir=*) BINDIR=${1#*=}; shift ;;
        --unitdir) need_arg "$@"; UNITDIR=$2; shift 2 ;;
        --unitdir=*) UNITDIR=${1#*=}; shift ;;
        --destdir) need_arg "$@"; DESTDIR=$2; shift 2 ;;
        --destdir=*) DESTDIR=${1#*=}; shift ;;
        --wheelhouse) need_arg "$@"; WHEELHOUSE=$2; shift 2 ;;
        --wheelhouse=*) WHEELHOUSE=${1#*=}; shift ;;
        --python) need_arg "$@"; PYTHON=$2; shift 2 ;;
        --python=*) PYTHON=${1#*=}; shift ;;
        --no-venv) SKIP_VENV=1; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        --purge) UNINSTALL=1; PURGE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
case $SKIP_VENV in 0|"") SKIP_VENV=0 ;; *) SKIP_VENV=1 ;; esac

# Paths go into unit files, sed expressions and the manifest: keep them plain.
check_path() {
    case $2 in
        /*) ;;
        *) die "$1 must be an absolute path: $2" ;;
    esac
    [[ $2 =~ ^[A-Za-z0-9_./+@-]+$ ]] || die "$1 has characters this script does not allow: $2"
    [[ $2 != *//* && $2 != */./* && $2 != */../* && $2 != */. && $2 != */.. ]] \
        || die "$1 must be a plain path: $2"
}
PREFIX=${PREFIX%/}; UNITDIR=${UNITDIR%/}
check_path --prefix "$PREFIX"
[ "$PREFIX" != "" ] && [ "$PREFIX" != / ] || die "--prefix must not be /"
BINDIR=${BINDIR:-$PREFIX/bin}
BINDIR=${BINDIR%/}
check_path --bindir "$BINDIR"
check_path --unitdir "$UNITDIR"
if [ -n "$DESTDIR" ]; then
    mkdir -p -- "$DESTDIR"
    DESTDIR=$(cd -- "$DESTDIR" && pwd -P)
    [ "$DESTDIR" != / ] || DESTDIR=
    [ -z "$DESTDIR" ] || check_path --destdir "$DESTDIR"
fi
if [ -n "$WHEELHOUSE" ]; then
    [ -d "$WHEELHOUSE" ] || die "--wheelhouse: no such directory: $WHEELHOUSE"
    WHEELHOUSE=$(cd -- "$WHEELHOUSE" && pwd)
fi

USER_NAME=mdserver
STATE_DIR=/var/lib/mdserver
CONF_DIR=/etc/mdserver
HOOK_DIR=/etc/libvirt/hooks/qemu.d
# Root's own directory, never the daemon's (a manifest mdserver could
# write would let it choose what root deletes).
MANIFEST=$CONF_DIR/.install-manifest
REAL=1                 # acting on the live system (no DESTDIR)
[ -z "$DESTDIR" ] || REAL=0

if [ $REAL = 1 ] && [ "$(id -u)" != 0 ]; then
    die "run it as root (or stage with --destdir DIR)"
fi

systemd_running() { [ $REAL = 1 ] && [ -d /run/systemd/system ]; }

# ---------------------------------------------------------------- manifest
# One entry per line: "file PATH", "dir PATH" (created here), "conf PATH"
# (the configuration, kept by --uninstall), "venv PATH", "user NAME",
# "group NAME", "source HASH", "pending COMMAND" (DESTDIR: left to do).
declare -a ENTRIES=()
declare -A OLD=() SEEN=()
CHANGES=0

read_manifest() {
    local line
    [ -f "$DESTDIR$MANIFEST" ] || return 0
    while IFS= read -r line; do
        case $line in ''|'#'*) continue ;; esac
        OLD[$line]=1
    done < "$DESTDIR$MANIFEST"
}
record() {
    local e="$*"
    [ -z "${SEEN[$e]:-}" ] || return 0
    SEEN[$e]=1
    ENTRIES+=("$e")
}
had() { [ -n "${OLD[$*]:-}" ]; }
changed() { CHANGES=$((CHANGES + 1)); say "$*"; }

write_manifest() {
    {
        echo "# mdserver install manifest, written by system-integration.sh."
        echo "# system-integration.sh --uninstall removes what it lists."
        printf '%s\n' "${ENTRIES[@]}"
    } > "$TMP/manifest"
    if ! cmp -s "$TMP/manifest" "$DESTDIR$MANIFEST"; then
        put_file "$TMP/manifest" "$MANIFEST" 0644
    fi
}

# ---------------------------------------------------------------- helpers
owner_of() { stat -c %U:%G "$1"; }
mode_of() { stat -c %a "$1"; }

# ensure_owner PATH OWNER:GROUP — chown on the live system, else "pending".
ensure_owner() {
    local path=$1 owner=$2
    if [ $REAL = 1 ]; then
        if [ "$(owner_of "$path")" != "$owner" ]; then
            chown "$owner" "$path"
            changed "chown $owner $path"
        fi
    else
        record "pending chown $owner $path"
    fi
}

ensure_mode() {
    local path=$1 mode=$2
    if [ "$(mode_of "$DESTDIR$path")" != "${mode#0}" ]; then
        chmod "$mode" "$DESTDIR$path"
        changed "chmod $mode $path"
    fi
}

# ensure_dir PATH MODE [OWNER:GROUP] — creates it (recorded as ours) if absent;
# parents likewise (0755). A directory that was there before is left alone.
ensure_dir() {
    local path=$1 mode=$2 owner=${3:-}
    [ "$path" != / ] || return 0
    ensure_dir "$(dirname "$path")" 0755
    if [ ! -d "$DESTDIR$path" ]; then
        mkdir -m "$mode" "$DESTDIR$path"
        changed "created $path"
        record "dir $path"
    elif had "dir $path"; then
        record "dir $path"
    else
        return 0        # not ours: leave its mode and owner alone
    fi
    ensure_mode "$path" "$mode"
    [ -z "$owner" ] || ensure_owner "$path" "$owner"
}

# put_file SRC DEST MODE [OWNER:GROUP] — atomically, only if it differs.
put_file() {
    local src=$1 dest=$2 mode=$3 owner=${4:-} real
    real="$DESTDIR$dest"
    if ! cmp -s "$src" "$real"; then
        cp -- "$src" "$real.tmp-$$"
        chmod "$mode" "$real.tmp-$$"
        mv -f -- "$real.tmp-$$" "$real"
        changed "installed $dest"
    fi
    ensure_mode "$dest" "$mode"
    [ -z "$owner" ] || ensure_owner "$dest" "$owner"
}

TMP=$(mktemp -d)
cleanup() { rm -rf -- "$TMP"; }
trap cleanup EXIT

# ---------------------------------------------------------------- venv
# What pip would build from: unchanged means the venv is up to date.
SOURCES=(pyproject.toml setup.py setup.cfg MANIFEST.in README.md mdserver)
source_hash() {
    local -a present=() f
    for f in "${SOURCES[@]}"; do [ ! -e "$SRC/$f" ] || present+=("$f"); done
    (cd "$SRC" && find "${present[@]}" -name __pycache__ -prune -o -type f -print \
        | LC_ALL=C sort | xargs -d '\n' sha256sum | sha256sum | cut -d' ' -f1)
}

install_venv() {
    local venv="$DESTDIR$PREFIX" hash py
    hash=$(source_hash)
    py="$venv/bin/python"
    if [ -d "$venv" ] && [ ! -e "$venv/pyvenv.cfg" ] && [ -n "$(ls -A "$venv")" ]; then
        die "$PREFIX exists and is not mdserver's virtual environment; choose another --prefix"
    fi
    if [ -x "$py" ] && "$py" -c 'import mdserver' 2>/dev/null \
        && [ -x "$venv/bin/mdserver" ] && had "source $hash"; then
        record "venv $PREFIX"
        record "source $hash"
        return 0
    fi
    command -v "$PYTHON" >/dev/null || die "no $PYTHON: install Python 3.9 or newer"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 9))' \
        || die "$PYTHON is older than Python 3.9"
    case $("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.base_prefix))') in
        /home/*|/root/*|/root|/run/user/*)
            say "warning: $PYTHON lives in a home directory, hidden from the service (ProtectHome=yes); use --python /usr/bin/python3" ;;
    esac
    if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
        die "$PYTHON cannot create virtual environments: install the package python3-venv (Debian/Ubuntu: apt-get install python3-venv)"
    fi
    if [ ! -x "$py" ] || ! "$py" -c 'import sys' 2>/dev/null; then
        # None, or broken (say the system Python changed): make it anew.
        rm -rf -- "${venv:?}"/bin "${venv:?}"/lib "${venv:?}"/lib64 "${venv:?}"/include "${venv:?}"/pyvenv.cfg
        "$PYTHON" -m venv "$venv" || die "$PYTHON -m venv $venv failed"
        changed "created virtual environment $PREFIX"
    fi
    # Build from a copy: the source tree may be read-only or shared.
    mkdir "$TMP/src"
    local f
    for f in "${SOURCES[@]}" LICENSE*; do
        [ ! -e "$SRC/$f" ] || cp -r -- "$SRC/$f" "$TMP/src/"
    done
    find "$TMP/src" -name __pycache__ -prune -exec rm -rf {} +
    local pip=("$py" -m pip install --disable-pip-version-check --no-warn-script-location)
    [ -z "$WHEELHOUSE" ] || pip+=(--no-index --find-links "$WHEELHOUSE")
    # Staged: byte-code would name DESTDIR; the target compiles its own.
    [ -z "$DESTDIR" ] || pip+=(--no-compile)
    [ -t 1 ] || pip+=(--quiet)
    "${pip[@]}" "$TMP/src" || die "pip install of mdserver into $PREFIX failed"
    # mdserver-enroll (installed with it) needs libvirt's Python binding.
    "$py" -c 'import libvirt' 2>/dev/null || say "note: mdserver-enroll needs libvirt's Python binding: $py -m pip install libvirt-python (needs libvirt-dev and pkg-config to build)"
    if [ -n "$DESTDIR" ]; then relocate_venv "$venv" "$PREFIX"; fi
    changed "installed mdserver into $PREFIX"
    record "venv $PREFIX"
    record "source $hash"
}

# A venv made under DESTDIR names DESTDIR in its scripts: point them at PREFIX.
relocate_venv() {
    local from=$1 to=$2 f
    for f in "$DESTDIR$PREFIX"/bin/* "$DESTDIR$PREFIX"/pyvenv.cfg; do
        [ -f "$f" ] && [ ! -L "$f" ] || continue
        if grep -qF -- "$from" "$f"; then
            sed -i "s|$from|$to|g" "$f"
        fi
    done
}

# ---------------------------------------------------------------- user
ensure_user() {
    local shell=/usr/sbin/nologin
    [ -x "$shell" ] || shell=/sbin/nologin
    [ -x "$shell" ] || shell=/bin/false
    if [ $REAL = 0 ]; then
        record "pending useradd --system --user-group --home-dir $STATE_DIR --no-create-home --shell $shell $USER_NAME"
        return 0
    fi
    if ! getent group "$USER_NAME" >/dev/null; then
        groupadd --system "$USER_NAME"
        changed "created group $USER_NAME"
        record "group $USER_NAME"
    elif had "group $USER_NAME"; then
        record "group $USER_NAME"
    fi
    if ! getent passwd "$USER_NAME" >/dev/null; then
        useradd --system --gid "$USER_NAME" --home-dir "$STATE_DIR" --no-create-home \
            --shell "$shell" --comment "mdserver metadata service" "$USER_NAME"
        changed "created user $USER_NAME"
        record "user $USER_NAME"
    elif had "user $USER_NAME"; then
        record "user $USER_NAME"
    fi
}

# ---------------------------------------------------------------- install
readable_by_daemon() {
    local perms group
    perms=$(stat -c %A "$1"); group=$(stat -c %G "$1")
    [ "${perms:7:1}" = r ] || { [ "$group" = "$USER_NAME" ] && [ "${perms:4:1}" = r ]; }
}

# packaging/files.list: what to install beside the Python code, shared with
# the Debian package. Lines "kind source target mode owner"; see the file.
FILES_LIST=packaging/files.list
declare -a LIST=()
declare -A LISTED_DIRS=()
read_files_list() {
    local kind src dest mode owner extra n=0
    [ -f "$SRC/$FILES_LIST" ] || die "missing $FILES_LIST in the source tree $SRC"
    while read -r kind src dest mode owner extra; do
        n=$((n + 1))
        case $kind in ''|'#'*) continue ;; esac
        case $kind in
            conf|dir|file|hook|unit|state) ;;
            *) die "$FILES_LIST:$n: unknown kind: $kind" ;;
        esac
        [ -n "$owner" ] && [ -z "$extra" ] && [[ $mode =~ ^0[0-7]{3}$ ]] \
            || die "$FILES_LIST:$n: want: kind source target mode owner"
        [ "$src" = - ] || [ -f "$SRC/$src" ] || die "missing $src in the source tree $SRC"
        case $kind in
            unit) [[ $dest != */* ]] || die "$FILES_LIST:$n: a unit's target is a file name" ;;
            *) check_path "$FILES_LIST:$n" "$dest" ;;
        esac
        LIST+=("$kind $src $dest $mode $owner")
        [ "$kind" != dir ] || LISTED_DIRS[$dest]=1
    done < "$SRC/$FILES_LIST"
}

# The configuration: readable by the daemon's group only (password hash,
# template data); an existing one is the administrator's and stays.
install_conf() {
    local src=$1 conf=$2 mode=$3 owner=$4
    if [ ! -e "$DESTDIR$conf" ]; then
        put_file "$SRC/$src" "$conf" "$mode" "$owner"
    elif [ $REAL = 0 ]; then
        [ -z "$owner" ] || record "pending chown $owner $conf"
    elif ! readable_by_daemon "$conf"; then
        say "warning: user $USER_NAME cannot read $conf: chgrp $USER_NAME $conf; chmod g+r $conf"
    fi
    # Kept by --uninstall, removed by --purge (even if it was there before).
    record "conf $conf"
    if ! cmp -s "$SRC/$src" "$DESTDIR$conf" || had "file $conf.dist"; then
        # The administrator's file stays; the new default goes beside it.
        put_file "$SRC/$src" "$conf.dist" "$mode" "$owner"
        record "file $conf.dist"
    fi
}

do_install() {
    local entry kind src dest mode owner
    read_files_list
    read_manifest
    [ $REAL = 0 ] || command -v dnsmasq >/dev/null || [ -x /usr/sbin/dnsmasq ] \
        || say "warning: /usr/sbin/dnsmasq not found: install dnsmasq-base (Debian/Ubuntu) or dnsmasq (Fedora)"

    ensure_user
    ensure_dir "$CONF_DIR" 0755
    if [ "$SKIP_VENV" = 1 ]; then
        say "not creating the virtual environment (--no-venv): the units run $BINDIR/mdserver"
    else
        ensure_dir "$PREFIX" 0755
        install_venv
    fi

    for entry in "${LIST[@]}"; do
        read -r kind src dest mode owner <<<"$entry"
        [ "$owner" != root:root ] || owner=
        case $kind in
            conf)
                install_conf "$src" "$dest" "$mode" "$owner" ;;
            dir)
                ensure_dir "$dest" "$mode" "$owner" ;;
            file|hook)
                # Its directory: a listed one is made with its own mode above;
                # any other is made here (0755), or recorded as ours again.
                [ -n "${LISTED_DIRS[$(dirname "$dest")]:-}" ] || ensure_dir "$(dirname "$dest")" 0755
                put_file "$SRC/$src" "$dest" "$mode" "$owner"
                record "file $dest" ;;
            unit)
                # @BINDIR@ substituted.
                ensure_dir "$UNITDIR" 0755
                sed "s|@BINDIR@|$BINDIR|g" "$SRC/$src" > "$TMP/$dest"
                ! grep -q '@[A-Z]*@' "$TMP/$dest" || die "$src: unknown @...@ placeholder"
                put_file "$TMP/$dest" "$UNITDIR/$dest" "$mode" "$owner"
                record "file $UNITDIR/$dest" ;;
            state)
                # systemd's StateDirectory= would create it too. 0711: QEMU
                # (libvirt-qemu) must traverse it to open a seed image under
                # seeds/; nobody else may list it, and every file in it has
                # its own mode.
                ensure_dir "$dest" "$mode" "$owner"
                if ! had "dir $dest" && [ -z "${SEEN[dir $dest]:-}" ]; then
                    # There before (systemd's StateDirectory=, an earlier
                    # install): mdserver's all the same.
                    record "dir $dest"
                    ensure_mode "$dest" "$mode"
                    [ -z "$owner" ] || ensure_owner "$dest" "$owner"
                fi ;;
        esac
    done

    write_manifest

    if systemd_running; then
        systemctl daemon-reload
    fi
    if [ $CHANGES = 0 ]; then
        say "everything already installed; nothing changed"
    fi
    if [ $REAL = 1 ]; then
        cat <<EOF
$PROG: done. Next:
  - edit $CONF_DIR/mdserver.conf (mdserverctl check-config $CONF_DIR/mdserver.conf checks it)
  - systemctl enable --now mdserver.service   (starts mdserver-dnsmasq.service too;
    after an upgrade: systemctl restart mdserver.service)
  - systemctl enable --now mdserver-enroll.service   (gives every domain on the
    network its route and registers it; needs libvirt's Python binding)
  - make libvirt see the hook: systemctl reload libvirtd (or virtqemud), or
    kill -HUP \$(pidof libvirtd); libvirt only looks for new hooks then
EOF
    else
        say "staged under $DESTDIR; still to do on the target system (see \"pending\" in $MANIFEST):"
        local e
        for e in "${ENTRIES[@]}"; do
            case $e in pending\ *) echo "  ${e#pending }" ;; esac
        done
    fi
}

# ---------------------------------------------------------------- uninstall
# remove_tree PATH: rm -rf, only for the venv and the state directory.
remove_tree() {
    local path=$1
    check_path "manifest entry" "$path"
    case $path in
        "$STATE_DIR") ;;
        /|/usr|/usr/local|/opt|/etc|/var|/var/lib|/home|/root)
            die "refusing to remove $path" ;;
        *) [ -e "$DESTDIR$path/pyvenv.cfg" ] || [ ! -e "$DESTDIR$path" ] \
               || die "refusing to remove $path: not a virtual environment" ;;
    esac
    if [ -e "$DESTDIR$path" ]; then
        rm -rf -- "${DESTDIR}${path:?}"
        say "removed $path"
    fi
}

do_uninstall() {
    [ -f "$DESTDIR$MANIFEST" ] \
        || die "nothing to uninstall: no manifest $DESTDIR$MANIFEST"
    local -a lines=() files=() dirs=() users=() groups=() confs=()
    local venv="" line kind path
    while IFS= read -r line; do
        case $line in ''|'#'*) continue ;; esac
        lines+=("$line")
        kind=${line%% *}; path=${line#* }
        case $kind in
            file) check_path "manifest entry" "$path"; files+=("$path") ;;
            conf) check_path "manifest entry" "$path"; confs+=("$path") ;;
            dir) check_path "manifest entry" "$path"; dirs+=("$path") ;;
            venv) check_path "manifest entry" "$path"; venv=$path ;;
            user) users+=("$path") ;;
            group) groups+=("$path") ;;
            source|pending) ;;
            *) die "unknown manifest entry: $line" ;;
        esac
    done < "$DESTDIR$MANIFEST"

    if systemd_running; then
        systemctl disable --now mdserver-enroll.service mdserver.service mdserver-dnsmasq.service 2>/dev/null || true
    fi
    for path in "${files[@]}"; do
        if [ -e "$DESTDIR$path" ] || [ -L "$DESTDIR$path" ]; then
            rm -f -- "$DESTDIR$path"
            say "removed $path"
        fi
    done
    [ -z "$venv" ] || remove_tree "$venv"
    for path in "${confs[@]}"; do
        if [ $PURGE = 1 ]; then
            if [ -e "$DESTDIR$path" ]; then rm -f -- "$DESTDIR$path"; say "removed $path"; fi
        elif [ -e "$DESTDIR$path" ]; then
            say "kept $path (--purge removes it)"
        fi
    done
    if [ $PURGE = 1 ]; then
        remove_tree "$STATE_DIR"
        rm -f -- "$DESTDIR$MANIFEST"
    elif [ -d "$DESTDIR$STATE_DIR" ]; then
        say "kept $STATE_DIR (--purge removes it)"
    fi
    # Directories created at install time, deepest first, if now empty.
    local i
    for ((i = ${#dirs[@]} - 1; i >= 0; i--)); do
        path=${dirs[i]}
        [ -d "$DESTDIR$path" ] || continue
        if [ $PURGE = 0 ] && { [ "$path" = "$STATE_DIR" ] || [ "$path" = "$CONF_DIR" ]; }; then
            continue
        fi
        if rmdir -- "$DESTDIR$path" 2>/dev/null; then say "removed $path/"; fi
    done
    if [ $REAL = 1 ] && [ $PURGE = 1 ]; then
        for path in "${users[@]}"; do
            if getent passwd "$path" >/dev/null; then userdel "$path"; say "removed user $path"; fi
        done
        for path in "${groups[@]}"; do
            if getent group "$path" >/dev/null; then groupdel "$path"; say "removed group $path"; fi
        done
    elif [ ${#users[@]} -gt 0 ]; then
        say "kept user ${users[*]} (--purge removes it)"
    fi
    if [ $PURGE = 0 ]; then
        # What was kept stays ours: a later --purge or install knows it.
        ENTRIES=()
        for line in "${lines[@]}"; do
            kind=${line%% *}; path=${line##* }
            case $line in
                "conf "*|"dir "*|"pending chown "*)
                    if [ -e "$DESTDIR$path" ]; then record "$line"; fi ;;
                "user "*|"group "*|"pending useradd "*) record "$line" ;;
            esac
        done
        local tmp="$DESTDIR$MANIFEST.tmp"
        {
            echo "# mdserver install manifest: what --uninstall kept (--purge removes it)."
            printf '%s\n' "${ENTRIES[@]}"
        } > "$tmp"
        mv -f -- "$tmp" "$DESTDIR$MANIFEST"
    fi
    if systemd_running; then
        systemctl daemon-reload
    fi
    [ $REAL = 0 ] || say "done; reload libvirtd (systemctl reload libvirtd) so that it forgets the hook"
}

if [ $UNINSTALL = 1 ]; then
    do_uninstall
else
    do_install
fi
