//! Seed 003 through the broker's HTTP API on a simulated clock: samples
//! from a host whose owner frees memory over time, a workload applied ahead
//! of its start, planning rounds run on demand (`POST /v1/plan`) as the
//! test moves the clock, and the tables the API answers (FIG. 3, 5, 6, 14).

use leasehold_api::{
    rfc3339_from_ms, Client, HostSampleRequest, InstanceStatus, RegisterHostRequest,
    RegisterPartitionRequest, Role, WorkloadFile,
};
use leasehold_broker::{BrokerConfig, RunningBroker, DEFAULT_KEY_TTL_MS};
use leasehold_core::reservation::planner::PlanPolicy;
use leasehold_core::reservation::warnings::WarningReason;
use leasehold_core::reservation::{Capacity, InstanceSpec, PlacementRule, PoolPhase, RuleKind};
use leasehold_core::{HostCapacity, Terms};
use leasehold_service::SimulatedClock;
use leasehold_store::Durability;

const START_MS: u64 = 1_700_000_000_000;
const SECOND_MS: u64 = 1000;
const TOTAL_MIB: u64 = 8192;

struct Market {
    clock: SimulatedClock,
    broker: RunningBroker,
    admin: Client,
    lender: Client,
    borrower: Client,
    dir: tempfile::TempDir,
}

fn config(data_dir: std::path::PathBuf, clock: &SimulatedClock) -> BrokerConfig {
    BrokerConfig {
        data_dir,
        listen: "127.0.0.1:0".parse().unwrap(),
        durability: Durability::Normal,
        commission_basis_points: 0,
        key_ttl_ms: DEFAULT_KEY_TTL_MS,
        clock: clock.shared(),
        image_store_url: None,
        tls: None,
        client_trust: Default::default(),
        database_url: None,
        store_layer: None,
        plan_policy: PlanPolicy {
            interval_ms: SECOND_MS,
            ..PlanPolicy::default()
        },
        run_planner: false,
        metrics_public: false,
    }
}

/// 4 vCPUs, 8 GiB (owner share 512 MiB), 20 GiB.
fn capacity() -> HostCapacity {
    HostCapacity {
        cpu_centicores: 400,
        memory_mib: TOTAL_MIB,
        disk_gib: 20,
        owner_share_cpu_centicores: 0,
        owner_share_memory_mib: 512,
        owner_share_disk_gib: 0,
    }
}

async fn start_market(hosts: &[&str]) -> Market {
    let dir = tempfile::tempdir().unwrap();
    let clock = SimulatedClock::starting_at(START_MS);
    let broker = leasehold_broker::start(config(dir.path().join("broker"), &clock))
        .await
        .unwrap();
    let admin = Client::new(&broker.url(), broker.bootstrap_admin_token.clone());
    let lender_token = admin
        .create_principal("owner", Role::Lender)
        .await
        .unwrap()
        .token;
    let borrower_token = admin
        .create_principal("ops", Role::Borrower)
        .await
        .unwrap()
        .token;
    let lender = Client::new(&broker.url(), Some(lender_token));
    let borrower = Client::new(&broker.url(), Some(borrower_token));
    for host in hosts {
        let request = RegisterHostRequest {
            share: None,
            agent_url: None,
            capacity: capacity(),
        };
        lender.register_host(host, &request).await.unwrap();
    }
    Market {
        clock,
        broker,
        admin,
        lender,
        borrower,
        dir,
    }
}

fn instance(name: &str, vcpus: u32, memory_mib: u64) -> InstanceSpec {
    InstanceSpec {
        name: name.into(),
        vcpus,
        memory_mib,
        disk_gib: 1,
        image: None,
    }
}

fn workload(
    name: &str,
    priority: i64,
    start_ms: u64,
    instances: Vec<InstanceSpec>,
    rules: Vec<PlacementRule>,
) -> WorkloadFile {
    WorkloadFile {
        name: name.into(),
        priority,
        start: rfc3339_from_ms(start_ms),
        end: rfc3339_from_ms(start_ms + 3600 * SECOND_MS),
        instances,
        rules,
    }
}

