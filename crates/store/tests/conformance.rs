//! The storage conformance suite: every test is written once against
//! `BrokerStore` and runs on SQLite (always) and on PostgreSQL when
//! `LEASEHOLD_TEST_POSTGRES_URL` names a server (CI starts a throw-away
//! cluster). Each test gets a fresh database: a temporary SQLite file, or a
//! PostgreSQL database made for it and dropped after.

use leasehold_core::calendar::{Booking, Interval};
use leasehold_core::lease::{Lease, LeaseState};
use leasehold_core::ledger::Transfer;
use leasehold_core::reservation::moves::{MoveTarget, PowerState};
use leasehold_core::reservation::{
    Capacity, InstanceSpec, Pool, PoolPhase, ReservationChange, Workload,
};
use leasehold_core::{HostCapacity, PartitionRef, Terms};
use leasehold_store::broker::{
    BrokerDb, BrokerWrite, HostRow, LeaseFilter, PartitionRow, ReleaseNoticeRow, MONEY_ASSET,
};
use leasehold_store::postgres::PostgresBrokerDb;
use leasehold_store::{BrokerStore, Durability, StoreError};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Barrier};

type Opener = Box<dyn Fn() -> Result<Box<dyn BrokerStore>, StoreError> + Send + Sync>;

/// A fresh, empty database and how to open it (again).
struct FreshDatabase {
    open: Arc<Opener>,
    /// Marks the schema as newer than this binary knows.
    bump_schema_version: Box<dyn Fn()>,
    _cleanup: Box<dyn std::any::Any>,
}

impl FreshDatabase {
    fn open(&self) -> Box<dyn BrokerStore> {
        (self.open)().expect("open the database")
    }
}

fn fresh_sqlite() -> FreshDatabase {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.db");
    let for_open = path.clone();
    FreshDatabase {
        open: Arc::new(Box::new(move || {
            Ok(Box::new(BrokerDb::open(&for_open, Durability::Normal)?) as Box<dyn BrokerStore>)
        })),
        bump_schema_version: Box::new(move || {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.pragma_update(None, "user_version", 99).unwrap();
        }),
        _cleanup: Box::new(dir),
    }
}

/// Drops its test database when the test ends, whatever the outcome.
struct DropDatabase {
    admin_url: String,
    name: String,
}

