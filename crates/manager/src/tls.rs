//! TLS on the daemon's TCP API and on migration streams between daemons
//! (`vessel daemon --listen-tcp ADDR --tls-cacert FILE --tls-cert FILE --tls-key FILE`), as
//! libvirt's `migrate --tls` with its PKI (a CA, and a certificate per host used both as
//! server and as client certificate, checked both ways).
//!
//! A daemon with certificates serves its TCP API over TLS only, and requires each client's
//! certificate to chain to the CA (mutual TLS); the bearer token is still checked. A
//! client (the CLI, or a daemon migrating a domain to another) checks the server's
//! certificate against the CA alone, for the host or IP address it connects to, and shows
//! its own. Migration streams over TCP go through TLS the same way, both sides checked.
//!
//! The HTTP server and client are blocking, and a rustls connection cannot be read and
//! written from two threads: each TLS connection is relayed by a task of a small tokio
//! runtime to one end of a Unix socket pair, whose other end the HTTP code uses as it
//! uses any connection ([`Relayed`]).
//!
//! The PEM files are read here for etcd's TLS too ([`crate::cluster::tls`]).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::rustls;
use vmm::api::http::{Conn, Peer};

use crate::error::{Error, Result};

/// How long a TLS handshake may take.
pub const HANDSHAKE_WAIT: Duration = Duration::from_secs(10);
/// Handshakes under way at once on the API's port; more connections wait for a slot.
const HANDSHAKES: usize = 64;
/// Handshakes under way at once from one address; more from it are dropped, so that one
/// client holding slow handshakes cannot take every slot.
const HANDSHAKES_PER_PEER: usize = 8;

/// Counts a peer's handshakes under way; its slot is given back when dropped.
struct PeerSlot {
    table: Arc<Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl PeerSlot {
    fn take(
        table: &Arc<Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
    ) -> Option<PeerSlot> {
        let mut t = table.lock().ok()?;
        let n = t.entry(ip).or_insert(0);
        if *n >= HANDSHAKES_PER_PEER {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            table: table.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        if let Ok(mut t) = self.table.lock() {
            if let Some(n) = t.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    t.remove(&self.ip);
                }
            }
        }
    }
}

/// Reads a PEM file and checks it holds a `marker` block (`BEGIN CERTIFICATE`,
/// `PRIVATE KEY`); `what` names the file and its option in errors.
pub(crate) fn read_pem(what: &'static str, path: &Path, marker: &str) -> Result<Vec<u8>> {
    let data = std::fs::read(path).map_err(|e| Error::io(what, path, e))?;
    if !String::from_utf8_lossy(&data).contains(marker) {
        return Err(Error::invalid(
            what,
            format!("{} holds no PEM \"{marker}\" block", path.display()),
        ));
    }
    Ok(data)
}

/// The certificates of a PEM file.
pub(crate) fn certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let pem = read_pem(what, path, "BEGIN CERTIFICATE")?;
    rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::invalid(what, format!("{}: {e}", path.display())))
}

/// The CA certificates of a PEM file, as the only roots trusted.
pub(crate) fn roots(what: &'static str, path: &Path) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(what, path)? {
        roots
            .add(c)
            .map_err(|e| Error::invalid(what, format!("{}: {e}", path.display())))?;
    }
    Ok(roots)
}

/// A certificate chain and its private key.
pub(crate) type Identity = (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

/// Reads a certificate (chain) and its private key.
pub(crate) fn identity(
    cert_what: &'static str,
    cert: &Path,
    key_what: &'static str,
    key: &Path,
) -> Result<Identity> {
    let chain = certs(cert_what, cert)?;
    let pem = read_pem(key_what, key, "PRIVATE KEY")?;
    let key = match rustls_pemfile::private_key(&mut pem.as_slice()) {
        Ok(Some(k)) => k,
        Ok(None) => {
            return Err(Error::invalid(
                key_what,
                format!("{} holds no private key rustls can read", key.display()),
            ))
        }
        Err(e) => return Err(Error::invalid(key_what, format!("{}: {e}", key.display()))),
    };
    Ok((chain, key))
}

/// The crypto provider (ring, as etcd-client's TLS uses: one stack in the binary; rustls
/// deprecates it for want of post-quantum key exchange).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    #[allow(deprecated)]
    let p = rustls::crypto::ring::default_provider();
    Arc::new(p)
}

