//! `save` and `restore` (virsh's verbs) for Vessel domains: the domain's VMM writes a
//! snapshot of the paused VM into a new folder (`vmstate`, `memory`, and `domain`, the
//! domain's name), then stops; a restore starts the domain's VMM from that folder
//! (`vessel run --restore`) after checking that the saved VM is the one the domain's
//! definition describes. docs/SNAPSHOT.md has the files.

use std::path::{Path, PathBuf};

use super::{lock, DomainInfo, Manager};
use crate::domain::{DomainDef, DomainState, DriverKind};
use crate::driver;
use crate::error::{Error, Result};

/// The file in a save folder naming its domain.
const DOMAIN_FILE: &str = "domain";

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

/// Refuses a saved VM whose configuration is not the one `runtime` (the domain's
/// definition with its interfaces attached) would run: the domain was redefined since.
pub(super) fn check_matches(dir: &Path, runtime: &DomainDef, run: &driver::RunDir) -> Result<()> {
    let (state, mem) = vmm::snapshot::files_in(dir);
    let loaded = vmm::snapshot::load(&state, &mem)
        .map_err(|e| Error::invalid("saved domain", e.to_string()))?;
    let mut saved = loaded.snapshot.config;
    let mut now = driver::vessel_config(runtime, run);
    saved.serial = vmm::SerialConfig::Stdio;
    now.serial = vmm::SerialConfig::Stdio;
    if saved != now {
        return Err(Error::Conflict(format!(
            "the VM saved in {} is not the one domain {:?} now defines (it was redefined \
             since it was saved)",
            dir.display(),
            runtime.name
        )));
    }
    Ok(())
}

/// Moves `from` to `to`, copying when they are on different file systems.
fn move_file(from: &Path, to: &Path) -> Result<()> {
    if std::fs::rename(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to).map_err(|e| Error::io("moving the snapshot to", to, e))?;
    std::fs::remove_file(from).map_err(|e| Error::io("removing", from, e))
}

impl Manager {
    /// Saves a running Vessel domain's state into the new folder `path` and stops it.
    pub fn save(&self, name: &str, path: &Path) -> Result<()> {
        let dir = save_target(path)?;
        {
            let l = self.domain_lock(name);
            let _g = lock(&l);
            let (id, state) = self.active_id(name)?;
            if id.driver != DriverKind::Vessel {
                return Err(Error::Unsupported(
                    "save is not implemented for the QEMU driver yet".into(),
                ));
            }
            let run = self.run_dir(name);
            let was_running = state != DomainState::Paused;
            if was_running {
                driver::vmm_api(
                    &run,
                    "PATCH",
                    "/vm",
                    &serde_json::json!({"state": "Paused"}),
                )?;
            }
            // A jailed VMM sees only its own files and run folder: it writes the snapshot
            // there, and the files move to the folder asked for.
            let (run_state, run_mem) = (run.0.join("save.vmstate"), run.0.join("save.memory"));
            let saved = (|| {
                std::fs::create_dir(&dir).map_err(|e| Error::io("creating", &dir, e))?;
                super::restrict(&dir, 0o700)?;
                std::fs::write(dir.join(DOMAIN_FILE), format!("{name}\n"))
                    .map_err(|e| Error::io("writing", dir.join(DOMAIN_FILE), e))?;
                let (state_file, mem_file) = vmm::snapshot::files_in(&dir);
                driver::vmm_api(
                    &run,
                    "PUT",
                    "/snapshot/create",
                    &serde_json::json!({
                        "snapshot_type": "Full",
                        "snapshot_path": run_state,
                        "mem_file_path": run_mem,
                    }),
                )?;
                move_file(&run_state, &state_file)?;
                move_file(&run_mem, &mem_file)
            })();
            if let Err(e) = saved {
                let _ = std::fs::remove_dir_all(&dir);
                let _ = std::fs::remove_file(&run_state);
                let _ = std::fs::remove_file(&run_mem);
                if was_running {
                    let _ = driver::vmm_api(
                        &run,
                        "PATCH",
                        "/vm",
                        &serde_json::json!({"state": "Resumed"}),
                    );
                }
                return Err(e);
            }
        }
        self.destroy(name)?;
        self.events
            .emit(name, "saved", "shutoff", Some(dir.display().to_string()));
        Ok(())
    }

    /// Starts the domain saved in `path` from its saved state.
    pub fn restore(self: &std::sync::Arc<Self>, path: &Path) -> Result<DomainInfo> {
        let name = std::fs::read_to_string(path.join(DOMAIN_FILE))
            .map_err(|e| Error::io("reading the saved domain's name", path.join(DOMAIN_FILE), e))?;
        let name = name.trim();
        let def = self.store.get_domain(name)?;
        if def.driver != DriverKind::Vessel {
            return Err(Error::Unsupported(
                "restore is not implemented for the QEMU driver yet".into(),
            ));
        }
        // The serial log goes on: the guest does.
        let info = self.start_inner(name, false, crate::driver::Boot::Restore(path))?;
        self.events.emit(
            name,
            "restored",
            "running",
            Some(path.display().to_string()),
        );
        Ok(info)
    }
}
