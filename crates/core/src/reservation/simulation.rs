//! A reservation scenario run on simulated time, purely: hosts with owner-load
//! traces, workloads applied or deleted at given times, and a policy. At each
//! interval every host is sampled (the owner's use clamped so it never takes
//! what pools hold, as the agent's limits would), a planning round runs and
//! its changes are applied. The scenario tests, `leasehold simulate` and the
//! planner benchmark all drive the planner through it, so one scenario gives
//! the same tables everywhere.

use super::capacity::Capacity;
use super::planner::{plan_round, PlanHost, PlanPolicy};
use super::warnings::{warnings, Warning};
use super::{HostSample, ReservationBook, ReservationChange, SampleWindow};
use std::collections::BTreeMap;

/// A host of a scenario: its size, the owner's share, the partitions it lends
/// and what the owner's own work wants over time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimulatedHost {
    pub host_id: String,
    pub total: Capacity,
    pub owner_share: Capacity,
    pub lent: Capacity,
    /// (from `at_ms`, the owner wants this), sorted by time; each holds until
    /// the next; nothing before the first.
    pub owner_load: Vec<(u64, Capacity)>,
    pub window: SampleWindow,
}

impl SimulatedHost {
    pub fn new(host_id: impl Into<String>, total: Capacity, owner_share: Capacity) -> Self {
        SimulatedHost {
            host_id: host_id.into(),
            total,
            owner_share,
            lent: Capacity::ZERO,
            owner_load: Vec::new(),
            window: SampleWindow::default(),
        }
    }

    /// The host's capacity less the owner's share.
    pub fn lendable(&self) -> Capacity {
        self.total.saturating_sub(self.owner_share)
    }

    /// What the owner's work wants at `at_ms`, per its trace.
    pub fn owner_wanted_at(&self, at_ms: u64) -> Capacity {
        // The trace is sorted: the last entry at or before `at_ms` holds.
        let after = self.owner_load.partition_point(|(from, _)| *from <= at_ms);
        match after {
            0 => Capacity::ZERO,
            n => self.owner_load[n - 1].1,
        }
    }

    /// The sample at `at_ms` when pools hold `held` on the host: the owner
    /// gets what it wants but never what pools hold; available is the total
    /// less the owner's use (never less than its share) less lent partitions.
    pub fn sample_at(&self, at_ms: u64, held: Capacity) -> HostSample {
        let most_for_owner = self.total.saturating_sub(self.lent).saturating_sub(held);
        let owner_used = self.owner_wanted_at(at_ms).min(most_for_owner);
        HostSample {
            at_ms,
            owner_used,
            available: self
                .total
                .saturating_sub(owner_used.max(self.owner_share))
                .saturating_sub(self.lent),
        }
    }

