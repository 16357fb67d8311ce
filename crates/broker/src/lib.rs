//! The leasehold broker (management server 10): the resource table, matching,
//! leases and their keys, and the ledger, served over HTTP.
//!
//! Layout: `state` holds the in-memory resource table, `writer` is the single
//! thread that changes it and group-commits to the store (SQLite or
//! PostgreSQL), `http` parses requests,
//! checks roles and maps errors (in `error`), `openapi` describes the API,
//! `ui` serves the web dashboard at `/ui`.

pub mod error;
mod groups;
mod http;
mod images;
pub mod leadership;
pub mod metrics;
mod openapi;
mod outbox;
mod reservations;
pub mod signing_keys;
pub mod state;
mod ui;
pub mod writer;

pub use error::BrokerError;

use ed25519_dalek::SigningKey;
use leasehold_core::Role;
use leasehold_service::SharedClock;
use leasehold_store::broker::BrokerWrite;
use leasehold_store::{BrokerDatabase, BrokerStore, Durability};
use sha2::{Digest, Sha256};
use state::BrokerState;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use writer::{Effect, Writer};

/// Where versions before key files kept the signing-key seed.
const LEGACY_SEED_META_KEY: &str = "signing_key_seed_hex";

/// Lease keys live this long unless configured otherwise: a week.
pub const DEFAULT_KEY_TTL_MS: u64 = 7 * 24 * 3600 * 1000;

#[derive(Clone)]
pub struct BrokerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub durability: Durability,
    /// The broker's cut of every charge, in basis points (1/100 %).
    pub commission_basis_points: u32,
    pub key_ttl_ms: u64,
    pub clock: SharedClock,
    /// The image store whose digests partitions' images are pinned to when
    /// registered; `None` keeps images as given (simulations).
    pub image_store_url: Option<String>,
    /// Serve over TLS with this identity; `None` serves plain HTTP.
    pub tls: Option<leasehold_service::ServerTls>,
    /// The certificates accepted from agents and the image store on https.
    pub client_trust: leasehold_api::ServerTrust,
    /// A `postgres://` URL to keep the broker's state in PostgreSQL; `None`
    /// keeps it in SQLite in `data_dir` (the default). A secret when it
    /// carries a password: never logged.
    pub database_url: Option<String>,
    /// Wraps the opened store (the writer's), e.g. to inject faults in the
    /// simulation; `None` in production.
    pub store_layer: Option<StoreLayer>,
    /// How the planner of seed 003 acquires, and its interval.
    pub plan_policy: leasehold_core::reservation::planner::PlanPolicy,
    /// Whether a timer runs a planning round every interval (tests that
    /// drive rounds themselves turn it off).
    pub run_planner: bool,
    /// Serve `/metrics` without a token (`--metrics-public`); otherwise
    /// only the admin may read it.
    pub metrics_public: bool,
}

/// A function that wraps the writer's store in another `BrokerStore`.
pub type StoreLayer = Arc<dyn Fn(Box<dyn BrokerStore>) -> Box<dyn BrokerStore> + Send + Sync>;

pub(crate) struct AppState {
    pub state: Arc<RwLock<BrokerState>>,
    pub writer: Writer,
    /// A second connection for history queries (bills, ledger), so reads
    /// never wait behind the writer's commits.
    pub reader: Mutex<Box<dyn BrokerStore>>,
    /// The current signing key, kept in its own 0600 file (`signing_keys`).
    pub signing_key: SigningKey,
    pub signing_key_id: String,
    /// Signs notices to agents with that key; release handlers sign their
    /// notice before the writer decides (`outbox::NoticeSigner::presign`).
    pub notice_signer: Arc<outbox::NoticeSigner>,
    /// Every key whose lease keys may still be valid, for agents.
    pub published_keys: Vec<leasehold_api::BrokerPublicKey>,
    pub config: BrokerConfig,
    pub images: Option<images::ImageResolver>,
    /// This broker's own metrics registry (`/metrics`).
    pub metrics: Arc<metrics::BrokerMetrics>,
    /// Whether this broker is the active one of its database (issue 11).
    pub leadership: Arc<leadership::Leadership>,
}

/// A broker that is serving.
pub struct RunningBroker {
    pub local_addr: SocketAddr,
    /// Set when this start created the first admin: its token, shown once.
    pub bootstrap_admin_token: Option<String>,
    app: Arc<AppState>,
    server: leasehold_service::ServerHandle,
    leadership: Arc<leadership::Leadership>,
}

