#!/usr/bin/env bash
# Lists the contents of the built packages (dpkg -c, rpm -qlp) and checks every
# expected file; then runs the packages' scriptlets for real (install, upgrade,
# downgrade, remove, purge) in scratch roots and checks what they leave enabled.
set -uo pipefail
LOG_TAG=check-packages
# The cache: its debootstrapped bookworm (the scratch roots) and the packaging tools.
. "$(dirname "$0")/lib.sh"
repo=$(cd "$(dirname "$0")/.." && pwd)
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
           usr/share/vmplug/udev-rules/80-vmplug-guest-online.rules usr/share/doc/vmplug-guest/udev-rules.md \
           usr/share/man/man8/vmplug-guest.8.gz usr/share/man/man5/guest.toml.5.gz; do
    check "guest .deb ($debarch) has /$f" has "$dg" "\./$f\$"
    check "guest .rpm ($rpmarch) has /$f" has "$rg" "^/$f\$"
  done
  for f in usr/share/doc/vmplug-guest/copyright usr/share/doc/vmplug-guest/THIRD-PARTY-NOTICES usr/share/doc/vmplug-guest/changelog.Debian.gz; do
    check "guest .deb ($debarch) has /$f" has "$dg" "\./$f\$"
  done
  for f in usr/share/licenses/vmplug-guest/LICENSE usr/share/licenses/vmplug-guest/THIRD-PARTY-NOTICES; do
    check "guest .rpm ($rpmarch) has /$f" has "$rg" "^/$f\$"
  done
  check "guest .rpm ($rpmarch) has a %changelog or its file" has "$rg" '^/usr/share/doc/vmplug-guest/changelog$'

  check "guest .deb ($debarch) is for $debarch" test "$(dpkg-deb -f "$deb_guest" Architecture)" = "$debarch"
  check "guest .rpm ($rpmarch) is for $rpmarch" test "$(rpm -qp --qf '%{ARCH}' "$rpm_guest" 2>/dev/null)" = "$rpmarch"
  check "guest .deb ($debarch) binary is executable" has "$dg" '^-rwxr-xr-x .* \./usr/bin/vmplug-guest$'
  check "guest .deb ($debarch) marks guest.toml as a conffile" has "$(dpkg-deb -I "$deb_guest" conffiles)" '/etc/vmplug/guest.toml'
  check "guest .deb ($debarch) enables the unit on install" has "$(dpkg-deb -I "$deb_guest" postinst)" 'enable.*vmplug-guest.service|deb-systemd-helper.*enable'
  check "guest .deb ($debarch) depends on no library (static), only on deb-systemd-helper" test "$(dpkg-deb -f "$deb_guest" Depends)" = "init-system-helpers (>= 1.54~)"
  check "guest .deb ($debarch) has the preset" has "$dg" '\./usr/lib/systemd/system-preset/80-vmplug-guest\.preset$'
  check "guest .rpm ($rpmarch) has the preset" has "$rg" '^/usr/lib/systemd/system-preset/80-vmplug-guest\.preset$'
  check "guest .rpm ($rpmarch) applies the preset on first install" has "$(rpm -qp --scripts "$rpm_guest" 2>/dev/null)" 'systemctl --no-reload preset vmplug-guest.service'
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
         usr/share/zsh/vendor-completions/_vmplug usr/share/fish/vendor_completions.d/vmplug.fish \
         usr/share/doc/vmplug/copyright usr/share/doc/vmplug/THIRD-PARTY-NOTICES usr/share/doc/vmplug/changelog.Debian.gz; do
  check "host .deb has /$f" has "$dh" "\./$f\$"
done
for f in usr/bin/vmplug etc/vmplug/autoscale.toml usr/lib/systemd/system/vmplug-autoscale.service \
         usr/share/man/man1/vmplug.1.gz usr/share/man/man1/vmplug-setvcpus.1.gz usr/share/bash-completion/completions/vmplug \
         usr/share/zsh/site-functions/_vmplug usr/share/fish/vendor_completions.d/vmplug.fish \
         usr/share/licenses/vmplug/LICENSE usr/share/licenses/vmplug/THIRD-PARTY-NOTICES usr/share/doc/vmplug/changelog; do
  check "host .rpm has /$f" has "$rh" "^/$f\$"
