//! The agent's HTTP API: the lender's interface (owner token), job
//! submission (lease key), and notices from the broker (signed).

use crate::driver::Stream;
use crate::error::AgentError;
use crate::rights::http as rights_http;
use crate::Agent;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::{Extension, Json, Router};
use leasehold_api::*;
use leasehold_core::key::{self, KeyRejection};
use leasehold_core::FieldError;
use leasehold_service::{bearer_token, ErrorResponse, JsonBody};
use std::sync::Arc;
use utoipa::OpenApi;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use crate::openapi::{AuthErrors, BodyErrors, Conflict, InvalidParameter, NotFound, Upstream};

type App = State<Arc<Agent>>;
type Answer<T> = Result<Json<T>, ErrorResponse>;

/// Lender calls and notices are small JSON documents; a job carries its
/// command (64 KiB at most, more once escaped) and keeps the 1 MiB bound.
const BODY_LIMIT_BYTES: usize = 16 * 1024;

pub(crate) fn router(agent: Arc<Agent>) -> Router {
    let (api, document) = api_router(agent.clone()).split_for_parts();
    api.layer(Extension(leasehold_service::openapi::DocumentJson::new(
        document,
        env!("CARGO_PKG_VERSION"),
    )))
    .fallback(leasehold_service::not_found_fallback)
    .layer(middleware::from_fn_with_state(
        agent.metrics.http.clone(),
        leasehold_service::http_metrics::record_http_request,
    ))
    .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES))
    .with_state(agent)
}

/// Every route of the API, each registered with its `#[utoipa::path]`
/// through `routes!`, so the router and its OpenAPI document are one.
pub(crate) fn api_router(agent: Arc<Agent>) -> OpenApiRouter<Arc<Agent>> {
    // Every route that reads a body, and every id a caller might probe,
    // authenticates first: lender routes with the lender token, job routes
    // with a lease key (checked offline) or the lender token, notices with
    // the broker's signature. 401/403 come before a byte of body is read.
    let lender = OpenApiRouter::new()
        .routes(routes!(add_partition, list_partitions))
        .routes(routes!(alter_partition, withdraw_partition))
        .route_layer(middleware::from_fn_with_state(
            agent.clone(),
            require_lender,
        ));
    let rights = rights_routes(agent.clone());
    let jobs = OpenApiRouter::new()
        .routes(routes!(submit_job).layer(DefaultBodyLimit::max(MAX_REQUEST_BODY_BYTES)))
        .route_layer(middleware::from_fn_with_state(
            agent.clone(),
            require_lease_key,
        ));
    let job_records = OpenApiRouter::new()
        .routes(routes!(get_job))
        .routes(routes!(cancel_job))
        .route_layer(middleware::from_fn_with_state(
            agent.clone(),
            require_job_bearer,
        ));
    let notices =
        OpenApiRouter::new()
            .routes(routes!(notice))
            .route_layer(middleware::from_fn_with_state(
                agent.clone(),
                require_notice,
            ));
    OpenApiRouter::with_openapi(crate::openapi::AgentApi::openapi())
        .routes(routes!(health))
        .routes(routes!(leasehold_service::openapi::serve_document))
        .routes(routes!(info))
        .routes(routes!(rights_http::sync))
        .routes(routes!(crate::openapi::metrics))
        .merge(lender)
        .merge(rights)
        .merge(jobs)
        .merge(job_records)
        .merge(notices)
        .merge(crate::direct_http::direct_routes(agent))
}

fn err(error: AgentError) -> ErrorResponse {
    error.to_error_response()
}

/// The bearer of a request that passed one of the checks below, for the
/// handler: the lender token, a verified lease key, or a verified notice.
#[derive(Clone)]
struct Bearer(String);

/// Lender routes: the agent's own credential or a token of this host's
/// lender (asked of the broker, remembered briefly), or 401.
pub(crate) async fn require_lender(
    State(agent): App,
    request: Request,
    next: Next,
) -> Result<Response, ErrorResponse> {
    let is_lender = match bearer_token(request.headers()) {
        Some(token) => agent.is_lender(token).await,
        None => false,
    };
    if is_lender {
        Ok(next.run(request).await)
    } else {
        Err(err(AgentError::Unauthorized))
    }
}

