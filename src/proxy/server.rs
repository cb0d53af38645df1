//! The HTTP server: connections accepted under a limit, and timeouts that keep a slow or idle
//! client from holding one forever (each connection is a file descriptor; without them, idle or
//! half-sent connections piled up until "Too many open files").
//!
//! - **Connection limit.** At `max_connections` open connections the server stops accepting: new
//!   clients wait in the kernel's listen queue and are served as soon as a connection closes.
//! - **Header read timeout.** Once a client has sent the first byte of a request, its whole head
//!   (request line and headers) must arrive within `header_read_timeout`, else the connection is
//!   closed.
//! - **Body read timeout.** A request's whole body must arrive within `body_read_timeout` of the
//!   handler first finding it incomplete (right after the head); else the request is answered 408
//!   and the connection closed.
//! - **Idle timeout.** A kept-alive connection with no request in progress and nothing received
//!   for `idle_timeout` is closed.
//!
//! hyper's own header timeout starts as soon as a connection is ready for a request, so it would
//! also bound idle time; the two are kept apart here by a small watchdog per connection that
//! sees the connection's reads (a wrapper around the socket) and its requests (a guard held until
//! the response is done). The watchdog is never woken by them (see [`Activity`]): a busy
//! connection's watchdog sleeps through it, and looks again only when a deadline could be due.
//! Responses themselves are not bounded: a stream lasts as long as the model writes (the
//! upstream's `timeout` bounds that).

use std::convert::Infallible;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use bytes::Bytes;
use futures::task::AtomicWaker;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Defaults: nginx's header and keep-alive timeouts (a keep-alive longer than a load balancer's
/// usual 60 s, so the balancer closes first and never sends into a closing connection); a body
/// timeout that lets a 16 MiB body through at about 1 Mbit/s.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(120);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// Each connection takes a descriptor, and each call in flight one more upstream: 4096 stays far
/// below the service unit's `LimitNOFILE=65536`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// How often "at the connection limit" is logged while it lasts.
const FULL_LOG_EVERY: Duration = Duration::from_secs(60);

/// The server's limits (`tally_settings`, `TALLY_*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServerLimits {
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// A request body that did not arrive in time; the handler answers 408.
#[derive(Debug, thiserror::Error)]
#[error(
    "the request body did not arrive within {}s (tally_settings.body_read_timeout_secs)",
    limit.as_secs_f64()
)]
pub struct BodyTimeout {
    pub limit: Duration,
}

/// Serves `router` on `listener` until `shutdown`; then lets each connection finish its request
/// in progress and returns once all are closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    shutdown: CancellationToken,
) {
    warn_if_descriptors_are_short(limits.max_connections);
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let connections = TaskTracker::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The watchdog below times headers; hyper's timer would start at idle (see the module doc).
    builder.http1().header_read_timeout(None);
    let builder = Arc::new(builder);
    let mut full_logged: Option<Instant> = None;
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if full_logged.is_none_or(|at| at.elapsed() >= FULL_LOG_EVERY) {
                    full_logged = Some(Instant::now());
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "at the connection limit (tally_settings.max_connections): new connections \
                         wait until one closes"
                    );
                }
                tokio::select! {
                    permit = permits.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break, // never closed
                    },
                    () = shutdown.cancelled() => break,
                }
            }
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                accept_error(e, &shutdown).await;
                continue;
            }
        };
        // Small request/response pairs: Nagle's algorithm would hold each answer for an ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        connections.spawn(connection(
            builder.clone(),
            tcp,
            router.clone(),
            limits,
            shutdown.clone(),
            permit,
        ));
    }
    connections.close();
    connections.wait().await;
}

/// As axum's server: a failed accept that is about one connection is ignored; anything else
/// (out of descriptors) is logged and the loop pauses, so it does not spin.
async fn accept_error(e: std::io::Error, shutdown: &CancellationToken) {
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "cannot accept a connection; retrying in 1 s");
    tokio::select! {
        () = tokio::time::sleep(Duration::from_secs(1)) => {}
        () = shutdown.cancelled() => {}
    }
}

