//! A small HTTP/1.1 server and client over Unix sockets, shared by the VMM's control API and
//! the manager daemon. Requests carry `Content-Length` bodies (no chunked encoding); each
//! connection is served on its own thread; a handler can take the connection over after its
//! response (console attach). Headers are parsed with `httparse`; sizes are bounded, so a
//! hostile client gets a 4xx and a closed connection, never a panic or an unbounded buffer.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

/// A connection the server and client can use: a Unix or TCP stream.
pub trait Conn: Read + Write + Send + 'static {
    fn try_clone_conn(&self) -> io::Result<Box<dyn Conn>>;
    fn shutdown_conn(&self);
    fn set_read_timeout_conn(&self, t: Option<std::time::Duration>) -> io::Result<()>;
    fn set_write_timeout_conn(&self, t: Option<std::time::Duration>) -> io::Result<()>;
    /// Who is at the other end, for the per-client connection cap.
    fn peer_conn(&self) -> Peer;
    /// The peer process's credentials, on a Unix socket (`SO_PEERCRED`).
    fn cred_conn(&self) -> Option<Cred> {
        None
    }
    /// The descriptor, for a handler that polls an upgraded connection (WebSocket).
    fn raw_fd_conn(&self) -> std::os::fd::RawFd;
}

impl Conn for UnixStream {
    fn try_clone_conn(&self) -> io::Result<Box<dyn Conn>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_conn(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
    fn set_read_timeout_conn(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
    fn set_write_timeout_conn(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        self.set_write_timeout(t)
    }
    fn peer_conn(&self) -> Peer {
        Peer::Local
    }
    fn cred_conn(&self) -> Option<Cred> {
        let mut c = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: SO_PEERCRED writes at most `len` bytes into `c`, a valid ucred; the
        // descriptor is this stream's own.
        let rc = unsafe {
            libc::getsockopt(
                self.raw_fd_conn(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                &mut c as *mut libc::ucred as *mut libc::c_void,
                &mut len,
            )
        };
        (rc == 0).then_some(Cred {
            pid: c.pid,
            uid: c.uid,
            gid: c.gid,
        })
    }
    fn raw_fd_conn(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(self)
    }
}

impl Conn for TcpStream {
    fn try_clone_conn(&self) -> io::Result<Box<dyn Conn>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_conn(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
    fn set_read_timeout_conn(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
    fn set_write_timeout_conn(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        self.set_write_timeout(t)
    }
    fn peer_conn(&self) -> Peer {
        match self.peer_addr() {
            Ok(a) => Peer::Ip(a.ip()),
            Err(_) => Peer::Unknown,
        }
    }
    fn raw_fd_conn(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(self)
    }
}

/// A Unix socket peer's credentials, as the kernel recorded them when it connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cred {
    /// 0 when the peer is in a PID namespace the server cannot see.
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// The client a connection comes from, as far as the per-client caps are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A Unix socket's peer: the socket file's permissions already decide who connects.
    Local,
    /// A TCP peer, by address.
    Ip(std::net::IpAddr),
    /// A TCP peer whose address could not be read.
    Unknown,
}

/// Longest request or response head (request line + headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// Largest body accepted (volume uploads come in chunks below this).
pub const MAX_BODY: usize = 64 * 1024 * 1024;
const MAX_HEADERS: usize = 64;
/// Connections served at once; more get a 503.
pub const MAX_CONNECTIONS: usize = 512;
/// How long a connection may stay silent while a request is expected (between requests
/// on a kept-alive connection, and within a body), and how long a response may wait for
/// a client that does not read it.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
/// How long a client has for one whole request head: from the connection's accept for
/// the first request, from its first byte for the next ones. Per read, the idle timeout
/// never fired on a client trickling a byte at a time.
pub const HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The slowest body accepted, on top of [`HEAD_TIMEOUT`]: a body of N bytes must arrive
/// within `HEAD_TIMEOUT + N / MIN_BODY_RATE` seconds.
pub const MIN_BODY_RATE: u64 = 64 * 1024;
/// A connection that has not yet had a request admitted ("pending": no complete head,
/// or no token yet) may be closed to make room for a new one once it is this old. A
/// client's head arrives with its connection; a burst of parallel connections gets 503s
/// rather than resets.
pub const PENDING_GRACE: std::time::Duration = std::time::Duration::from_millis(250);
/// On TCP: connections one client address may hold, and how many of them pending.
pub const MAX_PER_CLIENT: usize = 64;
pub const MAX_PENDING_PER_CLIENT: usize = 16;

/// The connection caps and timeouts of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections one [`Peer`] may hold.
    pub per_client: usize,
    /// Pending connections (no request admitted yet) one [`Peer`] may hold.
    pub pending_per_client: usize,
    /// See [`HEAD_TIMEOUT`].
    pub head_timeout: std::time::Duration,
    /// See [`PENDING_GRACE`].
    pub pending_grace: std::time::Duration,
}

impl Limits {
    /// A Unix socket: its file's permissions decide who connects; one cap for everyone.
    pub const UNIX: Limits = Limits {
        max_connections: MAX_CONNECTIONS,
        per_client: MAX_CONNECTIONS,
        pending_per_client: MAX_CONNECTIONS,
        head_timeout: HEAD_TIMEOUT,
        pending_grace: PENDING_GRACE,
    };
    /// A TCP listener: per-address caps as well.
    pub const TCP: Limits = Limits {
        max_connections: MAX_CONNECTIONS,
        per_client: MAX_PER_CLIENT,
        pending_per_client: MAX_PENDING_PER_CLIENT,
        head_timeout: HEAD_TIMEOUT,
        pending_grace: PENDING_GRACE,
    };
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("malformed HTTP message: {0}")]
    Malformed(String),
    #[error("HTTP head longer than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("body of {0} bytes is larger than the {MAX_BODY}-byte limit")]
    BodyTooLarge(u64),
    #[error("chunked transfer encoding is not supported; send Content-Length")]
    Chunked,
    #[error("connection closed before the message ended")]
    Truncated,
}

/// One request, fully read.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub method: String,
    /// The path without the query string, percent-decoded.
    pub path: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Who sent it, on a Unix socket: an API that opens files names checks them against
    /// these credentials.
    pub peer: Option<Cred>,
}

impl Request {
    /// The first query parameter named `name`.
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Path segments, without empty ones.
    pub fn segments(&self) -> Vec<&str> {
        self.path.split('/').filter(|s| !s.is_empty()).collect()
    }
}

/// A response to send.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(status: u16, value: &serde_json::Value) -> Self {
        let mut body = serde_json::to_vec(value).unwrap_or_default();
        body.push(b'\n');
        Response {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body,
        }
    }

    pub fn empty(status: u16) -> Self {
        Response {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn bytes(status: u16, content_type: &'static str, body: Vec<u8>) -> Self {
        Response {
            status,
            content_type,
            headers: Vec::new(),
            body,
        }
    }
}

/// Takes the connection over after the response head was sent.
pub type Upgrade = Box<dyn FnOnce(Box<dyn Conn>) + Send>;

/// What a handler answers.
pub enum Reply {
    Response(Response),
    /// Send the response head (its body must be empty), then hand the socket over.
    Upgrade(Response, Upgrade),
}

impl From<Response> for Reply {
    fn from(r: Response) -> Self {
        Reply::Response(r)
    }
}

pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: Request) -> Reply;

    /// Called with the request's head before a byte of its body is read (`req.body` is
    /// empty; `body_len` is its Content-Length): `Some(response)` refuses the request
    /// (a credential check, a body over this API's cap), its body is never read and the
    /// connection closes. Bodies above [`MAX_BODY`] are refused after this in any case.
    fn admit(&self, req: &Request, body_len: u64) -> Option<Response> {
        let _ = (req, body_len);
        None
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Percent-encode a path segment or query value.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

/// Reads bytes up to and including the blank line ending a head. `Ok(None)` on a clean EOF
/// before any byte.
fn read_head<R: BufRead>(r: &mut R) -> Result<Option<Vec<u8>>, HttpError> {
    let mut head = Vec::new();
    loop {
        let n = r.by_ref().take(8192).read_until(b'\n', &mut head)?;
        if n == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(HttpError::Truncated)
            };
        }
        if head.len() > MAX_HEAD {
            return Err(HttpError::HeadTooLarge);
        }
        if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") || head == b"\r\n" {
            if head == b"\r\n" {
                // Stray empty line between requests: skip it.
                head.clear();
                continue;
            }
            return Ok(Some(head));
        }
    }
}

