//! Issue 22: a guest disk's chain opened once, by whoever checks it, and used as opened.
//!
//! A manager that checks a chain by path and then lets a VMM open the same paths leaves a
//! window: a file swapped in between (a link, a rewritten backing name) is what the guest
//! gets. Here the checker opens each file and reads each qcow2 header from that open file
//! ([`open_guest_disk_chain`]); the VMM is handed those files and builds the disk from them
//! alone ([`open_guest_disk_files`]): a backing file name in a header is never opened.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::path::PathBuf;

use crate::{
    file_id, lock, probe_storage, resolve_backing, Folder, Format, OpenError, Qcow2, Raw,
    MAX_BACKING_CHAIN,
};

/// One open file of a guest disk's chain.
#[derive(Debug)]
pub struct ChainFile {
    /// The name it was opened by: the image's as given, a backing file's as the image
    /// naming it resolves it.
    pub path: PathBuf,
    pub file: File,
    pub format: Format,
}

/// Opens a guest disk's chain as [`crate::open_guest_disk`] would by path, keeping each
/// file open: the image (writable unless `read_only`), then each backing file read-only
/// with the format recorded in the image naming it. Every header is read from the file
/// kept, so what the caller checks is what it holds. Only qcow2 headers are read (a raw
/// image's content never is); no locks are taken (the VMM takes them); `O_NONBLOCK`, so a
/// FIFO cannot stall the caller. Fails where the guest open would.
pub fn open_guest_disk_chain(
    path: &std::path::Path,
    format: Option<Format>,
    read_only: bool,
) -> Result<Vec<ChainFile>, OpenError> {
    open_chain_files(None, path, format, read_only)
}

/// [`open_guest_disk_chain`] for a disk confined to `folder` (a pool's): each file is
/// opened beneath it without links, as [`crate::open_guest_disk_in`] opens them.
pub fn open_guest_disk_chain_in(
    folder: &Folder,
    path: &std::path::Path,
    format: Option<Format>,
    read_only: bool,
) -> Result<Vec<ChainFile>, OpenError> {
    open_chain_files(Some(folder), path, format, read_only)
}

fn open_chain_files(
    folder: Option<&Folder>,
    path: &std::path::Path,
    format: Option<Format>,
    read_only: bool,
) -> Result<Vec<ChainFile>, OpenError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut out: Vec<ChainFile> = Vec::new();
    let mut seen = HashSet::new();
    let (mut cur, mut fmt) = (path.to_path_buf(), format);
    loop {
        if out.len() > MAX_BACKING_CHAIN {
            return Err(OpenError::ChainTooDeep { path: cur });
        }
        let writable = out.is_empty() && !read_only;
        let file = match folder {
            Some(folder) => folder.open_file(&cur, !writable)?,
            None => OpenOptions::new()
                .read(true)
                .write(writable)
                .custom_flags(libc::O_NONBLOCK)
                .open(&cur)
                .map_err(|source| OpenError::OpenFile {
                    path: cur.clone(),
                    source,
                })?,
        };
        if !seen.insert(file_id(&file, &cur)?) {
            return Err(OpenError::ChainLoop { path: cur });
        }
        let f = match fmt {
            Some(f) => f,
            None => {
                // Probed only to refuse, as the guest open does.
                let f = probe_storage(&file).map_err(|source| OpenError::Probe {
                    path: cur.clone(),
                    source,
                })?;
                if f != Format::Raw {
                    return Err(OpenError::FormatNotGiven { path: cur });
                }
                f
            }
        };
        if f == Format::Raw {
            out.push(ChainFile {
                path: cur,
                file,
                format: f,
            });
            return Ok(out);
        }
        let header = file.try_clone().map_err(|source| OpenError::OpenFile {
            path: cur.clone(),
            source,
        })?;
        let q = Qcow2::open(Box::new(header), true).map_err(|source| OpenError::Qcow2 {
            path: cur.clone(),
            source,
        })?;
        let backing = q.header().backing_file.clone();
        let backing_format = q.header().backing_format.clone();
        out.push(ChainFile {
            path: cur.clone(),
            file,
            format: f,
        });
        let Some(name) = backing else {
            return Ok(out);
        };
        fmt = Some(match backing_format.as_deref() {
            Some(s) => s.parse().map_err(|source| OpenError::BackingFormat {
                path: cur.clone(),
                source,
            })?,
            None => {
                return Err(OpenError::BackingFormatMissing {
                    path: cur,
                    backing: name,
                })
            }
        });
        cur = resolve_backing(&cur, &name);
    }
}

