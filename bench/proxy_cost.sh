#!/usr/bin/env bash
# What one proxied request costs the proxy, in measures that hold up on a shared machine: CPU time,
# context switches and (with CALLGRIND=1) instructions, each divided by the requests served (the
# spend-log lines written). Not a test; wall-clock figures are bench/proxy.sh's job.
#
#   bench/proxy_cost.sh                 # 64 connections for 10 s, perf/proc counters
#   CALLGRIND=1 bench/proxy_cost.sh     # the proxy under valgrind: instructions per request
#   TALLY=path/to/tally bench/proxy_cost.sh   # measure another build (e.g. the one before a change)
#   BODY_FILE=chat.json bench/proxy_cost.sh   # another request body (default: one short message)
#   RATE=2000 bench/proxy_cost.sh       # open loop at a fixed rate (bench/loadgen.rs) instead of
#                                       # wrk's closed loop: the cost when the proxy is not saturated
#   SYSCALLS=1 bench/proxy_cost.sh      # also count system calls per request, by call (perf stat
#                                       # on the syscall tracepoints; needs perf and tracefs)
#   DATABASE_URL=postgresql://… bench/proxy_cost.sh  # virtual keys in PostgreSQL instead of
#                                       # SQLite (the proxy reads DATABASE_URL; the cache-hit path)
#
# Besides CPU time from /proc/<pid>/stat (clock ticks), it reports on-CPU time and time spent
# runnable but waiting for a CPU from /proc/<pid>/task/*/schedstat (nanoseconds): on a shared
# 2-core machine the second is what other processes cost the proxy's latency.
#
# Needs wrk; perf is optional (context switches and migrations come from /proc without it).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
TARGET=${CARGO_TARGET_DIR:-target}
if [[ -z ${TALLY:-} || -z ${UPSTREAM_BIN:-} ]]; then
  cargo build --release --quiet --bin tally --example proxy_upstream --example loadgen
