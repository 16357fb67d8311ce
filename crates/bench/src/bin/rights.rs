//! Usage rights (seed 004) through real processes: a broker and two agents
//! (`--driver sim`) in one share group, the group's table kept by the
//! broker (default), in an SQLite file the managers share (`--store
//! sqlite`) or in a PostgreSQL database (`--store postgres://...`).
//! Measures the time from a request to the modules being active on the
//! requester (the manager answers after it applied them), inside one host
//! and across hosts; transfers per second through
//! the primary with several concurrent clients; and the primary's
//! fail-over time after its process is killed. Prints one JSON line.

use anyhow::{bail, Context, Result};
use clap::Parser;
use leasehold_api::rights::*;
use leasehold_api::{Client, Role};
use leasehold_bench::processes::{binary, start, text, Service};
use leasehold_bench::stats::Latencies;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "Usage-rights transfer latency, throughput and fail-over (one JSON line)")]
struct Args {
    /// The `leasehold` binary; by default the one next to this benchmark.
    #[arg(long)]
    leasehold: Option<PathBuf>,
    /// Where the group's table lives: `broker`, `sqlite` (a file the
    /// managers share) or a `postgres://` URL (a database they share; its
    /// tables are made in it).
    #[arg(long, default_value = "broker", value_parser = parse_store)]
    store: String,
    /// Requests timed for each latency.
    #[arg(long, default_value_t = 200)]
    iterations: usize,
    /// Concurrent clients for the throughput phase.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Length of the throughput phase, in seconds.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
}

fn parse_store(store: &str) -> Result<String, String> {
    match store {
        "broker" | "sqlite" => Ok(store.to_string()),
        url if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(url.to_string())
        }
        other => Err(format!(
            "'{other}' is not broker, sqlite or a postgres:// URL"
        )),
    }
}

fn start_agent(
    binary: &Path,
    dir: &Path,
    host: &str,
    broker_url: &str,
    store: Option<&str>,
    token: &str,
) -> Result<Service> {
    let data = dir.join(host).display().to_string();
    // A group of this run's own, so a database kept from an earlier run
    // (a PostgreSQL one) does not hold it already.
    let group_name = format!("bench-{}", std::process::id());
    let mut args = vec![
        "agent",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data,
        "--host-id",
        host,
        "--driver",
        "sim",
        "--cpus",
        "64",
        "--memory-mib",
        "65536",
        "--disk-gib",
        "100",
        "--broker",
        broker_url,
        "--output",
        "json",
        "--group",
        &group_name,
    ];
    if let Some(store) = store {
        args.extend(["--group-store", store]);
    }
    start(binary, &args, Some(token))
}

