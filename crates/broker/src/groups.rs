//! The broker as a share group's store (seed 004), for managers (agents)
//! not given a store of their own: the group's table kept by
//! compare-and-swap on its version, and the group's fenced leases (the
//! primary manager's, each host manager's). The broker decides nothing
//! about rights: it authenticates, applies core's rule for who may write
//! what (`rights::orders::check_group_write`), and lets the database do
//! the compare-and-swap. Writes go through the history connection, not
//! the writer: a group's table is the managers' state, not the market's.

use crate::error::BrokerError;
use crate::http::{err, require_role};
use crate::openapi::{AuthErrors, BodyErrors, Conflict, InvalidParameter, NotFound, Unavailable};
use crate::AppState;
use axum::extract::{Path, State};
use axum::{Extension, Json};
use leasehold_api::rights::*;
use leasehold_api::Role;
use leasehold_core::reservation::workload::check_name;
use leasehold_core::rights::orders::{check_group_write, GroupWriter};
use leasehold_core::table::Principal;
use leasehold_service::{ErrorResponse, JsonBody};
use std::sync::Arc;

type App = State<Arc<AppState>>;
type Answer<T> = Result<Json<T>, ErrorResponse>;

/// Longest fenced lease a manager may take: leadership must move on
/// within seconds of a manager's death.
pub const MAX_GROUP_LEASE_TTL_MS: u64 = 60_000;

fn writer_of(principal: &Principal) -> GroupWriter {
    GroupWriter {
        name: principal.name.clone(),
        is_admin: principal.role == Role::Admin,
    }
}

fn check_group_name(name: &str) -> Result<(), ErrorResponse> {
    check_name("group", name).map_err(|e| err(BrokerError::Invalid(e)))
}

/// Whether `principal` may see the group (its lender's, or an admin);
/// another lender's group answers as if it did not exist.
fn may_see(principal: &Principal, owner: Option<&str>) -> bool {
    principal.role == Role::Admin || owner.is_none_or(|owner| owner == principal.name)
}

fn no_group(name: &str) -> ErrorResponse {
    err(BrokerError::NotFound(format!("no share group '{name}'")))
}

/// The group `name` as stored and its version, `None` when there is none;
/// another lender's group is refused as if it did not exist.
fn visible_group(
    store: &mut dyn leasehold_store::BrokerStore,
    principal: &Principal,
    name: &str,
) -> Result<Option<(leasehold_core::rights::ShareGroup, u64)>, ErrorResponse> {
    match store.share_group(name).map_err(|e| err(e.into()))? {
        Some((group, _)) if !may_see(principal, group.owner.as_deref()) => Err(no_group(name)),
        stored => Ok(stored),
    }
}

/// Most groups listed at once.
const MAX_GROUPS_LISTED: u32 = 256;

/// The groups the principal may see: all for an admin, a lender's own.
#[utoipa::path(get, path = "/v1/groups", tag = "groups",
    responses((status = 200, description = "The share groups the caller may see (seed 004)", body = Vec<ShareGroupDocument>),
        AuthErrors, Unavailable))]
pub(crate) async fn list_groups(
    State(app): App,
    Extension(principal): Extension<Principal>,
) -> Answer<Vec<ShareGroupDocument>> {
    require_role(
        &principal,
        &[Role::Admin, Role::Lender],
        "list share groups",
    )?;
    let groups = app
        .reader
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .share_groups(MAX_GROUPS_LISTED)
        .map_err(|e| err(e.into()))?;
    Ok(Json(
        groups
            .into_iter()
            .filter(|(group, _)| may_see(&principal, group.owner.as_deref()))
            .map(|(group, version)| ShareGroupDocument {
                group,
                version,
                stale: false,
            })
            .collect(),
    ))
}

#[utoipa::path(get, path = "/v1/groups/{name}", tag = "groups",
    params(("name" = String, Path, description = "The share group's name", pattern = "^[A-Za-z0-9._-]{1,64}$")),
    responses((status = 200, description = "The share group and its version", body = ShareGroupDocument),
        AuthErrors, InvalidParameter, NotFound, Unavailable))]
pub(crate) async fn get_group(
    State(app): App,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Answer<ShareGroupDocument> {
    require_role(
        &principal,
        &[Role::Admin, Role::Lender],
        "read a share group",
    )?;
    check_group_name(&name)?;
    let mut store = app.reader.lock().unwrap_or_else(|p| p.into_inner());
    let (group, version) =
        visible_group(store.as_mut(), &principal, &name)?.ok_or_else(|| no_group(&name))?;
    Ok(Json(ShareGroupDocument {
        group,
        version,
        stale: false,
    }))
}

#[utoipa::path(put, path = "/v1/groups/{name}", tag = "groups", request_body = PutShareGroupRequest,
    description = "Write a share group's table if it is still at `expected_version` (409 `version_conflict` otherwise).",
    params(("name" = String, Path, description = "The share group's name", pattern = "^[A-Za-z0-9._-]{1,64}$")),
    responses((status = 200, description = "The new version", body = PutShareGroupAnswer),
        AuthErrors, BodyErrors, NotFound, Conflict, Unavailable))]
