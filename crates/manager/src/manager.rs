//! The manager's core: definitions (through the store), running domains (through the
//! drivers), supervision, re-adoption after a restart, and events. The REST API (api.rs) is
//! a thin layer over this.
//!
//! Concurrency: every operation on a domain holds that domain's lock, so operations on one
//! domain are serialized and different domains proceed in parallel. The runtime table has
//! its own short-lived lock, never held across a driver call.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::domain::{self, DomainDef, DomainState, DriverKind};
use crate::driver::{self, ProcId, Programs, RunDir};
use crate::error::{Error, Result};
use crate::events::Events;
use crate::network;
use crate::state::{self, End, Event, Reason, Start};
use crate::storage::{self, PoolHost};
use crate::store::Store;
use runtime::{Runtime, Table, Vmm};

mod hotplug;
mod memory;
mod migration;
mod named_snapshots;
mod runtime;

pub use hotplug::{Device, DeviceRef};
pub use named_snapshots::SnapshotInfo;
pub(crate) use snapshots::move_file;
mod networks;
mod snapshots;
pub use networks::{InterfaceInfo, Lease, NetworkInfo};

/// Where the daemon keeps things and which programs it runs.
#[derive(Clone, Debug)]
pub struct Config {
    pub state_dir: PathBuf,
    pub programs: Programs,
    /// Folders pools may be defined in besides `STATE/pools` (`vessel daemon
    /// --pool-root DIR`): a pool elsewhere would hand API clients that folder's files.
    pub pool_roots: Vec<PathBuf>,
    /// Folders whose files clients over TCP may name in domain definitions (kernels,
    /// images), besides the pool roots (`vessel daemon --file-root DIR`). A TCP client
    /// has no host user to check its rights against.
    pub file_roots: Vec<PathBuf>,
    /// Managedsave every running domain when the daemon is told to end.
    pub save_on_shutdown: bool,
}

/// What `list` and `dominfo` report.
#[derive(Clone, Debug, Serialize)]
pub struct DomainInfo {
    pub name: String,
    pub uuid: String,
    pub driver: DriverKind,
    pub state: DomainState,
    /// libvirt-style state text ("running", "shut off", …).
    pub state_text: &'static str,
    pub autostart: bool,
    pub cpus: u8,
    pub memory_mib: u64,
    /// What the guest has of `memory_mib` with its balloon's target (the running
    /// domain's, else the definition's): virsh's "Used memory".
    pub current_memory_mib: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uptime_s: Option<f64>,
    /// Why the domain is in its state: libvirt's reason ("booted", "user", "destroyed" …).
    pub reason: Reason,
    /// Why the domain last stopped, when it is not running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_stop: Option<String>,
    pub serial_log: PathBuf,
}

#[derive(Debug)]
pub struct Manager {
    /// Held for the daemon's life: one daemon per state directory.
    _state_lock: std::fs::File,
    pub cfg: Config,
    pub store: Store,
    pub events: Events,
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    table: Table,
    generation: AtomicU64,
    /// Serializes network operations.
    net_lock: Mutex<()>,
    /// The address of the opt-in TCP API listener, where incoming migrations over TCP
    /// listen too (`migration`).
    pub(crate) tcp_ip: std::sync::OnceLock<std::net::IpAddr>,
    /// The TCP API's TLS (`--tls-*`): migration streams over TCP use it too, and this
    /// daemon shows its certificate to the daemons it migrates to.
    pub(crate) tls: std::sync::OnceLock<crate::tls::DaemonTls>,
    /// A cluster host's address on the network between the hosts (`--overlay-ip`): its
    /// interface's MTU sets its overlay networks'.
    pub(crate) overlay_ip: std::sync::OnceLock<std::net::Ipv4Addr>,
}

/// Two daemons on one state directory would both adopt the same VMMs: refuse the second.
fn lock_state_dir(dir: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let p = dir.join("daemon.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(|e| Error::io("opening", &p, e))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(Error::Conflict(format!(
            "another vessel daemon uses the state directory {}: stop it, or pass another --state-dir",
            dir.display()
        )));
    }
    Ok(f)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn restrict(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io("restricting", path, e))
}

impl PoolHost for Manager {
    fn store(&self) -> &Store {
        &self.store
    }
    fn pool_roots(&self) -> Vec<PathBuf> {
        Manager::pool_roots(self)
    }
    fn disk_users(&self, path: &Path) -> Result<Vec<String>> {
        Manager::disk_users(self, path)
    }
    fn is_active(&self, domain: &str) -> bool {
        Manager::is_active(self, domain)
    }
}

impl Manager {
    /// Folders whose files TCP clients may name: the pool roots and the file roots,
    /// resolved.
    pub fn file_roots(&self) -> Vec<PathBuf> {
        let mut roots = self.pool_roots();
        roots.extend(
            self.cfg
                .file_roots
                .iter()
                .filter_map(|p| p.canonicalize().ok()),
        );
        roots
    }

    /// Folders pools may lie in: `STATE/pools` and the configured roots, resolved.
    pub fn pool_roots(&self) -> Vec<PathBuf> {
        std::iter::once(self.cfg.state_dir.join("pools"))
            .chain(self.cfg.pool_roots.iter().cloned())
            .filter_map(|p| p.canonicalize().ok())
            .collect()
    }

