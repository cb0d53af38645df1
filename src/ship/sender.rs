//! The sender: claims pending events from the outbox in batches, keeps several batch requests in
//! flight, and applies Lago's answer to each event (docs/delivery.md, "Retry policy").
//!
//! - One sender per outbox: it holds the outbox's [`SenderLock`] (a second `tally ship` on the same
//!   state directory waits for it), so claiming is a read and what is in flight is a set in
//!   memory. Claims read on a connection of their own, beside the reader's ingest. The acks of
//!   responses that arrive together are committed together; an ack lost in a crash means a
//!   resend, which Lago answers as a duplicate.
//! - 200 → acked. 422 per index → `value_already_exist` acked, other reasons dead with Lago's
//!   words, the rest resent at once (a 422 batch stored nothing). 422 about the whole batch →
//!   split in halves until the culprit stands alone (then dead with the body). 400 → dead.
//! - A claimed batch is cut to `TALLY_BATCH_MAX_BYTES` before it is sent. 413 (a body limit of
//!   Lago or of a proxy in front of it) → split in halves and resent at once (nothing was stored);
//!   an event refused alone is dead with the reason.
//! - A redirect, a 2xx that is not Lago's `{"events": [...]}` envelope for the batch, or an answer
//!   longer than the shipper reads → not an ack: the events stay pending and are retried with
//!   backoff, the reason kept as the last Lago error (`tally queue stats`).
//! - 401/403 → nothing is dead-lettered: the batch keeps probing (capped backoff), no new batches
//!   are claimed, an error is logged at most once a minute and kept as the last Lago error.
//! - 429 → wait `Retry-After` / `X-RateLimit-Reset`. 5xx, other statuses, timeouts, resets,
//!   refused connections → exponential backoff with jitter (backon), capped, forever.
//! - Shutdown: no new batches; a request in flight may finish until the drain deadline, then it
//!   is abandoned and its events released (still pending; a resend is a harmless duplicate).
//! - Storage trouble (the outbox cannot be written: disk full, read-only): every outbox write
//!   waits and retries ([`crate::ship::storage`]); nothing new is claimed meanwhile. A batch Lago
//!   already accepted keeps its ids in memory and retries the ack until it is recorded; if the
//!   shipper is stopped first, the events stay pending and are resent at the next start, where
//!   Lago answers `value_already_exist` and they are acked — never billed twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use hashbrown::HashSet;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::logging::Repeated;
use crate::metrics::ship::{LagoOutcome, ShipMetrics};
use crate::ship::lago::SendError;
use crate::ship::lago::{Answer, IndexError, LagoClient, redirect_note};
use crate::ship::outbox::with_outbox;
use crate::ship::outbox::{
    ClaimCursor, ClaimedEvent, Outbox, OutboxError, SenderLock, SharedOutbox,
};
use crate::ship::settings::Tuning;
use crate::ship::signal::WorkSignal;
use crate::ship::storage::{StorageGate, trouble, with_outbox_waiting};
use crate::ship::supervise;

/// With nothing signalled, look for claimable rows this often anyway (rows written by another
/// process, requeued by an operator).
const IDLE_RECHECK: Duration = Duration::from_millis(500);
/// Claims start again from the oldest pending event at least this often (and whenever a claim
/// comes back short), to pick up events that became pending behind the cursor.
const CURSOR_RESTART: Duration = Duration::from_secs(5);
/// While another sender holds the outbox's lock, try to take it this often.
const LOCK_RETRY: Duration = Duration::from_secs(1);
/// First retry delay.
const MIN_BACKOFF: Duration = Duration::from_millis(100);

/// When the sender returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendMode {
    /// Until shutdown (`tally ship`).
    Forever,
    /// Until nothing is left to claim and nothing is in flight, or shutdown (`tally replay
    /// --ship`, the demo). Events held by an auth failure keep it running until fixed or stopped.
    UntilIdle,
}

/// What a sender did, for logs and callers.
#[derive(Debug, Default)]
pub struct SendTotals {
    pub acked: AtomicU64,
    pub dead: AtomicU64,
    pub requests: AtomicU64,
    pub failed_requests: AtomicU64,
    /// Where `tally ship` also reports for Prometheus.
    pub metrics: Option<ShipMetrics>,
    /// Storage state shared with the reader (`tally ship`); a sender without one makes its own.
    pub storage: Option<Arc<StorageGate>>,
}

/// A snapshot of [`SendTotals`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SendReport {
    pub acked: u64,
    pub dead: u64,
    pub requests: u64,
    pub failed_requests: u64,
}

impl SendTotals {
    fn add_acked(&self, n: u64) {
        self.acked.fetch_add(n, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.record_acked(n);
        }
    }

