//! Hostile images: malformed headers and tables give typed errors, never panics, and
//! thousands of random mutations of a valid image never panic either.

mod common;

use block::error::Qcow2Error;
use block::qcow2::header::HeaderError;
use block::storage::MemStorage;
use block::{BlockBackend, Format, OpenError, Qcow2};
use common::*;

/// A small valid image (512-byte clusters, some data) as bytes.
fn sample_image(dir: &TempDir, cluster: u64) -> Vec<u8> {
    let p = dir.path("sample.qcow2");
    block::ops::create_with(
        &p,
        &block::CreateOptions {
            format: Format::Qcow2,
            size: Some(256 << 10),
            backing: None,
            cluster_size: Some(cluster),
        },
    )
    .unwrap();
    let mut d = block::open(&p, Some(Format::Qcow2), false).unwrap();
    let mut rng = Rng::new(1);
    for _ in 0..12 {
        let off = rng.below(250 << 10);
        let mut b = vec![0u8; 3000];
        rng.fill(&mut b);
        d.write_at(off, &b).unwrap();
    }
    drop(d);
    std::fs::read(&p).unwrap()
}

fn open_bytes(bytes: Vec<u8>, read_only: bool) -> Result<Qcow2, Qcow2Error> {
    Qcow2::open(Box::new(MemStorage::with_limit(bytes, 64 << 20)), read_only)
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn header_err(bytes: Vec<u8>) -> HeaderError {
    match open_bytes(bytes, true) {
        Err(Qcow2Error::InvalidHeader(h)) => h,
        other => panic!("expected a header error, got {other:?}"),
    }
}

#[test]
fn malformed_headers_are_refused_cleanly() {
    let dir = TempDir::new("hdr");
    let good = sample_image(&dir, 512);
    assert!(open_bytes(good.clone(), false).is_ok());

    let mut b = good.clone();
    put32(&mut b, 0, 0x1234_5678);
    assert_eq!(header_err(b), HeaderError::BadMagic(0x1234_5678));
    assert_eq!(header_err(good[..40].to_vec()), HeaderError::Truncated);
    assert_eq!(header_err(good[..4].to_vec()), HeaderError::Truncated);
    let mut b = good.clone();
    put32(&mut b, 20, 63);
    assert_eq!(header_err(b), HeaderError::ClusterBits(63));
    let mut b = good.clone();
    put32(&mut b, 20, 8);
    assert_eq!(header_err(b), HeaderError::ClusterBits(8));
    let mut b = good.clone();
    put32(&mut b, 36, u32::MAX);
    assert_eq!(header_err(b), HeaderError::L1("too large"));
    let mut b = good.clone();
    put64(&mut b, 24, u64::MAX);
    assert_eq!(header_err(b), HeaderError::VirtualSize(u64::MAX));
    let mut b = good.clone();
    put64(&mut b, 40, 1 << 50);
    assert!(matches!(header_err(b), HeaderError::L1(_)));
    let mut b = good.clone();
    put64(&mut b, 48, 1000);
    assert!(matches!(header_err(b), HeaderError::RefcountTable(_)));
    let mut b = good.clone();
    put64(&mut b, 48, 1 << 60);
    assert!(matches!(header_err(b), HeaderError::RefcountTable(_)));
    let mut b = good.clone();
    put32(&mut b, 56, u32::MAX);
    assert!(matches!(header_err(b), HeaderError::RefcountTable(_)));
    let mut b = good.clone();
    put32(&mut b, 96, 7);
    assert_eq!(header_err(b), HeaderError::RefcountOrder(7));
    let mut b = good.clone();
    put64(&mut b, 72, 1 << 20);
    assert_eq!(header_err(b), HeaderError::UnknownIncompatible(1 << 20));
    let mut b = good.clone();
    put64(&mut b, 72, 1 << 2);
    assert!(matches!(header_err(b), HeaderError::UnsupportedFeature(_)));
    let mut b = good.clone();
    put32(&mut b, 32, 2);
    assert_eq!(header_err(b), HeaderError::Encrypted(2));
    let mut b = good.clone();
    put64(&mut b, 8, 400);
    put32(&mut b, 16, 4000);
    assert!(matches!(header_err(b), HeaderError::BackingName(_)));
    let mut b = good.clone();
    put32(&mut b, 100, 7);
    assert_eq!(header_err(b), HeaderError::HeaderLength(7));
    // Dirty and corrupt images open read-only but not for writing.
    let mut b = good.clone();
    put64(&mut b, 72, 1);
    assert!(matches!(
        open_bytes(b.clone(), false),
        Err(Qcow2Error::DirtyImage)
    ));
    assert!(open_bytes(b, true).is_ok());
    let mut b = good.clone();
    put64(&mut b, 72, 2);
    assert!(matches!(
        open_bytes(b, false),
        Err(Qcow2Error::CorruptImage)
    ));
}

#[test]
fn bad_table_entries_give_typed_errors() {
    let dir = TempDir::new("tables");
    let good = sample_image(&dir, 512);
    let q = open_bytes(good.clone(), true).unwrap();
    let l1_off = q.header().l1_table_offset as usize;
    let l1_0 = u64::from_be_bytes(good[l1_off..l1_off + 8].try_into().unwrap());
    let l2_off = (l1_0 & 0x00ff_ffff_ffff_fe00) as usize;
    drop(q);
    let mut buf = vec![0u8; 256 << 10];

    // L1 entry pointing past the end of the file.
    let mut b = good.clone();
    put64(&mut b, l1_off, (1 << 40) | (1 << 63));
    let mut q = open_bytes(b, true).unwrap();
    assert!(matches!(
        q.read_at(0, &mut buf),
        Err(block::BlockError::Qcow2(Qcow2Error::InvalidL1Entry { .. }))
    ));

    // L1 entry not cluster-aligned.
    let mut b = good.clone();
    put64(&mut b, l1_off, l2_off as u64 + 0x200 + 0x400);
    let mut q = open_bytes(b, true).unwrap();
    assert!(q.read_at(0, &mut buf).is_err());

    // Find an allocated L2 entry and make it bad in several ways.
    let idx = (0..64)
        .find(|i| good[l2_off + i * 8..l2_off + i * 8 + 8] != [0; 8])
        .expect("sample has data in the first L2 table");
    let at = l2_off + idx * 8;
    let guest = idx as u64 * 512;
    for (entry, what) in [
        ((1u64 << 45) | (1 << 63), "past EOF"),
        ((0x1000 + 0x100) | (1 << 63), "unaligned"),
        (0x1000 | 0x2 | (1 << 63), "reserved bits"),
        ((1 << 62) | (0x3fff << 54), "compressed garbage"),
    ] {
        let mut b = good.clone();
        put64(&mut b, at, entry);
        let mut q = open_bytes(b, false).unwrap();
        let mut one = [0u8; 512];
        assert!(
            q.read_at(guest, &mut one).is_err(),
            "{what}: read should fail"
        );
        assert!(
            q.write_at(guest, &[1; 100]).is_err(),
            "{what}: write should fail"
        );
    }

    // Refcount table entry pointing past the end, and unaligned.
    let rt = q_header_reftable(&good);
    for bad in [1u64 << 40, 0x300] {
        let mut b = good.clone();
        put64(&mut b, rt, bad);
        assert!(matches!(
            open_bytes(b, false),
            Err(Qcow2Error::InvalidRefcountTableEntry { .. })
        ));
    }

    // Requests past the end of the disk.
    let mut q = open_bytes(good, false).unwrap();
    assert!(matches!(
        q.read_at(256 << 10, &mut [0u8; 1]),
        Err(block::BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        q.write_at(u64::MAX - 1, &[0u8; 4]),
        Err(block::BlockError::OutOfRange { .. })
    ));
}

fn q_header_reftable(b: &[u8]) -> usize {
    u64::from_be_bytes(b[48..56].try_into().unwrap()) as usize
}

#[test]
fn backing_loops_and_missing_backing_are_refused() {
    let dir = TempDir::new("loop");
    let a = dir.path("a.qcow2");
    let b = dir.path("b.qcow2");
    block::create(&b, Format::Qcow2, Some(1 << 20), None).unwrap();
    block::create(
        &a,
        Format::Qcow2,
        None,
        Some(("b.qcow2", Some(Format::Qcow2))),
    )
    .unwrap();
    // Re-create b on top of a: a -> b -> a.
    block::create(
        &b,
        Format::Qcow2,
        None,
        Some(("a.qcow2", Some(Format::Qcow2))),
    )
    .unwrap();
    assert!(matches!(
        block::open(&a, None, true),
        Err(OpenError::ChainLoop { .. })
    ));
    assert!(matches!(
        block::ops::info_chain(&a, None),
        Err(block::ops::InfoError::ChainLoop { .. })
    ));
    // An image that is its own backing file.
    let c = dir.path("c.qcow2");
    block::create(&c, Format::Qcow2, Some(1 << 20), None).unwrap();
    let mut bytes = std::fs::read(&c).unwrap();
    let name = b"c.qcow2";
    put64(&mut bytes, 8, 4000);
    put32(&mut bytes, 16, name.len() as u32);
    bytes[4000..4000 + name.len()].copy_from_slice(name);
    std::fs::write(&c, &bytes).unwrap();
    assert!(matches!(
        block::open(&c, None, true),
        Err(OpenError::ChainLoop { .. })
    ));
    // Missing backing file.
    let d = dir.path("d.qcow2");
    block::create(
        &d,
        Format::Qcow2,
        None,
        Some(("c.qcow2", Some(Format::Qcow2))),
    )
    .unwrap_err();
    bytes[4000..4000 + name.len()].copy_from_slice(b"x.qcow2");
    std::fs::write(&d, &bytes).unwrap();
    assert!(matches!(
        block::open(&d, None, true),
        Err(OpenError::Backing { .. })
    ));
    // Unknown backing format.
    let e = dir.path("e.qcow2");
    let raw = dir.path("r.raw");
    block::create(&raw, Format::Raw, Some(4096), None).unwrap();
    block::create(&e, Format::Qcow2, None, Some(("r.raw", Some(Format::Raw)))).unwrap();
    let mut eb = std::fs::read(&e).unwrap();
    let pos = eb.windows(3).position(|w| w == b"raw").unwrap();
    eb[pos..pos + 3].copy_from_slice(b"vmd");
    std::fs::write(&e, &eb).unwrap();
    assert!(matches!(
        block::open(&e, None, true),
        Err(OpenError::BackingFormat { .. })
    ));
}

/// Mutates metadata bytes of valid images thousands of times: opening, reading, writing,
/// discarding, resizing and checking must never panic.
#[test]
fn random_mutations_never_panic() {
    let dir = TempDir::new("fuzz");
    let raw = dir.path("c.raw");
    patterned_raw(&raw, 256 << 10, 5);
    let mut images = vec![
        (sample_image(&dir, 512), 512),
        (sample_image(&dir, 4096), 4096),
    ];
    for opts in [
        "cluster_size=4096",
        "cluster_size=4096,compression_type=zstd",
    ] {
        let c = dir.path("c.qcow2");
        qemu_img(&[
            "convert",
            "-c",
            "-o",
            opts,
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&raw),
            s(&c),
        ]);
        // Compressed data sits everywhere: treat the whole file as metadata to mutate.
        let bytes = std::fs::read(&c).unwrap();
        let len = bytes.len() as u64;
        images.push((bytes, len.div_ceil(8)));
    }
    let mut rng = Rng::new(0xf00d);
    let mut opened = 0;
    for iter in 0..6000u64 {
        let (base, cs) = &images[(iter % images.len() as u64) as usize];
        let cs = *cs;
        let mut b = base.clone();
        // Metadata lives in the first clusters (header, refcount table and block, L1, L2).
        let meta_end = (8 * cs).min(b.len() as u64);
        for _ in 0..rng.below(6) + 1 {
            let at = if rng.below(4) == 0 {
                rng.below(b.len() as u64)
            } else {
                rng.below(meta_end)
            };
            let v = match rng.below(4) {
                0 => 0,
                1 => 0xff,
                _ => rng.next() as u8,
            };
            b[at as usize] = v;
        }
        if rng.below(8) == 0 {
            b.truncate(rng.below(b.len() as u64) as usize);
        }
        let read_only = rng.below(3) == 0;
        let Ok(mut q) = open_bytes(b, read_only) else {
            continue;
        };
        opened += 1;
        let size = q.size();
        let mut buf = vec![0u8; 8192];
        for _ in 0..4 {
            let off = rng.below(size.max(1));
            let n = (rng.below(8192) as usize).min((size - off.min(size)) as usize);
            let _ = q.read_at(off, &mut buf[..n]);
            let _ = q.write_at(off, &buf[..n]);
        }
        let off = rng.below(size.max(1));
        let _ = q.write_zeroes(off, (size - off.min(size)).min(20_000));
        let _ = q.discard(off / 2, (size - (off / 2).min(size)).min(20_000));
        let _ = q.block_status(0, size.min(1 << 20));
        if iter % 10 == 0 {
            let _ = q.resize(size.saturating_add(1 << 20));
        }
        let _ = q.flush();
        let _ = block::qcow2::check::check(&mut q, iter % 3 == 0);
    }
    eprintln!("{opened} mutated images opened");
    assert!(
        opened > 1000,
        "only {opened} mutated images opened: mutations too destructive"
    );
}

/// A refcount table whose million entries all point at one block of 0xff: every cluster
/// claims to be in use. Allocation must still finish quickly (clusters past the end of the
/// file hold nothing whatever their refcount) instead of scanning 2^28 entries.
#[test]
fn hostile_refcount_table_does_not_stall_allocation() {
    let dir = TempDir::new("bigrt");
    let mut b = sample_image(&dir, 512);
    let cs = 512usize;
    let len = b.len().div_ceil(cs) * cs;
    b.resize(len, 0);
    let full_block = len as u64;
    b.extend_from_slice(&[0xff; 512]);
    let table = b.len() as u64;
    let clusters = (8 << 20) / cs as u32;
    for _ in 0..(8 << 20) / 8 {
        b.extend_from_slice(&full_block.to_be_bytes());
    }
    put64(&mut b, 48, table);
    put32(&mut b, 56, clusters);
    let t = std::time::Instant::now();
    let mut q = open_bytes(b, false).unwrap();
    let _ = q.write_at(100_000, &[7u8; 5000]);
    let _ = q.discard(0, 64 << 10);
    let _ = q.write_at(0, &[1u8; 70_000]);
    assert!(t.elapsed().as_secs() < 10, "took {:?}", t.elapsed());
}

/// An L1 table whose every entry points at the same L2 table: check must read that table
/// once, not once per entry, and call the image corrupt.
#[test]
fn check_reads_a_shared_l2_table_once() {
    let dir = TempDir::new("sharedl2");
    let good = sample_image(&dir, 512);
    let q = open_bytes(good.clone(), true).unwrap();
    let l1_off = q.header().l1_table_offset as usize;
    let l1_size = q.header().l1_size as usize;
    drop(q);
    let mut b = good.clone();
    let first = u64::from_be_bytes(b[l1_off..l1_off + 8].try_into().unwrap());
    // Grow the L1 table to 1M entries (8 MiB) all pointing at the first L2 table.
    let new_l1 = b.len().div_ceil(512) * 512;
    b.resize(new_l1, 0);
    for _ in 0..(1usize << 20) {
        b.extend_from_slice(&first.to_be_bytes());
    }
    put64(&mut b, 24, (1u64 << 20) * 32 * 1024); // virtual size the L1 covers
    put32(&mut b, 36, 1 << 20);
    put64(&mut b, 40, new_l1 as u64);
    assert!(l1_size < 1 << 20);
    let t = std::time::Instant::now();
    let mut q = open_bytes(b, true).unwrap();
    let r = block::qcow2::check::check(&mut q, false).unwrap();
    assert!(r.corruptions > 0, "{r:?}");
    assert!(t.elapsed().as_secs() < 10, "took {:?}", t.elapsed());
}
