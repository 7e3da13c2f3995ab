//! Decoded blocks, cached by the physical address of their first instruction, and a
//! jump cache from the virtual PC straight to a block.
//!
//! A block runs from its start to the first jump or instruction that may change
//! privilege or translation, or to the end of the page; conditional branches do not end
//! it (a taken one leaves it early), so a loop body with a test is one block. RISC-V only promises that
//! instruction fetch sees earlier stores after a FENCE.I, so blocks are checked against
//! memory after each FENCE.I (and the cache is dropped when it grows past its bound)
//! rather than on every store.

use crate::decode::Insn;
use crate::jit::{Code, Jit};
use rustc_hash::FxHashMap;

/// The most instructions one block holds.
pub const MAX_BLOCK: usize = 64;
const MAX_BLOCKS: usize = 1 << 16;
pub(crate) const JUMP_SIZE: usize = 1 << 12;

/// One jump cache slot: the PC (with bit 0 set for a user-mode fetch: PCs are even) and
/// the generation it was filled in, so forgetting them all is one increment. Compiled
/// code reads slots too (`jit`'s chaining), so the layout is fixed.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub(crate) struct Jump {
    tag: u64,
    gen: u32,
    block: u32,
}

/// Where compiled code finds a jump slot's fields.
pub(crate) const JUMP_TAG: i32 = std::mem::offset_of!(Jump, tag) as i32;
pub(crate) const JUMP_GEN: i32 = std::mem::offset_of!(Jump, gen) as i32;
pub(crate) const JUMP_BLOCK: i32 = std::mem::offset_of!(Jump, block) as i32;
const _: () = assert!(std::mem::size_of::<Jump>() == 16);

/// A block's way to compiled code: its code once it ran `Jit::threshold` times, its runs
/// until then, and the physical address it was decoded from (names its code for perf).
/// Compiled code reads `code` too (`jit`'s chaining), so the layout is fixed.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct Compiling {
    code: Option<Code>,
    runs: u32,
    /// The code epoch in which the block's bytes were last found in memory.
    epoch: u32,
    pa: u64,
}

/// Blocks live in an arena and are named by index: the run loop copies each instruction
/// out by index, so no reference count is touched per block (an `Arc` per block cost a
/// third of the run time in atomic increments and decrements).
#[derive(Debug)]
pub struct BlockCache {
    index: FxHashMap<u64, u32>,
    blocks: Vec<Box<[Insn]>>,
    /// Virtual PC → block, valid while the fetch translation that found it is: every
    /// TLB flush and every block flush forgets it. It saves the fetch translation and
    /// the hash lookup of the block at each block boundary (a third of the run time).
    jumps: Box<[Jump]>,
    pub(crate) gen: u32,
    /// Per block, its way to compiled code. The code holds the addresses of the block's
    /// instructions, so both go together (`flush`).
    state: Vec<Compiling>,
    jit: Option<Jit>,
    /// Moves at each FENCE.I: a block runs again only once its bytes are found unchanged
    /// in this epoch (see `Cpu::find_block`). Dropping every block instead made a Linux
    /// boot, which fences at every executable page it maps, decode and compile each hot
    /// block four times over.
    code_epoch: u32,
}

impl Default for BlockCache {
    fn default() -> Self {
        BlockCache {
            index: FxHashMap::default(),
            blocks: Vec::new(),
            jumps: vec![Jump::default(); JUMP_SIZE].into_boxed_slice(),
            gen: 1,
            state: Vec::new(),
            jit: jit_from_env(),
            code_epoch: 0,
        }
    }
}

impl BlockCache {
    #[inline]
    pub fn get(&self, pa: u64) -> Option<u32> {
        self.index.get(&pa).copied()
    }

    /// The block a fetch at virtual `pc` (by a user-mode hart if `user`) found last.
    #[inline]
    pub fn jump(&self, pc: u64, user: bool) -> Option<u32> {
        let j = &self.jumps[(pc as usize >> 1) & (JUMP_SIZE - 1)];
        (j.tag == pc | user as u64 && j.gen == self.gen).then_some(j.block)
    }

    #[inline]
    pub fn remember_jump(&mut self, pc: u64, user: bool, block: u32) {
        self.jumps[(pc as usize >> 1) & (JUMP_SIZE - 1)] = Jump {
            tag: pc | user as u64,
            gen: self.gen,
            block,
        };
    }

    /// The jump cache's slots, for compiled code's chaining: they stay where they are for
    /// the cache's life (forgetting them moves `gen`, or clears them in place).
    pub(crate) fn jumps_ptr(&self) -> *const Jump {
        self.jumps.as_ptr()
    }

