//! An instance's acquisition as one figure for a progress bar: the resource
//! furthest from its target (memory when they are level, since memory is
//! what an owner's work gives back slowest), acquired against target.

use super::tables::{status_text, vcpus_text};
use leasehold_api::{InstanceStatus, InstanceView, WorkloadView};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Memory,
    Cpu,
    Disk,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub resource: Resource,
    pub acquired: u64,
    pub target: u64,
}

impl Progress {
    /// Whole percent, never above 100; a zero target is complete.
    pub fn percent_complete(self) -> u64 {
        if self.target == 0 {
            return 100;
        }
        self.acquired.min(self.target) * 100 / self.target
    }

    /// `memory 3072/6144 MiB` or `cpu 0.50/1.00 vCPU`.
    pub fn amount_text(self) -> String {
        match self.resource {
            Resource::Memory => format!("memory {}/{} MiB", self.acquired, self.target),
            Resource::Cpu => format!(
                "cpu {}/{} vCPU",
                vcpus_text(self.acquired),
                vcpus_text(self.target)
            ),
            Resource::Disk => format!("disk {}/{} GiB", self.acquired, self.target),
        }
    }
}

/// Whether the instance holds all it needs (or no longer needs it).
pub fn is_settled(status: InstanceStatus) -> bool {
    matches!(
        status,
        InstanceStatus::Guaranteed | InstanceStatus::Running | InstanceStatus::Ended
    )
}

/// The least-complete resource the instance asks for; a settled instance is
/// shown complete.
pub fn least_complete(instance: &InstanceView) -> Progress {
    let acquired = instance.acquired;
    let target = instance.target;
    let candidates = [
        (Resource::Memory, acquired.memory_mib, target.memory_mib),
        (
            Resource::Cpu,
            acquired.cpu_centicores,
            target.cpu_centicores,
        ),
        (Resource::Disk, acquired.disk_gib, target.disk_gib),
    ];
    let mut least = Progress {
        resource: Resource::Memory,
        acquired: acquired.memory_mib,
        target: target.memory_mib,
    };
    let mut least_found = false;
    for (resource, got, want) in candidates.into_iter().filter(|(_, _, want)| *want > 0) {
        let got = got.min(want);
        // got/want < least.acquired/least.target, without division.
        let smaller = u128::from(got) * u128::from(least.target.max(1))
            < u128::from(least.acquired.min(least.target)) * u128::from(want);
        if !least_found || smaller {
            least = Progress {
                resource,
                acquired: got,
                target: want,
            };
            least_found = true;
        }
    }
    if is_settled(instance.status) {
        least.acquired = least.target;
    }
    least
}

/// One line about an instance: its name, then [`instance_detail`].
pub fn instance_line(instance: &InstanceView) -> String {
    format!("{}: {}", instance.name, instance_detail(instance))
}

/// An instance's status, its least-complete resource, where and when it is
/// expected to be complete (a progress bar's message: the bar names it).
pub fn instance_detail(instance: &InstanceView) -> String {
    let progress = least_complete(instance);
    let mut detail = format!(
        "{}, {} ({}%)",
        status_text(instance.status),
        progress.amount_text(),
        progress.percent_complete()
    );
    if let Some(host) = &instance.host_id {
        detail.push_str(&format!(" on {host}"));
    }
    if let (Some(expected), false) = (&instance.expected_completion, is_settled(instance.status)) {
        detail.push_str(&format!(", expected {expected}"));
    }
    detail
}

/// Every instance settled: the watch is over.
pub fn workload_settled(workload: &WorkloadView) -> bool {
    workload
        .instances
        .iter()
        .all(|instance| is_settled(instance.status))
}
