//! End-to-end tests of the rules: roles, bad input, idempotency, restarts,
//! and the all-in-one `leasehold up`.

mod common;

use common::{cli, spawn_ready, terms, Cluster};
use leasehold_api::{Client, LeaseRequest, RegisterHostRequest, Role, SubmitJobRequest};

/// A named lease; these tests run `process` agents too, whose partitions
/// need the opt-in (tests/unisolated.rs checks the refusal without it).
fn lease_named(partition: &str) -> LeaseRequest {
    LeaseRequest {
        partition: Some(partition.to_string()),
        best: None,
        allow_unisolated: true,
        start: None,
        end: None,
    }
}

async fn raw(
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let client = reqwest::Client::new();
    let mut request = client
        .request(method, url)
        .header("content-type", "application/json");
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.body(body.to_string());
    }
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn roles_decide_who_may_do_what() {
    let mut cluster = Cluster::start(&[]).await;
    let alpha = cluster.start_agent("alpha", "sim");
    leasehold_api::Client::new(&alpha, Some(cluster.lender_token.clone()))
        .agent_add_partition(&terms(1, 512, "busybox", 1000))
        .await
        .unwrap();
    let (bob_token, bob) = cluster.borrower("bob").await;
    let (_, carol) = cluster.borrower("carol").await;
    let url = cluster.broker_url.clone();

    // No token: 401, from the broker and from the agent's lender interface.
    let (status, body) = raw(
        reqwest::Method::POST,
        &format!("{url}/v1/find"),
        None,
        Some("{}"),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, _) = raw(
        reqwest::Method::GET,
        &format!("{alpha}/v1/partitions"),
        Some(&bob_token),
        None,
    )
    .await;
    assert_eq!(
        status, 401,
        "a borrower's token is not the host's lender token"
    );
    let (status, _) = raw(
        reqwest::Method::GET,
        &format!("{url}/v1/bill"),
        Some("lh_wrong"),
        None,
    )
    .await;
    assert_eq!(status, 401);

    // Wrong role: 403.
    let error = bob
        .register_host(
            "mine",
            &RegisterHostRequest {
                share: None,
                agent_url: None,
                capacity: cluster_capacity(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(error.status(), Some(403));
    let error = cluster
        .lender()
        .lease(&lease_named("alpha/1"))
        .await
        .unwrap_err();
    assert_eq!(error.status(), Some(403));
    let error = bob.create_principal("eve", Role::Admin).await.unwrap_err();
    assert_eq!(error.status(), Some(403));
    // A second lender may not touch the first lender's host: to it the
    // host does not exist.
    let other_lender = cluster
        .admin()
        .create_principal("lender2", Role::Lender)
        .await
        .unwrap()
        .token;
    let error = Client::new(&url, Some(other_lender))
        .withdraw_partition("alpha", 1)
        .await
        .unwrap_err();
    assert_eq!(error.status(), Some(404));

    // Only the borrower of a lease may see its key, run on it or release
    // it; to other borrowers it does not exist.
    let lease = bob.lease(&lease_named("alpha/1")).await.unwrap();
    let error = carol.release(lease.lease_id).await.unwrap_err();
    assert_eq!(error.status(), Some(404));
    let error = carol.get_lease(lease.lease_id).await.unwrap_err();
    assert_eq!(error.status(), Some(404));
    let carol_run = cli(
        &url,
        None,
        &["run", "--lease", &lease.lease_id.to_string(), "--", "true"],
    );
    assert_eq!(carol_run.code, 1);
    // The lender and admins see the lease, but never its key.
    let seen = cluster.lender().get_lease(lease.lease_id).await.unwrap();
    assert!(seen.lease_key.is_none());
    let seen = cluster.admin().get_lease(lease.lease_id).await.unwrap();
    assert!(seen.lease_key.is_none());
    assert_eq!(cluster.admin().list_leases().await.unwrap().len(), 1);
    assert!(carol.list_leases().await.unwrap().is_empty());
    // Nothing above changed the lease.
    let receipt = bob.release(lease.lease_id).await.unwrap();
    assert!(!receipt.already_released);
    assert!(receipt.agent_notified);
}

fn cluster_capacity() -> leasehold_core::HostCapacity {
    leasehold_core::HostCapacity {
        cpu_centicores: 400,
        memory_mib: 4096,
        disk_gib: 10,
        owner_share_cpu_centicores: 0,
        owner_share_memory_mib: 0,
        owner_share_disk_gib: 0,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_4xx_naming_the_field_and_changes_nothing() {
    let mut cluster = Cluster::start(&[]).await;
    let alpha = cluster.start_agent("alpha", "sim");
    let lender = cluster.lender_token.clone();
    let (bob_token, bob) = cluster.borrower("bob").await;
    let agent = Client::new(&alpha, Some(lender.clone()));
    agent
        .agent_add_partition(&terms(1, 512, "busybox", 1000))
        .await
        .unwrap();
    let url = cluster.broker_url.clone();

    let check_agent = |body: &'static str, field: &'static str| {
        let alpha = alpha.clone();
        let lender = lender.clone();
        async move {
            let (status, answer) = raw(
                reqwest::Method::POST,
                &format!("{alpha}/v1/partitions"),
                Some(&lender),
                Some(body),
            )
            .await;
            assert_eq!(status, 400, "{body}: {answer}");
            assert_eq!(
                answer["error"]["field"].as_str(),
                Some(field),
                "{body}: {answer}"
            );
        }
    };
    check_agent(r#"{"terms": {"vcpus": 0, "cpu_cap_percent": 50, "memory_mib": 512, "disk_gib": 1, "images": ["busybox"], "price_per_hour_micros": 10}}"#, "terms.vcpus").await;
    check_agent(r#"{"terms": {"vcpus": -1, "cpu_cap_percent": 50, "memory_mib": 512, "disk_gib": 1, "images": ["busybox"], "price_per_hour_micros": 10}}"#, "terms.vcpus").await;
    check_agent(r#"{"terms": {"vcpus": 1, "cpu_cap_percent": 50, "memory_mib": 99999999999999, "disk_gib": 1, "images": ["busybox"], "price_per_hour_micros": 10}}"#, "terms.memory_mib").await;
    check_agent(r#"{"terms": {"vcpus": 1, "cpu_cap_percent": 50, "memory_mib": 512, "disk_gib": 1, "images": ["windows"], "price_per_hour_micros": 10}}"#, "terms.images[0]").await;
    check_agent(r#"{"terms": {"vcpus": 1, "cpu_cap_percent": 50, "memory_mib": 512, "disk_gib": 1, "images": ["busybox"], "price_per_hour_micros": 99999999999999999999999}}"#, "terms.price_per_hour_micros").await;
    check_agent(r#"{"terms": {"vcpus": 1, "cpu_cap_percent": 50, "memory_mib": 512, "disk_gib": 1, "images": ["busybox"], "price_per_hour_micros": 18446744073709551615}}"#, "terms.price_per_hour_micros").await;
    check_agent(r#"{"terms": {"vcpus": 1, "cpu_cap_percent": 50, "disk_gib": 1, "images": ["busybox"], "price_per_hour_micros": 10}}"#, "terms.memory_mib").await;
    check_agent(r#"{"terms": {"vcpus": 1, "#, "body").await;
    check_agent(r#"{"terms": {"vcpus": 2000, "cpu_cap_percent": 50, "memory_mib": 512, "disk_gib": 1, "images": ["busybox"], "price_per_hour_micros": 10}}"#, "terms.vcpus").await;
    // More than the host has: the owner share is never lent.
    check_agent(r#"{"terms": {"vcpus": 64, "cpu_cap_percent": 100, "memory_mib": 512, "disk_gib": 1, "images": ["busybox"], "price_per_hour_micros": 10}}"#, "terms.vcpus").await;
    // Nothing was added anywhere.
    assert_eq!(agent.agent_list_partitions().await.unwrap().len(), 1);
    assert_eq!(cluster.lender().list_partitions().await.unwrap().len(), 1);

    // Broker side.
    let (status, answer) = raw(
        reqwest::Method::POST,
        &format!("{url}/v1/find"),
        Some(&bob_token),
        Some(r#"{"requirements": {"min_vcpus": 0}}"#),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["field"].as_str()),
        (400, Some("requirements.min_vcpus"))
    );
    let (status, answer) = raw(
        reqwest::Method::POST,
        &format!("{url}/v1/find"),
        Some(&bob_token),
        Some(r#"{"requirements": {"image": "windows"}}"#),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["field"].as_str()),
        (400, Some("requirements.image")),
        "{answer}"
    );
    let (status, answer) = raw(
        reqwest::Method::POST,
        &format!("{url}/v1/find"),
        Some(&bob_token),
        Some(r#"{"requirements": {"colour": "red"}}"#),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["field"].as_str()),
        (400, Some("requirements.colour")),
        "{answer}"
    );
    let (status, answer) = raw(
        reqwest::Method::POST,
        &format!("{url}/v1/find"),
        Some(&bob_token),
        Some(r#"{"limit": 0}"#),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["field"].as_str()),
        (400, Some("limit"))
    );
    let (status, answer) = raw(
        reqwest::Method::POST,
        &format!("{url}/v1/leases"),
        Some(&bob_token),
        Some(r#"{"partition": "nowhere/1"}"#),
    )
    .await;
    assert_eq!(status, 404, "{answer}");
    let (status, answer) = raw(
        reqwest::Method::POST,
        &format!("{url}/v1/leases"),
        Some(&bob_token),
        Some(r#"{"partition": "not a partition"}"#),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["field"].as_str()),
        (400, Some("partition"))
    );
    let (status, _) = raw(
        reqwest::Method::POST,
        &format!("{url}/v1/leases"),
        Some(&bob_token),
        Some(r#"{}"#),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = raw(
        reqwest::Method::POST,
        &format!("{url}/v1/leases/999/release"),
        Some(&bob_token),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, answer) = raw(
        reqwest::Method::POST,
        &format!("{url}/v1/leases/abc/release"),
        Some(&bob_token),
        None,
    )
    .await;
    assert_eq!(
        (status, answer["error"]["field"].as_str()),
        (400, Some("lease_id"))
    );
    let (status, _) = raw(
        reqwest::Method::GET,
        &format!("{url}/v1/nothing-here"),
        Some(&bob_token),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let lease = cli(
        &url,
        Some(&bob_token),
        &["lease", "--best", "--min-memory-mib", "100000"],
    );
    assert_eq!(lease.code, 3, "{}", lease.stderr);
    assert!(lease.stderr.contains("min_memory_mib"), "{}", lease.stderr);
    // Jobs: an empty command, a huge one.
    let lease = bob.lease(&lease_named("alpha/1")).await.unwrap();
    let submit = |command: Vec<String>| SubmitJobRequest {
        lease_key: lease.lease_key.clone().unwrap(),
        command,
        timeout_ms: None,
        ..Default::default()
    };
    let error = Client::new(&alpha, None)
        .submit_job(1, &submit(vec![]))
        .await
        .unwrap_err();
    assert_eq!(
        (
            error.status(),
            error.detail().and_then(|d| d.field.as_deref())
        ),
        (Some(400), Some("command"))
    );
    let error = Client::new(&alpha, None)
        .submit_job(1, &submit(vec!["x".repeat(70_000)]))
        .await
        .unwrap_err();
    assert_eq!(error.status(), Some(400));
    // Nothing was leased or billed by any of it but the one good lease.
    assert_eq!(cluster.admin().list_leases().await.unwrap().len(), 1);
    assert!(cluster.admin().ledger().await.unwrap().transfers.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_never_double_an_effect() {
    let mut cluster = Cluster::start(&[]).await;
    let alpha = cluster.start_agent("alpha", "sim");
    let agent = Client::new(&alpha, Some(cluster.lender_token.clone()));
    agent
        .agent_add_partition(&terms(1, 512, "busybox", 3_600_000))
        .await
        .unwrap();
    agent
        .agent_add_partition(&terms(1, 512, "busybox", 3_600_000))
        .await
        .unwrap();
    let (token, bob) = cluster.borrower("bob").await;
    let url = cluster.broker_url.clone();
    let http = reqwest::Client::new();
    // The same lease request sent twice with one idempotency key: one lease.
    let send = || {
        http.post(format!("{url}/v1/leases"))
            .bearer_auth(&token)
            .header("idempotency-key", "retry-1")
            .json(&serde_json::json!({"best": {}}))
            .send()
    };
    let first: serde_json::Value = send().await.unwrap().json().await.unwrap();
    let second = send().await.unwrap();
    assert_eq!(second.status().as_u16(), 200);
    let second: serde_json::Value = second.json().await.unwrap();
    assert_eq!(first["lease_id"], second["lease_id"]);
    assert_eq!(cluster.admin().list_leases().await.unwrap().len(), 1);
    // Many concurrent releases of one lease: billed exactly once.
    let lease_id = first["lease_id"].as_u64().unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let bob = bob.clone();
        tasks.push(tokio::spawn(
            async move { bob.release(lease_id).await.unwrap() },
        ));
    }
    let mut fresh = 0;
    let mut charges = Vec::new();
    for task in tasks {
        let receipt = task.await.unwrap();
        fresh += usize::from(!receipt.already_released);
        charges.push(receipt.bill.charge_micros);
    }
    assert_eq!(fresh, 1);
    charges.dedup();
    assert_eq!(charges.len(), 1, "every answer carries the same bill");
    let ledger = cluster.admin().ledger().await.unwrap();
    assert_eq!(ledger.transfers.len(), 1);
    assert_eq!(ledger.transfers[0].amount_micros, charges[0]);
    assert_eq!(ledger.sum_micros, 0);
    // A bad idempotency key is refused.
    let response = http
        .post(format!("{url}/v1/leases"))
        .bearer_auth(&token)
        .header("idempotency-key", "no spaces allowed")
        .json(&serde_json::json!({"best": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn restarts_keep_the_lease_its_key_and_its_billing_start() {
    let mut cluster = Cluster::start(&[]).await;
    let alpha = cluster.start_agent("alpha", "process");
    let agent = Client::new(&alpha, Some(cluster.lender_token.clone()));
    agent
        .agent_add_partition(&terms(1, 256, "host", 1000))
        .await
        .unwrap();
    let (_, bob) = cluster.borrower("bob").await;
    let lease = bob.lease(&lease_named("alpha/1")).await.unwrap();
    let key = lease.lease_key.clone().unwrap();
    let run = |agent_url: String, command: &'static str| {
        let key = key.clone();
        async move {
            Client::new(&agent_url, None)
                .submit_job(
                    1,
                    &SubmitJobRequest {
                        lease_key: key,
                        command: vec!["sh".into(), "-c".into(), command.into()],
                        timeout_ms: None,
                        ..Default::default()
                    },
                )
                .await
                .unwrap()
        }
    };
    assert_eq!(
        run(alpha.clone(), "echo kept > file").await.exit_code,
        Some(0)
    );

    cluster.restart_broker();
    let after = bob.get_lease(lease.lease_id).await.unwrap();
    assert_eq!(after.started_at_ms, lease.started_at_ms);
    assert_eq!(
        after.lease_key.as_deref(),
        Some(key.as_str()),
        "the same key after a restart"
    );
    assert_eq!(after.state, leasehold_core::lease::LeaseState::Active);
    // Still locked at the broker after its restart.
    let error = cluster
        .lender()
        .withdraw_partition("alpha", 1)
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some("partition_locked"));

    // Restart the agent: it re-registers, keeps the lease and the files.
    cluster.stop_agent("alpha");
    let alpha = cluster.start_agent("alpha", "process");
    let job = run(alpha.clone(), "cat file").await;
    assert_eq!((job.exit_code, job.stdout.as_str()), (Some(0), "kept\n"));
    let rows = Client::new(&alpha, Some(cluster.lender_token.clone()))
        .agent_list_partitions()
        .await
        .unwrap();
    assert_eq!(
        rows[0].lease_id,
        Some(lease.lease_id),
        "the agent still knows the lease (locked)"
    );

    let receipt = bob.release(lease.lease_id).await.unwrap();
    assert_eq!(
        receipt.lease.started_at_ms, lease.started_at_ms,
        "billing starts at the original start"
    );
    assert!(receipt.agent_notified);
}

#[test]
fn up_runs_the_whole_market_on_one_machine_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data").display().to_string();
    let args = [
        "up",
        "--data-dir",
        &data,
        "--listen",
        "127.0.0.1:0",
        "--agent-listen",
        "127.0.0.1:0",
        "--driver",
        "sim",
        "--cpus",
        "4",
        "--memory-mib",
        "4096",
        "--output",
        "json",
    ];
    let up = spawn_ready(&args, &dir.path().join("up.log"));
    let broker = up.ready["broker_url"].as_str().unwrap().to_string();
    let borrower = up.ready["tokens"]["borrower"].as_str().unwrap().to_string();
    assert_eq!(up.ready["partitions"], 3);
    let lease = cli(
        &broker,
        Some(&borrower),
        &["lease", "--best", "--output", "json"],
    );
    assert_eq!(lease.code, 0, "{}", lease.stderr);
    let lease_id = lease.json()["lease_id"].to_string();
    let run = cli(
        &broker,
        Some(&borrower),
        &["run", "--lease", &lease_id, "--", "echo", "hi"],
    );
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (0, "hi\n"),
        "{}",
        run.stderr
    );
    assert_eq!(up.interrupt(), Some(0), "Ctrl-C stops cleanly");

    // Starting again on the same data resumes: no new tokens, the lease is there.
    let up = spawn_ready(&args, &dir.path().join("up2.log"));
    assert!(up.ready["tokens"].is_null());
    let broker = up.ready["broker_url"].as_str().unwrap().to_string();
    let release = cli(
        &broker,
        Some(&borrower),
        &["release", &lease_id, "--output", "json"],
    );
    assert_eq!(release.code, 0, "{}", release.stderr);
    assert_eq!(release.json()["already_released"], false);
    let bill = cli(&broker, Some(&borrower), &["bill", "--output", "json"]).json();
    assert_eq!(bill["leases"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_running_when_the_agent_dies_is_reported_lost() {
    let mut cluster = Cluster::start(&[]).await;
    let alpha = cluster.start_agent("alpha", "process");
    Client::new(&alpha, Some(cluster.lender_token.clone()))
        .agent_add_partition(&terms(1, 256, "host", 1000))
        .await
        .unwrap();
    let (_, bob) = cluster.borrower("bob").await;
    let lease = bob.lease(&lease_named("alpha/1")).await.unwrap();
    let key = lease.lease_key.clone().unwrap();
    let submit = |agent_url: &str, command: &str| {
        let client = Client::new(agent_url, None);
        let request = SubmitJobRequest {
            lease_key: key.clone(),
            command: vec!["sh".into(), "-c".into(), command.into()],
            timeout_ms: None,
            ..Default::default()
        };
        async move { client.submit_job(1, &request).await }
    };
    // A FIFO in the partition tells the test, without sleeping, that the
    // long job has started.
    assert_eq!(
        submit(&alpha, "mkfifo started").await.unwrap().exit_code,
        Some(0)
    );
    let fifo = cluster
        .path("agent-alpha")
        .join("partitions/partition-1/work/started");
    let long_job = tokio::spawn(submit(&alpha, "echo go > started; exec sleep 601"));
    let fifo_for_read = fifo.clone();
    let line = tokio::task::spawn_blocking(move || std::fs::read_to_string(fifo_for_read).unwrap())
        .await
        .unwrap();
    assert_eq!(line, "go\n");

    // Kill the agent while the job runs: the client hears of it honestly.
    cluster.stop_agent("alpha");
    let error = long_job.await.unwrap().unwrap_err();
    assert!(
        error.status().is_none(),
        "a dropped connection, not an answer: {error}"
    );
    let alpha = cluster.start_agent("alpha", "process");
    let job = Client::new(&alpha, Some(key.clone()))
        .get_job(2)
        .await
        .unwrap();
    assert_eq!(job.state, leasehold_api::JobState::Lost);
    assert_eq!(job.lease_id, lease.lease_id);
    // The first job is there too, finished; and the lease still runs jobs.
    let first = Client::new(&alpha, Some(cluster.lender_token.clone()))
        .get_job(1)
        .await
        .unwrap();
    assert_eq!(first.state, leasehold_api::JobState::Succeeded);
    let after = submit(&alpha, "echo still here").await.unwrap();
    assert_eq!(after.stdout, "still here\n");
    // Someone else's key may not read the jobs.
    let error = Client::new(&alpha, Some("lk1.bogus.key".into()))
        .get_job(1)
        .await
        .unwrap_err();
    assert_eq!(error.status(), Some(403));
    // Leave nothing running behind.
    let _ = std::process::Command::new("pkill")
        .args(["-f", "^sleep 601$"])
        .status();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_job_can_be_cancelled_and_stops_when_its_lease_ends() {
    let mut cluster = Cluster::start(&[]).await;
    let alpha = cluster.start_agent("alpha", "process");
    Client::new(&alpha, Some(cluster.lender_token.clone()))
        .agent_add_partition(&terms(1, 256, "host", 1000))
        .await
        .unwrap();
    let (_, bob) = cluster.borrower("bob").await;
    let lease = bob.lease(&lease_named("alpha/1")).await.unwrap();
    let key = lease.lease_key.clone().unwrap();
    let request = SubmitJobRequest {
        lease_key: key.clone(),
        command: vec![
            "sh".into(),
            "-c".into(),
            "echo started; exec sleep 602".into(),
        ],
        ..Default::default()
    };
    // Cancel from the first line of output: the job is surely running then.
    let agent = Client::new(&alpha, None);
    let canceller = Client::new(&alpha, Some(key.clone()));
    let (job_id_sender, mut job_id) = tokio::sync::mpsc::unbounded_channel();
    let job = {
        let request = request.clone();
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut id = None;
            agent
                .submit_job_streaming(1, &request, move |event| match event {
                    leasehold_api::JobEvent::Started { job_id } => id = Some(*job_id),
                    leasehold_api::JobEvent::Stdout { data } if data.contains("started") => {
                        let _ = job_id_sender.send(id);
                    }
                    _ => {}
                })
                .await
        })
    };
    let id = job_id.recv().await.unwrap().unwrap();
    let answer = canceller.cancel_job(id).await.unwrap();
    assert_eq!(answer["cancelled"], true);
    let result = job.await.unwrap().unwrap();
    assert_eq!(result.state, leasehold_api::JobState::Cancelled);
    assert_eq!(result.exit_code, None);

    // Releasing the lease stops its running job too.
    let (sender, mut started) = tokio::sync::mpsc::unbounded_channel();
    let job = tokio::spawn(async move {
        agent
            .submit_job_streaming(1, &request, move |event| {
                if matches!(event, leasehold_api::JobEvent::Stdout { .. }) {
                    let _ = sender.send(());
                }
            })
            .await
    });
    started.recv().await.unwrap();
    let receipt = bob.release(lease.lease_id).await.unwrap();
    let result = job.await.unwrap().unwrap();
    assert_eq!(result.state, leasehold_api::JobState::Cancelled);
    assert!(receipt.agent_notified);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_queued_behind_a_running_one_never_runs_after_release() {
    let mut cluster = Cluster::start(&[]).await;
    let alpha = cluster.start_agent("alpha", "process");
    Client::new(&alpha, Some(cluster.lender_token.clone()))
        .agent_add_partition(&terms(1, 256, "host", 1000))
        .await
        .unwrap();
    let (_, bob) = cluster.borrower("bob").await;
    let lease = bob.lease(&lease_named("alpha/1")).await.unwrap();
    let request = |command: &str| SubmitJobRequest {
        lease_key: lease.lease_key.clone().unwrap(),
        command: vec!["sh".into(), "-c".into(), command.into()],
        ..Default::default()
    };
    let agent = Client::new(&alpha, None);
    let (sender, mut started) = tokio::sync::mpsc::unbounded_channel();
    let first = {
        let agent = agent.clone();
        let long = request("echo started; exec sleep 604");
        tokio::spawn(async move {
            agent
                .submit_job_streaming(1, &long, move |event| {
                    if matches!(event, leasehold_api::JobEvent::Stdout { .. }) {
                        let _ = sender.send(());
                    }
                })
                .await
        })
    };
    started.recv().await.unwrap();
    // The second job waits for the partition, behind the first.
    let second = {
        let agent = agent.clone();
        let quick = request("echo ran-after-release");
        tokio::spawn(async move { agent.submit_job(1, &quick).await })
    };
    let receipt = bob.release(lease.lease_id).await.unwrap();
    assert!(receipt.agent_notified);
    assert_eq!(
        first.await.unwrap().unwrap().state,
        leasehold_api::JobState::Cancelled
    );
    match second.await.unwrap() {
        Ok(result) => panic!("a job of a released lease ran: {result:?}"),
        Err(error) => {
            assert_eq!(error.status(), Some(403), "{error}");
            assert_eq!(
                error.detail().and_then(|d| d.key_rejection.clone()),
                Some(leasehold_core::key::KeyRejection::Released)
            );
        }
    }
}