    /// Each block's way to compiled code, indexed by block, for compiled code's
    /// chaining; valid until the next `insert` or `flush` (neither runs inside compiled
    /// code).
    pub(crate) fn codes_ptr(&self) -> *const Compiling {
        self.state.as_ptr()
    }

    /// Drops every virtual → block link (the translations they rest on changed).
    pub fn forget_jumps(&mut self) {
        self.gen = self.gen.wrapping_add(1);
        if self.gen == 0 {
            // Wrapped: old generations could match again.
            self.jumps.fill(Jump::default());
            self.gen = 1;
        }
    }

    /// The instructions of block `id`. The slice stays valid until the next `insert`
    /// or `flush`: the run loop holds it only while a block runs, and neither happens
    /// then (FENCE.I's flush waits for the end of its block).
    #[inline]
    pub fn block(&self, id: u32) -> &[Insn] {
        self.blocks.get(id as usize).map_or(&[], |b| b)
    }

    pub fn insert(&mut self, pa: u64, block: Vec<Insn>) -> u32 {
        if self.blocks.len() >= MAX_BLOCKS {
            self.flush();
        }
        let id = self.blocks.len() as u32;
        self.blocks.push(block.into_boxed_slice());
        self.state.push(Compiling {
            code: None,
            runs: 0,
            epoch: self.code_epoch,
            pa,
        });
        self.index.insert(pa, id);
        id
    }

    /// Whether block `id`'s bytes were found in memory since the last FENCE.I.
    #[inline]
    pub fn checked(&self, id: u32) -> bool {
        self.state
            .get(id as usize)
            .is_some_and(|c| c.epoch == self.code_epoch)
    }

    /// Block `id`'s bytes are still in memory.
    pub fn mark_checked(&mut self, id: u32) {
        let epoch = self.code_epoch;
        if let Some(c) = self.state.get_mut(id as usize) {
            c.epoch = epoch;
        }
    }

    /// FENCE.I: every block is checked against memory before it runs again, and the
    /// jump cache (which skips that check) starts over.
    pub fn new_code_epoch(&mut self) {
        self.code_epoch = self.code_epoch.wrapping_add(1);
        if self.code_epoch == 0 {
            // Wrapped: a block last checked 2^32 fences ago would pass.
            self.flush();
        }
        self.forget_jumps();
    }

    pub fn flush(&mut self) {
        self.index.clear();
        self.blocks.clear();
        self.state.clear();
        if let Some(j) = &mut self.jit {
            j.reset();
        }
        self.forget_jumps();
    }

    /// The compiled code of block `id`, compiling it if this run makes it hot. Not
    /// called while a block runs (compiling may flush every block).
    #[inline]
    pub fn code(&mut self, id: u32) -> Option<Code> {
        let i = id as usize;
        if let Some(c) = self.state.get(i).and_then(|c| c.code) {
            return Some(c);
        }
        let threshold = self.jit.as_ref()?.threshold;
        let runs = &mut self.state.get_mut(i)?.runs;
        *runs += 1;
        if *runs < threshold {
            return None;
        }
        self.compile(i)
    }

    #[cold]
    fn compile(&mut self, i: usize) -> Option<Code> {
        let jit = self.jit.as_mut()?;
        let pa = self.state.get(i)?.pa;
        let code = match jit.compile(self.blocks.get(i)?, pa) {
            Some(c) => c,
            None => {
                // The code memory is full: start over, this block first.
                self.flush();
                return None;
            }
        };
        self.state.get_mut(i)?.code = Some(code);
        Some(code)
    }

    /// Compile every block after `threshold` runs (0 or 1: at its first), or never (None).
    pub fn set_jit_threshold(&mut self, threshold: Option<u32>) {
        self.flush();
        self.jit = threshold.and_then(Jit::new);
    }

    /// Blocks compiled since the hart started.
    pub fn compiled_blocks(&self) -> u64 {
        self.jit.as_ref().map_or(0, |j| j.compiled)
    }
}

/// `VESSEL_RV_JIT=0` interprets only; `=N` compiles blocks after N runs.
fn jit_from_env() -> Option<Jit> {
    let threshold = match std::env::var("VESSEL_RV_JIT") {
        Ok(v) => v
            .parse::<u32>()
            .ok()
            .unwrap_or(crate::jit::DEFAULT_THRESHOLD),
        Err(_) => crate::jit::DEFAULT_THRESHOLD,
    };
    if threshold == 0 {
        return None;
    }
    Jit::new(threshold)
}
