//! The CPUID a guest vCPU sees, derived from what the accelerator supports.

use hypervisor::CpuIdEntry;

/// Leaf 1 ECX bit 31: "running under a hypervisor".
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: HTT (the logical-processor count in EBX is valid).
const EDX_HTT: u32 = 1 << 28;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;

/// Shape `supported` for vCPU `apic_id` of a `cpus`-CPU guest: APIC IDs, topology, and the
/// hypervisor bit. One core per CPU, one thread per core.
pub fn guest_cpuid(supported: &[CpuIdEntry], apic_id: u8, cpus: u8) -> Vec<CpuIdEntry> {
    let mut out: Vec<CpuIdEntry> = supported
        .iter()
        .filter(|e| e.function != LEAF_EXT_TOPOLOGY)
        .copied()
        .collect();
    for e in out.iter_mut() {
        if e.function == 1 {
            e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(cpus) << 16) | (u32::from(apic_id) << 24);
            e.ecx |= ECX_HYPERVISOR;
            if cpus > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
    }
    // Leaf 0xb: level 0 (SMT) has one thread; level 1 (core) holds all CPUs.
    let core_shift = 32 - u32::from(cpus.max(1) - 1).leading_zeros();
    let id = u32::from(apic_id);
    out.push(CpuIdEntry {
        function: LEAF_EXT_TOPOLOGY,
        index: 0,
        significant_index: true,
        eax: 0,
        ebx: 1,
        ecx: 1 << 8,
        edx: id,
    });
    out.push(CpuIdEntry {
        function: LEAF_EXT_TOPOLOGY,
        index: 1,
        significant_index: true,
        eax: core_shift,
        ebx: u32::from(cpus),
        ecx: (2 << 8) | 1,
        edx: id,
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf1_carries_apic_id_and_hypervisor_bit() {
        let sup = vec![CpuIdEntry {
            function: 1,
            ebx: 0xdead_0800,
            ..Default::default()
        }];
        let c = guest_cpuid(&sup, 3, 4);
        let l1 = c.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        let topo: Vec<_> = c.iter().filter(|e| e.function == 0xb).collect();
        assert_eq!(topo.len(), 2);
        assert_eq!(topo[1].eax, 2);
        assert_eq!(topo[1].edx, 3);
    }
}
