//! HTTP/1.1 connections to an upstream, driven by the request that uses them, and the idle ones
//! kept per endpoint for the next request.
//!
//! A pooled client (hyper-util's) runs every connection as a task of its own and passes each
//! request and answer to it over channels, and finds idle connections in a map hashed by origin.
//! Here the calling task polls the connection itself while it sends, waits and reads the answer
//! (the connection's I/O wakes that task directly), and an idle connection goes back to a list
//! owned by its endpoint, which a sweeper task checks every few seconds while it holds any (a
//! connection the server closed is closed on our side then, not left in CLOSE_WAIT). HTTP/1.1
//! only: https upstreams are offered `http/1.1` by ALPN.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{Connection, SendRequest, handshake};
use hyper::{Request, Response, Uri};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower::ServiceExt;

use super::wake_gate::WakeGate;

pub type Connector = HttpsConnector<HttpConnector>;
type Io = MaybeHttpsStream<TokioIo<TcpStream>>;
/// The connection's state machine: reads and writes only while polled.
type Driver = Connection<Io, Full<Bytes>>;
pub type UpstreamRequest = Request<Full<Bytes>>;

/// How long an unused connection is kept (servers close theirs after 5 s to a few minutes).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often the idle connections are checked: one the server closed is closed on our side by
/// then (not left in CLOSE_WAIT until a request happens to take it), and one past the idle
/// timeout is closed.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Unused connections kept per endpoint: enough for the proxy's concurrency, bounded so a burst
/// does not hold sockets open for the idle timeout.
const MAX_IDLE: usize = 512;

/// Why a request could not be sent or answered.
#[derive(Debug)]
pub enum SendError {
    /// The connection ended before the request was written: it can be sent on another one.
    NotSent(Box<UpstreamRequest>, hyper::Error),
    /// The request may have reached the upstream; it must not be sent again.
    Failed(hyper::Error),
}

/// One HTTP/1 connection: the handle requests go in by, and the state machine doing its I/O,
/// which only moves while whoever holds the connection polls it.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    /// `None` once the connection has ended (closed by either side, or failed). Boxed: with
    /// TLS state inline it is kilobytes, and the futures holding a `Conn` are moved.
    io: Option<Pin<Box<Driver>>>,
    /// The connection wakes the task that drives it through this (see [`WakeGate`]).
    gate: Arc<WakeGate>,
}

/// Moves the connection's I/O along; `false` once it has ended (and `io` is `None`).
fn drive(io: &mut Option<Pin<Box<Driver>>>, cx: &mut Context<'_>) -> bool {
    if let Some(conn) = io
        && conn.as_mut().poll(cx).is_ready()
    {
        *io = None;
    }
    io.is_some()
}

impl Conn {
    /// Connects (TCP, and TLS for https) and completes the HTTP/1 handshake.
    pub async fn open(
        connector: &Connector,
        uri: &Uri,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let stream = connector.clone().oneshot(uri.clone()).await?;
        let (sender, io) = handshake(stream).await?;
        Ok(Self {
            sender,
            io: Some(Box::pin(io)),
            gate: Arc::default(),
        })
    }

    /// Sends `request` and waits for the answer's head, driving the connection meanwhile. The
    /// answer's body arrives only while the connection is driven (see [`Driven`]).
    pub async fn send(
        &mut self,
        request: UpstreamRequest,
    ) -> Result<Response<Incoming>, SendError> {
        let Self { sender, io, gate } = self;
        // Ready once the previous exchange is fully done; an error means the connection ended.
        if let Err(e) = poll_fn(|cx| {
            gate.poll(cx, |cx| {
                drive(io, cx);
                sender.poll_ready(cx)
            })
        })
        .await
        {
            return Err(SendError::NotSent(Box::new(request), e));
        }
        let mut answer = std::pin::pin!(sender.try_send_request(request));
        poll_fn(|cx| {
            gate.poll(cx, |cx| {
                // The I/O first: it may complete the answer polled next.
                drive(io, cx);
                answer.as_mut().poll(cx)
            })
        })
        .await
        .map_err(|mut e| match e.take_message() {
            Some(request) => SendError::NotSent(Box::new(request), e.into_error()),
            None => SendError::Failed(e.into_error()),
        })
    }

