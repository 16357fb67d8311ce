//! Plumbing shared by the broker and the agent: the injected clock, the JSON
//! body extractor that names the offending field, the error response shape,
//! and header helpers. Each service keeps its own error enum and maps it to
//! an [`ErrorResponse`] in one place.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use leasehold_api::{
    ErrorBody, ErrorDetail, IDEMPOTENCY_HEADER, MAX_IDEMPOTENCY_KEY_LEN, MAX_REQUEST_BODY_BYTES,
};
use serde::de::DeserializeOwned;
use std::sync::Arc;

/// The time source. Services take one so tests and simulations can drive time.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

pub type SharedClock = Arc<dyn Clock>;

/// An error on the wire: a status and the body every client understands.
#[derive(Debug)]
pub struct ErrorResponse {
    pub status: StatusCode,
    /// Boxed so that `Result<_, ErrorResponse>` stays small on the happy path.
    pub detail: Box<ErrorDetail>,
}

impl ErrorResponse {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ErrorResponse {
            status,
            detail: Box::new(ErrorDetail {
                code: code.to_string(),
                message: message.into(),
                field: None,
                key_rejection: None,
                explanation: None,
            }),
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.detail.field = Some(field.into());
        self
    }

    pub fn invalid_field(error: &leasehold_core::FieldError) -> Self {
        ErrorResponse::new(StatusCode::BAD_REQUEST, "invalid_field", error.to_string())
            .with_field(error.field.clone())
    }
}

impl IntoResponse for ErrorResponse {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = %self.detail.code, message = %self.detail.message, "request failed");
        }
        (
            self.status,
            axum::Json(ErrorBody {
                error: *self.detail,
            }),
        )
            .into_response()
    }
}

/// A JSON body, read with a size limit and decoded so that an error names
/// the path of the field at fault (`terms.vcpus: invalid type ...`).
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ErrorResponse;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(request, state).await.map_err(|rejection| {
            ErrorResponse::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_unreadable",
                format!("cannot read the request body (at most {MAX_REQUEST_BODY_BYTES} bytes): {rejection}"),
            )
        })?;
        decode_json(&bytes).map(JsonBody)
    }
}

/// Decodes JSON, naming the field at fault on error.
pub fn decode_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ErrorResponse> {
    let text = if bytes.is_empty() {
        &b"null"[..]
    } else {
        bytes
    };
    let mut deserializer = serde_json::Deserializer::from_slice(text);
    let result: Result<T, _> = serde_path_to_error::deserialize(&mut deserializer);
    match result {
        Ok(value) => match deserializer.end() {
            Ok(()) => Ok(value),
            Err(error) => Err(ErrorResponse::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!("body: trailing characters after the JSON document: {error}"),
            )
            .with_field("body")),
        },
        Err(error) => {
            let path = error.path().to_string();
            let inner = error.into_inner();
            let message = inner.to_string();
            if inner.is_syntax() || inner.is_eof() {
                // Broken JSON has no field to blame: name the body.
                return Err(ErrorResponse::new(
                    StatusCode::BAD_REQUEST,
                    "malformed_json",
                    format!("body: the request body is not valid JSON: {message}"),
                )
                .with_field("body"));
            }
            // A missing field is reported at its parent; name the field itself.
            let field = match (message.strip_prefix("missing field `"), path.as_str()) {
                (Some(rest), parent) => {
                    let name = rest.split('`').next().unwrap_or("");
                    if parent == "." || parent.is_empty() {
                        name.to_string()
                    } else {
                        format!("{parent}.{name}")
                    }
                }
                (None, ".") => "body".to_string(),
                // A key with an empty name ends the path in an empty segment
                // ("" or "terms."): name the object holding it instead.
                (None, path) if message.starts_with("unknown field ``") => path
                    .strip_suffix('.')
                    .filter(|parent| !parent.is_empty())
                    .unwrap_or("body")
                    .to_string(),
                (None, path) => path.to_string(),
            };
            Err(ErrorResponse::new(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                format!("{field}: {message}"),
            )
            .with_field(field))
        }
    }
}

