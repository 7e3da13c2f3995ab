//! Instruction execution: one file per instruction family, dispatched on the mnemonic.

pub(crate) mod alu;
pub(crate) mod bits;
pub(crate) mod control;
pub(crate) mod fast;
pub(crate) mod flags;
pub(crate) mod mov;
pub(crate) mod muldiv;
pub(crate) mod operand;
pub(crate) mod shift;
pub(crate) mod sse;
pub(crate) mod sse_fp;

pub(crate) mod stack;
pub(crate) mod string;
pub(crate) mod system;
pub(crate) mod x87;

use iced_x86::{Instruction, Mnemonic as M};

use crate::cpu::Cpu;
use crate::exceptions::{Fault, Result};
use crate::platform::Platform;

/// Executes one instruction of a family.
pub(crate) type Handler = fn(&mut Cpu, &mut dyn Platform, &Instruction) -> Result<()>;

fn undefined(_: &mut Cpu, _: &mut dyn Platform, _: &Instruction) -> Result<()> {
    Err(Fault::ud())
}

/// Picks the family that executes `ins`; chosen once per decode and cached with it.
pub(crate) fn handler_for(ins: &Instruction) -> Handler {
    if ins.is_invalid() {
        return undefined;
    }
    if let Some(h) = fast::select(ins) {
        return h;
    }
    match ins.mnemonic() {
        M::Add
        | M::Or
        | M::Adc
        | M::Sbb
        | M::And
        | M::Sub
        | M::Xor
        | M::Cmp
        | M::Test
        | M::Inc
        | M::Dec
        | M::Neg
        | M::Not => alu::exec,
        M::Mov
        | M::Movzx
        | M::Movsx
        | M::Movsxd
        | M::Lea
        | M::Xchg
        | M::Cmovo
        | M::Cmovno
        | M::Cmovb
        | M::Cmovae
        | M::Cmove
        | M::Cmovne
        | M::Cmovbe
        | M::Cmova
        | M::Cmovs
        | M::Cmovns
        | M::Cmovp
        | M::Cmovnp
        | M::Cmovl
        | M::Cmovge
        | M::Cmovle
        | M::Cmovg
        | M::Seto
        | M::Setno
        | M::Setb
        | M::Setae
        | M::Sete
        | M::Setne
        | M::Setbe
        | M::Seta
        | M::Sets
        | M::Setns
        | M::Setp
        | M::Setnp
        | M::Setl
        | M::Setge
        | M::Setle
        | M::Setg
        | M::Bswap
        | M::Cbw
        | M::Cwde
        | M::Cdqe
        | M::Cwd
        | M::Cdq
        | M::Cqo
        | M::Lahf
        | M::Sahf
        | M::Clc
        | M::Stc
        | M::Cmc
        | M::Cld
        | M::Std
        | M::Xlatb
        | M::Nop
        | M::Pause
        | M::Endbr64
        | M::Endbr32 => mov::exec,
        M::Cmpxchg | M::Cmpxchg8b | M::Cmpxchg16b | M::Xadd => atomic,
        M::Shl
        | M::Sal
        | M::Shr
        | M::Sar
        | M::Rol
        | M::Ror
        | M::Rcl
        | M::Rcr
        | M::Shld
        | M::Shrd => shift::exec,
        M::Mul | M::Imul | M::Div | M::Idiv => muldiv::exec,
        M::Bt | M::Bts | M::Btr | M::Btc | M::Bsf | M::Bsr | M::Tzcnt | M::Lzcnt => bits::exec,
        M::Movsd | M::Cmpsd if !string::is_string_form(ins) => sse::exec,
        M::Movsb
        | M::Movsw
        | M::Movsd
        | M::Movsq
        | M::Stosb
        | M::Stosw
        | M::Stosd
        | M::Stosq
        | M::Lodsb
        | M::Lodsw
        | M::Lodsd
        | M::Lodsq
        | M::Cmpsb
        | M::Cmpsw
        | M::Cmpsd
        | M::Cmpsq
        | M::Scasb
        | M::Scasw
        | M::Scasd
        | M::Scasq
        | M::Insb
        | M::Insw
        | M::Insd
        | M::Outsb
        | M::Outsw
        | M::Outsd => string::exec,
        M::Jmp
        | M::Ja
        | M::Jae
        | M::Jb
        | M::Jbe
        | M::Je
        | M::Jne
        | M::Jg
        | M::Jge
        | M::Jl
        | M::Jle
        | M::Jo
        | M::Jno
        | M::Jp
        | M::Jnp
        | M::Js
        | M::Jns
        | M::Jcxz
        | M::Jecxz
        | M::Jrcxz
        | M::Loop
        | M::Loope
        | M::Loopne
        | M::Call
        | M::Ret
        | M::Retf
        | M::Iret
        | M::Iretd
        | M::Iretq
        | M::Int
        | M::Int3
        | M::Into
        | M::Int1 => control::exec,
        M::Push
        | M::Pop
        | M::Pushf
        | M::Pushfd
        | M::Pushfq
        | M::Popf
        | M::Popfd
        | M::Popfq
        | M::Enter
        | M::Leave
        | M::Pusha
        | M::Pushad
        | M::Popa
        | M::Popad => stack::exec,
        M::Cpuid
        | M::Rdtsc
        | M::Rdtscp
        | M::Rdmsr
        | M::Wrmsr
        | M::Syscall
        | M::Sysret
        | M::Sysretq
        | M::Swapgs
        | M::Hlt
        | M::Cli
        | M::Sti
        | M::In
        | M::Out
        | M::Lgdt
        | M::Lidt
        | M::Sgdt
        | M::Sidt
        | M::Ltr
        | M::Lldt
        | M::Str
        | M::Sldt
        | M::Smsw
        | M::Lmsw
        | M::Clts
        | M::Invlpg
        | M::Wbinvd
        | M::Invd
        | M::Lfence
        | M::Mfence
        | M::Sfence
        | M::Prefetch
        | M::Prefetchw
        | M::Prefetchnta
        | M::Prefetcht0
        | M::Prefetcht1
        | M::Prefetcht2
        | M::Clflush
        | M::Lss
        | M::Lfs
        | M::Lgs
        | M::Lds
        | M::Les
        | M::Lsl
        | M::Lar
        | M::Verr
        | M::Verw => system::exec,
        M::Fninit
        | M::Finit
        | M::Fldcw
        | M::Fnstcw
        | M::Fstcw
        | M::Fnstsw
        | M::Fstsw
        | M::Fnclex
        | M::Fclex
        | M::Wait
        | M::Fnstenv
        | M::Fstenv
        | M::Fldenv
        | M::Fxsave
        | M::Fxsave64
        | M::Fxrstor
        | M::Fxrstor64
        | M::Ldmxcsr
        | M::Stmxcsr => x87::exec,
        _ => sse::exec,
    }
}

/// CMPXCHG, CMPXCHG8B/16B and XADD: atomic with LOCK on RAM.
fn atomic(cpu: &mut Cpu, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    use operand::{ea, mask, mem_seg, reg_read, reg_write};
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

/// 16-byte compare-exchange on host memory. There is no stable 128-bit atomic, so this
/// uses the host's own LOCK CMPXCHG16B on x86-64 and a global lock elsewhere.
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
