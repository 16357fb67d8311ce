//! The borrowers' side, run in a process of its own (the benchmark
//! re-executes itself with the hidden `--borrowers-only`), so that the
//! broker's figures are what a user over HTTP on 127.0.0.1 would see and
//! the borrowers' CPU is not the broker's. Its configuration comes in the
//! environment and its tokens from a 0600 file, never from argv (which
//! every local user can read); its result is one JSON line on stdout.

use crate::stats::{round1, Errors, Latencies};
use crate::workload::{self, SplitMix64};
use anyhow::{Context, Result};
use leasehold_api::{Client, LeaseRequest};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The environment variable that carries [`BorrowersConfig`] as JSON.
pub const CONFIG_ENV: &str = "LEASEHOLD_BENCH_BORROWERS";
/// Offers asked for per find in a find-then-lease cycle: enough to fall
/// back on when concurrent borrowers race for the same cheapest partition.
const CYCLE_FIND_LIMIT: u32 = 5;
const CYCLE_STREAM: u64 = 2 << 40;

/// How a borrower gets its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LeasePath {
    /// `POST /v1/find`, then `POST /v1/leases` naming the first offer
    /// (racing borrowers get 409 and try the next), then release.
    FindThenLease,
    /// `POST /v1/leases` with `best` (the broker picks and leases in one
    /// command, so no races), then release.
    Best,
}

