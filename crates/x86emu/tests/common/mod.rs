//! Shared fixtures: a long-mode guest with identity-mapped low memory, a GDT/TSS/IDT and
//! helpers to assemble code into it.
#![allow(dead_code)]

use iced_x86::code_asm::CodeAssembler;
use x86emu::testing::{gdt_entries, idt_gate, long_mode_state, PageTableBuilder, PTE_W};
use x86emu::{Cpu, GuestRam};

pub const PT_START: u64 = 0x1000;
pub const PT_END: u64 = 0x20000;
pub const GDT: u64 = 0x20000;
pub const TSS: u64 = 0x21000;
pub const IDT: u64 = 0x22000;
pub const RSP0: u64 = 0x80000;
pub const IST1: u64 = 0x90000;
pub const CODE: u64 = 0x10_0000;
pub const DATA: u64 = 0x20_0000;
pub const RAM: usize = 0x100_0000;

pub struct Guest {
    pub cpu: Cpu,
    pub pt: PageTableBuilder,
}

/// Assembles 64-bit code at `ip`.
pub fn asm(bits: u32, ip: u64, f: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
    let mut a = CodeAssembler::new(bits).unwrap();
    f(&mut a);
    a.assemble(ip).unwrap()
}

impl Guest {
    /// Long mode at CPL0, first 16 MiB identity mapped with 4 KiB supervisor pages
    /// except the page tables' own range.
    pub fn new() -> Guest {
        // Tests create thousands of 16 MiB guests. Left to itself, glibc raises its mmap
        // threshold after the first is freed and then serves the next from the heap, which
        // calloc must clear by hand: seconds of memset. A fixed threshold keeps them mmapped.
        static MMAP_RAM: std::sync::Once = std::sync::Once::new();
        // SAFETY: mallopt only changes an allocator tunable.
        MMAP_RAM.call_once(|| unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        });
        let mut ram = GuestRam::new();
        ram.add_owned(0, RAM).unwrap();
        let mut pt = PageTableBuilder::new(&ram, PT_START, PT_END);
        let mut va = 0;
        while va < RAM as u64 {
            assert!(pt.map(&ram, va, va, 2, PTE_W));
            va += 0x20_0000;
        }
        for (i, e) in gdt_entries(TSS).iter().enumerate() {
            ram.write(GDT + i as u64 * 8, &e.to_le_bytes());
        }
        ram.write(TSS + 4, &RSP0.to_le_bytes());
        ram.write(TSS + 0x24, &IST1.to_le_bytes());
        let mut cpu = Cpu::new(ram);
        let mut st = long_mode_state(pt.root, GDT, IDT, 0);
        st.tr.base = TSS;
        st.gpr[4] = 0x70000;
        st.rip = CODE;
        cpu.set_state(st);
        Guest { cpu, pt }
    }

    pub fn load(&self, gpa: u64, bytes: &[u8]) {
        assert!(self.cpu.ram().write(gpa, bytes));
    }

    pub fn load_code(&self, f: impl FnOnce(&mut CodeAssembler)) {
        let code = asm(64, CODE, f);
        self.load(CODE, &code);
    }

    pub fn set_gate(&self, vector: u8, handler: u64, ist: u8, dpl: u8) {
        self.load(IDT + u64::from(vector) * 16, &idt_gate(handler, ist, dpl));
    }

    pub fn read_u64(&self, gpa: u64) -> u64 {
        let mut b = [0u8; 8];
        assert!(self.cpu.ram().read(gpa, &mut b));
        u64::from_le_bytes(b)
    }

    /// Remaps a 2 MiB region as 4 KiB pages is not supported by the builder; instead map
    /// extra test pages above RAM's identity range.
    pub fn map4k(&mut self, va: u64, gpa: u64, flags: u64) {
        let ram = self.cpu.ram();
        assert!(self.pt.map(ram, va, gpa, 1, flags));
        self.cpu.flush_tlb();
    }
}
