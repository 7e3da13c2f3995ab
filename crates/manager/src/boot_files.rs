//! Issue 22: the files a domain boots from besides its disks (kernel, initrd, firmware,
//! option ROMs, cloud-init files, the UEFI variable store and its template), opened once
//! at each start and handed to the VMM open.
//!
//! A client's right to each of these names is checked at define, but the VMM (or the
//! daemon, for QEMU's cloud-init seed) reads them with its own rights at every start: a
//! link or a rename swapped in later would be followed. So define records where each
//! name led (links followed) and which file it was ([`FileId`]: device, inode, birth
//! time, and for files nobody writes their size and modification time), and each start
//! opens each name once, refuses one that now leads elsewhere or to another file, and
//! hands the open file over ([`vmm::config::VmConfig::opened`]): the VMM reads it from
//! that descriptor, QEMU through `/proc/self/fd/N`, and nothing of it is opened by name
//! again.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmm::file_identity::FileId;

use crate::domain::DomainDef;
use crate::error::{Error, Result};

/// Where one boot file's name led when define recorded it, and which file that was.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Stored")]
pub struct BootFile {
    pub real: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<FileId>,
}

/// A record as stored: the resolved path alone in definitions older than identities.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stored {
    Path(PathBuf),
    Full {
        real: PathBuf,
        #[serde(default)]
        id: Option<FileId>,
    },
}

impl From<Stored> for BootFile {
    fn from(s: Stored) -> BootFile {
        match s {
            Stored::Path(real) => BootFile { real, id: None },
            Stored::Full { real, id } => BootFile { real, id },
        }
    }
}

/// How the VMM uses a boot file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Use {
    /// Read only, and nobody should write it: its content is part of its identity.
    Read,
    /// Read only, and used only when it exists (the variable template beside UEFI code).
    ReadIfThere,
    /// Written in place by the guest (the UEFI variable store), made from the template at
    /// the first start when it does not exist.
    Store,
}

/// The files `vm` boots from besides its disks, each once, with how each is used.
fn files(vm: &vmm::VmConfig) -> Vec<(PathBuf, Use)> {
    let mut out: Vec<(PathBuf, Use)> = Vec::new();
    let read = vm
        .kernel
        .iter()
        .chain(&vm.initrd)
        .chain(&vm.firmware)
        .chain(&vm.option_roms)
        .cloned()
        .chain(
            vm.cloud_init
                .iter()
                .flat_map(|c| c.files().map(Path::to_path_buf)),
        )
        .map(|p| (p, Use::Read));
    let template = vm
        .firmware
        .as_deref()
        .and_then(vmm::config::uefi_vars_template)
        .map(|t| (t, Use::ReadIfThere));
    let store = vm.firmware_vars.clone().map(|v| (v, Use::Store));
    for (p, u) in read.chain(template).chain(store) {
        if !out.iter().any(|(q, _)| *q == p) {
            out.push((p, u));
        }
    }
    out
}

/// The files `vm` boots from besides its disks, each once.
pub fn names(vm: &vmm::VmConfig) -> Vec<PathBuf> {
    files(vm).into_iter().map(|(p, _)| p).collect()
}

/// `path` opened (a FIFO swapped in does not block; `write` for the variable store), and
/// where and which the open file is, read from its descriptor: the name is not looked up
/// twice.
fn open(path: &Path, how: Use, write: bool) -> std::io::Result<(File, BootFile)> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let real = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))?;
    let id = FileId::of(&meta, how != Use::Store);
    Ok((f, BootFile { real, id: Some(id) }))
}

/// Records where each boot file of `def` leads now and which file it is, replacing
/// whatever the definition gave; refuses a definition naming descriptors (`vm.opened`
/// is the manager's to set). A name that cannot be opened now is not recorded (the
/// start opens it as it is then: a variable store made at the first start is recorded
/// then, [`open_checked`]).
pub fn record_all(def: &mut DomainDef) -> Result<()> {
    if let Some(o) = def.vm.opened.first() {
        return Err(Error::invalid(
            "domain",
            format!(
                "{}: \"opened\" is for the manager to set when it starts a VMM, not for a \
                 definition",
                o.path.display()
            ),
        ));
    }
    def.boot_files = files(&def.vm)
        .into_iter()
        .filter_map(|(p, how)| {
            // Opened for reading only: define writes nothing.
            let (_, rec) = open(&p, how, false).ok()?;
            Some((crate::disk_chain::key(&p), rec))
        })
        .collect::<BTreeMap<_, _>>();
    Ok(())
}

