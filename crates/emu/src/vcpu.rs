//! One software vCPU behind the seam's `Vcpu` contract.
//!
//! Each vCPU runs on its own VMM thread at the same time as the others, as with KVM:
//! guest and host are both x86 (TSO), so the emulator's plain loads and stores keep the
//! guest's ordering, LOCK-prefixed operations are host atomics (split and MMIO ones
//! serialise in x86emu), and code one vCPU writes is checked again by the others through
//! the VM's shared `CodeTracker`. Nothing is locked around execution.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypervisor::{
    CpuIdEntry, FpuState, IoHandler, MsrEntry, Regs, Result, Sregs, Vcpu, VcpuExit, VcpuKicker,
};
use x86emu::code::CodeTracker;
use x86emu::{Cpu, GuestRam, RunExit};

use crate::convert;
use crate::hybrid::{HybridVcpu, StintEnd};
use crate::platform::{EmuPlatform, KvmClockState};
use crate::VmShared;

/// Instructions per `run`: long enough to amortize the timer and event checks, short
/// enough that timers are served within about a millisecond at typical emulation speeds.
const SLICE: u64 = 200_000;
/// A halted vCPU re-checks the VMM's stop flag at least this often.
const MAX_IDLE: Duration = Duration::from_millis(20);
/// Halt polling, as KVM's `halt_poll_ns`: a halted vCPU of a VM whose vCPUs each have a
/// host CPU first watches for its next event for up to this long before it sleeps. A
/// vCPU woken from sleep by another thread waits for the host to schedule it (tens of
/// microseconds here); a 2-vCPU guest's disk write at queue depth 1 took two such
/// wake-ups per request (the disk's interrupt on one vCPU, then the completion's IPI
/// back to the writer's).
const MAX_HALT_POLL: Duration = Duration::from_micros(200);
/// The first window after a halt short enough to have been caught by polling.
const MIN_HALT_POLL: Duration = Duration::from_micros(10);

/// The polling window for the next halt, after one that lasted `halted` with `window`:
/// it doubles (from `MIN_HALT_POLL`, up to `MAX_HALT_POLL`) while halts end within
/// `MAX_HALT_POLL`, and halves (to zero) after longer ones, so a vCPU that idles for
/// long, at every timer tick, soon polls no more.
fn next_halt_poll(window: Duration, halted: Duration, enabled: bool) -> Duration {
    if !enabled {
        Duration::ZERO
    } else if halted <= MAX_HALT_POLL {
        (window * 2).clamp(MIN_HALT_POLL, MAX_HALT_POLL)
    } else if window / 2 < MIN_HALT_POLL {
        Duration::ZERO
    } else {
        window / 2
    }
}

pub struct EmuVcpu {
    id: u32,
    cpu: Cpu,
    /// The same RAM map as the CPU's, for writes the platform makes (kvmclock).
    ram: GuestRam,
    /// The CPU's code tracker (shared by the VM's CPUs), told of those writes.
    code: Arc<CodeTracker>,
    vm: Arc<VmShared>,
    kvmclock: KvmClockState,
    /// Guest RIP samples, one per slice, when `VESSEL_EMU_PROFILE` names a file to write.
    profile: Option<Profile>,
    /// The KVM half of a hybrid vCPU.
    hybrid: Option<HybridVcpu>,
    /// Set by the kicker; `run` returns at once while it is set, and clears it.
    kicked: Arc<AtomicBool>,
    /// How long the next halt polls before it sleeps (see `MAX_HALT_POLL`).
    halt_poll: Duration,
}

/// emu's kick: a flag `run` checks before each slice, and a wake-up of a halted vCPU
/// (which also kicks a hybrid vCPU's KVM half through the chip's notifier).
struct EmuKicker {
    kicked: Arc<AtomicBool>,
    vm: Arc<VmShared>,
    id: u32,
}

impl VcpuKicker for EmuKicker {
    fn kick(&self) {
        self.kicked.store(true, Ordering::SeqCst);
        self.vm.chip.kick(self.id);
    }
}

