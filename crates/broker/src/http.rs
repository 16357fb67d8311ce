//! HTTP: parse, authenticate, check the role, hand the work to the state or
//! the writer, map errors. No decisions are made here.

use crate::error::BrokerError;
use crate::groups;
use crate::reservations;
use crate::{token_sha256, AppState};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json, Router};
use leasehold_api::*;
use leasehold_core::command::{
    check_known_image, may_see_lease, BrokerCommand, LeaseTarget, LeaseWindow, Outcome, Refusal,
};
use leasehold_core::key::{self, LeaseKeyClaims};
use leasehold_core::lease::{Lease, LeaseState};
use leasehold_core::ledger::{self, BROKER_COMMISSION_ACCOUNT};
use leasehold_core::table::{HostRow, Overlay, Principal, TableView};
use leasehold_core::PartitionRef;
use leasehold_service::{bearer_token, idempotency_key, ErrorResponse, JsonBody, QueryParams};
use leasehold_store::broker::{LeaseFilter, PartitionRow};
use utoipa::OpenApi;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use crate::openapi::{
    AuthErrors, BodyErrors, Conflict, ImageStoreFailed, InvalidParameter, NotFound, Unavailable,
};
/// What readers lay over the committed table: nothing.
pub(crate) static NO_UNCOMMITTED_CHANGES: std::sync::LazyLock<Overlay> =
    std::sync::LazyLock::new(Overlay::default);
use serde::Deserialize;
use std::sync::Arc;

type App = State<Arc<AppState>>;
type Answer<T> = Result<Json<T>, ErrorResponse>;

const MAX_LIST: u32 = 10_000;
const DEFAULT_LIST: u32 = 1000;

/// Request bodies on the broker are small JSON documents (the largest, a
/// partition's terms with 32 image names, is about 3 KiB).
const BODY_LIMIT_BYTES: usize = 16 * 1024;
/// A workload may list up to 1,024 instances (about 100 bytes each) and
/// 256 rules: its body may be larger, and is still read only after the
/// caller is authenticated.
const WORKLOAD_BODY_LIMIT_BYTES: usize = 256 * 1024;
/// A share group's table: a few hundred bytes per partition and per kept
/// transfer (at most 256 ended ones).
const GROUP_BODY_LIMIT_BYTES: usize = 1024 * 1024;

pub(crate) fn router(app: Arc<AppState>) -> Router {
    let dashboard = crate::ui::Dashboard::new(app.clone());
    let (api, document) = api_router(app.clone(), &dashboard).split_for_parts();
    api.layer(Extension(leasehold_service::openapi::DocumentJson::new(
        document,
        env!("CARGO_PKG_VERSION"),
    )))
    // The HTML dashboard is not part of the API document.
    .merge(crate::ui::router(dashboard))
    .fallback(leasehold_service::not_found_fallback)
    .layer(axum::middleware::from_fn_with_state(
        app.metrics.http.clone(),
        leasehold_service::http_metrics::record_http_request,
    ))
    .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT_BYTES))
    .with_state(app)
}

/// Every route of the API, each registered with its `#[utoipa::path]`
/// through `routes!`, so the router and its OpenAPI document are one.
pub(crate) fn api_router(
    app: Arc<AppState>,
    dashboard: &crate::ui::Dashboard,
) -> OpenApiRouter<Arc<AppState>> {
    // Everything but health, the API document, the metrics (which check
    // their own reader) and the broker's public key needs a principal,
    // resolved before any body is read.
    let authenticated = OpenApiRouter::new()
        .routes(routes!(whoami))
        .routes(routes!(create_principal_handler))
        .routes(routes!(list_hosts))
        .routes(routes!(register_host))
        .routes(routes!(host_revocations))
        .routes(routes!(create_host_credential))
        .routes(routes!(put_partition, withdraw_partition))
        .routes(routes!(list_partitions))
        .routes(routes!(find).layer(axum::middleware::from_fn_with_state(
            dashboard.finds.clone(),
            crate::ui::record_find_latency,
        )))
        .routes(routes!(lease, list_leases))
        .routes(routes!(get_lease))
        .routes(routes!(host_lease))
        .routes(routes!(release))
        .routes(routes!(bill))
        .routes(routes!(ledger_view))
        .merge(seed_routes())
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            require_principal,
        ));
    OpenApiRouter::with_openapi(crate::openapi::BrokerApi::openapi())
        .routes(routes!(health))
        .routes(routes!(leasehold_service::openapi::serve_document))
        .routes(routes!(broker_info))
        .routes(routes!(broker_status))
        .routes(routes!(crate::openapi::metrics))
        .merge(authenticated)
}

