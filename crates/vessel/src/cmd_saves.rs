//! The manager CLI's verbs that keep or move a running domain's state (named as virsh
//! names them): save, restore, managedsave, snapshot-*, migrate.

use std::path::PathBuf;

use anyhow::{Context, Result};
use manager::client::Client;
use serde_json::json;

use crate::cmd_manage::{dom, print_json, s};
use vmm::api::http::percent_encode as enc;

/// Save, snapshot and migration verbs.
#[derive(clap::Subcommand, Debug)]
pub enum SaveCommand {
    /// Save a running domain's state into the new folder FILE and stop it (snapshot of
    /// its memory and devices; `restore FILE` brings it back).
    Save { name: String, file: PathBuf },
    /// Start a domain from the state `save` left in FILE.
    Restore { file: PathBuf },
    /// Save a running domain's state where the daemon keeps it, and stop it; its
    /// next `start` (or autostart) restores it.
    Managedsave { name: String },
    /// Drop a domain's managed save: its next start boots it.
    ManagedsaveRemove { name: String },
    /// Take a named snapshot of a domain: its memory and devices (when it runs)
    /// and its raw disks; it goes on running.
    SnapshotCreateAs {
        name: String,
        snapshot: String,
        #[arg(long)]
        description: Option<String>,
    },
    /// List a domain's snapshots.
    SnapshotList { name: String },
    /// Put a domain back as it was at a snapshot (stopping it first).
    SnapshotRevert { name: String, snapshot: String },
    /// Delete a domain's snapshot.
    SnapshotDelete { name: String, snapshot: String },
    /// Move a running domain to another daemon (DEST: its API socket) while it
    /// runs; its definition goes with it (defined there, kept here shut off unless
    /// --undefinesource).
    Migrate {
        name: String,
        /// The destination daemon's API socket, or `tcp://HOST:PORT` (its --listen-tcp,
        /// with --dest-token-file): the stream then goes over TCP too. In a cluster,
        /// leave it out: --to HOST, or placement picks the host.
        #[arg(required_unless_present_any = ["to", "live"])]
        dest: Option<String>,
        /// In a cluster: the host to move to (without it, placement picks one).
        #[arg(long, conflicts_with = "dest")]
        to: Option<String>,
        /// The file holding the destination daemon's TCP token.
        #[arg(long)]
        dest_token_file: Option<PathBuf>,
        /// Live migration (the guest runs during the copy): the only kind implemented.
        #[arg(long)]
        live: bool,
        /// Undefine the domain here once it runs at the destination.
        #[arg(long)]
        undefinesource: bool,
        /// Refuse unless the migration goes over TLS (both daemons started with
        /// --tls-cacert, --tls-cert and --tls-key, a tcp:// destination), as virsh's
        /// `migrate --tls`: never sent in clear.
        #[arg(long)]
        tls: bool,
    },
}

