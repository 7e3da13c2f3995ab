//! Whether the client of an API request may use the files it names.
//!
//! The VMM opens the files an API client names (kernel, initrd, drives, sockets, log,
//! metrics and snapshot files) with the VMM's own rights. When the client is another
//! user than the VMM's (a socket whose mode lets others connect), that would hand it the
//! VMM's rights: a root VMM would read `/etc/shadow` as a "drive". So each path is
//! checked against the credentials of the socket's peer (`SO_PEERCRED`) before it is
//! accepted: every folder on the way searchable, the file readable (and writable for a
//! writable drive or an output), or for a file the VMM creates, its folder writable.
//! Permission bits decide (owner, then group, then others, as the kernel does); ACLs
//! are not consulted, so a right that only an ACL grants is refused. The peer's
//! supplementary groups come from `/proc/PID/status` when the VMM can see that process,
//! else only its primary group counts.
//!
//! A peer that is root, or the VMM's own user, has those rights already: nothing is
//! checked, the kernel's own checks on the VMM's open are the same. Requests with no
//! peer (in-process callers, tests) are not checked either.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::http::Cred;

/// What the VMM will do with a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Read it (kernel, initrd, read-only drive, snapshot to load).
    Read,
    /// Read and write it (a writable drive).
    ReadWrite,
    /// Create it or write over it (a socket, a log, metrics or snapshot file).
    Create,
}

/// The identity a check runs as.
#[derive(Debug, Clone)]
struct Ids {
    uid: u32,
    groups: Vec<u32>,
}

impl Ids {
    fn of(peer: &Cred) -> Ids {
        let mut groups = vec![peer.gid];
        if peer.pid > 0 {
            if let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", peer.pid)) {
                // Only while the process is still the peer's: same uid.
                let uid_ok = status
                    .lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|v| v.split_whitespace().nth(1))
                    .is_some_and(|euid| euid == peer.uid.to_string());
                if uid_ok {
                    if let Some(g) = status.lines().find_map(|l| l.strip_prefix("Groups:")) {
                        groups.extend(g.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
                    }
                }
            }
        }
        Ids {
            uid: peer.uid,
            groups,
        }
    }

    /// Whether `bits` (4 read, 2 write, 1 search/execute) are granted by `meta`'s mode.
    fn may(&self, meta: &std::fs::Metadata, bits: u32) -> bool {
        let mode = meta.mode();
        let class = if meta.uid() == self.uid {
            mode >> 6
        } else if self.groups.contains(&meta.gid()) {
            mode >> 3
        } else {
            mode
        };
        class & bits == bits
    }
}

/// Whether `peer` needs checking at all: not root, not the VMM's own user.
fn needs_check(peer: Option<&Cred>) -> Option<&Cred> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    peer.filter(|p| p.uid != 0 && p.uid != me)
}

/// Checks that every folder from `/` down to `dir` (canonical) is searchable.
fn walk(ids: &Ids, dir: &Path, shown: &Path) -> Result<(), String> {
    let mut at = PathBuf::from("/");
    let parts: Vec<_> = dir.components().skip(1).collect();
    for c in std::iter::once(None).chain(parts.into_iter().map(Some)) {
        if let Some(c) = c {
            at.push(c);
        }
        let meta = std::fs::metadata(&at).map_err(|e| format!("{}: {e}", shown.display()))?;
        if !ids.may(&meta, 1) {
            return Err(denied(shown));
        }
    }
    Ok(())
}

fn denied(shown: &Path) -> String {
    format!(
        "{}: permission denied (the API client's user may not use this file)",
        shown.display()
    )
}

/// Checks `path` for `peer` (see the module's documentation); `Ok` when it may.
pub fn check(path: &Path, peer: Option<&Cred>, want: Want) -> Result<(), String> {
    check_shown(path, path, peer, want)
}

/// [`check`] of the file at `at`, naming it `shown` in errors: `at` may be an open file's
/// `/proc/self/fd/N`, whose own mode is then what decides (the file held, whatever its
/// name leads to meanwhile), the folders on its way being those of where it is now.
pub fn check_shown(at: &Path, shown: &Path, peer: Option<&Cred>, want: Want) -> Result<(), String> {
    let Some(peer) = needs_check(peer) else {
        return Ok(());
    };
    let ids = Ids::of(peer);
    let existing = match want {
        Want::Read | Want::ReadWrite => true,
        Want::Create => std::fs::symlink_metadata(at).is_ok(),
    };
    // Errors name `shown`; a new file's folder is the shown name's.
    let path = shown;
    if existing {
        let real = std::fs::canonicalize(at).map_err(|e| format!("{}: {e}", path.display()))?;
        let parent = real.parent().unwrap_or(Path::new("/"));
        walk(&ids, parent, path)?;
        let meta = std::fs::metadata(at).map_err(|e| format!("{}: {e}", path.display()))?;
        let bits = match want {
            Want::Read => 4,
            Want::ReadWrite => 6,
            // Writing over an existing file (a socket is replaced: its folder counts too).
            Want::Create => 2,
        };
        if !ids.may(&meta, bits) {
            return Err(denied(path));
        }
        if want == Want::Create
            && !ids.may(&std::fs::metadata(parent).map_err(|e| e.to_string())?, 3)
        {
            return Err(denied(path));
        }
        return Ok(());
    }
    // A new file: its folder must be the peer's to write in.
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let real = std::fs::canonicalize(parent).map_err(|e| format!("{}: {e}", path.display()))?;
    walk(&ids, &real, path)?;
    let meta = std::fs::metadata(&real).map_err(|e| format!("{}: {e}", path.display()))?;
    if !ids.may(&meta, 3) {
        return Err(denied(path));
    }
    Ok(())
}

