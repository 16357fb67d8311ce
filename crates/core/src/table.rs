//! The broker's resource table (FIG. 3) as pure data: principals, hosts,
//! partitions, the free index, the active leases, the last lease id and the
//! idempotency records. It changes only by [`Change`]s, applied in one
//! place ([`ResourceTable::apply`]); a batch's changes that are not
//! committed yet sit in an [`Overlay`] on top of it, and decisions read both
//! through a [`TableView`], so later commands of a batch see earlier ones
//! while readers of the table see committed state only.

use crate::calendar::{Booking, Calendar, Interval};
use crate::ids::{LeaseId, PartitionRef};
use crate::lease::{Bill, Lease, PartitionStatus};
use crate::ledger::Transfer;
use crate::matching::{explain_no_match, FitKey, FreeIndex, NoMatchExplanation};
use crate::reservation::{HostSample, ReservationBook, ReservationChange, SampleWindow};
use crate::role::Role;
use crate::terms::{HostCapacity, Requirements, Terms};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Idempotency records are honoured for a day after the lease they
/// concluded, and forgotten after.
pub const IDEMPOTENCY_RETENTION_MS: u64 = 24 * 3600 * 1000;

/// Someone the broker knows by a token (only the token's hash is kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    /// A host credential acts for its lender on this one host only.
    pub host_scope: Option<String>,
}

/// A token that acts for `lender` on `host_id` only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCredentialRow {
    pub token_sha256: String,
    pub lender: String,
    pub host_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRow {
    pub host_id: String,
    pub lender: String,
    pub agent_url: Option<String>,
    /// The host's size at this broker: all of it less the owner share, or
    /// the share the host gave this broker.
    pub capacity: HostCapacity,
    /// With a share (seed 000, FIG. 12-15) the broker carves partitions
    /// out of `capacity` at lease time; `None` offers fixed partitions.
    pub share: Option<crate::share::ShareOffer>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionRow {
    pub partition: PartitionRef,
    pub terms: Terms,
    pub epoch: u64,
    pub lease_id: Option<LeaseId>,
    pub withdrawn: bool,
}

#[derive(Debug, Clone)]
pub struct HostEntry {
    pub row: HostRow,
    pub partitions: BTreeSet<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionEntry {
    pub terms: Terms,
    pub epoch: u64,
    pub lease_id: Option<LeaseId>,
    pub withdrawn: bool,
    /// When it is leased or reserved; kept across alterations of the row.
    pub calendar: Calendar,
}

impl PartitionEntry {
    pub fn status(&self) -> PartitionStatus {
        PartitionStatus::of(self.withdrawn, self.lease_id)
    }

    /// Free for a new lease now: neither leased nor withdrawn.
    pub fn is_free(&self) -> bool {
        self.status() == PartitionStatus::Free
    }

    pub fn row(&self, partition: &PartitionRef) -> PartitionRow {
        PartitionRow {
            partition: partition.clone(),
            terms: self.terms.clone(),
            epoch: self.epoch,
            lease_id: self.lease_id,
            withdrawn: self.withdrawn,
        }
    }

    /// The entry of `row`, with the calendar it had (`calendar`).
    pub fn from_row(row: &PartitionRow, calendar: Calendar) -> Self {
        PartitionEntry {
            terms: row.terms.clone(),
            epoch: row.epoch,
            lease_id: row.lease_id,
            withdrawn: row.withdrawn,
            calendar,
        }
    }
}

/// One state change the broker makes; a decided command implies a list of
/// them. The writes persisted are derived from these (in `store`), and the
/// same changes are applied to the table after their batch commits.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    AddPrincipal {
        name: String,
        role: Role,
        token_sha256: String,
        at_ms: u64,
    },
    AddHostCredential {
        credential: HostCredentialRow,
        at_ms: u64,
    },
    /// Registers a host or replaces its row (its partitions stay).
    PutHost {
        host: HostRow,
        at_ms: u64,
    },
    /// A partition's whole row: new, altered, leased, freed or withdrawn.
    PutPartition(PartitionRow),
    StartLease(Lease),
    /// The lease as released, its bill and the transfers that settle it.
    EndLease {
        lease: Lease,
        bill: Bill,
        transfers: Vec<Transfer>,
    },
    /// An interval booked in a partition's calendar.
    Book {
        partition: PartitionRef,
        interval: Interval,
    },
    /// A booking's interval is over and forgotten (its lease was released).
    Unbook {
        partition: PartitionRef,
        booking: Booking,
    },
    /// A lease request with an idempotency key concluded `lease_id`.
    RememberIdempotency {
        principal: String,
        key: String,
        lease_id: LeaseId,
        at_ms: u64,
    },
    /// Idempotency records older than `before_ms` are forgotten.
    ForgetIdempotency {
        before_ms: u64,
    },
    /// The agent acknowledged the lease's release notice (or never will).
    ForgetReleaseNotice {
        lease_id: LeaseId,
    },
    /// Workloads, pools and the planner's counters (seed 003).
    Reservation(ReservationChange),
    /// A host's sample of free capacity: kept in memory only (the agent
    /// samples again every interval, so a restart loses one interval).
    RecordSample {
        host_id: String,
        sample: HostSample,
    },
}