impl Drop for DropDatabase {
    fn drop(&mut self) {
        if let Ok(mut admin) = postgres::Client::connect(&self.admin_url, postgres::NoTls) {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

fn fresh_postgres() -> Option<FreshDatabase> {
    let Ok(admin_url) = std::env::var("LEASEHOLD_TEST_POSTGRES_URL") else {
        eprintln!("skipped: set LEASEHOLD_TEST_POSTGRES_URL (CI starts a throw-away cluster)");
        return None;
    };
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "leasehold_test_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let mut admin = postgres::Client::connect(&admin_url, postgres::NoTls)
        .expect("connect to LEASEHOLD_TEST_POSTGRES_URL");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .expect("create a test database");
    let mut config: postgres::Config = admin_url.parse().unwrap();
    config.dbname(&name);
    let for_open = config.clone();
    Some(FreshDatabase {
        open: Arc::new(Box::new(move || {
            Ok(Box::new(PostgresBrokerDb::open_config(
                for_open.clone(),
                Durability::Normal,
            )?) as Box<dyn BrokerStore>)
        })),
        bump_schema_version: Box::new(move || {
            let mut client = config.connect(postgres::NoTls).unwrap();
            client
                .batch_execute("INSERT INTO leasehold_schema_migrations (version) VALUES (99)")
                .unwrap();
        }),
        _cleanup: Box::new(DropDatabase { admin_url, name }),
    })
}

/// Generates `on_sqlite::TEST` and `on_postgres::TEST` for each conformance test.
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod on_sqlite {
            $( #[test] fn $test() { super::$test(&super::fresh_sqlite()); } )*
        }
        mod on_postgres {
            $( #[test] fn $test() {
                if let Some(database) = super::fresh_postgres() {
                    super::$test(&database);
                }
            } )*
        }
    };
}

conformance!(
    migrations_run_on_a_fresh_database_and_reopening_keeps_the_data,
    a_database_newer_than_the_binary_is_refused,
    a_failing_write_rolls_the_whole_batch_back,
    the_database_refuses_a_second_active_lease_on_a_partition,
    a_lease_is_billed_once,
    the_ledger_sums_to_zero_per_asset_and_money_queries_see_money_only,
    lease_listings_are_filtered_and_limited_by_the_database,
    idempotency_records_are_replaced_and_pruned_by_age,
    release_notices_wait_in_the_outbox_and_list_in_release_order,
    acquire_lease_bumps_the_epoch_renews_and_refuses_another_holder,
    a_fenced_batch_commits_only_under_the_current_epoch,
    racing_holders_get_a_lease_exactly_once,
    calendar_intervals_are_kept_until_unbooked_and_never_two_at_one_start,
    workloads_pools_and_counters_round_trip_and_deleting_a_workload_takes_its_pools,
    a_share_group_is_written_by_compare_and_swap,
);

fn terms() -> Terms {
    Terms {
        vcpus: 1,
        cpu_cap_percent: 50,
        memory_mib: 256,
        disk_gib: 1,
        images: vec!["busybox".into()],
        price_per_hour_micros: 3600,
        isolation: None,
    }
}

fn capacity() -> HostCapacity {
    HostCapacity {
        cpu_centicores: 200,
        memory_mib: 1024,
        disk_gib: 10,
        owner_share_cpu_centicores: 50,
        owner_share_memory_mib: 256,
        owner_share_disk_gib: 1,
    }
}

fn lease_on(lease_id: u64, index: u32, borrower: &str) -> Lease {
    Lease {
        lease_id,
        partition: PartitionRef::new("alpha", index),
        borrower: borrower.into(),
        lender: "ann".into(),
        terms: terms(),
        epoch: 1,
        started_at_ms: 100,
        key_expires_at_ms: 1000,
        state: LeaseState::Active,
        release_requested_at_ms: None,
        charge_micros: None,
        ends_at_ms: None,
    }
}

fn released(mut lease: Lease) -> Lease {
    lease.state = LeaseState::Released;
    lease.release_requested_at_ms = Some(2000);
    lease.charge_micros = Some(5);
    lease
}

fn transfer(lease_id: u64, debit: &str, credit: &str, amount_micros: u64) -> Transfer {
    Transfer {
        debit_account: debit.into(),
        credit_account: credit.into(),
        amount_micros,
        lease_id,
        at_ms: 9,
    }
}

/// Two principals, one host with partitions 1 and 2.
fn seed_writes() -> Vec<BrokerWrite> {
    let mut writes = vec![];
    for (name, role, hash) in [("ann", "lender", "h1"), ("bob", "borrower", "h2")] {
        writes.push(BrokerWrite::InsertPrincipal {
            name: name.into(),
            role: role.into(),
            token_sha256: hash.into(),
            at_ms: 1,
        });
    }
    writes.push(BrokerWrite::UpsertHost {
        host: HostRow {
            host_id: "alpha".into(),
            lender: "ann".into(),
            agent_url: Some("http://127.0.0.1:1".into()),
            capacity: capacity(),
            share: None,
        },
        at_ms: 1,
    });
    for index in [1, 2] {
        writes.push(BrokerWrite::UpsertPartition(PartitionRow {
            partition: PartitionRef::new("alpha", index),
            terms: terms(),
            epoch: 0,
            lease_id: None,
            withdrawn: index == 2,
        }));
    }
    writes
}

fn seeded(database: &FreshDatabase) -> Box<dyn BrokerStore> {
    let mut db = database.open();
    db.apply(&seed_writes()).unwrap();
    db
}

fn migrations_run_on_a_fresh_database_and_reopening_keeps_the_data(database: &FreshDatabase) {
    let mut db = database.open();
    let empty = db.load().unwrap();
    assert!(empty.principals.is_empty() && empty.hosts.is_empty());
    assert_eq!(empty.last_lease_id, 0);
    db.apply(&seed_writes()).unwrap();
    db.apply(&[
        BrokerWrite::InsertLease(lease_on(7, 1, "bob")),
        BrokerWrite::PutMeta {
            key: "k".into(),
            value: "v1".into(),
        },
        BrokerWrite::PutMeta {
            key: "k".into(),
            value: "v2".into(),
        },
    ])
    .unwrap();
    drop(db);
    // Reopening runs no migration twice and finds everything.
    let mut db = database.open();
    let snapshot = db.load().unwrap();
    assert_eq!(snapshot.principals.len(), 2);
    assert_eq!(snapshot.hosts[0].capacity, capacity());
    assert_eq!(
        snapshot.hosts[0].agent_url.as_deref(),
        Some("http://127.0.0.1:1")
    );
    let mut partitions = snapshot.partitions.clone();
    partitions.sort_by_key(|p| p.partition.index);
    assert_eq!(partitions[0].terms, terms());
    assert_eq!(
        partitions.iter().map(|p| p.withdrawn).collect::<Vec<_>>(),
        vec![false, true]
    );
    assert_eq!(snapshot.active_leases, vec![lease_on(7, 1, "bob")]);
    assert_eq!(snapshot.last_lease_id, 7);
    assert_eq!(snapshot.meta.get("k").map(String::as_str), Some("v2"));
    db.apply(&[BrokerWrite::DeleteMeta { key: "k".into() }])
        .unwrap();
    assert!(db.load().unwrap().meta.is_empty());
}

fn a_database_newer_than_the_binary_is_refused(database: &FreshDatabase) {
    drop(database.open());
    (database.bump_schema_version)();
    assert!(matches!(
        (database.open)(),
        Err(StoreError::SchemaTooNew { found: 99, .. })
    ));
}

fn a_failing_write_rolls_the_whole_batch_back(database: &FreshDatabase) {
    let mut db = database.open();
    let mut batch = seed_writes();
    batch.push(BrokerWrite::InsertLease(lease_on(1, 1, "bob")));
    // The same lease id again: the last write fails, so nothing is written.
    batch.push(BrokerWrite::InsertLease(lease_on(1, 2, "bob")));
    assert!(db.apply(&batch).is_err());
    let snapshot = db.load().unwrap();
    assert!(
        snapshot.principals.is_empty(),
        "the whole batch rolled back"
    );
    assert!(snapshot.hosts.is_empty() && snapshot.active_leases.is_empty());
    assert!(db.lease(1).unwrap().is_none());
    // The connection is still usable after the rollback.
    db.apply(&seed_writes()).unwrap();
    assert_eq!(db.load().unwrap().principals.len(), 2);
}

fn the_database_refuses_a_second_active_lease_on_a_partition(database: &FreshDatabase) {
    let mut db = seeded(database);
    db.apply(&[BrokerWrite::InsertLease(lease_on(1, 1, "bob"))])
        .unwrap();
    // As if the broker's own check had been bypassed: the index refuses.
    assert!(db
        .apply(&[BrokerWrite::InsertLease(lease_on(2, 1, "carol"))])
        .is_err());
    assert!(db.lease(2).unwrap().is_none());
    // Once the first is released the partition can be leased again.
    db.apply(&[
        BrokerWrite::UpdateLease(released(lease_on(1, 1, "bob"))),
        BrokerWrite::InsertLease(lease_on(2, 1, "carol")),
    ])
    .unwrap();
    assert_eq!(db.lease(1).unwrap(), Some(released(lease_on(1, 1, "bob"))));
    let active = db.load().unwrap().active_leases;
    assert_eq!(active, vec![lease_on(2, 1, "carol")]);
}

fn a_lease_is_billed_once(database: &FreshDatabase) {
    let mut db = seeded(database);
    db.apply(&[BrokerWrite::InsertLease(lease_on(1, 1, "bob"))])
        .unwrap();
    let bill = transfer(1, "borrower:bob", "lender:ann", 5);
    db.apply(&[BrokerWrite::InsertTransfer(bill.clone())])
        .unwrap();
    assert!(db
        .apply(&[BrokerWrite::InsertTransfer(bill.clone())])
        .is_err());
    assert_eq!(db.lease_transfers(1).unwrap(), vec![bill]);
    assert!(
        db.apply(&[BrokerWrite::InsertTransfer(transfer(1, "a", "b", 0))])
            .is_err(),
        "a transfer of nothing is refused"
    );
}

fn the_ledger_sums_to_zero_per_asset_and_money_queries_see_money_only(database: &FreshDatabase) {
    let mut db = seeded(database);
    db.apply(&[
        BrokerWrite::InsertLease(lease_on(1, 1, "bob")),
        BrokerWrite::InsertTransfer(transfer(1, "borrower:bob", "lender:ann", 90)),
        BrokerWrite::InsertTransfer(transfer(1, "borrower:bob", "broker:commission", 10)),
        // Usage rights move in the same ledger, under their own asset.
        BrokerWrite::InsertAssetTransfer {
            asset: "rights:core".into(),
            transfer: transfer(1, "lender:ann", "borrower:bob", 3),
        },
    ])
    .unwrap();
    let by_asset = db.balances_by_asset().unwrap();
    for asset in [MONEY_ASSET, "rights:core"] {
        let sum: i64 = by_asset
            .iter()
            .filter(|b| b.asset == asset)
            .map(|b| b.balance)
            .sum();
        assert_eq!(sum, 0, "{asset} sums to zero");
    }
    assert_eq!(
        db.balances().unwrap(),
        vec![
            ("borrower:bob".to_string(), -100),
            ("broker:commission".to_string(), 10),
            ("lender:ann".to_string(), 90)
        ],
        "money balances, by account, without the rights"
    );
    let all = db.transfers(None, 10).unwrap();
    assert_eq!(all.len(), 2, "money transfers only");
    assert!(all[0].0 > all[1].0, "newest first");
    let anns = db.transfers(Some(&["lender:ann".to_string()]), 10).unwrap();
    assert_eq!(anns.len(), 1);
    assert_eq!(anns[0].1.credit_account, "lender:ann");
    let both = ["lender:ann".to_string(), "broker:commission".to_string()];
    assert_eq!(db.transfers(Some(&both), 1).unwrap().len(), 1, "limited");
    assert!(db.transfers(Some(&[]), 10).unwrap().is_empty());
    assert!(db
        .transfers(Some(&["nobody".to_string()]), 10)
        .unwrap()
        .is_empty());
}

fn lease_listings_are_filtered_and_limited_by_the_database(database: &FreshDatabase) {
    let mut db = seeded(database);
    db.apply(&[
        BrokerWrite::InsertLease(lease_on(1, 1, "bob")),
        BrokerWrite::UpdateLease(released(lease_on(1, 1, "bob"))),
        BrokerWrite::InsertLease(lease_on(2, 1, "carol")),
        BrokerWrite::InsertLease(lease_on(3, 2, "bob")),
    ])
    .unwrap();
    let ids = |leases: Vec<Lease>| leases.iter().map(|l| l.lease_id).collect::<Vec<_>>();
    assert_eq!(
        ids(db.leases(&LeaseFilter::All, 10).unwrap()),
        vec![3, 2, 1]
    );
    assert_eq!(ids(db.leases(&LeaseFilter::All, 2).unwrap()), vec![3, 2]);
    assert_eq!(
        ids(db.leases(&LeaseFilter::Borrower("bob".into()), 10).unwrap()),
        vec![3, 1]
    );
    assert_eq!(
        ids(db.leases(&LeaseFilter::Lender("ann".into()), 1).unwrap()),
        vec![3]
    );
    assert!(db
        .leases(&LeaseFilter::Lender("bob".into()), 10)
        .unwrap()
        .is_empty());
    assert_eq!(db.lease(1).unwrap(), Some(released(lease_on(1, 1, "bob"))));
    assert_eq!(db.load().unwrap().last_lease_id, 3);
}

fn idempotency_records_are_replaced_and_pruned_by_age(database: &FreshDatabase) {
    let mut db = database.open();
    let record = |key: &str, body: &str, at_ms: u64| BrokerWrite::PutIdempotency {
        principal: "bob".into(),
        key: key.into(),
        status: 201,
        body: body.into(),
        at_ms,
    };
    db.apply(&[record("old", "a", 10), record("new", "b", 20)])
        .unwrap();
    db.apply(&[record("new", "c", 30)]).unwrap();
    let mut records = db.load().unwrap().idempotency;
    records.sort_by_key(|r| r.at_ms);
    assert_eq!(records.len(), 2);
    assert_eq!((records[1].body.as_str(), records[1].at_ms), ("c", 30));
    assert_eq!(records[1].status, 201);
    assert_eq!(db.prune_idempotency(30).unwrap(), 1, "only the older one");
    let left = db.load().unwrap().idempotency;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].key, "new");
    assert_eq!(db.prune_idempotency(30).unwrap(), 0);
}

