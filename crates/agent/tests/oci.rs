//! The `oci` driver against the real kernel: runc, cgroups, loop mounts.
//! These need root, runc and busybox-static (CI installs both and runs as
//! root); without them each test says why it skipped.
// Unsafe: the attack tests switch uids and send signals like an attacker would.
#![allow(unsafe_code)]

use leasehold_agent::driver::oci::{ImageSource, OciDriver};
use leasehold_agent::driver::{
    BoxFuture, DriverError, JobEnd, JobOutcome, JobSpec, PartitionDriver, PartitionSpec,
};
use leasehold_core::Terms;
use std::path::{Path, PathBuf};
use std::sync::Arc;

struct LocalImages {
    rootfs: PathBuf,
}

impl ImageSource for LocalImages {
    fn names(&self) -> Vec<String> {
        vec!["busybox".into()]
    }

    fn rootfs<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<PathBuf, DriverError>> {
        Box::pin(async move {
            if name == "busybox" {
                Ok(self.rootfs.clone())
            } else {
                Err(DriverError::UnknownImage(format!("unknown image '{name}'")))
            }
        })
    }
}

/// Why these tests cannot run here, if they cannot.
fn skip_reason() -> Option<String> {
    if let Err(reason) = leasehold_agent::driver::oci::probe() {
        return Some(reason);
    }
    if busybox().is_none() {
        return Some("busybox-static is not installed (apt-get install busybox-static)".into());
    }
    None
}

fn busybox() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// These tests run one at a time: they measure CPU time and fill memory,
/// and on two cores their neighbours would skew what they measure.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

macro_rules! require_oci {
    () => {
        if let Some(reason) = skip_reason() {
            eprintln!("skipped: the oci driver cannot run here: {reason}");
            return;
        }
        let _serial = SERIAL.lock().await;
    };
}

/// A tiny root filesystem: busybox and its applets.
fn busybox_rootfs(dir: &Path) -> PathBuf {
    let rootfs = dir.join("rootfs");
    for sub in ["bin", "proc", "dev", "sys", "tmp", "work", "etc"] {
        std::fs::create_dir_all(rootfs.join(sub)).unwrap();
    }
    std::fs::copy(busybox().unwrap(), rootfs.join("bin/busybox")).unwrap();
    // Ask the original for its applets: running a file just written can
    // fail with ETXTBSY while another thread forks.
    let list = std::process::Command::new(busybox().unwrap())
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet));
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/work:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    rootfs
}

struct Fixture {
    _dir: tempfile::TempDir,
    driver: OciDriver,
    root: PathBuf,
    instance: String,
    images: Arc<LocalImages>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    // Open to everyone, like an agent's data directory under /var/lib: the
    // driver's own modes, not the test's temporary directory, must be what
    // keeps other users out.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let images = Arc::new(LocalImages {
        rootfs: busybox_rootfs(dir.path()),
    });
    let root = dir.path().join("oci");
    let instance = format!("t{:08x}", rand::random::<u32>());
    let driver = OciDriver::new(root.clone(), instance.clone(), images.clone()).unwrap();
    Fixture {
        _dir: dir,
        driver,
        root,
        instance,
        images,
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for index in 1..=4 {
            let _ = self.driver.wipe(index);
        }
    }
}

fn partition(index: u32, memory_mib: u64, cpu_cap_percent: u32) -> PartitionSpec {
    PartitionSpec {
        index,
        terms: Terms {
            vcpus: 1,
            cpu_cap_percent,
            memory_mib,
            disk_gib: 1,
            images: vec!["busybox".into()],
            price_per_hour_micros: 1,
            isolation: None,
        },
    }
}

