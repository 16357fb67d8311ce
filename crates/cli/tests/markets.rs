//! One host in several markets (issue 11; seed 000, FIG. 10 to 15), each
//! process real: two brokers (one on SQLite, one on PostgreSQL when CI's
//! throw-away cluster is there) and one `sim` agent that gives each broker
//! a share of the host. Borrowers race on both markets for the whole host;
//! nothing is sold twice, each broker's keys count only for its own
//! partitions, and the broker carves exactly the size asked for.

mod common;

use common::{refused_start, spawn_ready, spawn_ready_with_token, Proc, TestDatabase};
use leasehold_api::{AgentPartitionView, Client, LeaseRequest, Role, SubmitJobRequest};
use leasehold_core::key::{self, LeaseKeyClaims};
use leasehold_core::Requirements;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

struct Market {
    _broker: Proc,
    url: String,
    admin: Client,
    lender_token_file: String,
    data_dir: std::path::PathBuf,
}

async fn start_market(dir: &Path, name: &str, database: Option<&str>) -> Market {
    let data = dir.join(format!("broker-{name}"));
    let data_text = data.display().to_string();
    let mut args = vec![
        "broker",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data_text,
        "--output",
        "json",
    ];
    if let Some(url) = database {
        args.extend(["--database", url]);
    }
    let broker = spawn_ready(&args, &dir.join(format!("broker-{name}.log")));
    let url = broker.ready["broker_url"].as_str().unwrap().to_string();
    let admin = Client::new(&url, broker.ready["admin_token"].as_str().map(String::from));
    let lender = admin.create_principal("acme", Role::Lender).await.unwrap();
    let file = dir.join(format!("lender-{name}.token"));
    let mut handle = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&file)
        .unwrap();
    std::io::Write::write_all(&mut handle, lender.token.as_bytes()).unwrap();
    Market {
        _broker: broker,
        url,
        admin,
        lender_token_file: file.display().to_string(),
        data_dir: data,
    }
}

async fn borrower(market: &Market, name: &str) -> Client {
    let token = market
        .admin
        .create_principal(name, Role::Borrower)
        .await
        .unwrap()
        .token;
    Client::new(&market.url, Some(token))
}

fn sized(vcpus: u32, memory_mib: u64, disk_gib: u64) -> LeaseRequest {
    LeaseRequest {
        partition: None,
        best: Some(Requirements {
            min_vcpus: Some(vcpus),
            min_memory_mib: Some(memory_mib),
            min_disk_gib: Some(disk_gib),
            ..Requirements::default()
        }),
        allow_unisolated: false,
        start: None,
        end: None,
    }
}

/// The agent's args for a host of 5 vCPUs, 8 GiB (512 MiB the owner's)
/// and 20 GiB, lending `share_a` to `a` and `share_b` to `b`.
fn agent_args(dir: &Path, a: &Market, share_a: &str, b: &Market, share_b: &str) -> Vec<String> {
    let mut args: Vec<String> = [
        "agent",
        "--driver",
        "sim",
        "--host-id",
        "two-markets",
        "--listen",
        "127.0.0.1:0",
        "--cpus",
        "5",
        "--memory-mib",
        "8192",
        "--disk-gib",
        "20",
        "--owner-share-memory-mib",
        "512",
        "--output",
        "json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend([
        "--data-dir".into(),
        dir.join("agent").display().to_string(),
        "--broker".into(),
        format!("{}={share_a}", a.url),
        "--broker".into(),
        format!("{}={share_b}", b.url),
        "--token-file".into(),
        format!("{}={}", a.url, a.lender_token_file),
        "--token-file".into(),
        format!("{}={}", b.url, b.lender_token_file),
    ]);
    args
}

