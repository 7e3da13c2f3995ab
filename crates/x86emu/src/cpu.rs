//! The CPU object, its run loop and the API the VMM drives it with.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::code::CodeTracker;
use crate::cpuid::CpuidTable;
use crate::decode::{decode, BlockCache, Insn};
use crate::exceptions::{Fault, Result};
use crate::jit::{Ctx, FINISHED};
use crate::mmu::{needed_perm, Access, Tlb};
use crate::platform::{GuestRam, Platform};
use crate::state::{flags, CpuState, Seg, Segment};
use iced_x86::Instruction;

/// Why [`Cpu::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunExit {
    /// HLT: the CPU waits for an interrupt (inject one and run again). With IF=0 only an
    /// NMI or INIT can wake it.
    Halted,
    /// Triple fault: the VM should reset or stop.
    Shutdown,
    /// `max_instructions` were executed.
    InstructionLimit,
    /// The platform asked to stop after a device access.
    StopRequested,
    /// An interrupt window was requested and the CPU can now take an external interrupt.
    InterruptWindow,
    /// An application processor is waiting for INIT/SIPI.
    WaitForSipi,
    /// The flag given to [`Cpu::set_kick`] was raised (another thread has an event for
    /// this CPU) while it could take an interrupt.
    Kicked,
    /// The CPU ran [`PAUSE_SPIN`] PAUSEs: it is spinning on a lock or a flag another
    /// vCPU will release, and a VMM with more vCPUs than host CPUs should let that one
    /// run (KVM's pause-loop exit).
    Paused,
}

/// PAUSEs before `run` returns [`RunExit::Paused`]: compiled code counts them too and
/// leaves before the last, so a spin of this many is under a microsecond compiled (a few
/// interpreted). 512 made no difference to an 8-vCPU boot on 2 host cores.
pub const PAUSE_SPIN: u32 = 64;

/// A software x86-64 CPU: the architectural core plus its decoded-block cache.
///
/// Everything except running lives on [`Core`], reachable through `Deref`.
#[derive(Debug)]
pub struct Cpu {
    core: Core,
    // Kept beside the core, not inside it, so an instruction can be borrowed from the cache
    // while its handler borrows the core mutably.
    blocks: BlockCache,
}

impl std::ops::Deref for Cpu {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
    }
}

impl std::ops::DerefMut for Cpu {
    fn deref_mut(&mut self) -> &mut Core {
        &mut self.core
    }
}

/// The architectural side of a [`Cpu`]: registers, TLB, RAM map, CPUID and event state.
/// Entries of the cache of decoded page-crossing instructions.
const CROSSING_SLOTS: usize = 256;

/// A decoded page-crossing instruction and the bytes it came from.
#[derive(Clone, Copy)]
pub(crate) struct Crossing {
    ip: u64,
    bitness: u32,
    /// The 15 bytes it may span, and a zero.
    bytes: [u8; 16],
    insn: Insn,
}

impl std::fmt::Debug for Crossing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Crossing({:#x})", self.ip)
    }
}

#[derive(Debug)]
pub struct Core {
    pub(crate) s: CpuState,
    /// What compiled code reads besides the state, at `jit_ctx_disp` bytes from it.
    pub(crate) jit: Ctx,
    pub(crate) ram: GuestRam,
    pub(crate) tlb: Tlb,
    pub(crate) cpuid: CpuidTable,
    /// Set by HLT; cleared by interrupt delivery.
    pub(crate) halted: bool,
    /// STI / MOV SS shadow: blocks external interrupts until after the next instruction.
    pub(crate) shadow: bool,
    /// Shadow set by the instruction being executed, applied when it completes.
    pub(crate) new_shadow: bool,
    /// The current instruction touched MMIO or ports.
    pub(crate) io_done: bool,
    /// RIP of the instruction after the current one; branches overwrite it.
    pub(crate) next_rip: u64,
    pub(crate) nmi_pending: bool,
    /// NMIs are blocked from NMI delivery until the next IRET.
    pub(crate) nmi_blocked: bool,
    pub(crate) wait_for_sipi: bool,
    pub(crate) window_request: bool,
    pub(crate) shutdown: bool,
    pub(crate) tsc: TscClock,
    /// Events delivered and SYSCALLs run (see `kernel_entries`).
    pub(crate) entries: u64,
    /// Instructions retired since creation.
    pub(crate) retired: u64,
    /// Blocks the run loop looked up and started (compiled code's own chaining aside).
    pub(crate) dispatched: u64,
    /// Set when a page walk lost an A/D-bit update race; the walk is retried.
    pub(crate) walk_raced: bool,
    /// Moves whenever code cached in the block cache may have changed (see `decode`).
    pub(crate) code_epoch: u64,
    /// A block was checked at CPL3 since [`Core::code_written_elsewhere`].
    pub(crate) user_code_checked: bool,
    /// Which RAM pages hold checked code, shared with the VM's other CPUs.
    pub(crate) code: Arc<CodeTracker>,
    /// `code.writes()` when this CPU last looked.
    code_writes_seen: u64,
    /// Moves when this CPU stored to checked code or saw others' writes to it: the run
    /// loop leaves the block (or chain) it is in, and takes up `stale_pages`.
    pub(crate) code_events: u64,
    /// RAM pages written since their blocks were last checked, for the run loop to make
    /// the block cache check those blocks again (`BlockCache::stale_pages`).
    pub(crate) stale_pages: Vec<usize>,
    /// The pages the instruction running stores to while they hold checked code, or that
    /// another CPU marked as code while the store was on its way (see `stores_done`): the
    /// first `stored_pages` of `stored_code`, or `code::ANY_PAGE` past its length (a
    /// string instruction may store to many).
    pub(crate) stored_code: [usize; 4],
    pub(crate) stored_pages: usize,
    /// Raised by other threads when they have an interrupt for this CPU (see `set_kick`).
    kick: Option<Arc<AtomicBool>>,
    /// Stubs that run instructions on the host CPU (`exec::hostexec`).
    pub(crate) hostexec: crate::exec::hostexec::HostExec,
    /// Decoded page-crossing instructions (see `fetch_slow`).
    pub(crate) crossing: Box<[Option<Crossing>]>,
    /// See `Cpu::set_recheck_each_run`.
    recheck_each_run: bool,
}

