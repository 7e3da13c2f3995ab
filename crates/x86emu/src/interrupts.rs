//! Exception and interrupt delivery: real-mode IVT, 32-bit and 64-bit IDT gates, IST,
//! privilege-change stacks from the TSS, #DF escalation and triple fault.

use crate::cpu::Core;
use crate::exceptions::{class, vector, Class, Fault, Result};
use crate::platform::Platform;
use crate::state::flags::*;
use crate::state::{Seg, Segment};

impl Core {
    /// Delivers `f` (an exception, software interrupt or external interrupt), escalating
    /// faults raised during delivery to #DF and then to shutdown.
    pub(crate) fn deliver_event(&mut self, p: &mut dyn Platform, f: Fault, external: bool) {
        self.deliver_event_unnoted(p, f, external);
        // The frame's stores are made: counted once more if they went to checked code
        // (see `Core::stores_done`), as an instruction's are.
        self.stores_done();
    }

    fn deliver_event_unnoted(&mut self, p: &mut dyn Platform, f: Fault, external: bool) {
        self.entries += 1;
        let mut cur = f;
        let mut ext = external;
        for _ in 0..4 {
            match self.try_deliver(p, cur, ext) {
                Ok(()) => {
                    self.halted = false;
                    return;
                }
                Err(nested) => {
                    tracing::debug!(?cur, ?nested, "fault while delivering event");
                    let c1 = if ext {
                        Class::Benign
                    } else {
                        class(cur.vector)
                    };
                    let c2 = class(nested.vector);
                    if c1 == Class::DoubleFault {
                        break;
                    }
                    cur = if (c1 == Class::Contributory && c2 == Class::Contributory)
                        || (c1 == Class::PageFault && c2 != Class::Benign)
                    {
                        Fault::with_error(vector::DF, 0)
                    } else {
                        nested
                    };
                    ext = false;
                }
            }
        }
        tracing::warn!(rip = self.s.rip, "triple fault");
        self.shutdown = true;
    }

    fn try_deliver(&mut self, p: &mut dyn Platform, f: Fault, external: bool) -> Result<()> {
        let v = u32::from(f.vector);
        // Error codes that reference the IDT carry IDT=1 (bit 1) and EXT (bit 0).
        let idt_err = v * 8 + 2 + u32::from(external);
        if !self.s.protected() {
            return self.deliver_real(p, f);
        }
        if self.s.long_mode_active() {
            self.deliver_long(p, f, idt_err)
        } else {
            self.deliver_protected(p, f, idt_err)
        }
    }

    fn deliver_real(&mut self, p: &mut dyn Platform, f: Fault) -> Result<()> {
        let v = u64::from(f.vector);
        if v * 4 + 3 > u64::from(self.s.idtr.limit) {
            return Err(Fault::gp0());
        }
        let ent = self.read_lin::<4>(p, self.wrap_lin(self.s.idtr.base + v * 4), false)?;
        let ip = u64::from(u16::from_le_bytes([ent[0], ent[1]]));
        let cs = u16::from_le_bytes([ent[2], ent[3]]);
        let saved = self.s.gpr[4];
        let r = (|| {
            self.push(p, self.s.rflags & 0xffff, 2)?;
            self.push(p, u64::from(self.s.seg[Seg::Cs as usize].selector), 2)?;
            self.push(p, self.s.rip & 0xffff, 2)
        })();
        if let Err(e) = r {
            self.s.gpr[4] = saved;
            return Err(e);
        }
        self.s.rflags &= !(IF | TF | AC | RF);
        let cur = self.s.seg[Seg::Cs as usize];
        self.s.seg[Seg::Cs as usize] = Segment {
            selector: cs,
            base: u64::from(cs) << 4,
            ..cur
        };
        self.s.rip = ip;
        Ok(())
    }

