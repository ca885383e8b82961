#!/bin/bash
# A bounded cargo-fuzz campaign over every target in fuzz/, FUZZ_SECONDS each
# (default 300). Prints and records (results/fuzz.{md,json}) how many inputs each
# target executed and whether anything crashed; a crash fails the run and leaves
# its reproducer in fuzz/artifacts/TARGET/.
#
# cargo-fuzz needs nightly compiler flags: the `nightly` toolchain when rustup has
# one, else the stable compiler with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${VMPLUG_CACHE:-/var/tmp/vmplug-cache}
SECONDS_EACH=${FUZZ_SECONDS:-300}
TARGETS=${FUZZ_TARGETS:-"guest_request host_response uevent cpulist"}

if [ ! -x "$CACHE/bin/cargo-fuzz" ]; then
  echo "fuzz: installing cargo-fuzz into $CACHE (once)"
  cargo install --quiet --locked --root "$CACHE" cargo-fuzz >"$CACHE/cargo-fuzz-build.log" 2>&1 \
    || { cat "$CACHE/cargo-fuzz-build.log" >&2; exit 1; }
fi
if cargo +nightly --version >/dev/null 2>&1; then
  fuzz=(cargo +nightly fuzz)
  toolchain=$(rustc +nightly --version)
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
  toolchain="$(rustc --version) with RUSTC_BOOTSTRAP=1"
fi
export PATH="$CACHE/bin:$PATH"

cd fuzz
"${fuzz[@]}" build -O >/dev/null
mkdir -p ../results
rows="" json="" failed=0
for t in $TARGETS; do
  mkdir -p "corpus/$t"
  log=$(mktemp)
  set +e
  "${fuzz[@]}" run -O "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$SECONDS_EACH" -print_final_stats=1 -max_len=65536 >"$log" 2>&1
  rc=$?
  set -e
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  corpus=$(find "corpus/$t" -type f | wc -l)
  verdict=clean
  if [ "$rc" -ne 0 ]; then
    verdict="CRASH (rc $rc, see fuzz/artifacts/$t)"
    failed=1
    tail -40 "$log" >&2
  fi
  rm -f "$log"
  printf 'fuzz %-14s %10s executions in %ss, corpus %s, %s\n' "$t" "${execs:-?}" "$SECONDS_EACH" "$corpus" "$verdict"
  rows+="| \`$t\` | ${execs:-?} | $SECONDS_EACH | $corpus | $verdict |"$'\n'
  json+="${json:+,}{\"target\":\"$t\",\"executions\":${execs:-0},\"seconds\":$SECONDS_EACH,\"corpus\":$corpus,\"clean\":$([ "$verdict" = clean ] && echo true || echo false)}"
done
{
  echo "# Fuzz campaign"
  echo
  echo "Run on $(date -u +%Y-%m-%d) with \`make fuzz FUZZ_SECONDS=$SECONDS_EACH\` ($toolchain, libFuzzer, one core)."
  echo
  echo "| target | executions | seconds | corpus files | result |"
  echo "|---|---:|---:|---:|---|"
  printf '%s' "$rows"
} >../results/fuzz.md
echo "{\"date\":\"$(date -u +%Y-%m-%d)\",\"targets\":[$json]}" >../results/fuzz.json
echo "fuzz: wrote results/fuzz.md"
exit $failed
