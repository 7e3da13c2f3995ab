//! The PC's two cascaded 8259A programmable interrupt controllers, with the ELCR
//! (edge/level control registers) of the PIIX/ICH south bridges.
//!
//! Ports: master 0x20 (command) / 0x21 (data), slave 0xa0 / 0xa1, ELCR 0x4d0 / 0x4d1.
//! The slave's INT output drives the master's IR2. [`Pic`] takes absolute port numbers
//! in [`Pic::read_port`]/[`Pic::write_port`]; to put it on a bus, map one [`PicPorts`]
//! per range (0x20+2, 0xa0+2, 0x4d0+2), each holding the same `Arc<Mutex<Pic>>` and its
//! range base, so the bus offset becomes the absolute port again.

use std::sync::{Arc, Mutex};

use super::{fill_byte, first_byte};
use crate::bus::BusDevice;

pub const PIC_MASTER_COMMAND: u16 = 0x20;
pub const PIC_MASTER_DATA: u16 = 0x21;
pub const PIC_SLAVE_COMMAND: u16 = 0xa0;
pub const PIC_SLAVE_DATA: u16 = 0xa1;
pub const ELCR_MASTER: u16 = 0x4d0;
pub const ELCR_SLAVE: u16 = 0x4d1;

/// Command-port bit 4: this byte is ICW1.
const ICW1_INIT: u8 = 0x10;
/// ICW1 bit 0: ICW4 follows.
const ICW1_IC4: u8 = 0x01;
/// ICW1 bit 1: single controller (no ICW3).
const ICW1_SINGLE: u8 = 0x02;
/// ICW1 bit 3: level-triggered mode (the PC uses the ELCR instead).
const ICW1_LTIM: u8 = 0x08;
/// ICW4 bit 1: automatic end of interrupt.
const ICW4_AUTO_EOI: u8 = 0x02;
/// ICW4 bit 4: special fully nested mode.
const ICW4_SFNM: u8 = 0x10;
/// Command-port bits 3–4 = 01: this byte is OCW3.
const OCW3_SELECT: u8 = 0x08;
/// OCW3 bit 2: poll command.
const OCW3_POLL: u8 = 0x04;
/// OCW3 bit 1: act on bit 0 (read ISR when set, IRR when clear).
const OCW3_READ_REGISTER: u8 = 0x02;
const OCW3_READ_ISR: u8 = 0x01;
/// OCW3 bit 6: act on bit 5 (special mask mode).
const OCW3_ESMM: u8 = 0x40;
const OCW3_SMM: u8 = 0x20;
/// The master input the slave is cascaded on.
const CASCADE_IRQ: u8 = 2;
/// ELCR bits that can be level: not IRQ 0, 1, 2 (master) or 8, 13 (slave).
const ELCR_MASTER_MASK: u8 = 0xf8;
const ELCR_SLAVE_MASK: u8 = 0xde;

/// Which initialization word the data port expects next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum InitStep {
    #[default]
    Ready,
    Icw2,
    Icw3,
    Icw4,
}

/// The plain state of one 8259A.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pic8259State {
    pub irr: u8,
    pub imr: u8,
    pub isr: u8,
    /// Edge/level control: level-triggered inputs.
    pub elcr: u8,
    /// Current input line levels.
    pub lines: u8,
    pub vector_base: u8,
    /// Rotation: the input with the lowest priority is `priority_add - 1`.
    pub priority_add: u8,
    pub init_step: InitStep,
    pub icw4_needed: bool,
    pub single: bool,
    pub icw3: u8,
    pub auto_eoi: bool,
    pub rotate_on_auto_eoi: bool,
    pub special_fully_nested: bool,
    pub special_mask: bool,
    pub read_isr: bool,
    pub poll: bool,
}

/// One 8259A.
#[derive(Clone, Debug, Default)]
struct Pic8259 {
    s: Pic8259State,
    elcr_mask: u8,
    is_master: bool,
}