/// Builds a guest disk from files opened for it ([`open_guest_disk_chain`], handed over
/// by a manager): the first is the image, each next one the backing file of the one
/// before, each with its given format. Nothing is opened by name: a qcow2 image's backing
/// name only says that it has one. An image naming a backing file where none was given,
/// or none where one was, is refused ([`OpenError::ChainChanged`]): its header changed
/// since the chain was checked. Locks as [`crate::open_guest_disk_with`] does.
pub fn open_guest_disk_files(
    files: Vec<ChainFile>,
    read_only: bool,
    force_share: bool,
) -> Result<Box<dyn crate::BlockBackend>, OpenError> {
    if files.len() > MAX_BACKING_CHAIN + 1 {
        let path = files.first().map(|f| f.path.clone()).unwrap_or_default();
        return Err(OpenError::ChainTooDeep { path });
    }
    let mut seen = HashSet::new();
    for f in &files {
        if !seen.insert(file_id(&f.file, &f.path)?) {
            return Err(OpenError::ChainLoop {
                path: f.path.clone(),
            });
        }
    }
    let mut files = files.into_iter();
    let Some(top) = files.next() else {
        return Err(OpenError::ChainChanged {
            path: PathBuf::new(),
            what: "no file was given".into(),
        });
    };
    open_given(top, files, read_only, force_share)
}

fn open_given(
    one: ChainFile,
    mut rest: std::vec::IntoIter<ChainFile>,
    read_only: bool,
    force_share: bool,
) -> Result<Box<dyn crate::BlockBackend>, OpenError> {
    let ChainFile { path, file, format } = one;
    if !force_share {
        lock::lock_image(&file, !read_only).map_err(|source| OpenError::Locked {
            path: path.clone(),
            source,
        })?;
    }
    tracing::debug!(path = %path.display(), %format, read_only, "block: opening a given file");
    match format {
        Format::Raw => {
            if rest.len() > 0 {
                return Err(OpenError::ChainChanged {
                    path,
                    what: "a raw image was given backing files".into(),
                });
            }
            Ok(Box::new(Raw::new(Box::new(file), read_only).map_err(
                |source| OpenError::Raw {
                    path: path.clone(),
                    source,
                },
            )?))
        }
        Format::Qcow2 => {
            let mut q =
                Qcow2::open(Box::new(file), read_only).map_err(|source| OpenError::Qcow2 {
                    path: path.clone(),
                    source,
                })?;
            match (q.header().backing_file.clone(), rest.next()) {
                (None, None) => {}
                (Some(name), None) => {
                    return Err(OpenError::ChainChanged {
                        path,
                        what: format!("it names backing file {name:?}, and none was given"),
                    })
                }
                (None, Some(b)) => {
                    return Err(OpenError::ChainChanged {
                        path,
                        what: format!(
                            "it names no backing file, and {} was given",
                            b.path.display()
                        ),
                    })
                }
                (Some(_), Some(b)) => {
                    let bpath = b.path.clone();
                    let backing =
                        open_given(b, rest, true, force_share).map_err(|e| OpenError::Backing {
                            path: path.clone(),
                            backing: bpath,
                            source: Box::new(e),
                        })?;
                    q.set_backing(backing);
                }
            }
            Ok(Box::new(crate::Qcow2Disk::new(q)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BlockBackend as _;

    /// The attack the module closes: between the check and the VMM's open, the image is
    /// rewritten to name another backing file and a link is put in the base's place. The
    /// files opened at the check still give the checked chain's bytes.
    #[test]
    fn files_opened_at_the_check_are_what_the_disk_reads() {
        let dir = std::env::temp_dir().join(format!("block-opened-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (base, secret, top) = (dir.join("base"), dir.join("secret"), dir.join("top"));
        std::fs::write(&base, vec![b'b'; 65536]).unwrap();
        std::fs::write(&secret, vec![b's'; 65536]).unwrap();
        crate::create(
            &top,
            Format::Qcow2,
            Some(65536),
            Some(("base", Some(Format::Raw))),
        )
        .unwrap();
        let chain = open_guest_disk_chain(&top, Some(Format::Qcow2), false).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(
            (chain[1].path.clone(), chain[1].format),
            (base.clone(), Format::Raw)
        );

        // The swap, after the check.
        std::fs::rename(&base, dir.join("base.old")).unwrap();
        std::os::unix::fs::symlink(&secret, &base).unwrap();
        let mut by_path = crate::open_guest_disk(&top, Some(Format::Qcow2), true).unwrap();
        let mut b = [0u8; 4];
        by_path.read_at(0, &mut b).unwrap();
        assert_eq!(&b, b"ssss", "opening by path again follows the swap");
        drop(by_path);

        let mut disk = open_guest_disk_files(chain, false, false).unwrap();
        disk.read_at(0, &mut b).unwrap();
        assert_eq!(&b, b"bbbb", "the disk reads the base that was checked");

        // A header that changed since the check: refused, not followed.
        let lone = open_guest_disk_chain(&secret, Some(Format::Raw), true).unwrap();
        let mut chain = open_guest_disk_chain(&top, Some(Format::Qcow2), true).unwrap();
        chain.truncate(1);
        let e = open_guest_disk_files(chain, true, true).unwrap_err();
        assert!(matches!(e, OpenError::ChainChanged { .. }), "{e}");
        let mut two =
            open_guest_disk_chain(&dir.join("base.old"), Some(Format::Raw), true).unwrap();
        two.extend(lone);
        let e = open_guest_disk_files(two, true, true).unwrap_err();
        assert!(matches!(e, OpenError::ChainChanged { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
