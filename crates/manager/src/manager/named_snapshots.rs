//! `snapshot-create-as`, `snapshot-list`, `snapshot-revert` and `snapshot-delete`
//! (virsh's verbs) for domains of either driver: a named snapshot of a domain is its VM
//! state (when it ran: the files its driver's save writes) and a copy of each of its
//! writable disks, taken with the VM paused, in `STATE/snapshots/DOMAIN/SNAPSHOT/`. A
//! revert stops the domain, puts the disks back, and starts it from the saved state
//! (or leaves it shut off, for a snapshot of a shut-off domain).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{lock, DomainInfo, Manager};
use crate::error::{Error, Result};

/// What `snapshot-list` shows of one snapshot (its `meta.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    pub description: Option<String>,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// The domain's state when taken: "running" (memory kept) or "shutoff" (disks only).
    pub state: String,
}

const META: &str = "meta.json";

/// A snapshot name: a DNS-label-like word, so that it is a safe folder name.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "snapshot name",
            format!("{name:?}: use letters, digits, '-', '_' and '.' (not first), at most 64"),
        ))
    }
}

/// Copies `from` to `to` (a reflink where the file system can).
fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| Error::io("copying the disk", from, e))
}

impl Manager {
    fn snapshots_dir(&self, domain: &str) -> PathBuf {
        self.cfg.state_dir.join("snapshots").join(domain)
    }

    /// The writable disks a snapshot keeps, copied whole while the VM is paused.
    ///
    /// A qcow2 image is copied as a raw one is. Vessel's qcow2 writes its metadata
    /// through (`block::qcow2`), so the file is whole once the VM is paused. QEMU caches
    /// qcow2 metadata, but flushes it when it stops and when its migration stream ends
    /// (the save runs before the copy), and reads it again when it goes on. A backing
    /// file is opened read-only and shared by the copy.
    fn snapshot_disks(&self, domain: &str) -> Result<Vec<PathBuf>> {
        let def = self.store.get_domain(domain)?;
        Ok(def
            .vm
            .disks
            .iter()
            .filter(|d| !d.read_only)
            .map(|d| d.path.clone())
            .collect())
    }

    /// `snapshot-create-as DOMAIN NAME`: the running domain's memory and devices and its
    /// disks (or, shut off, its disks only), the domain going on afterwards.
    pub fn snapshot_create(
        &self,
        domain: &str,
        name: &str,
        description: Option<String>,
    ) -> Result<SnapshotInfo> {
        check_name(name)?;
        let disks = self.snapshot_disks(domain)?;
        let dir = self.snapshots_dir(domain).join(name);
        if dir.exists() {
            return Err(Error::Conflict(format!(
                "domain {domain:?} has a snapshot {name:?} already"
            )));
        }
        let parent = self.snapshots_dir(domain);
        std::fs::create_dir_all(&parent).map_err(|e| Error::io("creating", &parent, e))?;
        let copy_disks = || -> Result<()> {
            let to = dir.join("disks");
            std::fs::create_dir_all(&to).map_err(|e| Error::io("creating", &to, e))?;
            for (i, d) in disks.iter().enumerate() {
                copy(d, &to.join(i.to_string()))?;
            }
            Ok(())
        };
        let running = self.is_active(domain);
        let taken = if running {
            self.capture(domain, &dir, &copy_disks, false)
        } else {
            let l = self.domain_lock(domain);
            let _g = lock(&l);
            std::fs::create_dir(&dir)
                .map_err(|e| Error::io("creating", &dir, e))
                .and_then(|()| copy_disks())
        };
        let info = SnapshotInfo {
            name: name.into(),
            description,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default(),
            state: if running { "running" } else { "shutoff" }.into(),
        };
        let written = taken.and_then(|()| {
            let json = serde_json::to_vec_pretty(&info)
                .map_err(|e| Error::invalid("snapshot", e.to_string()))?;
            std::fs::write(dir.join(META), json)
                .map_err(|e| Error::io("writing", dir.join(META), e))
        });
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        self.events.emit(
            domain,
            "snapshot-created",
            if running { "running" } else { "shut off" },
            Some(name.into()),
        );
        Ok(info)
    }

    /// `snapshot-list DOMAIN`, oldest first.
    pub fn snapshot_list(&self, domain: &str) -> Result<Vec<SnapshotInfo>> {
        self.store.get_domain(domain)?;
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.snapshots_dir(domain)) else {
            return Ok(out);
        };
        for e in entries.flatten() {
            let meta = e.path().join(META);
            if let Some(info) = std::fs::read(&meta)
                .ok()
                .and_then(|b| serde_json::from_slice::<SnapshotInfo>(&b).ok())
            {
                out.push(info);
            }
        }
        out.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
        Ok(out)
    }

    fn snapshot_dir(&self, domain: &str, name: &str) -> Result<PathBuf> {
        check_name(name)?;
        let dir = self.snapshots_dir(domain).join(name);
        if !dir.join(META).is_file() {
            return Err(Error::NotFound {
                kind: "snapshot",
                name: format!("{domain}/{name}"),
            });
        }
        Ok(dir)
    }

    /// `snapshot-revert DOMAIN NAME`: the domain as it was when the snapshot was taken.
    pub fn snapshot_revert(
        self: &std::sync::Arc<Self>,
        domain: &str,
        name: &str,
    ) -> Result<DomainInfo> {
        let dir = self.snapshot_dir(domain, name)?;
        let disks = self.snapshot_disks(domain)?;
        let saved = dir.join("disks");
        for i in 0..disks.len() {
            if !saved.join(i.to_string()).is_file() {
                return Err(Error::Conflict(format!(
                    "snapshot {name:?} of {domain:?} has not the domain's disks (it was \
                     redefined since)"
                )));
            }
        }
        let def = self.store.get_domain(domain)?;
        let driver = crate::driver::of(def.driver);
        let with_memory = driver.has_state(&dir);
        if with_memory && def.interfaces.is_empty() {
            // Before anything stops: a snapshot the domain's definition no longer fits is
            // refused with the domain left as it is. (With interfaces the start checks it,
            // once their TAP devices exist.)
            driver.check_state(&dir, &def, &def, &self.run_dir(domain))?;
        }
        if self.is_active(domain) {
            self.destroy(domain)?;
        }
        {
            let l = self.domain_lock(domain);
            let _g = lock(&l);
            for (i, d) in disks.iter().enumerate() {
                copy(&saved.join(i.to_string()), d)?;
            }
        }
        let info = if with_memory {
            self.start_inner(
                domain,
                false,
                crate::driver::Boot::Restore {
                    dir: &dir,
                    paused: false,
                },
                crate::state::Start::Snapshot,
            )?
        } else {
            self.info(domain)?.1
        };
        self.events.emit_with(
            domain,
            "snapshot-reverted",
            if with_memory { "running" } else { "shut off" },
            with_memory.then_some("from snapshot"),
            Some(name.into()),
        );
        Ok(info)
    }

    /// `snapshot-delete DOMAIN NAME`.
    pub fn snapshot_delete(&self, domain: &str, name: &str) -> Result<()> {
        let dir = self.snapshot_dir(domain, name)?;
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io("removing", &dir, e))?;
        self.events
            .emit(domain, "snapshot-deleted", "", Some(name.into()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names_are_safe_folder_names() {
        for ok in ["before-upgrade", "s1", "v1.2_b"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", ".hidden", "x y", &"n".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
