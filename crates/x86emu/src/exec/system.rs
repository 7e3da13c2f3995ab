//! System instructions: control/debug registers, descriptor tables, MSRs, CPUID, TSC,
//! SYSCALL/SYSRET, SWAPGS, HLT, CLI/STI, port I/O, segment loads, cache/TLB control.

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use super::operand::{canonical, ea, mask, mem_seg, reg_read, reg_write, seg_of};
use crate::cpu::Core;
use crate::exceptions::{Fault, Result};
use crate::msr;
use crate::platform::Platform;
use crate::state::cr::*;
use crate::state::flags::*;
use crate::state::{Seg, Segment};

impl Core {
    pub(crate) fn require_cpl0(&self) -> Result<()> {
        if self.s.cpl() != 0 {
            return Err(Fault::gp0());
        }
        Ok(())
    }

    /// IN/OUT/INS/OUTS permission; the TSS I/O bitmap is not consulted (always denies).
    pub(crate) fn check_io_privilege(&self) -> Result<()> {
        if self.s.protected() && u64::from(self.s.cpl()) > (self.s.rflags & IOPL) >> 12 {
            return Err(Fault::gp0());
        }
        Ok(())
    }

    pub(crate) fn write_cr0(&mut self, v: u64) -> Result<()> {
        if v >> 32 != 0
            || (v & CR0_PG != 0 && v & CR0_PE == 0)
            || (v & CR0_NW != 0 && v & CR0_CD == 0)
        {
            return Err(Fault::gp0());
        }
        let v = v | CR0_ET;
        let was_pg = self.s.cr0 & CR0_PG != 0;
        let pg = v & CR0_PG != 0;
        if pg && !was_pg && self.s.efer & EFER_LME != 0 {
            if self.s.cr4 & CR4_PAE == 0 {
                return Err(Fault::gp0());
            }
            self.s.efer |= EFER_LMA;
        }
        if !pg && was_pg && self.s.efer & EFER_LMA != 0 {
            if self.s.in_64bit_mode() {
                return Err(Fault::gp0());
            }
            self.s.efer &= !EFER_LMA;
        }
        self.s.cr0 = v;
        self.tlb.flush_all();
        Ok(())
    }

    pub(crate) fn write_cr4(&mut self, v: u64) -> Result<()> {
        let xsave = self.cpuid.lookup(1, 0).ecx & (1 << 26) != 0;
        let ok = CR4_SUPPORTED | if xsave { CR4_OSXSAVE } else { 0 };
        if v & !ok != 0 || (self.s.long_mode_active() && v & CR4_PAE == 0) {
            return Err(Fault::gp0());
        }
        self.s.cr4 = v;
        self.tlb.flush_all();
        Ok(())
    }

    pub(crate) fn write_cr3(&mut self, v: u64) {
        self.s.cr3 = if self.s.long_mode_active() {
            v & 0x000f_ffff_ffff_ffff
        } else {
            v & 0xffff_ffff
        };
        self.tlb.flush_non_global();
    }
}

