//! The daemon's REST API (documented in openapi/manager.yaml): JSON over HTTP/1.1 on a Unix
//! socket. Errors are `{"error": {"code": "...", "message": "..."}}` with a 4xx/5xx status.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use vmm::api::http::{Handler, Reply, Request, Response};

use crate::domain::DomainDef;
use crate::error::{Error, Result};
use crate::manager::Manager;
use crate::network::NetworkDef;
use crate::xml;

pub const API_VERSION: &str = "v1";

pub struct Api {
    pub m: Arc<Manager>,
    /// The shared console connections (browser viewers and `vessel console`).
    pub hubs: Arc<crate::web::console_hub::Hubs>,
    /// The loopback dashboard listener `vessel dashboard` asks for, once opened.
    pub local: crate::web::LocalDashboard,
    /// The cluster this daemon belongs to (`vessel daemon --cluster`), once joined.
    pub cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
    me: std::sync::Weak<Api>,
}

impl Api {
    pub fn new(m: Arc<Manager>) -> Arc<Self> {
        Arc::new_cyclic(|me| Api {
            m,
            hubs: crate::web::console_hub::Hubs::new(),
            local: Default::default(),
            cluster: Default::default(),
            me: me.clone(),
        })
    }
}

/// Puts a bearer-token check in front of the API (for the opt-in TCP listener).
pub struct TokenGate {
    pub inner: Arc<Api>,
    pub token: String,
}

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Largest request body the API reads (JSON and libvirt XML definitions), checked from
/// Content-Length before the body is read.
pub const MAX_REQUEST_BODY: u64 = 1 << 20;
/// Largest body of one volume upload request (`PUT …/volumes/V/data`); `vessel
/// vol-upload` streams a file in requests of 8 MiB.
pub const MAX_UPLOAD_BODY: u64 = vmm::api::http::MAX_BODY as u64;

fn unauthorized() -> Response {
    Response::json(
        401,
        &json!({"error": {"code": "unauthorized",
                "message": "missing or wrong token: send Authorization: Bearer TOKEN"}}),
    )
}

impl TokenGate {
    /// The token from `Authorization: Bearer TOKEN`, or for a WebSocket (browsers cannot
    /// set that header there) from its `vessel.token.BASE64URL` subprotocol.
    fn authorized(&self, req: &Request) -> bool {
        if let Some(given) = req
            .header("authorization")
            .and_then(|h| h.strip_prefix("Bearer "))
        {
            return same(given.trim().as_bytes(), self.token.as_bytes());
        }
        crate::web::ws::is_upgrade(req)
            && crate::web::ws::token_from_protocols(req)
                .is_some_and(|t| same(&t, self.token.as_bytes()))
    }
}

impl Handler for TokenGate {
    /// The token first: an unauthenticated client gets 401 before its body is read.
    /// The dashboard's static files are public: they hold no data and ask for the token.
    fn admit(&self, req: &Request, body_len: u64) -> Option<Response> {
        if !crate::web::is_public(req) && !self.authorized(req) {
            return Some(unauthorized());
        }
        self.inner.admit(req, body_len)
    }

    fn handle(&self, req: Request) -> Reply {
        if !crate::web::is_public(&req) && !self.authorized(&req) {
            return unauthorized().into();
        }
        self.inner.handle(req)
    }
}

/// Error bodies for protocol-level failures (malformed HTTP).
pub fn protocol_error(status: u16, message: String) -> Response {
    Response::json(
        status,
        &json!({"error": {"code": "bad_request", "message": message}}),
    )
}

fn error_response(e: &Error) -> Response {
    Response::json(
        e.status(),
        &json!({"error": {"code": e.code(), "message": e.to_string()}}),
    )
}

fn ok(v: Value) -> Result<Reply> {
    Ok(Response::json(200, &v).into())
}

fn to_value<T: serde::Serialize>(t: &T) -> Value {
    serde_json::to_value(t).unwrap_or(Value::Null)
}

fn body_json<T: serde::de::DeserializeOwned>(req: &Request, what: &'static str) -> Result<T> {
    serde_json::from_slice(&req.body).map_err(|e| Error::invalid(what, e.to_string()))
}

fn query_u64(req: &Request, name: &'static str) -> Result<Option<u64>> {
    req.query(name)
        .map(|v| {
            v.parse().map_err(|_| {
                Error::invalid("query parameter", format!("{name}={v:?} is not a number"))
            })
        })
        .transpose()
}

