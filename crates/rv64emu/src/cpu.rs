//! The hart: architectural state, the run loop over decoded blocks, traps and
//! interrupts, memory access through the soft TLB, and the CLINT registers it owns.

use crate::bus::Bus;
use crate::cache::{BlockCache, MAX_BLOCK};
use crate::csr::{self, status, Csrs};
use crate::decode::{decode16, decode32, is_32bit, Insn};
use crate::mmu::{self, Access, Ctx, Hit, Tlb};
use crate::ram::GuestRam;
use crate::trap::{self, Exception, Interrupt};
use std::time::Instant;

/// Privilege modes.
/// One byte (compiled code compares it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Priv {
    User = 0,
    Supervisor = 1,
    Machine = 3,
}

impl Priv {
    fn from_bits(b: u64) -> Priv {
        match b & 3 {
            0 => Priv::User,
            1 => Priv::Supervisor,
            _ => Priv::Machine,
        }
    }
}

/// Where `mtime` comes from.
#[derive(Clone, Copy, Debug)]
pub enum TimeSource {
    /// The host's monotonic clock at `hz` ticks per second.
    Host { start: Instant, hz: u64 },
    /// One tick per `1 << shift` retired instructions: deterministic, for tests.
    Instret { shift: u32 },
}

/// Why [`Cpu::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunExit {
    /// The instruction budget ran out.
    Budget,
    /// WFI with nothing pending: the VMM may sleep until a device or the timer fires.
    Wfi,
    /// The bus asked to stop (see [`Bus::stop_requested`]).
    Stop,
    /// With [`Cpu::exit_on_exception`] set: an exception, not yet taken; `pc` is the
    /// faulting instruction's.
    Exception(Exception),
}

/// The CLINT block the CPU serves itself (MSIP, MTIMECMP, MTIME of SiFive's layout).
pub const CLINT_SIZE: u64 = 0x10000;
const CLINT_MTIMECMP: u64 = 0x4000;
const CLINT_MTIME: u64 = 0xbff8;

/// How an executed instruction leaves the PC.
#[repr(u8)]
#[derive(Clone, Copy)]
pub(crate) enum Flow {
    Next = 0,
    /// The PC was set.
    Jump,
    Wfi,
    /// An exception, in `Cpu::pending_exception`; the PC is still the block's start.
    Trap,
}

/// One RISC-V hart.
#[derive(Debug)]
pub struct Cpu {
    pub x: [u64; 32],
    pub f: [u64; 32],
    pub pc: u64,
    pub prv: Priv,
    pub csr: Csrs,
    pub hartid: u64,
    /// Every hart's MSIP and MTIMECMP; this hart's slot is `hartid`.
    pub clint: std::sync::Arc<crate::clint::Clint>,
    pub instret: u64,
    /// Base of the CLINT the CPU serves, if any.
    pub clint_base: Option<u64>,
    /// Return exceptions from `run` instead of taking them (user-mode harnesses).
    pub exit_on_exception: bool,
    pub time: TimeSource,
    /// LR's reservation: the physical address and the value it loaded. SC stores only
    /// if memory still holds that value (a compare-and-swap), so a store by another
    /// hart in between fails it.
    pub(crate) reservation: Option<(u64, u64)>,
    pub(crate) ram: GuestRam,
    pub(crate) tlb: Tlb,
    pub(crate) cache: BlockCache,
    /// Translation on for (fetch, data): when it flips, the TLB holds the other regime.
    regime: (bool, bool),
    pub(crate) device_touched: bool,
    /// MTIP as last computed, and the retired-instruction count at which to read the
    /// clock again: reading it for every block cost a third of the run time.
    mtip: bool,
    timer_check_at: u64,
    /// The retired-instruction count at which to look for a pending interrupt again.
    /// Whatever may make one takeable at once (a CSR instruction, a trap or xRET, a
    /// device access, run entry) sets it to 0; otherwise lines raised from outside (the
    /// PLIC's, another hart's IPI, the timer) are seen within [`IRQ_CHECK_INTERVAL`]
    /// instructions. Looking at every block boundary cost a tenth of the run time.
    pub(crate) irq_check_at: u64,
    /// The exception an instruction raised (see `Flow::Trap`).
    pub(crate) pending_exception: Exception,
    ctx_fetch: Ctx,
    ctx_data: Ctx,
    /// FENCE.I ran: check the decoded blocks against memory once the current block ends.
    pub(crate) code_flush_pending: bool,
    /// `ctx_data.key()`, for the TLB's fast path.
    pub(crate) data_key: u8,
    /// What compiled code needs to go from one compiled block to the next without the
    /// run loop (see `jit`): the `instret` at which the current `run` ends, the jump
    /// cache's slots, and each block's code (as `BlockCache::codes_ptr` gave it before
    /// the code was entered).
    pub(crate) run_end: u64,
    pub(crate) chain_jumps: *const crate::cache::Jump,
    pub(crate) chain_codes: *const crate::cache::Compiling,
}

