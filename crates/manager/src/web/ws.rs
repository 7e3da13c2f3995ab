//! The browser console: a WebSocket (RFC 6455, framed by `tungstenite`) on top of the
//! daemon's HTTP server, relaying one [`Attachment`] of a domain's console hub.
//!
//! Frames: the daemon sends guest output as binary frames and JSON text frames for
//! events (`{"type":"writer","writer":true}`, `{"type":"closed"}`); the browser sends
//! keystrokes as binary frames and JSON text frames for `{"type":"takeover"}` and
//! `{"type":"resize","cols":C,"rows":R}` (a serial line carries no window size; it is
//! logged only). One thread per viewer polls the socket and a wakeup pipe, so an idle
//! console costs no CPU.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::TryRecvError;
use std::sync::Arc;

use serde_json::json;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};
use vmm::api::http::{Conn, Request, Response};

use super::console_hub::{Attachment, Msg, Wake};

/// The subprotocol the dashboard asks for.
pub const PROTOCOL: &str = "vessel-console";
/// The prefix of the subprotocol that carries the API token (browsers cannot set an
/// Authorization header on a WebSocket): `vessel.token.` + the token in base64url.
pub const TOKEN_PROTOCOL_PREFIX: &str = "vessel.token.";
/// Largest message a browser may send (keystrokes and control messages are small).
const MAX_MESSAGE: usize = 64 * 1024;
/// A ping this often keeps proxies from closing a quiet console and finds dead peers.
const PING_EVERY_MS: i32 = 30_000;

/// The subprotocols a request offers.
pub fn offered_protocols(req: &Request) -> impl Iterator<Item = &str> {
    req.headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("sec-websocket-protocol"))
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
}

/// The token a WebSocket request carries in its subprotocols, if any.
pub fn token_from_protocols(req: &Request) -> Option<Vec<u8>> {
    use base64::Engine as _;
    offered_protocols(req)
        .find_map(|p| p.strip_prefix(TOKEN_PROTOCOL_PREFIX))
        .and_then(|t| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(t.trim_end_matches('='))
                .ok()
        })
}

/// Whether the request asks for a WebSocket.
pub fn is_upgrade(req: &Request) -> bool {
    req.header("upgrade")
        .is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
}

/// Whether a browser's handshake comes from a page the daemon served: its Origin (when
/// there is one; other clients send none) names the same host and port as its Host. A
/// page from elsewhere cannot reach a console even where no token is asked (a Unix
/// socket forwarded to a port).
pub fn same_origin(req: &Request) -> bool {
    let Some(origin) = req.header("origin") else {
        return true;
    };
    let host = req.header("host").unwrap_or("");
    let o = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .unwrap_or("");
    !host.is_empty() && o.eq_ignore_ascii_case(host)
}

/// The 101 answer to a valid opening handshake, or why it is not one.
pub fn accept(req: &Request) -> Result<Response, String> {
    if req.method != "GET" {
        return Err("a WebSocket handshake is a GET".into());
    }
    if !is_upgrade(req) {
        return Err("send Upgrade: websocket".into());
    }
    if req.header("sec-websocket-version").map(str::trim) != Some("13") {
        return Err("only WebSocket version 13 is spoken".into());
    }
    let key = req
        .header("sec-websocket-key")
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or("no Sec-WebSocket-Key")?;
    let mut r = Response::empty(101);
    r.headers.push(("Upgrade".into(), "websocket".into()));
    r.headers.push(("Connection".into(), "Upgrade".into()));
    r.headers.push((
        "Sec-WebSocket-Accept".into(),
        tungstenite::handshake::derive_accept_key(key.as_bytes()),
    ));
    if offered_protocols(req).any(|p| p == PROTOCOL) {
        r.headers
            .push(("Sec-WebSocket-Protocol".into(), PROTOCOL.into()));
    }
    Ok(r)
}

/// The hub's wakeup: one byte into a non-blocking socket pair that the viewer's loop polls.
pub struct PipeWake(UnixStream);

impl Wake for PipeWake {
    fn wake(&self) {
        // A full pipe already holds a wakeup.
        let _ = (&self.0).write(&[1]);
    }
}

/// A wakeup pair: the hub's end and the viewer's.
pub fn wake_pair() -> std::io::Result<(Arc<dyn Wake>, UnixStream)> {
    let (a, b) = UnixStream::pair()?;
    a.set_nonblocking(true)?;
    b.set_nonblocking(true)?;
    Ok((Arc::new(PipeWake(a)), b))
}

