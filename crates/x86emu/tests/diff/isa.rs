//! Families beyond SSE2, which x86emu runs through `exec::hostexec` (or, for the x87
//! control instructions, LZCNT and TZCNT, its interpreter): x87, MMX, SSE3, SSSE3, SSE4.1,
//! SSE4.2, AES-NI/PCLMULQDQ/SHA, AVX, AVX2, FMA3, F16C, BMI1/BMI2, ADX, MOVBE, LZCNT,
//! TZCNT, POPCNT and CRC32; each in 64-bit and in compatibility mode.
//!
//! Everything is compared bit for bit, the x87 transcendental instructions included: the
//! emulator runs them on the same host CPU, so no error bound applies.

use super::*;
use iced_x86::{CpuidFeature as F, EncodingKind, Mnemonic as M};

/// Opcode strings: `prefix` followed by each byte of `ops`.
fn ops(prefix: &[u8], ops: impl IntoIterator<Item = u8>) -> Vec<&'static [u8]> {
    ops.into_iter()
        .map(|b| {
            let mut v = prefix.to_vec();
            v.push(b);
            &*Box::leak(v.into_boxed_slice())
        })
        .collect()
}

fn leak(v: Vec<&'static [u8]>) -> &'static [&'static [u8]] {
    Box::leak(v.into_boxed_slice())
}

/// Whether the instruction needs some of `any` and nothing outside `all`.
fn features(i: &Instruction, any: &[F], all: &[F]) -> bool {
    let f = i.cpuid_features();
    f.iter().any(|x| any.contains(x)) && f.iter().all(|x| all.contains(x) || any.contains(x))
}

fn has_mm(i: &Instruction) -> bool {
    (0..i.op_count()).any(|k| i.op_kind(k) == OpKind::Register && i.op_register(k).is_mm())
}

// ---- x87 ----

/// x87 instructions that store FIP/FDP/FOP (host-dependent) are left to `x87_env`.
fn x87_allow(i: &Instruction) -> bool {
    let f = i.cpuid_features();
    let x87 = f
        .iter()
        .any(|x| matches!(x, F::FPU | F::FPU287 | F::FPU387))
        || i.mnemonic() == M::Fisttp;
    x87 && !matches!(
        i.mnemonic(),
        M::Fnstenv
            | M::Fstenv
            | M::Fnsave
            | M::Fsave
            | M::Fldenv
            | M::Frstor
            // 8087/287 leftovers: no-ops on the 387 and later (x86emu: #UD, see hostexec).
            | M::Fneni
            | M::Fndisi
            | M::Fnsetpm
            | M::Frstpm
    )
}

fn x87_fixup(r: &mut Rng, i: &Instruction, st: &mut NativeState, mem: &mut [u8]) {
    typed_memory(r, i, st, mem);
}

fn fam_x87() -> Family {
    // Every escape byte with a random ModRM, and as often the register-only D9 E0-FF
    // group (FCHS, FABS, FTST, FXAM, the constants, F2XM1, FYL2X, FPTAN, FPATAN, FXTRACT,
    // FPREM1, FDECSTP, FINCSTP, FPREM, FYL2XP1, FSQRT, FSINCOS, FRNDINT, FSCALE, FSIN,
    // FCOS), which a random ModRM rarely reaches.
    let mut o = Vec::new();
    for _ in 0..4 {
        o.extend(ops(b"", 0xd8..=0xdf));
    }
    o.extend(ops(b"\xd9", 0xe0..=0xff));
    Family {
        name: "x87",
        opcodes: leak(o),
        prefixes: &[b"", b"", b"", b"\x66"],
        allow: x87_allow,
        fixup: x87_fixup,
        xmm: Vals::Float,
        x87: true,
        ..BASE
    }
}

#[test]
fn diff_x87() {
    run_family(&fam_x87());
}

#[test]
fn diff_compat_x87() {
    run_family_compat(&fam_x87());
}

// ---- MMX ----

fn fam_mmx() -> Family {
    let mut o = ops(b"\x0f", (0x60..=0x7f).chain(0xd0..=0xff));
    o.extend(ops(b"\x0f", [0x2a, 0x2c, 0x2d, 0xc4, 0xc5, 0x77, 0x77]));
    Family {
        name: "mmx",
        opcodes: leak(o),
        // 66 with 0F 2A/2C/2D: the SSE2 conversions to and from MMX; F2/F3 0F D6:
        // MOVDQ2Q/MOVQ2DQ.
        prefixes: &[b"", b"", b"", b"", b"\x66", b"\xf2", b"\xf3"],
        allow: |i| {
            (has_mm(i) || i.mnemonic() == M::Emms)
                // MASKMOVQ writes through an implicit RDI (hostexec refuses it).
                && i.mnemonic() != M::Maskmovq
        },
        fixup: no_fixup,
        xmm: Vals::Mixed,
        x87: true,
        mxcsr: true,
        allowed_faults: &[vector::GP],
        ..BASE
    }
}

#[test]
fn diff_mmx() {
    run_family(&fam_mmx());
}

#[test]
fn diff_compat_mmx() {
    run_family_compat(&fam_mmx());
}

// ---- SSE3, SSSE3, SSE4.1, SSE4.2 ----

fn fam_sse3() -> Family {
    Family {
        name: "sse3",
        opcodes: leak(ops(b"\x0f", [0xf0, 0x7c, 0x7d, 0xd0, 0x12, 0x16])),
        prefixes: &[b"\x66", b"\xf2", b"\xf3"],
        allow: |i| features(i, &[F::SSE3], &[]) && !matches!(i.mnemonic(), M::Monitor | M::Mwait),
        xmm: Vals::Float,
        mxcsr: true,
        allowed_faults: &[vector::GP],
        ..BASE
    }
}

#[test]
fn diff_sse3() {
    run_family(&fam_sse3());
}

#[test]
fn diff_compat_sse3() {
    run_family_compat(&fam_sse3());
}

fn fam_ssse3() -> Family {
    let mut o = ops(b"\x0f\x38", (0x00..=0x0b).chain(0x1c..=0x1e));
    o.extend(ops(b"\x0f\x3a", [0x0f, 0x0f]));
    Family {
        name: "ssse3",
        opcodes: leak(o),
        prefixes: &[b"", b"\x66"],
        allow: |i| features(i, &[F::SSSE3], &[]),
        // The MMX forms alias the x87 registers.
        x87: true,
        allowed_faults: &[vector::GP],
        ..BASE
    }
}

#[test]
fn diff_ssse3() {
    run_family(&fam_ssse3());
}

#[test]
fn diff_compat_ssse3() {
    run_family_compat(&fam_ssse3());
}

fn fam_sse41() -> Family {
    let mut o = ops(
        b"\x0f\x38",
        [0x10, 0x14, 0x15, 0x17]
            .into_iter()
            .chain(0x20..=0x25)
            .chain(0x28..=0x2b)
            .chain(0x30..=0x35)
            .chain(0x38..=0x41),
    );
    o.extend(ops(
        b"\x0f\x3a",
        (0x08..=0x0e)
            .chain(0x14..=0x17)
            .chain(0x20..=0x22)
            .chain(0x40..=0x42),
    ));
    Family {
        name: "sse41",
        opcodes: leak(o),
        prefixes: &[b"\x66"],
        allow: |i| features(i, &[F::SSE4_1], &[]),
        xmm: Vals::Mixed,
        mxcsr: true,
        allowed_faults: &[vector::GP],
        ..BASE
    }
}

#[test]
fn diff_sse41() {
    run_family(&fam_sse41());
}

#[test]
fn diff_compat_sse41() {
    run_family_compat(&fam_sse41());
}

/// String instructions compare more interestingly on a small alphabet with NULs.
fn strings(r: &mut Rng, i: &Instruction, st: &mut NativeState, mem: &mut [u8]) {
    if !matches!(
        i.mnemonic(),
        M::Pcmpestri
            | M::Pcmpestri64
            | M::Pcmpestrm
            | M::Pcmpestrm64
            | M::Pcmpistri
            | M::Pcmpistrm
            | M::Vpcmpestri
            | M::Vpcmpestri64
            | M::Vpcmpestrm
            | M::Vpcmpestrm64
            | M::Vpcmpistri
            | M::Vpcmpistrm
    ) {
        return;
    }
    let alphabet = [0u8, b'a', b'b', b'c', b'a', b'b', b'z', 0xff];
    let pick = |r: &mut Rng| -> u128 {
        let mut v = 0u128;
        for k in 0..16 {
            let b = if r.below(3) == 0 {
                r.next_u64() as u8
            } else {
                alphabet[r.below(8) as usize]
            };
            v |= u128::from(b) << (8 * k);
        }
        v
    };
    if r.below(3) != 0 {
        for x in st.xmm.iter_mut() {
            *x = pick(r);
        }
        if let Some(o) = mem_offset(st, i, 16) {
            mem[o..o + 16].copy_from_slice(&pick(r).to_le_bytes());
        }
    }
    if r.below(3) != 0 {
        // Explicit lengths around the element count, of either sign.
        for g in [0, 2] {
            st.gpr[g] = (r.below(40) as i64 - 20) as u64;
        }
    }
}

fn fam_sse42() -> Family {
    let mut o = ops(b"\x0f\x3a", 0x60..=0x63);
    o.extend(ops(b"\x0f\x38", [0x37, 0xf0, 0xf1]));
    o.extend(ops(b"\x0f", [0xb8]));
    Family {
        name: "sse42",
        opcodes: leak(o),
        prefixes: &[b"\x66", b"\x66", b"\xf2", b"\xf3", b"\x66\xf2", b"\x66\xf3"],
        allow: |i| features(i, &[F::SSE4_2, F::POPCNT], &[]),
        fixup: strings,
        allowed_faults: &[vector::GP],
        ..BASE
    }
}

#[test]
fn diff_sse42() {
    run_family(&fam_sse42());
}

#[test]
fn diff_compat_sse42() {
    run_family_compat(&fam_sse42());
}

fn fam_crypto() -> Family {
    let mut o = ops(b"\x0f\x38", (0xdb..=0xdf).chain(0xc8..=0xcd));
    o.extend(ops(b"\x0f\x3a", [0xdf, 0x44, 0x44, 0xcc]));
    Family {
        name: "aes_pclmul_sha",
        opcodes: leak(o),
        prefixes: &[b"", b"\x66"],
        allow: |i| features(i, &[F::AES, F::PCLMULQDQ, F::SHA], &[]),
        fixup: |_, i, st, _| {
            // Intel documents #GP for a misaligned m128 of the SHA instructions (as for
            // legacy SSE, which x86emu follows); AMD accepts it.
            if i.cpuid_features().contains(&F::SHA) && !host_intel() {
                align_mem(st, i, 16);
            }
        },
        // A host without SHA raises #UD, as the emulator (whose model lacks it then) must.
        allowed_faults: &[vector::GP, vector::UD],
        ..BASE
    }
}

#[test]
fn diff_aes_pclmul_sha() {
    run_family(&fam_crypto());
}

#[test]
fn diff_compat_aes_pclmul_sha() {
    run_family_compat(&fam_crypto());
}

// ---- VEX: AVX, AVX2, FMA, F16C, VEX AES/PCLMULQDQ, BMI ----

/// Every opcode of the three VEX maps.
fn vex_all() -> Vec<&'static [u8]> {
    let mut o = Vec::new();
    for map in 1..=3u8 {
        o.extend(ops(&[map], 0..=255));
    }
    o
}

