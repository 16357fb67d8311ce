//! The agent's partition table (logical partition database 4, FIG. 2:
//! partition id 41, allocated resources 42, lending flag 43, key material 44)
//! and its job history.

use crate::{corrupt, migrate::migrate, open_connection, Durability, StoreResult};
use leasehold_core::Terms;
use rusqlite::{params, Connection, OptionalExtension, Row};
use std::path::Path;

const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE partitions (
    idx INTEGER PRIMARY KEY,
    terms_json TEXT NOT NULL,
    registered INTEGER NOT NULL DEFAULT 0,
    epoch INTEGER NOT NULL DEFAULT 0,
    lease_id INTEGER,
    key_expires_at_ms INTEGER,
    released_through_epoch INTEGER NOT NULL DEFAULT 0,
    built INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE jobs (
    job_id INTEGER PRIMARY KEY AUTOINCREMENT,
    idx INTEGER NOT NULL,
    lease_id INTEGER NOT NULL,
    command_json TEXT NOT NULL,
    state TEXT NOT NULL,
    exit_code INTEGER,
    stdout TEXT NOT NULL DEFAULT '',
    stderr TEXT NOT NULL DEFAULT '',
    output_truncated INTEGER NOT NULL DEFAULT 0,
    started_at_ms INTEGER NOT NULL,
    finished_at_ms INTEGER
);
"#];

/// One row of the partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPartitionRow {
    pub index: u32,
    pub terms: Terms,
    /// Lending flag 43: registered with the broker.
    pub registered: bool,
    pub epoch: u64,
    pub lease_id: Option<u64>,
    pub key_expires_at_ms: Option<u64>,
    pub released_through_epoch: u64,
    /// Whether the driver has built the partition for the current lease.
    pub built: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRow {
    pub job_id: u64,
    pub index: u32,
    pub lease_id: u64,
    pub command: Vec<String>,
    pub state: String,
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub output_truncated: bool,
    pub started_at_ms: u64,
    pub finished_at_ms: Option<u64>,
}

pub struct AgentDb {
    conn: Connection,
}

const PARTITION_COLUMNS: &str =
    "idx, terms_json, registered, epoch, lease_id, key_expires_at_ms, released_through_epoch, built";

fn partition_from_row(row: &Row<'_>) -> rusqlite::Result<(AgentPartitionRow, String)> {
    Ok((
        AgentPartitionRow {
            index: row.get::<_, i64>(0)? as u32,
            terms: Terms {
                vcpus: 0,
                cpu_cap_percent: 0,
                memory_mib: 0,
                disk_gib: 0,
                images: vec![],
                price_per_hour_micros: 0,
                isolation: None,
            },
            registered: row.get(2)?,
            epoch: row.get::<_, i64>(3)? as u64,
            lease_id: row.get::<_, Option<i64>>(4)?.map(|v| v as u64),
            key_expires_at_ms: row.get::<_, Option<i64>>(5)?.map(|v| v as u64),
            released_through_epoch: row.get::<_, i64>(6)? as u64,
            built: row.get(7)?,
        },
        row.get(1)?,
    ))
}

fn finish_partition(
    (mut row, terms_json): (AgentPartitionRow, String),
) -> StoreResult<AgentPartitionRow> {
    row.terms = serde_json::from_str(&terms_json).map_err(|e| corrupt("partitions", e))?;
    Ok(row)
}

const JOB_COLUMNS: &str = "job_id, idx, lease_id, command_json, state, exit_code, stdout, stderr, output_truncated, started_at_ms, finished_at_ms";

fn job_from_row(row: &Row<'_>) -> rusqlite::Result<(JobRow, String)> {
    Ok((
        JobRow {
            job_id: row.get::<_, i64>(0)? as u64,
            index: row.get::<_, i64>(1)? as u32,
            lease_id: row.get::<_, i64>(2)? as u64,
            command: vec![],
            state: row.get(4)?,
            exit_code: row.get(5)?,
            stdout: row.get(6)?,
            stderr: row.get(7)?,
            output_truncated: row.get(8)?,
            started_at_ms: row.get::<_, i64>(9)? as u64,
            finished_at_ms: row.get::<_, Option<i64>>(10)?.map(|v| v as u64),
        },
        row.get(3)?,
    ))
}

impl AgentDb {
    pub fn open(path: &Path) -> StoreResult<Self> {
        let mut conn = open_connection(path, Durability::Full)?;
        migrate(&mut conn, MIGRATIONS)?;
        Ok(AgentDb { conn })
    }

    pub fn meta(&self, key: &str) -> StoreResult<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    pub fn put_meta(&self, key: &str, value: &str) -> StoreResult<()> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    /// Adds a partition with the next index never used on this host, so a
    /// withdrawn partition's index is never handed out again.
    pub fn insert_partition(&mut self, terms: &Terms) -> StoreResult<AgentPartitionRow> {
        let tx = self.conn.transaction()?;
        let last: i64 = tx
            .query_row(
                "SELECT value FROM meta WHERE key = 'last_partition_index'",
                [],
                |r| r.get::<_, String>(0),
            )
            .optional()?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let index = last + 1;
        tx.execute(
            "INSERT INTO partitions (idx, terms_json) VALUES (?1, ?2)",
            params![
                index,
                serde_json::to_string(terms).expect("terms serialize")
            ],
        )?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('last_partition_index', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![index.to_string()],
        )?;
        tx.commit()?;
        Ok(AgentPartitionRow {
            index: index as u32,
            terms: terms.clone(),
            registered: false,
            epoch: 0,
            lease_id: None,
            key_expires_at_ms: None,
            released_through_epoch: 0,
            built: false,
        })
    }

    pub fn update_partition(&self, row: &AgentPartitionRow) -> StoreResult<()> {
        self.conn.execute(
            "UPDATE partitions SET terms_json = ?2, registered = ?3, epoch = ?4, lease_id = ?5, key_expires_at_ms = ?6,
             released_through_epoch = ?7, built = ?8 WHERE idx = ?1",
            params![
                row.index as i64,
                serde_json::to_string(&row.terms).expect("terms serialize"),
                row.registered,
                row.epoch as i64,
                row.lease_id.map(|v| v as i64),
                row.key_expires_at_ms.map(|v| v as i64),
                row.released_through_epoch as i64,
                row.built
            ],
        )?;
        Ok(())
    }

    pub fn delete_partition(&self, index: u32) -> StoreResult<bool> {
        Ok(self.conn.execute(
            "DELETE FROM partitions WHERE idx = ?1",
            params![index as i64],
        )? > 0)
    }

    pub fn partition(&self, index: u32) -> StoreResult<Option<AgentPartitionRow>> {
        let row = self
            .conn
            .query_row(
                &format!("SELECT {PARTITION_COLUMNS} FROM partitions WHERE idx = ?1"),
                params![index as i64],
                partition_from_row,
            )
            .optional()?;
        row.map(finish_partition).transpose()
    }

    pub fn partitions(&self) -> StoreResult<Vec<AgentPartitionRow>> {
        let mut statement = self.conn.prepare(&format!(
            "SELECT {PARTITION_COLUMNS} FROM partitions ORDER BY idx"
        ))?;
        let rows = statement.query_map([], partition_from_row)?;
        rows.map(|r| finish_partition(r?)).collect()
    }

    pub fn insert_job(
        &self,
        index: u32,
        lease_id: u64,
        command: &[String],
        started_at_ms: u64,
    ) -> StoreResult<u64> {
        self.conn.execute(
            "INSERT INTO jobs (idx, lease_id, command_json, state, started_at_ms) VALUES (?1, ?2, ?3, 'running', ?4)",
            params![
                index as i64,
                lease_id as i64,
                serde_json::to_string(command).expect("strings serialize"),
                started_at_ms as i64
            ],
        )?;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    pub fn finish_job(&self, job: &JobRow) -> StoreResult<()> {
        self.conn.execute(
            "UPDATE jobs SET state = ?2, exit_code = ?3, stdout = ?4, stderr = ?5, output_truncated = ?6, finished_at_ms = ?7 WHERE job_id = ?1",
            params![
                job.job_id as i64,
                job.state,
                job.exit_code,
                job.stdout,
                job.stderr,
                job.output_truncated,
                job.finished_at_ms.map(|v| v as i64)
            ],
        )?;
        Ok(())
    }

    /// Marks jobs that were running when the agent stopped as lost: their
    /// outcome is unknown, and saying so is more honest than guessing.
    pub fn mark_running_jobs_lost(&self, now_ms: u64) -> StoreResult<usize> {
        Ok(self.conn.execute(
            "UPDATE jobs SET state = 'lost', finished_at_ms = ?1 WHERE state = 'running'",
            params![now_ms as i64],
        )?)
    }

    pub fn job(&self, job_id: u64) -> StoreResult<Option<JobRow>> {
        let row = self
            .conn
            .query_row(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ?1"),
                params![job_id as i64],
                job_from_row,
            )
            .optional()?;
        row.map(|(mut job, command_json)| {
            job.command = serde_json::from_str(&command_json).map_err(|e| corrupt("jobs", e))?;
            Ok(job)
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terms() -> Terms {
        Terms {
            vcpus: 1,
            cpu_cap_percent: 50,
            memory_mib: 256,
            disk_gib: 1,
            images: vec!["host".into()],
            price_per_hour_micros: 3600,
            isolation: None,
        }
    }

    #[test]
    fn indexes_are_never_reused_and_rows_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let mut db = AgentDb::open(&path).unwrap();
        let first = db.insert_partition(&terms()).unwrap();
        assert_eq!(first.index, 1);
        assert!(db.delete_partition(1).unwrap());
        let mut second = db.insert_partition(&terms()).unwrap();
        assert_eq!(second.index, 2);
        second.epoch = 3;
        second.lease_id = Some(11);
        second.registered = true;
        db.update_partition(&second).unwrap();
        drop(db);
        let db = AgentDb::open(&path).unwrap();
        assert_eq!(db.partitions().unwrap(), vec![second]);
        let job = db.insert_job(2, 11, &["echo".into()], 5).unwrap();
        assert_eq!(db.mark_running_jobs_lost(9).unwrap(), 1);
        assert_eq!(db.job(job).unwrap().unwrap().state, "lost");
    }
}
