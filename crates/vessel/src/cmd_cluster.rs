//! The cluster verbs (`vessel daemon --cluster …`): hosts, their capacity and what is
//! placed on them, and drains. Any daemon of the cluster answers them from etcd.

use anyhow::Result;
use manager::client::Client;
use serde_json::{json, Value};
use vmm::api::http::percent_encode as enc;

use crate::cmd_manage::{print_json, s, table};

/// The variants name the verbs (`host-list` …), hence one prefix.
#[allow(clippy::enum_variant_names)]
#[derive(clap::Subcommand, Debug)]
pub enum ClusterCommand {
    /// List the cluster's hosts: capacity, use and maintenance; a host whose lease is
    /// gone while domains are still placed on it is listed as down.
    HostList,
    /// One host: its record, its use and the domains placed on it.
    HostInfo { host: String },
    /// Drain a host (on: its domains move to other hosts, nothing new lands there) or
    /// take it back (off).
    HostMaintenance {
        host: String,
        #[arg(value_parser = ["on", "off"])]
        mode: String,
    },
    /// Create a server group: its members (domains defined with `define --group`) go on
    /// one host (affinity) or each on a host of its own (anti-affinity).
    GroupCreate {
        name: String,
        #[arg(long, value_parser = ["affinity", "anti-affinity"])]
        policy: String,
    },
    /// List the server groups, their policy and members.
    GroupList,
    /// Delete a server group that has no members.
    GroupDelete { name: String },
    /// Started by a cluster daemon: kills the host's VMMs (under RUN_DIR) once the
    /// daemon is gone, so that they cannot run beside the copies other hosts start.
    #[command(hide = true)]
    ClusterWatchdog { run_dir: std::path::PathBuf },
}

fn row(v: &Value) -> Vec<String> {
    let h = &v["host"];
    vec![
        s(&h["name"]),
        format!("{}/{}", s(&v["used"]["vcpus"]), s(&h["vcpus"])),
        format!("{}/{}", s(&v["used"]["memory_mib"]), s(&h["memory_mib"])),
        s(&v["used"]["domains"]),
        match (v["down"] == json!(true), v["maintenance"] == json!(true)) {
            (true, true) => "down, maintenance".into(),
            (true, false) => "down".into(),
            (false, true) => "maintenance".into(),
            (false, false) => "up".into(),
        },
        s(&h["api"]),
    ]
}

const HEADERS: [&str; 6] = ["Host", "vCPUs", "Memory MiB", "Domains", "State", "API"];

pub fn run(cmd: ClusterCommand, c: &Client, json_out: bool) -> Result<i32> {
    match cmd {
        ClusterCommand::ClusterWatchdog { run_dir } => {
            let n = manager::cluster::watchdog::run(&run_dir);
            eprintln!("vessel cluster-watchdog: the daemon is gone; stopped {n} VMMs");
        }
        ClusterCommand::GroupCreate { name, policy } => {
            let v = c.post(
                "/v1/cluster/groups",
                Some(&json!({"name": name, "policy": policy})),
            )?;
            if json_out {
                print_json(&v);
            } else {
                println!("Server group '{name}' created ({policy})");
            }
        }
        ClusterCommand::GroupList => {
            let v = c.get("/v1/cluster/groups")?;
            if json_out {
                print_json(&v);
            } else {
                let rows: Vec<_> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|g| {
                        let members: Vec<String> = g["members"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|m| format!("{}@{}", s(&m["name"]), s(&m["host"])))
                            .collect();
                        vec![s(&g["name"]), s(&g["policy"]), members.join(" ")]
                    })
                    .collect();
                table(&["Group", "Policy", "Members"], &rows);
            }
        }
        ClusterCommand::GroupDelete { name } => {
            c.call(
                "DELETE",
                &format!("/v1/cluster/groups/{}", enc(&name)),
                None,
            )?;
            if json_out {
                print_json(&json!({"name": name, "deleted": true}));
            } else {
                println!("Server group '{name}' deleted");
            }
        }
        ClusterCommand::HostList => {
            let v = c.get("/v1/cluster/hosts")?;
            if json_out {
                print_json(&v);
            } else {
                let rows: Vec<_> = v.as_array().into_iter().flatten().map(row).collect();
                table(&HEADERS, &rows);
            }
        }
        ClusterCommand::HostInfo { host } => {
            let v = c.get(&format!("/v1/cluster/hosts/{}", enc(&host)))?;
            if json_out {
                print_json(&v);
            } else {
                table(&HEADERS, &[row(&v)]);
                println!();
                let rows: Vec<_> = v["domains"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|d| {
                        vec![
                            s(&d["name"]),
                            s(&d["wanted"]),
                            if d["running"] == json!(true) {
                                "running here".into()
                            } else {
                                "-".into()
                            },
                        ]
                    })
                    .collect();
                table(&["Domain", "Wanted", "Now"], &rows);
            }
        }
        ClusterCommand::HostMaintenance { host, mode } => {
            let on = mode == "on";
            let v = c.call(
                "PUT",
                &format!("/v1/cluster/hosts/{}/maintenance", enc(&host)),
                Some(&json!({ "maintenance": on })),
            )?;
            if json_out {
                print_json(&v);
            } else if on {
                println!("Host '{host}' is in maintenance");
                for m in v["moved"].as_array().into_iter().flatten() {
                    let how = match (m["how"].as_str(), m["reason"].as_str()) {
                        (Some("live"), _) => format!(
                            "live, downtime {:.1} ms",
                            m["downtime_ms"].as_f64().unwrap_or(0.0)
                        ),
                        (Some(h), Some(r)) => format!("{h}: {r}"),
                        (h, _) => h.unwrap_or("?").to_string(),
                    };
                    println!("  {} moved to {} ({how})", s(&m["domain"]), s(&m["to"]));
                }
            } else {
                println!("Host '{host}' takes domains again");
            }
        }
    }
    Ok(0)
}
