//! The sender against servers that are not (only) Lago: redirects, answers that are not Lago's
//! acknowledgement, endless answers, body limits in front of Lago (docs/reliability.md,
//! "Findings"). Every server is a real HTTP server on loopback.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use tally::lago_emulator::{EmulatorConfig, Fault};
use tally::ship::outbox::{IngestItem, ListFilter, Outbox, Source, State};
use tally::ship::resolve::{EventSpec, prepare};
use tally::ship::sender::{SendMode, SendTotals, run_sender};
use tally::ship::signal::WorkSignal;
use tally::ship::{ApiKey, ShipSettings, lago::LagoClient};
use tally::spend::SpendRecord;
use tokio_util::sync::CancellationToken;

use crate::support::{Later, SpendLine, spawn_lago_emulator, wait_until};

const LONG: Duration = Duration::from_secs(60);

/// A request a [`Fixed`] server received.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    body_len: usize,
}

/// A server that answers every request with what `answer` makes, and records what it got.
struct Fixed {
    base: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: CancellationToken,
}

impl Fixed {
    async fn start(answer: impl Fn() -> Response + Clone + Send + Sync + 'static) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let app = axum::Router::new().fallback(move |method: Method, uri: Uri, body: Bytes| {
            let (log, answer) = (log.clone(), answer.clone());
            async move {
                log.lock().unwrap().push(Seen {
                    method,
                    path: uri.path().to_owned(),
                    body_len: body.len(),
                });
                answer()
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await
                .unwrap();
        });
        Self { base, seen, stop }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Fixed {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Lago's success for whatever batch it is given.
fn lago_ok() -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        r#"{"events":[]}"#,
    )
        .into_response()
}

fn settings(base: &str, dir: &std::path::Path) -> ShipSettings {
    let mut s = ShipSettings::new(
        dir.join("spend.jsonl"),
        dir.join("state"),
        base,
        ApiKey::new(EmulatorConfig::default().api_key),
        "llm_usage",
    )
    .unwrap();
    s.tuning.retry_cap = Duration::from_millis(200);
    s.tuning.linger = Duration::from_millis(5);
    s.tuning.drain_deadline = Duration::from_millis(300);
    s
}

