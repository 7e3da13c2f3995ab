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

/// Sets FSW.TOP. `st` holds the registers relative to TOP (as FXSAVE stores them), so
/// the physical registers, which keep their contents, move within it.
pub(crate) fn set_top(f: &mut crate::state::FpuState, top: u16) {
    let old = (f.fsw >> 11) & 7;
    let by = usize::from(top.wrapping_sub(old) & 7);
    f.st.rotate_left(by);
    f.fsw = (f.fsw & !0x3800) | ((top & 7) << 11);
}

/// FSW.ES and B after FCW or FSW was loaded: set exactly when an exception flag is set
/// whose exception FCW leaves unmasked (a pending exception), as the hardware recomputes
/// them on FLDCW, FLDENV, FRSTOR, FXRSTOR, XRSTOR and FNSTENV's masking.
pub(crate) fn sync_es(f: &mut crate::state::FpuState) {
    f.fsw &= !0x8080;
    if f.fsw & !f.fcw & 0x3f != 0 {
        f.fsw |= 0x8080;
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
        // The waiting forms (FLDCW, FLDENV and FRSTOR are waiting instructions too):
        // #MF first for an exception left pending.
        Mnemonic::Fldcw
        | Mnemonic::Fldenv
        | Mnemonic::Frstor
        | Mnemonic::Fstcw
        | Mnemonic::Fstsw
        | Mnemonic::Fclex
        | Mnemonic::Finit
        | Mnemonic::Fstenv
        | Mnemonic::Fsave => {
            cpu.fpu_check()?;
            cpu.fpu_pending()?;
        }
        _ => cpu.fpu_check()?,
    }
    let f = cpu.s.fpu;
    match m {
        Mnemonic::Fninit | Mnemonic::Finit => {
            let f = &mut cpu.s.fpu;
            set_top(f, 0);
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
            let f = &mut cpu.s.fpu;
            f.fcw = fcw_load(v);
            // Unmasking an exception whose flag is set makes it pending (ES and B), and
            // masking the last such one clears them.
            sync_es(f);
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
        Mnemonic::Fnstenv
        | Mnemonic::Fstenv
        | Mnemonic::Fldenv
        | Mnemonic::Fnsave
        | Mnemonic::Fsave
        | Mnemonic::Frstor => {
            // The protected-mode environment (28 bytes with a 32-bit operand size, 14 with
            // a 16-bit one), and for FNSAVE/FRSTOR ST(0)..ST(7) after it, 10 bytes each.
            let wide = matches!(
                ins.memory_size(),
                iced_x86::MemorySize::FpuEnv28 | iced_x86::MemorySize::FpuState108
            );
            let env = if wide { 28 } else { 14 };
            let regs = matches!(m, Mnemonic::Fnsave | Mnemonic::Fsave | Mnemonic::Frstor);
            let len = env + if regs { 80 } else { 0 };
            let a = ea(cpu, ins);
            let lin = cpu.seg_lin(mem_seg(ins), a, len as u32)?;
            let user = cpu.user();
            let mut img = [0u8; 108];
            if matches!(m, Mnemonic::Fldenv | Mnemonic::Frstor) {
                cpu.read_lin_slow(p, lin, &mut img[..len], user, crate::mmu::Access::Read)?;
                let f = &mut cpu.s.fpu;
                let fsw = load_env(f, &img, wide);
                if regs {
                    for i in 0..8 {
                        let mut v = [0u8; 16];
                        v[..10].copy_from_slice(&img[env + 10 * i..env + 10 + 10 * i]);
                        f.st[i] = u128::from_le_bytes(v);
                    }
                } else {
                    // The registers stay where they are; ST(i) names others now.
                    set_top(f, (fsw >> 11) & 7);
                }
                f.fsw = fsw;
                sync_es(f);
            } else {
                store_env(&f, &mut img, wide);
                if regs {
                    for (i, st) in f.st.iter().enumerate() {
                        img[env + 10 * i..env + 10 + 10 * i]
                            .copy_from_slice(&st.to_le_bytes()[..10]);
                    }
                }
                cpu.write_lin(p, lin, &img[..len], user)?;
                let f = &mut cpu.s.fpu;
                if regs {
                    // FNSAVE ends with FNINIT.
                    set_top(f, 0);
                    (f.fcw, f.fsw, f.ftw, f.fop, f.fip, f.fdp) = (0x37f, 0, 0, 0, 0, 0);
                } else {
                    // FNSTENV masks all x87 exceptions afterwards (none is pending then).
                    f.fcw |= 0x3f;
                    sync_es(f);
                }
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
            // Up to the last XMM register the mode has: the reserved bytes after it and the
            // 48 left to software (464-511) keep what they held.
            let nx = if cpu.s.in_64bit_mode() { 16 } else { 8 };
            cpu.write_lin(p, lin, &img[..160 + 16 * nx], user)?;
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

/// Writes the FSTENV environment: each field in 32 bits (the upper half of the control,
/// status and tag words all ones) if `wide`, else in 16.
fn store_env(f: &crate::state::FpuState, img: &mut [u8], wide: bool) {
    let tags = super::hostexec::full_tag_word(f);
    if wide {
        let words = [
            u32::from(f.fcw) | 0xffff_0000,
            u32::from(f.fsw) | 0xffff_0000,
            u32::from(tags) | 0xffff_0000,
            f.fip as u32,
            u32::from(f.fop & 0x7ff) << 16,
            f.fdp as u32,
            0xffff_0000,
        ];
        for (i, w) in words.iter().enumerate() {
            img[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
    } else {
        let words = [f.fcw, f.fsw, tags, f.fip as u16, 0, f.fdp as u16, 0];
        for (i, w) in words.iter().enumerate() {
            img[2 * i..2 * i + 2].copy_from_slice(&w.to_le_bytes());
        }
    }
}

/// Loads the control and tag words and the pointers from an environment image; returns
/// the status word for the caller to install (TOP needs care).
fn load_env(f: &mut crate::state::FpuState, img: &[u8], wide: bool) -> u16 {
    let r16 = |o: usize| u16::from_le_bytes([img[o], img[o + 1]]);
    let r32 = |o: usize| u32::from_le_bytes([img[o], img[o + 1], img[o + 2], img[o + 3]]);
    if wide {
        f.fcw = fcw_load(r16(0));
        f.ftw = abridged_tag(r16(8));
        f.fip = u64::from(r32(12));
        f.fop = ((r32(16) >> 16) & 0x7ff) as u16;
        f.fdp = u64::from(r32(20));
        r16(4)
    } else {
        f.fcw = fcw_load(r16(0));
        f.ftw = abridged_tag(r16(4));
        f.fip = u64::from(r16(6));
        f.fop = 0;
        f.fdp = u64::from(r16(10));
        r16(2)
    }
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
    sync_es(f);
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
