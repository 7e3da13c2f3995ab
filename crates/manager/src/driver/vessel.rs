//! The Vessel driver: this executable's `vessel run` with the domain's `VmConfig` as data
//! (`--config`), controlled through the VMM's API socket (Firecracker's API plus
//! Vessel's snapshot and migration endpoints).

use std::fs::OpenOptions;
use std::path::Path;
use std::process::Command;

use serde_json::json;

use super::{
    seed_name, vmm_api, vmm_api_json, Boot, Driver, Hotplug, Programs, Reset, RunDir,
    VMM_PARENT_CGROUP,
};
use crate::domain::{DomainDef, DriverKind};
use crate::error::{Error, Result};
use crate::state::End;

/// What a VMM needs besides its guest's memory: the emulator's code arena (64 MiB per
/// vCPU), its block caches and TLBs, device buffers, the page cache of its disks that the
/// group is charged for. A 512 MiB Debian guest's VMM peaked at 754 MiB RSS.
const VMM_OVERHEAD_BYTES: u64 = 512 << 20;
const VMM_OVERHEAD_PER_VCPU_BYTES: u64 = 128 << 20;

/// The limits a jailed Vessel VMM of `def` runs under (`vessel run --cgroup`,
/// `--resource-limit`):
/// - its own cgroup, `<the daemon's group>/vessel/<domain>`, with CPU bandwidth for its
///   vCPUs (a guest cannot take more than that many of the host's CPUs) and memory for
///   its guest plus [`VMM_OVERHEAD_BYTES`] and [`VMM_OVERHEAD_PER_VCPU_BYTES`] each
///   vCPU (a VMM over it is killed, not the host's other processes);
/// - RLIMIT_FSIZE at the largest file it may write: a writable disk at its virtual
///   size (qcow2's metadata on top), a snapshot's memory file, or 1 GiB of console
///   log; a guest writing past that gets I/O errors (a log stops growing) instead of
///   filling the host's disk.
pub(super) fn vessel_limit_args(
    p: &Programs,
    def: &DomainDef,
    vm: &vmm::VmConfig,
    run: &RunDir,
    c: &mut Command,
) {
    use sandbox::cgroup::Version;
    if let Some(version) = p.vmm_cgroups {
        const PERIOD: u64 = 100_000;
        let quota = PERIOD * u64::from(vm.cpus.max(1));
        let memory = (vm.memory_mib << 20)
            + VMM_OVERHEAD_BYTES
            + VMM_OVERHEAD_PER_VCPU_BYTES * u64::from(vm.cpus.max(1));
        let settings = match version {
            Version::V1 => [
                format!("cpu.cfs_period_us={PERIOD}"),
                format!("cpu.cfs_quota_us={quota}"),
                format!("memory.limit_in_bytes={memory}"),
            ],
            Version::V2 => [
                format!("cpu.max={quota} {PERIOD}"),
                format!("memory.max={memory}"),
                // The v2 swap limit: the guest's memory cannot move to swap past it.
                "memory.swap.max=0".to_string(),
            ],
        };
        c.arg("--cgroup-version").arg(version.to_string());
        for s in settings {
            c.arg("--cgroup").arg(s);
        }
        c.arg("--parent-cgroup").arg(VMM_PARENT_CGROUP);
        c.arg("--id").arg(run.cgroup_id());
    }
    c.arg("--resource-limit")
        .arg(format!("no-file={}", sandbox::jail::JAIL_MAX_FILES));
    const LOG_BYTES: u64 = 1 << 30;
    let mut largest = LOG_BYTES.max((vm.memory_mib << 20) + (64 << 20));
    for d in vm.disks.iter().filter(|d| !d.read_only) {
        // Read-only and sharing the image's lock: a migration's source VMM may hold it.
        match d.open_with(true, true) {
            // qcow2 metadata is at most an L2 entry and a refcount per cluster, and its
            // header and tables: an eighth on top, and 64 MiB, bounds it.
            Ok(b) => largest = largest.max(b.size() + b.size() / 8 + (64 << 20)),
            Err(e) => {
                // The VMM's own open will say what is wrong with it.
                tracing::warn!(domain = %def.name, disk = %d.path.display(), "no file size limit: {e}");
                return;
            }
        }
    }
    let fsize = largest.max(sandbox::jail::MIN_FILE_SIZE_LIMIT);
    c.arg("--resource-limit").arg(format!("fsize={fsize}"));
}

/// `vessel run`'s exit status when the guest rebooted.
const REBOOTED: i32 = 10;

#[derive(Debug)]
pub struct VesselDriver;

