//! Guest instructions to host code (see the module documentation for the scheme).

use std::mem::offset_of;

use iced_x86::code_asm::{
    byte_ptr, dword_ptr, get_xmm, get_ymm, gpr16, gpr32, gpr64, gpr8, ptr, qword_ptr, word_ptr,
    xmmword_ptr, AsmRegister64, AsmRegisterXmm, AsmRegisterYmm, CodeAssembler, CodeLabel,
};
use iced_x86::{
    Code, CodeSize, ConditionCode, Instruction, InstructionInfoFactory, OpKind, Register,
};

use super::asm::Asm;
use super::cover::{
    displacement, gpr_index, high_byte, kind, plan_mem, plan_regs, short_inc_dec, sized, Kind, Mem,
    Regs, POOL, R15, RSP,
};
use super::Ctx;
use crate::decode::Insn;
use crate::decode::{block_entry_offset, block_layout};
use crate::exec::hostexec::host_avx;
use crate::mmu::tlb_layout;
use crate::state::{CpuState, FpuState};

/// Maps assembler errors (which would be a compiler bug) to "do not compile".
macro_rules! a {
    ($e:expr) => {
        $e.ok()?
    };
}

/// The status flags in RFLAGS.
const RFLAGS_STATUS: i32 = 0x8d5;

/// Fewer covered instructions than this are not worth a call.
const MIN_COVERED: usize = 1;

fn gpr_off(g: usize) -> i32 {
    (offset_of!(CpuState, gpr) + 8 * g) as i32
}

fn rflags_off() -> i32 {
    offset_of!(CpuState, rflags) as i32
}

/// A context field's offset from R15 (see `Ctx`).
fn ctx_off(field: usize) -> i32 {
    (crate::cpu::jit_ctx_disp() + field as i64) as i32
}

/// Points `ins`'s memory operand at the host pointer in `host`, as translated inline.
fn at_host(ins: &mut Instruction, host: Register) {
    ins.set_memory_base(host);
    ins.set_memory_index(Register::None);
    ins.set_memory_index_scale(1);
    ins.set_memory_displacement64(0);
    ins.set_memory_displ_size(0);
    ins.set_segment_prefix(Register::None);
}

/// Points `ins`'s memory operand at `base + index`: a page's addend and the linear
/// address, as translated inline (see `Emitter::memory_operand_split`).
fn at_host_plus(ins: &mut Instruction, base: Register, index: Register) {
    at_host(ins, base);
    ins.set_memory_index(index);
}

fn r64(r: Register) -> Option<AsmRegister64> {
    gpr64::get_gpr64(r)
}

fn xmm_off(n: usize) -> i32 {
    (offset_of!(CpuState, fpu) + offset_of!(FpuState, xmm) + 16 * n) as i32
}

fn ymm_hi_off(n: usize) -> i32 {
    (offset_of!(CpuState, fpu) + offset_of!(FpuState, ymm_hi) + 16 * n) as i32
}

fn xmm_reg(n: usize) -> Option<AsmRegisterXmm> {
    get_xmm(Register::try_from(Register::XMM0 as usize + n).ok()?)
}

fn ymm_reg(n: usize) -> Option<AsmRegisterYmm> {
    get_ymm(Register::try_from(Register::YMM0 as usize + n).ok()?)
}

/// Host code for a block, assembled for the address it will live at.
pub(super) struct Translated {
    pub(super) code: Vec<u8>,
    /// Where `Runtime::enter` jumps to run the block.
    pub(super) entry: u64,
    /// Where another compiled block whose exit is linked here continues (see `Ctx`).
    pub(super) chain_entry: u64,
    /// Per exit to a target in the same page, in the order of its link slot in the
    /// block's record: where its unlinked path starts, and whether it goes forward (see
    /// `BlockCache::link`).
    pub(super) links: Vec<(u64, bool)>,
}

/// What compiled code keeps per CPU, not in the code (which all CPUs of a machine share):
/// each block's record lies at a fixed distance from the block's first byte (`Asm::record_at`), in
/// the CPU's own writable memory (see `shared::View`), and holds the block's cache slot,
/// the address of its TLB generation (page-crossing blocks), then a `LINK_SIZE`-byte
/// link slot per exit in the same page: the jump target, the unlinked target, and
/// whether the exit goes forward.
pub(super) const RECORD_SLOT: u64 = 0;
pub(super) const RECORD_TLB_GEN: u64 = 8;
pub(super) const RECORD_LINKS: u64 = 16;
pub(super) const LINK_SIZE: u64 = 24;

/// A RIP-relative memory operand at `field` of the block's record (see `RECORD_SLOT`):
/// the assembler places it (see `asm::PRIVATE`).
fn record(field: u64) -> iced_x86::MemoryOperand {
    iced_x86::MemoryOperand::with_base_displ(Register::RIP, (super::asm::PRIVATE + field) as i64)
}

/// Emits host code for a block's leading instructions, to be placed at `at`; `cross`
/// for a page-crossing block (which checks its TLB generation). The code depends on
/// nothing of the CPU that compiles it: what does is in the block's record (see
/// `RECORD_SLOT`). None when fewer than `MIN_COVERED` are covered (or the assembler
/// refuses something).
pub(super) fn translate(
    insns: &[Insn],
    at: u64,
    cross: bool,
    model: u64,
    asm: &mut Asm,
    rt: &Runtime,
) -> Option<Translated> {
    let mut info = InstructionInfoFactory::new();
    // What each covered instruction is, and a native one's register plan, decided once.
    let mut plans = Vec::with_capacity(insns.len());
    for (i, insn) in insns.iter().enumerate() {
        let ins = &insn.instr;
        let Some(k) = kind(ins, i + 1 == insns.len(), model) else {
            break;
        };
        let regs = match k {
            Kind::Native | Kind::Vector(_) => {
                match plan_regs(ins, &mut info, matches!(k, Kind::Vector(_))) {
                    Some(r) => Some(r),
                    None => break,
                }
            }
            _ => None,
        };
        plans.push((k, regs));
    }
    let covered = plans.len();
    if covered < MIN_COVERED {
        return None;
    }
    let branch = matches!(
        plans.last(),
        Some((
            Kind::Branch | Kind::Call | Kind::Ret | Kind::IndJmp | Kind::IndCall,
            _
        ))
    );
    let first_ip = insns.first()?.instr.ip();
    let bits = match insns.first()?.instr.code_size() {
        CodeSize::Code32 => 32,
        _ => 64,
    };
    let len = insns.len() as u32;
    let mut e = Emitter::new(first_ip, len, cross, rt, bits)?;
    let kinds: Vec<Kind> = plans.iter().map(|(k, _)| *k).collect();
    let mut skip = 0;
    for (i, (insn, (k, regs))) in insns.iter().zip(plans).enumerate() {
        let ins = &insn.instr;
        if skip > 0 {
            skip -= 1;
            continue;
        }
        // Runs of PUSHes or POPs (a function's prologue or epilogue, with the RET after
        // the POPs) translate their stack range once.
        let run = stack_run(insns, &kinds, i);
        if bits == 64 && (run.count >= 2 || (run.count == 1 && run.ret)) {
            let at = insns.get(i..i + run.count)?;
            if k == Kind::Push {
                e.push_run(at, i as u32)?;
            } else {
                let ret = if run.ret {
                    Some(&insns.get(i + run.count)?.instr)
                } else {
                    None
                };
                e.pop_run(at, i as u32, ret)?;
            }
            skip = run.count - 1 + usize::from(run.ret);
            continue;
        }
        match k {
            Kind::Native => e.native(ins, i as u32, regs?, &mut info)?,
            Kind::Vector(v) => e.vector(ins, i as u32, regs?, &v, &mut info)?,
            Kind::BitMem => e.bit_mem(ins, i as u32, &mut info)?,
            Kind::Vzeroupper => e.vzeroupper(i as u32)?,
            Kind::Lea => e.lea(ins)?,
            Kind::Div => e.div(ins, i as u32, &mut info)?,
            Kind::Nop => {}
            Kind::Branch => e.branch(ins)?,
            Kind::Push => e.push(ins, i as u32)?,
            Kind::PushMem => e.push_mem(ins, i as u32, &mut info)?,
            Kind::Pop => e.pop(ins, i as u32)?,
            Kind::Leave => e.leave(i as u32)?,
            Kind::PushFlags => e.push_flags(i as u32)?,
            Kind::Cli => e.set_if(i as u32, false)?,
            Kind::Sti => e.set_if(i as u32, true)?,
            Kind::Swapgs => e.swapgs(i as u32)?,
            Kind::Cld => e.set_df(false)?,
            Kind::Std => e.set_df(true)?,
            Kind::Rdtsc => e.rdtsc(i as u32, false)?,
            Kind::Rdtscp => e.rdtsc(i as u32, true)?,
            Kind::Pause => e.pause(i as u32)?,
            Kind::RepStos => e.rep_stos(ins, i as u32)?,
            Kind::RepMovs => e.rep_movs(ins, i as u32)?,
            Kind::Movs => e.movs(ins, i as u32)?,
            Kind::Stos => e.stos(ins, i as u32)?,
            Kind::Call => e.call(ins, i as u32)?,
            Kind::Ret => e.ret(ins, i as u32)?,
            Kind::IndJmp => e.indirect(ins, i as u32, false, &mut info)?,
            Kind::IndCall => e.indirect(ins, i as u32, true, &mut info)?,
        }
    }
    if !branch {
        if covered == insns.len() {
            // The whole block, which ended at its length limit: it goes on sequentially.
            let last = &insns.last()?.instr;
            e.go_to(last.next_ip(), last.ip())?;
        } else {
            a!(e.a.mov(gpr32::esi, covered as u32));
            a!(e.a.jmp(e.exit));
        }
    }
    e.finish(at, asm)
}

/// A run of stack instructions starting at `i`: how many PUSHes or POPs (none of RSP
/// itself), and for POPs whether the block's final RET follows them.
struct StackRun {
    count: usize,
    ret: bool,
}

/// Longest run translated at once (the range must lie in one page anyway).
const MAX_RUN: usize = 16;

fn stack_run(insns: &[Insn], kinds: &[Kind], i: usize) -> StackRun {
    let Some(&first) = kinds.get(i) else {
        return StackRun {
            count: 0,
            ret: false,
        };
    };
    let member = |j: usize| {
        kinds.get(j) == Some(&first)
            && matches!(first, Kind::Push | Kind::Pop)
            && insns.get(j).is_some_and(|x| {
                x.instr.op0_kind() != OpKind::Register
                    || gpr_index(x.instr.op0_register()) != Some(RSP)
            })
    };
    let mut count = 0;
    while count < MAX_RUN && member(i + count) {
        count += 1;
    }
    let ret = first == Kind::Pop && count > 0 && kinds.get(i + count) == Some(&Kind::Ret);
    StackRun { count, ret }
}

