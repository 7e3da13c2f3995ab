//! What firmware and boot loaders run: 32-bit protected-mode code compiled (with flat
//! segments only), single and REP string instructions in compiled code and in bulk, and
//! compiled code that keeps running under CLI while an interrupt waits. Each against the
//! interpreter (or, for the bulk copies, against a model of the element order).

mod common;

use common::*;
use iced_x86::code_asm::*;
use x86emu::state::{Seg, Segment};
use x86emu::{NoDevices, RunExit};

const SRC: u64 = 0x20_0100;
/// Ends up in the next page during the forward copy: the second page's accesses miss.
const DST: u64 = 0x20_3fe8;
const STORE: u64 = 0x20_6000;
const COUNTER: u64 = 0x20_6100;

/// Flat 32-bit protected mode, paging off, at CODE; upper register halves hold garbage
/// that 32-bit addressing must ignore. `ds_base` other than 0 makes DS non-flat.
fn guest32(code: &[u8], ds_base: u64) -> Guest {
    let g = Guest::new();
    g.load(CODE, code);
    let data: Vec<u8> = (0..0x8000u32).map(|i| (i * 37 + 11) as u8).collect();
    g.load(0x20_0000, &data);
    let mut s = g.cpu.state().clone();
    s.cr0 = 0x11;
    s.cr4 = 0;
    s.efer = 0;
    let flat = |selector, attr| Segment {
        selector,
        base: 0,
        limit: u32::MAX,
        attr,
    };
    for r in [Seg::Ds, Seg::Es, Seg::Ss, Seg::Fs, Seg::Gs] {
        s.seg[r as usize] = flat(0x10, 0xc093);
    }
    s.seg[Seg::Ds as usize].base = ds_base;
    s.seg[Seg::Cs as usize] = flat(0x08, 0xc09b);
    s.rip = CODE;
    s.rflags = 0x2;
    s.gpr = [0; 16];
    s.gpr[3] = 0xdead_beef_0000_0000 | 0x20_0800;
    s.gpr[4] = 0x7_0000;
    s.gpr[5] = 0x1234_5678_0000_0000;
    let mut g = g;
    g.cpu.set_state(s);
    g
}

