#!/usr/bin/env bash
# Benchmark of `tally proxy` (not a test): a fixed-answer upstream measured directly and through
# the proxy, in the same run, with spend logging on. Two measures:
#
# - Throughput, closed loop (wrk): 1 and 64 connections, each sending its next request as soon as
#   the previous answer arrives. At 64 connections the proxy is saturated, so this run's latency
#   is mostly queueing (64 in flight / rate), not what the proxy adds to one request.
# - Added latency, open loop (bench/loadgen.rs): requests offered at fixed rates over 64
#   connections, each latency measured from the request's due time (no coordinated omission),
#   direct and through the proxy back to back. Added = proxy percentile − direct percentile.
#
#   bench/proxy.sh            # DURATION=10 by default; results on stdout as Markdown tables
#   RATES="1000 5000" bench/proxy.sh    # the open-loop rates (default 1000 5000 10000 15000)
#   PIN=1 bench/proxy.sh      # open loop with the load generator on CPU 0 and the upstream on CPU 1
#
# PIN: unpinned, the direct baseline is bimodal. When the scheduler puts the load generator and the
# upstream on one core, a direct request costs two same-core wake-ups (p50 ≈ 0.05 ms here). On two
# cores it costs two cross-core wake-ups (≈ 0.17 ms), and which one a run gets is chance, so
# "added" swings by ~0.12 ms between runs. PIN=1 keeps them on separate cores, as a client and a
# model server on separate hosts would be. The proxy itself is never pinned.
#
# Needs wrk (Debian: apt-get install -y wrk). Everything binds 127.0.0.1; every process this script
# starts is stopped by PID when it exits.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
RATES=${RATES:-1000 5000 10000 15000}
TARGET=${CARGO_TARGET_DIR:-target}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }

# TALLY=path/to/tally measures another build of the proxy (e.g. the one before a change).
if [[ -z ${TALLY:-} ]]; then
  cargo build --release --quiet --bin tally --example proxy_upstream --example loadgen
fi
LOADGEN=${LOADGEN:-$TARGET/release/examples/loadgen}
[[ -x $LOADGEN ]] || cargo build --release --quiet --example loadgen
# shellcheck source=bench/proxy_setup.sh
source bench/proxy_setup.sh
RUST_LOG=warn "$TALLY" proxy --config "$work/config.yaml" --host 127.0.0.1 --port "$port" >"$work/proxy.log" 2>&1 &
proxy_pid=$!
pids+=($proxy_pid)
for _ in $(seq 300); do curl -fs "http://127.0.0.1:$port/health/liveliness" >/dev/null && break; sleep 0.1; done
key=$(curl -fs "http://127.0.0.1:$port/key/generate" -H "Authorization: Bearer $master" \
  -H 'content-type: application/json' -d '{"team_id":"bench-team"}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')

cat >"$work/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o","messages":[{"role":"user","content":"What is the capital of France?"}],"user":"bench-customer"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $key"
LUA

# Runs wrk; prints "rps p50_ms p99_ms errors".
measure() {
  local url=$1 conns=$2 threads=$(( $2 < 2 ? 1 : 2 ))
  local out
  out=$(wrk -t"$threads" -c"$conns" -d"${DURATION}s" --latency -s "$work/post.lua" "$url")
  python3 - "$out" <<'PY'
import re, sys
out = sys.argv[1]
def ms(v):
    n, unit = re.match(r"([\d.]+)(us|ms|s)", v).groups()
    return float(n) * {"us": 0.001, "ms": 1, "s": 1000}[unit]
p50 = ms(re.search(r"\s50%\s+(\S+)", out).group(1))
p99 = ms(re.search(r"\s99%\s+(\S+)", out).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
errors = int(m.group(1)) if m else 0
m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
errors += sum(map(int, m.groups())) if m else 0
print(f"{rps:.0f} {p50:.3f} {p99:.3f} {errors}")
PY
}

# Warm both paths (connection pools, page cache) before measuring.
wrk -t1 -c8 -d2s -s "$work/post.lua" "http://$upstream/v1/chat/completions" >/dev/null
wrk -t1 -c8 -d2s -s "$work/post.lua" "http://127.0.0.1:$port/v1/chat/completions" >/dev/null
lines_before=$(spend_lines)

echo "| connections | path | requests/s | p50 ms | p99 ms | errors |"
echo "|---:|---|---:|---:|---:|---:|"
declare -A result
for conns in 1 64; do
  for path in direct proxy; do
    if [[ $path == direct ]]; then url="http://$upstream/v1/chat/completions"; else url="http://127.0.0.1:$port/v1/chat/completions"; fi
    read -r rps p50 p99 errors < <(measure "$url" "$conns")
    result[$path$conns]="$rps $p50 $p99"
    echo "| $conns | $path | $rps | $p50 | $p99 | $errors |"
  done
done

echo
echo "| connections | added p50 ms | added p99 ms | proxy / direct requests/s |"
echo "|---:|---:|---:|---:|"
for conns in 1 64; do
  read -r drps dp50 dp99 <<<"${result[direct$conns]}"
  read -r prps pp50 pp99 <<<"${result[proxy$conns]}"
  python3 -c "print(f'| $conns | {$pp50-$dp50:.3f} | {$pp99-$dp99:.3f} | {$prps/$drps:.2f} |')"
done

# Open loop: fixed offered rates over 64 connections; latency from each request's due time.
body='{"model":"gpt-4o","messages":[{"role":"user","content":"What is the capital of France?"}],"user":"bench-customer"}'
pin_loadgen=()
if [[ ${PIN:-0} == 1 ]]; then
  (( $(nproc) >= 2 )) || { echo "PIN=1 needs two CPUs" >&2; exit 1; }
  for task in /proc/"${pids[0]}"/task/*; do taskset -pc 1 "${task##*/}" >/dev/null; done
  pin_loadgen=(taskset -c 0)
  echo
  echo "Pinned: load generator on CPU 0, upstream on CPU 1, proxy unpinned."