pub(crate) fn mov_crdr(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let _ = p;
    cpu.require_cpl0()?;
    let dst = ins.op0_register();
    let src = ins.op1_register();
    let long = cpu.s.in_64bit_mode();
    let trunc = |v: u64| if long { v } else { v & 0xffff_ffff };
    if src.is_cr() {
        let v = match src {
            Register::CR0 => cpu.s.cr0,
            Register::CR2 => cpu.s.cr2,
            Register::CR3 => cpu.s.cr3,
            Register::CR4 => cpu.s.cr4,
            Register::CR8 => cpu.s.cr8,
            _ => return Err(Fault::ud()),
        };
        reg_write(cpu, dst, trunc(v));
        return Ok(());
    }
    if dst.is_cr() {
        let v = reg_read(cpu, src);
        match dst {
            Register::CR0 => cpu.write_cr0(v)?,
            Register::CR2 => cpu.s.cr2 = v,
            Register::CR3 => cpu.write_cr3(v),
            Register::CR4 => cpu.write_cr4(v)?,
            Register::CR8 => {
                if v >> 4 != 0 {
                    return Err(Fault::gp0());
                }
                cpu.s.cr8 = v;
            }
            _ => return Err(Fault::ud()),
        }
        return Ok(());
    }
    let dr_index = |r: Register, de: bool| -> Result<usize> {
        let n = r.number();
        match n {
            0..=3 | 6 | 7 => Ok(n),
            4 | 5 if !de => Ok(n + 2),
            _ => Err(Fault::ud()),
        }
    };
    let de = cpu.s.cr4 & CR4_DE != 0;
    if src.is_dr() {
        let i = dr_index(src, de)?;
        let v = cpu.s.dr.get(i).copied().unwrap_or(0);
        reg_write(cpu, dst, trunc(v));
    } else if dst.is_dr() {
        let i = dr_index(dst, de)?;
        let v = reg_read(cpu, src);
        if i >= 6 && v >> 32 != 0 {
            return Err(Fault::gp0());
        }
        if let Some(d) = cpu.s.dr.get_mut(i) {
            *d = match i {
                6 => v | 0xffff_0ff0,
                7 => (v | 0x400) & !0x2000,
                _ => v,
            };
        }
    }
    Ok(())
}

pub(crate) fn mov_sreg(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    if ins.op0_kind() == OpKind::Register && ins.op0_register().is_segment_register() {
        let seg = seg_of(ins.op0_register());
        if seg == Seg::Cs {
            return Err(Fault::ud());
        }
        let sel = cpu.read_op(p, ins, 1)? as u16;
        cpu.load_seg(p, seg, sel)?;
        if seg == Seg::Ss {
            cpu.new_shadow = true;
        }
        return Ok(());
    }
    let sel = u64::from(cpu.s.seg[seg_of(ins.op1_register()) as usize].selector);
    cpu.write_op(p, ins, 0, sel)
}

fn descriptor_table_op(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let m = ins.mnemonic();
    let a = ea(cpu, ins);
    let seg = mem_seg(ins);
    let long = cpu.s.in_64bit_mode();
    match m {
        Mnemonic::Lgdt | Mnemonic::Lidt => {
            cpu.require_cpl0()?;
            let limit = cpu.read_mem(p, seg, a, 2)? as u16;
            let base = if long {
                cpu.read_mem(p, seg, a.wrapping_add(2), 8)?
            } else {
                let b = cpu.read_mem(p, seg, a.wrapping_add(2), 4)?;
                // With a 16-bit operand size only 24 bits of base are loaded.
                if matches!(
                    ins.code(),
                    iced_x86::Code::Lgdt_m1632_16 | iced_x86::Code::Lidt_m1632_16
                ) {
                    b & 0xff_ffff
                } else {
                    b
                }
            };
            if long && !canonical(base) {
                return Err(Fault::gp0());
            }
            let t = crate::state::DescriptorTable { base, limit };
            if m == Mnemonic::Lgdt {
                cpu.s.gdtr = t;
            } else {
                cpu.s.idtr = t;
            }
        }
        _ => {
            let t = if m == Mnemonic::Sgdt {
                cpu.s.gdtr
            } else {
                cpu.s.idtr
            };
            cpu.write_mem(p, seg, a, 2, u64::from(t.limit))?;
            if long {
                cpu.write_mem(p, seg, a.wrapping_add(2), 8, t.base)?;
            } else {
                cpu.write_mem(p, seg, a.wrapping_add(2), 4, t.base & 0xffff_ffff)?;
            }
        }
    }
    Ok(())
}