/// The files of `--tls-cacert`, `--tls-cert` and `--tls-key`.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    /// The CA (PEM) every daemon's certificate chains to.
    pub cacert: Option<PathBuf>,
    /// This host's certificate (PEM), as server and as client.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
}

const CA: &str = "the TLS CA file (--tls-cacert)";
const CERT: &str = "the TLS certificate (--tls-cert)";
const KEY: &str = "the TLS key (--tls-key)";

impl TlsFiles {
    pub fn is_empty(&self) -> bool {
        self.cacert.is_none() && self.cert.is_none() && self.key.is_none()
    }

    fn identity(&self) -> Result<Option<Identity>> {
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Ok(Some(identity(CERT, c, KEY, k)?)),
            (None, None) => Ok(None),
            _ => Err(Error::invalid(
                "TLS options",
                "--tls-cert and --tls-key go together: the certificate and its key",
            )),
        }
    }
}

/// A client's side: the CA the server's certificate must chain to, and the client's own
/// certificate when it has one.
#[derive(Clone, Debug)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    has_cert: bool,
}

impl ClientTls {
    /// From the files: `--tls-cacert` is needed, `--tls-cert`/`--tls-key` optional (a
    /// daemon with TLS refuses a client without them, with an error saying so).
    pub fn load(files: &TlsFiles) -> Result<ClientTls> {
        let Some(ca) = &files.cacert else {
            return Err(Error::invalid(
                "TLS options",
                "TLS needs --tls-cacert FILE: the CA that signed the daemons' certificates",
            ));
        };
        let roots = roots(CA, ca)?;
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::invalid("TLS", e.to_string()))?
            .with_root_certificates(roots);
        let (config, has_cert) = match files.identity()? {
            Some((chain, key)) => (
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| Error::invalid(CERT, format!("with its key: {e}")))?,
                true,
            ),
            None => (builder.with_no_client_auth(), false),
        };
        Ok(ClientTls {
            config: Arc::new(config),
            has_cert,
        })
    }
}

/// A daemon's side: its certificate as server (and as client of other daemons), and the
/// CA its clients' certificates must chain to.
#[derive(Clone, Debug)]
pub struct DaemonTls {
    pub server: Arc<rustls::ServerConfig>,
    pub client: ClientTls,
}

impl DaemonTls {
    /// From the files, all three needed; the certificate must chain to the CA (checked
    /// here, so that a wrong file is named at start, not at the first migration).
    pub fn load(files: &TlsFiles) -> Result<DaemonTls> {
        let (Some(ca), Some(cert), Some(key)) = (&files.cacert, &files.cert, &files.key) else {
            return Err(Error::invalid(
                "TLS options",
                "a daemon serving TLS needs all of --tls-cacert, --tls-cert and --tls-key \
                 (its certificate is checked by its clients, and theirs by it)",
            ));
        };
        let roots = Arc::new(roots(CA, ca)?);
        let (chain, private) = identity(CERT, cert, KEY, key)?;
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(|e| Error::invalid(CA, format!("{}: {e}", ca.display())))?;
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Err(Error::invalid(
                CERT,
                format!("{} holds no certificate", cert.display()),
            ));
        };
        verifier
            .verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now())
            .map_err(|e| {
                Error::invalid(
                    CERT,
                    format!(
                        "{} does not chain to the CA of --tls-cacert {}: {e}",
                        cert.display(),
                        ca.display()
                    ),
                )
            })?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::invalid("TLS", e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, private)
            .map_err(|e| Error::invalid(KEY, format!("{}: {e}", key.display())))?;
        Ok(DaemonTls {
            server: Arc::new(server),
            client: ClientTls::load(files)?,
        })
    }
}

