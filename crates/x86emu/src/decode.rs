//! Decoded basic blocks, cached by the physical address of their first instruction.
//!
//! A block is a run of instructions inside one 4 KiB page that ends at the first branch,
//! at an instruction that changes how the following ones must be decoded or fetched
//! (mode, paging, segments, interrupt flags) or at the page end. The run loop translates
//! RIP and looks up a block once, then executes its instructions back to back, so the
//! translation and lookup cost is paid per block instead of per instruction.
//!
//! Every instruction keeps the raw bytes it was decoded from and runs only while the bytes
//! in guest memory still match, so guest writes to code (by this CPU, another vCPU or a DMA
//! device, even into the block being executed) can never run stale decodings, and no write
//! path needs to know about code pages.

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic as M, OpKind};

use crate::exec::fast::{uop_for, Uop};
use crate::exec::{handler_for, Handler};

/// Block slots (direct mapped by physical address).
const CACHE_SIZE: usize = 1 << 14;
/// Longest block: bounds the work lost when a block must be rebuilt.
const MAX_BLOCK: usize = 32;

/// One decoded instruction: the iced-x86 form, its handler and the operands the fast
/// handlers use, plus (in a block) the bytes it was decoded from.
#[derive(Clone, Copy)]
pub(crate) struct Insn {
    pub(crate) instr: Instruction,
    pub(crate) handler: Handler,
    pub(crate) uop: Uop,
    /// Raw bytes, zero padded, and the mask of the valid ones.
    bytes: u128,
    byte_mask: u128,
    /// Offset of the instruction in its page.
    pub(crate) off: u16,
    /// Ends its block: a branch, or an instruction that may change the mode.
    pub(crate) ends: bool,
    /// A near branch: the next block runs in the same mode and address space.
    pub(crate) near_branch: bool,
}

impl Insn {
    /// `instr` with its handler; `code` holds its bytes (or fewer: then the instruction is
    /// never found valid again, which suits one-off decodes).
    pub(crate) fn new(instr: Instruction, code: &[u8], off: usize) -> Self {
        let len = instr.len().min(15);
        let byte_mask = (1u128 << (len * 8)) - 1;
        let ends = ends_block(&instr);
        Insn {
            instr,
            handler: handler_for(&instr),
            uop: uop_for(&instr),
            bytes: load16(code) & byte_mask,
            byte_mask,
            off: off as u16,
            ends,
            near_branch: is_near_branch(&instr),
        }
    }

    /// Whether the instruction's bytes at `page[off..]` are still the ones decoded.
    ///
    /// # Safety
    /// `page` must point to a readable 4 KiB page.
    #[inline(always)]
    pub(crate) unsafe fn still_valid(&self, page: *const u8) -> bool {
        let off = usize::from(self.off);
        // SAFETY: off < 4096 and the caller guarantees a 4 KiB page; at most the bytes
        // left in the page are read.
        let avail = unsafe { std::slice::from_raw_parts(page.add(off), 4096 - off) };
        load16(avail) & self.byte_mask == self.bytes
    }
}

#[derive(Default)]
pub(crate) struct Block {
    gpa: u64,
    /// The first instruction's IP: the same physical bytes mapped at two addresses decode
    /// to different branch targets.
    ip: u64,
    bitness: u32,
    pub(crate) insns: Vec<Insn>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("gpa", &self.gpa)
            .field("ip", &self.ip)
            .field("len", &self.insns.len())
            .finish()
    }
}

#[derive(Debug)]
pub(crate) struct BlockCache {
    blocks: Vec<Block>,
}

/// Loads up to 16 bytes from `avail` as a little-endian u128 (zero padded).
#[inline(always)]
fn load16(avail: &[u8]) -> u128 {
    if let Some(b) = avail.first_chunk::<16>() {
        u128::from_le_bytes(*b)
    } else {
        let mut b = [0u8; 16];
        let n = avail.len().min(16);
        b[..n].copy_from_slice(&avail[..n]);
        u128::from_le_bytes(b)
    }
}

impl BlockCache {
    pub(crate) fn new() -> Self {
        let mut blocks = Vec::with_capacity(CACHE_SIZE);
        blocks.resize_with(CACHE_SIZE, || Block {
            gpa: u64::MAX,
            ..Block::default()
        });
        BlockCache { blocks }
    }

    #[inline(always)]
    fn slot(gpa: u64) -> usize {
        ((gpa ^ (gpa >> 12)) as usize) & (CACHE_SIZE - 1)
    }

