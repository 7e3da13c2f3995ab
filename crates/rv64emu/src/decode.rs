//! Decoding: a 16- or 32-bit instruction word into an [`Insn`] the executor runs
//! without looking at bits again. Compressed instructions decode straight to the `Insn`
//! of the instruction they expand to.

/// What an instruction does; operands live in [`Insn`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Illegal,
    Lui,
    Auipc,
    Jal,
    Jalr,
    Beq,
    Bne,
    Blt,
    Bge,
    Bltu,
    Bgeu,
    Lb,
    Lh,
    Lw,
    Ld,
    Lbu,
    Lhu,
    Lwu,
    Sb,
    Sh,
    Sw,
    Sd,
    Addi,
    Slti,
    Sltiu,
    Xori,
    Ori,
    Andi,
    Slli,
    Srli,
    Srai,
    Add,
    Sub,
    Sll,
    Slt,
    Sltu,
    Xor,
    Srl,
    Sra,
    Or,
    And,
    Addiw,
    Slliw,
    Srliw,
    Sraiw,
    Addw,
    Subw,
    Sllw,
    Srlw,
    Sraw,
    Mul,
    Mulh,
    Mulhsu,
    Mulhu,
    Div,
    Divu,
    Rem,
    Remu,
    Mulw,
    Divw,
    Divuw,
    Remw,
    Remuw,
    /// LR.W/LR.D; `funct` holds the width in bytes.
    Lr,
    /// SC.W/SC.D; `funct` holds the width in bytes.
    Sc,
    /// An AMO: `funct` is funct5, `imm` the width in bytes.
    Amo,
    Fence,
    FenceI,
    Ecall,
    Ebreak,
    Mret,
    Sret,
    Wfi,
    SfenceVma,
    /// CSRRW/S/C: `funct` is 1, 2, 3; CSRRWI/SI/CI: 5, 6, 7 (rs1 is the immediate).
    Csr,
    /// Loads and stores of FP registers: `funct` is the width in bytes.
    FLoad,
    FStore,
    /// An F/D computation: `funct` is funct7, `imm` holds funct3 (rm) and the rs2 field
    /// as (rs2 << 3) | rm, for the executor's own dispatch.
    FOp,
    /// FMADD/FMSUB/FNMSUB/FNMADD: `funct` is 0..=3 in that order, `imm` is fmt<<3|rm.
    FFused,
}

/// A decoded instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub op: Op,
    pub rd: u8,
    pub rs1: u8,
    pub rs2: u8,
    pub rs3: u8,
    pub funct: u8,
    /// Length in bytes: 2 or 4.
    pub len: u8,
    pub imm: i64,
    /// The raw word, for `mtval` on an illegal instruction.
    pub raw: u32,
    /// Byte offset from its block's first instruction and its index in the block: the
    /// run loop keeps `pc` and `instret` at the block's start while the block runs and
    /// derives each instruction's own from these (0 outside a block).
    pub off: u16,
    pub idx: u8,
}

impl Insn {
    fn new(op: Op, raw: u32, len: u8) -> Self {
        Insn {
            op,
            rd: 0,
            rs1: 0,
            rs2: 0,
            rs3: 0,
            funct: 0,
            len,
            imm: 0,
            raw,
            off: 0,
            idx: 0,
        }
    }

    fn illegal(raw: u32, len: u8) -> Self {
        Insn::new(Op::Illegal, raw, len)
    }

    /// Whether this instruction ends a decoded block: it may change the PC, the
    /// privilege, translation or the code itself.
    pub fn ends_block(&self) -> bool {
        use Op::*;
        matches!(
            self.op,
            Illegal | Jal | Jalr | FenceI | Ecall | Ebreak | Mret | Sret | Wfi | SfenceVma | Csr
        )
    }
}

/// Whether a halfword starts a 32-bit instruction (vs. a compressed one).
#[inline]
pub fn is_32bit(lo: u16) -> bool {
    lo & 3 == 3
}

