//! How a VM ends: the reason, and the one-shot signal devices and vCPUs raise it through.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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
    /// The VM moved to another VMM (live migration), which runs it now.
    Migrated,
}

/// A one-shot stop request: the first reason wins; waiters wake once it is set, and
/// threads that poll descriptors see their [`ExitSignal::subscribe`] eventfd turn
/// readable (so no thread needs a timeout to notice the end).
#[derive(Debug, Default)]
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    cv: Condvar,
    /// Written once when the reason is set.
    subscribers: Mutex<Vec<EventFd>>,
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
            for fd in self
                .subscribers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
            {
                if let Err(e) = fd.write(1) {
                    tracing::warn!("waking a thread for the VM's end: {e}");
                }
            }
        }
    }

    /// An eventfd (non-blocking) that turns readable once the VM is asked to stop, for a
    /// thread that waits in `poll`. It stays readable: never read it.
    pub fn subscribe(&self) -> std::io::Result<EventFd> {
        let fd = EventFd::new(EFD_NONBLOCK)?;
        let ours = fd.try_clone()?;
        // Under the reason's lock: a request either sees this subscriber or came first.
        let r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_some() {
            fd.write(1)?;
        }
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ours);
        drop(r);
        Ok(fd)
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

    #[test]
    fn subscribers_turn_readable_on_the_request() {
        let s = ExitSignal::new();
        let before = s.subscribe().unwrap();
        assert!(before.read().is_err(), "readable before any request");
        s.request(ExitReason::Quit);
        assert_eq!(before.read().unwrap(), 1);
        let after = s.subscribe().unwrap();
        assert_eq!(
            after.read().unwrap(),
            1,
            "a late subscriber is readable at once"
        );
    }
}
