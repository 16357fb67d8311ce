//! The HTTP face of direct lending (`direct`): grants for the owner (the
//! host's lender token), find, lease and release for granted borrowers.
//! Both authenticate before a body is read.

use crate::error::AgentError;
use crate::Agent;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::{Extension, Json};
use leasehold_api::{
    DirectGrant, DirectGrantRequest, DirectLeaseRequest, FindRequest, FindResponse, LeaseView,
};
use leasehold_core::FieldError;
use leasehold_service::{bearer_token, ErrorResponse, JsonBody};
use std::sync::Arc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::openapi::{AuthErrors, BodyErrors, Conflict, InvalidParameter, NotFound};

type App = State<Arc<Agent>>;
type Answer<T> = Result<Json<T>, ErrorResponse>;

/// The granted borrower of a request, for the handlers.
#[derive(Clone)]
struct Borrower(String);

fn err(error: AgentError) -> ErrorResponse {
    error.to_error_response()
}

pub(crate) fn direct_routes(agent: Arc<Agent>) -> OpenApiRouter<Arc<Agent>> {
    let owner = OpenApiRouter::new()
        .routes(routes!(grant))
        .routes(routes!(revoke))
        .route_layer(middleware::from_fn_with_state(
            agent.clone(),
            crate::http::require_lender,
        ));
    let borrowers = OpenApiRouter::new()
        .routes(routes!(find))
        .routes(routes!(lease))
        .routes(routes!(get_lease, release))
        .route_layer(middleware::from_fn_with_state(agent, require_grant));
    owner.merge(borrowers)
}

/// Direct borrowers: a token the owner granted, or 401.
async fn require_grant(
    State(agent): App,
    mut request: Request,
    next: Next,
) -> Result<Response, ErrorResponse> {
    let borrower = bearer_token(request.headers()).and_then(|token| agent.direct_borrower(token));
    match borrower {
        Some(name) => {
            request.extensions_mut().insert(Borrower(name));
            Ok(next.run(request).await)
        }
        None => Err(err(AgentError::Unauthorized)),
    }
}

fn parse_lease_id(text: &str) -> Result<u64, ErrorResponse> {
    text.parse::<u64>().map_err(|_| {
        err(AgentError::Invalid(FieldError::new(
            "lease_id",
            format!("'{text}' is not a lease id"),
        )))
    })
}

#[utoipa::path(post, path = "/v1/direct/grants", tag = "direct", request_body = DirectGrantRequest,
    description = "The owner lets a borrower lease at this agent (`--direct` only); the token is shown once.",
    responses((status = 201, description = "The grant, with the borrower's token", body = DirectGrant),
        AuthErrors, BodyErrors, NotFound))]
async fn grant(
    State(agent): App,
    JsonBody(request): JsonBody<DirectGrantRequest>,
) -> Result<(StatusCode, Json<DirectGrant>), ErrorResponse> {
    let granted = agent.grant(&request.name).await.map_err(err)?;
    Ok((StatusCode::CREATED, Json(granted)))
}

#[utoipa::path(delete, path = "/v1/direct/grants/{name}", tag = "direct",
    description = "The owner takes a grant back: its token stops working and its leases end.",
    params(("name" = String, Path, description = "The borrower's name")),
    responses((status = 200, description = "The grant taken back", body = DirectGrant),
        AuthErrors, NotFound))]
async fn revoke(State(agent): App, Path(name): Path<String>) -> Answer<DirectGrant> {
    Ok(Json(agent.revoke(&name).await.map_err(err)?))
}

#[utoipa::path(post, path = "/v1/direct/find", tag = "direct", request_body = FindRequest,
    description = "Free partitions of this host meeting the requirements (a granted borrower).",
    responses((status = 200, description = "The offers, cheapest first", body = FindResponse),
        AuthErrors, BodyErrors, NotFound))]
async fn find(State(agent): App, JsonBody(request): JsonBody<FindRequest>) -> Answer<FindResponse> {
    let limit = request.checked_limit().map_err(|e| err(e.into()))?;
    let offers = agent
        .direct_offers(&request.requirements, limit as usize)
        .map_err(err)?;
    Ok(Json(FindResponse {
        offers,
        shares: Vec::new(),
        explanation: None,
    }))
}

#[utoipa::path(post, path = "/v1/direct/leases", tag = "direct", request_body = DirectLeaseRequest,
    description = "Lease a partition of this host (a granted borrower): its key is signed with the owner's key. Nothing is billed.",
    responses((status = 201, description = "The lease, with its key", body = LeaseView),
        AuthErrors, BodyErrors, NotFound, Conflict))]
async fn lease(
    State(agent): App,
    Extension(borrower): Extension<Borrower>,
    JsonBody(request): JsonBody<DirectLeaseRequest>,
) -> Result<(StatusCode, Json<LeaseView>), ErrorResponse> {
    let lease = agent
        .direct_lease(&borrower.0, &request)
        .await
        .map_err(err)?;
    Ok((StatusCode::CREATED, Json(lease)))
}

#[utoipa::path(get, path = "/v1/direct/leases/{lease_id}", tag = "direct",
    description = "One of the borrower's direct leases, with its key.",
    params(("lease_id" = u64, Path, description = "The lease's id")),
    responses((status = 200, description = "The lease", body = LeaseView),
        AuthErrors, InvalidParameter, NotFound))]
async fn get_lease(
    State(agent): App,
    Extension(borrower): Extension<Borrower>,
    Path(lease_id): Path<String>,
) -> Answer<LeaseView> {
    let lease_id = parse_lease_id(&lease_id)?;
    Ok(Json(
        agent
            .direct_lease_view(&borrower.0, lease_id)
            .map_err(err)?,
    ))
}

#[utoipa::path(delete, path = "/v1/direct/leases/{lease_id}", tag = "direct",
    description = "Release a direct lease: its key is fenced at once and the partition wiped.",
    params(("lease_id" = u64, Path, description = "The lease's id")),
    responses((status = 200, description = "The lease as released", body = LeaseView),
        AuthErrors, InvalidParameter, NotFound))]
async fn release(
    State(agent): App,
    Extension(borrower): Extension<Borrower>,
    Path(lease_id): Path<String>,
) -> Answer<LeaseView> {
    let lease_id = parse_lease_id(&lease_id)?;
    Ok(Json(
        agent
            .direct_release(&borrower.0, lease_id)
            .await
            .map_err(err)?,
    ))
}
