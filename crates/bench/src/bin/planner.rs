//! The planner benchmark of issue 9 (`leasehold-bench-planner`), purely
//! through core on a simulated clock, one JSON line:
//!
//! - `placement`: instances with priorities and spread/pack rules placed onto
//!   hosts whose capacity is all free (so mostly at once): the wall time of
//!   the rounds until every instance is guaranteed, their number and the
//!   peak RSS (goal: 100,000 instances on 10,000 hosts under 10 s);
//! - `fleet_day`: a day of a fleet whose owners' load rises and falls, with
//!   workloads arriving all day, many of them ramping: the wall time of the
//!   rounds (one a minute: 1,440) and the peak RSS.
//!
//! Workloads and traces come from one seeded generator, so two runs plan the
//! same; `--instances`, `--hosts`, `--fleet-hosts` and `--rounds` scale it
//! down for a smoke test.

use anyhow::{bail, Result};
use clap::Parser;
use leasehold_core::reservation::planner::PlanPolicy;
use leasehold_core::reservation::simulation::{SimulatedHost, Simulation};
use leasehold_core::reservation::{
    Capacity, InstanceSpec, PlacementRule, PoolPhase, ReservationChange, RuleKind, Workload,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::time::Instant;

#[derive(Parser)]
#[command(
    about = "The reservation planner: mass placement and a simulated fleet day (one JSON line)"
)]
struct Args {
    /// Instances to place in the placement run.
    #[arg(long, default_value_t = 100_000)]
    instances: usize,
    /// Hosts of the placement run.
    #[arg(long, default_value_t = 10_000)]
    hosts: usize,
    /// Hosts of the fleet day.
    #[arg(long, default_value_t = 1_000)]
    fleet_hosts: usize,
    /// Rounds of the fleet day (one per simulated minute).
    #[arg(long, default_value_t = 1_440)]
    rounds: u64,
    /// Most rounds the placement run may take before it gives up.
    #[arg(long, default_value_t = 50)]
    placement_rounds: u64,
    #[arg(long, default_value_t = 9)]
    seed: u64,
    /// Also print a SHA-256 of every change each run decided (kept until
    /// the end, so it costs memory): two planners that decide the same print
    /// the same digests.
    #[arg(long)]
    digest: bool,
}

/// A digest of decisions, when `--digest` asked for one.
struct Decisions {
    hasher: Option<sha2::Sha256>,
}

impl Decisions {
    fn new(wanted: bool) -> Self {
        use sha2::Digest;
        Decisions {
            hasher: wanted.then(sha2::Sha256::new),
        }
    }

    fn add(&mut self, changes: &[ReservationChange]) {
        use sha2::Digest;
        if let Some(hasher) = &mut self.hasher {
            hasher.update(format!("{changes:?}").as_bytes());
        }
    }

    fn finish(self) -> Option<String> {
        use sha2::Digest;
        self.hasher.map(|hasher| hex::encode(hasher.finalize()))
    }
}

const MINUTE_MS: u64 = 60_000;
/// Instances per workload in the placement run.
const INSTANCES_PER_WORKLOAD: usize = 10;

#[derive(Debug, Serialize)]
struct PlacementReport {
    instances: usize,
    hosts: usize,
    workloads: usize,
    rounds: u64,
    placed: usize,
    wall_ms: u64,
    peak_rss_mib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    changes_digest: Option<String>,
}

