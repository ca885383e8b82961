# Sourced by the scripts that fill vmplug's cache ($VMPLUG_CACHE). Three rules
# hold for every artefact in it (kernel, rootfs, images, tools):
#   - it is built under an exclusive lock of its own, so a second builder waits
#     for the first and then reuses its result;
#   - it is built into a private temporary path next to it and renamed into
#     place, so a half-built artefact (a killed run) is never taken as finished;
#   - every network step is retried with back-off, then fails naming the step.
# shellcheck shell=bash

CACHE=${VMPLUG_CACHE:-/var/tmp/vmplug-cache}
mkdir -p "$CACHE/.locks"

log() { printf '%s: %s\n' "${LOG_TAG:-vmplug}" "$*" >&2; }

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
  local path=$1 builder=$2
  shift 2
  local rel=${path#"$CACHE"/}
  local lock="$CACHE/.locks/${rel//\//_}.lock"
  local dir base tmp rc fd
  dir=$(dirname "$path") base=$(basename "$path")
  mkdir -p "$dir"
  exec {fd}>"$lock"
  if ! flock -n "$fd"; then
    log "waiting for another builder of $rel"
    flock "$fd"
  fi
  if [ -e "$path" ]; then
    exec {fd}>&-
    return 0
  fi
  # Only the lock holder builds, so any temporary path left here is a dead run's.
  rm -rf "$dir/.$base.tmp."*
  tmp="$dir/.$base.tmp.$$"
  local errexit=0
  case $- in *e*) errexit=1 ;; esac
  set +e
  (set -e; "$builder" "$tmp" "$@")
  rc=$?
  [ "$errexit" = 0 ] || set -e
  if [ "$rc" -eq 0 ] && [ -e "$tmp" ]; then
    mv -T "$tmp" "$path" || rc=$?
  elif [ "$rc" -eq 0 ]; then
    log "building $rel produced nothing"
    rc=1
  fi
  [ "$rc" -eq 0 ] || rm -rf "$tmp"
  exec {fd}>&-
  return "$rc"
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

# apt-get with retries of every download and a wait (not a failure) on apt's
# locks while another apt client (or a concurrent setup) holds them.
apt_get() {
  apt-get -o Acquire::Retries=3 -o DPkg::Lock::Timeout=600 "$@"
}

# cargo_tool TMP CRATE: `cargo install CRATE` (locked versions first), retried;
# TMP becomes the installed binary.
cargo_tool() {
  local tmp=$1 crate=$2
  retry "cargo install $crate" cargo_install_once "$tmp.root" "$crate" || { rm -rf "$tmp.root"; return 1; }
  mv "$tmp.root/bin/$crate" "$tmp" && rm -rf "$tmp.root"
}

cargo_install_once() {
  local root=$1 crate=$2 logf="$CACHE/$2-build.log"
  rm -rf "$root"
  cargo install --quiet --locked --root "$root" "$crate" >"$logf" 2>&1 \
    || cargo install --quiet --root "$root" "$crate" >>"$logf" 2>&1 \
    || { tail -20 "$logf" >&2; return 1; }
}
