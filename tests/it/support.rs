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

/// Calls `probe` until it returns `Some`, or panics with `what` after `timeout`. For eventual
/// conditions: no fixed sleeps as synchronisation.
pub fn wait_for<T>(
    what: &str,
    timeout: std::time::Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A small deterministic PRNG (SplitMix64) for seeded model-based tests.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}
