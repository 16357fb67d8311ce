//! Every change of the broker's state is a [`BrokerCommand`]. [`decide`]
//! judges one against the table (as its batch sees it) at a given time and
//! answers either a [`Refusal`] or an [`Outcome`] with the [`Change`]s it
//! implies; it reads no clock, does no I/O and draws no randomness (token
//! hashes and lease-id high-water marks come in with the command and the
//! table). The broker's writer persists the changes, applies them to the
//! table after the commit and then answers. Later issues add variants
//! (reservations, usage-right transfers) beside these.

use crate::calendar::{Booking, Interval};
use crate::ids::{validate_host_id, LeaseId, PartitionRef};
use crate::lease::{
    decide_alter, decide_isolation, decide_lease, AlterRefusal, Bill, Lease, LeaseRefusal,
    LeaseState, ReleaseOutcome,
};
use crate::ledger;
use crate::matching::NoMatchExplanation;
use crate::reservation::planner::PlanPolicy;
use crate::reservation::{self, Capacity, Workload};
use crate::role::Role;
use crate::share::{carve_best, check_share_change, is_carved, Carved, ShareOffer};
use crate::table::{
    Change, HostCredentialRow, HostEntry, HostRow, PartitionEntry, PartitionRow, Principal,
    TableView,
};
use crate::terms::{HostCapacity, Requirements, Terms};
use crate::FieldError;

/// The window of a lease booked ahead, in milliseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseWindow {
    pub start_ms: u64,
    pub end_ms: u64,
}

/// A start this far in the past is taken as now (clocks differ a little);
/// an earlier one is refused.
const LEASE_START_SLACK_MS: u64 = 60_000;

/// When a lease starts, when its key works and when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LeaseTiming {
    now_ms: u64,
    started_at_ms: u64,
    key_expires_at_ms: u64,
    ends_at_ms: Option<u64>,
}

impl LeaseTiming {
    fn new(key_ttl_ms: u64, window: Option<LeaseWindow>, now_ms: u64) -> Result<Self, Refusal> {
        let Some(window) = window else {
            return Ok(LeaseTiming {
                now_ms,
                started_at_ms: now_ms,
                key_expires_at_ms: now_ms.saturating_add(key_ttl_ms),
                ends_at_ms: None,
            });
        };
        if window.start_ms.saturating_add(LEASE_START_SLACK_MS) < now_ms {
            return Err(Refusal::Invalid(FieldError::new("start", "is in the past")));
        }
        let started_at_ms = window.start_ms.max(now_ms);
        if window.end_ms <= started_at_ms {
            return Err(Refusal::Invalid(FieldError::new(
                "end",
                "must be after start (and after now)",
            )));
        }
        Ok(LeaseTiming {
            now_ms,
            started_at_ms,
            key_expires_at_ms: window.end_ms,
            ends_at_ms: Some(window.end_ms),
        })
    }
}

/// Which partition a lease request wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseTarget {
    /// A partition by name; `allow_unisolated` is the borrower's opt-in.
    Named {
        partition: PartitionRef,
        allow_unisolated: bool,
    },
    /// The best free partition meeting the requirements.
    Best(Requirements),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerCommand {
    CreatePrincipal {
        name: String,
        role: Role,
        token_sha256: String,
    },
    CreateHostCredential {
        lender: String,
        host_id: String,
        token_sha256: String,
    },
    RegisterHost {
        lender: String,
        host_id: String,
        agent_url: Option<String>,
        capacity: HostCapacity,
        /// A share to carve partitions from (`capacity` is its size).
        share: Option<ShareOffer>,
    },
    /// Registers a new partition or alters one (S14-S17, S22-S29).
    PutPartition {
        lender: String,
        partition: PartitionRef,
        terms: Terms,
    },
    WithdrawPartition {
        lender: String,
        partition: PartitionRef,
    },
    /// Concludes a lease (S45-S48); a retry with the same idempotency key
    /// answers the lease concluded the first time.
    Lease {
        borrower: String,
        target: LeaseTarget,
        idempotency_key: Option<String>,
        key_ttl_ms: u64,
        /// A lease booked ahead for `[start, end)` (seed 003): billed from
        /// its start, its key valid only inside the window; `None` leases
        /// from now until released.
        window: Option<LeaseWindow>,
    },
    /// Ends a lease and bills it (S58-S61).
    Release {
        releaser: Principal,
        lease_id: LeaseId,
        commission_basis_points: u32,
    },
    /// Idempotency records older than `before_ms` are forgotten.
    PruneIdempotency {
        before_ms: u64,
    },
    /// The agent acknowledged a release notice (or never will).
    ForgetReleaseNotice {
        lease_id: LeaseId,
    },
    /// Creates or replaces a workload (seed 003, FIG. 4); `owner` and
    /// `seq` of the workload given are set by the decision.
    ApplyWorkload {
        principal: Principal,
        workload: Box<Workload>,
    },
    DeleteWorkload {
        principal: Principal,
        name: String,
    },
    /// Deletes one instance of a workload (FIG. 16).
    DeleteInstance {
        principal: Principal,
        name: String,
    },
    /// A host's agent reports what the owner's own work uses now.
    RecordHostSample {
        host_id: String,
        owner_used: Capacity,
        plan_interval_ms: u64,
    },
    /// One round of the planner (FIG. 8-13).
    PlanRound {
        policy: PlanPolicy,
    },
    /// Moves a placed instance to another host (FIG. 15).
    MigrateInstance {
        principal: Principal,
        name: String,
        to_host: String,
    },
    /// Drains the least-used host that may go (FIG. 17).
    PowerSave {
        horizon_ms: u64,
    },
    PowerUp {
        host_id: String,
    },
}

