//! The broker's statements, written once for both engines (see `sql`).
//! Every function here backs one method of [`crate::BrokerStore`].

use crate::broker::{
    AssetBalance, BrokerSnapshot, BrokerWrite, HostCredentialRow, HostRow, IdempotencyRow,
    LeaseFilter, PartitionRow, PrincipalRow, ReleaseNoticeRow, RevocationRow, MONEY_ASSET,
};
use crate::sql::{int, opt_int, Param, SqlConnection, SqlEngine, SqlRow};
use crate::{corrupt, LeaseHolder, StoreResult};
use leasehold_core::calendar::{Booking, Interval};
use leasehold_core::lease::{Lease, LeaseState};
use leasehold_core::ledger::Transfer;
use leasehold_core::reservation::ReservationChange;
use leasehold_core::PartitionRef;

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("domain values serialize")
}

fn from_json<T: serde::de::DeserializeOwned>(table: &'static str, text: &str) -> StoreResult<T> {
    serde_json::from_str(text).map_err(|e| corrupt(table, e))
}

const LEASE_COLUMNS: &str = "lease_id, host_id, idx, borrower, lender, terms_json, epoch, started_at_ms, key_expires_at_ms, state, release_requested_at_ms, charge_micros, ends_at_ms";

fn lease_from_row(row: &SqlRow) -> StoreResult<Lease> {
    Ok(Lease {
        lease_id: row.u64(0)?,
        partition: PartitionRef::new(row.text(1)?, row.u64(2)? as u32),
        borrower: row.text(3)?,
        lender: row.text(4)?,
        terms: from_json("leases", &row.text(5)?)?,
        epoch: row.u64(6)?,
        started_at_ms: row.u64(7)?,
        key_expires_at_ms: row.u64(8)?,
        state: if row.text(9)? == "active" {
            LeaseState::Active
        } else {
            LeaseState::Released
        },
        release_requested_at_ms: row.opt_u64(10)?,
        charge_micros: row.opt_u64(11)?,
        ends_at_ms: row.opt_u64(12)?,
    })
}

fn state_text(state: LeaseState) -> &'static str {
    match state {
        LeaseState::Active => "active",
        LeaseState::Released => "released",
    }
}

/// Applies a batch in one transaction: all or nothing, one commit.
pub(crate) fn apply(engine: &mut dyn SqlEngine, writes: &[BrokerWrite]) -> StoreResult<()> {
    engine.transaction(&mut |tx| {
        for write in writes {
            apply_one(tx, write)?;
        }
        Ok(())
    })
}

