use super::*;
use leasehold_service::SimulatedClock;

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
