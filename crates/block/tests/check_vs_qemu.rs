//! `vessel img check` against `qemu-img check` on mutated images (issue 22): images
//! written by qemu-img/qemu-io (package qemu-utils), then one metadata field changed at a
//! time — reserved bits in L1/L2/refcount-table entries, offsets bent to point at other
//! metadata (overlaps), refcounts raised (leaks) and lowered (corruption), header fields —
//! and both checkers' verdicts compared: clean, leaks only, or corrupt. An image one of
//! them cannot open counts as corrupt. Leaks are then repaired here (`-r leaks`) and
//! qemu-img must find the result clean.

mod common;

use common::*;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Clean,
    Leaks,
    Corrupt,
}

fn qemu_verdict(img: &Path) -> (Verdict, String) {
    let (code, text) = qemu_check(img);
    let v = match code {
        0 => Verdict::Clean,
        3 => Verdict::Leaks,
        _ => Verdict::Corrupt,
    };
    (v, text)
}

fn our_verdict(img: &Path) -> (Verdict, String) {
    match block::check(img, Some(block::Format::Qcow2)) {
        Err(e) => (Verdict::Corrupt, format!("{e:#?}")),
        Ok(r) => {
            let q = r.qcow2.unwrap_or_default();
            let v = if q.corruptions > 0 {
                Verdict::Corrupt
            } else if q.leaks > 0 {
                Verdict::Leaks
            } else {
                Verdict::Clean
            };
            (v, q.messages.join("\n"))
        }
    }
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// Where an image's metadata lies.
struct Layout {
    cs: u64,
    l1: u64,
    l1_size: u64,
    rt: u64,
    rt_clusters: u64,
    l2s: Vec<u64>,
    refblocks: Vec<u64>,
    refcount_bits: u32,
}

const OFFSET: u64 = 0x00ff_ffff_ffff_fe00;

fn layout(b: &[u8]) -> Layout {
    let cs = 1u64 << be32(b, 20);
    let l1_size = u64::from(be32(b, 36));
    let l1 = be64(b, 40);
    let rt = be64(b, 48);
    let rt_clusters = u64::from(be32(b, 56));
    let refcount_bits = if be32(b, 4) >= 3 {
        1 << be32(b, 96)
    } else {
        16
    };
    let l2s = (0..l1_size)
        .map(|i| be64(b, (l1 + i * 8) as usize) & OFFSET)
        .filter(|&o| o != 0)
        .collect();
    let refblocks = (0..rt_clusters * cs / 8)
        .map(|i| be64(b, (rt + i * 8) as usize) & OFFSET)
        .filter(|&o| o != 0)
        .collect();
    Layout {
        cs,
        l1,
        l1_size,
        rt,
        rt_clusters,
        l2s,
        refblocks,
        refcount_bits,
    }
}

/// One mutation of `b`, chosen by `rng`; its description.
fn mutate(b: &mut [u8], rng: &mut Rng) -> String {
    let l = layout(b);
    let metadata: Vec<u64> = [0, l.l1, l.rt]
        .into_iter()
        .chain(l.l2s.iter().copied())
        .chain(l.refblocks.iter().copied())
        .collect();
    let pick = |rng: &mut Rng, v: &[u64]| v[rng.below(v.len() as u64) as usize];
    let put = |b: &mut [u8], at: u64, v: u64| {
        b[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes())
    };
    match rng.below(5) {
        // An L1 entry.
        0 => {
            let i = rng.below(l.l1_size.max(1));
            let at = l.l1 + i * 8;
            let e = be64(b, at as usize);
            let (v, what) = match rng.below(5) {
                0 => {
                    let bits = [1u64, 2, 5, 8, 56, 60, 62];
                    let bit = bits[rng.below(bits.len() as u64) as usize];
                    (e | 1 << bit, format!("reserved bit {bit}"))
                }
                1 => {
                    let bit = 9 + rng.below(20);
                    (e ^ 1 << bit, format!("offset bit {bit} flipped"))
                }
                2 => {
                    let m = pick(rng, &metadata);
                    ((e & !OFFSET) | m, format!("pointed at metadata {m:#x}"))
                }
                3 => (e ^ 1 << 63, "COPIED toggled".into()),
                _ => (0, "cleared".into()),
            };
            put(b, at, v);
            format!("L1[{i}] {e:#x} -> {v:#x}: {what}")
        }
        // An L2 entry.
        1 if !l.l2s.is_empty() => {
            let l2 = pick(rng, &l.l2s);
            // Mostly entries in use.
            let used: Vec<u64> = (0..l.cs / 8)
                .filter(|i| be64(b, (l2 + i * 8) as usize) != 0)
                .collect();
            let i = if !used.is_empty() && rng.below(4) != 0 {
                pick(rng, &used)
            } else {
                rng.below(l.cs / 8)
            };
            let at = l2 + i * 8;
            let e = be64(b, at as usize);
            let data: Vec<u64> = used
                .iter()
                .map(|j| be64(b, (l2 + j * 8) as usize) & OFFSET)
                .filter(|&o| o != 0)
                .collect();
            let (v, what) = match rng.below(7) {
                0 => {
                    let bits = [1u64, 3, 8, 56, 59, 61];
                    let bit = bits[rng.below(bits.len() as u64) as usize];
                    (e | 1 << bit, format!("reserved bit {bit}"))
                }
                1 => {
                    let bit = 9 + rng.below(20);
                    (e ^ 1 << bit, format!("offset bit {bit} flipped"))
                }
                2 => {
                    let m = pick(rng, &metadata);
                    (
                        (e & !OFFSET) | m | 1 << 63,
                        format!("pointed at metadata {m:#x}"),
                    )
                }
                3 if !data.is_empty() => {
                    let d = pick(rng, &data);
                    (
                        (e & !OFFSET) | d | 1 << 63,
                        format!("pointed at data {d:#x}"),
                    )
                }
                4 => (e ^ 1 << 63, "COPIED toggled".into()),
                5 => (e | 1, "zero flag".into()),
                _ => (0, "cleared".into()),
            };
            put(b, at, v);
            format!("L2 {l2:#x}[{i}] {e:#x} -> {v:#x}: {what}")
        }
        // A refcount table entry.
        2 => {
            let n = (l.rt_clusters * l.cs / 8).max(1);
            let i = rng.below(n.min(l.refblocks.len() as u64 + 1));
            let at = l.rt + i * 8;
            let e = be64(b, at as usize);
            let (v, what) = match rng.below(4) {
                0 => {
                    let bit = 1 + rng.below(8);
                    (e | 1 << bit, format!("reserved bit {bit}"))
                }
                1 => {
                    let bit = 9 + rng.below(20);
                    (e ^ 1 << bit, format!("offset bit {bit} flipped"))
                }
                2 => {
                    let m = pick(rng, &metadata);
                    (m, format!("pointed at metadata {m:#x}"))
                }
                _ => (0, "cleared".into()),
            };
            put(b, at, v);
            format!("refcount table[{i}] {e:#x} -> {v:#x}: {what}")
        }
        // A refcount (16-bit refcounts only).
        3 if l.refcount_bits == 16 && !l.refblocks.is_empty() => {
            let rb = pick(rng, &l.refblocks);
            let used_clusters = (b.len() as u64).div_ceil(l.cs);
            let i = rng.below(used_clusters.min(l.cs / 2) + 2);
            let at = (rb + i * 2) as usize;
            let e = u16::from_be_bytes([b[at], b[at + 1]]);
            let v = match rng.below(4) {
                0 => e.wrapping_add(1),
                1 => e.saturating_sub(1),
                2 => 0,
                _ => rng.below(4) as u16,
            };
            b[at..at + 2].copy_from_slice(&v.to_be_bytes());
            format!("refcount of cluster {i} {e} -> {v}")
        }
        // A header field.
        _ => {
            let fields: &[(usize, usize, &str)] = &[
                (24, 8, "size"),
                (36, 4, "l1_size"),
                (40, 8, "l1_table_offset"),
                (48, 8, "refcount_table_offset"),
                (56, 4, "refcount_table_clusters"),
                (60, 4, "nb_snapshots"),
                (64, 8, "snapshots_offset"),
            ];
            let (at, len, name) = fields[rng.below(fields.len() as u64) as usize];
            let bit = rng.below(len as u64 * 8);
            let byte = at + len - 1 - (bit / 8) as usize;
            b[byte] ^= 1 << (bit % 8);
            format!("header {name}: bit {bit} flipped")
        }
    }
}

fn base_images(dir: &TempDir) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    // 4 KiB clusters, data in several L2 tables.
    let a = dir.path("a.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        s(&a),
        "8M",
    ]);
    qemu_io(
        "qcow2",
        &a,
        &[
            "write -P 1 0 40k",
            "write -P 2 3M 12k",
            "write -P 3 7M 8k",
            "write -z 7200k 4k",
        ],
    );
    out.push(a);
    // An internal snapshot: shared clusters with refcount 2.
    let b = dir.path("b.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        s(&b),
        "4M",
    ]);
    qemu_io("qcow2", &b, &["write -P 4 0 32k"]);
    qemu_img(&["snapshot", "-c", "s1", s(&b)]);
    qemu_io("qcow2", &b, &["write -P 5 8k 8k", "write -P 6 2M 8k"]);
    out.push(b);
    // Compressed clusters.
    let raw = dir.path("c.raw");
    patterned_raw(&raw, 256 << 10, 3);
    let c = dir.path("c.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        s(&raw),
        s(&c),
    ]);
    out.push(c);
    // The default 64 KiB clusters.
    let d = dir.path("d.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&d), "16M"]);
    qemu_io("qcow2", &d, &["write -P 7 0 200k", "write -P 8 9M 64k"]);
    out.push(d);
    out
}