    /// Reads the target code segment of a gate and returns it with the new CPL.
    fn gate_target(
        &mut self,
        p: &mut dyn Platform,
        sel: u16,
        need_long: bool,
    ) -> Result<(Segment, u8)> {
        let err = u32::from(sel & !3);
        if sel & !3 == 0 {
            return Err(Fault::gp(0));
        }
        let desc = self.read_descriptor(p, sel)?;
        let s = Segment::from_descriptor(sel, desc);
        if s.attr & Segment::ATTR_S == 0 || s.attr & 8 == 0 || (need_long && !s.long()) {
            return Err(Fault::gp(err));
        }
        if !s.present() {
            return Err(Fault::np(err));
        }
        let cpl = self.s.cpl();
        let conforming = s.attr & 4 != 0;
        let new_cpl = if conforming { cpl } else { s.dpl() };
        if new_cpl > cpl {
            return Err(Fault::gp(err));
        }
        Ok((s, new_cpl))
    }

    fn deliver_long(&mut self, p: &mut dyn Platform, f: Fault, idt_err: u32) -> Result<()> {
        let v = u64::from(f.vector);
        if v * 16 + 15 > u64::from(self.s.idtr.limit) {
            return Err(Fault::gp(idt_err));
        }
        let gate = self.read_lin::<16>(p, self.s.idtr.base.wrapping_add(v * 16), false)?;
        let lo = u64::from_le_bytes(gate[..8].try_into().unwrap_or([0; 8]));
        let hi = u64::from_le_bytes(gate[8..].try_into().unwrap_or([0; 8]));
        let typ = (lo >> 40) & 0xf;
        let dpl = ((lo >> 45) & 3) as u8;
        if typ != 0xe && typ != 0xf {
            return Err(Fault::gp(idt_err));
        }
        if f.soft && dpl < self.s.cpl() {
            return Err(Fault::gp(idt_err));
        }
        if lo & (1 << 47) == 0 {
            return Err(Fault::np(idt_err));
        }
        let offset = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000) | ((hi & 0xffff_ffff) << 32);
        let sel = ((lo >> 16) & 0xffff) as u16;
        let ist = (lo >> 32) & 7;
        let (mut cs, new_cpl) = self.gate_target(p, sel, true)?;
        let cpl = self.s.cpl();
        let rsp = if new_cpl < cpl || ist != 0 {
            let off = if ist != 0 {
                0x24 + (ist - 1) * 8
            } else {
                4 + u64::from(new_cpl) * 8
            };
            if off + 7 > u64::from(self.s.tr.limit) {
                return Err(Fault::with_error(
                    vector::TS,
                    u32::from(self.s.tr.selector & !3),
                ));
            }
            u64::from_le_bytes(self.read_lin::<8>(p, self.s.tr.base.wrapping_add(off), false)?)
        } else {
            self.s.gpr[4]
        } & !0xf;
        let mut frame = [0u64; 6];
        let mut n = 0;
        if let Some(e) = f.error {
            frame[n] = u64::from(e);
            n += 1;
        }
        let old = [
            self.s.rip,
            u64::from(self.s.seg[Seg::Cs as usize].selector),
            self.s.rflags,
            self.s.gpr[4],
            u64::from(self.s.seg[Seg::Ss as usize].selector),
        ];
        for x in old {
            frame[n] = x;
            n += 1;
        }
        let bytes: Vec<u8> = frame[..n].iter().flat_map(|x| x.to_le_bytes()).collect();
        let new_rsp = rsp.wrapping_sub(8 * n as u64);
        if !crate::exec::operand::canonical(new_rsp)
            || !crate::exec::operand::canonical(rsp.wrapping_sub(1))
        {
            return Err(Fault::ss(0));
        }
        self.write_lin(p, new_rsp, &bytes, new_cpl == 3)?;
        cs.attr = (cs.attr & !0x60) | (u16::from(new_cpl) << 5) | 1;
        cs.selector = (sel & !3) | u16::from(new_cpl);
        self.s.seg[Seg::Cs as usize] = cs;
        if new_cpl != cpl {
            self.s.seg[Seg::Ss as usize] = Segment {
                selector: u16::from(new_cpl),
                base: 0,
                limit: 0,
                attr: (u16::from(new_cpl) << 5) | 0x93 | Segment::ATTR_DB | Segment::ATTR_G,
            };
        }
        self.s.gpr[4] = new_rsp;
        self.s.rflags &= !(TF | NT | RF | VM);
        if typ == 0xe {
            self.s.rflags &= !IF;
        }
        self.s.rip = offset;
        Ok(())
    }

    fn deliver_protected(&mut self, p: &mut dyn Platform, f: Fault, idt_err: u32) -> Result<()> {
        let v = u64::from(f.vector);
        if v * 8 + 7 > u64::from(self.s.idtr.limit) {
            return Err(Fault::gp(idt_err));
        }
        let lo = u64::from_le_bytes(self.read_lin::<8>(
            p,
            self.wrap_lin(self.s.idtr.base + v * 8),
            false,
        )?);
        let typ = (lo >> 40) & 0xf;
        let dpl = ((lo >> 45) & 3) as u8;
        let gate32 = match typ {
            0xe | 0xf => true,
            0x6 | 0x7 => false,
            _ => return Err(Fault::gp(idt_err)),
        };
        if f.soft && dpl < self.s.cpl() {
            return Err(Fault::gp(idt_err));
        }
        if lo & (1 << 47) == 0 {
            return Err(Fault::np(idt_err));
        }
        let offset = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000);
        let sel = ((lo >> 16) & 0xffff) as u16;
        let (mut cs, new_cpl) = self.gate_target(p, sel, false)?;
        let cpl = self.s.cpl();
        let sz: u32 = if gate32 { 4 } else { 2 };
        let old_ss = self.s.seg[Seg::Ss as usize];
        let old_esp = self.s.gpr[4];
        let old_cs = u64::from(self.s.seg[Seg::Cs as usize].selector);
        let old_flags = self.s.rflags;
        let saved = (self.s.seg, self.s.gpr[4]);
        let r = (|| {
            if new_cpl < cpl {
                let tss_off = u64::from(new_cpl) * 8 + 4;
                let raw = self.read_lin::<8>(
                    p,
                    self.wrap_lin(self.s.tr.base.wrapping_add(tss_off)),
                    false,
                )?;
                let esp = u64::from(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]));
                let ss = u16::from_le_bytes([raw[4], raw[5]]);
                // Load SS with the target CPL's rules.
                let c = self.s.seg[Seg::Cs as usize];
                self.s.seg[Seg::Cs as usize].attr = (c.attr & !0x60) | (u16::from(new_cpl) << 5);
                let lr = self.load_seg(p, Seg::Ss, ss);
                self.s.seg[Seg::Cs as usize] = c;
                lr?;
                self.s.gpr[4] = esp;
                self.push(p, u64::from(old_ss.selector), sz)?;
                self.push(p, old_esp, sz)?;
            }
            self.push(p, old_flags, sz)?;
            self.push(p, old_cs, sz)?;
            self.push(p, self.s.rip, sz)?;
            if let Some(e) = f.error {
                self.push(p, u64::from(e), sz)?;
            }
            Ok(())
        })();
        if let Err(e) = r {
            self.s.seg = saved.0;
            self.s.gpr[4] = saved.1;
            return Err(e);
        }
        cs.attr = (cs.attr & !0x60) | (u16::from(new_cpl) << 5) | 1;
        cs.selector = (sel & !3) | u16::from(new_cpl);
        self.s.seg[Seg::Cs as usize] = cs;
        self.s.rflags &= !(TF | NT | RF | VM);
        if typ & 1 == 0 {
            self.s.rflags &= !IF;
        }
        self.s.rip = offset;
        Ok(())
    }
}
