# Sourced by the scripts that fill vmplug's cache ($VMPLUG_CACHE). Three rules
# hold for every artefact in it (kernel, rootfs, images, tools):
#   - it is built under an exclusive lock of its own, so a second builder waits
#     for the first and then reuses its result;
#   - it is built into a private temporary path next to it and renamed into
#     place, so a half-built artefact (a killed run) is never taken as finished;
#   - every network step is retried with back-off, then fails naming the step.
# shellcheck shell=bash

CACHE=${VMPLUG_CACHE:-/var/tmp/vmplug-cache}

log() { printf '%s: %s\n' "${LOG_TAG:-vmplug}" "$*" >&2; }

# private_dir DIR: makes sure DIR is a directory that only this user controls,
# because what is in it is run as root (tools in $CACHE/bin) or booted: created
# mode 0755 when missing; refused when it is a symbolic link, is owned by
# another user, or may be written by its group or others (under /var/tmp any
# local user could otherwise create it first and plant a tool in it). The
# parents must be owned by root or this user and, if others may write them,
# sticky (as /var/tmp is).
private_dir() {
  local dir=$1 me p owner mode
  me=$(id -u)
  case $dir in /*) ;; *) dir="$PWD/$dir" ;; esac
  if [ ! -e "$dir" ] && [ ! -L "$dir" ]; then
    p=$(dirname "$dir")
    [ -d "$p" ] || private_dir "$p" || return 1
    (umask 022 && mkdir "$dir") || { log "cannot create $dir"; return 1; }
  fi
  if [ -L "$dir" ] || [ ! -d "$dir" ]; then
    log "refusing $dir: it is a symbolic link or not a directory; remove it or set VMPLUG_CACHE to another path"
    return 1
  fi
  read -r owner mode < <(stat -c '%u %a' "$dir")
  if [ "$owner" != "$me" ] || [ $((8#$mode & 8#022)) -ne 0 ]; then
    log "refusing $dir: owned by uid $owner (this is uid $me), mode $mode; only a directory of this user that nobody else may write is trusted; remove it or set VMPLUG_CACHE to another path"
    return 1
  fi
  p=$dir
  while [ "$p" != / ]; do
    p=$(dirname "$p")
    read -r owner mode < <(stat -L -c '%u %a' "$p")
    if { [ "$owner" != 0 ] && [ "$owner" != "$me" ]; } || { [ $((8#$mode & 8#022)) -ne 0 ] && [ $((8#$mode & 8#1000)) -eq 0 ]; }; then
      log "refusing $dir: its parent $p (uid $owner, mode $mode) lets another user replace it"
      return 1
    fi
  done
}

private_dir "$CACHE" || exit 1
mkdir -p "$CACHE/.locks"

# retry STEP CMD...: runs CMD up to $VMPLUG_RETRIES times (default 4), waiting
# 2, 4, 8 s between attempts; then fails with a message that names STEP.
retry() {
  local step=$1 attempt=1 delay=2 max=${VMPLUG_RETRIES:-4}
  shift
  until "$@"; do
    if [ "$attempt" -ge "$max" ]; then
      log "$step: failed after $attempt attempts"
      return 1
    fi
    log "$step: attempt $attempt of $max failed; retrying in ${delay}s"
    sleep "$delay"
    attempt=$((attempt + 1)) delay=$((delay * 2))
  done
}

# artefact PATH BUILDER [ARGS...]: makes sure PATH (a file or a directory) exists.
# Under an exclusive lock on $CACHE/.locks/<PATH relative to the cache>.lock it
# returns at once if PATH exists; otherwise it removes what killed runs left
# behind, runs `BUILDER TMP ARGS...` in a subshell with `set -e` (so BUILDER may
# be written as a plain script; it must create TMP, on the same file system as
# PATH) and renames TMP to PATH. BUILDER's failure leaves nothing behind.
artefact() {
  # Builders run inside this function and bash scopes variables dynamically: its
  # locals carry a prefix no builder uses, so they never shadow the caller's.
  local _art_path=$1 _art_builder=$2
  shift 2
  local _art_rel=${_art_path#"$CACHE"/}
  local _art_lock="$CACHE/.locks/${_art_rel//\//_}.lock"
  local _art_dir _art_name _art_tmp _art_rc _art_fd _art_errexit=0
  _art_dir=$(dirname "$_art_path") _art_name=$(basename "$_art_path")
  mkdir -p "$_art_dir"
  exec {_art_fd}>"$_art_lock"
  if ! flock -n "$_art_fd"; then
    log "waiting for another builder of $_art_rel"
    flock "$_art_fd"
  fi
  if [ -e "$_art_path" ]; then
    exec {_art_fd}>&-
    return 0
  fi
  # Only the lock holder builds, so any temporary path left here is a dead run's.
  rm -rf "$_art_dir/.$_art_name.tmp."*
  _art_tmp="$_art_dir/.$_art_name.tmp.$$"
  case $- in *e*) _art_errexit=1 ;; esac
  set +e
  (set -e; "$_art_builder" "$_art_tmp" "$@")
  _art_rc=$?
  [ "$_art_errexit" = 0 ] || set -e
  if [ "$_art_rc" -eq 0 ] && [ -e "$_art_tmp" ]; then
    mv -T "$_art_tmp" "$_art_path" || _art_rc=$?
  elif [ "$_art_rc" -eq 0 ]; then
    log "building $_art_rel produced nothing"
    _art_rc=1
  fi
  [ "$_art_rc" -eq 0 ] || rm -rf "$_art_tmp" "$_art_tmp".*
  exec {_art_fd}>&-
  return "$_art_rc"
}

# The Debian mirror and keyring of the machine's own apt sources (deb822 or
# one-line format): the first entry for the running suite. Prints "URI KEYRING".
debian_mirror() {
  local codename uri="" keyring=""
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  if compgen -G '/etc/apt/sources.list.d/*.sources' >/dev/null; then
    read -r uri keyring < <(awk -v suite="$codename" '
      function flush() { if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && uris != "" && !found) { print uris, signed; found = 1 } types = suites = uris = signed = "" }
      /^[ \t]*$/ { flush(); next }
      /^Types:/ { sub(/^Types:[ \t]*/, ""); types = $0 }
      /^Suites:/ { sub(/^Suites:[ \t]*/, ""); suites = $0 }
      /^URIs:/ { sub(/^URIs:[ \t]*/, ""); split($0, u, /[ \t]+/); uris = u[1] }
      /^Signed-By:/ { sub(/^Signed-By:[ \t]*/, ""); signed = $0 }
      END { flush() }' /etc/apt/sources.list.d/*.sources)
  fi
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(awk -v suite="$codename" '$1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } if ($(i + 1) == suite) { print $i; exit } }' /etc/apt/sources.list)
  fi
  if [ -z "$uri" ]; then
    log "no Debian mirror for $codename in /etc/apt/sources.list{,.d}: add one (as the machine's stock sources do)"
    return 1
  fi
  printf '%s %s\n' "$uri" "${keyring:-/usr/share/keyrings/debian-archive-keyring.gpg}"
}

