//! The E820 memory map handed to the guest (zero page and PVH share it).

use crate::layout::*;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The map for a guest of `mem_size` bytes: conventional memory, the BIOS/ACPI area
/// reserved, extended memory up to the MMIO gap, and the rest above 4 GiB.
pub fn memory_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: ACPI_START,
            size: ACPI_END - ACPI_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, len) in ram_regions(mem_size) {
        let start = start.max(HIMEM_START);
        let end = start.max(if start == HIMEM_START {
            len
        } else {
            start + len
        });
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_map() {
        let m = memory_map(256 << 20);
        assert_eq!(m.len(), 3);
        assert_eq!(m[2].addr, HIMEM_START);
        assert_eq!(m[2].addr + m[2].size, 256 << 20);
    }

    #[test]
    fn big_guest_map_has_high_memory() {
        let m = memory_map(5 << 30);
        assert_eq!(m[2].addr + m[2].size, MMIO_GAP_START);
        assert_eq!(m[3].addr, MMIO_GAP_END);
        assert_eq!(m[3].size, (5 << 30) - MMIO_GAP_START);
    }
}
