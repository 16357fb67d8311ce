//! `leasehold-bench`: a load benchmark of the broker, end to end over HTTP.
//!
//! The broker is the real `leasehold broker` process on 127.0.0.1 with a
//! throw-away data directory (SQLite, or PostgreSQL in a throw-away
//! cluster). The benchmark fills it with hosts and partitions (over HTTP, or
//! straight into the database for big markets), restarts it to time its
//! start-up, times finds without load, then runs borrowers in a separate
//! process (this binary re-executed with `--borrowers-only`) on both lease
//! paths (find then lease a chosen partition, and lease by requirements),
//! each followed by a release, while a finder in this process times finds
//! under that load. Progress goes to stderr; the result is one JSON line on
//! stdout, so runs can be collected and compared.

mod bench;
mod stats;
mod workload;

use anyhow::{bail, Context, Result};
use bench::borrowers::{
    self, BorrowersConfig, BorrowersReport, FinderPace, FinderReport, LeasePath,
};
use bench::broker_process::{leasehold_binary, BrokerLaunch, BrokerProcess};
use bench::{costs, fill, postgres::ThrowawayPostgres, procfs, seed};
use clap::{Parser, ValueEnum};
use leasehold_api::{Client, Role};
use leasehold_store::BrokerDatabase;
use serde::Serialize;
use stats::{dir_size_mib, round1};
use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Stream numbers that keep the finders' generators apart from the rest.
const IDLE_FIND_STREAM: u64 = 1 << 40;
const LOAD_FIND_STREAM: u64 = 3 << 40;
/// Above this many partitions `--fill auto` seeds the database directly.
const AUTO_DIRECT_FILL_ABOVE_PARTITIONS: u64 = 200_000;

#[derive(Debug, Parser)]
#[command(
    name = "leasehold-bench",
    about = "Benchmark the real leasehold broker over HTTP: fill, start-up, find latency, and lease/release throughput on both lease paths, with borrowers in a separate process.",
    long_about = "Starts `leasehold broker` (next to this binary, or --leasehold) on 127.0.0.1 with a temporary \
                  data directory (SQLite, or a throw-away PostgreSQL with --database postgres), fills it, \
                  restarts it to time start-up, times finds, then for each lease path and each borrower count \
                  runs the borrowers in a separate process while timing finds and the broker's CPU and RSS. \
                  Progress goes to stderr; exactly one JSON line with all results goes to stdout."
)]
struct Args {
    /// Hosts to register [default: 10000, or 200 with --quick]
    #[arg(long)]
    hosts: Option<usize>,

    /// Partitions registered on each host, indexes 1..=N [default: 10, or 5 with --quick]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=workload::MAX_PARTITIONS_PER_HOST as i64))]
    partitions_per_host: Option<u32>,

    /// Partitions in all, spread evenly over --hosts (instead of
    /// --partitions-per-host); e.g. --hosts 100000 --partitions 1000000
    #[arg(long, conflicts_with = "partitions_per_host")]
    partitions: Option<u64>,

    /// Sequential finds timed without load [default: 2000, or 200 with --quick]
    #[arg(long)]
    finds: Option<usize>,

    /// Seconds each load run lasts [default: 10, or 2 with --quick]
    #[arg(long)]
    seconds: Option<f64>,

    /// Concurrent borrowers of each load run, comma separated; one run per
    /// entry and lease path, each borrower its own principal
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    clients: Vec<usize>,

