//! Arbitrary instruction bytes and register state: the emulator must execute or raise an
//! exception into the guest, never panic.
//!
//! Run with `cargo +nightly fuzz run x86emu_exec` from the repository root.
#![no_main]

use libfuzzer_sys::fuzz_target;
use x86emu::state::{Seg, Segment};
use x86emu::testing::{gdt_entries, long_mode_state, PageTableBuilder, PTE_U, PTE_W};
use x86emu::{Cpu, GuestRam, NoDevices};

const CODE: u64 = 0x10_0000;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (ctl, rest) = data.split_at(2);
    let mut ram = GuestRam::new();
    if ram.add_owned(0, 0x40_0000).is_err() {
        return;
    }
    let mut pt = PageTableBuilder::new(&ram, 0x1000, 0x20000);
    let mut va = 0;
    while va < 0x40_0000 {
        pt.map(&ram, va, va, 2, PTE_W | PTE_U);
        va += 0x20_0000;
    }
    for (i, e) in gdt_entries(0x21000).iter().enumerate() {
        ram.write(0x20000 + i as u64 * 8, &e.to_le_bytes());
    }
    // Instruction bytes at CODE, the rest of the input as IDT/data garbage.
    let code_len = rest.len().min(64);
    ram.write(CODE, &rest[..code_len]);
    ram.write(0x22000, &rest[code_len..rest.len().min(code_len + 4096)]);
    let mut cpu = Cpu::new(ram);
    let mut s = long_mode_state(pt.root, 0x20000, 0x22000, ctl[0] & 3);
    s.rip = CODE;
    s.gpr[4] = 0x30_0000;
    for (k, g) in s.gpr.iter_mut().enumerate() {
        if k != 4 {
            *g = u64::from(ctl[1]).wrapping_mul(0x0101_0101_0101_0101) ^ (k as u64) << 20;
        }
    }
    match ctl[0] >> 6 {
        1 => s.seg[Seg::Cs as usize].attr = (s.seg[Seg::Cs as usize].attr & !Segment::ATTR_L) | Segment::ATTR_DB,
        2 => {
            s = x86emu::CpuState::reset();
            s.seg[Seg::Cs as usize] = Segment::real_mode((CODE >> 4) as u16, true);
            s.rip = 0;
        }
        _ => {}
    }
    cpu.set_state(s);
    let _ = cpu.run(&mut NoDevices, 256);
});
