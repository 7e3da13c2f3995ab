//! Operand access shared by all instruction families: registers, effective addresses,
//! segmentation, sized memory reads/writes, the stack, and locked read-modify-write.

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

use iced_x86::{Instruction, OpKind, Register};

use crate::cpu::Core;
use crate::exceptions::{Fault, Result};
use crate::platform::Platform;
use crate::state::Seg;

/// Serialises locked operations that cannot use a host atomic (split or MMIO).
static SPLIT_LOCK: Mutex<()> = Mutex::new(());

#[inline(always)]
pub(crate) fn mask(size: u32) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

#[inline(always)]
pub(crate) fn sign_bit(size: u32) -> u64 {
    // Sizes come from decoded operands (1..=8); clamp so no decoding oddity can overflow.
    1u64 << (size.clamp(1, 8) * 8 - 1)
}

/// Sign-extends a `size`-byte value to 64 bits.
#[inline(always)]
pub(crate) fn sext(v: u64, size: u32) -> u64 {
    let sh = 64 - size.clamp(1, 8) * 8;
    (((v << sh) as i64) >> sh) as u64
}

#[inline(always)]
pub(crate) fn canonical(v: u64) -> bool {
    ((v as i64) << 16 >> 16) as u64 == v
}

/// Value of a general-purpose register at its own width, zero-extended.
#[inline]
pub(crate) fn reg_read(cpu: &Core, r: Register) -> u64 {
    let n = r as u32;
    let g = &cpu.s.gpr;
    match n {
        1..=4 => g[(n - 1) as usize] & 0xff,
        5..=8 => (g[(n - 5) as usize] >> 8) & 0xff,
        9..=20 => g[(n - 5) as usize & 15] & 0xff,
        21..=36 => g[(n - 21) as usize & 15] & 0xffff,
        37..=52 => g[(n - 37) as usize & 15] & 0xffff_ffff,
        53..=68 => g[(n - 53) as usize & 15],
        _ => 0,
    }
}

/// Writes a general-purpose register with x86 width rules (32-bit writes zero-extend).
#[inline]
pub(crate) fn reg_write(cpu: &mut Core, r: Register, v: u64) {
    let n = r as u32;
    let g = &mut cpu.s.gpr;
    match n {
        1..=4 => {
            let x = &mut g[(n - 1) as usize];
            *x = (*x & !0xff) | (v & 0xff);
        }
        5..=8 => {
            let x = &mut g[(n - 5) as usize];
            *x = (*x & !0xff00) | ((v & 0xff) << 8);
        }
        9..=20 => {
            let x = &mut g[(n - 5) as usize & 15];
            *x = (*x & !0xff) | (v & 0xff);
        }
        21..=36 => {
            let x = &mut g[(n - 21) as usize & 15];
            *x = (*x & !0xffff) | (v & 0xffff);
        }
        37..=52 => g[(n - 37) as usize & 15] = v & 0xffff_ffff,
        53..=68 => g[(n - 53) as usize & 15] = v,
        _ => {}
    }
}

/// Byte width of a general-purpose register.
#[inline]
pub(crate) fn reg_size(r: Register) -> u32 {
    match r as u32 {
        1..=20 => 1,
        21..=36 => 2,
        37..=52 => 4,
        _ => 8,
    }
}

/// Segment register a memory operand uses.
#[inline]
pub(crate) fn mem_seg(ins: &Instruction) -> Seg {
    seg_of(ins.memory_segment())
}

#[inline]
pub(crate) fn seg_of(r: Register) -> Seg {
    match r {
        Register::ES => Seg::Es,
        Register::CS => Seg::Cs,
        Register::SS => Seg::Ss,
        Register::FS => Seg::Fs,
        Register::GS => Seg::Gs,
        _ => Seg::Ds,
    }
}

/// Effective address (segment offset) of the memory operand.
#[inline]
pub(crate) fn ea(cpu: &Core, ins: &Instruction) -> u64 {
    let base = ins.memory_base();
    let index = ins.memory_index();
    let mut a = ins.memory_displacement64();
    let mut asize = 0;
    if base != Register::None {
        if base == Register::RIP || base == Register::EIP {
            // iced already folded next_ip into the displacement.
            return if base == Register::EIP {
                a & 0xffff_ffff
            } else {
                a
            };
        }
        a = a.wrapping_add(reg_read(cpu, base));
        asize = reg_size(base);
    }
    if index != Register::None {
        a = a.wrapping_add(reg_read(cpu, index).wrapping_mul(u64::from(ins.memory_index_scale())));
        if asize == 0 {
            asize = reg_size(index);
        }
    }
    if asize == 0 {
        asize = match cpu.s.bitness() {
            64 => 8,
            _ if ins.memory_displ_size() == 2 => 2,
            _ => 4,
        };
    }
    a & mask(asize)
}