fn release_notice(lease_id: u64, key_expires_at_ms: u64) -> ReleaseNoticeRow {
    ReleaseNoticeRow {
        lease_id,
        host_id: "alpha".into(),
        notice: format!("notice-{lease_id}"),
        key_expires_at_ms,
        created_at_ms: 10 + lease_id,
    }
}

fn release_notices_wait_in_the_outbox_and_list_in_release_order(database: &FreshDatabase) {
    let mut db = seeded(database);
    db.apply(&[
        BrokerWrite::InsertLease(lease_on(1, 1, "bob")),
        BrokerWrite::InsertLease(lease_on(2, 2, "bob")),
    ])
    .unwrap();
    // Lease 2 is released before lease 1: the list follows release order.
    for (lease_id, expires_at_ms) in [(2, 1000), (1, 500)] {
        db.apply(&[
            BrokerWrite::InsertRevocation(release_notice(lease_id, expires_at_ms)),
            BrokerWrite::InsertOutboxNotice(release_notice(lease_id, expires_at_ms)),
        ])
        .unwrap();
    }
    drop(db);
    let mut db = database.open();
    assert_eq!(
        db.pending_outbox().unwrap(),
        vec![release_notice(1, 500), release_notice(2, 1000)],
        "the outbox survives a reopen, oldest first"
    );
    let listed = db.revocations_after("alpha", 0, 100, 10).unwrap();
    assert_eq!(
        listed.iter().map(|r| r.lease_id).collect::<Vec<_>>(),
        vec![2, 1]
    );
    assert_eq!(listed[0].notice, "notice-2");
    let after_first = db
        .revocations_after("alpha", listed[0].seq, 100, 10)
        .unwrap();
    assert_eq!(after_first.len(), 1);
    assert_eq!(after_first[0].lease_id, 1);
    assert_eq!(db.revocations_after("alpha", 0, 100, 1).unwrap().len(), 1);
    assert!(db.revocations_after("beta", 0, 100, 10).unwrap().is_empty());
    // A notice whose key expired is not listed.
    assert_eq!(db.revocations_after("alpha", 0, 700, 10).unwrap().len(), 1);
    db.apply(&[BrokerWrite::DeleteOutboxNotice { lease_id: 2 }])
        .unwrap();
    assert_eq!(db.pending_outbox().unwrap(), vec![release_notice(1, 500)]);
    // A key that expired needs no fence: its notice goes everywhere.
    assert_eq!(db.prune_expired_notices(600).unwrap(), 2);
    assert!(db.pending_outbox().unwrap().is_empty());
    let left = db.revocations_after("alpha", 0, 600, 10).unwrap();
    assert_eq!(left.iter().map(|r| r.lease_id).collect::<Vec<_>>(), vec![2]);
    assert!(
        db.apply(&[BrokerWrite::InsertRevocation(release_notice(2, 1000))])
            .is_err(),
        "one revocation per lease"
    );
}

