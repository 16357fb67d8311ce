//! The agent as its host's usage-rights manager (seed 004, FIG. 1's share
//! group manager). With `--group NAME` it joins the share group whose
//! table lives in a store the group's managers share: by default the
//! broker's (`/v1/groups/NAME`, kept by compare-and-swap and guarded by
//! core's `check_group_write`), or with `--group-store` an SQLite file (the
//! hosts of one machine) or PostgreSQL (a group spread over machines)
//! opened directly. Every write is a compare-and-swap on the table's
//! version, decided again from a fresh read when another manager wrote
//! first, so managers never overwrite each other and no consensus is
//! written here.
//!
//! The table is the authority; each manager applies its own host's rows to
//! its partitions (modules on and off: counters with `sim`) and keeps a
//! copy, from which it serves its host when the store is unreachable
//! (never activating more than the copy holds). Transfers between hosts
//! are in `rights_flow`.

use crate::error::AgentError;
use leasehold_api::rights::{RightsSyncAnswer, ShareGroupDocument};
use leasehold_core::rights::{
    GroupMode, PartitionRights, RightsRefusal, ShareGroup, OWNER_SHARE_PARTITION,
};
use leasehold_core::HostCapacity;
use leasehold_service::SharedClock;
use leasehold_store::{open_broker_store, BrokerDatabase, BrokerStore, Durability};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The owner share's row: its cores are the host's own, not a partition's.
pub const OWNER_SHARE: u32 = OWNER_SHARE_PARTITION;

/// Tries of a compare-and-swap before giving up (each one re-reads).
const MAX_SWAP_TRIES: u32 = 32;

#[derive(Debug, Clone)]
pub struct RightsConfig {
    pub group: String,
    pub mode: GroupMode,
    /// The shared store opened directly; `None`: the broker keeps the table.
    pub store: Option<BrokerDatabase>,
    /// Usage rights this host owns when it first joins; `None`: none (its
    /// modules stay inactive until rights are granted or borrowed).
    pub owned_rights: Option<u32>,
    /// Where the manager keeps its copy of the table (0600).
    pub copy_path: PathBuf,
    /// The manager's own database of loans inside its host (FIG. 4B).
    pub loans_path: PathBuf,
    /// A back-up manager (FIG. 6): it waits until the host's manager is
    /// gone, then takes over.
    pub standby: bool,
    /// How long a host may be unreachable before its rights are seized
    /// (FIG. 8).
    pub seize_after_ms: u64,
    /// Automatic requests for busy partitions; `None`: only on demand.
    pub auto_request: Option<workload::AutoRequest>,
}

/// How long a manager's hold on its host lasts without renewal: a
/// stand-by takes over within this and one tick of the manager's death.
pub const HOST_LEASE_TTL_MS: u64 = 3_000;
/// The default grace period before a silent host's rights are seized.
pub const DEFAULT_SEIZE_AFTER_MS: u64 = 30_000;

impl RightsConfig {
    /// The holder of the host's manager lease: the active manager and its
    /// stand-by hold it under different names, so neither renews the
    /// other's hold.
    pub fn host_lease_holder(&self, host_id: &str) -> String {
        let role = if self.standby { "standby" } else { "active" };
        format!("{host_id}:{role}")
    }
}

/// The name of a host's manager lease in the group.
pub fn host_lease(host_id: &str) -> String {
    format!("host.{host_id}")
}

/// Where the group's table lives.
pub(crate) enum GroupStore {
    Direct(Arc<Mutex<Box<dyn BrokerStore>>>),
    /// The broker, with the agent's credential.
    Broker(leasehold_api::Client),
}

fn unreachable(error: impl std::fmt::Display) -> AgentError {
    AgentError::GroupUnreachable(error.to_string())
}

impl GroupStore {
    pub(crate) fn open(
        config: &RightsConfig,
        broker: &leasehold_api::Client,
    ) -> Result<Self, AgentError> {
        Ok(match &config.store {
            Some(database) => GroupStore::Direct(Arc::new(Mutex::new(open_broker_store(
                database,
                Durability::Full,
            )?))),
            None => GroupStore::Broker(broker.clone()),
        })
    }

