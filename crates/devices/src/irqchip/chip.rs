//! [`UserIrqChip`]: the PC's interrupt plumbing in user space, for the `emu` accelerator.
//!
//! It owns one [`Lapic`] per vCPU, the [`IoApic`], the [`Pic`] pair and the [`Pit`], all
//! behind one mutex (held only for the length of a register access), and routes between
//! them as a PC does:
//! - GSI lines go to the IOAPIC pin of the same number and, below 16, to the 8259 IRQ of
//!   the same number. ISA IRQ 0 (the PIT) is PIC IRQ 0 and IOAPIC pin 2, the override
//!   Vessel's MADT publishes; GSI 0 and GSI 2 both mean that line.
//! - IOAPIC messages, MSIs and IPIs fan out to the LAPICs whose destination matches
//!   (lowest-priority picks the first match).
//! - The 8259's INT output reaches vCPU 0 through LINT0 when its LAPIC is
//!   hardware-disabled or LINT0 is unmasked ExtINT (virtual-wire mode).
//! - A LAPIC EOI of a level-triggered vector is passed to the IOAPIC.
//! - INIT and SIPI messages are queued per vCPU for the VMM ([`StartupEvent`]).
//!
//! The intended vCPU loop (`now` from the VMM's clock, nanoseconds since VM start):
//! ```text
//! loop {
//!     for ev in chip.take_startup_events(cpu) { /* INIT: reset; SIPI: start at vector << 12 */ }
//!     if chip.next_deadline_ns(cpu).is_some_and(|d| d <= now) { chip.tick(now) }
//!     // event_hint is lock-free: skip the rest while nothing is pending.
//!     if !chip.event_hint(cpu) { /* nothing to deliver */ }
//!     else if chip.take_nmi(cpu) { /* inject NMI */ }
//!     else if rflags.IF && !shadow && chip.has_interrupt(cpu) {
//!         if let Some(v) = chip.acknowledge_interrupt(cpu) { /* inject v */ }
//!     }
//!     if halted {
//!         // Sleep until something is pending or the next timer is due, then loop.
//!         let timeout = chip.next_deadline_ns(cpu).map_or(FOREVER, |d| d - now);
//!         chip.wait(cpu, timeout, rflags.IF);
//!         continue;
//!     }
//!     /* run guest code: xAPIC page accesses go to lapic_mmio_read/write, APIC MSRs
//!        (Lapic::handles_msr) to lapic_msr_read/write, CR8 to cr8/set_cr8, and RDTSC
//!        returns guest_tsc(now) */
//! }
//! ```
//! vCPU 0's deadline includes the PIT's, so vCPU 0 must keep calling `tick` (it wakes the
//! others when that delivers to them).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use super::ioapic::{IoApic, IoApicState};
use super::lapic::{ApicError, Lapic, LapicState};
use super::pic::{Pic, Pic8259State};
use super::pit::{ChannelState, Pit};
use super::{Clock, Delivery, DeliveryMode, Destination, Trigger};
use crate::bus::BusDevice;

/// The IOAPIC pin ISA IRQ 0 (the PIT) arrives on.
const PIT_GSI: u32 = 2;
/// Startup events kept per vCPU before the oldest are dropped.
const MAX_STARTUP_EVENTS: usize = 64;
/// MSI address bits 20–31 must be 0xfee.
const MSI_ADDRESS_MASK: u64 = 0xfff0_0000;
const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;
/// MSI address bits 12–19: destination ID.
const MSI_DEST_SHIFT: u32 = 12;
/// MSI address bit 2: logical destination mode.
const MSI_DEST_LOGICAL: u64 = 1 << 2;
/// MSI data bit 15: level-triggered.
const MSI_TRIGGER_LEVEL: u32 = 1 << 15;
/// The most vCPUs a chip models (x2APIC IDs go further; nothing here needs more).
pub const MAX_CPUS: u32 = 4096;
/// No sender: messages from the IOAPIC and MSIs never use ICR shorthands.
const NO_SENDER: u32 = u32::MAX;

/// A startup message the VMM must act on for a vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StartupEvent {
    /// INIT: the LAPIC has been reset; the VMM resets the CPU and waits for a SIPI.
    Init,
    /// Startup IPI: the CPU starts in real mode at `vector << 12`.
    Sipi(u8),
}

/// Why a chip refused a snapshot's state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChipStateError {
    #[error("the snapshot's interrupt controller has {snapshot} local APICs, this VM {chip}")]
    CpuCount { chip: usize, snapshot: usize },
}

/// A snapshot of the whole chip ([`UserIrqChip::state`], [`UserIrqChip::from_state`]).
/// Times are in the VM's `now_ns` clock, so restore it with the same time base.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UserIrqChipState {
    pub lapics: Vec<LapicState>,
    pub ioapic: IoApicState,
    pub pic_master: Pic8259State,
    pub pic_slave: Pic8259State,
    pub pit_channels: [ChannelState; 3],
    pub pit_speaker: bool,
    pub startup: Vec<Vec<StartupEvent>>,
    pub extint: Vec<bool>,
}

#[derive(Debug)]
struct ChipState {
    lapics: Vec<Lapic>,
    ioapic: IoApic,
    pic: Pic,
    pit: Pit,
    startup: Vec<Vec<StartupEvent>>,
    /// An IOAPIC/MSI ExtINT message is waiting for this CPU's INTA.
    extint: Vec<bool>,
    kicked: Vec<bool>,
    /// The vCPU sleeps in `wait`, woken by a maskable interrupt if `Some(true)`. Only those
    /// are notified, once each: the notifier clears it, so a vCPU that waits for a host
    /// CPU after its wake-up is not woken again by every later change of the chip.
    waiting: Vec<Option<bool>>,
    /// Interrupts held back while every vCPU is busy (see
    /// [`UserIrqChip::pulse_irq_line_moderated`]), each once.
    held: Vec<Held>,
    /// When the oldest of `held` must go out at the latest.
    held_until: Option<Instant>,
    /// vCPUs to wake once the lock is let go (see [`ChipGuard`]).
    to_wake: Vec<usize>,
}

/// An interrupt [`UserIrqChip::pulse_irq_line_moderated`] or
/// [`UserIrqChip::signal_msi_moderated`] holds until a vCPU halts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    Edge(u32),
    Msi(u64, u32),
    /// An MSI held until its own destination halts (see
    /// [`UserIrqChip::signal_msi_at_halt`]): another vCPU's halt does not release it.
    MsiAtHalt(u64, u32),
}

/// Distinct interrupts held at once; one more is delivered with the others at once.
const MAX_HELD: usize = 64;

impl ChipState {
    fn pic_reaches(&self, cpu: usize) -> bool {
        cpu == 0
            && self
                .lapics
                .first()
                .is_some_and(Lapic::accepts_pic_interrupt)
    }

    fn has_interrupt(&self, cpu: usize) -> bool {
        let Some(l) = self.lapics.get(cpu) else {
            return false;
        };
        self.extint.get(cpu).copied().unwrap_or(false)
            || (self.pic_reaches(cpu) && self.pic.interrupt_pending())
            || l.pending_vector().is_some()
    }

    /// Something that ends a HLT: an interrupt (if `interruptible`), an NMI, or a
    /// startup message.
    fn has_event(&self, cpu: usize, interruptible: bool) -> bool {
        (interruptible && self.has_interrupt(cpu))
            || self.lapics.get(cpu).is_some_and(Lapic::nmi_pending)
            || self.startup.get(cpu).is_some_and(|q| !q.is_empty())
    }

    fn deliver(
        &mut self,
        dest: Destination,
        sender: u32,
        mode: DeliveryMode,
        vector: u8,
        trigger: Trigger,
        level: bool,
    ) {
        let targets: Vec<usize> = self
            .lapics
            .iter()
            .enumerate()
            .filter(|(_, l)| l.matches_destination(&dest, sender))
            .map(|(i, _)| i)
            .collect();
        let level_triggered = trigger == Trigger::Level;
        match mode {
            DeliveryMode::Fixed => {
                for &t in &targets {
                    self.lapics[t].accept_interrupt(vector, level_triggered);
                }
            }
            DeliveryMode::LowestPriority => {
                if let Some(&t) = targets.first() {
                    self.lapics[t].accept_interrupt(vector, level_triggered);
                }
            }
            DeliveryMode::Nmi => {
                for &t in &targets {
                    self.lapics[t].deliver_nmi();
                }
            }
            DeliveryMode::Init if level_triggered && !level => {
                // INIT level de-assert: nothing for a modern CPU to do.
            }
            DeliveryMode::Init => {
                for &t in &targets {
                    self.lapics[t].init();
                    self.push_startup(t, StartupEvent::Init);
                }
            }
            DeliveryMode::StartUp => {
                for &t in &targets {
                    self.push_startup(t, StartupEvent::Sipi(vector));
                }
            }
            DeliveryMode::ExtInt => {
                for &t in &targets {
                    self.extint[t] = true;
                }
            }
            DeliveryMode::Smi => tracing::debug!(?dest, "SMI not modelled, dropped"),
        }
    }

    fn push_startup(&mut self, cpu: usize, ev: StartupEvent) {
        let q = &mut self.startup[cpu];
        if q.len() >= MAX_STARTUP_EVENTS {
            q.remove(0);
        }
        q.push(ev);
    }

    /// An IOAPIC message or MSI. Their 8-bit physical broadcast (0xff) reaches x2APIC-mode
    /// LAPICs too.
    fn deliver_message(&mut self, d: Delivery) {
        let dest = match d.dest {
            Destination::Physical(0xff) => Destination::Physical(u32::MAX),
            other => other,
        };
        self.deliver(dest, NO_SENDER, d.mode, d.vector, d.trigger, true);
    }

