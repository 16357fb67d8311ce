//! HTTP for seed 003's reservations: workloads, pools (FIG. 3, 6), host
//! capacity (FIG. 5), warnings (FIG. 14), the agents' samples and a
//! planning round on demand; and the planner's timer. Handlers
//! authenticate, parse, build commands and map; core decides.

use crate::error::BrokerError;
use crate::http::{err, require_role, unexpected, NO_UNCOMMITTED_CHANGES};
use crate::openapi::{AuthErrors, BodyErrors, Conflict, NotFound, Unavailable};
use crate::AppState;
use axum::extract::{Path, State};
use axum::{Extension, Json};
use leasehold_api::{
    ms_from_rfc3339, rfc3339_from_ms, HostCapacityView, HostSampleAnswer, HostSampleRequest,
    InstancePoolLink, InstanceStatus, InstanceView, MigrateRequest, PlanRoundView, PoolList,
    PoolView, PowerSaveRequest, PowerSaveView, WarningView, WorkloadFile, WorkloadView,
};
use leasehold_core::command::{BrokerCommand, Outcome};
use leasehold_core::reservation::commands::{may_manage_workload, owner_share, plan_hosts, total};
use leasehold_core::reservation::report::Reporter;
use leasehold_core::reservation::warnings::{warnings, Warning, WarningReason};
use leasehold_core::reservation::{Pool, PoolPhase, ReservationBook, SampleWindow, Workload};
use leasehold_core::table::{Principal, TableView};
use leasehold_core::{FieldError, Role};
use leasehold_service::{ErrorResponse, JsonBody};
use std::sync::Arc;

type App = State<Arc<AppState>>;
type Answer<T> = Result<Json<T>, ErrorResponse>;

/// The file's times as milliseconds; the rest is checked in core.
fn workload_from_file(file: WorkloadFile, owner: &str) -> Result<Workload, BrokerError> {
    let start_ms = ms_from_rfc3339(&file.start).map_err(|p| FieldError::new("start", p))?;
    let end_ms = ms_from_rfc3339(&file.end).map_err(|p| FieldError::new("end", p))?;
    Ok(Workload {
        name: file.name,
        owner: owner.to_string(),
        priority: file.priority,
        start_ms,
        end_ms,
        instances: file.instances,
        rules: file.rules,
        seq: 0,
    })
}

#[utoipa::path(post, path = "/v1/workloads", tag = "reservations", request_body = WorkloadFile,
    description = "Create or replace a workload (seed 003; borrower or admin).",
    responses((status = 200, description = "The workload with each instance's status", body = WorkloadView),
        AuthErrors, BodyErrors, Conflict, Unavailable))]
pub(crate) async fn apply_workload(
    State(app): App,
    Extension(principal): Extension<Principal>,
    JsonBody(file): JsonBody<WorkloadFile>,
) -> Answer<WorkloadView> {
    require_role(
        &principal,
        &[Role::Borrower, Role::Admin],
        "apply workloads",
    )?;
    let workload = workload_from_file(file, &principal.name).map_err(err)?;
    let command = BrokerCommand::ApplyWorkload {
        principal: principal.clone(),
        workload: Box::new(workload),
    };
    match app.writer.submit(command).await.map_err(err)?.outcome {
        Outcome::WorkloadApplied(workload) => {
            Ok(Json(read_tables(&app, |t| t.workload_view(&workload))))
        }
        other => Err(unexpected(other)),
    }
}

#[utoipa::path(delete, path = "/v1/workloads/{name}", tag = "reservations",
    description = "Delete a workload; its pools give their capacity back.",
    params(("name" = String, Path, description = "The workload's name", pattern = "^[A-Za-z0-9._-]{1,64}$")),
    responses((status = 200, description = "Deleted", body = crate::openapi::Deleted),
        AuthErrors, NotFound, Unavailable))]
