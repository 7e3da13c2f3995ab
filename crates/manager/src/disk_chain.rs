//! Issue 22: the backing chains of file disks outside the pools, fixed at define.
//!
//! A disk in a pool's folder is confined to that folder at each start (`confine_disks`).
//! A file disk elsewhere is named by a client whose right to it is checked at define only,
//! but opened at every start with the daemon's rights: a qcow2 header rewritten after
//! define (naming a root-only host file as backing), or a link swapped in for an image,
//! would be followed. So define records each such disk's chain, every file with its
//! format and the file its name resolved to, and each start refuses a chain that differs.
//! Formats come from the definition or the image naming a backing file, never from
//! content: a raw image is never read here, so what a guest writes on it changes nothing.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmm::config::{DiskConfig, DiskFormat};

use crate::error::{Error, Result};

/// One file of a recorded chain (the disk's image first).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainFile {
    /// As the definition (the image) or the image naming it (a backing file) names it.
    pub path: PathBuf,
    /// Where that name led at define, links followed: a link swapped in later shows.
    pub real: PathBuf,
    pub format: DiskFormat,
}

/// A disk's chain as the VMM would open it now, or why it could not be opened.
pub fn read(disk: &DiskConfig) -> Result<Vec<ChainFile>> {
    let format = disk.format.map(|f| match f {
        DiskFormat::Raw => block::Format::Raw,
        DiskFormat::Qcow2 => block::Format::Qcow2,
    });
    let refused = |e: &dyn std::error::Error| {
        Error::invalid(
            "disk",
            format!("{}: {}", disk.path.display(), crate::storage::chain(e)),
        )
    };
    block::guest_disk_chain(&disk.path, format)
        .map_err(|e| refused(&e))?
        .into_iter()
        .map(|(path, f)| {
            let real = path
                .canonicalize()
                .map_err(|e| refused(&e as &dyn std::error::Error))?;
            let format = match f {
                block::Format::Raw => DiskFormat::Raw,
                block::Format::Qcow2 => DiskFormat::Qcow2,
            };
            Ok(ChainFile { path, real, format })
        })
        .collect()
}

/// The record define keeps for a disk: None for one whose file does not exist yet (only a
/// trusted client can define that: see `Api::check_domain_files`; such a disk is started
/// only as raw).
pub fn record(disk: &DiskConfig) -> Result<Option<Vec<ChainFile>>> {
    if std::fs::symlink_metadata(&disk.path).is_err() {
        return Ok(None);
    }
    read(disk).map(Some)
}

/// Refuses a start whose chain for `disk` is not `recorded` (None: nothing was recorded,
/// so only a raw disk, which names no backing file, may start).
pub fn check(disk: &DiskConfig, recorded: Option<&[ChainFile]>) -> Result<()> {
    let Some(recorded) = recorded else {
        if disk.format == Some(DiskFormat::Qcow2) {
            return Err(Error::invalid(
                "disk",
                format!(
                    "{}: no backing chain was recorded for this qcow2 disk when the domain \
                     was defined (its file did not exist then, or the definition is older): \
                     define the domain again",
                    disk.path.display()
                ),
            ));
        }
        return Ok(());
    };
    let now = read(disk)?;
    if now == recorded {
        return Ok(());
    }
    Err(Error::invalid(
        "disk",
        format!(
            "{}: its chain is now {}, not {} as recorded when the domain was defined: a \
             file disk's format and backing files are fixed at define (define the domain \
             again to take the new chain)",
            disk.path.display(),
            describe(&now),
            describe(recorded)
        ),
    ))
}

fn describe(chain: &[ChainFile]) -> String {
    let one = |c: &ChainFile| {
        let fmt = match c.format {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        };
        if c.real == c.path {
            format!("{} ({fmt})", c.path.display())
        } else {
            format!("{} -> {} ({fmt})", c.path.display(), c.real.display())
        }
    };
    chain.iter().map(one).collect::<Vec<_>>().join(" <- ")
}

/// Records the chain of each of a definition's disks, replacing whatever it gave.
pub fn record_all(def: &mut crate::domain::DomainDef) -> Result<()> {
    def.chains.clear();
    for d in &def.vm.disks {
        if let Some(c) = record(d)? {
            def.chains.insert(key(&d.path), c);
        }
    }
    Ok(())
}

/// The key of a disk's record: its path as the definition gives it.
pub fn key(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(path: &Path, format: Option<DiskFormat>) -> DiskConfig {
        serde_json::from_value(serde_json::json!({"path": path, "format": format})).unwrap()
    }

    #[test]
    fn a_rewritten_backing_name_or_a_swapped_link_fails_the_check() {
        let dir = std::env::temp_dir().join(format!("vessel-chain-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (base, other, top) = (dir.join("base"), dir.join("other"), dir.join("top"));
        std::fs::write(&base, vec![0u8; 4096]).unwrap();
        std::fs::write(&other, b"another file").unwrap();
        let backed = |name: &Path| {
            let _ = std::fs::remove_file(&top);
            block::create(
                &top,
                block::Format::Qcow2,
                Some(1 << 20),
                Some((name.to_str().unwrap(), Some(block::Format::Raw))),
            )
            .unwrap();
        };
        backed(&base);
        let d = disk(&top, Some(DiskFormat::Qcow2));
        let rec = record(&d).unwrap().unwrap();
        assert_eq!(rec.len(), 2, "{rec:?}");
        assert_eq!(rec[1].path, base);
        check(&d, Some(&rec)).unwrap();
        backed(&other);
        let e = check(&d, Some(&rec)).unwrap_err().to_string();
        assert!(e.contains("fixed at define") && e.contains("other"), "{e}");
        // No record: a qcow2 disk is refused, a raw one is not read.
        assert!(check(&d, None).is_err());
        check(&disk(&top, Some(DiskFormat::Raw)), None).unwrap();

        // A raw image's content is never read: a qcow2 header on it is no chain.
        let raw = disk(&base, Some(DiskFormat::Raw));
        let rec = record(&raw).unwrap().unwrap();
        std::fs::copy(&top, &base).unwrap();
        check(&raw, Some(&rec)).unwrap();
        // A link put in the image's place: refused.
        std::fs::remove_file(&base).unwrap();
        std::os::unix::fs::symlink(&other, &base).unwrap();
        let e = check(&raw, Some(&rec)).unwrap_err().to_string();
        assert!(e.contains("->"), "{e}");
        assert_eq!(record(&disk(&dir.join("absent"), None)).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