fn a_fenced_batch_commits_only_under_the_current_epoch(database: &FreshDatabase) {
    let mut db = database.open();
    let fence = |holder: &str, epoch: u64| BrokerWrite::CheckFence {
        name: "broker".into(),
        holder: holder.into(),
        epoch,
    };
    let meta = |value: &str| BrokerWrite::PutMeta {
        key: "written_by".into(),
        value: value.into(),
    };
    assert_eq!(db.acquire_lease("broker", "a", 1_000, 0).unwrap(), Some(1));
    db.apply(&[fence("a", 1), meta("a")]).unwrap();
    // b takes over after a's lease lapsed: a's next batch changes nothing.
    assert_eq!(
        db.acquire_lease("broker", "b", 1_000, 2_000).unwrap(),
        Some(2)
    );
    let refused = db.apply(&[fence("a", 1), meta("a again")]);
    assert!(
        matches!(refused, Err(StoreError::Fenced { epoch: 1, .. })),
        "{refused:?}"
    );
    // Neither does a batch naming the right epoch with the wrong holder.
    assert!(db.apply(&[fence("a", 2), meta("a again")]).is_err());
    assert_eq!(db.load().unwrap().meta.get("written_by").unwrap(), "a");
    db.apply(&[fence("b", 2), meta("b")]).unwrap();
    assert_eq!(db.load().unwrap().meta.get("written_by").unwrap(), "b");
}

