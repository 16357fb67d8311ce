//! Scenarios of seed 003 run through the planner on simulated time
//! (`reservation::simulation`): every interval each host is sampled, a round
//! runs and its changes are applied. Nothing sleeps; the expected figures
//! are worked out by hand in the comments.

use leasehold_core::reservation::planner::PlanPolicy;
use leasehold_core::reservation::simulation::{SimulatedHost, Simulation, SimulationStep};
use leasehold_core::reservation::warnings::WarningReason;
use leasehold_core::reservation::{
    Capacity, InstanceSpec, PlacementRule, Pool, PoolPhase, ReservationChange, RuleKind, Workload,
};

const MINUTE_MS: u64 = 60_000;
const GIB_AS_MIB: u64 = 1024;

fn instance(name: &str, vcpus: u32, memory_mib: u64, disk_gib: u64) -> InstanceSpec {
    InstanceSpec {
        name: name.into(),
        vcpus,
        memory_mib,
        disk_gib,
        image: None,
    }
}

fn rule(kind: RuleKind, names: &[&str]) -> PlacementRule {
    PlacementRule {
        kind,
        instances: names.iter().map(|n| n.to_string()).collect(),
    }
}

struct WorkloadShape {
    name: &'static str,
    priority: i64,
    start_ms: u64,
    end_ms: u64,
    seq: u64,
}

fn workload(
    shape: WorkloadShape,
    instances: Vec<InstanceSpec>,
    rules: Vec<PlacementRule>,
) -> Workload {
    let workload = Workload {
        name: shape.name.into(),
        owner: "ops".into(),
        priority: shape.priority,
        start_ms: shape.start_ms,
        end_ms: shape.end_ms,
        instances,
        rules,
        seq: shape.seq,
    };
    workload
        .validate()
        .expect("the scenario's workload is valid");
    workload
}

/// A host of 4 vCPUs, 8 GiB and 100 GiB of disk.
fn small_host(
    host_id: &str,
    owner_share: Capacity,
    owner_load: Vec<(u64, Capacity)>,
) -> SimulatedHost {
    let mut host = SimulatedHost::new(host_id, Capacity::new(400, 8192, 100), owner_share);
    host.owner_load = owner_load;
    host
}

fn memory(memory_mib: u64) -> Capacity {
    Capacity::new(0, memory_mib, 0)
}

fn pools_of<'a>(sim: &'a Simulation, workload: &'a str) -> Vec<&'a Pool> {
    sim.book
        .pools
        .values()
        .filter(|pool| pool.workload == workload)
        .collect()
}

/// After a round, no host holds more than its latest sample left available
/// nor more than its lendable capacity less what it lends; and every pool
/// the round stepped holds no more than its host had free at that sample.
fn assert_within_samples(sim: &Simulation, step: &SimulationStep) {
    for host in &sim.hosts {
        let held = sim.book.held_on_host(&host.host_id);
        let latest = host.window.latest().expect("sampled");
        assert!(
            held.fits_in(latest.available),
            "at {} ms {} holds {held:?}, more than the {:?} available",
            step.at_ms,
            host.host_id,
            latest.available
        );
        assert!(held.fits_in(host.lendable().saturating_sub(host.lent)));
    }
    for change in &step.changes {
        let ReservationChange::PutPool(pool) = change else {
            continue;
        };
        let host = sim.host(&pool.host_id).expect("a pool on a known host");
        if pool.sampled_at_ms == Some(step.at_ms) {
            let sample = host.window.latest().expect("sampled");
            assert!(
                pool.held().fits_in(sample.available),
                "{pool:?} above {sample:?}"
            );
        }
    }
}

