//! Release notices that cannot be lost, and the revocation list agents pull.
//!
//! A release writes its signed notice as an outbox row in the same batch as
//! the release itself, so once the release is committed the notice is too.
//! After the commit a background deliverer sends pending notices to their
//! host's current agent URL, oldest first, a bounded number at a time,
//! retrying with exponential backoff until the agent acknowledges or the key
//! the notice fences has expired; at start it picks up what is still pending.
//! The same notices are listed per host (`GET /v1/hosts/{id}/revocations`)
//! so that an agent that never hears a notice pulls it instead.
//!
//! Lease-started notices stay best-effort (`lib::deliver_notice`): a lost one
//! costs nothing, since the agent adopts a newer lease from its key.

use crate::error::BrokerError;
use crate::state::{BrokerState, Principal};
use crate::writer::{Effect, Writer};
use crate::AppState;
use leasehold_api::{ApiError, Revocation, RevocationPage, MAX_REVOCATION_PAGE};
use leasehold_core::command::BrokerCommand;
use leasehold_core::key::{NoticeClaims, NoticeKind};
use leasehold_core::lease::Lease;
use leasehold_core::FieldError;
use leasehold_core::Role;
use leasehold_service::SharedClock;
use leasehold_store::broker::{BrokerWrite, ReleaseNoticeRow};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Most deliveries in flight at once, so that many dead agents cannot make
/// the broker open connections without end.
const MAX_DELIVERIES_IN_FLIGHT: usize = 32;
/// The wait after the first failed attempt; it doubles on each failure.
const FIRST_RETRY_DELAY_MS: u64 = 200;
/// The longest wait between two attempts.
const MAX_RETRY_DELAY_MS: u64 = 30_000;
/// How long a release answer waits for the first delivery attempt.
const FIRST_ATTEMPT_WAIT: Duration = Duration::from_secs(2);

/// A notice handed to the deliverer once its batch is committed.
#[derive(Debug)]
pub struct PendingNotice {
    row: ReleaseNoticeRow,
    /// Told whether the first attempt was acknowledged (the release answer).
    first_attempt: Option<oneshot::Sender<bool>>,
}

/// Signs the broker's notices to agents (lock on a new lease, fence on
/// release) with the current signing key. The writer holds one: signing is
/// I/O-free but needs the key, so it happens after core's decision.
pub struct NoticeSigner {
    pub key: ed25519_dalek::SigningKey,
    pub key_id: String,
}

/// Names the key only: the private half never goes into a log line.
impl std::fmt::Debug for NoticeSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoticeSigner")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl NoticeSigner {
    pub fn sign(&self, lease: &Lease, kind: NoticeKind) -> String {
        leasehold_core::key::sign_notice(&self.claims(lease, kind), &self.key)
    }

    fn claims(&self, lease: &Lease, kind: NoticeKind) -> NoticeClaims {
        NoticeClaims {
            kind,
            host_id: lease.partition.host_id.clone(),
            partition_index: lease.partition.index,
            lease_id: lease.lease_id,
            epoch: lease.epoch,
            key_expires_at_ms: lease.key_expires_at_ms,
            key_id: self.key_id.clone(),
        }
    }

    /// Signs `lease`'s notice ahead of the command that sends it, on the
    /// caller's thread, so that the single writer does not spend its time
    /// on an ed25519 signature (about 40 µs) for every release.
    pub fn presign(&self, lease: &Lease, kind: NoticeKind) -> PresignedNotice {
        let claims = self.claims(lease, kind);
        let notice = leasehold_core::key::sign_notice(&claims, &self.key);
        PresignedNotice { claims, notice }
    }

    /// The notice for `lease`: the one signed ahead when it says exactly
    /// what the decision says (the lease may have changed in between, e.g.
    /// its key renewed), otherwise signed now.
    fn sign_or_reuse(
        &self,
        lease: &Lease,
        kind: NoticeKind,
        presigned: Option<PresignedNotice>,
    ) -> String {
        let claims = self.claims(lease, kind);
        match presigned {
            Some(presigned) if presigned.claims == claims => presigned.notice,
            _ => leasehold_core::key::sign_notice(&claims, &self.key),
        }
    }
}

