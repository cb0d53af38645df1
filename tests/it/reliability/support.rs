//! Shared rig for the reliability tests (docs/reliability.md): a temporary directory with a live
//! spend log and a state directory, the Lago emulator on a loopback port, and the real `tally ship`
//! binary run as a child process so it can be SIGKILLed and restarted.
//!
//! `TALLY_FAULT_FULL=1` switches the fault tests to their long variants (`scripts/fault-suite.sh`).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tally::lago_emulator::{EmulatorConfig, EmulatorHandle};
use tempfile::TempDir;

use crate::support::{Later, spawn_lago_emulator, tally_bin, wait_until};

/// Long enough for anything on a loaded 2-core machine; only ever waited for a condition.
pub const PATIENCE: Duration = Duration::from_secs(240);
pub const EVENT_CODE: &str = "llm_usage";

/// Whether the long variants were asked for (`TALLY_FAULT_FULL=1`).
pub fn full_variant() -> bool {
    std::env::var("TALLY_FAULT_FULL").is_ok_and(|v| v == "1")
}

/// Prints one figure line that `scripts/fault-suite.sh` collects into its summary.
pub fn figure(test: &str, text: impl std::fmt::Display) {
    eprintln!("FIGURE {test}: {text}");
}

pub struct Rig {
    pub dir: TempDir,
    pub lago: EmulatorHandle,
}

impl Rig {
    pub async fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            lago: spawn_lago_emulator(EmulatorConfig::default()).await,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn log(&self) -> PathBuf {
        self.path("spend.jsonl")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path("state")
    }

    /// Where every shipper run of this rig appends its stderr.
    pub fn stderr_path(&self) -> PathBuf {
        self.path("ship.stderr")
    }