/// The hand-over at the start keeps what the host holds: if `step` handed
/// a pool over, the pool held the same just before (as the chosen pool,
/// earlier in the round, or before the round when nothing else changed
/// it) and after, and its instances got the whole target.
fn assert_hand_over_continuous(sim: &Simulation, step: &SimulationStep) -> bool {
    let mut handed = false;
    for (index, change) in step.changes.iter().enumerate() {
        let ReservationChange::PutPool(pool) = change else {
            continue;
        };
        if pool.phase != PoolPhase::HandedOver {
            continue;
        }
        handed = true;
        let earlier = step.changes[..index].iter().rev().find_map(|c| match c {
            ReservationChange::PutPool(p) if p.pool_id == pool.pool_id => Some(p),
            _ => None,
        });
        match earlier {
            Some(chosen) => {
                assert_eq!(chosen.phase, PoolPhase::Chosen);
                assert_eq!(chosen.held(), pool.held(), "held changed at the hand-over");
            }
            None => {
                let before = step
                    .held_before
                    .get(&pool.host_id)
                    .copied()
                    .unwrap_or_default();
                assert_eq!(
                    before,
                    sim.book.held_on_host(&pool.host_id),
                    "held changed at the hand-over"
                );
            }
        }
        assert_eq!(pool.allocated, pool.target);
        assert_eq!(pool.acquired, Capacity::ZERO);
    }
    handed
}

/// Owner load on the host that frees up: 7 GiB for the first hour, then
/// 512 MiB less every 10 minutes down to 1 GiB (at 2 h 50 min).
fn falling_owner_load() -> Vec<(u64, Capacity)> {
    let mut load = vec![(0, Capacity::new(100, 7168, 0))];
    for j in 0..12u64 {
        load.push((
            (3600 + 600 * j) * 1000,
            Capacity::new(100, 6656 - 512 * j, 0),
        ));
    }
    load
}

/// Temporary shortage: at 1 h 10 min an instance of 6 GiB is wanted for
/// 3 h. No host has 6 GiB free: h1-falls has 2 GiB (its owner is letting go
/// of memory), h2-busy 2 GiB for good, h3-rises 1 GiB and shrinking. Only
/// h1-falls's trend rises, so it is the first candidate; its pool follows
/// what frees up and holds 6 GiB once the owner is down to 2 GiB (2 h 30
/// min), it is chosen, h2-busy's partial pool is released, and at 3 h the
/// instance gets all of it.
#[test]
fn temporary_shortage_ramps_on_the_host_that_frees_up() {
    let share = memory(512);
    let hosts = vec![
        small_host("h1-falls", share, falling_owner_load()),
        small_host("h2-busy", share, vec![(0, Capacity::new(100, 6144, 0))]),
        small_host(
            "h3-rises",
            share,
            vec![
                (0, Capacity::new(100, 4096, 0)),
                (1_800_000, Capacity::new(100, 5120, 0)),
                (3_600_000, Capacity::new(100, 7168, 0)),
            ],
        ),
    ];
    let policy = PlanPolicy {
        interval_ms: MINUTE_MS,
        ..PlanPolicy::default()
    };
    let (applied_ms, start_ms) = (4_200_000, 10_800_000);
    let target = Capacity::new(100, 6144, 1);
    let mut sim = Simulation::new(hosts, policy, 0);
    let shape = WorkloadShape {
        name: "shortage",
        priority: 0,
        start_ms,
        end_ms: 14_400_000,
        seq: 1,
    };
    sim.schedule(
        applied_ms,
        ReservationChange::PutWorkload(workload(shape, vec![instance("big", 1, 6144, 1)], vec![])),
    );
    let mut acquired_on_h1 = Vec::new();
    let mut chosen_at_ms = None;
    while sim.now_ms <= start_ms {
        let step = sim.step();
        assert_within_samples(&sim, &step);
        if step.at_ms == applied_ms {
            for host in &sim.hosts {
                let free = host.window.latest().unwrap().available;
                assert!(
                    !target.fits_in(free),
                    "{} has the target free now",
                    host.host_id
                );
            }
            let hosts: Vec<&str> = pools_of(&sim, "shortage")
                .iter()
                .map(|p| p.host_id.as_str())
                .collect();
            assert_eq!(hosts, vec!["h1-falls", "h2-busy"], "best forecast first");
        }
        for pool in pools_of(&sim, "shortage") {
            if pool.host_id == "h1-falls" && pool.phase == PoolPhase::Acquiring {
                acquired_on_h1.push(pool.acquired.memory_mib);
            }
            if pool.phase == PoolPhase::Chosen && chosen_at_ms.is_none() {
                assert_eq!(pool.host_id, "h1-falls");
                chosen_at_ms = Some(step.at_ms);
            }
        }
        let handed = assert_hand_over_continuous(&sim, &step);
        assert_eq!(
            handed,
            step.at_ms == start_ms,
            "handed over at {} ms",
            step.at_ms
        );
    }
    acquired_on_h1.dedup();
    assert!(
        acquired_on_h1.len() >= 5,
        "a ramp of several steps: {acquired_on_h1:?}"
    );
    assert!(
        acquired_on_h1.windows(2).all(|w| w[0] < w[1]),
        "{acquired_on_h1:?}"
    );
    // The owner is down to 2 GiB at 2 h 30 min: 6 GiB free.
    assert_eq!(chosen_at_ms, Some(9_000_000));
    let pools = pools_of(&sim, "shortage");
    assert_eq!(pools.len(), 1, "the partial pool on h2-busy was released");
    assert_eq!(pools[0].host_id, "h1-falls");
    assert_eq!(pools[0].phase, PoolPhase::HandedOver);
    assert_eq!(pools[0].allocated, target);
    assert_eq!(sim.book.held_on_host("h2-busy"), Capacity::ZERO);
}

