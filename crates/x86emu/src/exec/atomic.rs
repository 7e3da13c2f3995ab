//! Atomic read-modify-write instructions: CMPXCHG, CMPXCHG8B/16B and XADD. With LOCK on
//! RAM they are atomic with respect to other vCPUs (host atomics or a global lock).

use iced_x86::{Instruction, Mnemonic as M};

use super::flags;
use crate::cpu::Core;
use crate::exceptions::{Fault, Result};
use crate::platform::Platform;

/// CMPXCHG, CMPXCHG8B/16B and XADD: atomic with LOCK on RAM.
pub(crate) fn exec(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    use super::operand::{ea, mask, mem_seg, reg_read, reg_write};
    let locked = ins.has_lock_prefix();
    match ins.mnemonic() {
        M::Cmpxchg => {
            let size = cpu.op_size(ins, 0);
            let accum = cpu.s.gpr[0] & mask(size);
            let src = reg_read(cpu, ins.op1_register());
            let old = if ins.op0_kind() == iced_x86::OpKind::Memory {
                // Hardware always writes the destination (the old value on failure); the
                // atomic path only writes when equal, which is indistinguishable for RAM.
                cpu.rmw(p, ins, size, locked, |v| {
                    if v == accum {
                        Some(src)
                    } else if locked {
                        None
                    } else {
                        Some(v)
                    }
                })?
            } else {
                let v = reg_read(cpu, ins.op0_register());
                if v == accum {
                    reg_write(cpu, ins.op0_register(), src);
                }
                v
            };
            let f = flags::sub_flags(accum, old, 0, accum.wrapping_sub(old), size);
            cpu.set_status(f);
            if old != accum {
                let r = match size {
                    1 => iced_x86::Register::AL,
                    2 => iced_x86::Register::AX,
                    4 => iced_x86::Register::EAX,
                    _ => iced_x86::Register::RAX,
                };
                reg_write(cpu, r, old);
            }
            Ok(())
        }
        M::Xadd => {
            let size = cpu.op_size(ins, 0);
            let src = reg_read(cpu, ins.op1_register());
            let (old, r) = if ins.op0_kind() == iced_x86::OpKind::Memory {
                let old = cpu.rmw(p, ins, size, locked, |v| {
                    Some(v.wrapping_add(src) & mask(size))
                })?;
                reg_write(cpu, ins.op1_register(), old);
                (old, old.wrapping_add(src))
            } else {
                // Source first, then destination: XADD r,r with the same register keeps the sum.
                let old = reg_read(cpu, ins.op0_register());
                reg_write(cpu, ins.op1_register(), old);
                reg_write(cpu, ins.op0_register(), old.wrapping_add(src));
                (old, old.wrapping_add(src))
            };
            cpu.set_status(flags::add_flags(old, src, 0, r, size));
            Ok(())
        }
        _ => {
            // CMPXCHG8B / CMPXCHG16B
            let wide = ins.mnemonic() == M::Cmpxchg16b;
            let half = if wide { 8 } else { 4 };
            let off = ea(cpu, ins);
            let seg = mem_seg(ins);
            if wide && off & 15 != 0 {
                return Err(Fault::gp0());
            }
            let hm = mask(half);
            let cmp_lo = cpu.s.gpr[0] & hm;
            let cmp_hi = cpu.s.gpr[2] & hm;
            let new_lo = cpu.s.gpr[3] & hm;
            let new_hi = cpu.s.gpr[1] & hm;
            let (old_lo, old_hi, equal) = if wide {
                let lin = cpu.seg_lin(seg, off, 16)?;
                let user = cpu.user();
                let guard_ptr = cpu.atomic_ptr(lin, 16, user)?;
                if let (Some(ptr), true) = (guard_ptr, locked) {
                    let (lo, hi, eq) = cmpxchg16b_host(ptr, cmp_lo, cmp_hi, new_lo, new_hi);
                    (lo, hi, eq)
                } else {
                    let v = cpu.read_mem128(p, seg, off)?;
                    let (lo, hi) = (v as u64, (v >> 64) as u64);
                    let eq = lo == cmp_lo && hi == cmp_hi;
                    let nv = if eq {
                        u128::from(new_lo) | (u128::from(new_hi) << 64)
                    } else {
                        v
                    };
                    cpu.write_mem128(p, seg, off, nv)?;
                    (lo, hi, eq)
                }
            } else {
                let cmp = cmp_lo | (cmp_hi << 32);
                let new = new_lo | (new_hi << 32);
                let lin = cpu.seg_lin(seg, off, 8)?;
                let user = cpu.user();
                let old = match cpu.atomic_ptr(lin, 8, user)? {
                    Some(ptr) if locked => {
                        // SAFETY: 8-byte aligned pointer into a RAM page (atomic_ptr).
                        let a = unsafe { std::sync::atomic::AtomicU64::from_ptr(ptr as *mut u64) };
                        match a.compare_exchange(
                            cmp,
                            new,
                            std::sync::atomic::Ordering::SeqCst,
                            std::sync::atomic::Ordering::SeqCst,
                        ) {
                            Ok(v) | Err(v) => v,
                        }
                    }
                    _ => {
                        let v = cpu.read_mem(p, seg, off, 8)?;
                        cpu.write_mem(p, seg, off, 8, if v == cmp { new } else { v })?;
                        v
                    }
                };
                (old & 0xffff_ffff, old >> 32, old == cmp)
            };
            if equal {
                cpu.set_flags_masked(crate::state::flags::ZF, crate::state::flags::ZF);
            } else {
                cpu.set_flags_masked(0, crate::state::flags::ZF);
                // EDX:EAX (zero-extended) or RDX:RAX receive the memory value.
                cpu.s.gpr[0] = old_lo;
                cpu.s.gpr[2] = old_hi;
            }
            Ok(())
        }
    }
}

