//! The broker's in-memory resource table is `leasehold_core::table`'s
//! [`ResourceTable`]: pure data, changed only by the writer applying the
//! changes of committed batches. This module rebuilds it from the store at
//! start, through the same [`Change`]s the writer applies.

use crate::error::BrokerError;
use leasehold_core::reservation::{Pool, Workload};
use leasehold_core::table::{Change, ResourceTable};
use leasehold_core::Role;
use leasehold_store::broker::BrokerSnapshot;

pub use leasehold_core::command::LeaseTarget;
pub use leasehold_core::table::{HostEntry, PartitionEntry, Principal};

/// The committed resource table the readers share with the writer.
pub type BrokerState = ResourceTable;

/// Rebuilds the table from what the store holds.
pub fn table_from_snapshot(snapshot: BrokerSnapshot) -> Result<ResourceTable, BrokerError> {
    let mut table = ResourceTable {
        last_lease_id: snapshot.last_lease_id,
        ..Default::default()
    };
    for principal in snapshot.principals {
        let role: Role = principal
            .role
            .parse()
            .map_err(|error| BrokerError::Internal(format!("in the principals table: {error}")))?;
        table.apply(&Change::AddPrincipal {
            name: principal.name,
            role,
            token_sha256: principal.token_sha256,
            at_ms: 0,
        });
    }
    for credential in snapshot.host_credentials {
        table.apply(&Change::AddHostCredential {
            credential,
            at_ms: 0,
        });
    }
    for host in snapshot.hosts {
        table.apply(&Change::PutHost { host, at_ms: 0 });
    }
    for row in snapshot.partitions {
        table.apply(&Change::PutPartition(row));
    }
    for lease in snapshot.active_leases {
        table.apply(&Change::StartLease(lease));
    }
    for (partition, interval) in snapshot.intervals {
        table.apply(&Change::Book {
            partition,
            interval,
        });
    }
    for record in snapshot.idempotency {
        // Only lease requests are remembered; their body is the lease id.
        if let Ok(lease_id) = record.body.parse::<u64>() {
            table.apply(&Change::RememberIdempotency {
                principal: record.principal,
                key: record.key,
                lease_id,
                at_ms: record.at_ms,
            });
        }
    }
    load_reservations(
        &mut table,
        snapshot.workloads,
        snapshot.pools,
        snapshot.fruitless_rounds,
    );
    load_moves_and_power(&mut table, snapshot.moves, snapshot.host_power);
    Ok(table)
}

/// Demands being moved and hosts powered down (seed 003).
fn load_moves_and_power(
    table: &mut BrokerState,
    moves: Vec<(String, leasehold_core::reservation::moves::MoveTarget)>,
    host_power: Vec<(String, leasehold_core::reservation::moves::PowerState)>,
) {
    use leasehold_core::reservation::ReservationChange as R;
    for (demand, target) in moves {
        table.apply(&Change::Reservation(R::SetMove {
            demand,
            target: Some(target),
        }));
    }
    for (host_id, state) in host_power {
        table.apply(&Change::Reservation(R::SetHostPower {
            host_id,
            state: Some(state),
        }));
    }
}

/// Seed 003's book, through the same changes the writer applies.
fn load_reservations(
    table: &mut BrokerState,
    workloads: Vec<Workload>,
    pools: Vec<Pool>,
    fruitless_rounds: Vec<(String, u32)>,
) {
    use leasehold_core::reservation::ReservationChange as R;
    for workload in workloads {
        table.apply(&Change::Reservation(R::PutWorkload(workload)));
    }
    for pool in pools {
        table.apply(&Change::Reservation(R::PutPool(pool)));
    }
    for (demand, rounds) in fruitless_rounds {
        table.apply(&Change::Reservation(R::SetFruitlessRounds {
            demand,
            rounds,
        }));
    }
}
