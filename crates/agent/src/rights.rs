//! The agent as its host's usage-rights manager (seed 004, FIG. 1's share
//! group manager): with `--group NAME` it joins the share group whose table
//! lives in the shared store (`--group-store`: an SQLite file for the hosts
//! of one machine, PostgreSQL for a group spread over machines), adding its
//! host's row the first time: the owner share (partition 0) with one module
//! per whole core and the rights the host owns, all active. Every write is a
//! compare-and-swap on the table's version, retried from a fresh read, so
//! managers never overwrite each other. Transfers and fail-over build on
//! this (see ARCHITECTURE.md, "Designed for").

use crate::error::AgentError;
use leasehold_core::rights::{
    GroupMode, HostRights, PartitionRights, ShareGroup, OWNER_SHARE_PARTITION,
};
use leasehold_core::HostCapacity;
use leasehold_store::{open_broker_store, BrokerDatabase, BrokerStore, Durability};
use std::sync::Mutex;

/// Tries of a compare-and-swap before giving up (each one re-reads).
const MAX_SWAP_TRIES: u32 = 32;

#[derive(Debug, Clone)]
pub struct RightsConfig {
    pub group: String,
    pub mode: GroupMode,
    pub store: BrokerDatabase,
    /// Usage rights this host owns; `None`: one per whole core.
    pub owned_rights: Option<u32>,
}

pub struct RightsManager {
    pub config: RightsConfig,
    store: Mutex<Box<dyn BrokerStore>>,
}

/// The group with this host in it: unchanged if it is there already (only
/// its manager's address follows the agent), else its owner share's row.
pub fn with_host(
    group: Option<ShareGroup>,
    config: &RightsConfig,
    host_id: &str,
    capacity: &HostCapacity,
    manager_url: &str,
) -> ShareGroup {
    let mut group = group.unwrap_or_else(|| ShareGroup::new(config.group.clone(), config.mode));
    let modules = (capacity.cpu_centicores / 100) as u32;
    let owned = config.owned_rights.unwrap_or(modules).min(modules);
    let host = group
        .hosts
        .entry(host_id.to_string())
        .or_insert_with(|| HostRights {
            manager_url: String::new(),
            partitions: [(
                OWNER_SHARE_PARTITION,
                PartitionRights {
                    modules,
                    permanent: owned,
                    temporary: vec![],
                    active: owned,
                    workload_percent: 0,
                },
            )]
            .into(),
        });
    host.manager_url = manager_url.to_string();
    group
}

impl RightsManager {
    /// Opens the shared store and joins the group.
    pub fn join(
        config: RightsConfig,
        host_id: &str,
        capacity: &HostCapacity,
        manager_url: &str,
    ) -> Result<Self, AgentError> {
        let store = open_broker_store(&config.store, Durability::Full)?;
        let manager = RightsManager {
            config,
            store: Mutex::new(store),
        };
        manager.update(|group| {
            Ok(with_host(
                group,
                &manager.config,
                host_id,
                capacity,
                manager_url,
            ))
        })?;
        Ok(manager)
    }

    /// Reads, decides and writes the group's table by compare-and-swap,
    /// deciding again from a fresh read when another manager wrote first.
    pub fn update(
        &self,
        decide: impl Fn(Option<ShareGroup>) -> Result<ShareGroup, AgentError>,
    ) -> Result<ShareGroup, AgentError> {
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        for _ in 0..MAX_SWAP_TRIES {
            let current = store.share_group(&self.config.group)?;
            let version = current.as_ref().map_or(0, |(_, version)| *version);
            let next = decide(current.map(|(group, _)| group))?;
            if store.put_share_group(&next, version)?.is_some() {
                return Ok(next);
            }
        }
        Err(AgentError::Internal(format!(
            "the share group '{}' kept changing under this manager ({MAX_SWAP_TRIES} tries)",
            self.config.group
        )))
    }

    /// The group's table as the shared store holds it now (FIG. 4A).
    pub fn table(&self) -> Result<ShareGroup, AgentError> {
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store
            .share_group(&self.config.group)?
            .map(|(group, _)| group)
            .ok_or_else(|| {
                AgentError::NotFound(format!(
                    "no share group '{}' in the store",
                    self.config.group
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capacity(cpus: u64) -> HostCapacity {
        HostCapacity {
            cpu_centicores: cpus * 100,
            memory_mib: 4096,
            disk_gib: 10,
            owner_share_cpu_centicores: 0,
            owner_share_memory_mib: 0,
            owner_share_disk_gib: 0,
        }
    }

    fn config(store: BrokerDatabase, owned: Option<u32>) -> RightsConfig {
        RightsConfig {
            group: "g".into(),
            mode: GroupMode::Centralized,
            store,
            owned_rights: owned,
        }
    }

    #[test]
    fn two_managers_join_one_group_through_the_shared_store_and_a_rejoin_keeps_the_rights() {
        let dir = tempfile::tempdir().unwrap();
        let store = BrokerDatabase::Sqlite(dir.path().join("group.db"));
        let first = RightsManager::join(
            config(store.clone(), Some(4)),
            "h1",
            &capacity(6),
            "http://h1",
        )
        .unwrap();
        let second =
            RightsManager::join(config(store.clone(), None), "h2", &capacity(2), "http://h2")
                .unwrap();
        let table = first.table().unwrap();
        assert_eq!(table.hosts.len(), 2, "each saw the other's write");
        let h1 = &table.hosts["h1"].partitions[&OWNER_SHARE_PARTITION];
        assert_eq!(
            (h1.modules, h1.permanent, h1.active, h1.inactive()),
            (6, 4, 4, 2)
        );
        let h2 = &table.hosts["h2"].partitions[&OWNER_SHARE_PARTITION];
        assert_eq!((h2.modules, h2.permanent), (2, 2));
        // A manager that comes back (or its stand-by) finds its rights as
        // they are, and records where it listens now.
        second
            .update(|group| {
                let mut group = group.unwrap();
                group
                    .hosts
                    .get_mut("h2")
                    .unwrap()
                    .partitions
                    .get_mut(&0)
                    .unwrap()
                    .permanent = 1;
                Ok(group)
            })
            .unwrap();
        let again =
            RightsManager::join(config(store, None), "h2", &capacity(2), "http://h2-standby")
                .unwrap();
        let table = again.table().unwrap();
        assert_eq!(table.hosts["h2"].partitions[&0].permanent, 1);
        assert_eq!(table.hosts["h2"].manager_url, "http://h2-standby");
        assert_eq!(table.total_rights(0), 5);
    }
}