    /// Opens (or creates) the state directory and its database, then re-adopts VMM
    /// processes that outlived a previous daemon.
    pub fn open(cfg: Config) -> Result<Arc<Self>> {
        for d in [
            cfg.state_dir.clone(),
            cfg.state_dir.join("run"),
            cfg.state_dir.join("log"),
            cfg.state_dir.join("pools"),
        ] {
            std::fs::create_dir_all(&d).map_err(|e| Error::io("creating state folder", &d, e))?;
        }
        // The domain table and logs are the daemon user's alone (older versions left them
        // world-readable).
        restrict(&cfg.state_dir, 0o700)?;
        let state_lock = lock_state_dir(&cfg.state_dir)?;
        let db = cfg.state_dir.join("vessel.db");
        let store = Store::open(&db)?;
        // QEMU always ran its virtio devices on q35's PCI bus, whatever the definition
        // said; definitions from before the QEMU driver refused mmio now say what ran.
        for mut d in store.list_domains()? {
            if d.driver == DriverKind::Qemu && d.vm.virtio_transport == vmm::config::Transport::Mmio
            {
                d.vm.virtio_transport = vmm::config::Transport::Pci;
                tracing::info!(domain = %d.name, "QEMU domain: virtio_transport mmio -> pci (q35, as it ran)");
                store.update_domain(&d)?;
            }
        }
        for f in ["vessel.db", "vessel.db-wal", "vessel.db-shm"] {
            let p = cfg.state_dir.join(f);
            if p.exists() {
                restrict(&p, 0o600)?;
            }
        }
        if let Ok(logs) = std::fs::read_dir(cfg.state_dir.join("log")) {
            for e in logs.flatten() {
                let _ = restrict(&e.path(), 0o600);
            }
        }
        let m = Arc::new(Manager {
            _state_lock: state_lock,
            cfg,
            store,
            events: Events::default(),
            locks: Mutex::new(HashMap::new()),
            table: Table::default(),
            generation: AtomicU64::new(0),
            net_lock: Mutex::new(()),
            tcp_ip: std::sync::OnceLock::new(),
            tls: std::sync::OnceLock::new(),
            overlay_ip: std::sync::OnceLock::new(),
        });
        m.adopt()?;
        Ok(m)
    }

    pub(crate) fn run_dir(&self, name: &str) -> RunDir {
        RunDir(self.cfg.state_dir.join("run").join(name))
    }

    pub fn serial_log(&self, name: &str) -> PathBuf {
        self.cfg
            .state_dir
            .join("log")
            .join(format!("{name}.serial.log"))
    }

