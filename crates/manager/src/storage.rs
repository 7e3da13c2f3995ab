//! Directory storage pools and their volumes (raw and qcow2 image files, through the
//! `block` crate). A pool is a name for a folder; its volumes are the image files in it,
//! so files put there by other tools show up too (as with libvirt's `dir` pools).

use std::path::{Path, PathBuf};

use block::Format;
use serde::{Deserialize, Serialize};

use crate::domain::check_name;
use crate::error::{Error, Result};
use crate::store::Store;

/// What pools and volumes need of the daemon around them: its store, the folders pools
/// may lie in, and which domains use a disk file. The manager provides it; this module
/// knows nothing else of the manager.
pub trait PoolHost {
    fn store(&self) -> &Store;
    /// Folders pools may lie in, resolved.
    fn pool_roots(&self) -> Vec<PathBuf>;
    /// Defined domains whose disks include `path`.
    fn disk_users(&self, path: &Path) -> Result<Vec<String>>;
    fn is_active(&self, domain: &str) -> bool;
}

/// The chain of an error's messages, "a: b: c".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// A block error; a file refused by a pool's folder (outside it, a link, not a regular
/// file) is the request's fault, not the daemon's.
fn block_err(e: impl std::error::Error + 'static) -> Error {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(c) = cur {
        if c.downcast_ref::<block::FolderError>()
            .is_some_and(|f| !matches!(f, block::FolderError::Open { .. }))
        {
            return Error::invalid("disk image", chain(&e));
        }
        cur = c.source();
    }
    Error::Block(chain(&e))
}

#[derive(Debug, Serialize)]
pub struct PoolInfo {
    pub name: String,
    /// libvirt's pool UUID (none for a pool defined before Vessel kept them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// The folder's mode, owner and group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub permissions: Option<Permissions>,
    pub path: PathBuf,
    pub volumes: usize,
    /// Bytes of the filesystem holding the pool.
    pub capacity: u64,
    pub available: u64,
}

/// libvirt's `<permissions>` of a pool's folder or a volume's file: what a definition
/// asks for (each part optional) or what the file has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Permissions {
    #[serde(default)]
    pub mode: Option<u32>,
    #[serde(default)]
    pub owner: Option<u32>,
    #[serde(default)]
    pub group: Option<u32>,
}

/// What `path` has (links not followed).
pub fn permissions_of(path: &Path) -> Option<Permissions> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).ok()?;
    Some(Permissions {
        mode: Some(m.mode() & 0o7777),
        owner: Some(m.uid()),
        group: Some(m.gid()),
    })
}

/// Gives `path` what `want` asks for (what it leaves out stays).
fn apply_permissions(path: &Path, want: Permissions) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if want.owner.is_some() || want.group.is_some() {
        std::os::unix::fs::chown(path, want.owner, want.group)
            .map_err(|e| Error::io("changing the owner of", path, e))?;
    }
    if let Some(mode) = want.mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io("changing the mode of", path, e))?;
    }
    Ok(())
}

/// Refuses when `path` does not have what `want` asks for: an existing folder is not
/// changed behind its owner's back.
fn check_permissions(path: &Path, want: Permissions) -> Result<()> {
    let have = permissions_of(path).unwrap_or_default();
    let differs = |w: Option<u32>, h: Option<u32>| w.is_some() && w != h;
    if differs(want.mode, have.mode)
        || differs(want.owner, have.owner)
        || differs(want.group, have.group)
    {
        return Err(Error::invalid(
            "pool permissions",
            format!(
                "{} has mode {:04o}, owner {}, group {}; the definition asks for {}: \
                 change the folder or the definition (or let pool-define --build make it)",
                path.display(),
                have.mode.unwrap_or(0),
                have.owner.unwrap_or(0),
                have.group.unwrap_or(0),
                [
                    want.mode.map(|m| format!("mode {m:04o}")),
                    want.owner.map(|o| format!("owner {o}")),
                    want.group.map(|g| format!("group {g}")),
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(", ")
            ),
        ));
    }
    Ok(())
}

#[derive(Debug, Serialize)]
pub struct VolumeInfo {
    pub name: String,
    pub pool: String,
    pub path: PathBuf,
    pub format: Format,
    /// Virtual size in bytes (what the guest sees).
    pub capacity: u64,
    /// Bytes the file occupies on the host.
    pub allocation: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    /// Defined domains whose disks use this volume.
    pub used_by: Vec<String>,
    /// The file's mode, owner and group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub permissions: Option<Permissions>,
}

fn statvfs(path: &Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return (0, 0);
    };
    // SAFETY: statvfs is plain old data; zeroed is a valid value for it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid out-pointer for the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return (0, 0);
    }
    let f = st.f_frsize as u64;
    (st.f_blocks as u64 * f, st.f_bavail as u64 * f)
}

