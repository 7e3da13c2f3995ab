//! Debian's cloud kernel on the emu accelerator, driven through its serial console the way
//! a person would: type commands at the busybox shell, read the answers, power off.

mod common;

use std::io::{Read, Write};
use std::process::{ChildStdin, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use common::*;

/// A booted guest with its console.
struct Console {
    guard: Guarded,
    stdin: ChildStdin,
    rx: Receiver<Vec<u8>>,
    seen: Vec<u8>,
    /// Everything before this offset has been matched already.
    mark: usize,
}

impl Console {
    fn boot(extra: &[&str]) -> Console {
        let a = assets();
        let child = vessel()
            .args([
                "run", "--accel", "emu", "--memory", "256M", "--serial", "stdio",
            ])
            .arg("--kernel")
            .arg(a.join("vmlinuz"))
            .arg("--initrd")
            .arg(a.join("initramfs.cpio.gz"))
            .args(["--cmdline", "console=ttyS0 panic=-1 quiet"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vessel");
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
    fn expect(&mut self, needle: &str, limit: Duration) -> String {
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

    fn send(&mut self, line: &str) {
        self.stdin.write_all(line.as_bytes()).unwrap();
        self.stdin.write_all(b"\n").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Run a shell command and return what it printed between two markers. The markers
    /// are quoted apart in the typed line, so its echo (which a line editor may repeat)
    /// never matches them.
    fn run(&mut self, cmd: &str, limit: Duration) -> String {
        self.send(&format!("echo '@@'B; {cmd}; echo '@@'E"));
        self.expect("@@B", limit);
        let out = self.expect("@@E", limit);
        out.trim_end_matches("@@E").trim().to_string()
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
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

const BOOT: Duration = Duration::from_secs(90);
const CMD: Duration = Duration::from_secs(30);

#[test]
fn debian_kernel_boots_to_a_busybox_shell_and_powers_off() {
    let start = Instant::now();
    let mut c = Console::boot(&[]);
    let banner = c.expect("vessel-init:", BOOT);
    let boot = start.elapsed();
    c.expect("~ #", BOOT);
    eprintln!("boot to init: {boot:?}");
    let _ = banner;

    let kver = std::fs::read_to_string(assets().join("kernel-version")).unwrap();
    assert_eq!(c.run("uname -r", CMD), kver.trim());

    let cpuinfo = c.run("cat /proc/cpuinfo", CMD);
    assert!(cpuinfo.contains("processor\t: 0"), "{cpuinfo}");
    assert!(cpuinfo.contains("sse2"), "{cpuinfo}");

    let irqs = c.run("cat /proc/interrupts", CMD);
    assert!(irqs.contains("IO-APIC") && irqs.contains("ttyS0"), "{irqs}");
    assert!(irqs.contains("LOC:"), "{irqs}");

    let sum = c.run(
        "s=0; for i in $(seq 1 200); do s=$((s+i)); done; echo $s",
        CMD,
    );
    assert_eq!(sum, "20100");

    let clock = c.run("dmesg | grep -i clocksource", CMD);
    assert!(
        clock.contains("Switched to clocksource kvm-clock")
            || clock.contains("Switched to clocksource tsc"),
        "{clock}"
    );
    assert!(!clock.to_lowercase().contains("unstable"), "{clock}");

    // A timer the guest can trust: `sleep 2` takes about two seconds of host time.
    let t = Instant::now();
    c.run("sleep 2", CMD);
    let slept = t.elapsed();
    assert!(
        slept >= Duration::from_millis(1900) && slept < Duration::from_secs(6),
        "sleep 2 took {slept:?}"
    );

    c.send("poweroff -f");
    assert_eq!(c.wait_exit(CMD), Some(0));
}

#[test]
fn two_vcpus_come_online() {
    let mut c = Console::boot(&["--cpus", "2"]);
    let banner = c.expect("cpu(s)", BOOT);
    assert!(banner.contains("up, 2 cpu(s)"), "{banner}");
    c.expect("~ #", BOOT);
    assert_eq!(c.run("nproc", CMD), "2");
    let online = c.run("cat /sys/devices/system/cpu/online", CMD);
    assert_eq!(online, "0-1");
    c.send("poweroff -f");
    assert_eq!(c.wait_exit(CMD), Some(0));
}
