//! The pure domain of leasehold.
//!
//! Everything here is a decision or a value: terms and requirements, matching,
//! the lease state machine, billing, the double-entry ledger and lease keys.
//! Nothing here performs I/O, reads the clock or draws randomness: callers pass
//! the time (`now_ms`) and the key material in, so the same code runs under a
//! simulated clock in tests and in the fleet simulator.

pub mod calendar;
pub mod command;
pub mod error;
pub mod fence;
pub mod ids;
pub mod image_ref;
pub mod job;
pub mod key;
pub mod lease;
pub mod ledger;
pub mod matching;
pub mod money;
pub mod reservation;
pub mod rights;
pub mod role;
pub mod share;
pub mod table;
pub mod terms;

pub use error::{CoreError, FieldError};
pub use ids::{HostId, LeaseId, PartitionRef};
pub use role::Role;
pub use terms::{HostCapacity, Isolation, Requirements, Terms};