impl Driver for VesselDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Vessel
    }

    /// The VMM gets the `VmConfig` itself; only what the manager cannot run under its
    /// control API is refused.
    fn check(&self, vm: &vmm::VmConfig) -> Result<()> {
        if vm.arch == vmm::config::Arch::Riscv64 {
            // What Vessel's riscv64 machine lacks, refused at define rather than at start.
            vmm::riscv::check(vm).map_err(|e| {
                Error::invalid(
                    "domain machine config",
                    format!("unsupported configuration: {e}"),
                )
            })?;
        }
        if matches!(vm.virtio_console, Some(vmm::SerialConfig::File(_))) {
            return Err(Error::invalid(
                "domain machine config",
                "unsupported configuration: vm.virtio_console to a file: the manager writes \
                 hvc0 into the domain's run folder (hvc0.log); give {\"type\": \"null\"}",
            ));
        }
        Ok(())
    }

    fn command(
        &self,
        p: &Programs,
        def: &DomainDef,
        run: &RunDir,
        log: &Path,
        boot: Boot<'_>,
    ) -> Result<Command> {
        let mut c = match boot {
            Boot::Fresh { paused } => {
                let mut c = vessel_command(p, def, run, log)?;
                if paused {
                    c.arg("--paused");
                }
                Ok(c)
            }
            Boot::Restore { dir, paused } => {
                let mut c = vessel_restore_command(p, def, dir, run, log)?;
                if paused {
                    // The restored vCPUs find their gate closed before they run.
                    c.arg("--paused");
                }
                Ok(c)
            }
            Boot::Incoming => vessel_incoming_command(p, def, run, log),
        }?;
        if p.jail {
            vessel_limit_args(p, def, &vessel_config(def, run), run, &mut c);
        }
        Ok(c)
    }

    fn ready(&self, run: &RunDir, boot: Boot<'_>) -> bool {
        match boot {
            // A probe connection would be taken for the source: the socket's file it is.
            Boot::Incoming => run.incoming().exists(),
            _ => std::os::unix::net::UnixStream::connect(run.api()).is_ok(),
        }
    }

    fn probe_paused(&self, run: &RunDir) -> bool {
        matches!(vmm_state(run).as_deref(), Ok("Paused"))
    }

    /// A destination VMM runs the VM once it holds it (the two VMMs confirm between
    /// themselves); before, it serves no API or says it is not running.
    fn guest_runs(&self, run: &RunDir) -> bool {
        matches!(vmm_state(run).as_deref(), Ok("Running"))
    }

    /// `SendCtrlAltDel` presses the VMM's ACPI power button.
    fn shutdown(&self, run: &RunDir) -> Result<()> {
        vmm_api(
            run,
            "PUT",
            "/actions",
            &json!({"action_type": "SendCtrlAltDel"}),
        )
    }

    /// The VMM ends as when its guest reboots, and is started again.
    fn reset(&self, run: &RunDir) -> Result<Reset> {
        vmm_api(run, "PUT", "/actions", &json!({"action_type": "Reset"}))?;
        Ok(Reset::Restarts)
    }

    fn pause(&self, run: &RunDir) -> Result<()> {
        vmm_api(run, "PATCH", "/vm", &json!({"state": "Paused"}))
    }

    fn resume(&self, run: &RunDir) -> Result<()> {
        vmm_api(run, "PATCH", "/vm", &json!({"state": "Resumed"}))
    }

    fn ended(&self, status: Option<std::process::ExitStatus>) -> End {
        match status {
            Some(s) if s.success() => End::PoweredOff,
            Some(s) if s.code() == Some(REBOOTED) => End::Rebooted,
            Some(_) => End::Failed,
            None => End::Unknown,
        }
    }

    /// A jailed VMM sees only its own files and run folder: it writes the snapshot
    /// there, and the files move to `dir`.
    fn save_state(&self, run: &RunDir, _def: &DomainDef, dir: &Path) -> Result<()> {
        let (run_state, run_mem) = (run.0.join("save.vmstate"), run.0.join("save.memory"));
        let (state_file, mem_file) = vmm::snapshot::files_in(dir);
        let saved = vmm_api(
            run,
            "PUT",
            "/snapshot/create",
            &json!({
                "snapshot_type": "Full",
                "snapshot_path": run_state,
                "mem_file_path": run_mem,
            }),
        )
        .and_then(|()| crate::manager::move_file(&run_state, &state_file))
        .and_then(|()| crate::manager::move_file(&run_mem, &mem_file));
        if saved.is_err() {
            let _ = std::fs::remove_file(&run_state);
            let _ = std::fs::remove_file(&run_mem);
        }
        saved
    }

    fn has_state(&self, dir: &Path) -> bool {
        vmm::snapshot::files_in(dir).0.is_file()
    }

    fn check_state(
        &self,
        dir: &Path,
        _stored: &DomainDef,
        runtime: &DomainDef,
        run: &RunDir,
    ) -> Result<()> {
        let (state, mem) = vmm::snapshot::files_in(dir);
        let loaded = vmm::snapshot::load(&state, &mem)
            .map_err(|e| Error::invalid("saved domain", e.to_string()))?;
        let mut saved = loaded.snapshot.config;
        let mut now = vessel_config(runtime, run);
        saved.serial = vmm::SerialConfig::Stdio;
        now.serial = vmm::SerialConfig::Stdio;
        if saved.as_defined() != now.as_defined() {
            return Err(Error::Conflict(format!(
                "the VM saved in {} is not the one domain {:?} now defines (it was redefined \
                 since it was saved)",
                dir.display(),
                runtime.name
            )));
        }
        Ok(())
    }

    /// A jailed VMM becomes an unprivileged user once its VM is built.
    fn vmm_user(&self, p: &Programs, run: &RunDir) -> Option<(u32, u32)> {
        p.jail.then(|| p.vmm_ids_for(run))
    }

    fn takes_over_taps(&self) -> bool {
        // The source VMM hands its TAP queues over with the VM (`vmm::migration::fds`).
        true
    }

    fn migrate(&self, run: &RunDir, to: &Path) -> Result<serde_json::Value> {
        vmm_api_json(
            run,
            "PUT",
            "/migration/send",
            &json!({ "destination_url": format!("unix:{}", to.display()) }),
        )
    }

    fn hotplug(&self, _run: &RunDir, live: &DomainDef, change: Hotplug<'_>) -> Result<()> {
        self.can_hotplug(live, change)
    }

    fn set_balloon(&self, run: &RunDir, amount_mib: u32, _memory_mib: u64) -> Result<()> {
        let body = serde_json::json!({ "amount_mib": amount_mib }).to_string();
        vmm_ok(
            "PATCH /balloon",
            vmm_call(run, "PATCH", "/balloon", Some(&body))?,
        )
        .map(drop)
    }

    fn memory_stats(&self, run: &RunDir, memory_mib: u64) -> Result<Vec<(String, u64)>> {
        let (status, stats) = vmm_call(run, "GET", "/balloon/statistics", None)?;
        let mut out = Vec::new();
        if status < 300 {
            let actual = stats["actual_pages"].as_u64().unwrap_or(0) * 4;
            out.push((
                "actual".to_string(),
                (memory_mib << 10).saturating_sub(actual),
            ));
            for ((name, bytes), fc) in super::MEMSTAT_NAMES
                .iter()
                .zip(vmm::runtime::BALLOON_STAT_NAMES)
            {
                if let Some(v) = stats[fc].as_u64() {
                    out.push((name.to_string(), if *bytes { v >> 10 } else { v }));
                }
            }
        } else {
            // No statistics polled: the balloon's target is all there is to say.
            let b = vmm_ok("GET /balloon", vmm_call(run, "GET", "/balloon", None)?)?;
            let target = b["amount_mib"].as_u64().unwrap_or(0);
            out.push((
                "actual".to_string(),
                memory_mib.saturating_sub(target) << 10,
            ));
        }
        if let Some(rss) = super::vmm_rss_kib(run) {
            out.push(("rss".to_string(), rss));
        }
        Ok(out)
    }

    fn can_hotplug(&self, _live: &DomainDef, change: Hotplug<'_>) -> Result<()> {
        // Linux finds virtio-mmio devices once, at boot (the DSDT or the command line),
        // and Vessel's PCI root has no hot-plug controller.
        Err(Error::Unsupported(format!(
            "Operation not supported: the Vessel driver cannot {} a running domain: its \
             virtio devices (virtio-mmio, or virtio-pci on a root bus without hot-plug) \
             are found by the guest only at boot; use --config to change the definition, \
             which applies from the next start",
            change.what()
        )))
    }
}