/// One connection: served by hyper, watched for the header and idle timeouts, gracefully shut
/// down on `shutdown`. The permit is released when it closes.
async fn connection(
    builder: Arc<auto::Builder<TokioExecutor>>,
    tcp: TcpStream,
    router: Router,
    limits: ServerLimits,
    shutdown: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        io: tcp,
        activity: activity.clone(),
    });
    let service = hyper::service::service_fn({
        let activity = activity.clone();
        move |request: Request<Incoming>| {
            let guard = activity.begin();
            let request =
                request.map(|b| Body::new(DeadlineBody::new(b, limits.body_read_timeout)));
            let router = router.clone();
            async move {
                let response = router.oneshot(request).await?;
                Ok::<_, Infallible>(response.map(|body| Guarded {
                    body,
                    _guard: guard,
                }))
            }
        }
    });
    let mut conn = pin!(builder.serve_connection(io, service));
    let mut cancelled = pin!(shutdown.cancelled());
    let first_look = activity.next_look(&limits, Instant::now());
    let mut timer = pin!(tokio::time::sleep_until(first_look.into()));
    // The shutdown signal and the timer are polled only after one of them woke the task, not on
    // every wake of the connection (each poll of the signal takes its lock).
    let side = Arc::new(SideWake::default());
    let side_waker = Waker::from(side.clone());
    let mut stopping = false;
    std::future::poll_fn(|cx| {
        loop {
            if let Poll::Ready(served) = conn.as_mut().poll(cx) {
                if let Err(e) = served {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return Poll::Ready(());
            }
            if !side.take(cx.waker()) {
                return Poll::Pending;
            }
            let mut side_cx = Context::from_waker(&side_waker);
            let mut just_stopped = false;
            if !stopping && cancelled.as_mut().poll(&mut side_cx).is_ready() {
                stopping = true;
                just_stopped = true;
                conn.as_mut().graceful_shutdown();
            }
            while timer.as_mut().poll(&mut side_cx).is_ready() {
                let now = Instant::now();
                if activity.deadline(&limits).is_some_and(|d| d <= now) {
                    tracing::debug!("closing a connection: header or idle timeout");
                    return Poll::Ready(()); // dropping the connection closes the socket
                }
                timer
                    .as_mut()
                    .reset(activity.next_look(&limits, now).into());
            }
            if !just_stopped {
                return Poll::Pending;
            }
            // Shutting down gracefully may let the connection finish now: poll it again.
        }
    })
    .await;
}

/// The waker of a connection's shutdown signal and watchdog timer: notes that one of them fired
/// and wakes the connection's task.
struct SideWake {
    fired: AtomicBool,
    task: AtomicWaker,
}

impl Default for SideWake {
    fn default() -> Self {
        Self {
            // The first poll registers both.
            fired: AtomicBool::new(true),
            task: AtomicWaker::new(),
        }
    }
}

impl Wake for SideWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl SideWake {
    /// Whether the signal or the timer fired since the last call; `task` is woken when one does.
    fn take(&self, task: &Waker) -> bool {
        // Registered first: a wake after the flag is read reaches the task.
        self.task.register(task);
        self.fired.load(Ordering::Acquire) && self.fired.swap(false, Ordering::AcqRel)
    }
}

/// What a connection's watchdog knows: requests in progress, and reads since the last one ended.
///
/// Nothing here wakes the watchdog: it runs in the connection's own task, and a wake from its
/// own poll (a read, a response ending) makes Tokio reschedule the task as a yield and poll the
/// whole connection again, twice per request. The watchdog instead sleeps until the earliest
/// moment a deadline could fall given what it saw ([`Activity::next_look`]) and looks again.
struct Activity {
    origin: Instant,
    /// Requests whose response is not finished.
    active: AtomicUsize,
    /// When (ms after `origin`) the connection last had no request in progress.
    idle_since: AtomicU64,
    /// When (ms after `origin`) the first byte since then arrived; [`NONE`] if none has.
    first_byte: AtomicU64,
}

const NONE: u64 = u64::MAX;

impl Activity {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            active: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            first_byte: AtomicU64::new(NONE),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    fn begin(self: &Arc<Self>) -> RequestGuard {
        self.active.fetch_add(1, Ordering::SeqCst);
        RequestGuard(self.clone())
    }

    fn read_some(&self) {
        if self.first_byte.load(Ordering::Relaxed) == NONE {
            self.first_byte.store(self.now(), Ordering::SeqCst);
        }
    }

    /// When the connection is to be closed, if nothing changes; none while a request runs.
    fn deadline(&self, limits: &ServerLimits) -> Option<Instant> {
        if self.active.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let first = self.first_byte.load(Ordering::SeqCst);
        let at = if first == NONE {
            self.origin
                + Duration::from_millis(self.idle_since.load(Ordering::SeqCst))
                + limits.idle_timeout
        } else {
            self.origin + Duration::from_millis(first) + limits.header_read_timeout
        };
        Some(at)
    }

