//! The sender against a scripted stub Lago: how each class of answer is handled.
//! (End-to-end runs against the full emulator are in `ship::e2e`.)

use std::sync::Arc;
use std::time::Duration;

use tally::ship::outbox::{IngestItem, ListFilter, Outbox, Source, State};
use tally::ship::resolve::{EventSpec, prepare};
use tally::ship::sender::{SendMode, SendTotals, run_sender};
use tally::ship::signal::WorkSignal;
use tally::ship::{ApiKey, ShipSettings, deliver_pending, lago::LagoClient};
use tally::spend::SpendRecord;
use tokio_util::sync::CancellationToken;

use crate::ship::stub::{Scripted, Stub};
use crate::support::{SpendLine, free_port, wait_until};

const KEY: &str = "stub-key-123";
const LONG: Duration = Duration::from_secs(60);

fn settings(stub: &Stub, dir: &std::path::Path) -> ShipSettings {
    let mut s = ShipSettings::new(
        dir.join("spend.jsonl"),
        dir.join("state"),
        &stub.base_url(),
        ApiKey::new(KEY),
        "llm_usage",
    )
    .unwrap();
    s.tuning.retry_cap = Duration::from_millis(400);
    s.tuning.linger = Duration::from_millis(5);
    s.tuning.drain_deadline = Duration::from_millis(300);
    s
}

fn spec() -> EventSpec {
    EventSpec {
        code: "llm_usage".into(),
        charge_by: Default::default(),
        precise_amount: None,
    }
}

fn records(prefix: &str, n: usize) -> Vec<SpendRecord> {
    (0..n)
        .map(|i| {
            SpendLine::new(format!("{prefix}-{i}"))
                .end_user("cust-1")
                .end_ms(i as i64)
                .record()
        })
        .collect()
}

fn ingest(s: &ShipSettings, records: &[SpendRecord]) -> Outbox {
    let mut ob = Outbox::open_in(&s.state_dir).unwrap();
    let items: Vec<_> = records
        .iter()
        .enumerate()
        .map(|(i, r)| IngestItem::Record {
            prepared: prepare(r, &spec()),
            source: Source {
                file: "test".into(),
                offset: i as u64,
            },
        })
        .collect();
    ob.ingest(&items, &[]).unwrap();
    ob
}

async fn deliver(s: &ShipSettings) -> tally::ship::sender::SendReport {
    tokio::time::timeout(LONG, deliver_pending(s, CancellationToken::new()))
        .await
        .expect("delivery did not finish")
        .unwrap()
}

/// Runs a `Forever` sender in the background; returns its stop token and handle.
fn spawn_sender(
    s: &ShipSettings,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<
        Result<tally::ship::sender::SendReport, tally::ship::sender::SenderError>,
    >,
) {
    spawn_sender_on(Outbox::open_in(&s.state_dir).unwrap().shared(), s)
}

/// [`spawn_sender`] on an outbox the caller also holds.
fn spawn_sender_on(
    outbox: tally::ship::outbox::SharedOutbox,
    s: &ShipSettings,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<
        Result<tally::ship::sender::SendReport, tally::ship::sender::SenderError>,
    >,
) {
    let client = LagoClient::new(&s.lago, &s.tuning).unwrap();
    let stop = CancellationToken::new();
    let handle = tokio::spawn(run_sender(
        outbox,
        client,
        s.tuning.clone(),
        Arc::new(WorkSignal::default()),
        SendMode::Forever,
        stop.clone(),
        Arc::new(SendTotals::default()),
    ));
    (stop, handle)
}

#[tokio::test]
async fn ok_answers_ack_every_event_once_in_batches() {
    let stub = Stub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let s = settings(&stub, dir.path());
    let recs = records("ok", 250);
    let ob = ingest(&s, &recs);
    let report = deliver(&s).await;
    assert_eq!(report.acked, 250);
    let mut stored = stub.stored_ids();
    stored.sort();
    stored.dedup();
    assert_eq!(stored.len(), 250);
    assert_eq!(stub.requests().len(), 3, "100 + 100 + 50");
    assert!(
        stub.requests()
            .iter()
            .all(|r| r.auth.as_deref() == Some(&format!("Bearer {KEY}")[..]))
    );
    let stats = ob.stats().unwrap();
    assert_eq!((stats.acked, stats.pending), (250, 0));
    // The timestamp is the record's end_time in seconds with milliseconds.
    let first = &stub.state.lock().unwrap().stored[0];
    assert_eq!(first["timestamp"], "1795773600.000");
    assert_eq!(first["external_subscription_id"], "cust-1");
}

