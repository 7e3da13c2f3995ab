//! Small guest builders for tests, examples and fuzzing: page tables in guest RAM and flat
//! long-mode register state. Not needed by a VMM, which builds its own boot state.

use crate::platform::GuestRam;
use crate::state::{cr, flags, CpuState, DescriptorTable, Seg, Segment};

/// Page-table entry bits.
pub const PTE_P: u64 = 1;
pub const PTE_W: u64 = 2;
pub const PTE_U: u64 = 4;
pub const PTE_PS: u64 = 0x80;
pub const PTE_G: u64 = 0x100;
pub const PTE_NX: u64 = 1 << 63;

/// Builds 4-level page tables in guest RAM, allocating table pages from a bump pointer.
#[derive(Debug)]
pub struct PageTableBuilder {
    pub root: u64,
    next: u64,
    end: u64,
}

impl PageTableBuilder {
    /// Tables are allocated in `[start, end)` (guest-physical, must be RAM).
    pub fn new(ram: &GuestRam, start: u64, end: u64) -> Self {
        let mut b = PageTableBuilder {
            root: start,
            next: start + 0x1000,
            end,
        };
        b.zero(ram, start);
        b
    }

    fn zero(&mut self, ram: &GuestRam, gpa: u64) {
        ram.write(gpa, &[0u8; 4096]);
    }

    fn alloc(&mut self, ram: &GuestRam) -> Option<u64> {
        if self.next >= self.end {
            return None;
        }
        let t = self.next;
        self.next += 0x1000;
        self.zero(ram, t);
        Some(t)
    }

    fn entry(ram: &GuestRam, gpa: u64) -> u64 {
        let mut b = [0u8; 8];
        ram.read(gpa, &mut b);
        u64::from_le_bytes(b)
    }

    /// Maps `va` to `gpa` with a page of 4 KiB (level 1), 2 MiB (level 2) or 1 GiB (level 3).
    /// `flags` apply to the leaf; intermediate entries get P|W|U. Returns false when out of
    /// table space.
    pub fn map(&mut self, ram: &GuestRam, va: u64, gpa: u64, level: u32, flags: u64) -> bool {
        let mut table = self.root;
        for l in (level + 1..=4).rev() {
            let idx = (va >> (12 + 9 * (l - 1))) & 0x1ff;
            let e_gpa = table + idx * 8;
            let e = Self::entry(ram, e_gpa);
            table = if e & PTE_P != 0 {
                e & 0x000f_ffff_ffff_f000
            } else {
                let Some(t) = self.alloc(ram) else {
                    return false;
                };
                ram.write(e_gpa, &(t | PTE_P | PTE_W | PTE_U).to_le_bytes());
                t
            };
        }
        let idx = (va >> (12 + 9 * (level - 1))) & 0x1ff;
        let leaf = gpa | flags | PTE_P | if level > 1 { PTE_PS } else { 0 };
        ram.write(table + idx * 8, &leaf.to_le_bytes());
        true
    }

    /// Reads back the leaf entry for `va` at `level` (for A/D-bit tests).
    pub fn leaf(&self, ram: &GuestRam, va: u64, level: u32) -> u64 {
        let mut table = self.root;
        for l in (level + 1..=4).rev() {
            let e = Self::entry(ram, table + ((va >> (12 + 9 * (l - 1))) & 0x1ff) * 8);
            table = e & 0x000f_ffff_ffff_f000;
        }
        Self::entry(ram, table + ((va >> (12 + 9 * (level - 1))) & 0x1ff) * 8)
    }
}

/// Flat 64-bit code segment at `dpl`.
pub fn code64(selector: u16, dpl: u8) -> Segment {
    Segment {
        selector: selector | u16::from(dpl),
        base: 0,
        limit: 0xffff_ffff,
        attr: 0xb
            | Segment::ATTR_S
            | Segment::ATTR_P
            | Segment::ATTR_L
            | Segment::ATTR_G
            | (u16::from(dpl) << 5),
    }
}

/// Flat writable data segment at `dpl`.
pub fn data(selector: u16, dpl: u8) -> Segment {
    Segment {
        selector: selector | u16::from(dpl),
        base: 0,
        limit: 0xffff_ffff,
        attr: 0x3
            | Segment::ATTR_S
            | Segment::ATTR_P
            | Segment::ATTR_DB
            | Segment::ATTR_G
            | (u16::from(dpl) << 5),
    }
}

