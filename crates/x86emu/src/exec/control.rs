//! Control transfer: JMP/Jcc/CALL/RET/LOOP/JrCXZ, far JMP/CALL/RET, IRET, INT/INT3/INTO/UD.

use iced_x86::{Instruction, Mnemonic, OpKind};

use super::operand::{canonical, ea, mask, mem_seg};
use crate::cpu::Core;
use crate::exceptions::{vector, Fault, Result};
use crate::platform::Platform;
use crate::state::flags::*;
use crate::state::Seg;

impl Core {
    /// Sets the branch target, checking it is canonical in 64-bit mode.
    #[inline]
    pub(crate) fn jump(&mut self, target: u64) -> Result<()> {
        if self.s.in_64bit_mode() {
            if !canonical(target) {
                return Err(Fault::gp0());
            }
        } else if self.s.protected() && target > u64::from(self.s.seg[Seg::Cs as usize].limit) {
            return Err(Fault::gp0());
        }
        self.next_rip = target;
        Ok(())
    }
}

/// Width of the near-branch operand (16/32/64-bit IP).
fn ip_size(cpu: &Core, ins: &Instruction) -> u32 {
    match ins.op0_kind() {
        OpKind::NearBranch16 => 2,
        OpKind::NearBranch32 => 4,
        OpKind::NearBranch64 => 8,
        _ => {
            if cpu.s.in_64bit_mode() {
                8
            } else {
                cpu.op_size(ins, 0)
            }
        }
    }
}

pub(crate) fn exec(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    match ins.mnemonic() {
        Mnemonic::Jmp => match ins.op0_kind() {
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                cpu.jump(ins.near_branch_target())
            }
            OpKind::FarBranch16 | OpKind::FarBranch32 => {
                let off = if ins.op0_kind() == OpKind::FarBranch16 {
                    u64::from(ins.far_branch16())
                } else {
                    u64::from(ins.far_branch32())
                };
                far_jump(cpu, p, ins.far_branch_selector(), off)
            }
            _ if ins.is_jmp_far_indirect() => {
                let (sel, off) = read_far_pointer(cpu, p, ins)?;
                far_jump(cpu, p, sel, off)
            }
            _ => {
                let t = cpu.read_op(p, ins, 0)?;
                cpu.jump(t)
            }
        },
        Mnemonic::Ja
        | Mnemonic::Jae
        | Mnemonic::Jb
        | Mnemonic::Jbe
        | Mnemonic::Je
        | Mnemonic::Jne
        | Mnemonic::Jg
        | Mnemonic::Jge
        | Mnemonic::Jl
        | Mnemonic::Jle
        | Mnemonic::Jo
        | Mnemonic::Jno
        | Mnemonic::Jp
        | Mnemonic::Jnp
        | Mnemonic::Js
        | Mnemonic::Jns => {
            if cpu.cond(ins.condition_code()) {
                cpu.jump(ins.near_branch_target())
            } else {
                Ok(())
            }
        }
        Mnemonic::Jcxz | Mnemonic::Jecxz | Mnemonic::Jrcxz => {
            let m = match ins.mnemonic() {
                Mnemonic::Jcxz => 0xffff,
                Mnemonic::Jecxz => 0xffff_ffff,
                _ => u64::MAX,
            };
            if cpu.s.gpr[1] & m == 0 {
                cpu.jump(ins.near_branch_target())
            } else {
                Ok(())
            }
        }
        Mnemonic::Loop | Mnemonic::Loope | Mnemonic::Loopne => {
            // The counter width is the address size, which iced encodes in the Code.
            let am = match ins.code() {
                iced_x86::Code::Loop_rel8_16_CX
                | iced_x86::Code::Loop_rel8_32_CX
                | iced_x86::Code::Loope_rel8_16_CX
                | iced_x86::Code::Loope_rel8_32_CX
                | iced_x86::Code::Loopne_rel8_16_CX
                | iced_x86::Code::Loopne_rel8_32_CX => 0xffff,
                iced_x86::Code::Loop_rel8_16_ECX
                | iced_x86::Code::Loop_rel8_32_ECX
                | iced_x86::Code::Loop_rel8_64_ECX
                | iced_x86::Code::Loope_rel8_16_ECX
                | iced_x86::Code::Loope_rel8_32_ECX
                | iced_x86::Code::Loope_rel8_64_ECX
                | iced_x86::Code::Loopne_rel8_16_ECX
                | iced_x86::Code::Loopne_rel8_32_ECX
                | iced_x86::Code::Loopne_rel8_64_ECX => 0xffff_ffff,
                _ => u64::MAX,
            };
            let c = (cpu.s.gpr[1] & am).wrapping_sub(1) & am;
            cpu.s.gpr[1] = if am == 0xffff {
                (cpu.s.gpr[1] & !am) | c
            } else {
                c
            };
            let zf = cpu.flag(ZF);
            let take = c != 0
                && match ins.mnemonic() {
                    Mnemonic::Loope => zf,
                    Mnemonic::Loopne => !zf,
                    _ => true,
                };
            if take {
                cpu.jump(ins.near_branch_target())
            } else {
                Ok(())
            }
        }
        Mnemonic::Call => {
            if ins.is_call_far() || ins.is_call_far_indirect() {
                let (sel, off) = if ins.is_call_far() {
                    let off = if ins.op0_kind() == OpKind::FarBranch16 {
                        u64::from(ins.far_branch16())
                    } else {
                        u64::from(ins.far_branch32())
                    };
                    (ins.far_branch_selector(), off)
                } else {
                    read_far_pointer(cpu, p, ins)?
                };
                return far_call(cpu, p, ins, sel, off);
            }
            let size = ip_size(cpu, ins);
            let target = match ins.op0_kind() {
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                    ins.near_branch_target()
                }
                _ => cpu.read_op(p, ins, 0)?,
            };
            let ret = cpu.next_rip;
            let saved = cpu.s.gpr[4];
            cpu.push(p, ret & mask(size), size)?;
            if let Err(e) = cpu.jump(target) {
                cpu.s.gpr[4] = saved;
                return Err(e);
            }
            Ok(())
        }
        Mnemonic::Ret => {
            // The return address's size comes from the encoding: iced's stack-pointer
            // increment also counts RET imm16's released bytes (a 32-bit `ret 4` moves
            // ESP by 8 but pops a 4-byte address).
            let size = match ins.code() {
                iced_x86::Code::Retnw | iced_x86::Code::Retnw_imm16 => 2,
                iced_x86::Code::Retnq | iced_x86::Code::Retnq_imm16 => 8,
                _ => 4,
            };
            let target = cpu.peek(p, 0, size)?;
            cpu.jump(target)?;
            let release = if ins.op_count() > 0 {
                u64::from(ins.immediate16())
            } else {
                0
            };
            let sp = cpu
                .rsp_masked()
                .wrapping_add(u64::from(size))
                .wrapping_add(release);
            cpu.set_rsp_masked(sp);
            Ok(())
        }
        Mnemonic::Retf => far_ret(cpu, p, ins),
        Mnemonic::Iret | Mnemonic::Iretd | Mnemonic::Iretq => iret(cpu, p, ins),
        Mnemonic::Int => Err(Fault {
            vector: ins.immediate8(),
            error: None,
            soft: true,
        }),
        Mnemonic::Int3 => Err(Fault {
            vector: vector::BP,
            error: None,
            soft: true,
        }),
        Mnemonic::Into => {
            if cpu.flag(OF) {
                Err(Fault {
                    vector: vector::OF,
                    error: None,
                    soft: true,
                })
            } else {
                Ok(())
            }
        }
        Mnemonic::Int1 => Err(Fault {
            vector: vector::DB,
            error: None,
            soft: true,
        }),
        _ => Err(Fault::ud()),
    }
}

