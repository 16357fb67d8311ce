//! Guaranteed capacity ahead of time (seed 003): workloads of instances with
//! a start time, acquisition pools that gather capacity on a host at once or
//! step by step before that start, forecasts from the hosts' samples, and
//! warnings when a target will not be reached.
//!
//! The book ([`ReservationBook`]) is pure data and changes only through
//! [`ReservationBook::apply`]; the planner ([`planner::plan_round`]) decides a
//! round at a given time into [`ReservationChange`]s, deterministic given
//! the book, the hosts and their samples.

pub mod capacity;
pub mod commands;
pub mod forecast;
pub mod moves;
pub mod planner;
pub mod report;
pub mod simulation;
pub mod warnings;
pub mod workload;

pub use capacity::Capacity;
pub use workload::{Demand, InstanceSpec, PlacementRule, RuleKind, Workload};

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Samples kept per host for the forecast.
pub const SAMPLE_WINDOW_LEN: usize = 32;

/// Where an acquisition pool is in its life (FIG. 3, 8, 9, 13).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PoolPhase {
    /// Raising its guarantee step by step (the acquisition flag is on).
    Acquiring,
    /// Holds its whole target and is the host chosen for its instances
    /// (S903), waiting for their start.
    Chosen,
    /// Its capacity was handed to its instances at their start (FIG. 13).
    HandedOver,
}

/// A resource acquisition pool (seed 003's 114) on one host, for one demand
/// (an instance, or the instances a pack rule keeps together): the row of
/// FIG. 3, linked to its instances as in FIG. 6.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Pool {
    pub pool_id: u64,
    pub host_id: String,
    pub workload: String,
    /// The demand's key: its first instance's name.
    pub demand: String,
    pub instances: Vec<String>,
    pub phase: PoolPhase,
    /// The scheduled acquisition capacity (208): what the instances need.
    pub target: Capacity,
    /// The guarantee the pool holds (205).
    pub acquired: Capacity,
    /// The guarantee it asked for at its last step (204).
    pub requested: Capacity,
    /// What it has allocated to its instances (203), after the hand-over.
    pub allocated: Capacity,
    /// When its guarantee last rose (or it was made).
    pub last_step_ms: u64,
    /// The time of the host sample its last step used (207).
    pub sampled_at_ms: Option<u64>,
    pub created_at_ms: u64,
}

impl Pool {
    /// What the pool keeps from everyone else on its host.
    pub fn held(&self) -> Capacity {
        self.acquired.saturating_add(self.allocated)
    }

    pub fn is_complete(&self) -> bool {
        self.target.fits_in(self.acquired) || self.phase != PoolPhase::Acquiring
    }
}

/// One sample of a host (seed 003's units 109/110), as the broker keeps it:
/// when it was taken on the broker's clock, what the owner used and what was
/// left for pools and instances (`available`: the host's total less the
/// owner's usage, never less than its share, and less the partitions lent
/// in the market).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostSample {
    pub at_ms: u64,
    pub owner_used: Capacity,
    pub available: Capacity,
}

/// A host's recent samples, oldest first, at most [`SAMPLE_WINDOW_LEN`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SampleWindow {
    pub samples: VecDeque<HostSample>,
}

impl SampleWindow {
    pub fn push(&mut self, sample: HostSample) {
        // The broker's clock never goes back, but a sample that arrives
        // out of order must not rewrite the trend.
        if self
            .latest()
            .is_some_and(|latest| sample.at_ms < latest.at_ms)
        {
            return;
        }
        if self.samples.len() == SAMPLE_WINDOW_LEN {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    pub fn latest(&self) -> Option<&HostSample> {
        self.samples.back()
    }
}

/// One change of the book; the planner and the workload commands decide
/// them, the store persists them, the table applies them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReservationChange {
    PutWorkload(Workload),
    /// The workload, its pools and its counters are forgotten.
    RemoveWorkload {
        name: String,
    },
    PutPool(Pool),
    /// The pool's capacity goes back to its host (S904, deletion, end).
    RemovePool {
        pool_id: u64,
    },
    /// Rounds in a row in which a demand gained nothing (FIG. 9's count).
    SetFruitlessRounds {
        demand: String,
        rounds: u32,
    },
    /// A demand to move (FIG. 15), or no longer (`None`).
    SetMove {
        demand: String,
        target: Option<moves::MoveTarget>,
    },
    /// A host powered down (FIG. 17), or up again (`None`).
    SetHostPower {
        host_id: String,
        state: Option<moves::PowerState>,
    },
}

/// The workloads, their pools and the planner's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReservationBook {
    pub workloads: BTreeMap<String, Workload>,
    /// Instance name → its workload's name (instance names are unique).
    pub instance_owner: BTreeMap<String, String>,
    pub pools: BTreeMap<u64, Pool>,
    pub fruitless_rounds: BTreeMap<String, u32>,
    pub last_pool_id: u64,
    pub last_workload_seq: u64,
    /// Demands being moved, and where to.
    pub moves: BTreeMap<String, moves::MoveTarget>,
    /// Hosts powered down (or draining for it).
    pub powered_off: BTreeMap<String, moves::PowerState>,
    /// What pools hold per host, kept with every change (samples ask for
    /// it every interval on every host).
    held: BTreeMap<String, Capacity>,
    /// Pool ids by host and by demand, kept with every change, so that a
    /// host's sample or a workload's view never scans every pool.
    by_host: BTreeMap<String, BTreeSet<u64>>,
    by_demand: BTreeMap<String, BTreeSet<u64>>,
}

