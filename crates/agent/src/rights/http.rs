//! The manager's HTTP interface (seed 004). Reading the table and the
//! orders of lenders need this host's lender or an admin; grants and
//! revocations an admin (asked of the broker, like the lender check).
//! `POST /v1/rights/sync` is open: it carries no body and no secret, and
//! only makes the manager apply the table the store holds (one at a time),
//! which is what other managers ask of it in a transfer.

use crate::error::AgentError;
use crate::openapi::{AuthErrors, BodyErrors, Conflict, InvalidParameter, NotFound, Upstream};
use crate::Agent;
use axum::extract::{Path, State};
use axum::Json;
use leasehold_api::rights::*;
use leasehold_core::rights::Slot;
use leasehold_service::{bearer_token, ErrorResponse, JsonBody, QueryParams};
use serde::Deserialize;
use std::sync::Arc;

type App = State<Arc<Agent>>;
type Answer<T> = Result<Json<T>, ErrorResponse>;

fn err(error: AgentError) -> ErrorResponse {
    error.to_error_response()
}

fn manager(agent: &Agent) -> Result<&super::RightsManager, ErrorResponse> {
    agent.rights.as_ref().ok_or_else(|| {
        err(AgentError::NotFound(
            "this agent manages no share group; start it with --group NAME".into(),
        ))
    })
}

fn token(headers: &axum::http::HeaderMap) -> String {
    bearer_token(headers).unwrap_or_default().to_string()
}

/// The share group's rights table (FIG. 4A): from the store, or from this
/// manager's copy (marked stale) when the store is unreachable.
#[utoipa::path(get, path = "/v1/rights", tag = "rights",
    description = "The share group's table as this host's manager knows it (its lender, an admin, or a peer manager).",
    responses((status = 200, description = "The share group and its version", body = ShareGroupDocument),
        AuthErrors, NotFound, Upstream))]
pub(crate) async fn table(State(agent): App) -> Answer<ShareGroupDocument> {
    manager(&agent)?.document().await.map(Json).map_err(err)
}

#[utoipa::path(post, path = "/v1/rights/request", tag = "rights", request_body = RightsRequestBody,
    description = "Ask for modules of usage rights for a partition of the group.",
    responses((status = 200, description = "The transfers committed and aborted", body = RightsOrderAnswer),
        AuthErrors, BodyErrors, NotFound, Conflict, Upstream))]
pub(crate) async fn request(
    State(agent): App,
    headers: axum::http::HeaderMap,
    JsonBody(body): JsonBody<RightsRequestBody>,
) -> Answer<RightsOrderAnswer> {
    let manager = manager(&agent)?;
    let to = Slot::new(body.host_id, body.partition);
    manager
        .request(to, body.modules, &token(&headers))
        .await
        .map(Json)
        .map_err(err)
}

#[utoipa::path(post, path = "/v1/rights/release", tag = "rights", request_body = RightsSlotBody,
    description = "Give modules of a partition's rights back to the group.",
    responses((status = 200, description = "The transfers committed and aborted", body = RightsOrderAnswer),
        AuthErrors, BodyErrors, NotFound, Conflict, Upstream))]
pub(crate) async fn release(
    State(agent): App,
    JsonBody(body): JsonBody<RightsSlotBody>,
) -> Answer<RightsOrderAnswer> {
    let slot = Slot::new(body.host_id, body.partition);
    manager(&agent)?
        .release(slot, body.modules)
        .await
        .map(Json)
        .map_err(err)
}

#[utoipa::path(post, path = "/v1/rights/transfer", tag = "rights", request_body = RightsTransferBody,
    description = "Move modules of rights from one partition of the group to another.",
    responses((status = 200, description = "The transfers committed and aborted", body = RightsOrderAnswer),
        AuthErrors, BodyErrors, NotFound, Conflict, Upstream))]
pub(crate) async fn transfer(
    State(agent): App,
    headers: axum::http::HeaderMap,
    JsonBody(body): JsonBody<RightsTransferBody>,
) -> Answer<RightsOrderAnswer> {
    let from = Slot::new(body.from_host, body.from_partition);
    let to = Slot::new(body.to_host, body.to_partition);
    manager(&agent)?
        .transfer(from, to, body.modules, &token(&headers))
        .await
        .map(Json)
        .map_err(err)
}

#[utoipa::path(post, path = "/v1/rights/grant", tag = "rights", request_body = RightsGrantBody,
    description = "Grant a partition modules of rights, for good or until a time (an admin of the broker).",
    responses((status = 200, description = "The transfers committed and aborted", body = RightsOrderAnswer),
        AuthErrors, BodyErrors, NotFound, Conflict, Upstream))]
pub(crate) async fn grant(
    State(agent): App,
    headers: axum::http::HeaderMap,
    JsonBody(body): JsonBody<RightsGrantBody>,
) -> Answer<RightsOrderAnswer> {
    let slot = Slot::new(body.host_id, body.partition);
    manager(&agent)?
        .grant(slot, body.modules, body.expires_at_ms, &token(&headers))
        .await
        .map(Json)
        .map_err(err)
}

#[utoipa::path(post, path = "/v1/rights/revoke", tag = "rights", request_body = RightsSlotBody,
    description = "Revoke modules of a partition's rights (an admin of the broker).",
    responses((status = 200, description = "The transfers committed and aborted", body = RightsOrderAnswer),
        AuthErrors, BodyErrors, NotFound, Conflict, Upstream))]
