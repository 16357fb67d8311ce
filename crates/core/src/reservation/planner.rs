//! The planner of seed 003 (FIG. 8-13): one round at a given time decides,
//! for every demand in priority order (then the order workloads were first
//! applied: the queue of FIG. 12), what its pools do:
//!
//! - a demand whose target is at or below the threshold, where a host has it
//!   free now, gets a pool holding all of it at once (S906);
//! - otherwise pools on up to `candidates` hosts, best forecast first
//!   (S903), raise their guarantee by a step per interval, never above what
//!   that host's latest sample left free (FIG. 9); when one holds the whole
//!   target it is chosen, by the most capacity left free on its host, and
//!   the others are released (S904); a pool whose host's trend will never
//!   reach the target gives its place to an untried host whose trend will;
//! - at the start the chosen pool hands its capacity to the instances in one
//!   change, so the guarantee never lapses (FIG. 13); at the end, or when
//!   the workload is deleted, the capacity goes back to the host.
//!
//! Higher priority demands step first in a round, so where they compete for
//! a host's free capacity the higher gets it first (FIG. 10). Spread rules
//! keep a demand off hosts where a demand it is spread apart from has a
//! pool; pack rules are demands of several instances (FIG. 11).

use super::capacity::Capacity;
use super::forecast::{gain_per_interval, Outlook};
use super::workload::Demand;
use super::{Pool, PoolPhase, ReservationBook, ReservationChange, SampleWindow, Workload};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// How the planner acquires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlanPolicy {
    /// The length of a step of a ramp, and of the forecast's unit.
    pub interval_ms: u64,
    /// A target at or below it (every resource) is acquired at once when a
    /// host has it free; `None`: a quarter of each host's lendable capacity.
    pub threshold: Option<Capacity>,
    /// The coefficient: most a pool's guarantee rises per interval; `None`:
    /// the threshold.
    pub step: Option<Capacity>,
    /// Hosts ramping for one demand at a time.
    pub candidates: usize,
    /// Rounds in a row without gain before a warning.
    pub fruitless_limit: u32,
    /// Hand a pool's capacity to its instances a step per interval from
    /// the start (FIG. 22: the pool's guarantee falls as the instances'
    /// rises, their sum never changing) rather than in one change.
    #[serde(default)]
    pub gradual_handover: bool,
}

impl Default for PlanPolicy {
    fn default() -> Self {
        PlanPolicy {
            interval_ms: 10_000,
            threshold: None,
            step: None,
            candidates: 2,
            fruitless_limit: 5,
            gradual_handover: false,
        }
    }
}

/// A host as the planner sees it.
#[derive(Debug, Clone, Copy)]
pub struct PlanHost<'a> {
    pub host_id: &'a str,
    /// Its capacity less the owner's share.
    pub lendable: Capacity,
    /// What its partitions in the market take.
    pub lent: Capacity,
    pub window: Option<&'a SampleWindow>,
}

impl PlanPolicy {
    pub fn threshold_for(&self, host: &PlanHost) -> Capacity {
        self.threshold.unwrap_or(Capacity::new(
            host.lendable.cpu_centicores / 4,
            host.lendable.memory_mib / 4,
            host.lendable.disk_gib / 4,
        ))
    }

    pub fn step_for(&self, host: &PlanHost) -> Capacity {
        let step = self.step.unwrap_or_else(|| self.threshold_for(host));
        // A zero step would never finish; one unit is the least.
        step.max(Capacity::new(1, 1, 1))
    }
}

/// A host in the round's free index: what a demand could hold there now
/// (memory, cpu, disk: available less held) and its id, in the order
/// `at_once_host` prefers (the tightest fit first, then the id).
type FreeKey<'a> = (u64, u64, u64, &'a str);

/// The working state of one round.
pub(crate) struct Round<'a> {
    pub(crate) policy: PlanPolicy,
    pub(crate) now_ms: u64,
    pub(crate) hosts: BTreeMap<&'a str, PlanHost<'a>>,
    /// Capacity pools hold per host, as the round changes it.
    pub(crate) held: BTreeMap<String, Capacity>,
    /// Each demand's pools, as the round changes them.
    pub(crate) pools: BTreeMap<String, Vec<Pool>>,
    pub(crate) changes: Vec<ReservationChange>,
    next_pool_id: u64,
    /// The hosts by [`FreeKey`], bucketed by whole vCPUs free, so finding
    /// the tightest host for a demand skips hosts short of CPU instead of
    /// scanning every host (100,000 demands on 10,000 hosts).
    free_index: BTreeMap<u64, BTreeSet<FreeKey<'a>>>,
    /// The most of every host's threshold, per resource: a target above it
    /// is at or below no host's threshold.
    threshold_most: Capacity,
}

