//! Decoded blocks, cached by the physical address of their first instruction.
//!
//! A block runs from its start to the first instruction that may change control flow,
//! privilege or translation, or to the end of the page. RISC-V only promises that
//! instruction fetch sees earlier stores after a FENCE.I, so the cache is dropped on
//! FENCE.I (and when it grows past its bound) rather than on every store.

use crate::decode::Insn;
use std::collections::HashMap;
use std::sync::Arc;

/// The most instructions one block holds.
pub const MAX_BLOCK: usize = 64;
const MAX_BLOCKS: usize = 1 << 16;

#[derive(Debug, Default)]
pub struct BlockCache {
    blocks: HashMap<u64, Arc<[Insn]>>,
}

impl BlockCache {
    #[inline]
    pub fn get(&self, pa: u64) -> Option<Arc<[Insn]>> {
        self.blocks.get(&pa).cloned()
    }

    pub fn insert(&mut self, pa: u64, block: Arc<[Insn]>) {
        if self.blocks.len() >= MAX_BLOCKS {
            self.blocks.clear();
        }
        self.blocks.insert(pa, block);
    }

    pub fn flush(&mut self) {
        self.blocks.clear();
    }
}
