//! The platform-level interrupt controller (SiFive's PLIC register layout, as QEMU's
//! `virt` and OpenSBI know it), with two contexts per hart: 2h drives hart h's MEIP,
//! 2h + 1 its SEIP.
//!
//! Sources latch on an edge (or while a level is high) and clear when claimed; the
//! hart-facing outputs are kept in atomics so each hart polls its own without a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Sources 1..NUM_SOURCES (0 is "none").
pub const NUM_SOURCES: u32 = 64;
pub const SIZE: u64 = 0x400_0000;

const PRIORITY_END: u64 = 0x1000;
const PENDING: u64 = 0x1000;
const ENABLE: u64 = 0x2000;
const ENABLE_STRIDE: u64 = 0x80;
const CONTEXT: u64 = 0x20_0000;
const CONTEXT_STRIDE: u64 = 0x1000;

const MEIP: u64 = 1 << 11;
const SEIP: u64 = 1 << 9;

#[derive(Debug)]
struct State {
    priority: [u32; NUM_SOURCES as usize],
    pending: u64,
    /// Sources whose line is held high (level-triggered use).
    level: u64,
    /// Claimed and not yet completed.
    in_service: u64,
    enable: Vec<u64>,
    threshold: Vec<u32>,
}

/// The PLIC; shared by the CPU (MMIO, output) and the devices (input lines).
#[derive(Debug)]
pub struct Plic {
    state: Mutex<State>,
    /// MEIP/SEIP as each hart's `mip` sees them.
    outputs: Box<[AtomicU64]>,
}

impl Default for Plic {
    fn default() -> Self {
        Self::new()
    }
}

impl State {
    fn new(contexts: usize) -> Self {
        State {
            priority: [0; NUM_SOURCES as usize],
            pending: 0,
            level: 0,
            in_service: 0,
            enable: vec![0; contexts],
            threshold: vec![0; contexts],
        }
    }
}

impl State {
    /// The best claimable source for `ctx`: pending, enabled, not in service, above the
    /// threshold; ties go to the lowest number.
    fn best(&self, ctx: usize) -> u32 {
        let mut best = (0u32, 0u32);
        let cand = self.pending & self.enable[ctx] & !self.in_service;
        for src in 1..NUM_SOURCES {
            if cand & (1 << src) == 0 {
                continue;
            }
            let p = self.priority[src as usize];
            if p > self.threshold[ctx] && p > best.1 {
                best = (src, p);
            }
        }
        best.0
    }

    fn output(&self, hart: usize) -> u64 {
        let mut v = 0;
        if self.best(2 * hart) != 0 {
            v |= MEIP;
        }
        if self.best(2 * hart + 1) != 0 {
            v |= SEIP;
        }
        v
    }
}

impl Plic {
    /// A PLIC for one hart.
    pub fn new() -> Self {
        Self::for_harts(1)
    }

