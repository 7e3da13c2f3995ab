//! The MC146818 CMOS real-time clock and its 128 bytes of RAM (ports 0x70 index,
//! 0x71 data).
//!
//! The time is not stepped: it is the caller's wall-clock at VM start plus `now_ns`,
//! plus whatever the guest set. Its seconds turn over when the caller's clock's do (the
//! start time's fraction of a second counts), so a guest that sets its clock from the
//! RTC's whole seconds (Linux adds half a second) is within half a second of the host's. Time registers read in BCD or binary (register B's DM
//! bit) and 12- or 24-hour format. Update-in-progress (register A bit 7) reads set in the
//! last 244 us of each second, as on the chip, so a guest polling it always gets through.
//! No interrupts are raised (periodic, alarm and update-ended flags stay 0).

use super::{fill_byte, first_byte, TimedPio};

pub const RTC_PORT_INDEX: u16 = 0x70;
pub const RTC_PORT_DATA: u16 = 0x71;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_DAY_OF_WEEK: u8 = 0x06;
const REG_DAY_OF_MONTH: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
/// The century byte ACPI's FADT points at.
const REG_CENTURY: u8 = 0x32;

/// Index port bit 7: NMI disable (not modelled).
const INDEX_NMI_DISABLE: u8 = 0x80;
/// Register A bit 7: update in progress.
const A_UIP: u8 = 0x80;
/// Register A: 32.768 kHz time base, 1024 Hz periodic rate (the power-up value).
const A_DEFAULT: u8 = 0x26;
/// Register B bit 7: SET, updates halted while the guest sets the time.
const B_SET: u8 = 0x80;
/// Register B bit 2: DM, binary (not BCD) data.
const B_BINARY: u8 = 0x04;
/// Register B bit 1: 24-hour mode.
const B_24H: u8 = 0x02;
/// Register D bit 7: valid RAM and time (battery good).
const D_VRT: u8 = 0x80;
/// Hours register bit 7 in 12-hour mode: PM.
const HOUR_PM: u8 = 0x80;
/// UIP is set this long before each update.
const UIP_WINDOW_NS: u64 = 244_000;
const NS_PER_SEC: u64 = 1_000_000_000;

/// A broken-down UTC time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTime {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// 1 = Sunday … 7 = Saturday, as the RTC counts.
    pub weekday: u32,
}

impl DateTime {
    /// The UTC date and time of `unix` seconds since 1970-01-01.
    pub fn from_unix(unix: i64) -> Self {
        let days = unix.div_euclid(86_400);
        let secs = unix.rem_euclid(86_400);
        // Civil-from-days over 400-year eras of 146097 days, years starting in March.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        DateTime {
            year,
            month: month as u32,
            day: day as u32,
            hour: (secs / 3600) as u32,
            minute: (secs / 60 % 60) as u32,
            second: (secs % 60) as u32,
            // 1970-01-01 was a Thursday.
            weekday: ((days + 4).rem_euclid(7) + 1) as u32,
        }
    }

    /// Seconds since 1970-01-01 of this date and time (the weekday is ignored),
    /// saturating at the ends of `i64`.
    pub fn to_unix(&self) -> i64 {
        let (m, d) = (i128::from(self.month), i128::from(self.day));
        let year = i128::from(self.year);
        let y = if m <= 2 { year - 1 } else { year };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = if m > 2 { m - 3 } else { m + 9 };
        let doy = (153 * mp + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        let secs = days * 86_400
            + i128::from(self.hour) * 3600
            + i128::from(self.minute) * 60
            + i128::from(self.second);
        i64::try_from(secs).unwrap_or(if secs < 0 { i64::MIN } else { i64::MAX })
    }
}

fn to_bcd(v: u32) -> u8 {
    let v = v % 100;
    (((v / 10) << 4) | (v % 10)) as u8
}

fn from_bcd(v: u8) -> u32 {
    u32::from(v >> 4) * 10 + u32::from(v & 0xf)
}