/// GDT used by [`long_mode_state`]: null, kernel code 0x08, kernel data 0x10,
/// user data 0x18 (0x1b), user code 0x20 (0x23), TSS at 0x28 (16 bytes).
pub fn gdt_entries(tss_base: u64) -> [u64; 7] {
    let tss_lo =
        0x67 | ((tss_base & 0xff_ffff) << 16) | (0x89u64 << 40) | (((tss_base >> 24) & 0xff) << 56);
    [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00cf_f300_0000_ffff,
        0x00af_fb00_0000_ffff,
        tss_lo,
        tss_base >> 32,
    ]
}

/// 64-bit long-mode state at CPL `cpl` with paging rooted at `cr3`, SSE enabled, GDT at
/// `gdt` (see [`gdt_entries`]) and IDT at `idt` with 256 entries.
pub fn long_mode_state(cr3: u64, gdt: u64, idt: u64, cpl: u8) -> CpuState {
    let mut s = CpuState::reset();
    s.cr0 = cr::CR0_PE | cr::CR0_MP | cr::CR0_ET | cr::CR0_NE | cr::CR0_WP | cr::CR0_PG;
    s.cr3 = cr3;
    s.cr4 = cr::CR4_PAE | cr::CR4_PGE | cr::CR4_OSFXSR | cr::CR4_OSXMMEXCPT;
    s.efer = cr::EFER_LME | cr::EFER_LMA | cr::EFER_NXE | cr::EFER_SCE;
    let (cs, ds) = if cpl == 3 {
        (code64(0x20, 3), data(0x18, 3))
    } else {
        (code64(0x08, 0), data(0x10, 0))
    };
    for sg in Seg::ALL {
        s.seg[sg as usize] = ds;
    }
    s.seg[Seg::Cs as usize] = cs;
    s.gdtr = DescriptorTable {
        base: gdt,
        limit: 7 * 8 - 1,
    };
    s.idtr = DescriptorTable {
        base: idt,
        limit: 256 * 16 - 1,
    };
    s.tr = Segment {
        selector: 0x28,
        base: 0,
        limit: 0x67,
        attr: 0xb | Segment::ATTR_P,
    };
    s.rflags = flags::FIXED1;
    s
}

/// A 64-bit interrupt gate (type 0xE) to `handler` through code selector 0x08.
pub fn idt_gate(handler: u64, ist: u8, dpl: u8) -> [u8; 16] {
    let lo = (handler & 0xffff)
        | (0x08 << 16)
        | (u64::from(ist & 7) << 32)
        | (0x8eu64 << 40)
        | (u64::from(dpl & 3) << 45)
        | (((handler >> 16) & 0xffff) << 48);
    let hi = handler >> 32;
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&lo.to_le_bytes());
    b[8..].copy_from_slice(&hi.to_le_bytes());
    b
}

/// Compiles every block found by a linear sweep of `code` (64-bit, first byte at `ip`),
/// each on its own as the JIT would: for measuring the compiler's cost outside a guest.
/// Returns (blocks offered, blocks compiled, instructions in the compiled blocks).
pub fn compile_sweep(code: &[u8], ip: u64) -> (usize, usize, usize) {
    let Some(mut jit) = crate::jit::Jit::new(0) else {
        return (0, 0, 0);
    };
    jit.model = u64::MAX;
    let (mut offered, mut compiled, mut insns_done) = (0, 0, 0);
    let mut pos = 0usize;
    while pos < code.len() {
        let block = crate::decode::decode_block(64, ip + pos as u64, &code[pos..]);
        let len: usize = block.iter().map(|i| i.instr.len()).sum();
        if block.is_empty() || len == 0 {
            pos += 1;
            continue;
        }
        offered += 1;
        let key = crate::jit::shared::Key {
            gpa: pos as u64,
            ip: ip + pos as u64,
            bitness: 64,
            cross_gpa: 0,
            model: u64::MAX,
        };
        let bytes = &code[pos..pos + len];
        match jit.compile(key, bytes, &block, 0, None, None, None) {
            Ok(_) => {
                compiled += 1;
                insns_done += block.len();
            }
            Err(crate::jit::NoCode::Uncovered) => {}
            Err(crate::jit::NoCode::Full) => {
                // Nothing of this compiler runs: the memory comes back at once.
                jit.quiesce();
                let _ = jit.compile(key, bytes, &block, 0, None, None, None);
            }
        }
        pos += len;
    }
    (offered, compiled, insns_done)
}

/// Cuts every link between `cpu`'s compiled blocks while they stay trusted, as the block
/// cache does when its list of links is full: for tests of how links are made again.
pub fn cut_links(cpu: &mut crate::Cpu) {
    cpu.cut_links();
}