    /// Lease paths to measure, comma separated
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "find-then-lease,best"
    )]
    paths: Vec<LeasePath>,

    /// Small smoke run: 200 hosts x 5 partitions, 200 finds, 2-second runs
    /// (explicit --hosts, --partitions-per-host, --finds, --seconds still win)
    #[arg(long)]
    quick: bool,

    /// How the broker commits: `full` fsyncs every group commit (production),
    /// `normal` survives a process crash but not a power cut
    #[arg(long, value_enum, default_value_t = DurabilityArg::Full)]
    durability: DurabilityArg,

    /// The broker's database: SQLite in its data directory, or PostgreSQL
    /// (a throw-away cluster started here unless --database-url-file)
    #[arg(long, value_enum, default_value_t = DatabaseArg::Sqlite)]
    database: DatabaseArg,

    /// A file holding the URL of an existing PostgreSQL database to use
    /// (it is filled; use an empty database); implies --database postgres
    #[arg(long)]
    database_url_file: Option<PathBuf>,

    /// How the market is filled: over HTTP as agents would, or straight
    /// into the database before the broker starts (auto: direct above
    /// 200,000 partitions)
    #[arg(long, value_enum, default_value_t = FillArg::Auto)]
    fill: FillArg,

    /// The `leasehold` binary [default: the one next to this benchmark]
    #[arg(long)]
    leasehold: Option<PathBuf>,

    /// Worker threads of the borrowers' process
    #[arg(long, default_value_t = 2)]
    borrower_threads: usize,

    /// Microseconds between the starts of two finds of the finder that
    /// times finds during a load run (it browses; it is not more load)
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    finder_interval_us: u64,

    /// Seed of the workload generator; the same seed gives the same terms and
    /// the same requirements
    #[arg(long, default_value_t = 1)]
    seed: u64,

    /// Lender principals the hosts are spread over (host i belongs to lender i mod N)
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    lenders: u64,

    /// Registration requests in flight at once during an HTTP fill
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    registration_concurrency: u64,

    /// Directory in which the temporary data directories are created
    /// (removed at exit); pick the disk whose fsync you want to measure
    /// [default: the system temporary directory]
    #[arg(long)]
    work_dir: Option<PathBuf>,

    /// Internal: run as the borrowers' process (configured by the parent
    /// through the environment)
    #[arg(long, hide = true)]
    borrowers_only: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DurabilityArg {
    Full,
    Normal,
}