// SAFETY: the two chain pointers point into the hart's own block cache, which moves with
// it; they are read only by compiled code that this hart runs.
unsafe impl Send for Cpu {}

/// The context of unpaged accesses: the TLB's identity entries pass it at any privilege.
const NO_CTX: Ctx = Ctx {
    user: false,
    sum: false,
    mxr: false,
};

/// Instructions between two looks at the clock for the timer interrupt (~20 µs here).
const TIMER_CHECK_INTERVAL: u64 = 2048;

/// Instructions between two looks at the interrupt lines when nothing forced one.
const IRQ_CHECK_INTERVAL: u64 = 1024;

impl Cpu {
    /// A hart at reset (M-mode, `pc` = `reset_pc`) over `ram`.
    pub fn new(ram: GuestRam, reset_pc: u64) -> Self {
        Cpu {
            x: [0; 32],
            f: [0; 32],
            pc: reset_pc,
            prv: Priv::Machine,
            csr: Csrs::new(),
            hartid: 0,
            clint: Default::default(),
            instret: 0,
            clint_base: None,
            exit_on_exception: false,
            time: TimeSource::Host {
                start: Instant::now(),
                hz: 10_000_000,
            },
            reservation: None,
            ram,
            tlb: Tlb::default(),
            cache: BlockCache::default(),
            regime: (false, false),
            device_touched: false,
            mtip: false,
            timer_check_at: 0,
            irq_check_at: 0,
            pending_exception: Exception::IllegalInstruction(0),
            ctx_fetch: NO_CTX,
            ctx_data: NO_CTX,
            code_flush_pending: false,
            data_key: NO_CTX.key(),
            run_end: 0,
            chain_jumps: std::ptr::null(),
            chain_codes: std::ptr::null(),
        }
    }

    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// `mtime` now.
    pub fn mtime(&self) -> u64 {
        match self.time {
            TimeSource::Host { start, hz } => {
                let t = start.elapsed();
                t.as_secs()
                    .wrapping_mul(hz)
                    .wrapping_add(t.subsec_nanos() as u64 * hz / 1_000_000_000)
            }
            TimeSource::Instret { shift } => self.instret >> shift,
        }
    }

    /// `mip` as the hart sees it: software bits plus the wired timer, software and
    /// external lines.
    pub fn mip(&self, bus: &mut dyn Bus) -> u64 {
        let hart = self.hartid as usize;
        let mut v = self.csr.mip | bus.external_pending();
        if self.mtime() >= self.clint.mtimecmp(hart) {
            v |= trap::MTIP;
        }
        if self.clint.msip(hart) {
            v |= trap::MSIP;
        }
        v
    }

    /// The interrupt to take now, if any.
    fn pending_interrupt(&mut self, bus: &mut dyn Bus) -> Option<Interrupt> {
        if self.csr.mie == 0 {
            return None;
        }
        let hart = self.hartid as usize;
        if self.instret >= self.timer_check_at {
            self.mtip = self.mtime() >= self.clint.mtimecmp(hart);
            self.timer_check_at = self.instret + TIMER_CHECK_INTERVAL;
        }
        let mut mip = self.csr.mip | bus.external_pending();
        if self.mtip {
            mip |= trap::MTIP;
        }
        if self.clint.msip(hart) {
            mip |= trap::MSIP;
        }
        let pending = mip & self.csr.mie;
        if pending == 0 {
            return None;
        }
        let m_enabled = self.prv < Priv::Machine || self.csr.mstatus & status::MIE != 0;
        let s_enabled = self.prv < Priv::Supervisor
            || (self.prv == Priv::Supervisor && self.csr.mstatus & status::SIE != 0);
        trap::PRIORITY.into_iter().find(|&irq| {
            let bit = 1u64 << irq as u8;
            if pending & bit == 0 {
                return false;
            }
            if self.csr.mideleg & bit != 0 {
                s_enabled
            } else {
                m_enabled
            }
        })
    }

