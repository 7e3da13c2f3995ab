//! `migrate NAME --live DEST` (virsh's verb) between two daemons, for domains of either
//! driver (each sends through [`crate::driver::Driver::migrate`]).
//!
//! The destination daemon defines the domain from the definition the source sends (or
//! finds it defined the same) and starts its VMM waiting for it (`vessel run --incoming`
//! with the configuration it expects, or QEMU's `-incoming unix:`). The source's Vessel
//! VMM is jailed and may sit in a network namespace of its own, so it sends to a socket
//! in its own run folder, where this daemon takes the stream and passes it on to the
//! destination's VMM (libvirt's tunnelled migration; a QEMU sends through it too). Once
//! the destination runs the domain, the source's VMM ends; the definition stays here,
//! shut off, unless asked to leave (virsh's `--undefinesource`). docs/MIGRATION.md.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{lock, Manager};
use crate::domain::DomainDef;
use crate::driver;
use crate::error::{Error, Result};
use crate::state::{End, Start};

/// How long the relay waits for the source VMM to connect.
const CONNECT_WAIT: Duration = Duration::from_secs(30);

/// Passes one migration stream from the source VMM (connecting to `listener`) to the
/// destination VMM at `dest`, and its answer back.
fn relay(listener: UnixListener, dest: PathBuf) -> std::io::Result<u64> {
    listener.set_nonblocking(true)?;
    let t0 = Instant::now();
    let from = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && t0.elapsed() < CONNECT_WAIT => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    };
    from.set_nonblocking(false)?;
    let to = UnixStream::connect(&dest)?;
    let (mut from_r, mut to_w) = (from.try_clone()?, to.try_clone()?);
    let forward = std::thread::spawn(move || {
        let n = std::io::copy(&mut from_r, &mut to_w);
        let _ = to_w.shutdown(std::net::Shutdown::Write);
        n
    });
    let (mut to_r, mut from_w) = (to, from);
    let _ = std::io::copy(&mut to_r, &mut from_w);
    let _ = from_w.flush();
    let _ = from_w.shutdown(std::net::Shutdown::Write);
    forward
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the relay thread panicked")))
}

impl Manager {
    /// Destination side: defines `def` here (or finds it defined the same), starts its
    /// VMM waiting for the domain, and returns where the source is to send it and
    /// whether the domain was defined for it (a failed migration undefines it again).
    pub fn migrate_in(self: &Arc<Self>, def: DomainDef) -> Result<(String, bool)> {
        let name = def.name.clone();
        let defined = match self.store.get_domain(&name) {
            Ok(have) => {
                if have.vm != def.vm || have.driver != def.driver {
                    return Err(Error::Conflict(format!(
                        "domain {name:?} is defined here with another configuration"
                    )));
                }
                false
            }
            Err(Error::NotFound { .. }) => {
                self.define(def)?;
                true
            }
            Err(e) => return Err(e),
        };
        // The serial log goes on, as the guest does (a domain migrating back continues
        // the log it left here).
        if let Err(e) = self.start_inner(&name, false, driver::Boot::Incoming, Start::Incoming) {
            if defined {
                let _ = self.undefine(&name);
            }
            return Err(e);
        }
        self.events
            .emit_with(&name, "migrating-in", "running", Some("migrated"), None);
        let url = format!("unix:{}", self.run_dir(&name).incoming().display());
        Ok((url, defined))
    }

    /// Source side: live-migrates the running domain `name` to the daemon whose
    /// API socket is `dest`; returns the source VMM's report (rounds, downtime, total
    /// time). The domain is then shut off here, and with `undefine_source` undefined.
    pub fn migrate_out(
        self: &Arc<Self>,
        name: &str,
        dest: &Path,
        undefine_source: bool,
    ) -> Result<serde_json::Value> {
        let def = self.store.get_domain(name)?;
        let (id, _) = self.active_id(name)?;
        let d = driver::of(id.driver);
        let peer = crate::client::Client::new(dest.to_path_buf());
        let reached = |e: crate::client::ClientError| {
            Error::Conflict(format!("the destination daemon {}: {e}", dest.display()))
        };
        let v = peer
            .post(
                "/v1/migrations/incoming",
                Some(&serde_json::json!({ "definition": def })),
            )
            .map_err(reached)?;
        let defined_there = v.get("defined").and_then(|d| d.as_bool()) == Some(true);
        let Some(target) = v
            .get("url")
            .and_then(|u| u.as_str())
            .and_then(|u| u.strip_prefix("unix:"))
            .map(PathBuf::from)
        else {
            return Err(Error::Conflict(format!(
                "the destination daemon {} gave no unix: address: {v}",
                dest.display()
            )));
        };
        let run = self.run_dir(name);
        let relay_path = run.migrate_out();
        let _ = std::fs::remove_file(&relay_path);
        let sent = (|| {
            let listener = UnixListener::bind(&relay_path)
                .map_err(|e| Error::io("listening for the migration", &relay_path, e))?;
            if let Some((uid, gid)) = d.vmm_user(&self.cfg.programs, &run) {
                // The VMM connects to it as its own user.
                std::os::unix::fs::chown(&relay_path, Some(uid), Some(gid))
                    .map_err(|e| Error::io("handing the migration socket over", &relay_path, e))?;
            }
            let relay = std::thread::spawn(move || relay(listener, target));
            let report = {
                let l = self.domain_lock(name);
                let _g = lock(&l);
                // The VMM ends once the destination runs the domain: as migrated.
                self.update(name, |r| r.ending = Some(End::MigratedAway));
                let sent = d.migrate(&run, &relay_path);
                if sent.is_err() {
                    self.update(name, |r| r.ending = None);
                }
                sent
            };
            if report.is_err() {
                // Ends the relay's wait when the VMM never connected.
                let _ = UnixStream::connect(&relay_path);
            }
            let relayed = relay.join();
            let report = report?;
            tracing::info!(domain = name, ?relayed, "migration stream relayed");
            Ok(report)
        })();
        let _ = std::fs::remove_file(&relay_path);
        let report = match sent {
            Ok(r) => r,
            Err(e) => {
                // The destination's VMM ends with its broken stream; end it for sure, and
                // undefine the domain there if the migration defined it.
                let _ = peer.post(&format!("/v1/domains/{name}/destroy"), None);
                if defined_there {
                    let _ = peer.call("DELETE", &format!("/v1/domains/{name}"), None);
                }
                return Err(e);
            }
        };
        // The source's VMM ends by itself once the destination runs the domain.
        self.wait_for(name, Duration::from_secs(30), |r| {
            r.is_none_or(|r| r.vmm.is_none())
        });
        if self.is_active(name) {
            self.end_vmm(name, End::MigratedAway)?;
        }
        if undefine_source {
            self.undefine(name)?;
        }
        self.events.emit_with(
            name,
            "migrated",
            "shut off",
            Some("migrated"),
            Some(format!("to {}", dest.display())),
        );
        Ok(report)
    }
}
