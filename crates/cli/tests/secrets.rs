//! Secrets at rest and on command lines, attacked the way a local user
//! would: reading the broker's signing key or database, reading another
//! process's command line, handing a world-readable token file.

mod common;

use common::{cli, leasehold_binary, spawn_ready, terms, Cluster};
use leasehold_api::{Client, LeaseRequest, SubmitJobRequest};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn up_args(data: &str) -> Vec<String> {
    up_args_with_driver(data, "sim")
}

/// `oci` where it can run (root and runc: with the image store and its
/// cache in the data directory too), else `sim`.
fn strongest_driver() -> &'static str {
    let runc = Command::new("runc").arg("--version").output();
    if is_root() && runc.is_ok_and(|o| o.status.success()) {
        "oci"
    } else {
        eprintln!("up runs with the sim driver: the oci driver needs root and runc");
        "sim"
    }
}

fn up_args_with_driver(data: &str, driver: &str) -> Vec<String> {
    [
        "up",
        "--data-dir",
        data,
        "--listen",
        "127.0.0.1:0",
        "--agent-listen",
        "127.0.0.1:0",
        "--image-store-listen",
        "127.0.0.1:0",
        "--driver",
        driver,
        "--cpus",
        "4",
        "--memory-mib",
        "4096",
        "--output",
        "json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Every path under `top` that group or others may open.
fn open_to_others(top: &Path) -> Vec<String> {
    let mut open = Vec::new();
    let mut pending = vec![top.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.file_type().is_symlink() {
                continue;
            }
            if meta.mode() & 0o077 != 0 {
                open.push(format!("{} {:o}", path.display(), meta.mode() & 0o777));
            }
            if meta.is_dir() {
                pending.push(path);
            }
        }
    }
    open
}

#[test]
fn up_keeps_its_data_private_and_a_local_user_cannot_read_the_signing_key() {
    let dir = tempfile::tempdir().unwrap();
    // A world-traversable parent, as a home or /srv directory would be.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = dir.path().join("data");
    let args = up_args_with_driver(&data.display().to_string(), strongest_driver());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let up = spawn_ready(&refs, &dir.path().join("up.log"));
    let mode = std::fs::metadata(&data).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o700, "the data directory");
    assert_eq!(open_to_others(&data), Vec::<String>::new());
    let keys: Vec<_> = std::fs::read_dir(data.join("broker/keys"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(keys.len(), 1, "one signing key file: {keys:?}");
    let db = std::fs::read(data.join("broker/broker.db")).unwrap();
    let seed_hex =
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&keys[0]).unwrap())
            .unwrap()["seed_hex"]
            .as_str()
            .unwrap()
            .to_string();
    assert!(
        !db.windows(seed_hex.len()).any(|w| w == seed_hex.as_bytes()),
        "the seed is not in the database"
    );
    drop(up);
    if !is_root() {
        eprintln!("skipped the `nobody` part: needs root to switch users");
        return;
    }
    // The attack: another local user reads the key or the database.
    for target in [
        keys[0].clone(),
        data.join("broker/broker.db"),
        data.join("agent/lender.token"),
    ] {
        let output = Command::new("cat")
            .arg(&target)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        assert!(
            !output.status.success() && output.stdout.is_empty(),
            "nobody read {}",
            target.display()
        );
    }
}

