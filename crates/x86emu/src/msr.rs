//! Model-specific registers the CPU implements itself. Device MSRs (x2APIC, kvmclock)
//! go to the platform first; anything neither knows raises #GP.

use crate::cpu::Core;
use crate::exceptions::{Fault, Result};
use crate::exec::operand::canonical;
use crate::state::cr::*;
use crate::state::Seg;

pub const TSC: u32 = 0x10;
pub const PLATFORM_ID: u32 = 0x17;
pub const APIC_BASE: u32 = 0x1b;
pub const FEATURE_CONTROL: u32 = 0x3a;
pub const TSC_ADJUST: u32 = 0x3b;
pub const SPEC_CTRL: u32 = 0x48;
pub const PRED_CMD: u32 = 0x49;
pub const BIOS_SIGN_ID: u32 = 0x8b;
pub const MTRRCAP: u32 = 0xfe;
pub const ARCH_CAPABILITIES: u32 = 0x10a;
pub const SYSENTER_CS: u32 = 0x174;
pub const SYSENTER_ESP: u32 = 0x175;
pub const SYSENTER_EIP: u32 = 0x176;
pub const MCG_CAP: u32 = 0x179;
pub const MCG_STATUS: u32 = 0x17a;
pub const MISC_ENABLE: u32 = 0x1a0;
pub const PAT: u32 = 0x277;
pub const MTRR_DEF_TYPE: u32 = 0x2ff;
pub const EFER: u32 = 0xc000_0080;
pub const STAR: u32 = 0xc000_0081;
pub const LSTAR: u32 = 0xc000_0082;
pub const CSTAR: u32 = 0xc000_0083;
pub const SFMASK: u32 = 0xc000_0084;
pub const FS_BASE: u32 = 0xc000_0100;
pub const GS_BASE: u32 = 0xc000_0101;
pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
pub const TSC_AUX: u32 = 0xc000_0103;

/// IA32_ARCH_CAPABILITIES: not affected by Meltdown (RDCL_NO), SSB, MDS, the page-size
/// change machine check, TAA, the MMIO stale-data variants (SBDR/FBSDP/PSDP), GDS, RFDS,
/// or indirect target selection (ITS_NO, bit 62: without it Linux assumes a guest is
/// affected and routes every return through a thunk); enhanced IBRS (IBRS_ALL, bit 1) as
/// the model's silicon has, and no branch history injection (BHI_NO, bit 20). Without
/// those two Linux compiles every indirect call and jump to a retpoline (a call, a store
/// over the return address and a RET, each an indirect lookup here) and clears the branch
/// history on every system call, for speculation that compiled guest code never does
/// across the guest's privilege levels: the JIT's own indirect jumps are the host's.
const ARCH_CAPS: u64 = (1 << 0)
    | (1 << 1)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 8)
    | (1 << 13)
    | (1 << 14)
    | (1 << 15)
    | (1 << 20)
    | (1 << 26)
    | (1 << 27)
    | (1 << 62);

/// IA32_SPEC_CTRL bits CPUID offers: IBRS (leaf 7 EDX bit 26) and BHI_DIS_S (leaf 7
/// subleaf 2 EDX bit 4), both no-ops here.
const SPEC_CTRL_BITS: u64 = 1 | (1 << 10);
/// IA32_PRED_CMD: IBPB, its only command (a barrier nothing here needs).
const PRED_CMD_IBPB: u64 = 1;

