//! Hot blocks compiled to host x86-64 code.
//!
//! Guest and host are the same architecture, so most integer instructions can run as
//! themselves: the compiler re-encodes each guest instruction with host registers that it
//! first loads from the guest register file, runs it, and stores what it wrote back. The
//! guest's status flags live in the host's RFLAGS for the whole block (the code around the
//! instructions uses only flag-free instructions: `mov`, `lea`, `not`, BMI2 `shrx`/`pext`
//! and `jrcxz`). A memory operand goes through the soft TLB inline; a miss, a page-crossing
//! access, MMIO or a store to a page holding code leaves the compiled code before that
//! instruction, with every register and flag stored, and the interpreter goes on from
//! there. So compiled code never faults and never sees a device: what it cannot do fast,
//! the interpreter does.
//!
//! A block is compiled after it ran `threshold` times, in 64-bit mode or in 32-bit code
//! (run only with flat segments: see `cover::kind32`), from its first instruction up to
//! the first one the compiler does not cover (a near `Jcc`/`JMP` ending the block is
//! covered). Compiled code belongs to its block: it goes when the block is
//! decoded again.
//!
//! What compiled code needs besides the registers is a `Ctx` beside the state in the
//! `Core`, at a fixed distance from R15. A block entered through a link checks only the
//! kick flag and the instruction budget (each block is charged its length on entry); the
//! code epoch is not checked there, because every link is cut when it moves.

mod asm;
mod cover;
mod emit;
pub(crate) mod shared;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::decode::Insn;
use crate::decoded::Decoded;

/// What compiled code needs besides the register state; filled before each call. It lives
/// in the `Core`, at a fixed distance from the state (`cpu::jit_ctx_disp`), so compiled
/// code reaches it through R15 without loading a pointer first. Addresses are kept as
/// integers: only compiled code follows them.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct Ctx {
    /// The soft TLB's first entry.
    pub(crate) tlb: u64,
    /// The TLB permission bit a fetch needs at the current privilege.
    pub(crate) fetch_perm: u64,
    /// The arrays of the TLB's tags for a read and for a write at the current privilege,
    /// and of its host addends (see `mmu::JitView`): a memory access's slot indexes them.
    pub(crate) read_tags: u64,
    pub(crate) write_tags: u64,
    pub(crate) addends: u64,
    /// A constant for PEXT (whose mask may be a memory operand): the bits of a linear
    /// address that make its page number.
    pub(crate) page_mask: u64,
    /// The block cache's first slot (see `decode::block_layout`), and the mask that picks
    /// a slot.
    pub(crate) blocks: u64,
    pub(crate) block_mask: u64,
    pub(crate) fs_base: u64,
    pub(crate) gs_base: u64,
    /// The CPU's code epoch: compiled code's own lookup enters a block only if it was
    /// checked in this epoch.
    pub(crate) epoch: u64,
    /// In and out: instructions that blocks entered through links may still run (each
    /// block is charged its length on entry); negative once spent.
    pub(crate) budget: u64,
    /// The jump cache for the current privilege (`decode::JumpCache`): 32-byte entries
    /// of RIP, stamp and chain entry, which compiled code's lookup tries first, and the
    /// stamp its entries must carry to be valid.
    pub(crate) jc: u64,
    /// Complemented (see `emit::jump_cache_fill`).
    pub(crate) jc_stamp: u64,
    /// A PEXT mask (see `page_mask`): the bits of a RIP hash that pick its entry.
    pub(crate) jc_mask: u64,
    /// The bitness of the code running (64, or 32 in flat 32-bit segments), which
    /// compiled code's lookup checks a block against.
    pub(crate) bits: u64,
    /// The TLB generation (`Tlb::flushes`): a page-crossing block goes on only in the one
    /// its next page was checked in.
    pub(crate) tlb_gen: u64,
    /// A byte other threads raise when they have an interrupt for this CPU; under CLI one
    /// that never rises (the interrupt could not be taken), until a compiled STI puts
    /// `kick_armed` (the CPU's own flag) here.
    pub(crate) kick: u64,
    pub(crate) kick_armed: u64,
    /// SIMD state usable at the current CR0/CR4/XCR0: bit 0 SSE (no #UD/#NM), bit 1 AVX.
    pub(crate) simd: u64,
    /// 1 when CLI may run here (CPL <= IOPL; neither changes inside compiled code).
    pub(crate) cli_ok: u64,
    /// 1 when STI may run here: `cli_ok`, and no interrupt waits for IF (the interpreter
    /// then sets IF and stops after the next instruction).
    pub(crate) sti_ok: u64,
    /// 1 at CPL0 (for SWAPGS).
    pub(crate) cpl0: u64,
    /// 1 when RDTSC may run here (CR4.TSD clear, or CPL0).
    pub(crate) rdtsc_ok: u64,
    /// The CPU's TSC, and the function that reads it (`cpu::jit_rdtsc`).
    pub(crate) tsc: u64,
    pub(crate) rdtsc: u64,
    /// In and out: PAUSEs since `run` last returned `Paused` (compiled code counts them
    /// too, and leaves before the one that completes a spin, see `RunExit::Paused`).
    pub(crate) pauses: u64,
    /// Out, FINISHED: the next RIP.
    pub(crate) rip: u64,
    /// Out, FINISHED: the link slot of the exit taken, or 0 (see `BlockCache::link`).
    pub(crate) link: u64,
    /// Out, otherwise: the cache slot of the block the code left from.
    pub(crate) slot: u64,
}

