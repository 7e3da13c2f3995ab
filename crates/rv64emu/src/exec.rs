//! Executing one decoded instruction: integer, M, A, Zicsr, Zifencei and the
//! privileged instructions. F/D live in `fpu`.

use crate::bus::Bus;
use crate::cpu::{Cpu, Flow, Priv};
use crate::csr::status;
use crate::decode::{Insn, Op};
use crate::mmu::Access;
use crate::trap::Exception;
use std::sync::atomic::Ordering;

/// The value of a fallible step, or the exception raised and `Flow::Trap` returned.
macro_rules! tri {
    ($cpu:expr, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return $cpu.raise(e),
        }
    };
}

impl Cpu {
    /// Writes `rd`; a write to x0 lands and is undone at once (cheaper than a branch).
    #[inline]
    fn set(&mut self, rd: u8, v: u64) {
        self.x[rd as usize & 31] = v;
        self.x[0] = 0;
    }

    /// The PC of `i`: while a block runs, `self.pc` is its first instruction's.
    #[inline]
    pub(crate) fn pc_of(&self, i: &Insn) -> u64 {
        self.pc.wrapping_add(i.off as u64)
    }

    #[inline]
    fn r(&self, r: u8) -> u64 {
        self.x[r as usize & 31]
    }

    fn illegal(&self, i: &Insn) -> Exception {
        Exception::IllegalInstruction(i.raw as u64)
    }

    /// A not-taken branch falls through inside its block (blocks run on past them), a
    /// taken one ends the block.
    fn branch(&mut self, i: &Insn, taken: bool) -> Flow {
        if taken {
            self.pc = self.pc_of(i).wrapping_add(i.imm as u64);
            Flow::Jump
        } else {
            Flow::Next
        }
    }

    /// An exception: kept in the hart until the run loop takes it.
    #[cold]
    fn raise(&mut self, e: Exception) -> Flow {
        self.pending_exception = e;
        Flow::Trap
    }

