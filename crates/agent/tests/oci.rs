//! The `oci` driver against the real kernel: runc, cgroups, loop mounts.
//! These need root, runc and busybox-static (CI installs both and runs as
//! root); without them each test says why it skipped.

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
         touch /etc/x 2>&1 || echo ROOT_READ_ONLY; touch /work/mine && echo WORK_WRITABLE",
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
    assert!(
        (0.35..=0.65).contains(&ratio),
        "used {cpu_ms} ms of CPU in {} ms: ratio {ratio:.2}, expected 0.5 +- 0.15",
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
    return 0;
}
"#;

#[tokio::test]
async fn ptrace_and_new_namespaces_are_refused_by_seccomp() {
    require_oci!();
    let f = fixture();
    let p = partition(1, 128, 100);
    f.driver.build(&p).unwrap();
    // A static binary, so it runs in the busybox image; built on the host.
    let source = f.root.join("probe.c");
    std::fs::write(&source, SYSCALL_PROBE_C).unwrap();
    let probe = f.root.join("partition-1/disk/work/probe");
    let built = std::process::Command::new("gcc")
        .args(["-static", "-O1", "-o"])
        .arg(&probe)
        .arg(&source)
        .output();
    match built {
        Ok(output) if output.status.success() => {}
        Ok(output) => {
            eprintln!(
                "skipped: cannot build a static probe (gcc -static; libc6-dev): {}",
                String::from_utf8_lossy(&output.stderr)
            );
            return;
        }
        Err(error) => {
            eprintln!("skipped: cannot build a static probe: gcc is not usable: {error}");
            return;
        }
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o755)).unwrap();
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
}
