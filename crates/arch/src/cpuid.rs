//! The CPUID a guest vCPU sees, derived from what the accelerator supports.

use hypervisor::CpuIdEntry;

/// Leaf 1 ECX bit 31: "running under a hypervisor".
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: HTT (the logical-processor count in EBX is valid).
const EDX_HTT: u32 = 1 << 28;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;

/// A named CPU model: which instruction-set extensions the guest is promised. The
/// x86-64 micro-architecture levels are the psABI's (glibc's `glibc-hwcaps` directories
/// and distributions' baselines key off them); `qemu64` is QEMU's default model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CpuModel {
    /// x86-64 baseline plus SSE3 and CMPXCHG16B (QEMU's `qemu64`).
    #[serde(rename = "qemu64")]
    Qemu64,
    /// Adds SSSE3, SSE4.1, SSE4.2, POPCNT, LAHF/SAHF (RHEL 9's baseline).
    #[serde(rename = "x86-64-v2")]
    X86_64V2,
    /// Adds AVX, AVX2, BMI1, BMI2, F16C, FMA, LZCNT, MOVBE, XSAVE (RHEL 10's baseline).
    #[serde(rename = "x86-64-v3")]
    X86_64V3,
    /// Everything the accelerator implements on this host.
    #[default]
    #[serde(rename = "max")]
    Max,
}

impl CpuModel {
    pub const ALL: [CpuModel; 4] = [
        CpuModel::Qemu64,
        CpuModel::X86_64V2,
        CpuModel::X86_64V3,
        CpuModel::Max,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CpuModel::Qemu64 => "qemu64",
            CpuModel::X86_64V2 => "x86-64-v2",
            CpuModel::X86_64V3 => "x86-64-v3",
            CpuModel::Max => "max",
        }
    }

    /// (leaf, register, bit, name) of every extension the model promises beyond the
    /// x86-64 baseline; None for `max` (whatever is supported).
    fn required(self) -> Option<Vec<(u32, Reg, u32, &'static str)>> {
        let v1 = [
            (1, Reg::Ecx, 0, "SSE3"),
            (1, Reg::Ecx, 13, "CMPXCHG16B"),
            (0x8000_0001, Reg::Ecx, 0, "LAHF/SAHF"),
        ];
        let v2 = [
            (1, Reg::Ecx, 9, "SSSE3"),
            (1, Reg::Ecx, 19, "SSE4.1"),
            (1, Reg::Ecx, 20, "SSE4.2"),
            (1, Reg::Ecx, 23, "POPCNT"),
        ];
        let v3 = [
            (1, Reg::Ecx, 12, "FMA"),
            (1, Reg::Ecx, 22, "MOVBE"),
            (1, Reg::Ecx, 26, "XSAVE"),
            (1, Reg::Ecx, 28, "AVX"),
            (1, Reg::Ecx, 29, "F16C"),
            (7, Reg::Ebx, 3, "BMI1"),
            (7, Reg::Ebx, 5, "AVX2"),
            (7, Reg::Ebx, 8, "BMI2"),
            (0x8000_0001, Reg::Ecx, 5, "LZCNT"),
        ];
        let mut r: Vec<_> = v1.to_vec();
        match self {
            CpuModel::Max => return None,
            CpuModel::Qemu64 => {}
            CpuModel::X86_64V2 => r.extend(v2),
            CpuModel::X86_64V3 => {
                r.extend(v2);
                r.extend(v3);
            }
        }
        Some(r)
    }
}

impl std::fmt::Display for CpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for CpuModel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        CpuModel::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown CPU model {s:?} (qemu64, x86-64-v2, x86-64-v3 or max)"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reg {
    Ebx,
    Ecx,
}

/// Leaf 1 ECX bits that describe the platform, not the instruction set: kept in every model.
const L1_ECX_PLATFORM: u32 = (1 << 21) | (1 << 24) | ECX_HYPERVISOR;
/// Leaf 7 EBX/EDX bits that are hints about the implementation, kept in every model:
/// IA32_TSC_ADJUST, ERMS (fast REP MOVSB), IA32_SPEC_CTRL/IA32_PRED_CMD and
/// IA32_ARCH_CAPABILITIES (which together say which speculation mitigations are needed).
const L7_EBX_HINTS: u32 = (1 << 1) | (1 << 9);
const L7_EDX_HINTS: u32 = (1 << 26) | (1 << 29);
const L7_2_EDX_HINTS: u32 = 1 << 4;

/// A model the accelerator cannot provide.
#[derive(Debug, thiserror::Error)]
#[error("CPU model {model} needs {missing}, which this host's accelerator cannot provide (try --cpu max)")]
pub struct ModelError {
    pub model: CpuModel,
    pub missing: String,
}

