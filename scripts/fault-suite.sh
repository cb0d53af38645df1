#!/usr/bin/env bash
# The full fault suite (docs/reliability.md), one command: the long variants of the reliability
# tests (50,000 records and 50 SIGKILLs of the shipper, 20 proxy SIGKILLs, one-minute Lago
# outages), the bad-input, disk and security tests, then a summary of their figures.
#   scripts/fault-suite.sh            # everything (≈ 10 minutes on 2 cores)
#   TALLY_FAULT_SEED=123 scripts/fault-suite.sh   # another kill schedule for the crash test
# The fast variants of the same tests run in CI with the rest of `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
export TALLY_FAULT_FULL=1
log=$(mktemp)
cargo build --quiet --bins
# One test at a time: the figures are cleaner on a quiet machine, and the outages last a minute each.
# The disk test mounts a loop filesystem (#[ignore]d unless run as root).
ignored=()
if [[ $(id -u) -eq 0 ]]; then ignored=(--include-ignored); fi
cargo test --quiet --test it -- --test-threads 1 --nocapture "${ignored[@]}" \
  bad_input reliability:: security \
  2>&1 | tee "$log" | grep -E 'FIGURE|SKIPPED|panicked|test result' || true
echo
echo "== figures"
grep -o 'FIGURE .*' "$log" || true
if grep -q 'test result: ok' "$log" && ! grep -q 'FAILED' "$log"; then
  echo "fault suite: all passed"
else
  echo "fault suite: FAILURES (full output: $log)" >&2
  exit 1
fi
