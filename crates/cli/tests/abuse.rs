//! End-to-end tests of what an anonymous client, a stranger with a token
//! and a careless client can do to the servers: slow bodies and idle
//! connections must not stop an authenticated borrower or swell the broker,
//! ids a caller cannot see answer as missing ones, and bad bodies get 4xx.

mod common;

use common::{
    address_of, answered_status, open_idle_connections, open_stalled_bodies, rss_kib,
    status_and_body, terms, Cluster,
};
use leasehold_api::{Client, LeaseRequest, SubmitJobRequest};
use leasehold_core::Requirements;
use reqwest::Method;
use std::time::Duration;

/// The one place a lease request is built here.
fn lease_request(partition: Option<&str>, best: Option<Requirements>) -> LeaseRequest {
    LeaseRequest {
        partition: partition.map(str::to_string),
        best,
        allow_unisolated: false,
        start: None,
        end: None,
    }
}

/// A deadline that only guards against a hang.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// Anonymous clients each declaring a 1 MB body and sending half of it.
const STALLED_BODIES: usize = 400;
/// Connections that never send a byte; several thousand, yet few enough
/// for a 2-core machine running other tests.
const IDLE_CONNECTIONS: usize = 3000;

#[tokio::test(flavor = "multi_thread")]
async fn a_borrower_finds_and_leases_while_anonymous_clients_stall_and_idle() {
    leasehold_service::raise_open_files_limit();
    let mut cluster = Cluster::start(&[]).await;
    let alpha = cluster.start_agent("alpha", "sim");
    Client::new(&alpha, Some(cluster.lender_token.clone()))
        .agent_add_partition(&terms(1, 512, "busybox", 1000))
        .await
        .unwrap();
    let (_, bob) = cluster.borrower("bob").await;
    let broker_pid = cluster.broker.as_ref().unwrap().child.id();
    let address = address_of(&cluster.broker_url);
    let rss_before_kib = rss_kib(broker_pid);

    let mut stalled = open_stalled_bodies(
        &address,
        STALLED_BODIES,
        "/v1/find",
        None,
        1_000_000,
        500_000,
    )
    .await;
    let idle = open_idle_connections(&address, IDLE_CONNECTIONS).await;

    // While every attacking connection is held, the borrower gets through.
    let work = async {
        let found = bob.find(&Requirements::default(), None).await.unwrap();
        assert_eq!(found.offers.len(), 1, "{found:?}");
        let lease = bob
            .lease(&lease_request(None, Some(Requirements::default())))
            .await
            .unwrap();
        let receipt = bob.release(lease.lease_id).await.unwrap();
        assert!(!receipt.already_released);
    };
    tokio::time::timeout(HANG_GUARD, work)
        .await
        .expect("find, lease and release finished");
    let rss_during_kib = rss_kib(broker_pid);
    let grew_mib = rss_during_kib.saturating_sub(rss_before_kib) / 1024;
    eprintln!("broker RSS {rss_before_kib} -> {rss_during_kib} KiB under attack");
    assert!(
        grew_mib < 64,
        "broker RSS grew by {grew_mib} MiB ({rss_before_kib} -> {rss_during_kib} KiB) \
         under {STALLED_BODIES} stalled bodies and {IDLE_CONNECTIONS} idle connections"
    );

    // The stalled anonymous requests were answered 401 with half of their
    // body unsent: authentication came before the body.
    for stream in stalled.iter_mut() {
        let status = answered_status(stream, HANG_GUARD).await;
        assert_eq!(status, Some(401), "an anonymous body was waited for");
    }
    drop(idle);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_body_is_refused_before_it_all_arrives() {
    let cluster = Cluster::start(&[]).await;
    let (token, _) = cluster.borrower("bob").await;
    let address = address_of(&cluster.broker_url);
    // A borrower declaring 1 MB for a find (limit 16 KiB) and stalling
    // after 20 KB is refused at once, not held for the rest.
    for path in ["/v1/find", "/v1/leases"] {
        let mut streams =
            open_stalled_bodies(&address, 1, path, Some(&token), 1_000_000, 20_000).await;
        let status = answered_status(&mut streams[0], HANG_GUARD).await;
        assert_eq!(status, Some(413), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_find_bodies_get_4xx_naming_the_problem() {
    let cluster = Cluster::start(&[]).await;
    let (token, _) = cluster.borrower("bob").await;
    let url = format!("{}/v1/find", cluster.broker_url);
    let check = |body: &'static str, content_type: &'static str, status: u16, field: &str| {
        let (url, token, field) = (url.clone(), token.clone(), field.to_string());
        async move {
            let response = reqwest::Client::new()
                .post(&url)
                .bearer_auth(&token)
                .header("content-type", content_type)
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(
                response.status().as_u16(),
                status,
                "{body} as {content_type}"
            );
            let answer: serde_json::Value = response.json().await.unwrap();
            assert_eq!(
                answer["error"]["field"].as_str(),
                Some(field.as_str()),
                "{body} as {content_type}: {answer}"
            );
            answer["error"]["message"].as_str().unwrap().to_string()
        }
    };
    let message = check("[]", "application/json", 400, "body").await;
    assert!(message.contains("must be a JSON object"), "{message}");
    let message = check("null", "application/json", 400, "body").await;
    assert!(message.contains("must be a JSON object"), "{message}");
    check("7", "application/json", 400, "body").await;
    let message = check("{}", "text/plain", 415, "Content-Type").await;
    assert!(message.contains("text/plain"), "{message}");
    check(
        "{}",
        "application/x-www-form-urlencoded",
        415,
        "Content-Type",
    )
    .await;
    // The well-formed request still works.
    let (status, _) = status_and_body(Method::POST, &url, &token, Some("{}")).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn ids_a_caller_cannot_see_answer_exactly_as_missing_ones() {
    let mut cluster = Cluster::start(&[]).await;
    let alpha = cluster.start_agent("alpha", "sim");
    let lender_agent = Client::new(&alpha, Some(cluster.lender_token.clone()));
    for _ in 0..2 {
        lender_agent
            .agent_add_partition(&terms(1, 512, "busybox", 1000))
            .await
            .unwrap();
    }
    let (_, bob) = cluster.borrower("bob").await;
    let (carol_token, carol) = cluster.borrower("carol").await;
    let named = |partition: &str| lease_request(Some(partition), None);
    let bobs = bob.lease(&named("alpha/1")).await.unwrap();
    let carols = carol.lease(&named("alpha/2")).await.unwrap();
    let url = cluster.broker_url.clone();
    let missing_lease = bobs.lease_id + carols.lease_id + 1000;

    // Bob's lease, to Carol, is the same 404 as a lease that never was.
    for (method, suffix) in [(Method::GET, ""), (Method::POST, "/release")] {
        let bobs_answer = status_and_body(
            method.clone(),
            &format!("{url}/v1/leases/{}{suffix}", bobs.lease_id),
            &carol_token,
            None,
        )
        .await;
        let missing_answer = status_and_body(
            method.clone(),
            &format!("{url}/v1/leases/{missing_lease}{suffix}"),
            &carol_token,
            None,
        )
        .await;
        assert_eq!(bobs_answer.0, 404, "{method} {suffix}");
        assert_eq!(bobs_answer, missing_answer, "{method} {suffix}");
    }
    // Bob still holds his lease: Carol's release did nothing.
    assert!(bob
        .get_lease(bobs.lease_id)
        .await
        .unwrap()
        .lease_key
        .is_some());

    // Another lender's host is the same 404 as a host that never was.
    let stranger = cluster
        .admin()
        .create_principal("lender2", leasehold_api::Role::Lender)
        .await
        .unwrap()
        .token;
    let terms_body = serde_json::json!({"terms": terms(1, 512, "busybox", 1000)}).to_string();
    for (method, body) in [
        (Method::DELETE, None),
        (Method::PUT, Some(terms_body.as_str())),
    ] {
        let theirs = status_and_body(
            method.clone(),
            &format!("{url}/v1/hosts/alpha/partitions/2"),
            &stranger,
            body,
        )
        .await;
        let missing = status_and_body(
            method.clone(),
            &format!("{url}/v1/hosts/nowhere/partitions/2"),
            &stranger,
            body,
        )
        .await;
        assert_eq!(theirs.0, 404, "{method}");
        assert_eq!(theirs, missing, "{method}");
    }

    // On the agent: Bob's job, read or cancelled with Carol's key, is the
    // same 404 as a job that never was.
    let bobs_key = bobs.lease_key.clone().unwrap();
    let carols_key = carols.lease_key.clone().unwrap();
    let job = Client::new(&alpha, None)
        .submit_job(
            1,
            &SubmitJobRequest {
                lease_key: bobs_key.clone(),
                command: vec!["true".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for suffix in ["", "/cancel"] {
        let method = if suffix.is_empty() {
            Method::GET
        } else {
            Method::POST
        };
        let bobs_job = status_and_body(
            method.clone(),
            &format!("{alpha}/v1/jobs/{}{suffix}", job.job_id),
            &carols_key,
            None,
        )
        .await;
        let missing_job = status_and_body(
            method.clone(),
            &format!("{alpha}/v1/jobs/{}{suffix}", job.job_id + 1000),
            &carols_key,
            None,
        )
        .await;
        assert_eq!(bobs_job.0, 404, "{suffix}");
        assert_eq!(bobs_job, missing_job, "{suffix}");
    }
    // Bob himself still reads it.
    let (status, _) = status_and_body(
        Method::GET,
        &format!("{alpha}/v1/jobs/{}", job.job_id),
        &bobs_key,
        None,
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_checks_a_jobs_key_before_reading_its_body() {
    let mut cluster = Cluster::start(&[]).await;
    let alpha = cluster.start_agent("alpha", "sim");
    Client::new(&alpha, Some(cluster.lender_token.clone()))
        .agent_add_partition(&terms(1, 512, "busybox", 1000))
        .await
        .unwrap();
    let address = address_of(&alpha);
    // No key, a forged key, and a notice without the broker's signature:
    // each answered while most of its declared body is still unsent.
    let cases = [
        ("/v1/partitions/1/jobs", None, 401),
        ("/v1/partitions/1/jobs", Some("lk1.forged.key"), 403),
        ("/v1/notices", None, 401),
        ("/v1/notices", Some("ln1.forged.notice"), 403),
        ("/v1/partitions", None, 401),
    ];
    for (path, token, expected) in cases {
        let mut streams = open_stalled_bodies(&address, 1, path, token, 1_000_000, 500_000).await;
        let status = answered_status(&mut streams[0], HANG_GUARD).await;
        assert_eq!(status, Some(expected), "{path} with {token:?}");
    }
}
