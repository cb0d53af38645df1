"""Claude Code itself (`claude -p`, npm `@anthropic-ai/claude-code`, pinned in claude/package.json)
through `tally proxy` to a loopback Anthropic upstream: it completes a prompt, and its calls are
billed to the tally key it was given as ANTHROPIC_AUTH_TOKEN."""

import os
import pathlib
import subprocess

import pytest

from conftest import run_proxy
from fake_upstream import ANSWER, Upstream
from test_agent_apis import config

CLAUDE = pathlib.Path(__file__).parent / "claude" / "node_modules" / ".bin" / "claude"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    upstream = Upstream()
    try:
        for proxy in run_proxy(config(upstream.base_url), tmp_path_factory.mktemp("tally-claude")):
            yield proxy, upstream
    finally:
        upstream.close()


def test_claude_code_completes_a_prompt_through_tally_and_is_billed(setup, tmp_path):
    if not CLAUDE.exists():
        pytest.skip("Claude Code is not installed: run `npm install` in tests/clients/claude (scripts/test.sh does)")
    proxy, upstream = setup
    key = proxy.generate_key({"team_id": "claude-code-team"})
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": proxy.base_url,
        "ANTHROPIC_AUTH_TOKEN": key["key"],
        "ANTHROPIC_MODEL": "claude-sonnet-4-5",
        "ANTHROPIC_SMALL_FAST_MODEL": "claude-sonnet-4-5",
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": "claude-sonnet-4-5",
        "ANTHROPIC_DEFAULT_SONNET_MODEL": "claude-sonnet-4-5",
        "ANTHROPIC_DEFAULT_OPUS_MODEL": "claude-sonnet-4-5",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    before = len(proxy.records())
    done = subprocess.run(
        [str(CLAUDE), "-p", "Say hello.", "--max-turns", "1"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, f"claude failed:\nstdout: {done.stdout}\nstderr: {done.stderr}"
    assert ANSWER in done.stdout
    records = proxy.records()[before:]
    billed = [r for r in records if r["call_type"] == "anthropic_messages"]
    assert billed, f"no billed call in {records}"
    for record in billed:
        assert record["status"] == "success"
        assert record["key_hash"] == key["token"] and record["team_id"] == "claude-code-team"
        assert record["input_tokens"] > 0 and record["output_tokens"] > 0
        assert record["response_cost"] > 0
    sent = [r for r in upstream.requests if r["path"].startswith("/v1/messages")]
    print("claude code sent:", [(r["path"], r["body"].get("stream"), r["headers"].get("anthropic-beta")) for r in sent])
    assert any(r["body"].get("stream") for r in sent), "Claude Code streams its answers"
    assert all(r["headers"]["x-api-key"] == "sk-ant-upstream-key" for r in sent)
    assert len(billed) == len([r for r in sent if r["path"].split("?")[0] == "/v1/messages"])