async fn run(
    driver: &OciDriver,
    partition: &PartitionSpec,
    script: &str,
    timeout_ms: Option<u64>,
) -> JobOutcome {
    driver.build(partition).unwrap();
    driver
        .run_job(JobSpec {
            partition: partition.clone(),
            command: vec!["sh".into(), "-c".into(), script.into()],
            timeout: timeout_ms.map(std::time::Duration::from_millis),
            image: None,
            cancel: tokio::sync::watch::channel(false).1,
            output: None,
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn a_job_is_isolated_in_its_partition() {
    require_oci!();
    let f = fixture();
    let p = partition(1, 128, 100);
    let neighbour = partition(2, 128, 100);
    run(
        &f.driver,
        &neighbour,
        "echo secret > /work/neighbour-file",
        None,
    )
    .await;
    let out = run(
        &f.driver,
        &p,
        "id -u; hostname; ps -o pid | wc -l; ls /; ls /work; cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '; \
         grep -E '^(Seccomp|NoNewPrivs|CapEff):' /proc/self/status; \
         mount -t tmpfs none /tmp 2>&1 && echo MOUNTED; unshare -r true 2>&1 && echo UNSHARED; \
         touch /etc/x 2>&1 || echo ROOT_READ_ONLY; touch /work/mine && echo WORK_WRITABLE; \
         echo nofile=$(ulimit -n) core=$(ulimit -c); cat /proc/self/uid_map",
        None,
    )
    .await;
    assert_eq!(out.end, JobEnd::Exited(0), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], "65534", "an unprivileged user");
    assert_eq!(lines[1], "partition-1", "its own UTS namespace");
    // ps (and its header) and sh: the job sees only its own processes.
    assert!(
        lines[2].trim().parse::<u32>().unwrap() <= 5,
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("bin\n")
            && !out.stdout.contains("home\n")
            && !out.stdout.contains("root\n"),
        "only the image: {}",
        out.stdout
    );
    assert!(
        !out.stdout.contains("neighbour-file"),
        "no other partition's files"
    );
    assert!(
        out.stdout.contains("\nlo\n") && !out.stdout.contains("eth"),
        "loopback only: {}",
        out.stdout
    );
    assert!(out.stdout.contains("Seccomp:\t2"), "{}", out.stdout);
    assert!(out.stdout.contains("NoNewPrivs:\t1"), "{}", out.stdout);
    assert!(
        out.stdout.contains("CapEff:\t0000000000000000"),
        "{}",
        out.stdout
    );
    assert!(
        !out.stdout.contains("MOUNTED") && !out.stdout.contains("UNSHARED"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("ROOT_READ_ONLY") && out.stdout.contains("WORK_WRITABLE"),
        "{}",
        out.stdout
    );
    assert!(out.peak_memory_bytes.unwrap() > 0);
    assert!(
        out.stdout.contains("nofile=4096 core=0\n"),
        "{}",
        out.stdout
    );
    // Its own user namespace: ids 0..65536 inside are the partition's range.
    let mapping: Vec<u64> = out
        .stdout
        .lines()
        .last()
        .unwrap()
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!((mapping[0], mapping[2]), (0, 65536), "{}", out.stdout);
    assert!(
        mapping[1] >= 1 << 30,
        "mapped far from host users: {}",
        out.stdout
    );
    // The partition keeps its files between jobs; wiping removes everything.
    let again = run(&f.driver, &p, "ls /work", None).await;
    assert_eq!(again.stdout, "mine\n");
    f.driver.wipe(1).unwrap();
    assert!(!f.root.join("partition-1").exists());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&f.root.join("partition-1").display().to_string()));
    // No cgroup of the partition is left in any hierarchy.
    let group = format!("{}-p1", f.instance);
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let leftover = hierarchy.path().join("leasehold").join(&group);
        assert!(!leftover.exists(), "{} was left behind", leftover.display());
    }
    let fresh = run(&f.driver, &p, "ls /work | wc -l", None).await;
    assert_eq!(fresh.stdout.trim(), "0", "a new lease starts empty");
    let _ = &f.images;
}

#[tokio::test]
async fn past_its_memory_the_job_is_oom_killed_and_the_neighbour_lives() {
    require_oci!();
    let f = fixture();
    let p = partition(1, 64, 100);
    let neighbour = partition(2, 64, 100);
    // A shell variable that grows to 200 MB in a 64 MiB partition.
    let out = run(
        &f.driver,
        &p,
        "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived ${#x}",
        None,
    )
    .await;
    assert!(out.oom_killed, "{out:?}");
    assert!(!out.stdout.contains("survived"), "{out:?}");
    let peak = out.peak_memory_bytes.unwrap();
    assert!(
        peak <= 64 * 1024 * 1024 + 4096,
        "peak {peak} within the limit"
    );
    let ok = run(&f.driver, &neighbour, "echo alive", None).await;
    assert_eq!(
        (ok.end, ok.stdout.as_str(), ok.oom_killed),
        (JobEnd::Exited(0), "alive\n", false)
    );
    let ok = run(&f.driver, &p, "echo recovered", None).await;
    assert_eq!(ok.stdout, "recovered\n");
}

