//! Disks given to the VMM are never probed (issue 22): a qcow2 header a guest wrote onto
//! its raw disk, naming a host file, never makes the VMM open that file.

use std::path::{Path, PathBuf};

use vmm::config::{DiskConfig, DiskFormat};

const SECRET: &[u8] = b"root-only secret: the guest must never read this";
const DISK: u64 = 4 << 20;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("vmm-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A raw disk onto which the "guest" wrote a qcow2 image backed by `secret`.
fn poisoned_disk(dir: &Path, secret: &Path) -> PathBuf {
    let evil = dir.join("evil.qcow2");
    let name = secret.to_str().unwrap();
    block::create(
        &evil,
        block::Format::Qcow2,
        Some(DISK),
        Some((name, Some(block::Format::Raw))),
    )
    .unwrap();
    let header = std::fs::read(&evil).unwrap();
    let disk = dir.join("disk.raw");
    block::create(&disk, block::Format::Raw, Some(DISK), None).unwrap();
    let mut d = block::open(&disk, Some(block::Format::Raw), false).unwrap();
    d.write_at(0, &header).unwrap();
    d.flush().unwrap();
    disk
}

fn first_bytes(d: &mut dyn block::BlockBackend) -> Vec<u8> {
    let mut b = vec![0u8; SECRET.len()];
    d.read_at(0, &mut b).unwrap();
    b
}

#[test]
fn cli_disk_without_format_is_never_probed() {
    let dir = TempDir::new("diskfmt-cli");
    let secret = dir.0.join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let disk = poisoned_disk(&dir.0, &secret);
    // The attack is real: a probing open reads the secret.
    let mut probed = block::open(&disk, None, true).unwrap();
    assert_eq!(first_bytes(&mut *probed), SECRET);
    drop(probed);

    // `--disk PATH`: no format given, the file looks like qcow2 → refused with a reason.
    let d: DiskConfig = disk.to_str().unwrap().parse().unwrap();
    assert_eq!(d.format, None);
    let e = d.open().unwrap_err();
    assert!(matches!(e, block::OpenError::FormatNotGiven { .. }), "{e}");
    assert!(e.to_string().contains("format=raw"), "{e}");

    // `--disk PATH,format=raw`: the guest sees its own bytes.
    let d: DiskConfig = format!("{},format=raw", disk.display()).parse().unwrap();
    assert_eq!(d.format, Some(DiskFormat::Raw));
    let mut b = d.open().unwrap();
    assert_eq!(b.size(), DISK);
    let got = first_bytes(&mut *b);
    assert_ne!(got, SECRET);
    assert_eq!(&got[..4], b"QFI\xfb");
}

#[test]
fn config_json_disk_without_format_is_never_probed() {
    // What the manager and the Firecracker-style API hand the VMM: JSON disk configs.
    let dir = TempDir::new("diskfmt-json");
    let secret = dir.0.join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let disk = poisoned_disk(&dir.0, &secret);
    let j = serde_json::json!({ "path": disk });
    let d: DiskConfig = serde_json::from_value(j).unwrap();
    assert!(matches!(
        d.open(),
        Err(block::OpenError::FormatNotGiven { .. })
    ));
    let j = serde_json::json!({ "path": disk, "format": "raw", "read_only": true });
    let d: DiskConfig = serde_json::from_value(j).unwrap();
    assert_ne!(first_bytes(&mut *d.open().unwrap()), SECRET);
}
