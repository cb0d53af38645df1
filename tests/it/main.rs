//! Integration tests: one binary, one submodule per area. Every server binds port 0.

mod lago_emulator;
mod proxy;
mod support;
mod tail;
