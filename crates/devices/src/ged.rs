//! The host side of ACPI's Generic Event Device (`ACPI0013`): how the VMM tells the guest
//! that something happened (today: its power button was pressed).
//!
//! The DSDT (`arch::acpi`) gives the GED one edge-triggered interrupt and an `_EVT`
//! method that reads this device's one-byte event register and notifies the ACPI device
//! behind each set bit. Reading the register returns the events raised since the last
//! read and clears them, so a second event raised while `_EVT` runs is seen by the next
//! interrupt rather than lost. Writes are ignored.

use std::sync::Arc;

use hypervisor::IrqChip;

use crate::bus::BusDevice;

/// Event register bits; they match `arch::acpi::GED_EVENT_*` (the VMM asserts so).
pub const EVENT_POWER_BUTTON: u8 = 1 << 0;

pub struct Ged {
    irq: Arc<dyn IrqChip>,
    gsi: u32,
    pending: u8,
    /// On a full ACPI platform events go out as this GPE bit on the SCI instead (the
    /// DSDT's `\_GPE._Exx` for it notifies the same devices `_EVT` would).
    gpe: Option<(Arc<std::sync::Mutex<crate::gpe::Gpe0>>, u8)>,
}

impl Ged {
    pub fn new(irq: Arc<dyn IrqChip>, gsi: u32) -> Self {
        Ged {
            irq,
            gsi,
            pending: 0,
            gpe: None,
        }
    }

    /// Signal events as GPE `bit` of `gpe` rather than with the GED's own interrupt.
    pub fn through_gpe(mut self, gpe: Arc<std::sync::Mutex<crate::gpe::Gpe0>>, bit: u8) -> Self {
        self.gpe = Some((gpe, bit));
        self
    }

    /// Records `events` and interrupts the guest, which runs `_EVT` (or the GPE's
    /// method).
    pub fn raise(&mut self, events: u8) -> Result<(), hypervisor::Error> {
        self.pending |= events;
        match &self.gpe {
            Some((gpe, bit)) => gpe.lock().unwrap_or_else(|p| p.into_inner()).raise(*bit),
            None => self.irq.pulse_irq_line(self.gsi),
        }
    }

    /// Presses the power button: a guest that handles it (Linux's `button` driver sends
    /// KEY_POWER to user space) shuts down and powers off through ACPI S5.
    pub fn press_power_button(&mut self) -> Result<(), hypervisor::Error> {
        tracing::info!("power button pressed");
        self.raise(EVENT_POWER_BUTTON)
    }

    /// Restores the events a snapshot recorded as raised and not yet read (no new
    /// interrupt: the one for them is in the interrupt controller's state).
    pub fn set_pending(&mut self, events: u8) {
        self.pending = events;
    }

    /// Events raised and not yet read by the guest.
    pub fn pending(&self) -> u8 {
        self.pending
    }
}

impl BusDevice for Ged {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            if let Some(b) = data.first_mut() {
                *b = std::mem::take(&mut self.pending);
            }
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::Lines;

    #[test]
    fn on_a_full_platform_a_press_is_a_gpe_on_the_sci() {
        let lines = Arc::new(Lines::default());
        let gpe = Arc::new(std::sync::Mutex::new(crate::gpe::Gpe0::new(
            lines.clone(),
            9,
        )));
        // The OS enabled GPE 0.
        gpe.lock().unwrap().write(2, &[1, 0]);
        let mut ged = Ged::new(lines.clone(), 5).through_gpe(gpe.clone(), 0);
        ged.press_power_button().unwrap();
        assert_eq!(
            *lines.0.lock().unwrap(),
            vec![(9, true)],
            "the SCI, not GSI 5"
        );
        assert!(gpe.lock().unwrap().sci());
    }

    #[test]
    fn a_press_interrupts_and_the_read_clears_it() {
        let lines = Arc::new(Lines::default());
        let mut ged = Ged::new(lines.clone(), 5);
        let mut b = [0xffu8];
        ged.read(0, &mut b);
        assert_eq!(b[0], 0, "nothing pending at reset");
        ged.press_power_button().unwrap();
        assert_eq!(*lines.0.lock().unwrap(), vec![(5, true), (5, false)]);
        ged.write(0, &[0]);
        assert_eq!(ged.pending(), EVENT_POWER_BUTTON, "writes do not clear");
        ged.read(0, &mut b);
        assert_eq!(b[0], EVENT_POWER_BUTTON);
        ged.read(0, &mut b);
        assert_eq!(b[0], 0, "read clears");
        // Wide or offset reads from a hostile guest: no panic, nothing leaks.
        ged.press_power_button().unwrap();
        let mut wide = [0xffu8; 4];
        ged.read(3, &mut wide);
        assert_eq!(wide, [0; 4]);
        let mut empty = [0u8; 0];
        ged.read(0, &mut empty);
        assert_eq!(ged.pending(), EVENT_POWER_BUTTON);
    }
}
