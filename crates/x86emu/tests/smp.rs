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
                loop {
                    match cpu.run(&mut NoDevices, 100_000) {
                        RunExit::InstructionLimit => continue,
                        RunExit::Halted => break,
                        other => panic!("cpu {i}: {other:?}"),
                    }
                }
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
