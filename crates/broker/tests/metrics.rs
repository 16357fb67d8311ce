//! The broker's `/metrics`, scraped over real HTTP: a lease and its release
//! move the counters, a conflict is counted by its code, requests are
//! counted by route template, only the admin may read it unless the broker
//! serves it publicly, and each broker in a process counts only its own.

use leasehold_api::{Client, LeaseRequest, RegisterHostRequest, RegisterPartitionRequest, Role};
use leasehold_broker::{BrokerConfig, RunningBroker, DEFAULT_KEY_TTL_MS};
use leasehold_core::{HostCapacity, Requirements, Terms};
use leasehold_service::SimulatedClock;
use leasehold_store::Durability;

const START_MS: u64 = 1_700_000_000_000;

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
        price_per_hour_micros: 3_600_000,
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

/// A broker with host 'alpha' (partitions 1 and 2, no agent); the admin's
/// and a borrower's tokens.
async fn market(dir: &std::path::Path, metrics_public: bool) -> (RunningBroker, String, String) {
    let clock = SimulatedClock::starting_at(START_MS);
    let mut config = broker_config(dir.join("broker"), &clock);
    config.metrics_public = metrics_public;
    let broker = leasehold_broker::start(config).await.unwrap();
    let admin_token = broker.bootstrap_admin_token.clone().unwrap();
    let admin = Client::new(&broker.url(), Some(admin_token.clone()));
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
    let lender = Client::new(&broker.url(), Some(lender_token));
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
    (broker, admin_token, borrower_token)
}

/// `GET /metrics` with an optional bearer: status, content type, body.
async fn scrape(broker: &RunningBroker, token: Option<&str>) -> (u16, String, String) {
    let mut request = reqwest::Client::new().get(format!("{}/metrics", broker.url()));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, content_type, response.text().await.unwrap())
}

/// The value of one series (name with its labels, exactly as written), 0
/// when it is not there yet.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(series)?;
            rest.strip_prefix(' ')?.trim().parse::<f64>().ok()
        })
        .unwrap_or(0.0)
}

fn lease_of(partition: &str) -> LeaseRequest {
    LeaseRequest {
        partition: Some(partition.into()),
        best: None,
        allow_unisolated: true,
        start: None,
        end: None,
    }
}

#[tokio::test]
async fn a_lease_and_its_release_move_the_counters_only_the_admin_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, admin_token, borrower_token) = market(dir.path(), false).await;
    assert_eq!(scrape(&broker, None).await.0, 401);
    assert_eq!(scrape(&broker, Some(&borrower_token)).await.0, 403);
    let (status, content_type, before) = scrape(&broker, Some(&admin_token)).await;
    assert_eq!(status, 200, "{before}");
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(
        before.contains("# TYPE leasehold_broker_leases_started counter"),
        "{before}"
    );
    assert_eq!(value(&before, "leasehold_broker_leases_started_total"), 0.0);

    let borrower = Client::new(&broker.url(), Some(borrower_token.clone()));
    borrower.find(&Requirements::default(), None).await.unwrap();
    let lease = borrower.lease(&lease_of("alpha/1")).await.unwrap();
    let taken = borrower.lease(&lease_of("alpha/1")).await.unwrap_err();
    assert_eq!(taken.status(), Some(409), "{taken}");
    let (_, _, during) = scrape(&broker, Some(&admin_token)).await;
    assert_eq!(
        value(&during, "leasehold_broker_leases_active"),
        1.0,
        "{during}"
    );
    borrower.release(lease.lease_id).await.unwrap();

    let (_, _, after) = scrape(&broker, Some(&admin_token)).await;
    assert_eq!(
        value(&after, "leasehold_broker_leases_started_total"),
        1.0,
        "{after}"
    );
    assert_eq!(value(&after, "leasehold_broker_leases_released_total"), 1.0);
    assert_eq!(value(&after, "leasehold_broker_leases_active"), 0.0);
    assert_eq!(
        value(
            &after,
            r#"leasehold_broker_refusals_total{code="partition_taken"}"#
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        value(&after, "leasehold_broker_find_duration_seconds_count"),
        1.0
    );
    assert!(
        value(&after, "leasehold_broker_writer_batch_commands_count")
            > value(&before, "leasehold_broker_writer_batch_commands_count")
    );
    assert!(
        value(
            &after,
            "leasehold_broker_writer_commit_duration_seconds_count"
        ) > value(
            &before,
            "leasehold_broker_writer_commit_duration_seconds_count"
        )
    );
    let release_route = r#"leasehold_broker_http_requests_total{method="POST",route="/v1/leases/{lease_id}/release",status="200"}"#;
    assert_eq!(value(&after, release_route), 1.0, "{after}");
    let conflicts =
        r#"leasehold_broker_http_requests_total{method="POST",route="/v1/leases",status="409"}"#;
    assert_eq!(value(&after, conflicts), 1.0, "{after}");
    // Labels name routes and codes, never who asked or with what.
    for secret in [
        &borrower_token,
        &admin_token,
        &lease.lease_key.clone().unwrap_or_default(),
    ] {
        assert!(secret.is_empty() || !after.contains(secret.as_str()));
    }
    assert!(!after.contains("borrower"), "{after}");
    broker.shutdown().await;
}

#[tokio::test]
async fn each_broker_counts_its_own_and_a_public_one_needs_no_token() {
    let first_dir = tempfile::tempdir().unwrap();
    let second_dir = tempfile::tempdir().unwrap();
    let (first, _, first_borrower) = market(first_dir.path(), false).await;
    let (second, _, _) = market(second_dir.path(), true).await;
    let borrower = Client::new(&first.url(), Some(first_borrower));
    borrower.lease(&lease_of("alpha/2")).await.unwrap();
    let (status, _, text) = scrape(&second, None).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        value(&text, "leasehold_broker_leases_started_total"),
        0.0,
        "{text}"
    );
    assert!(
        text.contains("leasehold_broker_leases_started_total 0"),
        "{text}"
    );
    first.shutdown().await;
    second.shutdown().await;
}
