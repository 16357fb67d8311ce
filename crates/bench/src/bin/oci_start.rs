//! Partition start latency with the `oci` driver: from job submission to the
//! job's first output, over many runs with a cached busybox image. Starts a
//! broker, an image store and an agent in this process (needs root, runc and
//! busybox-static), and prints one JSON line.

use anyhow::{bail, Context, Result};
use clap::Parser;
use leasehold_agent::driver::DriverKind;
use leasehold_api::{Client, JobEvent, LeaseRequest, Role, SubmitJobRequest};
use leasehold_core::{HostCapacity, Terms};
use leasehold_service::SystemClock;
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
#[command(
    about = "Measure oci partition start: job submission to first output, p50/p99 over --runs runs (one JSON line)"
)]
struct Args {
    /// Jobs to time after one warm-up job.
    #[arg(long, default_value_t = 100)]
    runs: usize,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<f64>().ok())
        })
        .map(|kib| (kib / 1024.0 * 10.0).round() / 10.0)
        .unwrap_or(0.0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if let Err(reason) = leasehold_agent::driver::oci::probe() {
        bail!("the oci driver cannot run here: {reason}");
    }
    let dir = tempfile::tempdir()?;
    let broker = leasehold_broker::start(leasehold_broker::BrokerConfig {
        image_store_url: None,
        database_url: None,
        store_layer: None,
        plan_policy: Default::default(),
        run_planner: false,
        metrics_public: false,
        data_dir: dir.path().join("broker"),
        listen: "127.0.0.1:0".parse()?,
        durability: leasehold_store::Durability::Full,
        commission_basis_points: 0,
        key_ttl_ms: leasehold_broker::DEFAULT_KEY_TTL_MS,
        clock: Arc::new(SystemClock),
        tls: None,
        client_trust: Default::default(),
    })
    .await?;
    let lender = broker.create_principal("lender", Role::Lender).await?;
    let borrower = broker.create_principal("borrower", Role::Borrower).await?;

    let (store_url, _store_server) = serve_busybox_store(dir.path()).await?;
    let agent = start_oci_agent(dir.path(), &broker.url(), &lender, store_url).await?;
    let agent_client = Client::new(&agent.url(), Some(lender));
    agent_client
        .agent_add_partition(&Terms {
            vcpus: 1,
            cpu_cap_percent: 100,
            memory_mib: 256,
            disk_gib: 1,
            images: vec!["busybox".into()],
            price_per_hour_micros: 1000,
            isolation: None,
        })
        .await?;
    let borrower_client = Client::new(&broker.url(), Some(borrower));
    let lease = borrower_client
        .lease(&LeaseRequest {
            partition: Some("bench/1".into()),
            best: None,
            allow_unisolated: false,
            start: None,
            end: None,
        })
        .await?;
    let request = SubmitJobRequest {
        lease_key: lease.lease_key.clone().context("no key")?,
        command: vec!["echo".into(), "first".into()],
        ..Default::default()
    };
    let jobs = Client::new(&agent.url(), None);
    // Warm-up: fetches and unpacks the image, builds the partition's disk.
    let warm = Instant::now();
    jobs.submit_job_streaming(1, &request, |_| {}).await?;
    let warm_up_ms = warm.elapsed().as_millis() as u64;

    let (first_output_us, total_us) = time_runs(&jobs, &request, args.runs).await?;
    print_report(args.runs, warm_up_ms, &first_output_us, &total_us);
    // Releasing wipes the partition (container, cgroup, mount) before the
    // temporary directory goes.
    let receipt = borrower_client.release(lease.lease_id).await?;
    if !receipt.agent_notified {
        eprintln!("warning: the agent was not told of the release; its partition may stay mounted");
    }
    agent.shutdown().await;
    broker.shutdown().await;
    Ok(())
}

