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
    fn raw_fd_conn(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(self)
    }
}

/// Longest request or response head (request line + headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// Largest body accepted (volume uploads come in chunks below this).
pub const MAX_BODY: usize = 64 * 1024 * 1024;
const MAX_HEADERS: usize = 64;
/// Connections served at once; more get a 503.
pub const MAX_CONNECTIONS: usize = 512;
/// How long a connection may stay silent while a request is expected.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

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

/// Serves one connection until the peer closes it or a handler upgrades it.
fn serve_conn(
    stream: Box<dyn Conn>,
    handler: &dyn Handler,
    json_error: &dyn Fn(u16, String) -> Response,
) {
    // An idle or trickling client does not hold its thread forever.
    let _ = stream.set_read_timeout_conn(Some(IDLE_TIMEOUT));
    let Ok(write_half) = stream.try_clone_conn() else {
        return;
    };
    let mut w = write_half;
    let mut r = BufReader::new(stream);
    loop {
        let req = match read_request_head(&mut r) {
            Ok(Some((mut req, len))) => {
                // Credentials and the API's body cap are checked before the body is read:
                // an unauthenticated client cannot make the server hold its bytes.
                if let Some(refusal) = handler.admit(&req, len) {
                    tracing::debug!(method = %req.method, path = %req.path, len, "refused");
                    let _ = write_response(&mut w, &refusal, true);
                    return;
                }
                let body = if len > MAX_BODY as u64 {
                    Err(HttpError::BodyTooLarge(len))
                } else {
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
                take(w);
                return;
            }
        }
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

/// Accepts connections forever, one thread each. `json_error` shapes protocol errors in the
/// API's own error format.
pub fn serve(
    listener: UnixListener,
    handler: Arc<dyn Handler>,
    json_error: fn(u16, String) -> Response,
) {
    accept_loop(
        || listener.accept().map(|(s, _)| Box::new(s) as Box<dyn Conn>),
        handler,
        json_error,
    )
}

/// [`serve`] on a TCP listener (put a [`Handler`] that checks credentials in front).
pub fn serve_tcp(
    listener: TcpListener,
    handler: Arc<dyn Handler>,
    json_error: fn(u16, String) -> Response,
) {
    accept_loop(
        || listener.accept().map(|(s, _)| Box::new(s) as Box<dyn Conn>),
        handler,
        json_error,
    )
}

fn accept_loop(
    accept: impl Fn() -> io::Result<Box<dyn Conn>>,
    handler: Arc<dyn Handler>,
    json_error: fn(u16, String) -> Response,
) {
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        match accept() {
            Ok(mut stream) => {
                use std::sync::atomic::Ordering;
                if open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                    let busy = json_error(
                        503,
                        format!("more than {MAX_CONNECTIONS} open connections; try again"),
                    );
                    let _ = write_response(&mut stream, &busy, true);
                    continue;
                }
                open.fetch_add(1, Ordering::Relaxed);
                let h = handler.clone();
                let count = open.clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("http-conn".into())
                        .spawn(move || {
                            serve_conn(stream, h.as_ref(), &json_error);
                            count.fetch_sub(1, Ordering::Relaxed);
                        });
                if let Err(e) = spawned {
                    open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
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
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use by a running server", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    UnixListener::bind(path)
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
