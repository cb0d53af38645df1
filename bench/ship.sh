#!/usr/bin/env bash
# Shipper benchmark (not a test). Rerunnable; results go to stdout as JSON lines and are recorded
# by hand in docs/benchmarks.md ("## Shipper").
#   bench/ship.sh [LINES]   (default 1000000; each measure runs for UUIDv7 and for uuid4 ids)
# Needs: cargo, python3 (the stand-in Lago of one run). Uses its own scratch directory under ${TMPDIR:-/tmp}; talks to 127.0.0.1 only.
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

for IDS in v7 v4; do
  echo "==> ids $IDS: generating a $LINES-line spend log" >&2
  LOG="$WORK/spend-$IDS.jsonl"
  "$TARGET/release/examples/gen_spend_log" "$LOG" "$LINES" --ids "$IDS"

  echo "==> ids $IDS: parse only" >&2
  "$BENCH" parse-only "$LOG"
  echo "==> ids $IDS: ingest: tailer -> parse -> outbox (no sending)" >&2
  "$BENCH" ingest "$LOG" "$WORK/ingest-state"
  rm -rf "$WORK/ingest-state"
  echo "==> ids $IDS: tally replay into an empty outbox" >&2
  "$BENCH" replay "$TALLY" "$LOG" "$WORK/replay-state"
  rm -rf "$WORK/replay-state"
  echo "==> ids $IDS: tally replay --ship into an empty outbox, to tally's Lago emulator" >&2
  "$BENCH" replay-ship "$TALLY" "$LOG" "$WORK/replay-state"
  rm -rf "$WORK/replay-state"
  echo "==> ids $IDS: end to end: tally ship -> tally's Lago emulator" >&2
  "$BENCH" deliver "$TALLY" "$LOG" "$WORK/deliver-state"
  rm -rf "$WORK/deliver-state"
  echo "==> ids $IDS: end to end: tally ship -> a small Python server (bench/lago_sink.py)" >&2
  python3 bench/lago_sink.py "$WORK/sink.port" 2>/dev/null &
  SINK=$!
  while [ ! -s "$WORK/sink.port" ]; do sleep 0.1; done
  "$BENCH" deliver-to "http://127.0.0.1:$(cat "$WORK/sink.port")" "$TALLY" "$LOG" "$WORK/sink-state"
  kill "$SINK"; wait "$SINK" 2>/dev/null || true
  rm -rf "$WORK/sink-state" "$WORK/sink.port"
  echo "==> ids $IDS: disk per acked id (outbox ingest + ack of $LINES events)" >&2
  "$BENCH" acked-disk "$LINES" "$WORK/disk-state" "$IDS"
  rm -rf "$WORK/disk-state"
  rm -f "$LOG"
done

echo "==> latency at 1,000 lines/s for 30 s" >&2
"$BENCH" latency "$TALLY" "$WORK/latency" 1000 30
