//! The early warnings of FIG. 14: every demand that is not yet guaranteed
//! and whose target will not be reached by its start on the current trend,
//! with what would fix it: the earliest start at which it would be reached
//! and the largest guarantee reachable by the requested start.

use super::capacity::Capacity;
use super::forecast::Outlook;
use super::planner::{demands_in_order, PlanHost, PlanPolicy, Round};
use super::{Pool, PoolPhase, ReservationBook};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WarningReason {
    /// No host could ever hold the target.
    LargerThanAnyHost,
    /// The trend does not reach the target by the start.
    NotByStart,
    /// The ramp gained nothing for the configured number of rounds.
    Fruitless,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Warning {
    pub workload: String,
    pub instances: Vec<String>,
    pub reason: WarningReason,
    pub target: Capacity,
    pub start_ms: u64,
    /// The earliest start at which the target would be held, on the trend;
    /// `None` when it never would.
    pub earliest_start_ms: Option<u64>,
    /// The largest guarantee reachable by the start, and where.
    pub largest_guarantee: Capacity,
    pub largest_guarantee_host: Option<String>,
    pub fruitless_rounds: u32,
}

/// How much of `target` `have` covers, in thousandths summed over the
/// resources the target asks for.
fn coverage(have: Capacity, target: Capacity) -> u64 {
    have.named()
        .into_iter()
        .zip(target.named())
        .filter(|(_, (_, want))| *want > 0)
        .map(|((_, got), (_, want))| got.min(want) * 1000 / want)
        .sum()
}

/// The outlook counted from the pool's next step. The forecast assumes a
/// step is taken now; a pool that already took this interval's step (as
/// every pool has right after a round) takes its next one at
/// `last_step_ms + interval`, so counting from now promised one step too
/// many: a ramp short of one step by its start was not warned.
pub(crate) fn from_next_step(outlook: Outlook, pool: Option<&Pool>) -> Outlook {
    let Some(pool) = pool else {
        return outlook;
    };
    let next_step_ms = pool.last_step_ms.saturating_add(outlook.interval_ms);
    if next_step_ms <= outlook.now_ms {
        return outlook;
    }
    // What frees up until then, on the trend.
    let ahead_ms = next_step_ms - outlook.now_ms;
    let per = |gain: u64| -> u64 {
        (u128::from(gain) * u128::from(ahead_ms) / u128::from(outlook.interval_ms.max(1))) as u64
    };
    let gain = outlook.gain_per_interval;
    let grown = Capacity::new(
        per(gain.cpu_centicores),
        per(gain.memory_mib),
        per(gain.disk_gib),
    );
    Outlook {
        now_ms: next_step_ms,
        ceiling_now: outlook.ceiling_now.saturating_add(grown),
        ..outlook
    }
}

/// The warnings at `now_ms`, in the planner's order.
pub fn warnings(
    book: &ReservationBook,
    hosts: &[PlanHost],
    policy: PlanPolicy,
    now_ms: u64,
) -> Vec<Warning> {
    let round = Round::new(book, hosts, policy, now_ms);
    let mut found = Vec::new();
    for (workload, demand) in demands_in_order(book) {
        if now_ms >= workload.end_ms {
            continue;
        }
        let pools = round
            .pools
            .get(&demand.key)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if pools.iter().any(|p| p.phase != PoolPhase::Acquiring) {
            continue;
        }
        let mut best_done: Option<u64> = None;
        let mut largest = (0u64, Capacity::ZERO, None::<String>);
        let mut fits_somewhere = false;
        for host in round.hosts.values() {
            let pool = pools.iter().find(|p| p.host_id == host.host_id);
            let own = pool.map(|p| p.acquired).unwrap_or_default();
            let outlook = from_next_step(round.outlook(host, own), pool);
            fits_somewhere |= demand.target.fits_in(outlook.room);
            if let Some(done) = outlook.completion_ms(demand.target) {
                best_done = Some(best_done.map_or(done, |best| best.min(done)));
            }
            let reach = outlook.reachable_by(demand.target, workload.start_ms.max(now_ms));
            let score = coverage(reach, demand.target);
            if largest.2.is_none() || score > largest.0 {
                largest = (score, reach, Some(host.host_id.to_string()));
            }
        }
        let rounds = book.fruitless_rounds.get(&demand.key).copied().unwrap_or(0);
        let reason = if !fits_somewhere {
            WarningReason::LargerThanAnyHost
        } else if !matches!(best_done, Some(done) if done <= workload.start_ms) {
            WarningReason::NotByStart
        } else if rounds >= policy.fruitless_limit {
            WarningReason::Fruitless
        } else {
            continue;
        };
        found.push(Warning {
            workload: workload.name.clone(),
            instances: demand.instances.clone(),
            reason,
            target: demand.target,
            start_ms: workload.start_ms,
            earliest_start_ms: if fits_somewhere { best_done } else { None },
            largest_guarantee: largest.1,
            largest_guarantee_host: largest.2,
            fruitless_rounds: rounds,
        });
    }
    found
}