#[tokio::test]
async fn the_cpu_cap_holds_and_partitions_get_their_own_cores() {
    require_oci!();
    let f = fixture();
    let p = partition(1, 64, 50);
    let other = partition(2, 64, 50);
    // Busy for 2 s of wall time at a 50% cap: about 1 s of CPU, measured by
    // the cgroup's CPU accounting, not the wall clock.
    let out = run(
        &f.driver,
        &p,
        "timeout 2 sh -c 'while :; do :; done'; grep Cpus_allowed_list /proc/self/status",
        None,
    )
    .await;
    let cpu_ms = out.cpu_ms.unwrap();
    let ratio = cpu_ms as f64 / out.wall_ms as f64;
    // The cap is the upper bound; the floor only shows the job ran, and is
    // low because on a loaded 2-core machine the job gets less than its cap.
    assert!(
        (0.15..=0.65).contains(&ratio),
        "used {cpu_ms} ms of CPU in {} ms: ratio {ratio:.2}, expected at most 0.5 + 0.15",
        out.wall_ms
    );
    let mine = out.stdout.lines().last().unwrap().to_string();
    let theirs = run(
        &f.driver,
        &other,
        "grep Cpus_allowed_list /proc/self/status",
        None,
    )
    .await
    .stdout;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if cores >= 2 {
        assert_ne!(
            mine.trim(),
            theirs.trim(),
            "one vCPU each on a {cores}-core host: disjoint cores"
        );
    }
}

#[tokio::test]
async fn a_fork_bomb_stops_at_the_pids_limit() {
    require_oci!();
    let f = fixture();
    let p = partition(1, 256, 100);
    let out = run(
        &f.driver,
        &p,
        "n=0; while [ $n -lt 1000 ]; do sleep 30 & if [ $? -ne 0 ]; then break; fi; n=$((n+1)); done; echo started $n",
        Some(20_000),
    )
    .await;
    // Fork fails in the shell well before 1000 and the job still ends: the
    // container's processes all go with it.
    assert!(
        out.stderr.contains("fork") || out.stderr.contains("Resource temporarily unavailable"),
        "{out:?}"
    );
    let host_alive = std::process::Command::new("true")
        .status()
        .unwrap()
        .success();
    assert!(host_alive);
    let ok = run(&f.driver, &p, "ps -o pid | wc -l", None).await;
    assert!(
        ok.stdout.trim().parse::<u32>().unwrap() <= 4,
        "nothing left behind: {}",
        ok.stdout
    );
}

#[tokio::test]
async fn writing_past_the_disk_size_fails_with_enospc() {
    require_oci!();
    let f = fixture();
    let p = partition(1, 128, 100);
    let out = run(
        &f.driver,
        &p,
        "dd if=/dev/zero of=/work/big bs=1M count=1200 2>&1; echo rc=$?",
        None,
    )
    .await;
    assert!(out.stdout.contains("No space left on device"), "{out:?}");
    assert!(!out.stdout.contains("rc=0"));
    let image = f.root.join("partition-1/disk.img");
    assert_eq!(
        std::fs::metadata(&image).unwrap().len(),
        1024 * 1024 * 1024,
        "the disk image never grows"
    );
}

