//! Issue 22: the files a domain boots from besides its disks (kernel, initrd, firmware,
//! option ROMs, cloud-init files), opened once at each start and handed to the VMM open.
//!
//! A client's right to each of these names is checked at define, but the VMM (or the
//! daemon, for QEMU's cloud-init seed) reads them with its own rights at every start: a
//! link or a rename swapped in later would be followed. So define records where each
//! name led (links followed), and each start opens each name once, refuses one that now
//! leads elsewhere, and hands the open file over ([`vmm::config::VmConfig::opened`]):
//! the VMM reads it from that descriptor, QEMU through `/proc/self/fd/N`, and nothing of
//! it is opened by name again.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::domain::DomainDef;
use crate::error::{Error, Result};

/// The files `vm` boots from besides its disks, each once.
pub fn names(vm: &vmm::VmConfig) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    let all = vm
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
        );
    for p in all {
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// `path` opened for reading (a FIFO swapped in does not block), and where the open file
/// is, read from its descriptor: the name is not looked up twice.
fn open(path: &Path) -> std::io::Result<(File, PathBuf)> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let real = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))?;
    Ok((f, real))
}

/// Records where each boot file of `def` leads now, replacing whatever the definition
/// gave; refuses a definition naming descriptors (`vm.opened` is the manager's to set).
/// A name that cannot be opened now is not recorded (the start opens it as it is then).
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
    def.boot_files = names(&def.vm)
        .into_iter()
        .filter_map(|p| {
            let (_, real) = open(&p).ok()?;
            Some((crate::disk_chain::key(&p), real))
        })
        .collect::<BTreeMap<_, _>>();
    Ok(())
}

/// Opens each boot file of `def` for this start, refuses one that no longer leads where
/// define recorded, and names the open files in `def.vm.opened`; the caller keeps the
/// returned files open until the VMM has started (it inherits them,
/// [`crate::driver::inherit_fds`]). A riscv64 VM is left as it is: its machine reads
/// its files by name.
pub fn open_checked(def: &mut DomainDef) -> Result<Vec<File>> {
    def.vm.opened.clear();
    if def.vm.arch == vmm::config::Arch::Riscv64 {
        return Ok(Vec::new());
    }
    let mut held = Vec::new();
    for p in names(&def.vm) {
        let (f, real) = match open(&p) {
            Ok(x) => x,
            Err(e) => return Err(Error::invalid("domain", format!("{}: {e}", p.display()))),
        };
        if let Some(recorded) = def.boot_files.get(&crate::disk_chain::key(&p)) {
            if *recorded != real {
                return Err(Error::invalid(
                    "domain",
                    format!(
                        "{} now leads to {}, not to {} as when the domain was defined: the \
                         files a domain boots from are fixed at define (define the domain \
                         again to take the new file)",
                        p.display(),
                        real.display(),
                        recorded.display()
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
    Ok(held)
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
        let held = open_checked(&mut started).unwrap();
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
}
