//! The deterministic simulation of the broker, in the spirit of
//! FoundationDB's simulation and TigerBeetle's VOPR.
//!
//! One seeded generator (`StdRng::seed_from_u64`) drives simulated lenders
//! (hosts, partitions: put, alter, withdraw) and borrowers (find, lease by
//! name or by requirements, release, retry) against a real broker started in
//! this process on 127.0.0.1, through its HTTP API, one step at a time, on a
//! simulated clock advanced by random amounts between steps. At random
//! points the fault injector makes a commit fail before writing or lose its
//! acknowledgement, and the broker is stopped and restarted from its store.
//! An operation answered with an error that does not say whether it
//! happened is resolved afterwards (an idempotent retry, or a read). After
//! every step the invariants are checked against the API and the store
//! (`invariants`). A seed reproduces exactly: its trace (operations and
//! answers) has one digest.

pub mod adapter;
mod agents;
mod borrowers;
pub mod faults;
mod invariants;
mod lenders;
pub mod model;
mod ops;
mod postgres;
pub mod trace;

pub use faults::PlantedBug;

use adapter::SimBroker;
use faults::FaultControl;
use model::Model;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use trace::Trace;

/// Lender and borrower principals of a seed: between these, by the seed.
const LENDERS_RANGE: std::ops::RangeInclusive<usize> = 2..=4;
const BORROWERS_RANGE: std::ops::RangeInclusive<usize> = 2..=6;
/// Where the simulated clock starts: 2026-01-01, so times look real.
const CLOCK_START_MS: u64 = 1_767_225_600_000;

/// One seed's run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub steps: u64,
    /// A deliberate bug, to check the checker.
    pub planted_bug: Option<PlantedBug>,
    /// Keep every trace line (for `--trace`), not only the latest.
    pub keep_full_trace: bool,
    /// Run the broker on PostgreSQL, in a database of the seed's own made
    /// on the server this admin URL names; `None`: SQLite in the seed's
    /// temporary directory.
    pub postgres_admin_url: Option<String>,
}

impl SimConfig {
    /// The flags of `leasehold-sim` that reproduce this configuration
    /// besides the seed and the steps.
    fn replay_flags(&self) -> String {
        let mut flags = String::new();
        if let Some(bug) = self.planted_bug {
            flags.push_str(&format!(" --plant-bug {}", bug.flag_value()));
        }
        if self.postgres_admin_url.is_some() {
            flags.push_str(" --postgres");
        }
        flags
    }

    pub fn new(seed: u64, steps: u64) -> Self {
        SimConfig {
            seed,
            steps,
            planted_bug: None,
            keep_full_trace: false,
            postgres_admin_url: None,
        }
    }
}

/// What happened in a run, summed over seeds by the binary.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Counters {
    pub steps: u64,
    pub crashes_before_commit: u64,
    pub acks_lost: u64,
    pub restarts: u64,
    /// Leases concluded (acknowledged, or found after an unknown answer).
    pub leases: u64,
    pub releases: u64,
    /// Operations answered with a refusal the model expected.
    pub refusals: u64,
    /// Operations whose outcome was unknown and resolved afterwards.
    pub unknown_outcomes: u64,
    pub invariant_checks: u64,
    /// Revocation pulls by simulated agents.
    pub agent_pulls: u64,
    /// Lease keys shown to simulated agents: taken, and refused.
    pub keys_taken: u64,
    pub keys_refused: u64,
}

impl Counters {
    pub fn add(&mut self, other: &Counters) {
        self.steps += other.steps;
        self.crashes_before_commit += other.crashes_before_commit;
        self.acks_lost += other.acks_lost;
        self.restarts += other.restarts;
        self.leases += other.leases;
        self.releases += other.releases;
        self.refusals += other.refusals;
        self.unknown_outcomes += other.unknown_outcomes;
        self.invariant_checks += other.invariant_checks;
        self.agent_pulls += other.agent_pulls;
        self.keys_taken += other.keys_taken;
        self.keys_refused += other.keys_refused;
    }
}

