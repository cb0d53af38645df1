//! Shared helpers for the integration tests.

#![allow(dead_code)]

use std::path::PathBuf;

/// The `tally` binary cargo built for these tests.
pub fn tally_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tally"))
}

/// A Lago emulator on 127.0.0.1, port 0, serving in the background of the current runtime.
pub async fn spawn_lago_emulator(
    config: tally::lago_emulator::EmulatorConfig,
) -> tally::lago_emulator::EmulatorHandle {
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], 0).into();
    tally::lago_emulator::spawn(config, addr)
        .await
        .expect("the Lago emulator binds a free loopback port")
}

/// Polls `condition` every 20 ms until it holds; panics naming `what` after `timeout`.
/// Generous timeouts are fine: this only waits as long as the condition takes.
pub async fn poll_until<F, Fut>(what: &str, timeout: std::time::Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
