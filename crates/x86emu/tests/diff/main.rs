//! Differential tests: random instructions from random states, run on the host CPU and in
//! x86emu, must leave identical registers, defined flags, XMM and YMM state, MXCSR, x87
//! state (FCW, FSW, abridged FTW, ST0-7; not FIP/FDP/FOP, which are host addresses) and
//! memory, and raise the same exception. Families in `families` (integer, SSE, SSE2,
//! x87 control) and `isa` (x87, MMX, SSE3-4.2, AES/PCLMULQDQ/SHA, AVX, AVX2, FMA, F16C,
//! BMI, ADX, MOVBE, LZCNT/TZCNT, POPCNT, CRC32, x87 environment, XSAVE), most in 64-bit
//! and in compatibility mode.
//!
//! `X86EMU_DIFF_CASES=N` sets cases per family (default 3000, a few seconds for the
//! whole target in a debug build), `X86EMU_SEED=S` reproduces a run and
//! `X86EMU_CASE_SEED=X` (with a test name filter) one case; a failure prints both seeds,
//! the instruction and a diff. `X86EMU_DIFF_STATS=1` prints how often each mnemonic ran.

mod native;

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register, RflagsBits};
use native::{run_native, NativeState, SCRATCH, SCRATCH32, SCRATCH_LEN};
use x86emu::exceptions::vector;
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
    /// XMM/YMM values: float-heavy for FP families.
    pub xmm: Vals,
    /// Random x87 state (registers, TOP, tags, control and status words) instead of
    /// FNINIT's.
    pub x87: bool,
    /// Random MXCSR (rounding, FTZ, masks, sticky flags) instead of 0x1f80.
    pub mxcsr: bool,
    /// How instructions are encoded.
    pub enc: Enc,
    /// Faults the emulator may legitimately raise (others fail the test).
    pub allowed_faults: &'static [u8],
    /// Extra RFLAGS bits to ignore for this instruction (beyond iced's "undefined").
    pub extra_undefined: fn(&Instruction, &NativeState) -> u64,
    /// Byte ranges, relative to the memory operand, whose stored contents depend on the
    /// host (x87 instruction and data pointers, MXCSR_MASK) and are not compared.
    pub mem_ignore: fn(&Instruction) -> &'static [(usize, usize)],
}

/// What vector registers hold.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Vals {
    Int,
    Float,
    /// Integer or float patterns, chosen per case.
    Mixed,
}

/// Instruction encoding a family generates.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Enc {
    /// Legacy prefix (from `prefixes`), optional REX, then the opcode bytes.
    Legacy,
    /// A VEX prefix (two or three bytes, random R/X/B, W, vvvv, L and pp) for the map
    /// given by the opcode entry's first byte (1: 0F, 2: 0F 38, 3: 0F 3A), then the
    /// entry's second byte as the opcode.
    Vex,
}

