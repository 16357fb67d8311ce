//! The broker's reservation commands decided against the table: applying
//! and deleting workloads, recording a host's sample, running a planning
//! round. `command::decide` hands these variants here.

use super::capacity::Capacity;
use super::moves::{host_to_power_down, power_down_changes, MoveTarget};
use super::planner::{plan_round, PlanHost, PlanPolicy};
use super::{HostSample, PoolPhase, ReservationBook, ReservationChange, Workload};
use crate::command::{BrokerCommand, Decision, Outcome, Refusal};
use crate::table::{Change, HostEntry, Principal, TableView};
use crate::{FieldError, HostCapacity, Role};
use std::collections::BTreeSet;

/// Decides the reservation commands (seed 003); `command::decide` hands
/// them here.
pub fn decide(
    table: TableView<'_>,
    command: &BrokerCommand,
    now_ms: u64,
) -> Result<Decision, Refusal> {
    match command {
        BrokerCommand::ApplyWorkload {
            principal,
            workload,
        } => decide_apply_workload(table, principal, workload),
        BrokerCommand::DeleteWorkload { principal, name } => {
            decide_delete_workload(table, principal, name)
        }
        BrokerCommand::DeleteInstance { principal, name } => {
            decide_delete_instance(table, principal, name)
        }
        BrokerCommand::RecordHostSample {
            host_id,
            owner_used,
            plan_interval_ms,
        } => decide_host_sample(table, host_id, *owner_used, *plan_interval_ms, now_ms),
        BrokerCommand::PlanRound { policy } => decide_plan_round(table, *policy, now_ms),
        BrokerCommand::MigrateInstance {
            principal,
            name,
            to_host,
        } => decide_migrate(table, principal, name, to_host),
        BrokerCommand::PowerSave { horizon_ms } => decide_power_save(table, *horizon_ms, now_ms),
        BrokerCommand::PowerUp { host_id } => decide_power_up(table, host_id),
        other => Err(Refusal::Internal(format!(
            "not a reservation command: {other:?}"
        ))),
    }
}

/// A start this close (in planning intervals) makes its host sample faster.
const NEAR_START_INTERVALS: u64 = 10;

/// The owner share of a host as a capacity.
pub fn owner_share(capacity: &HostCapacity) -> Capacity {
    Capacity::new(
        capacity.owner_share_cpu_centicores,
        capacity.owner_share_memory_mib,
        capacity.owner_share_disk_gib,
    )
}

pub fn total(capacity: &HostCapacity) -> Capacity {
    Capacity::new(
        capacity.cpu_centicores,
        capacity.memory_mib,
        capacity.disk_gib,
    )
}

/// What the host's partitions in the market take (withdrawn ones do not).
pub fn lent_on_host(table: TableView<'_>, host: &HostEntry) -> Capacity {
    let mut lent = Capacity::ZERO;
    for index in &host.partitions {
        let partition = crate::PartitionRef::new(host.row.host_id.clone(), *index);
        if let Some(entry) = table.partition(&partition).filter(|e| !e.withdrawn) {
            lent = lent.saturating_add(Capacity::new(
                entry.terms.cpu_centicores(),
                entry.terms.memory_mib,
                entry.terms.disk_gib,
            ));
        }
    }
    lent
}

/// Every host as the planner sees it, in host id order.
pub fn plan_hosts<'a>(table: TableView<'a>) -> Vec<PlanHost<'a>> {
    let mut hosts: Vec<PlanHost<'a>> = table
        .hosts()
        .map(|host| PlanHost {
            host_id: host.row.host_id.as_str(),
            lendable: total(&host.row.capacity).saturating_sub(owner_share(&host.row.capacity)),
            lent: lent_on_host(table, host),
            window: table.sample_window(&host.row.host_id),
        })
        .collect();
    hosts.sort_by_key(|host| host.host_id);
    hosts
}

/// A workload is its owner's, and an admin's, to see, change and delete.
pub fn may_manage_workload(principal: &Principal, workload: &Workload) -> bool {
    workload.owner == principal.name || principal.role == Role::Admin
}

/// The workload of `instance`, if `principal` may manage it (an instance
/// the caller may not see answers as a missing one).
fn instance_workload<'a>(
    book: &'a ReservationBook,
    principal: &Principal,
    instance: &str,
) -> Result<&'a Workload, Refusal> {
    book.instance_owner
        .get(instance)
        .and_then(|name| book.workloads.get(name))
        .filter(|w| may_manage_workload(principal, w))
        .ok_or_else(|| Refusal::NoSuchInstance {
            name: instance.to_string(),
        })
}

