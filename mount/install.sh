#!/bin/sh
# Install or remove zblock's system integration: the mount(8)/umount(8) helpers, the systemd
# units and an example instance config. `make install` / `make uninstall` call this.
#
#   mount/install.sh install   [helpers] [units] [conf]     (default: all three)
#   mount/install.sh uninstall [helpers] [units] [conf]
#
# Environment:
#   ZBLOCK    absolute path of the zblock command written into helpers and units
#             (default: the repository's .venv/bin/zblock)
#   DESTDIR   staging root (packaging); nothing outside it is touched, no daemon-reload
#   SBINDIR   /sbin          mount(8) looks for /sbin/mount.<type> (Debian 12: /sbin -> usr/sbin)
#   UNITDIR   /etc/systemd/system
#   CONFDIR   /etc/zblock    instance configs <instance>.conf; only the .example is installed
#
# Uninstall removes only files this script installs (helpers are checked to be zblock's) and
# never an instance's <instance>.conf.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
ZBLOCK=${ZBLOCK:-$repo/.venv/bin/zblock}
DESTDIR=${DESTDIR:-}
SBINDIR=${SBINDIR:-/sbin}
UNITDIR=${UNITDIR:-/etc/systemd/system}
CONFDIR=${CONFDIR:-/etc/zblock}

action=${1:-}
[ $# -gt 0 ] && shift
parts=${*:-helpers units conf}

subst() {   # subst SRC DEST MODE
    sed -e "s|@ZBLOCK@|$ZBLOCK|g" -e "s|@CONFDIR@|$CONFDIR|g" -e "s|@DOCDIR@|$repo|g" "$1" > "$2.tmp.$$"
    chmod "$3" "$2.tmp.$$"
    mv -f "$2.tmp.$$" "$2"
    echo "installed $2"
}

reload() {
    if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
        systemctl daemon-reload || true
    fi
}

case "$action" in
install)
    case "$ZBLOCK" in /*) ;; *) echo "install.sh: ZBLOCK must be an absolute path" >&2; exit 2 ;; esac
    [ -x "$ZBLOCK" ] || echo "install.sh: warning: $ZBLOCK is not executable (yet)" >&2
    for part in $parts; do
        case "$part" in
        helpers)
            mkdir -p "$DESTDIR$SBINDIR"
            subst "$here/mount.fuse.zblock" "$DESTDIR$SBINDIR/mount.fuse.zblock" 755
            subst "$here/umount.fuse.zblock" "$DESTDIR$SBINDIR/umount.fuse.zblock" 755 ;;
        units)
            mkdir -p "$DESTDIR$UNITDIR"
            subst "$repo/systemd/zblock@.service" "$DESTDIR$UNITDIR/zblock@.service" 644
            subst "$repo/systemd/zblock-swap@.service" "$DESTDIR$UNITDIR/zblock-swap@.service" 644
            reload ;;
        conf)
            mkdir -p "$DESTDIR$CONFDIR"
            subst "$repo/systemd/zblock.conf.example" "$DESTDIR$CONFDIR/zblock.conf.example" 644 ;;
        *) echo "install.sh: unknown part $part (helpers, units, conf)" >&2; exit 2 ;;
        esac
    done ;;
uninstall)
    for part in $parts; do
        case "$part" in
        helpers)
            for f in mount.fuse.zblock umount.fuse.zblock; do
                p="$DESTDIR$SBINDIR/$f"
                if [ -e "$p" ] && grep -q "zblock" "$p"; then rm -f "$p"; echo "removed $p"; fi
            done ;;
        units)
            for f in zblock@.service zblock-swap@.service; do
                p="$DESTDIR$UNITDIR/$f"
                if [ -e "$p" ]; then rm -f "$p"; echo "removed $p"; fi
            done
            reload ;;
        conf)
            p="$DESTDIR$CONFDIR/zblock.conf.example"
            if [ -e "$p" ]; then rm -f "$p"; echo "removed $p"; fi
            rmdir "$DESTDIR$CONFDIR" 2>/dev/null || true ;;
        *) echo "install.sh: unknown part $part (helpers, units, conf)" >&2; exit 2 ;;
        esac
    done ;;
*)
    echo "usage: $0 install|uninstall [helpers] [units] [conf]" >&2
    exit 2 ;;
esac
