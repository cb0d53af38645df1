//! `tally proxy`: the LiteLLM-compatible OpenAI proxy (issue #2).

use tokio_util::sync::CancellationToken;

use crate::cli::ProxyArgs;

pub async fn run(_args: ProxyArgs, _shutdown: CancellationToken) -> anyhow::Result<()> {
    anyhow::bail!("tally proxy is not built yet")
}
