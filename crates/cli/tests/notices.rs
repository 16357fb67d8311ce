//! End-to-end tests of how a release reaches the host: the broker's durable
//! outbox of release notices, the agent's pull of its host's revocations
//! when notices are lost, and the broker's safe calls to lender-chosen agent
//! URLs (no redirects, bounded answers, no host takeover).

mod common;

use common::{spawn_ready_with_token, terms, Cluster, Proc};
use leasehold_api::{
    AgentPartitionView, Client, JobEvent, JobState, LeaseRequest, LeaseView, RegisterHostRequest,
    RegisterPartitionRequest, SubmitJobRequest,
};
use leasehold_core::key::KeyRejection;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Names a partition to lease. The test's partitions are `process` ones or
/// fakes, so the borrower opts in to an unisolated partition where the API
/// has that opt-in; built from JSON so that it reads either way.
fn lease_named(partition: &str) -> LeaseRequest {
    let opted_in = serde_json::json!({"partition": partition, "allow_unisolated": true});
    serde_json::from_value(opted_in)
        .or_else(|_| serde_json::from_value(serde_json::json!({"partition": partition})))
        .expect("a lease request naming a partition")
}

fn capacity() -> leasehold_core::HostCapacity {
    leasehold_core::HostCapacity {
        cpu_centicores: 400,
        memory_mib: 4096,
        disk_gib: 10,
        owner_share_cpu_centicores: 0,
        owner_share_memory_mib: 0,
        owner_share_disk_gib: 0,
    }
}

/// A 127.0.0.1 port nothing listens on: the OS picks it, we let it go.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("local addr").port()
}

/// Starts an agent of the `process` driver for `host_id` with extra flags;
/// returns its real URL. The process lives as long as the cluster.
fn start_agent_with(cluster: &mut Cluster, host_id: &str, listen: &str, extra: &[&str]) -> String {
    let data = cluster.path(&format!("agent-{host_id}"));
    let log = cluster.path(&format!("agent-{host_id}-{}.log", rand::random::<u32>()));
    let data_text = data.display().to_string();
    let mut args = vec![
        "agent",
        "--listen",
        listen,
        "--data-dir",
        &data_text,
        "--host-id",
        host_id,
        "--driver",
        "process",
        "--cpus",
        "64",
        "--memory-mib",
        "65536",
        "--disk-gib",
        "1000",
        "--broker",
        &cluster.broker_url,
        "--output",
        "json",
    ];
    args.extend_from_slice(extra);
    let proc: Proc = spawn_ready_with_token(&args, Some(&cluster.lender_token), &log);
    let url = proc.ready["agent_url"]
        .as_str()
        .expect("agent_url")
        .to_string();
    cluster.agents.retain(|(h, _)| h != host_id);
    cluster.agents.push((host_id.to_string(), proc));
    url
}

/// Starts a job that prints a line and sleeps; returns once it printed, with
/// the task that ends with the job's result.
async fn start_sleeping_job(
    agent_url: &str,
    lease: &LeaseView,
    marker: &str,
) -> tokio::task::JoinHandle<Result<leasehold_api::JobResult, leasehold_api::ApiError>> {
    let request = SubmitJobRequest {
        lease_key: lease.lease_key.clone().expect("the borrower sees its key"),
        command: vec![
            "sh".into(),
            "-c".into(),
            format!("echo started; exec sleep {marker}"),
        ],
        ..Default::default()
    };
    let agent = Client::new(agent_url, None);
    let (sender, mut started) = tokio::sync::mpsc::unbounded_channel();
    let job = tokio::spawn(async move {
        agent
            .submit_job_streaming(1, &request, move |event| {
                if matches!(event, JobEvent::Stdout { .. }) {
                    let _ = sender.send(());
                }
            })
            .await
    });
    started
        .recv()
        .await
        .expect("the job printed before it ended");
    job
}

