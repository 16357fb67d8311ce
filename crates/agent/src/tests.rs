//! The agent's flows against its partition table, with a `sim`-like driver,
//! a simulated clock and notices signed by a test broker key (no broker is
//! called: keys verify offline).

use crate::driver::oci::CoreAssignments;
use crate::driver::{self, DriverKind, JobSpec, PartitionDriver, PartitionSpec};
use crate::{Agent, AgentConfig, AgentError};
use ed25519_dalek::SigningKey;
use leasehold_api::{JobState, SubmitJobRequest};
use leasehold_core::fence::{FenceEvent, FencePhase};
use leasehold_core::key::{self, KeyRejection, LeaseKeyClaims, NoticeClaims, NoticeKind};
use leasehold_core::{HostCapacity, Isolation, Terms};
use leasehold_service::SimulatedClock;
use leasehold_store::agent::AgentDb;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

const MACHINE_CORES: [u32; 4] = [0, 1, 2, 3];

/// The `sim` driver, plus cores chosen like the `oci` driver's and a count
/// of wipes.
struct TestDriver {
    sim: driver::sim::SimDriver,
    cores: Mutex<CoreAssignments>,
    wipes: Mutex<Vec<u32>>,
}

impl TestDriver {
    fn new() -> Self {
        TestDriver {
            sim: driver::sim::SimDriver::new(vec!["busybox".into()]),
            cores: Mutex::new(CoreAssignments::default()),
            wipes: Mutex::new(Vec::new()),
        }
    }
}

impl PartitionDriver for TestDriver {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn images(&self) -> Vec<String> {
        self.sim.images()
    }

    fn build(&self, partition: &PartitionSpec) -> Result<(), driver::DriverError> {
        self.cores
            .lock()
            .unwrap()
            .assign(&MACHINE_CORES, partition.index, partition.terms.vcpus);
        self.sim.build(partition)
    }

    fn run_job(
        &self,
        job: JobSpec,
    ) -> driver::BoxFuture<'_, Result<driver::JobOutcome, driver::DriverError>> {
        self.sim.run_job(job)
    }

    fn wipe(&self, index: u32) -> Result<(), driver::DriverError> {
        self.wipes.lock().unwrap().push(index);
        self.sim.wipe(index)
    }

    fn cores_of(&self, index: u32) -> Option<Vec<u32>> {
        self.cores.lock().unwrap().of(index)
    }

    fn restore_cores(&self, kept: &[(u32, Vec<u32>)]) {
        self.cores.lock().unwrap().restore(&MACHINE_CORES, kept);
    }
}

pub(crate) struct Harness {
    _dir: tempfile::TempDir,
    pub(crate) agent: Arc<Agent>,
    driver: Arc<TestDriver>,
    clock: SimulatedClock,
    broker_key: SigningKey,
}

/// Forwards to a shared [`TestDriver`], so the test can look inside.
struct Shared(Arc<TestDriver>);

impl PartitionDriver for Shared {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn images(&self) -> Vec<String> {
        self.0.images()
    }
    fn build(&self, partition: &PartitionSpec) -> Result<(), driver::DriverError> {
        self.0.build(partition)
    }
    fn run_job(
        &self,
        job: JobSpec,
    ) -> driver::BoxFuture<'_, Result<driver::JobOutcome, driver::DriverError>> {
        self.0.run_job(job)
    }
    fn wipe(&self, index: u32) -> Result<(), driver::DriverError> {
        self.0.wipe(index)
    }
    fn cores_of(&self, index: u32) -> Option<Vec<u32>> {
        self.0.cores_of(index)
    }
    fn restore_cores(&self, kept: &[(u32, Vec<u32>)]) {
        self.0.restore_cores(kept)
    }
}

fn terms(vcpus: u32) -> Terms {
    Terms {
        vcpus,
        cpu_cap_percent: 100,
        memory_mib: 256,
        disk_gib: 1,
        images: vec!["busybox".into()],
        price_per_hour_micros: 3600,
        isolation: Some(Isolation::Simulated),
    }
}

