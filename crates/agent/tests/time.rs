//! The agent's wall-clock rules, tested by moving a simulated clock that
//! the agent and its broker share, instead of waiting or issuing keys with
//! a zero TTL: a lease key's expiry, the broker-key refresh at most once per
//! 10 s, and the 60 s the broker's word on a lender's token is trusted. Both
//! services run in this process on 127.0.0.1:0, driven over HTTP.

use leasehold_agent::driver::DriverKind;
use leasehold_agent::{AgentConfig, RunningAgent};
use leasehold_api::{ApiError, Client, LeaseRequest, LeaseView, Role, SubmitJobRequest};
use leasehold_broker::{BrokerConfig, RunningBroker, DEFAULT_KEY_TTL_MS};
use leasehold_core::key::{self, KeyRejection, LeaseKeyClaims};
use leasehold_core::{HostCapacity, Terms};
use leasehold_service::{Clock, SimulatedClock};
use leasehold_store::Durability;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Any fixed time will do; this one reads like a real date (2023-11-14).
const START_MS: u64 = 1_700_000_000_000;
/// The agent asks the broker for its keys at most this often.
const KEY_REFRESH_INTERVAL_MS: u64 = 10_000;

struct Market {
    clock: SimulatedClock,
    broker: RunningBroker,
    agent: RunningAgent,
    /// The agent's client, with no token: jobs carry their lease key.
    jobs: Client,
    borrower: Client,
    dir: tempfile::TempDir,
}

fn broker_config(data_dir: PathBuf, listen: SocketAddr, clock: &SimulatedClock) -> BrokerConfig {
    BrokerConfig {
        data_dir,
        listen,
        durability: Durability::Normal,
        commission_basis_points: 0,
        key_ttl_ms: DEFAULT_KEY_TTL_MS,
        clock: clock.shared(),
        image_store_url: None,
        tls: None,
        client_trust: Default::default(),
        database_url: None,
        store_layer: None,
        plan_policy: Default::default(),
        run_planner: false,
        metrics_public: false,
    }
}

fn agent_config(data_dir: PathBuf, broker_url: String, lender_token: String) -> AgentConfig {
    AgentConfig {
        markets: Vec::new(),
        direct: false,
        key_confirmation: Default::default(),
        host_id: "alpha".into(),
        data_dir,
        listen: "127.0.0.1:0".parse().unwrap(),
        broker_url,
        lender_token,
        driver: DriverKind::Sim {
            images: vec!["busybox".into()],
        },
        capacity: HostCapacity {
            cpu_centicores: 800,
            memory_mib: 8192,
            disk_gib: 100,
            owner_share_cpu_centicores: 0,
            owner_share_memory_mib: 0,
            owner_share_disk_gib: 0,
        },
        advertise_url: None,
        // Set below by the caller: the broker's clock.
        clock: SimulatedClock::starting_at(0).shared(),
        // Pulls once at start, then not within these tests.
        revocation_poll_interval_ms: 3_600_000,
        tls: None,
        client_trust: Default::default(),
        sampling: Default::default(),
        rights: None,
        metrics_public: false,
    }
}

/// A broker and an agent (sim driver, host 'alpha', two partitions) on one
/// simulated clock, and a borrower.
async fn start_market() -> Market {
    let dir = tempfile::tempdir().unwrap();
    let clock = SimulatedClock::starting_at(START_MS);
    let listen = "127.0.0.1:0".parse().unwrap();
    let broker = leasehold_broker::start(broker_config(dir.path().join("broker"), listen, &clock))
        .await
        .unwrap();
    let admin = Client::new(&broker.url(), broker.bootstrap_admin_token.clone());
    let lender_token = admin
        .create_principal("lender", Role::Lender)
        .await
        .unwrap()
        .token;
    let borrower_token = admin
        .create_principal("borrower", Role::Borrower)
        .await
        .unwrap()
        .token;
    let mut config = agent_config(dir.path().join("agent"), broker.url(), lender_token.clone());
    config.clock = clock.shared();
    let agent = leasehold_agent::start(config).await.unwrap();
    let lender_at_agent = Client::new(&agent.url(), Some(lender_token));
    for _ in 0..2 {
        lender_at_agent.agent_add_partition(&terms()).await.unwrap();
    }
    Market {
        jobs: Client::new(&agent.url(), None),
        borrower: Client::new(&broker.url(), Some(borrower_token)),
        clock,
        broker,
        agent,
        dir,
    }
}

