//! The simulated borrowers: find, lease (a named partition or the best by
//! requirements), release. An unknown lease is resolved by asking again
//! with the same idempotency key or by listing the borrower's leases; an
//! unknown release by releasing again or reading the lease.

use super::adapter::{borrower_name, lender_name};
use super::faults::Fault;
use super::model::{Expect, ModelLease};
use super::ops::Outcome;
use super::Sim;
use leasehold_api::{LeaseRequest, LeaseView, ReleaseReceipt};
use leasehold_core::lease::LeaseState;
use leasehold_core::{PartitionRef, Requirements};
use rand::Rng;

impl Sim {
    pub(super) async fn find(
        &mut self,
        borrower: usize,
        requirements: &Requirements,
    ) -> Result<(), String> {
        let limit = super::ops::FIND_LIMIT;
        let expect = self
            .model
            .expect_find(requirements, limit as usize, "requirements");
        let answer = self.broker.find(borrower, requirements, limit).await;
        match self.classify(answer)? {
            Outcome::Known(Ok(found)) => {
                let offers: Vec<_> = found
                    .offers
                    .into_iter()
                    .map(|o| (o.partition, o.terms))
                    .collect();
                let names: Vec<String> = offers.iter().map(|(p, _)| p.to_string()).collect();
                self.record(format!("-> offers {names:?}"));
                if expect != Expect::Succeeds(offers.clone()) {
                    return Err(format!(
                        "find answered {names:?}; the model expected {expect:?}"
                    ));
                }
                Ok(())
            }
            Outcome::Known(Err(refusal)) => self.accept_refusal(&expect, &refusal),
            Outcome::Unknown(fault) => Err(format!("a find wrote to the store ({fault:?})")),
        }
    }

    pub(super) async fn lease(
        &mut self,
        borrower: usize,
        request: LeaseRequest,
        expect: Expect<PartitionRef>,
    ) -> Result<(), String> {
        let key = self.new_idempotency_key();
        let attempt_ms = self.now_ms();
        let answer = self.broker.lease(borrower, &request, &key).await;
        match self.classify(answer)? {
            Outcome::Known(Ok(view)) => {
                self.accept_lease(borrower, &expect, &view, attempt_ms)?;
                if self.rng.gen_ratio(1, 8) {
                    self.send_lease_again(borrower, &request, &key, &view)
                        .await?;
                }
                Ok(())
            }
            Outcome::Known(Err(refusal)) => self.accept_refusal(&expect, &refusal),
            Outcome::Unknown(fault) => {
                self.before_resolving().await?;
                if self.rng.gen_ratio(1, 2) {
                    self.retry_lease(borrower, &request, &key, &expect, attempt_ms, fault)
                        .await
                } else {
                    self.look_for_lease(borrower, &expect, attempt_ms, fault)
                        .await
                }
            }
        }
    }

    /// A request sent twice (a client that did not see the first answer)
    /// with the same idempotency key gets the same lease, not a second one.
    async fn send_lease_again(
        &mut self,
        borrower: usize,
        request: &LeaseRequest,
        key: &str,
        first: &LeaseView,
    ) -> Result<(), String> {
        self.record(format!("send again with idempotency key {key}"));
        let again = self
            .broker
            .lease(borrower, request, key)
            .await
            .map_err(|e| format!("the same lease request sent again was answered {e}"))?;
        self.record(format!("-> lease {} epoch {}", again.lease_id, again.epoch));
        // Keys are deterministic signatures: the same lease, the same key.
        if &again != first {
            return Err(format!(
                "the same lease request sent again was answered {again:?}, first {first:?}"
            ));
        }
        Ok(())
    }

