//! Interoperability with QEMU's qemu-img/qemu-io (package qemu-utils): images QEMU writes
//! read correctly here, and images written here pass `qemu-img check` and compare equal.

mod common;

use block::{BlockBackend, Format};
use common::*;

fn open_rw(p: &std::path::Path) -> Box<dyn BlockBackend> {
    block::open(p, Some(Format::Qcow2), false).unwrap()
}

#[test]
fn reads_images_qemu_wrote_with_qemu_io() {
    let dir = TempDir::new("qio");
    let img = dir.path("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "8M"]);
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -P 0xab 0 64k",
            "write -P 0x11 100k 3000",
            "write -P 0x22 5M 1M",
            "write -z 5M 64k",
            "discard 5248k 64k",
            "write -P 0x33 8388096 512",
        ],
    );
    let want = qemu_to_raw(&dir, &img, "qcow2");
    let mut d = block::open(&img, None, true).unwrap();
    assert_eq!(d.size(), 8 << 20);
    assert_eq!(read_all(d.as_mut()), want);
}

#[test]
fn reads_qemu_converted_images_all_variants() {
    let dir = TempDir::new("conv");
    let raw = dir.path("src.raw");
    let want = patterned_raw(&raw, 3 << 20, 7);
    let variants: &[&[&str]] = &[
        &[],
        &["-o", "cluster_size=512"],
        &["-o", "cluster_size=2M"],
        &["-o", "compat=0.10"],
        &["-o", "refcount_bits=1"],
        &["-o", "refcount_bits=64"],
        &["-c"],
        &["-c", "-o", "cluster_size=4096"],
    ];
    for (i, extra) in variants.iter().enumerate() {
        let img = dir.path(&format!("v{i}.qcow2"));
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[s(&raw), s(&img)]);
        qemu_img(&args);
        let mut d = block::open(&img, Some(Format::Qcow2), true).unwrap();
        assert_eq!(read_all(d.as_mut()), want, "variant {extra:?}");
        let r = block::check(&img, None).unwrap();
        assert!(
            r.is_consistent() && r.qcow2.as_ref().unwrap().leaks == 0,
            "{extra:?}: {r:?}"
        );
    }
}

/// Random writes, overwrites, write-zeroes and discards mirrored in a shadow buffer.
fn random_workload(d: &mut dyn BlockBackend, shadow: &mut [u8], seed: u64, ops: usize) {
    let mut rng = Rng::new(seed);
    let size = shadow.len() as u64;
    for _ in 0..ops {
        let off = rng.below(size);
        let len = (rng.below(200 << 10) + 1).min(size - off);
        match rng.below(10) {
            0 => {
                d.write_zeroes(off, len).unwrap();
                shadow[off as usize..(off + len) as usize].fill(0);
            }
            1 => {
                // Discard leaves unspecified content: re-read it into the shadow.
                d.discard(off, len).unwrap();
                let mut b = vec![0u8; len as usize];
                d.read_at(off, &mut b).unwrap();
                shadow[off as usize..(off + len) as usize].copy_from_slice(&b);
            }
            _ => {
                let mut b = vec![0u8; len as usize];
                rng.fill(&mut b);
                d.write_at(off, &b).unwrap();
                shadow[off as usize..(off + len) as usize].copy_from_slice(&b);
            }
        }
    }
    d.flush().unwrap();
}

#[test]
fn images_written_here_pass_qemu_check_and_compare() {
    let dir = TempDir::new("write");
    for (i, opts) in [
        vec![],
        vec!["-o", "cluster_size=4096"],
        vec!["-o", "refcount_bits=1"],
        vec!["-o", "refcount_bits=8", "-o", "cluster_size=1024"],
        vec!["-o", "refcount_bits=64"],
        vec!["-o", "compat=0.10"],
    ]
    .into_iter()
    .enumerate()
    {
        let img = dir.path(&format!("w{i}.qcow2"));
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend_from_slice(&opts);
        args.extend_from_slice(&[s(&img), "6M"]);
        qemu_img(&args);
        let mut shadow = vec![0u8; 6 << 20];
        {
            let mut d = open_rw(&img);
            random_workload(d.as_mut(), &mut shadow, 100 + i as u64, 60);
            assert_eq!(read_all(d.as_mut()), shadow, "{opts:?}");
        }
        assert_qemu_clean(&img);
        let raw = dir.path("expect.raw");
        std::fs::write(&raw, &shadow).unwrap();
        qemu_img(&[
            "compare",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            s(&img),
            s(&raw),
        ]);
        let r = block::check(&img, None).unwrap();
        assert!(r.is_consistent(), "{opts:?}: {r:?}");
    }
}