/// Fields most families share; families override what they need.
pub const BASE: Family = Family {
    name: "",
    opcodes: &[],
    prefixes: &[],
    allow: |_| false,
    fixup: no_fixup,
    xmm: Vals::Int,
    x87: false,
    mxcsr: false,
    enc: Enc::Legacy,
    allowed_faults: &[],
    extra_undefined: no_extra,
    mem_ignore: |_| &[],
};

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
    let op: &[u8] = r.pick::<&[u8]>(fam.opcodes);
    match fam.enc {
        Enc::Legacy => {
            if !fam.prefixes.is_empty() {
                let pfx: &[u8] = r.pick::<&[u8]>(fam.prefixes);
                bytes.extend_from_slice(pfx);
            }
            if r.below(2) == 0 {
                bytes.push(0x40 | r.below(16) as u8);
            }
            bytes.extend_from_slice(op);
        }
        Enc::Vex => {
            // Inverted R, X, B and vvvv as the encoding stores them; outside 64-bit mode
            // R and X must be 1 (else it is LES/LDS) and so is vvvv's top bit.
            let (map, opc) = (op[0], op[1]);
            let ext = if compat() { 0 } else { r.below(8) as u8 };
            let (nr, nx, nb) = (!ext & 1, !ext >> 1 & 1, !ext >> 2 & 1);
            let vvvv = r.below(16) as u8 & if compat() { 7 } else { 15 };
            let nv = !vvvv & 15;
            let w = r.below(2) as u8;
            let l = r.below(2) as u8;
            let pp = r.below(4) as u8;
            if map == 1 && w == 0 && nx == 1 && nb == 1 && r.below(2) == 0 {
                bytes.extend_from_slice(&[0xc5, nr << 7 | nv << 3 | l << 2 | pp]);
            } else {
                bytes.extend_from_slice(&[
                    0xc4,
                    nr << 7 | nx << 6 | nb << 5 | map,
                    w << 7 | nv << 3 | l << 2 | pp,
                ]);
            }
            bytes.push(opc);
        }
    }
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
            // (A gather's VSIB index is a vector register: its fixup keeps the elements
            // small so every element's address stays near the steered base.)
            if ins.memory_index() != Register::None
                && !wide(ins.memory_index())
                && ins.mnemonic() != Mnemonic::Xlatb
                && !ins.is_vsib()
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
    // VEX.W1 VPEXTRD/VPINSRD outside 64-bit mode: Intel documents W as ignored there (as
    // iced and x86emu decode it), AMD raises #UD.
    if compat()
        && bytes[0] == 0xc4
        && bytes[2] & 0x80 != 0
        && matches!(ins.mnemonic(), Mnemonic::Vpextrd | Mnemonic::Vpinsrd)
    {
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
        // As Linux runs user code: XSAVE enabled for x87, SSE and AVX state.
        st.cr4 |= x86emu::state::cr::CR4_OSXSAVE;
        st.xcr0 = 7;
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

/// Effective address of the instruction's memory operand from `st` (in the current mode).
/// (For a gather, base plus displacement: the elements' addresses are near it.)
pub fn mem_ea(st: &NativeState, ins: &Instruction) -> u64 {
    let idx = if ins.is_vsib() {
        Register::None
    } else {
        ins.memory_index()
    };
    let iv = if idx == Register::None {
        0
    } else {
        gpr_value(st, idx)
    };
    let ea = gpr_value(st, ins.memory_base())
        .wrapping_add(ins.memory_displacement64())
        .wrapping_add(iv.wrapping_mul(u64::from(ins.memory_index_scale())));
    if compat() {
        ea & 0xffff_ffff
    } else {
        ea
    }
}

/// The scratch offset of the memory operand, if it has one inside the buffer.
pub fn mem_offset(st: &NativeState, ins: &Instruction, len: usize) -> Option<usize> {
    if !ins.op_kinds().any(|k| k == OpKind::Memory) {
        return None;
    }
    mem_ea(st, ins)
        .checked_sub(scratch())
        .map(|o| o as usize)
        .filter(|&o| o + len <= SCRATCH_LEN)
}

/// A random state for `fam`'s instruction `ins` (before operand steering).
fn random_state(cr: &mut Rng, fam: &Family) -> NativeState {
    let mut st = NativeState::default();
    for g in st.gpr.iter_mut() {
        *g = cr.interesting();
    }
    st.gpr[4] = scratch() + 0x6000 - cr.below(0x100) * 8;
    st.rflags = 0x202 | (cr.next_u64() & flags::STATUS);
    let float = match fam.xmm {
        Vals::Int => false,
        Vals::Float => true,
        Vals::Mixed => cr.below(2) == 0,
    };
    let vec = |cr: &mut Rng| {
        if float {
            if cr.below(2) == 0 {
                u128::from(interesting_f64(cr)) | (u128::from(interesting_f64(cr)) << 64)
            } else {
                let mut v = 0u128;
                for k in 0..4 {
                    v |= u128::from(interesting_f32(cr)) << (32 * k);
                }
                v
            }
        } else {
            u128::from(cr.interesting()) | (u128::from(cr.interesting()) << 64)
        }
    };
    for i in 0..16 {
        st.xmm[i] = vec(cr);
        st.ymm_hi[i] = vec(cr);
    }
    if fam.mxcsr {
        st.mxcsr = random_mxcsr(cr);
    }
    if fam.x87 {
        random_x87(cr, &mut st);
    }
    st
}

/// MXCSR with a random rounding mode and FTZ, mostly every exception masked (the native
/// run traps on an unmasked one, like the guest would), sometimes sticky flags set. DAZ
/// stays clear: x86emu's MXCSR_MASK does not offer it.
pub fn random_mxcsr(r: &mut Rng) -> u32 {
    let masks = if r.below(6) != 0 {
        0x3f
    } else {
        r.below(64) as u32
    };
    let sticky = if r.below(4) == 0 {
        r.below(64) as u32
    } else {
        0
    };
    (masks << 7) | sticky | ((r.below(4) as u32) << 13) | if r.below(4) == 0 { 1 << 15 } else { 0 }
}

/// 80-bit values: normals around 1 and at the extremes, integers, values a double holds
/// exactly, zeros, infinities, NaNs, denormals, and now and then the encodings the 387
/// and later no longer support (pseudo-denormals, unnormals, pseudo-NaNs and -infinities).
pub fn interesting_f80(r: &mut Rng) -> u128 {
    let sign = u128::from(r.below(2) as u8) << 79;
    let (exp, mant): (u64, u64) = match r.below(24) {
        0 => (0, 0),
        1 => (0x7fff, 1 << 63),
        2 => (
            0x7fff,
            0xc000_0000_0000_0000 | (r.next_u64() >> 2 & r.interesting()),
        ),
        3 => (0x7fff, 0x8000_0000_0000_0000 | (1 + (r.next_u64() >> 3))),
        4 => (0, (r.next_u64() >> 1 >> r.below(63)) | 1),
        5 => match r.below(4) {
            0 => (0, (1 << 63) | r.next_u64()),
            1 => (1 + r.below(0x7ffe), r.next_u64() >> 1),
            _ => (0x7fff, r.next_u64() >> 1),
        },
        6 | 7 => {
            let v = r.below(4000) as i64 - 2000;
            return sign | int_to_f80(v.unsigned_abs());
        }
        8 => {
            return sign | int_to_f80(r.interesting() >> r.below(64));
        }
        9 | 10 => return f64_to_f80(interesting_f64(r)),
        11 => (
            if r.below(2) == 0 {
                1 + r.below(16)
            } else {
                0x7ffe - r.below(16)
            },
            (1 << 63) | r.next_u64(),
        ),
        12 => {
            // Halfway cases and near-integers for rounding.
            let v = (r.below(64) << 1) | 1;
            let i = int_to_f80(v);
            let (e, m) = ((i >> 64) as u64, i as u64);
            return sign | (u128::from(e - 1) << 64) | u128::from(m ^ r.below(2));
        }
        _ => {
            let e = 0x3fff + r.below(160) - 80;
            let mut m = (1 << 63) | r.next_u64();
            if r.below(3) == 0 {
                m &= !((1u64 << r.below(60)) - 1);
            }
            (e, m)
        }
    };
    sign | (u128::from(exp & 0x7fff) << 64) | u128::from(mant)
}

fn int_to_f80(v: u64) -> u128 {
    if v == 0 {
        return 0;
    }
    let lz = v.leading_zeros();
    (u128::from(0x3fff + 63 - lz) << 64) | u128::from(v << lz)
}

fn f64_to_f80(b: u64) -> u128 {
    let sign = u128::from(b >> 63) << 79;
    let e = (b >> 52) & 0x7ff;
    let f = b & ((1 << 52) - 1);
    sign | match e {
        0 if f == 0 => 0,
        0 => {
            let lz = f.leading_zeros();
            (u128::from(0x3fff - 1022 - (lz - 11) as u64) << 64) | u128::from(f << lz)
        }
        0x7ff => (0x7fffu128 << 64) | u128::from((1 << 63) | (f << 11)),
        _ => (u128::from(e + 0x3fff - 1023) << 64) | u128::from((1 << 63) | (f << 11)),
    }
}

/// A random x87 unit: registers, TOP, a stack of random depth (sometimes random tags),
/// precision and rounding control, condition codes, and mostly masked exceptions. Now and
/// then an unmasked exception is pending (FSW.ES): waiting instructions must raise #MF.
pub fn random_x87(r: &mut Rng, st: &mut NativeState) {
    for v in st.st.iter_mut() {
        *v = interesting_f80(r);
    }
    let pc = *r.pick(&[3u16, 3, 3, 2, 2, 0, 1]);
    let masks = if r.below(4) != 0 {
        0x3f
    } else {
        r.below(64) as u16
    };
    let ic = if r.below(8) == 0 { 1 << 12 } else { 0 };
    st.fcw = 0x40 | masks | (pc << 8) | ((r.below(4) as u16) << 10) | ic;
    let top = r.below(8) as u16;
    let depth = *r.pick(&[0u16, 1, 2, 2, 3, 3, 4, 5, 6, 7, 8, 8]);
    st.ftw = if r.below(6) == 0 {
        r.below(256) as u8
    } else {
        (0..depth).fold(0u8, |t, i| t | 1 << ((top + i) & 7))
    };
    let cc = r.below(16) as u16;
    let mut fsw = (top << 11)
        | ((cc & 7) << 8)
        | ((cc >> 3) << 14)
        | if r.below(4) == 0 {
            r.below(64) as u16 & masks
        } else {
            0
        };
    if r.below(8) == 0 {
        fsw |= 0x40;
    }
    if r.below(24) == 0 && masks != 0x3f {
        // A pending unmasked exception.
        fsw |= !masks & 0x3f & (r.below(64) as u16 | 1 << (!masks & 0x3f).trailing_zeros());
    }
    if fsw & !masks & 0x3f != 0 {
        fsw |= 0x8080;
    }
    st.fsw = fsw;
}

/// Moves the memory operand down to an `align`-byte boundary (by its base register).
pub fn align_mem(st: &mut NativeState, ins: &Instruction, align: u64) {
    if !ins.op_kinds().any(|k| k == OpKind::Memory) {
        return;
    }
    let off = mem_ea(st, ins) % align;
    let b = ins.memory_base();
    let v = gpr_value(st, b).wrapping_sub(off);
    set_gpr64(st, b, v);
}

/// Whether the host is an Intel CPU (whose documented behaviour x86emu follows where AMD
/// differs).
pub fn host_intel() -> bool {
    let r = std::arch::x86_64::__cpuid(0);
    (r.ebx, r.edx, r.ecx) == (0x756e_6547, 0x4965_6e69, 0x6c65_746e)
}

/// Fills the memory operand with values of its type (floats, integers, BCD).
pub fn typed_memory(r: &mut Rng, ins: &Instruction, st: &NativeState, mem: &mut [u8]) {
    use iced_x86::MemorySize as S;
    let size = ins.memory_size();
    let Some(o) = mem_offset(st, ins, size.size().max(1)) else {
        return;
    };
    let small = |r: &mut Rng, bits: u32| -> u64 {
        match r.below(4) {
            0 => r.interesting(),
            1 => (r.below(1 << 12) as i64 - (1 << 11)) as u64,
            _ => {
                let v = r.next_u64() >> (64 - bits + r.below(u64::from(bits)) as u32);
                if r.below(2) == 0 {
                    v.wrapping_neg()
                } else {
                    v
                }
            }
        }
    };
    match size {
        S::Float32 => mem[o..o + 4].copy_from_slice(&interesting_f32(r).to_le_bytes()),
        S::Float64 => mem[o..o + 8].copy_from_slice(&interesting_f64(r).to_le_bytes()),
        S::Float80 => mem[o..o + 10].copy_from_slice(&interesting_f80(r).to_le_bytes()[..10]),
        S::Int16 => mem[o..o + 2].copy_from_slice(&small(r, 16).to_le_bytes()[..2]),
        S::Int32 => mem[o..o + 4].copy_from_slice(&small(r, 32).to_le_bytes()[..4]),
        S::Int64 => mem[o..o + 8].copy_from_slice(&small(r, 64).to_le_bytes()),
        S::Bcd => {
            // Valid packed BCD (FBLD of invalid digits is undefined).
            let digits = r.below(19);
            for k in 0..9 {
                let lo = if 2 * k < digits { r.below(10) } else { 0 };
                let hi = if 2 * k + 1 < digits { r.below(10) } else { 0 };
                mem[o + k as usize] = (lo | hi << 4) as u8;
            }
            mem[o + 9] = if r.below(2) == 0 { 0 } else { 0x80 };
        }
        _ => {}
    }
}

/// Runs the differential test for one family; panics with a reproducible report.
///
/// Exceptions: the native run uses the case's own FCW and MXCSR. An instruction that
/// raises an unmasked SIMD exception traps on the host (#XM); one that finds an unmasked
/// x87 exception pending (FSW.ES from the random state) traps with #MF; both are caught
/// (see `native`) and must match the emulator's fault, with the state the fault leaves
/// (MXCSR flags included) compared as usual. An unmasked x87 exception that the
/// instruction itself raises does not trap on the host until the next waiting instruction
/// (the trampoline runs none: FXSAVE does not wait), so it is compared as a completed
/// instruction: FSW with ES and B set, and the destination as the host left it. Other
/// faults the emulator raises (alignment #GP, #DE) must be among the family's
/// `allowed_faults` and be raised by the host too.
pub fn run_family(fam: &Family) {
    let seed = base_seed();
    let cases = if std::env::var_os("X86EMU_CASE_SEED").is_some() {
        1
    } else {
        case_count()
    };
    if fam.enc == Enc::Vex && !native::host_avx() {
        eprintln!("{}: skipped, the host has no AVX", fam.name);
        return;
    }
    let mut h = Harness::new();
    let template = h.cpu.state().clone();
    let mut executed = 0u64;
    let mut faulted = 0u64;
    let mut attempts = 0u64;
    let mut r = Rng::new(seed ^ fxhash(fam.name));
    // X86EMU_DIFF_STATS: how often each mnemonic ran (and faulted), printed at the end.
    let stats = std::env::var_os("X86EMU_DIFF_STATS").is_some();
    let mut seen: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
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
        let mut st = random_state(&mut cr, fam);
        let mut mem = vec![0u8; SCRATCH_LEN];
        for chunk in mem.chunks_mut(8) {
            let v = if fam.xmm == Vals::Float {
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
            if cr.below(4) == 0 {
                target &= !63;
            }
            let idx = if ins.is_vsib() {
                Register::None
            } else {
                ins.memory_index()
            };
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
            let ea = mem_ea(&st, &ins);
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
        s.fpu.ymm_hi = st.ymm_hi;
        s.fpu.mxcsr = st.mxcsr;
        s.fpu.fcw = st.fcw;
        s.fpu.fsw = st.fsw;
        s.fpu.ftw = st.ftw;
        s.fpu.st = st.st;
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
                fam.allowed_faults.contains(&f.vector)
                    || f.vector == vector::MF
                    || f.vector == vector::XM,
                "{}: unexpected fault {f:?} on {ins} ({bytes:02x?}), case seed {case_seed:#x}, X86EMU_SEED={seed}",
                fam.name
            );
        }
        let emu = h.cpu.state().clone();
        let mut emu_mem = vec![0u8; SCRATCH_LEN];
        assert!(h.cpu.ram().read(h.scratch_gpa, &mut emu_mem));

        // Native: also when the emulator faulted, which the host must do too.
        let mut nmem = mem.clone();
        if std::env::var_os("X86EMU_TRACE").is_some() {
            eprintln!("native: {ins} {bytes:02x?} rsp={:#x}", st.gpr[4]);
        }
        let (out, trap) = run_native(&bytes, &st, &mut nmem, compat());
        if fault.is_some() {
            faulted += 1;
        } else {
            executed += 1;
        }
        if stats {
            let e = seen.entry(format!("{:?}", ins.mnemonic())).or_default();
            e.0 += 1;
            e.1 += u64::from(fault.is_some());
        }

        let undefined = rflags_from_iced(ins.rflags_undefined()) | (fam.extra_undefined)(&ins, &st);
        let fmask = (flags::STATUS | flags::DF) & !undefined;
        let mut errs = Vec::new();
        if fault.map(|f| f.vector) != trap {
            errs.push(format!(
                "exception: native {trap:?} emu {:?}",
                fault.map(|f| f.vector)
            ));
        }
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
            if out.ymm_hi[i] != emu.fpu.ymm_hi[i] {
                errs.push(format!(
                    "ymm{i}[255:128] native {:#034x} emu {:#034x} (in {:#034x})",
                    out.ymm_hi[i], emu.fpu.ymm_hi[i], st.ymm_hi[i]
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
        // After #XM for an unmasked overflow or underflow, whether PE is also set differs
        // by instruction on the host (AMD: MULPS sets it, ADDPS and the FMAs do not);
        // x86emu reports PE when the result would be inexact.
        let post_xm = trap == Some(vector::XM)
            && fault.map(|f| f.vector) == trap
            && (out.mxcsr | emu.fpu.mxcsr) & !(st.mxcsr >> 7) & 0x18 != 0;
        // DPPS/DPPD compute in steps (products, then sums), and the host stops at the
        // first step that raises an unmasked exception, with that step's flags. x86emu
        // sees the flags of all steps together and only tells the operands' exceptions
        // from the rest; which flags such a #XM leaves is not compared.
        let staged_xm = trap == Some(vector::XM)
            && fault.map(|f| f.vector) == trap
            && matches!(
                ins.mnemonic(),
                Mnemonic::Dpps | Mnemonic::Dppd | Mnemonic::Vdpps | Mnemonic::Vdppd
            );
        let mx_diff = out.mxcsr ^ emu.fpu.mxcsr;
        let mx_diff = if staged_xm { mx_diff & !0x3f } else { mx_diff };
        if mx_diff != 0 && !(post_xm && mx_diff == 0x20) {
            errs.push(format!(
                "mxcsr native {:#x} emu {:#x} (in {:#x})",
                out.mxcsr, emu.fpu.mxcsr, st.mxcsr
            ));
        }
        if (out.fcw, out.fsw, out.ftw) != (emu.fpu.fcw, emu.fpu.fsw, emu.fpu.ftw) {
            errs.push(format!(
                "x87 FCW/FSW/FTW native {:#x}/{:#x}/{:#x} emu {:#x}/{:#x}/{:#x} (in {:#x}/{:#x}/{:#x})",
                out.fcw, out.fsw, out.ftw, emu.fpu.fcw, emu.fpu.fsw, emu.fpu.ftw, st.fcw, st.fsw, st.ftw
            ));
        }
        for i in 0..8 {
            if out.st[i] != emu.fpu.st[i] & ((1 << 80) - 1) {
                errs.push(format!(
                    "st{i} native {:#022x} emu {:#022x} (in {:#022x})",
                    out.st[i], emu.fpu.st[i], st.st[i]
                ));
            }
        }
        let want_rip = if fault.is_some() {
            CODE_VA
        } else {
            CODE_VA + bytes.len() as u64
        };
        if emu.rip != want_rip {
            errs.push(format!("rip {:#x}", emu.rip));
        }
        if let Some(o) = mem_offset(&st, &ins, 1) {
            for &(a, b) in (fam.mem_ignore)(&ins) {
                let (a, b) = ((o + a).min(SCRATCH_LEN), (o + b).min(SCRATCH_LEN));
                nmem[a..b].copy_from_slice(&emu_mem[a..b]);
            }
        }
        if nmem != emu_mem {
            let i = (0..SCRATCH_LEN)
                .find(|&i| nmem[i] != emu_mem[i])
                .unwrap_or(0);
            let rel = mem_offset(&st, &ins, 1)
                .map(|o| format!(" (operand{:+})", i as i64 - o as i64))
                .unwrap_or_default();
            errs.push(format!(
                "memory at {:#x}{rel}: native {:02x?} emu {:02x?}",
                scratch() + i as u64,
                &nmem[i..(i + 16).min(SCRATCH_LEN)],
                &emu_mem[i..(i + 16).min(SCRATCH_LEN)]
            ));
        }
        if !errs.is_empty() {
            // The inputs the instruction reads, to make the report self-contained.
            for k in 0..ins.op_count() {
                if ins.op_kind(k) == OpKind::Register {
                    let reg = ins.op_register(k);
                    if reg.is_xmm() || reg.is_ymm() {
                        let x = reg.number();
                        errs.push(format!(
                            "  input {reg:?} = {:#034x}:{:#034x}",
                            st.ymm_hi[x], st.xmm[x]
                        ));
                    }
                }
            }
            if fam.x87 {
                errs.push(format!(
                    "  input x87 FCW/FSW/FTW {:#x}/{:#x}/{:#x}, ST0-7 {:#022x?}",
                    st.fcw, st.fsw, st.ftw, st.st
                ));
            }
            if format!("{:?}", ins.mnemonic()).starts_with('X') {
                errs.push(format!(
                    "  input RAX/RDX {:#x}/{:#x}, XSAVE header {:02x?}",
                    st.gpr[0],
                    st.gpr[2],
                    mem_offset(&st, &ins, 576).map(|o| &mem[o + 512..o + 576])
                ));
            }
            if let Some(o) = mem_offset(&st, &ins, 32) {
                errs.push(format!(
                    "  input memory at {:#x}: {:02x?}",
                    scratch() + o as u64,
                    &mem[o..o + 32]
                ));
            }
        }
        assert!(
            errs.is_empty(),
            "{}: mismatch on `{ins}` ({bytes:02x?}), case seed {case_seed:#x}, X86EMU_SEED={seed}\n  {}",
            fam.name,
            errs.join("\n  ")
        );
    }
    let _ = Seg::Cs;
    if stats {
        let list: Vec<String> = seen
            .iter()
            .map(|(m, (n, f))| format!("{m} {n}/{f}"))
            .collect();
        eprintln!(
            "{} ({} mnemonics, runs/faults): {}",
            fam.name,
            seen.len(),
            list.join(", ")
        );
    }
    eprintln!(
        "{}: {executed} cases compared, {faulted} faulted (seed {seed})",
        fam.name
    );
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

mod families;
mod isa;