fn terms() -> Terms {
    Terms {
        vcpus: 1,
        cpu_cap_percent: 100,
        memory_mib: 256,
        disk_gib: 1,
        images: vec!["busybox".into()],
        price_per_hour_micros: 1_000,
        isolation: None,
    }
}

async fn lease(market: &Market, partition: &str) -> LeaseView {
    let request = LeaseRequest {
        partition: Some(partition.into()),
        best: None,
        allow_unisolated: false,
        start: None,
        end: None,
    };
    market.borrower.lease(&request).await.unwrap()
}

/// Runs `true` on `index` with `key`: the exit code, or why the key was refused.
async fn run_with(market: &Market, index: u32, key: &str) -> Result<i32, Option<KeyRejection>> {
    let job = SubmitJobRequest {
        lease_key: key.to_string(),
        command: vec!["true".into()],
        ..Default::default()
    };
    match market.jobs.submit_job(index, &job).await {
        Ok(result) => Ok(result.exit_code.unwrap_or(-1)),
        Err(error) => Err(rejection(&error)),
    }
}

fn rejection(error: &ApiError) -> Option<KeyRejection> {
    error.detail().and_then(|d| d.key_rejection.clone())
}

#[tokio::test]
async fn a_key_is_accepted_until_the_millisecond_before_it_expires_and_refused_from_then() {
    let market = start_market().await;
    let lease = lease(&market, "alpha/1").await;
    let key = lease.lease_key.clone().unwrap();
    assert_eq!(lease.key_expires_at_ms, START_MS + DEFAULT_KEY_TTL_MS);
    assert_eq!(run_with(&market, 1, &key).await, Ok(0));
    // A week less a millisecond later the key still runs jobs...
    market.clock.advance_ms(DEFAULT_KEY_TTL_MS - 1);
    assert_eq!(run_with(&market, 1, &key).await, Ok(0));
    // ...and from its expiry on it is refused, though never released.
    market.clock.advance_ms(1);
    assert_eq!(
        run_with(&market, 1, &key).await,
        Err(Some(KeyRejection::Expired))
    );
    market.clock.advance_ms(DEFAULT_KEY_TTL_MS);
    assert_eq!(
        run_with(&market, 1, &key).await,
        Err(Some(KeyRejection::Expired))
    );
}

/// A key for `lease` signed by a key no broker ever published.
fn forged_key(lease: &LeaseView) -> String {
    let forger = key::signing_key_from_seed([42; 32]);
    let claims = LeaseKeyClaims {
        not_before_ms: None,
        lease_id: lease.lease_id,
        host_id: lease.partition.host_id.clone(),
        partition_index: lease.partition.index,
        epoch: lease.epoch,
        borrower: lease.borrower.clone(),
        issued_at_ms: lease.started_at_ms,
        expires_at_ms: lease.key_expires_at_ms,
        key_id: key::key_id(&forger.verifying_key()),
        terms: Some(lease.terms.clone()),
    };
    key::sign(&claims, &forger)
}

/// Stops the broker, adds a signing key endorsed by the current one, and
/// starts it again on the same address and data (the agent keeps its URL).
async fn restart_broker_with_a_new_key(market: Market) -> Market {
    let data_dir = market.dir.path().join("broker");
    let listen = market.broker.local_addr;
    market.broker.shutdown().await;
    leasehold_broker::signing_keys::rotate(&data_dir, [7; 32], market.clock.now_ms()).unwrap();
    make_private(&data_dir);
    let broker = leasehold_broker::start(broker_config(data_dir, listen, &market.clock))
        .await
        .unwrap();
    Market { broker, ..market }
}

/// The binary runs with umask 077; this test process does not.
fn make_private(data_dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for name in ["broker.db", "broker.db-wal", "broker.db-shm"] {
        let private = std::fs::Permissions::from_mode(0o600);
        let _ = std::fs::set_permissions(data_dir.join(name), private);
    }
}

