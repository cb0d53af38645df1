#!/usr/bin/env bash
# tally vs LiteLLM, side by side: one run, the same machine, the same fixed-answer
# upstream, the same kind of Lago (tally's emulator), the same load. Not a test: a benchmark.
#
#   bench/vs-litellm.sh
#
# Installs LiteLLM's proxy from PyPI into bench/.venv-litellm (kept between runs), builds tally in
# release, runs everything on 127.0.0.1, measures, and writes the section "## tally vs LiteLLM" of
# docs/benchmarks.md (between its markers; replaced on every run). Every process it starts is
# stopped by PID when it exits. Takes about 5 minutes (under 10) once the venv and the build exist.
#
# Knobs (environment): DURATION (s per latency run, 10), RATE (requests/s during the outage
# phase, 20), LOAD_SECS (20), OUTAGE_SECS (5), RESEND_N (tally events in the resend phase, 1000),
# LITELLM_RESEND_N (50), LITELLM_VERSION (1.108.7), KEEP_WORK=1 keeps the scratch directory.
# Needs wrk (Debian: apt-get install -y wrk), curl, python3 (3.9+) with venv.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DURATION=${DURATION:-10}
RATE=${RATE:-20}
LOAD_SECS=${LOAD_SECS:-20}
OUTAGE_SECS=${OUTAGE_SECS:-5}
RESEND_N=${RESEND_N:-1000}
LITELLM_RESEND_N=${LITELLM_RESEND_N:-50}
LITELLM_VERSION=${LITELLM_VERSION:-1.108.7}
VENV="$ROOT/bench/.venv-litellm"
HERE="$ROOT/bench/vs-litellm"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
EVENT_CODE=llm_usage
COMMAND="bench/vs-litellm.sh"
[[ $DURATION != 10 || $RATE != 20 || $LOAD_SECS != 20 || $OUTAGE_SECS != 5 ]] &&
  COMMAND="DURATION=$DURATION RATE=$RATE LOAD_SECS=$LOAD_SECS OUTAGE_SECS=$OUTAGE_SECS $COMMAND"

for tool in wrk curl python3; do
  command -v "$tool" >/dev/null || { echo "vs-litellm: $tool is missing (Debian: apt-get install -y $tool)" >&2; exit 1; }
done
log() { printf '[vs-litellm %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
started=$(date +%s)

# ---------------------------------------------------------------- install and build
if [[ ! -x $VENV/bin/litellm ]] ||
  [[ $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))' 2>/dev/null) != "$LITELLM_VERSION" ]]; then
  log "installing litellm[proxy]==$LITELLM_VERSION into $VENV (first run: a few minutes)"
  python3 -m venv "$VENV"
  echo '*' >"$VENV/.gitignore" # the venv ignores itself: nothing of it is ever committed
  "$VENV/bin/pip" install --quiet "litellm[proxy]==$LITELLM_VERSION"
fi
litellm_version=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))')
python_version=$("$VENV/bin/python" -c 'import platform; print(platform.python_version())')

log "building tally (release)"
build_started=$(date +%s)
cargo build --release --quiet --bin tally --example proxy_upstream
build_seconds=$(($(date +%s) - build_started))
TALLY="$TARGET/release/tally"
UPSTREAM_BIN="$TARGET/release/examples/proxy_upstream"

