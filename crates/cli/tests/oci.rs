//! End-to-end tests of the `oci` driver and the image store: separate
//! processes for the store, the broker and the agent. They need root, runc
//! and busybox-static (CI provides them); without them they say why they
//! skipped.

mod common;

use common::{cli, spawn_ready, terms, Cluster};
use leasehold_api::Client;

fn skip_reason() -> Option<String> {
    leasehold_agent::driver::oci::probe().err().or_else(|| {
        (!std::path::Path::new("/bin/busybox").exists()
            && !std::path::Path::new("/usr/bin/busybox").exists())
        .then(|| "busybox-static is not installed".to_string())
    })
}

/// Serves the image store at `store` in its own process; its URL.
fn serve_store(cluster: &Cluster, store: &str) -> (common::Proc, String) {
    let serve = spawn_ready(
        &[
            "images",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            store,
            "--output",
            "json",
        ],
        &cluster.path("store.log"),
    );
    let url = serve.ready["image_store_url"].as_str().unwrap().to_string();
    (serve, url)
}

/// Starts (or restarts) the oci agent `ocihost`, offering busybox from
/// the store, with `extra` flags.
fn start_oci_agent(cluster: &Cluster, store_url: &str, log: &str, extra: &[&str]) -> common::Proc {
    let data = cluster.path("agent-oci").display().to_string();
    let mut args = vec![
        "agent",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data,
        "--host-id",
        "ocihost",
        "--driver",
        "oci",
        "--image-store",
        store_url,
        "--image",
        "busybox",
        "--cpus",
        "2",
        "--memory-mib",
        "4096",
        "--disk-gib",
        "10",
        "--owner-share-centicores",
        "0",
        "--broker",
        &cluster.broker_url,
        "--output",
        "json",
    ];
    args.extend_from_slice(extra);
    common::spawn_ready_with_token(&args, Some(&cluster.lender_token), &cluster.path(log))
}

