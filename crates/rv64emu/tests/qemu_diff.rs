//! Instruction tests against QEMU: random programs per instruction family run under
//! `qemu-riscv64` (Debian's qemu-user) and on rv64emu from the same random register and
//! memory state; every register and the memory window must match afterwards.

mod common;

use common::{build, require_tools, run_emu, run_qemu, Rng, Scratch};

/// Registers a body may write: everything but x0, sp (x2) and s0 (x8), which hold the
/// memory window's addresses.
fn dest(rng: &mut Rng) -> u8 {
    loop {
        let r = 1 + rng.below(31) as u8;
        if r != 2 && r != 8 {
            return r;
        }
    }
}

fn src(rng: &mut Rng) -> u8 {
    rng.below(32) as u8
}

/// Compressed-form registers (x8..x15) other than s0.
fn dest_c(rng: &mut Rng) -> u8 {
    9 + rng.below(7) as u8
}

fn src_c(rng: &mut Rng) -> u8 {
    8 + rng.below(8) as u8
}

fn imm12(rng: &mut Rng) -> i64 {
    rng.below(4096) as i64 - 2048
}

const MEM: u64 = 512;

/// Wraps a body: load random registers and memory, run, dump x1..x31 after the window,
/// write window + dump to stdout, exit.
fn program(rng: &mut Rng, body: &[String], rvc: bool) -> String {
    let mut s = String::new();
    s += if rvc {
        ".option rvc\n"
    } else {
        ".option norvc\n"
    };
    s += ".text\n.globl _start\n_start:\n";
    s += "    la x8, mem\n    addi x2, x8, 256\n    la x1, finit\n";
    for r in 0..32 {
        s += &format!("    fld f{r}, {}(x1)\n", 8 * r);
    }
    s += &format!("    csrwi fcsr, 0\n    csrwi frm, {}\n", rng.below(5));
    s += "    la x1, init\n";
    for r in 3..32 {
        if r != 8 {
            s += &format!("    ld x{r}, {}(x1)\n", 8 * r);
        }
    }
    s += "    ld x1, 8(x1)\n";
    for line in body {
        s += "    ";
        s += line;
        s += "\n";
    }
    for r in 1..32 {
        s += &format!("    sd x{r}, {}(x8)\n", MEM + 8 * r);
    }
    for r in 0..32 {
        s += &format!("    fsd f{r}, {}(x8)\n", MEM + 256 + 8 * r);
    }
    s += &format!("    frcsr t0\n    sd t0, {}(x8)\n", MEM + 512);
    s += &format!(
        "    li a0, 1\n    mv a1, x8\n    li a2, {}\n    li a7, 64\n    ecall\n    li a0, 0\n    li a7, 93\n    ecall\n",
        DUMP
    );
    s += ".data\n.align 6\ninit:\n";
    for _ in 0..32 {
        s += &format!("    .dword {:#x}\n", rng.value());
    }
    s += "mem:\n";
    for _ in 0..MEM / 8 {
        s += &format!("    .dword {:#x}\n", rng.value());
    }
    s += &format!("    .space {}\n", DUMP - MEM);
    s += "finit:\n";
    for _ in 0..32 {
        s += &format!("    .dword {:#x}\n", fp_value(rng));
    }
    s
}

/// Bytes each program writes: the memory window, x0..x31, f0..f31, fcsr.
const DUMP: u64 = MEM + 512 + 8;

/// An FP register value: binary64 or NaN-boxed binary32, biased to the edge cases.
fn fp_value(rng: &mut Rng) -> u64 {
    const D: [u64; 14] = [
        0,
        1 << 63,
        0x3ff0_0000_0000_0000,
        0xbff0_0000_0000_0000,
        0x7ff0_0000_0000_0000,
        0xfff0_0000_0000_0000,
        0x7ff8_0000_0000_0000,
        0x7ff4_0000_0000_0000,
        0x0000_0000_0000_0001,
        0x000f_ffff_ffff_ffff,
        0x7fef_ffff_ffff_ffff,
        0x0010_0000_0000_0000,
        0x41e0_0000_0000_0000,
        0x43e0_0000_0000_0000,
    ];
    const S: [u32; 12] = [
        0,
        0x8000_0000,
        0x3f80_0000,
        0xbf80_0000,
        0x7f80_0000,
        0xff80_0000,
        0x7fc0_0000,
        0x7fa0_0000,
        1,
        0x007f_ffff,
        0x7f7f_ffff,
        0x4f00_0000,
    ];
    let boxed = |v: u32| 0xffff_ffff_0000_0000 | v as u64;
    match rng.below(8) {
        0 => *rng.pick(&D),
        1 => boxed(*rng.pick(&S)),
        2 => (rng.next() as f64 / 3.0e9).to_bits() ^ (rng.below(2) << 63),
        3 => boxed(((rng.next() as i64 as f32) / 7.0).to_bits()),
        4 => boxed((rng.next() % 1000) as f32 as u32 ^ 0x4000_0000),
        5 => ((rng.below(2000) as f64 - 1000.0) * 0.375).to_bits(),
        6 => boxed(rng.next() as u32),
        _ => rng.next(),
    }
}

