//! The owner's load in the real binary (`--owner-load`, seed 003): `up`
//! passes the trace to its agent, whose `GET /v1/agent` shows the owner's
//! usage moving with the simulated clock; a bad trace stops the agent with
//! the file, line and field.

mod common;

use common::*;
use leasehold_api::Client;
use leasehold_core::reservation::Capacity;

/// Any fixed time will do; this one reads like a real date (2023-11-14).
const START_MS: u64 = 1_700_000_000_000;

#[tokio::test]
async fn up_gives_its_agent_the_owners_trace_on_the_simulated_clock() {
    let clock = SimulatedClockFile::starting_at(START_MS);
    let [flag, file] = clock.args();
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("owner-load.csv");
    std::fs::write(
        &trace,
        "# offset_seconds,vcpus,memory_mib\n0,1,7168\n10,1.5,6144\n",
    )
    .unwrap();
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
        "--owner-share-memory-mib",
        "512",
        "--owner-load",
        &trace,
        "--sample-interval-secs",
        "1",
        "--output",
        "json",
        &flag,
        &file,
    ];
    let up = spawn_ready(&args, &dir.path().join("up.log"));
    let agent = Client::new(up.ready["agent_url"].as_str().unwrap(), None);
    let info = agent.agent_info().await.unwrap();
    // The disk is the owner share's (1 GiB by default).
    assert_eq!(info.owner_used, Some(Capacity::new(100, 7168, 1)));
    clock.advance_ms(10_000);
    let info = agent.agent_info().await.unwrap();
    assert_eq!(info.owner_used, Some(Capacity::new(150, 6144, 1)));
}

#[test]
fn an_agent_with_a_bad_trace_names_the_file_line_and_field_and_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("owner-load.csv");
    std::fs::write(&trace, "0,1,1024\n5,many,1024\n").unwrap();
    let trace = trace.display().to_string();
    let data = dir.path().join("agent").display().to_string();
    let refused = refused_start(
        &[
            "agent",
            "--broker",
            "http://127.0.0.1:9",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data,
            "--driver",
            "sim",
            "--owner-load",
            &trace,
        ],
        &[("LEASEHOLD_TOKEN", "lender")],
    );
    assert_ne!(refused.code, 0);
    assert!(
        refused
            .stderr
            .contains(&format!("{trace}:2: vcpus: `many` is not a number")),
        "{}",
        refused.stderr
    );
}
