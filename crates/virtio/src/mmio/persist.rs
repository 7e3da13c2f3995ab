//! A virtio-mmio transport's state in a snapshot: the device core and the driver's
//! register selections.

use serde::{Deserialize, Serialize};

use super::MmioTransport;
use crate::transport::{CoreSnapshot, RestoreError};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioSnapshot {
    pub core: CoreSnapshot,
    pub queue_sel: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
}

impl MmioTransport {
    /// The transport's state, for a snapshot of a paused VM.
    pub fn snapshot(&self) -> MmioSnapshot {
        MmioSnapshot {
            core: self.core.snapshot(),
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
        }
    }

    /// Puts the transport in the state `snap` describes, before the VM runs.
    pub fn restore(&mut self, snap: &MmioSnapshot) -> Result<(), RestoreError> {
        self.core.restore(&snap.core)?;
        self.queue_sel = snap.queue_sel;
        self.device_features_sel = snap.device_features_sel;
        self.driver_features_sel = snap.driver_features_sel;
        Ok(())
    }
}
