//! Choosing the accelerator: `--accel auto` picks what really works on this host.

use std::sync::Arc;

use emu::EmuHypervisor;
use hypervisor::host::KvmSupport;
use hypervisor::kvm::KvmHypervisor;
use hypervisor::Hypervisor;

use crate::config::Accel;

#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    #[error("--accel kvm: {0}")]
    KvmUnavailable(String),
    #[error("--accel hybrid needs /dev/kvm for guest user code: {0}")]
    HybridUnavailable(String),
    #[error("opening KVM: {0}")]
    Kvm(#[from] hypervisor::Error),
}

/// The accelerator picked, and a line for the user when the choice deserves one.
pub struct Choice {
    pub hypervisor: Arc<dyn Hypervisor>,
    pub note: Option<String>,
}

impl std::fmt::Debug for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Choice")
            .field("hypervisor", &self.hypervisor.name())
            .field("note", &self.note)
            .finish()
    }
}

pub fn choose(requested: Accel) -> Result<Choice, AccelError> {
    choose_with(requested, KvmSupport::probe())
}

pub fn choose_with(requested: Accel, kvm: KvmSupport) -> Result<Choice, AccelError> {
    match (requested, kvm) {
        (Accel::Auto, KvmSupport::Native) | (Accel::Kvm, KvmSupport::Native) => Ok(Choice {
            hypervisor: Arc::new(KvmHypervisor::new()?),
            note: None,
        }),
        (Accel::Auto, KvmSupport::Slow(why)) | (Accel::Auto, KvmSupport::Unavailable(why)) => {
            Ok(Choice {
                hypervisor: Arc::new(EmuHypervisor::new()),
                note: Some(format!(
                    "accel auto: using emu (Vessel's software CPU): {why}"
                )),
            })
        }
        (Accel::Kvm, KvmSupport::Slow(why)) => Ok(Choice {
            hypervisor: Arc::new(KvmHypervisor::new()?),
            note: Some(format!(
                "warning: --accel kvm forced: {why}; a guest kernel will run very slowly"
            )),
        }),
        (Accel::Kvm, KvmSupport::Unavailable(why)) => Err(AccelError::KvmUnavailable(why)),
        (Accel::Emu, _) => Ok(Choice {
            hypervisor: Arc::new(EmuHypervisor::new()),
            note: None,
        }),
        (Accel::Hybrid, KvmSupport::Unavailable(why)) => Err(AccelError::HybridUnavailable(why)),
        (Accel::Hybrid, _) => Ok(Choice {
            hypervisor: Arc::new(EmuHypervisor::hybrid()),
            note: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_emu_over_a_slow_kvm_and_says_why() {
        let c = choose_with(Accel::Auto, KvmSupport::Slow("PVM host".into())).unwrap();
        assert_eq!(c.hypervisor.name(), "emu");
        let note = c.note.unwrap();
        assert!(note.contains("PVM host") && note.contains("emu"), "{note}");
        let c = choose_with(Accel::Auto, KvmSupport::Unavailable("no /dev/kvm".into())).unwrap();
        assert_eq!(c.hypervisor.name(), "emu");
    }

    #[test]
    fn forced_kvm_on_a_slow_host_runs_with_a_warning() {
        // Only where /dev/kvm opens (this project's machines): the choice is KVM anyway.
        let c = choose_with(Accel::Kvm, KvmSupport::Slow("PVM host".into())).unwrap();
        assert_eq!(c.hypervisor.name(), "kvm");
        assert!(c.note.unwrap().starts_with("warning"));
    }

    #[test]
    fn hybrid_is_only_chosen_when_asked_for_and_needs_kvm() {
        let c = choose_with(Accel::Hybrid, KvmSupport::Slow("PVM host".into())).unwrap();
        assert_eq!(c.hypervisor.name(), "hybrid");
        let c = choose_with(Accel::Auto, KvmSupport::Slow("PVM host".into())).unwrap();
        assert_eq!(c.hypervisor.name(), "emu");
        let e = choose_with(Accel::Hybrid, KvmSupport::Unavailable("no /dev/kvm".into()));
        assert!(matches!(e, Err(AccelError::HybridUnavailable(_))));
        assert_eq!("hybrid".parse::<Accel>(), Ok(Accel::Hybrid));
    }

    #[test]
    fn forced_kvm_without_device_is_an_error() {
        let e = choose_with(Accel::Kvm, KvmSupport::Unavailable("no /dev/kvm".into()));
        assert!(matches!(e, Err(AccelError::KvmUnavailable(_))));
    }
}