fn vex_allow(i: &Instruction, any: &[F], all: &[F]) -> bool {
    i.encoding() == EncodingKind::VEX
        && !i.is_vsib()
        // VMASKMOVDQU writes through an implicit RDI (hostexec refuses it).
        && i.mnemonic() != M::Vmaskmovdqu
        && features(i, any, all)
}

fn fam_avx() -> Family {
    Family {
        name: "avx",
        opcodes: leak(vex_all()),
        allow: |i| vex_allow(i, &[F::AVX], &[]),
        fixup: |r, i, st, mem| {
            strings(r, i, st, mem);
            families::mxcsr_fixup(r, i, st, mem);
        },
        xmm: Vals::Mixed,
        mxcsr: true,
        enc: Enc::Vex,
        allowed_faults: &[vector::GP],
        ..BASE
    }
}

#[test]
fn diff_avx() {
    run_family(&fam_avx());
}

#[test]
fn diff_compat_avx() {
    run_family_compat(&fam_avx());
}

fn fam_avx2() -> Family {
    Family {
        name: "avx2",
        opcodes: leak(vex_all()),
        allow: |i| vex_allow(i, &[F::AVX2], &[]),
        xmm: Vals::Int,
        mxcsr: true,
        enc: Enc::Vex,
        allowed_faults: &[vector::GP],
        ..BASE
    }
}

