//! The 8254 programmable interval timer (ports 0x40–0x43) and the PC's port 0x61 bits
//! that gate channel 2 and read back its output.
//!
//! Counters are not stepped: each keeps the time its count was loaded, and reads compute
//! the count from `now_ns` at the 1.193182 MHz input clock. Channel 0's output drives
//! ISA IRQ 0: [`Pit::next_deadline_ns`] says when its next rising edge is due and
//! [`Pit::tick`] counts the edges that happened.
//!
//! Modes 0–5 are modelled (1 and 5 as gate-triggered starts); BCD counting is accepted
//! in the status but counts stay binary.

use super::{fill_byte, first_byte, ns_to_ticks, ticks_to_ns, TimedPio};

/// The 8254's input clock.
pub const PIT_HZ: u64 = 1_193_182;
/// First port (channel 0).
pub const PIT_BASE_PORT: u16 = 0x40;
/// The PC's system control port B.
pub const PORT_61: u16 = 0x61;

/// Control word bits 6–7: select counter (3: read-back command).
const CW_SELECT_SHIFT: u8 = 6;
/// Control word bits 4–5: access (0 latch, 1 LSB, 2 MSB, 3 LSB then MSB).
const CW_ACCESS_SHIFT: u8 = 4;
/// Control word bits 1–3: mode.
const CW_MODE_SHIFT: u8 = 1;
/// Control word bit 0: BCD counting.
const CW_BCD: u8 = 0x01;
/// Read-back bit 5, active low: latch the counts.
const RB_NO_COUNT: u8 = 0x20;
/// Read-back bit 4, active low: latch the status.
const RB_NO_STATUS: u8 = 0x10;
/// Status bit 7: OUT pin.
const STATUS_OUT: u8 = 0x80;
/// Status bit 6: null count (a count was written but not yet loaded).
const STATUS_NULL_COUNT: u8 = 0x40;
/// Port 0x61 bit 0: channel 2 gate.
const P61_GATE2: u8 = 0x01;
/// Port 0x61 bit 1: speaker data enable.
const P61_SPEAKER: u8 = 0x02;
/// Port 0x61 bit 4: DRAM refresh toggle (flips every 15.085 us).
const P61_REFRESH: u8 = 0x10;
/// Port 0x61 bit 5: channel 2 OUT.
const P61_OUT2: u8 = 0x20;
const REFRESH_PERIOD_NS: u64 = 15_085;

/// Plain state of one counter.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChannelState {
    pub mode: u8,
    /// 1 LSB only, 2 MSB only, 3 LSB then MSB.
    pub access: u8,
    pub bcd: bool,
    /// The count loaded, 1..=65536.
    pub reload: u32,
    /// A count was loaded since the last control word.
    pub loaded: bool,
    /// When counting (re)started at `reload`.
    pub start_ns: u64,
    pub gate: bool,
    /// Counting is stopped (gate low, or waiting for a gate trigger) after this many
    /// input clocks.
    pub paused_ticks: Option<u64>,
    pub write_msb_next: bool,
    pub write_lsb: u8,
    pub read_msb_next: bool,
    pub latch: Option<u16>,
    pub latch_msb_next: bool,
    pub status_latch: Option<u8>,
    pub null_count: bool,
    /// Output rising edges already reported by `tick`.
    pub edges_reported: u64,
}

impl Default for ChannelState {
    fn default() -> Self {
        ChannelState {
            mode: 0,
            access: 3,
            bcd: false,
            reload: 65536,
            loaded: false,
            start_ns: 0,
            gate: true,
            paused_ticks: None,
            write_msb_next: false,
            write_lsb: 0,
            read_msb_next: false,
            latch: None,
            latch_msb_next: false,
            status_latch: None,
            null_count: true,
            edges_reported: 0,
        }
    }
}

impl ChannelState {
    fn ticks(&self, now_ns: u64) -> u64 {
        if !self.loaded {
            return 0;
        }
        match self.paused_ticks {
            Some(t) => t,
            None => ns_to_ticks(now_ns.saturating_sub(self.start_ns), PIT_HZ),
        }
    }

