//! The listening socket and its connections. Kept by hand (not `axum::serve`) for two faults:
//! closing a connection without answering, and refusing connections for a while then
//! listening again on the same port.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use super::Emulator;
use super::api::DropConnection;

/// Returned to hyper instead of a response: hyper then closes the connection unanswered.
#[derive(Debug, thiserror::Error)]
#[error("connection dropped on purpose by an injected fault")]
struct ConnectionDropped;

struct Listening {
    listener: Option<TcpListener>,
    /// Cancelled when listening stops: ends the accept loop and closes open connections.
    generation: CancellationToken,
}

pub(crate) struct Net {
    addr: SocketAddr,
    listening: Mutex<Listening>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    runtime: tokio::runtime::Handle,
}

impl Net {
    pub fn new(listener: TcpListener, runtime: tokio::runtime::Handle) -> io::Result<Self> {
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        Ok(Self {
            addr,
            listening: Mutex::new(Listening {
                listener: Some(listener),
                generation: shutdown.child_token(),
            }),
            shutdown,
            tracker: TaskTracker::new(),
            runtime,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn lock(&self) -> MutexGuard<'_, Listening> {
        self.listening
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<Option<io::Result<TcpStream>>> {
        match &self.lock().listener {
            Some(listener) => listener
                .poll_accept(cx)
                .map(|r| Some(r.map(|(stream, _)| stream))),
            None => Poll::Ready(None),
        }
    }

    pub fn is_listening(&self) -> bool {
        self.lock().listener.is_some()
    }

    /// Closes the socket now (new connections are refused from here on) and the open ones.
    pub fn stop_listening(&self) {
        let mut listening = self.lock();
        listening.listener = None;
        listening.generation.cancel();
    }

    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn_on(task, &self.runtime);
    }

    pub async fn shutdown(&self) {
        self.stop_listening();
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Starts accepting on the current listener.
pub(crate) fn start_accepting(app: &Arc<Emulator>) {
    let generation = app.net.lock().generation.clone();
    let app2 = Arc::clone(app);
    app.net.spawn(accept_loop(app2, generation));
}

/// Binds the same address again and accepts on it. A no-op when already listening.
pub(crate) async fn resume_listening(app: &Arc<Emulator>) -> io::Result<()> {
    if app.net.is_listening() {
        return Ok(());
    }
    let listener = TcpListener::bind(app.net.addr).await?;
    {
        let mut listening = app.net.lock();
        if listening.listener.is_some() {
            return Ok(());
        }
        listening.listener = Some(listener);
        listening.generation = app.net.shutdown.child_token();
    }
    start_accepting(app);
    Ok(())
}

/// Resumes after `delay`, retrying the bind for a while if the port is briefly unavailable.
pub(crate) async fn resume_after(app: Arc<Emulator>, delay: Duration) {
    tokio::select! {
        () = app.net.shutdown.cancelled() => return,
        () = tokio::time::sleep(delay) => {}
    }
    for _ in 0..100 {
        match resume_listening(&app).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(addr = %app.net.addr, error = %e, "lago emulator: cannot listen again yet; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracing::error!(addr = %app.net.addr, "lago emulator: gave up listening again");
}

async fn accept_loop(app: Arc<Emulator>, generation: CancellationToken) {
    let router = super::app_router(Arc::clone(&app));
    loop {
        let accepted = tokio::select! {
            () = generation.cancelled() => break,
            accepted = poll_fn(|cx| app.net.poll_accept(cx)) => accepted,
        };
        match accepted {
            None => break,
            Some(Ok(stream)) => {
                app.net
                    .spawn(serve_connection(stream, router.clone(), generation.clone()));
            }
            Some(Err(e)) => {
                // Usually out of file descriptors: wait a little instead of spinning.
                tracing::warn!(error = %e, "lago emulator: accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn serve_connection(stream: TcpStream, router: Router, generation: CancellationToken) {
    let _ = stream.set_nodelay(true);
    let stop = generation.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let router = router.clone();
        let stopped = stop.is_cancelled();
        async move {
            // Closing open connections is asynchronous; this makes sure none of them handles
            // another request once `stop_listening` has returned.
            if stopped {
                return Err(ConnectionDropped);
            }
            let response = match router.oneshot(req.map(axum::body::Body::new)).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            if response.extensions().get::<DropConnection>().is_some() {
                Err(ConnectionDropped)
            } else {
                Ok(response)
            }
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        // hyper's header read timeout (30 s) needs a timer to run on.
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = connection => {}
        () = generation.cancelled() => {}
    }
}