/// Runs one save, snapshot or migration verb against the daemon.
pub fn run(cmd: SaveCommand, c: &Client, json_out: bool) -> Result<i32> {
    match cmd {
        SaveCommand::Save { name, file } => {
            let path = std::path::absolute(&file)
                .with_context(|| format!("resolving {}", file.display()))?;
            let v = c.post(
                &format!("{}/save", dom(&name)),
                Some(&json!({ "path": path })),
            )?;
            if json_out {
                print_json(&v);
            } else {
                println!("Domain '{name}' saved to {}", path.display());
            }
        }
        SaveCommand::Migrate {
            name,
            dest: None,
            to,
            live,
            tls,
            ..
        } => {
            if tls {
                anyhow::bail!(
                    "--tls: a cluster migration's stream goes as the hosts' daemons are set up; \
                     give the destination (tcp://HOST:PORT) to require TLS"
                );
            }
            // A cluster domain: its host's daemon picks or checks the destination host.
            let v = c.post(
                &format!("{}/migrate", dom(&name)),
                Some(&json!({ "live": live, "to": to })),
            )?;
            if json_out {
                print_json(&v);
            } else {
                println!(
                    "Domain '{name}' migrated from host {} to host {} (downtime {:.1} ms, total {:.1} ms, {} rounds)",
                    v["from"].as_str().unwrap_or("?"),
                    v["to"].as_str().unwrap_or("?"),
                    v["downtime_ms"].as_f64().unwrap_or(0.0),
                    v["total_ms"].as_f64().unwrap_or(0.0),
                    v["rounds"].as_u64().unwrap_or(0)
                );
            }
        }
        SaveCommand::Migrate {
            name,
            dest: Some(dest),
            dest_token_file,
            live,
            undefinesource,
            tls,
            ..
        } => {
            let dest = if dest.starts_with("tcp://") {
                dest
            } else {
                std::path::absolute(&dest)
                    .with_context(|| format!("resolving {dest}"))?
                    .display()
                    .to_string()
            };
            let token = match &dest_token_file {
                Some(f) => Some(
                    std::fs::read_to_string(f)
                        .with_context(|| format!("reading the token file {}", f.display()))?
                        .trim()
                        .to_string(),
                ),
                None => None,
            };
            let v = c.post(
                &format!("{}/migrate", dom(&name)),
                Some(&json!({ "dest": dest, "dest_token": token, "live": live,
                              "undefine_source": undefinesource, "tls": tls })),
            )?;
            if json_out {
                print_json(&v);
            } else {
                println!(
                    "Domain '{name}' migrated to {dest} (downtime {:.1} ms, total {:.1} ms, {} rounds)",
                    v["downtime_ms"].as_f64().unwrap_or(0.0),
                    v["total_ms"].as_f64().unwrap_or(0.0),
                    v["rounds"].as_u64().unwrap_or(0)
                );
            }
        }
        SaveCommand::Managedsave { name } => {
            let v = c.post(&format!("{}/managedsave", dom(&name)), None)?;
            if json_out {
                print_json(&v);
            } else {
                println!("Domain '{name}' state saved by the daemon");
            }
        }
        SaveCommand::SnapshotCreateAs {
            name,
            snapshot,
            description,
        } => {
            let v = c.post(
                &format!("{}/snapshots", dom(&name)),
                Some(&json!({ "name": snapshot, "description": description })),
            )?;
            if json_out {
                print_json(&v);
            } else {
                println!("Domain snapshot {snapshot} created");
            }
        }
        SaveCommand::SnapshotList { name } => {
            let v = c.get(&format!("{}/snapshots", dom(&name)))?;
            if json_out {
                print_json(&v);
            } else {
                println!(" {:<20} {:<22} State", "Name", "Creation Time");
                println!("{}", "-".repeat(56));
                for s in v.as_array().into_iter().flatten() {
                    println!(
                        " {:<20} {:<22} {}",
                        s["name"].as_str().unwrap_or(""),
                        s["created"].as_u64().unwrap_or(0),
                        s["state"].as_str().unwrap_or("")
                    );
                }
            }
        }
        SaveCommand::SnapshotRevert { name, snapshot } => {
            let v = c.post(
                &format!("{}/snapshots/{}/revert", dom(&name), enc(&snapshot)),
                None,
            )?;
            if json_out {
                print_json(&v);
            } else {
                println!("Domain '{name}' reverted to snapshot {snapshot}");
            }
        }
        SaveCommand::SnapshotDelete { name, snapshot } => {
            c.call(
                "DELETE",
                &format!("{}/snapshots/{}", dom(&name), enc(&snapshot)),
                None,
            )?;
            println!("Domain snapshot {snapshot} deleted");
        }
        SaveCommand::ManagedsaveRemove { name } => {
            let v = c.call("DELETE", &format!("{}/managedsave", dom(&name)), None)?;
            if json_out {
                print_json(&v);
            } else {
                println!("Removed managedsave image for domain '{name}'");
            }
        }
        SaveCommand::Restore { file } => {
            let path = std::path::absolute(&file)
                .with_context(|| format!("resolving {}", file.display()))?;
            let v = c.post("/v1/restore", Some(&json!({ "path": path })))?;
            if json_out {
                print_json(&v);
            } else {
                println!(
                    "Domain '{}' restored from {}",
                    s(&v["name"]),
                    path.display()
                );
            }
        }
    }
    Ok(0)
}
