//! x87 control instructions glibc uses (FNINIT, FLDCW/FNSTCW, FNSTSW, FNCLEX, FNSTENV/FLDENV,
//! FWAIT) plus FXSAVE/FXRSTOR and LDMXCSR/STMXCSR. x87 arithmetic is not implemented (#UD).

use iced_x86::{Instruction, Mnemonic, OpKind};

use super::operand::{ea, mem_seg};
use crate::cpu::Core;
use crate::exceptions::{Fault, Result};
use crate::platform::Platform;
use crate::state::cr::*;

/// MXCSR bits software may set (DAZ is not offered: MXCSR_MASK omits it).
pub(crate) const MXCSR_MASK: u32 = 0xffbf;

impl Core {
    /// #NM/#UD checks for x87 instructions.
    pub(crate) fn fpu_check(&self) -> Result<()> {
        if self.s.cr0 & (CR0_EM | CR0_TS) != 0 {
            return Err(Fault::nm());
        }
        Ok(())
    }

    /// #UD/#NM checks for SSE instructions.
    pub(crate) fn sse_check(&self) -> Result<()> {
        if self.s.cr0 & CR0_EM != 0 || self.s.cr4 & CR4_OSFXSR == 0 {
            return Err(Fault::ud());
        }
        if self.s.cr0 & CR0_TS != 0 {
            return Err(Fault::nm());
        }
        Ok(())
    }
}

/// FCW as hardware keeps it: bits 7 and 13-15 read as 0, bit 6 as 1.
fn fcw_load(v: u16) -> u16 {
    (v & 0x1f3f) | 0x40
}

fn abridged_tag(full: u16) -> u8 {
    (0..8).fold(0u8, |t, i| {
        if (full >> (2 * i)) & 3 != 3 {
            t | (1 << i)
        } else {
            t
        }
    })
}