done
dpkg-deb -x "$deb_host" "$tmp/host"
check "no page refers to one that is not shipped" sh -c "! gzip -dc '$tmp'/host/usr/share/man/man1/*.gz | grep -q 'vmplug.-help'"
check "the notices carry virt's LGPL-2.1" sh -c "grep -A3 'LGPL-2.1' '$tmp/host/usr/share/doc/vmplug/THIRD-PARTY-NOTICES' | grep -q ' virt '"
# Each licence of the notices is in the RPM's License tag.
licence_tags() { # RPM NOTICES
  local tag id
  tag=$(rpm -qp --qf '%{LICENSE}' "$1" 2>/dev/null)
  for id in $(sed -n 's/^  .* (\([^()]*\)): [0-9]*$/\1/p' "$2"); do
    [[ " $tag " == *" $id "* ]] || { echo "$(basename "$1"): License '$tag' lacks $id"; return 1; }
  done
}
check "the host .rpm's License names every licence of its notices" licence_tags "$rpm_host" "$tmp/host/usr/share/doc/vmplug/THIRD-PARTY-NOTICES"
check "the guest .rpm's License names every licence of its notices" licence_tags "$(ls "$dir"/vmplug-guest-*.x86_64.rpm)" "$tmp/guest/usr/share/doc/vmplug-guest/THIRD-PARTY-NOTICES"
check "the man page names the verbs" sh -c "gzip -dc '$tmp/host/usr/share/man/man1/vmplug.1.gz' | grep -q 'resize\\\\-memory'"
check "bash completion completes the verbs" bash -c ". '$tmp/host/usr/share/bash-completion/completions/vmplug' && COMP_WORDS=(vmplug resize-) COMP_CWORD=1 && _vmplug vmplug resize- vmplug && [[ \" \${COMPREPLY[*]} \" == *' resize-memory '* ]]"
check "bash completes a verb's domain through the binary" grep -q '__complete-domains' "$tmp/host/usr/share/bash-completion/completions/vmplug"
check "bash completes --zone's values" bash -c ". '$tmp/host/usr/share/bash-completion/completions/vmplug' && COMP_WORDS=(vmplug setvcpus --zone m) COMP_CWORD=3 && _vmplug vmplug m --zone && [[ \" \${COMPREPLY[*]} \" == ' movable ' ]]"
check "host .deb depends on libvirt" has "$(dpkg-deb -f "$deb_host" Depends)" 'libvirt0'
check "host .deb recommends what verify-image boots guests with" has "$(dpkg-deb -f "$deb_host" Recommends)" 'libvirt-daemon-system'

# The scriptlets, run: each x86_64 package goes through install, upgrade (release
# 1 to 2), downgrade (2 to 1), the administrator's enable or disable, a second
# upgrade, and removal (and purge, for a .deb) in a scratch root: one per
# format, each a copy of the cached debootstrapped bookworm. rpm --root and
# dpkg --root run the scriptlets chrooted into it, where systemctl edits the
# root's links and skips start/stop (no systemd runs there); after each step
# `systemctl --root` says whether the unit is enabled. Release 2 is this tree
# repackaged (cargo-deb --deb-revision, cargo-generate-rpm -s release).
tools=$CACHE/bin guest_target=x86_64-unknown-linux-gnu
rpm_flags=(--dbpath /var/lib/rpm --nodeps)
# Debian's rpm refuses to install without it.
rpm --help 2>/dev/null | grep -q -- --force-debian && rpm_flags+=(--force-debian)
host_units_before=$(find /etc/systemd/system -name 'vmplug-*' 2>/dev/null | sort)

