//! Integration tests: one binary, one submodule per area. Every server binds port 0.

mod commands;
mod lago_emulator;
mod proxy;
mod ship_ingest;
mod ship_sender;
mod ship_stub;
mod support;
mod tail;
