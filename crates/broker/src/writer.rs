//! The single writer. Every change of the broker's state is a
//! [`BrokerCommand`]; the writer takes them one after another on one thread,
//! so decisions never race. Each command of a batch is decided in core
//! against the committed table plus the batch's earlier changes (an
//! [`Overlay`]), its changes become the store's writes, the batch commits in
//! one transaction (group commit) through the storage interface, and only
//! then are the changes applied to the shared table (under its write lock,
//! never held across the commit) and the callers answered. Readers therefore
//! see committed state only.

use crate::error::BrokerError;
use crate::metrics::BrokerMetrics;
use crate::outbox::{NoticeSigner, PresignedNotice, ReleaseToNotify};
use crate::state::{table_from_snapshot, BrokerState};
use leasehold_core::command::{check_releaser, decide, BrokerCommand, Outcome, Refusal};
use leasehold_core::lease::{Bill, Lease};
use leasehold_core::ledger::BROKER_COMMISSION_ACCOUNT;
use leasehold_core::table::{Change, Overlay, Principal, TableView};
use leasehold_core::{money, LeaseId};
use leasehold_service::SharedClock;
use leasehold_store::broker::BrokerWrite;
use leasehold_store::BrokerStore;
use std::sync::{Arc, RwLock};
use tokio::sync::{mpsc, oneshot};

/// Most commands committed in one transaction.
const MAX_BATCH: usize = 1024;
/// Most commands waiting for the writer; callers wait when it is full.
const QUEUE_CAPACITY: usize = 8192;
/// Idempotency records are kept for a day (the rule lives in core).
pub use leasehold_core::table::IDEMPOTENCY_RETENTION_MS;
/// How often old records are forgotten.
const IDEMPOTENCY_PRUNE_INTERVAL_MS: u64 = 10 * 60 * 1000;

/// Something to do once a batch is durable (never before).
#[derive(Debug)]
pub enum Effect {
    /// Tell an agent about a new lease on one of its partitions, best-effort.
    /// The notice is signed where it is sent, not on the writer's thread.
    NotifyAgent {
        agent_url: String,
        lease: Box<Lease>,
        signer: Arc<NoticeSigner>,
    },
    /// Deliver a release notice whose outbox row is in the committed batch.
    DeliverReleaseNotice(Box<crate::outbox::PendingNotice>),
}

/// A command's answer once its batch has committed.
#[derive(Debug)]
pub struct Committed {
    pub outcome: Outcome,
    /// For a release pushed to an agent: whether its first delivery was
    /// acknowledged.
    pub first_delivery: Option<oneshot::Receiver<bool>>,
}

type Reply = oneshot::Sender<Result<Committed, BrokerError>>;

struct Request {
    command: BrokerCommand,
    reply: Option<Reply>,
    /// A release's notice, signed by its HTTP handler (see
    /// [`NoticeSigner::presign`]).
    presigned_notice: Option<PresignedNotice>,
}

#[derive(Clone)]
pub struct Writer {
    sender: mpsc::Sender<Request>,
}

/// What the writer thread owns.
struct WriterThread {
    db: Box<dyn BrokerStore>,
    state: Arc<RwLock<BrokerState>>,
    clock: SharedClock,
    signer: Arc<NoticeSigner>,
    on_effect: Arc<dyn Fn(Effect) + Send + Sync>,
    next_prune_ms: u64,
    metrics: Arc<BrokerMetrics>,
    /// Puts the leadership fence first in every batch (issue 11).
    leadership: Arc<crate::leadership::Leadership>,
}

/// What the writer thread needs besides its store and table.
pub(crate) struct WriterParts {
    pub clock: SharedClock,
    pub signer: Arc<NoticeSigner>,
    pub runtime: tokio::runtime::Handle,
    pub on_effect: Arc<dyn Fn(Effect) + Send + Sync>,
    pub metrics: Arc<BrokerMetrics>,
    pub leadership: Arc<crate::leadership::Leadership>,
}

/// One command to decide, with what came along with it.
struct ToDecide<'a> {
    command: &'a BrokerCommand,
    presigned_notice: Option<PresignedNotice>,
    now_ms: u64,
}

