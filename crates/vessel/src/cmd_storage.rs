//! The manager CLI's storage verbs (`pool-*`, `vol-*`, named as virsh names them):
//! libvirt pool and volume XML or flags, and volume data uploads and downloads, against
//! the daemon's REST API.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use manager::client::Client;
use serde_json::{json, Value};

use crate::cmd_img::parse_size;
use crate::cmd_manage::{kv, print_json, read_text, s, size_text, table, vol};
use vmm::api::http::percent_encode as enc;

/// Storage pool and volume verbs.
#[derive(clap::Subcommand, Debug)]
pub enum StorageCommand {
    /// Define a directory storage pool from libvirt pool XML (`pool-define FILE`), or
    /// as NAME PATH (virsh's pool-define-as).
    #[command(alias = "pool-define-as")]
    PoolDefine {
        /// A libvirt pool XML file ('-' reads stdin), or the pool's name with PATH.
        name: String,
        /// virsh's pool type (`dir`, with --target), or the pool's folder.
        #[arg(id = "type")]
        path: Option<String>,
        /// The pool's folder (virsh's pool-define-as NAME dir --target PATH).
        #[arg(long)]
        target: Option<PathBuf>,
        /// Create the folder if it does not exist.
        #[arg(long)]
        build: bool,
        /// Check the XML against libvirt's schema first (virt-xml-validate).
        #[arg(long)]
        validate: bool,
        /// pool-define-as: print the pool's XML instead of defining it.
        #[arg(long, conflicts_with_all = ["build", "validate"])]
        print_xml: bool,
    },
    /// List storage pools as virsh does: Name, State, Autostart (a directory pool is
    /// active whenever the daemon runs); --details adds Persistent, Capacity, Allocation
    /// and Available. `pool-info` shows a pool's folder.
    PoolList {
        /// Every pool (they are all active).
        #[arg(long)]
        all: bool,
        /// Only inactive pools: none.
        #[arg(long, conflicts_with = "all")]
        inactive: bool,
        #[arg(long)]
        details: bool,
        /// Print only names, one a line.
        #[arg(long, conflicts_with = "uuid")]
        name: bool,
        /// Print only UUIDs, one a line.
        #[arg(long)]
        uuid: bool,
    },
    /// Show a pool's path and space.
    PoolInfo { name: String },
    /// Forget a pool (its folder and files stay).
    PoolUndefine { name: String },
    /// Create a volume from libvirt volume XML (`vol-create POOL FILE`), as POOL NAME
    /// SIZE (virsh's vol-create-as; SIZE like 10G or 512M), or as POOL NAME --from IMAGE:
    /// a local disk image imported with its size and its own format (raw or qcow2; a
    /// qcow2's backing chain is read through, so the volume stands alone).
    #[command(alias = "vol-create-as")]
    VolCreate {
        pool: String,
        /// A libvirt volume XML file ('-' reads stdin), or the volume's name with SIZE or
        /// --from.
        name: String,
        #[arg(conflicts_with = "from")]
        size: Option<String>,
        /// The volume's format: qcow2 (default) or raw; with --from, the image's format.
        #[arg(long)]
        format: Option<String>,
        /// A disk image file to import as the new volume.
        #[arg(long)]
        from: Option<PathBuf>,
        /// Check the XML against libvirt's schema first (virt-xml-validate).
        #[arg(long)]
        validate: bool,
    },
    /// List a pool's volumes.
    VolList { pool: String },
    /// Show a volume's format, capacity and allocation.
    ///
    /// As virsh: `vol-info VOL --pool POOL`, or `vol-info PATH`; or POOL VOL.
    VolInfo { pool: String, name: Option<String> },
    /// Clone a volume: a qcow2 overlay on it (default) or a full copy (--copy).
    VolClone {
        pool: String,
        source: String,
        name: String,
        #[arg(long)]
        copy: bool,
        /// Format of a full copy (default: the source's).
        #[arg(long)]
        format: Option<String>,
    },
    /// Grow a volume to SIZE (shrinking is refused).
    VolResize {
        pool: String,
        name: String,
        size: String,
    },
    /// Delete a volume (refused while a domain uses it).
    ///
    /// As virsh: `vol-delete VOL --pool POOL`, or `vol-delete PATH`; or POOL VOL.
    VolDelete { pool: String, name: Option<String> },
    /// Write a local file's bytes into a volume (its guest-visible content).
    VolUpload {
        pool: String,
        name: String,
        file: PathBuf,
    },
    /// Save a volume's guest-visible content to a local (raw) file.
    VolDownload {
        pool: String,
        name: String,
        file: PathBuf,
    },
}

