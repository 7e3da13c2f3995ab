//! Devices attached to and detached from running domains (virsh's `attach-disk`,
//! `attach-interface`, `detach-*` with `--live`), through the domain's driver, and the
//! live definition they change: `live.json` in the run folder, written at start. (A part
//! of `Manager`, split out of manager.rs.)

use std::path::{Path, PathBuf};

use serde::Deserialize;
use vmm::config::{DiskConfig, NetConfig};

use super::{lock, Manager};
use crate::domain::{DomainDef, Interface};
use crate::driver::{self, Hotplug, RunDir};
use crate::error::{Error, Result};
use crate::network;

/// A device to attach to a running domain: `{"disk": DiskConfig}` or
/// `{"interface": Interface}`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Device {
    Disk(DiskConfig),
    Interface(Interface),
}

/// A running domain's device to detach: a disk by its image file, an interface by its
/// MAC.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum DeviceRef {
    Disk(PathBuf),
    Interface(String),
}

impl RunDir {
    /// The running domain's definition as it is now: what it started with (its TAPs in
    /// `vm.nets`) and what was attached or detached since.
    pub fn live(&self) -> PathBuf {
        self.0.join("live.json")
    }
    /// Present once a device was attached or detached live: the running VM is no longer
    /// what its stored definition starts.
    fn changed_live(&self) -> PathBuf {
        self.0.join("changed-live")
    }
}

fn write_live(run: &RunDir, live: &DomainDef) -> Result<()> {
    let tmp = run.live().with_extension("tmp");
    let body =
        serde_json::to_vec_pretty(live).map_err(|e| Error::invalid("domain", e.to_string()))?;
    std::fs::write(&tmp, body)
        .and_then(|_| std::fs::rename(&tmp, run.live()))
        .map_err(|e| Error::io("writing the live definition", run.live(), e))
}

impl Manager {
    /// Records what a domain's VMM started with (called once it runs).
    pub(super) fn record_live(&self, run: &RunDir, runtime: &DomainDef) {
        // The descriptors its disks were handed mean nothing outside the VMM.
        let mut runtime = runtime.clone();
        runtime.vm = runtime.vm.without_fds();
        if let Err(e) = write_live(run, &runtime) {
            tracing::warn!(domain = %runtime.name, "{e}");
        }
    }

