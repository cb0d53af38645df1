//! Operator commands over the shipper's and proxy's modules: `replay`, `queue`, `demo`.

pub mod demo;
pub mod queue;
pub mod replay;
