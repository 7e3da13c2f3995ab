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