struct Emitter {
    a: CodeAssembler,
    /// Leaves before instruction ESI (a miss, or the first instruction not covered).
    exit: CodeLabel,
    /// Leaves after the block's end, with the next RIP in the context.
    done: CodeLabel,
    chain_entry: CodeLabel,
    /// The index of the instruction `chain_entry` labels.
    chain_entry_at: usize,
    /// Per memory access: where its miss path starts and the instruction to resume at.
    misses: Vec<(CodeLabel, u32)>,
    /// DIVs that would raise #DE: where their path starts (the guest's flags saved on the
    /// host stack) and the miss path to continue at.
    div_faults: Vec<(CodeLabel, CodeLabel)>,
    /// Per exit linked through the record: the index of the instruction its unlinked
    /// path starts at, and whether it goes forward.
    links: Vec<(usize, bool)>,
    /// Host register i holds guest register i's current value (which is always in the
    /// state too: stores are written through, so exits need no spilling).
    cached: [bool; 16],
    /// Host XMM/YMM register i holds guest register i: 0 not, 1 bits 127:0, 2 all of it.
    vcached: [u8; 16],
    /// The SIMD state checks done in this block (bit 0 SSE, bit 1 AVX; see `Ctx::simd`).
    simd_checked: u64,
    first_ip: u64,
    /// The index of the instruction the block's body starts at (its entry).
    body_at: usize,
    rt: Runtime,
    /// 64, or 32 for 32-bit code (see `cover::kind`).
    bits: u32,
}

/// Code all compiled blocks share, placed once (see `runtime`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Runtime {
    /// `(state, ctx, entry)`: saves the callee-saved registers and the context pointer
    /// (then at [rsp]), points R15 at the state, loads the guest's status flags into
    /// RFLAGS and jumps to a block's entry.
    pub(super) enter: u64,
    /// Leaves before instruction ESI of the block in cache slot R8: counts the
    /// instructions before it and names the block in the context.
    pub(super) exit: u64,
    /// Leaves after a block's end, with the next RIP in the context.
    pub(super) done: u64,
    /// `look_up_and_go`'s second try, when the first slot of the pair holds another
    /// block: the other slot (RAX the RIP, R11 its physical address, R9 the first
    /// slot, RDX the jump cache entry to fill), entered at its chain entry or left through
    /// `done`.
    pub(super) second_way: u64,
}

/// Host code for [`Runtime`], to be placed at `at`: the code and the runtime's addresses.
pub(super) fn runtime(asm: &mut Asm, at: u64) -> Option<(Vec<u8>, Runtime)> {
    use iced_x86::code_asm::registers::gpr64::*;
    use iced_x86::code_asm::registers::gpr8::{ah, al, cl};
    let mut a = a!(CodeAssembler::new(64));
    let mut exit = a.create_label();
    let mut done = a.create_label();
    let mut leave = a.create_label();
    for r in [rbx, rbp, r12, r13, r14, r15, rsi] {
        a!(a.push(r));
    }
    a!(a.mov(r15, rdi));
    a!(a.mov(rax, qword_ptr(r15 + rflags_off())));
    a!(a.mov(gpr32::ecx, gpr32::eax));
    a!(a.shr(gpr32::ecx, 11));
    a!(a.and(gpr32::ecx, 1));
    // OF = (cl == 1): 0x7f + 1 overflows.
    a!(a.add(cl, 0x7f));
    a!(a.mov(ah, al));
    a!(a.sahf());
    a!(a.jmp(rdx));
    let exit_at = a.instructions().len();
    a!(a.set_label(&mut exit));
    a!(a.mov(qword_ptr(gpr64::r15 + ctx_off(offset_of!(Ctx, slot))), r8));
    a!(a.jmp(leave));
    let done_at = a.instructions().len();
    a!(a.set_label(&mut done));
    a!(a.mov(rsi, FINISHED));
    a!(a.set_label(&mut leave));
    a!(a.pushfq());
    a!(a.pop(rcx));
    a!(a.and(gpr32::ecx, RFLAGS_STATUS));
    a!(a.mov(rdx, qword_ptr(r15 + rflags_off())));
    a!(a.and(rdx, !RFLAGS_STATUS));
    a!(a.or(rdx, rcx));
    a!(a.mov(qword_ptr(r15 + rflags_off()), rdx));
    if host_avx() {
        // Rust code after this runs legacy-encoded SSE: no dirty upper state for it.
        a!(a.vzeroupper());
    }
    a!(a.mov(rax, rsi));
    a!(a.pop(rsi));
    for r in [r15, r14, r13, r12, rbp, rbx] {
        a!(a.pop(r));
    }
    a!(a.ret());
    let second_way_at = a.instructions().len();
    second_way(&mut a, &mut done)?;
    let mut code = Vec::new();
    let offsets = asm.assemble(a.instructions(), at, &mut code)?;
    let addr = |i: usize| Some(at + u64::from(*offsets.get(i)?));
    let rt = Runtime {
        enter: at,
        exit: addr(exit_at)?,
        done: addr(done_at)?,
        second_way: addr(second_way_at)?,
    };
    Some((code, rt))
}

/// The second slot of the pair `look_up_and_go` found another block in (see
/// `BlockCache::way`): the same checks, on the slot whose address differs in bit 6.
/// Flag-free, like the lookup.
fn second_way(a: &mut CodeAssembler, done: &mut CodeLabel) -> Option<()> {
    use iced_x86::code_asm::registers::gpr64::*;
    let (_, b_gpa, b_ip, b_bits, b_epoch, b_chain) = block_layout();
    // R9 ^= 64 without flags: R9 + 64 - 128 * bit6.
    a!(a.mov(r8, 64u64));
    a!(a.pext(r10, r9, r8));
    a!(a.mov(r8, 7u64));
    a!(a.shlx(r10, r10, r8));
    a!(a.not(r10));
    a!(a.lea(r9, ptr(r9 + r10 + 65)));
    let go = |a: &mut CodeAssembler| -> Option<()> {
        let mut ok = a.create_label();
        a!(a.jrcxz(ok));
        a!(a.jmp(*done));
        a!(a.set_label(&mut ok));
        Some(())
    };
    a!(a.mov(rcx, qword_ptr(r9 + b_gpa)));
    a!(a.not(rcx));
    a!(a.lea(rcx, ptr(rcx + r11 + 1)));
    go(a)?;
    a!(a.mov(rcx, qword_ptr(r9 + b_ip)));
    a!(a.not(rcx));
    a!(a.lea(rcx, ptr(rcx + rax + 1)));
    go(a)?;
    // The bitness of the code running (`Ctx::bits`).
    a!(a.movzx(gpr32::ecx, byte_ptr(r9 + b_bits)));
    a!(a.mov(r8, 0x7fu64));
    a!(a.pext(rcx, rcx, r8));
    a!(a.not(rcx));
    a!(a.mov(r8, qword_ptr(gpr64::r15 + ctx_off(offset_of!(Ctx, bits)))));
    a!(a.lea(rcx, ptr(rcx + r8 + 1)));
    go(a)?;
    a!(a.mov(rcx, qword_ptr(r9 + b_epoch)));
    a!(a.not(rcx));
    a!(a.mov(r8, qword_ptr(gpr64::r15 + ctx_off(offset_of!(Ctx, epoch)))));
    a!(a.lea(rcx, ptr(rcx + r8 + 1)));
    go(a)?;
    a!(a.mov(rcx, qword_ptr(r9 + b_chain)));
    a!(a.jrcxz(*done));
    jump_cache_fill(a)?;
    a!(a.jmp(rcx));
    Some(())
}

/// Entries per privilege in the jump cache (see `Ctx::jc`).
pub(crate) const JUMP_CACHE: usize = 4096;

/// The jump cache entry for `rip`, as `look_up_and_go` computes it: RIP rotated right by
/// 12 plus RIP (the rotated-in low bits lie above the mask).
pub(crate) fn jump_cache_index(rip: u64) -> usize {
    (rip.rotate_right(12).wrapping_add(rip) as usize) & (JUMP_CACHE - 1)
}

/// Notes in the jump cache entry at RDX that RIP RAX goes on at RCX (the chain entry of
/// the block in slot R9) or, from a lower RIP, at the block's body entry (see `Dir`),
/// valid while the stamp is `Ctx::jc_stamp`. Flag-free; clobbers R8.
///
/// The RIP is stored complemented and the context holds the stamp complemented, so that
/// each of the lookup's compares is one LEA.
fn jump_cache_fill(a: &mut CodeAssembler) -> Option<()> {
    use iced_x86::code_asm::registers::gpr64::*;
    a!(a.mov(r8, rax));
    a!(a.not(r8));
    a!(a.mov(qword_ptr(rdx), r8));
    a!(a.mov(r8, qword_ptr(r15 + ctx_off(offset_of!(Ctx, jc_stamp)))));
    a!(a.not(r8));
    a!(a.mov(qword_ptr(rdx + 8), r8));
    a!(a.mov(qword_ptr(rdx + 16), rcx));
    a!(a.mov(r8, qword_ptr(r9 + block_entry_offset())));
    a!(a.mov(qword_ptr(rdx + 24), r8));
    Some(())
}

/// Where a jump to another block goes relative to the instruction that makes it. Going
/// forward (to a higher RIP) it may skip the target's kick and budget checks: every
/// cycle of blocks has a step backward, which checks (see `BlockCache::link`).
#[derive(Clone, Copy)]
enum Dir {
    Forward,
    Backward,
    /// Known only when it runs (RET, indirect JMP/CALL): from the instruction at this IP.
    From(u64),
}

/// Returned when the code ran to the end of its chain of blocks (the next RIP is in the
/// context); other values are the instruction to resume at in block `Ctx::slot`.
pub(crate) const FINISHED: u64 = u64::MAX;

impl Emitter {
    fn new(first_ip: u64, len: u32, cross: bool, rt: &Runtime, bits: u32) -> Option<Self> {
        let mut a = a!(CodeAssembler::new(64));
        let exit = a.create_label();
        let done = a.create_label();
        let chain_entry = a.create_label();
        let mut e = Emitter {
            a,
            exit,
            done,
            chain_entry,
            chain_entry_at: 0,
            misses: Vec::new(),
            div_faults: Vec::new(),
            links: Vec::new(),
            cached: [false; 16],
            vcached: [0; 16],
            simd_checked: 0,
            first_ip,
            body_at: 0,
            rt: *rt,
            bits,
        };
        e.prologue(len, cross)?;
        Some(e)
    }

