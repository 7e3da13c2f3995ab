//! Paging: walks, #PF error codes and CR2, A/D bits, NX, U/S, WP, TLB invalidation.

mod common;

use common::*;
use iced_x86::code_asm::*;
use x86emu::exceptions::{pf, vector};
use x86emu::state::cr;
use x86emu::testing::{PTE_G, PTE_NX, PTE_U, PTE_W};
use x86emu::NoDevices;

const VA: u64 = 0x4000_0000_0000;
const PAGE: u64 = 0x30_0000;
const PAGE2: u64 = 0x30_1000;

fn guest_with(code: impl FnOnce(&mut CodeAssembler), flags: u64) -> Guest {
    let mut g = Guest::new();
    g.map4k(VA, PAGE, flags);
    g.load_code(code);
    g
}

fn fault_of(g: &mut Guest) -> x86emu::Fault {
    g.cpu
        .execute_one(&mut NoDevices)
        .expect_err("expected a fault")
}

#[test]
fn not_present_read_faults_with_cr2() {
    let mut g = guest_with(|a| a.mov(rax, qword_ptr(VA + 0x1008)).unwrap(), PTE_W);
    let f = fault_of(&mut g);
    assert_eq!(f.vector, vector::PF);
    assert_eq!(f.error, Some(0));
    assert_eq!(g.cpu.state().cr2, VA + 0x1008);
    assert_eq!(
        g.cpu.state().rip,
        CODE,
        "RIP stays on the faulting instruction"
    );
}

#[test]
fn write_to_read_only_page_with_wp() {
    let mut g = guest_with(|a| a.mov(qword_ptr(VA + 8), rax).unwrap(), 0);
    let f = fault_of(&mut g);
    assert_eq!(f.error, Some(pf::PRESENT | pf::WRITE));
    // With CR0.WP clear the supervisor may write.
    let mut st = g.cpu.state().clone();
    st.cr0 &= !cr::CR0_WP;
    g.cpu.set_state(st);
    g.cpu.execute_one(&mut NoDevices).unwrap();
}

#[test]
fn user_access_to_supervisor_page() {
    let mut g = Guest::new();
    // User code page and a supervisor data page.
    g.map4k(0x5000_0000, 0x31_0000, PTE_U);
    g.map4k(VA, PAGE, PTE_W);
    let code = asm(64, 0x5000_0000, |a| a.mov(rax, qword_ptr(VA)).unwrap());
    g.load(0x31_0000, &code);
    let mut st = g.cpu.state().clone();
    st.seg[1] = x86emu::testing::code64(0x20, 3);
    st.seg[2] = x86emu::testing::data(0x18, 3);
    st.rip = 0x5000_0000;
    g.cpu.set_state(st);
    let f = fault_of(&mut g);
    assert_eq!(f.error, Some(pf::PRESENT | pf::USER));
    // User write to a user read-only page.
    g.map4k(VA, PAGE, PTE_U);
    let code = asm(64, 0x5000_0000, |a| a.mov(qword_ptr(VA), rax).unwrap());
    g.load(0x31_0000, &code);
    let f = fault_of(&mut g);
    assert_eq!(f.error, Some(pf::PRESENT | pf::USER | pf::WRITE));
}

#[test]
fn nx_fetch_faults() {
    let mut g = Guest::new();
    g.map4k(VA, PAGE, PTE_W | PTE_NX);
    g.load(PAGE, &[0x90]);
    let mut st = g.cpu.state().clone();
    st.rip = VA;
    g.cpu.set_state(st);
    let f = fault_of(&mut g);
    assert_eq!(f.error, Some(pf::PRESENT | pf::FETCH));
    assert_eq!(g.cpu.state().cr2, VA);
}

#[test]
fn reserved_bit_faults() {
    let mut g = guest_with(|a| a.mov(rax, qword_ptr(VA)).unwrap(), PTE_W);
    // Set a physical-address bit above MAXPHYADDR in the leaf.
    let leaf_pt = g.pt.leaf(g.cpu.ram(), VA, 1);
    assert_ne!(leaf_pt & 1, 0);
    g.map4k(VA, PAGE | (1 << 50), PTE_W);
    let f = fault_of(&mut g);
    assert_eq!(f.error, Some(pf::PRESENT | pf::RSVD));
}