    /// The block starting at `gpa` for `ip`, decoding it from `page` (the host page that
    /// holds `gpa`) on a miss or when its first instruction changed. None when not even
    /// the first instruction fits in the page (the caller fetches it the slow way).
    #[inline(always)]
    pub(crate) fn get(
        &mut self,
        gpa: u64,
        ip: u64,
        bitness: u32,
        page: *const u8,
    ) -> Option<&Block> {
        let slot = Self::slot(gpa);
        let hit = {
            let b = self.blocks.get(slot)?;
            b.gpa == gpa
                && b.ip == ip
                && b.bitness == bitness
                // SAFETY: `page` is a valid page (caller contract).
                && b.insns.first().is_some_and(|i| unsafe { i.still_valid(page) })
        };
        if !hit {
            self.fill(slot, gpa, ip, bitness, page)?;
        }
        self.blocks.get(slot)
    }

    /// Forgets the block at `gpa` (one of its later instructions changed under it).
    pub(crate) fn invalidate(&mut self, gpa: u64) {
        if let Some(b) = self.blocks.get_mut(Self::slot(gpa)) {
            if b.gpa == gpa {
                b.gpa = u64::MAX;
            }
        }
    }

    #[cold]
    fn fill(
        &mut self,
        slot: usize,
        gpa: u64,
        ip: u64,
        bitness: u32,
        page: *const u8,
    ) -> Option<()> {
        let off = (gpa & 0xfff) as usize;
        // SAFETY: `page` is a valid 4 KiB page (caller contract) and off < 4096.
        let avail: &[u8] = unsafe { std::slice::from_raw_parts(page.add(off), 4096 - off) };
        let b = self.blocks.get_mut(slot)?;
        b.gpa = u64::MAX;
        b.insns.clear();
        let mut d = Decoder::with_ip(bitness, avail, ip, DecoderOptions::NONE);
        let mut pos = 0usize;
        while b.insns.len() < MAX_BLOCK {
            let ins = d.decode();
            if ins.is_invalid() && d.last_error() == iced_x86::DecoderError::NoMoreBytes {
                break; // runs past the page end
            }
            let len = ins.len().min(15);
            let insn = Insn::new(ins, avail.get(pos..)?, off + pos);
            let ends = insn.ends;
            b.insns.push(insn);
            pos += len;
            if ends {
                break;
            }
        }
        if b.insns.is_empty() {
            return None;
        }
        b.gpa = gpa;
        b.ip = ip;
        b.bitness = bitness;
        Some(())
    }
}

/// Whether the instructions after `ins` cannot be decoded or run ahead of time: branches,
/// and instructions that change the mode, paging, segments, the interrupt flag or
/// single-stepping (what follows them must be fetched afresh).
fn ends_block(ins: &Instruction) -> bool {
    if ins.is_invalid() || ins.flow_control() != FlowControl::Next {
        return true;
    }
    let writes_special_reg = ins.op_count() > 0
        && ins.op0_kind() == OpKind::Register
        && (ins.op0_register().is_segment_register()
            || ins.op0_register().is_cr()
            || ins.op0_register().is_dr());
    writes_special_reg
        || matches!(
            ins.mnemonic(),
            M::Popf
                | M::Popfd
                | M::Popfq
                | M::Sti
                | M::Cli
                | M::Hlt
                | M::Lgdt
                | M::Lidt
                | M::Lldt
                | M::Ltr
                | M::Lmsw
                | M::Clts
                | M::Invlpg
                | M::Invpcid
                | M::Wrmsr
                | M::Xsetbv
                | M::Lss
                | M::Lds
                | M::Les
                | M::Lfs
                | M::Lgs
                | M::Swapgs
                | M::Mwait
                | M::Wbinvd
                | M::Invd
                | M::Rsm
                | M::Xrstor
                | M::Xrstor64
                | M::Fxrstor
                | M::Fxrstor64
                | M::Rdmsr
                | M::In
                | M::Insb
                | M::Insw
                | M::Insd
                | M::Out
                | M::Outsb
                | M::Outsw
                | M::Outsd
        )
}

/// Near jumps, calls, returns and loops: they change nothing but RIP (and RSP).
fn is_near_branch(ins: &Instruction) -> bool {
    ins.is_jcc_short_or_near()
        || ins.is_jmp_short_or_near()
        || ins.is_jmp_near_indirect()
        || ins.is_call_near()
        || ins.is_call_near_indirect()
        || ins.is_loop()
        || ins.is_loopcc()
        || ins.is_jcx_short()
        || ins.mnemonic() == M::Ret
}

/// Decodes one instruction; None if the bytes run out before it ends.
pub(crate) fn decode(bitness: u32, ip: u64, bytes: &[u8]) -> Option<Instruction> {
    let mut d = Decoder::with_ip(bitness, bytes, ip, DecoderOptions::NONE);
    let ins = d.decode();
    if ins.is_invalid() && d.last_error() == iced_x86::DecoderError::NoMoreBytes {
        return None;
    }
    Some(ins)
}