fn summary(samples: &mut Latencies) -> serde_json::Value {
    serde_json::json!({
        "p50_us": samples.percentile(50.0),
        "p99_us": samples.percentile(99.0),
        "max_us": samples.max(),
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let binary = binary(args.leasehold.as_deref())?;
    let dir = tempfile::tempdir()?;
    let group = start_group(&binary, dir.path(), &args.store).await?;
    let (a, b) = (group.clients[0].clone(), group.clients[1].clone());
    let partition = add_partition(&a, &group.lender_token).await?;
    let mut local = local_latency(&a, partition, args.iterations).await?;
    let mut across = cross_host_latency(&a, partition, args.iterations).await?;
    let throughput = transfers_per_second(&a, &b, args.clients, args.seconds).await?;
    let [first, second] = group.agents;
    let failover_ms = failover([(first, a.clone()), (second, b.clone())]).await?;
    println!(
        "{}",
        serde_json::json!({
            "bench": "rights",
            // A URL may carry a password: only its kind is printed.
            "store": if args.store.contains("://") { "postgres" } else { args.store.as_str() },
            "iterations": args.iterations,
            "local_request": summary(&mut local),
            "cross_host_request": summary(&mut across),
            "clients": args.clients,
            "transfers_per_second": throughput,
            "primary_failover_ms": failover_ms,
        })
    );
    drop(group.broker);
    Ok(())
}

/// A broker and two agents in one group, 32 rights granted to each host;
/// the clients carry the admin's token.
struct Group {
    broker: Service,
    agents: [Service; 2],
    clients: [Client; 2],
    lender_token: String,
}

async fn start_group(binary: &Path, dir: &Path, store: &str) -> Result<Group> {
    let broker_dir = dir.join("broker").display().to_string();
    let broker_args = [
        "broker",
        "--listen",
        "127.0.0.1:0",
        "--output",
        "json",
        "--data-dir",
        &broker_dir,
    ];
    let broker = start(binary, &broker_args, None)?;
    let broker_url = text(&broker, "broker_url")?;
    let admin_token = text(&broker, "admin_token")?;
    let admin = Client::new(&broker_url, Some(admin_token.clone()));
    let lender_token = admin.create_principal("lender", Role::Lender).await?.token;
    let store_path = dir.join("group.db").display().to_string();
    let store = match store {
        "broker" => None,
        "sqlite" => Some(store_path.as_str()),
        postgres_url => Some(postgres_url),
    };
    let first = start_agent(binary, dir, "host-a", &broker_url, store, &lender_token)?;
    let second = start_agent(binary, dir, "host-b", &broker_url, store, &lender_token)?;
    let a = Client::new(&text(&first, "agent_url")?, Some(admin_token.clone()));
    let b = Client::new(&text(&second, "agent_url")?, Some(admin_token));
    for host in ["host-a", "host-b"] {
        let grant = RightsGrantBody {
            host_id: host.into(),
            partition: 0,
            modules: 32,
            expires_at_ms: None,
        };
        a.agent_rights_grant(&grant).await?;
    }
    Ok(Group {
        broker,
        agents: [first, second],
        clients: [a, b],
        lender_token,
    })
}

/// A one-vCPU partition on host-a, with no rights yet.
async fn add_partition(a: &Client, lender_token: &str) -> Result<u32> {
    let terms = leasehold_core::Terms {
        vcpus: 1,
        cpu_cap_percent: 100,
        memory_mib: 256,
        disk_gib: 1,
        images: vec!["busybox".into()],
        price_per_hour_micros: 100_000,
        isolation: None,
    };
    let added = a
        .with_token(Some(lender_token.to_string()))
        .agent_add_partition(&terms)
        .await?;
    Ok(added.partition.index)
}

/// Inside the host: the owner share lends to the partition, which gives
/// the right back after each timed request.
async fn local_latency(a: &Client, partition: u32, iterations: usize) -> Result<Latencies> {
    let request = RightsRequestBody {
        host_id: "host-a".into(),
        partition,
        modules: 1,
    };
    let give_back = RightsSlotBody {
        host_id: "host-a".into(),
        partition,
        modules: 1,
    };
    let mut local = Latencies::default();
    for _ in 0..iterations {
        let started = Instant::now();
        a.agent_rights_request(&request).await?;
        local.since(started);
        a.agent_rights_release(&give_back).await?;
    }
    Ok(local)
}

/// Across hosts: host-a's owner share has nothing left to lend, so each
/// right comes from host-b (and goes back after each timed request).
async fn cross_host_latency(a: &Client, partition: u32, iterations: usize) -> Result<Latencies> {
    let drain = RightsTransferBody {
        from_host: "host-a".into(),
        from_partition: 0,
        to_host: "host-b".into(),
        to_partition: 0,
        modules: 32,
    };
    a.agent_rights_transfer(&drain).await?;
    let request = RightsRequestBody {
        host_id: "host-a".into(),
        partition,
        modules: 1,
    };
    let back = RightsTransferBody {
        from_host: "host-a".into(),
        from_partition: partition,
        to_host: "host-b".into(),
        to_partition: 0,
        modules: 1,
    };
    let mut across = Latencies::default();
    for _ in 0..iterations {
        let started = Instant::now();
        a.agent_rights_request(&request).await?;
        across.since(started);
        a.agent_rights_transfer(&back).await?;
    }
    Ok(across)
}

/// Concurrent explicit transfers between the two owner shares for
/// `seconds`, through the primary; committed transfers per second.
async fn transfers_per_second(a: &Client, b: &Client, clients: usize, seconds: u64) -> Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..clients)
        .map(|i| {
            let client = if i % 2 == 0 { a.clone() } else { b.clone() };
            let (from, to) = if i % 2 == 0 {
                ("host-b", "host-a")
            } else {
                ("host-a", "host-b")
            };
            tokio::spawn(async move {
                let body = RightsTransferBody {
                    from_host: from.into(),
                    from_partition: 0,
                    to_host: to.into(),
                    to_partition: 0,
                    modules: 1,
                };
                let mut committed = 0u64;
                while Instant::now() < deadline {
                    if let Ok(answer) = client.agent_rights_transfer(&body).await {
                        committed += answer.committed.len() as u64;
                    }
                }
                committed
            })
        })
        .collect();
    let mut committed = 0;
    for worker in workers {
        committed += worker.await?;
    }
    Ok(committed as f64 / seconds as f64)
}

/// Kills the primary's process and times until the other manager records
/// itself as primary (its lease lapses first: at most its TTL and a tick).
async fn failover(mut managers: [(Service, Client); 2]) -> Result<u64> {
    let table = managers[0].1.agent_rights().await?;
    let primary = table.group.primary_host.clone().context("no primary")?;
    let (dead, alive) = if primary == "host-a" { (0, 1) } else { (1, 0) };
    let survivor = if dead == 0 { "host-b" } else { "host-a" };
    let started = Instant::now();
    let _ = managers[dead].0.child.kill();
    let _ = managers[dead].0.child.wait();
    loop {
        let table = managers[alive].1.agent_rights().await?;
        if table.group.primary_host.as_deref() == Some(survivor) {
            return Ok(started.elapsed().as_millis() as u64);
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("no fail-over within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
