//! What the compiler costs per block: sweeps the `.text` of an x86-64 ELF file (a kernel's
//! `vmlinux`, a program), cuts it into blocks as the block cache would, compiles each one,
//! and prints the time per block and per instruction.
//!
//!   cargo run --release -p x86emu --example jit_cost -- FILE [MAX_BYTES]

use std::time::Instant;

/// The file offset, size and address of the ELF64 section named `.text`.
fn text_section(elf: &[u8]) -> Option<(usize, usize, u64)> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    if elf.get(..5)? != b"\x7fELF\x02" {
        return None;
    }
    let shoff = u64_at(0x28)? as usize;
    let shentsize = u16_at(0x3a)? as usize;
    let shnum = u16_at(0x3c)? as usize;
    let shstrndx = u16_at(0x3e)? as usize;
    let names = u64_at(shoff + shstrndx * shentsize + 0x18)? as usize;
    (0..shnum).find_map(|i| {
        let sh = shoff + i * shentsize;
        let name = names + u32_at(sh)? as usize;
        if elf.get(name..name + 6)? != b".text\0" {
            return None;
        }
        Some((
            u64_at(sh + 0x18)? as usize,
            u64_at(sh + 0x20)? as usize,
            u64_at(sh + 0x10)?,
        ))
    })
}

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: jit_cost ELF [MAX_BYTES]");
        std::process::exit(2);
    };
    let max: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(4 << 20);
    let elf = std::fs::read(&path).unwrap_or_else(|e| {
        eprintln!("{path}: {e}");
        std::process::exit(1)
    });
    let Some((off, size, addr)) = text_section(&elf) else {
        eprintln!("{path}: no .text section in an ELF64 file");
        std::process::exit(1)
    };
    let text = &elf[off..(off + size.min(max)).min(elf.len())];
    let t = Instant::now();
    let (offered, compiled, insns) = x86emu::testing::compile_sweep(text, addr);
    let dt = t.elapsed();
    println!(
        "{} bytes: {offered} blocks, {compiled} compiled ({insns} instructions) in {:.3} s: \
         {:.2} us per compiled block, {:.0} ns per instruction",
        text.len(),
        dt.as_secs_f64(),
        dt.as_secs_f64() * 1e6 / compiled.max(1) as f64,
        dt.as_secs_f64() * 1e9 / insns.max(1) as f64
    );
}