#[tokio::test]
async fn after_a_crash_reconcile_cleans_up_and_the_lease_runs_again() {
    require_oci!();
    let f = fixture();
    let p = partition(1, 128, 100);
    run(
        &f.driver,
        &p,
        "mkfifo /work/started; echo kept > /work/file",
        None,
    )
    .await;
    let fifo = f.root.join("partition-1/disk/work/started");
    let driver = Arc::new(f.driver_clone());
    let running = {
        let driver = driver.clone();
        let p = p.clone();
        tokio::spawn(async move {
            run(&driver, &p, "echo go > /work/started; exec sleep 600", None).await
        })
    };
    let line = tokio::task::spawn_blocking(move || std::fs::read_to_string(fifo).unwrap())
        .await
        .unwrap();
    assert_eq!(line, "go\n");
    // A new driver on the same state, as after an agent restart.
    let restarted = OciDriver::new(f.root.clone(), f.instance.clone(), f.images.clone()).unwrap();
    let notes = restarted.reconcile();
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
    let finished = running.await.unwrap();
    assert_ne!(finished.end, JobEnd::Exited(0));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&f.root.display().to_string()),
        "no mounts left"
    );
    // The lease's files come back at its next job.
    let again = run(&restarted, &p, "cat /work/file", None).await;
    assert_eq!(again.stdout, "kept\n");
    restarted.wipe(1).unwrap();
}

impl Fixture {
    fn driver_clone(&self) -> OciDriver {
        OciDriver::new(
            self.root.clone(),
            self.instance.clone(),
            self.images.clone(),
        )
        .unwrap()
    }
}