pub(crate) async fn put_group(
    State(app): App,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
    JsonBody(request): JsonBody<PutShareGroupRequest>,
) -> Answer<PutShareGroupAnswer> {
    require_role(
        &principal,
        &[Role::Admin, Role::Lender],
        "write a share group",
    )?;
    check_group_name(&name)?;
    let now_ms = app.config.clock.now_ms();
    let mut store = app.reader.lock().unwrap_or_else(|p| p.into_inner());
    let stored = visible_group(store.as_mut(), &principal, &name)?;
    let stored_group = stored.as_ref().map(|(group, _)| group);
    let stored_version = stored.as_ref().map_or(0, |(_, version)| *version);
    if stored_version != request.expected_version {
        return Err(err(version_conflict(&name, stored_version)));
    }
    let group = check_group_write(
        stored_group,
        request.group,
        &name,
        &writer_of(&principal),
        now_ms,
    )
    .map_err(|refusal| err(refusal.into()))?;
    let movements = leasehold_core::rights::ledger::movements(stored_group, &group, now_ms);
    match store
        .put_share_group(&group, request.expected_version, &movements)
        .map_err(|e| err(e.into()))?
    {
        Some(version) => Ok(Json(PutShareGroupAnswer { version })),
        None => Err(err(version_conflict(&name, stored_version))),
    }
}

fn version_conflict(name: &str, version: u64) -> BrokerError {
    BrokerError::VersionConflict(format!(
        "share group '{name}' is at version {version} now: read it again and decide from there"
    ))
}

#[utoipa::path(get, path = "/v1/groups/{name}/leases/{lease}", tag = "groups",
    params(("name" = String, Path, description = "The share group's name", pattern = "^[A-Za-z0-9._-]{1,64}$"),
        ("lease" = String, Path, description = "The lease's name, e.g. `primary`", pattern = "^[A-Za-z0-9._-]{1,64}$")),
    responses((status = 200, description = "Who holds the lease, at which epoch, until when", body = GroupLeaseHolder),
        AuthErrors, InvalidParameter, NotFound, Unavailable))]
pub(crate) async fn group_lease_holder(
    State(app): App,
    Extension(principal): Extension<Principal>,
    Path((name, lease)): Path<(String, String)>,
) -> Answer<GroupLeaseHolder> {
    require_role(
        &principal,
        &[Role::Admin, Role::Lender],
        "read a share group",
    )?;
    check_group_name(&name)?;
    check_name("lease", &lease).map_err(|e| err(BrokerError::Invalid(e)))?;
    let mut store = app.reader.lock().unwrap_or_else(|p| p.into_inner());
    let held = if visible_group(store.as_mut(), &principal, &name)?.is_some() {
        store
            .lease_holder(&format!("group/{name}/{lease}"))
            .map_err(|e| err(e.into()))?
    } else {
        None
    };
    held.map(|h| {
        Json(GroupLeaseHolder {
            holder: h.holder,
            epoch: h.epoch,
            expires_at_ms: h.expires_at_ms,
        })
    })
    .ok_or_else(|| {
        err(BrokerError::NotFound(format!(
            "no lease '{lease}' in share group '{name}'"
        )))
    })
}

#[utoipa::path(post, path = "/v1/groups/{name}/leases/{lease}", tag = "groups", request_body = GroupLeaseRequest,
    description = "Take or renew a fenced lease of the share group (its primary's leadership).",
    params(("name" = String, Path, description = "The share group's name", pattern = "^[A-Za-z0-9._-]{1,64}$"),
        ("lease" = String, Path, description = "The lease's name, e.g. `primary`", pattern = "^[A-Za-z0-9._-]{1,64}$")),
    responses((status = 200, description = "Held; the epoch fences older holders", body = GroupLeaseAnswer),
        AuthErrors, BodyErrors, NotFound, Conflict, Unavailable))]
pub(crate) async fn acquire_group_lease(
    State(app): App,
    Extension(principal): Extension<Principal>,
    Path((name, lease)): Path<(String, String)>,
    JsonBody(request): JsonBody<GroupLeaseRequest>,
) -> Answer<GroupLeaseAnswer> {
    require_role(
        &principal,
        &[Role::Admin, Role::Lender],
        "lead a share group",
    )?;
    check_group_name(&name)?;
    check_name("lease", &lease).map_err(|e| err(BrokerError::Invalid(e)))?;
    if request.ttl_ms == 0 || request.ttl_ms > MAX_GROUP_LEASE_TTL_MS {
        return Err(err(BrokerError::Invalid(leasehold_core::FieldError::new(
            "ttl_ms",
            format!("must be 1 to {MAX_GROUP_LEASE_TTL_MS}"),
        ))));
    }
    if request.holder.is_empty() || request.holder.len() > 128 {
        return Err(err(BrokerError::Invalid(leasehold_core::FieldError::new(
            "holder",
            "must be 1 to 128 characters",
        ))));
    }
    let now_ms = app.config.clock.now_ms();
    let mut store = app.reader.lock().unwrap_or_else(|p| p.into_inner());
    visible_group(store.as_mut(), &principal, &name)?;
    // Leases of different lenders' groups never share a name.
    let lease_name = format!("group/{name}/{lease}");
    let epoch = store
        .acquire_lease(&lease_name, &request.holder, request.ttl_ms, now_ms)
        .map_err(|e| err(e.into()))?;
    Ok(Json(GroupLeaseAnswer { epoch }))
}