    /// Checks a concluded lease against the model (the partition it
    /// expected, the terms, the start time, an epoch above the last one)
    /// and records it.
    fn accept_lease(
        &mut self,
        borrower: usize,
        expect: &Expect<PartitionRef>,
        view: &LeaseView,
        started_at_ms: u64,
    ) -> Result<(), String> {
        self.record(format!(
            "-> lease {} on {} epoch {} at {}",
            view.lease_id, view.partition, view.epoch, view.started_at_ms
        ));
        let Expect::Succeeds(partition) = expect else {
            return Err(format!(
                "lease {} on {} concluded; the model expected {expect:?}",
                view.lease_id, view.partition
            ));
        };
        let entry = self
            .model
            .partitions
            .get(partition)
            .ok_or_else(|| format!("lease on {partition}, which the model does not know"))?;
        let lender = self.model.hosts[&partition.host_id].lender;
        let problems = [
            (&view.partition != partition, "partition"),
            (view.borrower != borrower_name(borrower), "borrower"),
            (view.lender != lender_name(lender), "lender"),
            (view.terms != entry.terms, "terms"),
            (view.started_at_ms != started_at_ms, "started_at_ms"),
            (view.state != LeaseState::Active, "state"),
            (
                view.epoch <= entry.last_lease_epoch,
                "epoch (not above the last lease's)",
            ),
            (view.lease_key.is_none(), "lease_key (missing)"),
            (
                self.model.leases.contains_key(&view.lease_id),
                "lease_id (reused)",
            ),
            (
                view.lease_id <= self.model.highest_lease_id(),
                "lease_id (not increasing)",
            ),
        ];
        if let Some((_, field)) = problems.iter().find(|(wrong, _)| *wrong) {
            return Err(format!(
                "lease {} answered with a wrong {field}: {view:?}; expected {partition} for {} at {started_at_ms}",
                view.lease_id,
                borrower_name(borrower)
            ));
        }
        self.model.record_lease(ModelLease {
            lease_id: view.lease_id,
            partition: partition.clone(),
            borrower,
            lender,
            terms: entry.terms.clone(),
            epoch: view.epoch,
            started_at_ms,
            released: None,
            lease_key: view.lease_key.clone().unwrap_or_default(),
        });
        self.counters.leases += 1;
        Ok(())
    }

    /// Asks again with the same idempotency key: after a lost
    /// acknowledgement the answer is the lease concluded then; after a
    /// crash before the commit, a lease concluded now.
    async fn retry_lease(
        &mut self,
        borrower: usize,
        request: &LeaseRequest,
        key: &str,
        expect: &Expect<PartitionRef>,
        attempt_ms: u64,
        fault: Fault,
    ) -> Result<(), String> {
        self.record(format!("retry with idempotency key {key}"));
        let retry_ms = self.now_ms();
        let answer = self.broker.lease(borrower, request, key).await;
        match (fault, answer) {
            (Fault::AckLost, Ok(view)) => self.accept_lease(borrower, expect, &view, attempt_ms),
            (Fault::CrashBeforeCommit, Ok(view)) => {
                self.accept_lease(borrower, expect, &view, retry_ms)
            }
            (Fault::CrashBeforeCommit, Err(refusal)) => self.accept_refusal(expect, &refusal),
            (Fault::AckLost, Err(refusal)) => Err(format!(
                "the retry of a lease whose commit landed was answered {refusal}"
            )),
        }
    }

    /// Lists the borrower's leases for one the model does not know: there
    /// is exactly one after a lost acknowledgement, none after a crash.
    async fn look_for_lease(
        &mut self,
        borrower: usize,
        expect: &Expect<PartitionRef>,
        attempt_ms: u64,
        fault: Fault,
    ) -> Result<(), String> {
        let leases = self
            .broker
            .borrower_leases(borrower)
            .await
            .map_err(|e| format!("cannot list the borrower's leases: {e}"))?;
        let unknown: Vec<&LeaseView> = leases
            .iter()
            .filter(|l| !self.model.leases.contains_key(&l.lease_id))
            .collect();
        self.record(format!(
            "resolved by listing: {} unknown leases",
            unknown.len()
        ));
        match (fault, unknown.as_slice()) {
            (Fault::AckLost, [view]) => {
                let view = (*view).clone();
                self.accept_lease(borrower, expect, &view, attempt_ms)
            }
            (Fault::CrashBeforeCommit, []) => Ok(()),
            _ => Err(format!(
                "after {fault:?} the borrower has {} leases the model does not know: {unknown:?}",
                unknown.len()
            )),
        }
    }