    async fn blocking<T: Send + 'static>(
        store: &Arc<Mutex<Box<dyn BrokerStore>>>,
        work: impl FnOnce(&mut dyn BrokerStore) -> Result<T, leasehold_store::StoreError>
            + Send
            + 'static,
    ) -> Result<T, AgentError> {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            let mut store = store.lock().unwrap_or_else(|p| p.into_inner());
            work(store.as_mut())
        })
        .await
        .map_err(|e| AgentError::Internal(e.to_string()))?
        .map_err(unreachable)
    }

    pub(crate) async fn read(&self, name: &str) -> Result<Option<(ShareGroup, u64)>, AgentError> {
        match self {
            GroupStore::Direct(store) => {
                let name = name.to_string();
                Self::blocking(store, move |s| s.share_group(&name)).await
            }
            GroupStore::Broker(broker) => match broker.share_group(name).await {
                Ok(document) => Ok(document.map(|d| (d.group, d.version))),
                Err(error) if error.status().is_some() => Err(error.into()),
                Err(error) => Err(unreachable(error)),
            },
        }
    }

    /// Compare-and-swap; `as_token` writes through the broker as the
    /// caller (an admin's grant), else as this agent.
    pub(crate) async fn write(
        &self,
        before: Option<&ShareGroup>,
        group: &ShareGroup,
        expected_version: u64,
        as_token: Option<&str>,
        now_ms: u64,
    ) -> Result<Option<u64>, AgentError> {
        match self {
            GroupStore::Direct(store) => {
                // The rights that moved go to the store's ledger with the
                // table (the broker's gatekeeper does this itself).
                let movements = leasehold_core::rights::ledger::movements(before, group, now_ms);
                let group = group.clone();
                Self::blocking(store, move |s| {
                    s.put_share_group(&group, expected_version, &movements)
                })
                .await
            }
            GroupStore::Broker(broker) => {
                let broker = match as_token {
                    Some(token) => broker.with_token(Some(token.to_string())),
                    None => broker.clone(),
                };
                match broker.put_share_group(group, expected_version).await {
                    Ok(version) => Ok(version),
                    Err(error) if error.status().is_some() => Err(error.into()),
                    Err(error) => Err(unreachable(error)),
                }
            }
        }
    }

    /// Who held the group's lease `lease` last, until when.
    pub(crate) async fn holder(
        &self,
        group: &str,
        lease: &str,
    ) -> Result<Option<leasehold_api::rights::GroupLeaseHolder>, AgentError> {
        match self {
            GroupStore::Direct(store) => {
                let name = format!("group/{group}/{lease}");
                let held = Self::blocking(store, move |s| s.lease_holder(&name)).await?;
                Ok(held.map(|h| leasehold_api::rights::GroupLeaseHolder {
                    holder: h.holder,
                    epoch: h.epoch,
                    expires_at_ms: h.expires_at_ms,
                }))
            }
            GroupStore::Broker(broker) => broker
                .group_lease_holder(group, lease)
                .await
                .map_err(unreachable),
        }
    }

    /// Takes or renews the group's fenced lease `lease`.
    pub(crate) async fn acquire(
        &self,
        group: &str,
        lease: &str,
        holder: &str,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<Option<u64>, AgentError> {
        match self {
            GroupStore::Direct(store) => {
                let (name, holder) = (format!("group/{group}/{lease}"), holder.to_string());
                Self::blocking(store, move |s| {
                    s.acquire_lease(&name, &holder, ttl_ms, now_ms)
                })
                .await
            }
            GroupStore::Broker(broker) => broker
                .acquire_group_lease(group, lease, holder, ttl_ms)
                .await
                .map_err(unreachable),
        }
    }
}

/// The group with this host in it: its rows as they are if it is there
/// already (only its manager's address follows the agent, and what an
/// admin's `group add` left out is filled in), else its owner share's row.
pub fn with_host(
    group: Option<ShareGroup>,
    config: &RightsConfig,
    host_id: &str,
    capacity: &HostCapacity,
    manager_url: &str,
) -> ShareGroup {
    let mut group = group.unwrap_or_else(|| ShareGroup::new(config.group.clone(), config.mode));
    let modules = (capacity.cpu_centicores / 100) as u32;
    let owned = config.owned_rights.unwrap_or(0).min(modules);
    let host = group.hosts.entry(host_id.to_string()).or_default();
    if host.modules == 0 {
        host.modules = modules;
    }
    host.partitions
        .entry(OWNER_SHARE_PARTITION)
        .or_insert_with(|| PartitionRights {
            modules,
            permanent: owned,
            temporary: vec![],
            active: owned,
            workload_percent: 0,
        });
    host.manager_url = manager_url.to_string();
    group
}