/// Leases `size` from `borrowers` racing at once until the market answers
/// no match; every lease concluded.
async fn lease_until_full(
    borrowers: &[Client],
    size: (u32, u64, u64),
) -> Vec<leasehold_api::LeaseView> {
    let tasks = borrowers.iter().cloned().map(|client| {
        tokio::spawn(async move {
            let mut won = Vec::new();
            loop {
                match client.lease(&sized(size.0, size.1, size.2)).await {
                    Ok(lease) => won.push(lease),
                    Err(error) if error.code() == Some("no_match") => return won,
                    Err(error) => panic!("lease failed: {error}"),
                }
            }
        })
    });
    let mut all = Vec::new();
    for task in tasks.collect::<Vec<_>>() {
        all.extend(task.await.unwrap());
    }
    all
}

/// The seed of the broker's current signing key, from its data directory.
fn signing_seed_of(broker_data: &Path) -> [u8; 32] {
    let entry = std::fs::read_dir(broker_data.join("keys"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(entry.path()).unwrap()).unwrap();
    let seed_hex = file["seed_hex"].as_str().unwrap();
    let mut seed = [0u8; 32];
    for (n, byte) in seed.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&seed_hex[2 * n..2 * n + 2], 16).unwrap();
    }
    seed
}

/// The same claims signed with another broker's own key: what a broker
/// that signs for partitions it does not manage would hand out.
fn key_signed_by(broker_data: &Path, claims: &LeaseKeyClaims) -> String {
    let signing = key::signing_key_from_seed(signing_seed_of(broker_data));
    let claims = LeaseKeyClaims {
        key_id: key::key_id(&signing.verifying_key()),
        ..claims.clone()
    };
    key::sign(&claims, &signing)
}

fn claims_of(lease: &leasehold_api::LeaseView, broker_data: &Path) -> LeaseKeyClaims {
    let public = key::signing_key_from_seed(signing_seed_of(broker_data)).verifying_key();
    key::decode_and_verify(lease.lease_key.as_deref().unwrap(), &public).unwrap()
}

async fn run_true(
    agent: &Client,
    index: u32,
    lease_key: &str,
) -> Result<(), leasehold_api::ApiError> {
    let request = SubmitJobRequest {
        lease_key: lease_key.to_string(),
        command: vec!["true".into()],
        ..Default::default()
    };
    agent.submit_job(index, &request).await.map(|_| ())
}

