//! The host manager's own rights database (seed 004, FIG. 4B): the loans
//! between its partitions, committed here (fsync) before the modules
//! switch and the answer goes out, and published to the group's table
//! afterwards. AUTOINCREMENT keeps a loan's number from ever being used
//! again, even after published loans are forgotten.

use crate::{migrate::migrate, open_connection, Durability, StoreResult};
use leasehold_core::rights::local::LocalLoan;
use rusqlite::{params, Connection};
use std::path::Path;

const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE local_loans (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    from_partition INTEGER NOT NULL,
    to_partition INTEGER NOT NULL,
    modules INTEGER NOT NULL,
    at_ms INTEGER NOT NULL
);
"#];

pub struct RightsLoanDb {
    conn: Connection,
}

/// A loan to record: (from partition, to partition, modules).
pub type LoanToRecord = (u32, u32, u32);

impl RightsLoanDb {
    pub fn open(path: &Path) -> StoreResult<Self> {
        let mut conn = open_connection(path, Durability::Full)?;
        migrate(&mut conn, MIGRATIONS)?;
        Ok(RightsLoanDb { conn })
    }

    /// Records `loans` in one transaction, numbered in order.
    pub fn record(&mut self, loans: &[LoanToRecord], at_ms: u64) -> StoreResult<Vec<LocalLoan>> {
        let tx = self.conn.transaction()?;
        let mut recorded = Vec::with_capacity(loans.len());
        for (from, to, modules) in loans {
            tx.execute(
                "INSERT INTO local_loans (from_partition, to_partition, modules, at_ms) VALUES (?1, ?2, ?3, ?4)",
                params![from, to, modules, at_ms as i64],
            )?;
            recorded.push(LocalLoan {
                seq: tx.last_insert_rowid() as u64,
                from: *from,
                to: *to,
                modules: *modules,
                at_ms,
            });
        }
        tx.commit()?;
        Ok(recorded)
    }

    /// The loans numbered after `seq`, in order.
    pub fn after(&self, seq: u64) -> StoreResult<Vec<LocalLoan>> {
        let mut statement = self.conn.prepare(
            "SELECT seq, from_partition, to_partition, modules, at_ms FROM local_loans WHERE seq > ?1 ORDER BY seq",
        )?;
        let rows = statement.query_map(params![seq as i64], |row| {
            Ok(LocalLoan {
                seq: row.get::<_, i64>(0)? as u64,
                from: row.get(1)?,
                to: row.get(2)?,
                modules: row.get(3)?,
                at_ms: row.get::<_, i64>(4)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Forgets the loans the group's table holds (numbered up to `seq`).
    pub fn forget_through(&mut self, seq: u64) -> StoreResult<usize> {
        Ok(self.conn.execute(
            "DELETE FROM local_loans WHERE seq <= ?1",
            params![seq.min(i64::MAX as u64) as i64],
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loans_survive_a_reopen_and_a_forgotten_number_is_never_used_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loans.sqlite");
        let mut db = RightsLoanDb::open(&path).unwrap();
        let first = db.record(&[(0, 1, 2), (2, 1, 1)], 5).unwrap();
        assert_eq!(first.iter().map(|l| l.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(db.forget_through(2).unwrap(), 2);
        drop(db);
        let mut db = RightsLoanDb::open(&path).unwrap();
        assert!(db.after(0).unwrap().is_empty());
        let next = db.record(&[(1, 0, 1)], 6).unwrap();
        assert_eq!(next[0].seq, 3, "numbers keep increasing after a forget");
        assert_eq!(db.after(2).unwrap(), next);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
