//! Compiled blocks: a hot block's instructions as host x86-64 code.
//!
//! The interpreter's cost is its dispatch (the `match` on each instruction's operation,
//! operand fetches, the loop): well over half of a boot. A compiled block does the
//! integer register work (ALU, LUI/AUIPC, M's multiplies, branches, JAL/JALR) in a few host
//! instructions each on the hart's register file in place (`Cpu::x`, reached through RBX),
//! and calls the interpreter's own `exec` for everything else (loads, stores, divisions,
//! atomics, system, CSR, F/D), so every rule that lives there (translation, faults, device
//! accesses, privilege) holds unchanged.
//!
//! While a block runs, `Cpu::pc` and `instret` stay at its first instruction, as in the
//! interpreter loop; a taken branch or jump writes the new PC and leaves. Every exit then
//! settles `pc` and `instret` itself and, where the run loop would only look the next
//! block up and run it, jumps straight into that block's code (see `emit_tails`), so a
//! hot loop runs without the run loop until the next interrupt check or the end of the
//! run. The code returns 0 when the loop just goes on from `pc`, or the `Flow` of a WFI
//! or a trap, which the loop handles as after interpreting.
//!
//! The encoder is a handful of fixed forms (below), each emitted once: no assembler pass.
//! Code lives in a `codemem::Arena` (W^X); the block cache drops every block's code with
//! its decoded instructions, whose addresses the code holds.

use crate::bus::Bus;
use crate::cpu::{Cpu, Flow};
use crate::decode::{Insn, Op};
use std::ffi::c_void;

/// A compiled block, called with the hart and a [`BusRef`].
pub(crate) type Code = unsafe extern "C" fn(*mut Cpu, *mut c_void) -> u32;

/// What compiled code hands back to `exec_one`: the run loop's bus, behind a thin pointer.
pub(crate) struct BusRef<'a>(pub &'a mut dyn Bus);

/// Runs after which a block is compiled.
pub const DEFAULT_THRESHOLD: u32 = 32;
/// Code memory per hart.
const ARENA_SIZE: usize = 32 << 20;
/// The most code one block may need (64 instructions of at most ~150 bytes, and the frame).
const MAX_BLOCK_CODE: usize = 64 * 160 + 64;

pub(crate) struct Jit {
    arena: codemem::Arena,
    buf: Vec<u8>,
    pub(crate) threshold: u32,
    pub(crate) compiled: u64,
    perf_map: Option<codemem::PerfMap>,
}

impl std::fmt::Debug for Jit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jit")
            .field("threshold", &self.threshold)
            .field("compiled", &self.compiled)
            .finish()
    }
}

/// The interpreter for one instruction of a compiled block.
///
/// # Safety
/// `cpu`, `bus` and `insn` are what the run loop passed the block: the hart, a live
/// `BusRef`, and an instruction of the block's (boxed, not freed while it runs).
unsafe extern "C" fn exec_one(cpu: *mut Cpu, bus: *mut c_void, insn: *const Insn) -> u32 {
    // SAFETY: the caller's contract; nothing else refers to them during the call.
    let (cpu, bus, insn) = unsafe { (&mut *cpu, &mut *bus.cast::<BusRef<'_>>(), &*insn) };
    cpu.exec(insn, bus.0) as u32
}

impl Jit {
    /// None when the host has no x86-64 to run the code, or no executable memory.
    pub(crate) fn new(threshold: u32) -> Option<Self> {
        if !cfg!(target_arch = "x86_64") {
            return None;
        }
        Some(Jit {
            arena: codemem::Arena::new(ARENA_SIZE)?,
            buf: Vec::with_capacity(MAX_BLOCK_CODE),
            threshold,
            compiled: 0,
            perf_map: codemem::PerfMap::open(),
        })
    }

    /// Code for `insns`, the block at guest-physical `pa`; None when the code memory is
    /// full (the caller drops every block's code and calls `reset`).
    pub(crate) fn compile(&mut self, insns: &[Insn], pa: u64) -> Option<Code> {
        if self.arena.room() < MAX_BLOCK_CODE + 16 {
            return None;
        }
        self.buf.clear();
        emit_block(&mut self.buf, insns);
        let at = self.arena.put(&self.buf)?;
        self.compiled += 1;
        if let Some(m) = &mut self.perf_map {
            m.name(at as u64, self.buf.len(), format_args!("rv64_{pa:x}"));
        }
        // SAFETY: `at` starts the function just emitted for this ABI, in executable memory
        // that stays mapped (and unchanged) until `reset`.
        Some(unsafe { std::mem::transmute::<*mut u8, Code>(at) })
    }

    /// Forgets all code; every `Code` handed out must be dropped first.
    pub(crate) fn reset(&mut self) {
        self.arena.reset();
    }
}

const RAX: u8 = 0;
const RCX: u8 = 1;
const RDX: u8 = 2;
const RBX: u8 = 3;

/// The block's shared tails, placed after its instructions (see `emit_block`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Label {
    /// RCX = instructions the block retired, with `pc` set: count them and chain.
    Retired,
    /// EAX = a flow other than `Next` from `exec_one`; ECX, EDX, R8D = the
    /// instruction's index, offset and length.
    Exec,
}

/// Host code being written, with the jumps to the block's tails still to patch.
struct Emit<'a> {
    b: &'a mut Vec<u8>,
    fixups: Vec<(usize, Label)>,
}

