//! What stands in for firmware at the reset vector.
//!
//! Vessel boots kernels directly, with no BIOS, yet a guest can still jump to the real-mode
//! reset vector F000:FFF0 expecting one to be there: Linux does for `reboot=b`, and by
//! default on hardware-reduced ACPI, where it tries EFI first (a directly booted kernel has
//! no EFI runtime, so that returns) and then the BIOS. A BIOS would restart the machine
//! from there. With nothing at the vector the CPU ran zeroed memory forever, so the code
//! placed here resets the machine instead: it writes the FADT's reset register, pulses the
//! i8042's reset line should that not end the VM, and halts with interrupts off.

use crate::acpi::{RESET_PORT, RESET_VALUE};
use crate::layout::{ACPI_END, ACPI_START};

/// F000:FFF0, where a real-mode far jump to the BIOS lands.
pub const RESET_VECTOR: u64 = 0xffff0;
// The code runs to the end of the first MiB, in the BIOS area the E820 map reserves.
const _: () = assert!(RESET_VECTOR >= ACPI_START && RESET_VECTOR + 16 == ACPI_END);

/// The i8042's command port and its "pulse reset line" command.
const I8042_COMMAND_PORT: u8 = 0x64;
const I8042_PULSE_RESET: u8 = 0xfe;

/// The 16 bytes of 16-bit code at [`RESET_VECTOR`].
#[rustfmt::skip]
pub fn reset_vector_code() -> [u8; 16] {
    let [port_lo, port_hi] = RESET_PORT.to_le_bytes();
    [
        0xba, port_lo, port_hi,         // mov dx, RESET_PORT
        0xb0, RESET_VALUE,              // mov al, RESET_VALUE
        0xee,                           // out dx, al
        0xb0, I8042_PULSE_RESET,        // mov al, 0xfe
        0xe6, I8042_COMMAND_PORT,       // out 0x64, al
        0xfa,                           // cli
        0xf4,                           // hlt
        0xeb, 0xfd,                     // jmp short back to the hlt
        0x90, 0x90,                     // nop (padding)
    ]
}

/// A BIOS image (SeaBIOS's `bios.bin`, 128 or 256 KiB) is mapped so that it ends at
/// 4 GiB, where the reset vector fetches from; its last 128 KiB are also copied to the
/// legacy BIOS area below 1 MiB (0xe0000–0xfffff), where its real-mode code runs.
pub const BIOS_MAX_SIZE: u64 = 16 << 20;
/// The legacy BIOS area's size.
pub const LEGACY_BIOS_SIZE: u64 = 128 << 10;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FirmwareError {
    #[error(
        "a firmware image of {0} bytes: a BIOS must be a multiple of 64 KiB, UEFI code and \
         variables multiples of 4 KiB, at most 16 MiB"
    )]
    Size(u64),
    #[error("writing the BIOS image to guest memory at {0:#x}")]
    Write(u64),
}

/// Where a BIOS image of `len` bytes lives below 4 GiB: (base, len).
pub fn bios_region(len: u64) -> Result<(u64, u64), FirmwareError> {
    if len == 0 || len > BIOS_MAX_SIZE || !len.is_multiple_of(64 << 10) {
        return Err(FirmwareError::Size(len));
    }
    Ok((crate::layout::MMIO_GAP_END - len, len))
}

/// Copy `image` to its region below 4 GiB (which `mem` must hold) and its tail to the
/// legacy BIOS area.
pub fn load_bios(mem: &vm_memory::GuestMemoryMmap, image: &[u8]) -> Result<(), FirmwareError> {
    use vm_memory::{Bytes, GuestAddress};
    let (base, len) = bios_region(image.len() as u64)?;
    mem.write_slice(image, GuestAddress(base))
        .map_err(|_| FirmwareError::Write(base))?;
    let tail = len.min(LEGACY_BIOS_SIZE);
    let low = ACPI_END - tail;
    mem.write_slice(&image[(len - tail) as usize..], GuestAddress(low))
        .map_err(|_| FirmwareError::Write(low))?;
    Ok(())
}