#[test]
fn a_data_directory_open_to_others_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let args = up_args(&data.display().to_string());
    let output = Command::new(leasehold_binary())
        .args(&args)
        .env_remove("LEASEHOLD_TOKEN")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_ne!(output.status.code(), Some(0));
    assert!(stderr.contains("chmod 700"), "{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!stdout.contains("broker_url"), "it did not start: {stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_and_keys_are_refused_on_the_command_line_and_read_from_private_files() {
    let cluster = Cluster::start(&[]).await;
    let data = cluster.path("agent-x").display().to_string();
    let base = [
        "agent",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data,
        "--host-id",
        "x",
        "--driver",
        "sim",
        "--broker",
        &cluster.broker_url,
        "--output",
        "json",
    ];
    let mut with_token = base.to_vec();
    with_token.extend(["--token", &cluster.lender_token]);
    let refused = Command::new(leasehold_binary())
        .args(&with_token)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--token-file"), "{stderr}");

    let token_file = cluster.path("lender.token");
    std::fs::write(&token_file, format!("{}\n", cluster.lender_token)).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let token_path = token_file.display().to_string();
    let mut with_file = base.to_vec();
    with_file.extend(["--token-file", &token_path]);
    let open_file = Command::new(leasehold_binary())
        .args(&with_file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&open_file.stderr);
    assert_ne!(open_file.status.code(), Some(0));
    assert!(stderr.contains("chmod 600"), "{stderr}");

    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let agent = spawn_ready(&with_file, &cluster.path("agent-x.log"));
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", agent.child.id())).unwrap();
    assert!(
        !cmdline
            .windows(cluster.lender_token.len())
            .any(|w| w == cluster.lender_token.as_bytes()),
        "the token is not in the agent's command line"
    );
    assert_eq!(
        agent.ready["host_id"], "x",
        "the agent started with its token file"
    );

    let run = cli(
        &cluster.broker_url,
        None,
        &["run", "--lease", "1", "--key", "lk1.a.b", "--", "true"],
    );
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains("--key-file"), "{}", run.stderr);
}

fn claims_of(lease_key: &str) -> serde_json::Value {
    use base64::Engine;
    let body = lease_key.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(body)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn job(key: &str) -> SubmitJobRequest {
    SubmitJobRequest {
        lease_key: key.to_string(),
        command: vec!["true".into()],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_signing_key_is_trusted_by_running_agents_while_old_keys_stay_valid() {
    let mut cluster = Cluster::start(&[]).await;
    let alpha = cluster.start_agent("alpha", "sim");
    let lender = Client::new(&alpha, Some(cluster.lender_token.clone()));
    for price in [1000, 2000] {
        lender
            .agent_add_partition(&terms(1, 256, "busybox", price))
            .await
            .unwrap();
    }
    let (_, bob) = cluster.borrower("bob").await;
    let lease = |name: &str| LeaseRequest {
        partition: Some(name.to_string()),
        best: None,
        allow_unisolated: false,
        start: None,
        end: None,
    };
    let old = bob.lease(&lease("alpha/1")).await.unwrap();
    let old_key = old.lease_key.clone().unwrap();
    let old_id = claims_of(&old_key)["key_id"].as_str().unwrap().to_string();

    cluster.broker = None;
    let broker_dir = cluster.path("broker").display().to_string();
    let rotated = cli(
        &cluster.broker_url,
        None,
        &[
            "broker",
            "rotate-key",
            "--data-dir",
            &broker_dir,
            "--output",
            "json",
        ],
    );
    assert_eq!(rotated.code, 0, "{}", rotated.stderr);
    let new_id = rotated.json()["key_id"].as_str().unwrap().to_string();
    assert_ne!(new_id, old_id);
    cluster.restart_broker();

    let new = bob.lease(&lease("alpha/2")).await.unwrap();
    let new_key = new.lease_key.clone().unwrap();
    assert_eq!(claims_of(&new_key)["key_id"], new_id.as_str());
    let agent = Client::new(&alpha, None);
    // The running agent learns the new key through its endorsement.
    let ran = agent.submit_job(2, &job(&new_key)).await.unwrap();
    assert_eq!(ran.exit_code, Some(0));
    let ran = agent.submit_job(1, &job(&old_key)).await.unwrap();
    assert_eq!(
        ran.exit_code,
        Some(0),
        "keys of the old signing key stay valid"
    );
    for file in std::fs::read_dir(cluster.path("broker/keys")).unwrap() {
        let mode = file.unwrap().metadata().unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_key_is_logged_with_its_reason_and_never_the_key() {
    let mut cluster = Cluster::start(&[]).await;
    let alpha = cluster.start_agent("alpha", "sim");
    Client::new(&alpha, Some(cluster.lender_token.clone()))
        .agent_add_partition(&terms(1, 256, "busybox", 1000))
        .await
        .unwrap();
    let forged = leasehold_core::key::sign(
        &leasehold_core::key::LeaseKeyClaims {
            not_before_ms: None,
            lease_id: 1,
            host_id: "alpha".into(),
            partition_index: 1,
            epoch: 1,
            borrower: "mallory".into(),
            issued_at_ms: 0,
            expires_at_ms: u64::MAX,
            key_id: String::new(),
            terms: None,
        },
        &leasehold_core::key::signing_key_from_seed([42; 32]),
    );
    let refused = Client::new(&alpha, None)
        .submit_job(1, &job(&forged))
        .await
        .unwrap_err();
    assert_eq!(refused.status(), Some(403), "{refused}");
    let log: String = std::fs::read_dir(cluster.dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            name.starts_with("agent-alpha-") && name.ends_with(".log")
        })
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert!(log.contains("refused a lease key"), "{log}");
    assert!(log.contains("BadSignature"), "{log}");
    let signature = forged.rsplit('.').next().unwrap();
    assert!(!log.contains(signature), "the key itself is never logged");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_credential_acts_for_its_one_host_only() {
    let cluster = Cluster::start(&[]).await;
    let made = cli(
        &cluster.broker_url,
        Some(&cluster.lender_token),
        &["host", "credential", "alpha", "--output", "json"],
    );
    assert_eq!(made.code, 0, "{}", made.stderr);
    let credential = made.json()["token"].as_str().unwrap().to_string();
    assert_ne!(credential, cluster.lender_token);
    let data = cluster.path("agent-alpha").display().to_string();
    let agent = common::spawn_ready_with_token(
        &[
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data,
            "--host-id",
            "alpha",
            "--driver",
            "sim",
            "--broker",
            &cluster.broker_url,
            "--output",
            "json",
        ],
        Some(&credential),
        &cluster.path("agent-alpha.log"),
    );
    let alpha = agent.ready["agent_url"].as_str().unwrap().to_string();
    // The lender manages the host with its own token, which the agent
    // does not hold: the broker vouches for it.
    Client::new(&alpha, Some(cluster.lender_token.clone()))
        .agent_add_partition(&terms(1, 256, "busybox", 1000))
        .await
        .unwrap();
    let (borrower_token, _) = cluster.borrower("bob").await;
    let refused = Client::new(&alpha, Some(borrower_token))
        .agent_list_partitions()
        .await
        .unwrap_err();
    assert_eq!(refused.status(), Some(401));
    // The attack: alpha's credential, leaked, used for the lender's other
    // hosts or the lender's other powers.
    let leaked = Client::new(&cluster.broker_url, Some(credential.clone()));
    let register = leasehold_api::RegisterHostRequest {
        share: None,
        agent_url: Some("http://127.0.0.1:9".into()),
        capacity: leasehold_core::HostCapacity {
            cpu_centicores: 400,
            memory_mib: 4096,
            disk_gib: 10,
            owner_share_cpu_centicores: 0,
            owner_share_memory_mib: 0,
            owner_share_disk_gib: 0,
        },
    };
    let attempts = [
        leaked.register_host("beta", &register).await.map(|_| ()),
        leaked.list_partitions().await.map(|_| ()),
        leaked.list_leases().await.map(|_| ()),
        leaked.create_host_credential("alpha").await.map(|_| ()),
        leaked.create_host_credential("beta").await.map(|_| ()),
    ];
    for attempt in attempts {
        assert_eq!(attempt.unwrap_err().status(), Some(403));
    }
    assert!(
        cluster
            .lender()
            .list_hosts()
            .await
            .unwrap()
            .iter()
            .all(|h| h.host_id != "beta"),
        "nothing was registered"
    );
    // What the agent needs for its own host still works.
    assert_eq!(
        leaked
            .list_host_partitions("alpha", None, 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

/// Under a supervisor the ready line goes to a log others may read:
/// `--admin-token-file` puts the first admin's token in a 0600 file
/// instead, and the ready line does not carry it.
#[tokio::test(flavor = "multi_thread")]
async fn the_first_admin_token_can_go_to_a_private_file_instead_of_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("broker").display().to_string();
    let token_path = dir.path().join("admin.token");
    let token_text = token_path.display().to_string();
    let broker = spawn_ready(
        &[
            "broker",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data,
            "--admin-token-file",
            &token_text,
            "--output",
            "json",
        ],
        &dir.path().join("broker.log"),
    );
    assert!(broker.ready["admin_token"].is_null(), "{}", broker.ready);
    let metadata = std::fs::metadata(&token_path).unwrap();
    assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
    let token = std::fs::read_to_string(&token_path).unwrap();
    let url = broker.ready["broker_url"].as_str().unwrap();
    let whoami = Client::new(url, Some(token.trim().to_string()))
        .whoami()
        .await
        .unwrap();
    assert_eq!(whoami.name, "admin");
    // A token file others can read is refused before anything is made.
    let open_path = dir.path().join("open.token");
    std::fs::write(&open_path, "").unwrap();
    std::fs::set_permissions(&open_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let other_data = dir.path().join("other").display().to_string();
    let refused = Command::new(leasehold_binary())
        .args([
            "broker",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &other_data,
        ])
        .args(["--admin-token-file", &open_path.display().to_string()])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("admin-token-file"), "{stderr}");
    assert!(
        !dir.path().join("other/broker.db").exists(),
        "nothing was made"
    );
}
