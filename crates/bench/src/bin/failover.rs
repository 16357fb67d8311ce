//! Broker fail-over (issue 11) through real processes: two brokers on one
//! throw-away PostgreSQL (one active, one standing by) and a `sim` agent.
//! Measures the lease rate of the active broker with a standby attached,
//! then kills the active broker `--kills` times with SIGKILL and times how
//! long after each kill a lease is answered again (by the standby, which
//! takes over; the killed one is restarted to stand by). Prints one JSON
//! line.

use anyhow::{bail, Context, Result};
use clap::Parser;
use leasehold_api::{Client, LeaseRequest, Role};
use leasehold_bench::processes::{add_small_partitions, binary, lease_rate, start, text, Service};
use leasehold_bench::stats::Latencies;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "Broker take-over time and lease rate with a standby (one JSON line)")]
struct Args {
    /// The `leasehold` binary; by default the one next to this benchmark.
    #[arg(long)]
    leasehold: Option<PathBuf>,
    /// How many times the active broker is killed.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// The brokers' --leadership-ttl-ms.
    #[arg(long, default_value_t = 2000)]
    leadership_ttl_ms: u64,
    /// Concurrent borrowers in the lease-rate phase.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Length of the lease-rate phase, in seconds.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
}

struct Broker {
    data: PathBuf,
    listen: String,
    service: Option<Service>,
}

fn start_broker(binary: &Path, broker: &Broker, database: &str, ttl_ms: u64) -> Result<Service> {
    let data = broker.data.display().to_string();
    let ttl = ttl_ms.to_string();
    start(
        binary,
        &[
            "broker",
            "--listen",
            &broker.listen,
            "--data-dir",
            &data,
            "--database",
            database,
            "--leadership-ttl-ms",
            &ttl,
            "--output",
            "json",
        ],
        None,
    )
}

/// The brokers of one database sign with the same keys.
fn share_signing_keys(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let (from, to) = (from.join("keys"), to.join("keys"));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&to)?;
    for entry in std::fs::read_dir(&from)? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
}

fn request(partition: u32) -> LeaseRequest {
    LeaseRequest {
        partition: Some(format!("alpha/{partition}")),
        best: None,
        allow_unisolated: false,
        start: None,
        end: None,
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let binary = binary(args.leasehold.as_deref())?;
    let postgres = leasehold_bench_postgres()?;
    let dir = tempfile::tempdir()?;
    let mut brokers = [0, 1].map(|n| Broker {
        data: dir.path().join(format!("broker-{n}")),
        listen: format!("127.0.0.1:{}", free_port()),
        service: None,
    });
    brokers[0].service = Some(start_broker(
        &binary,
        &brokers[0],
        &postgres.url,
        args.leadership_ttl_ms,
    )?);
    share_signing_keys(&brokers[0].data, &brokers[1].data)?;
    brokers[1].service = Some(start_broker(
        &binary,
        &brokers[1],
        &postgres.url,
        args.leadership_ttl_ms,
    )?);
    let both = brokers
        .iter()
        .map(|b| format!("http://{}", b.listen))
        .collect::<Vec<_>>()
        .join(",");
    let first = brokers[0].service.as_ref().context("no broker")?;
    let admin = Client::new(&both, Some(text(first, "admin_token")?));
    let lender = admin.create_principal("acme", Role::Lender).await?.token;
    let borrower = admin.create_principal("bob", Role::Borrower).await?.token;
    let _agent = start_agent(&binary, dir.path(), &both, &lender, args.clients as u32).await?;
    let bob = Client::new(&both, Some(borrower));
    // Each borrower on a partition of its own.
    let rate = lease_rate(&bob, args.clients, args.seconds, |client| {
        request(client as u32 + 1)
    })
    .await?;
    let mut takeovers = Latencies::default();
    for kill in 0..args.kills {
        let took = kill_the_active_one(&binary, &mut brokers, &bob, &postgres.url, &args).await?;
        eprintln!(
            "kill {}: a lease was answered {} ms after the SIGKILL",
            kill + 1,
            took.as_millis()
        );
        takeovers.since(Instant::now() - took);
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "broker-failover",
            "database": "postgresql",
            "leadership_ttl_ms": args.leadership_ttl_ms,
            "kills": args.kills,
            "takeover_ms": {
                "p50": takeovers.percentile(50.0).map(|us| us / 1000),
                "max": takeovers.max().map(|us| us / 1000),
            },
            "leases_per_second_with_a_standby": rate,
            "clients": args.clients,
        })
    );
    Ok(())
}

fn leasehold_bench_postgres() -> Result<leasehold_bench::postgres::ThrowawayPostgres> {
    leasehold_bench::postgres::ThrowawayPostgres::start(None)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .unwrap_or(0)
}

/// A `sim` agent lending `partitions` partitions through both brokers.
async fn start_agent(
    binary: &Path,
    dir: &Path,
    brokers: &str,
    lender: &str,
    partitions: u32,
) -> Result<Service> {
    let data = dir.join("agent").display().to_string();
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
            "64",
            "--memory-mib",
            "65536",
            "--disk-gib",
            "1000",
            "--broker",
            brokers,
            "--output",
            "json",
        ],
        Some(lender),
    )?;
    let client = Client::new(&text(&agent, "agent_url")?, Some(lender.to_string()));
    add_small_partitions(&client, partitions as usize).await?;
    Ok(agent)
}

/// Kills whichever broker is active, times until a lease is answered again,
/// then restarts the killed one (it stands by).
async fn kill_the_active_one(
    binary: &Path,
    brokers: &mut [Broker; 2],
    bob: &Client,
    database: &str,
    args: &Args,
) -> Result<Duration> {
    let mut active = None;
    for (index, broker) in brokers.iter().enumerate() {
        let status = Client::new(&format!("http://{}", broker.listen), None)
            .broker_status()
            .await;
        if status.is_ok_and(|s| s.role == leasehold_api::broker_status::BrokerRole::Active) {
            active = Some(index);
        }
    }
    let Some(active) = active else {
        bail!("no active broker")
    };
    let lease = bob.lease(&request(1)).await?;
    bob.release(lease.lease_id).await?;
    brokers[active].service = None; // SIGKILL (Service's Drop)
    let killed = Instant::now();
    let lease = bob.lease(&request(1)).await?;
    let took = killed.elapsed();
    bob.release(lease.lease_id).await?;
    brokers[active].service = Some(start_broker(
        binary,
        &brokers[active],
        database,
        args.leadership_ttl_ms,
    )?);
    Ok(took)
}
