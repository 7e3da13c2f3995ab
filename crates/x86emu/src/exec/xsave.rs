//! XSAVE and the AVX state: XSAVE/XSAVEOPT/XSAVEC/XRSTOR over x87, SSE and AVX (the
//! standard layout: the FXSAVE image, the 64-byte header at 512, YMM upper halves at
//! 576), XGETBV/XSETBV, VZEROUPPER/VZEROALL and VLDMXCSR/VSTMXCSR.

use iced_x86::{Instruction, Mnemonic as M};

use super::operand::{ea, mem_seg};
use super::x87::{fxrstor_image, fxsave_image, MXCSR_MASK};
use crate::cpu::Core;
use crate::cpuid::{XCR0_SUPPORTED, XSAVE_AVX_SIZE, XSAVE_LEGACY_AND_HEADER};
use crate::exceptions::{Fault, Result};
use crate::mmu::Access;
use crate::platform::Platform;
use crate::state::cr::*;

const X87: u64 = 1;
const SSE: u64 = 2;
const AVX: u64 = 4;
const HEADER: usize = 512;
const AVX_AT: usize = XSAVE_LEGACY_AND_HEADER as usize;
/// XCOMP_BV bit 63: the area is in the compacted form.
const COMPACTED: u64 = 1 << 63;

/// Bytes an XSAVE area needs for the components `xcr0` enables.
pub(crate) fn area_size(xcr0: u64) -> u32 {
    if xcr0 & AVX != 0 {
        XSAVE_LEGACY_AND_HEADER + XSAVE_AVX_SIZE
    } else {
        XSAVE_LEGACY_AND_HEADER
    }
}

impl Core {
    /// XCR0 bits this CPU's CPUID offers.
    fn xcr0_offered(&self) -> u64 {
        u64::from(self.cpuid.lookup(0xd, 0).eax) & XCR0_SUPPORTED
    }

    /// #UD without CR4.OSXSAVE, #NM with CR0.TS: the checks every XSAVE-family and VEX
    /// state instruction makes first.
    fn xsave_check(&self) -> Result<()> {
        if self.s.cr4 & CR4_OSXSAVE == 0 {
            return Err(Fault::ud());
        }
        Ok(())
    }

    /// Checks for VEX-encoded instructions: XCR0 must enable SSE and AVX state.
    pub(crate) fn avx_check(&self) -> Result<()> {
        if self.s.cr4 & CR4_OSXSAVE == 0 || self.s.xcr0 & (SSE | AVX) != SSE | AVX {
            return Err(Fault::ud());
        }
        if self.s.cr0 & CR0_TS != 0 {
            return Err(Fault::nm());
        }
        Ok(())
    }

    /// Components not in their initial state (XINUSE); a conservative answer is allowed.
    fn xinuse(&self) -> u64 {
        let f = &self.s.fpu;
        let mut u = 0;
        // The x87 initial configuration includes ST0-7 = 0, empty or not.
        if f.fcw != 0x37f
            || f.fsw != 0
            || f.ftw != 0
            || f.fop != 0
            || f.fip != 0
            || f.fdp != 0
            || f.st.iter().any(|&r| r & ((1 << 80) - 1) != 0)
        {
            u |= X87;
        }
        if f.xmm.iter().any(|&x| x != 0) || f.mxcsr != 0x1f80 {
            u |= SSE;
        }
        if f.ymm_hi.iter().any(|&x| x != 0) {
            u |= AVX;
        }
        u
    }

    /// Number of vector registers the current mode can name.
    fn vec_regs(&self) -> usize {
        if self.s.in_64bit_mode() {
            16
        } else {
            8
        }
    }