impl Handler for Api {
    /// Bodies are capped at [`MAX_REQUEST_BODY`], volume uploads at [`MAX_UPLOAD_BODY`].
    fn admit(&self, req: &Request, body_len: u64) -> Option<Response> {
        body_cap_refusal(req, body_len)
    }

    fn handle(&self, req: Request) -> Reply {
        match self.route(&req) {
            Ok(r) => r,
            Err(e) => {
                if e.status() >= 500 {
                    tracing::warn!(method = %req.method, path = %req.path, "{e}");
                }
                error_response(&e).into()
            }
        }
    }
}

/// The refusal of a request whose body is over its cap ([`MAX_REQUEST_BODY`], or
/// [`MAX_UPLOAD_BODY`] for volume data), decided from its head.
pub fn body_cap_refusal(req: &Request, body_len: u64) -> Option<Response> {
    let seg = req.segments();
    let upload =
        req.method == "PUT" && matches!(seg.as_slice(), [_, "pools", _, "volumes", _, "data"]);
    let cap = if upload {
        MAX_UPLOAD_BODY
    } else {
        MAX_REQUEST_BODY
    };
    (body_len > cap).then(|| {
        Response::json(
            413,
            &json!({"error": {"code": "too_large", "message": format!(
                "a request body of {body_len} bytes is larger than the {cap}-byte limit{}",
                if upload { "" } else { " (volume data goes through PUT …/volumes/V/data)" }
            )}}),
        )
    })
}

/// Everything the API does to a request before it acts on it — the body cap, the route's
/// names, query numbers and bodies (domain definitions in JSON or libvirt XML, validated
/// and written back as XML; network definitions; the other bodies as JSON) — with no
/// manager behind it: the fuzz target for the API's request parsing (crates/fuzzing).
/// Returns a short outcome (the route and how parsing ended).
pub fn parse_only(req: &Request) -> String {
    if let Some(r) = body_cap_refusal(req, req.body.len() as u64) {
        return format!("refused {}", r.status);
    }
    let seg = req.segments();
    let parsed = (|| -> Result<&'static str> {
        if seg.first() != Some(&API_VERSION) {
            return Err(Error::not_found("API path", &req.path));
        }
        for name in seg.iter().skip(2).step_by(2) {
            crate::domain::check_name("name", name)?;
        }
        for q in ["wait", "offset", "length"] {
            query_u64(req, q)?;
        }
        match (req.method.as_str(), &seg[1..]) {
            ("POST", ["domains"]) | ("PUT", ["domains", _]) => {
                let def = parse_definition(req)?;
                def.validate()?;
                let again = xml::parse_domain(&xml::to_xml(&def))?;
                let _ = again.validate();
                Ok("domain")
            }
            ("POST", ["networks"]) => {
                let n: NetworkDef = body_json(req, "network definition")?;
                n.validate()?;
                Ok("network")
            }
            ("PUT", [_, _, "volumes", _, "data"]) => Ok("upload"),
            (_, _) if !req.body.is_empty() => {
                let _: Value = body_json(req, "body")?;
                Ok("json")
            }
            _ => Ok("bodiless"),
        }
    })();
    match parsed {
        Ok(route) => format!("ok {route}"),
        Err(e) => format!("{} {}: {e}", e.status(), e.code()),
    }
}