/// Seed 004's routes: the table and orders for its managers, the group's
/// members for its lender and admins, grants and revocations for admins.
fn rights_routes(agent: Arc<Agent>) -> OpenApiRouter<Arc<Agent>> {
    let managers = OpenApiRouter::new()
        .routes(routes!(rights_http::table))
        .routes(routes!(rights_http::request))
        .routes(routes!(rights_http::release))
        .routes(routes!(rights_http::transfer))
        .route_layer(middleware::from_fn_with_state(
            agent.clone(),
            require_rights_manager,
        ));
    let group = OpenApiRouter::new()
        .routes(routes!(rights_http::add_host))
        .routes(routes!(rights_http::remove_host))
        .route_layer(middleware::from_fn_with_state(
            agent.clone(),
            require_lender_or_admin,
        ));
    let rights_admin = OpenApiRouter::new()
        .routes(routes!(rights_http::grant))
        .routes(routes!(rights_http::revoke))
        .route_layer(middleware::from_fn_with_state(agent.clone(), require_admin));
    managers.merge(group).merge(rights_admin)
}

/// Usage-rights routes: this host's lender, or an admin of the broker.
async fn require_lender_or_admin(
    State(agent): App,
    request: Request,
    next: Next,
) -> Result<Response, ErrorResponse> {
    let allowed = match bearer_token(request.headers()) {
        Some(token) => agent.is_lender(token).await || agent.is_admin(token).await,
        None => false,
    };
    if allowed {
        Ok(next.run(request).await)
    } else {
        Err(err(AgentError::Unauthorized))
    }
}

/// Reading the rights table, requests, releases and transfers: this host's
/// lender, an admin, or the manager of another host of the share group
/// (its host credential: managers forward orders to the primary).
async fn require_rights_manager(
    State(agent): App,
    request: Request,
    next: Next,
) -> Result<Response, ErrorResponse> {
    let allowed = match bearer_token(request.headers()) {
        Some(token) => {
            agent.is_lender(token).await
                || agent.is_admin(token).await
                || agent.is_group_peer(token).await
        }
        None => false,
    };
    if allowed {
        Ok(next.run(request).await)
    } else {
        Err(err(AgentError::Unauthorized))
    }
}

/// Grants and revocations: an admin of the broker only.
async fn require_admin(
    State(agent): App,
    request: Request,
    next: Next,
) -> Result<Response, ErrorResponse> {
    match bearer_token(request.headers()) {
        Some(token) if agent.is_admin(token).await => Ok(next.run(request).await),
        Some(_) => Err(err(AgentError::Forbidden(
            "only an admin of the broker may grant or revoke usage rights".into(),
        ))),
        None => Err(err(AgentError::Unauthorized)),
    }
}

/// A lease key for this host, checked offline (signature, host), or 401
/// without one and 403 `key_rejected` with a bad one. The job run checks
/// the rest (partition, expiry, epoch) against the partition table.
async fn verified_lease_key(
    agent: &Agent,
    headers: &axum::http::HeaderMap,
) -> Result<String, ErrorResponse> {
    let bearer = bearer_token(headers).ok_or_else(|| err(AgentError::Unauthorized))?;
    let claims = verify_lease_key_signature(agent, bearer)
        .await
        .map_err(|rejection| err(AgentError::KeyRejected(rejection)))?;
    if claims.host_id != agent.config.host_id {
        return Err(err(AgentError::KeyRejected(KeyRejection::WrongHost)));
    }
    Ok(bearer.to_string())
}

/// The broker's signature on a lease key, with the key this agent trusts.
/// Async so that a key store that may ask the broker can stand behind it.
async fn verify_lease_key_signature(
    agent: &Agent,
    bearer: &str,
) -> Result<key::LeaseKeyClaims, KeyRejection> {
    let verified = agent.verify_lease_key(bearer).await;
    if let Err(reason) = &verified {
        agent.note_refused_key(None, reason);
    }
    verified
}

/// The broker's signature on a notice, with the key this agent trusts.
fn verify_notice_signature(agent: &Agent, bearer: &str) -> Result<key::NoticeClaims, KeyRejection> {
    agent.verify_notice(bearer)
}

/// Job submission: a lease key for this host as the bearer.
async fn require_lease_key(
    State(agent): App,
    mut request: Request,
    next: Next,
) -> Result<Response, ErrorResponse> {
    let bearer = verified_lease_key(&agent, request.headers()).await?;
    request.extensions_mut().insert(Bearer(bearer));
    Ok(next.run(request).await)
}

/// Job records: the lender token or a lease key for this host.
async fn require_job_bearer(
    State(agent): App,
    mut request: Request,
    next: Next,
) -> Result<Response, ErrorResponse> {
    let bearer = match bearer_token(request.headers()) {
        Some(token) if crate::same_secret(token, &agent.config.lender_token) => token.to_string(),
        _ => verified_lease_key(&agent, request.headers()).await?,
    };
    request.extensions_mut().insert(Bearer(bearer));
    Ok(next.run(request).await)
}