fn set_nonblocking(fd: std::os::fd::RawFd) -> bool {
    // SAFETY: fcntl on a descriptor this connection owns; only its flags change.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    }
}

fn would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if io.kind() == ErrorKind::WouldBlock)
}

/// Relays between the browser and the console until either side ends.
pub fn serve(conn: Box<dyn Conn>, att: Attachment, wake: UnixStream, domain: String) {
    let fd = conn.raw_fd_conn();
    if !set_nonblocking(fd) {
        return;
    }
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let mut ws = WebSocket::from_raw_socket(conn, Role::Server, Some(config));
    let role = |w: bool| Message::text(json!({"type": "writer", "writer": w}).to_string());
    if ws.write(role(att.keys.is_writer())).is_err() {
        return;
    }
    let mut closing = false;
    tracing::debug!(%domain, viewer = att.id, "browser console attached");
    loop {
        // Whatever the hub queued.
        while !closing {
            match att.rx.try_recv() {
                Ok(Msg::Output(b)) => {
                    if ws.write(Message::binary(b.to_vec())).is_err() {
                        return;
                    }
                }
                Ok(Msg::Writer(w)) => {
                    if ws.write(role(w)).is_err() {
                        return;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    let _ = ws.write(Message::text(json!({"type": "closed"}).to_string()));
                    let _ = ws.close(Some(CloseFrame {
                        code: CloseCode::Away,
                        reason: "the console closed".into(),
                    }));
                    closing = true;
                }
            }
        }
        let pending_out = match ws.flush() {
            Ok(()) => false,
            Err(e) if would_block(&e) => true,
            Err(_) => return,
        };
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN | if pending_out { libc::POLLOUT } else { 0 },
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, PING_EVERY_MS) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if n == 0 {
            if ws.write(Message::Ping(Vec::new().into())).is_err() {
                return;
            }
            continue;
        }
        if fds[1].revents != 0 {
            let mut sink = [0u8; 64];
            while matches!((&wake).read(&mut sink), Ok(k) if k > 0) {}
        }
        if fds[0].revents == 0 {
            continue;
        }
        // Everything the browser sent.
        loop {
            match ws.read() {
                Ok(Message::Binary(b)) => {
                    if let Err(e) = att.keys.input(&b) {
                        tracing::debug!(%domain, "console input: {e}");
                    }
                }
                Ok(Message::Text(t)) => {
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                    match v.get("type").and_then(|t| t.as_str()) {
                        Some("takeover") => att.keys.take_over(),
                        Some("resize") => tracing::debug!(
                            %domain,
                            cols = v.get("cols").and_then(|c| c.as_u64()),
                            rows = v.get("rows").and_then(|r| r.as_u64()),
                            "console viewer resized"
                        ),
                        _ => tracing::debug!(%domain, "unknown console message ignored"),
                    }
                }
                Ok(_) => {} // ping, pong, close: tungstenite answers them
                Err(e) if would_block(&e) => break,
                Err(_) => {
                    tracing::debug!(%domain, viewer = att.id, "browser console detached");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> Request {
        Request {
            method: "GET".into(),
            path: "/v1/domains/d/console/ws".into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn handshake_checks_and_token_protocol() {
        // RFC 6455's example key and answer.
        let ok = req(&[
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            (
                "Sec-WebSocket-Protocol",
                "vessel-console, vessel.token.c2VjcmV0LXRva2Vu",
            ),
        ]);
        let r = accept(&ok).unwrap();
        assert_eq!(r.status, 101);
        assert!(r
            .headers
            .iter()
            .any(|(k, v)| k == "Sec-WebSocket-Accept" && v == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
        assert!(r.headers.iter().any(|(_, v)| v == PROTOCOL));
        assert_eq!(token_from_protocols(&ok).unwrap(), b"secret-token");
        assert!(accept(&req(&[("Upgrade", "websocket")])).is_err());
        assert!(accept(&req(&[
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "8"),
            ("Sec-WebSocket-Key", "x")
        ]))
        .is_err());
        assert!(
            token_from_protocols(&req(&[("Sec-WebSocket-Protocol", "vessel.token.%%%")])).is_none()
        );
        assert!(same_origin(&req(&[("Host", "127.0.0.1:7070")])));
        let from = |o: &str| req(&[("Host", "127.0.0.1:7070"), ("Origin", o)]);
        assert!(same_origin(&from("http://127.0.0.1:7070")));
        assert!(!same_origin(&from("http://evil.example")));
        assert!(!same_origin(&from("null")));
    }
}
