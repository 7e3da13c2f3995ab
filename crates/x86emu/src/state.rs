//! Architectural CPU state: everything a snapshot or the VMM's register getters need.

/// RFLAGS bits.
pub mod flags {
    pub const CF: u64 = 1 << 0;
    pub const FIXED1: u64 = 1 << 1;
    pub const PF: u64 = 1 << 2;
    pub const AF: u64 = 1 << 4;
    pub const ZF: u64 = 1 << 6;
    pub const SF: u64 = 1 << 7;
    pub const TF: u64 = 1 << 8;
    pub const IF: u64 = 1 << 9;
    pub const DF: u64 = 1 << 10;
    pub const OF: u64 = 1 << 11;
    pub const IOPL: u64 = 3 << 12;
    pub const NT: u64 = 1 << 14;
    pub const RF: u64 = 1 << 16;
    pub const VM: u64 = 1 << 17;
    pub const AC: u64 = 1 << 18;
    pub const VIF: u64 = 1 << 19;
    pub const VIP: u64 = 1 << 20;
    pub const ID: u64 = 1 << 21;
    /// The six arithmetic status flags.
    pub const STATUS: u64 = CF | PF | AF | ZF | SF | OF;
    /// Bits software may change with POPF at CPL0 (VM/VIF/VIP are not emulated).
    pub const WRITABLE: u64 = STATUS | TF | IF | DF | IOPL | NT | RF | AC | ID;
}

/// Control register bits.
pub mod cr {
    pub const CR0_PE: u64 = 1 << 0;
    pub const CR0_MP: u64 = 1 << 1;
    pub const CR0_EM: u64 = 1 << 2;
    pub const CR0_TS: u64 = 1 << 3;
    pub const CR0_ET: u64 = 1 << 4;
    pub const CR0_NE: u64 = 1 << 5;
    pub const CR0_WP: u64 = 1 << 16;
    pub const CR0_AM: u64 = 1 << 18;
    pub const CR0_NW: u64 = 1 << 29;
    pub const CR0_CD: u64 = 1 << 30;
    pub const CR0_PG: u64 = 1 << 31;
    pub const CR4_VME: u64 = 1 << 0;
    pub const CR4_PVI: u64 = 1 << 1;
    pub const CR4_TSD: u64 = 1 << 2;
    pub const CR4_DE: u64 = 1 << 3;
    pub const CR4_PSE: u64 = 1 << 4;
    pub const CR4_PAE: u64 = 1 << 5;
    pub const CR4_MCE: u64 = 1 << 6;
    pub const CR4_PGE: u64 = 1 << 7;
    pub const CR4_PCE: u64 = 1 << 8;
    pub const CR4_OSFXSR: u64 = 1 << 9;
    pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
    pub const CR4_OSXSAVE: u64 = 1 << 18;
    pub const CR4_UMIP: u64 = 1 << 11;
    pub const CR4_FSGSBASE: u64 = 1 << 16;
    /// CR4 bits the emulator accepts; setting any other bit raises #GP.
    pub const CR4_SUPPORTED: u64 = CR4_VME
        | CR4_PVI
        | CR4_TSD
        | CR4_DE
        | CR4_PSE
        | CR4_PAE
        | CR4_MCE
        | CR4_PGE
        | CR4_PCE
        | CR4_OSFXSR
        | CR4_OSXMMEXCPT;
    pub const EFER_SCE: u64 = 1 << 0;
    pub const EFER_LME: u64 = 1 << 8;
    pub const EFER_LMA: u64 = 1 << 10;
    pub const EFER_NXE: u64 = 1 << 11;
    pub const EFER_WRITABLE: u64 = EFER_SCE | EFER_LME | EFER_NXE;
}

/// Segment register index, in the order iced-x86 numbers them (ES, CS, SS, DS, FS, GS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seg {
    Es = 0,
    Cs = 1,
    Ss = 2,
    Ds = 3,
    Fs = 4,
    Gs = 5,
}

impl Seg {
    pub const ALL: [Seg; 6] = [Seg::Es, Seg::Cs, Seg::Ss, Seg::Ds, Seg::Fs, Seg::Gs];
}

