//! CPUID: a table of leaves that advertises what the emulator implements; the VMM may
//! override any leaf (topology, APIC IDs, hypervisor leaves).

use std::collections::BTreeMap;

/// One CPUID result.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidEntry {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

// Leaf 1 EDX feature bits the emulator implements.
const FPU: u32 = 1 << 0;
const DE: u32 = 1 << 2;
const PSE: u32 = 1 << 3;
const TSC: u32 = 1 << 4;
const MSR: u32 = 1 << 5;
const PAE: u32 = 1 << 6;
const CX8: u32 = 1 << 8;
const APIC: u32 = 1 << 9;
const PGE: u32 = 1 << 13;
const CMOV: u32 = 1 << 15;
const PAT: u32 = 1 << 16;
const CLFSH: u32 = 1 << 19;
const FXSR: u32 = 1 << 24;
const SSE: u32 = 1 << 25;
const SSE2: u32 = 1 << 26;
// Leaf 1 ECX.
const CX16: u32 = 1 << 13;
const HYPERVISOR: u32 = 1 << 31;
// Leaf 0x8000_0001 EDX / ECX.
const SYSCALL: u32 = 1 << 11;
const NX: u32 = 1 << 20;
const RDTSCP: u32 = 1 << 27;
const LM: u32 = 1 << 29;
const LAHF_LM: u32 = 1 << 0;

/// CPUID leaves keyed by (leaf, subleaf); leaves without subleaves use subleaf 0.
#[derive(Clone, Debug)]
pub struct CpuidTable {
    leaves: BTreeMap<(u32, u32), CpuidEntry>,
    /// Leaves whose result does not depend on ECX.
    no_subleaf: std::collections::BTreeSet<u32>,
}

fn regs(s: &[u8; 12]) -> (u32, u32, u32) {
    let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    (w(0), w(4), w(8))
}

impl Default for CpuidTable {
    fn default() -> Self {
        let mut t = CpuidTable {
            leaves: BTreeMap::new(),
            no_subleaf: Default::default(),
        };
        let (b, d, c) = regs(b"VesselEmuCPU");
        t.set(
            0,
            CpuidEntry {
                eax: 0xd,
                ebx: b,
                ecx: c,
                edx: d,
            },
        );
        // Family 6, model 0x3a-ish, stepping 9: a plain P6-family CPU that Linux treats generically.
        t.set(
            1,
            CpuidEntry {
                eax: 0x0003_06a9,
                ebx: (8 << 8) | (1 << 16),
                ecx: CX16 | HYPERVISOR,
                edx: FPU
                    | DE
                    | PSE
                    | TSC
                    | MSR
                    | PAE
                    | CX8
                    | APIC
                    | PGE
                    | CMOV
                    | PAT
                    | CLFSH
                    | FXSR
                    | SSE
                    | SSE2,
            },
        );
        // ARCH_CAPABILITIES: lets the guest read which speculative-execution flaws this CPU
        // does not have (an interpreter has none), so Linux skips PTI, MDS buffer clearing
        // and friends, which would only cost time here.
        // ERMS: REP MOVSB/STOSB are fast here (a page at a time, see `exec::string`), so
        // Linux should use them for memcpy, memset, clear_page and user copies instead of
        // unrolled loops of moves.
        t.set(
            7,
            CpuidEntry {
                ebx: 1 << 9,
                edx: 1 << 29,
                ..Default::default()
            },
        );
        t.set(0xd, CpuidEntry::default());
        let (b, c, d) = regs(b"VesselEmuCPU");
        t.set(
            0x4000_0000,
            CpuidEntry {
                eax: 0x4000_0000,
                ebx: b,
                ecx: c,
                edx: d,
            },
        );
        t.set(
            0x8000_0000,
            CpuidEntry {
                eax: 0x8000_0008,
                ..Default::default()
            },
        );
        t.set(
            0x8000_0001,
            CpuidEntry {
                eax: 0,
                ebx: 0,
                ecx: LAHF_LM,
                edx: SYSCALL | NX | RDTSCP | LM,
            },
        );
        let mut brand = [0u8; 48];
        let name = b"Vessel x86-64 emulated CPU";
        brand[..name.len()].copy_from_slice(name);
        for (i, leaf) in (0x8000_0002u32..=0x8000_0004).enumerate() {
            let w = |j: usize| {
                let o = i * 16 + j * 4;
                u32::from_le_bytes([brand[o], brand[o + 1], brand[o + 2], brand[o + 3]])
            };
            t.set(
                leaf,
                CpuidEntry {
                    eax: w(0),
                    ebx: w(1),
                    ecx: w(2),
                    edx: w(3),
                },
            );
        }
        t.set(
            0x8000_0007,
            CpuidEntry {
                edx: 1 << 8,
                ..Default::default()
            },
        );
        t.set(
            0x8000_0008,
            CpuidEntry {
                eax: crate::mmu::PHYS_ADDR_BITS | (48 << 8),
                ..Default::default()
            },
        );
        t
    }
}

impl CpuidTable {
    /// Sets a leaf whose result does not depend on ECX.
    pub fn set(&mut self, leaf: u32, e: CpuidEntry) {
        self.no_subleaf.insert(leaf);
        self.leaves.insert((leaf, 0), e);
    }

    /// Sets one subleaf of a leaf indexed by ECX.
    pub fn set_subleaf(&mut self, leaf: u32, subleaf: u32, e: CpuidEntry) {
        self.no_subleaf.remove(&leaf);
        self.leaves.insert((leaf, subleaf), e);
    }

    /// Result of CPUID for (EAX, ECX). Unknown leaves return zeros, as out-of-range leaves
    /// on AMD do (Intel returns the highest basic leaf; zeros are the safer answer).
    pub fn lookup(&self, leaf: u32, subleaf: u32) -> CpuidEntry {
        let sub = if self.no_subleaf.contains(&leaf) {
            0
        } else {
            subleaf
        };
        self.leaves.get(&(leaf, sub)).copied().unwrap_or_default()
    }

    /// Sets the initial APIC ID reported in leaf 1 EBX[31:24].
    pub fn set_apic_id(&mut self, id: u8) {
        let mut e = self.lookup(1, 0);
        e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(id) << 24);
        self.set(1, e);
    }
}