    fn add_dead(&self, n: u64) {
        self.dead.fetch_add(n, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.record_dead(n);
        }
    }

    /// Counts one answer of Lago (or failure to get one) and how long the request took.
    fn add_lago_answer(&self, answer: &Result<Answer, SendError>, took: Duration) {
        let Some(m) = &self.metrics else { return };
        let outcome = match answer {
            Ok(Answer::Accepted) => LagoOutcome::Accepted,
            Ok(Answer::NotAnAck { .. }) | Err(SendError::AnswerTooLong { .. }) => {
                LagoOutcome::InvalidAnswer
            }
            Ok(Answer::Redirected { .. }) => LagoOutcome::Redirected,
            Ok(Answer::TooLarge { .. }) => LagoOutcome::ClientError,
            Ok(Answer::PerIndex(_) | Answer::Unprocessable { .. }) => LagoOutcome::Rejected,
            Ok(Answer::BadRequest { .. }) => LagoOutcome::ClientError,
            Ok(Answer::Unauthorized { .. }) => LagoOutcome::Unauthorized,
            Ok(Answer::RateLimited { .. }) => LagoOutcome::RateLimited,
            Ok(Answer::Transient { status, .. }) => LagoOutcome::from_status(*status),
            Err(SendError::Timeout(_)) => LagoOutcome::Timeout,
            Err(_) => LagoOutcome::Network,
        };
        m.record_lago_request(outcome, took);
        // Any answer from Lago itself says whether it takes the key; a transport failure, a
        // redirect or an answer that is not Lago's does not.
        if !matches!(
            outcome,
            LagoOutcome::Timeout
                | LagoOutcome::Network
                | LagoOutcome::Redirected
                | LagoOutcome::InvalidAnswer
        ) {
            m.set_lago_unauthorized(outcome == LagoOutcome::Unauthorized);
        }
    }

    pub fn snapshot(&self) -> SendReport {
        SendReport {
            acked: self.acked.load(Ordering::Relaxed),
            dead: self.dead.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            failed_requests: self.failed_requests.load(Ordering::Relaxed),
        }
    }
}

/// The sender fails only when the outbox does.
pub use crate::ship::outbox::OutboxTaskError as SenderError;

/// Auth state shared by the workers: a 401/403 stops claiming until a request succeeds again.
#[derive(Debug, Default)]
struct AuthGate {
    blocked: AtomicBool,
    logged: std::sync::Mutex<Repeated>,
    reopened: Notify,
}

impl AuthGate {
    fn fail(&self, status: u16, body: &str) {
        self.blocked.store(true, Ordering::SeqCst);
        let Ok(mut logged) = self.logged.lock() else {
            return;
        };
        if logged.due() {
            tracing::error!(
                status,
                body,
                "Lago refuses the API key (HTTP {status}); sending is paused and nothing is dropped. \
                 Check LAGO_API_KEY (it needs write access) and restart tally ship"
            );
        }
    }

    fn succeed(&self) {
        if self.blocked.swap(false, Ordering::SeqCst) {
            if let Ok(mut logged) = self.logged.lock() {
                logged.reset();
            }
            tracing::info!("Lago accepts the API key again; sending resumes");
            self.reopened.notify_waiters();
        }
    }

    fn is_blocked(&self) -> bool {
        self.blocked.load(Ordering::SeqCst)
    }
}

struct Ctx {
    outbox: SharedOutbox,
    client: LagoClient,
    tuning: Tuning,
    /// What is in flight, and the connection claims read from.
    claims: std::sync::Mutex<Claims>,
    /// Accepted batches to ack, committed together by the acker.
    acks: tokio::sync::mpsc::Sender<Vec<(i64, String)>>,
    auth: AuthGate,
    /// Fired on shutdown: no new batches, no new attempts.
    shutdown: CancellationToken,
    /// Fired when the drain deadline passes: abandon requests in flight.
    abandon: CancellationToken,
    /// Fired by a worker that cannot write to the outbox: the sender stops with that error.
    failed: CancellationToken,
    error: std::sync::Mutex<Option<SenderError>>,
    storage: Arc<StorageGate>,
    /// Whether a Lago error is on record (cleared at the next success).
    error_noted: AtomicBool,
    totals: Arc<SendTotals>,
}

/// The sender's claims. A claim reads on a read-only connection of its own, so it runs beside
/// the reader's ingest (WAL) instead of waiting for the writer's connection; the set is what
/// keeps it from taking an event twice.
struct Claims {
    /// Transaction ids claimed and not yet acked / dead / given up: never claimed twice. A claim
    /// reads and adds to it under this lock, and every commit that ends events holds this lock
    /// from before the commit until it has taken them out, so a claim never sees an event as
    /// both pending and not in flight.
    in_flight: HashSet<String>,
    reader: Outbox,
    /// The storage gate's reopen count when `reader` was opened: once the writer's connection
    /// is reopened (after a remount), the reader is too, or it would go on reading the file as
    /// it was.
    reader_of: u64,
}

