"""Paced load for the outage phase of bench/vs-litellm.sh (standard library only).

Sends `--rate` chat completions per second for `--seconds` over `--conns` keep-alive
connections, each request at its scheduled time (a late request is sent at once, never
skipped), and prints one JSON object: how many were sent, answered 200, or failed.
Only 127.0.0.1 is ever a target.
"""

import argparse
import http.client
import json
import threading
import time

BODY = json.dumps(
    {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "user": "bench-customer",
    }
).encode()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--conns", type=int, default=4)
    args = ap.parse_args()

    total = int(args.rate * args.seconds)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {args.key}"}
    lock = threading.Lock()
    state = {"next": 0, "ok": 0, "errors": 0, "by_status": {}}
    start = time.monotonic() + 0.2

    def take() -> int | None:
        with lock:
            i = state["next"]
            if i >= total:
                return None
            state["next"] = i + 1
            return i

    def worker() -> None:
        conn = None
        while (i := take()) is not None:
            delay = start + i / args.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=30)
                conn.request("POST", "/v1/chat/completions", body=BODY, headers=headers)
                resp = conn.getresponse()
                resp.read()
                status = str(resp.status)
            except (OSError, http.client.HTTPException):
                status = "error"
                conn = None
            with lock:
                state["by_status"][status] = state["by_status"].get(status, 0) + 1
                if status == "200":
                    state["ok"] += 1
                else:
                    state["errors"] += 1

    threads = [threading.Thread(target=worker) for _ in range(args.conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"sent": total, "ok": state["ok"], "errors": state["errors"],
                      "by_status": state["by_status"]}))


if __name__ == "__main__":
    main()