    /// Runs one instruction of the hot set (integer, M, loads, stores, branches) and
    /// hands the rest to `exec_cold`.
    #[inline(always)]
    pub(crate) fn exec(&mut self, i: &Insn, bus: &mut dyn Bus) -> Flow {
        let a = self.r(i.rs1);
        let b = self.r(i.rs2);
        let imm = i.imm as u64;
        use Op::*;
        let v = match i.op {
            Lui => imm,
            Auipc => self.pc_of(i).wrapping_add(imm),
            Jal => {
                let pc = self.pc_of(i);
                let ret = pc.wrapping_add(i.len as u64);
                self.pc = pc.wrapping_add(imm);
                self.set(i.rd, ret);
                return Flow::Jump;
            }
            Jalr => {
                let ret = self.pc_of(i).wrapping_add(i.len as u64);
                self.pc = a.wrapping_add(imm) & !1;
                self.set(i.rd, ret);
                return Flow::Jump;
            }
            Beq => return self.branch(i, a == b),
            Bne => return self.branch(i, a != b),
            Blt => return self.branch(i, (a as i64) < (b as i64)),
            Bge => return self.branch(i, (a as i64) >= (b as i64)),
            Bltu => return self.branch(i, a < b),
            Bgeu => return self.branch(i, a >= b),
            Lb => tri!(self, self.load(bus, a.wrapping_add(imm), 1)) as i8 as u64,
            Lh => tri!(self, self.load(bus, a.wrapping_add(imm), 2)) as i16 as u64,
            Lw => tri!(self, self.load(bus, a.wrapping_add(imm), 4)) as i32 as u64,
            Ld => tri!(self, self.load(bus, a.wrapping_add(imm), 8)),
            Lbu => tri!(self, self.load(bus, a.wrapping_add(imm), 1)),
            Lhu => tri!(self, self.load(bus, a.wrapping_add(imm), 2)),
            Lwu => tri!(self, self.load(bus, a.wrapping_add(imm), 4)),
            Sb | Sh | Sw | Sd => {
                let size = match i.op {
                    Sb => 1,
                    Sh => 2,
                    Sw => 4,
                    _ => 8,
                };
                tri!(self, self.store(bus, a.wrapping_add(imm), size, b));
                return Flow::Next;
            }
            Addi => a.wrapping_add(imm),
            Slti => ((a as i64) < (imm as i64)) as u64,
            Sltiu => (a < imm) as u64,
            Xori => a ^ imm,
            Ori => a | imm,
            Andi => a & imm,
            Slli => a << (imm & 63),
            Srli => a >> (imm & 63),
            Srai => ((a as i64) >> (imm & 63)) as u64,
            Add => a.wrapping_add(b),
            Sub => a.wrapping_sub(b),
            Sll => a << (b & 63),
            Slt => ((a as i64) < (b as i64)) as u64,
            Sltu => (a < b) as u64,
            Xor => a ^ b,
            Srl => a >> (b & 63),
            Sra => ((a as i64) >> (b & 63)) as u64,
            Or => a | b,
            And => a & b,
            Addiw => a.wrapping_add(imm) as i32 as u64,
            Slliw => ((a as u32) << (imm & 31)) as i32 as u64,
            Srliw => ((a as u32) >> (imm & 31)) as i32 as u64,
            Sraiw => ((a as i32) >> (imm & 31)) as u64,
            Addw => a.wrapping_add(b) as i32 as u64,
            Subw => a.wrapping_sub(b) as i32 as u64,
            Sllw => ((a as u32) << (b & 31)) as i32 as u64,
            Srlw => ((a as u32) >> (b & 31)) as i32 as u64,
            Sraw => ((a as i32) >> (b & 31)) as u64,
            Mul => a.wrapping_mul(b),
            Mulh => (((a as i64 as i128) * (b as i64 as i128)) >> 64) as u64,
            Mulhsu => (((a as i64 as i128).wrapping_mul(b as u128 as i128)) >> 64) as u64,
            Mulhu => (((a as u128) * (b as u128)) >> 64) as u64,
            Div => {
                let (x, y) = (a as i64, b as i64);
                if y == 0 {
                    u64::MAX
                } else {
                    x.wrapping_div(y) as u64
                }
            }
            Divu => a.checked_div(b).unwrap_or(u64::MAX),
            Rem => {
                let (x, y) = (a as i64, b as i64);
                if y == 0 {
                    a
                } else {
                    x.wrapping_rem(y) as u64
                }
            }
            Remu => {
                if b == 0 {
                    a
                } else {
                    a % b
                }
            }
            Mulw => (a as i32).wrapping_mul(b as i32) as u64,
            Divw => {
                let (x, y) = (a as i32, b as i32);
                if y == 0 {
                    u64::MAX
                } else {
                    x.wrapping_div(y) as u64
                }
            }
            Divuw => match (a as u32).checked_div(b as u32) {
                Some(q) => q as i32 as u64,
                None => u64::MAX,
            },
            Remw => {
                let (x, y) = (a as i32, b as i32);
                if y == 0 {
                    x as u64
                } else {
                    x.wrapping_rem(y) as u64
                }
            }
            Remuw => {
                let (x, y) = (a as u32, b as u32);
                if y == 0 {
                    x as i32 as u64
                } else {
                    (x % y) as i32 as u64
                }
            }
            _ => return self.exec_cold(i, bus),
        };
        self.set(i.rd, v);
        Flow::Next
    }

    /// The instructions off the hot path (atomics, system, CSR, F/D), whose result
    /// still travels as a `Result`: keeping it out of `exec` keeps that one's result a
    /// byte in a register instead of a `Result` spilled to the stack per instruction.
    #[inline(never)]
    fn exec_cold(&mut self, i: &Insn, bus: &mut dyn Bus) -> Flow {
        match self.exec_system(i, bus) {
            Ok(f) => f,
            Err(e) => self.raise(e),
        }
    }

