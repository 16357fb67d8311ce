//! One active broker per database (issue 11, the end of seed 000: the
//! control unit and its database on different computers, and a broker that
//! survives the loss of its machine).
//!
//! Every broker process contends for the fenced lease [`LEADERSHIP_LEASE`]
//! of the storage interface. The one that holds it is active: it loads the
//! state, serves, renews the lease every third of its time to live, and
//! puts a [`BrokerWrite::CheckFence`] with its epoch first in every batch,
//! so once another broker has taken over (the next epoch) none of its
//! writes commits, whatever it believes. The others stand by: they answer
//! 503 `standby` (with the active broker's URL) and try again every fifth of
//! the time to live. No consensus of our own: the database decides.
//!
//! Leadership runs on the wall clock, not the broker's (possibly simulated)
//! clock: it is about whether a process is alive, which only real time
//! tells.

use crate::error::BrokerError;
use axum::response::IntoResponse;
use leasehold_api::broker_status::{BrokerRole, BrokerStatus};
use leasehold_store::broker::BrokerWrite;
use leasehold_store::BrokerStore;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The fenced lease the brokers of one database contend for.
pub const LEADERSHIP_LEASE: &str = "broker.active";
/// A dead active broker is replaced about this long after its last renewal.
pub const DEFAULT_LEADERSHIP_TTL_MS: u64 = 5_000;
/// Shortest time to live accepted: renewals every third of it must fit
/// between a database's hiccups.
pub const MIN_LEADERSHIP_TTL_MS: u64 = 600;

/// How a broker takes part in leadership.
#[derive(Debug, Clone)]
pub struct LeadershipConfig {
    pub ttl_ms: u64,
    /// The other brokers of this database, shown in the status.
    pub peers: Vec<String>,
}

impl Default for LeadershipConfig {
    fn default() -> Self {
        LeadershipConfig {
            ttl_ms: DEFAULT_LEADERSHIP_TTL_MS,
            peers: Vec::new(),
        }
    }
}

/// What the leadership is now, shared by the renewal task, the writer (for
/// its fence) and the status route.
struct Now {
    role: BrokerRole,
    epoch: u64,
    since_ms: u64,
    active_url: Option<String>,
    last_renewed_ms: u64,
    /// Active and serving the full API (the state is loaded): until then
    /// the status still says standby, so nobody is sent here too early.
    serving: bool,
}

pub(crate) struct Leadership {
    /// This process in the lease: its data directory's instance id and its
    /// URL (the URL tells standbys and clients where the active one is).
    holder: String,
    url: String,
    config: LeadershipConfig,
    connection: Arc<Mutex<Box<dyn BrokerStore>>>,
    now: Mutex<Now>,
    lost: tokio::sync::watch::Sender<bool>,
}

pub(crate) fn wall_clock_ms() -> u64 {
    leasehold_service::Clock::now_ms(&leasehold_service::SystemClock)
}

/// The URL part of a holder (`"<instance> <url>"`).
fn url_of_holder(holder: &str) -> Option<String> {
    holder.split_once(' ').map(|(_, url)| url.to_string())
}

/// The instance part of a holder (`"<instance> <url>"`).
fn instance_of_holder(holder: &str) -> &str {
    holder.split(' ').next().unwrap_or_default()
}

/// This data directory's instance id, made once (0600): a broker restarted
/// on the same directory and address is the same holder and takes its
/// lease back at once; any other process waits for the lease to lapse.
pub(crate) fn instance_id(data_dir: &std::path::Path) -> Result<String, BrokerError> {
    let path = data_dir.join("broker-instance");
    let internal = |e: leasehold_store::private_fs::PrivateFsError| {
        BrokerError::Internal(format!("broker instance id: {e}"))
    };
    if path.exists() {
        let id = leasehold_store::private_fs::read_private_file(&path).map_err(internal)?;
        return Ok(id.trim().to_string());
    }
    let id = hex::encode(rand::random::<[u8; 8]>());
    leasehold_store::private_fs::write_private_file(&path, id.as_bytes()).map_err(internal)?;
    Ok(id)
}