pub(crate) async fn delete_workload(
    State(app): App,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Answer<serde_json::Value> {
    require_role(
        &principal,
        &[Role::Borrower, Role::Admin],
        "delete workloads",
    )?;
    let command = BrokerCommand::DeleteWorkload { principal, name };
    match app.writer.submit(command).await.map_err(err)?.outcome {
        Outcome::WorkloadDeleted { name } => Ok(Json(serde_json::json!({ "deleted": name }))),
        other => Err(unexpected(other)),
    }
}

#[utoipa::path(delete, path = "/v1/instances/{name}", tag = "reservations",
    description = "Delete one instance of a workload.",
    params(("name" = String, Path, description = "The instance's name", pattern = "^[A-Za-z0-9._-]{1,64}$")),
    responses((status = 200, description = "Deleted", body = crate::openapi::Deleted),
        AuthErrors, NotFound, Unavailable))]
pub(crate) async fn delete_instance(
    State(app): App,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Answer<serde_json::Value> {
    require_role(
        &principal,
        &[Role::Borrower, Role::Admin],
        "delete instances",
    )?;
    let command = BrokerCommand::DeleteInstance {
        principal,
        name: name.clone(),
    };
    match app.writer.submit(command).await.map_err(err)?.outcome {
        Outcome::WorkloadApplied(_) | Outcome::WorkloadDeleted { .. } => {
            Ok(Json(serde_json::json!({ "deleted": name })))
        }
        other => Err(unexpected(other)),
    }
}

#[utoipa::path(post, path = "/v1/instances/{name}/migrate", tag = "reservations", request_body = MigrateRequest,
    description = "Move a placed instance to another host: a pool ramps there and takes over once it holds the target.",
    params(("name" = String, Path, description = "The instance's name", pattern = "^[A-Za-z0-9._-]{1,64}$")),
    responses((status = 200, description = "The instance is moving", body = crate::openapi::Moving),
        AuthErrors, BodyErrors, NotFound, Conflict, Unavailable))]
pub(crate) async fn migrate_instance(
    State(app): App,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
    JsonBody(request): JsonBody<MigrateRequest>,
) -> Answer<serde_json::Value> {
    require_role(
        &principal,
        &[Role::Borrower, Role::Admin],
        "migrate instances",
    )?;
    let command = BrokerCommand::MigrateInstance {
        principal,
        name,
        to_host: request.to,
    };
    match app.writer.submit(command).await.map_err(err)?.outcome {
        Outcome::InstanceMoving { instance, to_host } => Ok(Json(
            serde_json::json!({ "instance": instance, "moving_to": to_host }),
        )),
        other => Err(unexpected(other)),
    }
}

/// A host powered down stays so until powered up; an hour by default is
/// "soon" for a start that keeps a host up.
const DEFAULT_POWER_HORIZON_SECS: u64 = 3600;

#[utoipa::path(post, path = "/v1/power/save", tag = "reservations", request_body = PowerSaveRequest,
    description = "Drain the least-used host that may go (admin): its instances move elsewhere, it takes no new pools.",
    responses((status = 200, description = "The host drained", body = PowerSaveView),
        AuthErrors, BodyErrors, Conflict, Unavailable))]
pub(crate) async fn power_save(
    State(app): App,
    Extension(principal): Extension<Principal>,
    JsonBody(request): JsonBody<PowerSaveRequest>,
) -> Answer<PowerSaveView> {
    require_role(&principal, &[Role::Admin], "save power")?;
    let horizon_ms = request
        .horizon_secs
        .unwrap_or(DEFAULT_POWER_HORIZON_SECS)
        .saturating_mul(1000);
    match app
        .writer
        .submit(BrokerCommand::PowerSave { horizon_ms })
        .await
        .map_err(err)?
        .outcome
    {
        Outcome::PowerSaved {
            host_id,
            demands_moved,
        } => Ok(Json(PowerSaveView {
            host_id,
            instances_moving: demands_moved,
        })),
        other => Err(unexpected(other)),
    }
}

#[utoipa::path(post, path = "/v1/power/up/{host_id}", tag = "reservations",
    description = "Power a drained host up again (admin).",
    params(("host_id" = String, Path, description = "The host's id", pattern = "^[a-z0-9][a-z0-9._-]{0,63}$")),
    responses((status = 200, description = "Powered up", body = crate::openapi::PoweredUp),
        AuthErrors, NotFound, Conflict, Unavailable))]