/// Runs compiled code: `(state, ctx, entry)` → [`FINISHED`] when it ran to the end of the
/// block at `entry` (and maybe of blocks linked after it), or the index of the first
/// instruction it did not run in block `ctx.slot`.
pub(crate) type Enter = unsafe extern "C" fn(*mut crate::state::CpuState, *mut Ctx, u64) -> u64;

pub(crate) use emit::{jump_cache_index, FINISHED, JUMP_CACHE};

/// Where a compiled block's record lies in this CPU's view (see `shared::View`).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Record(u64);

#[derive(Clone, Copy)]
pub(crate) struct Compiled {
    /// Where [`Jit::enter`] starts the block.
    pub(crate) entry: u64,
    /// Where a linked exit of another block jumps to.
    pub(crate) chain_entry: u64,
}

/// The code memory of a machine, shared by its CPUs (only what compiled code fills is
/// ever touched). A Debian boot to its login prompt compiles about 40 MB per CPU when
/// each CPU compiles for itself; QEMU's TCG buffer is 1 GiB by default. Each CPU also
/// reserves as much again for its blocks' records (see `shared::View`).
pub(crate) const CODE_SIZE: usize = 128 << 20;
/// Runs before a block is compiled: compiling costs about as much as interpreting a block
/// a hundred times. In a Debian boot to login (VMM CPU, interleaved rounds), 128 was 4%
/// faster than 256 and than 64, once a full code arena no longer made every hot block
/// earn its compile again (in an earlier Linux boot 256 and 1024 were equally fast).
pub(crate) const DEFAULT_THRESHOLD: u32 = 128;

/// Why no code came back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NoCode {
    /// The block's first instructions are not covered.
    Uncovered,
    /// The code memory is full or waits for other CPUs to drop their blocks: the caller
    /// drops its compiled blocks (see `Jit::quiesce`) and tries again later.
    Full,
}

#[derive(Debug)]
pub(crate) struct Jit {
    shared: Arc<shared::Shared>,
    view: shared::View,
    mark: Arc<shared::Mark>,
    asm: asm::Asm,
    /// The code blocks share, at the start of the memory (in this view).
    rt: emit::Runtime,
    pub(crate) enter: Enter,
    pub(crate) threshold: u32,
    /// The CPU model's ISA bits (`hostexec::isa`) compiled code was made for.
    pub(crate) model: u64,
    /// Blocks this CPU compiled, and blocks it took as another CPU compiled them.
    pub(crate) compiled: u64,
    pub(crate) adopted: u64,
    /// `/tmp/perf-PID.map`, when `VESSEL_PERF_MAP` is set: names compiled code for `perf`.
    perf_map: Option<codemem::PerfMap>,
}

impl Jit {
    /// A compiler with code memory of its own. None when the host cannot run compiled
    /// blocks (not x86-64 with BMI2 and LAHF/SAHF in 64-bit mode, or no executable memory).
    pub(crate) fn new(threshold: u32) -> Option<Self> {
        Self::with(Arc::new(Self::memory(CODE_SIZE)?), threshold)
    }

    /// Code memory of `size` bytes with the runtime placed in it.
    pub(crate) fn memory(size: usize) -> Option<shared::Shared> {
        if !host_supported() {
            return None;
        }
        let mut asm = asm::Asm::new()?;
        shared::Shared::new(size, |at| {
            let (code, rt) = emit::runtime(&mut asm, at)?;
            Some((code, [rt.enter, rt.exit, rt.done, rt.second_way]))
        })
    }

