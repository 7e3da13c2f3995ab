//! ioeventfd and irqfd in user space, the emu accelerator's side of the seam's
//! `Vm::register_ioevent` / `Vm::register_irqfd` (KVM does both in the kernel).
//!
//! - An ioevent is checked by the vCPU's platform before an MMIO or port write goes to
//!   the VMM's buses: a match writes the eventfd and the write goes nowhere else.
//! - Irqfds are read by one thread per VM, which turns each write into an edge on the
//!   GSI through the user-space chip (the chip then wakes or kicks the target vCPU).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use hypervisor::{EventFd, IoEventAddress};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use crate::VmShared;

struct IoEvent {
    addr: IoEventAddress,
    datamatch: Option<u32>,
    fd: EventFd,
}

/// The registered ioevents of a VM.
#[derive(Default)]
pub(crate) struct IoEvents {
    /// Whether any is registered: the common case, none, costs one load per write.
    any: AtomicBool,
    list: RwLock<Vec<IoEvent>>,
}

impl IoEvents {
    pub(crate) fn register(
        &self,
        addr: IoEventAddress,
        datamatch: Option<u32>,
        fd: &EventFd,
    ) -> std::io::Result<()> {
        let fd = fd.try_clone()?;
        self.list
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(IoEvent {
                addr,
                datamatch,
                fd,
            });
        self.any.store(true, Ordering::Release);
        Ok(())
    }

    /// Removes the ioevent registered for `addr` and `datamatch` (the latest one, if
    /// there are several); false when there is none.
    pub(crate) fn unregister(&self, addr: IoEventAddress, datamatch: Option<u32>) -> bool {
        let mut list = self.list.write().unwrap_or_else(|p| p.into_inner());
        let Some(i) = list
            .iter()
            .rposition(|e| e.addr == addr && e.datamatch == datamatch)
        else {
            return false;
        };
        list.remove(i);
        self.any.store(!list.is_empty(), Ordering::Release);
        true
    }

    /// Signals the ioevent registered for a guest write of `data` at `addr`; false when
    /// none matches (the write then goes to the buses).
    pub(crate) fn signal(&self, addr: IoEventAddress, data: &[u8]) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        let list = self.list.read().unwrap_or_else(|p| p.into_inner());
        let value = <[u8; 4]>::try_from(data).ok().map(u32::from_le_bytes);
        let Some(e) = list
            .iter()
            .find(|e| e.addr == addr && e.datamatch.is_none_or(|want| value == Some(want)))
        else {
            return false;
        };
        if let Err(err) = e.fd.write(1) {
            tracing::warn!(?addr, "signalling an ioevent: {err}");
        }
        true
    }
}

struct IrqfdShared {
    list: Mutex<Vec<(u32, EventFd)>>,
    /// Wakes the thread to look at `list` again, or to stop.
    control: EventFd,
    stop: AtomicBool,
}

