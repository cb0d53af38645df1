//! `tally replay --ship`: deliver with the shipper's own sender ([`deliver_pending`]) and wait
//! until this replay's events are acked, or say which are not and why.
//!
//! A running `tally ship` holds the outbox's sender lock and delivers them instead: that is fine,
//! this only waits for their state to change, up to `--ship-timeout`.

use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::ship::outbox::{ItemDetail, Outbox, State};
use crate::ship::{ShipSettings, deliver_pending};

use super::new_ids::{Cursor, SpooledIds};

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

    /// Counts one event of this replay in the state the outbox has it; `details` looks up
    /// why, for the first few it names (a fuller query than the state: a replay has many ids).
    fn count(
        &mut self,
        id: &str,
        state: Option<State>,
        details: impl FnOnce() -> anyhow::Result<Option<ItemDetail>>,
    ) -> anyhow::Result<()> {
        let Some(state) = state else { return Ok(()) };
        match state {
            State::NotBillable => return Ok(()),
            State::Acked | State::LagoError => {
                self.acked += 1;
                return Ok(());
            }
            State::Dropped => {
                self.dropped += 1;
                return Ok(());
            }
            State::Pending => self.pending += 1,
            State::Held => self.held += 1,
            State::Dead => self.dead += 1,
        }
        if self.undelivered.len() < NAMED
            && let Some(detail) = details()?
        {
            self.undelivered.push(Undelivered {
                transaction_id: id.to_owned(),
                state: state.name().to_owned(),
                attempts: detail.attempts,
                reason: detail.reason,
            });
        }
        Ok(())
    }
}

/// Sends until `ids` are all out of `pending` (or `timeout`, or `shutdown`), then reports.
pub async fn deliver(
    settings: &ShipSettings,
    mut ids: SpooledIds,
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
    // The ids before it were not pending when last looked at.
    let mut cursor = Cursor::default();
    let result = loop {
        // Returns once nothing is claimable and nothing is in flight (or on stop).
        if let Err(e) = deliver_pending(settings, stop.clone()).await {
            break Err(e);
        }
        let dir = state_dir.clone();
        let (back, pending) = tokio::task::spawn_blocking(move || {
            let pending = first_pending(&dir, &mut ids, cursor);
            (ids, pending)
        })
        .await?;
        ids = back;
        match pending? {
            Some(at) if !stop.is_cancelled() => cursor = at,
            _ => break Ok(()),
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
    tokio::task::spawn_blocking(move || report(&dir, &mut ids)).await?
}

/// The first of `ids` from `from` on that is still pending, if any (a long replay has many ids:
/// the next look starts there).
fn first_pending(
    state_dir: &std::path::Path,
    ids: &mut SpooledIds,
    from: Cursor,
) -> anyhow::Result<Option<Cursor>> {
    let Some(ob) = Outbox::open_read_only_in(state_dir)? else {
        return Ok(None);
    };
    ids.walk(from, |id| -> anyhow::Result<bool> {
        Ok(ob.state_of(id)? != Some(State::Pending))
    })
}

fn report(state_dir: &std::path::Path, ids: &mut SpooledIds) -> anyhow::Result<DeliveryReport> {
    let mut r = DeliveryReport::default();
    let Some(ob) = Outbox::open_read_only_in(state_dir)? else {
        return Ok(r);
    };
    ids.walk(Cursor::default(), |id| -> anyhow::Result<bool> {
        r.count(id, ob.state_of(id)?, || Ok(ob.show(id)?))?;
        Ok(true)
    })?;
    Ok(r)
}
