//! The single writer. Every change to the resource table, leases and ledger
//! runs here, one job after another on one thread, so decisions never race;
//! the jobs that arrive together commit together in one transaction
//! (group commit) through the storage interface (SQLite or PostgreSQL), and
//! nobody is answered before that commit is durable.

use crate::error::BrokerError;
use crate::state::BrokerState;
use leasehold_core::lease::Bill;
use leasehold_core::LeaseId;
use leasehold_service::SharedClock;
use leasehold_store::broker::BrokerWrite;
use leasehold_store::BrokerStore;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use tokio::sync::{mpsc, oneshot};

/// Most jobs committed in one transaction.
const MAX_BATCH: usize = 1024;
/// Most jobs waiting for the writer; callers wait when it is full.
const QUEUE_CAPACITY: usize = 8192;

/// Something to do once a batch is durable (never before).
#[derive(Debug)]
pub enum Effect {
    /// Tell an agent about a new lease on one of its partitions, best-effort.
    NotifyAgent { agent_url: String, notice: String },
    /// Deliver a release notice whose outbox row is in the committed batch.
    DeliverReleaseNotice(Box<crate::outbox::PendingNotice>),
}

/// What a job may touch.
pub struct WriteContext<'a> {
    pub state: &'a mut BrokerState,
    pub db: &'a mut dyn BrokerStore,
    pub writes: &'a mut Vec<BrokerWrite>,
    pub effects: &'a mut Vec<Effect>,
    pub now_ms: u64,
    /// Leases released earlier in this (not yet committed) batch.
    pub released_this_batch: &'a mut HashMap<LeaseId, (leasehold_core::lease::Lease, Bill)>,
}

type Completion = Box<dyn FnOnce(Result<(), BrokerError>) + Send>;
type Job = Box<dyn FnOnce(&mut WriteContext<'_>) -> (bool, Completion) + Send>;

#[derive(Clone)]
pub struct Writer {
    sender: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the writer thread over `db`, sharing `state` with readers.
    pub fn start(
        mut db: Box<dyn BrokerStore>,
        state: Arc<RwLock<BrokerState>>,
        clock: SharedClock,
        runtime: tokio::runtime::Handle,
        on_effect: Arc<dyn Fn(Effect) + Send + Sync>,
    ) -> (Writer, std::thread::JoinHandle<()>) {
        let (sender, mut receiver) = mpsc::channel::<Job>(QUEUE_CAPACITY);
        let thread = std::thread::Builder::new()
            .name("leasehold-writer".into())
            .spawn(move || {
                let _guard = runtime.enter();
                let mut next_prune_ms = 0u64;
                while let Some(first) = receiver.blocking_recv() {
                    let mut jobs = vec![first];
                    while jobs.len() < MAX_BATCH {
                        match receiver.try_recv() {
                            Ok(job) => jobs.push(job),
                            Err(_) => break,
                        }
                    }
                    run_batch(
                        db.as_mut(),
                        &state,
                        &clock,
                        jobs,
                        &on_effect,
                        &mut next_prune_ms,
                    );
                }
            })
            .expect("spawn the writer thread");
        (Writer { sender }, thread)
    }

    /// Runs `job` on the writer and answers once its batch is committed.
    pub async fn run<T, F>(&self, job: F) -> Result<T, BrokerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut WriteContext<'_>) -> Result<T, BrokerError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let boxed: Job = Box::new(move |context| {
            let result = job(context);
            let succeeded = result.is_ok();
            let completion: Completion = Box::new(move |commit| {
                let _ = reply.send(commit.and(result));
            });
            (succeeded, completion)
        });
        self.sender
            .send(boxed)
            .await
            .map_err(|_| BrokerError::Unavailable)?;
        answer.await.map_err(|_| BrokerError::Unavailable)?
    }
}

/// Idempotency records are kept for a day: honoured while at most this old.
pub const IDEMPOTENCY_RETENTION_MS: u64 = 24 * 3600 * 1000;
/// How often old records are forgotten.
const IDEMPOTENCY_PRUNE_INTERVAL_MS: u64 = 10 * 60 * 1000;

/// Keeps the idempotency records and the release notices (whose keys have
/// expired) bounded, in memory and on disk, without waiting for a restart.
fn prune_idempotency_now_and_then(
    db: &mut dyn BrokerStore,
    state: &RwLock<BrokerState>,
    clock: &SharedClock,
    next_prune_ms: &mut u64,
) {
    let now_ms = clock.now_ms();
    if now_ms < *next_prune_ms {
        return;
    }
    *next_prune_ms = now_ms + IDEMPOTENCY_PRUNE_INTERVAL_MS;
    let before_ms = now_ms.saturating_sub(IDEMPOTENCY_RETENTION_MS);
    state
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .prune_idempotency(before_ms);
    if let Err(error) = db.prune_idempotency(before_ms) {
        tracing::warn!(%error, "cannot prune old idempotency records");
    }
    if let Err(error) = db.prune_expired_notices(now_ms) {
        tracing::warn!(%error, "cannot prune the release notices of expired keys");
    }
}

fn run_batch(
    db: &mut dyn BrokerStore,
    state: &RwLock<BrokerState>,
    clock: &SharedClock,
    jobs: Vec<Job>,
    on_effect: &Arc<dyn Fn(Effect) + Send + Sync>,
    next_prune_ms: &mut u64,
) {
    let mut writes = Vec::new();
    let mut effects = Vec::new();
    let mut completions = Vec::with_capacity(jobs.len());
    let mut released_this_batch = HashMap::new();
    {
        let mut guard = state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now_ms = clock.now_ms();
        for job in jobs {
            let writes_before = writes.len();
            let effects_before = effects.len();
            let mut context = WriteContext {
                state: &mut guard,
                db: &mut *db,
                writes: &mut writes,
                effects: &mut effects,
                now_ms,
                released_this_batch: &mut released_this_batch,
            };
            let (succeeded, completion) = job(&mut context);
            if !succeeded {
                // A refused job changes nothing: drop anything it queued.
                writes.truncate(writes_before);
                effects.truncate(effects_before);
            }
            completions.push(completion);
        }
    }
    let commit = if writes.is_empty() {
        Ok(())
    } else {
        db.apply(&writes)
    };
    match commit {
        Ok(()) => {
            for completion in completions {
                completion(Ok(()));
            }
            prune_idempotency_now_and_then(db, state, clock, next_prune_ms);
            for effect in effects {
                on_effect(effect);
            }
        }
        Err(error) => {
            tracing::error!(%error, "commit failed; reloading the resource table from the database");
            let reloaded = db
                .load()
                .map_err(BrokerError::from)
                .and_then(BrokerState::from_snapshot);
            match reloaded {
                Ok(mut fresh) => {
                    let mut guard = state.write().unwrap_or_else(|p| p.into_inner());
                    fresh.keep_high_water_marks(&guard);
                    *guard = fresh;
                }
                Err(reload_error) => {
                    tracing::error!(%reload_error, "cannot reload the resource table; refusing further writes");
                    std::process::abort();
                }
            }
            let message = error.to_string();
            for completion in completions {
                completion(Err(BrokerError::Internal(format!(
                    "the change was not saved: {message}"
                ))));
            }
        }
    }
}
