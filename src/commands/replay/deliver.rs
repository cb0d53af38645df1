//! `tally replay --ship`: deliver with the shipper's own sender ([`deliver_pending`]) and wait
//! until this replay's events are acked, or say which are not and why.
//!
//! A running `tally ship` holds the outbox's sender lock and delivers them instead: that is fine,
//! this only waits for their state to change, up to `--ship-timeout`.

use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::ship::outbox::{Outbox, State};
use crate::ship::{ShipSettings, deliver_pending};

/// How many undelivered events the report names, with their reasons.
const NAMED: usize = 10;

/// One event of this replay that Lago does not have.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Undelivered {
    pub transaction_id: String,
    pub state: String,
    pub attempts: u64,
    pub reason: Option<String>,
}

/// What `--ship` achieved for this replay's new events.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DeliveryReport {
    pub acked: u64,
    pub pending: u64,
    pub held: u64,
    pub dead: u64,
    /// Dropped by an operator meanwhile (not billed, on purpose).
    pub dropped: u64,
    /// The first undelivered events, with why.
    pub undelivered: Vec<Undelivered>,
}

impl DeliveryReport {
    pub fn complete(&self) -> bool {
        self.pending == 0 && self.held == 0 && self.dead == 0
    }
}

/// Sends until `ids` are all out of `pending` (or `timeout`, or `shutdown`), then reports.
pub async fn deliver(
    settings: &ShipSettings,
    ids: Vec<String>,
    timeout: Duration,
    shutdown: &CancellationToken,
) -> anyhow::Result<DeliveryReport> {
    let stop = shutdown.child_token();
    let deadline = tokio::time::Instant::now() + timeout;
    let timer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            stop.cancel();
        })
    };
    let state_dir = settings.state_dir.clone();
    let ids = std::sync::Arc::new(ids);
    let result = loop {
        // Returns once nothing is claimable and nothing is in flight (or on stop).
        if let Err(e) = deliver_pending(settings, stop.clone()).await {
            break Err(e);
        }
        let (dir, ids) = (state_dir.clone(), ids.clone());
        let pending = tokio::task::spawn_blocking(move || any_pending(&dir, &ids)).await??;
        if !pending || stop.is_cancelled() {
            break Ok(());
        }
        // Leased by another sender (a running `tally ship`): give it time, then look again.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.cancelled() => {}
        }
    };
    timer.abort();
    result?;
    let dir = state_dir.clone();
    tokio::task::spawn_blocking(move || report(&dir, &ids)).await?
}

/// Whether any of `ids` is still pending (stops at the first: a long replay has many ids).
fn any_pending(state_dir: &std::path::Path, ids: &[String]) -> anyhow::Result<bool> {
    let Some(ob) = Outbox::open_read_only_in(state_dir)? else {
        return Ok(false);
    };
    for id in ids {
        if ob.state_of(id)? == Some(State::Pending) {
            return Ok(true);
        }
    }
    Ok(false)
}

fn report(state_dir: &std::path::Path, ids: &[String]) -> anyhow::Result<DeliveryReport> {
    let mut r = DeliveryReport::default();
    let Some(ob) = Outbox::open_read_only_in(state_dir)? else {
        return Ok(r);
    };
    for id in ids {
        let Some(detail) = ob.show(id)? else {
            continue;
        };
        match detail.state {
            State::Acked | State::LagoError => {
                r.acked += 1;
                continue;
            }
            State::Pending => r.pending += 1,
            State::Held => r.held += 1,
            State::Dead => r.dead += 1,
            State::Dropped => {
                r.dropped += 1;
                continue;
            }
            State::NotBillable => continue,
        }
        if r.undelivered.len() < NAMED {
            r.undelivered.push(Undelivered {
                transaction_id: detail.transaction_id,
                state: detail.state.name().to_owned(),
                attempts: detail.attempts,
                reason: detail.reason,
            });
        }
    }
    Ok(r)
}
