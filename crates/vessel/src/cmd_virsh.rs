//! More of virsh's verbs, with virsh's argument shapes: domain queries (`domstate`,
//! `domid`, `domblklist`, `domiflist`), host queries (`version`, `capabilities`,
//! `nodeinfo`), the XML dumps of pools, volumes and networks, and changes to a domain's
//! definition (`setmem`, `setvcpus`, `attach-disk`/`detach-disk`,
//! `attach-interface`/`detach-interface`), and `dommemstat`.
//!
//! Where a change applies follows virsh: `--config` changes the definition (the next
//! start), `--live` the running domain, `--persistent` both (the definition alone when
//! the domain does not run), `--current` (the default) the running domain if it runs,
//! else the definition. Live changes go through the domain's driver: QEMU domains (q35)
//! take disks and interfaces on spare PCIe root ports; the Vessel driver, whose virtio
//! devices the guest finds only at boot, and vCPU changes refuse `--live` by name, and
//! `--config` still applies. `setmem` of a domain with a balloon works live on both
//! drivers (the balloon's target); without one it refuses `--live`.

use anyhow::{bail, Context, Result};
use manager::client::Client;
use serde_json::{json, Value};
use vmm::api::http::percent_encode as enc;

use crate::cmd_manage::{dom, kv, print_json, s, table, vol};

/// Where a change applies (virsh's `--config`, `--live`, `--persistent`, `--current`).
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct Scope {
    /// Change the definition (the domain gets it at its next start).
    #[arg(long)]
    config: bool,
    /// Change the running domain (hot-plug; refused where its machine has none).
    #[arg(long)]
    live: bool,
    /// Both: the running domain and its definition (the definition alone when it does
    /// not run).
    #[arg(long)]
    persistent: bool,
    /// The running domain if it runs, else its definition (the default).
    #[arg(long, conflicts_with_all = ["config", "live", "persistent"])]
    current: bool,
}

impl Scope {
    /// (the running domain, the definition) this scope changes for a domain that runs
    /// or not.
    fn targets(self, running: bool, name: &str) -> Result<(bool, bool)> {
        let live = self.live || (self.persistent && running);
        let config = self.config || self.persistent;
        if live && !running {
            bail!("Requested operation is not valid: domain '{name}' is not running");
        }
        Ok(match (live, config) {
            (false, false) => (running, !running),
            t => t,
        })
    }
}

/// attach-disk's virsh flags for what Vessel's disks cannot be given: taken by clap so
/// the refusal names them (not "unexpected argument").
#[derive(clap::Args, Debug, Clone)]
pub struct DiskUnsettable {
    #[arg(long, hide = true)]
    cache: Option<String>,
    #[arg(long, hide = true)]
    io: Option<String>,
    #[arg(long, hide = true)]
    alias: Option<String>,
    #[arg(long, hide = true)]
    iothread: Option<String>,
}

impl DiskUnsettable {
    fn refuse(&self) -> Result<()> {
        for (flag, v, why) in [
            (
                "--cache",
                &self.cache,
                "Vessel's disks have no cache mode: writes reach the file and flushes are honoured",
            ),
            (
                "--io",
                &self.io,
                "each disk has an I/O thread of its own; its mode cannot be set",
            ),
            ("--alias", &self.alias, "Vessel names devices itself"),
            (
                "--iothread",
                &self.iothread,
                "each disk has an I/O thread of its own",
            ),
        ] {
            if let Some(v) = v {
                bail!("unsupported configuration: {flag} {v}: {why}");
            }
        }
        Ok(())
    }
}

/// attach-interface's virsh flags for what Vessel's interfaces cannot be given.
#[derive(clap::Args, Debug, Clone)]
pub struct InterfaceUnsettable {
    #[arg(long, hide = true)]
    target: Option<String>,
    #[arg(long, hide = true)]
    script: Option<String>,
    #[arg(long, hide = true)]
    inbound: Option<String>,
    #[arg(long, hide = true)]
    outbound: Option<String>,
    #[arg(long, hide = true)]
    alias: Option<String>,
    #[arg(long, hide = true)]
    managed: bool,
    #[arg(long, hide = true)]
    source_mode: Option<String>,
}

