//! Lago outages (docs/reliability.md): 5xx, refused connections (the emulator stops listening),
//! connection resets, 429 storms with `X-RateLimit-Reset`, answers slower than
//! `--request-timeout-secs`, and answers lost after Lago stored the batch. During each, `tally
//! queue stats` shows the backlog (pending > 0); after each, every record is at Lago exactly once.
//!
//! CI: each outage lasts 3 s. `TALLY_FAULT_FULL=1`: 60 s.

use std::time::{Duration, Instant};

use tally::lago_emulator::Fault;

use crate::reliability::support::{LogWriter, PATIENCE, Rig, figure, full_variant};
use crate::support::{SpendLine, wait_until};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Outage {
    ServerErrors,
    Refused,
    Resets,
    RateLimitStorm,
    SlowerThanTimeout,
    AnswersLost,
}

/// Effectively "until cleared".
const FOREVER: usize = 1_000_000_000;

async fn outage(kind: Outage) {
    let outage_len = if full_variant() {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(3)
    };
    let rig = Rig::new().await;
    let mut writer = LogWriter::open(&rig.log());
    let mut ship = rig.spawn_ship(&["--request-timeout-secs", "1"]);
    let name = format!("{kind:?}");
    let write = |writer: &mut LogWriter, from: u64, to: u64| {
        for n in from..to {
            let line = SpendLine::new(format!("{name}-{n:05}"))
                .end_user(format!("customer-{}", n % 7))
                .to_line();
            writer.append(line.as_bytes());
        }
    };

    // Before: the shipper is up and delivering.
    write(&mut writer, 0, 200);
    rig.wait_stored(200, "before the outage").await;

    // The outage starts, then records keep coming.
    let started = Instant::now();
    match kind {
        Outage::ServerErrors => rig.lago.inject(Fault::ServerError {
            status: 503,
            count: FOREVER,
        }),
        Outage::Refused => rig.lago.stop_listening(),
        Outage::Resets => rig.lago.inject(Fault::ResetConnection { count: FOREVER }),
        Outage::RateLimitStorm => rig.lago.inject(Fault::RateLimit {
            count: FOREVER,
            reset_secs: 1,
            retry_after: false,
        }),
        Outage::SlowerThanTimeout => rig.lago.inject(Fault::Delay {
            duration: Duration::from_millis(1500),
            count: FOREVER,
        }),
        Outage::AnswersLost => rig.lago.inject(Fault::DropResponse { count: FOREVER }),
    }
    write(&mut writer, 200, 1_000);
    // During: the backlog is visible to an operator.
    let mut peak = 0;
    wait_until(
        format!("{name}: queue stats to show a backlog"),
        PATIENCE,
        async || {
            peak = peak.max(rig.pending());
            peak > 0
        },
    )
    .await;
    // The outage lasts its time (this is the fault's length, not a wait for a condition).
    while started.elapsed() < outage_len {
        tokio::time::sleep(Duration::from_millis(250)).await;
        peak = peak.max(rig.pending());
        assert!(ship.exited().is_none(), "{name}: the shipper stopped");
    }
    let during = rig.pending();
    assert!(
        during > 0,
        "{name}: no backlog at the end of the outage ({} stored)",
        rig.lago.event_count()
    );
    let served = rig.lago.counters().faults_served;
    if kind != Outage::Refused {
        assert!(served > 0, "{name}: the fault was never hit");
    }

    // After: Lago is back; everything arrives once and nothing stays pending.
    match kind {
        Outage::Refused => rig.lago.resume_listening().await.unwrap(),
        _ => rig.lago.clear_faults(),
    }
    let lasted = started.elapsed();
    let ids: Vec<String> = (0..1_000).map(|n| format!("{name}-{n:05}")).collect();
    rig.wait_stored(ids.len(), &name).await;
    wait_until(
        format!("{name}: no events pending after recovery"),
        PATIENCE,
        async || rig.pending() == 0,
    )
    .await;
    let status = ship.terminate().unwrap();
    assert!(status.success(), "{name}: SIGTERM exit {status}");
    rig.assert_exactly_once(&ids);

    let c = rig.lago.counters();
    let statuses: Vec<String> = c
        .by_status
        .iter()
        .map(|(s, n)| format!("{s}×{n}"))
        .collect();
    figure(
        &format!("outage_{name}"),
        format!(
            "outage {:.1} s, backlog peak {peak} pending (still {during} at its end), {} faults \
             served, {} connections dropped, answers {}, {} resent events absorbed as \
             value_already_exist; 1000 records, each stored once",
            lasted.as_secs_f64(),
            served,
            c.connections_dropped,
            statuses.join(" "),
            c.duplicates
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lago_5xx_outage() {
    outage(Outage::ServerErrors).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lago_refusing_connections() {
    outage(Outage::Refused).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lago_resetting_connections() {
    outage(Outage::Resets).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lago_429_storm_with_ratelimit_reset() {
    outage(Outage::RateLimitStorm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lago_slower_than_the_request_timeout() {
    outage(Outage::SlowerThanTimeout).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lago_storing_but_the_answer_lost() {
    outage(Outage::AnswersLost).await;
}
