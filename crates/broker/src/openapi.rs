//! The OpenAPI 3.1 document of the broker, served at `/openapi.json`.
//!
//! The document is generated from the code: every handler carries a
//! `#[utoipa::path]` and `http::router` registers it through utoipa-axum's
//! `routes!`, so a route cannot be served without being documented. The
//! request and response types derive `ToSchema` where they are defined
//! (`leasehold_api`, `leasehold_core`). This module holds what the handlers
//! share: the document's header, the error responses, the shapes of the
//! few answers written as JSON literals, and the `/openapi.json` and
//! `/metrics` operations.

use crate::AppState;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use leasehold_service::ErrorResponse;
use std::sync::Arc;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

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

/// The `bearer` security scheme the operations refer to.
pub(crate) struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi
            .components
            .get_or_insert_with(utoipa::openapi::Components::new);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// One error status answered with the shared error body.
fn error_response(status: &str, description: &str) -> (String, RefOr<utoipa::openapi::Response>) {
    let content = ContentBuilder::new()
        .schema(Some(Ref::from_schema_name("ErrorBody")))
        .build();
    let response = ResponseBuilder::new()
        .description(description)
        .content("application/json", content)
        .build();
    (status.to_string(), RefOr::T(response))
}

/// Declares a marker type per group of error statuses, so an operation
/// lists the errors it can answer in one word each.
macro_rules! error_responses {
    ($($(#[$doc:meta])* $name:ident => [$(($status:literal, $description:literal)),+ $(,)?];)+) => {$(
        $(#[$doc])*
        pub(crate) struct $name;
        impl utoipa::IntoResponses for $name {
            fn responses() -> std::collections::BTreeMap<String, RefOr<utoipa::openapi::Response>> {
                [$(error_response($status, $description)),+].into_iter().collect()
            }
        }
    )+};
}

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

/// The document as served, made once when the router is built.
#[derive(Clone)]
pub(crate) struct DocumentJson(pub Arc<str>);

/// The document with its final touches, as JSON.
pub(crate) fn document_json(mut document: utoipa::openapi::OpenApi) -> DocumentJson {
    document.info.version = env!("CARGO_PKG_VERSION").to_string();
    let json = document
        .to_pretty_json()
        .expect("an OpenAPI document always serializes");
    DocumentJson(json.into())
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    security(()),
    responses((status = 200, description = "This OpenAPI 3.1 document", body = Object))
)]
pub(crate) async fn serve_document(Extension(document): Extension<DocumentJson>) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        document.0.to_string(),
    )
        .into_response()
}

/// The broker's Prometheus metrics (`crate::metrics`).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "meta",
    responses(
        (status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
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
    use serde_json::Value;
    use std::collections::BTreeSet;

    const METHODS: [&str; 5] = ["GET", "POST", "PUT", "DELETE", "PATCH"];

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

    /// The paths the router serves, read from its routing table (axum's
    /// `Debug` of a router lists its paths by route id; the test fails
    /// loudly if that changes, since it then finds no routes).
    fn router_paths(router: &axum::Router) -> BTreeSet<String> {
        let text = format!("{router:?}");
        // The fallback's own catch-all routes follow the real ones.
        let (text, _) = text.split_once("fallback_router").unwrap();
        let mut paths = BTreeSet::new();
        for piece in text.split("RouteId(").skip(1) {
            if let Some((_, rest)) = piece.split_once("): \"") {
                if let Some((path, _)) = rest.split_once('"') {
                    paths.insert(path.to_string());
                }
            }
        }
        paths
    }

    /// A concrete URL path for a template: every `{parameter}` becomes 1.
    fn concrete(template: &str) -> String {
        template
            .split('/')
            .map(|s| if s.starts_with('{') { "1" } else { s })
            .collect::<Vec<_>>()
            .join("/")
    }

    #[tokio::test]
    async fn every_route_of_the_router_is_in_the_document_with_a_json_schema() {
        let dir = tempfile::tempdir().unwrap();
        let (broker, admin) = broker(dir.path()).await;
        let client = reqwest::Client::new();
        let document: Value = client
            .get(format!("{}/openapi.json", broker.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(document["openapi"].as_str().unwrap().starts_with("3.1"));
        let paths = document["paths"].as_object().unwrap();
        let routes = router_paths(&crate::http::router(broker.app.clone()));
        let api_routes: Vec<&String> = routes.iter().filter(|p| !p.starts_with("/ui")).collect();
        assert!(
            api_routes.len() >= 30,
            "routes read from the router: {routes:?}"
        );
        for route in &api_routes {
            assert!(
                paths.contains_key(route.as_str()),
                "{route} is not in the document"
            );
            // Every method the router answers (anything but 405) is documented.
            for method in METHODS {
                let answer = client
                    .request(
                        method.parse().unwrap(),
                        format!("{}{}", broker.url(), concrete(route)),
                    )
                    .bearer_auth(&admin)
                    .send()
                    .await
                    .unwrap();
                let documented = paths[route.as_str()].get(method.to_lowercase()).is_some();
                assert_eq!(
                    answer.status() != reqwest::StatusCode::METHOD_NOT_ALLOWED,
                    documented,
                    "{method} {route}: answered {}, documented: {documented}",
                    answer.status()
                );
            }
        }
        for (path, item) in paths {
            assert!(routes.contains(path), "{path} is documented but not routed");
            for (method, operation) in item.as_object().unwrap() {
                assert_operation_has_a_schema(path, method, operation);
            }
        }
        broker.shutdown().await;
    }

    /// An operation answers a success with a schema, and every error it
    /// lists with the shared error body.
    fn assert_operation_has_a_schema(path: &str, method: &str, operation: &Value) {
        let responses = operation["responses"].as_object().unwrap();
        let success = responses
            .iter()
            .find(|(status, _)| status.starts_with('2'))
            .unwrap_or_else(|| panic!("{method} {path} has no success response"));
        let content = success.1["content"].as_object().unwrap();
        assert!(
            content.values().all(|media| media["schema"].is_object()),
            "{method} {path}: {content:?}"
        );
        for (status, response) in responses.iter().filter(|(s, _)| !s.starts_with('2')) {
            assert_eq!(
                response["content"]["application/json"]["schema"]["$ref"],
                "#/components/schemas/ErrorBody",
                "{method} {path} {status}"
            );
        }
    }

    #[tokio::test]
    async fn every_reference_in_the_document_resolves_and_money_is_in_micro_units() {
        let dir = tempfile::tempdir().unwrap();
        let (broker, _) = broker(dir.path()).await;
        let text = reqwest::get(format!("{}/openapi.json", broker.url()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let document: Value = serde_json::from_str(&text).unwrap();
        let schemas = document["components"]["schemas"].as_object().unwrap();
        assert!(schemas.contains_key("ErrorBody") && schemas.contains_key("LeaseView"));
        for piece in text.split("\"#/components/schemas/").skip(1) {
            let name = piece.split('"').next().unwrap();
            assert!(
                schemas.contains_key(name),
                "{name} is referenced but not defined"
            );
        }
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
