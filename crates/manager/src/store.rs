//! Definitions in an embedded SQLite database: domains, storage pools, networks. Runtime
//! facts (which VMM process runs a domain) live next to the processes, in the state
//! directory's `run/` folder, so a restarted daemon finds them again.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use crate::domain::DomainDef;
use crate::error::{Error, Result};
use crate::network::NetworkDef;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS domains (
    name TEXT PRIMARY KEY,
    uuid TEXT NOT NULL UNIQUE,
    def TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pools (
    name TEXT PRIMARY KEY,
    path TEXT NOT NULL UNIQUE
);
-- The format each volume was created with: a volume's format is never probed from its
-- content, which a guest writes (see docs/SECURITY.md).
CREATE TABLE IF NOT EXISTS volumes (
    pool TEXT NOT NULL,
    name TEXT NOT NULL,
    format TEXT NOT NULL,
    PRIMARY KEY (pool, name)
);
-- libvirt's pool UUIDs (a table of their own, so databases from before them open as
-- they are).
CREATE TABLE IF NOT EXISTS pool_uuids (
    name TEXT PRIMARY KEY,
    uuid TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS networks (
    name TEXT PRIMARY KEY,
    def TEXT NOT NULL
);
";

#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation
    )
}

impl Store {
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        Ok(f(&conn)?)
    }

    fn decode(json: &str) -> Result<DomainDef> {
        serde_json::from_str(json)
            .map_err(|e| Error::invalid("stored domain definition", e.to_string()))
    }

    pub fn insert_domain(&self, d: &DomainDef) -> Result<()> {
        let json = serde_json::to_string(d).map_err(|e| Error::invalid("domain", e.to_string()))?;
        let uuid = d.uuid.clone().unwrap_or_default();
        let r = self.with(|c| {
            c.execute(
                "INSERT INTO domains (name, uuid, def) VALUES (?1, ?2, ?3)",
                params![d.name, uuid, json],
            )
        });
        match r {
            Err(Error::Db(e)) if is_unique_violation(&e) && e.to_string().contains("uuid") => {
                Err(Error::Exists {
                    kind: "domain with uuid",
                    name: uuid,
                })
            }
            Err(Error::Db(e)) if is_unique_violation(&e) => Err(Error::Exists {
                kind: "domain",
                name: d.name.clone(),
            }),
            other => other.map(|_| ()),
        }
    }

    /// Replaces an existing definition (same name).
    pub fn update_domain(&self, d: &DomainDef) -> Result<()> {
        let json = serde_json::to_string(d).map_err(|e| Error::invalid("domain", e.to_string()))?;
        let n = self.with(|c| {
            c.execute(
                "UPDATE domains SET def = ?2 WHERE name = ?1",
                params![d.name, json],
            )
        })?;
        if n == 0 {
            return Err(Error::not_found("domain", &d.name));
        }
        Ok(())
    }

    pub fn get_domain(&self, name: &str) -> Result<DomainDef> {
        let json: Option<String> = self.with(|c| {
            c.query_row("SELECT def FROM domains WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
        })?;
        match json {
            Some(j) => Self::decode(&j),
            None => Err(Error::not_found("domain", name)),
        }
    }

    pub fn list_domains(&self) -> Result<Vec<DomainDef>> {
        let rows: Vec<String> = self.with(|c| {
            let mut st = c.prepare("SELECT def FROM domains ORDER BY name")?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect()
        })?;
        rows.iter().map(|j| Self::decode(j)).collect()
    }

    pub fn delete_domain(&self, name: &str) -> Result<()> {
        let n = self.with(|c| c.execute("DELETE FROM domains WHERE name = ?1", [name]))?;
        if n == 0 {
            return Err(Error::not_found("domain", name));
        }
        Ok(())
    }

    pub fn insert_pool(&self, name: &str, path: &Path) -> Result<()> {
        let r = self.with(|c| {
            c.execute(
                "INSERT INTO pools (name, path) VALUES (?1, ?2)",
                params![name, path.to_string_lossy()],
            )
        });
        match r {
            Err(Error::Db(e)) if is_unique_violation(&e) => Err(Error::Exists {
                kind: "pool (or a pool on that path)",
                name: name.to_string(),
            }),
            other => other.map(|_| ()),
        }
    }

    pub fn get_pool(&self, name: &str) -> Result<std::path::PathBuf> {
        let p: Option<String> = self.with(|c| {
            c.query_row("SELECT path FROM pools WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
        })?;
        p.map(Into::into)
            .ok_or_else(|| Error::not_found("pool", name))
    }

    /// The pool with this UUID, if any.
    pub fn pool_with_uuid(&self, uuid: &str) -> Result<Option<String>> {
        self.with(|c| {
            c.query_row("SELECT name FROM pool_uuids WHERE uuid = ?1", [uuid], |r| {
                r.get(0)
            })
            .optional()
        })
    }

    /// Records a pool's UUID (replacing an older record).
    pub fn set_pool_uuid(&self, name: &str, uuid: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO pool_uuids (name, uuid) VALUES (?1, ?2)",
                params![name, uuid],
            )
        })
        .map(|_| ())
    }

    /// A pool's UUID; None for a pool defined before Vessel kept them.
    pub fn pool_uuid(&self, name: &str) -> Result<Option<String>> {
        self.with(|c| {
            c.query_row("SELECT uuid FROM pool_uuids WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
        })
    }

    pub fn list_pools(&self) -> Result<Vec<(String, std::path::PathBuf)>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT name, path FROM pools ORDER BY name")?;
            let rows = st.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?.into()))
            })?;
            rows.collect()
        })
    }

    pub fn delete_pool(&self, name: &str) -> Result<()> {
        let n = self.with(|c| {
            let n = c.execute("DELETE FROM pools WHERE name = ?1", [name])?;
            c.execute("DELETE FROM pool_uuids WHERE name = ?1", [name])?;
            // A pool defined again under this name may be another folder: its files get
            // no formats from this one's records.
            c.execute("DELETE FROM volumes WHERE pool = ?1", [name])?;
            Ok(n)
        })?;
        if n == 0 {
            return Err(Error::not_found("pool", name));
        }
        Ok(())
    }

    /// Records the format a volume was created with (replacing an older record).
    pub fn set_volume_format(&self, pool: &str, vol: &str, format: block::Format) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO volumes (pool, name, format) VALUES (?1, ?2, ?3)",
                params![pool, vol, format.to_string()],
            )
        })
        .map(|_| ())
    }

    /// The recorded format of a volume; `None` for a file nobody created through the
    /// manager (it is raw: see [`crate::storage::volume_info`]).
    pub fn volume_format(&self, pool: &str, vol: &str) -> Result<Option<block::Format>> {
        let f: Option<String> = self.with(|c| {
            c.query_row(
                "SELECT format FROM volumes WHERE pool = ?1 AND name = ?2",
                [pool, vol],
                |r| r.get(0),
            )
            .optional()
        })?;
        // An unknown name in the table (written by a newer version) is not guessed at.
        Ok(f.and_then(|s| s.parse().ok()))
    }

    pub fn forget_volume(&self, pool: &str, vol: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "DELETE FROM volumes WHERE pool = ?1 AND name = ?2",
                [pool, vol],
            )
        })
        .map(|_| ())
    }
}