impl Market {
    async fn sample(&self, host: &str, owner_memory_mib: u64) -> Capacity {
        let request = HostSampleRequest {
            owner_used: Capacity::new(100, owner_memory_mib, 0),
        };
        self.lender
            .post_host_sample(host, &request)
            .await
            .unwrap()
            .guaranteed
    }

    /// One interval: the clock moves, the host samples, a round runs.
    async fn tick(&self, samples: &[(&str, u64)]) {
        self.clock.advance_ms(SECOND_MS);
        for (host, owner_mib) in samples {
            self.sample(host, *owner_mib).await;
        }
        self.admin.plan_now().await.unwrap();
    }

    async fn acquired_mib(&self, instance: &str) -> (u64, PoolPhase, String) {
        let pools = self.borrower.list_pools().await.unwrap();
        let pool = pools
            .pools
            .iter()
            .filter(|p| p.instances.iter().any(|i| i == instance))
            .max_by_key(|p| p.acquired.memory_mib + p.allocated.memory_mib)
            .expect("a pool for the instance");
        (
            pool.acquired.memory_mib + pool.allocated.memory_mib,
            pool.phase,
            pool.host_id.clone(),
        )
    }
}

/// The owner uses 7 GiB for 10 s, then gives back 1 GiB every 4 s down to
/// 1 GiB: the check's scenario, on a simulated clock.
fn owner_mib_at(second: u64) -> u64 {
    match second {
        0..=9 => 7168,
        10..=13 => 6144,
        14..=17 => 5120,
        18..=21 => 4096,
        22..=25 => 3072,
        26..=29 => 2048,
        _ => 1024,
    }
}

#[tokio::test]
async fn a_temporary_shortage_ramps_in_steps_never_above_what_is_free_and_completes_by_the_start() {
    let market = start_market(&["h1"]).await;
    let start_ms = START_MS + 40 * SECOND_MS;
    market.sample("h1", owner_mib_at(0)).await;
    let file = workload("ramp", 10, start_ms, vec![instance("big", 1, 6144)], vec![]);
    let applied = market.borrower.apply_workload(&file).await.unwrap();
    assert_eq!(applied.owner, "ops");
    let mut seen = Vec::new();
    for second in 1..=42 {
        market.tick(&[("h1", owner_mib_at(second))]).await;
        let (acquired, phase, _) = market.acquired_mib("big").await;
        let free = TOTAL_MIB - owner_mib_at(second);
        assert!(
            acquired <= free,
            "second {second}: {acquired} MiB held, {free} MiB free"
        );
        assert!(acquired <= 6144);
        seen.push((second, acquired, phase));
    }
    let distinct: std::collections::BTreeSet<u64> =
        seen.iter().map(|s| s.1).filter(|a| *a > 0).collect();
    assert!(distinct.len() >= 3, "a ramp in steps: {seen:?}");
    let done = seen.iter().find(|s| s.1 == 6144).expect("complete");
    assert!(done.0 < 40, "complete before the start: {seen:?}");
    assert_eq!(
        seen.last().unwrap().2,
        PoolPhase::HandedOver,
        "handed over at the start"
    );
    let shown = market.borrower.get_workload("ramp").await.unwrap();
    assert_eq!(shown.instances[0].status, InstanceStatus::Running);
    // FIG. 5: the held capacity is out of what is not yet acquired.
    let hosts = market.admin.host_capacity().await.unwrap();
    assert_eq!(hosts[0].held.memory_mib, 6144);
    assert_eq!(
        hosts[0].not_yet_acquired.unwrap().memory_mib,
        TOTAL_MIB - 1024 - 6144
    );
    // The owner is told to stay out of it.
    assert_eq!(market.sample("h1", 1024).await.memory_mib, 6144);
}

