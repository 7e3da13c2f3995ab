//! The local APIC of one vCPU (Intel SDM vol. 3A, chapter 11 "Advanced Programmable
//! Interrupt Controller").
//!
//! Register-level model: xAPIC MMIO (32-bit registers at a 16-byte stride in a 4 KiB
//! page) and x2APIC MSRs 0x800–0x8ff, plus IA32_APIC_BASE and IA32_TSC_DEADLINE. It knows
//! nothing of other CPUs: an ICR write returns an [`Ipi`] for the router to fan out, and
//! the router hands interrupts in with [`Lapic::accept_interrupt`].
//!
//! Level-triggered EOIs: an EOI for a vector whose TMR bit is set is recorded, and the
//! owner drains them with [`Lapic::take_eoi_vectors`] after each register write to tell
//! the IOAPIC.
//!
//! Time: the timer counts at `timer_hz` ([`DEFAULT_TIMER_HZ`], 1 GHz: one count per
//! nanosecond before the divider, the bus frequency KVM reports too); the guest's TSC is
//! taken to be `now_ns * tsc_hz / 1e9`, starting at 0 with the VM.

use super::{ns_to_ticks, ticks_to_ns, DeliveryMode, Destination, Ipi, Trigger};

/// IA32_APIC_BASE.
pub const MSR_APIC_BASE: u32 = 0x1b;
/// IA32_TSC_DEADLINE.
pub const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// First x2APIC register MSR.
pub const MSR_X2APIC_FIRST: u32 = 0x800;
/// Last x2APIC register MSR.
pub const MSR_X2APIC_LAST: u32 = 0x8ff;
/// Where the xAPIC page sits after reset.
pub const DEFAULT_APIC_BASE: u64 = 0xfee0_0000;
/// The LAPIC timer's input clock (before the divider) the VMM should state in CPUID
/// leaf 0x15/0x16: 1 GHz.
pub const DEFAULT_TIMER_HZ: u64 = 1_000_000_000;
/// Shortest periodic-timer period; a guest asking for less gets this (avoids a vCPU
/// thread spinning on nanosecond timers).
pub const MIN_PERIODIC_NS: u64 = 50_000;

/// IA32_APIC_BASE bit 8: this is the bootstrap processor.
const BASE_BSP: u64 = 1 << 8;
/// IA32_APIC_BASE bit 10: x2APIC mode (EXTD).
const BASE_EXTD: u64 = 1 << 10;
/// IA32_APIC_BASE bit 11: APIC global enable.
const BASE_EN: u64 = 1 << 11;
/// IA32_APIC_BASE bits 12–51: the xAPIC page's physical address.
const BASE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

// Register offsets in the xAPIC page (x2APIC MSR = 0x800 + offset / 16).
const REG_ID: u32 = 0x20;
const REG_VERSION: u32 = 0x30;
const REG_TPR: u32 = 0x80;
const REG_APR: u32 = 0x90;
const REG_PPR: u32 = 0xa0;
const REG_EOI: u32 = 0xb0;
const REG_RRD: u32 = 0xc0;
const REG_LDR: u32 = 0xd0;
const REG_DFR: u32 = 0xe0;
const REG_SVR: u32 = 0xf0;
const REG_ISR: u32 = 0x100;
const REG_TMR: u32 = 0x180;
const REG_IRR: u32 = 0x200;
const REG_ESR: u32 = 0x280;
const REG_LVT_CMCI: u32 = 0x2f0;
const REG_ICR_LOW: u32 = 0x300;
const REG_ICR_HIGH: u32 = 0x310;
const REG_LVT_TIMER: u32 = 0x320;
const REG_LVT_ERROR: u32 = 0x370;
const REG_TIMER_INITIAL: u32 = 0x380;
const REG_TIMER_CURRENT: u32 = 0x390;
const REG_TIMER_DIVIDE: u32 = 0x3e0;
const REG_SELF_IPI: u32 = 0x3f0;

/// Version register: version 0x14 (integrated APIC), 6 LVT entries (max LVT index 5).
const APIC_VERSION: u32 = 0x0005_0014;

/// LVT bit 16: masked.
const LVT_MASKED: u32 = 1 << 16;
/// LVT bits 8–10: delivery mode.
const LVT_DELIVERY_MODE: u32 = 0x700;
/// LVT timer bits 17–18: timer mode.
const LVT_TIMER_MODE: u32 = 0x3 << 17;
const TIMER_PERIODIC: u32 = 1 << 17;
const TIMER_TSC_DEADLINE: u32 = 2 << 17;
/// Writable LVT timer bits: vector, mask, timer mode.
const LVT_TIMER_WRITABLE: u32 = 0xff | LVT_MASKED | LVT_TIMER_MODE;
/// Writable LINT0/LINT1 bits: vector, delivery mode, polarity (13), trigger (15), mask.
const LVT_LINT_WRITABLE: u32 = 0xff | LVT_DELIVERY_MODE | (1 << 13) | (1 << 15) | LVT_MASKED;
/// Writable thermal/perfmon/CMCI bits: vector, delivery mode, mask.
const LVT_OTHER_WRITABLE: u32 = 0xff | LVT_DELIVERY_MODE | LVT_MASKED;
/// Writable LVT error bits: vector, mask.
const LVT_ERROR_WRITABLE: u32 = 0xff | LVT_MASKED;
/// LVT delivery mode ExtINT (0b111).
const LVT_DM_EXTINT: u32 = 0x700;
/// LVT delivery mode NMI (0b100).
const LVT_DM_NMI: u32 = 0x400;

/// SVR bit 8: APIC software enable.
const SVR_ENABLE: u32 = 1 << 8;
/// Writable SVR bits: spurious vector and the enable bit.
const SVR_WRITABLE: u32 = 0x1ff;

/// ESR bit 5: an IPI with an illegal vector was sent.
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
/// ESR bit 6: an interrupt with an illegal vector was received.
pub const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;
/// ESR bit 7: an access to an unimplemented register.
pub const ESR_ILLEGAL_REGISTER: u32 = 1 << 7;

/// ICR bit 11: logical destination mode.
const ICR_LOGICAL: u32 = 1 << 11;
/// ICR bit 14: level assert.
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
/// ICR bit 15: level-triggered.
const ICR_TRIGGER_LEVEL: u32 = 1 << 15;
/// Writable ICR low bits: vector, mode, dest mode, level, trigger, shorthand.
const ICR_LOW_WRITABLE: u32 = 0x000c_cfff;

/// Timer divide-configuration bits 0, 1 and 3.
const DIVIDE_WRITABLE: u32 = 0xb;

/// The LVT entries, in register order.
const LVT_TIMER: usize = 0;
const LVT_THERMAL: usize = 1;
const LVT_PERFMON: usize = 2;
const LVT_LINT0: usize = 3;
const LVT_LINT1: usize = 4;
const LVT_ERROR: usize = 5;
const LVT_CMCI: usize = 6;

/// Why an APIC MSR access must raise #GP.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApicError {
    #[error("MSR {0:#x} is not an APIC MSR")]
    NotApicMsr(u32),
    #[error("x2APIC MSR {0:#x} accessed while the APIC is not in x2APIC mode")]
    NotX2Apic(u32),
    #[error("x2APIC MSR {0:#x} does not exist or is read-only")]
    NotWritable(u32),
    #[error("reserved bits set writing {value:#x} to MSR {msr:#x}")]
    ReservedBits { msr: u32, value: u64 },
    #[error("IA32_APIC_BASE {0:#x} is an invalid mode transition")]
    InvalidTransition(u64),
    #[error("no vCPU {0}")]
    NoSuchCpu(u32),
}