pub(crate) fn volume_files(dir: &Path) -> Result<Vec<String>> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::io("reading pool folder", dir, e))?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.') && check_name("volume", n).is_ok())
        .collect();
    v.sort();
    Ok(v)
}

/// A pool's information, with its UUID from the store.
pub fn pool_info_of(m: &dyn PoolHost, name: &str, path: &Path) -> Result<PoolInfo> {
    Ok(PoolInfo {
        uuid: m.store().pool_uuid(name)?,
        ..pool_info(name, path)?
    })
}

pub fn pool_info(name: &str, path: &Path) -> Result<PoolInfo> {
    let (capacity, available) = statvfs(path);
    Ok(PoolInfo {
        name: name.to_string(),
        uuid: None,
        permissions: permissions_of(path),
        path: path.to_path_buf(),
        volumes: volume_files(path).map(|v| v.len()).unwrap_or(0),
        capacity,
        available,
    })
}

/// `path` with symbolic links resolved as far as it exists (the rest appended as given).
pub(crate) fn resolve_existing(path: &Path) -> Result<PathBuf> {
    let mut existing = path;
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name);
                existing = parent;
            }
            _ => break,
        }
    }
    let mut real = existing
        .canonicalize()
        .map_err(|e| Error::io("resolving", existing, e))?;
    for r in rest.iter().rev() {
        real.push(r);
    }
    Ok(real)
}

/// Refuses a pool folder outside the daemon's pool roots (`STATE/pools` and `vessel
/// daemon --pool-root DIR`): a pool on /etc would let any API client read /etc/shadow.
pub(crate) fn check_pool_root(m: &dyn PoolHost, path: &Path) -> Result<PathBuf> {
    if path
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(Error::invalid(
            "pool path",
            format!("{}: '..' is not allowed", path.display()),
        ));
    }
    let real = resolve_existing(path)?;
    let roots = m.pool_roots();
    if roots.iter().any(|r| real.starts_with(r)) {
        return Ok(real);
    }
    let list: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
    Err(Error::invalid(
        "pool path",
        format!(
            "{} is outside the pool roots ({}): pools live under the state folder's pools/ \
             or a folder the daemon allows with --pool-root",
            path.display(),
            list.join(", ")
        ),
    ))
}

/// A pool's folder, checked against the pool roots again (a pool defined before they
/// were enforced, or a folder replaced by a link since).
pub(crate) fn pool_dir(m: &dyn PoolHost, pool: &str) -> Result<PathBuf> {
    let dir = m.store().get_pool(pool)?;
    check_pool_root(m, &dir)
}