/// Notices: the notice itself, signed by the broker, as the bearer.
async fn require_notice(
    State(agent): App,
    mut request: Request,
    next: Next,
) -> Result<Response, ErrorResponse> {
    let bearer = bearer_token(request.headers()).ok_or_else(|| err(AgentError::Unauthorized))?;
    verify_notice_signature(&agent, bearer)
        .map_err(|rejection| err(AgentError::KeyRejected(rejection)))?;
    let bearer = Bearer(bearer.to_string());
    request.extensions_mut().insert(bearer);
    Ok(next.run(request).await)
}

/// A body must carry the same key or notice its bearer header was checked
/// for; otherwise the check before the body would prove nothing.
fn require_same_as_bearer(
    field: &str,
    in_body: &str,
    bearer: &Bearer,
) -> Result<(), ErrorResponse> {
    if crate::same_secret(in_body, &bearer.0) {
        return Ok(());
    }
    Err(err(AgentError::Invalid(FieldError::new(
        field,
        "must be the one sent as 'Authorization: Bearer'",
    ))))
}

fn parse_index(text: &str) -> Result<u32, ErrorResponse> {
    text.parse::<u32>().map_err(|_| {
        err(AgentError::Invalid(FieldError::new(
            "index",
            format!("'{text}' is not a partition index"),
        )))
    })
}

#[utoipa::path(get, path = "/v1/health", tag = "meta", security(()),
    responses((status = 200, description = "The agent is up", body = crate::openapi::Health)))]
async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/v1/agent", tag = "meta", security(()),
    responses((status = 200, description = "Host id, driver, bootable images, capacity, the owner's use", body = AgentInfo)))]
async fn info(State(agent): App) -> Json<AgentInfo> {
    let sampled = agent.sampler.status();
    Json(AgentInfo {
        host_id: agent.config.host_id.clone(),
        driver: agent.driver.name().to_string(),
        images: agent.driver.images(),
        capacity: agent.config.capacity.clone(),
        broker_url: agent.config.broker_url.clone(),
        // Left out if the partition table cannot be read: the rest still answers.
        owner_used: agent.owner_used_now(),
        guaranteed: sampled.guaranteed,
        sampled_at_ms: sampled.answered_at_ms,
        markets: agent.market_views(),
    })
}

#[utoipa::path(post, path = "/v1/partitions", tag = "partitions", request_body = AddPartitionRequest,
    description = "Add a lendable partition and register it with the broker (lender).",
    responses((status = 201, description = "The partition's row", body = AgentPartitionView),
        AuthErrors, BodyErrors, Conflict, Upstream))]
async fn add_partition(
    State(agent): App,
    JsonBody(request): JsonBody<AddPartitionRequest>,
) -> Result<(StatusCode, Json<AgentPartitionView>), ErrorResponse> {
    let row = agent.add_partition(request.terms).await.map_err(err)?;
    Ok((StatusCode::CREATED, Json(agent.view(&row))))
}

#[utoipa::path(get, path = "/v1/partitions", tag = "partitions",
    responses((status = 200, description = "The partition table (lender)", body = Vec<AgentPartitionView>), AuthErrors))]
async fn list_partitions(State(agent): App) -> Answer<Vec<AgentPartitionView>> {
    let rows = agent.db().partitions().map_err(|e| err(e.into()))?;
    Ok(Json(rows.iter().map(|r| agent.view(r)).collect()))
}

#[utoipa::path(put, path = "/v1/partitions/{index}", tag = "partitions", request_body = AddPartitionRequest,
    description = "Alter a partition's terms (lender); 409 `partition_locked` while leased.",
    params(("index" = u32, Path, description = "The partition's index")),
    responses((status = 200, description = "The partition's row", body = AgentPartitionView),
        AuthErrors, BodyErrors, NotFound, Conflict, Upstream))]
async fn alter_partition(
    State(agent): App,
    Path(index): Path<String>,
    JsonBody(request): JsonBody<AddPartitionRequest>,
) -> Answer<AgentPartitionView> {
    let index = parse_index(&index)?;
    let row = agent
        .alter_partition(index, request.terms)
        .await
        .map_err(err)?;
    Ok(Json(agent.view(&row)))
}

#[utoipa::path(delete, path = "/v1/partitions/{index}", tag = "partitions",
    description = "Withdraw a partition (lender); 409 `partition_locked` while leased.",
    params(("index" = u32, Path, description = "The partition's index")),
    responses((status = 200, description = "The partition's row", body = AgentPartitionView),
        AuthErrors, InvalidParameter, NotFound, Conflict, Upstream))]
