//! The broker on PostgreSQL, end to end: `leasehold broker --database URL`
//! as its own process, a `sim` agent, a lease and its release, then a
//! restart: the lease, its bill and the ledger come back from PostgreSQL.
//! Needs `LEASEHOLD_TEST_POSTGRES_URL` (CI starts a throw-away cluster); each
//! run makes its own database and drops it after.

mod common;

use common::{spawn_ready, terms, Cluster, TestDatabase};
use leasehold_api::LeaseRequest;
use leasehold_core::lease::LeaseState;

#[tokio::test(flavor = "multi_thread")]
async fn a_lease_and_its_bill_survive_a_broker_restart_on_postgres() {
    let Some(database) = TestDatabase::create() else {
        return;
    };
    let mut cluster = Cluster::start(&["--database", &database.url]).await;
    assert_eq!(
        cluster.broker.as_ref().unwrap().ready["database"],
        "postgresql"
    );
    let alpha = cluster.start_agent("alpha", "sim");
    leasehold_api::Client::new(&alpha, Some(cluster.lender_token.clone()))
        .agent_add_partition(&terms(1, 256, "busybox", 3_600_000_000))
        .await
        .unwrap();
    let (_, bob) = cluster.borrower("bob").await;
    let lease = bob
        .lease(&LeaseRequest {
            partition: Some("alpha/1".into()),
            best: None,
            allow_unisolated: false,
            start: None,
            end: None,
        })
        .await
        .unwrap();
    let receipt = bob.release(lease.lease_id).await.unwrap();
    assert!(receipt.bill.charge_micros >= 1_000_000, "at least a second");
    assert_eq!(receipt.lease.state, LeaseState::Released);

    cluster.restart_broker();
    let after = bob.get_lease(lease.lease_id).await.unwrap();
    assert_eq!(after.state, LeaseState::Released);
    assert_eq!(after.started_at_ms, lease.started_at_ms);
    assert_eq!(after.charge_micros, Some(receipt.bill.charge_micros));
    let bill = bob.bill().await.unwrap();
    assert_eq!(bill.balance_micros, -(receipt.bill.charge_micros as i64));
    assert_eq!(bill.leases.len(), 1);
    // A retried release answers with the bill from the database.
    let again = bob.release(lease.lease_id).await.unwrap();
    assert!(again.already_released);
    assert_eq!(again.bill, receipt.bill);
    let ledger = cluster.admin().ledger().await.unwrap();
    assert_eq!(ledger.sum_micros, 0);
    assert_eq!(ledger.transfers.len(), 1);
    // Nothing was written to SQLite: the data directory has no database.
    assert!(!cluster.path("broker/broker.db").exists());
    // The partition is free again after the restart: lease it once more.
    let second = bob
        .lease(&LeaseRequest {
            partition: Some("alpha/1".into()),
            best: None,
            allow_unisolated: false,
            start: None,
            end: None,
        })
        .await
        .unwrap();
    assert!(second.lease_id > lease.lease_id);
}

#[test]
fn a_database_url_with_a_password_is_refused_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("broker").display().to_string();
    let output = std::process::Command::new(common::leasehold_binary())
        .args([
            "broker",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data,
            "--database",
            "postgres://leasehold:s3cret@127.0.0.1:1/leasehold",
        ])
        .env_remove("LEASEHOLD_DATABASE_URL")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--database-url-file"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "the refusal does not echo it");
    // The same secret as a parameter is a password too.
    let output = std::process::Command::new(common::leasehold_binary())
        .args([
            "broker",
            "--data-dir",
            &data,
            "--database",
            "postgres://leasehold@127.0.0.1:1/leasehold?password=s3cret",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn a_database_url_file_open_to_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("database-url");
    std::fs::write(&file, "postgres://leasehold:s3cret@127.0.0.1:1/leasehold\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let data = dir.path().join("broker").display().to_string();
    let output = std::process::Command::new(common::leasehold_binary())
        .args(["broker", "--data-dir", &data, "--database-url-file"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("chmod"), "{stderr}");
    assert!(!dir.path().join("broker").exists(), "nothing was started");
}

#[test]
fn the_broker_reads_its_database_url_from_a_private_file() {
    let Some(database) = TestDatabase::create() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("database-url");
    leasehold_store::private_fs::write_private_file(&file, database.url.as_bytes()).unwrap();
    let data = dir.path().join("broker").display().to_string();
    let file_text = file.display().to_string();
    let broker = spawn_ready(
        &[
            "broker",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data,
            "--database-url-file",
            &file_text,
            "--output",
            "json",
        ],
        &dir.path().join("broker.log"),
    );
    assert_eq!(broker.ready["database"], "postgresql");
    assert!(broker.ready["admin_token"].is_string());
    assert!(!dir.path().join("broker/broker.db").exists());
}