pub fn define_pool(
    m: &dyn PoolHost,
    name: &str,
    path: &Path,
    create: bool,
    uuid: Option<&str>,
    permissions: Option<Permissions>,
) -> Result<PoolInfo> {
    check_name("pool name", name)?;
    if let Some(u) = uuid {
        crate::domain::check_uuid(u)?;
        if let Some(other) = m.store().pool_with_uuid(u)? {
            return Err(Error::Exists {
                kind: "pool with that UUID",
                name: other,
            });
        }
    }
    if !path.is_absolute() {
        return Err(Error::invalid(
            "pool path",
            format!("{} is not an absolute path", path.display()),
        ));
    }
    check_pool_root(m, path)?;
    let mut made = false;
    if !path.exists() {
        if !create {
            return Err(Error::invalid(
                "pool path",
                format!(
                    "{} does not exist: create it first, or ask for it to be created (vessel pool-define --build)",
                    path.display()
                ),
            ));
        }
        std::fs::create_dir_all(path).map_err(|e| Error::io("creating pool folder", path, e))?;
        made = true;
    } else if !path.is_dir() {
        return Err(Error::invalid(
            "pool path",
            format!("{} is not a directory", path.display()),
        ));
    }
    let path = match check_pool_root(m, path) {
        Ok(p) => p,
        Err(e) => {
            if made {
                let _ = std::fs::remove_dir(path);
            }
            return Err(e);
        }
    };
    // libvirt's <permissions>: given to a folder made here, checked on one that was there.
    if let Some(want) = permissions {
        let r = if made {
            apply_permissions(&path, want)
        } else {
            check_permissions(&path, want)
        };
        if let Err(e) = r {
            if made {
                let _ = std::fs::remove_dir(&path);
            }
            return Err(e);
        }
    }
    if let Err(e) = m.store().insert_pool(name, &path) {
        if made {
            let _ = std::fs::remove_dir(&path);
        }
        return Err(e);
    }
    let uuid = uuid.map_or_else(crate::domain::new_uuid, str::to_string);
    m.store().set_pool_uuid(name, &uuid)?;
    pool_info_of(m, name, &path)
}

/// A pool's folder, open: every volume file, and every backing file of a volume's chain,
/// is opened beneath it without following links (`block::Folder`), so a qcow2 header
/// naming a host file, or a link put in place of a volume, is refused rather than opened.
pub(crate) fn pool_folder(m: &dyn PoolHost, pool: &str) -> Result<block::Folder> {
    let dir = pool_dir(m, pool)?;
    block::Folder::open(&dir).map_err(block_err)
}

/// A volume's pool folder (open) and its path.
fn vol_in(m: &dyn PoolHost, pool: &str, vol: &str) -> Result<(block::Folder, PathBuf)> {
    check_name("volume name", vol)?;
    let folder = pool_folder(m, pool)?;
    let path = folder.path().join(vol);
    Ok((folder, path))
}

pub fn volume_info(m: &dyn PoolHost, pool: &str, vol: &str) -> Result<VolumeInfo> {
    let (folder, path) = vol_in(m, pool, vol)?;
    volume_info_in(m, &folder, pool, vol, &path)
}

fn volume_info_in(
    m: &dyn PoolHost,
    folder: &block::Folder,
    pool: &str,
    vol: &str,
    path: &Path,
) -> Result<VolumeInfo> {
    // Not followed: a link here is refused by the open below, not reported missing.
    if std::fs::symlink_metadata(path).is_err() {
        return Err(Error::not_found("volume", &format!("{pool}/{vol}")));
    }
    let path = path.to_path_buf();
    // The format recorded when the manager made the volume; a file placed in the pool by
    // hand is raw. Never probed: a guest writes the content (a qcow2 header naming a host
    // file on a raw volume would otherwise be followed).
    let format = m.store().volume_format(pool, vol)?.unwrap_or(Format::Raw);
    let i = block::info_in(folder, &path, format).map_err(block_err)?;
    Ok(VolumeInfo {
        name: vol.to_string(),
        pool: pool.to_string(),
        used_by: m.disk_users(&path)?,
        permissions: permissions_of(&path),
        path,
        format: i.format,
        capacity: i.virtual_size,
        allocation: i.actual_size,
        backing_file: i.backing_file,
    })
}

/// Largest volume: what a qcow2 image with the default 64 KiB clusters addresses, for
/// every format (a raw file that large would not fit a filesystem either).
pub fn max_capacity() -> u64 {
    block::qcow2::header::max_virtual_size(16)
}

fn check_capacity(capacity: u64) -> Result<()> {
    if capacity > max_capacity() {
        return Err(Error::invalid(
            "volume capacity",
            format!(
                "{capacity} bytes is more than the largest volume ({} bytes)",
                max_capacity()
            ),
        ));
    }
    Ok(())
}

