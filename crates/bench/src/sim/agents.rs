//! The simulated host agents. Each keeps the core's fence for its
//! partitions (`leasehold_core::fence`, the type the real agent runs on),
//! learns of releases by pulling its host's revocation list from a cursor
//! (each notice checked against the broker's published keys, as an agent
//! does), and is shown lease keys by borrowers (checked offline, then
//! decided by the fence).
//!
//! What must hold, checked as it happens:
//! - every key and notice the broker hands out verifies against its keys,
//!   across restarts, and says what the model says (lease, epoch, host);
//! - a pull from the cursor leaves the agent knowing every release of its
//!   host whose key still lives, so a notice is never skipped;
//! - once its agent has pulled a release, that lease's key never runs a job
//!   again; the key of an active lease is taken while it lives;
//! - a fence only ever holds a lease the broker concluded, on that lease's
//!   partition, and never one its agent knows to be released.

use super::adapter::borrower_name;
use super::Sim;
use leasehold_core::fence::{on_event, FenceAction, FenceEvent, FenceRefusal, PartitionFence};
use leasehold_core::key::{self, KeyRejection, TrustedKeys};
use leasehold_core::LeaseId;
use std::collections::{BTreeMap, BTreeSet};

/// What the simulated agents of a seed know.
#[derive(Debug, Default)]
pub(super) struct SimAgents {
    hosts: BTreeMap<String, SimAgent>,
    /// The broker's published keys, fetched once (they are durable, so a
    /// restarted broker must sign with one of them).
    trusted: Option<TrustedKeys>,
}

/// One host's agent.
#[derive(Debug, Default)]
struct SimAgent {
    /// The last revocation pulled.
    after_seq: u64,
    fences: BTreeMap<u32, PartitionFence>,
    /// Leases whose release this agent has pulled.
    heard_released: BTreeSet<LeaseId>,
}

/// How a presented key was decided, for the trace and the expectation.
enum KeyDecision {
    Taken,
    Refused(FenceRefusal),
}

impl Sim {
    /// The broker's published keys, fetched on first use.
    async fn trusted_keys(&mut self) -> Result<TrustedKeys, String> {
        if let Some(trusted) = &self.agents.trusted {
            return Ok(trusted.clone());
        }
        let published = self
            .broker
            .broker_keys()
            .await
            .map_err(|e| format!("an agent cannot read the broker's keys: {e}"))?;
        let mut trusted = TrustedKeys::default();
        for published_key in published {
            let verifying =
                key::verifying_key_from_hex(&published_key.public_key_hex).ok_or_else(|| {
                    format!("the broker publishes a malformed key: {published_key:?}")
                })?;
            trusted.insert(verifying);
        }
        self.agents.trusted = Some(trusted.clone());
        Ok(trusted)
    }

    /// The agent of `host_id` pulls its revocations from its cursor and
    /// fences each released lease; afterwards it must know every release
    /// of its host whose key still lives.
    pub(super) async fn agent_pull(&mut self, host_id: &str) -> Result<(), String> {
        let trusted = self.trusted_keys().await?;
        let now_ms = self.now_ms();
        let mut pulled = 0usize;
        loop {
            let after_seq = self
                .agents
                .hosts
                .entry(host_id.into())
                .or_default()
                .after_seq;
            let page = self
                .broker
                .host_revocations(host_id, after_seq)
                .await
                .map_err(|e| format!("agent of {host_id} cannot pull its revocations: {e}"))?;
            for revocation in &page.revocations {
                let claims = key::decode_notice_trusted(&revocation.notice, &trusted).map_err(
                    |rejection| {
                        format!(
                            "host {host_id}'s notice for lease {} does not verify against the broker's keys: {rejection:?}",
                            revocation.lease_id
                        )
                    },
                )?;
                self.check_notice_claims(host_id, revocation.lease_id, &claims)?;
                let agent = self.agents.hosts.entry(host_id.into()).or_default();
                agent.after_seq = revocation.seq;
                agent.heard_released.insert(claims.lease_id);
                let event = FenceEvent::LeaseReleased {
                    lease_id: claims.lease_id,
                    epoch: claims.epoch,
                };
                apply_to_fence(agent, claims.partition_index, event, now_ms).map_err(
                    |refusal| {
                        format!(
                            "agent of {host_id} cannot fence lease {}: {refusal}",
                            claims.lease_id
                        )
                    },
                )?;
                pulled += 1;
            }
            if !page.more {
                break;
            }
        }
        self.counters.agent_pulls += 1;
        self.record(format!("-> agent {host_id} pulled {pulled} notices"));
        self.check_agent_heard_every_release(host_id)
    }

    /// A notice says what the model holds: a released lease, on this host,
    /// with its epoch and partition.
    fn check_notice_claims(
        &self,
        host_id: &str,
        listed_lease_id: LeaseId,
        claims: &key::NoticeClaims,
    ) -> Result<(), String> {
        let lease = self.model.leases.get(&claims.lease_id);
        let matches = lease.is_some_and(|lease| {
            lease.released.is_some()
                && claims.kind == key::NoticeKind::LeaseReleased
                && claims.lease_id == listed_lease_id
                && claims.host_id == host_id
                && lease.partition.host_id == host_id
                && lease.partition.index == claims.partition_index
                && lease.epoch == claims.epoch
        });
        if matches {
            Ok(())
        } else {
            Err(format!(
                "host {host_id}'s notice listed for lease {listed_lease_id} says {claims:?}; the model has {lease:?}"
            ))
        }
    }