impl LeasePath {
    pub fn name(self) -> &'static str {
        match self {
            LeasePath::FindThenLease => "find-then-lease",
            LeasePath::Best => "best",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BorrowersConfig {
    pub url: String,
    /// One borrower token per line; one concurrent borrower per token.
    pub tokens_file: PathBuf,
    pub path: LeasePath,
    pub seconds: f64,
    pub seed: u64,
    pub run_number: u64,
    /// Worker threads of this process's runtime.
    pub threads: usize,
}

/// What the borrowers' process did, printed as its one JSON line.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct BorrowersReport {
    pub borrowers: usize,
    pub seconds: f64,
    pub cycles: u64,
    pub leases: u64,
    /// Lease attempts refused with 409 (another borrower got there first).
    pub conflicts: u64,
    /// Cycles that leased nothing (no match, or every offer was taken).
    pub unleased_cycles: u64,
    pub errors: u64,
    pub errors_5xx: u64,
    pub errors_unreachable: u64,
    /// The finds inside find-then-lease cycles.
    pub cycle_find_p50_us: Option<u64>,
    pub cycle_find_p99_us: Option<u64>,
    pub lease_p50_us: Option<u64>,
    pub lease_p99_us: Option<u64>,
    pub lease_max_us: Option<u64>,
    pub release_p50_us: Option<u64>,
    pub release_p99_us: Option<u64>,
    pub release_max_us: Option<u64>,
    /// CPU time this process used (all borrowers, JSON, HTTP client).
    pub cpu_seconds: Option<f64>,
}

/// The hidden `--borrowers-only` mode: run, print one JSON line.
pub fn run_borrowers_process() -> Result<()> {
    let text = std::env::var(CONFIG_ENV)
        .with_context(|| format!("--borrowers-only needs {CONFIG_ENV} (the benchmark sets it)"))?;
    let config: BorrowersConfig = serde_json::from_str(&text).context("bad borrowers config")?;
    let tokens: Vec<String> = std::fs::read_to_string(&config.tokens_file)
        .with_context(|| format!("cannot read {}", config.tokens_file.display()))?
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.threads.max(1))
        .enable_all()
        .build()?;
    let mut report = runtime.block_on(run_borrowers(&config, &tokens));
    report.cpu_seconds = super::procfs::cpu_seconds(std::process::id());
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// What one borrower did.
#[derive(Default)]
struct BorrowerStats {
    cycles: u64,
    leases: u64,
    conflicts: u64,
    unleased_cycles: u64,
    errors: Errors,
    find: Latencies,
    /// Successful leases only; a refusal is a different, cheaper path.
    lease: Latencies,
    release: Latencies,
}

impl BorrowerStats {
    fn merge(&mut self, other: BorrowerStats) {
        self.cycles += other.cycles;
        self.leases += other.leases;
        self.conflicts += other.conflicts;
        self.unleased_cycles += other.unleased_cycles;
        self.errors.merge(other.errors);
        self.find.merge(other.find);
        self.lease.merge(other.lease);
        self.release.merge(other.release);
    }
}

async fn run_borrowers(config: &BorrowersConfig, tokens: &[String]) -> BorrowersReport {
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(config.seconds);
    let mut tasks = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        // A client of its own per borrower (its own keep-alive connection),
        // as separate borrowers would have.
        let client = Client::new(&config.url, Some(token.clone()));
        let stream = CYCLE_STREAM + config.run_number * 1_000_000 + i as u64;
        let rng = SplitMix64::stream(config.seed, stream);
        tasks.push(tokio::spawn(borrower(client, rng, deadline, config.path)));
    }
    let mut total = BorrowerStats::default();
    for task in tasks {
        match task.await {
            Ok(stats) => total.merge(stats),
            Err(error) => eprintln!("a borrower panicked: {error}"),
        }
    }
    BorrowersReport {
        borrowers: tokens.len(),
        seconds: (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
        cycles: total.cycles,
        leases: total.leases,
        conflicts: total.conflicts,
        unleased_cycles: total.unleased_cycles,
        errors: total.errors.total,
        errors_5xx: total.errors.server,
        errors_unreachable: total.errors.unreachable,
        cycle_find_p50_us: total.find.percentile(50.0),
        cycle_find_p99_us: total.find.percentile(99.0),
        lease_p50_us: total.lease.percentile(50.0),
        lease_p99_us: total.lease.percentile(99.0),
        lease_max_us: total.lease.max(),
        release_p50_us: total.release.percentile(50.0),
        release_p99_us: total.release.percentile(99.0),
        release_max_us: total.release.max(),
        cpu_seconds: None,
    }
}

async fn borrower(
    client: Client,
    mut rng: SplitMix64,
    deadline: Instant,
    path: LeasePath,
) -> BorrowerStats {
    let mut stats = BorrowerStats::default();
    while Instant::now() < deadline {
        stats.cycles += 1;
        let requirements = workload::random_requirements(&mut rng);
        let leased = match path {
            LeasePath::FindThenLease => find_then_lease(&client, requirements, &mut stats).await,
            LeasePath::Best => {
                let request = LeaseRequest {
                    partition: None,
                    best: Some(requirements),
                    allow_unisolated: false,
                    start: None,
                    end: None,
                };
                try_lease(&client, &request, &mut stats).await
            }
        };
        match leased {
            Some(lease_id) => {
                let call = Instant::now();
                match client.release(lease_id).await {
                    Ok(_) => stats.release.since(call),
                    Err(error) => stats.errors.record("release", &error),
                }
            }
            None => stats.unleased_cycles += 1,
        }
    }
    stats
}

/// One lease attempt: the lease id, or `None` after counting why not.
async fn try_lease(
    client: &Client,
    request: &LeaseRequest,
    stats: &mut BorrowerStats,
) -> Option<u64> {
    let call = Instant::now();
    match client.lease(request).await {
        Ok(lease) => {
            stats.lease.since(call);
            stats.leases += 1;
            Some(lease.lease_id)
        }
        // Nothing free matches the requirements: not a race, not an error.
        Err(error) if error.code() == Some("no_match") => None,
        Err(error) if error.status() == Some(409) => {
            stats.conflicts += 1;
            None
        }
        Err(error) => {
            stats.errors.record("lease", &error);
            None
        }
    }
}

async fn find_then_lease(
    client: &Client,
    requirements: leasehold_core::Requirements,
    stats: &mut BorrowerStats,
) -> Option<u64> {
    let call = Instant::now();
    let offers = match client.find(&requirements, Some(CYCLE_FIND_LIMIT)).await {
        Ok(answer) => {
            stats.find.since(call);
            answer.offers
        }
        Err(error) => {
            stats.errors.record("find (cycle)", &error);
            return None;
        }
    };
    // Best first; a 409 means another borrower won the race for that
    // partition, which is the contention being measured.
    for offer in offers {
        let request = LeaseRequest {
            partition: Some(offer.partition.to_string()),
            best: None,
            allow_unisolated: false,
            start: None,
            end: None,
        };
        let conflicts_before = stats.conflicts;
        if let Some(lease_id) = try_lease(client, &request, stats).await {
            return Some(lease_id);
        }
        if stats.conflicts == conflicts_before {
            return None; // an error, already counted: do not hammer
        }
    }
    None
}

/// How a finder paces itself.
pub struct FinderPace {
    /// Stop after this many finds.
    pub max_finds: usize,
    /// Start a find at most this often; `None`: back to back. Under load
    /// the finder is a browsing borrower, not more load: back to back it
    /// would take a core of the broker's on its own.
    pub interval: Option<Duration>,
}

/// Sequential finds with random requirements until `stop` is set: the
/// latency a browsing borrower sees while the load runs (or without load).
pub async fn finder(
    client: Client,
    seed: u64,
    stream: u64,
    stop: Arc<AtomicBool>,
    pace: FinderPace,
) -> FinderReport {
    let mut rng = SplitMix64::stream(seed, stream);
    // One untimed call opens the connection, so the maximum measures the
    // broker rather than a TCP handshake.
    let _ = client.find(&Default::default(), Some(1)).await;
    let mut latencies = Latencies::default();
    let (mut finds, mut empty, mut errors) = (0usize, 0u64, Errors::default());
    let mut ticks = pace.interval.map(|period| {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks
    });
    while !stop.load(Ordering::Relaxed) && finds < pace.max_finds {
        if let Some(ticks) = &mut ticks {
            ticks.tick().await;
        }
        finds += 1;
        let requirements = workload::random_requirements(&mut rng);
        let call = Instant::now();
        match client.find(&requirements, None).await {
            Ok(answer) => {
                latencies.since(call);
                empty += u64::from(answer.offers.is_empty());
            }
            Err(error) => errors.record("find", &error),
        }
    }
    FinderReport {
        finds,
        find_p50_us: latencies.percentile(50.0),
        find_p99_us: latencies.percentile(99.0),
        find_max_us: latencies.max(),
        find_empty: empty,
        find_errors: errors.total,
    }
}

#[derive(Debug, Default, Serialize)]
pub struct FinderReport {
    pub finds: usize,
    pub find_p50_us: Option<u64>,
    pub find_p99_us: Option<u64>,
    pub find_max_us: Option<u64>,
    pub find_empty: u64,
    pub find_errors: u64,
}

pub fn rate(count: u64, seconds: f64) -> f64 {
    round1(count as f64 / seconds.max(1e-9))
}
