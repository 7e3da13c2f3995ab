//! Places the emitter's instructions in memory, encoding each one once.
//!
//! iced's `BlockEncoder` (behind `CodeAssembler::assemble`) handles any instruction stream:
//! it boxes every instruction and encodes each several times while it settles branch
//! sizes, which made it most of what compiling a block cost. The emitter's streams are
//! simple: branches go to labels or to nothing else, and the only position-dependent
//! operands besides them are RIP-relative references to labels. So each other instruction
//! is encoded once (its bytes do not depend on where it lands), branch sizes are picked
//! from a layout in which every branch is long (where a target is near even then, it is
//! nearer once branches shrink), and then the bytes are laid out and the branches and
//! label references patched.
//!
//! `CodeAssembler`'s conventions, which this relies on: a labelled instruction carries its
//! label's id as its IP (0: no label), a branch to a label carries the id as its target,
//! and a memory operand naming a label is RIP-based with the id as its displacement. Label
//! ids count from 1 and there are fewer than instructions; a branch target above that is
//! an address (code shared by all blocks; addresses below 64 KiB are never mapped). A
//! RIP-based displacement of `PRIVATE` or more names a field of the block's record (see
//! `emit::RECORD_SLOT`), `Asm::record_at` bytes past the block's start.

use iced_x86::{Code, Encoder, FlowControl, Instruction, OpKind};

/// How a branch to a label is encoded.
#[derive(Clone, Copy)]
enum Branch {
    Jmp,
    /// The condition's number in the opcode (`Jcc` = 0x70 + n short, 0F 80 + n near).
    Jcc(u8),
    /// JRCXZ has only a short form: a far target is reached through a JMP after it.
    Jrcxz,
}

impl Branch {
    fn of(ins: &Instruction) -> Option<Self> {
        match ins.flow_control() {
            FlowControl::UnconditionalBranch if ins.op0_kind() == OpKind::NearBranch64 => {
                Some(Branch::Jmp)
            }
            FlowControl::ConditionalBranch if ins.code() == Code::Jrcxz_rel8_64 => {
                Some(Branch::Jrcxz)
            }
            FlowControl::ConditionalBranch if ins.op0_kind() == OpKind::NearBranch64 => {
                let cc = ins.condition_code() as u8;
                (1..=16).contains(&cc).then(|| Branch::Jcc(cc - 1))
            }
            _ => None,
        }
    }

    /// Bytes for the short form, or the long one.
    fn len(self, short: bool) -> u32 {
        match (self, short) {
            (_, true) => 2,
            (Branch::Jmp, false) => 5,
            (Branch::Jcc(_), false) => 6,
            // JRCXZ over a short JMP to a near JMP.
            (Branch::Jrcxz, false) => 9,
        }
    }
}

/// One instruction's place in the output.
#[derive(Clone, Copy)]
enum Piece {
    /// Bytes encoded once (at `scratch[start..start + len]`); `disp` is the offset in them of
    /// a RIP-relative displacement to patch for the label `target`, when there is one.
    Bytes {
        start: u32,
        len: u32,
        disp: Option<(u32, u64)>,
    },
    Branch {
        kind: Branch,
        target: u64,
        short: bool,
    },
}

/// Reusable buffers (an assembler per CPU's compiler).
pub(crate) struct Asm {
    encoder: Encoder,
    scratch: Vec<u8>,
    pieces: Vec<Piece>,
    offsets: Vec<u32>,
    /// Label id → index of the instruction it labels (+1; 0: none).
    labels: Vec<u32>,
    /// How far past the start of the block being assembled its record lies.
    pub(crate) record_at: usize,
}

impl std::fmt::Debug for Asm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Asm").finish_non_exhaustive()
    }
}

impl Asm {
    pub(crate) fn new() -> Option<Self> {
        Some(Asm {
            encoder: Encoder::try_new(64).ok()?,
            scratch: Vec::new(),
            pieces: Vec::new(),
            offsets: Vec::new(),
            labels: Vec::new(),
            record_at: 0,
        })
    }

