//! Loans inside the host (seed 004, FIG. 4B, S580): the manager keeps its
//! own partitions' rights in its own database (`RightsLoanDb`, fsync on
//! every commit), so a request its host can meet, and a partition giving
//! rights back to the owner share, commit there and switch the modules at
//! once, with no round trip to the group's store. The group's table keeps
//! the host's total, which such a loan does not change, and receives the
//! loan right after (the publisher task; every write of this manager
//! carries the loans not yet published too). Core's `rights::local`
//! decides how the loans sit on a table: applied, waiting for a transfer
//! out of the host to end, or lost with rights that left the host.

use super::{RightsManager, OWNER_SHARE};
use crate::error::AgentError;
use leasehold_api::rights::RightsOrderAnswer;
use leasehold_core::rights::local::{self, LocalLoan, Overlay};
use leasehold_core::rights::{ShareGroup, Slot};
use leasehold_store::rights_loans::{LoanToRecord, RightsLoanDb};

/// The manager's database of loans and those the table does not hold yet.
pub(crate) struct LoanBook {
    db: RightsLoanDb,
    pub(crate) pending: Vec<LocalLoan>,
}

impl LoanBook {
    pub(crate) fn open(path: &std::path::Path) -> Result<Self, AgentError> {
        let db = RightsLoanDb::open(path)?;
        // All of them: those the table holds already are skipped by
        // number when they are laid on it.
        let pending = db.after(0)?;
        Ok(LoanBook { db, pending })
    }
}

impl RightsManager {
    pub(crate) fn book(&self) -> std::sync::MutexGuard<'_, LoanBook> {
        self.loans.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `table` with this host's loans it does not hold yet on top.
    pub(crate) fn overlaid(&self, table: &ShareGroup, pending: &[LocalLoan]) -> Overlay {
        local::overlay(table, &self.host_id, pending, self.clock.now_ms())
    }

    /// A request for `modules` more rights for this host's partition `to`
    /// that the host can meet, committed here; `None` when it needs other
    /// hosts (or is refused: the group's path words the refusal).
    pub(crate) fn lend_inside_host(
        &self,
        to: u32,
        modules: u32,
    ) -> Option<Result<RightsOrderAnswer, AgentError>> {
        let slot = Slot::new(self.host_id.clone(), to);
        self.loan_inside_host(|effective, now_ms| {
            let plan = local::plan_inside_host(effective, &slot, modules, now_ms)?;
            Some(
                plan.into_iter()
                    .map(|(from, count)| (from, to, count))
                    .collect(),
            )
        })
    }

    /// This host's partition `from` gives `modules` rights back to the
    /// owner share; `None` when the loan does not fit (the group's path
    /// words the refusal).
    pub(crate) fn give_back_inside_host(
        &self,
        from: u32,
        modules: u32,
    ) -> Option<Result<RightsOrderAnswer, AgentError>> {
        if from == OWNER_SHARE {
            return None;
        }
        self.loan_inside_host(|_, _| Some(vec![(from, OWNER_SHARE, modules)]))
    }

    /// The loans `plan` makes on this host's view (the copy with the loans
    /// not yet published on top), committed here if they fit; `None` when
    /// there is no copy, no plan, or they do not fit the copy, which may
    /// be behind the store: the group's path decides again on the stored
    /// table.
    fn loan_inside_host(
        &self,
        plan: impl FnOnce(&ShareGroup, u64) -> Option<Vec<LoanToRecord>>,
    ) -> Option<Result<RightsOrderAnswer, AgentError>> {
        // The copy is read under the book's lock: a newer table applied
        // meanwhile (which may have switched modules off for a transfer
        // out) is never overwritten by a loan planned on an older one.
        let mut book = self.book();
        let (table, version) = self.copy()?;
        let on_top = self.overlaid(&table, &book.pending);
        if on_top.waiting {
            return Some(Err(waiting()));
        }
        let loans = plan(&on_top.group, self.clock.now_ms())?;
        let next = self.fit_loans(on_top.group, &loans).ok()?;
        Some(self.commit_loans(&mut book, next, &loans, version))
    }