    fn exec_system(&mut self, i: &Insn, bus: &mut dyn Bus) -> Result<Flow, Exception> {
        let a = self.r(i.rs1);
        let b = self.r(i.rs2);
        use Op::*;
        let v = match i.op {
            Illegal => return Err(self.illegal(i)),
            Lr => {
                let size = i.funct;
                if a & (size as u64 - 1) != 0 {
                    return Err(Exception::LoadMisaligned(a));
                }
                let hit = self.translate(a, Access::Load)?;
                if hit.host.is_null() {
                    return Err(Exception::LoadAccessFault(a));
                }
                let v = self.load(bus, a, size)?;
                self.reservation = Some((hit.pa, v));
                if size == 4 {
                    v as i32 as u64
                } else {
                    v
                }
            }
            Sc => {
                let size = i.funct;
                if a & (size as u64 - 1) != 0 {
                    return Err(Exception::StoreMisaligned(a));
                }
                let hit = self.translate(a, Access::Store)?;
                if hit.host.is_null() {
                    return Err(Exception::StoreAccessFault(a));
                }
                let ok = match self.reservation.take() {
                    Some((pa, seen)) if pa == hit.pa => {
                        self.store_if_unchanged(hit.pa, size, seen, b)
                    }
                    _ => false,
                };
                (!ok) as u64
            }
            Amo => self.amo(i, a, b)?,
            Fence => return Ok(Flow::Next),
            FenceI => {
                self.flush_code();
                self.pc = self.pc_of(i).wrapping_add(i.len as u64);
                return Ok(Flow::Jump);
            }
            Ecall => {
                return Err(match self.prv {
                    Priv::User => Exception::EcallFromU,
                    Priv::Supervisor => Exception::EcallFromS,
                    Priv::Machine => Exception::EcallFromM,
                })
            }
            Ebreak => return Err(Exception::Breakpoint(self.pc_of(i))),
            Mret => {
                if self.prv != Priv::Machine {
                    return Err(self.illegal(i));
                }
                let st = self.csr.mstatus;
                let mpp = (st & status::MPP) >> status::MPP_SHIFT;
                let mut s = st & !(status::MIE | status::MPP);
                if st & status::MPIE != 0 {
                    s |= status::MIE;
                }
                s |= status::MPIE;
                if mpp != 3 {
                    s &= !status::MPRV;
                }
                self.csr.mstatus = s;
                self.prv = match mpp {
                    0 => Priv::User,
                    1 => Priv::Supervisor,
                    _ => Priv::Machine,
                };
                self.pc = self.csr.mepc;
                self.update_regime();
                self.irq_check_at = 0;
                return Ok(Flow::Jump);
            }
            Sret => {
                if self.prv == Priv::User
                    || (self.prv == Priv::Supervisor && self.csr.mstatus & status::TSR != 0)
                {
                    return Err(self.illegal(i));
                }
                let st = self.csr.mstatus;
                let spp = st & status::SPP != 0;
                let mut s = st & !(status::SIE | status::SPP | status::MPRV);
                if st & status::SPIE != 0 {
                    s |= status::SIE;
                }
                s |= status::SPIE;
                self.csr.mstatus = s;
                self.prv = if spp { Priv::Supervisor } else { Priv::User };
                self.pc = self.csr.sepc;
                self.update_regime();
                self.irq_check_at = 0;
                return Ok(Flow::Jump);
            }
            Wfi => {
                if self.prv == Priv::User
                    || (self.prv == Priv::Supervisor && self.csr.mstatus & status::TW != 0)
                {
                    return Err(self.illegal(i));
                }
                return Ok(Flow::Wfi);
            }
            SfenceVma => {
                if self.prv == Priv::User
                    || (self.prv == Priv::Supervisor && self.csr.mstatus & status::TVM != 0)
                {
                    return Err(self.illegal(i));
                }
                self.flush_tlb();
                self.pc = self.pc_of(i).wrapping_add(i.len as u64);
                return Ok(Flow::Jump);
            }
            Csr => {
                // CSR reads see `instret` as of this instruction; the run loop adds the
                // block's count when the block is left.
                let idx = i.idx as u64;
                self.instret = self.instret.wrapping_add(idx);
                let r = self.exec_csr(i, bus);
                self.instret = self.instret.wrapping_sub(idx);
                return r;
            }
            FLoad | FStore | FOp | FFused => return self.exec_fp(i, bus),
            _ => return Err(self.illegal(i)),
        };
        self.set(i.rd, v);
        Ok(Flow::Next)
    }

