//! The manager's orders (seed 004, FIG. 5-8), each a compare-and-swap of
//! the group's table decided by core:
//! - a request for more rights (FIG. 5): met inside the host when it can
//!   be (S530, S580); otherwise coordinated by the primary manager
//!   (centralized) or by the requesting host's manager (federated). The
//!   coordinator begins a transfer on every donor (their rights leave
//!   them, pending), asks each donor's manager to apply the table (its
//!   modules go off: S560) and commits only what the donors confirmed,
//!   aborting the rest; the requester's modules go on after the commit
//!   (S570-S590). So a right in flight activates a module nowhere, and a
//!   core is never active on two hosts. A coordinator that dies leaves
//!   pending transfers, which any manager aborts after
//!   [`STALE_TRANSFER_MS`] (safe: nothing of them was activated).
//! - the primary's leadership (FIG. 7): every manager of a centralized
//!   group tries the group's fenced lease `primary` each tick; the holder
//!   records itself with the lease's epoch, and its orders carry that
//!   epoch, so a revived old primary's orders are refused.

use super::RightsManager;
use crate::error::AgentError;
use leasehold_api::rights::RightsOrderAnswer;
use leasehold_core::rights::transfer::TransferPhase;
use leasehold_core::rights::{GroupMode, RightsRefusal, ShareGroup, Slot};
use std::collections::BTreeSet;

/// How long the primary's lease lasts without renewal: the group has a new
/// primary within this and one tick of the old one's death.
pub const PRIMARY_LEASE_TTL_MS: u64 = 3_000;
/// How often a manager renews leases, expires rights and syncs its copy.
pub const TICK_INTERVAL_MS: u64 = 500;
/// A transfer pending this long lost its coordinator: it is aborted.
pub const STALE_TRANSFER_MS: u64 = 10_000;

/// Who coordinates a request that leaves the host.
enum Coordinator {
    /// This manager (the primary, or any manager of a federated group),
    /// with the epoch its orders carry (0: federated, no epoch).
    Here { epoch: u64 },
    /// The primary manager elsewhere.
    Primary { manager_url: String },
}

impl RightsManager {
    fn coordinator(&self, group: &ShareGroup) -> Result<Coordinator, AgentError> {
        if group.mode == GroupMode::Federated {
            return Ok(Coordinator::Here { epoch: 0 });
        }
        let epoch = *self.primary_epoch.lock().unwrap_or_else(|p| p.into_inner());
        match &group.primary_host {
            Some(host) if host == &self.host_id && epoch == group.primary_epoch && epoch > 0 => {
                Ok(Coordinator::Here { epoch })
            }
            Some(host) if host != &self.host_id => {
                let manager_url = group
                    .hosts
                    .get(host)
                    .map(|h| h.manager_url.clone())
                    .unwrap_or_default();
                Ok(Coordinator::Primary { manager_url })
            }
            _ => Err(AgentError::GroupUnreachable(
                "the group has no primary manager yet; try again in a few seconds".into(),
            )),
        }
    }

    /// Who coordinates now; with no usable primary (the group just formed,
    /// or this manager restarted as the primary) it tries to lead at once
    /// rather than wait for the next tick.
    async fn coordinator_now(
        &self,
        group: &ShareGroup,
        now_ms: u64,
    ) -> Result<Coordinator, AgentError> {
        match self.coordinator(group) {
            Err(AgentError::GroupUnreachable(_)) => {
                self.lead(group, now_ms).await?;
                self.coordinator(&self.fresh().await?.0)
            }
            other => other,
        }
    }