# ---------------------------------------------------------------- processes, cleaned up by PID
work=$(mktemp -d)
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  if [[ ${KEEP_WORK:-0} == 1 ]]; then echo "scratch kept in $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Drops a reaped PID from the cleanup list, so a number the kernel reuses is never signalled.
forget() {
  local kept=() pid
  for pid in "${pids[@]}"; do [[ $pid == "$1" ]] || kept+=("$pid"); done
  pids=("${kept[@]}")
}
# Stops one process started here and waits for it (SIGTERM: the shipper commits and exits).
stop() {
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  forget "$pid"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# json FILE_OR_- EXPR: evaluates a Python expression over the parsed JSON `j`.
json() { python3 -c "import json,sys; j=json.load(open(sys.argv[1]) if sys.argv[1]!='-' else sys.stdin); print($2)" "$1"; }
results="$work/results.tsv"
: >"$results"
rec() { printf '%s\t%s\n' "$1" "$2" >>"$results"; }

wait_http() { # URL SECONDS WHAT
  local deadline=$((SECONDS + $2))
  until curl -fs -o /dev/null "$1"; do
    ((SECONDS < deadline)) || { echo "vs-litellm: $3 did not come up at $1 within $2 s" >&2; exit 1; }
    sleep 0.2
  done
}

# ---------------------------------------------------------------- upstream and three Lagos
"$UPSTREAM_BIN" 127.0.0.1:0 >"$work/upstream.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do grep -q '^listening on' "$work/upstream.log" && break; sleep 0.1; done
upstream=$(sed -n 's/^listening on //p' "$work/upstream.log")
[[ -n $upstream ]] || { echo "vs-litellm: the bench upstream did not start" >&2; cat "$work/upstream.log" >&2; exit 1; }

LAGO_KEY="lago-bench-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
start_lago() { # NAME STORE -> sets the variable NAME to its base URL
  "$TALLY" lago-emulator --port 0 --api-key "$LAGO_KEY" --store "$2" >"$work/$1.out" 2>"$work/$1.log" &
  pids+=($!)
  for _ in $(seq 300); do grep -q '^http' "$work/$1.out" && break; sleep 0.1; done
  local url
  url=$(grep -m1 '^http' "$work/$1.out")
  [[ -n $url ]] || { echo "vs-litellm: the Lago emulator $1 did not start" >&2; cat "$work/$1.log" >&2; exit 1; }
  printf -v "$1" '%s' "$url"
}
start_lago lago_tally postgres # tally ship's Lago
start_lago lago_lite postgres  # LiteLLM's Lago
start_lago lago_ch clickhouse  # the resend phase: always 200, so every duplicate is visible

counter() { curl -fs "$1/_emulator/counters" | json - "j['$2']"; }
reset_lago() { curl -fs -X POST "$1/_emulator/reset" >/dev/null; }
fault() { curl -fs "$1/_emulator/faults" -H 'content-type: application/json' -d "$2" >/dev/null; }
clear_faults() { curl -fs -X DELETE "$1/_emulator/faults" >/dev/null; }
# Waits until Lago has stored at least N events (tally's shipper retries until it has).
wait_stored() { # LAGO N SECONDS
  local deadline=$((SECONDS + $3))
  while (($(counter "$1" events_stored) < $2)); do
    ((SECONDS < deadline)) || return 1
    sleep 0.25
  done
}
# Waits until Lago has seen no request for 3 s (LiteLLM's callbacks have all fired).
wait_quiet() { # LAGO
  local last=-1 now stable=0
  while ((stable < 12)); do
    now=$(counter "$1" requests)
    if [[ $now == "$last" ]]; then stable=$((stable + 1)); else stable=0; last=$now; fi
    sleep 0.25
  done
}

# ---------------------------------------------------------------- one config.yaml for both proxies
MASTER_KEY="sk-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')" # LiteLLM refuses weak keys
sed -e "s|@UPSTREAM@|http://$upstream/v1|" -e "s|@MASTER_KEY@|$MASTER_KEY|" \
  "$HERE/config.yaml.in" >"$work/config.yaml"

tally_port=$(free_port)
# No rotation: the script counts completions as the lines of the one live file (tally ship follows
# rotation, but a line count across renames would race the rename).
TALLY_SPEND_LOG="$work/spend.jsonl" TALLY_STATE_DIR="$work/proxy-state" TALLY_SPEND_LOG_MAX_BYTES=0 RUST_LOG=warn \
  "$TALLY" proxy --config "$work/config.yaml" --host 127.0.0.1 --port "$tally_port" >"$work/tally-proxy.log" 2>&1 &
tally_proxy_pid=$!
pids+=($tally_proxy_pid)

start_ship() { # STATE_DIR SPEND_LOG LAGO LOGNAME -> ship_pid
  TALLY_STATE_DIR="$1" TALLY_SPEND_LOG="$2" LAGO_API_BASE="$3" LAGO_API_KEY="$LAGO_KEY" \
    LAGO_API_EVENT_CODE=$EVENT_CODE LAGO_API_CHARGE_BY=end_user_id RUST_LOG=warn \
    "$TALLY" ship >>"$work/$4.log" 2>&1 &
  ship_pid=$!
  pids+=($ship_pid)
}
touch "$work/spend.jsonl"
start_ship "$work/ship-state" "$work/spend.jsonl" "$lago_tally" tally-ship
tally_ship_pid=$ship_pid

lite_port=$(free_port)
log "starting LiteLLM $litellm_version (its start-up takes 10-60 s)"
(cd "$work" && exec env LAGO_API_BASE="$lago_lite" LAGO_API_KEY="$LAGO_KEY" LAGO_API_EVENT_CODE=$EVENT_CODE \
  LAGO_API_CHARGE_BY=end_user_id LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_LOG=ERROR \
  "$VENV/bin/litellm" --config "$work/config.yaml" --host 127.0.0.1 --port "$lite_port" \
  >"$work/litellm.log" 2>&1) &
lite_pid=$!
pids+=($lite_pid)

wait_http "http://127.0.0.1:$tally_port/health/liveliness" 60 "tally proxy"
wait_http "http://127.0.0.1:$lite_port/health/liveliness" 180 "LiteLLM proxy"

direct_url="http://$upstream/v1/chat/completions"
tally_url="http://127.0.0.1:$tally_port/v1/chat/completions"
lite_url="http://127.0.0.1:$lite_port/v1/chat/completions"

# ---------------------------------------------------------------- phase 1: latency, throughput, RSS
cat >"$work/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o","messages":[{"role":"user","content":"What is the capital of France?"}],"user":"bench-customer"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $MASTER_KEY"
LUA

# wrk URL CONNS SECONDS -> prints "rps p50_ms p99_ms ok errors"
measure() {
  local threads=$(($2 < 2 ? 1 : 2)) out
  out=$(wrk -t"$threads" -c"$2" -d"$3s" --timeout 10s --latency -s "$work/post.lua" "$1")
  python3 "$HERE/wrk_summary.py" "$out"
}
# Before each run, the previous run's billing is finished, so it does not compete for the CPU.
settle() {
  wait_stored "$lago_tally" "$(wc -l <"$work/spend.jsonl")" 120 || log "tally ship is behind"
  wait_quiet "$lago_lite"
}
# wrk counts the answers it read; the requests still in flight when it stops (one per open
# connection) are served and billed all the same, so they are counted apart.
lite_ok=0 lite_inflight=8
log "warming up"
measure "$direct_url" 8 2 >/dev/null
measure "$tally_url" 8 2 >/dev/null
read -r _ _ _ ok _ < <(measure "$lite_url" 8 4)
lite_ok=$((lite_ok + ok))

for conns in 1 64; do
  for target in direct tally litellm; do
    case $target in direct) url=$direct_url ;; tally) url=$tally_url ;; litellm) url=$lite_url ;; esac
    settle
    log "latency: $target at $conns connection(s), ${DURATION}s"
    read -r rps p50 p99 ok errors < <(measure "$url" "$conns" "$DURATION")
    rec "lat.$target.$conns" "$rps $p50 $p99 $errors"
    if [[ $target == litellm ]]; then lite_ok=$((lite_ok + ok)) lite_inflight=$((lite_inflight + conns)); fi
  done