fn acquire_lease_bumps_the_epoch_renews_and_refuses_another_holder(database: &FreshDatabase) {
    let mut db = database.open();
    let ttl_ms = 1_000;
    assert_eq!(db.acquire_lease("leader", "a", ttl_ms, 0).unwrap(), Some(1));
    assert_eq!(
        db.acquire_lease("leader", "a", ttl_ms, 500).unwrap(),
        Some(1),
        "the holder renews at the same epoch"
    );
    // Renewed until 1,500: another holder is refused before, served after.
    assert_eq!(
        db.acquire_lease("leader", "b", ttl_ms, 1_499).unwrap(),
        None
    );
    assert_eq!(
        db.acquire_lease("other", "b", ttl_ms, 1_499).unwrap(),
        Some(1)
    );
    assert_eq!(
        db.acquire_lease("leader", "b", ttl_ms, 1_500).unwrap(),
        Some(2),
        "an expired lease changes hands with the next epoch"
    );
    assert_eq!(
        db.acquire_lease("leader", "a", ttl_ms, 1_600).unwrap(),
        None,
        "the old holder is fenced off"
    );
    assert!(
        !db.release_lease("leader", "a").unwrap(),
        "not a's to release"
    );
    assert_eq!(
        db.acquire_lease("leader", "c", ttl_ms, 1_700).unwrap(),
        None
    );
    assert!(db.release_lease("leader", "b").unwrap());
    assert_eq!(
        db.acquire_lease("leader", "c", ttl_ms, 1_700).unwrap(),
        Some(3),
        "a released lease is free at once"
    );
    // A holder whose own lease lapsed gets it back with a new epoch: someone
    // may have acted on the lapse.
    assert_eq!(
        db.acquire_lease("leader", "c", ttl_ms, 5_000).unwrap(),
        Some(4)
    );
    assert_eq!(
        db.lease_holder("leader").unwrap(),
        Some(leasehold_store::LeaseHolder {
            holder: "c".into(),
            epoch: 4,
            expires_at_ms: 6_000
        }),
        "who holds it, at which epoch, until when"
    );
    assert_eq!(db.lease_holder("never-taken").unwrap(), None);
    drop(db);
    let mut db = database.open();
    assert_eq!(
        db.acquire_lease("leader", "d", ttl_ms, 5_500).unwrap(),
        None,
        "the lease is in the database, not in the connection"
    );
}