    /// FIG. 5: `modules` more rights for `to`, a partition of this host.
    pub(crate) async fn request(
        &self,
        to: Slot,
        modules: u32,
        caller_token: &str,
    ) -> Result<RightsOrderAnswer, AgentError> {
        // FIG. 4B: what the host can meet commits in its own database.
        if to.host_id == self.host_id {
            if let Some(answer) = self.lend_inside_host(to.partition, modules) {
                return answer;
            }
        }
        // Planned on the copy (the write below decides again on the
        // stored table, and refuses a plan the table no longer allows).
        let now_ms = self.clock.now_ms();
        let planned = self.copy().and_then(|(group, _)| {
            let plan = leasehold_core::rights::transfer::plan_request(&group, &to, modules, now_ms)
                .ok()?;
            Some((group, plan))
        });
        let (group, plan) = match planned {
            Some(planned) => planned,
            None => {
                // No copy, or the copy refuses: plan on the stored table.
                let (group, _) = self.fresh().await?;
                let plan =
                    leasehold_core::rights::transfer::plan_request(&group, &to, modules, now_ms)
                        .map_err(super::refusal)?;
                (group, plan)
            }
        };
        let local = plan.iter().all(|(from, _)| from.host_id == to.host_id);
        if local {
            // S580: a loan inside the host, both phases in one write.
            let (committed, _, version) = self
                .update(None, |g, now| g.request(&to, modules, now))
                .await?;
            return Ok(RightsOrderAnswer {
                committed,
                aborted: vec![],
                version,
                lent_inside_host: vec![],
            });
        }
        let coordinator = self.coordinator_now(&group, now_ms).await?;
        match coordinator {
            Coordinator::Here { epoch } => self.coordinate(&to, modules, epoch).await,
            Coordinator::Primary { manager_url } => {
                // The primary decides on the table: it must hold this
                // host's loans first.
                self.publish_local_loans().await?;
                let body = leasehold_api::rights::RightsRequestBody {
                    host_id: to.host_id.clone(),
                    partition: to.partition,
                    modules,
                };
                self.peers
                    .with_base_url(&manager_url)
                    .with_token(Some(caller_token.to_string()))
                    .agent_rights_request(&body)
                    .await
                    .map_err(peer_error)
            }
        }
    }

    /// The coordinator's two phases for a request leaving the host.
    pub(crate) async fn coordinate(
        &self,
        to: &Slot,
        modules: u32,
        epoch: u64,
    ) -> Result<RightsOrderAnswer, AgentError> {
        let (begun, group, version) = self
            .update(None, |g, now| {
                check_epoch(g, epoch)?;
                g.begin_request(to, modules, now)
            })
            .await?;
        self.finish(begun, &group, version, epoch, to).await
    }

    /// Phase two: confirm the donors, commit what they confirmed, abort
    /// the rest, then switch the requester's modules on.
    async fn finish(
        &self,
        begun: Vec<u64>,
        group: &ShareGroup,
        version: u64,
        epoch: u64,
        to: &Slot,
    ) -> Result<RightsOrderAnswer, AgentError> {
        let donors: BTreeSet<String> = begun
            .iter()
            .filter_map(|id| group.transfers.get(id))
            .map(|t| t.from.host_id.clone())
            .collect();
        let mut confirmed = BTreeSet::new();
        for donor in donors {
            if self.confirm_applied(group, &donor, version).await {
                confirmed.insert(donor);
            }
        }
        let ended = self
            .update(None, |g, now| {
                check_epoch(g, epoch)?;
                end_transfers(g, &begun, &confirmed, now)
            })
            .await;
        let ((committed, aborted), _, version) = match ended {
            Ok(ended) => ended,
            Err(error) => {
                self.abort_begun(&begun).await;
                return Err(error);
            }
        };
        if !committed.is_empty() {
            self.poke(group, &to.host_id, version).await;
        }
        if committed.is_empty() {
            return Err(AgentError::GroupUnreachable(format!(
                "no donor confirmed its modules were off; transfers {aborted:?} were aborted and nothing moved"
            )));
        }
        Ok(RightsOrderAnswer {
            committed,
            aborted,
            version,
            lent_inside_host: vec![],
        })
    }