/// A segment register with its hidden descriptor cache.
///
/// `attr` uses the VMX access-rights layout: type in bits 0-3, S bit 4, DPL bits 5-6,
/// P bit 7, AVL bit 12, L bit 13, D/B bit 14, G bit 15.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    /// Byte-granular limit (already scaled by G).
    pub limit: u32,
    pub attr: u16,
}

impl Segment {
    pub const ATTR_P: u16 = 1 << 7;
    pub const ATTR_S: u16 = 1 << 4;
    pub const ATTR_L: u16 = 1 << 13;
    pub const ATTR_DB: u16 = 1 << 14;
    pub const ATTR_G: u16 = 1 << 15;

    /// Descriptor privilege level.
    pub fn dpl(&self) -> u8 {
        ((self.attr >> 5) & 3) as u8
    }
    pub fn long(&self) -> bool {
        self.attr & Self::ATTR_L != 0
    }
    pub fn default_big(&self) -> bool {
        self.attr & Self::ATTR_DB != 0
    }
    pub fn present(&self) -> bool {
        self.attr & Self::ATTR_P != 0
    }
    /// A real-mode style segment: base = selector * 16, 64 KiB limit.
    pub fn real_mode(selector: u16, code: bool) -> Self {
        Segment {
            selector,
            base: u64::from(selector) << 4,
            limit: 0xffff,
            attr: Self::ATTR_P | Self::ATTR_S | if code { 0xb } else { 0x3 },
        }
    }
    /// Builds the hidden parts from an 8-byte GDT/LDT descriptor.
    pub fn from_descriptor(selector: u16, desc: u64) -> Self {
        let base = ((desc >> 16) & 0xff_ffff) | (((desc >> 56) & 0xff) << 24);
        let raw_limit = ((desc & 0xffff) | (((desc >> 48) & 0xf) << 16)) as u32;
        let attr = (((desc >> 40) & 0xff) | (((desc >> 52) & 0xf) << 12)) as u16;
        let limit = if attr & Self::ATTR_G != 0 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        };
        Segment {
            selector,
            base,
            limit,
            attr,
        }
    }
}

/// GDTR / IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// x87 + SSE state; fields mirror the FXSAVE image so FXSAVE/FXRSTOR are copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FpuState {
    pub fcw: u16,
    pub fsw: u16,
    /// Abridged tag word as FXSAVE stores it: bit i set = ST(i) physical register valid.
    pub ftw: u8,
    pub fop: u16,
    pub fip: u64,
    pub fdp: u64,
    /// 80-bit registers, each in the low 10 bytes of a 16-byte slot.
    #[serde(with = "u128_words")]
    pub st: [u128; 8],
    #[serde(with = "u128_words")]
    pub xmm: [u128; 16],
    pub mxcsr: u32,
    /// Bits 255:128 of YMM0-15 (the AVX state XSAVE keeps beside the legacy area).
    #[serde(with = "u128_words")]
    pub ymm_hi: [u128; 16],
}

impl Default for FpuState {
    fn default() -> Self {
        FpuState {
            fcw: 0x37f,
            fsw: 0,
            ftw: 0,
            fop: 0,
            fip: 0,
            fdp: 0,
            st: [0; 8],
            xmm: [0; 16],
            mxcsr: 0x1f80,
            ymm_hi: [0; 16],
        }
    }
}

/// MSRs that have architectural effect or that Linux reads back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Msrs {
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub pat: u64,
    pub tsc_aux: u64,
    pub apic_base: u64,
    pub misc_enable: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub mtrr_def_type: u64,
    /// IA32_TSC_ADJUST: what software added to this CPU's TSC (writes to either move both).
    /// Absent from snapshots older than the MSR.
    #[serde(default)]
    pub tsc_adjust: u64,
    /// IA32_SPEC_CTRL as the guest wrote it (no-ops here, read back).
    /// Absent from snapshots older than the MSR.
    #[serde(default)]
    pub spec_ctrl: u64,
}

/// The complete architectural register state.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpuState {
    /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15.
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    /// Indexed by [`Seg`].
    pub seg: [Segment; 6],
    pub ldtr: Segment,
    pub tr: Segment,
    pub gdtr: DescriptorTable,
    pub idtr: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    /// XCR0: the state components XSAVE manages and AVX may use (bit 0, x87, always set).
    pub xcr0: u64,
    /// DR0-DR3, DR6 (index 6), DR7 (index 7); 4 and 5 unused.
    pub dr: [u64; 8],
    pub msr: Msrs,
    pub fpu: FpuState,
}

