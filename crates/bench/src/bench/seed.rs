//! Fills the broker's database directly through `leasehold_store`, before
//! the broker starts: registering a million partitions over HTTP takes
//! minutes, while a few big `BrokerStore::apply` batches take seconds. The
//! rows are the ones HTTP registration would write (same generator, same
//! per-host streams), so the broker that loads them sees the same market.

use crate::workload::{self, SplitMix64};
use anyhow::{Context, Result};
use leasehold_core::PartitionRef;
use leasehold_store::broker::{BrokerWrite, HostRow, PartitionRow};
use leasehold_store::{BrokerDatabase, Durability};
use std::time::Instant;

/// Writes per `apply`: one transaction (and one fsync) per batch.
const SEED_BATCH_WRITES: usize = 20_000;

pub struct SeedPlan {
    pub hosts: usize,
    pub partitions_per_host: u32,
    pub lenders: u64,
    pub seed: u64,
    /// The admin's token; its hash is stored, the broker will not bootstrap
    /// another admin on a database that has principals.
    pub admin_token: String,
}

pub struct SeedOutcome {
    pub seconds: f64,
    pub rows: u64,
}

/// The admin, the lenders, every host and its partitions, in batches.
pub fn seed_database(database: &BrokerDatabase, plan: &SeedPlan) -> Result<SeedOutcome> {
    let started = Instant::now();
    // Seeding is set-up, not the measurement: commit without waiting for
    // the disk. The broker opens the database again with its own setting.
    let mut store = leasehold_store::open_broker_store(database, Durability::Normal)
        .context("cannot open the database to seed it")?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let mut batch = vec![BrokerWrite::InsertPrincipal {
        name: "admin".into(),
        role: "admin".into(),
        token_sha256: leasehold_broker::token_sha256(&plan.admin_token),
        at_ms: now_ms,
    }];
    for lender in 0..plan.lenders {
        batch.push(BrokerWrite::InsertPrincipal {
            name: lender_name(lender),
            role: "lender".into(),
            // Nobody acts as these lenders after seeding: a fresh random
            // token each, never written down.
            token_sha256: leasehold_broker::token_sha256(&leasehold_broker::new_token()),
            at_ms: now_ms,
        });
    }
    let capacity = workload::host_capacity(plan.partitions_per_host);
    let mut rows = 0u64;
    for index in 0..plan.hosts {
        let host_id = workload::host_id(index);
        batch.push(BrokerWrite::UpsertHost {
            host: HostRow {
                host_id: host_id.clone(),
                lender: lender_name(index as u64 % plan.lenders),
                agent_url: None,
                capacity: capacity.clone(),
                share: None,
            },
            at_ms: now_ms,
        });
        let mut rng = SplitMix64::stream(plan.seed, index as u64);
        for partition in 1..=plan.partitions_per_host {
            batch.push(BrokerWrite::UpsertPartition(PartitionRow {
                partition: PartitionRef::new(host_id.clone(), partition),
                terms: workload::random_terms(&mut rng),
                epoch: 0,
                lease_id: None,
                withdrawn: false,
            }));
        }
        if batch.len() >= SEED_BATCH_WRITES || index + 1 == plan.hosts {
            store.apply(&batch).context("seeding the database failed")?;
            rows += batch.len() as u64;
            batch.clear();
        }
        if (index + 1) * 10 / plan.hosts != index * 10 / plan.hosts {
            eprintln!(
                "seed: {}/{} hosts, {rows} rows in {:.1} s",
                index + 1,
                plan.hosts,
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(SeedOutcome {
        seconds: started.elapsed().as_secs_f64(),
        rows,
    })
}

/// The lender principal that owns host `index` (the same names HTTP
/// registration uses).
pub fn lender_name(lender: u64) -> String {
    format!("bench-lender-{lender}")
}