    /// The lock serializing operations on one domain. Entries nobody holds or waits for
    /// are dropped on the way, so requests naming unknown domains (a client may send
    /// thousands of long names) leave nothing behind.
    fn domain_lock(&self, name: &str) -> Arc<Mutex<()>> {
        let mut locks = lock(&self.locks);
        // Only the map holds such an entry, and new holders clone it under this lock.
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(Mutex::new(())))
            .clone()
    }

    fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Finds VMM processes a previous daemon started and watches them again.
    fn adopt(self: &Arc<Self>) -> Result<()> {
        let run = self.cfg.state_dir.join("run");
        let entries = std::fs::read_dir(&run).map_err(|e| Error::io("reading", &run, e))?;
        for ent in entries.flatten() {
            let name = ent.file_name().to_string_lossy().into_owned();
            let dir = RunDir(ent.path());
            let id = ProcId::read(&dir.pidfile());
            let defined = self.store.get_domain(&name).is_ok();
            match id {
                Some(id) if id.alive() && defined => {
                    let paused = driver::of(id.driver).probe_paused(&dir);
                    let generation = self.next_generation();
                    tracing::info!(domain = %name, pid = id.pid, "re-adopted a running VMM");
                    self.update(&name, |r| {
                        // A previous daemon started it: how, this one cannot know.
                        (r.state, r.reason) = if paused {
                            (DomainState::Paused, Reason::User)
                        } else {
                            (DomainState::Running, Reason::Unknown)
                        };
                        r.vmm = Some(Vmm {
                            id: id.clone(),
                            generation,
                            started: Instant::now(),
                        });
                    });
                    self.announce(&name, "adopted", Some(format!("pid {}", id.pid)));
                    self.watch(name.clone(), generation, None, id);
                    // A migration the previous daemon did not see through: settled with
                    // the destination, off the start-up path (it may be slow to answer).
                    if let Some(rec) = migration::Outgoing::read(&dir) {
                        tracing::warn!(domain = %name, phase = ?rec.phase, dest = %rec.dest, "an outgoing migration a previous daemon left");
                        let m = self.clone();
                        std::thread::spawn(move || m.settle_outgoing_migration(&name, rec));
                    }
                }
                Some(id) if id.alive() => {
                    tracing::warn!(domain = %name, pid = id.pid, "a VMM runs for an undefined domain; leaving it alone");
                }
                _ => {
                    let outgoing = migration::Outgoing::read(&dir);
                    tracing::info!(domain = %name, "VMM ended while the daemon was down");
                    let _ = std::fs::remove_dir_all(&dir.0);
                    self.update(&name, |r| {
                        r.reason = Reason::Daemon;
                        r.why = Some("ended while the daemon was down".into());
                    });
                    // Migrating out: the guest may wait at the destination for its finish.
                    if let Some(rec) = outgoing.filter(|_| defined) {
                        tracing::warn!(domain = %name, phase = ?rec.phase, dest = %rec.dest, "the VMM of a domain migrating out ended while the daemon was down");
                        let m = self.clone();
                        std::thread::spawn(move || m.settle_gone_source(&name, rec));
                    }
                }
            }
        }
        Ok(())
    }

    /// Starts autostart networks, then autostart domains, that are not running.
    pub fn autostart_all(self: &Arc<Self>) {
        for n in self.store.list_networks().unwrap_or_default() {
            if n.autostart && !network::is_active(&self.cfg.state_dir, &n) {
                if let Err(e) = self.net_start(&n.name) {
                    tracing::warn!(network = %n.name, "autostart failed: {e}");
                }
            }
        }
        let Ok(defs) = self.store.list_domains() else {
            return;
        };
        // Domains the last daemon saved as it ended come back too.
        for d in defs
            .into_iter()
            .filter(|d| d.autostart || self.saved_at_shutdown(&d.name))
        {
            if self.is_active(&d.name) {
                continue;
            }
            if let Err(e) = self.start(&d.name) {
                tracing::warn!(domain = %d.name, "autostart failed: {e}");
            }
        }
    }

    /// Supervises a VMM: reaps our own child, or waits on an adopted process's pidfd.
    fn watch(self: &Arc<Self>, name: String, generation: u64, child: Option<Child>, id: ProcId) {
        let me = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name(format!("watch-{name}"))
            .spawn(move || {
                let status = match child {
                    Some(mut c) => c.wait().ok(),
                    None => {
                        id.wait_exit();
                        // Not our child, so no wait status: a Vessel VMM leaves its exit
                        // status in the run directory (a QEMU has none: None).
                        me.upgrade().and_then(|m| {
                            let text =
                                std::fs::read_to_string(m.run_dir(&name).exit_status()).ok()?;
                            let code: i32 = text.trim().parse().ok()?;
                            Some(std::os::unix::process::ExitStatusExt::from_raw(
                                (code & 0xff) << 8,
                            ))
                        })
                    }
                };
                if let Some(m) = me.upgrade() {
                    let rebooted = m.vmm_exited(&name, generation, status);
                    // As libvirt's default on_reboot=restart: a guest that rebooted (the
                    // Vessel VMM exits 10 then) comes back, its log continuing.
                    if rebooted {
                        if let Err(e) = m.start_with(&name, false, false) {
                            tracing::warn!(domain = %name, "restart after reboot failed: {e}");
                            m.update(&name, |r| r.restarting = false);
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start a supervisor thread: {e}");
        }
    }

    /// Records a VMM's end; returns whether the guest rebooted (and should start again).
    fn vmm_exited(
        &self,
        name: &str,
        generation: u64,
        status: Option<std::process::ExitStatus>,
    ) -> bool {
        let current = |row: &Runtime| {
            let vmm = row.vmm.as_ref().filter(|v| v.generation == generation)?;
            let end = row
                .ending
                .unwrap_or_else(|| driver::of(vmm.id.driver).ended(status));
            let (state, reason) = state::next(row.state, Event::Ended(end), name).ok()?;
            Some((end, state, reason))
        };
        if self.rows().get(name).and_then(current).is_none() {
            return false;
        }
        // Its TAPs, those attached live included, go while the table still shows this
        // VMM: a save, shutdown or destroy waits until the VMM is gone from the table, so
        // a start right after it cannot make a TAP of the same name that this would then
        // remove from under the new VMM.
        let taps = self.live_taps(name);
        if let Ok(def) = self.store.get_domain(name) {
            self.detach_interfaces(&def);
        }
        for t in taps {
            network::release_tap(&t);
        }
        let mut rows = self.rows();
        let Some(row) = rows.get_mut(name) else {
            return false;
        };
        let Some((end, state, reason)) = current(row) else {
            return false;
        };
        let why = match end {
            End::Destroyed => "destroyed".to_string(),
            End::PoweredOff if row.state == DomainState::InShutdown => "shutdown".into(),
            End::PoweredOff => "guest powered off".into(),
            End::Rebooted => "guest rebooted".into(),
            End::Saved => "saved".into(),
            End::MigratedAway => "migrated".into(),
            End::Unknown => "the VMM process ended".into(),
            End::Failed => match status {
                Some(s) => format!("the VMM ended: {s}"),
                None => "the VMM ended".into(),
            },
        };
        let run = self.run_dir(name);
        if state == DomainState::Crashed {
            // Keep the VMM's own log where the user can read it.
            let _ = std::fs::copy(
                run.stderr(),
                self.cfg
                    .state_dir
                    .join("log")
                    .join(format!("{name}.vmm.log")),
            );
        }
        let _ = std::fs::remove_dir_all(&run.0);
        // The domain stops counting as active together with its state and reason, so
        // nobody sees a stopped domain without them; a reboot keeps it running.
        let rebooted = end == End::Rebooted;
        row.state = if rebooted {
            DomainState::Running
        } else {
            state
        };
        row.reason = if rebooted { row.reason } else { reason };
        row.why = Some(why.clone());
        row.vmm = None;
        row.ending = None;
        row.restarting = rebooted;
        // Before anyone sees the domain stopped: a start that follows at once makes a
        // group of the same name, which a later removal would take from under its VMM.
        crate::driver::release_cgroup(&self.cfg.programs, name, &run);
        drop(rows);
        self.table.changed.notify_all();
        let event = match end {
            End::Rebooted => "rebooted",
            End::Failed => "crashed",
            _ => "stopped",
        };
        self.events.emit_with(
            name,
            event,
            state.as_str(),
            Some(reason.as_str()),
            Some(why),
        );
        rebooted
    }

    pub(crate) fn state_of(&self, name: &str) -> DomainState {
        self.rows()
            .get(name)
            .map_or(DomainState::Shutoff, |r| r.state)
    }

    fn info_of(&self, d: &DomainDef) -> DomainInfo {
        let row = self.rows().get(&d.name).cloned();
        let state = row.as_ref().map_or(DomainState::Shutoff, |r| r.state);
        let vmm = row.as_ref().and_then(|r| r.vmm.clone());
        DomainInfo {
            name: d.name.clone(),
            uuid: d.uuid.clone().unwrap_or_default(),
            driver: d.driver,
            state,
            state_text: state.as_str(),
            reason: row.as_ref().map_or(Reason::Unknown, |r| r.reason),
            autostart: d.autostart,
            cpus: d.vm.cpus,
            memory_mib: d.vm.memory_mib,
            current_memory_mib: {
                let live = vmm.as_ref().and_then(|_| self.live_definition(&d.name));
                let b = live.as_ref().unwrap_or(d).vm.balloon.as_ref();
                d.vm.memory_mib
                    .saturating_sub(b.map_or(0, |b| u64::from(b.amount_mib)))
            },
            pid: vmm.as_ref().map(|v| v.id.pid),
            uptime_s: vmm.as_ref().map(|v| v.started.elapsed().as_secs_f64()),
            last_stop: if state.is_active() {
                None
            } else {
                row.and_then(|r| r.why)
            },
            serial_log: self.serial_log(&d.name),
        }
    }

    pub fn list(&self) -> Result<Vec<DomainInfo>> {
        Ok(self
            .store
            .list_domains()?
            .iter()
            .map(|d| self.info_of(d))
            .collect())
    }

    pub fn info(&self, name: &str) -> Result<(DomainDef, DomainInfo)> {
        let d = self.store.get_domain(name)?;
        let i = self.info_of(&d);
        Ok((d, i))
    }

    pub fn define(&self, def: DomainDef) -> Result<DomainInfo> {
        self.define_checked(def, &|_| Ok(()))
    }

    /// [`Manager::define`], with `check` run on the definition once its records are
    /// taken and before it is stored: the API checks the client's rights on the files
    /// the records name, so a swap between its check of the names and the records is
    /// refused rather than recorded.
    pub fn define_checked(
        &self,
        mut def: DomainDef,
        check: &dyn Fn(&DomainDef) -> Result<()>,
    ) -> Result<DomainInfo> {
        self.resolve_volumes(&mut def)?;
        def.validate()?;
        self.check_emulator(&def)?;
        crate::disk_chain::after_client_check_hook(&def.name);
        crate::disk_chain::record_all(&mut def)?;
        crate::boot_files::record_all(&mut def)?;
        check(&def)?;
        if def.uuid.is_none() {
            def.uuid = Some(domain::new_uuid());
        }
        // The manager owns the serial: it is set at start.
        def.vm.serial = vmm::SerialConfig::Null;
        let l = self.domain_lock(&def.name);
        let _g = lock(&l);
        self.store.insert_domain(&def)?;
        self.events.emit(&def.name, "defined", "shut off", None);
        Ok(self.info_of(&def))
    }

    /// A definition's `<emulator>` must name the program this daemon runs for its driver
    /// (QEMU's `--qemu`, or this `vessel` for Vessel domains): it is kept for dumps, never
    /// run instead.
    fn check_emulator(&self, def: &DomainDef) -> Result<()> {
        let Some(e) = &def.emulator else {
            return Ok(());
        };
        let runs = match def.driver {
            domain::DriverKind::Qemu => &self.cfg.programs.qemu,
            domain::DriverKind::Vessel => &self.cfg.programs.vessel,
        };
        if same_program(e, runs) {
            return Ok(());
        }
        Err(Error::invalid(
            "domain definition",
            crate::xml_support::unsupported(format!(
                "<emulator>{}</emulator>: this daemon runs {} for {} domains",
                e.display(),
                runs.display(),
                def.driver.as_str()
            )),
        ))
    }

    /// Replaces an existing domain's definition (keeping its UUID); a running domain gets
    /// it at its next start, as with `virsh define` on an existing domain.
    pub fn redefine(&self, name: &str, def: DomainDef) -> Result<DomainInfo> {
        self.redefine_checked(name, def, &|_| Ok(()))
    }

    /// [`Manager::redefine`] with a `check` as [`Manager::define_checked`] has.
    pub fn redefine_checked(
        &self,
        name: &str,
        mut def: DomainDef,
        check: &dyn Fn(&DomainDef) -> Result<()>,
    ) -> Result<DomainInfo> {
        if def.name != name {
            return Err(Error::invalid(
                "domain definition",
                format!(
                    "its name {:?} is not {name:?} (renaming is not supported)",
                    def.name
                ),
            ));
        }
        self.resolve_volumes(&mut def)?;
        def.validate()?;
        self.check_emulator(&def)?;
        crate::disk_chain::record_all(&mut def)?;
        crate::boot_files::record_all(&mut def)?;
        check(&def)?;
        def.vm.serial = vmm::SerialConfig::Null;
        let l = self.domain_lock(name);
        let _g = lock(&l);
        let old = self.store.get_domain(name)?;
        if def.uuid.is_some() && def.uuid != old.uuid {
            return Err(Error::invalid(
                "domain definition",
                "its uuid differs from the defined domain's",
            ));
        }
        def.uuid = old.uuid;
        def.autostart = def.autostart || old.autostart;
        self.store.update_domain(&def)?;
        self.events
            .emit(name, "redefined", self.state_of(name).as_str(), None);
        Ok(self.info_of(&def))
    }

    /// Replaces `vol://POOL/VOLUME` disk paths with the volume's file and its recorded
    /// format (the volume must exist; a different format given is refused), and gives a
    /// file disk without a format raw, refusing one whose file starts with a qcow2 header:
    /// formats are fixed at definition, never guessed from what a guest wrote later.
    fn resolve_volumes(&self, def: &mut DomainDef) -> Result<()> {
        let to_disk = |f: block::Format| match f {
            block::Format::Raw => vmm::config::DiskFormat::Raw,
            block::Format::Qcow2 => vmm::config::DiskFormat::Qcow2,
        };
        for d in def.vm.disks.iter_mut() {
            let Some(r) = d
                .path
                .to_str()
                .and_then(|p| p.strip_prefix(domain::VOLUME_PREFIX))
            else {
                if d.format.is_none() && d.path.is_file() {
                    if block::probe(&d.path).ok() == Some(block::Format::Qcow2) {
                        return Err(Error::invalid(
                            "disk",
                            format!(
                                "{} starts with a qcow2 header but no format was given: \
                                 formats are never guessed (give \"format\": \"qcow2\", \
                                 or <driver type='qcow2'/>)",
                                d.path.display()
                            ),
                        ));
                    }
                    d.format = Some(vmm::config::DiskFormat::Raw);
                }
                continue;
            };
            let (pool, vol) = r
                .split_once('/')
                .ok_or_else(|| Error::invalid("disk", format!("{r:?}: use vol://POOL/VOLUME")))?;
            let info = storage::volume_info(self, pool, vol)?;
            storage::check_chain(self, &info)?;
            let recorded = to_disk(info.format);
            if d.format.is_some_and(|f| f != recorded) {
                return Err(Error::invalid(
                    "disk",
                    format!(
                        "volume {pool}/{vol} is {}: its format is fixed",
                        info.format
                    ),
                ));
            }
            def.volumes.insert(
                info.path.to_string_lossy().into_owned(),
                format!("{pool}/{vol}"),
            );
            d.path = info.path;
            d.format = Some(recorded);
        }
        Ok(())
    }

    /// Opens each disk's chain for this start and checks it, then names the open files in
    /// the disk ([`crate::disk_chain::hand_over`]): the VMM (either driver) builds the
    /// disk from these descriptors and opens nothing by name, so what is checked here is
    /// what the guest gets, whatever is swapped in afterwards. The caller keeps the
    /// returned files open until the VMM has started.
    ///
    /// A disk that is a pool's file (a `vol://` volume, or a file named by path in a
    /// pool's folder) is opened beneath that folder without links
    /// (`DiskConfig::folder` names it too), so a backing file that names a host file
    /// outside the pool, or a volume swapped for a link, fails the start. Every disk's
    /// chain must also be the one recorded at define ([`crate::disk_chain`]).
    pub(super) fn confine_disks(&self, def: &mut DomainDef) -> Result<Vec<block::ChainFile>> {
        let roots = self.pool_roots();
        let pools: Vec<PathBuf> = self
            .store
            .list_pools()?
            .into_iter()
            .filter_map(|(_, p)| p.canonicalize().ok())
            .filter(|p| roots.iter().any(|r| p.starts_with(r)))
            .collect();
        let mut held = Vec::new();
        for d in def.vm.disks.iter_mut() {
            let key = crate::disk_chain::key(&d.path);
            let recorded = def.chains.get(&key).map(Vec::as_slice);
            // The folder resolved; the file itself not (a link there is refused).
            let in_pool = match (d.path.parent(), d.path.file_name()) {
                (Some(parent), Some(file)) => parent
                    .canonicalize()
                    .ok()
                    .filter(|dir| pools.contains(dir))
                    .map(|dir| (dir, file.to_owned())),
                _ => None,
            };
            let files = match in_pool {
                // Outside the pools: the chain recorded at define, or none.
                None => crate::disk_chain::open_checked(d, None, recorded)?,
                Some((dir, file)) => {
                    d.path = dir.join(file);
                    let folder = block::Folder::open(&dir).map_err(|e| {
                        Error::invalid("disk", format!("{}: {}", dir.display(), storage::chain(&e)))
                    })?;
                    d.folder = Some(dir);
                    crate::disk_chain::open_checked(d, Some(&folder), recorded).map_err(
                        |e| match e {
                            Error::Invalid { what, why } => Error::Invalid {
                                what,
                                why: format!(
                                    "{why}: a pool's disks and their backing files must be \
                                     files in the pool, as recorded at define"
                                ),
                            },
                            e => e,
                        },
                    )?
                }
            };
            crate::disk_chain::hand_over(d, &files);
            held.extend(files);
        }
        Ok(held)
    }

    /// A writable disk may be used by one running domain only.
    fn refuse_shared_disk(&self, name: &str, path: &Path) -> Result<()> {
        for other in self.disk_users(path)? {
            if other != name && self.is_active(&other) {
                return Err(Error::Conflict(format!(
                    "disk {} is in use by running domain {other:?}",
                    path.display()
                )));
            }
        }
        Ok(())
    }

    pub fn undefine(&self, name: &str) -> Result<()> {
        let l = self.domain_lock(name);
        let _g = lock(&l);
        self.store.get_domain(name)?;
        if self.is_active(name) {
            return Err(Error::Conflict(format!(
                "domain {name:?} is running: stop it first (vessel destroy {name})"
            )));
        }
        self.store.delete_domain(name)?;
        let _ = std::fs::remove_file(self.serial_log(name));
        self.rows().remove(name);
        self.events.emit(name, "undefined", "shut off", None);
        Ok(())
    }

    pub fn set_autostart(&self, name: &str, on: bool) -> Result<()> {
        let l = self.domain_lock(name);
        let _g = lock(&l);
        let mut d = self.store.get_domain(name)?;
        d.autostart = on;
        self.store.update_domain(&d)
    }

    /// Disk files attached to defined domains other than `except`: (path, domain).
    pub fn disk_users(&self, path: &Path) -> Result<Vec<String>> {
        let want = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        Ok(self
            .store
            .list_domains()?
            .into_iter()
            .filter(|d| {
                d.vm.disks
                    .iter()
                    .any(|k| k.path.canonicalize().unwrap_or_else(|_| k.path.clone()) == want)
            })
            .map(|d| d.name)
            .collect())
    }

    pub fn is_active(&self, name: &str) -> bool {
        self.rows().get(name).is_some_and(Runtime::active)
    }

    /// Waits (briefly) for a restart after a guest reboot to finish.
    fn settle(&self, name: &str) {
        self.wait_for(name, Duration::from_secs(15), |r| {
            !r.is_some_and(|r| r.restarting)
        });
    }

    pub fn start(self: &Arc<Self>, name: &str) -> Result<DomainInfo> {
        self.start_with(name, true, false)
    }

    /// Starts a domain with its vCPUs paused (`virsh start --paused`): it is paused
    /// (user) from its first moment, and runs once resumed. A managed save is restored
    /// paused: its vCPUs never run before the resume.
    pub fn start_paused(self: &Arc<Self>, name: &str) -> Result<DomainInfo> {
        self.start_with(name, true, true)
    }

    /// Starts a domain; `fresh_log` starts its serial log anew (not after a reboot).
    fn start_with(
        self: &Arc<Self>,
        name: &str,
        fresh_log: bool,
        paused: bool,
    ) -> Result<DomainInfo> {
        if let Some(dir) = self.managed_save(name) {
            // Paused from the restore on: not one guest instruction runs before resume.
            return self.start_managed(name, &dir, paused);
        }
        self.start_inner(name, fresh_log, driver::Boot::Fresh { paused }, Start::Boot)
    }

    /// Starts a domain's VMM as `boot` (booting, restoring the state saved in a folder,
    /// or waiting for the domain migrating in); `how` is the reason it runs.
    fn start_inner(
        self: &Arc<Self>,
        name: &str,
        fresh_log: bool,
        boot: driver::Boot<'_>,
        how: Start,
    ) -> Result<DomainInfo> {
        let l = self.domain_lock(name);
        let _g = lock(&l);
        let def = self.store.get_domain(name)?;
        if self.rows().get(name).is_some_and(|r| r.vmm.is_some()) {
            return Err(Error::Conflict(format!(
                "domain {name:?} is already running"
            )));
        }
        def.validate()?;
        let driver = driver::of(def.driver);
        for disk in def.vm.disks.iter().filter(|d| !d.read_only) {
            self.refuse_shared_disk(name, &disk.path)?;
        }
        let mut def = def;
        // Open until the VMM has started: it inherits them.
        let _disk_files = self.confine_disks(&mut def)?;
        let (_boot_files, recorded_now) = crate::boot_files::open_checked(&mut def)?;
        if recorded_now {
            // A variable store made by this start: later starts check it as well.
            let mut stored = self.store.get_domain(name)?;
            stored.boot_files = def.boot_files.clone();
            self.store.update_domain(&stored)?;
        }
        crate::disk_chain::after_check_hook(name);
        let run = self.run_dir(name);
        let _ = std::fs::remove_dir_all(&run.0);
        let runtime = self.attach_interfaces(
            &def,
            matches!(boot, driver::Boot::Incoming),
            driver.takes_over_taps(),
        )?;
        if let driver::Boot::Restore { dir, .. } = boot {
            if let Err(e) = driver.check_state(dir, &def, &runtime, &run) {
                self.detach_interfaces(&def);
                return Err(e);
            }
        }
        let started = driver::start(
            &self.cfg.programs,
            &runtime,
            &run,
            &self.serial_log(name),
            fresh_log,
            boot,
        )
        .and_then(|(mut child, id)| {
            match driver::wait_ready(&runtime, &run, &mut child, boot) {
                Ok(()) => Ok((child, id)),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    Err(e)
                }
            }
        });
        let (child, id) = match started {
            Ok(x) => x,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&run.0);
                self.detach_interfaces(&def);
                return Err(e);
            }
        };
        let generation = self.next_generation();
        // A restart after a reboot ends here, atomically with the domain having its VMM
        // again: at no moment is it neither.
        let entered = self.update(name, |r| {
            // A guest reboot's restart: running throughout, for the reason it ran.
            (r.state, r.reason) = if r.restarting {
                (DomainState::Running, r.reason)
            } else {
                state::next(r.state, Event::Started(how), name)?
            };
            if boot.paused() {
                (r.state, r.reason) = state::next(r.state, Event::Paused, name)?;
            }
            r.restarting = false;
            r.vmm = Some(Vmm {
                id: id.clone(),
                generation,
                started: Instant::now(),
            });
            r.ending = None;
            r.why = None;
            Ok::<_, Error>(())
        });
        entered?;
        self.record_live(&run, &runtime);
        self.events.emit_with(
            name,
            "started",
            "running",
            self.rows().get(name).map(|r| r.reason.as_str()),
            Some(format!("pid {}", id.pid)),
        );
        if boot.paused() {
            self.announce(name, "suspended", None);
        }
        self.watch(name.to_string(), generation, Some(child), id);
        let ready = driver.after_ready(&run, boot).and_then(|()| {
            // QEMU has no start-up option for the balloon's target: it is set once QEMU
            // runs (a Vessel VMM takes it from its VmConfig; a restored VM has its own).
            match (
                driver.kind(),
                boot,
                def.vm.balloon.as_ref().filter(|b| b.amount_mib > 0),
            ) {
                (DriverKind::Qemu, driver::Boot::Fresh { .. }, Some(b)) => {
                    driver.set_balloon(&run, b.amount_mib, def.vm.memory_mib)
                }
                _ => Ok(()),
            }
        });
        if let Err(e) = ready {
            // A start that fails half-way leaves no VMM behind, as libvirt's does: an
            // incoming migration whose VMM died can then undefine what it defined.
            drop(_g);
            let _ = self.end_vmm(name, End::Destroyed);
            return Err(e);
        }
        Ok(self.info_of(&def))
    }

    /// The active domain's identity, state and driver, or a conflict error saying it is
    /// not running.
    fn active_id(&self, name: &str) -> Result<(ProcId, DomainState)> {
        self.store.get_domain(name)?;
        self.rows()
            .get(name)
            .and_then(|r| r.vmm.as_ref().map(|v| (v.id.clone(), r.state)))
            .ok_or_else(|| Error::Conflict(format!("domain {name:?} is not running")))
    }

    /// Asks the guest to power off: the ACPI power button, through the domain's driver.
    /// With `wait`, waits that long for it to stop and reports whether it did.
    pub fn shutdown(&self, name: &str, wait: Option<Duration>) -> Result<DomainState> {
        {
            let l = self.domain_lock(name);
            let _g = lock(&l);
            let (id, state) = self.active_id(name)?;
            state::next(state, Event::ShutdownRequested, name)?;
            driver::of(id.driver).shutdown(&self.run_dir(name))?;
            // A guest may power off before this: then it is shut off already, which is
            // what was asked.
            if self.transition(name, Event::ShutdownRequested).is_ok() {
                self.announce(name, "shutdown-requested", None);
            }
        }
        if let Some(w) = wait {
            self.wait_for(name, w, |r| !r.is_some_and(Runtime::active));
        }
        Ok(self.state_of(name))
    }

    /// Stops the VMM at once: SIGTERM, then SIGKILL after 3 s. Returns when it has ended.
    pub fn destroy(&self, name: &str) -> Result<()> {
        self.end_vmm(name, End::Destroyed)
    }

    /// Ends the domain's VMM, its end recorded as `end`: SIGTERM, then SIGKILL after 3 s.
    /// Returns once the supervisor has recorded it.
    pub(crate) fn end_vmm(&self, name: &str, end: End) -> Result<()> {
        let l = self.domain_lock(name);
        let (_g, id) = loop {
            self.settle(name);
            let g = lock(&l);
            self.store.get_domain(name)?;
            // Marking and reading under one lock: the supervisor sees `ending` for this
            // very process, and a guest reboot now does not restart it.
            let found = self.update(name, |r| {
                let id = r.vmm.as_ref().map(|v| v.id.clone());
                if id.is_some() {
                    r.ending = Some(end);
                }
                (id, r.restarting)
            });
            match found {
                (Some(id), _) => break (g, id),
                (None, true) => {
                    drop(g);
                    continue;
                }
                (None, false) => {
                    return Err(Error::Conflict(format!("domain {name:?} is not running")))
                }
            }
        };
        let gone =
            |r: Option<&Runtime>| !r.is_some_and(|r| r.vmm.as_ref().is_some_and(|v| v.id == id));
        driver::signal(&id, libc::SIGTERM);
        if !self.wait_for(name, Duration::from_secs(3), gone) {
            driver::signal(&id, libc::SIGKILL);
            // The supervisor records the stop; wait for it so the caller sees "shut off".
            self.wait_for(name, Duration::from_secs(5), gone);
        }
        Ok(())
    }

    /// Resets the machine, as a reset button would (libvirt's `virsh reboot --mode reset`).
    /// QEMU resets in place (`system_reset`). The Vessel VMM ends as when its guest
    /// reboots and the supervisor starts it again (on_reboot=restart): the domain counts as
    /// running throughout, keeps its serial log, and gets a new VMM process; this returns
    /// once that process runs.
    pub fn reboot(&self, name: &str) -> Result<()> {
        let generation = {
            let l = self.domain_lock(name);
            let _g = lock(&l);
            let (id, _) = self.active_id(name)?;
            let generation = self
                .rows()
                .get(name)
                .and_then(|r| r.vmm.as_ref().map(|v| v.generation));
            match driver::of(id.driver).reset(&self.run_dir(name))? {
                driver::Reset::InPlace => {
                    self.events.emit(name, "rebooted", "running", None);
                    return Ok(());
                }
                driver::Reset::Restarts => generation,
            }
        };
        // The supervisor sees the VMM end and starts the domain again, taking the domain
        // lock, so wait outside it.
        let settled = |r: Option<&Runtime>| match r {
            Some(r) if r.restarting => false,
            Some(r) => r.vmm.as_ref().map(|v| v.generation) != generation,
            None => true,
        };
        if !self.wait_for(name, Duration::from_secs(30), settled) {
            return Err(Error::Conflict(format!(
                "domain {name:?} did not restart within 30 s after the reset"
            )));
        }
        match self.rows().get(name) {
            Some(r) if r.vmm.is_some() => Ok(()),
            r => Err(Error::Conflict(format!(
                "domain {name:?} did not come back after the reset: {}",
                r.and_then(|r| r.why.clone()).unwrap_or_default()
            ))),
        }
    }

    pub fn suspend(&self, name: &str) -> Result<()> {
        self.pause_resume(name, true)
    }

    pub fn resume(&self, name: &str) -> Result<()> {
        self.pause_resume(name, false)
    }

    fn pause_resume(&self, name: &str, pause: bool) -> Result<()> {
        let l = self.domain_lock(name);
        let _g = lock(&l);
        let (id, state) = self.active_id(name)?;
        let event = if pause { Event::Paused } else { Event::Resumed };
        // Refused before the VMM is asked.
        state::next(state, event, name)?;
        let d = driver::of(id.driver);
        let run = self.run_dir(name);
        if pause {
            d.pause(&run)?;
        } else {
            d.resume(&run)?;
        }
        self.transition(name, event)?;
        self.announce(name, if pause { "suspended" } else { "resumed" }, None);
        Ok(())
    }

    /// The domain's console socket (QEMU's serial chardev, or the Vessel VMM's
    /// `--console-sock`).
    pub fn console_socket(&self, name: &str) -> Result<PathBuf> {
        self.active_id(name)?;
        Ok(self.run_dir(name).console())
    }
}

