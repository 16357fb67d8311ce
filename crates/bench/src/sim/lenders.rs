//! The simulated lenders: register hosts, put (register or alter) and
//! withdraw partitions. An unknown outcome is resolved by reading the
//! host or partition back through the API.

use super::adapter::lender_name;
use super::faults::Fault;
use super::model::{Expect, ModelHost};
use super::ops::Outcome;
use super::Sim;
use leasehold_api::PartitionView;
use leasehold_core::{HostCapacity, PartitionRef, Terms};

impl Sim {
    pub(super) async fn register_host(
        &mut self,
        lender: usize,
        host_id: &str,
        capacity: HostCapacity,
    ) -> Result<(), String> {
        let expect = self.model.expect_register_host(lender, host_id);
        let answer = self.broker.register_host(lender, host_id, &capacity).await;
        match self.classify(answer)? {
            Outcome::Known(Ok(view)) => {
                self.record(format!("-> host {} of {}", view.host_id, view.lender));
                if expect != Expect::Succeeds(()) {
                    return Err(format!(
                        "host {host_id} registered; the model expected {expect:?}"
                    ));
                }
                if view.lender != lender_name(lender) || view.capacity != capacity {
                    return Err(format!("host {host_id} registered as {view:?}"));
                }
                self.model
                    .hosts
                    .insert(host_id.to_string(), ModelHost { lender, capacity });
                Ok(())
            }
            Outcome::Known(Err(refusal)) => self.accept_refusal(&expect, &refusal),
            Outcome::Unknown(fault) => {
                self.resolve_register_host(lender, host_id, capacity, fault)
                    .await
            }
        }
    }

    async fn resolve_register_host(
        &mut self,
        lender: usize,
        host_id: &str,
        capacity: HostCapacity,
        fault: Fault,
    ) -> Result<(), String> {
        self.before_resolving().await?;
        let hosts = self
            .broker
            .all_hosts()
            .await
            .map_err(|e| format!("cannot list hosts: {e}"))?;
        let seen = hosts.iter().find(|h| h.host_id == host_id);
        let happened =
            seen.is_some_and(|h| h.lender == lender_name(lender) && h.capacity == capacity);
        let unchanged = match (seen, self.model.hosts.get(host_id)) {
            (None, None) => true,
            (Some(seen), Some(before)) => seen.capacity == before.capacity,
            _ => false,
        };
        self.record(format!("resolved: host registered={happened}"));
        check_resolution(fault, happened, unchanged, &format!("host {host_id}"))?;
        if happened {
            self.model
                .hosts
                .insert(host_id.to_string(), ModelHost { lender, capacity });
        }
        Ok(())
    }

    pub(super) async fn put_partition(
        &mut self,
        lender: usize,
        partition: &PartitionRef,
        terms: Terms,
    ) -> Result<(), String> {
        let expect = self.model.expect_put_partition(lender, partition, &terms);
        let answer = self.broker.put_partition(lender, partition, &terms).await;
        match self.classify(answer)? {
            Outcome::Known(Ok(view)) => {
                self.record(format!(
                    "-> partition {} epoch {}",
                    view.partition, view.epoch
                ));
                if expect != Expect::Succeeds(()) {
                    return Err(format!("{partition} put; the model expected {expect:?}"));
                }
                if !self.shows_put(&view, partition, &terms) {
                    return Err(format!("{partition} put, answered {view:?}"));
                }
                self.model.record_put_partition(partition, &terms);
                Ok(())
            }
            Outcome::Known(Err(refusal)) => self.accept_refusal(&expect, &refusal),
            Outcome::Unknown(fault) => self.resolve_put_partition(partition, terms, fault).await,
        }
    }

    /// Whether `view` is `partition` with `terms`, free, and with an epoch
    /// no lower than its last lease's.
    fn shows_put(&self, view: &PartitionView, partition: &PartitionRef, terms: &Terms) -> bool {
        let last_lease_epoch = self
            .model
            .partitions
            .get(partition)
            .map_or(0, |e| e.last_lease_epoch);
        &view.partition == partition
            && &view.terms == terms
            && !view.withdrawn
            && view.lease_id.is_none()
            && view.epoch >= last_lease_epoch
    }

    async fn seen_partition(
        &mut self,
        partition: &PartitionRef,
    ) -> Result<Option<PartitionView>, String> {
        let views = self
            .broker
            .all_partitions()
            .await
            .map_err(|e| format!("cannot list partitions: {e}"))?;
        Ok(views.into_iter().find(|v| &v.partition == partition))
    }

    async fn resolve_put_partition(
        &mut self,
        partition: &PartitionRef,
        terms: Terms,
        fault: Fault,
    ) -> Result<(), String> {
        self.before_resolving().await?;
        let seen = self.seen_partition(partition).await?;
        let happened = seen
            .as_ref()
            .is_some_and(|view| self.shows_put(view, partition, &terms));
        let unchanged = match (&seen, self.model.partitions.get(partition)) {
            (None, None) => true,
            (Some(seen), Some(before)) => {
                seen.terms == before.terms && seen.withdrawn == before.withdrawn
            }
            _ => false,
        };
        self.record(format!("resolved: partition put={happened}"));
        check_resolution(
            fault,
            happened,
            unchanged,
            &format!("partition {partition}"),
        )?;
        if happened {
            self.model.record_put_partition(partition, &terms);
        }
        Ok(())
    }

    pub(super) async fn withdraw(
        &mut self,
        lender: usize,
        partition: &PartitionRef,
    ) -> Result<(), String> {
        let expect = self.model.expect_withdraw(lender, partition);
        let answer = self.broker.withdraw_partition(lender, partition).await;
        match self.classify(answer)? {
            Outcome::Known(Ok(view)) => {
                self.record(format!("-> withdrawn {}", view.partition));
                if expect != Expect::Succeeds(()) {
                    return Err(format!(
                        "{partition} withdrawn; the model expected {expect:?}"
                    ));
                }
                if &view.partition != partition || !view.withdrawn || view.lease_id.is_some() {
                    return Err(format!("{partition} withdrawn, answered {view:?}"));
                }
                self.model.record_withdraw(partition);
                Ok(())
            }
            Outcome::Known(Err(refusal)) => self.accept_refusal(&expect, &refusal),
            Outcome::Unknown(fault) => {
                self.before_resolving().await?;
                let seen = self.seen_partition(partition).await?;
                let happened = seen.as_ref().is_some_and(|v| v.withdrawn);
                let was_withdrawn = self.model.partitions.get(partition).map(|e| e.withdrawn);
                let unchanged = seen.as_ref().map(|v| v.withdrawn) == was_withdrawn;
                self.record(format!("resolved: withdrawn={happened}"));
                check_resolution(
                    fault,
                    happened,
                    unchanged,
                    &format!("partition {partition}"),
                )?;
                if happened {
                    self.model.record_withdraw(partition);
                }
                Ok(())
            }
        }
    }
}

/// After a lost acknowledgement the change must be there; after a crash
/// before the commit, nothing may have changed.
pub(super) fn check_resolution(
    fault: Fault,
    happened: bool,
    unchanged: bool,
    what: &str,
) -> Result<(), String> {
    match fault {
        Fault::AckLost if !happened => Err(format!(
            "{what}: the commit landed (its acknowledgement was lost) but the change is not there"
        )),
        Fault::CrashBeforeCommit if !unchanged => Err(format!(
            "{what}: the commit never happened but the change is there"
        )),
        _ => Ok(()),
    }
}
