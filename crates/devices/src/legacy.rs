//! Small legacy and platform devices: the i8042's reset line, the chipset's reset control
//! register at 0xcf9, the ACPI power-management registers, and a debug-exit port for tests.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::exit::{ExitReason, ExitSignal};

/// The i8042 keyboard controller, as far as a VMM needs it: its command 0xfe pulses the
/// CPU reset line, which is how Linux reboots with `reboot=k`; and the answers firmware
/// waits for (SeaBIOS's controller self-test, the keyboard's reset and acknowledgements),
/// without which each of its probes runs to a half-second timeout. A keyboard that sends
/// no keys is attached; the auxiliary (mouse) port has nothing behind it.
pub struct I8042 {
    exit: Arc<ExitSignal>,
    command_byte: u8,
    /// The controller command whose parameter the next data byte is.
    pending: Option<u8>,
    /// A keyboard command waiting for its parameter byte (LEDs, scan code set, rate).
    kbd_param: bool,
    /// Bytes for the guest to read at the data port, oldest first.
    out: std::collections::VecDeque<u8>,
    last: u8,
}

/// Port offsets from 0x60.
const I8042_DATA: u64 = 0;
const I8042_COMMAND: u64 = 4;
const CMD_READ_COMMAND_BYTE: u8 = 0x20;
const CMD_WRITE_COMMAND_BYTE: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_PULSE_RESET: u8 = 0xfe;
/// Status: output buffer full, and the system flag (POST passed).
const STATUS_OBF: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
/// Command byte: keyboard and auxiliary clocks disabled.
const CB_KBD_DISABLED: u8 = 0x10;
const CB_AUX_DISABLED: u8 = 0x20;
/// Keyboard answers: acknowledge, self-test passed, resend.
const KBD_ACK: u8 = 0xfa;
const KBD_BAT_OK: u8 = 0xaa;
const KBD_RESEND: u8 = 0xfe;
/// More bytes than any command answers with: what a guest never reads is dropped.
const OUT_MAX: usize = 16;

impl I8042 {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        I8042 {
            exit,
            command_byte: 0,
            pending: None,
            kbd_param: false,
            out: std::collections::VecDeque::new(),
            last: 0,
        }
    }

    fn answer(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.out.len() < OUT_MAX {
                self.out.push_back(b);
            }
        }
    }

    fn controller_command(&mut self, v: u8) {
        match v {
            CMD_PULSE_RESET => self.exit.request(ExitReason::Reset),
            CMD_READ_COMMAND_BYTE => self.answer(&[self.command_byte]),
            CMD_WRITE_COMMAND_BYTE | CMD_WRITE_OUTPUT_PORT | CMD_WRITE_AUX => {
                self.pending = Some(v)
            }
            CMD_SELF_TEST => self.answer(&[0x55]),
            CMD_KBD_TEST | CMD_AUX_TEST => self.answer(&[0x00]),
            CMD_KBD_DISABLE => self.command_byte |= CB_KBD_DISABLED,
            CMD_KBD_ENABLE => self.command_byte &= !CB_KBD_DISABLED,
            CMD_AUX_DISABLE => self.command_byte |= CB_AUX_DISABLED,
            CMD_AUX_ENABLE => self.command_byte &= !CB_AUX_DISABLED,
            // A20 enabled, the reset line not asserted.
            CMD_READ_OUTPUT_PORT => self.answer(&[0x03]),
            _ => tracing::trace!(v, "i8042 command ignored"),
        }
    }

    /// A byte for the keyboard itself.
    fn keyboard(&mut self, v: u8) {
        if std::mem::take(&mut self.kbd_param) {
            self.answer(&[KBD_ACK]);
            return;
        }
        match v {
            // Reset: acknowledge, then the self-test's result.
            0xff => self.answer(&[KBD_ACK, KBD_BAT_OK]),
            // Identify: an MF2 keyboard.
            0xf2 => self.answer(&[KBD_ACK, 0xab, 0x83]),
            0xee => self.answer(&[0xee]),
            // Set LEDs, scan code set, typematic rate: a parameter byte follows.
            0xed | 0xf0 | 0xf3 => {
                self.kbd_param = true;
                self.answer(&[KBD_ACK]);
            }
            0xf4..=0xf6 => self.answer(&[KBD_ACK]),
            _ => self.answer(&[KBD_RESEND]),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            I8042_COMMAND => STATUS_SYSTEM_FLAG | if self.out.is_empty() { 0 } else { STATUS_OBF },
            I8042_DATA => {
                if let Some(b) = self.out.pop_front() {
                    self.last = b;
                }
                self.last
            }
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            I8042_COMMAND => {
                self.pending = None;
                self.controller_command(v);
            }
            I8042_DATA => match self.pending.take() {
                Some(CMD_WRITE_COMMAND_BYTE) => self.command_byte = v,
                // Nothing on the auxiliary port answers.
                Some(_) => {}
                None => self.keyboard(v),
            },
            _ => tracing::trace!(offset, v, "i8042 write ignored"),
        }
    }
}