/// What a TLS failure's text means for the options.
pub fn hint(msg: &str, has_cert: bool) -> Option<&'static str> {
    let m = msg.to_ascii_lowercase();
    if m.contains("unknownissuer") || m.contains("unknown issuer") || m.contains("badsignature") {
        Some("the server's certificate is not signed by the CA of --tls-cacert")
    } else if m.contains("notvalidforname") || m.contains("not valid for name") {
        Some(
            "the server's certificate does not name the host or address connected to: \
             reissue it with that name or IP address among its subject alternative names",
        )
    } else if m.contains("expired") || m.contains("notvalidyet") {
        Some("a certificate is outside its validity period")
    } else if m.contains("certificaterequired")
        || m.contains("certificate required")
        || !has_cert && (m.contains("badcertificate") || m.contains("bad certificate"))
    {
        Some(
            "the daemon requires a client certificate: give --tls-cert and --tls-key, \
             signed by the daemon's CA",
        )
    } else if m.contains("badcertificate")
        || m.contains("bad certificate")
        || m.contains("unknownca")
        || m.contains("unknown ca")
        || m.contains("decrypterror")
    {
        Some("the daemon refused this client's certificate (--tls-cert): it must chain to the daemon's CA")
    } else if m.contains("invalidcontenttype") || m.contains("corrupt message") {
        Some("is TLS used on both ends? the daemon's --tls-* options and the client's must match")
    } else if m.contains("handshake") || m.contains("tls") || m.contains("certificate") {
        Some("a TLS handshake failed: check --tls-cacert, --tls-cert and --tls-key")
    } else {
        None
    }
}

fn explained(e: std::io::Error, has_cert: bool) -> std::io::Error {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        let t = s.to_string();
        if !msg.contains(&t) {
            msg = format!("{msg}: {t}");
        }
        src = s.source();
    }
    if let Some(h) = hint(&msg, has_cert) {
        msg = format!("TLS: {msg} ({h})");
    }
    std::io::Error::new(e.kind(), msg)
}

/// A current-thread tokio runtime for one relay.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Copies between `a` and `b` both ways until both directions end; when `b`'s side
/// (the local, trusted one) ends first, `a` gets `linger` more to finish. Returns the
/// bytes from `a` to `b`, or the first error (which ends both directions).
async fn splice<A, B>(a: A, b: B, linger: Option<Duration>) -> std::io::Result<u64>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    // Each direction passes its end of stream on; an error is not passed on as one (the
    // caller closes, after noting why).
    let up = async {
        let n = tokio::io::copy(&mut ar, &mut bw).await?;
        let _ = bw.shutdown().await;
        Ok::<u64, std::io::Error>(n)
    };
    let down = async {
        let n = tokio::io::copy(&mut br, &mut aw).await?;
        let _ = aw.shutdown().await;
        Ok::<u64, std::io::Error>(n)
    };
    tokio::pin!(up, down);
    // An error either way ends both (a broken TLS connection, a refused certificate):
    // the other direction may wait on a peer that never closes.
    tokio::select! {
        d = &mut down => {
            d?;
            match linger {
                Some(t) => tokio::time::timeout(t, &mut up).await.unwrap_or(Ok(0)),
                None => up.await,
            }
        }
        u = &mut up => {
            let n = u?;
            down.await?;
            Ok(n)
        }
    }
}

/// One end of a Unix socket pair whose other end a relay task passes to and from a TLS
/// connection: a [`Conn`] for the HTTP server and client.
pub struct Relayed {
    sock: UnixStream,
    peer: Peer,
    /// The relay's error, given to a read that finds the pair closed.
    err: Arc<Mutex<Option<String>>>,
}

impl Read for Relayed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.sock.read(buf).map_err(|e| self.why(e))?;
        if n == 0 && !buf.is_empty() {
            if let Some(e) = self.err.lock().ok().and_then(|e| e.clone()) {
                return Err(std::io::Error::other(e));
            }
        }
        Ok(n)
    }
}

impl Relayed {
    /// The relay's error in place of `e` (a broken pipe once the relay ended), if any.
    fn why(&self, e: std::io::Error) -> std::io::Error {
        match self.err.lock().ok().and_then(|e| e.clone()) {
            Some(why) => std::io::Error::other(why),
            None => e,
        }
    }
}

