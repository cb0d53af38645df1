//! The sender: leases pending events from the outbox in batches, keeps several batch requests in
//! flight, and applies Lago's answer to each event (docs/delivery.md, "Retry policy").
//!
//! - 200 → acked. 422 per index → `value_already_exist` acked, other reasons dead with Lago's
//!   words, the rest resent at once (a 422 batch stored nothing). 422 about the whole batch →
//!   split in halves until the culprit stands alone (then dead with the body). 400 → dead.
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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::ship::{LagoOutcome, ShipMetrics};
use crate::ship::lago::SendError;
use crate::ship::lago::{Answer, IndexError, LagoClient};
use crate::ship::outbox::{
    ClaimedEvent, LeaseGuard, LeaseOwner, Outbox, OutboxError, SharedOutbox,
};
use crate::ship::settings::Tuning;
use crate::ship::storage::{StorageGate, with_outbox_waiting};

/// An auth failure is logged at most this often while it lasts.
const AUTH_LOG_EVERY: Duration = Duration::from_secs(60);
/// With nothing signalled, look for claimable rows this often anyway (rows written by another
/// process, leases that ran out).
const IDLE_RECHECK: Duration = Duration::from_millis(500);
/// Leases of senders that died are looked for this often.
const STALE_LEASE_SWEEP: Duration = Duration::from_secs(30);
/// First retry delay.
const MIN_BACKOFF: Duration = Duration::from_millis(100);

/// How the reader tells the sender that new pending events exist.
#[derive(Debug, Default)]
pub struct WorkSignal {
    notify: Notify,
    added: AtomicUsize,
}

impl WorkSignal {
    /// `n` new pending events were committed.
    pub fn added(&self, n: usize) {
        if n > 0 {
            self.added.fetch_add(n, Ordering::Relaxed);
            self.notify.notify_one();
        }
    }
}

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
            Ok(Answer::PerIndex(_) | Answer::Unprocessable { .. }) => LagoOutcome::Rejected,
            Ok(Answer::BadRequest { .. }) => LagoOutcome::ClientError,
            Ok(Answer::Unauthorized { .. }) => LagoOutcome::Unauthorized,
            Ok(Answer::RateLimited { .. }) => LagoOutcome::RateLimited,
            Ok(Answer::Transient { status, .. }) => LagoOutcome::from_status(*status),
            Err(SendError::Timeout(_)) => LagoOutcome::Timeout,
            Err(_) => LagoOutcome::Network,
        };
        m.record_lago_request(outcome, took);
        // Any answer from Lago itself says whether it takes the key; a transport failure does not.
        if !matches!(outcome, LagoOutcome::Timeout | LagoOutcome::Network) {
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

#[derive(Debug, thiserror::Error)]
pub enum SenderError {
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error("outbox task failed: {0}")]
    Task(String),
}

/// Runs a blocking outbox operation off the async threads.
pub async fn with_outbox<T: Send + 'static>(
    outbox: &SharedOutbox,
    f: impl FnOnce(&mut Outbox) -> Result<T, OutboxError> + Send + 'static,
) -> Result<T, SenderError> {
    let outbox = outbox.clone();
    tokio::task::spawn_blocking(move || {
        let mut guard = outbox
            .lock()
            .map_err(|_| SenderError::Task("outbox lock poisoned".into()))?;
        f(&mut guard).map_err(SenderError::from)
    })
    .await
    .map_err(|e| SenderError::Task(e.to_string()))?
}

/// Auth state shared by the workers: a 401/403 stops claiming until a request succeeds again.
#[derive(Debug, Default)]
struct AuthGate {
    blocked: AtomicBool,
    last_log: std::sync::Mutex<Option<Instant>>,
    reopened: Notify,
}

