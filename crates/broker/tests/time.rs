//! The broker's wall-clock rules, tested by moving a simulated clock instead
//! of waiting: billing by the started second, the idempotency records' day,
//! and release notices that last as long as the key they fence (in the
//! revocation list, and in the outbox's retries). The broker runs in this
//! process on 127.0.0.1:0 and is driven over HTTP.

use leasehold_api::{
    Client, LeaseRequest, LeaseView, RegisterHostRequest, RegisterPartitionRequest, Role,
};
use leasehold_broker::{BrokerConfig, RunningBroker, DEFAULT_KEY_TTL_MS};
use leasehold_core::{HostCapacity, Terms};
use leasehold_service::SimulatedClock;
use leasehold_store::Durability;
use std::time::Duration;

/// Any fixed time will do; this one reads like a real date (2023-11-14).
const START_MS: u64 = 1_700_000_000_000;
const DAY_MS: u64 = 24 * 3600 * 1000;
/// 3.6 units per hour: one milli-unit (1,000 micros) per second.
const PRICE_PER_HOUR_MICROS: u64 = 3_600_000;

/// A broker on a simulated clock with a lender's host 'alpha' (partitions
/// 1 and 2, no agent) and a borrower.
struct Market {
    clock: SimulatedClock,
    broker: RunningBroker,
    lender: Client,
    borrower: Client,
    borrower_token: String,
    _dir: tempfile::TempDir,
}

fn broker_config(data_dir: std::path::PathBuf, clock: &SimulatedClock) -> BrokerConfig {
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
        plan_policy: Default::default(),
        run_planner: false,
        metrics_public: false,
    }
}

fn terms() -> Terms {
    Terms {
        vcpus: 1,
        cpu_cap_percent: 100,
        memory_mib: 256,
        disk_gib: 1,
        images: vec!["busybox".into()],
        price_per_hour_micros: PRICE_PER_HOUR_MICROS,
        isolation: None,
    }
}

fn capacity() -> HostCapacity {
    HostCapacity {
        cpu_centicores: 800,
        memory_mib: 8192,
        disk_gib: 100,
        owner_share_cpu_centicores: 0,
        owner_share_memory_mib: 0,
        owner_share_disk_gib: 0,
    }
}

async fn start_market() -> Market {
    let dir = tempfile::tempdir().unwrap();
    let clock = SimulatedClock::starting_at(START_MS);
    let broker = leasehold_broker::start(broker_config(dir.path().join("broker"), &clock))
        .await
        .unwrap();
    let admin = Client::new(&broker.url(), broker.bootstrap_admin_token.clone());
    let token_of = |role| {
        let admin = admin.clone();
        async move {
            let name = format!("{role:?}").to_lowercase();
            admin.create_principal(&name, role).await.unwrap().token
        }
    };
    let lender = Client::new(&broker.url(), Some(token_of(Role::Lender).await));
    let borrower_token = token_of(Role::Borrower).await;
    let borrower = Client::new(&broker.url(), Some(borrower_token.clone()));
    let host = RegisterHostRequest {
        share: None,
        agent_url: None,
        capacity: capacity(),
    };
    lender.register_host("alpha", &host).await.unwrap();
    for index in [1, 2] {
        let partition = RegisterPartitionRequest { terms: terms() };
        lender
            .register_partition("alpha", index, &partition)
            .await
            .unwrap();
    }
    Market {
        clock,
        broker,
        lender,
        borrower,
        borrower_token,
        _dir: dir,
    }
}

fn lease_named(partition: &str) -> LeaseRequest {
    LeaseRequest {
        partition: Some(partition.into()),
        best: None,
        // Registered by the lender, not an agent: its isolation is unknown.
        allow_unisolated: true,
        start: None,
        end: None,
    }
}

/// Asks for a lease with a chosen idempotency key: its status and lease.
async fn lease_with_key(market: &Market, partition: &str, key: &str) -> (u16, LeaseView) {
    let response = reqwest::Client::new()
        .post(format!("{}/v1/leases", market.broker.url()))
        .bearer_auth(&market.borrower_token)
        .header(leasehold_api::IDEMPOTENCY_HEADER, key)
        .json(&lease_named(partition))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let view = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status} {text}: {e}"));
    (status, view)
}

