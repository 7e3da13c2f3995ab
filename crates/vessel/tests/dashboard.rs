//! The web dashboard end to end: a real `vessel daemon` with its TCP listener and token,
//! a Vessel-VMM domain booting Debian's kernel and the busybox initramfs under `emu`,
//! - the console WebSocket: refused without the token, two viewers see the same output,
//!   one of them types;
//! - `/metrics` parsed as Prometheus text;
//! - headless Chromium (Debian's `chromium`, driven over the DevTools protocol) logging
//!   in, defining and starting a domain, typing `uname -r` in its console, watching its
//!   CPU graph move and shutting it down, with screenshots.
//!
//! Needs the guest assets (`scripts/guest-assets.sh`) and Chromium (`apt-get install
//! chromium`); `scripts/test.sh` sets up both. Without them these tests fail saying so.

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::{Message, WebSocket};

const EXE: &str = env!("CARGO_BIN_EXE_vessel");
const TOKEN: &str = "dashboard-test-token-0123456789";
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

fn assets() -> PathBuf {
    let a = common::assets();
    assert!(
        a.join("vmlinuz").is_file() && a.join("initramfs.cpio.gz").is_file(),
        "guest assets missing in {}: run scripts/guest-assets.sh (scripts/test.sh does)",
        a.display()
    );
    a
}

fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a PID (or process group) this test started; no memory involved.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// A free TCP port on the loopback interface (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A daemon on a private socket, state folder and loopback port, with a token; dropping
/// it kills the daemon and every VMM in its run folder, by PID, and removes the folder.
struct Daemon {
    dir: PathBuf,
    child: Child,
    port: u16,
}