impl Cpu {
    /// A CPU in the reset state (real mode, F000:FFF0) with the given RAM map.
    pub fn new(ram: GuestRam) -> Self {
        Cpu {
            core: Core::new(ram),
            blocks: BlockCache::new(),
        }
    }

    /// Compile 64-bit blocks to host code after they ran `threshold` times (0: at once),
    /// or never (None). By default on where the host allows it (x86-64 with BMI2).
    pub fn set_jit_threshold(&mut self, threshold: Option<u32>) {
        self.blocks.set_jit_threshold(threshold);
    }

    /// The tracker of code pages, to share with the VM's other CPUs.
    pub fn code_tracker(&self) -> Arc<CodeTracker> {
        self.code.clone()
    }

    /// Shares `t` (another CPU's tracker) so that code this CPU writes is checked again
    /// by the others and the other way round: required for CPUs that run at the same
    /// time on one guest RAM. Ignored if `t` does not cover this CPU's RAM.
    pub fn set_code_tracker(&mut self, t: Arc<CodeTracker>) {
        if t.pages() >= self.code.pages() {
            t.register(&self.tlb.writers);
            self.code = t;
            self.code_writes_seen = self.code.writes();
            self.code_epoch += 1;
        }
    }

    /// Whether every `run`, and every device access, checks cached blocks against memory
    /// again (the default), in case something else wrote code meanwhile. A VMM whose
    /// devices report their writes to guest RAM through `CodeTracker::note_external_write`
    /// turns this off: blocks are then checked again only after writes to pages holding
    /// code.
    pub fn set_recheck_each_run(&mut self, on: bool) {
        self.recheck_each_run = on;
    }

    /// See [`crate::testing::cut_links`].
    pub(crate) fn cut_links(&mut self) {
        self.blocks.cut_all_links();
    }

    /// Blocks compiled to host code so far (by this CPU).
    pub fn compiled_blocks(&self) -> u64 {
        self.blocks.compiled_blocks()
    }

    /// Blocks this CPU runs as code another CPU compiled (see [`Cpu::share_code`]).
    pub fn adopted_blocks(&self) -> u64 {
        self.blocks.adopted_blocks()
    }

    /// The memory this CPU places compiled code in, to share with the machine's other
    /// CPUs; None when it does not compile.
    pub fn code_cache(&self) -> Option<crate::CodeCache> {
        self.blocks.code_cache()
    }

    /// Places compiled code in `cache` (another CPU's, see [`Cpu::code_cache`]) and runs
    /// what the other CPUs compiled there: a block is then compiled once per machine, not
    /// once per CPU. Every CPU sharing it must share the code tracker too
    /// ([`Cpu::set_code_tracker`]) and the guest RAM. Drops what this CPU compiled.
    pub fn share_code(&mut self, cache: &crate::CodeCache) {
        self.blocks.share_code(cache);
    }

    /// Where this CPU offers the blocks it decodes (from now on), to share with the
    /// machine's other CPUs.
    pub fn decoded_blocks(&mut self) -> crate::DecodedBlocks {
        self.blocks.decoded_blocks()
    }

    /// Cached blocks this CPU compared with memory again and found unchanged, because
    /// their page was written (by any CPU or device) or everything was to be checked.
    pub fn rechecked_blocks(&self) -> u64 {
        self.blocks.rechecked_blocks()
    }

    /// Blocks this CPU decoded, and blocks it took from another CPU's decoding instead
    /// (see [`Cpu::share_decoded`]).
    pub fn decode_counts(&self) -> (u64, u64) {
        self.blocks.decode_counts()
    }

    /// Takes decoded blocks from `blocks` (another CPU's, see [`Cpu::decoded_blocks`]) on a
    /// miss before decoding, and offers this CPU's there: a block is then decoded once per
    /// machine while its bytes stay the same. The CPUs sharing it must share guest RAM.
    pub fn share_decoded(&mut self, blocks: &crate::DecodedBlocks) {
        self.blocks.share_decoded(blocks);
    }

    /// Sizes this CPU's block cache (`n` slots, rounded to a power of two; the default is
    /// [`crate::decode::DEFAULT_BLOCK_SLOTS`]), dropping what it holds. Each filled slot
    /// keeps a decoded block, so a VM with many CPUs gives each fewer.
    pub fn set_block_slots(&mut self, n: usize) {
        self.blocks.set_slots(n);
    }

    /// Lets the block cache double, up to `max` slots, while it evicts often: a vCPU
    /// given a share of the slots ([`Cpu::set_block_slots`]) that runs more of the
    /// guest's code than its share holds.
    pub fn let_block_slots_grow(&mut self, max: usize) {
        self.blocks.let_slots_grow(max);
    }
}

/// How far the compiled-code context lies from the state (compiled code reaches both
/// through R15).
pub(crate) const fn jit_ctx_disp() -> i64 {
    std::mem::offset_of!(Core, jit) as i64 - std::mem::offset_of!(Core, s) as i64
}