/// Seed 003's reservations and seed 004's share groups (authenticated
/// with the rest by [`api_router`]).
fn seed_routes() -> OpenApiRouter<Arc<AppState>> {
    use utoipa_axum::router::UtoipaMethodRouterExt;
    OpenApiRouter::new()
        .routes(routes!(reservations::host_sample))
        .routes(
            routes!(reservations::apply_workload, reservations::list_workloads).layer(
                axum::extract::DefaultBodyLimit::max(WORKLOAD_BODY_LIMIT_BYTES),
            ),
        )
        .routes(routes!(
            reservations::get_workload,
            reservations::delete_workload
        ))
        .routes(routes!(reservations::delete_instance))
        .routes(routes!(reservations::migrate_instance))
        .routes(routes!(reservations::power_save))
        .routes(routes!(reservations::power_up))
        .routes(routes!(reservations::list_pools))
        .routes(routes!(reservations::host_capacity))
        .routes(routes!(reservations::list_warnings))
        .routes(routes!(reservations::plan_now))
        .routes(routes!(groups::list_groups))
        .routes(
            routes!(groups::get_group, groups::put_group)
                .layer(axum::extract::DefaultBodyLimit::max(GROUP_BODY_LIMIT_BYTES)),
        )
        .routes(routes!(
            groups::acquire_group_lease,
            groups::group_lease_holder
        ))
}

/// Resolves the bearer token to a principal before the handler (and so
/// before any body) runs: an anonymous client gets 401 without a byte of its
/// body read. Handlers take the principal from the request's extensions.
async fn require_principal(
    State(app): App,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<axum::response::Response, ErrorResponse> {
    let principal = authenticate(&app, request.headers())?;
    if let Some(host_id) = &principal.host_scope {
        let uri = request.uri();
        if !host_scope_allows(host_id, request.method(), uri.path(), uri.query()) {
            return Err(err(BrokerError::Forbidden(format!(
                "a host credential acts only for host '{host_id}' (its partitions, its revocations); use the lender's own token for {} {}",
                request.method(),
                uri.path()
            ))));
        }
    }
    request.extensions_mut().insert(principal);
    Ok(next.run(request).await)
}

/// What a host credential may do: what its agent needs for its one host
/// (register it, its partitions, its revocations), and nothing else, so a
/// token leaked from one host cannot act for the lender's other hosts.
pub(crate) fn host_scope_allows(
    host_id: &str,
    method: &axum::http::Method,
    path: &str,
    query: Option<&str>,
) -> bool {
    use axum::http::Method;
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["v1", "whoami"] => method == Method::GET,
        ["v1", "hosts", host] => *host == host_id && method == Method::PUT,
        ["v1", "hosts", host, "partitions", _] => *host == host_id,
        ["v1", "hosts", host, "revocations"] => *host == host_id && method == Method::GET,
        ["v1", "hosts", host, "leases", _] => *host == host_id && method == Method::GET,
        ["v1", "hosts", host, "samples"] => *host == host_id && method == Method::POST,
        // The host's manager keeps its lender's share groups (seed 004):
        // a centralized primary writes other hosts' rows too.
        ["v1", "groups", _] | ["v1", "groups", _, "leases", _] => true,
        ["v1", "partitions"] => {
            method == Method::GET
                && query.is_some_and(|q| q.split('&').any(|pair| pair == format!("host={host_id}")))
        }
        _ => false,
    }
}

pub(crate) fn err(error: BrokerError) -> ErrorResponse {
    error.to_error_response()
}

pub(crate) fn authenticate(
    app: &AppState,
    headers: &HeaderMap,
) -> Result<Principal, ErrorResponse> {
    let token = bearer_token(headers).ok_or_else(|| err(BrokerError::Unauthorized))?;
    let state = app.state.read().unwrap_or_else(|p| p.into_inner());
    state
        .authenticate(&token_sha256(token))
        .cloned()
        .ok_or_else(|| err(BrokerError::Unauthorized))
}

pub(crate) fn require_role(
    principal: &Principal,
    allowed: &[Role],
    action: &str,
) -> Result<(), ErrorResponse> {
    if allowed.contains(&principal.role) {
        Ok(())
    } else {
        let names: Vec<&str> = allowed.iter().map(|r| r.as_str()).collect();
        Err(err(BrokerError::Forbidden(format!(
            "only a {} may {action}; '{}' is a {}",
            names.join(" or "),
            principal.name,
            principal.role.as_str()
        ))))
    }
}

#[utoipa::path(get, path = "/v1/health", tag = "meta", security(()),
    responses((status = 200, description = "The broker is up", body = crate::openapi::Health)))]
async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/v1/broker/status", tag = "meta", security(()),
    responses((status = 200, description = "Whether this broker is the active one of its database or a standby, its leadership epoch and since when (a standby answers this too; everything else it answers 503 `standby`)", body = leasehold_api::broker_status::BrokerStatus)))]
async fn broker_status(State(app): App) -> Json<leasehold_api::broker_status::BrokerStatus> {
    Json(app.leadership.status())
}

#[utoipa::path(get, path = "/v1/broker", tag = "meta", security(()),
    responses((status = 200, description = "Version, the keys that verify lease keys, the commission", body = BrokerInfo)))]
async fn broker_info(State(app): App) -> Json<BrokerInfo> {
    Json(BrokerInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        public_key_hex: key::public_key_hex(&app.signing_key),
        commission_basis_points: app.config.commission_basis_points,
        keys: app.published_keys.clone(),
    })
}

#[utoipa::path(get, path = "/v1/whoami", tag = "principals",
    responses((status = 200, description = "The caller's name and role", body = WhoAmI), AuthErrors))]
async fn whoami(Extension(principal): Extension<Principal>) -> Answer<WhoAmI> {
    Ok(Json(WhoAmI {
        name: principal.name,
        role: principal.role,
        host_scope: principal.host_scope,
    }))
}

