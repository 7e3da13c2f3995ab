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
    #[error("a BIOS image of {0} bytes: it must be a multiple of 64 KiB, at most 16 MiB")]
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

#[cfg(test)]
mod tests {
    use super::*;

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
