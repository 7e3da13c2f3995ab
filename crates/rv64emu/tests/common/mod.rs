//! Shared by the instruction tests: assembling with Debian's riscv64 binutils, running
//! under `qemu-riscv64`, and running the same ELF on rv64emu in a small user-mode harness.

#![allow(dead_code)]

use rv64emu::{Cpu, Exception, GuestRam, NoDevices, RunExit};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const AS: &str = "riscv64-linux-gnu-as";
pub const LD: &str = "riscv64-linux-gnu-ld";
pub const QEMU: &str = "qemu-riscv64";

/// Fails with the setup step when a tool is missing.
pub fn require_tools() {
    for (tool, pkg) in [
        (AS, "binutils-riscv64-linux-gnu"),
        (LD, "binutils-riscv64-linux-gnu"),
        (QEMU, "qemu-user"),
    ] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            found,
            "{tool} not found: install Debian's {pkg} (scripts/test.sh does: apt-get install -y {pkg})"
        );
    }
}

/// A scratch folder removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("rv64emu-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("RV64EMU_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Assembles and links `source` into a static ELF; `march` as for `as -march`.
pub fn build(dir: &Path, name: &str, source: &str, march: &str) -> PathBuf {
    let s = dir.join(format!("{name}.s"));
    let o = dir.join(format!("{name}.o"));
    let elf = dir.join(name);
    std::fs::write(&s, source).unwrap();
    let out = Command::new(AS)
        .args(["-march", march, "-mabi", "lp64d", "-o"])
        .arg(&o)
        .arg(&s)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "assembling {name} failed:\n{}\n{source}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(LD)
        .args(["-static", "--no-relax", "-Ttext=0x10000", "-o"])
        .arg(&elf)
        .arg(&o)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "linking {name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    elf
}

/// Runs `elf` under qemu-riscv64 and returns its stdout.
pub fn run_qemu(elf: &Path) -> Vec<u8> {
    let out = Command::new(QEMU).arg(elf).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-riscv64 {} failed: {:?} {}",
        elf.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn u16_at(b: &[u8], o: usize) -> u64 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap()) as u64
}
fn u32_at(b: &[u8], o: usize) -> u64 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as u64
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// The RAM window user programs are loaded into.
pub const RAM_BASE: u64 = 0;
pub const RAM_SIZE: usize = 0x20_0000;

/// Loads a static ELF's PT_LOAD segments into fresh RAM; returns the CPU at its entry.
pub fn load_elf(elf: &Path) -> Cpu {
    let b = std::fs::read(elf).unwrap();
    assert_eq!(&b[..4], b"\x7fELF");
    let entry = u64_at(&b, 24);
    let phoff = u64_at(&b, 32) as usize;
    let phentsize = u16_at(&b, 54) as usize;
    let phnum = u16_at(&b, 56) as usize;
    let mut ram = GuestRam::new();
    ram.add_owned(RAM_BASE, RAM_SIZE).unwrap();
    for n in 0..phnum {
        let ph = phoff + n * phentsize;
        if u32_at(&b, ph) != 1 {
            continue;
        }
        let off = u64_at(&b, ph + 8) as usize;
        let vaddr = u64_at(&b, ph + 16);
        let filesz = u64_at(&b, ph + 32) as usize;
        assert!(ram.write_bytes(vaddr, &b[off..off + filesz]));
    }
    Cpu::new(ram, entry)
}

/// Runs a user program on rv64emu, serving `write` and `exit`; returns what it wrote.
/// Each block is interpreted (`compiled` false) or compiled to host code at its first
/// run (true: then at least one block must have been).
pub fn run_emu(elf: &Path, compiled: bool) -> Vec<u8> {
    let mut cpu = load_elf(elf);
    cpu.set_jit_threshold(compiled.then_some(1));
    let out = serve(&mut cpu);
    if compiled {
        assert!(cpu.compiled_blocks() > 0, "no block was compiled");
    }
    out
}

