//! Loans inside a host (seed 004, FIG. 4B): the host's manager keeps its
//! own partitions' rights in its own database, so moving rights between
//! two partitions of one host (S580) commits there, without a round trip
//! to the group's store; the group's table keeps the host's total, which
//! such a loan does not change, and receives the loan afterwards.
//!
//! A loan is numbered by its host; the table records the last number it
//! holds per host (`HostRights::local_loans_through`), so publishing is
//! idempotent whatever crashes in between. The manager's view of its host
//! is the table with its loans not yet published on top ([`overlay`]).
//! A loan that no longer fits the table is either waiting (a transfer out
//! of the host is pending: the host does not confirm it, so it aborts and
//! the loan fits again) or lost (the rights left the host for good: a
//! seizure or a revocation, and its modules go off).

use super::{RightsRefusal, ShareGroup, Slot};
use serde::{Deserialize, Serialize};

/// Rights moved from one partition of a host to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalLoan {
    /// The host's number for it, increasing, never reused.
    pub seq: u64,
    pub from: u32,
    pub to: u32,
    pub modules: u32,
    pub at_ms: u64,
}

/// A host's table with its unpublished loans on top.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    pub group: ShareGroup,
    /// A loan does not fit while a transfer out of the host is pending:
    /// it and the later ones are not in `group`.
    pub waiting: bool,
    /// Loans that will never fit: their rights left the host.
    pub lost: Vec<u64>,
}

impl ShareGroup {
    /// The last of `host_id`'s loans this table holds.
    pub fn local_loans_through(&self, host_id: &str) -> u64 {
        self.hosts
            .get(host_id)
            .map_or(0, |host| host.local_loans_through)
    }

    /// Is a transfer out of the host pending (its rights in flight)?
    pub fn transfer_pending_from(&self, host_id: &str) -> bool {
        self.transfers
            .values()
            .any(|t| t.from.host_id == host_id && t.in_flight() > 0)
    }

    /// One loan, both phases, recorded as a committed transfer of the
    /// table; all or nothing.
    pub fn apply_local_loan(
        &mut self,
        host_id: &str,
        loan: &LocalLoan,
        now_ms: u64,
    ) -> Result<u64, RightsRefusal> {
        let from = Slot::new(host_id, loan.from);
        let to = Slot::new(host_id, loan.to);
        let mut next = self.clone();
        let transfer_id = next.begin_transfer(&from, &to, loan.modules, now_ms)?;
        next.commit_transfer(transfer_id, now_ms)?;
        next.mark_local_loans_through(host_id, loan.seq);
        *self = next;
        Ok(transfer_id)
    }

    fn mark_local_loans_through(&mut self, host_id: &str, seq: u64) {
        if let Some(host) = self.hosts.get_mut(host_id) {
            host.local_loans_through = host.local_loans_through.max(seq);
        }
    }
}

/// `table` with `host_id`'s loans it does not hold yet applied in order.
pub fn overlay(table: &ShareGroup, host_id: &str, loans: &[LocalLoan], now_ms: u64) -> Overlay {
    let through = table.local_loans_through(host_id);
    let mut group = table.clone();
    let mut lost = Vec::new();
    for loan in loans.iter().filter(|loan| loan.seq > through) {
        if group.apply_local_loan(host_id, loan, now_ms).is_ok() {
            continue;
        }
        if table.transfer_pending_from(host_id) {
            return Overlay {
                group,
                waiting: true,
                lost,
            };
        }
        lost.push(loan.seq);
        group.mark_local_loans_through(host_id, loan.seq);
    }
    Overlay {
        group,
        waiting: false,
        lost,
    }
}

