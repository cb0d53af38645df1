//! `tally ship` end to end: a spend-log file on disk → the tailer → the outbox (a real SQLite file
//! in a tempdir) → the Lago emulator on port 0. Each test ends by checking what Lago holds:
//! every billable record exactly once, with the record's end time as its timestamp.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tally::lago_emulator::{EmulatorConfig, EmulatorHandle, Fault};
use tally::ship::outbox::{Outbox, Stats};
use tally::ship::{ApiKey, ShipSettings, run_with};
use tally::spend::SpendRecord;
use tokio_util::sync::CancellationToken;

use crate::support::{Later, SpendLine, spawn_lago_emulator, tally_bin, wait_until, watch_end};

const KEY: &str = "lago-e2e-key";
const READ_ONLY_KEY: &str = "lago-e2e-read-only";
const LONG: Duration = Duration::from_secs(120);

pub struct Env {
    pub dir: tempfile::TempDir,
    pub emu: EmulatorHandle,
}

impl Env {
    pub async fn new() -> Self {
        let emu = spawn_lago_emulator(EmulatorConfig {
            api_key: KEY.into(),
            read_only_api_key: Some(READ_ONLY_KEY.into()),
            ..Default::default()
        })
        .await;
        Self {
            dir: tempfile::tempdir().unwrap(),
            emu,
        }
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("spend.jsonl")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn settings_with_key(&self, key: &str) -> ShipSettings {
        let mut s = ShipSettings::new(
            self.log(),
            self.state(),
            &self.emu.base_url(),
            ApiKey::new(key),
            "llm_usage",
        )
        .unwrap();
        s.tuning.retry_cap = Duration::from_millis(500);
        s.tuning.linger = Duration::from_millis(5);
        s.tuning.poll_interval = Duration::from_millis(100);
        s.tuning.drain_deadline = Duration::from_secs(5);
        s
    }

    pub fn settings(&self) -> ShipSettings {
        self.settings_with_key(KEY)
    }

    pub fn stats(&self) -> Stats {
        Outbox::open_in(&self.state()).unwrap().stats().unwrap()
    }

    /// What Lago holds: transaction_id → (how many times, timestamp ms, subscription).
    pub fn at_lago(&self) -> HashMap<String, (usize, i64, Option<String>)> {
        let mut out: HashMap<String, (usize, i64, Option<String>)> = HashMap::new();
        for e in self.emu.events() {
            let entry = out.entry(e.transaction_id.clone()).or_insert((
                0,
                e.timestamp_millis,
                e.external_subscription_id.clone(),
            ));
            entry.0 += 1;
        }
        out
    }

    /// Waits until Lago holds `n` events.
    pub async fn wait_at_lago(&self, n: usize) {
        let what = Later(|| {
            format!(
                "Lago to hold {n} events; it holds {}",
                self.emu.event_count()
            )
        });
        wait_until(what, LONG, async || self.emu.event_count() >= n).await;
    }

    /// Waits until the outbox (opened afresh each time, as another process writes it) says `done`.
    pub async fn wait_outbox(&self, what: &str, done: impl Fn(&Stats) -> bool) {
        let state = self.state();
        wait_until(format!("the outbox: {what}"), LONG, async || {
            Outbox::open_in(&state)
                .and_then(|o| o.stats())
                .is_ok_and(|s| done(&s))
        })
        .await;
    }

    /// Every record in `records` is at Lago exactly once, with its end time; nothing else is.
    pub fn assert_exactly_once(&self, records: &[SpendRecord]) {
        let at = self.at_lago();
        for r in records {
            let Some((n, ts, _)) = at.get(&r.transaction_id) else {
                panic!("{} never reached Lago", r.transaction_id)
            };
            assert_eq!(*n, 1, "{} reached Lago {n} times", r.transaction_id);
            assert_eq!(*ts, r.end_time.timestamp_millis(), "{}", r.transaction_id);
        }
        assert_eq!(at.len(), records.len(), "Lago holds unexpected events");
    }
}

pub fn append(path: &Path, records: &[SpendRecord]) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    for r in records {
        f.write_all(&r.to_line()).unwrap();
    }
}

pub fn records(prefix: &str, range: std::ops::Range<usize>) -> Vec<SpendRecord> {
    range
        .map(|i| {
            SpendLine::new(format!("{prefix}-{i:06}"))
                .end_user(format!("cust-{}", i % 7))
                .end_ms(i as i64 * 13)
                .record()
        })
        .collect()
}

