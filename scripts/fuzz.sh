#!/usr/bin/env bash
# Runs each cargo-fuzz target for a bounded time and reports its executions (docs/reliability.md,
# "Fuzzing").
#   scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 60)
# Needs cargo-fuzz (`cargo install cargo-fuzz`). It uses the nightly toolchain when one is
# installed; with only a stable toolchain the nightly-only flags cargo-fuzz passes are unlocked
# with RUSTC_BOOTSTRAP=1. The targets are safe Rust, so they run without a sanitizer
# (--sanitizer none): faster, and a panic is the finding.
# A crash leaves its input in fuzz/artifacts/<target>/ and makes this script exit 1.
set -uo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  toolchain=(+nightly)
else
  export RUSTC_BOOTSTRAP=1
fi
targets=(spend_record proxy_config lago_answer)
status=0
summary=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  # Work on a scratch copy of the seed corpus so the committed seeds stay small.
  work=$(mktemp -d)
  cp -r "corpus/$t/." "$work/"
  log=$(mktemp)
  cargo "${toolchain[@]}" fuzz run --sanitizer none "$t" "$work" -- -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 \
    -artifact_prefix="artifacts/$t/" >"$log" 2>&1
  rc=$?
  # libFuzzer's last status line: "#123456 DONE cov: ... exec/s: ..." (or the last "#N" line).
  execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
  rate=$(grep -oE 'exec/s: [0-9]+' "$log" | tail -1 | awk '{print $2}')
  if [[ $rc -ne 0 && -z "$execs" ]]; then
    status=1
    summary+=("$t: did not run (exit $rc); log: $log")
    tail -40 "$log" >&2
  elif [[ $rc -ne 0 ]]; then
    status=1
    summary+=("$t: CRASH after ${execs:-?} executions (exit $rc); input in fuzz/artifacts/$t/; log: $log")
    tail -40 "$log" >&2
  else
    summary+=("$t: ${execs:-0} executions in ${secs}s (${rate:-?} exec/s), no crash")
    rm -f "$log"
  fi
  rm -rf "$work"
done
printf '%s\n' "${summary[@]}"
exit $status