fn apply_one(tx: &mut dyn SqlConnection, write: &BrokerWrite) -> StoreResult<()> {
    match write {
        BrokerWrite::CheckFence {
            name,
            holder,
            epoch,
        } => check_fence(tx, name, holder, *epoch),
        BrokerWrite::PutMeta { key, value } => tx.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[key.into(), value.into()],
        ),
        BrokerWrite::DeleteMeta { key } => {
            tx.execute("DELETE FROM meta WHERE key = ?1", &[key.into()])
        }
        BrokerWrite::InsertPrincipal { name, role, token_sha256, at_ms } => tx.execute(
            "INSERT INTO principals (name, role, token_sha256, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
            &[name.into(), role.into(), token_sha256.into(), int(*at_ms)],
        ),
        BrokerWrite::InsertHostCredential { credential, at_ms } => tx.execute(
            "INSERT INTO host_credentials (token_sha256, lender, host_id, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
            &[(&credential.token_sha256).into(), (&credential.lender).into(), (&credential.host_id).into(), int(*at_ms)],
        ),
        BrokerWrite::UpsertHost { host, at_ms } => tx.execute(
            "INSERT INTO hosts (host_id, lender, agent_url, capacity_json, registered_at_ms, share_json) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (host_id) DO UPDATE SET agent_url = excluded.agent_url, capacity_json = excluded.capacity_json,
             share_json = excluded.share_json",
            &[(&host.host_id).into(), (&host.lender).into(), Param::OptText(host.agent_url.as_deref()), json(&host.capacity).into(), int(*at_ms),
              Param::OptText(host.share.as_ref().map(json).as_deref())],
        ),
        BrokerWrite::UpsertPartition(row) => tx.execute(
            "INSERT INTO partitions (host_id, idx, terms_json, epoch, lease_id, withdrawn) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (host_id, idx) DO UPDATE SET terms_json = excluded.terms_json, epoch = excluded.epoch,
             lease_id = excluded.lease_id, withdrawn = excluded.withdrawn",
            &[(&row.partition.host_id).into(), int(row.partition.index.into()), json(&row.terms).into(), int(row.epoch), opt_int(row.lease_id), Param::Bool(row.withdrawn)],
        ),
        BrokerWrite::InsertLease(lease) => insert_lease(tx, lease),
        BrokerWrite::UpdateLease(lease) => tx.execute(
            "UPDATE leases SET state = ?2, release_requested_at_ms = ?3, charge_micros = ?4 WHERE lease_id = ?1",
            &[int(lease.lease_id), state_text(lease.state).into(), opt_int(lease.release_requested_at_ms), opt_int(lease.charge_micros)],
        ),
        BrokerWrite::InsertTransfer(transfer) => insert_transfer(tx, MONEY_ASSET, transfer),
        BrokerWrite::InsertAssetTransfer { asset, transfer } => insert_transfer(tx, asset, transfer),
        BrokerWrite::PutIdempotency { principal, key, status, body, at_ms } => tx.execute(
            "INSERT INTO idempotency (principal, key, status, body, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (principal, key) DO UPDATE SET status = excluded.status, body = excluded.body, at_ms = excluded.at_ms",
            &[principal.into(), key.into(), int((*status).into()), body.into(), int(*at_ms)],
        ),
        BrokerWrite::InsertOutboxNotice(row) => tx.execute(
            "INSERT INTO notice_outbox (lease_id, host_id, notice, key_expires_at_ms, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            &[int(row.lease_id), (&row.host_id).into(), (&row.notice).into(), int(row.key_expires_at_ms), int(row.created_at_ms)],
        ),
        BrokerWrite::InsertRevocation(row) => tx.execute(
            "INSERT INTO revocations (lease_id, host_id, notice, key_expires_at_ms) VALUES (?1, ?2, ?3, ?4)",
            &[int(row.lease_id), (&row.host_id).into(), (&row.notice).into(), int(row.key_expires_at_ms)],
        ),
        BrokerWrite::PruneIdempotency { before_ms } => {
            return prune_idempotency(tx, *before_ms).map(|_| ())
        }
        BrokerWrite::InsertInterval { partition, interval } => tx.execute(
            "INSERT INTO partition_intervals (host_id, idx, kind, holder_id, from_ms, to_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            &[(&partition.host_id).into(), int(partition.index.into()), interval.booking.kind_name().into(), int(interval.booking.holder_id()), int(interval.from_ms), opt_int(interval.to_ms)],
        ),
        BrokerWrite::DeleteInterval { partition, booking } => tx.execute(
            "DELETE FROM partition_intervals WHERE host_id = ?1 AND idx = ?2 AND kind = ?3 AND holder_id = ?4",
            &[(&partition.host_id).into(), int(partition.index.into()), booking.kind_name().into(), int(booking.holder_id())],
        ),
        BrokerWrite::DeleteOutboxNotice { lease_id } => {
            tx.execute("DELETE FROM notice_outbox WHERE lease_id = ?1", &[int(*lease_id)])
        }
        BrokerWrite::Reservation(change) => apply_reservation(tx, change),
    }?;
    Ok(())
}

