//! The raw backend, format probing and the format-independent helpers.

mod common;

use block::{BlockError, BlockStatus, Format};
use common::*;

#[test]
fn raw_read_write_bounds_and_read_only() {
    let dir = TempDir::new("raw");
    let p = dir.path("d.raw");
    block::create(&p, Format::Raw, Some(1 << 20), None).unwrap();
    let mut d = block::open(&p, Some(Format::Raw), false).unwrap();
    assert_eq!(d.size(), 1 << 20);
    d.write_at(4090, b"across a page").unwrap();
    let mut b = [0u8; 13];
    d.read_at(4090, &mut b).unwrap();
    assert_eq!(&b, b"across a page");
    assert!(matches!(
        d.read_at((1 << 20) - 4, &mut b),
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        d.write_at(u64::MAX, &b),
        Err(BlockError::OutOfRange { .. })
    ));
    d.flush().unwrap();
    drop(d);
    let mut r = block::open(&p, Some(Format::Raw), true).unwrap();
    assert!(r.read_only());
    assert!(matches!(r.write_at(0, b"x"), Err(BlockError::ReadOnly)));
    assert!(matches!(r.discard(0, 512), Err(BlockError::ReadOnly)));
}

#[test]
fn raw_zeroes_discard_and_block_status() {
    let dir = TempDir::new("rawz");
    let p = dir.path("z.raw");
    block::create(&p, Format::Raw, Some(4 << 20), None).unwrap();
    let mut d = block::open(&p, Some(Format::Raw), false).unwrap();
    assert_eq!(d.block_status(0, 4 << 20).unwrap().0, BlockStatus::Zero);
    let data = vec![0x5au8; 2 << 20];
    d.write_at(1 << 20, &data).unwrap();
    d.flush().unwrap();
    let (st, n) = d.block_status(1 << 20, 1 << 20).unwrap();
    assert_eq!((st, n), (BlockStatus::Data, 1 << 20));
    let (st, n) = d.block_status(0, 4 << 20).unwrap();
    assert_eq!((st, n), (BlockStatus::Zero, 1 << 20));
    let before = block::info(&p, None).unwrap().actual_size;
    d.write_zeroes(1 << 20, 1 << 20).unwrap();
    d.discard(2 << 20, 4096).unwrap();
    let mut b = vec![1u8; 1 << 20];
    d.read_at(1 << 20, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    let after = block::info(&p, None).unwrap().actual_size;
    assert!(
        after < before,
        "write_zeroes should deallocate: {before} -> {after}"
    );
}

#[test]
fn sparse_raw_converts_to_a_small_qcow2() {
    let dir = TempDir::new("sparse");
    let p = dir.path("s.raw");
    block::create(&p, Format::Raw, Some(1 << 30), None).unwrap();
    {
        let mut d = block::open(&p, Some(Format::Raw), false).unwrap();
        d.write_at(500 << 20, &[7u8; 70000]).unwrap();
    }
    let q = dir.path("s.qcow2");
    block::convert(&p, None, &q, Format::Qcow2, &mut |_, _| {}).unwrap();
    let r = block::check(&q, None).unwrap().qcow2.unwrap();
    assert_eq!(r.allocated_clusters, 2, "{r:?}");
    qemu_img(&["compare", "-q", "-f", "qcow2", "-F", "raw", s(&q), s(&p)]);
}

#[test]
fn probing_and_format_names() {
    let dir = TempDir::new("probe");
    let q = dir.path("a.qcow2");
    let r = dir.path("a.img");
    block::create(&q, Format::Qcow2, Some(1 << 20), None).unwrap();
    block::create(&r, Format::Raw, Some(1 << 20), None).unwrap();
    assert_eq!(block::probe(&q).unwrap(), Format::Qcow2);
    assert_eq!(block::probe(&r).unwrap(), Format::Raw);
    let tiny = dir.path("tiny");
    std::fs::write(&tiny, b"QF").unwrap();
    assert_eq!(block::probe(&tiny).unwrap(), Format::Raw);
    // Opening a qcow2 file as raw is allowed and exposes the file bytes.
    let d = block::open(&q, Some(Format::Raw), true).unwrap();
    assert_eq!(d.size(), std::fs::metadata(&q).unwrap().len());
    assert_eq!("qcow2".parse::<Format>().unwrap(), Format::Qcow2);
    assert_eq!(Format::Raw.to_string(), "raw");
    assert!("vmdk".parse::<Format>().is_err());
    assert_eq!(
        block::resolve_backing(std::path::Path::new("/x/y/top.qcow2"), "base.raw"),
        std::path::PathBuf::from("/x/y/base.raw")
    );
    assert_eq!(
        block::resolve_backing(std::path::Path::new("/x/top.qcow2"), "/abs/b"),
        std::path::PathBuf::from("/abs/b")
    );
    assert!(matches!(
        block::open(&dir.path("missing"), None, true),
        Err(block::OpenError::OpenFile { .. })
    ));
    assert!(matches!(
        block::create(&dir.path("b.raw"), Format::Raw, None, Some(("a.img", None))),
        Err(block::ops::CreateError::BackingNeedsQcow2)
    ));
}