    fn xsave(&mut self, p: &mut dyn Platform, ins: &Instruction, compact: bool) -> Result<()> {
        let a = ea(self, ins);
        if a & 63 != 0 {
            return Err(Fault::gp0());
        }
        let rfbm = self.s.xcr0 & ((self.s.gpr[2] << 32) | (self.s.gpr[0] & 0xffff_ffff));
        let inuse = self.xinuse();
        let wide = matches!(ins.mnemonic(), M::Xsave64 | M::Xsaveopt64 | M::Xsavec64);
        let size = area_size(self.s.xcr0) as usize;
        let lin = self.seg_lin(mem_seg(ins), a, size as u32)?;
        let user = self.user();
        // Read-modify-write of the header and the parts left alone, so a fault leaves
        // memory as it was.
        let mut area = vec![0u8; size];
        self.read_lin_slow(p, lin, &mut area, user, Access::Write)?;
        let img = fxsave_image(self, wide);
        let save = |c: u64| rfbm & c != 0 && (!compact || inuse & c != 0);
        if save(X87) {
            area[0..24].copy_from_slice(&img[0..24]);
            area[32..160].copy_from_slice(&img[32..160]);
        }
        // MXCSR (and MXCSR_MASK): with either SSE or AVX state for XSAVE and XSAVEOPT; as
        // part of the SSE component (so subject to the init optimization) for XSAVEC.
        if (!compact && rfbm & (SSE | AVX) != 0) || save(SSE) {
            area[24..32].copy_from_slice(&img[24..32]);
        }
        if save(SSE) {
            let n = self.vec_regs() * 16;
            area[160..160 + n].copy_from_slice(&img[160..160 + n]);
        }
        if save(AVX) && size >= AVX_AT + 256 {
            for i in 0..self.vec_regs() {
                let o = AVX_AT + 16 * i;
                area[o..o + 16].copy_from_slice(&self.s.fpu.ymm_hi[i].to_le_bytes());
            }
        }
        let mut bv = u64::from_le_bytes(area[HEADER..HEADER + 8].try_into().unwrap_or([0; 8]));
        if compact {
            // XSTATE_BV and XCOMP_BV; the rest of the header keeps what it held (as the
            // host's XSAVEC leaves it).
            bv = rfbm & inuse;
            area[HEADER + 8..HEADER + 16].copy_from_slice(&(COMPACTED | rfbm).to_le_bytes());
        } else {
            bv = (bv & !rfbm) | (rfbm & inuse);
        }
        area[HEADER..HEADER + 8].copy_from_slice(&bv.to_le_bytes());
        self.write_lin(p, lin, &area, user)
    }

    fn xrstor(&mut self, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
        let a = ea(self, ins);
        if a & 63 != 0 {
            return Err(Fault::gp0());
        }
        let rfbm = self.s.xcr0 & ((self.s.gpr[2] << 32) | (self.s.gpr[0] & 0xffff_ffff));
        let wide = ins.mnemonic() == M::Xrstor64;
        let lin = self.seg_lin(mem_seg(ins), a, XSAVE_LEGACY_AND_HEADER)?;
        let user = self.user();
        let mut head = [0u8; XSAVE_LEGACY_AND_HEADER as usize];
        self.read_lin_slow(p, lin, &mut head, user, Access::Read)?;
        let q = |o: usize| u64::from_le_bytes(head[o..o + 8].try_into().unwrap_or([0; 8]));
        let bv = q(HEADER);
        let comp = q(HEADER + 8);
        let compact = comp & COMPACTED != 0;
        if compact {
            // Bytes 16-63 of the header must be zero for the compacted form (the standard
            // form checks only bytes 8-23).
            if comp & !COMPACTED & !self.s.xcr0 != 0
                || bv & !(comp & !COMPACTED) != 0
                || head[HEADER + 16..HEADER + 64].iter().any(|&b| b != 0)
            {
                return Err(Fault::gp0());
            }
        } else if comp != 0 || bv & !self.s.xcr0 != 0 || q(HEADER + 16) != 0 {
            return Err(Fault::gp0());
        }
        let mut ymm_hi = None;
        if rfbm & bv & AVX != 0 {
            let mut b = [0u8; 256];
            let l2 = self.seg_lin(mem_seg(ins), a + AVX_AT as u64, 256)?;
            self.read_lin_slow(p, l2, &mut b, user, Access::Read)?;
            ymm_hi = Some(b);
        }
        // The compacted form loads MXCSR with the SSE component only (RFBM[2] does not
        // count), and initialises it when RFBM[1] is set and XSTATE_BV[1] clear.
        let mxcsr_from_mem = if compact {
            rfbm & bv & SSE != 0
        } else {
            rfbm & (SSE | AVX) != 0
        };
        let mxcsr = u32::from_le_bytes([head[24], head[25], head[26], head[27]]);
        if mxcsr_from_mem && mxcsr & !MXCSR_MASK != 0 {
            return Err(Fault::gp0());
        }
        // Everything checked: load. fxrstor_image takes the whole legacy region, so keep
        // what this XRSTOR does not restore and put it back afterwards.
        let old = self.s.fpu;
        let mut img = [0u8; 512];
        img.copy_from_slice(&head[..512]);
        if !mxcsr_from_mem {
            img[24..28].copy_from_slice(&old.mxcsr.to_le_bytes());
        }
        fxrstor_image(self, &img, wide)?;
        let nx = self.vec_regs();
        let f = &mut self.s.fpu;
        if rfbm & X87 == 0 {
            (f.fcw, f.fsw, f.ftw, f.fop, f.fip, f.fdp, f.st) =
                (old.fcw, old.fsw, old.ftw, old.fop, old.fip, old.fdp, old.st);
        } else if bv & X87 == 0 {
            (f.fcw, f.fsw, f.ftw, f.fop, f.fip, f.fdp, f.st) = (0x37f, 0, 0, 0, 0, 0, [0; 8]);
        }
        if rfbm & SSE == 0 {
            f.xmm = old.xmm;
        } else if bv & SSE == 0 {
            f.xmm[..nx].fill(0);
        }
        if compact && rfbm & SSE != 0 && !mxcsr_from_mem {
            f.mxcsr = 0x1f80;
        }
        if rfbm & AVX != 0 {
            match ymm_hi {
                Some(b) => {
                    for i in 0..nx {
                        let mut v = [0u8; 16];
                        v.copy_from_slice(&b[16 * i..16 * i + 16]);
                        f.ymm_hi[i] = u128::from_le_bytes(v);
                    }
                }
                None => f.ymm_hi[..nx].fill(0),
            }
        }
        Ok(())
    }
}