pub(crate) async fn power_up(
    State(app): App,
    Extension(principal): Extension<Principal>,
    Path(host_id): Path<String>,
) -> Answer<serde_json::Value> {
    require_role(&principal, &[Role::Admin], "power hosts up")?;
    match app
        .writer
        .submit(BrokerCommand::PowerUp { host_id })
        .await
        .map_err(err)?
        .outcome
    {
        Outcome::PoweredUp { host_id } => Ok(Json(serde_json::json!({ "powered_up": host_id }))),
        other => Err(unexpected(other)),
    }
}

#[utoipa::path(get, path = "/v1/workloads", tag = "reservations",
    responses((status = 200, description = "The caller's workloads (an admin's: all)", body = Vec<WorkloadView>), AuthErrors))]
pub(crate) async fn list_workloads(
    State(app): App,
    Extension(principal): Extension<Principal>,
) -> Answer<Vec<WorkloadView>> {
    Ok(Json(read_tables(&app, |t| {
        t.book()
            .workloads
            .values()
            .filter(|w| may_manage_workload(&principal, w))
            .map(|w| t.workload_view(w))
            .collect()
    })))
}

#[utoipa::path(get, path = "/v1/workloads/{name}", tag = "reservations",
    params(("name" = String, Path, description = "The workload's name", pattern = "^[A-Za-z0-9._-]{1,64}$")),
    responses((status = 200, description = "The workload", body = WorkloadView), AuthErrors, NotFound))]
pub(crate) async fn get_workload(
    State(app): App,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Answer<WorkloadView> {
    read_tables(&app, |t| {
        t.book()
            .workloads
            .get(&name)
            .filter(|w| may_manage_workload(&principal, w))
            .map(|w| t.workload_view(w))
    })
    .map(Json)
    .ok_or_else(|| {
        err(BrokerError::NotFound(format!(
            "no workload named '{name}' (of yours)"
        )))
    })
}

#[utoipa::path(get, path = "/v1/pools", tag = "reservations",
    responses((status = 200, description = "Acquisition pools and instance-pool links the caller may see", body = PoolList), AuthErrors))]
pub(crate) async fn list_pools(
    State(app): App,
    Extension(principal): Extension<Principal>,
) -> Answer<PoolList> {
    Ok(Json(read_tables(&app, |t| t.pool_list(&principal))))
}

#[utoipa::path(get, path = "/v1/host-capacity", tag = "reservations",
    responses((status = 200, description = "Per host: total, owner share, lent, available, held, not yet acquired", body = Vec<HostCapacityView>), AuthErrors))]
pub(crate) async fn host_capacity(
    State(app): App,
    Extension(principal): Extension<Principal>,
) -> Answer<Vec<HostCapacityView>> {
    Ok(Json(read_tables(&app, |t| t.host_capacity(&principal))))
}

#[utoipa::path(get, path = "/v1/warnings", tag = "reservations",
    responses((status = 200, description = "Instances whose target will not be held by their start", body = Vec<WarningView>), AuthErrors))]
pub(crate) async fn list_warnings(
    State(app): App,
    Extension(principal): Extension<Principal>,
) -> Answer<Vec<WarningView>> {
    Ok(Json(read_tables(&app, |t| t.warnings(&principal))))
}

#[utoipa::path(post, path = "/v1/plan", tag = "reservations",
    description = "Run a planning round now (admin).",
    responses((status = 200, description = "What the round changed", body = PlanRoundView), AuthErrors, Unavailable))]
pub(crate) async fn plan_now(
    State(app): App,
    Extension(principal): Extension<Principal>,
) -> Answer<PlanRoundView> {
    require_role(&principal, &[Role::Admin], "run a planning round")?;
    release_ended_leases(&app).await;
    let policy = app.config.plan_policy;
    match app
        .writer
        .submit(BrokerCommand::PlanRound { policy })
        .await
        .map_err(err)?
        .outcome
    {
        Outcome::PlanRoundRan { changes } => Ok(Json(PlanRoundView { changes, policy })),
        other => Err(unexpected(other)),
    }
}

