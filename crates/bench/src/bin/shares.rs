//! Leases through a share-managing broker against fixed partitions (issue
//! 11), in one run, through real processes: two SQLite brokers and one
//! `sim` agent that lends its fixed partitions through the first and a
//! share of the same size through the second. `clients` borrowers lease by
//! requirements and release, for `seconds` on each market in turn; a lease
//! at the share market carves a partition of exactly the asked size and its
//! release gives it back. Prints one JSON line.

use anyhow::Result;
use clap::Parser;
use leasehold_api::{Client, LeaseRequest, Role};
use leasehold_bench::processes::{add_small_partitions, binary, lease_rate, start, text, Service};
use leasehold_core::Requirements;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(about = "Lease rate through a share-managing broker vs fixed partitions (one JSON line)")]
struct Args {
    /// The `leasehold` binary; by default the one next to this benchmark.
    #[arg(long)]
    leasehold: Option<PathBuf>,
    /// Concurrent borrowers on each market (and partitions, and vCPUs of
    /// the share).
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Length of each market's phase, in seconds.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
}

struct Market {
    _broker: Service,
    url: String,
    borrower: Client,
    lender_token_file: PathBuf,
    lender_token: String,
}

async fn start_market(binary: &Path, dir: &Path, name: &str) -> Result<Market> {
    let data = dir.join(name).display().to_string();
    let broker = start(
        binary,
        &[
            "broker",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data,
            "--output",
            "json",
        ],
        None,
    )?;
    let url = text(&broker, "broker_url")?;
    let admin = Client::new(&url, Some(text(&broker, "admin_token")?));
    let lender_token = admin.create_principal("acme", Role::Lender).await?.token;
    let borrower = admin.create_principal("bob", Role::Borrower).await?.token;
    let lender_token_file = dir.join(format!("{name}.token"));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&lender_token_file)?
        .write_all(lender_token.as_bytes())?;
    Ok(Market {
        _broker: broker,
        borrower: Client::new(&url, Some(borrower)),
        url,
        lender_token_file,
        lender_token,
    })
}

/// The agent: fixed partitions through `fixed`, a share through `shared`.
async fn start_agent(
    binary: &Path,
    dir: &Path,
    fixed: &Market,
    shared: &Market,
    clients: usize,
) -> Result<Service> {
    let data = dir.join("agent").display().to_string();
    let share = format!(
        "{}=vcpus={clients},memory_mib={},disk_gib={clients}",
        shared.url,
        clients * 256
    );
    let token_fixed = format!("{}={}", fixed.url, fixed.lender_token_file.display());
    let token_shared = format!("{}={}", shared.url, shared.lender_token_file.display());
    let cpus = (2 * clients + 1).to_string();
    let agent = start(
        binary,
        &[
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data,
            "--host-id",
            "alpha",
            "--driver",
            "sim",
            "--cpus",
            &cpus,
            "--memory-mib",
            "65536",
            "--disk-gib",
            "1000",
            "--broker",
            &fixed.url,
            "--broker",
            &share,
            "--token-file",
            &token_fixed,
            "--token-file",
            &token_shared,
            "--output",
            "json",
        ],
        None,
    )?;
    let client = Client::new(
        &text(&agent, "agent_url")?,
        Some(fixed.lender_token.clone()),
    );
    add_small_partitions(&client, clients).await?;
    Ok(agent)
}

fn one_vcpu() -> LeaseRequest {
    LeaseRequest {
        partition: None,
        best: Some(Requirements {
            min_vcpus: Some(1),
            min_memory_mib: Some(256),
            min_disk_gib: Some(1),
            ..Requirements::default()
        }),
        allow_unisolated: false,
        start: None,
        end: None,
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let binary = binary(args.leasehold.as_deref())?;
    let dir = tempfile::tempdir()?;
    let fixed = start_market(&binary, dir.path(), "fixed").await?;
    let shared = start_market(&binary, dir.path(), "shared").await?;
    let _agent = start_agent(&binary, dir.path(), &fixed, &shared, args.clients).await?;
    let fixed_rate =
        lease_rate(&fixed.borrower, args.clients, args.seconds, |_| one_vcpu()).await?;
    let share_rate =
        lease_rate(&shared.borrower, args.clients, args.seconds, |_| one_vcpu()).await?;
    println!(
        "{}",
        serde_json::json!({
            "bench": "shares-vs-fixed",
            "database": "sqlite",
            "clients": args.clients,
            "seconds_per_market": args.seconds,
            "leases_per_second_fixed_partitions": fixed_rate,
            "leases_per_second_share": share_rate,
            "share_over_fixed": if fixed_rate > 0.0 { share_rate / fixed_rate } else { 0.0 },
        })
    );
    Ok(())
}