impl Claims {
    /// Claims on the reader, opening it again first when the writer's connection was reopened,
    /// and once more when it fails (a reader can fail where a fresh one does not).
    fn claim(
        &mut self,
        storage: &StorageGate,
        n: usize,
        cursor: Option<ClaimCursor>,
        lock: &SenderLock,
    ) -> Result<(Vec<ClaimedEvent>, Option<ClaimCursor>), OutboxError> {
        let reopened = storage.reopened();
        if reopened != self.reader_of {
            self.reader = self.reader.reader()?;
            self.reader_of = reopened;
        }
        let (batch, reached) = match self.reader.claim(n, cursor, &self.in_flight, lock) {
            Ok(claimed) => claimed,
            Err(first) => {
                self.reader = self.reader.reader().map_err(|_| first)?;
                self.reader.claim(n, cursor, &self.in_flight, lock)?
            }
        };
        self.in_flight
            .extend(batch.iter().map(|e| e.transaction_id.clone()));
        Ok((batch, reached))
    }
}

impl Ctx {
    fn claims(&self) -> std::sync::MutexGuard<'_, Claims> {
        self.claims.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, e: SenderError) {
        tracing::error!(error = %e, "the sender cannot go on; stopping");
        if let Ok(mut slot) = self.error.lock()
            && slot.is_none()
        {
            *slot = Some(e);
        }
        self.failed.cancel();
    }

    /// Runs an outbox write, waiting out storage trouble; `None` if shutdown came first.
    async fn write<T: Send + 'static>(
        &self,
        f: impl Fn(&mut Outbox) -> Result<T, OutboxError> + Send + Sync + 'static,
    ) -> Result<Option<T>, SenderError> {
        with_outbox_waiting(&self.outbox, &self.storage, &self.shutdown, f).await
    }

    fn backoff(&self) -> impl Iterator<Item = Duration> + use<> {
        // backon adds up to 100% jitter on top of the delay: cap at half the retry cap so the
        // wait including jitter stays within TALLY_RETRY_CAP_SECS.
        let cap = self.tuning.retry_cap;
        ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(MIN_BACKOFF.min(cap / 2))
            .with_max_delay(cap / 2)
            .without_max_times()
            .build()
            .map(move |d| d.min(cap))
    }
}

