use std::time::Duration;

use super::*;
use crate::ship::event::EventBody;
use crate::ship::resolve::{CustomerIds, EventSpec, event_bytes, prepare};
use crate::spend::SpendRecord;

fn record(id: &str, user: Option<&str>) -> SpendRecord {
    let mut r = SpendRecord::parse_line(
        br#"{"schema":1,"transaction_id":"x","end_time":"2026-11-27T10:00:00.250Z","model":"m","input_tokens":1,"output_tokens":2,"status":"success"}"#,
    )
    .unwrap();
    r.transaction_id = id.into();
    r.end_user_id = user.map(Into::into);
    r
}

fn spec() -> EventSpec {
    EventSpec {
        code: "llm".into(),
        charge_by: Default::default(),
        precise_amount: None,
    }
}

fn item(r: &SpendRecord, offset: u64) -> IngestItem {
    IngestItem::Record {
        prepared: prepare(r, &spec()),
        source: Source {
            file: "spend.jsonl".into(),
            offset,
        },
    }
}

fn pos(offset: u64) -> FilePosition {
    FilePosition {
        id: FileId {
            dev: 1,
            ino: 2,
            fingerprint: 3,
        },
        path: "spend.jsonl".into(),
        offset,
        finished: false,
    }
}

fn open() -> (tempfile::TempDir, Outbox) {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open_in(dir.path()).unwrap();
    (dir, ob)
}