fn racing_holders_get_a_lease_exactly_once(database: &FreshDatabase) {
    drop(database.open());
    const CONTENDERS: usize = 4;
    let barrier = Arc::new(Barrier::new(CONTENDERS));
    let threads: Vec<_> = (0..CONTENDERS)
        .map(|contender| {
            let open = database.open.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut db = open().unwrap();
                barrier.wait();
                db.acquire_lease("leader", &format!("broker-{contender}"), 10_000, 0)
                    .unwrap()
            })
        })
        .collect();
    let epochs: Vec<Option<u64>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(
        epochs.iter().flatten().collect::<Vec<_>>(),
        vec![&1],
        "exactly one contender wins, at epoch 1: {epochs:?}"
    );
}

fn calendar_intervals_are_kept_until_unbooked_and_never_two_at_one_start(database: &FreshDatabase) {
    let mut db = seeded(database);
    let partition = PartitionRef::new("alpha", 1);
    let lease = lease_on(1, 1, "bob");
    let leased = Interval::lease_from(1, lease.started_at_ms);
    let reserved = Interval {
        booking: Booking::Reserved { reservation_id: 9 },
        from_ms: lease.started_at_ms + 5_000,
        to_ms: Some(lease.started_at_ms + 6_000),
    };
    db.apply(&[
        BrokerWrite::InsertLease(lease.clone()),
        BrokerWrite::InsertInterval {
            partition: partition.clone(),
            interval: reserved,
        },
        BrokerWrite::InsertInterval {
            partition: partition.clone(),
            interval: leased,
        },
    ])
    .unwrap();
    // Two intervals of one partition never start at the same moment.
    let twin = Interval {
        booking: Booking::Reserved { reservation_id: 10 },
        ..reserved
    };
    assert!(db
        .apply(&[BrokerWrite::InsertInterval {
            partition: partition.clone(),
            interval: twin,
        }])
        .is_err());
    let mut reopened = database.open();
    let intervals = reopened.load().unwrap().intervals;
    assert_eq!(
        intervals,
        vec![(partition.clone(), leased), (partition.clone(), reserved)],
        "by partition, then start"
    );
    reopened
        .apply(&[BrokerWrite::DeleteInterval {
            partition: partition.clone(),
            booking: Booking::Leased { lease_id: 1 },
        }])
        .unwrap();
    assert_eq!(
        reopened.load().unwrap().intervals,
        vec![(partition, reserved)]
    );
}