#[tokio::test(flavor = "multi_thread")]
async fn oci_partitions_boot_images_from_the_store() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipped: the oci driver cannot run here: {reason}");
        return;
    }
    let cluster = Cluster::start(&[]).await;
    let store = cluster.path("store").display().to_string();
    let built = cli(
        &cluster.broker_url,
        None,
        &[
            "images", "build", "busybox", "--store", &store, "--output", "json",
        ],
    );
    assert_eq!(built.code, 0, "{}", built.stderr);
    assert!(built.json()["digest"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    let listed = cli(
        &cluster.broker_url,
        None,
        &["images", "list", "--store", &store, "--output", "json"],
    );
    assert_eq!(listed.json()["images"][0]["name"], "busybox");
    let (serve, store_url) = serve_store(&cluster, &store);

    // An agent with the oci driver, offering busybox from that store.
    let agent = start_oci_agent(&cluster, &store_url, "agent-oci.log", &[]);
    assert_eq!(agent.ready["driver"], "oci");
    let agent_url = agent.ready["agent_url"].as_str().unwrap().to_string();
    let lender_agent = Client::new(&agent_url, Some(cluster.lender_token.clone()));
    // Terms may only list images this host offers.
    let error = lender_agent
        .agent_add_partition(&terms(1, 128, "debian-12", 1000))
        .await
        .unwrap_err();
    assert_eq!(
        error.detail().and_then(|d| d.field.as_deref()),
        Some("terms.images[0]")
    );
    lender_agent
        .agent_add_partition(&terms(1, 128, "busybox", 1000))
        .await
        .unwrap();

    let (token, _) = cluster.borrower("bob").await;
    let url = cluster.broker_url.clone();
    // An image nobody offers is refused at find and lease time.
    let find = cli(&url, Some(&token), &["find", "--image", "windows"]);
    assert_eq!(find.code, 1);
    assert!(
        find.stderr.contains("unknown image 'windows'"),
        "{}",
        find.stderr
    );
    let lease = cli(
        &url,
        Some(&token),
        &["lease", "--best", "--image", "busybox", "--output", "json"],
    );
    assert_eq!(lease.code, 0, "{}", lease.stderr);
    let lease_id = lease.json()["lease_id"].to_string();

    // The job boots busybox (fetched, verified and cached by the agent).
    let run = cli(
        &url,
        Some(&token),
        &[
            "run",
            "--lease",
            &lease_id,
            "--output",
            "json",
            "--",
            "sh",
            "-c",
            "busybox | head -1; echo data > /work/f",
        ],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let result = run.json();
    assert!(
        result["stdout"].as_str().unwrap().starts_with("BusyBox"),
        "{result}"
    );
    assert!(
        result["cpu_ms"].is_u64() && result["peak_memory_bytes"].as_u64().unwrap() > 0,
        "{result}"
    );
    assert!(
        std::fs::read_dir(cluster.path("agent-oci/image-cache/rootfs"))
            .unwrap()
            .count()
            == 1,
        "cached once"
    );
    // Running a job in a user namespace did not open the data directory
    // or the image cache to other users (runc reaches the image through a
    // bind mount under /run/leasehold instead).
    use std::os::unix::fs::PermissionsExt;
    for private in [
        "agent-oci",
        "agent-oci/image-cache",
        "agent-oci/image-cache/rootfs",
    ] {
        let mode = std::fs::metadata(cluster.path(private))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{private} is {mode:o}");
    }
    // At run time, an image the partition does not offer is refused.
    let wrong = cli(
        &url,
        Some(&token),
        &[
            "run",
            "--lease",
            &lease_id,
            "--image",
            "debian-12",
            "--",
            "true",
        ],
    );
    assert_eq!(wrong.code, 1);
    assert!(
        wrong.stderr.contains("cannot boot 'debian-12'"),
        "{}",
        wrong.stderr
    );
    // The exit code and the files of the lease carry across jobs.
    let again = cli(
        &url,
        Some(&token),
        &[
            "run",
            "--lease",
            &lease_id,
            "--",
            "sh",
            "-c",
            "cat /work/f; exit 5",
        ],
    );
    assert_eq!(
        (again.code, again.stdout.as_str()),
        (5, "data\n"),
        "{}",
        again.stderr
    );
    // A timeout stops the job: exit 124.
    let slow = cli(
        &url,
        Some(&token),
        &[
            "run",
            "--lease",
            &lease_id,
            "--timeout-secs",
            "1",
            "--",
            "sleep",
            "30",
        ],
    );
    assert_eq!(slow.code, 124, "{}", slow.stderr);

    // Release wipes the partition: nothing of it stays mounted.
    let release = cli(&url, Some(&token), &["release", &lease_id]);
    assert_eq!(release.code, 0, "{}", release.stderr);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let oci_root = std::fs::canonicalize(cluster.path("agent-oci/oci")).unwrap();
    assert!(
        !mounts.contains(&oci_root.display().to_string()),
        "the partition's disk is unmounted after release"
    );
    drop(agent);
    drop(serve);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oci_agent_killed_mid_job_cleans_up_when_it_restarts() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipped: the oci driver cannot run here: {reason}");
        return;
    }
    let cluster = Cluster::start(&[]).await;
    let store = cluster.path("store").display().to_string();
    assert_eq!(
        cli(
            &cluster.broker_url,
            None,
            &["images", "build", "busybox", "--store", &store]
        )
        .code,
        0
    );
    let (serve, store_url) = serve_store(&cluster, &store);
    let start_agent = |log: &str| start_oci_agent(&cluster, &store_url, log, &[]);
    let agent = start_agent("agent-1.log");
    let agent_url = agent.ready["agent_url"].as_str().unwrap().to_string();
    Client::new(&agent_url, Some(cluster.lender_token.clone()))
        .agent_add_partition(&terms(1, 128, "busybox", 1000))
        .await
        .unwrap();
    let (_, bob) = cluster.borrower("bob").await;
    let lease = bob
        .lease(&leasehold_api::LeaseRequest {
            partition: Some("ocihost/1".into()),
            best: None,
            allow_unisolated: false,
            start: None,
            end: None,
        })
        .await
        .unwrap();
    let request = |command: &str| leasehold_api::SubmitJobRequest {
        lease_key: lease.lease_key.clone().unwrap(),
        command: vec!["sh".into(), "-c".into(), command.into()],
        ..Default::default()
    };
    let first = Client::new(&agent_url, None)
        .submit_job(1, &request("mkfifo /work/started; echo kept > /work/file"))
        .await
        .unwrap();
    assert_eq!(first.exit_code, Some(0), "{first:?}");
    let running = {
        let client = Client::new(&agent_url, None);
        let long = request("echo go > /work/started; exec sleep 603");
        tokio::spawn(async move { client.submit_job(1, &long).await })
    };
    let fifo = std::fs::canonicalize(cluster.path("agent-oci/oci"))
        .unwrap()
        .join("partition-1/disk/work/started");
    let line = tokio::task::spawn_blocking(move || std::fs::read_to_string(fifo).unwrap())
        .await
        .unwrap();
    assert_eq!(line, "go\n");

    // SIGKILL: the agent has no chance to clean up.
    drop(agent);
    assert!(running.await.unwrap().is_err());
    let agent = start_agent("agent-2.log");
    let notes: Vec<String> = agent.ready["reconciled"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("deleted leftover container")),
        "{notes:?}"
    );
    assert!(
        notes.iter().any(|n| n.starts_with("unmounted")),
        "{notes:?}"
    );
    assert!(notes.iter().any(|n| n.contains("marked lost")), "{notes:?}");
    let leftover = std::process::Command::new("pgrep")
        .args(["-f", "^sleep 603$"])
        .output()
        .unwrap();
    assert!(
        leftover.stdout.is_empty(),
        "the container's processes are gone"
    );
    // The lease still runs jobs, with its files.
    let agent_url = agent.ready["agent_url"].as_str().unwrap().to_string();
    let again = Client::new(&agent_url, None)
        .submit_job(1, &request("cat /work/file"))
        .await
        .unwrap();
    assert_eq!(again.stdout, "kept\n");
    let receipt = bob.release(lease.lease_id).await.unwrap();
    assert!(receipt.agent_notified);
    drop(serve);
}

