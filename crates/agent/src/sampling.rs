//! The host's samples (seed 003, units 109/110): every sample interval the
//! agent tells the broker what the owner's own work uses now, and the
//! broker answers what pools and started instances hold on this host (the
//! guarantee, which the owner's work must stay out of) and how soon it wants
//! the next sample (sooner as a start on the host nears). The broker's
//! planner turns the samples into the capacity free for pools and its trend.
//!
//! The owner's usage on a `sim` host follows its trace (`owner_load`), on
//! the agent's clock from its start, clamped by what is lent and guaranteed;
//! on an `oci` host with an owner cgroup it is measured there, and each
//! answer's guarantee lowers that cgroup's limits a step (`owner_cgroup`);
//! otherwise it is the owner share. A failed post is logged at a bounded
//! rate and retried at the next interval; it never stops the agent.

use crate::owner_cgroup::{memory_step_mib, owner_limits_goal, OwnerCgroup};
use crate::owner_load::{self, OwnerLoadError, OwnerLoadTrace};
use crate::{Agent, AgentError};
use leasehold_api::{HostSampleAnswer, HostSampleRequest};
use leasehold_core::reservation::Capacity;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often the agent samples unless configured otherwise
/// (`--sample-interval-secs`).
pub const DEFAULT_SAMPLE_INTERVAL_SECS: u64 = 10;

/// The least time between two samples, whatever the broker asks for.
pub const MIN_SAMPLE_GAP_MS: u64 = 100;

/// While posting fails, at most one failure is logged per this window (the
/// others are counted into the next line), so a broker away for an hour
/// costs 60 lines, not 3,600.
pub const FAILURE_LOG_WINDOW_MS: u64 = 60_000;

/// How the agent samples its host.
#[derive(Debug, Clone)]
pub struct SamplingConfig {
    /// The longest time between two samples; the broker may ask for less.
    pub interval_ms: u64,
    /// The owner's load trace (`--owner-load`, `sim` driver only).
    pub owner_load_file: Option<PathBuf>,
    /// The cgroup the owner's real work runs in (`--owner-cgroup`, `oci`
    /// driver only), relative to the cgroup hierarchies' root.
    pub owner_cgroup: Option<String>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            interval_ms: DEFAULT_SAMPLE_INTERVAL_SECS * 1000,
            owner_load_file: None,
            owner_cgroup: None,
        }
    }
}

/// What the last sample learned, for the agent's info.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SampleStatus {
    /// The guarantee in the broker's last answer.
    pub guaranteed: Option<Capacity>,
    /// When (agent's clock) the broker last answered a sample.
    pub answered_at_ms: Option<u64>,
    /// What the last sample reported the owner used.
    pub owner_used: Option<Capacity>,
}

/// Where the owner's usage comes from.
enum OwnerWork {
    /// Nothing said: the owner uses its share.
    Share,
    /// A `sim` host's trace.
    Trace(OwnerLoadTrace),
    /// An `oci` host's owner cgroup, measured and limited.
    Cgroup(OwnerCgroup),
}

/// The sampler's state, kept in the agent.
pub(crate) struct Sampler {
    owner: OwnerWork,
    /// The agent's start on its clock: trace offsets count from here.
    started_at_ms: u64,
    status: Mutex<SampleStatus>,
    failures: Mutex<FailureLog>,
    /// Limits the kernel refused for the owner cgroup, logged like failures.
    refused_limits: Mutex<FailureLog>,
}

/// The driver's name when it is not `wanted`.
fn other_driver(config: &crate::AgentConfig, wanted: &str) -> Option<&'static str> {
    use crate::driver::DriverKind;
    let name = match config.driver {
        DriverKind::Sim { .. } => "sim",
        DriverKind::Process { .. } => "process",
        DriverKind::Oci { .. } => "oci",
        DriverKind::Vm { .. } => "vm",
    };
    (name != wanted).then_some(name)
}

