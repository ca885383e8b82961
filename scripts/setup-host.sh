#!/usr/bin/env bash
# Installs what vmplug's demo, end-to-end tests and benchmarks need on a fresh
# Debian 12 machine: QEMU 10 + libvirt 11 from bookworm-backports, the guest
# kernel, and vhost-device-vsock. Re-runnable: every step checks before acting.
set -euo pipefail

CACHE=${VMPLUG_CACHE:-/var/tmp/vmplug-cache}
mkdir -p "$CACHE"

log() { printf 'setup: %s\n' "$*" >&2; }

backports_sources=/etc/apt/sources.list.d/vmplug-bookworm-backports.sources
packages=(qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev
          pkg-config busybox-static cpio debootstrap e2fsprogs util-linux rpm file)

need_apt=0
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need_apt=1
done
# QEMU must come from backports (10.x): stock 7.2 slows guests down 30-50x after a CPU hot-plug.
if command -v qemu-system-x86_64 >/dev/null; then
  qemu-system-x86_64 --version | grep -q 'version 10\.' || need_apt=1
fi

if [ "$need_apt" = 1 ]; then
  if [ ! -f "$backports_sources" ]; then
    log "adding bookworm-backports"
    cat >"$backports_sources" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  log "apt-get update"
  apt-get update -qq >/dev/null
  log "installing ${packages[*]}"
  # No daemon of the host may be started by the package scripts.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq -t bookworm-backports \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${packages[@]}" >"$CACHE/apt.log" 2>&1 || { cat "$CACHE/apt.log" >&2; exit 1; }
fi

# Guest kernel: Debian's 6.1 amd64 image, unpacked (not installed) into the cache.
kdir=$CACHE/kernel
if ! ls "$kdir"/boot/vmlinuz-* >/dev/null 2>&1; then
  log "downloading the guest kernel"
  rm -rf "$kdir" "$CACHE/kdeb"; mkdir -p "$kdir" "$CACHE/kdeb"
  ( cd "$CACHE/kdeb"
    apt-get download linux-image-amd64 >/dev/null 2>&1 || { apt-get update -qq >/dev/null; apt-get download linux-image-amd64 >/dev/null; }
    dep=$(dpkg-deb -f linux-image-amd64_*.deb Depends | tr ',' '\n' | grep -o 'linux-image-[0-9][^ ]*' | head -1)
    apt-get download "$dep" >/dev/null
    dpkg -x "$(ls "$dep"_*.deb)" "$kdir" )
fi

# vhost-device-vsock: the vhost-user vsock backend (no /dev/vhost-vsock on these machines).
if [ ! -x "$CACHE/bin/vhost-device-vsock" ]; then
  log "building vhost-device-vsock (about 100 s, once)"
  cargo install --quiet --locked --root "$CACHE" vhost-device-vsock >"$CACHE/vhost-build.log" 2>&1 \
    || cargo install --quiet --root "$CACHE" vhost-device-vsock >>"$CACHE/vhost-build.log" 2>&1 \
    || { cat "$CACHE/vhost-build.log" >&2; exit 1; }
fi

# Packaging tools for `make package` (crates.io, built once).
for tool in cargo-deb cargo-generate-rpm; do
  if [ ! -x "$CACHE/bin/$tool" ]; then
    log "building $tool (once)"
    cargo install --quiet --locked --root "$CACHE" "$tool" >"$CACHE/$tool-build.log" 2>&1 \
      || cargo install --quiet --root "$CACHE" "$tool" >>"$CACHE/$tool-build.log" 2>&1 \
      || { cat "$CACHE/$tool-build.log" >&2; exit 1; }
  fi
done

log "ready: $(qemu-system-x86_64 --version | head -1); libvirt $(libvirtd --version | awk '{print $NF}'); kernel $(ls "$kdir"/boot/vmlinuz-* | xargs -n1 basename)"