/// A boot loader's kind of code, run `passes` times: GRUB's `memmove` (a forward MOVSB
/// loop and a backward byte loop), the short INC/DEC forms, 16-bit operations, negative
/// displacements, STOSD and MOVSW/MOVSD singles, DIV and IMUL with memory.
fn loader_code() -> Vec<u8> {
    asm(32, CODE, |a| {
        let mut pass = a.create_label();
        let mut fwd = a.create_label();
        let mut fwd_done = a.create_label();
        let mut back = a.create_label();
        let mut back_done = a.create_label();
        let mut fill = a.create_label();
        let mut func = a.create_label();
        let mut after = a.create_label();
        a.mov(dword_ptr(COUNTER as u32), 3).unwrap();
        a.set_label(&mut pass).unwrap();
        a.mov(esi, SRC as u32).unwrap();
        a.mov(edi, DST as u32).unwrap();
        a.lea(eax, dword_ptr(edi + 0x40)).unwrap();
        a.set_label(&mut fwd).unwrap();
        a.cmp(edi, eax).unwrap();
        a.je(fwd_done).unwrap();
        a.movsb().unwrap();
        a.jmp(fwd).unwrap();
        a.set_label(&mut fwd_done).unwrap();
        a.mov(ecx, 0x30).unwrap();
        a.set_label(&mut back).unwrap();
        a.sub(ecx, 1).unwrap();
        a.jb(back_done).unwrap();
        a.mov(dl, byte_ptr(esi + ecx - 0x40)).unwrap();
        a.mov(byte_ptr(edi + ecx + 0x10), dl).unwrap();
        a.jmp(back).unwrap();
        a.set_label(&mut back_done).unwrap();
        a.inc(ebx).unwrap();
        a.dec(edx).unwrap();
        a.inc(bx).unwrap();
        a.dec(si).unwrap();
        a.add(word_ptr(ebx - 0x10), 0x1234).unwrap();
        a.mov(eax, dword_ptr(ebx + 8)).unwrap();
        a.xor(dword_ptr(ebx - 0x20), eax).unwrap();
        a.mov(edi, STORE as u32).unwrap();
        a.mov(ecx, 9).unwrap();
        a.set_label(&mut fill).unwrap();
        a.stosd().unwrap();
        a.add(eax, 0x0101_0101).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(fill).unwrap();
        a.mov(esi, (SRC + 0x200) as u32).unwrap();
        a.movsw().unwrap();
        a.movsd().unwrap();
        a.stosb().unwrap();
        a.xor(edx, edx).unwrap();
        a.mov(eax, 1000).unwrap();
        a.mov(ecx, 7).unwrap();
        a.div(ecx).unwrap();
        a.imul_3(ecx, dword_ptr(esi + 4), 3).unwrap();
        // A cdecl call: arguments pushed, a frame, callee-saved registers, RET imm16.
        a.push(0x1234_5678).unwrap();
        a.push(-5).unwrap();
        a.push(ecx).unwrap();
        a.call(func).unwrap();
        a.add(esp, 4).unwrap();
        a.dec(dword_ptr(COUNTER as u32)).unwrap();
        a.jnz(pass).unwrap();
        a.hlt().unwrap();
        a.set_label(&mut func).unwrap();
        a.push(ebp).unwrap();
        a.mov(ebp, esp).unwrap();
        a.push(ebx).unwrap();
        a.push(edi).unwrap();
        a.mov(eax, dword_ptr(ebp + 8)).unwrap();
        a.add(eax, dword_ptr(ebp + 12)).unwrap();
        a.xor(eax, dword_ptr(ebp + 16)).unwrap();
        a.mov(dword_ptr(ebp - 0x40), eax).unwrap();
        a.pop(edi).unwrap();
        a.pop(ebx).unwrap();
        a.jmp(after).unwrap();
        a.set_label(&mut after).unwrap();
        a.leave().unwrap();
        a.ret_1(8).unwrap();
    })
}

fn memory(g: &Guest) -> Vec<u8> {
    let mut m = vec![0u8; 0x8000];
    assert!(g.cpu.ram().read(0x20_0000, &mut m));
    let mut stack = vec![0u8; 0x100];
    assert!(g.cpu.ram().read(0x7_0000 - 0x100, &mut stack));
    m.extend_from_slice(&stack);
    m
}

#[test]
fn compiled_32bit_flat_code_matches_the_interpreter() {
    let code = loader_code();
    let run = |jit| {
        let mut g = guest32(&code, 0);
        g.cpu.set_jit_threshold(jit);
        assert_eq!(g.cpu.run(&mut NoDevices, 1_000_000), RunExit::Halted);
        let s = g.cpu.state();
        (
            s.gpr,
            s.rflags & 0x8d5,
            memory(&g),
            g.cpu.retired_instructions(),
            g.cpu.compiled_blocks(),
            g.cpu.dispatched_blocks(),
        )
    };
    let (gpr, flags, mem, retired, _, i_dispatched) = run(None);
    assert_ne!(mem[0x3fe8..0x4028], [0u8; 0x40][..], "the copy ran");
    let (c_gpr, c_flags, c_mem, c_retired, blocks, c_dispatched) = run(Some(0));
    assert!(blocks >= 5, "{blocks} blocks compiled");
    assert_eq!(c_gpr, gpr, "registers");
    assert_eq!(c_flags, flags, "flags");
    assert!(c_mem == mem, "memory differs");
    assert_eq!(c_retired, retired, "retired instructions");
    assert!(
        c_dispatched * 3 < i_dispatched,
        "compiled code chains its blocks: {c_dispatched} dispatches against {i_dispatched}"
    );
}