pub(crate) fn exec(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let m = ins.mnemonic();
    if cpu.cpuid.lookup(1, 0).ecx & (1 << 26) == 0 {
        return Err(Fault::ud());
    }
    match m {
        M::Xgetbv => {
            cpu.xsave_check()?;
            let v = match cpu.s.gpr[1] as u32 {
                0 => cpu.s.xcr0,
                _ => return Err(Fault::gp0()),
            };
            cpu.s.gpr[0] = v & 0xffff_ffff;
            cpu.s.gpr[2] = v >> 32;
        }
        M::Xsetbv => {
            cpu.xsave_check()?;
            cpu.require_cpl0()?;
            let v = (cpu.s.gpr[2] << 32) | (cpu.s.gpr[0] & 0xffff_ffff);
            if cpu.s.gpr[1] as u32 != 0
                || v & X87 == 0
                || (v & AVX != 0 && v & SSE == 0)
                || v & !cpu.xcr0_offered() != 0
            {
                return Err(Fault::gp0());
            }
            cpu.s.xcr0 = v;
        }
        M::Xsave | M::Xsave64 | M::Xsaveopt | M::Xsaveopt64 | M::Xsavec | M::Xsavec64 => {
            cpu.xsave_check()?;
            if cpu.s.cr0 & CR0_TS != 0 {
                return Err(Fault::nm());
            }
            let sub1 = cpu.cpuid.lookup(0xd, 1).eax;
            let compact = matches!(m, M::Xsavec | M::Xsavec64);
            if (compact && sub1 & 2 == 0)
                || (matches!(m, M::Xsaveopt | M::Xsaveopt64) && sub1 & 1 == 0)
            {
                return Err(Fault::ud());
            }
            cpu.xsave(p, ins, compact)?;
        }
        M::Xrstor | M::Xrstor64 => {
            cpu.xsave_check()?;
            if cpu.s.cr0 & CR0_TS != 0 {
                return Err(Fault::nm());
            }
            cpu.xrstor(p, ins)?;
        }
        _ => return Err(Fault::ud()),
    }
    Ok(())
}

/// VZEROUPPER, VZEROALL, VLDMXCSR and VSTMXCSR (the VEX forms that touch state the
/// emulator keeps itself).
pub(crate) fn exec_vex_state(
    cpu: &mut Core,
    p: &mut dyn Platform,
    ins: &Instruction,
) -> Result<()> {
    if cpu.cpuid.lookup(1, 0).ecx & (1 << 28) == 0 {
        return Err(Fault::ud());
    }
    cpu.avx_check()?;
    let nx = cpu.vec_regs();
    match ins.mnemonic() {
        M::Vzeroupper => cpu.s.fpu.ymm_hi[..nx].fill(0),
        M::Vzeroall => {
            cpu.s.fpu.ymm_hi[..nx].fill(0);
            cpu.s.fpu.xmm[..nx].fill(0);
        }
        M::Vldmxcsr => {
            let v = cpu.read_op(p, ins, 0)? as u32;
            if v & !MXCSR_MASK != 0 {
                return Err(Fault::gp0());
            }
            cpu.s.fpu.mxcsr = v;
        }
        M::Vstmxcsr => {
            let v = u64::from(cpu.s.fpu.mxcsr);
            cpu.write_op(p, ins, 0, v)?;
        }
        _ => return Err(Fault::ud()),
    }
    Ok(())
}