/// A change of seed 003's book as rows.
fn apply_reservation(tx: &mut dyn SqlConnection, change: &ReservationChange) -> StoreResult<u64> {
    match change {
        ReservationChange::PutWorkload(workload) => tx.execute(
            "INSERT INTO workloads (name, body) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET body = excluded.body",
            &[(&workload.name).into(), json(workload).into()],
        ),
        ReservationChange::RemoveWorkload { name } => {
            tx.execute("DELETE FROM acquisition_pools WHERE workload = ?1", &[name.into()])?;
            tx.execute("DELETE FROM workloads WHERE name = ?1", &[name.into()])
        }
        ReservationChange::PutPool(pool) => tx.execute(
            "INSERT INTO acquisition_pools (pool_id, workload, body) VALUES (?1, ?2, ?3)
             ON CONFLICT (pool_id) DO UPDATE SET workload = excluded.workload, body = excluded.body",
            &[int(pool.pool_id), (&pool.workload).into(), json(pool).into()],
        ),
        ReservationChange::RemovePool { pool_id } => {
            tx.execute("DELETE FROM acquisition_pools WHERE pool_id = ?1", &[int(*pool_id)])
        }
        ReservationChange::SetMove { demand, target: None } => {
            tx.execute("DELETE FROM reservation_moves WHERE demand = ?1", &[demand.into()])
        }
        ReservationChange::SetMove { demand, target: Some(target) } => tx.execute(
            "INSERT INTO reservation_moves (demand, target) VALUES (?1, ?2) ON CONFLICT (demand) DO UPDATE SET target = excluded.target",
            &[demand.into(), json(target).into()],
        ),
        ReservationChange::SetHostPower { host_id, state: None } => {
            tx.execute("DELETE FROM host_power WHERE host_id = ?1", &[host_id.into()])
        }
        ReservationChange::SetHostPower { host_id, state: Some(state) } => tx.execute(
            "INSERT INTO host_power (host_id, state) VALUES (?1, ?2) ON CONFLICT (host_id) DO UPDATE SET state = excluded.state",
            &[host_id.into(), json(state).into()],
        ),
        ReservationChange::SetFruitlessRounds { demand, rounds: 0 } => {
            tx.execute("DELETE FROM fruitless_rounds WHERE demand = ?1", &[demand.into()])
        }
        ReservationChange::SetFruitlessRounds { demand, rounds } => tx.execute(
            "INSERT INTO fruitless_rounds (demand, rounds) VALUES (?1, ?2) ON CONFLICT (demand) DO UPDATE SET rounds = excluded.rounds",
            &[demand.into(), int(u64::from(*rounds))],
        ),
    }
}

/// Seed 003's workloads, pools and counters.
fn load_reservations(
    conn: &mut dyn SqlConnection,
    snapshot: &mut BrokerSnapshot,
) -> StoreResult<()> {
    for row in conn.query("SELECT body FROM workloads ORDER BY name", &[])? {
        snapshot
            .workloads
            .push(from_json("workloads", &row.text(0)?)?);
    }
    for row in conn.query("SELECT body FROM acquisition_pools ORDER BY pool_id", &[])? {
        snapshot
            .pools
            .push(from_json("acquisition_pools", &row.text(0)?)?);
    }
    for row in conn.query(
        "SELECT demand, rounds FROM fruitless_rounds ORDER BY demand",
        &[],
    )? {
        snapshot
            .fruitless_rounds
            .push((row.text(0)?, row.u64(1)? as u32));
    }
    for row in conn.query(
        "SELECT demand, target FROM reservation_moves ORDER BY demand",
        &[],
    )? {
        snapshot
            .moves
            .push((row.text(0)?, from_json("reservation_moves", &row.text(1)?)?));
    }
    for row in conn.query(
        "SELECT host_id, state FROM host_power ORDER BY host_id",
        &[],
    )? {
        snapshot
            .host_power
            .push((row.text(0)?, from_json("host_power", &row.text(1)?)?));
    }
    Ok(())
}

