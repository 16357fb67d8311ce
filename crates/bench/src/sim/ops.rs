//! The simulated lenders' and borrowers' operations: chosen by the seeded
//! generator, sent one at a time, each answer held against the model's
//! expectation; an answer that does not say whether the change happened is
//! resolved by an idempotent retry or a read.

use super::adapter::{Answer, Refusal};
use super::faults::Fault;
use super::model::Expect;
use super::Sim;
use leasehold_core::terms::Isolation;
use leasehold_core::{HostCapacity, PartitionRef, Requirements, Terms};
use rand::seq::SliceRandom;
use rand::Rng;

/// Host ids the lenders use (a few, so that partitions are contended).
const HOST_IDS: [&str; 5] = ["h0", "h1", "h2", "h3", "h4"];
/// Partition indexes per host.
const MAX_INDEX: u32 = 4;
/// Images partitions offer; the last is never offered (a 400 to find).
const IMAGES: [&str; 4] = ["busybox", "debian-12", "alpine-3", "never-offered"];
/// Offers asked for by a simulated find.
pub(super) const FIND_LIMIT: u32 = 5;

#[derive(Debug, Clone)]
pub(super) enum Op {
    RegisterHost {
        lender: usize,
        host_id: String,
        capacity: HostCapacity,
    },
    PutPartition {
        lender: usize,
        partition: PartitionRef,
        terms: Terms,
    },
    Withdraw {
        lender: usize,
        partition: PartitionRef,
    },
    Find {
        borrower: usize,
        requirements: Requirements,
    },
    LeaseNamed {
        borrower: usize,
        partition: PartitionRef,
        allow_unisolated: bool,
    },
    LeaseBest {
        borrower: usize,
        requirements: Requirements,
    },
    Release {
        borrower: usize,
        lease_id: u64,
    },
    /// A host's agent pulls its revocations.
    AgentPull {
        host_id: String,
    },
    /// A lease's borrower shows its key to the host's agent (a job).
    PresentKey {
        lease_id: u64,
    },
}

impl Op {
    /// Whether the operation writes (only those get a fault armed).
    fn writes(&self) -> bool {
        !matches!(
            self,
            Op::Find { .. } | Op::AgentPull { .. } | Op::PresentKey { .. }
        )
    }
}

/// An answer, or the fault that left its outcome unknown.
pub(super) enum Outcome<T> {
    Known(Answer<T>),
    Unknown(Fault),
}

impl Sim {
    /// Hosts and partitions to start from, with no fault armed.
    pub(super) async fn set_up(&mut self) -> Result<(), String> {
        for (position, host_id) in HOST_IDS.iter().take(3).enumerate() {
            let lender = position % self.lenders;
            let capacity = self.random_capacity();
            self.execute(
                Op::RegisterHost {
                    lender,
                    host_id: host_id.to_string(),
                    capacity,
                },
                None,
            )
            .await?;
            for index in 1..=3 {
                let terms = self.random_terms();
                let partition = PartitionRef::new(*host_id, index);
                self.execute(
                    Op::PutPartition {
                        lender,
                        partition,
                        terms,
                    },
                    None,
                )
                .await?;
            }
        }
        Ok(())
    }

    /// One step: the clock moves, the broker may crash and restart, then
    /// one operation, perhaps with a fault armed for its commit.
    pub(super) async fn run_step(&mut self) -> Result<(), String> {
        self.advance_clock();
        if self.rng.gen_ratio(1, 25) {
            self.restart(true).await?;
        }
        let op = self.choose_op();
        let fault = if op.writes() {
            match self.rng.gen_range(0..24) {
                0 | 1 => Some(Fault::CrashBeforeCommit),
                2 | 3 => Some(Fault::AckLost),
                _ => None,
            }
        } else {
            None
        };
        self.execute(op, fault).await
    }

