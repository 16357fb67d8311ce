//! The broker's in-memory resource table: principals, hosts, partitions,
//! the index of free partitions and the active leases. It is rebuilt from
//! SQLite at start and changed only by the writer, which persists every
//! change in the same batch before anyone is told it happened.

use crate::error::BrokerError;
use leasehold_api::Role;
use leasehold_core::lease::{
    decide_alter, decide_isolation, decide_lease, AlterRefusal, Lease, LeaseRefusal, LeaseState,
    PartitionStatus,
};
use leasehold_core::matching::{explain_no_match, FreeIndex};
use leasehold_core::{HostCapacity, LeaseId, PartitionRef, Requirements, Terms};
use leasehold_store::broker::{BrokerSnapshot, BrokerWrite, HostRow, PartitionRow};
use std::collections::{BTreeMap, BTreeSet, HashMap};

#[derive(Debug, Clone)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    /// A host credential acts for its lender on this one host only.
    pub host_scope: Option<String>,
}

#[derive(Debug, Clone)]
pub struct HostEntry {
    pub row: HostRow,
    pub partitions: BTreeSet<u32>,
}

#[derive(Debug, Clone)]
pub struct PartitionEntry {
    pub terms: Terms,
    pub epoch: u64,
    pub lease_id: Option<LeaseId>,
    pub withdrawn: bool,
}

impl PartitionEntry {
    pub fn status(&self) -> PartitionStatus {
        match (self.withdrawn, self.lease_id) {
            (true, _) => PartitionStatus::Withdrawn,
            (false, Some(lease_id)) => PartitionStatus::Leased { lease_id },
            (false, None) => PartitionStatus::Free,
        }
    }

    fn row(&self, partition: &PartitionRef) -> PartitionRow {
        PartitionRow {
            partition: partition.clone(),
            terms: self.terms.clone(),
            epoch: self.epoch,
            lease_id: self.lease_id,
            withdrawn: self.withdrawn,
        }
    }
}

/// Which partition a lease request wants.
#[derive(Debug, Clone)]
pub enum LeaseTarget {
    /// A partition by name; `allow_unisolated` is the borrower's opt-in.
    Named {
        partition: PartitionRef,
        allow_unisolated: bool,
    },
    Best(Requirements),
}

#[derive(Debug, Default)]
pub struct BrokerState {
    pub principals_by_token_sha256: HashMap<String, Principal>,
    pub principal_names: HashMap<String, Role>,
    pub hosts: HashMap<String, HostEntry>,
    pub partitions: BTreeMap<PartitionRef, PartitionEntry>,
    pub free: FreeIndex,
    pub active_leases: HashMap<LeaseId, Lease>,
    /// How many non-withdrawn partitions offer each image.
    pub image_offers: BTreeMap<String, u64>,
    /// (principal, idempotency key) -> the lease a lease request concluded.
    /// (principal, idempotency key) -> (the lease, when it was concluded).
    pub idempotent_leases: HashMap<(String, String), (LeaseId, u64)>,
    pub last_lease_id: LeaseId,
}

pub fn parse_role(text: &str) -> Option<Role> {
    match text {
        "lender" => Some(Role::Lender),
        "borrower" => Some(Role::Borrower),
        "admin" => Some(Role::Admin),
        _ => None,
    }
}