/// The owner's work as configured: a trace only on `sim`, a cgroup only on
/// `oci`, not both; a bad trace names `FILE:LINE: field: problem`.
fn owner_work(config: &crate::AgentConfig) -> Result<OwnerWork, OwnerLoadError> {
    let sampling = &config.sampling;
    match (&sampling.owner_load_file, &sampling.owner_cgroup) {
        (Some(_), Some(_)) => Err(OwnerLoadError::BothOwnerSources),
        (Some(path), None) => match other_driver(config, "sim") {
            Some(driver) => Err(OwnerLoadError::NeedsSimDriver { driver }),
            None => Ok(OwnerWork::Trace(OwnerLoadTrace::read(
                path,
                &config.capacity,
            )?)),
        },
        (None, Some(path)) => match other_driver(config, "oci") {
            Some(driver) => Err(OwnerLoadError::CgroupNeedsOciDriver { driver }),
            None => Ok(OwnerWork::Cgroup(OwnerCgroup::open(
                path,
                &config.capacity,
            )?)),
        },
        (None, None) => Ok(OwnerWork::Share),
    }
}

impl Sampler {
    /// The sampler of `config`'s owner work (see [`owner_work`]).
    pub(crate) fn new(
        config: &crate::AgentConfig,
        started_at_ms: u64,
    ) -> Result<Sampler, AgentError> {
        Ok(Sampler::of(owner_work(config)?, started_at_ms))
    }

    #[cfg(test)]
    pub(crate) fn with_trace(trace: Option<OwnerLoadTrace>, started_at_ms: u64) -> Sampler {
        Sampler::of(
            trace.map_or(OwnerWork::Share, OwnerWork::Trace),
            started_at_ms,
        )
    }

    fn of(owner: OwnerWork, started_at_ms: u64) -> Sampler {
        Sampler {
            owner,
            started_at_ms,
            status: Mutex::new(SampleStatus::default()),
            failures: Mutex::new(FailureLog::default()),
            refused_limits: Mutex::new(FailureLog::default()),
        }
    }