/// A poor man's guest profiler: with short slices, the RIP at each slice end is a sample.
struct Profile {
    path: std::path::PathBuf,
    hits: std::collections::HashMap<u64, u64>,
}

/// Slice length while profiling: short enough for a few thousand samples a second.
const PROFILE_SLICE: u64 = 2_000;

impl Drop for EmuVcpu {
    fn drop(&mut self) {
        let Some(p) = self.profile.take() else { return };
        let mut v: Vec<_> = p.hits.into_iter().collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        let text: String = v.iter().map(|(rip, n)| format!("{rip:#x} {n}\n")).collect();
        let path = p.path.with_extension(format!("cpu{}", self.id));
        if let Err(e) = std::fs::write(&path, text) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the emu profile");
        }
    }
}

impl EmuVcpu {
    pub(crate) fn new(
        id: u32,
        cpu: Cpu,
        ram: GuestRam,
        vm: Arc<VmShared>,
        hybrid: Option<HybridVcpu>,
    ) -> Self {
        EmuVcpu {
            hybrid,
            kicked: Arc::default(),
            halt_poll: Duration::ZERO,
            id,
            code: cpu.code_tracker(),
            cpu,
            ram,
            vm,
            kvmclock: KvmClockState::default(),
            profile: std::env::var_os("VESSEL_EMU_PROFILE").map(|p| Profile {
                path: p.into(),
                hits: Default::default(),
            }),
        }
    }

    fn startup_events(&mut self) {
        use devices::irqchip::chip::StartupEvent;
        for ev in self.vm.chip.take_startup_events(self.id) {
            match ev {
                StartupEvent::Init => self.cpu.init(true),
                StartupEvent::Sipi(vector) => self.cpu.sipi(vector),
            }
        }
    }

    /// Sleep until an interrupt or event is pending for this vCPU, its next timer is due,
    /// or MAX_IDLE passes. `interruptible`: whether a maskable interrupt can wake it.
    fn idle(&mut self, interruptible: bool) {
        let now = self.vm.clock.now_ns();
        let until = self
            .vm
            .chip
            .next_deadline_ns(self.id)
            .map(|d| Duration::from_nanos(d.saturating_sub(now)))
            .unwrap_or(MAX_IDLE)
            .min(MAX_IDLE);
        if until.is_zero() {
            return;
        }
        let start = Instant::now();
        let window = self.halt_poll.min(until);
        if !window.is_zero() && self.vm.may_poll() {
            self.vm.chip.halting(self.id);
            while start.elapsed() < window
                && !self.vm.chip.event_hint(self.id)
                && !self.kicked.load(Ordering::Relaxed)
                && self.vm.may_poll()
            {
                std::hint::spin_loop();
            }
        }
        let left = until.saturating_sub(start.elapsed());
        if !left.is_zero() {
            self.vm.chip.wait(self.id, left, interruptible);
        }
        let polls = self.vm.poll_cpus > 0;
        self.halt_poll = next_halt_poll(self.halt_poll, start.elapsed(), polls);
    }
}

impl Vcpu for EmuVcpu {
    fn host_fd(&self) -> Option<std::os::fd::RawFd> {
        self.hybrid.as_ref().and_then(|h| h.raw_fd())
    }

    fn regs(&self) -> Result<Regs> {
        Ok(convert::regs_from_emu(self.cpu.state()))
    }

    fn set_regs(&mut self, regs: &Regs) -> Result<()> {
        convert::regs_into_emu(regs, self.cpu.state_mut());
        Ok(())
    }

    fn sregs(&self) -> Result<Sregs> {
        Ok(convert::sregs_from_emu(self.cpu.state()))
    }

    fn set_sregs(&mut self, sregs: &Sregs) -> Result<()> {
        convert::sregs_into_emu(sregs, self.cpu.state_mut());
        self.cpu.flush_tlb();
        Ok(())
    }

    fn fpu(&self) -> Result<FpuState> {
        Ok(convert::fpu_from_emu(&self.cpu.state().fpu))
    }