/// The committed resource table, shared with readers.
#[derive(Debug, Default)]
pub struct ResourceTable {
    pub principals_by_token_sha256: HashMap<String, Principal>,
    pub principal_names: HashMap<String, Role>,
    pub hosts: HashMap<String, HostEntry>,
    /// The hosts that lend a share to carve (seed 000, FIG. 12-15): a find
    /// or a lease by requirements looks at these, not at every host.
    pub hosts_with_shares: BTreeSet<String>,
    pub partitions: BTreeMap<PartitionRef, PartitionEntry>,
    pub free: FreeIndex,
    pub active_leases: HashMap<LeaseId, Lease>,
    /// How many non-withdrawn partitions offer each image.
    pub image_offers: BTreeMap<String, u64>,
    /// (principal, idempotency key) -> (the lease, when it was concluded).
    pub idempotent_leases: HashMap<(String, String), (LeaseId, u64)>,
    pub last_lease_id: LeaseId,
    /// Workloads and their acquisition pools (seed 003).
    pub reservations: ReservationBook,
    /// Each host's recent samples, for the planner's forecast.
    pub samples: HashMap<String, SampleWindow>,
}

impl ResourceTable {
    pub fn authenticate(&self, token_sha256: &str) -> Option<&Principal> {
        self.principals_by_token_sha256.get(token_sha256)
    }