impl Write for Relayed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sock.write(buf).map_err(|e| self.why(e))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.sock.flush()
    }
}

impl Conn for Relayed {
    fn try_clone_conn(&self) -> std::io::Result<Box<dyn Conn>> {
        Ok(Box::new(Relayed {
            sock: self.sock.try_clone()?,
            peer: self.peer,
            err: self.err.clone(),
        }))
    }
    fn shutdown_conn(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
    fn set_read_timeout_conn(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.sock.set_read_timeout(t)
    }
    fn set_write_timeout_conn(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.sock.set_write_timeout(t)
    }
    fn peer_conn(&self) -> Peer {
        self.peer
    }
    fn raw_fd_conn(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.sock)
    }
}

/// A socket pair: the blocking end for the HTTP code, the other for a relay task (made a
/// tokio stream within its runtime).
fn pair(peer: Peer) -> std::io::Result<(Relayed, UnixStream)> {
    let (mine, theirs) = UnixStream::pair()?;
    theirs.set_nonblocking(true)?;
    Ok((
        Relayed {
            sock: mine,
            peer,
            err: Arc::new(Mutex::new(None)),
        },
        theirs,
    ))
}

/// The server name to check the certificate of `host` (a name or an IP address) for.
fn server_name(host: &str) -> std::io::Result<rustls::pki_types::ServerName<'static>> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{host:?} is no host name for TLS: {e}"),
        )
    })
}

/// `HOST` of `HOST:PORT`.
pub fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

impl ClientTls {
    /// A TLS connection over `tcp` to the server `host`, handshake done, as a blocking
    /// [`Conn`] (relayed by a thread of its own).
    pub fn connect(&self, tcp: std::net::TcpStream, host: &str) -> std::io::Result<Relayed> {
        let name = server_name(host)?;
        let peer = tcp.peer_addr().map_or(Peer::Unknown, |a| Peer::Ip(a.ip()));
        tcp.set_nodelay(true)?;
        tcp.set_nonblocking(true)?;
        let (conn, theirs) = pair(peer)?;
        let err = conn.err.clone();
        let config = self.config.clone();
        let has_cert = self.has_cert;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
        std::thread::Builder::new()
            .name("tls-client".into())
            .spawn(move || {
                let rt = match runtime() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    let connected = async {
                        let tcp = tokio::net::TcpStream::from_std(tcp)?;
                        let c = tokio_rustls::TlsConnector::from(config);
                        match tokio::time::timeout(HANDSHAKE_WAIT, c.connect(name, tcp)).await {
                            Ok(r) => r,
                            Err(_) => Err(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "the TLS handshake took too long",
                            )),
                        }
                    };
                    let tls = match connected.await {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = ready_tx.send(Err(explained(e, has_cert)));
                            return;
                        }
                    };
                    let theirs = match tokio::net::UnixStream::from_std(theirs) {
                        Ok(t) => t,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    // The pair stays open until the error is in its slot: the reader
                    // that then finds it closed gives the error, not an end of stream.
                    let hold = std::os::fd::AsFd::as_fd(&theirs).try_clone_to_owned();
                    if let Err(e) = splice(tls, theirs, None).await {
                        let e = explained(e, has_cert);
                        tracing::debug!("a TLS connection ended: {e}");
                        if let Ok(mut slot) = err.lock() {
                            *slot = Some(e.to_string());
                        }
                    }
                    drop(hold);
                });
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(conn),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(std::io::Error::other("the TLS relay thread ended")),
        }
    }

    /// Connects to `addr` over TLS (server name: its host), sends `first` (the nonce)
    /// and passes `from` (a local stream) to it and its answer back, until both ends
    /// close; returns the bytes sent. For the source side of a migration.
    pub fn send_stream(&self, from: UnixStream, addr: &str, first: &[u8]) -> std::io::Result<u64> {
        let name = server_name(host_of(addr))?;
        let tcp = std::net::TcpStream::connect(addr)?;
        tcp.set_nodelay(true)?;
        tcp.set_nonblocking(true)?;
        from.set_nonblocking(true)?;
        let config = self.config.clone();
        let has_cert = self.has_cert;
        runtime()?.block_on(async move {
            let tcp = tokio::net::TcpStream::from_std(tcp)?;
            let c = tokio_rustls::TlsConnector::from(config);
            let mut tls = match tokio::time::timeout(HANDSHAKE_WAIT, c.connect(name, tcp)).await {
                Ok(r) => r.map_err(|e| explained(e, has_cert))?,
                Err(_) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the TLS handshake took too long",
                    ))
                }
            };
            tls.write_all(first).await?;
            let from = tokio::net::UnixStream::from_std(from)?;
            splice(from, tls, None)
                .await
                .map_err(|e| explained(e, has_cert))
        })
    }
}

