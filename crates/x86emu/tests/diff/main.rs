//! Differential tests: random instructions from random states, run on the host CPU and in
//! x86emu, must leave identical registers, defined flags, XMM state, MXCSR and memory.
//!
//! `X86EMU_DIFF_CASES=N` sets cases per family (default small for debug builds),
//! `X86EMU_SEED=S` reproduces a run; a failure prints the seed, the instruction and a diff.

mod native;

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register, RflagsBits};
use native::{run_native, NativeState, SCRATCH, SCRATCH32, SCRATCH_LEN};
use x86emu::state::{flags, Seg};
use x86emu::testing::{long_mode_state, PageTableBuilder, PTE_U, PTE_W};
use x86emu::{Cpu, GuestRam, NoDevices};

const CODE_VA: u64 = 0x10_0000;
/// The scratch buffer's guest-physical address (its virtual address is the host's).
const SCRATCH_GPA: u64 = 0x4000_0000;

thread_local! {
    /// Whether this test thread runs its family in compatibility mode (32-bit code).
    static COMPAT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn compat() -> bool {
    COMPAT.with(|c| c.get())
}

/// The scratch buffer's address in the current mode (same in guest and host).
pub fn scratch() -> u64 {
    if compat() {
        SCRATCH32
    } else {
        SCRATCH
    }
}

/// xorshift64*: small, seedable, good enough for test-case generation.
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
    /// Values that hit edge cases more often than uniform bits do.
    pub fn interesting(&mut self) -> u64 {
        match self.below(8) {
            0 => 0,
            1 => self.below(64),
            2 => u64::MAX - self.below(4),
            3 => 1u64 << self.below(64),
            4 => 0x8000_0000_0000_0000 ^ self.below(3),
            5 => (self.next_u64() as u32 as i32 as i64) as u64,
            6 => self.next_u64() & 0xff,
            _ => self.next_u64(),
        }
    }
}

/// Float bit patterns with many special values.
pub fn interesting_f64(r: &mut Rng) -> u64 {
    let v: f64 = match r.below(12) {
        0 => 0.0,
        1 => -0.0,
        2 => f64::INFINITY,
        3 => f64::NEG_INFINITY,
        4 => return 0x7ff8_0000_0000_0000 | r.below(1 << 20), // QNaN
        5 => return 0x7ff0_0000_0000_0001 | r.below(1 << 20), // SNaN
        6 => return r.below(1 << 52),                         // denormal
        7 => (r.below(2000) as f64) - 1000.0,
        8 => (r.below(1 << 20) as f64) / 1024.0,
        9 => f64::MAX,
        _ => return r.next_u64(),
    };
    v.to_bits()
}

pub fn interesting_f32(r: &mut Rng) -> u32 {
    let v: f32 = match r.below(12) {
        0 => 0.0,
        1 => -0.0,
        2 => f32::INFINITY,
        3 => f32::NEG_INFINITY,
        4 => return 0x7fc0_0000 | r.below(1 << 12) as u32,
        5 => return 0x7f80_0001 | r.below(1 << 12) as u32,
        6 => return r.below(1 << 23) as u32,
        7 => (r.below(2000) as f32) - 1000.0,
        8 => (r.below(1 << 20) as f32) / 1024.0,
        9 => f32::MAX,
        _ => return r.next_u64() as u32,
    };
    v.to_bits()
}

/// What a family generates and how its cases are prepared.
pub struct Family {
    pub name: &'static str,
    /// Opcode byte strings (after prefixes/REX).
    pub opcodes: &'static [&'static [u8]],
    /// Mandatory/optional legacy prefixes to choose from (each entry is a full prefix string).
    pub prefixes: &'static [&'static [u8]],
    pub allow: fn(&Instruction) -> bool,
    /// Adjusts the random state after operand placement (e.g. sane RCX for REP).
    pub fixup: fn(&mut Rng, &Instruction, &mut NativeState, &mut [u8]),
    /// XMM values: float-heavy for FP families.
    pub float_xmm: bool,
    /// Faults the emulator may legitimately raise (others fail the test).
    pub allowed_faults: &'static [u8],
    /// Extra RFLAGS bits to ignore for this instruction (beyond iced's "undefined").
    pub extra_undefined: fn(&Instruction, &NativeState) -> u64,
}

pub fn no_fixup(_: &mut Rng, _: &Instruction, _: &mut NativeState, _: &mut [u8]) {}
pub fn no_extra(_: &Instruction, _: &NativeState) -> u64 {
    0
}

