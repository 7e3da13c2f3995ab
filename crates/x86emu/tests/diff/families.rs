//! Instruction families under differential test.

use super::*;
use iced_x86::Mnemonic as M;
use x86emu::exceptions::vector;

const PFX_INT: &[&[u8]] = &[b"", b"", b"\x66", b"\xf0", b"\x66\xf0"];

fn alu_allow(i: &Instruction) -> bool {
    matches!(
        i.mnemonic(),
        M::Add
            | M::Or
            | M::Adc
            | M::Sbb
            | M::And
            | M::Sub
            | M::Xor
            | M::Cmp
            | M::Test
            | M::Inc
            | M::Dec
            | M::Neg
            | M::Not
    )
}

fn fam_alu() -> Family {
    let mut ops: Vec<&'static [u8]> = Vec::new();
    static BYTES: [u8; 64] = {
        let mut b = [0u8; 64];
        let mut i = 0;
        while i < 64 {
            b[i] = i as u8;
            i += 1;
        }
        b
    };
    for base in [0x00usize, 0x08, 0x10, 0x18, 0x20, 0x28, 0x30, 0x38] {
        for k in 0..6 {
            ops.push(&BYTES[base + k..base + k + 1]);
        }
    }
    let extra: &[&[u8]] = &[
        b"\x80", b"\x81", b"\x83", b"\x84", b"\x85", b"\xa8", b"\xa9", b"\xf6", b"\xf7", b"\xfe",
        b"\xff",
    ];
    ops.extend_from_slice(extra);
    let ops: &'static [&'static [u8]] = Box::leak(ops.into_boxed_slice());
    Family {
        name: "alu",
        opcodes: ops,
        prefixes: PFX_INT,
        allow: alu_allow,
        fixup: no_fixup,
        allowed_faults: &[],
        extra_undefined: no_extra,
        ..BASE
    }
}

#[test]
fn diff_alu() {
    run_family(&fam_alu());
}

fn mov_allow(i: &Instruction) -> bool {
    let m = i.mnemonic();
    matches!(
        m,
        M::Mov
            | M::Movzx
            | M::Movsx
            | M::Movsxd
            | M::Lea
            | M::Xchg
            | M::Bswap
            | M::Cbw
            | M::Cwde
            | M::Cdqe
            | M::Cwd
            | M::Cdq
            | M::Cqo
            | M::Lahf
            | M::Sahf
            | M::Clc
            | M::Stc
            | M::Cmc
            | M::Cld
            | M::Std
            | M::Nop
            | M::Xlatb
    ) || format!("{m:?}").starts_with("Cmov")
        || format!("{m:?}").starts_with("Set")
}

fn fam_mov() -> Family {
    Family {
        name: "mov",
        opcodes: &[
            b"\x88",
            b"\x89",
            b"\x8a",
            b"\x8b",
            b"\x8d",
            b"\xc6",
            b"\xc7",
            b"\xb0",
            b"\xb3",
            b"\xb7",
            b"\xb8",
            b"\xbc",
            b"\xbf",
            b"\x0f\xb6",
            b"\x0f\xb7",
            b"\x0f\xbe",
            b"\x0f\xbf",
            b"\x63",
            b"\x86",
            b"\x87",
            b"\x91",
            b"\x95",
            b"\x0f\x40",
            b"\x0f\x42",
            b"\x0f\x44",
            b"\x0f\x47",
            b"\x0f\x48",
            b"\x0f\x4a",
            b"\x0f\x4c",
            b"\x0f\x4f",
            b"\x0f\x90",
            b"\x0f\x93",
            b"\x0f\x95",
            b"\x0f\x96",
            b"\x0f\x99",
            b"\x0f\x9b",
            b"\x0f\x9d",
            b"\x0f\x9e",
            b"\x0f\xc8",
            b"\x0f\xcb",
            b"\x0f\xcf",
            b"\x98",
            b"\x99",
            b"\x9e",
            b"\x9f",
            b"\xf5",
            b"\xf8",
            b"\xf9",
            b"\xfc",
            b"\xfd",
            b"\xd7",
        ],
        prefixes: &[b"", b"", b"\x66"],
        allow: |i| mov_allow(i) && !(i.mnemonic() == M::Bswap && i.op0_register().is_gpr16()),
        fixup: no_fixup,
        allowed_faults: &[],
        extra_undefined: no_extra,
        ..BASE
    }
}

