//! The leasehold agent (lending server 1a): the host's partition table
//! (FIG. 2), the lender's interface (add, alter, withdraw partitions and
//! register them with the broker, FIG. 6-7), the key check (S52-S54), and
//! job execution through a partition driver (FIG. 5 and 9).

pub mod direct;
mod direct_http;
pub mod driver;
pub mod error;
mod fence_flow;
mod http;
pub mod images;
mod job_run;
mod lender_check;
pub mod markets;
mod metrics;
mod notices;
mod openapi;
pub mod owner_cgroup;
pub mod owner_load;
mod reconcile;
mod refused;
mod revocations;
pub mod rights;
pub mod sampling;
#[cfg(test)]
mod tests;
mod trust;

pub use error::AgentError;
pub use revocations::DEFAULT_REVOCATION_POLL_SECS;
pub use sampling::{SamplingConfig, DEFAULT_SAMPLE_INTERVAL_SECS};

use driver::{DriverKind, PartitionDriver};
use leasehold_api::{
    AgentPartitionView, JobResult, JobState, LendingFlag, RegisterPartitionRequest,
};
use leasehold_core::fence::{FenceAction, FenceEvent};
use leasehold_core::key::{self, KeyRejection};
use leasehold_core::{FieldError, HostCapacity, PartitionRef, Terms};
use leasehold_service::SharedClock;
use leasehold_store::agent::{AgentDb, AgentPartitionRow};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub struct AgentConfig {
    pub host_id: String,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub broker_url: String,
    /// The lender's token: the agent registers with it, and the lender's
    /// interface on this agent accepts only it.
    pub lender_token: String,
    pub driver: DriverKind,
    pub capacity: HostCapacity,
    /// The URL borrowers and the broker use to reach this agent; defaults to
    /// `http://` (`https://` with TLS) + the address it listens on.
    pub advertise_url: Option<String>,
    pub clock: SharedClock,
    /// How often the agent pulls its host's revocations from the broker, in
    /// case a release notice was lost (`revocations`).
    pub revocation_poll_interval_ms: u64,
    /// Serve over TLS with this identity; `None` serves plain HTTP.
    pub tls: Option<leasehold_service::ServerTls>,
    /// The certificates accepted from the broker on https.
    pub client_trust: leasehold_api::ServerTrust,
    /// The host's samples to the broker and the owner's load (`sampling`).
    pub sampling: SamplingConfig,
    /// With `--group`: this host's usage rights are managed in a share
    /// group (seed 004); `None` leaves rights out.
    pub rights: Option<rights::RightsConfig>,
    /// Serve `/metrics` without a token (`--metrics-public`); otherwise
    /// only the host's lender may read it.
    pub metrics_public: bool,
    /// Every broker this host lends through (`--broker URL[=SHARE]`), the
    /// first being `broker_url` with `lender_token`; empty means that one
    /// broker alone, managing the fixed partitions.
    pub markets: Vec<markets::MarketConfig>,
    /// Lend without any broker (`--direct`, the end of seed 000): the
    /// owner grants borrowers and the agent signs their keys with the
    /// owner's own key; `markets` and `broker_url` are not used.
    pub direct: bool,
    /// Whether a job's key is confirmed with its managing broker first
    /// (FIG. 15), and what happens when the broker cannot be reached.
    pub key_confirmation: markets::KeyConfirmation,
}

impl AgentConfig {
    /// The markets as configured, the first always `broker_url`'s.
    pub fn market_configs(&self) -> Vec<markets::MarketConfig> {
        if self.markets.is_empty() {
            return vec![markets::MarketConfig {
                url: self.broker_url.clone(),
                token: self.lender_token.clone(),
                share: None,
            }];
        }
        self.markets.clone()
    }
}

/// The least time between two fetches of the broker's keys prompted by a
/// key the agent cannot verify.
pub(crate) const KEY_REFRESH_INTERVAL_MS: u64 = 10_000;

/// A job that is running, and the switch that stops it.
struct RunningJob {
    index: u32,
    lease_id: u64,
    stop: tokio::sync::watch::Sender<bool>,
}