impl Default for CpuState {
    fn default() -> Self {
        Self::reset()
    }
}

impl CpuState {
    /// The power-on / INIT state (SDM Vol. 3 table 10-1): real mode at F000:FFF0.
    pub fn reset() -> Self {
        let mut seg = [Segment::real_mode(0, false); 6];
        seg[Seg::Cs as usize] = Segment {
            selector: 0xf000,
            base: 0xffff_0000,
            limit: 0xffff,
            attr: Segment::ATTR_P | Segment::ATTR_S | 0xb,
        };
        let mut dr = [0; 8];
        dr[6] = 0xffff_0ff0;
        dr[7] = 0x400;
        CpuState {
            gpr: [0; 16],
            rip: 0xfff0,
            rflags: flags::FIXED1,
            seg,
            ldtr: Segment {
                attr: Segment::ATTR_P | 2,
                limit: 0xffff,
                ..Default::default()
            },
            tr: Segment {
                attr: Segment::ATTR_P | 0xb,
                limit: 0xffff,
                ..Default::default()
            },
            gdtr: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            idtr: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            cr0: cr::CR0_ET | cr::CR0_CD | cr::CR0_NW,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            cr8: 0,
            efer: 0,
            xcr0: 1,
            dr,
            msr: Msrs {
                apic_base: 0xfee0_0900,
                pat: 0x0007_0406_0007_0406,
                misc_enable: 1,
                ..Default::default()
            },
            fpu: FpuState::default(),
        }
    }

    /// Long mode active and CS.L set: 64-bit code.
    pub fn in_64bit_mode(&self) -> bool {
        self.efer & cr::EFER_LMA != 0 && self.seg[Seg::Cs as usize].long()
    }

    /// CS, DS, ES and SS are flat: base 0, a 4 GiB limit and (data) expand-up, so that
    /// an offset through any of them is its linear address, never beyond the limit unless
    /// it passes 4 GiB.
    pub fn flat32(&self) -> bool {
        [Seg::Cs, Seg::Ds, Seg::Es, Seg::Ss].iter().all(|&r| {
            let s = &self.seg[r as usize];
            s.base == 0 && s.limit == u32::MAX && s.attr & 0x1c != 0x14
        })
    }

    /// Code size in bits: 16, 32 or 64.
    pub fn bitness(&self) -> u32 {
        if self.cr0 & cr::CR0_PE == 0 {
            // Unreal/big-real mode code still executes with 16-bit defaults unless CS.D is set.
            if self.seg[Seg::Cs as usize].default_big() {
                32
            } else {
                16
            }
        } else if self.in_64bit_mode() {
            64
        } else if self.seg[Seg::Cs as usize].default_big() {
            32
        } else {
            16
        }
    }

    pub fn protected(&self) -> bool {
        self.cr0 & cr::CR0_PE != 0
    }

    /// Current privilege level.
    pub fn cpl(&self) -> u8 {
        if !self.protected() {
            0
        } else {
            self.seg[Seg::Cs as usize].dpl()
        }
    }

    pub fn long_mode_active(&self) -> bool {
        self.efer & cr::EFER_LMA != 0
    }
}

/// 128-bit registers in a snapshot as pairs of 64-bit words (low, high): JSON numbers
/// stop at 64 bits.
mod u128_words {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, const N: usize>(
        v: &[u128; N],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let words: Vec<[u64; 2]> = v.iter().map(|&x| [x as u64, (x >> 64) as u64]).collect();
        words.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<[u128; N], D::Error> {
        let words = Vec::<[u64; 2]>::deserialize(d)?;
        if words.len() != N {
            return Err(D::Error::invalid_length(
                words.len(),
                &"one pair per register",
            ));
        }
        let mut out = [0u128; N];
        for (o, [lo, hi]) in out.iter_mut().zip(words) {
            *o = u128::from(lo) | (u128::from(hi) << 64);
        }
        Ok(out)
    }
}