#[tokio::test]
async fn an_instance_larger_than_any_host_and_one_not_reachable_by_its_start_are_warned() {
    let market = start_market(&["h1"]).await;
    market.sample("h1", 7168).await;
    market.clock.advance_ms(SECOND_MS);
    market.sample("h1", 7168).await;
    let soon = START_MS + 5 * SECOND_MS;
    let huge = workload("huge", 1, soon, vec![instance("huge-1", 64, 256)], vec![]);
    market.borrower.apply_workload(&huge).await.unwrap();
    let slow = workload("slow", 1, soon, vec![instance("slow-1", 1, 6144)], vec![]);
    market.borrower.apply_workload(&slow).await.unwrap();
    market.admin.plan_now().await.unwrap();
    let warnings = market.borrower.warnings().await.unwrap();
    let huge_warning = warnings
        .iter()
        .find(|w| w.instances == ["huge-1"])
        .expect("huge warned");
    assert_eq!(huge_warning.reason, WarningReason::LargerThanAnyHost);
    assert_eq!(huge_warning.earliest_start_ms, None);
    // 4 vCPUs, less the owner's 1 and the 1 the slow instance's pool took.
    assert_eq!(huge_warning.largest_guarantee.cpu_centicores, 200);
    let slow_warning = warnings
        .iter()
        .find(|w| w.instances == ["slow-1"])
        .expect("slow warned");
    assert_eq!(slow_warning.reason, WarningReason::NotByStart);
    // The owner's use is flat: no trend reaches 6 GiB; 1 GiB is free.
    assert_eq!(slow_warning.earliest_start_ms, None);
    assert_eq!(slow_warning.largest_guarantee.memory_mib, 1024);
    // The lender sees no workload; another borrower sees no warning.
    assert!(market.lender.warnings().await.unwrap().is_empty());
}

#[tokio::test]
async fn the_higher_priority_workload_gets_its_capacity_first() {
    let market = start_market(&["h1"]).await;
    market.sample("h1", 7168).await;
    let start_ms = START_MS + 60 * SECOND_MS;
    let low = workload("low", 1, start_ms, vec![instance("low-1", 1, 3072)], vec![]);
    let high = workload(
        "high",
        9,
        start_ms,
        vec![instance("high-1", 1, 3072)],
        vec![],
    );
    market.borrower.apply_workload(&low).await.unwrap();
    market.borrower.apply_workload(&high).await.unwrap();
    for second in 1..=30 {
        market.tick(&[("h1", owner_mib_at(second))]).await;
        let (high_mib, _, _) = market.acquired_mib("high-1").await;
        let low_mib = market
            .borrower
            .list_pools()
            .await
            .unwrap()
            .pools
            .iter()
            .filter(|p| p.workload == "low")
            .map(|p| p.acquired.memory_mib)
            .sum::<u64>();
        if low_mib > 0 {
            assert_eq!(
                high_mib, 3072,
                "second {second}: low got {low_mib} MiB before high was full"
            );
        }
    }
    assert_eq!(market.acquired_mib("low-1").await.0, 3072);
}

#[tokio::test]
async fn spread_and_pack_are_honoured_and_deletion_gives_the_capacity_back() {
    let market = start_market(&["h1", "h2", "h3"]).await;
    for host in ["h1", "h2", "h3"] {
        market.sample(host, 1024).await;
    }
    let file = workload(
        "web",
        5,
        START_MS + 600 * SECOND_MS,
        vec![
            instance("a", 1, 512),
            instance("b", 1, 512),
            instance("c", 1, 512),
            instance("d", 1, 512),
        ],
        vec![
            PlacementRule {
                kind: RuleKind::Spread,
                instances: vec!["a".into(), "b".into()],
            },
            PlacementRule {
                kind: RuleKind::Pack,
                instances: vec!["c".into(), "d".into()],
            },
        ],
    );
    market.borrower.apply_workload(&file).await.unwrap();
    market
        .tick(&[("h1", 1024), ("h2", 1024), ("h3", 1024)])
        .await;
    let pools = market.borrower.list_pools().await.unwrap();
    let host_of = |name: &str| {
        pools
            .links
            .iter()
            .find(|l| l.instance == name)
            .unwrap()
            .host_id
            .clone()
    };
    assert_ne!(host_of("a"), host_of("b"));
    assert_eq!(host_of("c"), host_of("d"));
    let pack = pools
        .pools
        .iter()
        .find(|p| p.instances == ["c", "d"])
        .expect("one pool for the pack");
    assert_eq!(pack.target.memory_mib, 1024);
    // An impossible rule set is refused with the reason.
    let mut bad = file.clone();
    bad.name = "bad".into();
    bad.instances
        .iter_mut()
        .for_each(|i| i.name = format!("x{}", i.name));
    bad.rules = vec![
        PlacementRule {
            kind: RuleKind::Pack,
            instances: vec!["xa".into(), "xb".into()],
        },
        PlacementRule {
            kind: RuleKind::Spread,
            instances: vec!["xb".into(), "xa".into()],
        },
    ];
    let error = market.borrower.apply_workload(&bad).await.unwrap_err();
    assert_eq!(error.status(), Some(400));
    assert_eq!(
        error.detail().unwrap().field.as_deref(),
        Some("rule[1].instances")
    );
    // Deleting instance a gives its pool back; the rest stay.
    market.borrower.delete_instance("a").await.unwrap();
    let pools = market.borrower.list_pools().await.unwrap();
    assert!(pools.links.iter().all(|l| l.instance != "a"));
    assert!(pools.links.iter().any(|l| l.instance == "b"));
    let missing = market.borrower.delete_instance("a").await.unwrap_err();
    assert_eq!(missing.status(), Some(404));
    market.borrower.delete_workload("web").await.unwrap();
    assert!(market.admin.list_pools().await.unwrap().pools.is_empty());
    let hosts = market.admin.host_capacity().await.unwrap();
    assert!(hosts.iter().all(|h| h.held.is_zero()));
}

