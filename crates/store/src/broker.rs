//! The broker's resource table (FIG. 3), principals, leases and ledger.

use crate::sqlite::SqliteEngine;
use crate::{broker_sql, BrokerStore};
use crate::{migrate::migrate, open_connection, Durability, StoreResult};
use leasehold_core::calendar::{Booking, Interval};
use leasehold_core::lease::Lease;
use leasehold_core::ledger::Transfer;
use leasehold_core::reservation::moves::{MoveTarget, PowerState};
use leasehold_core::reservation::{Pool, ReservationChange, Workload};
use leasehold_core::rights::ShareGroup;
use leasehold_core::table::Change;
pub use leasehold_core::table::{HostCredentialRow, HostRow, PartitionRow};
use leasehold_core::PartitionRef;
use std::collections::HashMap;
use std::path::Path;

/// The asset of every transfer made today; usage rights come later as
/// other assets in the same ledger.
pub const MONEY_ASSET: &str = "money";

/// The SQLite schema, one migration per step (`PRAGMA user_version`). The
/// PostgreSQL schema (`postgres::MIGRATIONS`) is the same, translated.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE principals (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    created_at_ms INTEGER NOT NULL
);
CREATE TABLE hosts (
    host_id TEXT PRIMARY KEY,
    lender TEXT NOT NULL REFERENCES principals(name),
    agent_url TEXT,
    capacity_json TEXT NOT NULL,
    registered_at_ms INTEGER NOT NULL
);
CREATE TABLE partitions (
    host_id TEXT NOT NULL REFERENCES hosts(host_id),
    idx INTEGER NOT NULL,
    terms_json TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    lease_id INTEGER,
    withdrawn INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (host_id, idx)
);
CREATE TABLE leases (
    lease_id INTEGER PRIMARY KEY,
    host_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    borrower TEXT NOT NULL,
    lender TEXT NOT NULL,
    terms_json TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    started_at_ms INTEGER NOT NULL,
    key_expires_at_ms INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('active', 'released')),
    release_requested_at_ms INTEGER,
    charge_micros INTEGER
);
CREATE INDEX leases_by_borrower ON leases (borrower, lease_id);
CREATE INDEX leases_by_lender ON leases (lender, lease_id);
CREATE INDEX leases_active ON leases (state) WHERE state = 'active';
-- At most one active lease per partition, enforced by the database too.
CREATE UNIQUE INDEX one_active_lease_per_partition ON leases (host_id, idx) WHERE state = 'active';
CREATE TABLE transfers (
    transfer_id INTEGER PRIMARY KEY AUTOINCREMENT,
    lease_id INTEGER NOT NULL REFERENCES leases(lease_id),
    debit_account TEXT NOT NULL,
    credit_account TEXT NOT NULL,
    amount_micros INTEGER NOT NULL CHECK (amount_micros > 0),
    at_ms INTEGER NOT NULL
);
-- A lease is billed once: one transfer per lease and credited account.
CREATE UNIQUE INDEX transfers_once_per_lease ON transfers (lease_id, credit_account);
CREATE INDEX transfers_by_debit ON transfers (debit_account);
CREATE INDEX transfers_by_credit ON transfers (credit_account);
CREATE TABLE idempotency (
    principal TEXT NOT NULL,
    key TEXT NOT NULL,
    status INTEGER NOT NULL,
    body TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (principal, key)
);
"#,
    r#"
-- Release notices not yet acknowledged by their agent (the outbox). A row is
-- written in the same transaction as its release, so a crash cannot lose it.
CREATE TABLE notice_outbox (
    lease_id INTEGER PRIMARY KEY REFERENCES leases(lease_id),
    host_id TEXT NOT NULL,
    notice TEXT NOT NULL,
    key_expires_at_ms INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL
);
-- Every release notice whose key may still be in use, for agents to pull;
-- seq orders them by release, so an agent asks for what came after the last
-- one it saw.
CREATE TABLE revocations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    lease_id INTEGER NOT NULL UNIQUE REFERENCES leases(lease_id),
    host_id TEXT NOT NULL,
    notice TEXT NOT NULL,
    key_expires_at_ms INTEGER NOT NULL
);
CREATE INDEX revocations_by_host ON revocations (host_id, seq);
CREATE INDEX revocations_by_expiry ON revocations (key_expires_at_ms);
"#,
    r#"
