//! The agent's metrics, served at `/metrics` as OpenMetrics text: requests
//! per route and status (`leasehold_service::http_metrics`), jobs by
//! outcome, refused lease keys by reason, jobs running, partitions, and
//! each built partition's CPU time and memory read from its cgroup at
//! scrape time (drivers without partition cgroups, such as `sim`, have
//! none).
//!
//! One registry per agent, held in its state (never process-global). Who
//! may read it: the host's lender (the agent's credential or a token the
//! broker vouches for), or anyone with `--metrics-public`.

use crate::driver::PartitionUsage;
use crate::{Agent, AgentError};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use leasehold_api::JobResult;
use leasehold_core::key::KeyRejection;
use leasehold_service::http_metrics::{metrics_response, HttpMetrics};
use leasehold_service::{bearer_token, ErrorResponse};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    /// A job's end state (`succeeded`, `failed`, `timed_out`,
    /// `cancelled`), or why it never ran (`key_rejected`, `refused`,
    /// `driver_error`, `error`): a fixed set.
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    /// A key rejection's name on the wire (`bad_signature`, `expired`, ...).
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    /// The partition's index on this host (bounded by the host's table).
    partition: u32,
}

/// The partitions' usage as read at the start of the scrape, written out
/// by the registry as it encodes.
#[derive(Debug, Default)]
struct PartitionUsageCollector {
    read: Mutex<Vec<(u32, PartitionUsage)>>,
}

impl Collector for PartitionUsageCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let read = self.read.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if read.is_empty() {
            return Ok(());
        }
        let mut cpu = encoder.encode_descriptor(
            "partition_cpu_seconds",
            "CPU time a built partition's jobs used, from its cgroup",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (partition, usage) in &read {
            let seconds = usage.cpu_usage_ns as f64 / 1e9;
            ConstCounter::new(seconds).encode(cpu.encode_family(&PartitionLabels {
                partition: *partition,
            })?)?;
        }
        let mut memory = encoder.encode_descriptor(
            "partition_memory_bytes",
            "Memory charged to a built partition now (page cache included), from its cgroup",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (partition, usage) in &read {
            ConstGauge::new(usage.memory_bytes as i64).encode(memory.encode_family(
                &PartitionLabels {
                    partition: *partition,
                },
            )?)?;
        }
        Ok(())
    }
}

/// How a job submission can end: its job's end state, or why no job ran.
const JOB_OUTCOMES: [&str; 8] = [
    "succeeded",
    "failed",
    "timed_out",
    "cancelled",
    "key_rejected",
    "refused",
    "driver_error",
    "error",
];

/// A key rejection's name on the wire (`bad_signature`, `expired`, ...).
fn reason_name(reason: &KeyRejection) -> String {
    match serde_json::to_value(reason) {
        Ok(serde_json::Value::String(name)) => name,
        _ => "other".to_string(),
    }
}

/// Everything the agent counts, registered in its own registry.
pub(crate) struct AgentMetrics {
    registry: Registry,
    /// Requests and their latency, for the router's middleware.
    pub http: Arc<HttpMetrics>,
    jobs: Family<OutcomeLabels, Counter>,
    key_refusals: Family<ReasonLabels, Counter>,
    jobs_running: Gauge,
    partitions: Gauge,
    partitions_leased: Gauge,
    usage: Arc<PartitionUsageCollector>,
}

impl AgentMetrics {
    pub(crate) fn new() -> AgentMetrics {
        let mut registry = Registry::with_prefix("leasehold_agent");
        let http = HttpMetrics::register(&mut registry);
        let metrics = AgentMetrics {
            http,
            jobs: Family::default(),
            key_refusals: Family::default(),
            jobs_running: Gauge::default(),
            partitions: Gauge::default(),
            partitions_leased: Gauge::default(),
            usage: Arc::default(),
            registry: Registry::default(),
        };
        metrics.register_into(registry)
    }

    fn register_into(mut self, mut registry: Registry) -> AgentMetrics {
        let r = &mut registry;
        r.register(
            "jobs",
            "Jobs submitted to this agent, by how they ended (or why they never ran)",
            self.jobs.clone(),
        );
        r.register(
            "key_refusals",
            "Lease keys refused, by reason",
            self.key_refusals.clone(),
        );
        r.register(
            "jobs_running",
            "Jobs running now",
            self.jobs_running.clone(),
        );
        r.register(
            "partitions",
            "Partitions in this host's table",
            self.partitions.clone(),
        );
        r.register(
            "partitions_leased",
            "Partitions held by a lease now",
            self.partitions_leased.clone(),
        );
        r.register_collector(Box::new(self.usage.clone()));
        self.registry = registry;
        self.start_known_series_at_zero();
        self
    }

