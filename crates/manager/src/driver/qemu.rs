//! The QEMU driver: `qemu-system-x86_64` on q35, controlled over QMP. Its saves, named
//! snapshots and migrations are QEMU's migration stream: to a file with `migrate
//! "exec:cat > FILE"` (QEMU 7.2 has no `file:` URI) and back with `-incoming "exec:cat
//! FILE"`, or to the destination's `-incoming unix:` socket. A save folder also keeps
//! the definition's machine, so a domain redefined since refuses it.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use vmm::config::{DiskFormat, Transport};
use vmm::{Accel, VmConfig};

use super::{seed_name, Boot, Driver, Hotplug, Programs, Reset, RunDir};
use crate::domain::{DomainDef, DriverKind};
use crate::error::{Error, Result};
use crate::qmp::Qmp;
use crate::state::End;

/// QEMU's migration stream in a save folder.
pub(crate) const QEMU_STATE: &str = "qemu.state";
/// The domain's machine (`vm`) as saved, in a save folder.
const DEFINITION: &str = "definition.json";
/// How long a save, a load or a migration may take.
const LIMIT: Duration = Duration::from_secs(120);
/// The QOM id of a domain's virtio-balloon-pci (`/machine/peripheral/balloon0`).
const QEMU_BALLOON: &str = "balloon0";

#[derive(Debug)]
pub struct QemuDriver;