#[test]
fn diff_mov() {
    run_family(&fam_mov());
}

fn shift_extra(i: &Instruction, st: &NativeState) -> u64 {
    // OF is only defined for 1-bit shifts; iced cannot know the CL count.
    let count = if i.op_count() >= 2 && i.op_kind(i.op_count() - 1) == OpKind::Register {
        st.gpr[1] & 0x3f
    } else if i.op_count() >= 2 && i.op_kind(i.op_count() - 1) != OpKind::Register {
        u64::from(i.immediate8()) & 0x3f
    } else {
        1
    };
    let size = i
        .memory_size()
        .size()
        .max(if i.op0_kind() == OpKind::Register {
            i.op0_register().size()
        } else {
            0
        });
    let mut f = 0;
    if count != 1 {
        f |= flags::OF;
    }
    // Counts at or beyond the operand width leave CF (and for SHLD/SHRD the result) undefined.
    if matches!(i.mnemonic(), M::Shl | M::Sal | M::Shr) && count as usize >= size * 8 {
        f |= flags::CF;
    }
    f | flags::AF
}

fn fam_shift() -> Family {
    Family {
        name: "shift",
        opcodes: &[
            b"\xc0",
            b"\xc1",
            b"\xd0",
            b"\xd1",
            b"\xd2",
            b"\xd3",
            b"\x0f\xa4",
            b"\x0f\xa5",
            b"\x0f\xac",
            b"\x0f\xad",
        ],
        prefixes: &[b"", b"", b"\x66"],
        allow: |i| {
            let ok = matches!(
                i.mnemonic(),
                M::Shl
                    | M::Sal
                    | M::Shr
                    | M::Sar
                    | M::Rol
                    | M::Ror
                    | M::Rcl
                    | M::Rcr
                    | M::Shld
                    | M::Shrd
            );
            // 16-bit SHLD/SHRD with counts above 16 are undefined; the fixup keeps CL small.
            let size16 = (i.op0_kind() == OpKind::Register && i.op0_register().is_gpr16())
                || (i.op0_kind() == OpKind::Memory && i.memory_size().size() == 2);
            let undefined_count = matches!(i.mnemonic(), M::Shld | M::Shrd)
                && size16
                && i.op2_kind() == OpKind::Immediate8
                && (i.immediate8() & 0x1f) > 16;
            ok && !undefined_count
        },
        fixup: |r, i, st, _| {
            if matches!(i.mnemonic(), M::Shld | M::Shrd) {
                let size = if i.op0_kind() == OpKind::Register {
                    i.op0_register().size()
                } else {
                    i.memory_size().size()
                };
                if size == 2 {
                    st.gpr[1] = (st.gpr[1] & !0xff) | r.below(17);
                }
            }
        },
        allowed_faults: &[],
        extra_undefined: shift_extra,
        ..BASE
    }
}

#[test]
fn diff_shift() {
    run_family(&fam_shift());
}

