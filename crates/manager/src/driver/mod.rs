//! The two drivers: how a domain's VMM process is started and controlled, behind one
//! [`Driver`] trait.
//!
//! - `qemu`: `qemu-system-x86_64` with direct kernel boot, its serial on a Unix socket
//!   chardev (logged to a file even when nobody is attached) and QMP on another socket.
//! - `vessel`: this executable's `vessel run` with the domain's `VmConfig`, its serial in a
//!   log file and its control API (`--api-sock`) on a socket.
//!
//! Either way the VMM runs in its own process group with no pipe to the daemon, so it
//! survives the daemon; the run folder (`run/<name>/`) holds its pidfile and sockets, which
//! is how a restarted daemon finds it again.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::domain::{DomainDef, DriverKind};
use crate::error::{Error, Result};

mod qemu;
mod vessel;

pub use vessel::vessel_config;

/// Files of one running domain.
#[derive(Clone, Debug)]
pub struct RunDir(pub PathBuf);

impl RunDir {
    /// The name of the domain's jailed VMM's cgroup (below `<the daemon's group>/vessel`):
    /// the domain's, with a tag of this daemon's state folder. Daemons started from one
    /// cgroup (a cluster's hosts on one machine, the two ends of a migration) would
    /// otherwise share a group: the source's daemon could not remove it while the
    /// destination's VMM was in it, and waited 2 s for nothing at every migration.
    pub fn cgroup_id(&self) -> String {
        let daemon = self.0.parent().unwrap_or(&self.0).as_os_str();
        // The low half of the hash is tag enough to tell a machine's daemons apart.
        let tag = fnv1a(daemon.as_encoded_bytes()) as u32;
        let name = self.0.file_name().unwrap_or_default().to_string_lossy();
        format!("{name}.{tag:08x}")
    }
    pub fn pidfile(&self) -> PathBuf {
        self.0.join("vmm.pid")
    }
    pub fn qmp(&self) -> PathBuf {
        self.0.join("qmp.sock")
    }
    pub fn console(&self) -> PathBuf {
        self.0.join("console.sock")
    }
    pub fn api(&self) -> PathBuf {
        self.0.join("api.sock")
    }
    /// Where the Vessel VMM writes its exit status (read when it was not our child).
    pub fn exit_status(&self) -> PathBuf {
        self.0.join("exit-status")
    }
    /// Where a Vessel VMM waits for a domain migrating in (`vessel run --incoming`).
    pub fn incoming(&self) -> PathBuf {
        self.0.join("incoming.sock")
    }
    /// Where the daemon takes a domain's migration stream from its jailed VMM, to pass
    /// on to the destination.
    pub fn migrate_out(&self) -> PathBuf {
        self.0.join("migrate.sock")
    }
    /// Where an outgoing migration stands (`manager::migration::Outgoing`), for a
    /// daemon started after the one that sent it died.
    pub fn outgoing_migration(&self) -> PathBuf {
        self.0.join("migrating-out.json")
    }
    /// The `VmConfig` a Vessel VMM runs (`vessel run --config`).
    pub fn config(&self) -> PathBuf {
        self.0.join("vm.json")
    }

    pub fn stderr(&self) -> PathBuf {
        self.0.join("vmm.log")
    }
    /// The empty folder a jailed Vessel VMM makes its root (`vessel run --jail`).
    pub fn jail_root(&self) -> PathBuf {
        self.0.join("root")
    }
}

/// What identifies a running VMM process across daemon restarts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcId {
    pub pid: i32,
    /// Field 22 of /proc/PID/stat: tells a reused PID from ours.
    pub start_time: u64,
    pub driver: DriverKind,
}

