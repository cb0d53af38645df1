//! `tally ship`: tail the spend log, dedupe in SQLite, deliver to Lago exactly once
//! (docs/delivery.md).
//!
//! Data flows one way: **tail → reader → outbox → sender → Lago**.
//! - [`settings`]: validated settings ([`ShipSettings`]), made from the command line by
//!   `crate::commands::settings` or built in code; the Lago key is redacted everywhere.
//! - [`tail`]: follows the live spend log across rotation and truncation, yielding lines and
//!   file positions.
//! - [`amount`]: `precise_total_amount_cents` (cost × 100 × markup) in exact decimal.
//! - [`resolve`]: a record → who is charged (`LAGO_API_CHARGE_BY`) and what its Lago event says.
//! - [`event`]: the Lago event: its content, as the outbox queues it, and its exact bytes.
//! - [`outbox`]: `shipper.db` (SQLite, WAL, migrated schema): records, their delivery state,
//!   rejected lines, file positions; plus what `tally queue` reads and does, and
//!   [`outbox::with_outbox`], an outbox operation from async code.
//! - [`signal`]: the work signal, how new pending events wake the sender.
//! - [`reader`]: tailer chunks → parsed records → one outbox transaction per chunk.
//! - [`lago`]: the HTTP client for `POST /api/v1/events/batch` and the classification of answers.
//! - [`sender`]: claims batches from the outbox, keeps several in flight, acks / dead-letters /
//!   retries according to Lago's answer.
//! - [`lago_read`]: paced, 429-aware `GET`s of Lago events and subscriptions.
//! - [`subscriptions`]: looks up each new external_subscription_id in Lago; unknown ones are
//!   warned about, counted and shown by `tally queue stats` (their events are never billed).
//! - [`webhook`]: `--webhook-addr`, Lago's signed webhooks; `events.errors` → state lago-error.
//! - [`supervise`]: a panic in any of the shipper's tasks stops it with that error (exit 1), so
//!   it never runs on without its reader or with events stuck in flight.
//! - [`storage`]: waits out a full or read-only state directory (retry, reopen, say why) so the
//!   shipper resumes in the same process once the disk is fixed.
//!
//! [`run`] is the command; [`run_with`] runs the same shipper from code (the demo, tests).

pub mod amount;
pub mod event;
pub mod lago;
pub mod lago_read;
pub mod outbox;
pub mod reader;
pub mod resolve;
pub mod sender;
pub mod settings;
pub mod signal;
pub mod storage;
pub mod subscriptions;
pub mod supervise;
pub mod tail;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::ship::QueueDepth;
use crate::metrics::{MetricsServer, Registry, ShipMetrics};
use crate::service;
use crate::ship::supervise::Supervisor;
use outbox::Outbox;
use sender::{SendMode, SendTotals};
pub use settings::{ApiKey, ShipSettings};
use signal::WorkSignal;
use storage::StorageGate;
use tail::{TailOptions, Tailer};

/// Lines per tailer chunk, i.e. per outbox transaction: large enough to amortise the commit,
/// small enough to keep memory flat and a crash's re-read short.
pub const CHUNK_LINES: usize = 4096;

/// How often acked ids past their retention are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// How often the queue gauges (depth by state, oldest pending age) are refreshed.
const QUEUE_GAUGES_EVERY: Duration = Duration::from_secs(5);

/// `tally ship` with its validated settings: runs until `shutdown`.
pub async fn run(settings: ShipSettings, shutdown: CancellationToken) -> anyhow::Result<()> {
    limit_malloc_arenas();
    run_with(settings, shutdown).await
}

