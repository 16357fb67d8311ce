//! Pulling revocations: the broker pushes release notices, but a push can be
//! lost (the broker cannot reach the agent's advertised URL, a firewall, a
//! proxy). So the agent also asks the broker, every poll interval, for the
//! release notices of its host that came after the last one it saw, verifies
//! each with the broker keys it trusts and applies it exactly like a pushed
//! notice. A lost notice thus leaves an old key usable for at most one
//! interval (plus the time to stop the job), instead of until it expires.

use crate::Agent;
use leasehold_api::Revocation;
use leasehold_core::key::{KeyRejection, NoticeClaims, NoticeKind};
use std::sync::Arc;
use std::time::Duration;

/// How often the agent asks the broker for its host's revocations, unless
/// configured otherwise (`--revocation-poll-secs`).
pub const DEFAULT_REVOCATION_POLL_SECS: u64 = 5;

/// Most pages read in one poll, so that a huge backlog cannot keep the loop
/// from sleeping; the rest comes at the next poll.
const MAX_PAGES_PER_POLL: u32 = 100;

/// Starts the pull loop; the handle stops it.
pub(crate) fn spawn_pull_loop(agent: Arc<Agent>) -> tokio::task::AbortHandle {
    // At least 100 ms between polls, whatever the configuration says.
    let interval = Duration::from_millis(agent.config.revocation_poll_interval_ms.max(100));
    // From the start of the list: revocations made while the agent was down
    // are read once, and those already fenced are skipped.
    // One position per market: each broker lists its own revocations.
    let after_seq = Arc::new(tokio::sync::Mutex::new(vec![0u64; agent.markets.len()]));
    let task = tokio::spawn(poll_every(interval, move || {
        let (agent, after_seq) = (agent.clone(), after_seq.clone());
        async move {
            let mut after_seq = after_seq.lock().await;
            for (market, after_seq) in after_seq.iter_mut().enumerate() {
                if agent.markets[market].owner {
                    continue; // the owner's own leases need no pulling
                }
                if let Err(error) = pull_new_revocations(&agent, market, after_seq).await {
                    let broker = &agent.markets[market].url;
                    tracing::warn!(%error, %broker, "cannot pull revocations from the broker; will try again");
                }
            }
            if let Err(error) = agent.fence_expired_keys() {
                tracing::warn!(%error, "cannot fence the leases whose keys expired");
            }
        }
    }));
    task.abort_handle()
}

/// Calls `poll` at once, then every `interval` on tokio's timer (so tests
/// move it with paused time). A poll that overruns delays the next one by
/// the overrun instead of making polls bunch up to catch up.
async fn poll_every<F, Polled>(interval: Duration, mut poll: F)
where
    F: FnMut() -> Polled,
    Polled: std::future::Future<Output = ()>,
{
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        poll().await;
    }
}

/// Reads the pages after `after_seq`, applying each revocation, and moves
/// `after_seq` past what was read.
async fn pull_new_revocations(
    agent: &Arc<Agent>,
    market: usize,
    after_seq: &mut u64,
) -> Result<(), leasehold_api::ApiError> {
    for _ in 0..MAX_PAGES_PER_POLL {
        let page = agent.markets[market]
            .client
            .host_revocations(&agent.config.host_id, *after_seq)
            .await?;
        for revocation in &page.revocations {
            apply_pulled(agent, revocation);
        }
        *after_seq = page.next_after_seq.max(*after_seq);
        if !page.more {
            break;
        }
    }
    Ok(())
}

/// Checks that a pulled entry is a release notice the broker signed for
/// this host and the lease it is listed under; anything else is refused.
fn verify_pulled(
    revocation: &Revocation,
    host_id: &str,
    verify: impl Fn(&str) -> Result<NoticeClaims, KeyRejection>,
) -> Result<NoticeClaims, String> {
    let claims = verify(&revocation.notice).map_err(|rejection| rejection.to_string())?;
    if claims.kind != NoticeKind::LeaseReleased {
        return Err("it is not a release notice".into());
    }
    if claims.host_id != host_id {
        return Err(format!("it is for host '{}'", claims.host_id));
    }
    if claims.lease_id != revocation.lease_id {
        return Err(format!("it is for lease {}", claims.lease_id));
    }
    Ok(claims)
}

