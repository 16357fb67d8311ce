//! Seed 003 end to end with real processes: `up` runs a broker and an agent
//! with `--driver sim --owner-load`, the agent samples every second, and a
//! workload starts 40 s ahead on the simulated clock (a file the test
//! moves). Each step the test moves the clock, waits for the agent's sample
//! of that moment to reach the broker, runs a planning round and reads the
//! pools with the real `leasehold` verbs: the pool ramps in steps, never
//! above what the owner left free, and holds the whole target by the start.
//! The planning interval is 4 s, one step of the test's clock; the broker's
//! own timer may also run a round (on the sample before), which can only
//! make a step smaller, never larger than what was free.

mod common;

use common::*;
use leasehold_api::Client;
use std::time::{Duration, Instant};

/// Any fixed time will do; this one reads like a real date (2023-11-14).
const START_MS: u64 = 1_700_000_000_000;
const TOTAL_MIB: u64 = 8192;
const TARGET_MIB: u64 = 6144;
/// (offset in seconds, owner's memory in MiB): 7 GiB, then 1 GiB back
/// every 4 s down to 1 GiB.
const LOAD: [(u64, u64); 7] = [
    (0, 7168),
    (8, 6144),
    (12, 5120),
    (16, 4096),
    (20, 3072),
    (24, 2048),
    (28, 1024),
];

fn owner_mib_at(second: u64) -> u64 {
    LOAD.iter()
        .rev()
        .find(|(at, _)| second >= *at)
        .map(|(_, mib)| *mib)
        .unwrap()
}

/// Waits until the broker holds the agent's sample of `at_ms` (the agent
/// samples every second of wall time; this polls for that event, bounded).
async fn sample_of(admin: &Client, at_ms: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let hosts = admin.host_capacity().await.unwrap();
        if hosts
            .iter()
            .any(|h| h.sampled_at_ms.is_some_and(|t| t >= at_ms))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no sample of {at_ms} arrived: {hosts:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn workload_file(
    dir: &std::path::Path,
    name: &str,
    instance: &str,
    vcpus: u32,
    memory_mib: u64,
) -> String {
    let start = leasehold_api::rfc3339_from_ms(START_MS + 40_000);
    let end = leasehold_api::rfc3339_from_ms(START_MS + 3_640_000);
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"{name}\"\npriority = 10\nstart = \"{start}\"\nend = \"{end}\"\n\n[[instance]]\nname = \"{instance}\"\nvcpus = {vcpus}\nmemory_mib = {memory_mib}\ndisk_gib = 1\n"
        ),
    )
    .unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_ramps_in_steps_with_the_owners_load_and_is_complete_by_the_start() {
    let clock = SimulatedClockFile::starting_at(START_MS);
    let [flag, file] = clock.args();
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("owner-load.csv");
    let lines: String = LOAD
        .iter()
        .map(|(at, mib)| format!("{at},1,{mib}\n"))
        .collect();
    std::fs::write(&trace, lines).unwrap();
    let data = dir.path().join("data").display().to_string();
    let trace = trace.display().to_string();
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
        "--partitions",
        "0",
        "--cpus",
        "4",
        "--memory-mib",
        "8192",
        "--disk-gib",
        "20",
        "--owner-share-memory-mib",
        "512",
        "--owner-load",
        &trace,
        "--sample-interval-secs",
        "1",
        "--plan-interval-secs",
        "4",
        "--output",
        "json",
        &flag,
        &file,
    ];
    let up = spawn_ready(&args, &dir.path().join("up.log"));
    let broker = up.ready["broker_url"].as_str().unwrap().to_string();
    let admin_token = up.ready["tokens"]["admin"].as_str().unwrap().to_string();
    let admin = Client::new(&broker, Some(admin_token.clone()));
    sample_of(&admin, START_MS).await;
    let big = workload_file(dir.path(), "ramp", "big", 1, TARGET_MIB);
    let applied = cli(&broker, Some(&admin_token), &["workload", "apply", &big]);
    assert_eq!(applied.code, 0, "{}", applied.stderr);
    let huge = workload_file(dir.path(), "huge", "huge-1", 64, 256);
    assert_eq!(
        cli(&broker, Some(&admin_token), &["workload", "apply", &huge]).code,
        0
    );
    let mut seen = Vec::new();
    for second in (4..=44).step_by(4) {
        let now_ms = clock.advance_ms(4_000);
        sample_of(&admin, now_ms).await;
        admin.plan_now().await.unwrap();
        let pools = cli(
            &broker,
            Some(&admin_token),
            &["pool", "list", "--output", "json"],
        );
        assert_eq!(pools.code, 0, "{}", pools.stderr);
        let pools = pools.json();
        let pool = pools["pools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["instances"][0] == "big")
            .expect("the instance's pool")
            .clone();
        let held = pool["acquired"]["memory_mib"].as_u64().unwrap()
            + pool["allocated"]["memory_mib"].as_u64().unwrap();
        let free = TOTAL_MIB - owner_mib_at(second);
        assert!(
            held <= free,
            "at {second} s: {held} MiB held, {free} MiB free"
        );
        seen.push((second, held, pool["phase"].as_str().unwrap().to_string()));
    }
    let steps: std::collections::BTreeSet<u64> =
        seen.iter().map(|s| s.1).filter(|h| *h > 0).collect();
    assert!(steps.len() >= 3, "ramped in steps: {seen:?}");
    assert!(
        seen.iter()
            .any(|(s, held, _)| *s < 40 && *held == TARGET_MIB),
        "complete before the start: {seen:?}"
    );
    assert_eq!(seen.last().unwrap().2, "handed_over", "{seen:?}");
    let shown = cli(
        &broker,
        Some(&admin_token),
        &["workload", "show", "ramp", "--output", "json"],
    )
    .json();
    assert_eq!(shown["instances"][0]["status"], "running");
    let warnings = cli(
        &broker,
        Some(&admin_token),
        &["warnings", "--output", "json"],
    )
    .json();
    let warned: Vec<&str> = warnings
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["instances"][0].as_str().unwrap())
        .collect();
    assert_eq!(warned, ["huge-1"]);
}