/// glibc gives each thread that contends for the allocator its own arena, and the reader's and
/// sender's blocking hand-offs run on many pool threads: with the default (8 per core) the
/// shipper's RSS grew past 80 MiB on a 1,000,000-line backlog; two arenas keep it near 50 MiB and
/// were measured no slower (docs/benchmarks.md). `MALLOC_ARENA_MAX` in the environment still wins.
pub(crate) fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only adjusts allocator tuning; arenas that exist stay valid.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// Gives the memory freed so far back to the OS: after `tally replay`'s reading phase, before
/// `--ship` delivers, so that the two phases' peaks do not add up (glibc keeps a freed heap for
/// reuse by the thread that freed it, and the sender runs on other threads).
pub(crate) fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the heap to the OS.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs the shipper with settings built in code until `shutdown`: reads the spend log into the
/// outbox and delivers it. On shutdown it stops reading, lets requests in flight finish within
/// the drain deadline, and returns `Ok(())`.
pub async fn run_with(settings: ShipSettings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let db_path = settings.db_path();
    let Some(mut outbox) = open_outbox_waiting(&settings.state_dir, &db_path, &shutdown).await?
    else {
        return Ok(());
    };
    if let Some(retention) = settings.tuning.acked_retention {
        let pruned = outbox.prune_acked(retention)?;
        if pruned > 0 {
            tracing::info!(pruned, "forgot acked ids past TALLY_ACKED_RETENTION_DAYS");
        }
    }
    let positions = outbox.positions()?;
    let tailer = Tailer::new(
        TailOptions {
            live_path: settings.spend_log.clone(),
            poll_interval: settings.tuning.poll_interval,
            max_line_bytes: settings.tuning.max_line_bytes,
            max_chunk_lines: CHUNK_LINES,
        },
        positions,
    )
    .with_context(|| {
        format!(
            "cannot follow the spend log {}",
            settings.spend_log.display()
        )
    })?;
    let client = lago::LagoClient::new(&settings.lago, &settings.tuning)?;
    // Metrics are always kept; they are served when --metrics-addr is set.
    let mut registry = Registry::default();
    crate::metrics::register_build_info(&mut registry);
    let metrics = ShipMetrics::register(&mut registry);
    let metrics_server = match settings.metrics_addr {
        Some(addr) => Some(MetricsServer::bind(addr, registry.into()).await?),
        None => None,
    };
    let metrics_addr = match &metrics_server {
        Some(server) => Some(server.local_addr()?),
        None => None,
    };
    let outbox = outbox.shared();
    let webhooks = match &settings.webhook {
        Some(w) => Some(
            webhook::serve(
                w.clone(),
                Some(webhook::PublicKeySource {
                    api_base: settings.lago.api_base.clone(),
                    api_key: settings.lago.api_key.clone(),
                }),
                outbox.clone(),
                Some(metrics.clone()),
                shutdown.child_token(),
            )
            .await?,
        ),
        None => None,
    };
    let webhook_addr = webhooks.as_ref().map(|(addr, _)| *addr);
    // Stops everything when either half fails or a task panics; a parent shutdown stops it too.
    let stop = shutdown.child_token();
    let sup = Supervisor::new(stop.clone());
    // Every task beside the reader and the sender; all are waited for before returning.
    let tasks = TaskTracker::new();
    if let Some((_, served)) = webhooks {
        tasks.spawn(sup.guard("webhook listener", async move {
            if let Err(e) = served.await {
                tracing::warn!(error = %e, "the webhook listener failed");
            }
        }));
    }
    // A full or read-only state directory is waited out by the reader and the sender alike.
    let storage = Arc::new(StorageGate::new(db_path.clone(), Some(metrics.clone())));
    let signal = Arc::new(WorkSignal::default());

    tracing::info!(
        spend_log = %settings.spend_log.display(),
        outbox = %db_path.display(),
        lago = %settings.lago.api_base,
        charge_by = %settings.lago.spec.charge_by,
        metrics = ?metrics_addr,
        webhooks = ?webhook_addr,
        "tally ship started"
    );
    // The outbox is open and the spend log followed: ready. The watchdog's pings come from a
    // task of this runtime, so they stop when it is stuck; anything else that goes wrong makes
    // the shipper exit (and systemd restart it), and a Lago outage is waited out, not restarted.
    let mut status = format!(
        "shipping {} to {}",
        settings.spend_log.display(),
        settings.lago.api_base
    );
    if let Some(addr) = metrics_addr {
        status.push_str(&format!("; metrics on {addr}"));
    }
    service::notify_status(&status);
    storage.set_normal_status(status);
    service::notify_ready();
    if let Some(watchdog) = service::spawn_watchdog(stop.clone(), || true) {
        tasks.spawn(sup.guard("watchdog", async move {
            let _ = watchdog.await;
        }));
    }
    if let Some(server) = metrics_server {
        let stop = stop.clone();
        tasks.spawn(sup.guard("metrics listener", async move {
            if let Err(e) = server.run(stop).await {
                tracing::warn!(error = %e, "the metrics listener failed");
            }
        }));
    }
    tasks.spawn(sup.guard(
        "queue gauges",
        refresh_queue_gauges(outbox.clone(), metrics.clone(), stop.clone()),
    ));
    match lago_read::LagoReader::new(
        &settings.lago.api_base,
        settings.lago.api_key.expose(),
        subscriptions::RATE,
    ) {
        Ok(reader) => {
            tasks.spawn(sup.guard(
                "subscription checker",
                subscriptions::run_checker(
                    outbox.clone(),
                    reader,
                    Some(metrics.clone()),
                    stop.clone(),
                ),
            ));
        }
        Err(e) => {
            tracing::warn!(error = %e, "subscriptions are not checked");
        }
    }
    tasks.spawn({
        let stop = stop.clone();
        async move {
            stop.cancelled().await;
            service::notify_stopping();
        }
    });

    let reader = tokio::spawn(sup.guard("reader", {
        let (outbox, signal, stop) = (outbox.clone(), signal.clone(), stop.clone());
        let spec = Arc::new(settings.lago.spec.clone());
        let max = settings.tuning.max_line_bytes;
        let metrics = Some(metrics.clone());
        let storage = storage.clone();
        async move {
            let ctx = reader::ReaderCtx {
                outbox,
                spec,
                max_line_bytes: max,
                signal,
                metrics,
                storage,
            };
            let r = reader::run_reader(tailer, ctx, stop.clone()).await;
            if r.is_err() {
                stop.cancel();
            }
            r
        }
    }));
    if let Some(retention) = settings.tuning.acked_retention {
        let (outbox, stop) = (outbox.clone(), stop.clone());
        tasks.spawn(sup.guard("acked-id pruning", async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(PRUNE_EVERY) => {}
                    _ = stop.cancelled() => return,
                }
                match outbox::with_outbox(&outbox, move |ob| ob.prune_acked(retention)).await {
                    Ok(n) if n > 0 => tracing::info!(pruned = n, "forgot acked ids past retention"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot prune acked ids"),
                }
            }
        }));
    }

    let totals = Arc::new(SendTotals {
        metrics: Some(metrics),
        storage: Some(storage),
        ..SendTotals::default()
    });
    let sent = sender::run_sender(
        outbox.clone(),
        client,
        settings.tuning.clone(),
        signal,
        SendMode::Forever,
        stop.clone(),
        totals,
    )
    .await;
    // The sender returns on shutdown or on failure; either way the reader stops too.
    stop.cancel();
    let read = reader.await.context("the reader task failed")?;
    tasks.close();
    tasks.wait().await;
    if let Some(panic) = sup.panic() {
        anyhow::bail!("{panic}; tally ship stopped (nothing is lost: start it again)");
    }
    let read = read.context("the reader task panicked")?;
    // An outbox error (disk full, read-only) must name the file, so the operator knows where.
    let read = read.with_context(|| {
        format!(
            "reading the spend log into the outbox {} failed",
            db_path.display()
        )
    })?;
    let sent = sent.with_context(|| {
        format!(
            "delivering to Lago stopped: cannot update the outbox {}",
            db_path.display()
        )
    })?;
    tracing::info!(
        read.pending,
        read.held,
        read.rejected,
        read.conflicts,
        read.already_seen,
        sent.acked,
        sent.dead,
        sent.requests,
        "tally ship stopped"
    );
    Ok(())
}