impl Api {
    fn route(&self, req: &Request) -> Result<Reply> {
        let seg = req.segments();
        let m = req.method.as_str();
        if let Some(r) = crate::web::asset(req) {
            return Ok(r.into());
        }
        if (m, seg.as_slice()) == ("GET", ["metrics"].as_slice()) {
            return Ok(crate::web::metrics(&self.m).into());
        }
        if seg.first() != Some(&API_VERSION) {
            return Err(Error::not_found("API path", &req.path));
        }
        if let Some(c) = self.cluster.get() {
            if let Some(r) = crate::cluster::api::route(c, self, req, &seg[1..])? {
                return Ok(r);
            }
        } else if seg.get(1) == Some(&"cluster") {
            return Err(Error::Unsupported(
                "this daemon is not in a cluster: start it with --cluster ENDPOINTS --host-name NAME"
                    .into(),
            ));
        }
        match (m, &seg[1..]) {
            ("GET", []) => ok(json!({
                "name": "vessel",
                "version": env!("CARGO_PKG_VERSION"),
                "api": API_VERSION,
            })),
            ("GET", ["domains"]) => ok(to_value(&self.m.list()?)),
            ("POST", ["domains"]) => {
                let def = parse_definition(req)?;
                self.check_domain_files(&def, req)?;
                let check = |d: &DomainDef| self.check_recorded_files(d, req);
                Ok(Response::json(201, &to_value(&self.m.define_checked(def, &check)?)).into())
            }
            ("GET", ["domains", name]) => {
                let (def, info) = self.m.info(name)?;
                // A running domain's devices as they are now (virsh's live XML).
                let live = self
                    .m
                    .live_definition(name)
                    .filter(|_| self.m.is_active(name));
                ok(json!({"definition": def, "info": info, "live": live}))
            }
            ("POST", ["domains", name, "attach"]) => {
                let device: crate::manager::Device = body_json(req, "device")?;
                if let crate::manager::Device::Disk(d) = &device {
                    // The disk's files only (the domain's own were checked at define).
                    let mut vm = vmm::VmConfig::new("");
                    vm.kernel = None;
                    vm.disks = vec![d.clone()];
                    let probe = DomainDef {
                        vm,
                        ..self.m.info(name)?.0
                    };
                    self.check_domain_files(&probe, req)?;
                }
                ok(to_value(&self.m.attach_live(name, device)?))
            }
            ("POST", ["domains", name, "detach"]) => {
                let device: crate::manager::DeviceRef = body_json(req, "device")?;
                ok(to_value(&self.m.detach_live(name, device)?))
            }
            ("GET", ["domains", name, "interfaces"]) => ok(to_value(&self.m.interfaces(name)?)),
            ("GET", ["domains", name, "xml"]) => {
                let (def, _) = self.m.info(name)?;
                // As virsh's dumpxml: a running domain as it runs now (devices attached
                // or detached live), unless ?inactive asks for the definition.
                let live = match req.query("inactive") {
                    Some(_) => None,
                    None => self
                        .m
                        .live_definition(name)
                        .filter(|_| self.m.is_active(name)),
                };
                let shown = match live {
                    Some(mut l) => {
                        // The VMM's TAPs and confined folders are the run's, not XML's.
                        l.vm.nets.clear();
                        for d in &mut l.vm.disks {
                            d.folder = None;
                        }
                        l
                    }
                    None => def.clone(),
                };
                let mut r =
                    Response::bytes(200, "application/xml", xml::to_xml(&shown).into_bytes());
                // What libvirt's XML cannot say of this domain: a client warns its user.
                let unsaid = xml::unsaid(&def);
                if !unsaid.is_empty() {
                    r.headers
                        .push(("X-Vessel-Unsaid".into(), unsaid.join(", ")));
                }
                Ok(r.into())
            }
            ("PUT", ["domains", name]) => {
                let def = parse_definition(req)?;
                self.check_domain_files(&def, req)?;
                let check = |d: &DomainDef| self.check_recorded_files(d, req);
                ok(to_value(&self.m.redefine_checked(name, def, &check)?))
            }
            ("DELETE", ["domains", name]) => {
                self.m.undefine(name)?;
                Ok(Response::empty(204).into())
            }
            ("POST", ["domains", name, "start"]) => {
                let info = match query_u64(req, "paused")? {
                    Some(1) => self.m.start_paused(name)?,
                    None | Some(0) => self.m.start(name)?,
                    Some(n) => {
                        return Err(Error::invalid("paused", format!("{n}: give 0 or 1")));
                    }
                };
                ok(to_value(&info))
            }
            ("POST", ["domains", name, "shutdown"]) => {
                let wait = query_u64(req, "wait")?.map(|s| Duration::from_secs(s.min(3600)));
                let st = self.m.shutdown(name, wait)?;
                ok(json!({"state": st, "state_text": st.as_str()}))
            }
            ("POST", ["domains", name, "destroy"]) => {
                self.m.destroy(name)?;
                ok(to_value(&self.m.info(name)?.1))
            }
            ("POST", ["domains", name, "reboot"]) => {
                self.m.reboot(name)?;
                ok(to_value(&self.m.info(name)?.1))
            }
            ("POST", ["domains", name, "setmem"]) => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct S {
                    kib: u64,
                    #[serde(default)]
                    live: bool,
                    #[serde(default)]
                    config: bool,
                }
                let s: S = body_json(req, "setmem body")?;
                self.m.setmem(name, s.kib, s.live, s.config)?;
                ok(to_value(&self.m.info(name)?.1))
            }
            ("GET", ["domains", name, "memstat"]) => {
                let stats = self.m.dommemstat(name)?;
                ok(Value::Array(
                    stats.into_iter().map(|(k, v)| json!([k, v])).collect(),
                ))
            }
            ("POST", ["domains", name, "suspend"]) => {
                self.m.suspend(name)?;
                ok(to_value(&self.m.info(name)?.1))
            }
            ("POST", ["domains", name, "save"]) => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct S {
                    path: std::path::PathBuf,
                }
                let s: S = body_json(req, "save body")?;
                self.check_path(req, &s.path, vmm::api::access::Want::Create)?;
                self.m.save(name, &s.path)?;
                ok(to_value(&self.m.info(name)?.1))
            }
            ("POST", ["domains", name, "snapshots"]) => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct C {
                    name: String,
                    #[serde(default)]
                    description: Option<String>,
                }
                let c: C = body_json(req, "snapshot body")?;
                ok(to_value(&self.m.snapshot_create(
                    name,
                    &c.name,
                    c.description,
                )?))
            }
            ("GET", ["domains", name, "snapshots"]) => ok(to_value(&self.m.snapshot_list(name)?)),
            ("POST", ["domains", name, "snapshots", snap, "revert"]) => {
                ok(to_value(&self.m.snapshot_revert(name, snap)?))
            }
            ("DELETE", ["domains", name, "snapshots", snap]) => {
                self.m.snapshot_delete(name, snap)?;
                ok(json!({}))
            }
            ("POST", ["domains", name, "managedsave"]) => {
                self.m.managed_save_domain(name, false)?;
                ok(to_value(&self.m.info(name)?.1))
            }
            ("DELETE", ["domains", name, "managedsave"]) => {
                self.m.managed_save_remove(name)?;
                ok(to_value(&self.m.info(name)?.1))
            }
            ("POST", ["domains", name, "migrate"]) => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct M {
                    /// The destination daemon's API socket, or `tcp://HOST:PORT`.
                    #[serde(default)]
                    dest: Option<String>,
                    /// A cluster host (answered by the cluster's routes).
                    #[serde(default)]
                    to: Option<String>,
                    /// The destination's TCP API token, for a `tcp://` destination.
                    #[serde(default)]
                    dest_token: Option<String>,
                    #[serde(default)]
                    live: bool,
                    #[serde(default)]
                    undefine_source: bool,
                    /// Refuse unless the stream goes over TLS (`migrate --tls`).
                    #[serde(default)]
                    tls: bool,
                }
                let m: M = body_json(req, "migrate body")?;
                let Some(dest) = m.dest else {
                    return Err(Error::invalid(
                        "migrate body",
                        match m.to {
                            Some(h) => format!(
                                "--to {h} names a cluster host, and this daemon is not in \
                                 a cluster: give the destination daemon (its socket or tcp://)"
                            ),
                            None => "give the destination daemon (its socket or tcp://)".into(),
                        },
                    ));
                };
                if !m.live {
                    return Err(Error::Unsupported(
                        "only live migration is implemented: give --live".into(),
                    ));
                }
                if !dest.starts_with("tcp://") {
                    self.check_path(
                        req,
                        std::path::Path::new(&dest),
                        vmm::api::access::Want::Read,
                    )?;
                }
                ok(self.m.migrate_out(
                    name,
                    &dest,
                    m.dest_token.as_deref(),
                    m.undefine_source,
                    m.tls,
                )?)
            }
            ("POST", ["domains", name, "migration", "finish"]) => {
                self.m.migrate_finish(name)?;
                ok(to_value(&self.m.info(name)?.1))
            }
            ("POST", ["domains", name, "migration", "abandon"]) => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct A {
                    /// The migration defined the domain here: undefine it if it goes.
                    #[serde(default)]
                    undefine: bool,
                }
                let a: A = body_json(req, "abandon body")?;
                ok(json!({ "runs": self.m.migrate_abandon(name, a.undefine)? }))
            }
            ("POST", ["migrations", "incoming"]) => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct I {
                    definition: crate::domain::DomainDef,
                    /// "unix" (the default) or "tcp".
                    #[serde(default)]
                    transport: Option<String>,
                }
                let i: I = body_json(req, "incoming migration body")?;
                let tcp = match i.transport.as_deref() {
                    None | Some("unix") => false,
                    Some("tcp") => true,
                    Some(t) => {
                        return Err(Error::invalid("transport", format!("{t:?}: unix or tcp")))
                    }
                };
                let inc = self.m.migrate_in(i.definition, tcp)?;
                ok(
                    json!({ "url": inc.url, "defined": inc.defined, "nonce": inc.nonce,
                           "tls": inc.tls }),
                )
            }
            ("POST", ["restore"]) => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct R {
                    path: std::path::PathBuf,
                }
                let r: R = body_json(req, "restore body")?;
                self.check_path(req, &r.path, vmm::api::access::Want::Read)?;
                ok(to_value(&self.m.restore(&r.path)?))
            }
            ("POST", ["domains", name, "resume"]) => {
                self.m.resume(name)?;
                ok(to_value(&self.m.info(name)?.1))
            }
            ("PUT", ["domains", name, "autostart"]) => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct A {
                    autostart: bool,
                }
                let a: A = body_json(req, "autostart body")?;
                self.m.set_autostart(name, a.autostart)?;
                ok(to_value(&self.m.info(name)?.1))
            }
            ("GET", ["domains", name, "log"]) => {
                self.m.info(name)?;
                let offset = query_u64(req, "offset")?.unwrap_or(0);
                let data = read_from(&self.m.serial_log(name), offset)?;
                Ok(Response::bytes(200, "application/octet-stream", data).into())
            }
            ("POST", ["domains", name, "console"]) => {
                crate::web::console_raw(&self.m, &self.hubs, name)
            }
            ("GET", ["domains", name, "console", "ws"]) => {
                crate::web::console_ws(&self.m, &self.hubs, req, name)
            }
            ("GET", ["stats"]) => Ok(crate::web::stats_json(&self.m).into()),
            ("POST", ["dashboard"]) => {
                let me = self
                    .me
                    .upgrade()
                    .ok_or_else(|| Error::Conflict("the daemon is stopping".into()))?;
                ok(self.local.open(me)?)
            }
            ("GET", ["events"]) => {
                let since = query_u64(req, "since")?.unwrap_or(0);
                let timeout = query_u64(req, "timeout")?.unwrap_or(0).min(300);
                let (events, last) =
                    self.m
                        .events
                        .wait(since, req.query("domain"), Duration::from_secs(timeout));
                ok(json!({"events": events, "last": last}))
            }
            ("GET", ["networks"]) => ok(to_value(&self.m.net_list()?)),
            ("POST", ["networks"]) => {
                let n: NetworkDef = body_json(req, "network definition")?;
                Ok(Response::json(201, &to_value(&self.m.net_define(n)?)).into())
            }
            ("GET", ["networks", name]) => ok(to_value(&self.m.net_info(name)?)),
            ("DELETE", ["networks", name]) => {
                self.m.net_undefine(name)?;
                Ok(Response::empty(204).into())
            }
            ("POST", ["networks", name, "start"]) => ok(to_value(&self.m.net_start(name)?)),
            ("POST", ["networks", name, "stop"]) => ok(to_value(&self.m.net_stop(name)?)),
            ("PUT", ["networks", name, "autostart"]) => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct A {
                    autostart: bool,
                }
                let a: A = body_json(req, "autostart body")?;
                ok(to_value(&self.m.net_autostart(name, a.autostart)?))
            }
            _ if seg.get(1) == Some(&"pools") => crate::storage_api::route(&self.m, req, &seg[2..]),
            _ => Err(Error::not_found("API path", &format!("{m} {}", req.path))),
        }
    }
}