#[test]
fn created_image_grows_past_refcount_blocks_and_table() {
    // 512-byte clusters: one refcount block covers 128 KiB and a one-cluster refcount
    // table 8 MiB, so writing 10 MiB grows both.
    let dir = TempDir::new("grow");
    let img = dir.path("g.qcow2");
    block::ops::create_with(
        &img,
        &block::CreateOptions {
            format: Format::Qcow2,
            size: Some(12 << 20),
            backing: None,
            cluster_size: Some(512),
        },
    )
    .unwrap();
    assert_qemu_clean(&img);
    let mut shadow = vec![0u8; 12 << 20];
    {
        let mut d = open_rw(&img);
        let mut rng = Rng::new(5);
        for chunk in 0..10u64 {
            let mut b = vec![0u8; 1 << 20];
            rng.fill(&mut b);
            d.write_at(chunk << 20, &b).unwrap();
            shadow[(chunk << 20) as usize..((chunk + 1) << 20) as usize].copy_from_slice(&b);
        }
        random_workload(d.as_mut(), &mut shadow, 9, 20);
    }
    assert_qemu_clean(&img);
    let raw = dir.path("expect.raw");
    std::fs::write(&raw, &shadow).unwrap();
    qemu_img(&[
        "compare",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        s(&img),
        s(&raw),
    ]);
    let mut d = block::open(&img, None, true).unwrap();
    assert_eq!(read_all(d.as_mut()), shadow);
}

#[test]
fn backing_chains_read_through_and_copy_on_write() {
    let dir = TempDir::new("chain");
    let base = dir.path("base.raw");
    let base_data = patterned_raw(&base, 4 << 20, 3);
    // qcow2 over raw, made by qemu; qcow2 over qcow2 made here.
    let mid = dir.path("mid.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&mid),
    ]);
    let top = dir.path("top.qcow2");
    block::create(&top, Format::Qcow2, None, Some(("mid.qcow2", None))).unwrap();
    assert_qemu_clean(&top);

    let mut expect_mid = base_data.clone();
    {
        let mut m = open_rw(&mid);
        assert_eq!(read_all(m.as_mut()), base_data);
        let mut rng = Rng::new(11);
        for _ in 0..20 {
            let off = rng.below(4 << 20);
            let len = (rng.below(100 << 10) + 1).min((4 << 20) - off);
            let mut b = vec![0u8; len as usize];
            rng.fill(&mut b);
            m.write_at(off, &b).unwrap();
            expect_mid[off as usize..(off + len) as usize].copy_from_slice(&b);
        }
    }
    assert_eq!(std::fs::read(&base).unwrap(), base_data, "base changed");
    assert_qemu_clean(&mid);
    assert_eq!(qemu_to_raw(&dir, &mid, "qcow2"), expect_mid);

    let mut expect_top = expect_mid.clone();
    {
        let mut t = open_rw(&top);
        assert_eq!(read_all(t.as_mut()), expect_mid);
        random_workload(t.as_mut(), &mut expect_top, 12, 40);
        assert_eq!(read_all(t.as_mut()), expect_top);
    }
    assert_eq!(std::fs::read(&base).unwrap(), base_data, "base changed");
    assert_eq!(qemu_to_raw(&dir, &mid, "qcow2"), expect_mid, "mid changed");
    assert_qemu_clean(&top);
    assert_eq!(qemu_to_raw(&dir, &top, "qcow2"), expect_top);
    let info = block::info(&top, None).unwrap();
    assert_eq!(info.backing_file.as_deref(), Some("mid.qcow2"));
    assert_eq!(info.backing_format.as_deref(), Some("qcow2"));
    let chain = block::ops::info_chain(&top, None).unwrap();
    let formats: Vec<_> = chain.iter().map(|i| i.format).collect();
    assert_eq!(formats, [Format::Qcow2, Format::Qcow2, Format::Raw]);
    assert_eq!(chain[2].filename, base);

    // Flattening the chain with a chosen cluster size.
    let flat = dir.path("flat.qcow2");
    let opts = block::CreateOptions {
        format: Format::Qcow2,
        size: None,
        backing: None,
        cluster_size: Some(4096),
    };
    block::ops::convert_with(&top, None, &flat, &opts, &mut |_, _| {}).unwrap();
    assert_eq!(block::info(&flat, None).unwrap().cluster_size, Some(4096));
    assert_qemu_clean(&flat);
    assert_eq!(qemu_to_raw(&dir, &flat, "qcow2"), expect_top);

    // A v2 overlay (no zero flag) over raw, written here.
    let v2 = dir.path("v2.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&v2),
    ]);
    let mut expect_v2 = base_data.clone();
    {
        let mut d = open_rw(&v2);
        random_workload(d.as_mut(), &mut expect_v2, 13, 30);
    }
    assert_qemu_clean(&v2);
    assert_eq!(qemu_to_raw(&dir, &v2, "qcow2"), expect_v2);
}

