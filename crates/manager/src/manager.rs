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
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::domain::{self, DomainDef, DomainState, DriverKind};
use crate::driver::{self, ProcId, Programs, RunDir};
use crate::error::{Error, Result};
use crate::events::Events;
use crate::network;
use crate::store::Store;

mod migration;
mod named_snapshots;
mod qemu_save;

pub use named_snapshots::SnapshotInfo;
pub(crate) use qemu_save::{shell_quoted, QEMU_STATE};
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
    /// Managedsave every running Vessel domain when the daemon is told to end.
    pub save_on_shutdown: bool,
}

#[derive(Debug)]
struct Active {
    id: ProcId,
    state: DomainState,
    /// Bumped at every start, so a stale supervisor cannot end a newer run.
    generation: u64,
    /// Set by destroy, so the exit is reported as destroyed, not crashed.
    destroying: bool,
    started: Instant,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uptime_s: Option<f64>,
    /// Why the domain last stopped, when it is not running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_stop: Option<String>,
    pub serial_log: PathBuf,
}

/// How a domain last stopped.
#[derive(Debug, Clone)]
struct StopRecord {
    state: DomainState,
    why: String,
}

#[derive(Debug)]
pub struct Manager {
    /// Held for the daemon's life: one daemon per state directory.
    _state_lock: std::fs::File,
    pub cfg: Config,
    pub store: Store,
    pub events: Events,
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    active: Mutex<HashMap<String, Active>>,
    /// How each domain last stopped: its state then (shut off or crashed, from the VMM's
    /// exit status) and why, in words. The state is kept, never inferred from the words.
    last_stop: Mutex<HashMap<String, StopRecord>>,
    generation: Mutex<u64>,
    /// Serializes network operations.
    net_lock: Mutex<()>,
    /// Domains between a guest reboot and their VMM's restart: still "running".
    restarting: Mutex<std::collections::HashSet<String>>,
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
            active: Mutex::new(HashMap::new()),
            last_stop: Mutex::new(HashMap::new()),
            generation: Mutex::new(0),
            net_lock: Mutex::new(()),
            restarting: Mutex::new(Default::default()),
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
        let mut g = lock(&self.generation);
        *g += 1;
        *g
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
                    let state = match id.driver {
                        DriverKind::Qemu => match driver::qmp_status(&dir).as_deref() {
                            Ok("paused") => DomainState::Paused,
                            _ => DomainState::Running,
                        },
                        DriverKind::Vessel => match driver::vmm_state(&dir).as_deref() {
                            Ok("Paused") => DomainState::Paused,
                            _ => DomainState::Running,
                        },
                    };
                    let generation = self.next_generation();
                    tracing::info!(domain = %name, pid = id.pid, "re-adopted a running VMM");
                    lock(&self.active).insert(
                        name.clone(),
                        Active {
                            id: id.clone(),
                            state,
                            generation,
                            destroying: false,
                            started: Instant::now(),
                        },
                    );
                    self.events.emit(
                        &name,
                        "adopted",
                        state.as_str(),
                        Some(format!("pid {}", id.pid)),
                    );
                    self.watch(name, generation, None, id);
                }
                Some(id) if id.alive() => {
                    tracing::warn!(domain = %name, pid = id.pid, "a VMM runs for an undefined domain; leaving it alone");
                }
                _ => {
                    tracing::info!(domain = %name, "VMM ended while the daemon was down");
                    let _ = std::fs::remove_dir_all(&dir.0);
                    lock(&self.last_stop).insert(
                        name,
                        StopRecord {
                            state: DomainState::Shutoff,
                            why: "ended while the daemon was down".into(),
                        },
                    );
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
            if lock(&self.active).contains_key(&d.name) {
                continue;
            }
            if let Err(e) = self.start(&d.name) {
                tracing::warn!(domain = %d.name, "autostart failed: {e}");
            }
        }
    }

    /// Supervises a VMM: reaps our own child, or polls an adopted process.
    fn watch(self: &Arc<Self>, name: String, generation: u64, child: Option<Child>, id: ProcId) {
        let me = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name(format!("watch-{name}"))
            .spawn(move || {
                let status = match child {
                    Some(mut c) => c.wait().ok(),
                    None => {
                        while id.alive() {
                            std::thread::sleep(Duration::from_millis(100));
                        }
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
                        if let Err(e) = m.start_with(&name, false) {
                            tracing::warn!(domain = %name, "restart after reboot failed: {e}");
                            lock(&m.restarting).remove(&name);
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
        let mut active = lock(&self.active);
        let Some(a) = active.get(name) else {
            return false;
        };
        if a.generation != generation {
            return false;
        }
        let destroyed = a.destroying;
        let shutting = a.state == DomainState::InShutdown;
        let (event, state, why) = match status {
            _ if destroyed => ("stopped", DomainState::Shutoff, "destroyed".to_string()),
            Some(s) if s.success() => (
                "stopped",
                DomainState::Shutoff,
                if shutting {
                    "shutdown"
                } else {
                    "guest powered off"
                }
                .to_string(),
            ),
            // `vessel run` exits 10 when the guest rebooted.
            Some(s) if s.code() == Some(10) && a.id.driver == DriverKind::Vessel => {
                ("rebooted", DomainState::Shutoff, "guest rebooted".into())
            }
            Some(s) => (
                "crashed",
                DomainState::Crashed,
                format!("the VMM ended: {s}"),
            ),
            None => (
                "stopped",
                DomainState::Shutoff,
                "the VMM process ended".into(),
            ),
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
        if let Ok(def) = self.store.get_domain(name) {
            self.detach_interfaces(&def);
        }
        // Record why before the domain stops counting as active, so nobody sees a stopped
        // domain without its reason.
        lock(&self.last_stop).insert(
            name.to_string(),
            StopRecord {
                state,
                why: why.clone(),
            },
        );
        if event == "rebooted" {
            lock(&self.restarting).insert(name.to_string());
        }
        active.remove(name);
        drop(active);
        self.events.emit(name, event, state.as_str(), Some(why));
        event == "rebooted"
    }

    pub(crate) fn state_of(&self, name: &str) -> DomainState {
        if let Some(a) = lock(&self.active).get(name) {
            return a.state;
        }
        if lock(&self.restarting).contains(name) {
            return DomainState::Running;
        }
        lock(&self.last_stop)
            .get(name)
            .map_or(DomainState::Shutoff, |r| r.state)
    }

    fn info_of(&self, d: &DomainDef) -> DomainInfo {
        let active = lock(&self.active);
        let a = active.get(&d.name);
        let state = a.map(|a| a.state).unwrap_or(DomainState::Shutoff);
        let pid = a.map(|a| a.id.pid);
        let uptime_s = a.map(|a| a.started.elapsed().as_secs_f64());
        drop(active);
        let state = if state == DomainState::Shutoff {
            self.state_of(&d.name)
        } else {
            state
        };
        DomainInfo {
            name: d.name.clone(),
            uuid: d.uuid.clone().unwrap_or_default(),
            driver: d.driver,
            state,
            state_text: state.as_str(),
            autostart: d.autostart,
            cpus: d.vm.cpus,
            memory_mib: d.vm.memory_mib,
            pid,
            uptime_s,
            last_stop: if state.is_active() {
                None
            } else {
                lock(&self.last_stop).get(&d.name).map(|r| r.why.clone())
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

    pub fn define(&self, mut def: DomainDef) -> Result<DomainInfo> {
        self.resolve_volumes(&mut def)?;
        def.validate()?;
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

    /// Replaces an existing domain's definition (keeping its UUID); a running domain gets
    /// it at its next start, as with `virsh define` on an existing domain.
    pub fn redefine(&self, name: &str, mut def: DomainDef) -> Result<DomainInfo> {
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
            let info = crate::storage::volume_info(self, pool, vol)?;
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
        lock(&self.last_stop).remove(name);
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
        lock(&self.active).contains_key(name) || lock(&self.restarting).contains(name)
    }

    /// Waits (briefly) for a restart after a guest reboot to finish.
    fn settle(&self, name: &str) {
        let t0 = Instant::now();
        while lock(&self.restarting).contains(name) && t0.elapsed() < Duration::from_secs(15) {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn start(self: &Arc<Self>, name: &str) -> Result<DomainInfo> {
        self.start_with(name, true)
    }

    /// Starts a domain; `fresh_log` starts its serial log anew (not after a reboot).
    fn start_with(self: &Arc<Self>, name: &str, fresh_log: bool) -> Result<DomainInfo> {
        if let Some(dir) = self.managed_save(name) {
            return self.start_managed(name, &dir);
        }
        self.start_inner(name, fresh_log, driver::Boot::Fresh)
    }

    /// Starts a domain, or with `restore` brings it back from the snapshot in that folder.
    fn start_inner(
        self: &Arc<Self>,
        name: &str,
        fresh_log: bool,
        boot: driver::Boot<'_>,
    ) -> Result<DomainInfo> {
        let l = self.domain_lock(name);
        let _g = lock(&l);
        let def = self.store.get_domain(name)?;
        if lock(&self.active).contains_key(name) {
            return Err(Error::Conflict(format!(
                "domain {name:?} is already running"
            )));
        }
        def.validate()?;
        // A writable disk may be used by one running domain only.
        for disk in def.vm.disks.iter().filter(|d| !d.read_only) {
            for other in self.disk_users(&disk.path)? {
                if other != name && self.is_active(&other) {
                    return Err(Error::Conflict(format!(
                        "disk {} is in use by running domain {other:?}",
                        disk.path.display()
                    )));
                }
            }
        }
        let run = self.run_dir(name);
        let _ = std::fs::remove_dir_all(&run.0);
        let runtime = self.attach_interfaces(&def)?;
        if let driver::Boot::Restore(dir) = boot {
            let matches = match def.driver {
                DriverKind::Qemu => qemu_save::check_matches(dir, &def),
                DriverKind::Vessel => snapshots::check_matches(dir, &runtime, &run),
            };
            if let Err(e) = matches {
                self.detach_interfaces(&def);
                return Err(e);
            }
        }
        let started = driver::start_or_restore(
            &self.cfg.programs,
            &runtime,
            &run,
            &self.serial_log(name),
            fresh_log,
            boot,
        )
        .and_then(|(mut child, id)| {
            let ready = match boot {
                driver::Boot::Incoming => driver::wait_incoming(&runtime, &run, &mut child),
                _ => driver::wait_ready(&runtime, &run, &mut child),
            };
            match ready {
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
        {
            let mut active = lock(&self.active);
            active.insert(
                name.to_string(),
                Active {
                    id: id.clone(),
                    state: DomainState::Running,
                    generation,
                    destroying: false,
                    started: Instant::now(),
                },
            );
            // A restart after a reboot ends here, atomically with the domain becoming
            // active again: at no moment is it neither.
            lock(&self.restarting).remove(name);
        }
        lock(&self.last_stop).remove(name);
        self.events
            .emit(name, "started", "running", Some(format!("pid {}", id.pid)));
        self.watch(name.to_string(), generation, Some(child), id);
        if let (driver::Boot::Restore(_), DriverKind::Qemu) = (boot, def.driver) {
            // QEMU loads the saved state and waits, stopped as it was saved.
            qemu_save::continue_after_load(&run)?;
        }
        Ok(self.info_of(&def))
    }

    /// The active domain's identity, or a conflict error saying it is not running.
    fn active_id(&self, name: &str) -> Result<(ProcId, DomainState)> {
        self.store.get_domain(name)?;
        lock(&self.active)
            .get(name)
            .map(|a| (a.id.clone(), a.state))
            .ok_or_else(|| Error::Conflict(format!("domain {name:?} is not running")))
    }

    fn set_state(&self, name: &str, s: DomainState) {
        if let Some(a) = lock(&self.active).get_mut(name) {
            a.state = s;
        }
    }

    /// Asks the guest to power off: the ACPI power button, through QMP for QEMU and through
    /// the Vessel VMM's `SendCtrlAltDel` (which presses its GED power button). With `wait`,
    /// waits that long for it to stop and reports whether it did.
    pub fn shutdown(&self, name: &str, wait: Option<Duration>) -> Result<DomainState> {
        {
            let l = self.domain_lock(name);
            let _g = lock(&l);
            let (id, _) = self.active_id(name)?;
            let run = self.run_dir(name);
            match id.driver {
                DriverKind::Qemu => {
                    driver::qmp(&run, "system_powerdown")?;
                }
                DriverKind::Vessel => {
                    driver::vmm_api(
                        &run,
                        "PUT",
                        "/actions",
                        &serde_json::json!({"action_type": "SendCtrlAltDel"}),
                    )?;
                }
            }
            self.set_state(name, DomainState::InShutdown);
            self.events
                .emit(name, "shutdown-requested", "in shutdown", None);
        }
        if let Some(w) = wait {
            let deadline = Instant::now() + w;
            while self.is_active(name) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(self.state_of(name))
    }

    /// Stops the VMM at once: SIGTERM, then SIGKILL after 3 s. Returns when it has ended.
    pub fn destroy(&self, name: &str) -> Result<()> {
        let l = self.domain_lock(name);
        let t0 = Instant::now();
        let (_g, id) = loop {
            self.settle(name);
            let g = lock(&l);
            self.store.get_domain(name)?;
            // Marking and reading under one lock: the supervisor sees `destroying` for
            // this very process, and a guest reboot now does not restart it.
            let found = lock(&self.active).get_mut(name).map(|a| {
                a.destroying = true;
                a.id.clone()
            });
            match found {
                Some(id) => break (g, id),
                None if lock(&self.restarting).contains(name)
                    && t0.elapsed() < Duration::from_secs(15) =>
                {
                    drop(g);
                    continue;
                }
                None => return Err(Error::Conflict(format!("domain {name:?} is not running"))),
            }
        };
        driver::signal(&id, libc::SIGTERM);
        let t0 = Instant::now();
        while id.alive() {
            if t0.elapsed() > Duration::from_secs(3) {
                driver::signal(&id, libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // The supervisor records the stop; wait for it so the caller sees "shut off".
        let t1 = Instant::now();
        while self.is_active(name) && t1.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(2));
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
            match id.driver {
                DriverKind::Qemu => {
                    driver::qmp(&self.run_dir(name), "system_reset")?;
                    self.events.emit(name, "rebooted", "running", None);
                    return Ok(());
                }
                DriverKind::Vessel => {
                    let generation = lock(&self.active).get(name).map(|a| a.generation);
                    driver::vmm_api(
                        &self.run_dir(name),
                        "PUT",
                        "/actions",
                        &serde_json::json!({"action_type": "Reset"}),
                    )?;
                    generation
                }
            }
        };
        // The supervisor sees the VMM end (status 10) and starts the domain again, taking
        // the domain lock, so wait outside it.
        let t0 = Instant::now();
        loop {
            let current = lock(&self.active).get(name).map(|a| a.generation);
            let restarting = lock(&self.restarting).contains(name);
            if current.is_some() && current != generation && !restarting {
                return Ok(());
            }
            if current.is_none() && !restarting {
                let why = lock(&self.last_stop)
                    .get(name)
                    .map(|r| r.why.clone())
                    .unwrap_or_default();
                return Err(Error::Conflict(format!(
                    "domain {name:?} did not come back after the reset: {why}"
                )));
            }
            if t0.elapsed() > Duration::from_secs(30) {
                return Err(Error::Conflict(format!(
                    "domain {name:?} did not restart within 30 s after the reset"
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
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
        if pause && state == DomainState::Paused {
            return Err(Error::Conflict(format!(
                "domain {name:?} is already paused"
            )));
        }
        if !pause && state != DomainState::Paused {
            return Err(Error::Conflict(format!("domain {name:?} is not paused")));
        }
        let run = self.run_dir(name);
        match id.driver {
            DriverKind::Qemu => {
                driver::qmp(&run, if pause { "stop" } else { "cont" })?;
            }
            DriverKind::Vessel => {
                let s = if pause { "Paused" } else { "Resumed" };
                driver::vmm_api(&run, "PATCH", "/vm", &serde_json::json!({ "state": s }))?;
            }
        }
        let (s, ev) = if pause {
            (DomainState::Paused, "suspended")
        } else {
            (DomainState::Running, "resumed")
        };
        self.set_state(name, s);
        self.events.emit(name, ev, s.as_str(), None);
        Ok(())
    }

    /// The domain's console socket (QEMU's serial chardev, or the Vessel VMM's
    /// `--console-sock`).
    pub fn console_socket(&self, name: &str) -> Result<PathBuf> {
        self.active_id(name)?;
        Ok(self.run_dir(name).console())
    }
}
