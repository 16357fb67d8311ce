//! `GET /v1/broker/status`: whether a broker is the active one of its
//! database or a standby (issue 11: several broker processes on one
//! PostgreSQL database, one active at a time).

use serde::{Deserialize, Serialize};

/// What a broker process is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BrokerRole {
    /// Holds the leadership lease: serves reads and writes.
    Active,
    /// Waits for the active broker's lease to lapse; answers 503 `standby`.
    Standby,
    /// Lost the leadership (another broker took over); exits so that its
    /// supervisor starts it again as a standby.
    SteppedDown,
}

impl BrokerRole {
    pub fn as_str(self) -> &'static str {
        match self {
            BrokerRole::Active => "active",
            BrokerRole::Standby => "standby",
            BrokerRole::SteppedDown => "stepped_down",
        }
    }
}

/// The answer of `GET /v1/broker/status` (no token needed: it says nothing
/// about the market).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BrokerStatus {
    pub role: BrokerRole,
    /// This broker's leadership epoch when active; otherwise the epoch of
    /// the last holder it saw (0: none yet).
    pub epoch: u64,
    /// When this broker became active or began standing by, in ms since the
    /// Unix epoch (wall clock).
    pub since_ms: u64,
    /// This broker's URL as it announces itself.
    pub url: String,
    /// The URL of the broker holding the leadership, when known.
    pub active_url: Option<String>,
    /// How long a leadership lasts without renewal, in ms: a standby takes
    /// over at most this long (plus one retry interval and a state load)
    /// after the active broker dies.
    pub leadership_ttl_ms: u64,
    /// The other brokers of this database (`--peer`).
    pub peers: Vec<String>,
}