pub(crate) struct Agent {
    pub config: AgentConfig,
    pub db: Mutex<AgentDb>,
    pub driver: Box<dyn PartitionDriver>,
    /// The first market's broker: it answers who the lender is, takes the
    /// samples and keeps the share group.
    pub broker: leasehold_api::Client,
    /// Every broker this host lends through, with the keys of each that
    /// lease keys and notices of its partitions may be signed with.
    markets: Vec<markets::Market>,
    /// With `--direct`: the owner's key, which signs direct leases' keys.
    owner_key: Option<ed25519_dalek::SigningKey>,
    /// Direct grants and leases change one at a time.
    direct_lock: tokio::sync::Mutex<()>,
    /// Where borrowers reach this agent (its jobs' address in a lease).
    advertise_url: String,
    /// One lock per partition: jobs on one lease run one after another, and
    /// a release waits for the running job before it wipes the partition.
    partition_locks: Mutex<HashMap<u32, Arc<tokio::sync::Mutex<()>>>>,
    /// Jobs running now, by job id.
    running_jobs: Mutex<HashMap<u64, RunningJob>>,
    /// Refused keys, logged with their reason at a bounded rate.
    refused_keys: refused::RefusedKeyLog,
    /// The broker's answers about tokens offered to the lender interface.
    lender_check: lender_check::LenderCheck,
    /// The broker's answers about tokens offered as an admin's (rights).
    admin_check: lender_check::LenderCheck,
    /// The broker's answers about tokens offered by the managers of the
    /// share group's other hosts (their host credentials).
    peer_check: lender_check::LenderCheck,
    /// The owner's load and the last guarantee the broker answered.
    sampler: sampling::Sampler,
    pub rights: Option<rights::RightsManager>,
    /// This agent's own metrics registry (`/metrics`).
    metrics: metrics::AgentMetrics,
}

/// An agent that is serving.
pub struct RunningAgent {
    pub local_addr: SocketAddr,
    pub driver_name: &'static str,
    /// What the start-up reconciliation did, for the operator.
    pub reconciled: Vec<String>,
    /// `https` when serving TLS, else `http`.
    scheme: &'static str,
    server: leasehold_service::ServerHandle,
    revocation_pull: tokio::task::AbortHandle,
    sample_loop: tokio::task::AbortHandle,
    rights_tick: Option<tokio::task::AbortHandle>,
}

impl RunningAgent {
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.local_addr)
    }

    pub async fn shutdown(self) {
        stop_loops(&self.revocation_pull, &self.sample_loop, &self.rights_tick);
        self.server.shutdown().await
    }

    pub async fn wait(self) -> std::io::Result<()> {
        let served = self.server.wait().await;
        stop_loops(&self.revocation_pull, &self.sample_loop, &self.rights_tick);
        served
    }
}

fn stop_loops(
    revocation_pull: &tokio::task::AbortHandle,
    sample_loop: &tokio::task::AbortHandle,
    rights_tick: &Option<tokio::task::AbortHandle>,
) {
    revocation_pull.abort();
    sample_loop.abort();
    if let Some(tick) = rights_tick {
        tick.abort();
    }
}

/// A name for this agent's containers and cgroups that no other agent on the
/// machine uses: the host id and a hash of the data directory.
pub fn instance_name(host_id: &str, data_dir: &std::path::Path) -> String {
    let path = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    // FNV-1a: tiny, stable across releases, enough to tell directories apart.
    let hash = path
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ *b as u64).wrapping_mul(0x100000001b3)
        });
    format!("{host_id}-{:08x}", hash as u32)
}

/// Constant-time comparison, so a token cannot be guessed byte by byte.
pub(crate) fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn row_view(
    host_id: &str,
    row: &AgentPartitionRow,
    managed_by: Option<String>,
) -> AgentPartitionView {
    AgentPartitionView {
        partition: PartitionRef::new(host_id, row.index),
        terms: row.terms.clone(),
        managed_by,
        lending_flag: if row.registered {
            LendingFlag::Registered
        } else {
            LendingFlag::Unregistered
        },
        epoch: row.fence.epoch,
        lease_id: row.fence.lease_id(),
        released_through_epoch: row.fence.released_through_epoch,
        built: row.fence.built(),
    }
}

/// Trust on first use: each broker's keys are pinned in the partition
/// table, so a different broker (or a swapped key) cannot mint keys for us;
/// a new key is trusted only when a pinned one endorsed it.
async fn trust_broker_keys(
    db: &AgentDb,
    broker: &leasehold_api::Client,
    url: &str,
    meta_key: &str,
    notes: &mut Vec<String>,
) -> Result<key::TrustedKeys, AgentError> {
    let pinned = trust::load_pinned_as(db, meta_key)?;
    match broker.broker_info().await {
        Ok(info) => {
            let trusted = trust::extend_trust(&pinned, &info).map_err(|problem| {
                AgentError::Internal(format!(
                    "refusing to trust the broker at {url}: {problem} (delete the agent's data directory to start over)"
                ))
            })?;
            trust::store_pinned_as(db, meta_key, &trusted)?;
            Ok(trusted)
        }
        // Keys verify offline, so pinned keys let the agent serve jobs
        // while the broker is away.
        Err(error) if !pinned.is_empty() => {
            notes.push(format!(
                "broker {url} unreachable at start ({error}); serving with the pinned keys"
            ));
            Ok(pinned)
        }
        Err(error) => Err(AgentError::BrokerUnreachable(error)),
    }
}

