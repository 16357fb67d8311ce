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
