//! Shares (seed 000, FIG. 12-15): the broker carves a partition of exactly
//! the asked size out of a host's share at lease time, priced per unit, and
//! gives it back on release.

use leasehold_core::command::{decide, BrokerCommand, LeaseTarget, Outcome, Refusal};
use leasehold_core::share::ShareOffer;
use leasehold_core::table::{Overlay, Principal, ResourceTable, TableView};
use leasehold_core::{HostCapacity, LeaseId, PartitionRef, Requirements, Role};

fn commit(table: &mut ResourceTable, command: BrokerCommand) -> Result<Outcome, Refusal> {
    let decision = decide(TableView::new(table, &Overlay::default()), &command, 1_000)?;
    for change in &decision.changes {
        table.apply(change);
    }
    Ok(decision.outcome)
}

fn share(first_index: u32) -> ShareOffer {
    ShareOffer {
        images: vec!["busybox".into()],
        price_per_vcpu_hour_micros: 10_000,
        price_per_memory_gib_hour_micros: 2_000,
        price_per_disk_gib_hour_micros: 100,
        first_index,
        last_index: first_index + 99,
        isolation: None,
    }
}

/// Host `h` of lender `ann` gives this broker 4 vCPUs, 8 GiB and 20 GiB.
fn market_with_share() -> ResourceTable {
    let mut table = ResourceTable::default();
    for (name, role) in [("ann", Role::Lender), ("bob", Role::Borrower)] {
        commit(
            &mut table,
            BrokerCommand::CreatePrincipal {
                name: name.into(),
                role,
                token_sha256: format!("hash-{name}"),
            },
        )
        .unwrap();
    }
    commit(
        &mut table,
        BrokerCommand::RegisterHost {
            lender: "ann".into(),
            host_id: "h".into(),
            agent_url: None,
            capacity: HostCapacity {
                cpu_centicores: 400,
                memory_mib: 8192,
                disk_gib: 20,
                owner_share_cpu_centicores: 0,
                owner_share_memory_mib: 0,
                owner_share_disk_gib: 0,
            },
            share: Some(share(1000)),
        },
    )
    .unwrap();
    table
}

fn sized(vcpus: u32, memory_mib: u64, disk_gib: u64) -> Requirements {
    Requirements {
        min_vcpus: Some(vcpus),
        min_memory_mib: Some(memory_mib),
        min_disk_gib: Some(disk_gib),
        allow_unisolated: true,
        ..Requirements::default()
    }
}

fn lease(table: &mut ResourceTable, requirements: Requirements) -> Result<Outcome, Refusal> {
    commit(
        table,
        BrokerCommand::Lease {
            borrower: "bob".into(),
            target: LeaseTarget::Best(requirements),
            idempotency_key: None,
            key_ttl_ms: 60_000,
            window: None,
        },
    )
}

fn release(table: &mut ResourceTable, lease_id: LeaseId) {
    commit(
        table,
        BrokerCommand::Release {
            releaser: Principal {
                name: "bob".into(),
                role: Role::Borrower,
                host_scope: None,
            },
            lease_id,
            commission_basis_points: 0,
        },
    )
    .unwrap();
}

#[test]
fn three_sizes_are_carved_exactly_priced_per_unit_and_given_back() {
    let mut table = market_with_share();
    let mut leases = Vec::new();
    for (vcpus, memory, disk) in [(1, 1024, 2), (2, 2048, 4), (1, 4096, 10)] {
        match lease(&mut table, sized(vcpus, memory, disk)).unwrap() {
            Outcome::Leased { lease, .. } => {
                assert_eq!(lease.terms.vcpus, vcpus);
                assert_eq!(lease.terms.memory_mib, memory);
                assert_eq!(lease.terms.disk_gib, disk);
                let expected = vcpus as u64 * 10_000 + memory * 2_000 / 1024 + disk * 100;
                assert_eq!(lease.terms.price_per_hour_micros, expected);
                assert!(share(1000).contains(lease.partition.index));
                leases.push(lease);
            }
            other => panic!("not leased: {other:?}"),
        }
    }
    let indexes: Vec<u32> = leases.iter().map(|l| l.partition.index).collect();
    assert_eq!(indexes, vec![1000, 1001, 1002]);
    // 4 of 4 vCPUs are carved: a fourth lease finds no room, and says why.
    match lease(&mut table, sized(1, 512, 1)) {
        Err(Refusal::NoMatch(explanation)) => {
            assert_eq!(explanation.shares.len(), 1);
            assert!(
                explanation.shares[0].reason.contains("vcpus"),
                "{:?}",
                explanation.shares
            );
        }
        other => panic!("expected no match, got {other:?}"),
    }
    release(&mut table, leases[1].lease_id);
    let entry = &table.partitions[&PartitionRef::new("h", 1001)];
    assert!(
        entry.withdrawn,
        "a released carved partition goes back to the share"
    );
    // The freed room is carved again, at the index given back, one epoch on.
    match lease(&mut table, sized(2, 512, 1)).unwrap() {
        Outcome::Leased { lease, .. } => {
            assert_eq!(lease.partition.index, 1001);
            assert_eq!(lease.epoch, leases[1].epoch + 1);
            assert_eq!(lease.terms.memory_mib, 512);
        }
        other => panic!("not leased: {other:?}"),
    }
}

