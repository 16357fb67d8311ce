//! Plumbing shared by the broker and the agent: the injected clock, the JSON
//! body extractor that names the offending field, the error response shape,
//! and header helpers. Each service keeps its own error enum and maps it to
//! an [`ErrorResponse`] in one place.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use leasehold_api::{ErrorBody, ErrorDetail, IDEMPOTENCY_HEADER, MAX_IDEMPOTENCY_KEY_LEN};
use serde::de::DeserializeOwned;
use std::sync::Arc;

pub mod http_metrics;
pub mod openapi;
pub mod tls;
pub use tls::{ServerTls, TlsError};

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

/// A clock that moves only when told to: tests and the simulation advance it
/// instead of sleeping or setting a zero TTL. Clones share the same time.
#[derive(Debug, Clone)]
pub struct SimulatedClock {
    now_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl SimulatedClock {
    /// A clock that reads `start_ms` until advanced.
    pub fn starting_at(start_ms: u64) -> Self {
        SimulatedClock {
            now_ms: Arc::new(std::sync::atomic::AtomicU64::new(start_ms)),
        }
    }

    /// Moves the time forward by `by_ms` (never backwards) and returns the new time.
    pub fn advance_ms(&self, by_ms: u64) -> u64 {
        self.now_ms
            .fetch_add(by_ms, std::sync::atomic::Ordering::SeqCst)
            .saturating_add(by_ms)
    }

    /// This clock as the `SharedClock` services take.
    pub fn shared(&self) -> SharedClock {
        Arc::new(self.clone())
    }
}

impl Clock for SimulatedClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A clock whose time is a number of milliseconds in a file, for end-to-end
/// tests that run the real binary as separate processes and must move its
/// time (`leasehold broker|agent|up --simulated-clock-file FILE`, hidden from
/// `--help`). The file must be ours and private (0600): whoever can write it
/// sets the time keys expire by. It is read on every call (a test writes it
/// with an atomic rename), and the time never goes backwards: a read that
/// fails or goes back keeps the latest time seen.
#[derive(Debug)]
pub struct FileClock {
    path: std::path::PathBuf,
    latest_ms: std::sync::atomic::AtomicU64,
}

impl FileClock {
    /// Opens the clock at `path`, refusing a file that is missing, not
    /// private or does not hold a number of milliseconds.
    pub fn open(
        path: &std::path::Path,
    ) -> Result<Self, leasehold_store::private_fs::PrivateFsError> {
        let start_ms = read_clock_file(path)?;
        Ok(FileClock {
            path: path.to_path_buf(),
            latest_ms: std::sync::atomic::AtomicU64::new(start_ms),
        })
    }
}

/// The milliseconds written in a private clock file.
fn read_clock_file(
    path: &std::path::Path,
) -> Result<u64, leasehold_store::private_fs::PrivateFsError> {
    let text = leasehold_store::private_fs::read_private_file(path)?;
    text.parse::<u64>()
        .map_err(|_| leasehold_store::private_fs::PrivateFsError::Io {
            path: path.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "a clock file holds milliseconds since 1970 (digits only), not '{}'",
                    text.chars().take(40).collect::<String>()
                ),
            ),
        })
}

impl Clock for FileClock {
    fn now_ms(&self) -> u64 {
        use std::sync::atomic::Ordering;
        match read_clock_file(&self.path) {
            Ok(read_ms) => self
                .latest_ms
                .fetch_max(read_ms, Ordering::SeqCst)
                .max(read_ms),
            Err(error) => {
                tracing::warn!(%error, "cannot read the simulated clock; keeping its last time");
                self.latest_ms.load(Ordering::SeqCst)
            }
        }
    }
}

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

/// A query string decoded into `T`, or 400 in the one error body naming the
/// parameter at fault (axum's own `Query` answers plain text).
pub struct QueryParams<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for QueryParams<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ErrorResponse;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|query| QueryParams(query.0))
            .map_err(|rejection| query_error(&rejection.body_text()))
    }
}