/// A TLS connection a migration port accepted whose first bytes were its nonce, with
/// the runtime its socket belongs to.
pub struct AcceptedStream {
    rt: tokio::runtime::Runtime,
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
}

/// Destination side of a migration over TLS: the handshake on `tcp` (the client's
/// certificate checked), then `nonce.len()` bytes, within `wait`; the stream when they
/// are the nonce.
pub fn accept_stream(
    server: &Arc<rustls::ServerConfig>,
    tcp: std::net::TcpStream,
    nonce: &[u8],
    wait: Duration,
) -> std::io::Result<AcceptedStream> {
    tcp.set_nodelay(true)?;
    tcp.set_nonblocking(true)?;
    let rt = runtime()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(server.clone());
    let tls = rt.block_on(async {
        let tcp = tokio::net::TcpStream::from_std(tcp)?;
        let checked = async {
            let mut tls = acceptor.accept(tcp).await?;
            let mut got = vec![0u8; nonce.len()];
            tls.read_exact(&mut got).await?;
            if got != nonce {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "not this migration's nonce",
                ));
            }
            Ok(tls)
        };
        tokio::time::timeout(wait, checked)
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no TLS handshake and nonce in time",
                ))
            })
    })?;
    Ok(AcceptedStream { rt, tls })
}

impl AcceptedStream {
    /// Passes the stream to `to` (the VMM's socket) and its answer back; the bytes
    /// received.
    pub fn pump_to(self, to: UnixStream) -> std::io::Result<u64> {
        to.set_nonblocking(true)?;
        let AcceptedStream { rt, tls } = self;
        rt.block_on(async move {
            let to = tokio::net::UnixStream::from_std(to)?;
            splice(tls, to, None).await
        })
    }
}