/// Whether two program names are the same file: each as given, or found on $PATH when it
/// is a bare name, with links resolved.
fn same_program(a: &std::path::Path, b: &std::path::Path) -> bool {
    let resolve = |p: &std::path::Path| -> Option<PathBuf> {
        let found = if p.components().count() == 1 && !p.is_absolute() {
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|d| d.join(p))
                .find(|c| c.is_file())?
        } else {
            p.to_path_buf()
        };
        std::fs::canonicalize(found).ok()
    };
    a == b || matches!((resolve(a), resolve(b)), (Some(x), Some(y)) if x == y)
}

#[cfg(test)]
mod tests {
    /// `<emulator>` is compared as a file: a bare name is looked up on $PATH, links are
    /// followed, and another program is not the same.
    #[test]
    fn an_emulator_is_the_same_program_by_file_not_by_spelling() {
        let sh = std::fs::canonicalize("/bin/sh").unwrap();
        assert!(super::same_program(Path::new("sh"), &sh));
        assert!(super::same_program(Path::new("/bin/sh"), Path::new("sh")));
        assert!(!super::same_program(
            Path::new("/bin/true"),
            Path::new("sh")
        ));
        assert!(!super::same_program(
            Path::new("/nonexistent/qemu"),
            Path::new("qemu-system-x86_64")
        ));
    }

    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn open(tag: &str) -> (Arc<Manager>, PathBuf) {
        let dir = std::env::temp_dir().join(format!("vessel-mgr-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let m = Manager::open(Config {
            state_dir: dir.clone(),
            programs: Programs::by_name(false),
            pool_roots: vec![],
            file_roots: vec![],
            save_on_shutdown: false,
        })
        .unwrap();
        (m, dir)
    }

