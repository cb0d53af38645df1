//! Operator commands over the shipper's and proxy's modules: `replay`, `queue`, `demo`.
//!
//! - [`replay`]: feeds historical spend logs (tally's or LiteLLM's) through the shipper's parsing,
//!   dedupe and outbox.
//! - [`queue`]: inspects and acts on the shipper's outbox.
//! - [`audit`]: checks acked events against Lago (present, same code, subscription, timestamp).
//! - [`demo`]: the whole pipeline in one process on loopback.
//! - [`keys`]: `tally keys list|create|delete|import` over the proxy's key store.
//! - [`output`]: tables, JSON and exit codes shared by the commands.
//! - [`settings`]: the command line → the services' validated settings (`tally ship`,
//!   `tally lago-emulator`, and the Lago/tuning parts replay and audit use).

pub mod audit;
pub mod demo;
pub mod keys;
pub mod output;
pub mod queue;
pub mod replay;
pub mod settings;
