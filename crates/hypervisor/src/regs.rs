//! Accelerator-neutral x86-64 register types.
//!
//! Both backends (KVM and the software CPU) speak these, so the VMM and the boot code
//! never see `kvm_regs` and friends. The shapes follow the architecture, not any one API.

/// General-purpose registers, RIP and RFLAGS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register with its hidden (descriptor-cache) part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    /// Descriptor type field (4 bits).
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    /// D/B: default operation size (32-bit when set).
    pub db: bool,
    /// S: code/data (set) or system descriptor (clear).
    pub s: bool,
    /// L: 64-bit code segment.
    pub l: bool,
    /// G: limit in 4 KiB units.
    pub g: bool,
    pub avl: bool,
    /// The segment register holds no usable descriptor.
    pub unusable: bool,
}

impl Segment {
    /// A flat 64-bit code segment (CS in long mode).
    pub fn code64(selector: u16) -> Self {
        Segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_: 0xb,
            present: true,
            dpl: 0,
            db: false,
            s: true,
            l: true,
            g: true,
            avl: false,
            unusable: false,
        }
    }

    /// A flat 32-bit code segment (CS in protected mode).
    pub fn code32(selector: u16) -> Self {
        Segment {
            db: true,
            l: false,
            ..Segment::code64(selector)
        }
    }

    /// A flat read/write data segment.
    pub fn data(selector: u16) -> Self {
        Segment {
            type_: 0x3,
            db: true,
            l: false,
            ..Segment::code64(selector)
        }
    }

    /// A 64-bit available TSS.
    pub fn tss64(selector: u16, base: u64, limit: u32) -> Self {
        Segment {
            base,
            limit,
            selector,
            type_: 0xb,
            present: true,
            s: false,
            db: false,
            l: false,
            g: false,
            ..Segment::default()
        }
    }

    /// The 64-bit GDT descriptor encoding of this segment (TSS descriptors take two slots
    /// and are not covered here).
    pub fn gdt_entry(&self) -> u64 {
        let limit = u64::from(self.limit >> if self.g { 12 } else { 0 });
        let mut e = limit & 0xffff;
        e |= (self.base & 0xff_ffff) << 16;
        e |= u64::from(self.type_ & 0xf) << 40;
        e |= u64::from(self.s) << 44;
        e |= u64::from(self.dpl & 3) << 45;
        e |= u64::from(self.present) << 47;
        e |= ((limit >> 16) & 0xf) << 48;
        e |= u64::from(self.avl) << 52;
        e |= u64::from(self.l) << 53;
        e |= u64::from(self.db) << 54;
        e |= u64::from(self.g) << 55;
        e |= ((self.base >> 24) & 0xff) << 56;
        e
    }
}

/// GDTR / IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Segment and control registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sregs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

/// x87/SSE state in the architectural FXSAVE layout (512 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FpuState {
    pub fxsave: [u8; 512],
}

impl Default for FpuState {
    /// The state after FNINIT with MXCSR at its reset value.
    fn default() -> Self {
        let mut fxsave = [0u8; 512];
        fxsave[0..2].copy_from_slice(&0x37fu16.to_le_bytes()); // FCW
        fxsave[24..28].copy_from_slice(&0x1f80u32.to_le_bytes()); // MXCSR
        fxsave[28..32].copy_from_slice(&0xffffu32.to_le_bytes()); // MXCSR_MASK
        FpuState { fxsave }
    }
}

/// The fields of an FXSAVE image, for backends that keep them apart (KVM's `kvm_fpu`,
/// the software CPU's state). ST registers and XMM registers are their 16-byte slots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FxsaveFields {
    pub fcw: u16,
    pub fsw: u16,
    /// The abridged tag byte, as FXSAVE stores it.
    pub ftw: u8,
    pub fop: u16,
    pub fip: u64,
    pub fdp: u64,
    pub mxcsr: u32,
    pub st: [[u8; 16]; 8],
    pub xmm: [[u8; 16]; 16],
}

impl FpuState {
    /// Offsets from the SDM's FXSAVE layout (Vol. 1, 10.5.1).
    pub fn fields(&self) -> FxsaveFields {
        let x = &self.fxsave;
        let mut b8 = [0u8; 8];
        let mut q = |o: usize| {
            b8.copy_from_slice(&x[o..o + 8]);
            u64::from_le_bytes(b8)
        };
        let (fip, fdp) = (q(8), q(16));
        let mut f = FxsaveFields {
            fcw: u16::from_le_bytes([x[0], x[1]]),
            fsw: u16::from_le_bytes([x[2], x[3]]),
            ftw: x[4],
            fop: u16::from_le_bytes([x[6], x[7]]),
            fip,
            fdp,
            mxcsr: u32::from_le_bytes([x[24], x[25], x[26], x[27]]),
            ..FxsaveFields::default()
        };
        for (i, st) in f.st.iter_mut().enumerate() {
            st.copy_from_slice(&x[32 + i * 16..48 + i * 16]);
        }
        for (i, r) in f.xmm.iter_mut().enumerate() {
            r.copy_from_slice(&x[160 + i * 16..176 + i * 16]);
        }
        f
    }

