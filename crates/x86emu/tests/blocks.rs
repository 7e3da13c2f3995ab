//! The block engine (`Cpu::run`: decoded blocks, chaining, flags skipped where dead) against
//! the one-instruction path (`execute_one`, which the differential tests check against the
//! host CPU): random straight-line code must leave the same registers and flags.

mod common;

use common::*;
use iced_x86::code_asm::*;
use x86emu::{NoDevices, RunExit};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const R64: [AsmRegister64; 10] = [rax, rbx, rcx, rdx, rsi, rdi, r8, r9, r10, r12];
const R32: [AsmRegister32; 10] = [eax, ebx, ecx, edx, esi, edi, r8d, r9d, r10d, r12d];
const R8: [AsmRegister8; 10] = [al, bl, cl, dl, sil, dil, r8b, r9b, r10b, r12b];
/// Their indices in the register file.
const GPR: [usize; 10] = [0, 3, 1, 2, 6, 7, 8, 9, 10, 12];

/// Emits one random instruction from the forms the block engine treats specially (flag
/// writers and readers, register-only forms, memory accesses through r15 = DATA).
fn random_instruction(a: &mut CodeAssembler, r: &mut Rng) {
    let d = r.below(10) as usize;
    let s = r.below(10) as usize;
    let imm = r.next() as i32;
    let count = [0u32, 1, 5, 31, 32, 33, 63, 64, 70][r.below(9) as usize];
    match r.below(50) {
        0 => a.add(R64[d], R64[s]).unwrap(),
        1 => a.sub(R32[d], R32[s]).unwrap(),
        2 => a.and(R64[d], imm).unwrap(),
        3 => a.or(R32[d], R32[s]).unwrap(),
        4 => a.xor(R64[d], R64[s]).unwrap(),
        5 => a.adc(R64[d], R64[s]).unwrap(),
        6 => a.sbb(R32[d], imm).unwrap(),
        7 => a.cmp(R64[d], R64[s]).unwrap(),
        8 => a.test(R32[d], R32[s]).unwrap(),
        9 => a.inc(R64[d]).unwrap(),
        10 => a.dec(R32[d]).unwrap(),
        11 => a.shl(R64[d], count).unwrap(),
        12 => a.shr(R32[d], count).unwrap(),
        13 => a.sar(R64[d], count).unwrap(),
        14 => a.rol(R32[d], count).unwrap(),
        15 => a.ror(R64[d], count).unwrap(),
        16 => a.imul_2(R64[d], R64[s]).unwrap(),
        17 => a.imul_3(R32[d], R32[s], imm).unwrap(),
        18 => a.setb(R8[d]).unwrap(),
        19 => a.cmovo(R64[d], R64[s]).unwrap(),
        20 => a.lea(R64[d], qword_ptr(R64[s] + R64[d] * 2 + 8)).unwrap(),
        21 => a
            .mov(R64[d], qword_ptr(r15 + (r.below(64) * 8) as i32))
            .unwrap(),
        22 => a
            .add(qword_ptr(r15 + (r.below(64) * 8) as i32), R64[s])
            .unwrap(),
        24 => a.mul(R64[s]).unwrap(),
        25 => a.neg(R32[d]).unwrap(),
        26 => a.not(R64[d]).unwrap(),
        27 => a.movzx(R32[d], R8[s]).unwrap(),
        28 => a.movsx(R64[d], R8[s]).unwrap(),
        29 => a.bt(R64[d], R64[s]).unwrap(),
        30 => a.xchg(R64[d], R64[s]).unwrap(),
        31 => a.cqo().unwrap(),
        32 => a.bswap(R32[d]).unwrap(),
        33 => a.shld(R64[d], R64[s], count).unwrap(),
        34 => a
            .mov(byte_ptr(r15 + (0x100 + r.below(8)) as i32), R8[s])
            .unwrap(),
        35 => a
            .sub(dword_ptr(r15 + (0x100 + r.below(2) * 4) as i32), imm)
            .unwrap(),
        36 => a
            .movsxd(R64[d], dword_ptr(r15 + (r.below(64) * 4) as i32))
            .unwrap(),
        37 => a.imul(R64[s]).unwrap(),
        38 => a.shr(R64[d], cl).unwrap(),
        39 => a.mov(qword_ptr(rsp - 8), R64[s]).unwrap(),
        42 => a.push(R64[s]).unwrap(),
        45 => a
            .lock()
            .xadd(qword_ptr(r15 + 0x100 + (r.below(2) * 8) as i32), R64[s])
            .unwrap(),
        46 => a.lock().cmpxchg(qword_ptr(r15 + 0x100), R64[s]).unwrap(),
        47 => a.cmpxchg(R32[d], R32[s]).unwrap(),
        48 => a.lock().add(dword_ptr(r15 + 0x104), imm).unwrap(),
        43 => a.pop(R64[d]).unwrap(),
        44 => a.push(imm).unwrap(),
        40 => a.add(R64[d], qword_ptr(rsp - 8)).unwrap(),
        // GS has base DATA.
        41 => a.xor(R64[d], qword_ptr(r.below(64) * 8).gs()).unwrap(),
        _ => a.mov(R32[d], R32[s]).unwrap(),
    }
}

fn guest_with(code: &[u8], regs: &[u64; 10], flags: u64) -> Guest {
    let mut g = Guest::new();
    g.load(CODE, code);
    let data: Vec<u8> = (0..512u32).map(|i| (i * 37 + 11) as u8).collect();
    g.load(DATA, &data);
    let mut s = g.cpu.state().clone();
    for (i, idx) in GPR.iter().enumerate() {
        s.gpr[*idx] = regs[i];
    }
    s.gpr[15] = DATA;
    s.seg[x86emu::state::Seg::Gs as usize].base = DATA;
    s.rflags = (s.rflags & !0x8d5) | (flags & 0x8d5);
    // Start with code that touches the data and stack pages, so that the TLB holds them
    // and compiled code runs its memory accesses instead of leaving at the first one.
    let warm = CODE + 0x800;
    g.load(
        warm,
        &asm(64, warm, |a| {
            a.push(qword_ptr(r15)).unwrap();
            a.pop(qword_ptr(r15)).unwrap();
            a.push(qword_ptr(r15 + 0x100)).unwrap();
            a.pop(qword_ptr(r15 + 0x100)).unwrap();
            a.jmp(CODE).unwrap();
        }),
    );
    s.rip = warm;
    g.cpu.set_state(s);
    g
}

#[test]
fn blocks_match_single_steps_on_random_straight_line_code() {
    random_code_matches_single_steps(None, 0x9e37_79b9_7f4a_7c15);
}

#[test]
fn compiled_blocks_match_single_steps_on_random_straight_line_code() {
    random_code_matches_single_steps(Some(0), 0x2545_f491_4f6c_dd1d);
}

/// Runs random code through the block engine (compiling every block at once if `jit` is
/// `Some(0)`, interpreting only if None) and through single steps, and compares.
fn random_code_matches_single_steps(jit: Option<u32>, seed: u64) {
    let mut r = Rng(seed);
    let mut compared = 0;
    for case in 0..600 {
        let len = 5 + r.below(40);
        let mut seed = Rng(r.next() | 1);
        let code = asm(64, CODE, |a| {
            for _ in 0..len {
                random_instruction(a, &mut seed);
                if seed.below(10) == 0 {
                    // A taken-or-not branch to the next instruction splits the block.
                    let mut next = a.create_label();
                    a.jz(next).unwrap();
                    a.set_label(&mut next).unwrap();
                    a.nop().unwrap();
                }
            }
            a.hlt().unwrap();
        });
        let regs: [u64; 10] = std::array::from_fn(|_| r.next());
        let flags = r.next();
        // Compiled code runs instructions on the host CPU, whose undefined flags need not be
        // the interpreter's: programs that read one are not comparable, and the final
        // flags are compared where defined.
        let mut undefined = 0;
        if jit.is_some() {
            match undefined_flags(&code) {
                Some(u) => undefined = u,
                None => continue,
            }
            compared += 1;
        }

        let mut blocks = guest_with(&code, &regs, flags);
        blocks.cpu.set_jit_threshold(jit);
        assert_eq!(
            blocks.cpu.run(&mut NoDevices, 10_000),
            RunExit::Halted,
            "case {case}"
        );
        if jit.is_some() {
            assert!(
                blocks.cpu.compiled_blocks() > 0,
                "case {case}: nothing compiled"
            );
        }

        let mut steps = guest_with(&code, &regs, flags);
        for _ in 0..10_000 {
            if steps.cpu.is_halted() {
                break;
            }
            steps.cpu.execute_one(&mut NoDevices).expect("no faults");
        }
        assert!(steps.cpu.is_halted());

        let (b, s) = (blocks.cpu.state(), steps.cpu.state());
        assert_eq!(b.gpr, s.gpr, "case {case}: registers differ");
        let defined = 0x8d5 & !undefined;
        assert_eq!(
            b.rflags & defined,
            s.rflags & defined,
            "case {case}: status flags differ"
        );
        assert_eq!(
            blocks.read_u64(DATA + 0x100),
            steps.read_u64(DATA + 0x100),
            "case {case}: memory differs"
        );
        let stack = b.gpr[4] - 8;
        assert_eq!(
            blocks.read_u64(stack),
            steps.read_u64(stack),
            "case {case}: stack differs"
        );
    }
    if jit.is_some() {
        assert!(compared >= 100, "only {compared} comparable programs");
    }
}

/// The status flags (RFLAGS bits) left undefined at the end of straight-line `code`, or
/// None if an instruction reads a flag an earlier one left undefined.
fn undefined_flags(code: &[u8]) -> Option<u64> {
    use iced_x86::{Decoder, DecoderOptions, RflagsBits as F};
    let to_rflags = |f: u32| {
        [
            (F::CF, 0x1),
            (F::PF, 0x4),
            (F::AF, 0x10),
            (F::ZF, 0x40),
            (F::SF, 0x80),
            (F::OF, 0x800),
        ]
        .iter()
        .filter(|(b, _)| f & b != 0)
        .map(|(_, r)| r)
        .sum::<u64>()
    };
    let mut undefined = 0u32;
    for ins in Decoder::with_ip(64, code, CODE, DecoderOptions::NONE) {
        if ins.rflags_read() & undefined != 0 {
            return None;
        }
        undefined = (undefined & !ins.rflags_modified()) | ins.rflags_undefined();
    }
    Some(to_rflags(undefined))
}

#[test]
fn a_fault_sees_the_flags_of_the_last_writer_before_it() {
    // `add` would be dead (the `sub` overwrites every flag) but for the load between
    // them, which faults: the #PF handler must find add's flags in the frame.
    let mut g = Guest::new();
    const HANDLER: u64 = CODE + 0x800;
    g.set_gate(14, HANDLER, 0, 0);
    let handler = asm(64, HANDLER, |a| {
        a.mov(r12, qword_ptr(rsp + 24)).unwrap(); // error code, RIP, CS, RFLAGS
        a.hlt().unwrap();
    });
    g.load(HANDLER, &handler);
    g.load_code(|a| {
        a.mov(rcx, 0x4000_0000_0000u64).unwrap();
        a.mov(rax, 0x7fff_ffff_ffff_ffffu64).unwrap();
        a.add(rax, 1).unwrap(); // OF=1 SF=1
        a.mov(rbx, qword_ptr(rcx)).unwrap(); // rcx: not mapped
        a.sub(rax, rax).unwrap(); // ZF=1, OF=0 SF=0
        a.hlt().unwrap();
    });
    assert_eq!(g.cpu.run(&mut NoDevices, 1000), RunExit::Halted);
    let pushed = g.cpu.state().gpr[12];
    assert_ne!(pushed & (1 << 11), 0, "OF of the add, flags {pushed:#x}");
    assert_ne!(pushed & (1 << 7), 0, "SF of the add, flags {pushed:#x}");
    assert_eq!(pushed & (1 << 6), 0, "ZF of the add, flags {pushed:#x}");
}

/// Calls, returns, LEAVE and a loop, compiled at once, against the interpreter.
#[test]
fn compiled_calls_and_returns_match_the_interpreter() {
    let code = asm(64, CODE, |a| {
        let mut func = a.create_label();
        let mut top = a.create_label();
        a.mov(rcx, 300u64).unwrap();
        a.xor(eax, eax).unwrap();
        a.set_label(&mut top).unwrap();
        a.push(rcx).unwrap();
        a.mov(rdi, rcx).unwrap();
        a.call(func).unwrap();
        a.pop(rcx).unwrap();
        a.add(rax, rdx).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
        // func(rdi): a frame, a local, returns rdx = rdi * 3 + local.
        a.set_label(&mut func).unwrap();
        a.push(rbp).unwrap();
        a.mov(rbp, rsp).unwrap();
        a.sub(rsp, 16).unwrap();
        a.mov(qword_ptr(rbp - 8), rdi).unwrap();
        a.lea(rdx, qword_ptr(rdi + rdi * 2)).unwrap();
        a.add(rdx, qword_ptr(rbp - 8)).unwrap();
        a.leave().unwrap();
        a.ret().unwrap();
    });
    let run = |jit| {
        let mut g = guest_with(&code, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0);
        g.cpu.set_jit_threshold(jit);
        assert_eq!(g.cpu.run(&mut NoDevices, 100_000), RunExit::Halted);
        (g.cpu.state().gpr, g.cpu.compiled_blocks())
    };
    let (interpreted, _) = run(None);
    let (compiled, blocks) = run(Some(0));
    assert!(blocks >= 2, "{blocks} blocks compiled");
    assert_eq!(compiled, interpreted);
    assert_eq!(compiled[0], (1..=300u64).map(|i| 4 * i).sum::<u64>());
}

/// A compiled loop whose exit is linked to its own start still returns at the
/// instruction budget, and when another thread raises the kick flag.
#[test]
fn linked_compiled_loops_stop_at_the_budget_and_at_a_kick() {
    let code = asm(64, CODE, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top).unwrap();
        a.inc(rax).unwrap();
        a.add(rbx, rax).unwrap();
        a.xor(rcx, rbx).unwrap();
        a.jmp(top).unwrap();
    });
    let mut g = guest_with(&code, &[0; 10], 0);
    g.cpu.set_jit_threshold(Some(0));
    assert_eq!(
        g.cpu.run(&mut NoDevices, 1_000_000),
        RunExit::InstructionLimit
    );
    let retired = g.cpu.retired_instructions();
    assert!(
        (1_000_000..2_000_000).contains(&retired),
        "{retired} instructions for a budget of 1M"
    );
    // Exact: 4 per pass and the 5 warm-up instructions (see `guest_with`).
    assert_eq!(retired, g.cpu.state().gpr[0] * 4 + 5, "retired count");

    let mut s = g.cpu.state().clone();
    s.rflags |= 1 << 9; // IF: a kick is taken only when an interrupt could be.
    g.cpu.set_state(s);
    let kick = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    g.cpu.set_kick(kick.clone());
    let raiser = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        kick.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    assert_eq!(g.cpu.run(&mut NoDevices, u64::MAX), RunExit::Kicked);
    raiser.join().unwrap();
}

