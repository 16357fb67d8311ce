//! Two broker processes on one PostgreSQL database (issue 11): one active,
//! one standing by. Under a steady lease/release load the active one is
//! killed with SIGKILL; the standby takes over, no acknowledged lease or
//! release is lost or doubled, the ledger balances, and the old active,
//! restarted, stands by. Then the new active is frozen (SIGSTOP) until the
//! other takes over, and thawed: it can change nothing and steps down.
//! Needs `LEASEHOLD_TEST_POSTGRES_URL` (CI starts a throw-away cluster).

mod common;

use common::{cli, spawn_ready, terms, Proc, TestDatabase};
use leasehold_api::{Client, LeaseRequest, Role};
use leasehold_core::lease::LeaseState;
use std::path::Path;
use std::time::{Duration, Instant};

const LEADERSHIP_TTL_MS: &str = "1500";

fn start_broker(data: &Path, listen: &str, database_url: &str, peer: &str) -> Proc {
    let data_text = data.display().to_string();
    let mut args = vec![
        "broker",
        "--listen",
        listen,
        "--data-dir",
        &data_text,
        "--database",
        database_url,
        "--leadership-ttl-ms",
        LEADERSHIP_TTL_MS,
        "--durability",
        "normal",
        "--output",
        "json",
    ];
    if !peer.is_empty() {
        args.extend(["--peer", peer]);
    }
    let log = data.with_extension(format!("{}.log", rand::random::<u32>()));
    spawn_ready(&args, &log)
}

/// Copies the signing keys of one broker's data directory to another's:
/// the brokers of one database sign with the same keys, so an agent that
/// trusts one trusts them all.
fn share_signing_keys(from: &Path, to: &Path) {
    let (from, to) = (from.join("keys"), to.join("keys"));
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&to)
        .unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn lease_request(partition: &str) -> LeaseRequest {
    LeaseRequest {
        partition: Some(partition.into()),
        best: None,
        allow_unisolated: false,
        start: None,
        end: None,
    }
}

