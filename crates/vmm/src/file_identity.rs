//! Which file a name led to, as the kernel knows it: device and inode, and the inode's
//! birth time where the file system keeps one.
//!
//! A path (even with links resolved) names whatever is there now: a file renamed away
//! and replaced by another under the same name is a different file at the same path.
//! The manager records this identity where it checks a client's file, and compares it
//! wherever it opens the file again, so a swap between any two of those steps shows.
//! Device and inode alone repeat when a file is deleted and its inode reused; the birth
//! time (statx's `btime`) does not. For files nobody should write (kernels, firmware),
//! size and modification time are kept too, so a file rewritten in place shows as well;
//! disk images and variable stores are written by the guest, so theirs are not.

use std::os::unix::fs::MetadataExt;
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

/// A file's identity (see the module's documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    /// Birth time in nanoseconds since 1970, where the file system records one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub born_ns: Option<u64>,
    /// Size and modification time (nanoseconds since 1970), for files that must not
    /// change in place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<(u64, u64)>,
}

fn ns(t: std::time::SystemTime) -> Option<u64> {
    t.duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_nanos()).ok())
}

impl FileId {
    /// The identity of the file `meta` describes (from `fstat` of an open file, so it is
    /// the file that was opened, not whatever the name leads to next); with `content`,
    /// its size and modification time too.
    pub fn of(meta: &std::fs::Metadata, content: bool) -> FileId {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            born_ns: meta.created().ok().and_then(ns),
            content: content.then(|| {
                let mtime = meta.modified().ok().and_then(ns).unwrap_or(0);
                (meta.len(), mtime)
            }),
        }
    }

    /// Whether `now` is the file this identity was taken of (and, when it kept them,
    /// unchanged in size and modification time).
    pub fn matches(&self, now: &FileId) -> bool {
        self.dev == now.dev
            && self.ino == now.ino
            && (self.born_ns.is_none() || now.born_ns.is_none() || self.born_ns == now.born_ns)
            && (self.content.is_none() || self.content == now.content)
    }

    /// Why `now` is not this file, for an error message.
    pub fn difference(&self, now: &FileId) -> &'static str {
        if self.dev != now.dev
            || self.ino != now.ino
            || !(self.born_ns == now.born_ns || self.born_ns.is_none() || now.born_ns.is_none())
        {
            "another file is there now (renamed or replaced)"
        } else {
            "the file was rewritten in place (its size or modification time changed)"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_replaced_under_its_name_or_rewritten_is_not_the_same() {
        let dir = std::env::temp_dir().join(format!("vessel-fid-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        std::fs::write(&p, b"one").unwrap();
        let id = |content| FileId::of(&std::fs::metadata(&p).unwrap(), content);
        let (first, first_c) = (id(false), id(true));
        assert!(first.matches(&id(false)) && first_c.matches(&id(true)));
        // Rewritten in place: the same inode; only the identity with content differs.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&p, b"other bytes").unwrap();
        assert!(first.matches(&id(false)));
        assert!(!first_c.matches(&id(true)));
        assert!(first_c.difference(&id(true)).contains("in place"));
        // Renamed away and replaced: another inode (or the same number, born later).
        std::fs::rename(&p, dir.join("g")).unwrap();
        std::fs::write(&p, b"one").unwrap();
        assert!(!first.matches(&id(false)));
        assert!(first.difference(&id(false)).contains("replaced"));
        // Deleted and made again: the inode number may be reused, the birth time is not.
        let again = id(false);
        std::fs::remove_file(&p).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&p, b"one").unwrap();
        let now = id(false);
        if now.ino == again.ino && now.born_ns.is_some() {
            assert!(!again.matches(&now), "a reused inode number is told apart");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