#[utoipa::path(post, path = "/v1/hosts/{host_id}/samples", tag = "reservations", request_body = HostSampleRequest,
    description = "An agent's sample of what its owner uses; answers what pools hold on the host (the lender owning the host, or its host credential).",
    params(("host_id" = String, Path, description = "The host's id", pattern = "^[a-z0-9][a-z0-9._-]{0,63}$")),
    responses((status = 200, description = "What is guaranteed on the host, and when to sample next", body = HostSampleAnswer),
        AuthErrors, BodyErrors, NotFound, Unavailable))]
pub(crate) async fn host_sample(
    State(app): App,
    Extension(principal): Extension<Principal>,
    Path(host_id): Path<String>,
    JsonBody(request): JsonBody<HostSampleRequest>,
) -> Answer<HostSampleAnswer> {
    require_role(&principal, &[Role::Lender], "report host samples")?;
    let owned = {
        let state = app.state.read().unwrap_or_else(|p| p.into_inner());
        state
            .hosts
            .get(&host_id)
            .is_some_and(|h| h.row.lender == principal.name)
    };
    if !owned {
        // Another lender's host answers like an unknown one.
        return Err(err(BrokerError::NotFound(
            "no such host is registered".into(),
        )));
    }
    let command = BrokerCommand::RecordHostSample {
        host_id,
        owner_used: request.owner_used,
        plan_interval_ms: app.config.plan_policy.interval_ms,
    };
    match app.writer.submit(command).await.map_err(err)?.outcome {
        Outcome::HostSampleRecorded {
            guaranteed,
            next_sample_after_ms,
        } => Ok(Json(HostSampleAnswer {
            guaranteed,
            next_sample_after_ms,
        })),
        other => Err(unexpected(other)),
    }
}

/// Runs `read` over the committed tables at the broker's time.
fn read_tables<T>(app: &AppState, read: impl FnOnce(&Tables) -> T) -> T {
    let state = app.state.read().unwrap_or_else(|p| p.into_inner());
    let view = TableView::new(&state, &NO_UNCOMMITTED_CHANGES);
    let hosts = plan_hosts(view);
    let now_ms = app.config.clock.now_ms();
    let tables = Tables {
        view,
        reporter: Reporter::new(view.reservations(), &hosts, app.config.plan_policy, now_ms),
        hosts: &hosts,
        policy: app.config.plan_policy,
        now_ms,
    };
    read(&tables)
}

/// The committed tables with what their views need.
struct Tables<'a> {
    view: TableView<'a>,
    reporter: Reporter<'a>,
    hosts: &'a [leasehold_core::reservation::planner::PlanHost<'a>],
    policy: leasehold_core::reservation::planner::PlanPolicy,
    now_ms: u64,
}