#[test]
fn check_finds_what_qemu_img_check_finds_on_mutated_images() {
    let dir = TempDir::new("mutants");
    let bases = base_images(&dir);
    let per_image: u64 = std::env::var("VESSEL_CHECK_MUTANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    let seed = std::env::var("VESSEL_CHECK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_c4ec);
    let mut rng = Rng::new(seed);
    let mut mismatches = Vec::new();
    let mut seen = std::collections::BTreeMap::new();
    let mut repaired = 0;
    for base in &bases {
        assert_eq!(qemu_verdict(base).0, Verdict::Clean);
        assert_eq!(
            our_verdict(base).0,
            Verdict::Clean,
            "{}",
            our_verdict(base).1
        );
        let bytes = std::fs::read(base).unwrap();
        for n in 0..per_image {
            let mut b = bytes.clone();
            let what = mutate(&mut b, &mut rng);
            let img = dir.path("m.qcow2");
            std::fs::write(&img, &b).unwrap();
            let (theirs, their_text) = qemu_verdict(&img);
            let (ours, our_text) = our_verdict(&img);
            *seen.entry(format!("{theirs:?}")).or_insert(0u32) += 1;
            if theirs != ours {
                mismatches.push(format!(
                    "{} #{n}: {what}: qemu-img {theirs:?}, vessel {ours:?}\n  qemu-img: {}\n  \
                     vessel: {}",
                    base.file_name().unwrap().to_string_lossy(),
                    their_text.trim().replace('\n', "\n    "),
                    our_text.trim().replace('\n', "\n    ")
                ));
                continue;
            }
            if theirs == Verdict::Leaks {
                // Both repairs, each on its own copy, leave images qemu-img judges alike
                // (repairing leaks can uncover COPIED flags that were right only while
                // the leaked references counted).
                let copy = dir.path("q.qcow2");
                std::fs::write(&copy, &b).unwrap();
                let o = std::process::Command::new("qemu-img")
                    .args(["check", "-q", "-r", "leaks", "-f", "qcow2"])
                    .arg(&copy)
                    .output()
                    .unwrap();
                let _ = o;
                let r = block::ops::check_with(&img, Some(block::Format::Qcow2), true).unwrap();
                let q = r.qcow2.unwrap();
                assert!(q.leaks_fixed > 0, "{what}: {q:?}");
                let (after, text) = qemu_verdict(&img);
                let (want, want_text) = qemu_verdict(&copy);
                assert_eq!(
                    after, want,
                    "{what}: after -r leaks: vessel's repair: {text}\nqemu-img's: {want_text}"
                );
                assert_eq!(our_verdict(&img).0, want, "{what}");
                repaired += 1;
            }
        }
    }
    eprintln!("qemu-img verdicts: {seen:?}; leaks repaired: {repaired}");
    assert!(
        mismatches.is_empty(),
        "{} of {} mutants judged differently:\n{}",
        mismatches.len(),
        per_image * bases.len() as u64,
        mismatches.join("\n")
    );
    // The sample covers every verdict.
    assert!(seen.len() == 3, "{seen:?}");
    assert!(repaired > 0);
}
