//! Read-side figures of the reservation tables: when a pool is expected to
//! hold its target, from the same forecast the planner uses.

use super::planner::{PlanHost, PlanPolicy, Round};
use super::{Pool, PoolPhase, ReservationBook};

/// Forecasts for pools, built once per read of the tables.
pub struct Reporter<'a> {
    round: Round<'a>,
}

impl<'a> Reporter<'a> {
    pub fn new(
        book: &ReservationBook,
        hosts: &[PlanHost<'a>],
        policy: PlanPolicy,
        now_ms: u64,
    ) -> Self {
        Reporter {
            round: Round::new(book, hosts, policy, now_ms),
        }
    }

    /// When `pool` is expected to hold its whole target: now when it does,
    /// `None` when its host's trend never gets there.
    pub fn expected_completion_ms(&self, pool: &Pool) -> Option<u64> {
        if pool.phase != PoolPhase::Acquiring {
            return Some(pool.last_step_ms);
        }
        let host = self.round.hosts.get(pool.host_id.as_str())?;
        // Counted from the pool's next step, as the warnings count.
        let outlook = self.round.outlook(host, pool.acquired);
        super::warnings::from_next_step(outlook, Some(pool)).completion_ms(pool.target)
    }
}