    fn out(&self, now_ns: u64) -> bool {
        if !self.loaded {
            return self.mode != 0;
        }
        let t = self.ticks(now_ns);
        let r = u64::from(self.reload);
        let waiting = self.paused_ticks == Some(0);
        match self.mode {
            0 => t >= r,
            1 => waiting || t >= r,
            2 => r < 2 || t % r != r - 1,
            3 => t % r < r.div_ceil(2),
            4 => t != r,
            _ => waiting || t != r,
        }
    }

    fn count(&self, now_ns: u64) -> u16 {
        let r = u64::from(self.reload);
        if !self.loaded {
            return r as u16;
        }
        let t = self.ticks(now_ns);
        let c = match self.mode {
            2 => r - t % r,
            3 => {
                let phase = t % r;
                let high = r.div_ceil(2);
                let into_half = if phase < high { phase } else { phase - high };
                r.wrapping_sub(2 * into_half) & !1
            }
            _ => r.wrapping_sub(t),
        };
        c as u16
    }

    /// Rising edges of OUT in the first `t` input clocks since the count was loaded.
    fn edges(&self, t: u64) -> u64 {
        let r = u64::from(self.reload);
        match self.mode {
            2 | 3 => t / r,
            0 | 1 => u64::from(t >= r),
            _ => u64::from(t > r),
        }
    }

    /// The input clock of the edge after `edges_reported`, if one is coming.
    fn next_edge_tick(&self) -> Option<u64> {
        let r = u64::from(self.reload);
        let k = self.edges_reported;
        match self.mode {
            2 | 3 => Some(k.saturating_add(1).saturating_mul(r)),
            0 | 1 if k == 0 => Some(r),
            4 | 5 if k == 0 => Some(r + 1),
            _ => None,
        }
    }

    fn status(&self, now_ns: u64) -> u8 {
        let mut s = (self.access << CW_ACCESS_SHIFT) | (self.mode << CW_MODE_SHIFT);
        if self.bcd {
            s |= CW_BCD;
        }
        if self.out(now_ns) {
            s |= STATUS_OUT;
        }
        if self.null_count {
            s |= STATUS_NULL_COUNT;
        }
        s
    }

    fn latch_count(&mut self, now_ns: u64) {
        if self.latch.is_none() {
            self.latch = Some(self.count(now_ns));
            self.latch_msb_next = false;
        }
    }

    fn control(&mut self, access: u8, mode: u8, bcd: bool) {
        if bcd {
            tracing::debug!("8254: BCD counting not modelled, counting in binary");
        }
        *self = ChannelState {
            mode: if mode > 5 { mode - 4 } else { mode },
            access,
            bcd,
            reload: self.reload,
            gate: self.gate,
            ..ChannelState::default()
        };
    }

    fn load(&mut self, raw: u16, now_ns: u64) {
        self.reload = if raw == 0 { 65536 } else { u32::from(raw) };
        self.loaded = true;
        self.null_count = false;
        self.start_ns = now_ns;
        self.edges_reported = 0;
        // Modes 1 and 5 wait for a gate trigger; the others for the gate to be high.
        self.paused_ticks = (matches!(self.mode, 1 | 5) || !self.gate).then_some(0);
    }

    fn write(&mut self, v: u8, now_ns: u64) {
        match self.access {
            1 => self.load(u16::from(v), now_ns),
            2 => self.load(u16::from(v) << 8, now_ns),
            _ if !self.write_msb_next => {
                self.write_lsb = v;
                self.write_msb_next = true;
                if self.mode == 0 {
                    // Mode 0: writing the first byte stops the count, OUT goes low.
                    self.loaded = false;
                }
            }
            _ => {
                self.write_msb_next = false;
                self.load(u16::from(self.write_lsb) | (u16::from(v) << 8), now_ns);
            }
        }
    }