impl BrokerState {
    pub fn from_snapshot(snapshot: BrokerSnapshot) -> Result<Self, BrokerError> {
        let mut state = BrokerState {
            last_lease_id: snapshot.last_lease_id,
            ..Default::default()
        };
        for principal in snapshot.principals {
            let role = parse_role(&principal.role).ok_or_else(|| {
                BrokerError::Internal(format!("unknown role '{}' in principals", principal.role))
            })?;
            state.principal_names.insert(principal.name.clone(), role);
            state.principals_by_token_sha256.insert(
                principal.token_sha256,
                Principal {
                    name: principal.name,
                    role,
                    host_scope: None,
                },
            );
        }
        for credential in snapshot.host_credentials {
            state.principals_by_token_sha256.insert(
                credential.token_sha256,
                Principal {
                    name: credential.lender,
                    role: Role::Lender,
                    host_scope: Some(credential.host_id),
                },
            );
        }
        for host in snapshot.hosts {
            state.hosts.insert(
                host.host_id.clone(),
                HostEntry {
                    row: host,
                    partitions: BTreeSet::new(),
                },
            );
        }
        for row in snapshot.partitions {
            let entry = PartitionEntry {
                terms: row.terms,
                epoch: row.epoch,
                lease_id: row.lease_id,
                withdrawn: row.withdrawn,
            };
            state.index_partition(&row.partition, &entry);
            if let Some(host) = state.hosts.get_mut(&row.partition.host_id) {
                host.partitions.insert(row.partition.index);
            }
            state.partitions.insert(row.partition, entry);
        }
        for lease in snapshot.active_leases {
            state.active_leases.insert(lease.lease_id, lease);
        }
        for record in snapshot.idempotency {
            if let Ok(lease_id) = record.body.parse::<u64>() {
                state
                    .idempotent_leases
                    .insert((record.principal, record.key), (lease_id, record.at_ms));
            }
        }
        Ok(state)
    }

    /// After a failed commit the state is reloaded from the database; keys
    /// may already have been shown for the lost leases, so their lease ids
    /// and epochs must never be handed out again.
    pub fn keep_high_water_marks(&mut self, before: &BrokerState) {
        self.last_lease_id = self.last_lease_id.max(before.last_lease_id);
        for (partition, entry) in self.partitions.iter_mut() {
            if let Some(old) = before.partitions.get(partition) {
                entry.epoch = entry.epoch.max(old.epoch);
            }
        }
    }

    /// Forgets idempotency records older than `before_ms`.
    pub fn prune_idempotency(&mut self, before_ms: u64) {
        self.idempotent_leases
            .retain(|_, (_, at_ms)| *at_ms >= before_ms);
    }