impl Emit<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.b.extend_from_slice(b);
    }

    fn u32(&mut self, v: u32) {
        self.b.extend_from_slice(&v.to_le_bytes());
    }

    /// `mov reg, [rbx + disp]` (64-bit).
    fn load(&mut self, reg: u8, disp: u32) {
        self.bytes(&[0x48, 0x8b, 0x80 | (reg << 3) | RBX]);
        self.u32(disp);
    }

    /// `mov [rbx + disp], reg` (64-bit).
    fn store(&mut self, reg: u8, disp: u32) {
        self.bytes(&[0x48, 0x89, 0x80 | (reg << 3) | RBX]);
        self.u32(disp);
    }

    /// `mov reg, imm64`.
    fn imm(&mut self, reg: u8, v: u64) {
        self.bytes(&[0x48, 0xb8 + reg]);
        self.b.extend_from_slice(&v.to_le_bytes());
    }

    /// `movsxd rax, eax`.
    fn sext32(&mut self) {
        self.bytes(&[0x48, 0x63, 0xc0]);
    }

    /// `mov ecx, idx + 1; jmp Retired`: `i` left the block with `pc` set.
    fn retired(&mut self, i: &Insn) {
        self.bytes(&[0xb9]);
        self.u32(u32::from(i.idx) + 1);
        self.jmp(Label::Retired);
    }

    /// `jmp label`, patched once the block's tails are placed.
    fn jmp(&mut self, label: Label) {
        self.bytes(&[0xe9]);
        self.fixups.push((self.b.len(), label));
        self.u32(0);
    }

    /// `rax = pc + delta` (the PC of the block's start plus an offset from it).
    fn pc_plus(&mut self, delta: u64) {
        self.load(RAX, pc_off());
        self.imm(RCX, delta);
        self.bytes(&[0x48, 0x01, 0xc8]); // add rax, rcx
    }

    /// `jcc rel32` to a label placed later; returns the field to patch.
    fn jcc_forward(&mut self, cc: u8) -> usize {
        self.bytes(&[0x0f, 0x80 | cc]);
        let at = self.b.len();
        self.u32(0);
        at
    }

    fn patch_here(&mut self, field: usize) {
        let rel = (self.b.len() - (field + 4)) as u32;
        self.b[field..field + 4].copy_from_slice(&rel.to_le_bytes());
    }
}

/// Condition codes (the low nibble of `jcc`).
const CC_B: u8 = 0x2;
const CC_AE: u8 = 0x3;
const CC_E: u8 = 0x4;
const CC_NE: u8 = 0x5;
const CC_L: u8 = 0xc;
const CC_GE: u8 = 0xd;

fn xoff(r: u8) -> u32 {
    (std::mem::offset_of!(Cpu, x) + 8 * (r as usize & 31)) as u32
}