# rootfs_bookworm: makes sure $ROOTFS_BOOKWORM exists, a debootstrapped Debian
# bookworm (minbase, systemd, udev, kmod; rpm for the guest image whose agent
# came as an .rpm; bc, which the kernel's mem-on-off-test.sh needs; about 90 s,
# once): the base of the systemd guest images
# (build-systemd-image.sh) and the root the packages' scriptlets run in
# (check-packages.sh). The name changes with the package list.
ROOTFS_BOOKWORM=$CACHE/rootfs-bookworm-v2
rootfs_bookworm() {
  artefact "$ROOTFS_BOOKWORM" build_rootfs_bookworm
}

build_rootfs_bookworm() {
  local tmp=$1 mirror keyring
  read -r mirror keyring < <(debian_mirror) || return 1
  log "debootstrap bookworm from $mirror (about 80 s, once)"
  retry "debootstrap bookworm" debootstrap_bookworm_once "$tmp" "$mirror"
}

debootstrap_bookworm_once() {
  local dir=$1 mirror=$2
  rm -rf "$dir"
  debootstrap --variant=minbase --include=systemd,systemd-sysv,udev,kmod,rpm,bc bookworm "$dir" "$mirror" \
    >"$CACHE/debootstrap.log" 2>&1 || { tail -20 "$CACHE/debootstrap.log" >&2; return 1; }
}

# apt-get with retries of every download and a wait (not a failure) on apt's
# locks while another apt client (or a concurrent setup) holds them.
apt_get() {
  apt-get -o Acquire::Retries=3 -o DPkg::Lock::Timeout=600 "$@"
}

# cargo_tool TMP CRATE [ARG...]: `cargo install CRATE ARG...` (locked versions
# first), retried; TMP becomes the installed binary. It builds in a target
# directory of its own (not $CARGO_TARGET_DIR), so it never waits on, or for,
# the workspace's builds.
cargo_tool() {
  local tmp=$1 crate=$2
  shift 2
  retry "cargo install $crate" cargo_install_once "$tmp.root" "$crate" "$@" || { rm -rf "$tmp.root" "$tmp.target"; return 1; }
  mv "$tmp.root/bin/$crate" "$tmp" && rm -rf "$tmp.root" "$tmp.target"
}

cargo_install_once() {
  local root=$1 crate=$2 logf="$CACHE/$2-build.log" target="${1%.root}.target"
  shift 2
  rm -rf "$root"
  cargo install --quiet --locked --root "$root" --target-dir "$target" "$crate" "$@" >"$logf" 2>&1 \
    || cargo install --quiet --root "$root" --target-dir "$target" "$crate" "$@" >>"$logf" 2>&1 \
    || { tail -20 "$logf" >&2; return 1; }
}