    async fn execute(&mut self, op: Op, fault: Option<Fault>) -> Result<(), String> {
        match fault {
            Some(fault) => {
                self.record(format!("{op:?} armed={fault:?}"));
                self.faults.arm(fault);
            }
            None => self.record(format!("{op:?}")),
        }
        match op {
            Op::RegisterHost {
                lender,
                host_id,
                capacity,
            } => self.register_host(lender, &host_id, capacity).await,
            Op::PutPartition {
                lender,
                partition,
                terms,
            } => self.put_partition(lender, &partition, terms).await,
            Op::Withdraw { lender, partition } => self.withdraw(lender, &partition).await,
            Op::Find {
                borrower,
                requirements,
            } => self.find(borrower, &requirements).await,
            Op::LeaseNamed {
                borrower,
                partition,
                allow_unisolated,
            } => {
                let request = leasehold_api::LeaseRequest {
                    partition: Some(partition.to_string()),
                    best: None,
                    allow_unisolated,
                    start: None,
                    end: None,
                };
                let expect = self.model.expect_lease_named(&partition, allow_unisolated);
                self.lease(borrower, request, expect).await
            }
            Op::LeaseBest {
                borrower,
                requirements,
            } => {
                let expect = self.model.expect_lease_best(&requirements);
                let request = leasehold_api::LeaseRequest {
                    partition: None,
                    best: Some(requirements),
                    allow_unisolated: false,
                    start: None,
                    end: None,
                };
                self.lease(borrower, request, expect).await
            }
            Op::Release { borrower, lease_id } => self.release(borrower, lease_id).await,
            Op::AgentPull { host_id } => self.agent_pull(&host_id).await,
            Op::PresentKey { lease_id } => self.present_key(lease_id).await,
        }
    }

    fn choose_op(&mut self) -> Op {
        let borrower = self.rng.gen_range(0..self.borrowers);
        match self.rng.gen_range(0..100) {
            0..=5 => self.choose_register_host(),
            6..=19 => self.choose_put_partition(),
            20..=24 => {
                let partition = self.choose_partition();
                Op::Withdraw {
                    lender: self.lender_of_mostly(&partition.host_id),
                    partition,
                }
            }
            25..=34 => Op::Find {
                borrower,
                requirements: self.random_requirements(),
            },
            35..=52 => Op::LeaseNamed {
                borrower,
                partition: self.choose_partition(),
                allow_unisolated: self.rng.gen_ratio(1, 4),
            },
            53..=70 => Op::LeaseBest {
                borrower,
                requirements: self.random_requirements(),
            },
            71..=77 => self.choose_agent_pull(),
            78..=85 => self.choose_present_key(),
            _ => self.choose_release(borrower),
        }
    }

    fn choose_register_host(&mut self) -> Op {
        let host_id = HOST_IDS
            .choose(&mut self.rng)
            .expect("host ids")
            .to_string();
        // Mostly the host's own lender; now and then another one, who
        // must be refused.
        let lender = match self.model.hosts.get(&host_id) {
            Some(host) if self.rng.gen_ratio(9, 10) => host.lender,
            _ => self.rng.gen_range(0..self.lenders),
        };
        Op::RegisterHost {
            lender,
            host_id,
            capacity: self.random_capacity(),
        }
    }

    fn choose_put_partition(&mut self) -> Op {
        let partition = self.choose_partition();
        let lender = self.lender_of_mostly(&partition.host_id);
        Op::PutPartition {
            lender,
            partition,
            terms: self.random_terms(),
        }
    }

    /// The host's lender nine times in ten, else any lender.
    fn lender_of_mostly(&mut self, host_id: &str) -> usize {
        match self.model.hosts.get(host_id) {
            Some(host) if self.rng.gen_ratio(9, 10) => host.lender,
            _ => self.rng.gen_range(0..self.lenders),
        }
    }

    fn choose_partition(&mut self) -> PartitionRef {
        let host_id = HOST_IDS.choose(&mut self.rng).expect("host ids");
        PartitionRef::new(*host_id, self.rng.gen_range(1..=MAX_INDEX))
    }