fn content_length(headers: &[(String, String)]) -> Result<usize, HttpError> {
    let len = declared_length(headers)?;
    if len > MAX_BODY as u64 {
        return Err(HttpError::BodyTooLarge(len));
    }
    Ok(len as usize)
}

/// The Content-Length a head declares (0 without one), unchecked against [`MAX_BODY`].
fn declared_length(headers: &[(String, String)]) -> Result<u64, HttpError> {
    let mut len = 0u64;
    for (k, v) in headers {
        if k.eq_ignore_ascii_case("transfer-encoding") && !v.eq_ignore_ascii_case("identity") {
            return Err(HttpError::Chunked);
        }
        if k.eq_ignore_ascii_case("content-length") {
            len = v
                .trim()
                .parse()
                .map_err(|_| HttpError::Malformed(format!("bad Content-Length {v:?}")))?;
        }
    }
    Ok(len)
}

fn read_body<R: Read>(r: &mut R, len: usize) -> Result<Vec<u8>, HttpError> {
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => HttpError::Truncated,
        _ => HttpError::Io(e),
    })?;
    Ok(body)
}

/// Reads one request; `Ok(None)` when the peer closed the connection between requests.
pub fn read_request<R: BufRead>(r: &mut R) -> Result<Option<Request>, HttpError> {
    let Some((mut req, len)) = read_request_head(r)? else {
        return Ok(None);
    };
    if len > MAX_BODY as u64 {
        return Err(HttpError::BodyTooLarge(len));
    }
    req.body = read_body(r, len as usize)?;
    Ok(Some(req))
}