/// A full ACPI platform's PM1a registers, as one 6-port range: PM1_STS (+0, write 1 to
/// clear; no event is ever raised), PM1_EN (+2) and PM1_CNT (+4: SCI_EN always reads 1,
/// the machine being always in ACPI mode; SLP_EN with the S5 sleep type powers off).
pub struct Pm1 {
    exit: Arc<ExitSignal>,
    s5_sleep_type: u8,
    regs: [u8; 6],
}

impl Pm1 {
    /// The event and control registers (status, enable, control), for a snapshot.
    pub fn regs(&self) -> [u8; 6] {
        self.regs
    }

    /// Puts back what [`Pm1::regs`] saved.
    pub fn set_regs(&mut self, regs: [u8; 6]) {
        self.regs = regs;
    }
}

/// PM1_CNT bits.
const PM1_CNT_SCI_EN: u16 = 1;
const PM1_CNT_SLP_TYP_SHIFT: u16 = 10;
const PM1_CNT_SLP_EN: u16 = 1 << 13;
/// Ports the PM1a event and control blocks take together.
pub const PM1_PORTS: u64 = 6;

impl Pm1 {
    pub fn new(exit: Arc<ExitSignal>, s5_sleep_type: u8) -> Self {
        Pm1 {
            exit,
            s5_sleep_type,
            regs: [0; 6],
        }
    }
}

impl BusDevice for Pm1 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let mut regs = self.regs;
        regs[4] |= PM1_CNT_SCI_EN as u8;
        for (i, b) in data.iter_mut().enumerate() {
            if let Some(v) = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| regs.get(o))
            {
                *b = *v;
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let Some(at) = usize::try_from(offset).ok().and_then(|o| o.checked_add(i)) else {
                return;
            };
            match at {
                // PM1_STS: write 1 to clear.
                0 | 1 => self.regs[at] &= !v,
                2..=5 => self.regs[at] = v,
                _ => {}
            }
        }
        let cnt = u16::from_le_bytes([self.regs[4], self.regs[5]]);
        if cnt & PM1_CNT_SLP_EN != 0 {
            let sleep_type = ((cnt >> PM1_CNT_SLP_TYP_SHIFT) & 7) as u8;
            if sleep_type == self.s5_sleep_type {
                self.exit.request(ExitReason::PowerOff);
            } else {
                tracing::debug!(sleep_type, "PM1 sleep to a state other than S5 ignored");
            }
            // SLP_EN is write-only.
            self.regs[5] &= !((PM1_CNT_SLP_EN >> 8) as u8);
        }
    }
}

/// The ACPI power management timer: a free-running 24-bit counter at 3.579545 MHz
/// (the PC's 14.31818 MHz crystal divided by 4), read as a dword; writes are ignored.
/// It counts host monotonic time from the device's creation.
///
/// ```
/// use devices::{legacy::PmTimer, BusDevice};
/// let mut t = PmTimer::new();
/// let mut a = [0u8; 4];
/// t.read(0, &mut a);
/// std::thread::sleep(std::time::Duration::from_millis(2));
/// let mut b = [0u8; 4];
/// t.read(0, &mut b);
/// let ticks = u32::from_le_bytes(b).wrapping_sub(u32::from_le_bytes(a)) & 0xff_ffff;
/// assert!(ticks >= 7_000, "2 ms is about 7159 ticks, got {ticks}");
/// ```
#[derive(Debug)]
pub struct PmTimer {
    start: std::time::Instant,
    /// The count at `start` (a restored timer goes on from its snapshot's).
    base: u32,
}

