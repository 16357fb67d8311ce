//! The SQLite engine behind [`crate::sql::SqlEngine`]: statements are
//! prepared once per connection (`prepare_cached`) and values map to
//! SQLite's own types.

use crate::sql::{Param, SqlConnection, SqlEngine, SqlRow, SqlValue};
use crate::{corrupt, StoreResult};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::Connection;

impl rusqlite::ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        match self {
            Param::Int(value) => value.to_sql(),
            Param::OptInt(value) => value.to_sql(),
            Param::Text(text) => text.as_ref().to_sql(),
            Param::OptText(text) => text.to_sql(),
            Param::Bool(value) => value.to_sql(),
        }
    }
}

/// Statements on a borrowed connection (the connection or its transaction).
struct SqliteStatements<'c>(&'c Connection);

impl SqlConnection for SqliteStatements<'_> {
    fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> StoreResult<u64> {
        let changed = self
            .0
            .prepare_cached(sql)?
            .execute(rusqlite::params_from_iter(params))?;
        Ok(changed as u64)
    }

    fn query(&mut self, sql: &str, params: &[Param<'_>]) -> StoreResult<Vec<SqlRow>> {
        let mut statement = self.0.prepare_cached(sql)?;
        let width = statement.column_count();
        let mut rows = statement.query(rusqlite::params_from_iter(params))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let mut values = Vec::with_capacity(width);
            for index in 0..width {
                values.push(value_of(row.get_ref(index)?)?);
            }
            out.push(SqlRow(values));
        }
        Ok(out)
    }
}

fn value_of(value: ValueRef<'_>) -> StoreResult<SqlValue> {
    Ok(match value {
        ValueRef::Null => SqlValue::Null,
        ValueRef::Integer(number) => SqlValue::Int(number),
        ValueRef::Text(bytes) => SqlValue::Text(
            std::str::from_utf8(bytes)
                .map_err(|e| corrupt("result", e))?
                .to_string(),
        ),
        ValueRef::Real(_) | ValueRef::Blob(_) => {
            return Err(corrupt("result", "a real or blob where none is stored"))
        }
    })
}

/// One SQLite connection.
pub(crate) struct SqliteEngine {
    pub conn: Connection,
}

/// Prepared statements kept per connection: `broker_sql` has 35, a batch
/// of leases and releases uses about 15 and the lookups beside them more,
/// and with rusqlite's default of 16 the writer re-prepared some (seen as
/// `sqlite3_prepare_v3` in its profile).
const STATEMENT_CACHE_CAPACITY: usize = 64;
/// WAL frames before an automatic checkpoint (SQLite's default is 1,000).
/// The checkpoint runs on the writer's thread inside a commit; a longer WAL
/// copies a page updated by many batches (the leases' and ledger's last
/// pages, the indexes) to the database once instead of once per 1,000
/// frames, and fsyncs the database file less often.
const WAL_AUTOCHECKPOINT_FRAMES: i64 = 10_000;

impl SqliteEngine {
    /// The broker's connection, tuned for its single writer's group commit.
    /// None of these settings changes what is durable when. (A bigger page
    /// cache was measured and left out: fewer preads, but every commit then
    /// walks the whole cache in `pager_end_transaction`, and the writer
    /// spent more per lease, 162-168 us against 143 us at SQLite's 2 MiB.)
    pub(crate) fn for_broker(conn: Connection) -> StoreResult<SqliteEngine> {
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
        conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_FRAMES)?;
        Ok(SqliteEngine { conn })
    }
}

impl SqlConnection for SqliteEngine {
    fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> StoreResult<u64> {
        SqliteStatements(&self.conn).execute(sql, params)
    }

    fn query(&mut self, sql: &str, params: &[Param<'_>]) -> StoreResult<Vec<SqlRow>> {
        SqliteStatements(&self.conn).query(sql, params)
    }
}

impl SqlEngine for SqliteEngine {
    fn transaction(
        &mut self,
        body: &mut dyn FnMut(&mut dyn SqlConnection) -> StoreResult<()>,
    ) -> StoreResult<()> {
        let tx = self.conn.transaction()?;
        // Dropping `tx` on an error rolls the whole transaction back.
        body(&mut SqliteStatements(&tx))?;
        tx.commit()?;
        Ok(())
    }
}