    fn read(&mut self, now_ns: u64) -> u8 {
        if let Some(s) = self.status_latch.take() {
            return s;
        }
        if let Some(l) = self.latch {
            let [lsb, msb] = l.to_le_bytes();
            return match self.access {
                1 => {
                    self.latch = None;
                    lsb
                }
                2 => {
                    self.latch = None;
                    msb
                }
                _ if !self.latch_msb_next => {
                    self.latch_msb_next = true;
                    lsb
                }
                _ => {
                    self.latch = None;
                    msb
                }
            };
        }
        let [lsb, msb] = self.count(now_ns).to_le_bytes();
        match self.access {
            1 => lsb,
            2 => msb,
            _ => {
                self.read_msb_next = !self.read_msb_next;
                if self.read_msb_next {
                    lsb
                } else {
                    msb
                }
            }
        }
    }

    fn set_gate(&mut self, gate: bool, now_ns: u64) {
        if gate == self.gate {
            return;
        }
        self.gate = gate;
        if !self.loaded {
            return;
        }
        if !gate {
            if matches!(self.mode, 0 | 2 | 3 | 4) && self.paused_ticks.is_none() {
                self.paused_ticks = Some(self.ticks(now_ns));
            }
            return;
        }
        match (self.mode, self.paused_ticks) {
            // A rising gate resumes modes 0 and 4 where they stopped…
            (0 | 4, Some(t)) => {
                self.start_ns = now_ns.saturating_sub(ticks_to_ns(t, PIT_HZ));
                self.paused_ticks = None;
            }
            (0 | 4, None) => {}
            // …and restarts the count in modes 1, 2, 3 and 5.
            _ => {
                self.start_ns = now_ns;
                self.paused_ticks = None;
                self.edges_reported = 0;
            }
        }
    }
}

/// The three-channel 8254 plus port 0x61's speaker bit.
#[derive(Clone, Debug)]
pub struct Pit {
    channels: [ChannelState; 3],
    speaker: bool,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    /// A PIT at power-up: no counts loaded, channel 2's gate low.
    pub fn new() -> Self {
        let mut channels: [ChannelState; 3] = Default::default();
        channels[2].gate = false;
        Pit {
            channels,
            speaker: false,
        }
    }

    pub fn channel(&self, n: usize) -> Option<&ChannelState> {
        self.channels.get(n)
    }

    /// A snapshot: the three counters and the speaker bit. Times are in `now_ns`.
    pub fn state(&self) -> ([ChannelState; 3], bool) {
        (self.channels.clone(), self.speaker)
    }

    /// A PIT restored from a snapshot; counts and modes no 8254 could hold are clamped.
    pub fn from_state(mut channels: [ChannelState; 3], speaker: bool) -> Self {
        for c in &mut channels {
            c.reload = c.reload.clamp(1, 65536);
            if c.mode > 5 {
                c.mode &= 3;
            }
            c.access &= 3;
        }
        Pit { channels, speaker }
    }

