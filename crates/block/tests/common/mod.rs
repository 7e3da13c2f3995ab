//! Shared fixtures for the integration tests: temp dirs, a PRNG, qemu-img helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "vessel-block-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// xorshift64*: deterministic test randomness without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next() as u8;
        }
    }
}

fn tool(name: &str) -> Command {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{name} not found: these interop tests need QEMU's tools; install them with \
         `apt-get install qemu-utils`"
    );
    Command::new(name)
}

/// qemu-img subcommands that only read their input image(s).
const READ_ONLY_SUBCOMMANDS: [&str; 4] = ["check", "compare", "convert", "info"];

/// Runs qemu-img with `args`; panics (with its stderr) unless it exits 0.
///
/// Read-only subcommands run with `-U` (share locks): tests run in parallel threads that
/// spawn processes all the time, and a child forked by one thread briefly holds every
/// descriptor of the test process, with its image locks, until it execs. The lock test
/// calls qemu-img without this helper.
pub fn qemu_img(args: &[&str]) -> Output {
    let mut c = tool("qemu-img");
    match args.split_first() {
        Some((sub, rest)) if READ_ONLY_SUBCOMMANDS.contains(sub) && !rest.contains(&"-U") => {
            c.arg(sub).arg("-U").args(rest)
        }
        _ => c.args(args),
    };
    let out = c.output().expect("running qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs qemu-io on an image with one or more `-c` commands.
pub fn qemu_io(fmt: &str, path: &Path, cmds: &[&str]) {
    let mut c = tool("qemu-io");
    c.args(["-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(path).output().expect("running qemu-io");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("failed"),
        "qemu-io {cmds:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img check` exit code (0 clean, 2 corruptions, 3 leaks only) and its output.
pub fn qemu_check(path: &Path) -> (i32, String) {
    let out = tool("qemu-img")
        .args(["check", "-U", "-f", "qcow2"])
        .arg(path)
        .output()
        .expect("running qemu-img check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Asserts `qemu-img check` finds the image clean.
pub fn assert_qemu_clean(path: &Path) {
    let (code, text) = qemu_check(path);
    assert_eq!(code, 0, "qemu-img check {}: {text}", path.display());
}

/// Converts an image to raw with qemu-img and returns the bytes.
pub fn qemu_to_raw(dir: &TempDir, path: &Path, fmt: &str) -> Vec<u8> {
    let out = dir.path("qemu-export.raw");
    let p = path.to_str().unwrap();
    qemu_img(&["convert", "-f", fmt, "-O", "raw", p, out.to_str().unwrap()]);
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

/// Reads the whole disk through block.
pub fn read_all(d: &mut dyn block::BlockBackend) -> Vec<u8> {
    let mut v = vec![0u8; d.size() as usize];
    for (i, chunk) in v.chunks_mut(256 << 10).enumerate() {
        d.read_at(i as u64 * (256 << 10), chunk).unwrap();
    }
    v
}

/// A raw file with pseudo-random data in some 64 KiB pieces and zeros elsewhere.
pub fn patterned_raw(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut data = vec![0u8; size];
    for piece in data.chunks_mut(64 << 10) {
        if rng.below(3) != 0 {
            let n = piece.len();
            let start = rng.below(n as u64) as usize;
            rng.fill(&mut piece[start..]);
        }
    }
    std::fs::write(path, &data).unwrap();
    data
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
