//! `save` and `restore` (virsh's verbs), and `managedsave`: a Vessel domain's VMM writes
//! a snapshot of the paused VM into a new folder (`vmstate`, `memory`, and `domain`, the
//! domain's name), then stops; a restore starts the domain's VMM from that folder
//! (`vessel run --restore`) after checking that the saved VM is the one the domain's
//! definition describes, each driver writing and checking its own state files
//! ([`crate::driver::Driver::save_state`]). docs/SNAPSHOT.md has the files.

use std::path::{Path, PathBuf};

use super::{lock, DomainInfo, Manager};
use crate::domain::DomainState;
use crate::driver;
use crate::error::{Error, Result};
use crate::state::{End, Start};

/// The file in a save folder naming its domain.
pub(super) const DOMAIN_FILE: &str = "domain";
/// In a managed save folder: the daemon saved the domain as it ended, and the next daemon
/// starts it again.
const RESUME_FILE: &str = "resume";

/// A save target: an absolute path that does not exist yet, in a folder that does.
fn save_target(path: &Path) -> Result<PathBuf> {
    if !path.is_absolute() {
        return Err(Error::invalid(
            "save path",
            format!("{}: give an absolute path", path.display()),
        ));
    }
    if path.exists() {
        return Err(Error::invalid(
            "save path",
            format!("{} exists: saves never overwrite", path.display()),
        ));
    }
    match path.parent() {
        Some(p) if p.is_dir() => Ok(path.to_path_buf()),
        _ => Err(Error::invalid(
            "save path",
            format!("{}: its folder does not exist", path.display()),
        )),
    }
}

/// Moves `from` to `to`, copying when they are on different file systems.
pub(crate) fn move_file(from: &Path, to: &Path) -> Result<()> {
    if std::fs::rename(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to).map_err(|e| Error::io("moving the snapshot to", to, e))?;
    std::fs::remove_file(from).map_err(|e| Error::io("removing", from, e))
}

impl Manager {
    /// Where the daemon keeps a domain's managed save.
    fn managed_save_dir(&self, name: &str) -> PathBuf {
        self.cfg.state_dir.join("managed-save").join(name)
    }

    /// The domain's managed save, if it has one.
    pub fn managed_save(&self, name: &str) -> Option<PathBuf> {
        let dir = self.managed_save_dir(name);
        dir.join(DOMAIN_FILE).is_file().then_some(dir)
    }

    /// Whether the last daemon saved the domain as it ended.
    pub(super) fn saved_at_shutdown(&self, name: &str) -> bool {
        self.managed_save(name)
            .is_some_and(|d| d.join(RESUME_FILE).is_file())
    }

