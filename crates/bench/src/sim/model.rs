//! What the simulation believes the broker holds: every host, partition and
//! lease it was told about in an acknowledged answer (or found after an
//! unknown one), and what the broker must answer next. The rules come from
//! `core` (matching, capacity, billing), never from the broker's code.

use leasehold_core::lease::Bill;
use leasehold_core::ledger::{self, Transfer};
use leasehold_core::matching::naive_find;
use leasehold_core::{money, HostCapacity, PartitionRef, Requirements, Terms};
use std::collections::{BTreeMap, BTreeSet};

use super::adapter::{borrower_name, lender_name};

#[derive(Debug, Clone)]
pub struct ModelHost {
    pub lender: usize,
    pub capacity: HostCapacity,
}

#[derive(Debug, Clone)]
pub struct ModelPartition {
    pub terms: Terms,
    pub withdrawn: bool,
    pub lease_id: Option<u64>,
    /// The epoch of the last acknowledged lease: the next must be higher.
    pub last_lease_epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRelease {
    pub at_ms: u64,
    pub bill: Bill,
}

#[derive(Debug, Clone)]
pub struct ModelLease {
    pub lease_id: u64,
    pub partition: PartitionRef,
    pub borrower: usize,
    pub lender: usize,
    pub terms: Terms,
    pub epoch: u64,
    pub started_at_ms: u64,
    pub released: Option<ModelRelease>,
    /// The key the borrower was given; a simulated borrower may show it to
    /// the host's agent even after the release.
    pub lease_key: String,
}

/// What the broker must answer: success, or one of these refusals
/// (several when more than one applies, whichever it checks first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect<T> {
    Succeeds(T),
    RefusedWith(Vec<Refused>),
}

/// An error code, and the field it must name when it names one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub code: &'static str,
    pub field: Option<String>,
}

fn refused(code: &'static str) -> Refused {
    Refused { code, field: None }
}

fn refused_on(code: &'static str, field: String) -> Refused {
    Refused {
        code,
        field: Some(field),
    }
}

pub struct Model {
    pub hosts: BTreeMap<String, ModelHost>,
    pub partitions: BTreeMap<PartitionRef, ModelPartition>,
    pub leases: BTreeMap<u64, ModelLease>,
    pub commission_basis_points: u32,
}

impl Model {
    pub fn new(commission_basis_points: u32) -> Self {
        Model {
            hosts: BTreeMap::new(),
            partitions: BTreeMap::new(),
            leases: BTreeMap::new(),
            commission_basis_points,
        }
    }

    pub fn expect_register_host(&self, lender: usize, host_id: &str) -> Expect<()> {
        match self.hosts.get(host_id) {
            Some(host) if host.lender != lender => {
                Expect::RefusedWith(vec![refused("host_owned_by_another_lender")])
            }
            _ => Expect::Succeeds(()),
        }
    }

    fn owns(&self, lender: usize, host_id: &str) -> bool {
        self.hosts.get(host_id).is_some_and(|h| h.lender == lender)
    }

    /// Terms of the host's other partitions that take capacity (withdrawn
    /// ones do not).
    fn other_terms<'a>(&'a self, partition: &'a PartitionRef) -> impl Iterator<Item = &'a Terms> {
        self.partitions
            .iter()
            .filter(move |(p, e)| p.host_id == partition.host_id && *p != partition && !e.withdrawn)
            .map(|(_, e)| &e.terms)
    }

    pub fn expect_put_partition(
        &self,
        lender: usize,
        partition: &PartitionRef,
        terms: &Terms,
    ) -> Expect<()> {
        // Bad terms are refused whoever asks; the rest only to the owner.
        if let Err(error) = terms.validate(None) {
            return Expect::RefusedWith(vec![refused_on(
                "invalid_field",
                format!("terms.{}", error.field),
            )]);
        }
        if !self.owns(lender, &partition.host_id) {
            return Expect::RefusedWith(vec![refused("not_found")]);
        }
        let mut refusals = Vec::new();
        let capacity = &self.hosts[&partition.host_id].capacity;
        if let Err(error) = capacity.admits(self.other_terms(partition), terms) {
            refusals.push(refused_on(
                "invalid_field",
                format!("terms.{}", error.field),
            ));
        }
        if self.leased(partition) {
            refusals.push(refused("partition_locked"));
        }
        expect_from(refusals)
    }