impl Pic8259 {
    fn new(is_master: bool) -> Self {
        Pic8259 {
            s: Pic8259State::default(),
            elcr_mask: if is_master {
                ELCR_MASTER_MASK
            } else {
                ELCR_SLAVE_MASK
            },
            is_master,
        }
    }

    fn set_line(&mut self, irq: u8, level: bool) {
        let bit = 1u8 << (irq & 7);
        if self.s.elcr & bit != 0 {
            if level {
                self.s.irr |= bit;
            } else {
                self.s.irr &= !bit;
            }
        } else if level && self.s.lines & bit == 0 {
            self.s.irr |= bit;
        }
        if level {
            self.s.lines |= bit;
        } else {
            self.s.lines &= !bit;
        }
    }

    /// The input of highest priority in `mask`, as a rank 0 (highest) to 7.
    fn highest_rank(&self, mask: u8) -> Option<u8> {
        (0..8u8).find(|rank| mask & (1 << ((rank + self.s.priority_add) & 7)) != 0)
    }

    /// The input this controller would signal on INT, if any.
    fn pending_irq(&self) -> Option<u8> {
        let rank = self.highest_rank(self.s.irr & !self.s.imr)?;
        let mut in_service = self.s.isr;
        if self.s.special_mask {
            in_service &= !self.s.imr;
        }
        if self.is_master && self.s.special_fully_nested {
            in_service &= !(1 << CASCADE_IRQ);
        }
        let current = self.highest_rank(in_service).unwrap_or(8);
        (rank < current).then_some((rank + self.s.priority_add) & 7)
    }

    fn ack(&mut self, irq: u8) {
        let bit = 1u8 << (irq & 7);
        if self.s.auto_eoi {
            if self.s.rotate_on_auto_eoi {
                self.s.priority_add = (irq + 1) & 7;
            }
        } else {
            self.s.isr |= bit;
        }
        if self.s.elcr & bit == 0 {
            self.s.irr &= !bit;
        }
    }

    fn write_command(&mut self, v: u8) {
        if v & ICW1_INIT != 0 {
            if v & ICW1_LTIM != 0 {
                tracing::debug!(v, "8259 ICW1 level mode ignored (the ELCR decides)");
            }
            let elcr = self.s.elcr;
            self.s = Pic8259State {
                elcr,
                init_step: InitStep::Icw2,
                icw4_needed: v & ICW1_IC4 != 0,
                single: v & ICW1_SINGLE != 0,
                ..Pic8259State::default()
            };
        } else if v & 0x18 == OCW3_SELECT {
            if v & OCW3_POLL != 0 {
                self.s.poll = true;
            }
            if v & OCW3_READ_REGISTER != 0 {
                self.s.read_isr = v & OCW3_READ_ISR != 0;
            }
            if v & OCW3_ESMM != 0 {
                self.s.special_mask = v & OCW3_SMM != 0;
            }
        } else {
            let irq = v & 7;
            match v >> 5 {
                0 => self.s.rotate_on_auto_eoi = false,
                4 => self.s.rotate_on_auto_eoi = true,
                1 | 5 => {
                    if let Some(rank) = self.highest_rank(self.s.isr) {
                        let served = (rank + self.s.priority_add) & 7;
                        self.s.isr &= !(1 << served);
                        if v >> 5 == 5 {
                            self.s.priority_add = (served + 1) & 7;
                        }
                    }
                }
                3 => self.s.isr &= !(1 << irq),
                7 => {
                    self.s.isr &= !(1 << irq);
                    self.s.priority_add = (irq + 1) & 7;
                }
                6 => self.s.priority_add = (irq + 1) & 7,
                _ => {}
            }
        }
    }