/// axum words a bad query as `Failed to deserialize query string:
/// PARAMETER: PROBLEM` (the parameter's path from serde_path_to_error).
fn query_error(text: &str) -> ErrorResponse {
    let detail = text
        .strip_prefix("Failed to deserialize query string: ")
        .unwrap_or(text);
    match detail.split_once(": ") {
        Some((field, problem)) if !field.is_empty() && !field.contains(' ') => {
            ErrorResponse::invalid_field(&leasehold_core::FieldError::new(field, problem))
        }
        _ => ErrorResponse::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            format!("query string: {detail}"),
        ),
    }
}

/// A JSON object body: refused with 415 unless `Content-Type` is JSON,
/// read with the route's size limit, refused with 400 unless it is a JSON
/// object, and decoded so that an error names the path of the field at
/// fault (`terms.vcpus: invalid type ...`).
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ErrorResponse;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        // Checked before the body is read: a wrong type costs no buffering.
        require_json_content_type(request.headers())?;
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(body_read_error)?;
        require_json_object(&bytes)?;
        decode_json(&bytes).map(JsonBody)
    }
}

/// 415 unless the request says its body is JSON (`application/json`,
/// parameters such as `charset` allowed, or a `+json` type).
pub fn require_json_content_type(headers: &HeaderMap) -> Result<(), ErrorResponse> {
    let value = headers
        .get(axum::http::header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let media_type = value
        .as_deref()
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    let is_json = media_type.as_deref().is_some_and(|t| {
        t == "application/json" || (t.starts_with("application/") && t.ends_with("+json"))
    });
    if is_json {
        return Ok(());
    }
    let got = match value {
        Some(value) => format!("got '{}'", value.chars().take(100).collect::<String>()),
        None => "the header is missing".to_string(),
    };
    Err(ErrorResponse::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!("Content-Type: must be application/json; {got}"),
    )
    .with_field("Content-Type"))
}

/// 400 unless the body's top-level JSON value is an object: arrays,
/// `null`, numbers, strings and an empty body are refused by name rather
/// than reported as a missing field.
pub fn require_json_object(bytes: &[u8]) -> Result<(), ErrorResponse> {
    let first = bytes
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    if first == Some(&b'{') {
        return Ok(());
    }
    let found = match first {
        None => "it is empty",
        Some(b'[') => "it is an array",
        Some(b'n') => "it is null",
        Some(b'"') => "it is a string",
        Some(b't' | b'f') => "it is a boolean",
        Some(b'-' | b'0'..=b'9') => "it is a number",
        Some(_) => "it is not JSON",
    };
    Err(ErrorResponse::new(
        StatusCode::BAD_REQUEST,
        "invalid_body",
        format!("body: the body must be a JSON object; {found}"),
    )
    .with_field("body"))
}

/// A body that could not be read: too large (413), or too slow or broken
/// off (408; the body read timeout ends a stalled upload).
fn body_read_error(rejection: axum::extract::rejection::BytesRejection) -> ErrorResponse {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ErrorResponse::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("body: larger than this route accepts: {rejection}"),
        )
        .with_field("body");
    }
    ErrorResponse::new(
        StatusCode::REQUEST_TIMEOUT,
        "body_unreadable",
        format!("body: not received in time or broken off: {rejection}"),
    )
    .with_field("body")
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

/// The bounds every server keeps, whoever connects: an anonymous client
/// can hold at most a connection slot, for at most a header timeout, with
/// at most one read buffer.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Connections served at once; more wait in the kernel's accept queue.
    /// Also capped at half the process's open-file limit.
    pub max_connections: usize,
    /// Time to send a request's headers, counted from the moment the server
    /// waits for them; on a kept-alive connection this is the idle timeout.
    pub header_read_timeout: std::time::Duration,
    /// The longest wait for the next piece of a request body.
    pub body_read_timeout: std::time::Duration,
    /// The connection's read buffer, and so the largest request head.
    pub max_buffer_bytes: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_connections: 8192,
            header_read_timeout: std::time::Duration::from_secs(10),
            body_read_timeout: std::time::Duration::from_secs(10),
            max_buffer_bytes: 64 * 1024,
        }
    }
}

/// A running HTTP server: it stops on Ctrl-C / SIGTERM or [`ServerHandle::shutdown`].
pub struct ServerHandle {
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    shutdown: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
}

