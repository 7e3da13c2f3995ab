//! Emulation speed: runs a fixed 64-bit ALU + memory loop, interpreted and then with
//! compiled blocks, and prints MIPS for each.
//!
//! `cargo run --release -p x86emu --example mips [millions-of-instructions]`

use std::time::Instant;

use iced_x86::code_asm::*;
use x86emu::testing::{long_mode_state, PageTableBuilder, PTE_W};
use x86emu::{Cpu, GuestRam, NoDevices, RunExit};

const CODE: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;

fn main() {
    let millions: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(300);
    let per_iter = 8u64;
    let iters = millions * 1_000_000 / per_iter;
    for (mode, jit) in [("interpreted", None), ("compiled", Some(256))] {
        run(mode, jit, iters);
    }
}

fn run(mode: &str, jit: Option<u32>, iters: u64) {
    let mut ram = GuestRam::new();
    ram.add_owned(0, 0x40_0000).expect("RAM");
    let mut pt = PageTableBuilder::new(&ram, 0x1000, 0x10000);
    pt.map(&ram, 0, 0, 2, PTE_W);
    pt.map(&ram, 0x20_0000, 0x20_0000, 2, PTE_W);

    let mut a = CodeAssembler::new(64).expect("assembler");
    let mut top = a.create_label();
    a.mov(rcx, iters).unwrap();
    a.mov(rsi, DATA).unwrap();
    a.xor(eax, eax).unwrap();
    a.set_label(&mut top).unwrap();
    a.add(rax, rcx).unwrap();
    a.xor(rbx, rax).unwrap();
    a.mov(qword_ptr(rsi), rbx).unwrap();
    a.add(rdx, qword_ptr(rsi)).unwrap();
    a.lea(rdi, qword_ptr(rax + rbx * 2 + 8)).unwrap();
    a.shl(rdi, 3).unwrap();
    a.dec(rcx).unwrap();
    a.jnz(top).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).expect("assemble");
    ram.write(CODE, &code);

    let mut cpu = Cpu::new(ram);
    cpu.set_jit_threshold(jit);
    let mut s = long_mode_state(pt.root, 0, 0, 0);
    s.rip = CODE;
    s.gpr[4] = 0x8_0000;
    cpu.set_state(s);

    let start = Instant::now();
    let cpu_start = cpu_time();
    let before = cpu.retired_instructions();
    loop {
        match cpu.run(&mut NoDevices, 10_000_000) {
            RunExit::InstructionLimit => continue,
            RunExit::Halted => break,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    let n = cpu.retired_instructions() - before;
    let secs = start.elapsed().as_secs_f64();
    let cpu_secs = cpu_time() - cpu_start;
    // CPU time is the figure to quote on a shared machine; wall time is printed too.
    println!(
        "{mode}: {n} instructions: {:.1} MIPS by CPU time ({cpu_secs:.3} s), {:.1} MIPS by wall time ({secs:.3} s)",
        n as f64 / cpu_secs / 1e6,
        n as f64 / secs / 1e6
    );
}

/// Process CPU time in seconds.
fn cpu_time() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass and nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}