fn pc_off() -> u32 {
    std::mem::offset_of!(Cpu, pc) as u32
}

/// The prologue: push rbx; push r12; push r13 (keeps RSP 16-aligned at calls);
/// mov rbx, rdi; mov r12, rsi. A chained block is entered after it.
const PROLOGUE: [u8; 11] = [
    0x53, 0x41, 0x54, 0x41, 0x55, 0x48, 0x89, 0xfb, 0x49, 0x89, 0xf4,
];
const CHAIN_ENTRY: u8 = PROLOGUE.len() as u8;

fn emit_block(b: &mut Vec<u8>, insns: &[Insn]) {
    let mut e = Emit {
        b,
        fixups: Vec::new(),
    };
    e.bytes(&PROLOGUE);
    for i in insns {
        emit_insn(&mut e, i);
    }
    if let Some(last) = insns.last() {
        // Ran off the end: add qword [rbx + pc], off + len.
        e.bytes(&[0x48, 0x81, 0x83]);
        e.u32(pc_off());
        e.u32(u32::from(last.off) + u32::from(last.len));
        e.retired(last);
    }
    emit_tails(&mut e);
}

/// The tails every exit of a block goes through. Each leaves `pc` and `instret` as they
/// are after the instruction that left, so the run loop has nothing to finish, and the
/// block may go straight on to the next one's code ("chaining") when the run loop would
/// only look it up and call it: the run's instruction budget and the next interrupt check
/// (`irq_check_at`) are not reached, no device was touched (a stop or an interrupt may
/// wait), no FENCE.I waits, and the jump cache names a compiled block for the new PC in
/// its current generation. Otherwise the code returns to the run loop: 0 (`pc` is where
/// to go on), or 2 (WFI) or 3 (a trap in `pending_exception`).
fn emit_tails(e: &mut Emit<'_>) {
    use crate::cache::{Compiling, JUMP_BLOCK, JUMP_GEN, JUMP_SIZE, JUMP_TAG};
    let instret = std::mem::offset_of!(Cpu, instret) as u32;
    let gen = (std::mem::offset_of!(Cpu, cache)
        + std::mem::offset_of!(crate::cache::BlockCache, gen)) as u32;
    let mut done = Vec::new();
    // Retired: add [rbx + instret], rcx.
    let retired = e.b.len();
    e.bytes(&[0x48, 0x01, 0x8b]);
    e.u32(instret);
    // mov rax, [rbx + instret]; cmp rax, [rbx + run_end]; jae done;
    // cmp rax, [rbx + irq_check_at]; jae done.
    e.load(RAX, instret);
    for limit in [
        std::mem::offset_of!(Cpu, run_end),
        std::mem::offset_of!(Cpu, irq_check_at),
    ] {
        e.bytes(&[0x48, 0x3b, 0x83]);
        e.u32(limit as u32);
        done.push(e.jcc_forward(CC_AE));
    }
    // cmp byte [rbx + flag], 0; jne done: a device was touched, a FENCE.I waits.
    for flag in [
        std::mem::offset_of!(Cpu, device_touched),
        std::mem::offset_of!(Cpu, code_flush_pending),
    ] {
        e.bytes(&[0x80, 0xbb]);
        e.u32(flag as u32);
        e.bytes(&[0x00]);
        done.push(e.jcc_forward(CC_NE));
    }
    // The jump cache's tag for the PC: rcx = pc | (prv == User).
    // mov rdx, [rbx + pc]; xor ecx, ecx; cmp byte [rbx + prv], User; sete cl; or rcx, rdx
    e.load(RDX, pc_off());
    e.bytes(&[0x31, 0xc9, 0x80, 0xbb]);
    e.u32(std::mem::offset_of!(Cpu, prv) as u32);
    e.bytes(&[
        crate::cpu::Priv::User as u8,
        0x0f,
        0x94,
        0xc1,
        0x48,
        0x09,
        0xd1,
    ]);
    // r8 = the slot: ((pc >> 1) & (size - 1)) * 16 + the slots' base.
    // mov r8, rdx; shr r8, 1; and r8d, size - 1; shl r8, 4; add r8, [rbx + chain_jumps]
    e.bytes(&[0x49, 0x89, 0xd0, 0x49, 0xd1, 0xe8, 0x41, 0x81, 0xe0]);
    e.u32(JUMP_SIZE as u32 - 1);
    e.bytes(&[0x49, 0xc1, 0xe0, 0x04, 0x4c, 0x03, 0x83]);
    e.u32(std::mem::offset_of!(Cpu, chain_jumps) as u32);
    // cmp rcx, [r8 + tag]; jne done
    e.bytes(&[0x49, 0x3b, 0x48, JUMP_TAG as u8]);
    done.push(e.jcc_forward(CC_NE));
    // mov ecx, [r8 + gen]; cmp ecx, [rbx + cache.gen]; jne done
    e.bytes(&[0x41, 0x8b, 0x48, JUMP_GEN as u8, 0x3b, 0x8b]);
    e.u32(gen);
    done.push(e.jcc_forward(CC_NE));
    // rcx = &codes[block]: mov ecx, [r8 + block]; imul rcx, rcx, size;
    // add rcx, [rbx + chain_codes]
    e.bytes(&[0x41, 0x8b, 0x48, JUMP_BLOCK as u8, 0x48, 0x69, 0xc9]);
    e.u32(std::mem::size_of::<Compiling>() as u32);
    e.bytes(&[0x48, 0x03, 0x8b]);
    e.u32(std::mem::offset_of!(Cpu, chain_codes) as u32);
    // mov rax, [rcx] (the code, first in `Compiling`); test rax, rax; jz done;
    // add rax, CHAIN_ENTRY; jmp rax
    e.bytes(&[0x48, 0x8b, 0x01, 0x48, 0x85, 0xc0]);
    done.push(e.jcc_forward(CC_E));
    e.bytes(&[0x48, 0x83, 0xc0, CHAIN_ENTRY, 0xff, 0xe0]);
    // Done: xor eax, eax; jmp ret.
    for f in done {
        e.patch_here(f);
    }
    e.bytes(&[0x31, 0xc0]);
    e.bytes(&[0xe9]);
    let to_ret = e.b.len();
    e.u32(0);
    // Exec: a Jump retired idx + 1 (jump to Retired); a WFI idx + 1 and goes on after it
    // (pc += off + len); a trap idx and stays at it (pc += off).
    // cmp eax, 1; jne not_jump; inc ecx; jmp retired
    let exec = e.b.len();
    e.bytes(&[0x83, 0xf8, Flow::Jump as u8]);
    let not_jump = e.jcc_forward(CC_NE);
    e.bytes(&[0xff, 0xc1, 0xe9]);
    let back = e.b.len();
    e.u32((retired as i64 - (back as i64 + 4)) as u32);
    e.patch_here(not_jump);
    // cmp eax, 2; jne trap; inc ecx; add edx, r8d
    e.bytes(&[0x83, 0xf8, Flow::Wfi as u8]);
    let trap = e.jcc_forward(CC_NE);
    e.bytes(&[0xff, 0xc1, 0x44, 0x01, 0xc2]);
    e.patch_here(trap);
    // add [rbx + instret], rcx; add [rbx + pc], rdx
    e.bytes(&[0x48, 0x01, 0x8b]);
    e.u32(instret);
    e.bytes(&[0x48, 0x01, 0x93]);
    e.u32(pc_off());
    // Ret: pop r13; pop r12; pop rbx; ret.
    e.patch_here(to_ret);
    e.bytes(&[0x41, 0x5d, 0x41, 0x5c, 0x5b, 0xc3]);
    for (f, label) in std::mem::take(&mut e.fixups) {
        let to = match label {
            Label::Retired => retired,
            Label::Exec => exec,
        };
        let rel = (to as i64 - (f as i64 + 4)) as i32;
        e.b[f..f + 4].copy_from_slice(&rel.to_le_bytes());
    }
}