    fn write_data(&mut self, v: u8) {
        self.s.init_step = match self.s.init_step {
            InitStep::Ready => {
                self.s.imr = v;
                InitStep::Ready
            }
            InitStep::Icw2 => {
                self.s.vector_base = v & 0xf8;
                if !self.s.single {
                    InitStep::Icw3
                } else if self.s.icw4_needed {
                    InitStep::Icw4
                } else {
                    InitStep::Ready
                }
            }
            InitStep::Icw3 => {
                self.s.icw3 = v;
                if self.s.icw4_needed {
                    InitStep::Icw4
                } else {
                    InitStep::Ready
                }
            }
            InitStep::Icw4 => {
                self.s.auto_eoi = v & ICW4_AUTO_EOI != 0;
                self.s.special_fully_nested = v & ICW4_SFNM != 0;
                InitStep::Ready
            }
        };
    }

    /// A read of the command port: the poll byte after a poll command, else IRR or ISR.
    fn read_command(&mut self) -> u8 {
        if std::mem::take(&mut self.s.poll) {
            return match self.pending_irq() {
                Some(irq) => {
                    self.ack(irq);
                    0x80 | irq
                }
                None => 0,
            };
        }
        if self.s.read_isr {
            self.s.isr
        } else {
            self.s.irr
        }
    }

    fn write_elcr(&mut self, v: u8) {
        self.s.elcr = v & self.elcr_mask;
        // Level inputs follow their lines from now on.
        self.s.irr = (self.s.irr & !self.s.elcr) | (self.s.lines & self.s.elcr);
    }
}

/// The master/slave 8259A pair.
#[derive(Clone, Debug)]
pub struct Pic {
    master: Pic8259,
    slave: Pic8259,
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    /// A pair at power-up. The 8259A's power-up state is undefined until ICW1; here every
    /// input starts masked, so nothing reaches a CPU before the guest programs it (with a
    /// direct kernel boot no BIOS does).
    pub fn new() -> Self {
        let mut pic = Pic {
            master: Pic8259::new(true),
            slave: Pic8259::new(false),
        };
        pic.master.s.imr = 0xff;
        pic.slave.s.imr = 0xff;
        pic
    }

    /// The master's and the slave's state.
    pub fn state(&self) -> (&Pic8259State, &Pic8259State) {
        (&self.master.s, &self.slave.s)
    }

    /// A pair restored from a snapshot of the master's and the slave's state.
    pub fn from_state(master: Pic8259State, slave: Pic8259State) -> Self {
        let mut pic = Pic::new();
        pic.master.s = master;
        pic.slave.s = slave;
        for chip in [&mut pic.master, &mut pic.slave] {
            chip.s.elcr &= chip.elcr_mask;
            chip.s.priority_add &= 7;
            chip.s.vector_base &= 0xf8;
        }
        pic
    }

    fn update_cascade(&mut self) {
        let out = self.slave.pending_irq().is_some();
        self.master.set_line(CASCADE_IRQ, out);
    }