/// A Vessel VMM's run state from its API (`Running`, `Paused`, …).
/// One request to the domain's VMM API: its status and JSON body.
fn vmm_call(
    run: &RunDir,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, serde_json::Value)> {
    let r = vmm::api::http::client_request(
        &run.api(),
        method,
        path,
        body.map(|b| ("application/json", b.as_bytes())),
    )
    .map_err(|e| Error::Conflict(format!("the VMM's control API, {method} {path}: {e}")))?;
    Ok((
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null),
    ))
}

/// The VMM's answer as an error when it refused.
fn vmm_ok(what: &str, (status, v): (u16, serde_json::Value)) -> Result<serde_json::Value> {
    if status >= 300 {
        return Err(Error::Conflict(format!(
            "{what}: {}",
            v["fault_message"].as_str().unwrap_or("refused")
        )));
    }
    Ok(v)
}

fn vmm_state(run: &RunDir) -> Result<String> {
    let r = vmm::api::http::client_request(&run.api(), "GET", "/vessel/status", None)
        .map_err(|e| Error::Conflict(format!("the VMM's control API: {e}")))?;
    serde_json::from_slice::<serde_json::Value>(&r.body)
        .ok()
        .and_then(|v| v.get("state").and_then(|s| s.as_str()).map(str::to_string))
        .ok_or_else(|| Error::Conflict(format!("the VMM's status: status {}", r.status)))
}