/// The workloads in the order a round serves them: priority, then the queue.
fn workloads_in_order(book: &ReservationBook) -> Vec<&Workload> {
    let mut workloads: Vec<&Workload> = book.workloads.values().collect();
    workloads.sort_by_key(|w| (std::cmp::Reverse(w.priority), w.seq));
    workloads
}

/// The demands of every workload in the order a round serves them.
pub fn demands_in_order(book: &ReservationBook) -> Vec<(&Workload, Demand)> {
    workloads_in_order(book)
        .into_iter()
        .flat_map(|w| w.demands().into_iter().map(move |d| (w, d)))
        .collect()
}

/// Decides one round at `now_ms`.
pub fn plan_round(
    book: &ReservationBook,
    hosts: &[PlanHost],
    policy: PlanPolicy,
    now_ms: u64,
) -> Vec<ReservationChange> {
    let mut round = Round::new(book, hosts, policy, now_ms);
    // An ended workload without pools has nothing left to decide; past
    // workloads stay in the book, and remaking their demands every round
    // was most of a long-running fleet's round.
    let with_pools: BTreeSet<&str> = book.pools.values().map(|p| p.workload.as_str()).collect();
    let mut planned: Vec<(&Workload, Demand)> = Vec::new();
    for workload in workloads_in_order(book) {
        if now_ms >= workload.end_ms && !with_pools.contains(workload.name.as_str()) {
            continue;
        }
        let demands = workload.demands();
        for demand in &demands {
            round.plan_demand(book, workload, &demands, demand);
        }
        if !book.powered_off.is_empty() {
            planned.extend(demands.into_iter().map(|demand| (workload, demand)));
        }
    }
    if !book.powered_off.is_empty() {
        for host_id in super::moves::hosts_to_wake(&round, book, &planned) {
            round.changes.push(ReservationChange::SetHostPower {
                host_id,
                state: None,
            });
        }
    }
    round.changes
}

/// What the host's latest sample left available (nothing without one).
fn latest_available(host: &PlanHost) -> Capacity {
    host.window
        .and_then(SampleWindow::latest)
        .map(|s| s.available)
        .unwrap_or_default()
}