    /// Encodes `instrs` (from a 64-bit `CodeAssembler`) into `out`, to be placed at `at`.
    /// Returns the offset of each instruction in `out` (plus the end);
    /// None for what this does not handle (a compiler bug, never guest input).
    pub(crate) fn assemble(
        &mut self,
        instrs: &[Instruction],
        at: u64,
        out: &mut Vec<u8>,
    ) -> Option<&[u32]> {
        self.scratch.clear();
        self.pieces.clear();
        self.labels.clear();
        for (i, ins) in instrs.iter().enumerate() {
            let id = ins.ip() as usize;
            if id != 0 {
                // Ids count labels: more than instructions means an IP that is no label.
                if id > instrs.len() {
                    return None;
                }
                if self.labels.len() <= id {
                    self.labels.resize(id + 1, 0);
                }
                *self.labels.get_mut(id)? = i as u32 + 1;
            }
        }
        // Encode everything but the branches; lay out with long branches.
        let mut long_offsets = std::mem::take(&mut self.offsets);
        long_offsets.clear();
        let mut pos = 0u32;
        for ins in instrs {
            long_offsets.push(pos);
            let piece = if let Some(kind) = Branch::of(ins) {
                Piece::Branch {
                    kind,
                    target: ins.near_branch_target(),
                    short: false,
                }
            } else {
                self.encode(ins)?
            };
            pos += match piece {
                Piece::Bytes { len, .. } => len,
                Piece::Branch { kind, .. } => kind.len(false),
            };
            self.pieces.push(piece);
        }
        long_offsets.push(pos);
        // Shorten the branches whose target is near in the long layout.
        for (i, piece) in self.pieces.iter_mut().enumerate() {
            if let Piece::Branch { target, short, .. } = piece {
                let Some(l) = label_index(&self.labels, *target) else {
                    continue; // an address
                };
                let t = *long_offsets.get(l)? as i64;
                let d = t - *long_offsets.get(i)? as i64;
                *short = (-100..=100).contains(&d);
            }
        }
        // The final layout.
        let mut offsets = long_offsets;
        offsets.clear();
        let mut pos = 0u32;
        for piece in &self.pieces {
            offsets.push(pos);
            pos += match *piece {
                Piece::Bytes { len, .. } => len,
                Piece::Branch { kind, short, .. } => kind.len(short),
            };
        }
        offsets.push(pos);
        out.clear();
        out.reserve(pos as usize);
        for (i, piece) in self.pieces.iter().enumerate() {
            let here = *offsets.get(i)? as i64;
            match *piece {
                Piece::Bytes { start, len, disp } => {
                    let bytes = self.scratch.get(start as usize..(start + len) as usize)?;
                    let from = out.len();
                    out.extend_from_slice(bytes);
                    if let Some((at_byte, target)) = disp {
                        let t = match target.checked_sub(PRIVATE) {
                            Some(field) => (self.record_at as u64 + field) as i64,
                            None => *offsets.get(label_index(&self.labels, target)?)? as i64,
                        };
                        let rel = i32::try_from(t - (here + len as i64)).ok()?;
                        out.get_mut(from + at_byte as usize..from + at_byte as usize + 4)?
                            .copy_from_slice(&rel.to_le_bytes());
                    }
                }
                Piece::Branch {
                    kind,
                    target,
                    short,
                } => {
                    let end = here + kind.len(short) as i64;
                    let rel = match label_index(&self.labels, target) {
                        Some(l) => *offsets.get(l)? as i64 - end,
                        None if target >= MIN_ADDRESS => {
                            (target as i64).wrapping_sub(at as i64).wrapping_sub(end)
                        }
                        None => return None,
                    };
                    if short {
                        let r8 = i8::try_from(rel).ok()? as u8;
                        out.extend_from_slice(&match kind {
                            Branch::Jmp => [0xeb, r8],
                            Branch::Jcc(cc) => [0x70 + cc, r8],
                            Branch::Jrcxz => [0xe3, r8],
                        });
                    } else {
                        let r32 = i32::try_from(rel).ok()?.to_le_bytes();
                        match kind {
                            Branch::Jmp => out.push(0xe9),
                            Branch::Jcc(cc) => out.extend_from_slice(&[0x0f, 0x80 + cc]),
                            // jrcxz +2; jmp short +5; jmp near target.
                            Branch::Jrcxz => out.extend_from_slice(&[0xe3, 0x02, 0xeb, 0x05, 0xe9]),
                        }
                        out.extend_from_slice(&r32);
                    }
                }
            }
        }
        self.offsets = offsets;
        Some(&self.offsets)
    }

    /// Encodes a position-independent instruction (or one whose only dependence on its
    /// position is a RIP-relative label reference) into the scratch buffer.
    fn encode(&mut self, ins: &Instruction) -> Option<Piece> {
        let start = self.scratch.len() as u32;
        if ins.code() == Code::DeclareQword {
            for i in 0..ins.declare_data_len() {
                self.scratch
                    .extend_from_slice(&ins.get_declare_qword_value(i).to_le_bytes());
            }
            let len = self.scratch.len() as u32 - start;
            return Some(Piece::Bytes {
                start,
                len,
                disp: None,
            });
        }
        // A relative branch or call is position-dependent (the label ones are `Branch`es).
        if matches!(
            ins.op0_kind(),
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
        ) {
            return None;
        }
        let rip_label = ins.is_ip_rel_memory_operand();
        // `mov r64, imm` of a constant below 2^32 is 10 bytes; `mov r32, imm32` does the
        // same (it zero-extends) in 5 or 6. The emitter loads many small constants.
        let short;
        let ins = match ins.code() {
            Code::Mov_r64_imm64 if ins.immediate64() <= u64::from(u32::MAX) => {
                let r32 = iced_x86::Register::try_from(
                    ins.op0_register() as usize - iced_x86::Register::RAX as usize
                        + iced_x86::Register::EAX as usize,
                )
                .ok()?;
                let mut m =
                    Instruction::with2(Code::Mov_r32_imm32, r32, ins.immediate64() as u32).ok()?;
                // A label's id rides in the IP.
                m.set_ip(ins.ip());
                short = m;
                &short
            }
            _ => ins,
        };
        // Encoded at 0: a label reference gets a displacement we overwrite.
        let len = self.encoder.encode(ins, 0).ok()? as u32;
        let disp = if rip_label {
            let c = self.encoder.get_constant_offsets();
            if c.displacement_size() != 4 {
                return None;
            }
            Some((c.displacement_offset() as u32, ins.memory_displacement64()))
        } else {
            None
        };
        let mut bytes = self.encoder.take_buffer();
        if bytes.len() != len as usize {
            return None;
        }
        self.scratch.extend_from_slice(&bytes);
        bytes.clear();
        self.encoder.set_buffer(bytes);
        Some(Piece::Bytes { start, len, disp })
    }
}

/// Where a branch target is an address rather than a label id.
const MIN_ADDRESS: u64 = 0x1_0000;

/// Where a RIP-based displacement names a field of the block's record instead of a label
/// (small enough to encode at IP 0, far above any label id).
pub(super) const PRIVATE: u64 = 1 << 30;

/// The index of the instruction a label (by id) stands at.
fn label_index(labels: &[u32], id: u64) -> Option<usize> {
    let i = *labels.get(usize::try_from(id).ok()?)?;
    i.checked_sub(1).map(|i| i as usize)
}