fn insert_lease(tx: &mut dyn SqlConnection, lease: &Lease) -> StoreResult<u64> {
    tx.execute(
        "INSERT INTO leases (lease_id, host_id, idx, borrower, lender, terms_json, epoch, started_at_ms, key_expires_at_ms, state, release_requested_at_ms, charge_micros, ends_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        &[
            int(lease.lease_id),
            (&lease.partition.host_id).into(),
            int(lease.partition.index.into()),
            (&lease.borrower).into(),
            (&lease.lender).into(),
            json(&lease.terms).into(),
            int(lease.epoch),
            int(lease.started_at_ms),
            int(lease.key_expires_at_ms),
            state_text(lease.state).into(),
            opt_int(lease.release_requested_at_ms),
            opt_int(lease.charge_micros),
            opt_int(lease.ends_at_ms),
        ],
    )
}

fn insert_transfer(
    tx: &mut dyn SqlConnection,
    asset: &str,
    transfer: &Transfer,
) -> StoreResult<u64> {
    tx.execute(
        "INSERT INTO transfers (lease_id, debit_account, credit_account, amount_micros, at_ms, asset) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        &[
            int(transfer.lease_id),
            (&transfer.debit_account).into(),
            (&transfer.credit_account).into(),
            int(transfer.amount_micros),
            int(transfer.at_ms),
            asset.into(),
        ],
    )
}

/// Everything the broker keeps in memory, read at start.
pub(crate) fn load(conn: &mut dyn SqlConnection) -> StoreResult<BrokerSnapshot> {
    let mut snapshot = BrokerSnapshot::default();
    for row in conn.query("SELECT key, value FROM meta", &[])? {
        snapshot.meta.insert(row.text(0)?, row.text(1)?);
    }
    for row in conn.query("SELECT name, role, token_sha256 FROM principals", &[])? {
        snapshot.principals.push(PrincipalRow {
            name: row.text(0)?,
            role: row.text(1)?,
            token_sha256: row.text(2)?,
        });
    }
    for row in conn.query(
        "SELECT token_sha256, lender, host_id FROM host_credentials",
        &[],
    )? {
        snapshot.host_credentials.push(HostCredentialRow {
            token_sha256: row.text(0)?,
            lender: row.text(1)?,
            host_id: row.text(2)?,
        });
    }
    for row in conn.query(
        "SELECT host_id, lender, agent_url, capacity_json, share_json FROM hosts",
        &[],
    )? {
        snapshot.hosts.push(HostRow {
            host_id: row.text(0)?,
            lender: row.text(1)?,
            agent_url: row.opt_text(2)?,
            capacity: from_json("hosts", &row.text(3)?)?,
            share: row
                .opt_text(4)?
                .map(|t| from_json("hosts", &t))
                .transpose()?,
        });
    }
    for row in conn.query(
        "SELECT host_id, idx, terms_json, epoch, lease_id, withdrawn FROM partitions",
        &[],
    )? {
        snapshot.partitions.push(PartitionRow {
            partition: PartitionRef::new(row.text(0)?, row.u64(1)? as u32),
            terms: from_json("partitions", &row.text(2)?)?,
            epoch: row.u64(3)?,
            lease_id: row.opt_u64(4)?,
            withdrawn: row.bool(5)?,
        });
    }
    let active = format!("SELECT {LEASE_COLUMNS} FROM leases WHERE state = 'active'");
    for row in conn.query(&active, &[])? {
        snapshot.active_leases.push(lease_from_row(&row)?);
    }
    let last = conn.query("SELECT COALESCE(MAX(lease_id), 0) FROM leases", &[])?;
    snapshot.last_lease_id = last.first().map(|row| row.u64(0)).transpose()?.unwrap_or(0);
    for row in conn.query(
        "SELECT principal, key, status, body, at_ms FROM idempotency",
        &[],
    )? {
        snapshot.idempotency.push(IdempotencyRow {
            principal: row.text(0)?,
            key: row.text(1)?,
            status: row.u64(2)? as u16,
            body: row.text(3)?,
            at_ms: row.u64(4)?,
        });
    }
    snapshot.intervals = load_intervals(conn)?;
    load_reservations(conn, &mut snapshot)?;
    Ok(snapshot)
}