impl Core {
    /// RDMSR semantics; None = #GP.
    pub fn read_msr(&self, index: u32) -> Option<u64> {
        let m = &self.s.msr;
        Some(match index {
            TSC => self.tsc(),
            TSC_ADJUST => m.tsc_adjust,
            APIC_BASE => m.apic_base,
            PLATFORM_ID | BIOS_SIGN_ID | MTRRCAP | MCG_CAP | MCG_STATUS => 0,
            FEATURE_CONTROL => 1,
            ARCH_CAPABILITIES => ARCH_CAPS,
            SPEC_CTRL => m.spec_ctrl,
            SYSENTER_CS => m.sysenter_cs,
            SYSENTER_ESP => m.sysenter_esp,
            SYSENTER_EIP => m.sysenter_eip,
            MISC_ENABLE => m.misc_enable,
            PAT => m.pat,
            MTRR_DEF_TYPE => m.mtrr_def_type,
            EFER => self.s.efer,
            STAR => m.star,
            LSTAR => m.lstar,
            CSTAR => m.cstar,
            SFMASK => m.sfmask,
            FS_BASE => self.s.seg[Seg::Fs as usize].base,
            GS_BASE => self.s.seg[Seg::Gs as usize].base,
            KERNEL_GS_BASE => m.kernel_gs_base,
            TSC_AUX => m.tsc_aux,
            _ => return None,
        })
    }

    /// WRMSR semantics; Err = #GP.
    pub fn write_msr(&mut self, index: u32, v: u64) -> Result<()> {
        let need_canonical = matches!(
            index,
            LSTAR | CSTAR | FS_BASE | GS_BASE | KERNEL_GS_BASE | SYSENTER_ESP | SYSENTER_EIP
        );
        if need_canonical && !canonical(v) {
            return Err(Fault::gp0());
        }
        let m = &mut self.s.msr;
        match index {
            // The SDM ties the two: a TSC write moves TSC_ADJUST by the same amount, and a
            // TSC_ADJUST write moves the TSC.
            TSC => {
                let delta = v.wrapping_sub(self.tsc());
                self.s.msr.tsc_adjust = self.s.msr.tsc_adjust.wrapping_add(delta);
                self.set_tsc(v);
            }
            TSC_ADJUST => {
                let delta = v.wrapping_sub(m.tsc_adjust);
                m.tsc_adjust = v;
                let now = self.tsc();
                self.set_tsc(now.wrapping_add(delta));
            }
            APIC_BASE => m.apic_base = v,
            SPEC_CTRL if v & !SPEC_CTRL_BITS == 0 => m.spec_ctrl = v,
            PRED_CMD if v & !PRED_CMD_IBPB == 0 => {}
            BIOS_SIGN_ID | MCG_STATUS | FEATURE_CONTROL => {}
            SYSENTER_CS => m.sysenter_cs = v & 0xffff,
            SYSENTER_ESP => m.sysenter_esp = v,
            SYSENTER_EIP => m.sysenter_eip = v,
            MISC_ENABLE => m.misc_enable = v,
            PAT => {
                // Each entry must be a valid memory type (0,1,4,5,6,7).
                if (0..8).any(|i| matches!((v >> (i * 8)) & 0xff, 2 | 3 | 8..)) {
                    return Err(Fault::gp0());
                }
                m.pat = v;
            }
            MTRR_DEF_TYPE => m.mtrr_def_type = v,
            EFER => {
                if v & !EFER_WRITABLE & !EFER_LMA != 0 {
                    return Err(Fault::gp0());
                }
                let paging = self.s.cr0 & CR0_PG != 0;
                if paging && (v ^ self.s.efer) & EFER_LME != 0 {
                    return Err(Fault::gp0());
                }
                // LMA is read-only: it follows CR0.PG && EFER.LME.
                self.s.efer = (v & EFER_WRITABLE) | (self.s.efer & EFER_LMA);
                self.tlb.flush_all();
            }
            STAR => m.star = v,
            LSTAR => m.lstar = v,
            CSTAR => m.cstar = v,
            SFMASK => m.sfmask = v & 0xffff_ffff,
            FS_BASE => self.s.seg[Seg::Fs as usize].base = v,
            GS_BASE => self.s.seg[Seg::Gs as usize].base = v,
            KERNEL_GS_BASE => m.kernel_gs_base = v,
            TSC_AUX => m.tsc_aux = v & 0xffff_ffff,
            _ => return Err(Fault::gp0()),
        }
        Ok(())
    }
}