    pub(crate) fn status(&self) -> SampleStatus {
        *self.status.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Agent {
    /// What the partitions of this host lend in the market (every row of
    /// the partition table: capacity set aside whether leased or not).
    fn lent_capacity(&self) -> Result<Capacity, AgentError> {
        let rows = self.db().partitions()?;
        Ok(rows.iter().fold(Capacity::ZERO, |lent, row| {
            lent.saturating_add(Capacity::new(
                row.terms.cpu_centicores(),
                row.terms.memory_mib,
                row.terms.disk_gib,
            ))
        }))
    }

    /// What the owner's work uses now: measured from its cgroup, or its
    /// trace's value at this moment (else its share) clamped by what is
    /// lent and by the last guarantee.
    fn measure_owner_usage(&self) -> Result<Capacity, AgentError> {
        let host = &self.config.capacity;
        let wanted = match &self.sampler.owner {
            OwnerWork::Cgroup(owner) => return Ok(owner.measure(host)),
            OwnerWork::Trace(trace) => {
                let offset_ms = self
                    .config
                    .clock
                    .now_ms()
                    .saturating_sub(self.sampler.started_at_ms);
                trace.wanted_at(offset_ms, host)
            }
            OwnerWork::Share => owner_load::owner_share(host),
        };
        let guaranteed = self.sampler.status().guaranteed.unwrap_or(Capacity::ZERO);
        Ok(owner_load::owner_usage(
            wanted,
            host,
            self.lent_capacity()?,
            guaranteed,
        ))
    }

    /// The owner's usage for the agent's info: a measured cgroup's at the
    /// last sample (measuring moves its CPU-rate mark), else as of now;
    /// none if the partition table cannot be read.
    pub(crate) fn owner_used_now(&self) -> Option<Capacity> {
        match &self.sampler.owner {
            OwnerWork::Cgroup(_) => self.sampler.status().owner_used,
            _ => self.measure_owner_usage().ok(),
        }
    }

    /// Keeps the owner's cgroup out of what is lent and now guaranteed,
    /// one memory step per sample; a refused limit is logged at a bounded
    /// rate and tried again at the next sample.
    /// Seed 004: the owner share's cpuset follows its active modules (with
    /// `--owner-cgroup`; without one the owner's cores are only counted).
    pub(crate) fn set_owner_share_modules(&self, active: u32) {
        if let OwnerWork::Cgroup(owner) = &self.sampler.owner {
            if let Err(problem) = owner.set_active_modules(active) {
                tracing::warn!(%problem, active, "could not switch the owner share's modules");
            }
        }
    }

    fn limit_owner_cgroup(&self, guaranteed: Capacity) -> Result<(), AgentError> {
        let OwnerWork::Cgroup(owner) = &self.sampler.owner else {
            return Ok(());
        };
        let host = &self.config.capacity;
        let goal = owner_limits_goal(host, self.lent_capacity()?, guaranteed);
        if let Err(problem) = owner.enforce(goal, memory_step_mib(host)) {
            let now_ms = self.config.clock.now_ms();
            let mut refused = self
                .sampler
                .refused_limits
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(unlogged) = refused.on_failure(now_ms) {
                tracing::warn!(%problem, unlogged_refusals_before = unlogged,
                    "cannot lower the owner cgroup's limits yet; will try again");
            }
        }
        Ok(())
    }
}

/// One sample: tells the broker the owner's usage now, keeps the guarantee
/// it answers (the owner's next usage stays out of it) and hands the answer
/// back.
pub(crate) async fn sample_once(agent: &Agent) -> Result<HostSampleAnswer, AgentError> {
    let owner_used = agent.measure_owner_usage()?;
    let request = HostSampleRequest { owner_used };
    let answer = agent
        .broker
        .post_host_sample(&agent.config.host_id, &request)
        .await?;
    {
        let mut status = agent
            .sampler
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        status.guaranteed = Some(answer.guaranteed);
        status.answered_at_ms = Some(agent.config.clock.now_ms());
        status.owner_used = Some(owner_used);
    }
    agent.limit_owner_cgroup(answer.guaranteed)?;
    Ok(answer)
}

/// Starts the sampling loop; the handle stops it.
pub(crate) fn spawn_sample_loop(agent: Arc<Agent>) -> tokio::task::AbortHandle {
    let interval_ms = agent.config.sampling.interval_ms;
    let task = tokio::spawn(sample_every(interval_ms, move || {
        let agent = agent.clone();
        async move {
            let outcome = sample_once(&agent).await;
            let now_ms = agent.config.clock.now_ms();
            let mut failures = agent
                .sampler
                .failures
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match outcome {
                Ok(answer) => {
                    if let Some(failed) = failures.on_success() {
                        tracing::info!(failed, "sampling the host works again");
                    }
                    Some(answer.next_sample_after_ms)
                }
                Err(error) => {
                    if let Some(unlogged) = failures.on_failure(now_ms) {
                        tracing::warn!(%error, unlogged_failures_before = unlogged,
                            "cannot send the host's sample to the broker; will try again");
                    }
                    None
                }
            }
        }
    }));
    task.abort_handle()
}

/// Samples at once, then again after [`next_gap_ms`] of what the sample
/// answered (the broker's wish, or `None` after a failure), on tokio's timer
/// (so tests move it with paused time).
async fn sample_every<F, Sampled>(interval_ms: u64, mut sample: F)
where
    F: FnMut() -> Sampled,
    Sampled: std::future::Future<Output = Option<u64>>,
{
    loop {
        let asked_gap_ms = sample().await;
        let gap_ms = next_gap_ms(interval_ms, asked_gap_ms);
        tokio::time::sleep(Duration::from_millis(gap_ms)).await;
    }
}

/// The time to the next sample: the interval, or sooner when the broker
/// asks for it, but never less than [`MIN_SAMPLE_GAP_MS`].
pub(crate) fn next_gap_ms(interval_ms: u64, asked_gap_ms: Option<u64>) -> u64 {
    asked_gap_ms
        .map_or(interval_ms, |asked| asked.min(interval_ms))
        .max(MIN_SAMPLE_GAP_MS)
}

/// Which failures to post a sample are logged: the first of a run at once,
/// then one per [`FAILURE_LOG_WINDOW_MS`] carrying the count of those not
/// logged.
#[derive(Debug, Default)]
pub(crate) struct FailureLog {
    last_logged_at_ms: Option<u64>,
    unlogged: u64,
    failed_in_run: u64,
}

impl FailureLog {
    /// A failure at `now_ms`: `Some(unlogged before)` when it is to be logged.
    pub(crate) fn on_failure(&mut self, now_ms: u64) -> Option<u64> {
        self.failed_in_run += 1;
        let due = self
            .last_logged_at_ms
            .is_none_or(|at| now_ms.saturating_sub(at) >= FAILURE_LOG_WINDOW_MS);
        if !due {
            self.unlogged += 1;
            return None;
        }
        self.last_logged_at_ms = Some(now_ms);
        Some(std::mem::take(&mut self.unlogged))
    }

    /// A success: `Some(failures in the run)` when a run of failures ended.
    pub(crate) fn on_success(&mut self) -> Option<u64> {
        let failed = std::mem::take(&mut self.failed_in_run);
        *self = FailureLog::default();
        (failed > 0).then_some(failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_sample_comes_after_the_interval_or_sooner_if_asked_but_not_too_soon() {
        assert_eq!(next_gap_ms(10_000, None), 10_000, "after a failure");
        assert_eq!(next_gap_ms(10_000, Some(60_000)), 10_000);
        assert_eq!(next_gap_ms(10_000, Some(2_500)), 2_500);
        assert_eq!(next_gap_ms(10_000, Some(0)), MIN_SAMPLE_GAP_MS);
        assert_eq!(next_gap_ms(50, None), MIN_SAMPLE_GAP_MS);
    }

    /// The times, from the start, of the first `count` samples when each
    /// sample answers the next of `asked` (tokio's paused time: exact).
    async fn sample_times_ms(interval_ms: u64, asked: Vec<Option<u64>>, count: usize) -> Vec<u64> {
        let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
        let started = tokio::time::Instant::now();
        let mut asked = asked.into_iter();
        let sampler = tokio::spawn(sample_every(interval_ms, move || {
            let _ = sender.send(started.elapsed().as_millis() as u64);
            let answer = asked.next().flatten();
            async move { answer }
        }));
        let mut times = Vec::new();
        while times.len() < count {
            times.push(receiver.recv().await.expect("the sampler runs"));
        }
        sampler.abort();
        times
    }

    #[tokio::test(start_paused = true)]
    async fn samples_follow_the_brokers_wish_within_the_interval() {
        // At once; the broker asks for 3 s, then 0 (100 ms at least), then
        // a failure (the interval), then more than the interval.
        let asked = vec![Some(3_000), Some(0), None, Some(60_000)];
        assert_eq!(
            sample_times_ms(10_000, asked, 5).await,
            vec![0, 3_000, 3_100, 13_100, 23_100]
        );
    }

    #[test]
    fn failures_are_logged_once_per_window_with_the_count_of_the_others() {
        let mut log = FailureLog::default();
        let start = 1_000_000;
        assert_eq!(log.on_failure(start), Some(0), "the first at once");
        for second in 1..60 {
            assert_eq!(log.on_failure(start + second * 1000), None);
        }
        assert_eq!(
            log.on_failure(start + FAILURE_LOG_WINDOW_MS),
            Some(59),
            "a minute on, with the 59 not logged"
        );
        assert_eq!(log.on_failure(start + FAILURE_LOG_WINDOW_MS + 1), None);
        assert_eq!(log.on_success(), Some(62), "the run of failures ended");
        assert_eq!(log.on_success(), None);
        assert_eq!(log.on_failure(start + FAILURE_LOG_WINDOW_MS + 2), Some(0));
    }
}