# rel2: release 2 of the guest and the host packages into $tmp/rel2; and into
# $tmp/rel0 a guest .rpm with 0.1.0-1's scriptlets, whose %preun disabled the
# agent on every upgrade, even the one away from it.
rel2() (
  mkdir -p "$tmp/rel2" && cd "$repo" \
    && "$tools/cargo-deb" -q -p vmplug-guest --no-build --target "$guest_target" --deb-revision 2 -o "$tmp/rel2/" >/dev/null \
    && "$tools/cargo-deb" -q -p vmplug --no-build --deb-revision 2 -o "$tmp/rel2/" >/dev/null \
    && "$tools/cargo-generate-rpm" -p guest-agent --target "$guest_target" -s 'release = "2"' -o "$tmp/rel2/" \
    && "$tools/cargo-generate-rpm" -p host-agent -s 'release = "2"' -o "$tmp/rel2/" \
    && mkdir -p "$tmp/rel0" && "$tools/cargo-generate-rpm" -p guest-agent --target "$guest_target" -o "$tmp/rel0/" \
      -s 'release = "0"' -s 'pre_install_script = ":"' -s 'post_uninstall_script = ":"' -s 'post_trans_script = ":"' \
      -s 'post_install_script = "systemctl daemon-reload >/dev/null 2>&1 || :; systemctl enable --now vmplug-guest.service >/dev/null 2>&1 || :"' \
      -s 'pre_uninstall_script = "systemctl disable --now vmplug-guest.service >/dev/null 2>&1 || :"'
)
# The roots (270 MB each) go to a tmpfs when one has room: removing a tree is
# slow on a file system mounted with discard.
if [ "$(df --output=avail -k /dev/shm 2>/dev/null | tail -1)" -gt 2000000 ] 2>/dev/null; then
  roots=$(mktemp -d -p /dev/shm vmplug-check.XXXXXX)
else
  roots=$tmp/roots
fi
trap 'rm -rf "$tmp" "$roots"' EXIT
new_root() { # NAME: a copy of the debootstrapped bookworm at $roots/NAME
  rm -rf "${roots:?}/$1" && mkdir -p "$roots" && cp -a "$ROOTFS_BOOKWORM" "$roots/$1"
}
state() { # ROOT UNIT: enabled, disabled, masked..., or not-found (no unit file)
  local s
  s=$(systemctl --root="$1" is-enabled "$2" 2>/dev/null) || true
  echo "${s:-not-found}"
}
expect() { # STEP ROOT UNIT STATE...: after STEP, UNIT in ROOT is one of STATE
  local s
  s=$(state "$2" "$3")
  if [[ " ${*:4} " == *" $s "* ]]; then pass=$((pass + 1)); else fail=$((fail + 1)); echo "FAIL: after $1, $3 is $s (expected ${*:4})"; fi
}
no_links() { # STEP ROOT UNIT: after STEP no link to UNIT is left in ROOT's /etc
  check "after $1, no link to $3 is left" test -z "$(find "$2/etc/systemd/system" -name "$3" 2>/dev/null)"
}
step() { # STEP COMMAND...: a package manager step; it and its scriptlets must succeed
  local what=$1 out
  shift
  if out=$("$@" 2>&1) && ! grep -qiE 'scriptlet failed|error exit status|warning: %' <<<"$out"; then
    pass=$((pass + 1))
  else
    fail=$((fail + 1)); echo "FAIL: $what"; tail -5 <<<"$out" | sed 's/^/    /'
  fi
}

# Where systemctl is missing (a container without systemd) or fails (systemd not
# PID 1), every scriptlet still succeeds, whatever its $1.
mkdir -p "$tmp/no-systemctl" "$tmp/failing-systemctl"
printf '#!/bin/sh\nexit 1\n' >"$tmp/failing-systemctl/systemctl" && chmod +x "$tmp/failing-systemctl/systemctl"
for p in "$dir"/vmplug-guest-*.x86_64.rpm "$rpm_host"; do
  tags="POSTIN PREUN POSTUN"
  [[ $p == */vmplug-guest-* ]] && tags="PREIN $tags POSTTRANS"
  for tag in $tags; do
    script=$(rpm -qp --qf "%{$tag}" "$p" 2>/dev/null)
    check "$(basename "$p") has a %$tag scriptlet" test "$script" != "(none)"
    for bin in no-systemctl failing-systemctl; do
      check "$(basename "$p") %$tag succeeds with $bin" sh -c "for n in 0 1 2; do PATH='$tmp/$bin' /bin/sh -c \"\$1\" sh \$n || exit 1; done" sh "$script"
    done
  done