impl Api {
    /// Issue 22: the host files a domain names must be ones its sender may use, since
    /// the VMM (or QEMU) opens them with the daemon's rights. On the Unix socket, the
    /// peer's rights (`SO_PEERCRED`; nothing to check for root or the daemon's own user);
    /// over TCP (the token, no host user), only files inside the pool roots (where
    /// `vol-upload` puts them) and the daemon's `--file-root` folders. Pool volumes (`vol://POOL/VOLUME`) are the pools' own.
    pub(crate) fn check_domain_files(&self, def: &DomainDef, req: &Request) -> Result<()> {
        for (p, want) in vmm::api::access::config_files(&def.vm) {
            if !p
                .to_string_lossy()
                .starts_with(crate::domain::VOLUME_PREFIX)
            {
                self.check_path(req, &p, want)?;
            }
        }
        Ok(())
    }

    /// The files define recorded for `def` (where each boot file and each file of each
    /// disk's chain led when recorded, and which file it was: `boot_files` and `chains`),
    /// checked against the client as [`Api::check_domain_files`] checks the names: the
    /// names were checked first and opened again to record, so a swap in between names
    /// a file the client may not have. Each recorded file is opened and must still be
    /// the file recorded ([`vmm::file_identity::FileId`]); the client's right is then
    /// checked on that open file, so the file checked, the file recorded and (through
    /// the same identity at each start) the file the VMM gets are one. A pool volume's
    /// chain (`vol://`) is the pool's, not the client's.
    pub(crate) fn check_recorded_files(&self, def: &DomainDef, req: &Request) -> Result<()> {
        use vmm::api::access::Want;
        for b in def.boot_files.values() {
            self.check_recorded(req, &b.real, b.id.as_ref(), Want::Read)?;
        }
        for d in &def.vm.disks {
            let key = crate::disk_chain::key(&d.path);
            if def.volumes.contains_key(&key) {
                continue;
            }
            for (i, f) in def.chains.get(&key).into_iter().flatten().enumerate() {
                let want = if i == 0 && !d.read_only {
                    Want::ReadWrite
                } else {
                    Want::Read
                };
                self.check_recorded(req, &f.real, f.id.as_ref(), want)?;
            }
        }
        Ok(())
    }