/// Stops a server from elsewhere (e.g. a broker that lost its leadership).
#[derive(Clone)]
pub struct ServerStopper(std::sync::Arc<tokio::sync::watch::Sender<bool>>);

impl ServerStopper {
    pub fn stop(&self) {
        let _ = self.0.send(true);
    }
}

impl ServerHandle {
    /// Serves `router` on `listener` in a background task, with the default limits.
    pub fn spawn(listener: tokio::net::TcpListener, router: axum::Router) -> Self {
        Self::spawn_with_limits(listener, router, ServeLimits::default())
    }

    /// Serves `router` on `listener` in a background task, within `limits`.
    pub fn spawn_with_limits(
        listener: tokio::net::TcpListener,
        router: axum::Router,
        limits: ServeLimits,
    ) -> Self {
        Self::spawn_with_tls(listener, router, limits, None)
    }

    /// Serves `router` on `listener` within `limits`, over TLS when `tls`
    /// is given (the handshake is bounded by the header timeout).
    pub fn spawn_with_tls(
        listener: tokio::net::TcpListener,
        router: axum::Router,
        limits: ServeLimits,
        tls: Option<ServerTls>,
    ) -> Self {
        let (shutdown, mut shutdown_rx) = tokio::sync::watch::channel(false);
        // Registered now, not when the task first runs: a Ctrl-C that comes
        // right after the ready line must stop the server, not kill it.
        let signalled = registered_shutdown_signal();
        let stop = async move {
            tokio::select! {
                _ = signalled => {},
                _ = shutdown_rx.changed() => {},
            }
        };
        let router = limited_router(router, &limits);
        let server = tokio::spawn(serve_connections(listener, router, limits, tls, stop));
        ServerHandle {
            server,
            shutdown: std::sync::Arc::new(shutdown),
        }
    }

    /// A handle that stops this server, for a task that outlives `&self`.
    pub fn stopper(&self) -> ServerStopper {
        ServerStopper(self.shutdown.clone())
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

/// `router` with the body read timeout of `limits` (a tokio timer, reset by
/// every piece of the body that arrives).
fn limited_router(router: axum::Router, limits: &ServeLimits) -> axum::Router {
    router.layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
        limits.body_read_timeout,
    ))
}

/// hyper's HTTP/1 settings within `limits`: the header read timeout (also
/// the keep-alive idle timeout) runs on tokio's timer, so tests move it with
/// tokio's paused time.
fn http1_builder(limits: &ServeLimits) -> hyper::server::conn::http1::Builder {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_buffer_bytes.max(8192))
        .keep_alive(true);
    http
}

/// One connection served by `router` with `http`'s settings, over any byte
/// stream (a TCP or TLS stream here, an in-memory pipe in tests).
fn http1_connection<IO>(
    io: IO,
    http: &hyper::server::conn::http1::Builder,
    router: axum::Router,
) -> hyper::server::conn::http1::Connection<
    hyper_util::rt::TokioIo<IO>,
    hyper_util::service::TowerToHyperService<axum::Router>,
>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(router);
    http.serve_connection(hyper_util::rt::TokioIo::new(io), service)
}

/// The accept loop: a connection is accepted only when a slot is free, each
/// is served by hyper with a header timeout and a bounded buffer, and at
/// `stop` the open connections finish their requests and close.
async fn serve_connections(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    limits: ServeLimits,
    tls: Option<ServerTls>,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(connection_slots(&limits)));
    let http = http1_builder(&limits);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // Handshakes in progress end at `stop` too: they are not connections
    // hyper could close gracefully, and must not hold the shutdown up.
    let (stop_handshakes, handshakes_stopped) = tokio::sync::watch::channel(false);
    tokio::pin!(stop);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.map_err(std::io::Error::other)?,
            _ = &mut stop => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    accept_failed(error).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let (http, watcher, tls) = (http.clone(), graceful.watcher(), tls.clone());
        let mut handshakes_stopped = handshakes_stopped.clone();
        tokio::spawn(async move {
            // Timeouts and hang-ups end here; they are the client's business.
            match tls {
                None => {
                    let _ = watcher.watch(http1_connection(stream, &http, router)).await;
                }
                Some(tls) => {
                    let accepted = tokio::select! {
                        accepted = tls.accept(stream, limits.header_read_timeout) => accepted,
                        _ = handshakes_stopped.changed() => None,
                    };
                    if let Some(stream) = accepted {
                        let _ = watcher.watch(http1_connection(stream, &http, router)).await;
                    }
                }
            }
            drop(slot);
        });
    }
    drop(listener);
    let _ = stop_handshakes.send(true);
    graceful.shutdown().await;
    Ok(())
}

