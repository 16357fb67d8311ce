//! Moving a placed demand to another host (FIG. 15) and power saving
//! (FIG. 17). A move ramps a pool on the destination like any acquisition,
//! while the old pool keeps holding its guarantee; only when the new pool
//! holds the whole target does it take the old one's place (chosen, or
//! handed over with the capacity allocated to the instances), in one round,
//! so the guarantee never lapses. Power saving drains the least-used host
//! by moving every demand on it elsewhere; a drained host takes no pools
//! until it is powered up, and is woken by the planner when a coming start
//! needs it.

use super::capacity::Capacity;
use super::planner::{PlanHost, Round};
use super::workload::Demand;
use super::{Pool, PoolPhase, ReservationBook, ReservationChange, Workload};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Where a demand is being moved to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MoveTarget {
    /// `leasehold instance migrate NAME --to HOST`.
    Host { host_id: String },
    /// Off its host, to wherever the planner finds room (power saving).
    Anywhere,
}

/// A host's power state, as power saving sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    /// Powered down, or draining for it: no new pools are placed there.
    Off,
}

impl<'a> Round<'a> {
    /// One round of a move: ramp on the destination, switch when complete.
    pub(crate) fn plan_move(
        &mut self,
        book: &ReservationBook,
        workload: &Workload,
        demand: &Demand,
        pools: Vec<Pool>,
    ) -> Vec<Pool> {
        let target = &book.moves[&demand.key];
        let (placed, ramping): (Vec<Pool>, Vec<Pool>) = pools
            .into_iter()
            .partition(|p| p.phase != PoolPhase::Acquiring);
        let Some(current) = placed.into_iter().next() else {
            // Nothing placed yet: planned as any other demand, off-limits
            // hosts excluded.
            self.forget_move(demand);
            return ramping;
        };
        let mut excluded = self.excluded_hosts(book, workload, &workload.demands(), demand);
        excluded.insert(current.host_id.clone());
        let allowed = |host_id: &str| match target {
            MoveTarget::Host { host_id: wanted } => wanted == host_id,
            MoveTarget::Anywhere => !excluded.contains(host_id),
        };
        let (mut kept, gone): (Vec<Pool>, Vec<Pool>) = ramping
            .into_iter()
            .partition(|p| self.hosts.contains_key(p.host_id.as_str()) && allowed(&p.host_id));
        for pool in gone {
            self.release(pool);
        }
        if kept.is_empty() {
            let host = self
                .candidates(demand.target, &BTreeSet::new())
                .into_iter()
                .map(|(host_id, _)| host_id)
                .find(|host_id| allowed(host_id) && *host_id != current.host_id);
            match host {
                Some(host_id) => kept.push(self.new_pool(workload, demand, host_id)),
                None => return vec![current],
            }
        }
        let stepped = self.step_pools(book, demand, kept);
        let (done, still): (Vec<Pool>, Vec<Pool>) =
            stepped.into_iter().partition(Pool::is_complete);
        let Some(mut arrived) = done.into_iter().next() else {
            return std::iter::once(current).chain(still).collect();
        };
        for pool in still {
            self.release(pool);
        }
        arrived.phase = current.phase;
        if current.phase == PoolPhase::HandedOver {
            arrived.allocated = arrived.acquired;
            arrived.acquired = Capacity::ZERO;
            arrived.requested = Capacity::ZERO;
        }
        self.changes
            .push(ReservationChange::PutPool(arrived.clone()));
        self.release(current);
        self.forget_move(demand);
        vec![arrived]
    }

    fn forget_move(&mut self, demand: &Demand) {
        self.changes.push(ReservationChange::SetMove {
            demand: demand.key.clone(),
            target: None,
        });
    }
}

/// The host power saving drains: of the powered hosts whose partitions are
/// not leased and that hold no pool of a demand starting within
/// `horizon_ms`, the one whose pools and lent partitions take least, its
/// id breaking ties; `None` when no host may go.
pub fn host_to_power_down(
    book: &ReservationBook,
    hosts: &[PlanHost],
    leased_hosts: &BTreeSet<String>,
    horizon_ms: u64,
    now_ms: u64,
) -> Option<String> {
    let starts_soon = |pool: &Pool| {
        pool.phase != PoolPhase::HandedOver
            && book
                .workloads
                .get(&pool.workload)
                .is_some_and(|w| w.start_ms <= now_ms.saturating_add(horizon_ms))
    };
    hosts
        .iter()
        .filter(|h| !book.powered_off.contains_key(h.host_id))
        .filter(|h| !leased_hosts.contains(h.host_id))
        .filter(|h| !book.pools_on_host(h.host_id).any(starts_soon))
        .min_by_key(|h| {
            let used = book.held_on_host(h.host_id).saturating_add(h.lent);
            (
                used.cpu_centicores + used.memory_mib + used.disk_gib,
                h.host_id,
            )
        })
        .map(|h| h.host_id.to_string())
}

/// The changes that drain `host_id`: it is marked off and every demand
/// with a pool there is moved anywhere else.
pub fn power_down_changes(book: &ReservationBook, host_id: &str) -> Vec<ReservationChange> {
    let mut changes = vec![ReservationChange::SetHostPower {
        host_id: host_id.to_string(),
        state: Some(PowerState::Off),
    }];
    let demands: BTreeSet<&str> = book
        .pools_on_host(host_id)
        .filter(|p| p.phase != PoolPhase::Acquiring)
        .map(|p| p.demand.as_str())
        .collect();
    for demand in demands {
        changes.push(ReservationChange::SetMove {
            demand: demand.to_string(),
            target: Some(MoveTarget::Anywhere),
        });
    }
    changes
}

/// Powered-down hosts to wake now: a demand not yet holding its target,
/// whose start is within the time its ramp needs (plus two intervals), and
/// that no powered host could ever hold, but this one could.
pub(crate) fn hosts_to_wake(
    round: &Round,
    book: &ReservationBook,
    demands: &[(&Workload, Demand)],
) -> Vec<String> {
    let mut wake = BTreeSet::new();
    for (workload, demand) in demands {
        let placed = round
            .pools
            .get(&demand.key)
            .is_some_and(|pools| pools.iter().any(|p| p.phase != PoolPhase::Acquiring));
        if placed || round.now_ms >= workload.end_ms {
            continue;
        }
        let fits = |host: &PlanHost| {
            demand
                .target
                .fits_in(round.outlook(host, Capacity::ZERO).room)
        };
        let powered_fits = round
            .hosts
            .values()
            .any(|h| !book.powered_off.contains_key(h.host_id) && fits(h));
        if powered_fits {
            continue;
        }
        let Some(host) = round
            .hosts
            .values()
            .find(|h| book.powered_off.contains_key(h.host_id) && fits(h))
        else {
            continue;
        };
        let step = round.policy.step_for(host);
        let steps = demand
            .target
            .named()
            .into_iter()
            .zip(step.named())
            .map(|((_, want), (_, per))| want.div_ceil(per.max(1)))
            .max()
            .unwrap_or(0);
        let lead_ms = (steps + 2).saturating_mul(round.policy.interval_ms);
        if round.now_ms.saturating_add(lead_ms) >= workload.start_ms {
            wake.insert(host.host_id.to_string());
        }
    }
    wake.into_iter().collect()
}