    /// Puts a VMM of `driver` in the table for `name`, as a start would.
    fn running(m: &Manager, name: &str, driver: DriverKind, ending: Option<End>) -> u64 {
        let generation = m.next_generation();
        m.update(name, |r| {
            (r.state, r.reason) = (DomainState::Running, Reason::Booted);
            r.vmm = Some(Vmm {
                id: ProcId {
                    pid: i32::MAX,
                    start_time: 0,
                    driver,
                },
                generation,
                started: Instant::now(),
            });
            r.ending = ending;
        });
        generation
    }

    /// How a VMM ended is read from its exit status by its driver, unless the manager
    /// ended it (then that is the reason), and never from message text; a stale
    /// supervisor changes nothing; waiters wake on the change.
    #[test]
    fn a_vmm_end_comes_from_its_status_or_from_what_the_manager_asked() {
        let (m, dir) = open("ends");
        let kernel = std::env::current_exe().unwrap();
        for (name, driver) in [("v", "vessel"), ("q", "qemu")] {
            let def = crate::domain::from_json(
                &serde_json::json!({"name": name, "driver": driver, "vm": {"kernel": kernel}})
                    .to_string(),
            )
            .unwrap();
            m.define(def).unwrap();
        }
        let status = |code: i32| Some(std::process::ExitStatus::from_raw((code & 0xff) << 8));
        let killed = Some(std::process::ExitStatus::from_raw(libc::SIGKILL));
        let row = |name: &str| m.rows().get(name).cloned().unwrap();
        for (name, driver, st, ending, want, reason, why) in [
            (
                "v",
                DriverKind::Vessel,
                status(0),
                None,
                DomainState::Shutoff,
                Reason::Shutdown,
                "guest powered off",
            ),
            (
                "v",
                DriverKind::Vessel,
                status(1),
                None,
                DomainState::Crashed,
                Reason::Crashed,
                "the VMM ended: exit status: 1",
            ),
            (
                "v",
                DriverKind::Vessel,
                killed,
                None,
                DomainState::Crashed,
                Reason::Crashed,
                "the VMM ended: signal: 9 (SIGKILL)",
            ),
            // The manager's SIGTERM shows as a status too: what it asked for wins.
            (
                "v",
                DriverKind::Vessel,
                status(1),
                Some(End::Destroyed),
                DomainState::Shutoff,
                Reason::Destroyed,
                "destroyed",
            ),
            (
                "v",
                DriverKind::Vessel,
                status(0),
                Some(End::Saved),
                DomainState::Shutoff,
                Reason::Saved,
                "saved",
            ),
            (
                "v",
                DriverKind::Vessel,
                status(0),
                Some(End::MigratedAway),
                DomainState::Shutoff,
                Reason::MigratedAway,
                "migrated",
            ),
            (
                "v",
                DriverKind::Vessel,
                None,
                None,
                DomainState::Shutoff,
                Reason::Unknown,
                "the VMM process ended",
            ),
            (
                "q",
                DriverKind::Qemu,
                status(0),
                None,
                DomainState::Shutoff,
                Reason::Shutdown,
                "guest powered off",
            ),
            // Only Vessel's VMM means "rebooted" by 10.
            (
                "q",
                DriverKind::Qemu,
                status(10),
                None,
                DomainState::Crashed,
                Reason::Crashed,
                "the VMM ended: exit status: 10",
            ),
        ] {
            let g = running(&m, name, driver, ending);
            assert!(!m.vmm_exited(name, g + 100, st), "a stale supervisor");
            assert!(m.is_active(name));
            assert!(!m.vmm_exited(name, g, st));
            let r = row(name);
            assert_eq!((r.state, r.reason), (want, reason), "{st:?} {ending:?}");
            assert_eq!(r.why.as_deref(), Some(why));
            assert!(r.vmm.is_none() && r.ending.is_none() && !m.is_active(name));
        }
        // A guest reboot: the domain stays running, for the reason it ran, with no VMM
        // until the supervisor starts it again.
        let g = running(&m, "v", DriverKind::Vessel, None);
        assert!(m.vmm_exited("v", g, status(10)));
        let r = row("v");
        assert_eq!((r.state, r.reason), (DomainState::Running, Reason::Booted));
        assert!(r.restarting && m.is_active("v"));
        // A waiter sleeps until the table changes, not on a timer.
        let waiter = {
            let m = m.clone();
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let ok = m.wait_for("v", Duration::from_secs(30), |r| {
                    !r.is_some_and(Runtime::active)
                });
                (ok, t0.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        m.update("v", |r| r.restarting = false);
        let (ok, took) = waiter.join().unwrap();
        assert!(ok && took < Duration::from_secs(10), "{took:?}");
        drop(m);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