fn serve(cpu: &mut Cpu) -> Vec<u8> {
    cpu.exit_on_exception = true;
    // Let FP state be used like Linux allows it for user programs.
    cpu.csr.mstatus |= 1 << 13;
    let mut out = Vec::new();
    for _ in 0..1000 {
        match cpu.run(&mut NoDevices, 10_000_000) {
            RunExit::Exception(Exception::EcallFromM) => {
                let nr = cpu.x[17];
                match nr {
                    64 => {
                        let (buf, len) = (cpu.x[11], cpu.x[12] as usize);
                        let mut data = vec![0u8; len];
                        assert!(cpu.ram().read_bytes(buf, &mut data), "write() outside RAM");
                        out.extend_from_slice(&data);
                        cpu.x[10] = len as u64;
                    }
                    93 | 94 => return out,
                    _ => panic!("unexpected syscall {nr} at {:#x}", cpu.pc),
                }
                cpu.pc += 4;
            }
            other => panic!("program stopped with {other:?} at pc {:#x}", cpu.pc),
        }
    }
    panic!("program did not exit");
}

/// A small deterministic generator (xorshift64*), so failures replay from the seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
    /// A register value biased towards edge cases.
    pub fn value(&mut self) -> u64 {
        const EDGES: [u64; 12] = [
            0,
            1,
            u64::MAX,
            i64::MIN as u64,
            i64::MAX as u64,
            0x7fff_ffff,
            0x8000_0000,
            0xffff_ffff,
            0xffff_ffff_8000_0000,
            2,
            0x8000_0000_0000_0001,
            31,
        ];
        match self.below(4) {
            0 => *self.pick(&EDGES),
            1 => self.below(64),
            2 => self.next() as i32 as i64 as u64,
            _ => self.next(),
        }
    }
}

/// Symbol addresses of an ELF, from binutils' nm.
pub fn symbols(elf: &Path) -> std::collections::HashMap<String, u64> {
    let out = Command::new("riscv64-linux-gnu-nm")
        .arg(elf)
        .output()
        .unwrap();
    assert!(out.status.success(), "riscv64-linux-gnu-nm failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let addr = u64::from_str_radix(f.next()?, 16).ok()?;
            let _kind = f.next()?;
            Some((f.next()?.to_string(), addr))
        })
        .collect()
}

/// Assembles and links a bare-metal program at `base`.
pub fn build_bare(dir: &Path, name: &str, source: &str, base: u64) -> PathBuf {
    let s = dir.join(format!("{name}.s"));
    let o = dir.join(format!("{name}.o"));
    let elf = dir.join(name);
    std::fs::write(&s, source).unwrap();
    let out = Command::new(AS)
        .args(["-march", "rv64gc", "-o"])
        .arg(&o)
        .arg(&s)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "assembling {name} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(LD)
        .args(["-static", "--no-relax"])
        .arg(format!("-Ttext={base:#x}"))
        .arg("-o")
        .arg(&elf)
        .arg(&o)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "linking {name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    elf
}

/// Loads an ELF's segments into `ram`; returns its entry point.
pub fn load_segments(elf: &Path, ram: &GuestRam) -> u64 {
    let b = std::fs::read(elf).unwrap();
    assert_eq!(&b[..4], b"\x7fELF");
    let phoff = u64_at(&b, 32) as usize;
    let phentsize = u16_at(&b, 54) as usize;
    let phnum = u16_at(&b, 56) as usize;
    for n in 0..phnum {
        let ph = phoff + n * phentsize;
        if u32_at(&b, ph) != 1 {
            continue;
        }
        let off = u64_at(&b, ph + 8) as usize;
        let mut paddr = u64_at(&b, ph + 24);
        let filesz = u64_at(&b, ph + 32) as usize;
        let mut data = &b[off..off + filesz];
        // The first segment carries the ELF headers just below the text: skip them.
        while !data.is_empty() && !ram.contains(paddr) {
            let skip = (0x1000 - (paddr & 0xfff)) as usize;
            data = &data[skip.min(data.len())..];
            paddr += skip as u64;
        }
        assert!(ram.write_bytes(paddr, data));
    }
    u64_at(&b, 24)
}
