//! The agent's `/metrics`, scraped over real HTTP: jobs are counted by
//! outcome, refused keys by reason, requests by route template; only the
//! host's lender reads it unless the agent serves it publicly. A broker
//! and an agent (sim driver) run in this process on 127.0.0.1:0.

use leasehold_agent::driver::DriverKind;
use leasehold_agent::{AgentConfig, RunningAgent};
use leasehold_api::{Client, LeaseRequest, LeaseView, Role, SubmitJobRequest};
use leasehold_broker::{BrokerConfig, RunningBroker, DEFAULT_KEY_TTL_MS};
use leasehold_core::key::{self, LeaseKeyClaims};
use leasehold_core::{HostCapacity, Terms};
use leasehold_service::SimulatedClock;
use leasehold_store::Durability;
use std::path::Path;

const START_MS: u64 = 1_700_000_000_000;

struct Market {
    broker: RunningBroker,
    agent: RunningAgent,
    lender_token: String,
    borrower: Client,
    _dir: tempfile::TempDir,
}

fn broker_config(data_dir: &Path, clock: &SimulatedClock) -> BrokerConfig {
    BrokerConfig {
        data_dir: data_dir.to_path_buf(),
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

fn agent_config(data_dir: &Path, broker_url: String, lender_token: String) -> AgentConfig {
    AgentConfig {
        markets: Vec::new(),
        direct: false,
        key_confirmation: Default::default(),
        host_id: "alpha".into(),
        data_dir: data_dir.to_path_buf(),
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
        clock: SimulatedClock::starting_at(START_MS).shared(),
        revocation_poll_interval_ms: 3_600_000,
        tls: None,
        client_trust: Default::default(),
        sampling: Default::default(),
        rights: None,
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
        price_per_hour_micros: 1_000,
        isolation: None,
    }
}

async fn start_market(metrics_public: bool) -> Market {
    let dir = tempfile::tempdir().unwrap();
    let clock = SimulatedClock::starting_at(START_MS);
    let broker = leasehold_broker::start(broker_config(&dir.path().join("broker"), &clock))
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
    let mut config = agent_config(
        &dir.path().join("agent"),
        broker.url(),
        lender_token.clone(),
    );
    config.clock = clock.shared();
    config.metrics_public = metrics_public;
    let agent = leasehold_agent::start(config).await.unwrap();
    let lender_at_agent = Client::new(&agent.url(), Some(lender_token.clone()));
    for _ in 0..2 {
        lender_at_agent.agent_add_partition(&terms()).await.unwrap();
    }
    Market {
        borrower: Client::new(&broker.url(), Some(borrower_token)),
        broker,
        agent,
        lender_token,
        _dir: dir,
    }
}

/// `GET /metrics` on the agent with an optional bearer: status and body.
async fn scrape(agent: &RunningAgent, token: Option<&str>) -> (u16, String) {
    let mut request = reqwest::Client::new().get(format!("{}/metrics", agent.url()));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// The value of one series (name with its labels, as written), 0 when absent.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(series)?;
            rest.strip_prefix(' ')?.trim().parse::<f64>().ok()
        })
        .unwrap_or(0.0)
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

fn job(key: &str, command: &str) -> SubmitJobRequest {
    SubmitJobRequest {
        lease_key: key.to_string(),
        command: vec![command.into()],
        ..Default::default()
    }
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

#[tokio::test]
async fn jobs_are_counted_by_outcome_and_refused_keys_by_reason_for_the_lender_only() {
    let market = start_market(false).await;
    assert_eq!(scrape(&market.agent, None).await.0, 401);
    let (status, before) = scrape(&market.agent, Some(&market.lender_token)).await;
    assert_eq!(status, 200, "{before}");
    assert!(
        before.contains("# TYPE leasehold_agent_jobs counter"),
        "{before}"
    );
    assert_eq!(
        value(&before, "leasehold_agent_partitions"),
        2.0,
        "{before}"
    );

    let lease = lease(&market, "alpha/1").await;
    let key = lease.lease_key.clone().unwrap();
    let jobs = Client::new(&market.agent.url(), None);
    let ran = jobs.submit_job(1, &job(&key, "true")).await.unwrap();
    assert_eq!(ran.exit_code, Some(0));
    let failed = jobs.submit_job(1, &job(&key, "false")).await.unwrap();
    assert_eq!(failed.exit_code, Some(1));
    let forged = jobs.submit_job(1, &job(&forged_key(&lease), "true")).await;
    assert_eq!(forged.unwrap_err().status(), Some(403));

    let (_, after) = scrape(&market.agent, Some(&market.lender_token)).await;
    let succeeded = r#"leasehold_agent_jobs_total{outcome="succeeded"}"#;
    assert_eq!(value(&after, succeeded), 1.0, "{after}");
    assert_eq!(
        value(&after, r#"leasehold_agent_jobs_total{outcome="failed"}"#),
        1.0
    );
    let bad_signature = r#"leasehold_agent_key_refusals_total{reason="bad_signature"}"#;
    assert_eq!(value(&after, bad_signature), 1.0, "{after}");
    let submitted = r#"leasehold_agent_http_requests_total{method="POST",route="/v1/partitions/{index}/jobs",status="200"}"#;
    assert_eq!(value(&after, submitted), 2.0, "{after}");
    assert_eq!(
        value(&after, "leasehold_agent_partitions_leased"),
        1.0,
        "{after}"
    );
    assert_eq!(value(&after, "leasehold_agent_jobs_running"), 0.0);
    // The sim driver has no cgroups: no usage series, rather than zeros.
    assert!(!after.contains("partition_cpu_seconds"), "{after}");
    assert!(!after.contains(&key) && !after.contains(&market.lender_token));
    market.agent.shutdown().await;
    market.broker.shutdown().await;
}

#[tokio::test]
async fn a_public_agent_serves_its_metrics_without_a_token() {
    let market = start_market(true).await;
    let (status, text) = scrape(&market.agent, None).await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains("# TYPE leasehold_agent_http_requests counter"),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
    market.agent.shutdown().await;
    market.broker.shutdown().await;
}