pub(crate) async fn create_principal(
    app: &AppState,
    name: String,
    role: Role,
) -> Result<String, BrokerError> {
    issue_token(app, move |token_sha256| BrokerCommand::CreatePrincipal {
        name,
        role,
        token_sha256,
    })
    .await
}

/// Makes a random token, has the command `record` makes of its hash keep
/// it through the writer, and answers the token itself (shown once; the
/// broker keeps only the hash).
async fn issue_token(
    app: &AppState,
    record: impl FnOnce(String) -> BrokerCommand,
) -> Result<String, BrokerError> {
    let token = crate::new_token();
    app.writer.submit(record(token_sha256(&token))).await?;
    Ok(token)
}

#[utoipa::path(post, path = "/v1/principals", tag = "principals", request_body = CreatePrincipalRequest,
    description = "Create a principal (admin); its token is shown once.",
    responses((status = 201, description = "Created; the token is shown once", body = PrincipalCreated),
        AuthErrors, BodyErrors, Conflict, Unavailable))]
async fn create_principal_handler(
    State(app): App,
    Extension(principal): Extension<Principal>,
    JsonBody(request): JsonBody<CreatePrincipalRequest>,
) -> Result<(StatusCode, Json<PrincipalCreated>), ErrorResponse> {
    require_role(&principal, &[Role::Admin], "create principals")?;
    let token = create_principal(&app, request.name.clone(), request.role)
        .await
        .map_err(err)?;
    Ok((
        StatusCode::CREATED,
        Json(PrincipalCreated {
            name: request.name,
            role: request.role,
            token,
        }),
    ))
}

pub(crate) async fn issue_host_credential(
    app: &AppState,
    lender: String,
    host_id: String,
) -> Result<String, BrokerError> {
    issue_token(app, move |token_sha256| {
        BrokerCommand::CreateHostCredential {
            lender,
            host_id,
            token_sha256,
        }
    })
    .await
}

/// A lender makes a credential for one of its hosts (or a host id it will
/// register with it); it is shown once.
#[utoipa::path(post, path = "/v1/hosts/{host_id}/credentials", tag = "hosts",
    description = "A lender makes a credential for one of its hosts; it is shown once.",
    params(("host_id" = String, Path, description = "The host the credential acts for", pattern = "^[a-z0-9][a-z0-9._-]{0,63}$")),
    responses((status = 201, description = "Created; the token is shown once", body = HostCredentialCreated),
        AuthErrors, InvalidParameter, Conflict, Unavailable))]
async fn create_host_credential(
    State(app): App,
    Extension(principal): Extension<Principal>,
    Path(host_id): Path<String>,
) -> Result<(StatusCode, Json<HostCredentialCreated>), ErrorResponse> {
    require_role(&principal, &[Role::Lender], "make host credentials")?;
    let token = issue_host_credential(&app, principal.name.clone(), host_id.clone())
        .await
        .map_err(err)?;
    Ok((
        StatusCode::CREATED,
        Json(HostCredentialCreated {
            host_id,
            lender: principal.name,
            token,
        }),
    ))
}

fn host_view(host: &HostRow, partitions: u64) -> HostView {
    HostView {
        host_id: host.host_id.clone(),
        lender: host.lender.clone(),
        agent_url: host.agent_url.clone(),
        capacity: host.capacity.clone(),
        partitions,
    }
}

/// An outcome a handler did not expect from its command: a bug, said so.
pub(crate) fn unexpected(outcome: Outcome) -> ErrorResponse {
    err(BrokerError::Internal(format!(
        "unexpected outcome {outcome:?}"
    )))
}

#[utoipa::path(get, path = "/v1/hosts", tag = "hosts",
    responses((status = 200, description = "Every host, by id", body = Vec<HostView>), AuthErrors))]
pub(crate) async fn list_hosts(State(app): App) -> Answer<Vec<HostView>> {
    let state = app.state.read().unwrap_or_else(|p| p.into_inner());
    let mut hosts: Vec<HostView> = state
        .hosts
        .values()
        .map(|entry| host_view(&entry.row, entry.partitions.len() as u64))
        .collect();
    hosts.sort_by(|a, b| a.host_id.cmp(&b.host_id));
    hosts.truncate(MAX_LIST as usize);
    Ok(Json(hosts))
}

#[utoipa::path(put, path = "/v1/hosts/{host_id}", tag = "hosts", request_body = RegisterHostRequest,
    description = "Register or update a host (lender).",
    params(("host_id" = String, Path, description = "The host's id", pattern = "^[a-z0-9][a-z0-9._-]{0,63}$")),
    responses((status = 200, description = "The host as registered", body = HostView),
        AuthErrors, BodyErrors, Conflict, Unavailable))]
async fn register_host(
    State(app): App,
    Extension(principal): Extension<Principal>,
    Path(host_id): Path<String>,
    JsonBody(request): JsonBody<RegisterHostRequest>,
) -> Answer<HostView> {
    require_role(&principal, &[Role::Lender], "register hosts")?;
    let command = BrokerCommand::RegisterHost {
        lender: principal.name,
        host_id,
        agent_url: request.agent_url,
        capacity: request.capacity,
        share: request.share,
    };
    match app.writer.submit(command).await.map_err(err)?.outcome {
        Outcome::HostRegistered { host, partitions } => Ok(Json(host_view(&host, partitions))),
        other => Err(unexpected(other)),
    }
}