/// What a decided command did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    PrincipalCreated,
    HostCredentialCreated,
    HostRegistered {
        host: HostRow,
        partitions: u64,
    },
    PartitionPut(PartitionRow),
    /// Withdrawn now, or withdrawn already (then nothing changed).
    PartitionWithdrawn(PartitionRow),
    /// A new lease; `agent_url` is where its host's agent listens.
    Leased {
        lease: Lease,
        agent_url: Option<String>,
    },
    /// The idempotency key concluded `lease_id` before; `lease` is `None`
    /// when it is neither active nor released in this batch (the broker
    /// reads it from the database).
    LeaseReplayed {
        lease_id: LeaseId,
        lease: Option<Lease>,
    },
    Released {
        lease: Lease,
        bill: Bill,
        agent_url: Option<String>,
    },
    /// Released earlier in the same batch: the same bill, nothing billed.
    AlreadyReleased {
        lease: Lease,
        bill: Bill,
    },
    IdempotencyPruned,
    ReleaseNoticeForgotten,
    WorkloadApplied(Box<Workload>),
    WorkloadDeleted {
        name: String,
    },
    HostSampleRecorded {
        guaranteed: Capacity,
        next_sample_after_ms: u64,
    },
    PlanRoundRan {
        changes: usize,
    },
    InstanceMoving {
        instance: String,
        to_host: String,
    },
    PowerSaved {
        host_id: Option<String>,
        demands_moved: usize,
    },
    PoweredUp {
        host_id: String,
    },
}

/// An outcome and the changes it implies, in the order they apply.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub outcome: Outcome,
    pub changes: Vec<Change>,
}

/// Why a command changed nothing.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    Invalid(FieldError),
    PrincipalExists {
        name: String,
    },
    /// No such host, or another lender's (they answer alike).
    NoSuchHost,
    NoSuchPartition(PartitionRef),
    HostOwnedByAnotherLender {
        host_id: String,
    },
    /// The lock rule: a leased partition cannot be altered or withdrawn.
    Locked {
        partition: PartitionRef,
        lease_id: LeaseId,
    },
    Conflict {
        partition: PartitionRef,
        lease_id: LeaseId,
    },
    Withdrawn(PartitionRef),
    /// The partition's calendar holds another booking over the interval
    /// asked for (a reservation; a lease answers `Conflict`).
    Booked {
        partition: PartitionRef,
        existing: Interval,
    },
    /// The borrower did not opt in to an unisolated partition.
    Unisolated(PartitionRef),
    NoMatch(Box<NoMatchExplanation>),
    /// No lease the caller may see by that id (whether it exists or not).
    NoSuchLease,
    /// The caller sees the lease but is not its borrower.
    NotTheBorrower {
        lease_id: LeaseId,
    },
    /// Not active and not released in this batch: released earlier, or
    /// unknown; the broker looks in the database.
    LeaseNotActive {
        lease_id: LeaseId,
    },
    /// No workload by that name that the caller may see.
    NoSuchWorkload {
        name: String,
    },
    NoSuchInstance {
        name: String,
    },
    /// The workload's name is taken by another principal's workload.
    WorkloadOwnedByAnother {
        name: String,
    },
    Internal(String),
}

/// Decides `command` against `table` at `now_ms`.
pub fn decide(
    table: TableView<'_>,
    command: &BrokerCommand,
    now_ms: u64,
) -> Result<Decision, Refusal> {
    match command {
        BrokerCommand::CreatePrincipal {
            name,
            role,
            token_sha256,
        } => decide_create_principal(table, name, *role, token_sha256, now_ms),
        BrokerCommand::CreateHostCredential {
            lender,
            host_id,
            token_sha256,
        } => decide_host_credential(table, lender, host_id, token_sha256, now_ms),
        BrokerCommand::RegisterHost {
            lender,
            host_id,
            agent_url,
            capacity,
            share,
        } => {
            let host = HostRow {
                host_id: host_id.clone(),
                lender: lender.clone(),
                agent_url: agent_url.clone(),
                capacity: capacity.clone(),
                share: share.clone(),
            };
            decide_register_host(table, lender, host, now_ms)
        }
        BrokerCommand::PutPartition {
            lender,
            partition,
            terms,
        } => decide_put_partition(table, lender, partition, terms),
        BrokerCommand::WithdrawPartition { lender, partition } => {
            decide_withdraw_partition(table, lender, partition)
        }
        BrokerCommand::Lease {
            borrower,
            target,
            idempotency_key,
            key_ttl_ms,
            window,
        } => decide_lease_command(
            table,
            borrower,
            target,
            idempotency_key,
            LeaseTiming::new(*key_ttl_ms, *window, now_ms)?,
        ),
        BrokerCommand::Release {
            releaser,
            lease_id,
            commission_basis_points,
        } => decide_release(table, releaser, *lease_id, *commission_basis_points, now_ms),
        BrokerCommand::PruneIdempotency { before_ms } => Ok(Decision {
            outcome: Outcome::IdempotencyPruned,
            changes: vec![Change::ForgetIdempotency {
                before_ms: *before_ms,
            }],
        }),
        BrokerCommand::ForgetReleaseNotice { lease_id } => Ok(Decision {
            outcome: Outcome::ReleaseNoticeForgotten,
            changes: vec![Change::ForgetReleaseNotice {
                lease_id: *lease_id,
            }],
        }),
        BrokerCommand::ApplyWorkload { .. }
        | BrokerCommand::DeleteWorkload { .. }
        | BrokerCommand::DeleteInstance { .. }
        | BrokerCommand::RecordHostSample { .. }
        | BrokerCommand::PlanRound { .. }
        | BrokerCommand::MigrateInstance { .. }
        | BrokerCommand::PowerSave { .. }
        | BrokerCommand::PowerUp { .. } => reservation::commands::decide(table, command, now_ms),
    }
}

