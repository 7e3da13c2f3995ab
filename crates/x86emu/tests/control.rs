//! Control flow, self-modifying code, restartable REP string operations, MMIO and
//! single-step, through the run API.

mod common;

use common::*;
use iced_x86::code_asm::*;
use x86emu::exceptions::vector;
use x86emu::state::flags;
use x86emu::testing::PTE_W;
use x86emu::{NoDevices, Platform, RunExit};

fn run_to_halt(g: &mut Guest) {
    assert_eq!(g.cpu.run(&mut NoDevices, 100_000), RunExit::Halted);
}

#[test]
fn branches_calls_and_loops() {
    let mut g = Guest::new();
    g.load_code(|a| {
        let mut f = a.create_label();
        let mut l1 = a.create_label();
        let mut skip = a.create_label();
        let mut done = a.create_label();
        a.xor(eax, eax).unwrap();
        a.mov(ecx, 10).unwrap();
        a.set_label(&mut l1).unwrap();
        a.add(eax, ecx).unwrap();
        a.loop_(l1).unwrap(); // eax = 55
        a.cmp(eax, 55).unwrap();
        a.jne(skip).unwrap();
        a.call(f).unwrap(); // rbx = 7
        a.lea(rdx, ptr(done)).unwrap();
        a.push(rdx).unwrap();
        a.ret().unwrap(); // jumps to done via ret
        a.set_label(&mut skip).unwrap();
        a.mov(ebx, 0xbad).unwrap();
        a.hlt().unwrap();
        a.set_label(&mut f).unwrap();
        a.mov(ebx, 7).unwrap();
        a.ret_1(0).unwrap();
        a.set_label(&mut done).unwrap();
        a.mov(rsi, rsp).unwrap();
        a.lea(rdi, ptr(f)).unwrap();
        a.mov(ebx, 0).unwrap();
        a.call(rdi).unwrap(); // indirect call sets rbx = 7 again
        let mut end = a.create_label();
        a.jrcxz(end).unwrap(); // rcx == 0 after LOOP
        a.mov(ebx, 0xbad).unwrap();
        a.set_label(&mut end).unwrap();
        a.hlt().unwrap();
    });
    run_to_halt(&mut g);
    let s = g.cpu.state();
    assert_eq!(s.gpr[0], 55);
    assert_eq!(s.gpr[3], 7);
    assert_eq!(s.gpr[4], 0x70000, "calls and returns balanced");
}

#[test]
fn self_modifying_code_is_seen() {
    let mut g = Guest::new();
    // The loop body's immediate is rewritten by the code itself after the first pass.
    g.load_code(|a| {
        let mut body = a.create_label();
        let mut out = a.create_label();
        a.xor(ebx, ebx).unwrap();
        a.mov(ecx, 2).unwrap();
        a.set_label(&mut body).unwrap();
        a.add(ebx, 1).unwrap(); // 83 c3 01: the immediate byte is at body+2
        a.lea(rdi, ptr(body)).unwrap();
        a.mov(byte_ptr(rdi + 2), 100).unwrap();
        a.dec(ecx).unwrap();
        a.jz(out).unwrap();
        a.jmp(body).unwrap();
        a.set_label(&mut out).unwrap();
        a.hlt().unwrap();
    });
    run_to_halt(&mut g);
    assert_eq!(
        g.cpu.state().gpr[3],
        101,
        "second pass must run the patched instruction"
    );
}

#[test]
fn code_patched_ahead_in_the_same_block_is_seen() {
    let mut g = Guest::new();
    // Straight-line code (one decoded block) that rewrites an instruction further down
    // before reaching it: the patched bytes must run, as on hardware.
    g.load_code(|a| {
        let mut target = a.create_label();
        a.xor(ebx, ebx).unwrap();
        a.lea(rdi, ptr(target)).unwrap();
        a.mov(byte_ptr(rdi + 2), 100).unwrap();
        a.nop().unwrap();
        a.set_label(&mut target).unwrap();
        a.add(ebx, 1).unwrap(); // 83 c3 01
        a.add(ebx, 1000).unwrap();
        a.hlt().unwrap();
    });
    run_to_halt(&mut g);
    assert_eq!(g.cpu.state().gpr[3], 1100);
}