#[tokio::test]
async fn duplicates_answered_value_already_exist_are_acked() {
    let stub = Stub::start().await;
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let sa = settings(&stub, a.path());
    let sb = settings(&stub, b.path());
    // A first shipper delivers 30; a second one (another outbox) holds the same 30 plus 20 more.
    let first = records("dup", 30);
    ingest(&sa, &first);
    deliver(&sa).await;
    let both = records("dup", 50);
    let ob = ingest(&sb, &both);
    let report = deliver(&sb).await;
    assert_eq!((report.acked, report.dead), (50, 0));
    let mut stored = stub.stored_ids();
    let n = stored.len();
    stored.sort();
    stored.dedup();
    assert_eq!(
        (n, stored.len()),
        (50, 50),
        "each event stored exactly once"
    );
    assert_eq!(ob.stats().unwrap().acked, 50);
}

#[tokio::test]
async fn refused_events_are_dead_with_lagos_words_and_the_rest_resent() {
    let stub = Stub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let s = settings(&stub, dir.path());
    let mut recs = records("mix", 20);
    recs[3].model = "refuse-me".into();
    recs[11].model = "refuse-plain".into();
    let ob = ingest(&s, &recs);
    let report = deliver(&s).await;
    assert_eq!((report.acked, report.dead), (18, 2));
    let stored = stub.stored_ids();
    assert_eq!(stored.len(), 18);
    assert!(!stored.contains(&"mix-3".to_string()));
    let d = ob.show("mix-3").unwrap().unwrap();
    assert_eq!(d.state, State::Dead);
    assert!(
        d.reason
            .as_deref()
            .unwrap()
            .contains("code: does_not_exist"),
        "{d:?}"
    );
    let d = ob.show("mix-11").unwrap().unwrap();
    assert!(
        d.reason
            .as_deref()
            .unwrap()
            .contains("expression_evaluation_failed: boom")
    );
    assert_eq!(
        ob.list(ListFilter::State(State::Dead), 10).unwrap().len(),
        2
    );
}

#[tokio::test]
async fn a_batch_level_422_is_split_until_it_fits() {
    // The server takes at most 7 per batch (LAGO_EVENTS_BATCH_MAX_LENGTH lowered); we send 100.
    let stub = Stub::start_with_max(7).await;
    let dir = tempfile::tempdir().unwrap();
    let s = settings(&stub, dir.path());
    ingest(&s, &records("split", 60));
    let report = deliver(&s).await;
    assert_eq!((report.acked, report.dead), (60, 0));
    assert_eq!(stub.stored_ids().len(), 60);
}

#[tokio::test]
async fn a_400_makes_the_batch_dead_with_the_body() {
    let stub = Stub::start().await;
    let body = r#"{"status":400,"error":"BadRequest: param is missing or the value is empty or invalid: events"}"#;
    stub.push_status(400, body, vec![]);
    let dir = tempfile::tempdir().unwrap();
    let s = settings(&stub, dir.path());
    let ob = ingest(&s, &records("bad", 10));
    let report = deliver(&s).await;
    assert_eq!(report.dead, 10);
    assert!(stub.stored_ids().is_empty());
    let d = ob.show("bad-0").unwrap().unwrap();
    assert_eq!(d.state, State::Dead);
    assert!(d.reason.unwrap().contains("param is missing"));
}

