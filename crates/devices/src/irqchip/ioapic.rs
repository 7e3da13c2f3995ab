//! The 82093AA I/O APIC: 24 interrupt pins turned into messages for the local APICs.
//!
//! Two MMIO registers (IOREGSEL at 0x00, IOWIN at 0x10) give indirect access to the ID,
//! version, arbitration and redirection-table registers. Pin changes and EOIs return the
//! [`Delivery`] messages the owner must route to the LAPICs.
//!
//! The `level` given to [`IoApic::set_irq`] is the line's *asserted* state; the
//! redirection entry's polarity bit is stored but not applied.

use super::{Delivery, DeliveryMode, Destination, Trigger};

/// Where the IOAPIC's registers sit after reset.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Size of its MMIO window.
pub const IOAPIC_SIZE: u64 = 0x1000;
/// Number of interrupt pins.
pub const IOAPIC_PINS: u32 = 24;

/// MMIO offset of IOREGSEL, the register index.
const IOREGSEL: u64 = 0x00;
/// MMIO offset of IOWIN, the selected register's data.
const IOWIN: u64 = 0x10;

/// Register 0x00: IOAPIC ID in bits 24–27.
const REG_ID: u32 = 0x00;
/// Register 0x01: version 0x11, maximum redirection entry 23 in bits 16–23.
const REG_VERSION: u32 = 0x01;
/// Register 0x02: arbitration ID in bits 24–27.
const REG_ARBITRATION: u32 = 0x02;
/// Registers 0x10–0x3f: redirection table, two 32-bit halves per pin.
const REG_REDIR_FIRST: u32 = 0x10;
const REG_REDIR_LAST: u32 = 0x3f;
const VERSION: u32 = 0x0017_0011;

/// Redirection entry bits 0–7: vector.
const RTE_VECTOR: u64 = 0xff;
/// Bits 8–10: delivery mode.
const RTE_DELIVERY_MODE_SHIFT: u32 = 8;
/// Bit 11: logical destination mode.
const RTE_DEST_LOGICAL: u64 = 1 << 11;
/// Bit 12: delivery status (read-only).
const RTE_DELIVERY_STATUS: u64 = 1 << 12;
/// Bit 13: polarity, active low.
const RTE_POLARITY_LOW: u64 = 1 << 13;
/// Bit 14: remote IRR (read-only): a level interrupt is in service in a LAPIC.
const RTE_REMOTE_IRR: u64 = 1 << 14;
/// Bit 15: level-triggered.
const RTE_TRIGGER_LEVEL: u64 = 1 << 15;
/// Bit 16: masked.
const RTE_MASKED: u64 = 1 << 16;
/// Bits 56–63: destination.
const RTE_DEST_SHIFT: u32 = 56;
/// Bits the guest may write.
const RTE_WRITABLE: u64 = (0xff << RTE_DEST_SHIFT)
    | RTE_MASKED
    | RTE_TRIGGER_LEVEL
    | RTE_POLARITY_LOW
    | RTE_DEST_LOGICAL
    | 0x7ff;

/// Plain state of the IOAPIC.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IoApicState {
    pub id: u32,
    pub select: u32,
    pub redirection: [u64; IOAPIC_PINS as usize],
    /// Current line levels, one bit per pin.
    pub lines: u32,
}

/// The I/O APIC.
#[derive(Debug)]
pub struct IoApic {
    state: IoApicState,
}

impl Default for IoApic {
    fn default() -> Self {
        Self::new()
    }
}

impl IoApic {
    /// An IOAPIC at reset: ID 0, every pin masked.
    pub fn new() -> Self {
        IoApic {
            state: IoApicState {
                id: 0,
                select: 0,
                redirection: [RTE_MASKED; IOAPIC_PINS as usize],
                lines: 0,
            },
        }
    }

    /// A snapshot of the registers and line levels.
    pub fn state(&self) -> &IoApicState {
        &self.state
    }