/// Creates or replaces `principal`'s workload. Pools of instances whose
/// demand changed go (their capacity back to the host); others stay.
pub fn decide_apply_workload(
    table: TableView<'_>,
    principal: &Principal,
    workload: &Workload,
) -> Result<Decision, Refusal> {
    workload.validate().map_err(Refusal::Invalid)?;
    let book = table.reservations();
    let existing = book.workloads.get(&workload.name);
    if let Some(existing) = existing {
        if !may_manage_workload(principal, existing) {
            return Err(Refusal::WorkloadOwnedByAnother {
                name: workload.name.clone(),
            });
        }
    }
    for (index, instance) in workload.instances.iter().enumerate() {
        match book.instance_owner.get(&instance.name) {
            Some(other) if other != &workload.name => {
                return Err(Refusal::Invalid(FieldError::new(
                    format!("instance[{index}].name"),
                    format!("`{}` is already an instance of workload `{other}`; instance names are unique", instance.name),
                )))
            }
            _ => {}
        }
    }
    let mut stored = workload.clone();
    stored.owner = existing.map_or(principal.name.clone(), |w| w.owner.clone());
    stored.seq = existing.map_or(book.last_workload_seq + 1, |w| w.seq);
    let mut changes = Vec::new();
    if let Some(existing) = existing {
        let kept = stored.demands();
        let same_timing = existing.start_ms == stored.start_ms && existing.end_ms == stored.end_ms;
        for old in existing.demands() {
            let unchanged = same_timing && kept.contains(&old);
            if !unchanged {
                forget_demand(book, &old.key, &mut changes);
            }
        }
    }
    changes.push(Change::Reservation(ReservationChange::PutWorkload(
        stored.clone(),
    )));
    Ok(Decision {
        outcome: Outcome::WorkloadApplied(Box::new(stored)),
        changes,
    })
}

/// The demand's pools go and its counter is forgotten.
fn forget_demand(book: &ReservationBook, demand: &str, changes: &mut Vec<Change>) {
    for pool in book.pools_of_demand(demand) {
        changes.push(Change::Reservation(ReservationChange::RemovePool {
            pool_id: pool.pool_id,
        }));
    }
    if book.fruitless_rounds.contains_key(demand) {
        changes.push(Change::Reservation(ReservationChange::SetFruitlessRounds {
            demand: demand.to_string(),
            rounds: 0,
        }));
    }
}

/// Deletes a workload (its owner or an admin): its pools give their
/// capacity back to their hosts (FIG. 16).
pub fn decide_delete_workload(
    table: TableView<'_>,
    principal: &Principal,
    name: &str,
) -> Result<Decision, Refusal> {
    let book = table.reservations();
    let workload = book
        .workloads
        .get(name)
        .filter(|w| may_manage_workload(principal, w))
        .ok_or_else(|| Refusal::NoSuchWorkload {
            name: name.to_string(),
        })?;
    let mut changes = Vec::new();
    for demand in workload.demands() {
        forget_demand(book, &demand.key, &mut changes);
    }
    changes.push(Change::Reservation(ReservationChange::RemoveWorkload {
        name: name.to_string(),
    }));
    Ok(Decision {
        outcome: Outcome::WorkloadDeleted {
            name: name.to_string(),
        },
        changes,
    })
}

/// Records a host's sample on the broker's clock and answers what is
/// guaranteed there and when to sample next.
pub fn decide_host_sample(
    table: TableView<'_>,
    host_id: &str,
    owner_used: Capacity,
    plan_interval_ms: u64,
    now_ms: u64,
) -> Result<Decision, Refusal> {
    let host = table.host(host_id).ok_or(Refusal::NoSuchHost)?;
    let capacity = total(&host.row.capacity);
    if let Some((field, used, most)) = owner_used.first_excess(capacity) {
        return Err(Refusal::Invalid(FieldError::new(
            format!("owner_used.{field}"),
            format!("{used} is more than the host has ({most})"),
        )));
    }
    let counted_owner = owner_used.max(owner_share(&host.row.capacity));
    let available = capacity
        .saturating_sub(counted_owner)
        .saturating_sub(lent_on_host(table, host));
    let sample = HostSample {
        at_ms: now_ms,
        owner_used,
        available,
    };
    let book = table.reservations();
    let near_start = book.pools_on_host(host_id).any(|pool| {
        pool.phase != PoolPhase::HandedOver
            && book.workloads.get(&pool.workload).is_some_and(|w| {
                w.start_ms.saturating_sub(now_ms)
                    <= plan_interval_ms.saturating_mul(NEAR_START_INTERVALS)
            })
    });
    Ok(Decision {
        outcome: Outcome::HostSampleRecorded {
            guaranteed: book.held_on_host(host_id),
            // Denser as a start nears (seed 003): twice per interval then.
            next_sample_after_ms: if near_start {
                (plan_interval_ms / 2).max(1)
            } else {
                plan_interval_ms
            },
        },
        changes: vec![Change::RecordSample {
            host_id: host_id.to_string(),
            sample,
        }],
    })
}

/// One planning round at `now_ms`.
pub fn decide_plan_round(
    table: TableView<'_>,
    policy: PlanPolicy,
    now_ms: u64,
) -> Result<Decision, Refusal> {
    let hosts = plan_hosts(table);
    let changes: Vec<Change> = plan_round(table.reservations(), &hosts, policy, now_ms)
        .into_iter()
        .map(Change::Reservation)
        .collect();
    Ok(Decision {
        outcome: Outcome::PlanRoundRan {
            changes: changes.len(),
        },
        changes,
    })
}

