//! The invariants, checked after every step against the broker's API and
//! the store read directly: no partition leased twice, every acknowledged
//! lease and release survives, every lease billed at most once and exactly
//! once when released (by the core's rule), the ledger sums to zero per
//! asset, and find answers what the model says is free.

use super::model::ModelLease;
use super::Sim;
use leasehold_api::PartitionView;
use leasehold_core::lease::{Lease, LeaseState};
use leasehold_core::ledger::Transfer;
use leasehold_core::{PartitionRef, Requirements};
use std::collections::{BTreeMap, BTreeSet};

/// Most offers a find returns: enough for every simulated partition.
const FIND_ALL_LIMIT: u32 = 1_000;
/// Bills are checked every this many steps: a bill signs the key of each
/// active lease it lists, which is slow in a debug build.
const BILL_CHECK_INTERVAL_STEPS: u64 = 10;
/// Leases a bill lists: the broker's default page.
const BILL_PAGE: usize = 1_000;

impl Sim {
    pub(super) async fn check_invariants(&mut self) -> Result<(), String> {
        self.counters.invariant_checks += 1;
        let views = self.check_partitions_via_api().await?;
        let leases = self.check_leases_in_store(&views)?;
        let transfers = self.check_ledger().await?;
        self.check_find_shows_the_free().await?;
        self.check_agent_fences()?;
        self.record(format!(
            "check ok: {} partitions, {leases} leases, {transfers} transfers",
            views.len()
        ));
        Ok(())
    }

    /// Every partition as the model has it; a leased one shows its lease,
    /// with that lease's epoch; no lease on two partitions.
    async fn check_partitions_via_api(
        &mut self,
    ) -> Result<BTreeMap<PartitionRef, PartitionView>, String> {
        let views: BTreeMap<PartitionRef, PartitionView> = self
            .broker
            .all_partitions()
            .await
            .map_err(|e| format!("cannot list partitions: {e}"))?
            .into_iter()
            .map(|v| (v.partition.clone(), v))
            .collect();
        let seen: BTreeSet<&PartitionRef> = views.keys().collect();
        let known: BTreeSet<&PartitionRef> = self.model.partitions.keys().collect();
        if seen != known {
            return Err(format!(
                "the broker has partitions {seen:?}; the model {known:?}"
            ));
        }
        let mut lease_holders = BTreeMap::new();
        for (partition, view) in &views {
            let entry = &self.model.partitions[partition];
            let lease_epoch = entry.lease_id.map(|id| self.model.leases[&id].epoch);
            let wrong = view.terms != entry.terms
                || view.withdrawn != entry.withdrawn
                || view.lease_id != entry.lease_id
                || view.epoch < entry.last_lease_epoch
                || lease_epoch.is_some_and(|epoch| view.epoch != epoch);
            if wrong {
                return Err(format!(
                    "partition {partition} reads {view:?}; the model has {entry:?}"
                ));
            }
            if let Some(lease_id) = view.lease_id {
                if let Some(other) = lease_holders.insert(lease_id, partition) {
                    return Err(format!("lease {lease_id} holds {other} and {partition}"));
                }
            }
        }
        Ok(views)
    }

    /// The store holds exactly the model's leases, each as acknowledged;
    /// at most one active lease per partition, which shows it.
    fn check_leases_in_store(
        &mut self,
        views: &BTreeMap<PartitionRef, PartitionView>,
    ) -> Result<usize, String> {
        let stored = self
            .broker
            .store()
            .leases(&leasehold_store::broker::LeaseFilter::All, u32::MAX)
            .map_err(|e| format!("cannot read the leases from the store: {e}"))?;
        let mut active_on = BTreeMap::new();
        for lease in stored.iter().filter(|l| l.state == LeaseState::Active) {
            if let Some(other) = active_on.insert(lease.partition.clone(), lease.lease_id) {
                return Err(format!(
                    "partition {} leased twice: leases {other} and {} are both active",
                    lease.partition, lease.lease_id
                ));
            }
            let shown = views.get(&lease.partition).and_then(|v| v.lease_id);
            if shown != Some(lease.lease_id) {
                return Err(format!(
                    "lease {} is active but its partition {} shows {shown:?}",
                    lease.lease_id, lease.partition
                ));
            }
        }
        let stored_ids: BTreeSet<u64> = stored.iter().map(|l| l.lease_id).collect();
        let known_ids: BTreeSet<u64> = self.model.leases.keys().copied().collect();
        if stored_ids != known_ids {
            let lost: Vec<_> = known_ids.difference(&stored_ids).collect();
            let unknown: Vec<_> = stored_ids.difference(&known_ids).collect();
            return Err(format!(
                "acknowledged leases missing from the store: {lost:?}; leases nobody was told of: {unknown:?}"
            ));
        }
        for lease in &stored {
            let expected = as_stored(&self.model.leases[&lease.lease_id]);
            if lease != &expected {
                return Err(format!(
                    "lease {} is stored as {lease:?}; acknowledged as {expected:?}",
                    lease.lease_id
                ));
            }
        }
        Ok(stored.len())
    }

