//! The library side of the bench crate: the deterministic simulation of the
//! broker (`sim`), run by the `leasehold-sim` binary and by `tests/sim.rs`.

pub mod postgres;
pub mod processes;
pub mod sim;
pub mod stats;