/// Runs one storage verb against the daemon.
pub fn run(cmd: StorageCommand, c: &Client, json_out: bool) -> Result<i32> {
    match cmd {
        StorageCommand::PoolDefine {
            name,
            path,
            target,
            build,
            validate,
            print_xml,
        } => {
            if print_xml && target.is_none() && path.is_none() {
                bail!("--print-xml is pool-define-as's: give NAME dir --target PATH");
            }
            let (name, path, uuid, permissions) = if let Some(t) = target {
                dir_type(path.as_deref())?;
                (name, t, None, None)
            } else if let Some(p) = path {
                if POOL_TYPES.contains(&p.as_str()) {
                    dir_type(Some(&p))?;
                    bail!("pool-define-as {name} dir needs --target PATH: the pool's folder");
                }
                (name, PathBuf::from(p), None, None)
            } else {
                let text = read_text(&name)?;
                if validate {
                    crate::cmd_manage::validate_xml(&text, "storagepool")?;
                }
                manager::libvirt_xml::pool_from_xml(&text)?
            };
            let path = if path.is_absolute() {
                path
            } else {
                std::env::current_dir()?.join(path)
            };
            if print_xml {
                let esc = manager::xml::esc;
                print!(
                    "<pool type='dir'>\n  <name>{}</name>\n  <target>\n    <path>{}</path>\n  \
                     </target>\n</pool>\n",
                    esc(&name),
                    esc(&path.to_string_lossy())
                );
                return Ok(0);
            }
            let v = c.post(
                "/v1/pools",
                Some(
                    &json!({"name": name, "path": path, "create": build, "uuid": uuid,
                            "permissions": permissions}),
                ),
            )?;
            if json_out {
                print_json(&v);
            } else {
                println!("Pool '{name}' defined on {}", s(&v["path"]));
            }
        }
        StorageCommand::PoolList {
            all: _,
            inactive,
            details,
            name,
            uuid,
        } => {
            let v = c.get("/v1/pools")?;
            // A directory pool is active whenever the daemon runs.
            let list: Vec<&Value> = v
                .as_array()
                .into_iter()
                .flatten()
                .filter(|_| !inactive)
                .collect();
            if json_out {
                print_json(&Value::Array(list.into_iter().cloned().collect()));
            } else if name || uuid {
                let key = if name { "name" } else { "uuid" };
                for p in &list {
                    println!("{}", s(&p[key]));
                }
                println!();
            } else {
                let n = |p: &Value, k: &str| p[k].as_u64().unwrap_or(0);
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|p| {
                        let mut r = vec![s(&p["name"]), "active".into(), "yes".into()];
                        if details {
                            r.extend([
                                "yes".into(),
                                size_text(n(p, "capacity")),
                                size_text(n(p, "capacity").saturating_sub(n(p, "available"))),
                                size_text(n(p, "available")),
                            ]);
                        }
                        r
                    })
                    .collect();
                if details {
                    table(
                        &[
                            "Name",
                            "State",
                            "Autostart",
                            "Persistent",
                            "Capacity",
                            "Allocation",
                            "Available",
                        ],
                        &rows,
                    );
                } else {
                    table(&["Name", "State", "Autostart"], &rows);
                }
                println!();
            }
        }
        StorageCommand::PoolInfo { name } => {
            let v = c.get(&format!("/v1/pools/{}", enc(&name)))?;
            if json_out {
                print_json(&v);
            } else {
                kv(&[
                    ("Name", s(&v["name"])),
                    ("Path", s(&v["path"])),
                    ("Volumes", s(&v["volumes"])),
                    ("Capacity", size_text(v["capacity"].as_u64().unwrap_or(0))),
                    ("Available", size_text(v["available"].as_u64().unwrap_or(0))),
                ]);
            }
        }
        StorageCommand::PoolUndefine { name } => {
            c.call("DELETE", &format!("/v1/pools/{}", enc(&name)), None)?;
            if !json_out {
                println!("Pool '{name}' has been undefined");
            }
        }
        StorageCommand::VolCreate {
            pool,
            name,
            size: _,
            format,
            from: Some(image),
            validate: _,
        } => {
            let (cap, format) = import_volume(c, &pool, &name, &image, format)?;
            if json_out {
                print_json(&c.get(&vol(&pool, &name))?);
            } else {
                println!(
                    "Vol {name} created ({format}, {}) from {}",
                    size_text(cap),
                    image.display()
                );
            }
        }
        StorageCommand::VolCreate {
            pool,
            name,
            size,
            format,
            from: None,
            validate,
        } => {
            let (name, cap, format, permissions) = match size {
                Some(size) => (
                    name,
                    parse_size(&size)?,
                    format.unwrap_or_else(|| "qcow2".into()),
                    None,
                ),
                None => {
                    let text = read_text(&name)?;
                    if validate {
                        crate::cmd_manage::validate_xml(&text, "storagevol")?;
                    }
                    manager::libvirt_xml::volume_from_xml(&text)?
                }
            };
            let v = c.post(
                &format!("/v1/pools/{}/volumes", enc(&pool)),
                Some(&json!({"name": name, "capacity": cap, "format": format,
                             "permissions": permissions})),
            )?;
            if json_out {
                print_json(&v);
            } else {
                println!("Vol {name} created ({format}, {})", size_text(cap));
            }
        }
        StorageCommand::VolList { pool } => {
            let v = c.get(&format!("/v1/pools/{}/volumes", enc(&pool)))?;
            if json_out {
                print_json(&v);
            } else {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|x| {
                        vec![
                            s(&x["name"]),
                            s(&x["format"]),
                            size_text(x["capacity"].as_u64().unwrap_or(0)),
                            size_text(x["allocation"].as_u64().unwrap_or(0)),
                            s(&x["path"]),
                        ]
                    })
                    .collect();
                table(&["Name", "Format", "Capacity", "Allocation", "Path"], &rows);
            }
        }
        StorageCommand::VolInfo { pool, name } => {
            let (pool, name) = pool_and_volume(c, pool, name)?;
            let v = c.get(&vol(&pool, &name))?;
            if json_out {
                print_json(&v);
            } else {
                vol_kv(&v);
            }
        }
        StorageCommand::VolClone {
            pool,
            source,
            name,
            copy,
            format,
        } => {
            let mut body = json!({"name": name, "mode": if copy { "copy" } else { "overlay" }});
            if let Some(f) = format {
                body["format"] = json!(f);
            }
            let v = c.post(&format!("{}/clone", vol(&pool, &source)), Some(&body))?;
            if json_out {
                print_json(&v);
            } else {
                println!("Vol {name} cloned from {source}");
            }
        }
        StorageCommand::VolResize { pool, name, size } => {
            let cap = parse_size(&size)?;
            let v = c.post(
                &format!("{}/resize", vol(&pool, &name)),
                Some(&json!({"capacity": cap})),
            )?;
            if json_out {
                print_json(&v);
            } else {
                println!(
                    "Size of volume '{name}' successfully changed to {}",
                    size_text(cap)
                );
            }
        }
        StorageCommand::VolDelete { pool, name } => {
            let (pool, name) = pool_and_volume(c, pool, name)?;
            c.call("DELETE", &vol(&pool, &name), None)?;
            if !json_out {
                println!("Vol {name} deleted");
            }
        }
        StorageCommand::VolUpload { pool, name, file } => {
            let mut f = std::fs::File::open(&file)
                .with_context(|| format!("opening {}", file.display()))?;
            let len = f.metadata()?.len();
            let pb = progress(len, "uploading");
            let mut buf = vec![0u8; CHUNK as usize];
            let mut off = 0u64;
            loop {
                let n = read_full(&mut f, &mut buf)?;
                if n == 0 {
                    break;
                }
                c.raw(
                    "PUT",
                    &format!("{}/data?offset={off}", vol(&pool, &name)),
                    Some(("application/octet-stream", &buf[..n])),
                )?;
                off += n as u64;
                pb.set_position(off);
            }
            pb.finish_and_clear();
            if !json_out {
                println!("Uploaded {} into {pool}/{name}", size_text(off));
            }
        }
        StorageCommand::VolDownload { pool, name, file } => {
            let cap = c.get(&vol(&pool, &name))?["capacity"].as_u64().unwrap_or(0);
            let mut f = std::fs::File::create(&file)
                .with_context(|| format!("creating {}", file.display()))?;
            let pb = progress(cap, "downloading");
            let mut off = 0u64;
            while off < cap {
                let r = c.raw(
                    "GET",
                    &format!("{}/data?offset={off}&length={CHUNK}", vol(&pool, &name)),
                    None,
                )?;
                if r.body.is_empty() {
                    break;
                }
                f.write_all(&r.body)?;
                off += r.body.len() as u64;
                pb.set_position(off);
            }
            pb.finish_and_clear();
            if !json_out {
                println!("Downloaded {} from {pool}/{name}", size_text(off));
            }
        }
    }
    Ok(0)
}

