//! `tally replay`: dedupe against everything already billed, time windows, dry runs, LiteLLM
//! rows, gzip.

use std::io::Write;

use chrono::DateTime;
use tally::lago_emulator::StoredEvent;

use super::{Bench, GENEROUS, customers, u, write};
use crate::support::{SpendLine, wait_until};

fn millis(t: &str) -> i64 {
    DateTime::parse_from_rfc3339(t).unwrap().timestamp_millis()
}

fn by_id<'a>(events: &'a [StoredEvent], id: &str) -> &'a StoredEvent {
    events
        .iter()
        .find(|e| e.transaction_id == id)
        .unwrap_or_else(|| panic!("{id} not stored"))
}

fn gzip(path: &std::path::Path, text: &[u8]) {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(text).unwrap();
    std::fs::write(path, enc.finish().unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_twice_bills_once_and_keeps_the_records_timestamps() {
    let b = Bench::new().await;
    let log = b.path("october.jsonl");
    write(
        &log,
        &[
            SpendLine::new("r-1")
                .end_time("2026-10-31T23:59:59.250Z")
                .end_user("c-1")
                .team("team-x")
                .tokens(10, 20)
                .cost(0.001)
                .to_line(),
            SpendLine::new("r-2")
                .end_time("2026-10-30T08:00:00.000Z")
                .end_user("c-1")
                .team("team-x")
                .tokens(5, 5)
                .cost(0.0005)
                .to_line(),
            SpendLine::new("r-3")
                .end_time("2026-10-29T08:00:00.000Z")
                .end_user("c-2")
                .team("team-x")
                .tokens(1, 2)
                .cost(0.0001)
                .to_line(),
        ],
    );
    let log = log.to_str().unwrap();

    let first = b.json(&["replay", "--ship", log]).await;
    assert_eq!(
        (u(&first, "new_events"), u(&first, "already_billed")),
        (3, 0)
    );
    assert_eq!(u(&first["delivery"], "acked"), 3, "{first}");
    let mut ids = b.stored_ids();
    ids.sort();
    assert_eq!(ids, ["r-1", "r-2", "r-3"]);
    let events = b.lago.events();
    assert_eq!(
        by_id(&events, "r-1").timestamp_millis,
        millis("2026-10-31T23:59:59.250Z"),
        "usage lands in the period it belongs to, not at replay time"
    );

    let second = b.json(&["replay", "--ship", log]).await;
    assert_eq!(
        (u(&second, "new_events"), u(&second, "already_billed")),
        (0, 3),
        "{second}"
    );
    assert_eq!(b.lago.event_count(), 3, "nothing is billed twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_copy_of_the_live_log_shipped_by_tally_ship_bills_nothing_new() {
    let mut b = Bench::new().await;
    let live = b.path("spend.jsonl");
    let lines = [
        SpendLine::new("live-1")
            .end_time("2026-11-27T10:00:00.000Z")
            .end_user("c-1")
            .team("team-x")
            .tokens(7, 15)
            .cost(0.0002)
            .to_line(),
        SpendLine::new("live-2")
            .end_time("2026-11-27T10:00:01.000Z")
            .user("u-1")
            .tokens(7, 15)
            .cost(0.0002)
            .to_line(),
        SpendLine::new("live-3")
            .end_time("2026-11-27T10:00:02.000Z")
            .end_user("c-2")
            .team("team-x")
            .tokens(7, 15)
            .cost(0.0002)
            .to_line(),
    ];
    write(&live, &lines);
    b.charge_by = "end_user_id,user_id".into();
    let mut ship = b
        .command(&["ship", "--poll-interval-ms", "50", "--linger-ms", "5"])
        .spawn()
        .unwrap();
    wait_until("tally ship delivers the live log", GENEROUS, async || {
        b.lago.event_count() == 3
    })
    .await;

    // The operator replays the rotated copy (plain and compressed) while `tally ship` runs.
    std::fs::create_dir(b.path("archive")).unwrap();
    std::fs::copy(&live, b.path("archive/spend.jsonl.1")).unwrap();
    gzip(
        &b.path("archive/spend.jsonl.2.gz"),
        lines.concat().as_bytes(),
    );
    let pattern = format!("{}/spend.jsonl.*", b.path("archive").display());
    let v = b.json(&["replay", &pattern]).await;
    assert_eq!(v["files"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(u(&v, "lines_read"), 6);
    assert_eq!(u(&v, "new_events"), 0, "{v}");
    assert_eq!(u(&v, "already_billed"), 6, "{v}");
    assert!(customers(&v).is_empty());

    let stats = b.json(&["queue", "stats"]).await;
    assert_eq!(
        (u(&stats, "pending"), u(&stats, "acked")),
        (0, 3),
        "{stats}"
    );
    assert_eq!(b.lago.event_count(), 3);
    // The live log's position is shown, read to its end.
    let size = std::fs::metadata(&live).unwrap().len();
    let files = stats["files"].as_array().unwrap();
    let file = files
        .iter()
        .find(|f| f["path"].as_str().unwrap().ends_with("spend.jsonl"))
        .unwrap_or_else(|| panic!("live log missing from {stats}"));
    assert_eq!(
        (u(file, "position"), u(file, "size"), u(file, "lag_bytes")),
        (size, size, 0)
    );

    stop(&mut ship).await;
}

/// SIGTERM, then the drained exit.
pub async fn stop(child: &mut tokio::process::Child) {
    let pid = child.id().expect("running") as libc::pid_t;
    // SAFETY: signalling a child we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = tokio::time::timeout(GENEROUS, child.wait())
        .await
        .expect("tally ship drains within the timeout")
        .unwrap();
    assert!(status.success(), "tally ship exits 0 on SIGTERM: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_and_until_pick_a_utc_window_and_bad_values_are_refused() {
    let b = Bench::new().await;
    let log = b.path("history.jsonl");
    write(
        &log,
        &[
            SpendLine::new("w-1")
                .end_time("2026-10-31T23:59:59.999Z")
                .end_user("c")
                .team("team-x")
                .tokens(1, 1)
                .cost(0.0)
                .to_line(),
            SpendLine::new("w-2")
                .end_time("2026-11-01T00:00:00.000Z")
                .end_user("c")
                .team("team-x")
                .tokens(2, 2)
                .cost(0.0)
                .to_line(),
            SpendLine::new("w-3")
                .end_time("2026-11-15T12:00:00.000Z")
                .end_user("c")
                .team("team-x")
                .tokens(3, 3)
                .cost(0.0)
                .to_line(),
            SpendLine::new("w-4")
                .end_time("2026-12-01T00:00:00.000Z")
                .end_user("c")
                .team("team-x")
                .tokens(4, 4)
                .cost(0.0)
                .to_line(),
        ],
    );
    let log = log.to_str().unwrap();

    let nov = b
        .json(&[
            "replay",
            "--dry-run",
            "--since",
            "2026-11-01",
            "--until",
            "2026-12-01",
            log,
        ])
        .await;
    assert_eq!(
        (u(&nov, "new_events"), u(&nov, "outside_window")),
        (2, 2),
        "{nov}"
    );
    assert_eq!(customers(&nov), [("c".to_owned(), 2, 5, 5)]);

    // An offset is honoured: 13:00+01:00 is 12:00 UTC, so w-3 is inside.
    let late = b
        .json(&[
            "replay",
            "--dry-run",
            "--since",
            "2026-11-15T13:00:00+01:00",
            log,
        ])
        .await;
    assert_eq!(customers(&late), [("c".to_owned(), 2, 7, 7)]);

    b.json(&[
        "replay",
        "--ship",
        "--since",
        "2026-11-01",
        "--until",
        "2026-12-01",
        log,
    ])
    .await;
    let mut ids = b.stored_ids();
    ids.sort();
    assert_eq!(ids, ["w-2", "w-3"]);

    let bad = b.run(&["replay", "--until", "2026-02-30", log]).await;
    bad.assert_code(1);
    assert!(
        bad.stderr.contains("--until") && bad.stderr.contains("RFC 3339"),
        "{}",
        bad.stderr
    );
    let empty = b
        .run(&[
            "replay",
            "--since",
            "2026-12-01",
            "--until",
            "2026-11-01",
            log,
        ])
        .await;
    empty.assert_code(1);
    assert!(empty.stderr.contains("window is empty"), "{}", empty.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_writes_nothing_and_shows_per_customer_totals() {
    let b = Bench::new().await;
    let log = b.path("spend-2026-11.jsonl");
    let lines = [
        SpendLine::new("d-1")
            .end_time("2026-11-02T10:00:00.000Z")
            .end_user("acme")
            .team("team-x")
            .tokens(10, 20)
            .cost(0.25)
            .to_line(),
        SpendLine::new("d-2")
            .end_time("2026-11-02T11:00:00.000Z")
            .end_user("acme")
            .team("team-x")
            .tokens(5, 7)
            .cost(0.5)
            .to_line(),
        SpendLine::new("d-3")
            .end_time("2026-11-02T12:00:00.000Z")
            .end_user("globex")
            .team("team-x")
            .tokens(1, 2)
            .cost(0.125)
            .to_line(),
        SpendLine::new("d-4")
            .end_time("2026-11-02T13:00:00.000Z")
            .team("team-only")
            .tokens(100, 100)
            .cost(1.0)
            .to_line(),
    ];
    write(&log, &lines);
    let log_s = log.to_str().unwrap();

    // No outbox yet: a dry run does not create one.
    let v = b.json(&["replay", "--dry-run", log_s]).await;
    assert!(!b.state_dir().exists(), "a dry run created the state dir");
    assert_eq!(v["dry_run"], true);
    assert_eq!(
        customers(&v),
        [
            ("acme".to_owned(), 2, 15, 27),
            ("globex".to_owned(), 1, 1, 2)
        ]
    );
    let acme_cost = v["customers"][0]["cost_usd"].as_f64().unwrap();
    assert!((acme_cost - 0.75).abs() < 1e-9, "{v}");
    assert_eq!((u(&v, "new_events"), u(&v, "held")), (3, 1));
    let text = b.run(&["replay", "--dry-run", log_s]).await;
    text.assert_code(0);
    assert!(
        text.stdout.contains("acme") && text.stdout.contains("$0.75"),
        "{}",
        text.stdout
    );
    assert!(text.stdout.contains("dry run"), "{}", text.stdout);

    // With an outbox holding half the file: the dry run counts those as already billed and
    // leaves the database byte for byte as it was.
    let half = b.path("half.jsonl");
    write(&half, &lines[..2]);
    b.json(&["replay", half.to_str().unwrap()]).await;
    let before = std::fs::read(b.db()).unwrap();
    let stats_before = b.json(&["queue", "stats"]).await;
    let v = b.json(&["replay", "--dry-run", log_s]).await;
    assert_eq!(
        (u(&v, "new_events"), u(&v, "already_billed"), u(&v, "held")),
        (1, 2, 1),
        "{v}"
    );
    assert_eq!(customers(&v), [("globex".to_owned(), 1, 1, 2)]);
    assert_eq!(std::fs::read(b.db()).unwrap(), before, "the dry run wrote");
    let stats_after = b.json(&["queue", "stats"]).await;
    assert_eq!(stats_before["pending"], stats_after["pending"]);
    assert_eq!(stats_before["held"], stats_after["held"]);
    assert_eq!(b.lago.event_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn litellm_spend_logs_are_backfilled() {
    let mut b = Bench::new().await;
    b.charge_by = "end_user_id,user_id,team_id".into();
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/litellm/spend_logs.jsonl"
    );
    let v = b
        .json(&["replay", "--format", "litellm", "--ship", fixture])
        .await;
    assert_eq!(u(&v, "lines_read"), 8);
    assert_eq!(
        (
            u(&v, "new_events"),
            u(&v, "rejected"),
            u(&v, "not_billable")
        ),
        (6, 1, 1),
        "{v}"
    );
    assert_eq!(
        customers(&v),
        [
            ("cust-7".to_owned(), 2, 108, 266),
            ("team-acme".to_owned(), 2, 32, 75),
            ("user-dana".to_owned(), 2, 55, 80),
        ]
    );
    assert_eq!(u(&v["delivery"], "acked"), 6);

    let events = b.lago.events();
    assert_eq!(events.len(), 6);
    let e = by_id(&events, "chatcmpl-7f3c2a10-0004");
    assert_eq!(e.external_subscription_id.as_deref(), Some("cust-7"));
    assert_eq!(e.timestamp_millis, millis("2026-11-04T13:00:00Z"));
    assert_eq!(e.properties["input_tokens"], 100);
    assert_eq!(e.properties["model"], "gpt-4o");
    let e = by_id(&events, "chatcmpl-7f3c2a10-0001");
    assert_eq!(e.external_subscription_id.as_deref(), Some("team-acme"));
    assert_eq!(e.timestamp_millis, millis("2026-11-03T09:15:02.118Z"));

    // The bad row is kept with where it was and why.
    let text = std::fs::read_to_string(fixture).unwrap();
    let offset = text
        .find("{\"request_id\":\"chatcmpl-7f3c2a10-0007\"")
        .unwrap() as u64;
    let list = b.json(&["queue", "list", "--state", "rejected"]).await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{list}");
    assert_eq!(u(&items[0], "offset"), offset);
    assert!(items[0]["reason"].as_str().unwrap().contains("endTime"));
    assert!(
        items[0]["first_bytes"]
            .as_str()
            .unwrap()
            .starts_with("{\"request_id\":\"chatcmpl-7f3c2a10-0007\"")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_files_are_read() {
    let b = Bench::new().await;
    let text = [
        SpendLine::new("g-1")
            .end_time("2026-11-03T10:00:00.000Z")
            .end_user("c-9")
            .team("team-x")
            .tokens(3, 4)
            .cost(0.01)
            .to_line(),
        SpendLine::new("g-2")
            .end_time("2026-11-03T10:00:01.000Z")
            .end_user("c-9")
            .team("team-x")
            .tokens(5, 6)
            .cost(0.02)
            .to_line(),
    ]
    .concat();
    gzip(&b.path("spend.jsonl.3.gz"), text.as_bytes());
    let v = b.json(&["replay", "--dry-run", "spend.jsonl.*.gz"]).await;
    assert_eq!(customers(&v), [("c-9".to_owned(), 2, 8, 10)], "{v}");
    let v = b.json(&["replay", "--ship", "spend.jsonl.3.gz"]).await;
    assert_eq!(u(&v["delivery"], "acked"), 2);
    assert_eq!(b.lago.event_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_that_matches_nothing_is_an_error() {
    let b = Bench::new().await;
    let r = b.run(&["replay", "--dry-run", "nothing-*.jsonl"]).await;
    r.assert_code(1);
    assert!(r.stderr.contains("matches no file"), "{}", r.stderr);
}

/// Regression: `tally replay` and `tally queue retry` checked LAGO_API_EVENT_CODE
/// apart from `tally ship` and wrote a code with surrounding whitespace into stored events,
/// which Lago then matched to no billable metric. All three now build their events with the
/// same checks, and refuse it before writing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_refuses_an_event_code_with_surrounding_whitespace() {
    let b = Bench::new().await;
    let log = b.path("ws.jsonl");
    write(
        &log,
        &[SpendLine::new("ws-1")
            .end_time("2026-11-05T10:00:00.000Z")
            .end_user("c-1")
            .team("team-x")
            .tokens(7, 15)
            .cost(0.0002)
            .to_line()],
    );
    let log = log.to_str().unwrap();
    for args in [
        vec!["ship"],
        vec!["replay", log],
        vec!["replay", "--ship", log],
        vec!["queue", "retry", "--state", "held"],
    ] {
        let out = b
            .command(&args)
            .env("LAGO_API_EVENT_CODE", " llm_usage ")
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "tally {args:?}: {stderr}");
        assert!(
            stderr.contains("LAGO_API_EVENT_CODE") && stderr.contains("whitespace"),
            "tally {args:?}: {stderr}"
        );
    }
    assert!(!b.db().exists(), "nothing may be written with such a code");
    assert!(b.stored_ids().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_ship_reports_what_lago_did_not_acknowledge_and_exits_3() {
    let b = Bench::new().await;
    let log = b.path("unsent.jsonl");
    write(
        &log,
        &[
            SpendLine::new("n-1")
                .end_time("2026-11-07T10:00:00.000Z")
                .end_user("c-1")
                .team("team-x")
                .tokens(1, 1)
                .cost(0.0)
                .to_line(),
            SpendLine::new("n-2")
                .end_time("2026-11-07T10:00:01.000Z")
                .team("team-z")
                .tokens(1, 1)
                .cost(0.0)
                .to_line(),
        ],
    );
    // Lago refuses connections: n-1 stays pending; n-2 has no end user and is held.
    b.lago.stop_listening();
    let run = b
        .run(&[
            "replay",
            "--ship",
            "--ship-timeout",
            "2",
            "--retry-cap-secs",
            "1",
            "--output-format",
            "json",
            log.to_str().unwrap(),
        ])
        .await;
    run.assert_code(3);
    let v = run.json();
    let d = &v["delivery"];
    assert_eq!(
        (u(d, "acked"), u(d, "pending"), u(d, "held")),
        (0, 1, 1),
        "{v}"
    );
    let undelivered = d["undelivered"].as_array().unwrap();
    let n1 = undelivered
        .iter()
        .find(|x| x["transaction_id"] == "n-1")
        .unwrap();
    assert_eq!(n1["state"], "pending");
    assert!(u(n1, "attempts") >= 1, "{n1}");
    assert!(n1["reason"].is_string(), "the send error is shown: {n1}");
    let n2 = undelivered
        .iter()
        .find(|x| x["transaction_id"] == "n-2")
        .unwrap();
    assert!(
        n2["reason"].as_str().unwrap().contains("end_user_id"),
        "{n2}"
    );

    // Once Lago is back, the same replay delivers what was pending and exits 0 for new events
    // (none are new: the pending one is delivered on the way).
    b.lago.resume_listening().await.unwrap();
    let again = b.json(&["replay", "--ship", log.to_str().unwrap()]).await;
    assert_eq!(u(&again, "already_billed"), 2);
    assert_eq!(b.stored_ids(), ["n-1"]);
}

/// A replay of many batches reads on one thread and records on another, a window of batches per
/// outbox transaction (ids in no order share one window; ids in order commit batch by batch).
/// With malformed, blank, repeated and conflicting lines throughout, it counts what its dry run
/// (one thread) counts, reports the same first rejections in the same (file) order, records each
/// id once, and a second replay of the same file finds every record already billed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_of_several_batches_counts_what_its_dry_run_does() {
    // "big-9" sorts after "big-10": in no order. Zero-padded, in order.
    for (name, padded) in [("unordered", false), ("ordered", true)] {
        replay_of_several_batches(name, padded).await;
    }
}

async fn replay_of_several_batches(name: &str, padded: bool) {
    let b = Bench::new().await;
    let log = b.path(&format!("{name}.jsonl"));
    let record = |i: usize, input: u64| {
        let id = if padded {
            format!("big-{i:05}")
        } else {
            format!("big-{i}")
        };
        SpendLine::new(id)
            .end_user(format!("c-{}", i % 3))
            .tokens(input, 2)
            .to_line()
    };
    let lines: Vec<String> = (0..10_000)
        .map(|i| match i % 1000 {
            7 => "{\"schema\":1,\"transaction_id\":\n".to_string(),
            8 => "   \n".to_string(),
            9 => record(i - 9, 1),    // the line nine before, again
            10 => record(i - 10, 99), // the line ten before, with other counts
            _ => record(i, 1),
        })
        .collect();
    write(&log, &lines);
    let log = log.to_str().unwrap();

    let dry = b.json(&["replay", "--dry-run", log]).await;
    let real = b.json(&["replay", log]).await;
    for key in [
        "lines_read",
        "new_events",
        "already_billed",
        "rejected",
        "blank_lines",
        "held",
        "not_billable",
    ] {
        assert_eq!(
            u(&real, key),
            u(&dry, key),
            "{name} {key}: {real} against {dry}"
        );
    }
    assert_eq!(u(&real, "lines_read"), 10_000);
    assert_eq!(u(&real, "new_events"), 10_000 - 40);
    assert_eq!(u(&real, "already_billed"), 10);
    assert_eq!(u(&real, "rejected"), 20, "10 malformed, 10 conflicting");
    assert_eq!(u(&real, "blank_lines"), 10);
    assert_eq!(customers(&real), customers(&dry));
    // The first rejections, in file order: a malformed line, then a conflict, per thousand.
    let first: Vec<(u64, bool)> = real["first_rejections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let reason = r["reason"].as_str().unwrap();
            (u(r, "offset"), reason.contains("conflicting duplicate"))
        })
        .collect();
    assert_eq!(real["first_rejections"], dry["first_rejections"], "{name}");
    assert_eq!(first.len(), 5, "{name}: {first:?}");
    let kinds: Vec<bool> = first.iter().map(|f| f.1).collect();
    assert_eq!(
        kinds,
        [false, true, false, true, false],
        "{name}: {first:?}"
    );
    assert!(
        first.windows(2).all(|w| w[0].0 < w[1].0),
        "{name}: {first:?}"
    );
    let events: u64 = customers(&real).iter().map(|c| c.1).sum();
    assert_eq!(events, 10_000 - 40);

    let again = b.json(&["replay", log]).await;
    assert_eq!(u(&again, "new_events"), 0);
    assert_eq!(u(&again, "already_billed"), 10_000 - 40 + 10);
    assert_eq!(u(&again, "rejected"), 20);
}

/// `--ship` over many batches waits for, and reports on, exactly this replay's new events: not
/// those an earlier replay recorded (delivered on the way all the same), and the held ones named.
/// The ids it waits for are spooled to an unlinked file: the state directory is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_ship_of_many_batches_reports_on_its_own_new_events() {
    let b = Bench::new().await;
    // "ship-9" sorts after "ship-10": ids in no order, so the replay keeps windows open across
    // batches (one window here). Every hundredth line has no end user: held.
    let line = |i: usize| {
        let l = SpendLine::new(format!("ship-{i}"))
            .team("team-x")
            .tokens(3, 4);
        if i.is_multiple_of(100) {
            l
        } else {
            l.end_user(format!("c-{}", i % 5))
        }
        .to_line()
    };
    let early = b.path("early.jsonl");
    write(&early, &(0..1_000).map(line).collect::<Vec<_>>());
    let all = b.path("all.jsonl");
    write(&all, &(0..6_000).map(line).collect::<Vec<_>>());

    let first = b.json(&["replay", early.to_str().unwrap()]).await;
    assert_eq!((u(&first, "new_events"), u(&first, "held")), (990, 10));
    assert!(b.stored_ids().is_empty(), "no --ship, nothing sent");
    let files = |dir: &std::path::Path| {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let before = files(&b.state_dir());

    let run = b
        .run(&[
            "replay",
            "--ship",
            "--output-format",
            "json",
            all.to_str().unwrap(),
        ])
        .await;
    run.assert_code(3); // held events are not delivered
    let v = run.json();
    assert_eq!(
        (u(&v, "new_events"), u(&v, "held"), u(&v, "already_billed")),
        (4_950, 50, 1_000),
        "{v}"
    );
    let d = &v["delivery"];
    assert_eq!(
        (u(d, "acked"), u(d, "pending"), u(d, "held"), u(d, "dead")),
        (4_950, 0, 50, 0),
        "only this replay's new events are counted: {d}"
    );
    let named = d["undelivered"].as_array().unwrap();
    assert_eq!(named.len(), 10, "{d}");
    for n in named {
        assert_eq!(n["state"], "held", "{n}");
        let id: usize = n["transaction_id"].as_str().unwrap()["ship-".len()..]
            .parse()
            .unwrap();
        assert!(id >= 1_000 && id.is_multiple_of(100), "{n}");
    }
    // The earlier replay's pending events went out on the way; each id once.
    let mut stored = b.stored_ids();
    stored.sort();
    let mut expected: Vec<String> = (0..6_000)
        .filter(|i| i % 100 != 0)
        .map(|i| format!("ship-{i}"))
        .collect();
    expected.sort();
    assert_eq!(stored, expected);
    // The outbox's own files (its WAL, the sender's lock) and nothing else.
    let after = files(&b.state_dir());
    assert!(
        after.iter().all(|f| f.starts_with("shipper.db")) && after.contains(&before[0]),
        "no spool file is left behind: {after:?}"
    );
}
