//! `vm` partition start latency as a borrower sees it: from starting
//! `leasehold run` to the first byte of the job's output, cold (the agent
//! lacks the OS image: it network-boots it from the image store by digest,
//! boots it whole and snapshots it) and warm (image cached, the snapshot
//! resumed). Runs `leasehold up --driver vm` and the CLI as
//! separate processes, as a user would (needs root and qemu-system-x86),
//! and prints one JSON line.

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

#[derive(Parser)]
#[command(
    about = "Measure vm partition start: `leasehold run` to first output, cold and warm (one JSON line)"
)]
struct Args {
    /// Timed runs of each kind.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// The leasehold binary (default: the one beside this bench).
    #[arg(long)]
    leasehold: Option<PathBuf>,
    /// The partition's vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// The partition's CPU cap, in percent of each vCPU.
    #[arg(long, default_value_t = 100)]
    cpu_cap: u32,
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
}

/// The bar for a warm start on this machine (issue 13).
const WARM_BAR_MS: u64 = 2500;

struct Up {
    leasehold: PathBuf,
    child: Child,
    ready: serde_json::Value,
    data_dir: PathBuf,
}

impl Drop for Up {
    fn drop(&mut self) {
        // SIGTERM: `up` stops its agent, whose VMs die with it.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn start_up(leasehold: &Path, data_dir: &Path) -> Result<Up> {
    let mut child = Command::new(leasehold)
        .arg("up")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--listen", "127.0.0.1:0", "--agent-listen", "127.0.0.1:0"])
        .args(["--image-store-listen", "127.0.0.1:0", "--driver", "vm"])
        .args(["--partitions", "0", "--output", "json"])
        .env_remove("LEASEHOLD_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start leasehold up")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let ready = loop {
        let Some(line) = lines.next() else {
            bail!("leasehold up --driver vm ended without a ready line");
        };
        if let Ok(ready) = serde_json::from_str::<serde_json::Value>(&line?) {
            break ready;
        }
    };
    Ok(Up {
        leasehold: leasehold.to_path_buf(),
        child,
        ready,
        data_dir: data_dir.to_path_buf(),
    })
}

impl Up {
    fn text(&self, pointer: &str) -> Result<String> {
        self.ready
            .pointer(pointer)
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .with_context(|| format!("the ready line has no {pointer}"))
    }

    fn cli(&self, token: &str) -> Result<Command> {
        let mut command = Command::new(&self.leasehold);
        command
            .env("LEASEHOLD_BROKER", self.text("/broker_url")?)
            .env("LEASEHOLD_AGENT", self.text("/agent_url")?)
            .env("LEASEHOLD_TOKEN", self.text(&format!("/tokens/{token}"))?)
            .stdin(Stdio::null());
        Ok(command)
    }
}

fn leasehold_path(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path.to_path_buf());
    }
    let exe = std::env::current_exe()?;
    Ok(exe.with_file_name("leasehold"))
}

/// Adds a partition with the bench's terms and leases it; the lease id.
fn lease_partition(up: &Up, args: &Args) -> Result<String> {
    let added = up
        .cli("lender")?
        .args(["host", "add", "--vcpus", &args.vcpus.to_string()])
        .args(["--cpu-cap", &args.cpu_cap.to_string()])
        .args([
            "--memory-mib",
            &args.memory_mib.to_string(),
            "--disk-gib",
            "1",
        ])
        .args(["--image", "debian-vm", "--price-per-hour", "0.1"])
        .output()?;
    if !added.status.success() {
        bail!("host add: {}", String::from_utf8_lossy(&added.stderr));
    }
    let leased = up
        .cli("borrower")?
        .args(["lease", "--best", "--output", "json"])
        .output()?;
    let lease: serde_json::Value = serde_json::from_slice(&leased.stdout)
        .with_context(|| format!("lease: {}", String::from_utf8_lossy(&leased.stderr)))?;
    Ok(lease["lease_id"].to_string())
}

/// One `leasehold run`: milliseconds to its first output byte.
fn time_first_output(up: &Up, lease_id: &str) -> Result<u64> {
    let started = Instant::now();
    let mut child = up
        .cli("borrower")?
        .args(["run", "--lease", lease_id, "--", "sh", "-c", "echo first"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut first = [0u8; 1];
    let got = child.stdout.as_mut().context("stdout")?.read(&mut first)?;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let output = child.wait_with_output()?;
    if got == 0 || !output.status.success() {
        bail!(
            "leasehold run failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(elapsed_ms)
}

/// Forgets the agent's unpacked images and its VM snapshots, so the next
/// job network-boots the image and boots it whole (a host that never ran
/// this image).
fn forget_image(data_dir: &Path) -> Result<()> {
    let rootfs = data_dir.join("agent/image-cache/rootfs");
    for entry in std::fs::read_dir(&rootfs)? {
        std::fs::remove_dir_all(entry?.path())?;
    }
    let snapshots = data_dir.join("agent/vm/snapshots");
    for entry in std::fs::read_dir(&snapshots)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "state") {
            std::fs::remove_file(path)?;
        }
    }
    Ok(())
}

fn summary(mut times_ms: Vec<u64>) -> serde_json::Value {
    times_ms.sort_unstable();
    let count = times_ms.len().max(1) as u64;
    serde_json::json!({
        "min": times_ms.first(),
        "p50": times_ms.get(times_ms.len() / 2),
        "max": times_ms.last(),
        "mean": times_ms.iter().sum::<u64>() / count,
        "all": times_ms,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Err(reason) = leasehold_agent::driver::vm::probe() {
        bail!("the vm driver cannot run here: {reason}");
    }
    let leasehold = leasehold_path(args.leasehold.as_deref())?;
    let dir = tempfile::tempdir()?;
    let up = start_up(&leasehold, &dir.path().join("data"))?;
    let lease_id = lease_partition(&up, &args)?;
    let mut cold = Vec::new();
    for _ in 0..args.runs {
        forget_image(&up.data_dir)?;
        cold.push(time_first_output(&up, &lease_id)?);
    }
    let mut warm = Vec::new();
    for _ in 0..args.runs {
        warm.push(time_first_output(&up, &lease_id)?);
    }
    // Released, the partition is wiped: no disk or cgroup stays behind.
    let _ = up
        .cli("borrower")?
        .args(["release", &lease_id])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let warm_summary = summary(warm);
    let under_bar = warm_summary["p50"]
        .as_u64()
        .is_some_and(|p50| p50 < WARM_BAR_MS);
    println!(
        "{}",
        serde_json::json!({
            "bench": "vm_first_output",
            "driver_reason": up.ready["driver_reason"],
            "terms": {"vcpus": args.vcpus, "cpu_cap_percent": args.cpu_cap, "memory_mib": args.memory_mib},
            "runs": args.runs,
            "cold_ms": summary(cold),
            "warm_ms": warm_summary,
            "warm_bar_ms": WARM_BAR_MS,
            "warm_p50_under_bar": under_bar,
            "load_average": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        })
    );
    Ok(())
}
