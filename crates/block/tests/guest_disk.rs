//! Formats are never guessed for guest disks (issue 22): a guest that writes a qcow2 header
//! naming a host file onto its raw disk must never read that file.

mod common;

use std::path::Path;

use block::{Format, OpenError};
use common::*;

const SECRET: &[u8] = b"root-only secret: the guest must never read this";
const DISK: u64 = 4 << 20;

/// The bytes a hostile guest writes at the start of its raw disk: a whole qcow2 image
/// whose backing file is `secret`. Without `with_format` the backing-format extension is
/// renamed to an unknown one, so the image names its backing file but not its format.
fn guest_written_qcow2(dir: &TempDir, secret: &Path, with_format: bool) -> Vec<u8> {
    let evil = dir.path("evil.qcow2");
    let name = secret.to_str().unwrap();
    block::create(
        &evil,
        Format::Qcow2,
        Some(DISK),
        Some((name, Some(Format::Raw))),
    )
    .unwrap();
    let mut bytes = std::fs::read(&evil).unwrap();
    std::fs::remove_file(&evil).unwrap();
    if !with_format {
        // Backing-format extension magic 0xe2792aca → an unknown extension type.
        let magic = 0xe279_2acau32.to_be_bytes();
        let at = bytes.windows(4).position(|w| w == magic).unwrap();
        bytes[at..at + 4].copy_from_slice(&0x0bad_0badu32.to_be_bytes());
    }
    bytes
}

/// A raw disk the guest has written `header` onto, through the raw backend as the
/// guest's virtio-blk writes would go.
fn poisoned_raw_disk(dir: &TempDir, name: &str, header: &[u8]) -> std::path::PathBuf {
    let p = dir.path(name);
    block::create(&p, Format::Raw, Some(DISK), None).unwrap();
    let mut d = block::open_guest_disk(&p, Some(Format::Raw), false).unwrap();
    d.write_at(0, header).unwrap();
    d.flush().unwrap();
    p
}

fn first_bytes(d: &mut dyn block::BlockBackend) -> Vec<u8> {
    let mut b = vec![0u8; SECRET.len()];
    d.read_at(0, &mut b).unwrap();
    b
}

#[test]
fn guest_written_qcow2_header_never_reaches_the_named_file() {
    let dir = TempDir::new("guestdisk");
    let secret = dir.path("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let header = guest_written_qcow2(&dir, &secret, true);
    let disk = poisoned_raw_disk(&dir, "disk.raw", &header);

    // The attack is real: probing (what guest paths used to do) follows the header.
    let mut probed = block::open(&disk, None, true).unwrap();
    assert_eq!(
        first_bytes(&mut *probed),
        SECRET,
        "probing reads the backing file"
    );
    drop(probed);

    // Given as raw: the guest sees the bytes it wrote, nothing else.
    let mut raw = block::open_guest_disk(&disk, Some(Format::Raw), false).unwrap();
    assert_eq!(raw.size(), DISK);
    assert_eq!(first_bytes(&mut *raw), &header[..SECRET.len()]);
    drop(raw);
    let mut shared = block::open_guest_disk_with(&disk, Some(Format::Raw), true, true).unwrap();
    assert_ne!(first_bytes(&mut *shared), SECRET);
    drop(shared);

    // No format given: refused, neither probed as qcow2 nor shown as raw.
    assert!(matches!(
        block::open_guest_disk(&disk, None, false),
        Err(OpenError::FormatNotGiven { .. })
    ));
    assert!(matches!(
        block::open_guest_disk(&disk, None, true),
        Err(OpenError::FormatNotGiven { .. })
    ));
}

#[test]
fn guest_disk_without_format_is_raw_when_it_has_no_qcow2_header() {
    let dir = TempDir::new("guestdisk-raw");
    let disk = poisoned_raw_disk(&dir, "plain.raw", b"QFI\x00not quite");
    let mut d = block::open_guest_disk(&disk, None, false).unwrap();
    assert_eq!(d.size(), DISK);
    assert_eq!(&first_bytes(&mut *d)[..4], b"QFI\x00");
}

#[test]
fn guest_disk_backing_file_without_recorded_format_is_refused() {
    let dir = TempDir::new("guestdisk-bfmt");
    let secret = dir.path("secret");
    std::fs::write(&secret, SECRET).unwrap();
    // A qcow2 file (say, a volume an admin copied in) whose backing format is missing:
    // its backing file would be probed, and the backing file may be another guest's raw
    // disk. Guest opens refuse it; the image tools still probe.
    let img = dir.path("top.qcow2");
    std::fs::write(&img, guest_written_qcow2(&dir, &secret, false)).unwrap();
    let mut tool = block::open(&img, Some(Format::Qcow2), true).unwrap();
    assert_eq!(
        first_bytes(&mut *tool),
        SECRET,
        "the tools' open follows it"
    );
    drop(tool);
    match block::open_guest_disk(&img, Some(Format::Qcow2), true) {
        Err(OpenError::BackingFormatMissing { backing, .. }) => {
            assert_eq!(backing, secret.to_str().unwrap())
        }
        other => panic!("expected BackingFormatMissing, got {other:?}"),
    }
}

#[test]
fn guest_disk_qcow2_with_recorded_backing_format_opens() {
    let dir = TempDir::new("guestdisk-chain");
    let base = dir.path("base.raw");
    std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
    let top = dir.path("top.qcow2");
    block::create(
        &top,
        Format::Qcow2,
        None,
        Some(("base.raw", Some(Format::Raw))),
    )
    .unwrap();
    let mut d = block::open_guest_disk(&top, Some(Format::Qcow2), false).unwrap();
    let mut b = [0u8; 4];
    d.read_at(0, &mut b).unwrap();
    assert_eq!(b, [7; 4]);
}

#[test]
fn a_guest_disks_files_are_its_chain_and_never_a_raw_disks_contents() {
    let dir = TempDir::new("chain-files");
    let base = dir.path("base.raw");
    block::create(&base, Format::Raw, Some(DISK), None).unwrap();
    let mid = dir.path("mid.qcow2");
    block::create(
        &mid,
        Format::Qcow2,
        None,
        Some(("base.raw", Some(Format::Raw))),
    )
    .unwrap();
    let top = dir.path("top.qcow2");
    block::create(
        &top,
        Format::Qcow2,
        None,
        Some(("mid.qcow2", Some(Format::Qcow2))),
    )
    .unwrap();
    assert_eq!(
        block::guest_disk_files(&top, Some(Format::Qcow2)),
        vec![top.clone(), mid.clone(), base.clone()]
    );
    // A raw disk holding a qcow2 header (as a guest writes it): just the disk.
    let secret = dir.path("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let raw = dir.path("guest.raw");
    std::fs::write(&raw, guest_written_qcow2(&dir, &secret, true)).unwrap();
    for f in [Some(Format::Raw), None] {
        assert_eq!(block::guest_disk_files(&raw, f), vec![raw.clone()]);
    }
}