/// Where the signature of a UEFI firmware volume header ("_FVH") sits in it: an image
/// that starts with one is UEFI firmware (OVMF's code, or its combined image), not a
/// legacy BIOS.
const FV_SIGNATURE_OFFSET: usize = 40;
const FV_SIGNATURE: &[u8; 4] = b"_FVH";

/// Whether `image` is UEFI firmware (a firmware volume), rather than a BIOS.
pub fn is_uefi(image: &[u8]) -> bool {
    image.get(FV_SIGNATURE_OFFSET..FV_SIGNATURE_OFFSET + 4) == Some(FV_SIGNATURE.as_slice())
}

/// UEFI firmware's two flash devices as QEMU maps them (`-drive if=pflash`): the code
/// ends at 4 GiB, the variable store sits right below it. OVMF's build fixes these
/// addresses (its flash base is 4 GiB minus both sizes), so the two images must be a
/// matching pair (OVMF_CODE_4M.fd with OVMF_VARS_4M.fd).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UefiFlash {
    pub vars_base: u64,
    pub vars_len: u64,
    pub code_base: u64,
    pub code_len: u64,
}

/// The flash layout for a code image of `code_len` and a variable store of `vars_len`
/// bytes: each a multiple of 4 KiB (the flash's erase block), 16 MiB at most together.
pub fn uefi_flash(code_len: u64, vars_len: u64) -> Result<UefiFlash, FirmwareError> {
    let block = 4096;
    for len in [code_len, vars_len] {
        if len == 0 || !len.is_multiple_of(block) {
            return Err(FirmwareError::Size(len));
        }
    }
    let total = code_len + vars_len;
    if total > BIOS_MAX_SIZE {
        return Err(FirmwareError::Size(total));
    }
    let code_base = crate::layout::MMIO_GAP_END - code_len;
    Ok(UefiFlash {
        vars_base: code_base - vars_len,
        vars_len,
        code_base,
        code_len,
    })
}

/// Copy UEFI code to its region ending at 4 GiB (which `mem` must hold).
pub fn load_uefi_code(
    mem: &vm_memory::GuestMemoryMmap,
    flash: &UefiFlash,
    code: &[u8],
) -> Result<(), FirmwareError> {
    use vm_memory::{Bytes, GuestAddress};
    if code.len() as u64 != flash.code_len {
        return Err(FirmwareError::Size(code.len() as u64));
    }
    mem.write_slice(code, GuestAddress(flash.code_base))
        .map_err(|_| FirmwareError::Write(flash.code_base))
}

/// A bzImage prepared for a boot through firmware, the way QEMU's `linuxboot` option
/// ROM takes it from fw_cfg: the real-mode setup (its header filled in as a boot loader
/// does, per the Linux boot protocol) for 0x10000, the command line for 0x20000, the
/// protected-mode kernel for 1 MiB and the initrd near the top of low memory. The ROM
/// copies each to its address and jumps to the setup code in real mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirmwareLinux {
    pub setup_addr: u32,
    pub setup: Vec<u8>,
    pub cmdline_addr: u32,
    /// NUL-terminated.
    pub cmdline: Vec<u8>,
    pub kernel_addr: u32,
    pub kernel: Vec<u8>,
    pub initrd_addr: u32,
    pub initrd: Vec<u8>,
}

