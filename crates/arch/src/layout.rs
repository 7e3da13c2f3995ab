//! Where things live in guest-physical memory.
//!
//! Low memory follows the PC conventions Linux expects (real-mode area, EBDA hole, BIOS
//! area at 0xe0000..0x100000 where it scans for the ACPI RSDP); devices sit in a 1 GiB gap
//! below 4 GiB, as on real hardware.

/// The boot GDT: null, (unused), code64, data, TSS.
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: any fault before the kernel installs its own triple-faults, visibly.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH: `hvm_start_info`, then its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: PML4, PDPT, then four page directories (2 MiB pages) covering
/// the first 4 GiB, including the MMIO gap so early code can reach the APICs.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// End of conventional memory (where the EBDA would start).
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables, in the BIOS area Linux scans for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x100000;
/// Start of extended memory.
pub const HIMEM_START: u64 = 0x100000;
/// The MMIO gap: [MMIO_GAP_START, 4 GiB) holds no RAM.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The PCI host bridge's 32-bit memory window, where BARs are placed (the DSDT's
/// `_CRS` for `PCI0` publishes it).
pub const PCI_MMIO_START: u64 = 0xc000_0000;
pub const PCI_MMIO_SIZE: u64 = 0x1000_0000;
/// ECAM for PCI bus 0 (the MCFG table points there): 1 MiB.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// Virtio-mmio device windows, one page each, from here up.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;

/// The q35-like platform UEFI firmware (OVMF) boots on: OVMF's q35 build puts ECAM at
/// 0xb000_0000 (256 MiB) and its 32-bit PCI window from there to 0xfc00_0000, so low RAM
/// ends where ECAM starts.
pub const UEFI_MMIO_GAP_START: u64 = 0xb000_0000;
pub const UEFI_PCI_ECAM_START: u64 = 0xb000_0000;
pub const UEFI_PCI_ECAM_SIZE: u64 = 0x1000_0000;
pub const UEFI_PCI_MMIO_START: u64 = 0xc000_0000;
pub const UEFI_PCI_MMIO_SIZE: u64 = 0xfc00_0000 - UEFI_PCI_MMIO_START;

/// The guest RAM regions (start, length) for `mem_size` bytes of memory: one below the
/// MMIO gap and, for large guests, the rest above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    ram_regions_below(mem_size, MMIO_GAP_START)
}

/// As [`ram_regions`], with the MMIO gap starting at `gap_start`.
pub fn ram_regions_below(mem_size: u64, gap_start: u64) -> Vec<(u64, u64)> {
    if mem_size <= gap_start {
        vec![(0, mem_size)]
    } else {
        vec![(0, gap_start), (MMIO_GAP_END, mem_size - gap_start)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_guests_skip_the_mmio_gap() {
        assert_eq!(ram_regions(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(
            ram_regions(4 << 30),
            vec![(0, MMIO_GAP_START), (MMIO_GAP_END, 1 << 30)]
        );
        assert_eq!(
            ram_regions_below(3 << 30, UEFI_MMIO_GAP_START),
            vec![
                (0, UEFI_MMIO_GAP_START),
                (MMIO_GAP_END, (3 << 30) - UEFI_MMIO_GAP_START)
            ]
        );
    }
}