#[tokio::test]
async fn pools_survive_a_restart_and_partitions_cannot_take_what_they_hold() {
    let mut market = start_market(&["h1"]).await;
    market.sample("h1", 1024).await;
    let file = workload(
        "keep",
        1,
        START_MS + 600 * SECOND_MS,
        vec![instance("k", 1, 1024)],
        vec![],
    );
    market.borrower.apply_workload(&file).await.unwrap();
    market.tick(&[("h1", 1024)]).await;
    assert_eq!(market.acquired_mib("k").await.0, 1024);
    // 8192 - 512 owner share - 1024 held = 6656 lendable: 7000 does not fit.
    let too_big = Terms {
        vcpus: 1,
        cpu_cap_percent: 100,
        memory_mib: 7000,
        disk_gib: 1,
        images: vec!["busybox".into()],
        price_per_hour_micros: 1,
        isolation: None,
    };
    let error = market
        .lender
        .register_partition("h1", 1, &RegisterPartitionRequest { terms: too_big })
        .await
        .unwrap_err();
    assert_eq!(error.status(), Some(400), "{error}");
    assert!(error.to_string().contains("6656 lendable"), "{error}");
    let data_dir = market.dir.path().join("broker");
    market.broker.shutdown().await;
    // The binary runs with umask 077; this test process does not.
    for name in ["broker.db", "broker.db-wal", "broker.db-shm"] {
        use std::os::unix::fs::PermissionsExt;
        let _ =
            std::fs::set_permissions(data_dir.join(name), std::fs::Permissions::from_mode(0o600));
    }
    market.broker = leasehold_broker::start(config(data_dir, &market.clock))
        .await
        .unwrap();
    let borrower = market.borrower.with_base_url(&market.broker.url());
    let pools = borrower.list_pools().await.unwrap();
    assert_eq!(pools.pools.len(), 1);
    assert_eq!(
        pools.pools[0].acquired.memory_mib + pools.pools[0].allocated.memory_mib,
        1024
    );
    assert_eq!(
        borrower.get_workload("keep").await.unwrap().instances[0].status,
        InstanceStatus::Guaranteed
    );
}

/// What `instance`'s demand holds on each host (acquired + allocated).
async fn held_by_host(market: &Market, instance: &str) -> std::collections::BTreeMap<String, u64> {
    let pools = market.admin.list_pools().await.unwrap();
    let mut held = std::collections::BTreeMap::new();
    for pool in pools
        .pools
        .iter()
        .filter(|p| p.instances.iter().any(|i| i == instance))
    {
        *held.entry(pool.host_id.clone()).or_insert(0) +=
            pool.acquired.memory_mib + pool.allocated.memory_mib;
    }
    held
}