impl Core {
    fn new(ram: GuestRam) -> Self {
        let ram_pages = (ram.end() >> 12) as usize;
        let writers = Arc::new(crate::code::WriteMap::new(ram_pages));
        let code = Arc::new(CodeTracker::new((ram_pages as u64) << 12));
        code.register(&writers);
        Core {
            s: CpuState::reset(),
            jit: Ctx::default(),
            ram,
            tlb: Tlb::new(writers),
            cpuid: CpuidTable::default(),
            halted: false,
            shadow: false,
            new_shadow: false,
            io_done: false,
            next_rip: 0,
            nmi_pending: false,
            nmi_blocked: false,
            wait_for_sipi: false,
            window_request: false,
            shutdown: false,
            tsc: TscClock {
                epoch: Instant::now(),
                offset: 0,
                host: false,
            },
            entries: 0,
            retired: 0,
            dispatched: 0,
            walk_raced: false,
            code_epoch: 0,
            user_code_checked: false,
            code,
            code_writes_seen: 0,
            code_events: 0,
            stale_pages: Vec::new(),
            stored_code: [0; 4],
            stored_pages: 0,
            kick: None,
            hostexec: Default::default(),
            crossing: vec![None; CROSSING_SLOTS].into_boxed_slice(),
            recheck_each_run: true,
        }
    }

    /// The architectural register state.
    pub fn state(&self) -> &CpuState {
        &self.s
    }

    /// Replaces the register state (e.g. the VMM's boot-entry state); flushes cached
    /// translations since paging controls may have changed.
    pub fn set_state(&mut self, state: CpuState) {
        self.s = state;
        self.tlb.flush_all();
        self.halted = false;
        self.shutdown = false;
    }

    /// Mutable access to the state. Call [`Cpu::flush_tlb`] after changing CR0/CR3/CR4/EFER.
    pub fn state_mut(&mut self) -> &mut CpuState {
        &mut self.s
    }

    pub fn flush_tlb(&mut self) {
        self.tlb.flush_all();
    }

    /// Guest RAM map, e.g. for loading images in tests.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The CPUID table; the VMM may override leaves before the guest starts.
    pub fn cpuid_mut(&mut self) -> &mut CpuidTable {
        &mut self.cpuid
    }

    pub fn cpuid_table(&self) -> &CpuidTable {
        &self.cpuid
    }

    pub fn is_halted(&self) -> bool {
        self.halted
    }

    /// Instructions retired since the CPU was created.
    pub fn retired_instructions(&self) -> u64 {
        self.retired
    }

    /// Blocks the run loop has looked up and started since creation: what compiled code
    /// did not chain to by itself.
    pub fn dispatched_blocks(&self) -> u64 {
        self.dispatched
    }

    /// True if an external interrupt could be delivered now (IF=1, no STI/MOV SS shadow).
    pub fn interrupts_enabled(&self) -> bool {
        self.s.rflags & flags::IF != 0 && !self.shadow && !self.wait_for_sipi && !self.shutdown
    }

    /// A flag other threads raise when they have an event for this CPU: `run` polls it
    /// between blocks and returns [`RunExit::Kicked`] when it is up and the CPU can take
    /// an interrupt (without it, such an event waits for the end of the run).
    pub fn set_kick(&mut self, flag: Arc<AtomicBool>) {
        self.tlb.writers.set_kick(flag.clone());
        self.kick = Some(flag);
    }

    /// Ask `run` to return [`RunExit::InterruptWindow`] as soon as an interrupt can be taken.
    pub fn request_interrupt_window(&mut self, on: bool) {
        self.window_request = on;
    }

    /// Delivers external interrupt `vector` now if [`Cpu::interrupts_enabled`]; returns
    /// whether it was accepted (the caller keeps it pending otherwise).
    pub fn inject_external_interrupt(&mut self, platform: &mut dyn Platform, vector: u8) -> bool {
        if !self.interrupts_enabled() {
            return false;
        }
        self.halted = false;
        self.deliver_event(platform, Fault::new(vector), true);
        true
    }

    /// Queues an NMI, taken before the next instruction unless NMIs are blocked.
    pub fn inject_nmi(&mut self) {
        self.nmi_pending = true;
    }

    /// INIT: reset to the power-on state except that an AP then waits for SIPI.
    /// Keeps the RAM map, CPUID table and the APIC base MSR.
    pub fn init(&mut self, wait_for_sipi: bool) {
        let apic_base = self.s.msr.apic_base;
        self.s = CpuState::reset();
        self.s.msr.apic_base = apic_base;
        self.tlb.flush_all();
        self.halted = false;
        self.shutdown = false;
        self.shadow = false;
        self.nmi_pending = false;
        self.nmi_blocked = false;
        self.wait_for_sipi = wait_for_sipi;
    }

    /// Startup IPI: begin real-mode execution at vector * 0x1000.
    pub fn sipi(&mut self, vector: u8) {
        if !self.wait_for_sipi {
            return;
        }
        self.wait_for_sipi = false;
        self.s.seg[Seg::Cs as usize] = Segment::real_mode(u16::from(vector) << 8, true);
        self.s.rip = 0;
        self.halted = false;
    }

    #[inline]
    pub(crate) fn mask_ip(&self, ip: u64) -> u64 {
        match self.s.bitness() {
            64 => ip,
            32 => ip & 0xffff_ffff,
            _ => ip & 0xffff,
        }
    }

    /// The cached decoding of the page-crossing instruction at `ip` (linear `lin`) whose
    /// bytes in its first page are `first`, if its bytes in the next page are unchanged
    /// too; None sends the caller the slow way (which also raises any fault).
    fn crossing_hit(
        &mut self,
        lin: u64,
        ip: u64,
        bitness: u32,
        user: bool,
        first: &[u8],
    ) -> Option<Insn> {
        let slot = ((ip ^ (ip >> 12)) as usize) % CROSSING_SLOTS;
        let c = self.crossing.get(slot)?.as_ref()?;
        let n1 = first.len();
        if c.ip != ip || c.bitness != bitness || n1 >= 15 {
            return None;
        }
        let (want, insn) = (c.bytes, c.insn);
        let t = self
            .translate(
                self.wrap_lin(lin.wrapping_add(n1 as u64)),
                Access::Fetch,
                user,
            )
            .ok()?;
        if t.host.is_null() {
            return None;
        }
        let mut buf = [0u8; 16];
        buf[..n1].copy_from_slice(first);
        // SAFETY: `t.host` is a valid 4 KiB RAM page and 15 - n1 < 4096 bytes are read
        // from its start.
        let rest = unsafe { std::slice::from_raw_parts(t.host, 15 - n1) };
        buf[n1..15].copy_from_slice(rest);
        (u128::from_le_bytes(buf) == u128::from_le_bytes(want)).then_some(insn)
    }

