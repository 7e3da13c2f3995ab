//! `migrate NAME --live DEST` (virsh's verb) between two daemons, for domains of either
//! driver (each sends through [`crate::driver::Driver::migrate`]).
//!
//! The destination daemon defines the domain from the definition the source sends (or
//! finds it defined the same) and starts its VMM waiting for it (`vessel run --incoming`
//! with the configuration it expects, or QEMU's `-incoming unix:`). The source's Vessel
//! VMM is jailed and may sit in a network namespace of its own, so it sends to a socket
//! in its own run folder, where this daemon takes the stream and passes it on to the
//! destination's VMM (libvirt's tunnelled migration; a QEMU sends through it too). Once
//! the destination runs the domain, the source's VMM ends; the definition stays here,
//! shut off, unless asked to leave (virsh's `--undefinesource`).
//!
//! Between daemons that share no file system the destination is its TCP API
//! (`tcp://HOST:PORT` and its token): it then also listens for the stream on a TCP port
//! of its own, on the API's address, and passes it to its VMM's socket; the first bytes
//! must be the one-time nonce it gave in its (authenticated) answer. docs/MIGRATION.md.
//!
//! The source keeps where its migration stands in the domain's run folder ([`Outgoing`]):
//! a daemon started after it died there finds it when it re-adopts the VMM and asks the
//! destination whether the domain runs there ([`Manager::migrate_abandon`] at the
//! destination, libvirt's recovery of a migration its daemon lost): if so the source's
//! VMM ends as migrated away, if not the destination's copy is destroyed (and undefined
//! when the migration defined it) and the source's VM runs on.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{lock, Manager};
use crate::domain::DomainDef;
use crate::driver;
use crate::error::{Error, Result};
use crate::state::{End, Start};

/// How long a relay waits for the other end to connect.
const CONNECT_WAIT: Duration = Duration::from_secs(30);

/// A stream both ways, as the relays use it.
trait Duplex: Read + Write + Send + Sized + 'static {
    fn clone_half(&self) -> std::io::Result<Self>;
    fn close_write(&self);
}

impl Duplex for UnixStream {
    fn clone_half(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
    fn close_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

impl Duplex for TcpStream {
    fn clone_half(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
    fn close_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

/// Copies `from` to `to` and `to`'s answer back; the bytes forwarded.
fn pump<A: Duplex, B: Duplex>(from: A, to: B) -> std::io::Result<u64> {
    let (mut from_r, mut to_w) = (from.clone_half()?, to.clone_half()?);
    let forward = std::thread::spawn(move || {
        let n = std::io::copy(&mut from_r, &mut to_w);
        to_w.close_write();
        n
    });
    answer_back(to, from, forward)
}

/// The other half of a relay: `to`'s answer back to `from` on this thread, then the
/// forwarding thread's count.
fn answer_back<A: Duplex, B: Duplex>(
    mut to: B,
    mut from: A,
    forward: std::thread::JoinHandle<std::io::Result<u64>>,
) -> std::io::Result<u64> {
    let _ = std::io::copy(&mut to, &mut from);
    let _ = from.flush();
    from.close_write();
    forward
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the relay thread panicked")))
}

/// [`pump`] between two Unix sockets, passing on the descriptors that come with the
/// source's bytes (SCM_RIGHTS: the TAP queues and vsock listener a VMM hands to a
/// destination on this host, `vmm::migration::fds`), which a plain copy would drop.
fn pump_unix(from: UnixStream, to: UnixStream) -> std::io::Result<u64> {
    use vmm::migration::fds;
    let (from_r, to_w) = (from.try_clone()?, to.try_clone()?);
    let forward = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        loop {
            let mut got = Vec::new();
            let n = match fds::recv(&from_r, &mut buf, &mut got) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    to_w.close_write();
                    return Err(e);
                }
            };
            fds::send(&to_w, &buf[..n], &got)?;
            total += n as u64;
        }
        to_w.close_write();
        Ok(total)
    });
    answer_back(to, from, forward)
}

/// Where the source daemon passes the stream on to.
enum Target {
    /// The destination VMM's socket (both daemons on one file system).
    Unix(PathBuf),
    /// The destination daemon's migration port; the stream starts with its nonce, over
    /// TLS when this daemon has certificates.
    Tcp {
        addr: String,
        nonce: String,
        tls: Option<crate::tls::ClientTls>,
    },
}

