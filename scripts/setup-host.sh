#!/usr/bin/env bash
# Installs what vmplug's demo, end-to-end tests and benchmarks need on a fresh
# Debian 12 machine: QEMU 10 + libvirt 11 from bookworm-backports, the guest
# kernels, vhost-device-vsock and the packaging tools. Re-runnable, and safe to
# run concurrently (scripts/lib.sh): each artefact is built once, under its own
# lock, into a temporary path renamed into place; every download is retried.
#
#   scripts/setup-host.sh                 everything (`make setup`: `make test`, `make bench`)
#   scripts/setup-host.sh demo            only what `make demo` boots: the x86 packages,
#                                         the bookworm guest kernel
#   scripts/setup-host.sh demo-packages   only the demo's apt packages (which the
#                                         demo's Rust build links against)
set -euo pipefail
LOG_TAG=setup
. "$(dirname "$0")/lib.sh"

mode=${1:-full}
case $mode in
  full | demo | demo-packages) ;;
  *) log "usage: $0 [full|demo|demo-packages]"; exit 2 ;;
esac

backports_sources=/etc/apt/sources.list.d/vmplug-bookworm-backports.sources
# The demo's x86 guest: QEMU and a private libvirtd (whose mount namespace needs
# util-linux's unshare and nsenter), libvirt's headers for the virt crate, the
# static busybox, cpio and udev's udevadm for its initramfs.
packages=(qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev
          pkg-config busybox-static cpio util-linux udev)
# The rest of the suite: systemd guest images, package checks, the aarch64 guests
# and their cross-built kernel, the bootable images and the autoscale sessions.
if [ "$mode" = full ]; then
  # lintian, rpmlint and mandoc lint the packages and man pages (make package-test);
  # systemd-analyze security --offline needs systemd 250 or later (bookworm has 252).
  packages+=(debootstrap e2fsprogs rpm file xz-utils lintian rpmlint mandoc
             qemu-system-arm qemu-efi-aarch64 gcc-aarch64-linux-gnu flex bison bc
             prometheus prometheus-alertmanager syslinux syslinux-common mtools dosfstools fdisk)
fi

