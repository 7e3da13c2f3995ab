//! The CPUID the emu accelerator can present: exactly what x86emu implements, plus the
//! paravirtual leaves that make Linux trust its clock (KVM signature, kvmclock).

use hypervisor::CpuIdEntry;
use x86emu::CpuidTable;

use crate::kvmclock::{
    KVM_FEATURE_CLOCKSOURCE, KVM_FEATURE_CLOCKSOURCE2, KVM_FEATURE_CLOCKSOURCE_STABLE_BIT,
};

/// Leaf 1 ECX: x2APIC and the TSC-deadline timer, both provided by the user-space LAPIC.
const ECX_X2APIC: u32 = 1 << 21;
pub const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 0x80000007 EDX bit 8: invariant TSC (ours runs at a fixed rate from host time).
const EDX_INVARIANT_TSC: u32 = 1 << 8;
/// Leaf 6 EAX bit 2: ARAT, the APIC timer keeps running in deep C-states. Ours always
/// runs; without the bit Linux needs a broadcast timer (none on hardware-reduced ACPI),
/// never leaves periodic mode and ticks at HZ even when idle.
const EAX_ARAT: u32 = 1 << 2;

pub fn supported() -> Vec<CpuIdEntry> {
    let table = CpuidTable::default();
    let mut out: Vec<CpuIdEntry> = table
        .entries()
        .into_iter()
        .map(|(leaf, sub, e, indexed)| CpuIdEntry {
            function: leaf,
            index: sub,
            significant_index: indexed,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect();
    for e in &mut out {
        match e.function {
            1 => e.ecx |= ECX_X2APIC | ECX_TSC_DEADLINE,
            0x8000_0007 => e.edx |= EDX_INVARIANT_TSC,
            _ => {}
        }
    }
    out.push(CpuIdEntry {
        function: 6,
        eax: EAX_ARAT,
        ..Default::default()
    });
    // "KVMKVMKVM\0\0\0": Linux's KVM guest support keys off this signature.
    let sig = *b"KVMKVMKVM\0\0\0";
    let w = |i: usize| u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]]);
    out.push(CpuIdEntry {
        function: 0x4000_0000,
        eax: 0x4000_0001,
        ebx: w(0),
        ecx: w(4),
        edx: w(8),
        ..Default::default()
    });
    out.push(CpuIdEntry {
        function: 0x4000_0001,
        eax: KVM_FEATURE_CLOCKSOURCE
            | KVM_FEATURE_CLOCKSOURCE2
            | KVM_FEATURE_CLOCKSOURCE_STABLE_BIT,
        ..Default::default()
    });
    out
}

/// What the hybrid accelerator cannot offer, removed from `entries`:
/// - the TSC-deadline timer (the LAPIC counts the guest TSC from 0 at VM start; in hybrid
///   mode the TSC is the host's, so the guest uses the LAPIC's own timer);
/// - XSAVE and everything that needs XCR0 (AVX, AVX2, FMA, F16C, AVX-512, leaf 0xD): user
///   code on a PVM host runs with the host's XCR0 whatever the guest set, so XSAVE areas
///   sized from the guest's CPUID are overrun natively, and an XSAVEC done natively is
///   refused by x86emu's XRSTOR (Debian's ld.so died of it). Without XSAVE the guest saves
///   state with FXSAVE, which both engines agree on.
pub fn restrict_for_hybrid(entries: &mut Vec<CpuIdEntry>) {
    const ECX1_FMA: u32 = 1 << 12;
    const ECX1_XSAVE: u32 = 1 << 26;
    const ECX1_OSXSAVE: u32 = 1 << 27;
    const ECX1_AVX: u32 = 1 << 28;
    const ECX1_F16C: u32 = 1 << 29;
    // Leaf 7 EBX: AVX2, AVX512F/DQ/IFMA/PF/ER/CD/BW/VL; ECX: AVX512_VBMI, VBMI2, VAES,
    // VPCLMULQDQ, VNNI, BITALG, VPOPCNTDQ; EDX: AVX512_4VNNIW/4FMAPS, VP2INTERSECT, FP16.
    const EBX7_XCR0: u32 = (1 << 5)
        | (1 << 16)
        | (1 << 17)
        | (1 << 21)
        | (1 << 26)
        | (1 << 27)
        | (1 << 28)
        | (1 << 30)
        | (1 << 31);
    const ECX7_XCR0: u32 =
        (1 << 1) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 14);
    const EDX7_XCR0: u32 = (1 << 2) | (1 << 3) | (1 << 8) | (1 << 23);
    entries.retain(|e| e.function != 0xd);
    for e in entries.iter_mut() {
        match (e.function, e.index) {
            (1, _) => {
                e.ecx &= !(ECX_TSC_DEADLINE
                    | ECX1_FMA
                    | ECX1_XSAVE
                    | ECX1_OSXSAVE
                    | ECX1_AVX
                    | ECX1_F16C)
            }
            (7, 0) => {
                e.ebx &= !EBX7_XCR0;
                e.ecx &= !ECX7_XCR0;
                e.edx &= !EDX7_XCR0;
            }
            (7, 1) => e.eax = 0,
            _ => {}
        }
    }
}

