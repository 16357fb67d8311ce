//! The broker under the two unauthenticated attacks of issue 7: anonymous
//! clients that declare a 1 MB body, send half and stall, and thousands of
//! connections that never send a byte. Starts the real `leasehold broker`
//! as a separate process, measures an authenticated borrower's find latency
//! without and during the attack and the broker's RSS, and prints one JSON
//! line.

use anyhow::{bail, Context, Result};
use clap::Parser;
use leasehold_api::{Client, LeaseRequest, RegisterHostRequest, RegisterPartitionRequest, Role};
use leasehold_core::{HostCapacity, Requirements, Terms};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

#[derive(Parser)]
#[command(
    about = "Find latency and broker RSS under stalled anonymous bodies and idle connections (one JSON line)"
)]
struct Args {
    /// The `leasehold` binary; by default the one next to this benchmark.
    #[arg(long)]
    leasehold: Option<PathBuf>,
    /// Anonymous connections that declare a 1 MB body, send half, and stall.
    #[arg(long, default_value_t = 400)]
    stalled: usize,
    /// Connections that never send a byte.
    #[arg(long, default_value_t = 5000)]
    idle: usize,
    /// Finds timed in each phase (without and during the attack).
    #[arg(long, default_value_t = 2000)]
    finds: usize,
    /// Partitions registered at the broker.
    #[arg(long, default_value_t = 100)]
    partitions: u32,
}

