//! A guest's serial console driven like a person at a terminal: type, read, expect.

use std::io::{Read, Write};
use std::process::{ChildStdin, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use super::{assets, vessel, Guarded};

/// The default kernel command line for console tests.
pub const CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// A booted guest with its console.
pub struct Console {
    guard: Guarded,
    stdin: ChildStdin,
    rx: Receiver<Vec<u8>>,
    seen: Vec<u8>,
    /// Everything before this offset has been matched already.
    mark: usize,
}

impl Console {
    pub fn boot(extra: &[&str]) -> Console {
        Self::boot_with(vessel(), extra)
    }

    /// Boot through `cmd` (e.g. `ip netns exec NS vessel`); `run` is added here.
    pub fn boot_with(mut cmd: std::process::Command, extra: &[&str]) -> Console {
        let a = assets();
        cmd.args([
            "run", "--accel", "emu", "--memory", "256M", "--serial", "stdio",
        ]);
        // The guest assets' kernel and initramfs unless the test brings its own.
        if !extra.contains(&"--kernel") {
            cmd.arg("--kernel").arg(a.join("vmlinuz"));
        }
        if !extra.contains(&"--initrd") {
            cmd.arg("--initrd").arg(a.join("initramfs.cpio.gz"));
        }
        let child = cmd
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vessel");
        Self::attach(child)
    }

    /// The console of a VMM already spawned with its stdin and stdout piped (a VM the
    /// test configures through the API before it boots).
    pub fn attach(child: std::process::Child) -> Console {
        let mut guard = Guarded(child);
        let stdin = guard.0.stdin.take().unwrap();
        let mut out = guard.0.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Console {
            guard,
            stdin,
            rx,
            seen: Vec::new(),
            mark: 0,
        }
    }

    /// Wait for `needle` after everything matched so far; returns the text up to it.
    pub fn expect(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let hay = String::from_utf8_lossy(&self.seen[self.mark..]).into_owned();
            if let Some(i) = hay.find(needle) {
                let upto = hay[..i + needle.len()].to_string();
                self.mark += upto.len();
                return upto;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(chunk) => self.seen.extend(chunk),
                Err(_) => panic!(
                    "guest never printed {needle:?} within {limit:?}; console so far:\n{}",
                    String::from_utf8_lossy(&self.seen)
                ),
            }
        }
    }

    pub fn send(&mut self, line: &str) {
        self.stdin.write_all(line.as_bytes()).unwrap();
        self.stdin.write_all(b"\n").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Run a shell command and return what it printed between two markers. The markers
    /// are quoted apart in the typed line, so its echo (which a line editor may repeat)
    /// never matches them.
    pub fn run(&mut self, cmd: &str, limit: Duration) -> String {
        self.send(&format!("echo '@@'B; {cmd}; echo '@@'E"));
        self.expect("@@B", limit);
        let out = self.expect("@@E", limit);
        out.trim_end_matches("@@E").trim().to_string()
    }

    /// The VMM's PID.
    pub fn pid(&self) -> u32 {
        self.guard.0.id()
    }

    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.guard.0.try_wait().unwrap() {
                return s.code();
            }
            assert!(Instant::now() < deadline, "vessel did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
