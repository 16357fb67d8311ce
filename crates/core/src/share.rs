//! Shares (seed 000, FIG. 12-15): a host hands a broker a share of itself
//! instead of fixed partitions, and the broker carves a partition of exactly
//! the size a borrower asks for out of it at lease time, priced per unit,
//! and gives it back to the share on release.
//!
//! At the broker a share is the host's registered capacity (its size, with
//! no owner share: the host kept that out before) plus a [`ShareOffer`]:
//! the images, the per-unit prices and the range of partition indexes the
//! broker carves in. The agent gives each broker a range of its own, so the
//! partitions two markets carve on one host can never collide.

use crate::error::FieldError;
use crate::ids::PartitionRef;
use crate::matching::{failed_requirements, Requirement};
use crate::money::MAX_PRICE_PER_HOUR_MICROS;
use crate::table::{HostEntry, TableView};
use crate::terms::{HostCapacity, Isolation, Requirements, Terms};
use serde::{Deserialize, Serialize};

/// What a borrower gets when they leave a size out: one vCPU, 512 MiB and
/// 1 GiB of disk.
pub const DEFAULT_CARVED_VCPUS: u32 = 1;
pub const DEFAULT_CARVED_MEMORY_MIB: u64 = 512;
pub const DEFAULT_CARVED_DISK_GIB: u64 = 1;

/// The most partition indexes one share may span.
pub const MAX_SHARE_INDEXES: u32 = 1_000_000;

/// The rest of a share beside its size (the host's capacity at the broker).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShareOffer {
    /// The images a carved partition can boot.
    #[schema(min_items = 1, max_items = 32)]
    pub images: Vec<String>,
    /// Money, in integer micro-units per vCPU (at 100 %) and hour.
    #[schema(maximum = 1000000000000_i64)]
    pub price_per_vcpu_hour_micros: u64,
    /// Money, in integer micro-units per GiB of memory and hour.
    #[schema(maximum = 1000000000000_i64)]
    pub price_per_memory_gib_hour_micros: u64,
    /// Money, in integer micro-units per GiB of disk and hour.
    #[schema(maximum = 1000000000000_i64)]
    pub price_per_disk_gib_hour_micros: u64,
    /// The partition indexes this broker carves in, both included; the
    /// host's other brokers carve in other ranges.
    #[schema(minimum = 1)]
    pub first_index: u32,
    #[schema(minimum = 1)]
    pub last_index: u32,
    /// The isolation the host's driver gives every carved partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<Isolation>,
}

/// Why one host's share could not hold a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShareMiss {
    pub host_id: String,
    pub reason: String,
}

impl ShareOffer {
    pub fn validate(&self) -> Result<(), FieldError> {
        let probe = Terms {
            vcpus: 1,
            cpu_cap_percent: 100,
            memory_mib: 1,
            disk_gib: 1,
            images: self.images.clone(),
            price_per_hour_micros: 0,
            isolation: self.isolation,
        };
        probe
            .validate(None)
            .map_err(|e| FieldError::new(format!("share.{}", e.field), e.problem))?;
        for (field, value) in [
            (
                "price_per_vcpu_hour_micros",
                self.price_per_vcpu_hour_micros,
            ),
            (
                "price_per_memory_gib_hour_micros",
                self.price_per_memory_gib_hour_micros,
            ),
            (
                "price_per_disk_gib_hour_micros",
                self.price_per_disk_gib_hour_micros,
            ),
        ] {
            if value > MAX_PRICE_PER_HOUR_MICROS {
                return Err(FieldError::new(
                    format!("share.{field}"),
                    format!("{value} is out of range; at most {MAX_PRICE_PER_HOUR_MICROS}"),
                ));
            }
        }
        let span_ok = self.first_index >= 1
            && self.first_index <= self.last_index
            && self.last_index - self.first_index < MAX_SHARE_INDEXES;
        if !span_ok {
            return Err(FieldError::new(
                "share.first_index",
                format!(
                    "{}..={} is not a range of 1 to {MAX_SHARE_INDEXES} indexes starting at 1 or later",
                    self.first_index, self.last_index
                ),
            ));
        }
        Ok(())
    }

    pub fn contains(&self, index: u32) -> bool {
        (self.first_index..=self.last_index).contains(&index)
    }

    /// The hourly price of a partition of this size: each unit at its price,
    /// memory and CPU counted in exact fractions, rounded up to a micro-unit.
    pub fn price_per_hour_micros(&self, terms: &Terms) -> u64 {
        let cpu = terms.cpu_centicores() as u128 * self.price_per_vcpu_hour_micros as u128;
        let memory = terms.memory_mib as u128 * self.price_per_memory_gib_hour_micros as u128;
        let disk = terms.disk_gib as u128 * self.price_per_disk_gib_hour_micros as u128;
        let total = cpu.div_ceil(100) + memory.div_ceil(1024) + disk;
        total.min(MAX_PRICE_PER_HOUR_MICROS as u128) as u64
    }