    /// Adds a partition's contribution to the free index and image counts.
    fn index_partition(&mut self, partition: &PartitionRef, entry: &PartitionEntry) {
        if entry.withdrawn {
            return;
        }
        for image in &entry.terms.images {
            *self.image_offers.entry(image.clone()).or_insert(0) += 1;
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

    pub fn authenticate(&self, token_sha256: &str) -> Option<&Principal> {
        self.principals_by_token_sha256.get(token_sha256)
    }

    pub fn create_principal(
        &mut self,
        name: &str,
        role: Role,
        token_sha256: String,
        now_ms: u64,
        writes: &mut Vec<BrokerWrite>,
    ) -> Result<(), BrokerError> {
        leasehold_core::ids::validate_host_id("name", name)?;
        if self.principal_names.contains_key(name) {
            return Err(BrokerError::AlreadyExists(format!(
                "a principal named '{name}' exists already"
            )));
        }
        self.principal_names.insert(name.to_string(), role);
        self.principals_by_token_sha256.insert(
            token_sha256.clone(),
            Principal {
                name: name.to_string(),
                role,
                host_scope: None,
            },
        );
        writes.push(BrokerWrite::InsertPrincipal {
            name: name.to_string(),
            role: role.as_str().to_string(),
            token_sha256,
            at_ms: now_ms,
        });
        Ok(())
    }

    /// A credential acting for `lender` on `host_id` only. The host may not
    /// exist yet (the agent registers it with this credential); a host of
    /// another lender answers as if it did not exist.
    pub fn create_host_credential(
        &mut self,
        lender: &str,
        host_id: &str,
        token_sha256: String,
        now_ms: u64,
        writes: &mut Vec<BrokerWrite>,
    ) -> Result<(), BrokerError> {
        leasehold_core::ids::validate_host_id("host_id", host_id)?;
        if self
            .hosts
            .get(host_id)
            .is_some_and(|h| h.row.lender != lender)
        {
            return Err(BrokerError::NotFound("no such host is registered".into()));
        }
        let credential = leasehold_store::broker::HostCredentialRow {
            token_sha256: token_sha256.clone(),
            lender: lender.to_string(),
            host_id: host_id.to_string(),
        };
        self.principals_by_token_sha256.insert(
            token_sha256,
            Principal {
                name: lender.to_string(),
                role: Role::Lender,
                host_scope: Some(host_id.to_string()),
            },
        );
        writes.push(BrokerWrite::InsertHostCredential {
            credential,
            at_ms: now_ms,
        });
        Ok(())
    }

    pub fn register_host(
        &mut self,
        lender: &str,
        host_id: &str,
        agent_url: Option<String>,
        capacity: HostCapacity,
        now_ms: u64,
        writes: &mut Vec<BrokerWrite>,
    ) -> Result<HostRow, BrokerError> {
        leasehold_core::ids::validate_host_id("host_id", host_id)?;
        validate_capacity(&capacity)?;
        if let Some(url) = &agent_url {
            validate_agent_url(url)?;
        }
        // A host id is its first lender's: another lender re-registering it
        // would redirect its notices and take over its partitions.
        if let Some(existing) = self.hosts.get(host_id) {
            if existing.row.lender != lender {
                return Err(BrokerError::HostOwnedByAnotherLender {
                    host_id: host_id.to_string(),
                });
            }
        }
        let row = HostRow {
            host_id: host_id.to_string(),
            lender: lender.to_string(),
            agent_url,
            capacity,
        };
        let entry = self
            .hosts
            .entry(host_id.to_string())
            .or_insert_with(|| HostEntry {
                row: row.clone(),
                partitions: BTreeSet::new(),
            });
        entry.row = row.clone();
        writes.push(BrokerWrite::UpsertHost {
            host: row.clone(),
            at_ms: now_ms,
        });
        Ok(row)
    }

    fn owned_host(&self, lender: &str, host_id: &str) -> Result<&HostEntry, BrokerError> {
        // Another lender's host answers exactly as a host that does not
        // exist, so host ids reveal nothing to strangers.
        self.hosts
            .get(host_id)
            .filter(|host| host.row.lender == lender)
            .ok_or_else(|| BrokerError::NotFound("no such host is registered".to_string()))
    }

    /// Registers a new partition or alters one (S14-S17, S22-S29).
    pub fn put_partition(
        &mut self,
        lender: &str,
        partition: &PartitionRef,
        terms: Terms,
        writes: &mut Vec<BrokerWrite>,
    ) -> Result<PartitionRow, BrokerError> {
        terms.validate(None).map_err(|e| prefix_field("terms", e))?;
        let host = self.owned_host(lender, &partition.host_id)?;
        if partition.index == 0 {
            return Err(BrokerError::Invalid(leasehold_core::FieldError::new(
                "index",
                "partition indexes start at 1",
            )));
        }
        let others = host
            .partitions
            .iter()
            .filter(|index| **index != partition.index)
            .filter_map(|index| {
                self.partitions
                    .get(&PartitionRef::new(partition.host_id.clone(), *index))
            })
            .filter(|entry| !entry.withdrawn)
            .map(|entry| &entry.terms);
        host.row
            .capacity
            .admits(others, &terms)
            .map_err(|e| prefix_field("terms", e))?;
        let previous = self.partitions.get(partition).cloned();
        let epoch = match &previous {
            Some(entry) => {
                match decide_alter(entry.status()) {
                    Ok(()) | Err(AlterRefusal::Withdrawn) => {}
                    Err(AlterRefusal::Locked { lease_id }) => {
                        return Err(BrokerError::Locked {
                            partition: partition.clone(),
                            lease_id,
                        })
                    }
                }
                self.unindex_partition(partition, entry);
                entry.epoch
            }
            None => 0,
        };
        let entry = PartitionEntry {
            terms,
            epoch,
            lease_id: None,
            withdrawn: false,
        };
        self.index_partition(partition, &entry);
        let row = entry.row(partition);
        self.partitions.insert(partition.clone(), entry);
        if let Some(host) = self.hosts.get_mut(&partition.host_id) {
            host.partitions.insert(partition.index);
        }
        writes.push(BrokerWrite::UpsertPartition(row.clone()));
        Ok(row)
    }

    pub fn withdraw_partition(
        &mut self,
        lender: &str,
        partition: &PartitionRef,
        writes: &mut Vec<BrokerWrite>,
    ) -> Result<PartitionRow, BrokerError> {
        self.owned_host(lender, &partition.host_id)?;
        let entry = self.partitions.get(partition).cloned().ok_or_else(|| {
            BrokerError::NotFound(format!("no partition {partition} is registered"))
        })?;
        match decide_alter(entry.status()) {
            Ok(()) => {}
            Err(AlterRefusal::Withdrawn) => return Ok(entry.row(partition)),
            Err(AlterRefusal::Locked { lease_id }) => {
                return Err(BrokerError::Locked {
                    partition: partition.clone(),
                    lease_id,
                })
            }
        }
        self.unindex_partition(partition, &entry);
        let updated = PartitionEntry {
            withdrawn: true,
            ..entry
        };
        let row = updated.row(partition);
        self.partitions.insert(partition.clone(), updated);
        writes.push(BrokerWrite::UpsertPartition(row.clone()));
        Ok(row)
    }

    /// Checks that an image asked for is offered by some partition.
    pub fn check_known_image(
        &self,
        requirements: &Requirements,
        field: &str,
    ) -> Result<(), BrokerError> {
        if let Some(image) = &requirements.image {
            // A bare name asks for any digest of it (terms are pinned).
            let offered = self.image_offers.contains_key(image)
                || self
                    .image_offers
                    .keys()
                    .any(|offered| leasehold_core::image_ref::offers_image(offered, image));
            if !offered {
                let offered: Vec<&str> = self.image_offers.keys().map(String::as_str).collect();
                return Err(BrokerError::Invalid(leasehold_core::FieldError::new(
                    field,
                    format!(
                        "unknown image '{image}'; images offered: {}",
                        if offered.is_empty() {
                            "none yet".to_string()
                        } else {
                            offered.join(", ")
                        }
                    ),
                )));
            }
        }
        Ok(())
    }

    pub fn explain(
        &self,
        requirements: &Requirements,
    ) -> leasehold_core::matching::NoMatchExplanation {
        explain_no_match(
            self.partitions
                .iter()
                .filter(|(_, e)| !e.withdrawn)
                .map(|(p, e)| (p, &e.terms, e.lease_id.is_some())),
            requirements,
        )
    }

    /// Concludes a lease (S45-S48): records the borrower on the partition,
    /// bumps its epoch so older keys are fenced, and starts billing now.
    pub fn conclude_lease(
        &mut self,
        borrower: &str,
        target: &LeaseTarget,
        now_ms: u64,
        key_ttl_ms: u64,
        writes: &mut Vec<BrokerWrite>,
    ) -> Result<Lease, BrokerError> {
        let (partition, allow_unisolated) = match target {
            LeaseTarget::Named {
                partition,
                allow_unisolated,
            } => (partition.clone(), *allow_unisolated),
            LeaseTarget::Best(requirements) => {
                requirements
                    .validate()
                    .map_err(|e| prefix_field("best", e))?;
                self.check_known_image(requirements, "best.image")?;
                match self.free.find(requirements, 1).into_iter().next() {
                    Some((partition, _)) => (partition, requirements.allow_unisolated),
                    None => return Err(BrokerError::NoMatch(Box::new(self.explain(requirements)))),
                }
            }
        };
        let entry = self.partitions.get_mut(&partition).ok_or_else(|| {
            BrokerError::NotFound(format!("no partition {partition} is registered"))
        })?;
        decide_lease(entry.status()).map_err(|refusal| match refusal {
            LeaseRefusal::Conflict { lease_id } => BrokerError::Conflict {
                partition: partition.clone(),
                lease_id,
            },
            LeaseRefusal::Withdrawn => BrokerError::Withdrawn(partition.clone()),
            LeaseRefusal::Unisolated => unisolated_refusal(&partition),
        })?;
        decide_isolation(&entry.terms, allow_unisolated)
            .map_err(|_| unisolated_refusal(&partition))?;
        let lender = self
            .hosts
            .get(&partition.host_id)
            .map(|h| h.row.lender.clone())
            .ok_or_else(|| BrokerError::Internal(format!("partition {partition} has no host")))?;
        self.last_lease_id += 1;
        let lease_id = self.last_lease_id;
        entry.epoch += 1;
        entry.lease_id = Some(lease_id);
        let lease = Lease {
            lease_id,
            partition: partition.clone(),
            borrower: borrower.to_string(),
            lender,
            terms: entry.terms.clone(),
            epoch: entry.epoch,
            started_at_ms: now_ms,
            key_expires_at_ms: now_ms.saturating_add(key_ttl_ms),
            state: LeaseState::Active,
            release_requested_at_ms: None,
            charge_micros: None,
        };
        let row = entry.row(&partition);
        let terms = entry.terms.clone();
        self.free.remove(&partition, &terms);
        self.active_leases.insert(lease_id, lease.clone());
        writes.push(BrokerWrite::InsertLease(lease.clone()));
        writes.push(BrokerWrite::UpsertPartition(row));
        Ok(lease)
    }

    /// Frees the partition of a lease that has just been released.
    pub fn free_partition_of(&mut self, lease: &Lease, writes: &mut Vec<BrokerWrite>) {
        self.active_leases.remove(&lease.lease_id);
        if let Some(entry) = self.partitions.get_mut(&lease.partition) {
            if entry.lease_id == Some(lease.lease_id) {
                entry.lease_id = None;
                let row = entry.row(&lease.partition);
                let terms = entry.terms.clone();
                if !entry.withdrawn {
                    self.free.insert(lease.partition.clone(), terms);
                }
                writes.push(BrokerWrite::UpsertPartition(row));
            }
        }
    }
}

/// The refusal of an unisolated partition to a borrower who did not opt
/// in: it names the field and how to opt in.
fn unisolated_refusal(partition: &PartitionRef) -> BrokerError {
    BrokerError::Invalid(leasehold_core::FieldError::new(
        "allow_unisolated",
        format!(
            "partition {partition} is unisolated (its jobs run as plain processes of the host, which see its files); \
             lease it only if you trust the host: send allow_unisolated: true (leasehold lease --allow-unisolated)"
        ),
    ))
}

fn prefix_field(prefix: &str, error: leasehold_core::FieldError) -> BrokerError {
    BrokerError::Invalid(leasehold_core::FieldError::new(
        format!("{prefix}.{}", error.field),
        error.problem,
    ))
}

fn validate_capacity(capacity: &HostCapacity) -> Result<(), BrokerError> {
    let check = |field: &str, value: u64, max: u64| -> Result<(), BrokerError> {
        if value > max {
            return Err(BrokerError::Invalid(leasehold_core::FieldError::new(
                format!("capacity.{field}"),
                format!("{value} is out of range; at most {max}"),
            )));
        }
        Ok(())
    };
    check("cpu_centicores", capacity.cpu_centicores, 1024 * 100)?;
    check(
        "memory_mib",
        capacity.memory_mib,
        leasehold_core::terms::MAX_MEMORY_MIB,
    )?;
    check(
        "disk_gib",
        capacity.disk_gib,
        leasehold_core::terms::MAX_DISK_GIB,
    )?;
    check(
        "owner_share_cpu_centicores",
        capacity.owner_share_cpu_centicores,
        capacity.cpu_centicores,
    )?;
    check(
        "owner_share_memory_mib",
        capacity.owner_share_memory_mib,
        capacity.memory_mib,
    )?;
    check(
        "owner_share_disk_gib",
        capacity.owner_share_disk_gib,
        capacity.disk_gib,
    )?;
    if capacity.cpu_centicores == 0 {
        return Err(BrokerError::Invalid(leasehold_core::FieldError::new(
            "capacity.cpu_centicores",
            "must be at least 1",
        )));
    }
    Ok(())
}

fn validate_agent_url(url: &str) -> Result<(), BrokerError> {
    let ok = url.len() <= 512
        && (url.starts_with("http://") || url.starts_with("https://"))
        && !url.chars().any(char::is_whitespace);
    if !ok {
        return Err(BrokerError::Invalid(leasehold_core::FieldError::new(
            "agent_url",
            format!("'{url}' is not an http(s) URL of at most 512 characters"),
        )));
    }
    Ok(())
}
