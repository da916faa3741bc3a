#!/usr/bin/env bash
# Builds the .deb in a clean Debian 12 chroot that has nothing but a minimal system (debootstrap minbase, dpkg-dev)
# and the Build-Depends of debian/control (apt-get build-dep), so a missing Build-Depends fails here even when this
# machine has the package. The chroot uses this machine's configured apt sources (and their keyrings); the minimal
# system is cached as a tarball between runs (POLYGON_CHROOT_CACHE, default /var/cache/polygon-streamer-build; it is
# rebuilt after 7 days or when missing). The build runs as a user, with the build-time tests, through pybuild.
# Needs root and debootstrap. Usage: tests/clean_chroot_build.sh [OUTPUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-$PWD/build-clean}
CACHE=${POLYGON_CHROOT_CACHE:-/var/cache/polygon-streamer-build}
BASE="$CACHE/bookworm-minbase.tar"
ROOTFS=$(mktemp -d /tmp/polygon-chroot.XXXXXX)
LOGS=$(mktemp -d /tmp/polygon-chroot-logs.XXXXXX)
chmod 755 "$ROOTFS"  # it becomes /: the build user must be able to enter it
step() { echo "clean_chroot_build: $*"; }
die() { echo "clean_chroot_build: FAIL: $*" >&2; exit 1; }
unmount() { for mount in proc dev/pts dev; do umount -l "$1/$mount" 2>/dev/null || true; done; }
cleanup() {
    unmount "$ROOTFS"
    rm -rf "$ROOTFS" "$LOGS"
}
trap cleanup EXIT
[ "$(id -u)" = 0 ] || die "needs root"
command -v debootstrap > /dev/null || apt-get install -y -qq debootstrap > /dev/null

# The Debian mirror of this machine's apt sources (deb822 .sources or one-line .list), for debootstrap.
host_mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
    local found=""
    for file in /etc/apt/sources.list.d/*.sources; do
        [ -f "$file" ] || continue
        found=$(awk 'BEGIN { RS = ""; FS = "\n" }
            /(^|\n)Types:[^\n]*deb([ \n]|$)/ && /(^|\n)Suites:[^\n]*bookworm([ \n]|$)/ && !/(^|\n)Enabled: *no/ {
                for (i = 1; i <= NF; i++) if ($i ~ /^URIs:/) { split($i, parts, " "); print parts[2]; exit } }' "$file")
        [ -n "$found" ] && { echo "$found"; return; }
    done
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$file" ] || continue
        found=$(awk '$1 == "deb" { uri = ($2 ~ /^\[/) ? $3 : $2; suite = ($2 ~ /^\[/) ? $4 : $3;
                                   if (suite == "bookworm") { print uri; exit } }' "$file")
        [ -n "$found" ] && { echo "$found"; return; }
    done
    echo http://deb.debian.org/debian
}

# The chroot gets the same sources and keyrings as this machine.
copy_apt_sources() {
    local root=$1
    rm -f "$root"/etc/apt/sources.list "$root"/etc/apt/sources.list.d/*
    [ -f /etc/apt/sources.list ] && cp /etc/apt/sources.list "$root/etc/apt/sources.list"
    for file in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$file" ] && cp "$file" "$root/etc/apt/sources.list.d/"
    done
    mkdir -p "$root/usr/share/keyrings" "$root/etc/apt/trusted.gpg.d"
    cp -n /usr/share/keyrings/*.gpg "$root/usr/share/keyrings/" 2>/dev/null || true
    cp -n /etc/apt/trusted.gpg.d/* "$root/etc/apt/trusted.gpg.d/" 2>/dev/null || true
}

if [ -f "$BASE" ] && [ -n "$(find "$BASE" -mtime -7)" ]; then
    step "using the cached minimal system $BASE"
else
    MIRROR=$(host_mirror)
    step "debootstrap bookworm (minbase) from $MIRROR, cached as $BASE"
    NEW=$(mktemp -d /tmp/polygon-chroot-base.XXXXXX)
    chmod 755 "$NEW"
    debootstrap --variant=minbase bookworm "$NEW" "$MIRROR" > "$LOGS/debootstrap.log" 2>&1 \
        || { tail -20 "$LOGS/debootstrap.log"; rm -rf "$NEW"; die "debootstrap"; }
    copy_apt_sources "$NEW"
    mount -t proc proc "$NEW/proc"
    chroot "$NEW" /bin/sh -c "apt-get update -qq && apt-get install -y -qq --no-install-recommends dpkg-dev \
        && apt-get clean" > "$LOGS/base.log" 2>&1 || { umount -l "$NEW/proc"; tail -20 "$LOGS/base.log"; rm -rf "$NEW"; die "dpkg-dev"; }
    umount -l "$NEW/proc"
    mkdir -p "$CACHE"
    tar -C "$NEW" -cf "$BASE.tmp" . && mv "$BASE.tmp" "$BASE"
    rm -rf "$NEW"
fi
tar -C "$ROOTFS" -xf "$BASE"
chmod 755 "$ROOTFS"  # the archive's "." came from a mktemp directory
copy_apt_sources "$ROOTFS"
mount -t proc proc "$ROOTFS/proc"
mount --bind /dev "$ROOTFS/dev"
mount --bind /dev/pts "$ROOTFS/dev/pts"

step "copying the source tree (committed files only)"
mkdir -p "$ROOTFS/build/polygon-streamer"
git archive HEAD | tar -x -C "$ROOTFS/build/polygon-streamer"

step "installing exactly the Build-Depends"
# No daemon starts in the chroot (redis-server is a test Build-Depends): policy-rc.d says no to every start.
printf '#!/bin/sh\nexit 101\n' > "$ROOTFS/usr/sbin/policy-rc.d"
chmod 755 "$ROOTFS/usr/sbin/policy-rc.d"
chroot "$ROOTFS" /bin/sh -c "apt-get update -qq && cd /build/polygon-streamer \
    && apt-get build-dep -y -qq --no-install-recommends ./" > "$LOGS/apt.log" 2>&1 \
    || { tail -20 "$LOGS/apt.log"; die "apt-get build-dep"; }

step "dpkg-buildpackage -us -uc -b (as a user, with the build-time tests)"
chroot "$ROOTFS" /bin/sh -c "useradd -m builder && chown -R builder /build \
    && cd /build/polygon-streamer && su builder -c 'env -i PATH=/usr/bin:/bin HOME=/home/builder dpkg-buildpackage -us -uc -b'" \
    > "$LOGS/build.log" 2>&1 || { tail -60 "$LOGS/build.log"; die "dpkg-buildpackage"; }
grep -E "[0-9]+ passed" "$LOGS/build.log" | tail -3 || die "the build ran no tests"
grep -E "[0-9]+ passed" "$LOGS/build.log" > /dev/null || die "the build ran no tests"

mkdir -p "$OUT"
cp "$ROOTFS"/build/*.deb "$OUT"/
cp "$LOGS/build.log" "$OUT/build.log"
step "OK: $(ls "$OUT"/*.deb)"