done

rpm_lifecycle() { # ROOT RPM1 RPM2 UNIT INSTALLED: INSTALLED is the state install leaves
  local r=$1 v1=$2 v2=$3 unit=$4 installed=$5 other
  other=enabled; [ "$installed" != enabled ] || other=disabled
  step "rpm -i $(basename "$v1")" rpm --root "$r" "${rpm_flags[@]}" -i "$v1"
  expect "rpm -i" "$r" "$unit" "$installed"
  step "rpm -U $(basename "$v2")" rpm --root "$r" "${rpm_flags[@]}" -U "$v2"
  expect "rpm -U (1 to 2)" "$r" "$unit" "$installed"
  step "rpm -U --oldpackage $(basename "$v1")" rpm --root "$r" "${rpm_flags[@]}" -U --oldpackage "$v1"
  expect "rpm -U --oldpackage (2 to 1)" "$r" "$unit" "$installed"
  # The administrator's choice outlives an upgrade.
  systemctl --root="$r" --quiet "${other%d}" "$unit" 2>/dev/null
  expect "systemctl ${other%d}" "$r" "$unit" "$other"
  step "rpm -U $(basename "$v2") (after systemctl ${other%d})" rpm --root "$r" "${rpm_flags[@]}" -U "$v2"
  expect "rpm -U (1 to 2) after systemctl ${other%d}" "$r" "$unit" "$other"
  step "rpm -e $unit" rpm --root "$r" "${rpm_flags[@]}" -e "$(rpm -qp --qf '%{NAME}' "$v2" 2>/dev/null)"
  expect "rpm -e" "$r" "$unit" not-found
  no_links "rpm -e" "$r" "$unit"
}
deb_lifecycle() { # ROOT DEB1 DEB2 UNIT INSTALLED
  local r=$1 v1=$2 v2=$3 unit=$4 installed=$5 other pkg
  other=enabled; [ "$installed" != enabled ] || other=disabled
  pkg=$(dpkg-deb -f "$v1" Package)
  step "dpkg -i $(basename "$v1")" dpkg --root="$r" --force-depends -i "$v1"
  expect "dpkg -i" "$r" "$unit" "$installed"
  step "dpkg -i $(basename "$v2")" dpkg --root="$r" --force-depends -i "$v2"
  expect "dpkg -i (1 to 2)" "$r" "$unit" "$installed"
  step "dpkg -i $(basename "$v1") (downgrade)" dpkg --root="$r" --force-depends -i "$v1"
  expect "dpkg -i (2 to 1)" "$r" "$unit" "$installed"
  systemctl --root="$r" --quiet "${other%d}" "$unit" 2>/dev/null
  expect "systemctl ${other%d}" "$r" "$unit" "$other"
  step "dpkg -i $(basename "$v2") (after systemctl ${other%d})" dpkg --root="$r" --force-depends -i "$v2"
  expect "dpkg -i (1 to 2) after systemctl ${other%d}" "$r" "$unit" "$other"
  step "dpkg -r $pkg" dpkg --root="$r" --force-depends -r "$pkg"
  # Debian keeps a removed package's links for a reinstall and masks the unit
  # until then (deb-systemd-helper mask); purge removes both.
  expect "dpkg -r" "$r" "$unit" masked not-found
  step "dpkg --purge $pkg" dpkg --root="$r" --force-depends --purge "$pkg"
  expect "dpkg --purge" "$r" "$unit" not-found
  no_links "dpkg --purge" "$r" "$unit"
  check "after dpkg --purge, deb-systemd-helper forgot $unit" test -z "$(find "$r/var/lib/systemd/deb-systemd-helper-enabled" "$r/var/lib/systemd/deb-systemd-helper-masked" -name "$unit*" 2>/dev/null)"
}

