//! Segment register loads: real-mode style, and protected/long-mode descriptor checks.

use crate::cpu::Core;
use crate::exceptions::{Fault, Result};
use crate::platform::Platform;
use crate::state::{Seg, Segment};

impl Core {
    /// Reads the 8-byte descriptor for `selector` from the GDT or LDT (supervisor access).
    pub(crate) fn read_descriptor(&mut self, p: &mut dyn Platform, selector: u16) -> Result<u64> {
        let idx = u64::from(selector & !7);
        let (base, limit) = if selector & 4 != 0 {
            (self.s.ldtr.base, u64::from(self.s.ldtr.limit))
        } else {
            (self.s.gdtr.base, u64::from(self.s.gdtr.limit))
        };
        if idx + 7 > limit {
            return Err(Fault::gp(u32::from(selector & !3)));
        }
        let lin = self.wrap_lin(base.wrapping_add(idx));
        Ok(u64::from_le_bytes(self.read_lin::<8>(p, lin, false)?))
    }

    /// The upper 8 bytes of a 16-byte system descriptor (TSS/LDT/call gates in long mode).
    pub(crate) fn read_descriptor_high(
        &mut self,
        p: &mut dyn Platform,
        selector: u16,
    ) -> Result<u64> {
        self.read_descriptor(p, (selector & !7).wrapping_add(8))
    }

    /// Sets the accessed bit of a descriptor (hardware does this on load).
    fn mark_accessed(&mut self, p: &mut dyn Platform, selector: u16, desc: u64) -> Result<()> {
        if desc & (1 << 40) == 0 {
            let base = if selector & 4 != 0 {
                self.s.ldtr.base
            } else {
                self.s.gdtr.base
            };
            let lin = self.wrap_lin(base.wrapping_add(u64::from(selector & !7) + 5));
            let b = ((desc >> 40) as u8) | 1;
            self.write_lin(p, lin, &[b], false)?;
        }
        Ok(())
    }

    /// MOV/POP/LxS to a data segment register or SS.
    pub(crate) fn load_seg(&mut self, p: &mut dyn Platform, seg: Seg, selector: u16) -> Result<()> {
        if !self.s.protected() {
            let code = seg == Seg::Cs;
            let cur = self.s.seg[seg as usize];
            // Keep cached limit/attributes (unreal mode relies on that); reload base.
            self.s.seg[seg as usize] = Segment {
                selector,
                base: u64::from(selector) << 4,
                limit: cur.limit,
                attr: if code {
                    cur.attr
                } else {
                    cur.attr | Segment::ATTR_P
                },
            };
            return Ok(());
        }
        let cpl = self.s.cpl();
        let rpl = (selector & 3) as u8;
        let err = u32::from(selector & !3);
        if selector & !3 == 0 {
            if seg == Seg::Ss && !(self.s.in_64bit_mode() && cpl != 3 && rpl == cpl) {
                return Err(Fault::gp0());
            }
            // A null selector: the segment becomes unusable (in 64-bit mode the base of
            // FS/GS is left as is, as hardware leaves it when loading null).
            let s = &mut self.s.seg[seg as usize];
            s.selector = selector;
            s.attr = if seg == Seg::Ss {
                (u16::from(cpl) << 5) | 0x93
            } else {
                0
            };
            if seg != Seg::Fs && seg != Seg::Gs {
                s.base = 0;
            }
            s.limit = 0;
            return Ok(());
        }
        let desc = self.read_descriptor(p, selector)?;
        let s = Segment::from_descriptor(selector, desc);
        let typ = s.attr & 0xf;
        let is_code = typ & 8 != 0;
        let readable = !is_code || typ & 2 != 0;
        if s.attr & Segment::ATTR_S == 0 {
            return Err(Fault::gp(err));
        }
        if seg == Seg::Ss {
            let writable_data = !is_code && typ & 2 != 0;
            if rpl != cpl || s.dpl() != cpl || !writable_data {
                return Err(Fault::gp(err));
            }
            if !s.present() {
                return Err(Fault::ss(err));
            }
        } else {
            let conforming = is_code && typ & 4 != 0;
            if !readable || (!conforming && (s.dpl() < cpl || s.dpl() < rpl)) {
                return Err(Fault::gp(err));
            }
            if !s.present() {
                return Err(Fault::np(err));
            }
        }
        self.mark_accessed(p, selector, desc)?;
        let mut s = s;
        s.attr |= 1;
        // In 64-bit mode too, a selector load replaces the FS/GS base with the descriptor's
        // 32-bit base; bases above 4 GiB come only from the MSRs.
        self.s.seg[seg as usize] = s;
        Ok(())
    }

    /// Loads CS for a far JMP/CALL/RET or IRET to `selector`, checking a code descriptor.
    /// `new_cpl` is the privilege the transfer runs at (RPL for returns).
    pub(crate) fn load_cs(
        &mut self,
        p: &mut dyn Platform,
        selector: u16,
        new_cpl: u8,
    ) -> Result<()> {
        if !self.s.protected() {
            let cur = self.s.seg[Seg::Cs as usize];
            self.s.seg[Seg::Cs as usize] = Segment {
                selector,
                base: u64::from(selector) << 4,
                limit: cur.limit,
                attr: cur.attr,
            };
            return Ok(());
        }
        let err = u32::from(selector & !3);
        if selector & !3 == 0 {
            return Err(Fault::gp0());
        }
        let desc = self.read_descriptor(p, selector)?;
        let mut s = Segment::from_descriptor(selector, desc);
        if s.attr & Segment::ATTR_S == 0 || s.attr & 8 == 0 {
            return Err(Fault::gp(err));
        }
        let conforming = s.attr & 4 != 0;
        if (conforming && s.dpl() > new_cpl) || (!conforming && s.dpl() != new_cpl) {
            return Err(Fault::gp(err));
        }
        if !s.present() {
            return Err(Fault::np(err));
        }
        if s.long() && s.default_big() {
            return Err(Fault::gp(err));
        }
        self.mark_accessed(p, selector, desc)?;
        s.attr |= 1;
        // CPL lives in CS.DPL in this model: a conforming segment runs at the caller's CPL.
        s.attr = (s.attr & !0x60) | (u16::from(new_cpl) << 5);
        s.selector = (selector & !3) | u16::from(new_cpl);
        self.s.seg[Seg::Cs as usize] = s;
        Ok(())
    }
}
