"""What a resend does on LiteLLM's Lago billing path (run with the LiteLLM venv's python).

LiteLLM's proxy never retries a failed Lago call (that is the loss the outage phase
measures). The only way to recover such an event is to send it again, so this drives
LiteLLM's own `LagoLogger` -- the class `callbacks: ["lago"]` loads -- for `--n` completions
while the Lago emulator drops the answer to each first attempt after storing its event
("Lago stored it, the caller never heard"), and resends each failed call once. It prints one
JSON object: completions, attempts, and the fields of the event LiteLLM builds.
Needs LAGO_API_BASE, LAGO_API_KEY, LAGO_API_EVENT_CODE in the environment.
"""

import argparse
import asyncio
import datetime
import json
import os
import urllib.request

import litellm
from litellm.integrations.lago import LagoLogger


def completion(i: int) -> litellm.ModelResponse:
    return litellm.ModelResponse(
        id=f"chatcmpl-resend-{i}",
        model="gpt-4o",
        choices=[{"index": 0, "finish_reason": "stop",
                  "message": {"role": "assistant", "content": "Paris is the capital of France."}}],
        usage=litellm.Usage(prompt_tokens=7, completion_tokens=15, total_tokens=22),
    )


def call_kwargs(i: int) -> dict:
    # The shape LiteLLM's proxy hands its success callbacks for a master-key call with `user`.
    return {
        "model": "gpt-4o",
        "response_cost": 0.0001675,
        "litellm_call_id": f"call-{i}",
        "litellm_params": {
            "proxy_server_request": {"body": {"user": "bench-customer"}},
            "metadata": {"user_api_key_user_id": None, "user_api_key_team_id": None},
        },
    }


def inject_faults(base: str, n: int) -> None:
    req = urllib.request.Request(
        f"{base}/_emulator/faults",
        data=json.dumps({"kind": "drop_response", "count": n}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(req, timeout=10).read()


async def run(n: int) -> dict:
    logger = LagoLogger()
    attempts = 0
    failures = 0
    for i in range(n):
        kwargs, resp = call_kwargs(i), completion(i)
        now = datetime.datetime.now(datetime.timezone.utc)
        inject_faults(os.environ["LAGO_API_BASE"], 1)  # the first attempt's answer is lost
        for _ in range(2):  # the first attempt, then one resend
            attempts += 1
            try:
                await logger.async_log_success_event(kwargs, resp, now, now)
                break
            except Exception:  # noqa: BLE001 -- any failure is what a resend answers
                failures += 1
    event = logger._common_logic(call_kwargs(0), completion(0))["event"]
    return {
        "completions": n,
        "attempts": attempts,
        "failed_attempts": failures,
        "event_fields": sorted(event.keys()),
        "has_timestamp": "timestamp" in event,
        "same_transaction_id_twice": logger._common_logic(call_kwargs(0), completion(0))["event"]["transaction_id"]
        == event["transaction_id"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(run(args.n))))


if __name__ == "__main__":
    main()