    /// Each released lease has exactly the transfers of its bill, an active
    /// one none; every asset sums to zero in the store and in the API.
    async fn check_ledger(&mut self) -> Result<usize, String> {
        let store = self.broker.store();
        let rows = store
            .transfers(None, u32::MAX)
            .map_err(|e| format!("cannot read the transfers from the store: {e}"))?;
        let count = rows.len();
        let mut by_lease: BTreeMap<u64, Vec<Transfer>> = BTreeMap::new();
        for (_, transfer) in rows {
            by_lease
                .entry(transfer.lease_id)
                .or_default()
                .push(transfer);
        }
        for (lease_id, lease) in &self.model.leases {
            let mut actual = by_lease.remove(lease_id).unwrap_or_default();
            let mut expected = self.model.expected_transfers(lease);
            actual.sort_by(|a, b| a.credit_account.cmp(&b.credit_account));
            expected.sort_by(|a, b| a.credit_account.cmp(&b.credit_account));
            if actual != expected {
                return Err(format!(
                    "lease {lease_id} is billed {actual:?}; its bill is {expected:?}"
                ));
            }
        }
        if let Some((lease_id, transfers)) = by_lease.into_iter().next() {
            return Err(format!(
                "transfers for lease {lease_id} nobody knows: {transfers:?}"
            ));
        }
        let balances = store
            .balances_by_asset()
            .map_err(|e| format!("cannot read the balances from the store: {e}"))?;
        let mut sums: BTreeMap<String, i128> = BTreeMap::new();
        for balance in balances {
            *sums.entry(balance.asset).or_default() += balance.balance as i128;
        }
        if let Some((asset, sum)) = sums.iter().find(|(_, sum)| **sum != 0) {
            return Err(format!("the ledger sums to {sum} in {asset}, not zero"));
        }
        let ledger = self
            .broker
            .ledger()
            .await
            .map_err(|e| format!("cannot read the ledger: {e}"))?;
        if ledger.sum_micros != 0 {
            return Err(format!("the API's ledger sums to {}", ledger.sum_micros));
        }
        if self.step.is_multiple_of(BILL_CHECK_INTERVAL_STEPS) {
            self.check_borrower_bills().await?;
            self.check_release_notices().await?;
        }
        Ok(count)
    }

    /// A release notice is durable with its release: each host's
    /// revocation list (what its agent pulls) names exactly its released
    /// leases whose keys have not expired, in release order.
    pub(super) async fn check_release_notices(&mut self) -> Result<(), String> {
        let now_ms = self.now_ms();
        let host_ids: Vec<String> = self.model.hosts.keys().cloned().collect();
        for host_id in host_ids {
            let mut listed = BTreeSet::new();
            let mut after_seq = 0;
            loop {
                let page = self
                    .broker
                    .host_revocations(&host_id, after_seq)
                    .await
                    .map_err(|e| format!("cannot read host {host_id}'s revocations: {e}"))?;
                for revocation in &page.revocations {
                    if revocation.seq <= after_seq || !listed.insert(revocation.lease_id) {
                        return Err(format!(
                            "host {host_id}'s revocations repeat or go back: {page:?}"
                        ));
                    }
                    after_seq = revocation.seq;
                }
                if !page.more {
                    break;
                }
            }
            let released = self.model.released_with_live_keys_on(&host_id, now_ms);
            if listed != released {
                return Err(format!(
                    "host {host_id}'s revocations name leases {listed:?}; released with live keys: {released:?}"
                ));
            }
        }
        Ok(())
    }

