#!/usr/bin/env bash
# Builds a disk image that boots by itself, as an image builder ships one:
#   build-bootable-image.sh ROOTFS KERNEL INITRD OUT.qcow2
# An MBR disk (syslinux's boot code) with a FAT boot partition holding
# syslinux, KERNEL and INITRD (loaded with `vmplug.root=/dev/vda2`, the test
# initramfs's hand-over to a root disk), and ROOTFS (a raw ext4 image, such as
# build-systemd-image.sh makes) as the second partition; converted to qcow2.
# No loop device or mount is needed: mtools and syslinux work on the FAT image
# file. Built under its own lock into a temporary path (scripts/lib.sh).
set -euo pipefail
LOG_TAG=bootable-image
. "$(dirname "$0")/lib.sh"
rootfs=$1 kernel=$2 initrd=$3 out=$4

build_disk() {
  local tmp=$1 boot_mib=64
  work=$(mktemp -d "$CACHE/bootable.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  local root_bytes root_mib
  root_bytes=$(stat -c %s "$rootfs")
  root_mib=$(( (root_bytes + 1048575) / 1048576 ))
  # The boot partition: FAT with syslinux, the kernel, the initrd, the config.
  mkfs.vfat -C -n VMPLUGBOOT "$work/boot.img" $((boot_mib * 1024)) >/dev/null
  cat >"$work/syslinux.cfg" <<'CFG'
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL /vmlinuz
  APPEND initrd=/initrd.img console=ttyS0 vmplug.root=/dev/vda2 quiet
CFG
  MTOOLS_SKIP_CHECK=1 mcopy -i "$work/boot.img" "$kernel" ::/vmlinuz
  MTOOLS_SKIP_CHECK=1 mcopy -i "$work/boot.img" "$initrd" ::/initrd.img
  MTOOLS_SKIP_CHECK=1 mcopy -i "$work/boot.img" "$work/syslinux.cfg" ::/syslinux.cfg
  syslinux --install "$work/boot.img"
  # The disk: 1 MiB for the MBR, then the two partitions, copied in place.
  truncate -s $(( (1 + boot_mib + root_mib + 1) * 1048576 )) "$work/disk.raw"
  printf 'label: dos\nstart=2048, size=%d, type=c, bootable\nstart=%d, size=%d, type=83\n' \
    $((boot_mib * 2048)) $(( (1 + boot_mib) * 2048 )) $((root_mib * 2048)) | sfdisk -q "$work/disk.raw"
  dd if=/usr/lib/syslinux/mbr/mbr.bin of="$work/disk.raw" bs=440 count=1 conv=notrunc status=none
  dd if="$work/boot.img" of="$work/disk.raw" bs=1M seek=1 conv=notrunc,sparse status=none
  dd if="$rootfs" of="$work/disk.raw" bs=1M seek=$((1 + boot_mib)) conv=notrunc,sparse status=none
  qemu-img convert -q -f raw -O qcow2 "$work/disk.raw" "$tmp"
}

artefact "$out" build_disk