#[tokio::test]
async fn one_host_lends_disjoint_shares_to_two_markets_and_nothing_is_sold_twice() {
    let dir = tempfile::tempdir().unwrap();
    let database = TestDatabase::create();
    if database.is_none() {
        eprintln!("market B runs on SQLite: no LEASEHOLD_TEST_POSTGRES_URL (CI sets it)");
    }
    let a = start_market(dir.path(), "a", None).await;
    let b = start_market(dir.path(), "b", database.as_ref().map(|d| d.url.as_str())).await;
    let (share_a, share_b) = (
        "vcpus=2,memory_mib=4096,disk_gib=8",
        "vcpus=2,memory_mib=3072,disk_gib=8",
    );
    let args = agent_args(dir.path(), &a, share_a, &b, share_b);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = spawn_ready_with_token(&refs, None, &dir.path().join("agent.log"));
    let agent_url = agent.ready["agent_url"].as_str().unwrap().to_string();

    let borrowers_a = vec![borrower(&a, "ann").await, borrower(&a, "amy").await];
    let borrowers_b = vec![borrower(&b, "bea").await, borrower(&b, "bob").await];
    let size = (1, 1024, 2);
    let (won_a, won_b) = tokio::join!(
        lease_until_full(&borrowers_a, size),
        lease_until_full(&borrowers_b, size)
    );
    // A's share holds 2 such partitions (its vCPUs); B's 2 as well (its
    // vCPUs; 3 by memory). Never more, however the borrowers race.
    assert_eq!(won_a.len(), 2, "A sold {won_a:?}");
    assert_eq!(won_b.len(), 2, "B sold {won_b:?}");
    for lease in won_a.iter().chain(&won_b) {
        assert_eq!(lease.terms.memory_mib, 1024, "exactly the size asked for");
        assert_eq!(lease.terms.vcpus, 1);
    }

    // Each key runs on its own partition: the agent makes the partition
    // from the key's terms, inside the share it gave that broker.
    let lender_a = std::fs::read_to_string(&a.lender_token_file).unwrap();
    let agent_client = Client::new(&agent_url, Some(lender_a));
    for lease in won_a.iter().chain(&won_b) {
        run_true(
            &agent_client,
            lease.partition.index,
            lease.lease_key.as_deref().unwrap(),
        )
        .await
        .unwrap_or_else(|e| panic!("own key refused on {}: {e}", lease.partition));
    }
    let rows: Vec<AgentPartitionView> = agent_client.agent_list_partitions().await.unwrap();
    let managed = |url: &str| {
        rows.iter()
            .filter(|r| r.managed_by.as_deref() == Some(url))
            .count()
    };
    assert_eq!((managed(&a.url), managed(&b.url)), (2, 2), "{rows:?}");
    let memory: u64 = rows
        .iter()
        .filter(|r| r.lease_id.is_some())
        .map(|r| r.terms.memory_mib)
        .sum();
    assert_eq!(
        memory,
        4 * 1024,
        "the agent's table holds what was sold, once"
    );
    let ranges_overlap = won_a
        .iter()
        .any(|x| won_b.iter().any(|y| y.partition.index == x.partition.index));
    assert!(
        !ranges_overlap,
        "the two markets carved the same partition index"
    );

    // A key A signed, for one of B's partitions: refused (A does not manage it).
    let victim = &won_b[0];
    let forged = key_signed_by(&a.data_dir, &claims_of(victim, &b.data_dir));
    let refused = run_true(&agent_client, victim.partition.index, &forged).await;
    let error = refused.expect_err("A's key ran on B's partition");
    assert_eq!(error.code(), Some("key_rejected"), "{error}");
    assert!(error.to_string().contains("does not manage"), "{error}");
    let forged = key_signed_by(&b.data_dir, &claims_of(&won_a[0], &a.data_dir));
    assert!(run_true(&agent_client, won_a[0].partition.index, &forged)
        .await
        .is_err());

    // Release gives the capacity back to the share: it is carved again.
    let by_ann = borrowers_a[0].release(won_a[0].lease_id).await;
    let by_amy = borrowers_a[1].release(won_a[0].lease_id).await;
    assert!(by_ann.is_ok() || by_amy.is_ok(), "{by_ann:?} {by_amy:?}");
    // More memory than A's share has free: no match, with the share's
    // reason (B's share is not A's to sell).
    let too_big = borrowers_a[0].lease(&sized(1, 3500, 1)).await.unwrap_err();
    assert_eq!(too_big.code(), Some("no_match"), "{too_big}");
    assert!(too_big.to_string().contains("memory"), "{too_big}");
    let again = borrowers_a[0].lease(&sized(1, 2048, 4)).await.unwrap();
    assert_eq!(again.terms.memory_mib, 2048);
    run_true(
        &agent_client,
        again.partition.index,
        again.lease_key.as_deref().unwrap(),
    )
    .await
    .expect("the share's freed room runs a new lease");
    drop(agent);
}

#[tokio::test]
async fn shares_that_overlap_the_host_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let a = start_market(dir.path(), "a", None).await;
    let b = start_market(dir.path(), "b", None).await;
    // 4 + 2 vCPUs on a host that lends 4.5.
    let args = agent_args(
        dir.path(),
        &a,
        "vcpus=4,memory_mib=1024,disk_gib=2",
        &b,
        "vcpus=2,memory_mib=1024,disk_gib=2",
    );
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let refused = refused_start(&refs, &[]);
    assert_ne!(refused.code, 0);
    assert!(
        refused.stderr.contains("does not fit beside") && refused.stderr.contains(&b.url),
        "{}",
        refused.stderr
    );
}