#[tokio::test]
async fn a_lease_bills_every_started_simulated_second_exactly() {
    let market = start_market().await;
    // Released 90.000 s after it started: exactly 90 s.
    let lease = market
        .borrower
        .lease(&lease_named("alpha/1"))
        .await
        .unwrap();
    assert_eq!(lease.started_at_ms, START_MS);
    market.clock.advance_ms(90_000);
    let receipt = market.borrower.release(lease.lease_id).await.unwrap();
    assert_eq!(
        receipt.lease.release_requested_at_ms,
        Some(START_MS + 90_000)
    );
    assert_eq!(receipt.bill.billable_seconds, 90);
    assert_eq!(receipt.bill.charge_micros, 90_000);
    assert_eq!(receipt.bill.lender_credit_micros, 90_000);
    // One millisecond into the 91st second: that second counts.
    let lease = market
        .borrower
        .lease(&lease_named("alpha/2"))
        .await
        .unwrap();
    market.clock.advance_ms(90_001);
    let receipt = market.borrower.release(lease.lease_id).await.unwrap();
    assert_eq!(receipt.bill.billable_seconds, 91);
    assert_eq!(receipt.bill.charge_micros, 91_000);
    // A second release a day later bills nothing more.
    market.clock.advance_ms(DAY_MS);
    let again = market.borrower.release(lease.lease_id).await.unwrap();
    assert!(again.already_released);
    assert_eq!(again.bill.charge_micros, 91_000);
    let bill = market.borrower.bill().await.unwrap();
    assert_eq!(bill.balance_micros, -181_000, "{bill:?}");
}

#[tokio::test]
async fn an_idempotency_record_is_honoured_for_a_day_and_forgotten_after() {
    let market = start_market().await;
    let (status, first) = lease_with_key(&market, "alpha/1", "retry-me").await;
    assert_eq!(status, 201);
    market.borrower.release(first.lease_id).await.unwrap();
    // 23:59:59 later the same key answers with the same lease, not a new one.
    market.clock.advance_ms(DAY_MS - 1_000);
    let (status, replayed) = lease_with_key(&market, "alpha/1", "retry-me").await;
    assert_eq!((status, replayed.lease_id), (200, first.lease_id));
    // Exactly a day old, it still holds...
    market.clock.advance_ms(1_000);
    let (status, replayed) = lease_with_key(&market, "alpha/1", "retry-me").await;
    assert_eq!((status, replayed.lease_id), (200, first.lease_id));
    // ...and a millisecond later it is forgotten: the key concludes a new lease.
    market.clock.advance_ms(1);
    let (status, fresh) = lease_with_key(&market, "alpha/1", "retry-me").await;
    assert_eq!(status, 201);
    assert!(fresh.lease_id > first.lease_id);
    assert_eq!(fresh.started_at_ms, START_MS + DAY_MS + 1);
}

#[tokio::test]
async fn a_restarted_broker_forgets_idempotency_records_older_than_a_day() {
    let market = start_market().await;
    let (status, first) = lease_with_key(&market, "alpha/1", "across-restarts").await;
    assert_eq!(status, 201);
    market.borrower.release(first.lease_id).await.unwrap();
    let data_dir = market._dir.path().join("broker");
    let clock = market.clock.clone();
    market.broker.shutdown().await;
    // The binary runs with umask 077; this test process does not.
    for name in ["broker.db", "broker.db-wal", "broker.db-shm"] {
        use std::os::unix::fs::PermissionsExt;
        let private = std::fs::Permissions::from_mode(0o600);
        let _ = std::fs::set_permissions(data_dir.join(name), private);
    }
    // Started again a day and a millisecond later, on the same data.
    clock.advance_ms(DAY_MS + 1);
    let broker = leasehold_broker::start(broker_config(data_dir, &clock))
        .await
        .unwrap();
    let restarted = Market {
        clock,
        broker,
        ..market
    };
    let (status, fresh) = lease_with_key(&restarted, "alpha/1", "across-restarts").await;
    assert_eq!(status, 201);
    assert!(fresh.lease_id > first.lease_id);
}