/// `rax = x[rs1] op x[rs2]` forms: the ModRM-free opcode bytes after `rax, rcx` are loaded.
fn reg_op(op: Op) -> Option<&'static [u8]> {
    use Op::*;
    Some(match op {
        Add => &[0x48, 0x01, 0xc8],
        Sub => &[0x48, 0x29, 0xc8],
        And => &[0x48, 0x21, 0xc8],
        Or => &[0x48, 0x09, 0xc8],
        Xor => &[0x48, 0x31, 0xc8],
        // Shift counts: x86 masks CL to 6 bits (5 for 32-bit forms) as RISC-V does.
        Sll => &[0x48, 0xd3, 0xe0],
        Srl => &[0x48, 0xd3, 0xe8],
        Sra => &[0x48, 0xd3, 0xf8],
        Mul => &[0x48, 0x0f, 0xaf, 0xc1],
        // 32-bit forms, sign-extended after.
        Addw => &[0x01, 0xc8],
        Subw => &[0x29, 0xc8],
        Sllw => &[0xd3, 0xe0],
        Srlw => &[0xd3, 0xe8],
        Sraw => &[0xd3, 0xf8],
        Mulw => &[0x0f, 0xaf, 0xc1],
        _ => return None,
    })
}

fn is_word(op: Op) -> bool {
    use Op::*;
    matches!(
        op,
        Addw | Subw | Sllw | Srlw | Sraw | Mulw | Addiw | Slliw | Srliw | Sraiw
    )
}