#[test]
fn ingest_records_lines_and_positions_together_and_dedupes() {
    let (dir, mut ob) = open();
    let a = record("a", Some("c1"));
    let b = record("b", None);
    let mut failed = record("c", Some("c1"));
    failed.status = "failure".into();
    let rep = ob
        .ingest(&[item(&a, 0), item(&b, 10), item(&failed, 20)], &[pos(30)])
        .unwrap();
    assert_eq!((rep.pending, rep.held, rep.not_billable), (1, 1, 1));
    assert_eq!(ob.positions().unwrap(), vec![pos(30)]);

    // A re-read of the same lines is harmless; a different content under the same id conflicts.
    let mut a2 = a.clone();
    a2.input_tokens = 99;
    let rep = ob
        .ingest(&[item(&a, 0), item(&a2, 40)], &[pos(50)])
        .unwrap();
    assert_eq!((rep.already_seen, rep.conflicts, rep.pending), (1, 1, 0));
    let rejected = ob.list(ListFilter::Rejected, 10).unwrap();
    assert_eq!(rejected.len(), 1);
    assert!(
        rejected[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("conflicting duplicate")
    );
    assert_eq!(rejected[0].source_offset, Some(40));

    // Reopening sees the same state.
    drop(ob);
    let ob = Outbox::open_in(dir.path()).unwrap();
    let s = ob.stats().unwrap();
    assert_eq!(
        (s.pending, s.held, s.not_billable, s.rejected),
        (1, 1, 1, 1)
    );
    assert_eq!(ob.positions().unwrap(), vec![pos(50)]);
    let held = ob.show("b").unwrap().unwrap();
    assert_eq!(held.state, State::Held);
    assert!(held.reason.unwrap().contains("no end_user_id"));
}

#[test]
fn malformed_lines_keep_file_offset_reason_and_head() {
    let (_dir, mut ob) = open();
    let long = vec![b'x'; 1000];
    let items = [IngestItem::Rejected {
        source: Source {
            file: "f".into(),
            offset: 7,
        },
        reason: "invalid record: eof".into(),
        head: long,
    }];
    assert_eq!(ob.ingest(&items, &[]).unwrap().rejected, 1);
    // The same line rejected again (re-read) is not counted twice.
    assert_eq!(ob.ingest(&items, &[]).unwrap().rejected, 0);
    let r = &ob.list(ListFilter::Rejected, 10).unwrap()[0];
    assert_eq!(
        (r.source_file.as_deref(), r.source_offset),
        (Some("f"), Some(7))
    );
    let head: String = ob
        .conn()
        .query_row("SELECT head FROM rejected", [], |r| r.get(0))
        .unwrap();
    assert_eq!(head.len(), REJECTED_HEAD_BYTES);
}

fn ids(events: &[ClaimedEvent]) -> Vec<&str> {
    events.iter().map(|c| c.transaction_id.as_str()).collect()
}

fn lock(ob: &Outbox) -> SenderLock {
    ob.try_lock_sender()
        .unwrap()
        .expect("the sender lock is free")
}

#[test]
fn claim_reads_in_order_skips_what_is_in_flight_and_ack_slims() {
    let (_dir, mut ob) = open();
    let items: Vec<_> = (0..5)
        .map(|i| item(&record(&format!("t{i}"), Some("c")), i))
        .collect();
    ob.ingest(&items, &[]).unwrap();
    let lock = lock(&ob);
    let mut in_flight = HashSet::new();
    let (first, cursor) = ob.claim(3, None, &in_flight, &lock).unwrap();
    assert_eq!(ids(&first), ["t0", "t1", "t2"]);
    in_flight.extend(first.iter().map(|c| c.transaction_id.clone()));
    // From the cursor: the rest.
    let (second, end) = ob.claim(10, cursor, &in_flight, &lock).unwrap();
    assert_eq!(ids(&second), ["t3", "t4"]);
    assert!(ob.claim(10, end, &in_flight, &lock).unwrap().0.is_empty());
    // From the oldest again, what is in flight is left out.
    in_flight.extend(second.iter().map(|c| c.transaction_id.clone()));
    assert!(ob.claim(10, None, &in_flight, &lock).unwrap().0.is_empty());
    // Claiming wrote nothing: still pending.
    assert_eq!(ob.pending_count().unwrap(), 5);

    let acked: Vec<(i64, &str)> = first
        .iter()
        .map(|c| (c.seq, c.transaction_id.as_str()))
        .collect();
    ob.ack(&acked, Some(2)).unwrap();
    let shown = ob.show("t0").unwrap().unwrap();
    assert_eq!(shown.state, State::Acked);
    assert_eq!((shown.record, shown.event), (None, None));
    // Given up (not acked) events come back when no longer in flight.
    in_flight.clear();
    assert_eq!(
        ids(&ob.claim(10, None, &in_flight, &lock).unwrap().0),
        ["t3", "t4"]
    );
    // The in-flight note counts while the lock is held, not after.
    let s = ob.stats().unwrap();
    assert_eq!((s.acked, s.pending, s.in_flight), (3, 2, 2));
    drop(lock);
    assert_eq!(ob.stats().unwrap().in_flight, 0);
}

#[test]
fn an_ack_whose_queue_place_does_not_match_settles_by_id() {
    let (_dir, mut ob) = open();
    ob.ingest(
        &[
            item(&record("a", Some("c")), 0),
            item(&record("b", Some("c")), 1),
        ],
        &[],
    )
    .unwrap();
    let lock = lock(&ob);
    let (claimed, _) = ob.claim(10, None, &HashSet::new(), &lock).unwrap();
    let b_seq = claimed[1].seq;
    // "a" with the queue place of "b": "b" must stay pending, "a" is acked by its id.
    ob.ack(&[(b_seq, "a")], None).unwrap();
    assert_eq!(ob.state_of("a").unwrap(), Some(State::Acked));
    assert_eq!(ob.state_of("b").unwrap(), Some(State::Pending));
}

#[test]
fn the_claim_and_the_ack_walk_the_queue_by_its_key() {
    let (_dir, ob) = open();
    let plan = |sql: &str| -> String {
        ob.conn()
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map([], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
            .join("; ")
    };
    let claim = plan(&format!(
        "SELECT p.seq, p.transaction_id, {EVENT_COLUMNS}
         FROM pending AS p LEFT JOIN targets AS qt ON qt.id = p.target_id
         WHERE p.seq > 0 ORDER BY p.seq"
    ));
    assert!(claim.contains("INTEGER PRIMARY KEY"), "{claim}");
    assert!(!claim.contains("TEMP B-TREE"), "{claim}");
    for ack in [
        "DELETE FROM pending WHERE seq BETWEEN 1 AND 9",
        "SELECT seq, transaction_id, attempts FROM pending WHERE seq BETWEEN 1 AND 9 ORDER BY seq",
    ] {
        let ack = plan(ack);
        assert!(ack.contains("INTEGER PRIMARY KEY"), "{ack}");
        assert!(!ack.contains("TEMP B-TREE"), "{ack}");
    }
}

#[test]
fn an_ack_deletes_runs_of_acked_places_and_never_a_row_in_flight_between_them() {
    let (_dir, mut ob) = open();
    let items: Vec<_> = (0..9)
        .map(|i| item(&record(&format!("r{i}"), Some("c")), i))
        .collect();
    ob.ingest(&items, &[]).unwrap();
    let lock = lock(&ob);
    let (claimed, _) = ob.claim(9, None, &HashSet::new(), &lock).unwrap();
    // r4 failed once before its batch went through.
    ob.record_failure(&["r4"], "Lago answered 503").unwrap();
    // Acked together: r0-r2 and r4-r5 (r3 is in flight in another batch), r7 twice, and r8 with
    // a stale place (it was requeued meanwhile: the place given is r6's).
    let place = |i: usize| claimed[i].seq;
    let acked = [
        (place(0), "r0"),
        (place(5), "r5"),
        (place(1), "r1"),
        (place(2), "r2"),
        (place(4), "r4"),
        (place(7), "r7"),
        (place(7), "r7"),
        (place(6), "r8"),
    ];
    ob.ack(&acked, None).unwrap();
    let state = |id: &str| ob.state_of(id).unwrap();
    for id in ["r0", "r1", "r2", "r4", "r5", "r7", "r8"] {
        assert_eq!(state(id), Some(State::Acked), "{id}");
    }
    for id in ["r3", "r6"] {
        assert_eq!(state(id), Some(State::Pending), "{id} was not acked");
    }
    assert_eq!(
        ids(&ob.claim(9, None, &HashSet::new(), &lock).unwrap().0),
        ["r3", "r6"]
    );
    assert_eq!(ob.show("r4").unwrap().unwrap().attempts, 1);
    assert_eq!(ob.show("r5").unwrap().unwrap().attempts, 0);
}

#[test]
fn a_v3_outbox_migrates_to_v4_with_its_leases_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DB_FILE);
    {
        let conn = Connection::open(&path).unwrap();
        for (v, sql) in MIGRATIONS[..3].iter().enumerate() {
            conn.execute_batch(sql).unwrap();
            conn.pragma_update(None, "user_version", (v + 1) as i64)
                .unwrap();
        }
        // A v3 shipper's rows: one leased in flight, one free, one acked.
        conn.execute_batch(
            "INSERT INTO events (transaction_id, state, content_hash, event, created_ms,
                 updated_ms, lease_until_ms, lease_owner, lease_pid)
             VALUES ('leased', 0, 1, X'7B7D', 1, 1, 99999999999999, 7, 4242),
                    ('free', 0, 2, X'7B7D', 2, 2, 0, NULL, NULL),
                    ('done', 3, 3, NULL, 3, 3, 0, NULL, NULL);",
        )
        .unwrap();
    }
    let ob = Outbox::open(&path).unwrap();
    let version: i64 = ob
        .conn()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, MIGRATIONS.len() as i64);
    let lock = lock(&ob);
    let (claimed, _) = ob.claim(10, None, &HashSet::new(), &lock).unwrap();
    assert_eq!(ids(&claimed), ["leased", "free"]);
    // (v6 dropped the lease columns with the v5 table: claimable is what is left to check.)
    assert_eq!(ob.state_of("done").unwrap(), Some(State::Acked));
}