    /// Applies one change; the only way the table changes.
    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::AddPrincipal {
                name,
                role,
                token_sha256,
                ..
            } => {
                self.principal_names.insert(name.clone(), *role);
                self.principals_by_token_sha256
                    .insert(token_sha256.clone(), principal(name, *role, None));
            }
            Change::AddHostCredential { credential, .. } => {
                self.principals_by_token_sha256.insert(
                    credential.token_sha256.clone(),
                    credential_principal(credential),
                );
            }
            Change::PutHost { host, .. } => {
                if host.share.is_some() {
                    self.hosts_with_shares.insert(host.host_id.clone());
                } else {
                    self.hosts_with_shares.remove(&host.host_id);
                }
                self.hosts
                    .entry(host.host_id.clone())
                    .and_modify(|entry| entry.row = host.clone())
                    .or_insert_with(|| new_host_entry(host));
            }
            Change::PutPartition(row) => self.put_partition(row),
            Change::Book {
                partition,
                interval,
            } => {
                if let Some(entry) = self.partitions.get_mut(partition) {
                    // Decided against this very calendar: it cannot overlap.
                    let _ = entry.calendar.book(*interval);
                }
            }
            Change::Unbook { partition, booking } => {
                if let Some(entry) = self.partitions.get_mut(partition) {
                    entry.calendar.unbook(*booking);
                }
            }
            Change::StartLease(lease) => {
                self.last_lease_id = self.last_lease_id.max(lease.lease_id);
                self.active_leases.insert(lease.lease_id, lease.clone());
            }
            Change::EndLease { lease, .. } => {
                self.active_leases.remove(&lease.lease_id);
            }
            Change::RememberIdempotency {
                principal,
                key,
                lease_id,
                at_ms,
            } => {
                self.idempotent_leases
                    .insert((principal.clone(), key.clone()), (*lease_id, *at_ms));
            }
            Change::ForgetIdempotency { before_ms } => {
                self.idempotent_leases
                    .retain(|_, (_, at_ms)| *at_ms >= *before_ms);
            }
            Change::ForgetReleaseNotice { .. } => {}
            Change::Reservation(change) => self.reservations.apply(change),
            Change::RecordSample { host_id, sample } => {
                self.samples
                    .entry(host_id.clone())
                    .or_default()
                    .push(*sample);
            }
        }
    }

    fn put_partition(&mut self, row: &PartitionRow) {
        let previous = self.partitions.remove(&row.partition);
        if let Some(previous) = &previous {
            self.unindex_partition(&row.partition, previous);
        }
        let calendar = previous.map(|p| p.calendar).unwrap_or_default();
        let entry = PartitionEntry::from_row(row, calendar);
        self.index_partition(&row.partition, &entry);
        if let Some(host) = self.hosts.get_mut(&row.partition.host_id) {
            host.partitions.insert(row.partition.index);
        }
        self.partitions.insert(row.partition.clone(), entry);
    }

    /// Adds a partition's contribution to the free index and image counts.
    fn index_partition(&mut self, partition: &PartitionRef, entry: &PartitionEntry) {
        if entry.withdrawn {
            return;
        }
        for image in &entry.terms.images {
            // Most images are offered already: count without allocating.
            match self.image_offers.get_mut(image) {
                Some(count) => *count += 1,
                None => {
                    self.image_offers.insert(image.clone(), 1);
                }
            }
        }
        if entry.lease_id.is_none() {
            self.free.insert(partition.clone(), entry.terms.clone());
        }
    }

    /// Removes what [`Self::index_partition`] added.
    fn unindex_partition(&mut self, partition: &PartitionRef, entry: &PartitionEntry) {
        if entry.withdrawn {
            return;
        }
        for image in &entry.terms.images {
            if let Some(count) = self.image_offers.get_mut(image) {
                *count -= 1;
                if *count == 0 {
                    self.image_offers.remove(image);
                }
            }
        }
        if entry.lease_id.is_none() {
            self.free.remove(partition, &entry.terms);
        }
    }

    /// After a failed commit: lease ids and epochs the lost batch used are
    /// never handed out again, whatever the database says.
    pub fn keep_high_water_marks(&mut self, overlay: &Overlay) {
        self.last_lease_id = self.last_lease_id.max(overlay.last_lease_id);
        for (partition, entry) in &overlay.partitions {
            if let Some(committed) = self.partitions.get_mut(partition) {
                committed.epoch = committed.epoch.max(entry.epoch);
            }
        }
    }
}

fn principal(name: &str, role: Role, host_scope: Option<String>) -> Principal {
    Principal {
        name: name.to_string(),
        role,
        host_scope,
    }
}

fn credential_principal(credential: &HostCredentialRow) -> Principal {
    principal(
        &credential.lender,
        Role::Lender,
        Some(credential.host_id.clone()),
    )
}

fn new_host_entry(host: &HostRow) -> HostEntry {
    HostEntry {
        row: host.clone(),
        partitions: BTreeSet::new(),
    }
}

