//! `tally demo`: the whole pipeline in one process; what it prints is what Lago stored.

use std::collections::BTreeMap;

use tally::spend::SpendRecord;

use super::{Bench, u};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_reports_what_lago_received_and_exits_0() {
    let b = Bench::new().await;
    let dir = b.path("demo");
    let dir_s = dir.to_str().unwrap();
    let v = b.json(&["demo", "--dir", dir_s]).await;

    let customers: Vec<(String, u64, u64, u64)> = v["customers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["customer"].as_str().unwrap().to_owned(),
                u(c, "events"),
                u(c, "input_tokens"),
                u(c, "output_tokens"),
            )
        })
        .collect();
    let names: Vec<&str> = customers.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(names, ["customer-7", "team-acme", "user-dana"], "{v}");
    assert!(customers.iter().all(|c| c.1 == 3), "{v}");
    assert_eq!(u(&v, "events_received"), 9);

    // What Lago received equals the spend log, charged by the demo's fallback list.
    let log = std::fs::read_to_string(dir.join("spend.jsonl")).unwrap();
    let mut from_log: BTreeMap<String, (u64, u64, u64, f64)> = BTreeMap::new();
    for l in log.lines() {
        let r = SpendRecord::parse_line(l.as_bytes()).unwrap();
        let who = r
            .end_user_id
            .clone()
            .or(r.user_id.clone())
            .or(r.team_id.clone())
            .unwrap();
        let e = from_log.entry(who).or_default();
        e.0 += 1;
        e.1 += r.input_tokens;
        e.2 += r.output_tokens;
        e.3 += r.response_cost.unwrap_or(0.0);
    }
    for (i, (name, events, input, output)) in customers.iter().enumerate() {
        let want = &from_log[name];
        assert_eq!(
            (*events, *input, *output),
            (want.0, want.1, want.2),
            "{name}"
        );
        let cost = v["customers"][i]["cost_usd"].as_f64().unwrap();
        assert!((cost - want.3).abs() < 1e-9, "{name}: {cost} vs {}", want.3);
    }
    // Every flow's requests went to the customer the flow names.
    for flow in v["flows"].as_array().unwrap() {
        assert_eq!(flow["transaction_ids"].as_array().unwrap().len(), 3);
    }
    // The closing `tally audit` found every acked event in Lago as sent.
    let audit = &v["audit"];
    assert_eq!(
        (
            u(audit, "checked"),
            u(audit, "missing"),
            u(audit, "different")
        ),
        (9, 0, 0),
        "{audit}"
    );
    assert_eq!(
        audit["unknown_subscriptions"],
        serde_json::json!({}),
        "{audit}"
    );
    // The emulator checked every event against the demo's billable metric (events.errors
    // webhooks to the shipper for any it could not bill): all billable.
    assert_eq!(v["lago_metric"], "llm_usage:total_tokens", "{v}");
    assert_eq!(u(&v, "lago_errors"), 0, "{v}");

    let state = format!("{dir_s}/state");
    let stats = b.json(&["queue", "stats", "--state-dir", &state]).await;
    assert_eq!(
        (u(&stats, "acked"), u(&stats, "pending")),
        (9, 0),
        "{stats}"
    );

    // The same directory again is refused: the totals must be one run's.
    let again = b.run(&["demo", "--dir", dir_s]).await;
    again.assert_code(1);
    assert!(again.stderr.contains("not empty"), "{}", again.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_text_output_names_the_customers_and_where_things_live() {
    let b = Bench::new().await;
    let dir = b.path("demo-text");
    let run = b.run(&["demo", "--dir", dir.to_str().unwrap()]).await;
    run.assert_code(0);
    for want in [
        "team-acme",
        "customer-7",
        "user-dana",
        "LAGO_API_CHARGE_BY=end_user_id,user_id,team_id",
        "Lago has all 9 events",
        "spend.jsonl",
    ] {
        assert!(run.stdout.contains(want), "{want}:\n{}", run.stdout);
    }
    assert!(
        run.stderr.is_empty(),
        "the demo is quiet on stderr: {}",
        run.stderr
    );
}
