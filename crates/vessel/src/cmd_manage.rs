//! `vessel daemon` and the manager's CLI verbs (named as virsh names them): clients of the
//! daemon's REST API, printing tables by default and JSON with `--json`.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use manager::client::Client;
use serde_json::{json, Value};
use vmm::api::http::percent_encode as enc;

/// Options every manager verb takes.
#[derive(clap::Args, Debug, Clone)]
pub struct GlobalOpts {
    /// The daemon's socket (default: /run/vessel/vessel.sock as root, else
    /// $XDG_RUNTIME_DIR/vessel/vessel.sock), or tcp://HOST:PORT with $VESSEL_TOKEN.
    #[arg(long, global = true, env = "VESSEL_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// TLS on tcp://: the CA (PEM) the daemons' certificates chain to. For `vessel
    /// daemon` (with --listen-tcp), it serves its TCP API and migration streams over TLS
    /// and requires its clients' certificates to chain to this CA.
    #[arg(long, global = true, value_name = "FILE", env = "VESSEL_TLS_CACERT")]
    pub tls_cacert: Option<PathBuf>,
    /// This client's (or daemon's) certificate (PEM), shown to the daemon (and, by a
    /// daemon, to the daemons it migrates to; it also serves as the daemon's server
    /// certificate).
    #[arg(long, global = true, value_name = "FILE", env = "VESSEL_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, global = true, value_name = "FILE", env = "VESSEL_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

impl GlobalOpts {
    fn tls_files(&self) -> manager::tls::TlsFiles {
        manager::tls::TlsFiles {
            cacert: self.tls_cacert.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

pub fn default_socket() -> PathBuf {
    if is_root() {
        return PathBuf::from("/run/vessel/vessel.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("vessel/vessel.sock"),
        // SAFETY: getuid has no preconditions and touches no memory.
        None => PathBuf::from(format!("/tmp/vessel-{}/vessel.sock", unsafe {
            libc::getuid()
        })),
    }
}

fn default_state_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/vessel");
    }
    std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("vessel")
}

#[derive(clap::Args, Debug)]
pub struct DaemonArgs {
    /// Where definitions (vessel.db), logs and run folders live.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The QEMU system emulator the qemu driver runs.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Also serve the API on TCP (e.g. 127.0.0.1:7070); clients must send the token.
    #[arg(long, requires = "token_file")]
    listen_tcp: Option<String>,
    /// File holding the token TCP clients send (Authorization: Bearer TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// A folder storage pools may be defined in, besides STATE/pools. Repeat for more.
    /// API clients can read and write every file in a pool.
    #[arg(long = "pool-root")]
    pool_roots: Vec<PathBuf>,
    /// A folder whose files clients over TCP may name in domain definitions (kernels,
    /// initrds, images), besides the pool roots. Repeat for more. Clients on the Unix
    /// socket may name the files their own user may use.
    #[arg(long = "file-root")]
    file_roots: Vec<PathBuf>,
    /// Start Vessel VMMs without their jail (namespaces and a root holding only the
    /// VM's files): for development only. Their seccomp filters stay on.
    #[arg(long)]
    no_jail: bool,
    /// The user jailed Vessel VMMs become once their VM is built (default 65534, nobody).
    #[arg(long, default_value_t = manager::driver::DEFAULT_VMM_IDS.0)]
    vmm_uid: u32,
    /// Their group (default 65534, nogroup).
    #[arg(long, default_value_t = manager::driver::DEFAULT_VMM_IDS.1)]
    vmm_gid: u32,
    /// Give each jailed VMM its own user instead of --vmm-uid: START plus a hash of the
    /// domain's name modulo COUNT (e.g. 1000000:65536, a range no account uses).
    #[arg(long, value_parser = parse_uid_range, value_name = "START:COUNT")]
    vmm_uid_range: Option<(u32, u32)>,
    /// On SIGTERM (host shutdown), managedsave every running domain before ending;
    /// the next daemon starts them again from their saves (libvirt-guests'
    /// ON_SHUTDOWN=suspend).
    #[arg(long)]
    save_on_shutdown: bool,
    /// Join a cluster: its etcd client URLs, comma-separated
    /// (http://10.0.0.1:2379,http://10.0.0.2:2379,…). See docs/CLUSTER.md.
    #[arg(long, value_delimiter = ',', requires = "host_name")]
    cluster: Vec<String>,
    /// This host's name in the cluster (unique among its hosts).
    #[arg(long)]
    host_name: Option<String>,
    /// Seconds the host stays registered after its last heartbeat; a host that cannot
    /// renew until shortly before it could expire stops its VMMs, and its domains move
    /// when it expires.
    #[arg(long, default_value_t = 10)]
    lease_ttl: u64,
    /// How placement weighs the hosts that fit: spread (emptiest first) or pack.
    #[arg(long, default_value = "spread")]
    weigher: manager::cluster::Weigher,
    /// vCPUs this host offers (default: its CPUs times 4).
    #[arg(long)]
    host_vcpus: Option<u64>,
    /// Memory this host offers, in MiB (default: all of it).
    #[arg(long)]
    host_memory_mib: Option<u64>,
    /// This host's address on the network between the hosts, where overlay networks'
    /// VXLAN packets come and go (default: --listen-tcp's address, unless it is a
    /// loopback or wildcard one).
    #[arg(long)]
    overlay_ip: Option<std::net::Ipv4Addr>,
    /// The CA (PEM) that signed the etcd members' server certificates, for https://
    /// endpoints (as etcdctl's --cacert).
    #[arg(long, value_name = "FILE", requires = "cluster")]
    etcd_cacert: Option<PathBuf>,
    /// This host's client certificate (PEM) for etcd's --client-cert-auth (as etcdctl's
    /// --cert).
    #[arg(long, value_name = "FILE", requires_all = ["etcd_key", "etcd_cacert"])]
    etcd_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM) (as etcdctl's --key).
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
}

/// `START:COUNT` for `--vmm-uid-range`.
fn parse_uid_range(s: &str) -> std::result::Result<(u32, u32), String> {
    let (a, b) = s
        .split_once(':')
        .ok_or("use START:COUNT, e.g. 1000000:65536")?;
    let start: u32 = a.parse().map_err(|_| format!("bad START {a:?}"))?;
    let count: u32 = b.parse().map_err(|_| format!("bad COUNT {b:?}"))?;
    if count == 0 || start == 0 || start.checked_add(count).is_none() {
        return Err("START must be above 0 and START+COUNT fit in 32 bits, COUNT above 0".into());
    }
    Ok((start, count))
}

/// Runs the daemon in the foreground until it is killed.
pub fn daemon(args: DaemonArgs, g: &GlobalOpts) -> Result<i32> {
    let socket = g.socket.clone().unwrap_or_else(default_socket);
    let state_dir = args.state_dir.unwrap_or_else(default_state_dir);
    let vessel = std::env::current_exe().context("finding the vessel executable")?;
    // Each jailed VMM's CPU and memory limits go in its own cgroup, where the host has
    // the controllers.
    let vmm_cgroups = if args.no_jail {
        None
    } else {
        let parent = std::path::Path::new(manager::driver::VMM_PARENT_CGROUP);
        match sandbox::cgroup::Version::detect() {
            Some(v) => match sandbox::cgroup::probe(v, parent) {
                Ok(()) => {
                    tracing::info!(version = %v, "jailed VMMs get cgroup CPU and memory limits");
                    Some(v)
                }
                Err(e) => {
                    tracing::warn!("jailed VMMs get no CPU or memory limits: {e}");
                    None
                }
            },
            None => {
                tracing::warn!(
                    "no cgroup hierarchy with the cpu and memory controllers: jailed VMMs get no CPU or memory limits"
                );
                None
            }
        }
    };
    let cfg = manager::Config {
        state_dir,
        programs: manager::driver::Programs {
            vessel,
            qemu: args.qemu,
            jail: !args.no_jail,
            vmm_ids: (args.vmm_uid, args.vmm_gid),
            vmm_uid_range: args.vmm_uid_range,
            vmm_cgroups,
        },
        pool_roots: args.pool_roots,
        file_roots: args.file_roots,
        save_on_shutdown: args.save_on_shutdown,
    };
    let files = g.tls_files();
    let tls = match (&args.listen_tcp, files.is_empty()) {
        (_, true) => None,
        (None, false) => bail!(
            "--tls-cacert, --tls-cert and --tls-key serve the TCP API over TLS: give --listen-tcp too"
        ),
        (Some(_), false) => Some(manager::tls::DaemonTls::load(&files)?),
    };
    let tcp = match (args.listen_tcp, args.token_file) {
        (Some(addr), Some(f)) => Some(manager::TcpOpts {
            tls,
            addr,
            token: std::fs::read_to_string(&f)
                .with_context(|| format!("reading the token file {}", f.display()))?
                .trim()
                .to_string(),
        }),
        _ => None,
    };
    let cluster = match args.host_name {
        Some(host) if !args.cluster.is_empty() => Some(manager::cluster::ClusterOpts {
            endpoints: args.cluster,
            api: match &tcp {
                Some(t) => format!("{} or tcp://{}", socket.display(), t.addr),
                None => socket.display().to_string(),
            },
            socket: std::path::absolute(&socket)
                .unwrap_or_else(|_| socket.clone())
                .display()
                .to_string(),
            tcp: tcp.as_ref().map(|t| t.addr.to_string()),
            token: tcp.as_ref().map(|t| t.token.clone()),
            host,
            lease_ttl: args.lease_ttl,
            weigher: args.weigher,
            vcpus: args.host_vcpus,
            memory_mib: args.host_memory_mib,
            overlay_ip: args.overlay_ip.or_else(|| {
                let t = tcp.as_ref()?;
                let ip: std::net::Ipv4Addr = t.addr.rsplit_once(':')?.0.parse().ok()?;
                (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
            }),
            tls: manager::cluster::tls::EtcdTls {
                cacert: args.etcd_cacert,
                cert: args.etcd_cert,
                key: args.etcd_key,
            },
        }),
        Some(_) => bail!("--host-name names this host in a cluster: give --cluster too"),
        None => None,
    };
    eprintln!("vessel daemon: listening on {}", socket.display());
    manager::serve(cfg, &socket, tcp, cluster).map_err(anyhow::Error::from)?;
    Ok(0)
}

/// The CLI verbs.
#[derive(clap::Subcommand, Debug)]
pub enum ManageCommand {
    /// Run the manager daemon in the foreground.
    Daemon(Box<DaemonArgs>),
    /// List domains (running ones; --all for every defined one), as virsh does: Id (the
    /// VMM's process ID, or "-"), Name, State.
    List {
        #[arg(long, short)]
        all: bool,
        /// Only the domains that do not run.
        #[arg(long, conflicts_with = "all")]
        inactive: bool,
        /// Print only names, one a line.
        #[arg(long, conflicts_with_all = ["uuid", "id"])]
        name: bool,
        /// Print only UUIDs, one a line.
        #[arg(long, conflicts_with = "id")]
        uuid: bool,
        /// Print only the IDs of running domains, one a line.
        #[arg(long)]
        id: bool,
        /// The table (the default).
        #[arg(long, conflicts_with_all = ["name", "uuid", "id"])]
        table: bool,
        /// Only domains that start with the daemon.
        #[arg(long, conflicts_with = "no_autostart")]
        autostart: bool,
        /// Only domains that do not.
        #[arg(long)]
        no_autostart: bool,
        /// Every Vessel domain is persistent (defined): this changes nothing.
        #[arg(long)]
        persistent: bool,
    },
    /// Define a domain from a file: Vessel JSON or libvirt domain XML ('-' reads stdin).
    Define {
        file: PathBuf,
        /// Replace the definition of the domain with that name (it keeps its UUID; a
        /// running domain gets it at its next start).
        #[arg(long)]
        update: bool,
        /// In a cluster: join this server group (created with `group-create`); its
        /// policy constrains where the domain is placed.
        #[arg(long, conflicts_with = "update")]
        group: Option<String>,
        /// Check libvirt XML against libvirt's schema first (virt-xml-validate).
        #[arg(long)]
        validate: bool,
    },
    /// Remove a domain's definition (it must not be running).
    Undefine { name: String },
    /// Start a domain.
    Start {
        name: String,
        /// Attach to its console once started.
        #[arg(long)]
        console: bool,
        /// Leave the guest paused: its vCPUs run once it is resumed (`vessel resume`).
        #[arg(long)]
        paused: bool,
    },
    /// Ask the guest to power off (it sees its ACPI power button pressed).
    Shutdown {
        name: String,
        /// Wait up to this many seconds for it to stop.
        #[arg(long)]
        wait: Option<u64>,
    },
    /// Stop a domain at once (like pulling the plug).
    Destroy { name: String },
    /// Reset a running domain (a Vessel VMM is restarted; the domain stays running).
    Reboot { name: String },
    /// Pause a running domain's vCPUs.
    Suspend { name: String },
    /// Resume a paused domain.
    Resume { name: String },
    /// Show a domain's state and resources.
    Dominfo { name: String },
    /// Print a domain's definition as libvirt domain XML.
    Dumpxml {
        name: String,
        /// The definition (the next start's), not the running domain as it runs now.
        #[arg(long)]
        inactive: bool,
        /// Print only the nodes this XPath expression matches, each on its own (evaluated
        /// by libxml2's xmllint, the library virsh uses).
        #[arg(long)]
        xpath: Option<String>,
        /// With --xpath: the matching nodes as children of one <nodes> element.
        #[arg(long, requires = "xpath")]
        wrap: bool,
    },
    /// Show a domain's interfaces: network, TAP, MAC and DHCP-leased address.
    Domifaddr { name: String },
    /// Attach to a domain's serial console (Ctrl-] detaches); --log prints what it wrote.
    Console {
        name: String,
        #[arg(long)]
        log: bool,
    },
    /// Start a domain when the daemon starts (--disable to stop doing so).
    Autostart {
        name: String,
        #[arg(long)]
        disable: bool,
    },
    /// Open the web dashboard on a loopback port with a fresh token and print its address
    /// (a daemon started with --listen-tcp serves it there too).
    Dashboard {
        /// Open this domain's page.
        #[arg(long)]
        domain: Option<String>,
    },
    /// Print state-change events as they happen.
    Events {
        /// Only this domain's events.
        #[arg(long)]
        domain: Option<String>,
        /// Stop after this many seconds (default: run until interrupted).
        #[arg(long)]
        timeout: Option<u64>,
    },
    #[command(flatten)]
    Saves(crate::cmd_saves::SaveCommand),
    #[command(flatten)]
    Net(crate::cmd_network::NetCommand),
    #[command(flatten)]
    Storage(crate::cmd_storage::StorageCommand),
    #[command(flatten)]
    Virsh(crate::cmd_virsh::VirshCommand),
    #[command(flatten)]
    Cluster(crate::cmd_cluster::ClusterCommand),
}

pub(crate) fn size_text(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", U[i])
    }
}

pub(crate) fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Prints rows as aligned columns under a header and a rule, as virsh does.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(x) = w.get_mut(i) {
                *x = (*x).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            let width = w.get(i).copied().unwrap_or(0);
            out.push(' ');
            out.push_str(&format!("{c:<width$}"));
            out.push_str("  ");
        }
        println!("{}", out.trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    println!("{}", "-".repeat(w.iter().map(|x| x + 3).sum::<usize>()));
    for r in rows {
        line(r.clone());
    }
}

pub(crate) fn kv(pairs: &[(&str, String)]) {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    for (k, v) in pairs {
        println!("{:<w$} {v}", format!("{k}:"));
    }
}

pub(crate) fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// A domain as virsh's dominfo prints it (its keys, in its order, memory in KiB), then
/// what Vessel adds.
fn domain_kv(i: &Value) {
    let kib = i["memory_mib"]
        .as_u64()
        .map_or_else(|| "-".into(), |m| format!("{} KiB", m * 1024));
    let yes_no = |b: bool| if b { "enable" } else { "disable" }.to_string();
    let mut p = vec![
        ("Id", i.get("pid").map_or_else(|| "-".into(), s)),
        ("Name", s(&i["name"])),
        ("UUID", s(&i["uuid"])),
        ("OS Type", "hvm".into()),
        ("State", s(&i["state_text"])),
        ("CPU(s)", s(&i["cpus"])),
        ("Max memory", kib.clone()),
        (
            "Used memory",
            i["current_memory_mib"]
                .as_u64()
                .map_or(kib, |m| format!("{} KiB", m * 1024)),
        ),
        ("Persistent", "yes".into()),
        ("Autostart", yes_no(i["autostart"].as_bool() == Some(true))),
        ("Driver", s(&i["driver"])),
    ];
    if let Some(u) = i["uptime_s"].as_f64() {
        p.push(("Uptime", format!("{u:.1} s")));
    }
    if let Some(r) = i.get("last_stop") {
        p.push(("Last stop", s(r)));
    }
    p.push(("Serial log", s(&i["serial_log"])));
    // virsh pads every key to 15 columns.
    for (k, v) in p {
        println!("{:<15} {v}", format!("{k}:"));
    }
}

/// POST a lifecycle action to a domain and report it as virsh does.
fn domain_action(c: &Client, name: &str, action: &str, done: &str, json_out: bool) -> Result<()> {
    let v = c.post(&format!("{}/{action}", dom(name)), None)?;
    if json_out {
        print_json(&v);
    } else {
        println!("Domain '{name}' {done}");
    }
    Ok(())
}

pub(crate) fn dom(name: &str) -> String {
    format!("/v1/domains/{}", enc(name))
}

pub(crate) fn vol(pool: &str, name: &str) -> String {
    format!("/v1/pools/{}/volumes/{}", enc(pool), enc(name))
}

/// Runs one verb against the daemon.
pub fn run(cmd: ManageCommand, g: &GlobalOpts) -> Result<i32> {
    let sock = g.socket.clone().unwrap_or_else(default_socket);
    let mut c = Client::new(&sock);
    c.token = std::env::var("VESSEL_TOKEN").ok();
    let files = g.tls_files();
    let tcp = sock.to_str().is_some_and(|s| s.starts_with("tcp://"));
    if tcp && !files.is_empty() && !matches!(cmd, ManageCommand::Daemon(_)) {
        c.tls = Some(manager::tls::ClientTls::load(&files)?);
    }
    let json_out = g.json;
    let show_dom = |v: &Value| {
        if json_out {
            print_json(v)
        } else {
            domain_kv(v)
        }
    };
    match cmd {
        ManageCommand::Daemon(a) => return daemon(*a, g),
        ManageCommand::Virsh(v) => return crate::cmd_virsh::run(v, &c, json_out),
        ManageCommand::Saves(v) => return crate::cmd_saves::run(v, &c, json_out),
        ManageCommand::Net(n) => return crate::cmd_network::run(n, &c, json_out),
        ManageCommand::Storage(v) => return crate::cmd_storage::run(v, &c, json_out),
        ManageCommand::Cluster(v) => return crate::cmd_cluster::run(v, &c, json_out),
        ManageCommand::List {
            all,
            inactive,
            name,
            uuid,
            id,
            table: _,
            autostart,
            no_autostart,
            persistent: _,
        } => {
            let v = c.get("/v1/domains")?;
            let list: Vec<&Value> = v
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|d| {
                            let off = matches!(d["state"].as_str(), Some("shutoff" | "crashed"));
                            (all || off == inactive)
                                && (!autostart || d["autostart"] == true)
                                && (!no_autostart || d["autostart"] != true)
                        })
                        .collect()
                })
                .unwrap_or_default();
            if json_out {
                print_json(&Value::Array(list.into_iter().cloned().collect()));
            } else if name || uuid || id {
                // virsh's one-per-line forms, each list ending with an empty line.
                let key = if name {
                    "name"
                } else if uuid {
                    "uuid"
                } else {
                    "pid"
                };
                for d in list.iter().filter(|d| d.get(key).is_some()) {
                    println!("{}", s(&d[key]));
                }
                println!();
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|d| {
                        vec![
                            d.get("pid").map(s).unwrap_or_else(|| "-".into()),
                            s(&d["name"]),
                            s(&d["state_text"]),
                        ]
                    })
                    .collect();
                table(&["Id", "Name", "State"], &rows);
                println!();
            }
        }
        ManageCommand::Define {
            file,
            update,
            group,
            validate,
        } => {
            let text = if file == Path::new("-") {
                let mut t = String::new();
                std::io::stdin().read_to_string(&mut t)?;
                t
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?
            };
            if validate {
                validate_xml(&text, "domain")?;
            }
            let v = if update {
                c.redefine_text(&text)?
            } else if let Some(g) = &group {
                let ct = if text.trim_start().starts_with('<') {
                    "application/xml"
                } else {
                    "application/json"
                };
                let path = format!("/v1/domains?group={}", vmm::api::http::percent_encode(g));
                let r = c.raw("POST", &path, Some((ct, text.as_bytes())))?;
                serde_json::from_slice(&r.body)?
            } else {
                c.define_text(&text)?
            };
            if json_out {
                print_json(&v);
            } else {
                println!("Domain '{}' defined from {}", s(&v["name"]), file.display());
            }
        }
        ManageCommand::Undefine { name } => {
            c.call("DELETE", &dom(&name), None)?;
            if json_out {
                print_json(&json!({"name": name, "undefined": true}));
            } else {
                println!("Domain '{name}' has been undefined");
            }
        }
        ManageCommand::Start {
            name,
            console,
            paused,
        } => {
            let q = if paused { "?paused=1" } else { "" };
            let v = c.post(&format!("{}/start{q}", dom(&name)), None)?;
            if json_out {
                print_json(&v);
            } else {
                println!("Domain '{name}' started");
            }
            if console {
                return attach(&c, &name);
            }
        }
        ManageCommand::Shutdown { name, wait } => {
            let q = wait.map(|w| format!("?wait={w}")).unwrap_or_default();
            let v = c.post(&format!("{}/shutdown{q}", dom(&name)), None)?;
            if json_out {
                print_json(&v);
            } else if wait.is_some() && v["state"] == "shutoff" {
                println!("Domain '{name}' is shut off");
            } else if wait.is_some() {
                bail!(
                    "domain '{name}' did not power off within {} s (state: {}); the guest may ignore the power button: try `vessel destroy {name}`",
                    wait.unwrap_or(0),
                    s(&v["state_text"])
                );
            } else {
                println!("Domain '{name}' is being shutdown");
            }
        }
        ManageCommand::Destroy { name } => {
            domain_action(&c, &name, "destroy", "destroyed", json_out)?
        }
        ManageCommand::Reboot { name } => {
            domain_action(&c, &name, "reboot", "is being rebooted", json_out)?
        }
        ManageCommand::Suspend { name } => {
            domain_action(&c, &name, "suspend", "suspended", json_out)?
        }
        ManageCommand::Resume { name } => domain_action(&c, &name, "resume", "resumed", json_out)?,
        ManageCommand::Dominfo { name } => {
            let v = c.get(&dom(&name))?;
            if json_out {
                print_json(&v);
            } else {
                domain_kv(&v["info"]);
            }
        }
        ManageCommand::Domifaddr { name } => {
            let v = c.get(&format!("{}/interfaces", dom(&name)))?;
            if json_out {
                print_json(&v);
            } else {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|i| {
                        vec![
                            s(&i["tap"]),
                            s(&i["mac"]),
                            i["network"]
                                .as_str()
                                .or(i["bridge"].as_str())
                                .unwrap_or("-")
                                .to_string(),
                            s(&i["ip"]),
                        ]
                    })
                    .collect();
                table(&["Interface", "MAC address", "Network", "Address"], &rows);
            }
        }
        ManageCommand::Dumpxml {
            name,
            inactive,
            xpath,
            wrap,
        } => {
            let q = if inactive { "?inactive=1" } else { "" };
            let r = c.raw("GET", &format!("{}/xml{q}", dom(&name)), None)?;
            match &xpath {
                Some(x) => std::io::stdout().write_all(&select_xpath(&r.body, x, wrap)?)?,
                None => std::io::stdout().write_all(&r.body)?,
            }
            if let Some((_, unsaid)) = r
                .headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("x-vessel-unsaid"))
            {
                eprintln!(
                    "vessel: warning: libvirt XML cannot say {unsaid} of domain {name}: \
                     defining this dump would drop them; its JSON (vessel --json dominfo \
                     {name}) holds them"
                );
            }
        }
        ManageCommand::Console { name, log } => {
            if log {
                let r = c.raw("GET", &format!("{}/log", dom(&name)), None)?;
                std::io::stdout().write_all(&r.body)?;
            } else {
                return attach(&c, &name);
            }
        }
        ManageCommand::Autostart { name, disable } => {
            let v = c.call(
                "PUT",
                &format!("{}/autostart", dom(&name)),
                Some(&json!({"autostart": !disable})),
            )?;
            if json_out {
                show_dom(&v);
            } else if disable {
                println!("Domain '{name}' unmarked as autostarted");
            } else {
                println!("Domain '{name}' marked as autostarted");
            }
        }
        ManageCommand::Dashboard { domain } => {
            let v = c.post("/v1/dashboard", None)?;
            let mut url = v["url"].as_str().unwrap_or_default().to_string();
            if let Some(d) = domain {
                url.push_str("&domain=");
                url.push_str(&vmm::api::http::percent_encode(&d));
            }
            if json_out {
                println!("{}", json!({"url": url, "port": v["port"]}));
            } else {
                println!("{url}");
                eprintln!("(open it in a browser on this host; the token in it is the password)");
            }
        }
        ManageCommand::Events { domain, timeout } => {
            let deadline = timeout.map(|t| std::time::Instant::now() + Duration::from_secs(t));
            let mut since = c.get("/v1/events")?["last"].as_u64().unwrap_or(0);
            loop {
                let left = match deadline {
                    Some(d) => d
                        .saturating_duration_since(std::time::Instant::now())
                        .as_secs(),
                    None => 30,
                };
                if deadline.is_some() && left == 0 {
                    break;
                }
                let mut path = format!("/v1/events?since={since}&timeout={}", left.min(30));
                if let Some(d) = &domain {
                    path.push_str(&format!("&domain={}", enc(d)));
                }
                let v = c.get(&path)?;
                for e in v["events"].as_array().into_iter().flatten() {
                    since = since.max(e["seq"].as_u64().unwrap_or(0));
                    if json_out {
                        println!("{e}");
                    } else {
                        println!(
                            "event '{}' for domain '{}': {}{}",
                            s(&e["event"]),
                            s(&e["domain"]),
                            s(&e["state"]),
                            e.get("detail")
                                .map(|d| format!(" ({})", s(d)))
                                .unwrap_or_default()
                        );
                    }
                }
                let _ = std::io::stdout().flush();
            }
        }
    }
    Ok(0)
}

