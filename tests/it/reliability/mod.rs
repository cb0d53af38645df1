//! The fault suite (docs/reliability.md): crashes, outages, disk trouble, proxy kills, each run
//! fast here and long with `TALLY_FAULT_FULL=1` (scripts/fault-suite.sh).

mod crash;
mod disk;
mod outage;
pub mod proxy;
pub mod support;