/// Deletes one instance (FIG. 16): its workload goes on without it, and
/// the pool of its demand gives its capacity back (a pack group's pool
/// goes too, and is planned again for the instances left in it).
pub fn decide_delete_instance(
    table: TableView<'_>,
    principal: &Principal,
    instance: &str,
) -> Result<Decision, Refusal> {
    let book = table.reservations();
    let workload = instance_workload(book, principal, instance)?;
    if workload.instances.len() == 1 {
        return decide_delete_workload(table, principal, &workload.name.clone());
    }
    let mut smaller = workload.clone();
    smaller.instances.retain(|i| i.name != instance);
    for rule in &mut smaller.rules {
        rule.instances.retain(|i| i != instance);
    }
    smaller.rules.retain(|rule| !rule.instances.is_empty());
    decide_apply_workload(table, principal, &smaller)
}

/// Starts moving a placed instance's demand to `to_host` (FIG. 15): the
/// planner ramps a pool there and switches once it holds the target.
pub fn decide_migrate(
    table: TableView<'_>,
    principal: &Principal,
    instance: &str,
    to_host: &str,
) -> Result<Decision, Refusal> {
    let book = table.reservations();
    let workload = instance_workload(book, principal, instance)?;
    let host = table.host(to_host).ok_or(Refusal::NoSuchHost)?;
    if book.powered_off.contains_key(to_host) {
        return Err(Refusal::Invalid(FieldError::new(
            "to",
            format!("host '{to_host}' is powered down; power it up first"),
        )));
    }
    let demand = workload
        .demands()
        .into_iter()
        .find(|d| d.instances.iter().any(|i| i == instance))
        .ok_or_else(|| Refusal::Internal(format!("instance {instance} has no demand")))?;
    let placed = book
        .pools_of_demand(&demand.key)
        .find(|p| p.phase != PoolPhase::Acquiring)
        .ok_or_else(|| {
            Refusal::Invalid(FieldError::new(
                "name",
                format!("instance '{instance}' holds no guarantee yet; the planner places it"),
            ))
        })?;
    if placed.host_id == to_host {
        return Err(Refusal::Invalid(FieldError::new(
            "to",
            format!("instance '{instance}' is on '{to_host}' already"),
        )));
    }
    let others = book.held_on_host(to_host);
    let lendable = total(&host.row.capacity).saturating_sub(owner_share(&host.row.capacity));
    let room = lendable
        .saturating_sub(lent_on_host(table, host))
        .saturating_sub(others);
    if let Some((field, want, has)) = demand.target.first_excess(room) {
        return Err(Refusal::Invalid(FieldError::new(
            "to",
            format!("host '{to_host}' can never hold it: {field} {want} wanted, {has} at most"),
        )));
    }
    Ok(Decision {
        outcome: Outcome::InstanceMoving {
            instance: instance.to_string(),
            to_host: to_host.to_string(),
        },
        changes: vec![Change::Reservation(ReservationChange::SetMove {
            demand: demand.key,
            target: Some(MoveTarget::Host {
                host_id: to_host.to_string(),
            }),
        })],
    })
}

/// Power saving (FIG. 17): drains the least-used host that may go (none of
/// its partitions leased, no pool on it of a start within `horizon_ms`).
pub fn decide_power_save(
    table: TableView<'_>,
    horizon_ms: u64,
    now_ms: u64,
) -> Result<Decision, Refusal> {
    let hosts = plan_hosts(table);
    let leased: BTreeSet<String> = table
        .hosts()
        .filter(|host| {
            host.partitions.iter().any(|index| {
                let partition = crate::PartitionRef::new(host.row.host_id.clone(), *index);
                table
                    .partition(&partition)
                    .is_some_and(|e| e.lease_id.is_some())
            })
        })
        .map(|host| host.row.host_id.clone())
        .collect();
    let book = table.reservations();
    let Some(host_id) = host_to_power_down(book, &hosts, &leased, horizon_ms, now_ms) else {
        return Ok(Decision {
            outcome: Outcome::PowerSaved {
                host_id: None,
                demands_moved: 0,
            },
            changes: vec![],
        });
    };
    let changes = power_down_changes(book, &host_id);
    Ok(Decision {
        outcome: Outcome::PowerSaved {
            host_id: Some(host_id),
            demands_moved: changes.len() - 1,
        },
        changes: changes.into_iter().map(Change::Reservation).collect(),
    })
}

pub fn decide_power_up(table: TableView<'_>, host_id: &str) -> Result<Decision, Refusal> {
    table.host(host_id).ok_or(Refusal::NoSuchHost)?;
    Ok(Decision {
        outcome: Outcome::PoweredUp {
            host_id: host_id.to_string(),
        },
        changes: vec![Change::Reservation(ReservationChange::SetHostPower {
            host_id: host_id.to_string(),
            state: None,
        })],
    })
}
