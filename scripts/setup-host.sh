#!/usr/bin/env bash
# Installs what vmplug's demo, end-to-end tests and benchmarks need on a fresh
# Debian 12 machine: QEMU 10 + libvirt 11 from bookworm-backports, the guest
# kernel, vhost-device-vsock and the packaging tools. Re-runnable, and safe to
# run concurrently (scripts/lib.sh): each artefact is built once, under its own
# lock, into a temporary path renamed into place; every download is retried.
set -euo pipefail
LOG_TAG=setup
. "$(dirname "$0")/lib.sh"

backports_sources=/etc/apt/sources.list.d/vmplug-bookworm-backports.sources
packages=(qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev
          pkg-config busybox-static cpio debootstrap e2fsprogs util-linux rpm file xz-utils
          qemu-system-arm qemu-efi-aarch64)

apt_needed() {
  local p
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || return 0
  done
  # QEMU must come from backports (10.x): stock 7.2 slows guests down 30-50x after a CPU hot-plug.
  ! { qemu-system-x86_64 --version 2>/dev/null | grep -q 'version 10\.' &&
      qemu-system-aarch64 --version 2>/dev/null | grep -q 'version 10\.'; }
}

install_packages() {
  if [ ! -f "$backports_sources" ]; then
    local mirror keyring
    read -r mirror keyring < <(debian_mirror)
    log "adding bookworm-backports from $mirror"
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
      "$mirror" "$keyring" >"$backports_sources.tmp"
    mv "$backports_sources.tmp" "$backports_sources"
  fi
  retry "apt-get update" apt_get update -qq
  log "installing ${packages[*]}"
  # No daemon of the host may be started by the package scripts.
  local own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
    own_policy=1
  fi
  local rc=0
  retry "apt-get install (bookworm-backports)" env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
    apt-get -o Acquire::Retries=3 -o DPkg::Lock::Timeout=600 install -y -qq -t bookworm-backports \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${packages[@]}" >"$CACHE/apt.log" 2>&1 || { cat "$CACHE/apt.log" >&2; rc=1; }
  [ "$own_policy" = 0 ] || rm -f /usr/sbin/policy-rc.d
  return "$rc"
}

# Packages are the machine's, not the cache's: one lock for the machine.
if apt_needed; then
  exec {apt_lock}>/run/lock/vmplug-setup-apt.lock
  flock "$apt_lock"
  if apt_needed; then install_packages; fi
  exec {apt_lock}>&-
fi

# Guest kernel: Debian's 6.1 amd64 image, unpacked (not installed) into the cache.
download_kernel() {
  local tmp=$1 debs="$1.debs" dep
  mkdir -p "$tmp" "$debs"
  cd "$debs"
  retry "apt-get download linux-image-amd64" apt_download linux-image-amd64
  dep=$(dpkg-deb -f linux-image-amd64_*.deb Depends | tr ',' '\n' | grep -o 'linux-image-[0-9][^ ]*' | head -1)
  retry "apt-get download $dep" apt_download "$dep"
  dpkg -x "$(ls "$dep"_*.deb)" "$tmp"
  cd / && rm -rf "$debs"
  ls "$tmp"/boot/vmlinuz-* >/dev/null
}

# `apt-get download` fails on a stale package list: refresh it, then fail.
apt_download() {
  apt_get download "$1" >/dev/null 2>&1 || { apt_get update -qq >/dev/null 2>&1; apt_get download "$1" >/dev/null; }
}

if [ ! -e "$CACHE/kernel" ]; then log "downloading the guest kernel"; fi
artefact "$CACHE/kernel" download_kernel