impl DurabilityArg {
    fn name(self) -> &'static str {
        match self {
            DurabilityArg::Full => "full",
            DurabilityArg::Normal => "normal",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DatabaseArg {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FillArg {
    Auto,
    Http,
    Direct,
}

/// The parameters after applying --quick and the defaults.
#[derive(Debug, Clone)]
struct Plan {
    hosts: usize,
    partitions_per_host: u32,
    finds: usize,
    seconds: f64,
    clients: Vec<usize>,
    paths: Vec<LeasePath>,
    durability: DurabilityArg,
    postgres: bool,
    direct_fill: bool,
    borrower_threads: usize,
    finder_interval_us: u64,
    /// The throw-away PostgreSQL's postmaster, whose CPU each run reports.
    database_pid: Option<u32>,
    seed: u64,
    lenders: u64,
    registration_concurrency: u64,
}

impl Plan {
    fn from_args(args: &Args) -> Result<Plan> {
        let quick = args.quick;
        let hosts = args.hosts.unwrap_or(if quick { 200 } else { 10_000 });
        if hosts == 0 {
            bail!("--hosts must be at least 1");
        }
        let partitions_per_host = match args.partitions {
            Some(total) => per_host(total, hosts)?,
            None => args
                .partitions_per_host
                .unwrap_or(if quick { 5 } else { 10 }),
        };
        if args.clients.is_empty() || args.clients.contains(&0) {
            bail!("--clients must list positive numbers, e.g. 1,8,32");
        }
        if args.paths.is_empty() {
            bail!("--paths must name at least one lease path");
        }
        let partitions = hosts as u64 * u64::from(partitions_per_host);
        Ok(Plan {
            hosts,
            partitions_per_host,
            finds: args.finds.unwrap_or(if quick { 200 } else { 2000 }),
            seconds: args.seconds.unwrap_or(if quick { 2.0 } else { 10.0 }),
            clients: args.clients.clone(),
            paths: args.paths.clone(),
            durability: args.durability,
            postgres: args.database == DatabaseArg::Postgres || args.database_url_file.is_some(),
            direct_fill: match args.fill {
                FillArg::Auto => partitions > AUTO_DIRECT_FILL_ABOVE_PARTITIONS,
                FillArg::Http => false,
                FillArg::Direct => true,
            },
            borrower_threads: args.borrower_threads.max(1),
            finder_interval_us: args.finder_interval_us,
            database_pid: None,
            seed: args.seed,
            lenders: args.lenders,
            registration_concurrency: args.registration_concurrency,
        })
    }

    fn partitions(&self) -> u64 {
        self.hosts as u64 * u64::from(self.partitions_per_host)
    }
}

/// Partitions per host for `total` partitions over `hosts` hosts.
fn per_host(total: u64, hosts: usize) -> Result<u32> {
    let hosts = hosts as u64;
    let per_host = total / hosts;
    if per_host == 0 || per_host * hosts != total {
        bail!("--partitions {total} must be a positive multiple of --hosts {hosts}");
    }
    if per_host > u64::from(workload::MAX_PARTITIONS_PER_HOST) {
        bail!(
            "--partitions {total} over {hosts} hosts is {per_host} per host; at most {} fit a host: raise --hosts",
            workload::MAX_PARTITIONS_PER_HOST
        );
    }
    Ok(per_host as u32)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.borrowers_only {
        return borrowers::run_borrowers_process();
    }
    let plan = Plan::from_args(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    // On Ctrl-C or SIGTERM the run is dropped, which stops the broker,
    // stops the throw-away PostgreSQL and removes the temporary directories
    // (a daemonised cluster would otherwise outlive the benchmark).
    let report = runtime.block_on(async {
        tokio::select! {
            report = run(plan, &args) => report,
            () = leasehold_service::shutdown_signal() => bail!("interrupted; no report"),
        }
    })?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Where the broker keeps its state, and the throw-away cluster if any
/// (stopped when dropped, after the broker).
struct Storage {
    launch: BrokerLaunch,
    database: BrokerDatabase,
    postgres: Option<ThrowawayPostgres>,
}

fn prepare_storage(plan: &Plan, args: &Args, work_dir: &Path) -> Result<Storage> {
    let data_dir = work_dir.join("broker");
    let (database_url, postgres) = if let Some(file) = &args.database_url_file {
        let url = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        (Some(url.trim().to_string()), None)
    } else if plan.postgres {
        eprintln!("starting a throw-away PostgreSQL cluster");
        let cluster = ThrowawayPostgres::start(args.work_dir.as_deref())?;
        (Some(cluster.url.clone()), Some(cluster))
    } else {
        (None, None)
    };
    let database = match &database_url {
        Some(url) => BrokerDatabase::Postgres(url.clone()),
        None => BrokerDatabase::Sqlite(data_dir.join("broker.db")),
    };
    Ok(Storage {
        launch: BrokerLaunch {
            binary: leasehold_binary(args.leasehold.as_deref())?,
            data_dir,
            database_url,
            durability: plan.durability.name(),
        },
        database,
        postgres,
    })
}

/// How the market was filled.
#[derive(Debug, Serialize)]
struct FillReport {
    /// `http` (registration requests, as agents send) or `direct` (rows
    /// written through `leasehold_store` before the broker started).
    mode: &'static str,
    seconds: f64,
    /// Successful registrations (http) or rows written (direct).
    count: u64,
    per_second: f64,
    errors: u64,
}

/// Fills the market and returns the running broker and the admin's token.
async fn fill_market(
    plan: &Plan,
    storage: &Storage,
) -> Result<(BrokerProcess, String, FillReport)> {
    if plan.direct_fill {
        let admin_token = leasehold_broker::new_token();
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&storage.launch.data_dir)?;
        let seed_plan = seed::SeedPlan {
            hosts: plan.hosts,
            partitions_per_host: plan.partitions_per_host,
            lenders: plan.lenders,
            seed: plan.seed,
            admin_token: admin_token.clone(),
        };
        let database = storage.database.clone();
        let outcome =
            tokio::task::spawn_blocking(move || seed::seed_database(&database, &seed_plan))
                .await??;
        make_database_files_private(&storage.launch.data_dir)?;
        let broker = storage.launch.start().await?;
        let report = FillReport {
            mode: "direct",
            seconds: round3(outcome.seconds),
            count: outcome.rows,
            per_second: borrowers::rate(outcome.rows, outcome.seconds),
            errors: 0,
        };
        return Ok((broker, admin_token, report));
    }
    let broker = storage.launch.start().await?;
    let admin_token = broker
        .admin_token
        .clone()
        .context("the broker did not bootstrap an admin: its database was not empty")?;
    let admin = Client::new(&broker.url, Some(admin_token.clone()));
    let outcome = fill::register_all(
        &admin,
        fill::FillPlan {
            hosts: plan.hosts,
            partitions_per_host: plan.partitions_per_host,
            lenders: plan.lenders,
            seed: plan.seed,
            concurrency: plan.registration_concurrency,
        },
    )
    .await?;
    let report = FillReport {
        mode: "http",
        seconds: round3(outcome.seconds),
        count: outcome.registrations,
        per_second: borrowers::rate(outcome.registrations, outcome.seconds),
        errors: outcome.errors.total,
    };
    Ok((broker, admin_token, report))
}

/// The broker refuses a database file open to group or others; rusqlite
/// made them with the benchmark's umask.
fn make_database_files_private(data_dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(data_dir)? {
        let path = entry?.path();
        if path.is_file() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

/// The broker restarted on the filled database.
#[derive(Debug, Serialize)]
struct StartupReport {
    /// From spawning `leasehold broker` to its ready line: the snapshot is
    /// loaded and the free index built.
    ready_ms: f64,
    /// From spawning it to its first answer to `GET /v1/health`.
    health_ms: f64,
    rss_mib: Option<f64>,
}

async fn restart_broker(
    broker: BrokerProcess,
    launch: &BrokerLaunch,
) -> Result<(BrokerProcess, StartupReport)> {
    broker.stop().await?;
    let started = Instant::now();
    let broker = launch.start().await?;
    Client::new(&broker.url, None)
        .health()
        .await
        .context("the restarted broker does not answer health")?;
    let report = StartupReport {
        ready_ms: round1(broker.ready_ms),
        health_ms: round1(started.elapsed().as_secs_f64() * 1000.0),
        rss_mib: procfs::status_mib(&broker.pid().to_string(), "VmRSS"),
    };
    eprintln!(
        "restart: ready in {} ms, answering health in {} ms, RSS {:?} MiB",
        report.ready_ms, report.health_ms, report.rss_mib
    );
    Ok((broker, report))
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// The one JSON line on stdout. A struct rather than `json!` so the fields
/// come out in this order (parameters first). Latencies in microseconds,
/// `null` when nothing was measured; memory in MiB.
#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    /// Where the broker ran: `process` (the real `leasehold broker`).
    broker: &'static str,
    /// Where the borrowers ran: `process` (a separate one per load run).
    borrowers: &'static str,
    database: &'static str,
    durability: &'static str,
    hosts: usize,
    partitions_per_host: u32,
    partitions: u64,
    seed: u64,
    lenders: u64,
    fill: FillReport,
    startup: StartupReport,
    /// Sequential finds from one client, nothing else running.
    idle_finds: FinderReport,
    runs: Vec<RunReport>,
    broker_rss_mib_end: Option<f64>,
    broker_peak_rss_mib: Option<f64>,
    /// The broker's SQLite files at the end (null on PostgreSQL).
    db_mib: Option<f64>,
    /// Single steps timed in the benchmark with the broker's own code.
    step_costs: costs::StepCosts,
}

/// The run's temporary directory, removed when dropped (also on Ctrl-C).
fn make_work_dir(args: &Args) -> Result<tempfile::TempDir> {
    match &args.work_dir {
        Some(dir) => tempfile::Builder::new()
            .prefix("leasehold-bench-")
            .tempdir_in(dir),
        None => tempfile::Builder::new()
            .prefix("leasehold-bench-")
            .tempdir(),
    }
    .context("cannot create the temporary directory")
}

/// A borrower that only finds, and its finds timed with no load.
async fn idle_finds(admin: &Client, plan: &Plan) -> Result<(Client, FinderReport)> {
    let finder_client = admin.with_token(Some(
        admin
            .create_principal("bench-finder", Role::Borrower)
            .await?
            .token,
    ));
    let idle_finds = borrowers::finder(
        finder_client.clone(),
        plan.seed,
        IDLE_FIND_STREAM,
        Arc::new(AtomicBool::new(false)),
        FinderPace {
            max_finds: plan.finds,
            interval: None,
        },
    )
    .await;
    eprintln!(
        "idle finds: {}, p50 {:?} us, p99 {:?} us",
        idle_finds.finds, idle_finds.find_p50_us, idle_finds.find_p99_us
    );
    Ok((finder_client, idle_finds))
}

/// One load run per lease path and borrower count, in that order.
async fn run_loads(
    plan: &Plan,
    broker: &BrokerProcess,
    finder_client: &Client,
    tokens: &[String],
    work_dir: &Path,
) -> Result<Vec<RunReport>> {
    let mut runs = Vec::new();
    for &path in &plan.paths {
        for &clients in &plan.clients {
            let load = Load {
                path,
                clients,
                run_number: runs.len() as u64,
            };
            runs.push(
                run_load(
                    plan,
                    broker,
                    finder_client,
                    &tokens[..clients],
                    work_dir,
                    load,
                )
                .await?,
            );
        }
    }
    Ok(runs)
}

async fn run(plan: Plan, args: &Args) -> Result<Report> {
    // Ctrl-C: the temporary directories and the cluster must still go.
    let work_dir = make_work_dir(args)?;
    let storage = prepare_storage(&plan, args, work_dir.path())?;
    let plan = Plan {
        database_pid: storage.postgres.as_ref().and_then(|p| p.postmaster_pid()),
        ..plan
    };
    eprintln!(
        "{} hosts x {} partitions on {} ({} durability), data in {}",
        plan.hosts,
        plan.partitions_per_host,
        if plan.postgres {
            "postgresql"
        } else {
            "sqlite"
        },
        plan.durability.name(),
        work_dir.path().display()
    );
    let (broker, admin_token, fill) = fill_market(&plan, &storage).await?;
    eprintln!(
        "fill ({}): {} in {:.1} s, {} errors",
        fill.mode, fill.count, fill.seconds, fill.errors
    );
    let (broker, startup) = restart_broker(broker, &storage.launch).await?;
    let admin = Client::new(&broker.url, Some(admin_token));
    let (finder_client, idle_finds) = idle_finds(&admin, &plan).await?;
    let tokens = create_borrowers(&admin, &plan).await?;
    let runs = run_loads(&plan, &broker, &finder_client, &tokens, work_dir.path()).await?;
    let pid = broker.pid().to_string();
    let report = Report {
        bench: "broker",
        broker: "process",
        borrowers: "process",
        database: if plan.postgres {
            "postgresql"
        } else {
            "sqlite"
        },
        durability: plan.durability.name(),
        hosts: plan.hosts,
        partitions_per_host: plan.partitions_per_host,
        partitions: plan.partitions(),
        seed: plan.seed,
        lenders: plan.lenders,
        fill,
        startup,
        idle_finds,
        runs,
        broker_rss_mib_end: procfs::status_mib(&pid, "VmRSS"),
        broker_peak_rss_mib: procfs::status_mib(&pid, "VmHWM"),
        db_mib: if plan.postgres {
            None
        } else {
            dir_size_mib(&storage.launch.data_dir)
        },
        step_costs: costs::measure_step_costs(),
    };
    broker.stop().await?;
    drop(storage);
    Ok(report)
}

/// One borrower principal per borrower of the largest run.
async fn create_borrowers(admin: &Client, plan: &Plan) -> Result<Vec<String>> {
    let most = plan.clients.iter().copied().max().unwrap_or(1);
    let mut tokens = Vec::with_capacity(most);
    for i in 0..most {
        let created = admin
            .create_principal(&format!("bench-borrower-{i}"), Role::Borrower)
            .await
            .context("cannot create a borrower")?;
        tokens.push(created.token);
    }
    Ok(tokens)
}

/// One load run: this many borrowers on this path.
#[derive(Debug, Clone, Copy)]
struct Load {
    path: LeasePath,
    clients: usize,
    run_number: u64,
}

/// One load run's figures: the borrowers' (from their process), the
/// finder's (from this one, during the load) and the broker's (from /proc).
#[derive(Debug, Serialize)]
struct RunReport {
    path: &'static str,
    clients: usize,
    /// From spawning the borrowers' process to its exit.
    wall_seconds: f64,
    leases_per_second: f64,
    cycles_per_second: f64,
    #[serde(flatten)]
    borrowers: BorrowersReport,
    /// Finds from a separate client in this process while the load ran.
    finds_under_load: FinderReport,
    /// The broker's CPU (by thread) and the machine's, over the run.
    #[serde(flatten)]
    broker: procfs::Usage,
    /// Broker CPU per lease (its lease, its release, and a share of the
    /// finder's finds), by thread name: what a lease costs the broker,
    /// whatever else the machine was doing.
    broker_cpu_us_per_lease: BTreeMap<String, f64>,
    borrowers_cpu_percent: Option<f64>,
    broker_rss_mib: Option<f64>,
}

async fn run_load(
    plan: &Plan,
    broker: &BrokerProcess,
    finder_client: &Client,
    tokens: &[String],
    work_dir: &Path,
    load: Load,
) -> Result<RunReport> {
    eprintln!(
        "load: {} with {} borrower(s) for {} s",
        load.path.name(),
        load.clients,
        plan.seconds
    );
    let tokens_file = work_dir.join(format!("borrowers-{}.tokens", load.run_number));
    write_private(&tokens_file, &(tokens.join("\n") + "\n"))?;
    let config = BorrowersConfig {
        url: broker.url.clone(),
        tokens_file,
        path: load.path,
        seconds: plan.seconds,
        seed: plan.seed,
        run_number: load.run_number,
        threads: plan.borrower_threads,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let finder = tokio::spawn(borrowers::finder(
        finder_client.clone(),
        plan.seed,
        LOAD_FIND_STREAM + load.run_number,
        stop.clone(),
        FinderPace {
            max_finds: usize::MAX,
            interval: Some(Duration::from_micros(plan.finder_interval_us)),
        },
    ));
    let before = procfs::BrokerSample::take(broker.pid(), plan.database_pid);
    let output = tokio::process::Command::new(std::env::current_exe()?)
        .arg("--borrowers-only")
        .env(borrowers::CONFIG_ENV, serde_json::to_string(&config)?)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .output()
        .await
        .context("cannot run the borrowers' process")?;
    let usage = procfs::BrokerSample::take(broker.pid(), plan.database_pid).usage_since(&before);
    stop.store(true, Ordering::Relaxed);
    let finds_under_load = finder.await.context("the finder panicked")?;
    let _ = std::fs::remove_file(&config.tokens_file);
    if !output.status.success() {
        bail!("the borrowers' process failed: {}", output.status);
    }
    let borrowers: BorrowersReport = serde_json::from_slice(&output.stdout)
        .context("the borrowers' process printed no report")?;
    let report = run_report(load, broker, usage, finds_under_load, borrowers);
    print_run(&report);
    Ok(report)
}

/// One load run's figures: the borrowers' own, the broker's CPU per lease
/// by thread, and the finds timed meanwhile.
fn run_report(
    load: Load,
    broker: &BrokerProcess,
    usage: procfs::Usage,
    finds_under_load: FinderReport,
    borrowers: BorrowersReport,
) -> RunReport {
    RunReport {
        path: load.path.name(),
        clients: load.clients,
        wall_seconds: round3(usage.seconds),
        leases_per_second: borrowers::rate(borrowers.leases, borrowers.seconds),
        cycles_per_second: borrowers::rate(borrowers.cycles, borrowers.seconds),
        broker_cpu_us_per_lease: usage
            .broker_thread_cpu_percent
            .iter()
            .map(|(name, percent)| {
                let micros = percent / 100.0 * usage.seconds * 1e6;
                (
                    name.clone(),
                    round1(micros / borrowers.leases.max(1) as f64),
                )
            })
            .collect(),
        borrowers_cpu_percent: borrowers
            .cpu_seconds
            .map(|c| round1(100.0 * c / usage.seconds)),
        broker_rss_mib: procfs::status_mib(&broker.pid().to_string(), "VmRSS"),
        finds_under_load,
        broker: usage,
        borrowers,
    }
}

fn print_run(run: &RunReport) {
    eprintln!(
        "load: {} x{}: {} leases/s, {} conflicts, {} errors, lease p50/p99 {:?}/{:?} us, release p99 {:?} us, \
         find under load p50/p99 {:?}/{:?} us, broker CPU {:?}%, machine busy {}% iowait {}%",
        run.path,
        run.clients,
        run.leases_per_second,
        run.borrowers.conflicts,
        run.borrowers.errors,
        run.borrowers.lease_p50_us,
        run.borrowers.lease_p99_us,
        run.borrowers.release_p99_us,
        run.finds_under_load.find_p50_us,
        run.finds_under_load.find_p99_us,
        run.broker.broker_cpu_percent,
        run.broker.machine_busy_percent,
        run.broker.machine_iowait_percent,
    );
}

/// A file only this user can read (tokens).
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_spread_evenly_over_hosts_or_are_refused() {
        assert_eq!(per_host(1_000_000, 100_000).unwrap(), 10);
        assert_eq!(per_host(100_000, 10_000).unwrap(), 10);
        // Not a multiple of the hosts, none at all, or more than fit a host.
        assert!(per_host(1_000_001, 100_000).is_err());
        assert!(per_host(0, 10).is_err());
        assert!(per_host(1_000_000, 10_000).is_err());
    }

    #[test]
    fn big_markets_are_seeded_directly_and_small_ones_over_http() {
        let plan = |extra: &[&str]| {
            let mut argv = vec!["leasehold-bench"];
            argv.extend_from_slice(extra);
            Plan::from_args(&Args::parse_from(argv)).unwrap()
        };
        assert!(!plan(&[]).direct_fill);
        assert!(plan(&["--hosts", "100000", "--partitions", "1000000"]).direct_fill);
        assert!(
            !plan(&[
                "--hosts",
                "100000",
                "--partitions",
                "1000000",
                "--fill",
                "http"
            ])
            .direct_fill
        );
        assert!(plan(&["--quick", "--fill", "direct"]).direct_fill);
        assert!(plan(&["--database", "postgres"]).postgres);
        let quick = plan(&["--quick"]);
        assert_eq!((quick.hosts, quick.partitions_per_host), (200, 5));
        assert!(Plan::from_args(&Args::parse_from(["b", "--clients", "0"])).is_err());
    }
}
