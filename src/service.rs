//! Telling systemd how a service is doing (sd_notify(3)): ready, status, stopping, and the
//! watchdog.
//!
//! The units are `Type=notify` with `WatchdogSec=`: systemd considers a service started only
//! once it sends `READY=1`, and restarts it when `WATCHDOG=1` stops arriving. Every function
//! here does nothing when `NOTIFY_SOCKET` is unset (run by hand, in tests, or under another
//! supervisor), so services call them unconditionally.
//!
//! Notifications are datagrams on a socket systemd reads at once; like libsystemd's
//! `sd_notify`, a send waits if that socket's queue is full. The watchdog's pings are sent off
//! the async workers for that reason.
//!
//! A failed notification is logged, never fatal: the service works either way, and systemd
//! reports a missing `READY=1` as a start timeout that points at this log line.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// Tells systemd the service is ready: call it once the service can do its job (the proxy has
/// bound its port and opened its key store; the shipper has opened its outbox).
pub fn notify_ready() {
    send(&[NotifyState::Ready]);
}

/// Tells systemd the service is shutting down (draining), so a slow stop is not mistaken for a
/// hang in `systemctl status`.
pub fn notify_stopping() {
    send(&[NotifyState::Stopping]);
}

/// One line for the `Status:` field of `systemctl status`, e.g. "shipping; 12 pending".
/// Newlines would end the field early, so they are replaced.
pub fn notify_status(status: &str) {
    let line = status.replace(['\n', '\r'], " ");
    send(&[NotifyState::Status(&line)]);
}

/// How often to ping: half of the `WATCHDOG_USEC` systemd passed, so one late ping is not a
/// restart. `None` when the watchdog is off (or meant for another process).
pub fn watchdog_interval() -> Option<Duration> {
    // A zero period would make the ticker panic; a watchdog of a microsecond is useless anyway.
    sd_notify::watchdog_enabled().map(|timeout| (timeout / 2).max(Duration::from_millis(1)))
}

/// Pings systemd's watchdog every [`watchdog_interval`] while `health()` is true, until
/// `shutdown` fires. Returns `None` (and spawns nothing) when the watchdog is off.
///
/// `health` should be cheap and say whether the service still does its job, e.g. that its
/// main loop turned recently. When it is false, pings are withheld and systemd restarts the
/// service once `WatchdogSec` passes; when the whole runtime is stuck, this task is too, which
/// is the other case the watchdog exists for. Must be called inside a Tokio runtime.
pub fn spawn_watchdog<F>(shutdown: CancellationToken, health: F) -> Option<JoinHandle<()>>
where
    F: Fn() -> bool + Send + Sync + 'static,
{
    let interval = watchdog_interval()?;
    tracing::debug!(?interval, "systemd watchdog enabled");
    Some(tokio::spawn(run_watchdog(
        interval,
        shutdown,
        Arc::new(health),
        // The send blocks while the manager's socket queue is full; keep that off the async
        // workers. The loop waits for it, so a manager that stops reading stops the pings.
        || async {
            let _ = tokio::task::spawn_blocking(|| send(&[NotifyState::Watchdog])).await;
        },
    )))
}

/// The watchdog loop, with the ping injected so tests can count pings.
async fn run_watchdog<F, P, Fut>(
    interval: Duration,
    shutdown: CancellationToken,
    health: Arc<F>,
    mut ping: P,
) where
    F: Fn() -> bool + Send + Sync + 'static,
    P: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut ticker = tokio::time::interval(interval);
    // After a stall, one ping is enough; a burst of catch-up pings would hide the stall's length.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut healthy = true;
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now_healthy = health();
        if now_healthy {
            ping().await;
        }
        match (healthy, now_healthy) {
            (true, false) => tracing::warn!(
                "health check failed: withholding watchdog pings, systemd restarts the \
                 service if it does not recover within WatchdogSec"
            ),
            (false, true) => tracing::info!("health check passes again: watchdog pings resumed"),
            _ => {}
        }
        healthy = now_healthy;
    }
}

