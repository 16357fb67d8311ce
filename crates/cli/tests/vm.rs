//! End-to-end tests of the `vm` driver: separate processes for the image
//! store, the broker and the agent, and real QEMU virtual machines booting
//! the `debian-vm` image built here. They need root, qemu-system-x86 and
//! busybox-static, and apt (the image's kernel is fetched with apt-get
//! download); CI provides them. Without them each test says why it skipped.
//! Each boot costs seconds under TCG, so the tests are few and each checks
//! several things.

mod common;

use common::{cli, spawn_ready, terms, Cluster};
use leasehold_api::{Client, JobEvent, JobResult, LeaseRequest, SubmitJobRequest};

fn skip_reason() -> Option<String> {
    leasehold_agent::driver::vm::probe().err().or_else(|| {
        let has = |path: &str| std::path::Path::new(path).exists();
        if !has("/bin/busybox") && !has("/usr/bin/busybox") {
            return Some("busybox-static is not installed".into());
        }
        (!has("/usr/bin/apt-get")).then(|| "apt-get is not here to fetch the kernel".into())
    })
}

macro_rules! require_vm {
    () => {
        if let Some(reason) = skip_reason() {
            eprintln!("skipped: the vm driver cannot run here: {reason}");
            return;
        }
        // One VM at a time: on two cores, booting two under TCG at once
        // only makes both slower.
        let _serial = SERIAL.lock().await;
    };
}

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Builds the debian-vm image into `store`; its digest.
fn build_vm_image(cluster: &Cluster, store: &str) -> String {
    let built = cli(
        &cluster.broker_url,
        None,
        &[
            "images",
            "build",
            "debian-vm",
            "--store",
            store,
            "--output",
            "json",
        ],
    );
    assert_eq!(built.code, 0, "{}", built.stderr);
    built.json()["digest"].as_str().unwrap().to_string()
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

/// Starts (or restarts) the vm agent `vmhost`, offering debian-vm.
fn start_vm_agent(cluster: &Cluster, store_url: &str, log: &str) -> common::Proc {
    let data = cluster.path("agent-vm").display().to_string();
    let args = [
        "agent",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data,
        "--host-id",
        "vmhost",
        "--driver",
        "vm",
        "--image-store",
        store_url,
        "--cpus",
        "2",
        "--memory-mib",
        "2048",
        "--disk-gib",
        "4",
        "--owner-share-centicores",
        "0",
        "--broker",
        &cluster.broker_url,
        "--output",
        "json",
    ];
    common::spawn_ready_with_token(&args, Some(&cluster.lender_token), &cluster.path(log))
}

/// Adds partition 1 (`vcpus`, `memory_mib`, debian-vm) and leases it.
async fn lease_partition(
    cluster: &Cluster,
    agent_url: &str,
    vcpus: u32,
    memory_mib: u64,
) -> (Client, leasehold_api::LeaseView) {
    Client::new(agent_url, Some(cluster.lender_token.clone()))
        .agent_add_partition(&terms(vcpus, memory_mib, "debian-vm", 1000))
        .await
        .unwrap();
    let (_, bob) = cluster.borrower("bob").await;
    let lease = bob
        .lease(&LeaseRequest {
            partition: Some("vmhost/1".into()),
            best: None,
            allow_unisolated: false,
            start: None,
            end: None,
        })
        .await
        .unwrap();
    (bob, lease)
}

fn shell_job(lease: &leasehold_api::LeaseView, script: &str) -> SubmitJobRequest {
    SubmitJobRequest {
        lease_key: lease.lease_key.clone().unwrap(),
        command: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

async fn run(agent_url: &str, request: &SubmitJobRequest) -> JobResult {
    Client::new(agent_url, None)
        .submit_job(1, request)
        .await
        .unwrap()
}

fn host_kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap()
        .trim()
        .to_string()
}

/// A tampered blob is refused, the image is then network-booted by digest
/// and cached (and the booted VM snapshotted), and a second boot needs no
/// store; the guest runs its own kernel with the terms' vCPUs and memory,
/// keeps /work between jobs, has fresh randomness in each resumed copy,
/// reports exit codes, and cannot take more memory from the host than its
/// partition's limit however much it fills.
#[tokio::test(flavor = "multi_thread")]
async fn vm_partitions_network_boot_their_own_kernel_within_their_terms() {
    require_vm!();
    let cluster = Cluster::start(&[]).await;
    let store = cluster.path("store").display().to_string();
    let digest = build_vm_image(&cluster, &store);
    let blob = cluster
        .path("store/blobs/sha256")
        .join(format!("{}.tar", digest.trim_start_matches("sha256:")));
    let original = std::fs::read(&blob).unwrap();
    let mut tampered = original.clone();
    let middle = tampered.len() / 2;
    tampered[middle] ^= 0xff;
    std::fs::write(&blob, &tampered).unwrap();
    let (serve, store_url) = serve_store(&cluster, &store);
    let agent = start_vm_agent(&cluster, &store_url, "agent-vm.log");
    assert_eq!(agent.ready["driver"], "vm");
    let reason = agent.ready["driver_reason"].as_str().unwrap();
    assert!(reason.contains("TCG") || reason.contains("KVM"), "{reason}");
    let agent_url = agent.ready["agent_url"].as_str().unwrap().to_string();
    let (bob, lease) = lease_partition(&cluster, &agent_url, 2, 256).await;

    // The store's blob does not match the digest in the signed terms.
    let refused = Client::new(&agent_url, None)
        .submit_job(1, &shell_job(&lease, "true"))
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("digest"), "{refused}");

    std::fs::write(&blob, &original).unwrap();
    let first = run(
        &agent_url,
        &shell_job(&lease, "uname -r; nproc; grep MemTotal /proc/meminfo; od -An -tx1 -N16 /dev/urandom; echo kept > /work/file; echo to-stderr >&2"),
    )
    .await;
    assert_eq!(first.exit_code, Some(0), "{first:?}");
    let lines: Vec<&str> = first.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{first:?}");
    assert_ne!(
        lines[0],
        host_kernel_release(),
        "the guest runs its own kernel"
    );
    assert!(lines[0].ends_with("-amd64"), "{first:?}");
    assert_eq!(lines[1], "2", "the guest has the terms' vCPUs");
    let mem_total_kib: u64 = lines[2].split_whitespace().nth(1).unwrap().parse().unwrap();
    // MemTotal is the terms' memory less what the guest kernel keeps.
    assert!(mem_total_kib <= 256 * 1024, "{mem_total_kib}");
    assert!(mem_total_kib >= 256 * 1024 * 3 / 4, "{mem_total_kib}");
    assert_eq!(first.stderr, "to-stderr\n");
    let cached = cluster
        .path("agent-vm/image-cache/rootfs")
        .join(digest.trim_start_matches("sha256:"));
    assert!(
        cached.join("vm.json").is_file(),
        "the image is cached by digest"
    );

    let snapshots = std::fs::read_dir(cluster.path("agent-vm/vm/snapshots"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".state"))
        .count();
    assert_eq!(snapshots, 1, "the booted VM was saved for the next jobs");

    // No store now: the second boot comes from the cache (resuming the
    // snapshot). /work persists; the guest's randomness is its own.
    drop(serve);
    let second = run(
        &agent_url,
        &shell_job(
            &lease,
            "cat /work/file; od -An -tx1 -N16 /dev/urandom; exit 7",
        ),
    )
    .await;
    assert_eq!(second.exit_code, Some(7), "{second:?}");
    let second_lines: Vec<&str> = second.stdout.lines().collect();
    assert_eq!(second_lines[0], "kept");
    assert_ne!(
        second_lines[1], lines[3],
        "each resumed VM has fresh randomness"
    );

    // Fill the guest's memory (tail keeps a line without end): the
    // guest's OOM killer, or the host's in the partition's cgroup, stops
    // it; the host gives the VM no more than the partition's limit.
    let fill = run(&agent_url, &shell_job(&lease, "cat /dev/zero | tail")).await;
    let limit_bytes = (256 + leasehold_agent::driver::vm::VM_OVERHEAD_MIB) << 20;
    let peak = fill.peak_memory_bytes.unwrap();
    assert!(
        peak <= limit_bytes,
        "peak {peak} over the limit {limit_bytes}: {fill:?}"
    );
    assert!(
        peak >= 128 << 20,
        "the guest filled its memory on the host: {fill:?}"
    );
    assert_ne!(
        fill.exit_code,
        Some(0),
        "an endless line does not fit: {fill:?}"
    );
    bob.release(lease.lease_id).await.unwrap();
    drop(agent);
}

/// The pids of this machine's QEMU processes whose arguments contain `text`.
fn qemu_processes_with(text: &str) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(bytes) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let arguments = String::from_utf8_lossy(&bytes).replace('\0', " ");
        if arguments.starts_with("qemu-system-x86_64") && arguments.contains(text) {
            found.push((pid, arguments));
        }
    }
    found
}