    /// When the watchdog is to look again, seen at `now`: the deadline if there is one, and never
    /// later than any deadline that what happens next could set. A request ends at or after
    /// `now` and the next first byte comes after that, so neither an idle nor a header deadline
    /// set later can fall before `now` plus the shorter of the two timeouts.
    fn next_look(&self, limits: &ServerLimits, now: Instant) -> Instant {
        let soonest_new = now + limits.header_read_timeout.min(limits.idle_timeout);
        if self.active.load(Ordering::SeqCst) > 0 {
            return soonest_new;
        }
        let first = self.first_byte.load(Ordering::SeqCst);
        if first != NONE {
            // A request's head is being read: only its header deadline can close it.
            return self.origin + Duration::from_millis(first) + limits.header_read_timeout;
        }
        let idle = self.origin
            + Duration::from_millis(self.idle_since.load(Ordering::SeqCst))
            + limits.idle_timeout;
        // A first byte arriving from now on sets a header deadline no sooner than this.
        idle.min(now + limits.header_read_timeout)
    }
}

/// Held from a request's head until its response is done (or dropped).
struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let a = &self.0;
        // Set before the count drops, so a watchdog that sees no request sees these too.
        a.idle_since.store(a.now(), Ordering::SeqCst);
        a.first_byte.store(NONE, Ordering::SeqCst);
        a.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The socket, noting reads for the watchdog.
struct Watched {
    io: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read_some();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A request body that must end within a time limit. The timer (and the clock read) starts the
/// first time the handler finds the body not all there, right after the head for a handler that
/// reads its body at once; most bodies arrive with the head and never start it.
struct DeadlineBody {
    inner: Incoming,
    limit: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl DeadlineBody {
    fn new(inner: Incoming, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            timer: None,
        }
    }
}

impl hyper::body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let limit = this.limit;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout { limit: this.limit })))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body holding its request's guard until it is done or dropped.
struct Guarded {
    body: Body,
    _guard: RequestGuard,
}

impl hyper::body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Each connection needs a descriptor, and each call in flight one more to its upstream: warn
/// when the process may run out before the connection limit is reached.
fn warn_if_descriptors_are_short(max_connections: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    let needed = (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(64);
    if limit.rlim_cur != libc::RLIM_INFINITY && limit.rlim_cur < needed {
        tracing::warn!(
            open_files_limit = limit.rlim_cur,
            max_connections,
            "the open-files limit is below twice max_connections: at the limit the proxy may fail \
             with \"Too many open files\"; raise it (LimitNOFILE= in the unit, ulimit -n) or lower \
             tally_settings.max_connections"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(header_secs: u64, idle_secs: u64) -> ServerLimits {
        ServerLimits {
            header_read_timeout: Duration::from_secs(header_secs),
            idle_timeout: Duration::from_secs(idle_secs),
            ..ServerLimits::default()
        }
    }

    #[test]
    fn an_idle_watchdog_looks_again_before_a_header_deadline_that_a_first_byte_could_set() {
        // Header timeout shorter than the idle one: a first byte arriving just after the look
        // sets a deadline 1 s later, which the unwoken watchdog must not sleep past.
        let limits = limits(1, 75);
        let activity = Arc::new(Activity::new());
        let now = activity.origin + Duration::from_secs(10);
        assert_eq!(
            activity.next_look(&limits, now),
            now + Duration::from_secs(1)
        );
        // Once it has come, the look is the header deadline itself.
        activity.first_byte.store(10_500, Ordering::SeqCst);
        let deadline = activity.origin + Duration::from_millis(11_500);
        assert_eq!(activity.next_look(&limits, now), deadline);
        assert_eq!(activity.deadline(&limits), Some(deadline));
    }

    #[test]
    fn an_idle_watchdog_sleeps_to_the_idle_deadline_when_it_comes_first() {
        let limits = limits(600, 2);
        let activity = Arc::new(Activity::new());
        let now = activity.origin + Duration::from_secs(1);
        let idle_deadline = activity.origin + Duration::from_secs(2);
        assert_eq!(activity.next_look(&limits, now), idle_deadline);
        assert_eq!(activity.deadline(&limits), Some(idle_deadline));
    }

    #[test]
    fn during_a_request_the_watchdog_looks_again_after_the_shorter_timeout() {
        let limits = limits(30, 75);
        let activity = Arc::new(Activity::new());
        let guard = activity.begin();
        let now = activity.origin + Duration::from_secs(5);
        // No deadline while the request runs; the next one (idle after it ends, or the next
        // request's header) can come no sooner than 30 s from now.
        assert_eq!(activity.deadline(&limits), None);
        assert_eq!(
            activity.next_look(&limits, now),
            now + Duration::from_secs(30)
        );
        drop(guard);
        assert!(activity.deadline(&limits).is_some());
    }
}