#[test]
fn diff_avx2() {
    run_family(&fam_avx2());
}

#[test]
fn diff_compat_avx2() {
    run_family_compat(&fam_avx2());
}

/// Gathers: the index vector's elements small and signed (so each element's address is
/// within a few hundred bytes of the steered base), the mask's sign bits mostly set.
fn gather_fixup(r: &mut Rng, i: &Instruction, st: &mut NativeState, _: &mut [u8]) {
    let dword = matches!(
        i.mnemonic(),
        M::Vpgatherdd | M::Vpgatherdq | M::Vgatherdps | M::Vgatherdpd
    );
    let idx = i.memory_index().number();
    let mut b = [0u8; 32];
    for k in 0..if dword { 8 } else { 4 } {
        let v = r.below(64) as i64 - 32;
        if dword {
            b[4 * k..4 * k + 4].copy_from_slice(&(v as i32).to_le_bytes());
        } else {
            b[8 * k..8 * k + 8].copy_from_slice(&v.to_le_bytes());
        }
    }
    st.xmm[idx] = u128::from_le_bytes(b[..16].try_into().unwrap());
    st.ymm_hi[idx] = u128::from_le_bytes(b[16..].try_into().unwrap());
    // The mask is the third operand; a random sign per byte covers both element sizes.
    if i.op_count() == 3 && i.op2_kind() == OpKind::Register {
        let m = i.op2_register().number();
        let mut mb = [0u8; 32];
        for x in mb.iter_mut() {
            *x = if r.below(4) != 0 { 0x80 } else { 0 } | (r.next_u64() as u8 & 0x7f);
        }
        if m != idx {
            st.xmm[m] = u128::from_le_bytes(mb[..16].try_into().unwrap());
            st.ymm_hi[m] = u128::from_le_bytes(mb[16..].try_into().unwrap());
        }
    }
}

