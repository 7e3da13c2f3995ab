//! The two drivers: how a domain's VMM process is started and controlled.
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
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm::config::DiskFormat;
use vmm::Accel;

use crate::domain::{DomainDef, DriverKind};
use crate::error::{Error, Result};
use crate::qmp::Qmp;

/// Files of one running domain.
#[derive(Clone, Debug)]
pub struct RunDir(pub PathBuf);

impl RunDir {
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
        let hash = name.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let slot = (hash % u64::from(count)) as u32;
        (start.saturating_add(slot), self.vmm_ids.1)
    }
}

fn qemu_accel(a: Accel) -> &'static str {
    match a {
        Accel::Kvm => "kvm",
        Accel::Emu | Accel::Hybrid => "tcg",
        Accel::Auto => match hypervisor::host::KvmSupport::probe() {
            hypervisor::host::KvmSupport::Native => "kvm",
            _ => "tcg",
        },
    }
}

/// QEMU's spelling of a CPU model (QEMU 7.2 has no x86-64-vN models: name the features).
fn qemu_cpu(m: vmm::CpuModel) -> &'static str {
    match m {
        vmm::CpuModel::Qemu64 => "qemu64",
        vmm::CpuModel::X86_64V2 => "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt",
        vmm::CpuModel::X86_64V3 => {
            "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt,+avx,+avx2,+bmi1,+bmi2,+f16c,+fma,+abm,+movbe,+xsave"
        }
        vmm::CpuModel::Max => "max",
    }
}

fn qemu_command(p: &Programs, def: &DomainDef, run: &RunDir, log: &Path) -> Result<Command> {
    let vm = &def.vm;
    let mut c = Command::new(&p.qemu);
    c.args(["-name", &format!("guest={},debug-threads=on", def.name)]);
    if let Some(u) = &def.uuid {
        c.args(["-uuid", u]);
    }
    c.args(["-machine", "q35", "-accel", qemu_accel(vm.accel)]);
    c.args(["-m", &format!("{}M", vm.memory_mib)]);
    // The same topology Vessel's VMM gives: threads per core, one socket.
    c.args([
        "-smp",
        &format!("{},threads={}", vm.cpus, vm.threads_per_core),
    ]);
    c.args(["-cpu", qemu_cpu(vm.cpu_model)]);
    if let Some(k) = &vm.kernel {
        c.arg("-kernel").arg(k);
        if let Some(i) = &vm.initrd {
            c.arg("-initrd").arg(i);
        }
        c.args(["-append", &vm.cmdline]);
    }
    match (&vm.firmware, &vm.firmware_vars) {
        // UEFI: the code and the variable store on QEMU's two pflash drives.
        (Some(code), Some(vars)) => {
            c.arg("-drive").arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                code.display()
            ));
            c.arg("-drive").arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                vars.display()
            ));
        }
        (Some(f), None) => {
            c.arg("-bios").arg(f);
        }
        (None, _) => {}
    }
    c.args(["-nodefaults", "-no-user-config", "-display", "none"]);
    c.arg("-chardev").arg(format!(
        "socket,id=console0,path={},server=on,wait=off,logfile={},logappend=on",
        chardev_path(&run.console())?,
        chardev_path(log)?
    ));
    c.args(["-serial", "chardev:console0"]);
    c.arg("-qmp").arg(format!(
        "unix:{},server=on,wait=off",
        chardev_path(&run.qmp())?
    ));
    for (i, d) in vm.disks.iter().enumerate() {
        // Always a format: QEMU would probe (see docs/SECURITY.md). A definition from
        // before formats were fixed at define time gets what the Vessel VMM does: raw, or
        // a refusal for a file that looks like qcow2 (never the guest's guess).
        let f = match d.format {
            Some(f) => f,
            None if block::probe(&d.path).ok() == Some(block::Format::Qcow2) => {
                return Err(Error::invalid(
                    "disk",
                    format!(
                        "{} starts with a qcow2 header but no format was given: \
                         redefine the domain with the disk's format",
                        d.path.display()
                    ),
                ))
            }
            None => DiskFormat::Raw,
        };
        let mut drive = format!(
            "file={},if=virtio,index={i},format={}",
            chardev_path(&d.path)?,
            disk_format(f)
        );
        if d.read_only {
            drive.push_str(",readonly=on");
        }
        c.arg("-drive").arg(drive);
    }
    for (i, n) in vm.nets.iter().enumerate() {
        // Checked at definition too; a stored definition from an older version is not.
        crate::domain::check_tap_name(&n.tap)?;
        c.arg("-netdev").arg(format!(
            "tap,id=net{i},ifname={},script=no,downscript=no",
            n.tap
        ));
        // No option ROM: the kernel is booted directly, and the ROM files may not be installed.
        let mut dev = format!("virtio-net-pci,netdev=net{i},romfile=");
        if let Some(m) = &n.mac {
            dev.push_str(&format!(",mac={m}"));
        }
        // QEMU's VIRTIO_NET_F_MTU: the same advertisement Vessel's virtio-net makes.
        if let Some(mtu) = n.mtu {
            dev.push_str(&format!(",host_mtu={mtu}"));
        }
        c.arg("-device").arg(dev);
    }
    if vm.rng {
        c.args(["-device", "virtio-rng-pci"]);
    }
    if let Some(ci) = &vm.cloud_init {
        // The same NoCloud seed Vessel's VMM builds, as a file in the run folder.
        let seed = vmm::cloud_init::seed_image(ci, &seed_name(def)).map_err(|e| {
            Error::invalid(
                "cloud_init",
                format!("{e}: {:?}", std::error::Error::source(&e)),
            )
        })?;
        let path = run.0.join("cidata.img");
        std::fs::write(&path, seed).map_err(|e| {
            Error::invalid("cloud_init", format!("writing {}: {e}", path.display()))
        })?;
        c.arg("-drive").arg(format!(
            "file={},if=virtio,format=raw,readonly=on",
            chardev_path(&path)?
        ));
    }
    Ok(c)
}

