//! How a VM ends: the reason, and the one-shot signal devices and vCPUs raise it through.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Why the VM stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (i8042 pulse, ACPI reset register, the reset control
    /// register at 0xcf9).
    Reset,
    /// A CPU triple-faulted.
    TripleFault,
    /// The test device at the debug-exit port was written; QEMU's isa-debug-exit
    /// convention: the process status is (value << 1) | 1.
    DebugExit(u32),
    /// The user asked the VMM to quit (console escape, signal, API).
    Quit,
    /// The VMM itself failed (a vCPU error).
    Error,
}

/// A one-shot stop request: the first reason wins; waiters wake once it is set.
#[derive(Debug, Default)]
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    cv: Condvar,
}

impl ExitSignal {
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask the VM to stop; later requests do not change the reason.
    pub fn request(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason);
            self.cv.notify_all();
        }
    }

    pub fn get(&self) -> Option<ExitReason> {
        *self.reason.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait up to `timeout` for a stop request.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        let r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        let (r, _) = self
            .cv
            .wait_timeout_while(r, timeout, |r| r.is_none())
            .unwrap_or_else(|p| p.into_inner());
        *r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = ExitSignal::new();
        assert_eq!(s.wait_timeout(Duration::from_millis(1)), None);
        s.request(ExitReason::PowerOff);
        s.request(ExitReason::Reset);
        assert_eq!(s.get(), Some(ExitReason::PowerOff));
        assert_eq!(
            s.wait_timeout(Duration::from_secs(1)),
            Some(ExitReason::PowerOff)
        );
    }
}