    pub fn for_harts(harts: usize) -> Self {
        let harts = harts.max(1);
        Plic {
            state: Mutex::new(State::new(2 * harts)),
            outputs: (0..harts).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn update(&self, s: &State) {
        for (h, o) in self.outputs.iter().enumerate() {
            o.store(s.output(h), Ordering::Release);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain integers: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The MEIP/SEIP bits hart 0 sees.
    #[inline]
    pub fn output(&self) -> u64 {
        self.output_for(0)
    }

    /// The MEIP/SEIP bits hart `hart` sees.
    #[inline]
    pub fn output_for(&self, hart: usize) -> u64 {
        self.outputs
            .get(hart)
            .map_or(0, |o| o.load(Ordering::Acquire))
    }

    /// Drives source `src`'s line.
    pub fn set_line(&self, src: u32, high: bool) {
        if src == 0 || src >= NUM_SOURCES {
            return;
        }
        let mut s = self.lock();
        let bit = 1u64 << src;
        if high {
            s.level |= bit;
            s.pending |= bit;
        } else {
            s.level &= !bit;
        }
        self.update(&s);
    }

    pub fn read(&self, off: u64) -> u32 {
        let mut s = self.lock();
        let v = match off {
            0..PRIORITY_END => s.priority.get((off / 4) as usize).copied().unwrap_or(0),
            PENDING => s.pending as u32,
            0x1004 => (s.pending >> 32) as u32,
            ENABLE..CONTEXT => {
                let ctx = ((off - ENABLE) / ENABLE_STRIDE) as usize;
                let word = (off - ENABLE) % ENABLE_STRIDE / 4;
                match (s.enable.get(ctx), word) {
                    (Some(e), 0) => *e as u32,
                    (Some(e), 1) => (*e >> 32) as u32,
                    _ => 0,
                }
            }
            _ if off >= CONTEXT => {
                let ctx = ((off - CONTEXT) / CONTEXT_STRIDE) as usize;
                if ctx >= s.threshold.len() {
                    return 0;
                }
                match (off - CONTEXT) % CONTEXT_STRIDE {
                    0 => s.threshold[ctx],
                    4 => {
                        // Claim.
                        let src = s.best(ctx);
                        if src != 0 {
                            s.pending &= !(1 << src);
                            s.in_service |= 1 << src;
                            self.update(&s);
                        }
                        src
                    }
                    _ => 0,
                }
            }
            _ => 0,
        };
        v
    }

    pub fn write(&self, off: u64, v: u32) {
        let mut s = self.lock();
        match off {
            0..PRIORITY_END => {
                if let Some(p) = s.priority.get_mut((off / 4) as usize) {
                    *p = v & 7;
                }
            }
            ENABLE..CONTEXT => {
                let ctx = ((off - ENABLE) / ENABLE_STRIDE) as usize;
                let word = (off - ENABLE) % ENABLE_STRIDE / 4;
                if let Some(e) = s.enable.get_mut(ctx) {
                    match word {
                        0 => *e = (*e & !0xffff_fffe) | (v as u64 & 0xffff_fffe),
                        1 => *e = (*e & 0xffff_ffff) | ((v as u64) << 32),
                        _ => {}
                    }
                }
            }
            _ if off >= CONTEXT => {
                let ctx = ((off - CONTEXT) / CONTEXT_STRIDE) as usize;
                if ctx < s.threshold.len() {
                    match (off - CONTEXT) % CONTEXT_STRIDE {
                        0 => s.threshold[ctx] = v & 7,
                        // Complete: a line still high is pending again.
                        4 if v > 0 && v < NUM_SOURCES => {
                            let bit = 1u64 << v;
                            s.in_service &= !bit;
                            if s.level & bit != 0 {
                                s.pending |= bit;
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        self.update(&s);
    }
}

impl hypervisor::IrqChip for Plic {
    fn set_irq_line(&self, gsi: u32, active: bool) -> hypervisor::Result<()> {
        self.set_line(gsi, active);
        Ok(())
    }

    fn signal_msi(&self, _address: u64, _data: u32) -> hypervisor::Result<()> {
        // virt has no MSI controller: devices here use wired lines.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edge_is_claimed_once_by_the_enabled_context() {
        let p = Plic::new();
        p.write(4 * 10, 1); // priority of source 10
        p.write(ENABLE + ENABLE_STRIDE, 1 << 10); // S context
        assert_eq!(p.output(), 0);
        p.set_line(10, true);
        p.set_line(10, false);
        assert_eq!(p.output(), SEIP);
        assert_eq!(p.read(CONTEXT + CONTEXT_STRIDE + 4), 10);
        assert_eq!(p.output(), 0);
        assert_eq!(p.read(CONTEXT + CONTEXT_STRIDE + 4), 0);
        p.write(CONTEXT + CONTEXT_STRIDE + 4, 10);
        assert_eq!(p.output(), 0);
    }

    #[test]
    fn a_held_level_is_pending_again_after_complete_and_threshold_masks() {
        let p = Plic::new();
        p.write(4 * 3, 2);
        p.write(ENABLE, 1 << 3); // M context
        p.set_line(3, true);
        assert_eq!(p.read(CONTEXT + 4), 3);
        p.write(CONTEXT + 4, 3);
        assert_eq!(p.output(), MEIP);
        p.write(CONTEXT, 2); // threshold 2 masks priority 2
        assert_eq!(p.output(), 0);
    }

    #[test]
    fn each_hart_sees_its_own_contexts() {
        let p = Plic::for_harts(2);
        p.write(4 * 5, 1);
        p.write(ENABLE + 3 * ENABLE_STRIDE, 1 << 5); // hart 1's S context
        p.set_line(5, true);
        assert_eq!((p.output_for(0), p.output_for(1)), (0, SEIP));
        assert_eq!(p.read(CONTEXT + 3 * CONTEXT_STRIDE + 4), 5);
        assert_eq!(p.output_for(1), 0);
        // Contexts past the last hart's read as nothing and ignore writes.
        assert_eq!(p.read(CONTEXT + 4 * CONTEXT_STRIDE + 4), 0);
        p.write(CONTEXT + 4 * CONTEXT_STRIDE, 1);
    }
}