fn reg_of(e: &CpuIdEntry, r: Reg) -> u32 {
    match r {
        Reg::Ebx => e.ebx,
        Reg::Ecx => e.ecx,
    }
}

/// Narrows `supported` to what `model` promises: exactly its extensions, the x86-64
/// baseline, and the platform bits. Fails when `supported` lacks one the model needs.
pub fn apply_model(
    supported: &[CpuIdEntry],
    model: CpuModel,
) -> Result<Vec<CpuIdEntry>, ModelError> {
    let mut out = match model.required() {
        Some(req) => narrow(supported, model, &req)?,
        None => supported.to_vec(),
    };
    set_brand(&mut out, &format!("Vessel virtual CPU ({})", model.name()));
    Ok(out)
}

fn narrow(
    supported: &[CpuIdEntry],
    model: CpuModel,
    req: &[(u32, Reg, u32, &'static str)],
) -> Result<Vec<CpuIdEntry>, ModelError> {
    let find = |leaf: u32| {
        supported
            .iter()
            .find(|e| e.function == leaf && e.index == 0)
            .copied()
            .unwrap_or_default()
    };
    let missing: Vec<&str> = req
        .iter()
        .filter(|(leaf, r, bit, _)| reg_of(&find(*leaf), *r) & (1 << bit) == 0)
        .map(|(.., n)| *n)
        .collect();
    if !missing.is_empty() {
        return Err(ModelError {
            model,
            missing: missing.join(", "),
        });
    }
    let mask = |leaf: u32, r: Reg| {
        req.iter()
            .filter(|(l, rr, ..)| *l == leaf && *rr == r)
            .fold(0u32, |m, (_, _, b, _)| m | (1 << b))
    };
    let xsave = mask(1, Reg::Ecx) & (1 << 26) != 0;
    let mut out = Vec::with_capacity(supported.len());
    for e in supported {
        let mut e = *e;
        match e.function {
            1 => e.ecx &= mask(1, Reg::Ecx) | L1_ECX_PLATFORM,
            7 if e.index == 0 => {
                e.ebx &= mask(7, Reg::Ebx) | L7_EBX_HINTS;
                e.ecx = 0;
                e.edx &= L7_EDX_HINTS;
            }
            // Subleaf 2's BHI_CTRL goes with IA32_SPEC_CTRL: a hint like it.
            7 if e.index == 2 => {
                (e.eax, e.ebx, e.ecx) = (0, 0, 0);
                e.edx &= L7_2_EDX_HINTS;
            }
            7 => continue,
            0xd if !xsave => continue,
            0xd if e.index == 1 => e.eax = 0,
            0x8000_0001 => e.ecx &= mask(0x8000_0001, Reg::Ecx) | (1 << 8),
            0x8000_0002..=0x8000_0004 => {}
            _ => {}
        }
        out.push(e);
    }
    Ok(out)
}

/// Leaves 0x8000_0002-4 spell the brand string (at most 47 bytes).
fn set_brand(out: &mut [CpuIdEntry], brand: &str) {
    let mut b = [0u8; 48];
    b[..brand.len().min(47)].copy_from_slice(&brand.as_bytes()[..brand.len().min(47)]);
    for (i, leaf) in (0x8000_0002u32..=0x8000_0004).enumerate() {
        let w = |j: usize| {
            let o = i * 16 + j * 4;
            u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
        };
        if let Some(e) = out.iter_mut().find(|e| e.function == leaf) {
            (e.eax, e.ebx, e.ecx, e.edx) = (w(0), w(1), w(2), w(3));
        }
    }
}

/// One register of one CPUID leaf changed bit by bit (Firecracker's custom CPU template
/// modifiers): `set` bits become 1, `clear` bits 0, the others stay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidModifier {
    pub leaf: u32,
    pub subleaf: u32,
    /// 0 eax, 1 ebx, 2 ecx, 3 edx.
    pub register: u8,
    pub set: u32,
    pub clear: u32,
}

/// A modifier that would give the guest what the accelerator does not have.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModifierError {
    #[error(
        "CPUID leaf {leaf:#x} subleaf {subleaf:#x} register {register}: bits {bits:#010x} \
         name features this host's accelerator does not offer"
    )]
    Unsupported {
        leaf: u32,
        subleaf: u32,
        register: &'static str,
        bits: u32,
    },
    #[error("CPUID register index {0} (0 to 3: eax, ebx, ecx, edx)")]
    BadRegister(u8),
}

