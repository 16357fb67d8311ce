//! Wire types of seed 003's reservations: workload files, pools, host
//! capacity, warnings and the agents' samples. Times on the wire are RFC 3339
//! (UTC) beside their milliseconds, so scripts need no date parser.

use leasehold_core::reservation::planner::PlanPolicy;
use leasehold_core::reservation::warnings::WarningReason;
use leasehold_core::reservation::{Capacity, InstanceSpec, PlacementRule, PoolPhase};
use serde::{Deserialize, Serialize};

/// A workload as users write it (TOML or JSON) and as `POST /v1/workloads`
/// takes it: `[[instance]]` and `[[rule]]` tables, `start`/`end` RFC 3339.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkloadFile {
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub name: String,
    #[serde(default)]
    pub priority: i64,
    /// RFC 3339, e.g. `2026-12-01T09:00:00Z`.
    #[schema(format = DateTime)]
    pub start: String,
    /// RFC 3339; after `start`.
    #[schema(format = DateTime)]
    pub end: String,
    #[serde(rename = "instance", alias = "instances", default)]
    pub instances: Vec<InstanceSpec>,
    #[serde(rename = "rule", alias = "rules", default)]
    pub rules: Vec<PlacementRule>,
}

/// What an instance of a workload is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InstanceStatus {
    /// No pool yet: waiting for a host with room.
    Waiting,
    /// A pool is gathering its capacity.
    Acquiring,
    /// Its whole target is held on a chosen host, waiting for the start.
    Guaranteed,
    /// Started: the capacity is the instance's.
    Running,
    /// Past its workload's end.
    Ended,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstanceView {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    pub status: InstanceStatus,
    /// The pool's host: the chosen one, or the best-progressing candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_id: Option<u64>,
    /// Of the demand (the instance, or its pack group) on that host.
    pub acquired: Capacity,
    pub target: Capacity,
    /// When the forecast says the target will be held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_completion: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_completion_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkloadView {
    pub name: String,
    pub owner: String,
    pub priority: i64,
    pub start: String,
    pub end: String,
    pub start_ms: u64,
    pub end_ms: u64,
    pub instances: Vec<InstanceView>,
    pub rules: Vec<PlacementRule>,
}

/// A row of FIG. 3 for a pool, with its links to instances (FIG. 6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolView {
    pub pool_id: u64,
    pub host_id: String,
    pub workload: String,
    pub instances: Vec<String>,
    pub phase: PoolPhase,
    /// The acquisition flag (206).
    pub acquiring: bool,
    pub allocated: Capacity,
    pub requested: Capacity,
    pub acquired: Capacity,
    pub target: Capacity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampled_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampled_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_completion: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_completion_ms: Option<u64>,
}

/// The link table of FIG. 6: instance → pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstancePoolLink {
    pub instance: String,
    pub workload: String,
    pub pool_id: u64,
    pub host_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolList {
    pub pools: Vec<PoolView>,
    pub links: Vec<InstancePoolLink>,
}

/// A row of FIG. 5: a host's capacity for pools and instances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostCapacityView {
    pub host_id: String,
    pub total: Capacity,
    pub owner_share: Capacity,
    /// Taken by the partitions it lends in the market.
    pub lent: Capacity,
    /// Free of the owner's work and the partitions at the last sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available: Option<Capacity>,
    /// Held by pools and started instances.
    pub held: Capacity,
    /// Available and in no pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_yet_acquired: Option<Capacity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_used: Option<Capacity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampled_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampled_at_ms: Option<u64>,
    /// Powered down by power saving (FIG. 17): no new pools go there.
    #[serde(default)]
    pub powered_down: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WarningView {
    pub workload: String,
    pub instances: Vec<String>,
    pub reason: WarningReason,
    pub message: String,
    pub target: Capacity,
    pub start: String,
    pub start_ms: u64,
    /// The earliest start at which the target would be held; absent when
    /// no trend reaches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub earliest_start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub earliest_start_ms: Option<u64>,
    /// The largest guarantee reachable by the requested start, and where.
    pub largest_guarantee: Capacity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub largest_guarantee_host: Option<String>,
}

/// An agent's sample of its host (`POST /v1/hosts/{id}/samples`): what the
/// owner's own work uses now. The broker stamps it with its own clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostSampleRequest {
    pub owner_used: Capacity,
}

/// The broker's answer to a sample: what pools and started instances hold
/// on the host (the owner's work must stay out of it), and when to sample
/// next (sooner as a start on the host nears).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostSampleAnswer {
    pub guaranteed: Capacity,
    pub next_sample_after_ms: u64,
}

/// `POST /v1/instances/{name}/migrate`: move a placed instance (FIG. 15).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    pub to: String,
}

/// `POST /v1/power/save`: drain the least-used host that may go (FIG. 17);
/// a host holding a pool whose start is within `horizon_secs` (default an
/// hour) stays up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PowerSaveRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub horizon_secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PowerSaveView {
    /// The host being drained, or none when no host may go.
    pub host_id: Option<String>,
    pub instances_moving: usize,
}

/// The answer of `POST /v1/plan`: a planning round run now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlanRoundView {
    pub changes: usize,
    pub policy: PlanPolicy,
}

/// `ms` since the epoch as RFC 3339 UTC with seconds, e.g.
/// `2026-11-30T01:02:03Z`.
pub fn rfc3339_from_ms(ms: u64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(time).to_string()
}

/// An RFC 3339 time as milliseconds since the epoch; the problem otherwise.
pub fn ms_from_rfc3339(text: &str) -> Result<u64, String> {
    let time = humantime::parse_rfc3339_weak(text.trim()).map_err(|error| {
        format!("`{text}` is not an RFC 3339 time such as 2026-12-01T09:00:00Z ({error})")
    })?;
    let since = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("`{text}` is before 1970"))?;
    u64::try_from(since.as_millis()).map_err(|_| format!("`{text}` is too far ahead"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_and_bad_ones_are_explained() {
        let ms = ms_from_rfc3339("2026-12-01T09:00:00Z").unwrap();
        assert_eq!(rfc3339_from_ms(ms), "2026-12-01T09:00:00Z");
        assert!(ms_from_rfc3339("tomorrow")
            .unwrap_err()
            .contains("RFC 3339"));
    }

    #[test]
    fn a_workload_file_reads_instance_and_rule_tables() {
        let file: WorkloadFile = serde_json::from_value(serde_json::json!({
            "name": "w", "priority": 3, "start": "2026-12-01T09:00:00Z", "end": "2026-12-01T10:00:00Z",
            "instance": [{"name": "a", "vcpus": 1, "memory_mib": 512, "disk_gib": 1}],
            "rule": [{"kind": "spread", "instances": ["a"]}]
        }))
        .unwrap();
        assert_eq!(file.instances[0].name, "a");
        assert_eq!(file.rules.len(), 1);
    }
}
