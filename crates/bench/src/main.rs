//! `leasehold-bench`: a load benchmark of the broker, end to end over HTTP.
//!
//! It starts a broker in this process on 127.0.0.1 with a throwaway data
//! directory, fills it with hosts and partitions through the typed client,
//! then measures find latency and the sustained rate of find → lease → release
//! cycles at several levels of concurrency. Progress goes to stderr; the
//! result is one JSON line on stdout, so runs can be collected and compared.
//!
//! Everything goes through the public HTTP API (not the broker's internals),
//! so the numbers include JSON, authentication, the single writer's group
//! commit and SQLite: what a real borrower would see on this machine.

mod stats;
mod workload;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use leasehold_api::{Client, LeaseRequest, RegisterHostRequest, RegisterPartitionRequest, Role};
use leasehold_broker::{BrokerConfig, RunningBroker};
use leasehold_service::SystemClock;
use leasehold_store::Durability;
use serde::Serialize;
use stats::{dir_size_mib, proc_status_mib, round1, Errors, Latencies};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use workload::SplitMix64;

/// Offers asked for per find in a cycle: enough to fall back on when
/// concurrent clients race for the same cheapest partition.
const CYCLE_FIND_LIMIT: u32 = 5;
/// Stream numbers that keep the generators of the phases apart.
const FIND_STREAM: u64 = 1 << 40;
const CYCLE_STREAM: u64 = 2 << 40;

#[derive(Debug, Parser)]
#[command(
    name = "leasehold-bench",
    about = "Benchmark the leasehold broker over HTTP: registration rate, find latency, and find/lease/release throughput.",
    long_about = "Starts a broker in this process on 127.0.0.1 with a temporary data directory, registers \
                  hosts and partitions over HTTP, measures find latency, then runs find -> lease -> release \
                  cycles with each requested number of concurrent borrowers. Progress goes to stderr; \
                  exactly one JSON line with all results goes to stdout."
)]
struct Args {
    /// Hosts to register [default: 10000, or 200 with --quick]
    #[arg(long)]
    hosts: Option<usize>,

    /// Partitions registered on each host, indexes 1..=N [default: 10, or 5 with --quick]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=workload::MAX_PARTITIONS_PER_HOST as i64))]
    partitions_per_host: Option<u32>,

    /// Sequential finds timed for the latency percentiles [default: 2000, or 200 with --quick]
    #[arg(long)]
    finds: Option<usize>,

    /// Seconds each find/lease/release run lasts [default: 10, or 2 with --quick]
    #[arg(long)]
    seconds: Option<u64>,

    /// Concurrent borrowers for each find/lease/release run, comma separated;
    /// one run per entry, in order, each client its own borrower principal
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    clients: Vec<usize>,

    /// Small smoke run: 200 hosts x 5 partitions, 200 finds, 2-second runs
    /// (explicit --hosts, --partitions-per-host, --finds, --seconds still win)
    #[arg(long)]
    quick: bool,

    /// How the broker commits: `full` fsyncs every group commit (production),
    /// `normal` survives a process crash but not a power cut
    #[arg(long, value_enum, default_value_t = DurabilityArg::Full)]
    durability: DurabilityArg,

    /// Seed of the workload generator; the same seed gives the same terms and
    /// the same requirements
    #[arg(long, default_value_t = 1)]
    seed: u64,

    /// Lender principals the hosts are spread over (host i belongs to lender i mod N)
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    lenders: u64,

    /// Registration requests in flight at once during setup
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    registration_concurrency: u64,

    /// Directory in which the broker's temporary data directory is created
    /// (removed at exit); pick the disk whose fsync you want to measure
    /// [default: the system temporary directory]
    #[arg(long)]
    work_dir: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DurabilityArg {
    Full,
    Normal,
}

impl DurabilityArg {
    fn store(self) -> Durability {
        match self {
            DurabilityArg::Full => Durability::Full,
            DurabilityArg::Normal => Durability::Normal,
        }
    }

    fn name(self) -> &'static str {
        match self {
            DurabilityArg::Full => "full",
            DurabilityArg::Normal => "normal",
        }
    }
}

/// The parameters after applying --quick and the defaults.
#[derive(Debug, Clone)]
struct Plan {
    hosts: usize,
    partitions_per_host: u32,
    finds: usize,
    seconds: u64,
    clients: Vec<usize>,
    durability: DurabilityArg,
    seed: u64,
    lenders: u64,
    registration_concurrency: u64,
}

