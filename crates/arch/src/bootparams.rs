//! The Linux zero page (`struct boot_params`) for the 64-bit boot protocol.

use crate::bzimage::SetupHeader;
use crate::e820::E820Entry;

pub const ZERO_PAGE_SIZE: usize = 4096;
const ACPI_RSDP_ADDR: usize = 0x070;
const EXT_RAMDISK_IMAGE: usize = 0x0c0;
const EXT_RAMDISK_SIZE: usize = 0x0c4;
const E820_ENTRIES: usize = 0x1e8;
const HDR_START: usize = 0x1f1;
const VID_MODE: usize = 0x1fa;
const BOOT_FLAG: usize = 0x1fe;
const HEADER: usize = 0x202;
const VERSION: usize = 0x206;
const TYPE_OF_LOADER: usize = 0x210;
const LOADFLAGS: usize = 0x211;
const RAMDISK_IMAGE: usize = 0x218;
const RAMDISK_SIZE: usize = 0x21c;
const CMD_LINE_PTR: usize = 0x228;
const KERNEL_ALIGNMENT: usize = 0x230;
const CMDLINE_SIZE: usize = 0x238;
const E820_TABLE: usize = 0x2d0;
const E820_MAX: usize = 128;
/// loadflags: the protected-mode code is loaded at 0x100000 or above.
const LOADED_HIGH: u8 = 1;
/// type_of_loader 0xff: "undefined" boot loader, as other VMMs report.
const LOADER_UNDEFINED: u8 = 0xff;

/// What goes into the zero page.
pub struct ZeroPage<'a> {
    /// The kernel's setup header, or None for an ELF vmlinux (a synthetic one is written).
    pub header: Option<&'a SetupHeader>,
    pub cmdline_addr: u64,
    pub cmdline_size: u32,
    pub initrd: Option<(u64, u64)>,
    pub e820: &'a [E820Entry],
    pub rsdp_addr: u64,
}

fn put(p: &mut [u8], at: usize, bytes: &[u8]) {
    p[at..at + bytes.len()].copy_from_slice(bytes);
}

impl ZeroPage<'_> {
    pub fn build(&self) -> [u8; ZERO_PAGE_SIZE] {
        let mut p = [0u8; ZERO_PAGE_SIZE];
        match self.header {
            Some(h) => {
                let n = h.raw.len().min(ZERO_PAGE_SIZE - HDR_START);
                put(&mut p, HDR_START, &h.raw[..n]);
            }
            None => {
                put(&mut p, BOOT_FLAG, &0xaa55u16.to_le_bytes());
                put(&mut p, HEADER, b"HdrS");
                put(&mut p, VERSION, &0x020fu16.to_le_bytes());
                put(&mut p, KERNEL_ALIGNMENT, &0x100_0000u32.to_le_bytes());
                put(&mut p, CMDLINE_SIZE, &self.cmdline_size.to_le_bytes());
            }
        }
        put(&mut p, VID_MODE, &0xffffu16.to_le_bytes());
        p[TYPE_OF_LOADER] = LOADER_UNDEFINED;
        p[LOADFLAGS] |= LOADED_HIGH;
        put(
            &mut p,
            CMD_LINE_PTR,
            &(self.cmdline_addr as u32).to_le_bytes(),
        );
        if let Some((addr, size)) = self.initrd {
            put(&mut p, RAMDISK_IMAGE, &(addr as u32).to_le_bytes());
            put(&mut p, RAMDISK_SIZE, &(size as u32).to_le_bytes());
            put(
                &mut p,
                EXT_RAMDISK_IMAGE,
                &((addr >> 32) as u32).to_le_bytes(),
            );
            put(
                &mut p,
                EXT_RAMDISK_SIZE,
                &((size >> 32) as u32).to_le_bytes(),
            );
        }
        put(&mut p, ACPI_RSDP_ADDR, &self.rsdp_addr.to_le_bytes());
        let entries = self.e820.len().min(E820_MAX);
        p[E820_ENTRIES] = entries as u8;
        for (i, e) in self.e820.iter().take(entries).enumerate() {
            let at = E820_TABLE + i * 20;
            put(&mut p, at, &e.addr.to_le_bytes());
            put(&mut p, at + 8, &e.size.to_le_bytes());
            put(&mut p, at + 16, &e.kind.to_le_bytes());
        }
        p
    }
}

/// Read back what a zero page says (tests compare it with what the guest printed).
pub mod read {
    use super::*;

    pub fn cmdline_ptr(p: &[u8]) -> u32 {
        u32::from_le_bytes(
            p[CMD_LINE_PTR..CMD_LINE_PTR + 4]
                .try_into()
                .unwrap_or([0; 4]),
        )
    }

    pub fn initrd(p: &[u8]) -> (u32, u32) {
        let r = |o: usize| u32::from_le_bytes(p[o..o + 4].try_into().unwrap_or([0; 4]));
        (r(RAMDISK_IMAGE), r(RAMDISK_SIZE))
    }

    pub fn e820(p: &[u8]) -> Vec<E820Entry> {
        let n = usize::from(p[E820_ENTRIES]).min(E820_MAX);
        (0..n)
            .map(|i| {
                let at = E820_TABLE + i * 20;
                let q = |o: usize| u64::from_le_bytes(p[o..o + 8].try_into().unwrap_or([0; 8]));
                E820Entry {
                    addr: q(at),
                    size: q(at + 8),
                    kind: u32::from_le_bytes(p[at + 16..at + 20].try_into().unwrap_or([0; 4])),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e820::memory_map;

    #[test]
    fn fields_land_where_the_protocol_says() {
        let map = memory_map(256 << 20);
        let zp = ZeroPage {
            header: None,
            cmdline_addr: 0x20000,
            cmdline_size: 2048,
            initrd: Some((0x0800_0000, 0x1234)),
            e820: &map,
            rsdp_addr: 0xe0000,
        }
        .build();
        assert_eq!(read::cmdline_ptr(&zp), 0x20000);
        assert_eq!(read::initrd(&zp), (0x0800_0000, 0x1234));
        assert_eq!(read::e820(&zp), map);
        assert_eq!(&zp[HEADER..HEADER + 4], b"HdrS");
        assert_eq!(zp[TYPE_OF_LOADER], 0xff);
    }
}