/// A notice signed before its command reached the writer, with the claims
/// it was signed over (the writer reuses it only when they still hold).
#[derive(Debug)]
pub struct PresignedNotice {
    claims: NoticeClaims,
    notice: String,
}

/// Signs `lease`'s release notice and lists it for the host's agent to pull;
/// when the host has an agent URL, also queues its outbox row in the
/// release's batch and its delivery for after the commit. The receiver
/// learns whether the agent acknowledged the first attempt.
pub(crate) fn queue_release_notice(
    signer: &NoticeSigner,
    release: ReleaseToNotify<'_>,
    now_ms: u64,
    writes: &mut Vec<BrokerWrite>,
    effects: &mut Vec<Effect>,
) -> Option<oneshot::Receiver<bool>> {
    let ReleaseToNotify {
        lease,
        has_agent_url,
        presigned,
    } = release;
    let row = ReleaseNoticeRow {
        lease_id: lease.lease_id,
        host_id: lease.partition.host_id.clone(),
        notice: signer.sign_or_reuse(lease, NoticeKind::LeaseReleased, presigned),
        key_expires_at_ms: lease.key_expires_at_ms,
        created_at_ms: now_ms,
    };
    writes.push(BrokerWrite::InsertRevocation(row.clone()));
    // A host without an agent URL has nobody to push to (simulations,
    // benchmarks): its agent, if any, pulls the revocation instead.
    if !has_agent_url {
        return None;
    }
    let (reply, receiver) = oneshot::channel();
    writes.push(BrokerWrite::InsertOutboxNotice(row.clone()));
    effects.push(Effect::DeliverReleaseNotice(Box::new(PendingNotice {
        row,
        first_attempt: Some(reply),
    })));
    Some(receiver)
}

/// A committed release whose notice is to be queued.
pub(crate) struct ReleaseToNotify<'a> {
    pub lease: &'a Lease,
    pub has_agent_url: bool,
    /// Signed by the release's HTTP handler, if it could.
    pub presigned: Option<PresignedNotice>,
}

/// Waits up to [`FIRST_ATTEMPT_WAIT`] for the first delivery attempt; true
/// when the agent acknowledged it (the old key is fenced there already).
pub(crate) async fn first_attempt_acknowledged(receiver: Option<oneshot::Receiver<bool>>) -> bool {
    let Some(receiver) = receiver else {
        return false;
    };
    matches!(
        tokio::time::timeout(FIRST_ATTEMPT_WAIT, receiver).await,
        Ok(Ok(true))
    )
}

/// Where committed notices go to be delivered.
pub(crate) type OutboxSender = mpsc::UnboundedSender<PendingNotice>;

/// What the deliverer needs: the client for agents, the host table (for
/// each host's current agent URL), the writer (to delete delivered rows).
pub(crate) struct Deliverer {
    pub notifier: leasehold_api::Client,
    pub state: Arc<RwLock<BrokerState>>,
    pub writer: Writer,
    pub clock: SharedClock,
}

/// A notice waiting for its next attempt.
struct Queued {
    pending: PendingNotice,
    failed_attempts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Acknowledged,
    /// The agent answered that it will never accept this notice.
    NeverAccepted,
    Retry,
}

/// The channel committed notices travel on. It is unbounded because the
/// writer thread must never block on it; the writer's own queue bounds how
/// fast releases (and so notices) arrive.
pub(crate) fn channel() -> (OutboxSender, mpsc::UnboundedReceiver<PendingNotice>) {
    mpsc::unbounded_channel()
}