fn fam_gather() -> Family {
    Family {
        name: "gather",
        opcodes: leak(ops(&[2], 0x90..=0x93)),
        allow: |i| i.encoding() == EncodingKind::VEX && i.is_vsib() && features(i, &[F::AVX2], &[]),
        fixup: gather_fixup,
        xmm: Vals::Mixed,
        enc: Enc::Vex,
        // Destination, index and mask must be three different registers.
        allowed_faults: &[vector::UD],
        ..BASE
    }
}

#[test]
fn diff_gather() {
    run_family(&fam_gather());
}

#[test]
fn diff_compat_gather() {
    run_family_compat(&fam_gather());
}

fn fam_fma() -> Family {
    Family {
        name: "fma",
        opcodes: leak(ops(&[2], 0x96..=0xbf)),
        allow: |i| vex_allow(i, &[F::FMA], &[]),
        xmm: Vals::Float,
        mxcsr: true,
        enc: Enc::Vex,
        allowed_faults: &[vector::GP],
        ..BASE
    }
}

#[test]
fn diff_fma() {
    run_family(&fam_fma());
}

#[test]
fn diff_compat_fma() {
    run_family_compat(&fam_fma());
}

fn fam_vex_misc() -> Family {
    let mut o = ops(&[2], [0x13, 0xdb, 0xdc, 0xdd, 0xde, 0xdf]);
    o.extend(ops(&[3], [0x1d, 0x1d, 0xdf, 0x44, 0x44]));
    Family {
        name: "f16c_vaes_vpclmul",
        opcodes: leak(o),
        allow: |i| vex_allow(i, &[F::F16C, F::AES, F::PCLMULQDQ], &[F::AVX]),
        xmm: Vals::Mixed,
        mxcsr: true,
        enc: Enc::Vex,
        allowed_faults: &[vector::GP],
        ..BASE
    }
}

#[test]
fn diff_f16c_vaes_vpclmul() {
    run_family(&fam_vex_misc());
}

#[test]
fn diff_compat_f16c_vaes_vpclmul() {
    run_family_compat(&fam_vex_misc());
}

fn fam_bmi() -> Family {
    let mut o = ops(&[2], [0xf2, 0xf3, 0xf5, 0xf6, 0xf7]);
    o.extend(ops(&[3], [0xf0, 0xf0]));
    Family {
        name: "bmi",
        opcodes: leak(o),
        allow: |i| vex_allow(i, &[F::BMI1, F::BMI2], &[]),
        enc: Enc::Vex,
        ..BASE
    }
}

#[test]
fn diff_bmi() {
    run_family(&fam_bmi());
}

#[test]
fn diff_compat_bmi() {
    run_family_compat(&fam_bmi());
}

// ---- Legacy-encoded general-purpose extensions ----

