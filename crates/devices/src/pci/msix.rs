//! MSI-X (PCI Local Bus 3.0, 6.8.2): a table of message addresses and data in a BAR,
//! a pending-bit array beside it, and the capability's enable and function-mask bits.
//! A device raises vector N; the message goes out through `IrqChip::signal_msi`, or
//! waits in the pending bits while the vector or the function is masked.

use std::sync::Arc;

use hypervisor::IrqChip;

/// The MSI-X capability ID.
pub const CAP_ID: u8 = 0x11;
/// Bytes per table entry: address low, address high, data, vector control.
pub const ENTRY_SIZE: u64 = 16;
/// Message control: enable and function mask.
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control bit 0: this vector is masked.
const VECTOR_MASKED: u32 = 1;
/// The most vectors a function may have.
pub const MAX_VECTORS: u16 = 2048;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

/// When the chip may deliver an MSI-X message ([`Msix::trigger_as`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// At once.
    Now,
    /// Held up to this long while every vCPU is busy ([`IrqChip::signal_msi_moderated`]).
    WhileBusy(std::time::Duration),
    /// Held up to this long until a vCPU halts, even while another idles
    /// ([`IrqChip::signal_msi_at_halt`]).
    UntilHalt(std::time::Duration),
}

/// One function's MSI-X vectors.
pub struct Msix {
    entries: Vec<Entry>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    irq: Arc<dyn IrqChip>,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("vectors", &self.entries.len())
            .field("enabled", &self.enabled)
            .field("function_masked", &self.function_masked)
            .finish_non_exhaustive()
    }
}

impl Msix {
    /// `count` vectors (clamped to 1..=2048), all masked, MSI-X disabled.
    pub fn new(count: u16, irq: Arc<dyn IrqChip>) -> Self {
        let count = usize::from(count.clamp(1, MAX_VECTORS));
        Msix {
            entries: vec![
                Entry {
                    control: VECTOR_MASKED,
                    ..Entry::default()
                };
                count
            ],
            pending: vec![0; count.div_ceil(64)],
            enabled: false,
            function_masked: false,
            irq,
        }
    }

    /// How many vectors.
    pub fn len(&self) -> u16 {
        self.entries.len() as u16
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes the table takes in its BAR.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }

    /// Bytes the pending-bit array takes in its BAR.
    pub fn pba_size(&self) -> u64 {
        self.pending.len() as u64 * 8
    }

    /// The capability body (after ID and next pointer) for a table at `table_offset` of
    /// BAR `table_bar` and the PBA at `pba_offset` of `pba_bar`, and its writable bits.
    pub fn capability(
        &self,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> ([u8; 10], [u8; 10]) {
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&(self.len() - 1).to_le_bytes());
        body[2..6].copy_from_slice(&((table_offset & !7) | u32::from(table_bar & 7)).to_le_bytes());
        body[6..10].copy_from_slice(&((pba_offset & !7) | u32::from(pba_bar & 7)).to_le_bytes());
        let mut writable = [0u8; 10];
        writable[0..2].copy_from_slice(&(CONTROL_ENABLE | CONTROL_FUNCTION_MASK).to_le_bytes());
        (body, writable)
    }

    /// Whether the driver turned MSI-X on (then INTx is not used).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The guest wrote the capability's message control.
    pub fn set_control(&mut self, control: u16) {
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        self.deliver_unmasked_pending();
    }

    /// Back to the power-on state (the function was reset).
    pub fn reset(&mut self) {
        for e in &mut self.entries {
            *e = Entry {
                control: VECTOR_MASKED,
                ..Entry::default()
            };
        }
        self.pending.fill(0);
        self.enabled = false;
        self.function_masked = false;
    }

    fn masked(&self, v: usize) -> bool {
        self.function_masked || self.entries[v].control & VECTOR_MASKED != 0
    }

    fn send(&self, v: usize) {
        self.send_as(v, Hold::Now);
    }

    /// Sends vector `v`'s message now, or lets the chip hold it as `hold` says.
    fn send_as(&self, v: usize, hold: Hold) {
        let Some(e) = self.entries.get(v) else { return };
        let addr = u64::from(e.addr_lo) | (u64::from(e.addr_hi) << 32);
        let sent = match hold {
            Hold::Now => self.irq.signal_msi(addr, e.data),
            Hold::WhileBusy(d) => self.irq.signal_msi_moderated(addr, e.data, d),
            Hold::UntilHalt(d) => self.irq.signal_msi_at_halt(addr, e.data, d),
        };
        if let Err(err) = sent {
            tracing::warn!(vector = v, "MSI-X delivery failed: {err}");
        }
    }