    fn set_ioapic_pin(&mut self, pin: u32, level: bool) {
        if let Some(d) = self.ioapic.set_irq(pin, level) {
            self.deliver_message(d);
        }
    }

    /// Delivers the interrupts held back; true if there were any.
    fn release_held(&mut self) -> bool {
        self.held_until = None;
        if self.held.is_empty() {
            return false;
        }
        for irq in std::mem::take(&mut self.held) {
            self.deliver_held(irq);
        }
        true
    }

    /// Delivers the interrupts held back as vCPU `cpu` halts (or, with None, as an
    /// interrupt goes out at once), except those held for a destination that still runs
    /// (`Held::MsiAtHalt`): an idle vCPU's halt, e.g. after its timer tick, must not put
    /// a completion into the busy vCPU's kernel thread, which would make the guest wake
    /// the waiting task on that idle vCPU instead. True if any went out.
    fn release_held_at(&mut self, cpu: Option<usize>) -> bool {
        if self.held.is_empty() {
            self.held_until = None;
            return false;
        }
        let (go, keep): (Vec<Held>, Vec<Held>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|irq| match *irq {
                Held::MsiAtHalt(address, data) => {
                    let dest = msi_delivery(address, data).map(|d| d.dest);
                    match (cpu, dest) {
                        (Some(i), Some(dest)) => self
                            .lapics
                            .get(i)
                            .is_some_and(|l| l.matches_destination(&dest, NO_SENDER)),
                        // A malformed message is dropped by delivery anyway.
                        (_, None) => true,
                        (None, Some(_)) => false,
                    }
                }
                Held::Edge(_) | Held::Msi(..) => true,
            });
        self.held = keep;
        if self.held.is_empty() {
            self.held_until = None;
        }
        let any = !go.is_empty();
        for irq in go {
            self.deliver_held(irq);
        }
        any
    }

    fn deliver_held(&mut self, irq: Held) {
        match irq {
            Held::Edge(gsi) => {
                self.set_irq_line(gsi, true);
                self.set_irq_line(gsi, false);
            }
            Held::Msi(address, data) | Held::MsiAtHalt(address, data) => {
                if let Some(d) = msi_delivery(address, data) {
                    self.deliver_message(d);
                }
            }
        }
    }

    fn set_irq_line(&mut self, gsi: u32, active: bool) {
        match gsi {
            0 | PIT_GSI => {
                self.pic.set_irq(0, active);
                self.set_ioapic_pin(PIT_GSI, active);
            }
            1..=15 => {
                self.pic.set_irq(gsi as u8, active);
                self.set_ioapic_pin(gsi, active);
            }
            _ => self.set_ioapic_pin(gsi, active),
        }
    }

    /// The timers every vCPU's tick advances: interrupts held past their time go out
    /// (see `pulse_irq_line_moderated`), and a PIT edge pulses ISA IRQ 0 (missed periods
    /// collapse into one edge). True if either raised something.
    fn tick_shared(&mut self, now_ns: u64) -> bool {
        let mut raised = false;
        if self.held_until.is_some_and(|due| Instant::now() >= due) {
            raised |= self.release_held();
        }
        if self.pit.tick(now_ns) > 0 {
            self.set_irq_line(PIT_GSI, true);
            self.set_irq_line(PIT_GSI, false);
            raised = true;
        }
        raised
    }

    /// After a LAPIC register write: send its IPI and pass level EOIs to the IOAPIC.
    fn after_lapic_write(&mut self, cpu: usize, ipi: Option<super::Ipi>) {
        let sender = self.lapics[cpu].id();
        if let Some(ipi) = ipi {
            self.deliver(
                ipi.dest,
                sender,
                ipi.mode,
                ipi.vector,
                ipi.trigger,
                ipi.level,
            );
        }
        for v in self.lapics[cpu].take_eoi_vectors() {
            for d in self.ioapic.eoi(v) {
                self.deliver_message(d);
            }
        }
    }
}

/// The user-space interrupt controllers of one VM. See the module documentation.
///
/// ```
/// use devices::irqchip::UserIrqChip;
///
/// let chip = UserIrqChip::new(2, 1_000_000_000, 2_000_000_000);
/// // vCPU 1 software-enables its LAPIC (SVR), then an MSI for APIC ID 1, vector 0x41.
/// chip.lapic_mmio_write(1, 0xf0, &0x1ffu32.to_le_bytes(), 0);
/// chip.signal_msi(0xfee0_1000, 0x41);
/// assert!(chip.has_interrupt(1));
/// assert_eq!(chip.acknowledge_interrupt(1), Some(0x41));
/// // EOI.
/// chip.lapic_mmio_write(1, 0xb0, &0u32.to_le_bytes(), 0);
/// assert!(!chip.has_interrupt(1));
/// ```
#[derive(Debug)]
pub struct UserIrqChip {
    state: Mutex<ChipState>,
    wake: Vec<Condvar>,
    /// How many vCPUs sleep in [`UserIrqChip::wait`] (`waiting` is `Some`).
    sleeping: AtomicUsize,
    /// Per vCPU: something was pending when the chip was last changed (see
    /// [`UserIrqChip::event_hint`]).
    hint: Vec<Arc<AtomicBool>>,
    /// Per vCPU: called when an event becomes pending for it, for a vCPU that runs guest
    /// code where neither the condvar nor the hint flag reaches it (KVM_RUN in the hybrid
    /// accelerator).
    notifiers: Vec<OnceLock<EventNotifier>>,
    timer_hz: u64,
    tsc_hz: u64,
}

/// What [`UserIrqChip::set_event_notifier`] registers.
pub struct EventNotifier(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for EventNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventNotifier")
    }
}

/// The chip's lock. The vCPUs a change woke are notified once it is let go: a vCPU woken
/// while the waker still holds the lock wakes only to block on it again, and with more
/// vCPUs than host CPUs those extra sleeps and wake-ups were a third of an 8-vCPU guest's
/// host thread wake-ups while it loaded modules (an IPI to every vCPU each time).
struct ChipGuard<'a> {
    st: Option<MutexGuard<'a, ChipState>>,
    wake: &'a [Condvar],
}

impl ChipGuard<'_> {
    /// Lets the lock go while `cpu` sleeps on its condvar for up to `timeout`.
    fn wait_timeout(&mut self, cpu: usize, timeout: Duration) {
        let Some(cv) = self.wake.get(cpu) else { return };
        let Some(mut st) = self.st.take() else { return };
        // Rare (interrupts held for a halt went out just now): these go before the lock
        // is let go, as the wait lets it go only once asleep.
        notify_each(self.wake, &std::mem::take(&mut st.to_wake));
        let (st, _) = cv
            .wait_timeout(st, timeout)
            .unwrap_or_else(|p| p.into_inner());
        self.st = Some(st);
    }
}

impl std::ops::Deref for ChipGuard<'_> {
    type Target = ChipState;
    fn deref(&self) -> &ChipState {
        self.st
            .as_deref()
            .expect("the chip guard holds its lock until dropped")
    }
}

impl std::ops::DerefMut for ChipGuard<'_> {
    fn deref_mut(&mut self) -> &mut ChipState {
        self.st
            .as_deref_mut()
            .expect("the chip guard holds its lock until dropped")
    }
}

impl Drop for ChipGuard<'_> {
    fn drop(&mut self) {
        let Some(mut st) = self.st.take() else { return };
        if st.to_wake.is_empty() {
            return;
        }
        let wakes = std::mem::take(&mut st.to_wake);
        drop(st);
        notify_each(self.wake, &wakes);
    }
}

/// Wakes whoever waits on the condvars of `cpus`.
fn notify_each(wake: &[Condvar], cpus: &[usize]) {
    for cv in cpus.iter().filter_map(|&cpu| wake.get(cpu)) {
        cv.notify_all();
    }
}

impl UserIrqChip {
    /// The port ranges (base, length) to map a [`ChipPio`] at: both 8259s, the ELCR,
    /// the PIT and port 0x61.
    pub const PIO_RANGES: [(u16, u16); 5] =
        [(0x20, 2), (0xa0, 2), (0x4d0, 2), (0x40, 4), (0x61, 1)];

    /// Controllers for `cpus` vCPUs (1 to [`MAX_CPUS`]) with APIC IDs 0..cpus, vCPU 0 the
    /// BSP. LAPIC timers count at `timer_hz` (see [`super::lapic::DEFAULT_TIMER_HZ`]);
    /// the guest TSC runs at `tsc_hz`. The VMM should state both in CPUID 0x15/0x16.
    pub fn new(cpus: u32, timer_hz: u64, tsc_hz: u64) -> Self {
        let n = cpus.clamp(1, MAX_CPUS);
        let lapics = (0..n)
            .map(|id| Lapic::with_clocks(id, id == 0, timer_hz, tsc_hz))
            .collect();
        let n = n as usize;
        UserIrqChip {
            state: Mutex::new(ChipState {
                lapics,
                ioapic: IoApic::new(),
                pic: Pic::new(),
                pit: Pit::new(),
                startup: vec![Vec::new(); n],
                extint: vec![false; n],
                kicked: vec![false; n],
                waiting: vec![None; n],
                held: Vec::new(),
                held_until: None,
                to_wake: Vec::new(),
            }),
            wake: (0..n).map(|_| Condvar::new()).collect(),
            sleeping: AtomicUsize::new(0),
            hint: (0..n).map(|_| Arc::new(AtomicBool::new(false))).collect(),
            notifiers: (0..n).map(|_| OnceLock::new()).collect(),
            timer_hz: timer_hz.max(1),
            tsc_hz: tsc_hz.max(1),
        }
    }