fn decide_create_principal(
    table: TableView<'_>,
    name: &str,
    role: Role,
    token_sha256: &str,
    now_ms: u64,
) -> Result<Decision, Refusal> {
    validate_host_id("name", name).map_err(Refusal::Invalid)?;
    if table.principal_exists(name) {
        return Err(Refusal::PrincipalExists {
            name: name.to_string(),
        });
    }
    Ok(Decision {
        outcome: Outcome::PrincipalCreated,
        changes: vec![Change::AddPrincipal {
            name: name.to_string(),
            role,
            token_sha256: token_sha256.to_string(),
            at_ms: now_ms,
        }],
    })
}

/// A credential acting for `lender` on `host_id` only. The host may not
/// exist yet (the agent registers it with this credential); a host of
/// another lender answers as if it did not exist.
fn decide_host_credential(
    table: TableView<'_>,
    lender: &str,
    host_id: &str,
    token_sha256: &str,
    now_ms: u64,
) -> Result<Decision, Refusal> {
    validate_host_id("host_id", host_id).map_err(Refusal::Invalid)?;
    if table.host(host_id).is_some_and(|h| h.row.lender != lender) {
        return Err(Refusal::NoSuchHost);
    }
    Ok(Decision {
        outcome: Outcome::HostCredentialCreated,
        changes: vec![Change::AddHostCredential {
            credential: HostCredentialRow {
                token_sha256: token_sha256.to_string(),
                lender: lender.to_string(),
                host_id: host_id.to_string(),
            },
            at_ms: now_ms,
        }],
    })
}

fn decide_register_host(
    table: TableView<'_>,
    lender: &str,
    host: HostRow,
    now_ms: u64,
) -> Result<Decision, Refusal> {
    let host_id = host.host_id.as_str();
    validate_host_id("host_id", host_id).map_err(Refusal::Invalid)?;
    host.capacity.validate().map_err(Refusal::Invalid)?;
    if let Some(url) = &host.agent_url {
        validate_agent_url(url).map_err(Refusal::Invalid)?;
    }
    if let Some(share) = &host.share {
        share.validate().map_err(Refusal::Invalid)?;
    }
    // A host id is its first lender's: another lender re-registering it
    // would redirect its notices and take over its partitions.
    let existing = table.host(host_id);
    if existing.is_some_and(|host| host.row.lender != lender) {
        return Err(Refusal::HostOwnedByAnotherLender {
            host_id: host_id.to_string(),
        });
    }
    if let Some(existing) = existing {
        check_share_change(table, existing, &host.capacity, host.share.as_ref())
            .map_err(Refusal::Invalid)?;
    }
    Ok(Decision {
        outcome: Outcome::HostRegistered {
            host: host.clone(),
            partitions: existing.map_or(0, |h| h.partitions.len() as u64),
        },
        changes: vec![Change::PutHost {
            host,
            at_ms: now_ms,
        }],
    })
}

/// Another lender's host answers exactly as a host that does not exist, so
/// host ids reveal nothing to strangers.
fn owned_host<'a>(
    table: TableView<'a>,
    lender: &str,
    host_id: &str,
) -> Result<&'a HostEntry, Refusal> {
    table
        .host(host_id)
        .filter(|host| host.row.lender == lender)
        .ok_or(Refusal::NoSuchHost)
}

/// The lock rule, for alter and withdraw alike: `Ok(true)` when the
/// partition is withdrawn already.
fn check_unlocked(
    partition: &PartitionRef,
    status: crate::lease::PartitionStatus,
) -> Result<bool, Refusal> {
    match decide_alter(status) {
        Ok(()) => Ok(false),
        Err(AlterRefusal::Withdrawn) => Ok(true),
        Err(AlterRefusal::Locked { lease_id }) => Err(Refusal::Locked {
            partition: partition.clone(),
            lease_id,
        }),
    }
}