fn compare(name: &str, source: &str, qemu: &[u8], emu: &[u8]) {
    if qemu == emu {
        return;
    }
    let mut diffs = Vec::new();
    let words = qemu.len().min(emu.len()) / 8;
    for w in 0..words {
        let q = u64::from_le_bytes(qemu[8 * w..8 * w + 8].try_into().unwrap());
        let e = u64::from_le_bytes(emu[8 * w..8 * w + 8].try_into().unwrap());
        if q != e {
            let w = w as u64;
            let what = if w < MEM / 8 {
                format!("mem+{:#x}", 8 * w)
            } else if w < MEM / 8 + 32 {
                format!("x{}", w - MEM / 8)
            } else if w < MEM / 8 + 64 {
                format!("f{}", w - MEM / 8 - 32)
            } else {
                "fcsr".to_string()
            };
            diffs.push(format!("{what}: qemu {q:#018x} emu {e:#018x}"));
        }
    }
    panic!(
        "{name}: rv64emu differs from qemu-riscv64 (lengths {} vs {}):\n{}\nprogram:\n{source}",
        qemu.len(),
        emu.len(),
        diffs.join("\n")
    );
}

/// Runs `count` random programs of `len` instructions from `gen`.
fn differential(
    family: &str,
    seed: u64,
    count: usize,
    len: usize,
    rvc: bool,
    march: &str,
    mut gen: impl FnMut(&mut Rng, &mut usize) -> Vec<String>,
) {
    require_tools();
    let dir = Scratch::new(family);
    let mut rng = Rng::new(seed);
    let mut label = 0usize;
    for n in 0..count {
        let mut body = Vec::new();
        while body.len() < len {
            body.extend(gen(&mut rng, &mut label));
        }
        let source = program(&mut rng, &body, rvc);
        let elf = build(&dir.0, &format!("{family}{n}"), &source, march);
        let q = run_qemu(&elf);
        assert_eq!(q.len() as u64, DUMP, "qemu wrote a short dump");
        // Both ways the CPU runs a block: interpreted, and compiled to host code.
        let e = run_emu(&elf, false);
        compare(&format!("{family} program {n}"), &source, &q, &e);
        let c = run_emu(&elf, true);
        compare(&format!("{family} program {n}, compiled"), &source, &q, &c);
    }
}

const RTYPE: [&str; 15] = [
    "add", "sub", "sll", "slt", "sltu", "xor", "srl", "sra", "or", "and", "addw", "subw", "sllw",
    "srlw", "sraw",
];
const MTYPE: [&str; 13] = [
    "mul", "mulh", "mulhsu", "mulhu", "div", "divu", "rem", "remu", "mulw", "divw", "divuw",
    "remw", "remuw",
];

fn integer_op(rng: &mut Rng, label: &mut usize) -> Vec<String> {
    let rd = dest(rng);
    let (a, b) = (src(rng), src(rng));
    match rng.below(10) {
        0..=2 => vec![format!("{} x{rd}, x{a}, x{b}", rng.pick(&RTYPE))],
        3 | 4 => {
            let op = *rng.pick(&["addi", "slti", "sltiu", "xori", "ori", "andi", "addiw"]);
            vec![format!("{op} x{rd}, x{a}, {}", imm12(rng))]
        }
        5 => {
            let (op, max) = *rng.pick(&[
                ("slli", 64),
                ("srli", 64),
                ("srai", 64),
                ("slliw", 32),
                ("srliw", 32),
                ("sraiw", 32),
            ]);
            vec![format!("{op} x{rd}, x{a}, {}", rng.below(max))]
        }
        6 => {
            let op = *rng.pick(&["lui", "auipc"]);
            vec![format!("{op} x{rd}, {:#x}", rng.below(1 << 20))]
        }
        7 => {
            let (op, size) = *rng.pick(&[
                ("lb", 1),
                ("lh", 2),
                ("lw", 4),
                ("ld", 8),
                ("lbu", 1),
                ("lhu", 2),
                ("lwu", 4),
            ]);
            let off = rng.below(MEM - size + 1);
            vec![format!("{op} x{rd}, {off}(x8)")]
        }
        8 => {
            let (op, size) = *rng.pick(&[("sb", 1), ("sh", 2), ("sw", 4), ("sd", 8)]);
            let off = rng.below(MEM - size + 1);
            vec![format!("{op} x{a}, {off}(x8)")]
        }
        _ => {
            *label += 1;
            let l = *label;
            let skipped = format!("addi x{}, x{}, {}", dest(rng), src(rng), imm12(rng));
            match rng.below(4) {
                0 => vec![format!("jal x{rd}, L{l}"), skipped, format!("L{l}:")],
                1 => vec![
                    format!("auipc x{rd}, 0"),
                    format!("jalr x{}, 12(x{rd})", dest(rng)),
                    skipped,
                ],
                _ => {
                    let op = *rng.pick(&["beq", "bne", "blt", "bge", "bltu", "bgeu"]);
                    vec![format!("{op} x{a}, x{b}, L{l}"), skipped, format!("L{l}:")]
                }
            }
        }
    }
}

