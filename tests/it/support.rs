//! Shared helpers for the integration tests.

#![allow(dead_code)]

use std::path::PathBuf;

use tally::spend::Status;

/// The `tally` binary cargo built for these tests.
/// A loopback port for a server that a child process (or the test itself, later) binds: one
/// below the kernel's ephemeral range, so no `bind(0)` or outgoing connection anywhere can take
/// it between this check and that bind (a released ephemeral port was taken so, now and then,
/// under a full test run). Falls back to an ephemeral port where the range cannot be read.
pub fn free_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|low| *low > 20_000);
    if let Some(low) = low {
        for _ in 0..100 {
            let port = rand::random_range(10_000..low);
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn tally_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tally"))
}

thread_local! {
    /// The end results of services this test runs in-process (see [`watch_end`]).
    static ENDINGS: std::cell::RefCell<Vec<Ending>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Where an in-process service writes the error it ended with.
pub type Ending = std::sync::Arc<std::sync::Mutex<Option<String>>>;

/// Registers a service started by this test (on this thread, which polls the test's body): if it
/// ends with an error, [`wait_until`] fails at once with that error instead of waiting out its
/// timeout with no clue.
pub fn watch_end() -> Ending {
    let ending = Ending::default();
    ENDINGS.with(|e| e.borrow_mut().push(ending.clone()));
    ending
}

fn ended_early() -> Option<String> {
    ENDINGS.with(|e| {
        e.borrow()
            .iter()
            .find_map(|ending| ending.lock().ok().and_then(|g| g.clone()))
    })
}

/// What a wait's probe answers: `true` or `Some(value)` once the condition holds.
pub trait Ready {
    type Value;
    fn ready(self) -> Option<Self::Value>;
}

impl Ready for bool {
    type Value = ();
    fn ready(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Ready for Option<T> {
    type Value = T;
    fn ready(self) -> Option<T> {
        self
    }
}

/// A failure message built only if a wait times out, so it can report the state at that moment
/// (a child's stderr, the queue's stats): `Later(|| format!(...))`.
pub struct Later<F>(pub F);

impl<F: Fn() -> String> std::fmt::Display for Later<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&(self.0)())
    }
}

/// How often the wait helpers ask again: short, since a probe only costs what it checks.
const POLL_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

fn timed_out(what: impl std::fmt::Display, timeout: std::time::Duration) -> ! {
    panic!("timed out after {timeout:?} waiting for: {what}")
}

/// Calls `probe` on this thread until it answers `true` or `Some`, or panics naming `what` after
/// `timeout`. For eventual conditions in synchronous code: no fixed sleeps as synchronisation.
/// Async code uses [`wait_until`], which does not block the runtime.
pub fn wait_for<R: Ready>(
    what: impl std::fmt::Display,
    timeout: std::time::Duration,
    mut probe: impl FnMut() -> R,
) -> R::Value {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().ready() {
            return v;
        }
        if std::time::Instant::now() >= deadline {
            timed_out(what, timeout);
        }
        std::thread::sleep(POLL_EVERY);
    }
}

/// Awaits `probe` until it answers `true` or `Some`, or panics naming `what` after `timeout`.
/// Generous timeouts are fine: this only waits as long as the condition takes. A service this
/// test runs in-process (see [`watch_end`]) that ends with an error fails the wait at once.
pub async fn wait_until<R: Ready>(
    what: impl std::fmt::Display,
    timeout: std::time::Duration,
    mut probe: impl AsyncFnMut() -> R,
) -> R::Value {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await.ready() {
            return v;
        }
        if let Some(error) = ended_early() {
            panic!(
                "stopped waiting for {what}: a service this test runs in-process ended: {error}"
            );
        }
        if std::time::Instant::now() >= deadline {
            timed_out(what, timeout);
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// A small deterministic PRNG (SplitMix64) for seeded model-based tests.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// A Lago emulator on 127.0.0.1, port 0, serving in the background of the current runtime.
pub async fn spawn_lago_emulator(
    config: tally::lago_emulator::EmulatorConfig,
) -> tally::lago_emulator::EmulatorHandle {
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], 0).into();
    tally::lago_emulator::spawn(config, addr)
        .await
        .expect("the Lago emulator binds a free loopback port")
}

/// A spend-log record for a test, from a billable default: a successful gpt-4o chat call of 7 +
/// 15 tokens costing $0.0001675, made with a virtual key (`key_hash`) and charged to nobody yet,
/// that took 250 ms and ended at 2026-11-27T10:00:00.250Z. Each setter changes one thing:
/// `SpendLine::new("tx-1").end_user("cust-1").tokens(3, 4).cost(0.5).to_line()`.
#[derive(Debug, Clone)]
pub struct SpendLine(tally::spend::SpendRecord);