/// The name cloud-init's generated meta-data gives the guest: the VM's own, else the
/// domain's when it is a DNS label, else Vessel's default.
fn seed_name(def: &DomainDef) -> String {
    def.vm
        .name
        .clone()
        .or_else(|| Some(def.name.clone()).filter(|n| vmm::cloud_init::valid_hostname(n)))
        .unwrap_or_else(|| vmm::config::DEFAULT_VM_NAME.to_string())
}

fn disk_format(f: DiskFormat) -> &'static str {
    match f {
        DiskFormat::Raw => "raw",
        DiskFormat::Qcow2 => "qcow2",
    }
}

/// QEMU option values are comma-separated: a path with a comma would be misread.
fn chardev_path(p: &Path) -> Result<String> {
    let s = p.to_string_lossy().into_owned();
    if s.contains(',') {
        return Err(Error::invalid(
            "path",
            format!("{s}: QEMU cannot take paths containing ','"),
        ));
    }
    Ok(s)
}

/// Vessel gets the domain's `VmConfig` itself, as a file in the run folder (never
/// re-derived as flags, which would drop what has no flag), with the serial console on
/// the console socket and, for cloud-init, the domain's name.
fn vessel_command(p: &Programs, def: &DomainDef, run: &RunDir, log: &Path) -> Result<Command> {
    let json = serde_json::to_vec_pretty(&vessel_config(def, run))
        .map_err(|e| Error::invalid("domain", format!("{}: {e}", def.name)))?;
    write_private(&run.config(), &json)?;
    let mut c = Command::new(&p.vessel);
    c.arg("run").arg("--config").arg(run.config());
    vessel_control_args(p, &mut c, run, log)?;
    Ok(c)
}