/// Every partition's calendar, by partition and start.
fn load_intervals(conn: &mut dyn SqlConnection) -> StoreResult<Vec<(PartitionRef, Interval)>> {
    let rows = conn.query(
        "SELECT host_id, idx, kind, holder_id, from_ms, to_ms FROM partition_intervals ORDER BY host_id, idx, from_ms",
        &[],
    )?;
    let mut intervals = Vec::with_capacity(rows.len());
    for row in rows {
        let kind = row.text(2)?;
        let booking = Booking::from_stored(&kind, row.u64(3)?)
            .ok_or_else(|| corrupt("partition_intervals", format!("unknown kind '{kind}'")))?;
        let interval = Interval {
            booking,
            from_ms: row.u64(4)?,
            to_ms: row.opt_u64(5)?,
        };
        intervals.push((
            PartitionRef::new(row.text(0)?, row.u64(1)? as u32),
            interval,
        ));
    }
    Ok(intervals)
}

pub(crate) fn prune_idempotency(
    conn: &mut dyn SqlConnection,
    before_ms: u64,
) -> StoreResult<usize> {
    let pruned = conn.execute(
        "DELETE FROM idempotency WHERE at_ms < ?1",
        &[int(before_ms)],
    )?;
    Ok(pruned as usize)
}

pub(crate) fn pending_outbox(conn: &mut dyn SqlConnection) -> StoreResult<Vec<ReleaseNoticeRow>> {
    conn.query(
        "SELECT lease_id, host_id, notice, key_expires_at_ms, created_at_ms FROM notice_outbox ORDER BY created_at_ms, lease_id",
        &[],
    )?
    .iter()
    .map(|row| {
        Ok(ReleaseNoticeRow {
            lease_id: row.u64(0)?,
            host_id: row.text(1)?,
            notice: row.text(2)?,
            key_expires_at_ms: row.u64(3)?,
            created_at_ms: row.u64(4)?,
        })
    })
    .collect()
}

pub(crate) fn revocations_after(
    conn: &mut dyn SqlConnection,
    host_id: &str,
    after_seq: u64,
    now_ms: u64,
    limit: u32,
) -> StoreResult<Vec<RevocationRow>> {
    conn.query(
        "SELECT seq, lease_id, notice FROM revocations
         WHERE host_id = ?1 AND seq > ?2 AND key_expires_at_ms > ?3 ORDER BY seq LIMIT ?4",
        &[
            host_id.into(),
            int(after_seq),
            int(now_ms),
            int(limit.into()),
        ],
    )?
    .iter()
    .map(|row| {
        Ok(RevocationRow {
            seq: row.u64(0)?,
            lease_id: row.u64(1)?,
            notice: row.text(2)?,
        })
    })
    .collect()
}

pub(crate) fn prune_expired_notices(engine: &mut dyn SqlEngine, now_ms: u64) -> StoreResult<usize> {
    let mut pruned = 0;
    engine.transaction(&mut |tx| {
        pruned = tx.execute(
            "DELETE FROM notice_outbox WHERE key_expires_at_ms < ?1",
            &[int(now_ms)],
        )?;
        pruned += tx.execute(
            "DELETE FROM revocations WHERE key_expires_at_ms < ?1",
            &[int(now_ms)],
        )?;
        Ok(())
    })?;
    Ok(pruned as usize)
}

pub(crate) fn lease(conn: &mut dyn SqlConnection, lease_id: u64) -> StoreResult<Option<Lease>> {
    let sql = format!("SELECT {LEASE_COLUMNS} FROM leases WHERE lease_id = ?1");
    conn.query(&sql, &[int(lease_id)])?
        .first()
        .map(lease_from_row)
        .transpose()
}

