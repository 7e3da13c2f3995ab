//! The part of a snapshot another accelerator can read: each vCPU's architectural
//! registers in the seam's own shapes (`hypervisor::regs`), and the CPU features the
//! guest was shown. A restore under the accelerator that took the snapshot uses its
//! own, fuller state; one under the other (emu ↔ kvm) uses this.
//!
//! The local APICs are converted from the accelerator's own state (`cross_lapic`). What a
//! cross-accelerator restore does not carry, and so refuses when it is in use
//! (`blocker`): the IOAPIC, PICs, PIT, a TSC-deadline timer and pending exceptions and
//! NMIs (the target's start fresh), kvmclock, and the XSAVE state past FXSAVE (XCR0, the
//! YMM upper halves). The TSC moves to KVM as its value; emu's TSC is its VM clock, which
//! a new VM starts at 0.

use arch::cpuid::CpuidModifier;
use hypervisor::regs::bits;
use hypervisor::{CpuIdEntry, FpuState, MsrEntry, Regs, Sregs, Vcpu};
use serde::{Deserialize, Serialize};

use super::{SnapshotError, VmSnapshot};

/// The MSRs that hold CPU state both accelerators keep (EFER, the APIC base and the
/// FS/GS bases are in `Sregs`).
const MSRS: [u32; 11] = [
    bits::MSR_IA32_TSC,
    bits::MSR_IA32_SYSENTER_CS,
    bits::MSR_IA32_SYSENTER_ESP,
    bits::MSR_IA32_SYSENTER_EIP,
    bits::MSR_IA32_CR_PAT,
    bits::MSR_STAR,
    bits::MSR_LSTAR,
    bits::MSR_CSTAR,
    bits::MSR_SYSCALL_MASK,
    bits::MSR_KERNEL_GS_BASE,
    0xc000_0103, // TSC_AUX
];

const CR4_OSXSAVE: u64 = 1 << 18;

/// One vCPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortableVcpu {
    pub regs: Regs,
    pub sregs: Sregs,
    /// The FXSAVE image (x87, SSE).
    pub fxsave: Vec<u8>,
    pub msrs: Vec<MsrEntry>,
}

/// One CPUID register's feature bits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureWord {
    pub leaf: u32,
    /// "ebx", "ecx" or "edx".
    pub reg: String,
    pub bits: u32,
}

/// What a snapshot holds for another accelerator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Portable {
    pub vcpus: Vec<PortableVcpu>,
    /// The feature words the guest saw (`features`).
    pub features: Vec<FeatureWord>,
}

/// The CPUID feature words a guest decides on: leaf 1 ECX/EDX, leaf 7.0 EBX/ECX/EDX,
/// leaf 0x80000001 ECX/EDX.
pub(crate) fn features(entries: &[CpuIdEntry]) -> Vec<FeatureWord> {
    let find = |function: u32| {
        entries
            .iter()
            .find(|e| e.function == function && e.index == 0)
            .copied()
            .unwrap_or_default()
    };
    let (l1, l7, x1) = (find(1), find(7), find(0x8000_0001));
    // OSXSAVE mirrors CR4 and the hypervisor bit says nothing the guest can use.
    let l1_ecx = l1.ecx & !(1 << 27) & !(1 << 31);
    [
        (1, "ecx", l1_ecx),
        (1, "edx", l1.edx),
        (7, "ebx", l7.ebx),
        (7, "ecx", l7.ecx),
        (7, "edx", l7.edx),
        (0x8000_0001, "ecx", x1.ecx),
        (0x8000_0001, "edx", x1.edx),
    ]
    .into_iter()
    .map(|(leaf, reg, bits)| FeatureWord {
        leaf,
        reg: reg.into(),
        bits,
    })
    .collect()
}

/// Leaf 1 EDX's instruction-set bits (FPU, TSC, CX8, CMOV, CLFSH, MMX, FXSR, SSE,
/// SSE2): a guest may execute these at any moment.
const EDX_INSTRUCTIONS: u32 =
    1 | 1 << 4 | 1 << 8 | 1 << 15 | 1 << 19 | 1 << 23 | 1 << 24 | 1 << 25 | 1 << 26;

/// Leaf 1 EDX's features a guest turns on in CR4 (VME, DE, PSE, PAE, MCE, PGE).
const EDX_BY_CR4: [(u32, u64); 6] = [
    (1, 1 << 0),
    (2, 1 << 3),
    (3, 1 << 4),
    (6, 1 << 5),
    (7, 1 << 6),
    (13, 1 << 7),
];

/// Leaf 0x80000001 ECX's instruction-set bits (LAHF/SAHF, LZCNT, SSE4A, PREFETCHW,
/// XOP, FMA4, TBM); the rest are AMD platform facts (legacy CMP, OSVW, TOPOEXT...).
const EXT_ECX_INSTRUCTIONS: u32 = 1 | 1 << 5 | 1 << 6 | 1 << 8 | 1 << 11 | 1 << 16 | 1 << 21;

/// Leaf 0x80000001 EDX's own bits (SYSCALL, NX, 1 GiB pages, RDTSCP, long mode); AMD
/// repeats most of leaf 1 EDX in the others, compared there.
const EXT_EDX_OWN: u32 = 1 << 11 | 1 << 20 | 1 << 26 | 1 << 27 | 1 << 29;