    /// A snapshot of every controller.
    pub fn state(&self) -> UserIrqChipState {
        let mut st = self.lock();
        // Interrupts held back go into the controllers' state rather than be lost.
        if st.release_held() {
            self.notify(&mut st);
        }
        let (pic_master, pic_slave) = st.pic.state();
        let (pit_channels, pit_speaker) = st.pit.state();
        UserIrqChipState {
            lapics: st.lapics.iter().map(Lapic::state).collect(),
            ioapic: st.ioapic.state().clone(),
            pic_master: pic_master.clone(),
            pic_slave: pic_slave.clone(),
            pit_channels,
            pit_speaker,
            startup: st.startup.clone(),
            extint: st.extint.clone(),
        }
    }

    /// A chip restored from a snapshot; its vCPU count is the number of LAPICs in it
    /// (at least one).
    pub fn from_state(state: &UserIrqChipState) -> Self {
        let mut lapics: Vec<Lapic> = state
            .lapics
            .iter()
            .take(MAX_CPUS as usize)
            .map(Lapic::from_state)
            .collect();
        if lapics.is_empty() {
            lapics.push(Lapic::new(0, true));
        }
        let n = lapics.len();
        let mut startup = state.startup.clone();
        startup.resize(n, Vec::new());
        for q in &mut startup {
            q.truncate(MAX_STARTUP_EVENTS);
        }
        let mut extint = state.extint.clone();
        extint.resize(n, false);
        let st = ChipState {
            lapics,
            ioapic: IoApic::from_state(state.ioapic.clone()),
            pic: Pic::from_state(state.pic_master.clone(), state.pic_slave.clone()),
            pit: Pit::from_state(state.pit_channels.clone(), state.pit_speaker),
            startup,
            extint,
            kicked: vec![false; n],
            waiting: vec![None; n],
            held: Vec::new(),
            held_until: None,
            to_wake: Vec::new(),
        };
        let (timer_hz, tsc_hz) = st
            .lapics
            .first()
            .map_or((1, 1), |l| (l.timer_hz(), l.tsc_hz()));
        let chip = UserIrqChip {
            state: Mutex::new(st),
            wake: (0..n).map(|_| Condvar::new()).collect(),
            sleeping: AtomicUsize::new(0),
            hint: (0..n).map(|_| Arc::new(AtomicBool::new(false))).collect(),
            notifiers: (0..n).map(|_| OnceLock::new()).collect(),
            timer_hz,
            tsc_hz,
        };
        chip.notify(&mut chip.lock());
        chip
    }

    /// Puts every controller in the state `state` describes (a snapshot of a chip
    /// with as many vCPUs), then lets each vCPU look for events again. Refused, with
    /// nothing changed, for another vCPU count.
    pub fn restore(&self, state: &UserIrqChipState) -> Result<(), ChipStateError> {
        let n = self.wake.len();
        if state.lapics.len() != n {
            return Err(ChipStateError::CpuCount {
                chip: n,
                snapshot: state.lapics.len(),
            });
        }
        let fresh = Self::from_state(state)
            .state
            .into_inner()
            .unwrap_or_else(|p| p.into_inner());
        {
            let mut st = self.lock();
            // Which vCPUs sleep is this process's, not the snapshot's.
            let waiting = std::mem::take(&mut st.waiting);
            *st = fresh;
            st.waiting = waiting;
            self.notify(&mut st);
        }
        for cpu in 0..n {
            self.kick(cpu as u32);
        }
        Ok(())
    }

    /// The LAPIC timer's input clock, for CPUID 0x15 (crystal) / 0x16 (bus).
    pub fn timer_hz(&self) -> u64 {
        self.timer_hz
    }

    /// The guest TSC frequency IA32_TSC_DEADLINE is counted in.
    pub fn tsc_hz(&self) -> u64 {
        self.tsc_hz
    }

    /// The guest TSC at `now_ns`, as the LAPIC's TSC-deadline timer counts it (0 at VM
    /// start): RDTSC should return this so deadlines fire when the guest expects.
    pub fn guest_tsc(&self, now_ns: u64) -> u64 {
        super::ns_to_ticks(now_ns, self.tsc_hz)
    }

    /// The number of vCPUs.
    pub fn cpus(&self) -> u32 {
        self.wake.len() as u32
    }