/// The `VmConfig` a Vessel VMM runs for `def` (its runtime definition, TAPs attached) in
/// the run folder `run`.
pub fn vessel_config(def: &DomainDef, run: &RunDir) -> vmm::VmConfig {
    let mut vm = def.vm.clone();
    vm.serial = vmm::SerialConfig::Stdio;
    if let Some(v) = vm
        .vsock
        .as_mut()
        .filter(|v| v.uds_path.as_os_str().is_empty())
    {
        // A vsock device defined without a host socket (libvirt XML): in the run folder.
        v.uds_path = run.0.join("vsock.sock");
    }
    if vm.virtio_console.is_some() {
        // The virtio console (hvc0) writes to a file in the run folder.
        vm.virtio_console = Some(vmm::SerialConfig::File(run.0.join("hvc0.log")));
    }
    if vm.cloud_init.is_some() {
        vm.name = Some(seed_name(def));
    }
    // The domain's UUID is the machine's (SMBIOS), as libvirt gives QEMU -uuid.
    if vm.uuid.is_none() {
        vm.uuid = def.uuid.clone();
    }
    vm
}

/// A Vessel VMM that restores the snapshot in `dir` (`vessel run --restore`) instead of
/// booting, controlled as one that boots.
fn vessel_restore_command(p: &Programs, dir: &Path, run: &RunDir, log: &Path) -> Result<Command> {
    let mut c = Command::new(&p.vessel);
    c.arg("run").arg("--restore").arg(dir);
    vessel_control_args(p, &mut c, run, log)?;
    Ok(c)
}

/// A Vessel VMM that waits for `def` migrating in (`vessel run --incoming`), checked
/// against the configuration `def` gives, controlled as one that boots.
fn vessel_incoming_command(
    p: &Programs,
    def: &DomainDef,
    run: &RunDir,
    log: &Path,
) -> Result<Command> {
    let json = serde_json::to_vec_pretty(&vessel_config(def, run))
        .map_err(|e| Error::invalid("domain", format!("{}: {e}", def.name)))?;
    write_private(&run.config(), &json)?;
    let mut c = Command::new(&p.vessel);
    c.arg("run")
        .arg("--incoming")
        .arg(format!("unix:{}", run.incoming().display()))
        .arg("--config")
        .arg(run.config());
    vessel_control_args(p, &mut c, run, log)?;
    Ok(c)
}

fn vessel_control_args(p: &Programs, c: &mut Command, run: &RunDir, log: &Path) -> Result<()> {
    c.arg("--console-sock")
        .arg(run.console())
        .arg("--console-log")
        .arg(log);
    c.arg("--api-sock").arg(run.api());
    c.arg("--status-file").arg(run.exit_status());
    if p.jail {
        let root = run.jail_root();
        std::fs::create_dir_all(&root).map_err(|e| Error::io("creating jail root", &root, e))?;
        // The VMM's user removes its sockets and writes its exit status there.
        let (uid, gid) = p.vmm_ids_for(run);
        std::os::unix::fs::chown(&run.0, Some(uid), Some(gid))
            .map_err(|e| Error::io("handing the run folder to the VMM's user", &run.0, e))?;
        c.arg("--jail").arg(root);
        c.arg("--uid").arg(uid.to_string());
        c.arg("--gid").arg(gid.to_string());
    }
    Ok(())
}

/// Writes a file only its owner can read (a domain's config names its disks and seeds).
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io("writing VM config", path, e))?;
    f.write_all(bytes)
        .map_err(|e| Error::io("writing VM config", path, e))
}

/// Starts a domain's VMM. Returns the child (for the daemon that started it to reap) and
/// its identity, written to the run folder's pidfile.
pub fn start(
    p: &Programs,
    def: &DomainDef,
    run: &RunDir,
    serial_log: &Path,
    fresh_log: bool,
) -> Result<(Child, ProcId)> {
    start_or_restore(p, def, run, serial_log, fresh_log, Boot::Fresh)
}

/// How a domain's VMM starts.
#[derive(Clone, Copy, Debug)]
pub enum Boot<'a> {
    /// Boots the guest.
    Fresh,
    /// Restores the snapshot in that folder (a Vessel domain only).
    Restore(&'a Path),
    /// Waits for the domain migrating in from another daemon at [`RunDir::incoming`] (a
    /// Vessel domain only).
    Incoming,
}