done

rss() { awk -v f="$2" '$1 == f":" {print $2}' "/proc/$1/status"; } # kB
# LiteLLM's proxy is one process here (one uvicorn worker, the default); count any children too.
tree_rss() {
  local total=0 pid
  for pid in $1 $(pgrep -P "$1" || true); do total=$((total + $(rss "$pid" "$2"))); done
  echo "$total"
}
rec rss.tally_proxy "$(rss $tally_proxy_pid VmRSS) $(rss $tally_proxy_pid VmHWM)"
rec rss.tally_ship "$(rss $tally_ship_pid VmRSS) $(rss $tally_ship_pid VmHWM)"
rec rss.litellm "$(tree_rss $lite_pid VmRSS) $(tree_rss $lite_pid VmHWM)"

# Billing of the steady load: every completion billed? how many HTTP requests to Lago per event?
tally_lines=$(wc -l <"$work/spend.jsonl")
log "waiting for tally ship to deliver $tally_lines events"
wait_stored "$lago_tally" "$tally_lines" 180 || log "tally ship did not catch up within 180 s"
wait_quiet "$lago_lite"
rec steady.tally "$tally_lines $(counter "$lago_tally" events_stored) $(counter "$lago_tally" requests)"
rec steady.litellm "$lite_ok $(counter "$lago_lite" events_stored) $(counter "$lago_lite" requests) $lite_inflight"