/// Reads one request's head: the request with an empty body, and the body's declared
/// length (not yet checked against any cap).
fn read_request_head<R: BufRead>(r: &mut R) -> Result<Option<(Request, u64)>, HttpError> {
    let Some(head) = read_head(r)? else {
        return Ok(None);
    };
    let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut hdrs);
    match parsed.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HttpError::Truncated),
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    }
    let method = parsed.method.unwrap_or("").to_string();
    let target = parsed.path.unwrap_or("/");
    let headers: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let (path, q) = match target.split_once('?') {
        Some((p, q)) => (p, q),
        None => (target, ""),
    };
    let query = q
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(kv), String::new()),
        })
        .collect();
    let len = declared_length(&headers)?;
    Ok(Some((
        Request {
            method,
            path: percent_decode(path),
            query,
            headers,
            body: Vec::new(),
            peer: None,
        },
        len,
    )))
}

/// Writes a response head and body.
pub fn write_response<W: Write>(w: &mut W, resp: &Response, close: bool) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
    head.push_str("Server: vessel\r\n");
    // 1xx and 204 carry no body and so no Content-Length (RFC 9110 8.6); the dashboard's
    // WebSocket handshake is a 101 that browsers check.
    let bodiless = resp.status == 204 || resp.status < 200;
    if !bodiless {
        head.push_str(&format!("Content-Type: {}\r\n", resp.content_type));
        head.push_str(&format!("Content-Length: {}\r\n", resp.body.len()));
    }
    for (k, v) in &resp.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    if !bodiless {
        w.write_all(&resp.body)?;
    }
    w.flush()
}

fn error_response(e: &HttpError, json_error: &dyn Fn(u16, String) -> Response) -> Response {
    let status = match e {
        HttpError::HeadTooLarge => 431,
        HttpError::BodyTooLarge(_) => 413,
        HttpError::Chunked => 411,
        _ => 400,
    };
    json_error(status, e.to_string())
}

/// A connection's read half whose reads end at a deadline (a whole head, a whole body),
/// not only after a silence: each read waits at most until the deadline, and at most
/// [`IDLE_TIMEOUT`].
struct Timed {
    conn: Box<dyn Conn>,
    deadline: Option<std::time::Instant>,
}

impl Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let wait = match self.deadline {
                Some(d) => match d.checked_duration_since(std::time::Instant::now()) {
                    Some(left) if !left.is_zero() => left.min(IDLE_TIMEOUT),
                    _ => return Err(io::Error::from(io::ErrorKind::TimedOut)),
                },
                None => IDLE_TIMEOUT,
            };
            self.conn.set_read_timeout_conn(Some(wait))?;
            match self.conn.read(buf) {
                // A signal (the sandbox's, once the VM is built) cut the wait short:
                // wait on, within the same deadline.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }
}