/// Waits (polling the status, bounded) until `url` says it is active.
async fn wait_until_active(url: &str, within: Duration) -> u64 {
    let client = Client::new(url, None);
    let started = Instant::now();
    loop {
        if let Ok(status) = client.broker_status().await {
            if status.role == leasehold_api::broker_status::BrokerRole::Active {
                return status.epoch;
            }
        }
        assert!(started.elapsed() < within, "{url} did not become active");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[allow(unsafe_code)]
fn signal(process: &Proc, signal: i32) {
    // SAFETY: signalling our own child by pid.
    unsafe {
        libc::kill(process.child.id() as i32, signal);
    }
}

/// Two brokers on one database (the first active, the second standing
/// by), a borrower, and a `sim` agent lending four partitions through both.
struct TwoBrokers {
    dir: tempfile::TempDir,
    database_url: String,
    first: Option<Proc>,
    standby: Proc,
    url_a: String,
    url_b: String,
    admin_token: String,
    borrower_token: String,
    _agent: Proc,
}

impl TwoBrokers {
    fn both(&self) -> String {
        format!("{},{}", self.url_a, self.url_b)
    }

    async fn start(database_url: &str) -> TwoBrokers {
        let dir = tempfile::tempdir().unwrap();
        let (data_a, data_b) = (dir.path().join("a"), dir.path().join("b"));
        let first = start_broker(&data_a, "127.0.0.1:0", database_url, "");
        assert_eq!(first.ready["role"], "active");
        assert_eq!(first.ready["epoch"], 1);
        let url_a = first.ready["broker_url"].as_str().unwrap().to_string();
        share_signing_keys(&data_a, &data_b);
        let standby = start_broker(&data_b, "127.0.0.1:0", database_url, &url_a);
        assert_eq!(standby.ready["role"], "standby", "{}", standby.ready);
        assert_eq!(standby.ready["active_url"], url_a.as_str());
        let url_b = standby.ready["broker_url"].as_str().unwrap().to_string();
        let admin_token = first.ready["admin_token"].as_str().unwrap().to_string();
        let admin = Client::new(&format!("{url_a},{url_b}"), Some(admin_token.clone()));
        let principal = |name: &'static str, role| {
            let admin = admin.clone();
            async move { admin.create_principal(name, role).await.unwrap().token }
        };
        let lender_token = principal("acme", Role::Lender).await;
        let borrower_token = principal("bob", Role::Borrower).await;
        let agent = start_agent(dir.path(), &format!("{url_a},{url_b}"), &lender_token).await;
        TwoBrokers {
            dir,
            database_url: database_url.to_string(),
            first: Some(first),
            standby,
            url_a,
            url_b,
            admin_token,
            borrower_token,
            _agent: agent,
        }
    }
}

/// A `sim` agent given both brokers' addresses, lending four partitions.
async fn start_agent(dir: &Path, brokers: &str, lender_token: &str) -> Proc {
    let agent_data = dir.join("agent").display().to_string();
    let agent = common::spawn_ready_with_token(
        &[
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &agent_data,
            "--host-id",
            "alpha",
            "--driver",
            "sim",
            "--cpus",
            "16",
            "--memory-mib",
            "16384",
            "--disk-gib",
            "100",
            "--broker",
            brokers,
            "--output",
            "json",
        ],
        Some(lender_token),
        &dir.join("agent.log"),
    );
    let agent_url = agent.ready["agent_url"].as_str().unwrap().to_string();
    let lender = Client::new(&agent_url, Some(lender_token.to_string()));
    for _ in 0..4 {
        lender
            .agent_add_partition(&terms(1, 256, "busybox", 3_600_000_000))
            .await
            .unwrap();
    }
    agent
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_broker_takes_over_from_a_killed_one_and_loses_nothing() {
    let Some(database) = TestDatabase::create() else {
        return;
    };
    let mut brokers = TwoBrokers::start(&database.url).await;

    // A standby serves nobody: 503 `standby`, naming the active broker.
    let refused = Client::new(&brokers.url_b, Some("lh_unknown".into()))
        .whoami()
        .await
        .unwrap_err();
    assert_eq!(
        (refused.status(), refused.code()),
        (Some(503), Some("standby"))
    );
    assert!(refused.to_string().contains(&brokers.url_a), "{refused}");

    let released = lease_and_release_killing_the_active_midway(&mut brokers).await;
    nothing_acknowledged_is_lost_or_doubled(&brokers, &released).await;

    // The old active, restarted on its address, is refused by epoch and
    // stands by.
    let listen_a = brokers.url_a.trim_start_matches("http://").to_string();
    let revived = start_broker(
        &brokers.dir.path().join("a"),
        &listen_a,
        &brokers.database_url,
        &brokers.url_b,
    );
    assert_eq!(revived.ready["role"], "standby", "{}", revived.ready);
    let shown = cli(
        &brokers.both(),
        None,
        &["broker", "status", "--output", "json"],
    );
    assert_eq!(shown.code, 0, "{}", shown.stderr);
    let rows = shown.json()["brokers"].clone();
    assert_eq!(rows[0]["role"], "standby");
    assert_eq!(
        (rows[1]["role"].as_str(), rows[1]["epoch"].as_u64()),
        (Some("active"), Some(2))
    );

    a_thawed_active_changes_nothing(brokers).await;
    drop(revived);
}

/// Leases and releases the four partitions in turn, 40 times, through both
/// addresses; the active broker dies by SIGKILL after 20. Returns each
/// acknowledged release's lease and charge.
async fn lease_and_release_killing_the_active_midway(brokers: &mut TwoBrokers) -> Vec<(u64, u64)> {
    let bob = Client::new(&brokers.both(), Some(brokers.borrower_token.clone()));
    let mut released = Vec::new();
    let mut killed_at = None;
    let mut took_over_after = None;
    for round in 0..40u32 {
        if round == 20 {
            brokers.first = None; // SIGKILL (Proc's Drop)
            killed_at = Some(Instant::now());
        }
        let partition = format!("alpha/{}", round % 4 + 1);
        let lease = bob.lease(&lease_request(&partition)).await.unwrap();
        if let (Some(killed), None) = (killed_at, took_over_after) {
            took_over_after = Some(killed.elapsed());
        }
        let receipt = bob.release(lease.lease_id).await.unwrap();
        assert!(!receipt.already_released);
        released.push((lease.lease_id, receipt.bill.charge_micros));
    }
    eprintln!(
        "take-over: the first lease was answered {:?} after the SIGKILL",
        took_over_after.unwrap()
    );
    let status = Client::new(&brokers.url_b, None)
        .broker_status()
        .await
        .unwrap();
    assert_eq!(
        status.role,
        leasehold_api::broker_status::BrokerRole::Active
    );
    assert_eq!(status.epoch, 2);
    released
}

async fn nothing_acknowledged_is_lost_or_doubled(brokers: &TwoBrokers, released: &[(u64, u64)]) {
    let admin_b = Client::new(&brokers.url_b, Some(brokers.admin_token.clone()));
    for (lease_id, charge) in released {
        let lease = admin_b.get_lease(*lease_id).await.unwrap();
        assert_eq!(lease.state, LeaseState::Released, "lease {lease_id}");
        assert_eq!(lease.charge_micros, Some(*charge));
    }
    let mut ids: Vec<u64> = released.iter().map(|(id, _)| *id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 40, "every lease got its own id");
    assert_eq!(admin_b.ledger().await.unwrap().sum_micros, 0);
    let metrics_url = format!("{}/metrics", brokers.url_b);
    let (status, metrics) = common::status_and_body(
        reqwest::Method::GET,
        &metrics_url,
        &brokers.admin_token,
        None,
    )
    .await;
    let metrics = String::from_utf8_lossy(&metrics);
    assert_eq!(status, 200);
    assert!(
        metrics.contains("leasehold_broker_leadership_epoch 2"),
        "{metrics}"
    );
    let bob_b = Client::new(&brokers.url_b, Some(brokers.borrower_token.clone()));
    assert_eq!(
        bob_b.bill().await.unwrap().leases.len(),
        40,
        "one lease per acknowledged lease"
    );
}

/// Freezes the active broker (SIGSTOP) until the other takes over, then
/// thaws it: whatever it was doing, it can change nothing and steps down.
async fn a_thawed_active_changes_nothing(brokers: TwoBrokers) {
    let mut active = brokers.standby;
    signal(&active, libc::SIGSTOP);
    let epoch = wait_until_active(&brokers.url_a, Duration::from_secs(20)).await;
    assert_eq!(epoch, 3);
    let admin_a = Client::new(&brokers.url_a, Some(brokers.admin_token.clone()));
    let leases_before = admin_a.list_leases().await.unwrap().len();
    signal(&active, libc::SIGCONT);
    let thawed = Client::new(&brokers.url_b, Some(brokers.borrower_token.clone()));
    assert!(
        thawed.lease(&lease_request("alpha/1")).await.is_err(),
        "a fenced broker leased"
    );
    let exit = tokio::task::spawn_blocking(move || active.child.wait().unwrap())
        .await
        .unwrap();
    assert!(
        !exit.success(),
        "the thawed broker exits with an error: {exit:?}"
    );
    assert_eq!(
        admin_a.list_leases().await.unwrap().len(),
        leases_before,
        "the fenced broker changed nothing"
    );
}