fn fam_muldiv() -> Family {
    Family {
        name: "muldiv",
        opcodes: &[b"\xf6", b"\xf7", b"\x0f\xaf", b"\x69", b"\x6b"],
        prefixes: &[b"", b"", b"\x66"],
        allow: |i| matches!(i.mnemonic(), M::Mul | M::Imul | M::Div | M::Idiv),
        fixup: |r, i, st, _| {
            // Make non-faulting divisions likely: small high half of the dividend.
            if matches!(i.mnemonic(), M::Div | M::Idiv) && r.below(2) == 0 {
                st.gpr[2] = if r.below(2) == 0 { 0 } else { u64::MAX };
                st.gpr[0] &= 0xffff;
            }
        },
        allowed_faults: &[vector::DE],
        extra_undefined: |i, _| {
            if matches!(i.mnemonic(), M::Mul | M::Imul) {
                flags::SF | flags::ZF | flags::AF | flags::PF
            } else {
                0
            }
        },
        ..BASE
    }
}

#[test]
fn diff_muldiv() {
    run_family(&fam_muldiv());
}

fn fam_bits() -> Family {
    Family {
        name: "bits",
        opcodes: &[
            b"\x0f\xa3",
            b"\x0f\xab",
            b"\x0f\xb3",
            b"\x0f\xbb",
            b"\x0f\xba",
            b"\x0f\xbc",
            b"\x0f\xbd",
        ],
        prefixes: PFX_INT,
        allow: |i| {
            // A register bit offset that is also the address register would move the
            // access out of the scratch buffer.
            let aliased = i.op0_kind() == OpKind::Memory
                && i.op1_kind() == OpKind::Register
                && (i.op1_register().full_register() == i.memory_base()
                    || i.op1_register().full_register() == i.memory_index());
            !aliased
                && matches!(
                    i.mnemonic(),
                    M::Bt | M::Bts | M::Btr | M::Btc | M::Bsf | M::Bsr
                )
        },
        fixup: |r, i, st, _| {
            // Keep register bit offsets for memory forms inside the scratch buffer.
            if i.op0_kind() == OpKind::Memory && i.op1_kind() == OpKind::Register {
                let reg = i.op1_register();
                let v = r.below(2048) as i64 - 1024;
                let idx = reg.full_register() as usize - Register::RAX as usize;
                if reg.full_register() != i.memory_base() {
                    st.gpr[idx] = (st.gpr[idx] & !0xffff) | (v as u64 & 0xffff);
                    if reg.size() > 2 {
                        st.gpr[idx] = v as u64;
                    }
                }
            }
            if matches!(i.mnemonic(), M::Bsf | M::Bsr) && r.below(4) == 0 {
                let idx = i.op1_register().full_register() as usize;
                if i.op1_kind() == OpKind::Register && idx >= Register::RAX as usize {
                    st.gpr[idx - Register::RAX as usize] = 0;
                }
            }
        },
        allowed_faults: &[],
        extra_undefined: |i, _| {
            if matches!(i.mnemonic(), M::Bsf | M::Bsr) {
                flags::STATUS & !flags::ZF
            } else {
                flags::STATUS & !flags::CF
            }
        },
        ..BASE
    }
}

#[test]
fn diff_bits() {
    run_family(&fam_bits());
}

fn fam_atomic() -> Family {
    Family {
        name: "atomic",
        opcodes: &[
            b"\x0f\xb0",
            b"\x0f\xb1",
            b"\x0f\xc0",
            b"\x0f\xc1",
            b"\x0f\xc7",
            b"\x86",
            b"\x87",
        ],
        prefixes: &[b"", b"\xf0", b"\xf0", b"\x66\xf0"],
        allow: |i| {
            matches!(
                i.mnemonic(),
                M::Cmpxchg | M::Xadd | M::Cmpxchg8b | M::Cmpxchg16b | M::Xchg
            )
        },
        fixup: |r, i, st, mem| {
            if r.below(2) == 0 && i.op_kinds().any(|k| k == OpKind::Memory) {
                // Make the comparison succeed: accumulator(s) = memory value.
                let base =
                    st.gpr[i.memory_base().full_register() as usize - Register::RAX as usize];
                let ea = base.wrapping_add(i.memory_displacement64());
                if i.memory_index() == Register::None
                    && ea >= scratch()
                    && ea + 16 <= scratch() + SCRATCH_LEN as u64
                {
                    let o = (ea - scratch()) as usize;
                    let lo = u64::from_le_bytes(mem[o..o + 8].try_into().unwrap());
                    let hi = u64::from_le_bytes(mem[o + 8..o + 16].try_into().unwrap());
                    if i.mnemonic() == M::Cmpxchg8b {
                        st.gpr[0] = lo & 0xffff_ffff;
                        st.gpr[2] = lo >> 32;
                    } else if i.mnemonic() == M::Cmpxchg16b {
                        st.gpr[0] = lo;
                        st.gpr[2] = hi;
                    } else {
                        st.gpr[0] = lo;
                    }
                }
            }
        },
        allowed_faults: &[vector::GP],
        extra_undefined: no_extra,
        ..BASE
    }
}