fn partition_view(row: PartitionRow) -> PartitionView {
    PartitionView {
        partition: row.partition,
        terms: row.terms,
        lease_id: row.lease_id,
        withdrawn: row.withdrawn,
        epoch: row.epoch,
    }
}

fn parse_index(text: &str) -> Result<u32, ErrorResponse> {
    text.parse::<u32>().map_err(|_| {
        err(BrokerError::Invalid(leasehold_core::FieldError::new(
            "index",
            format!("'{text}' is not a partition index"),
        )))
    })
}

#[utoipa::path(put, path = "/v1/hosts/{host_id}/partitions/{index}", tag = "partitions",
    request_body = RegisterPartitionRequest,
    description = "Register or alter a partition (the lender owning the host); refused with 409 `partition_locked` while leased.",
    params(("host_id" = String, Path, description = "The host's id", pattern = "^[a-z0-9][a-z0-9._-]{0,63}$"),
        ("index" = u32, Path, description = "The partition's index on its host")),
    responses((status = 200, description = "The partition as registered", body = PartitionView),
        AuthErrors, BodyErrors, NotFound, Conflict, Unavailable, ImageStoreFailed))]
async fn put_partition(
    State(app): App,
    Extension(principal): Extension<Principal>,
    Path((host_id, index)): Path<(String, String)>,
    JsonBody(request): JsonBody<RegisterPartitionRequest>,
) -> Answer<PartitionView> {
    require_role(&principal, &[Role::Lender], "register or alter partitions")?;
    let partition = PartitionRef::new(host_id, parse_index(&index)?);
    let terms = crate::images::pin_terms(app.images.as_ref(), request.terms)
        .await
        .map_err(err)?;
    let command = BrokerCommand::PutPartition {
        lender: principal.name,
        partition,
        terms,
    };
    match app.writer.submit(command).await.map_err(err)?.outcome {
        Outcome::PartitionPut(row) => Ok(Json(partition_view(row))),
        other => Err(unexpected(other)),
    }
}

#[utoipa::path(delete, path = "/v1/hosts/{host_id}/partitions/{index}", tag = "partitions",
    description = "Withdraw a partition (the lender owning the host); refused with 409 `partition_locked` while leased.",
    params(("host_id" = String, Path, description = "The host's id", pattern = "^[a-z0-9][a-z0-9._-]{0,63}$"),
        ("index" = u32, Path, description = "The partition's index on its host")),
    responses((status = 200, description = "The partition, withdrawn", body = PartitionView),
        AuthErrors, InvalidParameter, NotFound, Conflict, Unavailable))]
async fn withdraw_partition(
    State(app): App,
    Extension(principal): Extension<Principal>,
    Path((host_id, index)): Path<(String, String)>,
) -> Answer<PartitionView> {
    require_role(&principal, &[Role::Lender], "withdraw partitions")?;
    let partition = PartitionRef::new(host_id, parse_index(&index)?);
    let command = BrokerCommand::WithdrawPartition {
        lender: principal.name,
        partition,
    };
    match app.writer.submit(command).await.map_err(err)?.outcome {
        Outcome::PartitionWithdrawn(row) => Ok(Json(partition_view(row))),
        other => Err(unexpected(other)),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only this host's partitions.
    pub host: Option<String>,
    /// At most this many (default 1,000, at most 10,000).
    pub limit: Option<u32>,
    /// With `host`: only partitions of a higher index (paging).
    pub after_index: Option<u32>,
}

#[utoipa::path(get, path = "/v1/partitions", tag = "partitions", params(ListQuery),
    description = "Partitions with their lending status: a lender's own, or all for an admin.",
    responses((status = 200, description = "Partitions in (host, index) order", body = Vec<PartitionView>),
        AuthErrors, InvalidParameter))]
pub(crate) async fn list_partitions(
    State(app): App,
    Extension(principal): Extension<Principal>,
    QueryParams(query): QueryParams<ListQuery>,
) -> Answer<Vec<PartitionView>> {
    require_role(
        &principal,
        &[Role::Lender, Role::Admin],
        "list partitions with their status (borrowers use find)",
    )?;
    let limit = query.limit.unwrap_or(DEFAULT_LIST).min(MAX_LIST) as usize;
    let state = app.state.read().unwrap_or_else(|p| p.into_inner());
    // One host's partitions are a contiguous range of the ordered table,
    // so a page of them costs its own size, not the whole table's.
    let range = match &query.host {
        Some(host) => {
            let first = query.after_index.map_or(0, |i| i.saturating_add(1));
            let start = PartitionRef::new(host, first);
            state.partitions.range(start..)
        }
        None => state.partitions.range(..),
    };
    let views = range
        .take_while(|(p, _)| query.host.as_ref().is_none_or(|h| &p.host_id == h))
        .filter(|(p, _)| {
            principal.role == Role::Admin
                || state
                    .hosts
                    .get(&p.host_id)
                    .is_some_and(|h| h.row.lender == principal.name)
        })
        .take(limit)
        .map(|(p, e)| PartitionView {
            partition: p.clone(),
            terms: e.terms.clone(),
            lease_id: e.lease_id,
            withdrawn: e.withdrawn,
            epoch: e.epoch,
        })
        .collect();
    Ok(Json(views))
}