-- Host credentials: a token that acts for its lender on one host only, so
-- a token leaked from one host cannot act for the lender's other hosts.
CREATE TABLE host_credentials (
    token_sha256 TEXT PRIMARY KEY,
    lender TEXT NOT NULL REFERENCES principals(name),
    host_id TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
);
"#,
    r#"
-- The ledger holds more than money: balances are per (account, asset).
ALTER TABLE transfers ADD COLUMN asset TEXT NOT NULL DEFAULT 'money';
-- A lease is billed once per asset: one transfer per lease, credited account
-- and asset.
DROP INDEX transfers_once_per_lease;
CREATE UNIQUE INDEX transfers_once_per_lease ON transfers (lease_id, credit_account, asset);
-- Fenced leases (leadership of a broker or a rights manager): one row per
-- name; the epoch grows each time the lease changes hands or lapses.
CREATE TABLE fenced_leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL
);
"#,
    r#"
-- Each partition's calendar: the intervals it is leased or reserved for,
-- [from_ms, to_ms) or open-ended (to_ms NULL); over intervals are deleted
-- (a lease's history is its row in leases). Today's active leases are
-- open-ended intervals from their start.
CREATE TABLE partition_intervals (
    host_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('leased', 'reserved')),
    holder_id INTEGER NOT NULL,
    from_ms INTEGER NOT NULL,
    to_ms INTEGER,
    PRIMARY KEY (host_id, idx, from_ms)
);
CREATE UNIQUE INDEX partition_intervals_by_holder ON partition_intervals (kind, holder_id);
INSERT INTO partition_intervals (host_id, idx, kind, holder_id, from_ms, to_ms)
    SELECT host_id, idx, 'leased', lease_id, started_at_ms, NULL FROM leases WHERE state = 'active';
"#,
    r#"
