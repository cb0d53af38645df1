//! `tally queue` (issue #4).

use std::process::ExitCode;

pub async fn run(_args: crate::cli::QueueArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("tally queue is not built yet")
}