#[tokio::test]
async fn three_borrowers_get_exactly_their_sizes_from_one_share_and_release_gives_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let a = start_market(dir.path(), "a", None).await;
    // One share market; keys are checked offline (the broker's confirmation
    // would refuse the forged key below before the share check could).
    let data = dir.path().join("agent").display().to_string();
    let args: Vec<String> = [
        "agent",
        "--driver",
        "sim",
        "--host-id",
        "one-share",
        "--listen",
        "127.0.0.1:0",
        "--cpus",
        "5",
        "--memory-mib",
        "8192",
        "--disk-gib",
        "20",
        "--owner-share-memory-mib",
        "512",
        "--confirm-keys",
        "offline",
        "--output",
        "json",
        "--data-dir",
        &data,
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--broker".to_string(),
        format!("{}=vcpus=4,memory_mib=7168,disk_gib=16", a.url),
        "--token-file".to_string(),
        format!("{}={}", a.url, a.lender_token_file),
    ])
    .collect();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = spawn_ready_with_token(&refs, None, &dir.path().join("agent.log"));
    let agent_url = agent.ready["agent_url"].as_str().unwrap().to_string();
    let lender = std::fs::read_to_string(&a.lender_token_file).unwrap();
    let agent_client = Client::new(&agent_url, Some(lender));

    let mut leases = Vec::new();
    for (name, (vcpus, memory, disk)) in [
        ("ann", (1, 1024, 2)),
        ("amy", (2, 2048, 4)),
        ("abe", (1, 4096, 10)),
    ] {
        let token = a
            .admin
            .create_principal(name, Role::Borrower)
            .await
            .unwrap()
            .token;
        let (v, m, d) = (vcpus.to_string(), memory.to_string(), disk.to_string());
        let leased = common::cli(
            &a.url,
            Some(&token),
            &[
                "lease",
                "--vcpus",
                &v,
                "--memory-mib",
                &m,
                "--disk-gib",
                &d,
                "--output",
                "json",
            ],
        );
        assert_eq!(leased.code, 0, "{}", leased.stderr);
        let lease: leasehold_api::LeaseView = serde_json::from_str(leased.stdout.trim()).unwrap();
        assert_eq!(
            (
                lease.terms.vcpus,
                lease.terms.memory_mib,
                lease.terms.disk_gib
            ),
            (vcpus, memory, disk)
        );
        run_true(
            &agent_client,
            lease.partition.index,
            lease.lease_key.as_deref().unwrap(),
        )
        .await
        .unwrap();
        leases.push((token, lease));
    }
    // The agent's partitions are exactly the keys' terms.
    let rows = agent_client.agent_list_partitions().await.unwrap();
    for (_, lease) in &leases {
        let row = rows
            .iter()
            .find(|r| r.partition.index == lease.partition.index)
            .unwrap();
        assert_eq!(row.terms, lease.terms);
        assert_eq!(row.managed_by.as_deref(), Some(a.url.as_str()));
    }
    // 4 of 4 vCPUs are carved: more is no match, with the share's reason.
    let (token, _) = &leases[0];
    let full = common::cli(
        &a.url,
        Some(token),
        &[
            "lease",
            "--vcpus",
            "1",
            "--memory-mib",
            "512",
            "--disk-gib",
            "1",
        ],
    );
    assert_eq!(full.code, 3, "{} {}", full.stdout, full.stderr);
    assert!(full.stderr.contains("share"), "{}", full.stderr);
    // A key the broker signed for more than the share holds is refused.
    let mut claims = claims_of(&leases[0].1, &a.data_dir);
    claims.partition_index = leases[2].1.partition.index + 1;
    claims.terms = Some(leasehold_core::Terms {
        memory_mib: 1_000_000,
        ..leases[0].1.terms.clone()
    });
    let oversized = key_signed_by(&a.data_dir, &claims);
    let refused = run_true(&agent_client, claims.partition_index, &oversized)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("does not fit the share"),
        "{refused}"
    );
    // Release gives the room back.
    let released = common::cli(
        &a.url,
        Some(&leases[1].0),
        &["release", &leases[1].1.lease_id.to_string()],
    );
    assert_eq!(released.code, 0, "{}", released.stderr);
    let again = common::cli(
        &a.url,
        Some(token),
        &[
            "lease",
            "--vcpus",
            "2",
            "--memory-mib",
            "512",
            "--disk-gib",
            "1",
        ],
    );
    assert_eq!(again.code, 0, "{}", again.stderr);
    drop(agent);
}
