//! Image locking compatible with QEMU's, so Vessel and a running QEMU (or qemu-img) never
//! write the same image at once.
//!
//! QEMU takes open-file-description (OFD) byte-range locks on the image file: one byte at
//! 100 + n for each permission bit n it holds, one at 200 + n for each permission it refuses
//! to share. A reader holding byte 201 ("does not share write") blocks writers, and a writer
//! holding byte 101 blocks such readers. Locks go away when the file is closed.
//!
//! Caveat (QEMU shares it): a child process forked by any thread holds copies of all
//! descriptors, and so these locks, until it execs. Our own lock attempts retry briefly
//! to ride over that window; qemu-img does not, so a program that spawns processes very
//! often may make qemu-img see a just-closed image as still in use for a moment.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

use tracing::warn;

/// First byte of the "permission held" locks.
const PERM_BASE: i64 = 100;
/// First byte of the "permission not shared" locks.
const SHARED_BASE: i64 = 200;
/// QEMU's permission bits, in bit order: consistent read, write, write unchanged, resize.
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const CONSISTENT_READ: u32 = 1 << 0;
const WRITE: u32 = 1 << 1;
const WRITE_UNCHANGED: u32 = 1 << 2;
const RESIZE: u32 = 1 << 3;

/// Another process holds a lock that conflicts with ours.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("failed to get {kind}\"{perm}\" lock: is another process using the image?")]
    Conflict {
        kind: &'static str,
        perm: &'static str,
    },
    #[error("locking the image file")]
    Io(#[source] io::Error),
}

fn flock(ty: i32, byte: i64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers, for which all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

fn fcntl(file: &File, cmd: i32, fl: &mut libc::flock) -> io::Result<()> {
    // SAFETY: F_OFD_SETLK/F_OFD_GETLK read (and for GETLK write) the `flock` passed, which
    // is a valid, exclusively borrowed struct for the whole call; the fd is owned by `file`.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, fl as *mut libc::flock) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// True when another open file description holds a lock on `byte`.
fn taken_by_other(file: &File, byte: i64) -> io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK, byte);
    fcntl(file, libc::F_OFD_GETLK, &mut fl)?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Locks `file` as QEMU would for a read-write (`write`) or read-only user. Hosts whose
/// file systems lack OFD locks get a warning and no locking.
pub fn lock_image(file: &File, write: bool) -> Result<(), LockError> {
    let (perm, shared) = if write {
        (
            CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE,
            CONSISTENT_READ | WRITE_UNCHANGED,
        )
    } else {
        (CONSISTENT_READ, CONSISTENT_READ | WRITE_UNCHANGED | RESIZE)
    };
    let mut tries = 0;
    loop {
        match apply(file, perm, shared) {
            Err(LockError::Io(e)) if e.raw_os_error() == Some(libc::EINVAL) => {
                warn!("file system does not support OFD locks: image not locked");
                return Ok(());
            }
            // A conflict can be transient: a process forked by another thread of a user of
            // the image holds its descriptor (and so its locks) until it execs.
            Err(LockError::Conflict { .. }) if tries < CONFLICT_RETRIES => {
                tries += 1;
                std::thread::sleep(CONFLICT_RETRY_DELAY);
            }
            Ok(()) => {
                remember(file, write);
                return Ok(());
            }
            r => return r,
        }
    }
}

fn remember(file: &File, write: bool) {
    let fd = file.as_raw_fd();
    let Some((dev, ino)) = identity(fd) else {
        return;
    };
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    // A descriptor number closed and reused, or the same image locked again.
    held.retain(|h| h.fd != fd && identity(h.fd) == Some((h.dev, h.ino)));
    held.push(Held {
        fd,
        dev,
        ino,
        write,
    });
}

/// An image this process locked: its descriptor's number and the file it was open on,
/// so that a live migration can hand the locks over (see [`release_all`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    fd: i32,
    dev: u64,
    ino: u64,
    write: bool,
}

static HELD: std::sync::Mutex<Vec<Held>> = std::sync::Mutex::new(Vec::new());

/// (device, inode) of what `fd` is open on now, if it is open.
fn identity(fd: i32) -> Option<(u64, u64)> {
    // SAFETY: fstat writes only the stat struct given; an fd that is not open fails with
    // EBADF, which is all it can do.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        (libc::fstat(fd, &mut st) == 0).then_some((st.st_dev, st.st_ino))
    }
}