#[test]
fn convert_both_ways_matches_qemu() {
    let dir = TempDir::new("convert");
    let raw = dir.path("src.raw");
    let data = patterned_raw(&raw, (5 << 20) + 4096, 21);
    let q = dir.path("out.qcow2");
    let mut calls = 0;
    let mut last = (0, 0);
    block::convert(&raw, Some(Format::Raw), &q, Format::Qcow2, &mut |d, t| {
        calls += 1;
        last = (d, t);
    })
    .unwrap();
    assert!(calls > 1);
    assert_eq!(last, (data.len() as u64, data.len() as u64));
    assert_qemu_clean(&q);
    qemu_img(&["compare", "-q", "-f", "qcow2", "-F", "raw", s(&q), s(&raw)]);
    // Zero areas were skipped: fewer data clusters than the file has 64 KiB pieces.
    let r = block::check(&q, None).unwrap().qcow2.unwrap();
    assert!(r.allocated_clusters < r.total_clusters, "{r:?}");

    let back = dir.path("back.raw");
    block::convert(&q, None, &back, Format::Raw, &mut |_, _| {}).unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), data);

    // A compressed image made by qemu converts too.
    let c = dir.path("c.qcow2");
    qemu_img(&["convert", "-c", "-f", "raw", "-O", "qcow2", s(&raw), s(&c)]);
    let back2 = dir.path("back2.raw");
    block::convert(&c, None, &back2, Format::Raw, &mut |_, _| {}).unwrap();
    assert_eq!(std::fs::read(&back2).unwrap(), data);
}

#[test]
fn writes_over_compressed_clusters_reallocate() {
    let dir = TempDir::new("cw");
    let raw = dir.path("src.raw");
    let mut data = patterned_raw(&raw, 2 << 20, 31);
    let c = dir.path("c.qcow2");
    qemu_img(&["convert", "-c", "-f", "raw", "-O", "qcow2", s(&raw), s(&c)]);
    {
        let mut d = open_rw(&c);
        let mut rng = Rng::new(2);
        random_workload(d.as_mut(), &mut data, 4, 30);
        let mut b = vec![0u8; 3000];
        rng.fill(&mut b);
        d.write_at(70_000, &b).unwrap();
        data[70_000..73_000].copy_from_slice(&b);
    }
    assert_qemu_clean(&c);
    assert_eq!(qemu_to_raw(&dir, &c, "qcow2"), data);
}