/// v5 → v6 splits the one table into the ledger and the queue: every state, event, record,
/// error and audit field of a v5 row must come through, and the queue keeps its order.
#[test]
fn a_v5_outbox_migrates_to_the_ledger_and_the_queue_without_losing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DB_FILE);
    {
        let conn = Connection::open(&path).unwrap();
        for (v, sql) in MIGRATIONS[..5].iter().enumerate() {
            conn.execute_batch(sql).unwrap();
            conn.pragma_update(None, "user_version", (v + 1) as i64)
                .unwrap();
        }
        let event = r#"{"transaction_id":"p2","external_subscription_id":"c","code":"llm","timestamp":"1795773600.250","properties":{}}"#;
        conn.execute(
            "INSERT INTO events (transaction_id, state, content_hash, record, event, customer_ids,
                 subscription_id, reason, attempts, source_file, source_offset, created_ms,
                 updated_ms, lago_code, lago_timestamp)
             VALUES ('p2', 0, 12, NULL, ?1, '{\"end_user_id\":\"c\"}', 'c', 'timeout', 4,
                     '/log/a.jsonl', 10, 20, 21, NULL, NULL),
                    ('p1', 0, 11, NULL, ?1, NULL, 'c', NULL, 0, '/log/a.jsonl', 0, 10, 10, NULL,
                     NULL),
                    ('h', 1, 13, X'7B7D', NULL, '{}', NULL, 'no end_user_id', 0, '/log/b.jsonl',
                     5, 30, 30, NULL, NULL),
                    ('d', 2, 14, NULL, ?1, '{}', 'c', 'Lago said no', 2, '/log/b.jsonl', 6, 40,
                     41, NULL, NULL),
                    ('a', 3, 15, NULL, NULL, NULL, 'c2', NULL, 1, '/log/a.jsonl', 20, 50, 51,
                     'llm', '1795773600.005'),
                    ('n', 4, 16, NULL, NULL, NULL, NULL, NULL, 0, '/log/a.jsonl', 30, 60, 60,
                     NULL, NULL)",
            [event.as_bytes()],
        )
        .unwrap();
    }
    let ob = Outbox::open(&path).unwrap();
    let lock = lock(&ob);
    let (claimed, _) = ob.claim(10, None, &HashSet::new(), &lock).unwrap();
    // Queue order is the v5 pending index's: created_ms.
    assert_eq!(ids(&claimed), ["p1", "p2"]);
    assert!(claimed[1].event.starts_with(br#"{"transaction_id":"p2""#));
    let want = [
        ("p1", State::Pending),
        ("p2", State::Pending),
        ("h", State::Held),
        ("d", State::Dead),
        ("a", State::Acked),
        ("n", State::NotBillable),
    ];
    for (id, state) in want {
        assert_eq!(ob.state_of(id).unwrap(), Some(state), "{id}");
    }
    let p2 = ob.show("p2").unwrap().unwrap();
    assert_eq!(p2.reason.as_deref(), Some("timeout"));
    assert_eq!(p2.attempts, 4);
    assert_eq!(p2.source_file.as_deref(), Some("/log/a.jsonl"));
    assert_eq!(p2.customer_ids.as_deref(), Some(r#"{"end_user_id":"c"}"#));
    let d = ob.show("d").unwrap().unwrap();
    assert!(d.event.unwrap().contains("p2"));
    assert_eq!(d.reason.as_deref(), Some("Lago said no"));
    assert_eq!(d.source_file.as_deref(), Some("/log/b.jsonl"));
    assert_eq!(ob.show("h").unwrap().unwrap().record.as_deref(), Some("{}"));
    // The audit fields: v5's text timestamp and a pending event's own code and time.
    assert_eq!(
        kept_for_audit(&ob, "a"),
        (
            Some("c2".into()),
            Some("llm".into()),
            Some(1_795_773_600_005)
        )
    );
    assert_eq!(
        kept_for_audit(&ob, "p2"),
        (
            Some("c".into()),
            Some("llm".into()),
            Some(1_795_773_600_250)
        )
    );
    let subs: Vec<String> = ob
        .conn()
        .prepare("SELECT subscription_id FROM targets ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(subs, ["c", "c2"]);
    let stats = ob.stats().unwrap();
    assert_eq!(
        (stats.pending, stats.held, stats.dead, stats.acked),
        (2, 1, 1, 1)
    );
    // New rows queue behind the migrated ones.
    let mut ob = ob;
    ob.ingest(&[item(&record("new", Some("c")), 99)], &[])
        .unwrap();
    let (claimed, _) = ob.claim(10, None, &HashSet::new(), &lock).unwrap();
    assert_eq!(ids(&claimed), ["p1", "p2", "new"]);
}

/// v6 → v7 turns the queue's event JSON into columns for new rows: a row queued by an older
/// tally is sent byte for byte as it was stored, keeps its ids, attempts and error, dies with its
/// JSON, and the queue's places carry on past every place ever given out (an acked ledger row
/// names its old one).
#[test]
fn a_v6_queue_migrates_keeping_its_events_bytes_and_its_places() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DB_FILE);
    let legacy = r#"{"transaction_id":"p1","external_subscription_id":"c","code":"llm","timestamp":"1795773600.250","properties":{"model":"old","input_tokens":1}}"#;
    {
        let conn = Connection::open(&path).unwrap();
        for (v, sql) in MIGRATIONS[..6].iter().enumerate() {
            conn.execute_batch(sql).unwrap();
            conn.pragma_update(None, "user_version", (v + 1) as i64)
                .unwrap();
        }
        conn.execute_batch(
            "INSERT INTO targets (subscription_id, code) VALUES ('c', 'llm');
             INSERT INTO events (transaction_id, state, content_hash, queue_seq, target_id,
                 lago_time_ms, created_ms)
             VALUES ('p1', 0, 1, 7, 1, 1795773600250, 10), ('a', 0, 2, 3, 1, 1795773600250, 5);
             UPDATE sqlite_sequence SET seq = 9 WHERE name = 'pending';",
        )
        .unwrap();
        conn.execute(
            "INSERT INTO pending (seq, transaction_id, event, customer_ids, attempts, reason)
             VALUES (7, 'p1', ?1, '{\"end_user_id\":\"c\",\"team_id\":\"t\"}', 2, 'timeout')",
            [legacy.as_bytes()],
        )
        .unwrap();
        let seq: i64 = conn
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'pending'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(seq, 9, "the v6 queue has given out places up to 9");
    }
    let mut ob = Outbox::open(&path).unwrap();
    assert_eq!(ob.state_of("a").unwrap(), Some(State::Acked));
    let p1 = ob.show("p1").unwrap().unwrap();
    assert_eq!(p1.state, State::Pending);
    assert_eq!(p1.event.as_deref(), Some(legacy));
    assert_eq!(
        p1.customer_ids.as_deref(),
        Some(r#"{"end_user_id":"c","team_id":"t"}"#)
    );
    assert_eq!((p1.attempts, p1.reason.as_deref()), (2, Some("timeout")));

    let new = record("new", Some("c"));
    ob.ingest(&[item(&new, 0)], &[]).unwrap();
    let place: i64 = ob
        .conn()
        .query_row(
            "SELECT queue_seq FROM events WHERE transaction_id = 'new'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(place, 10, "never a place given out before");
    assert_eq!(ob.state_of("a").unwrap(), Some(State::Acked));
    let lock = lock(&ob);
    let (claimed, _) = ob.claim(10, None, &HashSet::new(), &lock).unwrap();
    assert_eq!(ids(&claimed), ["p1", "new"]);
    assert_eq!(claimed[0].event, legacy.as_bytes());
    assert_eq!(claimed[1].event, event_bytes(&new, "llm", "c"));
    let states: Vec<(String, String)> = ob
        .conn()
        .prepare("SELECT transaction_id, state FROM event_states ORDER BY transaction_id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let states: Vec<(&str, &str)> = states
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        states,
        [("a", "acked"), ("new", "pending"), ("p1", "pending")]
    );

    // Dead, it keeps its JSON and ids in the ledger; a retry sends the same event again.
    ob.mark_dead(&[("p1", "Lago said no")]).unwrap();
    let d = ob.show("p1").unwrap().unwrap();
    assert_eq!(d.state, State::Dead);
    assert_eq!(d.event.as_deref(), Some(legacy));
    assert_eq!(d.attempts, 3);
    assert_eq!(
        d.customer_ids.as_deref(),
        Some(r#"{"end_user_id":"c","team_id":"t"}"#)
    );
}

/// The queue keeps an event as columns and writes its JSON when claimed: the bytes are the
/// writer's, whatever the counts (SQLite's integers are signed; a count past `i64::MAX` comes
/// back as itself).
#[test]
fn a_queued_event_is_claimed_as_the_bytes_its_record_makes() {
    let (_dir, mut ob) = open();
    let mut big = record("big", Some("c"));
    big.input_tokens = u64::MAX;
    big.reasoning_tokens = u64::MAX - 1;
    big.response_cost = Some(0.0001675);
    big.model = "quote\" model".into();
    let plain = record("plain", Some("c2"));
    ob.ingest(&[item(&big, 0), item(&plain, 1)], &[]).unwrap();
    let lock = lock(&ob);
    let (claimed, _) = ob.claim(10, None, &HashSet::new(), &lock).unwrap();
    assert_eq!(claimed[0].event, event_bytes(&big, "llm", "c"));
    assert!(String::from_utf8_lossy(&claimed[0].event).contains("18446744073709551615"));
    assert_eq!(claimed[1].event, event_bytes(&plain, "llm", "c2"));
}

#[test]
fn dead_retry_and_drop() {
    let (_dir, mut ob) = open();
    let mut team = record("held-1", None);
    team.team_id = Some("team-x".into());
    ob.ingest(
        &[item(&team, 0), item(&record("dead-1", Some("c")), 1)],
        &[],
    )
    .unwrap();
    let lock = lock(&ob);
    let (claimed, _) = ob.claim(10, None, &HashSet::new(), &lock).unwrap();
    assert_eq!(claimed.len(), 1);
    ob.mark_dead(&[("dead-1", "timestamp: invalid_format")])
        .unwrap();
    let d = ob.show("dead-1").unwrap().unwrap();
    assert_eq!(
        (d.state, d.reason.as_deref(), d.attempts),
        (State::Dead, Some("timestamp: invalid_format"), 1)
    );

    // Retrying the held one with the same charge-by keeps it held; with team_id it is requeued.
    let rep = ob.retry(&[], Some(State::Held), &spec()).unwrap();
    assert_eq!(rep.still_held, vec!["held-1".to_string()]);
    let by_team = EventSpec {
        code: "llm".into(),
        charge_by: "team_id,end_user_id".parse().unwrap(),
        precise_amount: None,
    };
    let rep = ob.retry(&[], None, &by_team).unwrap();
    assert_eq!(rep.requeued.len(), 2);
    let shown = ob.show("held-1").unwrap().unwrap();
    assert_eq!(shown.state, State::Pending);
    assert_eq!(shown.external_subscription_id.as_deref(), Some("team-x"));
    assert!(shown.event.unwrap().contains("\"team-x\""));

    let dropped = ob
        .drop_items(&["held-1".into(), "nope".into()], "test customer")
        .unwrap();
    assert_eq!(dropped, vec!["held-1".to_string()]);
    let shown = ob.show("held-1").unwrap().unwrap();
    assert_eq!(shown.state, State::Dropped);
    assert!(shown.reason.unwrap().contains("test customer"));
    // Only dead-1 remains claimable.
    let (c, _) = ob.claim(10, None, &HashSet::new(), &lock).unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].transaction_id, "dead-1");
}

#[test]
fn acked_ids_are_kept_unless_retention_says_otherwise() {
    let (_dir, mut ob) = open();
    let r = record("old", Some("c"));
    ob.ingest(&[item(&r, 0)], &[]).unwrap();
    ob.mark_acked(&["old"]).unwrap();
    assert_eq!(ob.prune_acked(Duration::from_secs(3600)).unwrap(), 0);
    // A replay of the acked record is recognised, never pending again.
    assert_eq!(ob.ingest(&[item(&r, 0)], &[]).unwrap().already_seen, 1);
    assert_eq!(ob.pending_count().unwrap(), 0);
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(ob.prune_acked(Duration::ZERO).unwrap(), 1);
}

#[test]
fn a_second_connection_sees_and_waits_for_writes() {
    let (dir, mut a) = open();
    let b = Outbox::open_in(dir.path()).unwrap();
    a.ingest(&[item(&record("x", Some("c")), 0)], &[]).unwrap();
    assert_eq!(b.pending_count().unwrap(), 1);
    a.set_last_lago_error(Some("401 Unauthorized")).unwrap();
    assert_eq!(
        b.stats().unwrap().last_lago_error.unwrap().message,
        "401 Unauthorized"
    );
    a.set_last_lago_error(None).unwrap();
    assert!(b.stats().unwrap().last_lago_error.is_none());
}

/// Regression (found by the bad-input test): after a rotation the new live file has the
/// same path, so a malformed line at the offset of an earlier malformed line used to be dropped
/// silently by the (file, offset) uniqueness. A re-read of the same line still counts once.
#[test]
fn rejected_lines_at_the_same_place_of_a_reused_path_are_all_kept() {
    let (_dir, mut ob) = open();
    let bad = |head: &[u8], offset| IngestItem::Rejected {
        source: Source {
            file: "spend.jsonl".into(),
            offset,
        },
        reason: "invalid record: expected value".into(),
        head: head.to_vec(),
    };
    let rep = ob.ingest(&[bad(b"{first file", 300)], &[pos(400)]).unwrap();
    assert_eq!(rep.rejected, 1);
    // The same line read again (a restart before its position was committed): not counted again.
    let rep = ob.ingest(&[bad(b"{first file", 300)], &[pos(400)]).unwrap();
    assert_eq!(rep.rejected, 0);
    // Another line at the same path and offset (a later file after rotation): kept too.
    let rep = ob
        .ingest(&[bad(b"{second file", 300)], &[pos(400)])
        .unwrap();
    assert_eq!(rep.rejected, 1);
    assert_eq!(ob.list(ListFilter::Rejected, 10).unwrap().len(), 2);
    assert_eq!(ob.stats().unwrap().rejected, 2);
}

/// Regression (found by the security test): `shipper.db` was created 0644, readable by
/// every user; it holds usage per customer.
#[test]
fn the_outbox_and_its_directory_are_not_readable_by_other_users() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let ob = Outbox::open_in(&state).unwrap();
    drop(ob);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state.join(DB_FILE)), 0o600);
    assert_eq!(mode(&state) & 0o007, 0);
}

