use super::*;
use leasehold_service::SimulatedClock;
use std::collections::BTreeMap;

fn capacity(cpus: u64) -> HostCapacity {
    HostCapacity {
        cpu_centicores: cpus * 100,
        memory_mib: 4096,
        disk_gib: 10,
        owner_share_cpu_centicores: 0,
        owner_share_memory_mib: 0,
        owner_share_disk_gib: 0,
    }
}

fn config(
    store: BrokerDatabase,
    owned: Option<u32>,
    dir: &std::path::Path,
    host: &str,
) -> RightsConfig {
    RightsConfig {
        group: "g".into(),
        mode: GroupMode::Centralized,
        store: Some(store),
        owned_rights: owned,
        copy_path: dir.join(format!("{host}-copy.json")),
        loans_path: dir.join(format!("{host}-loans.sqlite")),
        standby: false,
        seize_after_ms: DEFAULT_SEIZE_AFTER_MS,
        auto_request: Some(workload::AutoRequest {
            above_percent: 90,
            after_ms: 60_000,
        }),
    }
}

async fn join(
    store: &BrokerDatabase,
    owned: Option<u32>,
    dir: &std::path::Path,
    host: &str,
    cpus: u64,
    clock: &SimulatedClock,
) -> RightsManager {
    let unused_broker = leasehold_api::Client::new("http://127.0.0.1:9", None);
    RightsManager::join(
        config(store.clone(), owned, dir, host),
        host,
        &capacity(cpus),
        &format!("http://{host}"),
        &unused_broker,
        clock.shared(),
        unused_broker.clone(),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn two_managers_join_one_group_through_the_shared_store_and_a_rejoin_keeps_the_rights() {
    let dir = tempfile::tempdir().unwrap();
    let clock = SimulatedClock::starting_at(1_000);
    let store = BrokerDatabase::Sqlite(dir.path().join("group.db"));
    let first = join(&store, Some(4), dir.path(), "h1", 6, &clock).await;
    let second = join(&store, None, dir.path(), "h2", 2, &clock).await;
    let (table, _) = first.fresh().await.unwrap();
    assert_eq!(table.hosts.len(), 2, "each saw the other's write");
    let h1 = &table.hosts["h1"].partitions[&OWNER_SHARE_PARTITION];
    assert_eq!(
        (h1.modules, h1.permanent, h1.active, h1.inactive()),
        (6, 4, 4, 2)
    );
    let h2 = &table.hosts["h2"].partitions[&OWNER_SHARE_PARTITION];
    assert_eq!((h2.modules, h2.permanent), (2, 0), "no rights unless given");
    assert_eq!(
        first.applied().active[&0],
        4,
        "the manager switched its modules on"
    );
    // h2 gets one right by an admin's grant; h1's manager writes it.
    first
        .update(None, |g, now| {
            let slot = leasehold_core::rights::Slot::new("h2", 0);
            g.grant(&slot, 1, None, now)?;
            g.activate(&slot, 1, now)
        })
        .await
        .unwrap();
    // The second manager applies the table at its next sync.
    assert_eq!(second.sync(0).await.unwrap().active[&0], 1);
    // A manager that comes back (or its stand-by) finds its rights as they
    // are, and records where it listens now.
    let again = join(&store, Some(2), dir.path(), "h2", 2, &clock).await;
    let (table, _) = again.fresh().await.unwrap();
    assert_eq!(table.hosts["h2"].partitions[&0].permanent, 1);
    assert_eq!(table.total_rights(clock.shared().now_ms()), 5);
}

fn slot(host: &str, partition: u32) -> leasehold_core::rights::Slot {
    leasehold_core::rights::Slot::new(host, partition)
}

/// Two managers on one SQLite store and one simulated clock; `h2` owns
/// `h2_rights` rights, active.
async fn pair(
    dir: &std::path::Path,
    clock: &SimulatedClock,
    h2_rights: u32,
) -> (RightsManager, RightsManager) {
    let store = BrokerDatabase::Sqlite(dir.join("group.db"));
    let first = join(&store, Some(2), dir, "h1", 8, clock).await;
    let second = join(&store, Some(h2_rights), dir, "h2", 8, clock).await;
    (first, second)
}

async fn add_partition(manager: &RightsManager, host: &str, index: u32) {
    manager
        .update(None, |g, _| g.add_partition(host, index))
        .await
        .unwrap();
}

/// `h1` alone in its group on an SQLite store: 8 modules, 4 rights in its
/// owner share, and partition 1 without any.
async fn lone_host_with_a_partition(
    dir: &std::path::Path,
    clock: &SimulatedClock,
) -> (BrokerDatabase, RightsManager) {
    let store = BrokerDatabase::Sqlite(dir.join("group.db"));
    let manager = join(&store, Some(4), dir, "h1", 8, clock).await;
    add_partition(&manager, "h1", 1).await;
    (store, manager)
}

fn nothing() -> std::collections::BTreeSet<u32> {
    std::collections::BTreeSet::new()
}

#[tokio::test]
async fn a_silent_hosts_rights_are_seized_and_it_switches_its_modules_off_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let clock = SimulatedClock::starting_at(1_000);
    let (first, second) = pair(dir.path(), &clock, 4).await;
    assert_eq!(second.applied().active[&0], 4);
    first.tick(&nothing()).await.unwrap();
    let (group, _) = first.fresh().await.unwrap();
    assert_eq!(group.primary_host.as_deref(), Some("h1"));
    let total = group.total_rights(clock.shared().now_ms());
    // Within the grace period nothing happens to the silent h2.
    clock.advance_ms(HOST_LEASE_TTL_MS + 1);
    first.tick(&nothing()).await.unwrap();
    assert_eq!(
        first.fresh().await.unwrap().0.hosts["h2"].partitions[&0].permanent,
        4
    );
    // Beyond it, its rights go to h1 (the only other host).
    clock.advance_ms(DEFAULT_SEIZE_AFTER_MS);
    first.tick(&nothing()).await.unwrap();
    let (group, _) = first.fresh().await.unwrap();
    let now_ms = clock.shared().now_ms();
    assert_eq!(group.hosts["h2"].partitions[&0].rights(now_ms), 0);
    assert_eq!(group.hosts["h1"].partitions[&0].rights(now_ms), 6);
    assert_eq!(group.total_rights(now_ms), total, "seized, not lost");
    // h2 comes back: before anything else, its modules go off.
    drop(second);
    let store = BrokerDatabase::Sqlite(dir.path().join("group.db"));
    let returned = join(&store, None, dir.path(), "h2", 8, &clock).await;
    assert_eq!(returned.applied().active[&0], 0);
    let (group, _) = returned.fresh().await.unwrap();
    assert_eq!(group.hosts["h2"].partitions[&0].active, 0);
}

#[tokio::test]
async fn temporary_rights_expire_on_the_simulated_clock_and_their_modules_go_off() {
    let dir = tempfile::tempdir().unwrap();
    let clock = SimulatedClock::starting_at(1_000);
    let (first, _second) = pair(dir.path(), &clock, 0).await;
    let expires_at_ms = clock.shared().now_ms() + 60_000;
    first
        .update(None, |g, now| {
            g.grant(&slot("h1", 0), 3, Some(expires_at_ms), now)?;
            g.activate(&slot("h1", 0), 3, now)
        })
        .await
        .unwrap();
    assert_eq!(first.applied().active[&0], 5);
    clock.advance_ms(59_999);
    first.tick(&nothing()).await.unwrap();
    assert_eq!(first.applied().active[&0], 5, "not yet");
    clock.advance_ms(1);
    first.tick(&nothing()).await.unwrap();
    assert_eq!(
        first.applied().active[&0],
        2,
        "the temporary modules went off"
    );
    let (group, _) = first.fresh().await.unwrap();
    let owner = &group.hosts["h1"].partitions[&0];
    assert!(owner.temporary.is_empty());
    assert_eq!((owner.permanent, owner.active), (2, 2));
}

#[tokio::test]
async fn a_revived_old_primarys_orders_are_refused_by_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let clock = SimulatedClock::starting_at(1_000);
    let (first, second) = pair(dir.path(), &clock, 4).await;
    first.tick(&nothing()).await.unwrap();
    // h1 stalls (a pause, a partition); its lease lapses and h2 leads.
    clock.advance_ms(super::flow::PRIMARY_LEASE_TTL_MS + 1);
    second.tick(&nothing()).await.unwrap();
    let (group, _) = second.fresh().await.unwrap();
    assert_eq!(
        (group.primary_host.as_deref(), group.primary_epoch),
        (Some("h2"), 2)
    );
    let before = group.clone();
    // h1 wakes up still believing it leads at epoch 1: refused, nothing moves.
    let order = first.coordinate(&slot("h1", 0), 1, 1).await;
    assert!(
        matches!(order, Err(AgentError::RightsConflict(_))),
        "{order:?}"
    );
    assert_eq!(second.fresh().await.unwrap().0, before);
}

