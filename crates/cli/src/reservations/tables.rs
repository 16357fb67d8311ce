//! Readable tables of seed 003's documents: pools and their instance links
//! (FIG. 3, 6), host capacity (FIG. 5), warnings (FIG. 14) and workloads
//! (FIG. 4). CPU is shown in vCPUs with two decimals (from centicores),
//! memory in MiB, disk in GiB, times in RFC 3339.

use leasehold_api::{
    HostCapacityView, InstanceStatus, InstanceView, PoolList, WarningView, WorkloadView,
};
use leasehold_core::reservation::{Capacity, PoolPhase, RuleKind};

/// Centicores as vCPUs with two decimals: 150 → `1.50`.
pub fn vcpus_text(cpu_centicores: u64) -> String {
    format!("{}.{:02}", cpu_centicores / 100, cpu_centicores % 100)
}

/// A capacity as `vCPU/MiB/GiB`, the unit line under each table says so.
pub fn capacity_text(capacity: Capacity) -> String {
    format!(
        "{}/{}/{}",
        vcpus_text(capacity.cpu_centicores),
        capacity.memory_mib,
        capacity.disk_gib
    )
}

fn optional_capacity_text(capacity: Option<Capacity>) -> String {
    capacity.map(capacity_text).unwrap_or_else(|| "-".into())
}

fn optional_text(text: Option<&str>) -> String {
    text.unwrap_or("-").to_string()
}

const UNITS_NOTE: &str = "(capacities as vCPU/MiB/GiB)";

/// Left-aligned columns two spaces apart, each as wide as its widest cell.
pub fn aligned(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let header_cells: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header_cells).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        text.push_str(cells.join("  ").trim_end());
        text.push('\n');
    }
    text
}

pub fn phase_text(phase: PoolPhase) -> &'static str {
    match phase {
        PoolPhase::Acquiring => "acquiring",
        PoolPhase::Chosen => "chosen",
        PoolPhase::HandedOver => "handed_over",
    }
}

pub fn status_text(status: InstanceStatus) -> &'static str {
    match status {
        InstanceStatus::Waiting => "waiting",
        InstanceStatus::Acquiring => "acquiring",
        InstanceStatus::Guaranteed => "guaranteed",
        InstanceStatus::Running => "running",
        InstanceStatus::Ended => "ended",
    }
}

/// FIG. 3 (one row per pool), then FIG. 6 (instance → pool).
pub fn pool_list_text(list: &PoolList) -> String {
    if list.pools.is_empty() && list.links.is_empty() {
        return "no acquisition pools\n".into();
    }
    let rows: Vec<Vec<String>> = list
        .pools
        .iter()
        .map(|pool| {
            vec![
                pool.pool_id.to_string(),
                pool.host_id.clone(),
                pool.workload.clone(),
                pool.instances.join(","),
                phase_text(pool.phase).into(),
                if pool.acquiring { "on" } else { "off" }.into(),
                capacity_text(pool.allocated),
                capacity_text(pool.requested),
                capacity_text(pool.acquired),
                capacity_text(pool.target),
                optional_text(pool.sampled_at.as_deref()),
            ]
        })
        .collect();
    let mut text = aligned(
        &[
            "POOL",
            "HOST",
            "WORKLOAD",
            "INSTANCES",
            "PHASE",
            "ACQUIRING",
            "ALLOCATED",
            "REQUESTED",
            "ACQUIRED",
            "TARGET",
            "SAMPLED",
        ],
        &rows,
    );
    text.push_str(UNITS_NOTE);
    text.push_str("\n\n");
    let links: Vec<Vec<String>> = list
        .links
        .iter()
        .map(|link| {
            vec![
                link.instance.clone(),
                link.workload.clone(),
                link.pool_id.to_string(),
                link.host_id.clone(),
            ]
        })
        .collect();
    text.push_str(&aligned(&["INSTANCE", "WORKLOAD", "POOL", "HOST"], &links));
    text
}

/// FIG. 5: one row per host.
pub fn host_capacity_text(hosts: &[HostCapacityView]) -> String {
    if hosts.is_empty() {
        return "no hosts\n".into();
    }
    let rows: Vec<Vec<String>> = hosts
        .iter()
        .map(|host| {
            vec![
                host.host_id.clone(),
                capacity_text(host.total),
                capacity_text(host.owner_share),
                optional_capacity_text(host.owner_used),
                capacity_text(host.lent),
                optional_capacity_text(host.available),
                capacity_text(host.held),
                optional_capacity_text(host.not_yet_acquired),
                optional_text(host.sampled_at.as_deref()),
            ]
        })
        .collect();
    let mut text = aligned(
        &[
            "HOST",
            "TOTAL",
            "OWNER_SHARE",
            "OWNER_USED",
            "LENT",
            "AVAILABLE",
            "HELD",
            "NOT_YET_ACQUIRED",
            "SAMPLED",
        ],
        &rows,
    );
    text.push_str(UNITS_NOTE);
    text.push('\n');
    text
}