#[tokio::test]
async fn the_agent_asks_the_broker_for_new_keys_at_most_once_per_ten_seconds() {
    let market = start_market().await;
    let first = lease(&market, "alpha/1").await;
    // A key signed by an unknown key makes the agent ask the broker for its
    // keys (the broker may have rotated): nothing new, so refused.
    assert_eq!(
        run_with(&market, 1, &forged_key(&first)).await,
        Err(Some(KeyRejection::BadSignature))
    );
    // The broker rotates at once. Its new keys are genuine, but the agent
    // asked less than 10 s ago: it does not ask again, and refuses.
    let market = restart_broker_with_a_new_key(market).await;
    let second = lease(&market, "alpha/2").await;
    let key = second.lease_key.clone().unwrap();
    assert_eq!(
        run_with(&market, 2, &key).await,
        Err(Some(KeyRejection::BadSignature))
    );
    market.clock.advance_ms(KEY_REFRESH_INTERVAL_MS - 1);
    assert_eq!(
        run_with(&market, 2, &key).await,
        Err(Some(KeyRejection::BadSignature))
    );
    // 10 s after the last question it asks, learns the endorsed key, runs.
    market.clock.advance_ms(1);
    assert_eq!(run_with(&market, 2, &key).await, Ok(0));
    // Keys of the old signing key stay valid until they expire.
    let old_key = first.lease_key.clone().unwrap();
    assert_eq!(run_with(&market, 1, &old_key).await, Ok(0));
    market.agent.shutdown().await;
}

#[tokio::test]
async fn the_brokers_word_on_a_lender_token_is_trusted_for_sixty_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let clock = SimulatedClock::starting_at(START_MS);
    let listen = "127.0.0.1:0".parse().unwrap();
    let broker = leasehold_broker::start(broker_config(dir.path().join("broker"), listen, &clock))
        .await
        .unwrap();
    let admin = Client::new(&broker.url(), broker.bootstrap_admin_token.clone());
    let lender_token = admin
        .create_principal("lender", Role::Lender)
        .await
        .unwrap()
        .token;
    let lender = Client::new(&broker.url(), Some(lender_token.clone()));
    let credential = lender.create_host_credential("alpha").await.unwrap().token;
    // The agent holds only the host's credential; the lender's own token is
    // accepted at its lender interface because the broker vouches for it.
    let mut config = agent_config(dir.path().join("agent"), broker.url(), credential);
    config.clock = clock.shared();
    let agent = leasehold_agent::start(config).await.unwrap();
    let lender_at_agent = Client::new(&agent.url(), Some(lender_token));
    assert!(lender_at_agent.agent_list_partitions().await.is_ok());
    // With the broker gone, the answer it gave holds for 60 s, not longer.
    broker.shutdown().await;
    clock.advance_ms(60_000 - 1);
    assert!(lender_at_agent.agent_list_partitions().await.is_ok());
    clock.advance_ms(1);
    let error = lender_at_agent.agent_list_partitions().await.unwrap_err();
    assert!(matches!(error.status(), Some(401 | 403)), "{error}");
    agent.shutdown().await;
}

#[tokio::test]
async fn a_key_booked_ahead_is_refused_before_its_start_and_after_its_end() {
    let market = start_market().await;
    let start_ms = START_MS + 60_000;
    let end_ms = start_ms + 3_600_000;
    let request = LeaseRequest {
        partition: Some("alpha/1".into()),
        best: None,
        allow_unisolated: false,
        start: Some(leasehold_api::rfc3339_from_ms(start_ms)),
        end: Some(leasehold_api::rfc3339_from_ms(end_ms)),
    };
    let lease = market.borrower.lease(&request).await.unwrap();
    assert_eq!(lease.started_at_ms, start_ms, "billed from the start");
    assert_eq!(lease.key_expires_at_ms, end_ms);
    let key = lease.lease_key.clone().unwrap();
    assert_eq!(
        run_with(&market, 1, &key).await,
        Err(Some(KeyRejection::NotYetValid))
    );
    market.clock.advance_ms(60_000 - 1);
    assert_eq!(
        run_with(&market, 1, &key).await,
        Err(Some(KeyRejection::NotYetValid))
    );
    market.clock.advance_ms(1);
    assert_eq!(run_with(&market, 1, &key).await, Ok(0));
    market.clock.advance_ms(3_600_000);
    assert_eq!(
        run_with(&market, 1, &key).await,
        Err(Some(KeyRejection::Expired))
    );
}