/// 16-byte compare-exchange on host memory: the host's own LOCK CMPXCHG16B, so it is
/// atomic against every other access to those bytes, locked or plain, from any vCPU or
/// from compiled code.
#[cfg(target_arch = "x86_64")]
fn cmpxchg16b_host(
    ptr: *mut u8,
    cmp_lo: u64,
    cmp_hi: u64,
    new_lo: u64,
    new_hi: u64,
) -> (u64, u64, bool) {
    let (mut lo, mut hi) = (cmp_lo, cmp_hi);
    let eq: u8;
    // SAFETY: `ptr` is a 16-byte aligned pointer into a RAM page (atomic_ptr checked both);
    // RBX, which LLVM reserves, is swapped in for the instruction and restored after it.
    unsafe {
        std::arch::asm!(
            "xchg {nlo}, rbx",
            "lock cmpxchg16b xmmword ptr [{p}]",
            "sete {eq}",
            "mov rbx, {nlo}",
            p = in(reg) ptr,
            nlo = inout(reg) new_lo => _,
            eq = out(reg_byte) eq,
            inout("rax") lo,
            inout("rdx") hi,
            in("rcx") new_hi,
        );
    }
    (lo, hi, eq != 0)
}

/// Elsewhere: a global lock serialises the emulated CMPXCHG16Bs.
#[cfg(not(target_arch = "x86_64"))]
fn cmpxchg16b_host(
    ptr: *mut u8,
    cmp_lo: u64,
    cmp_hi: u64,
    new_lo: u64,
    new_hi: u64,
) -> (u64, u64, bool) {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut cur = [0u8; 16];
    // SAFETY: `ptr` is a 16-byte aligned pointer into a RAM page (atomic_ptr checked
    // alignment and that the page is RAM); the lock serialises emulated CMPXCHG16Bs.
    unsafe { std::ptr::copy_nonoverlapping(ptr, cur.as_mut_ptr(), 16) };
    let v = u128::from_le_bytes(cur);
    let (lo, hi) = (v as u64, (v >> 64) as u64);
    let eq = lo == cmp_lo && hi == cmp_hi;
    if eq {
        let nv = (u128::from(new_lo) | (u128::from(new_hi) << 64)).to_le_bytes();
        // SAFETY: as above.
        unsafe { std::ptr::copy_nonoverlapping(nv.as_ptr(), ptr, 16) };
    }
    (lo, hi, eq)
}