/// The broker process, killed when dropped.
struct Broker {
    child: Child,
    url: String,
    admin_token: String,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn leasehold_binary(args: &Args) -> Result<PathBuf> {
    if let Some(path) = &args.leasehold {
        return Ok(path.clone());
    }
    // Cargo puts every binary of a profile in one directory.
    let here = std::env::current_exe()?;
    let path = here
        .parent()
        .context("the benchmark has no directory")?
        .join("leasehold");
    if !path.exists() {
        bail!(
            "no leasehold binary at {}; build it (cargo build --release -p leasehold-cli) or pass --leasehold PATH",
            path.display()
        );
    }
    Ok(path)
}

fn start_broker(binary: &PathBuf, data_dir: &std::path::Path) -> Result<Broker> {
    let mut child = Command::new(binary)
        .args(["broker", "--listen", "127.0.0.1:0", "--output", "json"])
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("LEASEHOLD_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("failed to start {}", binary.display()))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let ready: serde_json::Value = serde_json::from_str(&line)
        .with_context(|| format!("the broker printed no ready line: {line:?}"))?;
    let text = |key: &str| -> Result<String> {
        Ok(ready[key]
            .as_str()
            .with_context(|| format!("no {key} in {ready}"))?
            .to_string())
    };
    Ok(Broker {
        url: text("broker_url")?,
        admin_token: text("admin_token")?,
        child,
    })
}

/// VmRSS and VmHWM (peak) of a process, in KiB.
fn rss_and_peak_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn register_partitions(broker: &Broker, count: u32) -> Result<Client> {
    let admin = Client::new(&broker.url, Some(broker.admin_token.clone()));
    let lender = Client::new(
        &broker.url,
        Some(admin.create_principal("lender", Role::Lender).await?.token),
    );
    let big = 102_400;
    let capacity = HostCapacity {
        cpu_centicores: big,
        memory_mib: big,
        disk_gib: big,
        owner_share_cpu_centicores: 0,
        owner_share_memory_mib: 0,
        owner_share_disk_gib: 0,
    };
    let host = RegisterHostRequest {
        share: None,
        agent_url: None,
        capacity,
    };
    lender.register_host("bench", &host).await?;
    for index in 1..=count {
        let terms = Terms {
            vcpus: 1,
            cpu_cap_percent: 100,
            memory_mib: 256 + u64::from(index % 4) * 256,
            disk_gib: 1,
            images: vec!["busybox".into()],
            price_per_hour_micros: 1000 + u64::from(index),
            isolation: Some(leasehold_core::Isolation::Simulated),
        };
        lender
            .register_partition("bench", index, &RegisterPartitionRequest { terms })
            .await?;
    }
    let token = admin
        .create_principal("borrower", Role::Borrower)
        .await?
        .token;
    Ok(Client::new(&broker.url, Some(token)))
}

/// Latency samples of one phase, in microseconds, and failed calls.
#[derive(Default)]
struct Phase {
    find_us: Vec<u64>,
    failures: u64,
}

impl Phase {
    fn summary(&mut self) -> serde_json::Value {
        self.find_us.sort_unstable();
        let at = |p: f64| -> Option<u64> {
            let n = self.find_us.len();
            (n > 0)
                .then(|| self.find_us[(((p / 100.0) * n as f64).ceil() as usize).clamp(1, n) - 1])
        };
        serde_json::json!({
            "finds": self.find_us.len(),
            "find_p50_us": at(50.0),
            "find_p99_us": at(99.0),
            "find_max_us": self.find_us.last(),
            "failures": self.failures,
        })
    }
}

/// Finds one after another, at least `finds` of them and until `until` is
/// set, plus one lease and release at the end.
async fn measure(borrower: &Client, finds: usize, until: &AtomicBool) -> Phase {
    let mut phase = Phase::default();
    let wanted = Requirements {
        min_memory_mib: Some(512),
        ..Requirements::default()
    };
    while phase.find_us.len() + (phase.failures as usize) < finds || !until.load(Ordering::Relaxed)
    {
        let started = Instant::now();
        match borrower.find(&wanted, Some(10)).await {
            Ok(found) if !found.offers.is_empty() => {
                phase.find_us.push(started.elapsed().as_micros() as u64)
            }
            _ => phase.failures += 1,
        }
    }
    let best = LeaseRequest {
        partition: None,
        best: Some(wanted),
        allow_unisolated: false,
        start: None,
        end: None,
    };
    match borrower.lease(&best).await {
        Ok(lease) if borrower.release(lease.lease_id).await.is_ok() => {}
        _ => phase.failures += 1,
    }
    phase
}

/// Connections held open by the attack, and the connects that failed.
struct Attack {
    held: Vec<tokio::net::TcpStream>,
    stalled_opened: usize,
    idle_opened: usize,
    connect_failures: usize,
}

/// Opens the stalled anonymous bodies, then the idle connections.
async fn open_attack(address: &str, stalled: usize, idle: usize) -> Attack {
    let mut request = format!(
        "POST /v1/find HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
    )
    .into_bytes();
    request.extend(vec![b' '; 500_000]);
    let mut attack = Attack {
        held: Vec::with_capacity(stalled + idle),
        stalled_opened: 0,
        idle_opened: 0,
        connect_failures: 0,
    };
    for n in 0..stalled + idle {
        let connect = tokio::net::TcpStream::connect(address);
        let Ok(Ok(mut stream)) = tokio::time::timeout(Duration::from_secs(5), connect).await else {
            attack.connect_failures += 1;
            continue;
        };
        if n < stalled {
            // The broker may answer 401 and close before it all went: fine.
            let _ = stream.write_all(&request).await;
            attack.stalled_opened += 1;
        } else {
            attack.idle_opened += 1;
        }
        attack.held.push(stream);
    }
    attack
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let binary = leasehold_binary(&args)?;
    leasehold_service::raise_open_files_limit();
    let dir = tempfile::tempdir()?;
    let broker = start_broker(&binary, &dir.path().join("broker"))?;
    let pid = broker.child.id();
    let borrower = register_partitions(&broker, args.partitions).await?;

    let mut quiet = measure(&borrower, args.finds, &AtomicBool::new(true)).await;
    let (rss_before_kib, peak_before_kib) = rss_and_peak_kib(pid);

    // The borrower keeps finding while the attack opens its connections,
    // and on while they are all held, until it has its samples.
    let address = broker.url.trim_start_matches("http://").to_string();
    let opened = AtomicBool::new(false);
    let opening = Instant::now();
    let attacking = async {
        let attack = open_attack(&address, args.stalled, args.idle).await;
        opened.store(true, Ordering::Relaxed);
        attack
    };
    let (attack, mut attacked) = tokio::join!(attacking, measure(&borrower, args.finds, &opened));
    let open_ms = opening.elapsed().as_millis() as u64;
    let (rss_during_kib, peak_during_kib) = rss_and_peak_kib(pid);
    let held = attack.held.len();
    drop(attack.held);

    let line = serde_json::json!({
        "benchmark": "attack",
        "stalled_bodies": attack.stalled_opened,
        "idle_connections": attack.idle_opened,
        "connections_opened": held,
        "connect_failures": attack.connect_failures,
        "attack_ms": open_ms,
        "quiet": quiet.summary(),
        "during_attack": attacked.summary(),
        "broker_rss_before_mib": rss_before_kib / 1024,
        "broker_peak_rss_before_mib": peak_before_kib / 1024,
        "broker_rss_during_mib": rss_during_kib / 1024,
        "broker_peak_rss_during_mib": peak_during_kib / 1024,
    });
    println!("{line}");
    Ok(())
}
