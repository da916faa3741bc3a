#!/usr/bin/env bash
# Builds the .deb in a fresh Debian 12 chroot that has nothing but a minimal system and the Build-Depends of
# debian/control (apt-get build-dep), so a missing Build-Depends fails here even when this machine has the package.
# Needs root and debootstrap; takes a few minutes. Usage: tests/clean_chroot_build.sh [OUTPUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-$PWD/build-clean}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ROOTFS=$(mktemp -d /tmp/polygon-chroot.XXXXXX)
chmod 755 "$ROOTFS"  # it becomes /: the build user must be able to enter it
step() { echo "clean_chroot_build: $*"; }
cleanup() {
    for mount in proc dev/pts dev; do umount -l "$ROOTFS/$mount" 2>/dev/null || true; done
    rm -rf "$ROOTFS"
}
trap cleanup EXIT
[ "$(id -u)" = 0 ] || { echo "clean_chroot_build: needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null

step "debootstrap bookworm (minbase) into $ROOTFS"
debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" > "$ROOTFS.debootstrap.log" 2>&1 \
    || { tail -20 "$ROOTFS.debootstrap.log"; exit 1; }
mount -t proc proc "$ROOTFS/proc"
mount --bind /dev "$ROOTFS/dev"
mount --bind /dev/pts "$ROOTFS/dev/pts"

step "copying the source tree (committed files only)"
mkdir -p "$ROOTFS/build/polygon-streamer"
git archive HEAD | tar -x -C "$ROOTFS/build/polygon-streamer"

step "installing dpkg-dev and exactly the Build-Depends"
chroot "$ROOTFS" /bin/sh -c "apt-get update -qq && apt-get install -y -qq --no-install-recommends dpkg-dev \
    && cd /build/polygon-streamer && apt-get build-dep -y -qq --no-install-recommends ./" > "$ROOTFS.apt.log" 2>&1 \
    || { tail -20 "$ROOTFS.apt.log"; exit 1; }

step "dpkg-buildpackage -us -uc -b (as a user, with the build tests)"
chroot "$ROOTFS" /bin/sh -c "useradd -m builder && chown -R builder /build \
    && cd /build/polygon-streamer && su builder -c 'env -i PATH=/usr/bin:/bin HOME=/home/builder dpkg-buildpackage -us -uc -b'" \
    > "$ROOTFS.build.log" 2>&1 || { tail -40 "$ROOTFS.build.log"; exit 1; }
grep -E "passed|failed" "$ROOTFS.build.log" | tail -1

mkdir -p "$OUT"
cp "$ROOTFS"/build/*.deb "$OUT"/
rm -f "$ROOTFS".*.log
step "OK: $(ls "$OUT"/*.deb)"
