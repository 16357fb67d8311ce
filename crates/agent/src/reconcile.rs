//! Start-up: register the host and bring the broker and the partition
//! table into agreement.

use crate::{Agent, AgentError};
use leasehold_api::{PartitionView, RegisterHostRequest};
use leasehold_core::fence::FenceEvent;
use leasehold_store::agent::AgentPartitionRow;
use std::collections::HashMap;

impl Agent {
    /// Registers the host with every market and brings each broker and
    /// the partition table into agreement. A market that cannot be reached
    /// is noted and left for the next start; the others go on.
    pub(crate) async fn register_and_reconcile(
        &self,
        advertise_url: &str,
    ) -> Result<Vec<String>, AgentError> {
        let mut notes = Vec::new();
        let mut unreachable = None;
        for position in 0..self.markets.len() {
            let reconciled = if self.markets[position].share.is_some() {
                self.reconcile_share_market(position, advertise_url).await
            } else {
                self.reconcile_fixed_market(position, advertise_url).await
            };
            match reconciled {
                Ok(mut done) => notes.append(&mut done),
                Err(AgentError::BrokerUnreachable(error)) if self.markets.len() > 1 => {
                    notes.push(format!(
                        "could not register with the broker at {}: {error}",
                        self.markets[position].url
                    ));
                }
                Err(AgentError::BrokerUnreachable(error)) => unreachable = Some(error),
                Err(other) => return Err(other),
            }
        }
        match unreachable {
            Some(error) => Err(AgentError::BrokerUnreachable(error)),
            None => Ok(notes),
        }
    }

    /// The market of the fixed partitions: partitions the broker lacks are
    /// registered, leases the broker knows are adopted (so the partition is
    /// locked here too), leases that ended while the agent was away are
    /// fenced and wiped.
    async fn reconcile_fixed_market(
        &self,
        position: usize,
        advertise_url: &str,
    ) -> Result<Vec<String>, AgentError> {
        let broker = &self.markets[position].client;
        broker
            .register_host(
                self.host_id(),
                &RegisterHostRequest {
                    agent_url: Some(advertise_url.to_string()),
                    capacity: self.config.capacity.clone(),
                    share: None,
                },
            )
            .await?;
        let at_broker = self.partitions_at_broker(broker).await?;
        let rows: Vec<AgentPartitionRow> = (self.db().partitions()?)
            .into_iter()
            .filter(|row| !self.is_carved(row.index))
            .collect();
        let mut notes = self
            .withdraw_unknown_at_broker(broker, &at_broker, &rows)
            .await?;
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

    /// A share market: the host is registered with the share's size and
    /// offer, and the fence of each partition it carved here is settled
    /// against its record (a lease released while the agent was away is
    /// wiped; one started is adopted).
    async fn reconcile_share_market(
        &self,
        position: usize,
        advertise_url: &str,
    ) -> Result<Vec<String>, AgentError> {
        let market = &self.markets[position];
        let share = market.share.as_ref().expect("a share market");
        let offer = market.share_offer(&self.driver.images(), self.config.driver.isolation());
        market
            .client
            .register_host(
                self.host_id(),
                &RegisterHostRequest {
                    agent_url: Some(advertise_url.to_string()),
                    capacity: share.capacity(),
                    share: offer,
                },
            )
            .await?;
        let at_broker = self.partitions_at_broker(&market.client).await?;
        let mut notes = vec![format!(
            "lending a share ({} vCPUs, {} MiB, {} GiB) through {}",
            share.vcpus, share.memory_mib, share.disk_gib, market.url
        )];
        let rows = self.db().partitions()?;
        for mut row in rows.into_iter().filter(|row| market.manages(row.index)) {
            let view = at_broker.get(&row.index).cloned().unwrap_or(PartitionView {
                partition: leasehold_core::PartitionRef::new(self.host_id(), row.index),
                terms: row.terms.clone(),
                lease_id: None,
                withdrawn: true,
                epoch: row.fence.epoch,
            });
            self.settle_fence_with_broker(&mut row, &view, &mut notes)?;
        }
        Ok(notes)
    }

    /// This host's partitions as the broker has them, page by page (a
    /// lender may have far more partitions than one page holds).
    async fn partitions_at_broker(
        &self,
        broker: &leasehold_api::Client,
    ) -> Result<HashMap<u32, PartitionView>, AgentError> {
        const PAGE: u32 = 1000;
        let mut all = HashMap::new();
        let mut after = None;
        loop {
            let page = broker
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
        broker: &leasehold_api::Client,
        at_broker: &HashMap<u32, PartitionView>,
        rows: &[AgentPartitionRow],
    ) -> Result<Vec<String>, AgentError> {
        let mut notes = Vec::new();
        for (index, view) in at_broker {
            let unknown = !rows.iter().any(|r| r.index == *index);
            if unknown && !view.withdrawn && view.lease_id.is_none() {
                broker.withdraw_partition(self.host_id(), *index).await?;
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
