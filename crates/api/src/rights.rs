//! Wire types of seed 004's usage rights: the share group's table as a
//! gatekeeper (the broker) stores it for the managers, and the orders a
//! manager (the agent) takes from admins, lenders and other managers.

use leasehold_core::rights::{ShareGroup, OWNER_SHARE_PARTITION};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A group's table and the version a compare-and-swap must name.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShareGroupDocument {
    pub group: ShareGroup,
    pub version: u64,
    /// True when a manager answered from its own copy because the group's
    /// store was unreachable.
    #[serde(default)]
    pub stale: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PutShareGroupRequest {
    pub group: ShareGroup,
    /// The version read (0: the group is new); another writer's version
    /// in between makes the write answer 409 `version_conflict`.
    pub expected_version: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PutShareGroupAnswer {
    pub version: u64,
}

/// Takes or renews a fenced lease of the group (`primary`, or a host's
/// manager `host.H`).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GroupLeaseRequest {
    #[schema(min_length = 1, max_length = 128)]
    pub holder: String,
    #[schema(minimum = 1, maximum = 60000)]
    pub ttl_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GroupLeaseAnswer {
    /// The epoch the caller holds it at; `None` while another holder has it.
    pub epoch: Option<u64>,
}

/// Who held a group's fenced lease last, at which epoch, until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GroupLeaseHolder {
    pub holder: String,
    pub epoch: u64,
    pub expires_at_ms: u64,
}

fn owner_share() -> u32 {
    OWNER_SHARE_PARTITION
}

/// More rights for a partition (FIG. 5), asked of its host's manager.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RightsRequestBody {
    pub host_id: String,
    pub partition: u32,
    pub modules: u32,
}

/// Rights a partition gives back to its host's owner share, or an admin
/// revokes.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RightsSlotBody {
    pub host_id: String,
    #[serde(default = "owner_share")]
    pub partition: u32,
    pub modules: u32,
}

/// An explicit move of permanent rights from one partition to another.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RightsTransferBody {
    pub from_host: String,
    #[serde(default = "owner_share")]
    pub from_partition: u32,
    pub to_host: String,
    #[serde(default = "owner_share")]
    pub to_partition: u32,
    pub modules: u32,
}

/// Rights bought for a partition (permanent, or until `expires_at_ms`).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RightsGrantBody {
    pub host_id: String,
    #[serde(default = "owner_share")]
    pub partition: u32,
    pub modules: u32,
    #[serde(default)]
    pub expires_at_ms: Option<u64>,
}

/// What an order did.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RightsOrderAnswer {
    /// Transfers committed (a request or a transfer), by id.
    pub committed: Vec<u64>,
    /// Transfers aborted because a donor could not confirm.
    pub aborted: Vec<u64>,
    /// The table version the order was decided on.
    pub version: u64,
    /// Loans inside the host (seed 004, FIG. 4B), by the host's number:
    /// committed in its manager's own database, its modules switched
    /// already; the group's table shows each as a committed transfer
    /// once the manager has published it (within moments).
    #[serde(default)]
    pub lent_inside_host: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GroupAddBody {
    pub host_id: String,
    /// The host's modules (whole cores); its manager fills its rows when
    /// it joins.
    pub modules: u32,
}

/// A manager's answer to "apply the table": the version it applied and
/// the modules active on its host now, by partition.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RightsSyncAnswer {
    pub host_id: String,
    pub version: u64,
    pub active: BTreeMap<u32, u32>,
}

/// FIG. 4A as rows, for `leasehold rights show`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RightsTableView {
    pub group: String,
    pub mode: String,
    /// The primary manager's host and epoch (centralized groups).
    pub primary: Option<String>,
    pub primary_epoch: u64,
    pub version: u64,
    pub stale: bool,
    pub rows: Vec<RightsRowView>,
    /// Rights seized from a dead host that no partition could take yet.
    pub unassigned: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RightsRowView {
    pub host_id: String,
    /// 0 is the owner share.
    pub partition: u32,
    /// Permanent plus unexpired temporary rights.
    pub rights_owned: u32,
    pub rights_temporary: u32,
    pub modules_active: u32,
    pub modules_inactive: u32,
    pub workload_percent: u32,
    pub manager_url: String,
}

impl RightsTableView {
    /// The rows of `document` (of `host_id` only, when given) at `now_ms`.
    pub fn of(document: &ShareGroupDocument, host_id: Option<&str>, now_ms: u64) -> Self {
        let group = &document.group;
        let rows = group
            .hosts
            .iter()
            .filter(|(id, _)| host_id.is_none_or(|h| h == id.as_str()))
            .flat_map(|(id, host)| {
                host.partitions.iter().map(move |(index, p)| {
                    let owned = p.rights(now_ms);
                    RightsRowView {
                        host_id: id.clone(),
                        partition: *index,
                        rights_owned: owned,
                        rights_temporary: owned - p.permanent.min(owned),
                        modules_active: p.active,
                        modules_inactive: p.inactive(),
                        workload_percent: p.workload_percent,
                        manager_url: host.manager_url.clone(),
                    }
                })
            })
            .collect();
        RightsTableView {
            group: group.name.clone(),
            mode: format!("{:?}", group.mode).to_lowercase(),
            primary: group.primary_host.clone(),
            primary_epoch: group.primary_epoch,
            version: document.version,
            stale: document.stale,
            rows,
            unassigned: group.unassigned,
        }
    }
}
