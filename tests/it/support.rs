//! Shared helpers for the integration tests.

#![allow(dead_code)]

use std::path::PathBuf;

/// The `tally` binary cargo built for these tests.
pub fn tally_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tally"))
}