    pub(super) async fn release(&mut self, borrower: usize, lease_id: u64) -> Result<(), String> {
        let attempt_ms = self.now_ms();
        let answer = self.broker.release(borrower, lease_id).await;
        match self.classify(answer)? {
            Outcome::Known(Ok(receipt)) => self.accept_release(borrower, &receipt, attempt_ms),
            Outcome::Known(Err(refusal)) => {
                let expect: Expect<()> = match self.model.leases.get(&lease_id) {
                    Some(lease) if lease.borrower == borrower => Expect::Succeeds(()),
                    _ => Expect::RefusedWith(vec![super::model::Refused {
                        code: "not_found",
                        field: None,
                    }]),
                };
                self.accept_refusal(&expect, &refusal)
            }
            Outcome::Unknown(fault) => {
                self.before_resolving().await?;
                self.resolve_release(borrower, lease_id, attempt_ms, fault)
                    .await
            }
        }
    }

    /// Checks a release receipt: the bill of the core's rule for the time
    /// the release was asked (`released_at_ms` for a new release, the
    /// recorded time for a lease released before).
    fn accept_release(
        &mut self,
        borrower: usize,
        receipt: &ReleaseReceipt,
        released_at_ms: u64,
    ) -> Result<(), String> {
        let lease_id = receipt.lease.lease_id;
        self.record(format!(
            "-> released {lease_id} already={} charge {} at {:?}",
            receipt.already_released,
            receipt.bill.charge_micros,
            receipt.lease.release_requested_at_ms
        ));
        let lease = match self.model.leases.get(&lease_id) {
            Some(lease) if lease.borrower == borrower => lease.clone(),
            _ => return Err(format!("released lease {lease_id}, not the borrower's")),
        };
        let (at_ms, bill) = match &lease.released {
            Some(release) => (release.at_ms, release.bill),
            None => (
                released_at_ms,
                self.model.expected_bill(&lease, released_at_ms),
            ),
        };
        let wrong = receipt.already_released != lease.released.is_some()
            || receipt.bill != bill
            || receipt.lease.state != LeaseState::Released
            || receipt.lease.release_requested_at_ms != Some(at_ms)
            || receipt.lease.charge_micros != Some(bill.charge_micros);
        if wrong {
            return Err(format!(
                "release of lease {lease_id} answered {receipt:?}; expected {bill:?} for a release at {at_ms}"
            ));
        }
        if lease.released.is_none() {
            self.model.record_release(lease_id, at_ms);
            self.counters.releases += 1;
        }
        Ok(())
    }

    /// After a lost acknowledgement the lease is released as of the first
    /// attempt; after a crash before the commit it is still active.
    async fn resolve_release(
        &mut self,
        borrower: usize,
        lease_id: u64,
        attempt_ms: u64,
        fault: Fault,
    ) -> Result<(), String> {
        if self.rng.gen_ratio(1, 2) {
            self.record("retry the release".into());
            let retry_ms = self.now_ms();
            let receipt = self
                .broker
                .release(borrower, lease_id)
                .await
                .map_err(|e| format!("the retried release was answered {e}"))?;
            if fault == Fault::AckLost {
                // The release that landed is the one to check against.
                self.model.record_release(lease_id, attempt_ms);
                self.counters.releases += 1;
            }
            return self.accept_release(borrower, &receipt, retry_ms);
        }
        let view = self
            .broker
            .get_lease(borrower, lease_id)
            .await
            .map_err(|e| format!("cannot read lease {lease_id}: {e}"))?;
        self.record(format!(
            "resolved by reading: {:?} at {:?}",
            view.state, view.release_requested_at_ms
        ));
        let as_expected = match fault {
            Fault::AckLost => {
                view.state == LeaseState::Released
                    && view.release_requested_at_ms == Some(attempt_ms)
            }
            Fault::CrashBeforeCommit => view.state == LeaseState::Active,
        };
        if !as_expected {
            return Err(format!("after {fault:?} lease {lease_id} reads {view:?}"));
        }
        if fault == Fault::AckLost {
            self.model.record_release(lease_id, attempt_ms);
            self.counters.releases += 1;
        }
        Ok(())
    }
}