#[derive(Debug, Serialize)]
struct FleetDayReport {
    hosts: usize,
    rounds: u64,
    workloads: usize,
    /// Demands whose capacity was handed over at (or after) their start.
    handed_over: usize,
    /// Pools that gained in more than one step.
    ramped_pools: usize,
    changes: usize,
    wall_ms: u64,
    peak_rss_mib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    changes_digest: Option<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    placement: PlacementReport,
    fleet_day: FleetDayReport,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.hosts == 0 || args.fleet_hosts == 0 {
        bail!("--hosts and --fleet-hosts must be at least 1");
    }
    // The smaller run first, so each peak is (nearly) its own: VmHWM
    // cannot always be reset (/proc/self/clear_refs is refused in some
    // containers).
    let fleet_day = fleet_day(&args);
    let placement = placement(&args)?;
    let report = Report {
        bench: "planner",
        placement,
        fleet_day,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// VmHWM of this process, in MiB.
fn peak_rss_mib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line["VmHWM:".len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024)
}

/// `count` instances in workloads of ten: priorities 0-9; in each, the
/// first three spread apart and the last two packed.
fn placement_workloads(count: usize, rng: &mut StdRng, start_ms: u64) -> Vec<Workload> {
    let mut workloads = Vec::new();
    let mut made = 0;
    while made < count {
        let index = workloads.len();
        let size = INSTANCES_PER_WORKLOAD.min(count - made);
        let names: Vec<String> = (0..size).map(|i| format!("w{index}-i{i}")).collect();
        let instances = names
            .iter()
            .map(|name| InstanceSpec {
                name: name.clone(),
                vcpus: rng.gen_range(1..=4),
                memory_mib: rng.gen_range(1..=8) * 1024,
                disk_gib: rng.gen_range(1..=20),
                image: None,
            })
            .collect();
        let mut rules = Vec::new();
        if size >= 3 {
            rules.push(rule(RuleKind::Spread, &names[..3]));
        }
        if size >= 5 {
            rules.push(rule(RuleKind::Pack, &names[size - 2..]));
        }
        workloads.push(Workload {
            name: format!("w{index}"),
            owner: "bench".into(),
            priority: rng.gen_range(0..10),
            start_ms,
            end_ms: start_ms + 60 * MINUTE_MS,
            instances,
            rules,
            seq: index as u64 + 1,
        });
        made += size;
    }
    workloads
}

fn rule(kind: RuleKind, names: &[String]) -> PlacementRule {
    PlacementRule {
        kind,
        instances: names.to_vec(),
    }
}

/// Demands holding their whole target (chosen, or handed over).
fn placed_instances(sim: &Simulation) -> usize {
    sim.book
        .pools
        .values()
        .filter(|pool| pool.phase != PoolPhase::Acquiring)
        .map(|pool| pool.instances.len())
        .sum()
}

fn placement(args: &Args) -> Result<PlacementReport> {
    let mut rng = StdRng::seed_from_u64(args.seed);
    // 64 vCPUs, 256 GiB, 2 TiB each, no owner load: everything free.
    let hosts = (0..args.hosts)
        .map(|i| {
            SimulatedHost::new(
                format!("host-{i:05}"),
                Capacity::new(6400, 256 * 1024, 2048),
                Capacity::ZERO,
            )
        })
        .collect();
    let policy = PlanPolicy {
        interval_ms: MINUTE_MS,
        ..PlanPolicy::default()
    };
    let mut sim = Simulation::new(hosts, policy, 0);
    let workloads = placement_workloads(args.instances, &mut rng, 24 * 60 * MINUTE_MS);
    let workload_count = workloads.len();
    for workload in workloads {
        sim.schedule(0, ReservationChange::PutWorkload(workload));
    }
    let mut kept = Vec::new();
    let began = Instant::now();
    let mut rounds = 0;
    while placed_instances(&sim) < args.instances && rounds < args.placement_rounds {
        let step = sim.step();
        if args.digest {
            kept.push(step.changes);
        }
        rounds += 1;
    }
    let wall_ms = began.elapsed().as_millis() as u64;
    let peak_rss_mib = peak_rss_mib();
    let mut decisions = Decisions::new(args.digest);
    for changes in &kept {
        decisions.add(changes);
    }
    let placed = placed_instances(&sim);
    if placed < args.instances {
        bail!(
            "placed {placed} of {} instances in {rounds} rounds",
            args.instances
        );
    }
    Ok(PlacementReport {
        instances: args.instances,
        hosts: args.hosts,
        workloads: workload_count,
        rounds,
        placed,
        wall_ms,
        peak_rss_mib,
        changes_digest: decisions.finish(),
    })
}

/// An owner's day: a base load, a peak at a random hour, changing every
/// 15 minutes, in vCPUs and MiB of a 32 vCPU / 128 GiB host.
fn owner_day(rng: &mut StdRng) -> Vec<(u64, Capacity)> {
    let base_mib: u64 = rng.gen_range(8..=48) * 1024;
    let peak_mib: u64 = rng.gen_range(0..=64) * 1024;
    let peak_quarter: u64 = rng.gen_range(0..96);
    (0..96u64)
        .map(|quarter| {
            // A triangle around the peak, two hours wide each side.
            let distance = quarter.abs_diff(peak_quarter);
            let rise = peak_mib.saturating_sub(peak_mib * distance / 8);
            let jitter = rng.gen_range(0..=4) * 512;
            let memory_mib = base_mib + rise + jitter;
            let vcpus = 2 + memory_mib / (8 * 1024);
            (
                quarter * 15 * MINUTE_MS,
                Capacity::new(vcpus * 100, memory_mib, 0),
            )
        })
        .collect()
}

/// A workload arriving at `applied_ms`, starting 30 minutes to 3 hours
/// later for 2 hours: 1 to 4 instances of 1-8 vCPUs and 2-48 GiB (above
/// the at-once threshold of 32 GiB hosts: a quarter, 24 GiB, they ramp).
fn fleet_workload(index: usize, applied_ms: u64, rng: &mut StdRng) -> Workload {
    let size = rng.gen_range(1..=4);
    let names: Vec<String> = (0..size).map(|i| format!("f{index}-i{i}")).collect();
    let instances = names
        .iter()
        .map(|name| InstanceSpec {
            name: name.clone(),
            vcpus: rng.gen_range(1..=8),
            memory_mib: rng.gen_range(2..=48) * 1024,
            disk_gib: rng.gen_range(1..=50),
            image: None,
        })
        .collect();
    let rules = if size >= 2 && rng.gen_bool(0.5) {
        vec![rule(RuleKind::Spread, &names)]
    } else {
        Vec::new()
    };
    let start_ms = applied_ms + rng.gen_range(30..=180) * MINUTE_MS;
    Workload {
        name: format!("f{index}"),
        owner: "bench".into(),
        priority: rng.gen_range(0..5),
        start_ms,
        end_ms: start_ms + 120 * MINUTE_MS,
        instances,
        rules,
        seq: index as u64 + 1,
    }
}

fn fleet_day(args: &Args) -> FleetDayReport {
    let mut rng = StdRng::seed_from_u64(args.seed.wrapping_add(1));
    let hosts = (0..args.fleet_hosts)
        .map(|i| {
            let mut host = SimulatedHost::new(
                format!("fleet-{i:04}"),
                Capacity::new(3200, 128 * 1024, 1000),
                Capacity::new(200, 4096, 50),
            );
            host.owner_load = owner_day(&mut rng);
            host
        })
        .collect();
    let policy = PlanPolicy {
        interval_ms: MINUTE_MS,
        ..PlanPolicy::default()
    };
    let mut sim = Simulation::new(hosts, policy, 0);
    // About one workload a day per host, arriving all day.
    let workload_count = args.fleet_hosts;
    for index in 0..workload_count {
        let applied_ms = rng.gen_range(0..args.rounds.max(1)) * MINUTE_MS;
        let workload = fleet_workload(index, applied_ms, &mut rng);
        sim.schedule(applied_ms, ReservationChange::PutWorkload(workload));
    }
    let (mut changes, mut handed_over) = (0, 0);
    let mut grants: std::collections::BTreeMap<u64, u32> = std::collections::BTreeMap::new();
    let mut decisions = Decisions::new(args.digest);
    let began = Instant::now();
    for _ in 0..args.rounds {
        let step = sim.step();
        changes += step.changes.len();
        decisions.add(&step.changes);
        for change in &step.changes {
            if let ReservationChange::PutPool(pool) = change {
                if pool.phase == PoolPhase::HandedOver && pool.allocated == pool.target {
                    handed_over += 1;
                } else if pool.phase == PoolPhase::Acquiring && !pool.acquired.is_zero() {
                    *grants.entry(pool.pool_id).or_default() += 1;
                }
            }
        }
    }
    let wall_ms = began.elapsed().as_millis() as u64;
    FleetDayReport {
        hosts: args.fleet_hosts,
        rounds: args.rounds,
        workloads: workload_count,
        handed_over,
        ramped_pools: grants.values().filter(|&&n| n > 1).count(),
        changes,
        wall_ms,
        peak_rss_mib: peak_rss_mib(),
        changes_digest: decisions.finish(),
    }
}