    /// Enters the trap handler for `cause`.
    pub(crate) fn take_trap(&mut self, code: u64, tval: u64, interrupt: bool) {
        tracing::trace!(pc = self.pc, code, tval, interrupt, prv = ?self.prv, "trap");
        let deleg = if interrupt {
            self.csr.mideleg
        } else {
            self.csr.medeleg
        };
        let cause = code | ((interrupt as u64) << 63);
        let st = self.csr.mstatus;
        if self.prv != Priv::Machine && (deleg >> code) & 1 != 0 {
            self.csr.sepc = self.pc;
            self.csr.scause = cause;
            self.csr.stval = tval;
            let mut s = st & !(status::SPIE | status::SIE | status::SPP);
            if st & status::SIE != 0 {
                s |= status::SPIE;
            }
            if self.prv == Priv::Supervisor {
                s |= status::SPP;
            }
            self.csr.mstatus = s;
            self.prv = Priv::Supervisor;
            self.pc = vector(self.csr.stvec, code, interrupt);
        } else {
            self.csr.mepc = self.pc;
            self.csr.mcause = cause;
            self.csr.mtval = tval;
            let mut s = st & !(status::MPIE | status::MIE | status::MPP);
            if st & status::MIE != 0 {
                s |= status::MPIE;
            }
            s |= (self.prv as u64) << status::MPP_SHIFT;
            self.csr.mstatus = s;
            self.prv = Priv::Machine;
            self.pc = vector(self.csr.mtvec, code, interrupt);
        }
        self.reservation = None;
        self.update_regime();
        self.irq_check_at = 0;
    }

    pub(crate) fn take_exception(&mut self, e: Exception) {
        self.take_trap(e.code(), e.tval(), false);
    }

    /// Re-derives whether fetch and data accesses translate, flushing the TLB when that
    /// changes (its entries belong to one regime).
    pub(crate) fn update_regime(&mut self) {
        let paged = self.csr.satp >> 60 != mmu::SATP_BARE;
        let regime = (
            paged && self.prv != Priv::Machine,
            paged && self.data_priv() != Priv::Machine,
        );
        if regime != self.regime {
            self.regime = regime;
            self.flush_tlb();
        }
        // The permission context of each access kind, kept here so a TLB hit does not
        // rederive it from the privilege and mstatus.
        let ctx = |on: bool, p: Priv, st: u64| {
            if on {
                Ctx {
                    user: p == Priv::User,
                    sum: st & status::SUM != 0,
                    mxr: st & status::MXR != 0,
                }
            } else {
                NO_CTX
            }
        };
        self.ctx_fetch = ctx(regime.0, self.prv, self.csr.mstatus);
        self.ctx_data = ctx(regime.1, self.data_priv(), self.csr.mstatus);
        self.data_key = self.ctx_data.key();
    }

    /// Forgets every translation, and the jump cache links that rest on them.
    pub(crate) fn flush_tlb(&mut self) {
        self.tlb.flush();
        self.cache.forget_jumps();
    }

    /// FENCE.I: the decoded blocks are checked against memory once the running block
    /// ends.
    pub(crate) fn flush_code(&mut self) {
        self.code_flush_pending = true;
    }

    /// The privilege loads and stores run at (MPRV).
    fn data_priv(&self) -> Priv {
        if self.prv == Priv::Machine && self.csr.mstatus & status::MPRV != 0 {
            Priv::from_bits(self.csr.mstatus >> status::MPP_SHIFT)
        } else {
            self.prv
        }
    }

    /// Translates `va` for `access`.
    #[inline]
    pub(crate) fn translate(&mut self, va: u64, access: Access) -> Result<Hit, Exception> {
        let paged = if access == Access::Fetch {
            self.regime.0
        } else {
            self.regime.1
        };
        let ctx = if access == Access::Fetch {
            self.ctx_fetch
        } else {
            self.ctx_data
        };
        if let Some(hit) = self.tlb.lookup(va, access, ctx) {
            return Ok(hit);
        }
        if paged {
            mmu::walk(&self.ram, &mut self.tlb, self.csr.satp, va, access, ctx)
        } else {
            Ok(mmu::identity(&self.ram, &mut self.tlb, va, access, ctx))
        }
    }

    /// Loads `size` bytes at `va` (zero-extended).
    #[inline(always)]
    pub(crate) fn load(&mut self, bus: &mut dyn Bus, va: u64, size: u8) -> Result<u64, Exception> {
        if (va & 0xfff) + size as u64 <= 0x1000 {
            if let Some(p) = self.tlb.fast(va, Access::Load, self.data_key) {
                // SAFETY: `p` points into a RAM page (GuestRam contract) and the access
                // stays inside that page (checked above).
                return Ok(unsafe { read_host(p, size) });
            }
        }
        self.load_slow(bus, va, size)
    }

