//! Integration tests: one binary, one submodule per area. Every server binds port 0.

mod support;
mod tail;