/// A static probe that tries what the seccomp profile must refuse.
const SYSCALL_PROBE_C: &str = r#"
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <errno.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <unistd.h>
static char stack[65536];
static int child(void *arg) { (void)arg; return 0; }
int main(void) {
    int pid = clone(child, stack + sizeof stack, CLONE_NEWUSER | SIGCHLD, NULL);
    printf("clone_newuser=%s\n", pid < 0 ? strerror(errno) : "allowed");
    if (pid > 0) waitpid(pid, NULL, 0);
    long r = syscall(SYS_clone3, NULL, 0);
    printf("clone3=%s\n", r < 0 ? strerror(errno) : "allowed");
    r = ptrace(PTRACE_TRACEME, 0, 0, 0);
    printf("ptrace=%s\n", r < 0 ? strerror(errno) : "allowed");
    /* Not on the allow-list (nor on the old deny-list): refused by default. */
    r = syscall(SYS_get_mempolicy, NULL, NULL, 0, NULL, 0);
    printf("unlisted=%s\n", r < 0 ? strerror(errno) : "allowed");
    r = socket(40 /* AF_VSOCK */, SOCK_STREAM, 0);
    printf("vsock=%s\n", r < 0 ? strerror(errno) : "allowed");
    r = socket(AF_INET, SOCK_STREAM, 0);
    printf("inet=%s\n", r < 0 ? strerror(errno) : "allowed");
    /* getpid through the i386 ABI, in a child: the filter knows only the
       native ABI, so this must not get through. */
    pid = fork();
    if (pid == 0) {
        long got;
        __asm__ volatile ("int $0x80" : "=a"(got) : "a"(20L) : "memory");
        _exit(got > 0 ? 0 : 3);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    if (WIFSIGNALED(status)) printf("int80=killed by signal %d\n", WTERMSIG(status));
    else printf("int80=exited %d\n", WEXITSTATUS(status));
    return 0;
}
"#;

#[tokio::test]
async fn seccomp_allows_by_name_and_refuses_ptrace_new_namespaces_and_the_unlisted() {
    require_oci!();
    let f = fixture();
    let p = partition(1, 128, 100);
    f.driver.build(&p).unwrap();
    if let Err(reason) = build_static_probe(&f.root, SYSCALL_PROBE_C, &[1]) {
        eprintln!("skipped: {reason}");
        return;
    }
    let out = run(&f.driver, &p, "/work/probe", None).await;
    assert_eq!(out.end, JobEnd::Exited(0), "{out:?}");
    assert!(
        out.stdout.contains("clone_newuser=Operation not permitted"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("clone3=Function not implemented"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("ptrace=Operation not permitted"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("unlisted=Operation not permitted")
            && out.stdout.contains("vsock=Operation not permitted")
            && out.stdout.contains("inet=allowed")
            && !out.stdout.contains("int80=exited 0"),
        "an allow-list: what is not listed is refused, sockets by family: {}",
        out.stdout
    );
}

/// Builds a static C probe (so it runs in the busybox image) on the host
/// into the `/work` of each partition in `indexes` (already built); the
/// reason when this host cannot.
fn build_static_probe(root: &Path, source_text: &str, indexes: &[u32]) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let source = root.join("probe.c");
    let binary = root.join("probe");
    std::fs::write(&source, source_text).unwrap();
    let built = std::process::Command::new("gcc")
        .args(["-static", "-O1", "-o"])
        .arg(&binary)
        .arg(&source)
        .output()
        .map_err(|e| format!("cannot build a static probe: gcc is not usable: {e}"))?;
    if !built.status.success() {
        return Err(format!(
            "cannot build a static probe (gcc -static; libc6-dev): {}",
            String::from_utf8_lossy(&built.stderr)
        ));
    }
    for index in indexes {
        let target = root.join(format!("partition-{index}/disk/work/probe"));
        std::fs::copy(&binary, &target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    Ok(())
}

/// A job that runs until cancelled, and the switch that cancels it.
fn long_job(
    driver: Arc<OciDriver>,
    partition: &PartitionSpec,
    script: &str,
) -> (
    tokio::task::JoinHandle<JobOutcome>,
    tokio::sync::watch::Sender<bool>,
) {
    driver.build(partition).unwrap();
    let (cancel, cancelled) = tokio::sync::watch::channel(false);
    let spec = JobSpec {
        partition: partition.clone(),
        command: vec!["sh".into(), "-c".into(), script.into()],
        timeout: Some(std::time::Duration::from_secs(120)),
        image: None,
        cancel: cancelled,
        output: None,
    };
    let handle = tokio::spawn(async move { driver.run_job(spec).await.unwrap() });
    (handle, cancel)
}

/// Makes a FIFO in a partition's /work (through a job, so it is the job's)
/// and answers its host path.
async fn make_fifo(f: &Fixture, index: u32, name: &str) -> PathBuf {
    let out = run(
        &f.driver,
        &partition(index, 128, 100),
        &format!("mkfifo /work/{name}"),
        None,
    )
    .await;
    assert_eq!(out.end, JobEnd::Exited(0), "{out:?}");
    f.root.join(format!("partition-{index}/disk/work/{name}"))
}

/// Reads one message from a FIFO a job writes to when it is ready.
async fn wait_for(fifo: PathBuf) -> String {
    tokio::task::spawn_blocking(move || std::fs::read_to_string(fifo).unwrap())
        .await
        .unwrap()
}

/// Host pids of the processes of partition `index`'s jobs, found by their
/// cgroup.
fn host_pids_of_partition(instance: &str, index: u32) -> Vec<u32> {
    let needle = format!("/leasehold/{instance}-p{index}/");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .map(|text| text.contains(&needle))
                .unwrap_or(false)
        })
        .collect()
}

/// The real uid and gid of a host process.
fn host_ids_of(pid: u32) -> (u32, u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u32 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (field("Uid:"), field("Gid:"))
}

/// Runs host busybox as `uid`:`gid` (no supplementary groups), the way a
/// process of that user on the host would.
fn busybox_as(uid: u32, gid: u32, args: &[&str]) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    std::process::Command::new(busybox().unwrap())
        .args(args)
        .uid(uid)
        .gid(gid)
        .output()
        .unwrap()
}

#[tokio::test]
async fn partitions_have_their_own_host_uids_and_cannot_read_or_signal_each_other() {
    require_oci!();
    let f = fixture();
    let (a, b) = (partition(1, 128, 100), partition(2, 128, 100));
    let a_ready = make_fifo(&f, 1, "ready").await;
    let b_ready = make_fifo(&f, 2, "ready").await;
    let driver = Arc::new(f.driver_clone());
    let (a_job, a_cancel) = long_job(
        driver.clone(),
        &a,
        "echo s3cret > /work/secret && chmod 600 /work/secret && echo go > /work/ready; exec sleep 600",
    );
    let (b_job, b_cancel) = long_job(driver.clone(), &b, "echo go > /work/ready; exec sleep 600");
    assert_eq!(wait_for(a_ready).await, "go\n");
    assert_eq!(wait_for(b_ready).await, "go\n");
    let a_pid = host_pids_of_partition(&f.instance, 1)[0];
    let b_pid = host_pids_of_partition(&f.instance, 2)[0];
    let (a_uid, a_gid) = host_ids_of(a_pid);
    let (b_uid, b_gid) = host_ids_of(b_pid);
    assert_ne!(a_uid, b_uid, "partitions never share a host uid");
    assert_ne!(a_gid, b_gid, "nor a host gid");
    for uid in [a_uid, b_uid] {
        assert!(
            uid != 0 && uid != 65534,
            "an unprivileged uid of its own: {uid}"
        );
    }
    let through_proc = format!("/proc/{a_pid}/root/work/secret");
    // The way in is real (root reads the file through it); from another
    // user namespace it needs CAP_SYS_PTRACE, and B's uid must not own it.
    assert_eq!(std::fs::read_to_string(&through_proc).unwrap(), "s3cret\n");
    // B's host uid: through A's root, then straight at A's disk.
    let direct = f.root.join("partition-1/disk/work/secret");
    for path in [through_proc.as_str(), direct.to_str().unwrap()] {
        let stolen = busybox_as(b_uid, b_gid, &["cat", path]);
        assert!(
            !stolen.status.success() && !String::from_utf8_lossy(&stolen.stdout).contains("s3cret"),
            "B read A's file at {path}: {stolen:?}"
        );
    }
    let signalled = busybox_as(b_uid, b_gid, &["kill", "-STOP", &a_pid.to_string()]);
    assert!(
        !signalled.status.success()
            && String::from_utf8_lossy(&signalled.stderr).contains("Operation not permitted"),
        "B stopped A's process: {signalled:?}"
    );
    // From inside B's job, A's processes and files are nowhere to be seen.
    b_cancel.send(true).unwrap();
    assert_eq!(b_job.await.unwrap().end, JobEnd::Cancelled);
    let inside = run(
        &driver,
        &b,
        "cat /proc/[0-9]*/root/work/secret 2>/dev/null; echo done",
        None,
    )
    .await;
    assert_eq!(inside.stdout, "done\n", "{inside:?}");
    a_cancel.send(true).unwrap();
    assert_eq!(a_job.await.unwrap().end, JobEnd::Cancelled);
}

#[tokio::test]
async fn the_host_nobody_cannot_read_a_partition_disk() {
    require_oci!();
    let f = fixture();
    let p = partition(1, 128, 100);
    let out = run(&f.driver, &p, "echo s3cret > /work/secret", None).await;
    assert_eq!(out.end, JobEnd::Exited(0), "{out:?}");
    let dir = f.root.join("partition-1");
    let image = dir.join("disk.img");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&image).unwrap().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    for args in [
        vec!["cat", image.to_str().unwrap()],
        vec!["ls", dir.to_str().unwrap()],
        vec!["cat", dir.join("disk/work/secret").to_str().unwrap()],
    ] {
        let read = busybox_as(65534, 65534, &args);
        assert!(!read.status.success(), "nobody ran {args:?}: {read:?}");
        assert!(
            read.stdout.is_empty() || !String::from_utf8_lossy(&read.stdout).contains("s3cret")
        );
    }
}

/// Creates inotify instances until refused, says how many to a FIFO and
/// waits (`hog FIFO`); or creates one and says whether it could.
const INOTIFY_PROBE_C: &str = r#"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/inotify.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc > 2 && strcmp(argv[1], "hog") == 0) {
        int made = 0, error = 0;
        while (made < 100000) {
            if (inotify_init1(0) < 0) { error = errno; break; }
            made++;
        }
        char message[128];
        int length = snprintf(message, sizeof message, "made=%d error=%s\n", made, strerror(error));
        int fifo = open(argv[2], O_WRONLY);
        if (write(fifo, message, length) != length) return 1;
        close(fifo);
        pause();
        return 0;
    }
    int fd = inotify_init1(0);
    printf("inotify=%s\n", fd < 0 ? strerror(errno) : "ok");
    return 0;
}
"#;