    /// An IOAPIC restored from a snapshot.
    pub fn from_state(state: IoApicState) -> Self {
        IoApic { state }
    }

    /// The redirection entry of `pin`, if it exists.
    pub fn redirection_entry(&self, pin: u32) -> Option<u64> {
        self.state.redirection.get(pin as usize).copied()
    }

    fn delivery(entry: u64) -> Option<Delivery> {
        let mode = DeliveryMode::from_bits((entry >> RTE_DELIVERY_MODE_SHIFT) as u32)?;
        let dest = (entry >> RTE_DEST_SHIFT) as u32;
        Some(Delivery {
            dest: if entry & RTE_DEST_LOGICAL != 0 {
                Destination::Logical(dest)
            } else {
                Destination::Physical(dest)
            },
            vector: (entry & RTE_VECTOR) as u8,
            mode,
            trigger: if entry & RTE_TRIGGER_LEVEL != 0 {
                Trigger::Level
            } else {
                Trigger::Edge
            },
        })
    }

    /// Deliver `pin` if its entry and line say so. Edge entries deliver on request
    /// (`edge`); level entries while the line is high and no Remote IRR is set.
    fn service(&mut self, pin: usize, edge: bool) -> Option<Delivery> {
        let entry = *self.state.redirection.get(pin)?;
        if entry & RTE_MASKED != 0 {
            return None;
        }
        if entry & RTE_TRIGGER_LEVEL != 0 {
            let high = self.state.lines & (1 << pin) != 0;
            if !high || entry & RTE_REMOTE_IRR != 0 {
                return None;
            }
            let d = Self::delivery(entry)?;
            // Remote IRR only matters for fixed/lowest-priority messages, which get an EOI.
            if matches!(d.mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority) {
                self.state.redirection[pin] |= RTE_REMOTE_IRR;
            }
            Some(d)
        } else if edge {
            Self::delivery(entry)
        } else {
            None
        }
    }

    /// Drive pin `pin` to `level` (asserted or not). Returns the message to deliver, if
    /// the change causes one. Pins past 23 are ignored.
    ///
    /// ```
    /// use devices::irqchip::ioapic::IoApic;
    ///
    /// let mut io = IoApic::new();
    /// io.mmio_write(0x00, &[0x18]); // IOREGSEL: pin 4, low half
    /// io.mmio_write(0x10, &0x34u32.to_le_bytes()); // unmasked, edge, vector 0x34
    /// assert_eq!(io.set_irq(4, true).map(|d| d.vector), Some(0x34));
    /// assert!(io.set_irq(4, true).is_none()); // no new edge
    /// ```
    pub fn set_irq(&mut self, pin: u32, level: bool) -> Option<Delivery> {
        if pin >= IOAPIC_PINS {
            tracing::debug!(pin, "IOAPIC: no such pin");
            return None;
        }
        let bit = 1u32 << pin;
        let was_high = self.state.lines & bit != 0;
        if level {
            self.state.lines |= bit;
        } else {
            self.state.lines &= !bit;
        }
        if !level {
            return None;
        }
        self.service(pin as usize, !was_high)
    }

    /// A LAPIC EOI of `vector`: clear Remote IRR of level entries with that vector, and
    /// deliver again those whose line is still asserted.
    pub fn eoi(&mut self, vector: u8) -> Vec<Delivery> {
        let mut out = Vec::new();
        for pin in 0..IOAPIC_PINS as usize {
            let entry = self.state.redirection[pin];
            if entry & RTE_TRIGGER_LEVEL == 0
                || entry & RTE_VECTOR != u64::from(vector)
                || entry & RTE_REMOTE_IRR == 0
            {
                continue;
            }
            self.state.redirection[pin] &= !RTE_REMOTE_IRR;
            out.extend(self.service(pin, false));
        }
        out
    }