/// Of the features in `w` the target lacks, those the guest may be using. Instruction
/// sets always count. Of leaf 1 EDX's system features only those whose CR4 switch is
/// on: the rest (MTRR, MCA, PSE-36, SEP and the like) work through MSRs or paging modes
/// the portable state does not carry, and the narrowed CPUID hides them from then on.
fn in_use(w: &FeatureWord, lacking: u32, cr4: u64) -> u32 {
    match (w.leaf, w.reg.as_str()) {
        (1, "edx") => {
            let switched_on = EDX_BY_CR4
                .iter()
                .filter(|&&(_, c)| cr4 & c != 0)
                .fold(0, |m, &(bit, _)| m | 1 << bit);
            lacking & (EDX_INSTRUCTIONS | switched_on)
        }
        (0x8000_0001, "ecx") => lacking & EXT_ECX_INSTRUCTIONS,
        (0x8000_0001, "edx") => lacking & EXT_EDX_OWN,
        _ => lacking,
    }
}

/// Reads one vCPU's portable state.
pub(crate) fn save(vcpu: &dyn Vcpu) -> hypervisor::Result<PortableVcpu> {
    // One MSR at a time: KVM stops a list at the first MSR it does not have.
    let mut msrs = Vec::new();
    for index in MSRS {
        msrs.extend(vcpu.msrs(&[index]).unwrap_or_default());
    }
    Ok(PortableVcpu {
        regs: vcpu.regs()?,
        sregs: vcpu.sregs()?,
        fxsave: vcpu.fpu()?.fxsave.to_vec(),
        msrs,
    })
}

/// Puts one vCPU's portable state into a vCPU of another accelerator.
pub(crate) fn apply(vcpu: &mut dyn Vcpu, p: &PortableVcpu) -> hypervisor::Result<()> {
    let fxsave: [u8; 512] =
        p.fxsave.as_slice().try_into().map_err(|_| {
            hypervisor::Error::State("an FXSAVE image that is not 512 bytes".into())
        })?;
    vcpu.set_sregs(&p.sregs)?;
    vcpu.set_regs(&p.regs)?;
    vcpu.set_fpu(&FpuState { fxsave })?;
    vcpu.set_msrs(&p.msrs)?;
    Ok(())
}

/// The portable state of `snap` if a VM under `target` can go on from it; the reason
/// otherwise.
pub(crate) fn check<'a>(
    snap: &'a VmSnapshot,
    target: &str,
    cpus: u8,
    target_cpuid: &[CpuIdEntry],
) -> Result<&'a Portable, SnapshotError> {
    let refuse = |why: String| SnapshotError::CrossAccel {
        from: snap.accel.clone(),
        to: target.to_string(),
        why,
    };
    let blocker = match (snap.accel.as_str(), target) {
        ("emu", "kvm") => emu::persist::cross_restore_blocker(&snap.vm, &snap.vcpus),
        ("kvm", "emu") => hypervisor::kvm::cross_restore_blocker(&snap.vm, &snap.vcpus),
        _ => Some("only emu and kvm states are carried across".into()),
    };
    if let Some(why) = blocker {
        return Err(refuse(why));
    }
    let p = snap.portable.as_ref().ok_or_else(|| {
        refuse(
            "the snapshot has no accelerator-neutral CPU state (taken before it was saved)".into(),
        )
    })?;
    if p.vcpus.len() != usize::from(cpus) {
        return Err(SnapshotError::Invalid(format!(
            "{} portable vCPU states for {cpus} vCPUs",
            p.vcpus.len()
        )));
    }
    if let Some(i) = p.vcpus.iter().position(|v| v.sregs.cr4 & CR4_OSXSAVE != 0) {
        return Err(refuse(format!(
            "vCPU {i} enabled XSAVE (CR4.OSXSAVE), whose state past FXSAVE is not carried"
        )));
    }
    let have = features(target_cpuid);
    let cr4 = p.vcpus.iter().fold(0, |c, v| c | v.sregs.cr4);
    let mut missing = Vec::new();
    for w in &p.features {
        let there = have
            .iter()
            .find(|h| h.leaf == w.leaf && h.reg == w.reg)
            .map_or(0, |h| h.bits);
        let lacking = in_use(w, w.bits & !there, cr4);
        if lacking != 0 {
            missing.push(format!("leaf {:#x} {} {lacking:#010x}", w.leaf, w.reg));
        }
    }
    if !missing.is_empty() {
        return Err(refuse(format!(
            "{target} lacks CPU features the guest was shown (CPUID {})",
            missing.join(", ")
        )));
    }
    Ok(p)
}

/// The CPUID changes that show the guest, under the target, no feature it did not see
/// before (`check` made sure it keeps every one it saw). They join the VM's
/// `cpuid_modifiers`, so its later snapshots and migrations keep the narrowed table.
pub(crate) fn narrowing(p: &Portable, target_cpuid: &[CpuIdEntry]) -> Vec<CpuidModifier> {
    features(target_cpuid)
        .into_iter()
        .filter_map(|h| {
            let saw = p
                .features
                .iter()
                .find(|w| w.leaf == h.leaf && w.reg == h.reg)
                .map_or(0, |w| w.bits);
            let extra = h.bits & !saw;
            let register = match h.reg.as_str() {
                "ebx" => 1,
                "ecx" => 2,
                _ => 3,
            };
            (extra != 0).then_some(CpuidModifier {
                leaf: h.leaf,
                subleaf: 0,
                register,
                set: 0,
                clear: extra,
            })
        })
        .collect()
}