    /// A pull by the agent of a registered host (a find before any host).
    fn choose_agent_pull(&mut self) -> Op {
        let host_ids: Vec<&String> = self.model.hosts.keys().collect();
        match host_ids.choose(&mut self.rng) {
            Some(host_id) => Op::AgentPull {
                host_id: host_id.to_string(),
            },
            None => Op::Find {
                borrower: 0,
                requirements: Requirements::default(),
            },
        }
    }

    /// A key shown to its host's agent: mostly an active lease's, now and
    /// then a released one's (a borrower trying to keep running); a pull
    /// before any lease.
    fn choose_present_key(&mut self) -> Op {
        let active = self.model.active_lease_ids();
        let any: Vec<u64> = self.model.leases.keys().copied().collect();
        let pool = if !active.is_empty() && self.rng.gen_ratio(2, 3) {
            active
        } else {
            any
        };
        match pool.choose(&mut self.rng) {
            Some(lease_id) => Op::PresentKey {
                lease_id: *lease_id,
            },
            None => self.choose_agent_pull(),
        }
    }

    /// A release of one of the borrower's active leases; sometimes of a
    /// lease released before, or of another borrower's lease.
    fn choose_release(&mut self, borrower: usize) -> Op {
        let own_active = self.model.active_leases_of(borrower);
        let any: Vec<u64> = self.model.leases.keys().copied().collect();
        let lease_id = match (own_active.choose(&mut self.rng), self.rng.gen_ratio(1, 8)) {
            (Some(lease_id), false) => *lease_id,
            _ => match any.choose(&mut self.rng) {
                Some(lease_id) => *lease_id,
                None => {
                    return Op::LeaseBest {
                        borrower,
                        requirements: Requirements::default(),
                    }
                }
            },
        };
        Op::Release { borrower, lease_id }
    }

    fn random_capacity(&mut self) -> HostCapacity {
        let cpu_centicores = [400, 800, 1_600][self.rng.gen_range(0..3)];
        let memory_mib = [4_096, 8_192][self.rng.gen_range(0..2)];
        let disk_gib = [32, 64][self.rng.gen_range(0..2)];
        let owner_share = self.rng.gen_ratio(1, 2);
        HostCapacity {
            cpu_centicores,
            memory_mib,
            disk_gib,
            owner_share_cpu_centicores: if owner_share { 100 } else { 0 },
            owner_share_memory_mib: if owner_share { 1_024 } else { 0 },
            owner_share_disk_gib: if owner_share { 8 } else { 0 },
        }
    }

    fn random_terms(&mut self) -> Terms {
        let image_count = self.rng.gen_range(1..=2);
        let mut images: Vec<String> = IMAGES[..3]
            .choose_multiple(&mut self.rng, image_count)
            .map(|i| i.to_string())
            .collect();
        images.sort();
        let isolation = match self.rng.gen_range(0..10) {
            0 => None,
            1 => Some(Isolation::None),
            2..=4 => Some(Isolation::Container),
            _ => Some(Isolation::Simulated),
        };
        let mut terms = Terms {
            vcpus: self.rng.gen_range(1..=4),
            cpu_cap_percent: [25, 50, 100][self.rng.gen_range(0..3)],
            memory_mib: [256, 512, 1_024, 2_048][self.rng.gen_range(0..4)],
            disk_gib: self.rng.gen_range(1..=8),
            images,
            price_per_hour_micros: [0, 1_000, 50_000, 1_000_000, 3_600_000, 7_777_777]
                [self.rng.gen_range(0..6)],
            isolation,
        };
        if self.rng.gen_ratio(1, 15) {
            self.break_terms(&mut terms);
        }
        terms
    }

