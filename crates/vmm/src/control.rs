//! Controlling a running VM from outside its vCPU threads: pause and resume, the ACPI
//! power button, reset and stop. The control API (`api::firecracker`) and `vessel run`
//! hold a [`VmControl`]; the vCPU threads pass through its gate before every `run()`.
//!
//! Pausing parks every vCPU thread outside `Vcpu::run` (each vCPU's `Vcpu::kicker` takes
//! it out of `run`: KVM at once, emu within one slice or at once from a halt), so a
//! paused guest executes nothing: no console output, no timers serviced, no device kicks.
//! The host-side device threads (TAP and vsock receive) keep filling receive queues, as
//! a NIC's DMA would; the guest sees those buffers when it resumes.
//!
//! Guest time is not stopped (Firecracker's semantics): the TSC, kvmclock and the RTC
//! follow the host's clock, so after a resume the guest's clocks are still right and its
//! overdue timers fire at once. A guest paused for longer than its soft-lockup threshold
//! (20 s on Linux) may log a soft-lockup warning on resume.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use devices::ged::Ged;
use devices::{ExitReason, ExitSignal};

/// How long `pause` waits for every vCPU to leave `run()`.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the VM is not running (it ended: {0:?})")]
    NotRunning(ExitReason),
    #[error("the vCPUs did not stop within {0:?}; the VM keeps running")]
    PauseTimeout(Duration),
    #[error("raising the power button's interrupt: {0}")]
    Irq(#[from] hypervisor::Error),
    #[error("this machine has no power button ({0}): stop or reset it instead")]
    NoPowerButton(&'static str),
}

/// The handle to a running VM.
pub struct VmControl {
    exit: Arc<ExitSignal>,
    /// The ACPI power button; Err names the machine that has none.
    ged: Result<Arc<Mutex<Ged>>, &'static str>,
    /// Keeps the devices' I/O threads out of guest memory while paused.
    io_gate: Arc<virtio::transport::IoGate>,
    paused: AtomicBool,
    /// vCPU threads between the gate and the end of their `run()` call.
    in_run: AtomicUsize,
    parked: Mutex<()>,
    /// Parked vCPUs wait on it for a resume or the VM's end.
    unparked: Condvar,
    /// `pause` waits on it for the last vCPU to leave `run()`.
    left_run: Condvar,
    /// Takes each vCPU out of `run()`.
    kickers: Mutex<Vec<Arc<dyn hypervisor::VcpuKicker>>>,
    /// Disks and interfaces that can be changed while the guest runs.
    devices: crate::runtime::RuntimeDevices,
    /// Held while a snapshot reads the paused VM: a resume waits for it.
    frozen: Mutex<()>,
    /// Held through each pause and resume, so concurrent ones take turns: a pause
    /// waiting for the vCPUs to leave `run()` is never overtaken by a resume that lets
    /// them go on (it then waited out its timeout: 1 of 600 concurrent requests failed).
    turns: Mutex<()>,
}

impl std::fmt::Debug for VmControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmControl")
            .field("exit", &self.exit.get())
            .field("paused", &self.is_paused())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VmControl {
    pub fn new(exit: Arc<ExitSignal>, ged: Arc<Mutex<Ged>>) -> Self {
        Self::with_power_button(exit, Ok(ged))
    }

    /// The handle to a machine without an ACPI power button (`machine` names it in the
    /// refusal of [`VmControl::press_power_button`]).
    pub fn without_power_button(exit: Arc<ExitSignal>, machine: &'static str) -> Self {
        Self::with_power_button(exit, Err(machine))
    }

    fn with_power_button(
        exit: Arc<ExitSignal>,
        ged: Result<Arc<Mutex<Ged>>, &'static str>,
    ) -> Self {
        VmControl {
            exit,
            ged,
            io_gate: Arc::default(),
            paused: AtomicBool::new(false),
            in_run: AtomicUsize::new(0),
            parked: Mutex::new(()),
            unparked: Condvar::new(),
            left_run: Condvar::new(),
            kickers: Mutex::new(Vec::new()),
            devices: crate::runtime::RuntimeDevices::default(),
            frozen: Mutex::new(()),
            turns: Mutex::new(()),
        }
    }

    /// The devices the control API may change while the guest runs.
    pub fn devices(&self) -> &crate::runtime::RuntimeDevices {
        &self.devices
    }

    /// Runs `f` while the VM stays paused (a resume meanwhile waits); None, without
    /// running it, when the VM is not paused.
    pub fn while_paused<R>(&self, f: impl FnOnce() -> R) -> Option<R> {
        let _frozen = lock(&self.frozen);
        self.is_paused().then(f)
    }

    pub fn exit_signal(&self) -> &Arc<ExitSignal> {
        &self.exit
    }

    /// The gate the devices' I/O threads pass before serving (closed while paused).
    pub fn io_gate(&self) -> Arc<virtio::transport::IoGate> {
        self.io_gate.clone()
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    fn running(&self) -> Result<(), ControlError> {
        match self.exit.get() {
            Some(r) => Err(ControlError::NotRunning(r)),
            None => Ok(()),
        }
    }

    /// Parks every vCPU; returns once none is executing guest code. Pausing a paused VM
    /// is a no-op.
    pub fn pause(&self) -> Result<(), ControlError> {
        self.running()?;
        let _turn = lock(&self.turns);
        self.paused.store(true, Ordering::SeqCst);
        // A kick is never lost (see `VcpuKicker`): one each is enough.
        self.kick();
        let g = lock(&self.parked);
        let (_g, waited) = self
            .left_run
            .wait_timeout_while(g, PAUSE_TIMEOUT, |_| {
                // Stopping anyway: the vCPU threads are leaving for good.
                self.in_run.load(Ordering::SeqCst) > 0 && self.exit.get().is_none()
            })
            .unwrap_or_else(|p| p.into_inner());
        if waited.timed_out() {
            drop(_g);
            self.resume_threads();
            return Err(ControlError::PauseTimeout(PAUSE_TIMEOUT));
        }
        // Then the devices: a paused guest's memory stays as it is (no received frames or
        // disk completions land in it).
        if !self.io_gate.close(PAUSE_TIMEOUT) {
            self.resume_threads();
            return Err(ControlError::PauseTimeout(PAUSE_TIMEOUT));
        }
        tracing::info!("VM paused");
        Ok(())
    }

    /// Lets the vCPUs run again. Resuming a running VM is a no-op.
    pub fn resume(&self) -> Result<(), ControlError> {
        self.running()?;
        let _turn = lock(&self.turns);
        let _frozen = lock(&self.frozen);
        self.resume_threads();
        tracing::info!("VM resumed");
        Ok(())
    }

    fn resume_threads(&self) {
        self.io_gate.open();
        self.paused.store(false, Ordering::SeqCst);
        // Under the lock: a vCPU that saw `paused` set is then already waiting.
        let _g = lock(&self.parked);
        self.unparked.notify_all();
    }

    /// Presses the ACPI power button (the guest decides what to do about it).
    pub fn press_power_button(&self) -> Result<(), ControlError> {
        self.running()?;
        let ged = self
            .ged
            .as_ref()
            .map_err(|m| ControlError::NoPowerButton(m))?;
        lock(ged).press_power_button()?;
        Ok(())
    }

    /// Resets the machine: the VM ends with [`ExitReason::Reset`], as when the guest
    /// reboots itself (`vessel run` exits with its reboot status; the manager starts the
    /// domain again).
    pub fn reset(&self) -> Result<(), ControlError> {
        self.running()?;
        self.exit.request(ExitReason::Reset);
        Ok(())
    }

    /// Ends the VM now, as quitting the console does.
    pub fn stop(&self) -> Result<(), ControlError> {
        self.running()?;
        self.exit.request(ExitReason::Quit);
        Ok(())
    }

    /// The vCPU side, before each `run()`: waits while the VM is paused. Returns None
    /// when the VM is stopping instead, else whether it waited (the guest was paused).
    /// Every `Some` must be followed by `leave_run`.
    pub(crate) fn enter_run(&self) -> Option<bool> {
        let mut waited = false;
        loop {
            // Announce first, then look: with `pause` storing `paused` before reading
            // `in_run` (both SeqCst), one of the two always sees the other.
            self.in_run.fetch_add(1, Ordering::SeqCst);
            if !self.paused.load(Ordering::SeqCst) {
                return Some(waited);
            }
            self.in_run.fetch_sub(1, Ordering::SeqCst);
            waited = true;
            let mut g = lock(&self.parked);
            // Woken by a resume, or by `release` once the VM ends.
            while self.paused.load(Ordering::SeqCst) {
                if self.exit.get().is_some() {
                    return None;
                }
                g = self.unparked.wait(g).unwrap_or_else(|p| p.into_inner());
            }
        }
    }

    pub(crate) fn leave_run(&self) {
        if self.in_run.fetch_sub(1, Ordering::SeqCst) == 1 && self.is_paused() {
            // Under the lock: `pause` either sees the count or is already waiting.
            let _g = lock(&self.parked);
            self.left_run.notify_all();
        }
    }

    /// The vCPUs' kickers, which `pause` and `release` use.
    pub(crate) fn set_kickers(&self, kickers: Vec<Arc<dyn hypervisor::VcpuKicker>>) {
        *lock(&self.kickers) = kickers;
    }

    fn kick(&self) {
        for k in lock(&self.kickers).iter() {
            k.kick();
        }
    }

    /// Once the VM's exit signal is set: takes every vCPU out of `run()`, and wakes the
    /// parked vCPUs and paused I/O threads so they see the VM's end.
    pub(crate) fn release(&self) {
        self.kick();
        {
            let _g = lock(&self.parked);
            self.unparked.notify_all();
            self.left_run.notify_all();
        }
        self.io_gate.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    struct NoIrq;
    impl hypervisor::IrqChip for NoIrq {
        fn set_irq_line(&self, _: u32, _: bool) -> hypervisor::Result<()> {
            Ok(())
        }
        fn signal_msi(&self, _: u64, _: u32) -> hypervisor::Result<()> {
            Ok(())
        }
    }

    fn control() -> Arc<VmControl> {
        let exit = Arc::new(ExitSignal::new());
        let ged = Arc::new(Mutex::new(Ged::new(Arc::new(NoIrq), 5)));
        Arc::new(VmControl::new(exit, ged))
    }

    #[test]
    fn pause_parks_a_running_loop_and_resume_releases_it() {
        let c = control();
        let count = Arc::new(AtomicUsize::new(0));
        let woke_from_pause = Arc::new(AtomicUsize::new(0));
        let worker = {
            let (c, count, woke) = (c.clone(), count.clone(), woke_from_pause.clone());
            std::thread::spawn(move || {
                while c.exit_signal().get().is_none() {
                    let Some(waited) = c.enter_run() else {
                        break;
                    };
                    if waited {
                        woke.fetch_add(1, Ordering::SeqCst);
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_micros(200));
                    c.leave_run();
                }
            })
        };
        while count.load(Ordering::SeqCst) < 10 {
            std::thread::yield_now();
        }
        c.pause().unwrap();
        assert!(c.is_paused());
        let at_pause = count.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(count.load(Ordering::SeqCst), at_pause, "ran while paused");
        c.pause().unwrap();
        c.resume().unwrap();
        let t0 = Instant::now();
        while count.load(Ordering::SeqCst) < at_pause + 10 {
            assert!(t0.elapsed() < Duration::from_secs(5), "never resumed");
            std::thread::yield_now();
        }
        assert_eq!(
            woke_from_pause.load(Ordering::SeqCst),
            1,
            "the resumed loop is told it was paused, once"
        );
        // A stop while paused ends the parked loop.
        c.pause().unwrap();
        c.stop().unwrap();
        c.release();
        worker.join().unwrap();
        assert!(matches!(c.pause(), Err(ControlError::NotRunning(_))));
        assert!(c.press_power_button().is_err());
    }

    #[test]
    fn a_resume_waits_for_what_runs_while_paused() {
        let c = control();
        assert_eq!(c.while_paused(|| 1), None, "not paused");
        c.pause().unwrap();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let reader = {
            let c = c.clone();
            std::thread::spawn(move || {
                c.while_paused(|| {
                    started_tx.send(()).unwrap();
                    std::thread::sleep(Duration::from_millis(300));
                    c.is_paused()
                })
            })
        };
        started_rx.recv().unwrap();
        let t0 = Instant::now();
        c.resume().unwrap();
        assert!(
            t0.elapsed() >= Duration::from_millis(200),
            "resumed under a snapshot"
        );
        assert_eq!(
            reader.join().unwrap(),
            Some(true),
            "the VM stayed paused throughout"
        );
        assert!(!c.is_paused());
    }

    /// Issue 22: 600 concurrent pause and resume requests through the API failed now and
    /// then with "the vCPUs did not stop within 5s": a resume let the vCPUs go on while
    /// a pause still waited for them to stop. Pauses and resumes now take turns.
    #[test]
    fn concurrent_pauses_and_resumes_all_succeed() {
        let c = control();
        let worker = {
            let c = c.clone();
            std::thread::spawn(move || {
                while c.enter_run().is_some() {
                    // A long stint in run(): a pause waits for its end.
                    std::thread::sleep(Duration::from_millis(30));
                    c.leave_run();
                    if c.exit_signal().get().is_some() {
                        break;
                    }
                }
            })
        };
        std::thread::sleep(Duration::from_millis(5));
        // A resume that comes while a pause waits for the vCPU.
        let pauser = {
            let c = c.clone();
            std::thread::spawn(move || c.pause())
        };
        std::thread::sleep(Duration::from_millis(5));
        let t0 = Instant::now();
        c.resume().unwrap();
        assert!(pauser.join().unwrap().is_ok(), "the pause failed");
        assert!(t0.elapsed() < Duration::from_secs(2));
        // And many at once.
        let hammers: Vec<_> = (0..8)
            .map(|i| {
                let c = c.clone();
                std::thread::spawn(move || {
                    (0..10)
                        .map(|j| {
                            if (i + j) % 2 == 0 {
                                c.pause()
                            } else {
                                c.resume()
                            }
                        })
                        .filter(|r| r.is_err())
                        .count()
                })
            })
            .collect();
        for h in hammers {
            assert_eq!(h.join().unwrap(), 0, "a pause or resume failed");
        }
        c.stop().unwrap();
        c.release();
        worker.join().unwrap();
    }

    #[test]
    fn reset_ends_the_vm_with_reset() {
        let c = control();
        c.press_power_button().unwrap();
        assert_eq!(c.exit_signal().get(), None);
        c.reset().unwrap();
        assert_eq!(c.exit_signal().get(), Some(ExitReason::Reset));
    }
}
