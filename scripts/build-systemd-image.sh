#!/usr/bin/env bash
# Builds a minimal Debian bookworm systemd guest image (raw ext4) for the
# end-to-end tests:
#   build-systemd-image.sh agent DEB OUT   the vmplug-guest .deb installed offline
#   build-systemd-image.sh agent-rpm RPM OUT   the vmplug-guest .rpm installed
#                                          offline by rpm (the image has rpm)
#   build-systemd-image.sh udev  -   OUT   only the corrected udev rules, no agent
# The debootstrapped base is cached in $VMPLUG_CACHE; each image takes ~10 s.
# Both are built under their own lock into a temporary path and renamed into
# place (scripts/lib.sh), so concurrent test binaries share one build.
set -euo pipefail
LOG_TAG=systemd-image
. "$(dirname "$0")/lib.sh"
kind=$1 deb=$2 out=$3
repo=$(cd "$(dirname "$0")/.." && pwd)
rootfs=$ROOTFS_BOOKWORM

build_image() {
local tmp=$1
work=$(mktemp -d "$CACHE/image.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
cp -a "$rootfs" "$root"
rel=$(ls "$CACHE/kernel/lib/modules")
mkdir -p "$root/lib/modules"
cp -a "$CACHE/kernel/lib/modules/$rel" "$root/lib/modules/"
# The kernel's configuration, where Debian puts it: `verify-image` reports its hot-plug options.
mkdir -p "$root/boot" && cp "$CACHE/kernel/boot/config-$rel" "$root/boot/"
chroot "$root" depmod "$rel"
echo vmplug-guest >"$root/etc/hostname"
chroot "$root" passwd -d root >/dev/null
# A root shell on the serial console for the test harness, and a ready marker.
mkdir -p "$root/etc/systemd/system/serial-getty@ttyS0.service.d"
cat >"$root/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" <<'UNIT'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200 %I dumb
UNIT
cat >"$root/etc/systemd/system/vmplug-e2e-ready.service" <<'UNIT'
[Unit]
Description=Tell the test harness the guest is up
After=multi-user.target vmplug-guest.service serial-getty@ttyS0.service

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'sleep 1; echo "vmplug-e2e: ready" >/dev/ttyS0'

[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/vmplug-e2e-ready.service "$root/etc/systemd/system/multi-user.target.wants/vmplug-e2e-ready.service"
case "$kind" in
  agent)
    cp "$deb" "$root/tmp/vmplug-guest.deb"
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"; chmod +x "$root/usr/sbin/policy-rc.d"
    chroot "$root" dpkg -i /tmp/vmplug-guest.deb >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log" >&2; exit 1; }
    rm -f "$root/tmp/vmplug-guest.deb" "$root/usr/sbin/policy-rc.d"
    test -L "$root/etc/systemd/system/sysinit.target.wants/vmplug-guest.service" \
      || { echo "the package did not enable vmplug-guest.service" >&2; exit 1; }
    ;;
  agent-rpm)
    # As on an RPM system: rpm's own database in the image, the scriptlets run
    # chrooted (systemctl edits the links). Debian's rpm needs --force-debian,
    # and nothing in this rpm database provides the package's dependencies.
    flags=(--root "$root" --dbpath /var/lib/rpm --nodeps)
    rpm --help 2>/dev/null | grep -q -- --force-debian && flags+=(--force-debian)
    rpm "${flags[@]}" -i "$deb" >"$work/rpm.log" 2>&1 || { cat "$work/rpm.log" >&2; exit 1; }
    test -x "$root/usr/bin/rpm" || { echo "the image has no rpm: rebuild $rootfs" >&2; exit 1; }
    test -L "$root/etc/systemd/system/sysinit.target.wants/vmplug-guest.service" \
      || { echo "the package did not enable vmplug-guest.service" >&2; exit 1; }
    ;;
  udev)
    cp "$repo/udev-rules/80-vmplug-memory-online.rules" "$repo/udev-rules/80-vmplug-cpu-online.rules" "$root/etc/udev/rules.d/"
    ;;
  *) echo "usage: $0 agent|agent-rpm|udev PACKAGE OUT" >&2; exit 2 ;;
esac
truncate -s 2G "$tmp"
mkfs.ext4 -q -F -L vmplugroot -d "$root" "$tmp"
}

rootfs_bookworm
artefact "$out" build_image