fn decide_put_partition(
    table: TableView<'_>,
    lender: &str,
    partition: &PartitionRef,
    terms: &Terms,
) -> Result<Decision, Refusal> {
    terms.validate(None).map_err(|e| prefix_field("terms", e))?;
    let host = owned_host(table, lender, &partition.host_id)?;
    if partition.index == 0 {
        return Err(Refusal::Invalid(FieldError::new(
            "index",
            "partition indexes start at 1",
        )));
    }
    if is_carved(host, partition.index) {
        return Err(Refusal::Invalid(FieldError::new(
            "index",
            format!(
                "partition {} lies in the range this host's share carves in; the broker carves those at lease time",
                partition.index
            ),
        )));
    }
    let others = table.other_offered_terms(host, partition.index);
    // Pools and started instances of seed 003 hold their capacity too.
    let held = table.reservations().held_on_host(&partition.host_id);
    host.row
        .capacity
        .less(held.cpu_centicores, held.memory_mib, held.disk_gib)
        .admits(others.into_iter(), terms)
        .map_err(|e| prefix_field("terms", e))?;
    let epoch = match table.partition(partition) {
        Some(entry) => {
            check_unlocked(partition, entry.status())?;
            entry.epoch
        }
        None => 0,
    };
    let row = PartitionRow {
        partition: partition.clone(),
        terms: terms.clone(),
        epoch,
        lease_id: None,
        withdrawn: false,
    };
    Ok(Decision {
        outcome: Outcome::PartitionPut(row.clone()),
        changes: vec![Change::PutPartition(row)],
    })
}

fn decide_withdraw_partition(
    table: TableView<'_>,
    lender: &str,
    partition: &PartitionRef,
) -> Result<Decision, Refusal> {
    owned_host(table, lender, &partition.host_id)?;
    let entry = table
        .partition(partition)
        .ok_or_else(|| Refusal::NoSuchPartition(partition.clone()))?;
    if check_unlocked(partition, entry.status())? {
        return Ok(Decision {
            outcome: Outcome::PartitionWithdrawn(entry.row(partition)),
            changes: Vec::new(),
        });
    }
    let mut row = entry.row(partition);
    row.withdrawn = true;
    Ok(Decision {
        outcome: Outcome::PartitionWithdrawn(row.clone()),
        changes: vec![Change::PutPartition(row)],
    })
}

/// Checks that an image asked for is offered by some partition; `field`
/// names it in the refusal.
pub fn check_known_image(
    table: TableView<'_>,
    requirements: &Requirements,
    field: &str,
) -> Result<(), Refusal> {
    let Some(image) = &requirements.image else {
        return Ok(());
    };
    let offered = table.offered_images();
    // A bare name asks for any digest of it (terms are pinned).
    if offered
        .iter()
        .any(|offered| *offered == image || crate::image_ref::offers_image(offered, image))
    {
        return Ok(());
    }
    Err(Refusal::Invalid(FieldError::new(
        field,
        format!(
            "unknown image '{image}'; images offered: {}",
            if offered.is_empty() {
                "none yet".to_string()
            } else {
                offered.join(", ")
            }
        ),
    )))
}

/// What a lease takes: a registered partition, or one carved out of a
/// host's share for this lease.
enum Chosen {
    Registered(PartitionRef, bool),
    Carved(Carved),
}

/// The partition a lease target names, or the best free one for its
/// requirements, with the borrower's opt-in to unisolated partitions; when
/// no registered partition matches, one carved out of a share.
fn choose_partition(table: TableView<'_>, target: &LeaseTarget) -> Result<Chosen, Refusal> {
    match target {
        LeaseTarget::Named {
            partition,
            allow_unisolated,
        } => Ok(Chosen::Registered(partition.clone(), *allow_unisolated)),
        LeaseTarget::Best(requirements) => {
            requirements
                .validate()
                .map_err(|e| prefix_field("best", e))?;
            if let Some((partition, _)) = table.find_free(requirements, 1).into_iter().next() {
                return Ok(Chosen::Registered(partition, requirements.allow_unisolated));
            }
            match carve_best(table, requirements) {
                Ok(carved) => Ok(Chosen::Carved(carved)),
                Err(shares) => {
                    check_known_image(table, requirements, "best.image").or_else(|refusal| {
                        if shares.is_empty() {
                            Err(refusal)
                        } else {
                            Ok(())
                        }
                    })?;
                    let mut explanation = table.explain(requirements);
                    explanation.shares = shares;
                    Err(Refusal::NoMatch(Box::new(explanation)))
                }
            }
        }
    }
}

/// The row a lease takes, with its epoch raised so that older keys are
/// fenced: a registered partition's after the checks, a carved one's new
/// (or given back earlier, its epoch kept).
fn leased_row(
    table: TableView<'_>,
    chosen: Chosen,
    lease_id: LeaseId,
    now_ms: u64,
) -> Result<PartitionRow, Refusal> {
    let mut row = match chosen {
        Chosen::Registered(partition, allow_unisolated) => {
            let entry = check_leasable(table, &partition, allow_unisolated, now_ms)?;
            entry.row(&partition)
        }
        Chosen::Carved(carved) => PartitionRow {
            partition: carved.partition,
            terms: carved.terms,
            epoch: carved.epoch,
            lease_id: None,
            withdrawn: false,
        },
    };
    row.epoch += 1;
    row.lease_id = Some(lease_id);
    Ok(row)
}