#[test]
fn diff_atomic() {
    run_family(&fam_atomic());
}

fn string_fixup(r: &mut Rng, _: &Instruction, st: &mut NativeState, mem: &mut [u8]) {
    st.gpr[6] = scratch() + 0x2000 + r.below(0x1000);
    st.gpr[7] = scratch() + 0x4800 + r.below(0x1000);
    st.gpr[1] = r.below(40);
    if r.below(3) == 0 {
        st.rflags |= flags::DF;
    }
    if r.below(2) == 0 {
        // Make REPE/REPNE comparisons run for a while: equal source and destination.
        let (s, d) = (
            (st.gpr[6] - scratch()) as usize,
            (st.gpr[7] - scratch()) as usize,
        );
        let (a, b) = (s.min(d), s.max(d));
        let (lo, hi) = mem.split_at_mut(b);
        let n = 256.min(hi.len());
        lo[a - 256.min(a)..a - 256.min(a) + n].copy_from_slice(&hi[..n]);
        let src = mem[s - 256.min(s)..s + 256].to_vec();
        mem[d - 256.min(d)..d - 256.min(d) + src.len()].copy_from_slice(&src);
    }
}

fn fam_string() -> Family {
    Family {
        name: "string",
        opcodes: &[
            b"\xa4", b"\xa5", b"\xa6", b"\xa7", b"\xaa", b"\xab", b"\xac", b"\xad", b"\xae",
            b"\xaf",
        ],
        prefixes: &[b"", b"\xf3", b"\xf2", b"\x66\xf3", b"\xf3\x66"],
        allow: |i| i.is_string_instruction() && i.segment_prefix() == Register::None,
        fixup: string_fixup,
        allowed_faults: &[],
        extra_undefined: no_extra,
        ..BASE
    }
}

#[test]
fn diff_string() {
    run_family(&fam_string());
}

fn fam_stack() -> Family {
    Family {
        name: "stack",
        opcodes: &[
            b"\x50", b"\x53", b"\x55", b"\x57", b"\x58", b"\x5b", b"\x5d", b"\x5f", b"\x68",
            b"\x6a", b"\x8f", b"\xff", b"\x9c", b"\x9d", b"\xc9", b"\xc8",
        ],
        prefixes: &[b"", b"", b"\x66"],
        allow: |i| {
            // 16-bit ENTER in 64-bit code crashes the native run on the host (and no
            // compiler emits it); the 64-bit form is covered.
            let enter16 = i.mnemonic() == M::Enter && i.code() != iced_x86::Code::Enterq_imm16_imm8;
            // Keep the allocated frame inside the scratch buffer (the host may probe it).
            let big = i.mnemonic() == M::Enter && i.immediate16() > 0x2000;
            // RSP-based operands with an index would put the stack itself outside scratch.
            // So would a large displacement from RSP.
            let indexed = i.op_kinds().any(|k| k == OpKind::Memory)
                && (i.memory_index() != Register::None
                    || (i.memory_base() == Register::RSP
                        && (i.memory_displacement64() as i64).unsigned_abs() > 0x800));
            let big = big || indexed;
            !enter16
                && !big
                && matches!(
                    i.mnemonic(),
                    M::Push
                        | M::Pop
                        | M::Pushfq
                        | M::Pushf
                        | M::Popfq
                        | M::Popf
                        | M::Leave
                        | M::Enter
                )
        },
        fixup: |r, i, st, mem| {
            st.gpr[5] = scratch() + 0x5000 + r.below(0x100) * 8;
            let sp = st.gpr[4];
            if i.op_kinds().any(|k| k == OpKind::Memory) && i.memory_base() == Register::RSP {
                // keep the steered RSP
            } else {
                st.gpr[4] = scratch() + 0x6000 - r.below(0x100) * 8;
            }
            let _ = sp;
            if matches!(i.mnemonic(), M::Popfq | M::Popf) {
                // Never pop TF or AC into the host: the native run would trap.
                let o = (st.gpr[4] - scratch()) as usize;
                mem[o + 1] &= !0x01;
                mem[o + 2] &= !0x04;
            }
        },
        allowed_faults: &[],
        extra_undefined: no_extra,
        ..BASE
    }
}