    /// When channel 0's output next rises (the next IRQ 0), if counting.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        let c = &self.channels[0];
        if !c.loaded || c.paused_ticks.is_some() {
            return None;
        }
        Some(
            c.start_ns
                .saturating_add(ticks_to_ns(c.next_edge_tick()?, PIT_HZ)),
        )
    }

    /// The number of channel-0 rising edges (IRQ 0 pulses) since the last call.
    ///
    /// ```
    /// use devices::irqchip::pit::Pit;
    ///
    /// let mut pit = Pit::new();
    /// pit.write(3, &[0x34], 0); // channel 0, LSB then MSB, mode 2
    /// pit.write(0, &[0xa9], 0);
    /// pit.write(0, &[0x04], 0); // 1193: about 1 kHz
    /// assert_eq!(pit.tick(10_000_000), 10); // 10 ms
    /// ```
    pub fn tick(&mut self, now_ns: u64) -> u32 {
        let c = &mut self.channels[0];
        if !c.loaded {
            return 0;
        }
        let total = c.edges(c.ticks(now_ns));
        let new = total.saturating_sub(c.edges_reported);
        c.edges_reported = c.edges_reported.max(total);
        u32::try_from(new).unwrap_or(u32::MAX)
    }

    fn write_control(&mut self, v: u8, now_ns: u64) {
        let select = v >> CW_SELECT_SHIFT;
        let Some(c) = self.channels.get_mut(usize::from(select)) else {
            // Read-back: bits 1–3 select the counters.
            for (i, c) in self.channels.iter_mut().enumerate() {
                if v & (2 << i) == 0 {
                    continue;
                }
                if v & RB_NO_COUNT == 0 {
                    c.latch_count(now_ns);
                }
                if v & RB_NO_STATUS == 0 && c.status_latch.is_none() {
                    c.status_latch = Some(c.status(now_ns));
                }
            }
            return;
        };
        let access = (v >> CW_ACCESS_SHIFT) & 3;
        if access == 0 {
            c.latch_count(now_ns);
        } else {
            c.control(access, (v >> CW_MODE_SHIFT) & 7, v & CW_BCD != 0);
        }
    }

    /// A read of port 0x40 + `offset`.
    pub fn read(&mut self, offset: u64, data: &mut [u8], now_ns: u64) {
        let v = match usize::try_from(offset)
            .ok()
            .and_then(|o| self.channels.get_mut(o))
        {
            Some(c) => c.read(now_ns),
            // The control port is write-only.
            None => 0xff,
        };
        fill_byte(data, v);
    }

    /// A write of port 0x40 + `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8], now_ns: u64) {
        let Some(v) = first_byte(data) else { return };
        match offset {
            0..=2 => self.channels[offset as usize].write(v, now_ns),
            3 => self.write_control(v, now_ns),
            _ => tracing::debug!(offset, v, "8254: write past the control port"),
        }
    }

    /// Port 0x61: gate 2, speaker, refresh toggle and channel 2's output.
    pub fn read_port61(&self, now_ns: u64) -> u8 {
        let c2 = &self.channels[2];
        let mut v = 0;
        if c2.gate {
            v |= P61_GATE2;
        }
        if self.speaker {
            v |= P61_SPEAKER;
        }
        if (now_ns / REFRESH_PERIOD_NS) & 1 != 0 {
            v |= P61_REFRESH;
        }
        if c2.out(now_ns) {
            v |= P61_OUT2;
        }
        v
    }

    /// A write of port 0x61: bit 0 gates channel 2, bit 1 enables the speaker.
    pub fn write_port61(&mut self, v: u8, now_ns: u64) {
        self.speaker = v & P61_SPEAKER != 0;
        self.channels[2].set_gate(v & P61_GATE2 != 0, now_ns);
    }
}

impl TimedPio for Pit {
    fn pio_read(&mut self, offset: u64, data: &mut [u8], now_ns: u64) {
        self.read(offset, data, now_ns);
    }