fn set_all(h: &Held, ty: i32) -> io::Result<()> {
    for byte in (PERM_BASE..PERM_BASE + 4).chain(SHARED_BASE..SHARED_BASE + 4) {
        let mut fl = flock(ty, byte);
        // SAFETY: as in `fcntl`, on a descriptor this process holds open (checked by the
        // caller against the file it was locked on).
        if unsafe { libc::fcntl(h.fd, libc::F_OFD_SETLK, &mut fl as *mut libc::flock) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Drops every image lock this process holds (a live migration's source, stopped, lets
/// the destination open the disks); [`retake`] takes them again if the VM stays here.
/// Images closed since they were locked are forgotten.
pub fn release_all() -> Vec<Held> {
    release_where(|_, _| true)
}

/// [`release_all`] for the images whose (device, inode) `pick` accepts.
fn release_where(pick: impl Fn(u64, u64) -> bool) -> Vec<Held> {
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    held.retain(|h| identity(h.fd) == Some((h.dev, h.ino)));
    let mine: Vec<Held> = held
        .iter()
        .copied()
        .filter(|h| pick(h.dev, h.ino))
        .collect();
    for h in &mine {
        if let Err(e) = set_all(h, libc::F_UNLCK) {
            warn!(fd = h.fd, "releasing an image lock: {e}");
        }
    }
    mine
}

/// Takes again the locks [`release_all`] dropped (the migration failed: the VM goes on
/// here). One another process took meanwhile is reported, not fatal: the VM keeps its
/// disks open either way.
pub fn retake(released: &[Held]) {
    for h in released {
        if identity(h.fd) != Some((h.dev, h.ino)) {
            continue;
        }
        // SAFETY: the descriptor is open on the file it was locked on (checked above); the
        // `File` is only borrowed for the call and never closed here.
        let file = std::mem::ManuallyDrop::new(unsafe {
            <File as std::os::unix::io::FromRawFd>::from_raw_fd(h.fd)
        });
        if let Err(e) = lock_image(&file, h.write) {
            warn!(fd = h.fd, "taking an image lock back: {e}");
        }
    }
}

/// How often, and how far apart, a conflicting lock is retried before giving up.
const CONFLICT_RETRIES: u32 = 20;
const CONFLICT_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(5);

fn apply(file: &File, perm: u32, shared: u32) -> Result<(), LockError> {
    for (n, name) in PERM_NAMES.iter().enumerate() {
        let bit = 1u32 << n;
        let n = n as i64;
        // We want `bit`: nobody may refuse to share it.
        if perm & bit != 0 && taken_by_other(file, SHARED_BASE + n).map_err(LockError::Io)? {
            return Err(LockError::Conflict {
                kind: "",
                perm: name,
            });
        }
        // We refuse to share `bit`: nobody may hold it.
        if shared & bit == 0 && taken_by_other(file, PERM_BASE + n).map_err(LockError::Io)? {
            return Err(LockError::Conflict {
                kind: "shared",
                perm: name,
            });
        }
    }
    for n in 0..PERM_NAMES.len() {
        let bit = 1u32 << n;
        let n = n as i64;
        if perm & bit != 0 {
            fcntl(
                file,
                libc::F_OFD_SETLK,
                &mut flock(libc::F_RDLCK, PERM_BASE + n),
            )
            .map_err(LockError::Io)?;
        }
        if shared & bit == 0 {
            fcntl(
                file,
                libc::F_OFD_SETLK,
                &mut flock(libc::F_RDLCK, SHARED_BASE + n),
            )
            .map_err(LockError::Io)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn locks_are_handed_over_and_taken_back() {
        let path = std::env::temp_dir().join(format!("vessel-lock-{}", std::process::id()));
        std::fs::write(&path, [0u8; 512]).unwrap();
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap()
        };
        let ours = open();
        lock_image(&ours, true).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let this = |dev: u64, ino: u64| (dev, ino) == (meta.dev(), meta.ino());
        // Another open file description (as another process's) conflicts...
        assert!(matches!(
            lock_image(&open(), true),
            Err(LockError::Conflict { .. })
        ));
        // ...until ours hands its locks over.
        let released = release_where(this);
        assert_eq!(released.len(), 1);
        let other = open();
        lock_image(&other, true).unwrap();
        drop(other);
        retake(&released);
        assert!(matches!(
            lock_image(&open(), true),
            Err(LockError::Conflict { .. })
        ));
        drop(ours);
        let _ = std::fs::remove_file(&path);
    }
}