    /// One recorded file: opened (without reading it), compared with its identity, and
    /// the client's right checked on the open file.
    fn check_recorded(
        &self,
        req: &Request,
        real: &std::path::Path,
        id: Option<&vmm::file_identity::FileId>,
        want: vmm::api::access::Want,
    ) -> Result<()> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(real)
            .map_err(|e| Error::io("opening", real, e))?;
        let meta = f.metadata().map_err(|e| Error::io("reading", real, e))?;
        if let Some(id) = id {
            let now = vmm::file_identity::FileId::of(&meta, id.content.is_some());
            if !id.matches(&now) {
                return Err(Error::Forbidden(format!(
                    "{}: {} since define recorded it: the definition's files must stay \
                     put while it is defined",
                    real.display(),
                    id.difference(&now)
                )));
            }
        }
        let held = std::path::PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
        self.check_path_shown(req, &held, real, want)
    }

    /// One host path a request names (see [`Api::check_domain_files`]).
    fn check_path(
        &self,
        req: &Request,
        p: &std::path::Path,
        want: vmm::api::access::Want,
    ) -> Result<()> {
        self.check_path_shown(req, p, p, want)
    }

    /// [`Api::check_path`] of the file at `at` (an open file's `/proc/self/fd/N`, or a
    /// name), naming it `p` in errors.
    fn check_path_shown(
        &self,
        req: &Request,
        at: &std::path::Path,
        p: &std::path::Path,
        want: vmm::api::access::Want,
    ) -> Result<()> {
        if let Some(cred) = &req.peer {
            return vmm::api::access::check_shown(at, p, Some(cred), want)
                .map_err(Error::Forbidden);
        }
        let real = crate::storage::resolve_existing(at)?;
        if self.m.file_roots().iter().any(|r| real.starts_with(r)) {
            return Ok(());
        }
        Err(Error::Forbidden(format!(
            "{}: a client over TCP may name only files inside the pool roots and the \
             daemon's --file-root folders (upload it as a volume and use \
             vol://POOL/VOLUME)",
            p.display()
        )))
    }
}

/// A domain definition from a request body: libvirt XML when it starts with '<' or the
/// content type says XML, else Vessel's JSON.
pub(crate) fn parse_definition(req: &Request) -> Result<DomainDef> {
    let text = std::str::from_utf8(&req.body)
        .map_err(|_| Error::invalid("domain definition", "the body is not UTF-8"))?;
    let is_xml = req
        .header("content-type")
        .is_some_and(|c| c.contains("xml"))
        || text.trim_start().starts_with('<');
    if is_xml {
        xml::parse_domain(text)
    } else {
        crate::domain::from_json(text)
    }
}

/// A file's bytes from `offset` (at most 16 MiB).
fn read_from(path: &std::path::Path, offset: u64) -> Result<Vec<u8>> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("opening", path, e)),
    };
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| Error::io("seeking", path, e))?;
    let mut out = Vec::new();
    f.take(16 << 20)
        .read_to_end(&mut out)
        .map_err(|e| Error::io("reading", path, e))?;
    Ok(out)
}