fn reservation_workload(name: &str, instance: &str) -> Workload {
    Workload {
        name: name.into(),
        owner: "ops".into(),
        priority: 3,
        start_ms: 1_000_000,
        end_ms: 2_000_000,
        instances: vec![InstanceSpec {
            name: instance.into(),
            vcpus: 2,
            memory_mib: 4096,
            disk_gib: 1,
            image: None,
        }],
        rules: vec![],
        seq: 1,
    }
}

fn reservation_pool(pool_id: u64, workload: &str, demand: &str, acquired_mib: u64) -> Pool {
    Pool {
        pool_id,
        host_id: "alpha".into(),
        workload: workload.into(),
        demand: demand.into(),
        instances: vec![demand.into()],
        phase: PoolPhase::Acquiring,
        target: Capacity::new(200, 4096, 1),
        acquired: Capacity::new(200, acquired_mib, 1),
        requested: Capacity::new(200, acquired_mib, 1),
        allocated: Capacity::ZERO,
        last_step_ms: 5,
        sampled_at_ms: Some(4),
        created_at_ms: 1,
    }
}

fn workloads_pools_and_counters_round_trip_and_deleting_a_workload_takes_its_pools(
    database: &FreshDatabase,
) {
    use ReservationChange as R;
    let mut db = seeded(database);
    let (web, batch) = (
        reservation_workload("web", "w1"),
        reservation_workload("batch", "b1"),
    );
    db.apply(&[
        BrokerWrite::Reservation(R::PutWorkload(web.clone())),
        BrokerWrite::Reservation(R::PutWorkload(batch.clone())),
        BrokerWrite::Reservation(R::PutPool(reservation_pool(1, "web", "w1", 1024))),
        BrokerWrite::Reservation(R::PutPool(reservation_pool(2, "batch", "b1", 512))),
        BrokerWrite::Reservation(R::SetFruitlessRounds {
            demand: "b1".into(),
            rounds: 3,
        }),
        BrokerWrite::Reservation(R::SetMove {
            demand: "w1".into(),
            target: Some(MoveTarget::Host {
                host_id: "beta".into(),
            }),
        }),
        BrokerWrite::Reservation(R::SetHostPower {
            host_id: "gamma".into(),
            state: Some(PowerState::Off),
        }),
    ])
    .unwrap();
    // A pool's row is replaced as it ramps.
    db.apply(&[BrokerWrite::Reservation(R::PutPool(reservation_pool(
        1, "web", "w1", 2048,
    )))])
    .unwrap();
    let loaded = database.open().load().unwrap();
    assert_eq!(
        loaded.workloads,
        vec![batch.clone(), web.clone()],
        "by name"
    );
    assert_eq!(loaded.pools.len(), 2);
    assert_eq!(loaded.pools[0].acquired.memory_mib, 2048);
    assert_eq!(loaded.fruitless_rounds, vec![("b1".to_string(), 3)]);
    assert_eq!(
        loaded.moves,
        vec![(
            "w1".to_string(),
            MoveTarget::Host {
                host_id: "beta".into()
            }
        )]
    );
    assert_eq!(
        loaded.host_power,
        vec![("gamma".to_string(), PowerState::Off)]
    );
    db.apply(&[
        BrokerWrite::Reservation(R::RemoveWorkload { name: "web".into() }),
        BrokerWrite::Reservation(R::SetFruitlessRounds {
            demand: "b1".into(),
            rounds: 0,
        }),
        BrokerWrite::Reservation(R::RemovePool { pool_id: 2 }),
        BrokerWrite::Reservation(R::SetMove {
            demand: "w1".into(),
            target: None,
        }),
        BrokerWrite::Reservation(R::SetHostPower {
            host_id: "gamma".into(),
            state: None,
        }),
    ])
    .unwrap();
    let loaded = database.open().load().unwrap();
    assert_eq!(loaded.workloads, vec![batch]);
    assert!(loaded.pools.is_empty(), "the workload's pool went with it");
    assert!(loaded.fruitless_rounds.is_empty());
    assert!(loaded.moves.is_empty() && loaded.host_power.is_empty());
}

