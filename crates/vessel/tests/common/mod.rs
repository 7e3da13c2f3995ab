//! Shared test helpers: running the real `vessel` binary, and building tiny guest kernels.
#![allow(dead_code)]

pub mod console;
pub mod guest;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub fn vessel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vessel"))
}

/// A scratch folder removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "vessel-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn file(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, data).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // VESSEL_TEST_KEEP=1 keeps generated kernels and logs for a post-mortem.
        if std::env::var_os("VESSEL_TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A child process killed (by its own PID) if the test ends before it does.
pub struct Guarded(pub Child);

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Waits until the file at `path` (a guest's console log) contains `needle`; panics with
/// the file's text after `limit`.
/// Waits until the VMM has made its API socket at `sock`; fails after `limit`.
pub fn wait_for_socket(sock: &Path, limit: Duration) {
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(
            t0.elapsed() < limit,
            "no API socket at {} within {limit:?}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn wait_for_text(path: &Path, needle: &str, limit: Duration) {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(
            t0.elapsed() < limit,
            "{needle:?} never appeared in {}:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Run `cmd` to completion within `limit`, capturing output; panics on a hang.
pub fn run_with_timeout(cmd: &mut Command, limit: Duration) -> Finished {
    let start = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vessel");
    let mut g = Guarded(child);
    let mut out = g.0.stdout.take().unwrap();
    let mut err = g.0.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let status = loop {
        if let Some(s) = g.0.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = g.0.kill();
            let _ = g.0.wait();
            let stderr = String::from_utf8_lossy(&t_err.join().unwrap()).into_owned();
            let stdout = String::from_utf8_lossy(&t_out.join().unwrap()).into_owned();
            // The tail of the console says where a hung guest stopped.
            let tail: String = {
                let lines: Vec<&str> = stdout.lines().collect();
                lines[lines.len().saturating_sub(40)..].join("\n")
            };
            panic!(
                "vessel did not finish within {limit:?}; stderr:\n{stderr}\nlast console lines:\n{tail}"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Finished {
        status,
        stdout: String::from_utf8_lossy(&t_out.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&t_err.join().unwrap()).into_owned(),
        elapsed: start.elapsed(),
    }
}

/// `vessel run` arguments of one VMM in a chain of snapshots: its API on `sock`, and
/// the VM of `config` booted fresh, or (`from`) that snapshot restored under `accel` with
/// its serial console on stdout.
pub fn chain_step_args<'a>(
    sock: &'a Path,
    config: &'a Path,
    from: Option<&'a Path>,
    accel: &'a str,
) -> Vec<&'a std::ffi::OsStr> {
    let mut args: Vec<&std::ffi::OsStr> =
        vec!["run".as_ref(), "--api-sock".as_ref(), sock.as_os_str()];
    match from {
        None => args.extend(["--config".as_ref(), config.as_os_str()]),
        Some(snap) => args.extend([
            "--accel".as_ref(),
            accel.as_ref(),
            "--serial".as_ref(),
            "stdio".as_ref(),
            "--restore".as_ref(),
            snap.as_os_str(),
        ]),
    }
    args
}

/// The guest assets folder; panics with the setup step when the assets are missing.
pub fn assets() -> PathBuf {
    let dir = std::env::var_os("VESSEL_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/vessel/assets")
        });
    assert!(
        dir.join("vmlinuz").is_file() && dir.join("initramfs.cpio.gz").is_file(),
        "guest assets missing in {}: run scripts/guest-assets.sh",
        dir.display()
    );
    dir
}

/// The guest assets' initramfs with one more static program, built here from `c_source`
/// with gcc (`cflags` added), appended as a second cpio archive (the kernel unpacks
/// concatenated archives in order). Written into `dir`.
pub fn initramfs_with_program(dir: &Path, c_source: &Path, name: &str, cflags: &[&str]) -> PathBuf {
    let bin_dir = dir.join("extra");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let st = Command::new("gcc")
        .args(["-static", "-O2"])
        .args(cflags)
        .arg("-o")
        .arg(bin_dir.join(name))
        .arg(c_source)
        .status()
        .expect("gcc is needed to build the guest test program: apt-get install gcc libc6-dev");
    assert!(
        st.success(),
        "gcc -static failed for {} (apt-get install libc6-dev)",
        c_source.display()
    );
    let cpio = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && echo {name} | cpio -o -H newc --quiet | gzip",
            bin_dir.display()
        ))
        .output()
        .expect("cpio and gzip are needed");
    assert!(cpio.status.success());
    let mut img = std::fs::read(assets().join("initramfs.cpio.gz")).unwrap();
    img.extend_from_slice(&cpio.stdout);
    let out = dir.join(format!("initramfs-{name}.cpio.gz"));
    std::fs::write(&out, img).unwrap();
    out
}

/// User + system CPU time of process `pid`, in clock ticks (1/100 s).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// One request to a VMM's API socket: the status and the JSON body (null when there is
/// none).
pub fn api(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let (status, body) = api_raw(sock, method, path, body);
    let v = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (status, v)
}

/// One request to a VMM's API socket: the status and the body as it came.
pub fn api_raw(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, Vec<u8>) {
    let r = vmm::api::http::client_request(
        sock,
        method,
        path,
        body.map(|b| ("application/json", b.as_bytes())),
    )
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (r.status, r.body)
}

/// A network namespace a test creates (`vessel-TAG-PID`) and deletes when dropped.
pub struct NetNs(pub String);

impl NetNs {
    pub fn new(tag: &str) -> Self {
        let name = format!("vessel-{tag}-{}", std::process::id());
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip (iproute2) is needed");
        assert!(st.success(), "ip netns add failed (needs root)");
        NetNs(name)
    }

    /// `ip netns exec NAME`, to which the caller adds the program and its arguments.
    pub fn exec(&self) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]);
        c
    }

    /// Whether `ip -n NAME ARGS` succeeds (its output discarded).
    pub fn ip_succeeds(&self, args: &[&str]) -> bool {
        Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `ip -n NAME ARGS`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let o = Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .output()
            .expect("ip (iproute2) is needed");
        assert!(
            o.status.success(),
            "ip -n {} {args:?}: {}",
            self.0,
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