#[tokio::test]
async fn a_partition_using_up_its_inotify_instances_leaves_others_theirs() {
    require_oci!();
    let f = fixture();
    let (a, b) = (partition(1, 128, 100), partition(2, 128, 100));
    let a_ready = make_fifo(&f, 1, "ready").await;
    f.driver.build(&b).unwrap();
    if let Err(reason) = build_static_probe(&f.root, INOTIFY_PROBE_C, &[1, 2]) {
        eprintln!("skipped: {reason}");
        return;
    }
    let driver = Arc::new(f.driver_clone());
    let (a_job, a_cancel) = long_job(driver.clone(), &a, "exec /work/probe hog /work/ready");
    let hogged = wait_for(a_ready).await;
    // Refused at the per-user limit (EMFILE), not at some other bound.
    assert!(hogged.contains("error=Too many open files"), "{hogged}");
    let b_out = run(&driver, &b, "/work/probe", None).await;
    // The host's root (this test) is not charged for A's instances either.
    // SAFETY: inotify_init1 has no preconditions; the fd is closed at once.
    let host_fd = unsafe { libc::inotify_init1(0) };
    if host_fd >= 0 {
        // SAFETY: closing the descriptor just made.
        unsafe { libc::close(host_fd) };
    }
    a_cancel.send(true).unwrap();
    assert_eq!(a_job.await.unwrap().end, JobEnd::Cancelled);
    assert_eq!(b_out.stdout, "inotify=ok\n", "{hogged} {b_out:?}");
    assert!(
        host_fd >= 0,
        "root could not make an inotify instance after {hogged}"
    );
}