fn rflags_from_iced(b: u32) -> u64 {
    let mut f = 0;
    let map = [
        (RflagsBits::OF, flags::OF),
        (RflagsBits::SF, flags::SF),
        (RflagsBits::ZF, flags::ZF),
        (RflagsBits::AF, flags::AF),
        (RflagsBits::CF, flags::CF),
        (RflagsBits::PF, flags::PF),
        (RflagsBits::DF, flags::DF),
        (RflagsBits::IF, flags::IF),
        (RflagsBits::AC, flags::AC),
    ];
    for (i, r) in map {
        if b & i != 0 {
            f |= r;
        }
    }
    f
}

fn gpr_value(st: &NativeState, r: Register) -> u64 {
    let full = r.full_register();
    let idx = full as usize - Register::RAX as usize;
    let v = st.gpr[idx];
    match r.size() {
        1 if matches!(r, Register::AH | Register::CH | Register::DH | Register::BH) => {
            (v >> 8) & 0xff
        }
        1 => v & 0xff,
        2 => v & 0xffff,
        4 => v & 0xffff_ffff,
        _ => v,
    }
}

fn set_gpr64(st: &mut NativeState, r: Register, v: u64) {
    let idx = r.full_register() as usize - Register::RAX as usize;
    st.gpr[idx] = v;
}

/// Builds one random instruction of the family; None if the bytes don't fit the family.
fn gen_instruction(r: &mut Rng, fam: &Family) -> Option<(Vec<u8>, Instruction)> {
    let mut bytes = Vec::new();
    if !fam.prefixes.is_empty() {
        let pfx: &[u8] = r.pick::<&[u8]>(fam.prefixes);
        bytes.extend_from_slice(pfx);
    }
    if r.below(2) == 0 {
        bytes.push(0x40 | r.below(16) as u8);
    }
    let op: &[u8] = r.pick::<&[u8]>(fam.opcodes);
    bytes.extend_from_slice(op);
    for _ in 0..10 {
        bytes.push(r.next_u64() as u8);
    }
    let bits = if compat() { 32 } else { 64 };
    let mut d = Decoder::with_ip(bits, &bytes, CODE_VA, DecoderOptions::NONE);
    let ins = d.decode();
    if ins.is_invalid() || !(fam.allow)(&ins) {
        return None;
    }
    // Memory operands: base register only (we steer it into the scratch buffer), no
    // RIP-relative, no FS/GS (the host uses FS for TLS), 64-bit addressing.
    for i in 0..ins.op_count() {
        if ins.op_kind(i) == OpKind::Memory {
            let b = ins.memory_base();
            let wide = |r: Register| if compat() { r.is_gpr32() } else { r.is_gpr64() };
            if b == Register::None
                || b == Register::RIP
                || !wide(b)
                || b.full_register() == ins.memory_index().full_register()
            {
                return None;
            }
            if ins.memory_index() != Register::None
                && !wide(ins.memory_index())
                && ins.mnemonic() != Mnemonic::Xlatb
            {
                return None;
            }
        }
    }
    if matches!(ins.memory_segment(), Register::FS | Register::GS)
        && ins.op_kinds().any(|k| k == OpKind::Memory)
    {
        return None;
    }
    if ins.segment_prefix() == Register::FS || ins.segment_prefix() == Register::GS {
        return None;
    }
    bytes.truncate(ins.len());
    Some((bytes, ins))
}

struct Harness {
    cpu: Cpu,
    scratch_gpa: u64,
}

impl Harness {
    fn new() -> Harness {
        let mut ram = GuestRam::new();
        ram.add_owned(0, 0x20_0000).unwrap();
        ram.add_owned(SCRATCH_GPA, SCRATCH_LEN).unwrap();
        let mut pt = PageTableBuilder::new(&ram, 0x1000, 0x10_0000);
        assert!(pt.map(&ram, CODE_VA, CODE_VA, 1, PTE_U));
        for i in 0..(SCRATCH_LEN as u64 / 4096) {
            assert!(pt.map(
                &ram,
                scratch() + i * 4096,
                SCRATCH_GPA + i * 4096,
                1,
                PTE_U | PTE_W
            ));
        }
        let cpu = Cpu::new(ram);
        let mut h = Harness {
            cpu,
            scratch_gpa: SCRATCH_GPA,
        };
        let mut st = long_mode_state(pt.root, 0x11_0000, 0x12_0000, 3);
        if compat() {
            // Linux's __USER32_CS: a 32-bit code segment under long mode.
            let cs = &mut st.seg[x86emu::state::Seg::Cs as usize];
            cs.selector = 0x23;
            cs.attr = (cs.attr & !x86emu::Segment::ATTR_L) | x86emu::Segment::ATTR_DB;
        }
        h.cpu.set_state(st);
        h
    }
}