#[test]
fn integer_matches_qemu() {
    differential("int", 1, 40, 60, false, "rv64g", integer_op);
}

#[test]
fn multiply_divide_matches_qemu() {
    differential("muldiv", 2, 40, 40, false, "rv64g", |rng, label| {
        if rng.below(3) == 0 {
            return integer_op(rng, label);
        }
        let rd = dest(rng);
        vec![format!(
            "{} x{rd}, x{}, x{}",
            rng.pick(&MTYPE),
            src(rng),
            src(rng)
        )]
    });
}

#[test]
fn atomics_match_qemu() {
    const AMOS: [&str; 9] = [
        "amoswap", "amoadd", "amoxor", "amoand", "amoor", "amomin", "amomax", "amominu", "amomaxu",
    ];
    differential("amo", 3, 40, 40, false, "rv64g", |rng, label| {
        let w = *rng.pick(&["w", "d"]);
        let size = if w == "w" { 4 } else { 8 };
        let off = rng.below(MEM / size) * size;
        let order = *rng.pick(&["", ".aq", ".rl", ".aqrl"]);
        let mut rd = dest(rng);
        while rd == 31 {
            rd = dest(rng);
        }
        let mut v = vec![format!("addi x31, x8, {off}")];
        match rng.below(4) {
            0 | 1 => v.push(format!(
                "{}.{w}{order} x{rd}, x{}, (x31)",
                rng.pick(&AMOS),
                src(rng)
            )),
            2 => {
                // A reserved pair, with register-only work between.
                v.push(format!("lr.{w}{order} x{rd}, (x31)"));
                let mut mid = dest(rng);
                while mid == 31 {
                    mid = dest(rng);
                }
                v.push(format!("add x{mid}, x{}, x{}", src(rng), src(rng)));
                v.push(format!("sc.{w}{order} x{}, x{}, (x31)", rd, src(rng)));
            }
            _ => {
                // A store-conditional with no reservation (or a spent one) must fail.
                v.push(format!("sc.{w} x{rd}, x{}, (x31)", src(rng)));
                let _ = label;
            }
        }
        v
    });
}

#[test]
fn compressed_matches_qemu() {
    differential("rvc", 4, 40, 60, true, "rv64gc", |rng, label| {
        let rd = dest(rng);
        let rdc = dest_c(rng);
        let rsc = src_c(rng);
        let nz6 = |rng: &mut Rng| loop {
            let v = rng.below(64) as i64 - 32;
            if v != 0 {
                return v;
            }
        };
        match rng.below(16) {
            0 => vec![format!("c.addi x{rd}, {}", nz6(rng))],
            1 => vec![format!("c.li x{rd}, {}", rng.below(64) as i64 - 32)],
            2 => {
                let imm = *rng.pick(&[1u64, 5, 31, 0xfffe0, 0xffff0, 0xfffff]);
                vec![format!("c.lui x{rd}, {imm:#x}")]
            }
            3 => vec![format!("c.addiw x{rd}, {}", rng.below(64) as i64 - 32)],
            4 => vec![format!("c.slli x{rd}, {}", 1 + rng.below(63))],
            5 => {
                let op = *rng.pick(&["c.srli", "c.srai"]);
                vec![format!("{op} x{rdc}, {}", 1 + rng.below(63))]
            }
            6 => vec![format!("c.andi x{rdc}, {}", rng.below(64) as i64 - 32)],
            7 => {
                let op = *rng.pick(&["c.sub", "c.xor", "c.or", "c.and", "c.subw", "c.addw"]);
                vec![format!("{op} x{rdc}, x{rsc}")]
            }
            8 => {
                let op = *rng.pick(&["c.mv", "c.add"]);
                vec![format!("{op} x{rd}, x{}", 1 + rng.below(31))]
            }
            9 => {
                if rng.below(2) == 0 {
                    vec![format!("c.lw x{rdc}, {}(x8)", 4 * rng.below(32))]
                } else {
                    vec![format!("c.ld x{rdc}, {}(x8)", 8 * rng.below(32))]
                }
            }
            10 => {
                if rng.below(2) == 0 {
                    vec![format!("c.sw x{rsc}, {}(x8)", 4 * rng.below(32))]
                } else {
                    vec![format!("c.sd x{rsc}, {}(x8)", 8 * rng.below(32))]
                }
            }
            11 => match rng.below(4) {
                0 => vec![format!("c.lwsp x{rd}, {}(sp)", 4 * rng.below(63))],
                1 => vec![format!("c.ldsp x{rd}, {}(sp)", 8 * rng.below(31))],
                2 => vec![format!("c.swsp x{}, {}(sp)", src(rng), 4 * rng.below(63))],
                _ => vec![format!("c.sdsp x{}, {}(sp)", src(rng), 8 * rng.below(31))],
            },
            12 => {
                *label += 1;
                let l = *label;
                let skipped = format!("c.li x{}, 7", dest(rng));
                match rng.below(3) {
                    0 => vec![format!("c.j L{l}"), skipped, format!("L{l}:")],
                    1 => vec![format!("c.beqz x{rsc}, L{l}"), skipped, format!("L{l}:")],
                    _ => vec![format!("c.bnez x{rsc}, L{l}"), skipped, format!("L{l}:")],
                }
            }
            13 => vec![format!(
                "c.addi4spn x{rdc}, sp, {}",
                4 * (1 + rng.below(255))
            )],
            14 => {
                let n = 16 * (1 + rng.below(31)) as i64;
                vec![
                    format!("c.addi16sp sp, {n}"),
                    format!("c.addi16sp sp, {}", -n),
                ]
            }
            _ => vec!["c.nop".to_string()],
        }
    });
}