impl Plan {
    fn from_args(args: &Args) -> Result<Plan> {
        let pick = |explicit: Option<usize>, quick: usize, full: usize| {
            explicit.unwrap_or(if args.quick { quick } else { full })
        };
        let plan = Plan {
            hosts: pick(args.hosts, 200, 10_000),
            partitions_per_host: pick(args.partitions_per_host.map(|p| p as usize), 5, 10) as u32,
            finds: pick(args.finds, 200, 2000),
            seconds: pick(args.seconds.map(|s| s as usize), 2, 10) as u64,
            clients: args.clients.clone(),
            durability: args.durability,
            seed: args.seed,
            lenders: args.lenders,
            registration_concurrency: args.registration_concurrency,
        };
        if plan.hosts == 0 {
            bail!("--hosts must be at least 1");
        }
        if plan.clients.is_empty() || plan.clients.contains(&0) {
            bail!("--clients must list positive numbers, e.g. 1,8");
        }
        Ok(plan)
    }

    fn partitions(&self) -> u64 {
        self.hosts as u64 * self.partitions_per_host as u64
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let plan = Plan::from_args(&args)?;
    // Multi-threaded so the broker's handlers and the benchmark's clients
    // share the machine's cores the way separate processes would.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let report = runtime.block_on(run(plan, args.work_dir))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

async fn run(plan: Plan, work_dir: Option<std::path::PathBuf>) -> Result<Report> {
    // The broker listens for Ctrl-C / SIGTERM and stops serving; without this
    // the benchmark would carry on against a dead broker and report garbage.
    tokio::spawn(async {
        leasehold_service::shutdown_signal().await;
        eprintln!("interrupted; no report");
        std::process::exit(130);
    });

    let data_dir = match &work_dir {
        Some(dir) => tempfile::Builder::new()
            .prefix("leasehold-bench-")
            .tempdir_in(dir),
        None => tempfile::Builder::new()
            .prefix("leasehold-bench-")
            .tempdir(),
    }
    .context("cannot create the broker's temporary data directory")?;
    let broker = leasehold_broker::start(BrokerConfig {
        image_store_url: None,
        database_url: None,
        store_layer: None,
        // A subdirectory the broker makes itself, 0700 (the temporary
        // directory takes the umask).
        data_dir: data_dir.path().join("broker"),
        listen: "127.0.0.1:0".parse().expect("a valid socket address"),
        durability: plan.durability.store(),
        commission_basis_points: 100,
        key_ttl_ms: leasehold_broker::DEFAULT_KEY_TTL_MS,
        clock: Arc::new(SystemClock),
        tls: None,
        client_trust: Default::default(),
    })
    .await
    .context("cannot start the broker")?;
    let url = broker.url();
    if broker.bootstrap_admin_token.is_none() {
        // A fresh directory always bootstraps an admin; anything else means
        // we are not looking at the empty broker we think we are.
        bail!("the broker did not bootstrap an admin: its data directory was not empty");
    }
    eprintln!(
        "broker on {url}, data in {} ({} durability); {} hosts x {} partitions",
        data_dir.path().display(),
        plan.durability.name(),
        plan.hosts,
        plan.partitions_per_host
    );

    let setup = register_all(&broker, &url, &plan).await?;
    let rss_after_setup = proc_status_mib("VmRSS");

    let finder = Client::new(
        &url,
        Some(
            broker
                .create_principal("bench-finder", Role::Borrower)
                .await?,
        ),
    );
    let finds = measure_finds(&finder, &plan).await;

    let most_clients = plan.clients.iter().copied().max().unwrap_or(1);
    let mut borrowers = Vec::with_capacity(most_clients);
    for i in 0..most_clients {
        let token = broker
            .create_principal(&format!("bench-borrower-{i}"), Role::Borrower)
            .await
            .context("cannot create a borrower")?;
        borrowers.push(token);
    }
    let mut cycle_reports = Vec::new();
    for (run_number, &clients) in plan.clients.iter().enumerate() {
        let tokens = &borrowers[..clients];
        cycle_reports.push(measure_cycles(&url, tokens, &plan, run_number as u64).await);
    }

    let report = Report {
        bench: "broker",
        hosts: plan.hosts,
        partitions_per_host: plan.partitions_per_host,
        partitions: plan.partitions(),
        durability: plan.durability.name(),
        seed: plan.seed,
        lenders: plan.lenders,
        registration_concurrency: plan.registration_concurrency,
        setup_seconds: round3(setup.seconds),
        registrations: setup.registrations,
        registrations_per_second: round1(setup.registrations as f64 / setup.seconds),
        registration_errors: setup.errors.total,
        finds: plan.finds,
        find_p50_us: finds.p50,
        find_p99_us: finds.p99,
        find_max_us: finds.max,
        find_empty: finds.empty,
        find_errors: finds.errors.total,
        cycle_seconds: plan.seconds,
        cycles: cycle_reports,
        rss_mib_after_setup: rss_after_setup,
        rss_mib_end: proc_status_mib("VmRSS"),
        peak_rss_mib: proc_status_mib("VmHWM"),
        db_mib: dir_size_mib(data_dir.path()),
    };

    drop(finder);
    // Stop the broker before its directory is removed; a stuck connection
    // must not hold up the report.
    if tokio::time::timeout(Duration::from_secs(5), broker.shutdown())
        .await
        .is_err()
    {
        eprintln!("the broker did not stop within 5 s; exiting anyway");
    }
    drop(data_dir);
    Ok(report)
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// A latency for a progress line; "-" when nothing was measured.
fn show(value: Option<u64>) -> String {
    value.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// The one JSON line on stdout. A struct rather than `json!` so the fields
/// come out in this order (parameters first), not alphabetically. Latencies
/// are `null` when nothing was measured; memory in MiB.
#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    hosts: usize,
    partitions_per_host: u32,
    partitions: u64,
    durability: &'static str,
    seed: u64,
    lenders: u64,
    registration_concurrency: u64,
    /// Registering every host and partition, over HTTP.
    setup_seconds: f64,
    /// Successful register-host plus register-partition requests.
    registrations: u64,
    registrations_per_second: f64,
    registration_errors: u64,
    finds: usize,
    find_p50_us: Option<u64>,
    find_p99_us: Option<u64>,
    find_max_us: Option<u64>,
    find_empty: u64,
    find_errors: u64,
    cycle_seconds: u64,
    cycles: Vec<CycleReport>,
    /// The whole process (broker plus benchmark clients).
    rss_mib_after_setup: Option<f64>,
    rss_mib_end: Option<f64>,
    peak_rss_mib: Option<f64>,
    /// The broker's SQLite files at the end of the run.
    db_mib: Option<f64>,
}

/// One find/lease/release run.
#[derive(Debug, Serialize)]
struct CycleReport {
    clients: usize,
    seconds: f64,
    cycles: u64,
    cycles_per_second: f64,
    leases: u64,
    leases_per_second: f64,
    conflicts: u64,
    unleased_cycles: u64,
    errors: u64,
    errors_5xx: u64,
    errors_unreachable: u64,
    find_p50_us: Option<u64>,
    find_p99_us: Option<u64>,
    lease_p50_us: Option<u64>,
    lease_p99_us: Option<u64>,
    lease_max_us: Option<u64>,
    release_p50_us: Option<u64>,
    release_p99_us: Option<u64>,
    release_max_us: Option<u64>,
}

struct SetupOutcome {
    seconds: f64,
    /// Successful register-host and register-partition requests.
    registrations: u64,
    errors: Errors,
}

/// Registers every host and its partitions over HTTP, with a fixed number of
/// workers pulling host numbers from a shared counter so the load stays at
/// `registration_concurrency` requests in flight (which is also what lets the
/// broker's writer group-commit several of them per fsync).
async fn register_all(broker: &RunningBroker, url: &str, plan: &Plan) -> Result<SetupOutcome> {
    let mut lenders = Vec::new();
    for i in 0..plan.lenders {
        let token = broker
            .create_principal(&format!("bench-lender-{i}"), Role::Lender)
            .await
            .context("cannot create a lender")?;
        lenders.push(token);
    }
    // One connection pool for all lenders: they differ only in their token.
    let base = Client::new(url, None);
    let lenders: Arc<Vec<Client>> = Arc::new(
        lenders
            .into_iter()
            .map(|t| base.with_token(Some(t)))
            .collect(),
    );
    let next_host = Arc::new(AtomicUsize::new(0));
    let hosts_done = Arc::new(AtomicUsize::new(0));
    let registrations = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Mutex::new(Errors::default()));
    let plan = Arc::new(plan.clone());
    let started = Instant::now();

    let mut workers = Vec::new();
    for _ in 0..plan.registration_concurrency {
        let (lenders, next_host, hosts_done, registrations, errors, plan) = (
            lenders.clone(),
            next_host.clone(),
            hosts_done.clone(),
            registrations.clone(),
            errors.clone(),
            plan.clone(),
        );
        workers.push(tokio::spawn(async move {
            let capacity = workload::host_capacity(plan.partitions_per_host);
            let mut local_errors = Errors::default();
            loop {
                let index = next_host.fetch_add(1, Ordering::Relaxed);
                if index >= plan.hosts {
                    break;
                }
                let client = &lenders[index % lenders.len()];
                let host_id = workload::host_id(index);
                let host = RegisterHostRequest {
                    agent_url: None,
                    capacity: capacity.clone(),
                };
                match client.register_host(&host_id, &host).await {
                    Ok(_) => {
                        registrations.fetch_add(1, Ordering::Relaxed);
                        // Seeded per host, so the table does not depend on
                        // which worker happened to take which host.
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
                                    registrations.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(error) => local_errors.record("register partition", &error),
                            }
                        }
                    }
                    // Its partitions would only fail with "no such host".
                    Err(error) => local_errors.record("register host", &error),
                }
                let done = hosts_done.fetch_add(1, Ordering::Relaxed) + 1;
                // Exactly one worker crosses each 10 % mark.
                if done * 10 / plan.hosts != (done - 1) * 10 / plan.hosts {
                    let seconds = started.elapsed().as_secs_f64();
                    let count = registrations.load(Ordering::Relaxed);
                    eprintln!(
                        "setup: {done}/{} hosts in {seconds:.1} s, {count} registrations, {:.0}/s",
                        plan.hosts,
                        count as f64 / seconds
                    );
                }
            }
            errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .merge(local_errors);
        }));
    }
    for worker in workers {
        worker.await.context("a registration worker panicked")?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let errors = *errors.lock().unwrap_or_else(|p| p.into_inner());
    Ok(SetupOutcome {
        seconds,
        registrations: registrations.load(Ordering::Relaxed),
        errors,
    })
}

struct FindOutcome {
    p50: Option<u64>,
    p99: Option<u64>,
    max: Option<u64>,
    /// Finds that matched nothing (the broker then also explains why).
    empty: u64,
    errors: Errors,
}

/// Times `plan.finds` sequential finds from one client: latency without
/// queueing behind other requests.
async fn measure_finds(client: &Client, plan: &Plan) -> FindOutcome {
    let mut rng = SplitMix64::stream(plan.seed, FIND_STREAM);
    // One untimed call opens the connection, so the maximum measures the
    // broker rather than a TCP handshake.
    let _ = client.find(&Default::default(), Some(1)).await;
    let mut latencies = Latencies::default();
    let (mut empty, mut errors) = (0, Errors::default());
    let started = Instant::now();
    for _ in 0..plan.finds {
        let requirements = workload::random_requirements(&mut rng);
        let call = Instant::now();
        match client.find(&requirements, None).await {
            Ok(answer) => {
                latencies.since(call);
                if answer.offers.is_empty() {
                    empty += 1;
                }
            }
            Err(error) => errors.record("find", &error),
        }
    }
    let outcome = FindOutcome {
        p50: latencies.percentile(50.0),
        p99: latencies.percentile(99.0),
        max: latencies.max(),
        empty,
        errors,
    };
    eprintln!(
        "finds: {} in {:.1} s, p50 {} us, p99 {} us, max {} us, {} empty, {} errors",
        plan.finds,
        started.elapsed().as_secs_f64(),
        show(outcome.p50),
        show(outcome.p99),
        show(outcome.max),
        outcome.empty,
        outcome.errors.total
    );
    outcome
}

/// What one borrower did during a cycle run.
#[derive(Default)]
struct CycleStats {
    /// Cycles started: a find, then lease attempts, then a release.
    cycles: u64,
    leases: u64,
    /// Lease attempts refused with 409 (another borrower got there first).
    conflicts: u64,
    /// Cycles whose find (or every offered partition) left nothing to lease.
    unleased_cycles: u64,
    errors: Errors,
    find: Latencies,
    /// Successful leases only; a refusal is a different, cheaper path.
    lease: Latencies,
    release: Latencies,
}

impl CycleStats {
    fn merge(&mut self, other: CycleStats) {
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

/// Runs find → lease → release cycles with one borrower per token until
/// `plan.seconds` have passed, and reports their combined rate and latencies.
async fn measure_cycles(url: &str, tokens: &[String], plan: &Plan, run_number: u64) -> CycleReport {
    let clients = tokens.len();
    eprintln!("cycles: {clients} client(s) for {} s", plan.seconds);
    let deadline = Instant::now() + Duration::from_secs(plan.seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        // A client of its own per borrower (its own connections), like
        // separate borrower processes would have.
        let client = Client::new(url, Some(token.clone()));
        let stream = CYCLE_STREAM + run_number * 1_000_000 + i as u64;
        let rng = SplitMix64::stream(plan.seed, stream);
        tasks.push(tokio::spawn(cycle_client(client, rng, deadline)));
    }
    let mut total = CycleStats::default();
    for task in tasks {
        match task.await {
            Ok(stats) => total.merge(stats),
            Err(error) => eprintln!("a cycle client panicked: {error}"),
        }
    }
    // The last cycles may end a little after the deadline; divide by the time
    // actually taken so the rate is not inflated.
    let seconds = started.elapsed().as_secs_f64();
    let report = CycleReport {
        clients,
        seconds: round3(seconds),
        cycles: total.cycles,
        cycles_per_second: round1(total.cycles as f64 / seconds),
        leases: total.leases,
        leases_per_second: round1(total.leases as f64 / seconds),
        conflicts: total.conflicts,
        unleased_cycles: total.unleased_cycles,
        errors: total.errors.total,
        errors_5xx: total.errors.server,
        errors_unreachable: total.errors.unreachable,
        find_p50_us: total.find.percentile(50.0),
        find_p99_us: total.find.percentile(99.0),
        lease_p50_us: total.lease.percentile(50.0),
        lease_p99_us: total.lease.percentile(99.0),
        lease_max_us: total.lease.max(),
        release_p50_us: total.release.percentile(50.0),
        release_p99_us: total.release.percentile(99.0),
        release_max_us: total.release.max(),
    };
    eprintln!(
        "cycles: {clients} client(s): {:.1} cycles/s, {:.1} leases/s, {} conflicts, {} errors, \
         lease p50/p99 {}/{} us, release p50/p99 {}/{} us",
        report.cycles_per_second,
        report.leases_per_second,
        report.conflicts,
        report.errors,
        show(report.lease_p50_us),
        show(report.lease_p99_us),
        show(report.release_p50_us),
        show(report.release_p99_us),
    );
    report
}

async fn cycle_client(client: Client, mut rng: SplitMix64, deadline: Instant) -> CycleStats {
    let mut stats = CycleStats::default();
    while Instant::now() < deadline {
        stats.cycles += 1;
        let requirements = workload::random_requirements(&mut rng);
        let call = Instant::now();
        let offers = match client.find(&requirements, Some(CYCLE_FIND_LIMIT)).await {
            Ok(answer) => {
                stats.find.since(call);
                answer.offers
            }
            Err(error) => {
                stats.errors.record("find (cycle)", &error);
                continue;
            }
        };
        let mut leased = false;
        // Try the offers best first; a 409 means another borrower won the
        // race for that partition, which is the contention being measured.
        for offer in offers {
            let request = LeaseRequest {
                partition: Some(offer.partition.to_string()),
                best: None,
                allow_unisolated: false,
            };
            let call = Instant::now();
            match client.lease(&request).await {
                Ok(lease) => {
                    stats.lease.since(call);
                    stats.leases += 1;
                    leased = true;
                    let call = Instant::now();
                    match client.release(lease.lease_id).await {
                        Ok(_) => stats.release.since(call),
                        Err(error) => stats.errors.record("release", &error),
                    }
                    break;
                }
                Err(error) if error.status() == Some(409) => stats.conflicts += 1,
                Err(error) => {
                    stats.errors.record("lease", &error);
                    break;
                }
            }
        }
        if !leased {
            stats.unleased_cycles += 1;
        }
    }
    stats
}