    /// Page-crossing or MMIO-resident code. `crossing`: the caller found that the
    /// instruction does not end in its first page.
    #[cold]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn fetch_slow(
        &mut self,
        p: &mut dyn Platform,
        lin: u64,
        off: usize,
        bitness: u32,
        ip: u64,
        user: bool,
        crossing: bool,
    ) -> Result<Insn> {
        // Gather bytes page by page, only touching the next page if the instruction really
        // extends into it.
        let first = 4096 - off;
        let mut buf = [0u8; 15];
        let n1 = first.min(15);
        self.read_lin_slow(p, lin, &mut buf[..n1], user, Access::Fetch)?;
        if !crossing {
            if let Some(ins) = decode(bitness, ip, &buf[..n1]) {
                return Ok(Insn::new(ins));
            }
        }
        self.read_lin_slow(
            p,
            self.wrap_lin(lin.wrapping_add(n1 as u64)),
            &mut buf[n1..],
            user,
            Access::Fetch,
        )?;
        // Page-crossing instructions cannot live in the block cache, yet a hot loop runs
        // them over and over: keep them decoded here, keyed by their bytes (so code that
        // changed is decoded again).
        let slot = ((ip ^ (ip >> 12)) as usize) % CROSSING_SLOTS;
        let mut bytes = [0u8; 16];
        bytes[..15].copy_from_slice(&buf);
        if let Some(Some(c)) = self.crossing.get(slot) {
            if c.ip == ip && c.bitness == bitness && c.bytes == bytes {
                return Ok(c.insn);
            }
        }
        let ins = decode(bitness, ip, &buf).ok_or(Fault::ud())?;
        let insn = Insn::new(ins);
        if let Some(e) = self.crossing.get_mut(slot) {
            *e = Some(Crossing {
                ip,
                bitness,
                bytes,
                insn,
            });
        }
        Ok(insn)
    }

    /// Current time-stamp counter: 1 GHz of host monotonic time plus the guest's offset.
    /// Count the TSC from `epoch` (TSC = ns since it), so every vCPU of a VM agrees.
    pub fn set_tsc_epoch(&mut self, epoch: Instant) {
        self.tsc.epoch = epoch;
        self.tsc.offset = 0;
    }

    /// Make the TSC the host's RDTSC plus the guest's offset, for a VMM that also runs guest
    /// code natively (where RDTSC is the host's) and tells the guest the host's TSC rate.
    pub fn set_tsc_host(&mut self, host: bool) {
        self.tsc.host = host;
        self.tsc.offset = 0;
    }

    pub(crate) fn tsc(&self) -> u64 {
        self.tsc.now()
    }

    pub(crate) fn set_tsc(&mut self, v: u64) {
        self.tsc.offset = v.wrapping_sub(self.tsc.base());
    }

    /// How many times the CPU entered its kernel: events delivered (exceptions, interrupts,
    /// NMIs) and SYSCALLs run. A VMM can tell from it whether a slice ran user code only.
    pub fn kernel_entries(&self) -> u64 {
        self.entries
    }

    /// How many TLB flushes (INVLPG, CR3 and paging-mode writes, `flush_tlb`) the CPU did:
    /// a VMM that keeps another translation of the guest's page tables (a KVM vCPU's
    /// shadow) must drop it when this moved.
    pub fn tlb_flushes(&self) -> u64 {
        self.tlb.flushes
    }

    /// Guest user code ran somewhere x86emu does not see its stores (natively, on a KVM
    /// vCPU), and may have rewritten code (a JIT's, also one that flips its pages between
    /// writable and executable): if x86emu checked user code since the last call, every
    /// block is checked against memory again before it runs. Blocks checked earlier were
    /// made stale by an earlier call already.
    pub fn code_written_elsewhere(&mut self) {
        // The other CPUs' serialising instructions cannot trust the count of writes now.
        self.code.note_unseen_stores();
        if std::mem::take(&mut self.user_code_checked) {
            self.code_epoch += 1;
        }
    }

    /// Watches guest page `pfn` as a page table another translator may copy: its next
    /// store, by compiled code too, is noted for [`crate::ptwatch::TableWatch`].
    pub fn watch_page_table(&mut self, pfn: usize) {
        if self.code.watch_table(pfn, &self.tlb.writers) {
            self.tlb.strip_page(pfn);
        }
    }

    /// Notes that `gpa_page` holds code checked in the current code epoch.
    fn mark_code_page(&mut self, gpa_page: u64) {
        let pfn = (gpa_page >> 12) as usize;
        if self.code.mark(pfn, &self.tlb.writers) {
            self.tlb.strip_page(pfn);
        }
    }

    /// Strips the entries other CPUs asked for (pages they marked as code), and counts a
    /// code write to each page this CPU could store to until now, since compiled code may
    /// have stored to it unnoticed after the mark.
    #[cold]
    fn strip_requested(&mut self) {
        // Noted whether or not the entry is still there: one evicted since may have
        // been stored through.
        for pfn in self.tlb.writers.take_requests() {
            self.tlb.strip_page(pfn);
            // Counted once: those stores are made already, so unlike an instruction's
            // (`note_write`) they need no count once made. Listed with the instruction's
            // stores, they piled up over the blocks of a run (nothing is made there)
            // until the list overflowed into "any page", which sent every CPU to check
            // all its blocks again: 2M checks in an 8-vCPU Debian boot, 16k on 1 vCPU.
            if self.code.note_write(pfn) {
                self.code_events += 1;
            }
        }
        self.tlb.writers.requests_done();
    }

    /// A serialising instruction (CPUID): from here on this CPU must run code as memory
    /// holds it, also code another vCPU just wrote (x86's cross-modifying-code protocol).
    /// Every store to checked code is noted in the tracker's count of writes, except a
    /// store through a TLB entry another CPU was asked to strip and has not yet, and the
    /// hybrid accelerator's native stores where KVM's dirty log does not report them:
    /// only while some CPU may have made one are all cached blocks checked again. (Checking
    /// them all at every CPUID cost a multi-vCPU guest a tenth of each process start:
    /// ld.so runs CPUID dozens of times.)
    pub(crate) fn serialise_code(&mut self) {
        if !self.code.shared() {
            return;
        }
        if self.tlb.writers.pending() {
            self.strip_requested();
        }
        if self.code.stores_unseen() || self.code.stores_unnoted(&self.tlb.writers) {
            self.code_epoch += 1;
            return;
        }
        let w = self.code.writes();
        if w != self.code_writes_seen {
            self.see_written(w);
        }
    }

    /// A write to `gpa_page`: if it holds checked code, its blocks must be checked again,
    /// on every CPU (this one too) once it sees the tracker's count move.
    #[inline(always)]
    pub(crate) fn note_write(&mut self, gpa_page: u64) {
        let pfn = (gpa_page >> 12) as usize;
        if self.code.note_write(pfn) {
            self.code_events += 1;
            self.note_stored_code(pfn);
        }
    }

    /// The instruction running stores to checked code in page `pfn`: see `stored_code`.
    pub(crate) fn note_stored_code(&mut self, pfn: usize) {
        let n = self.stored_pages;
        let known = self.stored_code.get(..n).unwrap_or_default();
        if known.contains(&pfn) || known.contains(&crate::code::ANY_PAGE) {
            return;
        }
        match self.stored_code.get_mut(n) {
            Some(p) => {
                *p = pfn;
                self.stored_pages += 1;
            }
            None => {
                if let Some(last) = self.stored_code.last_mut() {
                    *last = crate::code::ANY_PAGE;
                }
            }
        }
    }

    /// Takes up the writes to checked code up to count `w`: their pages' blocks are
    /// checked again, or every block when the log no longer names them all.
    #[cold]
    fn see_written(&mut self, w: u64) {
        let from = std::mem::replace(&mut self.code_writes_seen, w);
        self.code_events += 1;
        if w.wrapping_sub(from) > crate::code::WRITE_LOG as u64 {
            self.code_epoch += 1;
            return;
        }
        for seq in from..w {
            match self.code.written_page(seq) {
                Some(pfn) => self.stale_pages.push(pfn),
                None => {
                    self.code_epoch += 1;
                    self.stale_pages.clear();
                    return;
                }
            }
        }
    }

    /// After an interpreted instruction: a store to checked code was noted before it was
    /// made (at its translation), so another CPU may have checked the code again in
    /// between and kept the old bytes; counting the write once more now that it is made
    /// (before this CPU's next store, such as the flag of the cross-modifying-code
    /// protocol) makes that CPU check again at its next serialising instruction.
    #[inline(always)]
    pub(crate) fn stores_done(&mut self) {
        if self.stored_pages != 0 {
            self.count_stored_code();
        }
    }

    #[cold]
    fn count_stored_code(&mut self) {
        let n = std::mem::take(&mut self.stored_pages);
        for &pfn in self.stored_code.get(..n).unwrap_or_default() {
            self.code.count_write(pfn);
        }
    }

    /// Takes up the writes to checked code any CPU made since this one last looked.
    #[inline(always)]
    fn see_code_writes(&mut self) {
        if self.tlb.writers.pending() {
            self.strip_requested();
        }
        let w = self.code.writes();
        if w != self.code_writes_seen {
            self.see_written(w);
        }
    }

    /// Whether another thread raised the kick flag.
    fn kicked(&self) -> bool {
        self.kick
            .as_ref()
            .is_some_and(|k| k.load(Ordering::Relaxed))
    }

    /// What compiled code needs besides the registers (see `jit::Ctx`).
    /// What a page-crossing block's second page was checked in: the TLB generation (a
    /// CPU may use the translations it has until a flush) and the privilege its fetch
    /// permission was checked at.
    #[inline(always)]
    fn fetch_generation(&self, user: bool) -> u64 {
        self.tlb.flushes << 1 | u64::from(user)
    }

    #[inline(always)]
    fn fill_jit_ctx(&mut self, budget: u64, blocks: &BlockCache, bits: u32) {
        static NO_KICK: u8 = 0;
        let user = self.user();
        let (jc, jc_stamp) = blocks.jump_cache(user, bits == 32);
        let tlb = self.tlb.entries_ptr() as u64;
        let view = self.tlb.view_ptr() as u64;
        // With IF clear the flag is no reason to stop (`run` takes it up only once an
        // interrupt can be delivered): an interrupt left pending under CLI (the PIT's,
        // through a kernel decompressor's whole run) would otherwise end every block.
        let kick_armed = match &self.kick {
            Some(k) => k.as_ptr() as u64,
            None => &NO_KICK as *const u8 as u64,
        };
        let kick = if self.s.rflags & flags::IF != 0 {
            kick_armed
        } else {
            &NO_KICK as *const u8 as u64
        };
        self.jit = Ctx {
            tlb,
            fetch_perm: u64::from(needed_perm(Access::Fetch, user)),
            read_tags: view + crate::mmu::tlb_tag_offset(false, user),
            write_tags: view + crate::mmu::tlb_tag_offset(true, user),
            addends: view + crate::mmu::tlb_addend_offset(),
            page_mask: !0xfff,
            blocks: blocks.slots_ptr() as u64,
            block_mask: blocks.slot_mask(),
            fs_base: self.s.seg[Seg::Fs as usize].base,
            gs_base: self.s.seg[Seg::Gs as usize].base,
            epoch: self.code_epoch,
            jc,
            jc_stamp: !jc_stamp,
            jc_mask: (crate::jit::JUMP_CACHE - 1) as u64,
            bits: u64::from(bits),
            budget,
            tlb_gen: self.fetch_generation(user),
            kick,
            kick_armed,
            simd: u64::from(self.sse_check().is_ok()) | u64::from(self.avx_check().is_ok()) << 1,
            cli_ok: u64::from(self.iopl_ok()),
            sti_ok: u64::from(self.iopl_ok() && !self.window_request),
            cpl0: u64::from(self.s.cpl() == 0),
            rdtsc_ok: u64::from(self.s.cr4 & crate::state::cr::CR4_TSD == 0 || self.s.cpl() == 0),
            tsc: &self.tsc as *const TscClock as u64,
            rdtsc: jit_rdtsc as *const () as usize as u64,
            pauses: self.jit.pauses,
            rip: 0,
            link: 0,
            slot: 0,
        };
    }

    /// Whether CLI and STI may run (CPL <= IOPL, or real mode).
    fn iopl_ok(&self) -> bool {
        !self.s.protected()
            || u64::from(self.s.cpl()) <= (self.s.rflags & crate::state::flags::IOPL) >> 12
    }

    /// A valid encoding this CPU does not implement (or one the mode forbids) is worth
    /// knowing about when a guest dies of #UD.
    #[cold]
    fn note_ud(&self, ins: &Instruction, f: &Fault) {
        if f.vector == crate::exceptions::vector::UD && !ins.is_invalid() {
            tracing::debug!(rip = self.s.rip, mnemonic = ?ins.mnemonic(), code = ?ins.code(), "#UD");
        }
    }

    /// Delivers the exception an instruction raised (a trap-like one after the instruction).
    fn fault(&mut self, p: &mut dyn Platform, f: Fault) {
        if f.soft {
            self.s.rip = self.mask_ip(self.next_rip);
        }
        self.deliver_event(p, f, false);
    }

    #[inline(always)]
    pub(crate) fn execute(&mut self, p: &mut dyn Platform, insn: &Insn) -> Result<()> {
        self.next_rip = insn.instr.next_ip();
        if let Err(f) = (insn.handler)(self, p, insn) {
            self.note_ud(&insn.instr, &f);
            return Err(f);
        }
        self.s.rip = self.mask_ip(self.next_rip);
        self.shadow = self.new_shadow;
        self.retired += 1;
        Ok(())
    }
}