#[test]
fn a_request_larger_than_the_share_is_no_match_with_the_reason() {
    let mut table = market_with_share();
    match lease(&mut table, sized(1, 9000, 1)) {
        Err(Refusal::NoMatch(explanation)) => {
            assert_eq!(explanation.shares[0].host_id, "h");
            assert!(
                explanation.shares[0].reason.contains("memory"),
                "{:?}",
                explanation.shares
            );
        }
        other => panic!("expected no match, got {other:?}"),
    }
    assert!(table.active_leases.is_empty());
}

#[test]
fn the_lender_cannot_register_a_fixed_partition_in_the_carving_range() {
    let mut table = market_with_share();
    let refused = commit(
        &mut table,
        BrokerCommand::PutPartition {
            lender: "ann".into(),
            partition: PartitionRef::new("h", 1005),
            terms: leasehold_core::Terms {
                vcpus: 1,
                cpu_cap_percent: 100,
                memory_mib: 512,
                disk_gib: 1,
                images: vec!["busybox".into()],
                price_per_hour_micros: 100,
                isolation: None,
            },
        },
    );
    match refused {
        Err(Refusal::Invalid(error)) => assert_eq!(error.field, "index"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn an_unisolated_share_needs_the_borrowers_opt_in() {
    let mut table = market_with_share();
    let mut wanted = sized(1, 512, 1);
    wanted.allow_unisolated = false;
    assert!(matches!(
        lease(&mut table, wanted),
        Err(Refusal::NoMatch(_))
    ));
}

#[test]
fn a_share_cannot_shrink_below_or_move_away_from_its_partitions_in_use() {
    let mut table = market_with_share();
    let leased = lease(&mut table, sized(2, 4096, 4)).unwrap();
    let register = |vcpus: u64, share: Option<ShareOffer>| BrokerCommand::RegisterHost {
        lender: "ann".into(),
        host_id: "h".into(),
        agent_url: None,
        capacity: HostCapacity {
            cpu_centicores: vcpus * 100,
            memory_mib: 8192,
            disk_gib: 20,
            owner_share_cpu_centicores: 0,
            owner_share_memory_mib: 0,
            owner_share_disk_gib: 0,
        },
        share,
    };
    let refused = |outcome: Result<Outcome, Refusal>, field: &str| match outcome {
        Err(Refusal::Invalid(error)) => assert!(error.field.starts_with(field), "{error:?}"),
        other => panic!("expected a refusal of {field}, got {other:?}"),
    };
    refused(
        commit(&mut table, register(1, Some(share(1000)))),
        "capacity.vcpus",
    );
    refused(
        commit(&mut table, register(4, Some(share(5000)))),
        "share.first_index",
    );
    refused(commit(&mut table, register(4, None)), "share");
    // Growing it is fine; once the partition is given back, anything is.
    commit(&mut table, register(8, Some(share(1000)))).unwrap();
    if let Outcome::Leased { lease, .. } = leased {
        release(&mut table, lease.lease_id);
    }
    commit(&mut table, register(1, Some(share(5000)))).unwrap();
    // Finds look only at hosts lending a share: the index follows.
    assert!(table.hosts_with_shares.contains("h"));
    commit(&mut table, register(4, None)).unwrap();
    assert!(table.hosts_with_shares.is_empty());
    let nothing = Overlay::default();
    let view = TableView::new(&table, &nothing);
    assert!(leasehold_core::share::share_quotes(view, &sized(1, 1024, 1), 10).is_empty());
    // A batch that gives the host a share shows it before it commits.
    let mut batch = Overlay::default();
    batch.apply(
        &table,
        &leasehold_core::table::Change::PutHost {
            host: leasehold_core::table::HostRow {
                share: Some(share(1000)),
                ..table.hosts["h"].row.clone()
            },
            at_ms: 1,
        },
    );
    let view = TableView::new(&table, &batch);
    assert_eq!(view.hosts_with_shares().count(), 1);
}
