//! Connections to the upstream, against a hand-written HTTP/1.1 server that counts connections
//! and requests and closes connections the ways real servers do: kept-alive connections are
//! reused, ones the upstream closed are not, and a request that may have reached the upstream is
//! never sent twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::json;
use tally::proxy::ProxyConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{MASTER, WAIT, chat};
use crate::support::wait_until;

/// How the upstream treats a connection after an answer.
#[derive(Clone, Copy)]
enum Mode {
    /// Keeps it open for the next request.
    KeepAlive,
    /// Answers, then closes it without saying so (as a server's idle timeout does).
    CloseAfterAnswer,
    /// Answers with `connection: close`, then closes it.
    CloseHeader,
    /// Sends the head and half the body, then closes it.
    DropMidAnswer,
}

#[derive(Default)]
struct Counts {
    connections: AtomicUsize,
    requests: AtomicUsize,
    closed: AtomicUsize,
    /// The first request's head, as received.
    first_head: std::sync::Mutex<Option<String>>,
}

struct RawUpstream {
    api_base: String,
    counts: Arc<Counts>,
}

impl RawUpstream {
    async fn start(mode: Mode) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api_base = format!("http://{}/v1", listener.local_addr().unwrap());
        let counts = Arc::new(Counts::default());
        let c = counts.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                c.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_connection(socket, mode, c.clone()));
            }
        });
        Self { api_base, counts }
    }

    fn count(&self, what: fn(&Counts) -> &AtomicUsize) -> usize {
        what(&self.counts).load(Ordering::SeqCst)
    }
}

async fn serve_connection(mut socket: TcpStream, mode: Mode, counts: Arc<Counts>) {
    let body = json!({"id": "chatcmpl-raw", "object": "chat.completion", "model": "raw-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
    .to_string();
    let mut buf = Vec::new();
    loop {
        // One request: the head, then Content-Length bytes of body.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + length);
        counts.first_head.lock().unwrap().get_or_insert(head);
        counts.requests.fetch_add(1, Ordering::SeqCst);
        let answer = match mode {
            Mode::CloseHeader => format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            ),
            Mode::DropMidAnswer => format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
                body.len(),
                &body[..body.len() / 2]
            ),
            Mode::KeepAlive | Mode::CloseAfterAnswer => format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            ),
        };
        if socket.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
        if !matches!(mode, Mode::KeepAlive) {
            drop(socket);
            counts.closed.fetch_add(1, Ordering::SeqCst);
            return;
        }
    }
}

/// A proxy with one model, `raw`, served by `upstream`; returns its base URL and its stop.
async fn proxy_for(upstream: &RawUpstream, dir: &tempfile::TempDir) -> (String, CancellationToken) {
    let yaml = format!(
        r#"
model_list:
  - model_name: raw
    litellm_params: {{model: openai/raw-model, api_base: "{}", input_cost_per_token: 0.000001, output_cost_per_token: 0.000002}}
general_settings:
  master_key: {MASTER}
"#,
        upstream.api_base
    );
    let config = ProxyConfig::from_yaml_str(&yaml, "conns.yaml")
        .unwrap()
        .with_spend_log(dir.path().join("spend.jsonl"))
        .with_state_dir(dir.path().join("state"));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(tally::proxy::serve(config, listener, stop.clone()));
    let http = reqwest::Client::new();
    wait_until("proxy answers", WAIT, async || {
        http.get(format!("{base}/health/liveliness"))
            .send()
            .await
            .is_ok()
            .then_some(())
    })
    .await;
    (base, stop)
}

async fn call(http: &reqwest::Client, base: &str) -> reqwest::StatusCode {
    post(http, base).await.status()
}

async fn post(http: &reqwest::Client, base: &str) -> reqwest::Response {
    http.post(format!("{base}/v1/chat/completions"))
        .bearer_auth(MASTER)
        .json(&chat("raw"))
        .send()
        .await
        .unwrap()
}