/// With DS based elsewhere, offsets are not linear addresses: compiled 32-bit code, which
/// assumes they are, must not run, and the interpreter's result stands.
#[test]
fn compiled_32bit_code_waits_for_flat_segments() {
    let code = loader_code();
    let run = |jit| {
        let mut g = guest32(&code, 0x1000);
        g.cpu.set_jit_threshold(jit);
        assert_eq!(g.cpu.run(&mut NoDevices, 1_000_000), RunExit::Halted);
        (g.cpu.state().gpr, memory(&g))
    };
    let (gpr, mem) = run(None);
    let (flat_gpr, flat_mem) = {
        let mut g = guest32(&code, 0);
        assert_eq!(g.cpu.run(&mut NoDevices, 1_000_000), RunExit::Halted);
        (g.cpu.state().gpr, memory(&g))
    };
    assert!(mem != flat_mem || gpr != flat_gpr, "DS's base matters here");
    let (c_gpr, c_mem) = run(Some(0));
    assert_eq!(c_gpr, gpr);
    assert!(c_mem == mem, "memory differs");
}

/// Compiled 32-bit code moves ESP as RSP's low half, which holds only while the upper
/// half is clear: otherwise the interpreter runs it, and keeps the upper half, as a
/// 32-bit stack's pushes and pops do.
#[test]
fn compiled_32bit_code_waits_for_a_clear_upper_rsp() {
    let code = asm(32, CODE, |a| {
        let mut top = a.create_label();
        a.mov(ebx, 100).unwrap();
        a.set_label(&mut top).unwrap();
        a.push(ecx).unwrap();
        a.push(7).unwrap();
        a.pop(eax).unwrap();
        a.pop(edx).unwrap();
        a.dec(ebx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    let run = |jit| {
        let mut g = guest32(&code, 0);
        let mut s = g.cpu.state().clone();
        s.gpr[4] |= 0x55_0000_0000;
        g.cpu.set_state(s);
        g.cpu.set_jit_threshold(jit);
        assert_eq!(g.cpu.run(&mut NoDevices, 1_000_000), RunExit::Halted);
        (g.cpu.state().gpr, memory(&g))
    };
    let (gpr, mem) = run(None);
    assert_eq!(gpr[4], 0x55_0007_0000, "the upper half stays");
    let (c_gpr, c_mem) = run(Some(0));
    assert_eq!(c_gpr, gpr);
    assert!(c_mem == mem, "memory differs");
}

/// Element-by-element REP MOVS of `count` elements of `size` bytes, as the SDM orders it.
fn model_movs(mem: &mut [u8], src: usize, dst: usize, size: usize, count: usize, back: bool) {
    for i in 0..count {
        let (s, d) = if back {
            (src - i * size, dst - i * size)
        } else {
            (src + i * size, dst + i * size)
        };
        let e: Vec<u8> = mem[s..s + size].to_vec();
        mem[d..d + size].copy_from_slice(&e);
    }
}

/// REP MOVS backwards (DF set, as Linux's decompressor moves itself up) and forwards
/// with 32-bit addresses, across pages, with overlaps that memmove reproduces and one
/// that replicates a pattern (destination just below the source, going down).
#[test]
fn rep_movs_in_bulk_follows_the_element_order_both_ways_in_32bit_code() {
    // (source, destination, element size, count, DF)
    let cases: [(u64, u64, usize, u32, bool); 6] = [
        (0x20_2ffc, 0x20_6ffc, 4, 0x900, true),
        (0x20_2ffc, 0x20_3004, 4, 0x900, true),
        (0x20_3000, 0x20_2ff8, 4, 0x400, true),
        (0x20_0101, 0x20_4003, 1, 0x2100, false),
        (0x20_0100, 0x20_0104, 2, 0x20, false),
        (0x20_1ffe, 0x20_5ffd, 2, 0x500, true),
    ];
    for (src, dst, size, count, back) in cases {
        let code = asm(32, CODE, |a| {
            a.mov(esi, src as u32).unwrap();
            a.mov(edi, dst as u32).unwrap();
            a.mov(ecx, count).unwrap();
            if back {
                a.std().unwrap();
            }
            match size {
                1 => a.rep().movsb().unwrap(),
                2 => a.rep().movsw().unwrap(),
                _ => a.rep().movsd().unwrap(),
            }
            a.cld().unwrap();
            a.hlt().unwrap();
        });
        let mut g = guest32(&code, 0);
        let mut want = memory(&g);
        model_movs(
            &mut want,
            (src - 0x20_0000) as usize,
            (dst - 0x20_0000) as usize,
            size,
            count as usize,
            back,
        );
        assert_eq!(g.cpu.run(&mut NoDevices, 10_000_000), RunExit::Halted);
        let s = g.cpu.state();
        let moved = u64::from(count) * size as u64;
        let (want_si, want_di) = if back {
            (src - moved, dst - moved)
        } else {
            (src + moved, dst + moved)
        };
        let case = format!("src {src:#x} dst {dst:#x} size {size} count {count:#x} back {back}");
        assert_eq!(
            (s.gpr[6], s.gpr[7], s.gpr[1]),
            (want_si, want_di, 0),
            "{case}"
        );
        assert!(memory(&g) == want, "memory differs: {case}");
    }
}

/// REP STOSD backwards from a page's first element: the element order leaves nothing
/// out across the page below.
#[test]
fn rep_stos_in_bulk_goes_down_across_pages() {
    let code = asm(32, CODE, |a| {
        a.mov(edi, 0x20_4000).unwrap();
        a.mov(ecx, 0x500).unwrap();
        a.mov(eax, 0xa5a5_5a5a_u32).unwrap();
        a.std().unwrap();
        a.rep().stosd().unwrap();
        a.cld().unwrap();
        a.hlt().unwrap();
    });
    let mut g = guest32(&code, 0);
    let mut want = memory(&g);
    for i in 0..0x500usize {
        let at = 0x4000 - i * 4;
        want[at..at + 4].copy_from_slice(&0xa5a5_5a5au32.to_le_bytes());
    }
    assert_eq!(g.cpu.run(&mut NoDevices, 1_000_000), RunExit::Halted);
    assert_eq!(g.cpu.state().gpr[7], 0x20_4000 - 0x500 * 4);
    assert!(memory(&g) == want, "memory differs");
}

/// Under CLI an interrupt that waits (the kick flag up) is no reason to leave compiled
/// code: it could not be delivered. Compiled blocks go on chaining, not returning to the
/// run loop after each.
#[test]
fn compiled_code_keeps_chaining_under_cli_while_an_interrupt_waits() {
    let code = asm(64, CODE, |a| {
        let mut top = a.create_label();
        let mut mid = a.create_label();
        a.mov(ecx, 20_000).unwrap();
        a.set_label(&mut top).unwrap();
        a.inc(rax).unwrap();
        a.jmp(mid).unwrap();
        a.set_label(&mut mid).unwrap();
        a.add(rbx, rax).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    let run = |kick: bool| {
        let mut g = Guest::new();
        g.load(CODE, &code);
        let mut s = g.cpu.state().clone();
        s.rflags &= !(1 << 9);
        g.cpu.set_state(s);
        g.cpu.set_jit_threshold(Some(0));
        g.cpu
            .set_kick(std::sync::Arc::new(std::sync::atomic::AtomicBool::new(
                kick,
            )));
        assert_eq!(g.cpu.run(&mut NoDevices, 1_000_000), RunExit::Halted);
        (g.cpu.state().gpr, g.cpu.dispatched_blocks())
    };
    let (quiet, quiet_dispatched) = run(false);
    let (kicked, kicked_dispatched) = run(true);
    assert_eq!(kicked, quiet);
    assert!(
        kicked_dispatched < 100,
        "{kicked_dispatched} blocks dispatched by the run loop (without a kick: {quiet_dispatched})"
    );
}

/// The same bulk path with 64-bit addresses: from address 0 up (where an offset's room
/// to the top of the address space is all of it) and down across pages.
#[test]
fn rep_movs_and_stos_in_bulk_with_64bit_addresses_from_address_zero_and_down() {
    let code = asm(64, CODE, |a| {
        a.xor(esi, esi).unwrap();
        a.mov(edi, 0x20_0000).unwrap();
        a.mov(ecx, 0x300).unwrap();
        a.rep().movsb().unwrap();
        a.xor(edi, edi).unwrap();
        a.mov(ecx, 0x80).unwrap();
        a.mov(eax, 0x5a).unwrap();
        a.rep().stosb().unwrap();
        a.mov(esi, 0x20_3ff8).unwrap();
        a.mov(edi, 0x20_7ff8).unwrap();
        a.mov(ecx, 0x500).unwrap();
        a.std().unwrap();
        a.rep().movsq().unwrap();
        a.cld().unwrap();
        a.hlt().unwrap();
    });
    let g = Guest::new();
    let data: Vec<u8> = (0..0x8000u32).map(|i| (i * 37 + 11) as u8).collect();
    g.load(0x20_0000, &data);
    let mut low = vec![0u8; 0x300];
    assert!(g.cpu.ram().read(0, &mut low));
    let mut want = memory(&g);
    want[..0x300].copy_from_slice(&low);
    model_movs(&mut want, 0x3ff8, 0x7ff8, 8, 0x500, true);
    let mut g = g;
    g.load(CODE, &code);
    assert_eq!(g.cpu.run(&mut NoDevices, 10_000_000), RunExit::Halted);
    let s = g.cpu.state();
    assert_eq!(
        (s.gpr[6], s.gpr[7], s.gpr[1]),
        (0x20_3ff8 - 0x2800, 0x20_7ff8 - 0x2800, 0)
    );
    assert!(memory(&g) == want, "memory differs");
    let mut zeroed = vec![0u8; 0x80];
    assert!(g.cpu.ram().read(0, &mut zeroed));
    assert_eq!(zeroed, vec![0x5a; 0x80]);
}

/// A platform whose port 0x80 raises the kick flag (as a device thread would).
struct KickOnOut(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl x86emu::Platform for KickOnOut {
    fn mmio_read(&mut self, _gpa: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&mut self, _gpa: u64, _data: &[u8]) {}
    fn pio_read(&mut self, _port: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn pio_write(&mut self, port: u16, _data: &[u8]) {
        if port == 0x80 {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Entered under CLI, compiled code is given a kick flag that never rises. Once STI has
/// run, an interrupt that waits must be taken within a few blocks, not when the linked
/// loop ends or the run's budget is spent (a compiled STI puts the CPU's own flag back;
/// STI ending its block hands the check to the run loop).
#[test]
fn a_compiled_sti_rearms_the_kick_check() {
    let code = asm(64, CODE, |a| {
        let mut warm = a.create_label();
        let mut top = a.create_label();
        let mut mid = a.create_label();
        // The loop once through with nothing waiting: its blocks compile and link.
        a.mov(ecx, 1000).unwrap();
        a.mov(esi, 1).unwrap();
        a.set_label(&mut top).unwrap();
        a.cli().unwrap();
        a.inc(rax).unwrap();
        a.sti().unwrap();
        a.inc(rbx).unwrap();
        a.jmp(mid).unwrap();
        a.set_label(&mut mid).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(top).unwrap();
        a.dec(esi).unwrap();
        a.js(warm).unwrap();
        // Then under CLI an interrupt comes to wait (the kick flag up) and the loop runs
        // again, entered from the run loop with IF clear.
        a.cli().unwrap();
        a.out(0x80, al).unwrap();
        a.mov(ecx, 100_000).unwrap();
        a.xor(eax, eax).unwrap();
        a.jmp(top).unwrap();
        a.set_label(&mut warm).unwrap();
        a.hlt().unwrap();
    });
    let mut g = Guest::new();
    g.load(CODE, &code);
    g.cpu.set_jit_threshold(Some(0));
    let kick = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    g.cpu.set_kick(kick.clone());
    let mut s = g.cpu.state().clone();
    s.rflags &= !(1 << 9);
    g.cpu.set_state(s);
    let exit = g.cpu.run(&mut KickOnOut(kick), 10_000_000);
    let passes = g.cpu.state().gpr[0];
    assert_eq!(exit, RunExit::Kicked, "after {passes} passes");
    assert!(passes < 10, "{passes} passes ran before the kick was seen");
}
