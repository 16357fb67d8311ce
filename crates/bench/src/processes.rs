//! The `leasehold` binary's services as child processes for the benchmarks
//! that measure across processes (usage rights, broker fail-over).

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A child process killed when dropped.
pub struct Service {
    pub child: Child,
    pub ready: serde_json::Value,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `leasehold` binary: `given`, or the one next to this benchmark.
pub fn binary(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path.to_path_buf());
    }
    let path = std::env::current_exe()?
        .parent()
        .context("the benchmark has no directory")?
        .join("leasehold");
    if !path.exists() {
        bail!(
            "no leasehold binary at {}; build it or pass --leasehold",
            path.display()
        );
    }
    Ok(path)
}

/// Starts `binary ARGS` (a token through LEASEHOLD_TOKEN, never the
/// command line) and waits for its JSON ready line.
pub fn start(binary: &Path, args: &[&str], token: Option<&str>) -> Result<Service> {
    let mut command = Command::new(binary);
    command.args(args).env_remove("LEASEHOLD_TOKEN");
    if let Some(token) = token {
        command.env("LEASEHOLD_TOKEN", token);
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("failed to start {}", binary.display()))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("no stdout")?).read_line(&mut line)?;
    let ready = serde_json::from_str(&line)
        .with_context(|| format!("{args:?} printed no ready line: {line:?}"))?;
    Ok(Service { child, ready })
}

/// A text field of a service's ready line.
pub fn text(service: &Service, key: &str) -> Result<String> {
    Ok(service.ready[key]
        .as_str()
        .with_context(|| format!("no {key} in {}", service.ready))?
        .to_string())
}

/// Adds `count` one-vCPU partitions (256 MiB, 1 GiB, busybox) through an
/// agent's lender interface.
pub async fn add_small_partitions(agent: &leasehold_api::Client, count: usize) -> Result<()> {
    for _ in 0..count {
        agent
            .agent_add_partition(&leasehold_core::Terms {
                vcpus: 1,
                cpu_cap_percent: 100,
                memory_mib: 256,
                disk_gib: 1,
                images: vec!["busybox".into()],
                price_per_hour_micros: 3_600_000_000,
                isolation: None,
            })
            .await
            .context("adding a partition")?;
    }
    Ok(())
}

/// Leases and releases per second for `seconds`, `clients` borrowers at
/// once, borrower `n` leasing `request(n)` each time.
pub async fn lease_rate(
    borrower: &leasehold_api::Client,
    clients: usize,
    seconds: u64,
    request: fn(usize) -> leasehold_api::LeaseRequest,
) -> Result<f64> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for client in 0..clients {
        let borrower = borrower.clone();
        tasks.push(tokio::spawn(async move {
            let mut leases = 0u64;
            while std::time::Instant::now() < deadline {
                let lease = borrower.lease(&request(client)).await?;
                borrower.release(lease.lease_id).await?;
                leases += 1;
            }
            Ok::<_, anyhow::Error>(leases)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(total as f64 / seconds as f64)
}