fn fam_gpr_ext() -> Family {
    let mut o = ops(b"\x0f\x38", [0xf6, 0xf6, 0xf0, 0xf1, 0xf0, 0xf1]);
    o.extend(ops(b"\x0f", [0xbc, 0xbd, 0xb8]));
    Family {
        name: "adx_movbe_lzcnt_tzcnt",
        opcodes: leak(o),
        prefixes: &[
            b"",
            b"\x66",
            b"\xf3",
            b"\xf3",
            b"\x66\xf3",
            b"\xf3\x66",
            b"\xf2",
        ],
        allow: |i| {
            matches!(
                i.mnemonic(),
                M::Adcx | M::Adox | M::Movbe | M::Lzcnt | M::Tzcnt | M::Popcnt | M::Crc32
            )
        },
        ..BASE
    }
}

#[test]
fn diff_adx_movbe_lzcnt_tzcnt() {
    run_family(&fam_gpr_ext());
}

#[test]
fn diff_compat_adx_movbe_lzcnt_tzcnt() {
    run_family_compat(&fam_gpr_ext());
}

// ---- x87 environment, FXSAVE and XSAVE ----

/// Writes a valid image for the state-loading instructions (FLDENV, FRSTOR, FXRSTOR,
/// XRSTOR) at the memory operand, from another random state; now and then leaves the
/// random bytes (mostly #GP for FXRSTOR and XRSTOR).
fn state_image(r: &mut Rng, i: &Instruction, st: &mut NativeState, mem: &mut [u8]) {
    let m = i.mnemonic();
    if matches!(
        m,
        M::Xsave
            | M::Xsave64
            | M::Xsaveopt
            | M::Xsaveopt64
            | M::Xsavec
            | M::Xsavec64
            | M::Xrstor
            | M::Xrstor64
    ) {
        // RFBM within what both the guest (XCR0 = 7) and the host (more) enable.
        st.gpr[0] = r.below(8) | (r.next_u64() & 0xffff_ffff_0000_0000);
        st.gpr[2] = 0;
    }
    let size = i.memory_size().size().max(match m {
        M::Xrstor | M::Xrstor64 => 832,
        _ => 0,
    });
    let Some(o) = mem_offset(st, i, size) else {
        return;
    };
    if r.below(8) == 0 {
        if matches!(m, M::Fxrstor | M::Fxrstor64 | M::Xrstor | M::Xrstor64) {
            // Random bytes, but no DAZ or MM in MXCSR (see `mxcsr_fixup`).
            mem[o + 24] &= !0x40;
            mem[o + 26] &= !0x02;
        }
        if matches!(m, M::Xrstor | M::Xrstor64) {
            // Nor components beyond AVX in XSTATE_BV and XCOMP_BV, which the host's
            // larger XCR0 accepts and the guest's (7) refuses.
            let h = o + 512;
            mem[h] &= 7;
            mem[h + 1..h + 8].fill(0);
            mem[h + 8] &= 7;
            mem[h + 9..h + 15].fill(0);
            mem[h + 15] &= 0x80;
        }
        return;
    }
    let mut img = NativeState::default();
    random_x87(r, &mut img);
    if r.below(4) == 0 {
        // ES and B not matching the unmasked exceptions.
        img.fsw ^= 0x8080;
    }
    let full_tags = |r: &mut Rng, ftw: u8| -> u16 {
        (0..8).fold(0u16, |t, k| {
            let tag = if ftw & (1 << k) == 0 {
                3
            } else {
                r.below(3) as u16
            };
            t | tag << (2 * k)
        })
    };
    let w16 = |mem: &mut [u8], at: usize, v: u16| mem[at..at + 2].copy_from_slice(&v.to_le_bytes());
    match m {
        M::Fldenv | M::Frstor => {
            let wide = i.memory_size().size() >= 28;
            let (step, regs) = if wide { (4, 28) } else { (2, 14) };
            for k in 0..regs {
                mem[o + k] = r.next_u64() as u8;
            }
            // Now and then reserved FCW bits set (the load drops them).
            let junk = if r.below(8) == 0 {
                r.next_u64() as u16 & 0xe080
            } else {
                0
            };
            w16(mem, o, img.fcw | junk);
            w16(mem, o + step, img.fsw);
            let t = full_tags(r, img.ftw);
            w16(mem, o + 2 * step, t);
            if m == M::Frstor {
                for (k, v) in img.st.iter().enumerate() {
                    let at = o + regs + 10 * k;
                    mem[at..at + 10].copy_from_slice(&v.to_le_bytes()[..10]);
                }
            }
        }
        M::Fxrstor | M::Fxrstor64 | M::Xrstor | M::Xrstor64 => {
            w16(mem, o, img.fcw);
            w16(mem, o + 2, img.fsw);
            mem[o + 4] = img.ftw;
            mem[o + 5] = 0;
            let mx = random_mxcsr(r);
            mem[o + 24..o + 28].copy_from_slice(&mx.to_le_bytes());
            for (k, v) in img.st.iter().enumerate() {
                let at = o + 32 + 16 * k;
                mem[at..at + 10].copy_from_slice(&v.to_le_bytes()[..10]);
                mem[at + 10..at + 16].fill(0);
            }
            if matches!(m, M::Xrstor | M::Xrstor64) {
                let h = o + 512;
                mem[h..h + 64].fill(0);
                let bv = r.below(8);
                mem[h..h + 8].copy_from_slice(&bv.to_le_bytes());
                if r.below(2) == 0 {
                    let comp = (1u64 << 63) | bv | r.below(8);
                    mem[h + 8..h + 16].copy_from_slice(&comp.to_le_bytes());
                }
                if r.below(16) == 0 {
                    // Reserved header bytes (XSTATE_BV and XCOMP_BV bits beyond AVX are
                    // valid on a host with a larger XCR0 than the guest's 7).
                    mem[h + 16 + r.below(48) as usize] ^= 1 << r.below(8);
                }
            }
        }
        _ => {}
    }
}