fn replay_lease(table: TableView<'_>, lease_id: LeaseId) -> Decision {
    let lease = table
        .active_lease(lease_id)
        .or_else(|| table.released_in_batch(lease_id).map(|(lease, _)| lease))
        .cloned();
    Decision {
        outcome: Outcome::LeaseReplayed { lease_id, lease },
        changes: Vec::new(),
    }
}

/// Whether `partition` can be leased from `now_ms` on, open-ended: free
/// (not leased, not withdrawn), isolated or opted into, and nothing booked
/// in its calendar from now on.
fn check_leasable<'a>(
    table: TableView<'a>,
    partition: &PartitionRef,
    allow_unisolated: bool,
    now_ms: u64,
) -> Result<&'a PartitionEntry, Refusal> {
    let entry = table
        .partition(partition)
        .ok_or_else(|| Refusal::NoSuchPartition(partition.clone()))?;
    decide_lease(entry.status()).map_err(|refusal| match refusal {
        LeaseRefusal::Conflict { lease_id } => Refusal::Conflict {
            partition: partition.clone(),
            lease_id,
        },
        LeaseRefusal::Withdrawn => Refusal::Withdrawn(partition.clone()),
        LeaseRefusal::Unisolated => Refusal::Unisolated(partition.clone()),
    })?;
    decide_isolation(&entry.terms, allow_unisolated)
        .map_err(|_| Refusal::Unisolated(partition.clone()))?;
    match entry.calendar.first_overlap(now_ms, None) {
        None => Ok(entry),
        Some(existing) => Err(match existing.booking {
            Booking::Leased { lease_id } => Refusal::Conflict {
                partition: partition.clone(),
                lease_id,
            },
            Booking::Reserved { .. } => Refusal::Booked {
                partition: partition.clone(),
                existing: *existing,
            },
        }),
    }
}

fn decide_lease_command(
    table: TableView<'_>,
    borrower: &str,
    target: &LeaseTarget,
    idempotency_key: &Option<String>,
    timing: LeaseTiming,
) -> Result<Decision, Refusal> {
    let now_ms = timing.now_ms;
    if let Some(key) = idempotency_key {
        if let Some(lease_id) = table.idempotent_lease(borrower, key, now_ms) {
            return Ok(replay_lease(table, lease_id));
        }
    }
    let chosen = choose_partition(table, target)?;
    let lease_id = table.last_lease_id() + 1;
    let row = leased_row(table, chosen, lease_id, now_ms)?;
    let partition = row.partition.clone();
    let host = table
        .host(&partition.host_id)
        .ok_or_else(|| Refusal::Internal(format!("partition {partition} has no host")))?;
    let lease = Lease {
        lease_id,
        partition,
        borrower: borrower.to_string(),
        lender: host.row.lender.clone(),
        terms: row.terms.clone(),
        epoch: row.epoch,
        started_at_ms: timing.started_at_ms,
        key_expires_at_ms: timing.key_expires_at_ms,
        state: LeaseState::Active,
        release_requested_at_ms: None,
        charge_micros: None,
        ends_at_ms: timing.ends_at_ms,
    };
    let mut changes = vec![
        Change::StartLease(lease.clone()),
        Change::PutPartition(row),
        // A lease from now holds the partition until its release; one
        // booked ahead books its window (and holds the partition from now,
        // so its capacity is guaranteed at the start).
        Change::Book {
            partition: lease.partition.clone(),
            interval: Interval {
                to_ms: timing.ends_at_ms,
                ..Interval::lease_from(lease_id, timing.started_at_ms)
            },
        },
    ];
    if let Some(key) = idempotency_key {
        changes.push(Change::RememberIdempotency {
            principal: borrower.to_string(),
            key: key.clone(),
            lease_id,
            at_ms: now_ms,
        });
    }
    Ok(Decision {
        outcome: Outcome::Leased {
            lease,
            agent_url: host.row.agent_url.clone(),
        },
        changes,
    })
}

/// May `viewer` see this lease? Its borrower, its lender, admins.
pub fn may_see_lease(viewer: &Principal, lease: &Lease) -> bool {
    viewer.role == Role::Admin || viewer.name == lease.borrower || viewer.name == lease.lender
}

/// Only the borrower releases; the lender and admins, who may see the
/// lease, learn that; anyone else is told it does not exist.
pub fn check_releaser(releaser: &Principal, lease: &Lease) -> Result<(), Refusal> {
    if !may_see_lease(releaser, lease) {
        return Err(Refusal::NoSuchLease);
    }
    if releaser.name != lease.borrower {
        return Err(Refusal::NotTheBorrower {
            lease_id: lease.lease_id,
        });
    }
    Ok(())
}