impl Tables<'_> {
    fn book(&self) -> &ReservationBook {
        self.view.reservations()
    }

    fn pool_view(&self, pool: &Pool) -> PoolView {
        let completion = self.reporter.expected_completion_ms(pool);
        PoolView {
            pool_id: pool.pool_id,
            host_id: pool.host_id.clone(),
            workload: pool.workload.clone(),
            instances: pool.instances.clone(),
            phase: pool.phase,
            acquiring: pool.phase == PoolPhase::Acquiring,
            allocated: pool.allocated,
            requested: pool.requested,
            acquired: pool.acquired,
            target: pool.target,
            sampled_at: pool.sampled_at_ms.map(rfc3339_from_ms),
            sampled_at_ms: pool.sampled_at_ms,
            expected_completion: completion.map(rfc3339_from_ms),
            expected_completion_ms: completion,
        }
    }

    /// Pools the principal may see: an admin all, a borrower those of their
    /// workloads, a lender those on their hosts.
    fn may_see_pool(&self, principal: &Principal, pool: &Pool) -> bool {
        match principal.role {
            Role::Admin => true,
            Role::Lender => self.view.host(&pool.host_id).is_some_and(|h| {
                h.row.lender == principal.name
                    && !matches!(&principal.host_scope, Some(scope) if scope != &pool.host_id)
            }),
            _ => self
                .book()
                .workloads
                .get(&pool.workload)
                .is_some_and(|w| w.owner == principal.name),
        }
    }

    fn pool_list(&self, principal: &Principal) -> PoolList {
        let visible: Vec<&Pool> = self
            .book()
            .pools
            .values()
            .filter(|p| self.may_see_pool(principal, p))
            .collect();
        let links = visible
            .iter()
            .flat_map(|pool| {
                pool.instances.iter().map(|instance| InstancePoolLink {
                    instance: instance.clone(),
                    workload: pool.workload.clone(),
                    pool_id: pool.pool_id,
                    host_id: pool.host_id.clone(),
                })
            })
            .collect();
        PoolList {
            pools: visible.iter().map(|p| self.pool_view(p)).collect(),
            links,
        }
    }

    fn workload_view(&self, workload: &Workload) -> WorkloadView {
        let demands = workload.demands();
        let instances = workload
            .instances
            .iter()
            .map(|spec| {
                let demand = demands.iter().find(|d| d.instances.contains(&spec.name));
                let pools: Vec<&Pool> = demand
                    .map(|d| self.book().pools_of_demand(&d.key).collect())
                    .unwrap_or_default();
                // The chosen pool, else the one furthest along.
                let pool = pools
                    .iter()
                    .max_by_key(|p| {
                        (
                            p.phase != PoolPhase::Acquiring,
                            p.acquired.memory_mib,
                            p.acquired.cpu_centicores,
                        )
                    })
                    .copied();
                let status = match pool.map(|p| p.phase) {
                    _ if self.now_ms >= workload.end_ms => InstanceStatus::Ended,
                    Some(PoolPhase::HandedOver) => InstanceStatus::Running,
                    Some(PoolPhase::Chosen) => InstanceStatus::Guaranteed,
                    Some(PoolPhase::Acquiring) => InstanceStatus::Acquiring,
                    None => InstanceStatus::Waiting,
                };
                let completion = pool.and_then(|p| self.reporter.expected_completion_ms(p));
                InstanceView {
                    name: spec.name.clone(),
                    vcpus: spec.vcpus,
                    memory_mib: spec.memory_mib,
                    disk_gib: spec.disk_gib,
                    image: spec.image.clone(),
                    status,
                    host_id: pool.map(|p| p.host_id.clone()),
                    pool_id: pool.map(|p| p.pool_id),
                    acquired: pool.map(|p| p.held()).unwrap_or_default(),
                    target: demand.map(|d| d.target).unwrap_or_else(|| spec.capacity()),
                    expected_completion: completion.map(rfc3339_from_ms),
                    expected_completion_ms: completion,
                }
            })
            .collect();
        WorkloadView {
            name: workload.name.clone(),
            owner: workload.owner.clone(),
            priority: workload.priority,
            start: rfc3339_from_ms(workload.start_ms),
            end: rfc3339_from_ms(workload.end_ms),
            start_ms: workload.start_ms,
            end_ms: workload.end_ms,
            instances,
            rules: workload.rules.clone(),
        }
    }

    /// FIG. 5 for the hosts the principal may see: an admin all, a lender
    /// theirs, a borrower those holding pools of their workloads.
    fn host_capacity(&self, principal: &Principal) -> Vec<HostCapacityView> {
        let book = self.book();
        self.hosts
            .iter()
            .filter_map(|plan_host| {
                let host = self.view.host(plan_host.host_id)?;
                let visible = match principal.role {
                    Role::Admin => true,
                    Role::Lender => host.row.lender == principal.name,
                    _ => book
                        .pools_on_host(plan_host.host_id)
                        .any(|p| self.may_see_pool(principal, p)),
                };
                if !visible {
                    return None;
                }
                let latest = plan_host.window.and_then(SampleWindow::latest);
                let held = book.held_on_host(plan_host.host_id);
                Some(HostCapacityView {
                    host_id: plan_host.host_id.to_string(),
                    total: total(&host.row.capacity),
                    owner_share: owner_share(&host.row.capacity),
                    lent: plan_host.lent,
                    available: latest.map(|s| s.available),
                    held,
                    not_yet_acquired: latest.map(|s| s.available.saturating_sub(held)),
                    owner_used: latest.map(|s| s.owner_used),
                    sampled_at: latest.map(|s| rfc3339_from_ms(s.at_ms)),
                    sampled_at_ms: latest.map(|s| s.at_ms),
                    powered_down: book.powered_off.contains_key(plan_host.host_id),
                })
            })
            .collect()
    }

    fn warnings(&self, principal: &Principal) -> Vec<WarningView> {
        let book = self.book();
        warnings(book, self.hosts, self.policy, self.now_ms)
            .into_iter()
            .filter(|w| {
                book.workloads
                    .get(&w.workload)
                    .is_some_and(|wl| may_manage_workload(principal, wl))
            })
            .map(warning_view)
            .collect()
    }
}

