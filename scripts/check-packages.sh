#!/usr/bin/env bash
# Lists the contents of the built packages (dpkg -c, rpm -qlp) and checks every
# expected file, plus the maintainer scripts that enable the guest unit.
set -uo pipefail
dir=${1:-target/packages}
pass=0 fail=0
check() { # description, command...
  local what=$1; shift
  if "$@" >/dev/null 2>&1; then pass=$((pass + 1)); else fail=$((fail + 1)); echo "FAIL: $what"; fi
}
has() { grep -qE "$2" <<<"$1"; }

deb_guest=$(ls "$dir"/vmplug-guest_*.deb) deb_host=$(ls "$dir"/vmplug_*.deb)
rpm_guest=$(ls "$dir"/vmplug-guest-*.rpm) rpm_host=$(ls "$dir"/vmplug-[0-9]*.rpm)
dg=$(dpkg -c "$deb_guest"); dh=$(dpkg -c "$deb_host")
rg=$(rpm -qlp "$rpm_guest" 2>/dev/null); rh=$(rpm -qlp "$rpm_host" 2>/dev/null)

for f in usr/bin/vmplug-guest etc/vmplug/guest.toml usr/lib/systemd/system/vmplug-guest.service \
         usr/share/vmplug/udev-rules/80-vmplug-memory-online.rules usr/share/vmplug/udev-rules/80-vmplug-cpu-online.rules \
         usr/share/vmplug/udev-rules/80-vmplug-guest-online.rules usr/share/doc/vmplug-guest/udev-rules.md; do
  check "guest .deb has /$f" has "$dg" "\./$f\$"
  check "guest .rpm has /$f" has "$rg" "^/$f\$"
done
check "guest .deb binary is executable" has "$dg" '^-rwxr-xr-x .* \./usr/bin/vmplug-guest$'
check "guest .deb marks guest.toml as a conffile" has "$(dpkg-deb -f "$deb_guest" Package; dpkg-deb -I "$deb_guest" conffiles)" '/etc/vmplug/guest.toml'
check "guest .deb enables the unit on install" has "$(dpkg-deb -I "$deb_guest" postinst)" 'enable.*vmplug-guest.service|deb-systemd-helper.*enable'
check "guest .deb depends on nothing (static)" test -z "$(dpkg-deb -f "$deb_guest" Depends)"
check "guest .rpm enables the unit on install" has "$(rpm -qp --scripts "$rpm_guest" 2>/dev/null)" 'systemctl enable --now vmplug-guest.service'
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
dpkg-deb -x "$deb_guest" "$tmp"
check "packaged agent is statically linked" sh -c "file -L '$tmp/usr/bin/vmplug-guest' | grep -q 'static'"
check "packaged unit is Type=notify with a watchdog" sh -c "grep -q '^Type=notify' '$tmp/usr/lib/systemd/system/vmplug-guest.service' && grep -q '^WatchdogSec=' '$tmp/usr/lib/systemd/system/vmplug-guest.service'"
for r in "$tmp"/usr/share/vmplug/udev-rules/*.rules; do check "udevadm verify $(basename "$r")" udevadm verify "$r"; done
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
echo "packages: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
