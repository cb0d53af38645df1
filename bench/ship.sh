#!/usr/bin/env bash
# Shipper benchmark (not a test). Rerunnable; results go to stdout as JSON lines and are recorded
# by hand in docs/benchmarks.md ("## Shipper").
#   bench/ship.sh [LINES]   (default 1000000)
# Needs: cargo. Uses its own scratch directory under ${TMPDIR:-/tmp}; talks to 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
LINES=${1:-1000000}
TARGET=${CARGO_TARGET_DIR:-target}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tally-ship-bench.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

echo "==> building (release)" >&2
cargo build --release --quiet --bins --examples
BENCH="$TARGET/release/examples/ship_bench"
TALLY="$TARGET/release/tally"

echo "==> machine" >&2
echo "{\"measure\":\"machine\",\"cpus\":$(nproc),\"model\":\"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\",\"mem_mib\":$(free -m | awk '/Mem:/{print $2}'),\"load_avg\":\"$(cut -d' ' -f1-3 /proc/loadavg)\"}"

echo "==> generating a $LINES-line spend log" >&2
"$TARGET/release/examples/gen_spend_log" "$WORK/spend.jsonl" "$LINES"

echo "==> parse only" >&2
"$BENCH" parse-only "$WORK/spend.jsonl"
echo "==> ingest: tailer -> parse -> outbox (no sending)" >&2
"$BENCH" ingest "$WORK/spend.jsonl" "$WORK/ingest-state"
rm -rf "$WORK/ingest-state"
echo "==> end to end: tally ship -> Lago emulator" >&2
"$BENCH" deliver "$TALLY" "$WORK/spend.jsonl" "$WORK/deliver-state"
rm -rf "$WORK/deliver-state"
echo "==> end to end, a 100,000-line log (RSS should not depend on the log size)" >&2
head -n 100000 "$WORK/spend.jsonl" > "$WORK/small.jsonl"
"$BENCH" deliver "$TALLY" "$WORK/small.jsonl" "$WORK/small-state"
echo "==> latency at 1,000 lines/s for 30 s" >&2
"$BENCH" latency "$TALLY" "$WORK/latency" 1000 30
