//! The CPU state a kernel is entered with: the 64-bit Linux boot protocol (long mode,
//! identity paging, RSI = boot_params) or PVH (32-bit protected mode, paging off,
//! EBX = hvm_start_info).

use hypervisor::regs::bits::*;
use hypervisor::{DescriptorTable, MsrEntry, Regs, Segment, Sregs};

use crate::layout::*;

/// Which entry ABI the kernel is started through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux's 64-bit boot protocol (bzImage or ELF vmlinux without a PVH note).
    Linux64,
    /// Xen's PVH direct boot (ELF with XEN_ELFNOTE_PHYS32_ENTRY).
    Pvh,
}

/// GDT selectors. The 64-bit protocol requires __BOOT_CS = 0x10 and __BOOT_DS = 0x18.
pub const LINUX64_CS: u16 = 0x10;
pub const LINUX64_DS: u16 = 0x18;
pub const PVH_CS: u16 = 0x08;
pub const PVH_DS: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x20;

/// The boot GDT's entries for `protocol` (the TSS takes the last two slots).
pub fn gdt(protocol: BootProtocol) -> [u64; 6] {
    let (cs, ds) = code_data(protocol);
    let tss = tss();
    let mut g = [0u64; 6];
    g[usize::from(cs.selector >> 3)] = cs.gdt_entry();
    g[usize::from(ds.selector >> 3)] = ds.gdt_entry();
    // A 64-bit TSS descriptor spans two slots; base 0 keeps the high half zero.
    g[usize::from(TSS_SELECTOR >> 3)] = Segment { type_: 0x9, ..tss }.gdt_entry();
    g
}

fn code_data(protocol: BootProtocol) -> (Segment, Segment) {
    match protocol {
        BootProtocol::Linux64 => (Segment::code64(LINUX64_CS), Segment::data(LINUX64_DS)),
        BootProtocol::Pvh => (Segment::code32(PVH_CS), Segment::data(PVH_DS)),
    }
}

fn tss() -> Segment {
    Segment::tss64(TSS_SELECTOR, 0, 0x67)
}

/// Identity page tables for the first 4 GiB with 2 MiB pages: PML4, PDPT, four PDs.
/// Returns (guest address, page bytes) pairs. The user bit is set so that small test
/// guests can drop to CPL3 without building their own tables; Linux replaces these.
pub fn identity_page_tables() -> Vec<(u64, Vec<u8>)> {
    const P_RW_US: u64 = 0x7;
    const PS: u64 = 0x80;
    let mut pml4 = vec![0u8; 4096];
    pml4[0..8].copy_from_slice(&(PDPTE_START | P_RW_US).to_le_bytes());
    let mut pdpt = vec![0u8; 4096];
    let mut pages = Vec::new();
    for i in 0..4u64 {
        let pd_addr = PDE_START + i * 0x1000;
        pdpt[i as usize * 8..i as usize * 8 + 8]
            .copy_from_slice(&(pd_addr | P_RW_US).to_le_bytes());
        let mut pd = vec![0u8; 4096];
        for j in 0..512u64 {
            let phys = (i << 30) | (j << 21);
            pd[j as usize * 8..j as usize * 8 + 8]
                .copy_from_slice(&(phys | P_RW_US | PS).to_le_bytes());
        }
        pages.push((pd_addr, pd));
    }
    pages.push((PML4_START, pml4));
    pages.push((PDPTE_START, pdpt));
    pages
}

/// Registers for the bootstrap processor at kernel entry.
pub fn boot_regs(protocol: BootProtocol, entry: u64) -> Regs {
    match protocol {
        BootProtocol::Linux64 => Regs {
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            rflags: RFLAGS_RESERVED,
            ..Regs::default()
        },
        BootProtocol::Pvh => Regs {
            rip: entry,
            rbx: PVH_INFO_START,
            rflags: RFLAGS_RESERVED,
            ..Regs::default()
        },
    }
}

/// Segment and control registers for the bootstrap processor at kernel entry.
pub fn boot_sregs(protocol: BootProtocol) -> Sregs {
    let (cs, ds) = code_data(protocol);
    let gdt = DescriptorTable {
        base: BOOT_GDT_START,
        limit: (6 * 8 - 1) as u16,
    };
    let idt = DescriptorTable {
        base: BOOT_IDT_START,
        limit: 7,
    };
    let tr = Segment {
        type_: 0xb,
        ..tss()
    };
    let base = Sregs {
        cs,
        ds,
        es: ds,
        fs: ds,
        gs: ds,
        ss: ds,
        tr,
        ldt: Segment {
            type_: 0x2,
            present: true,
            unusable: false,
            ..Segment::default()
        },
        gdt,
        idt,
        apic_base: APIC_BASE_DEFAULT_BSP,
        ..Sregs::default()
    };
    match protocol {
        BootProtocol::Linux64 => Sregs {
            cr0: CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG,
            cr3: PML4_START,
            cr4: CR4_PAE,
            efer: EFER_LME | EFER_LMA,
            ..base
        },
        BootProtocol::Pvh => Sregs {
            cr0: CR0_PE | CR0_ET | CR0_NE,
            ..base
        },
    }
}

/// MSR values at kernel entry, as firmware would leave them.
pub fn boot_msrs() -> Vec<MsrEntry> {
    let m = |index, value| MsrEntry { index, value };
    vec![
        m(MSR_IA32_SYSENTER_CS, 0),
        m(MSR_IA32_SYSENTER_ESP, 0),
        m(MSR_IA32_SYSENTER_EIP, 0),
        m(MSR_STAR, 0),
        m(MSR_CSTAR, 0),
        m(MSR_KERNEL_GS_BASE, 0),
        m(MSR_SYSCALL_MASK, 0),
        m(MSR_LSTAR, 0),
        m(MSR_IA32_TSC, 0),
        m(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        m(MSR_IA32_CR_PAT, 0x0007_0406_0007_0406),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_selectors_match_the_protocols() {
        let g = gdt(BootProtocol::Linux64);
        assert_eq!(g[2], 0x00af_9b00_0000_ffff);
        assert_eq!(g[3], 0x00cf_9300_0000_ffff);
        let g = gdt(BootProtocol::Pvh);
        assert_eq!(g[1], 0x00cf_9b00_0000_ffff);
        assert_eq!(g[2], 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let pages = identity_page_tables();
        let pd3 = &pages
            .iter()
            .find(|(a, _)| *a == PDE_START + 0x3000)
            .unwrap()
            .1;
        let last = u64::from_le_bytes(pd3[511 * 8..512 * 8].try_into().unwrap());
        assert_eq!(last & !0xfff, 0xffe0_0000);
    }
}