    /// A compiler that places its code in `shared` and runs what other CPUs placed there.
    pub(crate) fn with(shared: Arc<shared::Shared>, threshold: u32) -> Option<Self> {
        let view = shared::View::new(&shared)?;
        let [enter, exit, done, second_way] = shared.rt.map(|off| view.at(off));
        let rt = emit::Runtime {
            enter,
            exit,
            done,
            second_way,
        };
        let mark = Arc::new(shared::Mark::default());
        {
            let mut inner = shared.lock();
            // Blocks from before the last flush are none of this CPU's.
            mark.seen
                .store(shared.flush.load(Ordering::SeqCst), Ordering::SeqCst);
            inner.marks.push(mark.clone());
            shared.cpus.store(inner.marks.len(), Ordering::Relaxed);
        }
        // SAFETY: `rt.enter` starts the function `runtime` emitted for this ABI, mapped
        // executable in this view.
        let enter_fn = unsafe { std::mem::transmute::<u64, Enter>(rt.enter) };
        let asm = asm::Asm::new()?;
        Some(Jit {
            shared,
            view,
            mark,
            asm,
            rt,
            enter: enter_fn,
            threshold,
            model: 0,
            compiled: 0,
            adopted: 0,
            perf_map: codemem::PerfMap::open(),
        })
    }

    /// The code memory, to hand to other CPUs of the machine.
    pub(crate) fn shared(&self) -> &Arc<shared::Shared> {
        &self.shared
    }

    /// Code for the block `insns` decoded from `bytes` (`key` says where): another CPU's
    /// if it compiled the same, else compiled now. `slot` is the block's cache slot, and
    /// `tlb_gen` (page-crossing blocks) the address of its TLB generation: both go in the
    /// block's record, with its links unlinked. With `warming` (runs since this CPU last
    /// asked; 0 to only look for another CPU's code), the block is compiled only once the
    /// machine's CPUs together ran it `threshold` times.
    ///
    /// `decoded`, the shared decoding the block's bytes are (for blocks within a page),
    /// holds the code placed for it and its heat: a CPU finds another's code, or counts
    /// its runs, there without taking the memory's lock. (Through the lock, the map and a
    /// comparison of the bytes, taking code and counting heat were an eighth of the host
    /// CPU an 8-vCPU Debian boot spent over a 1-vCPU one.)
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn compile(
        &mut self,
        key: shared::Key,
        bytes: &[u8],
        insns: &[Insn],
        slot: usize,
        tlb_gen: Option<*const u64>,
        warming: Option<u32>,
        decoded: Option<&Decoded>,
    ) -> Result<(Compiled, Record), NoCode> {
        if warming.is_some() && self.shared.cpus.load(Ordering::Relaxed) < 2 {
            // Alone, no other CPU compiles anything.
            return Err(NoCode::Uncovered);
        }
        // Page-crossing blocks are not shared (their decoding is this CPU's own).
        let decoded = decoded.filter(|_| tlb_gen.is_none());
        if let Some(d) = decoded {
            // No flush since it was placed: its memory is as it was placed, and stays so
            // while this CPU (inside `run`, not having seen a later flush) may run it.
            let flush = self.shared.flush.load(Ordering::SeqCst);
            if let Some(p) = d.placed(flush, key.model) {
                self.adopted += 1;
                return Ok(self.install(&p, slot, tlb_gen));
            }
            if let Some(runs) = warming {
                if runs == 0 {
                    return Err(NoCode::Uncovered);
                }
                let heat = d
                    .heat
                    .fetch_add(runs, Ordering::Relaxed)
                    .saturating_add(runs);
                if heat <= self.threshold {
                    return Err(NoCode::Uncovered);
                }
            }
        }
        // Borrowed, not cloned: an Arc clone here was a fifth of this function's time in an
        // 8-vCPU boot (every vCPU's first run of every block comes here, and the count's
        // cache line moves between them).
        let shared = &self.shared;
        let mut inner = shared.lock();
        if shared.flushing(&inner) {
            shared.try_reset(&mut inner);
            if shared.flushing(&inner) {
                return Err(NoCode::Full);
            }
        }
        if let Some(p) = inner
            .blocks
            .get(&key)
            .filter(|p| *p.bytes == *bytes)
            .cloned()
        {
            if let Some(d) = decoded {
                d.set_placed(inner.reset, key.model, &p);
            }
            drop(inner);
            self.adopted += 1;
            return Ok(self.install(&p, slot, tlb_gen));
        }
        if let (Some(runs), None) = (warming, decoded) {
            if runs == 0 {
                return Err(NoCode::Uncovered);
            }
            let heat = inner.heat.entry(key).or_default();
            *heat = heat.saturating_add(runs);
            if *heat <= self.threshold {
                return Err(NoCode::Uncovered);
            }
            inner.heat.remove(&key);
        }
        let off = shared::Shared::next(&inner);
        let at = self.view.at(off);
        // The record's distance from the code, the same in every view.
        let rec = inner.records;
        self.asm.record_at = shared.len + rec - off;
        let Some(t) = emit::translate(
            insns,
            at,
            tlb_gen.is_some(),
            self.model,
            &mut self.asm,
            &self.rt,
        ) else {
            return Err(NoCode::Uncovered);
        };
        let record = (emit::RECORD_LINKS + emit::LINK_SIZE * t.links.len() as u64) as usize;
        if !shared.place(&mut inner, off, &t.code, rec, record) {
            shared.request_flush(&mut inner);
            return Err(NoCode::Full);
        }
        let rel = |a: u64| (a - at) as usize;
        let p = Arc::new(shared::Placed {
            bytes: bytes.into(),
            ip: key.ip,
            off,
            len: t.code.len(),
            rec,
            entry: rel(t.entry),
            chain_entry: rel(t.chain_entry),
            links: t
                .links
                .iter()
                .map(|&(stub, fwd)| (rel(stub), fwd))
                .collect(),
        });
        inner.blocks.insert(key, p.clone());
        if let Some(d) = decoded {
            d.set_placed(inner.reset, key.model, &p);
        }
        drop(inner);
        self.compiled += 1;
        Ok(self.install(&p, slot, tlb_gen))
    }

