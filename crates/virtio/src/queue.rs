//! Walking descriptor chains with the checks virtio-queue leaves to devices: loops and
//! lengths that overflow.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

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