    /// Gives what a failed order began back to its donors at once (an
    /// abort is safe from anyone: nothing of a pending transfer is active
    /// anywhere); if even that fails, the transfers abort when stale.
    async fn abort_begun(&self, begun: &[u64]) {
        let aborted = self
            .update(None, |g, now| {
                for id in begun {
                    match g.abort_transfer(*id, now) {
                        Ok(())
                        | Err(RightsRefusal::TransferEnded { .. })
                        | Err(RightsRefusal::NoSuchTransfer(_)) => {}
                        Err(other) => return Err(other),
                    }
                }
                Ok(())
            })
            .await;
        if let Err(error) = aborted {
            tracing::warn!(%error, ?begun, "could not abort the transfers of a failed order; they abort when stale");
        }
    }

    /// Whether `host`'s manager applied the table at `version` or later
    /// (this manager applies its own at once).
    async fn confirm_applied(&self, group: &ShareGroup, host: &str, version: u64) -> bool {
        if host == self.host_id {
            return self.apply_own(group, version).version >= version;
        }
        let Some(manager_url) = group.hosts.get(host).map(|h| h.manager_url.clone()) else {
            return false;
        };
        match self
            .peers
            .with_base_url(&manager_url)
            .agent_rights_sync(version)
            .await
        {
            Ok(answer) => answer.host_id == host && answer.version >= version,
            Err(error) => {
                tracing::warn!(%error, host, "a donor's manager did not confirm; its transfer aborts");
                false
            }
        }
    }

    /// Tells `host`'s manager to apply the table (best effort: it syncs on
    /// its own each tick anyway).
    pub(crate) async fn poke(&self, group: &ShareGroup, host: &str, version: u64) {
        if host == self.host_id {
            return;
        }
        if let Some(manager) = group.hosts.get(host) {
            let answer = self
                .peers
                .with_base_url(&manager.manager_url)
                .agent_rights_sync(version)
                .await;
            if let Err(error) = answer {
                tracing::info!(%error, host, "could not tell a manager to apply the table; it will at its next tick");
            }
        }
    }

    /// An explicit transfer between two partitions (an admin's or the
    /// lender's order), coordinated here in two phases like a request.
    pub(crate) async fn transfer(
        &self,
        from: Slot,
        to: Slot,
        modules: u32,
        caller_token: &str,
    ) -> Result<RightsOrderAnswer, AgentError> {
        let (group, _) = self.fresh().await?;
        let epoch = match self.coordinator_now(&group, self.clock.now_ms()).await? {
            Coordinator::Here { epoch } => epoch,
            Coordinator::Primary { manager_url } => {
                self.publish_local_loans().await?;
                let body = leasehold_api::rights::RightsTransferBody {
                    from_host: from.host_id.clone(),
                    from_partition: from.partition,
                    to_host: to.host_id.clone(),
                    to_partition: to.partition,
                    modules,
                };
                return self
                    .peers
                    .with_base_url(&manager_url)
                    .with_token(Some(caller_token.to_string()))
                    .agent_rights_transfer(&body)
                    .await
                    .map_err(peer_error);
            }
        };
        let (begun, group, version) = self
            .update(None, |g, now| {
                check_epoch(g, epoch)?;
                g.begin_transfer(&from, &to, modules, now)
                    .map(|id| vec![id])
            })
            .await?;
        self.finish(begun, &group, version, epoch, &to).await
    }

    /// Applies the table at `min_version` or later to this host, reading
    /// it from the store (a coordinator's question, or a poke).
    pub(crate) async fn sync(
        &self,
        min_version: u64,
    ) -> Result<leasehold_api::rights::RightsSyncAnswer, AgentError> {
        let _one_at_a_time = self.sync_lock.lock().await;
        // The table shows this host's loans before anyone compares.
        if let Err(error) = self.publish_local_loans().await {
            tracing::debug!(%error, "could not publish this host's loans before a sync");
        }
        let applied = self.applied();
        if applied.version >= min_version && min_version > 0 {
            return Ok(leasehold_api::rights::RightsSyncAnswer {
                host_id: self.host_id.clone(),
                version: applied.version,
                active: applied.active,
            });
        }
        let (group, version) = self.fresh().await?;
        Ok(self.apply_own(&group, version))
    }