impl Daemon {
    fn start(tag: &str) -> Daemon {
        let dir = std::env::temp_dir().join(format!("vd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("token"), TOKEN).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
        let child = Command::new(EXE)
            .arg("--socket")
            .arg(dir.join("s.sock"))
            .arg("daemon")
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--listen-tcp")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--token-file")
            .arg(dir.join("token"))
            // Domains are defined over TCP here (the browser, and this test's requests):
            // their kernels are the guest assets, their disks in the test's folder.
            .arg("--file-root")
            .arg(common::assets())
            .arg("--file-root")
            .arg(&dir)
            // The HTTP server's debug lines name a connection it refused or dropped.
            .env("VESSEL_LOG", "info,vmm::api::http=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let d = Daemon { dir, child, port };
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "daemon did not come up: {}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// One HTTP request on TCP; `token`: send it as a bearer token.
    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        token: bool,
    ) -> (u16, Vec<u8>) {
        let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let b = body.map(|b| b.to_string());
        let auth = format!("Bearer {TOKEN}");
        let headers: Vec<(&str, &str)> = if token {
            vec![("Authorization", auth.as_str())]
        } else {
            vec![]
        };
        let (r, _) = vmm::api::http::client_exchange(
            Box::new(s),
            method,
            path,
            b.as_deref().map(|b| ("application/json", b.as_bytes())),
            false,
            &headers,
        )
        .unwrap_or_else(|e| {
            panic!(
                "{method} {path}: {e}; the daemon (PID {}) is {}",
                self.child.id(),
                self.liveness()
            )
        });
        (r.status, r.body)
    }

    /// The daemon process's state as /proc tells it, for a request that failed: whether
    /// the daemon ended (a zombie, or gone) or was alive and the connection itself failed.
    fn liveness(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("State:"))
                    .map(|l| l.trim().to_string())
            })
            .unwrap_or_else(|| "gone from /proc".into())
    }

    fn api(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (status, b) = self.request(method, path, body, true);
        assert!(
            status / 100 == 2,
            "{method} {path}: {status} {}",
            String::from_utf8_lossy(&b)
        );
        serde_json::from_slice(&b).unwrap_or(Value::Null)
    }

    fn state(&self, name: &str) -> String {
        self.api("GET", &format!("/v1/domains/{name}"), None)["info"]["state_text"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    fn vmm_pids(&self) -> Vec<i32> {
        std::fs::read_dir(self.dir.join("state").join("run"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("vmm.pid")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse().ok())
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Whether the daemon had ended before this (and how), for a failed test.
        let ended = self.child.try_wait();
        kill(self.child.id() as i32, libc::SIGKILL);
        let _ = self.child.wait();
        for pid in self.vmm_pids() {
            kill(pid, libc::SIGKILL);
        }
        if std::thread::panicking() {
            eprintln!("daemon ended before the test did: {ended:?}");
            eprintln!("daemon log:\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A busybox guest with a shell on its console (and a raw disk, when given).
fn shell_domain(name: &str, disk: Option<&Path>) -> Value {
    let a = assets();
    let mut v = json!({"name": name, "driver": "vessel",
        "vm": {"kernel": a.join("vmlinuz"), "initrd": a.join("initramfs.cpio.gz"),
               "cmdline": "console=ttyS0 panic=-1 quiet", "memory_mib": 256, "accel": "emu"}});
    if let Some(d) = disk {
        v["vm"]["disks"] = json!([{"path": d, "format": "raw"}]);
    }
    v
}

type Ws = WebSocket<TcpStream>;

/// Opens the console WebSocket; `token`: offer it as the `vessel.token.` subprotocol.
fn open_console(d: &Daemon, name: &str, token: Option<&str>) -> Result<Ws, tungstenite::Error> {
    use base64::Engine as _;
    let url = format!("ws://127.0.0.1:{}/v1/domains/{name}/console/ws", d.port);
    let mut req = url.into_client_request().unwrap();
    let mut protos = "vessel-console".to_string();
    if let Some(t) = token {
        protos.push_str(", vessel.token.");
        protos.push_str(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(t));
    }
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(&protos).unwrap(),
    );
    let s = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    match tungstenite::client(req, s) {
        Ok((ws, resp)) => {
            assert_eq!(
                resp.headers()
                    .get("Sec-WebSocket-Protocol")
                    .map(|v| v.as_bytes()),
                Some(&b"vessel-console"[..])
            );
            Ok(ws)
        }
        Err(tungstenite::HandshakeError::Failure(e)) => Err(e),
        Err(tungstenite::HandshakeError::Interrupted(_)) => panic!("handshake interrupted"),
    }
}

/// A console viewer: everything it has received, as text, and its writer flag.
struct Viewer {
    ws: Ws,
    seen: String,
    writer: Option<bool>,
}

impl Viewer {
    /// Reads frames until `want` appears after `from` in what it has seen; returns the
    /// offset after it.
    fn expect(&mut self, want: &str, from: usize, timeout: Duration) -> usize {
        let t0 = Instant::now();
        loop {
            if let Some(i) = self.seen.get(from..).and_then(|s| s.find(want)) {
                return from + i + want.len();
            }
            assert!(
                t0.elapsed() < timeout,
                "console never showed {want:?}; it showed:\n{}",
                self.seen
            );
            self.pump();
        }
    }

    fn pump(&mut self) {
        match self.ws.read() {
            Ok(Message::Binary(b)) => self.seen.push_str(&String::from_utf8_lossy(&b)),
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["type"] == "writer" {
                    self.writer = v["writer"].as_bool();
                }
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("console WebSocket failed: {e}"),
        }
    }

    fn type_(&mut self, s: &str) {
        self.ws
            .send(Message::binary(s.as_bytes().to_vec()))
            .unwrap();
    }
}

/// The WebSocket console and `/metrics` against one running domain.
#[test]
fn console_websocket_and_metrics() {
    let d = Daemon::start("ws");
    // The page is public, the API and the console are not.
    let (status, page) = d.request("GET", "/", None, false);
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&page).contains("/ui/vendor/xterm.js"));
    let (status, js) = d.request("GET", "/ui/vendor/xterm.js", None, false);
    assert!(status == 200 && js.len() > 100_000, "xterm.js is served");
    assert_eq!(d.request("GET", "/v1/domains", None, false).0, 401);
    assert_eq!(d.request("GET", "/metrics", None, false).0, 401);
    assert_eq!(d.request("GET", "/v1/stats", None, false).0, 401);

    let disk = d.dir.join("disk.raw");
    std::fs::write(&disk, vec![0x5au8; 4 << 20]).unwrap();
    d.api(
        "POST",
        "/v1/domains",
        Some(&shell_domain("web", Some(&disk))),
    );
    d.api("POST", "/v1/domains/web/start", None);

    for token in [None, Some("not-the-token-at-all-0000")] {
        match open_console(&d, "web", token) {
            Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401, "token {token:?}"),
            Err(e) => panic!("expected 401, got {e}"),
            Ok(_) => panic!("a console opened with token {token:?}"),
        }
    }

    // A page from another site cannot open a console, token or not.
    {
        use base64::Engine as _;
        let mut req = format!("ws://127.0.0.1:{}/v1/domains/web/console/ws", d.port)
            .into_client_request()
            .unwrap();
        let proto = format!(
            "vessel-console, vessel.token.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(TOKEN)
        );
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(&proto).unwrap(),
        );
        req.headers_mut()
            .insert("Origin", HeaderValue::from_static("http://evil.example"));
        let s = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
        match tungstenite::client(req, s) {
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
                assert_eq!(r.status(), 400)
            }
            Err(e) => panic!("expected 400, got {e}"),
            Ok(_) => panic!("a console opened from another origin"),
        }
    }

    let mut a = Viewer {
        ws: open_console(&d, "web", Some(TOKEN)).unwrap(),
        seen: String::new(),
        writer: None,
    };
    let mut b = Viewer {
        ws: open_console(&d, "web", Some(TOKEN)).unwrap(),
        seen: String::new(),
        writer: None,
    };
    let t0 = Instant::now();
    while a.writer.is_none() || b.writer.is_none() {
        assert!(t0.elapsed() < Duration::from_secs(5), "no writer flags");
        a.pump();
        b.pump();
    }
    assert_eq!(
        (a.writer, b.writer),
        (Some(true), Some(false)),
        "the first viewer writes"
    );
    a.expect("vessel-init:", 0, BOOT_TIMEOUT);
    b.expect("vessel-init:", 0, BOOT_TIMEOUT);
    // The shell is up once it answers.
    let t0 = Instant::now();
    let mut mark = 0;
    loop {
        a.type_("echo ready-$((40+2))\n");
        let t1 = Instant::now();
        while t1.elapsed() < Duration::from_secs(3) && !a.seen[mark..].contains("ready-42") {
            a.pump();
        }
        if let Some(i) = a.seen[mark..].find("ready-42") {
            mark += i;
            break;
        }
        assert!(t0.elapsed() < BOOT_TIMEOUT, "no shell: {}", a.seen);
    }
    let _ = mark;
    // The read-only viewer's keys are dropped; both see what the writer runs.
    let (fa, fb) = (a.seen.len(), b.seen.len());
    b.type_("echo from-b-$((1+1))\n");
    a.type_("echo from-a-$((2+3))\n");
    a.expect("from-a-5", fa, Duration::from_secs(30));
    b.expect("from-a-5", fb, Duration::from_secs(30));
    assert!(!a.seen.contains("from-b-2") && !b.seen.contains("from-b-2"));

    // The guest reads its disk: the VMM's counters see it.
    let f = a.seen.len();
    a.type_("dd if=/dev/vda of=/dev/null bs=4096 count=512 2>/dev/null; echo dd-$((1+2))\n");
    a.expect("dd-3", f, Duration::from_secs(60));

    // /metrics: the Prometheus text format, with this domain's counters.
    let (status, body) = d.request("GET", "/metrics", None, true);
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    strict_text_format(&text);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let find = |name: &str, labels: &[(&str, &str)]| -> f64 {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"));
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{name} is not a counter or gauge"),
        }
    };
    assert_eq!(
        find(
            "vessel_domain_info",
            &[("domain", "web"), ("accel", "emu"), ("state", "running")]
        ),
        1.0
    );
    assert!(
        find(
            "vessel_domain_cpu_seconds_total",
            &[("domain", "web"), ("thread", "guest")]
        ) > 0.5
    );
    assert!(
        find(
            "vessel_domain_cpu_seconds_total",
            &[("domain", "web"), ("thread", "vmm")]
        ) >= 0.0
    );
    assert!(find("vessel_domain_resident_bytes", &[("domain", "web")]) > 1e6);
    assert_eq!(find("vessel_domain_vcpus", &[("domain", "web")]), 1.0);
    assert!(find("vessel_host_cpus", &[]) >= 1.0);
    assert!(find("vessel_host_memory_total_bytes", &[]) > 1e8);
    assert!(scrape.docs.contains_key("vessel_domain_cpu_seconds_total"));
    let read = find("vessel_domain_disk_read_bytes_total", &[("domain", "web")]);
    assert!(read >= f64::from(2u32 << 20), "disk read {read} bytes");
    // No interface: the VMM's counters say nothing was sent.
    assert_eq!(
        find(
            "vessel_domain_net_transmit_bytes_total",
            &[("domain", "web")]
        ),
        0.0
    );

    // The domain powers off: the viewers' sockets close.
    d.api("POST", "/v1/domains/web/destroy", None);
    let t0 = Instant::now();
    loop {
        match a.ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "console stayed open after destroy"
        );
    }
}

