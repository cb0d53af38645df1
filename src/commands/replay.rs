//! `tally replay` (issue #4).

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

pub async fn run(
    _args: crate::cli::ReplayArgs,
    _shutdown: CancellationToken,
) -> anyhow::Result<ExitCode> {
    anyhow::bail!("tally replay is not built yet")
}