    /// The terms of a partition carved for `requirements`: exactly the size
    /// asked for (the defaults where it says nothing), this share's images,
    /// isolation and per-unit price.
    pub fn carve_terms(&self, requirements: &Requirements) -> Terms {
        let mut terms = Terms {
            vcpus: requirements.min_vcpus.unwrap_or(DEFAULT_CARVED_VCPUS),
            cpu_cap_percent: requirements.min_cpu_cap_percent.unwrap_or(100),
            memory_mib: requirements
                .min_memory_mib
                .unwrap_or(DEFAULT_CARVED_MEMORY_MIB),
            disk_gib: requirements.min_disk_gib.unwrap_or(DEFAULT_CARVED_DISK_GIB),
            images: self.images.clone(),
            price_per_hour_micros: 0,
            isolation: self.isolation,
        };
        terms.price_per_hour_micros = self.price_per_hour_micros(&terms);
        terms
    }
}

/// A partition carved out of a host's share: where, with which terms, and
/// the epoch its row had (an index carved before keeps its epoch, so keys
/// of its earlier leases stay fenced).
#[derive(Debug, Clone, PartialEq)]
pub struct Carved {
    pub partition: PartitionRef,
    pub terms: Terms,
    pub epoch: u64,
}

/// What a find shows of a share that can carve a request: the partition it
/// would carve now (its terms and price) and the share's per-unit prices
/// and free room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShareQuote {
    pub host_id: String,
    /// The terms a lease of these requirements would get here.
    pub terms: Terms,
    pub price_per_vcpu_hour_micros: u64,
    pub price_per_memory_gib_hour_micros: u64,
    pub price_per_disk_gib_hour_micros: u64,
    /// What the share has not carved yet.
    pub free_cpu_centicores: u64,
    pub free_memory_mib: u64,
    pub free_disk_gib: u64,
}

/// Up to `limit` shares that could carve `requirements` now, cheapest
/// first.
pub fn share_quotes(
    table: TableView<'_>,
    requirements: &Requirements,
    limit: usize,
) -> Vec<ShareQuote> {
    let mut quotes: Vec<ShareQuote> = Vec::new();
    for host in table.hosts_with_shares() {
        let Some(share) = &host.row.share else {
            continue;
        };
        let Ok(carved) = carve_on_host(table, host, share, requirements) else {
            continue;
        };
        let capacity = held_capacity(table, host);
        let in_use = table.other_offered_terms(host, 0);
        let used = |f: fn(&Terms) -> u64| in_use.iter().map(|t| f(t)).sum::<u64>();
        quotes.push(ShareQuote {
            host_id: host.row.host_id.clone(),
            terms: carved.terms,
            price_per_vcpu_hour_micros: share.price_per_vcpu_hour_micros,
            price_per_memory_gib_hour_micros: share.price_per_memory_gib_hour_micros,
            price_per_disk_gib_hour_micros: share.price_per_disk_gib_hour_micros,
            free_cpu_centicores: capacity
                .cpu_centicores
                .saturating_sub(used(Terms::cpu_centicores)),
            free_memory_mib: capacity.memory_mib.saturating_sub(used(|t| t.memory_mib)),
            free_disk_gib: capacity.disk_gib.saturating_sub(used(|t| t.disk_gib)),
        });
    }
    quotes.sort_by(|a, b| {
        (a.terms.price_per_hour_micros, &a.host_id)
            .cmp(&(b.terms.price_per_hour_micros, &b.host_id))
    });
    quotes.truncate(limit);
    quotes
}

/// The cheapest share that holds `requirements`, carved; or why none does.
pub fn carve_best(
    table: TableView<'_>,
    requirements: &Requirements,
) -> Result<Carved, Vec<ShareMiss>> {
    let mut best: Option<Carved> = None;
    let mut misses = Vec::new();
    for host in table.hosts_with_shares() {
        let Some(share) = &host.row.share else {
            continue;
        };
        match carve_on_host(table, host, share, requirements) {
            Ok(carved) => {
                let cheaper = best.as_ref().is_none_or(|b| {
                    (carved.terms.price_per_hour_micros, &carved.partition)
                        < (b.terms.price_per_hour_micros, &b.partition)
                });
                if cheaper {
                    best = Some(carved);
                }
            }
            Err(reason) => misses.push(ShareMiss {
                host_id: host.row.host_id.clone(),
                reason,
            }),
        }
    }
    best.ok_or_else(|| {
        misses.sort_by(|a, b| a.host_id.cmp(&b.host_id));
        misses
    })
}

