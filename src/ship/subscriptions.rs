//! Does Lago know the subscriptions tally bills? Since Lago 1.2 an event is billed only through
//! its `external_subscription_id`; one Lago does not know is stored with a 200 and never billed.
//!
//! The shipper keeps sending (the subscription may be created later; Lago then bills what it
//! stored in the period), and this task makes the gap visible: each external_subscription_id is
//! looked up once with `GET /api/v1/subscriptions/{id}` as it first appears in the outbox (its
//! `targets` table, in first-seen order, so each pass reads only new ids); an unknown one is warned about once, counted in
//! `tally_ship_unknown_subscriptions` and kept in the outbox's `subscriptions` table, which
//! `tally queue stats` shows. Unknown ones are looked up again every [`RECHECK_UNKNOWN`].
//! Failures to ask (Lago down, a key without read access) are logged and tried again later;
//! they never hold up delivery.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rusqlite::params;
use tokio_util::sync::CancellationToken;

use crate::metrics::ShipMetrics;
use crate::ship::lago_read::{LagoReader, Lookup};
use crate::ship::outbox::with_outbox;
use crate::ship::outbox::{OutboxError, SharedOutbox};

/// How often the outbox is looked at for new subscription ids.
pub const SCAN_EVERY: Duration = Duration::from_secs(2);
/// How often an unknown subscription is asked about again.
pub const RECHECK_UNKNOWN: Duration = Duration::from_secs(600);
/// Lookups per second: a trickle next to the event traffic.
pub const RATE: f64 = 5.0;
/// Rows read per scan step.
const PAGE: i64 = 10_000;

/// What the checker knows of one id.
#[derive(Debug, Clone, Copy)]
struct Seen {
    known: bool,
    checked: Instant,
}

/// Runs until `stop`.
pub async fn run_checker(
    outbox: SharedOutbox,
    mut reader: LagoReader,
    metrics: Option<ShipMetrics>,
    stop: CancellationToken,
) {
    let mut seen: HashMap<String, Seen> = HashMap::new();
    let mut after_rowid = 0i64;
    let mut warned_failure = false;
    // Ids warned about as unknown: once each, until Lago knows them.
    let mut warned: HashSet<String> = HashSet::new();
    loop {
        // New ids since the last pass.
        loop {
            let from = after_rowid;
            let page = with_outbox(&outbox, move |ob| new_ids(ob.conn(), from)).await;
            let (ids, last) = match page {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read subscription ids from the outbox");
                    break;
                }
            };
            for id in ids {
                seen.entry(id).or_insert(Seen {
                    known: false,
                    // Never checked: due now.
                    checked: Instant::now() - RECHECK_UNKNOWN - Duration::from_secs(1),
                });
            }
            match last {
                Some(l) => after_rowid = l,
                None => break,
            }
        }
        let due: Vec<String> = seen
            .iter()
            .filter(|(_, s)| !s.known && s.checked.elapsed() >= RECHECK_UNKNOWN)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let lookup = tokio::select! {
                r = reader.subscription(&id) => r,
                () = stop.cancelled() => return,
            };
            let known = match lookup {
                Ok(Lookup::Found(_)) => true,
                Ok(Lookup::NotFound) => false,
                Err(e) => {
                    if !warned_failure {
                        tracing::warn!(error = %e, "cannot ask Lago about subscriptions; events are still sent, the check is tried again later");
                        warned_failure = true;
                    }
                    continue;
                }
            };
            seen.insert(
                id.clone(),
                Seen {
                    known,
                    checked: Instant::now(),
                },
            );
            if !known && warned.insert(id.clone()) {
                tracing::warn!(
                    external_subscription_id = %crate::text::printable(&id),
                    "Lago does not know this subscription: its events are stored but never \
                     billed; create it in Lago (the shipper keeps sending, see `tally queue stats`)"
                );
            } else if known && warned.remove(&id) {
                tracing::info!(
                    external_subscription_id = %crate::text::printable(&id),
                    "Lago knows this subscription now"
                );
            }
            let record = id.clone();
            if let Err(e) =
                with_outbox(&outbox, move |ob| ob.set_subscription_known(&record, known)).await
            {
                tracing::warn!(error = %e, "cannot record a subscription check in the outbox");
            }
        }
        if let Some(m) = &metrics {
            m.set_unknown_subscriptions(seen.values().filter(|s| !s.known).count() as u64);
        }
        tokio::select! {
            () = tokio::time::sleep(SCAN_EVERY) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Subscription ids first seen after `after_rowid` (one page of `targets`), and the
/// last rowid read (`None` when there was nothing new).
fn new_ids(
    conn: &rusqlite::Connection,
    after_rowid: i64,
) -> Result<(Vec<String>, Option<i64>), OutboxError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, subscription_id FROM targets WHERE id > ?1 ORDER BY id LIMIT ?2",
    )?;
    let mut rows = stmt.query(params![after_rowid, PAGE])?;
    let mut ids = Vec::new();
    let mut last = None;
    while let Some(r) = rows.next()? {
        last = Some(r.get::<_, i64>(0)?);
        if let Some(id) = r.get::<_, Option<String>>(1)? {
            ids.push(id);
        }
    }
    ids.sort();
    ids.dedup();
    Ok((ids, last))
}