    /// The outcomes and reasons known today are shown from the start, at
    /// zero, so a dashboard sees a rate of 0 rather than no series.
    fn start_known_series_at_zero(&self) {
        for outcome in JOB_OUTCOMES {
            let _ = self.jobs.get_or_create(&OutcomeLabels { outcome });
        }
        for reason in [
            KeyRejection::Malformed,
            KeyRejection::BadSignature,
            KeyRejection::WrongHost,
            KeyRejection::WrongPartition,
            KeyRejection::WrongLease,
            KeyRejection::Expired,
            KeyRejection::Stale,
            KeyRejection::Released,
            KeyRejection::NotYetValid,
            KeyRejection::WrongBroker,
        ] {
            let _ = self.key_refusals.get_or_create(&ReasonLabels {
                reason: reason_name(&reason),
            });
        }
    }

    /// Counts a job submission by how it ended.
    pub(crate) fn count_job(&self, result: &Result<JobResult, AgentError>) {
        let outcome = match result {
            Ok(job) => job.state.as_str(),
            Err(AgentError::KeyRejected(_)) => "key_rejected",
            Err(AgentError::Invalid(_) | AgentError::NotFound(_) | AgentError::Locked { .. }) => {
                "refused"
            }
            Err(AgentError::Driver(_)) => "driver_error",
            Err(_) => "error",
        };
        self.jobs.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    pub(crate) fn count_key_refusal(&self, reason: &KeyRejection) {
        let reason = reason_name(reason);
        self.key_refusals
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// The gauges and the partitions' cgroups as they are now, then every
    /// series.
    fn render(&self, agent: &Agent) -> Result<Response, AgentError> {
        let rows = agent.db().partitions()?;
        let running = agent
            .running_jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        self.jobs_running.set(running as i64);
        self.partitions.set(rows.len() as i64);
        let leased = rows.iter().filter(|row| row.fence.lease_id().is_some());
        self.partitions_leased.set(leased.count() as i64);
        let usage = rows
            .iter()
            .filter_map(|row| Some((row.index, agent.driver.usage_of(row.index)?)))
            .collect();
        *self.usage.read.lock().unwrap_or_else(|p| p.into_inner()) = usage;
        Ok(metrics_response(&self.registry))
    }
}

/// `GET /metrics`: for the host's lender, or for anyone when the agent was
/// started with `--metrics-public` (it names no principal, token or key).
pub(crate) async fn serve_metrics(
    State(agent): State<Arc<Agent>>,
    headers: HeaderMap,
) -> Result<Response, ErrorResponse> {
    if !agent.config.metrics_public {
        let is_lender = match bearer_token(&headers) {
            Some(token) => agent.is_lender(token).await,
            None => false,
        };
        if !is_lender {
            return Err(AgentError::Unauthorized.to_error_response());
        }
    }
    agent
        .metrics
        .render(&agent)
        .map_err(|error| error.to_error_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(metrics: &AgentMetrics) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.registry).unwrap();
        text
    }

    #[test]
    fn partition_usage_is_written_per_partition_and_left_out_when_none_was_read() {
        let metrics = AgentMetrics::new();
        assert!(!encoded(&metrics).contains("partition_cpu"));
        let usage = PartitionUsage {
            cpu_usage_ns: 1_500_000_000,
            memory_bytes: 4096,
        };
        *metrics.usage.read.lock().unwrap() = vec![(3, usage)];
        let text = encoded(&metrics);
        assert!(
            text.contains("# TYPE leasehold_agent_partition_cpu_seconds counter"),
            "{text}"
        );
        assert!(
            text.contains(r#"leasehold_agent_partition_cpu_seconds_total{partition="3"} 1.5"#),
            "{text}"
        );
        assert!(
            text.contains(r#"leasehold_agent_partition_memory_bytes{partition="3"} 4096"#),
            "{text}"
        );
    }

    #[test]
    fn known_outcomes_and_reasons_start_at_zero_and_count_up() {
        let metrics = AgentMetrics::new();
        let text = encoded(&metrics);
        assert!(
            text.contains(r#"leasehold_agent_jobs_total{outcome="timed_out"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"leasehold_agent_key_refusals_total{reason="not_yet_valid"} 0"#),
            "{text}"
        );
        metrics.count_key_refusal(&KeyRejection::Expired);
        metrics.count_job(&Err(AgentError::KeyRejected(KeyRejection::Expired)));
        let text = encoded(&metrics);
        assert!(
            text.contains(r#"leasehold_agent_key_refusals_total{reason="expired"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"leasehold_agent_jobs_total{outcome="key_rejected"} 1"#),
            "{text}"
        );
    }
}