pub fn token_sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

pub fn new_token() -> String {
    format!("lh_{}", hex::encode(rand::random::<[u8; 24]>()))
}

impl RunningBroker {
    pub fn url(&self) -> String {
        let scheme = if self.app.config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.local_addr)
    }

    /// Creates a principal directly (used by `leasehold up` to bootstrap).
    pub async fn create_principal(&self, name: &str, role: Role) -> Result<String, BrokerError> {
        http::create_principal(&self.app, name.to_string(), role).await
    }

    /// Makes a credential acting for `lender` on `host_id` only (used by
    /// `leasehold up` for its local agent).
    pub async fn create_host_credential(
        &self,
        lender: &str,
        host_id: &str,
    ) -> Result<String, BrokerError> {
        http::issue_host_credential(&self.app, lender.to_string(), host_id.to_string()).await
    }

    /// Stops accepting requests and waits for the server to finish.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
        self.leadership.resign().await;
    }

    /// Waits until the server stops (after Ctrl-C / SIGTERM, or when this
    /// broker lost its leadership to another: then an error says so).
    pub async fn wait(self) -> std::io::Result<()> {
        self.server.wait().await?;
        match self.leadership.role() {
            leasehold_api::broker_status::BrokerRole::SteppedDown => Err(std::io::Error::other(
                "this broker lost its leadership to another broker of its database; start it again to stand by",
            )),
            _ => {
                self.leadership.resign().await;
                Ok(())
            }
        }
    }

    /// Whether this broker is active, and since when (`/v1/broker/status`).
    pub fn status(&self) -> leasehold_api::broker_status::BrokerStatus {
        self.leadership.status()
    }
}

/// Where the broker's state lives: PostgreSQL at `database_url`, else
/// SQLite in the data directory, whose files must be private.
fn broker_database(config: &BrokerConfig) -> Result<BrokerDatabase, BrokerError> {
    if let Some(url) = &config.database_url {
        return Ok(BrokerDatabase::Postgres(url.clone()));
    }
    let db_path = config.data_dir.join("broker.db");
    for path in [db_path.clone(), config.data_dir.join("broker.db-wal")] {
        leasehold_store::private_fs::check_private_file(&path)
            .map_err(|e| BrokerError::Internal(e.to_string()))?;
    }
    Ok(BrokerDatabase::Sqlite(db_path))
}

/// The store opened, upgraded and bootstrapped, and what start-up read.
struct OpenedStore {
    db: Box<dyn BrokerStore>,
    /// A second connection for history queries.
    reader: Box<dyn BrokerStore>,
    table: BrokerState,
    keys: signing_keys::BrokerKeys,
    bootstrap_admin_token: Option<String>,
}

/// Opens the broker's database, moves a legacy signing-key seed out of it,
/// makes the first admin when there is none, forgets old idempotency
/// records and loads the resource table.
fn open_store(config: &BrokerConfig) -> Result<OpenedStore, BrokerError> {
    let database = broker_database(config)?;
    let mut db = leasehold_store::open_broker_store(&database, config.durability)?;
    let reader = leasehold_store::open_broker_store(&database, config.durability)?;
    let retained_from_ms = config
        .clock
        .now_ms()
        .saturating_sub(writer::IDEMPOTENCY_RETENTION_MS);
    db.prune_idempotency(retained_from_ms)?;
    // Loaded once: a million partitions take seconds and most of the
    // broker's memory, so a second load is only for a first start.
    let snapshot = db.load()?;
    let mut bootstrap = Vec::new();
    // The signing key lives in its own file. A seed left in the database by
    // an older version becomes the first key file and leaves the database.
    let legacy_seed = snapshot
        .meta
        .get(LEGACY_SEED_META_KEY)
        .and_then(|h| hex::decode(h).ok())
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok());
    let keys = signing_keys::load_or_create(
        &config.data_dir,
        legacy_seed,
        rand::random(),
        config.clock.now_ms(),
    )?;
    if snapshot.meta.contains_key(LEGACY_SEED_META_KEY) {
        bootstrap.push(BrokerWrite::DeleteMeta {
            key: LEGACY_SEED_META_KEY.into(),
        });
    }
    let mut bootstrap_admin_token = None;
    if snapshot.principals.is_empty() {
        let token = new_token();
        bootstrap.push(BrokerWrite::InsertPrincipal {
            name: "admin".into(),
            role: Role::Admin.as_str().into(),
            token_sha256: token_sha256(&token),
            at_ms: config.clock.now_ms(),
        });
        bootstrap_admin_token = Some(token);
    }
    let snapshot = if bootstrap.is_empty() {
        snapshot
    } else {
        drop(snapshot);
        db.apply(&bootstrap)?;
        db.load()?
    };
    let table = state::table_from_snapshot(snapshot)?;
    Ok(OpenedStore {
        db,
        reader,
        table,
        keys,
        bootstrap_admin_token,
    })
}

