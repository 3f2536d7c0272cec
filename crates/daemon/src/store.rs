//! The daemon's durable state: one row per sandbox in an SQLite database (WAL,
//! `synchronous=FULL`), the whole [`Record`] as JSON. Every change is written here before
//! the daemon acts on it, so a daemon killed at any moment finds every deployment again.

use std::path::{Path, PathBuf};

use gpucell_api::{DeployRequest, SandboxStatus};
use gpucell_host::devices::record::Owner;
use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the daemon's database {path:?}; check that the state directory is writable and not used by another gpucelld")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the daemon's database {path:?}: {what}")]
    Query {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the daemon's database {path:?}: the record of sandbox {id} is not valid JSON: {problem}; remove the row or restore a backup")]
    Garbled {
        path: PathBuf,
        id: String,
        problem: String,
    },
}

/// Everything the daemon knows of one sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub status: SandboxStatus,
    pub request: DeployRequest,
    /// The supervisor of the current run, when one was started.
    #[serde(default)]
    pub supervisor: Option<Owner>,
    /// When a pending restart may start (ms since the epoch).
    #[serde(default)]
    pub next_start_ms: Option<u64>,
    /// When a stop escalates to SIGKILL.
    #[serde(default)]
    pub kill_at_ms: Option<u64>,
}

pub struct Store {
    path: PathBuf,
    conn: Connection,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(open)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS sandboxes (id TEXT PRIMARY KEY, record TEXT NOT NULL);",
        )
        .map_err(open)?;
        Ok(Store {
            path: path.to_path_buf(),
            conn,
        })
    }

    fn query(&self, what: &'static str) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Query {
            path: self.path.clone(),
            what,
            source,
        }
    }

    pub fn put(&self, record: &Record) -> Result<(), StoreError> {
        let json = serde_json::to_string(record).map_err(|e| StoreError::Garbled {
            path: self.path.clone(),
            id: record.status.id.clone(),
            problem: e.to_string(),
        })?;
        self.conn
            .execute(
                "INSERT INTO sandboxes (id, record) VALUES (?1, ?2)
                 ON CONFLICT(id) DO UPDATE SET record = excluded.record",
                params![record.status.id, json],
            )
            .map_err(self.query("writing a sandbox"))?;
        Ok(())
    }

    pub fn remove(&self, id: &str) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM sandboxes WHERE id = ?1", params![id])
            .map_err(self.query("removing a sandbox"))?;
        Ok(())
    }

    pub fn all(&self) -> Result<Vec<Record>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, record FROM sandboxes ORDER BY id")
            .map_err(self.query("listing sandboxes"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(self.query("listing sandboxes"))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, json) = row.map_err(self.query("listing sandboxes"))?;
            let record = serde_json::from_str(&json).map_err(|e| StoreError::Garbled {
                path: self.path.clone(),
                id,
                problem: e.to_string(),
            })?;
            out.push(record);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpucell_api::{Desired, RestartPolicy, SandboxState};

    pub fn record(id: &str) -> Record {
        let request = DeployRequest::new(gpucell_runtime::RunRequest::new("oci:/x:y"));
        Record {
            status: SandboxStatus {
                id: id.into(),
                image: "oci:/x:y".into(),
                state: SandboxState::Pending,
                desired: Desired::Running,
                created_ms: 1,
                timestamps: Default::default(),
                exit_code: None,
                error: None,
                devices: vec![],
                health: None,
                restarts: 0,
                phases_ms: Default::default(),
                labels: Default::default(),
                restart: RestartPolicy::Never,
                run_id: None,
                report: None,
            },
            request,
            supervisor: Some(Owner {
                pid: 7,
                start_time: 9,
            }),
            next_start_ms: None,
            kill_at_ms: None,
        }
    }

    #[test]
    fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.db");
        {
            let store = Store::open(&path).unwrap();
            store.put(&record("a")).unwrap();
            let mut b = record("b");
            store.put(&b).unwrap();
            b.status.state = SandboxState::Running;
            store.put(&b).unwrap();
            store.put(&record("c")).unwrap();
            store.remove("c").unwrap();
        }
        let store = Store::open(&path).unwrap();
        let all = store.all().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].status.state, SandboxState::Running);
        assert_eq!(all[0].supervisor.unwrap().pid, 7);
    }

    #[test]
    fn a_garbled_row_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.db");
        let store = Store::open(&path).unwrap();
        store
            .conn
            .execute("INSERT INTO sandboxes VALUES ('x', '{')", [])
            .unwrap();
        let err = store.all().unwrap_err().to_string();
        assert!(err.contains("sandbox x"), "{err}");
    }
}