async fn withdraw_partition(
    State(agent): App,
    Path(index): Path<String>,
) -> Answer<AgentPartitionView> {
    let index = parse_index(&index)?;
    let row = agent.withdraw_partition(index).await.map_err(err)?;
    Ok(Json(agent.view(&row)))
}

#[utoipa::path(post, path = "/v1/partitions/{index}/jobs", tag = "jobs", request_body = SubmitJobRequest,
    description = "Run a job with a lease key (sent as the bearer, checked before the body is read, and in the body). \
        Answers its result, or with `stream: true` newline-delimited JSON events (started, stdout, stderr, result).",
    params(("index" = u32, Path, description = "The partition's index")),
    responses((status = 200, description = "The job's result, or its events as they happen",
            content((JobResult = "application/json"), (JobEvent = "application/x-ndjson"))),
        AuthErrors, BodyErrors, NotFound, Conflict, Upstream))]
async fn submit_job(
    State(agent): App,
    Extension(bearer): Extension<Bearer>,
    Path(index): Path<String>,
    JsonBody(request): JsonBody<SubmitJobRequest>,
) -> Result<axum::response::Response, ErrorResponse> {
    use axum::response::IntoResponse;
    let index = parse_index(&index)?;
    require_same_as_bearer("lease_key", &request.lease_key, &bearer)?;
    check_job_request(&request).map_err(|problem| err(AgentError::Invalid(problem)))?;
    if request.stream {
        return stream_job(agent, index, request).await;
    }
    // In its own task: a client that hangs up must not abandon a running
    // job (its lock, its timeout, its record).
    let result = tokio::spawn(async move { agent.run_job(index, request, None, None).await })
        .await
        .map_err(|join| err(AgentError::Internal(join.to_string())))?
        .map_err(err)?;
    Ok(Json(result).into_response())
}

/// The command and timeout of a job, within their bounds.
fn check_job_request(request: &SubmitJobRequest) -> Result<(), FieldError> {
    if request.command.is_empty() || request.command[0].is_empty() {
        return Err(FieldError::new("command", "must name a program to run"));
    }
    if request.command.len() > MAX_COMMAND_ARGS {
        return Err(FieldError::new(
            "command",
            format!("at most {MAX_COMMAND_ARGS} arguments"),
        ));
    }
    let total: usize = request.command.iter().map(String::len).sum();
    if total > MAX_COMMAND_BYTES || request.command.iter().any(|a| a.contains('\0')) {
        return Err(FieldError::new(
            "command",
            format!("at most {MAX_COMMAND_BYTES} bytes in all, without NUL characters"),
        ));
    }
    if request.timeout_ms == Some(0) {
        return Err(FieldError::new("timeout_ms", "must be at least 1"));
    }
    Ok(())
}

/// Streamed: newline-delimited JSON events, live output first, the result
/// last. Errors before the job starts still get a plain 4xx.
async fn stream_job(
    agent: Arc<Agent>,
    index: u32,
    request: SubmitJobRequest,
) -> Result<axum::response::Response, ErrorResponse> {
    use axum::response::IntoResponse;
    let (output_sender, output) = tokio::sync::mpsc::channel::<(Stream, Vec<u8>)>(256);
    let (started_sender, started) = tokio::sync::oneshot::channel();
    let mut job = tokio::spawn(async move {
        agent
            .run_job(index, request, Some(output_sender), Some(started_sender))
            .await
    });
    let job_id = tokio::select! {
        // A job that started is streamed, however quickly it ended.
        biased;
        id = started => id.ok(),
        finished = &mut job => {
            // It ended before it started: a refusal, answered as usual.
            return match finished {
                Ok(Ok(result)) => Ok(Json(result).into_response()),
                Ok(Err(error)) => Err(err(error)),
                Err(join) => Err(err(AgentError::Internal(join.to_string()))),
            };
        }
    };
    let (lines, body_stream) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(256);
    tokio::spawn(forward_job_events(job_id, output, job, lines));
    let body = axum::body::Body::from_stream(ReceiverStream(body_stream));
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        body,
    )
        .into_response())
}

type JobTask = tokio::task::JoinHandle<Result<JobResult, AgentError>>;