    fn lock(&self) -> ChipGuard<'_> {
        // A panic elsewhere while holding the lock leaves the state usable.
        ChipGuard {
            st: Some(self.state.lock().unwrap_or_else(|p| p.into_inner())),
            wake: &self.wake,
        }
    }

    /// Sets whether `cpu` sleeps in `wait` (and how), keeping count of sleepers; the old value.
    fn set_waiting(&self, st: &mut ChipState, cpu: usize, w: Option<bool>) -> Option<bool> {
        let old = std::mem::replace(&mut st.waiting[cpu], w);
        match (old.is_some(), w.is_some()) {
            (false, true) => {
                self.sleeping.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                self.sleeping.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
        old
    }

    /// How many vCPUs are not asleep in [`UserIrqChip::wait`]: running, waiting for a host
    /// CPU, or polling for an event. A halted vCPU may poll on a host CPU nobody else
    /// needs (see the emu accelerator's halt polling).
    pub fn awake_cpus(&self) -> usize {
        self.wake
            .len()
            .saturating_sub(self.sleeping.load(Ordering::Relaxed))
    }

    /// Wake the vCPUs that now have something to do.
    fn notify(&self, st: &mut ChipState) {
        for (cpu, hint) in self.hint.iter().enumerate() {
            let event = st.has_event(cpu, true);
            hint.store(event, Ordering::Release);
            if let Some(interruptible) = st.waiting[cpu] {
                if st.has_event(cpu, interruptible) {
                    self.set_waiting(st, cpu, None);
                    st.to_wake.push(cpu);
                }
            }
            if event {
                if let Some(n) = self.notifiers.get(cpu).and_then(OnceLock::get) {
                    (n.0)();
                }
            }
        }
    }

    /// After a change that concerns `cpu` alone (it took an interrupt, NMI or startup
    /// message, or its own timer fired): its hint is all that can have changed, and no
    /// other vCPU needs waking.
    fn refresh_hint(&self, st: &ChipState, cpu: usize) {
        if let Some(hint) = self.hint.get(cpu) {
            hint.store(st.has_event(cpu, true), Ordering::Release);
        }
    }

    /// Have `f` called (under the chip's lock: it must not call back into the chip)
    /// whenever an event becomes or stays pending for `cpu`, and on [`UserIrqChip::kick`].
    /// One notifier per vCPU; false if `cpu` is out of range or already has one.
    pub fn set_event_notifier(&self, cpu: u32, f: Arc<dyn Fn() + Send + Sync>) -> bool {
        self.index(cpu)
            .and_then(|i| self.notifiers.get(i))
            .is_some_and(|slot| slot.set(EventNotifier(f)).is_ok())
    }

    /// The flag behind [`UserIrqChip::event_hint`] for `cpu`, for a CPU loop that polls
    /// it without holding the chip (the emulator checks it between blocks, so an
    /// interrupt raised by another thread is taken promptly).
    pub fn event_flag(&self, cpu: u32) -> Option<Arc<AtomicBool>> {
        self.hint.get(cpu as usize).cloned()
    }

    /// A lock-free hint for the CPU loop's hot path: false means nothing (no interrupt,
    /// NMI or startup message) was pending for `cpu` after the chip's last change, so
    /// the locking calls can be skipped; true means ask [`UserIrqChip::has_interrupt`]
    /// and friends. Timers only change it through [`UserIrqChip::tick`].
    pub fn event_hint(&self, cpu: u32) -> bool {
        self.hint
            .get(cpu as usize)
            .is_some_and(|h| h.load(Ordering::Acquire))
    }

    /// CR8 (TPR bits 7–4) of `cpu`'s LAPIC, for MOV from CR8.
    pub fn cr8(&self, cpu: u32) -> u64 {
        self.index(cpu)
            .map_or(0, |i| u64::from(self.lock().lapics[i].tpr() >> 4))
    }

    /// MOV to CR8: TPR = `cr8` << 4 (bits 63–4 of `cr8` are the caller's #GP check).
    pub fn set_cr8(&self, cpu: u32, cr8: u64) {
        let Some(i) = self.index(cpu) else { return };
        let mut st = self.lock();
        st.lapics[i].set_tpr(((cr8 & 0xf) << 4) as u32);
        self.notify(&mut st);
    }

    fn index(&self, cpu: u32) -> Option<usize> {
        let i = cpu as usize;
        (i < self.wake.len()).then_some(i)
    }

    /// Drive GSI `gsi` high or low (see the module documentation for the routing).
    pub fn set_irq_line(&self, gsi: u32, active: bool) {
        let mut st = self.lock();
        st.set_irq_line(gsi, active);
        self.notify(&mut st);
    }

    /// Deliver the MSI with this address/data pair. Addresses outside 0xfeexxxxx and
    /// reserved delivery modes are dropped.
    pub fn signal_msi(&self, address: u64, data: u32) {
        let Some(delivery) = msi_delivery(address, data) else {
            return;
        };
        let mut st = self.lock();
        st.deliver_message(delivery);
        self.notify(&mut st);
    }

    /// An edge on `gsi` that may wait while every vCPU is busy: it goes out when one of
    /// them halts ([`UserIrqChip::wait`]), or with the first [`UserIrqChip::tick`] after
    /// `max_delay`; at once if a vCPU is halted now. A device's completions that come
    /// while the guest is still submitting more so share one interrupt, as a NIC's
    /// interrupt moderation does, without delaying a guest that waits for them.
    pub fn pulse_irq_line_moderated(&self, gsi: u32, max_delay: Duration) {
        self.hold(Held::Edge(gsi), max_delay);
    }

    /// [`UserIrqChip::signal_msi`], held back as
    /// [`UserIrqChip::pulse_irq_line_moderated`] holds an edge.
    pub fn signal_msi_moderated(&self, address: u64, data: u32, max_delay: Duration) {
        if msi_delivery(address, data).is_some() {
            self.hold(Held::Msi(address, data), max_delay);
        }
    }

    /// An MSI that a guest with several vCPUs gets when its destination halts, not while
    /// that vCPU is still running guest code (even if another vCPU idles, or halts again
    /// after its timer tick), at most `max_delay` later; at once where its destination is
    /// halted, and on a chip with one vCPU.
    ///
    /// For a completion a vCPU serves within the notify of a queue that a kernel thread
    /// of the guest kicked on behalf of a task that sleeps (Linux issues a plugged write
    /// from the writer's `schedule`, through a kblockd worker): delivered at once, it
    /// lands while that worker still runs, so the guest's scheduler wakes the task on
    /// another, idle vCPU, which then has to be woken by an IPI — a host thread wake-up
    /// per request, and the task moving between vCPUs on every request. Held until the
    /// worker's vCPU halts, it wakes the task there. One vCPU has no other to move to.
    pub fn signal_msi_at_halt(&self, address: u64, data: u32, max_delay: Duration) {
        if let Some(d) = msi_delivery(address, data) {
            let dest = d.dest;
            self.hold_with(Held::MsiAtHalt(address, data), max_delay, |st| {
                st.lapics.len() < 2
                    || st
                        .lapics
                        .iter()
                        .zip(&st.waiting)
                        .any(|(l, w)| w.is_some() && l.matches_destination(&dest, NO_SENDER))
            });
        }
    }

    /// [`UserIrqChip::signal_msi_at_halt`] for an edge on `gsi` (its destination not
    /// looked up: it goes at once when every vCPU is halted).
    pub fn pulse_irq_line_at_halt(&self, gsi: u32, max_delay: Duration) {
        self.hold_with(Held::Edge(gsi), max_delay, |st| {
            st.lapics.len() < 2 || st.waiting.iter().all(Option::is_some)
        });
    }

    fn hold(&self, irq: Held, max_delay: Duration) {
        self.hold_with(irq, max_delay, |st| st.waiting.iter().any(Option::is_some));
    }

    /// Holds `irq` (see [`UserIrqChip::pulse_irq_line_moderated`]) unless `now` says it
    /// goes out at once.
    fn hold_with(&self, irq: Held, max_delay: Duration, now: impl FnOnce(&ChipState) -> bool) {
        let at = Instant::now();
        let mut st = self.lock();
        let go = now(&st);
        let overdue = st.held_until.is_some_and(|due| at >= due);
        if overdue || st.held.len() >= MAX_HELD {
            st.release_held();
            st.deliver_held(irq);
            self.notify(&mut st);
            return;
        }
        if go || max_delay.is_zero() {
            st.release_held_at(None);
            st.deliver_held(irq);
            self.notify(&mut st);
            return;
        }
        if !st.held.contains(&irq) {
            st.held.push(irq);
        }
        let due = at.checked_add(max_delay).unwrap_or(at);
        st.held_until = Some(st.held_until.map_or(due, |d| d.min(due)));
    }

    /// Whether interrupts are held back (see [`UserIrqChip::pulse_irq_line_moderated`]).
    pub fn holds_interrupts(&self) -> bool {
        !self.lock().held.is_empty()
    }

    /// Delivers the interrupts held back now.
    pub fn release_held(&self) {
        let mut st = self.lock();
        if st.release_held() {
            self.notify(&mut st);
        }
    }

    /// Deliver an NMI to `cpu` (a platform NMI, e.g. from the VMM's API).
    pub fn inject_nmi(&self, cpu: u32) {
        let Some(i) = self.index(cpu) else { return };
        let mut st = self.lock();
        st.lapics[i].deliver_nmi();
        self.notify(&mut st);
    }

    /// The platform NMI line: an edge on every LAPIC's LINT1, delivered as each LVT says
    /// (NMI in virtual-wire setups).
    pub fn raise_lint1(&self) {
        let mut st = self.lock();
        for l in &mut st.lapics {
            l.trigger_lint1();
        }
        self.notify(&mut st);
    }

    /// Whether a maskable interrupt is waiting for `cpu` (LAPIC, or the 8259 on vCPU 0).
    pub fn has_interrupt(&self, cpu: u32) -> bool {
        self.index(cpu)
            .is_some_and(|i| self.lock().has_interrupt(i))
    }

    /// The vector [`UserIrqChip::acknowledge_interrupt`] would return now.
    pub fn pending_interrupt(&self, cpu: u32) -> Option<u8> {
        let i = self.index(cpu)?;
        let st = self.lock();
        if st.extint[i] || (st.pic_reaches(i) && st.pic.interrupt_pending()) {
            return st.pic.pending_vector();
        }
        st.lapics[i].pending_vector()
    }

    /// INTA for `cpu`: the vector to inject, now in service. ExtINT (the 8259, through
    /// LINT0 on vCPU 0 or an ExtINT message) comes before the LAPIC's fixed interrupts.
    pub fn acknowledge_interrupt(&self, cpu: u32) -> Option<u8> {
        let i = self.index(cpu)?;
        let mut st = self.lock();
        if std::mem::take(&mut st.extint[i]) || (st.pic_reaches(i) && st.pic.interrupt_pending()) {
            // The 8259 is shared: its next request may be another vCPU's event.
            let vector = st.pic.acknowledge();
            self.notify(&mut st);
            return vector;
        }
        let vector = st.lapics[i].acknowledge();
        self.refresh_hint(&st, i);
        vector
    }

    /// Whether an NMI is waiting for `cpu`.
    pub fn nmi_pending(&self, cpu: u32) -> bool {
        self.index(cpu)
            .is_some_and(|i| self.lock().lapics[i].nmi_pending())
    }

    /// Take `cpu`'s pending NMI, if any.
    pub fn take_nmi(&self, cpu: u32) -> bool {
        let Some(i) = self.index(cpu) else {
            return false;
        };
        let mut st = self.lock();
        let nmi = st.lapics[i].take_nmi();
        self.refresh_hint(&st, i);
        nmi
    }

    /// INIT and SIPI messages `cpu` received since the last call, oldest first.
    pub fn take_startup_events(&self, cpu: u32) -> Vec<StartupEvent> {
        let Some(i) = self.index(cpu) else {
            return Vec::new();
        };
        let mut st = self.lock();
        let events = std::mem::take(&mut st.startup[i]);
        self.refresh_hint(&st, i);
        events
    }

    /// Where `cpu`'s xAPIC page is (IA32_APIC_BASE), if its APIC is in xAPIC mode: the
    /// CPU loop sends accesses to that page to [`UserIrqChip::lapic_mmio_read`]/`write`.
    pub fn lapic_mmio_base(&self, cpu: u32) -> Option<u64> {
        let i = self.index(cpu)?;
        let st = self.lock();
        let l = &st.lapics[i];
        (l.mode() == super::lapic::ApicMode::XApic).then(|| l.base_address())
    }

    /// A read of `cpu`'s xAPIC page at `offset`.
    pub fn lapic_mmio_read(&self, cpu: u32, offset: u64, data: &mut [u8], now_ns: u64) {
        match self.index(cpu) {
            Some(i) => self.lock().lapics[i].mmio_read(offset, data, now_ns),
            None => data.fill(0),
        }
    }

    /// A write of `cpu`'s xAPIC page at `offset`: IPIs and EOIs take effect here.
    pub fn lapic_mmio_write(&self, cpu: u32, offset: u64, data: &[u8], now_ns: u64) {
        let Some(i) = self.index(cpu) else { return };
        let mut st = self.lock();
        let ipi = st.lapics[i].mmio_write(offset, data, now_ns);
        st.after_lapic_write(i, ipi);
        self.notify(&mut st);
    }

    /// RDMSR of an APIC MSR (see [`Lapic::handles_msr`]); `None` means #GP.
    pub fn lapic_msr_read(&self, cpu: u32, msr: u32, now_ns: u64) -> Option<u64> {
        let i = self.index(cpu)?;
        self.lock().lapics[i].msr_read(msr, now_ns)
    }

    /// WRMSR of an APIC MSR; an error means #GP.
    pub fn lapic_msr_write(
        &self,
        cpu: u32,
        msr: u32,
        value: u64,
        now_ns: u64,
    ) -> Result<(), ApicError> {
        let i = self.index(cpu).ok_or(ApicError::NoSuchCpu(cpu))?;
        let mut st = self.lock();
        let ipi = st.lapics[i].msr_write(msr, value, now_ns)?;
        st.after_lapic_write(i, ipi);
        self.notify(&mut st);
        Ok(())
    }

    /// A read of the IOAPIC page at `offset`.
    pub fn ioapic_mmio_read(&self, offset: u64, data: &mut [u8]) {
        self.lock().ioapic.mmio_read(offset, data);
    }

    /// A write of the IOAPIC page at `offset`.
    pub fn ioapic_mmio_write(&self, offset: u64, data: &[u8]) {
        let mut st = self.lock();
        if let Some(d) = st.ioapic.mmio_write(offset, data) {
            st.deliver_message(d);
        }
        self.notify(&mut st);
    }

    /// A port read of the 8259s, ELCR, PIT or port 0x61 (absolute `port`); other ports
    /// read 0xff.
    pub fn pio_read(&self, port: u16, data: &mut [u8], now_ns: u64) {
        let mut st = self.lock();
        match port {
            0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1 => {
                st.pic.read_port(port, data);
                // A poll read acknowledges.
                self.notify(&mut st);
            }
            0x40..=0x43 => st.pit.read(u64::from(port - 0x40), data, now_ns),
            0x61 => super::fill_byte(data, st.pit.read_port61(now_ns)),
            _ => data.fill(0xff),
        }
    }

    /// A port write of the 8259s, ELCR, PIT or port 0x61 (absolute `port`).
    pub fn pio_write(&self, port: u16, data: &[u8], now_ns: u64) {
        let mut st = self.lock();
        match port {
            0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1 => st.pic.write_port(port, data),
            0x40..=0x43 => {
                st.pit.write(u64::from(port - 0x40), data, now_ns);
                // vCPU 0's deadline moved: let it recompute its sleep.
                st.kicked[0] = true;
                if self.set_waiting(&mut st, 0, None).is_some() {
                    st.to_wake.push(0);
                }
            }
            0x61 => {
                if let Some(v) = super::first_byte(data) {
                    st.pit.write_port61(v, now_ns);
                }
            }
            _ => tracing::debug!(port, "irqchip: write to an unknown port"),
        }
        self.notify(&mut st);
    }

    /// When `cpu` next needs [`UserIrqChip::tick`]: its LAPIC timer and, for vCPU 0, the
    /// PIT.
    pub fn next_deadline_ns(&self, cpu: u32) -> Option<u64> {
        let i = self.index(cpu)?;
        let st = self.lock();
        let lapic = st.lapics[i].next_deadline_ns();
        let pit = if i == 0 {
            st.pit.next_deadline_ns()
        } else {
            None
        };
        match (lapic, pit) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Advance every timer to `now_ns`: PIT edges pulse ISA IRQ 0, due LAPIC timers
    /// raise their vectors, and the vCPUs with something pending are woken.
    pub fn tick(&self, now_ns: u64) {
        let mut st = self.lock();
        st.tick_shared(now_ns);
        for l in &mut st.lapics {
            l.tick(now_ns);
        }
        self.notify(&mut st);
    }

    /// [`UserIrqChip::tick`] as `cpu`'s CPU loop calls it: the PIT and held interrupts as
    /// there, but of the local APICs only `cpu`'s own. Another vCPU's timer is its own
    /// loop's business (a halted one sleeps until its deadline), so a busy vCPU neither
    /// walks every LAPIC nor wakes anyone unless the PIT or a held interrupt did fire.
    pub fn tick_cpu(&self, cpu: u32, now_ns: u64) {
        let Some(i) = self.index(cpu) else { return };
        let mut st = self.lock();
        let shared = st.tick_shared(now_ns);
        st.lapics[i].tick(now_ns);
        if shared {
            self.notify(&mut st);
        } else {
            self.refresh_hint(&st, i);
        }
    }

    /// Make `cpu`'s current or next [`UserIrqChip::wait`] return (e.g. to pause it).
    pub fn kick(&self, cpu: u32) {
        let Some(i) = self.index(cpu) else { return };
        let mut st = self.lock();
        st.kicked[i] = true;
        if self.set_waiting(&mut st, i, None).is_some() {
            st.to_wake.push(i);
        }
        if let Some(n) = self.notifiers.get(i).and_then(OnceLock::get) {
            (n.0)();
        }
    }

    /// `cpu` halts: the interrupts held for a halt go out now, as at the start of
    /// [`UserIrqChip::wait`], for a vCPU that polls for its next event before it sleeps.
    pub fn halting(&self, cpu: u32) {
        let Some(i) = self.index(cpu) else { return };
        let mut st = self.lock();
        if st.release_held_at(Some(i)) {
            self.notify(&mut st);
        }
    }

    /// Sleep a halted `cpu` until it has an event or `timeout` passes. Events: an NMI,
    /// INIT/SIPI, a kick, and — if `interruptible` (the guest's RFLAGS.IF) — a maskable
    /// interrupt. True if woken by an event, false on timeout. Timers are not advanced
    /// here: the caller passes the time to its next deadline and then calls `tick`.
    pub fn wait(&self, cpu: u32, timeout: Duration, interruptible: bool) -> bool {
        let Some(i) = self.index(cpu) else {
            return false;
        };
        let deadline = Instant::now().checked_add(timeout);
        let mut st = self.lock();
        // A vCPU halts: the interrupts held while all of them were busy go out now (those
        // held for another, busy destination stay held).
        if st.release_held_at(Some(i)) {
            self.notify(&mut st);
        }
        let woken = loop {
            if std::mem::take(&mut st.kicked[i]) || st.has_event(i, interruptible) {
                break true;
            }
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left,
                    _ => break false,
                },
                None => Duration::from_secs(3600),
            };
            self.set_waiting(&mut st, i, Some(interruptible));
            st.wait_timeout(i, left);
        };
        self.set_waiting(&mut st, i, None);
        woken
    }
}