fn ensure_absent(path: &Path, pool: &str, vol: &str) -> Result<()> {
    // Any entry counts, a dangling link included (creating through it would make a file
    // wherever it points; `block::create_in` refuses that too, atomically).
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(Error::Exists {
            kind: "volume",
            name: format!("{pool}/{vol}"),
        });
    }
    Ok(())
}

pub fn create_volume(
    m: &dyn PoolHost,
    pool: &str,
    vol: &str,
    capacity: u64,
    format: Format,
    permissions: Option<Permissions>,
) -> Result<VolumeInfo> {
    let (folder, path) = vol_in(m, pool, vol)?;
    ensure_absent(&path, pool, vol)?;
    if capacity == 0 {
        return Err(Error::invalid(
            "volume capacity",
            "must be more than 0 bytes",
        ));
    }
    check_capacity(capacity)?;
    let opts = block::CreateOptions {
        format,
        size: Some(capacity),
        backing: None,
        cluster_size: None,
    };
    match block::create_in(&folder, &path, &opts) {
        Ok(()) => {}
        // Not ours: nothing to remove.
        Err(e @ block::ops::CreateError::InFolder(_)) => return Err(block_err(e)),
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            return Err(block_err(e));
        }
    }
    let recorded = match permissions {
        Some(p) => apply_permissions(&path, p),
        None => Ok(()),
    }
    .and_then(|()| m.store().set_volume_format(pool, vol, format));
    if let Err(e) = recorded {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    volume_info(m, pool, vol)
}

pub fn clone_volume(
    m: &dyn PoolHost,
    pool: &str,
    src: &str,
    dst: &str,
    overlay: bool,
    format: Option<Format>,
) -> Result<VolumeInfo> {
    let (folder, from_path) = vol_in(m, pool, src)?;
    let from = volume_info_in(m, &folder, pool, src, &from_path)?;
    let to = folder.path().join(dst);
    check_name("volume name", dst)?;
    ensure_absent(&to, pool, dst)?;
    let new_format = if overlay {
        Format::Qcow2
    } else {
        format.unwrap_or(from.format)
    };
    let r = if overlay {
        if format.is_some_and(|f| f != Format::Qcow2) {
            return Err(Error::invalid("clone", "an overlay is always qcow2"));
        }
        let opts = block::CreateOptions {
            format: Format::Qcow2,
            size: Some(from.capacity),
            backing: Some((src.to_string(), Some(from.format))),
            cluster_size: None,
        };
        block::create_in(&folder, &to, &opts).map_err(block_err)
    } else {
        let opts = block::CreateOptions {
            format: new_format,
            size: None,
            backing: None,
            cluster_size: None,
        };
        block::open_guest_disk_in(&folder, &from.path, Some(from.format), true, false)
            .map_err(block_err)
            .and_then(|s| {
                block::ops::convert_from(s, Some(&folder), &to, &opts, &mut |_, _| {})
                    .map_err(block_err)
            })
    };
    if let Err(e) = r.and_then(|()| m.store().set_volume_format(pool, dst, new_format)) {
        // Only a regular file this call made (never what a link names).
        if std::fs::symlink_metadata(&to).is_ok_and(|t| t.is_file()) {
            let _ = std::fs::remove_file(&to);
        }
        return Err(e);
    }
    volume_info(m, pool, dst)
}

/// Opens a volume's whole chain as a guest would (beneath its pool), only to refuse one
/// whose backing files leave the pool before a domain is defined on it.
pub(crate) fn check_chain(m: &dyn PoolHost, info: &VolumeInfo) -> Result<()> {
    let folder = pool_folder(m, &info.pool)?;
    block::open_guest_disk_in(&folder, &info.path, Some(info.format), true, true)
        .map(drop)
        .map_err(block_err)
}

/// Running domains using a volume.
fn running_users(m: &dyn PoolHost, path: &Path) -> Result<Vec<String>> {
    Ok(m.disk_users(path)?
        .into_iter()
        .filter(|d| m.is_active(d))
        .collect())
}