pub(crate) async fn revoke(
    State(agent): App,
    JsonBody(body): JsonBody<RightsSlotBody>,
) -> Answer<RightsOrderAnswer> {
    let slot = Slot::new(body.host_id, body.partition);
    manager(&agent)?
        .revoke(slot, body.modules)
        .await
        .map(Json)
        .map_err(err)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct SyncQuery {
    /// Wait until the group's table is at this version (default 0).
    #[serde(default)]
    min_version: u64,
}

#[utoipa::path(post, path = "/v1/rights/sync", tag = "rights", security(()), params(SyncQuery),
    description = "The rights this host holds now, once the group's table is at `min_version` or later (peers of the group call it).",
    responses((status = 200, description = "This host's active modules per partition", body = RightsSyncAnswer),
        InvalidParameter, NotFound, Upstream))]
pub(crate) async fn sync(
    State(agent): App,
    QueryParams(query): QueryParams<SyncQuery>,
) -> Answer<RightsSyncAnswer> {
    manager(&agent)?
        .sync(query.min_version)
        .await
        .map(Json)
        .map_err(err)
}

#[utoipa::path(post, path = "/v1/group/hosts", tag = "rights", request_body = GroupAddBody,
    description = "Add a host to the share group (its lender or an admin).",
    responses((status = 200, description = "The transfers committed and aborted", body = RightsOrderAnswer),
        AuthErrors, BodyErrors, NotFound, Conflict, Upstream))]
pub(crate) async fn add_host(
    State(agent): App,
    JsonBody(body): JsonBody<GroupAddBody>,
) -> Answer<RightsOrderAnswer> {
    manager(&agent)?
        .add_host(&body.host_id, body.modules)
        .await
        .map(Json)
        .map_err(err)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct RemoveQuery {
    /// Hand the host's rights over to the rest of the group first.
    #[serde(default)]
    hand_over: bool,
}

#[utoipa::path(delete, path = "/v1/group/hosts/{host_id}", tag = "rights", params(RemoveQuery,
        ("host_id" = String, Path, description = "The host to remove", pattern = "^[a-z0-9][a-z0-9._-]{0,63}$")),
    description = "Remove a host from the share group (its lender or an admin), optionally handing its rights over.",
    responses((status = 200, description = "The transfers committed and aborted", body = RightsOrderAnswer),
        AuthErrors, InvalidParameter, NotFound, Conflict, Upstream))]
pub(crate) async fn remove_host(
    State(agent): App,
    Path(host_id): Path<String>,
    QueryParams(query): QueryParams<RemoveQuery>,
) -> Answer<RightsOrderAnswer> {
    manager(&agent)?
        .remove_host(&host_id, query.hand_over)
        .await
        .map(Json)
        .map_err(err)
}

/// How busy each partition's active modules were since the last tick, in
/// percent: the owner share from the owner's measured use, partitions from
/// their cgroups' CPU time (drivers without cgroups report none).
fn measure_workloads(
    agent: &Agent,
    manager: &super::RightsManager,
    cpu_samples: &mut std::collections::BTreeMap<u32, (u64, u64)>,
) -> std::collections::BTreeMap<u32, u32> {
    use super::workload::workload_percent;
    let applied = manager.applied();
    let now_ms = agent.config.clock.now_ms();
    let mut workloads = std::collections::BTreeMap::new();
    for (index, active) in &applied.active {
        let used_centicores = if *index == super::OWNER_SHARE {
            agent.owner_used_now().map(|used| used.cpu_centicores)
        } else {
            agent.driver.usage_of(*index).and_then(|usage| {
                let previous = cpu_samples.insert(*index, (usage.cpu_usage_ns, now_ms));
                let (ns_before, at_ms) = previous?;
                let elapsed_ms = now_ms.checked_sub(at_ms).filter(|ms| *ms > 0)?;
                Some(usage.cpu_usage_ns.saturating_sub(ns_before) / (elapsed_ms * 10_000))
            })
        };
        if let Some(percent) = used_centicores.and_then(|used| workload_percent(used, *active)) {
            workloads.insert(*index, percent);
        }
    }
    workloads
}

/// Ticks the manager (leases, expiry, clean-up) and publishes its loans
/// inside the host, until aborted.
pub(crate) fn spawn_tick_loop(agent: Arc<Agent>) -> Option<tokio::task::AbortHandle> {
    agent.rights.as_ref()?;
    let publisher = super::local_loans::publish_loop(agent.clone());
    let ticks = tick_loop(agent);
    let task = tokio::spawn(async move {
        tokio::join!(publisher, ticks);
    });
    Some(task.abort_handle())
}

async fn tick_loop(agent: Arc<Agent>) {
    let mut interval = tokio::time::interval(std::time::Duration::from_millis(
        super::flow::TICK_INTERVAL_MS,
    ));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    let mut cpu_samples = std::collections::BTreeMap::new();
    loop {
        interval.tick().await;
        let Some(manager) = agent.rights.as_ref() else {
            return;
        };
        let workloads = measure_workloads(&agent, manager, &mut cpu_samples);
        if let Err(error) = manager
            .observe_workloads(&workloads, &agent.config.lender_token)
            .await
        {
            tracing::debug!(%error, "could not record this tick's workloads");
        }
        let local_partitions = match agent.db().partitions() {
            Ok(rows) => rows.iter().map(|row| row.index).collect(),
            Err(_) => continue,
        };
        match manager.tick(&local_partitions).await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("the share group's store answers again");
            }
            Ok(()) => {}
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(%error, "the share group's manager cannot tick; serving this host from its copy");
            }
            Err(_) => {}
        }
    }
}
