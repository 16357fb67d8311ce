//! Direct lending inside one organisation (issue 11; the end of seed 000):
//! an agent started with `--direct` lends with no broker running at all.
//! Its owner grants a borrower; the borrower finds, leases and runs through
//! the agent itself with the CLI; a key signed by another owner is refused;
//! a release and a revocation end leases at once.

mod common;

use common::{cli_with_env, spawn_ready, CliOutput, Proc};
use leasehold_api::{Client, SubmitJobRequest};
use std::path::Path;

fn start_direct_agent(dir: &Path, name: &str) -> (Proc, String, String) {
    let data = dir.join(name).display().to_string();
    let agent = spawn_ready(
        &[
            "agent",
            "--direct",
            "--driver",
            "sim",
            "--host-id",
            "workstation",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data,
            "--cpus",
            "4",
            "--memory-mib",
            "4096",
            "--output",
            "json",
        ],
        &dir.join(format!("{name}.log")),
    );
    let url = agent.ready["agent_url"].as_str().unwrap().to_string();
    let owner_file = agent.ready["owner_token_file"]
        .as_str()
        .expect("a direct agent makes the owner's token file")
        .to_string();
    let owner = std::fs::read_to_string(owner_file)
        .unwrap()
        .trim()
        .to_string();
    (agent, url, owner)
}

/// The CLI with `token`, and no broker anywhere: LEASEHOLD_BROKER points
/// at a port nobody listens on.
fn run(token: &str, args: &[&str]) -> CliOutput {
    cli_with_env("http://127.0.0.1:9", Some(token), &[], args)
}

async fn add_partition(agent_url: &str, owner: &str, vcpus: u32) {
    let client = Client::new(agent_url, Some(owner.to_string()));
    client
        .agent_add_partition(&common::terms(vcpus, 512, "busybox", 0))
        .await
        .expect("the owner adds a partition without any broker");
}

fn granted_token(agent_url: &str, owner: &str, name: &str) -> String {
    let granted = run(
        owner,
        &[
            "agent", "grant", name, "--agent", agent_url, "--output", "json",
        ],
    );
    assert_eq!(granted.code, 0, "{}", granted.stderr);
    granted.json()["token"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_direct_agent_lends_and_runs_with_no_broker_and_refuses_another_owners_key() {
    let dir = tempfile::tempdir().unwrap();
    let (_agent, url, owner) = start_direct_agent(dir.path(), "mine");
    add_partition(&url, &owner, 2).await;
    add_partition(&url, &owner, 1).await;
    let alice = granted_token(&url, &owner, "alice");

    let found = run(
        &alice,
        &[
            "find",
            "--agent",
            &url,
            "--min-vcpus",
            "2",
            "--output",
            "json",
        ],
    );
    assert_eq!(found.code, 0, "{}", found.stderr);
    let offers = found.json()["offers"].as_array().unwrap().clone();
    assert_eq!(offers.len(), 1, "{offers:?}");
    let leased = run(
        &alice,
        &[
            "lease",
            "--agent",
            &url,
            "--best",
            "--min-vcpus",
            "2",
            "--output",
            "json",
        ],
    );
    assert_eq!(leased.code, 0, "{}", leased.stderr);
    let lease = leased.json();
    let lease_id = lease["lease_id"].as_u64().unwrap().to_string();
    let index = lease["partition"]["index"].as_u64().unwrap() as u32;
    assert!(
        lease["charge_micros"].is_null(),
        "direct leases are not billed"
    );
    let ran = run(
        &alice,
        &[
            "run", "--agent", &url, "--lease", &lease_id, "--", "echo", "hi",
        ],
    );
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    // The same partition cannot be leased twice.
    let again = run(&alice, &["lease", "--agent", &url, &index.to_string()]);
    assert_ne!(again.code, 0, "leased a leased partition: {}", again.stdout);

    // Another owner's agent, same host id: its key is refused here.
    let (_other, other_url, other_owner) = start_direct_agent(dir.path(), "theirs");
    add_partition(&other_url, &other_owner, 2).await;
    let mallory = granted_token(&other_url, &other_owner, "mallory");
    let foreign = run(
        &mallory,
        &["lease", "--agent", &other_url, "1", "--output", "json"],
    );
    assert_eq!(foreign.code, 0, "{}", foreign.stderr);
    let foreign_key = foreign.json()["lease_key"].as_str().unwrap().to_string();
    let here = Client::new(&url, None);
    let refused = here
        .submit_job(
            1,
            &SubmitJobRequest {
                lease_key: foreign_key,
                command: vec!["true".into()],
                ..Default::default()
            },
        )
        .await
        .expect_err("another owner's key ran here");
    assert_eq!(refused.code(), Some("key_rejected"), "{refused}");

    // Release: the key is fenced at once.
    let key = lease["lease_key"].as_str().unwrap().to_string();
    let released = run(&alice, &["release", "--agent", &url, &lease_id]);
    assert_eq!(released.code, 0, "{}", released.stderr);
    let after = here
        .submit_job(
            index,
            &SubmitJobRequest {
                lease_key: key,
                command: vec!["true".into()],
                ..Default::default()
            },
        )
        .await
        .expect_err("a released key ran");
    assert_eq!(after.code(), Some("key_rejected"), "{after}");
}

#[tokio::test]
async fn a_revoked_grant_stops_at_once_and_strangers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_agent, url, owner) = start_direct_agent(dir.path(), "mine");
    add_partition(&url, &owner, 1).await;
    let carol = granted_token(&url, &owner, "carol");
    let leased = run(&carol, &["lease", "--agent", &url, "1", "--output", "json"]);
    assert_eq!(leased.code, 0, "{}", leased.stderr);
    let revoked = run(
        &owner,
        &[
            "agent", "revoke", "carol", "--agent", &url, "--output", "json",
        ],
    );
    assert_eq!(revoked.code, 0, "{}", revoked.stderr);
    assert_eq!(revoked.json()["leases_released"], 1);
    let refused = run(&carol, &["find", "--agent", &url]);
    assert_ne!(refused.code, 0, "a revoked grant still finds");
    // The partition is free again for the next grant.
    let dave = granted_token(&url, &owner, "dave");
    let found = run(&dave, &["find", "--agent", &url, "--output", "json"]);
    assert_eq!(found.json()["offers"].as_array().unwrap().len(), 1);
    // Neither a stranger's token nor a borrower's may grant.
    let stranger = run(&dave, &["agent", "grant", "eve", "--agent", &url]);
    assert_ne!(stranger.code, 0, "a borrower granted: {}", stranger.stdout);
    let anonymous = Client::new(&url, None)
        .direct_find(&Default::default(), None)
        .await;
    assert_eq!(anonymous.unwrap_err().status(), Some(401));
}