impl AuthGate {
    fn fail(&self, status: u16, body: &str) {
        self.blocked.store(true, Ordering::SeqCst);
        let Ok(mut last) = self.last_log.lock() else {
            return;
        };
        if last.is_none_or(|t| t.elapsed() >= AUTH_LOG_EVERY) {
            *last = Some(Instant::now());
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
            if let Ok(mut last) = self.last_log.lock() {
                *last = None;
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
    owner: LeaseOwner,
    lease: Duration,
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

impl Ctx {
    fn fail(&self, e: SenderError) {
        tracing::error!(error = %e, "the sender cannot write to the outbox; stopping");
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
    let guard = LeaseGuard::new();
    let storage = match &totals.storage {
        Some(gate) => gate.clone(),
        None => {
            let path = with_outbox(&outbox, |ob| Ok(ob.path().to_owned())).await?;
            Arc::new(StorageGate::new(path, totals.metrics.clone()))
        }
    };
    let Some(released) =
        with_outbox_waiting(&outbox, &storage, &shutdown, Outbox::release_stale_leases).await?
    else {
        return Ok(totals.snapshot());
    };
    if released > 0 {
        tracing::info!(
            released,
            "released events leased by a sender that is gone; they will be sent again"
        );
    }
    // A lease outlives any single attempt plus the longest wait before the next, and is renewed
    // before each attempt.
    let lease = tuning.request_timeout * 2 + tuning.retry_cap + Duration::from_secs(30);
    let ctx = Arc::new(Ctx {
        outbox,
        client,
        owner: guard.owner(),
        lease,
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
    let permits = Arc::new(Semaphore::new(ctx.tuning.batches_in_flight));
    let tracker = TaskTracker::new();
    let mut last_sweep = Instant::now();
    let mut last_was_full = false;

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
        if last_sweep.elapsed() >= STALE_LEASE_SWEEP {
            last_sweep = Instant::now();
            if ctx.write(Outbox::release_stale_leases).await?.is_none() {
                break;
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
        let (n, owner, lease) = (ctx.tuning.batch_size, ctx.owner, ctx.lease);
        let Some(batch) = ctx.write(move |ob| ob.claim(n, lease, owner)).await? else {
            break;
        };
        last_was_full = batch.len() == n;
        if batch.is_empty() {
            drop(permit);
            if mode == SendMode::UntilIdle
                && permits.available_permits() == ctx.tuning.batches_in_flight
            {
                // Nothing claimable and nothing in flight: look once more (a worker may have
                // just released events), then stop.
                let Some(again) = ctx.write(move |ob| ob.claim(n, lease, owner)).await? else {
                    break;
                };
                if again.is_empty() {
                    break;
                }
                let permit = match permits.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => break,
                };
                let ctx = ctx.clone();
                tracker.spawn(async move {
                    deliver(&ctx, again).await;
                    drop(permit);
                });
            }
            continue;
        }
        let worker_ctx = ctx.clone();
        tracker.spawn(async move {
            deliver(&worker_ctx, batch).await;
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
    drop(guard);
    let error = ctx.error.lock().ok().and_then(|mut e| e.take());
    match error {
        Some(e) => Err(e),
        None => Ok(totals.snapshot()),
    }
}

/// Delivers one claimed batch: sends it until every event is acked, dead or (on shutdown)
/// released.
async fn deliver(ctx: &Ctx, batch: Vec<ClaimedEvent>) {
    // Sub-batches still to send; a batch-level 422 splits one into two.
    let mut work: Vec<Vec<ClaimedEvent>> = vec![batch];
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
        if attempted {
            let ids = ids(&events);
            let (lease, owner) = (ctx.lease, ctx.owner);
            match ctx
                .write(move |ob| ob.renew_lease(&refs(&ids), lease, owner))
                .await
            {
                Ok(Some(())) => {}
                Ok(None) => {
                    release(ctx, &events, &work).await;
                    return;
                }
                Err(e) => {
                    ctx.fail(e);
                    return;
                }
            }
        }
        attempted = true;
        ctx.totals.requests.fetch_add(1, Ordering::Relaxed);
        let send = ctx
            .client
            .send_batch(events.iter().map(|e| e.event.as_slice()));
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
                let ids = ids(&events);
                let n = ids.len() as u64;
                let clear = ctx.error_noted.swap(false, Ordering::Relaxed);
                // Lago has these now: the ids stay in memory and the ack is retried until the
                // outbox takes it (see the module doc for a stop before then).
                let r = ctx
                    .write(move |ob| {
                        ob.mark_acked(&refs(&ids))?;
                        if clear {
                            ob.set_last_lago_error(None)?;
                        }
                        Ok(())
                    })
                    .await;
                counted(r, || ctx.totals.add_acked(n))
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
    ctx: &Ctx,
    events: Vec<ClaimedEvent>,
    map: BTreeMap<usize, IndexError>,
) -> (Vec<ClaimedEvent>, Result<(), SenderError>) {
    let mut acked = Vec::new();
    let mut refused = Vec::new();
    let mut rest = Vec::new();
    for (i, e) in events.into_iter().enumerate() {
        match map.get(&i) {
            Some(IndexError::AlreadyExists) => acked.push(e.transaction_id),
            Some(IndexError::Refused(why)) => {
                tracing::warn!(transaction_id = %e.transaction_id, reason = %why, "Lago refused an event; it is dead");
                refused.push((e.transaction_id, format!("Lago refused it: {why}")));
            }
            None => rest.push(e),
        }
    }
    let (na, nd) = (acked.len() as u64, refused.len() as u64);
    let r = ctx
        .write(move |ob| {
            ob.mark_acked(&refs(&acked))?;
            let dead: Vec<(&str, &str)> = refused
                .iter()
                .map(|(id, why)| (id.as_str(), why.as_str()))
                .collect();
            ob.mark_dead(&dead)
        })
        .await;
    let r = counted(r, || {
        ctx.totals.add_acked(na);
        ctx.totals.add_dead(nd);
    });
    (rest, r)
}

async fn dead(ctx: &Ctx, events: &[ClaimedEvent], reason: &str) -> Result<(), SenderError> {
    tracing::warn!(
        events = events.len(),
        reason,
        "Lago refused events; they are dead"
    );
    let ids = ids(events);
    let reason = reason.to_owned();
    let n = ids.len() as u64;
    let r = ctx
        .write(move |ob| {
            let dead: Vec<(&str, &str)> = ids
                .iter()
                .map(|id| (id.as_str(), reason.as_str()))
                .collect();
            ob.mark_dead(&dead)
        })
        .await;
    counted(r, || ctx.totals.add_dead(n))
}

/// Counts a write that happened; one cut short by shutdown (`None`) did nothing and is not an
/// error: its events are still pending and are sent again at the next start.
fn counted(r: Result<Option<()>, SenderError>, count: impl FnOnce()) -> Result<(), SenderError> {
    if let Some(()) = r? {
        count();
    }
    Ok(())
}

/// Notes a failed attempt, waits, and queues the events for another attempt — unless shutdown
/// comes first, in which case they are released.
async fn retry_later(
    ctx: &Ctx,
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

/// Gives events back to the outbox (still pending) when the sender stops before they are done.
async fn release(ctx: &Ctx, events: &[ClaimedEvent], more: &[Vec<ClaimedEvent>]) {
    let mut ids = ids(events);
    for m in more {
        ids.extend(m.iter().map(|e| e.transaction_id.clone()));
    }
    let owner = ctx.owner;
    if let Err(e) = with_outbox(&ctx.outbox, move |ob| ob.release(&refs(&ids), owner)).await {
        // Not fatal: the lease runs out, or the next start releases it.
        tracing::warn!(error = %e, "cannot release leased events; they will be sent after their lease");
    }
}

fn ids(events: &[ClaimedEvent]) -> Vec<String> {
    events.iter().map(|e| e.transaction_id.clone()).collect()
}

fn refs(ids: &[String]) -> Vec<&str> {
    ids.iter().map(String::as_str).collect()
}
