//! What the servers share about metrics: requests and their latency per
//! route and status (a middleware), and the text answer of `/metrics`.
//!
//! Each server keeps its own `prometheus_client` registry in its state,
//! never a process-global one: tests run several brokers and agents in one
//! process, and each must count only its own requests. Labels are bounded
//! by construction: the route is axum's route template (`/v1/leases/{lease_id}`,
//! never the raw path), the method one of the standard ones or `other`,
//! and the status a number; no label ever carries a token, a principal's
//! name or a lease key.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Instant;

/// The media type `prometheus_client` writes (OpenMetrics text, which
/// Prometheus scrapes natively and which keeps the `# TYPE` lines of its
/// older text format).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The route label of a request no route matched (probes, typos): one
/// series for all of them, whatever path they asked for.
pub const UNMATCHED_ROUTE: &str = "unmatched";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: &'static str,
    route: String,
}

/// Request latencies from 1 ms to about 16 s, doubling.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Requests by route and status, and their latency by route.
pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    latency_seconds: Family<RouteLabels, Histogram, fn() -> Histogram>,
}

impl HttpMetrics {
    /// Registers the request series in `registry` (the server's own).
    pub fn register(registry: &mut Registry) -> Arc<HttpMetrics> {
        let metrics = HttpMetrics {
            requests: Family::default(),
            latency_seconds: Family::new_with_constructor(latency_histogram),
        };
        registry.register(
            "http_requests",
            "HTTP requests answered, by method, route template and status",
            metrics.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from a request's arrival to its response's head, by method and route template",
            metrics.latency_seconds.clone(),
        );
        Arc::new(metrics)
    }

    fn record(&self, method: &'static str, route: String, status: StatusCode, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                method,
                route: route.clone(),
                status: status.as_u16(),
            })
            .inc();
        self.latency_seconds
            .get_or_create(&RouteLabels { method, route })
            .observe(seconds);
    }
}

/// A method as a label: the standard ones by name, any other as `other`,
/// so a client inventing methods cannot grow the series.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// The middleware (`axum::middleware::from_fn_with_state`, added with
/// `Router::layer` so the matched route is known) that counts every answer.
pub async fn record_http_request(
    State(metrics): State<Arc<HttpMetrics>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_string())
        .unwrap_or_else(|| UNMATCHED_ROUTE.to_string());
    let method = method_label(request.method());
    let started = Instant::now();
    let response = next.run(request).await;
    metrics.record(
        method,
        route,
        response.status(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// The registry as OpenMetrics text, or 500 if it cannot be written.
pub fn metrics_response(registry: &Registry) -> Response {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, registry) {
        Ok(()) => ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], text).into_response(),
        Err(_) => crate::ErrorResponse::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "cannot write the metrics",
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use axum::Router;
    use tower::ServiceExt;

    #[tokio::test]
    async fn requests_are_counted_by_route_template_never_by_raw_path() {
        let mut registry = Registry::with_prefix("test");
        let metrics = HttpMetrics::register(&mut registry);
        let router = Router::new()
            .route("/v1/leases/{lease_id}", get(|| async { "ok" }))
            .layer(axum::middleware::from_fn_with_state(
                metrics,
                record_http_request,
            ));
        for path in ["/v1/leases/1", "/v1/leases/2", "/secret-token-in-a-path"] {
            let request = Request::get(path).body(axum::body::Body::empty()).unwrap();
            router.clone().oneshot(request).await.unwrap();
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                r#"test_http_requests_total{method="GET",route="/v1/leases/{lease_id}",status="200"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"test_http_requests_total{method="GET",route="unmatched",status="404"} 1"#
            ),
            "{text}"
        );
        assert!(!text.contains("secret-token"), "{text}");
        assert!(!text.contains("/v1/leases/1"), "{text}");
    }
}