/// Unreachable target, by hand. One host of 8 GiB, owner share 512 MiB;
/// the owner uses 7 GiB and 256 MiB less every minute, so available memory
/// is 1024 + 256·m MiB at minute m. At minute 4 a 6 GiB instance is wanted
/// from minute 10. Steps are 4 GiB, so only capacity limits the ramp:
/// - the round at minute 4 grants what is free: 2048 MiB;
/// - the trend over minutes 0-4 is 256 MiB a minute, so 6144 MiB is free
///   (6144 − 2048) / 256 = 16 minutes later: the earliest start is minute 20;
/// - by minute 10, six minutes on, 2048 + 6·256 = 3584 MiB: the largest
///   guarantee reachable by the start.
///
/// The planner does exactly that: 3584 MiB at minute 10, complete (and
/// handed over, being late) at minute 20.
#[test]
fn unreachable_target_is_warned_early_with_what_would_fix_it() {
    let mut owner_load = vec![(0, memory(7168))];
    owner_load.extend((1..=24u64).map(|m| (m * MINUTE_MS, memory(7168 - 256 * m))));
    let hosts = vec![small_host("h1", memory(512), owner_load)];
    let policy = PlanPolicy {
        interval_ms: MINUTE_MS,
        threshold: Some(Capacity::new(100, 1024, 10)),
        step: Some(Capacity::new(400, 4096, 100)),
        candidates: 1,
        fruitless_limit: 5,
        gradual_handover: false,
    };
    let (applied_ms, start_ms) = (4 * MINUTE_MS, 10 * MINUTE_MS);
    let mut sim = Simulation::new(hosts, policy, 0);
    let shape = WorkloadShape {
        name: "late",
        priority: 0,
        start_ms,
        end_ms: 60 * MINUTE_MS,
        seq: 1,
    };
    sim.schedule(
        applied_ms,
        ReservationChange::PutWorkload(workload(shape, vec![instance("wide", 1, 6144, 1)], vec![])),
    );
    let mut first_warning_ms = None;
    let mut handed_over_at_ms = None;
    while sim.now_ms <= 25 * MINUTE_MS {
        let step = sim.step();
        assert_within_samples(&sim, &step);
        let warnings = sim.warnings_at(step.at_ms);
        if step.at_ms == applied_ms {
            assert_eq!(
                pools_of(&sim, "late")[0].acquired,
                Capacity::new(100, 2048, 1)
            );
            assert_eq!(warnings.len(), 1, "{warnings:?}");
            let warning = &warnings[0];
            assert_eq!(warning.reason, WarningReason::NotByStart);
            assert_eq!(warning.instances, vec!["wide"]);
            assert_eq!(warning.earliest_start_ms, Some(20 * MINUTE_MS));
            assert_eq!(warning.largest_guarantee, Capacity::new(100, 3584, 1));
            assert_eq!(warning.largest_guarantee_host.as_deref(), Some("h1"));
        }
        if !warnings.is_empty() && first_warning_ms.is_none() {
            first_warning_ms = Some(step.at_ms);
        }
        if step.at_ms == start_ms {
            assert_eq!(pools_of(&sim, "late")[0].acquired.memory_mib, 3584);
        }
        if assert_hand_over_continuous(&sim, &step) {
            handed_over_at_ms.get_or_insert(step.at_ms);
        }
    }
    let first_warning_ms = first_warning_ms.expect("warned");
    assert!(
        first_warning_ms + MINUTE_MS <= start_ms,
        "warned at {first_warning_ms} ms"
    );
    assert_eq!(handed_over_at_ms, Some(20 * MINUTE_MS));
    assert!(sim.warnings_at(25 * MINUTE_MS).is_empty());
}