    fn read_register(&self) -> u32 {
        match self.state.select {
            REG_ID => (self.state.id & 0xf) << 24,
            REG_VERSION => VERSION,
            REG_ARBITRATION => (self.state.id & 0xf) << 24,
            r @ REG_REDIR_FIRST..=REG_REDIR_LAST => {
                let pin = ((r - REG_REDIR_FIRST) / 2) as usize;
                let entry = self.state.redirection.get(pin).copied().unwrap_or(0);
                if r & 1 == 0 {
                    entry as u32
                } else {
                    (entry >> 32) as u32
                }
            }
            r => {
                tracing::debug!(register = r, "IOAPIC read of unknown register");
                0
            }
        }
    }

    fn write_register(&mut self, value: u32) -> Option<Delivery> {
        match self.state.select {
            REG_ID => self.state.id = (value >> 24) & 0xf,
            r @ REG_REDIR_FIRST..=REG_REDIR_LAST => {
                let pin = ((r - REG_REDIR_FIRST) / 2) as usize;
                let old = *self.state.redirection.get(pin)?;
                let mut new = if r & 1 == 0 {
                    (old & !0xffff_ffff) | u64::from(value)
                } else {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                };
                new = (new & RTE_WRITABLE) | (old & (RTE_REMOTE_IRR | RTE_DELIVERY_STATUS));
                if new & RTE_TRIGGER_LEVEL == 0 {
                    new &= !RTE_REMOTE_IRR;
                }
                self.state.redirection[pin] = new;
                // A level line still asserted when its entry is unmasked delivers now.
                return self.service(pin, false);
            }
            r => tracing::debug!(
                register = r,
                value,
                "IOAPIC write to read-only/unknown register"
            ),
        }
        None
    }