/// Immediate forms as the register form with the immediate in RCX, or a shift by imm8.
fn imm_as_reg(op: Op) -> Option<Op> {
    use Op::*;
    Some(match op {
        Addi => Add,
        Xori => Xor,
        Ori => Or,
        Andi => And,
        Addiw => Addw,
        _ => return None,
    })
}

/// `op rax, imm8` shifts: (opcode bytes, count mask).
fn shift_imm(op: Op) -> Option<(&'static [u8], u8)> {
    use Op::*;
    Some(match op {
        Slli => (&[0x48, 0xc1, 0xe0], 63),
        Srli => (&[0x48, 0xc1, 0xe8], 63),
        Srai => (&[0x48, 0xc1, 0xf8], 63),
        Slliw => (&[0xc1, 0xe0], 31),
        Srliw => (&[0xc1, 0xe8], 31),
        Sraiw => (&[0xc1, 0xf8], 31),
        _ => return None,
    })
}

fn emit_insn(e: &mut Emit<'_>, i: &Insn) {
    use Op::*;
    let rd = i.rd & 31;
    if let Some(op) = reg_op(i.op) {
        if rd != 0 {
            e.load(RAX, xoff(i.rs1));
            e.load(RCX, xoff(i.rs2));
            e.bytes(op);
            if is_word(i.op) {
                e.sext32();
            }
            e.store(RAX, xoff(rd));
        }
        return;
    }
    if let Some(op) = imm_as_reg(i.op) {
        if rd != 0 {
            e.load(RAX, xoff(i.rs1));
            e.imm(RCX, i.imm as u64);
            e.bytes(reg_op(op).unwrap_or(&[]));
            if is_word(i.op) {
                e.sext32();
            }
            e.store(RAX, xoff(rd));
        }
        return;
    }
    if let Some((op, mask)) = shift_imm(i.op) {
        if rd != 0 {
            e.load(RAX, xoff(i.rs1));
            e.bytes(op);
            e.bytes(&[(i.imm as u8) & mask]);
            if is_word(i.op) {
                e.sext32();
            }
            e.store(RAX, xoff(rd));
        }
        return;
    }
    match i.op {
        Slt | Sltu | Slti | Sltiu => {
            if rd != 0 {
                e.load(RAX, xoff(i.rs1));
                if matches!(i.op, Slt | Sltu) {
                    e.load(RCX, xoff(i.rs2));
                } else {
                    e.imm(RCX, i.imm as u64);
                }
                // xor edx, edx; cmp rax, rcx; setl/setb dl; mov rax, rdx
                e.bytes(&[0x31, 0xd2, 0x48, 0x39, 0xc8]);
                let set = if matches!(i.op, Slt | Slti) {
                    0x9c
                } else {
                    0x92
                };
                e.bytes(&[0x0f, set, 0xc2, 0x48, 0x89, 0xd0]);
                e.store(RAX, xoff(rd));
            }
        }
        Lui => {
            if rd != 0 {
                e.imm(RAX, i.imm as u64);
                e.store(RAX, xoff(rd));
            }
        }
        Auipc => {
            if rd != 0 {
                e.pc_plus(u64::from(i.off).wrapping_add(i.imm as u64));
                e.store(RAX, xoff(rd));
            }
        }
        Beq | Bne | Blt | Bge | Bltu | Bgeu => {
            e.load(RAX, xoff(i.rs1));
            e.load(RCX, xoff(i.rs2));
            e.bytes(&[0x48, 0x39, 0xc8]);
            // Jump over the exit when the branch is not taken.
            let not_taken = match i.op {
                Beq => CC_NE,
                Bne => CC_E,
                Blt => CC_GE,
                Bge => CC_L,
                Bltu => CC_AE,
                _ => CC_B,
            };
            let skip = e.jcc_forward(not_taken);
            e.pc_plus(u64::from(i.off).wrapping_add(i.imm as u64));
            e.store(RAX, pc_off());
            e.retired(i);
            e.patch_here(skip);
        }
        Jal => {
            if rd != 0 {
                e.pc_plus(u64::from(i.off) + u64::from(i.len));
                e.store(RAX, xoff(rd));
            }
            e.pc_plus(u64::from(i.off).wrapping_add(i.imm as u64));
            e.store(RAX, pc_off());
            e.retired(i);
        }
        Jalr => {
            // The target first: rd may be rs1.
            e.load(RDX, xoff(i.rs1));
            e.imm(RCX, i.imm as u64);
            e.bytes(&[0x48, 0x01, 0xca]); // add rdx, rcx
            e.bytes(&[0x48, 0x83, 0xe2, 0xfe]); // and rdx, -2
            if rd != 0 {
                e.pc_plus(u64::from(i.off) + u64::from(i.len));
                e.store(RAX, xoff(rd));
            }
            e.store(RDX, pc_off());
            e.retired(i);
        }
        Lb | Lh | Lw | Ld | Lbu | Lhu | Lwu | Sb | Sh | Sw | Sd => emit_access(e, i),
        _ => emit_exec(e, i),
    }
}