/// Priority: two workloads want 2 GiB each on one host whose owner lets go
/// of 512 MiB a minute; the low one was applied first. The high one takes
/// every MiB that frees up until it holds its target; only then does the
/// low one gain memory.
#[test]
fn the_higher_priority_gets_its_full_capacity_first() {
    let owner_load = (0..=16u64)
        .map(|m| (m * MINUTE_MS, memory(8192 - 512 * m)))
        .collect();
    let hosts = vec![small_host("h1", Capacity::ZERO, owner_load)];
    let policy = PlanPolicy {
        interval_ms: MINUTE_MS,
        threshold: Some(Capacity::new(100, 256, 1)),
        step: Some(Capacity::new(400, 1024, 100)),
        candidates: 1,
        fruitless_limit: 5,
        gradual_handover: false,
    };
    let mut sim = Simulation::new(hosts, policy, 0);
    let (start_ms, end_ms) = (30 * MINUTE_MS, 60 * MINUTE_MS);
    let low = WorkloadShape {
        name: "low",
        priority: 1,
        start_ms,
        end_ms,
        seq: 1,
    };
    let high = WorkloadShape {
        name: "high",
        priority: 9,
        start_ms,
        end_ms,
        seq: 2,
    };
    sim.schedule(
        0,
        ReservationChange::PutWorkload(workload(low, vec![instance("low-0", 1, 2048, 1)], vec![])),
    );
    sim.schedule(
        0,
        ReservationChange::PutWorkload(workload(
            high,
            vec![instance("high-0", 1, 2048, 1)],
            vec![],
        )),
    );
    let complete_at =
        |sim: &Simulation, name: &str| pools_of(sim, name).iter().any(|p| p.is_complete());
    let (mut high_done_ms, mut low_done_ms) = (None, None);
    while sim.now_ms < start_ms {
        let step = sim.step();
        assert_within_samples(&sim, &step);
        let low_memory: u64 = pools_of(&sim, "low")
            .iter()
            .map(|p| p.acquired.memory_mib)
            .sum();
        if !complete_at(&sim, "high") {
            assert_eq!(
                low_memory, 0,
                "low gained memory at {} ms before high was complete",
                step.at_ms
            );
        }
        if complete_at(&sim, "high") {
            high_done_ms.get_or_insert(step.at_ms);
        }
        if complete_at(&sim, "low") {
            low_done_ms.get_or_insert(step.at_ms);
        }
    }
    // 512 MiB a minute from minute 1: high holds 2 GiB at minute 4, low at 8.
    assert_eq!(high_done_ms, Some(4 * MINUTE_MS));
    assert_eq!(low_done_ms, Some(8 * MINUTE_MS));
}

/// Spread and pack, at once: small instances on four free hosts; a, b and
/// the pack {c, d} each on a different host, c and d in one pool.
#[test]
fn spread_and_pack_are_honoured_at_once() {
    let hosts = (1..=4)
        .map(|n| {
            SimulatedHost::new(
                format!("h{n}"),
                Capacity::new(800, 16384, 100),
                Capacity::ZERO,
            )
        })
        .collect();
    let policy = PlanPolicy {
        interval_ms: MINUTE_MS,
        ..PlanPolicy::default()
    };
    let mut sim = Simulation::new(hosts, policy, 0);
    let shape = WorkloadShape {
        name: "w",
        priority: 0,
        start_ms: 10 * MINUTE_MS,
        end_ms: 20 * MINUTE_MS,
        seq: 1,
    };
    let instances = ["a", "b", "c", "d"]
        .iter()
        .map(|n| instance(n, 1, 1024, 1))
        .collect();
    let rules = vec![
        rule(RuleKind::Spread, &["a", "b", "c"]),
        rule(RuleKind::Pack, &["c", "d"]),
    ];
    sim.schedule(
        0,
        ReservationChange::PutWorkload(workload(shape, instances, rules)),
    );
    sim.step();
    let pools = pools_of(&sim, "w");
    assert_eq!(pools.len(), 3, "{pools:?}");
    let mut hosts: Vec<&str> = pools.iter().map(|p| p.host_id.as_str()).collect();
    hosts.sort();
    hosts.dedup();
    assert_eq!(hosts.len(), 3, "spread members share a host: {pools:?}");
    let packed = pools
        .iter()
        .find(|p| p.instances.contains(&"c".to_string()))
        .unwrap();
    assert_eq!(packed.instances, vec!["c", "d"]);
    assert_eq!(packed.target, Capacity::new(200, 2048, 2));
    assert!(pools
        .iter()
        .all(|p| p.phase == PoolPhase::Chosen && p.acquired == p.target));
}