/// Applies one verified revocation unless the partition already fences it.
fn apply_pulled(agent: &Arc<Agent>, revocation: &Revocation) {
    let claims = match verify_pulled(revocation, &agent.config.host_id, |notice| {
        agent.verify_notice(notice)
    }) {
        Ok(claims) => claims,
        Err(problem) => {
            tracing::warn!(
                lease_id = revocation.lease_id,
                seq = revocation.seq,
                %problem,
                "ignoring a pulled revocation that does not verify"
            );
            return;
        }
    };
    if already_fenced(agent, &claims) {
        return;
    }
    tracing::info!(
        lease_id = claims.lease_id,
        partition = claims.partition_index,
        "applying a pulled revocation (its notice did not arrive)"
    );
    // In its own task: applying waits for the partition's lock to wipe it,
    // which must not hold up the next poll. The fence itself is written
    // before that wait.
    let agent = agent.clone();
    let notice = revocation.notice.clone();
    tokio::spawn(async move {
        if let Err(error) = agent.apply_notice(&notice).await {
            tracing::warn!(lease_id = claims.lease_id, %error, "cannot apply a pulled revocation");
        }
    });
}

/// Whether the partition's fence already covers this release (the pushed
/// notice arrived, or the agent learned it at start). A partition this host
/// does not have needs no fence either.
fn already_fenced(agent: &Agent, claims: &NoticeClaims) -> bool {
    match agent.db().partition(claims.partition_index) {
        Ok(Some(row)) => row.fence.covers_release(claims.lease_id, claims.epoch),
        Ok(None) => true,
        Err(error) => {
            tracing::warn!(%error, "cannot read the partition table; applying the revocation");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use leasehold_core::key::{self, TrustedKeys};

    fn notice(kind: NoticeKind, host_id: &str, lease_id: u64, signer: &SigningKey) -> String {
        key::sign_notice(
            &NoticeClaims {
                kind,
                host_id: host_id.into(),
                partition_index: 1,
                lease_id,
                epoch: 3,
                key_expires_at_ms: u64::MAX,
                key_id: key::key_id(&signer.verifying_key()),
            },
            signer,
        )
    }

    fn listed(lease_id: u64, notice: String) -> Revocation {
        Revocation {
            seq: 1,
            lease_id,
            notice,
        }
    }

    /// The times, from the start, at which `poll_every` polls, the first
    /// poll taking `first_poll_ms` (tokio's paused time: exact, no waiting).
    async fn poll_times_ms(interval_ms: u64, first_poll_ms: u64, polls: usize) -> Vec<u64> {
        let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
        let started = tokio::time::Instant::now();
        let mut first = true;
        let poller = tokio::spawn(poll_every(Duration::from_millis(interval_ms), move || {
            let _ = sender.send(started.elapsed().as_millis() as u64);
            let took = if std::mem::take(&mut first) {
                first_poll_ms
            } else {
                0
            };
            tokio::time::sleep(Duration::from_millis(took))
        }));
        let mut times = Vec::new();
        while times.len() < polls {
            times.push(receiver.recv().await.expect("the poller runs"));
        }
        poller.abort();
        times
    }

    #[tokio::test(start_paused = true)]
    async fn revocations_are_pulled_at_start_and_then_every_interval_exactly() {
        assert_eq!(
            poll_times_ms(5_000, 0, 4).await,
            vec![0, 5_000, 10_000, 15_000]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_pull_delays_the_next_instead_of_bunching_them() {
        // The first pull takes 7 s: the one due at 5 s starts when it ends,
        // and the interval counts from there, never two polls at once.
        assert_eq!(
            poll_times_ms(5_000, 7_000, 4).await,
            vec![0, 7_000, 12_000, 17_000]
        );
    }

    #[test]
    fn only_the_brokers_release_notices_for_this_host_and_lease_are_applied() {
        let broker = SigningKey::from_bytes(&[7; 32]);
        let forger = SigningKey::from_bytes(&[9; 32]);
        let trusted = TrustedKeys::single(broker.verifying_key());
        let genuine = listed(5, notice(NoticeKind::LeaseReleased, "alpha", 5, &broker));
        assert_eq!(
            verify_pulled(&genuine, "alpha", |n| key::decode_notice_trusted(
                n, &trusted
            ))
            .unwrap()
            .lease_id,
            5
        );
        let refused = [
            // Signed by another key: a forged list must not stop jobs.
            listed(5, notice(NoticeKind::LeaseReleased, "alpha", 5, &forger)),
            // Unsigned junk.
            listed(5, "not-a-notice".into()),
            // A genuine notice of another kind, host or lease.
            listed(5, notice(NoticeKind::LeaseStarted, "alpha", 5, &broker)),
            listed(5, notice(NoticeKind::LeaseReleased, "beta", 5, &broker)),
            listed(6, notice(NoticeKind::LeaseReleased, "alpha", 5, &broker)),
        ];
        for entry in refused {
            assert!(
                verify_pulled(&entry, "alpha", |n| key::decode_notice_trusted(n, &trusted))
                    .is_err(),
                "accepted {entry:?}"
            );
        }
    }
}
