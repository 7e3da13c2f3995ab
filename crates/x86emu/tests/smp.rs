//! Several vCPUs on threads sharing guest RAM: LOCK-prefixed operations must be atomic
//! across them, and a CMPXCHG spinlock must provide mutual exclusion.

use iced_x86::code_asm::*;
use x86emu::testing::{long_mode_state, PageTableBuilder, PTE_W};
use x86emu::{Cpu, GuestRam, NoDevices, RunExit};

const RAM: usize = 0x40_0000;
const CODE: u64 = 0x10_0000;
const COUNTER: u64 = 0x20_0000;
const LOCK: u64 = 0x20_1000;
const PLAIN: u64 = 0x20_2000;
const ITERS: u32 = 200_000;
const CPUS: usize = 4;

/// Page-aligned shared host memory that outlives the CPUs using it.
struct Shared {
    buf: Vec<u8>,
    off: usize,
}

impl Shared {
    fn new() -> Shared {
        let buf = vec![0u8; RAM + 4096];
        let off = buf.as_ptr().align_offset(4096);
        Shared { buf, off }
    }
    fn map(&mut self) -> GuestRam {
        let mut ram = GuestRam::new();
        let p = self.buf[self.off..].as_mut_ptr();
        // SAFETY: RAM bytes from p are inside `buf`, which outlives every CPU of the test
        // (the threads are joined before it is dropped).
        unsafe { ram.add_region(0, p, RAM).unwrap() };
        ram
    }
}

/// Runs `cpu` (CPU `i` of a test) until its program halts.
fn run_to_hlt(cpu: &mut Cpu, i: usize) {
    loop {
        match cpu.run(&mut NoDevices, 100_000) {
            RunExit::InstructionLimit | RunExit::Paused => continue,
            RunExit::Halted => break,
            other => panic!("cpu {i}: {other:?}"),
        }
    }
}

