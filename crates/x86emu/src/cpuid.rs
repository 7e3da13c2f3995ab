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
const MMX: u32 = 1 << 23;
// Leaf 1 ECX.
const SSE3: u32 = 1 << 0;
const PCLMULQDQ: u32 = 1 << 1;
const SSSE3: u32 = 1 << 9;
const FMA: u32 = 1 << 12;
const CX16: u32 = 1 << 13;
const SSE41: u32 = 1 << 19;
const SSE42: u32 = 1 << 20;
const MOVBE: u32 = 1 << 22;
const POPCNT: u32 = 1 << 23;
const AES: u32 = 1 << 25;
const XSAVE: u32 = 1 << 26;
/// Leaf 1 ECX bit 27 mirrors CR4.OSXSAVE (filled in when CPUID runs).
pub const OSXSAVE: u32 = 1 << 27;
const AVX: u32 = 1 << 28;
const F16C: u32 = 1 << 29;
const RDRAND: u32 = 1 << 30;
const HYPERVISOR: u32 = 1 << 31;
// Leaf 7 EBX / ECX.
/// IA32_TSC_ADJUST exists (see `msr`). With it Linux trusts that CPUs of one package share
/// their TSC and skips its pairwise TSC warp test, which spins the new CPU and the boot
/// CPU against each other for each CPU brought up.
const TSC_ADJUST: u32 = 1 << 1;
const BMI1: u32 = 1 << 3;
const AVX2: u32 = 1 << 5;
const BMI2: u32 = 1 << 8;
const ERMS: u32 = 1 << 9;
const RDSEED: u32 = 1 << 18;
const ADX: u32 = 1 << 19;
const CLFLUSHOPT: u32 = 1 << 23;
const SHA: u32 = 1 << 29;
const RDPID: u32 = 1 << 22;
/// Leaf 7 EDX bit 26: IA32_SPEC_CTRL (IBRS) and IA32_PRED_CMD (IBPB) exist.
const SPEC_CTRL: u32 = 1 << 26;
/// Leaf 7 EDX bit 29: IA32_ARCH_CAPABILITIES exists.
const ARCH_CAPABILITIES: u32 = 1 << 29;
/// Leaf 7 subleaf 2 EDX bit 4: IA32_SPEC_CTRL's BHI_DIS_S (bit 10) exists.
const BHI_CTRL: u32 = 1 << 4;
// Leaf 0xD subleaf 1 EAX.
const XSAVEOPT: u32 = 1 << 0;
const XSAVEC: u32 = 1 << 1;
/// XCR0 components x86emu keeps: x87, SSE, AVX.
pub const XCR0_SUPPORTED: u64 = 0x7;
/// Size of the legacy region plus the XSAVE header, and of the AVX component after it.
pub const XSAVE_LEGACY_AND_HEADER: u32 = 576;
pub const XSAVE_AVX_SIZE: u32 = 256;
// Leaf 0x8000_0001 EDX / ECX.
const SYSCALL: u32 = 1 << 11;
const NX: u32 = 1 << 20;
const RDTSCP: u32 = 1 << 27;
const LM: u32 = 1 << 29;
const LAHF_LM: u32 = 1 << 0;
const ABM: u32 = 1 << 5;
const PREFETCHW: u32 = 1 << 8;

/// The host's instruction-set extensions that x86emu runs by executing them on the host
/// (`exec::hostexec`): x86emu advertises an extension only when the host has it too.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostIsa {
    pub l1_ecx: u32,
    pub l7_ebx: u32,
    pub l7_ecx: u32,
    pub e1_ecx: u32,
}

