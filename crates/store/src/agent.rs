//! The agent's partition table (logical partition database 4, FIG. 2:
//! partition id 41, allocated resources 42, lending flag 43, key material 44)
//! and its job history.

use crate::{corrupt, migrate::migrate, open_connection, Durability, StoreResult};
use leasehold_core::fence::{FencePhase, PartitionFence};
use leasehold_core::job::JobState;
use leasehold_core::Terms;
use rusqlite::{params, Connection, OptionalExtension, Row};
use std::path::Path;

const MIGRATIONS: &[&str] = &[
    r#"
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
"#,
    // The fence's phase (older rows get theirs from the columns they had:
    // a lease, or files of an ended lease waiting for the wipe), and the
    // cores the oci driver gave the partition, kept across restarts.
    r#"
ALTER TABLE partitions ADD COLUMN phase TEXT NOT NULL DEFAULT 'free';
UPDATE partitions SET phase = CASE
    WHEN lease_id IS NOT NULL THEN 'leased'
    WHEN built = 1 THEN 'fenced'
    ELSE 'free' END;
ALTER TABLE partitions ADD COLUMN cores TEXT NOT NULL DEFAULT '';
"#,
];

/// One row of the partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPartitionRow {
    pub index: u32,
    pub terms: Terms,
    /// Lending flag 43: registered with the broker.
    pub registered: bool,
    /// The partition's lending state (`leasehold_core::fence`).
    pub fence: PartitionFence,
    /// The cores the driver gave the partition (empty: none yet).
    pub cores: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRow {
    pub job_id: u64,
    pub index: u32,
    pub lease_id: u64,
    pub command: Vec<String>,
    pub state: JobState,
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

const PARTITION_COLUMNS: &str = "idx, terms_json, registered, epoch, lease_id, key_expires_at_ms, released_through_epoch, built, phase, cores";

/// A partition row as read, before its JSON and text columns are parsed.
struct RawPartition {
    index: u32,
    terms_json: String,
    registered: bool,
    epoch: u64,
    lease_id: Option<u64>,
    key_expires_at_ms: Option<u64>,
    released_through_epoch: u64,
    built: bool,
    phase: String,
    cores: String,
}

fn partition_from_row(row: &Row<'_>) -> rusqlite::Result<RawPartition> {
    Ok(RawPartition {
        index: row.get::<_, i64>(0)? as u32,
        terms_json: row.get(1)?,
        registered: row.get(2)?,
        epoch: row.get::<_, i64>(3)? as u64,
        lease_id: row.get::<_, Option<i64>>(4)?.map(|v| v as u64),
        key_expires_at_ms: row.get::<_, Option<i64>>(5)?.map(|v| v as u64),
        released_through_epoch: row.get::<_, i64>(6)? as u64,
        built: row.get(7)?,
        phase: row.get(8)?,
        cores: row.get(9)?,
    })
}

fn finish_partition(raw: RawPartition) -> StoreResult<AgentPartitionRow> {
    let terms = serde_json::from_str(&raw.terms_json).map_err(|e| corrupt("partitions", e))?;
    let phase = match (raw.phase.as_str(), raw.lease_id) {
        ("free", _) => FencePhase::Free,
        ("leased", Some(lease_id)) => FencePhase::Leased {
            lease_id,
            key_expires_at_ms: raw.key_expires_at_ms,
            built: raw.built,
        },
        ("fenced", _) => FencePhase::Fenced,
        ("wiping", _) => FencePhase::Wiping,
        ("withdrawn", _) => FencePhase::Withdrawn,
        (other, _) => {
            return Err(corrupt(
                "partitions",
                format!("partition {}: phase '{other}' without a lease", raw.index),
            ))
        }
    };
    let cores = raw
        .cores
        .split(',')
        .filter(|c| !c.is_empty())
        .map(|c| c.parse::<u32>().map_err(|e| corrupt("partitions", e)))
        .collect::<StoreResult<Vec<u32>>>()?;
    Ok(AgentPartitionRow {
        index: raw.index,
        terms,
        registered: raw.registered,
        fence: PartitionFence {
            epoch: raw.epoch,
            released_through_epoch: raw.released_through_epoch,
            phase,
        },
        cores,
    })
}

fn cores_text(cores: &[u32]) -> String {
    cores
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

const JOB_COLUMNS: &str = "job_id, idx, lease_id, command_json, state, exit_code, stdout, stderr, output_truncated, started_at_ms, finished_at_ms";

fn job_from_row(row: &Row<'_>) -> rusqlite::Result<(JobRow, String, String)> {
    Ok((
        JobRow {
            job_id: row.get::<_, i64>(0)? as u64,
            index: row.get::<_, i64>(1)? as u32,
            lease_id: row.get::<_, i64>(2)? as u64,
            command: vec![],
            state: JobState::Running,
            exit_code: row.get(5)?,
            stdout: row.get(6)?,
            stderr: row.get(7)?,
            output_truncated: row.get(8)?,
            started_at_ms: row.get::<_, i64>(9)? as u64,
            finished_at_ms: row.get::<_, Option<i64>>(10)?.map(|v| v as u64),
        },
        row.get(3)?,
        row.get(4)?,
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
    /// A partition a broker carved out of this host's share, at the index
    /// the broker chose (in the share's range, never a fixed partition's).
    pub fn insert_carved_partition(
        &mut self,
        index: u32,
        terms: &Terms,
    ) -> StoreResult<AgentPartitionRow> {
        self.conn.execute(
            "INSERT INTO partitions (idx, terms_json, registered) VALUES (?1, ?2, 1)",
            params![
                index,
                serde_json::to_string(terms).expect("terms serialize")
            ],
        )?;
        Ok(AgentPartitionRow {
            index,
            terms: terms.clone(),
            registered: true,
            fence: PartitionFence::new_free(),
            cores: Vec::new(),
        })
    }

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
            fence: PartitionFence::new_free(),
            cores: Vec::new(),
        })
    }

    /// Writes a partition's terms and lending flag, and nothing of its
    /// fence: a copy of the row read before a notice moved the fence must
    /// not move it back.
    pub fn update_terms_and_registration(&self, row: &AgentPartitionRow) -> StoreResult<()> {
        self.conn.execute(
            "UPDATE partitions SET terms_json = ?2, registered = ?3 WHERE idx = ?1",
            params![
                row.index as i64,
                serde_json::to_string(&row.terms).expect("terms serialize"),
                row.registered,
            ],
        )?;
        Ok(())
    }

    /// Writes a partition's fence (`leasehold_core::fence`), and only it.
    pub fn update_fence(&self, index: u32, fence: &PartitionFence) -> StoreResult<()> {
        self.conn.execute(
            "UPDATE partitions SET epoch = ?2, lease_id = ?3, key_expires_at_ms = ?4,
             released_through_epoch = ?5, built = ?6, phase = ?7 WHERE idx = ?1",
            params![
                index as i64,
                fence.epoch as i64,
                fence.lease_id().map(|v| v as i64),
                fence.key_expires_at_ms().map(|v| v as i64),
                fence.released_through_epoch as i64,
                fence.built(),
                fence.phase.as_str(),
            ],
        )?;
        Ok(())
    }

    /// Writes the cores the driver gave a partition.
    pub fn update_cores(&self, index: u32, cores: &[u32]) -> StoreResult<()> {
        self.conn.execute(
            "UPDATE partitions SET cores = ?2 WHERE idx = ?1",
            params![index as i64, cores_text(cores)],
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
            "INSERT INTO jobs (idx, lease_id, command_json, state, started_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                index as i64,
                lease_id as i64,
                serde_json::to_string(command).expect("strings serialize"),
                JobState::Running.as_str(),
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
                job.state.as_str(),
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
            "UPDATE jobs SET state = ?2, finished_at_ms = ?1 WHERE state = ?3",
            params![
                now_ms as i64,
                JobState::Lost.as_str(),
                JobState::Running.as_str()
            ],
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
        row.map(|(mut job, command_json, state)| {
            job.command = serde_json::from_str(&command_json).map_err(|e| corrupt("jobs", e))?;
            job.state = state.parse().map_err(|e| corrupt("jobs", e))?;
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
        second.fence = PartitionFence {
            epoch: 3,
            released_through_epoch: 2,
            phase: FencePhase::Leased {
                lease_id: 11,
                key_expires_at_ms: Some(99),
                built: true,
            },
        };
        second.registered = true;
        second.cores = vec![0, 3];
        db.update_terms_and_registration(&second).unwrap();
        db.update_fence(2, &second.fence).unwrap();
        db.update_cores(2, &second.cores).unwrap();
        drop(db);
        let db = AgentDb::open(&path).unwrap();
        assert_eq!(db.partitions().unwrap(), vec![second]);
        let job = db.insert_job(2, 11, &["echo".into()], 5).unwrap();
        assert_eq!(db.mark_running_jobs_lost(9).unwrap(), 1);
        assert_eq!(db.job(job).unwrap().unwrap().state, JobState::Lost);
    }

    #[test]
    fn a_database_from_before_the_fence_opens_with_each_row_in_its_phase() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            let terms = serde_json::to_string(&terms()).unwrap();
            for (index, lease_id, built) in
                [(1, Some(7i64), true), (2, None, true), (3, None, false)]
            {
                conn.execute(
                    "INSERT INTO partitions (idx, terms_json, epoch, lease_id, key_expires_at_ms, released_through_epoch, built)
                     VALUES (?1, ?2, 4, ?3, 500, 3, ?4)",
                    params![index, terms, lease_id, built],
                )
                .unwrap();
            }
        }
        let db = AgentDb::open(&path).unwrap();
        let phases: Vec<FencePhase> = db
            .partitions()
            .unwrap()
            .iter()
            .map(|r| r.fence.phase)
            .collect();
        assert_eq!(
            phases,
            vec![
                FencePhase::Leased {
                    lease_id: 7,
                    key_expires_at_ms: Some(500),
                    built: true
                },
                FencePhase::Fenced,
                FencePhase::Free,
            ]
        );
        assert!(db.partitions().unwrap().iter().all(|r| r.cores.is_empty()));
        let fence = db.partition(1).unwrap().unwrap().fence;
        assert_eq!((fence.epoch, fence.released_through_epoch), (4, 3));
    }
}