    /// Drive ISA IRQ `irq` (0–15) to `level`. IRQ 2 is the cascade input and others past
    /// 15 don't exist: both are ignored.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        match irq {
            CASCADE_IRQ => tracing::debug!("8259: IRQ 2 is the cascade"),
            0..=7 => self.master.set_line(irq, level),
            8..=15 => {
                self.slave.set_line(irq - 8, level);
                self.update_cascade();
            }
            _ => tracing::debug!(irq, "8259: no such IRQ"),
        }
    }

    /// The master's INT output: an interrupt is waiting for INTA.
    ///
    /// ```
    /// use devices::irqchip::pic::Pic;
    ///
    /// let mut pic = Pic::new();
    /// for (port, v) in [(0x20, 0x11), (0x21, 0x30), (0x21, 0x04), (0x21, 0x01), (0x21, 0x00)] {
    ///     pic.write_port(port, &[v]);
    /// }
    /// pic.set_irq(1, true);
    /// assert!(pic.interrupt_pending());
    /// assert_eq!(pic.acknowledge(), Some(0x31));
    /// pic.write_port(0x20, &[0x20]); // non-specific EOI
    /// ```
    pub fn interrupt_pending(&self) -> bool {
        self.master.pending_irq().is_some()
    }

    /// The vector [`Pic::acknowledge`] would return now, if an interrupt is pending.
    pub fn pending_vector(&self) -> Option<u8> {
        match self.master.pending_irq()? {
            CASCADE_IRQ => Some(self.slave.s.vector_base | self.slave.pending_irq().unwrap_or(7)),
            irq => Some(self.master.s.vector_base | irq),
        }
    }

    /// INTA: the vector of the highest-priority request, now in service. With no request
    /// the 8259 answers with its IR7 vector (spurious IRQ 7, or IRQ 15 when the slave
    /// has nothing though the master took IR2) without setting ISR; so this always
    /// returns `Some` — `None` is kept for a future "no 8259 attached".
    pub fn acknowledge(&mut self) -> Option<u8> {
        let vector = match self.master.pending_irq() {
            Some(CASCADE_IRQ) => {
                self.master.ack(CASCADE_IRQ);
                match self.slave.pending_irq() {
                    Some(irq) => {
                        self.slave.ack(irq);
                        self.slave.s.vector_base | irq
                    }
                    None => self.slave.s.vector_base | 7,
                }
            }
            Some(irq) => {
                self.master.ack(irq);
                self.master.s.vector_base | irq
            }
            None => self.master.s.vector_base | 7,
        };
        self.update_cascade();
        Some(vector)
    }

    /// A guest read of `port` (0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1); others read 0xff.
    pub fn read_port(&mut self, port: u16, data: &mut [u8]) {
        let v = match port {
            PIC_MASTER_COMMAND => self.master.read_command(),
            PIC_MASTER_DATA => self.master.s.imr,
            PIC_SLAVE_COMMAND => {
                let v = self.slave.read_command();
                self.update_cascade();
                v
            }
            PIC_SLAVE_DATA => self.slave.s.imr,
            ELCR_MASTER => self.master.s.elcr,
            ELCR_SLAVE => self.slave.s.elcr,
            _ => 0xff,
        };
        fill_byte(data, v);
    }

    /// A guest write of `port`; only the first byte counts.
    pub fn write_port(&mut self, port: u16, data: &[u8]) {
        let Some(v) = first_byte(data) else { return };
        match port {
            PIC_MASTER_COMMAND => self.master.write_command(v),
            PIC_MASTER_DATA => self.master.write_data(v),
            PIC_SLAVE_COMMAND => self.slave.write_command(v),
            PIC_SLAVE_DATA => self.slave.write_data(v),
            ELCR_MASTER => self.master.write_elcr(v),
            ELCR_SLAVE => self.slave.write_elcr(v),
            _ => tracing::debug!(port, v, "8259: write to unknown port"),
        }
        self.update_cascade();
    }
}

/// One port range of a shared [`Pic`], for a [`crate::Bus`]: offsets are added to
/// `base` to give the port.
pub struct PicPorts {
    pic: Arc<Mutex<Pic>>,
    base: u16,
}

impl PicPorts {
    pub fn new(pic: Arc<Mutex<Pic>>, base: u16) -> Self {
        PicPorts { pic, base }
    }

    fn port(&self, offset: u64) -> u16 {
        u16::try_from(offset).map_or(0, |o| self.base.wrapping_add(o))
    }
}

