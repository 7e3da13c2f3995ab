//! Runs one user-mode riscv64 ELF (a kept instruction-test program, RV64EMU_KEEP=1) on
//! rv64emu and under qemu-riscv64, and prints where their dumps differ:
//! `cargo run -p rv64emu --example user_replay -- ELF [compiled]` (with `compiled`, every
//! block runs as host code from its first run).

#[path = "../tests/common/mod.rs"]
mod common;

fn main() {
    let Some(elf) = std::env::args().nth(1) else {
        eprintln!("usage: user_replay ELF");
        std::process::exit(2);
    };
    let elf = std::path::PathBuf::from(elf);
    let q = common::run_qemu(&elf);
    let compiled = std::env::args().nth(2).as_deref() == Some("compiled");
    let e = common::run_emu(&elf, compiled);
    let mut same = true;
    for w in 0..q.len().min(e.len()) / 8 {
        let a = u64::from_le_bytes(q[8 * w..8 * w + 8].try_into().unwrap());
        let b = u64::from_le_bytes(e[8 * w..8 * w + 8].try_into().unwrap());
        if a != b {
            same = false;
            println!("word {w}: qemu {a:#018x} emu {b:#018x}");
        }
    }
    println!("{}", if same { "same" } else { "different" });
}
