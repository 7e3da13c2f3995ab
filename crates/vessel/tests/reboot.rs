//! A guest that reboots ends its VMM promptly, with the documented status, whichever of
//! Linux's reboot methods it uses (issue #22): exit 10 for a reboot, 12 for a triple fault.
//!
//! Debian's cloud kernel on emu, with the guest assets' initramfs running `reboot -f`
//! (`vessel.run=`) under each `reboot=` method, and with an init that exits under
//! `panic=-1`. Linux's default on Vessel's hardware-reduced ACPI is EFI, then a jump to
//! the BIOS at F000:FFF0 (a directly booted kernel has no EFI runtime): with nothing at
//! the reset vector the vCPU used to spin there forever. And a guest that halts for good
//! (`halt -f`: cli; hlt on every CPU) keeps its VMM, idle.

mod common;

use std::time::Duration;

use common::console::Console;
use common::cpu_ticks;

/// Boot to the guest's message, well within this even on a loaded machine.
const BOOT: Duration = Duration::from_secs(60);
/// From the guest's last message to the VMM's exit: a reset is immediate, so this only
/// has to absorb scheduling; a VMM that spins never gets there.
const PROMPT: Duration = Duration::from_secs(10);

const REBOOTED: i32 = 10;
const TRIPLE_FAULT: i32 = 12;

/// Boot with `cmdline`, wait for `message` on the console, then for the VMM to exit;
/// returns its status.
fn exit_status_after(cmdline: &str, extra: &[&str], message: &str) -> Option<i32> {
    let mut args = vec!["--cmdline", cmdline];
    args.extend_from_slice(extra);
    let mut c = Console::boot(&args);
    c.expect(message, BOOT);
    c.wait_exit(PROMPT)
}

/// `reboot -f` in the guest with `reboot=METHOD` (or Linux's default when `None`).
fn reboot_with(method: Option<&str>) -> Option<i32> {
    let mut cmdline = String::from("console=ttyS0 quiet vessel.run=reboot+-f");
    if let Some(m) = method {
        cmdline.push_str(&format!(" reboot={m}"));
    }
    exit_status_after(&cmdline, &[], "reboot: Restarting system")
}

#[test]
fn reboot_with_the_default_method_exits_10() {
    assert_eq!(reboot_with(None), Some(REBOOTED));
}

#[test]
fn reboot_acpi_exits_10() {
    assert_eq!(reboot_with(Some("acpi")), Some(REBOOTED));
}

#[test]
fn reboot_kbd_exits_10() {
    assert_eq!(reboot_with(Some("kbd")), Some(REBOOTED));
}

#[test]
fn reboot_pci_exits_10() {
    // Port 0xcf9, the chipset's reset control register.
    assert_eq!(reboot_with(Some("pci")), Some(REBOOTED));
}

#[test]
fn reboot_efi_exits_10() {
    // No EFI runtime: Linux goes on to the BIOS, and the code at the reset vector resets.
    assert_eq!(reboot_with(Some("efi")), Some(REBOOTED));
}

#[test]
fn reboot_bios_exits_10() {
    assert_eq!(reboot_with(Some("bios")), Some(REBOOTED));
}

#[test]
fn reboot_triple_fault_exits_12() {
    // An empty IDT and an int3: a triple fault, which the README documents as 12.
    assert_eq!(reboot_with(Some("triple")), Some(TRIPLE_FAULT));
}

#[test]
fn reboot_of_a_two_cpu_guest_exits_10() {
    let status = exit_status_after(
        "console=ttyS0 quiet vessel.run=reboot+-f",
        &["--cpus", "2"],
        "reboot: Restarting system",
    );
    assert_eq!(status, Some(REBOOTED));
}

#[test]
fn panic_when_init_exits_reboots_with_panic_minus_1() {
    // busybox run as init with no applet prints its help and exits: "Attempted to kill
    // init!", and panic=-1 reboots at once, with Linux's default method, from a panic.
    let status = exit_status_after(
        "console=ttyS0 quiet panic=-1 rdinit=/bin/busybox",
        &["--cpus", "2"],
        "Attempted to kill init",
    );
    assert_eq!(status, Some(REBOOTED));
}

/// Issue 22's test plan: the *panicking* guest under each of Linux's reboot methods ends
/// its VMM with the documented status (a panic reboots through emergency_restart, not
/// through the reboot system call's path).
#[test]
fn a_panicking_guest_under_each_reboot_method_ends_its_vmm() {
    for (method, want) in [
        ("acpi", REBOOTED),
        ("kbd", REBOOTED),
        ("pci", REBOOTED),
        ("efi", REBOOTED),
        ("bios", REBOOTED),
        ("triple", TRIPLE_FAULT),
    ] {
        let status = exit_status_after(
            &format!("console=ttyS0 quiet panic=-1 rdinit=/bin/busybox reboot={method}"),
            &[],
            "Attempted to kill init",
        );
        assert_eq!(status, Some(want), "reboot={method}");
    }
}

#[test]
fn a_guest_halted_with_interrupts_off_leaves_the_host_idle() {
    // `halt -f`: every CPU ends in cli; hlt. The VM stays (as on QEMU) but costs nothing.
    let mut c = Console::boot(&[
        "--cmdline",
        "console=ttyS0 quiet vessel.run=halt+-f",
        "--cpus",
        "2",
    ]);
    c.expect("reboot: System halted", BOOT);
    // Let the vCPUs reach their last hlt, then count the VMM's CPU time.
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_ticks(c.pid());
    std::thread::sleep(Duration::from_secs(3));
    let ticks = cpu_ticks(c.pid()) - before;
    // Clock ticks are 1/100 s: 3 s of one busy core would be 300.
    assert!(ticks < 60, "halted guest used {ticks} ticks of CPU in 3 s");
}