/// The changes of a batch that has not committed yet: only what the batch
/// touched, never a copy of the table. Dropped when the commit fails.
#[derive(Debug, Default)]
pub struct Overlay {
    principal_names: HashMap<String, Role>,
    hosts: HashMap<String, HostEntry>,
    /// The newest version of every partition the batch touched.
    partitions: HashMap<PartitionRef, PartitionEntry>,
    /// Those of them that are free now.
    free: FreeIndex,
    /// Images offered minus images no longer offered, by image.
    image_offer_delta: HashMap<String, i64>,
    /// Leases started (`Some`) or ended (`None`) in the batch.
    leases: HashMap<LeaseId, Option<Lease>>,
    released: HashMap<LeaseId, (Lease, Bill)>,
    idempotency: HashMap<(String, String), (LeaseId, u64)>,
    idempotency_forgotten_before_ms: Option<u64>,
    last_lease_id: LeaseId,
    /// The batch's copy of the reservation book, made on its first change.
    reservations: Option<ReservationBook>,
    /// The batch's copies of the sample windows it recorded into.
    samples: HashMap<String, SampleWindow>,
}

impl Overlay {
    pub fn is_empty(&self) -> bool {
        self.partitions.is_empty() && self.hosts.is_empty() && self.leases.is_empty()
    }

    /// Records `change` on top of `base`, as [`ResourceTable::apply`] will
    /// once the batch commits.
    pub fn apply(&mut self, base: &ResourceTable, change: &Change) {
        match change {
            Change::AddPrincipal { name, role, .. } => {
                self.principal_names.insert(name.clone(), *role);
            }
            Change::AddHostCredential { .. } | Change::ForgetReleaseNotice { .. } => {}
            Change::PutHost { host, .. } => {
                let entry = self.host_entry_mut(base, &host.host_id);
                match entry {
                    Some(entry) => entry.row = host.clone(),
                    None => {
                        self.hosts
                            .insert(host.host_id.clone(), new_host_entry(host));
                    }
                }
            }
            Change::PutPartition(row) => self.put_partition(base, row),
            Change::Book {
                partition,
                interval,
            } => {
                if let Some(entry) = self.partition_entry_mut(base, partition) {
                    let _ = entry.calendar.book(*interval);
                }
            }
            Change::Unbook { partition, booking } => {
                if let Some(entry) = self.partition_entry_mut(base, partition) {
                    entry.calendar.unbook(*booking);
                }
            }
            Change::StartLease(lease) => {
                self.last_lease_id = self.last_lease_id.max(lease.lease_id);
                self.leases.insert(lease.lease_id, Some(lease.clone()));
            }
            Change::EndLease { lease, bill, .. } => {
                self.leases.insert(lease.lease_id, None);
                self.released.insert(lease.lease_id, (lease.clone(), *bill));
            }
            Change::RememberIdempotency {
                principal,
                key,
                lease_id,
                at_ms,
            } => {
                self.idempotency
                    .insert((principal.clone(), key.clone()), (*lease_id, *at_ms));
            }
            Change::ForgetIdempotency { before_ms } => {
                self.idempotency
                    .retain(|_, (_, at_ms)| *at_ms >= *before_ms);
                self.idempotency_forgotten_before_ms = Some(*before_ms);
            }
            Change::Reservation(change) => self
                .reservations
                .get_or_insert_with(|| base.reservations.clone())
                .apply(change),
            Change::RecordSample { host_id, sample } => self
                .samples
                .entry(host_id.clone())
                .or_insert_with(|| base.samples.get(host_id).cloned().unwrap_or_default())
                .push(*sample),
        }
    }

    /// The batch's copy of a host, made from the table's on first touch.
    fn host_entry_mut(&mut self, base: &ResourceTable, host_id: &str) -> Option<&mut HostEntry> {
        if !self.hosts.contains_key(host_id) {
            let committed = base.hosts.get(host_id)?.clone();
            self.hosts.insert(host_id.to_string(), committed);
        }
        self.hosts.get_mut(host_id)
    }

    /// The batch's copy of a partition, made from the table's on first touch.
    fn partition_entry_mut(
        &mut self,
        base: &ResourceTable,
        partition: &PartitionRef,
    ) -> Option<&mut PartitionEntry> {
        if !self.partitions.contains_key(partition) {
            let committed = base.partitions.get(partition)?.clone();
            if committed.is_free() {
                self.free.insert(partition.clone(), committed.terms.clone());
            }
            self.partitions.insert(partition.clone(), committed);
        }
        self.partitions.get_mut(partition)
    }