/// Opens (or creates) the broker's database (SQLite in `data_dir`, or
/// PostgreSQL at `database_url`) and starts serving.
/// Stops on Ctrl-C / SIGTERM or [`RunningBroker::shutdown`].
pub async fn start(config: BrokerConfig) -> Result<RunningBroker, BrokerError> {
    start_with_leadership(config, leadership::LeadershipConfig::default(), &mut |_| {}).await
}

/// [`start`] as one of several brokers of one database (issue 11): listens
/// at once, stands by (answering 503 `standby`, and calling `on_standby`
/// once) until it holds the leadership, then loads the state and serves.
pub async fn start_with_leadership(
    config: BrokerConfig,
    leadership_config: leadership::LeadershipConfig,
    on_standby: &mut dyn FnMut(&leasehold_api::broker_status::BrokerStatus),
) -> Result<RunningBroker, BrokerError> {
    // The data directory holds the signing keys whichever database is used.
    leasehold_store::private_fs::ensure_private_dir(&config.data_dir)
        .map_err(|e| BrokerError::Internal(e.to_string()))?;
    if leadership_config.ttl_ms < leadership::MIN_LEADERSHIP_TTL_MS {
        return Err(BrokerError::Internal(format!(
            "the leadership time to live must be at least {} ms",
            leadership::MIN_LEADERSHIP_TTL_MS
        )));
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| BrokerError::Internal(format!("cannot listen on {}: {e}", config.listen)))?;
    let local_addr = listener
        .local_addr()
        .map_err(|e| BrokerError::Internal(e.to_string()))?;
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let leadership = leadership::Leadership::new(
        &leadership::instance_id(&config.data_dir)?,
        &format!("{scheme}://{local_addr}"),
        leadership_config,
        leasehold_store::open_broker_store(&broker_database(&config)?, config.durability)?,
    );
    let serving = Arc::new(RwLock::new(leadership::standby_router(leadership.clone())));
    let server = leasehold_service::ServerHandle::spawn_with_tls(
        listener,
        switching_router(serving.clone()),
        leasehold_service::ServeLimits::default(),
        config.tls.clone(),
    );
    leadership.wait_until_active(on_standby).await;
    leadership.spawn_renewal();
    let (app, bootstrap_admin_token) = start_active(config, leadership.clone())?;
    *serving.write().unwrap_or_else(|p| p.into_inner()) = http::router(app.clone());
    leadership.mark_serving();
    let stopper = server.stopper();
    let watched = leadership.clone();
    tokio::spawn(async move {
        watched.lost().await;
        stopper.stop();
    });
    Ok(RunningBroker {
        local_addr,
        bootstrap_admin_token,
        app,
        server,
        leadership,
    })
}

/// A router that hands every request to the router in `serving` now: the
/// standby's until this broker is active, then the full one.
fn switching_router(serving: Arc<RwLock<axum::Router>>) -> axum::Router {
    axum::Router::new().fallback_service(tower::service_fn(
        move |request: axum::extract::Request| {
            let router = serving.read().unwrap_or_else(|p| p.into_inner()).clone();
            async move { tower::ServiceExt::oneshot(router, request).await }
        },
    ))
}