#[tokio::test]
async fn a_request_the_host_can_meet_never_reaches_another_manager() {
    let dir = tempfile::tempdir().unwrap();
    let clock = SimulatedClock::starting_at(1_000);
    // h2's manager is at an address nothing answers on: a request that
    // needed it would fail.
    let (first, _second) = pair(dir.path(), &clock, 4).await;
    add_partition(&first, "h1", 1).await;
    let answer = first.request(slot("h1", 1), 2, "token").await.unwrap();
    // FIG. 4B: committed in the manager's own database, modules on, and
    // the group's store not written yet.
    assert_eq!(
        (answer.lent_inside_host.len(), answer.committed.len()),
        (1, 0)
    );
    assert_eq!(first.applied().active[&1], 2, "switched on at once");
    let (group, _) = first.fresh().await.unwrap();
    assert_eq!(
        group.hosts["h1"].partitions[&1].active, 0,
        "not published yet"
    );
    first.publish_local_loans().await.unwrap();
    let (group, _) = first.fresh().await.unwrap();
    assert_eq!(group.hosts["h1"].partitions[&1].active, 2);
    assert_eq!(group.hosts["h1"].partitions[&0].permanent, 0);
    assert_eq!(group.hosts["h2"].partitions[&0].permanent, 4, "untouched");
    assert!(first.pending_loans().is_empty());
}