    /// `managedsave`: saves the running domain where the daemon keeps it and stops
    /// it; its next start restores it. `at_shutdown` marks it for the next daemon.
    pub fn managed_save_domain(&self, name: &str, at_shutdown: bool) -> Result<()> {
        let dir = self.managed_save_dir(name);
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io("creating", parent, e))?;
        }
        if dir.exists() {
            // A stale one (the domain was started without restoring it): replaced.
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io("removing", &dir, e))?;
        }
        self.save(name, &dir)?;
        if at_shutdown {
            std::fs::write(dir.join(RESUME_FILE), b"")
                .map_err(|e| Error::io("marking", dir.join(RESUME_FILE), e))?;
        }
        Ok(())
    }

    /// `managedsave-remove`: the domain's next start boots it.
    pub fn managed_save_remove(&self, name: &str) -> Result<()> {
        self.store.get_domain(name)?;
        match self.managed_save(name) {
            Some(dir) => std::fs::remove_dir_all(&dir).map_err(|e| Error::io("removing", &dir, e)),
            None => Err(Error::Conflict(format!(
                "domain {name:?} has no managed save"
            ))),
        }
    }

    /// Starts the domain from its managed save, which is then dropped (a domain
    /// redefined since refuses it: `managedsave-remove` first).
    pub(super) fn start_managed(
        self: &std::sync::Arc<Self>,
        name: &str,
        dir: &Path,
        paused: bool,
    ) -> Result<DomainInfo> {
        let info = self.start_inner(
            name,
            false,
            crate::driver::Boot::Restore { dir, paused },
            Start::Restore,
        )?;
        // QEMU has loaded the state (its incoming stream ended) once it runs.
        if let Err(e) = std::fs::remove_dir_all(dir) {
            tracing::warn!(domain = name, "removing the managed save: {e}");
        }
        self.events.emit_with(
            name,
            "restored",
            if paused { "paused" } else { "running" },
            Some("restored"),
            Some("managed save".into()),
        );
        Ok(info)
    }

    /// Managedsaves every running domain (the daemon is ending: host shutdown).
    pub fn save_all_at_shutdown(&self) {
        let running = self.running_names();
        for name in running {
            match self.managed_save_domain(&name, true) {
                Ok(()) => tracing::info!(domain = %name, "saved at shutdown"),
                Err(e) => tracing::warn!(domain = %name, "saving at shutdown failed: {e}"),
            }
        }
    }

    /// Saves a running domain's state into the new folder `path` and stops it.
    pub fn save(&self, name: &str, path: &Path) -> Result<()> {
        let dir = save_target(path)?;
        self.capture(name, &dir, &|| Ok(()), true)?;
        self.end_vmm(name, End::Saved)?;
        self.events.emit_with(
            name,
            "saved",
            "shut off",
            Some("saved"),
            Some(dir.display().to_string()),
        );
        Ok(())
    }

    /// Writes the running domain's VM state into the new folder `dir` (its driver's
    /// files and `domain`), the VM paused meanwhile; `also` runs before it goes on
    /// (copies of its disks). With `stop` it stays paused (the caller stops it), else it
    /// resumes if it ran. On failure nothing is left in `dir` and the VM goes on as it
    /// was.
    pub(super) fn capture(
        &self,
        name: &str,
        dir: &Path,
        also: &dyn Fn() -> Result<()>,
        stop: bool,
    ) -> Result<()> {
        let l = self.domain_lock(name);
        let _g = lock(&l);
        let def = self.store.get_domain(name)?;
        let (id, state) = self.active_id(name)?;
        self.refuse_changed_live(name, "save the state of")?;
        let d = driver::of(id.driver);
        let run = self.run_dir(name);
        let was_running = state != DomainState::Paused;
        if was_running {
            d.pause(&run)?;
        }
        let saved = (|| {
            std::fs::create_dir(dir).map_err(|e| Error::io("creating", dir, e))?;
            super::restrict(dir, 0o700)?;
            std::fs::write(dir.join(DOMAIN_FILE), format!("{name}\n"))
                .map_err(|e| Error::io("writing", dir.join(DOMAIN_FILE), e))?;
            d.save_state(&run, &def, dir)?;
            also()
        })();
        if let Err(e) = saved {
            let _ = std::fs::remove_dir_all(dir);
            if was_running {
                let _ = d.resume(&run);
            }
            return Err(e);
        }
        if was_running && !stop {
            d.resume(&run)?;
        }
        Ok(())
    }

    /// Starts the domain saved in `path` from its saved state.
    pub fn restore(self: &std::sync::Arc<Self>, path: &Path) -> Result<DomainInfo> {
        let name = std::fs::read_to_string(path.join(DOMAIN_FILE))
            .map_err(|e| Error::io("reading the saved domain's name", path.join(DOMAIN_FILE), e))?;
        let name = name.trim();
        self.store.get_domain(name)?;
        // The serial log goes on: the guest does.
        let info = self.start_inner(
            name,
            false,
            crate::driver::Boot::Restore {
                dir: path,
                paused: false,
            },
            Start::Restore,
        )?;
        self.events.emit_with(
            name,
            "restored",
            "running",
            Some("restored"),
            Some(path.display().to_string()),
        );
        Ok(info)
    }
}
