//! What the OpenAPI documents of the broker and the agent share: the
//! bearer scheme, error responses with the one error body, and the
//! `/openapi.json` operation. Each server's document is generated from its
//! handlers' `#[utoipa::path]` attributes (see their `openapi` modules).

use axum::response::{IntoResponse, Response};
use axum::Extension;
use std::sync::Arc;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};

/// Adds the `bearer` security scheme the operations refer to.
pub struct BearerScheme;

impl utoipa::Modify for BearerScheme {
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

/// One error status answered with the shared error body (`ErrorBody`,
/// which the document must list in its components).
pub fn error_response(
    status: &str,
    description: &str,
) -> (String, RefOr<utoipa::openapi::Response>) {
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
/// lists the errors it can answer in one word each:
/// `responses((status = 200, body = X), AuthErrors, NotFound)`.
#[macro_export]
macro_rules! error_responses {
    ($($(#[$doc:meta])* $name:ident => [$(($status:literal, $description:literal)),+ $(,)?];)+) => {$(
        $(#[$doc])*
        pub(crate) struct $name;
        impl utoipa::IntoResponses for $name {
            fn responses() -> std::collections::BTreeMap<
                String,
                utoipa::openapi::RefOr<utoipa::openapi::Response>,
            > {
                [$($crate::openapi::error_response($status, $description)),+]
                    .into_iter()
                    .collect()
            }
        }
    )+};
}

/// The document as served, made once when the router is built.
#[derive(Clone)]
pub struct DocumentJson(pub Arc<str>);

impl DocumentJson {
    /// The document with the crate's version, as JSON.
    pub fn new(mut document: utoipa::openapi::OpenApi, version: &str) -> DocumentJson {
        document.info.version = version.to_string();
        let json = document
            .to_pretty_json()
            .expect("an OpenAPI document always serializes");
        DocumentJson(json.into())
    }
}

/// This document (the router adds the `DocumentJson` as an extension).
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    security(()),
    responses((status = 200, description = "This OpenAPI 3.1 document", body = Object))
)]
pub async fn serve_document(Extension(document): Extension<DocumentJson>) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        document.0.to_string(),
    )
        .into_response()
}

/// The (method, path) pairs a router serves, read from its routing table:
/// axum's `Debug` of a router lists each route's method router (with the
/// `Allow` header it answers a 405 with) and its path by route id; the
/// fallback's own catch-all routes come after them. For the tests that
/// hold a router against its document: they fail loudly should axum's
/// `Debug` change, since they then find no routes. `HEAD`, which axum
/// answers wherever there is a `GET`, is left out.
pub fn router_operations<S>(
    router: &axum::Router<S>,
) -> std::collections::BTreeSet<(String, String)> {
    let text = format!("{router:?}");
    let routed = text
        .split_once("fallback_router")
        .map_or(&*text, |(r, _)| r);
    let mut paths = std::collections::BTreeMap::new();
    let mut methods = std::collections::BTreeMap::new();
    for piece in routed.split("RouteId(").skip(1) {
        let Some((id, rest)) = piece.split_once("): ") else {
            continue;
        };
        if let Some(path) = rest.strip_prefix('"') {
            paths.insert(
                id.to_string(),
                path.split('"').next().unwrap_or("").to_string(),
            );
        } else if let Some((_, allow)) = rest.split_once("allow_header: Bytes(b\"") {
            let allow = allow.split('"').next().unwrap_or("");
            methods.insert(id.to_string(), allow.to_string());
        }
    }
    let mut operations = std::collections::BTreeSet::new();
    for (id, path) in paths {
        for method in methods.get(&id).map_or("", |m| m.as_str()).split(',') {
            if !method.is_empty() && method != "HEAD" {
                operations.insert((method.to_string(), path.clone()));
            }
        }
    }
    operations
}

/// The (method, path) pairs of a document's operations, methods upper case.
pub fn document_operations(
    document: &serde_json::Value,
) -> std::collections::BTreeSet<(String, String)> {
    let empty = serde_json::Map::new();
    let mut operations = std::collections::BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap_or(&empty) {
        for method in item.as_object().unwrap_or(&empty).keys() {
            operations.insert((method.to_uppercase(), path.clone()));
        }
    }
    operations
}

/// What is wrong with a served document: not OpenAPI 3.1, an operation
/// without a success response whose every media type has a schema, an
/// error response without the shared error body, a reference to a schema
/// it does not define. Empty when nothing is.
pub fn document_problems(document: &serde_json::Value) -> Vec<String> {
    let mut problems = Vec::new();
    if !document["openapi"]
        .as_str()
        .unwrap_or("")
        .starts_with("3.1")
    {
        problems.push(format!("openapi is {}", document["openapi"]));
    }
    let schemas = document["components"]["schemas"].as_object();
    let text = document.to_string();
    for piece in text.split("\"#/components/schemas/").skip(1) {
        let name = piece.split('"').next().unwrap_or("");
        if !schemas.is_some_and(|s| s.contains_key(name)) {
            problems.push(format!("{name} is referenced but not defined"));
        }
    }
    let empty = serde_json::Map::new();
    for (path, item) in document["paths"].as_object().unwrap_or(&empty) {
        for (method, operation) in item.as_object().unwrap_or(&empty) {
            problems.extend(operation_problems(path, method, operation));
        }
    }
    problems
}

fn operation_problems(path: &str, method: &str, operation: &serde_json::Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let responses = operation["responses"].as_object().unwrap_or(&empty);
    let mut problems = Vec::new();
    let success_has_schema = responses.iter().any(|(status, response)| {
        status.starts_with('2')
            && response["content"].as_object().is_some_and(|content| {
                !content.is_empty() && content.values().all(|media| media["schema"].is_object())
            })
    });
    if !success_has_schema {
        problems.push(format!(
            "{method} {path}: no success response with a schema"
        ));
    }
    for (status, response) in responses.iter().filter(|(s, _)| !s.starts_with('2')) {
        if response["content"]["application/json"]["schema"]["$ref"]
            != "#/components/schemas/ErrorBody"
        {
            problems.push(format!("{method} {path} {status}: not the error body"));
        }
    }
    problems
}
