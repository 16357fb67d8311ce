//! Versioned migrations kept in `PRAGMA user_version`. Pending migrations run
//! in order inside one transaction; a database newer than the binary is
//! refused rather than misread.

use crate::{StoreError, StoreResult};
use rusqlite::{Connection, TransactionBehavior};

pub(crate) fn migrate(conn: &mut Connection, migrations: &[&str]) -> StoreResult<()> {
    // IMMEDIATE takes the write lock before the version is read, so two
    // processes opening one new database migrate one after the other
    // instead of both creating the same tables.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let known = migrations.len() as i64;
    if found > known {
        return Err(StoreError::SchemaTooNew { found, known });
    }
    for sql in migrations.iter().skip(found as usize) {
        tx.execute_batch(sql)?;
    }
    if found < known {
        tx.pragma_update(None, "user_version", known)?;
    }
    tx.commit()?;
    Ok(())
}
