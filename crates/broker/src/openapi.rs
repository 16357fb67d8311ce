//! The OpenAPI 3.1 document of the broker, served at `/openapi.json`.
//!
//! The document is generated from the code: every handler carries a
//! `#[utoipa::path]` and `http::router` registers it through utoipa-axum's
//! `routes!`, so a route cannot be served without being documented. The
//! request and response types derive `ToSchema` where they are defined
//! (`leasehold_api`, `leasehold_core`). This module holds the document's
//! header, the broker's error responses, the shapes of the few answers
//! written as JSON literals, and the `/metrics` operation; what the agent's
//! document shares with it is in `leasehold_service::openapi`.

use crate::AppState;
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
        title = "leasehold broker",
        description = "Resource table, matching, leases, lease keys, the ledger, \
            reservations (seed 003) and share groups (seed 004). Authenticate with \
            `Authorization: Bearer TOKEN`. Mutating requests may carry an \
            `Idempotency-Key` header. Money is in integer micro-units \
            (1,000,000 = one unit of currency). Every error answers \
            `{error: {code, message, field}}`; `field` names the field at fault."
    ),
    components(schemas(leasehold_api::ErrorBody)),
    modifiers(&BearerScheme),
    security(("bearer" = []))
)]
pub(crate) struct BrokerApi;

error_responses! {
    /// Every authenticated route: no or an unknown token, or the wrong role.
    AuthErrors => [
        ("401", "No bearer token, or one the broker does not know (code `unauthorized`)"),
        ("403", "The caller's role (or host credential) may not do this (code `forbidden`)"),
    ];
    /// A route reading a JSON body.
    BodyErrors => [
        ("400", "The body is not a JSON object, or a field is invalid (`field` names it)"),
        ("408", "The body was not sent in time"),
        ("413", "The body is larger than this route accepts"),
        ("415", "The body is not sent as `Content-Type: application/json`"),
    ];
    /// A path or query parameter that can be malformed.
    InvalidParameter => [
        ("400", "A parameter is invalid (`field` names it)"),
    ];
    NotFound => [("404", "No such thing, or one the caller may not see")];
    Conflict => [("409", "Refused by the state of the market (the code says which: `partition_taken`, `partition_locked`, `no_match`, `version_conflict`, ...)")];
    /// Routes whose command goes through the writer.
    Unavailable => [("503", "The broker is stopping: its writer takes no more commands (code `unavailable`)")];
    ImageStoreFailed => [("502", "The image store could not pin the terms' images (code `image_store_failed`)")];
}

/// `DELETE /v1/workloads/{name}` and `DELETE /v1/instances/{name}`.
#[derive(ToSchema)]
#[allow(dead_code)] // a shape for the document; the handler writes it with json!
pub(crate) struct Deleted {
    /// The name of what was deleted.
    deleted: String,
}

/// `POST /v1/instances/{name}/migrate`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct Moving {
    instance: String,
    /// The host the instance is moving to.
    moving_to: String,
}

/// `POST /v1/power/up/{host_id}`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct PoweredUp {
    powered_up: String,
}

/// `GET /v1/health`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct Health {
    /// Always `ok` when the broker answers.
    status: String,
}

/// The broker's Prometheus metrics (`crate::metrics`).
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
    state: State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ErrorResponse> {
    crate::metrics::serve_metrics(state, headers).await
}

#[cfg(test)]
mod tests {
    //! The document against the router it comes from: a broker runs in
    //! this process on 127.0.0.1:0 and is asked over HTTP.
    use crate::{BrokerConfig, RunningBroker, DEFAULT_KEY_TTL_MS};
    use leasehold_service::openapi::{document_operations, document_problems, router_operations};
    use serde_json::Value;
    use std::collections::BTreeSet;

    async fn broker(dir: &std::path::Path) -> (RunningBroker, String) {
        let clock = leasehold_service::SimulatedClock::starting_at(1_700_000_000_000);
        let broker = crate::start(BrokerConfig {
            data_dir: dir.join("broker"),
            listen: "127.0.0.1:0".parse().unwrap(),
            durability: leasehold_store::Durability::Normal,
            commission_basis_points: 0,
            key_ttl_ms: DEFAULT_KEY_TTL_MS,
            clock: clock.shared(),
            image_store_url: None,
            tls: None,
            client_trust: Default::default(),
            database_url: None,
            store_layer: None,
            plan_policy: Default::default(),
            run_planner: false,
            metrics_public: false,
        })
        .await
        .unwrap();
        let admin = broker.bootstrap_admin_token.clone().unwrap();
        (broker, admin)
    }

    async fn served_document(broker: &RunningBroker) -> Value {
        reqwest::get(format!("{}/openapi.json", broker.url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Every (method, path) the router serves but the HTML dashboard's is
    /// documented, and every documented operation is routed.
    #[tokio::test]
    async fn every_route_of_the_router_is_in_the_document() {
        let dir = tempfile::tempdir().unwrap();
        let (broker, _) = broker(dir.path()).await;
        let document = served_document(&broker).await;
        let routed: BTreeSet<(String, String)> =
            router_operations(&crate::http::router(broker.app.clone()))
                .into_iter()
                .filter(|(_, path)| !path.starts_with("/ui"))
                .collect();
        assert!(
            routed.len() >= 35,
            "routes read from the router: {routed:?}"
        );
        let documented = document_operations(&document);
        let undocumented: Vec<_> = routed.difference(&documented).collect();
        assert!(
            undocumented.is_empty(),
            "routed, not documented: {undocumented:?}"
        );
        let unrouted: Vec<_> = documented.difference(&routed).collect();
        assert!(unrouted.is_empty(), "documented, not routed: {unrouted:?}");
        broker.shutdown().await;
    }

    #[tokio::test]
    async fn every_operation_has_schemas_and_money_is_in_micro_units() {
        let dir = tempfile::tempdir().unwrap();
        let (broker, _) = broker(dir.path()).await;
        let document = served_document(&broker).await;
        assert_eq!(document_problems(&document), Vec::<String>::new());
        let schemas = document["components"]["schemas"].as_object().unwrap();
        assert!(schemas.contains_key("ErrorBody") && schemas.contains_key("LeaseView"));
        assert_eq!(
            document["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        let charge = &schemas["LeaseView"]["properties"]["charge_micros"];
        assert!(
            charge.to_string().contains("micro-units"),
            "charge_micros: {charge}"
        );
        broker.shutdown().await;
    }
}