/// Spread with ramps: three 4 GiB instances spread over three hosts, two
/// candidates each. At no step do two of them have pools on one host, and
/// each is handed over on its own host at the start.
#[test]
fn spread_is_honoured_while_ramping() {
    let hosts = (1..=3)
        .map(|n| small_host(&format!("h{n}"), Capacity::ZERO, vec![]))
        .collect();
    let policy = PlanPolicy {
        interval_ms: MINUTE_MS,
        threshold: Some(Capacity::new(100, 1024, 10)),
        step: Some(Capacity::new(400, 2048, 100)),
        candidates: 2,
        fruitless_limit: 5,
        gradual_handover: false,
    };
    let mut sim = Simulation::new(hosts, policy, 0);
    let start_ms = 20 * MINUTE_MS;
    let shape = WorkloadShape {
        name: "w",
        priority: 0,
        start_ms,
        end_ms: 40 * MINUTE_MS,
        seq: 1,
    };
    let instances = ["a", "b", "c"]
        .iter()
        .map(|n| instance(n, 1, 4096, 1))
        .collect();
    sim.schedule(
        0,
        ReservationChange::PutWorkload(workload(
            shape,
            instances,
            vec![rule(RuleKind::Spread, &["a", "b", "c"])],
        )),
    );
    while sim.now_ms <= start_ms {
        let step = sim.step();
        assert_within_samples(&sim, &step);
        let mut host_of = std::collections::BTreeMap::new();
        for pool in pools_of(&sim, "w") {
            if let Some(other) = host_of.insert(pool.host_id.clone(), pool.demand.clone()) {
                assert_eq!(
                    other, pool.demand,
                    "{} and {} share {}",
                    other, pool.demand, pool.host_id
                );
            }
        }
        assert_hand_over_continuous(&sim, &step);
    }
    let pools = pools_of(&sim, "w");
    assert_eq!(pools.len(), 3);
    assert!(pools
        .iter()
        .all(|p| p.phase == PoolPhase::HandedOver && p.allocated == p.target));
}

#[test]
fn an_impossible_rule_set_is_refused_with_the_reason() {
    let workload = Workload {
        name: "w".into(),
        owner: "ops".into(),
        priority: 0,
        start_ms: 0,
        end_ms: 1,
        instances: vec![instance("a", 1, 512, 1), instance("b", 1, 512, 1)],
        rules: vec![
            rule(RuleKind::Pack, &["a", "b"]),
            rule(RuleKind::Spread, &["b", "a"]),
        ],
        seq: 1,
    };
    let error = workload.validate().unwrap_err();
    assert_eq!(error.field, "rule[1].instances");
    assert!(error.problem.contains("cannot both hold"), "{error}");
}

/// Deletion: a workload holds 1 GiB on a host whose owner then wants all of
/// it; the owner gets only what is not held. Once the workload is deleted
/// its pool is gone and the owner gets the whole host back.
#[test]
fn deletion_releases_the_pool() {
    let owner_load = vec![(0, Capacity::ZERO), (3 * MINUTE_MS, memory(8192))];
    let hosts = vec![small_host("h1", Capacity::ZERO, owner_load)];
    let policy = PlanPolicy {
        interval_ms: MINUTE_MS,
        ..PlanPolicy::default()
    };
    let mut sim = Simulation::new(hosts, policy, 0);
    let shape = WorkloadShape {
        name: "holder",
        priority: 0,
        start_ms: 60 * MINUTE_MS,
        end_ms: 90 * MINUTE_MS,
        seq: 1,
    };
    sim.schedule(
        0,
        ReservationChange::PutWorkload(workload(shape, vec![instance("keep", 1, 1024, 1)], vec![])),
    );
    sim.schedule(
        5 * MINUTE_MS,
        ReservationChange::RemoveWorkload {
            name: "holder".into(),
        },
    );
    for _ in 0..5 {
        sim.step();
    }
    assert_eq!(sim.book.held_on_host("h1"), Capacity::new(100, 1024, 1));
    assert_eq!(
        sim.hosts[0].window.latest().unwrap().owner_used.memory_mib,
        7168
    );
    let step = sim.step();
    assert!(step.held_before.is_empty(), "{:?}", step.held_before);
    assert!(sim.book.pools.is_empty());
    assert!(sim.book.workloads.is_empty());
    assert_eq!(
        sim.hosts[0].window.latest().unwrap().owner_used.memory_mib,
        8192
    );
}