    fn set_fpu(&mut self, fpu: &FpuState) -> Result<()> {
        convert::fpu_into_emu(fpu, &mut self.cpu.state_mut().fpu);
        Ok(())
    }

    fn set_cpuid(&mut self, entries: &[CpuIdEntry]) -> Result<()> {
        crate::cpuid::install(self.cpu.cpuid_mut(), entries);
        Ok(())
    }

    fn set_msrs(&mut self, msrs: &[MsrEntry]) -> Result<()> {
        // The TSC counts from VM creation for every vCPU alike (kvmclock and the LAPIC's
        // TSC-deadline timer read the same clock); a reset to 0 at set-up is a no-op.
        for m in msrs
            .iter()
            .filter(|m| m.index != hypervisor::regs::bits::MSR_IA32_TSC)
        {
            if self.cpu.write_msr(m.index, m.value).is_err() {
                return Err(hypervisor::Error::Unsupported {
                    what: format!("MSR {:#x}", m.index),
                });
            }
        }
        Ok(())
    }

    fn msrs(&self, indices: &[u32]) -> Result<Vec<MsrEntry>> {
        Ok(indices
            .iter()
            .filter_map(|&index| {
                self.cpu
                    .read_msr(index)
                    .map(|value| MsrEntry { index, value })
            })
            .collect())
    }

    fn guest_paused(&mut self) -> Result<()> {
        if let Some(gpa) = self.kvmclock.system_time {
            let at = gpa + crate::kvmclock::PVCLOCK_FLAGS_OFFSET;
            let mut flags = [0u8];
            if self.ram.read(at, &mut flags) {
                flags[0] |= crate::kvmclock::PVCLOCK_GUEST_STOPPED;
                if self.ram.write(at, &flags) {
                    self.code.note_external_write(at, 1);
                }
            }
        }
        Ok(())
    }