#[utoipa::path(post, path = "/v1/find", tag = "leases", request_body = FindRequest,
    description = "Free partitions matching the requirements: cheapest first, then best fit; an explanation when none match.",
    responses((status = 200, description = "Offers, or why there are none", body = FindResponse),
        AuthErrors, BodyErrors))]
async fn find(State(app): App, JsonBody(request): JsonBody<FindRequest>) -> Answer<FindResponse> {
    let limit = request
        .checked_limit()
        .map_err(|e| err(BrokerError::Invalid(e)))?;
    let search_started = std::time::Instant::now();
    let state = app.state.read().unwrap_or_else(|p| p.into_inner());
    // Readers see the committed table only: no batch's changes on top.
    let committed = TableView::new(&state, &NO_UNCOMMITTED_CHANGES);
    let shares =
        leasehold_core::share::share_quotes(committed, &request.requirements, limit as usize);
    if shares.is_empty() {
        check_known_image(committed, &request.requirements, "requirements.image")
            .map_err(|refusal| err(refusal.into()))?;
    }
    let offers: Vec<Offer> = state
        .free
        .find(&request.requirements, limit as usize)
        .into_iter()
        .map(|(partition, terms)| Offer { partition, terms })
        .collect();
    let explanation = (offers.is_empty() && shares.is_empty()).then(|| {
        let mut explanation = committed.explain(&request.requirements);
        if let Err(misses) = leasehold_core::share::carve_best(committed, &request.requirements) {
            explanation.shares = misses;
        }
        explanation
    });
    app.metrics.observe_find(search_started.elapsed());
    Ok(Json(FindResponse {
        offers,
        shares,
        explanation,
    }))
}

/// The view of a lease for `viewer`; the key only for its borrower while active.
fn lease_view(app: &AppState, lease: &Lease, viewer: &Principal) -> LeaseView {
    let agent_url = {
        let state = app.state.read().unwrap_or_else(|p| p.into_inner());
        state
            .hosts
            .get(&lease.partition.host_id)
            .and_then(|h| h.row.agent_url.clone())
    };
    let lease_key = (lease.state == LeaseState::Active && viewer.name == lease.borrower)
        .then(|| sign_lease_key(app, lease));
    LeaseView {
        lease_id: lease.lease_id,
        partition: lease.partition.clone(),
        borrower: lease.borrower.clone(),
        lender: lease.lender.clone(),
        terms: lease.terms.clone(),
        epoch: lease.epoch,
        state: lease.state,
        started_at_ms: lease.started_at_ms,
        key_expires_at_ms: lease.key_expires_at_ms,
        release_requested_at_ms: lease.release_requested_at_ms,
        charge_micros: lease.charge_micros,
        agent_url,
        lease_key,
    }
}

/// Keys are derived from the lease (ed25519 signatures are deterministic),
/// so they need not be stored and survive a restart unchanged.
fn sign_lease_key(app: &AppState, lease: &Lease) -> String {
    key::sign(
        &LeaseKeyClaims {
            lease_id: lease.lease_id,
            host_id: lease.partition.host_id.clone(),
            partition_index: lease.partition.index,
            epoch: lease.epoch,
            borrower: lease.borrower.clone(),
            issued_at_ms: lease.started_at_ms,
            expires_at_ms: lease.key_expires_at_ms,
            key_id: app.signing_key_id.clone(),
            terms: Some(lease.terms.clone()),
            // A lease booked ahead: its key works inside its window only.
            not_before_ms: lease.ends_at_ms.map(|_| lease.started_at_ms),
        },
        &app.signing_key,
    )
}

/// The window of a lease booked ahead: both times or neither.
fn lease_window(request: &LeaseRequest) -> Result<Option<LeaseWindow>, ErrorResponse> {
    let parse = |field: &str, text: &str| {
        ms_from_rfc3339(text).map_err(|problem| {
            err(BrokerError::Invalid(leasehold_core::FieldError::new(
                field, problem,
            )))
        })
    };
    match (&request.start, &request.end) {
        (None, None) => Ok(None),
        (Some(start), Some(end)) => Ok(Some(LeaseWindow {
            start_ms: parse("start", start)?,
            end_ms: parse("end", end)?,
        })),
        (Some(_), None) => Err(err(BrokerError::Invalid(leasehold_core::FieldError::new(
            "end",
            "a lease booked ahead needs an end as well as a start",
        )))),
        (None, Some(_)) => Err(err(BrokerError::Invalid(leasehold_core::FieldError::new(
            "start",
            "a lease booked ahead needs a start as well as an end",
        )))),
    }
}

/// The partition a lease request names, or its requirements.
fn lease_target(request: LeaseRequest) -> Result<LeaseTarget, ErrorResponse> {
    match (request.partition, request.best) {
        (Some(text), None) => Ok(LeaseTarget::Named {
            partition: text.parse().map_err(|e| err(BrokerError::Invalid(e)))?,
            allow_unisolated: request.allow_unisolated,
        }),
        (None, Some(requirements)) => Ok(LeaseTarget::Best(requirements)),
        _ => Err(err(BrokerError::Invalid(leasehold_core::FieldError::new(
            "partition",
            "give exactly one of 'partition' (HOST/INDEX) or 'best' (requirements)",
        )))),
    }
}