/// A QEMU domain's disk counters come from QMP's `query-blockstats`.
#[test]
fn metrics_of_a_qemu_domain() {
    let ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "qemu-system-x86_64 not found: install it (apt-get install qemu-system-x86; scripts/test.sh does)");
    let a = assets();
    let d = Daemon::start("qemu");
    let disk = d.dir.join("disk.raw");
    std::fs::write(&disk, vec![0x5au8; 4 << 20]).unwrap();
    let def = json!({"name": "q", "driver": "qemu",
        "vm": {"kernel": a.join("vmlinuz"), "initrd": a.join("initramfs.cpio.gz"),
               "cmdline": "console=ttyS0 panic=-1 quiet vessel.run=dd+if=/dev/vda+of=/dev/null+bs=4096+count=512;sleep+60",
               "memory_mib": 256, "accel": "emu", "disks": [{"path": disk, "format": "raw"}]}});
    d.api("POST", "/v1/domains", Some(&def));
    d.api("POST", "/v1/domains/q/start", None);
    let t0 = Instant::now();
    loop {
        let (status, body) = d.request("GET", "/metrics", None, true);
        assert_eq!(status, 200);
        let text = String::from_utf8(body).unwrap();
        strict_text_format(&text);
        let read = text
            .lines()
            .find_map(|l| l.strip_prefix("vessel_domain_disk_read_bytes_total{domain=\"q\"} "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if read >= f64::from(2u32 << 20) {
            assert!(text.contains("vessel_domain_info{domain=\"q\",state=\"running\",driver=\"qemu\",accel=\"emu\"} 1"), "{text}");
            assert!(
                text.contains("vessel_domain_cpu_seconds_total{domain=\"q\",thread=\"guest\"}"),
                "{text}"
            );
            break;
        }
        assert!(
            t0.elapsed() < BOOT_TIMEOUT,
            "the guest's disk reads never showed: {text}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    d.api("POST", "/v1/domains/q/destroy", None);
}

/// `vessel dashboard` (through the owner-only Unix socket) opens a loopback listener with a
/// fresh token: the page is there, the API only with that token.
#[test]
fn dashboard_verb_opens_a_loopback_listener_with_its_own_token() {
    let d = Daemon::start("verb");
    let run = |args: &[&str]| {
        let o = Command::new(EXE)
            .arg("--socket")
            .arg(d.dir.join("s.sock"))
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    };
    let url = run(&["dashboard", "--domain", "web"]);
    let rest = url.strip_prefix("http://127.0.0.1:").expect(&url);
    let (port, frag) = rest.split_once("/#token=").expect(&url);
    let (token, domain) = frag.split_once("&domain=").expect(&url);
    assert_eq!(domain, "web");
    assert_eq!(token.len(), 32);
    assert_ne!(token, TOKEN);
    assert_eq!(
        run(&["dashboard"]),
        url.split_once("&domain").unwrap().0,
        "opened once"
    );
    let port: u16 = port.parse().unwrap();
    let get = |path: &str, auth: Option<&str>| {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let h = auth.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = h.iter().map(|h| ("Authorization", h.as_str())).collect();
        vmm::api::http::client_exchange(Box::new(s), "GET", path, None, false, &headers)
            .unwrap()
            .0
            .status
    };
    assert_eq!(get("/", None), 200);
    assert_eq!(get("/v1/domains", None), 401);
    assert_eq!(
        get("/v1/domains", Some(TOKEN)),
        401,
        "the TCP listener's token is not this one's"
    );
    assert_eq!(get("/v1/domains", Some(token)), 200);
}

/// Checks every line of a text exposition: comments are `# HELP name text` or `# TYPE
/// name counter|gauge`, a TYPE comes before its samples, and samples are `name{labels}
/// value` with a finite value.
fn strict_text_format(text: &str) {
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut it = rest.splitn(3, ' ');
            let (kw, name, arg) = (it.next(), it.next(), it.next());
            match kw {
                Some("HELP") => assert!(name.is_some() && arg.is_some(), "bad HELP: {line}"),
                Some("TYPE") => {
                    assert!(matches!(arg, Some("counter" | "gauge")), "bad TYPE: {line}");
                    assert!(
                        typed.insert(name.unwrap().to_string()),
                        "TYPE twice: {line}"
                    );
                }
                _ => panic!("unknown comment: {line}"),
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line: {line}"));
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        assert!(v.is_finite(), "{line}");
        let name = series.split('{').next().unwrap();
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad name: {line}"
        );
        assert!(typed.contains(name), "sample before its TYPE: {line}");
        if let Some(l) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            assert!(l.starts_with('{') && l.ends_with('}'), "bad labels: {line}");
        }
    }
}

// ---- headless Chromium ---------------------------------------------------------------

/// Chromium in its own process group. Dropping it asks the browser to quit (SIGTERM: it
/// ends and reaps its helpers, crashpad's handler included), then kills what is left of
/// the group, by its id.
struct Browser {
    child: Child,
    profile: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        kill(pid, libc::SIGTERM);
        let t0 = Instant::now();
        while matches!(self.child.try_wait(), Ok(None)) && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        kill(-pid, libc::SIGKILL);
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

fn chromium() -> &'static str {
    for c in ["chromium", "chromium-browser"] {
        if Command::new(c)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            return c;
        }
    }
    panic!("Chromium not found: install it (apt-get install chromium; scripts/test.sh does)");
}