fn env_allow(i: &Instruction) -> bool {
    matches!(
        i.mnemonic(),
        M::Fnstenv
            | M::Fstenv
            | M::Fldenv
            | M::Fnsave
            | M::Fsave
            | M::Frstor
            | M::Fxsave
            | M::Fxsave64
            | M::Fxrstor
            | M::Fxrstor64
    )
}

/// The stored instruction and data pointers and opcode (host addresses, and AMD saves them
/// only with an exception pending), and FXSAVE's MXCSR_MASK (the host's).
fn env_ignore(i: &Instruction) -> &'static [(usize, usize)] {
    match i.mnemonic() {
        M::Fnstenv | M::Fstenv | M::Fnsave | M::Fsave if i.memory_size().size() < 28 => &[(6, 14)],
        M::Fnstenv | M::Fstenv | M::Fnsave | M::Fsave => &[(12, 28)],
        M::Fxsave
        | M::Fxsave64
        | M::Xsave
        | M::Xsave64
        | M::Xsaveopt
        | M::Xsaveopt64
        | M::Xsavec
        | M::Xsavec64 => &[(6, 24), (28, 32)],
        _ => &[],
    }
}

fn fam_x87_env() -> Family {
    Family {
        name: "x87_env",
        opcodes: &[b"\xd9", b"\xdd", b"\x9b\xd9", b"\x9b\xdd", b"\x0f\xae"],
        prefixes: &[b"", b"", b"", b"\x66"],
        allow: env_allow,
        fixup: state_image,
        xmm: Vals::Mixed,
        x87: true,
        mxcsr: true,
        allowed_faults: &[vector::GP],
        mem_ignore: env_ignore,
        ..BASE
    }
}

#[test]
fn diff_x87_env() {
    run_family(&fam_x87_env());
}

#[test]
fn diff_compat_x87_env() {
    run_family_compat(&fam_x87_env());
}

fn fam_xsave() -> Family {
    Family {
        name: "xsave",
        opcodes: &[b"\x0f\xae", b"\x0f\xae", b"\x0f\xc7"],
        prefixes: &[b""],
        allow: |i| {
            matches!(
                i.mnemonic(),
                M::Xsave
                    | M::Xsave64
                    | M::Xsaveopt
                    | M::Xsaveopt64
                    | M::Xsavec
                    | M::Xsavec64
                    | M::Xrstor
                    | M::Xrstor64
            )
        },
        fixup: state_image,
        xmm: Vals::Mixed,
        x87: true,
        mxcsr: true,
        allowed_faults: &[vector::GP],
        mem_ignore: env_ignore,
        ..BASE
    }
}

#[test]
fn diff_xsave() {
    run_family(&fam_xsave());
}

#[test]
fn diff_compat_xsave() {
    run_family_compat(&fam_xsave());
}
