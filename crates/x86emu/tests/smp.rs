//! Several vCPUs on threads sharing guest RAM: LOCK-prefixed operations must be atomic
//! across them, and a CMPXCHG spinlock must provide mutual exclusion.

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;
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
    let root = identity_tables(&ram0);
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
    let handles: Vec<_> = (0..CPUS)
        .map(|i| {
            let ram = shared.map();
            std::thread::spawn(move || {
                run_program(&mut Cpu::new(ram), root, CODE, i);
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
        let root = identity_tables(&ram0);
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

/// Builds the shared page tables (code and data pages identity-mapped) and returns CR3.
fn identity_tables(ram: &GuestRam) -> u64 {
    let mut pt = PageTableBuilder::new(ram, 0x1000, 0x10000);
    pt.map(ram, 0, 0, 2, PTE_W);
    pt.map(ram, 0x20_0000, 0x20_0000, 2, PTE_W);
    pt.root
}

/// A CPU of a machine: it shares the first CPU's code tracker and compiled code.
fn machine_cpu(ram: GuestRam, first: Option<&Cpu>) -> Cpu {
    let mut cpu = Cpu::new(ram);
    if let Some(f) = first {
        cpu.set_code_tracker(f.code_tracker());
        cpu.share_code(&f.code_cache().expect("compiled code on this host"));
    }
    cpu
}

/// Runs the program at `rip` on `cpu` from a fresh state and returns RAX.
fn run_program(cpu: &mut Cpu, root: u64, rip: u64, i: usize) -> u64 {
    let mut s = long_mode_state(root, 0, 0, 0);
    s.rip = rip;
    s.gpr[4] = 0x8_0000 + i as u64 * 0x1000;
    cpu.set_state(s);
    run_to_hlt(cpu, i);
    cpu.state().gpr[0]
}

/// The patch program's address (see `patchable_loop`).
const PATCH: u64 = CODE + 0x800;

/// Writes a loop at CODE that runs `loops` times `rax = rol(rax, 3) + 0x11`, and at PATCH a
/// program that rewrites the loop's 0x11 to 0x2d (a guest store into the code). Returns
/// what the loop leaves in RAX for an addend.
fn patchable_loop(ram: &GuestRam, loops: u32) -> impl Fn(u64) -> u64 {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    let mut imm = a.create_label();
    a.xor(eax, eax).unwrap();
    a.mov(ecx, loops).unwrap();
    a.set_label(&mut top).unwrap();
    a.rol(rax, 3).unwrap();
    a.set_label(&mut imm).unwrap();
    a.add(rax, 0x11).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(top).unwrap();
    a.hlt().unwrap();
    let code = a
        .assemble_options(CODE, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
        .unwrap();
    let imm_at = code.label_ip(&imm).unwrap();
    let bytes = code.inner.code_buffer.as_slice();
    // `add rax, imm32`: REX.W 05 id.
    let off = (imm_at - CODE) as usize;
    assert_eq!(bytes.get(off..off + 3), Some(&[0x48, 0x05, 0x11][..]));
    ram.write(CODE, bytes);
    // The patcher: a guest store of a new immediate (the low byte of `add rax, imm32`).
    let mut p = CodeAssembler::new(64).unwrap();
    p.mov(rbx, imm_at + 2).unwrap();
    p.mov(byte_ptr(rbx), 0x2d).unwrap();
    p.hlt().unwrap();
    ram.write(PATCH, &p.assemble(PATCH).unwrap());
    move |add: u64| (0..loops).fold(0u64, |x, _| x.rotate_left(3).wrapping_add(add))
}

/// Two CPUs of one machine sharing compiled code, each having run `patchable_loop` once
/// (the first compiled it). Fields drop in order: the CPUs before the RAM they run on.
struct LoopOnTwo {
    cpu0: Cpu,
    cpu1: Cpu,
    root: u64,
    expect: Box<dyn Fn(u64) -> u64>,
    ram0: GuestRam,
    shared: Shared,
}

impl LoopOnTwo {
    fn run(loops: u32) -> LoopOnTwo {
        let mut shared = Shared::new();
        let ram0 = shared.map();
        let root = identity_tables(&ram0);
        let expect = Box::new(patchable_loop(&ram0, loops));
        let mut cpu0 = machine_cpu(shared.map(), None);
        let mut cpu1 = machine_cpu(shared.map(), Some(&cpu0));
        assert_eq!(run_program(&mut cpu0, root, CODE, 0), expect(0x11));
        assert_eq!(run_program(&mut cpu1, root, CODE, 1), expect(0x11));
        LoopOnTwo {
            cpu0,
            cpu1,
            root,
            expect,
            ram0,
            shared,
        }
    }
}

/// Two CPUs of one machine share compiled code: the second runs the first's blocks
/// without compiling them again, and when it rewrites an instruction of that code, the
/// first runs the new instruction (not the code compiled for the old one).
#[test]
fn cpus_run_each_others_compiled_code_and_see_each_others_code_writes() {
    let LoopOnTwo {
        mut cpu0,
        mut cpu1,
        root,
        expect,
        ram0,
        shared,
    } = LoopOnTwo::run(5_000);
    assert!(cpu0.compiled_blocks() > 0, "the loop was not compiled");
    assert_eq!(
        cpu1.compiled_blocks(),
        0,
        "the second CPU compiled the loop again"
    );
    assert!(
        cpu1.adopted_blocks() > 0,
        "the second CPU ran no shared code"
    );
    run_program(&mut cpu1, root, PATCH, 1);
    assert_eq!(
        run_program(&mut cpu0, root, CODE, 0),
        expect(0x2d),
        "the first CPU ran code compiled before the second rewrote it"
    );
    assert_eq!(run_program(&mut cpu1, root, CODE, 1), expect(0x2d));
    drop((cpu0, cpu1, ram0));
    drop(shared);
}

/// A block a CPU took from another's compiled code is installed once: each later lookup
/// of it while it warmed up used to install it again, which reset its links, and every
/// one was made again through an exit to the run loop.
#[test]
fn an_adopted_block_is_installed_once() {
    let LoopOnTwo {
        cpu0,
        mut cpu1,
        root,
        expect,
        ram0,
        shared,
    } = LoopOnTwo::run(2_000);
    let adopted = cpu1.adopted_blocks();
    assert!(adopted > 0, "the second CPU ran no shared code");
    // Each run looks the loop up from the run loop again: past 4, 16, 64 and 128 runs.
    for _ in 0..200 {
        assert_eq!(run_program(&mut cpu1, root, CODE, 1), expect(0x11));
    }
    assert_eq!(
        cpu1.adopted_blocks(),
        adopted,
        "a block taken from the other CPU was installed again"
    );
    drop((cpu0, cpu1, ram0));
    drop(shared);
}

/// A CPU holding a block another CPU compiled from the same decoding takes that code at
/// its next run of it, not at its next count of runs that asks the machine (4, 16, 64),
/// interpreting it until then.
#[test]
fn a_block_compiled_elsewhere_is_taken_at_its_next_run() {
    let mut shared = Shared::new();
    let ram0 = shared.map();
    let root = identity_tables(&ram0);
    // Straight-line code: one block, run once per program run.
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(eax, 7).unwrap();
    a.add(rax, 35).unwrap();
    a.hlt().unwrap();
    ram0.write(CODE, &a.assemble(CODE).unwrap());
    let mut cpu0 = machine_cpu(shared.map(), None);
    let mut cpu1 = machine_cpu(shared.map(), Some(&cpu0));
    cpu1.share_decoded(&cpu0.decoded_blocks());
    assert_eq!(run_program(&mut cpu0, root, CODE, 0), 42);
    // The second CPU takes the first's decoding and runs it twice: not hot, no code yet.
    for _ in 0..2 {
        assert_eq!(run_program(&mut cpu1, root, CODE, 1), 42);
    }
    assert_eq!(cpu1.adopted_blocks(), 0);
    // Hot on the first CPU: compiled there.
    for _ in 0..200 {
        assert_eq!(run_program(&mut cpu0, root, CODE, 0), 42);
    }
    assert!(cpu0.compiled_blocks() > 0, "the block was not compiled");
    // The second CPU's third run (no count that asks the machine) takes that code.
    assert_eq!(run_program(&mut cpu1, root, CODE, 1), 42);
    assert_eq!(
        cpu1.adopted_blocks(),
        1,
        "the second CPU did not take the code compiled for its block"
    );
    drop((cpu0, cpu1, ram0));
    drop(shared);
}

/// Two CPUs of one machine share decoded blocks: the second runs the first's program
/// without decoding it again; after the first rewrites an instruction, the second decodes
/// the changed block itself (it must not take the stale one), and the first then takes
/// that new decoding instead of its own stale block.
#[test]
fn cpus_take_each_others_decoded_blocks_while_the_bytes_stay() {
    const LOOPS: u32 = 50;
    let mut shared = Shared::new();
    let ram0 = shared.map();
    let root = identity_tables(&ram0);
    let expect = patchable_loop(&ram0, LOOPS);

    // Interpreted only: every block the CPUs run goes through their block caches.
    let mut cpu0 = Cpu::new(shared.map());
    let mut cpu1 = Cpu::new(shared.map());
    cpu1.set_code_tracker(cpu0.code_tracker());
    cpu1.share_decoded(&cpu0.decoded_blocks());
    cpu0.set_jit_threshold(None);
    cpu1.set_jit_threshold(None);
    assert_eq!(run_program(&mut cpu0, root, CODE, 0), expect(0x11));
    assert!(cpu0.decode_counts().0 > 0);
    assert_eq!(run_program(&mut cpu1, root, CODE, 1), expect(0x11));
    let (decoded, taken) = cpu1.decode_counts();
    assert_eq!(decoded, 0, "the second CPU decoded the program again");
    assert!(taken > 0);
    run_program(&mut cpu0, root, PATCH, 0);
    assert_eq!(
        run_program(&mut cpu1, root, CODE, 1),
        expect(0x2d),
        "the second CPU ran a block decoded before the first rewrote it"
    );
    assert!(cpu1.decode_counts().0 > 0);
    let before = cpu0.decode_counts();
    assert_eq!(run_program(&mut cpu0, root, CODE, 0), expect(0x2d));
    let after = cpu0.decode_counts();
    assert_eq!(
        after.0, before.0,
        "the first CPU decoded the rewritten block again"
    );
    assert!(after.1 > before.1);
    drop((cpu0, cpu1, ram0));
    drop(shared);
}

/// CPUs running at once share a code memory too small for their program: it fills up
/// again and again, each time every CPU drops its compiled blocks before the memory is
/// reused, and every CPU's result stays right.
#[test]
fn cpus_sharing_a_full_code_memory_flush_it_together() {
    const BLOCKS: u64 = 1_500;
    const LOOPS: u32 = 300;
    let mut shared = Shared::new();
    let ram0 = shared.map();
    let root = identity_tables(&ram0);
    // A chain of small blocks, each ending in a JMP to the next, run LOOPS times.
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    a.xor(eax, eax).unwrap();
    a.mov(ecx, LOOPS).unwrap();
    a.set_label(&mut top).unwrap();
    for i in 0..BLOCKS {
        let mut next = a.create_label();
        a.add(rax, (i * 7 + 1) as i32).unwrap();
        a.jmp(next).unwrap();
        a.set_label(&mut next).unwrap();
    }
    a.dec(ecx).unwrap();
    a.jnz(top).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    assert!(code.len() < 0x10_0000, "the program overlaps the data");
    ram0.write(CODE, &code);
    let expect = u64::from(LOOPS) * (0..BLOCKS).map(|i| i * 7 + 1).sum::<u64>();
    let cache = x86emu::CodeCache::new(64 << 10).expect("compiled code on this host");
    let first = machine_cpu(shared.map(), None);
    let tracker = first.code_tracker();
    drop(first);
    let handles: Vec<_> = (0..CPUS)
        .map(|i| {
            let ram = shared.map();
            let (cache, tracker) = (cache.clone(), tracker.clone());
            std::thread::spawn(move || {
                let mut cpu = Cpu::new(ram);
                cpu.set_code_tracker(tracker);
                cpu.share_code(&cache);
                let r = run_program(&mut cpu, root, CODE, i);
                (r, cpu.compiled_blocks() + cpu.adopted_blocks())
            })
        })
        .collect();
    let mut code_blocks = 0;
    for (i, h) in handles.into_iter().enumerate() {
        let (r, blocks) = h.join().unwrap();
        assert_eq!(r, expect, "cpu {i}");
        code_blocks += blocks;
    }
    assert!(code_blocks > 0, "no CPU ran compiled code");
    assert!(cache.flushes() > 0, "the code memory never filled up");
    drop(ram0);
    drop(shared);
}