apt_needed() {
  local p
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || return 0
  done
  # QEMU must come from backports (10.x): stock 7.2 slows guests down 30-50x after a CPU hot-plug.
  qemu-system-x86_64 --version 2>/dev/null | grep -q 'version 10\.' || return 0
  [ "$mode" = full ] && ! qemu-system-aarch64 --version 2>/dev/null | grep -q 'version 10\.'
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

if [ "$mode" = demo-packages ]; then exit 0; fi

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

if [ "$mode" = demo ]; then
  log "ready for the demo: $(qemu-system-x86_64 --version | head -1); libvirt $(libvirtd --version | awk '{print $NF}'); kernel $(ls "$CACHE"/kernel/boot/vmlinuz-* | xargs -n1 basename)"
  exit 0
fi

# vhost-device-vsock: the vhost-user vsock backend (no /dev/vhost-vsock on these
# machines), from crates.io, built once, for the suite's vsock guests (the
# demo's guest talks over virtio-serial).
if [ ! -x "$CACHE/bin/vhost-device-vsock" ]; then log "building vhost-device-vsock from crates.io (once, 1-2 minutes)"; fi
artefact "$CACHE/bin/vhost-device-vsock" cargo_tool vhost-device-vsock

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

# An arm64 guest kernel that can see a DIMM: Debian's 6.1 source, cross-built
# once with ACPI memory hot-plug (which every Debian and Ubuntu arm64 kernel
# lacks) and only what the test guest needs, everything built in (no modules).
# About 5 minutes on 2 cores; cached like every other artefact.
build_arm64_acpi_kernel() {
  local tmp=$1 src="$1.src" deb tree rel
  mkdir -p "$src" "$tmp/boot"
  (cd "$src" && retry "apt-get download linux-source-6.1" apt_download linux-source-6.1)
  deb=$(ls "$src"/linux-source-6.1_*.deb)
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$src" --wildcards '*/linux-source-6.1.tar.xz'
  tar -xJf "$src"/usr/src/linux-source-6.1.tar.xz -C "$src"
  tree="$src/linux-source-6.1"
  local kmake=(make -C "$tree" -s ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu- LOCALVERSION=-vmplug-acpi)
  "${kmake[@]}" allnoconfig
  cat >"$tree/vmplug.config" <<'CONFIG'
CONFIG_SMP=y
CONFIG_NR_CPUS=8
CONFIG_HOTPLUG_CPU=y
CONFIG_PRINTK=y
CONFIG_MULTIUSER=y
CONFIG_FUTEX=y
CONFIG_EPOLL=y
CONFIG_SIGNALFD=y
CONFIG_TIMERFD=y
CONFIG_EVENTFD=y
CONFIG_SHMEM=y
CONFIG_POSIX_TIMERS=y
CONFIG_PROC_FS=y
CONFIG_PROC_SYSCTL=y
CONFIG_SYSFS=y
CONFIG_TMPFS=y
CONFIG_DEVTMPFS=y
CONFIG_BLK_DEV_INITRD=y
CONFIG_RD_GZIP=y
CONFIG_BINFMT_ELF=y
CONFIG_BINFMT_SCRIPT=y
CONFIG_TTY=y
CONFIG_UNIX98_PTYS=y
CONFIG_SERIAL_AMBA_PL011=y
CONFIG_SERIAL_AMBA_PL011_CONSOLE=y
CONFIG_EFI=y
CONFIG_EFI_STUB=y
CONFIG_ACPI=y
CONFIG_NUMA=y
CONFIG_ACPI_NUMA=y
CONFIG_MEMORY_HOTPLUG=y
CONFIG_MEMORY_HOTREMOVE=y
CONFIG_MIGRATION=y
CONFIG_COMPACTION=y
CONFIG_ACPI_HOTPLUG_MEMORY=y
CONFIG_PSI=y
CONFIG_PCI=y
CONFIG_PCIEPORTBUS=y
CONFIG_HOTPLUG_PCI=y
CONFIG_HOTPLUG_PCI_PCIE=y
CONFIG_PCI_HOST_GENERIC=y
CONFIG_NET=y
CONFIG_UNIX=y
CONFIG_VSOCKETS=y
CONFIG_VIRTIO_VSOCKETS=y
CONFIG_VIRTIO_MENU=y
CONFIG_VIRTIO_PCI=y
CONFIG_VIRTIO_CONSOLE=y
CONFIG_VIRTIO_MEM=y
CONFIG
  (cd "$tree" && ARCH=arm64 scripts/kconfig/merge_config.sh -m -O . .config vmplug.config >/dev/null)
  "${kmake[@]}" olddefconfig
  local opt
  for opt in ACPI_HOTPLUG_MEMORY MEMORY_HOTPLUG MEMORY_HOTREMOVE VIRTIO_PCI VIRTIO_CONSOLE VIRTIO_MEM VIRTIO_VSOCKETS \
             SERIAL_AMBA_PL011_CONSOLE NUMA ACPI_NUMA EFI_STUB PCI_HOST_GENERIC HOTPLUG_PCI_PCIE DEVTMPFS PSI; do
    grep -qx "CONFIG_$opt=y" "$tree/.config" || { log "the arm64 kernel config lost CONFIG_$opt"; return 1; }
  done
  "${kmake[@]}" -j"$(nproc)" Image >"$CACHE/kernel-arm64-acpi-build.log" 2>&1 ||
    { tail -30 "$CACHE/kernel-arm64-acpi-build.log" >&2; return 1; }
  rel=$("${kmake[@]}" kernelrelease)
  cp "$tree/arch/arm64/boot/Image" "$tmp/boot/vmlinuz-$rel"
  cp "$tree/.config" "$tmp/boot/config-$rel"
  rm -rf "$src"
}

if [ ! -e "$CACHE/kernel-arm64-acpi" ]; then log "cross-building the arm64 guest kernel with ACPI memory hot-plug (once, 5 to 8 minutes on 2 cores)"; fi
artefact "$CACHE/kernel-arm64-acpi" build_arm64_acpi_kernel

# The kernel's own hot-plug selftests, from the same Debian 6.1 source:
# tools/testing/selftests/{memory-hotplug/mem-on-off-test.sh,
# cpu-hotplug/cpu-on-off-test.sh}, which the e2e tier runs in a guest after
# vmplug's plugs (tests/tests/replays.rs). Only the two scripts are kept.
build_kernel_selftests() {
  local tmp=$1 src="$1.src" deb
  mkdir -p "$src" "$tmp"
  (cd "$src" && retry "apt-get download linux-source-6.1" apt_download linux-source-6.1)
  deb=$(ls "$src"/linux-source-6.1_*.deb)
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$src" --wildcards '*/linux-source-6.1.tar.xz'
  tar -xJf "$src"/usr/src/linux-source-6.1.tar.xz -C "$src" --wildcards \
    '*/tools/testing/selftests/memory-hotplug/mem-on-off-test.sh' \
    '*/tools/testing/selftests/cpu-hotplug/cpu-on-off-test.sh'
  cp "$src"/linux-source-6.1/tools/testing/selftests/memory-hotplug/mem-on-off-test.sh \
    "$src"/linux-source-6.1/tools/testing/selftests/cpu-hotplug/cpu-on-off-test.sh "$tmp/"
  rm -rf "$src"
}
if [ ! -e "$CACHE/kernel-selftests" ]; then log "extracting the kernel's hot-plug selftests from Debian's 6.1 source"; fi
artefact "$CACHE/kernel-selftests" build_kernel_selftests

# The static aarch64 guest agent is built for musl and linked by rust-lld.
if ! rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-musl; then
  exec {rust_lock}>"$CACHE/.locks/rustup-target.lock"
  flock "$rust_lock"
  rustup target list --installed | grep -qx aarch64-unknown-linux-musl ||
    retry "rustup target add aarch64-unknown-linux-musl" rustup target add aarch64-unknown-linux-musl
  exec {rust_lock}>&-
fi

# The packaging tools for `make package`, from crates.io, built once; cargo-about
# writes each package's third-party notices from Cargo.lock (its binary needs
# the `cli` feature).
for tool in cargo-deb cargo-generate-rpm cargo-about; do
  if [ ! -x "$CACHE/bin/$tool" ]; then log "building $tool from crates.io (once, 1-2 minutes)"; fi
  args=()
  [ "$tool" != cargo-about ] || args=(--features cli)
  artefact "$CACHE/bin/$tool" cargo_tool "$tool" "${args[@]}"
done

log "ready: $(qemu-system-x86_64 --version | head -1); libvirt $(libvirtd --version | awk '{print $NF}'); kernels $(ls "$CACHE"/kernel/boot/vmlinuz-* "$CACHE"/kernel-trixie/boot/vmlinuz-* "$CACHE"/kernel-arm64/boot/vmlinuz-* "$CACHE"/kernel-arm64-acpi/boot/vmlinuz-* | xargs -n1 basename | tr '\n' ' ')"
