//! `save` / `restore` (and so `managedsave`) for QEMU domains, through QMP: the stopped
//! VM's state goes to a file with `migrate "exec:cat > FILE"` (QEMU 7.2 has no `file:`
//! migration), and a restore starts QEMU with `-incoming "exec:cat FILE"` and continues
//! the VM once it is loaded. The save folder also keeps the definition's machine, so a
//! domain redefined since refuses the save.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{lock, Manager};
use crate::domain::DomainDef;
use crate::driver::{self, RunDir};
use crate::error::{Error, Result};
use crate::qmp::Qmp;

/// QEMU's migration stream in a save folder.
pub(crate) const QEMU_STATE: &str = "qemu.state";
/// The domain's machine (`vm`) as saved, in a save folder.
const DEFINITION: &str = "definition.json";
/// How long a save or a load may take.
const LIMIT: Duration = Duration::from_secs(120);

/// `path` quoted for the shell QEMU's `exec:` runs; paths with a quote are refused.
pub(crate) fn shell_quoted(path: &Path) -> Result<String> {
    let s = path.to_str().filter(|s| !s.contains('\'')).ok_or_else(|| {
        Error::invalid(
            "save path",
            format!(
                "{}: a QEMU save path must be UTF-8 without quotes",
                path.display()
            ),
        )
    })?;
    Ok(format!("'{s}'"))
}

/// Refuses a QEMU save whose machine is not the domain's now.
pub(super) fn check_matches(dir: &Path, def: &DomainDef) -> Result<()> {
    let saved: vmm::VmConfig = std::fs::read(dir.join(DEFINITION))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| {
            Error::invalid(
                "saved domain",
                format!("{} holds no QEMU save", dir.display()),
            )
        })?;
    if saved != def.vm {
        return Err(Error::Conflict(format!(
            "the VM saved in {} is not the one domain {:?} now defines (it was redefined \
             since it was saved)",
            dir.display(),
            def.name
        )));
    }
    Ok(())
}

/// After a restore's QEMU has loaded the state (it waits paused, as the VM was saved
/// stopped), lets it run.
pub(super) fn continue_after_load(run: &RunDir) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let st = driver::qmp_status(run)?;
        match st.as_str() {
            "paused" | "postmigrate" | "prelaunch" => {
                driver::qmp(run, "cont")?;
                return Ok(());
            }
            "running" => return Ok(()),
            _ if t0.elapsed() > LIMIT => {
                return Err(Error::Conflict(format!(
                    "QEMU did not load the saved state within {LIMIT:?} (status {st})"
                )))
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

impl Manager {
    /// Saves the running QEMU domain `name` into the new folder `dir` (its VM stopped,
    /// and left stopped for the caller to end).
    pub(super) fn qemu_save(&self, name: &str, dir: &Path, def: &DomainDef) -> Result<()> {
        let l = self.domain_lock(name);
        let _g = lock(&l);
        let run = self.run_dir(name);
        let stream = run.0.join("save.qemu-state");
        let quoted = shell_quoted(&stream)?;
        let mut q = Qmp::connect(&run.qmp(), Duration::from_secs(5))?;
        q.execute("stop", None)?;
        let saved = (|| -> Result<()> {
            // A file is not a network: no bandwidth cap (QEMU's default is 128 MiB/s).
            q.execute(
                "migrate-set-parameters",
                Some(json!({"max-bandwidth": 1u64 << 40})),
            )?;
            q.execute(
                "migrate",
                Some(json!({"uri": format!("exec:cat > {quoted}")})),
            )?;
            let t0 = Instant::now();
            loop {
                let m = q.execute("query-migrate", None)?;
                match m.get("status").and_then(|s| s.as_str()) {
                    Some("completed") => break,
                    Some("failed") | Some("cancelled") => {
                        return Err(Error::Conflict(format!("QEMU's save failed: {m}")))
                    }
                    _ if t0.elapsed() > LIMIT => {
                        return Err(Error::Conflict(format!("QEMU's save took over {LIMIT:?}")))
                    }
                    _ => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            std::fs::create_dir(dir).map_err(|e| Error::io("creating", dir, e))?;
            super::restrict(dir, 0o700)?;
            std::fs::write(dir.join(super::snapshots::DOMAIN_FILE), format!("{name}\n"))
                .map_err(|e| Error::io("writing", dir, e))?;
            let vm = serde_json::to_vec_pretty(&def.vm)
                .map_err(|e| Error::invalid("domain", e.to_string()))?;
            std::fs::write(dir.join(DEFINITION), vm).map_err(|e| Error::io("writing", dir, e))?;
            super::snapshots::move_file(&stream, &dir.join(QEMU_STATE))
        })();
        if let Err(e) = saved {
            let _ = std::fs::remove_dir_all(dir);
            let _ = std::fs::remove_file(&stream);
            let _ = q.execute("cont", None);
            return Err(e);
        }
        Ok(())
    }
}