#[utoipa::path(post, path = "/v1/leases", tag = "leases", request_body = LeaseRequest,
    description = "Conclude a lease (borrower) on a named partition or the best match; the answer carries the lease key.",
    params(("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key answer the same lease", pattern = "^[A-Za-z0-9_-]{1,128}$")),
    responses((status = 201, description = "Leased", body = LeaseView),
        (status = 200, description = "A retry of an earlier request with the same idempotency key", body = LeaseView),
        AuthErrors, BodyErrors, NotFound, Conflict, Unavailable))]
async fn lease(
    State(app): App,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<LeaseRequest>,
) -> Result<(StatusCode, Json<LeaseView>), ErrorResponse> {
    require_role(&principal, &[Role::Borrower], "lease partitions")?;
    let window = lease_window(&request)?;
    let command = BrokerCommand::Lease {
        borrower: principal.name.clone(),
        idempotency_key: idempotency_key(&headers)?,
        target: lease_target(request)?,
        key_ttl_ms: app.config.key_ttl_ms,
        window,
    };
    let (status, lease) = match app.writer.submit(command).await.map_err(err)?.outcome {
        Outcome::Leased { lease, .. } => (StatusCode::CREATED, lease),
        Outcome::LeaseReplayed {
            lease: Some(lease), ..
        } => (StatusCode::OK, lease),
        other => return Err(unexpected(other)),
    };
    Ok((status, Json(lease_view(&app, &lease, &principal))))
}

fn parse_lease_id(text: &str) -> Result<u64, ErrorResponse> {
    text.parse::<u64>().map_err(|_| {
        err(BrokerError::Invalid(leasehold_core::FieldError::new(
            "lease_id",
            format!("'{text}' is not a lease id"),
        )))
    })
}

#[utoipa::path(get, path = "/v1/leases/{lease_id}", tag = "leases",
    description = "One lease; its key is shown to its borrower while active.",
    params(("lease_id" = u64, Path, description = "The lease's id")),
    responses((status = 200, description = "The lease", body = LeaseView),
        AuthErrors, InvalidParameter, NotFound, Unavailable))]
async fn get_lease(
    State(app): App,
    Extension(principal): Extension<Principal>,
    Path(lease_id): Path<String>,
) -> Answer<LeaseView> {
    let lease_id = parse_lease_id(&lease_id)?;
    match lease_by_id(&app, lease_id)? {
        Some(lease) if may_see_lease(&principal, &lease) => {
            Ok(Json(lease_view(&app, &lease, &principal)))
        }
        // A lease the caller may not see answers exactly as one that does
        // not exist, so lease ids reveal nothing to strangers.
        Some(_) | None => Err(err(Refusal::NoSuchLease.into())),
    }
}

/// A lease, active (from the table) or ended (from the database).
fn lease_by_id(app: &AppState, lease_id: u64) -> Result<Option<Lease>, ErrorResponse> {
    let active = {
        let state = app.state.read().unwrap_or_else(|p| p.into_inner());
        state.active_leases.get(&lease_id).cloned()
    };
    match active {
        Some(lease) => Ok(Some(lease)),
        None => app
            .reader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lease(lease_id)
            .map_err(|e| err(e.into())),
    }
}

#[utoipa::path(get, path = "/v1/hosts/{host_id}/leases/{lease_id}", tag = "hosts",
    description = "A lease on one of the caller's hosts, for its agent to confirm a key before a job runs (seed 000, FIG. 15): partition, epoch and state. A host credential may ask for its own host.",
    params(("host_id" = String, Path, description = "The host"),
        ("lease_id" = u64, Path, description = "The lease's id")),
    responses((status = 200, description = "The lease", body = LeaseView),
        AuthErrors, InvalidParameter, NotFound, Unavailable))]
async fn host_lease(
    State(app): App,
    Extension(principal): Extension<Principal>,
    Path((host_id, lease_id)): Path<(String, String)>,
) -> Answer<LeaseView> {
    let lease_id = parse_lease_id(&lease_id)?;
    match lease_by_id(&app, lease_id)? {
        Some(lease) if lease.partition.host_id == host_id && may_see_lease(&principal, &lease) => {
            Ok(Json(lease_view(&app, &lease, &principal)))
        }
        Some(_) | None => Err(err(Refusal::NoSuchLease.into())),
    }
}

#[utoipa::path(get, path = "/v1/leases", tag = "leases", params(ListQuery),
    description = "The caller's leases: borrowed, lent, or all for an admin.",
    responses((status = 200, description = "Leases, newest first", body = Vec<LeaseView>),
        AuthErrors, InvalidParameter, Unavailable))]
pub(crate) async fn list_leases(
    State(app): App,
    Extension(principal): Extension<Principal>,
    QueryParams(query): QueryParams<ListQuery>,
) -> Answer<Vec<LeaseView>> {
    let limit = query.limit.unwrap_or(DEFAULT_LIST).min(MAX_LIST);
    let leases = leases_of(&app, &principal, limit)?;
    Ok(Json(
        leases
            .iter()
            .map(|l| lease_view(&app, l, &principal))
            .collect(),
    ))
}

