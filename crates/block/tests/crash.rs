//! Crash consistency: a fault-injecting file stops the image after N writes, for many N;
//! `qemu-img check` must then find no corruption (leaked clusters are allowed). A second
//! mode also loses a random subset of the writes issued since the last sync, as a disk
//! cache may at power loss, which checks that the sync barriers sit where ordering matters.

mod common;

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use block::{BlockBackend, Qcow2, Storage};
use common::*;

/// Passes writes through until its budget is spent, then fails every write and sync,
/// as if the machine lost power at that point.
#[derive(Debug)]
struct CrashingFile {
    inner: File,
    budget: Arc<AtomicI64>,
    /// Writes since the last sync.
    unsynced: Arc<Mutex<Vec<UnsyncedWrite>>>,
}

/// (offset, bytes before, bytes written).
type UnsyncedWrite = (u64, Vec<u8>, Vec<u8>);

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
        let mut old = vec![0u8; buf.len()];
        self.inner.read_at(offset, &mut old)?;
        self.unsynced
            .lock()
            .unwrap()
            .push((offset, old, buf.to_vec()));
        Storage::write_at(&self.inner, offset, buf)
    }
    fn sync(&self) -> io::Result<()> {
        self.alive()?;
        self.unsynced.lock().unwrap().clear();
        Ok(())
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
/// With `lose_seed`, after the crash a random subset of the unsynced writes is undone.
fn workload(path: &Path, budget: i64, backing: Option<&Path>, lose_seed: Option<u64>) -> i64 {
    let counter = Arc::new(AtomicI64::new(budget));
    let inner = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let unsynced = Arc::new(Mutex::new(Vec::new()));
    let file = CrashingFile {
        inner,
        budget: counter.clone(),
        unsynced: unsynced.clone(),
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
    if let Some(seed) = lose_seed {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        let log = std::mem::take(&mut *unsynced.lock().unwrap());
        for (off, old, _) in log.iter().rev() {
            Storage::write_at(&f, *off, old).unwrap();
        }
        let mut rng = Rng::new(seed);
        for (off, _, new) in &log {
            if rng.below(2) == 0 {
                Storage::write_at(&f, *off, new).unwrap();
            }
        }
    }
    budget - counter.load(Ordering::SeqCst).max(0)
}

fn crash_everywhere(tag: &str, create: &[&str], with_backing: bool, lose_unsynced: bool) {
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
    let total = workload(&full, i64::MAX / 2, backing, None);
    assert_qemu_clean(&full);
    assert!(total > 50, "workload too small: {total} writes");

    let img = dir.path("crashed.qcow2");
    let step = (total / 80).max(1);
    let mut n = 0;
    let mut tried = 0;
    while n < total {
        std::fs::copy(&pristine, &img).unwrap();
        workload(&img, n, backing, lose_unsynced.then_some(n as u64));
        let (code, text) = qemu_check(&img);
        assert!(
            code == 0 || code == 3,
            "crash after {n} of {total} writes: {text}"
        );
        let r = block::check(&img, None).unwrap();
        assert!(r.is_consistent(), "crash after {n}: block check says {r:?}");
        let leaks = r.qcow2.as_ref().map_or(0, |q| q.leaks);
        assert_eq!(
            leaks > 0,
            code == 3,
            "leak verdicts differ after {n}: {r:?} vs {text}"
        );
        if leaks > 0 {
            let fixed = block::ops::check_with(&img, None, true).unwrap();
            assert_eq!(fixed.qcow2.as_ref().unwrap().leaks_fixed, leaks);
            assert_qemu_clean(&img);
        }
        // The image still opens and reads after the crash.
        let mut d = block::open_with(&img, Some(block::Format::Qcow2), true, true).unwrap();
        let mut b = vec![0u8; 64 << 10];
        d.read_at(0, &mut b).unwrap();
        n += step;
        tried += 1;
    }
    assert!(tried >= 50, "only {tried} crash points");
}

#[test]
fn crash_at_any_write_small_clusters_64bit_refcounts() {
    // 512-byte clusters with 64-bit refcounts: a refcount block covers 32 KiB and the
    // refcount table 2 MiB, so the workload adds refcount blocks and grows the table.
    crash_everywhere(
        "crash-small",
        &["-o", "cluster_size=512,refcount_bits=64"],
        false,
        false,
    );
}

#[test]
fn crash_at_any_write_with_backing_file() {
    crash_everywhere("crash-backing", &["-o", "cluster_size=4096"], true, false);
}

#[test]
fn crash_at_any_write_default_layout() {
    crash_everywhere("crash-default", &[], false, false);
}

#[test]
fn crash_losing_unsynced_writes_small_clusters() {
    crash_everywhere(
        "lose-small",
        &["-o", "cluster_size=512,refcount_bits=64"],
        false,
        true,
    );
}

#[test]
fn crash_losing_unsynced_writes_with_backing_file() {
    crash_everywhere("lose-backing", &["-o", "cluster_size=4096"], true, true);
}

#[test]
fn crash_losing_unsynced_writes_preallocated() {
    crash_everywhere(
        "lose-prealloc",
        &["-o", "cluster_size=4096,preallocation=metadata"],
        false,
        true,
    );
}