fn send(states: &[NotifyState]) {
    if let Err(err) = sd_notify::notify(states) {
        let what: Vec<String> = states.iter().map(ToString::to_string).collect();
        tracing::warn!(
            error = %err,
            message = ?what,
            "cannot notify systemd through NOTIFY_SOCKET; check the unit's NotifyAccess="
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;
    use std::process::Command;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn watchdog_pings_only_while_healthy_and_stops_on_shutdown() {
        let interval = Duration::from_secs(5);
        let healthy = Arc::new(AtomicBool::new(true));
        let pings = Arc::new(AtomicUsize::new(0));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_watchdog(
            interval,
            shutdown.clone(),
            Arc::new({
                let healthy = healthy.clone();
                move || healthy.load(Ordering::SeqCst)
            }),
            {
                let pings = pings.clone();
                move || {
                    pings.fetch_add(1, Ordering::SeqCst);
                    std::future::ready(())
                }
            },
        ));

        // Time is paused: sleeping advances the clock exactly, so tick counts are exact.
        // Ticks at 0, 5, 10 s.
        tokio::time::sleep(interval * 2 + Duration::from_secs(1)).await;
        assert_eq!(pings.load(Ordering::SeqCst), 3);

        healthy.store(false, Ordering::SeqCst);
        tokio::time::sleep(interval * 3).await;
        assert_eq!(pings.load(Ordering::SeqCst), 3, "no ping while unhealthy");

        healthy.store(true, Ordering::SeqCst);
        tokio::time::sleep(interval * 2).await;
        assert_eq!(pings.load(Ordering::SeqCst), 5, "pings resume once healthy");

        shutdown.cancel();
        task.await.unwrap();
        tokio::time::sleep(interval * 3).await;
        assert_eq!(pings.load(Ordering::SeqCst), 5, "no ping after shutdown");
    }

    /// What [`notify_child`] does when run as a child process by the tests below.
    const CHILD_ENV: &str = "TALLY_SERVICE_TEST_CHILD";

    /// Not a test by itself: the body of a child process that the tests start with
    /// `NOTIFY_SOCKET` (and maybe `WATCHDOG_USEC`) set, because changing the environment of the
    /// multi-threaded test process itself would race with other tests.
    #[test]
    #[ignore = "run as a child process by the notify tests"]
    fn notify_child() {
        let Ok(mode) = std::env::var(CHILD_ENV) else {
            return;
        };
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            notify_status("starting\nup");
            notify_ready();
            let shutdown = CancellationToken::new();
            let checks = Arc::new(AtomicUsize::new(0));
            let healthy = mode == "healthy";
            let watchdog = spawn_watchdog(shutdown.clone(), {
                let checks = checks.clone();
                let shutdown = shutdown.clone();
                move || {
                    // Three health checks, then stop, as a drain would.
                    if checks.fetch_add(1, Ordering::SeqCst) + 1 >= 3 {
                        shutdown.cancel();
                    }
                    healthy
                }
            });
            match mode.as_str() {
                "no-watchdog" => assert!(watchdog.is_none()),
                _ => watchdog.expect("WATCHDOG_USEC is set").await.unwrap(),
            }
            notify_stopping();
        });
    }

    /// Runs [`notify_child`] in a child process with a notify socket and returns the
    /// datagrams it sent, in order.
    fn run_child(mode: &str, watchdog_usec: Option<&str>) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let socket_path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&socket_path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();

        let mut child = Command::new(std::env::current_exe().unwrap());
        child
            .args(["service::tests::notify_child", "--exact", "--ignored"])
            .env(CHILD_ENV, mode)
            .env("NOTIFY_SOCKET", &socket_path)
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID");
        if let Some(usec) = watchdog_usec {
            child.env("WATCHDOG_USEC", usec);
        }
        let output = child.output().unwrap();
        assert!(
            output.status.success(),
            "child failed: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );

        // The child has exited, so everything it sent is already queued on the socket.
        socket.set_nonblocking(true).unwrap();
        let mut messages = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            messages.push(String::from_utf8(buf[..n].to_vec()).unwrap());
        }
        messages
    }

    #[test]
    fn healthy_service_sends_status_ready_watchdog_pings_and_stopping() {
        let got = run_child("healthy", Some("20000"));
        assert_eq!(
            got,
            [
                "STATUS=starting up\n",
                "READY=1\n",
                "WATCHDOG=1\n",
                "WATCHDOG=1\n",
                "WATCHDOG=1\n",
                "STOPPING=1\n"
            ]
        );
    }

    #[test]
    fn unhealthy_service_sends_no_watchdog_ping() {
        let got = run_child("unhealthy", Some("20000"));
        assert_eq!(got, ["STATUS=starting up\n", "READY=1\n", "STOPPING=1\n"]);
    }

    #[test]
    fn without_watchdog_usec_no_watchdog_task_is_started() {
        let got = run_child("no-watchdog", None);
        assert_eq!(got, ["STATUS=starting up\n", "READY=1\n", "STOPPING=1\n"]);
    }
}