# ---------------------------------------------------------------- phase 2: Lago outage under load
# RATE requests/s for LOAD_SECS; Lago is down for OUTAGE_SECS in the middle. Completions that
# succeeded are compared with the events Lago holds once the dust has settled.
outage() { # PROXY(tally|litellm) KIND(503|refused)
  local proxy=$1 kind=$2 lago port lead before after load_out
  if [[ $proxy == tally ]]; then lago=$lago_tally port=$tally_port; else lago=$lago_lite port=$lite_port; fi
  reset_lago "$lago"
  before=$(wc -l <"$work/spend.jsonl")
  lead=$(python3 -c "print(($LOAD_SECS - $OUTAGE_SECS) / 2)")
  log "outage: $proxy, Lago $kind for ${OUTAGE_SECS}s in the middle of ${LOAD_SECS}s at $RATE req/s"
  load_out="$work/load-$proxy-$kind.json"
  python3 "$HERE/load.py" --port "$port" --key "$MASTER_KEY" --rate "$RATE" --seconds "$LOAD_SECS" >"$load_out" &
  local load_pid=$!
  pids+=($load_pid)
  sleep "$lead"
  if [[ $kind == 503 ]]; then
    fault "$lago" '{"kind":"server_error","status":503,"count":1000000000}'
    sleep "$OUTAGE_SECS"
    clear_faults "$lago"
  else
    fault "$lago" "{\"kind\":\"refuse_connections\",\"duration_ms\":$((OUTAGE_SECS * 1000))}"
    sleep "$OUTAGE_SECS"
  fi
  wait "$load_pid"
  forget "$load_pid"
  local ok
  ok=$(json "$load_out" "j['ok']")
  if [[ $proxy == tally ]]; then
    after=$(wc -l <"$work/spend.jsonl")
    wait_stored "$lago" $((after - before)) 180 || log "tally ship did not catch up within 180 s"
    sleep 1 # anything beyond the expected count would be a duplicate: give it a moment to show
  else
    wait_quiet "$lago"
  fi
  local failed
  failed=$(curl -fs "$lago/_emulator/counters" | json - "sum(v for k, v in j['by_status'].items() if k != '200')")
  rec "outage.$proxy.$kind" "$ok $(counter "$lago" events_stored) $failed $(counter "$lago" requests)"
  curl -fs "$lago/_emulator/events" >"$work/events-$proxy-$kind.json"
}
for kind in 503 refused; do
  outage tally "$kind"
  outage litellm "$kind"
done

# Does each event carry its own timestamp? tally: the stored timestamp equals the record's
# end_time. LiteLLM sends none, so Lago stamps the time of receipt.
python3 - "$work" >>"$results" <<'PY'
import datetime, json, sys
work = sys.argv[1]
ends = {}
for line in open(f"{work}/spend.jsonl"):
    r = json.loads(line)
    t = datetime.datetime.fromisoformat(r["end_time"].replace("Z", "+00:00"))
    ends[r["transaction_id"]] = round(t.timestamp() * 1000)
for proxy in ("tally", "litellm"):
    events = json.load(open(f"{work}/events-{proxy}-503.json"))
    events += json.load(open(f"{work}/events-{proxy}-refused.json"))
    if proxy == "tally":
        own = sum(1 for e in events if ends.get(e["transaction_id"]) == e["timestamp_millis"])
    else:
        own = sum(1 for e in events if e["timestamp_millis"] != e["received_at_millis"])
    lag = max((e["received_at_millis"] - e["timestamp_millis"] for e in events), default=0)
    print(f"timestamp.{proxy}\t{len(events)} {own} {lag}")
PY