/// Takes the outbox's sender lock: at once, or (in [`SendMode::Forever`]) once the sender that
/// holds it stops. `None` when shutdown comes first or, in [`SendMode::UntilIdle`], when another
/// sender holds it (that one delivers the pending events).
async fn take_lock(
    outbox: &SharedOutbox,
    storage: &StorageGate,
    mode: SendMode,
    shutdown: &CancellationToken,
) -> Result<Option<SenderLock>, SenderError> {
    let (mut told, mut blocked) = (false, false);
    loop {
        let taken = match with_outbox(outbox, |ob| ob.try_lock_sender()).await {
            // The lock file could be made after all: the outbox's own writes tell the rest.
            Ok(taken) if std::mem::take(&mut blocked) => {
                storage.clear();
                taken
            }
            Ok(taken) => taken,
            // The lock file cannot be created on a full or read-only disk: wait like any write.
            Err(e) => {
                let Some(trouble) = trouble(&e, 0) else {
                    return Err(e);
                };
                storage.block(&trouble, LOCK_RETRY);
                blocked = true;
                tokio::select! {
                    _ = tokio::time::sleep(LOCK_RETRY) => continue,
                    _ = shutdown.cancelled() => return Ok(None),
                }
            }
        };
        if let Some(lock) = taken {
            if told {
                tracing::info!("took over sending from the sender that held the outbox");
            }
            return Ok(Some(lock));
        }
        if mode == SendMode::UntilIdle {
            tracing::info!("another sender (a running tally ship?) delivers this outbox");
            return Ok(None);
        }
        if !std::mem::replace(&mut told, true) {
            tracing::warn!(
                "another tally ship sends from this state directory; this one only reads the \
                 spend log until that one stops (one sender per outbox)"
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(LOCK_RETRY) => {}
            _ = shutdown.cancelled() => return Ok(None),
        }
    }
}

/// Delivers pending events until `shutdown` (or, in [`SendMode::UntilIdle`], until nothing is
/// left). Returns what it did; an outbox that cannot be written stops it with an error.
pub async fn run_sender(
    outbox: SharedOutbox,
    client: LagoClient,
    tuning: Tuning,
    signal: Arc<WorkSignal>,
    mode: SendMode,
    shutdown: CancellationToken,
    totals: Arc<SendTotals>,
) -> Result<SendReport, SenderError> {
    let storage = match &totals.storage {
        Some(gate) => gate.clone(),
        None => {
            let path = with_outbox(&outbox, |ob| Ok(ob.path().to_owned())).await?;
            Arc::new(StorageGate::new(path, totals.metrics.clone()))
        }
    };
    // Held by this future (not by the tasks it spawns), so the lock goes when it does — also
    // when it is dropped mid-way (an aborted task), and tasks left behind cannot keep it.
    let Some(lock) = take_lock(&outbox, &storage, mode, &shutdown).await? else {
        return Ok(totals.snapshot());
    };
    let lock = Arc::new(lock);
    let reader_of = storage.reopened();
    let reader = with_outbox(&outbox, |ob| ob.reader()).await?;
    // Bounded: while the acker cannot commit (storage trouble), batches Lago accepted wait here
    // holding their permits, so nothing new is claimed and sent meanwhile. Roomy enough that a
    // slow commit never holds back sending in normal operation (a few MiB of ids at most).
    let (acks, acks_rx) = tokio::sync::mpsc::channel(tuning.batches_in_flight * 64);
    let ctx = Arc::new(Ctx {
        outbox,
        client,
        claims: std::sync::Mutex::new(Claims {
            in_flight: HashSet::new(),
            reader,
            reader_of,
        }),
        acks,
        auth: AuthGate::default(),
        shutdown: shutdown.clone(),
        abandon: CancellationToken::new(),
        failed: CancellationToken::new(),
        error: std::sync::Mutex::new(None),
        storage,
        // A previous run may have left an error on record: the first success clears it.
        error_noted: AtomicBool::new(true),
        totals: totals.clone(),
        tuning,
    });
    let acks_done = CancellationToken::new();
    let acker = tokio::spawn({
        let ctx = ctx.clone();
        let done = acks_done.clone();
        async move {
            if let Err(panic) = supervise::catch(run_acker(ctx.clone(), acks_rx, done)).await {
                // Accepted batches would wait for it forever, their events in flight.
                ctx.fail(SenderError::Task(format!("the acker panicked: {panic}")));
            }
        }
    });
    // Dropped before the end (the caller's task aborted): the workers give up their batches and
    // the acker commits what it has, then both stop.
    let _stop_workers = (
        ctx.abandon.clone().drop_guard(),
        ctx.failed.clone().drop_guard(),
        acks_done.clone().drop_guard(),
    );
    let permits = Arc::new(Semaphore::new(ctx.tuning.batches_in_flight));
    let tracker = TaskTracker::new();
    let mut last_was_full = false;
    let mut cursor: Option<ClaimCursor> = None;
    let mut cursor_since = Instant::now();

    loop {
        if shutdown.is_cancelled() || ctx.failed.is_cancelled() {
            break;
        }
        if !last_was_full {
            // Wait for work, then linger so a partial batch can fill.
            let woke = tokio::select! {
                _ = signal.notify.notified() => true,
                _ = tokio::time::sleep(IDLE_RECHECK) => false,
                _ = shutdown.cancelled() => break,
                _ = ctx.failed.cancelled() => break,
            };
            if woke {
                let deadline = tokio::time::Instant::now() + ctx.tuning.linger;
                while signal.added.load(Ordering::Relaxed) < ctx.tuning.batch_size {
                    tokio::select! {
                        _ = signal.notify.notified() => {}
                        _ = tokio::time::sleep_until(deadline) => break,
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
        }
        // While Lago refuses the key, the batches in flight probe; claim nothing more.
        while ctx.auth.is_blocked() && !shutdown.is_cancelled() {
            let reopened = ctx.auth.reopened.notified();
            if !ctx.auth.is_blocked() {
                break;
            }
            tokio::select! {
                _ = reopened => {}
                _ = shutdown.cancelled() => {}
                _ = ctx.failed.cancelled() => break,
            }
        }
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
            _ = ctx.failed.cancelled() => break,
        };
        signal.added.store(0, Ordering::Relaxed);
        if cursor_since.elapsed() >= CURSOR_RESTART {
            cursor = None;
        }
        if cursor.is_none() {
            cursor_since = Instant::now();
        }
        let n = ctx.tuning.batch_size;
        let (batch, reached) = claim(&ctx, &lock, n, cursor).await?;
        last_was_full = batch.len() == n;
        // A short claim reached the newest pending event: start the next from the oldest.
        cursor = if last_was_full { reached } else { None };
        if batch.is_empty() {
            drop(permit);
            if mode == SendMode::UntilIdle
                && permits.available_permits() == ctx.tuning.batches_in_flight
            {
                // Nothing claimable and nothing in flight: look once more from the oldest (a
                // worker may have just given events back), then stop.
                let (again, _) = claim(&ctx, &lock, n, None).await?;
                if again.is_empty() {
                    break;
                }
                let permit = match permits.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => break,
                };
                let ctx = ctx.clone();
                tracker.spawn(async move {
                    deliver_guarded(&ctx, again).await;
                    drop(permit);
                });
            }
            continue;
        }
        let worker_ctx = ctx.clone();
        tracker.spawn(async move {
            deliver_guarded(&worker_ctx, batch).await;
            drop(permit);
        });
    }

    // Drain: let requests in flight finish until the deadline, then abandon them.
    tracker.close();
    if tokio::time::timeout(ctx.tuning.drain_deadline, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            deadline = ?ctx.tuning.drain_deadline,
            "requests still in flight at the drain deadline are abandoned; their events stay pending"
        );
        ctx.abandon.cancel();
        tracker.wait().await;
    }
    // Every worker is done: commit the acks still queued, then let go of the lock.
    acks_done.cancel();
    if let Err(e) = acker.await {
        ctx.fail(SenderError::Task(e.to_string()));
    }
    let error = ctx.error.lock().ok().and_then(|mut e| e.take());
    match error {
        Some(e) => Err(e),
        None => Ok(totals.snapshot()),
    }
}

/// Claims up to `n` events after `cursor` and marks them in flight, in one step under the
/// outbox lock. Returns them and where the claim stopped.
async fn claim(
    ctx: &Arc<Ctx>,
    lock: &Arc<SenderLock>,
    n: usize,
    cursor: Option<ClaimCursor>,
) -> Result<(Vec<ClaimedEvent>, Option<ClaimCursor>), SenderError> {
    let (c, lock) = (ctx.clone(), lock.clone());
    tokio::task::spawn_blocking(move || Ok(c.claims().claim(&c.storage, n, cursor, &lock)?))
        .await
        .map_err(|e| SenderError::Task(e.to_string()))?
}

/// Commits the acks of accepted batches, several responses per transaction when they arrive
/// together (fewer commits). Runs until `done` and the queue is empty.
async fn run_acker(
    ctx: Arc<Ctx>,
    mut rx: tokio::sync::mpsc::Receiver<Vec<(i64, String)>>,
    done: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            biased;
            batch = rx.recv() => batch,
            _ = done.cancelled() => rx.try_recv().ok(),
        };
        let Some(mut events) = first else { return };
        while let Ok(more) = rx.try_recv() {
            events.extend(more);
        }
        let n = events.len() as u64;
        let clear = ctx.error_noted.swap(false, Ordering::Relaxed);
        let c = ctx.clone();
        // Lago has these: on storage trouble the ack is retried until the outbox takes it, the
        // events staying in flight meanwhile. A stop before then leaves them pending, and their
        // resend at the next start is answered as a duplicate.
        let r = ctx
            .write(move |ob| {
                let in_flight = &mut c.claims().in_flight;
                let left = in_flight.len().saturating_sub(events.len()) as u64;
                let pairs: Vec<(i64, &str)> =
                    events.iter().map(|(r, id)| (*r, id.as_str())).collect();
                ob.ack(&pairs, Some(left))?;
                if clear {
                    ob.set_last_lago_error(None)?;
                }
                // Out of flight only once committed: a claim meanwhile must not take them again.
                for (_, id) in &events {
                    in_flight.remove(id);
                }
                Ok(())
            })
            .await;
        match r {
            Ok(Some(())) => ctx.totals.add_acked(n),
            Ok(None) => return,
            Err(e) => {
                ctx.fail(e);
                return;
            }
        }
    }
}

