//! Persistence for leasehold: SQLite (WAL) with versioned migrations, and
//! PostgreSQL for the broker.
//!
//! The broker uses its storage through one interface, [`BrokerStore`],
//! implemented by SQLite ([`broker::BrokerDb`]) and PostgreSQL
//! ([`postgres::PostgresBrokerDb`]) with the same statements
//! (`broker_sql`). [`BrokerStore::apply`] takes a batch of
//! [`broker::BrokerWrite`]s and commits them in one transaction: that is how
//! the broker's single writer groups many leases into one fsync. The agent
//! keeps its partition table (FIG. 2) and job history in [`agent::AgentDb`].

pub mod agent;
pub mod broker;
mod broker_sql;
pub mod intercepted;
mod migrate;
pub mod postgres;
pub mod private_fs;
pub mod rights_loans;
mod sql;
mod sqlite;
mod store_trait;

pub use intercepted::{ApplyHook, InterceptedStore};
pub use store_trait::{
    is_postgres_url, open_broker_store, BrokerDatabase, BrokerStore, LeaseHolder,
};

/// The error enum of the store crate.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("corrupt row in {table}: {problem}")]
    Corrupt {
        table: &'static str,
        problem: String,
    },
    #[error("the database schema is version {found}, newer than this binary knows ({known}); upgrade leasehold")]
    SchemaTooNew { found: i64, known: i64 },
    #[error(transparent)]
    NotPrivate(#[from] private_fs::PrivateFsError),
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] ::postgres::Error),
    #[error("bad database URL: {0}")]
    BadDatabaseUrl(String),
    #[error("the database connection's thread failed: {0}")]
    DatabaseThread(String),
    #[error("cannot create the database file {0}")]
    CreateFile(String),
    #[error(
        "fenced: the lease {name} is no longer held at epoch {epoch} (another process took over)"
    )]
    Fenced { name: String, epoch: u64 },
}

pub type StoreResult<T> = Result<T, StoreError>;

/// How hard a commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync on every commit: an acknowledged write survives a power cut.
    Full,
    /// WAL with synchronous=NORMAL (PostgreSQL: synchronous_commit off):
    /// survives a process crash, not a power cut. For tests and throwaway
    /// simulations only.
    Normal,
}

pub(crate) fn open_connection(
    path: &std::path::Path,
    durability: Durability,
) -> StoreResult<rusqlite::Connection> {
    create_private_database_file(path)?;
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(
        None,
        "synchronous",
        match durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        },
    )?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Deleted rows are overwritten, so a secret moved out of the database
    // (the old signing-key seed) does not linger in free pages.
    conn.pragma_update(None, "secure_delete", "ON")?;
    Ok(conn)
}

/// Creates a missing database file as 0600 whatever the umask; SQLite
/// gives its -wal and -shm files the same mode.
fn create_private_database_file(path: &std::path::Path) -> StoreResult<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(StoreError::CreateFile(format!(
            "{}: {error}",
            path.display()
        ))),
    }
}

pub(crate) fn corrupt(table: &'static str, problem: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        table,
        problem: problem.to_string(),
    }
}