# ---------------------------------------------------------------- phase 3: resend safety
# tally: ship half of a log, back up the shipper's state, ship the rest, restore the old backup
# and start again: the second half is sent twice. Lago also drops two answers after storing
# (the shipper resends those). On ClickHouse-mode Lago (always 200) only identical
# (transaction_id, timestamp) resends merge; anything else is a second billable event.
log "resend: tally (restore an older shipper state, replay the log)"
reset_lago "$lago_ch"
half=$((RESEND_N / 2))
head -n "$half" "$work/spend.jsonl" >"$work/resend.jsonl"
fault "$lago_ch" '{"kind":"drop_response","count":2}'
start_ship "$work/resend-state" "$work/resend.jsonl" "$lago_ch" resend-ship
wait_stored "$lago_ch" "$half" 120 || log "resend: first half not delivered"
stop "$ship_pid"
cp -a "$work/resend-state" "$work/resend-state.older"
sed -n "$((half + 1)),$((2 * half))p" "$work/spend.jsonl" >>"$work/resend.jsonl"
start_ship "$work/resend-state" "$work/resend.jsonl" "$lago_ch" resend-ship
wait_stored "$lago_ch" $((2 * half)) 120 || log "resend: second half not delivered"
stop "$ship_pid"
dups_before=$(counter "$lago_ch" duplicates)
rm -rf "$work/resend-state"
mv "$work/resend-state.older" "$work/resend-state"
start_ship "$work/resend-state" "$work/resend.jsonl" "$lago_ch" resend-ship
deadline=$((SECONDS + 120))
while (($(counter "$lago_ch" duplicates) - dups_before < half && SECONDS < deadline)); do sleep 0.25; done
wait_quiet "$lago_ch"
stop "$ship_pid"
# And replaying the whole log through `tally replay --ship` on the same state sends nothing again.
replay_before=$(counter "$lago_ch" requests)
if TALLY_STATE_DIR="$work/resend-state" LAGO_API_BASE="$lago_ch" LAGO_API_KEY="$LAGO_KEY" \
  LAGO_API_EVENT_CODE=$EVENT_CODE LAGO_API_CHARGE_BY=end_user_id RUST_LOG=warn \
  "$TALLY" replay "$work/resend.jsonl" --ship --ship-timeout 60 >"$work/replay.log" 2>&1; then
  replay_requests=$(($(counter "$lago_ch" requests) - replay_before))
else
  replay_requests="failed"
  log "tally replay --ship failed: $(tail -n 3 "$work/replay.log")"
fi
curl -fs "$lago_ch/_emulator/events" >"$work/events-resend-tally.json"
distinct=$(json "$work/events-resend-tally.json" "len({e['transaction_id'] for e in j})")
rec resend.tally "$((2 * half)) $(counter "$lago_ch" events_stored) $distinct $(counter "$lago_ch" duplicates) $(counter "$lago_ch" requests) $replay_requests"

# LiteLLM: its own LagoLogger; Lago drops the answer to each first attempt after storing, and the
# failed call is sent once more. Run against both stores.
for store in clickhouse postgres; do
  if [[ $store == clickhouse ]]; then lago=$lago_ch; else lago=$lago_lite; fi
  log "resend: LiteLLM's LagoLogger on $store-mode Lago"
  reset_lago "$lago"
  LAGO_API_BASE="$lago" LAGO_API_KEY="$LAGO_KEY" LAGO_API_EVENT_CODE=$EVENT_CODE LAGO_API_CHARGE_BY=end_user_id \
    LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_LOG=ERROR \
    "$VENV/bin/python" "$HERE/litellm_resend.py" --n "$LITELLM_RESEND_N" >"$work/litellm-resend-$store.json" 2>"$work/litellm-resend-$store.log"
  curl -fs "$lago/_emulator/events" >"$work/events-resend-litellm-$store.json"
  distinct=$(json "$work/events-resend-litellm-$store.json" "len({e['transaction_id'] for e in j})")
  attempts=$(json "$work/litellm-resend-$store.json" "j['attempts']")
  rec "resend.litellm.$store" "$LITELLM_RESEND_N $(counter "$lago" events_stored) $distinct $(counter "$lago" duplicates) $(counter "$lago" requests) $attempts"
done
rec litellm.event_fields "$(json "$work/litellm-resend-clickhouse.json" "' '.join(j['event_fields'])")"

# ---------------------------------------------------------------- report
rec meta.machine "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r)"
rec meta.load "$(cut -d' ' -f1-3 /proc/loadavg)"
rec meta.litellm "$litellm_version"
rec meta.python "$python_version"
tally_rev="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock || echo ' with uncommitted changes')"
parents=$(git rev-list --parents -n1 HEAD | cut -d' ' -f2- | xargs -n1 git rev-parse --short | paste -sd' ')
[[ $parents == *' '* ]] && tally_rev="$tally_rev (a merge of ${parents// / and })"
rec meta.tally "$tally_rev"
rec meta.wrk "$(wrk -v 2>&1 | head -n1 | cut -d' ' -f1-2)"
rec meta.date "$(date -u +%Y-%m-%dT%H:%MZ)"
rec meta.command "$COMMAND"
rec meta.params "$DURATION $RATE $LOAD_SECS $OUTAGE_SECS $RESEND_N $LITELLM_RESEND_N"
rec meta.seconds "$(($(date +%s) - started))"
rec meta.build_seconds "$build_seconds"
python3 "$HERE/report.py" "$results" "$ROOT/docs/benchmarks.md"
log "done in $(($(date +%s) - started)) s; docs/benchmarks.md updated"
