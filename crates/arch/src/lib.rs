//! The x86-64 platform: Linux boot protocol (bzImage, ELF vmlinux, PVH), zero page, E820,
//! command line, initrd, ACPI tables, CPUID policy and the kernel entry state.

pub mod acpi;
pub mod bootparams;
pub mod bzimage;
pub mod cpuid;
pub mod e820;
pub mod elf;
pub mod entry;
pub mod firmware;
pub mod layout;
pub mod pvh;
pub mod smbios;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub use entry::BootProtocol;

use bzimage::{BzImage, BzImageError};
use elf::{ElfError, ElfKernel};
use layout::*;

/// Errors while putting a kernel into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the kernel is neither a bzImage nor an ELF vmlinux")]
    UnknownFormat,
    #[error("bad bzImage: {0}")]
    BzImage(#[from] BzImageError),
    #[error("bad ELF kernel: {0}")]
    Elf(#[from] ElfError),
    #[error("guest memory is too small: {what} needs up to {needed:#x} but RAM ends at {have:#x}")]
    MemoryTooSmall {
        what: &'static str,
        needed: u64,
        have: u64,
    },
    #[error("the kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("writing {what} to guest memory at {addr:#x}: {source}")]
    GuestWrite {
        what: &'static str,
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
}

/// What to boot.
pub struct BootConfig<'a> {
    pub kernel: &'a [u8],
    pub initrd: Option<&'a [u8]>,
    pub cmdline: &'a str,
    pub mem_size: u64,
    pub acpi: acpi::AcpiConfig,
}

/// Where the loaded kernel starts and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedKernel {
    pub protocol: BootProtocol,
    pub entry: u64,
    /// (address, size) of the initrd in guest memory.
    pub initrd: Option<(u64, u64)>,
    /// Where kernel text/data end (the loader keeps everything else above it).
    pub kernel_end: u64,
}

/// The default command-line limit when the kernel does not state one (x86
/// COMMAND_LINE_SIZE).
const DEFAULT_CMDLINE_MAX: usize = 2048;

fn write(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: u64,
    data: &[u8],
) -> Result<(), LoadError> {
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|source| LoadError::GuestWrite { what, addr, source })
}