fn case_count() -> u64 {
    std::env::var("X86EMU_DIFF_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

fn base_seed() -> u64 {
    std::env::var("X86EMU_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}

/// Runs the family in compatibility mode (32-bit code under long mode).
pub fn run_family_compat(fam: &Family) {
    COMPAT.with(|c| c.set(true));
    run_family(fam);
    COMPAT.with(|c| c.set(false));
}

/// Runs the differential test for one family; panics with a reproducible report.
pub fn run_family(fam: &Family) {
    let seed = base_seed();
    let cases = if std::env::var_os("X86EMU_CASE_SEED").is_some() {
        1
    } else {
        case_count()
    };
    let mut h = Harness::new();
    let template = h.cpu.state().clone();
    let mut executed = 0u64;
    let mut faulted = 0u64;
    let mut attempts = 0u64;
    let mut r = Rng::new(seed ^ fxhash(fam.name));
    while executed + faulted < cases {
        attempts += 1;
        assert!(
            attempts < cases * 2000,
            "{}: generator too picky (seed {seed})",
            fam.name
        );
        let case_seed = match std::env::var("X86EMU_CASE_SEED") {
            // Replays exactly one failing case.
            Ok(v) => u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap_or(0),
            Err(_) => r.next_u64(),
        };
        let mut cr = Rng::new(case_seed);
        let Some((bytes, ins)) = gen_instruction(&mut cr, fam) else {
            continue;
        };
        // Random state.
        let mut st = NativeState::default();
        for g in st.gpr.iter_mut() {
            *g = cr.interesting();
        }
        st.gpr[4] = scratch() + 0x6000 - cr.below(0x100) * 8;
        st.rflags = 0x202 | (cr.next_u64() & flags::STATUS);
        for x in st.xmm.iter_mut() {
            *x = if fam.float_xmm {
                if cr.below(2) == 0 {
                    u128::from(interesting_f64(&mut cr))
                        | (u128::from(interesting_f64(&mut cr)) << 64)
                } else {
                    let mut v = 0u128;
                    for k in 0..4 {
                        v |= u128::from(interesting_f32(&mut cr)) << (32 * k);
                    }
                    v
                }
            } else {
                u128::from(cr.interesting()) | (u128::from(cr.interesting()) << 64)
            };
        }
        st.mxcsr = 0x1f80;
        let mut mem = vec![0u8; SCRATCH_LEN];
        for chunk in mem.chunks_mut(8) {
            let v = if fam.float_xmm {
                interesting_f64(&mut cr)
            } else {
                cr.interesting()
            };
            chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
        }
        // Steer the memory operand into the scratch buffer.
        if ins.op_kinds().any(|k| k == OpKind::Memory) {
            let mut target = scratch() + 0x1000 + cr.below(0x6000);
            if cr.below(4) != 0 {
                target &= !15;
            }
            let idx = ins.memory_index();
            let iv = if idx == Register::None {
                0
            } else {
                gpr_value(&st, idx)
            };
            let base = target
                .wrapping_sub(ins.memory_displacement64())
                .wrapping_sub(iv.wrapping_mul(u64::from(ins.memory_index_scale())));
            set_gpr64(&mut st, ins.memory_base(), base);
            // The index may be the same register class as something the fixup changes;
            // recompute if the base write changed the index value.
            if idx != Register::None && gpr_value(&st, idx) != iv {
                continue;
            }
        }
        (fam.fixup)(&mut cr, &ins, &mut st, &mut mem);
        if ins.op_kinds().any(|k| k == OpKind::Memory) {
            // The fixup may have moved the base/index: keep only cases that still hit scratch.
            let idx = ins.memory_index();
            let iv = if idx == Register::None {
                0
            } else {
                gpr_value(&st, idx)
            };
            let ea = gpr_value(&st, ins.memory_base())
                .wrapping_add(ins.memory_displacement64())
                .wrapping_add(iv.wrapping_mul(u64::from(ins.memory_index_scale())));
            let ea = if compat() { ea & 0xffff_ffff } else { ea };
            if ea < scratch() + 0x400 || ea > scratch() + SCRATCH_LEN as u64 - 0x400 {
                continue;
            }
        }

        // Emulate.
        let mut s = template.clone();
        s.gpr = st.gpr;
        s.rflags = st.rflags;
        s.rip = CODE_VA;
        s.fpu.xmm = st.xmm;
        s.fpu.mxcsr = st.mxcsr;
        h.cpu.set_state(s);
        assert!(h.cpu.ram().write(CODE_VA, &bytes));
        assert!(h.cpu.ram().write(h.scratch_gpa, &mem));
        let mut fault = None;
        for _ in 0..100_000 {
            if let Err(f) = h.cpu.execute_one(&mut NoDevices) {
                fault = Some(f);
                break;
            }
            if h.cpu.state().rip != CODE_VA {
                break;
            }
        }
        if let Some(f) = fault {
            assert!(
                fam.allowed_faults.contains(&f.vector),
                "{}: unexpected fault {f:?} on {ins} ({bytes:02x?}); X86EMU_SEED={seed}",
                fam.name
            );
            faulted += 1;
            continue;
        }
        let emu = h.cpu.state().clone();
        let mut emu_mem = vec![0u8; SCRATCH_LEN];
        assert!(h.cpu.ram().read(h.scratch_gpa, &mut emu_mem));

        // Native.
        let mut nmem = mem.clone();
        if std::env::var_os("X86EMU_TRACE").is_some() {
            eprintln!("native: {ins} {bytes:02x?} rsp={:#x}", st.gpr[4]);
        }
        let out = run_native(&bytes, &st, &mut nmem, compat());
        executed += 1;

        let undefined = rflags_from_iced(ins.rflags_undefined()) | (fam.extra_undefined)(&ins, &st);
        let fmask = (flags::STATUS | flags::DF) & !undefined;
        let mut errs = Vec::new();
        // Compatibility mode leaves the upper halves of GPRs undefined on the way back to
        // 64-bit mode: compare the low 32 bits there.
        let gmask = if compat() { 0xffff_ffff } else { u64::MAX };
        for i in 0..16 {
            if (out.gpr[i] ^ emu.gpr[i]) & gmask != 0 {
                errs.push(format!(
                    "gpr[{i}] native {:#x} emu {:#x} (in {:#x})",
                    out.gpr[i], emu.gpr[i], st.gpr[i]
                ));
            }
            if out.xmm[i] != emu.fpu.xmm[i] {
                errs.push(format!(
                    "xmm{i} native {:#034x} emu {:#034x} (in {:#034x})",
                    out.xmm[i], emu.fpu.xmm[i], st.xmm[i]
                ));
            }
        }
        if out.rflags & fmask != emu.rflags & fmask {
            errs.push(format!(
                "rflags native {:#x} emu {:#x} (in {:#x}, compared {:#x})",
                out.rflags & fmask,
                emu.rflags & fmask,
                st.rflags,
                fmask
            ));
        }
        if out.mxcsr != emu.fpu.mxcsr {
            errs.push(format!(
                "mxcsr native {:#x} emu {:#x} (in {:#x})",
                out.mxcsr, emu.fpu.mxcsr, st.mxcsr
            ));
            for k in 0..ins.op_count() {
                if ins.op_kind(k) == OpKind::Register && ins.op_register(k).is_xmm() {
                    let x = ins.op_register(k) as usize - Register::XMM0 as usize;
                    errs.push(format!("  input xmm{x} = {:#034x}", st.xmm[x]));
                }
            }
            if ins.op_kinds().any(|k| k == OpKind::Memory) {
                let idx = ins.memory_index();
                let iv = if idx == Register::None {
                    0
                } else {
                    gpr_value(&st, idx)
                };
                let ea = gpr_value(&st, ins.memory_base())
                    .wrapping_add(ins.memory_displacement64())
                    .wrapping_add(iv.wrapping_mul(u64::from(ins.memory_index_scale())));
                let o = (ea.wrapping_sub(scratch()) as usize).min(SCRATCH_LEN - 16);
                errs.push(format!("  input memory {:02x?}", &mem[o..o + 16]));
            }
        }
        if (out.fcw, out.fsw) != (emu.fpu.fcw, emu.fpu.fsw) {
            errs.push(format!(
                "x87 FCW/FSW native {:#x}/{:#x} emu {:#x}/{:#x}",
                out.fcw, out.fsw, emu.fpu.fcw, emu.fpu.fsw
            ));
        }
        if emu.rip != CODE_VA + bytes.len() as u64 {
            errs.push(format!("rip {:#x}", emu.rip));
        }
        if nmem != emu_mem {
            let i = (0..SCRATCH_LEN)
                .find(|&i| nmem[i] != emu_mem[i])
                .unwrap_or(0);
            errs.push(format!(
                "memory at {:#x}: native {:02x?} emu {:02x?}",
                scratch() + i as u64,
                &nmem[i..(i + 16).min(SCRATCH_LEN)],
                &emu_mem[i..(i + 16).min(SCRATCH_LEN)]
            ));
        }
        assert!(
            errs.is_empty(),
            "{}: mismatch on `{ins}` ({bytes:02x?}), case seed {case_seed:#x}, X86EMU_SEED={seed}\n  {}",
            fam.name,
            errs.join("\n  ")
        );
    }
    let _ = Seg::Cs;
    eprintln!(
        "{}: {executed} cases compared, {faulted} faulted in the emulator (seed {seed})",
        fam.name
    );
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

mod families;