fn leases_of(
    app: &AppState,
    principal: &Principal,
    limit: u32,
) -> Result<Vec<Lease>, ErrorResponse> {
    let filter = match principal.role {
        Role::Admin => LeaseFilter::All,
        Role::Borrower => LeaseFilter::Borrower(principal.name.clone()),
        Role::Lender => LeaseFilter::Lender(principal.name.clone()),
    };
    app.reader
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .leases(&filter, limit)
        .map_err(|e| err(e.into()))
}

#[utoipa::path(post, path = "/v1/leases/{lease_id}/release", tag = "leases",
    description = "Release a lease and bill it once; retries answer with the same bill.",
    params(("lease_id" = u64, Path, description = "The lease's id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key answer the same receipt", pattern = "^[A-Za-z0-9_-]{1,128}$")),
    responses((status = 200, description = "The lease, ended, and its bill", body = ReleaseReceipt),
        AuthErrors, InvalidParameter, NotFound, Conflict, Unavailable))]
async fn release(
    State(app): App,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    Path(lease_id): Path<String>,
) -> Answer<ReleaseReceipt> {
    let lease_id = parse_lease_id(&lease_id)?;
    idempotency_key(&headers)?;
    let command = BrokerCommand::Release {
        releaser: principal.clone(),
        lease_id,
        commission_basis_points: app.config.commission_basis_points,
    };
    let presigned = presign_release_notice(&app, &principal, lease_id);
    let committed = app
        .writer
        .submit_with_notice(command, presigned)
        .await
        .map_err(err)?;
    let (lease, bill, already_released) = match committed.outcome {
        Outcome::Released { lease, bill, .. } => (lease, bill, false),
        Outcome::AlreadyReleased { lease, bill } => (lease, bill, true),
        other => return Err(unexpected(other)),
    };
    // The release notice committed with the release; the answer waits
    // briefly for its first delivery to say whether the host fenced the
    // old key (a lease released before says it did).
    let agent_notified = if already_released {
        true
    } else {
        crate::outbox::first_attempt_acknowledged(committed.first_delivery).await
    };
    Ok(Json(ReleaseReceipt {
        lease: lease_view(&app, &lease, &principal),
        bill,
        already_released,
        agent_notified,
    }))
}

/// Signs the release notice of `lease_id` here, on one of the HTTP workers,
/// when the committed table shows it active and `principal` may release it;
/// the writer only checks that it still matches. Nothing else is signed, so
/// a caller cannot have the broker sign for leases it does not hold.
fn presign_release_notice(
    app: &AppState,
    principal: &Principal,
    lease_id: leasehold_core::LeaseId,
) -> Option<crate::outbox::PresignedNotice> {
    let lease = {
        let table = app.state.read().unwrap_or_else(|p| p.into_inner());
        let lease = table.active_leases.get(&lease_id)?;
        leasehold_core::command::check_releaser(principal, lease).ok()?;
        lease.clone()
    };
    Some(
        app.notice_signer
            .presign(&lease, leasehold_core::key::NoticeKind::LeaseReleased),
    )
}

fn accounts_of(principal: &Principal) -> Vec<String> {
    match principal.role {
        Role::Borrower => vec![ledger::borrower_account(&principal.name)],
        Role::Lender => vec![ledger::lender_account(&principal.name)],
        Role::Admin => vec![BROKER_COMMISSION_ACCOUNT.to_string()],
    }
}

#[utoipa::path(get, path = "/v1/bill", tag = "ledger",
    responses((status = 200, description = "The caller's leases and balance (integer micro-units)", body = BillView),
        AuthErrors, Unavailable))]
pub(crate) async fn bill(
    State(app): App,
    Extension(principal): Extension<Principal>,
) -> Answer<BillView> {
    let leases = leases_of(&app, &principal, DEFAULT_LIST)?;
    let accounts = accounts_of(&principal);
    let balances = app
        .reader
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .balances()
        .map_err(|e| err(e.into()))?;
    let balance = balances
        .iter()
        .filter(|(account, _)| accounts.contains(account))
        .map(|(_, b)| *b)
        .sum();
    Ok(Json(BillView {
        principal: principal.name.clone(),
        role: principal.role,
        leases: leases
            .iter()
            .map(|l| lease_view(&app, l, &principal))
            .collect(),
        balance_micros: balance,
    }))
}

#[utoipa::path(get, path = "/v1/ledger", tag = "ledger", params(ListQuery),
    description = "Transfers and balances: the caller's, or the whole ledger (which sums to zero) for an admin.",
    responses((status = 200, description = "Transfers and balances (integer micro-units)", body = LedgerView),
        AuthErrors, InvalidParameter, Unavailable))]