pub(crate) fn exec(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let m = ins.mnemonic();
    match m {
        Mnemonic::Ldmxcsr
        | Mnemonic::Stmxcsr
        | Mnemonic::Fxsave
        | Mnemonic::Fxsave64
        | Mnemonic::Fxrstor
        | Mnemonic::Fxrstor64 => {
            if cpu.s.cr0 & (CR0_EM | CR0_TS) != 0 {
                return Err(if cpu.s.cr0 & CR0_EM != 0 {
                    Fault::ud()
                } else {
                    Fault::nm()
                });
            }
            if matches!(m, Mnemonic::Ldmxcsr | Mnemonic::Stmxcsr) && cpu.s.cr4 & CR4_OSFXSR == 0 {
                return Err(Fault::ud());
            }
        }
        Mnemonic::Wait => {
            if cpu.s.cr0 & (CR0_MP | CR0_TS) == (CR0_MP | CR0_TS) {
                return Err(Fault::nm());
            }
            return cpu.fpu_pending();
        }
        _ => cpu.fpu_check()?,
    }
    let f = cpu.s.fpu;
    match m {
        Mnemonic::Fninit | Mnemonic::Finit => {
            let f = &mut cpu.s.fpu;
            f.fcw = 0x37f;
            f.fsw = 0;
            f.ftw = 0;
            f.fop = 0;
            f.fip = 0;
            f.fdp = 0;
        }
        Mnemonic::Fnclex | Mnemonic::Fclex => cpu.s.fpu.fsw &= 0x7f00,
        Mnemonic::Fldcw => {
            let v = cpu.read_op(p, ins, 0)? as u16;
            cpu.s.fpu.fcw = fcw_load(v);
        }
        Mnemonic::Fnstcw | Mnemonic::Fstcw => {
            let v = u64::from(f.fcw);
            cpu.write_op(p, ins, 0, v)?;
        }
        Mnemonic::Fnstsw | Mnemonic::Fstsw => {
            let v = u64::from(f.fsw);
            if ins.op0_kind() == OpKind::Register {
                super::operand::reg_write(cpu, iced_x86::Register::AX, v);
            } else {
                cpu.write_op(p, ins, 0, v)?;
            }
        }
        Mnemonic::Fnstenv | Mnemonic::Fstenv | Mnemonic::Fldenv => {
            // 28-byte protected-mode environment layout (32-bit operand size).
            let a = ea(cpu, ins);
            let seg = mem_seg(ins);
            if m == Mnemonic::Fldenv {
                let fcw = cpu.read_mem(p, seg, a, 2)? as u16;
                let fsw = cpu.read_mem(p, seg, a + 4, 2)? as u16;
                let ftw = cpu.read_mem(p, seg, a + 8, 2)? as u16;
                let fip = cpu.read_mem(p, seg, a + 12, 4)?;
                let fdp = cpu.read_mem(p, seg, a + 20, 4)?;
                let f = &mut cpu.s.fpu;
                f.fcw = fcw_load(fcw);
                f.fsw = fsw;
                f.ftw = abridged_tag(ftw);
                f.fip = fip;
                f.fdp = fdp;
            } else {
                let vals = [
                    (0, 4, u64::from(f.fcw) | 0xffff_0000),
                    (4, 4, u64::from(f.fsw) | 0xffff_0000),
                    (
                        8,
                        4,
                        u64::from(super::hostexec::full_tag_word(&f)) | 0xffff_0000,
                    ),
                    (12, 4, f.fip & 0xffff_ffff),
                    (16, 4, u64::from(f.fop & 0x7ff) << 16),
                    (20, 4, f.fdp & 0xffff_ffff),
                    (24, 4, 0xffff_0000),
                ];
                for (o, s, v) in vals {
                    cpu.write_mem(p, seg, a + o, s, v)?;
                }
                // FNSTENV masks all x87 exceptions afterwards.
                cpu.s.fpu.fcw |= 0x3f;
            }
        }
        Mnemonic::Fnsave | Mnemonic::Fsave | Mnemonic::Frstor => {
            // The 32-bit protected-mode environment, then ST(0)..ST(7), 10 bytes each.
            let a = ea(cpu, ins);
            let seg = mem_seg(ins);
            let lin = cpu.seg_lin(seg, a, 108)?;
            let user = cpu.user();
            let mut img = [0u8; 108];
            if m == Mnemonic::Frstor {
                cpu.read_lin_slow(p, lin, &mut img, user, crate::mmu::Access::Read)?;
                let r16 = |o: usize| u16::from_le_bytes([img[o], img[o + 1]]);
                let r32 =
                    |o: usize| u32::from_le_bytes([img[o], img[o + 1], img[o + 2], img[o + 3]]);
                let f = &mut cpu.s.fpu;
                f.fcw = fcw_load(r16(0));
                f.fsw = r16(4);
                f.ftw = abridged_tag(r16(8));
                f.fip = u64::from(r32(12));
                f.fop = ((r32(16) >> 16) & 0x7ff) as u16;
                f.fdp = u64::from(r32(20));
                for i in 0..8 {
                    let mut v = [0u8; 16];
                    v[..10].copy_from_slice(&img[28 + 10 * i..38 + 10 * i]);
                    f.st[i] = u128::from_le_bytes(v);
                }
            } else {
                let words = [
                    u32::from(f.fcw) | 0xffff_0000,
                    u32::from(f.fsw) | 0xffff_0000,
                    u32::from(super::hostexec::full_tag_word(&f)) | 0xffff_0000,
                    f.fip as u32,
                    u32::from(f.fop & 0x7ff) << 16,
                    f.fdp as u32,
                    0xffff_0000,
                ];
                for (i, w) in words.iter().enumerate() {
                    img[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
                }
                for (i, st) in f.st.iter().enumerate() {
                    img[28 + 10 * i..38 + 10 * i].copy_from_slice(&st.to_le_bytes()[..10]);
                }
                cpu.write_lin(p, lin, &img, user)?;
                // FNSAVE ends with FNINIT.
                let f = &mut cpu.s.fpu;
                (f.fcw, f.fsw, f.ftw, f.fop, f.fip, f.fdp) = (0x37f, 0, 0, 0, 0, 0);
            }
        }
        Mnemonic::Ldmxcsr => {
            let v = cpu.read_op(p, ins, 0)? as u32;
            if v & !MXCSR_MASK != 0 {
                return Err(Fault::gp0());
            }
            cpu.s.fpu.mxcsr = v;
        }
        Mnemonic::Stmxcsr => {
            let v = u64::from(f.mxcsr);
            cpu.write_op(p, ins, 0, v)?;
        }
        Mnemonic::Fxsave | Mnemonic::Fxsave64 => {
            let a = ea(cpu, ins);
            let seg = mem_seg(ins);
            if a & 15 != 0 {
                return Err(Fault::gp0());
            }
            let img = fxsave_image(cpu, m == Mnemonic::Fxsave64);
            let lin = cpu.seg_lin(seg, a, 512)?;
            let user = cpu.user();
            cpu.write_lin(p, lin, &img, user)?;
        }
        Mnemonic::Fxrstor | Mnemonic::Fxrstor64 => {
            let a = ea(cpu, ins);
            let seg = mem_seg(ins);
            if a & 15 != 0 {
                return Err(Fault::gp0());
            }
            let lin = cpu.seg_lin(seg, a, 512)?;
            let user = cpu.user();
            let mut img = [0u8; 512];
            cpu.read_lin_slow(p, lin, &mut img, user, crate::mmu::Access::Read)?;
            fxrstor_image(cpu, &img, m == Mnemonic::Fxrstor64)?;
        }
        _ => return Err(Fault::ud()),
    }
    Ok(())
}

pub(crate) fn fxsave_image(cpu: &Core, wide: bool) -> [u8; 512] {
    let f = &cpu.s.fpu;
    let mut b = [0u8; 512];
    b[0..2].copy_from_slice(&f.fcw.to_le_bytes());
    b[2..4].copy_from_slice(&f.fsw.to_le_bytes());
    b[4] = f.ftw;
    b[6..8].copy_from_slice(&f.fop.to_le_bytes());
    if wide {
        b[8..16].copy_from_slice(&f.fip.to_le_bytes());
        b[16..24].copy_from_slice(&f.fdp.to_le_bytes());
    } else {
        b[8..12].copy_from_slice(&(f.fip as u32).to_le_bytes());
        b[16..20].copy_from_slice(&(f.fdp as u32).to_le_bytes());
    }
    b[24..28].copy_from_slice(&f.mxcsr.to_le_bytes());
    b[28..32].copy_from_slice(&MXCSR_MASK.to_le_bytes());
    for (i, st) in f.st.iter().enumerate() {
        let o = 32 + i * 16;
        b[o..o + 10].copy_from_slice(&st.to_le_bytes()[..10]);
    }
    let nx = if cpu.s.in_64bit_mode() { 16 } else { 8 };
    for (i, x) in f.xmm.iter().enumerate().take(nx) {
        let o = 160 + i * 16;
        b[o..o + 16].copy_from_slice(&x.to_le_bytes());
    }
    b
}

pub(crate) fn fxrstor_image(cpu: &mut Core, b: &[u8; 512], wide: bool) -> Result<()> {
    let rd16 = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let rd32 = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let mxcsr = rd32(24);
    if mxcsr & !MXCSR_MASK != 0 {
        return Err(Fault::gp0());
    }
    let nx = if cpu.s.in_64bit_mode() { 16 } else { 8 };
    let f = &mut cpu.s.fpu;
    f.fcw = fcw_load(rd16(0));
    f.fsw = rd16(2);
    f.ftw = b[4];
    f.fop = rd16(6);
    if wide {
        f.fip = u64::from(rd32(8)) | (u64::from(rd32(12)) << 32);
        f.fdp = u64::from(rd32(16)) | (u64::from(rd32(20)) << 32);
    } else {
        f.fip = u64::from(rd32(8));
        f.fdp = u64::from(rd32(16));
    }
    f.mxcsr = mxcsr;
    for i in 0..8 {
        let o = 32 + i * 16;
        let mut v = [0u8; 16];
        v[..10].copy_from_slice(&b[o..o + 10]);
        f.st[i] = u128::from_le_bytes(v);
    }
    for i in 0..nx {
        let o = 160 + i * 16;
        let mut v = [0u8; 16];
        v.copy_from_slice(&b[o..o + 16]);
        f.xmm[i] = u128::from_le_bytes(v);
    }
    Ok(())
}
