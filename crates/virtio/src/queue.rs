//! Walking descriptor chains with the checks virtio-queue leaves to devices: loops and
//! lengths that overflow.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// The chain's descriptors, split into driver-readable and device-writable parts.
#[derive(Debug, Default)]
pub struct Chain {
    pub head: u16,
    pub readable: Vec<Descriptor>,
    pub writable: Vec<Descriptor>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("chain does not end within the queue's {0} descriptors (a loop or a bad next index)")]
    Unterminated(u16),
    #[error("chain lengths overflow 32 bits")]
    LengthOverflow,
    #[error("a readable descriptor follows a writable one")]
    ReadableAfterWritable,
    #[error("descriptor at {addr:#x} (+{len:#x}) is outside guest memory")]
    OutOfBounds { addr: u64, len: u32 },
}

impl Chain {
    /// Collect and check a chain popped from a queue of `queue_size`.
    pub fn collect(
        chain: DescriptorChain<&GuestMemoryMmap>,
        queue_size: u16,
        mem: &GuestMemoryMmap,
    ) -> Result<Chain, ChainError> {
        use vm_memory::GuestMemoryBackend;
        let mut out = Chain {
            head: chain.head_index(),
            ..Chain::default()
        };
        let mut total: u32 = 0;
        let mut count: u32 = 0;
        let mut last_has_next = false;
        for d in chain {
            count += 1;
            last_has_next = d.has_next();
            total = total
                .checked_add(d.len())
                .ok_or(ChainError::LengthOverflow)?;
            if d.len() > 0 && !mem.check_range(d.addr(), d.len() as usize) {
                return Err(ChainError::OutOfBounds {
                    addr: d.addr().0,
                    len: d.len(),
                });
            }
            if d.is_write_only() {
                out.writable.push(d);
            } else if out.writable.is_empty() {
                out.readable.push(d);
            } else {
                return Err(ChainError::ReadableAfterWritable);
            }
        }
        // virtio-queue stops a chain after queue-size descriptors or at a next index past
        // the table; a last descriptor that still points onward is one of those.
        if last_has_next || count == 0 {
            return Err(ChainError::Unterminated(queue_size));
        }
        Ok(out)
    }
}

/// Copy the bytes of `descs` out of guest memory (at most `limit`).
pub fn gather(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    limit: u64,
) -> Result<Vec<u8>, crate::DeviceError> {
    let total: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
    if total > limit {
        return Err(crate::DeviceError::BadRequest(
            "request larger than the device accepts",
        ));
    }
    let mut out = vec![0u8; total as usize];
    let mut at = 0usize;
    for d in descs {
        let n = d.len() as usize;
        mem.read_slice(&mut out[at..at + n], d.addr())
            .map_err(|_| crate::DeviceError::GuestMemory(d.addr().0))?;
        at += n;
    }
    Ok(out)
}

/// Copy `data` into the device-writable descriptors, in order.
pub fn scatter(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    mut data: &[u8],
) -> Result<(), crate::DeviceError> {
    for d in descs {
        if data.is_empty() {
            break;
        }
        let n = (d.len() as usize).min(data.len());
        mem.write_slice(&data[..n], d.addr())
            .map_err(|_| crate::DeviceError::GuestMemory(d.addr().0))?;
        // Before the used ring publishes it: a guest that sees the data may run it.
        crate::ram_watch::wrote(d.addr().0, n as u64);
        data = &data[n..];
    }
    Ok(())
}

/// Whether the driver wants an interrupt for the used entries published since `*since`
/// (the used index at the last decision, which this advances): always without
/// VIRTIO_RING_F_EVENT_IDX, else when used_event lies in that span. virtio-queue's own
/// `needs_notification` counts only entries added through its `add_used`, so it misses
/// the ones [`add_used_batch`] writes itself.
pub fn needs_interrupt(
    queue: &virtio_queue::Queue,
    mem: &GuestMemoryMmap,
    since: &mut u16,
) -> bool {
    use std::sync::atomic::{fence, Ordering};
    use virtio_queue::QueueT;
    let new = queue.next_used();
    let old = std::mem::replace(since, new);
    if !queue.event_idx_enabled() {
        return true;
    }
    // The used index store must be visible before used_event is read (the driver writes
    // used_event, then reads the used index).
    fence(Ordering::SeqCst);
    let used_event = GuestAddress(queue.avail_ring())
        .checked_add(4 + 2 * u64::from(queue.size()))
        .and_then(|a| mem.load::<u16>(a, Ordering::Relaxed).ok())
        .map(u16::from_le);
    match used_event {
        // vring_need_event: used_event in [old, new).
        Some(e) => new.wrapping_sub(e).wrapping_sub(1) < new.wrapping_sub(old),
        None => true,
    }
}