/// Serves the API over TLS on `listener`: each connection's handshake (the client's
/// certificate checked against the CA) and relay run on a tokio runtime; the decrypted
/// connections go to the blocking HTTP server as [`Relayed`] ones, with their client's
/// address for its per-client caps. Returns when the runtime cannot start.
pub fn serve_api(
    listener: std::net::TcpListener,
    server: Arc<rustls::ServerConfig>,
    handler: Arc<dyn vmm::api::http::Handler>,
    json_error: fn(u16, String) -> vmm::api::http::Response,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tls-api")
        .enable_all()
        .build()?;
    let (tx, rx) = std::sync::mpsc::channel::<Relayed>();
    std::thread::Builder::new()
        .name("tls-api-http".into())
        .spawn(move || {
            let rx = Mutex::new(rx);
            vmm::api::http::serve_accepted(
                || match rx.lock() {
                    Ok(rx) => rx
                        .recv()
                        .map(|c| Box::new(c) as Box<dyn Conn>)
                        .map_err(|_| std::io::Error::other("the TLS listener ended")),
                    Err(_) => Err(std::io::Error::other("the TLS listener ended")),
                },
                handler,
                json_error,
            )
        })?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let slots = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES));
        let peers = Arc::new(Mutex::new(std::collections::HashMap::new()));
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(peer_slot) = PeerSlot::take(&peers, addr.ip()) else {
                tracing::info!(peer = %addr, "too many TLS handshakes from one address: dropped");
                continue;
            };
            let Ok(slot) = slots.clone().acquire_owned().await else {
                continue;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let tls = match tokio::time::timeout(HANDSHAKE_WAIT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::info!(peer = %addr, "a TLS client refused: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(peer = %addr, "a TLS client's handshake took too long");
                        return;
                    }
                };
                drop((slot, peer_slot));
                let pair = pair(Peer::Ip(addr.ip())).and_then(|(conn, theirs)| {
                    Ok((conn, tokio::net::UnixStream::from_std(theirs)?))
                });
                let (conn, theirs) = match pair {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!("no socket pair for a TLS connection: {e}");
                        return;
                    }
                };
                if tx.send(conn).is_err() {
                    return;
                }
                // The server's side ended (its answer sent): the client gets a moment to
                // read it, not forever.
                if let Err(e) = splice(tls, theirs, Some(Duration::from_secs(5))).await {
                    tracing::debug!(peer = %addr, "a TLS connection ended: {e}");
                }
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    /// A test PKI made by scripts/tls-test-certs.sh (the openssl CLI).
    fn certs(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vessel-tls-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/tls-test-certs.sh");
        let ok = std::process::Command::new("sh")
            .arg(&script)
            .arg(&dir)
            .status()
            .expect("sh not found");
        assert!(
            ok.success(),
            "{} failed: is openssl installed (apt-get install openssl)?",
            script.display()
        );
        dir
    }

    fn files(dir: &Path, ca: &str, leaf: &str) -> TlsFiles {
        TlsFiles {
            cacert: Some(dir.join(format!("{ca}.pem"))),
            cert: Some(dir.join(format!("{leaf}.pem"))),
            key: Some(dir.join(format!("{leaf}.key"))),
        }
    }

    #[test]
    fn bad_files_are_named_with_their_option() {
        let dir = certs("files");
        DaemonTls::load(&files(&dir, "ca", "dst")).unwrap();
        let e = DaemonTls::load(&files(&dir, "ca", "other"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--tls-cert") && e.contains("does not chain") && e.contains("other.pem"),
            "{e}"
        );
        let mut f = files(&dir, "ca", "dst");
        f.cacert = Some(dir.join("missing-ca.pem"));
        let e = DaemonTls::load(&f).unwrap_err().to_string();
        assert!(
            e.contains("--tls-cacert") && e.contains("missing-ca.pem"),
            "{e}"
        );
        let mut f = files(&dir, "ca", "dst");
        f.key = Some(dir.join("dst.pem"));
        let e = DaemonTls::load(&f).unwrap_err().to_string();
        assert!(e.contains("--tls-key") && e.contains("PRIVATE KEY"), "{e}");
        // Hostile contents: a truncated PEM block is an error, not a panic.
        std::fs::write(dir.join("bad.pem"), "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
        let mut f = files(&dir, "ca", "dst");
        f.cert = Some(dir.join("bad.pem"));
        assert!(DaemonTls::load(&f).is_err());
        let mut f = files(&dir, "ca", "dst");
        f.key = None;
        let e = DaemonTls::load(&f).unwrap_err().to_string();
        assert!(e.contains("--tls-key"), "{e}");
        let e = ClientTls::load(&TlsFiles::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--tls-cacert"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn one_address_holds_a_few_handshake_slots_only() {
        let table = Arc::new(Mutex::new(std::collections::HashMap::new()));
        let (a, b) = ([127, 0, 0, 2].into(), [127, 0, 0, 3].into());
        let mut held: Vec<PeerSlot> = (0..HANDSHAKES_PER_PEER)
            .map(|_| PeerSlot::take(&table, a).unwrap())
            .collect();
        assert!(PeerSlot::take(&table, a).is_none());
        assert!(PeerSlot::take(&table, b).is_some());
        held.pop();
        assert!(PeerSlot::take(&table, a).is_some());
        held.clear();
        assert!(table.lock().unwrap().is_empty());
    }

    /// A relay that records what the source sends, as a capture of the wire would.
    fn recording_proxy(
        to: std::net::SocketAddr,
    ) -> (std::net::SocketAddr, std::thread::JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut a, _) = l.accept().unwrap();
            let mut b = TcpStream::connect(to).unwrap();
            let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
            let back = std::thread::spawn(move || {
                let _ = std::io::copy(&mut b2, &mut a2);
                let _ = a2.shutdown(std::net::Shutdown::Write);
            });
            let mut seen = Vec::new();
            let mut buf = [0u8; 65536];
            loop {
                match a.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        seen.extend_from_slice(&buf[..n]);
                        if b.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = b.shutdown(std::net::Shutdown::Write);
            let _ = back.join();
            seen
        });
        (addr, t)
    }

    /// A migration stream between two daemons' certificates arrives whole, with the
    /// answer back, and what crosses the wire holds neither the data nor the nonce.
    #[test]
    fn the_stream_is_encrypted_and_both_sides_checked() {
        let dir = certs("stream");
        let dst = DaemonTls::load(&files(&dir, "ca", "dst")).unwrap();
        let src = DaemonTls::load(&files(&dir, "ca", "src")).unwrap();
        let marker = b"VESSEL-GUEST-MEMORY-MARKER-0123456789".repeat(1000);
        let nonce = b"0123456789abcdef0123456789abcdef";

        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let (proxy, seen) = recording_proxy(l.local_addr().unwrap());
        let server = dst.server.clone();
        let receiver = std::thread::spawn(move || {
            let (tcp, _) = l.accept().unwrap();
            let s = accept_stream(&server, tcp, nonce, Duration::from_secs(10)).unwrap();
            let (vmm, mut at_vmm) = UnixStream::pair().unwrap();
            let reader = std::thread::spawn(move || {
                let mut got = Vec::new();
                at_vmm.read_to_end(&mut got).unwrap();
                at_vmm.write_all(b"ok").unwrap();
                got
            });
            let n = s.pump_to(vmm).unwrap();
            (n, reader.join().unwrap())
        });
        let (from, mut vm) = UnixStream::pair().unwrap();
        let data = marker.clone();
        let writer = std::thread::spawn(move || {
            vm.write_all(&data).unwrap();
            vm.shutdown(std::net::Shutdown::Write).unwrap();
            let mut answer = Vec::new();
            vm.read_to_end(&mut answer).unwrap();
            answer
        });
        let sent = src
            .client
            .send_stream(from, &proxy.to_string(), nonce)
            .unwrap();
        assert_eq!(sent, marker.len() as u64);
        assert_eq!(writer.join().unwrap(), b"ok");
        let (n, got) = receiver.join().unwrap();
        assert_eq!(n, marker.len() as u64);
        assert_eq!(got, marker);
        let wire = seen.join().unwrap();
        assert!(
            wire.len() > marker.len(),
            "{} bytes on the wire",
            wire.len()
        );
        let has = |needle: &[u8]| wire.windows(needle.len()).any(|w| w == needle);
        assert!(
            !has(b"VESSEL-GUEST-MEMORY-MARKER"),
            "the stream went in clear"
        );
        assert!(!has(nonce), "the nonce went in clear");

        // A source whose certificate is from another CA is refused by the destination.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = dst.server.clone();
        let receiver = std::thread::spawn(move || {
            let (tcp, _) = l.accept().unwrap();
            accept_stream(&server, tcp, nonce, Duration::from_secs(10)).map(|_| ())
        });
        // (It trusts the right CA: the destination's certificate passes.)
        let stranger = ClientTls::load(&files(&dir, "ca", "other")).unwrap();
        let (from, _vm) = UnixStream::pair().unwrap();
        let sent = stranger.send_stream(from, &addr.to_string(), nonce);
        let e = receiver.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("UnknownIssuer"), "{e}");
        let e = sent.unwrap_err().to_string();
        assert!(e.contains("refused this client's certificate"), "{e}");

        // A destination whose certificate the source's CA did not sign is refused by it.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let alien = {
            let f = files(&dir, "other-ca", "other");
            DaemonTls::load(&f).unwrap().server
        };
        std::thread::spawn(move || {
            let (tcp, _) = l.accept().unwrap();
            let _ = accept_stream(&alien, tcp, nonce, Duration::from_secs(5));
        });
        let (from, _vm) = UnixStream::pair().unwrap();
        let e = src
            .client
            .send_stream(from, &addr.to_string(), nonce)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not signed by the CA of --tls-cacert"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
