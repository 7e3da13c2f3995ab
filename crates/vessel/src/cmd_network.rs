//! The manager CLI's network verbs (`net-*`, named as virsh names them): libvirt network
//! XML or flags, against the daemon's REST API.

use anyhow::{bail, Result};
use manager::client::Client;
use serde_json::{json, Value};

use crate::cmd_manage::{kv, print_json, read_text, s, table};
use vmm::api::http::percent_encode as enc;

/// Network verbs.
#[derive(clap::Subcommand, Debug)]
#[allow(clippy::enum_variant_names)] // the variants are virsh's verb names (net-define …)
pub enum NetCommand {
    /// Define a network from libvirt network XML (virsh's form: `net-define FILE`), or
    /// from flags: NAME --address ADDRESS (CIDR) [--dhcp …] — a bridge, DHCP, NAT.
    NetDefine {
        /// A libvirt network XML file ('-' reads stdin), or the name with --address.
        name: String,
        /// The host's address on the network, e.g. 192.168.100.1/24 (the flag form).
        #[arg(long)]
        address: Option<String>,
        /// DHCP range START,END.
        #[arg(long)]
        dhcp: Option<String>,
        /// A fixed lease MAC,IP (repeatable).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// No NAT to the host's uplink.
        #[arg(long)]
        no_nat: bool,
        /// Bridge device name (default vbr-NAME).
        #[arg(long)]
        bridge: Option<String>,
        /// In a cluster: join this network's bridges on all hosts with a VXLAN overlay of
        /// this VNI (define the network alike on each host); the cluster then allocates
        /// its guests' addresses. See docs/CLUSTER.md.
        #[arg(long)]
        vni: Option<u32>,
        /// Check the XML against libvirt's schema first (virt-xml-validate).
        #[arg(long)]
        validate: bool,
    },
    /// List networks as virsh does: Name, State, Autostart, Persistent (active ones;
    /// --all for every one). `net-info` shows a network's bridge and address.
    NetList {
        #[arg(long)]
        all: bool,
        /// Only the networks that are not active.
        #[arg(long, conflicts_with = "all")]
        inactive: bool,
        /// Print only names, one a line.
        #[arg(long, conflicts_with = "uuid")]
        name: bool,
        /// Print only UUIDs, one a line.
        #[arg(long)]
        uuid: bool,
    },
    /// Show a network's definition, state and DHCP leases.
    NetInfo { name: String },
    /// Bring a network up (bridge, NAT, dnsmasq).
    NetStart { name: String },
    /// Take a network down.
    NetDestroy { name: String },
    /// Forget a network (it must be down).
    NetUndefine { name: String },
    /// Start a network when the daemon starts (--disable to stop doing so).
    NetAutostart {
        name: String,
        #[arg(long)]
        disable: bool,
    },
}