fn ingest(s: &ShipSettings, records: &[SpendRecord]) -> Outbox {
    let spec = EventSpec {
        code: "llm_usage".into(),
        charge_by: Default::default(),
        precise_amount: None,
    };
    let mut ob = Outbox::open_in(&s.state_dir).unwrap();
    let items: Vec<_> = records
        .iter()
        .enumerate()
        .map(|(i, r)| IngestItem::Record {
            prepared: prepare(r, &spec),
            source: Source {
                file: "test".into(),
                offset: i as u64,
            },
        })
        .collect();
    ob.ingest(&items, &[]).unwrap();
    ob
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

struct Running {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<
        Result<tally::ship::sender::SendReport, tally::ship::sender::SenderError>,
    >,
}

impl Running {
    fn start(s: &ShipSettings) -> Self {
        let outbox = Outbox::open_in(&s.state_dir).unwrap().shared();
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
        Self { stop, handle }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.handle.await.unwrap().unwrap();
    }
}

/// Sends `n` events to a Lago that answers with `answer` until it has had `attempts` requests;
/// returns the outbox (to check) and the last Lago error recorded.
async fn never_acked(
    base: &str,
    requests: impl Fn() -> usize,
    attempts: usize,
    n: usize,
) -> (Outbox, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(base, dir.path());
    let ob = ingest(&s, &records("hostile", n));
    let sender = Running::start(&s);
    wait_until("the sender to retry", LONG, async || requests() >= attempts).await;
    wait_until("a Lago error recorded", LONG, async || {
        ob.stats().unwrap().last_lago_error.is_some()
    })
    .await;
    sender.stop().await;
    let stats = ob.stats().unwrap();
    assert_eq!(
        (stats.pending, stats.acked, stats.dead),
        (n as u64, 0, 0),
        "every event must stay pending"
    );
    let error = stats.last_lago_error.unwrap().message;
    (ob, error, dir)
}

/// Regression (docs/reliability.md, "Findings"): a 302 to another address that answers 200 was
/// followed as a GET with no body and acked the batch (nothing reached Lago); a 307 sent the events
/// to the other origin.
#[tokio::test]
async fn a_redirect_is_never_followed_and_never_acks() {
    for status in [StatusCode::FOUND, StatusCode::TEMPORARY_REDIRECT] {
        let elsewhere = Fixed::start(lago_ok).await;
        let target = format!("{}/api/v1/events/batch", elsewhere.base);
        let redirecting =
            Fixed::start(move || (status, [("location", target.clone())], "moved").into_response())
                .await;
        let (_ob, error, _dir) =
            never_acked(&redirecting.base, || redirecting.seen().len(), 2, 5).await;
        assert!(
            elsewhere.seen().is_empty(),
            "{status}: the redirect was followed: {:?}",
            elsewhere.seen()
        );
        let first = &redirecting.seen()[0];
        assert_eq!(
            (first.method.clone(), first.path.as_str()),
            (Method::POST, "/api/v1/events/batch")
        );
        assert!(first.body_len > 0);
        assert!(
            error.contains(&status.as_u16().to_string()) && error.contains(&elsewhere.base),
            "{status}: the reason must name the status and the Location: {error}"
        );
        assert!(error.contains("does not follow redirects"), "{error}");
    }
}

/// The usual cause of a redirect: an `http://` base that the server moves to `https://`.
#[tokio::test]
async fn an_http_to_https_redirect_says_to_fix_lago_api_base() {
    let redirecting = Fixed::start(|| {
        (
            StatusCode::MOVED_PERMANENTLY,
            [(
                "location",
                "https://user:s3cret@lago.example.com/api/v1/events/batch",
            )],
            "",
        )
            .into_response()
    })
    .await;
    let (_ob, error, _dir) =
        never_acked(&redirecting.base, || redirecting.seen().len(), 1, 2).await;
    assert!(
        error.contains("https://<redacted>@lago.example.com"),
        "{error}"
    );
    assert!(!error.contains("s3cret"), "{error}");
    assert!(
        error.contains("set LAGO_API_BASE to the https:// URL"),
        "{error}"
    );
}

/// Regression (docs/reliability.md, "Findings"): any 200 acked the batch, whatever its body (a
/// captive portal, a web server's welcome page, a wrong path answered by another app).
#[tokio::test]
async fn a_200_that_is_not_lagos_envelope_never_acks() {
    let server =
        Fixed::start(|| (StatusCode::OK, "<html>Welcome to nginx!</html>").into_response()).await;
    let (_ob, error, _dir) = never_acked(&server.base, || server.seen().len(), 2, 3).await;
    assert!(error.contains("without its {\"events\": [...]}"), "{error}");
    assert!(error.contains("Welcome to nginx"), "{error}");
}

/// Regression (docs/reliability.md, "Findings"): the shipper read Lago's whole answer, however long
/// (a 200 MB answer took 222 MB). Now it stops at a limit and the events stay pending.
#[tokio::test]
async fn an_endless_answer_is_cut_off_and_never_acks() {
    // 64 MiB without a length header, so the limit must hold while streaming.
    let server = Fixed::start(|| {
        let chunk = Bytes::from(vec![b' '; 1024 * 1024]);
        let stream = futures::stream::iter(
            std::iter::once(Bytes::from_static(b"{\"events\":["))
                .chain(std::iter::repeat_n(chunk, 64))
                .map(Ok::<_, std::io::Error>),
        );
        Response::new(Body::from_stream(stream))
    })
    .await;
    let (_ob, error, _dir) = never_acked(&server.base, || server.seen().len(), 2, 3).await;
    assert!(error.contains("longer than"), "{error}");
    assert!(error.contains("stay pending"), "{error}");
}

/// Regression (docs/reliability.md, "Findings"): a proxy in front of Lago that caps bodies answered
/// 413, retried forever with the same batch, and every event behind it waited. Now batches are cut
/// to the byte cap, a 413 splits them, and only an event too large alone is dead, with the reason.
#[tokio::test]
async fn a_body_limit_splits_batches_and_kills_only_the_event_too_large_alone() {
    let lago = spawn_lago_emulator(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&lago.base_url(), dir.path());
    // Larger than the proxy's limit: the first batches meet 413 and are split.
    s.tuning.batch_max_bytes = 64 * 1024;
    lago.inject(Fault::BodyLimit {
        max_bytes: Some(16 * 1024),
    });
    let mut recs = records("cap", 300);
    let big = SpendLine::new("cap-too-big")
        .end_user("cust-1")
        .end_ms(1)
        .model("m".repeat(20 * 1024))
        .record();
    recs.insert(150, big);
    let ob = ingest(&s, &recs);
    let sender = Running::start(&s);
    let what = Later(|| format!("300 acked and 1 dead: {:?}", ob.stats().unwrap()));
    wait_until(what, LONG, async || {
        let st = ob.stats().unwrap();
        st.acked == 300 && st.dead == 1
    })
    .await;
    sender.stop().await;
    let stats = ob.stats().unwrap();
    assert_eq!((stats.pending, stats.acked, stats.dead), (0, 300, 1));
    // Exactly once: every event but the big one, none twice.
    let mut stored: Vec<String> = lago
        .events()
        .iter()
        .map(|e| e.transaction_id.clone())
        .collect();
    stored.sort();
    let before = stored.len();
    stored.dedup();
    assert_eq!((before, stored.len()), (300, 300));
    assert!(!stored.iter().any(|id| id == "cap-too-big"));
    let counters = lago.counters();
    assert!(counters.faults_served > 0, "the limit was never hit");
    let dead = ob.list(ListFilter::State(State::Dead), 10).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, "cap-too-big");
    let reason = dead[0].reason.clone().unwrap();
    assert!(
        reason.contains("413") && reason.contains("too large"),
        "{reason}"
    );
    // What the operator sees.
    let queue = |args: &[&str]| {
        let out = std::process::Command::new(crate::support::tally_bin())
            .args(["queue", "--state-dir"])
            .arg(&s.state_dir)
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let list = queue(&["list", "--state", "dead", "--output-format", "json"]);
    assert!(
        list.contains("cap-too-big") && list.contains("413"),
        "{list}"
    );
    let show = queue(&["show", "cap-too-big"]);
    assert!(show.contains("state           dead"), "{show}");
    assert!(show.contains("Payload Too Large"), "{show}");
}
