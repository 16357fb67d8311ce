//! The deterministic simulation in CI: a bounded number of seeds, the
//! replay of a seed to the same trace, and a planted bug that the
//! invariant checks must catch, reproducibly. More seeds:
//! `cargo run -p leasehold-bench --bin leasehold-sim -- --seeds N`.

use leasehold_bench::sim::{run_seed, Counters, PlantedBug, SeedReport, SimConfig};

/// Seeds and steps run in CI (about 25 s in debug on a 2-core machine).
const CI_SEEDS: u64 = 8;
const CI_STEPS: u64 = 300;

fn run(seed: u64, steps: u64, planted_bug: Option<PlantedBug>) -> SeedReport {
    run_seed(&SimConfig {
        planted_bug,
        ..SimConfig::new(seed, steps)
    })
}

#[test]
fn every_invariant_holds_for_the_ci_seeds() {
    let mut total = Counters::default();
    for seed in 0..CI_SEEDS {
        let report = run(seed, CI_STEPS, None);
        if let Some(failure) = &report.failure {
            panic!("{failure}");
        }
        assert_eq!(report.counters.steps, CI_STEPS, "seed {seed}");
        total.add(&report.counters);
    }
    // The seeds must really exercise what the invariants are about.
    assert!(total.crashes_before_commit > 0, "{total:?}");
    assert!(total.acks_lost > 0, "{total:?}");
    assert!(total.restarts > 0, "{total:?}");
    assert!(total.unknown_outcomes > 0, "{total:?}");
    assert!(total.leases > 50 && total.releases > 50, "{total:?}");
    // Agents pulled, took live keys and refused released ones.
    assert!(total.agent_pulls > 50, "{total:?}");
    assert!(total.keys_taken > 20 && total.keys_refused > 5, "{total:?}");
    assert_eq!(total.invariant_checks, CI_SEEDS * (CI_STEPS + 1));
}

#[test]
fn a_seed_replays_to_the_same_trace() {
    let first = run(5, 120, None);
    let second = run(5, 120, None);
    assert!(first.failure.is_none(), "{:?}", first.failure);
    assert_eq!(first.trace_digest, second.trace_digest);
    assert_eq!(first.trace_lines, second.trace_lines);
    assert_eq!(first.counters, second.counters);
    let other_seed = run(6, 120, None);
    assert_ne!(first.trace_digest, other_seed.trace_digest);
}

/// Runs a planted bug twice: it must be caught, at the same step with the
/// same message and trace both times.
fn assert_caught_reproducibly(bug: PlantedBug, expected_words: &str) {
    let first = run(1, CI_STEPS, Some(bug));
    let failure = first
        .failure
        .as_ref()
        .unwrap_or_else(|| panic!("{bug:?} went unnoticed for {CI_STEPS} steps"));
    assert!(
        failure.message.contains(expected_words),
        "{bug:?} was caught as: {failure}"
    );
    let second = run(1, CI_STEPS, Some(bug));
    let again = second.failure.as_ref().expect("caught the second time");
    assert_eq!(
        (failure.step, &failure.message),
        (again.step, &again.message)
    );
    assert_eq!(first.trace_digest, second.trace_digest);
}

#[test]
fn a_dropped_ledger_write_is_caught() {
    assert_caught_reproducibly(PlantedBug::DropOneTransferWrite, "is billed");
}

#[test]
fn a_dropped_release_write_is_caught() {
    assert_caught_reproducibly(
        PlantedBug::DropLeaseReleaseWrite,
        "is active but its partition",
    );
}

#[test]
fn a_release_notice_that_does_not_verify_is_caught_by_the_agents() {
    assert_caught_reproducibly(
        PlantedBug::GarbleReleaseNotice,
        "does not verify against the broker's keys",
    );
}

/// The same simulation with the broker on PostgreSQL (CI's throw-away
/// cluster): commits, lost acknowledgements and restarts through the other
/// adapter of the storage interface, answered exactly as on SQLite (the
/// same trace).
#[test]
fn every_invariant_holds_on_postgres_with_the_same_trace_as_on_sqlite() {
    let Ok(admin_url) = std::env::var("LEASEHOLD_TEST_POSTGRES_URL") else {
        eprintln!("skipped: set LEASEHOLD_TEST_POSTGRES_URL (CI starts a throw-away cluster)");
        return;
    };
    for seed in 0..2 {
        let report = run_seed(&SimConfig {
            postgres_admin_url: Some(admin_url.clone()),
            ..SimConfig::new(seed, 150)
        });
        if let Some(failure) = &report.failure {
            panic!("on PostgreSQL: {failure}");
        }
        assert!(report.counters.leases > 0, "{:?}", report.counters);
        assert!(report.counters.restarts > 0, "{:?}", report.counters);
        let on_sqlite = run(seed, 150, None);
        assert_eq!(report.trace_digest, on_sqlite.trace_digest, "seed {seed}");
    }
}