impl Leadership {
    pub(crate) fn new(
        instance: &str,
        url: &str,
        config: LeadershipConfig,
        connection: Box<dyn BrokerStore>,
    ) -> Arc<Self> {
        let (lost, _) = tokio::sync::watch::channel(false);
        Arc::new(Leadership {
            holder: format!("{instance} {url}"),
            url: url.to_string(),
            config,
            connection: Arc::new(Mutex::new(connection)),
            now: Mutex::new(Now {
                role: BrokerRole::Standby,
                epoch: 0,
                since_ms: wall_clock_ms(),
                active_url: None,
                last_renewed_ms: 0,
                serving: false,
            }),
            lost,
        })
    }

    fn now(&self) -> std::sync::MutexGuard<'_, Now> {
        self.now.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn status(&self) -> BrokerStatus {
        let now = self.now();
        let taking_over = now.role == BrokerRole::Active && !now.serving;
        BrokerStatus {
            role: if taking_over {
                BrokerRole::Standby
            } else {
                now.role
            },
            epoch: now.epoch,
            since_ms: now.since_ms,
            url: self.url.clone(),
            active_url: now.active_url.clone(),
            leadership_ttl_ms: self.config.ttl_ms,
            peers: self.config.peers.clone(),
        }
    }

    pub(crate) fn role(&self) -> BrokerRole {
        self.now().role
    }

    /// The state is loaded and the full API is served.
    pub(crate) fn mark_serving(&self) {
        self.now().serving = true;
    }

    /// The first write of every batch while active.
    pub(crate) fn fence(&self) -> Option<BrokerWrite> {
        let now = self.now();
        (now.role == BrokerRole::Active).then(|| BrokerWrite::CheckFence {
            name: LEADERSHIP_LEASE.to_string(),
            holder: self.holder.clone(),
            epoch: now.epoch,
        })
    }

    /// One try at the lease on the leadership connection (blocking I/O, on
    /// a blocking thread); `Ok(None)` while another broker holds it.
    async fn try_acquire(&self) -> Result<Option<u64>, BrokerError> {
        let connection = self.connection.clone();
        let (holder, ttl_ms) = (self.holder.clone(), self.config.ttl_ms);
        tokio::task::spawn_blocking(move || {
            let mut db = connection.lock().unwrap_or_else(|p| p.into_inner());
            let epoch = db.acquire_lease(LEADERSHIP_LEASE, &holder, ttl_ms, wall_clock_ms())?;
            let current = match epoch {
                Some(_) => None,
                None => db.lease_holder(LEADERSHIP_LEASE)?,
            };
            Ok::<_, BrokerError>((epoch, current))
        })
        .await
        .map_err(|e| BrokerError::Internal(format!("leadership task: {e}")))?
        .map(|(epoch, current)| {
            if let Some(current) = current {
                let mut now = self.now();
                now.epoch = current.epoch;
                now.active_url = url_of_holder(&current.holder);
            }
            epoch
        })
    }