/// The CMOS RTC. Its fields are its plain state: a snapshot is a clone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rtc {
    pub index: u8,
    pub ram: [u8; 128],
    pub base_unix: i64,
    /// The fraction of a second past `base_unix` at `now_ns` = 0, in ns (below 1 s).
    pub base_subsec_ns: u32,
    /// Seconds the guest moved the clock by.
    pub offset_s: i64,
    /// The time held while register B's SET bit is on.
    pub held: Option<i64>,
}

impl Rtc {
    /// An RTC whose time at `now_ns` = 0 is `unix_seconds_at_start`.
    ///
    /// ```
    /// use devices::irqchip::rtc::Rtc;
    ///
    /// let mut rtc = Rtc::new(1_700_000_000); // 2023-11-14 22:13:20 UTC
    /// rtc.write(0, &[0x04], 0); // index: hours
    /// let mut b = [0u8];
    /// rtc.read(1, &mut b, 0);
    /// assert_eq!(b[0], 0x22); // BCD
    /// ```
    pub fn new(unix_seconds_at_start: i64) -> Self {
        let mut ram = [0u8; 128];
        ram[usize::from(REG_A)] = A_DEFAULT;
        ram[usize::from(REG_B)] = B_24H;
        ram[usize::from(REG_D)] = D_VRT;
        Rtc {
            index: 0,
            ram,
            base_unix: unix_seconds_at_start,
            base_subsec_ns: 0,
            offset_s: 0,
            held: None,
        }
    }

    /// An RTC whose time at `now_ns` = 0 is `unix_seconds_at_start` plus `subsec_ns`
    /// (taken modulo 1 s): its seconds then turn over with the clock that gave them.
    ///
    /// ```
    /// use devices::irqchip::rtc::Rtc;
    ///
    /// // Started at 22:13:20.9: a tenth of a second later it reads 22:13:21.
    /// let mut rtc = Rtc::new(1_700_000_000).with_subsecond(900_000_000);
    /// rtc.write(0, &[0x00], 0); // index: seconds
    /// let mut b = [0u8];
    /// rtc.read(1, &mut b, 100_000_000);
    /// assert_eq!(b[0], 0x21);
    /// ```
    pub fn with_subsecond(mut self, subsec_ns: u32) -> Self {
        self.base_subsec_ns = subsec_ns % NS_PER_SEC as u32;
        self
    }

    /// Whole seconds since `base_unix` at `now_ns`, and the fraction of the current one.
    fn elapsed(&self, now_ns: u64) -> (i64, u64) {
        let t = u128::from(now_ns) + u128::from(self.base_subsec_ns);
        let secs = i64::try_from(t / u128::from(NS_PER_SEC)).unwrap_or(i64::MAX);
        (secs, (t % u128::from(NS_PER_SEC)) as u64)
    }

    /// Set a CMOS RAM byte as firmware would (e.g. memory sizes); index 0–127.
    pub fn set_cmos_byte(&mut self, index: u8, value: u8) {
        if let Some(b) = self.ram.get_mut(usize::from(index)) {
            *b = value;
        }
    }

    fn unix_now(&self, now_ns: u64) -> i64 {
        if let Some(t) = self.held {
            return t;
        }
        let (secs, _) = self.elapsed(now_ns);
        self.base_unix
            .saturating_add(secs)
            .saturating_add(self.offset_s)
    }

    fn reg(&self, r: u8) -> u8 {
        self.ram[usize::from(r & 0x7f)]
    }