impl BusDevice for PicPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let port = self.port(offset);
        self.pic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .read_port(port, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let port = self.port(offset);
        self.pic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_port(port, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(pic: &mut Pic, port: u16, v: u8) {
        pic.write_port(port, &[v]);
    }

    fn inb(pic: &mut Pic, port: u16) -> u8 {
        let mut b = [0u8];
        pic.read_port(port, &mut b);
        b[0]
    }

    /// What Linux's init_8259A writes (auto_eoi = 0), then unmask everything.
    fn linux_init() -> Pic {
        let mut pic = Pic::new();
        out(&mut pic, 0x21, 0xff);
        out(&mut pic, 0xa1, 0xff);
        out(&mut pic, 0x20, 0x11);
        out(&mut pic, 0x21, 0x30);
        out(&mut pic, 0x21, 0x04);
        out(&mut pic, 0x21, 0x01);
        out(&mut pic, 0xa0, 0x11);
        out(&mut pic, 0xa1, 0x38);
        out(&mut pic, 0xa1, 0x02);
        out(&mut pic, 0xa1, 0x01);
        out(&mut pic, 0x21, 0x00);
        out(&mut pic, 0xa1, 0x00);
        pic
    }

    #[test]
    fn linux_init_sequence_and_probe() {
        let mut pic = linux_init();
        let (m, s) = pic.state();
        assert_eq!(
            (m.vector_base, m.icw3, m.init_step),
            (0x30, 4, InitStep::Ready)
        );
        assert_eq!(
            (s.vector_base, s.icw3, s.init_step),
            (0x38, 2, InitStep::Ready)
        );
        assert!(!m.auto_eoi);
        // probe_8259A: the IMR reads back what was written.
        out(&mut pic, 0x21, 0xa5);
        assert_eq!(inb(&mut pic, 0x21), 0xa5);
        out(&mut pic, 0x21, 0);
        assert!(!pic.interrupt_pending());
    }

    #[test]
    fn priority_and_nonspecific_eoi() {
        let mut pic = linux_init();
        pic.set_irq(4, true);
        pic.set_irq(1, true);
        assert!(pic.interrupt_pending());
        assert_eq!(pic.acknowledge(), Some(0x31));
        // IRQ 4 is lower priority than the in-service IRQ 1.
        assert!(!pic.interrupt_pending());
        out(&mut pic, 0x20, 0x20);
        assert_eq!(pic.acknowledge(), Some(0x34));
        // IRQ 0 preempts IRQ 4 in service.
        pic.set_irq(0, true);
        assert_eq!(pic.acknowledge(), Some(0x30));
        out(&mut pic, 0x20, 0x0b); // read ISR
        assert_eq!(inb(&mut pic, 0x20), 0x11);
        out(&mut pic, 0x20, 0x20); // EOI IRQ 0 (highest in service)
        assert_eq!(inb(&mut pic, 0x20), 0x10);
        out(&mut pic, 0x20, 0x0a); // read IRR
        assert_eq!(inb(&mut pic, 0x20), 0);
    }

    #[test]
    fn specific_eoi_and_mask() {
        let mut pic = linux_init();
        pic.set_irq(3, true);
        assert_eq!(pic.acknowledge(), Some(0x33));
        out(&mut pic, 0x20, 0x63); // specific EOI IRQ 3
        assert_eq!(pic.state().0.isr, 0);
        out(&mut pic, 0x21, 1 << 5);
        pic.set_irq(5, true);
        assert!(!pic.interrupt_pending());
        out(&mut pic, 0x21, 0);
        assert_eq!(pic.acknowledge(), Some(0x35));
    }

    #[test]
    fn cascade_through_irq2() {
        let mut pic = linux_init();
        pic.set_irq(12, true);
        assert!(pic.interrupt_pending());
        assert_eq!(pic.pending_vector(), Some(0x3c));
        assert_eq!(pic.acknowledge(), Some(0x3c));
        assert_eq!(pic.state().0.isr, 1 << 2);
        assert_eq!(pic.state().1.isr, 1 << 4);
        // Linux's mask_and_ack for a slave IRQ: specific EOI to both.
        out(&mut pic, 0xa0, 0x64);
        out(&mut pic, 0x20, 0x62);
        assert_eq!(pic.state().0.isr, 0);
        // Masking the cascade hides the slave.
        pic.set_irq(12, false);
        pic.set_irq(12, true);
        out(&mut pic, 0x21, 1 << 2);
        assert!(!pic.interrupt_pending());
        out(&mut pic, 0x21, 0);
        assert_eq!(pic.acknowledge(), Some(0x3c));
    }

    #[test]
    fn spurious_irq7_and_irq15() {
        let mut pic = linux_init();
        assert_eq!(pic.acknowledge(), Some(0x37));
        assert_eq!(pic.state().0.isr, 0);
        // A request that vanishes (level line dropped) before INTA on the slave.
        out(&mut pic, 0x4d1, 1 << 3);
        pic.set_irq(11, true);
        assert!(pic.interrupt_pending());
        let mut master_took_cascade = pic.clone();
        master_took_cascade.slave.set_line(3, false);
        assert_eq!(master_took_cascade.acknowledge(), Some(0x3f));
        assert_eq!(master_took_cascade.state().1.isr, 0);
    }

    #[test]
    fn elcr_level_mode() {
        let mut pic = linux_init();
        out(&mut pic, 0x4d0, 0xff);
        out(&mut pic, 0x4d1, 0xff);
        assert_eq!(inb(&mut pic, 0x4d0), 0xf8);
        assert_eq!(inb(&mut pic, 0x4d1), 0xde);
        pic.set_irq(5, true);
        assert_eq!(pic.acknowledge(), Some(0x35));
        out(&mut pic, 0x20, 0x20);
        // Still asserted: pending again after EOI.
        assert!(pic.interrupt_pending());
        pic.set_irq(5, false);
        assert!(!pic.interrupt_pending());
        // Edge IRQ (1 can't be level): after ack, a still-high line does not re-trigger.
        pic.set_irq(1, true);
        assert_eq!(pic.acknowledge(), Some(0x31));
        out(&mut pic, 0x20, 0x20);
        assert!(!pic.interrupt_pending());
    }

    #[test]
    fn auto_eoi_poll_and_rotation() {
        let mut pic = Pic::new();
        for (port, v) in [(0x20, 0x11), (0x21, 0x08), (0x21, 0x04), (0x21, 0x03)] {
            out(&mut pic, port, v);
        }
        out(&mut pic, 0x21, 0);
        pic.set_irq(6, true);
        assert_eq!(pic.acknowledge(), Some(0x0e));
        assert_eq!(pic.state().0.isr, 0);
        // Poll command.
        pic.set_irq(3, true);
        out(&mut pic, 0x20, 0x0c);
        assert_eq!(inb(&mut pic, 0x20), 0x83);
        out(&mut pic, 0x20, 0x0c);
        assert_eq!(inb(&mut pic, 0x20), 0);
        // Set priority: IRQ 4 lowest, so IRQ 5 beats IRQ 1.
        out(&mut pic, 0x20, 0xc4);
        pic.set_irq(1, true);
        pic.set_irq(5, true);
        assert_eq!(pic.acknowledge(), Some(0x0d));
    }

    #[test]
    fn state_round_trip() {
        let mut pic = linux_init();
        pic.set_irq(12, true);
        pic.set_irq(3, true);
        let (m, s) = pic.state();
        let mut r = Pic::from_state(m.clone(), s.clone());
        assert_eq!(r.acknowledge(), Some(0x3c));
        r.write_port(0xa0, &[0x20]);
        r.write_port(0x20, &[0x20]);
        assert_eq!(r.acknowledge(), Some(0x33));
        let hostile = Pic8259State {
            priority_add: 200,
            ..Pic8259State::default()
        };
        let mut r = Pic::from_state(hostile.clone(), hostile);
        r.set_irq(5, true);
        r.write_port(0x21, &[0]);
        r.acknowledge();
    }

    #[test]
    fn hostile_ports_and_ranges() {
        let pic = Arc::new(Mutex::new(linux_init()));
        let mut ports = PicPorts::new(pic.clone(), 0xa0);
        ports.write(1, &[0x00]);
        let mut b = [0u8; 4];
        ports.read(u64::MAX, &mut b);
        ports.write(u64::MAX, &[]);
        ports.read(0, &mut []);
        let mut p = pic.lock().unwrap();
        p.set_irq(200, true);
        p.set_irq(2, true);
        p.read_port(0x1234, &mut b);
        assert_eq!(b, [0xff, 0, 0, 0]);
        for v in 0..=255u8 {
            p.write_port(0x20, &[v]);
            p.write_port(0xa0, &[v]);
            p.write_port(0x21, &[v]);
            p.acknowledge();
        }
    }
}
