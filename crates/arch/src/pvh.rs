//! PVH boot (Xen's direct-boot ABI): `hvm_start_info` and its memory map.
//!
//! The kernel is entered in 32-bit protected mode, paging off, with EBX pointing at the
//! start info (see xen/include/public/arch-x86/hvm/start_info.h).

use crate::e820::E820Entry;

pub const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Size of `hvm_start_info` (version 1).
pub const START_INFO_SIZE: usize = 56;
/// Size of one `hvm_memmap_table_entry`.
pub const MEMMAP_ENTRY_SIZE: usize = 24;
/// Size of one `hvm_modlist_entry`.
pub const MODLIST_ENTRY_SIZE: usize = 32;

pub struct StartInfo<'a> {
    pub cmdline_addr: u64,
    pub rsdp_addr: u64,
    pub modlist_addr: u64,
    /// The initrd as module 0.
    pub initrd: Option<(u64, u64)>,
    pub memmap_addr: u64,
    pub e820: &'a [E820Entry],
}

impl StartInfo<'_> {
    /// The start info, the module list and the memory map, as three byte blobs.
    pub fn build(&self) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let mut si = vec![0u8; START_INFO_SIZE];
        si[0..4].copy_from_slice(&XEN_HVM_START_MAGIC.to_le_bytes());
        si[4..8].copy_from_slice(&1u32.to_le_bytes()); // version
        let nr_modules = u32::from(self.initrd.is_some());
        si[12..16].copy_from_slice(&nr_modules.to_le_bytes());
        si[16..24].copy_from_slice(&self.modlist_addr.to_le_bytes());
        si[24..32].copy_from_slice(&self.cmdline_addr.to_le_bytes());
        si[32..40].copy_from_slice(&self.rsdp_addr.to_le_bytes());
        si[40..48].copy_from_slice(&self.memmap_addr.to_le_bytes());
        si[48..52].copy_from_slice(&(self.e820.len() as u32).to_le_bytes());

        let mut modlist = Vec::new();
        if let Some((addr, size)) = self.initrd {
            modlist.resize(MODLIST_ENTRY_SIZE, 0);
            modlist[0..8].copy_from_slice(&addr.to_le_bytes());
            modlist[8..16].copy_from_slice(&size.to_le_bytes());
        }
        let mut memmap = Vec::with_capacity(self.e820.len() * MEMMAP_ENTRY_SIZE);
        for e in self.e820 {
            memmap.extend_from_slice(&e.addr.to_le_bytes());
            memmap.extend_from_slice(&e.size.to_le_bytes());
            memmap.extend_from_slice(&e.kind.to_le_bytes());
            memmap.extend_from_slice(&0u32.to_le_bytes());
        }
        (si, modlist, memmap)
    }
}