    fn encode(&self, v: u32) -> u8 {
        if self.reg(REG_B) & B_BINARY != 0 {
            v as u8
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u32 {
        if self.reg(REG_B) & B_BINARY != 0 {
            u32::from(v)
        } else {
            from_bcd(v)
        }
    }

    fn encode_hour(&self, h: u32) -> u8 {
        if self.reg(REG_B) & B_24H != 0 {
            return self.encode(h);
        }
        let h12 = if h.is_multiple_of(12) { 12 } else { h % 12 };
        self.encode(h12) | if h >= 12 { HOUR_PM } else { 0 }
    }

    fn read_register(&self, r: u8, now_ns: u64) -> u8 {
        let t = DateTime::from_unix(self.unix_now(now_ns));
        match r {
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS => self.encode_hour(t.hour),
            REG_DAY_OF_WEEK => self.encode(t.weekday),
            REG_DAY_OF_MONTH => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode(t.year.rem_euclid(100) as u32),
            REG_CENTURY => self.encode(t.year.div_euclid(100).rem_euclid(100) as u32),
            REG_A => {
                let updating =
                    self.held.is_none() && self.elapsed(now_ns).1 >= NS_PER_SEC - UIP_WINDOW_NS;
                (self.reg(REG_A) & !A_UIP) | if updating { A_UIP } else { 0 }
            }
            // No interrupt flags are ever raised.
            REG_C => 0,
            REG_D => D_VRT,
            _ => self.reg(r),
        }
    }

    fn write_time_field(&mut self, r: u8, v: u8, now_ns: u64) {
        let mut t = DateTime::from_unix(self.unix_now(now_ns));
        let value = self.decode(v & if r == REG_HOURS { 0x7f } else { 0xff });
        match r {
            REG_SECONDS if value < 60 => t.second = value,
            REG_MINUTES if value < 60 => t.minute = value,
            REG_HOURS if self.reg(REG_B) & B_24H != 0 && value < 24 => t.hour = value,
            REG_HOURS if (1..=12).contains(&value) => {
                t.hour = value % 12 + if v & HOUR_PM != 0 { 12 } else { 0 };
            }
            REG_DAY_OF_MONTH if (1..=31).contains(&value) => t.day = value,
            REG_MONTH if (1..=12).contains(&value) => t.month = value,
            REG_YEAR if value < 100 => t.year = t.year - t.year.rem_euclid(100) + i64::from(value),
            REG_CENTURY if value < 100 => {
                t.year = i64::from(value) * 100 + t.year.rem_euclid(100);
            }
            // The day of the week follows from the date.
            REG_DAY_OF_WEEK => return,
            _ => {
                tracing::debug!(register = r, v, "RTC: out-of-range time value ignored");
                return;
            }
        }
        let unix = t.to_unix();
        if self.held.is_some() {
            self.held = Some(unix);
        } else {
            self.set_time(unix, now_ns);
        }
    }

    fn set_time(&mut self, unix: i64, now_ns: u64) {
        let (secs, _) = self.elapsed(now_ns);
        self.offset_s = unix.saturating_sub(self.base_unix).saturating_sub(secs);
    }

    fn write_register(&mut self, r: u8, v: u8, now_ns: u64) {
        match r {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY_OF_WEEK | REG_DAY_OF_MONTH
            | REG_MONTH | REG_YEAR | REG_CENTURY => self.write_time_field(r, v, now_ns),
            REG_A => self.ram[usize::from(REG_A)] = v & !A_UIP,
            REG_B => {
                if v & B_SET != 0 && self.held.is_none() {
                    self.held = Some(self.unix_now(now_ns));
                } else if v & B_SET == 0 {
                    if let Some(t) = self.held.take() {
                        self.set_time(t, now_ns);
                    }
                }
                self.ram[usize::from(REG_B)] = v;
            }
            REG_C | REG_D => tracing::debug!(register = r, v, "RTC: read-only register"),
            _ => self.ram[usize::from(r & 0x7f)] = v,
        }
    }

    /// A read of port 0x70 + `offset`: the index port is write-only (reads 0xff).
    pub fn read(&mut self, offset: u64, data: &mut [u8], now_ns: u64) {
        let v = match offset {
            1 => self.read_register(self.index, now_ns),
            _ => 0xff,
        };
        fill_byte(data, v);
    }

    /// A write of port 0x70 + `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8], now_ns: u64) {
        let Some(v) = first_byte(data) else { return };
        match offset {
            0 => self.index = v & !INDEX_NMI_DISABLE,
            1 => self.write_register(self.index, v, now_ns),
            _ => tracing::debug!(offset, v, "RTC: write past the data port"),
        }
    }
}

impl TimedPio for Rtc {
    fn pio_read(&mut self, offset: u64, data: &mut [u8], now_ns: u64) {
        self.read(offset, data, now_ns);
    }