#[tokio::test]
async fn migration_keeps_the_guarantee_until_the_destination_holds_it_all() {
    let market = start_market(&["h1", "h2"]).await;
    market.sample("h1", 1024).await;
    market.sample("h2", 7168).await;
    let start_ms = START_MS + 3 * SECOND_MS;
    let file = workload("svc", 1, start_ms, vec![instance("m", 1, 4096)], vec![]);
    market.borrower.apply_workload(&file).await.unwrap();
    for _ in 0..6 {
        market.tick(&[("h1", 1024), ("h2", 7168)]).await;
    }
    assert_eq!(
        held_by_host(&market, "m").await,
        [("h1".to_string(), 4096)].into()
    );
    assert_eq!(market.acquired_mib("m").await.1, PoolPhase::HandedOver);
    market.borrower.migrate_instance("m", "h2").await.unwrap();
    // h2's owner frees memory slowly: the old pool keeps the whole guarantee
    // meanwhile, and the switch happens in one round.
    let mut owner_h2 = 7168;
    let mut switched = false;
    for _ in 0..30 {
        owner_h2 = (owner_h2 - 512).max(1024);
        market.tick(&[("h1", 1024), ("h2", owner_h2)]).await;
        let held = held_by_host(&market, "m").await;
        let on_h1 = held.get("h1").copied().unwrap_or(0);
        let on_h2 = held.get("h2").copied().unwrap_or(0);
        assert!(
            on_h1 == 4096 || on_h2 == 4096,
            "the guarantee lapsed: {held:?}"
        );
        if on_h1 == 0 {
            switched = true;
            break;
        }
    }
    assert!(switched, "moved to h2");
    let (_, phase, host) = market.acquired_mib("m").await;
    assert_eq!((phase, host.as_str()), (PoolPhase::HandedOver, "h2"));
    let error = market
        .borrower
        .migrate_instance("m", "h2")
        .await
        .unwrap_err();
    assert_eq!(error.detail().unwrap().field.as_deref(), Some("to"));
}

#[tokio::test]
async fn power_saving_empties_the_least_used_host_but_not_one_a_start_soon_needs() {
    let market = start_market(&["h1", "h2", "h3"]).await;
    for host in ["h1", "h2", "h3"] {
        market.sample(host, 1024).await;
    }
    let now_start = START_MS + 2 * SECOND_MS;
    // h1: a running instance; h3: a pool for a start in 10 minutes.
    let running = workload("run", 1, now_start, vec![instance("r", 1, 1024)], vec![]);
    market.borrower.apply_workload(&running).await.unwrap();
    market
        .tick(&[("h1", 1024), ("h2", 1024), ("h3", 1024)])
        .await;
    let on = market.acquired_mib("r").await.2;
    let later = workload(
        "later",
        1,
        START_MS + 600 * SECOND_MS,
        vec![instance("l", 1, 2048)],
        vec![],
    );
    market.borrower.apply_workload(&later).await.unwrap();
    for _ in 0..3 {
        market
            .tick(&[("h1", 1024), ("h2", 1024), ("h3", 1024)])
            .await;
    }
    let soon_host = market.acquired_mib("l").await.2;
    assert_ne!(on, soon_host);
    let saved = market
        .admin
        .power_save(&leasehold_api::PowerSaveRequest::default())
        .await
        .unwrap();
    // The empty host goes first.
    let empty: Vec<&str> = ["h1", "h2", "h3"]
        .into_iter()
        .filter(|h| *h != on && *h != soon_host)
        .collect();
    assert_eq!(saved.host_id.as_deref(), Some(empty[0]));
    assert_eq!(saved.instances_moving, 0);
    // Then the host of the running instance: it moves, its guarantee kept.
    let saved = market
        .admin
        .power_save(&leasehold_api::PowerSaveRequest::default())
        .await
        .unwrap();
    assert_eq!(saved.host_id.as_deref(), Some(on.as_str()));
    assert_eq!(saved.instances_moving, 1);
    for _ in 0..3 {
        market
            .tick(&[("h1", 1024), ("h2", 1024), ("h3", 1024)])
            .await;
        let held = held_by_host(&market, "r").await;
        assert!(held.values().any(|v| *v == 1024), "{held:?}");
    }
    let (_, phase, host) = market.acquired_mib("r").await;
    assert_eq!(
        (phase, host.as_str()),
        (PoolPhase::HandedOver, soon_host.as_str())
    );
    // The host a start in ten minutes needs is not powered down.
    let saved = market
        .admin
        .power_save(&leasehold_api::PowerSaveRequest::default())
        .await
        .unwrap();
    assert_eq!(saved.host_id, None);
    let hosts = market.admin.host_capacity().await.unwrap();
    assert_eq!(hosts.iter().filter(|h| h.powered_down).count(), 2);
    market.admin.power_up(empty[0]).await.unwrap();
    let hosts = market.admin.host_capacity().await.unwrap();
    assert_eq!(hosts.iter().filter(|h| h.powered_down).count(), 1);
}