/// Copy an ELF kernel's PT_LOAD segments to their physical addresses; returns where the
/// highest one ends.
fn load_elf_segments(
    mem: &GuestMemoryMmap,
    image: &[u8],
    elf: &ElfKernel,
    check: &dyn Fn(&'static str, u64) -> Result<(), LoadError>,
) -> Result<u64, LoadError> {
    let mut end = 0;
    for seg in &elf.segments {
        let seg_end = seg.paddr.saturating_add(seg.mem_size);
        if seg.paddr < HIMEM_START {
            return Err(LoadError::MemoryTooSmall {
                what: "an ELF segment below 1 MiB (reserved for boot data)",
                needed: seg.paddr,
                have: HIMEM_START,
            });
        }
        check("the kernel's segments", seg_end)?;
        // ElfKernel::parse checked the file range.
        let data = &image[seg.file_offset as usize..][..seg.file_size as usize];
        write(mem, "kernel segment", seg.paddr, data)?;
        end = end.max(seg_end);
    }
    Ok(end)
}

/// Load kernel, initrd, command line, boot tables and ACPI into `mem`.
pub fn load_kernel(mem: &GuestMemoryMmap, cfg: &BootConfig) -> Result<LoadedKernel, LoadError> {
    let low_end = cfg.mem_size.min(MMIO_GAP_START);
    let check = |what, needed: u64| {
        if needed > low_end {
            Err(LoadError::MemoryTooSmall {
                what,
                needed,
                have: low_end,
            })
        } else {
            Ok(())
        }
    };

    let (protocol, entry, kernel_end, header, cmdline_max, initrd_max) =
        if BzImage::is_bzimage(cfg.kernel) {
            let bz = BzImage::parse(cfg.kernel)?;
            let max = match bz.header.cmdline_size {
                0 => DEFAULT_CMDLINE_MAX,
                n => n as usize,
            };
            let initrd_max = u64::from(bz.header.initrd_addr_max);
            // Unpacking the kernel on the host spares a software CPU the guest's own
            // decompressor (seconds of emulated time); the entry is then startup_64 of
            // the vmlinux, with the bzImage's setup header in the zero page.
            let unpacked = bz
                .decompress_lz4_payload()
                .and_then(|v| ElfKernel::parse(&v).ok().map(|e| (v, e)));
            match unpacked {
                Some((vmlinux, elf)) => {
                    let end = load_elf_segments(mem, &vmlinux, &elf, &check)?;
                    tracing::debug!(
                        bytes = vmlinux.len(),
                        "bzImage payload unpacked on the host"
                    );
                    (
                        BootProtocol::Linux64,
                        elf.entry,
                        end,
                        Some(bz.header),
                        max,
                        initrd_max,
                    )
                }
                None => {
                    let load = bz.header.pref_address.max(HIMEM_START);
                    let end = load + u64::from(bz.header.init_size).max(bz.kernel.len() as u64);
                    check("the kernel (its init_size)", end)?;
                    write(mem, "kernel", load, bz.kernel)?;
                    (
                        BootProtocol::Linux64,
                        load + 0x200,
                        end,
                        Some(bz.header),
                        max,
                        initrd_max,
                    )
                }
            }
        } else if ElfKernel::is_elf(cfg.kernel) {
            let elf = ElfKernel::parse(cfg.kernel)?;
            let end = load_elf_segments(mem, cfg.kernel, &elf, &check)?;
            let (protocol, entry) = match elf.pvh_entry {
                Some(e) => (BootProtocol::Pvh, u64::from(e)),
                None => (BootProtocol::Linux64, elf.entry),
            };
            (protocol, entry, end, None, DEFAULT_CMDLINE_MAX, 0xffff_ffff)
        } else {
            return Err(LoadError::UnknownFormat);
        };

    // Command line.
    if cfg.cmdline.as_bytes().contains(&0) {
        return Err(LoadError::CmdlineNul);
    }
    let limit = cmdline_max.min(CMDLINE_MAX_SIZE);
    if cfg.cmdline.len() + 1 > limit {
        return Err(LoadError::CmdlineTooLong {
            len: cfg.cmdline.len(),
            max: limit - 1,
        });
    }
    let mut cmdline = cfg.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    write(mem, "command line", CMDLINE_START, &cmdline)?;

    // Initrd: as high in low memory as the kernel allows, above the kernel.
    let initrd = match cfg.initrd {
        Some(data) => {
            let top = low_end.min(initrd_max.saturating_add(1));
            let size = data.len() as u64;
            let addr = top.saturating_sub(size) & !0xfff;
            if size > top || addr < kernel_end {
                return Err(LoadError::MemoryTooSmall {
                    what: "the initrd above the kernel",
                    needed: kernel_end + size,
                    have: low_end,
                });
            }
            write(mem, "initrd", addr, data)?;
            Some((addr, size))
        }
        None => None,
    };

    // ACPI, and below the end of the first MiB the code a jump to the BIOS finds.
    let tables = acpi::build_tables(&cfg.acpi, ACPI_START);
    let tables_end = ACPI_START + tables.len() as u64;
    if tables_end > firmware::RESET_VECTOR {
        return Err(LoadError::MemoryTooSmall {
            what: "the ACPI tables below the reset vector",
            needed: tables_end,
            have: firmware::RESET_VECTOR,
        });
    }
    write(mem, "ACPI tables", ACPI_START, &tables)?;
    write(
        mem,
        "reset vector",
        firmware::RESET_VECTOR,
        &firmware::reset_vector_code(),
    )?;

    let map = e820::memory_map(cfg.mem_size);
    let gdt: Vec<u8> = entry::gdt(protocol)
        .iter()
        .flat_map(|e| e.to_le_bytes())
        .collect();
    write(mem, "GDT", BOOT_GDT_START, &gdt)?;
    write(mem, "IDT", BOOT_IDT_START, &[0u8; 8])?;
    match protocol {
        BootProtocol::Linux64 => {
            let zp = bootparams::ZeroPage {
                header: header.as_ref(),
                cmdline_addr: CMDLINE_START,
                cmdline_size: limit as u32,
                initrd,
                e820: &map,
                rsdp_addr: ACPI_START,
            }
            .build();
            write(mem, "zero page", ZERO_PAGE_START, &zp)?;
            for (addr, page) in entry::identity_page_tables() {
                write(mem, "page tables", addr, &page)?;
            }
        }
        BootProtocol::Pvh => {
            let (si, modlist, memmap) = pvh::StartInfo {
                cmdline_addr: CMDLINE_START,
                rsdp_addr: ACPI_START,
                modlist_addr: PVH_MODLIST_START,
                initrd,
                memmap_addr: PVH_MEMMAP_START,
                e820: &map,
            }
            .build();
            write(mem, "PVH start info", PVH_INFO_START, &si)?;
            write(mem, "PVH module list", PVH_MODLIST_START, &modlist)?;
            write(mem, "PVH memory map", PVH_MEMMAP_START, &memmap)?;
        }
    }
    Ok(LoadedKernel {
        protocol,
        entry,
        initrd,
        kernel_end,
    })
}