# private_apt DIR SUITE ARCH: an apt configuration of its own under DIR (the
# machine's mirror and keyring, its own lists and cache, packages of ARCH), so
# the machine's apt state is never touched; exports APT_CONFIG and refreshes it.
private_apt() {
  local dir=$1 suite=$2 arch=$3 mirror keyring
  mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/sources"
  read -r mirror keyring < <(debian_mirror)
  printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n' "$mirror" "$suite" "$keyring" >"$dir/sources/$suite.sources"
  printf 'Dir::Etc::SourceList "/dev/null";\nDir::Etc::SourceParts "%s";\nDir::State::Lists "%s";\nDir::Cache "%s";\nAPT::Architecture "%s";\nAPT::Architectures "%s";\nAPT::Sandbox::User "root";\n' \
    "$dir/sources" "$dir/lists" "$dir/cache" "$arch" "$arch" >"$dir/apt.conf"
  export APT_CONFIG="$dir/apt.conf"
  retry "apt-get update ($suite, $arch)" apt-get -o Acquire::Retries=3 update -qq
}

# private_kernel TMP SUITE ARCH [PKG...]: the suite's linux-image-ARCH (the image
# package its metapackage depends on) and PKGs, unpacked (not installed) into
# TMP; xz-compressed modules are unpacked too, since busybox's insmod cannot.
private_kernel() {
  local tmp=$1 suite=$2 arch=$3 apt="$1.apt" pkg deb
  shift 3
  mkdir -p "$tmp"
  private_apt "$apt" "$suite" "$arch"
  pkg=$(apt-cache show "linux-image-$arch" | sed -n 's/^Depends: \(linux-image-[0-9][^ ,]*\).*/\1/p' | head -1)
  [ -n "$pkg" ] || { log "no linux-image-$arch in $suite"; return 1; }
  (cd "$apt" && retry "apt-get download $pkg $* ($suite)" apt-get -o Acquire::Retries=3 download -qq "$pkg" "$@")
  unset APT_CONFIG
  for deb in "$apt"/*.deb; do dpkg -x "$deb" "$tmp"; done
  rm -rf "$apt"
  find "$tmp" -path '*/lib/modules/*' -name '*.ko.xz' -exec xz -d {} +
  ls "$tmp"/boot/vmlinuz-* >/dev/null
}

# A second guest kernel: Debian trixie's 6.12, which onlines hot-added memory by
# itself (CONFIG_MHP_DEFAULT_ONLINE_TYPE_ONLINE_AUTO), as newer distributions do.
if [ ! -e "$CACHE/kernel-trixie" ]; then log "downloading the trixie guest kernel"; fi
artefact "$CACHE/kernel-trixie" private_kernel trixie amd64

# The aarch64 guest (the guide's platform, under TCG): Debian 12's arm64 kernel
# with its static busybox (bin/busybox in the same tree). Its kernel has no ACPI
# memory hot-plug, as every Debian and Ubuntu arm64 kernel.
if [ ! -e "$CACHE/kernel-arm64" ]; then log "downloading the arm64 guest kernel and busybox"; fi
artefact "$CACHE/kernel-arm64" private_kernel bookworm arm64 busybox-static

# The static aarch64 guest agent is built for musl and linked by rust-lld.
if ! rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-musl; then
  exec {rust_lock}>"$CACHE/.locks/rustup-target.lock"
  flock "$rust_lock"
  rustup target list --installed | grep -qx aarch64-unknown-linux-musl ||
    retry "rustup target add aarch64-unknown-linux-musl" rustup target add aarch64-unknown-linux-musl
  exec {rust_lock}>&-
fi

# vhost-device-vsock: the vhost-user vsock backend (no /dev/vhost-vsock on these
# machines); packaging tools for `make package`. All from crates.io, built once.
for tool in vhost-device-vsock cargo-deb cargo-generate-rpm; do
  if [ ! -x "$CACHE/bin/$tool" ]; then log "building $tool from crates.io (once, 1-2 minutes)"; fi
  artefact "$CACHE/bin/$tool" cargo_tool "$tool"
done

log "ready: $(qemu-system-x86_64 --version | head -1); libvirt $(libvirtd --version | awk '{print $NF}'); kernels $(ls "$CACHE"/kernel/boot/vmlinuz-* "$CACHE"/kernel-trixie/boot/vmlinuz-* "$CACHE"/kernel-arm64/boot/vmlinuz-* | xargs -n1 basename | tr '\n' ' ')"