#[tokio::test]
async fn a_release_notice_is_listed_until_the_key_it_fences_expires() {
    let market = start_market().await;
    let lease = market
        .borrower
        .lease(&lease_named("alpha/1"))
        .await
        .unwrap();
    assert_eq!(lease.key_expires_at_ms, START_MS + DEFAULT_KEY_TTL_MS);
    market.borrower.release(lease.lease_id).await.unwrap();
    let listed = |market: &Market| {
        let lender = market.lender.clone();
        async move {
            let page = lender.host_revocations("alpha", 0).await.unwrap();
            page.revocations
                .iter()
                .map(|r| r.lease_id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(listed(&market).await, vec![lease.lease_id]);
    // A key that still verifies somewhere must stay fenced: listed until
    // the last millisecond of its life...
    let left_ms = lease.key_expires_at_ms - 1 - START_MS;
    market.clock.advance_ms(left_ms);
    assert_eq!(listed(&market).await, vec![lease.lease_id]);
    // ...and not after: an expired key is refused by its expiry alone.
    market.clock.advance_ms(1);
    assert_eq!(listed(&market).await, Vec::<u64>::new());
}

/// An agent on 127.0.0.1:0 that never takes a release notice (503: try
/// again) and takes every other notice. It reports the lease of each
/// release notice as it arrives, and on the second attempt for the lease
/// named in `expire_on_second_attempt` it moves the clock to that key's
/// expiry before answering, so the broker sees the key expire between two
/// attempts at a known point, whatever the machine's load.
struct RefusingAgent {
    clock: SimulatedClock,
    /// (lease id, its key's expiry).
    expire_on_second_attempt: std::sync::Mutex<Option<(u64, u64)>>,
    attempts: std::sync::Mutex<std::collections::HashMap<u64, u32>>,
    /// Each release notice's lease, and when it arrived.
    arrived: tokio::sync::mpsc::UnboundedSender<(u64, tokio::time::Instant)>,
    broker_key: ed25519_dalek::VerifyingKey,
}

impl RefusingAgent {
    fn take(&self, notice: &str) -> axum::http::StatusCode {
        use leasehold_core::key::{decode_notice, NoticeKind};
        let claims = decode_notice(notice, &self.broker_key).expect("the broker signs notices");
        if claims.kind != NoticeKind::LeaseReleased {
            return axum::http::StatusCode::OK;
        }
        let attempt = {
            let mut attempts = self.attempts.lock().unwrap();
            let count = attempts.entry(claims.lease_id).or_default();
            *count += 1;
            *count
        };
        let target = *self.expire_on_second_attempt.lock().unwrap();
        if let Some((lease_id, expires_at_ms)) = target {
            if lease_id == claims.lease_id && attempt == 2 {
                let now_ms = leasehold_service::Clock::now_ms(&self.clock);
                self.clock.advance_ms(expires_at_ms.saturating_sub(now_ms));
            }
        }
        let _ = self
            .arrived
            .send((claims.lease_id, tokio::time::Instant::now()));
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn start_refusing_agent(agent: std::sync::Arc<RefusingAgent>) -> String {
    let handler = move |headers: axum::http::HeaderMap| {
        let agent = agent.clone();
        async move {
            let notice = leasehold_service::bearer_token(&headers).unwrap_or("");
            (agent.take(notice), "{}")
        }
    };
    let router = axum::Router::new().route("/v1/notices", axum::routing::post(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    url
}

#[tokio::test]
async fn an_undelivered_release_notice_is_retried_until_its_key_expires_then_dropped() {
    let market = start_market().await;
    let info = market.borrower.broker_info().await.unwrap();
    let (arrived, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    let agent = std::sync::Arc::new(RefusingAgent {
        clock: market.clock.clone(),
        expire_on_second_attempt: Default::default(),
        attempts: Default::default(),
        arrived,
        broker_key: leasehold_core::key::verifying_key_from_hex(&info.public_key_hex).unwrap(),
    });
    let host = RegisterHostRequest {
        share: None,
        agent_url: Some(start_refusing_agent(agent.clone()).await),
        capacity: capacity(),
    };
    market.lender.register_host("alpha", &host).await.unwrap();
    let first = market
        .borrower
        .lease(&lease_named("alpha/1"))
        .await
        .unwrap();
    *agent.expire_on_second_attempt.lock().unwrap() =
        Some((first.lease_id, first.key_expires_at_ms));
    let receipt = market.borrower.release(first.lease_id).await.unwrap();
    assert!(!receipt.agent_notified);
    // Refused while the key is valid: tried again. The second attempt is
    // refused as the key expires: that one is the last, since an expired
    // key is refused by its expiry alone.
    let lease_of = |arrival: Option<(u64, tokio::time::Instant)>| arrival.map(|(lease, _)| lease);
    assert_eq!(lease_of(arrivals.recv().await), Some(first.lease_id));
    assert_eq!(lease_of(arrivals.recv().await), Some(first.lease_id));
    // A notice whose key is valid goes on being retried with backoff (0.2 s,
    // then 0.4 s). Had the first stayed queued, its next attempt (due 0.4 s
    // after its last) would have come before this one's third.
    let second = market
        .borrower
        .lease(&lease_named("alpha/2"))
        .await
        .unwrap();
    market.borrower.release(second.lease_id).await.unwrap();
    let mut attempts = Vec::new();
    while attempts.len() < 3 {
        attempts.push(arrivals.recv().await.unwrap());
    }
    let leases: Vec<u64> = attempts.iter().map(|(lease, _)| *lease).collect();
    assert_eq!(leases, vec![second.lease_id; 3]);
    // The waits are at least the backoff (a timer never fires early; how
    // much later depends on the machine, so no upper bound is asserted).
    let waited = |n: usize| attempts[n].1 - attempts[n - 1].1;
    assert!(waited(1) >= Duration::from_millis(200), "{:?}", waited(1));
    assert!(waited(2) >= Duration::from_millis(400), "{:?}", waited(2));
}
