//! The broker's metrics, served at `/metrics` as OpenMetrics text: requests
//! per route and status (`leasehold_service::http_metrics`), leases
//! started, released and active, find latency, the writer's batch sizes
//! and commit latency, and refused commands by their error code.
//!
//! One registry per broker, held in its state (never process-global), so
//! brokers started in one process count apart. Who may read it: the admin,
//! or anyone with `--metrics-public` (see ARCHITECTURE.md, Metrics).

use crate::writer::Committed;
use crate::{AppState, BrokerError};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use leasehold_core::command::Outcome;
use leasehold_core::Role;
use leasehold_service::http_metrics::{latency_histogram, metrics_response, HttpMetrics};
use leasehold_service::ErrorResponse;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    /// The error code the caller was answered (`partition_taken`,
    /// `no_match`, `invalid`, ...): a fixed set.
    code: String,
}

/// The codes of the conflicts a lease or a lender's change can meet.
const CONFLICT_CODES: [&str; 5] = [
    "partition_taken",
    "partition_locked",
    "partition_booked",
    "partition_withdrawn",
    "no_match",
];

/// Everything the broker counts, registered in its own registry.
pub struct BrokerMetrics {
    registry: Registry,
    /// Requests and their latency, for the router's middleware.
    pub http: Arc<HttpMetrics>,
    leases_started: Counter,
    leases_released: Counter,
    leases_active: Gauge,
    partitions: Gauge,
    hosts: Gauge,
    leadership_epoch: Gauge,
    find_latency_seconds: Histogram,
    writer_batch_commands: Histogram,
    writer_commit_seconds: Histogram,
    writer_commit_failures: Counter,
    writer_queued_commands: Gauge,
    refusals: Family<RefusalLabels, Counter>,
}

impl Default for BrokerMetrics {
    fn default() -> Self {
        BrokerMetrics::new()
    }
}

impl BrokerMetrics {
    pub fn new() -> BrokerMetrics {
        let mut registry = Registry::with_prefix("leasehold_broker");
        let http = HttpMetrics::register(&mut registry);
        let metrics = BrokerMetrics {
            http,
            leases_started: Counter::default(),
            leases_released: Counter::default(),
            leases_active: Gauge::default(),
            partitions: Gauge::default(),
            hosts: Gauge::default(),
            leadership_epoch: Gauge::default(),
            find_latency_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            writer_batch_commands: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            writer_commit_seconds: latency_histogram(),
            writer_commit_failures: Counter::default(),
            writer_queued_commands: Gauge::default(),
            refusals: Family::default(),
            registry: Registry::default(),
        };
        metrics.register_into(registry)
    }

    fn register_into(mut self, mut registry: Registry) -> BrokerMetrics {
        let r = &mut registry;
        r.register(
            "leases_started",
            "Leases concluded (committed) by this broker process",
            self.leases_started.clone(),
        );
        r.register(
            "leases_released",
            "Leases released (committed) by this broker process",
            self.leases_released.clone(),
        );
        r.register(
            "leases_active",
            "Leases active now (booked ahead included)",
            self.leases_active.clone(),
        );
        r.register(
            "partitions",
            "Partitions registered now",
            self.partitions.clone(),
        );
        r.register("hosts", "Hosts registered now", self.hosts.clone());
        r.register(
            "leadership_epoch",
            "This broker's leadership epoch among the brokers of its database (it serves only while active)",
            self.leadership_epoch.clone(),
        );
        r.register(
            "find_duration_seconds",
            "Time to search the free index for one find",
            self.find_latency_seconds.clone(),
        );
        r.register(
            "writer_batch_commands",
            "Commands decided in one writer batch (one commit)",
            self.writer_batch_commands.clone(),
        );
        r.register(
            "writer_commit_duration_seconds",
            "Time to commit one writer batch to the store",
            self.writer_commit_seconds.clone(),
        );
        r.register(
            "writer_commit_failures",
            "Writer batches whose commit failed (every command in them failed)",
            self.writer_commit_failures.clone(),
        );
        r.register(
            "writer_queued_commands",
            "Commands waiting for the writer now (callers wait once it holds 8192)",
            self.writer_queued_commands.clone(),
        );
        r.register("refusals", "Commands the writer refused, by the error code answered (conflicts: partition_taken, partition_locked, ...)", self.refusals.clone());
        self.registry = registry;
        // The conflicts are shown from the start, at zero, so a dashboard
        // sees a rate of 0 rather than no series.
        for code in CONFLICT_CODES {
            let code = code.to_string();
            let _ = self.refusals.get_or_create(&RefusalLabels { code });
        }
        self
    }

    pub(crate) fn observe_find(&self, elapsed: Duration) {
        self.find_latency_seconds.observe(elapsed.as_secs_f64());
    }

    pub(crate) fn observe_commit(&self, commands: usize, elapsed: Option<Duration>) {
        self.writer_batch_commands.observe(commands as f64);
        if let Some(elapsed) = elapsed {
            self.writer_commit_seconds.observe(elapsed.as_secs_f64());
        }
    }

    pub(crate) fn count_commit_failure(&self) {
        self.writer_commit_failures.inc();
    }

    /// Counts what a committed batch answered: leases started and
    /// released, and refusals by code.
    pub(crate) fn count_answer(&self, answer: &Result<Committed, BrokerError>) {
        match answer {
            Ok(committed) => match committed.outcome {
                Outcome::Leased { .. } => {
                    self.leases_started.inc();
                }
                Outcome::Released { .. } => {
                    self.leases_released.inc();
                }
                _ => {}
            },
            Err(error) => {
                let code = error.to_error_response().detail.code;
                self.refusals.get_or_create(&RefusalLabels { code }).inc();
            }
        }
    }

    /// The gauges read from the committed table, then every series.
    fn render(&self, app: &AppState) -> Response {
        {
            let table = app.state.read().unwrap_or_else(|p| p.into_inner());
            self.leases_active.set(table.active_leases.len() as i64);
            self.partitions.set(table.partitions.len() as i64);
            self.hosts.set(table.hosts.len() as i64);
        }
        self.leadership_epoch
            .set(app.leadership.status().epoch as i64);
        self.writer_queued_commands
            .set(app.writer.queued_commands() as i64);
        metrics_response(&self.registry)
    }
}

/// `GET /metrics`: for the admin, or for anyone when the broker was started
/// with `--metrics-public` (it names no principal, token or key).
pub(crate) async fn serve_metrics(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ErrorResponse> {
    if !app.config.metrics_public {
        let principal = crate::http::authenticate(&app, &headers)?;
        crate::http::require_role(&principal, &[Role::Admin], "read the metrics")?;
    }
    Ok(app.metrics.render(&app))
}