#[test]
fn accessed_and_dirty_bits() {
    let mut g = guest_with(
        |a| {
            a.mov(rax, qword_ptr(VA)).unwrap();
            a.mov(qword_ptr(VA), rax).unwrap();
        },
        PTE_W,
    );
    let e0 = g.pt.leaf(g.cpu.ram(), VA, 1);
    assert_eq!(e0 & 0x60, 0);
    g.cpu.execute_one(&mut NoDevices).unwrap();
    let e1 = g.pt.leaf(g.cpu.ram(), VA, 1);
    assert_eq!(e1 & 0x60, 0x20, "read sets A only");
    g.cpu.execute_one(&mut NoDevices).unwrap();
    let e2 = g.pt.leaf(g.cpu.ram(), VA, 1);
    assert_eq!(e2 & 0x60, 0x60, "write sets D");
}

#[test]
fn invlpg_and_cr3_reload_flush_tlb_but_global_survives() {
    let mut g = Guest::new();
    const GVA: u64 = 0x4000_0020_0000;
    g.map4k(VA, PAGE, PTE_W);
    g.map4k(GVA, PAGE, PTE_W | PTE_G);
    g.load(PAGE, &1u64.to_le_bytes());
    g.load(PAGE2, &2u64.to_le_bytes());
    g.load_code(|a| {
        a.mov(r14, VA).unwrap();
        a.mov(r15, GVA).unwrap();
        a.mov(rax, qword_ptr(r14)).unwrap(); // fills TLB with VA -> PAGE
        a.mov(rbx, qword_ptr(r15)).unwrap(); // global entry
        a.mov(rcx, qword_ptr(r14)).unwrap(); // stale after PTE change: still PAGE
        a.invlpg(qword_ptr(r14)).unwrap();
        a.mov(rdx, qword_ptr(r14)).unwrap(); // now PAGE2
        a.mov(rsi, cr3).unwrap();
        a.mov(cr3, rsi).unwrap();
        a.mov(rdi, qword_ptr(r15)).unwrap(); // global survives CR3 reload: still PAGE
        a.mov(r8, qword_ptr(r14)).unwrap();
    });
    for _ in 0..4 {
        g.cpu.execute_one(&mut NoDevices).unwrap();
    }
    // Repoint both PTEs at PAGE2 behind the TLB's back.
    let ram = g.cpu.ram();
    assert!(g.pt.map(ram, VA, PAGE2, 1, PTE_W));
    assert!(g.pt.map(ram, GVA, PAGE2, 1, PTE_W | PTE_G));
    for _ in 0..7 {
        g.cpu.execute_one(&mut NoDevices).unwrap();
    }
    let s = g.cpu.state();
    assert_eq!(s.gpr[0], 1);
    assert_eq!(s.gpr[3], 1);
    assert_eq!(s.gpr[1], 1, "no invalidation yet");
    assert_eq!(s.gpr[2], 2, "INVLPG flushed");
    assert_eq!(s.gpr[7], 1, "global entry survives CR3 reload");
    assert_eq!(s.gpr[8], 2);
}

#[test]
fn large_pages_and_page_crossing_access() {
    let mut g = Guest::new();
    // 2 MiB identity pages from Guest::new: write a qword across a 4 KiB boundary.
    g.load_code(|a| {
        a.mov(rax, 0x1122_3344_5566_7788u64).unwrap();
        a.mov(qword_ptr(DATA + 0xffc), rax).unwrap();
        a.mov(rbx, qword_ptr(DATA + 0xffc)).unwrap();
    });
    for _ in 0..3 {
        g.cpu.execute_one(&mut NoDevices).unwrap();
    }
    assert_eq!(g.cpu.state().gpr[3], 0x1122_3344_5566_7788);
    // A crossing write whose second page is not present must not write the first part.
    g.map4k(VA, PAGE, PTE_W);
    g.load(PAGE + 0xff8, &[0xaa; 8]);
    g.load(
        CODE,
        &asm(64, CODE, |a| a.mov(qword_ptr(VA + 0xffc), rax).unwrap()),
    );
    let mut st = g.cpu.state().clone();
    st.rip = CODE;
    g.cpu.set_state(st);
    let f = fault_of(&mut g);
    assert_eq!(f.vector, vector::PF);
    assert_eq!(g.cpu.state().cr2, VA + 0x1000);
    let mut b = [0u8; 8];
    g.cpu.ram().read(PAGE + 0xff8, &mut b);
    assert_eq!(b, [0xaa; 8]);
}