#[test]
fn diff_stack() {
    run_family(&fam_stack());
}

fn has_mmx(i: &Instruction) -> bool {
    (0..i.op_count()).any(|k| i.op_kind(k) == OpKind::Register && i.op_register(k).is_mm())
}

fn fam_sse_int() -> Family {
    let mut ops: Vec<&'static [u8]> = Vec::new();
    static OPS: [[u8; 2]; 256] = {
        let mut t = [[0u8; 2]; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = [0x0f, i as u8];
            i += 1;
        }
        t
    };
    for b in (0x60..=0x76)
        .chain([0x7e, 0x7f, 0xc4, 0xc5, 0xd6, 0xd7, 0xe7])
        .chain(0xd1..=0xfe)
    {
        ops.push(&OPS[b]);
    }
    let ops: &'static [&'static [u8]] = Box::leak(ops.into_boxed_slice());
    Family {
        name: "sse_int",
        opcodes: ops,
        prefixes: &[b"\x66", b"\x66", b"\xf3", b"\xf2"],
        allow: |i| {
            !has_mmx(i)
                && matches!(
                    i.mnemonic(),
                    M::Paddb
                        | M::Paddw
                        | M::Paddd
                        | M::Paddq
                        | M::Psubb
                        | M::Psubw
                        | M::Psubd
                        | M::Psubq
                        | M::Paddsb
                        | M::Paddsw
                        | M::Psubsb
                        | M::Psubsw
                        | M::Paddusb
                        | M::Paddusw
                        | M::Psubusb
                        | M::Psubusw
                        | M::Pmullw
                        | M::Pmulhw
                        | M::Pmulhuw
                        | M::Pmuludq
                        | M::Pmaddwd
                        | M::Pavgb
                        | M::Pavgw
                        | M::Psadbw
                        | M::Pminub
                        | M::Pmaxub
                        | M::Pminsw
                        | M::Pmaxsw
                        | M::Pcmpeqb
                        | M::Pcmpeqw
                        | M::Pcmpeqd
                        | M::Pcmpgtb
                        | M::Pcmpgtw
                        | M::Pcmpgtd
                        | M::Pand
                        | M::Pandn
                        | M::Por
                        | M::Pxor
                        | M::Packsswb
                        | M::Packuswb
                        | M::Packssdw
                        | M::Punpcklbw
                        | M::Punpckhbw
                        | M::Punpcklwd
                        | M::Punpckhwd
                        | M::Punpckldq
                        | M::Punpckhdq
                        | M::Punpcklqdq
                        | M::Punpckhqdq
                        | M::Pshufd
                        | M::Pshuflw
                        | M::Pshufhw
                        | M::Psllw
                        | M::Pslld
                        | M::Psllq
                        | M::Psrlw
                        | M::Psrld
                        | M::Psrlq
                        | M::Psraw
                        | M::Psrad
                        | M::Pslldq
                        | M::Psrldq
                        | M::Movd
                        | M::Movq
                        | M::Movdqa
                        | M::Movdqu
                        | M::Movntdq
                        | M::Pextrw
                        | M::Pinsrw
                        | M::Pmovmskb
                )
        },
        fixup: no_fixup,
        allowed_faults: &[vector::GP],
        extra_undefined: no_extra,
        ..BASE
    }
}