impl Cpu {
    /// Runs until an exit condition or until about `max_instructions` have been executed
    /// (a block in progress is finished first).
    pub fn run(&mut self, platform: &mut dyn Platform, max_instructions: u64) -> RunExit {
        self.blocks.enter_run();
        // Before any store: requests that came while this CPU was out are taken in the
        // loop before it runs a block (see `Core::serialise_code`).
        self.core.tlb.writers.set_running(true);
        let exit = self.run_blocks(platform, max_instructions);
        self.core.stores_done();
        if self.core.code.shared() {
            // Its last stores may still be in the host's store buffer: a CPU that marks a
            // page after this looked at `pending` (and so asks nothing of a CPU no longer
            // running) must find them when it compares the page's blocks. Dekker's pattern
            // with the SeqCst store in `WriteMap::request`.
            std::sync::atomic::fence(Ordering::SeqCst);
        }
        if self.core.tlb.writers.pending() {
            self.core.strip_requested();
        }
        self.core.tlb.writers.set_running(false);
        self.blocks.leave_run();
        exit
    }

    fn run_blocks(&mut self, platform: &mut dyn Platform, max_instructions: u64) -> RunExit {
        // Devices and the VMM may have written code since the last run (unless they
        // report their writes; other vCPUs' are seen through the code tracker).
        if self.recheck_each_run {
            self.code_epoch += 1;
        }
        let model = self.core.hostexec_isa();
        self.blocks.set_jit_model(model);
        let mut done = 0u64;
        loop {
            if self.shutdown {
                return RunExit::Shutdown;
            }
            if self.wait_for_sipi {
                return RunExit::WaitForSipi;
            }
            if self.nmi_pending && !self.nmi_blocked && !self.shadow {
                self.nmi_pending = false;
                self.nmi_blocked = true;
                self.halted = false;
                self.deliver_event(platform, Fault::new(crate::exceptions::vector::NMI), true);
                continue;
            }
            if self.window_request && self.interrupts_enabled() {
                return RunExit::InterruptWindow;
            }
            if self.halted {
                return RunExit::Halted;
            }
            if done >= max_instructions {
                return RunExit::InstructionLimit;
            }
            if let Some(k) = &self.kick {
                if k.load(Ordering::Relaxed) && self.interrupts_enabled() {
                    return RunExit::Kicked;
                }
            }
            self.see_code_writes();
            if !self.core.stale_pages.is_empty() {
                self.blocks.stale_pages(&mut self.core.stale_pages);
            }
            self.blocks.see_flush();
            self.io_done = false;
            done += self.run_block(platform, max_instructions - done);
            if self.jit.pauses >= u64::from(PAUSE_SPIN) {
                self.jit.pauses = 0;
                return RunExit::Paused;
            }
            if self.io_done {
                // The device may have written guest memory, code included (unless devices
                // report their writes: see `set_recheck_each_run`).
                if self.recheck_each_run {
                    self.code_epoch += 1;
                }
                if platform.stop_requested() {
                    return RunExit::StopRequested;
                }
            }
        }
    }

