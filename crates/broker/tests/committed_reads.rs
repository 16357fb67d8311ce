//! Only committed state is visible: while a lease's batch is being
//! committed (held inside the store's `apply` by the test), a find still
//! offers the partition, the partition lists no lease and the lease itself
//! is unknown; once the commit returns, all three show the lease.

use leasehold_api::{Client, LeaseRequest, RegisterHostRequest, RegisterPartitionRequest, Role};
use leasehold_broker::{BrokerConfig, StoreLayer};
use leasehold_core::{HostCapacity, Isolation, Requirements, Terms};
use leasehold_service::SimulatedClock;
use leasehold_store::broker::BrokerWrite;
use leasehold_store::{BrokerStore, InterceptedStore, StoreError, StoreResult};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};

/// What the test holds a commit with: once armed, the next `apply` says it
/// has started and then waits until the test lets it go.
struct Gate {
    armed: AtomicBool,
    /// The next `apply` fails without writing anything.
    fail_next: AtomicBool,
    entered: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    release: Mutex<mpsc::Receiver<()>>,
}

impl Gate {
    fn apply(&self, inner: &mut dyn BrokerStore, writes: &[BrokerWrite]) -> StoreResult<()> {
        if self.fail_next.swap(false, Ordering::SeqCst) {
            return Err(StoreError::DatabaseThread("injected failure".into()));
        }
        if self.armed.swap(false, Ordering::SeqCst) {
            if let Some(entered) = self.entered.lock().unwrap().take() {
                let _ = entered.send(());
            }
            // Blocks the writer thread only: the commit is "in progress".
            let _ = self.release.lock().unwrap().recv();
        }
        inner.apply(writes)
    }
}

fn terms() -> Terms {
    Terms {
        vcpus: 1,
        cpu_cap_percent: 100,
        memory_mib: 512,
        disk_gib: 1,
        images: vec!["busybox".into()],
        price_per_hour_micros: 1_000,
        isolation: Some(Isolation::Simulated),
    }
}

/// A lender with host `h1` and its partitions 1..=`partitions`, and a borrower.
async fn market(url: &str, admin_token: String, partitions: u32) -> (Client, Client) {
    let admin = Client::new(url, Some(admin_token));
    let lender_token = admin
        .create_principal("ann", Role::Lender)
        .await
        .unwrap()
        .token;
    let borrower_token = admin
        .create_principal("bob", Role::Borrower)
        .await
        .unwrap()
        .token;
    let lender = Client::new(url, Some(lender_token));
    let capacity = HostCapacity {
        cpu_centicores: 1600,
        memory_mib: 4096,
        disk_gib: 10,
        owner_share_cpu_centicores: 0,
        owner_share_memory_mib: 0,
        owner_share_disk_gib: 0,
    };
    let host = RegisterHostRequest {
        share: None,
        agent_url: None,
        capacity,
    };
    lender.register_host("h1", &host).await.unwrap();
    let partition = RegisterPartitionRequest { terms: terms() };
    for index in 1..=partitions {
        lender
            .register_partition("h1", index, &partition)
            .await
            .unwrap();
    }
    (lender, Client::new(url, Some(borrower_token)))
}

/// A broker over a gated store, with its market made.
struct GatedBroker {
    broker: leasehold_broker::RunningBroker,
    gate: Arc<Gate>,
    release_sender: mpsc::Sender<()>,
    entered: tokio::sync::oneshot::Receiver<()>,
    lender: Client,
    borrower: Client,
    _data_dir: tempfile::TempDir,
}

async fn gated_broker(partitions: u32) -> GatedBroker {
    let (release_sender, release_receiver) = mpsc::channel();
    let (entered_sender, entered) = tokio::sync::oneshot::channel();
    let gate = Arc::new(Gate {
        armed: AtomicBool::new(false),
        fail_next: AtomicBool::new(false),
        entered: Mutex::new(Some(entered_sender)),
        release: Mutex::new(release_receiver),
    });
    let layer_gate = gate.clone();
    let layer: StoreLayer = Arc::new(move |inner| {
        let gate = layer_gate.clone();
        Box::new(InterceptedStore::new(
            inner,
            Box::new(move |inner, writes| gate.apply(inner, writes)),
        ))
    });
    let data_dir = tempfile::tempdir().unwrap();
    let broker = leasehold_broker::start(BrokerConfig {
        data_dir: data_dir.path().join("broker"),
        listen: "127.0.0.1:0".parse().unwrap(),
        durability: leasehold_store::Durability::Normal,
        commission_basis_points: 0,
        key_ttl_ms: leasehold_broker::DEFAULT_KEY_TTL_MS,
        clock: SimulatedClock::starting_at(1_000_000).shared(),
        image_store_url: None,
        tls: None,
        client_trust: Default::default(),
        database_url: None,
        store_layer: Some(layer),
        plan_policy: Default::default(),
        run_planner: false,
        metrics_public: false,
    })
    .await
    .unwrap();
    let url = broker.url();
    let (lender, borrower) = market(
        &url,
        broker.bootstrap_admin_token.clone().unwrap(),
        partitions,
    )
    .await;
    GatedBroker {
        broker,
        gate,
        release_sender,
        entered,
        lender,
        borrower,
        _data_dir: data_dir,
    }
}