pub(crate) fn leases(
    conn: &mut dyn SqlConnection,
    filter: &LeaseFilter,
    limit: u32,
) -> StoreResult<Vec<Lease>> {
    let limit = int(limit.into());
    let rows = match filter {
        LeaseFilter::All => conn.query(
            &format!("SELECT {LEASE_COLUMNS} FROM leases ORDER BY lease_id DESC LIMIT ?1"),
            &[limit],
        )?,
        LeaseFilter::Borrower(name) => conn.query(
            &format!("SELECT {LEASE_COLUMNS} FROM leases WHERE borrower = ?1 ORDER BY lease_id DESC LIMIT ?2"),
            &[name.into(), limit],
        )?,
        LeaseFilter::Lender(name) => conn.query(
            &format!("SELECT {LEASE_COLUMNS} FROM leases WHERE lender = ?1 ORDER BY lease_id DESC LIMIT ?2"),
            &[name.into(), limit],
        )?,
    };
    rows.iter().map(lease_from_row).collect()
}

fn transfer_from_row(row: &SqlRow) -> StoreResult<(u64, Transfer)> {
    Ok((
        row.u64(0)?,
        Transfer {
            lease_id: row.u64(1)?,
            debit_account: row.text(2)?,
            credit_account: row.text(3)?,
            amount_micros: row.u64(4)?,
            at_ms: row.u64(5)?,
        },
    ))
}

/// Money transfers touching any of `accounts` (all when `None`), newest
/// first, at most `limit`: filtered and limited by the database.
pub(crate) fn transfers(
    conn: &mut dyn SqlConnection,
    accounts: Option<&[String]>,
    limit: u32,
) -> StoreResult<Vec<(u64, Transfer)>> {
    const COLUMNS: &str =
        "transfer_id, lease_id, debit_account, credit_account, amount_micros, at_ms";
    let mut params: Vec<Param<'_>> = vec![MONEY_ASSET.into()];
    let condition = match accounts {
        None => String::new(),
        Some([]) => return Ok(Vec::new()),
        Some(accounts) => {
            // ?2..?n+1, used for both sides: each account is bound once.
            let placeholders: Vec<String> =
                (0..accounts.len()).map(|i| format!("?{}", i + 2)).collect();
            let list = placeholders.join(", ");
            params.extend(accounts.iter().map(Param::from));
            format!(" AND (debit_account IN ({list}) OR credit_account IN ({list}))")
        }
    };
    let limit_placeholder = params.len() + 1;
    params.push(int(limit.into()));
    let sql = format!(
        "SELECT {COLUMNS} FROM transfers WHERE asset = ?1{condition} ORDER BY transfer_id DESC LIMIT ?{limit_placeholder}"
    );
    conn.query(&sql, &params)?
        .iter()
        .map(transfer_from_row)
        .collect()
}

pub(crate) fn lease_transfers(
    conn: &mut dyn SqlConnection,
    lease_id: u64,
) -> StoreResult<Vec<Transfer>> {
    conn.query(
        "SELECT transfer_id, lease_id, debit_account, credit_account, amount_micros, at_ms FROM transfers
         WHERE lease_id = ?1 AND asset = ?2 ORDER BY transfer_id",
        &[int(lease_id), MONEY_ASSET.into()],
    )?
    .iter()
    .map(|row| Ok(transfer_from_row(row)?.1))
    .collect()
}