    pub fn from_fields(f: &FxsaveFields) -> Self {
        let mut out = FpuState::default();
        let x = &mut out.fxsave;
        x[0..2].copy_from_slice(&f.fcw.to_le_bytes());
        x[2..4].copy_from_slice(&f.fsw.to_le_bytes());
        x[4] = f.ftw;
        x[6..8].copy_from_slice(&f.fop.to_le_bytes());
        x[8..16].copy_from_slice(&f.fip.to_le_bytes());
        x[16..24].copy_from_slice(&f.fdp.to_le_bytes());
        x[24..28].copy_from_slice(&f.mxcsr.to_le_bytes());
        for (i, st) in f.st.iter().enumerate() {
            x[32 + i * 16..48 + i * 16].copy_from_slice(st);
        }
        for (i, r) in f.xmm.iter().enumerate() {
            x[160 + i * 16..176 + i * 16].copy_from_slice(r);
        }
        out
    }
}

/// One CPUID leaf/subleaf as a guest sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuIdEntry {
    pub function: u32,
    pub index: u32,
    /// The leaf is indexed by ECX (subleaves differ).
    pub significant_index: bool,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// One model-specific register value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsrEntry {
    pub index: u32,
    pub value: u64,
}

/// Architectural bit positions the boot code and backends share.
pub mod bits {
    pub const CR0_PE: u64 = 1 << 0;
    pub const CR0_MP: u64 = 1 << 1;
    pub const CR0_ET: u64 = 1 << 4;
    pub const CR0_NE: u64 = 1 << 5;
    pub const CR0_WP: u64 = 1 << 16;
    pub const CR0_PG: u64 = 1 << 31;
    pub const CR4_PAE: u64 = 1 << 5;
    pub const CR4_PGE: u64 = 1 << 7;
    pub const EFER_SCE: u64 = 1 << 0;
    pub const EFER_LME: u64 = 1 << 8;
    pub const EFER_LMA: u64 = 1 << 10;
    pub const EFER_NXE: u64 = 1 << 11;
    /// Bit 1 of RFLAGS always reads as one.
    pub const RFLAGS_RESERVED: u64 = 1 << 1;
    pub const RFLAGS_IF: u64 = 1 << 9;
    pub const MSR_IA32_APICBASE: u32 = 0x1b;
    pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    pub const MSR_IA32_TSC: u32 = 0x10;
    pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    pub const MSR_STAR: u32 = 0xc000_0081;
    pub const MSR_LSTAR: u32 = 0xc000_0082;
    pub const MSR_CSTAR: u32 = 0xc000_0083;
    pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    pub const MSR_IA32_CR_PAT: u32 = 0x277;
    /// MISC_ENABLE bit 0: fast strings (Linux checks it before using `rep movsb`).
    pub const MISC_ENABLE_FAST_STRING: u64 = 1;
    /// The APIC-base MSR value at reset for the bootstrap processor.
    pub const APIC_BASE_DEFAULT_BSP: u64 = 0xfee0_0000 | (1 << 11) | (1 << 8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fxsave_fields_round_trip() {
        let mut f = FpuState::default().fields();
        assert_eq!((f.fcw, f.mxcsr), (0x37f, 0x1f80));
        f.fip = 0x1122_3344_5566_7788;
        f.st[7][9] = 0x40;
        f.xmm[15][0] = 0xab;
        let back = FpuState::from_fields(&f);
        assert_eq!(back.fields(), f);
        assert_eq!(back.fxsave[160 + 15 * 16], 0xab);
    }

    #[test]
    fn flat_code64_descriptor_matches_the_well_known_encoding() {
        // 0x00af9b000000ffff is the classic flat 64-bit kernel code descriptor.
        assert_eq!(Segment::code64(0x10).gdt_entry(), 0x00af_9b00_0000_ffff);
        assert_eq!(Segment::data(0x18).gdt_entry(), 0x00cf_9300_0000_ffff);
        assert_eq!(Segment::code32(0x8).gdt_entry(), 0x00cf_9b00_0000_ffff);
    }
}