/// [`deliver`]; a panic in it stops the sender with that error, since the batch's events would
/// otherwise stay in flight, never claimed again while this sender runs.
async fn deliver_guarded(ctx: &Arc<Ctx>, batch: Vec<ClaimedEvent>) {
    if let Err(panic) = supervise::catch(deliver(ctx, batch)).await {
        ctx.fail(SenderError::Task(format!(
            "a delivery worker panicked: {panic}"
        )));
    }
}

/// Delivers one claimed batch: sends it until every event is acked, dead or (on shutdown)
/// released.
async fn deliver(ctx: &Arc<Ctx>, batch: Vec<ClaimedEvent>) {
    // Sub-batches still to send, the next one last: the claim cut to the byte cap; a
    // batch-level 422 or a 413 splits one into two.
    let mut work: Vec<Vec<ClaimedEvent>> = split_by_bytes(batch, ctx.tuning.batch_max_bytes);
    work.reverse();
    let mut backoff = ctx.backoff();
    let mut attempted = false;
    while let Some(events) = work.pop() {
        if events.is_empty() {
            continue;
        }
        if attempted && (ctx.shutdown.is_cancelled() || ctx.failed.is_cancelled()) {
            release(ctx, &events, &work).await;
            return;
        }
        attempted = true;
        ctx.totals.requests.fetch_add(1, Ordering::Relaxed);
        let send = ctx.client.send_batch(
            events
                .iter()
                .map(|e| (e.transaction_id.as_str(), e.event.as_slice())),
        );
        let sent_at = Instant::now();
        let answer = tokio::select! {
            a = send => a,
            _ = ctx.abandon.cancelled() => {
                release(ctx, &events, &work).await;
                return;
            }
        };
        ctx.totals.add_lago_answer(&answer, sent_at.elapsed());
        let result = match answer {
            Ok(Answer::Accepted) => {
                ctx.auth.succeed();
                backoff = ctx.backoff();
                // The acker commits it (with other responses that arrive meanwhile); the events
                // stay in flight until then.
                let acked = events
                    .into_iter()
                    .map(|e| (e.seq, e.transaction_id))
                    .collect();
                match ctx.acks.send(acked).await {
                    Ok(()) => Ok(()),
                    // The acker gave up waiting for the disk at shutdown: these stay pending
                    // and their resend at the next start is answered as a duplicate.
                    Err(_) if ctx.shutdown.is_cancelled() => Ok(()),
                    Err(_) => Err(SenderError::Task("the acker stopped".into())),
                }
            }
            Ok(Answer::PerIndex(map)) if map.keys().all(|i| *i < events.len()) => {
                ctx.auth.succeed();
                let (rest, r) = apply_per_index(ctx, events, map).await;
                work.push(rest);
                r
            }
            Ok(Answer::PerIndex(_)) | Ok(Answer::Unprocessable { .. }) if events.len() > 1 => {
                // Errors about the whole batch (or indexes we did not send): halve it until the
                // events Lago refuses stand alone. Nothing was stored, so resending is safe.
                ctx.auth.succeed();
                let mut events = events;
                let second = events.split_off(events.len() / 2);
                work.push(second);
                work.push(events);
                Ok(())
            }
            Ok(Answer::TooLarge { body }) if events.len() > 1 => {
                // A body limit in front of Lago (or Lago's own): nothing was stored, halve it.
                let size = body_size(&events);
                tracing::warn!(
                    events = events.len(),
                    bytes = size,
                    body,
                    "Lago (or a proxy in front of it) refuses a {size}-byte batch as too large \
                     (HTTP 413); splitting it (lower TALLY_BATCH_MAX_BYTES to avoid this)"
                );
                let mut events = events;
                let second = events.split_off(events.len() / 2);
                work.push(second);
                work.push(events);
                Ok(())
            }
            Ok(Answer::TooLarge { body }) => {
                let size = body_size(&events);
                let reason = format!(
                    "too large to send: alone, its request is {size} bytes and Lago (or a proxy \
                     in front of it) answered 413 Payload Too Large: {body}. Raise that body \
                     limit (nginx: client_max_body_size), then `tally queue retry`"
                );
                dead(ctx, &events, &reason).await
            }
            Ok(Answer::Redirected {
                status,
                location,
                to_https,
            }) => {
                let note = redirect_note(status, location.as_deref(), to_https);
                let wait = backoff.next().unwrap_or(ctx.tuning.retry_cap);
                tracing::error!(status, location, ?wait, "{note}");
                retry_later(ctx, events, &mut work, &note, true, wait).await
            }
            Ok(Answer::NotAnAck { status, body }) => {
                let note = format!(
                    "Lago answered {status} without its {{\"events\": [...]}} acknowledgement of \
                     the {} event(s) sent, so they stay pending (is LAGO_API_BASE really Lago?): \
                     {body}",
                    events.len()
                );
                let wait = backoff.next().unwrap_or(ctx.tuning.retry_cap);
                tracing::error!(status, ?wait, "{note}");
                retry_later(ctx, events, &mut work, &note, true, wait).await
            }
            Ok(Answer::PerIndex(map)) => {
                ctx.auth.succeed();
                let reason = format!("Lago answered 422: {map:?}");
                dead(ctx, &events, &reason).await
            }
            Ok(Answer::Unprocessable { body }) => {
                ctx.auth.succeed();
                dead(ctx, &events, &format!("Lago answered 422: {body}")).await
            }
            Ok(Answer::BadRequest { body }) => {
                ctx.auth.succeed();
                dead(ctx, &events, &format!("Lago answered 400: {body}")).await
            }
            Ok(Answer::Unauthorized { status, body }) => {
                ctx.auth.fail(status, &body);
                let note = format!(
                    "Lago answered {status} (check LAGO_API_KEY; it needs write access): {body}"
                );
                let wait = backoff.next().unwrap_or(ctx.tuning.retry_cap);
                retry_later(ctx, events, &mut work, &note, false, wait).await
            }
            Ok(Answer::RateLimited { wait }) => {
                let note = "Lago answered 429 (rate limited)".to_owned();
                let wait = wait.unwrap_or_else(|| backoff.next().unwrap_or(ctx.tuning.retry_cap));
                tracing::warn!(?wait, "Lago rate-limits; waiting before sending again");
                retry_later(ctx, events, &mut work, &note, true, wait).await
            }
            Ok(Answer::Transient { status, body }) => {
                let note = format!("Lago answered {status}: {body}");
                let wait = backoff.next().unwrap_or(ctx.tuning.retry_cap);
                tracing::warn!(status, ?wait, body, "Lago failed; retrying");
                retry_later(ctx, events, &mut work, &note, true, wait).await
            }
            Err(e) => {
                let note = e.to_string();
                let wait = backoff.next().unwrap_or(ctx.tuning.retry_cap);
                tracing::warn!(error = %note, ?wait, "cannot reach Lago; retrying");
                retry_later(ctx, events, &mut work, &note, true, wait).await
            }
        };
        if let Err(e) = result {
            ctx.fail(e);
            return;
        }
    }
}