    /// After a pull, the agent knows every release of its host whose key
    /// still lives (older ones may be pruned: their keys fail anyway).
    fn check_agent_heard_every_release(&self, host_id: &str) -> Result<(), String> {
        let now_ms = self.now_ms();
        let agent = &self.agents.hosts[host_id];
        let missed: Vec<LeaseId> = self
            .model
            .released_with_live_keys_on(host_id, now_ms)
            .into_iter()
            .filter(|lease_id| !agent.heard_released.contains(lease_id))
            .collect();
        if missed.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "agent of {host_id} pulled to seq {} and never heard of the release of leases {missed:?}",
                agent.after_seq
            ))
        }
    }

    /// The borrower of `lease_id` shows its key to the host's agent, as a
    /// job would: verified offline, then decided by the partition's fence.
    pub(super) async fn present_key(&mut self, lease_id: LeaseId) -> Result<(), String> {
        let trusted = self.trusted_keys().await?;
        let now_ms = self.now_ms();
        let lease = self.model.leases[&lease_id].clone();
        let claims =
            key::decode_and_verify_trusted(&lease.lease_key, &trusted).map_err(|rejection| {
                format!("lease {lease_id}'s key does not verify: {rejection:?}")
            })?;
        let claims_match = claims.lease_id == lease_id
            && claims.epoch == lease.epoch
            && claims.host_id == lease.partition.host_id
            && claims.partition_index == lease.partition.index
            && claims.borrower == borrower_name(lease.borrower);
        if !claims_match {
            return Err(format!(
                "lease {lease_id}'s key says {claims:?}; the model has {lease:?}"
            ));
        }
        let agent = self
            .agents
            .hosts
            .entry(lease.partition.host_id.clone())
            .or_default();
        let event = FenceEvent::KeyPresented {
            lease_id,
            epoch: claims.epoch,
            key_valid_from_ms: claims.not_before_ms.unwrap_or(0),
            key_expires_at_ms: claims.expires_at_ms,
        };
        let decision = match apply_to_fence(agent, claims.partition_index, event, now_ms) {
            Ok(()) => {
                let built = FenceEvent::Built {
                    lease_id,
                    epoch: claims.epoch,
                };
                apply_to_fence(agent, claims.partition_index, built, now_ms).map_err(
                    |refusal| format!("lease {lease_id} taken, then not built: {refusal}"),
                )?;
                KeyDecision::Taken
            }
            Err(refusal) => KeyDecision::Refused(refusal),
        };
        let heard_released = agent.heard_released.contains(&lease_id);
        let live = lease.released.is_none() && now_ms < claims.expires_at_ms;
        self.judge_key_decision(lease_id, &decision, heard_released, live)
    }

    /// What the agent had to decide: refuse a key whose release it pulled,
    /// take the key of an active lease while it lives; anything else (a
    /// release not pulled yet) may go either way until the next pull.
    fn judge_key_decision(
        &mut self,
        lease_id: LeaseId,
        decision: &KeyDecision,
        heard_released: bool,
        live: bool,
    ) -> Result<(), String> {
        match decision {
            KeyDecision::Taken => {
                self.counters.keys_taken += 1;
                self.record(format!("-> agent took the key of lease {lease_id}"));
                if heard_released {
                    return Err(format!(
                        "an agent took the key of lease {lease_id} after pulling its release"
                    ));
                }
            }
            KeyDecision::Refused(refusal) => {
                self.counters.keys_refused += 1;
                self.record(format!(
                    "-> agent refused the key of lease {lease_id}: {refusal}"
                ));
                let released_or_stale = matches!(
                    refusal,
                    FenceRefusal::Key(KeyRejection::Released | KeyRejection::Stale)
                );
                if live || (heard_released && !released_or_stale) {
                    return Err(format!(
                        "an agent refused the key of lease {lease_id} ({refusal}); live {live}, release pulled {heard_released}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every fence holds a lease the broker concluded, on that lease's
    /// partition, at its epoch, and not one its agent knows was released.
    pub(super) fn check_agent_fences(&self) -> Result<(), String> {
        for (host_id, agent) in &self.agents.hosts {
            for (index, fence) in &agent.fences {
                let Some(lease_id) = fence.lease_id() else {
                    continue;
                };
                let lease = self.model.leases.get(&lease_id);
                let holds = lease.is_some_and(|lease| {
                    lease.partition.host_id == *host_id
                        && lease.partition.index == *index
                        && lease.epoch == fence.epoch
                        && fence.admits_job(lease_id, lease.epoch)
                        && !agent.heard_released.contains(&lease_id)
                });
                if !holds {
                    return Err(format!(
                        "agent of {host_id} holds partition {index} for lease {lease_id} ({fence:?}); the model has {lease:?}, release pulled {}",
                        agent.heard_released.contains(&lease_id)
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Decides `event` on the fence of partition `index` (a new one when the
/// agent has none yet) and carries out what the sim can: a fenced
/// partition's jobs stop at once, so its wipe starts and ends here.
fn apply_to_fence(
    agent: &mut SimAgent,
    index: u32,
    event: FenceEvent,
    now_ms: u64,
) -> Result<(), FenceRefusal> {
    let fence = *agent
        .fences
        .entry(index)
        .or_insert_with(PartitionFence::new_free);
    let (mut fence, actions) = on_event(fence, event, now_ms)?;
    if actions.contains(&FenceAction::WipeWhenStopped) {
        for step in [FenceEvent::WipeStarted, FenceEvent::WipeDone] {
            (fence, _) = on_event(fence, step, now_ms)?;
        }
    }
    agent.fences.insert(index, fence);
    Ok(())
}
