//! Hostile input: random instruction bytes and register state in every mode must execute
//! or raise an exception, never panic. (The cargo-fuzz target in /fuzz does the same at scale.)

mod common;

use common::*;
use x86emu::state::{cr, Seg, Segment};
use x86emu::{NoDevices, RunExit};

struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn seed() -> u64 {
    std::env::var("X86EMU_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_1234_abcd_0001)
}

fn cases() -> usize {
    std::env::var("X86EMU_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Long,
    Compat32,
    Protected32,
    Real,
}

fn run_random(mode: Mode) {
    run_random_with(mode, None);
}

/// With `compile_at` = Some(0) every block is compiled to host code at once, and each case
/// runs twice from the same state without flushing the TLB, so that compiled code also
/// runs its memory accesses (a cold TLB sends them to the interpreter).
fn run_random_with(mode: Mode, compile_at: Option<u32>) {
    let mut g = Guest::new();
    if compile_at.is_some() {
        g.cpu.set_jit_threshold(compile_at);
    }
    let base = g.cpu.state().clone();
    let mut r = Rng(seed() ^ ((mode as u64 + 1) * 0x9e37_79b9));
    // Fill the IDT with random gates too: delivery must cope with garbage.
    let mut idt = vec![0u8; 4096];
    for b in idt.iter_mut() {
        *b = r.next_u64() as u8;
    }
    // Random stores can land anywhere, page tables included: restore the system area
    // (page tables, GDT, TSS) before every case so each one starts from a sane machine.
    let mut system_area = vec![0u8; IDT as usize];
    assert!(g.cpu.ram().read(0, &mut system_area));
    for _ in 0..cases() {
        assert!(g.cpu.ram().write(0, &system_area));
        let mut code = [0u8; 48];
        for b in code.iter_mut() {
            *b = r.next_u64() as u8;
        }
        g.load(CODE, &code);
        g.load(IDT, &idt);
        let mut s = base.clone();
        for (k, v) in s.gpr.iter_mut().enumerate() {
            let x = r.next_u64();
            *v = match x % 4 {
                0 => x,
                1 => DATA + (x >> 40),
                2 => x & 0xffff,
                _ => {
                    if k == 4 {
                        0x70000
                    } else {
                        x >> 32
                    }
                }
            };
        }
        s.rflags = 2 | (r.next_u64() & 0xcd5);
        match mode {
            Mode::Long => {}
            Mode::Compat32 => {
                s.seg[Seg::Cs as usize].attr =
                    (s.seg[Seg::Cs as usize].attr & !Segment::ATTR_L) | Segment::ATTR_DB;
            }
            Mode::Protected32 => {
                s.efer = 0;
                s.cr0 &= !cr::CR0_PG;
                s.cr4 = cr::CR4_OSFXSR;
                s.seg[Seg::Cs as usize].attr =
                    (s.seg[Seg::Cs as usize].attr & !Segment::ATTR_L) | Segment::ATTR_DB;
                s.idtr.limit = 0x7ff;
            }
            Mode::Real => {
                s = x86emu::CpuState::reset();
                s.seg[Seg::Cs as usize] = Segment::real_mode((CODE >> 4) as u16, true);
                s.gpr[4] = 0x7000;
                s.rip = 0;
            }
        }
        g.cpu.set_state(s.clone());
        let _ = g.cpu.execute_one(&mut NoDevices);
        let passes = if compile_at.is_some() { 2 } else { 1 };
        for pass in 0..passes {
            if pass > 0 {
                *g.cpu.state_mut() = s.clone();
            }
            match g.cpu.run(&mut NoDevices, 64) {
                RunExit::Halted
                | RunExit::Shutdown
                | RunExit::InstructionLimit
                | RunExit::StopRequested => {}
                other => panic!("unexpected exit {other:?}"),
            }
        }
    }
    let retired = g.cpu.retired_instructions();
    eprintln!(
        "{mode:?}: {} cases, {retired} instructions retired, {} blocks compiled",
        cases(),
        g.cpu.compiled_blocks()
    );
    if compile_at.is_some() {
        assert!(
            g.cpu.compiled_blocks() as usize > cases() / 2,
            "random code should mostly compile something"
        );
    }
    assert!(
        retired as usize > cases() / 2,
        "random code should mostly execute something"
    );
}

#[test]
fn random_bytes_long_mode() {
    run_random(Mode::Long);
}

/// Compiled code runs guest instructions on the host CPU: random ones must not be able to
/// fault the host (SIGILL, SIGSEGV, SIGFPE would kill this test, and a VMM).
#[test]
fn random_bytes_long_mode_compiled() {
    run_random_with(Mode::Long, Some(0));
}

#[test]
fn random_bytes_compat_mode() {
    run_random(Mode::Compat32);
}

#[test]
fn random_bytes_protected_mode() {
    run_random(Mode::Protected32);
}

#[test]
fn random_bytes_real_mode() {
    run_random(Mode::Real);
}