/// The nodes of the XML document `xml` that `expr` selects, as `virsh dumpxml --xpath`
/// prints them: each on a line (an attribute as ` name="value"`), none for an empty
/// set; with `wrap`, all as children of one `<nodes>` element. Evaluated by xmllint
/// (libxml2, which virsh evaluates it with); an expression whose value is not a node
/// set (`count(…)`) is refused, as virsh refuses it.
pub(crate) fn select_xpath(xml: &[u8], expr: &str, wrap: bool) -> Result<Vec<u8>> {
    let run = |args: &[&str], input: &[u8]| -> Result<std::process::Output> {
        let mut child = std::process::Command::new("xmllint")
            .args(args)
            .arg("-")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("--xpath needs xmllint: apt-get install libxml2-utils")?;
        child
            .stdin
            .take()
            .context("xmllint's input")?
            .write_all(input)?;
        Ok(child.wait_with_output()?)
    };
    // count() of anything but a node set is an XPath type error.
    let probe = run(&["--xpath", &format!("count({expr})")], xml)?;
    if !probe.status.success() {
        bail!("XPath {expr:?} does not select nodes (virsh prints node sets only)");
    }
    let out = run(&["--xpath", expr], xml)?;
    let mut nodes = match out.status.code() {
        Some(0) => out.stdout,
        // An empty set: nothing printed, as virsh.
        Some(10) => Vec::new(),
        _ => bail!(
            "XPath evaluation failed for {expr:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    };
    if !nodes.is_empty() && !nodes.ends_with(b"\n") {
        nodes.push(b'\n');
    }
    if !wrap {
        return Ok(nodes);
    }
    let text = String::from_utf8_lossy(&nodes);
    let (attrs, elems): (Vec<&str>, Vec<&str>) = text
        .lines()
        .filter(|l| !l.is_empty())
        .partition(|l| l.starts_with(' '));
    let mut w = format!("<nodes{}", attrs.concat());
    if elems.is_empty() {
        w.push_str("/>\n");
    } else {
        w.push('>');
        for e in elems {
            w.push_str(e);
        }
        w.push_str("</nodes>\n");
    }
    Ok(w.into_bytes())
}

/// virsh's `--validate`: libvirt XML checked against libvirt's own schema (Debian's
/// libvirt-clients' virt-xml-validate) before it is sent.
pub(crate) fn validate_xml(text: &str, kind: &str) -> Result<()> {
    if !text.trim_start().starts_with('<') {
        bail!("--validate checks libvirt XML against its schema: this is not XML");
    }
    let f = std::env::temp_dir().join(format!("vessel-validate-{}.xml", std::process::id()));
    std::fs::write(&f, text).with_context(|| format!("writing {}", f.display()))?;
    let out = std::process::Command::new("virt-xml-validate")
        .arg(&f)
        .arg(kind)
        .output();
    let _ = std::fs::remove_file(&f);
    let out = out.context("--validate runs virt-xml-validate (apt-get install libvirt-clients)")?;
    if !out.status.success() {
        bail!(
            "the XML does not validate against libvirt's {kind} schema: {}{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(())
}

/// A file's text, or stdin's for '-'.
pub(crate) fn read_text(file: &str) -> Result<String> {
    if file == "-" {
        let mut t = String::new();
        std::io::stdin().read_to_string(&mut t)?;
        return Ok(t);
    }
    std::fs::read_to_string(file).with_context(|| format!("reading {file}"))
}

/// Interactive console: raw terminal, Ctrl-] detaches.
pub(crate) fn attach(c: &Client, name: &str) -> Result<i32> {
    let stream = c.console(name)?;
    let mut out = stream.get_ref().try_clone_conn()?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("Connected to domain '{name}'\r\nEscape character is ^] (Ctrl + ])\r");
    }
    let raw = if interactive {
        vmm::console::RawTerminal::enter(0)
    } else {
        None
    };
    let mut reader = stream;
    let t = std::thread::spawn(move || {
        let mut stdout = std::io::stdout();
        let mut buf = [0u8; 4096];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if stdout.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    let _ = stdout.flush();
                }
            }
        }
    });
    let mut stdin = std::io::stdin();
    let mut buf = [0u8; 1024];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let data = &buf[..n];
        if interactive {
            if let Some(p) = data.iter().position(|&b| b == 0x1d) {
                let _ = out.write_all(&data[..p]);
                break;
            }
        }
        if out.write_all(data).is_err() {
            break;
        }
    }
    if !interactive {
        // Piped input ended: give the guest a moment to answer before closing.
        std::thread::sleep(Duration::from_millis(500));
    }
    out.shutdown_conn();
    let _ = t.join();
    drop(raw);
    Ok(0)
}