/// What this host has switched on: the table version applied last and the
/// active modules per partition.
#[derive(Debug, Default, Clone)]
pub(crate) struct Applied {
    pub version: u64,
    pub active: BTreeMap<u32, u32>,
    /// The table with this host's loans on top that was applied.
    pub group: Option<ShareGroup>,
}

pub struct RightsManager {
    pub config: RightsConfig,
    pub(crate) store: GroupStore,
    pub(crate) host_id: String,
    pub(crate) manager_url: String,
    pub(crate) clock: SharedClock,
    /// The member's copy of the table and its version.
    copy: Mutex<Option<(ShareGroup, u64)>>,
    /// The copy on disk.
    copy_file: copy_file::CopyFile,
    applied: Mutex<Applied>,
    /// Loans inside the host: its own database and those the table does
    /// not hold yet (FIG. 4B). Locked before `applied` when both are.
    loans: Mutex<local_loans::LoanBook>,
    /// Wakes the publisher of loans.
    pub(crate) publish_wanted: tokio::sync::Notify,
    /// The epoch of this manager's leadership (0: not the primary).
    pub(crate) primary_epoch: Mutex<u64>,
    /// Calls to other managers (no redirects, bounded time and size).
    pub(crate) peers: leasehold_api::Client,
    /// One sync at a time: a flood of pokes reads the store one by one.
    pub(crate) sync_lock: tokio::sync::Mutex<()>,
    /// Switches a partition's modules on the host (the driver: cpusets
    /// with `oci`), told the active count whenever it changes.
    actuator: Mutex<Option<Actuator>>,
    /// Since when each busy partition has been busy (automatic requests).
    pub(crate) busy_since: Mutex<BTreeMap<u32, u64>>,
}

/// What switches modules on the host: (partition, modules active).
pub type Actuator = Box<dyn Fn(u32, u32) + Send + Sync>;

pub(crate) fn refusal(refusal: RightsRefusal) -> AgentError {
    AgentError::from(refusal)
}

impl RightsManager {
    /// Opens the shared store and joins the group. A host whose rights
    /// were seized while it was away deactivates what they no longer cover
    /// before anything else (FIG. 8). When the store cannot be reached, the
    /// manager starts from its copy.
    pub async fn join(
        config: RightsConfig,
        host_id: &str,
        capacity: &HostCapacity,
        manager_url: &str,
        broker: &leasehold_api::Client,
        clock: SharedClock,
        peers: leasehold_api::Client,
    ) -> Result<Self, AgentError> {
        let store = GroupStore::open(&config, broker)?;
        let loans = local_loans::LoanBook::open(&config.loans_path)?;
        let (copy_file, copy) =
            copy_file::CopyFile::open(config.copy_path.clone(), host_id, clock.now_ms());
        let manager = RightsManager {
            config,
            store,
            host_id: host_id.to_string(),
            manager_url: manager_url.to_string(),
            clock,
            copy: Mutex::new(copy),
            copy_file,
            applied: Mutex::new(Applied::default()),
            loans: Mutex::new(loans),
            publish_wanted: tokio::sync::Notify::new(),
            primary_epoch: Mutex::new(0),
            peers,
            sync_lock: tokio::sync::Mutex::new(()),
            actuator: Mutex::new(None),
            busy_since: Mutex::new(BTreeMap::new()),
        };
        let joined = manager.join_group(capacity).await;
        match joined {
            Ok(()) => Ok(manager),
            Err(AgentError::GroupUnreachable(why)) if manager.copy().is_some() => {
                tracing::warn!(%why, "the share group's store is unreachable; serving this host from the manager's copy");
                if let Some((group, version)) = manager.copy() {
                    manager.apply_own(&group, version);
                }
                Ok(manager)
            }
            Err(error) => Err(error),
        }
    }