/// A load or store: the TLB's fast path inline (an in-page access to RAM whose entry
/// passed for this context), else the interpreter.
fn emit_access(e: &mut Emit<'_>, i: &Insn) {
    use crate::mmu::{TLB_ENTRIES, TLB_ENTRY_CTX, TLB_ENTRY_HOST, TLB_ENTRY_SIZE, TLB_ENTRY_TAG};
    use Op::*;
    let (size, store, access): (u32, bool, usize) = match i.op {
        Lb | Lbu => (1, false, 1),
        Lh | Lhu => (2, false, 1),
        Lw | Lwu => (4, false, 1),
        Ld => (8, false, 1),
        Sb => (1, true, 2),
        Sh => (2, true, 2),
        Sw => (4, true, 2),
        _ => (8, true, 2),
    };
    let kind = (access * crate::mmu::TLB_SLOTS * TLB_ENTRY_SIZE) as u32;
    let tlb = (std::mem::offset_of!(Cpu, tlb) + TLB_ENTRIES) as u32;
    let key = std::mem::offset_of!(Cpu, data_key) as u32;
    // rax = va; ecx = its page offset; out of line if the access crosses the page.
    e.load(RAX, xoff(i.rs1));
    e.imm(RCX, i.imm as u64);
    e.bytes(&[0x48, 0x01, 0xc8]); // add rax, rcx
    e.bytes(&[0x89, 0xc1, 0x81, 0xe1, 0xff, 0x0f, 0x00, 0x00]); // mov ecx, eax; and ecx, 0xfff
    e.bytes(&[0x81, 0xf9]); // cmp ecx, 0x1000 - size
    e.u32(0x1000 - size);
    let mut slow = vec![e.jcc_forward(0x7)]; // ja
                                             // r9 = the entry's slot: (vpn % slots) * size + the entries' base; rdx = vpn + 1.
    e.bytes(&[0x48, 0x89, 0xc2, 0x48, 0xc1, 0xea, 0x0c]); // mov rdx, rax; shr rdx, 12
    e.bytes(&[0x41, 0x89, 0xd0, 0x41, 0x81, 0xe0]); // mov r8d, edx; and r8d, slots - 1
    e.u32(crate::mmu::TLB_SLOTS as u32 - 1);
    e.bytes(&[0x45, 0x69, 0xc0]); // imul r8d, r8d, entry size
    e.u32(TLB_ENTRY_SIZE as u32);
    e.bytes(&[0x4c, 0x8b, 0x8b]); // mov r9, [rbx + tlb]
    e.u32(tlb);
    e.bytes(&[0x4d, 0x01, 0xc1, 0x48, 0xff, 0xc2]); // add r9, r8; inc rdx
    e.bytes(&[0x49, 0x3b, 0x91]); // cmp rdx, [r9 + kind + tag]
    e.u32(kind + TLB_ENTRY_TAG as u32);
    slow.push(e.jcc_forward(CC_NE));
    e.bytes(&[0x0f, 0xb6, 0x93]); // movzx edx, byte [rbx + data_key]
    e.u32(key);
    e.bytes(&[0x41, 0x3a, 0x91]); // cmp dl, [r9 + kind + ctx]
    e.u32(kind + TLB_ENTRY_CTX as u32);
    slow.push(e.jcc_forward(CC_NE));
    e.bytes(&[0x4d, 0x8b, 0x89]); // mov r9, [r9 + kind + host]
    e.u32(kind + TLB_ENTRY_HOST as u32);
    e.bytes(&[0x4d, 0x85, 0xc9]); // test r9, r9
    slow.push(e.jcc_forward(CC_E));
    e.bytes(&[0x49, 0x01, 0xc9]); // add r9, rcx
    if store {
        e.load(RAX, xoff(i.rs2));
        e.bytes(match size {
            1 => &[0x41, 0x88, 0x01],
            2 => &[0x66, 0x41, 0x89, 0x01],
            4 => &[0x41, 0x89, 0x01],
            _ => &[0x49, 0x89, 0x01],
        });
    } else {
        e.bytes(match i.op {
            Lb => &[0x49, 0x0f, 0xbe, 0x01],
            Lbu => &[0x41, 0x0f, 0xb6, 0x01],
            Lh => &[0x49, 0x0f, 0xbf, 0x01],
            Lhu => &[0x41, 0x0f, 0xb7, 0x01],
            Lw => &[0x49, 0x63, 0x01],
            Lwu => &[0x41, 0x8b, 0x01],
            _ => &[0x49, 0x8b, 0x01],
        });
        if i.rd & 31 != 0 {
            e.store(RAX, xoff(i.rd));
        }
    }
    e.bytes(&[0xe9]); // jmp done
    let done = e.b.len();
    e.u32(0);
    for f in slow {
        e.patch_here(f);
    }
    emit_exec(e, i);
    e.patch_here(done);
}

/// The interpreter runs `i`; a flow other than `Next` leaves the block.
fn emit_exec(e: &mut Emit<'_>, i: &Insn) {
    // mov rdi, rbx; mov rsi, r12; mov rdx, insn; mov rax, exec_one; call rax
    e.bytes(&[0x48, 0x89, 0xdf, 0x4c, 0x89, 0xe6]);
    e.imm(RDX, i as *const Insn as u64);
    e.imm(RAX, exec_one as *const () as u64);
    e.bytes(&[0xff, 0xd0]);
    // test eax, eax; jz next; mov ecx, idx; mov edx, off; mov r8d, len; jmp Exec
    e.bytes(&[0x85, 0xc0]);
    let next = e.jcc_forward(CC_E);
    e.bytes(&[0xb9]);
    e.u32(u32::from(i.idx));
    e.bytes(&[0xba]);
    e.u32(u32::from(i.off));
    e.bytes(&[0x41, 0xb8]);
    e.u32(u32::from(i.len));
    e.jmp(Label::Exec);
    e.patch_here(next);
}
