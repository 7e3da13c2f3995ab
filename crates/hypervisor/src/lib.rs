//! The accelerator seam: `Hypervisor` / `Vm` / `Vcpu` and the `VcpuExit` contract.
//!
//! Each backend (KVM through `/dev/kvm`, later Vessel's software CPU) implements these
//! traits. The VMM's run loop, device model and boot code only see this module:
//! - guest port and MMIO accesses reach the VMM through [`IoHandler`] *inside* `run()`, so
//!   both backends end in the same bus dispatch and `VcpuExit` stays small;
//! - interrupts leave devices through [`IrqChip`] (raise a GSI line, send an MSI), whether
//!   the interrupt controllers live in the host kernel or in user space;
//! - devices can also skip the VMM's buses both ways: a guest write to an address given
//!   to [`Vm::register_ioevent`] signals an eventfd, and a write to an eventfd given to
//!   [`Vm::register_irqfd`] raises a GSI (KVM does both in the kernel, emu in user space);
//! - another thread takes a vCPU out of `run()` with its [`Vcpu::kicker`].

pub mod host;
pub mod kvm;
pub mod regs;

use std::sync::Arc;

pub use vmm_sys_util::eventfd::EventFd;

pub use regs::{CpuIdEntry, DescriptorTable, FpuState, MsrEntry, Regs, Segment, Sregs};