#[tokio::test]
async fn a_powered_down_host_is_woken_early_enough_for_a_start_that_needs_it() {
    let market = start_market(&["h1"]).await;
    market.sample("h1", 1024).await;
    let saved = market
        .admin
        .power_save(&leasehold_api::PowerSaveRequest::default())
        .await
        .unwrap();
    assert_eq!(saved.host_id.as_deref(), Some("h1"));
    // 6144 MiB in steps of 1920 (a quarter of 7680 lendable): 4 steps.
    let start_ms = START_MS + 20 * SECOND_MS;
    let file = workload("wake", 1, start_ms, vec![instance("w", 1, 6144)], vec![]);
    market.borrower.apply_workload(&file).await.unwrap();
    let mut woke_at = None;
    for second in 1..=20 {
        market.tick(&[("h1", 1024)]).await;
        let down = market.admin.host_capacity().await.unwrap()[0].powered_down;
        if !down && woke_at.is_none() {
            woke_at = Some(second);
        }
    }
    let woke_at = woke_at.expect("woken");
    assert!(
        woke_at > 5,
        "not woken long before it was needed: second {woke_at}"
    );
    assert_eq!(
        market.acquired_mib("w").await.0,
        6144,
        "complete by the start"
    );
}

fn partition_terms() -> Terms {
    Terms {
        vcpus: 1,
        cpu_cap_percent: 100,
        memory_mib: 256,
        disk_gib: 1,
        images: vec!["busybox".into()],
        // One milli-unit (1,000 micros) per second.
        price_per_hour_micros: 3_600_000,
        isolation: None,
    }
}

fn booked(partition: &str, start_ms: u64, end_ms: u64) -> leasehold_api::LeaseRequest {
    leasehold_api::LeaseRequest {
        partition: Some(partition.into()),
        best: None,
        allow_unisolated: true,
        start: Some(rfc3339_from_ms(start_ms)),
        end: Some(rfc3339_from_ms(end_ms)),
    }
}

#[tokio::test]
async fn a_lease_booked_ahead_is_billed_from_its_start_to_its_end_and_released_at_its_end() {
    let market = start_market(&["h1"]).await;
    for index in [1, 2] {
        let request = RegisterPartitionRequest {
            terms: partition_terms(),
        };
        market
            .lender
            .register_partition("h1", index, &request)
            .await
            .unwrap();
    }
    // Released before its start: nothing to pay.
    let early = market
        .borrower
        .lease(&booked(
            "h1/1",
            START_MS + 60 * SECOND_MS,
            START_MS + 120 * SECOND_MS,
        ))
        .await
        .unwrap();
    market.clock.advance_ms(30 * SECOND_MS);
    let receipt = market.borrower.release(early.lease_id).await.unwrap();
    assert_eq!(
        (receipt.bill.billable_seconds, receipt.bill.charge_micros),
        (0, 0)
    );
    // Booked from +60 s to +100 s: billed 40 s, released by the broker at
    // the end even though the borrower never released it.
    let window = market
        .borrower
        .lease(&booked(
            "h1/2",
            START_MS + 60 * SECOND_MS,
            START_MS + 100 * SECOND_MS,
        ))
        .await
        .unwrap();
    assert_eq!(window.started_at_ms, START_MS + 60 * SECOND_MS);
    // The partition is held: another borrower cannot take it meanwhile.
    let error = market
        .borrower
        .lease(&booked(
            "h1/2",
            START_MS + 200 * SECOND_MS,
            START_MS + 300 * SECOND_MS,
        ))
        .await
        .unwrap_err();
    assert_eq!(error.status(), Some(409));
    market.clock.advance_ms(200 * SECOND_MS);
    market.admin.plan_now().await.unwrap();
    let after = market.borrower.get_lease(window.lease_id).await.unwrap();
    assert_eq!(after.charge_micros, Some(40_000), "{after:?}");
    // Bad windows are refused naming the field.
    let backwards = booked(
        "h1/1",
        START_MS + 500 * SECOND_MS,
        START_MS + 400 * SECOND_MS,
    );
    let error = market.borrower.lease(&backwards).await.unwrap_err();
    assert_eq!(error.detail().unwrap().field.as_deref(), Some("end"));
    let past = booked("h1/1", START_MS, START_MS + 900 * SECOND_MS);
    let error = market.borrower.lease(&past).await.unwrap_err();
    assert_eq!(error.detail().unwrap().field.as_deref(), Some("start"));
    let mut half = booked(
        "h1/1",
        START_MS + 500 * SECOND_MS,
        START_MS + 600 * SECOND_MS,
    );
    half.end = None;
    let error = market.borrower.lease(&half).await.unwrap_err();
    assert_eq!(error.detail().unwrap().field.as_deref(), Some("end"));
}