    /// Raise `vector`: sent now, or left pending while masked. False when MSI-X is off
    /// or there is no such vector (the caller falls back to INTx or drops it).
    pub fn trigger(&mut self, vector: u16) -> bool {
        self.trigger_as(vector, Hold::Now)
    }

    /// [`Msix::trigger`] for an interrupt the chip may hold back up to `hold` while the
    /// guest's vCPUs are all busy (see [`IrqChip::signal_msi_moderated`]).
    pub fn trigger_within(&mut self, vector: u16, hold: Option<std::time::Duration>) -> bool {
        self.trigger_as(vector, hold.map_or(Hold::Now, Hold::WhileBusy))
    }

    /// [`Msix::trigger`], held as `hold` says (a vector left pending while masked is
    /// sent at once when unmasked).
    pub fn trigger_as(&mut self, vector: u16, hold: Hold) -> bool {
        let v = usize::from(vector);
        if !self.enabled || v >= self.entries.len() {
            return false;
        }
        if self.masked(v) {
            self.pending[v / 64] |= 1 << (v % 64);
        } else {
            self.send_as(v, hold);
        }
        true
    }

    fn deliver_unmasked_pending(&mut self) {
        if !self.enabled || self.function_masked {
            return;
        }
        for v in 0..self.entries.len() {
            let bit = 1u64 << (v % 64);
            if self.pending[v / 64] & bit != 0 && !self.masked(v) {
                self.pending[v / 64] &= !bit;
                self.send(v);
            }
        }
    }

    fn table_dword(&self, index: u64) -> u32 {
        let Some(e) = usize::try_from(index / 4)
            .ok()
            .and_then(|i| self.entries.get(i))
        else {
            return 0;
        };
        match index % 4 {
            0 => e.addr_lo,
            1 => e.addr_hi,
            2 => e.data,
            _ => e.control,
        }
    }

    /// A read of the table at `offset` (4 or 8 bytes, naturally aligned; anything else
    /// reads as zero).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !aligned(offset, data.len()) {
            return;
        }
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let v = self.table_dword(offset / 4 + i as u64);
            chunk.copy_from_slice(&v.to_le_bytes());
        }
    }

    /// A write to the table at `offset` (4 or 8 bytes, naturally aligned).
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        if !aligned(offset, data.len()) {
            return;
        }
        for (i, chunk) in data.chunks(4).enumerate() {
            let index = offset / 4 + i as u64;
            let Some(e) = usize::try_from(index / 4)
                .ok()
                .and_then(|i| self.entries.get_mut(i))
            else {
                return;
            };
            let mut b = [0u8; 4];
            b.copy_from_slice(chunk);
            let v = u32::from_le_bytes(b);
            match index % 4 {
                0 => e.addr_lo = v,
                1 => e.addr_hi = v,
                2 => e.data = v,
                _ => e.control = v & VECTOR_MASKED,
            }
        }
        self.deliver_unmasked_pending();
    }

    /// A read of the pending-bit array (read-only to the guest).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !aligned(offset, data.len()) {
            return;
        }
        let bytes: Vec<u8> = self.pending.iter().flat_map(|q| q.to_le_bytes()).collect();
        if let Some(src) = usize::try_from(offset)
            .ok()
            .and_then(|o| bytes.get(o..o.checked_add(data.len())?))
        {
            data.copy_from_slice(src);
        }
    }
}

fn aligned(offset: u64, len: usize) -> bool {
    matches!(len, 4 | 8) && offset.is_multiple_of(len as u64)
}

/// A function's MSI-X state in a snapshot: each vector's address, data and control,
/// the pending bits, and the capability's enable and function-mask bits.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixSnapshot {
    /// Per vector: address low, address high, data, vector control.
    pub entries: Vec<[u32; 4]>,
    pub pending: Vec<u64>,
    pub enabled: bool,
    pub function_masked: bool,
}

/// A snapshot's MSI-X state does not fit this function.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a saved MSI-X table has {saved} vectors, this function {have}")]
pub struct MsixSizeError {
    pub saved: usize,
    pub have: usize,
}

