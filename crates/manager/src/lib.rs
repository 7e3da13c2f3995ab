//! Vessel's manager, in libvirt's role: domain definitions in SQLite, two drivers (Vessel's
//! VMM and QEMU through QMP), supervision and re-adoption of VMM processes, directory
//! storage pools with raw/qcow2 volumes, events, and a REST API on a Unix socket.

pub mod api;
pub mod boot_files;
pub mod client;
pub mod cluster;
pub mod disk_chain;
pub mod domain;
pub mod driver;
pub mod error;
pub mod events;
pub mod libvirt_xml;
pub mod manager;
pub mod network;
pub mod qmp;
pub mod state;
pub mod storage;
pub mod storage_api;
pub mod store;
pub mod tls;
pub mod web;
pub mod xml;
pub mod xml_support;

use std::path::Path;
use std::sync::Arc;

pub use error::{Error, Result};
pub use manager::{Config, Manager};

/// The opt-in TCP listener: an address and the token clients must send.
#[derive(Clone, Debug)]
pub struct TcpOpts {
    pub addr: String,
    pub token: String,
    /// `--tls-cacert/--tls-cert/--tls-key`: the API (and migration streams) over
    /// mutual TLS.
    pub tls: Option<tls::DaemonTls>,
}

/// Opens the state, binds the socket (and TCP, when asked) and serves the API until the
/// process ends.
/// SIGTERM, SIGINT and SIGHUP, blocked in the calling thread (and the threads it starts)
/// so that one thread can wait for them. Processes the daemon spawns start with an empty
/// mask (std's `Command` resets it), so VMMs and dnsmasq still take their signals.
fn block_termination_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; these calls only edit it and this thread's mask.
    unsafe {
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    set
}

/// Waits for a termination signal on a thread of its own, then removes the socket file
/// and ends the daemon (its VMMs keep running, as after a crash: the next daemon re-adopts
/// them). Without this the socket file stayed behind after SIGTERM.
fn remove_socket_on_termination(
    set: libc::sigset_t,
    socket: std::path::PathBuf,
    save: Option<Arc<Manager>>,
    cluster: Arc<std::sync::OnceLock<Arc<cluster::Cluster>>>,
) {
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` and `sig` are valid for the call; sigwait only writes `sig`.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            tracing::info!(signal = sig, "vessel daemon ending");
            // Refuse new requests first: nothing starts while the domains are saved.
            let _ = std::fs::remove_file(&socket);
            // A cluster host's lease ends with it: its VMMs stop so that other hosts
            // may start its domains (saving them would leave them to this host).
            if let Some(c) = cluster.get() {
                c.leave();
            } else if let Some(m) = &save {
                m.save_all_at_shutdown();
            }
            std::process::exit(0);
        });
    if let Err(e) = spawned {
        tracing::warn!("no signal thread ({e}): the socket file stays after SIGTERM");
    }
}

pub fn serve(
    cfg: Config,
    socket: &Path,
    tcp: Option<TcpOpts>,
    cluster: Option<cluster::ClusterOpts>,
) -> Result<()> {
    // Everything the daemon and its VMMs create (vessel.db and its journal, logs, run
    // folders, volumes) is the daemon user's alone: 0600 files, 0700 folders.
    // SAFETY: umask only sets the process's file mode mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("creating socket folder", dir, e))?;
    }
    // Before any thread starts, so that they all inherit the blocked mask.
    let signals = block_termination_signals();
    // The state first: it refuses a second daemon before that one touches any socket.
    let m = Manager::open(cfg)?;
    let listener = vmm::api::http::bind(socket).map_err(|e| Error::io("binding", socket, e))?;
    let save = m.cfg.save_on_shutdown.then(|| m.clone());
    let joined: Arc<std::sync::OnceLock<Arc<cluster::Cluster>>> = Default::default();
    remove_socket_on_termination(signals, socket.to_path_buf(), save, joined.clone());
    // Whoever can connect controls every VM: only the daemon's user, as libvirt's socket.
    std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| Error::io("restricting", socket, e))?;
    tracing::info!(socket = %socket.display(), "vessel daemon listening");
    let auto = m.clone();
    std::thread::spawn(move || auto.autostart_all());
    let api = api::Api::new(m.clone());
    if let Some(opts) = cluster {
        let c = cluster::Cluster::join(m.clone(), opts)?;
        let _ = joined.set(c.clone());
        let _ = api.cluster.set(c);
    }
    if let Some(t) = tcp {
        if t.token.len() < 16 {
            return Err(Error::invalid(
                "TCP token",
                "use at least 16 characters (e.g. from `openssl rand -hex 16`)",
            ));
        }
        let l =
            std::net::TcpListener::bind(&t.addr).map_err(|e| Error::io("binding", &t.addr, e))?;
        if let Ok(a) = l.local_addr() {
            let _ = m.tcp_ip.set(a.ip());
        }
        let gate = Arc::new(api::TokenGate {
            inner: api.clone(),
            token: t.token,
        });
        match t.tls {
            Some(tls) => {
                tracing::info!(addr = %t.addr, "also listening on TCP with TLS (client certificate and token required)");
                let server = tls.server.clone();
                let _ = m.tls.set(tls);
                std::thread::spawn(move || {
                    if let Err(e) = tls::serve_api(l, server, gate, api::protocol_error) {
                        tracing::error!("the TLS listener ended: {e}");
                    }
                });
            }
            None => {
                tracing::info!(addr = %t.addr, "also listening on TCP (token required)");
                std::thread::spawn(move || vmm::api::http::serve_tcp(l, gate, api::protocol_error));
            }
        }
    }
    vmm::api::http::serve(listener, api, api::protocol_error);
    Ok(())
}
