//! The broker's resource table (FIG. 3), principals, leases and ledger.

use crate::{corrupt, migrate::migrate, open_connection, Durability, StoreResult};
use leasehold_core::lease::{Lease, LeaseState};
use leasehold_core::ledger::Transfer;
use leasehold_core::{HostCapacity, PartitionRef, Terms};
use rusqlite::{params, Connection, OptionalExtension, Row};
use std::collections::HashMap;
use std::path::Path;

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
];

/// One write of the broker; a batch of them commits atomically.
#[derive(Debug, Clone)]
pub enum BrokerWrite {
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
    InsertTransfer(Transfer),
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

/// A token that acts for `lender` on `host_id` only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCredentialRow {
    pub token_sha256: String,
    pub lender: String,
    pub host_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRow {
    pub host_id: String,
    pub lender: String,
    pub agent_url: Option<String>,
    pub capacity: HostCapacity,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionRow {
    pub partition: PartitionRef,
    pub terms: Terms,
    pub epoch: u64,
    pub lease_id: Option<u64>,
    pub withdrawn: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRow {
    pub principal: String,
    pub key: String,
    pub status: u16,
    pub body: String,
    pub at_ms: u64,
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
}

pub struct BrokerDb {
    conn: Connection,
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("domain values serialize")
}

fn from_json<T: serde::de::DeserializeOwned>(table: &'static str, text: &str) -> StoreResult<T> {
    serde_json::from_str(text).map_err(|e| corrupt(table, e))
}

fn lease_from_row(row: &Row<'_>) -> rusqlite::Result<(Lease, String)> {
    let state: String = row.get(9)?;
    let terms_json: String = row.get(5)?;
    Ok((
        Lease {
            lease_id: row.get::<_, i64>(0)? as u64,
            partition: PartitionRef::new(row.get::<_, String>(1)?, row.get::<_, i64>(2)? as u32),
            borrower: row.get(3)?,
            lender: row.get(4)?,
            terms: Terms {
                vcpus: 0,
                cpu_cap_percent: 0,
                memory_mib: 0,
                disk_gib: 0,
                images: vec![],
                price_per_hour_micros: 0,
                isolation: None,
            },
            epoch: row.get::<_, i64>(6)? as u64,
            started_at_ms: row.get::<_, i64>(7)? as u64,
            key_expires_at_ms: row.get::<_, i64>(8)? as u64,
            state: if state == "active" {
                LeaseState::Active
            } else {
                LeaseState::Released
            },
            release_requested_at_ms: row.get::<_, Option<i64>>(10)?.map(|v| v as u64),
            charge_micros: row.get::<_, Option<i64>>(11)?.map(|v| v as u64),
        },
        terms_json,
    ))
}

const LEASE_COLUMNS: &str = "lease_id, host_id, idx, borrower, lender, terms_json, epoch, started_at_ms, key_expires_at_ms, state, release_requested_at_ms, charge_micros";

fn finish_lease((mut lease, terms_json): (Lease, String)) -> StoreResult<Lease> {
    lease.terms = from_json("leases", &terms_json)?;
    Ok(lease)
}

fn state_text(state: LeaseState) -> &'static str {
    match state {
        LeaseState::Active => "active",
        LeaseState::Released => "released",
    }
}

/// Which leases a query returns.
#[derive(Debug, Clone)]
pub enum LeaseFilter {
    All,
    Borrower(String),
    Lender(String),
}

impl BrokerDb {
    pub fn open(path: &Path, durability: Durability) -> StoreResult<Self> {
        let mut conn = open_connection(path, durability)?;
        migrate(&mut conn, MIGRATIONS)?;
        Ok(BrokerDb { conn })
    }

    /// Applies a batch in one transaction: all or nothing, one commit.
    pub fn apply(&mut self, writes: &[BrokerWrite]) -> StoreResult<()> {
        let tx = self.conn.transaction()?;
        for write in writes {
            apply_one(&tx, write)?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn load(&self) -> StoreResult<BrokerSnapshot> {
        let mut snapshot = BrokerSnapshot::default();
        let mut statement = self.conn.prepare("SELECT key, value FROM meta")?;
        for row in statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))? {
            let (k, v): (String, String) = row?;
            snapshot.meta.insert(k, v);
        }
        let mut statement = self
            .conn
            .prepare("SELECT name, role, token_sha256 FROM principals")?;
        for row in statement.query_map([], |r| {
            Ok(PrincipalRow {
                name: r.get(0)?,
                role: r.get(1)?,
                token_sha256: r.get(2)?,
            })
        })? {
            snapshot.principals.push(row?);
        }
        let mut statement = self
            .conn
            .prepare("SELECT token_sha256, lender, host_id FROM host_credentials")?;
        for row in statement.query_map([], |r| {
            Ok(HostCredentialRow {
                token_sha256: r.get(0)?,
                lender: r.get(1)?,
                host_id: r.get(2)?,
            })
        })? {
            snapshot.host_credentials.push(row?);
        }
        let mut statement = self
            .conn
            .prepare("SELECT host_id, lender, agent_url, capacity_json FROM hosts")?;
        let rows = statement.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?;
        for row in rows {
            let (host_id, lender, agent_url, capacity_json) = row?;
            snapshot.hosts.push(HostRow {
                host_id,
                lender,
                agent_url,
                capacity: from_json("hosts", &capacity_json)?,
            });
        }
        let mut statement = self.conn.prepare(
            "SELECT host_id, idx, terms_json, epoch, lease_id, withdrawn FROM partitions",
        )?;
        let rows = statement.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, bool>(5)?,
            ))
        })?;
        for row in rows {
            let (host_id, idx, terms_json, epoch, lease_id, withdrawn) = row?;
            snapshot.partitions.push(PartitionRow {
                partition: PartitionRef::new(host_id, idx as u32),
                terms: from_json("partitions", &terms_json)?,
                epoch: epoch as u64,
                lease_id: lease_id.map(|v| v as u64),
                withdrawn,
            });
        }
        let mut statement = self.conn.prepare(&format!(
            "SELECT {LEASE_COLUMNS} FROM leases WHERE state = 'active'"
        ))?;
        for row in statement.query_map([], lease_from_row)? {
            snapshot.active_leases.push(finish_lease(row?)?);
        }
        snapshot.last_lease_id =
            self.conn
                .query_row("SELECT COALESCE(MAX(lease_id), 0) FROM leases", [], |r| {
                    r.get::<_, i64>(0)
                })? as u64;
        let mut statement = self
            .conn
            .prepare("SELECT principal, key, status, body, at_ms FROM idempotency")?;
        for row in statement.query_map([], |r| {
            Ok(IdempotencyRow {
                principal: r.get(0)?,
                key: r.get(1)?,
                status: r.get::<_, i64>(2)? as u16,
                body: r.get(3)?,
                at_ms: r.get::<_, i64>(4)? as u64,
            })
        })? {
            snapshot.idempotency.push(row?);
        }
        Ok(snapshot)
    }

    /// Forgets idempotency records older than `before_ms`; keeps the table bounded.
    pub fn prune_idempotency(&mut self, before_ms: u64) -> StoreResult<usize> {
        Ok(self.conn.execute(
            "DELETE FROM idempotency WHERE at_ms < ?1",
            params![before_ms as i64],
        )?)
    }

    /// Release notices still waiting for their agent, oldest first.
    pub fn pending_outbox(&self) -> StoreResult<Vec<ReleaseNoticeRow>> {
        let mut statement = self.conn.prepare(
            "SELECT lease_id, host_id, notice, key_expires_at_ms, created_at_ms FROM notice_outbox ORDER BY created_at_ms, lease_id",
        )?;
        let rows = statement.query_map([], |r| {
            Ok(ReleaseNoticeRow {
                lease_id: r.get::<_, i64>(0)? as u64,
                host_id: r.get(1)?,
                notice: r.get(2)?,
                key_expires_at_ms: r.get::<_, i64>(3)? as u64,
                created_at_ms: r.get::<_, i64>(4)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The host's release notices after `after_seq` whose keys have not
    /// expired at `now_ms`, in release order, at most `limit`.
    pub fn revocations_after(
        &self,
        host_id: &str,
        after_seq: u64,
        now_ms: u64,
        limit: u32,
    ) -> StoreResult<Vec<RevocationRow>> {
        let mut statement = self.conn.prepare_cached(
            "SELECT seq, lease_id, notice FROM revocations
             WHERE host_id = ?1 AND seq > ?2 AND key_expires_at_ms > ?3 ORDER BY seq LIMIT ?4",
        )?;
        let rows = statement.query_map(
            params![host_id, after_seq as i64, now_ms as i64, limit as i64],
            |r| {
                Ok(RevocationRow {
                    seq: r.get::<_, i64>(0)? as u64,
                    lease_id: r.get::<_, i64>(1)? as u64,
                    notice: r.get(2)?,
                })
            },
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Forgets release notices whose keys expired before `now_ms`: such a
    /// key is refused anyway, so nothing is left to fence.
    pub fn prune_expired_notices(&mut self, now_ms: u64) -> StoreResult<usize> {
        let tx = self.conn.transaction()?;
        let outbox = tx.execute(
            "DELETE FROM notice_outbox WHERE key_expires_at_ms < ?1",
            params![now_ms as i64],
        )?;
        let listed = tx.execute(
            "DELETE FROM revocations WHERE key_expires_at_ms < ?1",
            params![now_ms as i64],
        )?;
        tx.commit()?;
        Ok(outbox + listed)
    }

    pub fn lease(&self, lease_id: u64) -> StoreResult<Option<Lease>> {
        let row = self
            .conn
            .query_row(
                &format!("SELECT {LEASE_COLUMNS} FROM leases WHERE lease_id = ?1"),
                params![lease_id as i64],
                lease_from_row,
            )
            .optional()?;
        row.map(finish_lease).transpose()
    }

    /// Leases, newest first, at most `limit`.
    pub fn leases(&self, filter: &LeaseFilter, limit: u32) -> StoreResult<Vec<Lease>> {
        let (clause, value) = match filter {
            LeaseFilter::All => ("1 = 1 OR ?1 IS NULL", None),
            LeaseFilter::Borrower(name) => ("borrower = ?1", Some(name.clone())),
            LeaseFilter::Lender(name) => ("lender = ?1", Some(name.clone())),
        };
        let mut statement = self.conn.prepare(&format!(
            "SELECT {LEASE_COLUMNS} FROM leases WHERE {clause} ORDER BY lease_id DESC LIMIT ?2"
        ))?;
        let rows = statement.query_map(params![value, limit as i64], lease_from_row)?;
        rows.map(|row| finish_lease(row?)).collect()
    }

    /// Transfers touching any of `accounts` (all when `None`), newest first.
    pub fn transfers(
        &self,
        accounts: Option<&[String]>,
        limit: u32,
    ) -> StoreResult<Vec<(u64, Transfer)>> {
        let mut statement = self.conn.prepare(
            "SELECT transfer_id, lease_id, debit_account, credit_account, amount_micros, at_ms FROM transfers ORDER BY transfer_id DESC",
        )?;
        let rows = statement.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                Transfer {
                    lease_id: r.get::<_, i64>(1)? as u64,
                    debit_account: r.get(2)?,
                    credit_account: r.get(3)?,
                    amount_micros: r.get::<_, i64>(4)? as u64,
                    at_ms: r.get::<_, i64>(5)? as u64,
                },
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, transfer) = row?;
            let wanted = accounts.is_none_or(|accounts| {
                accounts.contains(&transfer.debit_account)
                    || accounts.contains(&transfer.credit_account)
            });
            if wanted {
                out.push((id, transfer));
                if out.len() as u32 >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The transfers that settled one lease.
    pub fn lease_transfers(&self, lease_id: u64) -> StoreResult<Vec<Transfer>> {
        let mut statement = self.conn.prepare_cached(
            "SELECT lease_id, debit_account, credit_account, amount_micros, at_ms FROM transfers WHERE lease_id = ?1 ORDER BY transfer_id",
        )?;
        let rows = statement.query_map(params![lease_id as i64], |r| {
            Ok(Transfer {
                lease_id: r.get::<_, i64>(0)? as u64,
                debit_account: r.get(1)?,
                credit_account: r.get(2)?,
                amount_micros: r.get::<_, i64>(3)? as u64,
                at_ms: r.get::<_, i64>(4)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Balance (credits minus debits) of each account, over the whole ledger.
    pub fn balances(&self) -> StoreResult<Vec<(String, i64)>> {
        let mut statement = self.conn.prepare(
            "SELECT account, SUM(amount) FROM (
                SELECT credit_account AS account, amount_micros AS amount FROM transfers
                UNION ALL
                SELECT debit_account AS account, -amount_micros AS amount FROM transfers
             ) GROUP BY account ORDER BY account",
        )?;
        let rows = statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn apply_one(tx: &Connection, write: &BrokerWrite) -> StoreResult<()> {
    match write {
        BrokerWrite::PutMeta { key, value } => {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )?;
        }
        BrokerWrite::DeleteMeta { key } => {
            tx.execute("DELETE FROM meta WHERE key = ?1", params![key])?;
        }
        BrokerWrite::InsertPrincipal {
            name,
            role,
            token_sha256,
            at_ms,
        } => {
            tx.execute(
                "INSERT INTO principals (name, role, token_sha256, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
                params![name, role, token_sha256, *at_ms as i64],
            )?;
        }
        BrokerWrite::InsertHostCredential { credential, at_ms } => {
            tx.execute(
                "INSERT INTO host_credentials (token_sha256, lender, host_id, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
                params![credential.token_sha256, credential.lender, credential.host_id, *at_ms as i64],
            )?;
        }
        BrokerWrite::UpsertHost { host, at_ms } => {
            tx.prepare_cached(
                "INSERT INTO hosts (host_id, lender, agent_url, capacity_json, registered_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(host_id) DO UPDATE SET agent_url = excluded.agent_url, capacity_json = excluded.capacity_json",
            )?
            .execute(params![host.host_id, host.lender, host.agent_url, json(&host.capacity), *at_ms as i64])?;
        }
        BrokerWrite::UpsertPartition(row) => {
            tx.prepare_cached(
                "INSERT INTO partitions (host_id, idx, terms_json, epoch, lease_id, withdrawn) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(host_id, idx) DO UPDATE SET terms_json = excluded.terms_json, epoch = excluded.epoch,
                 lease_id = excluded.lease_id, withdrawn = excluded.withdrawn",
            )?
            .execute(params![
                row.partition.host_id,
                row.partition.index as i64,
                json(&row.terms),
                row.epoch as i64,
                row.lease_id.map(|v| v as i64),
                row.withdrawn
            ])?;
        }
        BrokerWrite::InsertLease(lease) => {
            tx.prepare_cached(&format!(
                "INSERT INTO leases ({LEASE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
            ))?
            .execute(rusqlite::params_from_iter(lease_params(lease)))?;
        }
        BrokerWrite::UpdateLease(lease) => {
            tx.prepare_cached(
                "UPDATE leases SET state = ?2, release_requested_at_ms = ?3, charge_micros = ?4 WHERE lease_id = ?1",
            )?
            .execute(params![
                lease.lease_id as i64,
                state_text(lease.state),
                lease.release_requested_at_ms.map(|v| v as i64),
                lease.charge_micros.map(|v| v as i64)
            ])?;
        }
        BrokerWrite::InsertTransfer(transfer) => {
            tx.prepare_cached(
                "INSERT INTO transfers (lease_id, debit_account, credit_account, amount_micros, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                transfer.lease_id as i64,
                transfer.debit_account,
                transfer.credit_account,
                transfer.amount_micros as i64,
                transfer.at_ms as i64
            ])?;
        }
        BrokerWrite::PutIdempotency {
            principal,
            key,
            status,
            body,
            at_ms,
        } => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO idempotency (principal, key, status, body, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![principal, key, *status as i64, body, *at_ms as i64])?;
        }
        BrokerWrite::InsertOutboxNotice(row) => {
            tx.prepare_cached(
                "INSERT INTO notice_outbox (lease_id, host_id, notice, key_expires_at_ms, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                row.lease_id as i64,
                row.host_id,
                row.notice,
                row.key_expires_at_ms as i64,
                row.created_at_ms as i64
            ])?;
        }
        BrokerWrite::InsertRevocation(row) => {
            tx.prepare_cached(
                "INSERT INTO revocations (lease_id, host_id, notice, key_expires_at_ms) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![
                row.lease_id as i64,
                row.host_id,
                row.notice,
                row.key_expires_at_ms as i64
            ])?;
        }
        BrokerWrite::DeleteOutboxNotice { lease_id } => {
            tx.prepare_cached("DELETE FROM notice_outbox WHERE lease_id = ?1")?
                .execute(params![*lease_id as i64])?;
        }
    }
    Ok(())
}

fn lease_params(lease: &Lease) -> Vec<Box<dyn rusqlite::ToSql>> {
    vec![
        Box::new(lease.lease_id as i64),
        Box::new(lease.partition.host_id.clone()),
        Box::new(lease.partition.index as i64),
        Box::new(lease.borrower.clone()),
        Box::new(lease.lender.clone()),
        Box::new(json(&lease.terms)),
        Box::new(lease.epoch as i64),
        Box::new(lease.started_at_ms as i64),
        Box::new(lease.key_expires_at_ms as i64),
        Box::new(state_text(lease.state)),
        Box::new(lease.release_requested_at_ms.map(|v| v as i64)),
        Box::new(lease.charge_micros.map(|v| v as i64)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_core::ledger::Transfer;

    fn terms() -> Terms {
        Terms {
            vcpus: 1,
            cpu_cap_percent: 50,
            memory_mib: 256,
            disk_gib: 1,
            images: vec!["busybox".into()],
            price_per_hour_micros: 3600,
            isolation: None,
        }
    }

    fn capacity() -> HostCapacity {
        HostCapacity {
            cpu_centicores: 200,
            memory_mib: 1024,
            disk_gib: 10,
            owner_share_cpu_centicores: 50,
            owner_share_memory_mib: 256,
            owner_share_disk_gib: 1,
        }
    }

    fn lease(id: u64) -> Lease {
        Lease {
            lease_id: id,
            partition: PartitionRef::new("alpha", 1),
            borrower: "bob".into(),
            lender: "ann".into(),
            terms: terms(),
            epoch: 1,
            started_at_ms: 100,
            key_expires_at_ms: 1000,
            state: LeaseState::Active,
            release_requested_at_ms: None,
            charge_micros: None,
        }
    }

    fn seeded(db: &mut BrokerDb) {
        db.apply(&[
            BrokerWrite::InsertPrincipal {
                name: "ann".into(),
                role: "lender".into(),
                token_sha256: "h1".into(),
                at_ms: 1,
            },
            BrokerWrite::InsertPrincipal {
                name: "bob".into(),
                role: "borrower".into(),
                token_sha256: "h2".into(),
                at_ms: 1,
            },
            BrokerWrite::UpsertHost {
                host: HostRow {
                    host_id: "alpha".into(),
                    lender: "ann".into(),
                    agent_url: None,
                    capacity: capacity(),
                },
                at_ms: 1,
            },
            BrokerWrite::UpsertPartition(PartitionRow {
                partition: PartitionRef::new("alpha", 1),
                terms: terms(),
                epoch: 0,
                lease_id: None,
                withdrawn: false,
            }),
        ])
        .unwrap();
    }

    #[test]
    fn batch_survives_reopen_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.db");
        {
            let mut db = BrokerDb::open(&path, Durability::Full).unwrap();
            seeded(&mut db);
            db.apply(&[BrokerWrite::InsertLease(lease(1))]).unwrap();
        }
        let db = BrokerDb::open(&path, Durability::Full).unwrap();
        let snapshot = db.load().unwrap();
        assert_eq!(snapshot.principals.len(), 2);
        assert_eq!(snapshot.hosts[0].capacity, capacity());
        assert_eq!(snapshot.partitions[0].terms, terms());
        assert_eq!(snapshot.active_leases, vec![lease(1)]);
        assert_eq!(snapshot.last_lease_id, 1);
    }

    #[test]
    fn failing_batch_changes_nothing_and_db_refuses_double_billing() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = BrokerDb::open(&dir.path().join("b.db"), Durability::Normal).unwrap();
        seeded(&mut db);
        // A second active lease on the same partition violates the unique index.
        let result = db.apply(&[
            BrokerWrite::InsertLease(lease(1)),
            BrokerWrite::InsertLease(lease(2)),
        ]);
        assert!(result.is_err());
        assert!(
            db.lease(1).unwrap().is_none(),
            "the whole batch rolled back"
        );
        db.apply(&[BrokerWrite::InsertLease(lease(1))]).unwrap();
        let transfer = Transfer {
            debit_account: "borrower:bob".into(),
            credit_account: "lender:ann".into(),
            amount_micros: 5,
            lease_id: 1,
            at_ms: 9,
        };
        db.apply(&[BrokerWrite::InsertTransfer(transfer.clone())])
            .unwrap();
        assert!(db.apply(&[BrokerWrite::InsertTransfer(transfer)]).is_err());
        let balances = db.balances().unwrap();
        assert_eq!(balances.iter().map(|(_, b)| b).sum::<i64>(), 0);
        assert_eq!(db.transfers(None, 10).unwrap().len(), 1);
    }

    fn release_notice(lease_id: u64, key_expires_at_ms: u64) -> ReleaseNoticeRow {
        ReleaseNoticeRow {
            lease_id,
            host_id: "alpha".into(),
            notice: format!("notice-{lease_id}"),
            key_expires_at_ms,
            created_at_ms: 10 + lease_id,
        }
    }

    #[test]
    fn release_notices_wait_in_the_outbox_and_list_in_release_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.db");
        let mut db = BrokerDb::open(&path, Durability::Normal).unwrap();
        seeded(&mut db);
        let mut second = lease(2);
        second.partition = PartitionRef::new("alpha", 2);
        db.apply(&[
            BrokerWrite::InsertLease(lease(1)),
            BrokerWrite::InsertLease(second),
        ])
        .unwrap();
        // Lease 2 is released before lease 1: the list follows release order.
        for (lease_id, expires_at_ms) in [(2, 1000), (1, 500)] {
            db.apply(&[
                BrokerWrite::InsertRevocation(release_notice(lease_id, expires_at_ms)),
                BrokerWrite::InsertOutboxNotice(release_notice(lease_id, expires_at_ms)),
            ])
            .unwrap();
        }
        drop(db);
        let mut db = BrokerDb::open(&path, Durability::Normal).unwrap();
        assert_eq!(
            db.pending_outbox().unwrap(),
            vec![release_notice(1, 500), release_notice(2, 1000)],
            "the outbox survives a reopen, oldest first"
        );
        let listed = db.revocations_after("alpha", 0, 100, 10).unwrap();
        assert_eq!(
            listed.iter().map(|r| r.lease_id).collect::<Vec<_>>(),
            vec![2, 1]
        );
        let after_first = db
            .revocations_after("alpha", listed[0].seq, 100, 10)
            .unwrap();
        assert_eq!(after_first.len(), 1);
        assert_eq!(after_first[0].lease_id, 1);
        assert!(db.revocations_after("beta", 0, 100, 10).unwrap().is_empty());
        db.apply(&[BrokerWrite::DeleteOutboxNotice { lease_id: 2 }])
            .unwrap();
        assert_eq!(db.pending_outbox().unwrap(), vec![release_notice(1, 500)]);
        // A key that expired needs no fence: its notice goes everywhere.
        assert_eq!(db.prune_expired_notices(600).unwrap(), 2);
        assert!(db.pending_outbox().unwrap().is_empty());
        let left = db.revocations_after("alpha", 0, 600, 10).unwrap();
        assert_eq!(left.iter().map(|r| r.lease_id).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.db");
        drop(BrokerDb::open(&path, Durability::Normal).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        assert!(matches!(
            BrokerDb::open(&path, Durability::Normal),
            Err(crate::StoreError::SchemaTooNew { found: 99, .. })
        ));
    }
}