-- Seed 003: workloads (their spec as JSON), their acquisition pools (a
-- pool's row of FIG. 3 as JSON, the workload beside it for deletion) and
-- the planner's count of fruitless rounds per demand. Hosts' samples are
-- not stored: agents send one every interval.
CREATE TABLE workloads (
    name TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
CREATE TABLE acquisition_pools (
    pool_id INTEGER PRIMARY KEY,
    workload TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX acquisition_pools_by_workload ON acquisition_pools (workload);
CREATE TABLE fruitless_rounds (
    demand TEXT PRIMARY KEY,
    rounds INTEGER NOT NULL
);
-- Demands being moved to another host (FIG. 15) and hosts powered down
-- (FIG. 17), as JSON beside their keys.
CREATE TABLE reservation_moves (
    demand TEXT PRIMARY KEY,
    target TEXT NOT NULL
);
CREATE TABLE host_power (
    host_id TEXT PRIMARY KEY,
    state TEXT NOT NULL
);
-- Seed 004: each share group's rights table as JSON, with a version for
-- compare-and-swap between the group's managers.
CREATE TABLE share_groups (
    name TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    version INTEGER NOT NULL
);
-- A lease booked ahead for a window ends (billing and key) at ends_at_ms.
ALTER TABLE leases ADD COLUMN ends_at_ms INTEGER;
"#,
    r#"
-- Seed 004: movements of assets other than lease money (usage rights),
-- double entry like transfers, without a lease; written with the share
-- group's table in one transaction.
CREATE TABLE asset_movements (
    movement_id INTEGER PRIMARY KEY AUTOINCREMENT,
    asset TEXT NOT NULL,
    debit_account TEXT NOT NULL,
    credit_account TEXT NOT NULL,
    amount INTEGER NOT NULL CHECK (amount > 0),
    at_ms INTEGER NOT NULL
);
CREATE INDEX asset_movements_by_asset ON asset_movements (asset, movement_id);
"#,
    r#"
-- Seed 000, FIG. 12-15: a host may give this broker a share to carve
-- partitions from at lease time instead of fixed partitions (JSON of
-- leasehold_core::share::ShareOffer; NULL for fixed partitions).
ALTER TABLE hosts ADD COLUMN share_json TEXT;
"#,
];

/// One write of the broker; a batch of them commits atomically.
#[derive(Debug, Clone)]
pub enum BrokerWrite {
    /// Fails the whole batch unless `holder` still holds the fenced lease
    /// `name` at `epoch`: a broker that lost its leadership to a newer
    /// epoch can change nothing, whatever it believes. Put first in a
    /// batch; it locks the lease's row until the batch commits, so a
    /// take-over waits for the batch or the batch sees the new epoch.
    CheckFence {
        name: String,
        holder: String,
        epoch: u64,
    },
    PutMeta {
        key: String,
        value: String,
    },
    /// Removes a meta row (with secure_delete on, its bytes are zeroed).
    DeleteMeta {
        key: String,
    },
    InsertPrincipal {
        name: String,
        role: String,
        token_sha256: String,
        at_ms: u64,
    },
    InsertHostCredential {
        credential: HostCredentialRow,
        at_ms: u64,
    },
    UpsertHost {
        host: HostRow,
        at_ms: u64,
    },
    UpsertPartition(PartitionRow),
    InsertLease(Lease),
    UpdateLease(Lease),
    /// A money transfer.
    InsertTransfer(Transfer),
    /// A transfer of another asset (usage rights), in the same ledger.
    InsertAssetTransfer {
        asset: String,
        transfer: Transfer,
    },
    PutIdempotency {
        principal: String,
        key: String,
        status: u16,
        body: String,
        at_ms: u64,
    },
    /// A lease's signed release notice into the host's revocation list
    /// (until the key expires), for its agent to pull.
    InsertRevocation(ReleaseNoticeRow),
    /// The same notice into the outbox, until its agent acknowledges it.
    InsertOutboxNotice(ReleaseNoticeRow),
    /// The agent acknowledged the notice (or will never accept it).
    DeleteOutboxNotice {
        lease_id: u64,
    },
    /// Forgets idempotency records older than `before_ms`.
    PruneIdempotency {
        before_ms: u64,
    },
    /// An interval booked in a partition's calendar.
    InsertInterval {
        partition: PartitionRef,
        interval: Interval,
    },
    /// A change of seed 003's reservation book.
    Reservation(ReservationChange),
    /// A booking's interval is over (its lease was released).
    DeleteInterval {
        partition: PartitionRef,
        booking: Booking,
    },
}

impl BrokerWrite {
    /// The one place where a state change of the broker becomes the rows
    /// that persist it.
    pub fn extend_from_change(writes: &mut Vec<BrokerWrite>, change: &Change) {
        match change {
            Change::AddPrincipal {
                name,
                role,
                token_sha256,
                at_ms,
            } => writes.push(BrokerWrite::InsertPrincipal {
                name: name.clone(),
                role: role.as_str().to_string(),
                token_sha256: token_sha256.clone(),
                at_ms: *at_ms,
            }),
            Change::AddHostCredential { credential, at_ms } => {
                writes.push(BrokerWrite::InsertHostCredential {
                    credential: credential.clone(),
                    at_ms: *at_ms,
                })
            }
            Change::PutHost { host, at_ms } => writes.push(BrokerWrite::UpsertHost {
                host: host.clone(),
                at_ms: *at_ms,
            }),
            Change::PutPartition(row) => writes.push(BrokerWrite::UpsertPartition(row.clone())),
            Change::StartLease(lease) => writes.push(BrokerWrite::InsertLease(lease.clone())),
            Change::EndLease {
                lease, transfers, ..
            } => {
                writes.push(BrokerWrite::UpdateLease(lease.clone()));
                writes.extend(transfers.iter().cloned().map(BrokerWrite::InsertTransfer));
            }
            Change::RememberIdempotency {
                principal,
                key,
                lease_id,
                at_ms,
            } => writes.push(BrokerWrite::PutIdempotency {
                principal: principal.clone(),
                key: key.clone(),
                status: 201,
                body: lease_id.to_string(),
                at_ms: *at_ms,
            }),
            Change::ForgetIdempotency { before_ms } => writes.push(BrokerWrite::PruneIdempotency {
                before_ms: *before_ms,
            }),
            Change::Book {
                partition,
                interval,
            } => writes.push(BrokerWrite::InsertInterval {
                partition: partition.clone(),
                interval: *interval,
            }),
            Change::Unbook { partition, booking } => writes.push(BrokerWrite::DeleteInterval {
                partition: partition.clone(),
                booking: *booking,
            }),
            Change::Reservation(change) => writes.push(BrokerWrite::Reservation(change.clone())),
            // Samples live in memory only (see the change).
            Change::RecordSample { .. } => {}
            Change::ForgetReleaseNotice { lease_id } => {
                writes.push(BrokerWrite::DeleteOutboxNotice {
                    lease_id: *lease_id,
                })
            }
        }
    }
}

/// A signed release notice and the lease it fences.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseNoticeRow {
    pub lease_id: u64,
    pub host_id: String,
    pub notice: String,
    pub key_expires_at_ms: u64,
    pub created_at_ms: u64,
}

/// One entry of a host's revocation list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationRow {
    pub seq: u64,
    pub lease_id: u64,
    pub notice: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrincipalRow {
    pub name: String,
    pub role: String,
    pub token_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRow {
    pub principal: String,
    pub key: String,
    pub status: u16,
    pub body: String,
    pub at_ms: u64,
}

/// The balance of one account in one asset (credits minus debits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetBalance {
    pub account: String,
    pub asset: String,
    pub balance: i64,
}

/// Everything the broker keeps in memory, read at start.
#[derive(Debug, Default)]
pub struct BrokerSnapshot {
    pub meta: HashMap<String, String>,
    pub principals: Vec<PrincipalRow>,
    pub host_credentials: Vec<HostCredentialRow>,
    pub hosts: Vec<HostRow>,
    pub partitions: Vec<PartitionRow>,
    pub active_leases: Vec<Lease>,
    pub last_lease_id: u64,
    pub idempotency: Vec<IdempotencyRow>,
    /// Every partition's calendar intervals.
    pub intervals: Vec<(PartitionRef, Interval)>,
    /// Seed 003's workloads, pools and fruitless-round counts.
    pub workloads: Vec<Workload>,
    pub pools: Vec<Pool>,
    pub fruitless_rounds: Vec<(String, u32)>,
    pub moves: Vec<(String, MoveTarget)>,
    pub host_power: Vec<(String, PowerState)>,
}

/// Which leases a query returns.
#[derive(Debug, Clone)]
pub enum LeaseFilter {
    All,
    Borrower(String),
    Lender(String),
}

/// The broker's SQLite database (the embedded default).
pub struct BrokerDb {
    engine: SqliteEngine,
}

impl BrokerDb {
    pub fn open(path: &Path, durability: Durability) -> StoreResult<Self> {
        let mut conn = open_connection(path, durability)?;
        migrate(&mut conn, MIGRATIONS)?;
        Ok(BrokerDb {
            engine: SqliteEngine::for_broker(conn)?,
        })
    }
}

impl BrokerStore for BrokerDb {
    fn apply(&mut self, writes: &[BrokerWrite]) -> StoreResult<()> {
        broker_sql::apply(&mut self.engine, writes)
    }

    fn load(&mut self) -> StoreResult<BrokerSnapshot> {
        broker_sql::load(&mut self.engine)
    }

    fn prune_idempotency(&mut self, before_ms: u64) -> StoreResult<usize> {
        broker_sql::prune_idempotency(&mut self.engine, before_ms)
    }

    fn pending_outbox(&mut self) -> StoreResult<Vec<ReleaseNoticeRow>> {
        broker_sql::pending_outbox(&mut self.engine)
    }

    fn revocations_after(
        &mut self,
        host_id: &str,
        after_seq: u64,
        now_ms: u64,
        limit: u32,
    ) -> StoreResult<Vec<RevocationRow>> {
        broker_sql::revocations_after(&mut self.engine, host_id, after_seq, now_ms, limit)
    }

    fn prune_expired_notices(&mut self, now_ms: u64) -> StoreResult<usize> {
        broker_sql::prune_expired_notices(&mut self.engine, now_ms)
    }

    fn lease(&mut self, lease_id: u64) -> StoreResult<Option<Lease>> {
        broker_sql::lease(&mut self.engine, lease_id)
    }

    fn leases(&mut self, filter: &LeaseFilter, limit: u32) -> StoreResult<Vec<Lease>> {
        broker_sql::leases(&mut self.engine, filter, limit)
    }

    fn transfers(
        &mut self,
        accounts: Option<&[String]>,
        limit: u32,
    ) -> StoreResult<Vec<(u64, Transfer)>> {
        broker_sql::transfers(&mut self.engine, accounts, limit)
    }

    fn lease_transfers(&mut self, lease_id: u64) -> StoreResult<Vec<Transfer>> {
        broker_sql::lease_transfers(&mut self.engine, lease_id)
    }

    fn balances(&mut self) -> StoreResult<Vec<(String, i64)>> {
        broker_sql::balances(&mut self.engine)
    }

    fn balances_by_asset(&mut self) -> StoreResult<Vec<AssetBalance>> {
        broker_sql::balances_by_asset(&mut self.engine)
    }

    fn acquire_lease(
        &mut self,
        name: &str,
        holder: &str,
        ttl_ms: u64,
        now_ms: u64,
    ) -> StoreResult<Option<u64>> {
        broker_sql::acquire_lease(&mut self.engine, name, holder, ttl_ms, now_ms)
    }

    fn release_lease(&mut self, name: &str, holder: &str) -> StoreResult<bool> {
        broker_sql::release_lease(&mut self.engine, name, holder)
    }

    fn asset_movements(&mut self, asset: &str, limit: u32) -> StoreResult<Vec<(u64, Transfer)>> {
        broker_sql::asset_movements(&mut self.engine, asset, limit)
    }

    fn lease_holder(&mut self, name: &str) -> StoreResult<Option<crate::LeaseHolder>> {
        broker_sql::lease_holder(&mut self.engine, name)
    }

    fn share_group(&mut self, name: &str) -> StoreResult<Option<(ShareGroup, u64)>> {
        broker_sql::share_group(&mut self.engine, name)
    }

    fn share_groups(&mut self, limit: u32) -> StoreResult<Vec<(ShareGroup, u64)>> {
        broker_sql::share_groups(&mut self.engine, limit)
    }

    fn put_share_group(
        &mut self,
        group: &ShareGroup,
        expected_version: u64,
        movements: &[Transfer],
    ) -> StoreResult<Option<u64>> {
        broker_sql::put_share_group(&mut self.engine, group, expected_version, movements)
    }
}

#[cfg(test)]
mod tests {
    // What both engines must do is in tests/conformance.rs; this is SQLite's
    // own upgrade path.
    use super::*;
    use rusqlite::Connection;

    #[test]
    fn a_database_from_before_assets_keeps_its_transfers_as_money() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.db");
        {
            let mut conn = Connection::open(&path).unwrap();
            migrate(&mut conn, &MIGRATIONS[..3]).unwrap();
            conn.execute_batch(
                "INSERT INTO leases VALUES (1, 'alpha', 1, 'bob', 'ann', '{}', 1, 0, 9, 'released', 5, 7);
                 INSERT INTO transfers (lease_id, debit_account, credit_account, amount_micros, at_ms)
                 VALUES (1, 'borrower:bob', 'lender:ann', 7, 5);",
            )
            .unwrap();
        }
        let mut db = BrokerDb::open(&path, Durability::Normal).unwrap();
        assert_eq!(
            db.balances_by_asset().unwrap(),
            vec![
                AssetBalance {
                    account: "borrower:bob".into(),
                    asset: MONEY_ASSET.into(),
                    balance: -7
                },
                AssetBalance {
                    account: "lender:ann".into(),
                    asset: MONEY_ASSET.into(),
                    balance: 7
                },
            ]
        );
        assert_eq!(db.lease_transfers(1).unwrap().len(), 1);
        assert_eq!(db.acquire_lease("leader", "a", 10, 0).unwrap(), Some(1));
    }

    #[test]
    fn a_database_from_before_calendars_books_its_active_leases() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.db");
        {
            let mut conn = Connection::open(&path).unwrap();
            migrate(&mut conn, &MIGRATIONS[..4]).unwrap();
            conn.execute_batch(
                "INSERT INTO leases VALUES (1, 'alpha', 1, 'bob', 'ann', '{}', 1, 0, 9, 'released', 5, 7);
                 INSERT INTO leases VALUES (2, 'alpha', 1, 'bob', 'ann', '{\"vcpus\":1,\"cpu_cap_percent\":100,\"memory_mib\":1,\"disk_gib\":1,\"images\":[],\"price_per_hour_micros\":1}', 2, 40, 90, 'active', NULL, NULL);",
            )
            .unwrap();
        }
        let mut db = BrokerDb::open(&path, Durability::Normal).unwrap();
        assert_eq!(
            db.load().unwrap().intervals,
            vec![(PartitionRef::new("alpha", 1), Interval::lease_from(2, 40))]
        );
    }
}