fn decide_release(
    table: TableView<'_>,
    releaser: &Principal,
    lease_id: LeaseId,
    commission_basis_points: u32,
    now_ms: u64,
) -> Result<Decision, Refusal> {
    let Some(active) = table.active_lease(lease_id) else {
        return match table.released_in_batch(lease_id) {
            Some((lease, bill)) => {
                check_releaser(releaser, lease)?;
                Ok(Decision {
                    outcome: Outcome::AlreadyReleased {
                        lease: lease.clone(),
                        bill: *bill,
                    },
                    changes: Vec::new(),
                })
            }
            None => Err(Refusal::LeaseNotActive { lease_id }),
        };
    };
    check_releaser(releaser, active)?;
    let mut lease = active.clone();
    let bill = match lease.release(now_ms, commission_basis_points) {
        Ok(ReleaseOutcome::Released(bill)) => bill,
        Ok(ReleaseOutcome::AlreadyReleased) => {
            return Err(Refusal::Internal(format!(
                "lease {lease_id} was active and released at once"
            )))
        }
        Err(error) => return Err(Refusal::Internal(error.to_string())),
    };
    let transfers = ledger::settle(&bill, lease_id, &lease.borrower, &lease.lender, now_ms);
    let mut changes = vec![Change::EndLease {
        lease: lease.clone(),
        bill,
        transfers,
    }];
    if let Some(entry) = table.partition(&lease.partition) {
        if entry.lease_id == Some(lease_id) {
            let mut row = entry.row(&lease.partition);
            row.lease_id = None;
            // A carved partition goes back to its share.
            row.withdrawn = table
                .host(&lease.partition.host_id)
                .is_some_and(|host| is_carved(host, lease.partition.index));
            changes.push(Change::PutPartition(row));
        }
    }
    changes.push(Change::Unbook {
        partition: lease.partition.clone(),
        booking: Booking::Leased { lease_id },
    });
    let agent_url = table
        .host(&lease.partition.host_id)
        .and_then(|host| host.row.agent_url.clone());
    Ok(Decision {
        outcome: Outcome::Released {
            lease,
            bill,
            agent_url,
        },
        changes,
    })
}

fn prefix_field(prefix: &str, error: FieldError) -> Refusal {
    Refusal::Invalid(FieldError::new(
        format!("{prefix}.{}", error.field),
        error.problem,
    ))
}