/// FIG. 14: each warning with what would fix it.
pub fn warnings_text(warnings: &[WarningView]) -> String {
    if warnings.is_empty() {
        return "no warnings: every instance is on course for its start\n".into();
    }
    let mut text = String::new();
    for warning in warnings {
        let earliest = warning
            .earliest_start
            .as_deref()
            .unwrap_or("none on the current trend");
        let largest_where = warning
            .largest_guarantee_host
            .as_deref()
            .map(|host| format!(" on {host}"))
            .unwrap_or_default();
        text.push_str(&format!(
            "{} [{}] {}: {}\n  target {} by {}\n  earliest start reaching it: {}\n  largest guarantee by {}: {}{}\n",
            warning.workload,
            warning.instances.join(","),
            serde_plain_name(&warning.reason),
            warning.message,
            capacity_text(warning.target),
            warning.start,
            earliest,
            warning.start,
            capacity_text(warning.largest_guarantee),
            largest_where,
        ));
    }
    text.push_str(UNITS_NOTE);
    text.push('\n');
    text
}

/// An enum's wire name (`not_by_start`), so tables and JSON agree.
fn serde_plain_name<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => "-".into(),
    }
}

/// How many instances are in each status: `1 acquiring, 2 guaranteed`.
fn status_counts(instances: &[InstanceView]) -> String {
    let order = [
        InstanceStatus::Waiting,
        InstanceStatus::Acquiring,
        InstanceStatus::Guaranteed,
        InstanceStatus::Running,
        InstanceStatus::Ended,
    ];
    let parts: Vec<String> = order
        .iter()
        .filter_map(|status| {
            let count = instances.iter().filter(|i| i.status == *status).count();
            (count > 0).then(|| format!("{count} {}", status_text(*status)))
        })
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

pub fn workload_list_text(workloads: &[WorkloadView]) -> String {
    if workloads.is_empty() {
        return "no workloads; declare one with `leasehold workload apply FILE`\n".into();
    }
    let rows: Vec<Vec<String>> = workloads
        .iter()
        .map(|workload| {
            vec![
                workload.name.clone(),
                workload.owner.clone(),
                workload.priority.to_string(),
                workload.start.clone(),
                workload.end.clone(),
                workload.instances.len().to_string(),
                status_counts(&workload.instances),
            ]
        })
        .collect();
    aligned(
        &[
            "NAME",
            "OWNER",
            "PRIORITY",
            "START",
            "END",
            "INSTANCES",
            "STATUS",
        ],
        &rows,
    )
}

/// A workload's header, its instances and its rules.
pub fn workload_text(workload: &WorkloadView) -> String {
    let mut text = format!(
        "workload {} (owner {}, priority {}) from {} to {}\n\n",
        workload.name, workload.owner, workload.priority, workload.start, workload.end
    );
    let rows: Vec<Vec<String>> = workload
        .instances
        .iter()
        .map(|instance| {
            vec![
                instance.name.clone(),
                status_text(instance.status).into(),
                optional_text(instance.host_id.as_deref()),
                instance
                    .pool_id
                    .map(|id| id.to_string())
                    .unwrap_or_else(|| "-".into()),
                capacity_text(instance.acquired),
                capacity_text(instance.target),
                format!(
                    "{}%",
                    super::progress::least_complete(instance).percent_complete()
                ),
                optional_text(instance.expected_completion.as_deref()),
            ]
        })
        .collect();
    text.push_str(&aligned(
        &[
            "INSTANCE", "STATUS", "HOST", "POOL", "ACQUIRED", "TARGET", "PROGRESS", "EXPECTED",
        ],
        &rows,
    ));
    text.push_str(UNITS_NOTE);
    text.push('\n');
    for rule in &workload.rules {
        let kind = match rule.kind {
            RuleKind::Spread => "spread (each on a different host)",
            RuleKind::Pack => "pack (all on one host)",
        };
        text.push_str(&format!("rule: {kind}: {}\n", rule.instances.join(", ")));
    }
    text
}