impl HostIsa {
    #[cfg(target_arch = "x86_64")]
    pub fn detect() -> Self {
        use std::arch::is_x86_feature_detected as has;
        let pick = |v: &[(bool, u32)]| v.iter().filter(|(b, _)| *b).fold(0, |a, (_, m)| a | m);
        let avx = has!("avx") && has!("xsave");
        HostIsa {
            l1_ecx: pick(&[
                (has!("sse3"), SSE3),
                (has!("pclmulqdq"), PCLMULQDQ),
                (has!("ssse3"), SSSE3),
                (avx && has!("fma"), FMA),
                (has!("sse4.1"), SSE41),
                (has!("sse4.2"), SSE42),
                (has!("movbe"), MOVBE),
                (has!("popcnt"), POPCNT),
                (has!("aes"), AES),
                (avx, XSAVE | AVX),
                (avx && has!("f16c"), F16C),
                (has!("rdrand"), RDRAND),
            ]),
            l7_ebx: pick(&[
                (has!("bmi1"), BMI1),
                (avx && has!("avx2"), AVX2),
                (has!("bmi2"), BMI2),
                (has!("rdseed"), RDSEED),
                (has!("adx"), ADX),
                (has!("sha"), SHA),
            ]),
            l7_ecx: 0,
            e1_ecx: pick(&[(has!("lzcnt"), ABM)]),
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub fn detect() -> Self {
        HostIsa::default()
    }
}

/// CPUID leaves keyed by (leaf, subleaf); leaves without subleaves use subleaf 0.
#[derive(Clone, Debug)]
pub struct CpuidTable {
    leaves: BTreeMap<(u32, u32), CpuidEntry>,
    /// Leaves whose result does not depend on ECX.
    no_subleaf: std::collections::BTreeSet<u32>,
    /// Moves on every change, so users of derived facts know to derive them again.
    generation: u64,
}

fn regs(s: &[u8; 12]) -> (u32, u32, u32) {
    let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    (w(0), w(4), w(8))
}

impl Default for CpuidTable {
    /// Everything x86emu implements on this host (the "max" model): a GenuineIntel
    /// family-6 CPU; the VMM narrows it to the model a VM asks for.
    fn default() -> Self {
        Self::for_host(HostIsa::detect())
    }
}

impl CpuidTable {
    /// The full table for a host with `host`'s extensions.
    pub fn for_host(host: HostIsa) -> Self {
        let mut t = CpuidTable::empty();
        let (b, d, c) = regs(b"GenuineIntel");
        t.set(
            0,
            CpuidEntry {
                eax: 0xd,
                ebx: b,
                ecx: c,
                edx: d,
            },
        );
        // Family 6 model 0x8f stepping 8: a current server core that Linux knows, whose
        // speculation bugs IA32_ARCH_CAPABILITIES answers (see `msr`), so Linux neither
        // warns about an unknown CPU nor turns on mitigations an interpreter never needs.
        t.set(
            1,
            CpuidEntry {
                eax: 0x0008_06f8,
                ebx: (8 << 8) | (1 << 16),
                ecx: CX16 | HYPERVISOR | host.l1_ecx,
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
                    | MMX
                    | FXSR
                    | SSE
                    | SSE2,
            },
        );
        // ERMS: REP MOVSB/STOSB are fast here (a page at a time, see `exec::string`), so
        // Linux should use them for memcpy, memset, clear_page and user copies instead of
        // unrolled loops of moves. ARCH_CAPABILITIES: see above; SPEC_CTRL, so that Linux can
        // turn on the enhanced IBRS it says the CPU has (see `msr`).
        t.set_subleaf(
            7,
            0,
            CpuidEntry {
                eax: 2,
                ebx: TSC_ADJUST | ERMS | CLFLUSHOPT | host.l7_ebx,
                ecx: RDPID | host.l7_ecx,
                edx: SPEC_CTRL | ARCH_CAPABILITIES,
            },
        );
        t.set_subleaf(7, 1, CpuidEntry::default());
        // BHI_CTRL: with enhanced IBRS Linux otherwise clears the branch history with a
        // loop of branches on every system call; with it, it sets BHI_DIS_S once.
        t.set_subleaf(
            7,
            2,
            CpuidEntry {
                edx: BHI_CTRL,
                ..Default::default()
            },
        );
        // Leaf 4: the caches, as QEMU's models describe them (L1d and L1i 32 KiB 8-way, L2
        // 4 MiB and L3 16 MiB 16-way, 64-byte lines). Without it Linux knows of no cache
        // (no sysfs cache directory, each vCPU its own last-level cache) and user space
        // that sizes buffers by the caches guesses. Which CPUs share each cache depends on
        // the VM's topology: the VMM fills that in.
        for (i, (kind, level, ways, sets)) in [
            (1, 1, 8, 64),
            (2, 1, 8, 64),
            (3, 2, 16, 4096),
            (3, 3, 16, 16384),
        ]
        .into_iter()
        .enumerate()
        {
            t.set_subleaf(
                4,
                i as u32,
                CpuidEntry {
                    // Self-initializing; L3 is inclusive.
                    eax: kind | (level << 5) | (1 << 8),
                    ebx: (ways - 1) << 22 | 63,
                    ecx: sets - 1,
                    edx: u32::from(level == 3) << 1,
                },
            );
        }
        t.set_subleaf(4, 4, CpuidEntry::default());
        if host.l1_ecx & XSAVE != 0 {
            // Leaf 0xD: x87, SSE and AVX state in the standard layout; EBX of subleaf 0
            // follows XCR0 when CPUID runs.
            let max = XSAVE_LEGACY_AND_HEADER + XSAVE_AVX_SIZE;
            t.set_subleaf(
                0xd,
                0,
                CpuidEntry {
                    eax: XCR0_SUPPORTED as u32,
                    ebx: max,
                    ecx: max,
                    edx: 0,
                },
            );
            t.set_subleaf(
                0xd,
                1,
                CpuidEntry {
                    eax: XSAVEOPT | XSAVEC,
                    ..Default::default()
                },
            );
            t.set_subleaf(
                0xd,
                2,
                CpuidEntry {
                    eax: XSAVE_AVX_SIZE,
                    ebx: XSAVE_LEGACY_AND_HEADER,
                    ..Default::default()
                },
            );
        } else {
            t.set_subleaf(0xd, 0, CpuidEntry::default());
        }
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
                ecx: LAHF_LM | PREFETCHW | host.e1_ecx,
                edx: SYSCALL | NX | RDTSCP | LM,
            },
        );
        t.set_brand("Vessel x86-64 emulated CPU");
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

    /// A table with no leaves (every CPUID returns zeros), to fill with `set`.
    pub fn empty() -> Self {
        CpuidTable {
            leaves: BTreeMap::new(),
            no_subleaf: Default::default(),
            generation: 0,
        }
    }

    /// Leaves 0x8000_0002-4: the brand string (at most 47 bytes).
    pub fn set_brand(&mut self, name: &str) {
        let mut brand = [0u8; 48];
        let n = name.len().min(47);
        brand[..n].copy_from_slice(&name.as_bytes()[..n]);
        for (i, leaf) in (0x8000_0002u32..=0x8000_0004).enumerate() {
            let w = |j: usize| {
                let o = i * 16 + j * 4;
                u32::from_le_bytes([brand[o], brand[o + 1], brand[o + 2], brand[o + 3]])
            };
            self.set(
                leaf,
                CpuidEntry {
                    eax: w(0),
                    ebx: w(1),
                    ecx: w(2),
                    edx: w(3),
                },
            );
        }
    }

    /// Every (leaf, subleaf, result, indexed-by-ECX) in the table.
    pub fn entries(&self) -> Vec<(u32, u32, CpuidEntry, bool)> {
        self.leaves
            .iter()
            .map(|(&(l, s), &e)| (l, s, e, !self.no_subleaf.contains(&l)))
            .collect()
    }

    /// Makes `generation()` larger than `g` (a replaced table must not look unchanged).
    pub fn bump_generation_past(&mut self, g: u64) {
        self.generation = self.generation.max(g) + 1;
    }

    /// Moves whenever a leaf changes.
    pub fn generation(&self) -> u64 {
        self.generation
    }
    /// Sets a leaf whose result does not depend on ECX.
    pub fn set(&mut self, leaf: u32, e: CpuidEntry) {
        self.generation += 1;
        self.no_subleaf.insert(leaf);
        self.leaves.insert((leaf, 0), e);
    }

    /// Sets one subleaf of a leaf indexed by ECX.
    pub fn set_subleaf(&mut self, leaf: u32, subleaf: u32, e: CpuidEntry) {
        self.generation += 1;
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