    pub fn plan_host(&self) -> PlanHost<'_> {
        PlanHost {
            host_id: &self.host_id,
            lendable: self.lendable(),
            lent: self.lent,
            window: Some(&self.window),
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimulationStep {
    pub at_ms: u64,
    /// Capacity held per host before the round (after the scheduled changes).
    pub held_before: BTreeMap<String, Capacity>,
    /// The round's changes, as applied.
    pub changes: Vec<ReservationChange>,
}

/// A scenario: the book, the hosts, the policy and the simulated clock.
#[derive(Debug, Clone)]
pub struct Simulation {
    pub book: ReservationBook,
    pub hosts: Vec<SimulatedHost>,
    pub policy: PlanPolicy,
    pub now_ms: u64,
    /// Changes the scenario makes at given times (workloads applied or
    /// deleted), applied at the first step at or after their time.
    scheduled: BTreeMap<u64, Vec<ReservationChange>>,
}

impl Simulation {
    pub fn new(hosts: Vec<SimulatedHost>, policy: PlanPolicy, now_ms: u64) -> Self {
        Simulation {
            book: ReservationBook::default(),
            hosts,
            policy,
            now_ms,
            scheduled: BTreeMap::new(),
        }
    }

    /// Applies `change` at the first step at or after `at_ms` (before that
    /// step's samples and round); changes due together keep their order.
    pub fn schedule(&mut self, at_ms: u64, change: ReservationChange) {
        self.scheduled.entry(at_ms).or_default().push(change);
    }

    pub fn plan_hosts(&self) -> Vec<PlanHost<'_>> {
        self.hosts.iter().map(SimulatedHost::plan_host).collect()
    }

    fn apply_scheduled(&mut self) {
        let later = self.scheduled.split_off(&self.now_ms.saturating_add(1));
        let due = std::mem::replace(&mut self.scheduled, later);
        for change in due.into_values().flatten() {
            self.book.apply(&change);
        }
    }

    /// Every host takes a sample at the current time; answers what pools
    /// held on each host then.
    pub fn sample_hosts(&mut self) -> BTreeMap<String, Capacity> {
        let held: BTreeMap<String, Capacity> = self
            .book
            .held_by_host()
            .into_iter()
            .map(|(host, held)| (host.to_string(), held))
            .collect();
        let samples: Vec<HostSample> = self
            .hosts
            .iter()
            .map(|host| {
                let held_here = held.get(host.host_id.as_str()).copied();
                host.sample_at(self.now_ms, held_here.unwrap_or_default())
            })
            .collect();
        for (host, sample) in self.hosts.iter_mut().zip(samples) {
            host.window.push(sample);
        }
        held
    }

    /// One interval: the scheduled changes now due, a sample per host, a
    /// round, its changes applied; then the clock moves one interval on.
    pub fn step(&mut self) -> SimulationStep {
        self.apply_scheduled();
        let held_before = self.sample_hosts();
        let changes = plan_round(&self.book, &self.plan_hosts(), self.policy, self.now_ms);
        for change in &changes {
            self.book.apply(change);
        }
        let step = SimulationStep {
            at_ms: self.now_ms,
            held_before,
            changes,
        };
        self.now_ms = self.now_ms.saturating_add(self.policy.interval_ms.max(1));
        step
    }

    /// The warnings at the time of the last step (the clock has moved on
    /// since: they are asked for at `at_ms`).
    pub fn warnings_at(&self, at_ms: u64) -> Vec<Warning> {
        warnings(&self.book, &self.plan_hosts(), self.policy, at_ms)
    }

    pub fn host(&self, host_id: &str) -> Option<&SimulatedHost> {
        self.hosts.iter().find(|host| host.host_id == host_id)
    }

    /// The host table of FIG. 5, one row per host in the scenario's order.
    pub fn host_table(&self) -> Vec<HostCapacityRow<'_>> {
        let held = self.book.held_by_host();
        self.hosts
            .iter()
            .map(|host| {
                let held_here = held.get(host.host_id.as_str()).copied();
                HostCapacityRow::of(host, held_here.unwrap_or_default())
            })
            .collect()
    }
}

/// A row of FIG. 5: what a host has for pools and instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCapacityRow<'a> {
    pub host_id: &'a str,
    pub total: Capacity,
    pub owner_share: Capacity,
    pub lent: Capacity,
    /// Held by pools and started instances.
    pub held: Capacity,
    /// The latest sample: free of the owner's work and lent partitions, and
    /// of that, what no pool holds (not yet acquired).
    pub latest: Option<HostSample>,
    pub not_yet_acquired: Option<Capacity>,
}

impl<'a> HostCapacityRow<'a> {
    fn of(host: &'a SimulatedHost, held: Capacity) -> Self {
        let latest = host.window.latest().copied();
        HostCapacityRow {
            host_id: &host.host_id,
            total: host.total,
            owner_share: host.owner_share,
            lent: host.lent,
            held,
            latest,
            not_yet_acquired: latest.map(|sample| sample.available.saturating_sub(held)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_never_takes_what_pools_hold() {
        let mut host =
            SimulatedHost::new("h", Capacity::new(400, 8192, 100), Capacity::new(0, 512, 0));
        host.owner_load = vec![
            (0, Capacity::new(100, 7168, 0)),
            (60_000, Capacity::new(100, 256, 0)),
        ];
        assert_eq!(host.owner_wanted_at(59_999), Capacity::new(100, 7168, 0));
        let sample = host.sample_at(0, Capacity::new(0, 2048, 0));
        assert_eq!(sample.owner_used, Capacity::new(100, 6144, 0));
        assert_eq!(sample.available, Capacity::new(300, 2048, 100));
        // Below its share, the share still counts.
        let later = host.sample_at(60_000, Capacity::ZERO);
        assert_eq!(later.available, Capacity::new(300, 7680, 100));
    }
}