fn vol_kv(v: &Value) {
    kv(&[
        ("Name", s(&v["name"])),
        ("Pool", s(&v["pool"])),
        ("Path", s(&v["path"])),
        ("Format", s(&v["format"])),
        ("Capacity", size_text(v["capacity"].as_u64().unwrap_or(0))),
        (
            "Allocation",
            size_text(v["allocation"].as_u64().unwrap_or(0)),
        ),
        ("Backing file", s(&v["backing_file"])),
        (
            "Used by",
            v["used_by"]
                .as_array()
                .map(|a| a.iter().map(s).collect::<Vec<_>>().join(", "))
                .filter(|x| !x.is_empty())
                .unwrap_or_else(|| "-".into()),
        ),
    ]);
}

/// A progress bar on a terminal, nothing otherwise.
fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    if let Ok(st) =
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({eta})")
    {
        pb.set_style(st.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb
}

const CHUNK: u64 = 8 << 20;

/// `vol-create POOL NAME --from IMAGE`: a volume of the image's size in its format (or
/// `format`), filled with the image's guest-visible content. Ranges the image reports
/// as zeros, and chunks that read as all zeros, are not sent: the new volume is sparse
/// where the image is. Returns the capacity and the format.
fn import_volume(
    c: &Client,
    pool: &str,
    name: &str,
    image: &Path,
    format: Option<String>,
) -> Result<(u64, String)> {
    let probed = block::probe(image).with_context(|| format!("reading {}", image.display()))?;
    let mut src = block::open(image, Some(probed), true)
        .with_context(|| format!("opening {} as {probed}", image.display()))?;
    let cap = src.size();
    let format = format.unwrap_or_else(|| probed.to_string());
    c.post(
        &format!("/v1/pools/{}/volumes", enc(pool)),
        Some(&json!({"name": name, "capacity": cap, "format": format})),
    )?;
    let pb = progress(cap, "importing");
    let copied = copy_into_volume(c, pool, name, image, src.as_mut(), &pb);
    pb.finish_and_clear();
    if let Err(e) = copied {
        // No half-imported volume is left behind.
        let _ = c.call("DELETE", &vol(pool, name), None);
        return Err(e);
    }
    Ok((cap, format))
}

fn copy_into_volume(
    c: &Client,
    pool: &str,
    name: &str,
    image: &Path,
    src: &mut dyn block::BlockBackend,
    pb: &indicatif::ProgressBar,
) -> Result<()> {
    let cap = src.size();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut off = 0u64;
    while off < cap {
        let want = (cap - off).min(CHUNK);
        let (status, run) = src
            .block_status(off, want)
            .with_context(|| format!("reading {} at {off}", image.display()))?;
        let n = run.clamp(1, want);
        if status == block::BlockStatus::Data {
            let chunk = &mut buf[..n as usize];
            src.read_at(off, chunk)
                .with_context(|| format!("reading {} at {off}", image.display()))?;
            if chunk.iter().any(|&b| b != 0) {
                c.raw(
                    "PUT",
                    &format!("{}/data?offset={off}", vol(pool, name)),
                    Some(("application/octet-stream", chunk)),
                )?;
            }
        }
        off += n;
        pb.set_position(off);
    }
    Ok(())
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The (pool, volume) of a verb given POOL VOL (or virsh's VOL --pool POOL, which its
/// argument shapes turn into that), or one word: a volume's path, or its name when one
/// pool alone has a volume of that name (virsh's vol-name-or-key-or-path).
fn pool_and_volume(c: &Client, first: String, second: Option<String>) -> Result<(String, String)> {
    match second {
        Some(v) => Ok((first, v)),
        None => locate_volume(c, &first, None),
    }
}

/// Where the volume `vol` is: in `pool` when given, else the pool holding a volume with
/// that path or, failing that, the only pool with a volume of that name.
pub(crate) fn locate_volume(c: &Client, vol: &str, pool: Option<&str>) -> Result<(String, String)> {
    if let Some(p) = pool {
        return Ok((p.to_string(), vol.to_string()));
    }
    let pools = c.get("/v1/pools")?;
    let mut by_name = Vec::new();
    for p in pools.as_array().into_iter().flatten() {
        let Some(pname) = p["name"].as_str() else {
            continue;
        };
        let vols = c.get(&format!("/v1/pools/{}/volumes", enc(pname)))?;
        for v in vols.as_array().into_iter().flatten() {
            let name = s(&v["name"]);
            if v["path"].as_str() == Some(vol) {
                return Ok((pname.to_string(), name));
            }
            if name == vol {
                by_name.push(pname.to_string());
            }
        }
    }
    match by_name.as_slice() {
        [p] => Ok((p.clone(), vol.to_string())),
        [] => bail!("failed to get vol '{vol}': no storage volume with matching path or name"),
        many => bail!(
            "failed to get vol '{vol}': pools {} each have one by that name; give --pool",
            many.join(", ")
        ),
    }
}

/// libvirt's storage pool types (virsh pool-define-as NAME TYPE).
const POOL_TYPES: [&str; 14] = [
    "dir",
    "fs",
    "netfs",
    "logical",
    "disk",
    "iscsi",
    "iscsi-direct",
    "scsi",
    "mpath",
    "rbd",
    "sheepdog",
    "gluster",
    "zfs",
    "vstorage",
];

/// Checks pool-define-as's TYPE word is `dir` (or absent); another libvirt type is
/// refused by name.
fn dir_type(ty: Option<&str>) -> Result<()> {
    match ty {
        None | Some("dir") => Ok(()),
        Some(t) if POOL_TYPES.contains(&t) => bail!(
            "unsupported configuration: pool type '{t}': Vessel's storage pools are directories \
             (type 'dir')"
        ),
        Some(t) => bail!("pool-define-as takes a pool type (dir) with --target PATH, not {t:?}"),
    }
}