/// Balance (credits minus debits) per account and asset, summed by the
/// database. Sorted here, not by `ORDER BY`, because the engines' text
/// collations differ.
pub(crate) fn balances_by_asset(conn: &mut dyn SqlConnection) -> StoreResult<Vec<AssetBalance>> {
    let mut balances = conn
        .query(
            "SELECT account, asset, CAST(SUM(amount) AS BIGINT) FROM (
                SELECT credit_account AS account, asset, amount_micros AS amount FROM transfers
                UNION ALL
                SELECT debit_account AS account, asset, -amount_micros AS amount FROM transfers
                UNION ALL
                SELECT credit_account AS account, asset, amount FROM asset_movements
                UNION ALL
                SELECT debit_account AS account, asset, -amount AS amount FROM asset_movements
             ) AS entries GROUP BY account, asset",
            &[],
        )?
        .iter()
        .map(|row| {
            Ok(AssetBalance {
                account: row.text(0)?,
                asset: row.text(1)?,
                balance: row.i64(2)?,
            })
        })
        .collect::<StoreResult<Vec<_>>>()?;
    balances.sort_by(|a, b| (&a.asset, &a.account).cmp(&(&b.asset, &b.account)));
    Ok(balances)
}

/// Money balance of each account, sorted by account.
pub(crate) fn balances(conn: &mut dyn SqlConnection) -> StoreResult<Vec<(String, i64)>> {
    Ok(balances_by_asset(conn)?
        .into_iter()
        .filter(|balance| balance.asset == MONEY_ASSET)
        .map(|balance| (balance.account, balance.balance))
        .collect())
}

/// Takes or renews the fenced lease `name` for `holder` until
/// `now_ms + ttl_ms`, in one statement so that two contenders cannot both
/// win: a free or expired lease goes to the caller with the next epoch, the
/// holder renews at the same epoch, anyone else gets `None`.
pub(crate) fn acquire_lease(
    conn: &mut dyn SqlConnection,
    name: &str,
    holder: &str,
    ttl_ms: u64,
    now_ms: u64,
) -> StoreResult<Option<u64>> {
    let expires_at_ms = now_ms.saturating_add(ttl_ms);
    let rows = conn.query(
        "INSERT INTO fenced_leases (name, holder, epoch, expires_at_ms) VALUES (?1, ?2, 1, ?3)
         ON CONFLICT (name) DO UPDATE SET
             epoch = CASE WHEN fenced_leases.holder = excluded.holder AND fenced_leases.expires_at_ms > ?4
                          THEN fenced_leases.epoch ELSE fenced_leases.epoch + 1 END,
             holder = excluded.holder,
             expires_at_ms = excluded.expires_at_ms
         WHERE fenced_leases.holder = excluded.holder OR fenced_leases.expires_at_ms <= ?4
         RETURNING epoch",
        &[name.into(), holder.into(), int(expires_at_ms), int(now_ms)],
    )?;
    rows.first().map(|row| row.u64(0)).transpose()
}

/// The batch's fence: an update that changes nothing but locks the lease's
/// row (PostgreSQL re-checks the condition on the newest row version, so a
/// take-over committed meanwhile is seen), and counts 0 rows when the epoch
/// or holder moved on.
fn check_fence(
    tx: &mut dyn SqlConnection,
    name: &str,
    holder: &str,
    epoch: u64,
) -> StoreResult<u64> {
    let held = tx.execute(
        "UPDATE fenced_leases SET epoch = epoch WHERE name = ?1 AND holder = ?2 AND epoch = ?3",
        &[name.into(), holder.into(), int(epoch)],
    )?;
    if held == 0 {
        return Err(crate::StoreError::Fenced {
            name: name.to_string(),
            epoch,
        });
    }
    Ok(held)
}

/// Movements of an asset other than money, newest first.
pub(crate) fn asset_movements(
    conn: &mut dyn SqlConnection,
    asset: &str,
    limit: u32,
) -> StoreResult<Vec<(u64, Transfer)>> {
    conn.query(
        "SELECT movement_id, debit_account, credit_account, amount, at_ms FROM asset_movements
         WHERE asset = ?1 ORDER BY movement_id DESC LIMIT ?2",
        &[asset.into(), int(limit.into())],
    )?
    .iter()
    .map(|row| {
        Ok((
            row.u64(0)?,
            Transfer {
                debit_account: row.text(1)?,
                credit_account: row.text(2)?,
                amount_micros: row.u64(3)?,
                lease_id: 0,
                at_ms: row.u64(4)?,
            },
        ))
    })
    .collect()
}

