//! The states of a job on an agent: on the wire (`leasehold_api` re-exports
//! [`JobState`]), in the agent's job table and in the CLI, named here once.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    Succeeded,
    Failed,
    TimedOut,
    /// Cancelled by its borrower, or stopped because its lease ended.
    Cancelled,
    /// The agent restarted while the job ran; its outcome is unknown.
    Lost,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::TimedOut,
        JobState::Cancelled,
        JobState::Lost,
    ];

    /// The name on the wire and in the agent's job table.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::TimedOut => "timed_out",
            JobState::Cancelled => "cancelled",
            JobState::Lost => "lost",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a job state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a job state")]
pub struct UnknownJobState(pub String);

impl FromStr for JobState {
    type Err = UnknownJobState;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
            .ok_or_else(|| UnknownJobState(text.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_the_wire() {
        for state in JobState::ALL {
            assert_eq!(state.as_str().parse::<JobState>(), Ok(state));
            let wire = serde_json::to_value(state).unwrap();
            assert_eq!(wire, serde_json::Value::String(state.as_str().into()));
        }
        assert_eq!(
            "done".parse::<JobState>(),
            Err(UnknownJobState("done".into()))
        );
    }
}