/// Acks the duplicates, parks the refused events as dead, returns the rest for an immediate
/// resend.
async fn apply_per_index(
    ctx: &Arc<Ctx>,
    events: Vec<ClaimedEvent>,
    map: BTreeMap<usize, IndexError>,
) -> (Vec<ClaimedEvent>, Result<(), SenderError>) {
    let mut acked = Vec::new();
    let mut refused = Vec::new();
    let mut rest = Vec::new();
    for (i, e) in events.into_iter().enumerate() {
        match map.get(&i) {
            Some(IndexError::AlreadyExists) => acked.push((e.seq, e.transaction_id)),
            Some(IndexError::Refused(why)) => {
                tracing::warn!(transaction_id = %e.transaction_id, reason = %why, "Lago refused an event; it is dead");
                refused.push((e.transaction_id, format!("Lago refused it: {why}")));
            }
            None => rest.push(e),
        }
    }
    let r = settle(ctx, acked, refused).await;
    (rest, r)
}

/// Acks and dead-letters events in one transaction, then takes them out of flight.
async fn settle(
    ctx: &Arc<Ctx>,
    acked: Vec<(i64, String)>,
    dead: Vec<(String, String)>,
) -> Result<(), SenderError> {
    let (na, nd) = (acked.len() as u64, dead.len() as u64);
    let c = ctx.clone();
    let written = ctx
        .write(move |ob| {
            let in_flight = &mut c.claims().in_flight;
            let pairs: Vec<(i64, &str)> = acked.iter().map(|(r, id)| (*r, id.as_str())).collect();
            ob.ack(&pairs, None)?;
            let refs: Vec<(&str, &str)> = dead
                .iter()
                .map(|(id, why)| (id.as_str(), why.as_str()))
                .collect();
            ob.mark_dead(&refs)?;
            for id in acked
                .iter()
                .map(|(_, id)| id)
                .chain(dead.iter().map(|(id, _)| id))
            {
                in_flight.remove(id);
            }
            Ok(())
        })
        .await?;
    // `None`: shutdown came during storage trouble; the events stay pending for the next start.
    if written.is_some() {
        ctx.totals.add_acked(na);
        ctx.totals.add_dead(nd);
    }
    Ok(())
}