/// One batch being decided: the changes not committed yet and what each
/// caller will be told once they are.
#[derive(Default)]
struct Batch {
    overlay: Overlay,
    changes: Vec<Change>,
    writes: Vec<BrokerWrite>,
    effects: Vec<Effect>,
    answers: Vec<(Option<Reply>, Result<Committed, BrokerError>)>,
}

impl Writer {
    /// Starts the writer thread over `db`, sharing `state` with readers.
    pub(crate) fn start(
        db: Box<dyn BrokerStore>,
        state: Arc<RwLock<BrokerState>>,
        parts: WriterParts,
    ) -> (Writer, std::thread::JoinHandle<()>) {
        let (sender, mut receiver) = mpsc::channel::<Request>(QUEUE_CAPACITY);
        let runtime = parts.runtime;
        let mut thread = WriterThread {
            db,
            state,
            clock: parts.clock,
            signer: parts.signer,
            on_effect: parts.on_effect,
            next_prune_ms: 0,
            metrics: parts.metrics,
            leadership: parts.leadership,
        };
        let handle = std::thread::Builder::new()
            .name("leasehold-writer".into())
            .spawn(move || {
                let _guard = runtime.enter();
                while let Some(first) = receiver.blocking_recv() {
                    let mut requests = vec![first];
                    while requests.len() < MAX_BATCH {
                        match receiver.try_recv() {
                            Ok(request) => requests.push(request),
                            Err(_) => break,
                        }
                    }
                    thread.run_batch(requests);
                }
            })
            .expect("spawn the writer thread");
        (Writer { sender }, handle)
    }

    /// Commands sent and not yet taken into a batch by the writer.
    pub fn queued_commands(&self) -> usize {
        self.sender.max_capacity() - self.sender.capacity()
    }

    /// Has the writer decide `command` and answers once its batch is
    /// committed and visible to readers.
    pub async fn submit(&self, command: BrokerCommand) -> Result<Committed, BrokerError> {
        self.submit_with_notice(command, None).await
    }

    /// Like [`Writer::submit`], for a release whose notice the caller has
    /// signed already; the writer uses it if it still matches the lease.
    pub async fn submit_with_notice(
        &self,
        command: BrokerCommand,
        presigned_notice: Option<PresignedNotice>,
    ) -> Result<Committed, BrokerError> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Request {
                command,
                reply: Some(reply),
                presigned_notice,
            })
            .await
            .map_err(|_| BrokerError::Unavailable)?;
        answer.await.map_err(|_| BrokerError::Unavailable)?
    }
}

impl WriterThread {
    fn run_batch(&mut self, requests: Vec<Request>) {
        let now_ms = self.clock.now_ms();
        let commands = requests.len();
        let mut batch = Batch::default();
        {
            // Readers share this lock; only this thread ever writes.
            let state = self.state.clone();
            let table = state.read().unwrap_or_else(|p| p.into_inner());
            for request in requests {
                let to_decide = ToDecide {
                    command: &request.command,
                    presigned_notice: request.presigned_notice,
                    now_ms,
                };
                let answer = self.decide_one(&table, &mut batch, to_decide);
                batch.answers.push((request.reply, answer));
            }
        }
        let commit_started = std::time::Instant::now();
        let commit = if batch.writes.is_empty() {
            self.metrics.observe_commit(commands, None);
            Ok(())
        } else if let Some(fence) = self.leadership.fence() {
            batch.writes.insert(0, fence);
            let committed = self.db.apply(&batch.writes);
            self.metrics
                .observe_commit(commands, Some(commit_started.elapsed()));
            committed
        } else {
            // Stepped down: nothing more is written from this process.
            Err(leasehold_store::StoreError::Fenced {
                name: crate::leadership::LEADERSHIP_LEASE.into(),
                epoch: 0,
            })
        };
        match commit {
            Ok(()) => self.publish(batch),
            Err(error) => self.discard(batch, error),
        }
        self.prune_now_and_then(now_ms);
    }

