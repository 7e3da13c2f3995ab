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
use vmm::file_identity::FileId;

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
    /// Which file that was (device, inode, birth time): a file renamed away and another
    /// put under the same name shows, though the path is the same. Not its size or
    /// times: the guest writes the image, and a commit its backing files. None in
    /// records older than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<FileId>,
}

/// A disk's chain opened now as the VMM will get it (beneath `folder` for a pool's disk),
/// each file with its record: the name, where the open file is (from the descriptor, not
/// the name again), its format.
fn open(
    disk: &DiskConfig,
    folder: Option<&block::Folder>,
    read_only: bool,
) -> Result<(Vec<block::ChainFile>, Vec<ChainFile>)> {
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
    let files = match folder {
        Some(folder) => block::open_guest_disk_chain_in(folder, &disk.path, format, read_only),
        None => block::open_guest_disk_chain(&disk.path, format, read_only),
    }
    .map_err(|e| refused(&e))?;
    let records = files
        .iter()
        .map(|c| {
            use std::os::fd::AsRawFd;
            let fd = format!("/proc/self/fd/{}", c.file.as_raw_fd());
            let real = std::fs::read_link(fd).map_err(|e| refused(&e))?;
            let id = FileId::of(&c.file.metadata().map_err(|e| refused(&e))?, false);
            let format = match c.format {
                block::Format::Raw => DiskFormat::Raw,
                block::Format::Qcow2 => DiskFormat::Qcow2,
            };
            Ok(ChainFile {
                path: c.path.clone(),
                real,
                format,
                id: Some(id),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((files, records))
}

/// A disk's chain as the VMM would open it now, or why it could not be opened.
pub fn read(disk: &DiskConfig) -> Result<Vec<ChainFile>> {
    open(disk, None, true).map(|(_, r)| r)
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
    open_checked(disk, None, recorded).map(drop)
}

/// Opens `disk`'s chain (beneath `folder` for a pool's disk), compares it with `recorded`,
/// and returns the files it opened: the caller hands these to the VMM
/// ([`hand_over`]), so the files checked are the files the guest gets, whatever is
/// renamed or rewritten afterwards. Compared on where each file is and its format (its
/// name may be spelled otherwise), and on which file it is (a file renamed away and
/// another put in its place is not the recorded one). None recorded: a pool's disk keeps its folder's
/// confinement alone (a definition older than chain records); any other disk may start
/// only as raw.
pub fn open_checked(
    disk: &DiskConfig,
    folder: Option<&block::Folder>,
    recorded: Option<&[ChainFile]>,
) -> Result<Vec<block::ChainFile>> {
    if recorded.is_none() && folder.is_none() && disk.format == Some(DiskFormat::Qcow2) {
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
    let (files, now) = open(disk, folder, disk.read_only)?;
    let Some(recorded) = recorded else {
        return Ok(files);
    };
    let same_place =
        |now: &ChainFile, rec: &ChainFile| now.real == rec.real && now.format == rec.format;
    if now.len() == recorded.len() && now.iter().zip(recorded).all(|(a, b)| same_place(a, b)) {
        // The same places: the same files too (not others renamed in under those names).
        let swapped = now
            .iter()
            .zip(recorded)
            .find_map(|(n, r)| match (&r.id, &n.id) {
                (Some(rid), Some(nid)) if !rid.matches(nid) => Some((n, rid.difference(nid))),
                _ => None,
            });
        let Some((file, why)) = swapped else {
            return Ok(files);
        };
        return Err(Error::invalid(
            "disk",
            format!(
                "{}: {} is not the file recorded when the domain was defined ({why}): \
                 a disk's files are fixed at define (define the domain again to take \
                 the new file)",
                disk.path.display(),
                file.real.display(),
            ),
        ));
    }
    Err(Error::invalid(
        "disk",
        format!(
            "{}: its chain is now {}, not {} as recorded when the domain was defined: a \
             disk's format and backing files are fixed at define (define the domain \
             again to take the new chain)",
            disk.path.display(),
            describe(&now),
            describe(recorded)
        ),
    ))
}

/// Names `files` (opened by [`open_checked`] for `disk`) in `disk` as descriptors its VMM
/// inherits ([`vmm::config::DiskConfig::fds`]); the caller keeps them open until the VMM
/// has started, and lets it inherit them ([`crate::driver::inherit_fds`]).
pub fn hand_over(disk: &mut DiskConfig, files: &[block::ChainFile]) {
    use std::os::fd::AsRawFd;
    disk.fds = files
        .iter()
        .map(|c| vmm::config::InheritedFile {
            fd: c.file.as_raw_fd(),
            format: match c.format {
                block::Format::Raw => DiskFormat::Raw,
                block::Format::Qcow2 => DiskFormat::Qcow2,
            },
            path: c.path.clone(),
        })
        .collect();
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
    if let Some(d) = def.vm.disks.iter().find(|d| !d.fds.is_empty()) {
        return Err(Error::invalid(
            "disk",
            format!(
                "{}: \"fds\" is for the manager to set when it starts a VMM, not for a \
                 definition",
                d.path.display()
            ),
        ));
    }
    for d in &def.vm.disks {
        if let Some(c) = record(d)? {
            def.chains.insert(key(&d.path), c);
        }
    }
    Ok(())
}

/// Tests only (debug builds): the program `VESSEL_TEST_AFTER_DISK_CHECK` names, run with
/// the domain's name and waited for between opening a start's disks and starting its
/// VMM, so a test swaps files in exactly that window (issue 22's check-then-open race,
/// made deterministic).
pub fn after_check_hook(domain: &str) {
    if !cfg!(debug_assertions) {
        return;
    }
    if let Some(p) = std::env::var_os("VESSEL_TEST_AFTER_DISK_CHECK") {
        let r = std::process::Command::new(&p).arg(domain).status();
        tracing::warn!(domain, hook = ?p, status = ?r, "test hook ran after the disk check");
    }
}

/// Tests only (debug builds): the program `VESSEL_TEST_AFTER_CLIENT_CHECK` names, run
/// with the domain's name between the API's check of a definition's file names against
/// the client and define's records of them (the same race at define, made
/// deterministic).
pub fn after_client_check_hook(domain: &str) {
    if !cfg!(debug_assertions) {
        return;
    }
    if let Some(p) = std::env::var_os("VESSEL_TEST_AFTER_CLIENT_CHECK") {
        let r = std::process::Command::new(&p).arg(domain).status();
        tracing::warn!(domain, hook = ?p, status = ?r, "test hook ran after the client check");
    }
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

    /// Issue 22: what the start's check opened is what the VMM gets, a swap after the
    /// check notwithstanding; a pool's chain is compared with its record too; a
    /// definition cannot name descriptors.
    #[test]
    fn the_files_the_check_opened_are_the_ones_handed_over() {
        use block::BlockBackend as _;
        let dir = std::env::temp_dir().join(format!("vessel-handed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (base, secret, top) = (dir.join("base"), dir.join("secret"), dir.join("top"));
        std::fs::write(&base, vec![b'c'; 65536]).unwrap();
        std::fs::write(&secret, vec![b's'; 65536]).unwrap();
        let over = |backing: &Path| {
            let _ = std::fs::remove_file(&top);
            block::create(
                &top,
                block::Format::Qcow2,
                Some(65536),
                Some((backing.to_str().unwrap(), Some(block::Format::Raw))),
            )
            .unwrap();
        };
        over(&base);
        let d = disk(&top, Some(DiskFormat::Qcow2));
        let rec = record(&d).unwrap().unwrap();
        let files = open_checked(&d, None, Some(&rec)).unwrap();
        // The swap, after the check: the base's name now leads to the secret.
        std::fs::rename(&base, dir.join("base.old")).unwrap();
        std::os::unix::fs::symlink(&secret, &base).unwrap();
        let mut handed = d.clone();
        hand_over(&mut handed, &files);
        assert_eq!(handed.fds.len(), 2);
        assert_eq!(handed.fds[1].format, DiskFormat::Raw);
        let mut b = [0u8; 4];
        handed.open().unwrap().read_at(0, &mut b).unwrap();
        assert_eq!(&b, b"cccc", "the disk reads the checked base");
        d.open_with(true, true).unwrap().read_at(0, &mut b).unwrap();
        assert_eq!(&b, b"ssss", "by name the swap is followed");
        drop(files);
        let e = open_checked(&d, None, Some(&rec)).unwrap_err().to_string();
        assert!(e.contains("fixed at define"), "{e}");

        // A pool's disk: opened beneath its folder and compared with its record.
        std::fs::remove_file(&base).unwrap();
        std::fs::rename(dir.join("base.old"), &base).unwrap();
        over(Path::new("base"));
        let rec = record(&d).unwrap().unwrap();
        let folder = block::Folder::open(&dir).unwrap();
        assert_eq!(
            open_checked(&d, Some(&folder), Some(&rec)).unwrap().len(),
            2
        );
        std::fs::copy(&base, dir.join("other")).unwrap();
        over(Path::new("other"));
        let e = open_checked(&d, Some(&folder), Some(&rec))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("fixed at define"),
            "a chain changed in the pool: {e}"
        );
        // No record (an older definition): the folder's confinement alone.
        assert_eq!(open_checked(&d, Some(&folder), None).unwrap().len(), 2);

        let mut def: crate::domain::DomainDef = serde_json::from_value(serde_json::json!({
            "name": "fds", "vm": {"kernel": "/k", "disks": [{"path": top, "format": "qcow2",
            "fds": [{"fd": 3, "format": "raw", "path": "/etc/shadow"}]}]}}))
        .unwrap();
        let e = record_all(&mut def).unwrap_err().to_string();
        assert!(e.contains("fds"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