    /// A running domain's live definition (None when it does not run).
    pub fn live_definition(&self, name: &str) -> Option<DomainDef> {
        let b = std::fs::read(self.run_dir(name).live()).ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// The TAPs a domain's VMM had, to remove when it ends (before its run folder goes).
    pub(super) fn live_taps(&self, name: &str) -> Vec<String> {
        self.live_definition(name)
            .map(|d| d.vm.nets.into_iter().map(|n| n.tap).collect())
            .unwrap_or_default()
    }

    /// Refuses `what` (save, snapshot, migrate) of a domain whose devices changed while
    /// it ran: its saved state would hold devices its definition does not start.
    pub(super) fn refuse_changed_live(&self, name: &str, what: &str) -> Result<()> {
        if self.run_dir(name).changed_live().exists() {
            return Err(Error::Unsupported(format!(
                "Operation not supported: cannot {what} domain {name:?}: devices were \
                 attached or detached while it runs, so its VM state no longer matches its \
                 definition; restart it first"
            )));
        }
        Ok(())
    }

    /// The running domain's live definition, or why there is none.
    fn running_live(&self, name: &str) -> Result<(RunDir, DomainDef, &'static dyn driver::Driver)> {
        let (id, _) = self.active_id(name).map_err(|_| {
            Error::Conflict(format!(
                "Requested operation is not valid: domain {name:?} is not running (without \
                 --live, the change goes to its definition)"
            ))
        })?;
        let run = self.run_dir(name);
        let live = self.live_definition(name).ok_or_else(|| {
            Error::Conflict(format!(
                "domain {name:?} has no live definition (started by an older daemon): \
                 restart it, or use --config"
            ))
        })?;
        Ok((run, live, driver::of(id.driver)))
    }

    /// Attaches a device to a running domain; returns its live definition.
    pub fn attach_live(&self, name: &str, device: Device) -> Result<DomainDef> {
        let l = self.domain_lock(name);
        let _g = lock(&l);
        let stored = self.store.get_domain(name)?;
        let (run, mut live, d) = self.running_live(name)?;
        match device {
            Device::Disk(disk) => {
                d.can_hotplug(&live, Hotplug::AttachDisk(&disk))?;
                let mut disk = disk;
                let mut one = stored.clone();
                one.vm.disks = vec![disk.clone()];
                self.resolve_volumes(&mut one)?;
                // Recorded as define records a disk, then opened, checked against that
                // record and handed to the VMM as `start` does (issue 22).
                crate::disk_chain::record_all(&mut one)?;
                let files = self.confine_disks(&mut one)?;
                disk = one.vm.disks.remove(0);
                if live.vm.disks.iter().any(|x| x.path == disk.path) {
                    return Err(Error::Conflict(format!(
                        "{} is attached to domain {name:?} already",
                        disk.path.display()
                    )));
                }
                if !disk.read_only {
                    self.refuse_shared_disk(name, &disk.path)?;
                }
                let mut vm = live.vm.clone();
                vm.disks.push(disk.clone());
                d.check(&vm)?;
                // The driver passes on the files `disk.fds` names: open until here.
                d.hotplug(&run, &live, Hotplug::AttachDisk(&disk))?;
                drop(files);
                live.vm = vm.without_fds();
                live.volumes.extend(one.volumes);
                live.chains.extend(one.chains);
            }
            Device::Interface(itf) => {
                let probe = NetConfig {
                    tap: String::new(),
                    mac: itf.mac.clone(),
                    transport: itf.transport,
                    mtu: None,
                    rx_rate_limiter: None,
                    tx_rate_limiter: None,
                    queues: None,
                };
                d.can_hotplug(&live, Hotplug::AttachNet(&probe))?;
                let Some(bridge) = self.bridge_of(&itf)? else {
                    return Err(Error::invalid(
                        "interface",
                        "it names neither a network nor a bridge",
                    ));
                };
                let taps: Vec<&str> = live.vm.nets.iter().map(|n| n.tap.as_str()).collect();
                let i = (live.interfaces.len()..)
                    .find(|&i| !taps.contains(&network::tap_name(&stored, i).as_str()))
                    .unwrap_or(0);
                let tap = network::tap_name(&stored, i);
                let mut fresh = stored.clone();
                fresh.interfaces.clear();
                let mac = itf
                    .mac
                    .clone()
                    .unwrap_or_else(|| network::mac_for(&fresh, i));
                if live.vm.nets.iter().any(|n| {
                    n.mac
                        .as_deref()
                        .is_some_and(|m| m.eq_ignore_ascii_case(&mac))
                }) {
                    return Err(Error::Conflict(format!(
                        "domain {name:?} has an interface with MAC {mac} already"
                    )));
                }
                let mtu = self.interface_mtu(&itf)?;
                let net = NetConfig {
                    tap: tap.clone(),
                    mac: Some(mac.clone()),
                    transport: itf.transport,
                    mtu: mtu.and_then(|m| u16::try_from(m).ok()),
                    rx_rate_limiter: None,
                    tx_rate_limiter: None,
                    queues: None,
                };
                let mut vm = live.vm.clone();
                vm.nets.push(net.clone());
                d.check(&vm)?;
                network::create_tap(&tap, &bridge)?;
                if let Some(m) = mtu {
                    if let Err(e) = network::set_mtu(&tap, m) {
                        network::delete_tap(&tap);
                        return Err(e);
                    }
                }
                if let Err(e) = d.hotplug(&run, &live, Hotplug::AttachNet(&net)) {
                    network::delete_tap(&tap);
                    return Err(e);
                }
                live.vm = vm;
                live.interfaces.push(Interface {
                    mac: Some(mac),
                    ..itf
                });
            }
        }
        self.changed(&run, &live)?;
        Ok(live)
    }

    /// Detaches a device from a running domain; returns its live definition.
    pub fn detach_live(&self, name: &str, device: DeviceRef) -> Result<DomainDef> {
        let l = self.domain_lock(name);
        let _g = lock(&l);
        let (run, mut live, d) = self.running_live(name)?;
        match device {
            DeviceRef::Disk(path) => {
                let i = live
                    .vm
                    .disks
                    .iter()
                    .position(|x| x.path == path || same_file(&x.path, &path))
                    .ok_or_else(|| {
                        Error::not_found("disk of the running domain", &path.display().to_string())
                    })?;
                let disk = live.vm.disks[i].clone();
                d.hotplug(&run, &live, Hotplug::DetachDisk(&disk))?;
                live.vm.disks.remove(i);
            }
            DeviceRef::Interface(mac) => {
                let i = live
                    .vm
                    .nets
                    .iter()
                    .position(|n| {
                        n.mac
                            .as_deref()
                            .is_some_and(|m| m.eq_ignore_ascii_case(&mac))
                    })
                    .ok_or_else(|| Error::not_found("interface of the running domain", &mac))?;
                let net = live.vm.nets[i].clone();
                d.hotplug(&run, &live, Hotplug::DetachNet(&net))?;
                network::delete_tap(&net.tap);
                live.vm.nets.remove(i);
                if i < live.interfaces.len() {
                    live.interfaces.remove(i);
                }
            }
        }
        self.changed(&run, &live)?;
        Ok(live)
    }

    fn changed(&self, run: &RunDir, live: &DomainDef) -> Result<()> {
        std::fs::write(run.changed_live(), b"")
            .map_err(|e| Error::io("marking the domain changed live", run.changed_live(), e))?;
        write_live(run, live)?;
        self.events
            .emit_with(&live.name, "device-changed", "running", None, None);
        Ok(())
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}
