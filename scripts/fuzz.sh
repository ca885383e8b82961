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
SECONDS_EACH=${FUZZ_SECONDS:-300}
# Per-input limits: inputs up to a whole frame (256 KiB + newline); an input
# slower than TIMEOUT seconds is a finding (libFuzzer stops with a "timeout"),
# and every input slower than SLOW seconds is counted and reported.
MAX_LEN=262145
TIMEOUT=${FUZZ_TIMEOUT:-10}
SLOW=${FUZZ_SLOW:-1}
TARGETS=${FUZZ_TARGETS:-"guest_request host_response uevent cpulist"}

LOG_TAG=fuzz
. scripts/lib.sh
artefact "$CACHE/bin/cargo-fuzz" cargo_tool cargo-fuzz
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
    -max_total_time="$SECONDS_EACH" -print_final_stats=1 -max_len="$MAX_LEN" \
    -timeout="$TIMEOUT" -report_slow_units="$SLOW" >"$log" 2>&1
  rc=$?
  set -e
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  corpus=$(find "corpus/$t" -type f | wc -l)
  slow=$(grep -c '^Slowest unit:' "$log" || true)
  verdict=clean
  if [ "$rc" -ne 0 ]; then
    verdict="CRASH (rc $rc, see fuzz/artifacts/$t)"
    failed=1
    tail -40 "$log" >&2
  fi
  rm -f "$log"
  printf 'fuzz %-14s %10s executions in %ss, corpus %s, %s slow (>%ss), %s\n' \
    "$t" "${execs:-?}" "$SECONDS_EACH" "$corpus" "$slow" "$SLOW" "$verdict"
  rows+="| \`$t\` | ${execs:-?} | $SECONDS_EACH | $corpus | $slow | $verdict |"$'\n'
  json+="${json:+,}{\"target\":\"$t\",\"executions\":${execs:-0},\"seconds\":$SECONDS_EACH,\"corpus\":$corpus,\"slow_inputs\":$slow,\"clean\":$([ "$verdict" = clean ] && echo true || echo false)}"
done
{
  echo "# Fuzz campaign"
  echo
  echo "Run on $(date -u +%Y-%m-%d) with \`make fuzz FUZZ_SECONDS=$SECONDS_EACH\` ($toolchain, libFuzzer, one core)."
  echo "Inputs up to $MAX_LEN bytes (a whole frame), per-input timeout ${TIMEOUT} s; \"slow\" counts inputs over ${SLOW} s."
  echo
  echo "| target | executions | seconds | corpus files | slow inputs | result |"
  echo "|---|---:|---:|---:|---:|---|"
  printf '%s' "$rows"
} >../results/fuzz.md
echo "{\"date\":\"$(date -u +%Y-%m-%d)\",\"targets\":[$json]}" >../results/fuzz.json
echo "fuzz: wrote results/fuzz.md"
exit $failed