#[test]
fn diff_sse_int() {
    run_family(&fam_sse_int());
}

fn fam_sse_fp() -> Family {
    let mut ops: Vec<&'static [u8]> = Vec::new();
    static OPS: [[u8; 2]; 256] = {
        let mut t = [[0u8; 2]; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = [0x0f, i as u8];
            i += 1;
        }
        t
    };
    for b in (0x10..=0x17)
        .chain(0x28..=0x2f)
        .chain(0x50..=0x5f)
        .chain([0xc2, 0xc6, 0xe6])
    {
        ops.push(&OPS[b]);
    }
    let ops: &'static [&'static [u8]] = Box::leak(ops.into_boxed_slice());
    Family {
        name: "sse_fp",
        opcodes: ops,
        prefixes: &[b"", b"\x66", b"\xf3", b"\xf2"],
        allow: |i| {
            !has_mmx(i)
                && matches!(
                    i.mnemonic(),
                    M::Movups
                        | M::Movupd
                        | M::Movaps
                        | M::Movapd
                        | M::Movss
                        | M::Movsd
                        | M::Movlps
                        | M::Movlpd
                        | M::Movhps
                        | M::Movhpd
                        | M::Movhlps
                        | M::Movlhps
                        | M::Unpcklps
                        | M::Unpckhps
                        | M::Unpcklpd
                        | M::Unpckhpd
                        | M::Cvtsi2ss
                        | M::Cvtsi2sd
                        | M::Cvttss2si
                        | M::Cvttsd2si
                        | M::Cvtss2si
                        | M::Cvtsd2si
                        | M::Ucomiss
                        | M::Ucomisd
                        | M::Comiss
                        | M::Comisd
                        | M::Movmskps
                        | M::Movmskpd
                        | M::Sqrtps
                        | M::Sqrtpd
                        | M::Sqrtss
                        | M::Sqrtsd
                        | M::Andps
                        | M::Andpd
                        | M::Andnps
                        | M::Andnpd
                        | M::Orps
                        | M::Orpd
                        | M::Xorps
                        | M::Xorpd
                        | M::Addps
                        | M::Addpd
                        | M::Addss
                        | M::Addsd
                        | M::Mulps
                        | M::Mulpd
                        | M::Mulss
                        | M::Mulsd
                        | M::Subps
                        | M::Subpd
                        | M::Subss
                        | M::Subsd
                        | M::Minps
                        | M::Minpd
                        | M::Minss
                        | M::Minsd
                        | M::Divps
                        | M::Divpd
                        | M::Divss
                        | M::Divsd
                        | M::Maxps
                        | M::Maxpd
                        | M::Maxss
                        | M::Maxsd
                        | M::Cvtps2pd
                        | M::Cvtpd2ps
                        | M::Cvtss2sd
                        | M::Cvtsd2ss
                        | M::Cvtdq2ps
                        | M::Cvtps2dq
                        | M::Cvttps2dq
                        | M::Cvtdq2pd
                        | M::Cvtpd2dq
                        | M::Cvttpd2dq
                        | M::Cmpps
                        | M::Cmppd
                        | M::Cmpss
                        | M::Cmpsd
                        | M::Shufps
                        | M::Shufpd
                )
        },
        fixup: |r, _, st, _| {
            // Random rounding mode and flush-to-zero.
            st.mxcsr =
                0x1f80 | ((r.below(4) as u32) << 13) | if r.below(4) == 0 { 1 << 15 } else { 0 };
        },
        xmm: Vals::Float,
        allowed_faults: &[vector::GP],
        extra_undefined: no_extra,
        ..BASE
    }
}