/// LTR / LLDT: load a system segment from the GDT (16-byte descriptors in long mode).
fn load_system_segment(
    cpu: &mut Core,
    p: &mut dyn Platform,
    selector: u16,
    tss: bool,
) -> Result<()> {
    cpu.require_cpl0()?;
    let err = u32::from(selector & !3);
    if selector & !3 == 0 {
        if tss {
            return Err(Fault::gp0());
        }
        cpu.s.ldtr = Segment {
            selector,
            ..Default::default()
        };
        return Ok(());
    }
    if selector & 4 != 0 {
        return Err(Fault::gp(err));
    }
    let desc = cpu.read_descriptor(p, selector)?;
    let mut s = Segment::from_descriptor(selector, desc);
    let typ = s.attr & 0xf;
    let ok_type = if tss { typ == 9 || typ == 1 } else { typ == 2 };
    if s.attr & Segment::ATTR_S != 0 || !ok_type {
        return Err(Fault::gp(err));
    }
    if !s.present() {
        return Err(Fault::np(err));
    }
    if cpu.s.long_mode_active() {
        let hi = cpu.read_descriptor_high(p, selector)?;
        s.base |= (hi & 0xffff_ffff) << 32;
    }
    if tss {
        // Mark busy in the GDT and in the cached attributes.
        let lin = cpu.wrap_lin(cpu.s.gdtr.base.wrapping_add(u64::from(selector & !7) + 5));
        let b = ((desc >> 40) as u8) | 2;
        cpu.write_lin(p, lin, &[b], false)?;
        s.attr |= 2;
        cpu.s.tr = s;
    } else {
        cpu.s.ldtr = s;
    }
    Ok(())
}

fn syscall(cpu: &mut Core) -> Result<()> {
    if cpu.s.efer & EFER_SCE == 0 || !cpu.s.long_mode_active() {
        return Err(Fault::ud());
    }
    cpu.entries += 1;
    let star = cpu.s.msr.star;
    let sel = ((star >> 32) & 0xfffc) as u16;
    cpu.s.gpr[1] = cpu.next_rip;
    cpu.s.gpr[11] = cpu.s.rflags & !RF;
    let target = if cpu.s.in_64bit_mode() {
        cpu.s.msr.lstar
    } else {
        cpu.s.msr.cstar
    };
    cpu.s.seg[Seg::Cs as usize] = Segment {
        selector: sel,
        base: 0,
        limit: 0xffff_ffff,
        attr: 0xb | Segment::ATTR_S | Segment::ATTR_P | Segment::ATTR_L | Segment::ATTR_G,
    };
    cpu.s.seg[Seg::Ss as usize] = Segment {
        selector: sel.wrapping_add(8),
        base: 0,
        limit: 0xffff_ffff,
        attr: 0x3 | Segment::ATTR_S | Segment::ATTR_P | Segment::ATTR_DB | Segment::ATTR_G,
    };
    cpu.s.rflags = (cpu.s.rflags & !cpu.s.msr.sfmask & !RF) | FIXED1;
    cpu.next_rip = target;
    Ok(())
}

fn sysret(cpu: &mut Core, ins: &Instruction) -> Result<()> {
    if cpu.s.efer & EFER_SCE == 0 || !cpu.s.long_mode_active() {
        return Err(Fault::ud());
    }
    if cpu.s.cpl() != 0 || !cpu.s.in_64bit_mode() {
        return Err(Fault::gp0());
    }
    let base = ((cpu.s.msr.star >> 48) & 0xffff) as u16;
    let to64 = ins.code() == iced_x86::Code::Sysretq;
    let rip = if to64 {
        cpu.s.gpr[1]
    } else {
        cpu.s.gpr[1] & 0xffff_ffff
    };
    if to64 && !canonical(rip) {
        return Err(Fault::gp0());
    }
    let dpl3 = 3 << 5;
    cpu.s.seg[Seg::Cs as usize] = if to64 {
        Segment {
            selector: base.wrapping_add(16) | 3,
            base: 0,
            limit: 0xffff_ffff,
            attr: 0xb
                | dpl3
                | Segment::ATTR_S
                | Segment::ATTR_P
                | Segment::ATTR_L
                | Segment::ATTR_G,
        }
    } else {
        Segment {
            selector: base | 3,
            base: 0,
            limit: 0xffff_ffff,
            attr: 0xb
                | dpl3
                | Segment::ATTR_S
                | Segment::ATTR_P
                | Segment::ATTR_DB
                | Segment::ATTR_G,
        }
    };
    let ss = &mut cpu.s.seg[Seg::Ss as usize];
    ss.selector = base.wrapping_add(8) | 3;
    ss.attr = 0x3 | dpl3 | Segment::ATTR_S | Segment::ATTR_P | Segment::ATTR_DB | Segment::ATTR_G;
    ss.base = 0;
    ss.limit = 0xffff_ffff;
    cpu.s.rflags = (cpu.s.gpr[11] & 0x3c_7fd7) | FIXED1;
    cpu.next_rip = rip;
    Ok(())
}