/// The value of an immediate operand of kind `k`, zero- or sign-extended as the kind
/// says; None if `k` is not an immediate.
#[inline]
pub(crate) fn immediate(ins: &Instruction, k: OpKind) -> Option<u64> {
    Some(match k {
        OpKind::Immediate8 => u64::from(ins.immediate8()),
        OpKind::Immediate8_2nd => u64::from(ins.immediate8_2nd()),
        OpKind::Immediate16 => u64::from(ins.immediate16()),
        OpKind::Immediate32 => u64::from(ins.immediate32()),
        OpKind::Immediate64 => ins.immediate64(),
        OpKind::Immediate8to16 => u64::from(ins.immediate8to16() as u16),
        OpKind::Immediate8to32 => u64::from(ins.immediate8to32() as u32),
        OpKind::Immediate8to64 => ins.immediate8to64() as u64,
        OpKind::Immediate32to64 => ins.immediate32to64() as u64,
        _ => return None,
    })
}

impl Core {
    /// Linear address of `seg:off` for an access of `size` bytes, with 64-bit canonical
    /// checks or legacy limit checks.
    #[inline]
    pub(crate) fn seg_lin(&self, seg: Seg, off: u64, size: u32) -> Result<u64> {
        if self.s.in_64bit_mode() {
            let lin = match seg {
                Seg::Fs | Seg::Gs => self.s.seg[seg as usize].base.wrapping_add(off),
                _ => off,
            };
            if !canonical(lin) {
                return Err(if seg == Seg::Ss {
                    Fault::ss(0)
                } else {
                    Fault::gp0()
                });
            }
            return Ok(lin);
        }
        let s = &self.s.seg[seg as usize];
        let expand_down = s.attr & 0x1c == 0x14;
        let last = off.wrapping_add(u64::from(size.max(1)) - 1);
        if !expand_down && (last > u64::from(s.limit) || last < off) && self.s.protected() {
            return Err(if seg == Seg::Ss {
                Fault::ss(0)
            } else {
                Fault::gp0()
            });
        }
        Ok(s.base.wrapping_add(off) & 0xffff_ffff)
    }

    #[inline]
    pub(crate) fn read_mem(
        &mut self,
        p: &mut dyn Platform,
        seg: Seg,
        off: u64,
        size: u32,
    ) -> Result<u64> {
        let lin = self.seg_lin(seg, off, size)?;
        self.read_lin_sized(p, lin, size)
    }

    #[inline]
    pub(crate) fn read_lin_sized(
        &mut self,
        p: &mut dyn Platform,
        lin: u64,
        size: u32,
    ) -> Result<u64> {
        let user = self.user();
        Ok(match size {
            1 => u64::from(self.read_lin::<1>(p, lin, user)?[0]),
            2 => u64::from(u16::from_le_bytes(self.read_lin::<2>(p, lin, user)?)),
            4 => u64::from(u32::from_le_bytes(self.read_lin::<4>(p, lin, user)?)),
            _ => u64::from_le_bytes(self.read_lin::<8>(p, lin, user)?),
        })
    }

    #[inline]
    pub(crate) fn write_mem(
        &mut self,
        p: &mut dyn Platform,
        seg: Seg,
        off: u64,
        size: u32,
        v: u64,
    ) -> Result<()> {
        let lin = self.seg_lin(seg, off, size)?;
        let user = self.user();
        let b = v.to_le_bytes();
        self.write_lin(p, lin, &b[..size.min(8) as usize], user)
    }

    pub(crate) fn read_mem128(&mut self, p: &mut dyn Platform, seg: Seg, off: u64) -> Result<u128> {
        let lin = self.seg_lin(seg, off, 16)?;
        let user = self.user();
        Ok(u128::from_le_bytes(self.read_lin::<16>(p, lin, user)?))
    }

    pub(crate) fn write_mem128(
        &mut self,
        p: &mut dyn Platform,
        seg: Seg,
        off: u64,
        v: u128,
    ) -> Result<()> {
        let lin = self.seg_lin(seg, off, 16)?;
        let user = self.user();
        self.write_lin(p, lin, &v.to_le_bytes(), user)
    }

    /// Size in bytes of operand `i`.
    #[inline]
    pub(crate) fn op_size(&self, ins: &Instruction, i: u32) -> u32 {
        match ins.op_kind(i) {
            OpKind::Register => reg_size(ins.op_register(i)),
            OpKind::Memory => ins.memory_size().size() as u32,
            OpKind::Immediate8 | OpKind::Immediate8_2nd => 1,
            OpKind::Immediate16 | OpKind::Immediate8to16 => 2,
            OpKind::Immediate32 | OpKind::Immediate8to32 => 4,
            _ => 8,
        }
    }

