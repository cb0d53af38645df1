//! `tally ship`: tail the spend log, dedupe in SQLite, deliver to Lago (issue #3).
//!
//! - [`tail`]: follows the live spend log across rotation and truncation, yielding lines and
//!   file positions.

pub mod tail;

use tokio_util::sync::CancellationToken;

use crate::cli::ShipArgs;

pub async fn run(_args: ShipArgs, _shutdown: CancellationToken) -> anyhow::Result<()> {
    anyhow::bail!("tally ship is not built yet")
}