/// Once active: opens the store, loads the state and starts the writer,
/// the outbox and the planner.
fn start_active(
    config: BrokerConfig,
    leadership: Arc<leadership::Leadership>,
) -> Result<(Arc<AppState>, Option<String>), BrokerError> {
    let OpenedStore {
        mut db,
        reader,
        table,
        keys,
        bootstrap_admin_token,
    } = open_store(&config)?;
    let state = Arc::new(RwLock::new(table));
    if let Some(layer) = &config.store_layer {
        db = layer(db);
    }
    let signer = Arc::new(outbox::NoticeSigner {
        key: keys.current().clone(),
        key_id: keys.current_id().to_string(),
    });
    let metrics = Arc::new(metrics::BrokerMetrics::new());
    let writer = start_writer_and_outbox(
        db,
        state.clone(),
        signer.clone(),
        &config,
        metrics.clone(),
        leadership.clone(),
    )?;
    let images = match &config.image_store_url {
        Some(url) => Some(images::ImageResolver::new(url, &config.client_trust)?),
        None => None,
    };
    let app = Arc::new(AppState {
        images,
        state,
        writer,
        reader: Mutex::new(reader),
        signing_key: keys.current().clone(),
        signing_key_id: keys.current_id().to_string(),
        notice_signer: signer,
        published_keys: keys.published().to_vec(),
        config,
        metrics,
        leadership,
    });
    reservations::spawn_planner(app.clone());
    Ok((app, bootstrap_admin_token))
}

/// Starts the writer over `db`, and the deliverer of release notices with
/// what an earlier run left in the outbox.
fn start_writer_and_outbox(
    mut db: Box<dyn BrokerStore>,
    state: Arc<RwLock<BrokerState>>,
    signer: Arc<outbox::NoticeSigner>,
    config: &BrokerConfig,
    metrics: Arc<metrics::BrokerMetrics>,
    leadership: Arc<leadership::Leadership>,
) -> Result<Writer, BrokerError> {
    // One connection pool for every call to agents: no redirects, bounded
    // time and answer size, since a lender chooses the URL.
    let notifier = leasehold_api::Client::for_calling_agents(&config.client_trust)
        .map_err(|e| BrokerError::Internal(e.to_string()))?;
    // Notices a crash or a stop left undelivered go out again.
    db.prune_expired_notices(config.clock.now_ms())?;
    let pending_notices = db.pending_outbox()?;
    let (outbox_sender, outbox_receiver) = outbox::channel();
    let on_effect = effect_handler(notifier.clone(), outbox_sender);
    let (writer, _thread) = Writer::start(
        db,
        state.clone(),
        writer::WriterParts {
            clock: config.clock.clone(),
            signer,
            runtime: tokio::runtime::Handle::current(),
            on_effect,
            metrics,
            leadership,
        },
    );
    outbox::spawn_deliverer(
        outbox::Deliverer {
            notifier: notifier.clone(),
            state: state.clone(),
            writer: writer.clone(),
            clock: config.clock.clone(),
        },
        outbox_receiver,
        pending_notices,
    );
    Ok(writer)
}

/// What the writer does with the effects of a committed batch: lease-started
/// notices are sent best-effort, release notices go to the outbox's
/// deliverer (their rows are already durable).
fn effect_handler(
    notifier: leasehold_api::Client,
    outbox: outbox::OutboxSender,
) -> Arc<dyn Fn(Effect) + Send + Sync> {
    Arc::new(move |effect| match effect {
        Effect::NotifyAgent {
            agent_url,
            lease,
            signer,
        } => {
            let client = notifier.with_base_url(&agent_url);
            tokio::spawn(async move {
                let notice = signer.sign(&lease, leasehold_core::key::NoticeKind::LeaseStarted);
                deliver_notice(client, notice, lease.lease_id).await
            });
        }
        Effect::DeliverReleaseNotice(pending) => {
            // Only fails when the deliverer is gone (shutting down); the row
            // stays in the outbox for the next start.
            let _ = outbox.send(*pending);
        }
    })
}

/// Delivers a lease-started notice, retrying a few times. One that cannot be
/// delivered is not fatal: the agent adopts a newer lease from its key, and
/// learns the current leases from the broker when it starts.
async fn deliver_notice(client: leasehold_api::Client, notice: String, lease_id: u64) {
    for attempt in 0..4u64 {
        match client.send_notice(&notice).await {
            Ok(_) => return,
            Err(error) => {
                tracing::warn!(lease_id, agent = client.base_url(), attempt, %error, "cannot deliver a lease-started notice to the agent");
                tokio::time::sleep(std::time::Duration::from_millis(200 * (1 << (attempt * 2))))
                    .await;
            }
        }
    }
}