impl Store {
    pub fn insert_network(&self, n: &NetworkDef) -> Result<()> {
        let json =
            serde_json::to_string(n).map_err(|e| Error::invalid("network", e.to_string()))?;
        let r = self.with(|c| {
            c.execute(
                "INSERT INTO networks (name, def) VALUES (?1, ?2)",
                params![n.name, json],
            )
        });
        match r {
            Err(Error::Db(e)) if is_unique_violation(&e) => Err(Error::Exists {
                kind: "network",
                name: n.name.clone(),
            }),
            other => other.map(|_| ()),
        }
    }

    pub fn update_network(&self, n: &NetworkDef) -> Result<()> {
        let json =
            serde_json::to_string(n).map_err(|e| Error::invalid("network", e.to_string()))?;
        let k = self.with(|c| {
            c.execute(
                "UPDATE networks SET def = ?2 WHERE name = ?1",
                params![n.name, json],
            )
        })?;
        if k == 0 {
            return Err(Error::not_found("network", &n.name));
        }
        Ok(())
    }

    pub fn get_network(&self, name: &str) -> Result<NetworkDef> {
        let json: Option<String> = self.with(|c| {
            c.query_row("SELECT def FROM networks WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
        })?;
        let j = json.ok_or_else(|| Error::not_found("network", name))?;
        serde_json::from_str(&j)
            .map_err(|e| Error::invalid("stored network definition", e.to_string()))
    }

    pub fn list_networks(&self) -> Result<Vec<NetworkDef>> {
        let rows: Vec<String> = self.with(|c| {
            let mut st = c.prepare("SELECT def FROM networks ORDER BY name")?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect()
        })?;
        rows.iter()
            .map(|j| {
                serde_json::from_str(j)
                    .map_err(|e| Error::invalid("stored network definition", e.to_string()))
            })
            .collect()
    }

    pub fn delete_network(&self, name: &str) -> Result<()> {
        let n = self.with(|c| c.execute("DELETE FROM networks WHERE name = ?1", [name]))?;
        if n == 0 {
            return Err(Error::not_found("network", name));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_persist_and_names_are_unique() {
        let dir = std::env::temp_dir().join(format!("vessel-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("state.db");
        let _ = std::fs::remove_file(&db);
        let mut d: DomainDef =
            serde_json::from_str(r#"{"name":"a","uuid":"u1","vm":{"kernel":"/k"}}"#).unwrap();
        {
            let s = Store::open(&db).unwrap();
            s.insert_domain(&d).unwrap();
            d.uuid = Some("u2".into());
            assert!(matches!(
                s.insert_domain(&d),
                Err(Error::Exists { kind: "domain", .. })
            ));
            d.name = "b".into();
            d.uuid = Some("u1".into());
            assert!(matches!(
                s.insert_domain(&d),
                Err(Error::Exists {
                    kind: "domain with uuid",
                    ..
                })
            ));
            d.name = "a".into();
            s.insert_pool("p", Path::new("/x")).unwrap();
            assert!(matches!(
                s.insert_pool("q", Path::new("/x")),
                Err(Error::Exists { .. })
            ));
        }
        let s = Store::open(&db).unwrap();
        assert_eq!(s.get_domain("a").unwrap().uuid.as_deref(), Some("u1"));
        assert_eq!(s.list_domains().unwrap().len(), 1);
        assert_eq!(s.list_pools().unwrap().len(), 1);
        s.delete_domain("a").unwrap();
        assert!(matches!(s.get_domain("a"), Err(Error::NotFound { .. })));
        assert!(matches!(s.delete_domain("a"), Err(Error::NotFound { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
