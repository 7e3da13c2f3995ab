//! The web dashboard, served by the daemon on the API's own listeners and behind the
//! same token: static pages (embedded at compile time, xterm.js vendored under
//! `crates/manager/web/vendor`), the browser console over a WebSocket
//! (`GET /v1/domains/NAME/console/ws`), counters for the graphs (`GET /v1/stats`) and a
//! Prometheus text endpoint (`GET /metrics`).

pub mod console_hub;
pub mod stats;
pub mod ws;

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use vmm::api::http::{Conn, Reply, Request, Response};

use crate::error::{Error, Result};
use crate::manager::Manager;
use console_hub::{Attachment, Hubs, Msg};

/// One embedded file: its URL path, content type and bytes.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../../web/index.html"),
    },
    Asset {
        path: "/ui/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../web/app.js"),
    },
    Asset {
        path: "/ui/app.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../web/app.css"),
    },
    Asset {
        path: "/ui/vendor/xterm.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../web/vendor/xterm.js"),
    },
    Asset {
        path: "/ui/vendor/xterm.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../web/vendor/xterm.css"),
    },
    Asset {
        path: "/ui/vendor/addon-fit.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../web/vendor/addon-fit.js"),
    },
];

/// Whether `req` asks for one of the dashboard's static files, which carry no data and
/// are served without the token (the page then asks for it).
pub fn is_public(req: &Request) -> bool {
    req.method == "GET"
        && (req.path == "/" || req.path == "/favicon.ico" || req.path.starts_with("/ui/"))
}

/// A static file of the dashboard, if `req` names one.
pub fn asset(req: &Request) -> Option<Response> {
    if req.method != "GET" {
        return None;
    }
    if req.path == "/favicon.ico" {
        return Some(Response::empty(204));
    }
    let path = if req.path == "/index.html" || req.path == "/ui/" {
        "/"
    } else {
        req.path.as_str()
    };
    let a = ASSETS.iter().find(|a| a.path == path)?;
    let mut r = Response::bytes(200, a.content_type, a.body.to_vec());
    // The page runs nothing it did not get from the daemon, and no other site frames it.
    r.headers.push((
        "Content-Security-Policy".into(),
        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; \
         style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"
            .into(),
    ));
    r.headers
        .push(("X-Content-Type-Options".into(), "nosniff".into()));
    r.headers.push(("Cache-Control".into(), "no-cache".into()));
    Some(r)
}

/// `GET /metrics`.
pub fn metrics(m: &Manager) -> Response {
    let body = stats::prometheus(&stats::sample(m)).into_bytes();
    Response::bytes(200, "text/plain; version=0.0.4; charset=utf-8", body)
}

/// `GET /v1/stats`.
pub fn stats_json(m: &Manager) -> Response {
    Response::json(
        200,
        &serde_json::to_value(stats::sample(m)).unwrap_or_default(),
    )
}

/// `GET /v1/domains/NAME/console/ws[?write=0|1][&takeover=1]`: the browser's console.
pub fn console_ws(
    m: &Manager,
    hubs: &std::sync::Arc<Hubs>,
    req: &Request,
    name: &str,
) -> Result<Reply> {
    let head = ws::accept(req).map_err(|e| Error::invalid("WebSocket handshake", e))?;
    if !ws::same_origin(req) {
        return Err(Error::invalid(
            "WebSocket handshake",
            "the page that opened it is not the daemon's own (Origin differs from Host)",
        ));
    }
    let sock = m.console_socket(name)?;
    let write = req.query("write") != Some("0");
    let take_over = req.query("takeover") == Some("1");
    let (wake, wake_rx) =
        ws::wake_pair().map_err(|e| Error::io("creating a wakeup for", name, e))?;
    let att = hubs.attach(
        name,
        &sock,
        &m.serial_log(name),
        write,
        take_over,
        Some(wake),
    )?;
    let domain = name.to_string();
    Ok(Reply::Upgrade(
        head,
        Box::new(move |conn| ws::serve(conn, att, wake_rx, domain)),
    ))
}

/// `POST /v1/domains/NAME/console` (`vessel console`): raw bytes both ways through the
/// hub, as the writer (a person at the CLI means to type).
pub fn console_raw(m: &Manager, hubs: &std::sync::Arc<Hubs>, name: &str) -> Result<Reply> {
    let sock = m.console_socket(name)?;
    let att = hubs.attach(name, &sock, &m.serial_log(name), true, true, None)?;
    let mut head = Response::empty(101);
    head.headers
        .push(("Upgrade".into(), "vessel-console".into()));
    head.headers.push(("Connection".into(), "Upgrade".into()));
    Ok(Reply::Upgrade(
        head,
        Box::new(move |client| relay(client, att)),
    ))
}

/// Copies hub output to the client and the client's bytes to the guest until either
/// side closes.
fn relay(client: Box<dyn Conn>, att: Attachment) {
    let Ok(mut out) = client.try_clone_conn() else {
        return;
    };
    let Attachment { rx, keys, .. } = att;
    let t = std::thread::spawn(move || {
        while let Ok(m) = rx.recv() {
            if let Msg::Output(b) = m {
                if out.write_all(&b).and_then(|()| out.flush()).is_err() {
                    break;
                }
            }
        }
        out.shutdown_conn();
    });
    let mut c = client;
    let mut buf = [0u8; 4096];
    loop {
        match std::io::Read::read(&mut c, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if keys.input(buf.get(..n).unwrap_or_default()).is_err() {
                    break;
                }
            }
        }
    }
    // Leaving ends the output thread's channel once the hub drops this viewer.
    drop(keys);
    c.shutdown_conn();
    let _ = t.join();
}

/// A dashboard listener on a loopback port with a token of its own, opened when a client
/// of the (owner-only) Unix socket asks for it (`vessel dashboard`): the way in for a
/// daemon that has no TCP listener. It stays open while the daemon runs; asking again
/// answers the same address.
#[derive(Default)]
pub struct LocalDashboard {
    opened: Mutex<Option<Value>>,
}

/// 32 hex digits from the kernel's random source.
fn random_token() -> Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| Error::io("reading", "/dev/urandom", e))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

impl LocalDashboard {
    /// Opens the listener (once) and answers `{"url", "port", "token"}`.
    pub fn open(&self, api: Arc<crate::api::Api>) -> Result<Value> {
        let mut opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = opened.as_ref() {
            return Ok(v.clone());
        }
        let l = std::net::TcpListener::bind("127.0.0.1:0")
            .map_err(|e| Error::io("binding", "127.0.0.1:0", e))?;
        let port = l
            .local_addr()
            .map_err(|e| Error::io("reading the address of", "127.0.0.1:0", e))?
            .port();
        let token = random_token()?;
        let gate = Arc::new(crate::api::TokenGate {
            inner: api,
            token: token.clone(),
        });
        std::thread::Builder::new()
            .name("dashboard-tcp".into())
            .spawn(move || vmm::api::http::serve_tcp(l, gate, crate::api::protocol_error))
            .map_err(|e| Error::io("starting the dashboard listener on", "127.0.0.1", e))?;
        tracing::info!(port, "dashboard listening on loopback (token required)");
        let v = json!({
            "url": format!("http://127.0.0.1:{port}/#token={token}"),
            "port": port,
            "token": token,
        });
        *opened = Some(v.clone());
        Ok(v)
    }
}