fi
# Runs the load generator; prints "p50 p99 achieved sustained errors".
open_loop() {
  local url=$1 rate=$2 out
  out=$("${pin_loadgen[@]}" "$LOADGEN" --url "$url" --rate "$rate" --connections 64 --duration "$DURATION" --warmup 1 \
    --body "$body" --header 'content-type: application/json' --header "authorization: Bearer $key")
  echo "$out" >>"$work/loadgen.txt"
  python3 - "$out" <<'PY'
import re, sys
line = [l for l in sys.argv[1].splitlines() if l.startswith("RESULT ")][-1]
kv = dict(f.split("=", 1) for f in line.split()[1:])
print(kv["p50_ms"], kv["p99_ms"], kv["achieved"], kv["sustained"], int(kv["non2xx"]) + int(kv["errors"]))
PY
}
echo
echo "Open loop, 64 connections, latency from each request's due time (ms):"
echo
echo "| offered req/s | direct p50 | direct p99 | proxy p50 | proxy p99 | **added p50** | **added p99** | achieved direct / proxy | errors |"
echo "|---:|---:|---:|---:|---:|---:|---:|---|---:|"
verdicts=()
for rate in $RATES; do
  read -r dp50 dp99 dach dsus derr < <(open_loop "http://$upstream/v1/chat/completions" "$rate")
  read -r pp50 pp99 pach psus perr < <(open_loop "http://127.0.0.1:$port/v1/chat/completions" "$rate")
  row=$(python3 - "$rate" "$dp50" "$dp99" "$dach" "$dsus" "$derr" "$pp50" "$pp99" "$pach" "$psus" "$perr" <<'PY'
import sys
rate, dp50, dp99, dach, dsus, derr, pp50, pp99, pach, psus, perr = sys.argv[1:]
a50, a99 = float(pp50) - float(dp50), float(pp99) - float(dp99)
mark = lambda ach, sus: ach + ("" if sus == "yes" else " (not sustained)")
print(f"| {rate} | {dp50} | {dp99} | {pp50} | {pp99} | {a50:.3f} | {a99:.3f} | {mark(dach, dsus)} / {mark(pach, psus)} | {int(derr) + int(perr)} |")
ok = dsus == "yes" and psus == "yes" and int(derr) + int(perr) == 0
verdict = "not measurable (not sustained or errors)" if not ok else ("met" if a50 <= 0.2 and a99 <= 1.0 else "not met")
print(f"{rate} req/s: {verdict} (added p50 {a50:.3f} ms, p99 {a99:.3f} ms)")
PY
)
  echo "$row" | head -1
  verdicts+=("$(echo "$row" | tail -1)")
done
echo
echo "Verdict against the added-latency target (p50 ≤ 0.2 ms and p99 ≤ 1 ms at 64 connections), per offered rate:"
for v in "${verdicts[@]}"; do echo "- $v"; done
read -r prps _ <<<"${result[proxy64]}"
if (( ${prps%.*} >= 15000 )); then tp=met; else tp="not met"; fi
echo "Throughput target (≥ 15,000 req/s through the proxy, closed loop, 64 connections): $tp ($prps req/s)"

lines_after=$(spend_lines)
rss_kib=$(awk '/VmRSS/ {print $2}' "/proc/$proxy_pid/status")
hwm_kib=$(awk '/VmHWM/ {print $2}' "/proc/$proxy_pid/status")
echo
echo "proxy RSS after the run: $((rss_kib / 1024)) MiB (peak $((hwm_kib / 1024)) MiB; target < 50 MiB)"
echo "spend records written during the runs above (open-loop warm-ups included): $((lines_after - lines_before))"
echo "load average at the end (other processes share the machine): $(cut -d" " -f1-3 /proc/loadavg)"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r)"
