//! HTTP/1.1 connections to an upstream, driven by the request that uses them, and the idle ones
//! kept per endpoint for the next request.
//!
//! A pooled client (hyper-util's) runs every connection as a task of its own and passes each
//! request and answer to it over channels, and finds idle connections in a map hashed by origin.
//! Here the calling task polls the connection itself while it sends, waits and reads the answer
//! (the connection's I/O wakes that task directly), and an idle connection goes back to a list
//! owned by its endpoint. HTTP/1.1 only: https upstreams are offered `http/1.1` by ALPN.

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

/// How long an unused connection is kept (servers close theirs after 5 s to a few minutes; one
/// they closed is noticed and dropped when next taken).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
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
}

/// The unused connections of one endpoint, most recently used last.
#[derive(Default)]
pub struct IdleConns {
    conns: Mutex<Vec<(Conn, Instant)>>,
}

impl std::fmt::Debug for IdleConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.conns.lock().map_or(0, |c| c.len());
        f.debug_struct("IdleConns").field("idle", &n).finish()
    }
}

impl IdleConns {
    /// The most recently used connection still open, if any. One the server has closed since
    /// is noticed here (polling it finds the end) and dropped.
    pub fn take(&self) -> Option<Conn> {
        loop {
            let mut conn = {
                let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
                let (conn, since) = conns.pop()?;
                if since.elapsed() > IDLE_TIMEOUT {
                    // Every one below is older still; they close once the lock is released.
                    let expired = std::mem::take(&mut *conns);
                    drop(conns);
                    drop(expired);
                    return None;
                }
                conn
            };
            let mut cx = Context::from_waker(std::task::Waker::noop());
            if drive(&mut conn.io, &mut cx) && conn.reusable() {
                return Some(conn);
            }
        }
    }

    /// Keeps `conn` for the next request, if it can carry one.
    pub fn put(&self, conn: Conn) {
        if !conn.reusable() {
            return;
        }
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if conns.len() >= MAX_IDLE {
            conns.remove(0);
        }
        conns.push((conn, Instant::now()));
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