fn validate_agent_url(url: &str) -> Result<(), FieldError> {
    let ok = url.len() <= 512
        && (url.starts_with("http://") || url.starts_with("https://"))
        && !url.chars().any(char::is_whitespace);
    if !ok {
        return Err(FieldError::new(
            "agent_url",
            format!("'{url}' is not an http(s) URL of at most 512 characters"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{Overlay, ResourceTable};
    use crate::terms::sample_terms;

    fn capacity() -> HostCapacity {
        HostCapacity {
            cpu_centicores: 800,
            memory_mib: 16 * 1024,
            disk_gib: 500,
            owner_share_cpu_centicores: 100,
            owner_share_memory_mib: 1024,
            owner_share_disk_gib: 10,
        }
    }

    fn priced(price_per_hour_micros: u64) -> Terms {
        Terms {
            price_per_hour_micros,
            ..sample_terms()
        }
    }

    fn borrower() -> Principal {
        Principal {
            name: "bob".into(),
            role: Role::Borrower,
            host_scope: None,
        }
    }

    /// Decides `command` into `overlay` (as the writer does within a batch).
    fn run(
        table: &ResourceTable,
        overlay: &mut Overlay,
        command: BrokerCommand,
    ) -> Result<Outcome, Refusal> {
        let decision = decide(TableView::new(table, overlay), &command, 1_000)?;
        for change in &decision.changes {
            overlay.apply(table, change);
        }
        Ok(decision.outcome)
    }

    /// Decides and commits at once.
    fn commit(table: &mut ResourceTable, command: BrokerCommand) -> Result<Outcome, Refusal> {
        let decision = decide(TableView::new(table, &Overlay::default()), &command, 1_000)?;
        for change in &decision.changes {
            table.apply(change);
        }
        Ok(decision.outcome)
    }

    /// Host `a` of lender `ann` with partitions 1 (cheap) and 2 (dear).
    fn market() -> ResourceTable {
        let mut table = ResourceTable::default();
        for (name, role) in [("ann", Role::Lender), ("bob", Role::Borrower)] {
            commit(
                &mut table,
                BrokerCommand::CreatePrincipal {
                    name: name.into(),
                    role,
                    token_sha256: format!("hash-{name}"),
                },
            )
            .unwrap();
        }
        commit(
            &mut table,
            BrokerCommand::RegisterHost {
                lender: "ann".into(),
                host_id: "a".into(),
                agent_url: None,
                capacity: capacity(),
                share: None,
            },
        )
        .unwrap();
        for (index, price) in [(1, 100), (2, 200)] {
            commit(
                &mut table,
                BrokerCommand::PutPartition {
                    lender: "ann".into(),
                    partition: PartitionRef::new("a", index),
                    terms: priced(price),
                },
            )
            .unwrap();
        }
        table
    }

    fn lease_best() -> BrokerCommand {
        BrokerCommand::Lease {
            borrower: "bob".into(),
            target: LeaseTarget::Best(Requirements::default()),
            idempotency_key: None,
            key_ttl_ms: 60_000,
            window: None,
        }
    }

    fn leased_partition(outcome: Outcome) -> (LeaseId, u32) {
        match outcome {
            Outcome::Leased { lease, .. } => (lease.lease_id, lease.partition.index),
            other => panic!("not leased: {other:?}"),
        }
    }

    #[test]
    fn a_batch_sees_its_own_leases_and_the_table_does_not() {
        let table = market();
        let mut overlay = Overlay::default();
        let first = leased_partition(run(&table, &mut overlay, lease_best()).unwrap());
        let second = leased_partition(run(&table, &mut overlay, lease_best()).unwrap());
        // The cheaper partition first, then the other: never one twice.
        assert_eq!(first, (1, 1));
        assert_eq!(second, (2, 2));
        assert!(matches!(
            run(&table, &mut overlay, lease_best()),
            Err(Refusal::NoMatch(_))
        ));
        // Nothing is committed: the table still offers both.
        assert_eq!(table.free.len(), 2);
        assert!(table.active_leases.is_empty());
    }

    #[test]
    fn a_leased_partition_is_locked_until_released() {
        let mut table = market();
        let (lease_id, _) = leased_partition(commit(&mut table, lease_best()).unwrap());
        let partition = PartitionRef::new("a", 1);
        let alter = BrokerCommand::PutPartition {
            lender: "ann".into(),
            partition: partition.clone(),
            terms: priced(300),
        };
        let locked = Err(Refusal::Locked {
            partition: partition.clone(),
            lease_id,
        });
        assert_eq!(commit(&mut table, alter.clone()), locked);
        let withdraw = BrokerCommand::WithdrawPartition {
            lender: "ann".into(),
            partition: partition.clone(),
        };
        assert_eq!(commit(&mut table, withdraw.clone()), locked);
        let release = BrokerCommand::Release {
            releaser: borrower(),
            lease_id,
            commission_basis_points: 1000,
        };
        assert!(matches!(
            commit(&mut table, release),
            Ok(Outcome::Released { .. })
        ));
        assert!(matches!(
            commit(&mut table, alter),
            Ok(Outcome::PartitionPut(_))
        ));
        assert!(matches!(
            commit(&mut table, withdraw),
            Ok(Outcome::PartitionWithdrawn(row)) if row.withdrawn
        ));
    }

    #[test]
    fn a_release_bills_once_and_frees_the_partition_with_a_new_epoch_next_time() {
        let mut table = market();
        let (lease_id, _) = leased_partition(commit(&mut table, lease_best()).unwrap());
        let release = BrokerCommand::Release {
            releaser: borrower(),
            lease_id,
            commission_basis_points: 0,
        };
        let mut overlay = Overlay::default();
        assert!(matches!(
            run(&table, &mut overlay, release.clone()),
            Ok(Outcome::Released { .. })
        ));
        // Again in the same batch: the same bill, nothing more billed.
        assert!(matches!(
            run(&table, &mut overlay, release.clone()),
            Ok(Outcome::AlreadyReleased { .. })
        ));
        commit(&mut table, release.clone()).unwrap();
        // Once committed, the broker looks the lease up in its database.
        assert_eq!(
            commit(&mut table, release),
            Err(Refusal::LeaseNotActive { lease_id })
        );
        let (_, index) = leased_partition(commit(&mut table, lease_best()).unwrap());
        assert_eq!(index, 1);
        assert_eq!(table.partitions[&PartitionRef::new("a", 1)].epoch, 2);
    }

    #[test]
    fn only_the_borrower_releases_and_strangers_see_nothing() {
        let mut table = market();
        let (lease_id, _) = leased_partition(commit(&mut table, lease_best()).unwrap());
        let release_by = |name: &str, role: Role| BrokerCommand::Release {
            releaser: Principal {
                name: name.into(),
                role,
                host_scope: None,
            },
            lease_id,
            commission_basis_points: 0,
        };
        assert_eq!(
            commit(&mut table, release_by("ann", Role::Lender)),
            Err(Refusal::NotTheBorrower { lease_id })
        );
        assert_eq!(
            commit(&mut table, release_by("eve", Role::Borrower)),
            Err(Refusal::NoSuchLease)
        );
    }

    #[test]
    fn an_idempotency_key_replays_the_first_lease() {
        let mut table = market();
        let command = BrokerCommand::Lease {
            borrower: "bob".into(),
            target: LeaseTarget::Best(Requirements::default()),
            idempotency_key: Some("k1".into()),
            key_ttl_ms: 60_000,
            window: None,
        };
        let (lease_id, _) = leased_partition(commit(&mut table, command.clone()).unwrap());
        match commit(&mut table, command).unwrap() {
            Outcome::LeaseReplayed {
                lease_id: again,
                lease,
            } => {
                assert_eq!(again, lease_id);
                assert_eq!(lease.map(|l| l.lease_id), Some(lease_id));
            }
            other => panic!("not replayed: {other:?}"),
        }
        assert_eq!(table.active_leases.len(), 1);
        commit(
            &mut table,
            BrokerCommand::PruneIdempotency { before_ms: 2_000 },
        )
        .unwrap();
        assert!(table.idempotent_leases.is_empty());
    }

    #[test]
    fn partitions_registered_earlier_in_a_batch_count_against_the_capacity() {
        let table = market();
        let mut overlay = Overlay::default();
        // 700 lendable centicores; partitions 1 and 2 take 100 each, and
        // each of these 300: one fits, a second one does not.
        let half_host = Terms {
            vcpus: 6,
            cpu_cap_percent: 50,
            ..sample_terms()
        };
        let put = |index: u32| BrokerCommand::PutPartition {
            lender: "ann".into(),
            partition: PartitionRef::new("a", index),
            terms: half_host.clone(),
        };
        assert!(run(&table, &mut overlay, put(3)).is_ok());
        let view = TableView::new(&table, &overlay);
        assert_eq!(view.host("a").unwrap().partitions.len(), 3);
        assert!(matches!(
            run(&table, &mut overlay, put(4)),
            Err(Refusal::Invalid(e)) if e.field == "terms.vcpus"
        ));
        // The committed host still lists two.
        assert_eq!(table.hosts["a"].partitions.len(), 2);
    }

    #[test]
    fn a_partition_must_fit_beside_the_others_and_the_owner_share() {
        let mut table = market();
        let too_big = Terms {
            vcpus: 8,
            cpu_cap_percent: 100,
            ..sample_terms()
        };
        let refused = commit(
            &mut table,
            BrokerCommand::PutPartition {
                lender: "ann".into(),
                partition: PartitionRef::new("a", 3),
                terms: too_big,
            },
        );
        assert!(matches!(refused, Err(Refusal::Invalid(e)) if e.field == "terms.vcpus"));
        let stranger = commit(
            &mut table,
            BrokerCommand::PutPartition {
                lender: "zed".into(),
                partition: PartitionRef::new("a", 3),
                terms: sample_terms(),
            },
        );
        assert_eq!(stranger, Err(Refusal::NoSuchHost));
    }
}

#[cfg(test)]
mod calendar_tests {
    use super::*;
    use crate::table::{Overlay, ResourceTable};
    use crate::terms::sample_terms;

    fn table_with_one_partition() -> (ResourceTable, PartitionRef) {
        let mut table = ResourceTable::default();
        let partition = PartitionRef::new("a", 1);
        table.apply(&Change::PutHost {
            host: HostRow {
                host_id: "a".into(),
                lender: "ann".into(),
                agent_url: None,
                capacity: HostCapacity {
                    cpu_centicores: 800,
                    memory_mib: 8192,
                    disk_gib: 100,
                    owner_share_cpu_centicores: 0,
                    owner_share_memory_mib: 0,
                    owner_share_disk_gib: 0,
                },
                share: None,
            },
            at_ms: 0,
        });
        table.apply(&Change::PutPartition(PartitionRow {
            partition: partition.clone(),
            terms: sample_terms(),
            epoch: 0,
            lease_id: None,
            withdrawn: false,
        }));
        (table, partition)
    }

    fn lease_named(partition: &PartitionRef) -> BrokerCommand {
        BrokerCommand::Lease {
            borrower: "bob".into(),
            target: LeaseTarget::Named {
                partition: partition.clone(),
                allow_unisolated: false,
            },
            idempotency_key: None,
            key_ttl_ms: 1_000,
            window: None,
        }
    }

    fn commit_at(
        table: &mut ResourceTable,
        command: &BrokerCommand,
        now_ms: u64,
    ) -> Result<Outcome, Refusal> {
        let decision = decide(TableView::new(table, &Overlay::default()), command, now_ms)?;
        for change in &decision.changes {
            table.apply(change);
        }
        Ok(decision.outcome)
    }

    #[test]
    fn a_lease_is_an_interval_from_its_start_until_its_release() {
        let (mut table, partition) = table_with_one_partition();
        commit_at(&mut table, &lease_named(&partition), 5_000).unwrap();
        let calendar = &table.partitions[&partition].calendar;
        assert!(calendar.is_free_at(4_999));
        assert_eq!(
            calendar.occupant_at(5_000).map(|i| i.booking),
            Some(Booking::Leased { lease_id: 1 })
        );
        let release = BrokerCommand::Release {
            releaser: Principal {
                name: "bob".into(),
                role: Role::Borrower,
                host_scope: None,
            },
            lease_id: 1,
            commission_basis_points: 0,
        };
        commit_at(&mut table, &release, 9_000).unwrap();
        assert!(table.partitions[&partition].calendar.is_empty());
        // An alteration keeps the calendar; the next lease books again.
        commit_at(&mut table, &lease_named(&partition), 9_000).unwrap();
        assert!(!table.partitions[&partition].calendar.is_free_at(9_000));
    }

    #[test]
    fn a_reservation_in_the_calendar_refuses_an_open_ended_lease() {
        let (mut table, partition) = table_with_one_partition();
        let reserved = Interval {
            booking: Booking::Reserved { reservation_id: 4 },
            from_ms: 20_000,
            to_ms: Some(30_000),
        };
        table.apply(&Change::Book {
            partition: partition.clone(),
            interval: reserved,
        });
        // Free now (the free index agrees), but a lease from now on would
        // run into the reservation.
        assert_eq!(table.free.len(), 1);
        assert_eq!(
            commit_at(&mut table, &lease_named(&partition), 10_000),
            Err(Refusal::Booked {
                partition,
                existing: reserved
            })
        );
    }
}