fn load_far_pointer(
    cpu: &mut Core,
    p: &mut dyn Platform,
    ins: &Instruction,
    seg: Seg,
) -> Result<()> {
    let size = cpu.op_size(ins, 0);
    let a = ea(cpu, ins);
    let ms = mem_seg(ins);
    let off = cpu.read_mem(p, ms, a, size)?;
    let sel = cpu.read_mem(p, ms, a.wrapping_add(u64::from(size)), 2)? as u16;
    cpu.load_seg(p, seg, sel)?;
    reg_write(cpu, ins.op0_register(), off);
    if seg == Seg::Ss {
        cpu.new_shadow = true;
    }
    Ok(())
}

pub(crate) fn exec(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    match ins.mnemonic() {
        Mnemonic::Cpuid => {
            // CPUID serialises: after it a vCPU must run code as memory now holds it, also
            // code another vCPU wrote (x86's cross-modifying-code protocol). A lone CPU's
            // own stores to code are noted as they happen.
            cpu.serialise_code();
            let (leaf, sub) = (cpu.s.gpr[0] as u32, cpu.s.gpr[1] as u32);
            let mut e = cpu.cpuid.lookup(leaf, sub);
            match (leaf, sub) {
                (1, _) => {
                    e.ecx &= !crate::cpuid::OSXSAVE;
                    if cpu.s.cr4 & CR4_OSXSAVE != 0 {
                        e.ecx |= crate::cpuid::OSXSAVE;
                    }
                }
                // Sizes for what XCR0 enables now (standard and compacted are the same for
                // x87, SSE and AVX).
                (0xd, 0) if e.eax != 0 => e.ebx = crate::exec::xsave::area_size(cpu.s.xcr0),
                (0xd, 1) if e.eax & 2 != 0 => e.ebx = crate::exec::xsave::area_size(cpu.s.xcr0),
                _ => {}
            }
            cpu.s.gpr[0] = u64::from(e.eax);
            cpu.s.gpr[3] = u64::from(e.ebx);
            cpu.s.gpr[1] = u64::from(e.ecx);
            cpu.s.gpr[2] = u64::from(e.edx);
        }
        Mnemonic::Rdtsc | Mnemonic::Rdtscp => {
            if cpu.s.cr4 & CR4_TSD != 0 && cpu.s.cpl() != 0 {
                return Err(Fault::gp0());
            }
            let t = cpu.tsc();
            cpu.s.gpr[0] = t & 0xffff_ffff;
            cpu.s.gpr[2] = t >> 32;
            if ins.mnemonic() == Mnemonic::Rdtscp {
                cpu.s.gpr[1] = cpu.s.msr.tsc_aux & 0xffff_ffff;
            }
        }
        Mnemonic::Rdmsr => {
            cpu.require_cpl0()?;
            let index = cpu.s.gpr[1] as u32;
            // The platform owns device MSRs (x2APIC, TSC deadline, paravirtual clocks); only
            // those count as device accesses.
            let v = match p.msr_read(index) {
                Some(v) => {
                    cpu.io_done = true;
                    v
                }
                None => cpu.read_msr(index).ok_or(Fault::gp0())?,
            };
            cpu.s.gpr[0] = v & 0xffff_ffff;
            cpu.s.gpr[2] = v >> 32;
        }
        Mnemonic::Wrmsr => {
            cpu.require_cpl0()?;
            let v = (cpu.s.gpr[0] & 0xffff_ffff) | (cpu.s.gpr[2] << 32);
            let index = cpu.s.gpr[1] as u32;
            // A device MSR write may make an interrupt deliverable: let the platform stop.
            // The CPU's own MSRs (FS base on every context switch...) are no device access.
            let handled = p.msr_write(index, v);
            cpu.io_done |= handled.is_some();
            match handled {
                Some(true) => {
                    // The APIC base MSR has architectural state here too (RDMSR reads it).
                    if index == msr::APIC_BASE {
                        cpu.s.msr.apic_base = v;
                    }
                }
                Some(false) => return Err(Fault::gp0()),
                None => cpu.write_msr(index, v)?,
            }
        }
        Mnemonic::Syscall => syscall(cpu)?,
        Mnemonic::Sysret | Mnemonic::Sysretq => sysret(cpu, ins)?,
        Mnemonic::Swapgs => {
            if !cpu.s.in_64bit_mode() {
                return Err(Fault::ud());
            }
            cpu.require_cpl0()?;
            std::mem::swap(
                &mut cpu.s.seg[Seg::Gs as usize].base,
                &mut cpu.s.msr.kernel_gs_base,
            );
        }
        Mnemonic::Hlt => {
            cpu.require_cpl0()?;
            cpu.halted = true;
        }
        Mnemonic::Cli | Mnemonic::Sti => {
            if cpu.s.protected() && u64::from(cpu.s.cpl()) > (cpu.s.rflags & IOPL) >> 12 {
                return Err(Fault::gp0());
            }
            if ins.mnemonic() == Mnemonic::Cli {
                cpu.s.rflags &= !IF;
            } else {
                if cpu.s.rflags & IF == 0 {
                    cpu.new_shadow = true;
                }
                cpu.s.rflags |= IF;
            }
        }
        Mnemonic::In | Mnemonic::Out => {
            cpu.check_io_privilege()?;
            let is_in = ins.mnemonic() == Mnemonic::In;
            let (data_i, port_i) = if is_in { (0, 1) } else { (1, 0) };
            let port = cpu.read_op(p, ins, port_i)? as u16;
            let size = cpu.op_size(ins, data_i) as usize;
            cpu.io_done = true;
            if is_in {
                let mut b = [0u8; 4];
                p.pio_read(port, &mut b[..size.min(4)]);
                cpu.write_op(p, ins, 0, u64::from(u32::from_le_bytes(b)))?;
            } else {
                let v = cpu.read_op(p, ins, 1)? as u32;
                p.pio_write(port, &v.to_le_bytes()[..size.min(4)]);
            }
        }
        Mnemonic::Lgdt | Mnemonic::Lidt | Mnemonic::Sgdt | Mnemonic::Sidt => {
            descriptor_table_op(cpu, p, ins)?
        }
        Mnemonic::Ltr | Mnemonic::Lldt => {
            let sel = cpu.read_op(p, ins, 0)? as u16;
            load_system_segment(cpu, p, sel, ins.mnemonic() == Mnemonic::Ltr)?;
        }
        Mnemonic::Str | Mnemonic::Sldt => {
            let sel = if ins.mnemonic() == Mnemonic::Str {
                cpu.s.tr.selector
            } else {
                cpu.s.ldtr.selector
            };
            cpu.write_op(p, ins, 0, u64::from(sel))?;
        }
        Mnemonic::Smsw => {
            let v = cpu.s.cr0 & mask(cpu.op_size(ins, 0));
            cpu.write_op(p, ins, 0, v)?;
        }
        Mnemonic::Lmsw => {
            cpu.require_cpl0()?;
            let v = cpu.read_op(p, ins, 0)? & 0xf;
            // LMSW can set PE but never clear it.
            let new = (cpu.s.cr0 & !0xe) | v | (cpu.s.cr0 & CR0_PE);
            cpu.write_cr0(new)?;
        }
        Mnemonic::Clts => {
            cpu.require_cpl0()?;
            cpu.s.cr0 &= !CR0_TS;
        }
        Mnemonic::Invlpg => {
            cpu.require_cpl0()?;
            let a = ea(cpu, ins);
            let seg = mem_seg(ins);
            let base = if cpu.s.in_64bit_mode() && !matches!(seg, Seg::Fs | Seg::Gs) {
                0
            } else {
                cpu.s.seg[seg as usize].base
            };
            let lin = cpu.wrap_lin(base.wrapping_add(a));
            cpu.tlb.flush_page(lin);
        }
        Mnemonic::Wbinvd | Mnemonic::Invd => cpu.require_cpl0()?,
        // vCPUs run on host threads at once: the guest's fences must be the host's (a
        // store-buffering pair with MFENCE must never both read the old values).
        Mnemonic::Mfence => std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst),
        // SFENCE orders stores and LFENCE loads; the host (TSO) already keeps both orders
        // for the emulator's plain accesses, so only the compiler must not move them.
        Mnemonic::Lfence | Mnemonic::Sfence => {
            std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst)
        }
        Mnemonic::Prefetch
        | Mnemonic::Prefetchw
        | Mnemonic::Prefetchnta
        | Mnemonic::Prefetcht0
        | Mnemonic::Prefetcht1
        | Mnemonic::Prefetcht2 => {}
        Mnemonic::Rdpid => {
            if cpu.cpuid.lookup(7, 0).ecx & (1 << 22) == 0 {
                return Err(Fault::ud());
            }
            let v = cpu.s.msr.tsc_aux & 0xffff_ffff;
            super::operand::reg_write(cpu, ins.op0_register(), v);
        }
        // CLFLUSHOPT: on a CPU without it the 66 prefix is ignored and it is CLFLUSH.
        Mnemonic::Clflush | Mnemonic::Clflushopt => {
            // Faults like a byte read of the line would.
            let a = ea(cpu, ins);
            cpu.read_mem(p, mem_seg(ins), a, 1)?;
        }
        Mnemonic::Lss => load_far_pointer(cpu, p, ins, Seg::Ss)?,
        Mnemonic::Lfs => load_far_pointer(cpu, p, ins, Seg::Fs)?,
        Mnemonic::Lgs => load_far_pointer(cpu, p, ins, Seg::Gs)?,
        Mnemonic::Lds => load_far_pointer(cpu, p, ins, Seg::Ds)?,
        Mnemonic::Les => load_far_pointer(cpu, p, ins, Seg::Es)?,
        Mnemonic::Lsl | Mnemonic::Lar => {
            let sel = cpu.read_op(p, ins, 1)? as u16;
            match cpu.read_descriptor(p, sel) {
                Ok(desc) if sel & !3 != 0 => {
                    let s = Segment::from_descriptor(sel, desc);
                    let v = if ins.mnemonic() == Mnemonic::Lsl {
                        u64::from(s.limit)
                    } else {
                        desc >> 32 & 0x00ff_ff00
                    };
                    let size = cpu.op_size(ins, 0);
                    cpu.write_op(p, ins, 0, v & mask(size))?;
                    cpu.set_flags_masked(ZF, ZF);
                }
                _ => cpu.set_flags_masked(0, ZF),
            }
        }
        Mnemonic::Verr | Mnemonic::Verw => {
            let sel = cpu.read_op(p, ins, 0)? as u16;
            let ok = sel & !3 != 0 && cpu.read_descriptor(p, sel).is_ok();
            cpu.set_flags_masked(if ok { ZF } else { 0 }, ZF);
        }
        _ => return Err(Fault::ud()),
    }
    Ok(())
}
