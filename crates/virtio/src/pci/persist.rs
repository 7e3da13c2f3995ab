//! A virtio-pci function's state in a snapshot: the device core, the configuration
//! space's writable bits (where the guest placed BAR 0, the command register, the MSI-X
//! and access-window controls), the MSI-X table and pending bits, the vectors the driver
//! chose, the INTx level, and the driver's register selections. A restore places the
//! notify ioevents where BAR 0 decodes again.

use std::sync::atomic::Ordering;

use devices::pci::msix::MsixSnapshot;
use serde::{Deserialize, Serialize};

use super::{PciTransport, NO_VECTOR};
use crate::transport::{CoreSnapshot, RestoreError};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciSnapshot {
    pub core: CoreSnapshot,
    /// The 4 KiB configuration space.
    pub config: Vec<u8>,
    pub msix: MsixSnapshot,
    pub config_vector: u16,
    pub queue_vectors: Vec<u16>,
    pub intx_asserted: bool,
    pub intx_disabled: bool,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u16,
}

fn refused(core: &CoreSnapshot, why: String) -> RestoreError {
    RestoreError::Transport {
        device_type: core.device_type,
        why,
    }
}

impl PciTransport {
    /// The function's state, for a snapshot of a paused VM.
    pub fn snapshot(&self) -> PciSnapshot {
        let v = self.interrupt.vectors();
        PciSnapshot {
            core: self.core.snapshot(),
            config: self.config.snapshot(),
            msix: self.interrupt.msix().snapshot(),
            config_vector: v.config,
            queue_vectors: v.queues.clone(),
            intx_asserted: self.interrupt.intx_asserted.load(Ordering::Acquire),
            intx_disabled: self.interrupt.intx_disabled.load(Ordering::Acquire),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
        }
    }

    /// Puts the function in the state `snap` describes, before the VM runs and before it
    /// goes on the PCI bus (which then decodes its BARs where they were). Nothing changes
    /// when it is refused.
    pub fn restore(&mut self, snap: &PciSnapshot) -> Result<(), RestoreError> {
        let queues = self.interrupt.vectors().queues.len();
        if snap.queue_vectors.len() != queues {
            return Err(refused(
                &snap.core,
                format!(
                    "{} queue vectors for {queues} queues",
                    snap.queue_vectors.len()
                ),
            ));
        }
        // Everything that can refuse, before anything changes.
        if snap.config.len() != devices::pci::config::CONFIG_SIZE {
            return Err(refused(
                &snap.core,
                format!("a configuration space of {} bytes", snap.config.len()),
            ));
        }
        {
            let msix = self.interrupt.msix();
            let pba = (msix.pba_size() / 8) as usize;
            if snap.msix.entries.len() != usize::from(msix.len()) || snap.msix.pending.len() != pba
            {
                return Err(refused(
                    &snap.core,
                    format!(
                        "an MSI-X table of {} vectors for {}",
                        snap.msix.entries.len(),
                        msix.len()
                    ),
                ));
            }
        }
        self.core.restore(&snap.core)?;
        self.config
            .restore(&snap.config)
            .map_err(|e| refused(&snap.core, e.to_string()))?;
        self.interrupt
            .msix()
            .restore(&snap.msix)
            .map_err(|e| refused(&snap.core, e.to_string()))?;
        let valid = |v: u16| {
            if v < snap.msix.entries.len() as u16 {
                v
            } else {
                NO_VECTOR
            }
        };
        {
            let mut v = self.interrupt.vectors();
            v.config = valid(snap.config_vector);
            for (q, &s) in v.queues.iter_mut().zip(&snap.queue_vectors) {
                *q = valid(s);
            }
        }
        // The line's level is in the interrupt controller's own state.
        self.interrupt
            .intx_asserted
            .store(snap.intx_asserted, Ordering::Release);
        self.interrupt
            .intx_disabled
            .store(snap.intx_disabled, Ordering::Release);
        self.device_features_sel = snap.device_features_sel;
        self.driver_features_sel = snap.driver_features_sel;
        self.queue_sel = snap.queue_sel;
        // The notify ioevents go where BAR 0 decodes now.
        if let (Some(base), Some(f)) = (self.bar_base(), self.bar_moved.as_mut()) {
            f(None, Some(base));
        }
        Ok(())
    }
}