async fn dead(ctx: &Arc<Ctx>, events: &[ClaimedEvent], reason: &str) -> Result<(), SenderError> {
    tracing::warn!(
        events = events.len(),
        reason,
        "Lago refused events; they are dead"
    );
    let dead = events
        .iter()
        .map(|e| (e.transaction_id.clone(), reason.to_owned()))
        .collect();
    settle(ctx, Vec::new(), dead).await
}

/// Notes a failed attempt, waits, and queues the events for another attempt — unless shutdown
/// comes first, in which case they are released.
async fn retry_later(
    ctx: &Arc<Ctx>,
    events: Vec<ClaimedEvent>,
    work: &mut Vec<Vec<ClaimedEvent>>,
    note: &str,
    count_attempt: bool,
    wait: Duration,
) -> Result<(), SenderError> {
    ctx.totals.failed_requests.fetch_add(1, Ordering::Relaxed);
    ctx.error_noted.store(true, Ordering::Relaxed);
    let ids = ids(&events);
    let note_owned = note.to_owned();
    ctx.write(move |ob| {
        if count_attempt {
            ob.record_failure(&refs(&ids), &note_owned)?;
        }
        ob.set_last_lago_error(Some(&note_owned))
    })
    .await?;
    let stopped = tokio::select! {
        _ = tokio::time::sleep(wait) => false,
        _ = ctx.shutdown.cancelled() => true,
        _ = ctx.failed.cancelled() => true,
    };
    if stopped {
        release(ctx, &events, work).await;
        work.clear();
        return Ok(());
    }
    if let Some(m) = &ctx.totals.metrics {
        m.record_retry();
    }
    work.push(events);
    Ok(())
}

