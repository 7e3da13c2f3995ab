//! What this host's `/dev/kvm` can really do, for `--accel auto`.
//!
//! A KVM device node is not enough: on a PVM host (module `kvm_pvm`, no VT-x/AMD-V) guest
//! CPL0 code is emulated by the host kernel at about a million instructions per second, so
//! a stock kernel would take hours to boot. The probe reads the same facts a person would.

use std::path::Path;

/// The verdict on the host's KVM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvmSupport {
    /// Hardware virtualization: guests run at native speed.
    Native,
    /// `/dev/kvm` works, but only through a slow path; the string says why.
    Slow(String),
    /// No usable `/dev/kvm`; the string says why.
    Unavailable(String),
}

impl KvmSupport {
    /// Probe the running host.
    pub fn probe() -> Self {
        Self::probe_with(
            Path::new("/dev/kvm"),
            Path::new("/sys/module"),
            &std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default(),
        )
    }

    /// Probe with explicit inputs (tests feed fake ones).
    pub fn probe_with(dev_kvm: &Path, sys_module: &Path, cpuinfo: &str) -> Self {
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev_kvm)
        {
            return KvmSupport::Unavailable(format!("cannot open {}: {e}", dev_kvm.display()));
        }
        if sys_module.join("kvm_pvm").exists() {
            return KvmSupport::Slow(
                "KVM here is a PVM host (module kvm_pvm, no VT-x/AMD-V): guest kernel code is \
                 emulated by the host at about 1 MIPS"
                    .to_string(),
            );
        }
        let flags = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .unwrap_or_default();
        let has_hw = flags
            .split_whitespace()
            .any(|f| f == "vmx" || f == "svm" || f == "hypervisor-vmx");
        if has_hw {
            KvmSupport::Native
        } else if sys_module.join("kvm_intel").exists() || sys_module.join("kvm_amd").exists() {
            // Nested setups sometimes hide the flag while the module works.
            KvmSupport::Native
        } else {
            KvmSupport::Slow(
                "no VT-x/AMD-V in /proc/cpuinfo and no kvm_intel/kvm_amd module: KVM cannot run \
                 guest kernel code natively"
                    .to_string(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_host(modules: &[&str]) -> (tempdir::Dir, std::path::PathBuf) {
        let dir = tempdir::Dir::new();
        let dev = dir.path().join("kvm");
        std::fs::write(&dev, b"").unwrap();
        let sys = dir.path().join("module");
        for m in modules {
            std::fs::create_dir_all(sys.join(m)).unwrap();
        }
        (dir, dev)
    }

    #[test]
    fn pvm_module_means_slow_even_with_a_device_node() {
        let (dir, dev) = fake_host(&["kvm", "kvm_pvm"]);
        let v = KvmSupport::probe_with(&dev, &dir.path().join("module"), "flags : fpu vme");
        assert!(
            matches!(v, KvmSupport::Slow(ref why) if why.contains("kvm_pvm")),
            "{v:?}"
        );
    }

    #[test]
    fn vmx_flag_means_native() {
        let (dir, dev) = fake_host(&["kvm", "kvm_intel"]);
        let v = KvmSupport::probe_with(&dev, &dir.path().join("module"), "flags : fpu vmx sse");
        assert_eq!(v, KvmSupport::Native);
    }

    #[test]
    fn missing_node_is_unavailable() {
        let (dir, _) = fake_host(&[]);
        let v = KvmSupport::probe_with(&dir.path().join("nope"), dir.path(), "");
        assert!(matches!(v, KvmSupport::Unavailable(_)));
    }

    /// A tiny self-deleting temporary folder, to keep dev-dependencies at zero.
    mod tempdir {
        pub struct Dir(std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "vessel-host-probe-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }
}