    fn save_state(&self) -> Result<serde_json::Value> {
        crate::persist::save_vcpu(&self.vm, &self.cpu, &self.kvmclock)
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<()> {
        crate::persist::restore_vcpu(&self.vm, &mut self.cpu, &mut self.kvmclock, state)
    }

    fn configure_local_interrupts(&mut self) -> Result<()> {
        // The user-space LAPIC comes out of reset wired as firmware leaves it.
        Ok(())
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        Arc::new(EmuKicker {
            kicked: self.kicked.clone(),
            vm: self.vm.clone(),
            id: self.id,
        })
    }

    fn run(&mut self, io: &dyn IoHandler) -> Result<VcpuExit> {
        if self.kicked.swap(false, Ordering::SeqCst) {
            return Ok(VcpuExit::Interrupted);
        }
        let vm = self.vm.clone();
        vm.chip.tick_cpu(self.id, vm.clock.now_ns());
        // The hint is up to date for this vCPU's own events: without it, there is no
        // startup message or NMI to take, and the chip's lock is left alone.
        if vm.chip.event_hint(self.id) {
            self.startup_events();
            if vm.chip.take_nmi(self.id) {
                self.cpu.inject_nmi();
            }
        }
        let mut platform = EmuPlatform {
            io,
            chip: &vm.chip,
            cpu: self.id,
            clock: &vm.clock,
            ram: &self.ram,
            code: &self.code,
            kvmclock: &mut self.kvmclock,
            ioevents: &vm.ioevents,
            poke: false,
        };
        // The interrupt window is asked for only while an interrupt waits: one that went
        // away while IF was clear (the guest masked or acknowledged it) must not leave the
        // request up, or `run` returns at once forever without executing anything.
        let mut window = false;
        if vm.chip.event_hint(self.id) && vm.chip.has_interrupt(self.id) {
            if self.cpu.interrupts_enabled() {
                if let Some(vector) = vm.chip.acknowledge_interrupt(self.id) {
                    self.cpu.inject_external_interrupt(&mut platform, vector);
                }
            } else {
                window = true;
            }
        }
        self.cpu.request_interrupt_window(window);
        let eligible = self
            .hybrid
            .as_ref()
            .is_some_and(|h| self.profile.is_none() && h.eligible(&self.cpu));
        if eligible && !vm.chip.event_hint(self.id) {
            let ready = self.hybrid.as_mut().is_some_and(|h| h.ready(&mut self.cpu));
            if let Some(h) = self.hybrid.as_mut().filter(|_| ready) {
                let id = self.id;
                let chip = &vm.chip;
                let clock = &vm.clock;
                let next = || {
                    chip.next_deadline_ns(id)
                        .map(|d| Duration::from_nanos(d.saturating_sub(clock.now_ns())))
                };
                let pending = || chip.event_hint(id);
                match h.run(&mut self.cpu, &mut platform, &next, &pending) {
                    Ok(StintEnd::Kernel) | Ok(StintEnd::Kicked) => {
                        return Ok(VcpuExit::Interrupted)
                    }
                    Ok(StintEnd::NotEntered) => {}
                    Err(e) => {
                        tracing::warn!(vcpu = id, "hybrid: staying on x86emu: {e}");
                    }
                }
            }
        }
        let slice = if self.profile.is_some() {
            PROFILE_SLICE
        } else if eligible {
            crate::hybrid::PROBE_SLICE
        } else {
            SLICE
        };
        let cpl3_before = self.cpu.state().seg[x86emu::Seg::Cs as usize].selector & 3 == 3;
        let entries = self.cpu.kernel_entries();
        let exit = self.cpu.run(&mut platform, slice);
        if let Some(h) = &mut self.hybrid {
            let cpl3 = self.cpu.state().seg[x86emu::Seg::Cs as usize].selector & 3 == 3;
            h.note_slice(
                cpl3_before
                    && cpl3
                    && entries == self.cpu.kernel_entries()
                    && matches!(exit, RunExit::InstructionLimit),
            );
        }
        if let Some(p) = &mut self.profile {
            *p.hits.entry(self.cpu.state().rip).or_default() += 1;
        }
        Ok(match exit {
            RunExit::Halted => {
                let interruptible = self.cpu.state().rflags & x86emu::state::flags::IF != 0;
                self.idle(interruptible);
                VcpuExit::Interrupted
            }
            RunExit::WaitForSipi => {
                self.idle(false);
                VcpuExit::Interrupted
            }
            RunExit::Shutdown => VcpuExit::Shutdown,
            RunExit::StopRequested => VcpuExit::Io,
            RunExit::InstructionLimit | RunExit::InterruptWindow | RunExit::Kicked => {
                VcpuExit::Interrupted
            }
            RunExit::Paused => {
                // Spinning on another vCPU: where vCPUs outnumber host CPUs, that one may
                // be waiting for this thread's host CPU.
                std::thread::yield_now();
                VcpuExit::Interrupted
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn halt_polling_grows_while_halts_are_short_and_stops_after_long_ones() {
        // Short halts: from nothing to MIN, then doubling up to MAX.
        let mut w = Duration::ZERO;
        let mut seen = Vec::new();
        for _ in 0..8 {
            w = next_halt_poll(w, 50 * US, true);
            seen.push(w);
        }
        assert_eq!(seen[0], MIN_HALT_POLL);
        assert_eq!(seen[1], MIN_HALT_POLL * 2);
        assert!(seen.windows(2).all(|p| p[1] >= p[0]));
        assert_eq!(*seen.last().unwrap(), MAX_HALT_POLL);
        // A halt as long as the window is still short enough to keep it.
        assert_eq!(
            next_halt_poll(MAX_HALT_POLL, MAX_HALT_POLL, true),
            MAX_HALT_POLL
        );
        // Long halts (a vCPU idle between timer ticks): halving, then none at all.
        let mut n = 0;
        while !w.is_zero() {
            w = next_halt_poll(w, Duration::from_millis(4), true);
            n += 1;
            assert!(n < 16, "the window never reached zero");
        }
        assert!(n <= 5, "an idle vCPU stopped polling only after {n} halts");
        // A VM that may not poll never does.
        assert_eq!(
            next_halt_poll(MAX_HALT_POLL, 50 * US, false),
            Duration::ZERO
        );
    }
}