/// The loans inside the host that meet a request for `modules` more
/// rights for `to` ((from, count) pairs), or `None` when the request needs
/// another host or is refused (the group's own path decides it then).
pub fn plan_inside_host(
    effective: &ShareGroup,
    to: &Slot,
    modules: u32,
    now_ms: u64,
) -> Option<Vec<(u32, u32)>> {
    let plan = super::transfer::plan_request(effective, to, modules, now_ms).ok()?;
    plan.iter()
        .all(|(from, _)| from.host_id == to.host_id)
        .then(|| {
            plan.into_iter()
                .map(|(from, count)| (from.partition, count))
                .collect()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rights::GroupMode;

    fn group() -> ShareGroup {
        let mut group = ShareGroup::new("g", GroupMode::Federated);
        for host in ["h1", "h2"] {
            let row = group.hosts.entry(host.into()).or_default();
            row.modules = 8;
            row.partitions.insert(
                0,
                super::super::PartitionRights {
                    modules: 8,
                    permanent: 4,
                    active: 4,
                    ..Default::default()
                },
            );
            group.add_partition(host, 1).unwrap();
        }
        group
    }

    fn loan(seq: u64, from: u32, to: u32, modules: u32) -> LocalLoan {
        LocalLoan {
            seq,
            from,
            to,
            modules,
            at_ms: 1,
        }
    }

    #[test]
    fn loans_apply_once_whatever_is_published_twice() {
        let table = group();
        let loans = [loan(1, 0, 1, 2), loan(2, 1, 0, 1)];
        let on_top = overlay(&table, "h1", &loans, 1);
        assert!(!on_top.waiting && on_top.lost.is_empty());
        let rows = &on_top.group.hosts["h1"].partitions;
        assert_eq!((rows[&0].permanent, rows[&1].permanent), (3, 1));
        assert_eq!(rows[&1].active, 1);
        assert_eq!(on_top.group.local_loans_through("h1"), 2);
        // Published already: applying them again changes nothing.
        assert_eq!(overlay(&on_top.group, "h1", &loans, 1).group, on_top.group);
        assert_eq!(on_top.group.total_rights(1), table.total_rights(1));
    }

    #[test]
    fn a_loan_broken_by_a_pending_transfer_out_waits_and_a_seizure_loses_it() {
        let mut table = group();
        let loans = [loan(1, 0, 1, 3)];
        // The coordinator took two of the owner share's rights elsewhere
        // on a table without the loan: the loan waits for that to end.
        table
            .begin_transfer(&Slot::new("h1", 0), &Slot::new("h2", 1), 2, 1)
            .unwrap();
        let on_top = overlay(&table, "h1", &loans, 1);
        assert!(on_top.waiting);
        assert_eq!(on_top.group.hosts["h1"].partitions[&1].permanent, 0);
        let id = table.last_transfer_id;
        table.abort_transfer(id, 1).unwrap();
        assert!(!overlay(&table, "h1", &loans, 1).waiting, "fits again");
        // The host's rights went for good: the loan is lost and published
        // past, and nothing is active beyond the rights.
        let mut seized = group();
        seized
            .hosts
            .get_mut("h1")
            .unwrap()
            .partitions
            .get_mut(&0)
            .unwrap()
            .permanent = 0;
        let on_top = overlay(&seized, "h1", &loans, 1);
        assert_eq!((on_top.waiting, on_top.lost.clone()), (false, vec![1]));
        assert_eq!(on_top.group.local_loans_through("h1"), 1);
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// h1's manager lends inside h1, planned on its overlay.
        Lend { to: u32, modules: u32 },
        /// h1's manager publishes what it lent.
        Publish,
        /// Another coordinator begins a transfer out of h1 on the table.
        BeginOut { from: u32, modules: u32 },
        /// It ends the oldest pending transfer (commit or abort).
        End { commit: bool },
        /// h1 was silent too long: its rights are seized.
        Seize,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            (0u32..2, 1u32..4).prop_map(|(to, modules)| Step::Lend { to, modules }),
            Just(Step::Publish),
            (0u32..2, 1u32..3).prop_map(|(from, modules)| Step::BeginOut { from, modules }),
            any::<bool>().prop_map(|commit| Step::End { commit }),
            Just(Step::Seize),
        ]
    }

    fn run(table: &mut ShareGroup, loans: &mut Vec<LocalLoan>, step: Step) {
        let on_top = overlay(table, "h1", loans, 1);
        match step {
            Step::Lend { to, modules } if !on_top.waiting => {
                if let Some(plan) =
                    plan_inside_host(&on_top.group, &Slot::new("h1", to), modules, 1)
                {
                    for (from, count) in plan {
                        let seq = loans.last().map_or(0, |l| l.seq) + 1;
                        loans.push(loan(seq, from, to, count));
                    }
                }
            }
            Step::Lend { .. } => {}
            Step::Publish => {
                *table = on_top.group;
                let through = table.local_loans_through("h1");
                loans.retain(|l| l.seq > through);
            }
            Step::BeginOut { from, modules } => {
                let _ =
                    table.begin_transfer(&Slot::new("h1", from), &Slot::new("h2", 1), modules, 1);
            }
            Step::End { commit } => {
                let oldest = table
                    .transfers
                    .values()
                    .find(|t| t.in_flight() > 0)
                    .map(|t| t.transfer_id);
                if let Some(id) = oldest {
                    let _ = if commit {
                        table.commit_transfer(id, 1)
                    } else {
                        table.abort_transfer(id, 1)
                    };
                }
            }
            Step::Seize => {
                let _ = table.seize("h1", 1);
                table.deactivate_beyond_rights("h1", 1);
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
        /// Whatever interleaves loans, publications, transfers out of the
        /// host and seizures: the host's view never holds more rights than
        /// the table gives the host, nor more active modules than rights,
        /// and the group's total is the table's.
        #[test]
        fn a_hosts_view_never_holds_more_than_the_table_gives_it(
            steps in proptest::collection::vec(step(), 1..40),
        ) {
            let mut table = group();
            let mut loans = Vec::new();
            for step in steps {
                run(&mut table, &mut loans, step);
                let on_top = overlay(&table, "h1", &loans, 1);
                let view = &on_top.group.hosts["h1"];
                proptest::prop_assert!(view.rights(1) <= table.hosts["h1"].rights(1));
                if !on_top.waiting {
                    proptest::prop_assert_eq!(view.rights(1), table.hosts["h1"].rights(1));
                }
                for p in view.partitions.values() {
                    proptest::prop_assert!(p.active <= p.rights(1), "{:?}", p);
                }
                proptest::prop_assert_eq!(on_top.group.total_rights(1), table.total_rights(1));
            }
        }
    }

    #[test]
    fn a_request_the_host_can_meet_is_planned_inside_it_and_others_are_not() {
        let table = group();
        assert_eq!(
            plan_inside_host(&table, &Slot::new("h1", 1), 3, 1),
            Some(vec![(0, 3)])
        );
        assert_eq!(plan_inside_host(&table, &Slot::new("h1", 1), 6, 1), None);
    }
}
