//! Seed 004 with real processes: two agents managing their hosts' usage
//! rights in one share group, whose table lives in a shared SQLite store;
//! `leasehold rights show`, asked of either agent, shows both hosts (FIG.
//! 4A), and an agent restarted on the same store finds its rights as they
//! were.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_share_one_groups_rights_table() {
    let mut cluster = Cluster::start(&[]).await;
    let store = cluster.path("group.db").display().to_string();
    let first = cluster.start_agent_with(
        "server-1",
        "sim",
        &["--group", "g", "--group-store", &store, "--rights", "4"],
    );
    let second = cluster.start_agent_with(
        "server-n",
        "sim",
        &[
            "--group",
            "g",
            "--group-store",
            &store,
            "--group-mode",
            "centralized",
        ],
    );
    let token = cluster.lender_token.clone();
    let shown = cli(
        &cluster.broker_url,
        Some(&token),
        &["rights", "show", "--agent", &first, "--output", "json"],
    );
    assert_eq!(shown.code, 0, "{}", shown.stderr);
    let table = shown.json();
    let owner = |host: &str| table["hosts"][host]["partitions"]["0"].clone();
    assert_eq!(owner("server-1")["permanent"], 4);
    assert_eq!(
        owner("server-1")["modules"],
        64,
        "the cluster's hosts have 64 cores"
    );
    assert_eq!(
        owner("server-n")["permanent"],
        64,
        "one right per core by default"
    );
    assert_eq!(
        table["hosts"]["server-n"]["manager_url"].as_str(),
        Some(second.as_str())
    );
    let text = cli(
        &cluster.broker_url,
        Some(&token),
        &["rights", "show", "--agent", &second, "--host", "server-1"],
    );
    assert_eq!(text.code, 0, "{}", text.stderr);
    assert!(
        text.stdout.contains("server-1") && !text.stdout.contains("server-n"),
        "{}",
        text.stdout
    );
    // The lender's interface: no token, no table.
    let anonymous = cli(
        &cluster.broker_url,
        None,
        &["rights", "show", "--agent", &first],
    );
    assert_ne!(anonymous.code, 0);
    // Restarted on the same store, the first agent keeps its 4 rights.
    cluster.stop_agent("server-1");
    let again = cluster.start_agent_with(
        "server-1",
        "sim",
        &["--group", "g", "--group-store", &store, "--rights", "6"],
    );
    let table = cli(
        &cluster.broker_url,
        Some(&token),
        &["rights", "show", "--agent", &again, "--output", "json"],
    )
    .json();
    assert_eq!(
        table["hosts"]["server-1"]["partitions"]["0"]["permanent"],
        4
    );
}