#[test]
fn cr3_reload_flushes_after_the_tlb_fill_list_overflows() {
    let mut g = Guest::new();
    const BASE: u64 = 0x5000_0000_0000;
    const N: u64 = 20_000; // more 4 KiB pages than TLB slots, through 2 MiB mappings
    let ram = g.cpu.ram();
    for i in 0..N.div_ceil(512) {
        assert!(g.pt.map(ram, BASE + i * 0x20_0000, 0x40_0000, 2, PTE_W));
    }
    g.cpu.flush_tlb();
    g.load(0x40_0000, &11u64.to_le_bytes());
    g.load(0x60_0000, &22u64.to_le_bytes());
    // Touch every page, then read page 0 (now cached), remap it, reload CR3, read again.
    g.load_code(|a| {
        let mut top = a.create_label();
        a.mov(rsi, BASE).unwrap();
        a.mov(ecx, N as u32).unwrap();
        a.set_label(&mut top).unwrap();
        a.mov(rax, qword_ptr(rsi)).unwrap();
        a.add(rsi, 4096).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(top).unwrap();
        a.mov(rsi, BASE).unwrap();
        a.mov(rbx, qword_ptr(rsi)).unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(
        g.cpu.run(&mut NoDevices, 1_000_000),
        x86emu::RunExit::Halted
    );
    assert_eq!(g.cpu.state().gpr[3], 11);
    let ram = g.cpu.ram();
    assert!(g.pt.map(ram, BASE, 0x60_0000, 2, PTE_W));
    g.load(
        CODE,
        &asm(64, CODE, |a| {
            a.mov(rbx, qword_ptr(rsi)).unwrap();
            a.mov(rax, cr3).unwrap();
            a.mov(cr3, rax).unwrap();
            a.mov(rbx, qword_ptr(rsi)).unwrap();
            a.hlt().unwrap();
        }),
    );
    // Keep the TLB: set_state would flush it, so only move RIP through state_mut, and
    // step with execute_one (the CPU is halted for run()).
    g.cpu.state_mut().rip = CODE;
    g.cpu.execute_one(&mut NoDevices).unwrap();
    assert_eq!(g.cpu.state().gpr[3], 11, "still cached before the reload");
    for _ in 0..3 {
        g.cpu.execute_one(&mut NoDevices).unwrap();
    }
    assert_eq!(
        g.cpu.state().gpr[3],
        22,
        "CR3 reload dropped the stale translation"
    );
}

/// 32-bit protected mode with paging (no long mode): `pae` selects PAE or 2-level tables.
fn legacy_paging_guest(pae: bool) -> x86emu::Cpu {
    use x86emu::state::{Seg, Segment};
    let mut ram = x86emu::GuestRam::new();
    ram.add_owned(0, 0x80_0000).unwrap();
    let put32 =
        |ram: &x86emu::GuestRam, gpa: u64, v: u32| assert!(ram.write(gpa, &v.to_le_bytes()));
    let put64 =
        |ram: &x86emu::GuestRam, gpa: u64, v: u64| assert!(ram.write(gpa, &v.to_le_bytes()));
    let root;
    if pae {
        // PDPT at 0x1000 -> PD at 0x2000: PD[0] = 2 MiB identity (code), PD[2] -> PT at 0x3000.
        root = 0x1000;
        put64(&ram, 0x1000, 0x2000 | 1);
        put64(&ram, 0x2000, 0x83); // 2 MiB page at 0, present+writable
        put64(&ram, 0x2000 + 2 * 8, 0x3000 | 7);
        put64(&ram, 0x3000 + 8, 0x60_0000 | 5); // VA 0x401000 -> 0x600000, user, read-only
    } else {
        // PD at 0x1000: PDE[0] = 4 MiB identity page (PSE), PDE[1] -> PT at 0x2000.
        root = 0x1000;
        put32(&ram, 0x1000, 0x83);
        put32(&ram, 0x1004, 0x2000 | 7);
        put32(&ram, 0x2000 + 4, 0x60_0000 | 5); // VA 0x401000 -> 0x600000, user, read-only
    }
    put32(&ram, 0x60_0000, 0xfeed_f00d);
    let mut cpu = x86emu::Cpu::new(ram);
    let mut s = x86emu::CpuState::reset();
    s.cr0 = x86emu::state::cr::CR0_PE | x86emu::state::cr::CR0_PG | x86emu::state::cr::CR0_WP;
    s.cr3 = root;
    s.cr4 = if pae {
        x86emu::state::cr::CR4_PAE
    } else {
        x86emu::state::cr::CR4_PSE
    };
    let code = Segment::from_descriptor(0x08, 0x00cf_9b00_0000_ffff);
    let data = Segment::from_descriptor(0x10, 0x00cf_9300_0000_ffff);
    for sg in Seg::ALL {
        s.seg[sg as usize] = data;
    }
    s.seg[Seg::Cs as usize] = code;
    s.rip = 0x10_0000;
    s.gpr[4] = 0x9_0000;
    cpu.set_state(s);
    let code = asm(32, 0x10_0000, |a| {
        a.mov(eax, dword_ptr(0x40_1000)).unwrap();
        a.mov(dword_ptr(0x40_1000), eax).unwrap(); // read-only page, WP=1: #PF
    });
    assert!(cpu.ram().write(0x10_0000, &code));
    cpu
}

#[test]
fn legacy_2level_and_pae_paging() {
    for pae in [false, true] {
        let mut cpu = legacy_paging_guest(pae);
        cpu.execute_one(&mut NoDevices).unwrap();
        assert_eq!(cpu.state().gpr[0], 0xfeed_f00d, "pae={pae}");
        let f = cpu.execute_one(&mut NoDevices).unwrap_err();
        assert_eq!(
            (f.vector, f.error),
            (vector::PF, Some(pf::PRESENT | pf::WRITE)),
            "pae={pae}"
        );
        assert_eq!(cpu.state().cr2, 0x40_1000);
    }
}

/// INVLPG of any address in a 2 MiB page drops the TLB entries filled from the whole page,
/// whichever 4 KiB part of it they were for.
#[test]
fn invlpg_drops_every_entry_of_a_large_page() {
    let mut g = Guest::new();
    const NEW: u64 = 0x60_0000; // the 2 MiB frame DATA's page is moved to
    g.load(DATA + 0x5008, &1u64.to_le_bytes());
    g.load(NEW + 0x5008, &2u64.to_le_bytes());
    g.load_code(|a| {
        a.mov(rsi, DATA).unwrap();
        a.mov(rax, qword_ptr(rsi + 0x5008)).unwrap(); // entry for DATA + 0x5000
        a.invlpg(qword_ptr(rsi + 0x1_0000)).unwrap(); // another 4 KiB of the same page
        a.mov(rbx, qword_ptr(rsi + 0x5008)).unwrap();
    });
    for _ in 0..2 {
        g.cpu.execute_one(&mut NoDevices).unwrap();
    }
    let ram = g.cpu.ram();
    assert!(g.pt.map(ram, DATA, NEW, 2, PTE_W));
    for _ in 0..2 {
        g.cpu.execute_one(&mut NoDevices).unwrap();
    }
    assert_eq!(g.cpu.state().gpr[0], 1);
    assert_eq!(
        g.cpu.state().gpr[3],
        2,
        "INVLPG dropped the 2 MiB page's entries"
    );
}
