//! One entry point for fuzzing the device side of virtqueues: guest memory filled with
//! arbitrary bytes (descriptor tables, rings, request headers), a driver that sets the
//! device up with addresses and sizes taken from the same bytes, and a kick of every queue.
//! Used by the cargo-fuzz target (`fuzz/fuzz_targets/virtio_queues.rs`) and by a test that
//! runs it over random inputs: whatever the bytes, the device must not panic.

use std::sync::Arc;

use devices::BusDevice;
use hypervisor::IrqChip;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::mmio::{status, MmioTransport};
use crate::VirtioDevice;

const MEM: usize = 64 << 10;

struct NoIrq;
impl IrqChip for NoIrq {
    fn set_irq_line(&self, _: u32, _: bool) -> hypervisor::Result<()> {
        Ok(())
    }
    fn signal_msi(&self, _: u64, _: u32) -> hypervisor::Result<()> {
        Ok(())
    }
}

/// Which device to aim at.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    Block,
    Rng,
    Console,
    /// Inflate and deflate queues: page frame numbers from the input; the first half
    /// of the fuzz memory is its RAM.
    Balloon,
}

/// A disk in memory, for the fuzzer and the unit tests.
#[derive(Debug)]
pub(crate) struct MemDisk {
    pub(crate) data: Vec<u8>,
    pub(crate) ro: bool,
}

impl block::BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_only(&self) -> bool {
        self.ro
    }
    fn read_at(&mut self, o: u64, b: &mut [u8]) -> Result<(), block::BlockError> {
        let o = o as usize;
        b.copy_from_slice(&self.data[o..o + b.len()]);
        Ok(())
    }
    fn write_at(&mut self, o: u64, b: &[u8]) -> Result<(), block::BlockError> {
        let o = o as usize;
        self.data[o..o + b.len()].copy_from_slice(b);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), block::BlockError> {
        Ok(())
    }
    fn discard(&mut self, o: u64, l: u64) -> Result<(), block::BlockError> {
        self.write_zeroes(o, l)
    }
    fn write_zeroes(&mut self, o: u64, l: u64) -> Result<(), block::BlockError> {
        self.data[o as usize..(o + l) as usize].fill(0);
        Ok(())
    }
    fn block_status(
        &mut self,
        _: u64,
        len: u64,
    ) -> Result<(block::BlockStatus, u64), block::BlockError> {
        Ok((block::BlockStatus::Data, len))
    }
}

fn u32_at(data: &[u8], i: usize) -> u32 {
    let mut b = [0u8; 4];
    for (k, v) in b.iter_mut().enumerate() {
        *v = data.get(i + k).copied().unwrap_or(0);
    }
    u32::from_le_bytes(b)
}

/// Run one fuzz case; returns queue 0's used index afterwards (requests completed).
pub fn run(target: Target, data: &[u8]) -> u16 {
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return 0;
    };
    let n = data.len().min(MEM);
    let _ = mem.write_slice(&data[..n], GuestAddress(0));
    let device: Box<dyn VirtioDevice> = match target {
        Target::Block => Box::new(crate::blk::Block::new(
            Box::new(MemDisk {
                data: vec![0; 1 << 16],
                ro: false,
            }),
            "fuzz",
            false,
        )),
        Target::Rng => Box::new(crate::rng::Rng),
        Target::Console => Box::new(crate::console::Console::new(Box::new(std::io::sink()))),
        Target::Balloon => Box::new(crate::balloon::Balloon::new(
            vec![(0, MEM as u64 / 2)],
            u32_at(data, 0),
            true,
            std::time::Duration::ZERO,
        )),
    };
    let mut t = MmioTransport::new(device, mem.clone(), Arc::new(NoIrq), 5);
    let w = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
    w(&mut t, 0x070, status::ACKNOWLEDGE | status::DRIVER);
    w(&mut t, 0x024, 1);
    w(&mut t, 0x020, 1);
    w(
        &mut t,
        0x070,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    for q in 0..2u32 {
        // Queue geometry from the input too: sizes and ring addresses may be anything.
        let base = 16 * q as usize;
        w(&mut t, 0x030, q);
        w(&mut t, 0x038, u32_at(data, base) & 0x1ff);
        w(&mut t, 0x080, u32_at(data, base + 4) % MEM as u32);
        w(&mut t, 0x090, u32_at(data, base + 8) % MEM as u32);
        w(&mut t, 0x0a0, u32_at(data, base + 12) % MEM as u32);
        w(&mut t, 0x044, 1);
    }
    w(
        &mut t,
        0x070,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    // A driver hands over a zeroed used ring; the count read back is then the device's.
    let used = u64::from(u32_at(data, 12) % MEM as u32);
    let _ = mem.write_obj(0u16, GuestAddress(used + 2));
    for q in 0..2 {
        w(&mut t, 0x050, q);
    }
    mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_guest_memory_never_panics_a_device() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut completed = 0u64;
        for case in 0..6000 {
            let len = (next() % 8192) as usize;
            let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Give half the cases sane geometry and plausible descriptors, so chains are
            // walked and requests parsed, not only refused at set-up.
            if case % 2 == 0 {
                data.resize(0x4000, 0);
                data[0..4].copy_from_slice(&16u32.to_le_bytes());
                data[4..8].copy_from_slice(&0x1000u32.to_le_bytes());
                data[8..12].copy_from_slice(&0x2000u32.to_le_bytes());
                data[12..16].copy_from_slice(&0x3000u32.to_le_bytes());
                for d in 0..16usize {
                    let at = 0x1000 + d * 16;
                    let addr = 0x4000 + next() % (MEM as u64 - 0x5000);
                    data[at..at + 8].copy_from_slice(&addr.to_le_bytes());
                    data[at + 8..at + 12].copy_from_slice(&((next() % 1200) as u32).to_le_bytes());
                    data[at + 12..at + 14].copy_from_slice(&((next() & 3) as u16).to_le_bytes());
                    data[at + 14..at + 16].copy_from_slice(&((next() % 16) as u16).to_le_bytes());
                }
                let avail = (next() % 5) as u16;
                data[0x2002..0x2004].copy_from_slice(&avail.to_le_bytes());
                for i in 0..4usize {
                    let head = (next() % 16) as u16;
                    data[0x2004 + 2 * i..0x2006 + 2 * i].copy_from_slice(&head.to_le_bytes());
                }
            }
            for target in [Target::Block, Target::Rng, Target::Console, Target::Balloon] {
                completed += u64::from(run(target, &data));
            }
        }
        // The inputs must reach the request paths, not only the set-up checks.
        assert!(completed > 100, "only {completed} requests completed");
    }
}
