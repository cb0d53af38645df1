"""Starts a real `tally proxy` binary (TALLY_BIN) on a free loopback port with mock models, for the
client tests. The proxy is stopped with SIGTERM at the end, and must exit 0."""

import json
import os
import pathlib
import signal
import subprocess
import threading
import time
import urllib.request

import pytest

MASTER_KEY = "sk-client-tests-" + "0123456789abcdef" * 2

CONFIG = """
model_list:
  - model_name: gpt-4o
    litellm_params:
      model: openai/gpt-4o
      mock_response: "Hello from the tally mock model!"
litellm_settings:
  callbacks: ["lago"]
general_settings:
  master_key: os.environ/LITELLM_MASTER_KEY
"""


class Proxy:
    def __init__(self, base_url: str, spend_log: pathlib.Path):
        self.base_url = base_url
        self.spend_log = spend_log
        self.master_key = MASTER_KEY

    def records(self) -> list[dict]:
        if not self.spend_log.exists():
            return []
        return [json.loads(line) for line in self.spend_log.read_text().splitlines() if line]

    def record(self, transaction_id: str) -> dict:
        matches = [r for r in self.records() if r["transaction_id"] == transaction_id]
        assert len(matches) == 1, f"expected one record {transaction_id}, got {matches}"
        return matches[0]

    def generate_key(self, body: dict) -> dict:
        request = urllib.request.Request(
            self.base_url + "/key/generate",
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)


@pytest.fixture(scope="session")
def proxy(tmp_path_factory):
    yield from run_proxy(CONFIG, tmp_path_factory.mktemp("tally-proxy"))


def run_proxy(config: str, work: pathlib.Path, extra_env: dict | None = None):
    """Runs `tally proxy` with `config` in `work`; yields a Proxy, then stops it (SIGTERM, exit 0)."""
    binary = os.environ.get("TALLY_BIN")
    if not binary:
        pytest.fail("set TALLY_BIN to the built tally binary (e.g. target/debug/tally)")
    (work / "config.yaml").write_text(config)
    spend_log = work / "spend.jsonl"
    env = dict(os.environ)
    env.update(
        LITELLM_MASTER_KEY=MASTER_KEY,
        TALLY_LOG_FORMAT="json",
        RUST_LOG="info",
        TALLY_SPEND_LOG=str(spend_log),
        TALLY_STATE_DIR=str(work / "state"),
    )
    env.update(extra_env or {})
    env.pop("TALLY_ALLOW_WEAK_MASTER_KEY", None)
    process = subprocess.Popen(
        [binary, "proxy", "--config", str(work / "config.yaml"), "--host", "127.0.0.1", "--port", "0"],
        cwd=work,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    address = None
    lines = []
    deadline = time.monotonic() + 60
    # The proxy logs the address it bound (port 0 → a free port) as a JSON log line.
    while time.monotonic() < deadline and address is None:
        line = process.stderr.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        lines.append(line)
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("message") == "tally proxy listening":
            address = event["address"]
    if address is None:
        process.kill()
        pytest.fail("tally proxy did not start:\n" + "".join(lines))
    # Keep draining stderr so the proxy never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
    yield Proxy(f"http://{address}", spend_log)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, "tally proxy did not exit cleanly on SIGTERM"
