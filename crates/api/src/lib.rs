//! The wire types of the broker and agent HTTP APIs, and the one typed client
//! used by the CLI, the agent (to talk to the broker), the broker (to notify
//! agents) and the tests.

pub mod broker_status;
pub mod client;
pub mod reservations;
pub mod rights;
pub mod types;

pub use client::{ApiError, Client, ServerTrust};
pub use reservations::*;
pub use types::*;