impl SpendLine {
    /// The time every record's end is counted from ([`SpendLine::end_ms`]).
    const BASE: &str = "2026-11-27T10:00:00Z";
    const DURATION_MS: i64 = 250;

    pub fn new(transaction_id: impl Into<String>) -> Self {
        let line = Self(tally::spend::SpendRecord {
            schema: tally::spend::SCHEMA_VERSION,
            transaction_id: transaction_id.into(),
            start_time: None,
            end_time: chrono::DateTime::<chrono::Utc>::UNIX_EPOCH,
            call_type: "chat_completion".into(),
            model: "gpt-4o".into(),
            upstream_model: Some("gpt-4o-2024-08-06".into()),
            input_tokens: 7,
            output_tokens: 15,
            total_tokens: Some(22),
            cache_read_input_tokens: 0,
            cache_creation_input_tokens: 0,
            reasoning_tokens: 0,
            usage_estimated: false,
            response_cost: Some(0.0001675),
            end_user_id: None,
            user_id: None,
            team_id: None,
            key_alias: None,
            key_hash: Some("ab".repeat(32)),
            stream: false,
            status: Status::Success,
            duration_ms: Some(Self::DURATION_MS as u64),
        });
        line.end_ms(Self::DURATION_MS)
    }

    /// Ends `ms` milliseconds after 2026-11-27T10:00:00Z (and started 250 ms before).
    pub fn end_ms(self, ms: i64) -> Self {
        let base: chrono::DateTime<chrono::Utc> = Self::BASE.parse().expect("a valid base time");
        self.ended(base + chrono::Duration::milliseconds(ms))
    }

    /// Ends at `rfc3339` (and started 250 ms before).
    pub fn end_time(self, rfc3339: &str) -> Self {
        let end = chrono::DateTime::parse_from_rfc3339(rfc3339)
            .unwrap_or_else(|e| panic!("{rfc3339}: {e}"))
            .with_timezone(&chrono::Utc);
        self.ended(end)
    }

    fn ended(mut self, end: chrono::DateTime<chrono::Utc>) -> Self {
        self.0.end_time = end;
        self.0.start_time = Some(end - chrono::Duration::milliseconds(Self::DURATION_MS));
        self
    }

    pub fn end_user(mut self, id: impl Into<String>) -> Self {
        self.0.end_user_id = Some(id.into());
        self
    }

    pub fn user(mut self, id: impl Into<String>) -> Self {
        self.0.user_id = Some(id.into());
        self
    }

    pub fn team(mut self, id: impl Into<String>) -> Self {
        self.0.team_id = Some(id.into());
        self
    }

    pub fn key_alias(mut self, alias: impl Into<String>) -> Self {
        self.0.key_alias = Some(alias.into());
        self
    }

    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.0.model = model.into();
        self
    }

    /// Input and output tokens; the total is their sum.
    pub fn tokens(mut self, input: u64, output: u64) -> Self {
        self.0.input_tokens = input;
        self.0.output_tokens = output;
        self.0.total_tokens = Some(input + output);
        self
    }

    pub fn cost(mut self, usd: f64) -> Self {
        self.0.response_cost = Some(usd);
        self
    }

    pub fn record(self) -> tally::spend::SpendRecord {
        self.0
    }

    /// The line as tally's proxy writes it, `\n` included.
    pub fn to_line(&self) -> String {
        String::from_utf8(self.0.to_line()).expect("a record is written as UTF-8")
    }
}

/// SIGTERM to `child`, sent once the child handles it. Between exec and the first lines of `main`
/// a program has no handler yet, and the signal ends it the default way (killed by the signal,
/// not a clean exit), as it would any program; tests of the clean stop wait that moment out by
/// watching the caught-signal mask in `/proc/<pid>/status`.
pub fn sigterm_when_handled(child: &std::process::Child) {
    let pid = child.id();
    let status_file = format!("/proc/{pid}/status");
    let sigterm_bit = 1u64 << (libc::SIGTERM - 1);
    wait_for(
        format!("process {pid} to handle SIGTERM"),
        std::time::Duration::from_secs(60),
        || {
            let status = std::fs::read_to_string(&status_file).ok()?;
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(str::trim)
            };
            // Already exited (a zombie): signalling is harmless and the exit status tells.
            let exited = field("State:").is_some_and(|s| s.starts_with('Z'));
            let caught = field("SigCgt:").and_then(|m| u64::from_str_radix(m, 16).ok())?;
            (exited || caught & sigterm_bit != 0).then_some(())
        },
    );
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
}