fn bits(x: u32, hi: u32, lo: u32) -> u32 {
    (x >> lo) & ((1u32 << (hi - lo + 1)) - 1)
}

fn sext(x: u64, width: u32) -> i64 {
    let s = 64 - width;
    ((x << s) as i64) >> s
}

/// Decodes a 32-bit instruction.
pub fn decode32(w: u32) -> Insn {
    let opcode = w & 0x7f;
    let rd = bits(w, 11, 7) as u8;
    let rs1 = bits(w, 19, 15) as u8;
    let rs2 = bits(w, 24, 20) as u8;
    let f3 = bits(w, 14, 12);
    let f7 = bits(w, 31, 25);
    let imm_i = sext((w >> 20) as u64, 12);
    let imm_s = sext(((f7 << 5) | rd as u32) as u64, 12);
    let imm_b = sext(
        ((bits(w, 31, 31) << 12)
            | (bits(w, 7, 7) << 11)
            | (bits(w, 30, 25) << 5)
            | (bits(w, 11, 8) << 1)) as u64,
        13,
    );
    let imm_u = (w & 0xffff_f000) as i32 as i64;
    let imm_j = sext(
        ((bits(w, 31, 31) << 20)
            | (bits(w, 19, 12) << 12)
            | (bits(w, 20, 20) << 11)
            | (bits(w, 30, 21) << 1)) as u64,
        21,
    );
    let mut i = Insn::new(Op::Illegal, w, 4);
    i.rd = rd;
    i.rs1 = rs1;
    i.rs2 = rs2;
    use Op::*;
    match opcode {
        0x37 => {
            i.op = Lui;
            i.imm = imm_u;
        }
        0x17 => {
            i.op = Auipc;
            i.imm = imm_u;
        }
        0x6f => {
            i.op = Jal;
            i.imm = imm_j;
        }
        0x67 if f3 == 0 => {
            i.op = Jalr;
            i.imm = imm_i;
        }
        0x63 => {
            i.op = match f3 {
                0 => Beq,
                1 => Bne,
                4 => Blt,
                5 => Bge,
                6 => Bltu,
                7 => Bgeu,
                _ => return Insn::illegal(w, 4),
            };
            i.imm = imm_b;
        }
        0x03 => {
            i.op = match f3 {
                0 => Lb,
                1 => Lh,
                2 => Lw,
                3 => Ld,
                4 => Lbu,
                5 => Lhu,
                6 => Lwu,
                _ => return Insn::illegal(w, 4),
            };
            i.imm = imm_i;
        }
        0x23 => {
            i.op = match f3 {
                0 => Sb,
                1 => Sh,
                2 => Sw,
                3 => Sd,
                _ => return Insn::illegal(w, 4),
            };
            i.imm = imm_s;
        }
        0x13 => {
            i.imm = imm_i;
            i.op = match f3 {
                0 => Addi,
                2 => Slti,
                3 => Sltiu,
                4 => Xori,
                6 => Ori,
                7 => Andi,
                1 if f7 >> 1 == 0 => Slli,
                5 if f7 >> 1 == 0 => Srli,
                5 if f7 >> 1 == 0x10 => Srai,
                _ => return Insn::illegal(w, 4),
            };
            if matches!(i.op, Slli | Srli | Srai) {
                i.imm = bits(w, 25, 20) as i64;
            }
        }
        0x1b => {
            i.op = match (f3, f7) {
                (0, _) => Addiw,
                (1, 0) => Slliw,
                (5, 0) => Srliw,
                (5, 0x20) => Sraiw,
                _ => return Insn::illegal(w, 4),
            };
            i.imm = if f3 == 0 { imm_i } else { rs2 as i64 };
        }
        0x33 => {
            i.op = match (f7, f3) {
                (0, 0) => Add,
                (0x20, 0) => Sub,
                (0, 1) => Sll,
                (0, 2) => Slt,
                (0, 3) => Sltu,
                (0, 4) => Xor,
                (0, 5) => Srl,
                (0x20, 5) => Sra,
                (0, 6) => Or,
                (0, 7) => And,
                (1, 0) => Mul,
                (1, 1) => Mulh,
                (1, 2) => Mulhsu,
                (1, 3) => Mulhu,
                (1, 4) => Div,
                (1, 5) => Divu,
                (1, 6) => Rem,
                (1, 7) => Remu,
                _ => return Insn::illegal(w, 4),
            };
        }
        0x3b => {
            i.op = match (f7, f3) {
                (0, 0) => Addw,
                (0x20, 0) => Subw,
                (0, 1) => Sllw,
                (0, 5) => Srlw,
                (0x20, 5) => Sraw,
                (1, 0) => Mulw,
                (1, 4) => Divw,
                (1, 5) => Divuw,
                (1, 6) => Remw,
                (1, 7) => Remuw,
                _ => return Insn::illegal(w, 4),
            };
        }
        0x2f => {
            let width = match f3 {
                2 => 4,
                3 => 8,
                _ => return Insn::illegal(w, 4),
            };
            let f5 = f7 >> 2;
            match f5 {
                0b00010 if rs2 == 0 => {
                    i.op = Lr;
                    i.funct = width;
                }
                0b00011 => {
                    i.op = Sc;
                    i.funct = width;
                }
                0b00001 | 0b00000 | 0b00100 | 0b01100 | 0b01000 | 0b10000 | 0b10100 | 0b11000
                | 0b11100 => {
                    i.op = Amo;
                    i.funct = f5 as u8;
                    i.imm = width as i64;
                }
                _ => return Insn::illegal(w, 4),
            }
        }
        0x0f => {
            i.op = match f3 {
                0 => Fence,
                1 => FenceI,
                _ => return Insn::illegal(w, 4),
            };
        }
        0x73 => match f3 {
            0 => {
                i.op = match (w >> 20, rs1, rd) {
                    (0x000, 0, 0) => Ecall,
                    (0x001, 0, 0) => Ebreak,
                    (0x302, 0, 0) => Mret,
                    (0x102, 0, 0) => Sret,
                    (0x105, 0, 0) => Wfi,
                    _ if f7 == 0x09 && rd == 0 => SfenceVma,
                    _ => return Insn::illegal(w, 4),
                };
            }
            1..=3 | 5..=7 => {
                i.op = Csr;
                i.funct = f3 as u8;
                i.imm = (w >> 20) as i64;
            }
            _ => return Insn::illegal(w, 4),
        },
        0x07 => {
            let width = match f3 {
                2 => 4,
                3 => 8,
                _ => return Insn::illegal(w, 4),
            };
            i.op = FLoad;
            i.funct = width;
            i.imm = imm_i;
        }
        0x27 => {
            let width = match f3 {
                2 => 4,
                3 => 8,
                _ => return Insn::illegal(w, 4),
            };
            i.op = FStore;
            i.funct = width;
            i.imm = imm_s;
        }
        0x43 | 0x47 | 0x4b | 0x4f => {
            let fmt = f7 & 3;
            if fmt > 1 {
                return Insn::illegal(w, 4);
            }
            i.op = FFused;
            i.funct = ((opcode >> 2) & 3) as u8;
            i.rs3 = (f7 >> 2) as u8;
            i.imm = ((fmt << 3) | f3) as i64;
        }
        0x53 => {
            i.op = FOp;
            i.funct = f7 as u8;
            i.imm = ((rs2 << 3) as u32 | f3) as i64;
        }
        _ => return Insn::illegal(w, 4),
    }
    i
}