# The tools a distribution's packager and an operator lint with, on every
# package, unit, udev rule and man page; each must pass. A tag that remains is
# overridden in the package with its reason: debian/lintian-overrides (shipped
# in /usr/share/lintian/overrides/) and the rpmlintrc beside each Cargo.toml.
# Each tool's last words are kept for the summary at the end.
summary=()
tool() { # DESCRIPTION SUMMARY-LINE-PATTERN COMMAND...: passes when COMMAND does
  local what=$1 pat=$2 out rc
  shift 2
  out=$("$@" 2>&1); rc=$?
  out=$(grep -v 'running with root privileges is not recommended' <<<"$out")
  if [ "$rc" -eq 0 ]; then pass=$((pass + 1)); else fail=$((fail + 1)); echo "FAIL: $what (exit $rc)"; tail -25 <<<"$out" | sed 's/^/    /'; fi
  [ -z "$pat" ] || summary+=("$what: $(grep -E "$pat" <<<"$out" | tail -1)")
}
# lintian: every tag, informational and pedantic ones included, fails.
lint_debs() { # DEB OVERRIDES
  local out
  out=$(lintian --display-info --pedantic --fail-on error,warning,info,pedantic "$1" 2>&1) || { echo "$out"; return 1; }
  echo "$out"
  echo "$(grep -c '^[EWIPX]: ' <<<"$out") tags, $(grep -c '^[a-z]' "$2") overridden"
}
for d in "$dir"/*.deb; do
  case $(basename "$d") in vmplug-guest_*) o=$repo/guest-agent/debian/lintian-overrides ;; *) o=$repo/host-agent/debian/lintian-overrides ;; esac
  tool "lintian $(basename "$d")" ' tags, ' lint_debs "$d" "$o"
done
# rpmlint: no error and no warning left after the package's filters.
lint_rpm() { # RPM RPMLINTRC...: rpmlint reads one rpmlintrc (the last -r), so they are joined
  local out rpm=$1
  shift
  cat "$@" >"$tmp/rpmlintrc"
  out=$(rpmlint -r "$tmp/rpmlintrc" "$rpm" 2>&1)
  echo "$out"
  grep -qE ' 0 errors, 0 warnings' <<<"$out"
}
for r in "$dir"/*.rpm; do
  case $(basename "$r") in
    vmplug-guest-*.aarch64.rpm) rc_files=("$repo/guest-agent/vmplug-guest.rpmlintrc" "$repo/guest-agent/vmplug-guest.aarch64.rpmlintrc") ;;
    vmplug-guest-*) rc_files=("$repo/guest-agent/vmplug-guest.rpmlintrc") ;;
    *) rc_files=("$repo/host-agent/vmplug.rpmlintrc") ;;
  esac
  tool "rpmlint $(basename "$r")" 'packages and .* specfiles checked' lint_rpm "$r" "${rc_files[@]}"
done
# The units, installed by their .debs into a copy of the debootstrapped bookworm
# (where every unit they name exists): systemd-analyze verify, and security
# --offline, whose exposure must stay at or below each unit's bound.
units_root() {
  rootfs_bookworm && new_root units && dpkg --root="$roots/units" --force-depends -i "$deb_host" "$(ls "$dir"/vmplug-guest_*_amd64.deb)" >/dev/null 2>&1
}
exposure() { # UNIT MAX
  local out score
  out=$(systemd-analyze security --offline=true --root="$roots/units" "$1" 2>&1) || { echo "$out"; return 1; }
  score=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' <<<"$out")
  echo "$1: $score (at most $2)"
  awk -v s="$score" -v m="$2" 'BEGIN { exit !(s != "" && s <= m) }'
}
verify_unit() { # UNIT: with the root's man pages, so Documentation=man: is checked too
  MANPATH="$roots/units/usr/share/man" systemd-analyze verify --root="$roots/units" "$1"
}
if units_root; then
  for u in vmplug-autoscale.service vmplug-guest.service; do
    tool "systemd-analyze verify $u" '' verify_unit "$u"
  done
  tool "systemd-analyze security vmplug-autoscale.service" 'at most' exposure vmplug-autoscale.service 3.0
  tool "systemd-analyze security vmplug-guest.service" 'at most' exposure vmplug-guest.service 2.5
else
  fail=$((fail + 1)); echo "FAIL: no scratch root to install the units in"
fi
# mandoc -T lint: not one message, style ones included, on every page shipped.
rm -rf "$tmp/man" && mkdir -p "$tmp/man"
dpkg-deb -x "$(ls "$dir"/vmplug-guest_*_amd64.deb)" "$tmp/man"
dpkg-deb -x "$deb_host" "$tmp/man"
lint_man() {
  local out f n=0
  for f in "$tmp"/man/usr/share/man/man*/*.gz; do
    out+=$(gzip -dc "$f" | mandoc -T lint -W style 2>&1 | sed "s|<stdin>|$(basename "$f")|")$'\n'

    n=$((n + 1))
  done
  [ -z "${out//$'\n'/}" ] || { echo "$out"; return 1; }
  echo "$n pages, no message"
}
tool "mandoc -T lint" 'pages, no message' lint_man