    /// One tick: take or renew the primary's lease (centralized), record a
    /// new leadership, expire this host's temporary rights, abort
    /// transfers left pending by a dead coordinator, refresh the copy.
    pub(crate) async fn tick(&self, local_partitions: &BTreeSet<u32>) -> Result<(), AgentError> {
        self.hold_host().await?;
        self.publish_local_loans().await?;
        let (group, _) = self.fresh().await?;
        self.forget_published_loans(&group);
        let now_ms = self.clock.now_ms();
        let group = if group.mode == GroupMode::Centralized {
            self.lead(&group, now_ms).await?;
            self.fresh().await?.0
        } else {
            group
        };
        self.match_partitions(&group, local_partitions).await?;
        if matches!(self.coordinator(&group), Ok(Coordinator::Here { .. })) {
            self.seize_silent_hosts(&group, now_ms).await?;
        }
        let expiring = group.hosts.values().any(|h| {
            h.partitions
                .values()
                .any(|p| p.temporary.iter().any(|t| t.expires_at_ms <= now_ms))
        });
        let stale = group.stale_pending(now_ms.saturating_sub(STALE_TRANSFER_MS));
        if expiring || !stale.is_empty() {
            self.update(None, |g, now| {
                g.expire(now);
                for id in g.stale_pending(now.saturating_sub(STALE_TRANSFER_MS)) {
                    g.abort_transfer(id, now)?;
                }
                Ok(())
            })
            .await?;
        }
        Ok(())
    }

    /// Renews this manager's hold on its host; refused when a stand-by
    /// took the host over (this manager is then the old one, and stops).
    pub(crate) async fn hold_host(&self) -> Result<u64, AgentError> {
        let holder = self.config.host_lease_holder(&self.host_id);
        let held = self
            .store
            .acquire(
                &self.config.group,
                &super::host_lease(&self.host_id),
                &holder,
                super::HOST_LEASE_TTL_MS,
                self.clock.now_ms(),
            )
            .await?;
        held.ok_or_else(|| {
            AgentError::Forbidden(format!(
                "another manager holds host '{}' in the share group now",
                self.host_id
            ))
        })
    }

    /// FIG. 8: the rights of a host whose manager has not held it for the
    /// grace period are seized and go to the other hosts (the lowest
    /// workload first). Only hosts that had a manager once are judged.
    async fn seize_silent_hosts(&self, group: &ShareGroup, now_ms: u64) -> Result<(), AgentError> {
        for (host_id, host) in &group.hosts {
            let holds_rights = host.partitions.values().any(|p| p.permanent > 0);
            if host_id == &self.host_id || !holds_rights {
                continue;
            }
            let held = self
                .store
                .holder(&self.config.group, &super::host_lease(host_id))
                .await?;
            let Some(held) = held else { continue };
            if held
                .expires_at_ms
                .saturating_add(self.config.seize_after_ms)
                > now_ms
            {
                continue;
            }
            let (seized, _, version) = self.update(None, |g, now| g.seize(host_id, now)).await?;
            tracing::warn!(host = %host_id, seized, version, "seized the rights of a host unreachable beyond the grace period");
        }
        Ok(())
    }