/// Opens each boot file of `def` for this start, refuses one that no longer leads where
/// define recorded or is another file than the one recorded, and names the open files in
/// `def.vm.opened`; the caller keeps the returned files open until the VMM has started
/// (it inherits them, [`crate::driver::inherit_fds`]). A UEFI variable store that does
/// not exist yet is made here from the (checked, open) template, created without
/// following a link, and its record is added to `def.boot_files`: the caller stores it,
/// so later starts check it as they check the rest. Returns the files and whether a
/// record was added.
pub fn open_checked(def: &mut DomainDef) -> Result<(Vec<File>, bool)> {
    def.vm.opened.clear();
    let mut held: Vec<File> = Vec::new();
    let mut added = false;
    let refuse = |p: &Path, e: &dyn std::fmt::Display| {
        Error::invalid("domain", format!("{}: {e}", p.display()))
    };
    for (p, how) in files(&def.vm) {
        let key = crate::disk_chain::key(&p);
        let recorded = def.boot_files.get(&key).cloned();
        let opened = match open(&p, how, how == Use::Store) {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && recorded.is_none() => match how {
                Use::Read => return Err(refuse(&p, &e)),
                Use::ReadIfThere => continue,
                Use::Store => {
                    let made = make_store(def, &p).map_err(|e| refuse(&p, &e))?;
                    def.boot_files.insert(key, made.1.clone());
                    added = true;
                    made
                }
            },
            Err(e) => return Err(refuse(&p, &e)),
        };
        let (f, now) = opened;
        if let Some(rec) = recorded {
            let why = if rec.real != now.real {
                Some(format!(
                    "now leads to {}, not to {} as when the domain was defined",
                    now.real.display(),
                    rec.real.display()
                ))
            } else {
                match (&rec.id, &now.id) {
                    (Some(r), Some(n)) if !r.matches(n) => Some(format!(
                        "is not the file recorded when the domain was defined ({})",
                        r.difference(n)
                    )),
                    _ => None,
                }
            };
            if let Some(why) = why {
                return Err(Error::invalid(
                    "domain",
                    format!(
                        "{} {why}: the files a domain boots from are fixed at define \
                         (define the domain again to take the new file)",
                        p.display(),
                    ),
                ));
            }
        }
        def.vm.opened.push(vmm::config::OpenedFile {
            fd: f.as_raw_fd(),
            path: p,
        });
        held.push(f);
    }
    Ok((held, added))
}

/// Makes the UEFI variable store `vars` of `def` from the template beside its code (read
/// from the descriptor already opened and checked for it), as a new file (never through
/// a link, never over a file that appeared meanwhile), and returns it open.
fn make_store(def: &DomainDef, vars: &Path) -> std::io::Result<(File, BootFile)> {
    use std::os::unix::fs::OpenOptionsExt;
    let template = def
        .vm
        .firmware
        .as_deref()
        .and_then(vmm::config::uefi_vars_template)
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no variable store, and no OVMF_VARS template beside the UEFI code to make one",
            )
        })?;
    let bytes = def.vm.read_named(&template).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("the template {}: {e}", template.display()),
        )
    })?;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(vars)?;
    std::io::Write::write_all(&mut f, &bytes)?;
    let real = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))?;
    let id = FileId::of(&f.metadata()?, false);
    Ok((f, BootFile { real, id: Some(id) }))
}

