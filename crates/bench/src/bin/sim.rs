//! `leasehold-sim`: runs the deterministic simulation of the broker over
//! seeds and prints one JSON line (seeds, steps, crashes of each kind,
//! restarts, leases, releases, invariant checks, failures with the first
//! failing seed, elapsed time). Exits non-zero when any seed fails; the
//! failure, with its replay command and the latest trace lines, goes to
//! stderr, and so does progress.

use anyhow::Result;
use clap::Parser;
use leasehold_bench::sim::{run_seed, Counters, PlantedBug, SimConfig};
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Parser)]
#[command(
    name = "leasehold-sim",
    about = "Deterministic simulation of the leasehold broker: seeded lenders and borrowers, injected commit failures and restarts, invariants checked after every step.",
    long_about = "Runs seeds SEED_START..SEED_START+SEEDS (or the one --seed), each against a broker started in this \
                  process on 127.0.0.1 with a simulated clock, and checks after every step that no partition is \
                  leased twice, every acknowledged lease and release survives, every lease is billed once, by the \
                  core's rule, and the ledger sums to zero. Prints one JSON line; exits 1 if any seed failed."
)]
struct Args {
    /// Seeds to run, from --seed-start
    #[arg(long, default_value_t = 8)]
    seeds: u64,

    /// The first seed
    #[arg(long, default_value_t = 0)]
    seed_start: u64,

    /// Run this one seed only (replays a failure)
    #[arg(long, conflicts_with_all = ["seeds", "seed_start"])]
    seed: Option<u64>,

    /// Steps per seed
    #[arg(long, default_value_t = 300)]
    steps: u64,

    /// Print every seed's whole trace to stderr
    #[arg(long)]
    trace: bool,

    /// Run the broker on PostgreSQL: each seed in a database of its own, made
    /// and dropped on the server LEASEHOLD_TEST_POSTGRES_URL names (an admin
    /// URL; from the environment, so no password is on the command line)
    #[arg(long)]
    postgres: bool,

    /// Check the checker: plant this bug in the store (every seed must fail)
    #[arg(long, value_enum)]
    plant_bug: Option<BugArg>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum BugArg {
    /// Every batch loses its first ledger transfer.
    DropTransfer,
    /// Every batch loses the write that marks a lease released.
    DropRelease,
    /// Every release notice is stored with a broken signature.
    GarbleNotice,
}

impl BugArg {
    fn planted(self) -> PlantedBug {
        match self {
            BugArg::DropTransfer => PlantedBug::DropOneTransferWrite,
            BugArg::DropRelease => PlantedBug::DropLeaseReleaseWrite,
            BugArg::GarbleNotice => PlantedBug::GarbleReleaseNotice,
        }
    }
}

#[derive(Debug, Serialize)]
struct Summary {
    database: &'static str,
    seeds: u64,
    seed_start: u64,
    steps_per_seed: u64,
    #[serde(flatten)]
    counters: Counters,
    failures: u64,
    first_failing_seed: Option<u64>,
    elapsed_ms: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let postgres_admin_url = match args.postgres {
        true => Some(std::env::var("LEASEHOLD_TEST_POSTGRES_URL").map_err(|_| {
            anyhow::anyhow!("--postgres needs LEASEHOLD_TEST_POSTGRES_URL (an admin URL of a throw-away server)")
        })?),
        false => None,
    };
    let (seed_start, seeds) = match args.seed {
        Some(seed) => (seed, 1),
        None => (args.seed_start, args.seeds),
    };
    let started = Instant::now();
    let mut counters = Counters::default();
    let mut failures = 0;
    let mut first_failing_seed = None;
    for seed in seed_start..seed_start.saturating_add(seeds) {
        let config = SimConfig {
            keep_full_trace: args.trace,
            planted_bug: args.plant_bug.map(BugArg::planted),
            postgres_admin_url: postgres_admin_url.clone(),
            ..SimConfig::new(seed, args.steps)
        };
        let report = run_seed(&config);
        counters.add(&report.counters);
        if args.trace {
            for line in &report.trace {
                eprintln!("{line}");
            }
        }
        match &report.failure {
            Some(failure) => {
                failures += 1;
                first_failing_seed.get_or_insert(seed);
                eprintln!("{failure}");
            }
            None => eprintln!(
                "seed {seed}: ok, {} steps, trace {}",
                report.counters.steps, report.trace_digest
            ),
        }
    }
    let summary = Summary {
        database: if args.postgres {
            "postgresql"
        } else {
            "sqlite"
        },
        seeds,
        seed_start,
        steps_per_seed: args.steps,
        counters,
        failures,
        first_failing_seed,
        elapsed_ms: started.elapsed().as_millis() as u64,
    };
    println!("{}", serde_json::to_string(&summary)?);
    if failures > 0 {
        std::process::exit(1);
    }
    Ok(())
}
