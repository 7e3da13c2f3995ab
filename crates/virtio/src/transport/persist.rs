//! A device core's state in a snapshot: its queues (addresses, sizes, ring indices),
//! the negotiated features, the status and the interrupt status. Taken with the VM
//! paused, when no request is in flight (the I/O gate is closed and every round
//! publishes what it took before it ends), so the rings in guest memory and these
//! indices agree. A snapshot is untrusted input: a restore checks every queue as the
//! driver's own set-up would be checked, and refuses a device of another type, with
//! other queues, or with features this device does not offer.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::{status, DeviceCore};
use crate::VIRTIO_RING_F_EVENT_IDX;

/// One virtqueue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A frame a NIC holds for its driver ([`crate::VirtioDevice::held_frames`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldFrame {
    /// The queue pair whose receive queue it waits for.
    pub pair: u16,
    /// The frame as the host gave it, its virtio-net header first; hex in the JSON.
    #[serde(with = "hex::serde")]
    pub bytes: Vec<u8>,
}

/// A device and its queues, whatever the transport.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoreSnapshot {
    pub device_type: u32,
    pub queues: Vec<QueueSnapshot>,
    /// Per queue, the used index at the last interrupt decision.
    pub signalled: Vec<u16>,
    pub driver_features: u64,
    pub status: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    /// How many queue pairs the driver uses (a multi-queue NIC's VQ_PAIRS_SET); absent
    /// for other devices, and in snapshots from before it was saved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_pairs: Option<u16>,
    /// Frames the device held for the driver (a NIC's); absent when none, and in
    /// snapshots from before they were kept (whose held frame was dropped).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_frames: Vec<HeldFrame>,
    /// What the device keeps beyond its queues ([`crate::VirtioDevice::device_state`]);
    /// absent for devices that keep nothing more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_state: Option<DeviceState>,
}

/// Device-specific state a snapshot carries beside the queues, by device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    Balloon(crate::balloon::BalloonState),
}

/// Why a device refused a snapshot's state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RestoreError {
    #[error("the snapshot has a device of type {snapshot} where this VM has type {device}")]
    DeviceType { device: u32, snapshot: u32 },
    #[error(
        "the snapshot's device of type {device_type} has {snapshot} queues, this one {device}"
    )]
    QueueCount {
        device_type: u32,
        device: usize,
        snapshot: usize,
    },
    #[error("queue {index} of the snapshot's device of type {device_type}: {why}")]
    Queue {
        device_type: u32,
        index: usize,
        why: String,
    },
    #[error(
        "the snapshot's device of type {device_type} uses {pairs} queue pairs, more than it has"
    )]
    QueuePairs { device_type: u32, pairs: u16 },
    #[error("the snapshot's transport of the device of type {device_type}: {why}")]
    Transport { device_type: u32, why: String },
    #[error("the snapshot's device of type {device_type} acked features {features:#x} this device does not offer")]
    Features { device_type: u32, features: u64 },
    #[error("the snapshot's device of type {device_type} held frames this one cannot: {why}")]
    HeldFrames { device_type: u32, why: String },
    #[error("the snapshot's device of type {device_type} has state this one cannot take: {why}")]
    DeviceState { device_type: u32, why: String },
}

impl DeviceCore {
    /// The device's state, for a snapshot of a paused VM.
    pub fn snapshot(&self) -> CoreSnapshot {
        let _in_flight = self.lock_all_in_flight();
        // Requests a vCPU took off a ring and left for the I/O thread, which the paused
        // VM's gate keeps out: completed now, or the snapshot would lose them.
        for index in 0..self.in_flight.len() {
            self.finish_deferred(index);
        }
        let st = self.lock();
        CoreSnapshot {
            device_type: self.device_type,
            queues: st.queues.iter().map(|q| q.state().into()).collect(),
            signalled: st.signalled.clone(),
            driver_features: st.driver_features,
            status: st.status,
            config_generation: st.config_generation,
            interrupt_status: self.interrupt_status.load(Ordering::Acquire),
            queue_pairs: st.device.queue_pairs_in_use(),
            held_frames: st.device.held_frames(),
            device_state: st.device.device_state(),
        }
    }

    /// Puts the device in the state `snap` describes, before the VM runs. Nothing
    /// changes when it is refused.
    pub fn restore(&self, snap: &CoreSnapshot) -> Result<(), RestoreError> {
        let device_type = self.device_type;
        if snap.device_type != device_type {
            return Err(RestoreError::DeviceType {
                device: device_type,
                snapshot: snap.device_type,
            });
        }
        if snap.driver_features & !self.offered != 0 {
            return Err(RestoreError::Features {
                device_type,
                features: snap.driver_features,
            });
        }
        let mut st = self.lock();
        if snap.queues.len() != st.queues.len() || snap.signalled.len() != st.queues.len() {
            return Err(RestoreError::QueueCount {
                device_type,
                device: st.queues.len(),
                snapshot: snap.queues.len(),
            });
        }
        if let Some(pairs) = snap
            .queue_pairs
            .filter(|&n| n == 0 || 2 * usize::from(n) > st.queues.len())
        {
            return Err(RestoreError::QueuePairs { device_type, pairs });
        }
        let mut queues = Vec::with_capacity(snap.queues.len());
        for (index, (q, have)) in snap.queues.iter().zip(&st.queues).enumerate() {
            let bad = |why: String| RestoreError::Queue {
                device_type,
                index,
                why,
            };
            if q.max_size != have.max_size() {
                return Err(bad(format!(
                    "maximum size {} where this device has {}",
                    q.max_size,
                    have.max_size()
                )));
            }
            let queue = Queue::try_from(QueueState::from(*q)).map_err(|e| bad(e.to_string()))?;
            queues.push(queue);
        }
        // The last checks: each device-specific part is taken whole or refused; no
        // device has both parts.
        if let Some(state) = &snap.device_state {
            st.device
                .restore_device_state(state)
                .map_err(|why| RestoreError::DeviceState { device_type, why })?;
        }
        st.device
            .hold_frames(&snap.held_frames)
            .map_err(|why| RestoreError::HeldFrames { device_type, why })?;
        st.queues = queues;
        st.signalled = snap.signalled.clone();
        st.driver_features = snap.driver_features;
        st.status = snap.status;
        st.config_generation = snap.config_generation;
        if snap.status & status::FEATURES_OK != 0 {
            // What the device learnt from the driver's features (offloads on a TAP).
            st.device.ack_features(snap.driver_features);
            let event_idx = snap.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
            for q in &mut st.queues {
                q.set_event_idx(event_idx);
            }
            // After the features (which go back to one pair): the pairs the driver chose.
            if let Some(pairs) = snap.queue_pairs {
                st.device.use_queue_pairs(pairs);
            }
        }
        self.interrupt_status
            .store(snap.interrupt_status, Ordering::Release);
        Ok(())
    }

    /// The device's host descriptors for a migration's destination on this host.
    pub fn host_handles(&self) -> std::io::Result<Option<crate::HostHandle>> {
        self.lock().device.host_handles()
    }

    /// Once a restored VM is built, before its vCPUs run: runs the queue the device asks
    /// for to tell a running driver about the move ([`crate::VirtioDevice::restored`]).
    pub fn after_restore(&self) {
        let queues = {
            let mut st = self.lock();
            if st.status & status::DRIVER_OK == 0 {
                return;
            }
            st.device.restored()
        };
        for q in queues {
            self.process_queue(q);
        }
    }
}