/// Runs one network verb against the daemon.
pub fn run(cmd: NetCommand, c: &Client, json_out: bool) -> Result<i32> {
    match cmd {
        NetCommand::NetDefine {
            name,
            address: None,
            validate,
            ..
        } => {
            let text = read_text(&name)?;
            if validate {
                crate::cmd_manage::validate_xml(&text, "network")?;
            }
            let def = manager::libvirt_xml::network_from_xml(&text)?;
            let v = c.post("/v1/networks", Some(&serde_json::to_value(&def)?))?;
            if json_out {
                print_json(&v);
            } else {
                println!("Network {} defined from {name}", def.name);
            }
        }
        NetCommand::NetDefine {
            name,
            address: Some(address),
            dhcp,
            hosts,
            no_nat,
            bridge,
            vni,
            validate,
        } => {
            if validate {
                bail!("--validate checks libvirt network XML: give net-define an XML file");
            }
            let mut body = json!({"name": name, "address": address, "nat": !no_nat});
            if let Some(b) = bridge {
                body["bridge"] = json!(b);
            }
            if let Some(v) = vni {
                body["vni"] = json!(v);
            }
            if let Some(r) = dhcp {
                let Some((a, b)) = r.split_once(',') else {
                    bail!("--dhcp wants START,END (e.g. 192.168.100.10,192.168.100.99)");
                };
                body["dhcp"] = json!({"start": a.trim(), "end": b.trim()});
            }
            let mut hs = Vec::new();
            for h in hosts {
                let Some((m, ip)) = h.split_once(',') else {
                    bail!("--host wants MAC,IP (e.g. 52:54:00:00:00:01,192.168.100.5)");
                };
                hs.push(json!({"mac": m.trim(), "ip": ip.trim()}));
            }
            body["hosts"] = json!(hs);
            let v = c.post("/v1/networks", Some(&body))?;
            if json_out {
                print_json(&v);
            } else {
                println!("Network {name} defined (bridge {})", s(&v["bridge"]));
            }
        }
        NetCommand::NetList {
            all,
            inactive,
            name,
            uuid,
        } => {
            let v = c.get("/v1/networks")?;
            let list: Vec<&Value> = v
                .as_array()
                .into_iter()
                .flatten()
                .filter(|n| all || (n["active"] == true) != inactive)
                .collect();
            if json_out {
                print_json(&Value::Array(list.into_iter().cloned().collect()));
            } else if name || uuid {
                let key = if name { "name" } else { "uuid" };
                for n in &list {
                    println!("{}", s(&n["definition"][key]));
                }
                println!();
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|n| {
                        vec![
                            s(&n["definition"]["name"]),
                            if n["active"] == true {
                                "active"
                            } else {
                                "inactive"
                            }
                            .into(),
                            if n["definition"]["autostart"] == true {
                                "yes"
                            } else {
                                "no"
                            }
                            .into(),
                            // Every Vessel network is defined (persistent).
                            "yes".into(),
                        ]
                    })
                    .collect();
                table(&["Name", "State", "Autostart", "Persistent"], &rows);
                println!();
            }
        }
        NetCommand::NetInfo { name } => {
            let v = c.get(&format!("/v1/networks/{}", enc(&name)))?;
            if json_out {
                print_json(&v);
            } else {
                let d = &v["definition"];
                kv(&[
                    ("Name", s(&d["name"])),
                    (
                        "Active",
                        if v["active"] == true { "yes" } else { "no" }.into(),
                    ),
                    ("Bridge", s(&v["bridge"])),
                    ("Address", s(&d["address"])),
                    ("NAT", if d["nat"] == true { "yes" } else { "no" }.into()),
                    (
                        "DHCP",
                        d["dhcp"]
                            .as_object()
                            .map(|r| format!("{}-{}", s(&r["start"]), s(&r["end"])))
                            .unwrap_or_else(|| "-".into()),
                    ),
                ]);
                for l in v["leases"].as_array().into_iter().flatten() {
                    println!("Lease:     {} {}", s(&l["mac"]), s(&l["ip"]));
                }
            }
        }
        NetCommand::NetStart { name } => {
            let v = c.post(&format!("/v1/networks/{}/start", enc(&name)), None)?;
            if json_out {
                print_json(&v);
            } else {
                println!("Network {name} started");
            }
        }
        NetCommand::NetDestroy { name } => {
            let v = c.post(&format!("/v1/networks/{}/stop", enc(&name)), None)?;
            if json_out {
                print_json(&v);
            } else {
                println!("Network {name} destroyed");
            }
        }
        NetCommand::NetUndefine { name } => {
            c.call("DELETE", &format!("/v1/networks/{}", enc(&name)), None)?;
            if !json_out {
                println!("Network {name} has been undefined");
            }
        }
        NetCommand::NetAutostart { name, disable } => {
            let v = c.call(
                "PUT",
                &format!("/v1/networks/{}/autostart", enc(&name)),
                Some(&json!({"autostart": !disable})),
            )?;
            if json_out {
                print_json(&v);
            } else if disable {
                println!("Network {name} unmarked as autostarted");
            } else {
                println!("Network {name} marked as autostarted");
            }
        }
    }
    Ok(0)
}