/// Opens a fresh outbox while `other` works on it from a second thread, 200 times; both must
/// succeed.
fn open_fresh_while(other: fn(&Path) -> Result<(), OutboxError>) {
    for round in 0..200 {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let start = Arc::new(std::sync::Barrier::new(2));
        let there = std::thread::spawn({
            let (state, start) = (state.clone(), start.clone());
            move || {
                start.wait();
                // Keeps at it until the outbox exists (a reader finds nothing before).
                while !state.join(DB_FILE).is_file() {
                    std::hint::spin_loop();
                }
                other(&state)
            }
        });
        start.wait();
        let here = Outbox::open_in(&state).and_then(|o| o.stats());
        let there = there.join().unwrap();
        assert!(here.is_ok(), "round {round}: {here:?}");
        assert!(there.is_ok(), "round {round}: {there:?}");
    }
}

/// Two openers of one fresh outbox (a test polling a starting shipper's outbox, `tally replay` next
/// to a shipper). SQLite refuses the WAL switch with BUSY, without calling the busy handler, while
/// the other connection holds a lock on the new file; the starting shipper exited. Before the
/// switch was retried, 200 rounds lost this race ~9 times.
#[test]
fn two_openers_of_a_fresh_outbox_both_succeed() {
    open_fresh_while(|state| Outbox::open_in(state).map(|_| ()));
}