/// Operating mode, from IA32_APIC_BASE's EN and EXTD bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApicMode {
    Disabled,
    XApic,
    X2Apic,
}

/// 256 vector bits, as the ISR/TMR/IRR hold them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct VectorBits([u32; 8]);

impl VectorBits {
    fn set(&mut self, v: u8) {
        self.0[usize::from(v >> 5)] |= 1 << (v & 31);
    }
    fn clear(&mut self, v: u8) {
        self.0[usize::from(v >> 5)] &= !(1 << (v & 31));
    }
    fn test(&self, v: u8) -> bool {
        self.0[usize::from(v >> 5)] & (1 << (v & 31)) != 0
    }
    fn highest(&self) -> Option<u8> {
        (0..8u8).rev().find_map(|i| {
            let w = self.0[usize::from(i)];
            // 31 - leading_zeros < 32, and i * 32 + 31 <= 255.
            (w != 0).then(|| i * 32 + (31 - w.leading_zeros() as u8))
        })
    }
    fn word(&self, i: u32) -> u32 {
        self.0.get(i as usize).copied().unwrap_or(0)
    }
}

/// The plain state of a [`Lapic`], for snapshots ([`Lapic::state`], [`Lapic::from_state`]).
/// Times are in the VM's `now_ns` clock.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LapicState {
    pub id: u32,
    pub bsp: bool,
    pub timer_hz: u64,
    pub tsc_hz: u64,
    pub apic_base: u64,
    pub tpr: u32,
    pub ldr: u32,
    pub dfr: u32,
    pub svr: u32,
    pub isr: [u32; 8],
    pub tmr: [u32; 8],
    pub irr: [u32; 8],
    pub esr: u32,
    pub esr_pending: u32,
    pub icr_low: u32,
    pub icr_high: u32,
    /// Timer, thermal, perfmon, LINT0, LINT1, error, CMCI.
    pub lvt: [u32; 7],
    pub initial_count: u32,
    pub divide_config: u32,
    pub timer_start_ns: u64,
    pub timer_start_count: u32,
    pub timer_deadline_ns: Option<u64>,
    pub tsc_deadline: u64,
    pub nmi_pending: bool,
    pub eoi_vectors: Vec<u8>,
}

impl LapicState {
    /// The timer's current-count register at VM time `now_ns` (what another
    /// accelerator's LAPIC takes as the count left).
    pub fn timer_count_at(&self, now_ns: u64) -> u32 {
        Lapic::from_state(self).current_count(now_ns)
    }

    /// Arms the timer its registers describe at VM time `now_ns` with `count` left of
    /// the current period (another accelerator's current count); a one-shot timer whose
    /// count ran out stays disarmed. TSC-deadline mode is left as it is.
    pub fn arm_timer_at(&mut self, now_ns: u64, count: u32) {
        let l = Lapic::from_state(self);
        let mode = self.lvt[LVT_TIMER] & LVT_TIMER_MODE;
        if mode == TIMER_TSC_DEADLINE {
            return;
        }
        let count = if count == 0 && mode == TIMER_PERIODIC {
            self.initial_count
        } else {
            count.min(self.initial_count)
        };
        self.timer_start_ns = now_ns;
        self.timer_start_count = count;
        self.timer_deadline_ns = (count != 0).then(|| {
            let mut ns = ticks_to_ns(u64::from(count).saturating_mul(l.divisor()), l.timer_hz);
            if mode == TIMER_PERIODIC {
                ns = ns.max(MIN_PERIODIC_NS);
            }
            now_ns.saturating_add(ns)
        });
    }
}

/// One vCPU's local APIC.
///
/// ```
/// use devices::irqchip::lapic::Lapic;
///
/// let mut lapic = Lapic::new(0, true);
/// lapic.mmio_write(0xf0, &0x1ffu32.to_le_bytes(), 0); // SVR: software enable
/// lapic.mmio_write(0x320, &0x40u32.to_le_bytes(), 0); // LVT timer: one-shot, vector 0x40
/// lapic.mmio_write(0x3e0, &0xbu32.to_le_bytes(), 0); // divide by 1
/// lapic.mmio_write(0x380, &1000u32.to_le_bytes(), 0); // 1000 counts at 1 GHz
/// assert_eq!(lapic.next_deadline_ns(), Some(1000));
/// lapic.tick(1000);
/// assert_eq!(lapic.acknowledge(), Some(0x40));
/// ```
#[derive(Debug)]
pub struct Lapic {
    id: u32,
    bsp: bool,
    timer_hz: u64,
    tsc_hz: u64,
    apic_base: u64,
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: VectorBits,
    tmr: VectorBits,
    irr: VectorBits,
    esr: u32,
    esr_pending: u32,
    icr_low: u32,
    icr_high: u32,
    lvt: [u32; 7],
    initial_count: u32,
    divide_config: u32,
    /// When the current count was `timer_start_count` (the initial count, unless the
    /// divider changed mid-count).
    timer_start_ns: u64,
    timer_start_count: u32,
    /// When the timer next fires.
    timer_deadline_ns: Option<u64>,
    tsc_deadline: u64,
    nmi_pending: bool,
    eoi_vectors: Vec<u8>,
}

impl Lapic {
    /// A LAPIC at reset with the default timer clock and a 1 GHz TSC.
    pub fn new(apic_id: u32, bsp: bool) -> Self {
        Self::with_clocks(apic_id, bsp, DEFAULT_TIMER_HZ, DEFAULT_TIMER_HZ)
    }

    /// A LAPIC at reset whose timer counts at `timer_hz` and whose guest TSC runs at
    /// `tsc_hz` (both clamped to at least 1 Hz).
    pub fn with_clocks(apic_id: u32, bsp: bool, timer_hz: u64, tsc_hz: u64) -> Self {
        let mut l = Lapic {
            id: apic_id,
            bsp,
            timer_hz: timer_hz.max(1),
            tsc_hz: tsc_hz.max(1),
            apic_base: DEFAULT_APIC_BASE | BASE_EN | if bsp { BASE_BSP } else { 0 },
            tpr: 0,
            ldr: 0,
            dfr: 0,
            svr: 0,
            isr: VectorBits::default(),
            tmr: VectorBits::default(),
            irr: VectorBits::default(),
            esr: 0,
            esr_pending: 0,
            icr_low: 0,
            icr_high: 0,
            lvt: [0; 7],
            initial_count: 0,
            divide_config: 0,
            timer_start_ns: 0,
            timer_start_count: 0,
            timer_deadline_ns: None,
            tsc_deadline: 0,
            nmi_pending: false,
            eoi_vectors: Vec::new(),
        };
        l.reset_registers();
        l
    }

    /// A snapshot of the registers and timer.
    pub fn state(&self) -> LapicState {
        LapicState {
            id: self.id,
            bsp: self.bsp,
            timer_hz: self.timer_hz,
            tsc_hz: self.tsc_hz,
            apic_base: self.apic_base,
            tpr: self.tpr,
            ldr: self.ldr,
            dfr: self.dfr,
            svr: self.svr,
            isr: self.isr.0,
            tmr: self.tmr.0,
            irr: self.irr.0,
            esr: self.esr,
            esr_pending: self.esr_pending,
            icr_low: self.icr_low,
            icr_high: self.icr_high,
            lvt: self.lvt,
            initial_count: self.initial_count,
            divide_config: self.divide_config,
            timer_start_ns: self.timer_start_ns,
            timer_start_count: self.timer_start_count,
            timer_deadline_ns: self.timer_deadline_ns,
            tsc_deadline: self.tsc_deadline,
            nmi_pending: self.nmi_pending,
            eoi_vectors: self.eoi_vectors.clone(),
        }
    }

