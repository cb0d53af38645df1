//! `tally ship` end to end and in parts: the real binary or the shipper's tasks against the Lago
//! emulator (or a scripted stub) on loopback, with real SQLite files.

mod e2e;
mod hostile;
mod ingest;
mod model;
mod sender;
mod stub;