    fn pio_write(&mut self, offset: u64, data: &[u8], now_ns: u64) {
        self.write(offset, data, now_ns);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::bus::BusDevice;
    use crate::irqchip::{Clock, Clocked};

    /// 2024-02-29 13:45:30 UTC, a Thursday.
    const LEAP_DAY: i64 = 1_709_214_330;

    fn cmos(rtc: &mut Rtc, r: u8, now: u64) -> u8 {
        rtc.write(0, &[r], now);
        let mut b = [0u8];
        rtc.read(1, &mut b, now);
        b[0]
    }

    fn set(rtc: &mut Rtc, r: u8, v: u8, now: u64) {
        rtc.write(0, &[r], now);
        rtc.write(1, &[v], now);
    }

    #[test]
    fn date_conversion() {
        let t = DateTime::from_unix(LEAP_DAY);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second, t.weekday),
            (2024, 2, 29, 13, 45, 30, 5)
        );
        assert_eq!(t.to_unix(), LEAP_DAY);
        assert_eq!(DateTime::from_unix(0).weekday, 5);
        let before = DateTime::from_unix(-1);
        assert_eq!(
            (before.year, before.month, before.day, before.second),
            (1969, 12, 31, 59)
        );
        for unix in [0, 951_782_400, 4_107_542_400, LEAP_DAY, -86_400 * 365 * 300] {
            assert_eq!(DateTime::from_unix(unix).to_unix(), unix);
        }
    }

    #[test]
    fn bcd_and_binary() {
        let mut rtc = Rtc::new(LEAP_DAY);
        let regs = [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32];
        let read = |rtc: &mut Rtc| regs.map(|r| cmos(rtc, r, 0));
        assert_eq!(
            read(&mut rtc),
            [0x30, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]
        );
        set(&mut rtc, 0x0b, B_24H | B_BINARY, 0);
        assert_eq!(read(&mut rtc), [30, 45, 13, 5, 29, 2, 24, 20]);
        // 12-hour BCD: 1 PM.
        set(&mut rtc, 0x0b, 0, 0);
        assert_eq!(cmos(&mut rtc, 0x04, 0), 0x81);
        // Time advances with now_ns.
        set(&mut rtc, 0x0b, B_24H, 0);
        assert_eq!(cmos(&mut rtc, 0x00, 31 * NS_PER_SEC), 0x01);
        assert_eq!(cmos(&mut rtc, 0x02, 31 * NS_PER_SEC), 0x46);
        assert_eq!(cmos(&mut rtc, 0x0d, 0), 0x80);
        assert_eq!(cmos(&mut rtc, 0x0a, 0), 0x26);
    }

    #[test]
    fn uip_window() {
        let mut rtc = Rtc::new(0);
        assert_eq!(cmos(&mut rtc, 0x0a, 500_000_000) & A_UIP, 0);
        assert_eq!(cmos(&mut rtc, 0x0a, 999_800_000) & A_UIP, A_UIP);
        assert_eq!(cmos(&mut rtc, 0x0a, 1_000_000_000) & A_UIP, 0);
        // Linux-style polling: wait out UIP by advancing time, then read.
        let mut now = 999_900_000;
        while cmos(&mut rtc, 0x0a, now) & A_UIP != 0 {
            now += 100_000;
        }
        assert_eq!(cmos(&mut rtc, 0x00, now), 0x01);
    }