/// The irqfds of a VM and the thread that serves them (started by the first one).
pub(crate) struct Irqfds {
    shared: Arc<IrqfdShared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Irqfds {
    pub(crate) fn new() -> std::io::Result<Self> {
        Ok(Irqfds {
            shared: Arc::new(IrqfdShared {
                list: Mutex::new(Vec::new()),
                control: EventFd::new(EFD_NONBLOCK)?,
                stop: AtomicBool::new(false),
            }),
            thread: Mutex::new(None),
        })
    }

    pub(crate) fn register(
        &self,
        vm: &Arc<VmShared>,
        gsi: u32,
        fd: &EventFd,
    ) -> std::io::Result<()> {
        let fd = fd.try_clone()?;
        self.shared
            .list
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((gsi, fd));
        let mut thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if thread.is_none() {
            let (shared, vm) = (self.shared.clone(), vm.clone());
            *thread = Some(std::thread::Builder::new().name("emu-irqfd".into()).spawn(
                move || {
                    sandbox::enter(sandbox::Role::Io);
                    serve(&shared, &vm)
                },
            )?);
        }
        self.shared.control.write(1)
    }
}

impl Drop for Irqfds {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.shared.control.write(1) {
            tracing::warn!("stopping the irqfd thread: {e}");
            return;
        }
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// The irqfd thread: waits for writes to any irqfd and raises their GSIs.
fn serve(shared: &IrqfdShared, vm: &VmShared) {
    let mut gsis: Vec<u32> = Vec::new();
    let mut pfds: Vec<libc::pollfd> = Vec::new();
    let pollfd = |fd: i32| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let mut reload = true;
    while !shared.stop.load(Ordering::SeqCst) {
        if reload {
            // The list only grows and its eventfds stay open while listed, so the raw
            // descriptors copied here stay valid.
            let list = shared.list.lock().unwrap_or_else(|p| p.into_inner());
            gsis = list.iter().map(|(g, _)| *g).collect();
            pfds = std::iter::once(shared.control.as_raw_fd())
                .chain(list.iter().map(|(_, fd)| fd.as_raw_fd()))
                .map(pollfd)
                .collect();
            reload = false;
        }
        // SAFETY: `pfds` is a valid array of pollfd for the duration of the call.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::error!("irqfd thread: poll: {e}; interrupts through irqfds stop");
                return;
            }
            continue;
        }
        if pfds.first().is_some_and(|p| p.revents != 0) {
            let _ = shared.control.read();
            reload = true;
        }
        for (p, &gsi) in pfds.iter().skip(1).zip(&gsis) {
            if p.revents & libc::POLLIN == 0 {
                continue;
            }
            let mut count = 0u64;
            // SAFETY: `p.fd` is an open eventfd (see above); reading its 8-byte counter
            // into a local resets it.
            let r = unsafe { libc::read(p.fd, std::ptr::addr_of_mut!(count).cast(), 8) };
            if r == 8 {
                vm.chip.set_irq_line(gsi, true);
                vm.chip.set_irq_line(gsi, false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ioevent_matches_its_address_and_value_only() {
        let ev = IoEvents::default();
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        let at = IoEventAddress::Mmio(0xd000_0050);
        assert!(!ev.signal(at, &1u32.to_le_bytes()), "nothing registered");
        ev.register(at, Some(1), &fd).unwrap();
        assert!(!ev.signal(at, &0u32.to_le_bytes()), "other value");
        assert!(!ev.signal(at, &[1, 0]), "other size");
        assert!(!ev.signal(IoEventAddress::Mmio(0xd000_0054), &1u32.to_le_bytes()));
        assert!(!ev.signal(IoEventAddress::Pio(0x50), &1u32.to_le_bytes()));
        assert!(
            fd.read().is_err(),
            "signalled by a write that did not match"
        );
        assert!(ev.signal(at, &1u32.to_le_bytes()));
        assert!(ev.signal(at, &1u32.to_le_bytes()));
        assert_eq!(fd.read().unwrap(), 2);
        let any = EventFd::new(EFD_NONBLOCK).unwrap();
        ev.register(IoEventAddress::Pio(0x510), None, &any).unwrap();
        assert!(ev.signal(IoEventAddress::Pio(0x510), &[7]));
        assert_eq!(any.read().unwrap(), 1);
    }

    #[test]
    fn an_unregistered_ioevent_lets_writes_through_again() {
        let ev = IoEvents::default();
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        let at = IoEventAddress::Mmio(0xe000_3000);
        ev.register(at, None, &fd).unwrap();
        assert!(ev.signal(at, &[0, 0]));
        assert!(!ev.unregister(at, Some(0)), "no such datamatch registered");
        assert!(ev.unregister(at, None));
        assert!(
            !ev.signal(at, &[0, 0]),
            "still signalled after unregistering"
        );
        assert!(!ev.unregister(at, None), "unregistered twice");
        assert_eq!(fd.read().unwrap(), 1);
    }
}