/// Compiled code charges a block's length to the budget on entry, and the run loop
/// refunds what a block that left early did not run: the count of retired instructions
/// stays exact through early exits (STC is not compiled, so each pass leaves there) and
/// TLB misses (a store to a fresh page every 16 passes).
#[test]
fn retired_count_is_exact_when_compiled_code_leaves_early() {
    let code = asm(64, CODE, |a| {
        let mut top = a.create_label();
        a.mov(rdx, 3000u64).unwrap();
        a.xor(edi, edi).unwrap();
        a.set_label(&mut top).unwrap();
        a.inc(rax).unwrap();
        a.add(rbx, rax).unwrap();
        a.mov(rsi, rdi).unwrap();
        a.shr(rsi, 4).unwrap();
        a.shl(rsi, 12).unwrap();
        a.mov(qword_ptr(r15 + rsi), rbx).unwrap();
        a.stc().unwrap();
        a.adc(rcx, 0).unwrap();
        a.inc(rdi).unwrap();
        a.dec(rdx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    let run = |jit| {
        let mut g = guest_with(&code, &[0; 10], 0);
        g.cpu.set_jit_threshold(jit);
        assert_eq!(g.cpu.run(&mut NoDevices, 1_000_000), RunExit::Halted);
        (
            g.cpu.state().gpr,
            g.cpu.retired_instructions(),
            g.cpu.compiled_blocks(),
        )
    };
    let (interpreted, n_interpreted, _) = run(None);
    let (compiled, n_compiled, blocks) = run(Some(0));
    assert!(blocks >= 1, "{blocks} blocks compiled");
    assert_eq!(compiled, interpreted);
    assert_eq!(interpreted[1], 3000, "rcx");
    assert_eq!(n_compiled, n_interpreted, "retired instructions");
}

/// Compiled code's jump cache remembers, by linear address, where an indirect call's or a
/// RET's target block is. After the guest repoints the page and flushes it (INVLPG), a
/// call to the same address must run the new page's code.
#[test]
fn indirect_calls_follow_a_remapped_page_past_the_jump_cache() {
    const VA: u64 = 0x4000_0000_0000;
    const PAGE: u64 = 0x30_0000;
    const PAGE2: u64 = 0x30_1000;
    let run = |jit| {
        let mut g = Guest::new();
        g.map4k(VA, PAGE, 0);
        g.load(
            PAGE,
            &asm(64, VA, |a| {
                a.add(rbx, 1).unwrap();
                a.ret().unwrap();
            }),
        );
        g.load(
            PAGE2,
            &asm(64, VA, |a| {
                a.add(rbx, 100).unwrap();
                a.ret().unwrap();
            }),
        );
        // The leaf entry's address, walked as the CPU does.
        let mut table = g.pt.root;
        for level in (2..=4).rev() {
            let e = g.read_u64(table + ((VA >> (12 + 9 * (level - 1))) & 0x1ff) * 8);
            table = e & 0x000f_ffff_ffff_f000;
        }
        let pte = table + ((VA >> 12) & 0x1ff) * 8;
        let repointed = (g.read_u64(pte) & !0x000f_ffff_ffff_f000) | PAGE2;
        g.load_code(|a| {
            let mut first = a.create_label();
            let mut second = a.create_label();
            a.mov(rcx, 1000u64).unwrap();
            a.set_label(&mut first).unwrap();
            a.mov(rax, VA).unwrap();
            a.call(rax).unwrap();
            a.dec(rcx).unwrap();
            a.jnz(first).unwrap();
            a.mov(rdi, pte).unwrap();
            a.mov(rax, repointed).unwrap();
            a.mov(qword_ptr(rdi), rax).unwrap();
            a.mov(rax, VA).unwrap();
            a.invlpg(qword_ptr(rax)).unwrap();
            a.mov(rcx, 1000u64).unwrap();
            a.set_label(&mut second).unwrap();
            a.mov(rax, VA).unwrap();
            a.call(rax).unwrap();
            a.dec(rcx).unwrap();
            a.jnz(second).unwrap();
            a.hlt().unwrap();
        });
        g.cpu.set_jit_threshold(jit);
        assert_eq!(g.cpu.run(&mut NoDevices, 10_000_000), RunExit::Halted);
        (g.cpu.state().gpr[3], g.cpu.compiled_blocks())
    };
    let (interpreted, _) = run(None);
    assert_eq!(interpreted, 1000 + 100 * 1000);
    let (compiled, blocks) = run(Some(0));
    assert!(blocks >= 3, "{blocks} blocks compiled");
    assert_eq!(compiled, interpreted);
}

/// STC, CLC and CMC run as themselves (CF is in the host's flags), CLD and STD as stores
/// to the state's DF: a block that starts with one compiles, and leaves the registers,
/// the status flags and DF as the interpreter does (REP MOVSB reads DF after STD/CLD).
#[test]
fn carry_and_direction_flag_instructions_compile() {
    let code = asm(64, CODE, |a| {
        let mut top = a.create_label();
        a.mov(rdx, 300u64).unwrap();
        a.set_label(&mut top).unwrap();
        a.clc().unwrap();
        a.adc(rax, rbx).unwrap();
        a.stc().unwrap();
        a.adc(rcx, 5).unwrap();
        a.cmc().unwrap();
        a.sbb(rsi, 1).unwrap();
        a.std().unwrap();
        a.pushfq().unwrap();
        a.pop(r8).unwrap();
        a.add(r9, r8).unwrap();
        a.cld().unwrap();
        a.lea(rsi, qword_ptr(r15 + 0x100)).unwrap();
        a.lea(rdi, qword_ptr(r15 + 0x140)).unwrap();
        a.mov(r10, rcx).unwrap();
        a.mov(ecx, 8).unwrap();
        a.rep().movsb().unwrap();
        a.mov(rcx, r10).unwrap();
        a.dec(rdx).unwrap();
        a.jnz(top).unwrap();
        a.std().unwrap();
        a.hlt().unwrap();
    });
    let run = |jit| {
        let mut g = guest_with(&code, &[7, 9, 0, 0, 100, 0, 0, 0, 0, 0], 0);
        g.cpu.set_jit_threshold(jit);
        assert_eq!(g.cpu.run(&mut NoDevices, 1_000_000), RunExit::Halted);
        (
            g.cpu.state().gpr,
            g.cpu.state().rflags,
            g.cpu.compiled_blocks(),
        )
    };
    let (interpreted, flags, _) = run(None);
    let (compiled, cflags, blocks) = run(Some(0));
    assert!(blocks >= 2, "{blocks} blocks compiled");
    assert_eq!(compiled, interpreted);
    assert_eq!(cflags, flags);
    assert_ne!(flags & 0x400, 0, "DF set at the end");
    assert_ne!(interpreted[8] & 0x400, 0, "PUSHF after STD sees DF");
}

/// A loop that rewrites an immediate in its own body: the compiled and linked code must
/// notice (the store leaves compiled code, the epoch moves, the links are cut).
#[test]
fn a_linked_loop_that_patches_itself_runs_the_new_code() {
    let assemble = |imm_at: u64| {
        asm(64, CODE, |a| {
            let mut top = a.create_label();
            let mut skip = a.create_label();
            a.mov(rcx, 1000u64).unwrap();
            a.set_label(&mut top).unwrap();
            a.add(rbx, 1).unwrap(); // 48 83 c3 01
            a.inc(rax).unwrap();
            a.cmp(rcx, 500).unwrap();
            a.jne(skip).unwrap();
            // Halfway: add 3 from now on.
            a.mov(byte_ptr(imm_at), 3).unwrap();
            a.set_label(&mut skip).unwrap();
            // Three instructions, so that this block is compiled too and linked to `top`.
            a.add(rdx, 1).unwrap();
            a.dec(rcx).unwrap();
            a.jnz(top).unwrap();
            a.hlt().unwrap();
        })
    };
    let first = assemble(0);
    let add = first
        .windows(4)
        .position(|w| w == [0x48, 0x83, 0xc3, 0x01])
        .expect("add rbx, 1");
    let code = assemble(CODE + add as u64 + 3);
    let run = |jit| {
        let mut g = guest_with(&code, &[0; 10], 0);
        g.cpu.set_jit_threshold(jit);
        assert_eq!(g.cpu.run(&mut NoDevices, 1_000_000), RunExit::Halted);
        g.cpu.state().gpr
    };
    let interpreted = run(None);
    // 501 passes add 1 (the patch comes after the add), 499 add 3.
    assert_eq!(interpreted[3], 501 + 499 * 3);
    assert_eq!(run(Some(0)), interpreted);
}

/// A store to one code page makes only that page's blocks be checked again: the
/// function it patches runs its new code, reached through the jump cache (an indirect
/// call from compiled code) and through a link, while the caller's page stays trusted.
#[test]
fn a_code_write_rechecks_only_the_blocks_of_its_page() {
    const F: u64 = CODE + 0x1000;
    const G: u64 = CODE + 0x2000;
    let callee = |imm: i32| {
        asm(64, F, |a| {
            let mut again = a.create_label();
            a.mov(edx, imm).unwrap(); // ba imm32
            a.set_label(&mut again).unwrap();
            // A loop, so that the block after the MOV is linked to.
            a.add(rsi, 1).unwrap();
            a.test(rsi, 1).unwrap();
            a.jnz(again).unwrap();
            a.ret().unwrap();
        })
    };
    let run = |jit| {
        let mut g = guest_with(
            &asm(64, CODE, |a| {
                let mut top = a.create_label();
                let mut skip = a.create_label();
                a.mov(rcx, 1000u64).unwrap();
                a.set_label(&mut top).unwrap();
                a.mov(rax, F).unwrap();
                a.call(rax).unwrap();
                a.add(rbx, rdx).unwrap();
                a.mov(rax, G).unwrap();
                a.call(rax).unwrap();
                a.cmp(rcx, 500).unwrap();
                a.jne(skip).unwrap();
                // Halfway: F loads 3 from now on.
                a.mov(dword_ptr(F + 1), 3).unwrap();
                a.set_label(&mut skip).unwrap();
                a.dec(rcx).unwrap();
                a.jnz(top).unwrap();
                a.hlt().unwrap();
            }),
            &[0; 10],
            0,
        );
        g.load(F, &callee(1));
        g.load(
            G,
            &asm(64, G, |a| {
                a.add(rdi, 1).unwrap();
                a.ret().unwrap();
            }),
        );
        g.cpu.set_jit_threshold(jit);
        g.cpu.set_recheck_each_run(false);
        assert_eq!(g.cpu.run(&mut NoDevices, 1_000_000), RunExit::Halted);
        (g.cpu.state().gpr, g.cpu.rechecked_blocks())
    };
    let (interpreted, rechecked) = run(None);
    // 501 calls load 1 (the patch comes after the call), 499 load 3.
    assert_eq!(interpreted[3], 501 + 499 * 3);
    assert_eq!(interpreted[7], 1000);
    // The patched block is decoded again, and F's other two blocks (its loop and RET, on
    // the written page but unchanged) compared again; the caller's blocks and G's are not.
    assert_eq!(rechecked, 2, "interpreted");
    let (compiled, rechecked) = run(Some(0));
    assert_eq!(compiled, interpreted);
    assert_eq!(rechecked, 2, "compiled");
}

/// Compiled code keeps guest registers in host registers between instructions; the
/// scratch registers of memory and stack accesses must not be taken for them.
#[test]
fn compiled_code_reloads_registers_its_scratch_work_overwrote() {
    let code = asm(64, CODE, |a| {
        // One block (under 32 instructions): the cache lives within a block.
        for r in [rcx, rbx, r10, r11] {
            a.mov(r, 7u64).unwrap();
            a.add(r, 1).unwrap();
        }
        a.push(0x1234).unwrap();
        a.add(r12, r10).unwrap();
        a.pop(r11).unwrap();
        a.push(r11).unwrap();
        a.mov(rax, qword_ptr(r15 + 8)).unwrap();
        a.add(qword_ptr(r15 + 16), rcx).unwrap();
        a.lea(rdx, qword_ptr(rcx + rbx * 2 + 1)).unwrap();
        for r in [rcx, rbx, r10] {
            a.add(r, 1).unwrap();
        }
        a.hlt().unwrap();
    });
    let run = |jit| {
        let mut g = guest_with(&code, &[0; 10], 0);
        g.cpu.set_jit_threshold(jit);
        assert_eq!(g.cpu.run(&mut NoDevices, 10_000), RunExit::Halted);
        (g.cpu.state().gpr, g.read_u64(DATA + 16))
    };
    let interpreted = run(None);
    assert_eq!(interpreted.0[10], 9);
    assert_eq!(run(Some(0)), interpreted);
}

/// LOCK on an instruction that does not allow it is #UD for the guest: compiled code must
/// not run it on the host (where it would kill the VMM with SIGILL).
#[test]
fn a_misplaced_lock_prefix_is_a_guest_ud_in_compiled_code() {
    let mut g = Guest::new();
    const HANDLER: u64 = CODE + 0x800;
    g.set_gate(6, HANDLER, 0, 0);
    g.load(HANDLER, &asm(64, HANDLER, |a| a.hlt().unwrap()));
    g.load_code(|a| {
        a.mov(rax, 1u64).unwrap();
        a.add(rax, 1).unwrap();
        // lock mov [rsp-8], rax
        a.db(&[0xf0, 0x48, 0x89, 0x44, 0x24, 0xf8]).unwrap();
        a.hlt().unwrap();
    });
    g.cpu.set_jit_threshold(Some(0));
    assert_eq!(g.cpu.run(&mut NoDevices, 1000), RunExit::Halted);
    assert_eq!(g.cpu.state().rip, HANDLER + 1, "#UD handler ran");
}

/// Compiled code goes on across pages by translating the target through the TLB and
/// looking its block up: calls to a function in another page (and its returns), then the
/// same virtual page mapped to other code, must run what the mapping says.
#[test]
fn compiled_calls_across_pages_follow_the_page_tables() {
    const FUNC: u64 = 0x4000_0000; // 2 MiB page, mapped to one of two frames below
    const FRAME_A: u64 = 0x40_0000;
    const FRAME_B: u64 = 0x60_0000;
    let caller = asm(64, CODE, |a| {
        let mut top = a.create_label();
        a.mov(rcx, 500u64).unwrap();
        a.mov(rbx, FUNC).unwrap();
        a.set_label(&mut top).unwrap();
        a.call(FUNC).unwrap();
        a.add(rdx, rax).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    let func = |n: i32| {
        asm(64, FUNC, |a| {
            a.mov(eax, n).unwrap();
            a.add(rsi, 1).unwrap();
            a.ret().unwrap();
        })
    };
    let run = |jit| {
        let mut g = guest_with(&caller, &[0; 10], 0);
        g.load(FRAME_A, &func(1));
        g.load(FRAME_B, &func(100));
        g.cpu.set_jit_threshold(jit);
        let ram = g.cpu.ram();
        assert!(g.pt.map(ram, FUNC, FRAME_A, 2, x86emu::testing::PTE_W));
        assert_eq!(g.cpu.run(&mut NoDevices, 100_000), RunExit::Halted);
        let first = g.cpu.state().gpr;
        // The same virtual page, other code: what compiled code linked before must not
        // outlive the translation.
        let ram = g.cpu.ram();
        assert!(g.pt.map(ram, FUNC, FRAME_B, 2, x86emu::testing::PTE_W));
        g.cpu.flush_tlb();
        let mut s = g.cpu.state().clone();
        s.rip = CODE;
        g.cpu.set_state(s);
        assert_eq!(g.cpu.run(&mut NoDevices, 100_000), RunExit::Halted);
        (first, g.cpu.state().gpr, g.cpu.compiled_blocks())
    };
    let (i1, i2, _) = run(None);
    assert_eq!(i1[2], 500);
    assert_eq!(i2[2], 500 + 500 * 100);
    let (c1, c2, blocks) = run(Some(0));
    assert!(blocks >= 3, "{blocks} blocks compiled");
    assert_eq!((c1, c2), (i1, i2));
}

/// Code patched through a second, writable mapping of its page, whose TLB entry was made
/// before the page held code (a JIT's dual mapping): compiled stores through it must
/// still be noticed once the page runs as code.
#[test]
fn a_store_through_an_alias_made_before_the_page_held_code_is_noticed() {
    const EXEC: u64 = 0x4000_0000;
    const WRITE: u64 = 0x4020_0000;
    const FRAME: u64 = 0x40_0000;
    let func = asm(64, EXEC, |a| {
        a.mov(eax, 1).unwrap(); // b8 01 00 00 00
        a.ret().unwrap();
    });
    let caller = asm(64, CODE, |a| {
        let mut top = a.create_label();
        let mut skip = a.create_label();
        // The alias's entry, writable, before the page runs as code.
        a.mov(qword_ptr(WRITE + 0x800), 0).unwrap();
        a.mov(rcx, 600u64).unwrap();
        a.set_label(&mut top).unwrap();
        a.call(EXEC).unwrap();
        a.add(rdx, rax).unwrap();
        a.cmp(rcx, 300).unwrap();
        a.jne(skip).unwrap();
        a.mov(dword_ptr(WRITE + 1), 7).unwrap();
        a.set_label(&mut skip).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    let run = |jit| {
        let mut g = guest_with(&caller, &[0; 10], 0);
        g.load(FRAME, &func);
        g.cpu.set_jit_threshold(jit);
        let ram = g.cpu.ram();
        assert!(g.pt.map(ram, EXEC, FRAME, 2, x86emu::testing::PTE_W));
        let ram = g.cpu.ram();
        assert!(g.pt.map(ram, WRITE, FRAME, 2, x86emu::testing::PTE_W));
        g.cpu.flush_tlb();
        assert_eq!(g.cpu.run(&mut NoDevices, 100_000), RunExit::Halted);
        (g.cpu.state().gpr, g.cpu.compiled_blocks())
    };
    let (interpreted, _) = run(None);
    assert_eq!(interpreted[2], 301 + 299 * 7);
    let (compiled, blocks) = run(Some(0));
    assert!(blocks >= 3, "{blocks} blocks compiled");
    assert_eq!(compiled, interpreted);
}

/// A stack page remapped between two runs (with a TLB flush): compiled stack accesses
/// must write it at its new frame, never through a translation kept from before.
#[test]
fn compiled_stack_accesses_follow_a_remapped_stack_page() {
    const STACK: u64 = 0x4000_0000;
    const FRAME_A: u64 = 0x40_0000;
    const FRAME_B: u64 = 0x60_0000;
    let code = asm(64, CODE, |a| {
        let mut top = a.create_label();
        a.mov(rcx, 3u64).unwrap();
        a.set_label(&mut top).unwrap();
        a.push(r12).unwrap();
        a.mov(rbx, qword_ptr(rsp)).unwrap();
        a.add(rsi, rbx).unwrap();
        a.pop(rdx).unwrap();
        a.push(rdx).unwrap();
        a.pop(rdi).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    let slot = STACK + 0x800 - 8;
    let run = |jit| {
        let mut g = guest_with(&code, &[0; 10], 0);
        g.cpu.set_jit_threshold(jit);
        let mut out = Vec::new();
        for (frame, value) in [(FRAME_A, 0x1111u64), (FRAME_B, 0x2222)] {
            let ram = g.cpu.ram();
            assert!(g.pt.map(ram, STACK, frame, 2, x86emu::testing::PTE_W));
            let mut s = g.cpu.state().clone();
            s.rip = CODE;
            s.gpr[4] = STACK + 0x800;
            s.gpr[12] = value;
            g.cpu.set_state(s);
            g.cpu.flush_tlb();
            assert_eq!(g.cpu.run(&mut NoDevices, 100_000), RunExit::Halted);
            out.push(g.cpu.state().gpr);
        }
        let at = |frame: u64| g.read_u64(frame + (slot - STACK));
        (out, at(FRAME_A), at(FRAME_B), g.cpu.compiled_blocks())
    };
    let (iout, ia, ib, _) = run(None);
    assert_eq!((ia, ib), (0x1111, 0x2222));
    let (cout, ca, cb, blocks) = run(Some(0));
    assert!(blocks >= 1);
    assert_eq!((ca, cb), (ia, ib), "the stack slot in each frame");
    assert_eq!(cout, iout);
}

/// A stack whose two pages are far apart in guest-physical memory (as a real guest's
/// are: identity-mapped test RAM hides a wrong host pointer for the second page), with
/// runs of PUSHes and POPs whose range straddles the page boundary right after the upper
/// page was used alone: the range must not be taken as lying in one page.
#[test]
fn compiled_stack_runs_straddling_two_distant_stack_pages_match_the_interpreter() {
    const TOP: u64 = 0x5000_2000;
    const UPPER: u64 = 0x32_0000; // frame of TOP - 0x1000
    const LOWER: u64 = 0x35_0000; // frame of TOP - 0x2000
    let code = asm(64, CODE, |a| {
        let mut top = a.create_label();
        a.mov(rcx, 3u64).unwrap();
        a.set_label(&mut top).unwrap();
        // The upper page alone, written.
        a.push(rax).unwrap();
        a.pop(rdx).unwrap();
        a.lea(rsp, qword_ptr(rsp - 0x20)).unwrap();
        // 0x20 below: a run whose range straddles into the lower page.
        // RBX, which changes every pass, lowest: in the lower page.
        a.push(r8).unwrap();
        a.push(rdi).unwrap();
        a.push(rsi).unwrap();
        a.push(rbx).unwrap();
        a.pop(r9).unwrap();
        a.pop(r10).unwrap();
        a.pop(r12).unwrap();
        a.pop(r13).unwrap();
        a.lea(rsp, qword_ptr(rsp + 0x20)).unwrap();
        a.add(rbx, 0x101).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    let run = |jit| {
        let regs = [7, 0x11, 0, 0, 0x22, 0x33, 0x44, 0, 0, 0];
        let mut g = guest_with(&code, &regs, 0);
        g.map4k(TOP - 0x1000, UPPER, x86emu::testing::PTE_W);
        g.map4k(TOP - 0x2000, LOWER, x86emu::testing::PTE_W);
        let mut s = g.cpu.state().clone();
        s.rip = CODE;
        s.gpr[4] = TOP - 0x1000 + 0x30;
        g.cpu.set_state(s);
        g.cpu.set_jit_threshold(jit);
        assert_eq!(g.cpu.run(&mut NoDevices, 100_000), RunExit::Halted);
        let mut lower = [0u8; 0x20];
        assert!(g.cpu.ram().read(LOWER + 0xfe0, &mut lower));
        let mut upper = [0u8; 0x20];
        assert!(g.cpu.ram().read(UPPER, &mut upper));
        (g.cpu.state().gpr, lower, upper, g.cpu.compiled_blocks())
    };
    let (interpreted, i_lower, i_upper, _) = run(None);
    assert_ne!(i_lower, [0; 0x20], "the run reached the lower page");
    let (compiled, c_lower, c_upper, blocks) = run(Some(0));
    assert!(blocks >= 1);
    assert_eq!(
        (c_lower, c_upper),
        (i_lower, i_upper),
        "the stack pages' bytes"
    );
    assert_eq!(compiled, interpreted);
}

/// With nearly every register cached, the scratch register an uncached index is loaded
/// into must not be the one holding the cached base. (Had it been, the address would be
/// index * 9 instead of DATA + index * 8: the index is chosen so that the wrong address
/// lands in the warm data page, where compiled code would read it without a TLB miss.)
#[test]
fn compiled_addresses_with_most_registers_cached() {
    const INDEX: u64 = DATA / 9 + 1;
    let code = asm(64, CODE, |a| {
        // R14 (the index) is set from outside, so it is not cached; everything else is.
        a.mov(rdx, DATA).unwrap();
        for r in [rax, rbx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12] {
            a.add(r, 0).unwrap();
        }
        a.mov(r13, qword_ptr(rdx + r14 * 8)).unwrap();
        a.hlt().unwrap();
    });
    let run = |jit| {
        let mut g = guest_with(&code, &[0; 10], 0);
        g.load(DATA + INDEX * 8, &0x1234_5678u64.to_le_bytes());
        let mut s = g.cpu.state().clone();
        s.gpr[14] = INDEX;
        g.cpu.set_state(s);
        g.cpu.set_jit_threshold(jit);
        assert_eq!(g.cpu.run(&mut NoDevices, 1000), RunExit::Halted);
        g.cpu.state().gpr
    };
    let interpreted = run(None);
    assert_eq!(interpreted[13], 0x1234_5678);
    assert_eq!(run(Some(0)), interpreted);
}

/// DIV runs in compiled code after a check that it cannot fault; a division by zero or an
/// overflowing one goes to the interpreter, which raises #DE for the guest with the flags
/// from before the DIV.
#[test]
fn compiled_div_and_its_divide_errors() {
    let code = asm(64, CODE, |a| {
        let mut top = a.create_label();
        a.mov(rcx, 200u64).unwrap();
        a.mov(rbx, 0x1234_5678_9abc_def1u64).unwrap();
        a.set_label(&mut top).unwrap();
        // 64-bit, register divisor
        a.mov(rax, rbx).unwrap();
        a.xor(edx, edx).unwrap();
        a.lea(rsi, qword_ptr(rcx + 3)).unwrap();
        a.div(rsi).unwrap();
        a.add(r8, rax).unwrap();
        a.add(r9, rdx).unwrap();
        // 32-bit, memory divisor, RDX nonzero but below it
        a.mov(qword_ptr(r15 + 0x40), rsi).unwrap();
        a.mov(eax, ebx).unwrap();
        a.mov(edx, 1).unwrap();
        a.div(dword_ptr(r15 + 0x40)).unwrap();
        a.add(r10, rax).unwrap();
        a.add(r12, rdx).unwrap();
        a.rol(rbx, 7).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(top).unwrap();
        // Then a division by zero with known flags: #DE.
        a.mov(esi, 0xffff_ffffu32).unwrap();
        a.add(esi, 1).unwrap(); // ESI = 0, CF=1, ZF=1
        a.mov(eax, 5).unwrap();
        a.div(rsi).unwrap();
        a.hlt().unwrap();
    });
    const HANDLER: u64 = CODE + 0xc00;
    let run = |jit| {
        let mut g = guest_with(&code, &[0; 10], 0);
        g.set_gate(0, HANDLER, 0, 0);
        g.load(
            HANDLER,
            &asm(64, HANDLER, |a| {
                a.mov(r11, qword_ptr(rsp + 16)).unwrap(); // RIP, CS, RFLAGS
                a.hlt().unwrap();
            }),
        );
        g.cpu.set_jit_threshold(jit);
        assert_eq!(g.cpu.run(&mut NoDevices, 100_000), RunExit::Halted);
        g.cpu.state().gpr
    };
    let interpreted = run(None);
    assert_eq!(
        interpreted[11] & 0x41,
        0x41,
        "#DE frame: CF and ZF of before the DIV"
    );
    assert_ne!(interpreted[8], 0);
    assert_eq!(run(Some(0)), interpreted);
}

/// Indirect JMP and CALL through registers, a jump table in memory, an FS-relative
/// pointer and a target in another page run in compiled code like in the interpreter;
/// a non-canonical target is the guest's #GP with nothing pushed.
#[test]
fn compiled_indirect_jumps_and_calls_match_the_interpreter() {
    const FAR: u64 = CODE + 0x3000;
    const TABLE: u64 = DATA + 0x180;
    const HANDLER: u64 = CODE + 0xc00;
    let code = asm(64, CODE, |a| {
        let mut top = a.create_label();
        let mut cases = [a.create_label(), a.create_label(), a.create_label()];
        let mut join = a.create_label();
        let mut func = a.create_label();
        a.mov(rcx, 300u64).unwrap();
        a.set_label(&mut top).unwrap();
        // switch (rcx % 3) through the table at TABLE
        a.mov(rax, rcx).unwrap();
        a.xor(edx, edx).unwrap();
        a.mov(esi, 3).unwrap();
        a.div(rsi).unwrap();
        a.jmp(qword_ptr(r15 + rdx * 8 + 0x180)).unwrap();
        for (k, l) in cases.iter_mut().enumerate() {
            a.set_label(l).unwrap();
            a.add(r8, k as i32 + 1).unwrap();
            a.lea(rdi, ptr(join)).unwrap();
            a.jmp(rdi).unwrap();
        }
        a.set_label(&mut join).unwrap();
        a.lea(rbx, ptr(func)).unwrap();
        a.call(rbx).unwrap();
        a.call(qword_ptr(0x198).fs()).unwrap();
        a.mov(r11, FAR).unwrap();
        a.call(r11).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(top).unwrap();
        // A non-canonical target: #GP at the CALL, RSP unchanged.
        a.mov(r12, rsp).unwrap();
        a.mov(rax, 0x8000_0000_0000_0000u64).unwrap();
        a.call(rax).unwrap();
        a.hlt().unwrap();
        a.set_label(&mut func).unwrap();
        a.add(r9, rcx).unwrap();
        a.ret().unwrap();
    });
    // The table's entries: the three `add r8, k` and the `add r9, rcx` of `func`.
    let decoder_cases = {
        let mut d = iced_x86::Decoder::with_ip(64, &code, CODE, 0);
        let mut v = Vec::new();
        let mut func = 0;
        for i in d.iter() {
            if i.mnemonic() == iced_x86::Mnemonic::Add && i.op0_register() == iced_x86::Register::R8
            {
                v.push(i.ip());
            }
            if i.mnemonic() == iced_x86::Mnemonic::Add && i.op0_register() == iced_x86::Register::R9
            {
                func = i.ip();
            }
        }
        (v, func)
    };
    let (cases, func) = decoder_cases;
    assert_eq!(cases.len(), 3);
    let far = asm(64, FAR, |a| {
        a.add(r10, 2).unwrap();
        a.ret().unwrap();
    });
    let run = |jit| {
        let mut g = guest_with(&code, &[0; 10], 0);
        g.load(FAR, &far);
        let mut table = Vec::new();
        for c in &cases {
            table.extend_from_slice(&c.to_le_bytes());
        }
        table.extend_from_slice(&func.to_le_bytes());
        g.load(TABLE, &table);
        g.set_gate(13, HANDLER, 0, 0);
        g.load(
            HANDLER,
            &asm(64, HANDLER, |a| {
                a.mov(r13, qword_ptr(rsp + 8)).unwrap(); // RIP
                a.hlt().unwrap();
            }),
        );
        let mut s = g.cpu.state().clone();
        s.seg[x86emu::state::Seg::Fs as usize].base = DATA;
        g.cpu.set_state(s);
        g.cpu.set_jit_threshold(jit);
        let exit = g.cpu.run(&mut NoDevices, 1_000_000);
        assert_eq!(exit, RunExit::Halted, "{:x?}", g.cpu.state());
        (g.cpu.state().gpr, g.cpu.compiled_blocks())
    };
    let (interpreted, _) = run(None);
    assert_eq!(interpreted[8], 600, "the switch ran every case");
    assert_eq!(interpreted[9], 2 * (1..=300u64).sum::<u64>());
    assert_eq!(interpreted[10], 600);
    // #GP frame: error code at [rsp], RIP at [rsp+8] = the CALL; the CALL pushed nothing.
    assert_ne!(interpreted[13], 0);
    let (compiled, blocks) = run(Some(0));
    assert!(blocks >= 6, "{blocks} blocks compiled");
    assert_eq!(compiled, interpreted);
}

const X: [AsmRegisterXmm; 8] = [xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7];
const Y: [AsmRegisterYmm; 8] = [ymm0, ymm1, ymm2, ymm3, ymm4, ymm5, ymm6, ymm7];

/// One random SSE/AVX instruction of the kinds compiled code runs as themselves (integer
/// SIMD, moves, logic, shuffles, SHA/AES, BMI and friends), or a floating-point one it
/// leaves to the interpreter in mid-block; memory through r15 = DATA.
fn random_vector_instruction(a: &mut CodeAssembler, r: &mut Rng) {
    let (d, s, t) = (
        r.below(8) as usize,
        r.below(8) as usize,
        r.below(8) as usize,
    );
    let g = r.below(10) as usize;
    let h = r.below(10) as usize;
    let imm = r.below(256) as u32;
    let off16 = (r.below(16) * 16) as i32;
    let off = r.below(224) as i32;
    match r.below(44) {
        0 => a.movdqu(X[d], xmmword_ptr(r15 + off)).unwrap(),
        1 => a.movdqa(X[d], xmmword_ptr(r15 + off16)).unwrap(),
        2 => a
            .movdqu(xmmword_ptr(r15 + 0x100 + (off & 0x7f)), X[s])
            .unwrap(),
        3 => a.pxor(X[d], X[s]).unwrap(),
        4 => a.paddd(X[d], X[s]).unwrap(),
        5 => a.pcmpeqb(X[d], X[s]).unwrap(),
        6 => a.pminub(X[d], xmmword_ptr(r15 + off16)).unwrap(),
        7 => a.pshufb(X[d], X[s]).unwrap(),
        8 => a.pshufd(X[d], X[s], imm).unwrap(),
        9 => a.palignr(X[d], X[s], imm & 31).unwrap(),
        10 => a.pslldq(X[d], imm & 31).unwrap(),
        11 => a.pmovmskb(R32[g], X[s]).unwrap(),
        12 => a.movd(R32[g], X[s]).unwrap(),
        13 => a.movq(X[d], R64[g]).unwrap(),
        14 => a.pinsrq(X[d], R64[g], imm & 1).unwrap(),
        15 => a.pextrd(R32[g], X[s], imm & 3).unwrap(),
        16 => a.ptest(X[d], X[s]).unwrap(),
        17 => a.vpcmpeqb(Y[d], Y[s], Y[t]).unwrap(),
        18 => a.vpminub(Y[d], Y[s], ymmword_ptr(r15 + off)).unwrap(),
        19 => a.vpor(Y[d], Y[s], Y[t]).unwrap(),
        20 => a.vmovdqu(Y[d], ymmword_ptr(r15 + off)).unwrap(),
        21 => a
            .vmovdqu(ymmword_ptr(r15 + 0x100 + (off & 0x7f)), Y[s])
            .unwrap(),
        22 => a.vpmovmskb(R32[g], Y[s]).unwrap(),
        23 => a.vpxor(X[d], X[s], X[t]).unwrap(),
        24 => a.vzeroupper().unwrap(),
        25 => a.vptest(Y[d], Y[s]).unwrap(),
        26 => a.vpbroadcastb(Y[d], X[s]).unwrap(),
        27 => a.vperm2i128(Y[d], Y[s], Y[t], imm & 0x33).unwrap(),
        28 => a.tzcnt(R64[g], R64[h]).unwrap(),
        29 => a.lzcnt(R32[g], R32[h]).unwrap(),
        30 => a.popcnt(R64[g], R64[h]).unwrap(),
        31 => a.andn(R64[g], R64[h], R64[(h + 1) % 10]).unwrap(),
        32 => a.shlx(R64[g], R64[h], R64[(h + 3) % 10]).unwrap(),
        33 => a.sarx(R32[g], R32[h], R32[(h + 3) % 10]).unwrap(),
        34 => a.blsr(R64[g], R64[h]).unwrap(),
        35 => a.pdep(R64[g], R64[h], qword_ptr(r15 + (off & !7))).unwrap(),
        36 => a.mulx(R64[g], R64[h], R64[(h + 1) % 10]).unwrap(),
        37 => a.sha256rnds2(X[d], X[s]).unwrap(),
        38 => a.aesenc(X[d], X[s]).unwrap(),
        39 => a.pclmulqdq(X[d], X[s], imm & 0x11).unwrap(),
        40 => a.shufps(X[d], X[s], imm).unwrap(),
        41 => a.vmovdqu(X[d], xmmword_ptr(r15 + off)).unwrap(),
        42 => a.movss(X[d], X[s]).unwrap(),
        // Floating point: not compiled; the interpreter runs it between compiled parts.
        _ => a.addps(X[d], X[s]).unwrap(),
    }
}

/// Compiled SSE/AVX/BMI code against the interpreter (which `tests/diff` checks against
/// the host): registers, flags where defined, XMM/YMM state and memory must match.
#[test]
fn compiled_vector_code_matches_the_interpreter() {
    let mut r = Rng(0x5eed_0f5e);
    let mut compared = 0;
    let mut compiled_any = 0;
    for case in 0..400 {
        let len = 3 + r.below(30);
        let mut seed = Rng(r.next() | 1);
        let code = asm(64, CODE, |a| {
            for _ in 0..len {
                if seed.below(3) == 0 {
                    random_instruction(a, &mut seed);
                } else {
                    random_vector_instruction(a, &mut seed);
                }
            }
            a.hlt().unwrap();
        });
        let Some(undefined) = undefined_flags(&code) else {
            continue;
        };
        compared += 1;
        let regs: [u64; 10] = std::array::from_fn(|_| r.next());
        let xmm: [u128; 16] =
            std::array::from_fn(|_| u128::from(r.next()) << 64 | u128::from(r.next()));
        let hi: [u128; 16] =
            std::array::from_fn(|_| u128::from(r.next()) << 64 | u128::from(r.next()));
        let flags = r.next();
        let run = |jit: Option<u32>| {
            let mut g = guest_with(&code, &regs, flags);
            let mut s = g.cpu.state().clone();
            s.cr4 |= 1 << 18; // OSXSAVE
            s.xcr0 = 7;
            s.fpu.xmm = xmm;
            s.fpu.ymm_hi = hi;
            g.cpu.set_state(s);
            g.cpu.set_jit_threshold(jit);
            assert_eq!(
                g.cpu.run(&mut NoDevices, 10_000),
                RunExit::Halted,
                "case {case}"
            );
            let mut mem = [0u8; 512];
            assert!(g.cpu.ram().read(DATA, &mut mem));
            (g.cpu.state().clone(), mem.to_vec(), g.cpu.compiled_blocks())
        };
        let (i, imem, _) = run(None);
        let (c, cmem, blocks) = run(Some(0));
        compiled_any += u32::from(blocks > 0);
        assert_eq!(c.gpr, i.gpr, "case {case}: registers differ");
        assert_eq!(c.fpu.xmm, i.fpu.xmm, "case {case}: XMM differ");
        assert_eq!(
            c.fpu.ymm_hi, i.fpu.ymm_hi,
            "case {case}: YMM upper halves differ"
        );
        assert_eq!(c.fpu.mxcsr, i.fpu.mxcsr, "case {case}: MXCSR differs");
        let defined = 0x8d5 & !undefined;
        assert_eq!(
            c.rflags & defined,
            i.rflags & defined,
            "case {case}: flags differ"
        );
        assert_eq!(cmem, imem, "case {case}: memory differs");
    }
    assert!(compared >= 150, "only {compared} comparable programs");
    assert!(compiled_any >= 100, "only {compiled_any} programs compiled");
}

/// What compiled code must leave to the interpreter's exceptions: a misaligned MOVDQA
/// (#GP), SSE with CR0.TS set (#NM), AVX with XCR0 lacking the AVX state (#UD).
#[test]
fn compiled_vector_code_leaves_faults_to_the_interpreter() {
    const HANDLER: u64 = CODE + 0xc00;
    let code = asm(64, CODE, |a| {
        let mut top = a.create_label();
        a.mov(rcx, 50u64).unwrap();
        a.set_label(&mut top).unwrap();
        a.paddq(xmm1, xmm2).unwrap();
        a.vpaddq(ymm3, ymm3, ymm2).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(top).unwrap();
        // RBX chooses the fault: 0 none, else a misaligned MOVDQA
        a.lea(rsi, qword_ptr(r15 + rbx)).unwrap();
        a.movdqa(xmm4, xmmword_ptr(rsi)).unwrap();
        a.hlt().unwrap();
    });
    let handler = asm(64, HANDLER, |a| {
        a.mov(r13, qword_ptr(rsp + 8)).unwrap(); // RIP after the error code
        a.mov(r14, 0xfau64).unwrap();
        a.hlt().unwrap();
    });
    let nm_handler = asm(64, HANDLER + 0x100, |a| {
        a.mov(r13, qword_ptr(rsp)).unwrap(); // RIP: no error code
        a.mov(r14, 0x7u64).unwrap();
        a.hlt().unwrap();
    });
    let run = |jit: Option<u32>, misalign: u64, cr0_ts: bool, xcr0: u64| {
        let mut g = guest_with(&code, &[0; 10], 0);
        g.load(HANDLER, &handler);
        g.load(HANDLER + 0x100, &nm_handler);
        g.set_gate(13, HANDLER, 0, 0);
        g.set_gate(7, HANDLER + 0x100, 0, 0);
        g.set_gate(6, HANDLER + 0x100, 0, 0);
        let mut s = g.cpu.state().clone();
        s.gpr[3] = misalign;
        s.cr4 |= 1 << 18;
        s.xcr0 = xcr0;
        if cr0_ts {
            s.cr0 |= 1 << 3;
        }
        s.fpu.xmm[2] = 3;
        s.fpu.ymm_hi[2] = 5;
        g.cpu.set_state(s);
        g.cpu.set_jit_threshold(jit);
        assert_eq!(g.cpu.run(&mut NoDevices, 100_000), RunExit::Halted);
        let s = g.cpu.state();
        (s.gpr, s.fpu.xmm, s.fpu.ymm_hi, g.cpu.compiled_blocks())
    };
    for (misalign, ts, xcr0) in [(0, false, 7), (8, false, 7), (0, true, 7), (0, false, 3)] {
        let i = run(None, misalign, ts, xcr0);
        let c = run(Some(0), misalign, ts, xcr0);
        assert_eq!(
            (c.0, c.1, c.2),
            (i.0, i.1, i.2),
            "misalign {misalign} TS {ts} XCR0 {xcr0}"
        );
        assert!(c.3 > 0);
        match (misalign, ts, xcr0) {
            (0, false, 7) => assert_eq!((i.1[1], i.2[3]), (150, 250)),
            (8, false, 7) => assert_eq!(i.0[14], 0xfa, "#GP"),
            _ => assert_eq!(i.0[14], 7, "#NM or #UD"),
        }
    }
}

/// An instruction that straddles a page boundary runs from a cache of decoded crossing
/// instructions keyed by its bytes: patching its immediate (in the second page) between
/// runs must take effect.
#[test]
fn a_patched_page_crossing_instruction_runs_patched() {
    const AT: u64 = CODE + 0x1000 - 4; // `mov rax, imm64` (10 bytes) crosses at byte 4
    let body = asm(64, AT, |a| {
        a.mov(rax, 0x1111_1111_1111_1111u64).unwrap();
        a.add(rbx, rax).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(AT).unwrap();
        a.ret().unwrap();
    });
    let main = asm(64, CODE, |a| {
        a.mov(rcx, 10u64).unwrap();
        a.call(AT).unwrap();
        // Patch the immediate's high bytes, which lie in the second page.
        a.mov(rdx, 0x2222_2222u64).unwrap();
        a.mov(dword_ptr(AT + 6), edx).unwrap();
        a.mov(rcx, 10u64).unwrap();
        a.call(AT).unwrap();
        a.hlt().unwrap();
    });
    for jit in [None, Some(0)] {
        let mut g = guest_with(&main, &[0; 10], 0);
        g.load(AT, &body);
        g.cpu.set_jit_threshold(jit);
        assert_eq!(g.cpu.run(&mut NoDevices, 100_000), RunExit::Halted);
        let want = 10u64
            .wrapping_mul(0x1111_1111_1111_1111)
            .wrapping_add(10u64.wrapping_mul(0x2222_2222_1111_1111));
        assert_eq!(g.cpu.state().gpr[3], want, "jit {jit:?}");
    }
}

/// A block whose first instruction straddles a page boundary is a block of its own, compiled
/// too, entered from the block before it through a link: its bytes in the second page are
/// whatever that page maps to now. Remapping the second page and flushing the TLB (no code
/// is written, so nothing else tells the block cache) must run the new page's bytes.
#[test]
fn compiled_page_crossing_blocks_follow_the_second_page() {
    const VA: u64 = 0x4000_0000; // two 4 KiB pages: VA -> FIRST, VA + 4K -> FRAME_A/B
    const FIRST: u64 = 0x40_0000;
    const FRAME_A: u64 = 0x50_0000;
    const FRAME_B: u64 = 0x60_0000;
    const LOOP: u64 = VA + 0xff4; // two 4-byte ADDs, then `mov rax, imm64` across the end
    let func = |imm: u64| {
        asm(64, LOOP, |a| {
            let mut top = a.create_label();
            a.set_label(&mut top).unwrap();
            a.add(rdx, 1).unwrap();
            a.add(rsi, 1).unwrap();
            a.mov(rax, imm).unwrap();
            a.add(rbx, rax).unwrap();
            a.dec(rcx).unwrap();
            a.jnz(top).unwrap();
            a.ret().unwrap();
        })
    };
    let (imm_a, imm_b) = (0x1111_2222_3333_4444u64, 0x5555_6666_7777_4444u64);
    let (fa, fb) = (func(imm_a), func(imm_b));
    let head = (0x1000 - (LOOP & 0xfff)) as usize;
    assert_eq!(fa[..head], fb[..head], "only the immediate's tail differs");
    let main = asm(64, CODE, |a| {
        let mut spin = a.create_label();
        a.mov(rcx, 200u64).unwrap();
        a.call(LOOP).unwrap();
        a.set_label(&mut spin).unwrap();
        a.jmp(spin).unwrap();
    });
    let run = |jit| {
        let mut g = guest_with(&main, &[0; 10], 0);
        g.cpu.set_jit_threshold(jit);
        g.cpu.set_recheck_each_run(false);
        g.load(FIRST + (LOOP & 0xfff), &fa[..head]);
        g.load(FRAME_A, &fa[head..]);
        g.load(FRAME_B, &fb[head..]);
        g.map4k(VA, FIRST, 0);
        g.map4k(VA + 0x1000, FRAME_A, 0);
        g.cpu.run(&mut NoDevices, 100_000);
        let first = g.cpu.state().gpr;
        // Remap behind the block cache's back (as a guest would, then INVLPG).
        let ram = g.cpu.ram();
        assert!(g.pt.map(ram, VA + 0x1000, FRAME_B, 1, 0));
        g.cpu.flush_tlb();
        g.cpu.state_mut().rip = CODE;
        g.cpu.state_mut().gpr[1] = 200;
        g.cpu.run(&mut NoDevices, 100_000);
        (first, g.cpu.state().gpr, g.cpu.compiled_blocks())
    };
    let (i1, i2, _) = run(None);
    assert_eq!(i1[3], imm_a.wrapping_mul(200));
    assert_eq!(i1[2], 200);
    assert_eq!(
        i2[3],
        imm_a
            .wrapping_mul(200)
            .wrapping_add(imm_b.wrapping_mul(200)),
        "the second page's new bytes ran"
    );
    let (c1, c2, blocks) = run(Some(0));
    assert!(blocks >= 3, "{blocks} blocks compiled");
    assert_eq!((c1, c2), (i1, i2));
}

/// Prologues and epilogues (runs of PUSHes, POPs and the RET after them) translate their
/// stack range once; ranges that cross a page take the instructions one by one, which
/// must give the interpreter's result, and a non-canonical return address after POPs is
/// the RET's #GP.
#[test]
fn compiled_push_and_pop_runs_match_the_interpreter() {
    const HANDLER: u64 = CODE + 0xc00;
    let code = asm(64, CODE, |a| {
        let mut func = a.create_label();
        let mut top = a.create_label();
        a.mov(rcx, 700u64).unwrap();
        a.mov(rbp, 0x0101_0101u64).unwrap();
        a.set_label(&mut top).unwrap();
        // Walk the stack down 8 bytes an iteration: the runs cross a page now and then.
        a.sub(rsp, 8).unwrap();
        a.mov(rbx, rcx).unwrap();
        a.call(func).unwrap();
        a.add(r9, rax).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(top).unwrap();
        // A bad return address after pops: #GP at the RET.
        a.mov(rax, 0x8000_0000_0000_0000u64).unwrap();
        a.push(rax).unwrap();
        a.push(rbx).unwrap();
        a.push(rbp).unwrap();
        a.pop(rbp).unwrap();
        a.pop(rbx).unwrap();
        a.ret().unwrap();
        a.set_label(&mut func).unwrap();
        a.push(rbp).unwrap();
        a.push(rbx).unwrap();
        a.push(r12).unwrap();
        a.push(r13).unwrap();
        a.push(0x55).unwrap();
        a.push(rcx).unwrap();
        a.lea(rax, qword_ptr(rbx + rbp)).unwrap();
        a.mov(r12, qword_ptr(rsp + 8)).unwrap();
        a.add(rax, r12).unwrap();
        a.pop(rdx).unwrap();
        a.pop(r8).unwrap();
        a.pop(r13).unwrap();
        a.pop(r12).unwrap();
        a.pop(rbx).unwrap();
        a.pop(rbp).unwrap();
        a.ret().unwrap();
    });
    let run = |jit| {
        let mut g = guest_with(&code, &[0; 10], 0);
        g.set_gate(13, HANDLER, 0, 0);
        g.load(
            HANDLER,
            &asm(64, HANDLER, |a| {
                a.mov(r14, qword_ptr(rsp + 8)).unwrap(); // RIP of the RET
                a.hlt().unwrap();
            }),
        );
        let mut s = g.cpu.state().clone();
        s.gpr[4] = 0x70000 + 0x40; // the walk crosses 0x70000 early on
        g.cpu.set_state(s);
        g.cpu.set_jit_threshold(jit);
        assert_eq!(g.cpu.run(&mut NoDevices, 1_000_000), RunExit::Halted);
        let mut stack = [0u8; 0x2000];
        assert!(g.cpu.ram().read(0x6e000, &mut stack));
        (g.cpu.state().gpr, stack.to_vec(), g.cpu.compiled_blocks())
    };
    let (ig, istack, _) = run(None);
    assert_eq!(
        ig[9],
        (1..=700u64).map(|i| i + 0x0101_0101 + 0x55).sum::<u64>()
    );
    assert_ne!(ig[14], 0, "#GP at the RET");
    let (cg, cstack, blocks) = run(Some(0));
    assert!(blocks >= 3, "{blocks}");
    assert_eq!(cg, ig);
    assert_eq!(cstack, istack, "stack contents");
}

/// Random runs of stack instructions mixed with RSP-based operands and with code that
/// uses RDX (the host register compiled stack instructions work on) and RSP as an
/// ordinary register: compiled and interpreted runs leave the same registers and stack.
#[test]
fn compiled_stack_code_mixed_with_rsp_and_rdx_arithmetic_matches_the_interpreter() {
    const REGS: [AsmRegister64; 6] = [rax, rbx, rdx, rsi, r8, r12];
    let one = |a: &mut CodeAssembler, r: &mut Rng| {
        let x = REGS[r.below(6) as usize];
        let d = (r.below(8) * 8) as i32;
        match r.below(19) {
            0 | 1 => a.push(x).unwrap(),
            2 => a.push(r.below(1000) as i32).unwrap(),
            3 | 4 => a.pop(x).unwrap(),
            5 => a.mov(x, qword_ptr(rsp + d)).unwrap(),
            6 => a.mov(qword_ptr(rsp + d), x).unwrap(),
            7 => a.add(x, qword_ptr(rsp + d)).unwrap(),
            8 => a.sub(rsp, 16).unwrap(),
            9 => a.add(rsp, 8).unwrap(),
            10 => a.lea(rsp, qword_ptr(rsp - 8)).unwrap(),
            11 => a.lea(rdx, qword_ptr(rsp + 8 * r.below(4) as i32)).unwrap(),
            12 => a.lea(rdx, qword_ptr(rdx + r.below(64) as i32)).unwrap(),
            13 => a.xchg(rdx, x).unwrap(),
            14 => a.push(qword_ptr(rsp + d)).unwrap(),
            // Register-only work (whose stores compiled code may defer) next to RSP as an
            // operand (which needs a stand-in host register).
            15 => a.mov(x, rsp).unwrap(),
            16 => a.add(x, 0x11).unwrap(),
            17 => a.xor(x, rdx).unwrap(),
            // Reads RDX only (here a stack address) and writes another register.
            _ => a.add(if x == rdx { rax } else { x }, rdx).unwrap(),
        }
    };
    // Each case runs its code three times in a loop: the first pass fills the TLB, the
    // others run compiled.
    let looped = |f: &mut dyn FnMut(&mut CodeAssembler)| {
        asm(64, CODE, |a| {
            let mut top = a.create_label();
            a.mov(r13, 3u64).unwrap();
            a.set_label(&mut top).unwrap();
            f(a);
            a.dec(r13).unwrap();
            a.jnz(top).unwrap();
            a.hlt().unwrap();
        })
    };
    let mut cases: Vec<Vec<u8>> = vec![looped(&mut |a| {
        // RDX: an address in RSP's page, read between two PUSHes.
        a.lea(rdx, qword_ptr(rsp + 0x40)).unwrap();
        a.push(rax).unwrap();
        a.add(rbx, rdx).unwrap();
        a.push(rbx).unwrap();
        a.mov(rsi, qword_ptr(rsp + 8)).unwrap();
    })];
    for seed in 1..=300u64 {
        let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let n = 8 + r.below(24);
        let ops: Vec<u64> = (0..2 * n).map(|_| r.next()).collect();
        cases.push(looped(&mut |a| {
            let mut r = Rng(ops[0] | 1);
            for _ in 0..n {
                one(a, &mut r);
            }
        }));
    }
    let mut r = Rng(7);
    for (seed, code) in cases.iter().enumerate() {
        // Near a page end now and then, so that runs split.
        let rsp0 = 0x70000 + 8 * r.below(24) - 0x60;
        let regs: [u64; 10] = std::array::from_fn(|_| r.next());
        let run = |jit| {
            let mut g = guest_with(code, &regs, 0);
            let mut st = g.cpu.state().clone();
            st.gpr[4] = rsp0;
            g.cpu.set_state(st);
            g.cpu.set_jit_threshold(jit);
            assert_eq!(g.cpu.run(&mut NoDevices, 10_000), RunExit::Halted);
            let mut stack = [0u8; 0x1000];
            assert!(g.cpu.ram().read(0x6f800, &mut stack));
            ((g.cpu.state().gpr, stack.to_vec()), g.cpu.compiled_blocks())
        };
        let (interpreted, _) = run(None);
        let (compiled, blocks) = run(Some(0));
        assert!(blocks >= 1, "case {seed}: nothing compiled");
        assert!(compiled == interpreted, "case {seed}: {code:02x?}");
    }
}

/// Enters 64-bit user code (the test GDT's selectors 0x23 and 0x1b) at `user_rip` with
/// `user_rsp` and `rflags`.
fn iret_to_user(a: &mut CodeAssembler, user_rip: u64, user_rsp: u64, rflags: i32) {
    a.push(0x1b).unwrap();
    a.push(user_rsp as i32).unwrap();
    a.push(rflags).unwrap();
    a.push(0x23).unwrap();
    a.push(user_rip as i32).unwrap();
    a.iretq().unwrap();
}

/// RDTSC runs in compiled code as a call of the CPU's clock: EDX:EAX from the TSC the
/// guest set with WRMSR, never going back, and every other register and the status flags
/// kept across it.
#[test]
fn compiled_rdtsc_reads_the_guest_tsc_and_keeps_the_rest() {
    const START: u64 = 0x12_ffff_f000;
    let code = asm(64, CODE, |a| {
        let (mut top, mut bad) = (a.create_label(), a.create_label());
        a.mov(ecx, 0x10u32).unwrap(); // IA32_TIME_STAMP_COUNTER
        a.mov(eax, START as u32).unwrap();
        a.mov(edx, (START >> 32) as u32).unwrap();
        a.wrmsr().unwrap();
        a.mov(rcx, 3000u64).unwrap();
        a.xor(r9d, r9d).unwrap();
        a.xor(r11d, r11d).unwrap();
        a.mov(rbx, 0x1111u64).unwrap();
        a.mov(rsi, 0x2222u64).unwrap();
        a.mov(rdi, 0x3333u64).unwrap();
        a.mov(r8, 0x4444u64).unwrap();
        a.mov(r10, 0x5555u64).unwrap();
        a.set_label(&mut top).unwrap();
        a.cmp(rbx, rsi).unwrap(); // CF = 1
        a.rdtsc().unwrap();
        a.adc(r11, 0).unwrap();
        a.shl(rdx, 32).unwrap();
        a.or(rax, rdx).unwrap();
        a.cmp(rax, r9).unwrap();
        a.jb(bad).unwrap();
        a.mov(r9, rax).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
        a.set_label(&mut bad).unwrap();
        a.mov(r12, 1u64).unwrap();
        a.hlt().unwrap();
    });
    let run = |jit| {
        let mut g = guest_with(&code, &[0; 10], 0);
        g.cpu.set_jit_threshold(jit);
        assert_eq!(g.cpu.run(&mut NoDevices, 1_000_000), RunExit::Halted);
        (g.cpu.state().gpr, g.cpu.compiled_blocks())
    };
    for jit in [None, Some(0)] {
        let (r, blocks) = run(jit);
        assert_eq!(r[12], 0, "the TSC went back ({jit:?})");
        assert_eq!(r[11], 3000, "CF kept across RDTSC ({jit:?})");
        assert_eq!(
            [r[3], r[6], r[7], r[8], r[10]],
            [0x1111, 0x2222, 0x3333, 0x4444, 0x5555],
            "{jit:?}"
        );
        // Set at START, then 1 GHz of host time: well under a minute has passed.
        assert!(
            r[9] >= START && r[9] - START < 60_000_000_000,
            "{:#x}",
            r[9]
        );
        if jit.is_some() {
            assert!(blocks >= 1);
        }
    }
}

/// RDTSCP runs in compiled code like RDTSC and loads ECX from IA32_TSC_AUX (Linux reads
/// its clock with it wherever the CPU has it: every kvmclock read).
#[test]
fn compiled_rdtscp_reads_the_tsc_and_tsc_aux() {
    let code = asm(64, CODE, |a| {
        let (mut top, mut bad) = (a.create_label(), a.create_label());
        a.mov(ecx, 0xc000_0103u32).unwrap(); // IA32_TSC_AUX
        a.mov(eax, 0x77u32).unwrap();
        a.xor(edx, edx).unwrap();
        a.wrmsr().unwrap();
        a.mov(r14, 3000u64).unwrap();
        a.xor(r9d, r9d).unwrap();
        a.xor(r13d, r13d).unwrap();
        a.mov(rbx, 0x1111u64).unwrap();
        a.set_label(&mut top).unwrap();
        a.mov(rcx, rbx).unwrap();
        a.rdtscp().unwrap();
        a.add(r13, rcx).unwrap();
        a.shl(rdx, 32).unwrap();
        a.or(rax, rdx).unwrap();
        a.cmp(rax, r9).unwrap();
        a.jb(bad).unwrap();
        a.mov(r9, rax).unwrap();
        a.dec(r14).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
        a.set_label(&mut bad).unwrap();
        a.mov(r12, 1u64).unwrap();
        a.hlt().unwrap();
    });
    for jit in [None, Some(0)] {
        let mut g = guest_with(&code, &[0; 10], 0);
        g.cpu.set_jit_threshold(jit);
        assert_eq!(g.cpu.run(&mut NoDevices, 1_000_000), RunExit::Halted);
        let r = g.cpu.state().gpr;
        assert_eq!(r[12], 0, "the TSC went back ({jit:?})");
        assert_eq!(r[13], 3000 * 0x77, "ECX from TSC_AUX ({jit:?})");
        assert_eq!(r[3], 0x1111, "{jit:?}");
        if jit.is_some() {
            assert!(g.cpu.compiled_blocks() >= 1);
        }
    }
}

/// PAUSE runs in compiled code and is counted there as the interpreter counts it: a spin
/// loop ends its run with `Paused` after exactly `PAUSE_SPIN` of them either way, keeps the
/// flags the loop's branch tests across the PAUSE, and (compiled) goes round without
/// coming back to the dispatcher for every turn.
#[test]
fn compiled_pause_counts_the_spin_and_keeps_the_flags() {
    let spin = u64::from(x86emu::PAUSE_SPIN);
    let code = asm(64, CODE, |a| {
        let mut top = a.create_label();
        a.xor(r10d, r10d).unwrap();
        a.set_label(&mut top).unwrap();
        a.add(r10, 1).unwrap();
        a.cmp(r10, 200).unwrap();
        a.pause().unwrap();
        a.jne(top).unwrap();
        a.hlt().unwrap();
    });
    for jit in [None, Some(0)] {
        let mut g = guest_with(&code, &[0; 10], 0);
        g.cpu.set_jit_threshold(jit);
        for turn in 1..=200 / spin {
            assert_eq!(
                g.cpu.run(&mut NoDevices, 1_000_000),
                RunExit::Paused,
                "{jit:?}"
            );
            assert_eq!(g.cpu.state().gpr[10], turn * spin, "{jit:?}");
        }
        assert_eq!(
            g.cpu.run(&mut NoDevices, 1_000_000),
            RunExit::Halted,
            "{jit:?}"
        );
        assert_eq!(g.cpu.state().gpr[10], 200, "{jit:?}");
        if jit.is_some() {
            assert!(
                g.cpu.dispatched_blocks() < 50,
                "compiled turns chain: {} dispatches",
                g.cpu.dispatched_blocks()
            );
        } else {
            assert!(g.cpu.dispatched_blocks() >= 200);
        }
    }
}

/// Two hot functions whose blocks hash to the same slot: both stay cached (a slot pair),
/// so both compile, and compiled code finds the one in the pair's second slot through its
/// own lookup. A direct-mapped cache had them evict each other at every call, forever
/// interpreted (a system call's entry and exit paths did, twice per call).
#[test]
fn colliding_hot_blocks_both_compile() {
    const F: u64 = CODE + 0x600;
    // slot = gpa + (gpa >> 12) + (ip >> 12) mod 4096 slots, code identity-mapped: one page
    // on, two bytes back, collides.
    const G: u64 = F + 0x1000 - 2;
    let code = asm(64, CODE, |a| {
        let mut top = a.create_label();
        a.xor(eax, eax).unwrap();
        a.mov(rcx, 2000u64).unwrap();
        a.set_label(&mut top).unwrap();
        a.call(F).unwrap();
        a.call(G).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    let run = |jit| {
        let mut g = guest_with(&code, &[0; 10], 0);
        g.load(
            F,
            &asm(64, F, |a| {
                a.add(rax, 1).unwrap();
                a.ret().unwrap();
            }),
        );
        g.load(
            G,
            &asm(64, G, |a| {
                a.add(rax, 2).unwrap();
                a.ret().unwrap();
            }),
        );
        g.cpu.set_block_slots(4096);
        g.cpu.set_jit_threshold(jit);
        assert_eq!(g.cpu.run(&mut NoDevices, 1_000_000), RunExit::Halted);
        (g.cpu.state().gpr[0], g.cpu.compiled_blocks())
    };
    let (i, _) = run(None);
    assert_eq!(i, 6000);
    let (c, blocks) = run(Some(16));
    assert_eq!(c, i);
    // The loop's three blocks, F and G.
    assert!(blocks >= 5, "{blocks} blocks compiled");
}

/// Compiled code reaches a page-crossing block through its own lookup (after a CALL or a
/// RET) as well as through links; the block's second page was checked at the privilege it
/// was first run at, so user code that calls the same instruction, whose second page is
/// the kernel's, must take the #PF on the fetch as the interpreter does, not run the bytes
/// the kernel was allowed to.
#[test]
fn compiled_page_crossing_blocks_recheck_the_privilege_of_their_second_page() {
    use x86emu::testing::{PTE_U, PTE_W};
    const UCODE: u64 = 0x5000_0000; // user page; the next one is supervisor-only
    const SUP: u64 = UCODE + 0x1000;
    const F: u64 = SUP - 4; // `mov rax, imm64` across the two, then RET
    const UMAIN: u64 = 0x5000_2000;
    const USTACK: u64 = 0x5000_5000;
    const HANDLER: u64 = CODE + 0xc00;
    let f = asm(64, F, |a| {
        a.mov(rax, 0x1234_5678_9abc_def0u64).unwrap();
        a.ret().unwrap();
    });
    let kernel = asm(64, CODE, |a| {
        let mut top = a.create_label();
        a.mov(rcx, 300u64).unwrap();
        a.set_label(&mut top).unwrap();
        a.call(F).unwrap();
        a.add(rbx, rax).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(top).unwrap();
        iret_to_user(a, UMAIN, USTACK, 0x2);
    });
    const G: u64 = UCODE + 0x100; // a plain RET
    let user = asm(64, UMAIN, |a| {
        // Warm the stack's TLB entry, so that the CALL of F below runs compiled.
        let mut top = a.create_label();
        a.xor(eax, eax).unwrap();
        a.mov(rcx, 3u64).unwrap();
        a.set_label(&mut top).unwrap();
        a.call(G).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(top).unwrap();
        a.call(F).unwrap();
        a.mov(r12, 1u64).unwrap();
        a.hlt().unwrap();
    });
    let run = |jit| {
        let mut g = guest_with(&kernel, &[0; 10], 0);
        g.map4k(UCODE, 0x31_0000, PTE_U);
        g.map4k(SUP, 0x31_1000, 0);
        g.map4k(UMAIN, 0x31_2000, PTE_U);
        g.map4k(USTACK - 0x1000, 0x31_4000, PTE_U | PTE_W);
        g.load(0x31_0000 + (F & 0xfff), &f[..4]);
        g.load(0x31_1000, &f[4..]);
        g.load(0x31_2000, &user);
        g.load(0x31_0000 + (G & 0xfff), &[0xc3]);
        g.set_gate(14, HANDLER, 0, 0);
        g.load(
            HANDLER,
            &asm(64, HANDLER, |a| {
                a.mov(r13, cr2).unwrap();
                a.mov(r14, qword_ptr(rsp + 8)).unwrap(); // RIP of the fault
                a.hlt().unwrap();
            }),
        );
        let mut s = g.cpu.state().clone();
        s.rip = CODE;
        g.cpu.set_state(s);
        g.cpu.set_jit_threshold(jit);
        assert_eq!(g.cpu.run(&mut NoDevices, 100_000), RunExit::Halted);
        (g.cpu.state().gpr, g.cpu.compiled_blocks())
    };
    let (i, _) = run(None);
    assert_eq!(
        i[3],
        300u64.wrapping_mul(0x1234_5678_9abc_def0),
        "the kernel's calls"
    );
    assert_eq!(
        (i[13], i[14]),
        (SUP, F),
        "#PF on the fetch of the second page"
    );
    assert_eq!((i[0], i[12]), (0, 0), "nothing of F ran in user mode");
    let (c, blocks) = run(Some(0));
    assert!(blocks >= 3, "{blocks} blocks compiled");
    assert_eq!(c, i);
}

/// Compiled code checks a TLB entry's permission for the current privilege: a page the
/// kernel just used stays out of reach of user code, a read-only page of stores, and an
/// access whose last byte lies in such a page faults like in the interpreter.
#[test]
fn compiled_user_code_sees_the_privilege_of_warm_tlb_entries() {
    use x86emu::testing::{PTE_U, PTE_W};
    const UCODE: u64 = 0x5000_0000;
    const UDATA: u64 = 0x5000_1000;
    const SUP: u64 = 0x5000_2000;
    const RO: u64 = 0x5000_3000;
    const USTACK: u64 = 0x5000_5000;
    const HANDLER: u64 = CODE + 0xc00;
    let kernel = asm(64, CODE, |a| {
        // Warm the TLB with the supervisor and read-only pages, then enter user mode.
        a.mov(rax, qword_ptr(SUP)).unwrap();
        a.mov(rax, qword_ptr(RO)).unwrap();
        iret_to_user(a, UCODE, USTACK, 0x2);
    });
    let user = asm(64, UCODE, |a| {
        let mut top = a.create_label();
        a.mov(rcx, 300u64).unwrap();
        a.xor(eax, eax).unwrap();
        a.set_label(&mut top).unwrap();
        a.add(rax, qword_ptr(UDATA)).unwrap();
        a.mov(qword_ptr(UDATA + 8), rax).unwrap();
        a.mov(rdx, qword_ptr(RO)).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(top).unwrap();
        // RBX picks the faulting access: 0 a supervisor read, 1 a read-only store,
        // 2 a read whose last byte is in the supervisor page.
        let (mut w, mut x) = (a.create_label(), a.create_label());
        a.cmp(rbx, 1).unwrap();
        a.je(w).unwrap();
        a.ja(x).unwrap();
        a.mov(rdx, qword_ptr(SUP)).unwrap();
        a.hlt().unwrap();
        a.set_label(&mut w).unwrap();
        a.mov(qword_ptr(RO), rax).unwrap();
        a.hlt().unwrap();
        a.set_label(&mut x).unwrap();
        a.mov(rdx, qword_ptr(SUP - 4)).unwrap();
        a.hlt().unwrap();
    });
    let run = |jit, which: u64| {
        let mut g = guest_with(&kernel, &[0; 10], 0);
        g.map4k(UCODE, 0x31_0000, PTE_U);
        g.map4k(UDATA, 0x31_1000, PTE_U | PTE_W);
        g.map4k(SUP, 0x31_2000, PTE_W);
        g.map4k(RO, 0x31_3000, PTE_U);
        g.map4k(USTACK - 0x1000, 0x31_4000, PTE_U | PTE_W);
        g.load(0x31_0000, &user);
        g.load(0x31_1000, &7u64.to_le_bytes());
        g.set_gate(14, HANDLER, 0, 0);
        g.load(
            HANDLER,
            &asm(64, HANDLER, |a| {
                a.mov(r13, qword_ptr(rsp)).unwrap(); // error code
                a.mov(r14, cr2).unwrap();
                a.hlt().unwrap();
            }),
        );
        let mut s = g.cpu.state().clone();
        s.gpr[3] = which;
        s.rip = CODE;
        g.cpu.set_state(s);
        g.cpu.set_jit_threshold(jit);
        assert_eq!(g.cpu.run(&mut NoDevices, 100_000), RunExit::Halted);
        (g.cpu.state().gpr, g.cpu.compiled_blocks())
    };
    for which in 0..3 {
        let (i, _) = run(None, which);
        let (c, blocks) = run(Some(0), which);
        assert!(blocks > 0);
        assert_eq!(c, i, "case {which}");
        let (error, fault_at) = (i[13], i[14]);
        match which {
            0 => assert_eq!(
                (error, fault_at),
                (5, SUP),
                "user read of a supervisor page"
            ),
            1 => assert_eq!((error, fault_at), (7, RO), "user write of a read-only page"),
            _ => assert_eq!((error, fault_at), (5, SUP), "read whose end is supervisor"),
        }
        assert_eq!(i[0], 7 * 300);
    }
}

/// With `set_recheck_each_run(false)`, code another agent (a device's DMA) writes between
/// runs is seen once the write is reported to the code tracker, compiled or not.
#[test]
fn reported_external_code_writes_are_seen_without_rechecking_each_run() {
    let code = |n: i32| {
        asm(64, CODE, |a| {
            let mut top = a.create_label();
            a.mov(rcx, 100u64).unwrap();
            a.set_label(&mut top).unwrap();
            a.add(rax, n).unwrap();
            a.dec(rcx).unwrap();
            a.jnz(top).unwrap();
            a.hlt().unwrap();
        })
    };
    for jit in [None, Some(0)] {
        let mut g = guest_with(&code(1), &[0; 10], 0);
        g.cpu.set_jit_threshold(jit);
        g.cpu.set_recheck_each_run(false);
        assert_eq!(g.cpu.run(&mut NoDevices, 100_000), RunExit::Halted);
        assert_eq!(g.cpu.state().gpr[0], 100);
        g.load(CODE, &code(3));
        g.cpu.code_tracker().note_external_write(CODE + 4, 8);
        let mut s = g.cpu.state().clone();
        s.rip = CODE;
        g.cpu.set_state(s);
        assert_eq!(g.cpu.run(&mut NoDevices, 100_000), RunExit::Halted);
        assert_eq!(g.cpu.state().gpr[0], 400, "jit {jit:?}: the new code ran");
    }
}

/// Bit-string instructions at register offsets (either sign, 64- and 32-bit, LOCKed),
/// CMPXCHG16B (aligned; misaligned is #GP) and prefetches in compiled code against the
/// interpreter.
#[test]
fn compiled_bit_strings_cmpxchg16b_and_prefetches_match_the_interpreter() {
    const HANDLER: u64 = CODE + 0xc00;
    let code = asm(64, CODE, |a| {
        let mut top = a.create_label();
        let mut skip = a.create_label();
        a.mov(r12, 200u64).unwrap();
        a.lea(rdi, qword_ptr(r15 + 0x100)).unwrap();
        a.set_label(&mut top).unwrap();
        a.prefetcht0(byte_ptr(rdi + 64)).unwrap();
        a.prefetchw(byte_ptr(rdi)).unwrap();
        a.mov(rsi, r12).unwrap();
        a.imul_3(rsi, rsi, 37).unwrap();
        a.and(rsi, 383).unwrap();
        a.sub(rsi, 128).unwrap();
        a.bt(qword_ptr(rdi), rsi).unwrap();
        a.adc(r8, 0).unwrap();
        a.lock().bts(qword_ptr(rdi), rsi).unwrap();
        a.adc(r8, 0).unwrap();
        a.btc(dword_ptr(rdi + 8), esi).unwrap();
        a.adc(r9, 0).unwrap();
        a.btr(qword_ptr(rdi + 16), rsi).unwrap();
        a.adc(r9, 0).unwrap();
        a.mov(rax, qword_ptr(r15 + 0x1c0)).unwrap();
        a.mov(rdx, qword_ptr(r15 + 0x1c8)).unwrap();
        a.mov(rbx, r12).unwrap();
        a.mov(rcx, r8).unwrap();
        a.test(r12, 1).unwrap();
        a.jz(skip).unwrap();
        a.not(rax).unwrap();
        a.set_label(&mut skip).unwrap();
        a.lock().cmpxchg16b(xmmword_ptr(r15 + 0x1c0)).unwrap();
        a.setz(r11b).unwrap();
        a.movzx(r11d, r11b).unwrap();
        a.add(r10, r11).unwrap();
        a.dec(r12).unwrap();
        a.jnz(top).unwrap();
        // RBX picks the end: 0 halt, else a misaligned CMPXCHG16B (#GP).
        a.test(r13, r13).unwrap();
        let mut done = a.create_label();
        a.jz(done).unwrap();
        a.cmpxchg16b(xmmword_ptr(r15 + 0x1c8)).unwrap();
        a.set_label(&mut done).unwrap();
        a.hlt().unwrap();
    });
    let run = |jit, misalign: u64| {
        let mut g = guest_with(&code, &[0; 10], 0);
        g.set_gate(13, HANDLER, 0, 0);
        g.load(
            HANDLER,
            &asm(64, HANDLER, |a| {
                a.mov(r14, qword_ptr(rsp + 8)).unwrap();
                a.hlt().unwrap();
            }),
        );
        let mut s = g.cpu.state().clone();
        s.gpr[13] = misalign;
        g.cpu.set_state(s);
        g.cpu.set_jit_threshold(jit);
        assert_eq!(g.cpu.run(&mut NoDevices, 1_000_000), RunExit::Halted);
        let mut mem = [0u8; 512];
        assert!(g.cpu.ram().read(DATA, &mut mem));
        (g.cpu.state().gpr, mem.to_vec(), g.cpu.compiled_blocks())
    };
    for misalign in [0, 1] {
        let (ig, imem, _) = run(None, misalign);
        let (cg, cmem, blocks) = run(Some(0), misalign);
        assert!(blocks >= 2);
        assert_eq!(cg, ig, "misalign {misalign}");
        assert_eq!(cmem, imem, "memory, misalign {misalign}");
        assert_ne!(ig[10], 0, "some CMPXCHG16B succeeded");
        if misalign != 0 {
            assert_ne!(ig[14], 0, "#GP");
        }
    }
}

/// Compiled code whose accesses keep missing the TLB (two pages that share a slot, 4 MiB
/// apart, read and written in turn with most registers cached) gives the interpreter's
/// results; an access to an unmapped page still ends in the guest's #PF with the right CR2.
#[test]
fn compiled_code_with_conflicting_tlb_entries_matches_the_interpreter() {
    const FAR: u64 = DATA + 0x400_0000; // same TLB slot as DATA (virtual, mapped below)
    const FAR_FRAME: u64 = DATA + 0x40_0000;
    const UNMAPPED: u64 = 0x4000_0000;
    const HANDLER: u64 = CODE + 0xc00;
    let code = asm(64, CODE, |a| {
        let mut top = a.create_label();
        a.mov(rcx, 500u64).unwrap();
        a.mov(rdi, FAR).unwrap();
        a.set_label(&mut top).unwrap();
        for r in [rax, rbx, rdx, rsi, r8, r9, r10, r11] {
            a.add(r, rcx).unwrap();
        }
        a.add(rax, qword_ptr(r15 + 8)).unwrap();
        a.mov(qword_ptr(rdi + 16), rax).unwrap();
        a.xor(rbx, qword_ptr(rdi + 16)).unwrap();
        a.add(qword_ptr(r15 + 24), rbx).unwrap();
        a.lea(r12, qword_ptr(rax + rbx)).unwrap();
        a.add(r12, qword_ptr(rdi + 16)).unwrap();
        a.add(r13, r12).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(top).unwrap();
        a.mov(r14, qword_ptr(UNMAPPED + 8)).unwrap();
        a.hlt().unwrap();
    });
    let run = |jit| {
        let mut g = guest_with(&code, &[0; 10], 0);
        g.set_gate(14, HANDLER, 0, 0);
        g.load(
            HANDLER,
            &asm(64, HANDLER, |a| {
                a.mov(r14, cr2).unwrap();
                a.hlt().unwrap();
            }),
        );
        g.map4k(FAR, FAR_FRAME, x86emu::testing::PTE_W);
        g.cpu.set_jit_threshold(jit);
        assert_eq!(g.cpu.run(&mut NoDevices, 1_000_000), RunExit::Halted);
        let mut mem = [0u8; 64];
        assert!(g.cpu.ram().read(DATA, &mut mem));
        let far = g.read_u64(FAR_FRAME + 16);
        (
            g.cpu.state().gpr,
            mem.to_vec(),
            far,
            g.cpu.compiled_blocks(),
        )
    };
    let interpreted = run(None);
    assert_eq!(interpreted.0[14], UNMAPPED + 8, "#PF with CR2");
    let compiled = run(Some(0));
    assert!(compiled.3 > 0);
    assert_eq!(compiled.0, interpreted.0);
    assert_eq!(compiled.1, interpreted.1);
    assert_eq!(compiled.2, interpreted.2);
}

/// PUSHFQ, CLI, STI and SWAPGS in compiled code: the pushed image (status flags from the
/// host, IF and the rest from the state, never RF), CLI clearing IF and STI setting it
/// mid-block, GS-relative reads after each SWAPGS, and CLI at CPL3 with IOPL 0 left to the
/// interpreter's #GP.
#[test]
fn compiled_pushf_cli_sti_and_swapgs_match_the_interpreter() {
    use x86emu::testing::{PTE_U, PTE_W};
    const UCODE: u64 = 0x5000_0000;
    const USTACK: u64 = 0x5000_5000;
    const HANDLER: u64 = CODE + 0xc00;
    let kernel = asm(64, CODE, |a| {
        let mut top = a.create_label();
        a.mov(rcx, 200u64).unwrap();
        a.mov(rax, 0x7fff_fff0u64).unwrap();
        a.set_label(&mut top).unwrap();
        // Flags that differ from one iteration to the next, pushed with IF set, then
        // again after a CLI in the same block; STI sets IF again (and the block goes on).
        a.add(eax, ecx).unwrap();
        a.endbr64().unwrap();
        a.pushfq().unwrap();
        a.pop(rdx).unwrap();
        a.lfence().unwrap();
        a.add(r9, rdx).unwrap();
        a.mfence().unwrap();
        a.cli().unwrap();
        a.sfence().unwrap();
        a.pause().unwrap();
        a.sub(eax, 0x1234).unwrap();
        a.pushfq().unwrap();
        a.pop(rdx).unwrap();
        a.xor(r10, rdx).unwrap();
        a.rol(r10, 7).unwrap();
        // SWAPGS twice around GS-relative reads (the other base is DATA + 0x100).
        a.swapgs().unwrap();
        a.add(r11, qword_ptr(rcx * 8).gs()).unwrap();
        a.swapgs().unwrap();
        a.add(r11, qword_ptr(rcx + 0x10).gs()).unwrap();
        a.sti().unwrap();
        a.dec(rcx).unwrap();
        a.jnz(top).unwrap();
        // User mode with IOPL 0: PUSHFQ works, CLI raises #GP.
        iret_to_user(a, UCODE, USTACK, 0x202);
    });
    let user = asm(64, UCODE, |a| {
        let mut top = a.create_label();
        a.mov(rcx, 300u64).unwrap();
        a.set_label(&mut top).unwrap();
        a.add(rbx, rcx).unwrap();
        a.pushfq().unwrap();
        a.pop(rdx).unwrap();
        a.add(r11, rdx).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(top).unwrap();
        a.pushfq().unwrap();
        a.pop(r12).unwrap();
        a.cli().unwrap();
        a.hlt().unwrap();
    });
    let run = |jit| {
        let mut g = guest_with(&kernel, &[0; 10], 0);
        g.map4k(UCODE, 0x31_0000, PTE_U);
        g.map4k(USTACK - 0x1000, 0x31_4000, PTE_U | PTE_W);
        g.load(0x31_0000, &user);
        g.set_gate(13, HANDLER, 0, 0);
        g.load(
            HANDLER,
            &asm(64, HANDLER, |a| {
                a.mov(r13, qword_ptr(rsp)).unwrap(); // error code
                a.mov(r14, qword_ptr(rsp + 8)).unwrap(); // RIP of the CLI
                a.hlt().unwrap();
            }),
        );
        let mut s = g.cpu.state().clone();
        s.rip = CODE;
        s.rflags |= x86emu::state::flags::IF;
        s.msr.kernel_gs_base = DATA + 0x100;
        g.cpu.set_state(s);
        g.cpu.set_jit_threshold(jit);
        // The loop's PAUSEs end a run now and then (a spin, as far as `run` knows).
        let mut pauses = 0;
        loop {
            match g.cpu.run(&mut NoDevices, 1_000_000) {
                RunExit::Paused => pauses += 1,
                e => {
                    assert_eq!(e, RunExit::Halted);
                    break;
                }
            }
        }
        assert_eq!(pauses, 200 / x86emu::PAUSE_SPIN as usize);
        (g.cpu.state().gpr, g.cpu.compiled_blocks())
    };
    let (i, _) = run(None);
    let (c, blocks) = run(Some(0));
    assert!(blocks > 0);
    assert_eq!(c, i);
    assert_eq!(i[13], 0, "#GP(0)");
    // The user code ends with CLI, HLT.
    assert_eq!(i[14], UCODE + user.len() as u64 - 2, "at the user's CLI");
    assert_eq!(i[12] & 0x3200, 0x200, "user PUSHFQ: IF set, IOPL 0");
    assert_ne!(i[9], 0);
}

/// REP STOSB/STOSQ in compiled code: a whole page (Linux's clear_page), a few bytes, and
/// what is left to the interpreter (a range crossing a page, RCX = 0, DF set, a page that
/// holds code); memory, registers and the flags around them as the interpreter has them.
#[test]
fn compiled_rep_stos_matches_the_interpreter() {
    let target = CODE + 0x900;
    let code = asm(64, CODE, |a| {
        let cases: [(u64, u64, u64, bool); 6] = [
            (DATA + 0x1000, 512, 0x1122_3344_5566_7788, true),
            (DATA + 0x2010, 37, 0xab, false),
            (DATA + 0x2fd0, 100, 0xcd, false),
            (DATA + 0x3000, 0, 0x77, true),
            (DATA + 0x3100, 3, 0x99, true),
            (target, 8, 0x90, false),
        ];
        // Twice: the first pass fills the TLB (compiled code leaves on a miss).
        let mut top = a.create_label();
        a.mov(r12, 2u64).unwrap();
        a.set_label(&mut top).unwrap();
        for (i, (at, count, value, qwords)) in cases.into_iter().enumerate() {
            if i == 4 {
                a.std().unwrap();
            }
            a.mov(rdi, at).unwrap();
            a.mov(rcx, count).unwrap();
            a.mov(rax, value).unwrap();
            a.cmp(rcx, 37).unwrap();
            if qwords {
                a.rep().stosq().unwrap();
            } else {
                a.rep().stosb().unwrap();
            }
            a.pushfq().unwrap();
            a.pop(rdx).unwrap();
            a.add(r9, rdx).unwrap();
            a.add(r10, rdi).unwrap();
            a.add(r11, rcx).unwrap();
            if i == 4 {
                a.cld().unwrap();
            }
        }
        a.dec(r12).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    let run = |jit| {
        let mut g = guest_with(&code, &[0; 10], 0);
        g.load(target, &[0xcc; 16]);
        g.cpu.set_jit_threshold(jit);
        assert_eq!(g.cpu.run(&mut NoDevices, 1_000_000), RunExit::Halted);
        let mut data = vec![0u8; 0x4000];
        assert!(g.cpu.ram().read(DATA, &mut data));
        let mut patched = [0u8; 16];
        assert!(g.cpu.ram().read(target, &mut patched));
        (
            g.cpu.state().gpr,
            g.cpu.state().rflags,
            data,
            patched,
            g.cpu.compiled_blocks(),
        )
    };
    let (ig, iflags, idata, ipatched, _) = run(None);
    let (cg, cflags, cdata, cpatched, blocks) = run(Some(0));
    assert!(blocks > 0);
    assert_eq!(cg, ig);
    assert_eq!(cflags, iflags);
    assert!(cdata == idata, "memory after the stores");
    assert_eq!(cpatched, ipatched);
    assert_eq!(
        &idata[0x1000..0x1008],
        &0x1122_3344_5566_7788u64.to_le_bytes()
    );
    assert_eq!(idata[0x2010 + 36], 0xab);
    assert_eq!(idata[0x2fd0 + 99], 0xcd);
    assert_eq!(ipatched[..8], [0x90; 8]);
}

/// AH, BH, CH and DH in compiled code (as registers and beside memory operands, whose host
/// pointer must then need no REX prefix) against the interpreter.
#[test]
fn compiled_high_byte_registers_match_the_interpreter() {
    let code = asm(64, CODE, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top).unwrap();
        a.add(ah, bl).unwrap();
        a.test(bh, 4).unwrap();
        a.setnz(dl).unwrap();
        a.movzx(ebp, bh).unwrap();
        a.xor(dh, ch).unwrap();
        a.mov(ch, byte_ptr(rsi + 8)).unwrap();
        a.add(byte_ptr(rsi + 16), ah).unwrap();
        a.and(dh, 0x40).unwrap();
        a.xchg(ah, bh).unwrap();
        a.add(rbx, rdi).unwrap();
        a.add(rdi, 0x1357).unwrap();
        a.add(rcx, rbp).unwrap();
        a.add(rdx, rax).unwrap();
        a.dec(r9).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    let regs = [
        0x1122_3344_5566_7788,
        0x99aa_bbcc_ddee_ff00,
        0x0123_4567_89ab_cdef,
        0xfedc_ba98_7654_3210,
        DATA,
        0x55,
        0,
        300,
        0,
        0,
    ];
    let run = |jit| {
        let mut g = guest_with(&code, &regs, 0);
        g.cpu.set_jit_threshold(jit);
        assert_eq!(g.cpu.run(&mut NoDevices, 1_000_000), RunExit::Halted);
        let mut mem = [0u8; 32];
        assert!(g.cpu.ram().read(DATA, &mut mem));
        (
            g.cpu.state().gpr,
            g.cpu.state().rflags & 0x8d5,
            mem,
            g.cpu.compiled_blocks(),
        )
    };
    let i = run(None);
    let c = run(Some(0));
    assert!(c.3 > 0);
    assert_eq!((c.0, c.1, c.2), (i.0, i.1, i.2));
}

/// PUSH m64 (RSP-relative, GS-relative, from a read-only page) and CALL through a pointer
/// in a read-only page, compiled, against the interpreter.
#[test]
fn compiled_push_memory_and_calls_through_read_only_tables_match_the_interpreter() {
    const RO: u64 = 0x4000_0000; // read-only, supervisor
    const RO_FRAME: u64 = 0x50_0000;
    let code = asm(64, CODE, |a| {
        let mut top = a.create_label();
        let mut func = a.create_label();
        a.mov(rcx, 200u64).unwrap();
        a.set_label(&mut top).unwrap();
        a.push(qword_ptr(r15 + 8)).unwrap();
        a.push(qword_ptr(rsp + 8)).unwrap();
        a.push(qword_ptr(0x10).gs()).unwrap();
        a.push(qword_ptr(RO)).unwrap();
        a.pop(rax).unwrap();
        a.pop(rbx).unwrap();
        a.pop(rdx).unwrap();
        a.pop(rsi).unwrap();
        a.add(r8, rax).unwrap();
        a.add(r9, rbx).unwrap();
        a.add(r10, rdx).unwrap();
        a.add(r12, rsi).unwrap();
        a.add(qword_ptr(r15 + 8), rcx).unwrap();
        a.mov(rdi, RO).unwrap();
        a.call(qword_ptr(rdi + 8)).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
        a.set_label(&mut func).unwrap();
        a.add(r11, rcx).unwrap();
        a.ret().unwrap();
    });
    // `func` is the ADD R11 before the final RET.
    let func = iced_x86::Decoder::with_ip(64, &code, CODE, 0)
        .iter()
        .find(|i| {
            i.mnemonic() == iced_x86::Mnemonic::Add && i.op0_register() == iced_x86::Register::R11
        })
        .map(|i| i.ip())
        .unwrap();
    let run = |jit| {
        let mut g = guest_with(&code, &[0; 10], 0);
        g.map4k(RO, RO_FRAME, 0);
        g.load(RO_FRAME, &0x0123_4567_89ab_cdefu64.to_le_bytes());
        g.load(RO_FRAME + 8, &func.to_le_bytes());
        g.cpu.set_jit_threshold(jit);
        assert_eq!(g.cpu.run(&mut NoDevices, 1_000_000), RunExit::Halted);
        (
            g.cpu.state().gpr,
            g.read_u64(DATA + 8),
            g.cpu.compiled_blocks(),
        )
    };
    let i = run(None);
    assert_eq!(i.0[8], 0x0123_4567_89ab_cdefu64.wrapping_mul(200));
    assert_eq!(i.0[11], (1..=200).sum::<u64>());
    let c = run(Some(0));
    assert!(c.2 > 0);
    assert_eq!((c.0, c.1), (i.0, i.1));
}

/// REP MOVSB/MOVSQ in compiled code against the interpreter: within a page, overlapping
/// forwards (the pattern-replicating copy), a source or destination crossing a page, a
/// zero count, DF set, and a copy onto code ahead.
#[test]
fn compiled_rep_movs_matches_the_interpreter() {
    let target = CODE + 0x900;
    let code = asm(64, CODE, |a| {
        // (source, destination, count, qwords)
        let cases: [(u64, u64, u64, bool); 7] = [
            (DATA, DATA + 0x1000, 64, true),
            (DATA + 0x10, DATA + 0x2013, 300, false),
            (DATA + 0x1000, DATA + 0x1003, 200, false), // overlapping, forwards
            (DATA + 0xff0, DATA + 0x2100, 40, false),   // source crosses a page
            (DATA + 0x20, DATA + 0x2ff8, 2, true),      // destination crosses a page
            (DATA, DATA + 0x3000, 0, true),
            (DATA + 0x40, DATA + 0x3100, 5, false), // with DF set
        ];
        let mut top = a.create_label();
        a.mov(r12, 2u64).unwrap();
        a.set_label(&mut top).unwrap();
        for (i, (src, dst, count, qwords)) in cases.into_iter().enumerate() {
            if i == 6 {
                a.std().unwrap();
            }
            a.mov(rsi, src).unwrap();
            a.mov(rdi, dst).unwrap();
            a.mov(rcx, count).unwrap();
            a.cmp(rcx, 37).unwrap();
            if qwords {
                a.rep().movsq().unwrap();
            } else {
                a.rep().movsb().unwrap();
            }
            a.pushfq().unwrap();
            a.pop(rdx).unwrap();
            a.add(r9, rdx).unwrap();
            a.add(r10, rdi).unwrap();
            a.add(r11, rcx).unwrap();
            a.add(r8, rsi).unwrap();
            if i == 6 {
                a.cld().unwrap();
            }
        }
        // Copy NOPs over the code that follows (a HLT before the final one).
        a.mov(rsi, DATA + 0x3800).unwrap();
        a.mov(rdi, target).unwrap();
        a.mov(rcx, 8u64).unwrap();
        a.rep().movsb().unwrap();
        a.dec(r12).unwrap();
        a.jnz(top).unwrap();
        a.jmp(target).unwrap();
    });
    let run = |jit| {
        let mut g = guest_with(&code, &[0; 10], 0);
        let pattern: Vec<u8> = (0..0x1100u32).map(|i| (i * 7 + 3) as u8).collect();
        g.load(DATA, &pattern);
        g.load(DATA + 0x3800, &[0x90; 8]);
        g.load(target, &[0xf4; 16]);
        g.cpu.set_jit_threshold(jit);
        assert_eq!(g.cpu.run(&mut NoDevices, 1_000_000), RunExit::Halted);
        let mut data = vec![0u8; 0x4000];
        assert!(g.cpu.ram().read(DATA, &mut data));
        (
            g.cpu.state().gpr,
            g.cpu.state().rflags,
            data,
            g.cpu.state().rip,
            g.cpu.compiled_blocks(),
        )
    };
    let (ig, iflags, idata, irip, _) = run(None);
    let (cg, cflags, cdata, crip, blocks) = run(Some(0));
    assert!(blocks > 0);
    assert_eq!(cg, ig);
    assert_eq!(cflags, iflags);
    assert!(cdata == idata, "memory after the copies");
    assert_eq!(
        irip,
        target + 9,
        "ran the copied NOPs up to the HLT after them"
    );
    assert_eq!(crip, irip);
    assert_eq!(
        idata[0x1000 + 3],
        idata[0x1000],
        "the overlapping copy replicates"
    );
}

/// IDIV in compiled code against the interpreter: sign-extended dividends of either sign
/// (CQO/CDQ), 64- and 32-bit, register and memory divisors; a dividend that is not
/// sign-extended (the interpreter's, and here #DE for an overflowing quotient); and the
/// most negative dividend over -1, which is #DE.
#[test]
fn compiled_idiv_and_its_divide_errors() {
    let code = asm(64, CODE, |a| {
        let mut top = a.create_label();
        a.mov(rcx, 200u64).unwrap();
        a.mov(rbx, 0x9234_5678_9abc_def1u64).unwrap();
        a.set_label(&mut top).unwrap();
        a.mov(rax, rbx).unwrap();
        a.cqo().unwrap();
        a.lea(rsi, qword_ptr(rcx - 100)).unwrap(); // -99..100, 0 at rcx = 100
        a.cmp(rsi, 0).unwrap();
        let mut skip = a.create_label();
        a.je(skip).unwrap();
        a.idiv(rsi).unwrap();
        a.add(r8, rax).unwrap();
        a.add(r9, rdx).unwrap();
        a.mov(qword_ptr(r15 + 0x40), rsi).unwrap();
        a.mov(eax, ebx).unwrap();
        a.cdq().unwrap();
        a.idiv(dword_ptr(r15 + 0x40)).unwrap();
        a.add(r10, rax).unwrap();
        a.add(r12, rdx).unwrap();
        // Not sign-extended but small: a valid IDIV the interpreter does.
        a.mov(eax, 1000).unwrap();
        a.mov(edx, 0).unwrap();
        a.mov(edi, 7).unwrap();
        a.idiv(edi).unwrap();
        a.add(r13, rax).unwrap();
        a.set_label(&mut skip).unwrap();
        a.rol(rbx, 7).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(top).unwrap();
        // i64::MIN / -1: #DE, flags of before it in the frame.
        a.mov(rax, i64::MIN as u64).unwrap();
        a.cqo().unwrap();
        a.mov(rsi, -1i64 as u64).unwrap();
        a.stc().unwrap();
        a.idiv(rsi).unwrap();
        a.hlt().unwrap();
    });
    const HANDLER: u64 = CODE + 0xc00;
    let run = |jit| {
        let mut g = guest_with(&code, &[0; 10], 0);
        g.set_gate(0, HANDLER, 0, 0);
        g.load(
            HANDLER,
            &asm(64, HANDLER, |a| {
                a.mov(r11, qword_ptr(rsp + 16)).unwrap(); // RIP, CS, RFLAGS
                a.mov(r14, qword_ptr(rsp)).unwrap();
                a.hlt().unwrap();
            }),
        );
        g.cpu.set_jit_threshold(jit);
        assert_eq!(g.cpu.run(&mut NoDevices, 100_000), RunExit::Halted);
        (g.cpu.state().gpr, g.cpu.compiled_blocks())
    };
    let (interpreted, _) = run(None);
    assert_eq!(interpreted[11] & 1, 1, "#DE frame: CF of before the IDIV");
    assert_ne!(interpreted[8], 0);
    assert_eq!(interpreted[13], 199 * 142);
    let (compiled, blocks) = run(Some(0));
    assert!(blocks > 0);
    assert_eq!(compiled, interpreted);
}

/// A CPU given a share of the block cache ([`x86emu::Cpu::set_block_slots`]) that runs
/// more blocks than the share holds, missing and evicting on most lookups, doubles its
/// slots up to the limit it may grow to and keeps what it cached: passes over the same
/// blocks then stop decoding them again. Without the limit raised it stays as it was.
#[test]
fn a_block_cache_that_evicts_much_grows_and_keeps_its_blocks() {
    const MAIN: u64 = 0x40_0000;
    const FUNCS: u64 = 0x60_0000;
    const N: u64 = 3000;
    const PASSES: u64 = 20;
    let jump = asm(64, CODE, |a| a.jmp(MAIN).unwrap());
    let main = asm(64, MAIN, |a| {
        let mut top = a.create_label();
        a.xor(r8d, r8d).unwrap();
        a.mov(rbx, PASSES).unwrap();
        a.set_label(&mut top).unwrap();
        for i in 0..N {
            a.call(FUNCS + 32 * i).unwrap();
        }
        a.dec(rbx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    let run = |grow: bool, jit: Option<u32>| {
        let mut g = guest_with(&jump, &[0; 10], 0);
        g.load(MAIN, &main);
        for i in 0..N {
            let at = FUNCS + 32 * i;
            g.load(
                at,
                &asm(64, at, |a| {
                    // A loop: its exit to itself is a link in its record. Compiled
                    // code does not cover LAHF: it leaves there, naming its slot (from
                    // its record) for the interpreter to go on in.
                    let mut top = a.create_label();
                    a.mov(ecx, 2).unwrap();
                    a.set_label(&mut top).unwrap();
                    a.add(r8, 1).unwrap();
                    a.lahf().unwrap();
                    a.dec(ecx).unwrap();
                    a.jnz(top).unwrap();
                    a.ret().unwrap();
                }),
            );
        }
        g.cpu.set_block_slots(4096);
        if grow {
            g.cpu.let_block_slots_grow(65536);
        }
        g.cpu.set_jit_threshold(jit);
        let mut runs = 0;
        while g.cpu.run(&mut NoDevices, 4_000) != RunExit::Halted {
            runs += 1;
            assert!(runs < 100_000, "the loop never ended");
        }
        (g.cpu.state().gpr[8], g.cpu.decode_counts().0)
    };
    for jit in [None, Some(0), Some(16)] {
        let (sum, fixed) = run(false, jit);
        assert_eq!(sum, 2 * N * PASSES);
        let (sum, grown) = run(true, jit);
        assert_eq!(sum, 2 * N * PASSES);
        // Four blocks per call (the call, the function's three).
        assert!(
            fixed > 4 * 4 * N,
            "{fixed} decodes with 4096 slots over {PASSES} passes (jit {jit:?})"
        );
        assert!(
            grown * 4 < fixed,
            "{grown} decodes once the cache may grow against {fixed} (jit {jit:?})"
        );
    }
}

/// A loop that calls into another page, where the callee's first block ends in an exit
/// to its own page (F to G) and the caller's in one back to the loop's top: each exit is
/// taken right after compiled code came from the other page (a call, a return) through
/// its jump cache. Once the links are cut (as a full list of links cuts them, the blocks
/// still trusted), the run loop must link such an exit again in the page it was left in:
/// it used to leave it unlinked, having started in the other page, so that every pass
/// went through the run loop twice from then on.
#[test]
fn exits_taken_after_a_page_change_are_linked_again() {
    const LOOPS: u32 = 20_000;
    let (p1, p2) = (CODE, CODE + 0x1000);
    let (f, gg) = (p2, p2 + 0x80);
    let mut g = Guest::new();
    g.load(
        p1,
        &asm(64, p1, |a| {
            let mut top = a.create_label();
            a.xor(eax, eax).unwrap();
            a.mov(ecx, LOOPS).unwrap();
            a.set_label(&mut top).unwrap();
            a.call(f).unwrap();
            a.dec(ecx).unwrap();
            a.jnz(top).unwrap();
            a.hlt().unwrap();
        }),
    );
    g.load(
        f,
        &asm(64, f, |a| {
            a.add(rax, 1).unwrap();
            a.test(ecx, ecx).unwrap();
            a.jnz(gg).unwrap();
            a.hlt().unwrap();
        }),
    );
    g.load(
        gg,
        &asm(64, gg, |a| {
            a.add(rax, 2).unwrap();
            a.ret().unwrap();
        }),
    );
    let mut s = g.cpu.state().clone();
    s.rip = p1;
    g.cpu.set_state(s);
    // As under a VMM whose devices report their writes: a run does not start a new code
    // epoch (which would have the run loop look every block up again).
    g.cpu.set_recheck_each_run(false);
    // Half the passes: every block compiled and linked by then.
    assert_eq!(
        g.cpu.run(&mut NoDevices, 4 * u64::from(LOOPS)),
        RunExit::InstructionLimit
    );
    assert!(g.cpu.compiled_blocks() >= 3, "the loop was not compiled");
    // The run stopped at the loop's chain check, after a return from G. Go back into G
    // as though it had been called from there again (one more +2), and cut: the run loop
    // starts in G's page, so each exit comes after a page change from then on.
    let (at, stack) = (g.cpu.state().rip, g.cpu.state().gpr[4]);
    assert_eq!(at, p1 + 12, "the run stopped elsewhere");
    g.load(stack - 8, &at.to_le_bytes());
    let st = g.cpu.state_mut();
    st.gpr[4] = stack - 8;
    st.rip = gg;
    x86emu::testing::cut_links(&mut g.cpu);
    let before = g.cpu.dispatched_blocks();
    assert_eq!(g.cpu.run(&mut NoDevices, u64::MAX), RunExit::Halted);
    assert_eq!(g.cpu.state().gpr[0], 3 * u64::from(LOOPS) + 2);
    // A few to link the exits again; unlinked, two per pass.
    let dispatched = g.cpu.dispatched_blocks() - before;
    assert!(
        dispatched < 100,
        "{dispatched} blocks dispatched for the last passes of a loop whose links were cut"
    );
}