impl Driver for QemuDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Qemu
    }

    fn check(&self, vm: &VmConfig) -> Result<()> {
        match cannot_honour(vm) {
            Some(field) => Err(Error::invalid(
                "domain machine config",
                format!("unsupported configuration: the QEMU driver cannot honour {field}"),
            )),
            None => Ok(()),
        }
    }

    fn command(
        &self,
        p: &Programs,
        def: &DomainDef,
        run: &RunDir,
        log: &Path,
        boot: Boot<'_>,
    ) -> Result<Command> {
        let mut c = qemu_command(p, def, run, log)?;
        match boot {
            Boot::Fresh { paused: false } => {}
            // QEMU's own: the CPUs stay stopped until `cont`.
            Boot::Fresh { paused: true } => {
                c.arg("-S");
            }
            Boot::Restore { dir, paused } => {
                let state = shell_quoted(&dir.join(QEMU_STATE))?;
                c.arg("-incoming").arg(format!("exec:cat {state}"));
                if paused {
                    // No autostart once the state is in: the CPUs wait for `cont`.
                    c.arg("-S");
                }
            }
            Boot::Incoming => {
                c.arg("-incoming")
                    .arg(format!("unix:{}", chardev_path(&run.incoming())?));
                // Stopped once the stream is in, until the source's daemon asks it to run
                // the domain ([`Driver::finish_incoming`]): the source stays the one that
                // runs it until then.
                c.arg("-S");
            }
        }
        Ok(c)
    }

    fn ready(&self, run: &RunDir, boot: Boot<'_>) -> bool {
        let monitor = Qmp::connect(&run.qmp(), Duration::from_secs(2)).is_ok();
        match boot {
            // QEMU answers QMP before it listens for the incoming stream.
            Boot::Incoming => monitor && run.incoming().exists(),
            _ => monitor,
        }
    }

    fn after_ready(&self, run: &RunDir, boot: Boot<'_>) -> Result<()> {
        match boot {
            // QEMU loads the saved state and waits, stopped as it was saved.
            Boot::Restore { paused, .. } => continue_after_load(run, !paused),
            // Its disks stay the source's until it runs (`cont`), not from the end of the
            // stream: a source that runs on after a failed finish has them alone.
            Boot::Incoming => {
                let mut q = Qmp::connect(&run.qmp(), Duration::from_secs(5))?;
                q.execute(
                    "migrate-set-capabilities",
                    Some(json!({"capabilities": [
                        {"capability": "late-block-activate", "state": true}
                    ]})),
                )?;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn probe_paused(&self, run: &RunDir) -> bool {
        // "prelaunch": started with -S (`start --paused`) and not resumed yet.
        matches!(qmp_status(run).as_deref(), Ok("paused" | "prelaunch"))
    }

    fn shutdown(&self, run: &RunDir) -> Result<()> {
        qmp(run, "system_powerdown").map(drop)
    }

    fn reset(&self, run: &RunDir) -> Result<Reset> {
        qmp(run, "system_reset").map(|_| Reset::InPlace)
    }

    fn pause(&self, run: &RunDir) -> Result<()> {
        qmp(run, "stop").map(drop)
    }

    fn resume(&self, run: &RunDir) -> Result<()> {
        qmp(run, "cont").map(drop)
    }

    fn ended(&self, status: Option<std::process::ExitStatus>) -> End {
        match status {
            Some(s) if s.success() => End::PoweredOff,
            Some(_) => End::Failed,
            None => End::Unknown,
        }
    }

    fn save_state(&self, run: &RunDir, def: &DomainDef, dir: &Path) -> Result<()> {
        let stream = run.0.join("save.qemu-state");
        let quoted = shell_quoted(&stream)?;
        let mut q = Qmp::connect(&run.qmp(), Duration::from_secs(5))?;
        q.execute("stop", None)?;
        let saved = (|| -> Result<()> {
            send(&mut q, &format!("exec:cat > {quoted}"))?;
            let vm = serde_json::to_vec_pretty(&def.vm)
                .map_err(|e| Error::invalid("domain", e.to_string()))?;
            std::fs::write(dir.join(DEFINITION), vm).map_err(|e| Error::io("writing", dir, e))?;
            crate::manager::move_file(&stream, &dir.join(QEMU_STATE))
        })();
        if saved.is_err() {
            let _ = std::fs::remove_file(&stream);
        }
        saved
    }

    fn has_state(&self, dir: &Path) -> bool {
        dir.join(QEMU_STATE).is_file()
    }

    fn check_state(
        &self,
        dir: &Path,
        stored: &DomainDef,
        _runtime: &DomainDef,
        _run: &RunDir,
    ) -> Result<()> {
        let saved: VmConfig = std::fs::read(dir.join(DEFINITION))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| {
                Error::invalid(
                    "saved domain",
                    format!("{} holds no QEMU save", dir.display()),
                )
            })?;
        if saved.as_defined() != stored.vm.as_defined() {
            return Err(Error::Conflict(format!(
                "the VM saved in {} is not the one domain {:?} now defines (it was redefined \
                 since it was saved)",
                dir.display(),
                stored.name
            )));
        }
        Ok(())
    }

    fn migrate(&self, run: &RunDir, to: &Path) -> Result<serde_json::Value> {
        let mut q = Qmp::connect(&run.qmp(), Duration::from_secs(5))?;
        let m = send(&mut q, &format!("unix:{}", chardev_path(to)?))?;
        // The source QEMU stays, stopped ("postmigrate"), until the destination runs the
        // domain: [`Driver::confirm_migration`].
        Ok(report(&m))
    }

    fn set_balloon(&self, run: &RunDir, amount_mib: u32, memory_mib: u64) -> Result<()> {
        // QEMU's `balloon` takes what the guest is to keep, in bytes.
        let keep = memory_mib.saturating_sub(amount_mib.into()) << 20;
        let mut q = Qmp::connect(&run.qmp(), Duration::from_secs(5))?;
        q.execute("balloon", Some(serde_json::json!({ "value": keep })))?;
        Ok(())
    }

    fn memory_stats(&self, run: &RunDir, _memory_mib: u64) -> Result<Vec<(String, u64)>> {
        let mut q = Qmp::connect(&run.qmp(), Duration::from_secs(5))?;
        let actual = q.execute("query-balloon", None)?;
        let mut out = vec![(
            "actual".to_string(),
            actual["actual"].as_u64().unwrap_or(0) >> 10,
        )];
        let path = format!("/machine/peripheral/{QEMU_BALLOON}");
        let g = q.execute(
            "qom-get",
            Some(serde_json::json!({"path": path, "property": "guest-stats"})),
        )?;
        for ((name, bytes), qemu) in super::MEMSTAT_NAMES.iter().zip(QEMU_STATS) {
            // QEMU says -1 for a statistic the guest never sent.
            if let Some(v) = g["stats"][qemu].as_u64() {
                out.push((name.to_string(), if *bytes { v >> 10 } else { v }));
            }
        }
        if let Some(t) = g["last-update"].as_u64().filter(|t| *t > 0) {
            out.push(("last_update".to_string(), t));
        }
        if let Some(rss) = super::vmm_rss_kib(run) {
            out.push(("rss".to_string(), rss));
        }
        Ok(out)
    }

    fn confirm_migration(&self, run: &RunDir, finish: &dyn Fn() -> Result<()>) -> Result<()> {
        match finish() {
            Ok(()) => {
                // The domain runs there: this QEMU has no more use.
                let _ = qmp(run, "quit");
                Ok(())
            }
            Err(e) => {
                // `cont` after a completed migration takes the disks back (QEMU
                // reactivates its block devices) and runs the guest from where it stopped.
                tracing::warn!(error = %e, "the destination did not run the domain: it runs on here");
                match qmp(run, "cont") {
                    Ok(_) => Err(Error::Conflict(format!("{e}; the domain runs on here"))),
                    Err(again) => Err(Error::Conflict(format!(
                        "{e}; and the source QEMU could not run the domain again: {again}"
                    ))),
                }
            }
        }
    }

    fn guest_runs(&self, run: &RunDir) -> bool {
        matches!(qmp_status(run).as_deref(), Ok("running"))
    }

    fn finish_incoming(&self, run: &RunDir) -> Result<()> {
        let t0 = Instant::now();
        loop {
            let st = qmp_status(run)
                .map_err(|e| Error::Conflict(format!("the destination QEMU (its monitor: {e})")))?;
            match st.as_str() {
                // Still loading the stream.
                "inmigrate" if t0.elapsed() < LIMIT => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                "paused" | "postmigrate" | "prelaunch" => break,
                "running" => return Ok(()),
                _ => {
                    return Err(Error::Conflict(format!(
                        "the destination QEMU did not load the stream (status {st})"
                    )))
                }
            }
        }
        qmp(run, "cont")?;
        match qmp_status(run)?.as_str() {
            "running" => Ok(()),
            st => Err(Error::Conflict(format!(
                "the destination QEMU does not run the domain (status {st})"
            ))),
        }
    }

    fn can_hotplug(&self, live: &DomainDef, change: Hotplug<'_>) -> Result<()> {
        if live.vm.virtio_transport != Transport::Pci {
            return Err(Error::Unsupported(format!(
                "Operation not supported: cannot {} a running domain whose virtio devices \
                 are virtio-mmio: use --config",
                change.what()
            )));
        }
        Ok(())
    }

    fn hotplug(&self, run: &RunDir, live: &DomainDef, change: Hotplug<'_>) -> Result<()> {
        self.can_hotplug(live, change)?;
        let mut q = Qmp::connect(&run.qmp(), Duration::from_secs(5))?;
        match change {
            Hotplug::AttachDisk(d) => {
                let id = disk_id(&d.path);
                let node = format!("node-{id}");
                let port = free_port(&mut q)?;
                let mut sets = Vec::new();
                let added = blockdev_of(&mut q, d, &mut sets).and_then(|mut dev| {
                    dev["node-name"] = json!(node);
                    Ok(q.execute("blockdev-add", Some(dev))?)
                });
                // QEMU opened its own files (`/proc/self/fd/N`): the copies go.
                for set in sets {
                    let _ = q.execute("remove-fd", Some(json!({ "fdset-id": set })));
                }
                added?;
                let dev = json!({"driver": "virtio-blk-pci", "id": id, "drive": node,
                                 "bus": port});
                if let Err(e) = q.execute("device_add", Some(dev)) {
                    let _ = q.execute("blockdev-del", Some(json!({ "node-name": node })));
                    return Err(e.into());
                }
            }
            Hotplug::DetachDisk(d) => {
                let id = disk_id(&d.path);
                unplug(&mut q, &id, "the disk")?;
                q.execute(
                    "blockdev-del",
                    Some(json!({ "node-name": format!("node-{id}") })),
                )?;
            }
            Hotplug::AttachNet(n) => {
                crate::domain::check_tap_name(&n.tap)?;
                let id = net_id(n);
                let netdev = format!("nd-{}", n.tap);
                let port = free_port(&mut q)?;
                q.execute(
                    "netdev_add",
                    Some(json!({"type": "tap", "id": netdev, "ifname": n.tap,
                                "script": "no", "downscript": "no"})),
                )?;
                let mut dev = json!({"driver": "virtio-net-pci", "id": id, "netdev": netdev,
                                     "bus": port, "romfile": ""});
                if let Some(m) = &n.mac {
                    dev["mac"] = json!(m);
                }
                if let Some(mtu) = n.mtu {
                    dev["host_mtu"] = json!(mtu);
                }
                if let Err(e) = q.execute("device_add", Some(dev)) {
                    let _ = q.execute("netdev_del", Some(json!({ "id": netdev })));
                    return Err(e.into());
                }
            }
            Hotplug::DetachNet(n) => {
                unplug(&mut q, &net_id(n), "the interface")?;
                q.execute("netdev_del", Some(json!({ "id": format!("nd-{}", n.tap) })))?;
            }
        }
        Ok(())
    }
}

/// Spare PCIe root ports a q35 domain starts with, for devices attached while it runs
/// (q35's root bus has no hot-plug; libvirt gives such domains spare ports too).
pub(crate) const HOTPLUG_PORTS: usize = 4;

/// How long a guest may take to release a device it is asked to unplug (the guest's
/// ACPI or PCIe hot-plug driver acknowledges it; a TCG guest is slow).
const UNPLUG_LIMIT: Duration = Duration::from_secs(60);

/// The QEMU id of a hot-plugged disk: one per image file (a file is attached once).
fn disk_id(path: &Path) -> String {
    let h = path
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    format!("hd-{h:016x}")
}

/// The QEMU id of a hot-plugged interface: its TAP's name (one per interface).
fn net_id(n: &vmm::config::NetConfig) -> String {
    format!("hn-{}", n.tap)
}

/// The root ports QEMU reports (`query-pci`), each with the ids of the devices behind it.
fn hotplug_ports(q: &mut Qmp) -> Result<Vec<(String, Vec<String>)>> {
    let buses = q.execute("query-pci", None)?;
    let mut ports = Vec::new();
    for bus in buses.as_array().into_iter().flatten() {
        for dev in bus["devices"].as_array().into_iter().flatten() {
            let Some(id) = dev["qdev_id"].as_str().filter(|i| i.starts_with("hp")) else {
                continue;
            };
            let behind = dev["pci_bridge"]["devices"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|d| d["qdev_id"].as_str().map(str::to_string))
                .collect();
            ports.push((id.to_string(), behind));
        }
    }
    Ok(ports)
}

/// A root port with nothing behind it.
fn free_port(q: &mut Qmp) -> Result<String> {
    hotplug_ports(q)?
        .into_iter()
        .find(|(_, behind)| behind.is_empty())
        .map(|(port, _)| port)
        .ok_or_else(|| {
            Error::Conflict(format!(
                "all {HOTPLUG_PORTS} hot-plug slots of this domain are in use: detach a device \
                 first, or use --config (it applies from the next start)"
            ))
        })
}

/// Asks the guest to release device `id` and waits until QEMU reports it gone.
fn unplug(q: &mut Qmp, id: &str, what: &str) -> Result<()> {
    if !hotplug_ports(q)?
        .iter()
        .any(|(_, b)| b.iter().any(|d| d == id))
    {
        return Err(Error::Unsupported(format!(
            "Operation not supported: {what} was there when the domain started, on q35's root \
             bus, which has no hot-unplug; use --config (it goes at the next start)"
        )));
    }
    q.execute("device_del", Some(json!({ "id": id })))?;
    match q.wait_event("DEVICE_DELETED", |d| d["device"] == id, UNPLUG_LIMIT)? {
        Some(_) => Ok(()),
        None => Err(Error::Conflict(format!(
            "the guest did not release {what} within {UNPLUG_LIMIT:?} (its OS must acknowledge \
             the unplug); it is still attached"
        ))),
    }
}

/// A disk's format for QEMU: always given (QEMU would probe; see docs/SECURITY.md). A
/// definition from before formats were fixed at define time gets what the Vessel VMM
/// does: raw, or a refusal for a file that looks like qcow2 (never the guest's guess).
/// `blockdev-add`'s arguments for a disk attached live (without its node name): its path,
/// or (issue 22) the files the manager opened and checked, each passed to QEMU
/// (`add-fd`, the fd sets it made pushed on `sets`) and opened there as
/// `/proc/self/fd/N` ([`blockdev`]).
fn blockdev_of(
    q: &mut Qmp,
    d: &vmm::config::DiskConfig,
    sets: &mut Vec<i64>,
) -> Result<serde_json::Value> {
    let mut names = Vec::new();
    for f in &d.fds {
        // SAFETY: the manager holds the file `f.fd` names open until the hot-plug ends
        // (`Manager::attach_live`).
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(f.fd) };
        let (set, theirs) = q.add_fd(fd)?;
        sets.push(set);
        names.push(format!("/proc/self/fd/{theirs}"));
    }
    blockdev(d, &names)
}