impl ReservationBook {
    pub fn apply(&mut self, change: &ReservationChange) {
        match change {
            ReservationChange::PutWorkload(workload) => {
                if let Some(old) = self.workloads.get(&workload.name) {
                    for instance in &old.instances {
                        self.instance_owner.remove(&instance.name);
                    }
                }
                for instance in &workload.instances {
                    self.instance_owner
                        .insert(instance.name.clone(), workload.name.clone());
                }
                self.last_workload_seq = self.last_workload_seq.max(workload.seq);
                self.workloads
                    .insert(workload.name.clone(), workload.clone());
            }
            ReservationChange::RemoveWorkload { name } => {
                if let Some(old) = self.workloads.remove(name) {
                    for instance in &old.instances {
                        self.instance_owner.remove(&instance.name);
                        self.fruitless_rounds.remove(&instance.name);
                        self.moves.remove(&instance.name);
                    }
                }
                let gone: Vec<u64> = self
                    .pools
                    .values()
                    .filter(|pool| &pool.workload == name)
                    .map(|pool| pool.pool_id)
                    .collect();
                // (A scan, but deleting a workload is rare; the writes
                // name the pools one by one before this anyway.)
                for pool_id in gone {
                    self.remove_pool(pool_id);
                }
            }
            ReservationChange::PutPool(pool) => self.put_pool(pool),
            ReservationChange::RemovePool { pool_id } => self.remove_pool(*pool_id),
            ReservationChange::SetMove { demand, target } => match target {
                Some(target) => {
                    self.moves.insert(demand.clone(), target.clone());
                }
                None => {
                    self.moves.remove(demand);
                }
            },
            ReservationChange::SetHostPower { host_id, state } => match state {
                Some(state) => {
                    self.powered_off.insert(host_id.clone(), *state);
                }
                None => {
                    self.powered_off.remove(host_id);
                }
            },
            ReservationChange::SetFruitlessRounds { demand, rounds } => {
                if *rounds == 0 {
                    self.fruitless_rounds.remove(demand);
                } else {
                    self.fruitless_rounds.insert(demand.clone(), *rounds);
                }
            }
        }
    }

    fn put_pool(&mut self, pool: &Pool) {
        self.last_pool_id = self.last_pool_id.max(pool.pool_id);
        self.remove_pool(pool.pool_id);
        let held = self.held.entry(pool.host_id.clone()).or_default();
        *held = held.saturating_add(pool.held());
        self.by_host
            .entry(pool.host_id.clone())
            .or_default()
            .insert(pool.pool_id);
        self.by_demand
            .entry(pool.demand.clone())
            .or_default()
            .insert(pool.pool_id);
        self.pools.insert(pool.pool_id, pool.clone());
    }

    fn remove_pool(&mut self, pool_id: u64) {
        let Some(old) = self.pools.remove(&pool_id) else {
            return;
        };
        for (index, key) in [
            (&mut self.by_host, &old.host_id),
            (&mut self.by_demand, &old.demand),
        ] {
            if let Some(ids) = index.get_mut(key) {
                ids.remove(&pool_id);
                if ids.is_empty() {
                    index.remove(key);
                }
            }
        }
        if let Some(held) = self.held.get_mut(&old.host_id) {
            *held = held.saturating_sub(old.held());
            if held.is_zero() {
                self.held.remove(&old.host_id);
            }
        }
    }

    /// Capacity the pools on `host_id` keep from everyone else.
    pub fn held_on_host(&self, host_id: &str) -> Capacity {
        self.held.get(host_id).copied().unwrap_or_default()
    }

    /// Capacity held on every host that holds any.
    pub fn held_by_host(&self) -> BTreeMap<&str, Capacity> {
        self.held
            .iter()
            .map(|(host, held)| (host.as_str(), *held))
            .collect()
    }

    pub fn pools_of_demand<'a>(&'a self, demand: &str) -> impl Iterator<Item = &'a Pool> + 'a {
        self.by_demand
            .get(demand)
            .into_iter()
            .flatten()
            .filter_map(|pool_id| self.pools.get(pool_id))
    }

    pub fn pools_on_host<'a>(&'a self, host_id: &str) -> impl Iterator<Item = &'a Pool> + 'a {
        self.by_host
            .get(host_id)
            .into_iter()
            .flatten()
            .filter_map(|pool_id| self.pools.get(pool_id))
    }
}