pub fn resize_volume(m: &dyn PoolHost, pool: &str, vol: &str, capacity: u64) -> Result<VolumeInfo> {
    let info = volume_info(m, pool, vol)?;
    let users = running_users(m, &info.path)?;
    if !users.is_empty() {
        return Err(Error::Conflict(format!(
            "volume {pool}/{vol} is in use by running domain(s) {}: stop them first",
            users.join(", ")
        )));
    }
    if capacity < info.capacity {
        return Err(Error::invalid(
            "volume capacity",
            format!(
                "shrinking ({} to {capacity} bytes) is refused: it loses data",
                info.capacity
            ),
        ));
    }
    check_capacity(capacity)?;
    let folder = pool_folder(m, pool)?;
    block::resize_in(&folder, &info.path, info.format, capacity).map_err(block_err)?;
    volume_info(m, pool, vol)
}

pub fn delete_volume(m: &dyn PoolHost, pool: &str, vol: &str) -> Result<()> {
    let info = volume_info(m, pool, vol)?;
    if !info.used_by.is_empty() {
        return Err(Error::Conflict(format!(
            "volume {pool}/{vol} is in use by domain(s) {}: detach it (redefine the domain) or undefine them first",
            info.used_by.join(", ")
        )));
    }
    let folder = pool_folder(m, pool)?;
    let dir = folder.path();
    for other in volume_files(dir)? {
        if other == vol {
            continue;
        }
        let Ok(Some(f)) = m.store().volume_format(pool, &other) else {
            continue; // raw: names no backing file
        };
        if let Ok(i) = block::info_in(&folder, &dir.join(&other), f) {
            if let Some(b) = i.backing_file {
                if block::resolve_backing(&dir.join(&other), &b) == info.path {
                    return Err(Error::Conflict(format!(
                        "volume {pool}/{vol} is the backing file of {pool}/{other}: delete that first"
                    )));
                }
            }
        }
    }
    std::fs::remove_file(&info.path).map_err(|e| Error::io("deleting", &info.path, e))?;
    m.store().forget_volume(pool, vol)
}

/// Writes guest-visible bytes at `offset` (upload, in chunks).
pub fn write_volume(
    m: &dyn PoolHost,
    pool: &str,
    vol: &str,
    offset: u64,
    data: &[u8],
) -> Result<()> {
    let info = volume_info(m, pool, vol)?;
    if !running_users(m, &info.path)?.is_empty() {
        return Err(Error::Conflict(format!(
            "volume {pool}/{vol} is in use by a running domain"
        )));
    }
    let end = offset
        .checked_add(data.len() as u64)
        .filter(|&e| e <= info.capacity)
        .ok_or_else(|| {
            Error::invalid(
                "upload",
                format!(
                    "{} bytes at offset {offset} go past the volume's capacity ({} bytes)",
                    data.len(),
                    info.capacity
                ),
            )
        })?;
    let _ = end;
    let folder = pool_folder(m, pool)?;
    let mut b = block::open_guest_disk_in(&folder, &info.path, Some(info.format), false, false)
        .map_err(block_err)?;
    b.write_at(offset, data).map_err(block_err)?;
    b.flush().map_err(block_err)
}

/// Reads guest-visible bytes (download, in chunks of at most 16 MiB).
pub fn read_volume(
    m: &dyn PoolHost,
    pool: &str,
    vol: &str,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>> {
    let info = volume_info(m, pool, vol)?;
    if offset > info.capacity {
        return Err(Error::invalid("download", "offset past the volume's end"));
    }
    let n = len.min(info.capacity - offset).min(16 << 20);
    let folder = pool_folder(m, pool)?;
    let mut b = block::open_guest_disk_in(&folder, &info.path, Some(info.format), true, true)
        .map_err(block_err)?;
    let mut buf = vec![0u8; n as usize];
    b.read_at(offset, &mut buf).map_err(block_err)?;
    Ok(buf)
}
