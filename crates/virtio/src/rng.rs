//! virtio-rng: entropy from the host's getrandom(2) into every buffer the guest offers;
//! [`LimitedRng`] within a rate limiter (Firecracker's entropy device `rate_limiter`).

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::queue::{scatter, Chain};
use crate::rate_limiter::RateLimiter;
use crate::{device_type, DeviceError, QueueOutcome, VirtioDevice};

/// Per request, so a huge buffer cannot make the host spin in getrandom.
const MAX_BYTES: usize = 64 << 10;

#[derive(Debug, Default)]
pub struct Rng;

fn host_random(buf: &mut [u8]) -> bool {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom writes at most rest.len() bytes into the slice we own.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n <= 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        filled += n as usize;
    }
    true
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[256]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceError> {
        serve(queue, mem, None)
    }
}

/// virtio-rng whose requests pass through a rate limiter (one operation and the bytes
/// asked for each); it needs an I/O thread, which runs the queue again when the limiter
/// has refilled.
#[derive(Debug, Default)]
pub struct LimitedRng {
    pub limiter: RateLimiter,
}

impl VirtioDevice for LimitedRng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[256]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceError> {
        serve(queue, mem, Some(&mut self.limiter))
    }
}

fn serve(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mut limiter: Option<&mut RateLimiter>,
) -> Result<QueueOutcome, DeviceError> {
    let mut outcome = QueueOutcome::default();
    let size = queue.size();
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let chain = Chain::collect(chain, size, mem)?;
        let want: usize = chain.writable.iter().map(|d| d.len() as usize).sum();
        if let Some(l) = limiter.as_deref_mut() {
            if let Err(wait) = l.consume(1, want.min(MAX_BYTES) as u64) {
                queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                outcome.throttled = Some(wait);
                break;
            }
        }
        let mut buf = vec![0u8; want.min(MAX_BYTES)];
        let len = if host_random(&mut buf) {
            scatter(mem, &chain.writable, &buf)?;
            buf.len() as u32
        } else {
            0
        };
        queue
            .add_used(mem, chain.head, len)
            .map_err(|_| DeviceError::BadRequest("cannot add to the used ring"))?;
        outcome.used = true;
    }
    Ok(outcome)
}