/// FIG. 3, 5 and 6 in the shape of the seed (its own figures do not add up:
/// pool 3 acquires 120 GB of 150 on a 120 GB host), in GiB of memory, four
/// hosts of 120 GiB:
/// - host-1: owner 40 GiB. "ticket-sales-1" (priority 4000) packs VS1, VS2
///   (30 GiB) and VS3 (20 GiB) into pool 1, which ramps 30, 60, 80 GiB by
///   minute 2 and is handed to them at its start (minute 5);
/// - host-2: owner 60 GiB for good; no pool;
/// - host-3: owner 120 GiB until minute 9, then 10 GiB less a minute.
///   "development-lease-2" (priority 1000, VS11 of 100 GiB) comes at minute
///   12; host-3 is the only host whose trend rises, so its pool 2 ramps
///   there following what frees up: 30, 40, 50, 60 GiB at minute 15, having
///   asked for 80 (50 + a step of 30);
/// - host-4: owner uses all of it.
#[test]
fn fig_3_5_and_6_tables() {
    let gib = |n: u64| n * GIB_AS_MIB;
    let total = Capacity::new(1600, gib(120), 1000);
    let mut hosts = Vec::new();
    for (host_id, owner_load) in [
        ("host-1", vec![(0, memory(gib(40)))]),
        ("host-2", vec![(0, memory(gib(60)))]),
        (
            "host-3",
            (0..=21u64)
                .map(|m| (m * MINUTE_MS, memory(gib(120 - 10 * m.saturating_sub(9)))))
                .collect(),
        ),
        ("host-4", vec![(0, memory(gib(120)))]),
    ] {
        let mut host = SimulatedHost::new(host_id, total, Capacity::ZERO);
        host.owner_load = owner_load;
        hosts.push(host);
    }
    let policy = PlanPolicy {
        interval_ms: MINUTE_MS,
        candidates: 1,
        ..PlanPolicy::default()
    };
    let mut sim = Simulation::new(hosts, policy, 0);
    let tickets = WorkloadShape {
        name: "ticket-sales-1",
        priority: 4000,
        start_ms: 5 * MINUTE_MS,
        end_ms: 600 * MINUTE_MS,
        seq: 1,
    };
    let vms = vec![
        instance("VS1", 1, gib(30), 10),
        instance("VS2", 1, gib(30), 10),
        instance("VS3", 1, gib(20), 10),
    ];
    sim.schedule(
        0,
        ReservationChange::PutWorkload(workload(
            tickets,
            vms,
            vec![rule(RuleKind::Pack, &["VS1", "VS2", "VS3"])],
        )),
    );
    let lease = WorkloadShape {
        name: "development-lease-2",
        priority: 1000,
        start_ms: 40 * MINUTE_MS,
        end_ms: 600 * MINUTE_MS,
        seq: 2,
    };
    sim.schedule(
        12 * MINUTE_MS,
        ReservationChange::PutWorkload(workload(
            lease,
            vec![instance("VS11", 2, gib(100), 50)],
            vec![],
        )),
    );
    while sim.now_ms <= 15 * MINUTE_MS {
        sim.step();
    }
    // FIG. 3 (and FIG. 6: the instances of each pool).
    let rows: Vec<_> = sim
        .book
        .pools
        .values()
        .map(|p| {
            (
                p.pool_id,
                p.host_id.as_str(),
                p.instances.join(","),
                p.phase == PoolPhase::Acquiring,
                p.allocated.memory_mib / GIB_AS_MIB,
                p.requested.memory_mib / GIB_AS_MIB,
                p.acquired.memory_mib / GIB_AS_MIB,
                p.target.memory_mib / GIB_AS_MIB,
                p.sampled_at_ms,
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (
                1,
                "host-1",
                "VS1,VS2,VS3".to_string(),
                false,
                80,
                0,
                0,
                80,
                Some(2 * MINUTE_MS)
            ),
            (
                2,
                "host-3",
                "VS11".to_string(),
                true,
                0,
                80,
                60,
                100,
                Some(15 * MINUTE_MS)
            ),
        ]
    );
    // FIG. 5: total, available, not yet acquired.
    let table: Vec<_> = sim
        .host_table()
        .iter()
        .map(|row| {
            (
                row.host_id,
                row.total.memory_mib / GIB_AS_MIB,
                row.latest.unwrap().available.memory_mib / GIB_AS_MIB,
                row.not_yet_acquired.unwrap().memory_mib / GIB_AS_MIB,
            )
        })
        .collect();
    assert_eq!(
        table,
        vec![
            ("host-1", 120, 80, 0),
            ("host-2", 120, 60, 60),
            ("host-3", 120, 60, 0),
            ("host-4", 120, 0, 0),
        ]
    );
}

/// The host that frees up only after the ramps began is still found: at
/// minute 10 a 6 GiB instance is wanted from minute 90 and no host's trend
/// rises, so the two candidates are a-busy and b-busy (2 GiB free each, for
/// good). From minute 30 z-frees's owner lets go of 512 MiB a minute; once
/// its trend shows, a pool that can never complete gives its place to it,
/// and the instance is guaranteed there by its start.
#[test]
fn a_host_that_frees_up_later_replaces_a_hopeless_candidate() {
    let share = memory(512);
    let mut falling = vec![(0, memory(7168))];
    falling.extend((1..=12u64).map(|k| ((30 + k) * MINUTE_MS, memory(7168 - 512 * k))));
    let hosts = vec![
        small_host("a-busy", share, vec![(0, memory(6144))]),
        small_host("b-busy", share, vec![(0, memory(6144))]),
        small_host("z-frees", share, falling),
    ];
    let policy = PlanPolicy {
        interval_ms: MINUTE_MS,
        ..PlanPolicy::default()
    };
    let mut sim = Simulation::new(hosts, policy, 0);
    let start_ms = 90 * MINUTE_MS;
    let shape = WorkloadShape {
        name: "later",
        priority: 0,
        start_ms,
        end_ms: 120 * MINUTE_MS,
        seq: 1,
    };
    sim.schedule(
        10 * MINUTE_MS,
        ReservationChange::PutWorkload(workload(shape, vec![instance("big", 1, 6144, 1)], vec![])),
    );
    while sim.now_ms <= start_ms {
        let step = sim.step();
        assert_within_samples(&sim, &step);
        if step.at_ms == 10 * MINUTE_MS {
            let hosts: Vec<&str> = pools_of(&sim, "later")
                .iter()
                .map(|p| p.host_id.as_str())
                .collect();
            assert_eq!(hosts, vec!["a-busy", "b-busy"]);
        }
    }
    let pools = pools_of(&sim, "later");
    assert_eq!(pools.len(), 1, "{pools:?}");
    assert_eq!(pools[0].host_id, "z-frees");
    assert_eq!(pools[0].phase, PoolPhase::HandedOver);
    assert_eq!(pools[0].allocated, Capacity::new(100, 6144, 1));
}

/// A ramp bound by its steps, by hand: the whole host is free, the step is
/// 1 GiB and the target 6 GiB, wanted from minute 4. The round at minute 0
/// takes the first step (1 GiB); the next ones come at minutes 1-5, so the
/// pool holds 5 GiB at the start and 6 GiB at minute 5. The warning asked
/// for right after the round says so: not by the start, earliest start
/// minute 5, 5 GiB reachable by the start.
#[test]
fn a_ramp_short_of_steps_is_warned_counting_the_step_already_taken() {
    let hosts = vec![small_host("h1", Capacity::ZERO, vec![])];
    let policy = PlanPolicy {
        interval_ms: MINUTE_MS,
        threshold: Some(Capacity::new(100, 512, 10)),
        step: Some(Capacity::new(400, 1024, 100)),
        candidates: 1,
        fruitless_limit: 5,
        gradual_handover: false,
    };
    let mut sim = Simulation::new(hosts, policy, 0);
    let shape = WorkloadShape {
        name: "steps",
        priority: 0,
        start_ms: 4 * MINUTE_MS,
        end_ms: 60 * MINUTE_MS,
        seq: 1,
    };
    sim.schedule(
        0,
        ReservationChange::PutWorkload(workload(shape, vec![instance("wide", 1, 6144, 1)], vec![])),
    );
    let step = sim.step();
    assert_eq!(pools_of(&sim, "steps")[0].acquired.memory_mib, 1024);
    let warnings = sim.warnings_at(step.at_ms);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].reason, WarningReason::NotByStart);
    assert_eq!(warnings[0].earliest_start_ms, Some(5 * MINUTE_MS));
    assert_eq!(warnings[0].largest_guarantee, Capacity::new(100, 5120, 1));
    let mut handed_over_at_ms = None;
    while sim.now_ms <= 6 * MINUTE_MS {
        let step = sim.step();
        if step.at_ms == 4 * MINUTE_MS {
            assert_eq!(pools_of(&sim, "steps")[0].acquired.memory_mib, 5120);
        }
        if assert_hand_over_continuous(&sim, &step) {
            handed_over_at_ms.get_or_insert(step.at_ms);
        }
    }
    assert_eq!(handed_over_at_ms, Some(5 * MINUTE_MS));
}