    /// Keeps the idempotency records and the release notices of expired
    /// keys bounded without a restart. It runs apart from the callers'
    /// batches (as its own statements, not through `apply`), so a failure
    /// of this housekeeping never fails a caller's command, nor theirs it.
    fn prune_now_and_then(&mut self, now_ms: u64) {
        if now_ms < self.next_prune_ms {
            return;
        }
        self.next_prune_ms = now_ms + IDEMPOTENCY_PRUNE_INTERVAL_MS;
        let before_ms = now_ms.saturating_sub(IDEMPOTENCY_RETENTION_MS);
        let command = BrokerCommand::PruneIdempotency { before_ms };
        let decision = {
            let table = self.state.read().unwrap_or_else(|p| p.into_inner());
            decide(
                TableView::new(&table, &Overlay::default()),
                &command,
                now_ms,
            )
        };
        let Ok(decision) = decision else {
            return;
        };
        if let Err(error) = self.db.prune_idempotency(before_ms) {
            tracing::warn!(%error, "cannot prune old idempotency records");
            return;
        }
        {
            let mut table = self.state.write().unwrap_or_else(|p| p.into_inner());
            for change in &decision.changes {
                table.apply(change);
            }
        }
        if let Err(error) = self.db.prune_expired_notices(now_ms) {
            tracing::warn!(%error, "cannot prune the release notices of expired keys");
        }
    }

    /// Decides one command into the batch; a refused one adds nothing.
    fn decide_one(
        &mut self,
        table: &BrokerState,
        batch: &mut Batch,
        to_decide: ToDecide<'_>,
    ) -> Result<Committed, BrokerError> {
        let ToDecide {
            command,
            presigned_notice,
            now_ms,
        } = to_decide;
        let decision = match decide(TableView::new(table, &batch.overlay), command, now_ms) {
            Ok(decision) => decision,
            Err(Refusal::LeaseNotActive { lease_id }) => {
                let BrokerCommand::Release { releaser, .. } = command else {
                    return Err(Refusal::LeaseNotActive { lease_id }.into());
                };
                return self.released_earlier(releaser, lease_id);
            }
            Err(refusal) => return Err(refusal.into()),
        };
        let outcome = match decision.outcome {
            Outcome::LeaseReplayed {
                lease_id,
                lease: None,
            } => Outcome::LeaseReplayed {
                lease_id,
                lease: Some(self.stored_lease(lease_id)?),
            },
            outcome => outcome,
        };
        for change in &decision.changes {
            batch.overlay.apply(table, change);
            BrokerWrite::extend_from_change(&mut batch.writes, change);
        }
        batch.changes.extend(decision.changes);
        let first_delivery = self.queue_notices(&outcome, batch, now_ms, presigned_notice);
        Ok(Committed {
            outcome,
            first_delivery,
        })
    }

    /// The notices a decision sends: a best-effort one for a new lease, and
    /// for a release a durable one (revocation and outbox rows in this very
    /// batch) whose first delivery the release answer waits for.
    fn queue_notices(
        &self,
        outcome: &Outcome,
        batch: &mut Batch,
        now_ms: u64,
        presigned: Option<PresignedNotice>,
    ) -> Option<oneshot::Receiver<bool>> {
        match outcome {
            Outcome::Leased {
                lease,
                agent_url: Some(agent_url),
            } => {
                batch.effects.push(Effect::NotifyAgent {
                    agent_url: agent_url.clone(),
                    lease: Box::new(lease.clone()),
                    signer: self.signer.clone(),
                });
                None
            }
            Outcome::Released {
                lease, agent_url, ..
            } => crate::outbox::queue_release_notice(
                &self.signer,
                ReleaseToNotify {
                    lease,
                    has_agent_url: agent_url.is_some(),
                    presigned,
                },
                now_ms,
                &mut batch.writes,
                &mut batch.effects,
            ),
            _ => None,
        }
    }

    fn stored_lease(&mut self, lease_id: LeaseId) -> Result<Lease, BrokerError> {
        self.db
            .lease(lease_id)?
            .ok_or_else(|| BrokerError::Internal(format!("lease {lease_id} vanished")))
    }

