//! AVX2 gathers (VPGATHERDD/DQ/QD/QQ, VGATHERDPS/DPD/QPS/QPD): one load per element
//! whose mask bit is set, at base + index[i] * scale + displacement. A fault leaves the
//! elements already loaded in the destination with their mask bits cleared, so the
//! restarted instruction goes on where it stopped, as on hardware.

use iced_x86::{Instruction, Mnemonic as M, Register};

use super::operand::{mem_seg, reg_read};
use crate::cpu::Core;
use crate::exceptions::{Fault, Result};
use crate::platform::Platform;

fn vec_index(r: Register) -> Option<usize> {
    if r.is_xmm() && (r as usize) < Register::XMM16 as usize {
        Some(r as usize - Register::XMM0 as usize)
    } else if r.is_ymm() && (r as usize) < Register::YMM16 as usize {
        Some(r as usize - Register::YMM0 as usize)
    } else {
        None
    }
}

fn bytes(cpu: &Core, n: usize) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[..16].copy_from_slice(&cpu.s.fpu.xmm[n].to_le_bytes());
    b[16..].copy_from_slice(&cpu.s.fpu.ymm_hi[n].to_le_bytes());
    b
}

fn store(cpu: &mut Core, n: usize, b: &[u8; 32]) {
    let mut lo = [0u8; 16];
    let mut hi = [0u8; 16];
    lo.copy_from_slice(&b[..16]);
    hi.copy_from_slice(&b[16..]);
    cpu.s.fpu.xmm[n] = u128::from_le_bytes(lo);
    cpu.s.fpu.ymm_hi[n] = u128::from_le_bytes(hi);
}

fn le(b: &[u8]) -> u64 {
    b.iter().rev().fold(0, |a, &x| (a << 8) | u64::from(x))
}

pub(crate) fn exec(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    if cpu.cpuid.lookup(7, 0).ebx & (1 << 5) == 0 {
        return Err(Fault::ud());
    }
    cpu.avx_check()?;
    let (data, index_q) = match ins.mnemonic() {
        M::Vpgatherdd | M::Vgatherdps => (4, false),
        M::Vpgatherdq | M::Vgatherdpd => (8, false),
        M::Vpgatherqd | M::Vgatherqps => (4, true),
        M::Vpgatherqq | M::Vgatherqpd => (8, true),
        _ => return Err(Fault::ud()),
    };
    let dst_r = ins.op0_register();
    let mask_r = ins.op2_register();
    let idx_r = ins.memory_index();
    let (Some(d), Some(m), Some(x)) = (vec_index(dst_r), vec_index(mask_r), vec_index(idx_r))
    else {
        return Err(Fault::ud());
    };
    if d == m || d == x || m == x {
        return Err(Fault::ud());
    }
    let wide = dst_r.is_ymm() || idx_r.is_ymm();
    let isz = if index_q { 8 } else { 4 };
    let count = if wide { 32 } else { 16 } / data.max(isz);
    let base = match ins.memory_base() {
        Register::None => 0,
        r => reg_read(cpu, r),
    };
    let disp = ins.memory_displacement64();
    let scale = u64::from(ins.memory_index_scale());
    let addr32 = ins.memory_base().is_gpr32();
    let seg = mem_seg(ins);
    let idx = bytes(cpu, x);
    let mut dst = bytes(cpu, d);
    let mut mask = bytes(cpu, m);
    let mut fault = None;
    for i in 0..count {
        let mo = i * data;
        if mask[mo + data - 1] & 0x80 == 0 {
            continue;
        }
        let raw = le(&idx[i * isz..(i + 1) * isz]);
        let iv = if index_q {
            raw
        } else {
            raw as u32 as i32 as i64 as u64
        };
        let mut a = base.wrapping_add(iv.wrapping_mul(scale)).wrapping_add(disp);
        if addr32 {
            a &= 0xffff_ffff;
        }
        match cpu.read_mem(p, seg, a, data as u32) {
            Ok(v) => {
                dst[mo..mo + data].copy_from_slice(&v.to_le_bytes()[..data]);
                mask[mo..mo + data].fill(0);
            }
            Err(f) => {
                fault = Some(f);
                break;
            }
        }
    }
    if let Some(f) = fault {
        store(cpu, d, &dst);
        store(cpu, m, &mask);
        return Err(f);
    }
    // Done: the whole mask register is cleared, and what lies past the elements (the
    // upper half for a 128-bit form, or of a qword-indexed dword gather) is zeroed.
    let used = count * data;
    dst[used..].fill(0);
    store(cpu, d, &dst);
    store(cpu, m, &[0; 32]);
    Ok(())
}