    fn put_partition(&mut self, base: &ResourceTable, row: &PartitionRow) {
        let previous = match self.partitions.get(&row.partition) {
            Some(entry) => Some(entry.clone()),
            None => base.partitions.get(&row.partition).cloned(),
        };
        if let Some(previous) = &previous {
            self.count_images(previous, -1);
            self.free.remove(&row.partition, &previous.terms);
        }
        let calendar = previous.map(|p| p.calendar).unwrap_or_default();
        let entry = PartitionEntry::from_row(row, calendar);
        self.count_images(&entry, 1);
        if entry.is_free() {
            self.free.insert(row.partition.clone(), entry.terms.clone());
        }
        // A lease or release changes a partition the host lists already:
        // the host is copied into the batch only for a new partition.
        let listed = TableView::new(base, self)
            .host(&row.partition.host_id)
            .is_some_and(|host| host.partitions.contains(&row.partition.index));
        if !listed {
            if let Some(host) = self.host_entry_mut(base, &row.partition.host_id) {
                host.partitions.insert(row.partition.index);
            }
        }
        self.partitions.insert(row.partition.clone(), entry);
    }

    fn count_images(&mut self, entry: &PartitionEntry, sign: i64) {
        if entry.withdrawn {
            return;
        }
        for image in &entry.terms.images {
            *self.image_offer_delta.entry(image.clone()).or_insert(0) += sign;
        }
    }
}

/// The table as a command of the batch sees it: committed state with the
/// batch's earlier changes on top.
#[derive(Clone, Copy)]
pub struct TableView<'a> {
    pub base: &'a ResourceTable,
    pub overlay: &'a Overlay,
}

impl<'a> TableView<'a> {
    pub fn new(base: &'a ResourceTable, overlay: &'a Overlay) -> Self {
        TableView { base, overlay }
    }

    pub fn principal_exists(&self, name: &str) -> bool {
        self.overlay.principal_names.contains_key(name)
            || self.base.principal_names.contains_key(name)
    }