impl ProcId {
    pub fn write(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(
            &tmp,
            format!(
                "{} {} {}\n",
                self.pid,
                self.start_time,
                self.driver.as_str()
            ),
        )
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| Error::io("writing pidfile", path, e))
    }

    pub fn read(path: &Path) -> Option<Self> {
        let s = std::fs::read_to_string(path).ok()?;
        let mut it = s.split_whitespace();
        let pid = it.next()?.parse().ok()?;
        let start_time = it.next()?.parse().ok()?;
        let driver = it.next()?.parse().ok()?;
        Some(ProcId {
            pid,
            start_time,
            driver,
        })
    }

    /// Whether this very process still runs (not a zombie, not a reused PID).
    pub fn alive(&self) -> bool {
        matches!(proc_stat(self.pid), Some((state, st)) if st == self.start_time && state != 'Z' && state != 'X')
    }
}

impl ProcId {
    /// Returns once this process has ended: on its pidfd (readable when it exits), so
    /// a VMM the daemon did not start is watched without polling.
    pub fn wait_exit(&self) {
        self.wait_exit_for(None);
    }

    /// [`ProcId::wait_exit`] for at most `limit` (None: no limit); returns whether it
    /// ended.
    pub fn wait_exit_for(&self, limit: Option<Duration>) -> bool {
        let deadline = limit.map(|l| Instant::now() + l);
        let look = || {
            while self.alive() {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            true
        };
        // SAFETY: pidfd_open(2) takes a PID and flags and returns a new descriptor or -1;
        // no memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid, 0) } as i32;
        if fd < 0 {
            // Gone already (ESRCH), or a kernel before 5.3: look instead.
            return look();
        }
        // SAFETY: `fd` is the descriptor pidfd_open just returned, owned from here on.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // The PID may have been reused between reading the pidfile and opening it.
        if !self.alive() {
            return true;
        }
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            let ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    i32::try_from(left.as_millis()).unwrap_or(i32::MAX)
                }
            };
            // SAFETY: one valid pollfd for the call's duration.
            match unsafe { libc::poll(&mut p, 1, ms) } {
                n if n > 0 => return true,
                0 => return !self.alive(),
                _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
                // Cannot wait on it: look instead.
                _ => return look(),
            }
        }
    }
}

/// (state letter, start time) from /proc/PID/stat.
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // After ')': field 3 (state) is index 0, so field 22 is index 19.
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

pub fn proc_id(pid: i32, driver: DriverKind) -> Option<ProcId> {
    proc_stat(pid).map(|(_, start_time)| ProcId {
        pid,
        start_time,
        driver,
    })
}

/// Sends a signal to a process we identified.
pub fn signal(id: &ProcId, sig: libc::c_int) {
    if id.alive() {
        // SAFETY: kill(2) with a PID we checked is our VMM; no memory is involved.
        unsafe {
            libc::kill(id.pid, sig);
        }
    }
}

/// Programs the drivers run.
#[derive(Clone, Debug)]
pub struct Programs {
    /// The `vessel` executable (its `run` subcommand is the VMM).
    pub vessel: PathBuf,
    pub qemu: PathBuf,
    /// Start Vessel VMMs in a jail (`vessel run --jail`) as an unprivileged user; off
    /// only with `vessel daemon --no-jail`, for development.
    pub jail: bool,
    /// The user and group jailed Vessel VMMs become once their VM is built (`vessel
    /// daemon --vmm-uid/--vmm-gid`; [`DEFAULT_VMM_IDS`] unless given).
    pub vmm_ids: (u32, u32),
    /// A user per jailed VMM instead (`vessel daemon --vmm-uid-range START:COUNT`): START
    /// plus a hash of the domain's name, modulo COUNT. Two VMMs of the same user could
    /// at most signal each other (seccomp refuses it anyway); distinct users cannot even
    /// read each other's `/proc`.
    pub vmm_uid_range: Option<(u32, u32)>,
    /// The cgroup version whose hierarchy gives each jailed Vessel VMM its CPU and memory
    /// limits (`vessel run --cgroup`); None where the host has no cgroup hierarchy with
    /// the cpu and memory controllers ([`sandbox::cgroup::Version::detect`]).
    pub vmm_cgroups: Option<sandbox::cgroup::Version>,
}