    /// Whether the connection can carry another request once idle.
    fn reusable(&self) -> bool {
        self.io.is_some() && !self.sender.is_closed()
    }

    /// For an idle connection: polls it once (reading an end the server sent meanwhile) and
    /// says whether it can still carry a request.
    fn still_open(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        drive(&mut self.io, &mut cx) && self.reusable()
    }
}

/// The unused connections of one endpoint, most recently used last. While there are any, a
/// sweeper task checks them every [`SWEEP_EVERY`]; it ends once none are left, so an endpoint
/// nobody calls costs no task.
#[derive(Default)]
pub struct IdleConns {
    state: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    conns: Vec<(Conn, Instant)>,
    /// Whether a sweeper task is running for these connections.
    sweeping: bool,
}

impl std::fmt::Debug for IdleConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdleConns")
            .field("idle", &self.len())
            .finish()
    }
}

impl IdleConns {
    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many connections are kept.
    pub fn len(&self) -> usize {
        self.lock().conns.len()
    }

    /// The most recently used connection still open, if any. One the server has closed since
    /// is noticed here (polling it finds the end) and dropped.
    pub fn take(&self) -> Option<Conn> {
        loop {
            let mut conn = {
                let mut idle = self.lock();
                let (conn, since) = idle.conns.pop()?;
                if since.elapsed() > IDLE_TIMEOUT {
                    // Every one below is older still; they close once the lock is released.
                    let expired = std::mem::take(&mut idle.conns);
                    drop(idle);
                    drop(expired);
                    return None;
                }
                conn
            };
            if conn.still_open() {
                return Some(conn);
            }
        }
    }

    /// Keeps `conn` for the next request, if it can carry one, and starts the sweeper if none
    /// is running.
    pub fn put(self: &Arc<Self>, conn: Conn) {
        if !conn.reusable() {
            return;
        }
        let mut idle = self.lock();
        if idle.conns.len() >= MAX_IDLE {
            idle.conns.remove(0);
        }
        idle.conns.push((conn, Instant::now()));
        if !idle.sweeping
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            idle.sweeping = true;
            runtime.spawn(sweeper(Arc::downgrade(self)));
        }
    }

    /// Closes the connections past the idle timeout and those the server has closed; `false`
    /// (and the sweeper marked stopped) once none are left.
    fn sweep(&self) -> bool {
        let mut idle = self.lock();
        let closed: Vec<_> = idle
            .conns
            .extract_if(.., |(conn, since)| {
                since.elapsed() > IDLE_TIMEOUT || !conn.still_open()
            })
            .collect();
        idle.sweeping = !idle.conns.is_empty();
        let sweeping = idle.sweeping;
        drop(idle);
        // Closed outside the lock: requests may be waiting for it.
        drop(closed);
        sweeping
    }
}

/// Sweeps `idle` until it is empty or its endpoint is gone.
async fn sweeper(idle: std::sync::Weak<IdleConns>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        match idle.upgrade() {
            Some(idle) if idle.sweep() => {}
            _ => return,
        }
    }
}

/// An answer's body together with the connection it arrives on: polling the body drives the
/// connection, and once the body has ended the connection goes back to its endpoint's idle list.
/// Dropped before the end, it closes the connection (an HTTP/1 connection cannot be reused
/// mid-answer).
pub struct Driven {
    body: Incoming,
    conn: Option<(Conn, Arc<IdleConns>)>,
}

impl Driven {
    pub fn new(body: Incoming, conn: Conn, idle: Arc<IdleConns>) -> Self {
        Self {
            body,
            conn: Some((conn, idle)),
        }
    }
}

impl hyper::body::Body for Driven {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some((conn, _)) = &mut this.conn else {
            return Pin::new(&mut this.body).poll_frame(cx);
        };
        let Conn { io, gate, .. } = conn;
        let frame = gate.poll(cx, |cx| {
            drive(io, cx);
            Pin::new(&mut this.body).poll_frame(cx)
        });
        if let Poll::Ready(None) = frame
            && let Some((mut conn, idle)) = this.conn.take()
        {
            // Let the connection finish the exchange (it then accepts the next request).
            let Conn { io, gate, .. } = &mut conn;
            let _ = gate.poll(cx, |cx| Poll::Ready(drive(io, cx)));
            idle.put(conn);
        }
        frame
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;