#[tokio::test]
async fn a_loan_inside_the_host_survives_a_crash_before_it_is_published_and_is_published_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = SimulatedClock::starting_at(1_000);
    let (store, first) = lone_host_with_a_partition(dir.path(), &clock).await;
    let lent = first.request(slot("h1", 1), 3, "token").await.unwrap();
    let back = first.release(slot("h1", 1), 1).await.unwrap();
    assert_eq!(lent.lent_inside_host.len() + back.lent_inside_host.len(), 2);
    // The manager dies before publishing; its successor (a restart or
    // its stand-by) finds both loans in the host's database.
    drop(first);
    let again = join(&store, Some(4), dir.path(), "h1", 8, &clock).await;
    assert_eq!(again.pending_loans().len(), 2);
    assert_eq!(again.applied().active[&1], 2, "what was lent stays on");
    again.publish_local_loans().await.unwrap();
    let (table, _) = again.fresh().await.unwrap();
    let rows = &table.hosts["h1"].partitions;
    assert_eq!((rows[&0].permanent, rows[&1].permanent), (2, 2));
    assert_eq!(rows[&1].active, 2);
    assert_eq!(table.total_rights(clock.shared().now_ms()), 4);
    // Publishing again (another restart) applies nothing twice.
    drop(again);
    let third = join(&store, Some(4), dir.path(), "h1", 8, &clock).await;
    third.publish_local_loans().await.unwrap();
    assert_eq!(
        third.fresh().await.unwrap().0.hosts["h1"],
        table.hosts["h1"]
    );
    third.tick(&[1].into()).await.unwrap();
    assert!(third.pending_loans().is_empty(), "forgotten once published");
}