#[tokio::test]
async fn proc_is_masked_and_read_only_where_runc_masks_it() {
    require_oci!();
    let f = fixture();
    let p = partition(1, 128, 100);
    // Which masked files this kernel has varies (no /proc/kcore without
    // CONFIG_PROC_KCORE): check those the host can read something from.
    let masked: Vec<&str> = [
        "/proc/kcore",
        "/proc/keys",
        "/proc/timer_list",
        "/proc/sched_debug",
    ]
    .into_iter()
    .filter(|path| {
        use std::io::Read;
        let mut byte = [0u8; 1];
        std::fs::File::open(path)
            .and_then(|mut file| file.read(&mut byte))
            .map(|read| read > 0)
            .unwrap_or(false)
    })
    .collect();
    let reads: String = masked
        .iter()
        .map(|path| format!("echo {path} $(cat {path} 2>/dev/null | wc -c); "))
        .collect();
    let out = run(
        &f.driver,
        &p,
        &format!("{reads} echo 1 > /proc/sys/vm/drop_caches || echo SYS_READ_ONLY"),
        None,
    )
    .await;
    assert!(
        !masked.is_empty(),
        "the host has none of the masked files to compare"
    );
    for path in &masked {
        assert!(
            out.stdout.contains(&format!("{path} 0\n")),
            "{path} is masked: {out:?}"
        );
    }
    assert!(
        out.stderr.contains("Read-only file system") && out.stdout.contains("SYS_READ_ONLY"),
        "{out:?}"
    );
}

#[tokio::test]
async fn a_disk_left_by_the_shared_uid_is_given_to_the_partition_without_following_links() {
    require_oci!();
    let f = fixture();
    let p = partition(1, 128, 100);
    let out = run(
        &f.driver,
        &p,
        "echo old > /work/old && ln -s /etc/hostname /work/escape",
        None,
    )
    .await;
    assert_eq!(out.end, JobEnd::Exited(0), "{out:?}");
    // As the driver before uid ranges left it: everything owned by 65534,
    // and a host file a symlink in /work points at (a job chose the target).
    let work = f.root.join("partition-1/disk/work");
    let outside = f.root.join("outside");
    std::fs::write(&outside, "host's\n").unwrap();
    std::fs::remove_file(work.join("escape")).unwrap();
    std::os::unix::fs::symlink(&outside, work.join("escape")).unwrap();
    let chowned = std::process::Command::new("chown")
        .args(["-R", "-h", "65534:65534"])
        .arg(&work)
        .status()
        .unwrap();
    assert!(chowned.success());
    let out = run(
        &f.driver,
        &p,
        "echo new >> /work/old && cat /work/old",
        None,
    )
    .await;
    assert_eq!(
        out.stdout, "old\nnew\n",
        "the job owns its old files again: {out:?}"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(&outside).unwrap().uid(),
        0,
        "the chown did not follow the job's symlink"
    );
}