    /// A lease held by an earlier run on this data directory (a crash, a
    /// restart) is given up at once rather than waited
    /// out: the next acquisition then bumps the epoch, fencing off anything
    /// left of that run.
    async fn release_earlier_self(&self) -> Result<(), BrokerError> {
        let connection = self.connection.clone();
        let holder = self.holder.clone();
        tokio::task::spawn_blocking(move || {
            let mut db = connection.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(current) = db.lease_holder(LEADERSHIP_LEASE)? {
                if instance_of_holder(&current.holder) == instance_of_holder(&holder) {
                    db.release_lease(LEADERSHIP_LEASE, &current.holder)?;
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| BrokerError::Internal(format!("leadership task: {e}")))?
    }

    /// Waits until this broker holds the leadership; `on_standby` runs once
    /// if it has to wait. Database errors are retried (a standby must
    /// outlive a database restart).
    pub(crate) async fn wait_until_active(&self, on_standby: &mut dyn FnMut(&BrokerStatus)) {
        if let Err(error) = self.release_earlier_self().await {
            tracing::warn!(%error, "cannot check the leadership of an earlier run");
        }
        let mut told = false;
        loop {
            match self.try_acquire().await {
                Ok(Some(epoch)) => {
                    let mut now = self.now();
                    now.role = BrokerRole::Active;
                    now.epoch = epoch;
                    now.since_ms = wall_clock_ms();
                    now.last_renewed_ms = now.since_ms;
                    now.active_url = Some(self.url.clone());
                    tracing::info!(epoch, "this broker is now the active one");
                    return;
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(%error, "cannot reach the database to contend for leadership")
                }
            }
            if !told {
                told = true;
                on_standby(&self.status());
            }
            tokio::time::sleep(Duration::from_millis(self.config.ttl_ms / 5)).await;
        }
    }

    /// Renews the lease every third of its time to live until it is lost:
    /// another holder has it, or it lapsed (renewals failing for a whole
    /// time to live), after which someone may have acted on the lapse.
    pub(crate) fn spawn_renewal(self: &Arc<Self>) {
        let leadership = self.clone();
        tokio::spawn(async move {
            let interval = Duration::from_millis(leadership.config.ttl_ms / 3);
            loop {
                tokio::time::sleep(interval).await;
                let (role, epoch) = {
                    let now = leadership.now();
                    (now.role, now.epoch)
                };
                if role != BrokerRole::Active {
                    return; // resigned or stepped down
                }
                let lost_because = match leadership.try_acquire().await {
                    Ok(Some(renewed)) if renewed == epoch => {
                        leadership.now().last_renewed_ms = wall_clock_ms();
                        continue;
                    }
                    Ok(Some(renewed)) => {
                        format!("it lapsed and was taken again at epoch {renewed}")
                    }
                    Ok(None) => "another broker holds it".to_string(),
                    Err(error) => {
                        let last = leadership.now().last_renewed_ms;
                        if wall_clock_ms().saturating_sub(last) < leadership.config.ttl_ms {
                            tracing::warn!(%error, "cannot renew the leadership; retrying");
                            continue;
                        }
                        format!("it could not be renewed for its whole time to live: {error}")
                    }
                };
                leadership.step_down(&lost_because);
                return;
            }
        });
    }

    /// Gives up serving: the process must not answer from a state another
    /// broker may be changing.
    pub(crate) fn step_down(&self, why: &str) {
        let epoch = {
            let mut now = self.now();
            if now.role == BrokerRole::SteppedDown {
                return;
            }
            now.role = BrokerRole::SteppedDown;
            now.since_ms = wall_clock_ms();
            now.epoch
        };
        tracing::error!(
            epoch,
            why,
            "this broker lost its leadership and stops serving"
        );
        let _ = self.lost.send(true);
    }

    /// A broker that stops on purpose hands its leadership over at once
    /// (a standby need not wait for the lease to lapse) and stops renewing.
    pub(crate) async fn resign(&self) {
        let was_active = {
            let mut now = self.now();
            let was_active = now.role == BrokerRole::Active;
            now.role = BrokerRole::SteppedDown;
            was_active
        };
        if !was_active {
            return;
        }
        let connection = self.connection.clone();
        let holder = self.holder.clone();
        let released = tokio::task::spawn_blocking(move || {
            let mut db = connection.lock().unwrap_or_else(|p| p.into_inner());
            db.release_lease(LEADERSHIP_LEASE, &holder)
        })
        .await;
        if let Ok(Err(error)) = released {
            tracing::warn!(%error, "cannot hand the leadership over; it lapses by itself");
        }
    }

    /// Resolves once this broker has stepped down.
    pub(crate) async fn lost(&self) {
        let mut watch = self.lost.subscribe();
        let _ = watch.wait_for(|lost| *lost).await;
    }
}

/// The routes a standby (and an active broker) answers about leadership.
pub(crate) fn status_route(leadership: Arc<Leadership>) -> axum::Router {
    axum::Router::new().route(
        "/v1/broker/status",
        axum::routing::get(move || {
            let leadership = leadership.clone();
            async move { axum::Json(leadership.status()) }
        }),
    )
}

/// While standing by: the status, health, and 503 `standby` for the rest,
/// naming the active broker so that a client can go there.
pub(crate) fn standby_router(leadership: Arc<Leadership>) -> axum::Router {
    let for_fallback = leadership.clone();
    status_route(leadership)
        .route(
            "/v1/health",
            axum::routing::get(|| async { axum::Json(serde_json::json!({"status": "standby"})) }),
        )
        .fallback(move || {
            let status = for_fallback.status();
            async move { BrokerError::NotActive(status.active_url).into_response() }
        })
}