#[test]
fn float_and_double_match_qemu_in_every_rounding_mode() {
    const RM: [&str; 6] = ["rne", "rtz", "rdn", "rup", "rmm", "dyn"];
    differential("fp", 5, 150, 40, false, "rv64g", |rng, _| {
        let fmt = *rng.pick(&["s", "d"]);
        let (fd, fa, fb, fc) = (rng.below(32), rng.below(32), rng.below(32), rng.below(32));
        let rm = *rng.pick(&RM);
        let xd = dest(rng);
        let xs = src(rng);
        let other = if fmt == "s" { "d" } else { "s" };
        let line = match rng.below(14) {
            0..=3 => {
                let op = *rng.pick(&["fadd", "fsub", "fmul", "fdiv"]);
                format!("{op}.{fmt} f{fd}, f{fa}, f{fb}, {rm}")
            }
            4 => format!("fsqrt.{fmt} f{fd}, f{fa}, {rm}"),
            5 => {
                let op = *rng.pick(&["fmadd", "fmsub", "fnmsub", "fnmadd"]);
                format!("{op}.{fmt} f{fd}, f{fa}, f{fb}, f{fc}, {rm}")
            }
            6 => {
                let op = *rng.pick(&["fmin", "fmax", "fsgnj", "fsgnjn", "fsgnjx"]);
                format!("{op}.{fmt} f{fd}, f{fa}, f{fb}")
            }
            7 => {
                let op = *rng.pick(&["feq", "flt", "fle"]);
                format!("{op}.{fmt} x{xd}, f{fa}, f{fb}")
            }
            8 => {
                let to = *rng.pick(&["w", "wu", "l", "lu"]);
                format!("fcvt.{to}.{fmt} x{xd}, f{fa}, {rm}")
            }
            9 => {
                let from = *rng.pick(&["w", "wu", "l", "lu"]);
                // Conversions that are always exact take no rounding mode.
                if fmt == "d" && (from == "w" || from == "wu") {
                    format!("fcvt.{fmt}.{from} f{fd}, x{xs}")
                } else {
                    format!("fcvt.{fmt}.{from} f{fd}, x{xs}, {rm}")
                }
            }
            10 => {
                if fmt == "d" {
                    format!("fcvt.d.s f{fd}, f{fa}")
                } else {
                    format!("fcvt.s.{other} f{fd}, f{fa}, {rm}")
                }
            }
            11 => {
                if rng.below(2) == 0 {
                    format!("fclass.{fmt} x{xd}, f{fa}")
                } else if fmt == "s" {
                    format!("fmv.x.w x{xd}, f{fa}")
                } else {
                    format!("fmv.x.d x{xd}, f{fa}")
                }
            }
            12 => {
                if fmt == "s" {
                    format!("fmv.w.x f{fd}, x{xs}")
                } else {
                    format!("fmv.d.x f{fd}, x{xs}")
                }
            }
            _ => {
                let (op, size) = if fmt == "s" { ("flw", 4) } else { ("fld", 8) };
                let off = rng.below(MEM / size) * size;
                if rng.below(2) == 0 {
                    format!("{op} f{fd}, {off}(x8)")
                } else {
                    let st = if fmt == "s" { "fsw" } else { "fsd" };
                    format!("{st} f{fa}, {off}(x8)")
                }
            }
        };
        vec![line]
    });
}
