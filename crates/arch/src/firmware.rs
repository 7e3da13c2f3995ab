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

#[cfg(test)]
mod tests {
    use super::*;

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