/// Serves one connection until the peer closes it or a handler upgrades it.
fn serve_conn(
    stream: Box<dyn Conn>,
    handler: &dyn Handler,
    json_error: &dyn Fn(u16, String) -> Response,
    slot: &Slot,
    limits: &Limits,
) {
    // A client that does not read its answers does not hold its thread forever either.
    let _ = stream.set_write_timeout_conn(Some(IDLE_TIMEOUT));
    let peer = stream.cred_conn();
    let Ok(write_half) = stream.try_clone_conn() else {
        return;
    };
    let mut w = write_half;
    let mut r = BufReader::new(Timed {
        conn: stream,
        // The first request's whole head is due within the head timeout of the accept.
        deadline: Some(slot.accepted + limits.head_timeout),
    });
    let mut first = true;
    loop {
        if !first {
            // Between requests a kept-alive connection may be silent for the idle
            // timeout; once a head starts, all of it is due within the head timeout.
            r.get_mut().deadline = None;
            match r.fill_buf() {
                Ok([]) | Err(_) => return,
                Ok(_) => {}
            }
            r.get_mut().deadline = Some(std::time::Instant::now() + limits.head_timeout);
        }
        first = false;
        let req = match read_request_head(&mut r) {
            Ok(Some((mut req, len))) => {
                req.peer = peer;
                // Credentials and the API's body cap are checked before the body is read:
                // an unauthenticated client cannot make the server hold its bytes.
                if let Some(refusal) = handler.admit(&req, len) {
                    tracing::debug!(method = %req.method, path = %req.path, len, "refused");
                    let _ = write_response(&mut w, &refusal, true);
                    return;
                }
                // Admitted (on TCP: the token was right): no longer a connection that
                // can be closed to make room for others.
                slot.admitted();
                let body = if len > MAX_BODY as u64 {
                    Err(HttpError::BodyTooLarge(len))
                } else {
                    let allowed =
                        limits.head_timeout + std::time::Duration::from_secs(len / MIN_BODY_RATE);
                    r.get_mut().deadline = Some(std::time::Instant::now() + allowed);
                    read_body(&mut r, len as usize)
                };
                match body {
                    Ok(b) => {
                        req.body = b;
                        req
                    }
                    Err(HttpError::Io(_)) | Err(HttpError::Truncated) => return,
                    Err(e) => {
                        let _ = write_response(&mut w, &error_response(&e, json_error), true);
                        return;
                    }
                }
            }
            Ok(None) => return,
            Err(HttpError::Io(_)) | Err(HttpError::Truncated) => return,
            Err(e) => {
                tracing::debug!("bad request: {e}");
                let _ = write_response(&mut w, &error_response(&e, json_error), true);
                return;
            }
        };
        let close = req
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        tracing::debug!(method = %req.method, path = %req.path, "request");
        let answering = Answering::start();
        match handler.handle(req) {
            Reply::Response(resp) => {
                let sent = write_response(&mut w, &resp, close);
                drop(answering);
                if sent.is_err() || close {
                    return;
                }
            }
            Reply::Upgrade(resp, take) => {
                let sent = write_response(&mut w, &resp, false);
                drop(answering);
                if sent.is_err() {
                    return;
                }
                // Clients wait for the response head before sending on an upgraded
                // connection, so nothing is left in the reader's buffer.
                drop(r);
                // An attached console may be quiet for as long as it likes.
                let _ = w.set_read_timeout_conn(None);
                let _ = w.set_write_timeout_conn(None);
                take(w);
                return;
            }
        }
    }
}

/// One open connection in a listener's [`Table`].
struct Entry {
    peer: Peer,
    accepted: std::time::Instant,
    /// No request admitted yet.
    pending: bool,
    /// A handle to shut the connection down when it is closed to make room.
    handle: Box<dyn Conn>,
}

/// The connections a listener serves, for its caps: at most `max_connections`, at most
/// `per_client` from one peer, of which at most `pending_per_client` pending. When a cap
/// is reached, the oldest pending connection (past the grace period) that counts against
/// it is closed to make room; only if there is none is the new connection refused with a
/// 503. So clients that connect and send nothing (or trickle) cannot lock others out: a
/// client that sends its head promptly always finds room, and an admitted connection is
/// never closed for another.
#[derive(Default)]
struct Table {
    conns: std::sync::Mutex<std::collections::HashMap<u64, Entry>>,
    next: std::sync::atomic::AtomicU64,
}

/// A connection's place in its [`Table`], given back when the connection ends.
struct Slot {
    table: Arc<Table>,
    id: u64,
    accepted: std::time::Instant,
}