/// The markets running: a client per broker (the first is `home`), the
/// carving range of each share, the keys each is trusted with; refused
/// when the shares and the fixed partitions would overlap.
async fn open_markets(
    config: &AgentConfig,
    db: &AgentDb,
    home: &leasehold_api::Client,
    notes: &mut Vec<String>,
) -> Result<Vec<markets::Market>, AgentError> {
    let configs = config.market_configs();
    let ranges = markets::carving_ranges(db, &configs)?;
    let rows = db.partitions()?;
    let fixed_rows: Vec<&AgentPartitionRow> = rows
        .iter()
        .filter(|row| {
            !ranges
                .iter()
                .flatten()
                .any(|(f, l)| (*f..=*l).contains(&row.index))
        })
        .collect();
    markets::check_disjoint(&config.capacity, &configs, &fixed_rows)?;
    let mut opened = Vec::new();
    for (position, (market, range)) in configs.into_iter().zip(ranges).enumerate() {
        let client = if position == 0 {
            home.clone()
        } else {
            leasehold_api::Client::with_trust(
                &market.url,
                Some(market.token.clone()),
                &config.client_trust,
            )
            .map_err(|e| AgentError::Internal(e.to_string()))?
        };
        let meta_key = trust::meta_key_of_market(position, &market.url);
        let keys = trust_broker_keys(db, &client, &market.url, &meta_key, notes).await?;
        opened.push(markets::Market {
            url: market.url,
            client,
            share: market.share,
            range,
            keys: std::sync::RwLock::new(keys),
            last_key_refresh_ms: Mutex::new(0),
            trust_meta_key: meta_key,
            owner: false,
        });
    }
    Ok(opened)
}

/// Rows written before terms carried an isolation, or by an agent that ran
/// another driver, get this driver's: the terms must say what jobs really get.
fn restate_isolation(
    db: &AgentDb,
    isolation: leasehold_core::Isolation,
) -> Result<Vec<String>, AgentError> {
    let mut notes = Vec::new();
    for mut row in db.partitions()? {
        if row.terms.isolation != Some(isolation) {
            row.terms.isolation = Some(isolation);
            // Registered again at the broker by the reconciliation below.
            row.registered = false;
            db.update_terms_and_registration(&row)?;
            notes.push(format!(
                "partition {}: isolation is now '{}' (this agent's driver)",
                row.index,
                isolation.as_str()
            ));
        }
    }
    Ok(notes)
}

/// Opens the partition table in the private data directory; jobs that
/// were running when the agent stopped are marked lost.
fn open_partition_table(
    config: &AgentConfig,
    notes: &mut Vec<String>,
) -> Result<AgentDb, AgentError> {
    leasehold_store::private_fs::ensure_private_dir(&config.data_dir)
        .map_err(|e| AgentError::Internal(e.to_string()))?;
    let db_path = config.data_dir.join("agent.db");
    leasehold_store::private_fs::check_private_file(&db_path)
        .map_err(|e| AgentError::Internal(e.to_string()))?;
    let db = AgentDb::open(&db_path)?;
    let lost = db.mark_running_jobs_lost(config.clock.now_ms())?;
    if lost > 0 {
        notes.push(format!(
            "{lost} job(s) were running when the agent stopped; marked lost"
        ));
    }
    Ok(db)
}

/// Each partition keeps the cores it had before the restart.
fn restore_cores(db: &AgentDb, driver: &dyn PartitionDriver) -> Result<(), AgentError> {
    let kept: Vec<(u32, Vec<u32>)> = db
        .partitions()?
        .into_iter()
        .filter(|row| !row.cores.is_empty())
        .map(|row| (row.index, row.cores))
        .collect();
    driver.restore_cores(&kept);
    Ok(())
}

/// Modules on and off are the driver's (cpusets with `oci`): the rights
/// manager tells it each partition's active count.
fn switch_modules_with_the_driver(agent: &Arc<Agent>) {
    let Some(rights) = &agent.rights else {
        return;
    };
    let weak = Arc::downgrade(agent);
    rights.set_actuator(Box::new(move |index, active| {
        let Some(agent) = weak.upgrade() else { return };
        if index == rights::OWNER_SHARE {
            agent.set_owner_share_modules(active);
            return;
        }
        if let Err(error) = agent.driver.set_active_modules(index, active) {
            tracing::warn!(%error, index, active, "could not switch the partition's modules");
        }
    }));
}