    async fn join_group(&self, capacity: &HostCapacity) -> Result<(), AgentError> {
        self.hold_host().await?;
        for _ in 0..MAX_SWAP_TRIES {
            let current = self.store.read(&self.config.group).await?;
            if let Some((table, _)) = &current {
                // Not listed (removed while this manager was away): the
                // loans of its earlier membership are forgotten.
                self.forget_published_loans(table);
            }
            let version = current.as_ref().map_or(0, |(_, v)| *v);
            let before = current.as_ref().map(|(g, _)| g.clone());
            let mut group = with_host(
                current.map(|(g, _)| g),
                &self.config,
                &self.host_id,
                capacity,
                &self.manager_url,
            );
            let now_ms = self.clock.now_ms();
            group.deactivate_beyond_rights(&self.host_id, now_ms);
            let written = self
                .store
                .write(before.as_ref(), &group, version, None, now_ms)
                .await?;
            if let Some(version) = written {
                self.remember(&group, version);
                return Ok(());
            }
        }
        Err(self.kept_changing())
    }

    /// Takes the host's manager lease before the agent touches anything of
    /// its host, waiting while another manager of this host holds it (a
    /// stand-by waits here until the active one dies: FIG. 6).
    pub(crate) async fn wait_for_host(
        config: &RightsConfig,
        host_id: &str,
        broker: &leasehold_api::Client,
        clock: &SharedClock,
    ) -> Result<(), AgentError> {
        let store = GroupStore::open(config, broker)?;
        let holder = config.host_lease_holder(host_id);
        let mut said = false;
        loop {
            let held = store
                .acquire(
                    &config.group,
                    &host_lease(host_id),
                    &holder,
                    HOST_LEASE_TTL_MS,
                    clock.now_ms(),
                )
                .await?;
            match held {
                Some(_) => return Ok(()),
                None => {
                    let why = "another manager of this host holds it";
                    if !said {
                        eprintln!("agent: waiting to manage host '{host_id}': {why}");
                        said = true;
                    }
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(flow::TICK_INTERVAL_MS)).await;
        }
    }

    fn kept_changing(&self) -> AgentError {
        AgentError::GroupUnreachable(format!(
            "the share group '{}' kept changing under this manager ({MAX_SWAP_TRIES} tries)",
            self.config.group
        ))
    }

    /// Reads, decides and writes the group's table by compare-and-swap,
    /// deciding again from a fresh read when another manager wrote first;
    /// then applies this host's rows. `as_token` writes as the caller.
    pub(crate) async fn update<T>(
        &self,
        as_token: Option<&str>,
        decide: impl Fn(&mut ShareGroup, u64) -> Result<T, RightsRefusal>,
    ) -> Result<(T, ShareGroup, u64), AgentError> {
        for attempt in 0..MAX_SWAP_TRIES {
            // Optimistic first: the copy is usually the stored version (the
            // compare-and-swap refuses it when not, and the next try reads).
            let from_copy = attempt == 0;
            let (before, version) = match self.copy() {
                Some(copy) if from_copy => copy,
                _ => self.fresh().await?,
            };
            let now_ms = self.clock.now_ms();
            // This host's loans the table does not hold yet go with the
            // write, decided on with the rest.
            let mut group = self.overlaid(&before, &self.pending_loans()).group;
            let decided = match decide(&mut group, now_ms) {
                Ok(decided) => decided,
                // A refusal on the copy may be the copy's age: decide again
                // on the stored table.
                Err(_) if from_copy => continue,
                Err(refused) => return Err(refusal(refused)),
            };
            group.prune_ended_transfers();
            let written = self
                .store
                .write(Some(&before), &group, version, as_token, now_ms)
                .await?;
            if let Some(version) = written {
                self.published(local_loans::loans_held_through(&group, &self.host_id));
                self.remember(&group, version);
                return Ok((decided, group, version));
            }
        }
        Err(self.kept_changing())
    }

    /// The table as the store holds it now (refreshing the copy).
    pub(crate) async fn fresh(&self) -> Result<(ShareGroup, u64), AgentError> {
        match self.store.read(&self.config.group).await? {
            Some((group, version)) => {
                self.remember(&group, version);
                Ok((group, version))
            }
            None => Err(AgentError::NotFound(format!(
                "no share group '{}' in the store",
                self.config.group
            ))),
        }
    }

    /// The table for a reader: fresh (with this host's loans published
    /// first), else the copy marked stale.
    pub(crate) async fn document(&self) -> Result<ShareGroupDocument, AgentError> {
        if let Err(error) = self.publish_local_loans().await {
            tracing::debug!(%error, "could not publish this host's loans before a read");
        }
        match self.fresh().await {
            Ok((group, version)) => Ok(ShareGroupDocument {
                group,
                version,
                stale: false,
            }),
            Err(AgentError::GroupUnreachable(why)) => match self.copy() {
                // This host's rows as its manager holds them: with the
                // loans the store has not received.
                Some((group, version)) => Ok(ShareGroupDocument {
                    group: self.overlaid(&group, &self.pending_loans()).group,
                    version,
                    stale: true,
                }),
                None => Err(AgentError::GroupUnreachable(why)),
            },
            Err(other) => Err(other),
        }
    }

    pub(crate) fn copy(&self) -> Option<(ShareGroup, u64)> {
        self.copy.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Keeps a newer table as the copy (memory and file) and applies it.
    fn remember(&self, group: &ShareGroup, version: u64) {
        {
            let mut copy = self.copy.lock().unwrap_or_else(|p| p.into_inner());
            if copy.as_ref().is_some_and(|(_, v)| *v >= version) {
                drop(copy);
                self.apply_own(group, version);
                return;
            }
            *copy = Some((group.clone(), version));
        }
        self.copy_file.keep(group, version, self.clock.now_ms());
        self.apply_own(group, version);
    }

    /// Switches this host's modules to what the table says, with this
    /// host's loans not yet in it on top (deactivating first), unless a
    /// newer version was applied already. While a loan waits for a
    /// transfer out of the host to end, the version is not applied (so the
    /// host does not confirm it: it aborts) and what is on stays on, less
    /// what expired.
    pub(crate) fn apply_own(&self, table: &ShareGroup, version: u64) -> RightsSyncAnswer {
        let book = self.book();
        let on_top = self.overlaid(table, &book.pending);
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        if version >= applied.version {
            if !on_top.lost.is_empty() {
                tracing::warn!(loans = ?on_top.lost, "loans inside this host were lost: their rights left the host (seized or revoked); their modules go off");
            }
            // Only a waiting loan keeps the applied table (a copy then).
            let kept = match on_top.waiting && applied.version > 0 {
                true => applied.group.clone(),
                false => None,
            };
            match kept {
                Some(kept) => self.switch(&mut applied, kept),
                None => {
                    self.switch(&mut applied, on_top.group);
                    applied.version = version;
                }
            }
        }
        drop(book);
        RightsSyncAnswer {
            host_id: self.host_id.clone(),
            version: applied.version,
            active: applied.active.clone(),
        }
    }

    /// Switches this host's modules to a loan's result (the table's
    /// version it was decided on stays the one applied).
    pub(crate) fn apply_effective(&self, effective: ShareGroup) {
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        self.switch(&mut applied, effective);
    }

    /// Switches the modules to `effective`'s rows for this host: never
    /// more than the rights held now (a temporary right past its expiry
    /// switches its module off before the table says so).
    fn switch(&self, applied: &mut Applied, effective: ShareGroup) {
        let now_ms = self.clock.now_ms();
        let wanted: BTreeMap<u32, u32> = effective
            .hosts
            .get(&self.host_id)
            .map(|h| {
                h.partitions
                    .iter()
                    .map(|(i, p)| (*i, p.active.min(p.rights(now_ms))))
                    .collect()
            })
            .unwrap_or_default();
        let changed: Vec<(u32, u32)> = wanted
            .iter()
            .filter(|(index, active)| applied.active.get(index) != Some(active))
            .map(|(index, active)| (*index, *active))
            .collect();
        applied.active = wanted;
        applied.group = Some(effective);
        self.actuate(&changed);
    }

    /// Gives the manager what switches modules on this host, and has it
    /// switch them to what the table says now.
    pub fn set_actuator(&self, actuator: Actuator) {
        *self.actuator.lock().unwrap_or_else(|p| p.into_inner()) = Some(actuator);
        let applied = self.applied();
        let all: Vec<(u32, u32)> = applied.active.into_iter().collect();
        self.actuate(&all);
    }

    fn actuate(&self, changed: &[(u32, u32)]) {
        let actuator = self.actuator.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(actuator) = actuator.as_ref() {
            for (index, active) in changed {
                actuator(*index, *active);
            }
        }
    }

    pub(crate) fn applied(&self) -> Applied {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

pub(crate) mod admin;
mod copy_file;
pub(crate) mod flow;
pub(crate) mod http;
pub(crate) mod local_loans;
#[cfg(test)]
mod tests;
pub mod workload;