/// Decodes a compressed (16-bit) instruction.
pub fn decode16(h: u16) -> Insn {
    let w = h as u32;
    let q = w & 3;
    let f3 = bits(w, 15, 13);
    let rd = bits(w, 11, 7) as u8;
    let rs2 = bits(w, 6, 2) as u8;
    let rdp = (bits(w, 4, 2) + 8) as u8;
    let rs1p = (bits(w, 9, 7) + 8) as u8;
    let mut i = Insn::new(Op::Illegal, w, 2);
    let ill = Insn::illegal(w, 2);
    use Op::*;
    // Offsets of the load/store forms, scaled as the spec lays their bits out.
    let uimm_w = (bits(w, 12, 10) << 3) | (bits(w, 6, 6) << 2) | (bits(w, 5, 5) << 6);
    let uimm_d = (bits(w, 12, 10) << 3) | (bits(w, 6, 5) << 6);
    let imm6 = sext(((bits(w, 12, 12) << 5) | bits(w, 6, 2)) as u64, 6);
    match (q, f3) {
        (0, 0) => {
            let nz = (bits(w, 12, 11) << 4)
                | (bits(w, 10, 7) << 6)
                | (bits(w, 6, 6) << 2)
                | (bits(w, 5, 5) << 3);
            if nz == 0 {
                return ill;
            }
            i.op = Addi;
            i.rd = rdp;
            i.rs1 = 2;
            i.imm = nz as i64;
        }
        (0, 1) | (0, 3) => {
            i.op = if f3 == 1 { FLoad } else { Ld };
            i.funct = 8;
            i.rd = rdp;
            i.rs1 = rs1p;
            i.imm = uimm_d as i64;
        }
        (0, 2) => {
            i.op = Lw;
            i.rd = rdp;
            i.rs1 = rs1p;
            i.imm = uimm_w as i64;
        }
        (0, 5) | (0, 7) => {
            i.op = if f3 == 5 { FStore } else { Sd };
            i.funct = 8;
            i.rs1 = rs1p;
            i.rs2 = rdp;
            i.imm = uimm_d as i64;
        }
        (0, 6) => {
            i.op = Sw;
            i.rs1 = rs1p;
            i.rs2 = rdp;
            i.imm = uimm_w as i64;
        }
        (1, 0) => {
            i.op = Addi;
            i.rd = rd;
            i.rs1 = rd;
            i.imm = imm6;
        }
        (1, 1) => {
            if rd == 0 {
                return ill;
            }
            i.op = Addiw;
            i.rd = rd;
            i.rs1 = rd;
            i.imm = imm6;
        }
        (1, 2) => {
            i.op = Addi;
            i.rd = rd;
            i.rs1 = 0;
            i.imm = imm6;
        }
        (1, 3) => {
            if rd == 2 {
                let nz = (bits(w, 12, 12) << 9)
                    | (bits(w, 6, 6) << 4)
                    | (bits(w, 5, 5) << 6)
                    | (bits(w, 4, 3) << 7)
                    | (bits(w, 2, 2) << 5);
                if nz == 0 {
                    return ill;
                }
                i.op = Addi;
                i.rd = 2;
                i.rs1 = 2;
                i.imm = sext(nz as u64, 10);
            } else {
                if imm6 == 0 {
                    return ill;
                }
                i.op = Lui;
                i.rd = rd;
                i.imm = imm6 << 12;
            }
        }
        (1, 4) => {
            i.rd = rs1p;
            i.rs1 = rs1p;
            let shamt = ((bits(w, 12, 12) << 5) | bits(w, 6, 2)) as i64;
            match bits(w, 11, 10) {
                0 => {
                    i.op = Srli;
                    i.imm = shamt;
                }
                1 => {
                    i.op = Srai;
                    i.imm = shamt;
                }
                2 => {
                    i.op = Andi;
                    i.imm = imm6;
                }
                _ => {
                    i.rs2 = rdp;
                    i.op = match (bits(w, 12, 12), bits(w, 6, 5)) {
                        (0, 0) => Sub,
                        (0, 1) => Xor,
                        (0, 2) => Or,
                        (0, 3) => And,
                        (1, 0) => Subw,
                        (1, 1) => Addw,
                        _ => return ill,
                    };
                }
            }
        }
        (1, 5) => {
            i.op = Jal;
            i.rd = 0;
            i.imm = sext(
                ((bits(w, 12, 12) << 11)
                    | (bits(w, 11, 11) << 4)
                    | (bits(w, 10, 9) << 8)
                    | (bits(w, 8, 8) << 10)
                    | (bits(w, 7, 7) << 6)
                    | (bits(w, 6, 6) << 7)
                    | (bits(w, 5, 3) << 1)
                    | (bits(w, 2, 2) << 5)) as u64,
                12,
            );
        }
        (1, 6) | (1, 7) => {
            i.op = if f3 == 6 { Beq } else { Bne };
            i.rs1 = rs1p;
            i.rs2 = 0;
            i.imm = sext(
                ((bits(w, 12, 12) << 8)
                    | (bits(w, 11, 10) << 3)
                    | (bits(w, 6, 5) << 6)
                    | (bits(w, 4, 3) << 1)
                    | (bits(w, 2, 2) << 5)) as u64,
                9,
            );
        }
        (2, 0) => {
            i.op = Slli;
            i.rd = rd;
            i.rs1 = rd;
            i.imm = ((bits(w, 12, 12) << 5) | bits(w, 6, 2)) as i64;
        }
        (2, 1) | (2, 3) => {
            if f3 == 3 && rd == 0 {
                return ill;
            }
            i.op = if f3 == 1 { FLoad } else { Ld };
            i.funct = 8;
            i.rd = rd;
            i.rs1 = 2;
            i.imm = ((bits(w, 12, 12) << 5) | (bits(w, 6, 5) << 3) | (bits(w, 4, 2) << 6)) as i64;
        }
        (2, 2) => {
            if rd == 0 {
                return ill;
            }
            i.op = Lw;
            i.rd = rd;
            i.rs1 = 2;
            i.imm = ((bits(w, 12, 12) << 5) | (bits(w, 6, 4) << 2) | (bits(w, 3, 2) << 6)) as i64;
        }
        (2, 4) => {
            let hi = bits(w, 12, 12);
            match (hi, rd, rs2) {
                (0, 0, 0) => return ill,
                (0, _, 0) => {
                    i.op = Jalr;
                    i.rd = 0;
                    i.rs1 = rd;
                }
                (0, _, _) => {
                    i.op = Add;
                    i.rd = rd;
                    i.rs1 = 0;
                    i.rs2 = rs2;
                }
                (_, 0, 0) => i.op = Ebreak,
                (_, _, 0) => {
                    i.op = Jalr;
                    i.rd = 1;
                    i.rs1 = rd;
                }
                _ => {
                    i.op = Add;
                    i.rd = rd;
                    i.rs1 = rd;
                    i.rs2 = rs2;
                }
            }
        }
        (2, 5) | (2, 7) => {
            i.op = if f3 == 5 { FStore } else { Sd };
            i.funct = 8;
            i.rs1 = 2;
            i.rs2 = rs2;
            i.imm = ((bits(w, 12, 10) << 3) | (bits(w, 9, 7) << 6)) as i64;
        }
        (2, 6) => {
            i.op = Sw;
            i.rs1 = 2;
            i.rs2 = rs2;
            i.imm = ((bits(w, 12, 9) << 2) | (bits(w, 8, 7) << 6)) as i64;
        }
        _ => return ill,
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_addi_and_a_negative_branch() {
        // addi a0, a1, -1
        let i = decode32(0xfff5_8513);
        assert_eq!((i.op, i.rd, i.rs1, i.imm), (Op::Addi, 10, 11, -1));
        // beq zero, zero, -4
        let b = decode32(0xfe00_0ee3);
        assert_eq!((b.op, b.imm), (Op::Beq, -4));
    }

    #[test]
    fn compressed_forms_expand() {
        // c.addi16sp sp, -64 = 0x7139
        let i = decode16(0x7139);
        assert_eq!((i.op, i.rd, i.rs1, i.imm, i.len), (Op::Addi, 2, 2, -64, 2));
        // c.ldsp ra, 8(sp) = 0x60a2
        let l = decode16(0x60a2);
        assert_eq!((l.op, l.rd, l.rs1, l.imm), (Op::Ld, 1, 2, 8));
        // all-zero halfword is illegal
        assert_eq!(decode16(0).op, Op::Illegal);
    }
}