/// [`start`], or (a Vessel domain only) a VMM that restores a snapshot or waits for a
/// migrating domain.
pub fn start_or_restore(
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
    let mut cmd = match (def.driver, boot) {
        (DriverKind::Qemu, Boot::Fresh) => qemu_command(p, def, run, serial_log)?,
        (DriverKind::Qemu, Boot::Restore(dir)) => {
            let mut c = qemu_command(p, def, run, serial_log)?;
            let state = dir.join(crate::manager::QEMU_STATE);
            c.arg("-incoming").arg(format!(
                "exec:cat {}",
                crate::manager::shell_quoted(&state)?
            ));
            c
        }
        (DriverKind::Qemu, Boot::Incoming) => {
            return Err(Error::Unsupported(
                "migrating a domain is not implemented for the QEMU driver yet".into(),
            ))
        }
        (DriverKind::Vessel, Boot::Fresh) => vessel_command(p, def, run, serial_log)?,
        (DriverKind::Vessel, Boot::Restore(dir)) => {
            vessel_restore_command(p, dir, run, serial_log)?
        }
        (DriverKind::Vessel, Boot::Incoming) => vessel_incoming_command(p, def, run, serial_log)?,
    };
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

/// Waits for the VMM's control socket to answer, or for the guest to end already; a VMM
/// that fails to start is an error carrying the last lines of its log.
pub fn wait_ready(def: &DomainDef, run: &RunDir, child: &mut Child) -> Result<()> {
    wait_ready_for(def, run, child, false)
}

/// [`wait_ready`] for a VMM started with [`Boot::Incoming`]: until it listens for the
/// domain (its control socket comes once the domain has arrived).
pub fn wait_incoming(def: &DomainDef, run: &RunDir, child: &mut Child) -> Result<()> {
    wait_ready_for(def, run, child, true)
}

fn wait_ready_for(def: &DomainDef, run: &RunDir, child: &mut Child, incoming: bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
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
        let ready = match def.driver {
            DriverKind::Qemu => Qmp::connect(&run.qmp(), Duration::from_secs(2)).is_ok(),
            // A probe connection would be taken for the source: the socket's file it is.
            DriverKind::Vessel if incoming => run.incoming().exists(),
            DriverKind::Vessel => std::os::unix::net::UnixStream::connect(run.api()).is_ok(),
        };
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Spawn {
                what: format!("domain {}", def.name),
                why: "its control socket did not appear within 10 s".into(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs one QMP command on a domain's monitor.
pub fn qmp(run: &RunDir, command: &str) -> Result<serde_json::Value> {
    let mut q = Qmp::connect(&run.qmp(), Duration::from_secs(5))?;
    Ok(q.execute(command, None)?)
}

/// QEMU's run state through QMP (`running`, `paused`, …).
pub fn qmp_status(run: &RunDir) -> Result<String> {
    let mut q = Qmp::connect(&run.qmp(), Duration::from_secs(5))?;
    Ok(q.status()?)
}

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

/// A Vessel VMM's run state from its API (`Running`, `Paused`, …).
pub fn vmm_state(run: &RunDir) -> Result<String> {
    let r = vmm::api::http::client_request(&run.api(), "GET", "/vessel/status", None)
        .map_err(|e| Error::Conflict(format!("the VMM's control API: {e}")))?;
    serde_json::from_slice::<serde_json::Value>(&r.body)
        .ok()
        .and_then(|v| v.get("state").and_then(|s| s.as_str()).map(str::to_string))
        .ok_or_else(|| Error::Conflict(format!("the VMM's status: status {}", r.status)))
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

    fn args(c: &Command) -> Vec<String> {
        c.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// Issue 22: QEMU never probes a disk, and a TAP name cannot add -netdev options,
    /// even for a definition stored before those were checked at define time.
    #[test]
    fn qemu_gets_explicit_formats_and_checked_tap_names() {
        let dir = std::env::temp_dir().join(format!("vessel-qargs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let raw = dir.join("d.raw");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        let qcow = dir.join("d.qcow2");
        block::create(&qcow, block::Format::Qcow2, Some(1 << 20), None).unwrap();
        let p = Programs {
            vessel: "vessel".into(),
            qemu: "qemu-system-x86_64".into(),
            jail: true,
            vmm_ids: DEFAULT_VMM_IDS,
            vmm_uid_range: None,
        };
        let run = RunDir(dir.join("run"));
        let log = dir.join("serial.log");
        let mut def: DomainDef = serde_json::from_value(serde_json::json!({
            "name": "q", "driver": "qemu",
            "vm": {"kernel": "/k", "disks": [{"path": raw}]}}))
        .unwrap();
        let a = args(&qemu_command(&p, &def, &run, &log).unwrap());
        assert!(a.iter().any(|x| x.ends_with(",format=raw")), "{a:?}");
        def.vm.disks[0].path = qcow.clone();
        let e = qemu_command(&p, &def, &run, &log).unwrap_err();
        assert!(e.to_string().contains("qcow2 header"), "{e}");
        def.vm.disks[0].format = Some(DiskFormat::Qcow2);
        let a = args(&qemu_command(&p, &def, &run, &log).unwrap());
        assert!(a.iter().any(|x| x.ends_with(",format=qcow2")), "{a:?}");
        def.vm.nets =
            serde_json::from_value(serde_json::json!([{"tap": "vq0,ifname=vq1"}])).unwrap();
        let e = qemu_command(&p, &def, &run, &log).unwrap_err();
        assert!(e.to_string().contains("TAP name"), "{e}");
        // An interface's MTU is advertised by QEMU's virtio-net too.
        def.vm.nets =
            serde_json::from_value(serde_json::json!([{"tap": "vq0", "mtu": 9000}])).unwrap();
        let a = args(&qemu_command(&p, &def, &run, &log).unwrap());
        assert!(a.iter().any(|x| x.ends_with(",host_mtu=9000")), "{a:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn both_drivers_give_a_domain_its_cloud_init_seed() {
        let dir = std::env::temp_dir().join(format!("vessel-seed-drv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ud = dir.join("user-data");
        std::fs::write(&ud, "#cloud-config\n").unwrap();
        let def: DomainDef = serde_json::from_value(serde_json::json!({
            "name": "web-1",
            "vm": {
                "firmware": "/usr/share/seabios/bios.bin",
                "cloud_init": {"user_data": ud},
            },
        }))
        .unwrap();
        let p = Programs {
            vessel: "vessel".into(),
            qemu: "qemu-system-x86_64".into(),
            jail: true,
            vmm_ids: DEFAULT_VMM_IDS,
            vmm_uid_range: None,
        };
        let run = RunDir(dir.clone());
        let log = dir.join("console.log");
        let args = |c: &Command| -> Vec<String> {
            c.get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        // Vessel builds the seed itself from its config, named after the domain.
        let v = args(&vessel_command(&p, &def, &run, &log).unwrap());
        assert_eq!(v[..3], ["run", "--config", &run.config().to_string_lossy()]);
        let vm: vmm::VmConfig =
            serde_json::from_slice(&std::fs::read(run.config()).unwrap()).unwrap();
        assert_eq!(vm.cloud_init, def.vm.cloud_init);
        assert_eq!(vm.name.as_deref(), Some("web-1"));
        // QEMU gets the same seed as a read-only drive in the run folder.
        let q = args(&qemu_command(&p, &def, &run, &log).unwrap());
        let seed = dir.join("cidata.img");
        assert!(
            q.iter()
                .any(|a| a.contains(&format!("file={},", seed.display()))
                    && a.contains("readonly=on"))
        );
        let want =
            vmm::cloud_init::seed_image(def.vm.cloud_init.as_ref().unwrap(), "web-1").unwrap();
        assert_eq!(std::fs::read(&seed).unwrap(), want);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn qemu_gets_uefi_code_and_variables_on_its_two_pflash_drives() {
        let def: DomainDef = serde_json::from_value(serde_json::json!({
            "name": "efi",
            "vm": {
                "firmware": "/usr/share/OVMF/OVMF_CODE_4M.fd",
                "firmware_vars": "/var/lib/vessel/efi_VARS.fd",
            },
        }))
        .unwrap();
        let p = Programs {
            vessel: "vessel".into(),
            qemu: "qemu-system-x86_64".into(),
            jail: true,
            vmm_ids: DEFAULT_VMM_IDS,
            vmm_uid_range: None,
        };
        let dir = std::env::temp_dir().join(format!("vessel-efi-drv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let run = RunDir(dir.clone());
        let q: Vec<String> = qemu_command(&p, &def, &run, &dir.join("console.log"))
            .unwrap()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(!q.iter().any(|a| a == "-bios"), "{q:?}");
        assert!(q.contains(
            &"if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd".into()
        ));
        assert!(q.contains(&"if=pflash,format=raw,unit=1,file=/var/lib/vessel/efi_VARS.fd".into()));
    }

    /// What has no `vessel run` flag of its own reaches the VMM too: the config is passed
    /// as data, with only the serial console redirected.
    #[test]
    fn vessel_gets_the_domain_config_as_data() {
        let dir = std::env::temp_dir().join(format!("vessel-cfg-drv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut def: DomainDef = serde_json::from_value(serde_json::json!({
            "name": "k",
            "vm": {"kernel": "/boot/vmlinuz", "serial": {"type": "null"}},
        }))
        .unwrap();
        def.vm.virtio_transport = vmm::config::Transport::Pci;
        let p = Programs {
            vessel: "vessel".into(),
            qemu: "qemu-system-x86_64".into(),
            jail: true,
            vmm_ids: DEFAULT_VMM_IDS,
            vmm_uid_range: None,
        };
        let run = RunDir(dir.clone());
        let jailed = vessel_command(&p, &def, &run, &dir.join("console.log")).unwrap();
        let jailed: Vec<_> = jailed.get_args().collect();
        let root = run.jail_root();
        assert!(
            jailed
                .windows(2)
                .any(|w| w[0] == "--jail" && w[1] == root.as_os_str()),
            "{jailed:?}"
        );
        assert!(root.is_dir(), "no jail root made");
        for (flag, id) in [("--uid", "65534"), ("--gid", "65534")] {
            assert!(
                jailed.windows(2).any(|w| w[0] == flag && w[1] == id),
                "{jailed:?}"
            );
        }
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&run.0).unwrap().uid(), 65534);
        // A user per VMM: within the range, the same for the same domain, different for
        // these two.
        let per_vm = Programs {
            vmm_uid_range: Some((1_000_000, 65536)),
            ..p.clone()
        };
        let uid_of = |name: &str| {
            let run = RunDir(dir.join(name));
            std::fs::create_dir_all(&run.0).unwrap();
            let c = vessel_command(&per_vm, &def, &run, &dir.join("console.log")).unwrap();
            let args: Vec<_> = c
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            let uid: u32 = args
                .windows(2)
                .find(|w| w[0] == "--uid")
                .map(|w| w[1].parse().unwrap())
                .unwrap();
            assert_eq!(std::fs::metadata(&run.0).unwrap().uid(), uid);
            uid
        };
        let (a, b) = (uid_of("web"), uid_of("db"));
        assert!((1_000_000..1_065_536).contains(&a), "{a}");
        assert_ne!(a, b);
        assert_eq!(uid_of("web"), a);
        let p = Programs { jail: false, ..p };
        let free = vessel_command(&p, &def, &run, &dir.join("console.log")).unwrap();
        assert!(
            !free.get_args().any(|a| a == "--jail"),
            "--no-jail still jails"
        );
        let got: vmm::VmConfig =
            serde_json::from_slice(&std::fs::read(run.config()).unwrap()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(run.config())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut want = def.vm.clone();
        want.serial = vmm::SerialConfig::Stdio;
        assert_eq!(got, want);
        let _ = std::fs::remove_dir_all(&dir);
    }

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
        std::fs::write(&f, "garbage").unwrap();
        assert_eq!(ProcId::read(&f), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