#[tokio::test]
async fn a_partition_busy_beyond_the_threshold_for_long_enough_gets_one_more_module() {
    let dir = tempfile::tempdir().unwrap();
    let clock = SimulatedClock::starting_at(1_000);
    let (first, _second) = pair(dir.path(), &clock, 0).await;
    // h1: the owner share has 2 rights, partition 1 three idle ones.
    first
        .update(None, |g, now| {
            g.add_partition("h1", 1)?;
            g.grant(&slot("h1", 1), 3, None, now)
        })
        .await
        .unwrap();
    let busy: BTreeMap<u32, u32> = [(0, 100), (1, 0)].into();
    assert!(first
        .observe_workloads(&busy, "t")
        .await
        .unwrap()
        .is_empty());
    let (group, _) = first.fresh().await.unwrap();
    assert_eq!(
        group.hosts["h1"].partitions[&0].workload_percent, 100,
        "written"
    );
    clock.advance_ms(30_000);
    assert!(
        first
            .observe_workloads(&busy, "t")
            .await
            .unwrap()
            .is_empty(),
        "not long enough"
    );
    // A quiet tick restarts the wait.
    let quiet: BTreeMap<u32, u32> = [(0, 50), (1, 0)].into();
    first.observe_workloads(&quiet, "t").await.unwrap();
    clock.advance_ms(30_000);
    assert!(first
        .observe_workloads(&busy, "t")
        .await
        .unwrap()
        .is_empty());
    clock.advance_ms(60_000);
    assert_eq!(first.observe_workloads(&busy, "t").await.unwrap(), vec![0]);
    first.publish_local_loans().await.unwrap();
    let (group, _) = first.fresh().await.unwrap();
    let owner = &group.hosts["h1"].partitions[&0];
    assert_eq!(
        (owner.rights(clock.shared().now_ms()), owner.active),
        (3, 3),
        "one module more, lent inside the host"
    );
}

#[tokio::test]
async fn a_host_lends_inside_itself_while_the_groups_store_is_unreachable_and_publishes_later() {
    let dir = tempfile::tempdir().unwrap();
    let clock = SimulatedClock::starting_at(1_000);
    let (store, first) = lone_host_with_a_partition(dir.path(), &clock).await;
    drop(first);
    // The same host's manager, with its group's table behind a broker
    // that does not answer: it starts from its copy (FIG. 4B's own rows).
    let mut cut_off = config(store.clone(), Some(4), dir.path(), "h1");
    cut_off.store = None;
    let nowhere = leasehold_api::Client::new("http://127.0.0.1:9", None);
    let manager = RightsManager::join(
        cut_off,
        "h1",
        &capacity(8),
        "http://h1",
        &nowhere,
        clock.shared(),
        nowhere.clone(),
    )
    .await
    .unwrap();
    let answer = manager.request(slot("h1", 1), 3, "token").await.unwrap();
    assert_eq!(answer.lent_inside_host.len(), 1);
    assert_eq!(manager.applied().active[&1], 3, "on without the store");
    assert!(
        manager.publish_local_loans().await.is_err(),
        "the store is away"
    );
    // More than the host holds is not lent from the copy.
    assert!(manager.request(slot("h1", 1), 2, "token").await.is_err());
    let document = manager.document().await.unwrap();
    assert!(document.stale);
    assert_eq!(document.group.hosts["h1"].partitions[&1].permanent, 3);
    drop(manager);
    // Back with the store: the loan reaches the table once.
    let back = join(&store, Some(4), dir.path(), "h1", 8, &clock).await;
    back.publish_local_loans().await.unwrap();
    let (table, _) = back.fresh().await.unwrap();
    let rows = &table.hosts["h1"].partitions;
    assert_eq!(
        (rows[&0].permanent, rows[&1].permanent, rows[&1].active),
        (1, 3, 3)
    );
    assert_eq!(table.total_rights(clock.shared().now_ms()), 4);
}

#[tokio::test]
async fn a_host_removed_before_publishing_forgets_its_loans_and_returns_without_them() {
    let dir = tempfile::tempdir().unwrap();
    let clock = SimulatedClock::starting_at(1_000);
    let (first, second) = pair(dir.path(), &clock, 4).await;
    add_partition(&first, "h1", 1).await;
    let lent = first.request(slot("h1", 1), 2, "token").await.unwrap();
    assert_eq!(lent.lent_inside_host.len(), 1);
    drop(first);
    // An admin takes h1 out of the group before its loan was published.
    second.remove_host("h1", false).await.unwrap();
    // h1's manager comes back: it joins afresh, without the old loan.
    let store = BrokerDatabase::Sqlite(dir.path().join("group.db"));
    let again = join(&store, Some(2), dir.path(), "h1", 8, &clock).await;
    assert!(again.pending_loans().is_empty());
    add_partition(&again, "h1", 1).await;
    let (table, _) = again.fresh().await.unwrap();
    let rows = &table.hosts["h1"].partitions;
    assert_eq!((rows[&0].permanent, rows[&1].permanent), (2, 0));
    assert_eq!(again.applied().active.get(&1).copied().unwrap_or(0), 0);
}