#[cfg(test)]
impl Programs {
    /// The programs by their bare names (looked up on PATH), default VMM ids, no
    /// per-VM users or cgroups: what the drivers' unit tests build commands with.
    pub(crate) fn by_name(jail: bool) -> Self {
        Programs {
            vessel: "vessel".into(),
            qemu: "qemu-system-x86_64".into(),
            jail,
            vmm_ids: DEFAULT_VMM_IDS,
            vmm_uid_range: None,
            vmm_cgroups: None,
        }
    }
}

/// The folder below the daemon's own cgroup that holds its VMMs' groups, one per
/// domain (see [`RunDir::cgroup_id`]).
pub const VMM_PARENT_CGROUP: &str = "vessel";

/// Removes the cgroup of `name`'s jailed VMM once it has ended (see
/// `vessel::vessel_limit_args`); nothing when the daemon gives none.
pub fn release_cgroup(p: &Programs, name: &str, run: &RunDir) {
    let Some(version) = p.vmm_cgroups.filter(|_| p.jail) else {
        return;
    };
    let spec = sandbox::cgroup::Spec {
        version,
        parent: PathBuf::from(VMM_PARENT_CGROUP),
        id: run.cgroup_id(),
        // Only their controllers count here: the group is in those hierarchies.
        settings: ["cpu.max=max", "memory.max=max"]
            .into_iter()
            .filter_map(|s| s.parse().ok())
            .collect(),
    };
    // A VMM killed with its waiter (PR_SET_PDEATHSIG) may take a moment to leave.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        match sandbox::cgroup::remove(&spec) {
            Ok(()) => return,
            Err(e) if std::time::Instant::now() > deadline => {
                tracing::warn!(domain = %name, "removing the VMM's cgroup: {e}");
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// 64-bit FNV-1a: a hash that stays the same across daemon builds, for names a restarted
/// daemon must find again (a domain's VMM user, its cgroup's tag).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// nobody and nogroup.
pub const DEFAULT_VMM_IDS: (u32, u32) = (65534, 65534);

impl Programs {
    /// The user and group the VMM of the domain whose run folder is `run` becomes.
    pub(crate) fn vmm_ids_for(&self, run: &RunDir) -> (u32, u32) {
        let Some((start, count)) = self.vmm_uid_range.filter(|&(_, n)| n > 0) else {
            return self.vmm_ids;
        };
        let name = run.0.file_name().unwrap_or_default().as_encoded_bytes();
        let slot = (fnv1a(name) % u64::from(count)) as u32;
        (start.saturating_add(slot), self.vmm_ids.1)
    }
}

/// How a domain's VMM starts.
#[derive(Clone, Copy, Debug)]
pub enum Boot<'a> {
    /// Boots the guest; `paused`: its vCPUs wait, not one guest instruction run, until
    /// the domain is resumed (`virsh start --paused`).
    Fresh { paused: bool },
    /// Restores the VM state a driver saved in `dir` ([`Driver::save_state`]); `paused`:
    /// its vCPUs stay stopped from the restore on, not one guest instruction run, until
    /// the domain is resumed (`virsh start --paused` of a managed save).
    Restore { dir: &'a Path, paused: bool },
    /// Waits for the domain migrating in from another daemon at [`RunDir::incoming`].
    Incoming,
}

impl Boot<'_> {
    /// Whether the VM starts with its vCPUs paused.
    pub fn paused(&self) -> bool {
        matches!(
            self,
            Boot::Fresh { paused: true } | Boot::Restore { paused: true, .. }
        )
    }
}

/// How a guest reset goes on a driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reset {
    /// The machine reset in place: the same VMM process runs on.
    InPlace,
    /// The VMM ends (as on a guest reboot) and the supervisor starts it again.
    Restarts,
}

