//! Identifiers. Hosts are named by their agent; a partition is named by its
//! host and its index in that host's partition table (FIG. 2, id 41), written
//! `host/index`; leases are numbered by the broker.

use crate::error::FieldError;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

pub type HostId = String;
pub type LeaseId = u64;

/// Longest host id accepted; bounded so ids fit in keys and log lines.
pub const HOST_ID_MAX_LEN: usize = 64;

/// Checks a host id: 1..=64 characters of `[a-z0-9-_.]`, starting alphanumeric.
pub fn validate_host_id(field: &str, host_id: &str) -> Result<(), FieldError> {
    if host_id.is_empty() || host_id.len() > HOST_ID_MAX_LEN {
        return Err(FieldError::new(
            field,
            format!("must be 1 to {HOST_ID_MAX_LEN} characters"),
        ));
    }
    let first_ok = host_id
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let all_ok = host_id
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    if !first_ok || !all_ok {
        return Err(FieldError::new(
            field,
            format!("'{host_id}' must use lowercase letters, digits, '-', '_' or '.', starting with a letter or digit"),
        ));
    }
    Ok(())
}

/// A partition's global name: its host and its index on that host.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
pub struct PartitionRef {
    pub host_id: HostId,
    pub index: u32,
}

impl PartitionRef {
    pub fn new(host_id: impl Into<String>, index: u32) -> Self {
        PartitionRef {
            host_id: host_id.into(),
            index,
        }
    }
}

impl fmt::Display for PartitionRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.host_id, self.index)
    }
}

impl FromStr for PartitionRef {
    type Err = FieldError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (host_id, index) = text.rsplit_once('/').ok_or_else(|| {
            FieldError::new(
                "partition",
                format!("'{text}' is not of the form HOST/INDEX"),
            )
        })?;
        validate_host_id("partition", host_id)?;
        let index = index.parse::<u32>().map_err(|_| {
            FieldError::new(
                "partition",
                format!("'{index}' in '{text}' is not a partition index"),
            )
        })?;
        Ok(PartitionRef::new(host_id, index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_ref_round_trips_and_rejects_garbage() {
        let parsed: PartitionRef = "alpha-1/3".parse().unwrap();
        assert_eq!(parsed, PartitionRef::new("alpha-1", 3));
        assert_eq!(parsed.to_string(), "alpha-1/3");
        for bad in ["", "alpha", "/3", "alpha/x", "Alpha/1", "alpha/-1", "a b/1"] {
            assert!(
                bad.parse::<PartitionRef>().is_err(),
                "{bad} should not parse"
            );
        }
    }
}