/// The PM timer's rate in Hz.
pub const PM_TIMER_HZ: u128 = 3_579_545;
/// The PM timer's counter bits (24: the FADT's TMR_VAL_EXT is clear).
const PM_TIMER_MASK: u32 = 0x00ff_ffff;

impl PmTimer {
    pub fn new() -> Self {
        Self::starting_at(0)
    }

    /// A timer that counts on from `count` (a snapshot's [`PmTimer::count`]).
    pub fn starting_at(count: u32) -> Self {
        PmTimer {
            start: std::time::Instant::now(),
            base: count & PM_TIMER_MASK,
        }
    }

    /// The counter now.
    pub fn count(&self) -> u32 {
        let ticks = self.start.elapsed().as_nanos() * PM_TIMER_HZ / 1_000_000_000;
        (ticks as u32).wrapping_add(self.base) & PM_TIMER_MASK
    }
}

impl Default for PmTimer {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for PmTimer {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = self.count().to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| v.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// The reset control register of PC chipsets (PIIX, ICH) at port 0xcf9: writing it with
/// RST_CPU set resets the machine. Linux uses it for `reboot=p` (it writes SYS_RST, then
/// SYS_RST | RST_CPU, with FULL_RST for a cold reboot). Only this register is decoded:
/// the PCI configuration ports around it stay unmapped.
pub struct ResetControl {
    exit: Arc<ExitSignal>,
    value: u8,
}

pub const RESET_CONTROL_PORT: u16 = 0xcf9;
/// SYS_RST (hard rather than soft reset) and FULL_RST (power-cycle): kept, read back.
const RCR_SYS_RST: u8 = 1 << 1;
const RCR_FULL_RST: u8 = 1 << 3;
/// RST_CPU: do the reset.
const RCR_RST_CPU: u8 = 1 << 2;

impl ResetControl {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        ResetControl { exit, value: 0 }
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.value;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if v & RCR_RST_CPU != 0 {
            self.exit.request(ExitReason::Reset);
        } else {
            self.value = v & (RCR_SYS_RST | RCR_FULL_RST);
        }
    }
}

/// The hardware-reduced ACPI registers the FADT names: sleep control (S5 powers off),
/// sleep status, and the reset register. Offsets follow `arch::acpi`'s ports.
pub struct AcpiPm {
    exit: Arc<ExitSignal>,
    s5_sleep_type: u8,
    reset_value: u8,
}

pub const ACPI_PM_SLEEP_CONTROL: u64 = 0;
pub const ACPI_PM_SLEEP_STATUS: u64 = 1;
pub const ACPI_PM_RESET: u64 = 2;
const SLP_EN: u8 = 1 << 5;

impl AcpiPm {
    /// `s5_sleep_type` is the SLP_TYP the DSDT's `\_S5_` publishes; `reset_value` the
    /// FADT's RESET_VALUE.
    pub fn new(exit: Arc<ExitSignal>, s5_sleep_type: u8, reset_value: u8) -> Self {
        AcpiPm {
            exit,
            s5_sleep_type,
            reset_value,
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            ACPI_PM_SLEEP_CONTROL if v & SLP_EN != 0 => {
                if (v >> 2) & 0x7 == self.s5_sleep_type {
                    self.exit.request(ExitReason::PowerOff);
                } else {
                    tracing::warn!(v, "guest asked for a sleep state other than S5; ignored");
                }
            }
            ACPI_PM_RESET if v == self.reset_value => self.exit.request(ExitReason::Reset),
            _ => {}
        }
    }
}

/// QEMU's isa-debug-exit: a write of `v` ends the VM with process status (v << 1) | 1, so
/// a test guest can report a result no guest bug can fake as 0.
pub struct DebugExit {
    exit: Arc<ExitSignal>,
}

/// QEMU's default iobase for isa-debug-exit.
pub const DEBUG_EXIT_PORT: u16 = 0x501;

impl DebugExit {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        DebugExit { exit }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        self.exit
            .request(ExitReason::DebugExit(u32::from_le_bytes(v)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restored_pm_timer_counts_on_from_its_snapshot() {
        let t = PmTimer::starting_at(0x00ff_fff0);
        let c = t.count();
        // Near the top of its 24 bits: it goes on from there and wraps, never back to 0
        // of a fresh timer (a few ticks pass between the two lines).
        assert!(!(0x1000..0x00ff_fff0).contains(&c), "{c:#x}");
        assert_eq!(PmTimer::starting_at(u32::MAX).count() >> 24, 0);
    }

    #[test]
    fn i8042_pulse_resets() {
        let exit = Arc::new(ExitSignal::new());
        let mut k = I8042::new(exit.clone());
        let mut s = [0u8];
        k.read(I8042_COMMAND, &mut s);
        assert_eq!(s[0] & 0x3, 0, "buffers must read empty");
        k.write(I8042_COMMAND, &[0xaa]);
        assert_eq!(exit.get(), None);
        k.write(I8042_COMMAND, &[CMD_PULSE_RESET]);
        assert_eq!(exit.get(), Some(ExitReason::Reset));
    }

    fn read(k: &mut I8042, port: u64) -> u8 {
        let mut v = [0u8];
        k.read(port, &mut v);
        v[0]
    }

    /// What SeaBIOS's PS/2 setup asks, in its order: each answer is there to read (the
    /// output buffer flag up) and the buffer is empty after it.
    #[test]
    fn i8042_answers_firmwares_probe() {
        let mut k = I8042::new(Arc::new(ExitSignal::new()));
        k.write(I8042_COMMAND, &[CMD_KBD_DISABLE]);
        k.write(I8042_COMMAND, &[CMD_AUX_DISABLE]);
        assert_eq!(read(&mut k, I8042_COMMAND) & STATUS_OBF, 0);
        let expect = |k: &mut I8042, want: &[u8]| {
            for &w in want {
                assert_eq!(read(k, I8042_COMMAND) & STATUS_OBF, STATUS_OBF, "{want:x?}");
                assert_eq!(read(k, I8042_DATA), w);
            }
            assert_eq!(read(k, I8042_COMMAND) & STATUS_OBF, 0, "{want:x?}: no more");
        };
        k.write(I8042_COMMAND, &[CMD_SELF_TEST]);
        expect(&mut k, &[0x55]);
        k.write(I8042_COMMAND, &[CMD_KBD_TEST]);
        expect(&mut k, &[0x00]);
        k.write(I8042_DATA, &[0xff]);
        expect(&mut k, &[KBD_ACK, KBD_BAT_OK]);
        k.write(I8042_DATA, &[0xf5]);
        expect(&mut k, &[KBD_ACK]);
        k.write(I8042_DATA, &[0xf0]);
        expect(&mut k, &[KBD_ACK]);
        k.write(I8042_DATA, &[0x02]);
        expect(&mut k, &[KBD_ACK]);
        k.write(I8042_COMMAND, &[CMD_WRITE_COMMAND_BYTE]);
        k.write(I8042_DATA, &[0x61]);
        expect(&mut k, &[]);
        k.write(I8042_COMMAND, &[CMD_READ_COMMAND_BYTE]);
        expect(&mut k, &[0x61]);
        k.write(I8042_DATA, &[0xf4]);
        expect(&mut k, &[KBD_ACK]);
        // The mouse port: nothing answers.
        k.write(I8042_COMMAND, &[CMD_WRITE_AUX]);
        k.write(I8042_DATA, &[0xff]);
        expect(&mut k, &[]);
        // A guest that never reads cannot grow the buffer.
        for _ in 0..1000 {
            k.write(I8042_COMMAND, &[CMD_SELF_TEST]);
        }
        assert_eq!(k.out.len(), OUT_MAX);
    }

    #[test]
    fn reset_control_resets_on_rst_cpu() {
        let exit = Arc::new(ExitSignal::new());
        let mut rcr = ResetControl::new(exit.clone());
        let mut v = [0xffu8];
        rcr.read(0, &mut v);
        assert_eq!(v[0], 0);
        // Linux's sequence for a cold reboot: SYS_RST, then FULL_RST | RST_CPU | SYS_RST.
        rcr.write(0, &[RCR_SYS_RST]);
        assert_eq!(exit.get(), None);
        rcr.read(0, &mut v);
        assert_eq!(v[0], RCR_SYS_RST);
        rcr.write(0, &[0x0e]);
        assert_eq!(exit.get(), Some(ExitReason::Reset));
    }

    #[test]
    fn reset_control_warm_reset() {
        let exit = Arc::new(ExitSignal::new());
        let mut rcr = ResetControl::new(exit.clone());
        rcr.write(0, &[0x02]);
        rcr.write(0, &[0x06]);
        assert_eq!(exit.get(), Some(ExitReason::Reset));
    }

    #[test]
    fn pm1_reads_in_acpi_mode_and_powers_off_on_s5() {
        let exit = Arc::new(ExitSignal::new());
        let mut pm = Pm1::new(exit.clone(), 5);
        let mut cnt = [0u8; 2];
        pm.read(4, &mut cnt);
        assert_eq!(
            u16::from_le_bytes(cnt) & PM1_CNT_SCI_EN,
            1,
            "always in ACPI mode"
        );
        pm.write(2, &0x0121u16.to_le_bytes());
        let mut all = [0u8; 6];
        pm.read(0, &mut all);
        assert_eq!(&all[2..4], &[0x21, 0x01], "PM1_EN keeps what was written");
        // S3 with SLP_EN: ignored, SLP_EN not kept; S5 without SLP_EN: nothing yet.
        pm.write(4, &((3u16 << 10) | PM1_CNT_SLP_EN).to_le_bytes());
        pm.read(4, &mut cnt);
        assert_eq!(u16::from_le_bytes(cnt) & PM1_CNT_SLP_EN, 0);
        pm.write(4, &(5u16 << 10).to_le_bytes());
        assert_eq!(exit.get(), None);
        pm.write(4, &((5u16 << 10) | PM1_CNT_SLP_EN).to_le_bytes());
        assert_eq!(exit.get(), Some(ExitReason::PowerOff));
        // Out-of-range and odd accesses do nothing harmful.
        pm.write(5, &[1, 2, 3, 4]);
        pm.read(u64::MAX, &mut all);
        pm.write(u64::MAX, &[1]);
    }

    #[test]
    fn acpi_s5_powers_off_and_other_states_do_not() {
        let exit = Arc::new(ExitSignal::new());
        let mut pm = AcpiPm::new(exit.clone(), 5, 1);
        pm.write(ACPI_PM_SLEEP_CONTROL, &[(3 << 2) | SLP_EN]);
        assert_eq!(exit.get(), None);
        pm.write(ACPI_PM_SLEEP_CONTROL, &[5 << 2]);
        assert_eq!(exit.get(), None);
        pm.write(ACPI_PM_SLEEP_CONTROL, &[(5 << 2) | SLP_EN]);
        assert_eq!(exit.get(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn acpi_reset_register() {
        let exit = Arc::new(ExitSignal::new());
        let mut pm = AcpiPm::new(exit.clone(), 5, 1);
        pm.write(ACPI_PM_RESET, &[0]);
        assert_eq!(exit.get(), None);
        pm.write(ACPI_PM_RESET, &[1]);
        assert_eq!(exit.get(), Some(ExitReason::Reset));
    }

    #[test]
    fn debug_exit_carries_the_value() {
        let exit = Arc::new(ExitSignal::new());
        DebugExit::new(exit.clone()).write(0, &[0x21]);
        assert_eq!(exit.get(), Some(ExitReason::DebugExit(0x21)));
    }
}
