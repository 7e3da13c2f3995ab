//! Decoded-instruction cache keyed by physical address.
//!
//! An entry keeps the raw bytes it was decoded from and is only used when the bytes in
//! guest memory still match, so guest writes to code (by this CPU, another vCPU or a DMA
//! device) can never run stale decodings, and no write path needs to know about code pages.
//! The entry also caches the family handler, so dispatch is one indirect call.

use iced_x86::{Decoder, DecoderOptions, Instruction};

use crate::exec::{handler_for, Handler};

const CACHE_SIZE: usize = 1 << 14;

#[derive(Clone, Copy)]
struct Entry {
    gpa: u64,
    /// The instruction's IP: the same physical bytes mapped at two addresses decode to
    /// different branch targets.
    ip: u64,
    /// Raw bytes, zero padded, and the mask of the valid ones.
    bytes: u128,
    byte_mask: u128,
    bitness: u32,
    instr: Instruction,
    handler: Handler,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("gpa", &self.gpa)
            .field("ip", &self.ip)
            .finish()
    }
}

#[derive(Debug)]
pub(crate) struct DecodeCache {
    entries: Vec<Entry>,
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

impl DecodeCache {
    pub(crate) fn new() -> Self {
        let empty = Entry {
            gpa: u64::MAX,
            ip: 0,
            bytes: 0,
            byte_mask: 0,
            bitness: 0,
            instr: Instruction::default(),
            handler: handler_for(&Instruction::default()),
        };
        DecodeCache {
            entries: vec![empty; CACHE_SIZE],
        }
    }

    #[inline(always)]
    fn slot(gpa: u64) -> usize {
        ((gpa ^ (gpa >> 14)) as usize) & (CACHE_SIZE - 1)
    }

    /// Looks up the instruction whose bytes start at `avail[0]` (the rest of the page);
    /// returns its slot. (Returning the slot rather than a copy avoids store-forwarding
    /// stalls on the 40-byte Instruction in the hot path.)
    #[inline(always)]
    pub(crate) fn lookup(&self, gpa: u64, ip: u64, bitness: u32, avail: &[u8]) -> Option<usize> {
        let slot = Self::slot(gpa);
        let e = self.entries.get(slot)?;
        if e.gpa != gpa || e.ip != ip || e.bitness != bitness {
            return None;
        }
        if load16(avail) & e.byte_mask == e.bytes {
            Some(slot)
        } else {
            None
        }
    }

    /// The cached instruction and handler in `slot` (from `lookup`).
    #[inline(always)]
    pub(crate) fn get(&self, slot: usize) -> Option<(&Instruction, Handler)> {
        self.entries.get(slot).map(|e| (&e.instr, e.handler))
    }

    /// Caches a decoded instruction; returns its slot.
    pub(crate) fn insert(
        &mut self,
        gpa: u64,
        ip: u64,
        bitness: u32,
        instr: &Instruction,
        handler: Handler,
        avail: &[u8],
    ) -> Option<usize> {
        let len = instr.len().min(15);
        if avail.len() < len {
            return None;
        }
        let byte_mask = (1u128 << (len * 8)) - 1;
        let slot = Self::slot(gpa);
        let e = self.entries.get_mut(slot)?;
        {
            *e = Entry {
                gpa,
                ip,
                bytes: load16(avail) & byte_mask,
                byte_mask,
                bitness,
                instr: *instr,
                handler,
            };
        }
        Some(slot)
    }
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