pub(crate) fn harness(partitions: &[u32]) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let clock = SimulatedClock::starting_at(1_000);
    let broker_key = SigningKey::from_bytes(&[7; 32]);
    let config = AgentConfig {
        markets: Vec::new(),
        direct: false,
        key_confirmation: crate::markets::KeyConfirmation::Offline,
        host_id: "alpha".into(),
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        // Never called: keys and notices verify offline.
        broker_url: "http://127.0.0.1:9".into(),
        lender_token: "lender".into(),
        driver: DriverKind::Sim {
            images: vec!["busybox".into()],
        },
        capacity: HostCapacity {
            cpu_centicores: 1600,
            memory_mib: 65536,
            disk_gib: 1000,
            owner_share_cpu_centicores: 0,
            owner_share_memory_mib: 0,
            owner_share_disk_gib: 0,
        },
        advertise_url: None,
        clock: clock.shared(),
        revocation_poll_interval_ms: 1_000,
        tls: None,
        client_trust: Default::default(),
        sampling: Default::default(),
        rights: None,
        metrics_public: false,
    };
    let mut db = AgentDb::open(&dir.path().join("agent.db")).unwrap();
    for vcpus in partitions {
        db.insert_partition(&terms(*vcpus)).unwrap();
    }
    let driver = Arc::new(TestDriver::new());
    crate::restore_cores(&db, driver.as_ref()).unwrap();
    let broker = leasehold_api::Client::new(&config.broker_url, None);
    let home_market = crate::markets::Market {
        url: config.broker_url.clone(),
        client: broker.clone(),
        share: None,
        range: None,
        keys: std::sync::RwLock::new(key::TrustedKeys::single(broker_key.verifying_key())),
        last_key_refresh_ms: Mutex::new(u64::MAX / 2),
        trust_meta_key: "broker_trusted_keys".into(),
        owner: false,
    };
    let agent = Arc::new(Agent {
        config,
        db: Mutex::new(db),
        driver: Box::new(Shared(driver.clone())),
        broker,
        markets: vec![home_market],
        owner_key: None,
        direct_lock: tokio::sync::Mutex::new(()),
        advertise_url: "http://127.0.0.1:9".into(),
        partition_locks: Mutex::new(HashMap::new()),
        running_jobs: Mutex::new(HashMap::new()),
        refused_keys: crate::refused::RefusedKeyLog::default(),
        lender_check: crate::lender_check::LenderCheck::default(),
        admin_check: crate::lender_check::LenderCheck::default(),
        peer_check: crate::lender_check::LenderCheck::default(),
        sampler: crate::sampling::Sampler::with_trace(None, 1_000),
        rights: None,
        metrics: crate::metrics::AgentMetrics::new(),
    });
    Harness {
        _dir: dir,
        agent,
        driver,
        clock,
        broker_key,
    }
}

impl Harness {
    fn key(&self, index: u32, lease_id: u64, epoch: u64, expires_at_ms: u64) -> String {
        key::sign(
            &LeaseKeyClaims {
                not_before_ms: None,
                lease_id,
                host_id: "alpha".into(),
                partition_index: index,
                epoch,
                borrower: "bob".into(),
                issued_at_ms: 1_000,
                expires_at_ms,
                key_id: key::key_id(&self.broker_key.verifying_key()),
                terms: None,
            },
            &self.broker_key,
        )
    }

    fn notice(&self, kind: NoticeKind, index: u32, lease_id: u64, epoch: u64) -> String {
        key::sign_notice(
            &NoticeClaims {
                kind,
                host_id: "alpha".into(),
                partition_index: index,
                lease_id,
                epoch,
                key_expires_at_ms: 1_000_000,
                key_id: key::key_id(&self.broker_key.verifying_key()),
            },
            &self.broker_key,
        )
    }

    async fn run(&self, index: u32, key: String) -> Result<JobState, AgentError> {
        let request = SubmitJobRequest {
            lease_key: key,
            command: vec!["echo".into(), "hi".into()],
            timeout_ms: None,
            image: None,
            stream: false,
        };
        Ok(self.agent.run_job(index, request, None, None).await?.state)
    }

    fn phase(&self, index: u32) -> FencePhase {
        self.agent.load(index).unwrap().fence.phase
    }
}

fn rejected(result: Result<JobState, AgentError>) -> Option<KeyRejection> {
    match result {
        Err(AgentError::KeyRejected(reason)) => Some(reason),
        _ => None,
    }
}

