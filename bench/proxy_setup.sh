# Shared set-up of bench/proxy.sh and bench/proxy_cost.sh (sourced, not run): starts the
# fixed-answer upstream, writes a proxy config pointing at it with a fresh master key, and picks a
# free port. Sets: TALLY, UPSTREAM_BIN, work, pids (stopped by PID on exit), upstream, master, port.
TALLY=${TALLY:-$TARGET/release/tally}
UPSTREAM_BIN=${UPSTREAM_BIN:-$TARGET/release/examples/proxy_upstream}

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Spend records written so far, across the live log and any rotated ones (the log rotates at
# 100 MiB, about 230,000 records: within one long run at full speed).
spend_lines() { cat "$work"/spend.jsonl* 2>/dev/null | wc -l; }

# Wait until a log file contains a pattern (up to 60 s).
wait_for() {
  for _ in $(seq 600); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "timed out waiting for '$2' in $1" >&2; cat "$1" >&2; exit 1
}

"$UPSTREAM_BIN" 127.0.0.1:0 >"$work/upstream.log" 2>&1 &
pids+=($!)
wait_for "$work/upstream.log" "listening on"
upstream=$(sed -n 's/^listening on //p' "$work/upstream.log")

master="sk-bench-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
cat >"$work/config.yaml" <<YAML
model_list:
  - model_name: gpt-4o
    litellm_params:
      model: openai/gpt-4o
      api_base: http://$upstream/v1
      api_key: upstream-key
general_settings:
  master_key: $master
tally_settings:
  spend_log: $work/spend.jsonl
  state_dir: $work/state
YAML
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
