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

pub(crate) mod arena;
mod asm;
mod cover;
mod emit;

use crate::decode::Insn;
use arena::Arena;

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

pub(crate) use emit::{FINISHED, JUMP_CACHE};

#[derive(Clone, Copy)]
pub(crate) struct Compiled {
    /// Where [`Jit::enter`] starts the block.
    pub(crate) entry: u64,
    /// Where a linked exit of another block jumps to.
    pub(crate) chain_entry: u64,
}

/// Executable memory per CPU (only what compiled code fills is ever touched). A Debian
/// boot to its login prompt compiles about 40 MB: with 16 MiB the arena filled twice,
/// and each time every hot block ran interpreted again until it was compiled again.
/// QEMU's TCG buffer is 1 GiB by default.
const ARENA_SIZE: usize = 64 << 20;
/// Runs before a block is compiled: compiling costs about as much as interpreting a block
/// a hundred times. In a Debian boot to login (VMM CPU, interleaved rounds), 128 was 4%
/// faster than 256 and than 64, once a full code arena no longer made every hot block
/// earn its compile again (in an earlier Linux boot 256 and 1024 were equally fast).
pub(crate) const DEFAULT_THRESHOLD: u32 = 128;

#[derive(Debug)]
pub(crate) struct Jit {
    arena: Arena,
    asm: asm::Asm,
    /// The code blocks share, at the start of the arena.
    rt: emit::Runtime,
    pub(crate) enter: Enter,
    pub(crate) threshold: u32,
    /// The CPU model's ISA bits (`hostexec::isa`) compiled code was made for.
    pub(crate) model: u64,
    /// Blocks compiled since the CPU was created.
    pub(crate) compiled: u64,
    /// `/tmp/perf-PID.map`, when `VESSEL_PERF_MAP` is set: names compiled code for `perf`.
    perf_map: Option<std::fs::File>,
}

/// Opens perf's map of JIT code for this process (appending: every CPU writes to it).
fn open_perf_map() -> Option<std::fs::File> {
    std::env::var_os("VESSEL_PERF_MAP")?;
    let path = format!("/tmp/perf-{}.map", std::process::id());
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(path, error = %e, "cannot open the perf map");
            None
        }
    }
}

impl Jit {
    /// None when the host cannot run compiled blocks (not x86-64 with BMI2 and LAHF/SAHF in
    /// 64-bit mode, or no executable memory).
    pub(crate) fn new(threshold: u32) -> Option<Self> {
        if !host_supported() {
            return None;
        }
        let mut arena = Arena::new(ARENA_SIZE)?;
        let mut asm = asm::Asm::new()?;
        let (code, rt) = emit::runtime(&mut asm, arena.next())?;
        if arena.put(&code)? as u64 != rt.enter {
            return None;
        }
        arena.pin();
        // SAFETY: `rt.enter` starts the function `runtime` emitted for this ABI.
        let enter = unsafe { std::mem::transmute::<u64, Enter>(rt.enter) };
        Some(Jit {
            arena,
            asm,
            rt,
            enter,
            threshold,
            model: 0,
            compiled: 0,
            perf_map: open_perf_map(),
        })
    }

    /// Compiles a block; None when its first instructions are not covered. `Err(())` when
    /// the arena is full: the caller must drop every compiled block, then call
    /// [`Jit::flushed`].
    /// `slot` is the block's cache slot, `tlb_gen` for a page-crossing block the address
    /// of the TLB generation it was checked in (stable: the block cache never moves its
    /// blocks).
    pub(crate) fn compile(
        &mut self,
        insns: &[Insn],
        slot: usize,
        tlb_gen: Option<*const u64>,
    ) -> Result<Option<Compiled>, ()> {
        let at = self.arena.next();
        let Some(t) = emit::translate(
            insns,
            at,
            slot,
            tlb_gen.map(|p| p as u64),
            self.model,
            &mut self.asm,
            &self.rt,
        ) else {
            return Ok(None);
        };
        let Some(start) = self.arena.put(&t.code) else {
            return Err(());
        };
        if start as u64 != at {
            return Ok(None);
        }
        for (&link, &default) in t.links.iter().zip(&t.link_defaults) {
            // Each link slot is 24 bytes inside the code just placed: the jump target, the
            // target to restore when unlinking, and whether the exit goes forward.
            self.arena.write_u64(link, default);
            self.arena.write_u64(link + 8, default);
        }
        if let (Some(f), Some(first)) = (&mut self.perf_map, insns.first()) {
            use std::io::Write;
            // One write per line: with O_APPEND, lines of several CPUs do not interleave.
            let line = format!(
                "{:x} {:x} guest_{:x}\n",
                start as u64,
                t.code.len(),
                first.instr.ip()
            );
            let _ = f.write_all(line.as_bytes());
        }
        self.compiled += 1;
        Ok(Some(Compiled {
            entry: t.entry,
            chain_entry: t.chain_entry,
        }))
    }

    /// Points link slot `link` (in placed code) at `target`.
    pub(crate) fn link(&mut self, link: u64, target: u64) {
        self.arena.write_u64(link, target);
    }

    /// Whether link slot `link` is an exit to a higher IP than its own (see
    /// `BlockCache::link`).
    pub(crate) fn forward(&self, link: u64) -> bool {
        self.arena.read_u64(link + 16) != 0
    }

    /// Points link slot `link` back at its unlinked target (kept after it).
    pub(crate) fn unlink(&mut self, link: u64) {
        let default = self.arena.read_u64(link + 8);
        self.arena.write_u64(link, default);
    }

    /// All compiled blocks were dropped: the arena can be refilled.
    pub(crate) fn flushed(&mut self) {
        self.arena.reset();
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
