//! End-to-end tests of the market (seed 000, first embodiment): a broker and
//! agents as separate processes, driven through the CLI and the client.

mod common;

use common::{cli, terms, Cluster, SimulatedClockFile};
use leasehold_api::{LeaseRequest, SubmitJobRequest};
use leasehold_core::key::KeyRejection;

fn lease_named(partition: &str) -> LeaseRequest {
    LeaseRequest {
        partition: Some(partition.to_string()),
        best: None,
        allow_unisolated: false,
        start: None,
        end: None,
    }
}

fn job(key: &str, command: &[&str]) -> SubmitJobRequest {
    SubmitJobRequest {
        lease_key: key.to_string(),
        command: command.iter().map(|s| s.to_string()).collect(),
        timeout_ms: None,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn lend_find_lease_run_release_bill_through_the_cli() {
    let mut cluster = Cluster::start(&["--commission-basis-points", "1000"]).await;
    let alpha = cluster.start_agent("alpha", "process");
    let beta = cluster.start_agent("beta", "sim");
    let (borrower_token, _) = cluster.borrower("bob").await;
    let lender = cluster.lender_token.clone();
    let url = cluster.broker_url.clone();

    // The lender adds partitions on both hosts through their agents.
    let add = |agent: &str, extra: &[&str]| {
        let mut args = vec!["host", "add", "--agent", agent, "--output", "json"];
        args.extend_from_slice(extra);
        cli(&url, Some(&lender), &args)
    };
    let added = add(
        &alpha,
        &[
            "--vcpus",
            "1",
            "--cpu-cap",
            "50",
            "--memory-mib",
            "256",
            "--disk-gib",
            "1",
            "--price-per-hour",
            "3.6",
        ],
    );
    assert_eq!(added.code, 0, "{}", added.stderr);
    assert_eq!(added.json()["partition"]["host_id"], "alpha");
    assert_eq!(added.json()["lending_flag"], "registered");
    for (vcpus, price) in [("2", "1.0"), ("4", "1.0")] {
        let out = add(
            &beta,
            &[
                "--vcpus",
                vcpus,
                "--memory-mib",
                "2048",
                "--disk-gib",
                "5",
                "--image",
                "busybox",
                "--price-per-hour",
                price,
            ],
        );
        assert_eq!(out.code, 0, "{}", out.stderr);
    }
    let listed = cli(
        &url,
        Some(&lender),
        &["host", "list", "--agent", &beta, "--output", "json"],
    );
    assert_eq!(listed.json().as_array().unwrap().len(), 2);

    // Find: cheapest first, then best fit (2 vCPU before 4 vCPU at equal
    // price); alpha's `process` partition only with the opt-in.
    let found = cli(
        &url,
        Some(&borrower_token),
        &["find", "--allow-unisolated", "--output", "json"],
    );
    assert_eq!(found.code, 0, "{}", found.stderr);
    let order: Vec<String> = found.json()["offers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["partition"]["host_id"].as_str().unwrap(),
                o["partition"]["index"]
            )
        })
        .collect();
    assert_eq!(order, ["beta/1", "beta/2", "alpha/1"]);

    // Nothing matches: exit 3 and an explanation naming the requirement.
    let none = cli(
        &url,
        Some(&borrower_token),
        &["find", "--min-memory-mib", "100000"],
    );
    assert_eq!(none.code, 3);
    assert!(
        none.stdout.contains("memory >= 100000 MiB"),
        "{}",
        none.stdout
    );
    assert!(none.stdout.contains("Nearest misses"), "{}", none.stdout);

    // Lease the process-driver partition by name, run jobs on it.
    let leased = cli(
        &url,
        Some(&borrower_token),
        &["lease", "alpha/1", "--allow-unisolated", "--output", "json"],
    );
    assert_eq!(leased.code, 0, "{}", leased.stderr);
    let lease = leased.json();
    let lease_id = lease["lease_id"].as_u64().unwrap().to_string();
    assert!(lease["lease_key"].as_str().unwrap().starts_with("lk1."));
    let run = cli(
        &url,
        Some(&borrower_token),
        &[
            "run",
            "--lease",
            &lease_id,
            "--",
            "sh",
            "-c",
            "echo hello > note; cat note; exit 7",
        ],
    );
    assert_eq!(run.code, 7, "{}", run.stderr);
    assert_eq!(run.stdout, "hello\n");
    // The partition keeps its files between jobs of the same lease.
    let again = cli(
        &url,
        Some(&borrower_token),
        &["run", "--lease", &lease_id, "--", "cat", "note"],
    );
    assert_eq!(
        (again.code, again.stdout.as_str()),
        (0, "hello\n"),
        "{}",
        again.stderr
    );

    // lease --best takes the cheapest free match.
    let best = cli(
        &url,
        Some(&borrower_token),
        &["lease", "--best", "--image", "busybox", "--output", "json"],
    );
    assert_eq!(best.json()["partition"]["index"], 1);
    assert_eq!(best.json()["partition"]["host_id"], "beta");
    let sim_run = cli(
        &url,
        Some(&borrower_token),
        &[
            "run",
            "--lease",
            &best.json()["lease_id"].to_string(),
            "--",
            "echo",
            "simulated",
            "hi",
        ],
    );
    assert_eq!(
        (sim_run.code, sim_run.stdout.as_str()),
        (0, "simulated hi\n")
    );

    // Release bills once; the second release answers with the same bill.
    let released = cli(
        &url,
        Some(&borrower_token),
        &["release", &lease_id, "--output", "json"],
    );
    assert_eq!(released.code, 0, "{}", released.stderr);
    let bill = released.json()["bill"].clone();
    let seconds = bill["billable_seconds"].as_u64().unwrap();
    // 3.6 units per hour is 1000 micros per second.
    assert_eq!(bill["charge_micros"].as_u64().unwrap(), seconds * 1000);
    assert_eq!(bill["commission_micros"].as_u64().unwrap(), seconds * 100);
    let again = cli(
        &url,
        Some(&borrower_token),
        &["release", &lease_id, "--output", "json"],
    );
    assert_eq!(again.json()["already_released"], true);
    assert_eq!(again.json()["bill"], bill);
    // A released lease's partition is offered again.
    let found = cli(
        &url,
        Some(&borrower_token),
        &[
            "find",
            "--min-cpu-cap",
            "50",
            "--allow-unisolated",
            "--output",
            "json",
        ],
    );
    assert!(found.stdout.contains("\"alpha\""), "{}", found.stdout);

    // The bill and the ledger: one charge, and the ledger sums to zero.
    let bill_view = cli(&url, Some(&borrower_token), &["bill", "--output", "json"]).json();
    assert_eq!(
        bill_view["balance_micros"].as_i64().unwrap(),
        -(seconds as i64 * 1000)
    );
    let ledger = cli(
        &url,
        Some(&cluster.admin_token),
        &["ledger", "--output", "json"],
    )
    .json();
    assert_eq!(ledger["sum_micros"], 0);
    assert_eq!(
        ledger["transfers"].as_array().unwrap().len(),
        2,
        "lender credit and commission"
    );
    let text = cli(&url, Some(&borrower_token), &["bill"]);
    assert!(text.stdout.contains("bob (borrower)"), "{}", text.stdout);
    cluster.stop_agent("alpha");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leased_partition_is_locked_on_the_agent_and_the_broker() {
    let mut cluster = Cluster::start(&[]).await;
    let alpha = cluster.start_agent("alpha", "sim");
    let (token, borrower) = cluster.borrower("bob").await;
    let url = cluster.broker_url.clone();
    let lender_token = cluster.lender_token.clone();
    let agent = leasehold_api::Client::new(&alpha, Some(lender_token.clone()));
    agent
        .agent_add_partition(&terms(2, 1024, "busybox", 1000))
        .await
        .unwrap();
    let lease = borrower.lease(&lease_named("alpha/1")).await.unwrap();
    // A job makes sure the agent knows the lease (it adopts the newer epoch).
    let result = leasehold_api::Client::new(&alpha, None)
        .submit_job(1, &job(lease.lease_key.as_deref().unwrap(), &["true"]))
        .await
        .unwrap();
    assert_eq!(result.exit_code, Some(0));

    // Refused on the agent (S24-S26)...
    let alter = cli(
        &url,
        Some(&lender_token),
        &["host", "alter", "1", "--agent", &alpha, "--vcpus", "1"],
    );
    assert_eq!(alter.code, 4, "{}", alter.stderr);
    assert!(
        alter.stderr.contains("locked while leased"),
        "{}",
        alter.stderr
    );
    let withdraw = cli(
        &url,
        Some(&lender_token),
        &["host", "withdraw", "1", "--agent", &alpha],
    );
    assert_eq!(withdraw.code, 4, "{}", withdraw.stderr);
    // ... and on the broker, even when asked directly.
    let direct = cluster
        .lender()
        .register_partition(
            "alpha",
            1,
            &leasehold_api::RegisterPartitionRequest {
                terms: terms(1, 1024, "busybox", 1000),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(
        (direct.status(), direct.code()),
        (Some(409), Some("partition_locked"))
    );
    let direct = cluster
        .lender()
        .withdraw_partition("alpha", 1)
        .await
        .unwrap_err();
    assert_eq!(direct.code(), Some("partition_locked"));
    // The terms are unchanged everywhere.
    let rows = agent.agent_list_partitions().await.unwrap();
    assert_eq!(rows[0].terms.vcpus, 2);

    // After release, altering and withdrawing are allowed again (S27-S32).
    cli(
        &url,
        Some(&token),
        &["release", &lease.lease_id.to_string()],
    );
    let alter = cli(
        &url,
        Some(&lender_token),
        &[
            "host", "alter", "1", "--agent", &alpha, "--vcpus", "1", "--output", "json",
        ],
    );
    assert_eq!(alter.code, 0, "{}", alter.stderr);
    assert_eq!(alter.json()["terms"]["vcpus"], 1);
    let at_broker = cluster.lender().list_partitions().await.unwrap();
    assert_eq!(at_broker[0].terms.vcpus, 1);
    let withdraw = cli(
        &url,
        Some(&lender_token),
        &["host", "withdraw", "1", "--agent", &alpha],
    );
    assert_eq!(withdraw.code, 0, "{}", withdraw.stderr);
    let found = borrower.find(&Default::default(), None).await.unwrap();
    assert!(found.offers.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_run_only_with_a_valid_key() {
    let mut cluster = Cluster::start(&[]).await;
    let alpha = cluster.start_agent("alpha", "sim");
    let beta = cluster.start_agent("beta", "sim");
    let (_, borrower) = cluster.borrower("bob").await;
    for agent_url in [&alpha, &beta] {
        let agent = leasehold_api::Client::new(agent_url, Some(cluster.lender_token.clone()));
        agent
            .agent_add_partition(&terms(1, 512, "busybox", 1000))
            .await
            .unwrap();
        agent
            .agent_add_partition(&terms(1, 512, "busybox", 1000))
            .await
            .unwrap();
    }
    let alpha_agent = leasehold_api::Client::new(&alpha, None);
    let first = borrower.lease(&lease_named("alpha/1")).await.unwrap();
    let key = first.lease_key.clone().unwrap();
    let rejection = |error: leasehold_api::ApiError| {
        assert_eq!(error.status(), Some(403), "{error}");
        error.detail().and_then(|d| d.key_rejection.clone())
    };
    assert_eq!(
        alpha_agent
            .submit_job(1, &job(&key, &["true"]))
            .await
            .unwrap()
            .exit_code,
        Some(0)
    );

    // A tampered signature.
    let mut tampered = key.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let error = alpha_agent
        .submit_job(1, &job(&tampered, &["true"]))
        .await
        .unwrap_err();
    assert!(matches!(
        rejection(error),
        Some(KeyRejection::BadSignature | KeyRejection::Malformed)
    ));
    // The key of alpha/1 on alpha/2, and on beta/1.
    let error = alpha_agent
        .submit_job(2, &job(&key, &["true"]))
        .await
        .unwrap_err();
    assert_eq!(rejection(error), Some(KeyRejection::WrongPartition));
    let error = leasehold_api::Client::new(&beta, None)
        .submit_job(1, &job(&key, &["true"]))
        .await
        .unwrap_err();
    assert_eq!(rejection(error), Some(KeyRejection::WrongHost));
    // A key signed by someone else entirely.
    let forged = leasehold_core::key::sign(
        &leasehold_core::key::decode_and_verify(
            &key,
            &leasehold_core::key::signing_key_from_seed([1; 32]).verifying_key(),
        )
        .err()
        .map(|_| leasehold_core::key::LeaseKeyClaims {
            not_before_ms: None,
            lease_id: first.lease_id,
            host_id: "alpha".into(),
            partition_index: 1,
            epoch: first.epoch,
            borrower: "bob".into(),
            issued_at_ms: 0,
            expires_at_ms: u64::MAX,
            key_id: String::new(),
            terms: None,
        })
        .unwrap(),
        &leasehold_core::key::signing_key_from_seed([1; 32]),
    );
    let error = alpha_agent
        .submit_job(1, &job(&forged, &["true"]))
        .await
        .unwrap_err();
    assert_eq!(rejection(error), Some(KeyRejection::BadSignature));

    // After release the old key is refused; the next borrower gets a new key
    // and the old one stays refused.
    borrower.release(first.lease_id).await.unwrap();
    let error = alpha_agent
        .submit_job(1, &job(&key, &["true"]))
        .await
        .unwrap_err();
    assert_eq!(rejection(error), Some(KeyRejection::Released));
    let (_, other) = cluster.borrower("carol").await;
    let second = other.lease(&lease_named("alpha/1")).await.unwrap();
    let second_key = second.lease_key.clone().unwrap();
    assert_ne!(second_key, key, "a new key per lease");
    assert!(second.epoch > first.epoch);
    let error = alpha_agent
        .submit_job(1, &job(&key, &["true"]))
        .await
        .unwrap_err();
    assert!(matches!(
        rejection(error),
        Some(KeyRejection::Released | KeyRejection::Stale)
    ));
    assert_eq!(
        alpha_agent
            .submit_job(1, &job(&second_key, &["true"]))
            .await
            .unwrap()
            .exit_code,
        Some(0)
    );
    // The earlier borrower cannot fetch the new key from the broker: to it
    // the lease does not exist.
    let error = borrower.get_lease(second.lease_id).await.unwrap_err();
    assert_eq!(error.status(), Some(404));
}

/// `leasehold run` with the borrower's token on `lease_id`, as JSON.
fn run_true(url: &str, token: &str, lease_id: &str) -> common::CliOutput {
    let args = ["run", "--lease", lease_id, "--output", "json", "--", "true"];
    cli(url, Some(token), &args)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_runs_jobs_until_its_expiry_and_is_refused_from_it() {
    // The broker and the agent read one clock the test moves: the default
    // key lifetime (a week) passes without waiting.
    let clock = SimulatedClockFile::starting_at(1_700_000_000_000);
    let clock_args = clock.args();
    let mut cluster = Cluster::start(&[&clock_args[0], &clock_args[1]]).await;
    let alpha = cluster.start_agent_with("alpha", "sim", &[&clock_args[0], &clock_args[1]]);
    let (token, _) = cluster.borrower("bob").await;
    leasehold_api::Client::new(&alpha, Some(cluster.lender_token.clone()))
        .agent_add_partition(&terms(1, 512, "busybox", 1000))
        .await
        .unwrap();
    let url = cluster.broker_url.clone();
    let lease = cli(
        &url,
        Some(&token),
        &["lease", "alpha/1", "--output", "json"],
    )
    .json();
    let expires_at_ms = lease["key_expires_at_ms"].as_u64().unwrap();
    assert_eq!(expires_at_ms, clock.now_ms() + 7 * 24 * 3600 * 1000);
    let lease_id = lease["lease_id"].to_string();
    let run = run_true(&url, &token, &lease_id);
    assert_eq!(run.code, 0, "{}", run.stderr);
    clock.set_ms(expires_at_ms - 1);
    let run = run_true(&url, &token, &lease_id);
    assert_eq!(run.code, 0, "a millisecond before expiry: {}", run.stderr);
    // From its expiry on, the user is told the key has expired.
    clock.set_ms(expires_at_ms);
    let run = run_true(&url, &token, &lease_id);
    assert_eq!(run.code, 1);
    assert_eq!(
        run.json()["error"]["key_rejection"],
        "expired",
        "{}",
        run.stdout
    );
    assert!(run.stderr.contains("expired"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn thirty_two_borrowers_racing_for_eight_partitions_get_eight_leases() {
    let mut cluster = Cluster::start(&["--durability", "normal"]).await;
    let mut names = Vec::new();
    for host in ["alpha", "beta"] {
        let url = cluster.start_agent(host, "sim");
        let agent = leasehold_api::Client::new(&url, Some(cluster.lender_token.clone()));
        for _ in 0..4 {
            let row = agent
                .agent_add_partition(&terms(1, 512, "busybox", 1000))
                .await
                .unwrap();
            names.push(row.partition.to_string());
        }
    }
    let mut borrowers = Vec::new();
    for n in 0..32 {
        borrowers.push(cluster.borrower(&format!("b{n}")).await.1);
    }
    for round in 0..3 {
        let mut tasks = Vec::new();
        for (n, borrower) in borrowers.iter().enumerate() {
            let borrower = borrower.clone();
            let target = names[n % 8].clone();
            tasks.push(tokio::spawn(async move {
                (
                    borrower.clone(),
                    borrower.lease(&lease_named(&target)).await,
                )
            }));
        }
        let mut won = Vec::new();
        let mut conflicts = 0;
        for task in tasks {
            let (borrower, result) = task.await.unwrap();
            match result {
                Ok(lease) => won.push((borrower, lease)),
                Err(error) => {
                    assert_eq!(
                        (error.status(), error.code()),
                        (Some(409), Some("partition_taken")),
                        "{error}"
                    );
                    conflicts += 1;
                }
            }
        }
        assert_eq!((won.len(), conflicts), (8, 24), "round {round}");
        let mut partitions: Vec<String> =
            won.iter().map(|(_, l)| l.partition.to_string()).collect();
        partitions.sort();
        partitions.dedup();
        assert_eq!(partitions.len(), 8, "never two leases on one partition");
        for (borrower, lease) in won {
            borrower.release(lease.lease_id).await.unwrap();
        }
    }
    let ledger = cluster.admin().ledger().await.unwrap();
    assert_eq!(ledger.sum_micros, 0);
}