/// Joins the share group when the agent manages its host's rights.
async fn join_share_group(
    config: &AgentConfig,
    manager_url: &str,
    broker: &leasehold_api::Client,
) -> Result<Option<rights::RightsManager>, AgentError> {
    let Some(rights) = config.rights.clone() else {
        return Ok(None);
    };
    let peers = leasehold_api::Client::for_calling_agents(&config.client_trust)
        .map_err(|e| AgentError::Internal(e.to_string()))?;
    rights::RightsManager::join(
        rights,
        &config.host_id,
        &config.capacity,
        manager_url,
        broker,
        config.clock.clone(),
        peers,
    )
    .await
    .map(Some)
}

/// Starts an agent: opens its partition table, pins the broker's public key,
/// registers the host and reconciles its partitions with the broker, then
/// serves. Stops on Ctrl-C / SIGTERM or [`RunningAgent::shutdown`].
pub async fn start(config: AgentConfig) -> Result<RunningAgent, AgentError> {
    leasehold_core::ids::validate_host_id("host_id", &config.host_id)?;
    // The owner's trace is read first: a bad one stops the agent before it
    // touches anything. Its offsets count from now.
    let sampler = sampling::Sampler::new(&config, config.clock.now_ms())?;
    let broker = leasehold_api::Client::with_trust(
        &config.broker_url,
        Some(config.lender_token.clone()),
        &config.client_trust,
    )
    .map_err(|e| AgentError::Internal(e.to_string()))?;
    if let Some(rights) = &config.rights {
        // Before anything of the host is touched: a stand-by (or a second
        // agent for the host) waits here while another manager holds it.
        rights::RightsManager::wait_for_host(rights, &config.host_id, &broker, &config.clock)
            .await?;
    }
    start_with_broker(config, sampler, broker).await
}

/// The brokers this agent lends through, or with `--direct` the owner's
/// key as the one market (and the key, to sign with).
async fn markets_or_owner(
    config: &AgentConfig,
    db: &AgentDb,
    broker: &leasehold_api::Client,
    notes: &mut Vec<String>,
) -> Result<(Vec<markets::Market>, Option<ed25519_dalek::SigningKey>), AgentError> {
    if !config.direct {
        return Ok((open_markets(config, db, broker, notes).await?, None));
    }
    let owner = direct::load_or_create_owner_key(&config.data_dir)?;
    Ok((vec![markets::Market::of_owner(&owner, broker)], Some(owner)))
}

/// Registers and reconciles with every broker; an unreachable one is a
/// note (the next start tries again), any other failure stops the start.
async fn register_everywhere(agent: &Agent, advertise: &str) -> Result<Vec<String>, AgentError> {
    if agent.config.direct {
        return Ok(vec![
            "lending directly: no broker; keys signed with the owner's key".into(),
        ]);
    }
    match agent.register_and_reconcile(advertise).await {
        Ok(notes) => Ok(notes),
        Err(AgentError::BrokerUnreachable(error)) => {
            Ok(vec![format!("could not register with the broker: {error}")])
        }
        Err(other) => Err(other),
    }
}