/// A device added to or removed from a running VM (virsh's `attach-*`/`detach-*
/// --live`).
#[derive(Clone, Copy, Debug)]
pub enum Hotplug<'a> {
    AttachDisk(&'a vmm::config::DiskConfig),
    DetachDisk(&'a vmm::config::DiskConfig),
    /// Its TAP already made and on its bridge.
    AttachNet(&'a vmm::config::NetConfig),
    DetachNet(&'a vmm::config::NetConfig),
}

impl Hotplug<'_> {
    /// libvirt's words for the operation ("attach a disk", …).
    pub fn what(&self) -> &'static str {
        match self {
            Hotplug::AttachDisk(_) => "attach a disk to",
            Hotplug::DetachDisk(_) => "detach a disk from",
            Hotplug::AttachNet(_) => "attach an interface to",
            Hotplug::DetachNet(_) => "detach an interface from",
        }
    }
}

/// What the manager asks of a hypervisor: one implementation per [`DriverKind`]
/// (libvirt's `virHypervisorDriver` table in Rust), so the manager's verbs never branch on
/// which hypervisor runs a domain. What a driver cannot do is an [`Error::Unsupported`]
/// naming the driver and the operation, never a silent skip.
pub trait Driver: Sync + std::fmt::Debug {
    fn kind(&self) -> DriverKind;

    /// Refuses, at define time, a `VmConfig` this driver would run without part of it,
    /// naming the part.
    fn check(&self, vm: &vmm::VmConfig) -> Result<()>;

    /// The VMM's command line for `def` (its runtime definition, TAPs attached) started
    /// as `boot`, with its files in `run` and its serial console logged to `log`.
    fn command(
        &self,
        p: &Programs,
        def: &DomainDef,
        run: &RunDir,
        log: &Path,
        boot: Boot<'_>,
    ) -> Result<Command>;

    /// Whether a VMM started as `boot` answers on its control socket (or, migrating in,
    /// listens for the domain).
    fn ready(&self, run: &RunDir, boot: Boot<'_>) -> bool;

    /// What a ready VMM still needs before it runs the guest.
    fn after_ready(&self, _run: &RunDir, _boot: Boot<'_>) -> Result<()> {
        Ok(())
    }

    /// Whether a VMM found running (a restarted daemon adopting it) has its VM paused.
    fn probe_paused(&self, run: &RunDir) -> bool;

    /// Asks the guest to power off (the ACPI power button).
    fn shutdown(&self, run: &RunDir) -> Result<()>;

    /// Resets the machine as a reset button would.
    fn reset(&self, run: &RunDir) -> Result<Reset>;

    fn pause(&self, run: &RunDir) -> Result<()>;

    fn resume(&self, run: &RunDir) -> Result<()>;

    /// How a VMM that ended with `status` (None: no status to read) ended.
    fn ended(&self, status: Option<std::process::ExitStatus>) -> crate::state::End;

    /// Writes the running domain's VM state into the new folder `dir`, the VM paused
    /// (and left paused: the caller resumes or ends it).
    fn save_state(&self, run: &RunDir, def: &DomainDef, dir: &Path) -> Result<()>;

    /// Whether `dir` holds a VM state this driver saved.
    fn has_state(&self, dir: &Path) -> bool;

    /// Refuses a saved VM state that the domain's definition now (`stored`; `runtime`
    /// is it with its TAPs attached) does not describe: the domain was redefined since.
    fn check_state(
        &self,
        dir: &Path,
        stored: &DomainDef,
        runtime: &DomainDef,
        run: &RunDir,
    ) -> Result<()>;

    /// The user and group the VMM runs as once started, when not the daemon's (files the
    /// VMM is to open are handed to it).
    fn vmm_user(&self, _p: &Programs, _run: &RunDir) -> Option<(u32, u32)> {
        None
    }

    /// Sends the running domain's VM, live, to the VMM listening on the Unix socket `to`;
    /// returns the VMM's report (rounds, downtime, total time).
    fn migrate(&self, run: &RunDir, to: &Path) -> Result<serde_json::Value>;

    /// Whether this driver's VMM, migrating in from a VMM on this host, takes over the
    /// TAPs that VMM holds (handed over with the VM) rather than opening its own by name.
    fn takes_over_taps(&self) -> bool {
        false
    }

    /// After [`Driver::migrate`] sent the whole stream: asks the destination to run the
    /// domain (`finish`, libvirt's Finish: it fails when the destination cannot) and
    /// then ends this VMM, or, when `finish` failed, runs the domain here again
    /// (libvirt's Confirm), the source's VM having stayed paused meanwhile; `finish`'s
    /// error is returned then. The default is for VMMs that confirm between themselves
    /// (Vessel's: the source waits, paused, for its destination's answer that the VM runs
    /// there, and runs on when none comes), so `finish` is not asked.
    fn confirm_migration(&self, _run: &RunDir, _finish: &dyn Fn() -> Result<()>) -> Result<()> {
        Ok(())
    }

    /// Destination side of [`Driver::confirm_migration`]: once the stream has come
    /// whole, runs the domain that migrated in, paused until now; fails when it cannot.
    fn finish_incoming(&self, _run: &RunDir) -> Result<()> {
        Ok(())
    }

    /// Whether the VMM runs the guest now: neither paused nor waiting for a migration's
    /// stream or finish (at a destination: the finish happened). A VMM that cannot be
    /// asked does not run it.
    fn guest_runs(&self, run: &RunDir) -> bool;

    /// Refuses, before anything is made for it (a TAP, a volume), a change to the
    /// running VM whose live definition is `live` that its machine cannot take: an
    /// [`Error::Unsupported`] saying why, never a change left for later.
    fn can_hotplug(&self, live: &DomainDef, change: Hotplug<'_>) -> Result<()>;

    /// Adds a device to, or removes one from, the running VM whose live definition is
    /// `live`; returns once the guest has it (or has let it go).
    fn hotplug(&self, run: &RunDir, live: &DomainDef, change: Hotplug<'_>) -> Result<()>;

    /// Sets the running VM's balloon target: `amount_mib` of its `memory_mib` given back
    /// by the guest.
    fn set_balloon(&self, run: &RunDir, amount_mib: u32, memory_mib: u64) -> Result<()>;

    /// The balloon's view of the guest's memory with virsh dommemstat's names and units
    /// (KiB, counts, `last_update` in seconds since the epoch); `actual` always, the
    /// guest's statistics when its balloon polls them.
    fn memory_stats(&self, run: &RunDir, memory_mib: u64) -> Result<Vec<(String, u64)>>;
}

/// virsh dommemstat's names for the virtio balloon's statistics (by tag: swap in and
/// out, major and minor faults, free, total, available, caches, hugetlb allocations and
/// failures) and whether the value is bytes (given in KiB) or a count.
pub const MEMSTAT_NAMES: [(&str, bool); 10] = [
    ("swap_in", true),
    ("swap_out", true),
    ("major_fault", false),
    ("minor_fault", false),
    ("unused", true),
    ("available", true),
    ("usable", true),
    ("disk_caches", true),
    ("hugetlb_pgalloc", false),
    ("hugetlb_pgfail", false),
];

/// The VMM's resident memory in KiB (virsh's `rss`), from the pid in its pidfile.
pub(crate) fn vmm_rss_kib(run: &RunDir) -> Option<u64> {
    let pid = ProcId::read(&run.pidfile())?.pid;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The driver of a kind.
pub fn of(kind: DriverKind) -> &'static dyn Driver {
    match kind {
        DriverKind::Vessel => &vessel::VesselDriver,
        DriverKind::Qemu => &qemu::QemuDriver,
    }
}

/// Starts a domain's VMM through its driver. Returns the child (for the daemon that
/// started it to reap) and its identity, written to the run folder's pidfile.
pub fn start(
    p: &Programs,
    def: &DomainDef,
    run: &RunDir,
    serial_log: &Path,
    fresh_log: bool,
    boot: Boot<'_>,
) -> Result<(Child, ProcId)> {
    std::fs::create_dir_all(&run.0).map_err(|e| Error::io("creating run folder", &run.0, e))?;
    if run.console().as_os_str().len() > 100 {
        return Err(Error::invalid(
            "state directory",
            format!(
                "{} is too long for Unix socket paths (108 bytes): use a shorter --state-dir",
                run.0.display()
            ),
        ));
    }
    // A UEFI domain's variable store, made from its template on the first start (either
    // driver writes it in place from then on).
    def.vm
        .prepare_firmware_vars()
        .map_err(|e| Error::invalid("UEFI variable store", e.to_string()))?;
    // A new log for each start (a restart after a guest reboot continues it).
    if fresh_log {
        File::create(serial_log).map_err(|e| Error::io("creating serial log", serial_log, e))?;
    }
    let mut cmd = of(def.driver).command(p, def, run, serial_log, boot)?;
    let stderr = OpenOptions::new()
        .create(true)
        .append(true)
        .open(run.stderr())
        .map_err(|e| Error::io("creating VMM log", run.stderr(), e))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        // Own process group: a Ctrl-C meant for the daemon does not reach the VMMs.
        .process_group(0);
    default_signals(&mut cmd);
    inherit_fds(&mut cmd, &def.vm);
    let what = match def.driver {
        DriverKind::Qemu => p.qemu.display().to_string(),
        DriverKind::Vessel => format!("{} run", p.vessel.display()),
    };
    let child = cmd.spawn().map_err(|e| Error::Spawn {
        what: what.clone(),
        why: if e.kind() == std::io::ErrorKind::NotFound && def.driver == DriverKind::Qemu {
            format!("{e}: install QEMU (apt-get install qemu-system-x86)")
        } else {
            e.to_string()
        },
    })?;
    let pid = child.id() as i32;
    let id = proc_id(pid, def.driver).unwrap_or(ProcId {
        pid,
        start_time: 0,
        driver: def.driver,
    });
    id.write(&run.pidfile())?;
    Ok((child, id))
}

/// Starts `cmd` with no signal blocked. The daemon blocks SIGTERM, SIGINT and SIGHUP in
/// its threads (its signal thread waits for them), and a child kept that mask: a VMM
/// never saw destroy's SIGTERM and was killed 3 s later.
pub(crate) fn default_signals(cmd: &mut Command) {
    // SAFETY: the hook runs in the child between fork and exec; it only calls
    // sigemptyset and pthread_sigmask, which are async-signal-safe, on its own stack.
    unsafe {
        cmd.pre_exec(|| {
            let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            // SAFETY: sigemptyset initializes the set it is given.
            if libc::sigemptyset(set.as_mut_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: `set` was initialized just above; the old mask is not asked for.
            match libc::pthread_sigmask(libc::SIG_SETMASK, set.as_ptr(), std::ptr::null_mut()) {
                0 => Ok(()),
                e => Err(std::io::Error::from_raw_os_error(e)),
            }
        });
    }
}

/// Lets the VMM inherit the descriptors its disks name (`DiskConfig::fds`: the files the
/// manager opened and checked, see `Manager::confine_disks`) and those of its boot files
/// (`VmConfig::opened`, see `crate::boot_files`). They stay close-on-exec in
/// the daemon, so no other VMM started meanwhile gets them; only this child clears the
/// flag, on those numbers alone.
pub(crate) fn inherit_fds(cmd: &mut Command, vm: &vmm::VmConfig) {
    let fds: Vec<i32> = vm
        .disks
        .iter()
        .flat_map(|d| d.fds.iter().map(|f| f.fd))
        .chain(vm.opened.iter().map(|o| o.fd))
        .collect();
    if fds.is_empty() {
        return;
    }
    // SAFETY: the hook runs in the child between fork and exec; fcntl is
    // async-signal-safe, and `fds` was built before the fork (no allocation here).
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Waits for the VMM's control socket to answer (or, migrating in, for it to listen), or
/// for the guest to end already; a VMM that fails to start is an error carrying the last
/// lines of its log.
pub fn wait_ready(def: &DomainDef, run: &RunDir, child: &mut Child, boot: Boot<'_>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let driver = of(def.driver);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            // Status 1 is the VMM's own failure (bad config, missing file); any other exit
            // means the guest ran and ended already (powered off, debug-exit), which the
            // supervisor reports like any other stop.
            if status.code().is_some_and(|c| c != 1) {
                return Ok(());
            }
            let log = std::fs::read_to_string(run.stderr()).unwrap_or_default();
            let last: Vec<&str> = log.lines().rev().take(3).collect();
            let mut last: Vec<&str> = last.into_iter().rev().collect();
            last.retain(|l| !l.trim().is_empty());
            return Err(Error::Spawn {
                what: format!("domain {}", def.name),
                why: format!("the VMM exited at once ({status}): {}", last.join(" / ")),
            });
        }
        if driver.ready(run, boot) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Spawn {
                what: format!("domain {}", def.name),
                why: "its control socket did not appear within 10 s".into(),
            });
        }
        // A child's socket appearing has nothing to wait on but the file system.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The name cloud-init's generated meta-data gives the guest: the VM's own, else the
/// domain's when it is a DNS label, else Vessel's default.
pub(crate) fn seed_name(def: &DomainDef) -> String {
    def.vm
        .name
        .clone()
        .or_else(|| Some(def.name.clone()).filter(|n| vmm::cloud_init::valid_hostname(n)))
        .unwrap_or_else(|| vmm::config::DEFAULT_VM_NAME.to_string())
}

pub use qemu::{qmp, qmp_status};

/// Sends one request to a Vessel VMM's control API; errors carry its `fault_message`.
pub fn vmm_api(run: &RunDir, method: &str, path: &str, body: &serde_json::Value) -> Result<()> {
    vmm_api_json(run, method, path, body).map(|_| ())
}

/// [`vmm_api`], returning the answer's JSON body (null when it has none).
pub fn vmm_api_json(
    run: &RunDir,
    method: &str,
    path: &str,
    body: &serde_json::Value,
) -> Result<serde_json::Value> {
    let b = body.to_string();
    let r = vmm::api::http::client_request(
        &run.api(),
        method,
        path,
        Some(("application/json", b.as_bytes())),
    )
    .map_err(|e| Error::Conflict(format!("the VMM's control API: {e}")))?;
    if r.status / 100 == 2 {
        return Ok(serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null));
    }
    let msg = serde_json::from_slice::<serde_json::Value>(&r.body)
        .ok()
        .and_then(|v| {
            v.get("fault_message")
                .and_then(|m| m.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| format!("status {}", r.status));
    Err(Error::Unsupported(format!("the Vessel VMM refused: {msg}")))
}

/// Appends a line to a domain's VMM log (manager-side notes).
pub fn note(run: &RunDir, line: &str) {
    if let Ok(mut f) = OpenOptions::new().append(true).open(run.stderr()) {
        let _ = writeln!(f, "vessel-manager: {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn pidfiles_identify_our_process() {
        let me = proc_id(std::process::id() as i32, DriverKind::Qemu).unwrap();
        assert!(me.alive());
        let dir = std::env::temp_dir().join(format!("vessel-pid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("vmm.pid");
        me.write(&f).unwrap();
        assert_eq!(ProcId::read(&f), Some(me.clone()));
        let reused = ProcId {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!reused.alive());
        // A process that ends is seen ending on its pidfd, and one that runs on is not.
        let mut child = std::process::Command::new("sleep")
            .arg("0.3")
            .spawn()
            .unwrap();
        let id = proc_id(child.id() as i32, DriverKind::Vessel).unwrap();
        assert!(!id.wait_exit_for(Some(Duration::from_millis(50))));
        let t0 = Instant::now();
        // A child stays a zombie until reaped, and a zombie does not count as alive.
        assert!(id.wait_exit_for(Some(Duration::from_secs(10))));
        assert!(t0.elapsed() < Duration::from_secs(5));
        child.wait().unwrap();
        std::fs::write(&f, "garbage").unwrap();
        assert_eq!(ProcId::read(&f), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
