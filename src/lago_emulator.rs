//! A local Lago events API that answers like the real server (shared/lago/BEHAVIOUR.md).

use tokio_util::sync::CancellationToken;

use crate::cli::LagoEmulatorArgs;

pub async fn run(_args: LagoEmulatorArgs, _shutdown: CancellationToken) -> anyhow::Result<()> {
    anyhow::bail!("tally lago-emulator is not built yet")
}