impl InterfaceUnsettable {
    fn refuse(&self) -> Result<()> {
        let managed = self.managed.then(|| "yes".to_string());
        for (flag, v, why) in [
            ("--target", &self.target, "Vessel names TAP devices itself"),
            ("--script", &self.script, "Vessel runs no interface scripts"),
            (
                "--inbound",
                &self.inbound,
                "Vessel's interfaces have no bandwidth limits",
            ),
            (
                "--outbound",
                &self.outbound,
                "Vessel's interfaces have no bandwidth limits",
            ),
            ("--alias", &self.alias, "Vessel names devices itself"),
            (
                "--managed",
                &managed,
                "Vessel has no host device assignment",
            ),
            (
                "--source-mode",
                &self.source_mode,
                "Vessel's interfaces are TAPs on a network or bridge",
            ),
        ] {
            if let Some(v) = v {
                bail!("unsupported configuration: {flag} {v}: {why}");
            }
        }
        Ok(())
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum VirshCommand {
    /// Print a domain's state ("running", "shut off", …).
    Domstate {
        name: String,
        /// Add why it is in that state.
        #[arg(long)]
        reason: bool,
    },
    /// Print a running domain's ID (its VMM's process ID), or "-".
    Domid { name: String },
    /// List a domain's disks: target (vda, vdb, …) and source.
    Domblklist {
        name: String,
        /// The definition's disks, not the running domain's.
        #[arg(long)]
        inactive: bool,
        /// Also each disk's type and device (virsh's columns).
        #[arg(long)]
        details: bool,
    },
    /// List a domain's interfaces: TAP, type, source, model, MAC.
    Domiflist {
        name: String,
        /// The definition's interfaces, not the running domain's.
        #[arg(long)]
        inactive: bool,
    },
    /// Reset a running domain at once (the machine restarts, no guest shutdown).
    Reset { name: String },
    /// A running domain's memory as its balloon sees it (virsh's names, KiB): actual,
    /// the guest's statistics when its balloon polls them, the VMM's rss.
    Dommemstat { name: String },
    /// Set a domain's memory: SIZE in KiB, or with a suffix (512M, 2G). With a balloon
    /// (<memballoon model='virtio'>), the current memory within the maximum, live on a
    /// running domain; without one, the memory of its definition.
    Setmem {
        name: String,
        size: String,
        #[command(flatten)]
        scope: Scope,
    },
    /// Set a domain's vCPU count.
    Setvcpus {
        name: String,
        count: u8,
        /// The maximum (with --config): a Vessel domain boots all its vCPUs, so its
        /// maximum is its count.
        #[arg(long)]
        maximum: bool,
        /// Through a guest agent: refused (Vessel has none).
        #[arg(long)]
        guest: bool,
        /// Hot-pluggable vCPUs: refused (Vessel has no CPU hot-plug).
        #[arg(long)]
        hotpluggable: bool,
        #[command(flatten)]
        scope: Scope,
    },
    /// Add a disk image file to a domain (as the next virtio disk).
    AttachDisk {
        name: String,
        source: std::path::PathBuf,
        /// vdX: the next free one (Vessel's disks appear in definition order).
        target: String,
        /// The image format: raw or qcow2 (raw when absent; never guessed).
        #[arg(long)]
        subdriver: Option<String>,
        /// qemu (virsh's driver name; Vessel's disks are image files either way).
        #[arg(long)]
        driver: Option<String>,
        /// virtio (Vessel's disks are virtio disks).
        #[arg(long)]
        targetbus: Option<String>,
        /// disk (Vessel has no cdrom or floppy: attach an ISO as a read-only disk).
        #[arg(long = "type")]
        device: Option<String>,
        /// readonly, or nothing for read-write.
        #[arg(long)]
        mode: Option<String>,
        /// file (Vessel's disks are image files).
        #[arg(long)]
        sourcetype: Option<String>,
        /// virsh's cache, io, alias and iothread: refused by name (Vessel sets none).
        #[command(flatten)]
        unsettable: Box<DiskUnsettable>,
        /// Print the disk's XML (what attach-device would take) instead of attaching it.
        #[arg(long)]
        print_xml: bool,
        #[command(flatten)]
        scope: Scope,
    },
    /// Remove a domain's disk by its target (vdX).
    DetachDisk {
        name: String,
        target: String,
        #[command(flatten)]
        scope: Scope,
    },
    /// Add an interface: TYPE network or bridge, SOURCE its network or bridge name.
    AttachInterface {
        name: String,
        r#type: String,
        source: String,
        #[arg(long)]
        mac: Option<String>,
        /// virtio (Vessel's only model).
        #[arg(long)]
        model: Option<String>,
        /// virsh's target, script, inbound, outbound, alias, managed and source-mode:
        /// refused by name (Vessel sets none).
        #[command(flatten)]
        unsettable: Box<InterfaceUnsettable>,
        /// Print the interface's XML (what attach-device would take) instead of attaching
        /// it.
        #[arg(long)]
        print_xml: bool,
        #[command(flatten)]
        scope: Scope,
    },
    /// Remove an interface of TYPE (network or bridge), the one with --mac if several.
    DetachInterface {
        name: String,
        r#type: String,
        #[arg(long)]
        mac: Option<String>,
        #[command(flatten)]
        scope: Scope,
    },
    /// Attach a device described by libvirt XML: one <disk> or <interface> element.
    AttachDevice {
        name: String,
        file: String,
        #[command(flatten)]
        scope: Scope,
    },
    /// Detach the device a libvirt XML <disk> (by its source) or <interface> (by its
    /// source, and its MAC when given) describes.
    DetachDevice {
        name: String,
        file: String,
        #[command(flatten)]
        scope: Scope,
    },
    /// Print the versions of this client and of the daemon.
    Version {
        /// Also the daemon's own version line (virsh's --daemon).
        #[arg(long)]
        daemon: bool,
    },
    /// Print what the daemon's host can run, as libvirt capabilities XML.
    Capabilities,
    /// Print this host's CPUs and memory (the daemon's host when it is reached over its
    /// Unix socket).
    Nodeinfo,
    /// Start a pool (directory pools are always active: this checks it exists).
    PoolStart { name: String },
    /// Make a pool's folder (again).
    PoolBuild { name: String },
    /// Edit a domain's definition in $EDITOR: its libvirt XML, or its JSON when XML cannot
    /// say all of it; saved as with `define --update`.
    Edit { name: String },
    /// Define a domain from a file and start it (Vessel has no transient domains: it stays
    /// defined; `undefine` removes it).
    Create {
        file: String,
        /// Attach to its console once started.
        #[arg(long)]
        console: bool,
        /// Leave the guest paused: its vCPUs run once it is resumed.
        #[arg(long)]
        paused: bool,
        /// Check libvirt XML against libvirt's schema first (virt-xml-validate).
        #[arg(long)]
        validate: bool,
    },
    /// Print a pool as libvirt pool XML.
    PoolDumpxml { name: String },
    /// Print a volume as libvirt volume XML (VOL: its name with --pool, or its path).
    VolDumpxml {
        vol: String,
        #[arg(long)]
        pool: Option<String>,
    },
    /// Print a volume's file path (VOL: its name with --pool, or its path).
    VolPath {
        vol: String,
        #[arg(long)]
        pool: Option<String>,
    },
    /// Print a network as libvirt network XML.
    NetDumpxml { name: String },
    /// List a network's DHCP leases (only MAC's when given).
    NetDhcpLeases { name: String, mac: Option<String> },
}

/// A domain's definition and state.
fn domain(c: &Client, name: &str) -> Result<(Value, Value)> {
    let v = c.get(&dom(name))?;
    Ok((v["definition"].clone(), v["info"].clone()))
}

/// The guest-visible name of the `i`th virtio disk.
fn disk_target(i: usize) -> String {
    let mut n = i;
    let mut name = String::new();
    loop {
        name.insert(0, (b'a' + (n % 26) as u8) as char);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    format!("vd{name}")
}

fn running(info: &Value) -> bool {
    matches!(info["state"].as_str(), Some("running" | "paused"))
}

/// Applies `change` to the domain's definition, or refuses a change to the running
/// domain (memory and vCPUs: no balloon or CPU hot-plug on either driver).
fn change_definition(
    c: &Client,
    name: &str,
    scope: Scope,
    what: &str,
    change: impl FnOnce(&mut Value) -> Result<()>,
) -> Result<()> {
    let (_, info) = domain(c, name)?;
    let (live, _) = scope.targets(running(&info), name)?;
    if live {
        bail!(
            "Operation not supported: cannot change {what} of a running domain (no \
             balloon or vCPU hot-plug for it): use --config to change its \
             definition, which applies from its next start"
        );
    }
    redefine(c, name, &info, what, change)
}

/// Applies `change` to the domain's stored definition.
fn redefine(
    c: &Client,
    name: &str,
    info: &Value,
    what: &str,
    change: impl FnOnce(&mut Value) -> Result<()>,
) -> Result<()> {
    let (mut def, _) = domain(c, name)?;
    change(&mut def)?;
    let body = serde_json::to_vec(&def)?;
    c.raw("PUT", &dom(name), Some(("application/json", &body)))
        .with_context(|| format!("redefining {name}"))?;
    if running(info) {
        println!("Domain '{name}': {what} changed in its definition (applies from its next start)");
    } else {
        println!("Domain '{name}': {what} changed");
    }
    Ok(())
}

/// The running domain's live definition.
fn live_definition(c: &Client, name: &str) -> Result<Value> {
    let v = c.get(&dom(name))?;
    if v["live"].is_null() {
        bail!("Requested operation is not valid: domain '{name}' is not running");
    }
    Ok(v["live"].clone())
}

/// A device as the daemon's JSON takes it: ("disk", DiskConfig) or ("interface",
/// Interface).
fn device_json(d: &manager::manager::Device) -> Result<(&'static str, Value)> {
    Ok(match d {
        manager::manager::Device::Disk(x) => ("disk", serde_json::to_value(x)?),
        manager::manager::Device::Interface(x) => ("interface", serde_json::to_value(x)?),
    })
}

/// The file of the disk `disk` names in definition `def`: its path, or the file of the
/// pool volume (`vol://POOL/VOLUME`) it names.
fn disk_path(def: &Value, disk: &Value) -> Result<String> {
    let p = s(&disk["path"]);
    let file = match p.strip_prefix(manager::domain::VOLUME_PREFIX) {
        Some(vol) => def["volumes"]
            .as_object()
            .and_then(|m| m.iter().find(|(_, v)| v.as_str() == Some(vol)))
            .map(|(f, _)| f.clone())
            .with_context(|| format!("no disk from volume {vol}"))?,
        None => p,
    };
    let has = def["vm"]["disks"]
        .as_array()
        .is_some_and(|a| a.iter().any(|d| d["path"] == file.as_str()));
    if !has {
        bail!("no disk {file}");
    }
    Ok(file)
}

/// The one interface of `ifaces` that `want` (an XML <interface>) describes: the same
/// network or bridge, and the same MAC when it gives one.
fn matching_interface(ifaces: &[Value], want: &Value) -> Result<usize> {
    let kind = if want["network"].is_string() {
        "network"
    } else {
        "bridge"
    };
    let same: Vec<Value> = ifaces
        .iter()
        .map(|i| {
            if i[kind] == want[kind] {
                i.clone()
            } else {
                Value::Null
            }
        })
        .collect();
    pick_interface(&same, kind, want["mac"].as_str())
}

/// Which interface of `ifaces` (a definition's) is meant: of `kind` (network or bridge),
/// with `mac` when given; one only.
fn pick_interface(ifaces: &[Value], kind: &str, mac: Option<&str>) -> Result<usize> {
    let matching: Vec<usize> = (0..ifaces.len())
        .filter(|&i| {
            ifaces[i].get(kind).is_some_and(|v| !v.is_null())
                && mac.is_none_or(|m| {
                    ifaces[i]["mac"]
                        .as_str()
                        .is_some_and(|x| x.eq_ignore_ascii_case(m))
                })
        })
        .collect();
    match matching.as_slice() {
        [i] => Ok(*i),
        [] => bail!(
            "no {kind} interface{}",
            mac.map(|m| format!(" with MAC {m}")).unwrap_or_default()
        ),
        _ => bail!("several {kind} interfaces: say which with --mac"),
    }
}

/// virsh's memory size: KiB unless a suffix says otherwise.
fn memory_mib(size: &str) -> Result<u64> {
    let t = size.trim();
    let at = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(at);
    let n: u64 = n.parse().with_context(|| format!("memory size {size:?}"))?;
    let bytes = match unit.to_ascii_lowercase().as_str() {
        "" | "k" | "kib" | "kb" => n.checked_mul(1 << 10),
        "m" | "mib" | "mb" => n.checked_mul(1 << 20),
        "g" | "gib" | "gb" => n.checked_mul(1 << 30),
        other => bail!("unknown memory unit {other:?} (K, M or G)"),
    }
    .context("memory size out of range")?;
    Ok(bytes >> 20)
}

fn host_memory_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

pub fn run(cmd: VirshCommand, c: &Client, json_out: bool) -> Result<i32> {
    match cmd {
        VirshCommand::Domstate { name, reason } => {
            let (_, info) = domain(c, &name)?;
            if json_out {
                print_json(&json!({
                    "state": info["state"],
                    "reason": info["reason"],
                    "detail": info["last_stop"],
                }));
            } else if reason {
                // libvirt's reason word, as the daemon's state machine recorded it.
                let why = info["reason"].as_str().unwrap_or("unknown");
                println!("{} ({why})", s(&info["state_text"]));
            } else {
                println!("{}", s(&info["state_text"]));
            }
        }
        VirshCommand::Domid { name } => {
            let (_, info) = domain(c, &name)?;
            println!("{}", s(&info["pid"]));
        }
        VirshCommand::Domblklist {
            name,
            inactive,
            details,
        } => {
            // The running domain's disks as they are now, else its definition's.
            let v = c.get(&dom(&name))?;
            let def = if inactive || v["live"].is_null() {
                v["definition"].clone()
            } else {
                v["live"].clone()
            };
            let disks = def["vm"]["disks"].as_array().cloned().unwrap_or_default();
            if json_out {
                print_json(&Value::Array(disks));
            } else {
                let rows: Vec<Vec<String>> = disks
                    .iter()
                    .enumerate()
                    .map(|(i, d)| {
                        let mut r = vec![disk_target(i), s(&d["path"])];
                        if details {
                            // Every Vessel disk is a file seen as a disk.
                            r.splice(0..0, ["file".to_string(), "disk".to_string()]);
                        }
                        r
                    })
                    .collect();
                if details {
                    table(&["Type", "Device", "Target", "Source"], &rows);
                } else {
                    table(&["Target", "Source"], &rows);
                }
                println!();
            }
        }
        VirshCommand::Domiflist { name, inactive } => {
            let v = c.get(&dom(&name))?;
            let def = if inactive || v["live"].is_null() {
                v["definition"].clone()
            } else {
                v["live"].clone()
            };
            let live = c.get(&format!("{}/interfaces", dom(&name)))?;
            let ifaces = def["interfaces"].as_array().cloned().unwrap_or_default();
            if json_out {
                print_json(&Value::Array(ifaces));
            } else {
                let rows: Vec<Vec<String>> = ifaces
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        let (ty, src) = match (n["network"].as_str(), n["bridge"].as_str()) {
                            (Some(net), _) => ("network", net),
                            (None, Some(br)) => ("bridge", br),
                            _ => ("-", "-"),
                        };
                        let l = &live[i];
                        let mac = n["mac"]
                            .as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| s(&l["mac"]));
                        vec![s(&l["tap"]), ty.into(), src.into(), "virtio".into(), mac]
                    })
                    .collect();
                table(&["Interface", "Type", "Source", "Model", "MAC"], &rows);
                println!();
            }
        }
        VirshCommand::Reset { name } => {
            // The manager's reboot resets the machine (no guest shutdown): virsh's reset.
            c.post(&format!("{}/reboot", dom(&name)), None)?;
            println!("Domain '{name}' was reset");
        }
        VirshCommand::Setmem { name, size, scope } => {
            let mib = memory_mib(&size)?;
            let (def, info) = domain(c, &name)?;
            if def["vm"]["balloon"].is_object() {
                // With a balloon, the current memory within the maximum: the running
                // guest gives the rest back, the definition keeps it as its target.
                let (live, config) = scope.targets(running(&info), &name)?;
                c.post(
                    &format!("{}/setmem", dom(&name)),
                    Some(&json!({"kib": mib << 10, "live": live, "config": config})),
                )?;
                println!("Domain '{name}': memory set to {mib} MiB through its balloon");
            } else {
                change_definition(c, &name, scope, "the memory", |d| {
                    d["vm"]["memory_mib"] = json!(mib);
                    Ok(())
                })?;
            }
        }
        VirshCommand::Dommemstat { name } => {
            let v = c.get(&format!("{}/memstat", dom(&name)))?;
            if json_out {
                print_json(&v);
            } else {
                for pair in v.as_array().into_iter().flatten() {
                    println!("{} {}", s(&pair[0]), pair[1]);
                }
            }
        }
        VirshCommand::Setvcpus {
            name,
            count,
            maximum,
            guest,
            hotpluggable,
            scope,
        } => {
            if guest {
                bail!("unsupported configuration: --guest: Vessel has no guest agent");
            }
            if hotpluggable {
                bail!("unsupported configuration: --hotpluggable: Vessel has no CPU hot-plug");
            }
            if maximum && !scope.config {
                // virsh's rule: the maximum is part of the definition.
                bail!("--maximum must be used with --config");
            }
            change_definition(c, &name, scope, "the vCPU count", |d| {
                d["vm"]["cpus"] = json!(count);
                Ok(())
            })?;
        }
        VirshCommand::AttachDisk {
            name,
            source,
            target,
            subdriver,
            driver,
            targetbus,
            device,
            mode,
            sourcetype,
            unsettable,
            print_xml,
            scope,
        } => {
            // virsh's other flags, taken where they say what Vessel does and refused by
            // name where they do not.
            unsettable.refuse()?;
            for (flag, given, only) in [
                ("--driver", &driver, "qemu"),
                ("--targetbus", &targetbus, "virtio"),
                ("--type", &device, "disk"),
                ("--sourcetype", &sourcetype, "file"),
            ] {
                if let Some(v) = given.as_deref().filter(|v| *v != only) {
                    bail!("unsupported configuration: {flag} {v}: Vessel supports {only}");
                }
            }
            let format = match subdriver.as_deref() {
                None | Some("raw") => "raw",
                Some("qcow2") => "qcow2",
                Some(f) => bail!("--subdriver {f:?}: raw or qcow2"),
            };
            let read_only = match mode.as_deref() {
                None => false,
                Some("readonly") => true,
                Some(m) => bail!("--mode {m:?}: readonly, or nothing for read-write"),
            };
            let source = std::path::absolute(&source)?;
            let (_, info) = domain(c, &name)?;
            if print_xml {
                // As virsh: the element it would attach, the domain left as it is.
                print!(
                    "{}",
                    disk_xml(&source, format, &target, read_only, device.is_some())
                );
                return Ok(0);
            }
            let (live, config) = scope.targets(running(&info), &name)?;
            let disk = json!({"path": source, "format": format, "read_only": read_only});
            if live {
                let now = live_definition(c, &name)?;
                let next = disk_target(now["vm"]["disks"].as_array().map_or(0, Vec::len));
                if target != next {
                    bail!(
                        "target {target}: the running guest names its next disk {next} \
                         (disks are named in the order the guest finds them)"
                    );
                }
                c.post(
                    &format!("{}/attach", dom(&name)),
                    Some(&json!({ "disk": disk })),
                )?;
                println!("Disk attached successfully");
            }
            if config {
                redefine(c, &name, &info, "the disks", |d| {
                    let disks = d["vm"]["disks"].as_array().map_or(0, Vec::len);
                    if target != disk_target(disks) {
                        bail!(
                            "target {target}: Vessel's disks appear in definition order, so \
                             the next one is {}",
                            disk_target(disks)
                        );
                    }
                    match d["vm"]["disks"].as_array_mut() {
                        Some(a) => a.push(disk),
                        None => d["vm"]["disks"] = json!([disk]),
                    }
                    Ok(())
                })?;
            }
        }
        VirshCommand::DetachDisk {
            name,
            target,
            scope,
        } => {
            let (_, info) = domain(c, &name)?;
            let (live, config) = scope.targets(running(&info), &name)?;
            let find = |disks: &[Value]| {
                (0..disks.len())
                    .find(|&i| disk_target(i) == target)
                    .with_context(|| format!("no disk with target {target}"))
            };
            if live {
                let now = live_definition(c, &name)?;
                let disks = now["vm"]["disks"].as_array().cloned().unwrap_or_default();
                let path = disks[find(&disks)?]["path"].clone();
                c.post(
                    &format!("{}/detach", dom(&name)),
                    Some(&json!({ "disk": path })),
                )?;
                println!("Disk detached successfully");
            }
            if config {
                redefine(c, &name, &info, "the disks", |d| {
                    let disks = d["vm"]["disks"]
                        .as_array_mut()
                        .context("the domain has no disks")?;
                    let i = find(disks)?;
                    disks.remove(i);
                    Ok(())
                })?;
            }
        }
        VirshCommand::AttachInterface {
            name,
            r#type,
            source,
            mac,
            model,
            unsettable,
            print_xml,
            scope,
        } => {
            unsettable.refuse()?;
            if model.as_deref().is_some_and(|m| m != "virtio") {
                bail!(
                    "--model {:?}: Vessel's interfaces are virtio",
                    model.unwrap_or_default()
                );
            }
            let iface = match r#type.as_str() {
                "network" => json!({"network": source, "mac": mac}),
                "bridge" => json!({"bridge": source, "mac": mac}),
                other => bail!("interface type {other:?}: network or bridge"),
            };
            let (_, info) = domain(c, &name)?;
            if print_xml {
                print!(
                    "{}",
                    interface_xml(&r#type, &source, mac.as_deref(), model.is_some())
                );
                return Ok(0);
            }
            let (live, config) = scope.targets(running(&info), &name)?;
            let mut iface = iface;
            if live {
                let now: Value = c.post(
                    &format!("{}/attach", dom(&name)),
                    Some(&json!({ "interface": iface })),
                )?;
                // The definition gets the MAC the running guest has.
                if let Some(m) = now["interfaces"].as_array().and_then(|a| a.last()) {
                    iface["mac"] = m["mac"].clone();
                }
                println!("Interface attached successfully");
            }
            if config {
                redefine(c, &name, &info, "the interfaces", |d| {
                    match d["interfaces"].as_array_mut() {
                        Some(a) => a.push(iface),
                        None => d["interfaces"] = json!([iface]),
                    }
                    Ok(())
                })?;
            }
        }
        VirshCommand::DetachInterface {
            name,
            r#type,
            mac,
            scope,
        } => {
            let (_, info) = domain(c, &name)?;
            let (live, config) = scope.targets(running(&info), &name)?;
            if live {
                let now = live_definition(c, &name)?;
                let ifaces = now["interfaces"].as_array().cloned().unwrap_or_default();
                let i = pick_interface(&ifaces, &r#type, mac.as_deref())?;
                let m = now["vm"]["nets"][i]["mac"]
                    .as_str()
                    .or(ifaces[i]["mac"].as_str())
                    .context("the interface has no MAC")?
                    .to_string();
                c.post(
                    &format!("{}/detach", dom(&name)),
                    Some(&json!({ "interface": m })),
                )?;
                println!("Interface detached successfully");
            }
            if config {
                redefine(c, &name, &info, "the interfaces", |d| {
                    let ifaces = d["interfaces"]
                        .as_array_mut()
                        .context("the domain has no interfaces")?;
                    let i = pick_interface(ifaces, &r#type, mac.as_deref())?;
                    ifaces.remove(i);
                    Ok(())
                })?;
            }
        }
        VirshCommand::AttachDevice { name, file, scope } => {
            let device = manager::xml::parse_device(&crate::cmd_manage::read_text(&file)?)?;
            let (key, body) = device_json(&device)?;
            let (_, info) = domain(c, &name)?;
            let (live, config) = scope.targets(running(&info), &name)?;
            if live {
                c.post(
                    &format!("{}/attach", dom(&name)),
                    Some(&json!({ key: body.clone() })),
                )?;
                println!("Device attached successfully");
            }
            if config {
                redefine(c, &name, &info, "the devices", |d| {
                    let list = match key {
                        "disk" => &mut d["vm"]["disks"],
                        _ => &mut d["interfaces"],
                    };
                    match list.as_array_mut() {
                        Some(a) => a.push(body),
                        None => *list = json!([body]),
                    }
                    Ok(())
                })?;
            }
        }
        VirshCommand::DetachDevice { name, file, scope } => {
            let device = manager::xml::parse_device(&crate::cmd_manage::read_text(&file)?)?;
            let (key, body) = device_json(&device)?;
            let (_, info) = domain(c, &name)?;
            let (live, config) = scope.targets(running(&info), &name)?;
            if live {
                let now = live_definition(c, &name)?;
                let what = match key {
                    "disk" => json!(disk_path(&now, &body)?),
                    _ => {
                        let ifaces = now["interfaces"].as_array().cloned().unwrap_or_default();
                        let i = matching_interface(&ifaces, &body)?;
                        now["vm"]["nets"][i]["mac"].clone()
                    }
                };
                c.post(
                    &format!("{}/detach", dom(&name)),
                    Some(&json!({ key: what })),
                )?;
                println!("Device detached successfully");
            }
            if config {
                redefine(c, &name, &info, "the devices", |d| {
                    if key == "disk" {
                        let path = disk_path(d, &body)?;
                        let disks = d["vm"]["disks"].as_array_mut().context("no disks")?;
                        disks.retain(|x| x["path"] != path.as_str());
                    } else {
                        let ifaces = d["interfaces"].as_array_mut().context("no interfaces")?;
                        let i = matching_interface(ifaces, &body)?;
                        ifaces.remove(i);
                    }
                    Ok(())
                })?;
            }
        }
        VirshCommand::Version { daemon } => {
            let v = c.get("/v1")?;
            if json_out {
                print_json(&json!({"client": env!("CARGO_PKG_VERSION"), "daemon": v}));
            } else {
                // virsh's four lines (scripts read "Running hypervisor:"), Vessel's words.
                let me = env!("CARGO_PKG_VERSION");
                println!("Compiled against library: vessel {me}");
                println!("Using library: vessel {me}");
                println!("Using API: vessel {}", s(&v["api"]));
                println!("Running hypervisor: vessel {}", s(&v["version"]));
                if daemon {
                    println!(
                        "Running against daemon: {} {}",
                        s(&v["name"]),
                        s(&v["version"])
                    );
                }
            }
        }
        VirshCommand::Capabilities => {
            // What the definitions accept: x86_64 hvm guests, kvm and qemu domain types
            // (kvm with Vessel's metadata for the Vessel VMM).
            println!(
                "<capabilities>\n  <host>\n    <cpu>\n      <arch>x86_64</arch>\n    </cpu>\n  \
                 </host>\n  <guest>\n    <os_type>hvm</os_type>\n    <arch name='x86_64'>\n      \
                 <wordsize>64</wordsize>\n      <domain type='qemu'/>\n      \
                 <domain type='kvm'/>\n    </arch>\n  </guest>\n</capabilities>"
            );
        }
        VirshCommand::Nodeinfo => {
            // The host this client runs on, which is the daemon's over its Unix socket.
            let t = crate::host_topology::read();
            kv(&[
                ("CPU model", std::env::consts::ARCH.into()),
                ("CPU(s)", t.cpus.to_string()),
                ("CPU frequency", format!("{} MHz", t.mhz)),
                ("CPU socket(s)", t.sockets.to_string()),
                ("Core(s) per socket", t.cores_per_socket.to_string()),
                ("Thread(s) per core", t.threads_per_core.to_string()),
                ("NUMA cell(s)", t.numa_cells.to_string()),
                ("Memory size", format!("{} KiB", host_memory_kib())),
            ]);
        }
        VirshCommand::PoolBuild { name } => {
            c.post(&format!("/v1/pools/{}/build", enc(&name)), None)?;
            println!("Pool {name} built");
        }
        VirshCommand::Edit { name } => return edit(c, &name),
        VirshCommand::Create {
            file,
            console,
            paused,
            validate,
        } => {
            let text = crate::cmd_manage::read_text(&file)?;
            if validate {
                crate::cmd_manage::validate_xml(&text, "domain")?;
            }
            let v = c.define_text(&text)?;
            let dom_name = s(&v["name"]);
            let q = if paused { "?paused=1" } else { "" };
            c.post(&format!("{}/start{q}", dom(&dom_name)), None)?;
            println!(
                "Domain '{dom_name}' created from {file} (defined and started: Vessel has no \
                 transient domains; `vessel undefine {dom_name}` removes it)"
            );
            if console {
                return crate::cmd_manage::attach(c, &dom_name);
            }
        }
        VirshCommand::PoolStart { name } => {
            c.get(&format!("/v1/pools/{}", enc(&name)))?;
            println!("Pool {name} started (directory pools are always active)");
        }
        VirshCommand::PoolDumpxml { name } => {
            let v = c.get(&format!("/v1/pools/{}", enc(&name)))?;
            print!("{}", manager::libvirt_xml::pool_to_xml(&v));
        }
        VirshCommand::VolDumpxml { vol: v, pool } => {
            let (pool, v) = crate::cmd_storage::locate_volume(c, &v, pool.as_deref())?;
            let info = c.get(&vol(&pool, &v))?;
            print!("{}", manager::libvirt_xml::volume_to_xml(&info));
        }
        VirshCommand::VolPath { vol: v, pool } => {
            let (pool, v) = crate::cmd_storage::locate_volume(c, &v, pool.as_deref())?;
            let info = c.get(&vol(&pool, &v))?;
            println!("{}", s(&info["path"]));
        }
        VirshCommand::NetDumpxml { name } => {
            let v = c.get(&format!("/v1/networks/{}", enc(&name)))?;
            let def: manager::network::NetworkDef =
                serde_json::from_value(v["definition"].clone())?;
            print!(
                "{}",
                manager::libvirt_xml::network_to_xml(&def, v["bridge"].as_str().unwrap_or(""))
            );
        }
        VirshCommand::NetDhcpLeases { name, mac } => {
            let v = c.get(&format!("/v1/networks/{}", enc(&name)))?;
            let leases: Vec<Value> = v["leases"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|l| {
                    mac.as_deref().is_none_or(|m| {
                        l["mac"].as_str().is_some_and(|x| x.eq_ignore_ascii_case(m))
                    })
                })
                .collect();
            if json_out {
                print_json(&Value::Array(leases));
            } else {
                // virsh's columns; the address with the network's prefix length.
                let prefix = v["definition"]["address"]
                    .as_str()
                    .and_then(|a| a.split_once('/'))
                    .map_or(String::new(), |(_, p)| format!("/{p}"));
                let rows: Vec<Vec<String>> = leases
                    .iter()
                    .map(|l| {
                        vec![
                            l["expiry"].as_i64().map_or_else(|| "-".into(), local_time),
                            s(&l["mac"]),
                            "ipv4".into(),
                            format!("{}{prefix}", s(&l["ip"])),
                            s(&l["hostname"]),
                            s(&l["client_id"]),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "Expiry Time",
                        "MAC address",
                        "Protocol",
                        "IP address",
                        "Hostname",
                        "Client ID or DUID",
                    ],
                    &rows,
                );
                println!();
            }
        }
    }
    Ok(0)
}

/// A time in seconds since the epoch as virsh prints lease expiries: local time,
/// `YYYY-MM-DD HH:MM:SS`.
fn local_time(t: i64) -> String {
    // SAFETY: libc::tm is plain integers and one pointer, for which all-zero is valid.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let secs: libc::time_t = t;
    // SAFETY: localtime_r reads `secs` and writes only into `tm`, both ours; a null
    // return means the time could not be converted.
    if unsafe { libc::localtime_r(&secs, &mut tm) }.is_null() {
        return t.to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// virsh's edit: the definition in $EDITOR (vi by default), redefined when it changed.
fn edit(c: &Client, name: &str) -> Result<i32> {
    let (def, _) = domain(c, name)?;
    let xml = String::from_utf8_lossy(
        &c.raw("GET", &format!("{}/xml?inactive=1", dom(name)), None)?
            .body,
    )
    .into_owned();
    // The XML says everything only when it reads back to the same definition (a JSON
    // definition may hold what libvirt's XML has no element for, e.g. cloud-init).
    let same = manager::xml::parse_domain(&xml)
        .ok()
        .and_then(|d| serde_json::to_value(d).ok())
        .is_some_and(|d| d["vm"] == def["vm"] && d["interfaces"] == def["interfaces"]);
    let (text, ext) = if same {
        (xml, "xml")
    } else {
        eprintln!(
            "vessel: {name}'s definition holds more than libvirt XML can say: editing its JSON"
        );
        (serde_json::to_string_pretty(&def)? + "\n", "json")
    };
    let dir = std::env::temp_dir().join(format!("vessel-edit-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(format!("{name}.{ext}"));
    std::fs::write(&file, &text)?;
    let editor = std::env::var("VISUAL")
        .or_else(|_| std::env::var("EDITOR"))
        .unwrap_or_else(|_| "vi".into());
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(&file)
        .status()
        .with_context(|| format!("running {editor}"))?;
    let edited = std::fs::read_to_string(&file)?;
    let _ = std::fs::remove_dir_all(&dir);
    if !status.success() {
        bail!("{editor} failed ({status}): the definition is unchanged");
    }
    if edited == text {
        println!("Domain '{name}' XML configuration not changed.");
        return Ok(0);
    }
    c.redefine_text(&edited)?;
    println!("Domain '{name}' XML configuration edited.");
    Ok(0)
}

/// The `<disk>` element `attach-disk --print-xml` prints, in virsh's layout: the device
/// named when `--type` was given, the driver always (Vessel's format is never guessed).
fn disk_xml(
    source: &std::path::Path,
    format: &str,
    target: &str,
    read_only: bool,
    device_given: bool,
) -> String {
    let attr = |v: &str| manager::xml::esc(v);
    let mut x = String::from("<disk type='file'");
    if device_given {
        x.push_str(" device='disk'");
    }
    x.push_str(">\n");
    x.push_str(&format!("  <driver name='qemu' type='{format}'/>\n"));
    x.push_str(&format!(
        "  <source file='{}'/>\n",
        attr(&source.to_string_lossy())
    ));
    x.push_str(&format!(
        "  <target dev='{}' bus='virtio'/>\n",
        attr(target)
    ));
    if read_only {
        x.push_str("  <readonly/>\n");
    }
    x.push_str("</disk>\n");
    x
}

/// The `<interface>` element `attach-interface --print-xml` prints, in virsh's layout.
fn interface_xml(kind: &str, source: &str, mac: Option<&str>, model_given: bool) -> String {
    let attr = |v: &str| manager::xml::esc(v);
    let mut x = format!(
        "<interface type='{}'>\n  <source {}='{}'/>\n",
        attr(kind),
        attr(kind),
        attr(source)
    );
    if let Some(m) = mac {
        x.push_str(&format!("  <mac address='{}'/>\n", attr(m)));
    }
    if model_given {
        x.push_str("  <model type='virtio'/>\n");
    }
    x.push_str("</interface>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_targets_and_memory_sizes() {
        assert_eq!(disk_target(0), "vda");
        assert_eq!(disk_target(25), "vdz");
        assert_eq!(disk_target(26), "vdaa");
        assert_eq!(memory_mib("524288").unwrap(), 512);
        assert_eq!(memory_mib("2G").unwrap(), 2048);
        assert_eq!(memory_mib("768M").unwrap(), 768);
        assert!(memory_mib("1T").is_err());
        assert!(memory_mib("x").is_err());
    }
}