fi
LOADGEN=${LOADGEN:-$TARGET/release/examples/loadgen}
# shellcheck source=bench/proxy_setup.sh
source bench/proxy_setup.sh
launcher=()
if [[ -n ${CALLGRIND:-} ]]; then
  launcher=(valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out")
fi
RUST_LOG=warn "${launcher[@]}" "$TALLY" proxy --config "$work/config.yaml" --host 127.0.0.1 --port "$port" >"$work/proxy.log" 2>&1 &
proxy_pid=$!
pids+=($proxy_pid)
for _ in $(seq 600); do curl -fs "http://127.0.0.1:$port/health/liveliness" >/dev/null && break; sleep 0.1; done
key=$(curl -fs "http://127.0.0.1:$port/key/generate" -H "Authorization: Bearer $master" \
  -H 'content-type: application/json' -d '{"team_id":"bench-team"}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')

body='{"model":"gpt-4o","messages":[{"role":"user","content":"What is the capital of France?"}],"user":"bench-customer"}'
[[ -n ${BODY_FILE:-} ]] && body=$(cat "$BODY_FILE")
lua_body=$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$body")
cat >"$work/post.lua" <<LUA
wrk.method = "POST"
wrk.body = $lua_body
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $key"
LUA
url="http://127.0.0.1:$port/v1/chat/completions"
wrk -t1 -c8 -d2s -s "$work/post.lua" "$url" >/dev/null

# Sum of a field of every thread's /proc status.
ctx() { cat /proc/"$proxy_pid"/task/*/status 2>/dev/null | awk -v f="$1" '$1 == f":" {s += $2} END {print s}'; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$proxy_pid/stat"; }
# On-CPU and run-queue nanoseconds summed over the proxy's threads.
sched_ns() { cat /proc/"$proxy_pid"/task/*/schedstat 2>/dev/null | awk -v f="$1" '{s += $f} END {printf "%.0f", s}'; }

lines_before=$(spend_lines)
vol_before=$(ctx voluntary_ctxt_switches)
invol_before=$(ctx nonvoluntary_ctxt_switches)
ticks_before=$(cpu_ticks)
oncpu_before=$(sched_ns 1)
waiting_before=$(sched_ns 2)
perf_pid=
if [[ -n ${CALLGRIND:-} ]]; then
  callgrind_control -z "$proxy_pid" >/dev/null # count from here
elif command -v perf >/dev/null; then
  events=task-clock,context-switches,cpu-migrations
  if [[ -n ${SYSCALLS:-} ]]; then
    events="$events,raw_syscalls:sys_enter"
    for call in epoll_wait futex read recvfrom write writev sendto; do
      events="$events,syscalls:sys_enter_$call"
    done
  fi
  perf stat -e "$events" -p "$proxy_pid" -o "$work/perf.txt" &
  perf_pid=$!
fi
threads=$(( CONNS < 2 ? 1 : 2 ))
if [[ -n ${RATE:-} ]]; then
  "$LOADGEN" --url "$url" --rate "$RATE" --connections "$CONNS" --duration "$DURATION" --warmup 0 \
    --body "$body" --header 'content-type: application/json' --header "authorization: Bearer $key" >"$work/wrk.txt"
  load="open loop at $RATE req/s: $(grep -m1 '^latency' "$work/wrk.txt")"
else
  wrk -t"$threads" -c"$CONNS" -d"${DURATION}s" -s "$work/post.lua" "$url" >"$work/wrk.txt"
  load="$(grep Requests/sec "$work/wrk.txt" | xargs)"
fi
if [[ -n ${CALLGRIND:-} ]]; then
  callgrind_control -d "$proxy_pid" >/dev/null
elif [[ -n $perf_pid ]]; then
  kill -INT "$perf_pid"; wait "$perf_pid" || true
fi
lines=$(( $(spend_lines) - lines_before ))
vol=$(( $(ctx voluntary_ctxt_switches) - vol_before ))
invol=$(( $(ctx nonvoluntary_ctxt_switches) - invol_before ))
ticks=$(( $(cpu_ticks) - ticks_before ))
oncpu=$(( $(sched_ns 1) - oncpu_before ))
waiting=$(( $(sched_ns 2) - waiting_before ))
hz=$(getconf CLK_TCK)

echo "requests (spend records): $lines at $CONNS connections over ${DURATION}s ($load)"
python3 - "$lines" "$vol" "$invol" "$ticks" "$hz" "$oncpu" "$waiting" <<'PY'
import sys
n, vol, invol, ticks, hz, oncpu, waiting = map(int, sys.argv[1:])
print(f"per request: CPU {ticks / hz / n * 1e6:.1f} us, voluntary context switches {vol / n:.3f}, involuntary {invol / n:.3f}")
print(f"per request (schedstat): on CPU {oncpu / n / 1e3:.1f} us, runnable but waiting for a CPU {waiting / n / 1e3:.1f} us")
PY
if [[ -f $work/perf.txt ]]; then
  python3 - "$lines" "$work/perf.txt" <<'PY'
import re, sys
n = int(sys.argv[1])
text = open(sys.argv[2]).read()
events = ["task-clock", "context-switches", "cpu-migrations"]
events += re.findall(r"(raw_syscalls:sys_enter|syscalls:sys_enter_\w+)", text)
for event in events:
    m = re.search(r"([\d,.]+)\s+(?:msec\s+)?" + re.escape(event) + r"\b", text)
    if m:
        v = float(m.group(1).replace(",", ""))
        unit = " us" if event == "task-clock" else ""
        v = v * 1000 if event == "task-clock" else v
        print(f"perf {event} per request: {v / n:.3f}{unit}")
PY
fi
if [[ -n ${CALLGRIND:-} ]]; then
  total=0
  # The dump taken after the load (the files written at exit are left out).
  for f in "$work"/callgrind.out.*; do
    ir=$(awk '/^(summary|totals):/ {print $2; exit}' "$f")
    total=$(( total + ${ir:-0} ))
  done
  echo "instructions per request (callgrind, all threads): $(( total / lines ))"
  [[ -n ${KEEP_CALLGRIND:-} ]] && cp "$work"/callgrind.out* "$KEEP_CALLGRIND"/
fi
echo "load average: $(cut -d" " -f1-3 /proc/loadavg)"
