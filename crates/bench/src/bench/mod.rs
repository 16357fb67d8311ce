//! The parts of `leasehold-bench`: the broker as a real process, a
//! throw-away PostgreSQL, filling the market (over HTTP or straight into
//! the store), the borrowers' process, and what /proc says.

pub mod borrowers;
pub mod broker_process;
pub mod costs;
pub mod fill;
pub use leasehold_bench::postgres;
pub mod procfs;
pub mod seed;
