//! The `sim` driver: partitions and jobs kept in memory, with simulated
//! execution, for fleet simulations and benchmarks with thousands of hosts
//! in one process. It understands a few commands so tests can tell results
//! apart: `echo ARGS...`, `true`, `false`, `exit N`; anything else succeeds
//! and says it was simulated.

use super::{BoxFuture, DriverError, JobEnd, JobOutcome, JobSpec, PartitionDriver, PartitionSpec};
use std::collections::HashSet;
use std::sync::Mutex;

pub struct SimDriver {
    images: Vec<String>,
    built: Mutex<HashSet<u32>>,
}

impl SimDriver {
    pub fn new(images: Vec<String>) -> Self {
        SimDriver {
            images,
            built: Mutex::new(HashSet::new()),
        }
    }
}

/// The simulated result of a command.
pub fn simulate(command: &[String]) -> (i32, String) {
    match command.first().map(String::as_str) {
        Some("echo") => (0, format!("{}\n", command[1..].join(" "))),
        Some("true") => (0, String::new()),
        Some("false") => (1, String::new()),
        Some("exit") => (
            command.get(1).and_then(|c| c.parse().ok()).unwrap_or(0),
            String::new(),
        ),
        _ => (0, format!("simulated: {}\n", command.join(" "))),
    }
}

impl PartitionDriver for SimDriver {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn images(&self) -> Vec<String> {
        self.images.clone()
    }

    fn build(&self, partition: &PartitionSpec) -> Result<(), DriverError> {
        self.built
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(partition.index);
        Ok(())
    }

    fn run_job(&self, job: JobSpec) -> BoxFuture<'_, Result<JobOutcome, DriverError>> {
        Box::pin(async move {
            let built = self
                .built
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&job.partition.index);
            if !built {
                return Err(DriverError::Start(format!(
                    "partition {} is not built",
                    job.partition.index
                )));
            }
            // `terms` shows what the simulated partition was built with,
            // as a real job would read its cgroup limits.
            let (code, stdout) = if job.command == ["terms"] {
                let terms = serde_json::to_string(&job.partition.terms).unwrap_or_default();
                (0, format!("{terms}\n"))
            } else {
                simulate(&job.command)
            };
            if let Some(live) = &job.output {
                let _ = live.try_send((super::Stream::Stdout, stdout.clone().into_bytes()));
            }
            Ok(JobOutcome {
                end: JobEnd::Exited(code),
                stdout,
                stderr: String::new(),
                output_truncated: false,
                wall_ms: 0,
                cpu_ms: Some(0),
                peak_memory_bytes: Some(0),
                oom_killed: false,
            })
        })
    }

    fn wipe(&self, index: u32) -> Result<(), DriverError> {
        self.built
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&index);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulated_commands() {
        let s = |c: &[&str]| simulate(&c.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(s(&["echo", "a", "b"]), (0, "a b\n".into()));
        assert_eq!(s(&["false"]), (1, String::new()));
        assert_eq!(s(&["exit", "7"]), (7, String::new()));
    }
}