    /// Executes one instruction and returns the exception it raised instead of delivering
    /// it (RIP stays on the faulting instruction). For debuggers, tests and fuzzing.
    pub fn execute_one(&mut self, p: &mut dyn Platform) -> core::result::Result<(), Fault> {
        self.io_done = false;
        self.fetch_and_execute(p)
    }

    /// Executes the block of instructions at CS:RIP, delivering any exception one raises,
    /// and the blocks its near branches lead to while they stay in the same code page (no
    /// new translation needed; or, where compiled code left through an exit not linked
    /// yet, in the page it left from) and within `budget` instructions. Returns how many
    /// instructions ran (at least one, counting a faulting one). Stops after a device
    /// access, a new interrupt shadow, HLT, a mode change, or a write to the code page.
    #[inline(always)]
    fn run_block(&mut self, p: &mut dyn Platform, budget: u64) -> u64 {
        if self.s.rflags & flags::TF != 0 {
            self.step(p);
            return 1;
        }
        let bitness = self.s.bitness();
        let cs_base = self.s.seg[Seg::Cs as usize].base;
        let mut lin = self.wrap_lin(cs_base.wrapping_add(self.s.rip));
        let user = self.user();
        let mut t = match self.core.translate(lin, Access::Fetch, user) {
            Ok(t) => t,
            Err(f) => {
                self.deliver_event(p, f, false);
                return 1;
            }
        };
        if t.host.is_null() {
            self.step(p);
            return 1;
        }
        let ip_mask = match bitness {
            64 => u64::MAX,
            32 => 0xffff_ffff,
            _ => 0xffff,
        };
        // Compiled 32-bit code takes offsets for linear addresses, and moves ESP as RSP's
        // low half (see `jit::cover::kind32`).
        let compiled_ok = bitness == 64
            || (bitness == 32
                && self.core.s.flat32()
                && self.core.s.seg[Seg::Ss as usize].default_big()
                && self.core.s.gpr[4] >> 32 == 0);
        let core = &mut self.core;
        let mut n = 0u64;
        // An exit of compiled code to link to the next block, and the compiled-code
        // generation it belongs to.
        let mut pending_link = None;
        loop {
            let gpa = t.gpa_page | (lin & 0xfff);
            let epoch = core.code_epoch;
            let events = core.code_events;
            // Marked before its bytes are compared (and again after): a CPU that stored to
            // the page and dropped its entry before a mark made after the compare would
            // be asked for nothing (see `Core::serialise_code`). A load when marked.
            core.mark_code_page(t.gpa_page);
            let found = match self.blocks.get(gpa, core.s.rip, bitness, t.host, epoch) {
                Some(f) => Some(f),
                // The first instruction runs past the page end: a block of its own, which
                // starts where this one would end.
                None => {
                    let next = core.wrap_lin((lin | 0xfff).wrapping_add(1));
                    match core.translate(next, Access::Fetch, user) {
                        Ok(tn) if !tn.host.is_null() => {
                            core.mark_code_page(tn.gpa_page);
                            let tlb_gen = core.fetch_generation(user);
                            let f = self.blocks.get_cross(
                                gpa,
                                core.s.rip,
                                bitness,
                                t.host,
                                tn.host,
                                tn.gpa_page,
                                tlb_gen,
                                epoch,
                            );
                            if let Some((_, true)) = f {
                                core.mark_code_page(tn.gpa_page);
                            }
                            f
                        }
                        _ => None,
                    }
                }
            };
            let Some((slot, checked)) = found else {
                if n > 0 {
                    return n;
                }
                // The slow way, which also raises any fault of the fetch.
                self.step(p);
                return 1;
            };
            if checked {
                core.mark_code_page(t.gpa_page);
                core.user_code_checked |= user;
            }
            self.blocks.sync_links(core.code_epoch, core.tlb.flushes);
            if let Some((link, generation)) = pending_link.take() {
                self.blocks.link(link, slot, generation);
            }
            let Some(mut block) = self.blocks.block(slot) else {
                return n.max(1);
            };
            core.dispatched += 1;
            let mut chain = false;
            // Only block-ending instructions (STI, MOV SS, HLT, POPF, IRET...) set an
            // interrupt shadow, halt or change TF, so the others skip those checks.
            core.shadow = false;
            core.new_shadow = false;
            let mut start = 0;
            let mut finished = false;
            if let (Some(c), Some(enter), true) =
                (block.compiled(), self.blocks.enter(), compiled_ok)
            {
                // At least 1 (the first block runs whatever the budget), at most 2^30 (the
                // chain entries' check needs it within +-2^31).
                let budget0 = budget.saturating_sub(n).clamp(1, 1 << 30);
                core.fill_jit_ctx(budget0, &self.blocks, bitness);
                let generation = self.blocks.generation();
                let cp: *mut Core = &mut *core;
                // SAFETY: compiled code reads and writes the state and the context beside
                // it (both in `*cp`, which nothing else references meanwhile), the TLB
                // entries, the code-page map and guest RAM through pointers the TLB holds,
                // all valid for the call.
                let r = unsafe {
                    enter(
                        std::ptr::addr_of_mut!((*cp).s),
                        std::ptr::addr_of_mut!((*cp).jit),
                        c.entry,
                    )
                };
                let ctx = &core.jit;
                // Every block entered was charged its length; one left early is refunded
                // below.
                let charged = budget0.wrapping_sub(ctx.budget);
                if r == FINISHED {
                    core.retired += charged;
                    n += charged;
                    core.s.rip = ctx.rip;
                    finished = true;
                    // Go on with the next block (if it is in this page), linking the exit
                    // taken to it; but not when the code stopped because the chain budget
                    // ran out or another thread raised the kick flag: `run` sees to those.
                    if ctx.link != 0 {
                        pending_link = Some((ctx.link as usize, generation));
                    }
                    chain = (ctx.budget as i64) > 0
                        && core.code_events == events
                        && !(core.kicked() && core.s.rflags & flags::IF != 0);
                } else {
                    // Left before instruction r of the block it was in (a TLB miss, or an
                    // instruction it does not cover): the interpreter goes on from there.
                    let Some(b) = self.blocks.block(ctx.slot as usize) else {
                        return n.max(1);
                    };
                    let ran = charged
                        .wrapping_sub(b.insns().len() as u64 - r.min(b.insns().len() as u64));
                    core.retired += ran;
                    n += ran;
                    block = b;
                    start = r as usize;
                    match block.insns().get(start) {
                        Some(next) => core.s.rip = next.instr.ip(),
                        None => return n.max(1),
                    }
                }
            }
            let rest = match (finished, block.insns().get(start..)) {
                (false, Some(rest)) => rest,
                _ => &[],
            };
            for insn in rest {
                n += 1;
                if insn.ends {
                    // A shadow an STI inside the block raised covered the instructions
                    // after it already; only this one's own counts.
                    core.new_shadow = false;
                    // May change the mode: `execute` masks the next RIP for the new one.
                    let r = core.execute(p, insn);
                    core.stores_done();
                    match r {
                        Ok(()) => {
                            chain = insn.near_branch
                                && !core.io_done
                                && core.code_epoch == epoch
                                && core.code_events == events
                        }
                        Err(f) => core.fault(p, f),
                    }
                    break;
                }
                core.next_rip = insn.instr.next_ip();
                let r = (insn.handler)(core, p, insn);
                core.stores_done();
                if let Err(f) = r {
                    core.note_ud(&insn.instr, &f);
                    core.fault(p, f);
                    break;
                }
                core.s.rip = core.next_rip & ip_mask;
                core.retired += 1;
                if core.next_rip != insn.instr.next_ip()
                    || core.io_done
                    || core.code_epoch != epoch
                    || core.code_events != events
                    || core.jit.pauses >= u64::from(PAUSE_SPIN)
                {
                    break;
                }
            }
            if !chain || n >= budget {
                return n;
            }
            let next = core.wrap_lin(cs_base.wrapping_add(core.s.rip));
            if next >> 12 != lin >> 12 {
                // Compiled code may have gone on into other pages (through its jump cache)
                // before it left through an exit not linked yet, whose target is in the
                // page it left from: go on there to link it. Returning left it unlinked
                // where every pass comes from another page (after a cut or an eviction):
                // 1000 process starts on an 8-vCPU guest left through such exits 8M times.
                if pending_link.is_none() {
                    return n;
                }
                match core.translate(next, Access::Fetch, user) {
                    Ok(tn) if !tn.host.is_null() => t = tn,
                    _ => return n,
                }
            }
            lin = next;
        }
    }