/// Errors from an accelerator backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening {path}: {source}")]
    OpenDevice {
        path: &'static str,
        source: std::io::Error,
    },
    #[error("KVM API version {0} is not the supported version 12")]
    KvmApiVersion(i32),
    #[error("creating the VM: {0}")]
    CreateVm(#[source] std::io::Error),
    #[error("setting up the in-kernel interrupt controllers: {0}")]
    CreateIrqChip(#[source] std::io::Error),
    #[error("registering guest memory at {guest_addr:#x} (+{size:#x}): {source}")]
    SetMemoryRegion {
        guest_addr: u64,
        size: u64,
        source: std::io::Error,
    },
    #[error("creating vCPU {id}: {source}")]
    CreateVcpu { id: u32, source: std::io::Error },
    #[error("{op} on a vCPU: {source}")]
    VcpuIoctl {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("{op}: {source}")]
    VmIoctl {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("running the vCPU: {0}")]
    Run(#[source] std::io::Error),
    #[error("the backend rejected {what}")]
    Unsupported { what: String },
    #[error("snapshot state: {0}")]
    State(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Where a vCPU's port and MMIO accesses go. The VMM implements it over its buses.
///
/// Called from the vCPU thread in the middle of `Vcpu::run`; the data slices are exactly
/// the access size. Reads of nothing should fill `data` with 0xff, as an open bus does.
pub trait IoHandler: Sync {
    fn pio_read(&self, port: u16, data: &mut [u8]);
    fn pio_write(&self, port: u16, data: &[u8]);
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// Why `Vcpu::run` returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuExit {
    /// A port or MMIO access was handled through the `IoHandler`; run again.
    Io,
    /// The guest halted with interrupts that only the VMM can deliver (rare with an
    /// in-kernel irqchip, which sleeps in the kernel instead).
    Hlt,
    /// The vCPU was kicked (a signal, or a request to stop); the VMM checks its state.
    Interrupted,
    /// Triple fault or an equivalent unrecoverable CPU state: the machine resets.
    Shutdown,
    /// The guest asked for a reset through a paravirtual system event.
    Reset,
    /// The guest asked to power off through a paravirtual system event.
    PowerOff,
    /// The backend could not continue; the string says what it saw.
    InternalError(String),
}

/// Interrupt delivery, in the shape of the hardware: GSI lines into the IOAPIC/PIC pair,
/// and message-signalled interrupts. KVM backs it with its in-kernel irqchip; the software
/// CPU with the user-space controllers in `devices`.
pub trait IrqChip: Send + Sync {
    /// Drive a GSI line high or low.
    fn set_irq_line(&self, gsi: u32, active: bool) -> Result<()>;
    /// An edge on a GSI line: high then low.
    fn pulse_irq_line(&self, gsi: u32) -> Result<()> {
        self.set_irq_line(gsi, true)?;
        self.set_irq_line(gsi, false)
    }
    /// Deliver a message-signalled interrupt.
    fn signal_msi(&self, address: u64, data: u32) -> Result<()>;
    /// Whether this chip can hold an interrupt back until a vCPU halts
    /// ([`IrqChip::pulse_irq_line_moderated`]); when false those are plain deliveries.
    fn moderates(&self) -> bool {
        false
    }
    /// An edge on `gsi` that may wait, at most `max_delay`, while every vCPU is busy,
    /// and goes out when one halts: completions that come while the guest is still
    /// submitting requests then share one interrupt. A chip that cannot see its vCPUs
    /// halt (KVM's, in the kernel) delivers it now.
    fn pulse_irq_line_moderated(&self, gsi: u32, _max_delay: std::time::Duration) -> Result<()> {
        self.pulse_irq_line(gsi)
    }
    /// [`IrqChip::signal_msi`], held back as [`IrqChip::pulse_irq_line_moderated`] holds
    /// an edge.
    fn signal_msi_moderated(
        &self,
        address: u64,
        data: u32,
        _max_delay: std::time::Duration,
    ) -> Result<()> {
        self.signal_msi(address, data)
    }
    /// Delivers the interrupts [`IrqChip::pulse_irq_line_moderated`] and
    /// [`IrqChip::signal_msi_moderated`] hold back, now (a device that knows no more
    /// completions are coming soon).
    fn release_moderated(&self) {}
    /// An edge on `gsi` for a guest with several vCPUs to get when a vCPU halts rather
    /// than while the one that completed it still runs, even if another is idle (at most
    /// `max_delay` later; at once where the chip has one vCPU). A chip that cannot see its
    /// vCPUs halt delivers it as [`IrqChip::pulse_irq_line_moderated`] does.
    fn pulse_irq_line_at_halt(&self, gsi: u32, max_delay: std::time::Duration) -> Result<()> {
        self.pulse_irq_line_moderated(gsi, max_delay)
    }
    /// [`IrqChip::signal_msi`], held as [`IrqChip::pulse_irq_line_at_halt`] holds an edge
    /// (an MSI to a halted vCPU goes at once).
    fn signal_msi_at_halt(
        &self,
        address: u64,
        data: u32,
        max_delay: std::time::Duration,
    ) -> Result<()> {
        self.signal_msi_moderated(address, data, max_delay)
    }
}

/// Where a guest write signals an ioevent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoEventAddress {
    Pio(u16),
    Mmio(u64),
}

/// Takes a vCPU out of [`Vcpu::run`] from another thread: the `run` in progress returns
/// soon (KVM: at once; emu: within a slice or at once from a halt), and if none is in
/// progress the next one returns [`VcpuExit::Interrupted`] without running the guest,
/// so a kick is never lost between the caller's check of its state and `run`.
pub trait VcpuKicker: Send + Sync {
    fn kick(&self);
}

/// One accelerator on this host.
pub trait Hypervisor: Send + Sync {
    /// A short name for logs and messages ("kvm", "emu").
    fn name(&self) -> &'static str;
    /// Create an empty VM with its interrupt controllers, for `cpus` vCPUs (user-space
    /// interrupt controllers size themselves by it).
    fn create_vm(&self, cpus: u8) -> Result<Arc<dyn Vm>>;
    /// CPUID leaves this accelerator can present to a guest.
    fn supported_cpuid(&self) -> Result<Vec<CpuIdEntry>>;
}

/// One virtual machine: memory slots, vCPUs and its interrupt controllers.
pub trait Vm: Send + Sync {
    /// Map `size` bytes of host memory at `host_addr` as guest-physical `guest_addr`.
    ///
    /// # Safety
    /// The host range must stay mapped and valid for as long as the VM exists.
    unsafe fn add_memory_region(
        &self,
        slot: u32,
        guest_addr: u64,
        host_addr: *mut u8,
        size: u64,
    ) -> Result<()>;
    /// Create vCPU `id` (its APIC ID).
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>>;
    /// The interrupt controllers of this VM.
    fn irq_chip(&self) -> Arc<dyn IrqChip>;
    /// Where the VMM reports writes its devices make to guest RAM (guest-physical
    /// address, length), for an accelerator that caches what guest memory holds (emu's
    /// decoded code); None when nothing needs to hear of them. Ask before creating vCPUs.
    fn ram_write_observer(&self) -> Option<Arc<dyn Fn(u64, u64) + Send + Sync>> {
        None
    }
    /// Starts logging which guest pages are written, or takes the log running and starts
    /// the next: a bitmap of guest-physical page numbers (bit `pfn % 64` of word
    /// `pfn / 64`) written since the previous call, every page on the first. It covers
    /// the vCPUs' stores and the writes the VMM reports through
    /// [`Vm::ram_write_observer`]. Backends that cannot track writes refuse.
    fn take_dirty_log(&self) -> Result<Vec<u64>> {
        Err(Error::Unsupported {
            what: "dirty page tracking with this accelerator".into(),
        })
    }
    /// Ends the log [`Vm::take_dirty_log`] started.
    fn stop_dirty_log(&self) {}
    /// Whether keeping the dirty log costs the guest nothing worth noting, so the VMM may
    /// keep it running at all times (emu: a bit per page beside its code marks). KVM's
    /// costs write faults and huge pages: it runs only once something asks for it.
    fn dirty_log_is_free(&self) -> bool {
        false
    }
    /// The host descriptor this VM's requests go to (KVM's VM descriptor), for the
    /// VMM's seccomp filters, which allow VM requests on it alone; None when the VM has
    /// none (a software CPU with no KVM half).
    fn host_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// From now on a guest write to `addr` (of 4 bytes equal to `datamatch` when given,
    /// of any size otherwise) signals `fd` instead of reaching the VMM's buses.
    fn register_ioevent(
        &self,
        addr: IoEventAddress,
        datamatch: Option<u32>,
        fd: &EventFd,
    ) -> Result<()>;
    /// Undoes [`Vm::register_ioevent`] for `addr` and `datamatch` (a device whose
    /// registers moved: a virtio-pci BAR the guest placed elsewhere); writes there reach
    /// the buses again.
    fn unregister_ioevent(
        &self,
        addr: IoEventAddress,
        datamatch: Option<u32>,
        fd: &EventFd,
    ) -> Result<()>;
    /// From now on each write to `fd` is an edge on `gsi` (high then low), delivered
    /// without waking any VMM thread where the accelerator can.
    fn register_irqfd(&self, gsi: u32, fd: &EventFd) -> Result<()>;
    /// Whether a guest's MMIO and port accesses reach the VMM's buses on the vCPU thread
    /// without a costly exit (a software CPU): a device may then serve a notify on that
    /// thread at once, cheaper than waking an I/O thread through an ioevent.
    fn inline_io(&self) -> bool {
        false
    }
    /// The VM-wide state a snapshot keeps (interrupt controllers, timers, the VM's
    /// clock), in the backend's own shape; take it with every vCPU out of `run()`.
    /// Backends that cannot snapshot refuse.
    fn save_state(&self) -> Result<serde_json::Value> {
        Err(Error::Unsupported {
            what: "snapshots with this accelerator".into(),
        })
    }
    /// Puts the VM in the state [`Vm::save_state`] gave, before its vCPUs are restored
    /// and run; the VM's clock goes on from the saved time plus `elapsed_ns` (the time
    /// the VM spent saved, so guest time keeps up with the host's).
    fn restore_state(&self, _state: &serde_json::Value, _elapsed_ns: u64) -> Result<()> {
        Err(Error::Unsupported {
            what: "snapshots with this accelerator".into(),
        })
    }
}

/// One virtual CPU, driven from its own thread.
pub trait Vcpu: Send {
    fn regs(&self) -> Result<Regs>;
    fn set_regs(&mut self, regs: &Regs) -> Result<()>;
    fn sregs(&self) -> Result<Sregs>;
    fn set_sregs(&mut self, sregs: &Sregs) -> Result<()>;
    fn fpu(&self) -> Result<FpuState>;
    fn set_fpu(&mut self, fpu: &FpuState) -> Result<()>;
    fn set_cpuid(&mut self, entries: &[CpuIdEntry]) -> Result<()>;
    fn set_msrs(&mut self, msrs: &[MsrEntry]) -> Result<()>;
    fn msrs(&self, indices: &[u32]) -> Result<Vec<MsrEntry>>;
    /// Wire LINT0 as ExtINT (the PIC) and LINT1 as NMI, as firmware leaves a PC.
    fn configure_local_interrupts(&mut self) -> Result<()>;
    /// The handle other threads kick this vCPU with (pause, stop).
    fn kicker(&self) -> Arc<dyn VcpuKicker>;
    /// The host descriptor this vCPU's requests go to (KVM's vCPU descriptor), for its
    /// thread's seccomp filter, which allows vCPU requests on it alone; None when the
    /// vCPU has none (the software CPU; a hybrid vCPU whose KVM half KVM refused).
    fn host_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// Run until something needs the VMM. Port and MMIO accesses are handled through `io`.
    fn run(&mut self, io: &dyn IoHandler) -> Result<VcpuExit>;
    /// Tells the guest it was paused (kvmclock's "guest stopped" flag) so its watchdogs
    /// do not take the lost time for a lockup. Called after a pause, before running on.
    fn guest_paused(&mut self) -> Result<()> {
        Ok(())
    }
    /// The vCPU's whole state (registers, FPU/XSAVE, MSRs, pending events, its
    /// paravirtual clock), in the backend's own shape; take it between `run` calls.
    fn save_state(&self) -> Result<serde_json::Value> {
        Err(Error::Unsupported {
            what: "snapshots with this accelerator".into(),
        })
    }
    /// Puts the vCPU in the state [`Vcpu::save_state`] gave, after the VM's own state
    /// was restored (its clock decides the TSC).
    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<()> {
        Err(Error::Unsupported {
            what: "snapshots with this accelerator".into(),
        })
    }
}