/// Starts delivering: first the rows left pending by an earlier run, then
/// whatever arrives on `receiver`.
pub(crate) fn spawn_deliverer(
    deliverer: Deliverer,
    receiver: mpsc::UnboundedReceiver<PendingNotice>,
    pending_at_start: Vec<ReleaseNoticeRow>,
) {
    if !pending_at_start.is_empty() {
        tracing::info!(
            notices = pending_at_start.len(),
            "delivering release notices left pending"
        );
    }
    let waiting = pending_at_start
        .into_iter()
        .map(|row| Queued {
            pending: PendingNotice {
                row,
                first_attempt: None,
            },
            failed_attempts: 0,
        })
        .collect();
    tokio::spawn(Arc::new(deliverer).run(receiver, waiting));
}

fn retry_delay(failed_attempts: u32) -> Duration {
    let doublings = failed_attempts.saturating_sub(1).min(16);
    Duration::from_millis((FIRST_RETRY_DELAY_MS << doublings).min(MAX_RETRY_DELAY_MS))
}

impl Deliverer {
    async fn run(
        self: Arc<Self>,
        mut receiver: mpsc::UnboundedReceiver<PendingNotice>,
        initial: Vec<Queued>,
    ) {
        // Keyed by (when due, arrival order): the oldest due notice goes first.
        let mut waiting: BTreeMap<(Instant, u64), Queued> = BTreeMap::new();
        let mut arrivals = 0u64;
        let now = Instant::now();
        for queued in initial {
            waiting.insert((now, arrivals), queued);
            arrivals += 1;
        }
        let mut in_flight: JoinSet<Option<Queued>> = JoinSet::new();
        let mut receiving = true;
        loop {
            while in_flight.len() < MAX_DELIVERIES_IN_FLIGHT {
                let Some(entry) = waiting.first_entry() else {
                    break;
                };
                if entry.key().0 > Instant::now() {
                    break;
                }
                in_flight.spawn(self.clone().attempt(entry.remove()));
            }
            if !receiving && waiting.is_empty() && in_flight.is_empty() {
                return;
            }
            let can_start_more = in_flight.len() < MAX_DELIVERIES_IN_FLIGHT;
            let next_due = waiting.keys().next().map(|(at, _)| *at);
            let sleep_until =
                next_due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                received = receiver.recv(), if receiving => match received {
                    Some(pending) => {
                        let queued = Queued { pending, failed_attempts: 0 };
                        waiting.insert((Instant::now(), arrivals), queued);
                        arrivals += 1;
                    }
                    None => receiving = false,
                },
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Ok(Some(queued)) = done {
                        let due = Instant::now() + retry_delay(queued.failed_attempts);
                        waiting.insert((due, arrivals), queued);
                        arrivals += 1;
                    }
                },
                _ = tokio::time::sleep_until(sleep_until), if next_due.is_some() && can_start_more => {},
            }
        }
    }

    /// One attempt; gives the notice back when it is to be tried again.
    async fn attempt(self: Arc<Self>, mut queued: Queued) -> Option<Queued> {
        let outcome = self.deliver_once(&queued.pending.row).await;
        if let Some(reply) = queued.pending.first_attempt.take() {
            let _ = reply.send(outcome == Outcome::Acknowledged);
        }
        let lease_id = queued.pending.row.lease_id;
        let key_expired = self.clock.now_ms() >= queued.pending.row.key_expires_at_ms;
        if outcome == Outcome::Retry && !key_expired {
            queued.failed_attempts = queued.failed_attempts.saturating_add(1);
            return Some(queued);
        }
        if outcome == Outcome::Retry {
            tracing::info!(
                lease_id,
                "dropping a release notice: the key it fences has expired"
            );
        }
        let forgotten = self
            .writer
            .submit(BrokerCommand::ForgetReleaseNotice { lease_id })
            .await;
        if let Err(error) = forgotten {
            // The row stays; the next start delivers it again, which the
            // agent takes as a no-op.
            tracing::warn!(lease_id, %error, "cannot delete a delivered release notice");
        }
        None
    }

    async fn deliver_once(&self, row: &ReleaseNoticeRow) -> Outcome {
        let agent_url = {
            let state = self.state.read().unwrap_or_else(|p| p.into_inner());
            state
                .hosts
                .get(&row.host_id)
                .and_then(|host| host.row.agent_url.clone())
        };
        // No URL yet: the host may register one later; it can pull meanwhile.
        let Some(agent_url) = agent_url else {
            return Outcome::Retry;
        };
        let client = self.notifier.with_base_url(&agent_url);
        match client.send_notice(&row.notice).await {
            Ok(_) => Outcome::Acknowledged,
            Err(error) if agent_will_never_accept(&error) => {
                tracing::warn!(lease_id = row.lease_id, agent = agent_url, %error, "the agent refuses a release notice for good; dropping it");
                Outcome::NeverAccepted
            }
            Err(error) => {
                tracing::warn!(lease_id = row.lease_id, agent = agent_url, %error, "cannot deliver a release notice yet; will retry");
                Outcome::Retry
            }
        }
    }
}