/// The shipper running in this process.
pub struct Running {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub fn start(settings: ShipSettings) -> Self {
        let stop = CancellationToken::new();
        let ending = watch_end();
        let run = run_with(settings, stop.clone());
        let handle = tokio::spawn(async move {
            let result = run.await;
            if let Err(e) = &result {
                *ending.lock().unwrap() = Some(format!("tally ship: {e:#}"));
            }
            result
        });
        Self { stop, handle }
    }

    /// Stops it abruptly: its tasks are dropped mid-flight (what a crash leaves in the outbox,
    /// short of SQLite's own crash safety, which the kill -9 test covers).
    pub async fn abort(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }

    /// SIGTERM-like stop: must drain and return Ok.
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(LONG, self.handle)
            .await
            .expect("the shipper stops within its drain deadline")
            .unwrap()
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_log_reaches_lago_exactly_once_with_record_timestamps() {
    let env = Env::new().await;
    let all = records("live", 0..600);
    append(&env.log(), &all[..100]);
    let ship = Running::start(env.settings());
    // Lines appended while it runs, in several writes.
    for chunk in all[100..].chunks(125) {
        env.wait_at_lago(100).await;
        append(&env.log(), chunk);
    }
    env.wait_at_lago(600).await;
    ship.stop().await;
    env.assert_exactly_once(&all);
    let at = env.at_lago();
    assert_eq!(at["live-000003"].2.as_deref(), Some("cust-3"));
    let stats = env.stats();
    assert_eq!((stats.acked, stats.pending, stats.dead), (600, 0, 0));
    // Batched: far fewer requests than events.
    assert!(env.emu.counters().batch_requests < 600 / 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_malformed_and_conflicting_lines_are_kept_and_not_billed() {
    let env = Env::new().await;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/spend");
    std::fs::copy(fixtures.join("malformed.jsonl"), env.log()).unwrap();
    let ship = Running::start(env.settings());
    env.wait_outbox("7 rejected, 1 acked", |s| s.rejected == 7 && s.acked == 1)
        .await;
    ship.stop().await;
    let at = env.at_lago();
    assert_eq!(at.len(), 1);
    assert_eq!(at["0193a1b2-0000-7000-8000-000000000001"].0, 1);
    let stats = env.stats();
    assert_eq!((stats.held, stats.pending), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_restart_resends_nothing_and_replays_never_bill_twice() {
    let env = Env::new().await;
    let first = records("replay", 0..300);
    append(&env.log(), &first);
    let ship = Running::start(env.settings());
    env.wait_at_lago(300).await;
    ship.stop().await;

    // While stopped, more lines arrive; a clean restart sends only those.
    let second = records("replay", 300..400);
    append(&env.log(), &second);
    let ship = Running::start(env.settings());
    env.wait_at_lago(400).await;
    ship.stop().await;
    assert_eq!(
        env.emu.counters().duplicates,
        0,
        "nothing resent after a clean stop"
    );

    // The whole log copied as a new file (a restore, a re-rotation): already seen, not billed.
    let old = env.dir.path().join("spend.jsonl.restored");
    std::fs::rename(env.log(), &old).unwrap();
    std::fs::copy(&old, env.log()).unwrap();
    let requests_before = env.emu.counters().batch_requests;
    let ship = Running::start(env.settings());
    let state = env.state();
    wait_until("a read position in the live log", LONG, async || {
        Outbox::open_in(&state)
            .and_then(|o| o.positions())
            .is_ok_and(|p| p.iter().any(|p| p.offset > 0 && p.path == env.log()))
    })
    .await;
    ship.stop().await;
    assert_eq!(env.emu.counters().batch_requests, requests_before);

    // A shipper that lost its outbox resends everything: Lago answers duplicates, which are
    // acked, and still holds each event once.
    std::fs::remove_dir_all(env.state()).unwrap();
    let ship = Running::start(env.settings());
    env.wait_outbox("400 acked, none pending", |s| {
        s.acked == 400 && s.pending == 0
    })
    .await;
    ship.stop().await;
    assert!(env.emu.counters().duplicates >= 400);
    let all: Vec<_> = first.into_iter().chain(second).collect();
    env.assert_exactly_once(&all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_key_stops_sending_until_the_key_is_fixed() {
    let env = Env::new().await;
    let all = records("key", 0..150);
    append(&env.log(), &all);
    for (key, status) in [("wrong-key", "401"), (READ_ONLY_KEY, "403")] {
        let ship = Running::start(env.settings_with_key(key));
        env.wait_outbox(
            &format!("{status} as the last Lago error, 150 pending"),
            |s| {
                s.last_lago_error
                    .as_ref()
                    .is_some_and(|e| e.message.contains(status))
                    && s.pending == 150
            },
        )
        .await;
        // Keeps probing, dead-letters nothing, sends nothing through.
        let before = env.emu.counters().requests;
        wait_until("another request at Lago", LONG, async || {
            env.emu.counters().requests > before
        })
        .await;
        ship.stop().await;
        let stats = env.stats();
        assert_eq!((stats.pending, stats.dead, stats.acked), (150, 0, 0));
        assert!(!stats.last_lago_error.unwrap().message.contains(key));
        assert_eq!(env.emu.event_count(), 0);
        let stored = std::fs::read(env.state().join("shipper.db")).unwrap();
        assert!(
            !stored.windows(key.len()).any(|w| w == key.as_bytes()),
            "the key must not be stored"
        );
    }
    // Fixed: restart with the right key.
    let ship = Running::start(env.settings());
    env.wait_at_lago(150).await;
    ship.stop().await;
    env.assert_exactly_once(&all);
    assert!(env.stats().last_lago_error.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_resets_rate_limits_and_refused_connections_are_ridden_out() {
    let env = Env::new().await;
    env.emu.inject(Fault::ServerError {
        status: 503,
        count: 3,
    });
    env.emu.inject(Fault::ResetConnection { count: 2 });
    env.emu.inject(Fault::RateLimit {
        count: 1,
        reset_secs: 1,
        retry_after: false,
    });
    env.emu.inject(Fault::DropResponse { count: 2 });
    let all = records("faults", 0..500);
    append(&env.log(), &all);
    let ship = Running::start(env.settings());
    env.wait_at_lago(100).await;
    env.emu.inject(Fault::RefuseConnections {
        duration: Duration::from_millis(800),
    });
    env.wait_at_lago(500).await;
    env.wait_outbox("500 acked", |s| s.acked == 500).await;
    ship.stop().await;
    env.assert_exactly_once(&all);
    assert_eq!(env.emu.pending_faults(), 0);
    assert_eq!(env.stats().dead, 0);
}

// ---- the real binary, killed with SIGKILL at several points ----

struct Child {
    child: std::process::Child,
}

impl Child {
    fn spawn(env: &Env) -> Self {
        let child = std::process::Command::new(tally_bin())
            .arg("ship")
            .env("LAGO_API_BASE", env.emu.base_url())
            .env("LAGO_API_KEY", KEY)
            .env("LAGO_API_EVENT_CODE", "llm_usage")
            .env("TALLY_SPEND_LOG", env.log())
            .env("TALLY_STATE_DIR", env.state())
            .env("TALLY_RETRY_CAP_SECS", "1")
            .env("TALLY_LINGER_MS", "5")
            .env("TALLY_POLL_INTERVAL_MS", "100")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Self { child }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: sending a signal to our own child by its pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    fn kill9(mut self) {
        self.signal(libc::SIGKILL);
        self.child.wait().unwrap();
    }

    async fn terminate(mut self) -> std::process::ExitStatus {
        crate::support::sigterm_when_handled(&self.child);
        wait_until("tally ship to exit after SIGTERM", LONG, async || {
            self.child.try_wait().unwrap()
        })
        .await
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_any_point_still_bills_every_record_exactly_once() {
    let env = Env::new().await;
    let all = records("kill", 0..20_000);
    append(&env.log(), &all[..15_000]);

    // 1. Mid-read: killed as soon as it started reading (maybe before its first commit).
    let ship = Child::spawn(&env);
    let outbox = env.state().join("shipper.db");
    wait_until("the outbox file", LONG, async || outbox.exists()).await;
    ship.kill9();

    // 2. Mid-batch: requests held by the server when the process dies (nothing stored yet).
    env.emu.inject(Fault::Delay {
        duration: Duration::from_secs(3),
        count: 4,
    });
    let ship = Child::spawn(&env);
    let held_before = env.emu.counters().requests;
    wait_until("a request held at Lago", LONG, async || {
        env.emu.counters().requests > held_before
    })
    .await;
    ship.kill9();
    env.emu.clear_faults();

    // 3. After Lago stored a batch but before the outbox heard of it.
    env.emu.inject(Fault::DropResponse { count: 1_000 });
    let ship = Child::spawn(&env);
    wait_until("an event at Lago", LONG, async || env.emu.event_count() > 0).await;
    ship.kill9();
    env.emu.clear_faults();
    let stored_unheard = env.emu.event_count();
    assert!(stored_unheard > 0);

    // 4. Mid-stream, while lines are still being appended.
    let ship = Child::spawn(&env);
    append(&env.log(), &all[15_000..17_000]);
    wait_until("1,000 more events at Lago", LONG, async || {
        env.emu.event_count() > stored_unheard + 1_000
    })
    .await;
    ship.kill9();
    append(&env.log(), &all[17_000..]);

    // Finally a run to completion and a clean stop (exit status 0).
    let ship = Child::spawn(&env);
    env.wait_at_lago(all.len()).await;
    env.wait_outbox("every event acked", |s| s.acked == all.len() as u64)
        .await;
    let status = ship.terminate().await;
    assert!(status.success(), "{status:?}");
    env.assert_exactly_once(&all);
    // The batches Lago stored but the shipper never heard of were resent and absorbed.
    assert!(env.emu.counters().duplicates >= stored_unheard as u64);
}

/// One sender per outbox: two `tally ship` on one state directory never send the same event
/// (Lago would answer the second copy as a duplicate), and when the one sending is killed the
/// other takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shippers_on_one_state_dir_send_each_event_once_and_take_over() {
    let env = Env::new().await;
    let all = records("pair", 0..8_000);
    let first = Child::spawn(&env);
    let outbox = env.state().join("shipper.db");
    wait_until("the outbox file", LONG, async || outbox.exists()).await;
    let second = Child::spawn(&env);
    // Slow answers keep batches in flight for seconds while both processes read the same lines:
    // two senders would both send the oldest pending events.
    env.emu.inject(Fault::Delay {
        duration: Duration::from_millis(300),
        count: 40,
    });
    append(&env.log(), &all[..5_000]);
    env.wait_at_lago(5_000).await;
    env.wait_outbox("5,000 acked", |s| s.acked == 5_000).await;
    assert_eq!(env.emu.counters().duplicates, 0, "an event was sent twice");

    // Whichever was sending, kill the first: the second (reading all along) delivers the rest.
    first.kill9();
    append(&env.log(), &all[5_000..]);
    env.wait_at_lago(all.len()).await;
    env.wait_outbox("every event acked", |s| s.acked == all.len() as u64)
        .await;
    assert!(second.terminate().await.success());
    env.assert_exactly_once(&all);
    assert_eq!(env.emu.counters().duplicates, 0, "an event was sent twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let env = Env::new().await;
    let all = records("term", 0..2_000);
    append(&env.log(), &all);
    let ship = Child::spawn(&env);
    wait_until("an event at Lago", LONG, async || env.emu.event_count() > 0).await;
    let status = ship.terminate().await;
    assert!(status.success(), "{status:?}");
    let ship = Child::spawn(&env);
    env.wait_at_lago(all.len()).await;
    assert!(ship.terminate().await.success());
    env.assert_exactly_once(&all);
}

#[test]
fn invalid_settings_stop_start_up_naming_the_variable() {
    let out = std::process::Command::new(tally_bin())
        .arg("ship")
        .env("LAGO_API_BASE", "ftp://lago")
        .env("LAGO_API_KEY", "super-secret-key")
        .env("LAGO_API_EVENT_CODE", "llm_usage")
        .env(
            "TALLY_STATE_DIR",
            std::env::temp_dir().join("tally-never-created"),
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("LAGO_API_BASE") && err.contains("http or https"),
        "{err}"
    );
    assert!(!err.contains("super-secret-key"), "{err}");
    let out = std::process::Command::new(tally_bin())
        .arg("ship")
        .env("LAGO_API_BASE", "http://127.0.0.1:9")
        .env("LAGO_API_KEY", "super-secret-key")
        .env("LAGO_API_EVENT_CODE", "llm_usage")
        .env("LAGO_API_CHARGE_BY", "customer_id")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("LAGO_API_CHARGE_BY") && err.contains("end_user_id, user_id, team_id"),
        "{err}"
    );
}

#[test]
fn a_webhook_address_in_use_stops_start_up_saying_why_once() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = std::process::Command::new(tally_bin())
        .args(["ship", "--webhook-addr", &addr])
        .env("LAGO_API_BASE", "http://127.0.0.1:9")
        .env("LAGO_API_KEY", "super-secret-key")
        .env("LAGO_API_EVENT_CODE", "llm_usage")
        .env("TALLY_SPEND_LOG", dir.path().join("spend.jsonl"))
        .env("TALLY_STATE_DIR", dir.path().join("state"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("tally: error:"))
        .unwrap_or_else(|| panic!("no error line: {err}"));
    assert!(
        line.contains(&format!(
            "cannot listen for Lago webhooks on {addr} (TALLY_WEBHOOK_ADDR)"
        )),
        "{line}"
    );
    // The OS's reason, once: the error quotes its cause, and the chain does not repeat it.
    assert_eq!(line.matches("Address already in use").count(), 1, "{line}");
    drop(taken);
}