    /// A guest read at `offset` in the IOAPIC page. IOREGSEL and IOWIN are 32-bit; any
    /// other offset reads zeros.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let value = match offset {
            IOREGSEL => self.state.select,
            IOWIN => self.read_register(),
            _ => {
                tracing::debug!(offset, "IOAPIC read at unknown offset");
                return;
            }
        };
        for (b, v) in data.iter_mut().zip(value.to_le_bytes()) {
            *b = v;
        }
    }

    /// A guest write at `offset`. Returns a message to deliver if a redirection-entry
    /// write unmasks an asserted level-triggered pin.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) -> Option<Delivery> {
        let mut bytes = [0u8; 4];
        for (b, v) in bytes.iter_mut().zip(data) {
            *b = *v;
        }
        let value = u32::from_le_bytes(bytes);
        match offset {
            IOREGSEL => self.state.select = value & 0xff,
            IOWIN if data.len() >= 4 => return self.write_register(value),
            _ => tracing::debug!(offset, len = data.len(), "IOAPIC write ignored"),
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_reg(io: &mut IoApic, reg: u32, value: u32) -> Option<Delivery> {
        io.mmio_write(IOREGSEL, &reg.to_le_bytes());
        io.mmio_write(IOWIN, &value.to_le_bytes())
    }

    fn read_reg(io: &mut IoApic, reg: u32) -> u32 {
        io.mmio_write(IOREGSEL, &reg.to_le_bytes());
        let mut b = [0u8; 4];
        io.mmio_read(IOWIN, &mut b);
        u32::from_le_bytes(b)
    }

    fn route(io: &mut IoApic, pin: u32, low: u32, dest: u8) -> Option<Delivery> {
        write_reg(io, 0x11 + 2 * pin, u32::from(dest) << 24);
        write_reg(io, 0x10 + 2 * pin, low)
    }

    #[test]
    fn id_version_and_redirection_registers() {
        let mut io = IoApic::new();
        assert_eq!(read_reg(&mut io, 1), 0x0017_0011);
        write_reg(&mut io, 0, 0x0200_0000);
        assert_eq!(read_reg(&mut io, 0), 0x0200_0000);
        assert_eq!(read_reg(&mut io, 2), 0x0200_0000);
        assert_eq!(read_reg(&mut io, 0x10), 0x0001_0000);
        route(&mut io, 5, 0x0001_a935, 0x0f);
        assert_eq!(read_reg(&mut io, 0x1a), 0x0001_a935);
        assert_eq!(read_reg(&mut io, 0x1b), 0x0f00_0000);
        // Read-only bits (delivery status, remote IRR) and reserved bits don't stick.
        write_reg(&mut io, 0x1a, 0xffff_ffff);
        assert_eq!(read_reg(&mut io, 0x1a), 0x0001_afff);
        write_reg(&mut io, 0x1b, 0xffff_ffff);
        assert_eq!(read_reg(&mut io, 0x1b), 0xff00_0000);
        assert_eq!(read_reg(&mut io, 0x40), 0);
        assert_eq!(read_reg(&mut io, 0xff), 0);
        assert_eq!(io.redirection_entry(5), Some(0xff00_0000_0001_afff));
        assert_eq!(io.redirection_entry(24), None);
    }

    #[test]
    fn edge_delivers_on_rising_edge_only() {
        let mut io = IoApic::new();
        route(&mut io, 4, 0x0000_0934, 0x03); // lowest priority, logical, edge
        let d = io.set_irq(4, true).unwrap();
        assert_eq!(d.dest, Destination::Logical(3));
        assert_eq!(d.vector, 0x34);
        assert_eq!(d.mode, DeliveryMode::LowestPriority);
        assert_eq!(d.trigger, Trigger::Edge);
        assert_eq!(io.set_irq(4, true), None);
        assert_eq!(io.set_irq(4, false), None);
        assert!(io.set_irq(4, true).is_some());
    }

    #[test]
    fn level_remote_irr_and_eoi() {
        let mut io = IoApic::new();
        route(&mut io, 10, 0x0000_8041, 0x01); // fixed, physical, level
        let d = io.set_irq(10, true).unwrap();
        assert_eq!(d.trigger, Trigger::Level);
        assert_eq!(d.dest, Destination::Physical(1));
        assert_ne!(read_reg(&mut io, 0x24) & (1 << 14), 0);
        // Still high, Remote IRR set: nothing.
        assert_eq!(io.set_irq(10, true), None);
        // EOI with the line still high delivers again.
        assert_eq!(io.eoi(0x41), vec![d]);
        // Line drops, EOI clears Remote IRR without delivering.
        io.set_irq(10, false);
        assert!(io.eoi(0x41).is_empty());
        assert_eq!(read_reg(&mut io, 0x24) & (1 << 14), 0);
        assert!(io.eoi(0x99).is_empty());
        assert_eq!(io.set_irq(10, true), Some(d));
    }

    #[test]
    fn masking() {
        let mut io = IoApic::new();
        // Masked edge pin latches nothing.
        route(&mut io, 1, 0x0001_0031, 0);
        assert_eq!(io.set_irq(1, true), None);
        assert_eq!(route(&mut io, 1, 0x0000_0031, 0), None);
        // Masked level pin delivers when unmasked while still asserted.
        route(&mut io, 9, 0x0001_8039, 0);
        assert_eq!(io.set_irq(9, true), None);
        let d = route(&mut io, 9, 0x0000_8039, 0).unwrap();
        assert_eq!(d.vector, 0x39);
        // Switching to edge clears Remote IRR.
        write_reg(&mut io, 0x22, 0x0000_0039);
        assert_eq!(read_reg(&mut io, 0x22) & (1 << 14), 0);
    }

    #[test]
    fn hostile_accesses() {
        let mut io = IoApic::new();
        assert_eq!(io.set_irq(24, true), None);
        assert_eq!(io.set_irq(u32::MAX, true), None);
        for off in [0u64, 1, 3, 0x10, 0x13, 0x20, 0x40, 0xfff, u64::MAX] {
            for len in [0usize, 1, 2, 4, 8] {
                let mut b = vec![0xffu8; len];
                io.mmio_read(off, &mut b);
                io.mmio_write(off, &b);
            }
        }
        // Reserved delivery mode: no message.
        route(&mut io, 2, 0x0000_0330, 0);
        assert_eq!(io.set_irq(2, true), None);
    }
}
