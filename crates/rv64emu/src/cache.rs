//! Decoded blocks, cached by the physical address of their first instruction.
//!
//! A block runs from its start to the first instruction that may change control flow,
//! privilege or translation, or to the end of the page. RISC-V only promises that
//! instruction fetch sees earlier stores after a FENCE.I, so the cache is dropped on
//! FENCE.I (and when it grows past its bound) rather than on every store.

use crate::decode::Insn;
use rustc_hash::FxHashMap;

/// The most instructions one block holds.
pub const MAX_BLOCK: usize = 64;
const MAX_BLOCKS: usize = 1 << 16;

/// Blocks live in an arena and are named by index: the run loop copies each instruction
/// out by index, so no reference count is touched per block (an `Arc` per block cost a
/// third of the run time in atomic increments and decrements).
#[derive(Debug, Default)]
pub struct BlockCache {
    index: FxHashMap<u64, u32>,
    blocks: Vec<Box<[Insn]>>,
}

impl BlockCache {
    #[inline]
    pub fn get(&self, pa: u64) -> Option<u32> {
        self.index.get(&pa).copied()
    }

    /// The `k`th instruction of block `id`; None past its end or after a flush.
    #[inline]
    pub fn insn(&self, id: u32, k: usize) -> Option<Insn> {
        self.blocks.get(id as usize)?.get(k).copied()
    }

    pub fn insert(&mut self, pa: u64, block: Vec<Insn>) -> u32 {
        if self.blocks.len() >= MAX_BLOCKS {
            self.flush();
        }
        let id = self.blocks.len() as u32;
        self.blocks.push(block.into_boxed_slice());
        self.index.insert(pa, id);
        id
    }

    pub fn flush(&mut self) {
        self.index.clear();
        self.blocks.clear();
    }
}