/// The delivery an MSI address/data pair asks for; None (and a debug line) for an
/// address outside 0xfeexxxxx or a reserved delivery mode, which are dropped.
fn msi_delivery(address: u64, data: u32) -> Option<Delivery> {
    if address & MSI_ADDRESS_MASK != MSI_ADDRESS_BASE {
        tracing::debug!(address, data, "MSI to a non-interrupt address dropped");
        return None;
    }
    let Some(mode) = DeliveryMode::from_bits(data >> 8) else {
        tracing::debug!(address, data, "MSI with a reserved delivery mode dropped");
        return None;
    };
    let id = ((address >> MSI_DEST_SHIFT) & 0xff) as u32;
    Some(Delivery {
        dest: if address & MSI_DEST_LOGICAL != 0 {
            Destination::Logical(id)
        } else {
            Destination::Physical(id)
        },
        vector: data as u8,
        mode,
        trigger: if data & MSI_TRIGGER_LEVEL != 0 {
            Trigger::Level
        } else {
            Trigger::Edge
        },
    })
}

impl hypervisor::IrqChip for UserIrqChip {
    fn set_irq_line(&self, gsi: u32, active: bool) -> hypervisor::Result<()> {
        UserIrqChip::set_irq_line(self, gsi, active);
        Ok(())
    }

    fn signal_msi(&self, address: u64, data: u32) -> hypervisor::Result<()> {
        UserIrqChip::signal_msi(self, address, data);
        Ok(())
    }

    fn moderates(&self) -> bool {
        true
    }

    fn pulse_irq_line_moderated(&self, gsi: u32, max_delay: Duration) -> hypervisor::Result<()> {
        UserIrqChip::pulse_irq_line_moderated(self, gsi, max_delay);
        Ok(())
    }

    fn signal_msi_moderated(
        &self,
        address: u64,
        data: u32,
        max_delay: Duration,
    ) -> hypervisor::Result<()> {
        UserIrqChip::signal_msi_moderated(self, address, data, max_delay);
        Ok(())
    }

    fn release_moderated(&self) {
        UserIrqChip::release_held(self);
    }

    fn pulse_irq_line_at_halt(&self, gsi: u32, max_delay: Duration) -> hypervisor::Result<()> {
        UserIrqChip::pulse_irq_line_at_halt(self, gsi, max_delay);
        Ok(())
    }

    fn signal_msi_at_halt(
        &self,
        address: u64,
        data: u32,
        max_delay: Duration,
    ) -> hypervisor::Result<()> {
        UserIrqChip::signal_msi_at_halt(self, address, data, max_delay);
        Ok(())
    }
}

/// One of [`UserIrqChip::PIO_RANGES`] on a port bus: offsets are added to `base`, and
/// the time comes from `clock`.
pub struct ChipPio {
    chip: Arc<UserIrqChip>,
    base: u16,
    clock: Arc<dyn Clock>,
}

impl ChipPio {
    pub fn new(chip: Arc<UserIrqChip>, base: u16, clock: Arc<dyn Clock>) -> Self {
        ChipPio { chip, base, clock }
    }

    fn port(&self, offset: u64) -> Option<u16> {
        u16::try_from(offset)
            .ok()
            .and_then(|o| self.base.checked_add(o))
    }
}

impl BusDevice for ChipPio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.port(offset) {
            Some(port) => self.chip.pio_read(port, data, self.clock.now_ns()),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(port) = self.port(offset) {
            self.chip.pio_write(port, data, self.clock.now_ns());
        }
    }
}

/// The IOAPIC page on an MMIO bus (map it at [`super::ioapic::IOAPIC_BASE`]).
pub struct IoApicMmio {
    chip: Arc<UserIrqChip>,
}

impl IoApicMmio {
    pub fn new(chip: Arc<UserIrqChip>) -> Self {
        IoApicMmio { chip }
    }
}