/// The rest of [`start`], once the agent may manage its host.
async fn start_with_broker(
    config: AgentConfig,
    sampler: sampling::Sampler,
    broker: leasehold_api::Client,
) -> Result<RunningAgent, AgentError> {
    let mut reconciled = Vec::new();
    let db = open_partition_table(&config, &mut reconciled)?;
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let (markets, owner_key) = markets_or_owner(&config, &db, &broker, &mut reconciled).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| AgentError::Internal(format!("cannot listen on {}: {e}", config.listen)))?;
    let local_addr = listener
        .local_addr()
        .map_err(|e| AgentError::Internal(e.to_string()))?;
    let driver = driver::make_driver(&config.driver).map_err(AgentError::Internal)?;
    let driver_name = driver.name();
    // Kills what a crash left of earlier jobs before anything is served.
    reconciled.extend(driver.reconcile());
    restore_cores(&db, driver.as_ref())?;
    reconciled.extend(restate_isolation(&db, config.driver.isolation())?);
    let advertise =
        (config.advertise_url.clone()).unwrap_or_else(|| format!("{scheme}://{local_addr}"));
    let rights = join_share_group(&config, &advertise, &broker).await?;
    let agent = Arc::new(Agent {
        config: config.clone(),
        db: Mutex::new(db),
        driver,
        broker,
        markets,
        owner_key,
        direct_lock: tokio::sync::Mutex::new(()),
        advertise_url: advertise.clone(),
        partition_locks: Mutex::new(HashMap::new()),
        running_jobs: Mutex::new(HashMap::new()),
        refused_keys: refused::RefusedKeyLog::default(),
        lender_check: lender_check::LenderCheck::default(),
        admin_check: lender_check::LenderCheck::default(),
        peer_check: lender_check::LenderCheck::default(),
        sampler,
        rights,
        metrics: metrics::AgentMetrics::new(),
    });
    switch_modules_with_the_driver(&agent);
    reconciled.extend(register_everywhere(&agent, &advertise).await?);
    let server = leasehold_service::ServerHandle::spawn_with_tls(
        listener,
        http::router(agent.clone()),
        leasehold_service::ServeLimits::default(),
        config.tls.clone(),
    );
    let revocation_pull = revocations::spawn_pull_loop(agent.clone());
    // A direct agent has no broker to tell its owner's use.
    let sample_loop = match config.direct {
        true => tokio::spawn(async {}).abort_handle(),
        false => sampling::spawn_sample_loop(agent.clone()),
    };
    let rights_tick = rights::http::spawn_tick_loop(agent.clone());
    Ok(RunningAgent {
        local_addr,
        driver_name,
        reconciled,
        scheme,
        server,
        revocation_pull,
        sample_loop,
        rights_tick,
    })
}

impl Agent {
    pub(crate) fn db(&self) -> std::sync::MutexGuard<'_, AgentDb> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Verifies a lease key with the keys of the market that manages its
    /// partition; a key signed by a key the agent does not know yet (a
    /// broker rotated) makes it fetch the brokers' keys, at most once per
    /// [`KEY_REFRESH_INTERVAL_MS`] each, and try again.
    pub(crate) async fn verify_lease_key(
        &self,
        token: &str,
    ) -> Result<key::LeaseKeyClaims, KeyRejection> {
        let first = self.verify_lease_key_offline(token);
        if first != Err(KeyRejection::BadSignature) {
            return first;
        }
        self.refresh_market_keys().await;
        self.verify_lease_key_offline(token)
    }

    fn partition_lock(&self, index: u32) -> Arc<tokio::sync::Mutex<()>> {
        self.partition_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(index)
            .or_default()
            .clone()
    }

    fn host_id(&self) -> &str {
        &self.config.host_id
    }

    fn load(&self, index: u32) -> Result<AgentPartitionRow, AgentError> {
        self.db()
            .partition(index)?
            .ok_or_else(|| self.no_partition(index))
    }

    /// Writes the cores the driver gave a partition, when they changed, so
    /// that a restart gives the partition the same ones.
    fn persist_cores(&self, index: u32) -> Result<(), AgentError> {
        let Some(cores) = self.driver.cores_of(index) else {
            return Ok(());
        };
        let db = self.db();
        if db.partition(index)?.is_some_and(|row| row.cores != cores) {
            db.update_cores(index, &cores)?;
        }
        Ok(())
    }

    /// Where borrowers reach this agent.
    pub(crate) fn advertised_url(&self) -> String {
        self.advertise_url.clone()
    }

    pub(crate) fn view(&self, row: &AgentPartitionRow) -> AgentPartitionView {
        let managed_by = (self.market_of_index(row.index)).map(|m| self.markets[m].url.clone());
        row_view(self.host_id(), row, managed_by)
    }

    /// The markets as `GET /v1/agent` shows them.
    pub(crate) fn market_views(&self) -> Vec<leasehold_api::AgentMarketView> {
        (self.markets.iter())
            .map(|market| leasehold_api::AgentMarketView {
                broker_url: market.url.clone(),
                share: market.share.as_ref().map(|s| leasehold_api::ShareSize {
                    vcpus: s.vcpus,
                    memory_mib: s.memory_mib,
                    disk_gib: s.disk_gib,
                    price_per_vcpu_hour_micros: s.price_per_vcpu_hour_micros,
                    price_per_memory_gib_hour_micros: s.price_per_memory_gib_hour_micros,
                    price_per_disk_gib_hour_micros: s.price_per_disk_gib_hour_micros,
                }),
                first_index: market.range.map(|(first, _)| first),
                last_index: market.range.map(|(_, last)| last),
            })
            .collect()
    }