    /// `tally ARGS` with this rig's settings and nothing inherited that could change them.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(tally_bin());
        c.args(args)
            .current_dir(self.dir.path())
            .env("TALLY_STATE_DIR", self.state_dir())
            .env("TALLY_SPEND_LOG", self.log())
            .env("LAGO_API_BASE", self.lago.base_url())
            .env("LAGO_API_KEY", EmulatorConfig::default().api_key)
            .env("LAGO_API_EVENT_CODE", EVENT_CODE)
            .env("LAGO_API_CHARGE_BY", "end_user_id")
            .env("RUST_LOG", "info")
            .env_remove("TALLY_LOG_FORMAT");
        c
    }

    /// Starts `tally ship` with fast polling and short retries (plus `extra` flags); its stderr is
    /// appended to [`Rig::stderr_path`].
    pub fn spawn_ship(&self, extra: &[&str]) -> Shipper {
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.stderr_path())
            .unwrap();
        let mut args = vec![
            "ship",
            "--poll-interval-ms",
            "200",
            "--retry-cap-secs",
            "2",
            "--linger-ms",
            "5",
        ];
        args.extend_from_slice(extra);
        let child = self
            .command(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap();
        Shipper { child: Some(child) }
    }

    /// `tally queue ARGS --output-format json`, expecting exit 0.
    pub fn queue_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["queue"];
        all.extend_from_slice(args);
        all.extend(["--output-format", "json"]);
        let out = self.command(&all).output().unwrap();
        assert!(
            out.status.success(),
            "tally {all:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "tally {all:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Pending events according to `tally queue stats` (0 before the outbox exists).
    pub fn pending(&self) -> u64 {
        if !self.state_dir().join("shipper.db").exists() {
            return 0;
        }
        self.queue_json(&["stats"])["pending"].as_u64().unwrap()
    }

    /// Every rejected line: (reason, first bytes).
    pub fn rejected(&self) -> Vec<(String, String)> {
        let v = self.queue_json(&["list", "--state", "rejected", "--limit", "100000"]);
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["reason"].as_str().unwrap_or_default().to_owned(),
                    i["first_bytes"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    /// How many times each transaction id is stored at Lago.
    pub fn stored_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for e in self.lago.events() {
            *counts.entry(e.transaction_id).or_insert(0) += 1;
        }
        counts
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }

    /// Waits until Lago holds at least `n` events.
    pub async fn wait_stored(&self, n: usize, what: &str) {
        let what = Later(|| {
            format!(
                "{what}: Lago to hold {n} events; it has {}; shipper stderr tail:\n{}",
                self.lago.event_count(),
                tail(&self.stderr_text(), 40)
            )
        });
        wait_until(what, PATIENCE, async || self.lago.event_count() >= n).await;
    }

    /// Waits until Lago holds at least `n` events while `ship` keeps running. A shipper that
    /// exits fails the wait at once with its status (instead of a timeout long after), and a
    /// timeout reports where the shipper is: `tally queue stats` (pending, positions, lag) and the
    /// spend-log files with their sizes.
    pub async fn wait_stored_running(&self, ship: &mut Shipper, n: usize, what: &str) {
        let timeout = Later(|| self.where_the_shipper_is(what, n));
        let exited = wait_until(timeout, PATIENCE, async || {
            if self.lago.event_count() >= n {
                return Some(None);
            }
            ship.exited().map(Some)
        })
        .await;
        if let Some(status) = exited {
            panic!(
                "{what}: the shipper exited ({status}) with {} of {n} events at Lago; stderr tail:\n{}",
                self.lago.event_count(),
                tail(&self.stderr_text(), 40)
            );
        }
    }

    /// For a wait for `n` events that timed out: Lago's count, `tally queue stats`, the files.
    fn where_the_shipper_is(&self, what: &str, n: usize) -> String {
        let mut files: Vec<String> = std::fs::read_dir(self.dir.path())
            .map(|d| {
                d.flatten()
                    .map(|e| {
                        let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                        format!("{} ({len} bytes)", e.file_name().to_string_lossy())
                    })
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        let stats = self
            .command(&["queue", "stats", "--output-format", "json"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        format!(
            "{what}: Lago to hold {n} events; it has {}; queue stats: {stats}\nfiles: {files:#?}\nshipper stderr tail:\n{}",
            self.lago.event_count(),
            tail(&self.stderr_text(), 40)
        )
    }

    /// Asserts Lago holds exactly `ids`, each once.
    pub fn assert_exactly_once(&self, ids: &[String]) {
        let counts = self.stored_counts();
        let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).take(10).collect();
        assert!(twice.is_empty(), "billed more than once: {twice:?}");
        let missing: Vec<_> = ids
            .iter()
            .filter(|id| !counts.contains_key(*id))
            .take(10)
            .collect();
        assert!(missing.is_empty(), "never billed: {missing:?}");
        assert_eq!(counts.len(), ids.len(), "Lago holds ids nobody wrote");
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A running `tally ship`; killed (SIGKILL) when dropped.
pub struct Shipper {
    pub child: Option<Child>,
}

impl Shipper {
    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit (the drain path).
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        crate::support::sigterm_when_handled(&c);
        c.wait().ok()
    }

    /// The exit status if it has stopped.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for Shipper {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Appends to the live spend log the way tally's proxy does: one `write(2)` per line on an
/// `O_APPEND` file, rotation by renaming to `<name>.<UTC YYYYMMDDTHHMMSS.mmmZ>` and opening a
/// fresh live file.
pub struct LogWriter {
    path: PathBuf,
    file: File,
    pub size: u64,
    pub rotations: usize,
}

impl LogWriter {
    pub fn open(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            file: open_append(path),
            size: 0,
            rotations: 0,
        }
    }

    pub fn append(&mut self, bytes: &[u8]) {
        self.file.write_all(bytes).unwrap();
        self.size += bytes.len() as u64;
    }

    pub fn rotate(&mut self) -> PathBuf {
        let rotated = rotated_name(&self.path);
        std::fs::rename(&self.path, &rotated).unwrap();
        self.file = open_append(&self.path);
        self.size = 0;
        self.rotations += 1;
        rotated
    }
}

fn open_append(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}

/// `<name>.<UTC YYYYMMDDTHHMMSS.mmmZ>`, bumped a millisecond while taken (as the proxy does).
pub fn rotated_name(live: &Path) -> PathBuf {
    let name = live.file_name().unwrap().to_string_lossy().into_owned();
    let mut at = chrono::Utc::now();
    loop {
        let candidate = live.with_file_name(format!("{name}.{}", at.format("%Y%m%dT%H%M%S%.3fZ")));
        if !candidate.exists() {
            return candidate;
        }
        at += chrono::Duration::milliseconds(1);
    }
}