/// Where the real-mode setup, the command line and the kernel go (the classic
/// "loaded high" layout of the boot protocol).
const FW_SETUP_ADDR: u32 = 0x1_0000;
const FW_CMDLINE_ADDR: u32 = 0x2_0000;
const FW_KERNEL_ADDR: u32 = 0x10_0000;
/// Room the firmware keeps for itself at the top of low memory (its high zone: ACPI
/// tables and more), which the initrd must stay below.
const FW_HIGH_ZONE: u64 = 1 << 20;
/// Setup header fields (Documentation/arch/x86/boot.rst).
const HDR_TYPE_OF_LOADER: usize = 0x210;
const HDR_LOADFLAGS: usize = 0x211;
const HDR_RAMDISK_IMAGE: usize = 0x218;
const HDR_RAMDISK_SIZE: usize = 0x21c;
const HDR_HEAP_END_PTR: usize = 0x224;
const HDR_CMD_LINE_PTR: usize = 0x228;
const HDR_INITRD_ADDR_MAX: usize = 0x22c;
const HDR_CMDLINE_SIZE: usize = 0x238;
/// loadflags: the setup code may use the heap up to heap_end_ptr.
const CAN_USE_HEAP: u8 = 0x80;
/// type_of_loader: "undefined" (no registered ID).
const LOADER_UNDEFINED: u8 = 0xff;