/// A disk as a tree of QEMU block nodes (`-blockdev` at start, `blockdev-add` live),
/// `names` being how QEMU reaches each file the manager handed over (`DiskConfig::fds`:
/// `/proc/self/fd/N`, the open file itself, whatever its name leads to now). Each format
/// node sits on a `file` node; each backing file is the node above's `backing`, read-only,
/// and a chain ending in qcow2 ends in `backing: null`, so QEMU never opens a name from a
/// header (one rewritten after the check included). Without handed-over files: the path,
/// with its format. JSON, not `-drive`'s comma syntax: a name cannot inject options.
fn blockdev(d: &vmm::config::DiskConfig, names: &[String]) -> Result<serde_json::Value> {
    let node = |format: DiskFormat, name: &str, ro: bool| {
        json!({"driver": disk_format(format), "read-only": ro,
               "file": {"driver": "file", "filename": name, "read-only": ro}})
    };
    if d.fds.is_empty() {
        let name = d
            .path
            .to_str()
            .ok_or_else(|| Error::invalid("disk", format!("{}: not UTF-8", d.path.display())))?;
        return Ok(node(drive_format(d)?, name, d.read_only));
    }
    let mut chain = serde_json::Value::Null;
    for (i, (f, name)) in d.fds.iter().zip(names).enumerate().rev() {
        let mut n = node(f.format, name, i > 0 || d.read_only);
        if f.format == DiskFormat::Qcow2 {
            n["backing"] = chain;
        }
        chain = n;
    }
    Ok(chain)
}