fn spend_lines(dir: &tempfile::TempDir) -> usize {
    std::fs::read_to_string(dir.path().join("spend.jsonl"))
        .unwrap_or_default()
        .lines()
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_alive_connections_are_reused_and_requests_use_the_origin_form_with_host() {
    let upstream = RawUpstream::start(Mode::KeepAlive).await;
    let dir = tempfile::tempdir().unwrap();
    let (base, stop) = proxy_for(&upstream, &dir).await;
    let http = reqwest::Client::new();
    for _ in 0..20 {
        assert_eq!(call(&http, &base).await, 200);
    }
    assert_eq!(upstream.count(|c| &c.requests), 20);
    assert_eq!(
        upstream.count(|c| &c.connections),
        1,
        "one connection, reused"
    );

    // Eight at a time: at most eight connections, kept and reused round after round.
    for _ in 0..3 {
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let (http, base) = (http.clone(), base.clone());
                tokio::spawn(async move { call(&http, &base).await })
            })
            .collect();
        for c in calls {
            assert_eq!(c.await.unwrap(), 200);
        }
    }
    assert_eq!(upstream.count(|c| &c.requests), 44);
    let connections = upstream.count(|c| &c.connections);
    assert!(
        connections <= 8,
        "{connections} connections for 8 at a time"
    );
    assert_eq!(spend_lines(&dir), 44);

    let head = upstream.counts.first_head.lock().unwrap().clone().unwrap();
    let port = base_port(&upstream.api_base);
    assert!(
        head.starts_with("post /v1/chat/completions http/1.1\r\n"),
        "{head}"
    );
    assert!(
        head.contains(&format!("\r\nhost: 127.0.0.1:{port}\r\n")),
        "{head}"
    );
    stop.cancel();
}

fn base_port(api_base: &str) -> u16 {
    api_base
        .trim_start_matches("http://127.0.0.1:")
        .trim_end_matches("/v1")
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_upstream_closed_are_not_reused_and_nothing_is_sent_twice() {
    for mode in [Mode::CloseAfterAnswer, Mode::CloseHeader] {
        let upstream = RawUpstream::start(mode).await;
        let dir = tempfile::tempdir().unwrap();
        let (base, stop) = proxy_for(&upstream, &dir).await;
        let http = reqwest::Client::new();
        for n in 1..=5 {
            assert_eq!(call(&http, &base).await, 200, "request {n}");
            // The next request starts once the upstream has closed this connection.
            wait_until("the upstream closed the connection", WAIT, async || {
                (upstream.count(|c| &c.closed) == n).then_some(())
            })
            .await;
        }
        assert_eq!(upstream.count(|c| &c.requests), 5, "each request sent once");
        assert_eq!(upstream.count(|c| &c.connections), 5);
        assert_eq!(spend_lines(&dir), 5);
        stop.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cut_off_mid_body_is_a_502_sent_once_and_not_billed() {
    let upstream = RawUpstream::start(Mode::DropMidAnswer).await;
    let dir = tempfile::tempdir().unwrap();
    let (base, stop) = proxy_for(&upstream, &dir).await;
    let http = reqwest::Client::new();
    let response = post(&http, &base).await;
    assert_eq!(response.status(), 502);
    let error = super::error_of(response).await;
    assert!(
        error["message"].as_str().unwrap().contains("raw"),
        "{error}"
    );
    // A new request gets a new connection and is answered the same way: nothing is resent.
    assert_eq!(call(&http, &base).await, 502);
    assert_eq!(upstream.count(|c| &c.requests), 2);
    assert_eq!(upstream.count(|c| &c.connections), 2);
    let lines = std::fs::read_to_string(dir.path().join("spend.jsonl")).unwrap_or_default();
    assert!(
        !lines.contains("\"status\":\"success\""),
        "a cut-off answer was billed: {lines}"
    );
    stop.cancel();
}