/// An image store holding busybox, served on 127.0.0.1: its URL and server.
async fn serve_busybox_store(
    dir: &std::path::Path,
) -> Result<(String, leasehold_service::ServerHandle)> {
    let store = Arc::new(leasehold_images::ImageStore::open(&dir.join("store"))?);
    store
        .build_busybox("busybox")
        .context("failed to build the busybox image")?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let store_url = format!("http://{}", listener.local_addr()?);
    let server = leasehold_service::ServerHandle::spawn(listener, store.clone().router());
    Ok((store_url, server))
}

/// An agent with the oci driver, its images from `store_url`.
async fn start_oci_agent(
    dir: &std::path::Path,
    broker_url: &str,
    lender: &str,
    store_url: String,
) -> Result<leasehold_agent::RunningAgent> {
    let agent_dir = dir.join("agent");
    let cache = leasehold_images::ImageCache::new(&agent_dir.join("image-cache"), Some(store_url))?;
    Ok(leasehold_agent::start(leasehold_agent::AgentConfig {
        markets: Vec::new(),
        direct: false,
        key_confirmation: Default::default(),
        host_id: "bench".into(),
        data_dir: agent_dir.clone(),
        listen: "127.0.0.1:0".parse()?,
        broker_url: broker_url.to_string(),
        lender_token: lender.to_string(),
        driver: DriverKind::Oci {
            root_dir: agent_dir.join("oci"),
            instance: leasehold_agent::instance_name("bench", &agent_dir),
            images: Arc::new(
                leasehold_agent::images::CachedImages::pinned(cache, vec!["busybox".into()])
                    .await?,
            ),
        },
        capacity: HostCapacity {
            cpu_centicores: 200,
            memory_mib: 4096,
            disk_gib: 10,
            owner_share_cpu_centicores: 0,
            owner_share_memory_mib: 0,
            owner_share_disk_gib: 0,
        },
        advertise_url: None,
        clock: Arc::new(SystemClock),
        revocation_poll_interval_ms: leasehold_agent::DEFAULT_REVOCATION_POLL_SECS * 1000,
        tls: None,
        client_trust: Default::default(),
        sampling: Default::default(),
        rights: None,
        metrics_public: false,
    })
    .await?)
}

/// Runs the job `runs` times; the sorted times to its first output and to
/// its end, in µs.
async fn time_runs(
    jobs: &Client,
    request: &SubmitJobRequest,
    runs: usize,
) -> Result<(Vec<u64>, Vec<u64>)> {
    let mut first_output_us = Vec::with_capacity(runs);
    let mut total_us = Vec::with_capacity(runs);
    for n in 0..runs {
        let started = Instant::now();
        let mut first = None;
        let result = jobs
            .submit_job_streaming(1, request, |event| {
                if first.is_none() && matches!(event, JobEvent::Stdout { .. }) {
                    first = Some(started.elapsed().as_micros() as u64);
                }
            })
            .await?;
        let total = started.elapsed().as_micros() as u64;
        if result.exit_code != Some(0) {
            bail!("run {n} failed: {result:?}");
        }
        first_output_us.push(first.unwrap_or(total));
        total_us.push(total);
    }
    first_output_us.sort_unstable();
    total_us.sort_unstable();
    Ok((first_output_us, total_us))
}

/// The one JSON line, times in ms.
fn print_report(runs: usize, warm_up_ms: u64, first_output_us: &[u64], total_us: &[u64]) {
    println!(
        "{}",
        serde_json::json!({
            "bench": "oci_start",
            "runs": runs,
            "measured_from": "job submission over HTTP (the client leasehold run uses) to the first stdout event",
            "warm_up_ms": warm_up_ms,
            "first_output_p50_ms": percentile(first_output_us, 50.0) as f64 / 1000.0,
            "first_output_p99_ms": percentile(first_output_us, 99.0) as f64 / 1000.0,
            "first_output_max_ms": first_output_us.last().copied().unwrap_or(0) as f64 / 1000.0,
            "job_total_p50_ms": percentile(total_us, 50.0) as f64 / 1000.0,
            "job_total_p99_ms": percentile(total_us, 99.0) as f64 / 1000.0,
            "peak_rss_mib_broker_agent_and_bench": peak_rss_mib(),
        })
    );
}