async fn assert_old_key_refused_as_released(agent_url: &str, lease: &LeaseView) {
    let error = Client::new(agent_url, None)
        .submit_job(
            1,
            &SubmitJobRequest {
                lease_key: lease.lease_key.clone().unwrap(),
                command: vec!["true".into()],
                ..Default::default()
            },
        )
        .await
        .expect_err("a job with a released lease's key must not run");
    assert_eq!(error.status(), Some(403), "{error}");
    assert_eq!(
        error.detail().and_then(|d| d.key_rejection.clone()),
        Some(KeyRejection::Released)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_notices_lost_the_agent_pulls_the_release_and_stops_the_job() {
    let mut cluster = Cluster::start(&[]).await;
    // The broker is told a URL where nothing listens: every push is lost.
    let unreachable = format!("http://127.0.0.1:{}", closed_port());
    let alpha = start_agent_with(
        &mut cluster,
        "alpha",
        "127.0.0.1:0",
        &[
            "--advertise-url",
            &unreachable,
            "--revocation-poll-secs",
            "1",
        ],
    );
    Client::new(&alpha, Some(cluster.lender_token.clone()))
        .agent_add_partition(&terms(1, 256, "host", 1000))
        .await
        .unwrap();
    let (_, bob) = cluster.borrower("bob").await;
    let mut stopped_after_ms = Vec::new();
    for round in 0..5 {
        let lease = bob.lease(&lease_named("alpha/1")).await.unwrap();
        let job = start_sleeping_job(&alpha, &lease, &format!("61{round}")).await;
        let released_at = Instant::now();
        let receipt = bob.release(lease.lease_id).await.unwrap();
        assert!(!receipt.agent_notified, "the push cannot have arrived");
        // One poll interval (1 s) plus slack; generous for a loaded machine.
        let result = tokio::time::timeout(Duration::from_secs(30), job)
            .await
            .expect("the job stopped within the deadline")
            .unwrap()
            .unwrap();
        stopped_after_ms.push(released_at.elapsed().as_millis() as u64);
        assert_eq!(result.state, JobState::Cancelled);
        assert_old_key_refused_as_released(&alpha, &lease).await;
    }
    stopped_after_ms.sort_unstable();
    println!(
        "{}",
        serde_json::json!({
            "measure": "release_to_job_stopped_with_notices_lost",
            "revocation_poll_secs": 1,
            "rounds": stopped_after_ms.len(),
            "min_ms": stopped_after_ms[0],
            "median_ms": stopped_after_ms[stopped_after_ms.len() / 2],
            "max_ms": stopped_after_ms[stopped_after_ms.len() - 1],
        })
    );
}

async fn partition_view(agent_url: &str, lender_token: &str) -> AgentPartitionView {
    Client::new(agent_url, Some(lender_token.to_string()))
        .agent_list_partitions()
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.partition.index == 1)
        .expect("partition 1")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_release_made_while_the_agent_is_down_survives_a_broker_crash() {
    let mut cluster = Cluster::start(&[]).await;
    // Pulling is effectively off: only the outbox can deliver the notice.
    let no_pull = ["--revocation-poll-secs", "86400"];
    let alpha = start_agent_with(&mut cluster, "alpha", "127.0.0.1:0", &no_pull);
    let agent_listen = alpha.trim_start_matches("http://").to_string();
    Client::new(&alpha, Some(cluster.lender_token.clone()))
        .agent_add_partition(&terms(1, 256, "host", 1000))
        .await
        .unwrap();
    let (_, bob) = cluster.borrower("bob").await;
    let lease = bob.lease(&lease_named("alpha/1")).await.unwrap();
    // A job makes the agent know the lease for sure.
    let ran = Client::new(&alpha, None)
        .submit_job(
            1,
            &SubmitJobRequest {
                lease_key: lease.lease_key.clone().unwrap(),
                command: vec!["true".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(ran.state, JobState::Succeeded);

    cluster.stop_agent("alpha");
    let receipt = bob.release(lease.lease_id).await.unwrap();
    assert!(!receipt.agent_notified, "the agent is down");
    // The broker dies with the notice undelivered.
    cluster.broker = None;
    // The agent comes back while the broker is away, so its start cannot
    // learn the release from the broker (no reconciliation, no pull).
    let back = start_agent_with(&mut cluster, "alpha", &agent_listen, &no_pull);
    assert_eq!(back, alpha);
    let before = partition_view(&alpha, &cluster.lender_token).await;
    assert_eq!(before.lease_id, Some(lease.lease_id), "{before:?}");
    assert!(before.released_through_epoch < lease.epoch, "{before:?}");

    cluster.restart_broker();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let view = partition_view(&alpha, &cluster.lender_token).await;
        if view.released_through_epoch >= lease.epoch && view.lease_id.is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted broker never delivered the release notice: {view:?}"
        );
        // Polling a condition with a deadline: nothing signals the fence.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_old_key_refused_as_released(&alpha, &lease).await;
}

/// A fake "agent" at `url` that answers every request with `status`,
/// `headers` and `body`, counting the requests it saw.
async fn fake_agent(
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
) -> (String, Arc<AtomicUsize>) {
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let answer = move || {
        let counter = counter.clone();
        let headers = headers.clone();
        let body = body.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut response = axum::response::Response::new(axum::body::Body::from(body));
            *response.status_mut() = axum::http::StatusCode::from_u16(status).unwrap();
            for (name, value) in headers {
                response.headers_mut().insert(name, value.parse().unwrap());
            }
            response
        }
    };
    let router = axum::Router::new().fallback(answer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, seen)
}

/// Registers `host_id` at the broker with `agent_url` and one partition.
async fn register_host_at(cluster: &Cluster, host_id: &str, agent_url: &str) {
    let lender = cluster.lender();
    lender
        .register_host(
            host_id,
            &RegisterHostRequest {
                share: None,
                agent_url: Some(agent_url.to_string()),
                capacity: capacity(),
            },
        )
        .await
        .unwrap();
    lender
        .register_partition(
            host_id,
            1,
            &RegisterPartitionRequest {
                terms: terms(1, 256, "host", 1000),
            },
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_broker_follows_no_redirect_from_an_agent_url() {
    let cluster = Cluster::start(&[]).await;
    // The other server would accept anything: following the redirect would
    // make the broker believe the notice arrived.
    let (elsewhere, elsewhere_seen) = fake_agent(
        200,
        vec![("content-type", "application/json".into())],
        r#"{"applied":true}"#.into(),
    )
    .await;
    let (redirector, redirector_seen) = fake_agent(
        302,
        vec![("location", format!("{elsewhere}/v1/notices"))],
        String::new(),
    )
    .await;
    register_host_at(&cluster, "mallory", &redirector).await;
    let (_, bob) = cluster.borrower("bob").await;
    let lease = bob.lease(&lease_named("mallory/1")).await.unwrap();
    let receipt = bob.release(lease.lease_id).await.unwrap();
    assert!(
        !receipt.agent_notified,
        "a redirect is not an acknowledgement"
    );
    assert!(redirector_seen.load(Ordering::SeqCst) >= 1);
    assert_eq!(
        elsewhere_seen.load(Ordering::SeqCst),
        0,
        "the broker followed the agent URL's redirect to another server"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_broker_reads_no_more_than_a_small_answer_from_an_agent() {
    let cluster = Cluster::start(&[]).await;
    // A 1 MiB "acknowledgement": over the 64 KiB cap, so not taken as one.
    let huge = format!(r#"{{"applied":true,"pad":"{}"}}"#, "x".repeat(1 << 20));
    let (chatty, chatty_seen) =
        fake_agent(200, vec![("content-type", "application/json".into())], huge).await;
    register_host_at(&cluster, "chatty", &chatty).await;
    let (_, bob) = cluster.borrower("bob").await;
    let lease = bob.lease(&lease_named("chatty/1")).await.unwrap();
    let receipt = bob.release(lease.lease_id).await.unwrap();
    assert!(chatty_seen.load(Ordering::SeqCst) >= 1);
    assert!(
        !receipt.agent_notified,
        "an oversized answer was read and taken as an acknowledgement"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_id_of_another_lender_cannot_be_taken_over() {
    let cluster = Cluster::start(&[]).await;
    let owner_url = format!("http://127.0.0.1:{}", closed_port());
    register_host_at(&cluster, "alpha", &owner_url).await;
    let intruder_token = cluster
        .admin()
        .create_principal("intruder", leasehold_api::Role::Lender)
        .await
        .unwrap()
        .token;
    let intruder = Client::new(&cluster.broker_url, Some(intruder_token));
    let (attacker_url, attacker_seen) = fake_agent(200, vec![], "{}".into()).await;
    let error = intruder
        .register_host(
            "alpha",
            &RegisterHostRequest {
                share: None,
                agent_url: Some(attacker_url),
                capacity: capacity(),
            },
        )
        .await
        .expect_err("another lender's host id must be refused");
    assert_eq!(error.status(), Some(409), "{error}");
    assert_eq!(error.code(), Some("host_owned_by_another_lender"));
    let hosts = cluster.admin().list_hosts().await.unwrap();
    let alpha = hosts.iter().find(|h| h.host_id == "alpha").unwrap();
    assert_eq!(alpha.lender, "lender", "the owner did not change");
    assert_eq!(alpha.agent_url.as_deref(), Some(owner_url.as_str()));
    assert_eq!(alpha.partitions, 1);
    // And the notices of its leases still go to the owner's URL.
    let (_, bob) = cluster.borrower("bob").await;
    let lease = bob.lease(&lease_named("alpha/1")).await.unwrap();
    bob.release(lease.lease_id).await.unwrap();
    assert_eq!(attacker_seen.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hosts_revocations_are_signed_for_its_lender_only_and_bad_cursors_name_the_field() {
    let cluster = Cluster::start(&[]).await;
    let owner_url = format!("http://127.0.0.1:{}", closed_port());
    register_host_at(&cluster, "alpha", &owner_url).await;
    let (_, bob) = cluster.borrower("bob").await;
    let lease = bob.lease(&lease_named("alpha/1")).await.unwrap();
    bob.release(lease.lease_id).await.unwrap();

    let lender = cluster.lender();
    let page = lender.host_revocations("alpha", 0).await.unwrap();
    assert_eq!(page.revocations.len(), 1, "{page:?}");
    assert!(!page.more);
    let listed = &page.revocations[0];
    assert_eq!(listed.lease_id, lease.lease_id);
    assert_eq!(page.next_after_seq, listed.seq);
    let info = lender.broker_info().await.unwrap();
    let broker_key = leasehold_core::key::verifying_key_from_hex(&info.public_key_hex).unwrap();
    let claims = leasehold_core::key::decode_notice(&listed.notice, &broker_key).unwrap();
    assert_eq!(claims.kind, leasehold_core::key::NoticeKind::LeaseReleased);
    assert_eq!(
        (claims.lease_id, claims.epoch),
        (lease.lease_id, lease.epoch)
    );
    let after = lender
        .host_revocations("alpha", page.next_after_seq)
        .await
        .unwrap();
    assert!(after.revocations.is_empty() && !after.more);

    // Another lender and a borrower learn nothing about the host's leases.
    let other_token = cluster
        .admin()
        .create_principal("other", leasehold_api::Role::Lender)
        .await
        .unwrap()
        .token;
    let other = Client::new(&cluster.broker_url, Some(other_token.clone()));
    let error = other.host_revocations("alpha", 0).await.unwrap_err();
    assert_eq!(error.status(), Some(403), "{error}");
    let error = bob.host_revocations("alpha", 0).await.unwrap_err();
    assert_eq!(error.status(), Some(403), "{error}");
    let error = lender.host_revocations("nowhere", 0).await.unwrap_err();
    assert_eq!(error.status(), Some(404), "{error}");

    for (query, field) in [
        ("after_seq=-1", "after_seq"),
        ("after_seq=x", "after_seq"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
    ] {
        let response = reqwest::Client::new()
            .get(format!(
                "{}/v1/hosts/alpha/revocations?{query}",
                cluster.broker_url
            ))
            .bearer_auth(&cluster.lender_token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 400, "{query}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["field"], field, "{query}: {body}");
    }
}
