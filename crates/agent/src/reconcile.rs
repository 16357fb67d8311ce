//! Start-up: register the host and bring the broker and the partition
//! table into agreement.

use crate::{Agent, AgentError};
use leasehold_api::{PartitionView, RegisterHostRequest};
use leasehold_core::fence::FenceEvent;
use leasehold_store::agent::AgentPartitionRow;
use std::collections::HashMap;

impl Agent {
    /// Registers the host and brings the broker and the partition table
    /// into agreement: partitions the broker lacks are registered, leases
    /// the broker knows are adopted (so the partition is locked here too),
    /// leases that ended while the agent was away are fenced and wiped.
    pub(crate) async fn register_and_reconcile(
        &self,
        advertise_url: &str,
    ) -> Result<Vec<String>, AgentError> {
        self.broker
            .register_host(
                self.host_id(),
                &RegisterHostRequest {
                    agent_url: Some(advertise_url.to_string()),
                    capacity: self.config.capacity.clone(),
                },
            )
            .await?;
        let at_broker = self.partitions_at_broker().await?;
        let rows = self.db().partitions()?;
        let mut notes = self.withdraw_unknown_at_broker(&at_broker, &rows).await?;
        for row in rows {
            match at_broker.get(&row.index) {
                Some(view) if !view.withdrawn => self.reconcile_row(row, view, &mut notes).await?,
                _ => {
                    let mut row = row;
                    self.register_row(&mut row).await?;
                    notes.push(format!(
                        "partition {}: registered with the broker",
                        row.index
                    ));
                }
            }
        }
        Ok(notes)
    }

    /// This host's partitions as the broker has them, page by page (a
    /// lender may have far more partitions than one page holds).
    async fn partitions_at_broker(&self) -> Result<HashMap<u32, PartitionView>, AgentError> {
        const PAGE: u32 = 1000;
        let mut all = HashMap::new();
        let mut after = None;
        loop {
            let page = self
                .broker
                .list_host_partitions(self.host_id(), after, PAGE)
                .await?;
            let full = page.len() as u32 >= PAGE;
            after = page.last().map(|p| p.partition.index);
            for view in page {
                if view.partition.host_id == self.host_id() {
                    all.insert(view.partition.index, view);
                }
            }
            if !full || after.is_none() {
                return Ok(all);
            }
        }
    }

    /// Partitions the broker offers but this host no longer has (an add
    /// whose answer was lost, a lost data directory) are withdrawn, so
    /// nobody leases a partition that cannot run jobs.
    async fn withdraw_unknown_at_broker(
        &self,
        at_broker: &HashMap<u32, PartitionView>,
        rows: &[AgentPartitionRow],
    ) -> Result<Vec<String>, AgentError> {
        let mut notes = Vec::new();
        for (index, view) in at_broker {
            let unknown = !rows.iter().any(|r| r.index == *index);
            if unknown && !view.withdrawn && view.lease_id.is_none() {
                self.broker
                    .withdraw_partition(self.host_id(), *index)
                    .await?;
                notes.push(format!(
                    "partition {index}: unknown here, withdrawn at the broker"
                ));
            }
        }
        Ok(notes)
    }

    /// One partition the broker offers: its fence first, then its terms.
    async fn reconcile_row(
        &self,
        mut row: AgentPartitionRow,
        view: &PartitionView,
        notes: &mut Vec<String>,
    ) -> Result<(), AgentError> {
        self.settle_fence_with_broker(&mut row, view, notes)?;
        if view.terms != row.terms && row.fence.lease_id().is_none() {
            self.take_brokers_terms(&mut row, view, notes);
        }
        row.registered = true;
        self.db().update_terms_and_registration(&row)?;
        // Terms that changed here (the isolation) while the broker offers
        // the old ones: register them again, unless leased (locked; the
        // next start tries again).
        if view.terms != row.terms && view.lease_id.is_none() && row.fence.lease_id().is_none() {
            self.register_row(&mut row).await?;
            notes.push(format!(
                "partition {}: terms registered again with the broker",
                row.index
            ));
        }
        Ok(())
    }

    /// The fence against the broker's record (`FenceEvent::Reconcile`).
    fn settle_fence_with_broker(
        &self,
        row: &mut AgentPartitionRow,
        view: &PartitionView,
        notes: &mut Vec<String>,
    ) -> Result<(), AgentError> {
        let before = row.fence;
        let decided = self.drive_fence(
            row.index,
            FenceEvent::Reconcile {
                broker_epoch: view.epoch,
                broker_lease_id: view.lease_id,
            },
        )?;
        row.fence = decided.fence;
        match (before.lease_id(), row.fence.lease_id()) {
            (_, Some(adopted)) if before.lease_id() != Some(adopted) => notes.push(format!(
                "partition {}: adopted lease {adopted} from the broker",
                row.index
            )),
            (Some(_), None) => notes.push(format!(
                "partition {}: its lease ended while the agent was away; wiped",
                row.index
            )),
            (None, None) if before.built() => notes.push(format!(
                "partition {}: wiped what an ended lease left",
                row.index
            )),
            _ => {}
        }
        Ok(())
    }

    /// The broker's record wins: the lender altered it there while this
    /// agent was away. The isolation stays this driver's: only it knows.
    fn take_brokers_terms(
        &self,
        row: &mut AgentPartitionRow,
        view: &PartitionView,
        notes: &mut Vec<String>,
    ) {
        let mut adopted = view.terms.clone();
        adopted.isolation = row.terms.isolation;
        match self.validate_terms(&adopted, Some(row.index)) {
            Ok(()) => {
                row.terms = adopted;
                notes.push(format!(
                    "partition {}: terms taken from the broker's record",
                    row.index
                ));
            }
            Err(error) => notes.push(format!(
                "partition {}: the broker's terms do not fit this host ({error}); keys carrying them will be refused",
                row.index
            )),
        }
    }
}