    fn pio_write(&mut self, offset: u64, data: &[u8], now_ns: u64) {
        self.write(offset, data, now_ns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(pit: &mut Pit, port: u16, v: u8, now: u64) {
        pit.write(u64::from(port - 0x40), &[v], now);
    }

    fn inb(pit: &mut Pit, port: u16, now: u64) -> u8 {
        let mut b = [0u8];
        pit.read(u64::from(port - 0x40), &mut b, now);
        b[0]
    }

    #[test]
    fn mode2_rate_generator_fires_at_rate() {
        let mut pit = Pit::new();
        // Linux's periodic setup: channel 0, LSB/MSB, mode 2, LATCH for HZ = 1000.
        out(&mut pit, 0x43, 0x34, 0);
        out(&mut pit, 0x40, (1193 & 0xff) as u8, 0);
        out(&mut pit, 0x40, (1193 >> 8) as u8, 0);
        assert_eq!(pit.next_deadline_ns(), Some(ticks_to_ns(1193, PIT_HZ)));
        let mut edges = 0;
        let mut now = 0;
        while now <= 1_000_000_000 {
            let due = pit.next_deadline_ns().is_some_and(|d| d <= now);
            let n = pit.tick(now);
            assert_eq!(n > 0, due, "at {now}");
            edges += n;
            now += 100_000;
        }
        assert_eq!(edges, (PIT_HZ / 1193) as u32);
        // Ticking exactly at the deadline fires exactly one edge.
        let d = pit.next_deadline_ns().unwrap();
        assert_eq!(pit.tick(d - 1), 0);
        assert_eq!(pit.tick(d), 1);
    }

    #[test]
    fn mode0_one_shot() {
        let mut pit = Pit::new();
        out(&mut pit, 0x43, 0x30, 1000);
        out(&mut pit, 0x40, 100, 1000);
        assert_eq!(pit.next_deadline_ns(), None); // waiting for the MSB
        out(&mut pit, 0x40, 0, 1000);
        let d = pit.next_deadline_ns().unwrap();
        assert_eq!(d, 1000 + 83_810);
        assert_eq!(pit.tick(d - 1), 0);
        assert_eq!(pit.tick(d), 1);
        assert_eq!(pit.tick(d + 10_000_000), 0);
        assert_eq!(pit.next_deadline_ns(), None);
        // Linux's one-shot clockevent (mode 4) fires one clock later.
        out(&mut pit, 0x43, 0x38, 0);
        out(&mut pit, 0x40, 100, 0);
        out(&mut pit, 0x40, 0, 0);
        assert_eq!(pit.next_deadline_ns(), Some(ticks_to_ns(101, PIT_HZ)));
    }

    #[test]
    fn counts_latch_and_readback() {
        let mut pit = Pit::new();
        let tick = |n: u64| ticks_to_ns(n, PIT_HZ);
        out(&mut pit, 0x43, 0x34, 0);
        out(&mut pit, 0x40, 0x00, 0);
        out(&mut pit, 0x40, 0x10, 0); // 4096
                                      // Live read, LSB then MSB.
        let now = tick(0x100);
        assert_eq!(
            (inb(&mut pit, 0x40, now), inb(&mut pit, 0x40, now)),
            (0x00, 0x0f)
        );
        // Counter latch holds the value while time passes.
        out(&mut pit, 0x43, 0x00, tick(0x200));
        assert_eq!(inb(&mut pit, 0x40, tick(0x800)), 0x00);
        assert_eq!(inb(&mut pit, 0x40, tick(0x900)), 0x0e);
        // Read-back of count and status for channel 0 (0xc2: both latched).
        out(&mut pit, 0x43, 0xc2, tick(0x300));
        // Status first (OUT high, LSB/MSB, mode 2), then the count 0x1000 - 0x300.
        assert_eq!(inb(&mut pit, 0x40, 0), 0xb4);
        assert_eq!(inb(&mut pit, 0x40, 0), 0x00);
        assert_eq!(inb(&mut pit, 0x40, 0), 0x0d);
    }

    #[test]
    fn readback_status_bits() {
        let mut pit = Pit::new();
        out(&mut pit, 0x43, 0xb0, 0); // ch2, LSB/MSB, mode 0
        out(&mut pit, 0x43, 0xe8, 0); // read-back status only, channel 2
                                      // OUT low in mode 0, null count, access 3, mode 0.
        assert_eq!(inb(&mut pit, 0x42, 0), 0x70);
        out(&mut pit, 0x42, 0x10, 0);
        out(&mut pit, 0x42, 0x00, 0);
        out(&mut pit, 0x43, 0xd8, 0); // latch count only, channel 2
        assert_eq!(inb(&mut pit, 0x42, 5_000_000), 0x10);
        assert_eq!(inb(&mut pit, 0x42, 5_000_000), 0x00);
    }

    #[test]
    fn linux_pit_calibration_channel2() {
        let mut pit = Pit::new();
        let tick = |n: u64| ticks_to_ns(n, PIT_HZ);
        // quick_pit_calibrate: gate high, speaker off; ch2 mode 0, count 0xffff.
        let p61 = pit.read_port61(0);
        pit.write_port61((p61 & !0x02) | 0x01, 0);
        out(&mut pit, 0x43, 0xb0, 0);
        out(&mut pit, 0x42, 0xff, 0);
        out(&mut pit, 0x42, 0xff, 0);
        // pit_verify_msb: read LSB (discarded), then MSB; it falls by one every 256 clocks.
        for k in 0..200u64 {
            let now = tick(256 * k + 10);
            let _lsb = inb(&mut pit, 0x42, now);
            assert_eq!(u64::from(inb(&mut pit, 0x42, now)), 0xff - k, "k = {k}");
        }
        // pit_calibrate_tsc: OUT (port 0x61 bit 5) rises at terminal count.
        out(&mut pit, 0x43, 0xb0, 0);
        out(&mut pit, 0x42, 0x9b, 0);
        out(&mut pit, 0x42, 0x2e, 0); // 11931 (10 ms)
        assert_eq!(pit.read_port61(tick(11930)) & 0x20, 0);
        assert_eq!(pit.read_port61(tick(11931)) & 0x20, 0x20);
        // Gate low freezes the count; channel 2 never raises IRQ 0.
        out(&mut pit, 0x43, 0xb0, 0);
        out(&mut pit, 0x42, 0x00, 0);
        out(&mut pit, 0x42, 0x10, 0);
        pit.write_port61(0, tick(0x100));
        assert_eq!(pit.read_port61(0) & 1, 0);
        inb(&mut pit, 0x42, tick(0x500));
        assert_eq!(inb(&mut pit, 0x42, tick(0x500)), 0x0f);
        pit.write_port61(1, tick(0x500));
        inb(&mut pit, 0x42, tick(0x600));
        assert_eq!(inb(&mut pit, 0x42, tick(0x600)), 0x0e);
        assert_eq!(pit.tick(u64::MAX), 0);
    }

    #[test]
    fn mode3_square_wave_and_lsb_only() {
        let mut pit = Pit::new();
        out(&mut pit, 0x43, 0x16, 0); // ch0, LSB only, mode 3
        out(&mut pit, 0x40, 100, 0);
        let tick = |n: u64| ticks_to_ns(n, PIT_HZ);
        assert_eq!(inb(&mut pit, 0x40, tick(10)), 80);
        assert_eq!(inb(&mut pit, 0x40, tick(60)), 80);
        assert_eq!(pit.tick(tick(100)), 1);
        assert_eq!(pit.tick(tick(1000)), 9);
    }

    #[test]
    fn state_round_trip() {
        let mut pit = Pit::new();
        out(&mut pit, 0x43, 0x34, 0);
        out(&mut pit, 0x40, 0x00, 0);
        out(&mut pit, 0x40, 0x10, 0);
        pit.write_port61(1, 0);
        let (channels, speaker) = pit.state();
        let mut r = Pit::from_state(channels.clone(), speaker);
        assert_eq!(r.next_deadline_ns(), pit.next_deadline_ns());
        assert_eq!(inb(&mut r, 0x40, 1_000_000), inb(&mut pit, 0x40, 1_000_000));
        let mut bad = channels;
        bad[0].reload = 0;
        bad[0].mode = 7;
        bad[0].loaded = true;
        let mut r = Pit::from_state(bad, true);
        r.tick(u64::MAX);
        r.next_deadline_ns();
        inb(&mut r, 0x40, u64::MAX);
    }

    #[test]
    fn hostile_accesses() {
        let mut pit = Pit::new();
        for off in [0u64, 1, 2, 3, 4, 0x21, u64::MAX] {
            for v in [0u8, 0x01, 0x30, 0x3e, 0xc0, 0xfe, 0xff] {
                pit.write(off, &[v], u64::MAX);
                pit.write(off, &[], 0);
                let mut b = [0u8; 3];
                pit.read(off, &mut b, u64::MAX);
                pit.read(off, &mut [], 0);
            }
        }
        out(&mut pit, 0x43, 0x34, u64::MAX);
        out(&mut pit, 0x40, 1, u64::MAX);
        out(&mut pit, 0x40, 0, u64::MAX);
        pit.next_deadline_ns();
        pit.tick(0);
        pit.tick(u64::MAX);
        pit.write_port61(0xff, u64::MAX);
        pit.read_port61(u64::MAX);
    }
}