/// Vessel gets the domain's `VmConfig` itself, as a file in the run folder (never
/// re-derived as flags, which would drop what has no flag), with the serial console on
/// the console socket and, for cloud-init, the domain's name.
pub(super) fn vessel_command(
    p: &Programs,
    def: &DomainDef,
    run: &RunDir,
    log: &Path,
) -> Result<Command> {
    write_vessel_config(def, run)?;
    let mut c = Command::new(&p.vessel);
    c.arg("run").arg("--config").arg(run.config());
    vessel_control_args(p, &mut c, run, log)?;
    Ok(c)
}

/// Writes [`vessel_config`] to the run folder's config file, which `--config` names.
fn write_vessel_config(def: &DomainDef, run: &RunDir) -> Result<()> {
    let json = serde_json::to_vec_pretty(&vessel_config(def, run))
        .map_err(|e| Error::invalid("domain", format!("{}: {e}", def.name)))?;
    write_private(&run.config(), &json)
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
/// booting, controlled as one that boots; checked against the configuration `def` gives,
/// whose disks name the files the manager checked, handed over open.
fn vessel_restore_command(
    p: &Programs,
    def: &DomainDef,
    dir: &Path,
    run: &RunDir,
    log: &Path,
) -> Result<Command> {
    write_vessel_config(def, run)?;
    let mut c = Command::new(&p.vessel);
    c.arg("run")
        .arg("--restore")
        .arg(dir)
        .arg("--config")
        .arg(run.config());
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
    write_vessel_config(def, run)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::DEFAULT_VMM_IDS;

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
        let p = Programs::by_name(true);
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
            vmm_cgroups: None,
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

    /// Issue 16: whatever the Vessel driver accepts reaches the VMM as given: the
    /// `VmConfig` it writes differs from the definition only where the manager routes
    /// things (serial and hvc0 into the run folder, an unnamed vsock socket there, the
    /// domain's UUID and name where the VM has none); what it would have to replace is
    /// refused by name.
    #[test]
    fn vessel_runs_every_field_it_accepts_as_given() {
        let dir = std::env::temp_dir().join(format!("vessel-vmap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bucket = serde_json::json!({"size": 1, "refill_time": 100});
        let limiter = serde_json::json!({"ops": bucket});
        let def: DomainDef = serde_json::from_value(serde_json::json!({
            "name": "full", "uuid": "11111111-2222-4333-8444-555555555555",
            "vm": {
                "kernel": "/k", "initrd": "/i", "cmdline": "console=ttyS0 x=1",
                "option_roms": ["/rom"],
                "memory_mib": 768, "cpus": 4, "threads_per_core": 2,
                "cpu_model": "x86-64-v2", "accel": "hybrid",
                "cpuid_modifiers": [{"leaf": 1, "subleaf": 0, "register": 2, "set": 0, "clear": 1}],
                "serial_rate_limiter": bucket,
                "disks": [{"path": "/d.qcow2", "format": "qcow2", "read_only": true,
                           "transport": "pci", "rate_limiter": limiter}],
                "rng": true, "rng_rate_limiter": limiter,
                "virtio_console": {"type": "null"},
                "nets": [{"tap": "vt0", "mac": "52:54:00:00:00:07", "mtu": 1400,
                          "transport": "mmio", "rx_rate_limiter": limiter}],
                "vsock": {"guest_cid": 9, "uds_path": ""},
                "virtio_transport": "pci",
            }
        }))
        .unwrap();
        VesselDriver.check(&def.vm).unwrap();
        let run = RunDir(dir.clone());
        let got = vessel_config(&def, &run);
        let mut want = def.vm.clone();
        want.serial = vmm::SerialConfig::Stdio;
        want.virtio_console = Some(vmm::SerialConfig::File(dir.join("hvc0.log")));
        want.vsock.as_mut().unwrap().uds_path = dir.join("vsock.sock");
        want.uuid = def.uuid.clone();
        assert_eq!(got, want);
        // Through the file `vessel run --config` reads, unchanged.
        let p = Programs::by_name(false);
        vessel_command(&p, &def, &run, &dir.join("log")).unwrap();
        let read: vmm::VmConfig =
            serde_json::from_slice(&std::fs::read(run.config()).unwrap()).unwrap();
        assert_eq!(read, want);
        let _ = std::fs::remove_dir_all(&dir);

        // A riscv64 VM is the Vessel driver's; what its machine lacks is refused.
        let rv: vmm::VmConfig =
            serde_json::from_value(serde_json::json!({"kernel": "/k", "arch": "riscv64"})).unwrap();
        VesselDriver.check(&rv).unwrap();
        for (field, value, named) in [
            ("cpus", serde_json::json!(9), "1 to 8 harts"),
            ("cpus", serde_json::json!(2), ""),
            ("rng", serde_json::json!(true), ""),
        ] {
            let mut vm = serde_json::json!({"kernel": "/k", "arch": "riscv64"});
            vm[field] = value;
            let vm: vmm::VmConfig = serde_json::from_value(vm).unwrap();
            match VesselDriver.check(&vm) {
                Err(e) if !named.is_empty() => {
                    let e = e.to_string();
                    assert!(
                        e.contains("unsupported configuration") && e.contains(named),
                        "{e}"
                    );
                }
                Ok(()) if named.is_empty() => {}
                other => panic!("{field}: {other:?}"),
            }
        }
        let mut vm = serde_json::json!({"kernel": "/k"});
        vm["virtio_console"] = serde_json::json!({"type": "file", "path": "/tmp/hvc"});
        let vm: vmm::VmConfig = serde_json::from_value(vm).unwrap();
        let e = VesselDriver.check(&vm).unwrap_err().to_string();
        assert!(
            e.contains("unsupported configuration") && e.contains("vm.virtio_console"),
            "{e}"
        );
    }
    /// Issue 22: a jailed Vessel VMM gets its own cgroup with CPU for its vCPUs and
    /// memory for its guest and itself, in the host's cgroup version's terms, and a file
    /// size limit that leaves room for its largest disk.
    #[test]
    fn jailed_vmms_get_cgroup_and_file_size_limits() {
        let dir = std::env::temp_dir().join(format!("vm-limits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("d.raw");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(3 << 30)
            .unwrap();
        let def: DomainDef = serde_json::from_value(serde_json::json!({
            "name": "lim",
            "vm": {"kernel": "/boot/vmlinuz", "cpus": 2, "memory_mib": 512,
                   "disks": [{"path": disk, "format": "raw"}]},
        }))
        .unwrap();
        let args = |version, jail| {
            let p = Programs {
                vessel: "vessel".into(),
                qemu: "qemu-system-x86_64".into(),
                jail,
                vmm_ids: DEFAULT_VMM_IDS,
                vmm_uid_range: None,
                vmm_cgroups: version,
            };
            let mut c = Command::new("vessel");
            if jail {
                vessel_limit_args(
                    &p,
                    &def,
                    &def.vm,
                    &RunDir("/var/lib/vessel/run/lim".into()),
                    &mut c,
                );
            }
            c.get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        use sandbox::cgroup::Version;
        let memory = (512u64 + 512 + 2 * 128) << 20;
        let v1 = args(Some(Version::V1), true);
        for want in [
            "--cgroup-version 1".to_string(),
            "--cgroup cpu.cfs_quota_us=200000".into(),
            format!("--cgroup memory.limit_in_bytes={memory}"),
            format!(
                "--parent-cgroup vessel --id {}",
                RunDir("/var/lib/vessel/run/lim".into()).cgroup_id()
            ),
            format!(
                "--resource-limit fsize={}",
                (3u64 << 30) + (3 << 27) + (64 << 20)
            ),
            "--resource-limit no-file=4096".into(),
        ] {
            assert!(v1.contains(&want), "{want} not in {v1}");
        }
        let v2 = args(Some(Version::V2), true);
        for want in [
            "--cgroup-version 2".to_string(),
            "--cgroup cpu.max=200000 100000".into(),
            format!("--cgroup memory.max={memory}"),
        ] {
            assert!(v2.contains(&want), "{want} not in {v2}");
        }
        // No controllers on the host: rlimits only.
        let none = args(None, true);
        assert!(
            !none.contains("--cgroup") && none.contains("fsize="),
            "{none}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