/// Writes a streamed job's events as lines: started, its output as it
/// comes, then its result (or error).
async fn forward_job_events(
    job_id: Option<u64>,
    mut output: tokio::sync::mpsc::Receiver<(Stream, Vec<u8>)>,
    job: JobTask,
    lines: tokio::sync::mpsc::Sender<Result<String, std::io::Error>>,
) {
    let line = |event: &JobEvent| {
        Ok(format!(
            "{}\n",
            serde_json::to_string(event).expect("events serialize")
        ))
    };
    if let Some(job_id) = job_id {
        let _ = lines.send(line(&JobEvent::Started { job_id })).await;
    }
    while let Some((stream, bytes)) = output.recv().await {
        let data = String::from_utf8_lossy(&bytes).into_owned();
        let event = match stream {
            Stream::Stdout => JobEvent::Stdout { data },
            Stream::Stderr => JobEvent::Stderr { data },
        };
        if lines.send(line(&event)).await.is_err() {
            break;
        }
    }
    let last = match job.await {
        Ok(Ok(result)) => JobEvent::Result { result },
        Ok(Err(error)) => JobEvent::Error {
            error: *err(error).detail,
        },
        Err(join) => JobEvent::Error {
            error: *err(AgentError::Internal(join.to_string())).detail,
        },
    };
    let _ = lines.send(line(&last)).await;
}

/// A tokio receiver as a `Stream` of body chunks.
struct ReceiverStream(tokio::sync::mpsc::Receiver<Result<String, std::io::Error>>);

impl futures_core::Stream for ReceiverStream {
    type Item = Result<String, std::io::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(context)
    }
}

#[utoipa::path(post, path = "/v1/jobs/{job_id}/cancel", tag = "jobs",
    description = "Cancel a running job (the lender token, or a lease key of the job's lease).",
    params(("job_id" = u64, Path, description = "The job's id")),
    responses((status = 200, description = "Whether the job was still running", body = crate::openapi::Cancelled),
        AuthErrors, InvalidParameter, NotFound))]
async fn cancel_job(
    State(agent): App,
    Extension(bearer): Extension<Bearer>,
    Path(job_id): Path<String>,
) -> Answer<serde_json::Value> {
    let job_id = parse_job_id(&job_id)?;
    let cancelled = agent
        .cancel_job(job_id, &bearer.0)
        .map_err(hide_other_leases_job)?;
    Ok(Json(
        serde_json::json!({"job_id": job_id, "cancelled": cancelled}),
    ))
}

fn parse_job_id(job_id: &str) -> Result<u64, ErrorResponse> {
    job_id.parse().map_err(|_| {
        err(AgentError::Invalid(FieldError::new(
            "job_id",
            format!("'{job_id}' is not a job id"),
        )))
    })
}

/// A job of another lease answers exactly as a job that does not exist
/// (the same status and body, naming no id), so job ids reveal nothing to
/// other borrowers.
fn hide_other_leases_job(error: AgentError) -> ErrorResponse {
    match error {
        AgentError::KeyRejected(KeyRejection::WrongLease) | AgentError::NotFound(_) => {
            err(AgentError::NotFound("no such job on this host".to_string()))
        }
        other => err(other),
    }
}

/// A job's state: for the host's lender, or with a lease key of the job's
/// lease (as `Authorization: Bearer KEY`). A job that was running when the
/// agent stopped reads `lost`.
#[utoipa::path(get, path = "/v1/jobs/{job_id}", tag = "jobs",
    description = "A job's state and output (the lender token, or a lease key of the job's lease; another lease's job is 404 like a missing one); `lost` when the agent stopped while it ran.",
    params(("job_id" = u64, Path, description = "The job's id")),
    responses((status = 200, description = "The job", body = JobResult),
        AuthErrors, InvalidParameter, NotFound))]
async fn get_job(
    State(agent): App,
    Extension(bearer): Extension<Bearer>,
    Path(job_id): Path<String>,
) -> Answer<JobResult> {
    let job_id = parse_job_id(&job_id)?;
    let job = agent
        .job(job_id, &bearer.0)
        .map_err(hide_other_leases_job)?;
    Ok(Json(job))
}

#[utoipa::path(post, path = "/v1/notices", tag = "notices", request_body = NoticeRequest,
    description = "A notice signed by the broker (lease started or released), sent as the bearer and in the body.",
    responses((status = 200, description = "Applied", body = crate::openapi::Applied),
        AuthErrors, BodyErrors, NotFound, Conflict))]
async fn notice(
    State(agent): App,
    Extension(bearer): Extension<Bearer>,
    JsonBody(request): JsonBody<NoticeRequest>,
) -> Answer<serde_json::Value> {
    require_same_as_bearer("notice", &request.notice, &bearer)?;
    agent.apply_notice(&request.notice).await.map_err(err)?;
    Ok(Json(serde_json::json!({"applied": true})))
}
