//! Seed 004 with real processes: agents managing their hosts' usage rights
//! in one share group. By default the broker keeps the group's table; with
//! `--group-store` the managers share an SQLite file directly.

mod common;

use common::*;
use serde_json::Value;

/// Rights owned by `host` in `rights show --output json`.
fn owned(view: &Value, host: &str) -> u64 {
    view["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter(|row| row["host_id"] == host)
        .map(|row| row["rights_owned"].as_u64().unwrap())
        .sum()
}

fn row<'a>(view: &'a Value, host: &str, partition: u64) -> &'a Value {
    view["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .find(|row| row["host_id"] == host && row["partition"] == partition)
        .unwrap_or_else(|| panic!("no row {host}/{partition} in {view}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_borrows_rights_from_another_host_and_none_is_created_or_lost() {
    let mut cluster = Cluster::start(&[]).await;
    let first = cluster.start_agent_with("server-1", "sim", &["--group", "g"]);
    let second = cluster.start_agent_with("server-n", "sim", &["--group", "g"]);
    let (admin, lender) = (cluster.admin_token.clone(), cluster.lender_token.clone());
    let run = |token: &str, args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--agent", first.as_str(), "--output", "json"]);
        cli(&cluster.broker_url, Some(token), &all)
    };
    let group = run(&lender, &["group", "show"]);
    assert_eq!(group.code, 0, "{}", group.stderr);
    let hosts = &group.json()["group"]["hosts"];
    assert_eq!(
        hosts["server-n"]["manager_url"].as_str(),
        Some(second.as_str())
    );
    assert_eq!(hosts["server-1"]["modules"], 64);
    // Only an admin grants rights (they are bought, not made up).
    let refused = run(
        &lender,
        &["rights", "grant", "--host", "server-1", "--modules", "1"],
    );
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("admin"), "{}", refused.stderr);
    for (host, modules) in [("server-1", "1"), ("server-n", "6")] {
        let granted = run(
            &admin,
            &["rights", "grant", "--host", host, "--modules", modules],
        );
        assert_eq!(granted.code, 0, "{}", granted.stderr);
    }
    let add = |vcpus: &str| {
        cli(
            &cluster.broker_url,
            Some(&lender),
            &[
                "host",
                "add",
                "--agent",
                &first,
                "--vcpus",
                vcpus,
                "--cpu-cap",
                "100",
                "--memory-mib",
                "256",
                "--disk-gib",
                "1",
                "--image",
                "busybox",
                "--price-per-hour",
                "0.10",
                "--output",
                "json",
            ],
        )
    };
    let added = add("1");
    assert_eq!(added.code, 0, "{}", added.stderr);
    let index = added.json()["partition"]["index"]
        .as_u64()
        .expect("index")
        .to_string();
    let before = run(&lender, &["rights", "show"]).json();
    assert_eq!(
        (owned(&before, "server-1"), owned(&before, "server-n")),
        (1, 6)
    );
    // Three rights for the new partition: one from its own host's owner
    // share (local first), two from server-n.
    let requested = run(
        &lender,
        &[
            "rights",
            "request",
            "--host",
            "server-1",
            "--partition",
            &index,
            "--modules",
            "3",
        ],
    );
    assert_eq!(requested.code, 0, "{}", requested.stderr);
    let after = run(&lender, &["rights", "show"]).json();
    assert_eq!(
        (owned(&after, "server-1"), owned(&after, "server-n")),
        (3, 4)
    );
    let partition = index.parse::<u64>().unwrap();
    assert_eq!(row(&after, "server-1", partition)["modules_active"], 3);
    assert_eq!(row(&after, "server-n", 0)["modules_active"], 4);
    // Each manager switched its own modules to what the table says.
    let peers = leasehold_api::Client::new(&second, None);
    let donor = peers.agent_rights_sync(0).await.unwrap();
    assert_eq!(donor.active[&0], 4, "the donor's modules went off");
    let requester = peers
        .with_base_url(&first)
        .agent_rights_sync(0)
        .await
        .unwrap();
    assert_eq!(requester.active[&(partition as u32)], 3);
    // More than the group has spare is refused and changes nothing.
    let greedy = run(
        &lender,
        &[
            "rights",
            "request",
            "--host",
            "server-1",
            "--partition",
            &index,
            "--modules",
            "60",
        ],
    );
    assert_ne!(greedy.code, 0);
    let unchanged = run(&lender, &["rights", "show"]).json();
    assert_eq!(
        owned(&unchanged, "server-1") + owned(&unchanged, "server-n"),
        7
    );
    // The market respects the rights: no partition of more vCPUs than the
    // host holds rights for...
    let too_big = add("4");
    assert_ne!(too_big.code, 0);
    assert!(too_big.stderr.contains("terms.vcpus"), "{}", too_big.stderr);
    // ...and a job on a partition without active modules first gets them.
    let idle = add("1");
    assert_eq!(idle.code, 0, "{}", idle.stderr);
    let idle_index = idle.json()["partition"]["index"].as_u64().unwrap();
    let (borrower, _) = cluster.borrower("b").await;
    let name = format!("server-1/{idle_index}");
    let leased = cli(
        &cluster.broker_url,
        Some(&borrower),
        &["lease", &name, "--allow-unisolated", "--output", "json"],
    );
    assert_eq!(leased.code, 0, "{}", leased.stderr);
    let lease_id = leased.json()["lease_id"].as_u64().unwrap().to_string();
    let ran = cli(
        &cluster.broker_url,
        Some(&borrower),
        &["run", "--lease", &lease_id, "--", "true"],
    );
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let after = run(&lender, &["rights", "show"]).json();
    assert_eq!(row(&after, "server-1", idle_index)["modules_active"], 1);
    assert_eq!(owned(&after, "server-1"), 3, "lent inside the host");
    // The ledger audits every movement: balanced, and the hosts' accounts
    // hold what the table says.
    let ledger = cli(
        &cluster.broker_url,
        Some(&admin),
        &["ledger", "--output", "json"],
    )
    .json();
    let balance = |account: &str| {
        ledger["rights_balances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["account"] == account)
            .map_or(0, |b| b["balance_micros"].as_i64().unwrap())
    };
    assert_eq!(balance("rights:g:host:server-1"), 3);
    assert_eq!(balance("rights:g:host:server-n"), 4);
    assert_eq!(balance("rights:g:in-flight"), 0);
    let sum: i64 = ledger["rights_balances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["balance_micros"].as_i64().unwrap())
        .sum();
    assert_eq!(sum, 0, "balanced: {ledger}");
    assert!(ledger["rights_movements"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["debit_account"] == "rights:g:host:server-n"
            && m["credit_account"] == "rights:g:in-flight"
            && m["amount"] == 2));
    // No token, no table.
    let anonymous = cli(
        &cluster.broker_url,
        None,
        &["rights", "show", "--agent", &first],
    );
    assert_ne!(anonymous.code, 0);
    // A right given back inside the host commits in server-1's own
    // database (FIG. 4B): the answer names the loan, the next reader sees
    // it in the table, and the host's total does not move.
    let idle_partition = idle_index.to_string();
    let given_back = run(
        &lender,
        &[
            "rights",
            "release",
            "--host",
            "server-1",
            "--partition",
            &idle_partition,
            "--modules",
            "1",
        ],
    );
    assert_eq!(given_back.code, 0, "{}", given_back.stderr);
    let loans = given_back.json()["lent_inside_host"].clone();
    assert_eq!(loans.as_array().map(Vec::len), Some(1), "{loans}");
    let shown = run(&lender, &["rights", "show"]).json();
    assert_eq!(row(&shown, "server-1", idle_index)["modules_active"], 0);
    assert_eq!(owned(&shown, "server-1"), 3, "the host's total is the same");
    assert_eq!(owned(&shown, "server-n"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managers_sharing_an_sqlite_store_keep_their_rights_across_a_restart() {
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
        &["--group", "g", "--group-store", &store],
    );
    let (token, broker_url) = (cluster.lender_token.clone(), cluster.broker_url.clone());
    let show = |agent: &str, extra: &[&str]| {
        let mut args = vec!["rights", "show", "--agent", agent];
        args.extend_from_slice(extra);
        cli(&broker_url, Some(&token), &args)
    };
    let shown = show(&first, &["--output", "json"]);
    assert_eq!(shown.code, 0, "{}", shown.stderr);
    let view = shown.json();
    assert_eq!(owned(&view, "server-1"), 4);
    assert_eq!(owned(&view, "server-n"), 0, "no rights unless given");
    assert_eq!(
        row(&view, "server-1", 0)["modules_inactive"],
        60,
        "64 cores, 4 active"
    );
    assert_eq!(
        row(&view, "server-n", 0)["manager_url"].as_str(),
        Some(second.as_str())
    );
    let text = show(&second, &["--host", "server-1"]);
    assert_eq!(text.code, 0, "{}", text.stderr);
    assert!(
        text.stdout.contains("server-1") && !text.stdout.contains("server-n"),
        "{}",
        text.stdout
    );
    // Restarted on the same store, the first agent keeps its 4 rights.
    cluster.stop_agent("server-1");
    let again = cluster.start_agent_with(
        "server-1",
        "sim",
        &["--group", "g", "--group-store", &store, "--rights", "6"],
    );
    let view = show(&again, &["--output", "json"]).json();
    assert_eq!(owned(&view, "server-1"), 4);
}

/// The group's table as `group show` prints it.
fn group_table(cluster: &Cluster, agent: &str) -> Value {
    let shown = cli(
        &cluster.broker_url,
        Some(&cluster.lender_token),
        &["group", "show", "--agent", agent, "--output", "json"],
    );
    assert_eq!(shown.code, 0, "{}", shown.stderr);
    shown.json()["group"].clone()
}

/// Asks `agent` for the table until `done` holds (at most 20 s): a
/// manager's tick, not this test, decides when it happens.
fn wait_for_table(cluster: &Cluster, agent: &str, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..200 {
        let table = group_table(cluster, agent);
        if done(&table) {
            return table;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("the table never got there: {}", group_table(cluster, agent));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_its_hosts_place_and_a_secondary_takes_over_as_primary() {
    let mut cluster = Cluster::start(&[]).await;
    let first = cluster.start_agent_with("server-1", "sim", &["--group", "g"]);
    let second = cluster.start_agent_with("server-n", "sim", &["--group", "g"]);
    for host in ["server-1", "server-n"] {
        let granted = cli(
            &cluster.broker_url,
            Some(&cluster.admin_token),
            &[
                "rights",
                "grant",
                "--host",
                host,
                "--modules",
                "4",
                "--agent",
                &first,
            ],
        );
        assert_eq!(granted.code, 0, "{}", granted.stderr);
    }
    // FIG. 6: a back-up manager for server-1, on the same data directory,
    // waits while the active one lives.
    let data = cluster.path("agent-server-1").display().to_string();
    let log = cluster.path("agent-server-1-standby.log");
    let broker_url = cluster.broker_url.clone();
    let token = cluster.lender_token.clone();
    let standby = std::thread::spawn(move || {
        let args = [
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data,
            "--host-id",
            "server-1",
            "--driver",
            "sim",
            "--cpus",
            "64",
            "--memory-mib",
            "65536",
            "--disk-gib",
            "1000",
            "--broker",
            &broker_url,
            "--output",
            "json",
            "--group",
            "g",
            "--standby",
        ];
        spawn_ready_with_token(&args, Some(&token), &log)
    });
    wait_for_table(&cluster, &second, |t| t["primary_host"].is_string());
    let killed_at = std::time::Instant::now();
    cluster.stop_agent("server-1");
    let standby = standby.join().expect("the stand-by took over");
    let standby_url = standby.ready["agent_url"].as_str().unwrap().to_string();
    eprintln!(
        "stand-by took over server-1 in {} ms",
        killed_at.elapsed().as_millis()
    );
    // It recorded itself as the host's manager, and the group sees it.
    let table = wait_for_table(&cluster, &second, |t| {
        t["hosts"]["server-1"]["manager_url"] == standby_url.as_str()
    });
    assert_eq!(
        table["hosts"]["server-1"]["partitions"]["0"]["permanent"], 4,
        "the rights stayed"
    );
    // FIG. 7: the primary dies; the other manager takes over with a new epoch.
    let table = wait_for_table(&cluster, &second, |t| t["primary_host"].is_string());
    let primary_host = table["primary_host"].as_str().unwrap().to_string();
    let epoch = table["primary_epoch"].as_u64().unwrap();
    let (survivor, survivor_url) = if primary_host == "server-1" {
        drop(standby);
        ("server-n", second.clone())
    } else {
        cluster.stop_agent("server-n");
        ("server-1", standby_url.clone())
    };
    let killed_at = std::time::Instant::now();
    let table = wait_for_table(&cluster, &survivor_url, |t| t["primary_host"] == survivor);
    eprintln!(
        "primary fail-over took {} ms",
        killed_at.elapsed().as_millis()
    );
    assert!(table["primary_epoch"].as_u64().unwrap() > epoch, "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_federated_group_the_requesters_manager_coordinates_without_a_primary() {
    let mut cluster = Cluster::start(&[]).await;
    let federated = ["--group", "f", "--group-mode", "federated"];
    let first = cluster.start_agent_with("server-1", "sim", &federated);
    let _second = cluster.start_agent_with("server-n", "sim", &federated);
    let granted = cli(
        &cluster.broker_url,
        Some(&cluster.admin_token),
        &[
            "rights",
            "grant",
            "--host",
            "server-n",
            "--modules",
            "5",
            "--agent",
            &first,
        ],
    );
    assert_eq!(granted.code, 0, "{}", granted.stderr);
    let requested = cli(
        &cluster.broker_url,
        Some(&cluster.lender_token),
        &[
            "rights",
            "request",
            "--host",
            "server-1",
            "--partition",
            "0",
            "--modules",
            "2",
            "--agent",
            &first,
        ],
    );
    assert_eq!(requested.code, 0, "{}", requested.stderr);
    let table = group_table(&cluster, &first);
    assert_eq!(table["mode"], "federated");
    assert!(table["primary_host"].is_null(), "no primary: {table}");
    assert_eq!(table["hosts"]["server-1"]["partitions"]["0"]["active"], 2);
    assert_eq!(
        table["hosts"]["server-n"]["partitions"]["0"]["permanent"],
        3
    );
}