/// The bearer token of a request, if any.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// The idempotency key of a request, checked for length and characters.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ErrorResponse> {
    let Some(value) = headers.get(IDEMPOTENCY_HEADER) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("");
    let ok = !text.is_empty()
        && text.len() <= MAX_IDEMPOTENCY_KEY_LEN
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !ok {
        return Err(ErrorResponse::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            format!("{IDEMPOTENCY_HEADER}: must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters of letters, digits, '-' or '_'"),
        )
        .with_field(IDEMPOTENCY_HEADER));
    }
    Ok(Some(text.to_string()))
}

/// The answer to a path no route serves.
pub async fn not_found_fallback(uri: axum::http::Uri) -> ErrorResponse {
    ErrorResponse::new(
        StatusCode::NOT_FOUND,
        "no_such_route",
        format!("no route for {}", uri.path()),
    )
}

/// A running HTTP server: it stops on Ctrl-C / SIGTERM or [`ServerHandle::shutdown`].
pub struct ServerHandle {
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    shutdown: tokio::sync::watch::Sender<bool>,
}

impl ServerHandle {
    /// Serves `router` on `listener` in a background task.
    pub fn spawn(listener: tokio::net::TcpListener, router: axum::Router) -> Self {
        let (shutdown, mut shutdown_rx) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    tokio::select! {
                        _ = shutdown_signal() => {},
                        _ = shutdown_rx.changed() => {},
                    }
                })
                .await
        });
        ServerHandle { server, shutdown }
    }

    /// Stops accepting requests and waits for the server to finish.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.server.await;
    }

    /// Waits until the server stops.
    pub async fn wait(self) -> std::io::Result<()> {
        match self.server.await {
            Ok(result) => result,
            Err(error) => Err(std::io::Error::other(error)),
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM, for graceful shutdown.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        terms: Inner,
    }

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Inner {
        vcpus: u32,
        price: u64,
    }

    #[test]
    fn decode_names_the_field() {
        let check = |body: &str, code: &str, field: &str| {
            let error = decode_json::<Outer>(body.as_bytes()).unwrap_err();
            assert_eq!(error.detail.code, code, "{body}");
            assert_eq!(error.detail.field.as_deref(), Some(field), "{body}");
            assert_eq!(error.status, StatusCode::BAD_REQUEST);
        };
        check(
            r#"{"terms": {"vcpus": -1, "price": 1}}"#,
            "invalid_field",
            "terms.vcpus",
        );
        check(r#"{"terms": {"vcpus": 1}}"#, "invalid_field", "terms.price");
        check(
            r#"{"terms": {"vcpus": 1, "price": 99999999999999999999999}}"#,
            "invalid_field",
            "terms.price",
        );
        check(r#"{}"#, "invalid_field", "terms");
        check(r#"{"terms": "#, "malformed_json", "body");
        check(
            r#"{"terms": {"vcpus": 1, "price": 1}, "extra": 1}"#,
            "invalid_field",
            "extra",
        );
        check(r#""#, "invalid_field", "body");
    }

    /// Found by the `request_bodies` fuzz target: a key with an empty name
    /// was refused with an empty `field`, which names nothing.
    #[test]
    fn an_unknown_field_with_an_empty_name_names_its_object() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Strict {
            #[serde(default)]
            inner: Option<StrictInner>,
        }
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct StrictInner {
            #[serde(default)]
            vcpus: u32,
        }
        for (body, field) in [
            (r#"{"": 1}"#, "body"),
            (r#"{"inner": {"": 1}}"#, "inner"),
            (r#"{"inner": {"vcpus": 1, "": 1}}"#, "inner"),
        ] {
            let error = decode_json::<Strict>(body.as_bytes()).unwrap_err();
            assert_eq!(error.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(error.detail.field.as_deref(), Some(field), "{body}");
            assert!(
                error
                    .detail
                    .message
                    .starts_with(&format!("{field}: unknown field ``")),
                "{body}: {}",
                error.detail.message
            );
        }
    }
}