fn a_share_group_is_written_by_compare_and_swap(database: &FreshDatabase) {
    use leasehold_core::rights::{GroupMode, ShareGroup};
    let mut db = seeded(database);
    assert!(db.share_group("g").unwrap().is_none());
    use leasehold_core::rights::ledger::{movements, RIGHTS_ASSET};
    let mut group = ShareGroup::new("g", GroupMode::Centralized);
    assert_eq!(db.put_share_group(&group, 0, &[]).unwrap(), Some(1));
    // A second creator loses.
    assert_eq!(db.put_share_group(&group, 0, &[]).unwrap(), None);
    // Two rights appear on a host: the ledger records them, issued.
    let before = group.clone();
    group.primary_epoch = 3;
    group.unassigned = 2;
    let moved = movements(Some(&before), &group, 0);
    assert_eq!(moved.len(), 1);
    assert_eq!(db.put_share_group(&group, 1, &moved).unwrap(), Some(2));
    // A manager that decided from version 1 is refused and changes
    // nothing, in the table or the ledger.
    let mut stale = group.clone();
    stale.primary_epoch = 9;
    stale.unassigned = 5;
    let stale_moved = movements(Some(&before), &stale, 0);
    assert_eq!(db.put_share_group(&stale, 1, &stale_moved).unwrap(), None);
    let (stored, version) = database.open().share_group("g").unwrap().unwrap();
    assert_eq!((stored, version), (group.clone(), 2));
    assert_eq!(db.share_groups(10).unwrap(), vec![(group, 2)]);
    let rights: Vec<(String, i64)> = db
        .balances_by_asset()
        .unwrap()
        .into_iter()
        .filter(|b| b.asset == RIGHTS_ASSET)
        .map(|b| (b.account, b.balance))
        .collect();
    assert_eq!(
        rights,
        vec![
            ("rights:g:issued".to_string(), -2),
            ("rights:g:unassigned".to_string(), 2)
        ],
        "balanced per asset"
    );
}