    /// Bad input, which must be refused with a 400 naming the field and
    /// change nothing.
    fn break_terms(&mut self, terms: &mut Terms) {
        match self.rng.gen_range(0..6) {
            0 => terms.vcpus = 0,
            1 => terms.cpu_cap_percent = 101,
            2 => terms.memory_mib = 0,
            3 => terms.disk_gib = 0,
            4 => terms.images.clear(),
            _ => terms.price_per_hour_micros = leasehold_core::money::MAX_PRICE_PER_HOUR_MICROS + 1,
        }
    }

    fn random_requirements(&mut self) -> Requirements {
        let maybe = |rng: &mut rand::rngs::StdRng| rng.gen_ratio(1, 4);
        let rng = &mut self.rng;
        let mut requirements = Requirements {
            min_vcpus: maybe(rng).then(|| rng.gen_range(1..=4)),
            min_cpu_cap_percent: maybe(rng).then(|| [25, 50, 100][rng.gen_range(0..3)]),
            min_memory_mib: maybe(rng).then(|| [256, 1_024, 2_048][rng.gen_range(0..3)]),
            min_disk_gib: maybe(rng).then(|| rng.gen_range(1..=8)),
            image: maybe(rng).then(|| IMAGES.choose(rng).expect("images").to_string()),
            max_price_per_hour_micros: maybe(rng)
                .then(|| [0, 50_000, 3_600_000][rng.gen_range(0..3)]),
            allow_unisolated: rng.gen_ratio(1, 5),
        };
        // Now and then bad input, refused with a 400 naming the field.
        match self.rng.gen_range(0..30) {
            0 => requirements.min_vcpus = Some(0),
            1 => requirements.min_cpu_cap_percent = Some(101),
            _ => {}
        }
        requirements
    }

    /// Classifies an answer with the fault that fired for it: a server
    /// error is expected exactly when a fault fired.
    pub(super) fn classify<T>(&mut self, answer: Answer<T>) -> Result<Outcome<T>, String> {
        let fired = self.faults.take_fired();
        match fired {
            Some(Fault::CrashBeforeCommit) => self.counters.crashes_before_commit += 1,
            Some(Fault::AckLost) => self.counters.acks_lost += 1,
            None => {}
        }
        match (answer, fired) {
            (Err(refusal), Some(fault)) if refusal.is_unknown_outcome() => {
                self.counters.unknown_outcomes += 1;
                self.record(format!("-> {refusal}: outcome unknown ({fault:?})"));
                Ok(Outcome::Unknown(fault))
            }
            (Err(refusal), None) if refusal.is_unknown_outcome() => Err(format!(
                "the broker answered {refusal} with no fault injected"
            )),
            (Ok(_), Some(fault)) => Err(format!(
                "the broker answered success although its commit failed ({fault:?})"
            )),
            (Err(refusal), Some(fault)) => Err(format!(
                "the broker answered {refusal} although it tried to commit ({fault:?})"
            )),
            (answer, None) => Ok(Outcome::Known(answer)),
        }
    }

    /// Holds a refusal against the model's expectation.
    pub(super) fn accept_refusal<T: std::fmt::Debug>(
        &mut self,
        expect: &Expect<T>,
        refusal: &Refusal,
    ) -> Result<(), String> {
        self.record(format!("-> refused {refusal}"));
        let expected = |r: &&super::model::Refused| {
            r.code == refusal.code && (r.field.is_none() || r.field == refusal.field)
        };
        match expect {
            Expect::RefusedWith(refusals) if refusals.iter().any(|r| expected(&r)) => {
                self.counters.refusals += 1;
                Ok(())
            }
            _ => Err(format!(
                "the broker answered {refusal}; the model expected {expect:?}"
            )),
        }
    }

    /// Before resolving an unknown outcome the broker may crash again and
    /// time may pass.
    pub(super) async fn before_resolving(&mut self) -> Result<(), String> {
        if self.rng.gen_ratio(1, 3) {
            // The model does not know the outcome yet: no snapshot check.
            self.restart(false).await?;
        }
        if self.rng.gen_ratio(1, 2) {
            self.advance_clock();
        }
        Ok(())
    }
}
