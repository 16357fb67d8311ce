//! The one interface the broker has to its storage, implemented by SQLite
//! ([`crate::broker::BrokerDb`], the embedded default) and PostgreSQL
//! ([`crate::postgres::PostgresBrokerDb`]). Both pass the conformance suite
//! in `tests/conformance.rs`.

use crate::broker::{
    AssetBalance, BrokerSnapshot, BrokerWrite, LeaseFilter, ReleaseNoticeRow, RevocationRow,
};
use crate::{Durability, StoreError, StoreResult};
use leasehold_core::lease::Lease;
use leasehold_core::ledger::Transfer;
use leasehold_core::rights::ShareGroup;
use std::path::PathBuf;

/// What the broker needs from storage. Reads take `&mut self` because a
/// database client sends and receives on one connection.
pub trait BrokerStore: Send {
    /// Applies a batch in one transaction: all or nothing, one commit.
    fn apply(&mut self, writes: &[BrokerWrite]) -> StoreResult<()>;
    /// Everything the broker keeps in memory, read at start.
    fn load(&mut self) -> StoreResult<BrokerSnapshot>;
    /// Forgets idempotency records older than `before_ms`.
    fn prune_idempotency(&mut self, before_ms: u64) -> StoreResult<usize>;
    /// Release notices still waiting for their agent, oldest first.
    fn pending_outbox(&mut self) -> StoreResult<Vec<ReleaseNoticeRow>>;
    /// The host's release notices after `after_seq` whose keys have not
    /// expired at `now_ms`, in release order, at most `limit`.
    fn revocations_after(
        &mut self,
        host_id: &str,
        after_seq: u64,
        now_ms: u64,
        limit: u32,
    ) -> StoreResult<Vec<RevocationRow>>;
    /// Forgets release notices whose keys expired before `now_ms`: such a
    /// key is refused anyway, so nothing is left to fence.
    fn prune_expired_notices(&mut self, now_ms: u64) -> StoreResult<usize>;
    fn lease(&mut self, lease_id: u64) -> StoreResult<Option<Lease>>;
    /// Leases, newest first, at most `limit`.
    fn leases(&mut self, filter: &LeaseFilter, limit: u32) -> StoreResult<Vec<Lease>>;
    /// Money transfers touching any of `accounts` (all when `None`), newest
    /// first, at most `limit`.
    fn transfers(
        &mut self,
        accounts: Option<&[String]>,
        limit: u32,
    ) -> StoreResult<Vec<(u64, Transfer)>>;
    /// The money transfers that settled one lease.
    fn lease_transfers(&mut self, lease_id: u64) -> StoreResult<Vec<Transfer>>;
    /// Money balance (credits minus debits) of each account, by account.
    fn balances(&mut self) -> StoreResult<Vec<(String, i64)>>;
    /// Balance of each (account, asset), by asset then account.
    fn balances_by_asset(&mut self) -> StoreResult<Vec<AssetBalance>>;
    /// Takes or renews the fenced lease `name` for `holder` until
    /// `now_ms + ttl_ms`. A free or expired lease goes to the caller with
    /// the next epoch (the first is 1); the holder renews at the same epoch;
    /// while another holder has it, `None`.
    fn acquire_lease(
        &mut self,
        name: &str,
        holder: &str,
        ttl_ms: u64,
        now_ms: u64,
    ) -> StoreResult<Option<u64>>;
    /// Movements of `asset` (not money: usage rights), newest first.
    fn asset_movements(
        &mut self,
        asset: &str,
        limit: u32,
    ) -> StoreResult<Vec<(u64, leasehold_core::ledger::Transfer)>>;
    /// Who held the lease `name` last, at which epoch, until when (past
    /// for an expired lease); `None` if it was never taken.
    fn lease_holder(&mut self, name: &str) -> StoreResult<Option<LeaseHolder>>;
    /// Gives up the lease at once if `holder` has it (true if it did).
    fn release_lease(&mut self, name: &str, holder: &str) -> StoreResult<bool>;
    /// A share group's rights table (seed 004) and its version; `None`
    /// when no group of that name is stored.
    fn share_group(&mut self, name: &str) -> StoreResult<Option<(ShareGroup, u64)>>;
    /// Every share group's table and version, by name, at most `limit`.
    fn share_groups(&mut self, limit: u32) -> StoreResult<Vec<(ShareGroup, u64)>>;
    /// Stores `group` as the next version if the stored one is still
    /// `expected_version` (0: none stored yet): compare-and-swap, so two
    /// managers deciding from the same version cannot both win. Returns
    /// the new version, or `None` when another manager got there first.
    /// `movements` (the rights that moved, as ledger transfers of the
    /// asset `rights`) are written in the same transaction, only if the
    /// swap happens.
    fn put_share_group(
        &mut self,
        group: &ShareGroup,
        expected_version: u64,
        movements: &[leasehold_core::ledger::Transfer],
    ) -> StoreResult<Option<u64>>;
}

/// The last holder of a fenced lease.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaseHolder {
    pub holder: String,
    pub epoch: u64,
    pub expires_at_ms: u64,
}

/// Where the broker's database is.
#[derive(Clone, PartialEq, Eq)]
pub enum BrokerDatabase {
    /// An SQLite file (the embedded default).
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL (`postgres://` or `postgresql://`).
    Postgres(String),
}

impl std::fmt::Debug for BrokerDatabase {
    /// Never prints a PostgreSQL URL: it may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BrokerDatabase::Sqlite(path) => write!(f, "Sqlite({})", path.display()),
            BrokerDatabase::Postgres(_) => write!(f, "Postgres(..)"),
        }
    }
}

/// Whether `text` is a PostgreSQL URL, which is how a broker is pointed at
/// PostgreSQL rather than SQLite.
pub fn is_postgres_url(text: &str) -> bool {
    text.starts_with("postgres://") || text.starts_with("postgresql://")
}

/// Opens the broker's database: SQLite for a path, PostgreSQL for a URL.
pub fn open_broker_store(
    database: &BrokerDatabase,
    durability: Durability,
) -> StoreResult<Box<dyn BrokerStore>> {
    Ok(match database {
        BrokerDatabase::Sqlite(path) => Box::new(crate::broker::BrokerDb::open(path, durability)?),
        BrokerDatabase::Postgres(url) => {
            if !is_postgres_url(url) {
                return Err(StoreError::BadDatabaseUrl(
                    "it must start with postgres:// or postgresql://".into(),
                ));
            }
            Box::new(crate::postgres::PostgresBrokerDb::open(url, durability)?)
        }
    })
}