    /// The broker's record of a partition's terms is the one truth (it
    /// bills them): a key carries the terms the broker sold, and the agent
    /// builds exactly those, once it has checked they fit this host beside
    /// its other partitions. A partition built for this lease keeps its
    /// terms: the broker cannot alter a leased partition.
    fn adopt_sold_terms(
        &self,
        row: &mut AgentPartitionRow,
        sold: &Terms,
    ) -> Result<(), AgentError> {
        if &row.terms == sold {
            return Ok(());
        }
        if row.fence.built() {
            return Err(AgentError::Invalid(FieldError::new(
                "lease_key.terms",
                format!(
                    "partition {} was built for this lease with other terms than the key carries",
                    row.index
                ),
            )));
        }
        let given = self.config.driver.isolation();
        if sold
            .isolation
            .is_some_and(|sold_isolation| sold_isolation != given)
        {
            return Err(AgentError::Invalid(FieldError::new(
                "lease_key.terms.isolation",
                format!(
                    "the broker sold isolation '{}', but this host's driver gives '{}'",
                    sold.isolation.map(|i| i.as_str()).unwrap_or("none"),
                    given.as_str()
                ),
            )));
        }
        self.validate_terms(sold, Some(row.index))
            .map_err(|error| {
                AgentError::Invalid(FieldError::new(
                    "lease_key.terms",
                    format!("the terms the broker sold do not fit this host: {error}"),
                ))
            })?;
        tracing::info!(
            partition = row.index,
            "building the terms the broker sold, which differ from the local copy"
        );
        row.terms = sold.clone();
        self.db().update_terms_and_registration(row)?;
        Ok(())
    }

    /// Writes the driver's isolation into a lender's terms. A lender who
    /// states a different one is refused: only the driver knows what it gives.
    fn stamp_isolation(&self, mut terms: Terms) -> Result<Terms, AgentError> {
        let given = self.config.driver.isolation();
        if let Some(claimed) = terms.isolation {
            if claimed != given {
                return Err(AgentError::Invalid(FieldError::new(
                    "terms.isolation",
                    format!(
                        "this host's '{}' driver gives isolation '{}', not '{}'; leave the field out and the agent fills it in",
                        self.driver.name(),
                        given.as_str(),
                        claimed.as_str()
                    ),
                )));
            }
        }
        terms.isolation = Some(given);
        Ok(terms)
    }

    async fn register_row(&self, row: &mut AgentPartitionRow) -> Result<(), AgentError> {
        let request = RegisterPartitionRequest {
            terms: row.terms.clone(),
        };
        self.fixed_broker()?
            .register_partition(self.host_id(), row.index, &request)
            .await?;
        row.registered = true;
        self.db().update_terms_and_registration(row)?;
        Ok(())
    }

    fn validate_terms(&self, terms: &Terms, except_index: Option<u32>) -> Result<(), AgentError> {
        let images = self.driver.images();
        terms
            .validate(Some(&images))
            .map_err(|e| FieldError::new(format!("terms.{}", e.field), e.problem))?;
        if let Some(index) = except_index.filter(|index| self.is_carved(*index)) {
            // A carved partition lives inside its share, not beside it.
            return self.check_fits_share(index, terms);
        }
        let rows = self.db().partitions()?;
        // The shares other brokers carve from are taken, all of them.
        let shares: Vec<Terms> = (self.markets.iter())
            .filter_map(|m| m.share.as_ref().map(|s| s.as_terms()))
            .collect();
        let others = rows
            .iter()
            .filter(|r| Some(r.index) != except_index && !self.is_carved(r.index))
            .map(|r| &r.terms)
            .chain(shares.iter());
        self.config
            .capacity
            .admits(others, terms)
            .map_err(|e| FieldError::new(format!("terms.{}", e.field), e.problem))?;
        if let Some(rights) = &self.rights {
            // Seed 004: a partition is offered with at most as many vCPUs
            // as its host can activate.
            let held = rights.host_rights_now();
            if terms.vcpus > held {
                return Err(AgentError::Invalid(FieldError::new(
                    "terms.vcpus",
                    format!("{} is more than the {held} cores this host holds usage rights for; get rights first (leasehold rights request or grant)", terms.vcpus),
                )));
            }
        }
        Ok(())
    }