    /// `effective` with the loans applied, if they fit.
    fn fit_loans(
        &self,
        effective: ShareGroup,
        loans: &[LoanToRecord],
    ) -> Result<ShareGroup, leasehold_core::rights::RightsRefusal> {
        let now_ms = self.clock.now_ms();
        let mut next = effective;
        for (from, to, modules) in loans {
            // Number 0 marks nothing: this only checks that it fits.
            let unnumbered = LocalLoan {
                seq: 0,
                from: *from,
                to: *to,
                modules: *modules,
                at_ms: now_ms,
            };
            next.apply_local_loan(&self.host_id, &unnumbered, now_ms)?;
        }
        Ok(next)
    }

    /// Records the loans (the commit), then switches this host's modules
    /// to `next`, their result. The book stays locked from the plan to
    /// here, so two loans never plan on the same rights.
    fn commit_loans(
        &self,
        book: &mut LoanBook,
        next: ShareGroup,
        loans: &[LoanToRecord],
        version: u64,
    ) -> Result<RightsOrderAnswer, AgentError> {
        let now_ms = self.clock.now_ms();
        // Blocking for one small fsync'd commit (about a tenth of a
        // millisecond): cheaper than handing it to another thread.
        let recorded = book.db.record(loans, now_ms)?;
        book.pending.extend(recorded.iter().copied());
        self.apply_effective(next);
        self.publish_wanted.notify_one();
        Ok(RightsOrderAnswer {
            committed: vec![],
            aborted: vec![],
            version,
            lent_inside_host: recorded.iter().map(|loan| loan.seq).collect(),
        })
    }

    /// Writes the loans the table does not hold yet into it (a write that
    /// changes nothing else), then forgets them here.
    pub(crate) async fn publish_local_loans(&self) -> Result<(), AgentError> {
        if self.book().pending.is_empty() {
            return Ok(());
        }
        self.update(None, |_, _| Ok(())).await?;
        Ok(())
    }

    /// The loans numbered up to `through` are in the table: they leave
    /// the book (the database forgets them at the next tick, off the
    /// loans' path; a crash before then only skips them by number).
    pub(crate) fn published(&self, through: u64) {
        self.book().pending.retain(|loan| loan.seq > through);
    }

    /// Deletes the published loans from the database (each tick).
    pub(crate) fn forget_published_loans(&self, table: &ShareGroup) {
        let through = loans_held_through(table, &self.host_id);
        if through == 0 {
            return;
        }
        let mut book = self.book();
        book.pending.retain(|loan| loan.seq > through);
        if let Err(error) = book.db.forget_through(through) {
            tracing::warn!(%error, "could not forget published loans; they are skipped by number");
        }
    }

    /// The loans not yet in the table.
    pub(crate) fn pending_loans(&self) -> Vec<LocalLoan> {
        self.book().pending.clone()
    }
}

/// The last of `host_id`'s loans `table` holds; every one when the table
/// no longer lists the host (it left the group: its loans were about rows
/// that are gone, and must not land on the rows of a later return).
pub(crate) fn loans_held_through(table: &ShareGroup, host_id: &str) -> u64 {
    table
        .hosts
        .get(host_id)
        .map_or(u64::MAX, |host| host.local_loans_through)
}

fn waiting() -> AgentError {
    AgentError::RightsConflict(
        "a transfer out of this host is pending and overlaps its loans inside the host; try again once it ends (moments, or 10 s if its coordinator died)".into(),
    )
}

/// How long the publisher gathers loans before writing them.
pub const PUBLISH_GATHER_MS: u64 = 2;

/// Publishes this host's loans as soon as they are made, many in one
/// write when they come faster than the store takes them (the tick
/// publishes what this could not).
pub(crate) async fn publish_loop(agent: std::sync::Arc<crate::Agent>) {
    let Some(rights) = agent.rights.as_ref() else {
        return;
    };
    loop {
        rights.publish_wanted.notified().await;
        // Loans that come close together go in one write: the store's
        // work (and the CPU it takes from the loans) shrinks, and the
        // table lags by this much more.
        tokio::time::sleep(std::time::Duration::from_millis(PUBLISH_GATHER_MS)).await;
        if let Err(error) = rights.publish_local_loans().await {
            tracing::debug!(%error, "could not publish this host's loans yet; the tick tries again");
        }
    }
}