/// Accept fails when the process is out of file descriptors or the peer
/// left before it was accepted; back off briefly instead of spinning.
async fn accept_failed(error: std::io::Error) {
    tracing::warn!(%error, "accepting a connection failed");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
}

/// The connection cap: the configured one, but at most half the open-file
/// limit (raised to its hard limit first) so the rest of the process keeps
/// descriptors for its database, children and outgoing calls.
fn connection_slots(limits: &ServeLimits) -> usize {
    let open_files = raise_open_files_limit();
    limits.max_connections.min((open_files / 2) as usize).max(1)
}

/// Raises this process's soft limit of open files to its hard limit and
/// returns the soft limit now in force.
#[allow(unsafe_code)]
pub fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

/// Registers for Ctrl-C and SIGTERM at once (so a signal that arrives
/// before the returned future is first polled is not lost to the default
/// action) and resolves when one arrives.
#[cfg(unix)]
pub fn registered_shutdown_signal() -> impl std::future::Future<Output = ()> + Send {
    use tokio::signal::unix::{signal, SignalKind};
    let interrupt = signal(SignalKind::interrupt()).ok();
    let terminate = signal(SignalKind::terminate()).ok();
    async move {
        let wait = |stream: Option<tokio::signal::unix::Signal>| async move {
            match stream {
                Some(mut stream) => {
                    stream.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = wait(interrupt) => {},
            _ = wait(terminate) => {},
        }
    }
}

#[cfg(not(unix))]
pub fn registered_shutdown_signal() -> impl std::future::Future<Output = ()> + Send {
    shutdown_signal()
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

    #[test]
    fn a_simulated_clock_moves_only_when_advanced_and_its_clones_move_with_it() {
        let clock = SimulatedClock::starting_at(1_000);
        let shared = clock.shared();
        assert_eq!(shared.now_ms(), 1_000);
        assert_eq!(shared.now_ms(), 1_000, "no time passes by itself");
        assert_eq!(clock.advance_ms(250), 1_250);
        assert_eq!(shared.now_ms(), 1_250);
    }

    #[test]
    fn a_file_clock_reads_its_private_file_and_never_goes_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clock");
        let set = |ms: &str| {
            leasehold_store::private_fs::write_private_file(&path, ms.as_bytes()).unwrap()
        };
        set("1700000000000\n");
        let clock = FileClock::open(&path).unwrap();
        assert_eq!(clock.now_ms(), 1_700_000_000_000);
        set("1700000090000");
        assert_eq!(
            clock.now_ms(),
            1_700_000_090_000,
            "a new time is read at once"
        );
        set("1000");
        assert_eq!(clock.now_ms(), 1_700_000_090_000, "never backwards");
        set("soon");
        assert_eq!(
            clock.now_ms(),
            1_700_000_090_000,
            "junk keeps the last time"
        );
        let refused = FileClock::open(&path).unwrap_err().to_string();
        assert!(refused.contains("milliseconds"), "{refused}");
        set("5");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let refused = FileClock::open(&path).unwrap_err().to_string();
        assert!(refused.contains("chmod 600"), "{refused}");
        let missing = FileClock::open(&dir.path().join("none"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("no such file"), "{missing}");
    }

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

    #[test]
    fn only_json_content_types_are_read() {
        let check = |value: Option<&str>, accepted: bool| {
            let mut headers = HeaderMap::new();
            if let Some(value) = value {
                headers.insert(axum::http::header::CONTENT_TYPE, value.parse().unwrap());
            }
            match require_json_content_type(&headers) {
                Ok(()) => assert!(accepted, "{value:?} was accepted"),
                Err(error) => {
                    assert!(!accepted, "{value:?} was refused");
                    assert_eq!(error.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
                    assert_eq!(error.detail.field.as_deref(), Some("Content-Type"));
                }
            }
        };
        check(Some("application/json"), true);
        check(Some("Application/JSON; charset=utf-8"), true);
        check(Some("application/merge-patch+json"), true);
        check(Some("text/plain"), false);
        check(Some("application/x-www-form-urlencoded"), false);
        check(Some("application/jsonx"), false);
        check(None, false);
    }

    #[test]
    fn only_json_objects_are_decoded() {
        let check = |body: &str, problem: &str| {
            let error = require_json_object(body.as_bytes()).unwrap_err();
            assert_eq!(error.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(error.detail.field.as_deref(), Some("body"), "{body}");
            assert!(
                error.detail.message.contains("must be a JSON object")
                    && error.detail.message.contains(problem),
                "{body}: {}",
                error.detail.message
            );
        };
        check("[]", "array");
        check(" \n[{}]", "array");
        check("null", "null");
        check("42", "number");
        check("\"x\"", "string");
        check("true", "boolean");
        check("", "empty");
        check("  ", "empty");
        assert!(require_json_object(b" {\"a\": 1}").is_ok());
    }

    /// A server on 127.0.0.1:0 answering `GET /` with "ok", within `limits`.
    async fn serve_ok(limits: ServeLimits) -> (ServerHandle, std::net::SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        (
            ServerHandle::spawn_with_limits(listener, router, limits),
            address,
        )
    }

    /// Reads until the server closes the connection; fails after `deadline`.
    async fn read_until_closed(
        stream: &mut tokio::net::TcpStream,
        deadline: std::time::Duration,
    ) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut received = Vec::new();
        tokio::time::timeout(deadline, stream.read_to_end(&mut received))
            .await
            .expect("the server closed the connection in time")
            .ok();
        received
    }

    /// One connection served as production serves it (`http1_builder`,
    /// `limited_router`), over an in-memory pipe: with no socket in between,
    /// tokio's paused time moves only when every task waits, so timeouts
    /// fire exactly when due. Returns the client's end.
    fn serve_in_memory(limits: ServeLimits, router: axum::Router) -> tokio::io::DuplexStream {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let connection = http1_connection(
            server,
            &http1_builder(&limits),
            limited_router(router, &limits),
        );
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    fn ok_router() -> axum::Router {
        axum::Router::new().route("/", axum::routing::get(|| async { "ok" }))
    }

    /// True when nothing arrives and the server does not close for `window`.
    async fn stays_silent_and_open(
        stream: &mut tokio::io::DuplexStream,
        window: std::time::Duration,
    ) -> bool {
        use tokio::io::AsyncReadExt;
        let mut byte = [0u8; 1];
        tokio::time::timeout(window, stream.read(&mut byte))
            .await
            .is_err()
    }

    /// Reads an answer's head (up to the blank line).
    async fn answer_head(stream: &mut tokio::io::DuplexStream) -> String {
        use tokio::io::AsyncReadExt;
        let mut received = Vec::new();
        let mut byte = [0u8; 1];
        while !received.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte).await {
                Ok(1) => received.push(byte[0]),
                _ => break,
            }
        }
        String::from_utf8_lossy(&received).into_owned()
    }

    /// Waits until the server closes `stream`; the time that took.
    async fn time_until_closed(stream: &mut tokio::io::DuplexStream) -> std::time::Duration {
        use tokio::io::AsyncReadExt;
        let started = tokio::time::Instant::now();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
        started.elapsed()
    }

    const ONE_MS: std::time::Duration = std::time::Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_exactly_at_the_header_timeout() {
        let limits = ServeLimits::default();
        let mut client = serve_in_memory(limits, ok_router());
        // Never sends a byte: open until the timeout, closed at it.
        let window = limits.header_read_timeout - ONE_MS;
        assert!(stays_silent_and_open(&mut client, window).await);
        assert_eq!(time_until_closed(&mut client).await, ONE_MS);
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_alive_connection_idles_for_the_header_timeout_then_closes() {
        use tokio::io::AsyncWriteExt;
        let limits = ServeLimits::default();
        let mut client = serve_in_memory(limits, ok_router());
        let window = limits.header_read_timeout - ONE_MS;
        for request in 0..2 {
            // Headers sent 1 ms before the timeout are read and answered.
            assert!(
                stays_silent_and_open(&mut client, window).await,
                "request {request}"
            );
            client
                .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            let head = answer_head(&mut client).await;
            assert!(
                head.starts_with("HTTP/1.1 200"),
                "request {request}: {head}"
            );
            let mut body = [0u8; 2];
            tokio::io::AsyncReadExt::read_exact(&mut client, &mut body)
                .await
                .unwrap();
            assert_eq!(&body, b"ok");
        }
        // Idle after an answer: closed one header timeout later, not sooner.
        assert_eq!(
            time_until_closed(&mut client).await,
            limits.header_read_timeout
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_is_answered_408_exactly_at_the_body_timeout() {
        use tokio::io::AsyncWriteExt;
        let router = axum::Router::new().route(
            "/",
            axum::routing::post(|JsonBody(_): JsonBody<serde_json::Value>| async { "read" }),
        );
        let limits = ServeLimits::default();
        let mut client = serve_in_memory(limits, router);
        // Ten bytes of a declared hundred, then nothing.
        client
            .write_all(
                b"POST / HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"a\": 1,  ",
            )
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let window = limits.body_read_timeout - ONE_MS;
        assert!(stays_silent_and_open(&mut client, window).await);
        let head = answer_head(&mut client).await;
        assert_eq!(started.elapsed(), limits.body_read_timeout);
        assert!(head.starts_with("HTTP/1.1 408"), "{head}");
        let mut rest = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut client, &mut rest).await;
        let rest = String::from_utf8_lossy(&rest);
        assert!(rest.contains("body_unreadable"), "{rest}");
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_wait_for_a_free_slot() {
        use tokio::io::AsyncWriteExt;
        let limits = ServeLimits {
            max_connections: 1,
            header_read_timeout: std::time::Duration::from_secs(60),
            ..ServeLimits::default()
        };
        let (server, address) = serve_ok(limits).await;
        let mut first = tokio::net::TcpStream::connect(address).await.unwrap();
        first
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        use tokio::io::AsyncReadExt;
        let mut answer = [0u8; 12];
        first.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 200");
        // The first connection holds the only slot (kept alive): the second
        // is not served while it lasts...
        let mut second = tokio::net::TcpStream::connect(address).await.unwrap();
        second
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut byte = [0u8; 1];
        let waited = tokio::time::timeout(
            std::time::Duration::from_millis(300),
            second.read(&mut byte),
        )
        .await;
        assert!(waited.is_err(), "served beyond the cap");
        // ...and is served as soon as the first goes.
        drop(first);
        let received = read_until_closed(&mut second, std::time::Duration::from_secs(10)).await;
        assert!(
            String::from_utf8_lossy(&received).starts_with("HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&received)
        );
        server.shutdown().await;
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

    #[tokio::test]
    async fn a_bad_query_parameter_is_a_json_400_naming_it() {
        use axum::extract::FromRequestParts;
        #[derive(serde::Deserialize, Debug)]
        struct Page {
            #[allow(dead_code)]
            limit: Option<u32>,
        }
        let parse = |uri: &str| {
            let (mut parts, _) = axum::http::Request::get(uri).body(()).unwrap().into_parts();
            async move { QueryParams::<Page>::from_request_parts(&mut parts, &()).await }
        };
        assert!(parse("/v1/leases?limit=10").await.is_ok());
        let error = parse("/v1/leases?limit=-3").await.err().unwrap();
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert_eq!(error.detail.field.as_deref(), Some("limit"));
        assert!(
            error.detail.message.starts_with("limit: "),
            "{}",
            error.detail.message
        );
        let error = parse("/v1/leases?limit=1&limit=2").await.err().unwrap();
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert!(
            error.detail.message.contains("limit"),
            "{}",
            error.detail.message
        );
    }
}