/// Gives events up when the sender stops before they are done: they stay pending in the outbox
/// (nothing to write) and the next sender sends them; a resend is a harmless duplicate.
async fn release(ctx: &Arc<Ctx>, events: &[ClaimedEvent], more: &[Vec<ClaimedEvent>]) {
    let c = ctx.clone();
    let ids: Vec<String> = events
        .iter()
        .chain(more.iter().flatten())
        .map(|e| e.transaction_id.clone())
        .collect();
    // Off the async threads: a claim may hold the set for the length of its read.
    let _ = tokio::task::spawn_blocking(move || {
        let in_flight = &mut c.claims().in_flight;
        for id in &ids {
            in_flight.remove(id);
        }
    })
    .await;
}

/// Bytes of the request body `events` make (`{"events":[…]}`).
fn body_size(events: &[ClaimedEvent]) -> usize {
    let commas = events.len().saturating_sub(1);
    b"{\"events\":[]}".len() + commas + events.iter().map(|e| e.event.len()).sum::<usize>()
}

/// Cuts a claimed batch, in order, into batches whose body fits in `max_bytes`. An event too
/// large to fit with any other goes alone (Lago, or a 413, decides about it).
fn split_by_bytes(batch: Vec<ClaimedEvent>, max_bytes: usize) -> Vec<Vec<ClaimedEvent>> {
    let empty = b"{\"events\":[]}".len();
    if batch.is_empty() {
        return Vec::new();
    }
    // The usual claim fits whole: kept as it is, not moved event by event into a new vector.
    if batch.len() == 1 || body_size(&batch) <= max_bytes {
        return vec![batch];
    }
    let mut out = Vec::new();
    let mut current: Vec<ClaimedEvent> = Vec::new();
    let mut size = empty;
    for e in batch {
        let added = e.event.len() + usize::from(!current.is_empty());
        if !current.is_empty() && size + added > max_bytes {
            out.push(std::mem::take(&mut current));
            size = empty;
        }
        size += e.event.len() + usize::from(!current.is_empty());
        current.push(e);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

fn ids(events: &[ClaimedEvent]) -> Vec<String> {
    events.iter().map(|e| e.transaction_id.clone()).collect()
}

fn refs(ids: &[String]) -> Vec<&str> {
    ids.iter().map(String::as_str).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, len: usize) -> ClaimedEvent {
        ClaimedEvent {
            seq: 0,
            transaction_id: id.to_owned(),
            event: vec![b'x'; len],
        }
    }

    fn sizes(batches: &[Vec<ClaimedEvent>]) -> Vec<usize> {
        batches.iter().map(|b| body_size(b)).collect()
    }

    #[test]
    fn batches_are_cut_to_the_byte_cap_in_order() {
        let batch: Vec<_> = (0..10).map(|i| event(&i.to_string(), 100)).collect();
        let cut = split_by_bytes(batch, 350);
        // 13 + 3 × 100 + 2 commas = 315; a fourth would make 416.
        assert_eq!(sizes(&cut), vec![315, 315, 315, 113]);
        let order: Vec<_> = cut
            .iter()
            .flatten()
            .map(|e| e.transaction_id.clone())
            .collect();
        assert_eq!(order, (0..10).map(|i| i.to_string()).collect::<Vec<_>>());
        assert!(cut.iter().all(|b| body_size(b) <= 350));
    }

    #[test]
    fn an_event_larger_than_the_cap_goes_alone() {
        let batch = vec![event("a", 10), event("big", 1000), event("b", 10)];
        let cut = split_by_bytes(batch, 100);
        let ids: Vec<Vec<&str>> = cut
            .iter()
            .map(|b| b.iter().map(|e| e.transaction_id.as_str()).collect())
            .collect();
        assert_eq!(ids, vec![vec!["a"], vec!["big"], vec!["b"]]);
        assert!(split_by_bytes(Vec::new(), 100).is_empty());
    }
}