    /// FIG. 6: write the partition table (S12-S13), register with the broker
    /// (S14-S17), set the lending flag (S18-S19). If the broker refuses,
    /// the row is removed again: nothing half-written stays behind. If the
    /// broker cannot be reached, the row stays unregistered until the next
    /// start registers it.
    pub(crate) async fn add_partition(
        &self,
        terms: Terms,
    ) -> Result<AgentPartitionRow, AgentError> {
        let terms = images::pin_to_offered(terms, &self.driver.images());
        let terms = self.stamp_isolation(terms)?;
        self.validate_terms(&terms, None)?;
        if self.owner_key.is_some() {
            // Direct lending: the partition table is the only record.
            let mut row = self.db().insert_partition(&terms)?;
            row.registered = true;
            self.db().update_terms_and_registration(&row)?;
            return Ok(row);
        }
        let broker = self.fixed_broker()?;
        let mut row = self.db().insert_partition(&terms)?;
        let request = RegisterPartitionRequest { terms };
        if let Err(error) = broker
            .register_partition(self.host_id(), row.index, &request)
            .await
        {
            let error = AgentError::from(error);
            if matches!(error, AgentError::BrokerRefused(_)) {
                self.db().delete_partition(row.index)?;
            }
            // Unreachable (or no answer): the broker may have registered it
            // or not. The row stays, unregistered, and the agent registers it
            // at its next start; nothing is lost either way.
            return Err(error);
        }
        row.registered = true;
        self.db().update_terms_and_registration(&row)?;
        if let Some(rights) = &self.rights {
            // With no rights yet; a failure here is mended at the next
            // tick, which adds the rows of partitions the table lacks.
            if let Err(error) = rights.partition_added(row.index).await {
                tracing::warn!(%error, index = row.index, "the new partition is not in the share group's table yet");
            }
        }
        Ok(row)
    }

    /// FIG. 7: refused here while leased (the lock), then at the broker
    /// (S22-S26), and only then written here (S30-S31).
    pub(crate) async fn alter_partition(
        &self,
        index: u32,
        terms: Terms,
    ) -> Result<AgentPartitionRow, AgentError> {
        // Under the partition's lock, so a lease notice cannot land between
        // the broker's answer and the write below and be overwritten.
        let lock = self.partition_lock(index);
        let _guard = lock.lock().await;
        self.drive_fence(index, FenceEvent::Altered)?;
        let mut row = self.load(index)?;
        let terms = images::pin_to_offered(terms, &self.driver.images());
        let terms = self.stamp_isolation(terms)?;
        self.validate_terms(&terms, Some(index))?;
        let request = RegisterPartitionRequest {
            terms: terms.clone(),
        };
        if self.owner_key.is_none() {
            self.fixed_broker()?
                .register_partition(self.host_id(), index, &request)
                .await?;
        }
        row.terms = terms;
        row.registered = true;
        self.db().update_terms_and_registration(&row)?;
        Ok(row)
    }

    pub(crate) async fn withdraw_partition(
        &self,
        index: u32,
    ) -> Result<AgentPartitionRow, AgentError> {
        let lock = self.partition_lock(index);
        let _guard = lock.lock().await;
        let row = self.load(index)?;
        // Decided only: a withdrawn partition's row is deleted, not fenced.
        let (_, actions) = leasehold_core::fence::on_event(
            row.fence,
            FenceEvent::Withdrawn,
            self.config.clock.now_ms(),
        )
        .map_err(|refusal| self.fence_refusal(index, refusal))?;
        if self.owner_key.is_none() {
            match (self.fixed_broker()?)
                .withdraw_partition(self.host_id(), index)
                .await
            {
                Ok(_) => {}
                Err(error) if error.status() == Some(404) => {}
                Err(error) => return Err(error.into()),
            }
        }
        if actions.contains(&FenceAction::Remove) {
            self.driver.remove(index)?;
            self.db().delete_partition(index)?;
        }
        if let Some(rights) = &self.rights {
            if let Err(error) = rights.partition_withdrawn(index).await {
                tracing::warn!(%error, index, "the withdrawn partition's rights stay in the table until the next tick");
            }
        }
        Ok(row)
    }

    /// Whether `token` may use the lender interface: the agent's own
    /// credential, or a token the broker says is this host's lender's.
    pub(crate) async fn is_lender(&self, token: &str) -> bool {
        if same_secret(token, &self.config.lender_token) {
            return true;
        }
        if self.owner_key.is_some() {
            return false; // direct lending: the owner's token is the only one
        }
        let now_ms = self.config.clock.now_ms();
        self.lender_check
            .answer(token, now_ms, || {
                self.broker_says_lender_of_this_host(token)
            })
            .await
    }

    /// Whether `token` is an admin's, as the broker says (remembered
    /// briefly; lookups rate-limited like the lender check's).
    pub(crate) async fn is_admin(&self, token: &str) -> bool {
        if self.owner_key.is_some() {
            return false; // direct lending: no broker to have admins
        }
        let now_ms = self.config.clock.now_ms();
        let ask = || async {
            match self
                .broker
                .with_token(Some(token.to_string()))
                .whoami()
                .await
            {
                Ok(who) => Some(who.role == leasehold_api::Role::Admin),
                Err(error) if error.status() == Some(401) => Some(false),
                Err(_) => None,
            }
        };
        self.admin_check.answer(token, now_ms, ask).await
    }

