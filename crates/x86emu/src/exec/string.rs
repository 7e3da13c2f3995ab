//! String instructions with REP/REPE/REPNE: MOVS, STOS, LODS, CMPS, SCAS, INS, OUTS.

use iced_x86::{Code, Instruction, Mnemonic, OpKind};

use super::flags::sub_flags;
use super::operand::{mask, mem_seg};
use crate::cpu::Core;
use crate::exceptions::{Fault, Result};
use crate::platform::Platform;
use crate::state::flags::DF;
use crate::state::Seg;

/// Iterations done per step before yielding, so interrupts and the instruction limit are
/// honoured during long REP loops; RIP stays on the instruction until RCX reaches zero.
const ITER_PER_STEP: u32 = 4096;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Movs,
    Stos,
    Lods,
    Cmps,
    Scas,
    Ins,
    Outs,
}

fn addr_size(ins: &Instruction) -> u32 {
    for i in 0..ins.op_count() {
        match ins.op_kind(i) {
            OpKind::MemorySegSI | OpKind::MemorySegDI | OpKind::MemoryESDI => return 2,
            OpKind::MemorySegESI | OpKind::MemorySegEDI | OpKind::MemoryESEDI => return 4,
            OpKind::MemorySegRSI | OpKind::MemorySegRDI | OpKind::MemoryESRDI => return 8,
            _ => {}
        }
    }
    8
}

/// True for the string forms of the mnemonics SSE shares (MOVSD, CMPSD).
pub(crate) fn is_string_form(ins: &Instruction) -> bool {
    !matches!(
        ins.code(),
        Code::Movsd_xmm_xmmm64 | Code::Movsd_xmmm64_xmm | Code::Cmpsd_xmm_xmmm64_imm8
    )
}

pub(crate) fn exec(cpu: &mut Core, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let kind = match ins.mnemonic() {
        Mnemonic::Movsb | Mnemonic::Movsw | Mnemonic::Movsd | Mnemonic::Movsq => Kind::Movs,
        Mnemonic::Stosb | Mnemonic::Stosw | Mnemonic::Stosd | Mnemonic::Stosq => Kind::Stos,
        Mnemonic::Lodsb | Mnemonic::Lodsw | Mnemonic::Lodsd | Mnemonic::Lodsq => Kind::Lods,
        Mnemonic::Cmpsb | Mnemonic::Cmpsw | Mnemonic::Cmpsd | Mnemonic::Cmpsq => Kind::Cmps,
        Mnemonic::Scasb | Mnemonic::Scasw | Mnemonic::Scasd | Mnemonic::Scasq => Kind::Scas,
        Mnemonic::Insb | Mnemonic::Insw | Mnemonic::Insd => Kind::Ins,
        Mnemonic::Outsb | Mnemonic::Outsw | Mnemonic::Outsd => Kind::Outs,
        _ => return Err(Fault::ud()),
    };
    if matches!(kind, Kind::Ins | Kind::Outs) {
        cpu.check_io_privilege()?;
    }
    let size = ins.memory_size().size() as u32;
    let asz = addr_size(ins);
    let am = mask(asz);
    let src_seg = mem_seg(ins);
    let rep = ins.has_rep_prefix() || ins.has_repne_prefix();
    let step = if cpu.s.rflags & DF != 0 {
        0u64.wrapping_sub(u64::from(size))
    } else {
        u64::from(size)
    };
    if rep && matches!(kind, Kind::Movs | Kind::Stos) && asz >= 4 {
        match bulk(cpu, kind, size, src_seg, am, step != u64::from(size))? {
            Bulk::Done => return Ok(()),
            Bulk::Yield => {
                cpu.next_rip = cpu.s.rip;
                return Ok(());
            }
            Bulk::OneByOne => {}
        }
    }
    let mut iters = 0;
    loop {
        if rep && cpu.s.gpr[1] & am == 0 {
            return Ok(());
        }
        let si = cpu.s.gpr[6] & am;
        let di = cpu.s.gpr[7] & am;
        let mut stop = false;
        match kind {
            Kind::Movs => {
                let v = cpu.read_mem(p, src_seg, si, size)?;
                cpu.write_mem(p, Seg::Es, di, size, v)?;
                adv(cpu, 6, step, am);
                adv(cpu, 7, step, am);
            }
            Kind::Stos => {
                let v = cpu.s.gpr[0] & mask(size);
                cpu.write_mem(p, Seg::Es, di, size, v)?;
                adv(cpu, 7, step, am);
            }
            Kind::Lods => {
                let v = cpu.read_mem(p, src_seg, si, size)?;
                write_acc(cpu, size, v);
                adv(cpu, 6, step, am);
            }
            Kind::Cmps | Kind::Scas => {
                let (a, b) = if kind == Kind::Cmps {
                    (
                        cpu.read_mem(p, src_seg, si, size)?,
                        cpu.read_mem(p, Seg::Es, di, size)?,
                    )
                } else {
                    (
                        cpu.s.gpr[0] & mask(size),
                        cpu.read_mem(p, Seg::Es, di, size)?,
                    )
                };
                let f = sub_flags(a, b, 0, a.wrapping_sub(b), size);
                cpu.set_status(f);
                if kind == Kind::Cmps {
                    adv(cpu, 6, step, am);
                }
                adv(cpu, 7, step, am);
                let zf = f & crate::state::flags::ZF != 0;
                stop = (ins.has_repe_prefix() && !zf) || (ins.has_repne_prefix() && zf);
            }
            Kind::Ins => {
                // Probe the destination before the port read so a fault has no side effect.
                let lin = cpu.seg_lin(Seg::Es, di, size)?;
                let user = cpu.user();
                cpu.translate(lin, crate::mmu::Access::Write, user)?;
                let port = cpu.s.gpr[2] as u16;
                let mut buf = [0u8; 4];
                cpu.io_done = true;
                p.pio_read(port, &mut buf[..size.min(4) as usize]);
                cpu.write_mem(p, Seg::Es, di, size, u64::from(u32::from_le_bytes(buf)))?;
                adv(cpu, 7, step, am);
            }
            Kind::Outs => {
                let v = cpu.read_mem(p, src_seg, si, size)?;
                let port = cpu.s.gpr[2] as u16;
                cpu.io_done = true;
                p.pio_write(port, &(v as u32).to_le_bytes()[..size.min(4) as usize]);
                adv(cpu, 6, step, am);
            }
        }
        if !rep {
            return Ok(());
        }
        let c = (cpu.s.gpr[1] & am).wrapping_sub(1) & am;
        set_masked(cpu, 1, c, am);
        if stop || c == 0 {
            return Ok(());
        }
        iters += 1;
        if iters >= ITER_PER_STEP || cpu.io_done {
            // Re-execute this instruction on the next step.
            cpu.next_rip = cpu.s.rip;
            return Ok(());
        }
    }
}