impl Slot {
    fn admitted(&self) {
        if let Some(e) = self.table.lock().get_mut(&self.id) {
            e.pending = false;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.table.lock().remove(&self.id);
    }
}

impl Table {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, Entry>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new connection from `peer`, closing a stale pending one if a cap
    /// demands it; `Err` with the reason when there is no room.
    fn enter(
        self: &Arc<Self>,
        peer: Peer,
        handle: Box<dyn Conn>,
        limits: &Limits,
    ) -> Result<Slot, String> {
        let now = std::time::Instant::now();
        let mut conns = self.lock();
        // Closes the oldest stale pending connection among those `which` selects.
        let make_room = |conns: &mut std::collections::HashMap<u64, Entry>,
                         which: &dyn Fn(&Entry) -> bool|
         -> bool {
            let oldest = conns
                .iter()
                .filter(|(_, e)| e.pending && which(e))
                .filter(|(_, e)| now.duration_since(e.accepted) >= limits.pending_grace)
                .min_by_key(|(_, e)| e.accepted)
                .map(|(id, _)| *id);
            match oldest.and_then(|id| conns.remove(&id)) {
                Some(e) => {
                    tracing::debug!(peer = ?e.peer, "closing a pending connection for a new one");
                    e.handle.shutdown_conn();
                    true
                }
                None => false,
            }
        };
        let mine = conns.values().filter(|e| e.peer == peer).count();
        if mine >= limits.per_client && !make_room(&mut conns, &|e| e.peer == peer) {
            return Err(format!(
                "more than {} open connections from one client; try again",
                limits.per_client
            ));
        }
        let pending = conns
            .values()
            .filter(|e| e.pending && e.peer == peer)
            .count();
        if pending >= limits.pending_per_client && !make_room(&mut conns, &|e| e.peer == peer) {
            return Err(format!(
                "more than {} connections from one client without a request; try again",
                limits.pending_per_client
            ));
        }
        if conns.len() >= limits.max_connections && !make_room(&mut conns, &|_| true) {
            return Err(format!(
                "more than {} open connections; try again",
                limits.max_connections
            ));
        }
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        conns.insert(
            id,
            Entry {
                peer,
                accepted: now,
                pending: true,
                handle,
            },
        );
        Ok(Slot {
            table: self.clone(),
            id,
            accepted: now,
        })
    }
}

/// Requests being handled or answered, across every server of the process: `drain` waits
/// for them, so that a VMM that ends because of a request (the guest powering off at
/// `SendCtrlAltDel`) still sends its answer.
static ANSWERING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

struct Answering;

impl Answering {
    fn start() -> Self {
        ANSWERING.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Answering
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        ANSWERING.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Waits until no request is being answered, at most `limit`. For a process about to
/// exit.
pub fn drain(limit: std::time::Duration) {
    let t0 = std::time::Instant::now();
    while ANSWERING.load(std::sync::atomic::Ordering::SeqCst) != 0 && t0.elapsed() < limit {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Accepts connections forever, one thread each, with [`Limits::UNIX`]. `json_error`
/// shapes protocol errors in the API's own error format.
pub fn serve(
    listener: UnixListener,
    handler: Arc<dyn Handler>,
    json_error: fn(u16, String) -> Response,
) {
    serve_with(listener, handler, json_error, Limits::UNIX)
}

/// [`serve`] with other limits.
pub fn serve_with(
    listener: UnixListener,
    handler: Arc<dyn Handler>,
    json_error: fn(u16, String) -> Response,
    limits: Limits,
) {
    accept_loop(
        || listener.accept().map(|(s, _)| Box::new(s) as Box<dyn Conn>),
        handler,
        json_error,
        limits,
    )
}

/// [`serve`] on a TCP listener with [`Limits::TCP`] (put a [`Handler`] that checks
/// credentials in front: its `admit` decides when a connection stops being pending).
pub fn serve_tcp(
    listener: TcpListener,
    handler: Arc<dyn Handler>,
    json_error: fn(u16, String) -> Response,
) {
    serve_tcp_with(listener, handler, json_error, Limits::TCP)
}

/// [`serve_tcp`] with other limits.
pub fn serve_tcp_with(
    listener: TcpListener,
    handler: Arc<dyn Handler>,
    json_error: fn(u16, String) -> Response,
    limits: Limits,
) {
    accept_loop(
        || listener.accept().map(|(s, _)| Box::new(s) as Box<dyn Conn>),
        handler,
        json_error,
        limits,
    )
}

/// Serves the connections `accept` hands over (one another listener accepted and, e.g.,
/// decrypted), with the TCP limits; never returns while `accept` gives connections.
pub fn serve_accepted(
    accept: impl Fn() -> io::Result<Box<dyn Conn>>,
    handler: Arc<dyn Handler>,
    json_error: fn(u16, String) -> Response,
) {
    accept_loop(accept, handler, json_error, Limits::TCP)
}

fn accept_loop(
    accept: impl Fn() -> io::Result<Box<dyn Conn>>,
    handler: Arc<dyn Handler>,
    json_error: fn(u16, String) -> Response,
    limits: Limits,
) {
    let table = Arc::new(Table::default());
    loop {
        match accept() {
            Ok(mut stream) => {
                let _ = stream.set_write_timeout_conn(Some(std::time::Duration::from_secs(1)));
                let handle = match stream.try_clone_conn() {
                    Ok(h) => h,
                    Err(e) => {
                        tracing::warn!(peer = ?stream.peer_conn(), "cannot serve a connection: {e}");
                        continue;
                    }
                };
                let slot = match table.enter(stream.peer_conn(), handle, &limits) {
                    Ok(slot) => slot,
                    Err(why) => {
                        tracing::debug!(peer = ?stream.peer_conn(), "{why}");
                        let _ = write_response(&mut stream, &json_error(503, why), true);
                        continue;
                    }
                };
                let h = handler.clone();
                // The VMM's: the connection's thread runs under this one's seccomp
                // filters, and adds the VM's descriptors to them if this one had not.
                let confined = sandbox::inherited();
                let spawned =
                    std::thread::Builder::new()
                        .name("http-conn".into())
                        .spawn(move || {
                            sandbox::inherit(confined);
                            serve_conn(stream, h.as_ref(), &json_error, &slot, &limits);
                            drop(slot);
                        });
                if let Err(e) = spawned {
                    tracing::warn!("cannot start a connection thread: {e}");
                }
            }
            Err(e) => {
                tracing::warn!("accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

/// Binds a Unix socket, replacing a stale socket file (one nobody answers on).
/// Anything else at that path (a regular file, a folder, a link) is left alone and the
/// bind fails: a socket path given by an API client must never delete a file.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    remove_stale_socket(path)?;
    bind_listening(path)
}

/// A Unix socket at `path` (which must not exist) that already listens when the path
/// appears: bound and listening under a short temporary name in the same folder, then
/// linked to `path`. A client that waits for the path and connects at once was refused
/// (ECONNREFUSED) in the moment between a plain bind's bind() and listen(): seen in
/// migrations on a loaded host, and the API socket had the same window.
pub fn bind_listening(path: &Path) -> io::Result<UnixListener> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!(".{}.{n}.bind", std::process::id());
    let tmp = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(name),
        _ => std::path::PathBuf::from(name),
    };
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    linked.map(|()| l)
}

/// Removes a socket file nobody answers on. A live socket is `AddrInUse`; anything
/// that is not a socket is `AlreadyExists` and stays. Nothing there: `Ok`.
pub fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; it is left alone",
                path.display()
            ),
        ));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is in use by a running server", path.display()),
        ));
    }
    std::fs::remove_file(path)
}