fn warning_view(warning: Warning) -> WarningView {
    let message = match warning.reason {
        WarningReason::LargerThanAnyHost => "no host could ever hold this target; make the instance smaller or add a larger host".to_string(),
        WarningReason::NotByStart => match warning.earliest_start_ms {
            Some(at) => format!("the target will not be held by the start; it would be by {}, or reduce the target to the largest guarantee reachable by the start", rfc3339_from_ms(at)),
            None => "capacity is not freeing up fast enough to hold the target on any host; reduce it to the largest guarantee reachable by the start".to_string(),
        },
        WarningReason::Fruitless => format!("the ramp gained nothing for {} rounds", warning.fruitless_rounds),
    };
    WarningView {
        workload: warning.workload,
        instances: warning.instances,
        reason: warning.reason,
        message,
        target: warning.target,
        start: rfc3339_from_ms(warning.start_ms),
        start_ms: warning.start_ms,
        earliest_start: warning.earliest_start_ms.map(rfc3339_from_ms),
        earliest_start_ms: warning.earliest_start_ms,
        largest_guarantee: warning.largest_guarantee,
        largest_guarantee_host: warning.largest_guarantee_host,
    }
}

/// Runs a planning round every interval of the broker's policy (none when
/// it is 0: tests run rounds with `POST /v1/plan`). The round reads the
/// broker's clock, so a simulated clock decides what each round sees.
pub(crate) fn spawn_planner(app: Arc<AppState>) {
    let interval_ms = app.config.plan_policy.interval_ms;
    if interval_ms == 0 || !app.config.run_planner {
        return;
    }
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(std::time::Duration::from_millis(interval_ms));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            release_ended_leases(&app).await;
            let policy = app.config.plan_policy;
            match app.writer.submit(BrokerCommand::PlanRound { policy }).await {
                Ok(_) => {}
                Err(BrokerError::Unavailable) => return,
                Err(error) => {
                    tracing::warn!(%error, "a planning round failed; the next one tries again")
                }
            }
        }
    });
}

/// Leases booked for a window are released when it ends, as their
/// borrower would (the bill stops at the end either way; this frees the
/// partition for its lender and the next borrower).
pub(crate) async fn release_ended_leases(app: &AppState) {
    let now_ms = app.config.clock.now_ms();
    let ended: Vec<(u64, String)> = {
        let state = app.state.read().unwrap_or_else(|p| p.into_inner());
        state
            .active_leases
            .values()
            .filter(|lease| lease.ends_at_ms.is_some_and(|end| end <= now_ms))
            .map(|lease| (lease.lease_id, lease.borrower.clone()))
            .collect()
    };
    for (lease_id, borrower) in ended {
        let command = BrokerCommand::Release {
            releaser: Principal {
                name: borrower,
                role: Role::Borrower,
                host_scope: None,
            },
            lease_id,
            commission_basis_points: app.config.commission_basis_points,
        };
        if let Err(error) = app.writer.submit(command).await {
            tracing::warn!(lease_id, %error, "cannot release a lease whose window ended; trying again next round");
        }
    }
}