    /// A release of a lease released before this batch: the bill already
    /// written, for whoever may release it.
    fn released_earlier(
        &mut self,
        releaser: &Principal,
        lease_id: LeaseId,
    ) -> Result<Committed, BrokerError> {
        let lease = self
            .db
            .lease(lease_id)?
            .ok_or(BrokerError::from(Refusal::NoSuchLease))?;
        check_releaser(releaser, &lease)?;
        let bill = stored_bill(self.db.as_mut(), &lease)?;
        Ok(Committed {
            outcome: Outcome::AlreadyReleased { lease, bill },
            first_delivery: None,
        })
    }

    /// After the commit: the changes become visible, then callers hear.
    fn publish(&mut self, batch: Batch) {
        if !batch.changes.is_empty() {
            let mut table = self.state.write().unwrap_or_else(|p| p.into_inner());
            for change in &batch.changes {
                table.apply(change);
            }
        }
        for (reply, answer) in batch.answers {
            self.metrics.count_answer(&answer);
            log_lease_change(&answer);
            if let Some(reply) = reply {
                let _ = reply.send(answer);
            }
        }
        for effect in batch.effects {
            (self.on_effect)(effect);
        }
    }

    /// After a failed commit: the batch's changes are thrown away and every
    /// caller is told. The table is reloaded from the database, since a
    /// commit reported as failed may still have happened; lease ids and
    /// epochs the batch used are never handed out again.
    fn discard(&mut self, batch: Batch, error: leasehold_store::StoreError) {
        if let leasehold_store::StoreError::Fenced { .. } = error {
            // Another broker took over: this one must change nothing more
            // and send its callers to the active one.
            self.leadership.step_down(&error.to_string());
            for (reply, _) in batch.answers {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(BrokerError::NotActive(None)));
                }
            }
            return;
        }
        tracing::error!(%error, "commit failed; reloading the resource table from the database");
        self.metrics.count_commit_failure();
        let reloaded = self
            .db
            .load()
            .map_err(BrokerError::from)
            .and_then(table_from_snapshot);
        match reloaded {
            Ok(mut fresh) => {
                let mut table = self.state.write().unwrap_or_else(|p| p.into_inner());
                fresh.keep_high_water_marks(&batch.overlay);
                fresh.last_lease_id = fresh.last_lease_id.max(table.last_lease_id);
                *table = fresh;
            }
            Err(reload_error) => {
                tracing::error!(%reload_error, "cannot reload the resource table; refusing further writes");
                std::process::abort();
            }
        }
        let message = error.to_string();
        for (reply, _) in batch.answers {
            if let Some(reply) = reply {
                let _ = reply.send(Err(BrokerError::Internal(format!(
                    "the change was not saved: {message}"
                ))));
            }
        }
    }
}

/// A committed lease or release, one line each with the lease's id.
fn log_lease_change(answer: &Result<Committed, BrokerError>) {
    match answer {
        Ok(Committed {
            outcome: Outcome::Leased { lease, .. },
            ..
        }) => {
            tracing::info!(lease_id = lease.lease_id, partition = %lease.partition, "lease started")
        }
        Ok(Committed {
            outcome: Outcome::Released { lease, bill, .. },
            ..
        }) => tracing::info!(
            lease_id = lease.lease_id,
            partition = %lease.partition,
            charge_micros = bill.charge_micros,
            "lease released"
        ),
        _ => {}
    }
}

/// The bill of a lease released earlier, rebuilt from the lease and its transfers.
fn stored_bill(db: &mut dyn BrokerStore, lease: &Lease) -> Result<Bill, BrokerError> {
    let transfers = db.lease_transfers(lease.lease_id)?;
    let commission: u64 = transfers
        .iter()
        .filter(|t| t.credit_account == BROKER_COMMISSION_ACCOUNT)
        .map(|t| t.amount_micros)
        .sum();
    let charge = lease.charge_micros.unwrap_or(0);
    Ok(Bill {
        billable_seconds: money::billable_seconds(
            lease.started_at_ms,
            lease.release_requested_at_ms.unwrap_or(lease.started_at_ms),
        ),
        charge_micros: charge,
        lender_credit_micros: charge.saturating_sub(commission),
        commission_micros: commission,
    })
}