#[tokio::test]
async fn unauthorized_pauses_keeps_everything_pending_and_resumes_once_accepted() {
    let stub = Stub::start().await;
    for _ in 0..100_000 {
        stub.push_status(401, r#"{"status":401,"error":"Unauthorized"}"#, vec![]);
    }
    let dir = tempfile::tempdir().unwrap();
    let s = settings(&stub, dir.path());
    let ob = ingest(&s, &records("auth", 150));
    let (stop, handle) = spawn_sender(&s);
    wait_until("a 401 as the last Lago error", LONG, async || {
        ob.stats()
            .unwrap()
            .last_lago_error
            .is_some_and(|e| e.message.contains("401"))
    })
    .await;
    // Probing, not dead-lettering: everything is still pending, nothing stored.
    wait_until("4 requests at the stub", LONG, async || {
        stub.requests().len() >= 4
    })
    .await;
    let stats = ob.stats().unwrap();
    assert_eq!((stats.pending, stats.dead, stats.acked), (150, 0, 0));
    assert!(!stats.last_lago_error.unwrap().message.contains(KEY));
    // "Fix the key": the server accepts again.
    stub.state.lock().unwrap().script.clear();
    wait_until("150 events acked", LONG, async || {
        ob.stats().unwrap().acked == 150
    })
    .await;
    assert!(ob.stats().unwrap().last_lago_error.is_none());
    stop.cancel();
    handle.await.unwrap().unwrap();
    assert_eq!(stub.stored_ids().len(), 150);
}

#[tokio::test]
async fn forbidden_is_treated_like_unauthorized() {
    let stub = Stub::start().await;
    for _ in 0..3 {
        stub.push_status(
            403,
            r#"{"status":403,"error":"Forbidden","code":"write_action_not_allowed_for_event"}"#,
            vec![],
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let s = settings(&stub, dir.path());
    let ob = ingest(&s, &records("forbid", 5));
    let report = deliver(&s).await;
    assert_eq!((report.acked, report.dead), (5, 0));
    assert_eq!(stub.requests().len(), 4);
    assert_eq!(ob.stats().unwrap().acked, 5);
}

#[tokio::test]
async fn rate_limits_are_waited_out_as_the_headers_say() {
    for header in ["x-ratelimit-reset", "retry-after"] {
        let stub = Stub::start().await;
        stub.push_status(
            429,
            r#"{"status":429,"error":"Too Many Requests"}"#,
            vec![(header, "1".into())],
        );
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(&stub, dir.path());
        // The backoff alone would retry far sooner than the header's 1 s.
        s.tuning.retry_cap = Duration::from_millis(50);
        ingest(&s, &records("rl", 3));
        let report = deliver(&s).await;
        assert_eq!(report.acked, 3);
        let reqs = stub.requests();
        assert_eq!(reqs.len(), 2, "{header}");
        let gap = reqs[1].at - reqs[0].at;
        assert!(
            gap >= Duration::from_millis(950),
            "{header}: resent after {gap:?}"
        );
    }
}

#[tokio::test]
async fn server_errors_are_retried_with_backoff_until_lago_recovers() {
    let stub = Stub::start().await;
    for status in [500, 502, 503] {
        stub.push_status(status, "upstream trouble", vec![]);
    }
    let dir = tempfile::tempdir().unwrap();
    let s = settings(&stub, dir.path());
    let ob = ingest(&s, &records("5xx", 4));
    let report = deliver(&s).await;
    assert_eq!((report.acked, report.failed_requests), (4, 3));
    assert_eq!(stub.stored_ids().len(), 4);
    let shown = ob.show("5xx-0").unwrap().unwrap();
    assert_eq!((shown.state, shown.attempts), (State::Acked, 3));
}

#[tokio::test]
async fn refused_connections_are_retried_until_lago_listens() {
    // A free port (outside the ephemeral range, so nothing else takes it meanwhile): point the
    // shipper at it, then start listening there.
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let stub = Stub::start().await; // only for its base settings
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&stub, dir.path());
    s.lago.api_base = format!("http://{addr}").parse().unwrap();
    let ob = ingest(&s, &records("refused", 5));
    let (stop, handle) = spawn_sender(&s);
    wait_until("a connect error as the last Lago error", LONG, async || {
        ob.stats()
            .unwrap()
            .last_lago_error
            .is_some_and(|e| e.message.contains("connect"))
    })
    .await;
    assert_eq!(ob.stats().unwrap().pending, 5);
    // Now Lago comes up on that port.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let stored = Arc::new(std::sync::Mutex::new(0usize));
    let counter = stored.clone();
    let app = axum::Router::new().route(
        "/api/v1/events/batch",
        axum::routing::post(move |body: axum::body::Bytes| {
            let counter = counter.clone();
            async move {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                *counter.lock().unwrap() += v["events"].as_array().unwrap().len();
                axum::Json(v)
            }
        }),
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    wait_until("5 events acked", LONG, async || {
        ob.stats().unwrap().acked == 5
    })
    .await;
    assert_eq!(*stored.lock().unwrap(), 5);
    stop.cancel();
    handle.await.unwrap().unwrap();
    server.abort();
}

#[tokio::test]
async fn shutdown_abandons_a_slow_request_at_the_drain_deadline_and_keeps_it_pending() {
    let stub = Stub::start().await;
    stub.push(Scripted::Slow(Duration::from_secs(30)));
    let dir = tempfile::tempdir().unwrap();
    let s = settings(&stub, dir.path());
    let ob = ingest(&s, &records("slow", 10));
    let (stop, handle) = spawn_sender(&s);
    wait_until("1 request at the stub", LONG, async || {
        stub.requests().len() == 1
    })
    .await;
    stop.cancel();
    tokio::time::timeout(LONG, handle)
        .await
        .expect("drain must end at the deadline")
        .unwrap()
        .unwrap();
    let stats = ob.stats().unwrap();
    assert_eq!((stats.pending, stats.in_flight, stats.acked), (10, 0, 0));
    // Released, so the next start sends them at once.
    let report = deliver(&s).await;
    assert_eq!(report.acked, 10);
}

#[tokio::test]
async fn held_records_are_not_sent_and_not_billable_ones_are_not_billed() {
    let stub = Stub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let s = settings(&stub, dir.path());
    let mut recs = records("mixed", 6);
    recs[0].end_user_id = None;
    recs[1].status = tally::spend::Status::Failure;
    let ob = ingest(&s, &recs);
    let report = deliver(&s).await;
    assert_eq!(report.acked, 4);
    let stats = ob.stats().unwrap();
    assert_eq!((stats.held, stats.not_billable, stats.acked), (1, 1, 4));
    assert_eq!(
        ob.show("mixed-0").unwrap().unwrap().reason.as_deref(),
        Some("no end_user_id on this record; LAGO_API_CHARGE_BY=end_user_id")
    );
    assert!(!stub.stored_ids().contains(&"mixed-1".to_string()));
}

/// The sender claims on a connection of its own: while the writer's connection is held (by the
/// reader ingesting a chunk, here by the test), events are still claimed and sent, and their acks
/// are committed once the writer is free again.
#[tokio::test]
async fn claims_and_sends_while_the_writer_is_held() {
    let stub = Stub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let s = settings(&stub, dir.path());
    let watch = ingest(&s, &records("early", 10));
    let outbox = Outbox::open_in(&s.state_dir).unwrap().shared();
    let (stop, handle) = spawn_sender_on(outbox.clone(), &s);
    wait_until("the first 10 events acked", LONG, async || {
        watch.stats().unwrap().acked == 10
    })
    .await;

    // Held on a thread of its own until told, as the reader holds it for an ingest.
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (held_tx, held) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let _writer = outbox.lock().unwrap();
        held_tx.send(()).unwrap();
        let _ = released.recv();
    });
    held.recv().unwrap();
    // Another connection queues 20 more, as another process (`tally replay`) would.
    ingest(&s, &records("late", 20));
    wait_until("the 20 later events at Lago", LONG, async || {
        stub.stored_ids().len() == 30
    })
    .await;
    let stats = watch.stats().unwrap();
    assert_eq!(
        (stats.acked, stats.pending),
        (10, 20),
        "the acks wait for the writer's connection"
    );
    drop(release);
    holder.join().unwrap();
    wait_until("all 30 acked", LONG, async || {
        watch.stats().unwrap().acked == 30
    })
    .await;
    stop.cancel();
    handle.await.unwrap().unwrap();
    let mut stored = stub.stored_ids();
    stored.sort();
    stored.dedup();
    assert_eq!(stored.len(), 30, "each event sent once");
}