    /// SC's store: `value` goes to RAM at `pa` only if it still holds `seen`.
    fn store_if_unchanged(&mut self, pa: u64, size: u8, seen: u64, value: u64) -> bool {
        if size == 4 {
            self.ram.atomic_u32(pa).is_some_and(|c| {
                c.compare_exchange(
                    seen as u32,
                    value as u32,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                )
                .is_ok()
            })
        } else {
            self.ram.atomic_u64(pa).is_some_and(|c| {
                c.compare_exchange(seen, value, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            })
        }
    }

    fn amo(&mut self, i: &Insn, addr: u64, src: u64) -> Result<u64, Exception> {
        let size = i.imm as u64;
        if addr & (size - 1) != 0 {
            return Err(Exception::StoreMisaligned(addr));
        }
        let hit = self.translate(addr, Access::Store)?;
        // Loads must be allowed too (a write-only page cannot exist, but MXR-free
        // checks keep the rule explicit).
        self.translate(addr, Access::Load)?;
        if hit.host.is_null() {
            return Err(Exception::StoreAccessFault(addr));
        }
        let f5 = i.funct;
        let op = move |old: u64| -> u64 {
            let (o, s) = if size == 4 {
                (old as i32 as i64 as u64, src as i32 as i64 as u64)
            } else {
                (old, src)
            };
            match f5 {
                0b00001 => s,
                0b00000 => o.wrapping_add(s),
                0b00100 => o ^ s,
                0b01100 => o & s,
                0b01000 => o | s,
                0b10000 => (o as i64).min(s as i64) as u64,
                0b10100 => (o as i64).max(s as i64) as u64,
                0b11000 => o.min(s),
                _ => o.max(s),
            }
        };
        let old = if size == 4 {
            let cell = self
                .ram
                .atomic_u32(hit.pa)
                .ok_or(Exception::StoreAccessFault(addr))?;
            let prev = cell
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |o| {
                    Some(op(o as u64) as u32)
                })
                .unwrap_or_else(|o| o);
            prev as i32 as u64
        } else {
            let cell = self
                .ram
                .atomic_u64(hit.pa)
                .ok_or(Exception::StoreAccessFault(addr))?;
            cell.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |o| Some(op(o)))
                .unwrap_or_else(|o| o)
        };
        Ok(old)
    }

    fn exec_csr(&mut self, i: &Insn, bus: &mut dyn Bus) -> Result<Flow, Exception> {
        let addr = i.imm as u16 & 0xfff;
        let src = if i.funct >= 5 {
            i.rs1 as u64
        } else {
            self.r(i.rs1)
        };
        let kind = i.funct & 3;
        // CSRRW with rd = x0 does not read; CSRRS/C with a zero source do not write.
        let writes = kind == 1 || i.rs1 != 0;
        let old = if kind == 1 && i.rd == 0 {
            0
        } else {
            self.csr_read(bus, addr).map_err(|_| self.illegal(i))?
        };
        if writes {
            // mip's SEIP reads as the software bit OR the PLIC's line, but a set or clear
            // builds on the software bit alone (privileged spec, mip): folding the line in
            // would latch it, and the hart would take that interrupt forever.
            let base = if addr == crate::csr::MIP {
                self.csr.mip | (old & !crate::csr::MIP_WRITABLE)
            } else {
                old
            };
            let new = match kind {
                1 => src,
                2 => base | src,
                _ => base & !src,
            };
            self.csr_write(addr, new).map_err(|_| self.illegal(i))?;
        }
        self.set(i.rd, old);
        self.pc = self.pc_of(i).wrapping_add(i.len as u64);
        // A CSR write may enable or raise an interrupt: look before the next block.
        self.irq_check_at = 0;
        Ok(Flow::Jump)
    }
}