    /// A load that misses the TLB's fast path: through the full check, or byte by byte
    /// across a page boundary, or to a device.
    #[inline(never)]
    fn load_slow(&mut self, bus: &mut dyn Bus, va: u64, size: u8) -> Result<u64, Exception> {
        if (va & 0xfff) + size as u64 > 0x1000 {
            // Crosses a page: byte by byte, each translated.
            let mut v = 0u64;
            for i in 0..size as u64 {
                v |= self.load(bus, va.wrapping_add(i), 1)? << (8 * i);
            }
            return Ok(v);
        }
        let hit = self.translate(va, Access::Load)?;
        if !hit.host.is_null() {
            // SAFETY: `host` points into a RAM page (GuestRam contract) and the access
            // stays inside that page (checked above).
            return Ok(unsafe { read_host(hit.host, size) });
        }
        self.device_read(bus, hit.pa, size)
            .ok_or(Exception::LoadAccessFault(va))
    }

    /// Stores the low `size` bytes of `value` at `va`.
    #[inline(always)]
    pub(crate) fn store(
        &mut self,
        bus: &mut dyn Bus,
        va: u64,
        size: u8,
        value: u64,
    ) -> Result<(), Exception> {
        if (va & 0xfff) + size as u64 <= 0x1000 {
            if let Some(p) = self.tlb.fast(va, Access::Store, self.data_key) {
                // SAFETY: as in `load`.
                unsafe { write_host(p, size, value) };
                return Ok(());
            }
        }
        self.store_slow(bus, va, size, value)
    }

    #[inline(never)]
    fn store_slow(
        &mut self,
        bus: &mut dyn Bus,
        va: u64,
        size: u8,
        value: u64,
    ) -> Result<(), Exception> {
        if (va & 0xfff) + size as u64 > 0x1000 {
            // Translate both pages first so a fault leaves memory untouched.
            self.translate(va, Access::Store)?;
            self.translate(va.wrapping_add(size as u64 - 1), Access::Store)?;
            for i in 0..size as u64 {
                self.store(bus, va.wrapping_add(i), 1, value >> (8 * i))?;
            }
            return Ok(());
        }
        let hit = self.translate(va, Access::Store)?;
        if !hit.host.is_null() {
            // SAFETY: as in `load`.
            unsafe { write_host(hit.host, size, value) };
            return Ok(());
        }
        if self.device_write(bus, hit.pa, size, value) {
            Ok(())
        } else {
            Err(Exception::StoreAccessFault(va))
        }
    }

    fn device_read(&mut self, bus: &mut dyn Bus, pa: u64, size: u8) -> Option<u64> {
        self.device_touched = true;
        if let Some(base) = self.clint_base {
            if pa.wrapping_sub(base) < CLINT_SIZE {
                return Some(self.clint_read(pa - base, size));
            }
        }
        bus.read(pa, size)
    }

    fn device_write(&mut self, bus: &mut dyn Bus, pa: u64, size: u8, value: u64) -> bool {
        self.device_touched = true;
        if let Some(base) = self.clint_base {
            if pa.wrapping_sub(base) < CLINT_SIZE {
                self.clint_write(pa - base, size, value);
                return true;
            }
        }
        bus.write(pa, size, value)
    }

    fn clint_read(&self, off: u64, size: u8) -> u64 {
        let (reg, base) = match off {
            0..=0x3fff => {
                let hart = (off / 4) as usize;
                (self.clint.msip(hart) as u64, off & !3)
            }
            CLINT_MTIMECMP..CLINT_MTIME => {
                let hart = ((off - CLINT_MTIMECMP) / 8) as usize;
                (self.clint.mtimecmp(hart), off & !7)
            }
            CLINT_MTIME..=0xbfff => (self.mtime(), CLINT_MTIME),
            _ => return 0,
        };
        let shift = 8 * (off - base);
        let v = reg >> shift;
        if size >= 8 {
            v
        } else {
            v & ((1u64 << (8 * size as u64)) - 1)
        }
    }

    fn clint_write(&mut self, off: u64, size: u8, value: u64) {
        match off {
            // A write to another hart's word is an inter-processor interrupt.
            0..=0x3fff if off & 3 == 0 => self.clint.set_msip((off / 4) as usize, value & 1 != 0),
            CLINT_MTIMECMP..CLINT_MTIME => {
                let hart = ((off - CLINT_MTIMECMP) / 8) as usize;
                let shift = 8 * (off & 7);
                let mask = if size >= 8 {
                    u64::MAX
                } else {
                    ((1u64 << (8 * size as u64)) - 1) << shift
                };
                self.clint.write_mtimecmp(hart, value << shift, mask);
                self.timer_check_at = 0;
            }
            // mtime is the host clock here: writes are ignored.
            _ => {}
        }
    }