    use super::*;

    /// How the test upstream ends a connection after its one answer.
    #[derive(Clone, Copy)]
    enum After {
        /// Closes it a second later without a word, as a server's idle timeout does.
        Close,
        /// Keeps it open.
        KeepOpen,
    }

    /// An upstream that answers one request, ends the connection as told, then reports when
    /// the proxy closed its side (reading the end of the stream), on the time of the test clock.
    async fn upstream(after: After) -> (Uri, oneshot::Receiver<Instant>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: Uri = format!("http://{}/", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let (closed_tx, closed_rx) = oneshot::channel();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = socket.read(&mut buf).await.unwrap();
                assert!(n > 0, "the proxy closed before sending its request");
                head.extend_from_slice(&buf[..n]);
            }
            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
            socket.write_all(answer).await.unwrap();
            if let After::Close = after {
                tokio::time::sleep(Duration::from_secs(1)).await;
                socket.shutdown().await.unwrap();
            }
            // Anything but the end of the stream would be a request the test did not send.
            assert_eq!(socket.read(&mut buf).await.unwrap(), 0);
            let _ = closed_tx.send(Instant::now());
        });
        (uri, closed_rx)
    }

    /// One exchange on a new connection, read to the end so the connection goes to `idle`.
    async fn exchange(uri: &Uri, idle: &Arc<IdleConns>) {
        let connector = crate::proxy::upstream::UpstreamClient::new()
            .unwrap()
            .connector;
        let mut conn = Conn::open(&connector, uri).await.unwrap();
        let request = Request::post("/").body(Full::new(Bytes::new())).unwrap();
        let response = conn.send(request).await.unwrap();
        let body = Driven::new(response.into_body(), conn, idle.clone());
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"{}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_the_server_closed_is_closed_by_the_next_sweep_without_a_request() {
        let idle = Arc::new(IdleConns::default());
        // Twice: the sweeper stops once nothing is idle, and the next kept connection starts
        // a new one.
        for round in 0..2 {
            let (uri, closed) = upstream(After::Close).await;
            exchange(&uri, &idle).await;
            assert_eq!(idle.len(), 1, "round {round}: the connection was kept");
            let kept = Instant::now();
            let closed = tokio::time::timeout(SWEEP_EVERY * 2, closed)
                .await
                .unwrap_or_else(|_| panic!("round {round}: the connection is still open"))
                .unwrap();
            assert!(closed - kept <= SWEEP_EVERY, "round {round}: closed late");
            assert_eq!(idle.len(), 0, "round {round}");
            assert!(!idle.lock().sweeping, "round {round}: the sweeper stopped");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_connection_is_kept_for_the_idle_timeout_then_closed() {
        let idle = Arc::new(IdleConns::default());
        let (uri, mut closed) = upstream(After::KeepOpen).await;
        exchange(&uri, &idle).await;
        let kept = Instant::now();
        tokio::time::sleep(IDLE_TIMEOUT).await;
        assert_eq!(idle.len(), 1, "kept for the whole idle timeout");
        assert!(closed.try_recv().is_err(), "still open at the idle timeout");
        let closed = tokio::time::timeout(SWEEP_EVERY * 2, closed)
            .await
            .expect("closed by a sweep after the idle timeout")
            .unwrap();
        assert!(closed - kept <= IDLE_TIMEOUT + SWEEP_EVERY);
        assert_eq!(idle.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweeper_ends_with_its_endpoint() {
        let idle = Arc::new(IdleConns::default());
        let (uri, closed) = upstream(After::KeepOpen).await;
        exchange(&uri, &idle).await;
        let sweeper_alive = Arc::downgrade(&idle);
        drop(idle);
        // Dropping the endpoint closes its idle connections at once; the sweeper then finds
        // nothing to upgrade and returns.
        tokio::time::timeout(Duration::from_millis(1), closed)
            .await
            .expect("closed with the endpoint")
            .unwrap();
        tokio::time::sleep(SWEEP_EVERY * 2).await;
        assert!(sweeper_alive.upgrade().is_none());
    }
}
