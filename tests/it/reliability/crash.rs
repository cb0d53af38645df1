//! Shipper crashes (docs/reliability.md): a writer appends records at a steady rate while the live
//! log is rotated every few hundred KB / MB, and the real `tally ship` is SIGKILLed at random
//! moments and restarted. Lago must end with exactly the records written, each once; the duplicates
//! Lago answered (`value_already_exist`) are the resends after restarts that it absorbed.
//!
//! CI: 3,000 records, 5 kills. `TALLY_FAULT_FULL=1`: 50,000 records, 50 kills, rotation every 2 MB.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::reliability::support::{LogWriter, PATIENCE, Rig, figure, full_variant};
use crate::support::SpendLine;
use crate::support::{SplitMix, wait_until};

struct Plan {
    records: u64,
    per_sec: u64,
    rotate_bytes: u64,
    kills: usize,
    /// Time alive between a start and the next SIGKILL, in ms: uniform in this range.
    alive_ms: (u64, u64),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipper_sigkilled_at_random_moments_under_rotation_bills_every_record_once() {
    let plan = if full_variant() {
        Plan {
            records: 50_000,
            per_sec: 1_000,
            rotate_bytes: 2 << 20,
            kills: 50,
            alive_ms: (100, 1_800),
        }
    } else {
        Plan {
            records: 3_000,
            per_sec: 1_000,
            rotate_bytes: 200 << 10,
            kills: 5,
            alive_ms: (100, 900),
        }
    };
    let rig = Rig::new().await;
    let seed = std::env::var("TALLY_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6_0000_u64 + plan.records);
    let mut rng = SplitMix(seed);

    // The live file exists before the first start, so the first start reads it from offset 0.
    let mut writer = LogWriter::open(&rig.log());
    let writing = Arc::new(AtomicBool::new(true));
    let writer_thread = std::thread::spawn({
        let writing = writing.clone();
        let (records, per_sec, rotate_bytes) = (plan.records, plan.per_sec, plan.rotate_bytes);
        move || {
            // Steady rate: batches of 10 lines every 10 ms at 1,000/s.
            let step = 10;
            let pause = Duration::from_millis(1000 * step / per_sec);
            let mut n = 0;
            while n < records {
                for _ in 0..step.min(records - n) {
                    let line = SpendLine::new(format!("crash-{n:06}"))
                        .end_user(format!("customer-{}", n % 7))
                        .to_line();
                    if writer.size + line.len() as u64 > rotate_bytes {
                        writer.rotate();
                    }
                    writer.append(line.as_bytes());
                    n += 1;
                }
                std::thread::sleep(pause);
            }
            writing.store(false, Ordering::SeqCst);
            writer.rotations
        }
    });

    let mut ship = rig.spawn_ship(&[]);
    let mut kills = 0;
    while kills < plan.kills {
        let alive = plan.alive_ms.0 + rng.below(plan.alive_ms.1 - plan.alive_ms.0);
        tokio::time::sleep(Duration::from_millis(alive)).await;
        ship.kill9();
        kills += 1;
        ship = rig.spawn_ship(&[]);
    }
    let rotations = tokio::task::spawn_blocking(move || writer_thread.join().unwrap())
        .await
        .unwrap();
    assert!(!writing.load(Ordering::SeqCst));

    let ids: Vec<String> = (0..plan.records).map(|n| format!("crash-{n:06}")).collect();
    rig.wait_stored_running(&mut ship, ids.len(), "every record after the kills")
        .await;
    // Lago can hold every record before the last shipper has acked them all: a shipper killed
    // after Lago stored its batch left those events pending, and the next one resends them (Lago
    // answers value_already_exist). Wait for that, then stop it and check nothing extra arrived.
    wait_until(
        "no events pending after the last start",
        PATIENCE,
        async || rig.pending() == 0,
    )
    .await;
    let status = ship.terminate().unwrap();
    assert!(status.success(), "SIGTERM exit: {status}");
    rig.assert_exactly_once(&ids);
    assert_eq!(rig.pending(), 0, "nothing left pending");
    assert!(rig.rejected().is_empty(), "{:?}", rig.rejected());

    let c = rig.lago.counters();
    figure(
        "shipper_crash",
        format!(
            "{} records, {} rotations, {kills} SIGKILLs (seed {seed}); Lago stored {} events, \
             answered {} resent events value_already_exist in {} rejected (422) batches, \
             {} batch requests in all",
            plan.records,
            rotations,
            c.events_stored,
            c.duplicates,
            c.by_status.get(&422).copied().unwrap_or(0),
            c.batch_requests,
        ),
    );
    assert_eq!(c.events_stored, plan.records);
}