    /// A LAPIC restored from a snapshot. Values no register could hold are masked.
    pub fn from_state(s: &LapicState) -> Self {
        let mut eoi_vectors = s.eoi_vectors.clone();
        eoi_vectors.truncate(256);
        Lapic {
            id: s.id,
            bsp: s.bsp,
            timer_hz: s.timer_hz.max(1),
            tsc_hz: s.tsc_hz.max(1),
            apic_base: s.apic_base,
            tpr: s.tpr & 0xff,
            ldr: s.ldr,
            dfr: s.dfr,
            svr: s.svr & SVR_WRITABLE,
            isr: VectorBits(s.isr),
            tmr: VectorBits(s.tmr),
            irr: VectorBits(s.irr),
            esr: s.esr,
            esr_pending: s.esr_pending,
            icr_low: s.icr_low,
            icr_high: s.icr_high,
            lvt: s.lvt,
            initial_count: s.initial_count,
            divide_config: s.divide_config & DIVIDE_WRITABLE,
            timer_start_ns: s.timer_start_ns,
            timer_start_count: s.timer_start_count.min(s.initial_count),
            timer_deadline_ns: s.timer_deadline_ns,
            tsc_deadline: s.tsc_deadline,
            nmi_pending: s.nmi_pending,
            eoi_vectors,
        }
    }

    /// Power-up / INIT register values. The BSP's LINT0 is left as unmasked ExtINT
    /// (virtual-wire mode, as a PC BIOS leaves it) so the 8259's output reaches it.
    fn reset_registers(&mut self) {
        self.tpr = 0;
        self.ldr = 0;
        self.dfr = 0xffff_ffff;
        self.svr = 0xff;
        self.isr = VectorBits::default();
        self.tmr = VectorBits::default();
        self.irr = VectorBits::default();
        self.esr = 0;
        self.esr_pending = 0;
        self.icr_low = 0;
        self.icr_high = 0;
        self.lvt = [LVT_MASKED; 7];
        if self.bsp {
            self.lvt[LVT_LINT0] = LVT_DM_EXTINT;
        }
        self.initial_count = 0;
        self.divide_config = 0;
        self.timer_deadline_ns = None;
        self.tsc_deadline = 0;
        self.nmi_pending = false;
        self.eoi_vectors.clear();
        if self.mode() == ApicMode::X2Apic {
            self.ldr = self.x2apic_ldr();
        }
    }

    /// INIT: registers back to their reset values; the ID and IA32_APIC_BASE stay.
    pub fn init(&mut self) {
        self.reset_registers();
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn timer_hz(&self) -> u64 {
        self.timer_hz
    }

    pub fn tsc_hz(&self) -> u64 {
        self.tsc_hz
    }

    pub fn is_bsp(&self) -> bool {
        self.bsp
    }

    pub fn mode(&self) -> ApicMode {
        match (
            self.apic_base & BASE_EN != 0,
            self.apic_base & BASE_EXTD != 0,
        ) {
            (false, _) => ApicMode::Disabled,
            (true, false) => ApicMode::XApic,
            (true, true) => ApicMode::X2Apic,
        }
    }

    /// The physical address of the xAPIC page.
    pub fn base_address(&self) -> u64 {
        self.apic_base & BASE_ADDR_MASK
    }

    fn hw_enabled(&self) -> bool {
        self.apic_base & BASE_EN != 0
    }

    fn sw_enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    fn x2apic_ldr(&self) -> u32 {
        ((self.id >> 4) << 16) | (1 << (self.id & 0xf))
    }

    /// Whether `msr` belongs to the APIC (IA32_APIC_BASE, IA32_TSC_DEADLINE or x2APIC).
    pub fn handles_msr(msr: u32) -> bool {
        matches!(
            msr,
            MSR_APIC_BASE | MSR_TSC_DEADLINE | MSR_X2APIC_FIRST..=MSR_X2APIC_LAST
        )
    }

    // ---- Priority and delivery to the CPU ----

    /// The task-priority register.
    pub fn tpr(&self) -> u32 {
        self.tpr
    }

    /// Set the task-priority register (bits 7–0), as MOV to CR8 does with bits 7–4.
    pub fn set_tpr(&mut self, tpr: u32) {
        self.tpr = tpr & 0xff;
    }

    /// Processor priority: the TPR, or the class of the highest in-service vector.
    pub fn ppr(&self) -> u32 {
        let isrv = self.isr.highest().map_or(0, u32::from);
        if (self.tpr & 0xf0) >= (isrv & 0xf0) {
            self.tpr & 0xff
        } else {
            isrv & 0xf0
        }
    }

    /// Take an interrupt from the router: set its IRR bit, and its TMR bit if
    /// level-triggered. Vectors below 16 are illegal (ESR, dropped); a hardware- or
    /// software-disabled APIC drops fixed interrupts. True if it was accepted.
    pub fn accept_interrupt(&mut self, vector: u8, level_triggered: bool) -> bool {
        if !self.hw_enabled() {
            return false;
        }
        if vector < 16 {
            self.raise_error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return false;
        }
        if !self.sw_enabled() {
            tracing::debug!(vector, "LAPIC software-disabled: interrupt dropped");
            return false;
        }
        self.irr.set(vector);
        if level_triggered {
            self.tmr.set(vector);
        } else {
            self.tmr.clear(vector);
        }
        true
    }

    /// The vector the CPU would take now: the highest IRR vector whose priority class
    /// beats the PPR.
    pub fn pending_vector(&self) -> Option<u8> {
        if !self.hw_enabled() {
            return None;
        }
        let v = self.irr.highest()?;
        (u32::from(v & 0xf0) > (self.ppr() & 0xf0)).then_some(v)
    }

    /// INTA: move the pending vector from IRR to ISR and return it.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let v = self.pending_vector()?;
        self.irr.clear(v);
        self.isr.set(v);
        Some(v)
    }

    fn eoi(&mut self) {
        let Some(v) = self.isr.highest() else { return };
        self.isr.clear(v);
        if self.tmr.test(v) && !self.eoi_vectors.contains(&v) {
            self.eoi_vectors.push(v);
        }
    }