/// While a job runs, its QEMU is in the partition's cgroup under its memory
/// limit; an agent killed with SIGKILL and restarted leaves no QEMU of its
/// own running, and the lease runs jobs again.
#[tokio::test(flavor = "multi_thread")]
async fn a_vm_agent_killed_mid_job_leaves_no_vm_after_it_restarts() {
    require_vm!();
    let cluster = Cluster::start(&[]).await;
    let store = cluster.path("store").display().to_string();
    build_vm_image(&cluster, &store);
    let (_serve, store_url) = serve_store(&cluster, &store);
    let agent = start_vm_agent(&cluster, &store_url, "agent-1.log");
    let agent_url = agent.ready["agent_url"].as_str().unwrap().to_string();
    let (bob, lease) = lease_partition(&cluster, &agent_url, 1, 128).await;
    let (up_sender, up) = tokio::sync::oneshot::channel();
    let running = {
        let client = Client::new(&agent_url, None);
        let long = shell_job(&lease, "echo up; exec sleep 600");
        tokio::spawn(async move {
            let mut up_sender = Some(up_sender);
            client
                .submit_job_streaming(1, &long, |event| {
                    if matches!(event, JobEvent::Stdout { .. }) {
                        if let Some(sender) = up_sender.take() {
                            let _ = sender.send(());
                        }
                    }
                })
                .await
        })
    };
    up.await.expect("the guest's job printed");
    let vms = qemu_processes_with("lh-vm-vmhost-");
    assert_eq!(vms.len(), 1, "{vms:?}");
    let (pid, arguments) = &vms[0];
    assert!(arguments.contains("-nic none"), "no network: {arguments}");
    assert!(arguments.contains("-smp 1 -m 128M"), "{arguments}");
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let memory_line = cgroups
        .lines()
        .find(|l| l.contains("memory"))
        .unwrap_or_else(|| cgroups.lines().next().unwrap());
    let group = memory_line.rsplit(':').next().unwrap();
    assert!(
        group.starts_with("/leasehold/vmhost-") && group.ends_with("-p1/vm"),
        "{cgroups}"
    );
    let partition_group = group.trim_end_matches("/vm");
    let limit_file = if std::path::Path::new("/sys/fs/cgroup/memory").is_dir() {
        format!("/sys/fs/cgroup/memory{partition_group}/memory.limit_in_bytes")
    } else {
        format!("/sys/fs/cgroup{partition_group}/memory.max")
    };
    let limit: u64 = std::fs::read_to_string(&limit_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        limit,
        (128 + leasehold_agent::driver::vm::VM_OVERHEAD_MIB) << 20
    );

    // SIGKILL: the agent has no chance to stop its VM.
    drop(agent);
    assert!(running.await.unwrap().is_err());
    let agent = start_vm_agent(&cluster, &store_url, "agent-2.log");
    assert_eq!(
        qemu_processes_with("lh-vm-vmhost-"),
        Vec::new(),
        "reconciled: {}",
        agent.ready["reconciled"]
    );
    let agent_url = agent.ready["agent_url"].as_str().unwrap().to_string();
    let again = run(&agent_url, &shell_job(&lease, "echo back")).await;
    assert_eq!(again.stdout, "back\n", "{again:?}");
    bob.release(lease.lease_id).await.unwrap();
}