/// `tally queue` reading while a shipper creates its outbox sees nothing or the whole schema:
/// with one transaction per migration step it could read "schema version 1 is older than this
/// tally's" and fail.
#[test]
fn a_reader_during_creation_sees_nothing_or_the_whole_schema() {
    open_fresh_while(|state| {
        for _ in 0..20 {
            Outbox::open_read_only_in(state)?;
        }
        Ok(())
    });
}

/// Regression (docs/operations.md, "Files and permissions"): a pre-existing state directory writable by every user was used
/// silently; a shipper.db left readable by others stayed so.
#[test]
fn a_world_writable_state_directory_is_refused_and_the_outbox_is_tightened() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let set = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    for m in [0o777, 0o1777, 0o702] {
        set(&state, m);
        let Err(err) = Outbox::open_in(&state) else {
            panic!("a {m:o} state directory was used")
        };
        let err = err.to_string();
        assert!(err.contains("writable by every user"), "{m:o}: {err}");
        assert!(err.contains("chmod o-w"), "{err}");
        assert!(!state.join(DB_FILE).exists(), "nothing is created in it");
    }
    set(&state, 0o750);
    drop(Outbox::open_in(&state).unwrap());
    let db = state.join(DB_FILE);
    set(&db, 0o644);
    drop(Outbox::open_in(&state).unwrap());
    let mode = std::fs::metadata(&db).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

fn kept_for_audit(ob: &Outbox, id: &str) -> (Option<String>, Option<String>, Option<i64>) {
    ob.conn()
        .query_row(
            "SELECT t.subscription_id, t.code, e.lago_time_ms FROM events AS e
             LEFT JOIN targets AS t ON t.id = e.target_id WHERE e.transaction_id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap()
}

#[test]
fn every_ack_keeps_the_code_subscription_and_timestamp_for_the_audit() {
    let (_dir, mut ob) = open();
    let items: Vec<_> = (0..3)
        .map(|i| item(&record(&format!("k{i}"), Some("c")), i))
        .collect();
    ob.ingest(&items, &[]).unwrap();
    let lock = lock(&ob);
    let (claimed, _) = ob.claim(10, None, &HashSet::new(), &lock).unwrap();
    ob.ack(&[(claimed[0].seq, "k0")], None).unwrap();
    // A changed rowid: the ack falls back to the id.
    ob.ack(&[(-1, "k1")], None).unwrap();
    ob.mark_acked(&["k2"]).unwrap();
    for id in ["k0", "k1", "k2"] {
        assert_eq!(ob.state_of(id).unwrap(), Some(State::Acked));
        assert_eq!(
            kept_for_audit(&ob, id),
            (
                Some("c".into()),
                Some("llm".into()),
                Some(1_795_773_600_250)
            ),
            "{id}"
        );
    }
}

#[test]
fn lago_errors_mark_acked_events_once_and_an_ack_does_not_undo_them() {
    let (_dir, mut ob) = open();
    let items: Vec<_> = (0..3)
        .map(|i| item(&record(&format!("e{i}"), Some("c")), i))
        .collect();
    ob.ingest(&items, &[]).unwrap();
    ob.mark_acked(&["e0"]).unwrap();
    ob.drop_items(&["e2".to_owned()], "test").unwrap();
    // e1 is still pending: the webhook beat the ack.
    let marks = ob
        .mark_lago_error(&["e0", "e1", "e2", "never"], "invalid_code")
        .unwrap();
    assert_eq!(marks.marked, ["e0", "e1"]);
    assert_eq!(marks.unchanged, ["e2"]);
    assert_eq!(marks.unknown, ["never"]);
    // The ack arriving after it, and a repeated report, leave it as it is.
    ob.mark_acked(&["e1"]).unwrap();
    let again = ob.mark_lago_error(&["e0"], "invalid_code").unwrap();
    assert!(again.marked.is_empty());
    let shown = ob.show("e1").unwrap().unwrap();
    assert_eq!(shown.state, State::LagoError);
    assert_eq!(shown.reason.as_deref(), Some("invalid_code"));
    let listed = ob.list(ListFilter::State(State::LagoError), 10).unwrap();
    assert_eq!(listed.len(), 2);
    let stats = ob.stats().unwrap();
    assert_eq!((stats.lago_error, stats.acked, stats.pending), (2, 0, 0));
}

#[test]
fn the_audit_work_list_resumes_and_requeues_only_acked_events() {
    let (_dir, mut ob) = open();
    let items: Vec<_> = (0..4)
        .map(|i| item(&record(&format!("w{i}"), Some("c")), i))
        .collect();
    ob.ingest(&items, &[]).unwrap();
    ob.mark_acked(&["w0", "w1", "w2"]).unwrap();
    let scope = AuditScope {
        since_ms: None,
        until_ms: None,
        sample: None,
    };
    assert_eq!(ob.start_audit(&scope).unwrap(), 3, "only acked events");
    let first = ob.audit_next(2).unwrap();
    ob.audit_record(&[(first[0].seq, "ok", None), (first[1].seq, "missing", None)])
        .unwrap();
    // A second run finds the same scope unfinished and the rest still to do.
    assert_eq!(ob.unfinished_audit().unwrap(), Some(scope.clone()));
    let rest = ob.audit_next(10).unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].code.as_deref(), Some("llm"));
    assert_eq!(
        ob.audit_progress().unwrap(),
        AuditProgress { total: 3, done: 2 }
    );
    ob.finish_audit().unwrap();
    assert_eq!(ob.unfinished_audit().unwrap(), None);
    let sample = AuditScope {
        sample: Some(1),
        ..scope
    };
    assert_eq!(ob.start_audit(&sample).unwrap(), 1);

    let rebuilt = |id: &str| {
        let r = record(id, Some("c"));
        Rebuilt {
            transaction_id: id.into(),
            external_subscription_id: "c".into(),
            code: "llm".into(),
            body: EventBody::of(&r, None),
            customer_ids: CustomerIds::of(&r),
        }
    };
    let requeued = ob.requeue_acked(&[rebuilt("w1"), rebuilt("w3")]).unwrap();
    assert_eq!(requeued, ["w1"], "w3 was never acked: untouched");
    assert_eq!(ob.state_of("w1").unwrap(), Some(State::Pending));
    // It goes out as the event first sent, behind w3 in the queue.
    let lock = lock(&ob);
    let (claimed, _) = ob.claim(10, None, &HashSet::new(), &lock).unwrap();
    assert_eq!(ids(&claimed), ["w3", "w1"]);
    assert_eq!(
        claimed[1].event,
        event_bytes(&record("w1", Some("c")), "llm", "c")
    );
}