if rootfs_bookworm && rel2; then
  rpm1_guest=$(ls "$dir"/vmplug-guest-*.x86_64.rpm) rpm2_guest=$(ls "$tmp"/rel2/vmplug-guest-*.x86_64.rpm)
  rpm2_host=$(ls "$tmp"/rel2/vmplug-[0-9]*.rpm) rpm0_guest=$(ls "$tmp"/rel0/vmplug-guest-*.x86_64.rpm)
  deb1_guest=$(ls "$dir"/vmplug-guest_*_amd64.deb) deb2_guest=$(ls "$tmp"/rel2/vmplug-guest_*_amd64.deb)
  deb2_host=$(ls "$tmp"/rel2/vmplug_*.deb)
  # rpm: first the host, under Debian's presets (no default: its own preset must
  # keep it disabled); then the guest, under openEuler's and Fedora's
  # (99-default-disable.preset: what is not named is disabled).
  new_root rpm-root
  rpm --root "$roots/rpm-root" --dbpath /var/lib/rpm --initdb
  rpm_lifecycle "$roots/rpm-root" "$rpm_host" "$rpm2_host" vmplug-autoscale.service disabled
  echo 'disable *' >"$roots/rpm-root/usr/lib/systemd/system-preset/99-default-disable.preset"
  rpm_lifecycle "$roots/rpm-root" "$rpm1_guest" "$rpm2_guest" vmplug-guest.service enabled
  # An upgrade from 0.1.0-1's package (%preun: disable --now) leaves the agent enabled.
  step "rpm -i $(basename "$rpm0_guest")" rpm --root "$roots/rpm-root" "${rpm_flags[@]}" -i "$rpm0_guest"
  expect "rpm -i (release 0)" "$roots/rpm-root" vmplug-guest.service enabled
  step "rpm -U $(basename "$rpm1_guest") (from release 0)" rpm --root "$roots/rpm-root" "${rpm_flags[@]}" -U "$rpm1_guest"
  expect "rpm -U (0 to 1)" "$roots/rpm-root" vmplug-guest.service enabled
  check "after rpm -U (0 to 1), %posttrans left no state" test ! -e "$roots/rpm-root/var/lib/rpm-state/vmplug-guest"
  step "rpm -e vmplug-guest" rpm --root "$roots/rpm-root" "${rpm_flags[@]}" -e vmplug-guest
  expect "rpm -e" "$roots/rpm-root" vmplug-guest.service not-found
  new_root deb-root
  deb_lifecycle "$roots/deb-root" "$deb1_guest" "$deb2_guest" vmplug-guest.service enabled
  deb_lifecycle "$roots/deb-root" "$deb_host" "$deb2_host" vmplug-autoscale.service disabled
  check "the scriptlets left this machine's own units alone" test "$(find /etc/systemd/system -name 'vmplug-*' 2>/dev/null | sort)" = "$host_units_before"
  check "the scriptlets left this machine's rpm-state alone" test ! -e /var/lib/rpm-state/vmplug-guest
else
  fail=$((fail + 1)); echo "FAIL: no scratch root or no release 2 to run the scriptlets with"
fi

printf '%s\n' "${summary[@]}"
echo "packages: $pass passed, $fail failed (${SECONDS}s)"
[ "$fail" -eq 0 ]