/// An instance larger than any host (64 vCPUs on hosts of 4) is warned
/// from its first round, with no earliest start, and never gets a pool.
#[test]
fn an_instance_larger_than_any_host_is_warned_without_an_earliest_start() {
    let hosts = vec![
        small_host("h1", memory(512), vec![]),
        small_host("h2", memory(512), vec![]),
    ];
    let policy = PlanPolicy {
        interval_ms: MINUTE_MS,
        ..PlanPolicy::default()
    };
    let mut sim = Simulation::new(hosts, policy, 0);
    let shape = WorkloadShape {
        name: "huge",
        priority: 1,
        start_ms: 40 * MINUTE_MS,
        end_ms: 100 * MINUTE_MS,
        seq: 1,
    };
    sim.schedule(
        0,
        ReservationChange::PutWorkload(workload(shape, vec![instance("wide", 64, 256, 1)], vec![])),
    );
    for _ in 0..3 {
        let step = sim.step();
        let warnings = sim.warnings_at(step.at_ms);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].reason, WarningReason::LargerThanAnyHost);
        assert_eq!(warnings[0].earliest_start_ms, None);
        assert!(sim.book.pools.is_empty());
    }
}

/// Fruitless rounds, by hand: the owner lets go of 2 GiB at minute 1 and
/// then nothing more. The trend over the window still rises, so the
/// forecast keeps saying the 6 GiB instance (from minute 30) will make it,
/// but from minute 3 its pool gains nothing; after five such rounds
/// (minute 7) it is warned as fruitless, not before.
#[test]
fn a_ramp_that_stops_gaining_is_warned_after_the_fruitless_limit() {
    let owner_load = vec![(0, memory(8192)), (MINUTE_MS, memory(6144))];
    let hosts = vec![small_host("h1", Capacity::ZERO, owner_load)];
    let policy = PlanPolicy {
        interval_ms: MINUTE_MS,
        ..PlanPolicy::default()
    };
    let mut sim = Simulation::new(hosts, policy, 0);
    let shape = WorkloadShape {
        name: "stuck",
        priority: 0,
        start_ms: 30 * MINUTE_MS,
        end_ms: 60 * MINUTE_MS,
        seq: 1,
    };
    sim.schedule(
        2 * MINUTE_MS,
        ReservationChange::PutWorkload(workload(shape, vec![instance("big", 1, 6144, 1)], vec![])),
    );
    while sim.now_ms <= 7 * MINUTE_MS {
        let step = sim.step();
        let warnings = sim.warnings_at(step.at_ms);
        if step.at_ms < 7 * MINUTE_MS {
            assert!(warnings.is_empty(), "at {} ms: {warnings:?}", step.at_ms);
            continue;
        }
        assert_eq!(pools_of(&sim, "stuck")[0].acquired.memory_mib, 2048);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].reason, WarningReason::Fruitless);
        assert_eq!(warnings[0].fruitless_rounds, 5);
    }
}
