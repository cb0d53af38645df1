//! `tally demo` (issue #4).

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

pub async fn run(
    _args: crate::cli::DemoArgs,
    _shutdown: CancellationToken,
) -> anyhow::Result<ExitCode> {
    anyhow::bail!("tally demo is not built yet")
}