    /// Each borrower's bill lists its leases and a balance of minus what
    /// its released leases were charged.
    pub(super) async fn check_borrower_bills(&mut self) -> Result<(), String> {
        for borrower in 0..self.borrowers {
            let bill = self
                .broker
                .borrower_bill(borrower)
                .await
                .map_err(|e| format!("cannot read borrower {borrower}'s bill: {e}"))?;
            let leases = self
                .model
                .leases
                .values()
                .filter(|l| l.borrower == borrower);
            let charged: i64 = leases
                .clone()
                .filter_map(|l| l.released.as_ref())
                .map(|r| r.bill.charge_micros as i64)
                .sum();
            let listed: BTreeSet<u64> = bill.leases.iter().map(|l| l.lease_id).collect();
            // The bill lists the newest leases, one default page of them.
            let known: BTreeSet<u64> = leases.map(|l| l.lease_id).rev().take(BILL_PAGE).collect();
            if bill.balance_micros != -charged || listed != known {
                return Err(format!(
                    "borrower {borrower}'s bill shows leases {listed:?} and balance {}; the model has {known:?} charged {charged}",
                    bill.balance_micros
                ));
            }
        }
        Ok(())
    }

    /// A find for everything answers exactly the partitions the model has
    /// free, in the core's order.
    async fn check_find_shows_the_free(&mut self) -> Result<(), String> {
        let everything = Requirements {
            allow_unisolated: true,
            ..Requirements::default()
        };
        let expect = self
            .model
            .expect_find(&everything, FIND_ALL_LIMIT as usize, "requirements");
        let found = self
            .broker
            .find(0, &everything, FIND_ALL_LIMIT)
            .await
            .map_err(|e| format!("cannot find: {e}"))?;
        let offers: Vec<_> = found
            .offers
            .into_iter()
            .map(|o| (o.partition, o.terms))
            .collect();
        if super::model::Expect::Succeeds(offers.clone()) != expect {
            return Err(format!("find shows {offers:?} free; the model {expect:?}"));
        }
        Ok(())
    }

    /// After a restart, the store's snapshot (what the broker rebuilt its
    /// state from) holds every acknowledged host, partition and active lease.
    pub(super) fn check_store_snapshot(&mut self) -> Result<(), String> {
        let snapshot = self
            .broker
            .store()
            .load()
            .map_err(|e| format!("cannot load the store: {e}"))?;
        let hosts: BTreeMap<&str, _> = snapshot
            .hosts
            .iter()
            .map(|h| (h.host_id.as_str(), (h.lender.clone(), &h.capacity)))
            .collect();
        for (host_id, host) in &self.model.hosts {
            let acknowledged = (super::adapter::lender_name(host.lender), &host.capacity);
            if hosts.get(host_id.as_str()) != Some(&acknowledged) {
                return Err(format!(
                    "host {host_id} is not in the store as acknowledged"
                ));
            }
        }
        let rows: BTreeMap<&PartitionRef, _> = snapshot
            .partitions
            .iter()
            .map(|r| (&r.partition, r))
            .collect();
        for (partition, entry) in &self.model.partitions {
            let same = rows.get(partition).is_some_and(|row| {
                // The epoch never goes back below an acknowledged lease's:
                // keys of older epochs stay fenced after a restart.
                row.terms == entry.terms
                    && row.withdrawn == entry.withdrawn
                    && row.lease_id == entry.lease_id
                    && row.epoch >= entry.last_lease_epoch
            });
            if !same {
                return Err(format!(
                    "partition {partition} is not in the store as acknowledged"
                ));
            }
        }
        let active: BTreeSet<u64> = snapshot.active_leases.iter().map(|l| l.lease_id).collect();
        let expected: BTreeSet<u64> = self.model.active_lease_ids().into_iter().collect();
        if active != expected {
            return Err(format!(
                "after the restart the store's active leases are {active:?}; acknowledged {expected:?}"
            ));
        }
        self.record(format!("snapshot ok: {} active leases", active.len()));
        Ok(())
    }
}

/// How the store must hold a lease the model knows.
fn as_stored(lease: &ModelLease) -> Lease {
    Lease {
        lease_id: lease.lease_id,
        partition: lease.partition.clone(),
        borrower: super::adapter::borrower_name(lease.borrower),
        lender: super::adapter::lender_name(lease.lender),
        terms: lease.terms.clone(),
        epoch: lease.epoch,
        started_at_ms: lease.started_at_ms,
        key_expires_at_ms: lease.started_at_ms + leasehold_broker::DEFAULT_KEY_TTL_MS,
        state: if lease.released.is_some() {
            LeaseState::Released
        } else {
            LeaseState::Active
        },
        release_requested_at_ms: lease.released.as_ref().map(|r| r.at_ms),
        charge_micros: lease.released.as_ref().map(|r| r.bill.charge_micros),
        ends_at_ms: None,
    }
}
