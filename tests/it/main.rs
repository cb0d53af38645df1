//! Integration tests: one binary, one submodule per area. Every server binds port 0.

mod proxy;
mod support;