/// Every host file a VM configuration names, with what the VMM does with it: kernel,
/// firmware, option ROMs, initrd and cloud-init files (read), the UEFI variable store
/// (written, or made from its template, which is read), each disk and its backing
/// chain (the image read-write unless read-only, backing files read), serial and
/// console log files and the vsock socket (created).
pub fn config_files(config: &crate::config::VmConfig) -> Vec<(PathBuf, Want)> {
    let mut out: Vec<(PathBuf, Want)> = config
        .kernel
        .iter()
        .chain(config.firmware.iter())
        .chain(config.option_roms.iter())
        .chain(config.initrd.iter())
        .map(|p| (p.clone(), Want::Read))
        .collect();
    if let Some(ci) = &config.cloud_init {
        out.extend(ci.files().map(|p| (p.to_path_buf(), Want::Read)));
    }
    // UEFI: the variable store is written in place (or made from the template beside
    // the code); without one, the template is read.
    let template = config
        .firmware
        .as_deref()
        .and_then(crate::config::uefi_vars_template)
        .filter(|t| t.exists());
    match &config.firmware_vars {
        Some(v) if std::fs::symlink_metadata(v).is_ok() => out.push((v.clone(), Want::ReadWrite)),
        Some(v) => {
            out.push((v.clone(), Want::Create));
            out.extend(template.map(|t| (t, Want::Read)));
        }
        None => out.extend(template.map(|t| (t, Want::Read))),
    }
    for d in &config.disks {
        for (i, f) in d.files().into_iter().enumerate() {
            let want = if i == 0 && !d.read_only {
                Want::ReadWrite
            } else {
                Want::Read
            };
            out.push((f, want));
        }
    }
    for s in [Some(&config.serial), config.virtio_console.as_ref()]
        .into_iter()
        .flatten()
    {
        if let crate::config::SerialConfig::File(p) = s {
            out.push((p.clone(), Want::Create));
        }
    }
    if let Some(v) = &config.vsock {
        out.push((v.uds_path.clone(), Want::Create));
    }
    out
}

/// Checks every file a VM configuration names (a snapshot's, which the client wrote).
pub fn check_config(config: &crate::config::VmConfig, peer: Option<&Cred>) -> Result<(), String> {
    if needs_check(peer).is_none() {
        return Ok(());
    }
    for (p, want) in config_files(config) {
        check(&p, peer, want)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn nobody() -> Cred {
        Cred {
            pid: 0,
            uid: 65534,
            gid: 65534,
        }
    }

    /// Needs root (the tests run as root): files owned by root with modes that do or do
    /// not let `nobody` in.
    #[test]
    fn modes_decide_for_another_user() {
        // SAFETY: geteuid cannot fail.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "run the tests as root: they check another user's rights"
        );
        let dir = std::env::temp_dir().join(format!("vessel-access-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let p = Some(nobody());
        let secret = dir.join("secret");
        std::fs::write(&secret, "s").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let public = dir.join("public");
        std::fs::write(&public, "p").unwrap();
        std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(check(&secret, p.as_ref(), Want::Read).is_err());
        assert!(check(&public, p.as_ref(), Want::Read).is_ok());
        assert!(check(&public, p.as_ref(), Want::ReadWrite).is_err());
        // Root and in-process callers are not checked.
        let root = Cred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        assert!(check(&secret, Some(&root), Want::Read).is_ok());
        assert!(check(&secret, None, Want::Read).is_ok());
        // A link to the secret is the secret.
        let link = dir.join("link");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        assert!(check(&link, p.as_ref(), Want::Read).is_err());
        // A readable file in a folder nobody can search.
        let closed = dir.join("closed");
        std::fs::create_dir(&closed).unwrap();
        std::fs::write(closed.join("f"), "f").unwrap();
        std::fs::set_permissions(closed.join("f"), std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(check(&closed.join("f"), p.as_ref(), Want::Read).is_err());
        // New files: only in a folder the peer may write.
        assert!(check(&dir.join("new.sock"), p.as_ref(), Want::Create).is_err());
        let open = dir.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(check(&open.join("new.sock"), p.as_ref(), Want::Create).is_ok());
        // An existing file the peer may not write is not its to replace.
        assert!(check(&public, p.as_ref(), Want::Create).is_err());
        // The peer's own file, owned by it.
        let mine = open.join("mine");
        std::fs::write(&mine, "m").unwrap();
        std::os::unix::fs::chown(&mine, Some(65534), Some(65534)).unwrap();
        std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(check(&mine, p.as_ref(), Want::ReadWrite).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
