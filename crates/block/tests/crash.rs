//! Crash consistency: a fault-injecting file stops the image after N writes, for many N;
//! `qemu-img check` must then find no corruption (leaked clusters are allowed).

mod common;

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use block::{BlockBackend, Qcow2, Storage};
use common::*;

/// Passes writes through until its budget is spent, then fails every write and sync,
/// as if the machine lost power at that point.
#[derive(Debug)]
struct CrashingFile {
    inner: File,
    budget: Arc<AtomicI64>,
}

impl CrashingFile {
    fn spend(&self) -> io::Result<()> {
        if self.budget.fetch_sub(1, Ordering::SeqCst) <= 0 {
            return Err(io::Error::other("injected crash"));
        }
        Ok(())
    }
    fn alive(&self) -> io::Result<()> {
        if self.budget.load(Ordering::SeqCst) <= 0 {
            return Err(io::Error::other("injected crash"));
        }
        Ok(())
    }
}

impl Storage for CrashingFile {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.spend()?;
        Storage::write_at(&self.inner, offset, buf)
    }
    fn sync(&self) -> io::Result<()> {
        self.alive()
    }
    fn file_len(&self) -> io::Result<u64> {
        self.inner.file_len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.spend()?;
        Storage::set_len(&self.inner, len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.spend()?;
        self.inner.punch_hole(offset, len)
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.inner.allocated_bytes()
    }
}

/// Runs a fixed workload until it fails; returns the writes the budget allowed.
fn workload(path: &Path, budget: i64, backing: Option<&Path>) -> i64 {
    let counter = Arc::new(AtomicI64::new(budget));
    let inner = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let file = CrashingFile {
        inner,
        budget: counter.clone(),
    };
    let run = || -> Result<(), Box<dyn std::error::Error>> {
        let mut q = Qcow2::open(Box::new(file), false)?;
        if let Some(b) = backing {
            q.set_backing(block::open(b, Some(block::Format::Raw), true)?);
        }
        let mut rng = Rng::new(77);
        let size = q.size();
        for step in 0..40u64 {
            let off = rng.below(size);
            let len = (rng.below(48 << 10) + 1).min(size - off);
            match rng.below(8) {
                0 => q.write_zeroes(off, len)?,
                1 => q.discard(off, len)?,
                _ => {
                    let mut b = vec![0u8; len as usize];
                    rng.fill(&mut b);
                    q.write_at(off, &b)?;
                }
            }
            if step == 20 {
                q.resize(size + (3 << 20))?;
            }
        }
        q.flush()?;
        Ok(())
    };
    let _ = run();
    budget - counter.load(Ordering::SeqCst).max(0)
}

fn crash_everywhere(tag: &str, create: &[&str], with_backing: bool) {
    let dir = TempDir::new(tag);
    let pristine = dir.path("pristine.qcow2");
    let base = dir.path("base.raw");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if with_backing {
        patterned_raw(&base, 2 << 20, 1);
        args.extend_from_slice(&["-b", "base.raw", "-F", "raw"]);
    }
    args.extend_from_slice(create);
    args.extend_from_slice(&[s(&pristine), "2M"]);
    qemu_img(&args);
    let backing = with_backing.then_some(base.as_path());

    let full = dir.path("full.qcow2");
    std::fs::copy(&pristine, &full).unwrap();
    let total = workload(&full, i64::MAX / 2, backing);
    assert_qemu_clean(&full);
    assert!(total > 50, "workload too small: {total} writes");

    let img = dir.path("crashed.qcow2");
    let step = (total / 150).max(1);
    let mut n = 0;
    let mut tried = 0;
    while n < total {
        std::fs::copy(&pristine, &img).unwrap();
        workload(&img, n, backing);
        let (code, text) = qemu_check(&img);
        assert!(
            code == 0 || code == 3,
            "crash after {n} of {total} writes: {text}"
        );
        let r = block::check(&img, None).unwrap();
        assert!(r.is_consistent(), "crash after {n}: block check says {r:?}");
        // The image still opens and reads after the crash.
        let mut d = block::open(&img, Some(block::Format::Qcow2), true).unwrap();
        let mut b = vec![0u8; 64 << 10];
        d.read_at(0, &mut b).unwrap();
        n += step;
        tried += 1;
    }
    assert!(tried >= 50);
}

#[test]
fn crash_at_any_write_small_clusters_64bit_refcounts() {
    // 512-byte clusters with 64-bit refcounts: a refcount block covers 32 KiB and the
    // refcount table 2 MiB, so the workload adds refcount blocks and grows the table.
    crash_everywhere(
        "crash-small",
        &["-o", "cluster_size=512,refcount_bits=64"],
        false,
    );
}

#[test]
fn crash_at_any_write_with_backing_file() {
    crash_everywhere("crash-backing", &["-o", "cluster_size=4096"], true);
}

#[test]
fn crash_at_any_write_default_layout() {
    crash_everywhere("crash-default", &[], false);
}
