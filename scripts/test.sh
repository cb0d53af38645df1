#!/usr/bin/env bash
# Runs every test tally has, on a fresh machine: installs what the tests need first.
#   - a Python venv (.venv) with the official `openai` and `anthropic` SDKs, `langchain-openai`
#     and pytest, and Claude Code from npm (tests/clients/claude),
#     for the client tests, and the pinned `litellm` (tests/pricing/requirements.txt), the oracle
#     the pricing test compares tally's costs with (TALLY_PYTHON points the Rust tests at it);
#   - Debian's systemd, for `systemd-analyze verify/security` on the units;
#   - Debian's postgresql, whose binaries the key-store tests start a throwaway cluster with
#     (initdb in a temp dir, a free port; the system service is not used).
# Then: format check, the check that only the command layer imports src/cli.rs, clippy (warnings
# are errors), the Rust test suite, the client tests.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

# No incremental cache: this script builds once, and the cache costs disk (see Cargo.toml).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step "Python venv for the client tests"
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
  -r tests/clients/requirements.txt -r tests/pricing/requirements.txt

step "Debian packages the tests use"
need_apt=()
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need_apt+=(postgresql)
if ((${#need_apt[@]})); then
  if [[ $(id -u) -eq 0 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "missing ${need_apt[*]}: install with: sudo apt-get install ${need_apt[*]}" >&2
    exit 1
  fi
fi

step "cargo fmt --check"
cargo fmt --check

# The services take validated settings; only main.rs and src/commands/ (the command layer) know
# the clap types of src/cli.rs (docs/architecture.md, "command line").
step "no module outside the command layer imports src/cli.rs"
cli_users=$(grep -rlE '\b(crate|super|tally)::cli\b|crate::\{[^}]*\bcli\b' src --include='*.rs' \
  | grep -vE '^src/(cli\.rs|main\.rs|commands/)' || true)
if [[ -n $cli_users ]]; then
  echo "these import src/cli.rs; pass them settings from src/commands/settings.rs instead:" >&2
  echo "$cli_users" >&2
  exit 1
fi

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings

# One build of the binary and every test, with the dev-dependencies' features (tokio's test-util)
# unified in: a plain `cargo build` first would build the whole dependency tree twice.
step "cargo build (the binary and the tests)"
cargo build --quiet --bins --tests

export TALLY_BIN="$PWD/target/debug/tally"
# Installed above: a key-store test that cannot find PostgreSQL fails here instead of skipping.
export TALLY_REQUIRE_POSTGRES=1
export TALLY_PYTHON="$PWD/.venv/bin/python"
if [[ -n "${CARGO_TARGET_DIR:-}" ]]; then TALLY_BIN="$CARGO_TARGET_DIR/debug/tally"; fi

step "systemd units: verify, security (exposure <= 2.0), sysusers/tmpfiles"
./systemd/check.sh

step "Rust tests (unit + integration, including the OpenAI/LangChain client tests)"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast --failure-output final
else
  cargo test --no-fail-fast
fi

# The disk-trouble test mounts a loop filesystem, so it is #[ignore]d (a green run without root
# must not claim it ran); as root (CI) it runs here.
if [[ $(id -u) -eq 0 ]]; then
  step "Rust tests that need root (loop-mounted state directory)"
  if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --test it --run-ignored only --failure-output final -E 'test(/^reliability::disk::/)'
  else
    cargo test --test it -- --ignored reliability::disk::
  fi
fi

step "Claude Code (npm, pinned in tests/clients/claude/package.json) for its client test"
if command -v npm >/dev/null 2>&1; then
  (cd tests/clients/claude && npm install --no-audit --no-fund --silent)
else
  echo "npm not found: the Claude Code test is skipped (install Node.js >= 22 and npm)" >&2
fi

step "Python client tests (official openai and anthropic SDKs, langchain-openai, Claude Code against a running tally proxy)"
TALLY_BIN="$TALLY_BIN" .venv/bin/python -m pytest tests/clients -q