/// Removes `path` if it is a socket (one this process bound, at its end); never a file
/// that took its place.
pub fn remove_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// A parsed response.
#[derive(Debug, Clone)]
pub struct ClientResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Sends one request on a fresh connection and reads the response (`Connection: close`).
pub fn client_request(
    sock: &Path,
    method: &str,
    path_and_query: &str,
    body: Option<(&str, &[u8])>,
) -> Result<ClientResponse, HttpError> {
    let stream = UnixStream::connect(sock)?;
    let (resp, _) = client_exchange(Box::new(stream), method, path_and_query, body, false, &[])?;
    Ok(resp)
}

/// A connection kept open after a response (an upgraded connection), with what was read.
pub type KeptConn = BufReader<Box<dyn Conn>>;

/// Sends a request on `stream` (with extra `headers`), reads the response head and body;
/// with `keep` the stream is returned for further use (an upgraded connection).
pub fn client_exchange(
    mut stream: Box<dyn Conn>,
    method: &str,
    path_and_query: &str,
    body: Option<(&str, &[u8])>,
    keep: bool,
    headers: &[(&str, &str)],
) -> Result<(ClientResponse, Option<KeptConn>), HttpError> {
    let mut head = format!("{method} {path_and_query} HTTP/1.1\r\nHost: localhost\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !keep {
        head.push_str("Connection: close\r\n");
    }
    let data: &[u8] = match body {
        Some((ct, b)) => {
            head.push_str(&format!("Content-Type: {ct}\r\n"));
            b
        }
        None => &[],
    };
    head.push_str(&format!("Content-Length: {}\r\n\r\n", data.len()));
    stream.write_all(head.as_bytes())?;
    // A server that refuses a request from its head (a body over its cap, a missing
    // token) answers and closes without reading the body: the answer is still read.
    if let Err(e) = stream.write_all(data).and_then(|()| stream.flush()) {
        if !matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ) {
            return Err(e.into());
        }
    }
    let mut r = BufReader::new(stream);
    let Some(head) = read_head(&mut r)? else {
        return Err(HttpError::Truncated);
    };
    let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut hdrs);
    match parsed.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HttpError::Truncated),
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    }
    let status = parsed.code.unwrap_or(0);
    let headers: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let has_len = headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
    let body = if has_len {
        let len = content_length(&headers)?;
        read_body(&mut r, len)?
    } else if status == 204 || keep {
        Vec::new()
    } else {
        let mut b = Vec::new();
        r.by_ref().take(MAX_BODY as u64).read_to_end(&mut b)?;
        b
    };
    let resp = ClientResponse {
        status,
        headers,
        body,
    };
    Ok((resp, if keep { Some(r) } else { None }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<Request>, HttpError> {
        read_request(&mut BufReader::new(raw))
    }

    /// `drain` returns only once a request being handled has been answered: the answer
    /// of a request that ends the process is not lost.
    #[test]
    fn drain_waits_for_the_answer_in_progress() {
        struct Slow;
        impl Handler for Slow {
            fn handle(&self, _req: Request) -> Reply {
                std::thread::sleep(std::time::Duration::from_millis(300));
                Reply::Response(Response::empty(204))
            }
        }
        let dir = std::env::temp_dir().join(format!("vessel-drain-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        std::thread::spawn(move || {
            serve(listener, Arc::new(Slow), |s, m| {
                Response::json(s, &serde_json::json!({ "m": m }))
            })
        });
        let client = {
            let sock = sock.clone();
            std::thread::spawn(move || client_request(&sock, "PUT", "/actions", None))
        };
        // The request is in the handler by now.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let t0 = std::time::Instant::now();
        drain(std::time::Duration::from_secs(5));
        let waited = t0.elapsed();
        assert!(
            waited >= std::time::Duration::from_millis(100),
            "{waited:?}"
        );
        assert!(waited < std::time::Duration::from_secs(5), "{waited:?}");
        assert_eq!(client.join().unwrap().unwrap().status, 204);
        let _ = std::fs::remove_dir_all(&dir);
    }

    struct Ok204;
    impl Handler for Ok204 {
        fn handle(&self, _req: Request) -> Reply {
            Reply::Response(Response::empty(204))
        }
    }

    fn plain_error(s: u16, m: String) -> Response {
        Response::json(s, &serde_json::json!({ "m": m }))
    }

    fn temp_sock(tag: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("vessel-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        (dir, sock)
    }

    /// Whether the server closed `s` (EOF or reset) within `limit`, sending `trickle`
    /// a byte at a time meanwhile (`s` has a short read timeout).
    fn closed_within<S: Read + Write>(
        s: &mut S,
        trickle: &[u8],
        limit: std::time::Duration,
    ) -> bool {
        let t0 = std::time::Instant::now();
        let mut i = 0;
        while t0.elapsed() < limit {
            if s.write_all(&trickle[i % trickle.len()..][..1]).is_err() {
                return true;
            }
            i += 1;
            let mut b = [0u8; 256];
            match s.read(&mut b) {
                Ok(0) => return true,
                Err(e)
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return true
                }
                _ => {}
            }
        }
        false
    }

    /// Issue 22: a client that trickles its head a byte at a time (each read well within
    /// the idle timeout) is cut off once the whole head is overdue.
    #[test]
    fn a_trickled_head_is_cut_off_at_the_head_timeout() {
        let (dir, sock) = temp_sock("trickle");
        let listener = UnixListener::bind(&sock).unwrap();
        let limits = Limits {
            head_timeout: std::time::Duration::from_millis(800),
            ..Limits::UNIX
        };
        std::thread::spawn(move || serve_with(listener, Arc::new(Ok204), plain_error, limits));
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_millis(100)))
            .unwrap();
        let t0 = std::time::Instant::now();
        assert!(
            closed_within(
                &mut s,
                b"GET / HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                std::time::Duration::from_secs(5)
            ),
            "a trickling client kept its connection for 5 s"
        );
        assert!(
            t0.elapsed() >= std::time::Duration::from_millis(700),
            "{:?}",
            t0.elapsed()
        );
        // A prompt client is still served, and may keep its connection open between
        // requests for longer than the head timeout.
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        for _ in 0..2 {
            s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            let mut b = [0u8; 256];
            let n = s.read(&mut b).unwrap();
            assert!(
                b[..n].starts_with(b"HTTP/1.1 204"),
                "{:?}",
                String::from_utf8_lossy(&b[..n])
            );
            std::thread::sleep(std::time::Duration::from_millis(1200));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Issue 22: connections that never send a head cannot fill a listener: once past the
    /// grace period, the oldest of them is closed to make room for a new client.
    #[test]
    fn silent_clients_cannot_lock_out_a_prompt_one() {
        let (dir, sock) = temp_sock("silent");
        let listener = UnixListener::bind(&sock).unwrap();
        let limits = Limits {
            max_connections: 8,
            pending_grace: std::time::Duration::from_millis(300),
            ..Limits::UNIX
        };
        std::thread::spawn(move || serve_with(listener, Arc::new(Ok204), plain_error, limits));
        let silent: Vec<_> = (0..8)
            .map(|_| UnixStream::connect(&sock).unwrap())
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(100));
        // Within the grace period the listener is full: a 503 (sent at once, before any
        // request), not a silent drop.
        let mut refused = UnixStream::connect(&sock).unwrap();
        refused
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut answer = String::new();
        let _ = refused.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
        std::thread::sleep(std::time::Duration::from_millis(400));
        for _ in 0..20 {
            let r = client_request(&sock, "GET", "/", None).unwrap();
            assert_eq!(r.status, 204);
        }
        // A connection that was admitted is never closed for another one.
        let mut kept = UnixStream::connect(&sock).unwrap();
        kept.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        kept.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let mut b = [0u8; 256];
        assert!(kept.read(&mut b).unwrap() > 0);
        let more: Vec<_> = (0..16)
            .map(|_| UnixStream::connect(&sock).unwrap())
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(400));
        kept.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let n = kept.read(&mut b).unwrap();
        assert!(
            b[..n].starts_with(b"HTTP/1.1 204"),
            "{:?}",
            String::from_utf8_lossy(&b[..n])
        );
        drop((silent, more));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A TCP connection from `src` (any 127.x.y.z address is loopback on Linux).
    fn connect_from(src: std::net::Ipv4Addr, dst: std::net::SocketAddr) -> TcpStream {
        use std::os::fd::FromRawFd;
        let std::net::SocketAddr::V4(dst) = dst else {
            panic!("IPv4 only")
        };
        let sin = |a: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(a).to_be(),
            },
            sin_zero: [0; 8],
        };
        let (from, to) = (sin(src, 0), sin(*dst.ip(), dst.port()));
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: plain socket calls on a descriptor this function owns, with valid
        // sockaddr_in structures of the given length; the descriptor is handed to
        // TcpStream only once connected.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0);
            assert_eq!(
                libc::bind(fd, &from as *const _ as *const libc::sockaddr, len),
                0
            );
            assert_eq!(
                libc::connect(fd, &to as *const _ as *const libc::sockaddr, len),
                0
            );
            TcpStream::from_raw_fd(fd)
        }
    }

    /// Issue 22: on TCP, one client address may hold only so many connections without a
    /// request; another address is not affected.
    #[test]
    fn tcp_caps_pending_connections_per_client() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            pending_per_client: 4,
            pending_grace: std::time::Duration::from_secs(60),
            ..Limits::TCP
        };
        std::thread::spawn(move || serve_tcp_with(listener, Arc::new(Ok204), plain_error, limits));
        let attacker = std::net::Ipv4Addr::new(127, 0, 0, 2);
        let held: Vec<_> = (0..4).map(|_| connect_from(attacker, addr)).collect();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let mut fifth = connect_from(attacker, addr);
        fifth
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut out = String::new();
        let _ = fifth.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 503"), "{out}");
        assert!(out.contains("without a request"), "{out}");
        for _ in 0..10 {
            let s = connect_from(std::net::Ipv4Addr::LOCALHOST, addr);
            let (r, _) = client_exchange(Box::new(s), "GET", "/", None, false, &[]).unwrap();
            assert_eq!(r.status, 204);
        }
        drop(held);
    }

    /// Issue 22: binding a socket where a file is never deletes the file.
    #[test]
    fn bind_leaves_anything_but_a_stale_socket_alone() {
        let (dir, sock) = temp_sock("bind");
        std::fs::write(&sock, "precious").unwrap();
        let e = bind(&sock).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(std::fs::read_to_string(&sock).unwrap(), "precious");
        remove_socket(&sock);
        assert!(sock.exists());
        std::fs::remove_file(&sock).unwrap();
        // A stale socket is replaced; a live one is not.
        drop(UnixListener::bind(&sock).unwrap());
        let live = bind(&sock).unwrap();
        assert_eq!(bind(&sock).unwrap_err().kind(), io::ErrorKind::AddrInUse);
        drop(live);
        remove_socket(&sock);
        assert!(!sock.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn parses_requests_and_bounds_them() {
        let r = parse(b"PUT /drives/root%20fs?a=1&b HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
            .unwrap()
            .unwrap();
        assert_eq!(r.method, "PUT");
        assert_eq!(r.path, "/drives/root fs");
        assert_eq!(r.query("a"), Some("1"));
        assert_eq!(r.query("b"), Some(""));
        assert_eq!(r.body, b"{}");
        assert_eq!(r.segments(), vec!["drives", "root fs"]);
        assert!(parse(b"").unwrap().is_none());
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n"),
            Err(HttpError::BodyTooLarge(_))
        ));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(HttpError::Chunked)
        ));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab"),
            Err(HttpError::Truncated)
        ));
        assert!(matches!(
            parse(b"\x01\x02 garbage\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
        let mut long = b"GET / HTTP/1.1\r\n".to_vec();
        for _ in 0..10000 {
            long.extend_from_slice(b"X-A: bbbbbbbbbb\r\n");
        }
        assert!(matches!(parse(&long), Err(HttpError::HeadTooLarge)));
        // Percent escapes at the very end and broken ones do not panic.
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
        assert_eq!(percent_encode("a b/c"), "a%20b%2Fc");
    }
}
