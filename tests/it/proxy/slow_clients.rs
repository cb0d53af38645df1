//! Hostile input, proxy side (docs/reliability.md, "Findings"): slow and idle clients cannot hold
//! connections forever, and connections beyond `max_connections` wait until one closes. Raw TCP
//! sockets, so the test controls exactly what is sent and when.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{MASTER, Proxy};

/// Longest a test waits for something that must happen (a bound against hanging, not a timing
/// assertion: the configured timeouts are a fraction of a second).
const PATIENCE: Duration = Duration::from_secs(30);

async fn connect(proxy: &Proxy) -> TcpStream {
    TcpStream::connect(proxy.base.trim_start_matches("http://"))
        .await
        .unwrap()
}

/// Reads until the peer closes the connection; panics if it stays open past [`PATIENCE`].
/// Returns what was read before the close.
async fn read_until_closed(stream: &mut TcpStream, what: &str) -> Vec<u8> {
    let mut all = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "{what}: the proxy kept the connection open");
    all
}

/// Reads one whole response (head and a `content-length` body); returns the status and body.
async fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if data.len() >= end + 4 + length {
                    let status = head[9..12].parse().unwrap();
                    let body = String::from_utf8_lossy(&data[end + 4..end + 4 + length]);
                    return (status, body.into_owned());
                }
            }
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before a whole response: {data:?}");
            data.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("no response")
}

const LIVENESS: &[u8] = b"GET /health/liveliness HTTP/1.1\r\nHost: tally\r\n\r\n";

#[tokio::test]
async fn a_connection_that_sends_half_its_headers_is_closed_after_the_header_timeout() {
    // A long idle timeout: only the header timeout can close it.
    let proxy = Proxy::start_with(&[
        ("header_read_timeout_secs", "0.3"),
        ("idle_timeout_secs", "600"),
    ])
    .await;
    let mut stream = connect(&proxy).await;
    stream
        .write_all(b"POST /chat/completions HTTP/1.1\r\nHost: tally\r\nContent-Type: app")
        .await
        .unwrap();
    read_until_closed(&mut stream, "half-sent headers").await;
    // The proxy still serves others.
    let mut other = connect(&proxy).await;
    other.write_all(LIVENESS).await.unwrap();
    assert_eq!(read_response(&mut other).await.0, 200);
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_after_the_idle_timeout() {
    // A long header timeout: only the idle timeout can close it.
    let proxy = Proxy::start_with(&[
        ("header_read_timeout_secs", "600"),
        ("idle_timeout_secs", "0.3"),
    ])
    .await;
    let mut stream = connect(&proxy).await;
    // Two requests on the connection: it is kept alive between them, then idles out.
    for _ in 0..2 {
        stream.write_all(LIVENESS).await.unwrap();
        assert_eq!(read_response(&mut stream).await.0, 200);
    }
    let after = read_until_closed(&mut stream, "idle keep-alive").await;
    assert!(after.is_empty(), "{after:?}");
    // A connection that never sends anything idles out too.
    let mut silent = connect(&proxy).await;
    read_until_closed(&mut silent, "silent connection").await;
}

#[tokio::test]
async fn a_half_sent_body_is_answered_408_after_the_body_timeout_and_closed() {
    let proxy = Proxy::start_with(&[
        ("body_read_timeout_secs", "0.3"),
        ("header_read_timeout_secs", "600"),
        ("idle_timeout_secs", "600"),
    ])
    .await;
    let mut stream = connect(&proxy).await;
    let head = format!(
        "POST /chat/completions HTTP/1.1\r\nHost: tally\r\nAuthorization: Bearer {MASTER}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\":"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let answer = read_until_closed(&mut stream, "half-sent body").await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 408 ") && answer.contains("body_read_timeout_secs"),
        "{answer}"
    );
    assert!(proxy.records().is_empty());
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_until_one_closes() {
    let proxy = Proxy::start_with(&[("max_connections", "2")]).await;
    // Two connections, each served once and kept alive: both slots taken.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = connect(&proxy).await;
        stream.write_all(LIVENESS).await.unwrap();
        assert_eq!(read_response(&mut stream).await.0, 200);
        held.push(stream);
    }
    // A third client connects (the kernel queues it) and sends its request: no answer while the
    // two are held.
    let mut waiting = connect(&proxy).await;
    waiting.write_all(LIVENESS).await.unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(500), waiting.read(&mut byte)).await;
    assert!(
        early.is_err(),
        "the third connection was served while two were held: {early:?}"
    );
    // One goes: the waiting one is served.
    drop(held.pop());
    assert_eq!(read_response(&mut waiting).await.0, 200);
    // The one still held works too.
    let mut first = held.pop().unwrap();
    first.write_all(LIVENESS).await.unwrap();
    assert_eq!(read_response(&mut first).await.0, 200);
}