/// Prepare `image` (a bzImage) with `initrd` and `cmdline` for a firmware boot on a
/// machine whose low RAM ends at `low_ram_end`.
pub fn linux_for_firmware(
    image: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &str,
    low_ram_end: u64,
) -> Result<FirmwareLinux, crate::LoadError> {
    let bz = crate::bzimage::BzImage::parse(image)?;
    let setup_len = image.len() - bz.kernel.len();
    let mut setup = image[..setup_len].to_vec();
    let put32 =
        |s: &mut Vec<u8>, at: usize, v: u32| s[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let u32_at = |s: &[u8], at: usize| u32::from_le_bytes([s[at], s[at + 1], s[at + 2], s[at + 3]]);
    let max_cmdline = u32_at(&setup, HDR_CMDLINE_SIZE) as usize;
    if cmdline.len() > max_cmdline {
        return Err(crate::LoadError::CmdlineTooLong {
            len: cmdline.len(),
            max: max_cmdline,
        });
    }
    setup[HDR_TYPE_OF_LOADER] = LOADER_UNDEFINED;
    setup[HDR_LOADFLAGS] |= CAN_USE_HEAP;
    let heap_end = (FW_CMDLINE_ADDR - FW_SETUP_ADDR - 0x200) as u16;
    setup[HDR_HEAP_END_PTR..HDR_HEAP_END_PTR + 2].copy_from_slice(&heap_end.to_le_bytes());
    put32(&mut setup, HDR_CMD_LINE_PTR, FW_CMDLINE_ADDR);
    let initrd = initrd.unwrap_or_default().to_vec();
    let mut initrd_addr = 0;
    if !initrd.is_empty() {
        let max = u64::from(u32_at(&setup, HDR_INITRD_ADDR_MAX))
            .min(low_ram_end.saturating_sub(FW_HIGH_ZONE));
        let kernel_end = u64::from(FW_KERNEL_ADDR) + u64::from(bz.header.init_size);
        let at = max.saturating_sub(initrd.len() as u64) & !0xfff;
        if at < kernel_end {
            return Err(crate::LoadError::MemoryTooSmall {
                what: "initrd",
                needed: kernel_end + initrd.len() as u64 + FW_HIGH_ZONE,
                have: low_ram_end,
            });
        }
        initrd_addr = at as u32;
        put32(&mut setup, HDR_RAMDISK_IMAGE, initrd_addr);
        put32(&mut setup, HDR_RAMDISK_SIZE, initrd.len() as u32);
    }
    let mut cmdline = cmdline.as_bytes().to_vec();
    cmdline.push(0);
    Ok(FirmwareLinux {
        setup_addr: FW_SETUP_ADDR,
        setup,
        cmdline_addr: FW_CMDLINE_ADDR,
        cmdline,
        kernel_addr: FW_KERNEL_ADDR,
        kernel: bz.kernel.to_vec(),
        initrd_addr,
        initrd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_for_the_linuxboot_rom_has_its_header_filled_in() {
        let mut image = crate::bzimage::tests::fake_bzimage();
        image[HDR_INITRD_ADDR_MAX..HDR_INITRD_ADDR_MAX + 4]
            .copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        let initrd = vec![7u8; 5000];
        let l = linux_for_firmware(&image, Some(&initrd), "console=ttyS0", 256 << 20).unwrap();
        let u32_at = |at: usize| u32::from_le_bytes(l.setup[at..at + 4].try_into().unwrap());
        assert_eq!(l.setup.len(), 1024, "boot sector and one setup sector");
        assert_eq!(l.kernel.len(), 4096 - 1024);
        assert_eq!(u32_at(HDR_CMD_LINE_PTR), l.cmdline_addr);
        assert_eq!(l.cmdline, b"console=ttyS0\0");
        assert_eq!(l.setup[HDR_LOADFLAGS] & CAN_USE_HEAP, CAN_USE_HEAP);
        assert_eq!(
            &l.setup[HDR_HEAP_END_PTR..HDR_HEAP_END_PTR + 2],
            &[0x00, 0xfe]
        );
        assert_eq!(u32_at(HDR_RAMDISK_SIZE), 5000);
        let at = u64::from(u32_at(HDR_RAMDISK_IMAGE));
        assert_eq!(at, u64::from(l.initrd_addr));
        assert_eq!(at % 4096, 0);
        assert!(
            at + 5000 <= (256 << 20) - FW_HIGH_ZONE,
            "below the firmware's zone"
        );
        // Too long a command line, too little memory, not a bzImage: errors.
        let long = "x".repeat(4096);
        assert!(linux_for_firmware(&image, None, &long, 256 << 20).is_err());
        assert!(linux_for_firmware(&image, Some(&initrd), "", 2 << 20).is_err());
        assert!(linux_for_firmware(&[0u8; 100], None, "", 256 << 20).is_err());
    }

    #[test]
    fn a_bios_ends_at_4_gib_and_its_tail_sits_below_1_mib() {
        use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
        let (base, len) = bios_region(128 << 10).unwrap();
        assert_eq!(base + len, 1 << 32);
        assert!(bios_region(100).is_err() && bios_region(0).is_err());
        assert!(bios_region(32 << 20).is_err());
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(base), len as usize),
        ])
        .unwrap();
        let mut image = vec![0u8; len as usize];
        image[len as usize - 16] = 0xea; // the reset vector's far jump
        load_bios(&mem, &image).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0xffff_fff0)).unwrap(), 0xea);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0xffff0)).unwrap(), 0xea);
        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert_eq!(load_bios(&small, &image), Err(FirmwareError::Write(base)));
    }

    #[test]
    fn uefi_code_ends_at_4_gib_with_its_variables_below() {
        let f = uefi_flash(0x37c000, 0x84000).unwrap();
        assert_eq!(f.code_base + f.code_len, 1 << 32);
        // OVMF's 4 MiB build: its flash starts at 0xffc00000.
        assert_eq!(f.vars_base, 0xffc0_0000);
        assert!(uefi_flash(0x37c000, 100).is_err());
        assert!(uefi_flash(0, 4096).is_err());
        assert!(uefi_flash(16 << 20, 4096).is_err());
        let mut image = vec![0u8; 64];
        assert!(!is_uefi(&image));
        image[40..44].copy_from_slice(b"_FVH");
        assert!(is_uefi(&image));
        assert!(!is_uefi(&image[..42]));
    }

    #[test]
    fn the_stub_loops_on_its_hlt() {
        let code = reset_vector_code();
        let hlt = code.iter().position(|&b| b == 0xf4).unwrap();
        assert_eq!(code[hlt - 1], 0xfa, "interrupts are off before the hlt");
        // jmp rel8 right after the hlt: back to the hlt.
        assert_eq!(code[hlt + 1], 0xeb);
        let next = hlt as i64 + 3;
        assert_eq!(next + i64::from(code[hlt + 2] as i8), hlt as i64);
    }
}