/// The driver's used_event (EVENT_IDX: interrupt me once the used index passes it);
/// None when the ring is outside guest memory.
pub fn used_event(queue: &virtio_queue::Queue, mem: &GuestMemoryMmap) -> Option<u16> {
    use std::sync::atomic::Ordering;
    use virtio_queue::QueueT;
    GuestAddress(queue.avail_ring())
        .checked_add(4 + 2 * u64::from(queue.size()))
        .and_then(|a| mem.load::<u16>(a, Ordering::Relaxed).ok())
        .map(u16::from_le)
}

/// For a queue that ran out of buffers: asks the driver (with EVENT_IDX, through
/// avail_event) to notify once its avail index moves past `seen`, the index it had
/// published before the device looked. True if it already has: more buffers may have
/// come without a notify, so look again now.
pub fn notify_past(
    queue: &mut virtio_queue::Queue,
    mem: &GuestMemoryMmap,
    seen: u16,
) -> Result<bool, virtio_queue::Error> {
    use std::sync::atomic::{fence, Ordering};
    use virtio_queue::QueueT;
    // Without EVENT_IDX: clears NO_NOTIFY; with it, avail_event = next_avail, then
    // moved to `seen` below (the chains the device gave back are not new).
    queue.enable_notification(mem)?;
    if queue.event_idx_enabled() {
        let at = GuestAddress(queue.used_ring())
            .checked_add(4 + 8 * u64::from(queue.size()))
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        mem.store(seen.to_le(), at, Ordering::Relaxed)
            .map_err(virtio_queue::Error::GuestMemory)?;
    }
    fence(Ordering::SeqCst);
    Ok(queue.avail_idx(mem, Ordering::Acquire)?.0 != seen)
}

/// Asks the driver not to notify for buffers it adds (with EVENT_IDX, avail_event just
/// behind its avail index, which it would cross only after a full wrap; without, the
/// used ring's NO_NOTIFY flag). For a queue the device serves on host input.
pub fn suppress_notifications(
    queue: &mut virtio_queue::Queue,
    mem: &GuestMemoryMmap,
) -> Result<(), virtio_queue::Error> {
    use std::sync::atomic::Ordering;
    use virtio_queue::QueueT;
    if !queue.event_idx_enabled() {
        return queue.disable_notification(mem);
    }
    let avail = queue.avail_idx(mem, Ordering::Acquire)?.0;
    let at = GuestAddress(queue.used_ring())
        .checked_add(4 + 8 * u64::from(queue.size()))
        .ok_or(virtio_queue::Error::AddressOverflow)?;
    mem.store(avail.wrapping_sub(1).to_le(), at, Ordering::Release)
        .map_err(virtio_queue::Error::GuestMemory)
}

/// Put several used elements on `queue`'s used ring and publish them with one index
/// update, so the driver never sees only part of them (a mergeable receive buffer spread
/// over several chains is read as a whole once its first chain is seen). Decide the
/// interrupt with [`needs_interrupt`].
pub fn add_used_batch(
    queue: &mut virtio_queue::Queue,
    mem: &GuestMemoryMmap,
    used: &[(u16, u32)],
) -> Result<(), crate::DeviceError> {
    use virtio_queue::QueueT;
    let Some((&(last_head, last_len), rest)) = used.split_last() else {
        return Ok(());
    };
    let size = queue.size();
    let start = queue.next_used();
    for (i, &(head, len)) in rest.iter().enumerate() {
        if head >= size {
            return Err(crate::DeviceError::BadRequest(
                "used element for a descriptor past the queue",
            ));
        }
        let slot = u64::from(start.wrapping_add(i as u16) % size);
        let addr = GuestAddress(queue.used_ring())
            .checked_add(4 + slot * 8)
            .ok_or(crate::DeviceError::GuestMemory(queue.used_ring()))?;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, addr)
            .map_err(|_| crate::DeviceError::GuestMemory(addr.0))?;
    }
    // The last element goes through virtio-queue, whose release store of the used index
    // publishes all of them at once.
    queue.set_next_used(start.wrapping_add(rest.len() as u16));
    queue
        .add_used(mem, last_head, last_len)
        .map_err(|_| crate::DeviceError::BadRequest("cannot add to the used ring"))
}