#[test]
fn resize_grows_raw_and_qcow2() {
    let dir = TempDir::new("resize");
    let q = dir.path("r.qcow2");
    block::create(&q, Format::Qcow2, Some(1 << 20), None).unwrap();
    {
        let mut d = open_rw(&q);
        d.write_at(1000, b"hello").unwrap();
    }
    // Past what the first L1 table covers (512 MiB per L1 entry at 64 KiB clusters).
    block::resize(&q, None, 3 << 30).unwrap();
    assert_qemu_clean(&q);
    let out = qemu_img(&["info", "--output=json", s(&q)]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["virtual-size"], 3u64 << 30);
    {
        let mut d = open_rw(&q);
        d.write_at((3 << 30) - 5, b"world").unwrap();
        let mut b = [0u8; 5];
        d.read_at(1000, &mut b).unwrap();
        assert_eq!(&b, b"hello");
    }
    assert_qemu_clean(&q);
    assert!(matches!(
        block::resize(&q, None, 1 << 20),
        Err(block::ops::ResizeError::Shrink { .. })
    ));

    let r = dir.path("r.raw");
    block::create(&r, Format::Raw, Some(4096), None).unwrap();
    block::resize(&r, Some(Format::Raw), 8192).unwrap();
    assert_eq!(std::fs::metadata(&r).unwrap().len(), 8192);
}

#[test]
fn info_matches_qemu_img_info() {
    let dir = TempDir::new("info");
    let base = dir.path("b.raw");
    block::create(&base, Format::Raw, Some(1 << 20), None).unwrap();
    let q = dir.path("i.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "b.raw",
        "-F",
        "raw",
        s(&q),
        "2M",
    ]);
    let i = block::info(&q, None).unwrap();
    let out = qemu_img(&["info", "--output=json", s(&q)]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(i.format, Format::Qcow2);
    assert_eq!(v["virtual-size"], i.virtual_size);
    assert_eq!(v["cluster-size"], i.cluster_size.unwrap());
    assert_eq!(v["actual-size"], i.actual_size);
    assert_eq!(v["backing-filename"], i.backing_file.clone().unwrap());
    assert_eq!(v["backing-filename-format"], "raw");
    assert!(!i.dirty && !i.corrupt);
    let json = serde_json::to_value(&i).unwrap();
    assert_eq!(json["format"], "qcow2");
    let ri = block::info(&base, None).unwrap();
    assert_eq!((ri.format, ri.virtual_size), (Format::Raw, 1 << 20));
}

#[test]
fn check_agrees_with_qemu_on_leaks_and_corruption() {
    let dir = TempDir::new("check");
    let img = dir.path("c.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        s(&img),
        "1M",
    ]);
    qemu_io("qcow2", &img, &["write -P 1 0 16k"]);
    let refblock_off = 2 * 4096u64;
    // Leak: bump the refcount of an unused cluster (index 40) to 1.
    let mut bytes = std::fs::read(&img).unwrap();
    bytes.resize(64 * 4096, 0); // so that cluster 40 lies inside the file
    bytes[(refblock_off + 80) as usize..(refblock_off + 82) as usize].copy_from_slice(&[0, 1]);
    std::fs::write(&img, &bytes).unwrap();
    let r = block::check(&img, None).unwrap().qcow2.unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 1), "{r:?}");
    assert_eq!(qemu_check(&img).0, 3);
    // Corruption: drop the refcount of the L1 table's cluster (index 3) to 0.
    bytes[(refblock_off + 6) as usize..(refblock_off + 8) as usize].copy_from_slice(&[0, 0]);
    std::fs::write(&img, &bytes).unwrap();
    let r = block::check(&img, None).unwrap().qcow2.unwrap();
    assert!(r.corruptions > 0, "{r:?}");
    assert_eq!(qemu_check(&img).0, 2);
    let raw = dir.path("x.raw");
    block::create(&raw, Format::Raw, Some(4096), None).unwrap();
    assert!(block::check(&raw, None).unwrap().is_consistent());
}