impl Browser {
    /// Starts headless Chromium with the DevTools protocol on a port it picks; returns
    /// the browser and that port.
    fn start() -> (Browser, u16) {
        use std::os::unix::process::CommandExt;
        let exe = chromium();
        let profile = std::env::temp_dir().join(format!("vd-browser-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).unwrap();
        let child = Command::new(exe)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--remote-debugging-port=0",
                "--window-size=1280,1200",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        let b = Browser { child, profile };
        let file = b.profile.join("DevToolsActivePort");
        let t0 = Instant::now();
        let port = loop {
            if let Some(p) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|s| s.lines().next()?.trim().parse().ok())
            {
                break p;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "Chromium did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        (b, port)
    }
}

/// A DevTools session on one page.
struct Cdp {
    ws: WebSocket<TcpStream>,
    next: u64,
}

impl Cdp {
    fn attach(port: u16) -> Cdp {
        // The page Chromium opened, from its target list.
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let (r, _) =
            vmm::api::http::client_exchange(Box::new(s), "GET", "/json/list", None, false, &[])
                .unwrap();
        let targets: Value = serde_json::from_slice(&r.body).unwrap();
        let url = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            .to_string();
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        // A call that never answers fails the test instead of hanging it.
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let (ws, _) = tungstenite::client(url.as_str(), s).unwrap();
        Cdp { ws, next: 1 }
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next;
        self.next += 1;
        self.ws
            .send(Message::text(
                json!({"id": id, "method": method, "params": params}).to_string(),
            ))
            .unwrap();
        loop {
            let m = self.ws.read().unwrap();
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates `expr` in the page (awaiting a promise) and returns its value.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "awaitPromise": true, "returnByValue": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    fn wait_true(&mut self, expr: &str, timeout: Duration, what: &str) {
        let t0 = Instant::now();
        while self.eval(expr) != Value::Bool(true) {
            if t0.elapsed() > timeout {
                let state = self.eval(
                    "['#console-status', '#action-error', '#login-error', '#define-result']
                       .map((s) => s + ': ' + (document.querySelector(s) || {}).textContent).join('; ')
                       + '; errors: ' + JSON.stringify((window.vessel || {}).errors)",
                );
                panic!("timed out waiting for {what} ({expr}); page: {state}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn click(&mut self, selector: &str) {
        let sel = serde_json::to_string(selector).unwrap();
        let ok = self.eval(&format!(
            "(() => {{ const e = document.querySelector({sel}); if (!e) return false; e.click(); return true; }})()"
        ));
        assert_eq!(ok, Value::Bool(true), "nothing to click at {selector}");
    }

    /// Types like a keyboard into whatever has the focus.
    fn type_text(&mut self, s: &str) {
        for c in s.chars() {
            let t = c.to_string();
            self.call(
                "Input.dispatchKeyEvent",
                json!({"type": "keyDown", "text": t, "key": t, "unmodifiedText": t}),
            );
            self.call("Input.dispatchKeyEvent", json!({"type": "keyUp", "key": t}));
        }
    }

    fn press_enter(&mut self) {
        let k = json!({"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13});
        let mut down = k.clone();
        down["type"] = "keyDown".into();
        down["text"] = "\r".into();
        self.call("Input.dispatchKeyEvent", down);
        let mut up = k;
        up["type"] = "keyUp".into();
        self.call("Input.dispatchKeyEvent", up);
    }

    fn screenshot(&mut self, path: &Path) {
        use base64::Engine as _;
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
    }

    /// The terminal's text, line by line.
    fn terminal_text(&mut self) -> String {
        self.eval(
            "(() => { const b = vessel.term.buffer.active; const out = [];
               for (let i = 0; i < b.length; i++) out.push(b.getLine(i).translateToString(true));
               return out.join('\\n'); })()",
        )
        .as_str()
        .unwrap_or("")
        .to_string()
    }
}

/// The issue's scenario in a real browser.
#[test]
fn dashboard_in_headless_chromium() {
    chromium();
    let kernel = std::fs::read_to_string(assets().join("kernel-version"))
        .expect("kernel-version in the guest assets: run scripts/guest-assets.sh")
        .trim()
        .to_string();
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&shots).unwrap();
    let d = Daemon::start("ui");
    let (_browser, port) = Browser::start();
    let mut p = Cdp::attach(port);
    p.call("Page.enable", json!({}));
    p.call("Page.navigate", json!({"url": d.url("/")}));
    p.wait_true(
        "!!document.querySelector('#login-view') && !document.querySelector('#login-view').hidden",
        Duration::from_secs(20),
        "the login form",
    );
    // A wrong token is refused, the right one lets the page in.
    p.eval("document.querySelector('#token').value = 'wrong-token-wrong-token'; true");
    p.click("#login-btn");
    p.wait_true(
        "document.querySelector('#login-error').textContent.includes('refused')",
        Duration::from_secs(10),
        "the refusal of a wrong token",
    );
    p.eval(&format!(
        "document.querySelector('#token').value = {}; true",
        json!(TOKEN)
    ));
    p.click("#login-btn");
    p.wait_true(
        "!document.querySelector('#main-view').hidden",
        Duration::from_secs(10),
        "the dashboard",
    );

    // Define a domain from the page, then start it with its button.
    let def = shell_domain("web", None).to_string();
    p.eval(&format!(
        "document.querySelector('#define-box').open = true; document.querySelector('#define-text').value = {}; true",
        json!(def)
    ));
    p.click("#define-btn");
    p.wait_true(
        "!!document.querySelector('tr[data-domain=\"web\"]')",
        Duration::from_secs(10),
        "the new domain's row",
    );
    p.click("button[data-action='start'][data-domain='web']");
    p.wait_true(
        "document.querySelector('tr[data-domain=\"web\"] td:nth-child(2)').textContent === 'running'",
        Duration::from_secs(20),
        "the domain running",
    );
    assert_eq!(d.state("web"), "running");
    p.wait_true(
        "document.querySelector('tr[data-domain=\"web\"] td:nth-child(5)').textContent === 'emu'",
        Duration::from_secs(10),
        "the accelerator column",
    );
    p.click("tr[data-domain='web'] td.name");
    p.wait_true(
        "document.querySelector('#console-status').textContent.includes('typing goes to the guest')",
        Duration::from_secs(20),
        "the console, writable",
    );
    // Boot, then a shell prompt.
    let t0 = Instant::now();
    while !p.terminal_text().contains("vessel-init:") {
        assert!(
            t0.elapsed() < BOOT_TIMEOUT,
            "no boot on the console: {}",
            p.terminal_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    p.eval("vessel.term.focus(); true");
    let t0 = Instant::now();
    loop {
        p.type_text("echo shell-$((20+3))");
        p.press_enter();
        std::thread::sleep(Duration::from_secs(2));
        if p.terminal_text().contains("shell-23") {
            break;
        }
        assert!(
            t0.elapsed() < BOOT_TIMEOUT,
            "no shell: {}",
            p.terminal_text()
        );
    }
    p.type_text("uname -r");
    p.press_enter();
    let t0 = Instant::now();
    loop {
        let text = p.terminal_text();
        let after = text
            .rsplit_once("uname -r")
            .map(|(_, a)| a.to_string())
            .unwrap_or_default();
        if after.lines().any(|l| l.trim() == kernel) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no `uname -r` answer {kernel:?} in:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    // Resize: the terminal refits to a narrower window (and tells the daemon).
    let cols = p.eval("vessel.term.cols").as_u64().unwrap();
    p.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 700, "height": 1000, "deviceScaleFactor": 1, "mobile": false}),
    );
    p.wait_true(
        &format!("vessel.term.cols < {cols} && vessel.term.cols > 20"),
        Duration::from_secs(10),
        "the terminal refitting to a narrower window",
    );
    p.call("Emulation.clearDeviceMetricsOverride", json!({}));
    p.wait_true(
        &format!("vessel.term.cols === {cols}"),
        Duration::from_secs(10),
        "the terminal refitting to the wider window",
    );
    // Reconnect: the page's WebSocket drops; the page opens a new one by itself and the
    // recent output comes back.
    let connects = p.eval("vessel.connects").as_u64().unwrap();
    p.eval("vessel.ws.close(); true");
    p.wait_true(
        &format!(
            "vessel.connects === {} && document.querySelector('#console-status').textContent.includes('typing goes to the guest')",
            connects + 1
        ),
        Duration::from_secs(20),
        "the console reconnecting",
    );
    let t0 = Instant::now();
    while !p.terminal_text().contains(&kernel) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no output after reconnecting: {}",
            p.terminal_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    p.eval("vessel.term.focus(); true");

    // The CPU graph moves: its points change between samples, and the guest used CPU.
    let graph = "document.querySelector('#domain-graphs canvas[data-graph=\"cpu\"]').toDataURL()";
    let before = p.eval(graph);
    // Five seconds of a busy guest.
    p.type_text(
        "e=$(($(date +%s)+5)); while [ $(date +%s) -lt $e ]; do :; done; echo spun-$((3*3))",
    );
    p.press_enter();
    let t0 = Instant::now();
    while !p.terminal_text().contains("spun-9") {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the busy loop never ended"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(2));
    let after = p.eval(graph);
    assert_ne!(before, after, "the CPU graph did not change");
    let peak = p
        .eval("Math.max(...vessel.series.dom.web.cpu[0])")
        .as_f64()
        .unwrap_or(0.0);
    assert!(
        peak > 20.0,
        "guest CPU never above 20% of a core while busy: {peak}"
    );
    p.screenshot(&shots.join("dashboard-console.png"));

    // Shut it down from the page (the ACPI power button; busybox acpid powers off).
    p.click("button[data-action='shutdown'][data-domain='web']");
    p.wait_true(
        "document.querySelector('tr[data-domain=\"web\"] td:nth-child(2)').textContent === 'shut off'",
        Duration::from_secs(120),
        "the domain shut off",
    );
    assert_eq!(d.state("web"), "shut off");
    p.wait_true(
        "document.querySelector('#events').textContent.includes('stopped')",
        Duration::from_secs(30),
        "the stop event in the list",
    );
    p.screenshot(&shots.join("dashboard-shutoff.png"));

    // Storage from the page: in a pool (defined through the API), create a volume, upload
    // a file into it (two requests: the progress bar moves) and clone it.
    let pool = d.dir.join("state").join("pools").join("p1");
    d.api(
        "POST",
        "/v1/pools",
        Some(&json!({"name": "p1", "path": pool, "create": true})),
    );
    p.eval("refreshPools(); true");
    let in_pool = |sel: &str| format!("document.querySelector('[data-pool=\"p1\"] {sel}')");
    p.wait_true(
        &format!("!!{}", in_pool(".new-name")),
        Duration::from_secs(10),
        "the pool's form",
    );
    p.eval(&format!(
        "{}.value = 'disk1'; {}.value = '16'; {}.value = 'raw'; true",
        in_pool(".new-name"),
        in_pool(".new-size"),
        in_pool(".new-format")
    ));
    p.click("[data-pool='p1'] button.create");
    p.wait_true(
        &format!("!!{}", in_pool("tr[data-volume=\"disk1\"]")),
        Duration::from_secs(10),
        "the new volume",
    );
    let upload: Vec<u8> = (0..9u32 << 20).map(|i| (i % 251) as u8).collect();
    let file = d.dir.join("upload.bin");
    std::fs::write(&file, &upload).unwrap();
    let doc = p.call("DOM.getDocument", json!({}));
    let node = p.call(
        "DOM.querySelector",
        json!({"nodeId": doc["root"]["nodeId"], "selector": "[data-pool='p1'] tr[data-volume='disk1'] input.upload"}),
    );
    p.call(
        "DOM.setFileInputFiles",
        json!({"files": [file], "nodeId": node["nodeId"]}),
    );
    p.wait_true(
        &format!(
            "(() => {{ const b = {}; return !!b && b.dataset.done === '1' && b.value === b.max && b.max === {}; }})()",
            in_pool("tr[data-volume=\"disk1\"] progress"),
            upload.len()
        ),
        Duration::from_secs(60),
        "the upload's progress bar full",
    );
    let (status, data) = d.request(
        "GET",
        &format!(
            "/v1/pools/p1/volumes/disk1/data?offset=0&length={}",
            upload.len()
        ),
        None,
        true,
    );
    assert_eq!(status, 200);
    assert!(data == upload, "the volume holds the uploaded file");
    p.eval(&format!(
        "{}.value = 'disk2'; true",
        in_pool("tr[data-volume=\"disk1\"] .clone-name")
    ));
    p.click("[data-pool='p1'] tr[data-volume='disk1'] button.clone");
    p.wait_true(
        &format!("!!{}", in_pool("tr[data-volume=\"disk2\"]")),
        Duration::from_secs(10),
        "the clone",
    );
    assert_eq!(
        d.api("GET", "/v1/pools/p1/volumes/disk2", None)["name"],
        "disk2"
    );
}