/// Seed 004 with `oci`: a partition's temporary right expires on the
/// (simulated) clock, and the job running there sees its CPU count drop.
#[tokio::test(flavor = "multi_thread")]
async fn an_expiring_right_takes_a_core_from_a_running_job() {
    use std::io::{BufRead, BufReader};
    if let Some(reason) = skip_reason() {
        eprintln!("skipped: the oci driver cannot run here: {reason}");
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 {
        eprintln!("skipped: needs 2 cores to take one away, this machine has {cores}");
        return;
    }
    let clock = common::SimulatedClockFile::starting_at(1_800_000_000_000);
    let clock_args = clock.args();
    let cluster = Cluster::start(&[clock_args[0].as_str(), clock_args[1].as_str()]).await;
    let store = cluster.path("store").display().to_string();
    let built = cli(
        &cluster.broker_url,
        None,
        &["images", "build", "busybox", "--store", &store],
    );
    assert_eq!(built.code, 0, "{}", built.stderr);
    let (_serve, store_url) = serve_store(&cluster, &store);
    let extra = [
        "--group",
        "g",
        clock_args[0].as_str(),
        clock_args[1].as_str(),
    ];
    let agent = start_oci_agent(&cluster, &store_url, "agent-oci.log", &extra);
    let agent_url = agent.ready["agent_url"].as_str().unwrap().to_string();
    let rights = |token: &str, args: &[&str]| {
        let mut all = vec!["rights"];
        all.extend_from_slice(args);
        all.extend(["--agent", agent_url.as_str()]);
        let out = cli(&cluster.broker_url, Some(token), &all);
        assert_eq!(out.code, 0, "{all:?}: {}", out.stderr);
    };
    let admin = cluster.admin_token.clone();
    rights(&admin, &["grant", "--host", "ocihost", "--modules", "2"]);
    let lender_agent = Client::new(&agent_url, Some(cluster.lender_token.clone()));
    let added = lender_agent
        .agent_add_partition(&terms(2, 128, "busybox", 1000))
        .await
        .unwrap();
    let index = added.partition.index.to_string();
    let (token, _) = cluster.borrower("bob").await;
    let name = format!("ocihost/{index}");
    let lease = cli(
        &cluster.broker_url,
        Some(&token),
        &["lease", &name, "--output", "json"],
    );
    assert_eq!(lease.code, 0, "{}", lease.stderr);
    let lease_id = lease.json()["lease_id"].to_string();
    // The first job gets the partition its two modules (from the owner share).
    let first = cli(
        &cluster.broker_url,
        Some(&token),
        &["run", "--lease", &lease_id, "--", "nproc"],
    );
    assert_eq!(
        (first.code, first.stdout.trim()),
        (0, "2"),
        "{}",
        first.stderr
    );
    // One of them becomes a temporary right, for a minute.
    rights(
        &admin,
        &[
            "revoke",
            "--host",
            "ocihost",
            "--partition",
            &index,
            "--modules",
            "1",
        ],
    );
    let expires = leasehold_api::rfc3339_from_ms(clock.now_ms() + 60_000);
    rights(
        &admin,
        &[
            "grant",
            "--host",
            "ocihost",
            "--partition",
            &index,
            "--modules",
            "1",
            "--expires",
            &expires,
        ],
    );
    let mut job = std::process::Command::new(common::leasehold_binary())
        .args([
            "run",
            "--lease",
            &lease_id,
            "--",
            "sh",
            "-c",
            "nproc; sleep 4; nproc",
        ])
        .env("LEASEHOLD_BROKER", &cluster.broker_url)
        .env("LEASEHOLD_TOKEN", &token)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(job.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap().trim(), "2");
    // The minute passes: the agent's next tick expires the right, and the
    // partition's cpuset (its job's too) shrinks to one core.
    clock.advance_ms(60_001);
    assert_eq!(lines.next().unwrap().unwrap().trim(), "1");
    assert!(job.wait().unwrap().success());
}