#[test]
fn internal_snapshots_read_and_check_but_refuse_writes() {
    let dir = TempDir::new("snap");
    let img = dir.path("s.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "2M"]);
    qemu_io("qcow2", &img, &["write -P 1 0 256k"]);
    qemu_img(&["snapshot", "-c", "s1", s(&img)]);
    qemu_io("qcow2", &img, &["write -P 2 64k 64k", "write -P 3 1M 64k"]);
    let want = qemu_to_raw(&dir, &img, "qcow2");
    let mut d = block::open(&img, None, true).unwrap();
    assert_eq!(read_all(d.as_mut()), want);
    let r = block::check(&img, None).unwrap().qcow2.unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
    drop(d);
    let err = block::open(&img, None, false).unwrap_err();
    assert!(
        matches!(
            &err,
            block::OpenError::Qcow2 {
                source: block::Qcow2Error::HasSnapshots,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn reads_and_rewrites_zstd_compressed_images() {
    let dir = TempDir::new("zstd");
    let raw = dir.path("src.raw");
    let mut data = patterned_raw(&raw, 2 << 20, 41);
    for (i, opts) in [
        "compression_type=zstd",
        "compression_type=zstd,cluster_size=4096",
    ]
    .iter()
    .enumerate()
    {
        let z = dir.path(&format!("z{i}.qcow2"));
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
            s(&z),
        ]);
        let mut d = block::open(&z, None, true).unwrap();
        assert_eq!(read_all(d.as_mut()), data, "{opts}");
    }
    let z = dir.path("z0.qcow2");
    {
        let mut d = open_rw(&z);
        random_workload(d.as_mut(), &mut data, 42, 20);
    }
    assert_qemu_clean(&z);
    assert_eq!(qemu_to_raw(&dir, &z, "qcow2"), data);
}

#[test]
fn locks_interoperate_with_qemu() {
    use std::io::Write;
    use std::process::{Command, Stdio};

    let dir = TempDir::new("lock");
    let img = dir.path("l.qcow2");
    // Made by qemu-img: a handle of ours could linger in a process another test thread
    // is spawning, and qemu-io below does not retry a conflicting lock.
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "1M"]);
    // qemu-io keeps the image open read-write until its stdin closes.
    let mut qio = Command::new("qemu-io")
        .args(["-f", "qcow2", s(&img)])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut locked = false;
    for _ in 0..100 {
        if matches!(
            block::open(&img, None, true),
            Err(block::OpenError::Locked { .. })
        ) {
            locked = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        locked,
        "a read-only open should conflict with qemu-io writing the image"
    );
    let err = block::open(&img, None, false).unwrap_err();
    assert!(matches!(err, block::OpenError::Locked { .. }), "{err:?}");
    assert!(
        block::open_with(&img, None, true, true).is_ok(),
        "force-share reads anyway"
    );
    qio.stdin.take().unwrap().write_all(b"quit\n").unwrap();
    qio.wait().unwrap();

    // Now we hold it read-write: qemu-img refuses without -U.
    let d = open_rw(&img);
    let out = std::process::Command::new("qemu-img")
        .args(["info", s(&img)])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "qemu-img info should fail while we write the image"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("lock"));
    qemu_img(&["info", "-U", s(&img)]);
    drop(d);
    // Unlocked again (retrying over the same transient window as above).
    let free = (0..50).any(|_| {
        let ok = std::process::Command::new("qemu-img")
            .args(["info", s(&img)])
            .output()
            .unwrap()
            .status
            .success();
        if !ok {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        ok
    });
    assert!(
        free,
        "qemu-img still sees our lock after the image was closed"
    );
}

#[test]
fn writes_fill_preallocated_clusters_in_place() {
    let dir = TempDir::new("prealloc");
    let img = dir.path("p.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        s(&img),
        "4M",
    ]);
    let len_before = std::fs::metadata(&img).unwrap().len();
    let mut shadow = vec![0u8; 4 << 20];
    {
        let mut d = open_rw(&img);
        assert_eq!(read_all(d.as_mut()), shadow);
        let mut rng = Rng::new(8);
        for _ in 0..30 {
            let off = rng.below(4 << 20);
            let len = (rng.below(100 << 10) + 1).min((4 << 20) - off);
            let mut b = vec![0u8; len as usize];
            rng.fill(&mut b);
            d.write_at(off, &b).unwrap();
            shadow[off as usize..(off + len) as usize].copy_from_slice(&b);
        }
    }
    assert_eq!(
        std::fs::metadata(&img).unwrap().len(),
        len_before,
        "no new clusters"
    );
    assert_qemu_clean(&img);
    assert_eq!(qemu_to_raw(&dir, &img, "qcow2"), shadow);
}

#[test]
fn threads_on_the_shared_path_beside_discards_leave_their_data_and_a_clean_image() {
    // Four threads each write, zero and read back their own MiB of a qcow2 overlay
    // (4 KiB clusters over a raw backing file) through the disk's shared path, while two
    // more write into and discard a scratch MiB: the clusters those discards free are
    // allocated again for the other threads' data, so a write on the shared path that
    // outlived its cluster would show up in someone else's region.
    const MIB: u64 = 1 << 20;
    const OWNERS: u64 = 4;
    let dir = TempDir::new("shared");
    let base = dir.path("base.raw");
    let img = dir.path("top.qcow2");
    let mut model = patterned_raw(&base, (OWNERS as usize + 1) << 20, 11);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        s(&base),
        "-F",
        "raw",
        s(&img),
    ]);
    let disk = block::open_guest_disk(&img, Some(Format::Qcow2), false).unwrap();
    let io = disk.shared_io().expect("a qcow2 disk has a shared path");
    let disk = std::sync::Mutex::new(disk);
    let scratch = OWNERS * MIB;
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|sc| {
        let mut owners = Vec::new();
        for t in 0..OWNERS {
            let (io, disk) = (&io, &disk);
            let mut mine = model[(t * MIB) as usize..((t + 1) * MIB) as usize].to_vec();
            owners.push(sc.spawn(move || {
                let mut rng = Rng::new(100 + t);
                let start = t * MIB;
                for _ in 0..1500 {
                    let off = rng.below(MIB / 512 - 24) * 512;
                    let len = (rng.below(24) + 1) as usize * 512;
                    let at = start + off;
                    let r = off as usize..off as usize + len;
                    match rng.below(16) {
                        0 => {
                            disk.lock().unwrap().write_zeroes(at, len as u64).unwrap();
                            mine[r].fill(0);
                        }
                        1..=7 => {
                            let mut b = vec![0u8; len];
                            rng.fill(&mut b);
                            io.write_vectored_at(at, &[std::io::IoSlice::new(&b)])
                                .unwrap();
                            mine[r].copy_from_slice(&b);
                        }
                        _ => {
                            // Two buffers, split off the cluster grid.
                            let mut b = vec![0u8; len];
                            let (x, y) = b.split_at_mut(len / 3);
                            io.read_vectored_at(
                                at,
                                &mut [std::io::IoSliceMut::new(x), std::io::IoSliceMut::new(y)],
                            )
                            .unwrap();
                            assert!(b == mine[r], "thread {t}: bytes at {at:#x} changed");
                        }
                    }
                }
                mine
            }));
        }
        let stop = &stop;
        let (io2, disk2) = (&io, &disk);
        let writer = sc.spawn(move || {
            let mut rng = Rng::new(7);
            let b = vec![0x5a; 4096];
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let at = scratch + rng.below(MIB / 4096) * 4096;
                io2.write_vectored_at(at, &[std::io::IoSlice::new(&b)])
                    .unwrap();
                n += 1;
            }
            n
        });
        let discarder = sc.spawn(move || {
            let mut rng = Rng::new(8);
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let at = scratch + rng.below(MIB / 65536) * 65536;
                disk2.lock().unwrap().discard(at, 65536).unwrap();
                n += 1;
            }
            n
        });
        for (t, h) in owners.into_iter().enumerate() {
            let mine = h.join().unwrap();
            model[t << 20..(t + 1) << 20].copy_from_slice(&mine);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (w, d) = (writer.join().unwrap(), discarder.join().unwrap());
        assert!(
            w > 100 && d > 10,
            "the scratch threads ran ({w} writes, {d} discards)"
        );
    });
    let mut disk = disk.into_inner().unwrap();
    let got = read_all(disk.as_mut());
    for t in 0..OWNERS as usize {
        assert!(
            got[t << 20..(t + 1) << 20] == model[t << 20..(t + 1) << 20],
            "region {t} differs after the run"
        );
    }
    disk.flush().unwrap();
    drop((disk, io));
    assert_qemu_clean(&img);
    let qemu = qemu_to_raw(&dir, &img, "qcow2");
    assert!(
        qemu[..(OWNERS as usize) << 20] == model[..(OWNERS as usize) << 20],
        "qemu-img reads other data"
    );
}
