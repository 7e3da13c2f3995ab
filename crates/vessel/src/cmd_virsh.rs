//! More of virsh's verbs, with virsh's argument shapes: domain queries (`domstate`,
//! `domid`, `domblklist`, `domiflist`), host queries (`version`, `capabilities`,
//! `nodeinfo`), the XML dumps of pools, volumes and networks, and changes to a domain's
//! definition (`setmem`, `setvcpus`, `attach-disk`/`detach-disk`,
//! `attach-interface`/`detach-interface`).
//!
//! Vessel's device models have no hot-plug (of CPUs, memory, disks or interfaces): a
//! change to a running domain is refused unless `--config` asks for it in the definition,
//! where it applies from the domain's next start, as virsh's `--config` does. A domain
//! that is not running is changed in its definition with or without `--config`.

use anyhow::{bail, Context, Result};
use manager::client::Client;
use serde_json::{json, Value};
use vmm::api::http::percent_encode as enc;

use crate::cmd_manage::{dom, kv, print_json, s, table, vol};

/// Where a change applies (virsh's `--config`, `--live`, `--current`).
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct Scope {
    /// Change the definition (the domain gets it at its next start).
    #[arg(long)]
    config: bool,
    /// Change the running domain (Vessel has no hot-plug: refused while it runs).
    #[arg(long)]
    live: bool,
    /// The running domain if it runs, else its definition (the default).
    #[arg(long)]
    current: bool,
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
    Domblklist { name: String },
    /// List a domain's interfaces: TAP, type, source, model, MAC.
    Domiflist { name: String },
    /// Reset a running domain at once (the machine restarts, no guest shutdown).
    Reset { name: String },
    /// Set a domain's memory: SIZE in KiB, or with a suffix (512M, 2G).
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
        /// readonly, or nothing for read-write.
        #[arg(long)]
        mode: Option<String>,
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
    /// Print the versions of this client and of the daemon.
    Version,
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
    Create { file: String },
    /// Print a pool as libvirt pool XML.
    PoolDumpxml { name: String },
    /// Print a volume as libvirt volume XML.
    VolDumpxml {
        vol: String,
        #[arg(long)]
        pool: String,
    },
    /// Print a volume's file path.
    VolPath {
        vol: String,
        #[arg(long)]
        pool: String,
    },
    /// Print a network as libvirt network XML.
    NetDumpxml { name: String },
    /// List a network's DHCP leases.
    NetDhcpLeases { name: String },
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

/// Applies `change` to the domain's definition, as the scope allows.
fn change_definition(
    c: &Client,
    name: &str,
    scope: Scope,
    what: &str,
    change: impl FnOnce(&mut Value) -> Result<()>,
) -> Result<()> {
    let (mut def, info) = domain(c, name)?;
    let live = running(&info);
    if scope.live || (live && !scope.config) {
        bail!(
            "Vessel cannot change {what} of a running domain (no hot-plug): use --config to \
             change its definition, which applies from its next start"
        );
    }
    change(&mut def)?;
    let body = serde_json::to_vec(&def)?;
    c.raw("PUT", &dom(name), Some(("application/json", &body)))
        .with_context(|| format!("redefining {name}"))?;
    if live {
        println!("Domain '{name}': {what} changed in its definition (applies from its next start)");
    } else {
        println!("Domain '{name}': {what} changed");
    }
    Ok(())
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
        VirshCommand::Domblklist { name } => {
            let (def, _) = domain(c, &name)?;
            let disks = def["vm"]["disks"].as_array().cloned().unwrap_or_default();
            if json_out {
                print_json(&Value::Array(disks));
            } else {
                let rows: Vec<Vec<String>> = disks
                    .iter()
                    .enumerate()
                    .map(|(i, d)| vec![disk_target(i), s(&d["path"])])
                    .collect();
                table(&["Target", "Source"], &rows);
            }
        }
        VirshCommand::Domiflist { name } => {
            let (def, _) = domain(c, &name)?;
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
            }
        }
        VirshCommand::Reset { name } => {
            // The manager's reboot resets the machine (no guest shutdown): virsh's reset.
            c.post(&format!("{}/reboot", dom(&name)), None)?;
            println!("Domain '{name}' was reset");
        }
        VirshCommand::Setmem { name, size, scope } => {
            let mib = memory_mib(&size)?;
            change_definition(c, &name, scope, "the memory", |d| {
                d["vm"]["memory_mib"] = json!(mib);
                Ok(())
            })?;
        }
        VirshCommand::Setvcpus { name, count, scope } => {
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
            mode,
            scope,
        } => {
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
            change_definition(c, &name, scope, "the disks", |d| {
                let disks = d["vm"]["disks"].as_array().map_or(0, Vec::len);
                if target != disk_target(disks) {
                    bail!(
                        "target {target}: Vessel's disks appear in definition order, so the \
                         next one is {}",
                        disk_target(disks)
                    );
                }
                let disk = json!({"path": source, "format": format, "read_only": read_only});
                match d["vm"]["disks"].as_array_mut() {
                    Some(a) => a.push(disk),
                    None => d["vm"]["disks"] = json!([disk]),
                }
                Ok(())
            })?;
        }
        VirshCommand::DetachDisk {
            name,
            target,
            scope,
        } => {
            change_definition(c, &name, scope, "the disks", |d| {
                let disks = d["vm"]["disks"]
                    .as_array_mut()
                    .context("the domain has no disks")?;
                let Some(i) = (0..disks.len()).find(|&i| disk_target(i) == target) else {
                    bail!("no disk with target {target}");
                };
                disks.remove(i);
                Ok(())
            })?;
        }
        VirshCommand::AttachInterface {
            name,
            r#type,
            source,
            mac,
            model,
            scope,
        } => {
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
            change_definition(c, &name, scope, "the interfaces", |d| {
                match d["interfaces"].as_array_mut() {
                    Some(a) => a.push(iface),
                    None => d["interfaces"] = json!([iface]),
                }
                Ok(())
            })?;
        }
        VirshCommand::DetachInterface {
            name,
            r#type,
            mac,
            scope,
        } => {
            change_definition(c, &name, scope, "the interfaces", |d| {
                let ifaces = d["interfaces"]
                    .as_array_mut()
                    .context("the domain has no interfaces")?;
                let matching: Vec<usize> = (0..ifaces.len())
                    .filter(|&i| {
                        ifaces[i].get(&r#type).is_some_and(|v| !v.is_null())
                            && mac.as_deref().is_none_or(|m| {
                                ifaces[i]["mac"]
                                    .as_str()
                                    .is_some_and(|x| x.eq_ignore_ascii_case(m))
                            })
                    })
                    .collect();
                match matching.as_slice() {
                    [i] => {
                        ifaces.remove(*i);
                        Ok(())
                    }
                    [] => bail!(
                        "no {} interface{}",
                        r#type,
                        mac.map(|m| format!(" with MAC {m}")).unwrap_or_default()
                    ),
                    _ => bail!("several {} interfaces: say which with --mac", r#type),
                }
            })?;
        }
        VirshCommand::Version => {
            let v = c.get("/v1")?;
            if json_out {
                print_json(&json!({"client": env!("CARGO_PKG_VERSION"), "daemon": v}));
            } else {
                println!(
                    "Compiled against library: vessel {}",
                    env!("CARGO_PKG_VERSION")
                );
                println!("Using API: vessel {}", s(&v["api"]));
                println!(
                    "Running against daemon: {} {}",
                    s(&v["name"]),
                    s(&v["version"])
                );
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
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            kv(&[
                ("CPU model", "x86_64".into()),
                ("CPU(s)", cpus.to_string()),
                ("Memory size", format!("{} KiB", host_memory_kib())),
            ]);
        }
        VirshCommand::PoolBuild { name } => {
            c.post(&format!("/v1/pools/{}/build", enc(&name)), None)?;
            println!("Pool {name} built");
        }
        VirshCommand::Edit { name } => return edit(c, &name),
        VirshCommand::Create { file } => {
            let text = crate::cmd_manage::read_text(&file)?;
            let v = c.define_text(&text)?;
            let dom_name = s(&v["name"]);
            c.post(&format!("{}/start", dom(&dom_name)), None)?;
            println!(
                "Domain '{dom_name}' created from {file} (defined and started: Vessel has no \
                 transient domains; `vessel undefine {dom_name}` removes it)"
            );
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
            let info = c.get(&vol(&pool, &v))?;
            print!("{}", manager::libvirt_xml::volume_to_xml(&info));
        }
        VirshCommand::VolPath { vol: v, pool } => {
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
        VirshCommand::NetDhcpLeases { name } => {
            let v = c.get(&format!("/v1/networks/{}", enc(&name)))?;
            let leases = v["leases"].as_array().cloned().unwrap_or_default();
            if json_out {
                print_json(&Value::Array(leases));
            } else {
                let rows: Vec<Vec<String>> = leases
                    .iter()
                    .map(|l| vec![s(&l["mac"]), s(&l["ip"]), s(&l["hostname"])])
                    .collect();
                table(&["MAC address", "IP address", "Hostname"], &rows);
            }
        }
    }
    Ok(0)
}

/// virsh's edit: the definition in $EDITOR (vi by default), redefined when it changed.
fn edit(c: &Client, name: &str) -> Result<i32> {
    let (def, _) = domain(c, name)?;
    let xml = String::from_utf8_lossy(&c.raw("GET", &format!("{}/xml", dom(name)), None)?.body)
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
