#!/usr/bin/env bash
# Lists the contents of the built packages (dpkg -c, rpm -qlp) and checks every
# expected file, plus the maintainer scripts that enable the guest unit.
set -uo pipefail
# Absolute: some checks unpack in a directory of their own.
dir=$(cd "${1:-target/packages}" && pwd) || exit 1
pass=0 fail=0
check() { # description, command...
  local what=$1; shift
  if "$@" >/dev/null 2>&1; then pass=$((pass + 1)); else fail=$((fail + 1)); echo "FAIL: $what"; fi
}
has() { grep -qE "$2" <<<"$1"; }

deb_host=$(ls "$dir"/vmplug_*.deb) rpm_host=$(ls "$dir"/vmplug-[0-9]*.rpm)
dh=$(dpkg -c "$deb_host"); rh=$(rpm -qlp "$rpm_host" 2>/dev/null)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

# The guest packages, one per architecture: x86_64 and aarch64 (openEuler runs on
# aarch64 and RPM). Each: DEB_ARCH RPM_ARCH and what file(1) says of its binary.
check_guest() {
  local debarch=$1 rpmarch=$2 elf=$3 deb_guest rpm_guest dg rg f
  deb_guest=$(ls "$dir"/vmplug-guest_*_"$debarch".deb) rpm_guest=$(ls "$dir"/vmplug-guest-*."$rpmarch".rpm)
  dg=$(dpkg -c "$deb_guest"); rg=$(rpm -qlp "$rpm_guest" 2>/dev/null)
  for f in usr/bin/vmplug-guest etc/vmplug/guest.toml usr/lib/systemd/system/vmplug-guest.service \
           usr/share/vmplug/udev-rules/80-vmplug-memory-online.rules usr/share/vmplug/udev-rules/80-vmplug-cpu-online.rules \
           usr/share/vmplug/udev-rules/80-vmplug-guest-online.rules usr/share/doc/vmplug-guest/udev-rules.md; do
    check "guest .deb ($debarch) has /$f" has "$dg" "\./$f\$"
    check "guest .rpm ($rpmarch) has /$f" has "$rg" "^/$f\$"
  done
  check "guest .deb ($debarch) is for $debarch" test "$(dpkg-deb -f "$deb_guest" Architecture)" = "$debarch"
  check "guest .rpm ($rpmarch) is for $rpmarch" test "$(rpm -qp --qf '%{ARCH}' "$rpm_guest" 2>/dev/null)" = "$rpmarch"
  check "guest .deb ($debarch) binary is executable" has "$dg" '^-rwxr-xr-x .* \./usr/bin/vmplug-guest$'
  check "guest .deb ($debarch) marks guest.toml as a conffile" has "$(dpkg-deb -I "$deb_guest" conffiles)" '/etc/vmplug/guest.toml'
  check "guest .deb ($debarch) enables the unit on install" has "$(dpkg-deb -I "$deb_guest" postinst)" 'enable.*vmplug-guest.service|deb-systemd-helper.*enable'
  check "guest .deb ($debarch) depends on nothing (static)" test -z "$(dpkg-deb -f "$deb_guest" Depends)"
  check "guest .rpm ($rpmarch) enables the unit on install" has "$(rpm -qp --scripts "$rpm_guest" 2>/dev/null)" 'systemctl enable --now vmplug-guest.service'
  rm -rf "$tmp/guest" && dpkg-deb -x "$deb_guest" "$tmp/guest"
  check "packaged agent ($debarch) is a static $elf binary" sh -c "file -L '$tmp/guest/usr/bin/vmplug-guest' | grep -q '$elf.*static'"
  mkdir -p "$tmp/rpm-$rpmarch" && (cd "$tmp/rpm-$rpmarch" && rpm2cpio "$rpm_guest" | cpio -id --quiet 2>/dev/null)
  check "the .rpm's agent ($rpmarch) is the .deb's" cmp "$tmp/guest/usr/bin/vmplug-guest" "$tmp/rpm-$rpmarch/usr/bin/vmplug-guest"
  check "packaged unit ($debarch) is Type=notify with a watchdog" sh -c "grep -q '^Type=notify' '$tmp/guest/usr/lib/systemd/system/vmplug-guest.service' && grep -q '^WatchdogSec=' '$tmp/guest/usr/lib/systemd/system/vmplug-guest.service'"
}
check_guest amd64 x86_64 'x86-64'
check_guest arm64 aarch64 'ARM aarch64'
for r in "$tmp"/guest/usr/share/vmplug/udev-rules/*.rules; do check "udevadm verify $(basename "$r")" udevadm verify "$r"; done
for f in usr/bin/vmplug usr/share/doc/vmplug/README.md usr/share/doc/vmplug/SECURITY.md etc/vmplug/autoscale.toml \
         usr/lib/systemd/system/vmplug-autoscale.service usr/share/man/man1/vmplug.1.gz \
         usr/share/man/man1/vmplug-resize-memory.1.gz usr/share/bash-completion/completions/vmplug \
         usr/share/zsh/vendor-completions/_vmplug usr/share/fish/vendor_completions.d/vmplug.fish; do
  check "host .deb has /$f" has "$dh" "\./$f\$"
done
for f in usr/bin/vmplug etc/vmplug/autoscale.toml usr/lib/systemd/system/vmplug-autoscale.service \
         usr/share/man/man1/vmplug.1 usr/share/man/man1/vmplug-setvcpus.1 usr/share/bash-completion/completions/vmplug \
         usr/share/zsh/site-functions/_vmplug usr/share/fish/vendor_completions.d/vmplug.fish; do
  check "host .rpm has /$f" has "$rh" "^/$f\$"
done
dpkg-deb -x "$deb_host" "$tmp/host"
check "the man page names the verbs" sh -c "gzip -dc '$tmp/host/usr/share/man/man1/vmplug.1.gz' | grep -q 'resize\\\\-memory'"
check "bash completion completes the verbs" bash -c ". '$tmp/host/usr/share/bash-completion/completions/vmplug' && COMP_WORDS=(vmplug resize-) COMP_CWORD=1 && _vmplug vmplug resize- vmplug && [[ \" \${COMPREPLY[*]} \" == *' resize-memory '* ]]"
check "host .deb depends on libvirt" has "$(dpkg-deb -f "$deb_host" Depends)" 'libvirt0'
check "host .deb recommends what verify-image boots guests with" has "$(dpkg-deb -f "$deb_host" Recommends)" 'libvirt-daemon-system'
echo "packages: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