    /// Adds the rows of partitions the table lacks and removes those of
    /// partitions this host no longer has (a write that failed when the
    /// lender added or withdrew one).
    async fn match_partitions(
        &self,
        group: &ShareGroup,
        local_partitions: &BTreeSet<u32>,
    ) -> Result<(), AgentError> {
        let in_table: BTreeSet<u32> = group
            .hosts
            .get(&self.host_id)
            .map(|h| h.partitions.keys().copied().filter(|i| *i != 0).collect())
            .unwrap_or_default();
        if &in_table == local_partitions {
            return Ok(());
        }
        let host_id = self.host_id.clone();
        self.update(None, |g, now| {
            for index in local_partitions.difference(&in_table) {
                g.add_partition(&host_id, *index)?;
            }
            for index in in_table.difference(local_partitions) {
                g.remove_partition(&host_id, *index, now)?;
            }
            Ok(())
        })
        .await
        .map(|_| ())
    }

    /// Takes or renews the primary's lease; a new epoch is recorded in
    /// the table (FIG. 7, 720), which fences the old primary's orders.
    async fn lead(&self, group: &ShareGroup, now_ms: u64) -> Result<(), AgentError> {
        let epoch = self
            .store
            .acquire(
                &self.config.group,
                "primary",
                &self.host_id,
                PRIMARY_LEASE_TTL_MS,
                now_ms,
            )
            .await?;
        *self.primary_epoch.lock().unwrap_or_else(|p| p.into_inner()) = epoch.unwrap_or(0);
        let Some(epoch) = epoch else {
            return Ok(());
        };
        if group.primary_host.as_deref() != Some(&self.host_id) || group.primary_epoch != epoch {
            let host_id = self.host_id.clone();
            self.update(None, |g, _| g.set_primary(&host_id, epoch))
                .await?;
            tracing::info!(epoch, group = %self.config.group, "this manager is the share group's primary");
        }
        Ok(())
    }
}

fn check_epoch(group: &ShareGroup, epoch: u64) -> Result<(), RightsRefusal> {
    if group.mode == GroupMode::Centralized {
        group.check_order_epoch(epoch)
    } else {
        Ok(())
    }
}

/// Commits the transfers whose donor confirmed and aborts the others; a
/// transfer someone else ended already counts as it ended.
fn end_transfers(
    group: &mut ShareGroup,
    begun: &[u64],
    confirmed: &BTreeSet<String>,
    now_ms: u64,
) -> Result<(Vec<u64>, Vec<u64>), RightsRefusal> {
    let (mut committed, mut aborted) = (Vec::new(), Vec::new());
    for id in begun {
        let donor_confirmed = group
            .transfers
            .get(id)
            .is_some_and(|t| confirmed.contains(&t.from.host_id));
        let ended = if donor_confirmed {
            group.commit_transfer(*id, now_ms)
        } else {
            group.abort_transfer(*id, now_ms)
        };
        match ended {
            Ok(()) if donor_confirmed => committed.push(*id),
            Ok(()) => aborted.push(*id),
            Err(RightsRefusal::TransferEnded { phase, .. }) => match phase {
                TransferPhase::Committed => committed.push(*id),
                _ => aborted.push(*id),
            },
            // Gone: it ended and the table forgot it (it keeps only the
            // last ended transfers). Only its coordinator, this order,
            // commits a transfer, so someone else aborted it.
            Err(RightsRefusal::NoSuchTransfer(_)) => aborted.push(*id),
            Err(other) => return Err(other),
        }
    }
    Ok((committed, aborted))
}

/// Another manager's answer in this agent's words.
fn peer_error(error: leasehold_api::ApiError) -> AgentError {
    match error.status() {
        Some(403) => AgentError::Forbidden(error.to_string()),
        Some(404) => AgentError::NotFound(error.to_string()),
        Some(409) => AgentError::RightsConflict(error.to_string()),
        Some(400) => {
            let field = error
                .detail()
                .and_then(|d| d.field.clone())
                .unwrap_or_else(|| "request".into());
            let message = error.to_string();
            // The other manager's message names the field already.
            let problem = message
                .strip_prefix(&format!("{field}: "))
                .unwrap_or(&message)
                .to_string();
            AgentError::Invalid(leasehold_core::FieldError::new(field, problem))
        }
        _ => AgentError::GroupUnreachable(error.to_string()),
    }
}
