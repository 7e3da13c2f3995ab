//! Decoded-instruction cache keyed by physical address.
//!
//! An entry keeps the raw bytes it was decoded from and is only used when the bytes in
//! guest memory still match, so guest writes to code (by this CPU, another vCPU or a DMA
//! device) can never run stale decodings, and no write path needs to know about code pages.

use iced_x86::{Decoder, DecoderOptions, Instruction};

const CACHE_SIZE: usize = 1 << 14;

#[derive(Clone, Copy, Debug)]
struct Entry {
    /// Physical address | bitness in the low bits is not possible (any byte address), so the
    /// bitness and ip are compared separately.
    gpa: u64,
    ip: u64,
    bitness: u32,
    len: u8,
    bytes: [u8; 15],
    instr: Instruction,
}

#[derive(Debug)]
pub(crate) struct DecodeCache {
    entries: Vec<Entry>,
}

impl DecodeCache {
    pub(crate) fn new() -> Self {
        let empty = Entry {
            gpa: u64::MAX,
            ip: 0,
            bitness: 0,
            len: 0,
            bytes: [0; 15],
            instr: Instruction::default(),
        };
        DecodeCache {
            entries: vec![empty; CACHE_SIZE],
        }
    }

    #[inline]
    fn slot(gpa: u64) -> usize {
        ((gpa ^ (gpa >> 14)) as usize) & (CACHE_SIZE - 1)
    }

    /// Looks up an instruction whose bytes start at `page[off]` (the rest of the page).
    #[inline]
    pub(crate) fn lookup(
        &self,
        gpa: u64,
        ip: u64,
        bitness: u32,
        avail: &[u8],
    ) -> Option<Instruction> {
        let e = self.entries.get(Self::slot(gpa))?;
        if e.gpa != gpa || e.ip != ip || e.bitness != bitness {
            return None;
        }
        let len = usize::from(e.len);
        if avail.get(..len)? == e.bytes.get(..len)? {
            Some(e.instr)
        } else {
            None
        }
    }

    pub(crate) fn insert(
        &mut self,
        gpa: u64,
        ip: u64,
        bitness: u32,
        instr: &Instruction,
        bytes: &[u8],
    ) {
        let len = instr.len().min(15);
        let Some(src) = bytes.get(..len) else {
            return;
        };
        let mut b = [0u8; 15];
        b[..len].copy_from_slice(src);
        if let Some(e) = self.entries.get_mut(Self::slot(gpa)) {
            *e = Entry {
                gpa,
                ip,
                bitness,
                len: len as u8,
                bytes: b,
                instr: *instr,
            };
        }
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