    /// Level-triggered vectors EOIed since the last call, for the IOAPIC.
    pub fn take_eoi_vectors(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.eoi_vectors)
    }

    /// Deliver an NMI to this CPU (NMIs are taken even by a disabled APIC's CPU).
    pub fn deliver_nmi(&mut self) {
        self.nmi_pending = true;
    }

    pub fn nmi_pending(&self) -> bool {
        self.nmi_pending
    }

    /// Take the pending NMI, if any.
    pub fn take_nmi(&mut self) -> bool {
        std::mem::take(&mut self.nmi_pending)
    }

    /// Whether the 8259's INT output reaches this CPU: the APIC is hardware-disabled (the
    /// pin goes straight to the core) or LINT0 is unmasked ExtINT.
    pub fn accepts_pic_interrupt(&self) -> bool {
        let lint0 = self.lvt[LVT_LINT0];
        !self.hw_enabled()
            || (lint0 & LVT_MASKED == 0 && lint0 & LVT_DELIVERY_MODE == LVT_DM_EXTINT)
    }

    /// An edge on LINT1 (the platform's NMI line): delivered as its LVT says, or
    /// straight to the CPU as an NMI when the APIC is hardware-disabled.
    pub fn trigger_lint1(&mut self) {
        let lvt = self.lvt[LVT_LINT1];
        if !self.hw_enabled() {
            self.nmi_pending = true;
            return;
        }
        if lvt & LVT_MASKED != 0 {
            return;
        }
        match lvt & LVT_DELIVERY_MODE {
            LVT_DM_NMI => self.nmi_pending = true,
            0 => {
                self.accept_interrupt((lvt & 0xff) as u8, lvt & (1 << 15) != 0);
            }
            _ => tracing::debug!(lvt, "LINT1 delivery mode not modelled"),
        }
    }

    fn raise_error(&mut self, bits: u32) {
        self.esr_pending |= bits;
        let lvt = self.lvt[LVT_ERROR];
        if lvt & LVT_MASKED == 0 && self.sw_enabled() {
            let v = (lvt & 0xff) as u8;
            if v >= 16 {
                self.irr.set(v);
                self.tmr.clear(v);
            }
        }
    }

    // ---- Timer (LVT timer mode 0b00 one-shot, 0b01 periodic, 0b10 TSC deadline) ----

    fn timer_mode(&self) -> u32 {
        self.lvt[LVT_TIMER] & LVT_TIMER_MODE
    }

    /// The divider the divide-configuration register selects: 2, 4, …, 128, or 1.
    fn divisor(&self) -> u64 {
        let v = (self.divide_config & 3) | ((self.divide_config >> 1) & 4);
        if v == 7 {
            1
        } else {
            2 << v
        }
    }

    fn period_ns(&self) -> u64 {
        let ticks = u64::from(self.initial_count).saturating_mul(self.divisor());
        ticks_to_ns(ticks, self.timer_hz)
    }

    fn arm_count_timer(&mut self, now_ns: u64) {
        self.timer_start_ns = now_ns;
        self.timer_start_count = self.initial_count;
        self.timer_deadline_ns = if self.initial_count == 0 {
            None
        } else {
            let mut p = self.period_ns();
            if self.timer_mode() == TIMER_PERIODIC {
                p = p.max(MIN_PERIODIC_NS);
            }
            Some(now_ns.saturating_add(p))
        };
    }

    fn current_count(&self, now_ns: u64) -> u32 {
        let mode = self.timer_mode();
        if self.initial_count == 0 || mode == TIMER_TSC_DEADLINE {
            return 0;
        }
        let elapsed =
            ns_to_ticks(now_ns.saturating_sub(self.timer_start_ns), self.timer_hz) / self.divisor();
        let initial = u64::from(self.initial_count);
        let start = u64::from(self.timer_start_count);
        let count = if elapsed < start {
            if mode != TIMER_PERIODIC && self.timer_deadline_ns.is_none() {
                0
            } else {
                start - elapsed
            }
        } else if mode == TIMER_PERIODIC {
            initial - (elapsed - start) % initial
        } else {
            0
        };
        count as u32
    }

    /// When this LAPIC's timer next needs [`Lapic::tick`].
    pub fn next_deadline_ns(&self) -> Option<u64> {
        if !self.hw_enabled() {
            return None;
        }
        self.timer_deadline_ns
    }

    /// Fire the timer if it is due: its LVT vector goes into IRR (unless masked), a
    /// periodic timer re-arms (missed periods collapse into one interrupt). True if it
    /// fired.
    pub fn tick(&mut self, now_ns: u64) -> bool {
        let Some(deadline) = self.timer_deadline_ns else {
            return false;
        };
        if now_ns < deadline || !self.hw_enabled() {
            return false;
        }
        match self.timer_mode() {
            TIMER_PERIODIC => {
                let p = self.period_ns().max(MIN_PERIODIC_NS);
                let missed = (now_ns - deadline) / p + 1;
                self.timer_deadline_ns = Some(deadline.saturating_add(missed.saturating_mul(p)));
            }
            TIMER_TSC_DEADLINE => {
                self.timer_deadline_ns = None;
                self.tsc_deadline = 0;
            }
            _ => self.timer_deadline_ns = None,
        }
        let lvt = self.lvt[LVT_TIMER];
        if lvt & LVT_MASKED == 0 {
            self.accept_interrupt((lvt & 0xff) as u8, false);
        }
        true
    }

    /// A new divider applies from now on: the current count carries on at the new rate.
    fn write_divide(&mut self, value: u32, now_ns: u64) {
        let running = self.timer_deadline_ns.is_some() && self.timer_mode() != TIMER_TSC_DEADLINE;
        let count = self.current_count(now_ns);
        self.divide_config = value;
        if !running {
            return;
        }
        let remaining = u64::from(count).saturating_mul(self.divisor());
        self.timer_start_ns = now_ns;
        self.timer_start_count = count;
        self.timer_deadline_ns = Some(now_ns.saturating_add(ticks_to_ns(remaining, self.timer_hz)));
    }

    fn write_tsc_deadline(&mut self, value: u64) {
        if self.timer_mode() != TIMER_TSC_DEADLINE {
            return;
        }
        self.tsc_deadline = value;
        self.timer_deadline_ns = (value != 0).then(|| ticks_to_ns(value, self.tsc_hz));
    }

    // ---- IPIs ----

    fn send_ipi(&mut self, low: u32, dest: u32) -> Option<Ipi> {
        let vector = (low & 0xff) as u8;
        let Some(mode) = DeliveryMode::from_bits(low >> 8) else {
            tracing::debug!(low, "ICR: reserved delivery mode");
            return None;
        };
        if matches!(mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority) && vector < 16 {
            self.raise_error(ESR_SEND_ILLEGAL_VECTOR);
            return None;
        }
        let dest = match (low >> 18) & 3 {
            0 if low & ICR_LOGICAL != 0 => Destination::Logical(dest),
            0 => Destination::Physical(dest),
            1 => Destination::SelfOnly,
            2 => Destination::AllIncludingSelf,
            _ => Destination::AllExcludingSelf,
        };
        Some(Ipi {
            dest,
            vector,
            mode,
            level: low & ICR_LEVEL_ASSERT != 0,
            trigger: if low & ICR_TRIGGER_LEVEL != 0 {
                Trigger::Level
            } else {
                Trigger::Edge
            },
        })
    }

    /// Whether a message for `dest` is for this LAPIC. `sender_id` is the APIC ID of the
    /// sender, for the ICR shorthands.
    pub fn matches_destination(&self, dest: &Destination, sender_id: u32) -> bool {
        let x2 = match self.mode() {
            ApicMode::Disabled => return false,
            ApicMode::XApic => false,
            ApicMode::X2Apic => true,
        };
        match *dest {
            Destination::Physical(d) => {
                d == u32::MAX
                    || if x2 {
                        d == self.id
                    } else {
                        d == 0xff || d == self.id
                    }
            }
            Destination::Logical(d) if x2 => {
                d == u32::MAX || ((d >> 16) == (self.ldr >> 16) && d & self.ldr & 0xffff != 0)
            }
            Destination::Logical(d) => {
                let d = d & 0xff;
                let l = self.ldr >> 24;
                if d == 0xff {
                    true
                } else if self.dfr >> 28 == 0xf {
                    l & d != 0
                } else {
                    (d >> 4) == (l >> 4) && d & l & 0xf != 0
                }
            }
            Destination::SelfOnly => sender_id == self.id,
            Destination::AllIncludingSelf => true,
            Destination::AllExcludingSelf => sender_id != self.id,
        }
    }

    // ---- Registers ----

    fn read_register(&self, reg: u32, now_ns: u64) -> Option<u32> {
        let x2 = self.mode() == ApicMode::X2Apic;
        let v = match reg {
            REG_ID if x2 => self.id,
            REG_ID => self.id << 24,
            REG_VERSION => APIC_VERSION,
            REG_TPR => self.tpr,
            REG_APR if !x2 => 0,
            REG_PPR => self.ppr(),
            REG_RRD if !x2 => 0,
            REG_LDR => self.ldr,
            REG_DFR if !x2 => self.dfr | 0x0fff_ffff,
            REG_SVR => self.svr,
            0x100..=0x170 => self.isr.word((reg - REG_ISR) >> 4),
            0x180..=0x1f0 => self.tmr.word((reg - REG_TMR) >> 4),
            0x200..=0x270 => self.irr.word((reg - REG_IRR) >> 4),
            REG_ESR => self.esr,
            REG_LVT_CMCI => self.lvt[LVT_CMCI],
            REG_ICR_LOW => self.icr_low,
            REG_ICR_HIGH if !x2 => self.icr_high,
            0x320..=0x370 => self.lvt[((reg - REG_LVT_TIMER) >> 4) as usize],
            REG_TIMER_INITIAL => self.initial_count,
            REG_TIMER_CURRENT => self.current_count(now_ns),
            REG_TIMER_DIVIDE => self.divide_config,
            _ => return None,
        };
        Some(v)
    }

    /// Write a register (not ICR in x2APIC mode, which is one 64-bit MSR).
    fn write_register(&mut self, reg: u32, value: u32, now_ns: u64) -> Result<Option<Ipi>, ()> {
        let x2 = self.mode() == ApicMode::X2Apic;
        match reg {
            REG_ID if !x2 => tracing::debug!(value, "LAPIC ID write ignored"),
            REG_TPR => self.tpr = value & 0xff,
            REG_EOI => self.eoi(),
            REG_LDR if !x2 => self.ldr = value & 0xff00_0000,
            REG_DFR if !x2 => self.dfr = value | 0x0fff_ffff,
            REG_SVR => {
                self.svr = value & SVR_WRITABLE;
                if !self.sw_enabled() {
                    for l in &mut self.lvt {
                        *l |= LVT_MASKED;
                    }
                }
            }
            REG_ESR => {
                self.esr = std::mem::take(&mut self.esr_pending);
            }
            REG_ICR_LOW if !x2 => {
                self.icr_low = value & ICR_LOW_WRITABLE;
                return Ok(self.send_ipi(self.icr_low, self.icr_high >> 24));
            }
            REG_ICR_HIGH if !x2 => self.icr_high = value & 0xff00_0000,
            REG_LVT_CMCI | 0x320..=0x370 => self.write_lvt(reg, value),
            REG_TIMER_INITIAL => {
                if self.timer_mode() != TIMER_TSC_DEADLINE {
                    self.initial_count = value;
                    self.arm_count_timer(now_ns);
                }
            }
            REG_TIMER_DIVIDE => self.write_divide(value & DIVIDE_WRITABLE, now_ns),
            REG_SELF_IPI if x2 => {
                self.accept_interrupt((value & 0xff) as u8, false);
            }
            _ => return Err(()),
        }
        Ok(None)
    }

    fn write_lvt(&mut self, reg: u32, value: u32) {
        let (index, writable) = match reg {
            REG_LVT_CMCI => (LVT_CMCI, LVT_OTHER_WRITABLE),
            REG_LVT_TIMER => (LVT_TIMER, LVT_TIMER_WRITABLE),
            REG_LVT_ERROR => (LVT_ERROR, LVT_ERROR_WRITABLE),
            0x350 => (LVT_LINT0, LVT_LINT_WRITABLE),
            0x360 => (LVT_LINT1, LVT_LINT_WRITABLE),
            0x330 => (LVT_THERMAL, LVT_OTHER_WRITABLE),
            _ => (LVT_PERFMON, LVT_OTHER_WRITABLE),
        };
        let mut v = value & writable;
        if !self.sw_enabled() {
            v |= LVT_MASKED;
        }
        if index == LVT_TIMER {
            if v & LVT_TIMER_MODE == LVT_TIMER_MODE {
                // Mode 0b11 is reserved: keep the current mode.
                v = (v & !LVT_TIMER_MODE) | self.timer_mode();
            }
            let was_deadline = self.timer_mode() == TIMER_TSC_DEADLINE;
            if (v & LVT_TIMER_MODE == TIMER_TSC_DEADLINE) != was_deadline {
                // Moving into or out of TSC-deadline mode disarms the timer.
                self.timer_deadline_ns = None;
                self.tsc_deadline = 0;
                self.initial_count = 0;
            }
            self.lvt[LVT_TIMER] = v;
        } else {
            // The remote-IRR bit (14) of LINT entries is read-only: keep it.
            self.lvt[index] = v | (self.lvt[index] & (1 << 14) & !writable);
        }
    }

    fn set_apic_base(&mut self, value: u64) -> Result<(), ApicError> {
        let allowed = BASE_ADDR_MASK | BASE_EN | BASE_EXTD | BASE_BSP;
        if value & !allowed != 0 {
            return Err(ApicError::InvalidTransition(value));
        }
        let new_mode = match (value & BASE_EN != 0, value & BASE_EXTD != 0) {
            (false, true) => return Err(ApicError::InvalidTransition(value)),
            (false, false) => ApicMode::Disabled,
            (true, false) => ApicMode::XApic,
            (true, true) => ApicMode::X2Apic,
        };
        let old_mode = self.mode();
        if old_mode == ApicMode::X2Apic && new_mode == ApicMode::XApic {
            return Err(ApicError::InvalidTransition(value));
        }
        // The BSP flag is read-only.
        self.apic_base = (value & !BASE_BSP) | if self.bsp { BASE_BSP } else { 0 };
        match (old_mode, new_mode) {
            (_, ApicMode::Disabled) if old_mode != ApicMode::Disabled => self.reset_registers(),
            (_, ApicMode::X2Apic) if old_mode != ApicMode::X2Apic => self.ldr = self.x2apic_ldr(),
            _ => {}
        }
        Ok(())
    }

    /// A guest read of the xAPIC page at `offset`. In any mode but xAPIC, or at an
    /// unimplemented register or an offset outside the page, it reads zeros.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8], now_ns: u64) {
        data.fill(0);
        if self.mode() != ApicMode::XApic || offset >= 0x1000 {
            return;
        }
        let reg = (offset & !0xf) as u32;
        let byte = (offset & 0xf) as usize;
        let value = match self.read_register(reg, now_ns) {
            Some(v) => v,
            None => {
                tracing::debug!(offset, "LAPIC read of unimplemented register");
                0
            }
        };
        let bytes = value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(byte + i).copied().unwrap_or(0);
        }
    }

    /// A guest write to the xAPIC page at `offset`. Only aligned 32-bit (or wider:
    /// the low 32 bits count) writes reach a register. Returns the IPI an ICR write sends.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], now_ns: u64) -> Option<Ipi> {
        if self.mode() != ApicMode::XApic || offset >= 0x1000 || offset & 0xf != 0 {
            tracing::debug!(offset, len = data.len(), "LAPIC MMIO write ignored");
            return None;
        }
        let Some(bytes) = data.get(..4) else {
            tracing::debug!(
                offset,
                len = data.len(),
                "LAPIC MMIO write narrower than 32 bits"
            );
            return None;
        };
        let value = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        match self.write_register(offset as u32, value, now_ns) {
            Ok(ipi) => ipi,
            Err(()) => {
                tracing::debug!(offset, value, "LAPIC write to read-only/unknown register");
                if self.read_register(offset as u32, now_ns).is_none() {
                    self.raise_error(ESR_ILLEGAL_REGISTER);
                }
                None
            }
        }
    }

    /// RDMSR of an APIC MSR. `None`: not an APIC MSR, or not readable in the current
    /// mode; the caller raises #GP.
    pub fn msr_read(&mut self, msr: u32, now_ns: u64) -> Option<u64> {
        match msr {
            MSR_APIC_BASE => Some(self.apic_base),
            MSR_TSC_DEADLINE => Some(if self.timer_mode() == TIMER_TSC_DEADLINE {
                self.tsc_deadline
            } else {
                0
            }),
            MSR_X2APIC_FIRST..=MSR_X2APIC_LAST if self.mode() == ApicMode::X2Apic => {
                let reg = (msr - MSR_X2APIC_FIRST) << 4;
                match reg {
                    REG_ICR_LOW => Some(u64::from(self.icr_high) << 32 | u64::from(self.icr_low)),
                    REG_EOI | REG_SELF_IPI => None,
                    _ => self.read_register(reg, now_ns).map(u64::from),
                }
            }
            _ => None,
        }
    }

    /// WRMSR of an APIC MSR. An error means #GP. Returns the IPI an ICR write sends.
    pub fn msr_write(
        &mut self,
        msr: u32,
        value: u64,
        now_ns: u64,
    ) -> Result<Option<Ipi>, ApicError> {
        match msr {
            MSR_APIC_BASE => self.set_apic_base(value).map(|()| None),
            MSR_TSC_DEADLINE => {
                self.write_tsc_deadline(value);
                Ok(None)
            }
            MSR_X2APIC_FIRST..=MSR_X2APIC_LAST => {
                if self.mode() != ApicMode::X2Apic {
                    return Err(ApicError::NotX2Apic(msr));
                }
                let reg = (msr - MSR_X2APIC_FIRST) << 4;
                if reg == REG_ICR_LOW {
                    self.icr_low = (value as u32) & ICR_LOW_WRITABLE;
                    self.icr_high = (value >> 32) as u32;
                    return Ok(self.send_ipi(self.icr_low, self.icr_high));
                }
                let reserved = value >> 32 != 0
                    || (matches!(reg, REG_EOI | REG_ESR) && value != 0)
                    || (reg == REG_SELF_IPI && value > 0xff);
                if reserved {
                    return Err(ApicError::ReservedBits { msr, value });
                }
                self.write_register(reg, value as u32, now_ns)
                    .map_err(|()| ApicError::NotWritable(msr))
            }
            _ => Err(ApicError::NotApicMsr(msr)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(l: &mut Lapic, off: u64, now: u64) -> u32 {
        let mut b = [0u8; 4];
        l.mmio_read(off, &mut b, now);
        u32::from_le_bytes(b)
    }

    fn wr(l: &mut Lapic, off: u64, v: u32, now: u64) -> Option<Ipi> {
        l.mmio_write(off, &v.to_le_bytes(), now)
    }

    fn enabled() -> Lapic {
        let mut l = Lapic::new(0, true);
        wr(&mut l, 0xf0, SVR_ENABLE | 0xff, 0);
        l
    }

    #[test]
    fn reset_values() {
        let mut l = Lapic::new(3, false);
        assert_eq!(rd(&mut l, 0x20, 0), 3 << 24);
        assert_eq!(rd(&mut l, 0x30, 0), 0x50014);
        assert_eq!(rd(&mut l, 0xf0, 0), 0xff);
        assert_eq!(rd(&mut l, 0xe0, 0), 0xffff_ffff);
        assert_eq!(rd(&mut l, 0x350, 0), LVT_MASKED);
        assert_eq!(l.msr_read(MSR_APIC_BASE, 0), Some(0xfee0_0800));
        let bsp = Lapic::new(0, true);
        assert_eq!(bsp.apic_base, 0xfee0_0900);
        assert!(bsp.accepts_pic_interrupt());
        assert!(!l.accepts_pic_interrupt());
    }

    #[test]
    fn priority_tpr_and_ppr() {
        let mut l = enabled();
        assert!(l.accept_interrupt(0x45, false));
        assert_eq!(l.pending_vector(), Some(0x45));
        wr(&mut l, 0x80, 0x40, 0); // TPR class 4 masks class 4
        assert_eq!(l.pending_vector(), None);
        assert_eq!(rd(&mut l, 0xa0, 0), 0x40);
        wr(&mut l, 0x80, 0x3f, 0);
        assert_eq!(l.pending_vector(), Some(0x45));
        wr(&mut l, 0x80, 0, 0);
        assert_eq!(l.acknowledge(), Some(0x45));
        assert_eq!(rd(&mut l, 0xa0, 0), 0x40); // PPR from ISR
                                               // Same class can't preempt, higher class can.
        l.accept_interrupt(0x41, false);
        assert_eq!(l.pending_vector(), None);
        l.accept_interrupt(0x51, false);
        assert_eq!(l.acknowledge(), Some(0x51));
        assert_eq!(rd(&mut l, 0x100 + 0x20, 0), (1 << 5) | (1 << 0x11));
    }

    #[test]
    fn eoi_order_and_level_vectors() {
        let mut l = enabled();
        l.accept_interrupt(0x30, true);
        assert_eq!(l.acknowledge(), Some(0x30));
        l.accept_interrupt(0x60, false);
        assert_eq!(l.acknowledge(), Some(0x60));
        l.accept_interrupt(0x31, false);
        assert_eq!(l.pending_vector(), None);
        wr(&mut l, 0xb0, 0, 0); // EOI 0x60
        assert!(l.take_eoi_vectors().is_empty());
        assert_eq!(l.pending_vector(), None); // 0x31 same class as 0x30 in service
        wr(&mut l, 0xb0, 0, 0); // EOI 0x30, level
        assert_eq!(l.take_eoi_vectors(), vec![0x30]);
        assert_eq!(l.acknowledge(), Some(0x31));
    }

    #[test]
    fn illegal_vectors_and_disabled() {
        let mut l = enabled();
        assert!(!l.accept_interrupt(5, false));
        wr(&mut l, 0x280, 0, 0);
        assert_eq!(rd(&mut l, 0x280, 0), ESR_RECEIVE_ILLEGAL_VECTOR);
        let mut off = Lapic::new(1, false); // software-disabled at reset
        assert!(!off.accept_interrupt(0x40, false));
        // ICR with vector 3 fixed: not sent, ESR.
        assert_eq!(wr(&mut l, 0x300, 0x0003, 0), None);
        wr(&mut l, 0x280, 0, 0);
        assert_eq!(rd(&mut l, 0x280, 0), ESR_SEND_ILLEGAL_VECTOR);
    }

    #[test]
    fn one_shot_timer_with_divide() {
        let mut l = enabled();
        wr(&mut l, 0x3e0, 0x3, 1000); // divide by 16
        wr(&mut l, 0x320, 0x40, 1000); // one-shot, vector 0x40
        wr(&mut l, 0x380, 100, 1000); // 1600 ns at 1 GHz
        assert_eq!(l.next_deadline_ns(), Some(2600));
        assert_eq!(rd(&mut l, 0x390, 1000), 100);
        assert_eq!(rd(&mut l, 0x390, 1800), 50);
        assert!(!l.tick(2599));
        assert!(l.tick(2600));
        assert_eq!(l.pending_vector(), Some(0x40));
        assert_eq!(l.next_deadline_ns(), None);
        assert_eq!(rd(&mut l, 0x390, 3000), 0);
        // Divide by 1 (0b1011) and by 2 (0).
        wr(&mut l, 0x3e0, 0xb, 0);
        wr(&mut l, 0x380, 10, 5000);
        assert_eq!(l.next_deadline_ns(), Some(5010));
        wr(&mut l, 0x3e0, 0x0, 0);
        wr(&mut l, 0x380, 10, 5000);
        assert_eq!(l.next_deadline_ns(), Some(5020));
        wr(&mut l, 0x380, 0, 5000); // stop
        assert_eq!(l.next_deadline_ns(), None);
    }

    #[test]
    fn divide_change_and_mode_switch_keep_or_disarm() {
        let mut l = enabled();
        wr(&mut l, 0x3e0, 0xb, 0); // divide by 1
        wr(&mut l, 0x320, 0x40, 0);
        wr(&mut l, 0x380, 1000, 0);
        wr(&mut l, 0x3e0, 0x0, 400); // divide by 2 with 600 counts left
        assert_eq!(rd(&mut l, 0x390, 400), 600);
        assert_eq!(l.next_deadline_ns(), Some(1600));
        assert_eq!(rd(&mut l, 0x390, 1000), 300);
        // One-shot to periodic keeps the count running; to TSC-deadline disarms it.
        wr(&mut l, 0x320, TIMER_PERIODIC | 0x40, 1000);
        assert_eq!(l.next_deadline_ns(), Some(1600));
        wr(&mut l, 0x320, TIMER_TSC_DEADLINE | 0x40, 1000);
        assert_eq!(l.next_deadline_ns(), None);
        assert_eq!(rd(&mut l, 0x380, 1000), 0);
        // Writes to read-only registers are ignored quietly; unknown ones set ESR bit 7.
        wr(&mut l, 0x100, 0xffff_ffff, 0);
        wr(&mut l, 0x280, 0, 0);
        assert_eq!(rd(&mut l, 0x280, 0), 0);
        assert_eq!(rd(&mut l, 0x100, 0), 0);
        wr(&mut l, 0x3c0, 1, 0);
        wr(&mut l, 0x280, 0, 0);
        assert_eq!(rd(&mut l, 0x280, 0), ESR_ILLEGAL_REGISTER);
    }

    #[test]
    fn periodic_timer_rearms_and_counts_down() {
        let mut l = Lapic::with_clocks(0, true, 100_000_000, 1_000_000_000); // 10 ns/count
        wr(&mut l, 0xf0, 0x1ff, 0);
        wr(&mut l, 0x3e0, 0xb, 0); // divide by 1
        wr(&mut l, 0x320, TIMER_PERIODIC | 0x50, 0);
        wr(&mut l, 0x380, 10_000, 0); // 100 us
        assert_eq!(l.next_deadline_ns(), Some(100_000));
        assert_eq!(rd(&mut l, 0x390, 25_000), 7_500);
        assert_eq!(rd(&mut l, 0x390, 125_000), 7_500);
        assert!(l.tick(100_000));
        assert_eq!(l.next_deadline_ns(), Some(200_000));
        assert_eq!(l.acknowledge(), Some(0x50));
        // Late tick: missed periods collapse.
        assert!(l.tick(450_000));
        assert_eq!(l.next_deadline_ns(), Some(500_000));
        // Masked: fires without IRR.
        wr(&mut l, 0xb0, 0, 0);
        wr(&mut l, 0x320, TIMER_PERIODIC | LVT_MASKED | 0x50, 0);
        l.irr = VectorBits::default();
        assert!(l.tick(500_000));
        assert_eq!(l.pending_vector(), None);
    }

    #[test]
    fn tsc_deadline_timer() {
        let mut l = Lapic::with_clocks(0, true, DEFAULT_TIMER_HZ, 2_000_000_000);
        wr(&mut l, 0xf0, 0x1ff, 0);
        // Ignored outside deadline mode.
        l.msr_write(MSR_TSC_DEADLINE, 1000, 0).unwrap();
        assert_eq!(l.msr_read(MSR_TSC_DEADLINE, 0), Some(0));
        assert_eq!(l.next_deadline_ns(), None);
        wr(&mut l, 0x320, TIMER_TSC_DEADLINE | 0x60, 0);
        l.msr_write(MSR_TSC_DEADLINE, 4000, 0).unwrap(); // 2000 ns at 2 GHz
        assert_eq!(l.msr_read(MSR_TSC_DEADLINE, 0), Some(4000));
        assert_eq!(l.next_deadline_ns(), Some(2000));
        // TMICT is ignored in deadline mode.
        wr(&mut l, 0x380, 5, 0);
        assert_eq!(rd(&mut l, 0x380, 0), 0);
        assert!(l.tick(2000));
        assert_eq!(l.pending_vector(), Some(0x60));
        assert_eq!(l.msr_read(MSR_TSC_DEADLINE, 0), Some(0));
        // Disarm with 0.
        l.msr_write(MSR_TSC_DEADLINE, 9000, 0).unwrap();
        l.msr_write(MSR_TSC_DEADLINE, 0, 0).unwrap();
        assert_eq!(l.next_deadline_ns(), None);
    }

    #[test]
    fn icr_decoding() {
        let mut l = enabled();
        wr(&mut l, 0x310, 0x0300_0000, 0);
        let cases = [
            (
                0x0000_4031,
                Destination::Physical(3),
                DeliveryMode::Fixed,
                Trigger::Edge,
            ),
            (
                0x0000_4931,
                Destination::Logical(3),
                DeliveryMode::LowestPriority,
                Trigger::Edge,
            ),
            (
                0x0004_4031,
                Destination::SelfOnly,
                DeliveryMode::Fixed,
                Trigger::Edge,
            ),
            (
                0x0008_4400,
                Destination::AllIncludingSelf,
                DeliveryMode::Nmi,
                Trigger::Edge,
            ),
            (
                0x000c_c500,
                Destination::AllExcludingSelf,
                DeliveryMode::Init,
                Trigger::Level,
            ),
            (
                0x0000_4608,
                Destination::Physical(3),
                DeliveryMode::StartUp,
                Trigger::Edge,
            ),
            (
                0x0000_4200,
                Destination::Physical(3),
                DeliveryMode::Smi,
                Trigger::Edge,
            ),
            (
                0x0000_4700,
                Destination::Physical(3),
                DeliveryMode::ExtInt,
                Trigger::Edge,
            ),
        ];
        for (low, dest, mode, trigger) in cases {
            let ipi = wr(&mut l, 0x300, low, 0).unwrap();
            assert_eq!(ipi.dest, dest, "{low:#x}");
            assert_eq!(ipi.mode, mode, "{low:#x}");
            assert_eq!(ipi.trigger, trigger, "{low:#x}");
            assert_eq!(ipi.vector, low as u8);
            assert!(ipi.level);
        }
        // INIT de-assert is passed on with level = false; reserved mode is dropped.
        let deassert = wr(&mut l, 0x300, 0x0000_8500, 0).unwrap();
        assert!(!deassert.level);
        assert_eq!(wr(&mut l, 0x300, 0x0000_0330, 0), None);
        assert_eq!(rd(&mut l, 0x300, 0) & (1 << 12), 0);
    }

    #[test]
    fn destinations() {
        let mut a = Lapic::new(2, false);
        assert!(a.matches_destination(&Destination::Physical(2), 0));
        assert!(a.matches_destination(&Destination::Physical(0xff), 0));
        assert!(!a.matches_destination(&Destination::Physical(1), 0));
        assert!(a.matches_destination(&Destination::SelfOnly, 2));
        assert!(!a.matches_destination(&Destination::SelfOnly, 1));
        assert!(!a.matches_destination(&Destination::AllExcludingSelf, 2));
        assert!(a.matches_destination(&Destination::AllIncludingSelf, 2));
        // Flat logical: LDR bit 2.
        wr(&mut a, 0xd0, 0x0400_0000, 0);
        assert!(a.matches_destination(&Destination::Logical(0x04), 0));
        assert!(a.matches_destination(&Destination::Logical(0x06), 0));
        assert!(!a.matches_destination(&Destination::Logical(0x01), 0));
        // Cluster: cluster 1, member bit 1.
        wr(&mut a, 0xe0, 0x0fff_ffff, 0);
        wr(&mut a, 0xd0, 0x1200_0000, 0);
        assert!(a.matches_destination(&Destination::Logical(0x13), 0));
        assert!(!a.matches_destination(&Destination::Logical(0x23), 0));
        // x2APIC: logical ID from the ID (cluster 2, bit 3 for ID 0x23).
        let mut x = Lapic::new(0x23, false);
        x.msr_write(MSR_APIC_BASE, 0xfee0_0c00, 0).unwrap();
        assert_eq!(x.msr_read(0x80d, 0), Some(0x0002_0008));
        assert!(x.matches_destination(&Destination::Logical(0x0002_0009), 0));
        assert!(!x.matches_destination(&Destination::Logical(0x0003_0008), 0));
        assert!(x.matches_destination(&Destination::Physical(0x23), 0));
        assert!(!x.matches_destination(&Destination::Physical(0xff), 0));
        assert!(x.matches_destination(&Destination::Physical(u32::MAX), 0));
    }

    #[test]
    fn x2apic_mode_switching() {
        let mut l = Lapic::new(5, false);
        // x2APIC MSRs #GP in xAPIC mode.
        assert_eq!(l.msr_read(0x802, 0), None);
        assert_eq!(l.msr_write(0x808, 0, 0), Err(ApicError::NotX2Apic(0x808)));
        // EXTD without EN is invalid.
        assert!(l.msr_write(MSR_APIC_BASE, 0xfee0_0400, 0).is_err());
        l.msr_write(MSR_APIC_BASE, 0xfee0_0c00, 0).unwrap();
        assert_eq!(l.mode(), ApicMode::X2Apic);
        assert_eq!(l.msr_read(0x802, 0), Some(5));
        assert_eq!(l.msr_read(0x803, 0), Some(0x50014));
        // MMIO is dead in x2APIC mode.
        assert_eq!(rd(&mut l, 0x20, 0), 0);
        wr(&mut l, 0x80, 0x20, 0);
        assert_eq!(l.msr_read(0x808, 0), Some(0));
        l.msr_write(0x808, 0x20, 0).unwrap();
        assert_eq!(l.msr_read(0x808, 0), Some(0x20));
        // Read-only, write-only, nonexistent and reserved.
        assert_eq!(l.msr_write(0x802, 1, 0), Err(ApicError::NotWritable(0x802)));
        assert_eq!(l.msr_read(0x80b, 0), None);
        assert_eq!(l.msr_read(0x80e, 0), None);
        assert_eq!(l.msr_read(0x831, 0), None);
        assert!(matches!(
            l.msr_write(0x80b, 1, 0),
            Err(ApicError::ReservedBits { .. })
        ));
        assert!(matches!(
            l.msr_write(0x808, 1 << 32, 0),
            Err(ApicError::ReservedBits { .. })
        ));
        // 64-bit ICR with a 32-bit destination.
        let ipi = l
            .msr_write(0x830, 0x0000_0123_0000_0040, 0)
            .unwrap()
            .unwrap();
        assert_eq!(ipi.dest, Destination::Physical(0x123));
        assert_eq!(l.msr_read(0x830, 0), Some(0x0000_0123_0000_0040));
        // SELF IPI and EOI.
        wr(&mut l, 0xf0, 0x1ff, 0);
        l.msr_write(0x80f, 0x1ff, 0).unwrap();
        l.msr_write(0x83f, 0x77, 0).unwrap();
        assert_eq!(l.acknowledge(), Some(0x77));
        l.msr_write(0x80b, 0, 0).unwrap();
        assert_eq!(l.msr_read(0x810 + 3, 0), Some(0));
        // Back to xAPIC is invalid; disabling is fine, then xAPIC again.
        assert!(l.msr_write(MSR_APIC_BASE, 0xfee0_0800, 0).is_err());
        l.msr_write(MSR_APIC_BASE, 0xfee0_0000, 0).unwrap();
        assert_eq!(l.mode(), ApicMode::Disabled);
        l.msr_write(MSR_APIC_BASE, 0xfee0_0800, 0).unwrap();
        assert_eq!(rd(&mut l, 0x20, 0), 5 << 24);
        assert_eq!(l.msr_read(0x1234, 0), None);
        assert_eq!(
            l.msr_write(0x1234, 0, 0),
            Err(ApicError::NotApicMsr(0x1234))
        );
    }

    #[test]
    fn hostile_offsets_and_sizes() {
        let mut l = enabled();
        for off in [
            0u64,
            0x3,
            0x21,
            0x3ff,
            0xfff,
            0x1000,
            u64::MAX,
            0x8000_0000_0000_0000,
        ] {
            for len in [0usize, 1, 2, 3, 4, 8, 16] {
                let mut buf = vec![0xaau8; len];
                l.mmio_read(off, &mut buf, u64::MAX);
                l.mmio_write(off, &buf, u64::MAX);
            }
        }
        // Byte reads inside a register.
        let mut b = [0u8; 1];
        l.mmio_read(0x32, &mut b, 0);
        assert_eq!(b[0], 0x05);
        // Hostile timer: huge count and divisor at the end of time.
        wr(&mut l, 0x320, TIMER_PERIODIC | 0x40, 0);
        wr(&mut l, 0x3e0, 0xa, 0);
        wr(&mut l, 0x380, u32::MAX, u64::MAX - 5);
        l.tick(u64::MAX);
        rd(&mut l, 0x390, u64::MAX);
        rd(&mut l, 0x390, 0);
        for msr in 0x800..=0x8ff {
            l.msr_read(msr, 0);
            let _ = l.msr_write(msr, u64::MAX, 0);
        }
    }

    #[test]
    fn state_round_trip() {
        let mut l = enabled();
        wr(&mut l, 0x320, TIMER_PERIODIC | 0x40, 0);
        wr(&mut l, 0x380, 100_000, 0);
        l.accept_interrupt(0x33, true);
        l.acknowledge();
        l.accept_interrupt(0x90, false);
        let s = l.state();
        let mut r = Lapic::from_state(&s);
        assert_eq!(r.state(), s);
        assert_eq!(rd(&mut r, 0x390, 30_000), rd(&mut l, 0x390, 30_000));
        assert_eq!(r.acknowledge(), Some(0x90));
        // A corrupt snapshot doesn't make a panicking LAPIC.
        let bad = LapicState {
            timer_hz: 0,
            timer_start_count: u32::MAX,
            initial_count: 0,
            ..s
        };
        let mut r = Lapic::from_state(&bad);
        rd(&mut r, 0x390, u64::MAX);
        r.tick(u64::MAX);
    }

    #[test]
    fn init_keeps_id_and_lint0() {
        let mut l = enabled();
        l.accept_interrupt(0x40, false);
        wr(&mut l, 0x80, 0x10, 0);
        l.init();
        assert_eq!(l.id(), 0);
        assert_eq!(l.pending_vector(), None);
        assert_eq!(rd(&mut l, 0x80, 0), 0);
        assert!(l.accepts_pic_interrupt());
        assert_eq!(rd(&mut l, 0xf0, 0), 0xff);
    }
}