/// The name QEMU opens for `path`: `/proc/self/fd/N` when it was handed over (QEMU
/// reopens the inherited file, not the name), else the name.
pub fn qemu_name(vm: &vmm::VmConfig, path: &Path) -> PathBuf {
    match vm.opened_file(path) {
        Some(o) => PathBuf::from(format!("/proc/self/fd/{}", o.fd)),
        None => path.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boot_file_swapped_after_define_is_refused_and_the_opened_one_is_handed_over() {
        let dir = std::env::temp_dir().join(format!("vessel-bootf-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("vmlinuz");
        let initrd = dir.join("initrd");
        std::fs::write(&kernel, b"THE KERNEL").unwrap();
        std::fs::write(&initrd, b"THE INITRD").unwrap();
        let mut def: DomainDef = serde_json::from_value(serde_json::json!({
            "name": "b", "vm": {"kernel": kernel, "initrd": initrd}}))
        .unwrap();
        record_all(&mut def).unwrap();
        assert_eq!(def.boot_files.len(), 2);
        let mut started = def.clone();
        let (held, recorded_now) = open_checked(&mut started).unwrap();
        assert!(!recorded_now);
        assert_eq!(held.len(), 2);
        assert_eq!(started.vm.opened.len(), 2);
        // Renamed away and replaced after the open: the handed-over file is the checked one.
        std::fs::rename(&kernel, dir.join("vmlinuz.old")).unwrap();
        std::fs::write(&kernel, b"ANOTHER").unwrap();
        assert_eq!(started.vm.read_named(&kernel).unwrap(), b"THE KERNEL");
        assert_eq!(
            qemu_name(&started.vm, &kernel),
            PathBuf::from(format!("/proc/self/fd/{}", held[0].as_raw_fd()))
        );
        drop(held);
        // A link swapped in for a recorded name fails the next start.
        std::fs::remove_file(&initrd).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, b"SECRET").unwrap();
        std::os::unix::fs::symlink(&secret, &initrd).unwrap();
        let mut again = def.clone();
        let e = open_checked(&mut again).unwrap_err().to_string();
        assert!(e.contains("fixed at define"), "{e}");
        // Renamed away and replaced by a regular file with the same bytes: another file.
        let kdef = {
            let mut d = def.clone();
            d.vm.initrd = None;
            d
        };
        std::fs::rename(&kernel, dir.join("vmlinuz.new")).unwrap();
        std::fs::rename(dir.join("vmlinuz.old"), &kernel).unwrap();
        // The recorded kernel back in its place: it starts.
        open_checked(&mut kdef.clone()).unwrap();
        std::fs::rename(&kernel, dir.join("vmlinuz.old")).unwrap();
        std::fs::copy(dir.join("vmlinuz.old"), &kernel).unwrap();
        let e = open_checked(&mut kdef.clone()).unwrap_err().to_string();
        assert!(
            e.contains("another file is there now") && e.contains("fixed at define"),
            "{e}"
        );
        std::fs::rename(dir.join("vmlinuz.old"), &kernel).unwrap();
        // A FIFO does not block the start.
        std::fs::remove_file(&initrd).unwrap();
        let c = std::ffi::CString::new(initrd.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path it is given.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_checked(&mut def.clone()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        // Definitions may not name descriptors.
        let mut bad = def.clone();
        bad.vm.opened.push(vmm::config::OpenedFile {
            fd: 5,
            path: kernel.clone(),
        });
        let e = record_all(&mut bad).unwrap_err().to_string();
        assert!(e.contains("\"opened\""), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The UEFI variable store: made at the first start from the template beside the code
    /// (read through its checked descriptor), handed over writable, recorded then, and
    /// refused at a later start once another file is put in its place.
    #[test]
    fn a_uefi_variable_store_is_made_recorded_and_handed_over_writable() {
        let dir = std::env::temp_dir().join(format!("vessel-vars-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let code = dir.join("OVMF_CODE.fd");
        std::fs::write(&code, b"CODE").unwrap();
        std::fs::write(dir.join("OVMF_VARS.fd"), b"TEMPLATE VARS").unwrap();
        let vars = dir.join("efi_VARS.fd");
        let mut def: DomainDef = serde_json::from_value(serde_json::json!({
            "name": "u", "vm": {"firmware": code, "firmware_vars": vars}}))
        .unwrap();
        record_all(&mut def).unwrap();
        // Code and template recorded; the store does not exist yet.
        assert_eq!(def.boot_files.len(), 2, "{:?}", def.boot_files);
        let mut started = def.clone();
        let (held, recorded_now) = open_checked(&mut started).unwrap();
        assert!(recorded_now, "the store made at this start is recorded");
        assert_eq!(held.len(), 3);
        assert_eq!(std::fs::read(&vars).unwrap(), b"TEMPLATE VARS");
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&vars).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let f = started.vm.open_named_writable(&vars).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"GUEST", 0).unwrap();
        assert_eq!(&std::fs::read(&vars).unwrap()[..5], b"GUEST");
        drop((f, held));
        // Written by the guest, it is still the recorded store.
        let mut next = started.clone();
        next.vm.opened.clear();
        open_checked(&mut next).unwrap();
        // Another file in its place: refused.
        std::fs::rename(&vars, dir.join("old")).unwrap();
        std::fs::copy(dir.join("old"), &vars).unwrap();
        let mut next = started.clone();
        let e = open_checked(&mut next).unwrap_err().to_string();
        assert!(
            e.contains("efi_VARS.fd") && e.contains("another file"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