/// Install `entries` as the CPU's CPUID: exactly these leaves, nothing left from before
/// (a model that drops a leaf must not see the default's).
pub fn install(table: &mut CpuidTable, entries: &[CpuIdEntry]) {
    let gen = table.generation();
    *table = CpuidTable::empty();
    table.bump_generation_past(gen);
    for e in entries {
        let v = x86emu::CpuidEntry {
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        };
        if e.significant_index {
            table.set_subleaf(e.function, e.index, v);
        } else {
            table.set(e.function, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hybrid_offers_nothing_that_needs_xcr0() {
        let mut c = supported();
        restrict_for_hybrid(&mut c);
        let leaf = |f: u32, i: u32| c.iter().find(|e| e.function == f && e.index == i);
        let l1 = leaf(1, 0).expect("leaf 1");
        assert_eq!(l1.ecx & ((1 << 26) | (1 << 27) | (1 << 28)), 0, "XSAVE/AVX");
        assert_eq!(l1.ecx & ECX_TSC_DEADLINE, 0);
        assert!(leaf(0xd, 0).is_none());
        if let Some(l7) = leaf(7, 0) {
            assert_eq!(l7.ebx & (1 << 5), 0, "AVX2");
        }
        // SSE2 stays.
        assert_ne!(l1.edx & (1 << 26), 0);
    }

    #[test]
    fn advertises_kvmclock_and_only_implemented_basics() {
        let s = supported();
        let kvm = s.iter().find(|e| e.function == 0x4000_0000).unwrap();
        assert_eq!(kvm.ebx.to_le_bytes(), *b"KVMK");
        let f = s.iter().find(|e| e.function == 0x4000_0001).unwrap();
        assert_ne!(f.eax & KVM_FEATURE_CLOCKSOURCE2, 0);
        let l1 = s.iter().find(|e| e.function == 1).unwrap();
        assert_ne!(l1.ecx & ECX_TSC_DEADLINE, 0);
        let pm = s.iter().find(|e| e.function == 6).unwrap();
        assert_ne!(pm.eax & EAX_ARAT, 0);
        // The x86-64 baseline glibc checks: MMX, SSE2, CMOV, CX8, FXSR.
        for bit in [23, 26, 15, 8, 24] {
            assert_ne!(l1.edx & (1 << bit), 0, "leaf 1 EDX bit {bit}");
        }
        // XSAVE comes with its leaf 0xD subleaves, indexed by ECX.
        if l1.ecx & (1 << 26) != 0 {
            let avx = s
                .iter()
                .find(|e| e.function == 0xd && e.index == 2)
                .expect("leaf 0xD subleaf 2");
            assert!(avx.significant_index);
            assert_eq!((avx.eax, avx.ebx), (256, 576));
        }
    }
}
