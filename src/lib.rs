//! tally bills LLM usage to Lago, exactly once.
//!
//! Data flows one way: **proxy → spend log → tail → outbox → Lago**. The spend log (JSON lines)
//! is the only thing the two services share; see `docs/architecture.md`.
//!
//! The map:
//! - [`cli`]: the command-line surface (clap definitions, no I/O).
//! - [`logging`]: tracing setup (stderr, text or JSON, `RUST_LOG`).
//! - [`spend`]: the spend-log record — the contract between proxy and shipper: type, parse,
//!   validate, serialize.
//! - [`proxy`]: `tally proxy`, the LiteLLM-compatible OpenAI proxy that appends one record per
//!   completed request to the spend log.
//! - [`ship`]: `tally ship`, which tails the spend log into a SQLite outbox and delivers batched
//!   events to Lago with retries.
//! - [`lago_emulator`]: a local Lago events API that answers like the real server, with fault
//!   injection for tests.
//! - [`service`]: running under systemd: readiness, status and watchdog (sd_notify).
//! - [`metrics`]: Prometheus metrics of the proxy and the shipper, and the `/metrics` endpoint.
//! - [`text`]: text from a record or a peer made safe for a terminal or a log line.
//! - [`commands`]: operator commands over the same modules: `replay`, `queue`, `demo`.

pub mod cli;
pub mod commands;
pub mod lago_emulator;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod service;
pub mod ship;
pub mod spend;
pub mod text;