/// Reads an m16:16/m16:32/m16:64 far pointer operand: (selector, offset).
fn read_far_pointer(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<(u16, u64)> {
    let total = ins.memory_size().size() as u32;
    let off_size = total.saturating_sub(2).clamp(2, 8);
    let a = ea(cpu, ins);
    let seg = mem_seg(ins);
    let off = cpu.read_mem(p, seg, a, off_size)?;
    let sel = cpu.read_mem(p, seg, a.wrapping_add(u64::from(off_size)), 2)? as u16;
    Ok((sel, off))
}

fn far_jump(cpu: &mut Core, p: &mut dyn Platform, sel: u16, off: u64) -> Result<()> {
    let cpl = cpu.s.cpl();
    let saved = cpu.s.seg[Seg::Cs as usize];
    cpu.load_cs(p, sel, cpl)?;
    if let Err(e) = cpu.jump(off) {
        cpu.s.seg[Seg::Cs as usize] = saved;
        return Err(e);
    }
    Ok(())
}

fn far_call(
    cpu: &mut Core,
    p: &mut dyn Platform,
    ins: &Instruction,
    sel: u16,
    off: u64,
) -> Result<()> {
    let size = cpu.stack_op_size(ins);
    let cs = u64::from(cpu.s.seg[Seg::Cs as usize].selector);
    let ret = cpu.next_rip;
    let saved_rsp = cpu.s.gpr[4];
    let saved_cs = cpu.s.seg[Seg::Cs as usize];
    let r = (|| {
        cpu.push(p, cs, size)?;
        cpu.push(p, ret, size)?;
        let cpl = cpu.s.cpl();
        cpu.load_cs(p, sel, cpl)?;
        cpu.jump(off)
    })();
    if r.is_err() {
        cpu.s.gpr[4] = saved_rsp;
        cpu.s.seg[Seg::Cs as usize] = saved_cs;
    }
    r
}

fn far_ret(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let size = match ins.code() {
        iced_x86::Code::Retfw | iced_x86::Code::Retfw_imm16 => 2,
        iced_x86::Code::Retfq | iced_x86::Code::Retfq_imm16 => 8,
        _ => 4,
    };
    let off = cpu.peek(p, 0, size)?;
    let sel = cpu.peek(p, u64::from(size), size)? as u16;
    let release = if ins.op_count() > 0 {
        u64::from(ins.immediate16())
    } else {
        0
    };
    let cpl = cpu.s.cpl();
    let rpl = (sel & 3) as u8;
    if cpu.s.protected() && rpl != cpl {
        // Returning to an outer privilege level also pops SS:RSP.
        if rpl < cpl {
            return Err(Fault::gp(u32::from(sel & !3)));
        }
        let base = u64::from(size) * 2 + release;
        let new_sp = cpu.peek(p, base, size)?;
        let new_ss = cpu.peek(p, base + u64::from(size), size)? as u16;
        cpu.load_cs(p, sel, rpl)?;
        cpu.load_seg(p, Seg::Ss, new_ss)?;
        cpu.s.gpr[4] = new_sp;
        cpu.next_rip = off;
        return Ok(());
    }
    let saved = cpu.s.seg[Seg::Cs as usize];
    cpu.load_cs(p, sel, if cpu.s.protected() { rpl } else { 0 })?;
    if let Err(e) = cpu.jump(off) {
        cpu.s.seg[Seg::Cs as usize] = saved;
        return Err(e);
    }
    let sp = cpu
        .rsp_masked()
        .wrapping_add(u64::from(size) * 2)
        .wrapping_add(release);
    cpu.set_rsp_masked(sp);
    Ok(())
}

fn iret(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let size = match ins.mnemonic() {
        Mnemonic::Iretq => 8,
        Mnemonic::Iretd => 4,
        _ => 2,
    };
    let sz = u64::from(size);
    let new_ip = cpu.peek(p, 0, size)?;
    let sel = cpu.peek(p, sz, size)? as u16;
    let fl = cpu.peek(p, 2 * sz, size)?;
    if !cpu.s.protected() {
        cpu.load_cs(p, sel, 0)?;
        cpu.next_rip = new_ip & 0xffff_ffff;
        let sp = cpu.rsp_masked().wrapping_add(3 * sz);
        cpu.set_rsp_masked(sp);
        cpu.write_flags_checked(fl, size);
        cpu.nmi_blocked = false;
        return Ok(());
    }
    if cpu.s.rflags & NT != 0 {
        // Task switches are not supported.
        return Err(Fault::gp0());
    }
    let cpl = cpu.s.cpl();
    let rpl = (sel & 3) as u8;
    if rpl < cpl {
        return Err(Fault::gp(u32::from(sel & !3)));
    }
    let long = cpu.s.long_mode_active() && cpu.s.in_64bit_mode();
    let pops_stack = long || rpl != cpl;
    let (new_sp, new_ss) = if pops_stack {
        (
            cpu.peek(p, 3 * sz, size)?,
            cpu.peek(p, 4 * sz, size)? as u16,
        )
    } else {
        (0, 0)
    };
    let saved = (cpu.s.seg, cpu.s.gpr[4], cpu.s.rflags);
    let r = (|| {
        cpu.load_cs(p, sel, rpl)?;
        if pops_stack {
            cpu.load_seg(p, Seg::Ss, new_ss)?;
            cpu.s.gpr[4] = if size == 8 {
                new_sp
            } else {
                new_sp & mask(size)
            };
        } else {
            let sp = cpu.rsp_masked().wrapping_add(3 * sz);
            cpu.set_rsp_masked(sp);
        }
        // Flags are written with the privilege of the code executing IRET.
        let cur_cs = cpu.s.seg[Seg::Cs as usize];
        let mut tmp = saved.0[Seg::Cs as usize];
        tmp.attr = (tmp.attr & !0x60) | (u16::from(cpl) << 5);
        cpu.s.seg[Seg::Cs as usize] = tmp;
        cpu.write_flags_checked(fl, size);
        cpu.s.seg[Seg::Cs as usize] = cur_cs;
        cpu.jump(new_ip)
    })();
    if let Err(e) = r {
        cpu.s.seg = saved.0;
        cpu.s.gpr[4] = saved.1;
        cpu.s.rflags = saved.2;
        return Err(e);
    }
    if rpl > cpl {
        // Data segments the new privilege may not use become null.
        for s in [Seg::Es, Seg::Ds, Seg::Fs, Seg::Gs] {
            let d = cpu.s.seg[s as usize];
            let conforming_code = d.attr & 0x1c == 0x1c;
            if d.dpl() < rpl && !conforming_code && d.attr & 0x10 != 0 {
                cpu.s.seg[s as usize].selector = 0;
                cpu.s.seg[s as usize].attr = 0;
            }
        }
    }
    cpu.nmi_blocked = false;
    Ok(())
}