impl<'a> Round<'a> {
    pub(crate) fn new(
        book: &ReservationBook,
        hosts: &[PlanHost<'a>],
        policy: PlanPolicy,
        now_ms: u64,
    ) -> Self {
        let mut pools: BTreeMap<String, Vec<Pool>> = BTreeMap::new();
        for pool in book.pools.values() {
            pools
                .entry(pool.demand.clone())
                .or_default()
                .push(pool.clone());
        }
        let threshold_most = hosts.iter().fold(Capacity::ZERO, |most, host| {
            most.max(policy.threshold_for(host))
        });
        let mut round = Round {
            policy,
            now_ms,
            hosts: hosts.iter().map(|h| (h.host_id, *h)).collect(),
            held: book
                .held_by_host()
                .into_iter()
                .map(|(host, held)| (host.to_string(), held))
                .collect(),
            pools,
            changes: Vec::new(),
            next_pool_id: book.last_pool_id,
            free_index: BTreeMap::new(),
            threshold_most,
        };
        // From the map, not the slice: a host listed twice is indexed once,
        // as the map keeps it.
        let keys: Vec<(u64, FreeKey<'a>)> = round
            .hosts
            .values()
            .map(|host| round.free_key(host))
            .collect();
        for (bucket, key) in keys {
            round.free_index.entry(bucket).or_default().insert(key);
        }
        round
    }

    /// The host's place in the free index: its bucket and key.
    fn free_key(&self, host: &PlanHost<'a>) -> (u64, FreeKey<'a>) {
        let held = self.held.get(host.host_id).copied().unwrap_or_default();
        let free = latest_available(host).saturating_sub(held);
        let key = (
            free.memory_mib,
            free.cpu_centicores,
            free.disk_gib,
            host.host_id,
        );
        (free.cpu_centicores / 100, key)
    }

    /// Changes what pools hold on `host_id`, keeping the free index true.
    fn change_held(&mut self, host_id: &str, change: impl FnOnce(Capacity) -> Capacity) {
        let host = self.hosts.get(host_id).copied();
        if let Some(host) = &host {
            let (bucket, key) = self.free_key(host);
            if let Some(keys) = self.free_index.get_mut(&bucket) {
                keys.remove(&key);
            }
        }
        let held = self.held.entry(host_id.to_string()).or_default();
        *held = change(*held);
        if let Some(host) = &host {
            let (bucket, key) = self.free_key(host);
            self.free_index.entry(bucket).or_default().insert(key);
        }
    }

    fn plan_demand(
        &mut self,
        book: &ReservationBook,
        workload: &Workload,
        demands: &[Demand],
        demand: &Demand,
    ) {
        let mut pools = self.pools.remove(&demand.key).unwrap_or_default();
        if self.now_ms >= workload.end_ms {
            for pool in pools.drain(..) {
                self.release(pool);
            }
            return;
        }
        if book.moves.contains_key(&demand.key) {
            let pools = self.plan_move(book, workload, demand, pools);
            self.pools.insert(demand.key.clone(), pools);
            return;
        }
        if pools.iter().any(|p| p.phase == PoolPhase::HandedOver) {
            self.pools.insert(demand.key.clone(), pools);
            return;
        }
        let excluded = self.excluded_hosts(book, workload, demands, demand);
        let (kept, gone): (Vec<Pool>, Vec<Pool>) = pools.into_iter().partition(|p| {
            self.hosts.contains_key(p.host_id.as_str()) && !excluded.contains(&p.host_id)
        });
        for pool in gone {
            self.release(pool);
        }
        pools = kept;
        if !pools.iter().any(|p| p.phase == PoolPhase::Chosen) {
            pools = self.acquire(book, workload, demand, pools, &excluded);
        }
        pools = self.choose_complete(pools);
        if self.now_ms >= workload.start_ms {
            pools = pools.into_iter().map(|p| self.hand_over(p)).collect();
        }
        self.pools.insert(demand.key.clone(), pools);
    }

    /// Hosts this demand must stay off: where a demand its workload spreads
    /// it apart from has a pool, and hosts powered down. `demands` are the
    /// workload's, made once a round rather than once per demand.
    pub(crate) fn excluded_hosts(
        &self,
        book: &ReservationBook,
        workload: &Workload,
        demands: &[Demand],
        demand: &Demand,
    ) -> BTreeSet<String> {
        // Hosts powered down (or draining for it) take no new pools.
        let mut excluded: BTreeSet<String> = book.powered_off.keys().cloned().collect();
        if workload.rules.is_empty() {
            return excluded;
        }
        for other in demands {
            if other.key == demand.key
                || !workload.spread_apart(&demand.instances, &other.instances)
            {
                continue;
            }
            let pools = self
                .pools
                .get(&other.key)
                .map(Vec::as_slice)
                .unwrap_or_default();
            excluded.extend(pools.iter().map(|p| p.host_id.clone()));
        }
        excluded
    }

    /// What a demand holding `own` on `host` could hold there.
    pub(crate) fn outlook(&self, host: &PlanHost, own: Capacity) -> Outlook {
        let held = self.held.get(host.host_id).copied().unwrap_or_default();
        let others = held.saturating_sub(own);
        let available = latest_available(host);
        Outlook {
            now_ms: self.now_ms,
            ceiling_now: available.saturating_sub(others),
            room: host
                .lendable
                .saturating_sub(host.lent)
                .saturating_sub(others),
            gain_per_interval: host
                .window
                .map(|w| gain_per_interval(w, self.policy.interval_ms))
                .unwrap_or_default(),
            acquired: own,
            step: self.policy.step_for(host),
            interval_ms: self.policy.interval_ms,
        }
    }

    /// Hosts that could ever hold `target`, best forecast first: (host,
    /// forecast completion).
    pub(crate) fn candidates(
        &self,
        target: Capacity,
        excluded: &BTreeSet<String>,
    ) -> Vec<(&'a str, Option<u64>)> {
        let mut found: Vec<(&'a str, Option<u64>)> = self
            .hosts
            .values()
            .filter(|host| !excluded.contains(host.host_id))
            .map(|host| (host.host_id, self.outlook(host, Capacity::ZERO)))
            .filter(|(_, outlook)| target.fits_in(outlook.room))
            .map(|(host_id, outlook)| (host_id, outlook.completion_ms(target)))
            .collect();
        found.sort_by_key(|&(host_id, done)| (done.is_none(), done, host_id));
        found
    }

    fn acquire(
        &mut self,
        book: &ReservationBook,
        workload: &Workload,
        demand: &Demand,
        mut pools: Vec<Pool>,
        excluded: &BTreeSet<String>,
    ) -> Vec<Pool> {
        if let Some(host_id) = self.at_once_host(demand.target, excluded) {
            for pool in pools.drain(..) {
                self.release(pool);
            }
            let mut pool = self.new_pool(workload, demand, host_id);
            pool.phase = PoolPhase::Chosen;
            self.grant(&mut pool, demand.target);
            return vec![pool];
        }
        if pools.len() < self.policy.candidates {
            let have: BTreeSet<String> = pools.iter().map(|p| p.host_id.clone()).collect();
            let add: Vec<&str> = self
                .candidates(demand.target, excluded)
                .into_iter()
                .map(|(host_id, _)| host_id)
                .filter(|host_id| !have.contains(*host_id))
                .take(self.policy.candidates - pools.len())
                .collect();
            for host_id in add {
                pools.push(self.new_pool(workload, demand, host_id));
            }
        } else {
            pools = self.replace_hopeless(workload, demand, pools, excluded);
        }
        self.step_pools(book, demand, pools)
    }

    /// With every candidate place taken, a pool whose host will never hold
    /// the target on its trend gives its place to a host not yet tried
    /// whose trend will (FIG. 8: candidates by forecast), one a round.
    /// Without this, hosts picked before any trend showed kept their places
    /// for good, and a host whose owner let go of capacity later was never
    /// tried.
    fn replace_hopeless(
        &mut self,
        workload: &Workload,
        demand: &Demand,
        mut pools: Vec<Pool>,
        excluded: &BTreeSet<String>,
    ) -> Vec<Pool> {
        let hopeless = pools.iter().position(|pool| {
            let host = self.hosts[pool.host_id.as_str()];
            let outlook = self.outlook(&host, pool.acquired);
            outlook.completion_ms(demand.target).is_none()
        });
        let Some(hopeless) = hopeless else {
            return pools;
        };
        let better = self
            .candidates(demand.target, excluded)
            .into_iter()
            .find(|(host_id, done)| {
                done.is_some() && !pools.iter().any(|pool| pool.host_id == *host_id)
            })
            .map(|(host_id, _)| host_id);
        let Some(host_id) = better else {
            return pools;
        };
        let gone = pools.remove(hopeless);
        self.release(gone);
        pools.push(self.new_pool(workload, demand, host_id));
        pools
    }

    /// A host where a target at or below its threshold is free now, the
    /// tightest fit first: the least memory left, then CPU, then disk, then
    /// the host's id. Each bucket of the free index with CPU enough is
    /// searched from the target's memory up; the first host of a bucket
    /// that fits is that bucket's best, and the best of those wins.
    fn at_once_host(&self, target: Capacity, excluded: &BTreeSet<String>) -> Option<&'a str> {
        if !target.fits_in(self.threshold_most) {
            return None;
        }
        let mut best: Option<FreeKey<'a>> = None;
        let least: FreeKey<'a> = (target.memory_mib, 0, 0, "");
        for keys in self
            .free_index
            .range(target.cpu_centicores / 100..)
            .map(|(_, keys)| keys)
        {
            for &key in keys.range(least..) {
                if best.is_some_and(|best| key >= best) {
                    break;
                }
                if self.fits_at_once(target, key, excluded) {
                    best = Some(key);
                    break;
                }
            }
        }
        best.map(|(_, _, _, host_id)| host_id)
    }

    /// Whether `target` may be held at once on the host of `key`.
    fn fits_at_once(
        &self,
        target: Capacity,
        key: FreeKey<'a>,
        excluded: &BTreeSet<String>,
    ) -> bool {
        let (memory_mib, cpu_centicores, disk_gib, host_id) = key;
        let free = Capacity::new(cpu_centicores, memory_mib, disk_gib);
        if !target.fits_in(free) || excluded.contains(host_id) {
            return false;
        }
        let host = &self.hosts[host_id];
        let outlook = self.outlook(host, Capacity::ZERO);
        target.fits_in(self.policy.threshold_for(host)) && target.fits_in(outlook.room)
    }

    /// Every pool due a step raises its guarantee by at most a step, never
    /// above what its host has free; the demand's count of fruitless
    /// rounds follows.
    pub(crate) fn step_pools(
        &mut self,
        book: &ReservationBook,
        demand: &Demand,
        mut pools: Vec<Pool>,
    ) -> Vec<Pool> {
        let (mut due, mut gained) = (false, false);
        for pool in pools.iter_mut() {
            let fresh = pool.created_at_ms == self.now_ms && pool.acquired.is_zero();
            if !fresh && self.now_ms < pool.last_step_ms.saturating_add(self.policy.interval_ms) {
                continue;
            }
            due = true;
            let host = self.hosts[pool.host_id.as_str()];
            let outlook = self.outlook(&host, pool.acquired);
            let missing = pool.target.saturating_sub(pool.acquired);
            let free_for_it = outlook.ceiling_now.saturating_sub(pool.acquired);
            let grant = missing.min(outlook.step).min(free_for_it);
            pool.requested = pool.acquired.saturating_add(missing.min(outlook.step));
            pool.last_step_ms = self.now_ms;
            pool.sampled_at_ms = host.window.and_then(SampleWindow::latest).map(|s| s.at_ms);
            gained |= !grant.is_zero();
            self.grant(pool, grant);
        }
        if pools.is_empty() {
            due = true;
        }
        let rounds = book.fruitless_rounds.get(&demand.key).copied().unwrap_or(0);
        let complete = pools.iter().any(Pool::is_complete);
        let next = if gained || complete {
            0
        } else if due {
            rounds.saturating_add(1)
        } else {
            rounds
        };
        if next != rounds {
            self.changes.push(ReservationChange::SetFruitlessRounds {
                demand: demand.key.clone(),
                rounds: next,
            });
        }
        pools
    }

    pub(crate) fn grant(&mut self, pool: &mut Pool, grant: Capacity) {
        pool.acquired = pool.acquired.saturating_add(grant);
        if pool.requested.fits_in(pool.acquired) || pool.phase == PoolPhase::Chosen {
            pool.requested = pool.requested.max(pool.acquired);
        }
        self.change_held(&pool.host_id, |held| held.saturating_add(grant));
        self.changes.push(ReservationChange::PutPool(pool.clone()));
    }

    /// S903/S904: of the pools holding their whole target, the one whose
    /// host keeps the most free stays; every other pool of the demand goes.
    fn choose_complete(&mut self, pools: Vec<Pool>) -> Vec<Pool> {
        let best = pools
            .iter()
            .filter(|p| p.is_complete())
            .max_by_key(|p| {
                let host = self.hosts[p.host_id.as_str()];
                let left = self
                    .outlook(&host, p.acquired)
                    .ceiling_now
                    .saturating_sub(p.acquired);
                (
                    left.memory_mib,
                    left.cpu_centicores,
                    std::cmp::Reverse(p.host_id.clone()),
                )
            })
            .map(|p| p.pool_id);
        let Some(best) = best else {
            return pools;
        };
        let mut kept = Vec::new();
        for mut pool in pools {
            if pool.pool_id != best {
                self.release(pool);
            } else {
                if pool.phase == PoolPhase::Acquiring {
                    pool.phase = PoolPhase::Chosen;
                    self.changes.push(ReservationChange::PutPool(pool.clone()));
                }
                kept.push(pool);
            }
        }
        kept
    }

    /// At the start: the chosen pool's capacity goes to its instances in
    /// one change (FIG. 13); what it holds on its host does not change.
    pub(crate) fn hand_over(&mut self, mut pool: Pool) -> Pool {
        if pool.phase != PoolPhase::Chosen {
            return pool;
        }
        let moved = if self.policy.gradual_handover {
            // The first step at the start, then one per interval.
            let due = pool.allocated.is_zero()
                || self.now_ms >= pool.last_step_ms.saturating_add(self.policy.interval_ms);
            if !due {
                return pool;
            }
            let host = self.hosts.get(pool.host_id.as_str()).copied();
            let step = host.map_or(pool.acquired, |h| self.policy.step_for(&h));
            pool.acquired.min(step)
        } else {
            pool.acquired
        };
        pool.allocated = pool.allocated.saturating_add(moved);
        pool.acquired = pool.acquired.saturating_sub(moved);
        pool.last_step_ms = self.now_ms;
        if pool.acquired.is_zero() {
            pool.phase = PoolPhase::HandedOver;
            pool.requested = Capacity::ZERO;
        }
        self.changes.push(ReservationChange::PutPool(pool.clone()));
        pool
    }

    pub(crate) fn release(&mut self, pool: Pool) {
        let gone = pool.held();
        self.change_held(&pool.host_id, |held| held.saturating_sub(gone));
        self.changes.push(ReservationChange::RemovePool {
            pool_id: pool.pool_id,
        });
    }

    pub(crate) fn new_pool(&mut self, workload: &Workload, demand: &Demand, host_id: &str) -> Pool {
        self.next_pool_id += 1;
        Pool {
            pool_id: self.next_pool_id,
            host_id: host_id.to_string(),
            workload: workload.name.clone(),
            demand: demand.key.clone(),
            instances: demand.instances.clone(),
            phase: PoolPhase::Acquiring,
            target: demand.target,
            acquired: Capacity::ZERO,
            requested: Capacity::ZERO,
            allocated: Capacity::ZERO,
            last_step_ms: self.now_ms,
            sampled_at_ms: None,
            created_at_ms: self.now_ms,
        }
    }
}