    /// Whether `token` is the credential of another host of this host's
    /// share group, of the same lender: the group's managers forward
    /// requests and transfers to the primary with their own credential.
    pub(crate) async fn is_group_peer(&self, token: &str) -> bool {
        let Some(rights) = &self.rights else {
            return false;
        };
        let now_ms = self.config.clock.now_ms();
        let ask = || async {
            let own = self.broker.whoami().await.ok();
            let theirs = self
                .broker
                .with_token(Some(token.to_string()))
                .whoami()
                .await;
            let members = rights.copy().map(|(g, _)| g.hosts).unwrap_or_default();
            match (own, theirs) {
                (Some(own), Ok(who)) => Some(
                    who.role == leasehold_api::Role::Lender
                        && who.name == own.name
                        && who.host_scope.is_some_and(|h| members.contains_key(&h)),
                ),
                (_, Err(error)) if error.status() == Some(401) => Some(false),
                _ => None,
            }
        };
        self.peer_check.answer(token, now_ms, ask).await
    }

    async fn broker_says_lender_of_this_host(&self, token: &str) -> Option<bool> {
        let own = self.broker.whoami().await.ok()?;
        let theirs = leasehold_api::Client::new(&self.config.broker_url, Some(token.to_string()))
            .whoami()
            .await;
        match theirs {
            Ok(who) => Some(
                who.role == leasehold_api::Role::Lender
                    && who.name == own.name
                    && who
                        .host_scope
                        .as_deref()
                        .is_none_or(|h| h == self.host_id()),
            ),
            Err(error) if error.status() == Some(401) => Some(false),
            Err(_) => None,
        }
    }

    pub(crate) fn note_refused_key(&self, partition: Option<u32>, reason: &KeyRejection) {
        self.metrics.count_key_refusal(reason);
        self.refused_keys
            .note(partition, reason, self.config.clock.now_ms());
    }

    /// Stops a running job, for the lender or the holder of a key of its lease.
    pub(crate) fn cancel_job(&self, job_id: u64, bearer: &str) -> Result<bool, AgentError> {
        // The same check as reading the job: its lender, or its lease's key.
        self.job(job_id, bearer)?;
        let running = self.running_jobs.lock().unwrap_or_else(|p| p.into_inner());
        Ok(match running.get(&job_id) {
            Some(job) => {
                let _ = job.stop.send(true);
                true
            }
            None => false,
        })
    }

    /// Stops every running job on a partition (a newer lease holds it).
    fn cancel_jobs_of_partition(&self, index: u32) {
        let running = self.running_jobs.lock().unwrap_or_else(|p| p.into_inner());
        for job in running.values() {
            if job.index == index {
                let _ = job.stop.send(true);
            }
        }
    }

    /// Stops every running job of a lease (its lease ended).
    fn cancel_jobs_of_lease(&self, lease_id: u64) {
        let running = self.running_jobs.lock().unwrap_or_else(|p| p.into_inner());
        for job in running.values() {
            if job.lease_id == lease_id {
                let _ = job.stop.send(true);
            }
        }
    }

    /// A job's record, for the lender or the holder of a key of its lease.
    pub(crate) fn job(&self, job_id: u64, bearer: &str) -> Result<JobResult, AgentError> {
        let job = self.db().job(job_id)?.ok_or_else(|| {
            AgentError::NotFound(format!("no job {job_id} on host {}", self.host_id()))
        })?;
        if !same_secret(bearer, &self.config.lender_token) {
            let claims = self
                .verify_lease_key_offline(bearer)
                .map_err(AgentError::KeyRejected)?;
            if claims.host_id != self.host_id() || claims.lease_id != job.lease_id {
                return Err(AgentError::KeyRejected(KeyRejection::WrongLease));
            }
        }
        let state: JobState = job.state;
        Ok(JobResult {
            job_id,
            lease_id: job.lease_id,
            partition: PartitionRef::new(self.host_id(), job.index),
            state,
            exit_code: job.exit_code,
            stdout: job.stdout,
            stderr: job.stderr,
            output_truncated: job.output_truncated,
            wall_ms: job
                .finished_at_ms
                .unwrap_or(job.started_at_ms)
                .saturating_sub(job.started_at_ms),
            cpu_ms: None,
            peak_memory_bytes: None,
            oom_killed: false,
        })
    }
}