fn drive_format(d: &vmm::config::DiskConfig) -> Result<DiskFormat> {
    match d.format {
        Some(f) => Ok(f),
        None if block::probe(&d.path).ok() == Some(block::Format::Qcow2) => Err(Error::invalid(
            "disk",
            format!(
                "{} starts with a qcow2 header but no format was given: redefine the domain \
                 with the disk's format",
                d.path.display()
            ),
        )),
        None => Ok(DiskFormat::Raw),
    }
}

/// Sends the VM's migration stream to `uri` and waits for it to complete; returns QEMU's
/// `query-migrate` report.
fn send(q: &mut Qmp, uri: &str) -> Result<serde_json::Value> {
    // A file or a local socket is not a network: no bandwidth cap (QEMU's default is
    // 128 MiB/s).
    q.execute(
        "migrate-set-parameters",
        Some(json!({"max-bandwidth": 1u64 << 40})),
    )?;
    q.execute("migrate", Some(json!({ "uri": uri })))?;
    let t0 = Instant::now();
    loop {
        let m = q.execute("query-migrate", None)?;
        match m.get("status").and_then(|s| s.as_str()) {
            Some("completed") => return Ok(m),
            Some("failed") | Some("cancelled") => {
                return Err(Error::Conflict(format!("QEMU's migration failed: {m}")))
            }
            _ if t0.elapsed() > LIMIT => {
                let _ = q.execute("migrate_cancel", None);
                return Err(Error::Conflict(format!(
                    "QEMU's migration took over {LIMIT:?}"
                )));
            }
            // QMP has events for it, but this monitor connection is request/answer.
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// QEMU's `query-migrate` answer in the report Vessel's VMM gives (one shape for either
/// driver), with QEMU's own answer beside it. QEMU does not count the pages sent while
/// stopped: `last_pages` is 0.
fn report(m: &serde_json::Value) -> serde_json::Value {
    let ram = |k: &str| m["ram"][k].as_u64().unwrap_or(0);
    let r = vmm::migration::Report {
        rounds: u32::try_from(ram("dirty-sync-count")).unwrap_or(u32::MAX),
        last_pages: 0,
        pages: ram("normal").saturating_add(ram("duplicate")),
        zero_pages: ram("duplicate"),
        untouched_pages: 0,
        bytes: ram("transferred"),
        total_ms: m["total-time"].as_f64().unwrap_or(0.0),
        downtime_ms: m["downtime"].as_f64().unwrap_or(0.0),
    };
    let mut v = serde_json::to_value(r).unwrap_or_default();
    v["qemu"] = m.clone();
    v
}

/// After a restore's QEMU has loaded the state (it waits paused, as the VM was saved
/// stopped), lets it run.
fn continue_after_load(run: &RunDir, cont: bool) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let st = qmp_status(run)?;
        match st.as_str() {
            "paused" | "postmigrate" | "prelaunch" => {
                if cont {
                    qmp(run, "cont")?;
                }
                return Ok(());
            }
            "running" if !cont => {
                return Err(Error::Conflict(
                    "QEMU ran the restored guest though it was to stay paused".into(),
                ))
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

/// Runs one QMP command on a domain's monitor.
/// QEMU's `guest-stats` names, by virtio balloon tag (`MEMSTAT_NAMES`' order).
const QEMU_STATS: [&str; 10] = [
    "stat-swap-in",
    "stat-swap-out",
    "stat-major-faults",
    "stat-minor-faults",
    "stat-free-memory",
    "stat-total-memory",
    "stat-available-memory",
    "stat-disk-caches",
    "stat-htlb-pgalloc",
    "stat-htlb-pgfail",
];

pub fn qmp(run: &RunDir, command: &str) -> Result<serde_json::Value> {
    let mut q = Qmp::connect(&run.qmp(), Duration::from_secs(5))?;
    Ok(q.execute(command, None)?)
}

/// QEMU's run state through QMP (`running`, `paused`, …).
pub fn qmp_status(run: &RunDir) -> Result<String> {
    let mut q = Qmp::connect(&run.qmp(), Duration::from_secs(5))?;
    Ok(q.status()?)
}

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

/// The first part of `vm` QEMU would run without, named for the user (checked at define
/// time: a domain never starts without part of its definition). Every field is named
/// here, so a field added to `VmConfig` does not compile until this driver says what it
/// does with it.
pub fn cannot_honour(vm: &VmConfig) -> Option<&'static str> {
    let VmConfig {
        arch,
        // -kernel, -initrd, -append; -bios or the two pflash drives.
        kernel: _,
        initrd: _,
        cmdline: _,
        firmware: _,
        firmware_vars: _,
        option_roms,
        // -m, -smp (threads), -cpu, -accel.
        memory_mib: _,
        cpus: _,
        threads_per_core: _,
        cpu_model: _,
        accel,
        cpuid_modifiers,
        // The manager's: the console socket and log.
        serial: _,
        serial_rate_limiter,
        disks,
        rng: _,
        rng_rate_limiter,
        // virtio-balloon-pci; the target is set over QMP once QEMU runs.
        balloon: _,
        virtio_console,
        nets,
        vsock,
        // q35's virtio devices are PCI functions.
        virtio_transport,
        // The cloud-init seed's hostname; -uuid.
        name: _,
        cloud_init: _,
        uuid: _,
        // The boot files handed over open: -kernel and the like get `/proc/self/fd/N`.
        opened: _,
    } = vm;
    if *arch != vmm::config::Arch::X86_64 {
        return Some("vm.arch (only x86_64: qemu-system-x86_64)");
    }
    if *virtio_transport == Transport::Mmio {
        // QEMU's virtio-mmio machine is microvm, which is not offered: under TCG (every
        // host here) QEMU 7.2's microvm gives the guest no timer it can calibrate with
        // ACPI on, and no power button with ACPI off.
        return Some(
            "vm.virtio_transport mmio (libvirt's machine='microvm'): the QEMU driver runs \
             q35, whose virtio devices are PCI; use pci (machine='q35'), or the Vessel driver \
             for virtio-mmio",
        );
    }
    if vsock.is_some() {
        return Some(
            "vm.vsock (Vessel's vsock is Firecracker's Unix-socket flavour; QEMU's is vhost-vsock)",
        );
    }
    if virtio_console.is_some() {
        return Some("vm.virtio_console (a virtio console: use the Vessel driver)");
    }
    if !option_roms.is_empty() {
        return Some("vm.option_roms");
    }
    if *accel == Accel::Hybrid {
        return Some("vm.accel hybrid (Vessel's own accelerator)");
    }
    if serial_rate_limiter.is_some() {
        return Some("vm.serial_rate_limiter (Firecracker's serial token bucket)");
    }
    if !cpuid_modifiers.is_empty() {
        return Some("vm.cpuid_modifiers (Firecracker's custom CPU template)");
    }
    if rng_rate_limiter.is_some() {
        return Some("vm.rng_rate_limiter (Firecracker's token buckets)");
    }
    for d in disks {
        let vmm::config::DiskConfig {
            path: _,
            format: _,
            read_only: _,
            folder: _,
            // Given as `/proc/self/fd/N` files (`blockdev`).
            fds: _,
            transport,
            rate_limiter,
            queues,
        } = d;
        if queues.is_some_and(|q| q > 1) {
            return Some("a disk's queues (this driver gives QEMU one queue per disk)");
        }
        if rate_limiter.is_some() {
            return Some("a disk's rate_limiter (Firecracker's token buckets)");
        }
        if *transport == Some(Transport::Mmio) {
            return Some("a disk's transport mmio (q35's virtio devices are PCI)");
        }
    }
    for n in nets {
        let vmm::config::NetConfig {
            tap: _,
            mac: _,
            mtu: _,
            transport,
            queues,
            rx_rate_limiter,
            tx_rate_limiter,
        } = n;
        if queues.is_some_and(|q| q > 1) {
            return Some("a network interface's queues (this driver gives QEMU one pair)");
        }
        if rx_rate_limiter.is_some() || tx_rate_limiter.is_some() {
            return Some("a network interface's rate limiter (Firecracker's token buckets)");
        }
        if *transport == Some(Transport::Mmio) {
            return Some("a network interface's transport mmio (q35's virtio devices are PCI)");
        }
    }
    None
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
    // The machine's own UUID when the VM names one, else the domain's (as libvirt's -uuid).
    if let Some(u) = vm.uuid.as_ref().or(def.uuid.as_ref()) {
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
    // The boot files the manager opened and checked, reopened by QEMU through its
    // inherited descriptors (crate::boot_files), not looked up by name again.
    let named = |p: &Path| crate::boot_files::qemu_name(vm, p);
    if let Some(k) = &vm.kernel {
        c.arg("-kernel").arg(named(k));
        if let Some(i) = &vm.initrd {
            c.arg("-initrd").arg(named(i));
        }
        c.args(["-append", &vm.cmdline]);
    }
    match (&vm.firmware, &vm.firmware_vars) {
        // UEFI: the code and the variable store on QEMU's two pflash drives.
        (Some(code), Some(vars)) => {
            c.arg("-drive").arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                named(code).display()
            ));
            c.arg("-drive").arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                named(vars).display()
            ));
        }
        (Some(f), None) => {
            c.arg("-bios").arg(named(f));
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
    // Each disk as -blockdev nodes ([`blockdev`]): -drive's `backing=` (none) is
    // deprecated syntax in QEMU 7.2 and it cannot spell null.
    let mut disk_devices = Vec::new();
    for (i, d) in vm.disks.iter().enumerate() {
        let names: Vec<String> = d
            .fds
            .iter()
            .map(|f| format!("/proc/self/fd/{}", f.fd))
            .collect();
        let mut node = blockdev(d, &names)?;
        node["node-name"] = json!(format!("disk{i}"));
        c.arg("-blockdev").arg(node.to_string());
        // -drive's default cache mode (writeback), which a -device does not assume.
        disk_devices.push(format!("virtio-blk-pci,drive=disk{i},write-cache=on"));
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
    if let Some(b) = &vm.balloon {
        let on = |b: bool| if b { "on" } else { "off" };
        c.arg("-device").arg(format!(
            "virtio-balloon-pci,id={QEMU_BALLOON},deflate-on-oom={},guest-stats-polling-interval={}",
            on(b.deflate_on_oom),
            b.stats_polling_interval_s
        ));
    }
    for k in 0..HOTPLUG_PORTS {
        c.arg("-device").arg(format!(
            "pcie-root-port,id=hp{k},bus=pcie.0,chassis={}",
            k + 1
        ));
    }
    // Last, in the order QEMU created `-drive if=virtio` devices (after every -device):
    // the PCI layout, so the guest's names and a state saved before, stay as they were.
    for dev in disk_devices {
        c.arg("-device").arg(dev);
    }
    if let Some(ci) = &vm.cloud_init {
        // The same NoCloud seed Vessel's VMM builds, as a file in the run folder.
        // From the files opened at the start's check, which this daemon holds now.
        let seed = vmm::cloud_init::seed_image_from(ci, &seed_name(def), &|p| vm.open_named(p))
            .map_err(|e| {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::vessel::vessel_command;

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
        let p = Programs::by_name(true);
        let run = RunDir(dir.join("run"));
        let log = dir.join("serial.log");
        let mut def: DomainDef = serde_json::from_value(serde_json::json!({
            "name": "q", "driver": "qemu",
            "vm": {"kernel": "/k", "disks": [{"path": raw}]}}))
        .unwrap();
        let a = args(&qemu_command(&p, &def, &run, &log).unwrap());
        assert!(
            a.iter().any(|x| x.starts_with(r#"{"driver":"raw","#)),
            "{a:?}"
        );
        def.vm.disks[0].path = qcow.clone();
        let e = qemu_command(&p, &def, &run, &log).unwrap_err();
        assert!(e.to_string().contains("qcow2 header"), "{e}");
        def.vm.disks[0].format = Some(DiskFormat::Qcow2);
        let a = args(&qemu_command(&p, &def, &run, &log).unwrap());
        assert!(
            a.iter().any(|x| x.starts_with(r#"{"driver":"qcow2","#)),
            "{a:?}"
        );
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

    /// Issue 16: a managed save started with `start --paused` is restored paused on both
    /// drivers (QEMU's `-S` beside `-incoming`, Vessel's `--paused` beside `--restore`),
    /// not restored running and suspended after; without `--paused`, neither.
    #[test]
    fn both_drivers_restore_paused_when_asked() {
        let dir = std::env::temp_dir().join(format!("vessel-prestore-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = Programs::by_name(false);
        let saved = dir.join("saved");
        let log = dir.join("serial.log");
        for (kind, flag) in [
            (crate::domain::DriverKind::Qemu, "-S"),
            (crate::domain::DriverKind::Vessel, "--paused"),
        ] {
            let def: DomainDef = serde_json::from_value(serde_json::json!({
                "name": "r", "driver": kind.as_str(), "vm": {"kernel": "/k"}}))
            .unwrap();
            let run = RunDir(dir.join(kind.as_str()));
            std::fs::create_dir_all(&run.0).unwrap();
            for paused in [false, true] {
                let boot = Boot::Restore {
                    dir: &saved,
                    paused,
                };
                assert_eq!(boot.paused(), paused);
                let a = args(
                    &crate::driver::of(kind)
                        .command(&p, &def, &run, &log, boot)
                        .unwrap(),
                );
                assert!(
                    a.iter().any(|x| x == "-incoming" || x == "--restore"),
                    "{a:?}"
                );
                assert_eq!(a.iter().any(|x| x == flag), paused, "{kind:?}: {a:?}");
            }
        }
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
        let p = Programs::by_name(true);
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
        let p = Programs::by_name(true);
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

    /// Issue 16: every `VmConfig` field QEMU accepts reaches its command line, and every
    /// other field is refused at define time by name (a table of both).
    #[test]
    fn qemu_maps_every_field_it_accepts_and_refuses_the_rest_by_name() {
        let dir = std::env::temp_dir().join(format!("vessel-qmap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ud = dir.join("user-data");
        std::fs::write(&ud, "#cloud-config\n").unwrap();
        let def: DomainDef = serde_json::from_value(serde_json::json!({
            "name": "full", "driver": "qemu", "uuid": "11111111-2222-4333-8444-555555555555",
            "vm": {
                "kernel": "/k", "initrd": "/i", "cmdline": "console=ttyS0 x=1",
                "virtio_transport": "pci",
                "firmware": "/usr/share/seabios/bios.bin",
                "memory_mib": 768, "cpus": 4, "threads_per_core": 2,
                "cpu_model": "qemu64", "accel": "kvm",
                "disks": [{"path": "/d.qcow2", "format": "qcow2", "read_only": true,
                           "transport": "pci"}],
                "rng": true,
                "nets": [{"tap": "vt0", "mac": "52:54:00:00:00:07", "mtu": 1400,
                          "transport": "pci"}],
                "name": "host-1", "cloud_init": {"user_data": ud},
                "uuid": "66666666-7777-4888-8999-aaaaaaaaaaaa",
            }
        }))
        .unwrap();
        assert!(QemuDriver.check(&def.vm).is_ok());
        let p = Programs::by_name(true);
        let run = RunDir(dir.clone());
        let a = args(&qemu_command(&p, &def, &run, &dir.join("log")).unwrap()).join(" ");
        for want in [
            "-kernel /k",
            "-initrd /i",
            "-append console=ttyS0 x=1",
            "-bios /usr/share/seabios/bios.bin",
            "-m 768M",
            "-smp 4,threads=2",
            "-cpu qemu64",
            "-accel kvm",
            r#"-blockdev {"driver":"qcow2","file":{"driver":"file","filename":"/d.qcow2","read-only":true},"node-name":"disk0","read-only":true}"#,
            "-device virtio-blk-pci,drive=disk0,write-cache=on",
            "-device virtio-rng-pci",
            "tap,id=net0,ifname=vt0",
            "mac=52:54:00:00:00:07",
            "host_mtu=1400",
            "cidata.img,if=virtio,format=raw,readonly=on",
            // The machine's own UUID wins over the domain's, as it does for Vessel's VMM.
            "-uuid 66666666-7777-4888-8999-aaaaaaaaaaaa",
        ] {
            assert!(a.contains(want), "{want} missing: {a}");
        }
        let seed = std::fs::read(dir.join("cidata.img")).unwrap();
        let want =
            vmm::cloud_init::seed_image(def.vm.cloud_init.as_ref().unwrap(), "host-1").unwrap();
        assert_eq!(seed, want, "the seed names the VM's own name");
        let _ = std::fs::remove_dir_all(&dir);

        let bucket = serde_json::json!({"size": 1, "refill_time": 100});
        let limiter = serde_json::json!({"ops": bucket});
        for (field, value, named) in [
            ("arch", serde_json::json!("riscv64"), "vm.arch"),
            (
                "virtio_transport",
                serde_json::json!("mmio"),
                "vm.virtio_transport mmio (libvirt's machine='microvm')",
            ),
            ("option_roms", serde_json::json!(["/rom"]), "vm.option_roms"),
            ("accel", serde_json::json!("hybrid"), "hybrid"),
            (
                "serial_rate_limiter",
                bucket.clone(),
                "vm.serial_rate_limiter",
            ),
            (
                "cpuid_modifiers",
                serde_json::json!([{"leaf": 1, "subleaf": 0, "register": 2, "set": 0, "clear": 1}]),
                "vm.cpuid_modifiers",
            ),
            ("rng_rate_limiter", limiter.clone(), "vm.rng_rate_limiter"),
            (
                "virtio_console",
                serde_json::json!({"type": "null"}),
                "vm.virtio_console",
            ),
            (
                "vsock",
                serde_json::json!({"guest_cid": 3, "uds_path": "/v"}),
                "vm.vsock",
            ),
            (
                "disks",
                serde_json::json!([{"path": "/d", "rate_limiter": limiter}]),
                "a disk's rate_limiter",
            ),
            (
                "disks",
                serde_json::json!([{"path": "/d", "transport": "mmio"}]),
                "a disk's transport mmio",
            ),
            (
                "nets",
                serde_json::json!([{"tap": "t0", "tx_rate_limiter": limiter}]),
                "a network interface's rate limiter",
            ),
            (
                "nets",
                serde_json::json!([{"tap": "t0", "transport": "mmio"}]),
                "a network interface's transport mmio",
            ),
        ] {
            let mut vm = serde_json::json!({"kernel": "/k", "virtio_transport": "pci"});
            vm[field] = value;
            let vm: VmConfig = serde_json::from_value(vm).unwrap();
            let e = QemuDriver.check(&vm).unwrap_err().to_string();
            assert!(
                e.contains("unsupported configuration") && e.contains(named),
                "{field}: {e}"
            );
        }
    }

    /// A QEMU migration reports in the same shape as Vessel's VMM (the CLI prints its
    /// downtime for either driver).
    #[test]
    fn qemu_migration_reports_in_vessels_shape() {
        let m = serde_json::json!({"status": "completed", "total-time": 1037, "downtime": 9,
            "ram": {"transferred": 190000000u64, "normal": 46000, "duplicate": 20000,
                    "dirty-sync-count": 4}});
        let r: vmm::migration::Report = serde_json::from_value(report(&m)).unwrap();
        assert_eq!(
            (r.rounds, r.pages, r.zero_pages, r.bytes),
            (4, 66000, 20000, 190000000)
        );
        assert_eq!((r.total_ms, r.downtime_ms), (1037.0, 9.0));
        assert_eq!(report(&m)["qemu"], m);
    }

    /// Issue 22: a disk handed over as open files reaches QEMU as those files, each
    /// backing file as the node above's read-only `backing` (so no header name is
    /// opened), a chain ending in qcow2 ending in `backing: null`; the path is not on the
    /// command line.
    #[test]
    fn handed_over_disks_are_given_to_qemu_as_their_open_files() {
        let disk = |fds: serde_json::Value| -> vmm::config::DiskConfig {
            serde_json::from_value(serde_json::json!({
                "path": "/pool/top.qcow2", "format": "qcow2", "fds": fds}))
            .unwrap()
        };
        let names = |d: &vmm::config::DiskConfig| -> Vec<String> {
            d.fds
                .iter()
                .map(|f| format!("/proc/self/fd/{}", f.fd))
                .collect()
        };
        let file = |n: u32, ro: bool| json!({"driver": "file", "filename": format!("/proc/self/fd/{n}"), "read-only": ro});
        let d = disk(serde_json::json!([
            {"fd": 7, "format": "qcow2", "path": "/pool/top.qcow2"},
            {"fd": 8, "format": "qcow2", "path": "/pool/mid.qcow2"},
            {"fd": 9, "format": "raw", "path": "/pool/base.raw"}]));
        assert_eq!(
            blockdev(&d, &names(&d)).unwrap(),
            json!({"driver": "qcow2", "read-only": false, "file": file(7, false),
                   "backing": {"driver": "qcow2", "read-only": true, "file": file(8, true),
                               "backing": {"driver": "raw", "read-only": true,
                                           "file": file(9, true)}}})
        );
        let d = disk(serde_json::json!([
            {"fd": 7, "format": "qcow2", "path": "/pool/top.qcow2"}]));
        assert_eq!(
            blockdev(&d, &names(&d)).unwrap(),
            json!({"driver": "qcow2", "read-only": false, "file": file(7, false),
                   "backing": null})
        );
        let d = disk(serde_json::json!([]));
        assert_eq!(
            blockdev(&d, &[]).unwrap(),
            json!({"driver": "qcow2", "read-only": false,
                   "file": {"driver": "file", "filename": "/pool/top.qcow2", "read-only": false}})
        );
    }
}
