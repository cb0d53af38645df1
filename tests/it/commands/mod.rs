//! The operator commands (`tally replay`, `tally queue`, `tally demo`) end to end: the real
//! `tally` binary, real SQLite files, and the Lago emulator on a loopback port.

mod audit;
mod demo;
mod hostile;
mod keys;
mod queue;
mod replay;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use tally::lago_emulator::{EmulatorConfig, EmulatorHandle};
use tempfile::TempDir;

use crate::support::{spawn_lago_emulator, tally_bin};

pub const GENEROUS: Duration = Duration::from_secs(60);
pub const EVENT_CODE: &str = "llm_usage";

/// A working directory (spend logs, state dir) and a Lago emulator.
pub struct Bench {
    pub dir: TempDir,
    pub lago: EmulatorHandle,
    pub charge_by: String,
}

impl Bench {
    pub async fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            lago: spawn_lago_emulator(EmulatorConfig::default()).await,
            charge_by: "end_user_id".into(),
        }
    }

    /// A bench whose Lago emulator runs with `config` (known subscriptions, metrics, webhooks).
    pub async fn with_lago(config: EmulatorConfig) -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            lago: spawn_lago_emulator(config).await,
            charge_by: "end_user_id".into(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path("state")
    }

    pub fn db(&self) -> PathBuf {
        self.state_dir().join("shipper.db")
    }

    /// `tally ARGS` with this bench's settings in the environment (and nothing inherited that
    /// could change them).
    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(tally_bin());
        c.args(args)
            .current_dir(self.dir.path())
            .env("TALLY_STATE_DIR", self.state_dir())
            .env("TALLY_SPEND_LOG", self.path("spend.jsonl"))
            .env("LAGO_API_BASE", self.lago.base_url())
            .env("LAGO_API_KEY", EmulatorConfig::default().api_key)
            .env("LAGO_API_EVENT_CODE", EVENT_CODE)
            .env("LAGO_API_CHARGE_BY", &self.charge_by)
            .env("RUST_LOG", "warn")
            .env_remove("TALLY_LOG_FORMAT")
            .kill_on_drop(true);
        c
    }

    pub async fn run(&self, args: &[&str]) -> Run {
        let out = self.command(args).output().await.unwrap();
        Run::from(out, args)
    }

    /// Runs and expects exit 0 and JSON on stdout.
    pub async fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--output-format", "json"]);
        let run = self.run(&all).await;
        run.assert_code(0);
        run.json()
    }

    pub fn stored_ids(&self) -> Vec<String> {
        self.lago
            .events()
            .into_iter()
            .map(|e| e.transaction_id)
            .collect()
    }
}

/// A finished `tally` process.
pub struct Run {
    pub args: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(out: Output, args: &[&str]) -> Self {
        Self {
            args: args.join(" "),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "tally {}\n--- stdout\n{}\n--- stderr\n{}",
            self.args,
            self.stdout,
            self.stderr
        );
        self
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "tally {}: stdout is not JSON ({e}):\n{}",
                self.args, self.stdout
            )
        })
    }
}

pub fn write(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.concat()).unwrap();
}

pub fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not an integer in {v}"))
}

/// The per-customer rows of a replay summary, as (customer, events, input, output).
pub fn customers(v: &Value) -> Vec<(String, u64, u64, u64)> {
    v["customers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["customer"].as_str().unwrap().to_owned(),
                u(c, "events"),
                u(c, "input_tokens"),
                u(c, "output_tokens"),
            )
        })
        .collect()
}