pub(crate) async fn ledger_view(
    State(app): App,
    Extension(principal): Extension<Principal>,
    QueryParams(query): QueryParams<ListQuery>,
) -> Answer<LedgerView> {
    let limit = query.limit.unwrap_or(DEFAULT_LIST).min(MAX_LIST);
    let accounts = (principal.role != Role::Admin).then(|| accounts_of(&principal));
    let mut reader = app.reader.lock().unwrap_or_else(|p| p.into_inner());
    let transfers = reader
        .transfers(accounts.as_deref(), limit)
        .map_err(|e| err(e.into()))?;
    let balances: Vec<AccountBalance> = reader
        .balances()
        .map_err(|e| err(e.into()))?
        .into_iter()
        .filter(|(account, _)| accounts.as_ref().is_none_or(|a| a.contains(account)))
        .map(|(account, balance_micros)| AccountBalance {
            account,
            balance_micros,
        })
        .collect();
    let sum_micros = balances.iter().map(|b| b.balance_micros).sum();
    let (rights_movements, rights_balances) = if principal.role == Role::Admin {
        rights_ledger(reader.as_mut(), limit)?
    } else {
        (Vec::new(), Vec::new())
    };
    Ok(Json(LedgerView {
        rights_movements,
        rights_balances,
        transfers: transfers
            .into_iter()
            .map(|(transfer_id, t)| LedgerEntry {
                transfer_id,
                lease_id: t.lease_id,
                debit_account: t.debit_account,
                credit_account: t.credit_account,
                amount_micros: t.amount_micros,
                at_ms: t.at_ms,
            })
            .collect(),
        balances,
        sum_micros,
    }))
}

/// The usage rights' side of the ledger (seed 004), for admins.
fn rights_ledger(
    reader: &mut dyn leasehold_store::BrokerStore,
    limit: u32,
) -> Result<(Vec<AssetMovementEntry>, Vec<AccountBalance>), ErrorResponse> {
    use leasehold_core::rights::ledger::RIGHTS_ASSET;
    let movements = reader
        .asset_movements(RIGHTS_ASSET, limit)
        .map_err(|e| err(e.into()))?
        .into_iter()
        .map(|(movement_id, t)| AssetMovementEntry {
            movement_id,
            asset: RIGHTS_ASSET.to_string(),
            debit_account: t.debit_account,
            credit_account: t.credit_account,
            amount: t.amount_micros,
            at_ms: t.at_ms,
        })
        .collect();
    let balances = reader
        .balances_by_asset()
        .map_err(|e| err(e.into()))?
        .into_iter()
        .filter(|b| b.asset == RIGHTS_ASSET)
        .map(|b| AccountBalance {
            account: b.account,
            balance_micros: b.balance,
        })
        .collect();
    Ok((movements, balances))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct RevocationQuery {
    /// Only releases after this sequence number (default 0).
    #[param(value_type = Option<u64>)]
    after_seq: Option<String>,
    /// At most this many (default and most: 1,000).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
}

/// The signed release notices of a host's leases whose keys may still be in
/// use, for its agent to pull (`crate::outbox`).
#[utoipa::path(get, path = "/v1/hosts/{host_id}/revocations", tag = "hosts", params(RevocationQuery,
        ("host_id" = String, Path, description = "The host's id", pattern = "^[a-z0-9][a-z0-9._-]{0,63}$")),
    description = "Signed release notices of the host's leases whose keys have not expired, in release order; agents pull them.",
    responses((status = 200, description = "A page of revocations", body = RevocationPage),
        AuthErrors, InvalidParameter, NotFound, Unavailable))]
async fn host_revocations(
    State(app): App,
    headers: HeaderMap,
    Path(host_id): Path<String>,
    QueryParams(query): QueryParams<RevocationQuery>,
) -> Answer<RevocationPage> {
    let principal = authenticate(&app, &headers)?;
    require_role(&principal, &[Role::Lender, Role::Admin], "read revocations")?;
    crate::outbox::revocation_page(
        &app,
        &principal,
        &host_id,
        query.after_seq.as_deref(),
        query.limit.as_deref(),
    )
    .map(Json)
    .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::host_scope_allows;
    use axum::http::Method;

    #[test]
    fn a_host_credential_reaches_only_its_own_host() {
        let check = |method: Method, path: &str, query: Option<&str>, expect: bool| {
            assert_eq!(
                host_scope_allows("alpha", &method, path, query),
                expect,
                "{method} {path}?{query:?}"
            );
        };
        check(Method::PUT, "/v1/hosts/alpha", None, true);
        check(Method::PUT, "/v1/hosts/alpha/partitions/3", None, true);
        check(Method::DELETE, "/v1/hosts/alpha/partitions/3", None, true);
        check(
            Method::GET,
            "/v1/hosts/alpha/revocations",
            Some("after_seq=0"),
            true,
        );
        check(
            Method::GET,
            "/v1/partitions",
            Some("host=alpha&limit=10"),
            true,
        );
        check(Method::GET, "/v1/whoami", None, true);
        check(Method::GET, "/v1/hosts/alpha/leases/7", None, true);
        check(Method::GET, "/v1/hosts/beta/leases/7", None, false);
        // Another host of the same lender, or the lender's other powers.
        check(Method::PUT, "/v1/hosts/beta", None, false);
        check(Method::PUT, "/v1/hosts/beta/partitions/1", None, false);
        check(Method::GET, "/v1/hosts/beta/revocations", None, false);
        check(Method::GET, "/v1/partitions", Some("host=beta"), false);
        check(Method::GET, "/v1/partitions", Some("host=alphabet"), false);
        check(Method::GET, "/v1/partitions", None, false);
        check(Method::POST, "/v1/hosts/alpha/credentials", None, false);
        check(Method::GET, "/v1/leases", None, false);
        check(Method::GET, "/v1/ledger", None, false);
        check(Method::POST, "/v1/principals", None, false);
        check(
            Method::PUT,
            "/v1/hosts/alpha/partitions/3/../../beta",
            None,
            false,
        );
    }
}