    pub fn expect_withdraw(&self, lender: usize, partition: &PartitionRef) -> Expect<()> {
        if !self.owns(lender, &partition.host_id) || !self.partitions.contains_key(partition) {
            return Expect::RefusedWith(vec![refused("not_found")]);
        }
        if self.leased(partition) {
            return Expect::RefusedWith(vec![refused("partition_locked")]);
        }
        Expect::Succeeds(())
    }

    fn leased(&self, partition: &PartitionRef) -> bool {
        self.partitions
            .get(partition)
            .is_some_and(|e| e.lease_id.is_some())
    }

    /// Free partitions: registered, not withdrawn, not leased.
    fn free(&self) -> impl Iterator<Item = (&PartitionRef, &Terms)> {
        self.partitions
            .iter()
            .filter(|(_, e)| !e.withdrawn && e.lease_id.is_none())
            .map(|(p, e)| (p, &e.terms))
    }

    /// Whether an image a borrower asks for is offered by any partition
    /// that is not withdrawn (leased ones count).
    fn image_offered(&self, requirements: &Requirements) -> bool {
        let Some(image) = &requirements.image else {
            return true;
        };
        self.partitions
            .values()
            .filter(|e| !e.withdrawn)
            .flat_map(|e| e.terms.images.iter())
            .any(|offered| leasehold_core::image_ref::offers_image(offered, image))
    }

    /// What a find answers; bad requirements are named under
    /// `field_prefix` (`requirements` for a find, `best` for a lease).
    pub fn expect_find(
        &self,
        requirements: &Requirements,
        limit: usize,
        field_prefix: &str,
    ) -> Expect<Vec<(PartitionRef, Terms)>> {
        if let Err(error) = requirements.validate() {
            let field = format!("{field_prefix}.{}", error.field);
            return Expect::RefusedWith(vec![refused_on("invalid_field", field)]);
        }
        if !self.image_offered(requirements) {
            let field = format!("{field_prefix}.image");
            return Expect::RefusedWith(vec![refused_on("invalid_field", field)]);
        }
        Expect::Succeeds(naive_find(self.free(), requirements, limit))
    }

    pub fn expect_lease_named(
        &self,
        partition: &PartitionRef,
        allow_unisolated: bool,
    ) -> Expect<PartitionRef> {
        let Some(entry) = self.partitions.get(partition) else {
            return Expect::RefusedWith(vec![refused("not_found")]);
        };
        let mut refusals = Vec::new();
        if entry.withdrawn {
            refusals.push(refused("partition_withdrawn"));
        }
        if entry.lease_id.is_some() {
            refusals.push(refused("partition_taken"));
        }
        if entry.terms.is_unisolated() && !allow_unisolated {
            refusals.push(refused_on("invalid_field", "allow_unisolated".into()));
        }
        match expect_from(refusals) {
            Expect::Succeeds(()) => Expect::Succeeds(partition.clone()),
            Expect::RefusedWith(codes) => Expect::RefusedWith(codes),
        }
    }

    pub fn expect_lease_best(&self, requirements: &Requirements) -> Expect<PartitionRef> {
        match self.expect_find(requirements, 1, "best") {
            Expect::RefusedWith(refusals) => Expect::RefusedWith(refusals),
            Expect::Succeeds(found) => match found.into_iter().next() {
                Some((partition, _)) => Expect::Succeeds(partition),
                None => Expect::RefusedWith(vec![refused("no_match")]),
            },
        }
    }

