//! Where a software vCPU's memory-mapped and port accesses go: the local APIC, IOAPIC,
//! PIC and PIT to the user-space interrupt controllers (KVM keeps these in the kernel, so
//! the VMM's buses never see them), kvmclock MSRs to the clock, everything else to the
//! VMM's buses through the seam's `IoHandler`.

use devices::irqchip::chip::UserIrqChip;
use hypervisor::{IoEventAddress, IoHandler};
use x86emu::code::CodeTracker;
use x86emu::{GuestRam, Platform};

use crate::clock::VmClock;
use crate::kvmclock;

pub const LAPIC_BASE: u64 = 0xfee0_0000;
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
const PAGE: u64 = 0x1000;

/// Ports the user-space chip owns: PIC master/slave, ELCR, PIT and port 0x61.
fn chip_port(port: u16) -> bool {
    matches!(
        port,
        0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1 | 0x40..=0x43 | 0x61
    )
}

/// Per-vCPU kvmclock registration.
#[derive(Debug, Default)]
pub struct KvmClockState {
    /// Guest-physical address of this vCPU's pvclock_vcpu_time_info, when enabled.
    pub system_time: Option<u64>,
    pub version: u32,
}

pub struct EmuPlatform<'a> {
    pub io: &'a dyn IoHandler,
    pub chip: &'a UserIrqChip,
    pub cpu: u32,
    pub clock: &'a VmClock,
    pub ram: &'a GuestRam,
    /// Hears of the platform's own writes to RAM (kvmclock's), as of a device's: the
    /// dirty log and decoded code must see them.
    pub code: &'a CodeTracker,
    pub kvmclock: &'a mut KvmClockState,
    /// Writes that signal an eventfd instead of reaching `io`.
    pub(crate) ioevents: &'a crate::eventfds::IoEvents,
    /// An interrupt became deliverable during the last I/O: stop the run to inject it.
    pub poke: bool,
}

impl EmuPlatform<'_> {
    /// Write a fresh pvclock_vcpu_time_info for this vCPU.
    pub fn update_kvmclock(&mut self) {
        let Some(gpa) = self.kvmclock.system_time else {
            return;
        };
        // Odd version while updating, even when done: the guest retries on odd.
        self.kvmclock.version = self.kvmclock.version.wrapping_add(2) & !1;
        let (tsc, ns) = self.clock.tsc_and_ns();
        let info = kvmclock::vcpu_time_info(self.kvmclock.version, tsc, ns, self.clock.scale());
        if !self.write_ram(gpa, &info) {
            tracing::warn!(gpa, "kvmclock page is not in RAM");
        }
    }

    /// Writes RAM as a device would: noted in the dirty log and for decoded code.
    fn write_ram(&self, gpa: u64, bytes: &[u8]) -> bool {
        let ok = self.ram.write(gpa, bytes);
        if ok {
            self.code.note_external_write(gpa, bytes.len() as u64);
        }
        ok
    }

    fn write_msr(&mut self, index: u32, value: u64) -> bool {
        match index {
            kvmclock::MSR_KVM_SYSTEM_TIME_NEW | kvmclock::MSR_KVM_SYSTEM_TIME => {
                self.kvmclock.system_time = (value & 1 != 0).then_some(value & !1);
                self.update_kvmclock();
                true
            }
            kvmclock::MSR_KVM_WALL_CLOCK_NEW | kvmclock::MSR_KVM_WALL_CLOCK => {
                let wc = kvmclock::wall_clock(2, self.clock.boot_unix_ns());
                self.write_ram(value, &wc);
                true
            }
            _ => {
                let now = self.clock.now_ns();
                let ok = self
                    .chip
                    .lapic_msr_write(self.cpu, index, value, now)
                    .is_ok();
                self.poke |= self.chip.event_hint(self.cpu);
                ok
            }
        }
    }
}

impl Platform for EmuPlatform<'_> {
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) {
        if (LAPIC_BASE..LAPIC_BASE + PAGE).contains(&gpa) {
            let now = self.clock.now_ns();
            self.chip
                .lapic_mmio_read(self.cpu, gpa - LAPIC_BASE, data, now);
        } else if (IOAPIC_BASE..IOAPIC_BASE + PAGE).contains(&gpa) {
            self.chip.ioapic_mmio_read(gpa - IOAPIC_BASE, data);
        } else {
            self.io.mmio_read(gpa, data);
        }
    }

    fn mmio_write(&mut self, gpa: u64, data: &[u8]) {
        if (LAPIC_BASE..LAPIC_BASE + PAGE).contains(&gpa) {
            let now = self.clock.now_ns();
            self.chip
                .lapic_mmio_write(self.cpu, gpa - LAPIC_BASE, data, now);
        } else if (IOAPIC_BASE..IOAPIC_BASE + PAGE).contains(&gpa) {
            self.chip.ioapic_mmio_write(gpa - IOAPIC_BASE, data);
        } else if !self.ioevents.signal(IoEventAddress::Mmio(gpa), data) {
            self.io.mmio_write(gpa, data);
        }
        self.poke |= self.chip.event_hint(self.cpu);
    }

    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        if chip_port(port) {
            self.chip.pio_read(port, data, self.clock.now_ns());
        } else {
            self.io.pio_read(port, data);
        }
    }

    fn pio_write(&mut self, port: u16, data: &[u8]) {
        if chip_port(port) {
            self.chip.pio_write(port, data, self.clock.now_ns());
        } else if !self.ioevents.signal(IoEventAddress::Pio(port), data) {
            self.io.pio_write(port, data);
        }
        self.poke |= self.chip.event_hint(self.cpu);
    }

    fn stop_requested(&mut self) -> bool {
        std::mem::take(&mut self.poke)
    }

    fn msr_read(&mut self, index: u32) -> Option<u64> {
        match index {
            kvmclock::MSR_KVM_SYSTEM_TIME_NEW | kvmclock::MSR_KVM_SYSTEM_TIME => {
                Some(self.kvmclock.system_time.map_or(0, |a| a | 1))
            }
            kvmclock::MSR_KVM_WALL_CLOCK_NEW | kvmclock::MSR_KVM_WALL_CLOCK => Some(0),
            _ if devices::irqchip::lapic::Lapic::handles_msr(index) => {
                // An APIC MSR the LAPIC refuses (e.g. x2APIC MSRs in xAPIC mode) is #GP,
                // which the CPU raises when neither side knows the MSR.
                self.chip
                    .lapic_msr_read(self.cpu, index, self.clock.now_ns())
            }
            _ => None,
        }
    }

    fn msr_write(&mut self, index: u32, value: u64) -> Option<bool> {
        match index {
            kvmclock::MSR_KVM_SYSTEM_TIME_NEW
            | kvmclock::MSR_KVM_SYSTEM_TIME
            | kvmclock::MSR_KVM_WALL_CLOCK_NEW
            | kvmclock::MSR_KVM_WALL_CLOCK => Some(self.write_msr(index, value)),
            _ if devices::irqchip::lapic::Lapic::handles_msr(index) => {
                Some(self.write_msr(index, value))
            }
            _ => None,
        }
    }
}