/// Bytes a bulk REP MOVS/STOS moves before yielding, so interrupts and the instruction
/// limit are honoured during long copies.
const BULK_PER_STEP: u64 = 64 * 1024;

enum Bulk {
    /// RCX reached zero.
    Done,
    /// Enough for one step; the instruction runs again.
    Yield,
    /// The rest needs the element-by-element loop (MMIO, an element straddling pages, an
    /// overlap that forward element order makes differ from a block move).
    OneByOne,
}

/// REP MOVS/STOS with 32- or 64-bit addresses (`am` their mask), in either direction
/// (`backward`: DF=1, as Linux's decompressor copies itself up), a page at a time
/// through host pointers. Registers advance only past what was copied, so a fault leaves
/// the instruction restartable exactly where a one-element-at-a-time loop would.
fn bulk(
    cpu: &mut Core,
    kind: Kind,
    size: u32,
    src_seg: Seg,
    am: u64,
    backward: bool,
) -> Result<Bulk> {
    use crate::mmu::Access;
    let esize = u64::from(size);
    let user = cpu.user();
    let mut moved = 0u64;
    loop {
        let count = cpu.s.gpr[1] & am;
        if count == 0 {
            return Ok(Bulk::Done);
        }
        if moved >= BULK_PER_STEP {
            return Ok(Bulk::Yield);
        }
        let (si, di) = (cpu.s.gpr[6] & am, cpu.s.gpr[7] & am);
        // Elements from the current one to its page's end (forward) or start (backward),
        // and, with 32-bit addresses, before an offset would wrap.
        let room = |lin: u64, off: u64| {
            let (page, wrap) = if backward {
                // 0 when the element itself straddles the page end.
                let end = (lin & 0xfff) + esize;
                (if end > 4096 { 0 } else { end }, off.saturating_add(esize))
            } else {
                (4096 - (lin & 0xfff), (am - off).saturating_add(1))
            };
            page.min(wrap) / esize
        };
        let dst = cpu.seg_lin(Seg::Es, di, size)?;
        let mut elems = room(dst, di);
        let src = if kind == Kind::Movs {
            let src = cpu.seg_lin(src_seg, si, size)?;
            elems = elems.min(room(src, si));
            Some(src)
        } else {
            None
        };
        elems = elems.min(count).min(BULK_PER_STEP / esize);
        if elems == 0 {
            return Ok(Bulk::OneByOne);
        }
        let bytes = elems * esize;
        // The last element's offset (the range's lowest byte going down): a segment
        // limit below 4 GiB may end the range early (seg_lin checked only the first).
        let last = |off: u64| {
            if backward {
                off.wrapping_add(esize).wrapping_sub(bytes)
            } else {
                off.wrapping_add(bytes).wrapping_sub(esize)
            }
        };
        if am != u64::MAX {
            let src_ok = kind != Kind::Movs || cpu.seg_lin(src_seg, last(si), size).is_ok();
            if !src_ok || cpu.seg_lin(Seg::Es, last(di), size).is_err() {
                return Ok(Bulk::OneByOne);
            }
        }
        let page_off = |lin: u64| {
            if backward {
                (lin & 0xfff) + esize - bytes
            } else {
                lin & 0xfff
            }
        };
        let from = match src {
            Some(src) => {
                let t = cpu.translate(src, Access::Read, user)?;
                if t.host.is_null() {
                    return Ok(Bulk::OneByOne);
                }
                // SAFETY: a RAM page from the TLB; the range lies in it (room).
                Some(unsafe { t.host.add(page_off(src) as usize) })
            }
            None => None,
        };
        let t = cpu.translate(dst, Access::Write, user)?;
        if t.host.is_null() {
            return Ok(Bulk::OneByOne);
        }
        // SAFETY: as above for the destination.
        let to = unsafe { t.host.add(page_off(dst) as usize) };
        let n = bytes as usize;
        match from {
            Some(from) => {
                let (f, d) = (from as usize, to as usize);
                // The element order replicates a pattern where the destination overlaps
                // the source's later part (forward: above it; backward: below it);
                // memmove would not.
                let replicates = if backward {
                    d < f && d + n > f
                } else {
                    d > f && d < f + n
                };
                if replicates {
                    return Ok(Bulk::OneByOne);
                }
                // SAFETY: both ranges lie in guest RAM pages (above); `copy` allows the
                // overlap left, which copies as the element order does.
                unsafe { std::ptr::copy(from, to, n) };
            }
            None => {
                let v = cpu.s.gpr[0].to_le_bytes();
                let pat = &v[..size as usize];
                // SAFETY: the destination range lies in a guest RAM page (above).
                let out = unsafe { std::slice::from_raw_parts_mut(to, n) };
                if size == 1 {
                    out.fill(v[0]);
                } else {
                    for chunk in out.chunks_exact_mut(size as usize) {
                        chunk.copy_from_slice(pat);
                    }
                }
            }
        }
        let delta = if backward {
            bytes.wrapping_neg()
        } else {
            bytes
        };
        if kind == Kind::Movs {
            set_masked(cpu, 6, si.wrapping_add(delta) & am, am);
        }
        set_masked(cpu, 7, di.wrapping_add(delta) & am, am);
        set_masked(cpu, 1, count - elems, am);
        moved += bytes;
    }
}

fn adv(cpu: &mut Core, r: usize, step: u64, am: u64) {
    let v = (cpu.s.gpr[r] & am).wrapping_add(step) & am;
    set_masked(cpu, r, v, am);
}

/// 32-bit address-size updates zero-extend like any 32-bit register write; 16-bit ones merge.
fn set_masked(cpu: &mut Core, r: usize, v: u64, am: u64) {
    cpu.s.gpr[r] = if am == 0xffff_ffff {
        v
    } else {
        (cpu.s.gpr[r] & !am) | v
    };
}

fn write_acc(cpu: &mut Core, size: u32, v: u64) {
    use iced_x86::Register as R;
    let r = match size {
        1 => R::AL,
        2 => R::AX,
        4 => R::EAX,
        _ => R::RAX,
    };
    super::operand::reg_write(cpu, r, v);
}