impl BusDevice for IoApicMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.chip.ioapic_mmio_read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.chip.ioapic_mmio_write(offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irqchip::lapic::DEFAULT_TIMER_HZ;
    use crate::irqchip::pit::PIT_HZ;

    fn chip(cpus: u32) -> UserIrqChip {
        let c = UserIrqChip::new(cpus, DEFAULT_TIMER_HZ, 2_000_000_000);
        for cpu in 0..cpus {
            lapic_write(&c, cpu, 0xf0, 0x1ff);
        }
        c
    }

    fn lapic_write(c: &UserIrqChip, cpu: u32, off: u64, v: u32) {
        c.lapic_mmio_write(cpu, off, &v.to_le_bytes(), 0);
    }

    fn route(c: &UserIrqChip, pin: u32, low: u32, dest: u8) {
        c.ioapic_mmio_write(0, &[0x11 + 2 * pin as u8]);
        c.ioapic_mmio_write(0x10, &(u32::from(dest) << 24).to_le_bytes());
        c.ioapic_mmio_write(0, &[0x10 + 2 * pin as u8]);
        c.ioapic_mmio_write(0x10, &low.to_le_bytes());
    }

    fn linux_pic_init(c: &UserIrqChip) {
        for (port, v) in [
            (0x20, 0x11),
            (0x21, 0x30),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xa0, 0x11),
            (0xa1, 0x38),
            (0xa1, 0x02),
            (0xa1, 0x01),
            (0x21, 0x00),
            (0xa1, 0x00),
        ] {
            c.pio_write(port, &[v], 0);
        }
    }

    #[test]
    fn ioapic_gsi_reaches_the_right_lapic() {
        let c = chip(2);
        route(&c, 4, 0x0000_0034, 1); // edge, fixed, physical 1
        c.set_irq_line(4, true);
        assert!(!c.has_interrupt(0));
        assert_eq!(c.pending_interrupt(1), Some(0x34));
        assert_eq!(c.acknowledge_interrupt(1), Some(0x34));
        lapic_write(&c, 1, 0xb0, 0);
        c.set_irq_line(4, false);
        // Level-triggered pin 10 to CPU 0: EOI re-delivers while the line is high.
        route(&c, 10, 0x0000_803a, 0);
        c.set_irq_line(10, true);
        assert_eq!(c.acknowledge_interrupt(0), Some(0x3a));
        assert!(!c.has_interrupt(0));
        lapic_write(&c, 0, 0xb0, 0);
        assert_eq!(c.acknowledge_interrupt(0), Some(0x3a));
        c.set_irq_line(10, false);
        lapic_write(&c, 0, 0xb0, 0);
        assert!(!c.has_interrupt(0));
        // Logical flat: CPU 1 has LDR bit 1.
        lapic_write(&c, 1, 0xd0, 0x0200_0000);
        route(&c, 5, 0x0000_0935, 0x02);
        c.set_irq_line(5, true);
        assert_eq!(c.acknowledge_interrupt(1), Some(0x35));
    }

    #[test]
    fn pic_reaches_cpu0_through_extint() {
        let c = chip(2);
        linux_pic_init(&c);
        c.set_irq_line(1, true);
        assert!(c.has_interrupt(0));
        assert!(!c.has_interrupt(1));
        assert_eq!(c.pending_interrupt(0), Some(0x31));
        assert_eq!(c.acknowledge_interrupt(0), Some(0x31));
        c.pio_write(0x20, &[0x20], 0);
        c.set_irq_line(1, false);
        // The PIT through IRQ 0: Linux's periodic setup, then a tick at its deadline.
        c.pio_write(0x43, &[0x34], 0);
        c.pio_write(0x40, &[0xa9], 0);
        c.pio_write(0x40, &[0x04], 0); // 1193
        let d = c.next_deadline_ns(0).unwrap();
        assert_eq!(d, (1193 * 1_000_000_000u64).div_ceil(PIT_HZ));
        assert_eq!(c.next_deadline_ns(1), None);
        c.tick(d);
        assert_eq!(c.acknowledge_interrupt(0), Some(0x30));
        c.pio_write(0x20, &[0x20], 0);
        // LINT0 masked: the PIC no longer reaches the CPU.
        lapic_write(&c, 0, 0x350, 0x1_0700);
        c.set_irq_line(3, true);
        assert!(!c.has_interrupt(0));
        // The same IRQ 0 also arrives on IOAPIC pin 2.
        route(&c, 2, 0x0000_0020, 1);
        c.tick(d + 2 * 1_000_000);
        assert_eq!(c.acknowledge_interrupt(1), Some(0x20));
    }

    #[test]
    fn extint_message_and_lint1_nmi() {
        let c = chip(2);
        linux_pic_init(&c);
        lapic_write(&c, 0, 0x350, 0x1_0700); // CPU 0's LINT0 masked
        c.set_irq_line(1, true);
        assert!(!c.has_interrupt(0));
        // An ExtINT message (an IOAPIC entry or MSI in mode 7) to CPU 1: its INTA is
        // answered by the 8259.
        c.signal_msi(0xfee0_1000, 0x0700);
        assert_eq!(c.pending_interrupt(1), Some(0x31));
        assert_eq!(c.acknowledge_interrupt(1), Some(0x31));
        assert!(!c.has_interrupt(1));
        // LINT1 as NMI on CPU 1 only (CPU 0's LINT1 is masked at reset).
        lapic_write(&c, 1, 0x360, 0x400);
        c.raise_lint1();
        assert!(!c.nmi_pending(0));
        assert!(c.take_nmi(1));
    }

    /// The order Linux brings the controllers up on the BSP: 8259 masked, LAPIC enabled,
    /// IOAPIC pin 2 for the PIT, check_timer's "timer IRQ works", LAPIC timer
    /// calibration against PIT ticks, then the TSC-deadline timer.
    #[test]
    fn linux_like_bring_up() {
        let c = UserIrqChip::new(1, DEFAULT_TIMER_HZ, 3_000_000_000);
        linux_pic_init(&c);
        c.pio_write(0x21, &[0xff], 0);
        c.pio_write(0xa1, &[0xff], 0);
        lapic_write(&c, 0, 0xf0, 0x1ff);
        lapic_write(&c, 0, 0x350, 0x1_0700); // LINT0 ExtINT, masked
        lapic_write(&c, 0, 0x360, 0x400); // LINT1 NMI
        lapic_write(&c, 0, 0x280, 0);
        route(&c, 2, 0x0000_00ec, 0); // pin 2: edge, fixed, vector 0xec
                                      // PIT periodic at HZ = 250.
        c.pio_write(0x43, &[0x34], 0);
        c.pio_write(0x40, &[(4773 & 0xff) as u8], 0);
        c.pio_write(0x40, &[(4773 >> 8) as u8], 0);
        let mut jiffies = 0;
        let mut now = 0;
        while now < 40_000_000 {
            now = c.next_deadline_ns(0).unwrap();
            c.tick(now);
            while let Some(v) = c.acknowledge_interrupt(0) {
                assert_eq!(v, 0xec);
                jiffies += 1;
                lapic_write(&c, 0, 0xb0, 0);
            }
        }
        assert_eq!(jiffies, 10);
        // Calibration: periodic LAPIC timer, divide by 16, masked, read at two ticks.
        lapic_write(&c, 0, 0x3e0, 0x3);
        lapic_write(&c, 0, 0x320, 0x3_00ef);
        c.lapic_mmio_write(0, 0x380, &(u32::MAX / 16).to_le_bytes(), now);
        let read_count = |at: u64| {
            let mut b = [0u8; 4];
            c.lapic_mmio_read(0, 0x390, &mut b, at);
            u32::from_le_bytes(b)
        };
        let t0 = c.next_deadline_ns(0).unwrap();
        c.tick(t0);
        let first = read_count(t0);
        let mut t = t0;
        for _ in 0..25 {
            t = c.next_deadline_ns(0).unwrap();
            c.tick(t);
            while c.acknowledge_interrupt(0).is_some() {
                lapic_write(&c, 0, 0xb0, 0);
            }
        }
        let counted = u64::from(first - read_count(t));
        let expected = (t - t0) / 16;
        assert!(counted.abs_diff(expected) <= 1, "{counted} vs {expected}");
        // Linux's PIT shutdown, then a TSC deadline 1 ms ahead of the guest TSC.
        c.pio_write(0x43, &[0x30], t);
        lapic_write(&c, 0, 0x320, 0x4_00ef);
        assert_eq!(c.next_deadline_ns(0), None);
        let deadline = c.guest_tsc(t) + 3_000_000;
        c.lapic_msr_write(0, 0x6e0, deadline, t).unwrap();
        assert_eq!(c.next_deadline_ns(0), Some(t + 1_000_000));
        c.tick(t + 1_000_000);
        assert_eq!(c.acknowledge_interrupt(0), Some(0xef));
    }

    #[test]
    fn lowest_priority_picks_one() {
        let c = chip(3);
        for cpu in 0..3 {
            lapic_write(&c, cpu, 0xd0, 0x0100_0000 << cpu);
        }
        // Logical 0b110: CPUs 1 and 2 match; one of them gets it.
        lapic_write(&c, 0, 0x310, 0x0600_0000);
        lapic_write(&c, 0, 0x300, 0x0000_0960);
        let got: Vec<bool> = (0..3).map(|cpu| c.has_interrupt(cpu)).collect();
        assert_eq!(got.iter().filter(|&&g| g).count(), 1);
        assert!(!got[0]);
    }

    #[test]
    fn msi_decoding() {
        let c = chip(3);
        // Physical destination 2, vector 0x45, fixed, edge.
        c.signal_msi(0xfee0_2000, 0x0045);
        assert_eq!(c.acknowledge_interrupt(2), Some(0x45));
        assert!(!c.has_interrupt(0) && !c.has_interrupt(1));
        // Logical (flat, LDR bit 0 on CPU 1), lowest priority.
        lapic_write(&c, 1, 0xd0, 0x0100_0000);
        c.signal_msi(0xfee0_1004, 0x0146);
        assert_eq!(c.acknowledge_interrupt(1), Some(0x46));
        // Broadcast, NMI.
        c.signal_msi(0xfeef_f000, 0x0400);
        assert!((0..3).all(|cpu| c.nmi_pending(cpu)));
        assert!(c.take_nmi(0));
        assert!(!c.take_nmi(0));
        // Not an interrupt address, reserved mode: dropped.
        c.signal_msi(0xfed0_0000, 0x0047);
        c.signal_msi(0xfee0_0000, 0x0347);
        assert!(!(0..3).any(|cpu| c.has_interrupt(cpu)));
    }

    #[test]
    fn init_sipi_and_ipis() {
        let c = chip(3);
        // Linux's wakeup_secondary_cpu_via_init to APIC ID 1.
        lapic_write(&c, 0, 0x310, 0x0100_0000);
        lapic_write(&c, 0, 0x300, 0x0000_c500); // INIT assert, level
        lapic_write(&c, 0, 0x300, 0x0000_8500); // INIT de-assert
        lapic_write(&c, 0, 0x300, 0x0000_0608); // SIPI vector 8
        lapic_write(&c, 0, 0x300, 0x0000_0608);
        assert_eq!(
            c.take_startup_events(1),
            vec![
                StartupEvent::Init,
                StartupEvent::Sipi(8),
                StartupEvent::Sipi(8)
            ]
        );
        assert!(c.take_startup_events(1).is_empty());
        assert!(c.take_startup_events(2).is_empty());
        // INIT reset CPU 1's LAPIC to software-disabled.
        lapic_write(&c, 0, 0x300, 0x0000_0040);
        assert!(!c.has_interrupt(1));
        // All-but-self INIT.
        lapic_write(&c, 0, 0x300, 0x000c_4500);
        assert!(c.take_startup_events(0).is_empty());
        assert_eq!(c.take_startup_events(2), vec![StartupEvent::Init]);
        // Fixed IPIs: self, all including self.
        for cpu in 0..3 {
            lapic_write(&c, cpu, 0xf0, 0x1ff);
        }
        lapic_write(&c, 2, 0x300, 0x0004_0050);
        assert_eq!(c.pending_interrupt(2), Some(0x50));
        assert!(!c.has_interrupt(1));
        lapic_write(&c, 2, 0x300, 0x0008_0051);
        assert!((0..3).all(|cpu| c.pending_interrupt(cpu) == Some(0x51)));
        // x2APIC ICR through the MSR path.
        c.lapic_msr_write(1, 0x1b, 0xfee0_0c00, 0).unwrap();
        c.lapic_msr_write(1, 0x830, (2u64 << 32) | 0x60, 0).unwrap();
        assert_eq!(c.pending_interrupt(2), Some(0x60));
        assert_eq!(c.lapic_msr_read(1, 0x802, 0), Some(1));
        assert_eq!(c.lapic_mmio_base(1), None);
        assert_eq!(c.lapic_mmio_base(0), Some(0xfee0_0000));
        assert_eq!(c.lapic_mmio_base(5), None);
        assert_eq!(c.lapic_msr_read(0, 0x802, 0), None);
        assert_eq!(
            c.lapic_msr_write(7, 0x1b, 0, 0),
            Err(ApicError::NoSuchCpu(7))
        );
    }

    #[test]
    fn hint_and_cr8() {
        let c = chip(2);
        assert!(!c.event_hint(1));
        c.signal_msi(0xfee0_1000, 0x0052);
        assert!(c.event_hint(1));
        assert!(!c.event_hint(0));
        c.set_cr8(1, 5);
        assert_eq!(c.cr8(1), 5);
        assert!(!c.event_hint(1));
        assert!(!c.has_interrupt(1));
        let mut b = [0u8; 4];
        c.lapic_mmio_read(1, 0x80, &mut b, 0);
        assert_eq!(u32::from_le_bytes(b), 0x50);
        c.set_cr8(1, 0);
        assert!(c.event_hint(1));
        assert_eq!(c.acknowledge_interrupt(1), Some(0x52));
        assert!(!c.event_hint(1));
        assert!(!c.event_hint(99));
        assert_eq!(c.cr8(99), 0);
    }

    #[test]
    fn lapic_timer_through_the_chip() {
        let c = chip(2);
        lapic_write(&c, 1, 0x3e0, 0xb);
        lapic_write(&c, 1, 0x320, 0x41);
        c.lapic_mmio_write(1, 0x380, &1000u32.to_le_bytes(), 5000);
        assert_eq!(c.next_deadline_ns(1), Some(6000));
        let mut b = [0u8; 4];
        c.lapic_mmio_read(1, 0x390, &mut b, 5500);
        assert_eq!(u32::from_le_bytes(b), 500);
        c.tick(5999);
        assert!(!c.has_interrupt(1));
        c.tick(6000);
        assert_eq!(c.acknowledge_interrupt(1), Some(0x41));
        assert_eq!(c.next_deadline_ns(1), None);
    }

    #[test]
    fn moderated_interrupts_wait_for_a_halt() {
        let c = chip(1);
        route(&c, 5, 0x0000_0035, 0); // edge, fixed, physical 0
                                      // The vCPU is busy: the edge and the MSI are held, each once.
        c.pulse_irq_line_moderated(5, Duration::from_secs(60));
        c.pulse_irq_line_moderated(5, Duration::from_secs(60));
        c.signal_msi_moderated(0xfee0_0000, 0x0046, Duration::from_secs(60));
        assert!(c.holds_interrupts());
        assert!(!c.event_hint(0));
        assert!(!c.has_interrupt(0));
        // Timers ticking before the deadline leave them held.
        c.tick(1);
        assert!(!c.has_interrupt(0));
        // It halts: both go out and the wait returns at once.
        let start = Instant::now();
        assert!(c.wait(0, Duration::from_secs(20), true));
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(!c.holds_interrupts());
        assert_eq!(c.acknowledge_interrupt(0), Some(0x46));
        lapic_write(&c, 0, 0xb0, 0);
        assert_eq!(c.acknowledge_interrupt(0), Some(0x35));
        lapic_write(&c, 0, 0xb0, 0);
        assert!(!c.has_interrupt(0));
    }

    #[test]
    fn moderated_interrupts_have_a_deadline() {
        let c = chip(1);
        route(&c, 5, 0x0000_0035, 0);
        // No delay allowed: delivered at once.
        c.pulse_irq_line_moderated(5, Duration::ZERO);
        assert_eq!(c.acknowledge_interrupt(0), Some(0x35));
        lapic_write(&c, 0, 0xb0, 0);
        // Past its deadline, the next tick delivers it.
        c.pulse_irq_line_moderated(5, Duration::from_millis(1));
        assert!(!c.has_interrupt(0));
        std::thread::sleep(Duration::from_millis(5));
        c.tick(1);
        assert_eq!(c.acknowledge_interrupt(0), Some(0x35));
        lapic_write(&c, 0, 0xb0, 0);
        // Or the device releases it.
        c.pulse_irq_line_moderated(5, Duration::from_secs(60));
        assert!(!c.has_interrupt(0));
        c.release_held();
        assert_eq!(c.acknowledge_interrupt(0), Some(0x35));
        lapic_write(&c, 0, 0xb0, 0);
        // A snapshot does not lose one: it is delivered into the state first.
        c.pulse_irq_line_moderated(5, Duration::from_secs(60));
        let saved = c.state();
        assert!(!c.holds_interrupts());
        let restored = UserIrqChip::from_state(&saved);
        assert_eq!(restored.acknowledge_interrupt(0), Some(0x35));
        // MSIs the chip would drop are not held either.
        c.signal_msi_moderated(0xfed0_0000, 0x0047, Duration::from_secs(60));
        assert!(!c.holds_interrupts());
    }

    #[test]
    fn awake_vcpus_are_counted_as_they_sleep_and_wake() {
        let c = Arc::new(chip(3));
        assert_eq!(c.awake_cpus(), 3);
        let sleepers: Vec<_> = [1u32, 2]
            .into_iter()
            .map(|cpu| {
                let c = c.clone();
                std::thread::spawn(move || c.wait(cpu, Duration::from_secs(20), true))
            })
            .collect();
        while c.awake_cpus() > 1 {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(c.lock().waiting[1].is_some() && c.lock().waiting[2].is_some());
        // A kick wakes one: it counts as awake from then on, before its thread runs.
        c.kick(1);
        assert_eq!(c.awake_cpus(), 2);
        // An interrupt for the other (IPI from vCPU 0): all awake.
        c.signal_msi(0xfee0_2000, 0x41);
        assert_eq!(c.awake_cpus(), 3);
        for s in sleepers {
            assert!(s.join().unwrap());
        }
        assert_eq!(c.awake_cpus(), 3);
        // A wait that times out leaves the count as it was.
        assert!(!c.wait(0, Duration::from_millis(2), true));
        assert_eq!(c.awake_cpus(), 3);
    }

    #[test]
    fn moderated_interrupt_to_a_halted_vcpu_goes_at_once() {
        let c = Arc::new(chip(1));
        route(&c, 5, 0x0000_0035, 0);
        let waiter = {
            let c = c.clone();
            std::thread::spawn(move || c.wait(0, Duration::from_secs(20), true))
        };
        // Once it sleeps, a moderated edge wakes it.
        while c.lock().waiting[0].is_none() {
            std::thread::sleep(Duration::from_millis(1));
        }
        c.pulse_irq_line_moderated(5, Duration::from_secs(60));
        assert!(waiter.join().unwrap());
        assert_eq!(c.acknowledge_interrupt(0), Some(0x35));
    }

    #[test]
    fn an_at_halt_msi_waits_for_the_running_vcpu_to_halt_though_another_idles() {
        let c = Arc::new(chip(2));
        // vCPU 1 sleeps; vCPU 0 runs (it completed the request).
        let idle = {
            let c = c.clone();
            std::thread::spawn(move || c.wait(1, Duration::from_secs(20), true))
        };
        while c.lock().waiting[1].is_none() {
            std::thread::sleep(Duration::from_millis(1));
        }
        // A moderated MSI would go at once (a vCPU is idle); this one waits for vCPU 0.
        c.signal_msi_at_halt(0xfee0_0000, 0x0046, Duration::from_secs(60));
        assert!(c.holds_interrupts());
        assert!(!c.has_interrupt(0));
        // vCPU 0 halts: it goes out, and vCPU 0's wait returns at once.
        assert!(c.wait(0, Duration::from_secs(20), true));
        assert_eq!(c.acknowledge_interrupt(0), Some(0x46));
        lapic_write(&c, 0, 0xb0, 0);
        // One for the halted vCPU 1 goes at once and wakes it.
        c.signal_msi_at_halt(0xfee0_1000, 0x0047, Duration::from_secs(60));
        assert!(!c.holds_interrupts());
        assert!(idle.join().unwrap());
        assert_eq!(c.acknowledge_interrupt(1), Some(0x47));
        // Past its deadline, the next tick delivers one.
        c.signal_msi_at_halt(0xfee0_0000, 0x0048, Duration::from_millis(1));
        assert!(!c.has_interrupt(0));
        std::thread::sleep(Duration::from_millis(5));
        c.tick(1);
        assert_eq!(c.acknowledge_interrupt(0), Some(0x48));
    }

    #[test]
    fn an_at_halt_msi_is_released_by_its_destinations_halt_not_another_vcpus() {
        let c = chip(2);
        // Both vCPUs run: held for vCPU 0, which completed the request.
        c.signal_msi_at_halt(0xfee0_0000, 0x0046, Duration::from_secs(60));
        assert!(c.holds_interrupts());
        // vCPU 1 halts after its timer tick and sleeps on: vCPU 0 still runs the guest's
        // worker, which the completion must not interrupt.
        assert!(!c.wait(1, Duration::from_millis(5), true));
        assert!(c.holds_interrupts());
        assert!(!c.has_interrupt(0));
        // An interrupt that goes out at once leaves it held too.
        c.signal_msi_moderated(0xfee0_1000, 0x0047, Duration::ZERO);
        assert_eq!(c.acknowledge_interrupt(1), Some(0x47));
        assert!(c.holds_interrupts());
        assert!(!c.has_interrupt(0));
        // vCPU 0 halts: it goes out, and the wait returns at once.
        assert!(c.wait(0, Duration::from_secs(20), true));
        assert!(!c.holds_interrupts());
        assert_eq!(c.acknowledge_interrupt(0), Some(0x46));
    }

    #[test]
    fn at_halt_interrupts_of_a_one_vcpu_chip_go_at_once() {
        let c = chip(1);
        route(&c, 5, 0x0000_0035, 0);
        c.signal_msi_at_halt(0xfee0_0000, 0x0046, Duration::from_secs(60));
        assert_eq!(c.acknowledge_interrupt(0), Some(0x46));
        lapic_write(&c, 0, 0xb0, 0);
        c.pulse_irq_line_at_halt(5, Duration::from_secs(60));
        assert_eq!(c.acknowledge_interrupt(0), Some(0x35));
        assert!(!c.holds_interrupts());
    }

    #[test]
    fn waiter_is_woken() {
        let c = Arc::new(chip(2));
        assert!(!c.wait(1, Duration::from_millis(5), true));
        let waiter = {
            let c = c.clone();
            std::thread::spawn(move || {
                let start = Instant::now();
                let woke = c.wait(1, Duration::from_secs(20), true);
                (woke, start.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        c.signal_msi(0xfee0_1000, 0x0070);
        let (woke, took) = waiter.join().unwrap();
        assert!(woke);
        assert!(took < Duration::from_secs(10));
        // With IF clear only NMIs, startup messages and kicks wake it.
        assert!(!c.wait(1, Duration::from_millis(5), false));
        c.kick(1);
        assert!(c.wait(1, Duration::from_secs(20), false));
        c.inject_nmi(1);
        assert!(c.wait(1, Duration::from_secs(20), false));
        assert!(!c.wait(9, Duration::from_secs(20), true));
    }

    struct FakeClock(u64);
    impl Clock for FakeClock {
        fn now_ns(&self) -> u64 {
            self.0
        }
    }

    #[test]
    fn bus_adapters_and_trait() {
        let c = Arc::new(chip(1));
        let clock: Arc<dyn Clock> = Arc::new(FakeClock(0));
        let mut bus = crate::Bus::new();
        for (base, len) in UserIrqChip::PIO_RANGES {
            let dev = Arc::new(Mutex::new(ChipPio::new(c.clone(), base, clock.clone())));
            bus.insert(dev, u64::from(base), u64::from(len)).unwrap();
        }
        bus.write(0x21, &[0xa5]);
        let mut b = [0u8];
        bus.read(0x21, &mut b);
        assert_eq!(b[0], 0xa5);
        bus.write(0x21, &[0xff]);
        bus.write(0x61, &[0x01]);
        bus.read(0x61, &mut b);
        assert_eq!(b[0] & 1, 1);
        let mut mmio = IoApicMmio::new(c.clone());
        mmio.write(0, &[1]);
        let mut v = [0u8; 4];
        mmio.read(0x10, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0x0017_0011);
        // Through hypervisor::IrqChip.
        let irq: &dyn hypervisor::IrqChip = c.as_ref();
        route(&c, 6, 0x0000_0036, 0);
        irq.pulse_irq_line(6).unwrap();
        assert_eq!(c.acknowledge_interrupt(0), Some(0x36));
        lapic_write(&c, 0, 0xb0, 0);
        irq.signal_msi(0xfee0_0000, 0x37).unwrap();
        assert_eq!(c.pending_interrupt(0), Some(0x37));
    }

    #[test]
    fn state_round_trip() {
        let c = chip(2);
        linux_pic_init(&c);
        c.pio_write(0xa1, &[0x02], 0); // IRQ 9 goes to the IOAPIC only
        route(&c, 9, 0x0000_8039, 1);
        c.set_irq_line(9, true);
        c.set_irq_line(3, true);
        c.pio_write(0x43, &[0x34], 0);
        c.pio_write(0x40, &[0x00], 0);
        c.pio_write(0x40, &[0x10], 0);
        lapic_write(&c, 0, 0x310, 0x0100_0000);
        lapic_write(&c, 0, 0x300, 0x0000_4608);
        let s = c.state();
        let r = UserIrqChip::from_state(&s);
        assert_eq!(r.state(), s);
        assert_eq!(r.cpus(), 2);
        assert_eq!(
            (r.timer_hz(), r.tsc_hz()),
            (DEFAULT_TIMER_HZ, 2_000_000_000)
        );
        assert_eq!(r.guest_tsc(1_500), 3_000);
        assert!(r.event_hint(0) && r.event_hint(1));
        assert_eq!(r.next_deadline_ns(0), c.next_deadline_ns(0));
        assert_eq!(r.acknowledge_interrupt(0), Some(0x33));
        assert_eq!(r.acknowledge_interrupt(1), Some(0x39));
        assert_eq!(r.take_startup_events(1), vec![StartupEvent::Sipi(8)]);
        // An empty or inconsistent snapshot still makes a working chip.
        let empty = UserIrqChipState {
            lapics: Vec::new(),
            startup: vec![Vec::new(); 5],
            extint: Vec::new(),
            ..s
        };
        let r = UserIrqChip::from_state(&empty);
        assert_eq!(r.cpus(), 1);
        r.tick(u64::MAX);
        r.acknowledge_interrupt(0);
    }

    #[test]
    fn restore_into_a_live_chip_through_serde() {
        let c = chip(2);
        linux_pic_init(&c);
        route(&c, 9, 0x0000_8039, 1);
        c.set_irq_line(9, true);
        lapic_write(&c, 0, 0x310, 0x0100_0000);
        lapic_write(&c, 0, 0x300, 0x0000_4608);
        let s = c.state();
        let json = serde_json::to_string(&s).unwrap();
        let back: UserIrqChipState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        // A fresh chip of the same size takes it and delivers what was pending.
        let live = chip(2);
        live.restore(&back).unwrap();
        assert_eq!(live.state(), s);
        assert!(live.event_hint(1));
        assert_eq!(live.acknowledge_interrupt(1), Some(0x39));
        assert_eq!(live.take_startup_events(1), vec![StartupEvent::Sipi(8)]);
        // Another vCPU count is refused and changes nothing.
        let other = chip(1);
        let before = other.state();
        assert_eq!(
            other.restore(&s),
            Err(ChipStateError::CpuCount {
                chip: 1,
                snapshot: 2
            })
        );
        assert_eq!(other.state(), before);
    }

    #[test]
    fn hostile_inputs() {
        assert_eq!(UserIrqChip::new(0, 0, 0).cpus(), 1);
        assert_eq!(UserIrqChip::new(u32::MAX, 1, 1).cpus(), MAX_CPUS);
        let c = chip(2);
        for cpu in [2, 100, u32::MAX] {
            assert_eq!(c.acknowledge_interrupt(cpu), None);
            c.lapic_mmio_write(cpu, 0x300, &[0; 4], 0);
            let mut b = [1u8; 4];
            c.lapic_mmio_read(cpu, 0x20, &mut b, 0);
            assert_eq!(b, [0; 4]);
            assert_eq!(c.lapic_msr_read(cpu, 0x1b, 0), None);
            assert!(c.take_startup_events(cpu).is_empty());
            assert_eq!(c.next_deadline_ns(cpu), None);
            c.kick(cpu);
            c.inject_nmi(cpu);
        }
        for gsi in [0, 2, 15, 16, 23, 24, u32::MAX] {
            c.set_irq_line(gsi, true);
            c.set_irq_line(gsi, false);
        }
        for port in [0u16, 0x20, 0x43, 0x61, 0x70, 0xffff] {
            let mut b = [0u8; 4];
            c.pio_read(port, &mut b, u64::MAX);
            c.pio_write(port, &[0xff, 0xff], u64::MAX);
            c.pio_write(port, &[], 0);
        }
        // INIT storm without a VMM draining the queue stays bounded.
        for _ in 0..1000 {
            lapic_write(&c, 0, 0x310, 0x0100_0000);
            lapic_write(&c, 0, 0x300, 0x0000_4500);
        }
        assert_eq!(c.take_startup_events(1).len(), MAX_STARTUP_EVENTS);
        let mut pio = ChipPio::new(Arc::new(chip(1)), 0xffff, Arc::new(FakeClock(0)));
        pio.write(5, &[1]);
        pio.read(u64::MAX, &mut [0u8; 2]);
    }
}