/// An invariant that failed, or an answer the model did not allow.
#[derive(Debug, Clone)]
pub struct Failure {
    pub seed: u64,
    /// The step it failed at (0 is the setup).
    pub step: u64,
    pub message: String,
    /// The latest trace lines (all of them with `keep_full_trace`).
    pub trace_tail: Vec<String>,
    /// What else the replay needs (`--plant-bug ...`, `--postgres`).
    pub replay_flags: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {} failed at step {}: {}",
            self.seed, self.step, self.message
        )?;
        writeln!(
            f,
            "replay: cargo run -p leasehold-bench --bin leasehold-sim -- --seed {} --steps {} --trace{}",
            self.seed, self.step, self.replay_flags
        )?;
        writeln!(f, "trace (latest lines):")?;
        for line in &self.trace_tail {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct SeedReport {
    pub seed: u64,
    pub counters: Counters,
    pub failure: Option<Failure>,
    /// SHA-256 of the whole trace.
    pub trace_digest: String,
    pub trace_lines: usize,
    /// The kept trace lines (all with `keep_full_trace`).
    pub trace: Vec<String>,
}

/// Runs one seed to its end or its first failure, on a runtime of its own
/// (dropped at the end, which also ends the writer threads of the broker
/// incarnations it stopped).
pub fn run_seed(config: &SimConfig) -> SeedReport {
    // Made before the runtime and dropped after it, once the broker's
    // connections are closed.
    let database = match &config.postgres_admin_url {
        None => None,
        Some(admin_url) => match postgres::SeedDatabase::create(admin_url, config.seed) {
            Ok(database) => Some(database),
            Err(message) => return SeedReport::failed_to_start(config, message),
        },
    };
    let database_url = database.as_ref().map(|d| d.url.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let report = runtime.block_on(run_seed_async(config, database_url));
    drop(runtime);
    drop(database);
    report
}

impl SeedReport {
    fn failed_to_start(config: &SimConfig, message: String) -> SeedReport {
        let trace = Trace::new(false);
        SeedReport {
            seed: config.seed,
            counters: Counters::default(),
            failure: Some(Failure {
                seed: config.seed,
                step: 0,
                message,
                trace_tail: Vec::new(),
                replay_flags: config.replay_flags(),
            }),
            trace_digest: trace.digest_hex(),
            trace_lines: 0,
            trace: Vec::new(),
        }
    }
}

async fn run_seed_async(config: &SimConfig, database_url: Option<String>) -> SeedReport {
    let mut trace = Trace::new(config.keep_full_trace);
    let outcome = match Sim::start(config, database_url).await {
        Ok(mut sim) => {
            let result = sim.run(config.steps).await;
            let counters = sim.counters.clone();
            let step = sim.step;
            trace = sim.finish().await;
            (result, counters, step)
        }
        Err(message) => (Err(message), Counters::default(), 0),
    };
    let (result, counters, step) = outcome;
    let failure = result.err().map(|message| Failure {
        seed: config.seed,
        step,
        message,
        trace_tail: trace.kept_lines(),
        replay_flags: config.replay_flags(),
    });
    SeedReport {
        seed: config.seed,
        counters,
        failure,
        trace_digest: trace.digest_hex(),
        trace_lines: trace.line_count(),
        trace: trace.kept_lines(),
    }
}

/// One seed's world: the broker, the model of what it holds, the generator.
pub(crate) struct Sim {
    rng: StdRng,
    broker: SimBroker,
    model: Model,
    /// The hosts' agents: fences, cursors, what they heard.
    agents: agents::SimAgents,
    clock: leasehold_service::SimulatedClock,
    faults: FaultControl,
    trace: Trace,
    counters: Counters,
    /// The current step (0 while setting up).
    step: u64,
    next_idempotency_key: u64,
    /// How many lender and borrower principals this seed has.
    lenders: usize,
    borrowers: usize,
    /// Kept alive for the run: the broker's data directory is inside.
    _work_dir: tempfile::TempDir,
}

impl Sim {
    async fn start(config: &SimConfig, database_url: Option<String>) -> Result<Sim, String> {
        let mut rng = StdRng::seed_from_u64(config.seed);
        let work_dir = tempfile::tempdir().map_err(|e| format!("no temporary directory: {e}"))?;
        let clock = leasehold_service::SimulatedClock::starting_at(CLOCK_START_MS);
        let faults = FaultControl::new(config.planted_bug);
        // Several commissions, so that both legs of a bill and the lender's
        // rounding are exercised.
        let commission_basis_points = [0, 100, 2_500][rng.gen_range(0..3)];
        let lenders = rng.gen_range(LENDERS_RANGE);
        let borrowers = rng.gen_range(BORROWERS_RANGE);
        // A subdirectory the broker makes itself, 0700.
        let broker = SimBroker::start(
            work_dir.path().join("broker"),
            database_url,
            clock.clone(),
            faults.clone(),
            commission_basis_points,
            lenders,
            borrowers,
        )
        .await?;
        let mut trace = Trace::new(config.keep_full_trace);
        trace.record(format!(
            "seed {} commission_bp {commission_basis_points} lenders {lenders} borrowers {borrowers}",
            config.seed
        ));
        Ok(Sim {
            rng,
            broker,
            model: Model::new(commission_basis_points),
            agents: agents::SimAgents::default(),
            clock,
            faults,
            trace,
            counters: Counters::default(),
            step: 0,
            next_idempotency_key: 0,
            lenders,
            borrowers,
            _work_dir: work_dir,
        })
    }

    async fn run(&mut self, steps: u64) -> Result<(), String> {
        self.set_up().await?;
        self.check_invariants().await?;
        for step in 1..=steps {
            self.step = step;
            self.run_step().await?;
            self.counters.steps += 1;
            self.check_invariants().await?;
        }
        Ok(())
    }

    async fn finish(self) -> Trace {
        self.broker.stop().await;
        self.trace
    }

    fn now_ms(&self) -> u64 {
        use leasehold_service::Clock;
        self.clock.now_ms()
    }

    fn record(&mut self, line: String) {
        self.trace.record(format!("#{} {line}", self.step));
    }

    /// Moves the simulated clock: mostly seconds, sometimes minutes,
    /// sometimes not at all or by less than a second (billing rounds up to
    /// started seconds).
    fn advance_clock(&mut self) {
        let by_ms = match self.rng.gen_range(0..10) {
            0 => 0,
            1..=2 => self.rng.gen_range(1..1_000),
            3..=7 => self.rng.gen_range(1_000..30_000),
            _ => self.rng.gen_range(30_000..600_000),
        };
        let now = self.clock.advance_ms(by_ms);
        self.record(format!("clock +{by_ms} ms = {now}"));
    }

    /// Stops the broker and starts it again from its store: a crash between
    /// steps. Everything acknowledged must be there afterwards
    /// (`check_snapshot`, unless an outcome is still unknown to the model).
    async fn restart(&mut self, check_snapshot: bool) -> Result<(), String> {
        self.counters.restarts += 1;
        self.record("restart".into());
        self.broker.restart().await?;
        if check_snapshot {
            self.check_store_snapshot()?;
            self.check_borrower_bills().await?;
            self.check_release_notices().await?;
        }
        Ok(())
    }

    fn new_idempotency_key(&mut self) -> String {
        self.next_idempotency_key += 1;
        format!("sim-{}", self.next_idempotency_key)
    }
}