impl Msix {
    /// The table, pending bits and controls, for a snapshot.
    pub fn snapshot(&self) -> MsixSnapshot {
        MsixSnapshot {
            entries: self
                .entries
                .iter()
                .map(|e| [e.addr_lo, e.addr_hi, e.data, e.control])
                .collect(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Puts back what [`Msix::snapshot`] saved (no message is sent: pending vectors stay
    /// pending until the guest unmasks them, as they were).
    pub fn restore(&mut self, s: &MsixSnapshot) -> Result<(), MsixSizeError> {
        if s.entries.len() != self.entries.len() || s.pending.len() != self.pending.len() {
            return Err(MsixSizeError {
                saved: s.entries.len(),
                have: self.entries.len(),
            });
        }
        for (e, &[addr_lo, addr_hi, data, control]) in self.entries.iter_mut().zip(&s.entries) {
            *e = Entry {
                addr_lo,
                addr_hi,
                data,
                control,
            };
        }
        self.pending.clone_from(&s.pending);
        self.enabled = s.enabled;
        self.function_masked = s.function_masked;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Msis(Mutex<Vec<(u64, u32)>>);
    impl IrqChip for Msis {
        fn set_irq_line(&self, _gsi: u32, _active: bool) -> hypervisor::Result<()> {
            Ok(())
        }
        fn signal_msi(&self, address: u64, data: u32) -> hypervisor::Result<()> {
            self.0.lock().unwrap().push((address, data));
            Ok(())
        }
    }

    fn program(m: &mut Msix, v: u64, addr: u64, data: u32) {
        m.write_table(v * 16, &addr.to_le_bytes());
        m.write_table(v * 16 + 8, &data.to_le_bytes());
        m.write_table(v * 16 + 12, &0u32.to_le_bytes());
    }

    #[test]
    fn vectors_fire_when_enabled_and_unmasked_and_wait_while_masked() {
        let chip = Arc::new(Msis::default());
        let mut m = Msix::new(3, chip.clone());
        assert!(!m.trigger(0), "MSI-X is off");
        m.set_control(CONTROL_ENABLE);
        // Entries start masked: the message waits in the PBA.
        assert!(m.trigger(1));
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0b10);
        assert!(chip.0.lock().unwrap().is_empty());
        program(&mut m, 1, 0xfee0_0000, 0x41);
        assert_eq!(*chip.0.lock().unwrap(), vec![(0xfee0_0000, 0x41)]);
        m.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0);
        // The function mask holds everything back until cleared.
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.trigger(1);
        assert_eq!(chip.0.lock().unwrap().len(), 1);
        m.set_control(CONTROL_ENABLE);
        assert_eq!(chip.0.lock().unwrap().len(), 2);
        assert!(!m.trigger(3), "no such vector");
    }

    #[test]
    fn table_accesses_are_bounds_and_alignment_checked() {
        let mut m = Msix::new(2, Arc::new(Msis::default()));
        program(&mut m, 0, 0x1_fee0_1000, 7);
        let mut q = [0u8; 8];
        m.read_table(0, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1_fee0_1000);
        let mut d = [0u8; 4];
        m.read_table(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
        m.write_table(12, &0xffff_ffffu32.to_le_bytes());
        m.read_table(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1, "only the mask bit is writable");
        // Misaligned, odd-sized and out-of-range accesses do nothing.
        m.write_table(2, &[1, 2, 3, 4]);
        m.write_table(0, &[1, 2]);
        m.write_table(u64::MAX - 3, &[1, 2, 3, 4]);
        m.write_table(32, &[1, 2, 3, 4]);
        let mut b = [0u8; 2];
        m.read_table(0, &mut b);
        assert_eq!(b, [0, 0]);
        m.read_table(u64::MAX - 7, &mut q);
        m.read_pba(u64::MAX - 7, &mut q);
        assert_eq!(m.table_size(), 32);
        assert_eq!(m.pba_size(), 8);
        let (body, w) = m.capability(0, 0x4000, 0, 0x5000);
        assert_eq!(&body[0..2], &[1, 0]);
        assert_eq!(u32::from_le_bytes(body[2..6].try_into().unwrap()), 0x4000);
        assert_eq!(&w[0..2], &[0, 0xc0]);
    }
}