    pub fn host(&self, host_id: &str) -> Option<&'a HostEntry> {
        self.overlay
            .hosts
            .get(host_id)
            .or_else(|| self.base.hosts.get(host_id))
    }

    /// Every host: the batch's copies, then the committed ones it did not
    /// touch.
    /// The hosts lending a share now: the committed ones (less those the
    /// batch took theirs from) and those the batch gave one.
    pub fn hosts_with_shares(&self) -> impl Iterator<Item = &'a HostEntry> + 'a {
        let (overlay, base) = (self.overlay, self.base);
        let committed = base
            .hosts_with_shares
            .iter()
            .filter(move |host_id| !overlay.hosts.contains_key(*host_id))
            .filter_map(move |host_id| base.hosts.get(host_id));
        overlay
            .hosts
            .values()
            .filter(|entry| entry.row.share.is_some())
            .chain(committed)
    }

    pub fn hosts(&self) -> impl Iterator<Item = &'a HostEntry> + 'a {
        let overlay = self.overlay;
        overlay.hosts.values().chain(
            self.base
                .hosts
                .iter()
                .filter(move |(host_id, _)| !overlay.hosts.contains_key(*host_id))
                .map(|(_, entry)| entry),
        )
    }

    pub fn reservations(&self) -> &'a ReservationBook {
        self.overlay
            .reservations
            .as_ref()
            .unwrap_or(&self.base.reservations)
    }

    pub fn sample_window(&self, host_id: &str) -> Option<&'a SampleWindow> {
        self.overlay
            .samples
            .get(host_id)
            .or_else(|| self.base.samples.get(host_id))
    }

    pub fn partition(&self, partition: &PartitionRef) -> Option<&'a PartitionEntry> {
        self.overlay
            .partitions
            .get(partition)
            .or_else(|| self.base.partitions.get(partition))
    }

    pub fn active_lease(&self, lease_id: LeaseId) -> Option<&'a Lease> {
        match self.overlay.leases.get(&lease_id) {
            Some(started_or_ended) => started_or_ended.as_ref(),
            None => self.base.active_leases.get(&lease_id),
        }
    }

    /// A lease released earlier in this batch, with its bill.
    pub fn released_in_batch(&self, lease_id: LeaseId) -> Option<&'a (Lease, Bill)> {
        self.overlay.released.get(&lease_id)
    }

    pub fn last_lease_id(&self) -> LeaseId {
        self.base.last_lease_id.max(self.overlay.last_lease_id)
    }

    /// The lease an idempotency key concluded, while its record is at most
    /// [`IDEMPOTENCY_RETENTION_MS`] old at `now_ms`: an older one is
    /// forgotten whether or not the periodic prune has removed it yet.
    pub fn idempotent_lease(&self, principal: &str, key: &str, now_ms: u64) -> Option<LeaseId> {
        let wanted = (principal.to_string(), key.to_string());
        if let Some((lease_id, _)) = self.overlay.idempotency.get(&wanted) {
            return Some(*lease_id);
        }
        let forgotten_before_ms = self.overlay.idempotency_forgotten_before_ms.unwrap_or(0);
        self.base
            .idempotent_leases
            .get(&wanted)
            .filter(|(_, at_ms)| *at_ms >= forgotten_before_ms)
            .filter(|(_, at_ms)| now_ms.saturating_sub(*at_ms) <= IDEMPOTENCY_RETENTION_MS)
            .map(|(lease_id, _)| *lease_id)
    }

    /// The terms of `host_id`'s other partitions still offered (not
    /// withdrawn): what a new or altered partition must fit beside.
    pub fn other_offered_terms(&self, host: &'a HostEntry, index: u32) -> Vec<&'a Terms> {
        host.partitions
            .iter()
            .filter(|other| **other != index)
            .filter_map(|other| {
                self.partition(&PartitionRef::new(host.row.host_id.clone(), *other))
            })
            .filter(|entry| !entry.withdrawn)
            .map(|entry| &entry.terms)
            .collect()
    }

    /// Every image offered by some partition that is not withdrawn.
    pub fn offered_images(&self) -> Vec<&'a str> {
        let overlay = &self.overlay.image_offer_delta;
        let mut images: Vec<&str> = self
            .base
            .image_offers
            .iter()
            .filter(|(image, count)| **count as i64 + overlay.get(*image).copied().unwrap_or(0) > 0)
            .map(|(image, _)| image.as_str())
            .collect();
        images.extend(
            overlay
                .iter()
                .filter(|(image, delta)| {
                    **delta > 0 && !self.base.image_offers.contains_key(*image)
                })
                .map(|(image, _)| image.as_str()),
        );
        images.sort_unstable();
        images
    }

    /// Up to `limit` free partitions matching `requirements`, in answer
    /// order (cheapest, then best fit, then name), counting the batch's
    /// changes: a partition the batch leased is not free any more.
    pub fn find_free(
        &self,
        requirements: &Requirements,
        limit: usize,
    ) -> Vec<(PartitionRef, Terms)> {
        let touched = &self.overlay.partitions;
        let mut found = self.base.free.find_where(requirements, limit, |partition| {
            !touched.contains_key(partition)
        });
        found.extend(self.overlay.free.find(requirements, limit));
        found.sort_by_cached_key(|(partition, terms)| FitKey::new(partition.clone(), terms));
        found.truncate(limit);
        found
    }

    /// Why nothing matches `requirements`: what each requirement ruled out.
    pub fn explain(&self, requirements: &Requirements) -> NoMatchExplanation {
        let touched = &self.overlay.partitions;
        let committed = self
            .base
            .partitions
            .iter()
            .filter(|(partition, _)| !touched.contains_key(*partition));
        explain_no_match(
            committed
                .chain(touched.iter())
                .filter(|(_, entry)| !entry.withdrawn)
                .map(|(partition, entry)| (partition, &entry.terms, entry.lease_id.is_some())),
            requirements,
        )
    }
}