#[test]
fn code_rewritten_from_outside_runs_rewritten() {
    // Another vCPU or a device writing code between runs: the cached block must not run.
    let mut g = Guest::new();
    g.load_code(|a| {
        a.mov(ebx, 1).unwrap(); // bb 01 00 00 00
        a.add(ebx, 10).unwrap();
        a.hlt().unwrap();
    });
    run_to_halt(&mut g);
    assert_eq!(g.cpu.state().gpr[3], 11);
    g.load(CODE + 1, &[7]);
    let mut s = g.cpu.state().clone();
    s.rip = CODE;
    s.gpr[3] = 0;
    g.cpu.set_state(s);
    run_to_halt(&mut g);
    assert_eq!(g.cpu.state().gpr[3], 17);
}

#[test]
fn rep_movs_restarts_after_page_fault() {
    let mut g = Guest::new();
    const SRC: u64 = 0x4000_0000_0000;
    const DST: u64 = 0x4000_0000_2000;
    g.map4k(SRC, 0x30_0000, PTE_W);
    g.map4k(SRC + 0x1000, 0x30_1000, PTE_W);
    g.map4k(DST, 0x31_0000, PTE_W);
    // DST + 0x1000 not mapped yet.
    let data: Vec<u8> = (0..0x2000u32).map(|i| (i * 7) as u8).collect();
    g.load(0x30_0000, &data);
    g.load_code(|a| {
        a.mov(rsi, SRC).unwrap();
        a.mov(rdi, DST).unwrap();
        a.mov(ecx, 0x1800).unwrap();
        a.rep().movsb().unwrap();
        a.hlt().unwrap();
    });
    for _ in 0..3 {
        g.cpu.execute_one(&mut NoDevices).unwrap();
    }
    let mut fault = None;
    for _ in 0..10 {
        if let Err(f) = g.cpu.execute_one(&mut NoDevices) {
            fault = Some(f);
            break;
        }
    }
    let f = fault.expect("#PF on the unmapped destination page");
    assert_eq!(f.vector, vector::PF);
    let s = g.cpu.state();
    assert_eq!(s.gpr[1], 0x800, "RCX counts the bytes still to copy");
    assert_eq!(s.gpr[7], DST + 0x1000);
    assert_eq!(s.cr2, DST + 0x1000);
    g.map4k(DST + 0x1000, 0x31_1000, PTE_W);
    run_to_halt(&mut g);
    let mut out = vec![0u8; 0x1800];
    g.cpu.ram().read(0x31_0000, &mut out[..0x1000]);
    g.cpu.ram().read(0x31_1000, &mut out[0x1000..]);
    assert_eq!(out, data[..0x1800]);
}

#[test]
fn bulk_rep_movs_and_stos_keep_element_order_semantics() {
    let mut g = Guest::new();
    let src: Vec<u8> = (0..0x3000u32).map(|i| (i * 13 + 7) as u8).collect();
    g.load(DATA, &src);
    g.load_code(|a| {
        // Overlapping forward copy one byte up: replicates the first byte (a block move
        // would shift the buffer instead).
        a.mov(rsi, DATA).unwrap();
        a.mov(rdi, DATA + 1).unwrap();
        a.mov(ecx, 100).unwrap();
        a.rep().movsb().unwrap();
        // Unaligned, page-crossing quadword copy.
        a.mov(rsi, DATA + 0x1003).unwrap();
        a.mov(rdi, DATA + 0x4ff9).unwrap();
        a.mov(ecx, 0x300).unwrap();
        a.rep().movsq().unwrap();
        // Page-crossing doubleword fill.
        a.mov(rdi, DATA + 0x8ffe).unwrap();
        a.mov(eax, 0x1122_3344).unwrap();
        a.mov(ecx, 5).unwrap();
        a.rep().stosd().unwrap();
        a.hlt().unwrap();
    });
    run_to_halt(&mut g);
    let read = |g: &Guest, gpa: u64, n: usize| {
        let mut b = vec![0u8; n];
        assert!(g.cpu.ram().read(gpa, &mut b));
        b
    };
    assert!(read(&g, DATA, 101).iter().all(|&b| b == src[0]));
    assert_eq!(read(&g, DATA + 101, 4), &src[101..105]);
    // The quadword copy's source starts past the overwritten bytes.
    assert_eq!(
        read(&g, DATA + 0x4ff9, 0x1800),
        &src[0x1003..0x1003 + 0x1800]
    );
    let fill: Vec<u8> = (0..5).flat_map(|_| 0x1122_3344u32.to_le_bytes()).collect();
    assert_eq!(read(&g, DATA + 0x8ffe, 20), fill);
    let s = g.cpu.state();
    assert_eq!(s.gpr[1], 0);
    assert_eq!(s.gpr[7], DATA + 0x8ffe + 20);
}