/// The answers that mean this agent will never take this notice, so that
/// retrying is pointless: 400 (the notice or body is malformed), 404 (the
/// host has no such partition any more, so no job of the lease can run
/// there), 413 and 422 (the body itself is refused). Everything else is
/// retried: a 403 may be a key the agent does not trust yet (a rotation), a
/// 3xx is a redirect we do not follow but the URL may be fixed, 5xx, 408,
/// 409 and 429 are passing.
fn agent_will_never_accept(error: &ApiError) -> bool {
    matches!(error.status(), Some(400 | 404 | 413 | 422))
}

/// A page of `host_id`'s revocations after `after_seq`, for its lender or
/// an admin; at most [`MAX_REVOCATION_PAGE`].
pub(crate) fn revocation_page(
    app: &AppState,
    principal: &Principal,
    host_id: &str,
    after_seq: Option<&str>,
    limit: Option<&str>,
) -> Result<RevocationPage, BrokerError> {
    let after_seq = parse_query_number("after_seq", after_seq, 0, u64::MAX)?;
    let limit = parse_query_number(
        "limit",
        limit,
        MAX_REVOCATION_PAGE as u64,
        MAX_REVOCATION_PAGE as u64,
    )? as u32;
    {
        let state = app.state.read().unwrap_or_else(|p| p.into_inner());
        let host = state
            .hosts
            .get(host_id)
            .ok_or_else(|| BrokerError::NotFound(format!("no host '{host_id}' is registered")))?;
        if principal.role != Role::Admin && host.row.lender != principal.name {
            return Err(BrokerError::Forbidden(format!(
                "host '{host_id}' belongs to another lender; only its lender may read its revocations"
            )));
        }
    }
    let now_ms = app.config.clock.now_ms();
    let mut rows = app
        .reader
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .revocations_after(host_id, after_seq, now_ms, limit + 1)?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    Ok(RevocationPage {
        next_after_seq: rows.last().map_or(after_seq, |row| row.seq),
        more,
        revocations: rows
            .into_iter()
            .map(|row| Revocation {
                seq: row.seq,
                lease_id: row.lease_id,
                notice: row.notice,
            })
            .collect(),
    })
}

