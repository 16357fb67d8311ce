//! Time in the real binary: the hidden `--simulated-clock-file` lets a test
//! move the clock of separate broker, agent and `up` processes, so key
//! lifetimes and bills are checked to the millisecond without waiting.

mod common;

use common::{cli, refused_start, spawn_ready, terms, Cluster, SimulatedClockFile};

const START_MS: u64 = 1_700_000_000_000;

#[test]
fn the_clock_file_option_is_hidden_and_refused_unless_private_and_a_number() {
    for command in ["broker", "agent", "up"] {
        let help = cli("http://127.0.0.1:1", None, &[command, "--help"]);
        assert_eq!(help.code, 0, "{}", help.stderr);
        assert!(help.stdout.contains("--listen"), "{}", help.stdout);
        assert!(!help.stdout.contains("clock"), "{command}: {}", help.stdout);
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("broker").display().to_string();
    let clock = dir.path().join("clock");
    let clock_text = clock.display().to_string();
    let broker = [
        "broker",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data,
        "--simulated-clock-file",
        &clock_text,
    ];
    // Whoever can write the file sets the time keys expire by.
    std::fs::write(&clock, START_MS.to_string()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&clock, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = refused_start(&broker, &[]);
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("--simulated-clock-file") && refused.stderr.contains("chmod 600"),
        "{}",
        refused.stderr
    );
    leasehold_store::private_fs::write_private_file(&clock, b"tomorrow").unwrap();
    let refused = refused_start(&broker, &[]);
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("milliseconds"),
        "{}",
        refused.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn key_ttl_secs_still_sets_how_long_keys_live() {
    let clock = SimulatedClockFile::starting_at(START_MS);
    let [flag, file] = clock.args();
    let mut cluster = Cluster::start(&["--key-ttl-secs", "60", &flag, &file]).await;
    let alpha = cluster.start_agent_with("alpha", "sim", &[&flag, &file]);
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
    assert_eq!(lease["key_expires_at_ms"].as_u64(), Some(START_MS + 60_000));
    let lease_id = lease["lease_id"].to_string();
    let run = |expect_code: i32| {
        let args = [
            "run", "--lease", &lease_id, "--output", "json", "--", "true",
        ];
        let run = cli(&url, Some(&token), &args);
        assert_eq!(run.code, expect_code, "{}{}", run.stdout, run.stderr);
        run
    };
    clock.set_ms(START_MS + 59_999);
    run(0);
    clock.set_ms(START_MS + 60_000);
    let refused = run(1);
    assert_eq!(refused.json()["error"]["key_rejection"], "expired");
}

#[test]
fn up_bills_exactly_the_simulated_seconds_between_lease_and_release() {
    let clock = SimulatedClockFile::starting_at(START_MS);
    let [flag, file] = clock.args();
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
        "--image-store-listen",
        "127.0.0.1:0",
        "--driver",
        "sim",
        "--cpus",
        "4",
        "--memory-mib",
        "4096",
        "--output",
        "json",
        &flag,
        &file,
    ];
    let up = spawn_ready(&args, &dir.path().join("up.log"));
    let broker = up.ready["broker_url"].as_str().unwrap().to_string();
    let borrower = up.ready["tokens"]["borrower"].as_str().unwrap().to_string();
    let lease = cli(
        &broker,
        Some(&borrower),
        &["lease", "--best", "--output", "json"],
    );
    assert_eq!(lease.code, 0, "{}", lease.stderr);
    let lease = lease.json();
    assert_eq!(lease["started_at_ms"].as_u64(), Some(START_MS));
    // The cheapest partition `up` lends costs 0.1 per hour.
    assert_eq!(
        lease["terms"]["price_per_hour_micros"].as_u64(),
        Some(100_000)
    );
    clock.advance_ms(90_000);
    let lease_id = lease["lease_id"].to_string();
    let release = cli(
        &broker,
        Some(&borrower),
        &["release", &lease_id, "--output", "json"],
    );
    assert_eq!(release.code, 0, "{}", release.stderr);
    let bill = &release.json()["bill"];
    assert_eq!(bill["billable_seconds"].as_u64(), Some(90), "{bill}");
    // 100,000 micros an hour for 90 s: 2,500 micros.
    assert_eq!(bill["charge_micros"].as_u64(), Some(2_500), "{bill}");
    let shown = cli(&broker, Some(&borrower), &["bill", "--output", "json"]).json();
    assert_eq!(shown["balance_micros"].as_i64(), Some(-2_500), "{shown}");
}