/// Keeps the queue gauges current until `stop`.
async fn refresh_queue_gauges(
    outbox: outbox::SharedOutbox,
    metrics: ShipMetrics,
    stop: CancellationToken,
) {
    loop {
        let started = std::time::Instant::now();
        // `depth`, not `stats`: counting acked rows scans the whole outbox.
        match outbox::with_outbox(&outbox, |ob| ob.depth()).await {
            Ok(depth) => {
                metrics.set_queue_depth(QueueDepth {
                    pending: depth.pending,
                    held: depth.held,
                    dead: depth.dead,
                    rejected: depth.rejected,
                });
                let now_ms = chrono::Utc::now().timestamp_millis();
                metrics.set_oldest_pending_age(
                    depth
                        .oldest_pending_ms
                        .map(|t| Duration::from_millis(now_ms.saturating_sub(t).max(0) as u64)),
                );
            }
            Err(e) => tracing::warn!(error = %e, "cannot count the outbox for the metrics"),
        }
        // Counting the queue walks all of it, holding the outbox meanwhile: on a large backlog
        // that takes a while, so the next count waits at least 50 times as long (2 % at most).
        let wait = QUEUE_GAUGES_EVERY.max(started.elapsed() * 50);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Opens the outbox. While the state directory is read-only, full or failing (by the OS's word,
/// from a write probe) it waits and retries, as a running shipper does, instead of failing: under
/// systemd a start that fails quickly five times is not tried again (`StartLimitBurst`). Any
/// other failure (a bad path, no permission, a corrupt or newer database) is returned at once.
/// `Ok(None)`: `shutdown` came while waiting.
async fn open_outbox_waiting(
    state_dir: &std::path::Path,
    db_path: &std::path::Path,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Outbox>> {
    let mut wait = storage::MIN_WAIT;
    let mut logged = crate::logging::Repeated::default();
    // An outbox seen while waiting must be the one opened: if it is gone (the state disk being
    // unmounted and mounted again), a fresh empty one must not be created in its place.
    let mut seen = false;
    loop {
        if seen && !db_path.is_file() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return Ok(None),
            }
            continue;
        }
        // Off the async threads: opening waits on other openers' locks, and the probe syncs.
        let (dir, db) = (state_dir.to_owned(), db_path.to_owned());
        let opened = tokio::task::spawn_blocking(move || {
            Outbox::open_in(&dir).map_err(|error| (error, write_probe(&db)))
        })
        .await
        .context("the task opening the outbox failed")?;
        let (error, probe) = match opened {
            Ok(outbox) => {
                if logged.logged() {
                    tracing::info!(
                        outbox = %db_path.display(),
                        "the outbox {} can be opened again; tally ship starts",
                        db_path.display()
                    );
                }
                return Ok(Some(outbox));
            }
            Err(failed) => failed,
        };
        let storage = storage::is_full_or_failing(&error)
            || probe
                .as_ref()
                .is_some_and(|(_, e)| e.raw_os_error().is_some_and(storage::is_storage_errno));
        let not_writable = not_writable(probe);
        seen |= db_path.is_file();
        if !storage {
            return Err(anyhow::Error::new(error).context(format!(
                "cannot open the outbox in {}{not_writable}",
                state_dir.display(),
            )));
        }
        if logged.due() {
            let reason = format!("{error}{not_writable}");
            tracing::error!(
                outbox = %db_path.display(),
                reason = %reason,
                "cannot open the outbox {} for writing: {reason}; tally ship waits and retries \
                 until it can. Free space in, or make writable, the state directory",
                db_path.display()
            );
            service::notify_status(&format!(
                "waiting: cannot open the outbox {}: {reason}",
                db_path.display()
            ));
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return Ok(None),
        }
        wait = (wait * 2).min(storage::MAX_WAIT);
    }
}

/// Why the outbox cannot be written, from [`write_probe`], in the OS's words (SQLite only says
/// "unable to open database file", which does not tell a read-only filesystem from a missing
/// directory); empty if it can.
fn not_writable(probe: Option<(std::path::PathBuf, std::io::Error)>) -> String {
    match probe {
        Some((path, e)) => format!(" ({}: {e})", path.display()),
        None => String::new(),
    }
}

/// Tries to write where the outbox is (or would be): the file tried and the OS's error, if any.
fn write_probe(db: &std::path::Path) -> Option<(std::path::PathBuf, std::io::Error)> {
    let (path, probe) = if db.exists() {
        let r = std::fs::OpenOptions::new().append(true).open(db);
        (db.to_path_buf(), r)
    } else {
        // No outbox yet: can a file be created beside where it would be?
        let p = db.with_file_name(".tally-write-probe");
        let r = std::fs::File::create(&p);
        let _ = std::fs::remove_file(&p);
        (p, r)
    };
    probe.err().map(|e| (path, e))
}

/// Delivers what is pending in the outbox of `settings.state_dir` and returns once nothing is left
/// to claim and nothing is in flight (or on `shutdown`). For `tally replay --ship` and the demo.
pub async fn deliver_pending(
    settings: &ShipSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<sender::SendReport> {
    let outbox = Outbox::open_in(&settings.state_dir)?.shared();
    let client = lago::LagoClient::new(&settings.lago, &settings.tuning)?;
    let report = sender::run_sender(
        outbox,
        client,
        settings.tuning.clone(),
        Arc::new(WorkSignal::default()),
        SendMode::UntilIdle,
        shutdown,
        Arc::new(SendTotals::default()),
    )
    .await?;
    Ok(report)
}