/// Accepts one connection on `listener` within [`CONNECT_WAIT`], or gives up.
fn accept_one<S>(accept: impl Fn() -> std::io::Result<S>) -> std::io::Result<S> {
    let t0 = Instant::now();
    loop {
        match accept() {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && t0.elapsed() < CONNECT_WAIT => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Passes one migration stream from the source VMM (connecting to `listener`) to the
/// destination, and its answer back.
fn relay(listener: UnixListener, target: Target) -> std::io::Result<u64> {
    listener.set_nonblocking(true)?;
    let (from, _) = accept_one(|| listener.accept())?;
    from.set_nonblocking(false)?;
    match target {
        Target::Unix(dest) => pump_unix(from, UnixStream::connect(&dest)?),
        Target::Tcp {
            addr,
            nonce,
            tls: Some(tls),
        } => tls.send_stream(from, &addr, nonce.as_bytes()),
        Target::Tcp {
            addr,
            nonce,
            tls: None,
        } => {
            let mut to = TcpStream::connect(&addr)?;
            to.set_nodelay(true)?;
            to.write_all(nonce.as_bytes())?;
            pump(from, to)
        }
    }
}

/// How long a connection to the migration port may take to send its nonce.
const NONCE_WAIT: Duration = Duration::from_secs(10);
/// Connections whose first bytes are awaited at once; more are dropped unread.
const NONCE_CHECKS: usize = 16;

/// A connection to the migration port that sent the nonce.
enum Found {
    Plain(TcpStream),
    Tls(Box<crate::tls::AcceptedStream>),
}

/// Destination side over TCP: takes the connection that starts with `nonce` (others
/// are dropped) and passes it to the VMM waiting at `vmm`. Each connection's nonce is
/// awaited on a thread of its own, so one that connects first and sends nothing does
/// not hold up the real stream behind it. With `tls`, each connection is a TLS one whose
/// client certificate chains to this daemon's CA, and the nonce comes inside it.
fn receive_tcp(
    listener: TcpListener,
    nonce: String,
    vmm: PathBuf,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
) -> std::io::Result<u64> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    listener.set_nonblocking(true)?;
    let (found, stream) = std::sync::mpsc::channel::<Found>();
    let checking = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    loop {
        match stream.try_recv() {
            Ok(Found::Plain(s)) => {
                s.set_read_timeout(None)?;
                s.set_nodelay(true)?;
                return pump(s, UnixStream::connect(&vmm)?);
            }
            Ok(Found::Tls(s)) => return s.pump_to(UnixStream::connect(&vmm)?),
            Err(_) => {}
        }
        match listener.accept() {
            Ok((mut s, peer)) => {
                if checking.fetch_add(1, Ordering::SeqCst) >= NONCE_CHECKS {
                    checking.fetch_sub(1, Ordering::SeqCst);
                    tracing::warn!(%peer, "too many migration connections at once: dropped");
                    continue;
                }
                let (nonce, found, checking) = (nonce.clone(), found.clone(), checking.clone());
                let tls = tls.clone();
                std::thread::spawn(move || {
                    let got = match tls {
                        Some(server) => {
                            match crate::tls::accept_stream(
                                &server,
                                s,
                                nonce.as_bytes(),
                                NONCE_WAIT,
                            ) {
                                Ok(t) => Some(Found::Tls(Box::new(t))),
                                Err(e) => {
                                    tracing::warn!(%peer, "a migration connection refused: {e}");
                                    None
                                }
                            }
                        }
                        None => {
                            let mut got = vec![0u8; nonce.len()];
                            let ok = s.set_nonblocking(false).is_ok()
                                && s.set_read_timeout(Some(NONCE_WAIT)).is_ok()
                                && s.read_exact(&mut got).is_ok()
                                && got == nonce.as_bytes();
                            ok.then_some(Found::Plain(s))
                        }
                    };
                    checking.fetch_sub(1, Ordering::SeqCst);
                    if let Some(s) = got {
                        let _ = found.send(s);
                    } else {
                        tracing::warn!(
                            %peer,
                            "a migration connection without this migration's nonce: dropped"
                        );
                    }
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if t0.elapsed() > CONNECT_WAIT {
                    return Err(std::io::Error::other(
                        "no migration stream with its nonce came",
                    ));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Asks the destination daemon to run the domain whose stream it has received whole
/// ([`Manager::migrate_finish`] there); when it cannot, ends its VMM there first, so the
/// source that runs on has the disks alone.
fn finish_at(peer: &crate::client::Client, dest: &str, name: &str) -> Result<()> {
    match peer.post(&format!("/v1/domains/{name}/migration/finish"), None) {
        Ok(_) => Ok(()),
        Err(e) => {
            let _ = peer.post(&format!("/v1/domains/{name}/destroy"), None);
            Err(Error::Conflict(format!(
                "the destination daemon {dest} did not run the domain once its stream was in: {e}"
            )))
        }
    }
}

/// Tests only (debug builds): the program `VESSEL_TEST_BEFORE_MIGRATION_FINISH` names,
/// run with the domain's name at the destination once the stream is in and before the
/// domain runs there (a destination that dies at that moment, made deterministic).
fn before_finish_hook(domain: &str) {
    if !cfg!(debug_assertions) {
        return;
    }
    if let Some(p) = std::env::var_os("VESSEL_TEST_BEFORE_MIGRATION_FINISH") {
        let r = std::process::Command::new(&p).arg(domain).status();
        tracing::warn!(domain, hook = ?p, status = ?r, "test hook ran before the migration's finish");
    }
}

/// Tests only (debug builds): the program `VESSEL_TEST_SOURCE_MIGRATION_PHASE` names,
/// run at the source with the domain's name, the [`Phase`] just recorded and this
/// daemon's process ID (a source daemon that dies at that moment, made deterministic).
fn source_phase_hook(domain: &str, phase: Phase) {
    if !cfg!(debug_assertions) {
        return;
    }
    if let Some(p) = std::env::var_os("VESSEL_TEST_SOURCE_MIGRATION_PHASE") {
        let r = std::process::Command::new(&p)
            .arg(domain)
            .arg(phase.as_str())
            .arg(std::process::id().to_string())
            .status();
        tracing::warn!(domain, hook = ?p, status = ?r, "test hook ran at the source's migration phase");
    }
}

/// Where an outgoing migration stands, kept in the domain's run folder
/// ([`crate::driver::RunDir::outgoing_migration`]) while [`Manager::migrate_out`] runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Outgoing {
    /// The destination daemon: its socket, or `tcp://HOST:PORT`.
    pub dest: String,
    /// Its token, for a `tcp://` destination (the run folder is the daemon user's).
    pub dest_token: Option<String>,
    /// The migration defined the domain there.
    pub defined_there: bool,
    pub undefine_source: bool,
    pub phase: Phase,
}

/// The steps of an outgoing migration after the destination's VMM waits for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Phase {
    /// The source's VMM sends the stream.
    Streaming,
    /// The whole stream is in; the destination daemon is asked to run the domain
    /// (libvirt's Finish); the source's VM is paused.
    Finishing,
    /// The destination runs the domain; the source's VMM is to end.
    Finished,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Streaming => "streaming",
            Phase::Finishing => "finishing",
            Phase::Finished => "finished",
        }
    }
}

impl Outgoing {
    /// Records it (whole or not at all: written aside, then renamed), readable by
    /// the daemon's user only.
    fn record(&self, run: &driver::RunDir) -> Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = run.outgoing_migration();
        let aside = path.with_extension("json.new");
        let body = serde_json::to_vec(self).map_err(|e| {
            Error::io(
                "encoding the migration's phase for",
                &path,
                std::io::Error::other(e),
            )
        })?;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&aside)
            .and_then(|mut f| f.write_all(&body))
            .and_then(|()| std::fs::rename(&aside, &path))
            .map_err(|e| Error::io("recording the migration's phase in", &path, e))
    }

    fn at_phase(&mut self, run: &driver::RunDir, name: &str, phase: Phase) -> Result<()> {
        self.phase = phase;
        self.record(run)?;
        source_phase_hook(name, phase);
        Ok(())
    }

    /// The record in `run`, if one is there and reads.
    pub(crate) fn read(run: &driver::RunDir) -> Option<Outgoing> {
        let path = run.outgoing_migration();
        let body = std::fs::read(&path).ok()?;
        match serde_json::from_slice(&body) {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::warn!(path = %path.display(), "an unreadable migration record: {e}");
                None
            }
        }
    }

    fn remove(run: &driver::RunDir) {
        let _ = std::fs::remove_file(run.outgoing_migration());
    }
}

/// A client of the destination daemon `dest` (its socket, or `tcp://HOST:PORT` with its
/// token), and for TCP the host the stream goes to.
fn peer_client(
    dest: &str,
    dest_token: Option<&str>,
    tls: Option<&crate::tls::ClientTls>,
) -> Result<(crate::client::Client, Option<String>)> {
    match dest.strip_prefix("tcp://") {
        Some(addr) => {
            let token = dest_token.ok_or_else(|| {
                Error::invalid(
                    "dest_token",
                    "a tcp:// destination needs its daemon's token",
                )
            })?;
            let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
            Ok((
                crate::client::Client::tcp(addr, token).with_tls(tls.cloned()),
                Some(host.to_string()),
            ))
        }
        None => Ok((crate::client::Client::new(PathBuf::from(dest)), None)),
    }
}

/// 32 hex digits from the kernel's random source.
fn nonce() -> Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| Error::io("reading", Path::new("/dev/urandom"), e))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// What the destination daemon answers an incoming migration with.
#[derive(Debug)]
pub struct Incoming {
    /// Where the source sends the stream: `unix:PATH` or `tcp:IP:PORT`.
    pub url: String,
    /// The migration defined the domain here (a failed one undefines it again).
    pub defined: bool,
    /// Over TCP: the bytes the stream must start with.
    pub nonce: Option<String>,
    /// Over TCP: the stream must come over TLS (this daemon has certificates).
    pub tls: bool,
}

impl Manager {
    /// Destination side: defines `def` here (or finds it defined the same), starts its
    /// VMM waiting for the domain, and returns where the source is to send it and
    /// whether the domain was defined for it (a failed migration undefines it again).
    pub fn migrate_in(self: &Arc<Self>, def: DomainDef, tcp: bool) -> Result<Incoming> {
        let name = def.name.clone();
        let tcp = match tcp {
            false => None,
            true => {
                let ip = *self.tcp_ip.get().ok_or_else(|| {
                    Error::Unsupported(
                        "migration over TCP needs this daemon's TCP listener (--listen-tcp)".into(),
                    )
                })?;
                let l = TcpListener::bind((ip, 0)).map_err(|e| {
                    Error::io("listening for the migration on", Path::new("tcp"), e)
                })?;
                Some((l, nonce()?))
            }
        };
        let defined = match self.store.get_domain(&name) {
            Ok(have) => {
                if have.vm != def.vm || have.driver != def.driver {
                    return Err(Error::Conflict(format!(
                        "domain {name:?} is defined here with another configuration"
                    )));
                }
                false
            }
            Err(Error::NotFound { .. }) => {
                self.define(def)?;
                true
            }
            Err(e) => return Err(e),
        };
        // The serial log goes on, as the guest does (a domain migrating back continues
        // the log it left here).
        if let Err(e) = self.start_inner(&name, false, driver::Boot::Incoming, Start::Incoming) {
            if defined {
                let _ = self.undefine(&name);
            }
            return Err(e);
        }
        self.events
            .emit_with(&name, "migrating-in", "running", Some("migrated"), None);
        let vmm = self.run_dir(&name).incoming();
        let Some((listener, nonce)) = tcp else {
            return Ok(Incoming {
                url: format!("unix:{}", vmm.display()),
                defined,
                nonce: None,
                tls: false,
            });
        };
        let url = match listener.local_addr() {
            Ok(a) => format!("tcp:{a}"),
            Err(e) => {
                return Err(Error::io(
                    "listening for the migration on",
                    Path::new("tcp"),
                    e,
                ))
            }
        };
        let expect = nonce.clone();
        let domain = name.clone();
        let m = self.clone();
        let server = self.tls.get().map(|t| t.server.clone());
        let tls = server.is_some();
        std::thread::spawn(move || {
            let r = receive_tcp(listener, expect, vmm, server);
            tracing::info!(domain, ?r, tls, "migration stream received over TCP");
            if r.is_ok() {
                // From another machine: the switches between still send its frames there.
                m.announce_interfaces(&domain);
            }
        });
        Ok(Incoming {
            url,
            defined,
            nonce: Some(nonce),
            tls,
        })
    }

    /// This daemon's TLS as a client of other daemons (`--tls-*`).
    fn client_tls(&self) -> Option<&crate::tls::ClientTls> {
        self.tls.get().map(|t| &t.client)
    }

    /// Destination side, once the source has sent the whole stream: runs the domain that
    /// migrated in (libvirt's Finish). An error tells the source to run it on itself.
    pub fn migrate_finish(&self, name: &str) -> Result<()> {
        let l = self.domain_lock(name);
        let _g = lock(&l);
        let (id, _) = self.active_id(name)?;
        before_finish_hook(name);
        driver::of(id.driver).finish_incoming(&self.run_dir(name))
    }

    /// Destination side, asked by a source daemon that lost track of its migration (it
    /// died, and another started): whether the domain that migrated in runs here. When
    /// it does not (its stream or its finish never came), its VMM is destroyed, and with
    /// `undefine` (the migration defined it) the domain is undefined: the source runs it
    /// on. A domain not defined here does not run here.
    pub fn migrate_abandon(&self, name: &str, undefine: bool) -> Result<bool> {
        if self.store.get_domain(name).is_err() {
            return Ok(false);
        }
        let runs = {
            // After any finish under way.
            let l = self.domain_lock(name);
            let _g = lock(&l);
            match self.active_id(name) {
                Ok((id, _)) => Some(driver::of(id.driver).guest_runs(&self.run_dir(name))),
                Err(_) => None,
            }
        };
        if runs == Some(true) {
            tracing::info!(
                domain = name,
                "a source asked: the domain that migrated in runs here"
            );
            return Ok(true);
        }
        tracing::warn!(
            domain = name,
            "a source abandons its migration: the copy here goes"
        );
        if runs.is_some() {
            self.end_vmm(name, End::Destroyed)?;
        }
        if undefine {
            self.undefine(name)?;
        }
        Ok(false)
    }

    /// Source side, in a daemon that found the VMM of a domain whose outgoing migration
    /// its predecessor recorded (`rec`) ended while no daemon watched: with the whole
    /// stream in, the guest is only at the destination, paused there if its finish never
    /// came; it is asked to run it (its finish again: harmless where it runs already).
    /// The domain is then shut off here as migrated away.
    pub(crate) fn settle_gone_source(self: &Arc<Self>, name: &str, rec: Outgoing) {
        if rec.phase == Phase::Streaming {
            tracing::warn!(domain = name, dest = %rec.dest, "the VMM ended while its stream was sent and no daemon watched");
            return;
        }
        let finished = peer_client(&rec.dest, rec.dest_token.as_deref(), self.client_tls())
            .and_then(|(peer, _)| finish_at(&peer, &rec.dest, name));
        if let Err(e) = finished {
            tracing::error!(
                domain = name,
                "an unfinished migration whose source VMM ended: {e}"
            );
            return;
        }
        tracing::info!(domain = name, dest = %rec.dest, "the migration a previous daemon began went through");
        self.update(name, |r| {
            r.reason = crate::state::Reason::MigratedAway;
            r.why = Some(format!(
                "migrated to {} (settled after a daemon restart)",
                rec.dest
            ));
        });
        self.settled_away(name, &rec);
    }

    /// The end, here, of a migration a previous daemon began and the destination saw
    /// through: the domain undefined if the migration asked for it, and announced.
    fn settled_away(&self, name: &str, rec: &Outgoing) {
        if rec.undefine_source {
            let _ = self.undefine(name);
        }
        self.events.emit_with(
            name,
            "migrated",
            "shut off",
            Some("migrated"),
            Some(format!("to {} (settled after a daemon restart)", rec.dest)),
        );
    }

    /// Source side, in a daemon that re-adopted the VMM of a domain whose outgoing
    /// migration its predecessor recorded (`rec`) and did not see through: asks the
    /// destination whether the domain runs there (which, when it does not, destroys its
    /// copy); ends this VMM as migrated away if it does, runs the domain on here if not.
    /// A destination that cannot be reached leaves everything as found (the record too,
    /// for the next daemon), the VM paused: running it in two places is worse.
    pub(crate) fn settle_outgoing_migration(self: &Arc<Self>, name: &str, rec: Outgoing) {
        let run = self.run_dir(name);
        let asked = peer_client(&rec.dest, rec.dest_token.as_deref(), self.client_tls()).and_then(
            |(peer, _)| {
                let body = serde_json::json!({ "undefine": rec.defined_there });
                match peer.post(
                    &format!("/v1/domains/{name}/migration/abandon"),
                    Some(&body),
                ) {
                    Ok(v) => Ok(v.get("runs").and_then(|r| r.as_bool()) == Some(true)),
                    Err(e) => Err(Error::Conflict(format!(
                        "the destination daemon {}: {e}",
                        rec.dest
                    ))),
                }
            },
        );
        let runs_there = match asked {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(domain = name, phase = ?rec.phase, "an unfinished migration: {e}; left as found");
                return;
            }
        };
        if runs_there {
            tracing::info!(domain = name, dest = %rec.dest, "the migration a previous daemon began went through");
            if self.is_active(name) {
                if let Err(e) = self.end_vmm(name, End::MigratedAway) {
                    tracing::warn!(domain = name, "ending the source's VMM: {e}");
                }
            }
            Outgoing::remove(&run);
            self.settled_away(name, &rec);
            return;
        }
        tracing::warn!(domain = name, dest = %rec.dest, "the migration a previous daemon began did not finish: the domain runs on here");
        let resumed = (|| {
            let l = self.domain_lock(name);
            let _g = lock(&l);
            let (id, state) = self.active_id(name)?;
            // QEMU after its stream: stopped ("postmigrate"); `cont` takes its disks
            // back. A Vessel VMM runs on by itself when no answer comes (or its stream
            // broke with the daemon's relay).
            let d = driver::of(id.driver);
            if !d.guest_runs(&run) {
                d.resume(&run)?;
            }
            if state == crate::domain::DomainState::Paused {
                self.transition(name, crate::state::Event::Resumed)?;
            }
            Ok::<(), Error>(())
        })();
        Outgoing::remove(&run);
        match resumed {
            Ok(()) => self.announce(
                name,
                "resumed",
                Some(format!("the migration to {} did not finish", rec.dest)),
            ),
            Err(e) => tracing::error!(
                domain = name,
                "running the domain on after an unfinished migration: {e}"
            ),
        }
    }

    /// Source side: live-migrates the running domain `name` to the daemon whose
    /// API socket is `dest` (or `tcp://HOST:PORT`, its TCP API, with `dest_token`);
    /// returns the source VMM's report (rounds, downtime, total
    /// time). The domain is then shut off here, and with `undefine_source` undefined.
    /// Over TCP the API and the stream use TLS when this daemon has certificates; with
    /// `require_tls` (`migrate --tls`) a migration that cannot is refused, never sent in
    /// clear.
    pub fn migrate_out(
        self: &Arc<Self>,
        name: &str,
        dest: &str,
        dest_token: Option<&str>,
        undefine_source: bool,
        require_tls: bool,
    ) -> Result<serde_json::Value> {
        if require_tls {
            if !dest.starts_with("tcp://") {
                return Err(Error::invalid(
                    "--tls",
                    format!(
                        "{dest} is a Unix socket on this host, where the stream needs no \
                         TLS: --tls needs a tcp://HOST:PORT destination"
                    ),
                ));
            }
            if self.tls.get().is_none() {
                return Err(Error::Unsupported(
                    "migrate --tls: this daemon has no TLS certificate, and the stream \
                     would go in clear: start both daemons with --tls-cacert, --tls-cert \
                     and --tls-key (and --listen-tcp)"
                        .into(),
                ));
            }
        }
        let def = self.store.get_domain(name)?;
        let (id, _) = self.active_id(name)?;
        self.refuse_changed_live(name, "migrate")?;
        let d = driver::of(id.driver);
        // Over TCP the stream goes to the host this daemon reached the other at.
        let (peer, tcp_host) = peer_client(dest, dest_token, self.client_tls())?;
        let reached = |e: crate::client::ClientError| {
            Error::Conflict(format!("the destination daemon {dest}: {e}"))
        };
        let mut body = serde_json::json!({ "definition": def });
        if tcp_host.is_some() {
            body["transport"] = "tcp".into();
        }
        let v = peer
            .post("/v1/migrations/incoming", Some(&body))
            .map_err(reached)?;
        let defined_there = v.get("defined").and_then(|d| d.as_bool()) == Some(true);
        let url = v.get("url").and_then(|u| u.as_str()).unwrap_or_default();
        let target = match (&tcp_host, url.split_once(':')) {
            (None, Some(("unix", path))) => Some(Target::Unix(PathBuf::from(path))),
            (Some(host), Some(("tcp", addr))) => {
                let port = addr.rsplit_once(':').map(|(_, p)| p);
                let nonce = v.get("nonce").and_then(|n| n.as_str());
                // The destination's word: with certificates on both sides its API
                // answered over TLS, and its port takes the stream over TLS only.
                let there = v.get("tls").and_then(|t| t.as_bool()) == Some(true);
                let tls = self.client_tls().cloned();
                if there != tls.is_some() {
                    let _ = peer.post(&format!("/v1/domains/{name}/destroy"), None);
                    if defined_there {
                        let _ = peer.call("DELETE", &format!("/v1/domains/{name}"), None);
                    }
                    return Err(Error::Conflict(format!(
                        "the destination daemon {dest} {} TLS on its migration port and \
                         this daemon {}: start both with --tls-cacert, --tls-cert and --tls-key",
                        if there { "requires" } else { "has no" },
                        if tls.is_some() {
                            "has certificates"
                        } else {
                            "has none"
                        },
                    )));
                }
                port.zip(nonce).map(|(port, nonce)| Target::Tcp {
                    addr: format!("{host}:{port}"),
                    nonce: nonce.to_string(),
                    tls,
                })
            }
            _ => None,
        };
        let Some(target) = target else {
            return Err(Error::Conflict(format!(
                "the destination daemon {dest} gave no address to send to: {v}"
            )));
        };
        let run = self.run_dir(name);
        let relay_path = run.migrate_out();
        let _ = std::fs::remove_file(&relay_path);
        // From here a daemon that dies leaves the destination's VMM waiting: where the
        // migration stands is kept for the next one (`settle_outgoing_migration`).
        let mut outgoing = Outgoing {
            dest: dest.to_string(),
            dest_token: dest_token.map(str::to_string),
            defined_there,
            undefine_source,
            phase: Phase::Streaming,
        };
        let sent = (|| {
            outgoing.at_phase(&run, name, Phase::Streaming)?;
            let listener = UnixListener::bind(&relay_path)
                .map_err(|e| Error::io("listening for the migration", &relay_path, e))?;
            if let Some((uid, gid)) = d.vmm_user(&self.cfg.programs, &run) {
                // The VMM connects to it as its own user.
                std::os::unix::fs::chown(&relay_path, Some(uid), Some(gid))
                    .map_err(|e| Error::io("handing the migration socket over", &relay_path, e))?;
            }
            let relay = std::thread::spawn(move || relay(listener, target));
            let report = {
                let l = self.domain_lock(name);
                let _g = lock(&l);
                // The VMM ends once the destination runs the domain: as migrated.
                self.update(name, |r| r.ending = Some(End::MigratedAway));
                // The whole stream sent, the destination is asked to run the domain; the
                // source's VM stays paused until it does, and runs on here if it fails.
                let finishing = std::cell::RefCell::new(&mut outgoing);
                let finish = || {
                    finish_at(&peer, dest, name)?;
                    finishing.borrow_mut().at_phase(&run, name, Phase::Finished)
                };
                let sent = d.migrate(&run, &relay_path).and_then(|report| {
                    finishing
                        .borrow_mut()
                        .at_phase(&run, name, Phase::Finishing)?;
                    d.confirm_migration(&run, &finish).map(|()| report)
                });
                if sent.is_err() {
                    self.update(name, |r| r.ending = None);
                }
                sent
            };
            if report.is_err() {
                // Ends the relay's wait when the VMM never connected.
                let _ = UnixStream::connect(&relay_path);
            }
            let relayed = relay.join();
            let report = report?;
            tracing::info!(domain = name, ?relayed, "migration stream relayed");
            Ok(report)
        })();
        let _ = std::fs::remove_file(&relay_path);
        Outgoing::remove(&run);
        let report = match sent {
            Ok(r) => r,
            Err(e) => {
                // The destination's VMM ends with its broken stream; end it for sure, and
                // undefine the domain there if the migration defined it.
                let _ = peer.post(&format!("/v1/domains/{name}/destroy"), None);
                if defined_there {
                    let _ = peer.call("DELETE", &format!("/v1/domains/{name}"), None);
                }
                return Err(e);
            }
        };
        // The source's VMM ends by itself once the destination runs the domain.
        self.wait_for(name, Duration::from_secs(30), |r| {
            r.is_none_or(|r| r.vmm.is_none())
        });
        if self.is_active(name) {
            self.end_vmm(name, End::MigratedAway)?;
        }
        if undefine_source {
            self.undefine(name)?;
        }
        self.events.emit_with(
            name,
            "migrated",
            "shut off",
            Some("migrated"),
            Some(format!("to {dest}")),
        );
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The destination's TCP end passes on only the stream that starts with the nonce,
    /// without it, to the VMM's socket, and the VMM's answer back; a connection with
    /// other first bytes is dropped first.
    #[test]
    fn only_the_stream_with_the_nonce_reaches_the_vmm() {
        let dir = std::env::temp_dir().join(format!("mig-nonce-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let vmm_path = dir.join("incoming.sock");
        let vmm = UnixListener::bind(&vmm_path).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let nonce = nonce().unwrap();
        assert_eq!(nonce.len(), 32);
        let expect = nonce.clone();
        let receiver = std::thread::spawn(move || receive_tcp(l, expect, vmm_path, None));

        let mut stranger = TcpStream::connect(addr).unwrap();
        stranger.write_all(&[b'0'; 32]).unwrap();
        let mut buf = [0u8; 1];
        // Dropped: end of stream, or a reset.
        assert!(matches!(stranger.read(&mut buf), Ok(0) | Err(_)));

        let mut source = TcpStream::connect(addr).unwrap();
        source.write_all(nonce.as_bytes()).unwrap();
        source.write_all(b"the VM").unwrap();
        source.shutdown(std::net::Shutdown::Write).unwrap();
        let (mut at_vmm, _) = vmm.accept().unwrap();
        let mut got = Vec::new();
        at_vmm.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"the VM");
        at_vmm.write_all(b"ok").unwrap();
        drop(at_vmm);
        let mut answer = Vec::new();
        source.read_to_end(&mut answer).unwrap();
        assert_eq!(answer, b"ok");
        assert_eq!(receiver.join().unwrap().unwrap(), 6);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A connection that comes first and sends nothing does not delay the stream with
    /// the nonce behind it (it used to, by the nonce read's 10 s).
    #[test]
    fn a_silent_connection_does_not_hold_up_the_stream() {
        let dir = std::env::temp_dir().join(format!("mig-silent-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let vmm_path = dir.join("incoming.sock");
        let vmm = UnixListener::bind(&vmm_path).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let nonce = nonce().unwrap();
        let expect = nonce.clone();
        let receiver = std::thread::spawn(move || receive_tcp(l, expect, vmm_path, None));

        let silent = TcpStream::connect(addr).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let t0 = Instant::now();
        let mut source = TcpStream::connect(addr).unwrap();
        source.write_all(nonce.as_bytes()).unwrap();
        source.write_all(b"the VM").unwrap();
        source.shutdown(std::net::Shutdown::Write).unwrap();
        let (mut at_vmm, _) = vmm.accept().unwrap();
        let mut got = Vec::new();
        at_vmm.read_to_end(&mut got).unwrap();
        let waited = t0.elapsed();
        assert_eq!(got, b"the VM");
        assert!(
            waited < Duration::from_secs(2),
            "the stream waited {waited:?} behind a silent connection"
        );
        drop(at_vmm);
        assert_eq!(receiver.join().unwrap().unwrap(), 6);
        drop(silent);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