    /// Reads operand `i` (register, memory or immediate), zero-extended.
    #[inline]
    pub(crate) fn read_op(
        &mut self,
        p: &mut dyn Platform,
        ins: &Instruction,
        i: u32,
    ) -> Result<u64> {
        Ok(match ins.op_kind(i) {
            OpKind::Register => reg_read(self, ins.op_register(i)),
            OpKind::Memory => {
                let size = ins.memory_size().size() as u32;
                let off = ea(self, ins);
                self.read_mem(p, mem_seg(ins), off, size)?
            }
            k => immediate(ins, k).ok_or(Fault::ud())?,
        })
    }

    /// Writes operand `i` (register or memory).
    #[inline]
    pub(crate) fn write_op(
        &mut self,
        p: &mut dyn Platform,
        ins: &Instruction,
        i: u32,
        v: u64,
    ) -> Result<()> {
        match ins.op_kind(i) {
            OpKind::Register => {
                reg_write(self, ins.op_register(i), v);
                Ok(())
            }
            OpKind::Memory => {
                let size = ins.memory_size().size() as u32;
                let off = ea(self, ins);
                self.write_mem(p, mem_seg(ins), off, size, v)
            }
            _ => Err(Fault::ud()),
        }
    }

    /// Read-modify-write of operand 0: `f(old)` gives the new value (None: no write).
    /// With LOCK (or for XCHG) on memory the update is atomic with respect to other vCPUs.
    /// Returns the old value.
    pub(crate) fn rmw(
        &mut self,
        p: &mut dyn Platform,
        ins: &Instruction,
        size: u32,
        locked: bool,
        f: impl Fn(u64) -> Option<u64>,
    ) -> Result<u64> {
        if ins.op0_kind() != OpKind::Memory {
            let old = self.read_op(p, ins, 0)?;
            if let Some(new) = f(old) {
                self.write_op(p, ins, 0, new)?;
            }
            return Ok(old);
        }
        let off = ea(self, ins);
        let seg = mem_seg(ins);
        self.rmw_mem(p, seg, off, size, locked, f)
    }

    /// Read-modify-write of `size` bytes at `seg:off` (atomic with respect to other vCPUs
    /// when `locked`), for instructions whose memory operand is not where they write (a
    /// bit string's unit). Returns the old value.
    pub(crate) fn rmw_mem(
        &mut self,
        p: &mut dyn Platform,
        seg: Seg,
        off: u64,
        size: u32,
        locked: bool,
        f: impl Fn(u64) -> Option<u64>,
    ) -> Result<u64> {
        if !locked {
            let old = self.read_mem(p, seg, off, size)?;
            if let Some(new) = f(old) {
                self.write_mem(p, seg, off, size, new)?;
            }
            return Ok(old);
        }
        let lin = self.seg_lin(seg, off, size)?;
        let user = self.user();
        if let Some(ptr) = self.atomic_ptr(lin, size as usize, user)? {
            return Ok(atomic_update(ptr, size, &f));
        }
        // Misaligned but inside one RAM page: the host's own LOCK CMPXCHG, which is atomic
        // across cache lines too, and is what compiled code runs for the same instruction.
        #[cfg(target_arch = "x86_64")]
        if let Some(ptr) = self.ram_ptr_in_page(lin, size as usize, user)? {
            return Ok(split_update(ptr, size, &f));
        }
        // Across two pages (which need not be adjacent on the host): serialised with the
        // other page-crossing locked operations, not with aligned ones on the same bytes.
        let _guard = SPLIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.read_mem(p, seg, off, size)?;
        if let Some(new) = f(old) {
            self.write_mem(p, seg, off, size, new)?;
        }
        Ok(old)
    }

    /// Stack pointer width in bytes for the current mode.
    #[inline]
    pub(crate) fn stack_size(&self) -> u32 {
        if self.s.in_64bit_mode() {
            8
        } else if self.s.seg[Seg::Ss as usize].default_big() {
            4
        } else {
            2
        }
    }

    #[inline]
    pub(crate) fn rsp_masked(&self) -> u64 {
        self.s.gpr[4] & mask(self.stack_size())
    }

    #[inline]
    pub(crate) fn set_rsp_masked(&mut self, v: u64) {
        let m = mask(self.stack_size());
        self.s.gpr[4] = (self.s.gpr[4] & !m) | (v & m);
    }

    /// Pushes `size` bytes; RSP only changes once the write succeeded.
    #[inline]
    pub(crate) fn push(&mut self, p: &mut dyn Platform, v: u64, size: u32) -> Result<()> {
        let sp = self.rsp_masked().wrapping_sub(u64::from(size)) & mask(self.stack_size());
        self.write_mem(p, Seg::Ss, sp, size, v)?;
        self.set_rsp_masked(sp);
        Ok(())
    }