    /// The bill of `lease` released at `at_ms`, by the core's rule: every
    /// started second at the lease's price, the commission rounded down.
    pub fn expected_bill(&self, lease: &ModelLease, at_ms: u64) -> Bill {
        let seconds = money::billable_seconds(lease.started_at_ms, at_ms);
        let charge = money::charge_micros(lease.terms.price_per_hour_micros, seconds)
            .expect("simulated prices are far below the overflow");
        let (lender_credit, commission) =
            money::split_commission(charge, self.commission_basis_points);
        Bill {
            billable_seconds: seconds,
            charge_micros: charge,
            lender_credit_micros: lender_credit,
            commission_micros: commission,
        }
    }

    /// The transfers a released lease must have in the ledger, exactly.
    pub fn expected_transfers(&self, lease: &ModelLease) -> Vec<Transfer> {
        match &lease.released {
            None => Vec::new(),
            Some(release) => ledger::settle(
                &release.bill,
                lease.lease_id,
                &borrower_name(lease.borrower),
                &lender_name(lease.lender),
                release.at_ms,
            ),
        }
    }

    /// Records a lease the broker concluded.
    pub fn record_lease(&mut self, lease: ModelLease) {
        if let Some(entry) = self.partitions.get_mut(&lease.partition) {
            entry.lease_id = Some(lease.lease_id);
            entry.last_lease_epoch = lease.epoch;
        }
        self.leases.insert(lease.lease_id, lease);
    }

    /// Records the release of an active lease at `at_ms`, with its bill.
    pub fn record_release(&mut self, lease_id: u64, at_ms: u64) {
        let Some(lease) = self.leases.get(&lease_id) else {
            return;
        };
        let bill = self.expected_bill(lease, at_ms);
        let partition = lease.partition.clone();
        if let Some(lease) = self.leases.get_mut(&lease_id) {
            lease.released = Some(ModelRelease { at_ms, bill });
        }
        if let Some(entry) = self.partitions.get_mut(&partition) {
            if entry.lease_id == Some(lease_id) {
                entry.lease_id = None;
            }
        }
    }

    pub fn record_put_partition(&mut self, partition: &PartitionRef, terms: &Terms) {
        let last_lease_epoch = self
            .partitions
            .get(partition)
            .map_or(0, |e| e.last_lease_epoch);
        self.partitions.insert(
            partition.clone(),
            ModelPartition {
                terms: terms.clone(),
                withdrawn: false,
                lease_id: None,
                last_lease_epoch,
            },
        );
    }

    pub fn record_withdraw(&mut self, partition: &PartitionRef) {
        if let Some(entry) = self.partitions.get_mut(partition) {
            entry.withdrawn = true;
        }
    }

    /// The borrower's active leases, in id order.
    pub fn active_leases_of(&self, borrower: usize) -> Vec<u64> {
        self.leases
            .values()
            .filter(|l| l.borrower == borrower && l.released.is_none())
            .map(|l| l.lease_id)
            .collect()
    }

    /// Every active lease, in id order.
    pub fn active_lease_ids(&self) -> Vec<u64> {
        self.leases
            .values()
            .filter(|l| l.released.is_none())
            .map(|l| l.lease_id)
            .collect()
    }

    /// The released leases of `host_id` whose keys still live at `now_ms`:
    /// what its revocation list must name (older ones may be pruned).
    pub fn released_with_live_keys_on(&self, host_id: &str, now_ms: u64) -> BTreeSet<u64> {
        self.leases
            .values()
            .filter(|l| l.partition.host_id == host_id && l.released.is_some())
            .filter(|l| l.started_at_ms + leasehold_broker::DEFAULT_KEY_TTL_MS > now_ms)
            .map(|l| l.lease_id)
            .collect()
    }

    pub fn highest_lease_id(&self) -> u64 {
        self.leases.keys().next_back().copied().unwrap_or(0)
    }
}

fn expect_from(refusals: Vec<Refused>) -> Expect<()> {
    if refusals.is_empty() {
        Expect::Succeeds(())
    } else {
        Expect::RefusedWith(refusals)
    }
}