    /// The chain entry, reached from another block (with `Runtime::enter`'s work done),
    /// goes on only if no other thread has raised the kick flag and the chain budget
    /// (`Ctx::budget`, in instructions) covers this block; else it leaves with RIP at this
    /// block. Then the entry `Runtime::enter` jumps to, which charges the block to the
    /// budget unchecked, then the body. Either way the whole block is charged up front:
    /// a block left early is refunded by the run loop, which knows where it stopped.
    /// A page-crossing block checks before its body, on either entry, that the TLB is in
    /// the generation (at `tlb_gen`) its next page was checked in.
    /// No check of the code epoch: links are cut when it moves (`BlockCache::sync_links`).
    fn prologue(&mut self, len: u32, cross: bool) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::*;
        let a = &mut self.a;
        let mut body = a.create_label();
        let mut charged = a.create_label();
        let mut refund = a.create_label();
        let mut fail = a.create_label();
        let mut kick_ok = a.create_label();
        let budget = qword_ptr(r15 + ctx_off(offset_of!(Ctx, budget)));
        let len = i32::try_from(len).ok()?;
        a!(a.set_label(&mut self.chain_entry));
        a!(a.mov(rcx, qword_ptr(r15 + ctx_off(offset_of!(Ctx, kick)))));
        a!(a.movzx(gpr32::ecx, byte_ptr(rcx)));
        a!(a.jrcxz(kick_ok));
        a!(a.jmp(fail));
        a!(a.set_label(&mut kick_ok));
        a!(a.mov(rcx, budget));
        a!(a.lea(rcx, ptr(rcx - len)));
        a!(a.mov(budget, rcx));
        // The budget stays within +-2^31: its upper half is 0 unless it went negative.
        a!(a.rorx(rcx, rcx, 32));
        a!(a.mov(gpr32::ecx, gpr32::ecx));
        a!(a.jrcxz(charged));
        a!(a.set_label(&mut refund));
        a!(a.mov(rcx, budget));
        a!(a.lea(rcx, ptr(rcx + len)));
        a!(a.mov(budget, rcx));
        a!(a.set_label(&mut fail));
        a!(a.mov(rax, self.first_ip));
        a!(a.mov(qword_ptr(r15 + ctx_off(offset_of!(Ctx, rip))), rax));
        a!(a.jmp(self.done));
        self.body_at = a.instructions().len();
        a!(a.set_label(&mut body));
        a!(a.mov(rcx, budget));
        a!(a.lea(rcx, ptr(rcx - len)));
        a!(a.mov(budget, rcx));
        a!(a.set_label(&mut charged));
        if cross {
            let mut same = a.create_label();
            a!(a.mov(rcx, qword_ptr(r15 + ctx_off(offset_of!(Ctx, tlb_gen)))));
            let load =
                Instruction::with2(Code::Mov_r64_rm64, Register::RAX, record(RECORD_TLB_GEN));
            a!(a.add_instruction(a!(load)));
            a!(a.mov(rax, qword_ptr(rax)));
            a!(a.not(rcx));
            a!(a.lea(rcx, ptr(rcx + rax + 1)));
            a!(a.jrcxz(same));
            a!(a.jmp(refund));
            a!(a.set_label(&mut same));
        }
        Some(())
    }

    /// Continues at `target` after the block: through a link slot when it is in this
    /// block's page (the slot starts out leaving with the target and the slot's address in
    /// the context, and is pointed at the target block's chain entry once that is
    /// compiled), else by leaving.
    /// `from` is the IP of the instruction that goes there: a link forward (to a higher
    /// IP) enters the target past its kick and budget checks (see `BlockCache::link`).
    fn go_to(&mut self, target: u64, from: u64) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::rax;
        if target >> 12 != self.first_ip >> 12 {
            a!(self.a.mov(rax, target));
            self.store_rip_from_rax()?;
            let dir = if target > from {
                Dir::Forward
            } else {
                Dir::Backward
            };
            return self.look_up_and_go(dir);
        }
        let slot = RECORD_LINKS + LINK_SIZE * self.links.len() as u64;
        let mut stub = self.a.create_label();
        let jump = Instruction::with1(Code::Jmp_rm64, record(slot));
        a!(self.a.add_instruction(a!(jump)));
        let stub_at = self.a.instructions().len();
        a!(self.a.set_label(&mut stub));
        a!(self.a.mov(rax, target));
        self.store_rip_from_rax()?;
        let a = &mut self.a;
        let lea = Instruction::with2(Code::Lea_r64_m, Register::RAX, record(slot));
        a!(a.add_instruction(a!(lea)));
        a!(a.mov(qword_ptr(gpr64::r15 + ctx_off(offset_of!(Ctx, link))), rax));
        a!(a.jmp(self.done));
        self.links.push((stub_at, target > from));
        Some(())
    }

    /// Goes on at the RIP in RAX (also in the context) in another page or after a RET:
    /// through the jump cache when it knows the RIP, else translates it through the TLB
    /// and looks the block up in the block cache, as the run loop would, and jumps to the
    /// block's chain entry if it is compiled and was checked in this code epoch (noting it
    /// in the jump cache); else leaves. Flag-free; at the block end (clobbers anything).
    fn look_up_and_go(&mut self, dir: Dir) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::*;
        let (tlb_entry, vpn_off, _, gpa_off, perm_off, tlb_slots) = tlb_layout();
        let (bsize, b_gpa, b_ip, b_bits, b_epoch, b_chain) = block_layout();
        if bsize != 64 || tlb_entry != 64 {
            return None;
        }
        let done = self.done;
        let bits = self.bits as i32;
        let a = &mut self.a;
        // The jump cache first: RDX = its entry for this RIP, which the slow way below
        // (and `second_way`) fill in when they find the block.
        // The entry `jump_cache_index` names.
        a!(a.rorx(r9, rax, 12));
        a!(a.lea(r9, ptr(r9 + rax)));
        a!(a.pext(
            r9,
            r9,
            qword_ptr(gpr64::r15 + ctx_off(offset_of!(Ctx, jc_mask)))
        ));
        a!(a.lea(r9, ptr(r9 * 8)));
        a!(a.mov(rdx, qword_ptr(gpr64::r15 + ctx_off(offset_of!(Ctx, jc)))));
        a!(a.lea(rdx, ptr(rdx + r9 * 4)));
        let mut slow = a.create_label();
        let mut ip_hit = a.create_label();
        let mut stamp_hit = a.create_label();
        // Both stored complemented (see `jump_cache_fill`).
        a!(a.mov(rcx, qword_ptr(rdx)));
        a!(a.lea(rcx, ptr(rcx + rax + 1)));
        a!(a.jrcxz(ip_hit));
        a!(a.jmp(slow));
        a!(a.set_label(&mut ip_hit));
        a!(a.mov(rcx, qword_ptr(rdx + 8)));
        a!(a.mov(
            r8,
            qword_ptr(gpr64::r15 + ctx_off(offset_of!(Ctx, jc_stamp)))
        ));
        a!(a.lea(rcx, ptr(rcx + r8 + 1)));
        a!(a.jrcxz(stamp_hit));
        a!(a.jmp(slow));
        a!(a.set_label(&mut stamp_hit));
        match dir {
            Dir::Forward => a!(a.jmp(qword_ptr(rdx + 24))),
            Dir::Backward => a!(a.jmp(qword_ptr(rdx + 16))),
            Dir::From(from) => {
                // R9 = 1 when RAX <= from, else 0 (the two are in one half of the address
                // space, and a RIP of 32-bit code is below 2^32): the entry at
                // RDX + 24 - 8 * R9.
                a!(a.mov(r8, from.wrapping_add(1).wrapping_neg()));
                a!(a.lea(r9, ptr(rax + r8)));
                a!(a.mov(r8, 63u64));
                a!(a.shrx(r9, r9, r8));
                a!(a.not(r9));
                a!(a.jmp(qword_ptr(rdx + r9 * 8 + 32)));
            }
        }
        a!(a.set_label(&mut slow));
        a!(a.mov(r8, 12u64));
        a!(a.shrx(r9, rax, r8));
        a!(a.mov(r8, (tlb_slots - 1) as u64));
        a!(a.pext(r10, r9, r8));
        a!(a.lea(r10, ptr(r10 * 8)));
        a!(a.mov(r8, qword_ptr(gpr64::r15 + ctx_off(offset_of!(Ctx, tlb)))));
        a!(a.lea(r10, ptr(r8 + r10 * 8)));
        a!(a.mov(rcx, qword_ptr(r10 + vpn_off)));
        a!(a.not(rcx));
        a!(a.lea(rcx, ptr(rcx + r9 + 1)));
        self.continue_if_rcx_zero(done)?;
        let a = &mut self.a;
        a!(a.movzx(rcx, byte_ptr(r10 + perm_off)));
        a!(a.mov(
            r8,
            qword_ptr(gpr64::r15 + ctx_off(offset_of!(Ctx, fetch_perm)))
        ));
        a!(a.pext(rcx, rcx, r8));
        a!(a.not(rcx));
        a!(a.lea(rcx, ptr(rcx + 2)));
        self.continue_if_rcx_zero(done)?;
        let a = &mut self.a;
        // Code in MMIO is the interpreter's: such entries have no fetch permission.
        // gpa = frame + offset; slot = (gpa + gpa >> 12 + ip >> 12) mod slots, as
        // `BlockCache::slot`.
        a!(a.mov(r11, qword_ptr(r10 + gpa_off)));
        a!(a.mov(r8, 0xfffu64));
        a!(a.pext(r8, rax, r8));
        a!(a.lea(r11, ptr(r11 + r8)));
        a!(a.mov(r8, 12u64));
        a!(a.shrx(r9, r11, r8));
        a!(a.lea(r9, ptr(r9 + r11)));
        a!(a.shrx(r8, rax, r8));
        a!(a.lea(r9, ptr(r9 + r8)));
        a!(a.pext(
            r9,
            r9,
            qword_ptr(gpr64::r15 + ctx_off(offset_of!(Ctx, block_mask)))
        ));
        a!(a.mov(r8, 6u64));
        a!(a.shlx(r9, r9, r8));
        a!(a.mov(r8, qword_ptr(gpr64::r15 + ctx_off(offset_of!(Ctx, blocks)))));
        a!(a.lea(r9, ptr(r8 + r9)));
        // Another block in the first slot of the pair: the shared second try.
        let second = self.rt.second_way;
        a!(a.mov(rcx, qword_ptr(r9 + b_gpa)));
        a!(a.not(rcx));
        a!(a.lea(rcx, ptr(rcx + r11 + 1)));
        let mut gpa_ok = a.create_label();
        a!(a.jrcxz(gpa_ok));
        a!(a.jmp(second));
        a!(a.set_label(&mut gpa_ok));
        a!(a.mov(rcx, qword_ptr(r9 + b_ip)));
        a!(a.not(rcx));
        a!(a.lea(rcx, ptr(rcx + rax + 1)));
        let mut ip_ok = a.create_label();
        a!(a.jrcxz(ip_ok));
        a!(a.jmp(second));
        a!(a.set_label(&mut ip_ok));
        // Code of this block's bitness, page-crossing or not (such a block checks its
        // second page).
        a!(a.movzx(gpr32::ecx, byte_ptr(r9 + b_bits)));
        a!(a.mov(r8, 0x7fu64));
        a!(a.pext(rcx, rcx, r8));
        a!(a.lea(rcx, ptr(rcx - bits)));
        self.continue_if_rcx_zero(done)?;
        let a = &mut self.a;
        a!(a.mov(rcx, qword_ptr(r9 + b_epoch)));
        a!(a.not(rcx));
        a!(a.mov(r8, qword_ptr(gpr64::r15 + ctx_off(offset_of!(Ctx, epoch)))));
        a!(a.lea(rcx, ptr(rcx + r8 + 1)));
        self.continue_if_rcx_zero(done)?;
        let a = &mut self.a;
        a!(a.mov(rcx, qword_ptr(r9 + b_chain)));
        a!(a.jrcxz(done));
        jump_cache_fill(a)?;
        a!(a.jmp(rcx));
        Some(())
    }

    /// Loads guest register `g` into `host`, unless `host` is its own and holds it.
    fn load_guest(&mut self, host: Register, g: usize) -> Option<()> {
        let h = gpr_index(host)?;
        if h == g && self.cached.get(g) == Some(&true) {
            return Some(());
        }
        a!(self.a.mov(r64(host)?, qword_ptr(gpr64::r15 + gpr_off(g))));
        *self.cached.get_mut(h)? = h == g;
        Some(())
    }

    /// Stores `host` as guest register `g`'s new value.
    fn store_guest(&mut self, g: usize, host: Register) -> Option<()> {
        a!(self.a.mov(qword_ptr(gpr64::r15 + gpr_off(g)), r64(host)?));
        let h = gpr_index(host)?;
        *self.cached.get_mut(g)? = h == g;
        *self.cached.get_mut(h)? = h == g;
        Some(())
    }

    /// The emitted code wrote these host registers with something else.
    fn clobber(&mut self, regs: &[Register]) {
        for r in regs {
            if let Some(c) = gpr_index(*r).and_then(|h| self.cached.get_mut(h)) {
                *c = false;
            }
        }
    }

    /// `n` pool registers other than `except`, those holding no cached guest value first.
    fn scratch(&self, except: &[Register], n: usize) -> Option<Vec<Register>> {
        let mut regs: Vec<Register> = POOL
            .iter()
            .copied()
            .filter(|r| !except.contains(r))
            .collect();
        regs.sort_by_key(|r| gpr_index(*r).and_then(|h| self.cached.get(h).copied()));
        (regs.len() >= n).then(|| regs.into_iter().take(n).collect())
    }

    /// The host register that holds guest `g`, if it is `g`'s own and cached.
    fn cached_in(&self, g: usize) -> Option<Register> {
        if g == RSP || g == R15 || self.cached.get(g) != Some(&true) {
            return None;
        }
        POOL.iter().copied().find(|p| gpr_index(*p) == Some(g))
    }

    /// Computes a memory operand's effective address (without segment base) into `dst`,
    /// using only flag-free instructions; `s1`/`s2` are scratch.
    fn address(&mut self, m: &Mem, dst: Register, s1: Register, s2: Register) -> Option<()> {
        let d = r64(dst)?;
        let disp32 = i32::try_from(m.disp as i64).ok();
        // Base and index from their own registers where cached; the other one is loaded
        // into a scratch register that is not holding the first.
        let cached = [
            m.base.and_then(|g| self.cached_in(g)),
            m.index.and_then(|g| self.cached_in(g)),
        ];
        let mut spares = [s1, s2].into_iter().filter(|s| !cached.contains(&Some(*s)));
        let mut operand = |e: &mut Self,
                           g: Option<usize>,
                           c: Option<Register>|
         -> Option<Option<AsmRegister64>> {
            let Some(g) = g else { return Some(None) };
            let r = match c {
                Some(r) => r,
                None => {
                    let spare = spares.next()?;
                    e.load_guest(spare, g)?;
                    spare
                }
            };
            Some(Some(r64(r)?))
        };
        let base = operand(self, m.base, cached[0])?;
        let index = operand(self, m.index, cached[1])?;
        self.clobber(&[dst]);
        if m.wrap32 {
            // The low half of the 64-bit sum is the 32-bit one.
            let d32 = gpr32::get_gpr32(sized(dst, Register::EAX)?)?;
            let a = &mut self.a;
            match (base, index, disp32) {
                (Some(b), Some(i), Some(disp)) => a!(a.lea(d32, ptr(b + i * m.scale + disp))),
                (Some(b), None, Some(disp)) => a!(a.lea(d32, ptr(b + disp))),
                (None, Some(i), Some(disp)) => a!(a.lea(d32, ptr(i * m.scale + disp))),
                (None, None, _) => a!(a.mov(d32, m.disp as u32)),
                // 32-bit displacements always fit (see `cover::displacement`).
                _ => return None,
            }
            return Some(());
        }
        let a = &mut self.a;
        match (base, index, disp32) {
            (Some(b), Some(i), Some(disp)) => a!(a.lea(d, ptr(b + i * m.scale + disp))),
            (Some(b), None, Some(disp)) => a!(a.lea(d, ptr(b + disp))),
            (None, Some(i), Some(disp)) => a!(a.lea(d, ptr(i * m.scale + disp))),
            (None, None, Some(_)) | (None, None, None) => a!(a.mov(d, m.disp)),
            (b, i, None) => {
                // A displacement beyond 32 bits (an absolute address): add it to what exists.
                a!(a.mov(d, m.disp));
                if let Some(b) = b {
                    a!(a.lea(d, ptr(d + b)));
                }
                if let Some(i) = i {
                    a!(a.lea(d, ptr(d + i * m.scale)));
                }
            }
        }
        Some(())
    }

    fn miss_label(&mut self, resume: u32) -> CodeLabel {
        let l = self.a.create_label();
        self.misses.push((l, resume));
        l
    }

    /// `jrcxz` to go on, else to `miss`.
    fn continue_if_rcx_zero(&mut self, miss: CodeLabel) -> Option<()> {
        let mut ok = self.a.create_label();
        a!(self.a.jrcxz(ok));
        a!(self.a.jmp(miss));
        a!(self.a.set_label(&mut ok));
        Some(())
    }

    /// Translates the memory operand's linear address in `lin` through the soft TLB into a
    /// host pointer in `host`, or jumps to `miss`. Flag-free. Clobbers RCX and `scratch`.
    fn tlb(
        &mut self,
        m: &Mem,
        lin: Register,
        host: Register,
        scratch: [Register; 2],
        miss: CodeLabel,
    ) -> Option<()> {
        self.tlb_addend(m, lin, host, scratch, miss)?;
        let (host, lin) = (r64(host)?, r64(lin)?);
        a!(self.a.lea(host, ptr(host + lin)));
        Some(())
    }

    /// As `tlb`, but leaves in `host` the page's addend: the host pointer is `host + lin`,
    /// which an instruction can take as its memory operand, saving a step on the way to
    /// its data. Clobbers RCX and `scratch`.
    fn tlb_addend(
        &mut self,
        m: &Mem,
        lin: Register,
        host: Register,
        scratch: [Register; 2],
        miss: CodeLabel,
    ) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::rcx;
        // Two scratch registers (`host` serves as a third until its turn): the fewer this
        // clobbers, the more guest registers stay cached in the host's.
        let [ent, tmp] = scratch;
        self.clobber(&[Register::RCX, lin, host, ent, tmp]);
        let ent16 = gpr16::get_gpr16(sized(ent, Register::AX)?)?;
        let ent32 = gpr32::get_gpr32(sized(ent, Register::EAX)?)?;
        let [ent, tmp, host] = [r64(ent)?, r64(tmp)?, r64(host)?];
        let lin = r64(lin)?;
        let a = &mut self.a;
        if let Some(off) = m.seg_base {
            a!(a.mov(tmp, qword_ptr(gpr64::r15 + ctx_off(off))));
            a!(a.lea(lin, ptr(lin + tmp)));
        }
        // The slot is the page number's low 16 bits (see `mmu::TLB_SIZE`); a slot's tag
        // and addend are at [array + slot * 8] (see `mmu::JitView`).
        a!(a.rorx(ent, lin, 12));
        a!(a.movzx(ent32, ent16));
        let tags = if m.write {
            offset_of!(Ctx, write_tags)
        } else {
            offset_of!(Ctx, read_tags)
        };
        a!(a.mov(host, qword_ptr(gpr64::r15 + ctx_off(tags))));
        // The tag for this access at this privilege is the page number (complemented: see
        // `mmu::TlbEntry::tags`) only if the access is allowed and the page is RAM.
        // Compared with the page of the access's last byte: the entry sits in the slot of
        // the first byte's page, so a match also means that the access stays in that page.
        let page_mask = qword_ptr(gpr64::r15 + ctx_off(offset_of!(Ctx, page_mask)));
        if m.size > 1 {
            a!(a.lea(tmp, ptr(lin + (m.size as i32 - 1))));
            a!(a.pext(tmp, tmp, page_mask));
        } else {
            a!(a.pext(tmp, lin, page_mask));
        }
        a!(a.mov(rcx, qword_ptr(host + ent * 8)));
        a!(a.lea(rcx, ptr(rcx + tmp + 1)));
        self.continue_if_rcx_zero(miss)?;
        let a = &mut self.a;
        a!(a.mov(
            host,
            qword_ptr(gpr64::r15 + ctx_off(offset_of!(Ctx, addends)))
        ));
        a!(a.mov(host, qword_ptr(host + ent * 8)));
        Some(())
    }

    /// The memory operand of instruction `idx` as a host pointer in `host`: the address,
    /// the inline TLB lookup and, when `align` > 1, the alignment the instruction demands
    /// (a miss or a misaligned address leaves before the instruction; the interpreter then
    /// raises what it raises).
    fn memory_operand(&mut self, m: &Mem, idx: u32, host: Register, align: u64) -> Option<()> {
        let lin = *self.scratch(&[Register::RCX, host], 1)?.first()?;
        self.memory_operand_split(m, idx, host, lin, align)?;
        let (host, lin) = (r64(host)?, r64(lin)?);
        a!(self.a.lea(host, ptr(host + lin)));
        Some(())
    }

    /// As `memory_operand`, but leaves the host pointer as `host + lin`: the page's addend
    /// in `host`, the linear address in `lin` (which the caller keeps from the
    /// instruction's own registers).
    fn memory_operand_split(
        &mut self,
        m: &Mem,
        idx: u32,
        host: Register,
        lin: Register,
        align: u64,
    ) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::rcx;
        // The address step's scratch registers serve the lookup after it.
        let s = self.scratch(&[Register::RCX, host, lin], 2)?;
        let (b, i) = (*s.first()?, *s.get(1)?);
        self.address(m, lin, b, i)?;
        let miss = self.miss_label(idx);
        self.tlb_addend(m, lin, host, [b, i], miss)?;
        if align > 1 {
            // Host pages are page-aligned: the pointer's low bits are the address's.
            a!(self.a.mov(rcx, align - 1));
            a!(self.a.pext(rcx, r64(lin)?, rcx));
            self.continue_if_rcx_zero(miss)?;
        }
        Some(())
    }

    fn native(
        &mut self,
        ins: &Instruction,
        idx: u32,
        regs: Regs,
        info: &mut InstructionInfoFactory,
    ) -> Option<()> {
        let mut out = *ins;
        if let Some(m) = plan_mem(ins, info) {
            // Scratch for the address step: anything but RCX and the host pointer (the
            // instruction's own registers are loaded afterwards).
            // CMPXCHG16B is #GP unless 16-byte aligned (the host's would be SIGSEGV).
            let align = if ins.code() == Code::Cmpxchg16b_m128 {
                16
            } else {
                1
            };
            if regs.lin == Register::None {
                self.memory_operand(&m, idx, regs.host_ptr, align)?;
                at_host(&mut out, regs.host_ptr);
            } else {
                self.memory_operand_split(&m, idx, regs.host_ptr, regs.lin, align)?;
                at_host_plus(&mut out, regs.host_ptr, regs.lin);
            }
        }
        for g in 0..16 {
            if regs.load[g] {
                self.load_guest(regs.map[g], g)?;
            }
        }
        for k in 0..ins.op_count() {
            if ins.op_kind(k) == OpKind::Register {
                let r = ins.op_register(k);
                let host = regs.map[gpr_index(r)?];
                // AH..BH: `plan_regs` left them their own full registers.
                let r = if high_byte(r) {
                    (host == r.full_register()).then_some(r)?
                } else {
                    sized(host, r)?
                };
                out.set_op_register(k, r);
            }
        }
        if let Some(code) = short_inc_dec(out.code()) {
            out.set_code(code);
        }
        // IP 0: not a label (see `asm`).
        out.set_ip(0);
        a!(self.a.add_instruction(out));
        for g in 0..16 {
            if regs.store[g] {
                self.store_guest(g, regs.map[g])?;
            }
        }
        Some(())
    }

    /// Leaves before instruction `idx` unless the SIMD state the run loop found usable
    /// (`Ctx::simd`) has bit `bit`: the interpreter raises the #UD or #NM. Once per block,
    /// as nothing in compiled code changes CR0, CR4 or XCR0.
    fn simd_check(&mut self, bit: u64, idx: u32) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::rcx;
        if self.simd_checked & bit != 0 {
            return Some(());
        }
        self.simd_checked |= bit;
        let s = self.scratch(&[Register::RCX], 1)?;
        let mask = r64(*s.first()?)?;
        self.clobber(&[Register::RCX, *s.first()?]);
        let miss = self.miss_label(idx);
        let a = &mut self.a;
        a!(a.mov(rcx, qword_ptr(gpr64::r15 + ctx_off(offset_of!(Ctx, simd)))));
        a!(a.mov(mask, bit));
        a!(a.pext(rcx, rcx, mask));
        a!(a.not(rcx));
        a!(a.lea(rcx, ptr(rcx + 2)));
        self.continue_if_rcx_zero(miss)
    }

    /// Brings guest vector register `n` into host register `n` at `level` (1: bits 127:0,
    /// 2: all 256).
    fn load_vector(&mut self, n: usize, level: u8) -> Option<()> {
        if self.vcached[n] >= level {
            return Some(());
        }
        let (x, y) = (xmm_reg(n)?, ymm_reg(n)?);
        let a = &mut self.a;
        if host_avx() {
            a!(a.vmovdqu(x, xmmword_ptr(gpr64::r15 + xmm_off(n))));
            if level == 2 {
                a!(a.vinsertf128(y, y, xmmword_ptr(gpr64::r15 + ymm_hi_off(n)), 1));
            }
        } else {
            a!(a.movdqu(x, xmmword_ptr(gpr64::r15 + xmm_off(n))));
        }
        self.vcached[n] = level;
        Some(())
    }

    /// Stores host register `n` as guest vector register `n`: bits 127:0, and with `vex`
    /// bits 255:128 too (which a VEX instruction zeroed or wrote).
    fn store_vector(&mut self, n: usize, vex: bool) -> Option<()> {
        let (x, y) = (xmm_reg(n)?, ymm_reg(n)?);
        let a = &mut self.a;
        if host_avx() {
            a!(a.vmovdqu(xmmword_ptr(gpr64::r15 + xmm_off(n)), x));
        } else {
            a!(a.movdqu(xmmword_ptr(gpr64::r15 + xmm_off(n)), x));
        }
        if vex {
            a!(a.vextractf128(xmmword_ptr(gpr64::r15 + ymm_hi_off(n)), y, 1));
            self.vcached[n] = 2;
        } else {
            self.vcached[n] = self.vcached[n].max(1);
        }
        Some(())
    }

    /// An SSE/AVX instruction as itself: its vector registers in the host registers of the
    /// same numbers, its general registers and memory operand as for `native`, after the
    /// alignment check the instruction demands (a misaligned one leaves: #GP is the
    /// interpreter's).
    fn vector(
        &mut self,
        ins: &Instruction,
        idx: u32,
        regs: Regs,
        v: &crate::exec::hostexec::JitVector,
        info: &mut InstructionInfoFactory,
    ) -> Option<()> {
        self.simd_check(if v.vex { 2 } else { 1 }, idx)?;
        let mut out = *ins;
        if let Some(m) = plan_mem(ins, info) {
            self.memory_operand(&m, idx, regs.host_ptr, v.align)?;
            at_host(&mut out, regs.host_ptr);
        }
        for g in 0..16 {
            if regs.load[g] {
                self.load_guest(regs.map[g], g)?;
            }
        }
        for k in 0..ins.op_count() {
            if ins.op_kind(k) == OpKind::Register {
                let r = ins.op_register(k);
                if let Some(g) = gpr_index(r) {
                    out.set_op_register(k, sized(regs.map[g], r)?);
                }
            }
        }
        for n in 0..16 {
            if v.read[n] > 0 {
                self.load_vector(n, v.read[n])?;
            }
        }
        // IP 0: not a label (see `asm`).
        out.set_ip(0);
        a!(self.a.add_instruction(out));
        for g in 0..16 {
            if regs.store[g] {
                self.store_guest(g, regs.map[g])?;
            }
        }
        for n in 0..16 {
            if v.write & (1 << n) != 0 {
                self.store_vector(n, v.vex)?;
            }
        }
        Some(())
    }

    /// VZEROUPPER: the host's own, then the guest's bits 255:128 stored as zeroes (YMM0's,
    /// now zero).
    fn vzeroupper(&mut self, idx: u32) -> Option<()> {
        self.simd_check(2, idx)?;
        a!(self.a.vzeroupper());
        let y0 = ymm_reg(0)?;
        for n in 0..16 {
            a!(self
                .a
                .vextractf128(xmmword_ptr(gpr64::r15 + ymm_hi_off(n)), y0, 1));
            if self.vcached[n] == 1 {
                self.vcached[n] = 2;
            }
        }
        Some(())
    }

    /// BT/BTS/BTR/BTC m, r (64- or 32-bit): the operand lies at the address plus the
    /// offset's signed quotient by the operand width; the host instruction runs on that
    /// operand with the offset's remainder, LOCK and all.
    fn bit_mem(
        &mut self,
        ins: &Instruction,
        idx: u32,
        info: &mut InstructionInfoFactory,
    ) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::rcx;
        let mut m = plan_mem(ins, info)?;
        let wide = ins.op1_register().is_gpr64();
        m.size = if wide { 8 } else { 4 };
        let s = self.scratch(&[Register::RCX], 9)?;
        let (lin, b, i, off, host) = (*s.first()?, *s.get(1)?, *s.get(2)?, *s.get(3)?, *s.get(4)?);
        let scratch = [*s.get(5)?, *s.get(6)?];
        self.address(&m, lin, b, i)?;
        self.load_guest(off, gpr_index(ins.op1_register())?)?;
        self.clobber(&[off, Register::RCX]);
        let (l, o) = (r64(lin)?, r64(off)?);
        let a = &mut self.a;
        if !wide {
            a!(a.movsxd(o, gpr32::get_gpr32(sized(off, Register::EAX)?)?));
        }
        // lin += (offset >> log2(width)) * width / 8, with the sign.
        a!(a.mov(rcx, if wide { 6u64 } else { 5u64 }));
        a!(a.sarx(rcx, o, rcx));
        if wide {
            a!(a.lea(l, ptr(l + rcx * 8)));
        } else {
            a!(a.lea(l, ptr(l + rcx * 4)));
        }
        // The offset within the operand.
        a!(a.mov(rcx, if wide { 63u64 } else { 31u64 }));
        a!(a.pext(o, o, rcx));
        let miss = self.miss_label(idx);
        self.tlb(&m, lin, host, scratch, miss)?;
        let mut out = *ins;
        at_host(&mut out, host);
        out.set_op1_register(sized(off, ins.op1_register())?);
        // IP 0: not a label (see `asm`).
        out.set_ip(0);
        a!(self.a.add_instruction(out));
        Some(())
    }

    /// Unsigned DIV r/m64 or r/m32. Division by zero or a quotient that does not fit is
    /// #DE, which must reach the guest (on the host it would be SIGFPE): the code checks
    /// RDX < divisor (which covers zero) first and leaves for the interpreter otherwise.
    /// The check may clobber the flags, which DIV leaves undefined; the guest's flags are
    /// kept on the host stack meanwhile for the way out.
    fn div(
        &mut self,
        ins: &Instruction,
        idx: u32,
        info: &mut InstructionInfoFactory,
    ) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::{r8, rax, rcx, rdx, rsp};
        let wide = matches!(ins.code(), Code::Div_rm64 | Code::Idiv_rm64);
        let signed = matches!(ins.code(), Code::Idiv_rm64 | Code::Idiv_rm32);
        if let Some(m) = plan_mem(ins, info) {
            let s = self.scratch(&[Register::RCX, Register::RAX, Register::RDX], 8)?;
            let (host, lin, b, i) = (*s.first()?, *s.get(1)?, *s.get(2)?, *s.get(3)?);
            let scratch = [*s.get(4)?, *s.get(5)?];
            self.address(&m, lin, b, i)?;
            let miss = self.miss_label(idx);
            self.tlb(&m, lin, host, scratch, miss)?;
            let h = r64(host)?;
            if wide {
                a!(self.a.mov(rcx, qword_ptr(h)));
            } else {
                a!(self.a.mov(gpr32::ecx, dword_ptr(h)));
            }
            self.clobber(&[Register::RCX]);
        } else {
            let g = gpr_index(ins.op0_register())?;
            self.load_guest(Register::RCX, g)?;
        }
        self.load_guest(Register::RAX, 0)?;
        self.load_guest(Register::RDX, 2)?;
        let miss = self.miss_label(idx);
        let fault = self.a.create_label();
        let a = &mut self.a;
        a!(a.pushfq());
        if signed {
            let mut ok = a.create_label();
            if wide {
                a!(a.test(rcx, rcx));
                a!(a.jz(fault));
                a!(a.mov(r8, rax));
                a!(a.sar(r8, 63));
                a!(a.cmp(r8, rdx));
                a!(a.jne(fault));
                a!(a.cmp(rcx, -1));
                a!(a.jne(ok));
                a!(a.mov(r8, i64::MIN as u64));
                a!(a.cmp(rax, r8));
                a!(a.je(fault));
            } else {
                a!(a.test(gpr32::ecx, gpr32::ecx));
                a!(a.jz(fault));
                a!(a.mov(gpr32::r8d, gpr32::eax));
                a!(a.sar(gpr32::r8d, 31));
                a!(a.cmp(gpr32::r8d, gpr32::edx));
                a!(a.jne(fault));
                a!(a.cmp(gpr32::ecx, -1));
                a!(a.jne(ok));
                a!(a.cmp(gpr32::eax, i32::MIN));
                a!(a.je(fault));
            }
            a!(a.set_label(&mut ok));
        } else if wide {
            a!(a.cmp(rdx, rcx));
            a!(a.jae(fault));
        } else {
            a!(a.cmp(gpr32::edx, gpr32::ecx));
            a!(a.jae(fault));
        }
        a!(a.lea(rsp, ptr(rsp + 8)));
        match (signed, wide) {
            (false, true) => a!(a.div(rcx)),
            (false, false) => a!(a.div(gpr32::ecx)),
            (true, true) => a!(a.idiv(rcx)),
            (true, false) => a!(a.idiv(gpr32::ecx)),
        }
        self.clobber(&[Register::R8]);
        self.div_faults.push((fault, miss));
        self.store_guest(0, Register::RAX)?;
        self.store_guest(2, Register::RDX)
    }

    fn lea(&mut self, ins: &Instruction) -> Option<()> {
        let m = Mem {
            base: gpr_index(ins.memory_base()),
            index: gpr_index(ins.memory_index()),
            scale: ins.memory_index_scale(),
            disp: displacement(ins),
            seg_base: None,
            size: 0,
            write: false,
            wrap32: false,
        };
        let d = ins.op0_register();
        let g = gpr_index(d)?;
        // Straight into the destination's own register, where it stays cached.
        let dst = match g {
            RSP | R15 => Register::RAX,
            _ => *POOL.iter().find(|p| gpr_index(**p) == Some(g))?,
        };
        let s = self.scratch(&[dst], 2)?;
        self.address(&m, dst, *s.first()?, *s.get(1)?)?;
        if d.is_gpr32() {
            let d32 = gpr32::get_gpr32(sized(dst, d)?)?;
            a!(self.a.mov(d32, d32));
        }
        self.store_guest(g, dst)
    }

    /// Translates the 8-byte stack slot at the linear address in RDX into a host pointer in
    /// RBX (or leaves through the miss path of instruction `idx`).
    fn stack_slot(&mut self, write: bool, idx: u32) -> Option<()> {
        self.range_at_rdx(write, self.slot_size() as u32, idx)
    }

    /// A stack slot's size: 8 bytes, or 4 in 32-bit code.
    fn slot_size(&self) -> i32 {
        if self.bits == 32 {
            4
        } else {
            8
        }
    }

    /// RDX moved by `n` bytes as the stack pointer (or a string instruction's RSI/RDI)
    /// moves: wrapping at 4 GiB in 32-bit code (where RSP's upper half is clear: see
    /// `cover::kind32`).
    fn move_sp(&mut self, n: i32) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::rdx;
        if self.bits == 32 {
            a!(self.a.lea(gpr32::edx, ptr(rdx + n)));
        } else {
            a!(self.a.lea(rdx, ptr(rdx + n)));
        }
        Some(())
    }

    /// Stores R10 to the stack slot at RBX (its low half in 32-bit code).
    fn store_slot_r10(&mut self) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::{r10, rbx};
        if self.bits == 32 {
            a!(self.a.mov(dword_ptr(rbx), gpr32::r10d));
        } else {
            a!(self.a.mov(qword_ptr(rbx), r10));
        }
        Some(())
    }

    /// Loads `dst` from the stack slot at RBX (zero-extended in 32-bit code).
    fn load_slot(&mut self, dst: AsmRegister64) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::rbx;
        if self.bits == 32 {
            let d = if dst == gpr64::rax {
                gpr32::eax
            } else if dst == gpr64::r10 {
                gpr32::r10d
            } else {
                return None;
            };
            a!(self.a.mov(d, dword_ptr(rbx)));
        } else {
            a!(self.a.mov(dst, qword_ptr(rbx)));
        }
        Some(())
    }

    /// PUSH r64/imm: the value goes to RSP-8, then RSP moves (PUSH RSP pushes the old one).
    fn push(&mut self, ins: &Instruction, idx: u32) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::r10;
        self.load_guest(Register::RDX, RSP)?;
        self.move_sp(-self.slot_size())?;
        self.stack_slot(true, idx)?;
        if ins.op0_kind() == OpKind::Register {
            self.load_guest(Register::R10, gpr_index(ins.op0_register())?)?;
        } else {
            a!(self.a.mov(r10, ins.immediate(0)));
            self.clobber(&[Register::R10]);
        }
        self.store_slot_r10()?;
        self.store_guest(RSP, Register::RDX)
    }

    /// PUSH m64: the operand is read at its address before RSP moves, then pushed.
    fn push_mem(
        &mut self,
        ins: &Instruction,
        idx: u32,
        info: &mut InstructionInfoFactory,
    ) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::{r10, rbx, rdx};
        let mut m = plan_mem(ins, info)?;
        // The operand is only read (the write iced reports is the push).
        m.write = false;
        m.size = 8;
        self.memory_operand(&m, idx, Register::R10, 1)?;
        a!(self.a.mov(r10, qword_ptr(r10)));
        self.clobber(&[Register::R10]);
        self.load_guest(Register::RDX, RSP)?;
        a!(self.a.lea(rdx, ptr(rdx - 8)));
        self.stack_slot(true, idx)?;
        a!(self.a.mov(qword_ptr(rbx), r10));
        self.store_guest(RSP, Register::RDX)
    }

    /// PUSHFQ: the image is the host's status flags (the guest's, in compiled code) and
    /// the state's other flags, less RF and VM, which are never pushed. Flag-free: the
    /// masks are PEXT/PDEP pairs.
    fn push_flags(&mut self, idx: u32) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::{r10, r15, r8, r9, rbx, rdx};
        self.load_guest(Register::RDX, RSP)?;
        a!(self.a.lea(rdx, ptr(rdx - 8)));
        self.stack_slot(true, idx)?;
        let a = &mut self.a;
        a!(a.pushfq());
        a!(a.pop(r10));
        a!(a.mov(r8, RFLAGS_STATUS as u64));
        a!(a.pext(r10, r10, r8));
        a!(a.pdep(r10, r10, r8));
        a!(a.mov(r9, qword_ptr(r15 + rflags_off())));
        a!(a.mov(
            r8,
            !(RFLAGS_STATUS as u64 | crate::state::flags::RF | crate::state::flags::VM)
        ));
        a!(a.pext(r9, r9, r8));
        a!(a.pdep(r9, r9, r8));
        a!(a.lea(r10, ptr(r10 + r9)));
        a!(a.mov(qword_ptr(rbx), r10));
        self.clobber(&[Register::R8, Register::R9, Register::R10]);
        self.store_guest(RSP, Register::RDX)
    }

    /// CLI (`set` false) or STI: IF cleared or set in the state (flag-free: a PEXT/PDEP
    /// pair clears it, an LEA sets it; the status flags stay in the host's). Where CPL >
    /// IOPL it leaves for the interpreter, which raises #GP; so does an STI while an
    /// interrupt waits for IF (the interpreter then stops after the next instruction).
    fn set_if(&mut self, idx: u32, set: bool) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::{r15, rcx};
        let ok = if set {
            offset_of!(Ctx, sti_ok)
        } else {
            offset_of!(Ctx, cli_ok)
        };
        let miss = self.miss_label(idx);
        let a = &mut self.a;
        a!(a.mov(rcx, qword_ptr(r15 + ctx_off(ok))));
        a!(a.jrcxz(miss));
        if set {
            // Interrupts can be taken from here on: the blocks after this one check the
            // kick flag again (entered under CLI, they were given one that never rises).
            a!(a.mov(rcx, qword_ptr(r15 + ctx_off(offset_of!(Ctx, kick_armed)))));
            a!(a.mov(qword_ptr(r15 + ctx_off(offset_of!(Ctx, kick))), rcx));
        }
        self.clobber(&[Register::RCX]);
        self.set_state_flag(crate::state::flags::IF, set)
    }

    /// CLD/STD: DF in the state's RFLAGS (the host's DF stays clear; compiled string
    /// instructions and the interpreter read the state's). Flag-free.
    fn set_df(&mut self, set: bool) -> Option<()> {
        self.set_state_flag(crate::state::flags::DF, set)
    }

    /// Sets or clears `flag` (one bit) in the state's RFLAGS, flag-free (PEXT/PDEP clear
    /// it, an LEA sets it). Clobbers R8 and R9.
    fn set_state_flag(&mut self, flag: u64, set: bool) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::{r15, r8, r9};
        let a = &mut self.a;
        a!(a.mov(r8, qword_ptr(r15 + rflags_off())));
        a!(a.mov(r9, !flag));
        a!(a.pext(r8, r8, r9));
        a!(a.pdep(r8, r8, r9));
        if set {
            a!(a.lea(r8, ptr(r8 + i32::try_from(flag).ok()?)));
        }
        a!(a.mov(qword_ptr(r15 + rflags_off()), r8));
        self.clobber(&[Register::R8, Register::R9]);
        Some(())
    }

    /// RDTSC: EDX:EAX from the CPU's clock, read by a call of `cpu::jit_rdtsc` (Linux reads
    /// the TSC at every system call's exit, for its random kernel-stack offset; leaving
    /// for the interpreter there cost more than the call). The guest's registers are all
    /// in the state (stores are written through), so the call only costs the host
    /// registers' cached copies; the guest's status flags, which live in the host's, are
    /// saved around it. Where CR4.TSD forbids it, the interpreter raises the #GP.
    fn pause(&mut self, idx: u32) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::rcx;
        let miss = self.miss_label(idx);
        let a = &mut self.a;
        let pauses = qword_ptr(gpr64::r15 + ctx_off(offset_of!(Ctx, pauses)));
        let last = i64::from(crate::cpu::PAUSE_SPIN) - 1;
        // The guest's flags may live in the host's: LEA and JRCXZ leave them alone.
        a!(a.mov(rcx, pauses));
        a!(a.lea(rcx, ptr(rcx - last)));
        a!(a.jrcxz(miss));
        a!(a.lea(rcx, ptr(rcx + last + 1)));
        a!(a.mov(pauses, rcx));
        self.clobber(&[Register::RCX]);
        Some(())
    }

    fn rdtsc(&mut self, idx: u32, aux: bool) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::{rax, rcx, rdi, rdx, rsp};
        let miss = self.miss_label(idx);
        let a = &mut self.a;
        a!(a.mov(
            rcx,
            qword_ptr(gpr64::r15 + ctx_off(offset_of!(Ctx, rdtsc_ok)))
        ));
        a!(a.jrcxz(miss));
        // The call wants RSP 16-byte aligned, as it is here (see `runtime`): the flags'
        // 8 bytes and 8 more.
        a!(a.pushfq());
        a!(a.lea(rsp, ptr(rsp - 8)));
        a!(a.mov(rax, qword_ptr(gpr64::r15 + ctx_off(offset_of!(Ctx, rdtsc)))));
        a!(a.mov(rdi, qword_ptr(gpr64::r15 + ctx_off(offset_of!(Ctx, tsc)))));
        if host_avx() {
            // The callee's legacy SSE: no dirty upper state (the guest's is in the state).
            a!(a.vzeroupper());
        }
        a!(a.call(rax));
        a!(a.lea(rsp, ptr(rsp + 8)));
        a!(a.popfq());
        a!(a.mov(rcx, 32u64));
        a!(a.shrx(rdx, rax, rcx));
        a!(a.mov(gpr32::eax, gpr32::eax));
        // The SysV ABI's caller-saved registers: their cached guest values are gone.
        self.clobber(&[
            Register::RAX,
            Register::RCX,
            Register::RDX,
            Register::RSI,
            Register::RDI,
            Register::R8,
            Register::R9,
            Register::R10,
            Register::R11,
        ]);
        self.vcached = [0; 16];
        self.store_guest(0, Register::RAX)?;
        self.store_guest(2, Register::RDX)?;
        if aux {
            let at = (offset_of!(CpuState, msr) + offset_of!(crate::state::Msrs, tsc_aux)) as i32;
            a!(self.a.mov(gpr32::ecx, dword_ptr(gpr64::r15 + at)));
            self.store_guest(1, Register::RCX)?;
        }
        Some(())
    }

    /// SWAPGS at CPL0 (else the interpreter raises #GP): the GS base and KERNEL_GS_BASE
    /// trade places in the state, and the context's copy of the GS base follows.
    fn swapgs(&mut self, idx: u32) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::{r15, r8, r9, rcx};
        use std::mem::offset_of;
        let gs = (offset_of!(CpuState, seg)
            + crate::state::Seg::Gs as usize * std::mem::size_of::<crate::state::Segment>()
            + offset_of!(crate::state::Segment, base)) as i32;
        let kgs =
            (offset_of!(CpuState, msr) + offset_of!(crate::state::Msrs, kernel_gs_base)) as i32;
        let miss = self.miss_label(idx);
        let a = &mut self.a;
        a!(a.mov(rcx, qword_ptr(gpr64::r15 + ctx_off(offset_of!(Ctx, cpl0)))));
        a!(a.jrcxz(miss));
        a!(a.mov(r8, qword_ptr(r15 + gs)));
        a!(a.mov(r9, qword_ptr(r15 + kgs)));
        a!(a.mov(qword_ptr(r15 + gs), r9));
        a!(a.mov(qword_ptr(r15 + kgs), r8));
        a!(a.mov(
            qword_ptr(gpr64::r15 + ctx_off(offset_of!(Ctx, gs_base))),
            r9
        ));
        self.clobber(&[Register::RCX, Register::R8, Register::R9]);
        Some(())
    }

    /// Leaves for `miss` unless DF is clear and 1 <= RCX <= a page's worth of elements of
    /// 2^`shift` bytes; then R10 = RCX and R11 = the bytes they cover. Flag-free.
    fn rep_count(&mut self, shift: u64, miss: CodeLabel) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::{r10, r11, r8, rcx};
        self.df_clear_or(miss)?;
        // (count - 1) >> (12 - shift) == 0.
        self.load_guest(Register::R10, 1)?;
        let a = &mut self.a;
        a!(a.lea(rcx, ptr(r10 - 1)));
        a!(a.mov(r8, 12 - shift));
        a!(a.shrx(rcx, rcx, r8));
        self.continue_if_rcx_zero(miss)?;
        let a = &mut self.a;
        a!(a.mov(r8, shift));
        a!(a.shlx(r11, r10, r8));
        self.clobber(&[Register::R11]);
        Some(())
    }

    /// Leaves for `miss` unless guest register `g`..+R11 lies in one page; leaves `g` in
    /// RDX. Flag-free.
    fn one_page_at(&mut self, g: usize, miss: CodeLabel) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::{r11, r8, r9, rcx, rdx};
        self.load_guest(Register::RDX, g)?;
        let a = &mut self.a;
        a!(a.lea(r9, ptr(rdx + r11 - 1)));
        a!(a.mov(r8, 12u64));
        a!(a.shrx(r9, r9, r8));
        a!(a.shrx(rcx, rdx, r8));
        a!(a.not(rcx));
        a!(a.lea(rcx, ptr(rcx + r9 + 1)));
        self.clobber(&[Register::R9, Register::R8, Register::RCX]);
        self.continue_if_rcx_zero(miss)
    }

    /// Leaves for `miss` unless DF is clear. Flag-free.
    fn df_clear_or(&mut self, miss: CodeLabel) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::{r15, r8, r9, rcx};
        let a = &mut self.a;
        a!(a.mov(r8, qword_ptr(r15 + rflags_off())));
        a!(a.mov(r9, crate::state::flags::DF));
        a!(a.pext(rcx, r8, r9));
        self.clobber(&[Register::RCX, Register::R8, Register::R9]);
        self.continue_if_rcx_zero(miss)
    }

    /// Guest register `g` as an address (a string instruction's, or ESP from EBP), in
    /// RDX: its low half in 32-bit code.
    fn address_in_rdx(&mut self, g: usize) -> Option<()> {
        self.load_guest(Register::RDX, g)?;
        if self.bits == 32 {
            a!(self.a.mov(gpr32::edx, gpr32::edx));
        }
        Some(())
    }

    /// Guest register `g` moved on by `n` (as a string instruction moves RSI or RDI with
    /// DF clear: wrapping at 4 GiB in 32-bit code). Clobbers RDX.
    fn string_advance(&mut self, g: usize, n: i32) -> Option<()> {
        self.load_guest(Register::RDX, g)?;
        self.move_sp(n)?;
        self.clobber(&[Register::RDX]);
        self.store_guest(g, Register::RDX)
    }

    /// One MOVS with DF clear, its source and destination each in the TLB as one page
    /// (else it leaves for the interpreter before the instruction).
    fn movs(&mut self, ins: &Instruction, idx: u32) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::{r8, rax, rbx};
        let size = ins.memory_size().size() as u32;
        let miss = self.miss_label(idx);
        self.df_clear_or(miss)?;
        self.address_in_rdx(6)?;
        self.range_at_rdx(false, size, idx)?;
        a!(self.a.mov(rax, rbx));
        self.clobber(&[Register::RAX]);
        self.address_in_rdx(7)?;
        self.range_at_rdx(true, size, idx)?;
        let a = &mut self.a;
        match size {
            1 => {
                a!(a.movzx(gpr32::r8d, byte_ptr(rax)));
                a!(a.mov(byte_ptr(rbx), gpr8::r8b));
            }
            2 => {
                a!(a.movzx(gpr32::r8d, word_ptr(rax)));
                a!(a.mov(word_ptr(rbx), gpr16::r8w));
            }
            4 => {
                a!(a.mov(gpr32::r8d, dword_ptr(rax)));
                a!(a.mov(dword_ptr(rbx), gpr32::r8d));
            }
            8 => {
                a!(a.mov(r8, qword_ptr(rax)));
                a!(a.mov(qword_ptr(rbx), r8));
            }
            _ => return None,
        }
        self.clobber(&[Register::R8, Register::RBX]);
        self.string_advance(6, size as i32)?;
        self.string_advance(7, size as i32)
    }

    /// One STOS with DF clear, its destination in the TLB as one page.
    fn stos(&mut self, ins: &Instruction, idx: u32) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::{rax, rbx};
        let size = ins.memory_size().size() as u32;
        let miss = self.miss_label(idx);
        self.df_clear_or(miss)?;
        self.address_in_rdx(7)?;
        self.range_at_rdx(true, size, idx)?;
        self.load_guest(Register::RAX, 0)?;
        let a = &mut self.a;
        match size {
            1 => a!(a.mov(byte_ptr(rbx), gpr8::al)),
            2 => a!(a.mov(word_ptr(rbx), gpr16::ax)),
            4 => a!(a.mov(dword_ptr(rbx), gpr32::eax)),
            8 => a!(a.mov(qword_ptr(rbx), rax)),
            _ => return None,
        }
        self.clobber(&[Register::RBX]);
        self.string_advance(7, size as i32)
    }

    /// REP MOVSB/MOVSQ (`memcpy`, `copy_user`) whose source and destination each lie in
    /// one page, with DF clear and RCX > 0: a TLB lookup per page, then the host's own REP
    /// MOVS on the host pointers (overlap behaves as the guest's would: the host pointers
    /// alias where guest-physical pages do). Anything else leaves for the interpreter.
    fn rep_movs(&mut self, ins: &Instruction, idx: u32) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::{r10, r11, rax, rbx, rcx, rdi, rdx, rsi};
        let shift: u64 = match ins.code() {
            Code::Movsb_m8_m8 => 0,
            Code::Movsq_m64_m64 => 3,
            _ => return None,
        };
        let miss = self.miss_label(idx);
        self.rep_count(shift, miss)?;
        self.one_page_at(7, miss)?;
        self.one_page_at(6, miss)?;
        // RDX = guest RSI: the source's page, kept in RAX.
        self.range_at_rdx(false, 1, idx)?;
        a!(self.a.mov(rax, rbx));
        self.clobber(&[Register::RAX]);
        self.load_guest(Register::RDX, 7)?;
        self.range_at_rdx(true, 1, idx)?;
        let a = &mut self.a;
        a!(a.mov(rsi, rax));
        a!(a.mov(rdi, rbx));
        a!(a.mov(rcx, r10));
        if shift == 0 {
            a!(a.rep().movsb());
        } else {
            a!(a.rep().movsq());
        }
        self.clobber(&[Register::RSI, Register::RDI, Register::RBX, Register::R10]);
        // RCX is 0 now, as the guest's; RSI and RDI move by the bytes copied.
        self.store_guest(1, Register::RCX)?;
        self.load_guest(Register::RDX, 7)?;
        a!(self.a.lea(rdx, ptr(rdx + r11)));
        self.store_guest(7, Register::RDX)?;
        self.load_guest(Register::RDX, 6)?;
        a!(self.a.lea(rdx, ptr(rdx + r11)));
        self.store_guest(6, Register::RDX)?;
        self.clobber(&[Register::R11]);
        Some(())
    }

    /// REP STOSB/STOSQ (`memset`, Linux's `clear_page`) whose bytes lie in one page, with
    /// DF clear and RCX > 0: one TLB lookup for the page, then the host's own REP STOS on
    /// the host pointer; RDI moves on and RCX ends at 0. Anything else leaves for the
    /// interpreter, before the instruction. Flag-free, like the rest.
    fn rep_stos(&mut self, ins: &Instruction, idx: u32) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::{r10, r11, rbx, rcx, rdi, rdx};
        let shift: u64 = match ins.code() {
            Code::Stosb_m8_AL => 0,
            Code::Stosq_m64_RAX => 3,
            _ => return None,
        };
        let miss = self.miss_label(idx);
        self.rep_count(shift, miss)?;
        // RDX = guest RDI: the first byte's page, which holds them all.
        self.one_page_at(7, miss)?;
        self.range_at_rdx(true, 1, idx)?;
        self.load_guest(Register::RAX, 0)?;
        let a = &mut self.a;
        a!(a.mov(rdi, rbx));
        a!(a.mov(rcx, r10));
        if shift == 0 {
            a!(a.rep().stosb());
        } else {
            a!(a.rep().stosq());
        }
        // RCX is 0 now, as the guest's; RDI moves by the bytes stored.
        a!(a.lea(rdx, ptr(rdx + r11)));
        self.clobber(&[Register::RDI, Register::RBX, Register::R10, Register::R11]);
        self.store_guest(1, Register::RCX)?;
        self.store_guest(7, Register::RDX)
    }

    /// PUSHes of registers other than RSP, or immediates: the whole range below RSP is
    /// translated once, then filled. A range that is not in the TLB as one page (it
    /// crosses a page end, which a function's frame does at the same call depth every
    /// time) takes the PUSHes one by one instead of leaving.
    fn push_run(&mut self, pushes: &[Insn], idx: u32) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::{r10, rbx, rdx};
        let k = pushes.len() as i32;
        self.load_guest(Register::RDX, RSP)?;
        a!(self.a.lea(rdx, ptr(rdx - 8 * k)));
        let mut split = self.a.create_label();
        self.range_at_rdx_or(true, 8 * k as u32, split)?;
        let at_split = self.cached;
        for (j, p) in pushes.iter().enumerate() {
            let ins = &p.instr;
            if ins.op0_kind() == OpKind::Register {
                self.load_guest(Register::R10, gpr_index(ins.op0_register())?)?;
            } else {
                a!(self.a.mov(r10, ins.immediate(0)));
                self.clobber(&[Register::R10]);
            }
            a!(self.a.mov(qword_ptr(rbx + 8 * (k - 1 - j as i32)), r10));
        }
        self.store_guest(RSP, Register::RDX)?;
        let mut join = self.a.create_label();
        a!(self.a.jmp(join));
        let fast = self.cached;
        a!(self.a.set_label(&mut split));
        self.cached = at_split;
        for (j, p) in pushes.iter().enumerate() {
            self.push(&p.instr, idx + j as u32)?;
        }
        self.join(&mut join, fast)
    }

    /// Binds `join`, where a path that left with host registers holding `other` meets
    /// this one: only what both hold stays cached.
    fn join(&mut self, join: &mut CodeLabel, other: [bool; 16]) -> Option<()> {
        for (c, o) in self.cached.iter_mut().zip(other) {
            *c &= o;
        }
        a!(self.a.set_label(join));
        // One label per instruction: the next one may come with its own.
        a!(self.a.nop());
        Some(())
    }

    /// POPs into registers other than RSP, and the block's final RET after them if `ret`:
    /// one translation of the range, and the return address checked, before anything is
    /// written. A range that is not in the TLB as one page takes them one by one.
    fn pop_run(&mut self, pops: &[Insn], idx: u32, ret: Option<&Instruction>) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::{r10, rax, rbx, rdx};
        let k = pops.len() as i32;
        let total = 8 * (k + i32::from(ret.is_some()));
        self.load_guest(Register::RDX, RSP)?;
        let mut split = self.a.create_label();
        self.range_at_rdx_or(false, total as u32, split)?;
        let at_split = self.cached;
        if ret.is_some() {
            a!(self.a.mov(rax, qword_ptr(rbx + 8 * k)));
            self.canonical_rax(idx)?;
        }
        for (j, p) in pops.iter().enumerate() {
            a!(self.a.mov(r10, qword_ptr(rbx + 8 * j as i32)));
            self.store_guest(gpr_index(p.instr.op0_register())?, Register::R10)?;
        }
        let pop = total + ret.map_or(0, |r| i32::from(r.immediate16()));
        a!(self.a.lea(rdx, ptr(rdx + pop)));
        self.store_guest(RSP, Register::RDX)?;
        let mut join = self.a.create_label();
        if ret.is_some() {
            // RAX survives the stores above (they use R10 and RDX).
            self.store_rip_from_rax()?;
            let from = ret.map_or(0, Instruction::ip);
            self.look_up_and_go(Dir::From(from))?;
        } else {
            a!(self.a.jmp(join));
        }
        let fast = self.cached;
        a!(self.a.set_label(&mut split));
        self.cached = at_split;
        for (j, p) in pops.iter().enumerate() {
            self.pop(&p.instr, idx + j as u32)?;
        }
        match ret {
            Some(r) => self.ret(r, idx + k as u32),
            None => self.join(&mut join, fast),
        }
    }

    /// Translates `size` bytes at the linear address in RDX (stack slots, a string
    /// instruction's range) into a host pointer in RBX (or leaves through the miss path of
    /// instruction `idx`).
    fn range_at_rdx(&mut self, write: bool, size: u32, idx: u32) -> Option<()> {
        let miss = self.miss_label(idx);
        self.range_at_rdx_or(write, size, miss)
    }

    /// `range_at_rdx`, going to `miss` when the range is not in the TLB as one page.
    fn range_at_rdx_or(&mut self, write: bool, size: u32, miss: CodeLabel) -> Option<()> {
        let m = Mem {
            base: None,
            index: None,
            scale: 1,
            disp: 0,
            seg_base: None,
            size,
            write,
            wrap32: false,
        };
        let scratch = [Register::RSI, Register::RDI];
        self.tlb(&m, Register::RDX, Register::RBX, scratch, miss)
    }

    /// POP r64: RSP moves first, so POP RSP leaves the popped value.
    fn pop(&mut self, ins: &Instruction, idx: u32) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::r10;
        self.load_guest(Register::RDX, RSP)?;
        self.stack_slot(false, idx)?;
        self.load_slot(r10)?;
        self.clobber(&[Register::R10]);
        self.move_sp(self.slot_size())?;
        self.store_guest(RSP, Register::RDX)?;
        self.store_guest(gpr_index(ins.op0_register())?, Register::R10)
    }

    /// LEAVE: RSP = RBP, then POP RBP.
    fn leave(&mut self, idx: u32) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::r10;
        // ESP = EBP (RSP's upper half stays clear in 32-bit code).
        self.address_in_rdx(5)?;
        self.stack_slot(false, idx)?;
        self.load_slot(r10)?;
        self.clobber(&[Register::R10]);
        self.move_sp(self.slot_size())?;
        self.store_guest(RSP, Register::RDX)?;
        self.store_guest(5, Register::R10)
    }

    /// CALL rel32 ending the block: push the return address, go to the target.
    fn call(&mut self, ins: &Instruction, idx: u32) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::r10;
        self.load_guest(Register::RDX, RSP)?;
        self.move_sp(-self.slot_size())?;
        self.stack_slot(true, idx)?;
        a!(self.a.mov(r10, ins.next_ip()));
        self.clobber(&[Register::R10]);
        self.store_slot_r10()?;
        self.store_guest(RSP, Register::RDX)?;
        self.go_to(ins.near_branch_target(), ins.ip())
    }

    /// RET [imm16] ending the block. A non-canonical return address is left to the
    /// interpreter (it raises #GP on the RET).
    fn ret(&mut self, ins: &Instruction, idx: u32) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::rax;
        self.load_guest(Register::RDX, RSP)?;
        self.stack_slot(false, idx)?;
        self.load_slot(rax)?;
        self.clobber(&[Register::RAX]);
        if self.bits == 64 {
            self.canonical_rax(idx)?;
        }
        self.move_sp(self.slot_size() + i32::from(ins.immediate16()))?;
        self.store_guest(RSP, Register::RDX)?;
        self.store_rip_from_rax()?;
        self.look_up_and_go(Dir::From(ins.ip()))
    }

    /// Leaves before instruction `idx` unless RAX is canonical (the interpreter raises
    /// the #GP). Clobbers RCX and RSI.
    fn canonical_rax(&mut self, idx: u32) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::{rax, rcx, rsi};
        let miss = self.miss_label(idx);
        let a = &mut self.a;
        a!(a.mov(rsi, 16u64));
        a!(a.shlx(rcx, rax, rsi));
        a!(a.sarx(rcx, rcx, rsi));
        a!(a.not(rcx));
        a!(a.lea(rcx, ptr(rcx + rax + 1)));
        self.clobber(&[Register::RCX, Register::RSI]);
        self.continue_if_rcx_zero(miss)
    }

    /// JMP or CALL r/m64 ending the block: the target is read (a register, or memory
    /// through the TLB) and checked, CALL pushes the return address, and the code goes on
    /// through the block cache as after a RET. Nothing is written before every check that
    /// can leave for the interpreter has passed.
    fn indirect(
        &mut self,
        ins: &Instruction,
        idx: u32,
        call: bool,
        info: &mut InstructionInfoFactory,
    ) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::{r10, rax, rbx, rdx};
        if let Some(mut m) = plan_mem(ins, info) {
            // The operand is only read (the write iced reports is CALL's push).
            m.write = false;
            let s = self.scratch(&[Register::RCX, Register::RAX], 8)?;
            let (host, lin, b, i) = (*s.first()?, *s.get(1)?, *s.get(2)?, *s.get(3)?);
            let scratch = [*s.get(4)?, *s.get(5)?];
            self.address(&m, lin, b, i)?;
            let miss = self.miss_label(idx);
            self.tlb(&m, lin, host, scratch, miss)?;
            a!(self.a.mov(rax, qword_ptr(r64(host)?)));
            self.clobber(&[Register::RAX]);
        } else {
            self.load_guest(Register::RAX, gpr_index(ins.op0_register())?)?;
        }
        self.canonical_rax(idx)?;
        if call {
            self.load_guest(Register::RDX, RSP)?;
            a!(self.a.lea(rdx, ptr(rdx - 8)));
            self.stack_slot(true, idx)?;
            a!(self.a.mov(r10, ins.next_ip()));
            a!(self.a.mov(qword_ptr(rbx), r10));
            self.store_guest(RSP, Register::RDX)?;
        }
        // RAX survives both (they use RCX and RDX).
        self.store_rip_from_rax()?;
        self.look_up_and_go(Dir::From(ins.ip()))
    }

    /// The block's final near `Jcc`/`JMP`.
    fn branch(&mut self, ins: &Instruction) -> Option<()> {
        let target = ins.near_branch_target();
        if ins.is_jcc_short_or_near() {
            let mut taken = self.a.create_label();
            let a = &mut self.a;
            match ins.condition_code() {
                ConditionCode::o => a!(a.jo(taken)),
                ConditionCode::no => a!(a.jno(taken)),
                ConditionCode::b => a!(a.jb(taken)),
                ConditionCode::ae => a!(a.jae(taken)),
                ConditionCode::e => a!(a.je(taken)),
                ConditionCode::ne => a!(a.jne(taken)),
                ConditionCode::be => a!(a.jbe(taken)),
                ConditionCode::a => a!(a.ja(taken)),
                ConditionCode::s => a!(a.js(taken)),
                ConditionCode::ns => a!(a.jns(taken)),
                ConditionCode::p => a!(a.jp(taken)),
                ConditionCode::np => a!(a.jnp(taken)),
                ConditionCode::l => a!(a.jl(taken)),
                ConditionCode::ge => a!(a.jge(taken)),
                ConditionCode::le => a!(a.jle(taken)),
                ConditionCode::g => a!(a.jg(taken)),
                ConditionCode::None => return None,
            }
            self.go_to(ins.next_ip(), ins.ip())?;
            a!(self.a.set_label(&mut taken));
        }
        self.go_to(target, ins.ip())
    }

    /// Flag-free.
    fn store_rip_from_rax(&mut self) -> Option<()> {
        use iced_x86::code_asm::registers::gpr64::rax;
        a!(self
            .a
            .mov(qword_ptr(gpr64::r15 + ctx_off(offset_of!(Ctx, rip))), rax));
        Some(())
    }

    /// The exits, to the shared ones: before instruction ESI (naming this block) or
    /// after the block. Then the miss paths and the link slots.
    fn finish(mut self, at: u64, asm: &mut Asm) -> Option<Translated> {
        let a = &mut self.a;
        a!(a.set_label(&mut self.exit));
        let slot = Instruction::with2(Code::Mov_r64_rm64, Register::R8, record(RECORD_SLOT));
        a!(a.add_instruction(a!(slot)));
        a!(a.jmp(self.rt.exit));
        a!(a.set_label(&mut self.done));
        a!(a.jmp(self.rt.done));
        for (mut l, miss) in std::mem::take(&mut self.div_faults) {
            a!(self.a.set_label(&mut l));
            a!(self.a.popfq());
            a!(self.a.jmp(miss));
        }
        for (mut l, resume) in std::mem::take(&mut self.misses) {
            a!(self.a.set_label(&mut l));
            a!(self.a.mov(gpr32::esi, resume));
            a!(self.a.jmp(self.exit));
        }
        let links = std::mem::take(&mut self.links);
        let mut code = Vec::new();
        let offsets = asm.assemble(self.a.instructions(), at, &mut code)?;
        let addr = |i: usize| Some(at + u64::from(*offsets.get(i)?));
        let mut t = Translated {
            chain_entry: addr(self.chain_entry_at)?,
            entry: addr(self.body_at)?,
            links: Vec::with_capacity(links.len()),
            code: Vec::new(),
        };
        for &(stub_at, forward) in &links {
            t.links.push((addr(stub_at)?, forward));
        }
        t.code = code;
        Some(t)
    }
}