fn lease_h1_1() -> LeaseRequest {
    LeaseRequest {
        partition: Some("h1/1".into()),
        best: None,
        allow_unisolated: false,
        start: None,
        end: None,
    }
}

/// A lease by requirements (the broker picks the partition).
fn lease_best() -> LeaseRequest {
    LeaseRequest {
        partition: None,
        best: Some(Requirements::default()),
        allow_unisolated: false,
        start: None,
        end: None,
    }
}

type Leasing = tokio::task::JoinHandle<Result<leasehold_api::LeaseView, leasehold_api::ApiError>>;

/// Arms the gate and sends `request`; returns once its batch is held inside
/// the store's commit, with the task that will get its answer.
async fn lease_held_in_its_commit(
    gate: &Gate,
    borrower: &Client,
    entered: tokio::sync::oneshot::Receiver<()>,
    request: LeaseRequest,
) -> Leasing {
    gate.armed.store(true, Ordering::SeqCst);
    let borrower = borrower.clone();
    let leasing = tokio::spawn(async move { borrower.lease(&request).await });
    entered.await.expect("the lease's batch reaches the store");
    leasing
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_never_sees_a_lease_whose_batch_has_not_committed() {
    let GatedBroker {
        broker,
        gate,
        release_sender,
        entered,
        lender,
        borrower,
        _data_dir,
    } = gated_broker(1).await;
    let leasing = lease_held_in_its_commit(&gate, &borrower, entered, lease_h1_1()).await;

    // The commit is in progress: nothing of the lease is visible.
    let found = borrower.find(&Requirements::default(), None).await.unwrap();
    assert_eq!(found.offers.len(), 1, "find still offers the partition");
    let listed = lender.list_partitions().await.unwrap();
    assert_eq!(listed[0].lease_id, None);
    assert_eq!(listed[0].epoch, 0);
    let unseen = borrower.get_lease(1).await.unwrap_err();
    assert_eq!(unseen.status(), Some(404));
    assert!(
        !leasing.is_finished(),
        "nobody is answered before the commit"
    );

    release_sender.send(()).unwrap();
    let lease = leasing.await.unwrap().unwrap();
    assert_eq!(lease.lease_id, 1);
    // Committed: every reader sees it.
    let found = borrower.find(&Requirements::default(), None).await.unwrap();
    assert!(found.offers.is_empty());
    let listed = lender.list_partitions().await.unwrap();
    assert_eq!(listed[0].lease_id, Some(1));
    assert_eq!(listed[0].epoch, 1);
    assert_eq!(borrower.get_lease(1).await.unwrap().lease_id, 1);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_shows_nothing_and_never_reuses_its_lease_id_or_epoch() {
    let GatedBroker {
        broker,
        gate,
        lender,
        borrower,
        // Kept to the end: the broker's data lives there.
        _data_dir,
        ..
    } = gated_broker(1).await;
    gate.fail_next.store(true, Ordering::SeqCst);
    let failed = borrower.lease(&lease_h1_1()).await.unwrap_err();
    assert_eq!(failed.status(), Some(500));
    // The lost lease left no trace for readers.
    let found = borrower.find(&Requirements::default(), None).await.unwrap();
    assert_eq!(found.offers.len(), 1);
    assert_eq!(lender.list_partitions().await.unwrap()[0].lease_id, None);
    assert_eq!(borrower.get_lease(1).await.unwrap_err().status(), Some(404));
    // Its id and epoch may have been seen (a commit reported failed may have
    // happened): the next lease takes new ones.
    let lease = borrower.lease(&lease_h1_1()).await.unwrap();
    assert_eq!((lease.lease_id, lease.epoch), (2, 2));
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_by_requirements_in_one_batch_each_get_another_partition() {
    let GatedBroker {
        broker,
        gate,
        release_sender,
        entered,
        borrower,
        _data_dir,
        ..
    } = gated_broker(8).await;
    let best = lease_best();
    // The first lease holds the writer inside its commit, so the next
    // seven queue up and those that arrived meanwhile are decided in one
    // batch (core's `a_batch_sees_its_own_leases_and_the_table_does_not`
    // is the deterministic proof; this one goes through HTTP and the
    // writer): whichever way they batch, no partition is leased twice.
    let mut leasing = vec![lease_held_in_its_commit(&gate, &borrower, entered, best.clone()).await];
    for _ in 0..7 {
        let borrower = borrower.clone();
        let request = best.clone();
        leasing.push(tokio::spawn(async move { borrower.lease(&request).await }));
    }
    release_sender.send(()).unwrap();
    let mut partitions = Vec::new();
    for task in leasing {
        let lease = task
            .await
            .unwrap()
            .expect("every borrower gets a partition");
        partitions.push(lease.partition.index);
    }
    partitions.sort_unstable();
    assert_eq!(
        partitions,
        (1..=8).collect::<Vec<u32>>(),
        "never one partition twice"
    );
    let found = borrower.find(&Requirements::default(), None).await.unwrap();
    assert!(found.offers.is_empty());
    broker.shutdown().await;
}

/// Scrapes `/metrics` as the admin until the writer's queue holds `count`
/// commands (they are on their way over loopback; bounded at 20 s).
async fn wait_until_queued(broker: &leasehold_broker::RunningBroker, count: usize) -> String {
    let token = broker.bootstrap_admin_token.clone().unwrap();
    let wanted = format!("leasehold_broker_writer_queued_commands {count}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let body = reqwest::Client::new()
            .get(format!("{}/metrics", broker.url()))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if body.lines().any(|line| line == wanted) {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the writer's queue never held {count}: {body}"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_fails_every_command_in_it_and_shows_none_of_them() {
    let GatedBroker {
        broker,
        gate,
        release_sender,
        entered,
        lender,
        borrower,
        _data_dir,
    } = gated_broker(8).await;
    let first = lease_held_in_its_commit(&gate, &borrower, entered, lease_h1_1()).await;
    // Seven leases by requirements queue up behind the held commit, so the
    // writer takes them as one batch; that batch's commit fails.
    let best = lease_best();
    let mut queued = Vec::new();
    for _ in 0..7 {
        let borrower = borrower.clone();
        let request = best.clone();
        queued.push(tokio::spawn(async move { borrower.lease(&request).await }));
    }
    wait_until_queued(&broker, 7).await;
    gate.fail_next.store(true, Ordering::SeqCst);
    release_sender.send(()).unwrap();

    let first = first.await.unwrap().expect("the held batch commits");
    assert_eq!((first.lease_id, first.partition.index), (1, 1));
    for task in queued {
        let failed = task.await.unwrap().expect_err("the failed batch's leases");
        assert_eq!(failed.status(), Some(500), "{failed}");
    }
    // Nothing of the failed batch is visible, and the writer says so.
    let found = borrower.find(&Requirements::default(), None).await.unwrap();
    assert_eq!(found.offers.len(), 7);
    let leased: Vec<Option<u64>> = lender
        .list_partitions()
        .await
        .unwrap()
        .iter()
        .map(|p| p.lease_id)
        .collect();
    assert_eq!(leased, [vec![Some(1)], vec![None; 7]].concat());
    for lease_id in 2..=8 {
        let unknown = borrower.get_lease(lease_id).await.unwrap_err();
        assert_eq!(unknown.status(), Some(404), "lease {lease_id}");
    }
    let metrics = wait_until_queued(&broker, 0).await;
    assert!(
        metrics
            .lines()
            .any(|line| line == "leasehold_broker_writer_commit_failures_total 1"),
        "{metrics}"
    );
    // Asked again, each gets a partition of its own, with a lease id and an
    // epoch the failed batch never used.
    let mut partitions = Vec::new();
    for _ in 0..7 {
        let lease = borrower.lease(&best).await.unwrap();
        assert!(lease.lease_id > 8, "{lease:?}");
        assert_eq!(lease.epoch, 2, "{lease:?}");
        partitions.push(lease.partition.index);
    }
    partitions.sort_unstable();
    assert_eq!(partitions, (2..=8).collect::<Vec<u32>>());
    broker.shutdown().await;
}