#[test]
fn locked_increments_and_spinlock_across_threads() {
    let mut shared = Shared::new();
    let ram0 = shared.map();
    let mut pt = PageTableBuilder::new(&ram0, 0x1000, 0x10000);
    pt.map(&ram0, 0, 0, 2, PTE_W);
    pt.map(&ram0, 0x20_0000, 0x20_0000, 2, PTE_W);
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    let mut spin = a.create_label();
    a.mov(rbx, COUNTER).unwrap();
    a.mov(rsi, LOCK).unwrap();
    a.mov(rdi, PLAIN).unwrap();
    a.mov(ecx, ITERS).unwrap();
    a.set_label(&mut top).unwrap();
    a.lock().add(qword_ptr(rbx), 1).unwrap();
    a.mov(eax, 1).unwrap();
    a.lock().xadd(qword_ptr(rbx + 8), rax).unwrap();
    // Spinlock around a plain (non-atomic) increment.
    a.set_label(&mut spin).unwrap();
    a.xor(eax, eax).unwrap();
    a.mov(edx, 1).unwrap();
    a.lock().cmpxchg(dword_ptr(rsi), edx).unwrap();
    a.jnz(spin).unwrap();
    a.mov(r8, qword_ptr(rdi)).unwrap();
    a.inc(r8).unwrap();
    a.mov(qword_ptr(rdi), r8).unwrap();
    a.xchg(dword_ptr(rsi), eax).unwrap(); // eax = 0 releases (xchg is always locked)
    a.dec(ecx).unwrap();
    a.jnz(top).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    ram0.write(CODE, &code);
    let root = pt.root;
    let handles: Vec<_> = (0..CPUS)
        .map(|i| {
            let ram = shared.map();
            std::thread::spawn(move || {
                let mut cpu = Cpu::new(ram);
                let mut s = long_mode_state(root, 0, 0, 0);
                s.rip = CODE;
                s.gpr[4] = 0x8_0000 + i as u64 * 0x1000;
                cpu.set_state(s);
                run_to_hlt(&mut cpu, i);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let read = |gpa| {
        let mut b = [0u8; 8];
        ram0.read(gpa, &mut b);
        u64::from_le_bytes(b)
    };
    let total = u64::from(ITERS) * CPUS as u64;
    assert_eq!(read(COUNTER), total, "LOCK ADD");
    assert_eq!(read(COUNTER + 8), total, "LOCK XADD");
    assert_eq!(read(PLAIN), total, "increments under the CMPXCHG spinlock");
    drop(ram0);
    drop(shared);
}

/// Each CPU sets and clears only its own bit of one shared byte, half of them with LOCK
/// BTS/BTR whose register offset addresses the next qword of a bit string (Linux's
/// set_bit/clear_bit with a variable bit number), the other half with LOCK OR/AND on the
/// byte itself; after every operation each CPU checks its bit. A locked update that is a
/// plain read and write loses the other CPUs' bits. Interpreted and compiled.
#[test]
fn locked_bit_string_operations_are_atomic_against_locked_byte_operations() {
    const WORD: u64 = 0x20_3000;
    const BAD: u64 = 0x20_4000;
    const GO: u64 = 0x20_5000;
    const BIT_ITERS: u32 = 1_000_000;
    for jit in [None, Some(0)] {
        let mut shared = Shared::new();
        let ram0 = shared.map();
        let mut pt = PageTableBuilder::new(&ram0, 0x1000, 0x10000);
        pt.map(&ram0, 0, 0, 2, PTE_W);
        pt.map(&ram0, 0x20_0000, 0x20_0000, 2, PTE_W);
        // rbx = WORD, rax = 64 + i (the bit, one qword on), rsi = i, dl = 1 << i,
        // r9b = !(1 << i), r11 = this CPU's bad counter, ecx = iterations.
        let check = |a: &mut CodeAssembler, set: bool, bad: &mut CodeLabel| {
            a.mov(r10, qword_ptr(rbx + 8)).unwrap();
            a.bt(r10, rsi).unwrap();
            if set {
                a.jnc(*bad).unwrap();
            } else {
                a.jc(*bad).unwrap();
            }
        };
        let mut programs = Vec::new();
        for bits in [true, false] {
            let mut a = CodeAssembler::new(64).unwrap();
            let mut top = a.create_label();
            let mut bad1 = a.create_label();
            let mut bad2 = a.create_label();
            let mut next = a.create_label();
            let mut wait = a.create_label();
            // Start together: the test is about overlapping updates.
            a.mov(r12, GO).unwrap();
            a.lock().inc(qword_ptr(r12)).unwrap();
            a.set_label(&mut wait).unwrap();
            a.pause().unwrap();
            a.cmp(qword_ptr(r12), CPUS as i32).unwrap();
            a.jb(wait).unwrap();
            a.set_label(&mut top).unwrap();
            if bits {
                a.lock().bts(qword_ptr(rbx), rax).unwrap();
            } else {
                a.lock().or(byte_ptr(rbx + 8), dl).unwrap();
            }
            check(&mut a, true, &mut bad1);
            if bits {
                a.lock().btr(qword_ptr(rbx), rax).unwrap();
            } else {
                a.lock().and(byte_ptr(rbx + 8), r9b).unwrap();
            }
            check(&mut a, false, &mut bad2);
            a.set_label(&mut next).unwrap();
            a.dec(ecx).unwrap();
            a.jnz(top).unwrap();
            a.hlt().unwrap();
            a.set_label(&mut bad1).unwrap();
            a.inc(qword_ptr(r11)).unwrap();
            a.jmp(next).unwrap();
            a.set_label(&mut bad2).unwrap();
            a.inc(qword_ptr(r11)).unwrap();
            a.jmp(next).unwrap();
            let at = CODE + if bits { 0 } else { 0x1000 };
            ram0.write(at, &a.assemble(at).unwrap());
            programs.push(at);
        }
        let root = pt.root;
        let handles: Vec<_> = (0..CPUS)
            .map(|i| {
                let ram = shared.map();
                let rip = programs[i % 2];
                std::thread::spawn(move || {
                    let mut cpu = Cpu::new(ram);
                    cpu.set_jit_threshold(jit);
                    let mut s = long_mode_state(root, 0, 0, 0);
                    s.rip = rip;
                    s.gpr[4] = 0x8_0000 + i as u64 * 0x1000;
                    s.gpr[0] = 64 + i as u64; // rax
                    s.gpr[1] = u64::from(BIT_ITERS); // rcx
                    s.gpr[2] = 1 << i; // dl
                    s.gpr[3] = WORD; // rbx
                    s.gpr[6] = i as u64; // rsi
                    s.gpr[9] = !(1u64 << i) & 0xff; // r9b
                    s.gpr[11] = BAD + i as u64 * 8;
                    cpu.set_state(s);
                    run_to_hlt(&mut cpu, i);
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let read = |gpa| {
            let mut b = [0u8; 8];
            ram0.read(gpa, &mut b);
            u64::from_le_bytes(b)
        };
        let bad: Vec<u64> = (0..CPUS as u64).map(|i| read(BAD + i * 8)).collect();
        assert!(
            bad.iter().all(|&b| b == 0),
            "CPUs found their own bit wrong {bad:?} times (jit {jit:?})"
        );
        assert_eq!(
            read(WORD + 8),
            0,
            "every bit cleared at the end (jit {jit:?})"
        );
        drop(ram0);
        drop(shared);
    }
}
