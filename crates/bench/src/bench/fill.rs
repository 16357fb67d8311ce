//! Fills a running broker over HTTP, as lenders' agents would: the
//! registration rate is itself a figure of the report.

use super::seed::lender_name;
use crate::stats::Errors;
use crate::workload::{self, SplitMix64};
use anyhow::{Context, Result};
use leasehold_api::{Client, RegisterHostRequest, RegisterPartitionRequest, Role};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub struct FillPlan {
    pub hosts: usize,
    pub partitions_per_host: u32,
    pub lenders: u64,
    pub seed: u64,
    /// Registration requests in flight at once.
    pub concurrency: u64,
}

pub struct FillOutcome {
    pub seconds: f64,
    /// Successful register-host and register-partition requests.
    pub registrations: u64,
    pub errors: Errors,
}

/// Counters the registration workers share.
struct Progress {
    next_host: AtomicUsize,
    hosts_done: AtomicUsize,
    registrations: AtomicU64,
    errors: Mutex<Errors>,
    started: Instant,
}

/// Registers every host and its partitions, with a fixed number of workers
/// pulling host numbers from a shared counter so the load stays at
/// `concurrency` requests in flight (which is also what lets the broker's
/// writer group-commit several of them per fsync).
pub async fn register_all(admin: &Client, plan: FillPlan) -> Result<FillOutcome> {
    let mut lenders = Vec::new();
    for i in 0..plan.lenders {
        let created = admin
            .create_principal(&lender_name(i), Role::Lender)
            .await
            .context("cannot create a lender")?;
        // One connection pool for all lenders: they differ only in their token.
        lenders.push(admin.with_token(Some(created.token)));
    }
    let lenders = Arc::new(lenders);
    let plan = Arc::new(plan);
    let progress = Arc::new(Progress {
        next_host: AtomicUsize::new(0),
        hosts_done: AtomicUsize::new(0),
        registrations: AtomicU64::new(0),
        errors: Mutex::new(Errors::default()),
        started: Instant::now(),
    });
    let mut workers = Vec::new();
    for _ in 0..plan.concurrency {
        let (lenders, plan, progress) = (lenders.clone(), plan.clone(), progress.clone());
        workers.push(tokio::spawn(async move {
            register_worker(&lenders, &plan, &progress).await
        }));
    }
    for worker in workers {
        worker.await.context("a registration worker panicked")?;
    }
    let errors = *progress.errors.lock().unwrap_or_else(|p| p.into_inner());
    Ok(FillOutcome {
        seconds: progress.started.elapsed().as_secs_f64(),
        registrations: progress.registrations.load(Ordering::Relaxed),
        errors,
    })
}

async fn register_worker(lenders: &[Client], plan: &FillPlan, progress: &Progress) {
    let capacity = workload::host_capacity(plan.partitions_per_host);
    let mut local_errors = Errors::default();
    loop {
        let index = progress.next_host.fetch_add(1, Ordering::Relaxed);
        if index >= plan.hosts {
            break;
        }
        let client = &lenders[index % lenders.len()];
        let host_id = workload::host_id(index);
        let host = RegisterHostRequest {
            share: None,
            agent_url: None,
            capacity: capacity.clone(),
        };
        match client.register_host(&host_id, &host).await {
            Ok(_) => {
                progress.registrations.fetch_add(1, Ordering::Relaxed);
                // Seeded per host, so the table does not depend on which
                // worker happened to take which host.
                let mut rng = SplitMix64::stream(plan.seed, index as u64);
                for partition in 1..=plan.partitions_per_host {
                    let request = RegisterPartitionRequest {
                        terms: workload::random_terms(&mut rng),
                    };
                    match client
                        .register_partition(&host_id, partition, &request)
                        .await
                    {
                        Ok(_) => {
                            progress.registrations.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(error) => local_errors.record("register partition", &error),
                    }
                }
            }
            // Its partitions would only fail with "no such host".
            Err(error) => local_errors.record("register host", &error),
        }
        let done = progress.hosts_done.fetch_add(1, Ordering::Relaxed) + 1;
        // Exactly one worker crosses each 10 % mark.
        if done * 10 / plan.hosts != (done - 1) * 10 / plan.hosts {
            let seconds = progress.started.elapsed().as_secs_f64();
            let count = progress.registrations.load(Ordering::Relaxed);
            eprintln!(
                "fill: {done}/{} hosts in {seconds:.1} s, {count} registrations, {:.0}/s",
                plan.hosts,
                count as f64 / seconds
            );
        }
    }
    progress
        .errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .merge(local_errors);
}