    /// Compile blocks to host code after `threshold` runs (1: at the first), or never
    /// (None: interpret only). Drops every decoded block.
    pub fn set_jit_threshold(&mut self, threshold: Option<u32>) {
        self.cache.set_jit_threshold(threshold);
    }

    /// Blocks compiled to host code so far.
    pub fn compiled_blocks(&self) -> u64 {
        self.cache.compiled_blocks()
    }

    /// Fetches and decodes the block at the current PC, whose physical address is `pa`;
    /// returns its cache id, or the one instruction that straddles two pages (not
    /// cached: its halves may be remapped apart).
    fn build_block(&mut self, hit: Hit) -> Result<Result<u32, Insn>, Exception> {
        if hit.host.is_null() {
            return Err(Exception::InstructionAccessFault(self.pc));
        }
        let mut out = Vec::with_capacity(16);
        let mut off = (hit.pa & 0xfff) as usize;
        let page = hit.host.wrapping_sub(off);
        while out.len() < MAX_BLOCK && off + 2 <= 0x1000 {
            // SAFETY: `page` is the RAM page behind the PC and `off + 2 <= 4096`.
            let lo = unsafe { read_host(page.wrapping_add(off), 2) } as u16;
            let insn = if is_32bit(lo) {
                if off + 4 > 0x1000 {
                    if out.is_empty() {
                        // The one instruction straddles two pages: fetch its upper half
                        // through its own translation; not cached.
                        let va_hi = self.pc.wrapping_add(2);
                        let hi_hit = self.translate(va_hi, Access::Fetch)?;
                        if hi_hit.host.is_null() {
                            return Err(Exception::InstructionAccessFault(va_hi));
                        }
                        // SAFETY: a RAM page translation for a 2-byte in-page read.
                        let hi = unsafe { read_host(hi_hit.host, 2) } as u32;
                        return Ok(Err(decode32(lo as u32 | (hi << 16))));
                    }
                    break;
                }
                // SAFETY: `off + 4 <= 4096` inside the RAM page.
                decode32(unsafe { read_host(page.wrapping_add(off), 4) } as u32)
            } else {
                decode16(lo)
            };
            let mut insn = insn;
            insn.off = (off - (hit.pa & 0xfff) as usize) as u16;
            insn.idx = out.len() as u8;
            off += insn.len as usize;
            let end = insn.ends_block();
            out.push(insn);
            if end {
                break;
            }
        }
        Ok(Ok(self.cache.insert(hit.pa, out)))
    }

    /// The block at the current PC through the fetch translation and the block index,
    /// decoding it if it is new; Err(insn) is a lone page-straddling instruction.
    fn find_block(&mut self) -> Result<Result<u32, Insn>, Exception> {
        let hit = self.translate(self.pc, Access::Fetch)?;
        match self.cache.get(hit.pa) {
            Some(id) if self.cache.checked(id) => Ok(Ok(id)),
            Some(id) if self.still_there(id, &hit) => {
                self.cache.mark_checked(id);
                Ok(Ok(id))
            }
            _ => self.build_block(hit),
        }
    }

    /// Whether memory at `hit` (where block `id` starts) still holds the block's
    /// instructions.
    fn still_there(&self, id: u32, hit: &Hit) -> bool {
        if hit.host.is_null() {
            return false;
        }
        let start = (hit.pa & 0xfff) as usize;
        let page = hit.host.wrapping_sub(start);
        self.cache.block(id).iter().all(|i| {
            let off = start + i.off as usize;
            // SAFETY: the block was decoded from this RAM page, each instruction inside
            // it (`build_block` stops at the page end).
            off + i.len as usize <= 0x1000
                && unsafe { read_host(page.wrapping_add(off), i.len) } == u64::from(i.raw)
        })
    }

    /// Runs until `budget` instructions have retired, WFI, a stop request or (with
    /// `exit_on_exception`) an exception.
    /// Sets `pc` and `instret` as they are after `insn` left its block with `flow`
    /// (running off the block's end is `Next` from its last instruction).
    fn retire(&mut self, flow: Flow, insn: &Insn) {
        match flow {
            Flow::Next | Flow::Wfi => {
                self.pc = self.pc_of(insn).wrapping_add(insn.len as u64);
                self.instret = self.instret.wrapping_add(insn.idx as u64 + 1);
            }
            Flow::Jump => self.instret = self.instret.wrapping_add(insn.idx as u64 + 1),
            Flow::Trap => {
                self.pc = self.pc_of(insn);
                self.instret = self.instret.wrapping_add(insn.idx as u64);
            }
        }
    }