    #[test]
    fn seconds_turn_over_with_the_starting_clock() {
        // Started 0.7 s into LEAP_DAY's second: 0.3 s later the next second begins, and
        // the update-in-progress window is the 244 us before that.
        let mut rtc = Rtc::new(LEAP_DAY).with_subsecond(700_000_000);
        assert_eq!(cmos(&mut rtc, 0x00, 299_999_999), 0x30);
        assert_eq!(cmos(&mut rtc, 0x00, 300_000_000), 0x31);
        assert_eq!(cmos(&mut rtc, 0x0a, 299_900_000) & A_UIP, A_UIP);
        assert_eq!(cmos(&mut rtc, 0x0a, 300_000_000) & A_UIP, 0);
        assert_eq!(cmos(&mut rtc, 0x0a, 0) & A_UIP, 0);
        // A time the guest sets holds from the second it was set in.
        set(&mut rtc, 0x00, 0x10, 400_000_000);
        assert_eq!(cmos(&mut rtc, 0x00, 1_299_999_999), 0x10);
        assert_eq!(cmos(&mut rtc, 0x00, 1_300_000_000), 0x11);
        // Out-of-range fractions wrap; the extremes do not overflow.
        assert_eq!(
            Rtc::new(0).with_subsecond(u32::MAX).base_subsec_ns,
            u32::MAX % 1_000_000_000
        );
        let mut far = Rtc::new(i64::MAX).with_subsecond(999_999_999);
        cmos(&mut far, 0x00, u64::MAX);
        cmos(&mut far, 0x0a, u64::MAX);
    }

    #[test]
    fn guest_sets_time_and_ram() {
        let mut rtc = Rtc::new(LEAP_DAY);
        set(&mut rtc, 0x0b, B_SET | B_24H, 0);
        set(&mut rtc, 0x09, 0x25, 0);
        set(&mut rtc, 0x04, 0x08, 0);
        // Held while SET is on.
        assert_eq!(cmos(&mut rtc, 0x00, 10 * NS_PER_SEC), 0x30);
        set(&mut rtc, 0x0b, B_24H, 10 * NS_PER_SEC);
        assert_eq!(cmos(&mut rtc, 0x09, 12 * NS_PER_SEC), 0x25);
        assert_eq!(cmos(&mut rtc, 0x04, 12 * NS_PER_SEC), 0x08);
        assert_eq!(cmos(&mut rtc, 0x00, 12 * NS_PER_SEC), 0x32);
        // 2025-02-29 doesn't exist; 2025 has March 1 instead.
        assert_eq!(cmos(&mut rtc, 0x08, 12 * NS_PER_SEC), 0x03);
        // Out-of-range values are ignored.
        set(&mut rtc, 0x02, 0x99, 0);
        assert_eq!(cmos(&mut rtc, 0x02, 0), 0x45);
        // RAM, with the NMI-disable bit of the index ignored.
        set(&mut rtc, 0x80 | 0x40, 0xab, 0);
        assert_eq!(cmos(&mut rtc, 0x40, 0), 0xab);
        rtc.set_cmos_byte(0x7f, 7);
        assert_eq!(cmos(&mut rtc, 0x7f, 0), 7);
        rtc.set_cmos_byte(200, 7);
    }

    struct FakeClock(u64);
    impl Clock for FakeClock {
        fn now_ns(&self) -> u64 {
            self.0
        }
    }

    #[test]
    fn on_a_bus_and_hostile() {
        let rtc = Arc::new(Mutex::new(Rtc::new(LEAP_DAY)));
        let mut dev = Clocked::new(rtc.clone(), Arc::new(FakeClock(5 * NS_PER_SEC)));
        dev.write(0, &[0]);
        let mut b = [0u8; 2];
        dev.read(1, &mut b);
        assert_eq!(b, [0x35, 0]);
        dev.read(0, &mut b);
        assert_eq!(b[0], 0xff);
        let mut extreme = Rtc::new(i64::MAX);
        for r in 0..=255u8 {
            for v in [0u8, 0x59, 0x99, 0xff] {
                set(&mut extreme, r, v, u64::MAX);
                cmos(&mut extreme, r, u64::MAX);
            }
        }
        let mut early = Rtc::new(i64::MIN);
        for r in [0u8, 4, 9, 0x32] {
            set(&mut early, r, 0x99, 0);
            set(&mut early, r, 0x01, 0);
            cmos(&mut early, r, 0);
        }
        set(&mut extreme, 0x32, 0x99, u64::MAX);
        set(&mut extreme, 0x09, 0x99, u64::MAX);
        dev.write(7, &[1]);
        dev.write(1, &[]);
        dev.read(9, &mut []);
    }
}