/// The leaves whose bits are instruction-set or platform features: a modifier may clear
/// them, and set only what the accelerator's table already has (the emu accelerator
/// raises #UD for an extension it lacks; KVM would be asked for one it does not offer).
fn is_feature_leaf(leaf: u32, register: u8) -> bool {
    matches!(
        (leaf, register),
        (1, 2 | 3) | (7, 1..=3) | (0xd, _) | (0x8000_0001, 2 | 3) | (0x14, _) | (0x19, _)
    )
}

/// Applies Firecracker-style CPUID modifiers to the accelerator's (already narrowed)
/// table, as its custom CPU templates do: each names a leaf and subleaf and sets and
/// clears bits of one register. Bits set in a feature leaf must already be offered.
pub fn apply_modifiers(
    table: &mut [CpuIdEntry],
    mods: &[CpuidModifier],
) -> Result<(), ModifierError> {
    const NAMES: [&str; 4] = ["eax", "ebx", "ecx", "edx"];
    for m in mods {
        let name = *NAMES
            .get(usize::from(m.register))
            .ok_or(ModifierError::BadRegister(m.register))?;
        let matches =
            |e: &CpuIdEntry| e.function == m.leaf && (!e.significant_index || e.index == m.subleaf);
        let entry = table.iter_mut().find(|e| matches(e));
        match entry {
            Some(e) => {
                let r = match m.register {
                    0 => &mut e.eax,
                    1 => &mut e.ebx,
                    2 => &mut e.ecx,
                    _ => &mut e.edx,
                };
                let new_bits = m.set & !*r;
                if new_bits != 0 && is_feature_leaf(m.leaf, m.register) {
                    return Err(ModifierError::Unsupported {
                        leaf: m.leaf,
                        subleaf: m.subleaf,
                        register: name,
                        bits: new_bits,
                    });
                }
                *r = (*r | m.set) & !m.clear;
            }
            // A leaf the accelerator does not have: clearing is already true; setting is
            // asking for something it lacks.
            None if m.set != 0 => {
                return Err(ModifierError::Unsupported {
                    leaf: m.leaf,
                    subleaf: m.subleaf,
                    register: name,
                    bits: m.set,
                })
            }
            None => {}
        }
    }
    Ok(())
}

/// Shape `supported` for vCPU `apic_id` of a `cpus`-CPU guest: APIC IDs, topology, and the
/// hypervisor bit. One core per CPU, one thread per core.
pub fn guest_cpuid(supported: &[CpuIdEntry], apic_id: u8, cpus: u8) -> Vec<CpuIdEntry> {
    guest_cpuid_smt(supported, apic_id, cpus, 1)
}