    pub fn run(&mut self, bus: &mut dyn Bus, budget: u64) -> RunExit {
        let end = self.instret.saturating_add(budget);
        self.run_end = end;
        self.chain_jumps = self.cache.jumps_ptr();
        self.update_regime();
        // The clock moved while the VMM had the hart (after WFI above all).
        self.timer_check_at = 0;
        self.irq_check_at = 0;
        // Traps retire nothing: count them too, so a trap loop still ends the run.
        let mut traps = 0u64;
        while self.instret < end && traps < budget {
            if self.instret >= self.irq_check_at {
                self.irq_check_at = self.instret.saturating_add(IRQ_CHECK_INTERVAL);
                if let Some(irq) = self.pending_interrupt(bus) {
                    self.take_trap(irq as u64, 0, true);
                }
            }
            let user = self.prv == Priv::User;
            let (block, straddler) = match self.cache.jump(self.pc, user) {
                Some(id) => (id, None),
                None => match self.find_block() {
                    Ok(Ok(id)) => {
                        self.cache.remember_jump(self.pc, user, id);
                        (id, None)
                    }
                    Ok(Err(insn)) => (u32::MAX, Some(insn)),
                    Err(e) => {
                        if self.exit_on_exception {
                            return RunExit::Exception(e);
                        }
                        traps += 1;
                        self.take_exception(e);
                        continue;
                    }
                },
            };
            // Before the instructions are borrowed: compiling may flush every block (the
            // block then is decoded again next time round).
            let code = match straddler {
                None => self.cache.code(block),
                Some(_) => None,
            };
            let straddle = straddler.map(|i| [i]);
            let insns: *const [Insn] = match &straddle {
                Some(one) => one.as_slice(),
                None => self.cache.block(block),
            };
            // SAFETY: the block's instructions are not freed or moved while it runs:
            // blocks are boxed, inserted only by `find_block` above, and flushed only
            // after the loop (FENCE.I defers its flush to `code_flush_pending`).
            let insns = unsafe { &*insns };
            // While the block runs, `pc` and `instret` stay at its first instruction
            // (each instruction's own are `pc + off`, `instret + idx`): no
            // per-instruction update, and no chain of them through memory. Once it is
            // left, they are settled, and `left` says how it was left.
            let left = match code {
                Some(code) => {
                    self.chain_codes = self.cache.codes_ptr();
                    let mut bus_ref = crate::jit::BusRef(&mut *bus);
                    // SAFETY: `code` was compiled from `insns`, which stay where they are
                    // while it runs (above), as do the blocks it may chain to (nothing
                    // inserts or flushes blocks inside compiled code); it gets this hart
                    // and a live `BusRef`, and touches nothing else of them but through
                    // `exec`.
                    let r = unsafe {
                        code(
                            self as *mut Cpu,
                            (&mut bus_ref as *mut crate::jit::BusRef<'_>).cast(),
                        )
                    };
                    // Compiled code settles `pc` and `instret` itself (see `jit`).
                    match r {
                        r if r == Flow::Wfi as u32 => Flow::Wfi,
                        r if r == Flow::Trap as u32 => Flow::Trap,
                        _ => Flow::Next,
                    }
                }
                None => {
                    let mut left = insns.last().map(|l| (Flow::Next, l));
                    for insn in insns {
                        match self.exec(insn, bus) {
                            Flow::Next => {}
                            f => {
                                left = Some((f, insn));
                                break;
                            }
                        }
                    }
                    match left {
                        Some((f, insn)) => {
                            self.retire(f, insn);
                            f
                        }
                        None => Flow::Next,
                    }
                }
            };
            match left {
                Flow::Wfi => {
                    if self.mip(bus) & self.csr.mie == 0 {
                        return RunExit::Wfi;
                    }
                    self.irq_check_at = 0;
                }
                Flow::Trap => {
                    let e = self.pending_exception;
                    if self.exit_on_exception {
                        return RunExit::Exception(e);
                    }
                    traps += 1;
                    self.take_exception(e);
                }
                Flow::Next | Flow::Jump => {}
            }
            if self.code_flush_pending {
                self.code_flush_pending = false;
                self.cache.new_code_epoch();
            }
            if self.device_touched {
                self.device_touched = false;
                self.irq_check_at = 0;
                if bus.stop_requested() {
                    return RunExit::Stop;
                }
            }
        }
        RunExit::Budget
    }

    /// Reads a CSR as the current privilege may; Err is an illegal instruction.
    pub(crate) fn csr_read(&mut self, bus: &mut dyn Bus, addr: u16) -> Result<u64, ()> {
        let min_priv = (addr >> 8) & 3;
        if (self.prv as u16) < min_priv {
            return Err(());
        }
        let fs_off = self.csr.mstatus & status::FS == 0;
        Ok(match addr {
            csr::FFLAGS | csr::FRM | csr::FCSR if fs_off => return Err(()),
            csr::FFLAGS => self.csr.fflags,
            csr::FRM => self.csr.frm,
            csr::FCSR => (self.csr.frm << 5) | self.csr.fflags,
            csr::CYCLE | csr::TIME | csr::INSTRET => {
                let bit = 1u64 << (addr - csr::CYCLE);
                if (self.prv < Priv::Machine && self.csr.mcounteren & bit == 0)
                    || (self.prv == Priv::User && self.csr.scounteren & bit == 0)
                {
                    return Err(());
                }
                if addr == csr::TIME {
                    self.mtime()
                } else {
                    self.instret
                }
            }
            0xc03..=0xc1f => 0,
            csr::SSTATUS => self.csr.mstatus_read() & status::S_VISIBLE,
            csr::SIE => self.csr.mie & self.csr.mideleg,
            csr::STVEC => self.csr.stvec,
            csr::SCOUNTEREN => self.csr.scounteren,
            csr::SENVCFG => self.csr.senvcfg,
            csr::SSCRATCH => self.csr.sscratch,
            csr::SEPC => self.csr.sepc,
            csr::SCAUSE => self.csr.scause,
            csr::STVAL => self.csr.stval,
            csr::SIP => self.mip(bus) & self.csr.mideleg,
            csr::SATP => {
                if self.prv == Priv::Supervisor && self.csr.mstatus & status::TVM != 0 {
                    return Err(());
                }
                self.csr.satp
            }
            csr::MVENDORID | csr::MARCHID | csr::MIMPID | csr::MCONFIGPTR => 0,
            csr::MHARTID => self.hartid,
            csr::MSTATUS => self.csr.mstatus_read(),
            csr::MISA => csr::MISA_VALUE,
            csr::MEDELEG => self.csr.medeleg,
            csr::MIDELEG => self.csr.mideleg,
            csr::MIE => self.csr.mie,
            csr::MTVEC => self.csr.mtvec,
            csr::MCOUNTEREN => self.csr.mcounteren,
            csr::MENVCFG => self.csr.menvcfg,
            csr::MCOUNTINHIBIT => self.csr.mcountinhibit,
            csr::MSCRATCH => self.csr.mscratch,
            csr::MEPC => self.csr.mepc,
            csr::MCAUSE => self.csr.mcause,
            csr::MTVAL => self.csr.mtval,
            csr::MIP => self.mip(bus),
            0x3a0..=0x3af => {
                let i = (addr - csr::PMPCFG0) as usize;
                // RV64 has only the even pmpcfg registers.
                if i % 2 == 1 {
                    return Err(());
                }
                self.csr.pmpcfg.get(i / 2).copied().unwrap_or(0)
            }
            0x3b0..=0x3ef => self
                .csr
                .pmpaddr
                .get((addr - csr::PMPADDR0) as usize)
                .copied()
                .unwrap_or(0),
            csr::MCYCLE | csr::MINSTRET => self.instret,
            0xb03..=0xb1f | 0x323..=0x33f => 0,
            // The debug trigger module is absent: tselect reads back as none.
            csr::TSELECT => 0,
            0x7a1..=0x7a3 => 0,
            _ => return Err(()),
        })
    }

    /// Writes a CSR; Err is an illegal instruction (read-only, absent or privileged).
    pub(crate) fn csr_write(&mut self, addr: u16, v: u64) -> Result<(), ()> {
        if addr >> 10 == 3 || (self.prv as u16) < (addr >> 8) & 3 {
            return Err(());
        }
        let fs_off = self.csr.mstatus & status::FS == 0;
        match addr {
            csr::FFLAGS | csr::FRM | csr::FCSR if fs_off => return Err(()),
            csr::FFLAGS => {
                self.csr.fflags = v & 0x1f;
                self.csr.mstatus |= status::FS;
            }
            csr::FRM => {
                self.csr.frm = v & 7;
                self.csr.mstatus |= status::FS;
            }
            csr::FCSR => {
                self.csr.fflags = v & 0x1f;
                self.csr.frm = (v >> 5) & 7;
                self.csr.mstatus |= status::FS;
            }
            csr::SSTATUS => {
                let m = status::S_WRITABLE;
                self.csr.mstatus = (self.csr.mstatus & !m) | (v & m);
                self.update_regime();
            }
            csr::SIE => {
                let m = self.csr.mideleg & csr::MIE_WRITABLE;
                self.csr.mie = (self.csr.mie & !m) | (v & m);
            }
            csr::STVEC => self.csr.stvec = v & !2,
            csr::SCOUNTEREN => self.csr.scounteren = v & 0xffff_ffff,
            csr::SENVCFG => self.csr.senvcfg = 0,
            csr::SSCRATCH => self.csr.sscratch = v,
            csr::SEPC => self.csr.sepc = v & !1,
            csr::SCAUSE => self.csr.scause = v,
            csr::STVAL => self.csr.stval = v,
            csr::SIP => {
                let m = self.csr.mideleg & trap::SSIP;
                self.csr.mip = (self.csr.mip & !m) | (v & m);
            }
            csr::SATP => {
                if self.prv == Priv::Supervisor && self.csr.mstatus & status::TVM != 0 {
                    return Err(());
                }
                // WARL: a mode we lack leaves satp unchanged.
                let mode = v >> 60;
                if matches!(mode, mmu::SATP_BARE | mmu::SATP_SV39 | mmu::SATP_SV48) {
                    self.csr.satp = v & !(0xffffu64 << 44);
                    self.flush_tlb();
                    self.update_regime();
                }
            }
            csr::MSTATUS => {
                let mut nv = (self.csr.mstatus & !status::M_WRITABLE) | (v & status::M_WRITABLE);
                // MPP = 2 is reserved: keep it legal.
                if (nv & status::MPP) >> status::MPP_SHIFT == 2 {
                    nv &= !status::MPP;
                }
                self.csr.mstatus = nv;
                self.update_regime();
            }
            csr::MISA => {}
            csr::MEDELEG => self.csr.medeleg = v & csr::MEDELEG_WRITABLE,
            csr::MIDELEG => self.csr.mideleg = v & csr::MIDELEG_WRITABLE,
            csr::MIE => self.csr.mie = v & csr::MIE_WRITABLE,
            csr::MTVEC => self.csr.mtvec = v & !2,
            csr::MCOUNTEREN => self.csr.mcounteren = v & 0xffff_ffff,
            csr::MENVCFG => self.csr.menvcfg = 0,
            csr::MCOUNTINHIBIT => self.csr.mcountinhibit = v & 0xffff_fffd,
            csr::MSCRATCH => self.csr.mscratch = v,
            csr::MEPC => self.csr.mepc = v & !1,
            csr::MCAUSE => self.csr.mcause = v,
            csr::MTVAL => self.csr.mtval = v,
            csr::MIP => {
                let m = csr::MIP_WRITABLE;
                self.csr.mip = (self.csr.mip & !m) | (v & m);
            }
            0x3a0..=0x3af => {
                let i = (addr - csr::PMPCFG0) as usize;
                if i % 2 == 1 {
                    return Err(());
                }
                if let Some(c) = self.csr.pmpcfg.get_mut(i / 2) {
                    *c = v;
                }
            }
            0x3b0..=0x3ef => {
                if let Some(a) = self.csr.pmpaddr.get_mut((addr - csr::PMPADDR0) as usize) {
                    *a = v & 0x003f_ffff_ffff_ffff;
                }
            }
            csr::MCYCLE | csr::MINSTRET => {
                self.instret = v;
                self.timer_check_at = 0;
            }
            0xb03..=0xb1f | 0x323..=0x33f => {}
            csr::TSELECT | 0x7a1..=0x7a3 => {}
            _ => return Err(()),
        }
        Ok(())
    }
}

/// The trap vector: direct, or base + 4 × cause for interrupts in vectored mode.
fn vector(tvec: u64, code: u64, interrupt: bool) -> u64 {
    let base = tvec & !3;
    if interrupt && tvec & 1 == 1 {
        base.wrapping_add(4 * code)
    } else {
        base
    }
}

/// Reads `size` bytes little-endian at `p`.
///
/// # Safety
/// `p..p+size` must be inside one RAM page of a live [`GuestRam`].
#[inline]
pub(crate) unsafe fn read_host(p: *mut u8, size: u8) -> u64 {
    // SAFETY: the caller guarantees the range is valid guest RAM; unaligned reads are
    // what the guest may ask for.
    unsafe {
        match size {
            1 => p.read() as u64,
            2 => (p as *const u16).read_unaligned() as u64,
            4 => (p as *const u32).read_unaligned() as u64,
            _ => (p as *const u64).read_unaligned(),
        }
    }
}

/// Writes the low `size` bytes of `v` little-endian at `p`.
///
/// # Safety
/// As for [`read_host`].
#[inline]
pub(crate) unsafe fn write_host(p: *mut u8, size: u8, v: u64) {
    // SAFETY: as in read_host.
    unsafe {
        match size {
            1 => p.write(v as u8),
            2 => (p as *mut u16).write_unaligned(v as u16),
            4 => (p as *mut u32).write_unaligned(v as u32),
            _ => (p as *mut u64).write_unaligned(v),
        }
    }
}