    /// The block whose code has `record` moved to `slot` of the block cache.
    pub(crate) fn move_record(&mut self, record: Record, slot: usize) {
        self.view.write(record.0 + emit::RECORD_SLOT, slot as u64);
    }

    /// Fills the record of placed code for this CPU.
    fn install(
        &mut self,
        p: &shared::Placed,
        slot: usize,
        tlb_gen: Option<*const u64>,
    ) -> (Compiled, Record) {
        let start = self.view.at(p.off);
        let record = self.view.at(self.shared.len + p.rec);
        self.view.write(record + emit::RECORD_SLOT, slot as u64);
        self.view.write(
            record + emit::RECORD_TLB_GEN,
            tlb_gen.map_or(0, |g| g as u64),
        );
        for (i, &(stub, forward)) in p.links.iter().enumerate() {
            let link = record + emit::RECORD_LINKS + emit::LINK_SIZE * i as u64;
            let default = start + stub as u64;
            self.view.write(link, default);
            self.view.write(link + 8, default);
            self.view.write(link + 16, u64::from(forward));
        }
        if let Some(m) = &mut self.perf_map {
            m.name(start, p.len, format_args!("guest_{:x}", p.ip));
        }
        (
            Compiled {
                entry: start + p.entry as u64,
                chain_entry: start + p.chain_entry as u64,
            },
            Record(record),
        )
    }

    /// Points link slot `link` (in a record of this CPU) at `target`.
    pub(crate) fn link(&mut self, link: u64, target: u64) {
        self.view.write(link, target);
    }

    /// Whether link slot `link` is an exit to a higher IP than its own (see
    /// `BlockCache::link`).
    pub(crate) fn forward(&self, link: u64) -> bool {
        self.view.read(link + 16) != 0
    }

    /// Points link slot `link` back at its unlinked target (kept after it).
    pub(crate) fn unlink(&mut self, link: u64) {
        let default = self.view.read(link + 8);
        self.view.write(link, default);
    }

    /// Marks this CPU as entering (`true`) or leaving `Cpu::run`. Entering, returns
    /// whether it must first drop every compiled block (another CPU asked for a flush).
    pub(crate) fn running(&mut self, on: bool) -> bool {
        self.mark.in_run.store(on, Ordering::SeqCst);
        let flush = self.shared.flush.load(Ordering::SeqCst);
        if on {
            return flush != self.mark.seen.load(Ordering::Relaxed);
        }
        if flush != self.mark.seen.load(Ordering::Relaxed) {
            // Outside `run` this CPU holds up no flush: the memory may be given back.
            let mut inner = self.shared.lock();
            self.shared.try_reset(&mut inner);
        }
        false
    }

    /// Whether another CPU asked for a flush this CPU has not dropped its blocks for.
    #[inline(always)]
    pub(crate) fn flush_asked(&self) -> bool {
        self.shared.flush.load(Ordering::Relaxed) != self.mark.seen.load(Ordering::Relaxed)
    }

    /// This CPU dropped every compiled block: notes it for the pending flush, and gives
    /// the memory back if it was the last.
    pub(crate) fn quiesce(&mut self) {
        let mut inner = self.shared.lock();
        self.mark
            .seen
            .store(self.shared.flush.load(Ordering::SeqCst), Ordering::SeqCst);
        self.shared.try_reset(&mut inner);
    }
}

impl Drop for Jit {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        inner.marks.retain(|m| !Arc::ptr_eq(m, &self.mark));
        self.shared.cpus.store(inner.marks.len(), Ordering::Relaxed);
        self.shared.try_reset(&mut inner);
    }
}

#[cfg(target_arch = "x86_64")]
fn host_supported() -> bool {
    std::arch::is_x86_feature_detected!("bmi2") && {
        // CPUID 8000_0001h ECX bit 0: LAHF/SAHF in 64-bit mode.
        let r = std::arch::x86_64::__cpuid(0x8000_0001);
        r.ecx & 1 != 0
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn host_supported() -> bool {
    false
}