#[test]
fn interrupt_during_long_rep_stos_resumes_it() {
    let mut g = Guest::new();
    let handler = asm(64, 0x18_0000, |a| {
        a.inc(r15).unwrap();
        a.iretq().unwrap();
    });
    g.load(0x18_0000, &handler);
    g.set_gate(0x40, 0x18_0000, 0, 0);
    g.load_code(|a| {
        a.sti().unwrap();
        a.mov(rdi, DATA).unwrap();
        // Long enough that two steps (64 KiB each) do not finish it.
        a.mov(ecx, 300_000).unwrap();
        a.mov(eax, 0x5a).unwrap();
        a.rep().stosb().unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(g.cpu.run(&mut NoDevices, 6), RunExit::InstructionLimit);
    assert_eq!(g.cpu.state().rip, CODE + 21, "still on REP STOSB");
    assert!(g.cpu.state().gpr[1] > 0 && g.cpu.state().gpr[1] < 300_000);
    assert!(g.cpu.inject_external_interrupt(&mut NoDevices, 0x40));
    run_to_halt(&mut g);
    let s = g.cpu.state();
    assert_eq!(s.gpr[15], 1);
    assert_eq!(s.gpr[1], 0);
    let mut b = vec![0u8; 300_001];
    g.cpu.ram().read(DATA, &mut b);
    assert!(b[..300_000].iter().all(|&x| x == 0x5a));
    assert_eq!(b[300_000], 0);
}

#[derive(Default)]
struct Mmio {
    writes: Vec<(u64, Vec<u8>)>,
}

impl Platform for Mmio {
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = (gpa as u8).wrapping_add(i as u8);
        }
    }
    fn mmio_write(&mut self, gpa: u64, data: &[u8]) {
        self.writes.push((gpa, data.to_vec()));
    }
    fn pio_read(&mut self, _port: u16, data: &mut [u8]) {
        data.fill(0);
    }
    fn pio_write(&mut self, _port: u16, _data: &[u8]) {}
}

#[test]
fn mmio_goes_to_the_platform() {
    let mut g = Guest::new();
    const DEV: u64 = 0xfee0_0000;
    g.map4k(DEV, DEV, PTE_W);
    g.load_code(|a| {
        a.mov(rbx, DEV).unwrap();
        a.mov(eax, dword_ptr(rbx + 0x30)).unwrap();
        a.mov(dword_ptr(rbx + 0xb0), 0x1234).unwrap();
        a.hlt().unwrap();
    });
    let mut m = Mmio::default();
    assert_eq!(g.cpu.run(&mut m, 100), RunExit::Halted);
    assert_eq!(g.cpu.state().gpr[0], 0x3332_3130);
    assert_eq!(m.writes, vec![(DEV + 0xb0, vec![0x34, 0x12, 0, 0])]);
}

#[test]
fn single_step_traps_after_each_instruction() {
    let mut g = Guest::new();
    let handler = asm(64, 0x18_0000, |a| {
        a.inc(r15).unwrap();
        a.iretq().unwrap();
    });
    g.load(0x18_0000, &handler);
    g.set_gate(vector::DB, 0x18_0000, 0, 0);
    g.load_code(|a| {
        a.pushfq().unwrap();
        a.or(qword_ptr(rsp), 0x100).unwrap();
        a.popfq().unwrap(); // TF on: traps start after the next instruction
        a.nop().unwrap();
        a.nop().unwrap();
        a.pushfq().unwrap();
        a.and(qword_ptr(rsp), !0x100).unwrap();
        a.popfq().unwrap();
        a.hlt().unwrap();
    });
    run_to_halt(&mut g);
    // nop, nop, pushfq, and, popfq each trap once (the handler runs with TF clear).
    assert_eq!(g.cpu.state().gpr[15], 5);
    assert_eq!(g.cpu.state().rflags & flags::TF, 0);
}
