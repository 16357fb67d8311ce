//! Versioned migrations kept in `PRAGMA user_version`. Each migration runs
//! once, in order, inside a transaction; a database newer than the binary is
//! refused rather than misread.

use crate::{StoreError, StoreResult};
use rusqlite::Connection;

pub(crate) fn migrate(conn: &mut Connection, migrations: &[&str]) -> StoreResult<()> {
    let found: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let known = migrations.len() as i64;
    if found > known {
        return Err(StoreError::SchemaTooNew { found, known });
    }
    for (number, sql) in migrations.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (number + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}
