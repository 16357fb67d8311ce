//! The OpenAPI 3.1 document of the agent, served at `/openapi.json`.
//!
//! Generated from the code like the broker's: every handler carries a
//! `#[utoipa::path]` and `http::router` registers it through utoipa-axum's
//! `routes!`, so a route cannot be served without being documented. This
//! module holds the document's header, the agent's error responses, the
//! shapes of the answers written as JSON literals, and `/metrics`.

use crate::Agent;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use leasehold_service::error_responses;
use leasehold_service::openapi::BearerScheme;
use leasehold_service::ErrorResponse;
use std::sync::Arc;
use utoipa::{OpenApi, ToSchema};

/// The document's header; the paths come from `http::router`.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "leasehold agent",
        description = "A host's partition table, the lender's interface, job submission \
            with a lease key, notices from the broker and the host's usage rights \
            (seed 004). Lender calls take `Authorization: Bearer LENDER_TOKEN`; jobs \
            take the lease key from the broker as the bearer (and in the body); notices \
            take the broker's signed notice as the bearer. Bodies are JSON objects sent \
            with `Content-Type: application/json`. Every error answers \
            `{error: {code, message, field}}`; `field` names the field at fault."
    ),
    components(schemas(leasehold_api::ErrorBody)),
    modifiers(&BearerScheme),
    security(("bearer" = []))
)]
pub(crate) struct AgentApi;

error_responses! {
    /// Every authenticated route: no bearer, or one this route does not take.
    AuthErrors => [
        ("401", "No bearer, or one this route does not accept (code `unauthorized`)"),
        ("403", "The bearer may not do this, or a lease key or notice was rejected (codes `forbidden`, `key_rejected` with `key_rejection`)"),
    ];
    /// A route reading a JSON body.
    BodyErrors => [
        ("400", "The body is not a JSON object, or a field is invalid (`field` names it)"),
        ("408", "The body was not sent in time"),
        ("413", "The body is larger than this route accepts"),
        ("415", "The body is not sent as `Content-Type: application/json`"),
    ];
    /// A path or query parameter that can be malformed.
    InvalidParameter => [("400", "A parameter is invalid (`field` names it)")];
    NotFound => [("404", "No such partition or job (or one of another lease), or no share group on this agent")];
    Conflict => [("409", "Refused by the partition's or the share group's state (codes `partition_locked`, `rights_conflict`, or the broker's code)")];
    /// Calls the agent passes on to the broker or the share group's store.
    Upstream => [
        ("502", "The broker could not be reached, or the image could not be fetched (codes `broker_unreachable`, `image_unavailable`)"),
        ("503", "The share group's store could not be reached (code `group_unreachable`)"),
    ];
}

/// `GET /v1/health`.
#[derive(ToSchema)]
#[allow(dead_code)] // a shape for the document; the handler writes it with json!
pub(crate) struct Health {
    /// Always `ok` when the agent answers.
    status: String,
}

/// `POST /v1/jobs/{job_id}/cancel`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct Cancelled {
    job_id: u64,
    /// False when the job had ended already.
    cancelled: bool,
}

/// `POST /v1/notices`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct Applied {
    applied: bool,
}

/// The agent's Prometheus metrics (`crate::metrics`).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "meta",
    responses(
        (status = 200, description = "The metrics in the OpenMetrics text format (`application/openmetrics-text; version=1.0.0`), which Prometheus reads", content_type = "application/openmetrics-text", body = String),
        AuthErrors,
    )
)]
pub(crate) async fn metrics(
    state: State<Arc<Agent>>,
    headers: HeaderMap,
) -> Result<Response, ErrorResponse> {
    crate::metrics::serve_metrics(state, headers).await
}

#[cfg(test)]
mod tests {
    //! The document against the router it comes from: an agent (the unit
    //! tests' harness) served on 127.0.0.1:0 and asked over HTTP.
    use leasehold_service::openapi::{document_operations, document_problems, router_operations};
    use serde_json::Value;

    /// Every (method, path) the router serves is documented, every
    /// documented operation is routed, and the document is whole.
    #[tokio::test]
    async fn every_route_of_the_router_is_in_the_document() {
        let harness = crate::tests::harness(&[1]);
        let router = crate::http::router(harness.agent.clone());
        let routed = router_operations(&router);
        assert!(
            routed.len() >= 20,
            "routes read from the router: {routed:?}"
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/openapi.json", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        let document: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        let documented = document_operations(&document);
        let undocumented: Vec<_> = routed.difference(&documented).collect();
        assert!(
            undocumented.is_empty(),
            "routed, not documented: {undocumented:?}"
        );
        let unrouted: Vec<_> = documented.difference(&routed).collect();
        assert!(unrouted.is_empty(), "documented, not routed: {unrouted:?}");
        assert_eq!(document_problems(&document), Vec::<String>::new());
        let schemas = document["components"]["schemas"].as_object().unwrap();
        assert!(schemas.contains_key("JobResult") && schemas.contains_key("ErrorBody"));
    }
}