fn parse_query_number(
    field: &str,
    text: Option<&str>,
    default: u64,
    max: u64,
) -> Result<u64, BrokerError> {
    let Some(text) = text else {
        return Ok(default);
    };
    match text.parse::<u64>() {
        Ok(value) if value <= max && (field != "limit" || value > 0) => Ok(value),
        _ => Err(BrokerError::Invalid(FieldError::new(
            field,
            format!(
                "'{text}' is not a number between {} and {max}",
                u64::from(field == "limit")
            ),
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease_at_epoch(epoch: u64) -> Lease {
        Lease {
            lease_id: 7,
            partition: leasehold_core::PartitionRef::new("host-a", 1),
            borrower: "bob".into(),
            lender: "lena".into(),
            terms: leasehold_core::terms::Terms {
                vcpus: 2,
                cpu_cap_percent: 100,
                memory_mib: 2048,
                disk_gib: 10,
                images: vec!["busybox".into()],
                price_per_hour_micros: 1_000_000,
                isolation: None,
            },
            epoch,
            started_at_ms: 1_000,
            key_expires_at_ms: 61_000,
            state: leasehold_core::lease::LeaseState::Active,
            release_requested_at_ms: None,
            charge_micros: None,
            ends_at_ms: None,
        }
    }

    #[test]
    fn a_notice_signed_ahead_is_used_only_for_the_lease_it_was_signed_for() {
        let key = leasehold_core::key::signing_key_from_seed([9; 32]);
        let signer = NoticeSigner {
            key: key.clone(),
            key_id: leasehold_core::key::key_id(&key.verifying_key()),
        };
        let decided = lease_at_epoch(4);
        // Signed ahead on a stale view of the lease (an older epoch): the
        // writer must sign the notice of the lease it actually released.
        let stale = signer.presign(&lease_at_epoch(3), NoticeKind::LeaseReleased);
        let notice = signer.sign_or_reuse(&decided, NoticeKind::LeaseReleased, Some(stale));
        let claims =
            leasehold_core::key::decode_notice(&notice, &key.verifying_key()).expect("valid");
        assert_eq!(claims.epoch, 4);
        assert_eq!(claims, signer.claims(&decided, NoticeKind::LeaseReleased));
        // Signed ahead on the same lease: that very notice is kept.
        let ahead = signer.presign(&decided, NoticeKind::LeaseReleased);
        let expected = ahead.notice.clone();
        let notice = signer.sign_or_reuse(&decided, NoticeKind::LeaseReleased, Some(ahead));
        assert_eq!(notice, expected);
        // A started notice is never stood in for by a released one.
        let released = signer.presign(&decided, NoticeKind::LeaseReleased);
        let notice = signer.sign_or_reuse(&decided, NoticeKind::LeaseStarted, Some(released));
        let claims =
            leasehold_core::key::decode_notice(&notice, &key.verifying_key()).expect("valid");
        assert_eq!(claims.kind, NoticeKind::LeaseStarted);
    }

    #[test]
    fn retries_back_off_exponentially_up_to_thirty_seconds() {
        let delays: Vec<u64> = (1..=12)
            .map(|n| retry_delay(n).as_millis() as u64)
            .collect();
        assert_eq!(
            delays,
            vec![200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000, 30000]
        );
        assert_eq!(retry_delay(u32::MAX), Duration::from_secs(30));
    }

    fn refusal(status: u16) -> ApiError {
        ApiError::Status {
            status,
            code: "x".into(),
            message: "x".into(),
            field: None,
            detail: Box::new(leasehold_api::ErrorDetail {
                code: "x".into(),
                message: String::new(),
                field: None,
                key_rejection: None,
                explanation: None,
            }),
        }
    }

    #[test]
    fn only_refusals_that_cannot_change_drop_a_notice() {
        for status in [400, 404, 413, 422] {
            assert!(agent_will_never_accept(&refusal(status)), "{status}");
        }
        for status in [302, 401, 403, 408, 409, 429, 500, 502, 503] {
            assert!(!agent_will_never_accept(&refusal(status)), "{status}");
        }
    }

    #[test]
    fn query_numbers_name_their_field() {
        assert_eq!(
            parse_query_number("after_seq", None, 0, u64::MAX).unwrap(),
            0
        );
        assert_eq!(
            parse_query_number("after_seq", Some("7"), 0, u64::MAX).unwrap(),
            7
        );
        for (field, text) in [
            ("after_seq", "-1"),
            ("limit", "0"),
            ("limit", "1001"),
            ("limit", "x"),
        ] {
            match parse_query_number(field, Some(text), 1000, 1000) {
                Err(BrokerError::Invalid(error)) => assert_eq!(error.field, field),
                other => panic!("{field}={text} gave {other:?}"),
            }
        }
    }
}
