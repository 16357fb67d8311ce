//! The broker under test as the real `leasehold broker` process: what a
//! user would run, so its figures include its own runtime, allocator and
//! start-up, and none of the benchmark's work shares its process.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How to start the broker; kept so it can be restarted on the same data.
#[derive(Debug, Clone)]
pub struct BrokerLaunch {
    pub binary: PathBuf,
    /// The broker's data directory (its signing keys, and SQLite's files).
    pub data_dir: PathBuf,
    /// PostgreSQL instead of SQLite (a URL without a password).
    pub database_url: Option<String>,
    pub durability: &'static str,
}

/// A running broker process, killed when dropped.
pub struct BrokerProcess {
    child: Child,
    pub url: String,
    /// Printed by a broker that bootstrapped an admin (first start only).
    pub admin_token: Option<String>,
    /// From spawning the process to its ready line (the snapshot is loaded
    /// and the port is listening), in milliseconds.
    pub ready_ms: f64,
}

/// The `leasehold` binary: `explicit`, or the one cargo built next to this
/// benchmark (every binary of a profile lands in one directory).
pub fn leasehold_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    let here = std::env::current_exe()?;
    let path = here
        .parent()
        .context("the benchmark has no directory")?
        .join("leasehold");
    if !path.exists() {
        bail!(
            "no leasehold binary at {}; build it (cargo build --release -p leasehold-cli) or pass --leasehold PATH",
            path.display()
        );
    }
    Ok(path)
}

impl BrokerLaunch {
    pub async fn start(&self) -> Result<BrokerProcess> {
        let mut command = Command::new(&self.binary);
        command
            .args(["broker", "--listen", "127.0.0.1:0", "--output", "json"])
            .args(["--durability", self.durability])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env_remove("LEASEHOLD_TOKEN")
            .env_remove("LEASEHOLD_DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // Its warnings (if any) belong with the progress on stderr.
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(url) = &self.database_url {
            command.arg("--database").arg(url);
        }
        let started = Instant::now();
        let mut child = command
            .spawn()
            .with_context(|| format!("failed to start {}", self.binary.display()))?;
        let stdout = child.stdout.take().context("the broker has no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).await?;
        let ready_ms = started.elapsed().as_secs_f64() * 1000.0;
        let ready: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("the broker printed no ready line: {line:?}"))?;
        let url = ready["broker_url"]
            .as_str()
            .with_context(|| format!("no broker_url in {ready}"))?
            .to_string();
        Ok(BrokerProcess {
            child,
            url,
            admin_token: ready["admin_token"].as_str().map(str::to_string),
            ready_ms,
        })
    }
}

impl BrokerProcess {
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Asks the broker to stop (SIGTERM, as a service manager would) and
    /// waits up to 10 s for it, then kills it.
    pub async fn stop(mut self) -> Result<()> {
        let pid = self.pid();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
        match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(status) => {
                status?;
            }
            Err(_) => {
                eprintln!("the broker did not stop within 10 s of SIGTERM; killing it");
                self.child.kill().await?;
            }
        }
        Ok(())
    }
}