/// The ack is one delete in the queue: the ledger row stays as the ingest wrote it (that is what
/// keeps an ack from seeking a random page for a uuid4 id), and the event's bytes are gone.
#[test]
fn an_ack_deletes_the_queue_row_and_leaves_the_ledger_row_as_written() {
    let (_dir, mut ob) = open();
    ob.ingest(&[item(&record("q0", Some("c")), 0)], &[])
        .unwrap();
    let ledger = |ob: &Outbox| -> (i64, Option<i64>, i64) {
        ob.conn()
            .query_row(
                "SELECT state, updated_ms, queue_seq FROM events WHERE transaction_id = 'q0'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap()
    };
    let before = ledger(&ob);
    let lock = lock(&ob);
    let (claimed, _) = ob.claim(10, None, &HashSet::new(), &lock).unwrap();
    assert_eq!(claimed[0].seq, before.2);
    ob.ack(&[(claimed[0].seq, "q0")], None).unwrap();
    assert_eq!(ledger(&ob), before);
    assert_eq!(ob.pending_count().unwrap(), 0);
    assert_eq!(ob.state_of("q0").unwrap(), Some(State::Acked));
}

/// `event_states` is how a person at `sqlite3` reads the outbox: every state by its name, the
/// queued-and-acked one included.
#[test]
fn the_event_states_view_names_every_state() {
    let (_dir, mut ob) = open();
    let mut failed = record("s-not-billable", Some("c"));
    failed.status = "failure".into();
    ob.ingest(
        &[
            item(&record("s-pending", Some("c")), 0),
            item(&record("s-acked", Some("c")), 1),
            item(&record("s-held", None), 2),
            item(&record("s-dead", Some("c")), 3),
            item(&record("s-dropped", Some("c")), 4),
            item(&record("s-lago-error", Some("c")), 5),
            item(&failed, 6),
        ],
        &[],
    )
    .unwrap();
    let lock = lock(&ob);
    let (claimed, _) = ob.claim(10, None, &HashSet::new(), &lock).unwrap();
    let seq = |id: &str| claimed.iter().find(|c| c.transaction_id == id).unwrap().seq;
    ob.ack(&[(seq("s-acked"), "s-acked")], None).unwrap();
    ob.mark_dead(&[("s-dead", "Lago said no")]).unwrap();
    ob.drop_items(&["s-dropped".to_owned()], "test").unwrap();
    ob.mark_lago_error(&["s-lago-error"], "invalid_code")
        .unwrap();
    let rows: Vec<(String, String, Option<String>, Option<String>)> = ob
        .conn()
        .prepare(
            "SELECT transaction_id, state, subscription_id, source_file FROM event_states
             ORDER BY transaction_id",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let states: Vec<(&str, &str)> = rows
        .iter()
        .map(|(id, state, ..)| (id.as_str(), state.as_str()))
        .collect();
    assert_eq!(
        states,
        [
            ("s-acked", "acked"),
            ("s-dead", "dead"),
            ("s-dropped", "dropped"),
            ("s-held", "held"),
            ("s-lago-error", "lago_error"),
            ("s-not-billable", "not_billable"),
            ("s-pending", "pending"),
        ]
    );
    let pending = rows.iter().find(|r| r.0 == "s-pending").unwrap();
    assert_eq!(pending.2.as_deref(), Some("c"));
    assert_eq!(pending.3.as_deref(), Some("spend.jsonl"));
}

/// The ledger pass writes in id order; the queue, the rejected lines and "who came first" stay
/// in file order.
#[test]
fn one_chunk_queues_in_file_order_and_its_first_line_of_an_id_wins() {
    let (_dir, mut ob) = open();
    let first = record("zz", Some("c"));
    let mut other = record("zz", Some("c"));
    other.input_tokens = 99;
    let report = ob
        .ingest(
            &[
                item(&first, 0),
                item(&record("mm", Some("c")), 1),
                item(&other, 2),
                item(&record("aa", Some("c")), 3),
            ],
            &[],
        )
        .unwrap();
    assert_eq!((report.pending, report.conflicts), (3, 1));
    let lock = lock(&ob);
    let (claimed, _) = ob.claim(10, None, &HashSet::new(), &lock).unwrap();
    assert_eq!(ids(&claimed), ["zz", "mm", "aa"]);
    assert!(claimed[0].seq < claimed[1].seq && claimed[1].seq < claimed[2].seq);
    // The event of "zz" is the first line's (input_tokens 1), the second is the conflict.
    assert!(
        String::from_utf8_lossy(&claimed[0].event).contains("\"input_tokens\":1,"),
        "{}",
        String::from_utf8_lossy(&claimed[0].event)
    );
    let rejected = ob.list(ListFilter::Rejected, 10).unwrap();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].source_offset, Some(2));
    assert!(
        rejected[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("(now pending)")
    );
}

/// The ingest writes the queue several rows to a statement: across full statements and the
/// rows left over, with a conflicting duplicate in between (which writes the rows held back
/// before it reads the queue), every event is queued at its place with its own fields.
#[test]
fn an_ingest_queues_every_row_with_its_own_fields_however_many_it_writes_at_once() {
    let (_dir, mut ob) = open();
    let records: Vec<SpendRecord> = (0..150)
        .map(|i| {
            let mut r = record(&format!("row-{i:03}"), Some(&format!("c-{}", i % 7)));
            r.input_tokens = i;
            r.output_tokens = 1000 + i;
            r.model = format!("model-{}", i % 3);
            r
        })
        .collect();
    let mut conflicting = records[10].clone();
    conflicting.input_tokens = 9999;
    let mut items: Vec<IngestItem> = records
        .iter()
        .enumerate()
        .map(|(i, r)| item(r, i as u64))
        .collect();
    items.insert(100, item(&conflicting, 100_000));
    let report = ob.ingest(&items, &[]).unwrap();
    assert_eq!((report.pending, report.conflicts), (150, 1));
    let reason = ob.list(ListFilter::Rejected, 10).unwrap()[0].reason.clone();
    assert!(reason.is_some_and(|r| r.contains("(now pending)")));
    let lock = lock(&ob);
    let (claimed, _) = ob.claim(200, None, &HashSet::new(), &lock).unwrap();
    assert_eq!(claimed.len(), 150);
    for (i, (c, r)) in claimed.iter().zip(&records).enumerate() {
        assert_eq!(c.transaction_id, r.transaction_id);
        let customer = format!("c-{}", i % 7);
        assert_eq!(
            String::from_utf8_lossy(&c.event),
            String::from_utf8_lossy(&event_bytes(r, "llm", &customer))
        );
    }
    assert!(claimed.windows(2).all(|w| w[0].seq < w[1].seq));
}

/// The ledger rows of queued events go in many to a statement (`ledger.rs`): whether all of a
/// statement's rows are new, or some ids were recorded before (pending or held, in an earlier
/// ingest or earlier in this one), each line is found new or recorded exactly as one row at a
/// time found it, and the first line of an id in the file is the one recorded.
#[test]
fn ledger_rows_written_many_at_once_find_each_line_new_or_recorded() {
    let (_dir, mut ob) = open();
    let line = |i: usize, user: Option<&str>| {
        let mut r = record(&format!("id-{i:03}"), user);
        r.input_tokens = i as u64;
        r
    };
    // Before: every tenth id queued, and five ids held (no customer).
    let earlier: Vec<IngestItem> = (0..300)
        .step_by(10)
        .map(|i| item(&line(i, Some("c")), i as u64))
        .chain((5..300).step_by(60).map(|i| item(&line(i, None), i as u64)))
        .collect();
    let report = ob.ingest(&earlier, &[]).unwrap();
    assert_eq!((report.pending, report.held), (30, 5));
    let places_before: i64 = ob
        .conn
        .query_row("SELECT max(queue_seq) FROM events", [], |r| r.get(0))
        .unwrap();

    // Now: id-009 first held (no customer), then 300 queued lines, then copies (conflicting,
    // identical, held), then 70 ids never seen (a full statement of new rows and some left over).
    let mut items = vec![item(&line(9, None), 0)];
    items.extend((0..300).map(|i| item(&line(i, Some("c")), 1 + i as u64)));
    let mut conflicting = line(7, Some("c"));
    conflicting.output_tokens = 777;
    items.push(item(&conflicting, 1000));
    items.push(item(&line(8, Some("c")), 1001));
    // A held copy of a queued line: the queued one came first and stays.
    items.push(item(&line(11, None), 1002));
    items.extend((0..70).map(|i| {
        let mut r = record(&format!("new-{i:03}"), Some("c"));
        r.input_tokens = 1000 + i;
        item(&r, 2000 + i)
    }));
    let report = ob.ingest(&items, &[]).unwrap();
    // 300 - 30 queued before - 5 held before - id-009 held first, and the 70 new ones.
    assert_eq!(report.pending, 264 + 70);
    assert_eq!(report.held, 1);
    // The five held before and id-009's queued line differ from what was recorded; so do the
    // second id-007 and the held id-011. The thirty queued before and the second id-008 are the
    // same lines.
    assert_eq!((report.conflicts, report.already_seen), (8, 31));

    let lock = lock(&ob);
    let (claimed, _) = ob.claim(1000, None, &HashSet::new(), &lock).unwrap();
    let expected: Vec<String> = (0..300)
        .step_by(10)
        .chain((0..300).filter(|i| i % 10 != 0 && i % 60 != 5 && *i != 9))
        .map(|i| format!("id-{i:03}"))
        .chain((0..70).map(|i| format!("new-{i:03}")))
        .collect();
    assert_eq!(ids(&claimed), expected);
    // Each queued event is its own first line, and its ledger row names its queue place.
    for c in &claimed[30..] {
        let tokens = match c.transaction_id.strip_prefix("id-") {
            Some(n) => n.parse::<u64>().unwrap(),
            None => 1000 + c.transaction_id[4..].parse::<u64>().unwrap(),
        };
        let event = String::from_utf8_lossy(&c.event);
        assert!(
            event.contains(&format!("\"input_tokens\":{tokens},")),
            "{event}"
        );
        assert!(!event.contains("\"output_tokens\":777"), "{event}");
        let (state, place): (i64, i64) = ob
            .conn
            .query_row(
                "SELECT state, queue_seq FROM events WHERE transaction_id = ?1",
                [&c.transaction_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((state, place), (State::Pending.code(), c.seq));
        assert!(place > places_before);
    }
    let held: Vec<String> = ob
        .conn
        .prepare("SELECT transaction_id FROM events WHERE state = 1 ORDER BY transaction_id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        held,
        ["id-005", "id-009", "id-065", "id-125", "id-185", "id-245"]
    );
}

/// The ids in the queue, in queue order.
fn queued_ids(ob: &Outbox) -> Vec<String> {
    let mut stmt = ob
        .conn()
        .prepare("SELECT transaction_id FROM pending ORDER BY seq")
        .unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A window of several batches writes the ledger only at commit: of two lines with one id, in
/// one batch or two, the first in the file is recorded; a line already in the outbox is seen
/// again; the queue rows written for the others are taken back, and the queue keeps file order.
#[test]
fn a_window_of_batches_records_the_first_line_of_each_id() {
    let (_dir, mut ob) = open();
    ob.ingest(&[item(&record("old", Some("c")), 0)], &[])
        .unwrap();
    let z = record("z", Some("c"));
    let a = record("a", Some("c"));
    let mut a2 = a.clone();
    a2.input_tokens = 99;
    let mut failed = record("m", Some("c"));
    failed.status = "failure".into();
    let malformed = IngestItem::Rejected {
        source: Source {
            file: "spend.jsonl".into(),
            offset: 60,
        },
        reason: "invalid record".into(),
        head: b"{".to_vec(),
    };

    let mut window = ob.window().unwrap();
    window.keep_new_ids();
    window
        .add(&[
            item(&z, 10),
            item(&record("old", Some("c")), 20),
            item(&a, 30),
        ])
        .unwrap();
    assert!(!window.in_id_order(), "z then old then a");
    window
        .add(&[item(&z, 40), item(&a2, 50), malformed, item(&failed, 70)])
        .unwrap();
    assert_eq!(window.lines(), 7);
    let done = window.commit(&[pos(80)]).unwrap();

    use Recorded::*;
    assert_eq!(
        done.outcomes,
        [New, AlreadySeen, New, AlreadySeen, Conflict, Rejected, New]
    );
    // The new lines' ids, by place, as asked for.
    let new: Vec<(usize, &str)> = done.new_ids.iter().collect();
    assert_eq!(new, [(0, "z"), (2, "a"), (6, "m")]);
    let r = done.report;
    assert_eq!(
        (
            r.pending,
            r.not_billable,
            r.already_seen,
            r.conflicts,
            r.rejected
        ),
        (2, 1, 2, 1, 1)
    );
    assert_eq!(done.conflicts.len(), 1);
    let c = &done.conflicts[0];
    assert_eq!((c.place, &*c.transaction_id, c.source_offset), (4, "a", 50));
    assert_eq!(queued_ids(&ob), ["old", "z", "a"]);
    assert_eq!(ob.pending_count().unwrap(), 3);
    assert_eq!(ob.show("a").unwrap().unwrap().state, State::Pending);
    assert_eq!(ob.state_of("m").unwrap(), Some(State::NotBillable));
    assert_eq!(ob.positions().unwrap(), vec![pos(80)]);
    let rejected = ob.list(ListFilter::Rejected, 10).unwrap();
    // In file order, the conflict (found at commit) before the malformed line after it.
    let offsets: Vec<_> = rejected.iter().map(|r| r.source_offset).collect();
    assert_eq!(offsets, [Some(50), Some(60)]);
    let conflict = rejected
        .iter()
        .find(|r| r.source_offset == Some(50))
        .unwrap();
    assert!(
        conflict
            .reason
            .as_deref()
            .unwrap()
            .contains("(now pending)"),
        "{conflict:?}"
    );

    // The queue goes on after the places this window gave out, its taken-back ones included.
    ob.ingest(&[item(&record("next", Some("c")), 90)], &[])
        .unwrap();
    assert_eq!(queued_ids(&ob), ["old", "z", "a", "next"]);
}

/// A window dropped before its commit (an error, a crash) leaves nothing: no line, no queue row,
/// no position, and the same lines are new to the next ingest.
#[test]
fn a_window_dropped_uncommitted_leaves_nothing() {
    let (_dir, mut ob) = open();
    let lines = [
        item(&record("a", Some("c")), 0),
        item(&record("b", Some("new-customer")), 10),
    ];
    let mut window = ob.window().unwrap();
    window.add(&lines).unwrap();
    assert!(window.in_id_order());
    drop(window);
    assert_eq!(ob.pending_count().unwrap(), 0);
    assert!(ob.positions().unwrap().is_empty());
    assert_eq!(ob.state_of("a").unwrap(), None);

    // The customer and file ids the dropped window made are made again, not taken from memory.
    let rep = ob.ingest(&lines, &[pos(20)]).unwrap();
    assert_eq!(rep.pending, 2);
    assert_eq!(queued_ids(&ob), ["a", "b"]);
    let b = ob.show("b").unwrap().unwrap();
    assert_eq!(b.state, State::Pending);
    assert_eq!(b.external_subscription_id.as_deref(), Some("new-customer"));
    assert_eq!(b.source_file.as_deref(), Some("spend.jsonl"));
    assert!(b.event.unwrap().contains("\"new-customer\""));
}

/// How many times the statements this connection has cached were prepared again (SQLite does
/// so when a bound value may change the plan, or the schema changed).
fn reprepared(ob: &Outbox) -> i32 {
    use rusqlite::ffi;
    let mut total = 0;
    // SAFETY: the connection is alive and used by no other thread; sqlite3_next_stmt walks the
    // statements it owns, and sqlite3_stmt_status only reads a counter of each.
    unsafe {
        let db = ob.conn().handle();
        let mut stmt = ffi::sqlite3_next_stmt(db, std::ptr::null_mut());
        while !stmt.is_null() {
            total += ffi::sqlite3_stmt_status(stmt, ffi::SQLITE_STMTSTATUS_REPREPARE, 0);
            stmt = ffi::sqlite3_next_stmt(db, stmt);
        }
    }
    total
}

#[test]
fn lookups_by_id_are_prepared_once_whatever_the_id() {
    let (_dir, mut ob) = open();
    let items: Vec<IngestItem> = (0..20)
        .map(|i| item(&record(&format!("id-{i}"), Some("c1")), i * 10))
        .collect();
    ob.ingest(&items, &[pos(200)]).unwrap();
    let acked: Vec<(i64, String)> = ob
        .claim(10, None, &HashSet::new(), &lock(&ob))
        .unwrap()
        .0
        .into_iter()
        .map(|e| (e.seq, e.transaction_id))
        .collect();
    let pairs: Vec<(i64, &str)> = acked.iter().map(|(s, id)| (*s, id.as_str())).collect();
    ob.ack(&pairs, None).unwrap();
    let before = reprepared(&ob);
    for i in 0..20 {
        let id = format!("id-{i}");
        let shown = ob.show(&id).unwrap().unwrap();
        assert_eq!(shown.transaction_id, id);
        assert!(ob.state_of(&id).unwrap().is_some());
        // Acked (the first ten) or still queued: the audit's lookup finds only acked ones.
        assert_eq!(ob.acked_origin(&id).unwrap().is_some(), i < 10, "{id}");
    }
    assert_eq!(
        reprepared(&ob) - before,
        0,
        "a lookup that SQLite prepares again for every id costs several times the query"
    );
}