/// The cores a job of the partition may run on, as the kernel tells it.
async fn allowed_cores(driver: &OciDriver, partition: &PartitionSpec) -> String {
    let outcome = run(
        driver,
        partition,
        "grep Cpus_allowed_list /proc/self/status",
        None,
    )
    .await;
    outcome
        .stdout
        .trim()
        .trim_start_matches("Cpus_allowed_list:")
        .trim()
        .to_string()
}

#[tokio::test]
async fn a_restart_keeps_each_partitions_cores_and_a_removed_partition_frees_them() {
    require_oci!();
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("skipped: one core cannot show partitions keeping distinct cores");
        return;
    }
    let f = fixture();
    let (first, second) = (partition(1, 64, 100), partition(2, 64, 100));
    let first_cores = allowed_cores(&f.driver, &first).await;
    let second_cores = allowed_cores(&f.driver, &second).await;
    assert_ne!(first_cores, second_cores, "partitions share no core");
    let kept = vec![
        (1, f.driver.cores_of(1).unwrap()),
        (2, f.driver.cores_of(2).unwrap()),
    ];
    // A new driver on the same state, as after an agent restart, given the
    // cores the agent kept with its partitions. Partition 2 builds first:
    // without what was kept it would take partition 1's (least shared) core.
    let restarted = f.driver_clone();
    restarted.reconcile();
    restarted.restore_cores(&kept);
    assert_eq!(allowed_cores(&restarted, &second).await, second_cores);
    assert_eq!(allowed_cores(&restarted, &first).await, first_cores);
    // Removing partition 1 frees its cores: the next partition gets them.
    restarted.remove(1).unwrap();
    assert_eq!(restarted.cores_of(1), None);
    let third = partition(3, 64, 100);
    assert_eq!(allowed_cores(&restarted, &third).await, first_cores);
    restarted.wipe(2).unwrap();
    restarted.wipe(3).unwrap();
}

/// `/metrics` reads a built partition's CPU time and memory from its
/// cgroup; an unbuilt or wiped partition has none to read.
#[tokio::test]
async fn usage_of_a_built_partition_is_read_from_its_cgroup_and_gone_after_the_wipe() {
    require_oci!();
    let f = fixture();
    let p = partition(3, 64, 100);
    assert_eq!(f.driver.usage_of(3), None);
    let out = run(
        &f.driver,
        &p,
        "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done",
        None,
    )
    .await;
    assert_eq!(out.end, JobEnd::Exited(0));
    let usage = f
        .driver
        .usage_of(3)
        .expect("a built partition has a cgroup");
    assert!(usage.cpu_usage_ns > 0, "{usage:?}");
    assert_eq!(f.driver.usage_of(4), None);
    f.driver.wipe(3).unwrap();
    assert_eq!(f.driver.usage_of(3), None);
}

/// Seed 004: modules (cores) go off and on under a running job, live: the
/// job sees its CPU count change.
#[tokio::test]
async fn a_running_job_sees_its_cpu_count_follow_the_active_modules() {
    require_oci!();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 {
        eprintln!("skipped: needs 2 cores to take one away, this machine has {cores}");
        return;
    }
    let f = fixture();
    let before = make_fifo(&f, 4, "before").await;
    let go = make_fifo(&f, 4, "go").await;
    let after = make_fifo(&f, 4, "after").await;
    let mut p = partition(4, 128, 100);
    p.terms.vcpus = 2;
    let driver = Arc::new(f.driver_clone());
    let (job, cancel) = long_job(
        driver.clone(),
        &p,
        "nproc > /work/before; cat /work/go > /dev/null; nproc > /work/after; exec sleep 600",
    );
    assert_eq!(wait_for(before).await.trim(), "2");
    driver.set_active_modules(4, 1).unwrap();
    tokio::task::spawn_blocking(move || std::fs::write(go, "go\n").unwrap())
        .await
        .unwrap();
    assert_eq!(wait_for(after).await.trim(), "1", "one module went off");
    // And back on: a job started now gets both.
    driver.set_active_modules(4, 2).unwrap();
    let _ = cancel.send(true);
    job.await.unwrap();
    let out = run(&f.driver, &p, "nproc", None).await;
    assert_eq!(out.stdout.trim(), "2");
}
