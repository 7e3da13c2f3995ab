//! Opening image files beneath one folder, in one step each.
//!
//! A pool's volumes, and the backing files of their qcow2 chains, must be files *in the
//! pool*: a qcow2 header may name any host file as its backing file (`/etc/shadow`,
//! `../../root/key`), and a volume's name may have been replaced by a symbolic link to
//! one. Checking a path and then opening it leaves a window in which it can be swapped,
//! so each file is opened once, with `openat2` relative to the folder's descriptor
//! (`RESOLVE_BENEATH`: no absolute paths and no `..` out of it; `RESOLVE_NO_SYMLINKS`:
//! no link anywhere on the way), and what was opened is then checked on its descriptor
//! (`fstat`: a regular file). The descriptor is what is read and written afterwards.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why a file could not be opened beneath a [`Folder`].
#[derive(Debug, Error)]
pub enum FolderError {
    #[error("{path} is outside {folder}: files here must lie in that folder")]
    Outside { path: PathBuf, folder: PathBuf },
    #[error("{path} is or passes through a symbolic link: files in {folder} are opened without following links")]
    Link { path: PathBuf, folder: PathBuf },
    #[error("{path} is not a regular file")]
    NotRegular { path: PathBuf },
    #[error("opening {path}")]
    Open { path: PathBuf, source: io::Error },
}

/// An open folder that image files are opened beneath.
#[derive(Debug)]
pub struct Folder {
    dir: File,
    path: PathBuf,
}

/// `openat2(2)`'s `RESOLVE_*` flags used here (the kernel's values, stable ABI).
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_NO_SYMLINKS: u64 = 0x04;
const RESOLVE_BENEATH: u64 = 0x08;

fn openat2(dir: libc::c_int, path: &Path, flags: libc::c_int, resolve: u64) -> io::Result<File> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: open_how is plain old data; zeroed is a valid value for it.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    // A new file's mode, less the umask (as open(2) with 0666 makes it).
    if flags & libc::O_CREAT != 0 {
        how.mode = 0o666;
    }
    how.resolve = resolve;
    // SAFETY: `c` is NUL-terminated, `how` a valid open_how of the size passed; the
    // returned descriptor is owned by the File made from it below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor the kernel just returned to us and nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd as libc::c_int) })
}

impl Folder {
    /// Opens the folder at `path`, which must be absolute and contain no symbolic link
    /// (give it resolved: the manager's pool folders are).
    pub fn open(path: &Path) -> Result<Folder, FolderError> {
        let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
        let dir = openat2(libc::AT_FDCWD, path, flags, RESOLVE_NO_SYMLINKS).map_err(|e| match e
            .raw_os_error()
        {
            Some(libc::ELOOP) => FolderError::Link {
                path: path.into(),
                folder: path.into(),
            },
            _ => FolderError::Open {
                path: path.into(),
                source: e,
            },
        })?;
        Ok(Folder {
            dir,
            path: path.into(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens `path` (the folder's path and a name below it, or a name relative to the
    /// folder) for reading, and for writing unless `read_only`; only a regular file in
    /// the folder, reached without any symbolic link, is opened.
    pub fn open_file(&self, path: &Path, read_only: bool) -> Result<File, FolderError> {
        self.open_with(
            path,
            if read_only {
                libc::O_RDONLY
            } else {
                libc::O_RDWR
            },
        )
    }

    /// Creates `path` (as [`Folder::open_file`] names it) for reading and writing; an
    /// existing entry of that name, a link included, makes it fail (`O_EXCL`).
    pub fn create_file(&self, path: &Path) -> Result<File, FolderError> {
        self.open_with(path, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL)
    }

    fn open_with(&self, path: &Path, access: libc::c_int) -> Result<File, FolderError> {
        let outside = || FolderError::Outside {
            path: path.into(),
            folder: self.path.clone(),
        };
        let rel = if path.is_absolute() {
            path.strip_prefix(&self.path).map_err(|_| outside())?
        } else {
            path
        };
        if rel.as_os_str().is_empty() {
            return Err(FolderError::NotRegular { path: path.into() });
        }
        // O_NONBLOCK: a FIFO put in the folder must not block the open (it is refused
        // below); it means nothing for regular files.
        let flags = access | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK;
        let resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
        let file = openat2(self.dir.as_raw_fd(), rel, flags, resolve).map_err(|e| {
            match e.raw_os_error() {
                Some(libc::EXDEV) => outside(),
                Some(libc::ELOOP) => FolderError::Link {
                    path: path.into(),
                    folder: self.path.clone(),
                },
                _ => FolderError::Open {
                    path: path.into(),
                    source: e,
                },
            }
        })?;
        let kind = file
            .metadata()
            .map_err(|source| FolderError::Open {
                path: path.into(),
                source,
            })?
            .file_type();
        if !kind.is_file() || kind.is_fifo() {
            return Err(FolderError::NotRegular { path: path.into() });
        }
        // SAFETY: F_SETFL on a descriptor this function owns, with plain flag bits.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, 0) };
        Ok(file)
    }
}
