//! virtio-blk over a `block::BlockBackend` (raw or qcow2): read, write, flush, get-id,
//! discard and write-zeroes; read-only disks refuse writes.

use block::BlockBackend;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryMmap};

use crate::queue::{gather, scatter, Chain};
use crate::{device_type, read_config_bytes, DeviceError, QueueOutcome, VirtioDevice};

pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;

/// Feature bits (virtio spec 5.2.3).
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

/// Request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

/// Status byte values.
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const ID_BYTES: usize = 20;
const SEG_MAX: u32 = 126;
/// Largest single request we buffer: bounds host memory per request.
const MAX_REQUEST_BYTES: u64 = 16 << 20;

pub struct Block {
    disk: Box<dyn BlockBackend>,
    id: [u8; ID_BYTES],
    read_only: bool,
    config: Vec<u8>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("disk", &self.disk)
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl Block {
    /// `id` is what GET_ID returns (the disk's serial, e.g. the image file name).
    pub fn new(disk: Box<dyn BlockBackend>, id: &str, read_only: bool) -> Self {
        let read_only = read_only || disk.read_only();
        let mut idb = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        idb[..n].copy_from_slice(&id.as_bytes()[..n]);
        let sectors = disk.size() / SECTOR_SIZE;
        let mut config = vec![0u8; 60];
        config[0..8].copy_from_slice(&sectors.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        // One discard/write-zeroes segment of up to 32 MiB at a time.
        let max_sectors = (32u32 << 20) / SECTOR_SIZE as u32;
        config[36..40].copy_from_slice(&max_sectors.to_le_bytes());
        config[40..44].copy_from_slice(&1u32.to_le_bytes());
        config[44..48].copy_from_slice(&1u32.to_le_bytes());
        config[48..52].copy_from_slice(&max_sectors.to_le_bytes());
        config[52..56].copy_from_slice(&1u32.to_le_bytes());
        config[56] = 1;
        Block {
            disk,
            id: idb,
            read_only,
            config,
        }
    }

    fn capacity(&self) -> u64 {
        self.disk.size() / SECTOR_SIZE * SECTOR_SIZE
    }

    fn in_range(&self, sector: u64, len: u64) -> Option<u64> {
        let off = sector.checked_mul(SECTOR_SIZE)?;
        (off.checked_add(len)? <= self.capacity()).then_some(off)
    }

    /// Handle one request; Err only for malformed chains (the device then needs reset),
    /// I/O trouble is reported to the driver in the status byte.
    fn handle(&mut self, mem: &GuestMemoryMmap, chain: &Chain) -> Result<u32, DeviceError> {
        let out = gather(mem, &chain.readable, MAX_REQUEST_BYTES + 16)?;
        if out.len() < 16 {
            return Err(DeviceError::BadRequest(
                "request header shorter than 16 bytes",
            ));
        }
        let Some(status_desc) = chain.writable.last() else {
            return Err(DeviceError::BadRequest("no writable status byte"));
        };
        if status_desc.len() == 0 {
            return Err(DeviceError::BadRequest("empty status descriptor"));
        }
        let kind = u32::from_le_bytes([out[0], out[1], out[2], out[3]]);
        let sector = u64::from_le_bytes(out[8..16].try_into().unwrap_or([0; 8]));
        let payload = &out[16..];
        // Device-writable space before the status byte.
        let in_len: u64 = chain
            .writable
            .iter()
            .map(|d| u64::from(d.len()))
            .sum::<u64>()
            - 1;

        let (status, written) = match kind {
            T_IN => {
                if in_len > MAX_REQUEST_BYTES || !in_len.is_multiple_of(SECTOR_SIZE) {
                    (S_IOERR, 0)
                } else if let Some(off) = self.in_range(sector, in_len) {
                    let mut buf = vec![0u8; in_len as usize];
                    match self.disk.read_at(off, &mut buf) {
                        Ok(()) => {
                            scatter(mem, &chain.writable, &buf)?;
                            (S_OK, in_len as u32)
                        }
                        Err(e) => {
                            tracing::warn!("virtio-blk read at {off:#x}: {e}");
                            (S_IOERR, 0)
                        }
                    }
                } else {
                    (S_IOERR, 0)
                }
            }
            T_OUT => {
                let len = payload.len() as u64;
                match self.in_range(sector, len) {
                    _ if self.read_only => (S_IOERR, 0),
                    Some(off) if len.is_multiple_of(SECTOR_SIZE) => {
                        match self.disk.write_at(off, payload) {
                            Ok(()) => (S_OK, 0),
                            Err(e) => {
                                tracing::warn!("virtio-blk write at {off:#x}: {e}");
                                (S_IOERR, 0)
                            }
                        }
                    }
                    _ => (S_IOERR, 0),
                }
            }
            T_FLUSH => match self.disk.flush() {
                Ok(()) => (S_OK, 0),
                Err(e) => {
                    tracing::warn!("virtio-blk flush: {e}");
                    (S_IOERR, 0)
                }
            },
            T_GET_ID => {
                let n = (in_len as usize).min(ID_BYTES);
                scatter(mem, &chain.writable, &self.id[..n])?;
                (S_OK, n as u32)
            }
            T_DISCARD | T_WRITE_ZEROES => {
                if self.read_only {
                    (S_IOERR, 0)
                } else {
                    (self.discard_segments(kind, payload), 0)
                }
            }
            _ => (S_UNSUPP, 0),
        };
        let status_at = status_desc
            .addr()
            .checked_add(u64::from(status_desc.len()) - 1)
            .ok_or(DeviceError::GuestMemory(status_desc.addr().0))?;
        mem.write_obj(status, status_at)
            .map_err(|_| DeviceError::GuestMemory(status_at.0))?;
        Ok(written + 1)
    }

    fn discard_segments(&mut self, kind: u32, payload: &[u8]) -> u8 {
        if payload.is_empty() || !payload.len().is_multiple_of(16) {
            return S_IOERR;
        }
        for seg in payload.chunks_exact(16) {
            let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or([0; 8]));
            let count = u64::from(u32::from_le_bytes(seg[8..12].try_into().unwrap_or([0; 4])));
            let len = count * SECTOR_SIZE;
            let Some(off) = self.in_range(sector, len) else {
                return S_IOERR;
            };
            let r = if kind == T_DISCARD {
                self.disk.discard(off, len)
            } else {
                self.disk.write_zeroes(off, len)
            };
            if let Err(e) = r {
                tracing::warn!("virtio-blk discard/write-zeroes at {off:#x}: {e}");
                return S_IOERR;
            }
        }
        S_OK
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH;
        if self.read_only {
            f |= VIRTIO_BLK_F_RO;
        } else {
            f |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceError> {
        let mut outcome = QueueOutcome::default();
        let size = queue.size();
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let chain = Chain::collect(chain, size, mem)?;
            let len = self.handle(mem, &chain)?;
            queue
                .add_used(mem, chain.head, len)
                .map_err(|_| DeviceError::BadRequest("cannot add to the used ring"))?;
            outcome.used = true;
        }
        Ok(outcome)
    }
}
