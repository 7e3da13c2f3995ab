//! A client of the daemon's REST API, used by the CLI and the tests.

use std::io::BufReader;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde_json::Value;
use vmm::api::http::{self, ClientResponse, Conn, HttpError};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the daemon at {path}: {source}: is `vessel daemon` running? (start it, or pass --socket)")]
    Unreachable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS with the daemon at tcp://{addr}: {why}")]
    Tls { addr: String, why: String },
    #[error("{message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("talking to the daemon: {0}")]
    Http(HttpError),
    #[error("the daemon answered something unexpected: {0}")]
    Protocol(String),
}

#[derive(Clone, Debug)]
pub struct Client {
    /// A Unix socket path, or `tcp://HOST:PORT`.
    pub socket: PathBuf,
    /// Bearer token for TCP.
    pub token: Option<String>,
    /// A limit on connecting and on each read and write (none by default: the CLI
    /// waits for long operations).
    pub timeout: Option<std::time::Duration>,
    /// For `tcp://`: TLS, with the CA the daemon's certificate must chain to and this
    /// client's certificate (a daemon started with `--tls-*`).
    pub tls: Option<crate::tls::ClientTls>,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client {
            socket: socket.into(),
            token: None,
            timeout: None,
            tls: None,
        }
    }

    /// A client of the opt-in TCP listener.
    pub fn tcp(addr: &str, token: &str) -> Self {
        Client {
            socket: PathBuf::from(format!("tcp://{addr}")),
            token: Some(token.to_string()),
            timeout: None,
            tls: None,
        }
    }

    /// The same client, over TLS when `tls` is given (for `tcp://` only).
    pub fn with_tls(mut self, tls: Option<crate::tls::ClientTls>) -> Self {
        self.tls = tls;
        self
    }

    /// The same client, giving up on a daemon that does not connect or answer in `t`.
    pub fn with_timeout(mut self, t: std::time::Duration) -> Self {
        self.timeout = Some(t);
        self
    }

    fn connect(&self) -> Result<Box<dyn Conn>, ClientError> {
        let unreachable = |source| ClientError::Unreachable {
            path: self.socket.clone(),
            source,
        };
        let tcp = self.socket.to_str().and_then(|s| s.strip_prefix("tcp://"));
        match (tcp, self.timeout) {
            (Some(addr), None) => {
                self.over_tls(addr, TcpStream::connect(addr).map_err(unreachable)?)
            }
            (Some(addr), Some(t)) => {
                use std::net::ToSocketAddrs;
                let sa = addr
                    .to_socket_addrs()
                    .map_err(unreachable)?
                    .next()
                    .ok_or_else(|| {
                        unreachable(std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            "the address resolves to nothing",
                        ))
                    })?;
                let s = TcpStream::connect_timeout(&sa, t).map_err(unreachable)?;
                s.set_read_timeout(Some(t)).map_err(unreachable)?;
                s.set_write_timeout(Some(t)).map_err(unreachable)?;
                match &self.tls {
                    None => Ok(Box::new(s)),
                    Some(_) => {
                        let c = self.over_tls(addr, s)?;
                        c.set_read_timeout_conn(Some(t)).map_err(unreachable)?;
                        c.set_write_timeout_conn(Some(t)).map_err(unreachable)?;
                        Ok(c)
                    }
                }
            }
            (None, t) => {
                let s = UnixStream::connect(&self.socket).map_err(unreachable)?;
                s.set_read_timeout(t).map_err(unreachable)?;
                s.set_write_timeout(t).map_err(unreachable)?;
                Ok(Box::new(s))
            }
        }
    }

    /// `s`, or a TLS connection over it when the client has TLS.
    fn over_tls(&self, addr: &str, s: TcpStream) -> Result<Box<dyn Conn>, ClientError> {
        match &self.tls {
            None => Ok(Box::new(s)),
            Some(tls) => match tls.connect(s, crate::tls::host_of(addr)) {
                Ok(c) => Ok(Box::new(c)),
                Err(e) => Err(ClientError::Tls {
                    addr: addr.to_string(),
                    why: e.to_string(),
                }),
            },
        }
    }

    fn auth(&self) -> Option<String> {
        self.token.as_ref().map(|t| format!("Bearer {t}"))
    }

    /// One request; a non-2xx status becomes [`ClientError::Api`].
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
    ) -> Result<ClientResponse, ClientError> {
        let s = self.connect()?;
        let auth = self.auth();
        let hdrs: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        let (r, _) = http::client_exchange(s, method, path, body, false, &hdrs)
            .map_err(ClientError::Http)?;
        if r.status / 100 != 2 {
            let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            let e = &v["error"];
            return Err(ClientError::Api {
                status: r.status,
                code: e["code"].as_str().unwrap_or("").to_string(),
                message: e["message"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("HTTP {}", r.status)),
            });
        }
        Ok(r)
    }

    /// A JSON request; returns the JSON answer (`null` for an empty body).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let b = body.map(|v| v.to_string());
        let r = self.raw(
            method,
            path,
            b.as_deref().map(|s| ("application/json", s.as_bytes())),
        )?;
        if r.body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&r.body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call("GET", path, None)
    }

    pub fn post(&self, path: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        self.call("POST", path, body)
    }

    /// Defines a domain from JSON or libvirt XML text.
    pub fn define_text(&self, text: &str) -> Result<Value, ClientError> {
        let ct = if text.trim_start().starts_with('<') {
            "application/xml"
        } else {
            "application/json"
        };
        let r = self.raw("POST", "/v1/domains", Some((ct, text.as_bytes())))?;
        serde_json::from_slice(&r.body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Replaces a domain's definition with JSON or libvirt XML text (the name inside says
    /// which domain).
    pub fn redefine_text(&self, text: &str) -> Result<Value, ClientError> {
        let (ct, name) = if text.trim_start().starts_with('<') {
            let name = crate::xml::parse_domain(text)
                .map(|d| d.name)
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
            ("application/xml", name)
        } else {
            let v: Value =
                serde_json::from_str(text).map_err(|e| ClientError::Protocol(e.to_string()))?;
            let name = v["name"]
                .as_str()
                .ok_or_else(|| ClientError::Protocol("the definition has no name".into()))?
                .to_string();
            ("application/json", name)
        };
        let path = format!("/v1/domains/{}", http::percent_encode(&name));
        let r = self.raw("PUT", &path, Some((ct, text.as_bytes())))?;
        serde_json::from_slice(&r.body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Attaches to a domain's console: the returned stream carries raw bytes both ways.
    pub fn console(&self, name: &str) -> Result<BufReader<Box<dyn Conn>>, ClientError> {
        let s = self.connect()?;
        let path = format!("/v1/domains/{}/console", http::percent_encode(name));
        let auth = self.auth();
        let hdrs: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        let (r, stream) = http::client_exchange(s, "POST", &path, None, true, &hdrs)
            .map_err(ClientError::Http)?;
        if r.status != 101 {
            let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            return Err(ClientError::Api {
                status: r.status,
                code: v["error"]["code"].as_str().unwrap_or("").to_string(),
                message: v["error"]["message"]
                    .as_str()
                    .unwrap_or("the console is not available")
                    .to_string(),
            });
        }
        stream.ok_or_else(|| ClientError::Protocol("no stream after upgrade".into()))
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}