/// Who holds the fenced lease `name` last, at which epoch and until when.
pub(crate) fn lease_holder(
    conn: &mut dyn SqlConnection,
    name: &str,
) -> StoreResult<Option<LeaseHolder>> {
    let rows = conn.query(
        "SELECT holder, epoch, expires_at_ms FROM fenced_leases WHERE name = ?1",
        &[name.into()],
    )?;
    rows.first()
        .map(|row| {
            Ok(LeaseHolder {
                holder: row.text(0)?,
                epoch: row.u64(1)?,
                expires_at_ms: row.u64(2)?,
            })
        })
        .transpose()
}

/// Gives the lease up at once if `holder` holds it; the next acquirer gets
/// the next epoch.
pub(crate) fn release_lease(
    conn: &mut dyn SqlConnection,
    name: &str,
    holder: &str,
) -> StoreResult<bool> {
    let changed = conn.execute(
        "UPDATE fenced_leases SET expires_at_ms = 0 WHERE name = ?1 AND holder = ?2",
        &[name.into(), holder.into()],
    )?;
    Ok(changed > 0)
}

/// A share group's table and version (seed 004).
pub(crate) fn share_group(
    conn: &mut dyn SqlConnection,
    name: &str,
) -> StoreResult<Option<(leasehold_core::rights::ShareGroup, u64)>> {
    let rows = conn.query(
        "SELECT body, version FROM share_groups WHERE name = ?1",
        &[name.into()],
    )?;
    match rows.first() {
        None => Ok(None),
        Some(row) => Ok(Some((
            from_json("share_groups", &row.text(0)?)?,
            row.u64(1)?,
        ))),
    }
}

/// Every share group's table and version, by name (at most `limit`).
pub(crate) fn share_groups(
    conn: &mut dyn SqlConnection,
    limit: u32,
) -> StoreResult<Vec<(leasehold_core::rights::ShareGroup, u64)>> {
    conn.query(
        "SELECT body, version FROM share_groups ORDER BY name LIMIT ?1",
        &[int(limit.into())],
    )?
    .iter()
    .map(|row| Ok((from_json("share_groups", &row.text(0)?)?, row.u64(1)?)))
    .collect()
}

/// Compare-and-swap of a share group's table: one statement, so two
/// managers deciding from the same version cannot both write.
pub(crate) fn put_share_group(
    engine: &mut dyn SqlEngine,
    group: &leasehold_core::rights::ShareGroup,
    expected_version: u64,
    movements: &[Transfer],
) -> StoreResult<Option<u64>> {
    let mut stored = None;
    engine.transaction(&mut |tx| {
        let next = expected_version + 1;
        let rows = if expected_version == 0 {
            tx.query(
                "INSERT INTO share_groups (name, body, version) VALUES (?1, ?2, 1)
                 ON CONFLICT (name) DO NOTHING RETURNING version",
                &[(&group.name).into(), json(group).into()],
            )?
        } else {
            tx.query(
                "UPDATE share_groups SET body = ?2, version = ?3 WHERE name = ?1 AND version = ?4 RETURNING version",
                &[(&group.name).into(), json(group).into(), int(next), int(expected_version)],
            )?
        };
        stored = rows.first().map(|row| row.u64(0)).transpose()?;
        if stored.is_some() {
            for movement in movements {
                tx.execute(
                    "INSERT INTO asset_movements (asset, debit_account, credit_account, amount, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                    &[
                        leasehold_core::rights::ledger::RIGHTS_ASSET.into(),
                        (&movement.debit_account).into(),
                        (&movement.credit_account).into(),
                        int(movement.amount_micros),
                        int(movement.at_ms),
                    ],
                )?;
            }
        }
        Ok(())
    })?;
    Ok(stored)
}