#[tokio::test]
async fn a_gradual_hand_over_moves_the_capacity_a_step_at_a_time_and_the_sum_never_changes() {
    let dir = tempfile::tempdir().unwrap();
    let clock = SimulatedClock::starting_at(START_MS);
    let mut config = config(dir.path().join("broker"), &clock);
    config.plan_policy.gradual_handover = true;
    let broker = leasehold_broker::start(config).await.unwrap();
    let admin = Client::new(&broker.url(), broker.bootstrap_admin_token.clone());
    let lender = Client::new(
        &broker.url(),
        Some(
            admin
                .create_principal("owner", Role::Lender)
                .await
                .unwrap()
                .token,
        ),
    );
    let borrower = Client::new(
        &broker.url(),
        Some(
            admin
                .create_principal("ops", Role::Borrower)
                .await
                .unwrap()
                .token,
        ),
    );
    lender
        .register_host(
            "h1",
            &RegisterHostRequest {
                share: None,
                agent_url: None,
                capacity: capacity(),
            },
        )
        .await
        .unwrap();
    let market = Market {
        clock,
        broker,
        admin,
        lender,
        borrower,
        dir,
    };
    market.sample("h1", 1024).await;
    let file = workload(
        "slow-start",
        1,
        START_MS + 10 * SECOND_MS,
        vec![instance("g", 1, 6144)],
        vec![],
    );
    market.borrower.apply_workload(&file).await.unwrap();
    let mut allocations = Vec::new();
    for _ in 0..16 {
        market.tick(&[("h1", 1024)]).await;
        let pools = market.admin.list_pools().await.unwrap();
        let pool = &pools.pools[0];
        if pool.phase != PoolPhase::Acquiring {
            // From the choice on, what the pool and its instance hold
            // together is the whole target, every round.
            assert_eq!(
                pool.acquired.memory_mib + pool.allocated.memory_mib,
                6144,
                "{pool:?}"
            );
        }
        allocations.push(pool.allocated.memory_mib);
    }
    // Steps of 1920 MiB (a quarter of the 7680 lendable) from the start.
    let rising: Vec<u64> = allocations
        .iter()
        .copied()
        .filter(|a| *a > 0)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(rising, vec![1920, 3840, 5760, 6144], "{allocations:?}");
    assert_eq!(market.acquired_mib("g").await.1, PoolPhase::HandedOver);
}

#[tokio::test]
async fn a_workload_of_a_thousand_instances_is_taken_and_a_larger_body_refused() {
    let market = start_market(&["h1"]).await;
    let instances: Vec<InstanceSpec> = (0..1000)
        .map(|i| instance(&format!("instance-{i:04}"), 1, 64))
        .collect();
    let file = workload("wide", 1, START_MS + 3_600_000, instances, vec![]);
    let applied = market.borrower.apply_workload(&file).await.unwrap();
    assert_eq!(applied.instances.len(), 1000);
    let mut too_big = file.clone();
    too_big.name = "too-big".into();
    too_big.instances = (0..4000)
        .map(|i| instance(&format!("padding-instance-name-{i:05}"), 1, 64))
        .collect();
    let error = market.borrower.apply_workload(&too_big).await.unwrap_err();
    assert_eq!(error.status(), Some(413), "{error}");
}