    /// Reads the value a pop would return, without moving RSP.
    #[inline]
    pub(crate) fn peek(&mut self, p: &mut dyn Platform, depth: u64, size: u32) -> Result<u64> {
        let sp = self.rsp_masked().wrapping_add(depth) & mask(self.stack_size());
        self.read_mem(p, Seg::Ss, sp, size)
    }

    #[inline]
    pub(crate) fn pop(&mut self, p: &mut dyn Platform, size: u32) -> Result<u64> {
        let v = self.peek(p, 0, size)?;
        let sp = self.rsp_masked().wrapping_add(u64::from(size));
        self.set_rsp_masked(sp);
        Ok(v)
    }

    /// Operand size of the current instruction's stack operations (push/pop/call/ret).
    #[inline]
    pub(crate) fn stack_op_size(&self, ins: &Instruction) -> u32 {
        let inc = ins.stack_pointer_increment().unsigned_abs();
        match inc {
            2 | 4 | 8 => inc,
            _ => {
                if self.s.in_64bit_mode() {
                    8
                } else if ins.code_size() == iced_x86::CodeSize::Code16 {
                    2
                } else {
                    4
                }
            }
        }
    }
}

/// `atomic_update` for a misaligned pointer: a LOCK CMPXCHG loop in inline assembly
/// (Rust's atomics require alignment; the x86 instruction does not).
#[cfg(target_arch = "x86_64")]
fn split_update(ptr: *mut u8, size: u32, f: &impl Fn(u64) -> Option<u64>) -> u64 {
    // SAFETY: `ptr..ptr+size` lies inside one RAM page (ram_ptr_in_page); guest RAM is
    // only accessed through raw pointers and atomic instructions.
    let mut old = unsafe {
        match size {
            1 => u64::from(ptr.read()),
            2 => u64::from((ptr as *const u16).read_unaligned()),
            4 => u64::from((ptr as *const u32).read_unaligned()),
            _ => (ptr as *const u64).read_unaligned(),
        }
    };
    loop {
        let Some(new) = f(old) else {
            std::sync::atomic::fence(Ordering::SeqCst);
            return old;
        };
        let mut cur = old;
        // SAFETY: as above; LOCK CMPXCHG compares RAX (its low `size` bytes) with memory
        // and stores `new` if equal, else loads memory into RAX; ZF says which.
        let ok: u8 = unsafe {
            let ok: u8;
            match size {
                1 => std::arch::asm!("lock cmpxchg byte ptr [{p}], {n}", "sete {ok}",
                    p = in(reg) ptr, n = in(reg_byte) new as u8, ok = out(reg_byte) ok,
                    inout("rax") cur),
                2 => std::arch::asm!("lock cmpxchg word ptr [{p}], {n:x}", "sete {ok}",
                    p = in(reg) ptr, n = in(reg) new, ok = out(reg_byte) ok,
                    inout("rax") cur),
                4 => std::arch::asm!("lock cmpxchg dword ptr [{p}], {n:e}", "sete {ok}",
                    p = in(reg) ptr, n = in(reg) new, ok = out(reg_byte) ok,
                    inout("rax") cur),
                _ => std::arch::asm!("lock cmpxchg qword ptr [{p}], {n}", "sete {ok}",
                    p = in(reg) ptr, n = in(reg) new, ok = out(reg_byte) ok,
                    inout("rax") cur),
            }
            ok
        };
        let m = mask(size);
        if ok != 0 {
            return old;
        }
        old = cur & m;
    }
}

fn atomic_update(ptr: *mut u8, size: u32, f: &impl Fn(u64) -> Option<u64>) -> u64 {
    macro_rules! cas_loop {
        ($atomic:ty, $t:ty) => {{
            // SAFETY: `ptr` points into a RAM page and is aligned to `size` (checked by
            // atomic_ptr); other vCPUs access guest RAM only through raw pointers/atomics.
            let a = unsafe { <$atomic>::from_ptr(ptr as *mut $t) };
            let mut old = a.load(Ordering::SeqCst);
            loop {
                let Some(new) = f(old as u64) else {
                    // A LOCKed instruction that writes nothing (a failed CMPXCHG) is
                    // still a full barrier on x86.
                    std::sync::atomic::fence(Ordering::SeqCst);
                    return old as u64;
                };
                match a.compare_exchange_weak(old, new as $t, Ordering::SeqCst, Ordering::SeqCst) {
                    Ok(_) => return old as u64,
                    Err(cur) => old = cur,
                }
            }
        }};
    }
    match size {
        1 => cas_loop!(AtomicU8, u8),
        2 => cas_loop!(AtomicU16, u16),
        4 => cas_loop!(AtomicU32, u32),
        _ => cas_loop!(AtomicU64, u64),
    }
}