/// As [`guest_cpuid`], with `threads_per_core` threads (1 or 2) in each core: leaf 0xb's
/// SMT level says so, and the low APIC ID bit is the thread (vCPUs 0 and 1 are the two
/// threads of core 0), as Firecracker's `smt: true` presents it.
pub fn guest_cpuid_smt(
    supported: &[CpuIdEntry],
    apic_id: u8,
    cpus: u8,
    threads_per_core: u8,
) -> Vec<CpuIdEntry> {
    let threads = threads_per_core.clamp(1, 2);
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
    // Leaf 0xb: level 0 (SMT) has the core's threads; level 1 (core) holds all CPUs.
    let core_shift = (32 - u32::from(cpus.max(1) - 1).leading_zeros()).max(u32::from(threads) - 1);
    // Leaf 4: the threads of a core share its L1 and L2, every CPU shares the L3 (one
    // package), whatever the host's own caches look like.
    let cores = (1u32 << (core_shift - (u32::from(threads) - 1))).min(64);
    for e in out
        .iter_mut()
        .filter(|e| e.function == 4 && e.eax & 0x1f != 0)
    {
        let sharing = if (e.eax >> 5) & 7 >= 3 {
            1 << core_shift
        } else {
            u32::from(threads)
        };
        e.eax = (e.eax & 0x3fff) | ((sharing - 1) & 0xfff) << 14 | (cores - 1) << 26;
    }
    let id = u32::from(apic_id);
    out.push(CpuIdEntry {
        function: LEAF_EXT_TOPOLOGY,
        index: 0,
        significant_index: true,
        eax: u32::from(threads) - 1,
        ebx: u32::from(threads),
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

    #[test]
    fn leaf4_says_every_cpu_shares_the_l3_and_each_core_its_l2() {
        let cache = |index: u32, kind: u32, level: u32| CpuIdEntry {
            function: 4,
            index,
            significant_index: true,
            // What a host might say: 2 threads share each cache, 64 cores.
            eax: kind | level << 5 | 1 << 8 | 1 << 14 | 63 << 26,
            ..Default::default()
        };
        let end = CpuIdEntry {
            function: 4,
            index: 3,
            significant_index: true,
            ..Default::default()
        };
        let sup = vec![cache(0, 1, 1), cache(1, 3, 2), cache(2, 3, 3), end];
        let sharing = |c: &[CpuIdEntry], i: u32| {
            let e = c.iter().find(|e| e.function == 4 && e.index == i).unwrap();
            ((e.eax >> 14) & 0xfff, e.eax >> 26, e.eax & 0x3fff)
        };
        // 6 CPUs: APIC IDs 0-5 in a 3-bit space, so the L3's sharing covers 8 IDs.
        let c = guest_cpuid(&sup, 5, 6);
        assert_eq!(sharing(&c, 0), (0, 7, 1 | 1 << 5 | 1 << 8), "L1d per core");
        assert_eq!(sharing(&c, 1).0, 0, "L2 per core");
        assert_eq!(sharing(&c, 2).0, 7, "L3 for the package");
        assert_eq!(sharing(&c, 3), (0, 0, 0), "the end marker stays");
        // Two threads per core: they share L1 and L2; 2 cores of 2 in 4 CPUs.
        let c = guest_cpuid_smt(&sup, 1, 4, 2);
        assert_eq!(sharing(&c, 1).0, 1);
        assert_eq!(sharing(&c, 1).1, 1);
        assert_eq!(sharing(&c, 2).0, 3);
        // One CPU: nothing shared.
        let c = guest_cpuid(&sup, 0, 1);
        assert_eq!((sharing(&c, 2).0, sharing(&c, 2).1), (0, 0));
    }
}

#[cfg(test)]
mod smt_tests {
    use super::*;

    #[test]
    fn two_threads_per_core_show_in_leaf_0xb() {
        let sup = vec![CpuIdEntry {
            function: 1,
            ..Default::default()
        }];
        let c = guest_cpuid_smt(&sup, 3, 4, 2);
        let topo: Vec<_> = c.iter().filter(|e| e.function == 0xb).collect();
        // SMT level: 2 threads, 1 bit of APIC ID; core level: 4 CPUs, 2 bits.
        assert_eq!((topo[0].eax, topo[0].ebx, topo[0].ecx >> 8), (1, 2, 1));
        assert_eq!((topo[1].eax, topo[1].ebx, topo[1].ecx >> 8), (2, 4, 2));
        assert_eq!(topo[0].edx, 3);
        // One thread per core is what guest_cpuid gives.
        let one = guest_cpuid(&sup, 3, 4);
        let t0 = one.iter().find(|e| e.function == 0xb).unwrap();
        assert_eq!((t0.eax, t0.ebx), (0, 1));
        // A 2-CPU SMT guest: one core of two threads.
        let c = guest_cpuid_smt(&sup, 1, 2, 2);
        let topo: Vec<_> = c.iter().filter(|e| e.function == 0xb).collect();
        assert_eq!((topo[0].eax, topo[1].eax), (1, 1));
    }
}

#[cfg(test)]
mod modifier_tests {
    use super::*;

    fn table() -> Vec<CpuIdEntry> {
        vec![
            CpuIdEntry {
                function: 1,
                eax: 0x000a_0652,
                ecx: 0x8000_0201,
                edx: 0x0000_0001,
                ..Default::default()
            },
            CpuIdEntry {
                function: 7,
                index: 0,
                significant_index: true,
                ebx: 0b1010,
                ..Default::default()
            },
        ]
    }

    #[test]
    fn modifiers_clear_and_set_bits_of_the_leaf_they_name() {
        let mut t = table();
        let m = |leaf, subleaf, register, set, clear| CpuidModifier {
            leaf,
            subleaf,
            register,
            set,
            clear,
        };
        apply_modifiers(
            &mut t,
            &[
                // Clear a feature; rewrite the signature (not a feature leaf register).
                m(1, 0, 2, 0, 0x200),
                m(1, 0, 0, 0x0005_0000, 0x000a_0000),
                // Setting a feature the table already has is fine.
                m(7, 0, 1, 0b10, 0b1000),
            ],
        )
        .unwrap();
        assert_eq!(t[0].ecx, 0x8000_0001);
        assert_eq!(t[0].eax, 0x0005_0652);
        assert_eq!(t[1].ebx, 0b0010);
        // A feature the accelerator lacks is refused, the table left as it was.
        let before = t.clone();
        let e = apply_modifiers(&mut t, &[m(7, 0, 1, 1 << 5, 0)]).unwrap_err();
        assert!(
            matches!(e, ModifierError::Unsupported { bits: 0x20, .. }),
            "{e}"
        );
        assert_eq!(t, before);
        // A leaf it does not have: clearing is a no-op, setting is refused.
        apply_modifiers(&mut t, &[m(0x8000_0008, 0, 0, 0, 0xff)]).unwrap();
        assert!(apply_modifiers(&mut t, &[m(0x8000_0008, 0, 0, 1, 0)]).is_err());
        // Another subleaf of an indexed leaf is a leaf it does not have.
        assert!(apply_modifiers(&mut t, &[m(7, 1, 1, 1, 0)]).is_err());
        assert_eq!(
            apply_modifiers(&mut t, &[m(1, 0, 4, 0, 1)]),
            Err(ModifierError::BadRegister(4))
        );
    }
}

#[cfg(test)]
mod model_tests {
    use super::*;

    fn entry(function: u32, ebx: u32, ecx: u32) -> CpuIdEntry {
        CpuIdEntry {
            function,
            ebx,
            ecx,
            ..Default::default()
        }
    }

    /// Everything v3 needs and more (AES, SHA, RDPID).
    fn rich() -> Vec<CpuIdEntry> {
        vec![
            entry(1, 0, 0xfef8_3203 | (1 << 25)),
            entry(
                7,
                (1 << 3) | (1 << 5) | (1 << 8) | (1 << 9) | (1 << 29),
                1 << 22,
            ),
            entry(0x8000_0001, 0, 0x121),
            entry(0x8000_0002, 0, 0),
        ]
    }

    #[test]
    fn models_narrow_to_their_level() {
        let v2 = apply_model(&rich(), CpuModel::X86_64V2).unwrap();
        let l1 = v2.iter().find(|e| e.function == 1).unwrap();
        assert_ne!(l1.ecx & (1 << 20), 0, "SSE4.2 kept");
        assert_eq!(l1.ecx & (1 << 28), 0, "no AVX in v2");
        assert_eq!(l1.ecx & (1 << 25), 0, "no AES in v2");
        let l7 = v2.iter().find(|e| e.function == 7).unwrap();
        assert_eq!(l7.ebx, 1 << 9, "only the ERMS hint");
        let v3 = apply_model(&rich(), CpuModel::X86_64V3).unwrap();
        let l7 = v3.iter().find(|e| e.function == 7).unwrap();
        assert_ne!(l7.ebx & (1 << 5), 0, "AVX2 in v3");
        assert_eq!(l7.ebx & (1 << 29), 0, "no SHA in v3");
        assert_eq!(l7.ecx, 0, "no RDPID in v3");
        let max = apply_model(&rich(), CpuModel::Max).unwrap();
        assert_eq!(max[..3], rich()[..3], "max keeps every feature");
    }

    #[test]
    fn models_keep_the_speculation_control_hints() {
        let mut host = rich();
        host[1].edx = (1 << 26) | (1 << 29) | (1 << 4);
        host.push(CpuIdEntry {
            function: 7,
            index: 1,
            eax: 1 << 4,
            ..Default::default()
        });
        host.push(CpuIdEntry {
            function: 7,
            index: 2,
            edx: (1 << 4) | (1 << 0),
            ..Default::default()
        });
        let q = apply_model(&host, CpuModel::Qemu64).unwrap();
        let l7 = q.iter().find(|e| e.function == 7 && e.index == 0).unwrap();
        assert_eq!(
            l7.edx,
            (1 << 26) | (1 << 29),
            "SPEC_CTRL and ARCH_CAPABILITIES"
        );
        assert!(
            !q.iter().any(|e| e.function == 7 && e.index == 1),
            "no subleaf 1"
        );
        let l72 = q.iter().find(|e| e.function == 7 && e.index == 2).unwrap();
        assert_eq!(l72.edx, 1 << 4, "BHI_CTRL only");
    }

    #[test]
    fn a_model_the_host_cannot_give_is_refused() {
        let poor = vec![entry(1, 0, 1 | (1 << 13)), entry(0x8000_0001, 0, 1)];
        assert!(apply_model(&poor, CpuModel::Qemu64).is_ok());
        let e = apply_model(&poor, CpuModel::X86_64V3).unwrap_err();
        assert!(e.missing.contains("AVX2"), "{e}");
        assert!(e.missing.contains("SSE4.2"), "{e}");
    }

    #[test]
    fn names_round_trip() {
        for m in CpuModel::ALL {
            assert_eq!(m.name().parse::<CpuModel>(), Ok(m));
            assert_eq!(
                serde_json::to_string(&m).unwrap(),
                format!("\"{}\"", m.name())
            );
        }
        assert!("pentium".parse::<CpuModel>().is_err());
    }
}