#[test]
fn diff_sse_fp() {
    run_family(&fam_sse_fp());
}

fn fam_x87_control() -> Family {
    Family {
        name: "x87_control",
        opcodes: &[
            b"\xd9",
            b"\xdd",
            b"\xdf\xe0",
            b"\xdb\xe2",
            b"\xdb\xe3",
            b"\x9b",
        ],
        prefixes: &[b"", b"\x66"],
        allow: |i| {
            matches!(
                i.mnemonic(),
                M::Fnstcw | M::Fldcw | M::Fnstsw | M::Fnclex | M::Fninit | M::Wait
            )
        },
        fixup: no_fixup,
        allowed_faults: &[],
        extra_undefined: no_extra,
        ..BASE
    }
}

#[test]
fn diff_x87_control() {
    run_family(&fam_x87_control());
}

/// Half the loads get a valid MXCSR (random masks, rounding, flags, FTZ), the rest random
/// bits (#GP when reserved ones are set). DAZ is cleared in both: x86emu's MXCSR_MASK
/// does not offer it (LDMXCSR of it is #GP there) while the host's does; so is AMD's MM.
pub fn mxcsr_fixup(r: &mut Rng, i: &Instruction, st: &mut NativeState, mem: &mut [u8]) {
    if matches!(i.mnemonic(), M::Ldmxcsr | M::Vldmxcsr) {
        if let Some(o) = mem_offset(st, i, 4) {
            let v = if r.below(2) == 0 {
                r.next_u64() as u32 & 0xffff
            } else {
                u32::from_le_bytes(mem[o..o + 4].try_into().unwrap())
            };
            // Also MM (bit 17, AMD's misaligned SSE mode), which AMD's MXCSR_MASK has.
            mem[o..o + 4].copy_from_slice(&(v & !0x2_0040).to_le_bytes());
        }
    }
}

fn fam_mxcsr() -> Family {
    Family {
        name: "mxcsr",
        opcodes: &[b"\x0f\xae"],
        prefixes: &[b""],
        allow: |i| matches!(i.mnemonic(), M::Ldmxcsr | M::Stmxcsr),
        fixup: mxcsr_fixup,
        allowed_faults: &[vector::GP],
        extra_undefined: no_extra,
        ..BASE
    }
}

#[test]
fn diff_mxcsr() {
    run_family(&fam_mxcsr());
}

// The integer and SSE families again in compatibility mode: 32-bit operand and address
// size defaults, 32-bit stack, no REX.
#[test]
fn diff_compat_alu() {
    run_family_compat(&fam_alu());
}

#[test]
fn diff_compat_mov() {
    run_family_compat(&fam_mov());
}

#[test]
fn diff_compat_shift() {
    run_family_compat(&fam_shift());
}

#[test]
fn diff_compat_muldiv() {
    run_family_compat(&fam_muldiv());
}

#[test]
fn diff_compat_bits() {
    run_family_compat(&fam_bits());
}

#[test]
fn diff_compat_string() {
    run_family_compat(&fam_string());
}

#[test]
fn diff_compat_stack() {
    run_family_compat(&fam_stack());
}

#[test]
fn diff_compat_sse_int() {
    run_family_compat(&fam_sse_int());
}

#[test]
fn diff_compat_sse_fp() {
    run_family_compat(&fam_sse_fp());
}

#[test]
fn diff_compat_atomic() {
    let mut fam = fam_atomic();
    // CMPXCHG16B does not exist outside 64-bit mode.
    fam.allowed_faults = &[vector::GP, vector::UD];
    run_family_compat(&fam);
}
