//! `tally queue`: what it shows (text and JSON), and what retry and drop do.

use super::replay::stop;
use super::{Bench, GENEROUS, u, write};
use crate::support::{SpendLine, wait_until};

/// Two pending events, one held (no end user), one malformed line, enqueued by a replay.
async fn mixed_outbox(b: &Bench) -> std::path::PathBuf {
    let log = b.path("mixed.jsonl");
    let mut lines = vec![
        SpendLine::new("q-1")
            .end_time("2026-11-05T10:00:00.000Z")
            .end_user("c-1")
            .team("team-x")
            .tokens(7, 15)
            .cost(0.0002)
            .to_line(),
        SpendLine::new("q-2")
            .end_time("2026-11-05T10:00:01.000Z")
            .end_user("c-2")
            .team("team-x")
            .tokens(7, 15)
            .cost(0.0002)
            .to_line(),
        SpendLine::new("q-3")
            .end_time("2026-11-05T10:00:02.000Z")
            .team("team-a")
            .tokens(7, 15)
            .cost(0.0002)
            .to_line(),
    ];
    lines.push("not json at all\n".to_owned());
    write(&log, &lines);
    let v = b.json(&["replay", log.to_str().unwrap()]).await;
    assert_eq!(
        (u(&v, "new_events"), u(&v, "held"), u(&v, "rejected")),
        (2, 1, 1)
    );
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_output_in_text_and_json() {
    let b = Bench::new().await;
    let missing = b.run(&["queue", "stats"]).await;
    missing.assert_code(1);
    assert!(
        missing.stderr.contains("no outbox at"),
        "{}",
        missing.stderr
    );
    assert!(!b.db().exists(), "queue stats must not create the outbox");

    let log = mixed_outbox(&b).await;

    let stats = b.json(&["queue", "stats"]).await;
    for (key, want) in [
        ("pending", 2),
        ("held", 1),
        ("dead", 0),
        ("acked", 0),
        ("rejected", 1),
    ] {
        assert_eq!(stats[key].as_u64(), Some(want), "{key} in {stats}");
    }
    assert!(stats["oldest_pending_age_secs"].is_u64(), "{stats}");
    assert!(stats["last_lago_error"].is_null());
    assert!(stats["files"].is_array());
    let text = b.run(&["queue", "stats"]).await;
    text.assert_code(0);
    for want in ["pending", "held", "rejected lines", "Oldest pending event"] {
        assert!(text.stdout.contains(want), "{want}: {}", text.stdout);
    }

    let held = b.json(&["queue", "list", "--state", "held"]).await;
    let items = held["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["id"], "q-3");
    assert!(items[0]["reason"].as_str().unwrap().contains("end_user_id"));

    let all = b.json(&["queue", "list"]).await;
    let states: Vec<&str> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["held", "rejected", "pending", "pending"]);
    let limited = b.json(&["queue", "list", "--limit", "1"]).await;
    assert_eq!(limited["items"].as_array().unwrap().len(), 1);

    let rejected = b.run(&["queue", "list", "--state", "rejected"]).await;
    rejected.assert_code(0);
    let canonical = std::fs::canonicalize(&log).unwrap();
    let offset = std::fs::read_to_string(&log)
        .unwrap()
        .find("not json")
        .unwrap();
    let place = format!("{}:{offset}", canonical.display());
    assert!(
        rejected.stdout.contains("not json at all"),
        "{}",
        rejected.stdout
    );
    let json = b.json(&["queue", "list", "--state", "rejected"]).await;
    let r = &json["items"][0];
    assert_eq!(
        format!("{}:{}", r["file"].as_str().unwrap(), u(r, "offset")),
        place
    );
    assert_eq!(r["first_bytes"], "not json at all");

    let show = b.json(&["queue", "show", "q-1"]).await;
    assert_eq!(show["state"], "pending");
    assert_eq!(show["external_subscription_id"], "c-1");
    assert_eq!(show["lago_event"]["transaction_id"], "q-1");
    assert_eq!(show["lago_event"]["external_subscription_id"], "c-1");
    assert_eq!(show["lago_event"]["code"], super::EVENT_CODE);
    assert_eq!(show["lago_event"]["timestamp"], "1793872800.000");
    assert_eq!(show["lago_event"]["properties"]["input_tokens"], 7);
    let held = b.json(&["queue", "show", "q-3"]).await;
    assert_eq!(held["state"], "held");
    assert_eq!(held["record"]["team_id"], "team-a");
    assert!(held["lago_event"].is_null());
    assert_eq!(u(&show, "attempts"), 0);
    let text = b.run(&["queue", "show", "q-1"]).await;
    text.assert_code(0);
    assert!(text.stdout.contains("Lago event:"), "{}", text.stdout);

    let unknown = b.run(&["queue", "show", "no-such-id"]).await;
    unknown.assert_code(1);
    assert!(
        unknown.stderr.contains("not in the outbox"),
        "{}",
        unknown.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_events_are_delivered_after_a_retry_with_a_fixed_charge_by() {
    let b = Bench::new().await;
    let log = b.path("teams.jsonl");
    write(
        &log,
        &[
            SpendLine::new("h-1")
                .end_time("2026-11-06T10:00:00.000Z")
                .team("team-a")
                .tokens(1, 2)
                .cost(0.001)
                .to_line(),
            SpendLine::new("h-2")
                .end_time("2026-11-06T10:00:01.000Z")
                .team("team-a")
                .tokens(3, 4)
                .cost(0.002)
                .to_line(),
            SpendLine::new("h-3")
                .end_time("2026-11-06T10:00:02.000Z")
                .team("team-b")
                .tokens(5, 6)
                .cost(0.003)
                .to_line(),
        ],
    );
    let v = b.json(&["replay", log.to_str().unwrap()]).await;
    assert_eq!(u(&v, "held"), 3);

    // Same setting: nothing changes, and each item says why.
    let same = b.json(&["queue", "retry", "--state", "held"]).await;
    assert_eq!(
        (u(&same, "requeued"), u(&same, "still_held")),
        (0, 3),
        "{same}"
    );

    let fixed = b
        .json(&[
            "queue",
            "retry",
            "--state",
            "held",
            "--charge-by",
            "end_user_id,team_id",
        ])
        .await;
    assert_eq!(u(&fixed, "requeued"), 3, "{fixed}");
    let h3 = fixed["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "h-3")
        .unwrap();
    assert_eq!(h3["outcome"], "requeued");
    assert_eq!(h3["external_subscription_id"], "team-b");

    std::fs::write(b.path("spend.jsonl"), b"").unwrap();
    let mut ship = b
        .command(&["ship", "--poll-interval-ms", "50", "--linger-ms", "5"])
        .spawn()
        .unwrap();
    wait_until("the retried events reach Lago", GENEROUS, async || {
        b.lago.event_count() == 3
    })
    .await;
    stop(&mut ship).await;
    let subs: Vec<(String, Option<String>)> = b
        .lago
        .events()
        .into_iter()
        .map(|e| (e.transaction_id, e.external_subscription_id))
        .collect();
    assert!(
        subs.contains(&("h-3".into(), Some("team-b".into()))),
        "{subs:?}"
    );
    let stats = b.json(&["queue", "stats"]).await;
    assert_eq!((u(&stats, "held"), u(&stats, "acked")), (0, 3));

    let nothing = b.run(&["queue", "retry", "h-1", "nope"]).await;
    nothing.assert_code(0);
    assert!(
        nothing.stdout.contains("h-1: already acked"),
        "{}",
        nothing.stdout
    );
    assert!(
        nothing.stdout.contains("nope: not in the outbox"),
        "{}",
        nothing.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_event_is_recorded_and_never_billed() {
    let b = Bench::new().await;
    mixed_outbox(&b).await;

    let dropped = b
        .json(&[
            "queue",
            "drop",
            "q-2",
            "--reason",
            "test customer, not billable",
        ])
        .await;
    assert_eq!(u(&dropped, "dropped"), 1);
    assert_eq!(dropped["items"][0]["outcome"], "dropped");
    let unknown = b.run(&["queue", "drop", "nope", "--reason", "x"]).await;
    unknown.assert_code(1);
    assert!(
        unknown.stdout.contains("nope: not in the outbox"),
        "{}",
        unknown.stdout
    );

    let show = b.json(&["queue", "show", "q-2"]).await;
    assert_eq!(show["state"], "dropped");
    assert!(
        show["reason"]
            .as_str()
            .unwrap()
            .contains("test customer, not billable")
    );
    let list = b.json(&["queue", "list", "--state", "dropped"]).await;
    assert_eq!(list["items"][0]["id"], "q-2");

    std::fs::write(b.path("spend.jsonl"), b"").unwrap();
    let mut ship = b
        .command(&["ship", "--poll-interval-ms", "50", "--linger-ms", "5"])
        .spawn()
        .unwrap();
    wait_until("the pending event reaches Lago", GENEROUS, async || {
        b.lago.event_count() >= 1
    })
    .await;
    stop(&mut ship).await;
    assert_eq!(b.stored_ids(), ["q-1"], "the dropped event was billed");
    let stats = b.json(&["queue", "stats"]).await;
    assert_eq!(
        (
            u(&stats, "pending"),
            u(&stats, "dropped"),
            u(&stats, "acked")
        ),
        (0, 1, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_max_age_exits_3_while_the_oldest_pending_event_is_older() {
    let b = Bench::new().await;
    let log = mixed_outbox(&b).await;

    b.run(&["queue", "stats", "--max-age", "3600"])
        .await
        .assert_code(0);
    // Pending events age by the clock: poll until one second has passed, by observation.
    let stale = wait_until("queue stats to report too old", GENEROUS, async || {
        let run = b.run(&["queue", "stats", "--max-age", "0"]).await;
        if run.code == Some(3) {
            return Some(run);
        }
        run.assert_code(0);
        None
    })
    .await;
    assert!(
        stale.stderr.contains("over --max-age 0s"),
        "{}",
        stale.stderr
    );
    assert!(stale.stdout.contains("ATTENTION"), "{}", stale.stdout);
    let json = b
        .run(&[
            "queue",
            "stats",
            "--max-age",
            "0",
            "--output-format",
            "json",
        ])
        .await;
    json.assert_code(3);
    assert_eq!(json.json()["too_old"], true);

    // Delivered: nothing pending, healthy again.
    b.json(&["replay", "--ship", log.to_str().unwrap()]).await;
    b.run(&["queue", "stats", "--max-age", "0"])
        .await
        .assert_code(0);
}