    /// Executes one instruction, delivering any exception it raises.
    pub(crate) fn step(&mut self, p: &mut dyn Platform) {
        // TF at the start of an instruction traps after it completes (single-step).
        let single_step = self.s.rflags & flags::TF != 0;
        match self.fetch_and_execute(p) {
            Ok(()) => {
                if single_step && !self.halted {
                    self.s.dr[6] |= 1 << 14;
                    self.deliver_event(p, Fault::new(crate::exceptions::vector::DB), false);
                }
            }
            Err(f) => self.core.fault(p, f),
        }
    }

    fn fetch_and_execute(&mut self, p: &mut dyn Platform) -> Result<()> {
        self.shadow = false;
        self.new_shadow = false;
        let insn = self.fetch(p)?;
        let r = self.core.execute(p, &insn);
        self.core.stores_done();
        r
    }

    /// Fetches and decodes the instruction at CS:RIP, bypassing the block cache (single
    /// steps, MMIO-resident and page-crossing code).
    fn fetch(&mut self, p: &mut dyn Platform) -> Result<Insn> {
        let bitness = self.s.bitness();
        let ip = self.s.rip;
        let lin = self.wrap_lin(self.s.seg[Seg::Cs as usize].base.wrapping_add(ip));
        let user = self.user();
        let t = self.translate(lin, Access::Fetch, user)?;
        let off = (lin & 0xfff) as usize;
        if !t.host.is_null() {
            // SAFETY: `t.host` is a valid 4 KiB RAM page and off < 4096; the slice lives only
            // for this function, while no other Rust reference to guest RAM exists.
            let avail: &[u8] = unsafe { std::slice::from_raw_parts(t.host.add(off), 4096 - off) };
            // A known page-crossing instruction: straight from its cache, without first
            // failing to decode it from this page.
            if avail.len() < 15 {
                if let Some(insn) = self.core.crossing_hit(lin, ip, bitness, user, avail) {
                    return Ok(insn);
                }
            }
            if let Some(ins) = decode(bitness, ip, avail) {
                return Ok(Insn::new(ins));
            }
        }
        let crossing = !t.host.is_null();
        self.core
            .fetch_slow(p, lin, off, bitness, ip, user, crossing)
    }
}

/// The time-stamp counter: 1 GHz of host monotonic time since `epoch` (or the host's own
/// TSC) plus the guest's offset. Compiled RDTSC reads it through `jit_rdtsc`.
#[derive(Debug)]
pub(crate) struct TscClock {
    pub(crate) epoch: Instant,
    pub(crate) offset: u64,
    /// The TSC is the host's own (see `Cpu::set_tsc_host`).
    pub(crate) host: bool,
}

impl TscClock {
    fn base(&self) -> u64 {
        #[cfg(target_arch = "x86_64")]
        if self.host {
            // SAFETY: RDTSC has no memory effects; every x86-64 host has it.
            return unsafe { std::arch::x86_64::_rdtsc() };
        }
        self.epoch.elapsed().as_nanos() as u64
    }

    pub(crate) fn now(&self) -> u64 {
        self.base().wrapping_add(self.offset)
    }
}

/// RDTSC for compiled code (which calls it with the SysV ABI).
///
/// # Safety
/// `clock` points to the running CPU's `TscClock`, which lives for the call.
pub(crate) unsafe extern "C" fn jit_rdtsc(clock: *const TscClock) -> u64 {
    // SAFETY: caller contract.
    unsafe { (*clock).now() }
}