#[tokio::test]
async fn a_release_fences_its_key_and_a_newer_lease_adopts_the_partition() {
    let h = harness(&[1]);
    let first = h.key(1, 10, 1, 1_000_000);
    assert_eq!(h.run(1, first.clone()).await.unwrap(), JobState::Succeeded);
    assert!(matches!(
        h.phase(1),
        FencePhase::Leased {
            lease_id: 10,
            built: true,
            ..
        }
    ));
    let release = h.notice(NoticeKind::LeaseReleased, 1, 10, 1);
    h.agent.apply_notice(&release).await.unwrap();
    assert_eq!(h.phase(1), FencePhase::Free, "fenced, then wiped");
    assert_eq!(*h.driver.wipes.lock().unwrap(), vec![1]);
    assert_eq!(
        rejected(h.run(1, first.clone()).await),
        Some(KeyRejection::Released)
    );
    // Applying the release again changes nothing and wipes nothing.
    h.agent.apply_notice(&release).await.unwrap();
    assert_eq!(h.driver.wipes.lock().unwrap().len(), 1);
    let second = h.key(1, 20, 2, 1_000_000);
    assert_eq!(h.run(1, second.clone()).await.unwrap(), JobState::Succeeded);
    // A newer lease announced by the broker: the older key is over.
    let started = h.notice(NoticeKind::LeaseStarted, 1, 30, 3);
    h.agent.apply_notice(&started).await.unwrap();
    assert!(matches!(
        h.phase(1),
        FencePhase::Leased { lease_id: 30, .. }
    ));
    assert_eq!(
        rejected(h.run(1, second).await),
        Some(KeyRejection::Released)
    );
    assert_eq!(
        *h.driver.wipes.lock().unwrap(),
        vec![1, 1],
        "lease 20's files are wiped before lease 30 gets the partition"
    );
}

#[tokio::test]
async fn a_stale_copy_of_the_row_cannot_undo_a_release() {
    let h = harness(&[1]);
    let key = h.key(1, 10, 1, 1_000_000);
    h.run(1, key.clone()).await.unwrap();
    // A flow that read the row before the release writes its copy back.
    let stale = h.agent.load(1).unwrap();
    let release = h.notice(NoticeKind::LeaseReleased, 1, 10, 1);
    h.agent.apply_notice(&release).await.unwrap();
    h.agent.db().update_terms_and_registration(&stale).unwrap();
    let fence = h.agent.load(1).unwrap().fence;
    assert_eq!(fence.released_through_epoch, 1);
    assert_eq!(fence.lease_id(), None);
    assert_eq!(rejected(h.run(1, key).await), Some(KeyRejection::Released));
    // A build recorded for the released lease is refused too.
    let built = h.agent.drive_fence(
        1,
        FenceEvent::Built {
            lease_id: 10,
            epoch: 1,
        },
    );
    assert!(matches!(
        built,
        Err(AgentError::KeyRejected(KeyRejection::Released))
    ));
}

#[tokio::test]
async fn an_expired_key_fences_its_lease_once_the_clock_passes_it() {
    let h = harness(&[1]);
    let key = h.key(1, 10, 1, 5_000);
    h.run(1, key.clone()).await.unwrap();
    assert!(h.agent.fence_expired_keys().unwrap().is_empty());
    assert!(
        matches!(h.phase(1), FencePhase::Leased { .. }),
        "not expired yet"
    );
    assert!(matches!(
        h.agent.drive_fence(1, FenceEvent::Altered),
        Err(AgentError::Locked { lease_id: 10, .. })
    ));
    h.clock.advance_ms(4_000);
    let wipes = h.agent.fence_expired_keys().unwrap();
    assert_eq!(wipes.len(), 1);
    assert_eq!(
        rejected(h.run(1, key.clone()).await),
        Some(KeyRejection::Released),
        "fenced before the wipe"
    );
    for wipe in wipes {
        wipe.await.unwrap();
    }
    assert_eq!(h.phase(1), FencePhase::Free);
    assert_eq!(h.agent.load(1).unwrap().fence.released_through_epoch, 1);
    assert_eq!(*h.driver.wipes.lock().unwrap(), vec![1]);
    // The lender may alter it again.
    assert!(h.agent.drive_fence(1, FenceEvent::Altered).is_ok());
}

#[tokio::test]
async fn cores_the_driver_gave_are_kept_with_the_partition_and_restored_at_start() {
    let h = harness(&[2, 1]);
    // Partition 2 builds first and takes the least shared cores.
    h.run(2, h.key(2, 20, 1, 1_000_000)).await.unwrap();
    h.run(1, h.key(1, 10, 1, 1_000_000)).await.unwrap();
    let rows = h.agent.db().partitions().unwrap();
    let kept: Vec<(u32, Vec<u32>)> = rows.iter().map(|r| (r.index, r.cores.clone())).collect();
    assert_eq!(kept, vec![(1, vec![1, 2]), (2, vec![0])]);
    // A restart: a new driver gets the kept cores from the table.
    let restarted = TestDriver::new();
    crate::restore_cores(&h.agent.db(), &restarted).unwrap();
    assert_eq!(restarted.cores_of(1), Some(vec![1, 2]));
    assert_eq!(restarted.cores_of(2), Some(vec![0]));
    // A wipe at the end of a lease keeps them: they go with the partition.
    let release = h.notice(NoticeKind::LeaseReleased, 1, 10, 1);
    h.agent.apply_notice(&release).await.unwrap();
    assert_eq!(h.agent.load(1).unwrap().cores, vec![1, 2]);
}
