//! The host's samples (seed 003, units 109/110): every sample interval the
//! agent tells the broker what the owner's own work uses now, and the
//! broker answers what pools and started instances hold on this host (the
//! guarantee, which the owner's work must stay out of) and how soon it wants
//! the next sample (sooner as a start on the host nears). The broker's
//! planner turns the samples into the capacity free for pools and its trend.
//!
//! The owner's usage on a `sim` host follows its trace (`owner_load`), on
//! the agent's clock from its start, clamped by what is lent and guaranteed;
//! without a trace it is the owner share. A failed post is logged at a
//! bounded rate and retried at the next interval; it never stops the agent.

use crate::owner_load::{self, OwnerLoadTrace};
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
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            interval_ms: DEFAULT_SAMPLE_INTERVAL_SECS * 1000,
            owner_load_file: None,
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
}

/// The sampler's state, kept in the agent.
pub(crate) struct Sampler {
    trace: Option<OwnerLoadTrace>,
    /// The agent's start on its clock: trace offsets count from here.
    started_at_ms: u64,
    status: Mutex<SampleStatus>,
    failures: Mutex<FailureLog>,
}

impl Sampler {
    /// Reads the trace of `config`, refusing it on a driver other than
    /// `sim`, or a bad line with `FILE:LINE: field: problem`.
    pub(crate) fn new(
        config: &crate::AgentConfig,
        started_at_ms: u64,
    ) -> Result<Sampler, AgentError> {
        let trace = match &config.sampling.owner_load_file {
            None => None,
            Some(path) => {
                use crate::driver::DriverKind;
                let other_driver = match config.driver {
                    DriverKind::Sim { .. } => None,
                    DriverKind::Process { .. } => Some("process"),
                    DriverKind::Oci { .. } => Some("oci"),
                };
                if let Some(driver) = other_driver {
                    return Err(owner_load::OwnerLoadError::NeedsSimDriver { driver }.into());
                }
                Some(OwnerLoadTrace::read(path, &config.capacity)?)
            }
        };
        Ok(Sampler::with_trace(trace, started_at_ms))
    }

    pub(crate) fn with_trace(trace: Option<OwnerLoadTrace>, started_at_ms: u64) -> Sampler {
        Sampler {
            trace,
            started_at_ms,
            status: Mutex::new(SampleStatus::default()),
            failures: Mutex::new(FailureLog::default()),
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

    /// What the owner's work uses now: its trace's value at this moment
    /// (else its share), clamped by what is lent and by the last guarantee.
    pub(crate) fn owner_used_now(&self) -> Result<Capacity, AgentError> {
        let host = &self.config.capacity;
        let wanted = match &self.sampler.trace {
            Some(trace) => {
                let offset_ms = self
                    .config
                    .clock
                    .now_ms()
                    .saturating_sub(self.sampler.started_at_ms);
                trace.wanted_at(offset_ms, host)
            }
            None => owner_load::owner_share(host),
        };
        let guaranteed = self.sampler.status().guaranteed.unwrap_or(Capacity::ZERO);
        Ok(owner_load::owner_usage(
            wanted,
            host,
            self.lent_capacity()?,
            guaranteed,
        ))
    }
}

/// One sample: tells the broker the owner's usage now, keeps the guarantee
/// it answers (the owner's next usage stays out of it) and hands the answer
/// back.
pub(crate) async fn sample_once(agent: &Agent) -> Result<HostSampleAnswer, AgentError> {
    let request = HostSampleRequest {
        owner_used: agent.owner_used_now()?,
    };
    let answer = agent
        .broker
        .post_host_sample(&agent.config.host_id, &request)
        .await?;
    let mut status = agent
        .sampler
        .status
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    status.guaranteed = Some(answer.guaranteed);
    status.answered_at_ms = Some(agent.config.clock.now_ms());
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