/// A partition of the asked size out of one host's share, if it fits
/// beside the partitions carved there and not returned yet.
fn carve_on_host(
    table: TableView<'_>,
    host: &HostEntry,
    share: &ShareOffer,
    requirements: &Requirements,
) -> Result<Carved, String> {
    let terms = share.carve_terms(requirements);
    terms.validate(None).map_err(|e| e.to_string())?;
    let mut wanted = requirements.clone();
    // The size is the carve's own: what is left to match is the rest.
    wanted.min_vcpus = None;
    wanted.min_cpu_cap_percent = None;
    wanted.min_memory_mib = None;
    wanted.min_disk_gib = None;
    let failed = failed_requirements(&terms, &wanted);
    if let Some(first) = failed.first() {
        return Err(match first {
            Requirement::Image => "the share offers none of the images asked for".to_string(),
            Requirement::MaxPricePerHourMicros => format!(
                "a partition of that size costs {} micro-units an hour here, above the most asked",
                terms.price_per_hour_micros
            ),
            _ => {
                "the share's partitions are unisolated and the borrower did not opt in".to_string()
            }
        });
    }
    // Every partition of the host not given back counts: carved or fixed.
    let in_use = table.other_offered_terms(host, 0);
    held_capacity(table, host)
        .admits(in_use.into_iter(), &terms)
        .map_err(|e| format!("{}: {}", e.field, e.problem))?;
    let (index, epoch) = free_index(table, host, share)
        .ok_or_else(|| "every partition index of the share is in use".to_string())?;
    Ok(Carved {
        partition: PartitionRef::new(host.row.host_id.clone(), index),
        terms,
        epoch,
    })
}

/// The share's size less what seed 003's pools hold on the host.
fn held_capacity(table: TableView<'_>, host: &HostEntry) -> HostCapacity {
    let held = table.reservations().held_on_host(&host.row.host_id);
    host.row
        .capacity
        .less(held.cpu_centicores, held.memory_mib, held.disk_gib)
}

/// The lowest index of the share given back before (with its epoch), or
/// the next one never used (epoch 0).
fn free_index(table: TableView<'_>, host: &HostEntry, share: &ShareOffer) -> Option<(u32, u64)> {
    let mut first_gap: Option<u32> = None;
    let mut expected = Some(share.first_index);
    for index in host.partitions.range(share.first_index..=share.last_index) {
        if first_gap.is_none() && expected.is_some_and(|e| e < *index) {
            first_gap = expected;
        }
        let partition = PartitionRef::new(host.row.host_id.clone(), *index);
        if let Some(entry) = table.partition(&partition) {
            if entry.withdrawn && entry.lease_id.is_none() {
                return Some((*index, entry.epoch));
            }
        }
        expected = index.checked_add(1);
    }
    first_gap
        .or(expected)
        .filter(|index| *index <= share.last_index)
        .map(|index| (index, 0))
}

/// Whether `index` on `host` lies in the host's share (carved, not fixed).
pub fn is_carved(host: &HostEntry, index: u32) -> bool {
    host.row
        .share
        .as_ref()
        .is_some_and(|share| share.contains(index))
}

/// A host registered again may change its share only so that the
/// partitions carved from it and not given back still fit: inside the new
/// carving range and the new size. Refused otherwise, naming the field.
pub fn check_share_change(
    table: TableView<'_>,
    existing: &HostEntry,
    new_capacity: &HostCapacity,
    new_share: Option<&ShareOffer>,
) -> Result<(), crate::error::FieldError> {
    let Some(old_share) = &existing.row.share else {
        return Ok(());
    };
    let carved: Vec<(u32, &Terms)> = existing
        .partitions
        .range(old_share.first_index..=old_share.last_index)
        .filter_map(|index| {
            let entry =
                table.partition(&PartitionRef::new(existing.row.host_id.clone(), *index))?;
            (!entry.withdrawn).then_some((*index, &entry.terms))
        })
        .collect();
    if carved.is_empty() {
        return Ok(());
    }
    let refuse = |field: &str, problem: String| Err(crate::error::FieldError::new(field, problem));
    let Some(new_share) = new_share else {
        return refuse(
            "share",
            format!("{} partitions carved from this host's share are in use; release them before the share is taken back", carved.len()),
        );
    };
    if let Some((index, _)) = carved.iter().find(|(index, _)| !new_share.contains(*index)) {
        return refuse(
            "share.first_index",
            format!("carved partition {index} in use lies outside the new range"),
        );
    }
    let empty = Terms {
        vcpus: 0,
        cpu_cap_percent: 0,
        memory_mib: 0,
        disk_gib: 0,
        images: Vec::new(),
        price_per_hour_micros: 0,
        isolation: None,
    };
    new_capacity
        .admits(carved.iter().map(|(_, terms)| *terms), &empty)
        .map_err(|e| {
            crate::error::FieldError::new(
                format!("capacity.{}", e.field),
                format!(
                    "the new share is smaller than the partitions carved from it in use: {}",
                    e.problem
                ),
            )
        })
}
