//! The `kvm` accelerator: hardware-assisted execution through `/dev/kvm` (kvm-ioctls).
//!
//! The interrupt controllers (LAPIC, IOAPIC, PIC) and the PIT live in the host kernel
//! (KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2); devices reach them through [`IrqChip`].

mod convert;
mod fxsave;
mod persist;

/// For backends that drive a KVM vCPU of their own (emu's hybrid mode).
pub use convert::{regs_from_kvm, regs_to_kvm};
pub use persist::cross_restore_blocker;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Once};

use kvm_bindings::{
    kvm_fpu, kvm_msi, kvm_pit_config, kvm_userspace_memory_region, CpuId, Msrs,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit as KvmExit, VcpuFd, VmFd};

use crate::regs::FxsaveFields;
use crate::{
    CpuIdEntry, Error, EventFd, FpuState, Hypervisor, IoEventAddress, IoHandler, IrqChip, MsrEntry,
    Regs, Result, Sregs, Vcpu, VcpuExit, VcpuKicker, Vm,
};

/// Where KVM puts the three pages it needs for real-mode TSS emulation on Intel hosts: just
/// below the 4 GiB boundary, inside the MMIO gap where no RAM or device lives.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

fn io_err(e: kvm_ioctls::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

/// `/dev/kvm`.
pub struct KvmHypervisor {
    kvm: Kvm,
}

impl std::fmt::Debug for KvmHypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmHypervisor").finish_non_exhaustive()
    }
}

impl KvmHypervisor {
    pub fn new() -> Result<Self> {
        let kvm = Kvm::new().map_err(|e| Error::OpenDevice {
            path: "/dev/kvm",
            source: io_err(e),
        })?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(Error::KvmApiVersion(version));
        }
        Ok(KvmHypervisor { kvm })
    }
}

impl Hypervisor for KvmHypervisor {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn create_vm(&self, _cpus: u8) -> Result<Arc<dyn Vm>> {
        let fd = self
            .kvm
            .create_vm()
            .map_err(|e| Error::CreateVm(io_err(e)))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(|e| Error::VmIoctl {
                op: "KVM_SET_TSS_ADDR",
                source: io_err(e),
            })?;
        fd.create_irq_chip()
            .map_err(|e| Error::CreateIrqChip(io_err(e)))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| Error::CreateIrqChip(io_err(e)))?;
        let fd = Arc::new(fd);
        Ok(Arc::new(KvmVm {
            irq: Arc::new(KvmIrqChip { fd: fd.clone() }),
            fd,
            slots: Mutex::new(Vec::new()),
            logging: Arc::default(),
            device_dirty: Arc::default(),
        }))
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuIdEntry>> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::VmIoctl {
                op: "KVM_GET_SUPPORTED_CPUID",
                source: io_err(e),
            })?;
        Ok(cpuid
            .as_slice()
            .iter()
            .map(|e| CpuIdEntry {
                function: e.function,
                index: e.index,
                significant_index: e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            })
            .collect())
    }
}

struct KvmVm {
    fd: Arc<VmFd>,
    irq: Arc<KvmIrqChip>,
    /// The memory slots as set, to switch dirty logging on and off.
    slots: Mutex<Vec<kvm_userspace_memory_region>>,
    /// KVM_MEM_LOG_DIRTY_PAGES is on for every slot (it costs the guest write faults and
    /// huge pages, so only while a migration or Diff snapshot wants it).
    logging: Arc<std::sync::atomic::AtomicBool>,
    /// Pages the VMM's devices wrote while logging, by page number: KVM logs only what
    /// the guest writes.
    device_dirty: Arc<Mutex<Vec<u64>>>,
}

impl KvmVm {
    /// Sets every slot again with dirty logging on or off.
    fn set_logging(&self, slots: &[kvm_userspace_memory_region], on: bool) -> Result<()> {
        for s in slots {
            let mut r = *s;
            r.flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
            // SAFETY: the same host range this slot was created with, which the VM's
            // owner keeps mapped for the VM's life (add_memory_region's contract).
            unsafe { self.fd.set_user_memory_region(r) }.map_err(|e| Error::VmIoctl {
                op: "KVM_SET_USER_MEMORY_REGION (dirty logging)",
                source: io_err(e),
            })?;
        }
        Ok(())
    }
}

fn set_page(map: &mut [u64], pfn: u64) {
    if let Some(w) = usize::try_from(pfn / 64).ok().and_then(|i| map.get_mut(i)) {
        *w |= 1 << (pfn % 64);
    }
}

impl Vm for KvmVm {
    fn host_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(std::os::fd::AsRawFd::as_raw_fd(self.fd.as_ref()))
    }

    unsafe fn add_memory_region(
        &self,
        slot: u32,
        guest_addr: u64,
        host_addr: *mut u8,
        size: u64,
    ) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr as u64,
        };
        // SAFETY: the caller guarantees the host range stays mapped for the VM's lifetime.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(|e| Error::SetMemoryRegion {
            guest_addr,
            size,
            source: io_err(e),
        })?;
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(region);
        Ok(())
    }

    fn ram_write_observer(&self) -> Option<Arc<dyn Fn(u64, u64) + Send + Sync>> {
        let (logging, dirty) = (self.logging.clone(), self.device_dirty.clone());
        Some(Arc::new(move |gpa, len| {
            if len == 0 || !logging.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let mut map = dirty.lock().unwrap_or_else(|p| p.into_inner());
            for pfn in gpa / 4096..=gpa.saturating_add(len - 1) / 4096 {
                set_page(&mut map, pfn);
            }
        }))
    }

    fn take_dirty_log(&self) -> Result<Vec<u64>> {
        use std::sync::atomic::Ordering::SeqCst;
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let end = slots
            .iter()
            .map(|s| s.guest_phys_addr + s.memory_size)
            .max()
            .unwrap_or(0);
        let words = usize::try_from(end / 4096)
            .map_err(|_| Error::Unsupported {
                what: "a dirty log of this much memory".into(),
            })?
            .div_ceil(64);
        if !self.logging.load(SeqCst) {
            *self.device_dirty.lock().unwrap_or_else(|p| p.into_inner()) = vec![0; words];
            self.logging.store(true, SeqCst);
            self.set_logging(&slots, true)?;
            return Ok(vec![!0; words]);
        }
        let mut out = std::mem::replace(
            &mut *self.device_dirty.lock().unwrap_or_else(|p| p.into_inner()),
            vec![0; words],
        );
        out.resize(words, 0);
        for s in slots.iter() {
            let size = usize::try_from(s.memory_size).map_err(|_| Error::Unsupported {
                what: "a dirty log of this much memory".into(),
            })?;
            let bits = self
                .fd
                .get_dirty_log(s.slot, size)
                .map_err(|e| Error::VmIoctl {
                    op: "KVM_GET_DIRTY_LOG",
                    source: io_err(e),
                })?;
            let base = s.guest_phys_addr / 4096;
            for (i, &w) in bits.iter().enumerate().filter(|(_, w)| **w != 0) {
                for b in 0..64 {
                    if w >> b & 1 == 1 {
                        set_page(&mut out, base + i as u64 * 64 + b);
                    }
                }
            }
        }
        Ok(out)
    }

    fn stop_dirty_log(&self) {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if self
            .logging
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            if let Err(e) = self.set_logging(&slots, false) {
                tracing::warn!("turning dirty logging off: {e}");
            }
        }
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>> {
        let mut fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| Error::CreateVcpu {
                id,
                source: io_err(e),
            })?;
        install_kick_handler();
        let immediate_exit = std::ptr::addr_of_mut!(fd.get_kvm_run().immediate_exit);
        Ok(Box::new(KvmVcpu {
            fd,
            immediate_exit,
            thread: None,
            kicker: Arc::new(KvmKicker {
                state: Mutex::new(KickTarget {
                    immediate_exit: Some(immediate_exit as usize),
                    thread: None,
                }),
            }),
        }))
    }

    fn irq_chip(&self) -> Arc<dyn IrqChip> {
        self.irq.clone()
    }

    fn save_state(&self) -> Result<serde_json::Value> {
        persist::save_vm(self)
    }

    fn restore_state(&self, state: &serde_json::Value, elapsed_ns: u64) -> Result<()> {
        persist::restore_vm(self, state, elapsed_ns)
    }

    fn register_ioevent(
        &self,
        addr: IoEventAddress,
        datamatch: Option<u32>,
        fd: &EventFd,
    ) -> Result<()> {
        let addr = kvm_ioevent_address(addr);
        match datamatch {
            Some(v) => self.fd.register_ioevent(fd, &addr, v),
            None => self.fd.register_ioevent(fd, &addr, kvm_ioctls::NoDatamatch),
        }
        .map_err(|e| Error::VmIoctl {
            op: "KVM_IOEVENTFD",
            source: io_err(e),
        })
    }

    fn unregister_ioevent(
        &self,
        addr: IoEventAddress,
        datamatch: Option<u32>,
        fd: &EventFd,
    ) -> Result<()> {
        let addr = kvm_ioevent_address(addr);
        match datamatch {
            Some(v) => self.fd.unregister_ioevent(fd, &addr, v),
            None => self
                .fd
                .unregister_ioevent(fd, &addr, kvm_ioctls::NoDatamatch),
        }
        .map_err(|e| Error::VmIoctl {
            op: "KVM_IOEVENTFD (deassign)",
            source: io_err(e),
        })
    }

    fn register_irqfd(&self, gsi: u32, fd: &EventFd) -> Result<()> {
        self.fd.register_irqfd(fd, gsi).map_err(|e| Error::VmIoctl {
            op: "KVM_IRQFD",
            source: io_err(e),
        })
    }
}

fn kvm_ioevent_address(addr: IoEventAddress) -> kvm_ioctls::IoEventAddress {
    match addr {
        IoEventAddress::Pio(port) => kvm_ioctls::IoEventAddress::Pio(u64::from(port)),
        IoEventAddress::Mmio(a) => kvm_ioctls::IoEventAddress::Mmio(a),
    }
}

/// The signal that interrupts KVM_RUN; its handler does nothing.
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick) {
            tracing::warn!(?e, "cannot install the vCPU kick handler");
        }
    });
}

/// What a kick reaches, while the vCPU exists.
struct KickTarget {
    /// The address of the vCPU's `kvm_run.immediate_exit`; None once the vCPU is gone.
    immediate_exit: Option<usize>,
    /// The thread that last ran the vCPU.
    thread: Option<libc::pthread_t>,
}

/// KVM's kick: `immediate_exit` set (a KVM_RUN about to start returns at once), then the
/// kick signal to the vCPU's thread (one in progress returns with EINTR).
struct KvmKicker {
    state: Mutex<KickTarget>,
}

impl VcpuKicker for KvmKicker {
    fn kick(&self) {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(addr) = st.immediate_exit else {
            return;
        };
        // SAFETY: `addr` is the immediate_exit byte of a kvm_run mapping that stays
        // mapped while the vCPU exists; the vCPU's Drop clears `immediate_exit` under
        // this lock before its mapping goes. The kernel and the vCPU thread only access
        // it as a byte, and every Rust access is atomic.
        unsafe { AtomicU8::from_ptr(addr as *mut u8) }.store(1, Ordering::SeqCst);
        if let Some(t) = st.thread {
            // SAFETY: `t` ran this vCPU and owns it; it clears `thread` (under this lock)
            // when it drops the vCPU, so it has not exited yet.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }
}

struct KvmIrqChip {
    fd: Arc<VmFd>,
}

impl IrqChip for KvmIrqChip {
    fn set_irq_line(&self, gsi: u32, active: bool) -> Result<()> {
        self.fd
            .set_irq_line(gsi, active)
            .map_err(|e| Error::VmIoctl {
                op: "KVM_IRQ_LINE",
                source: io_err(e),
            })
    }

    fn signal_msi(&self, address: u64, data: u32) -> Result<()> {
        let msi = kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        self.fd
            .signal_msi(msi)
            .map(|_| ())
            .map_err(|e| Error::VmIoctl {
                op: "KVM_SIGNAL_MSI",
                source: io_err(e),
            })
    }
}

struct KvmVcpu {
    fd: VcpuFd,
    /// `kvm_run.immediate_exit` in `fd`'s mapping.
    immediate_exit: *mut u8,
    /// The thread `kicker` signals, as last told.
    thread: Option<libc::pthread_t>,
    kicker: Arc<KvmKicker>,
}

// SAFETY: `immediate_exit` points into the vCPU's own kvm_run mapping (owned by `fd`,
// which is Send) and is only accessed atomically.
unsafe impl Send for KvmVcpu {}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        let mut st = self.kicker.state.lock().unwrap_or_else(|p| p.into_inner());
        st.immediate_exit = None;
        st.thread = None;
    }
}

fn vcpu_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |e| Error::VcpuIoctl {
        op,
        source: io_err(e),
    }
}

/// LAPIC register offsets and delivery modes for LINT0/LINT1 set-up.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

fn lvt_with_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

impl Vcpu for KvmVcpu {
    fn host_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(std::os::fd::AsRawFd::as_raw_fd(&self.fd))
    }

    fn save_state(&self) -> Result<serde_json::Value> {
        persist::save_vcpu(self)
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<()> {
        persist::restore_vcpu(self, state)
    }

    fn regs(&self) -> Result<Regs> {
        let r = self.fd.get_regs().map_err(vcpu_err("KVM_GET_REGS"))?;
        Ok(convert::regs_from_kvm(&r))
    }

    fn set_regs(&mut self, regs: &Regs) -> Result<()> {
        self.fd
            .set_regs(&convert::regs_to_kvm(regs))
            .map_err(vcpu_err("KVM_SET_REGS"))
    }

    fn sregs(&self) -> Result<Sregs> {
        let s = self.fd.get_sregs().map_err(vcpu_err("KVM_GET_SREGS"))?;
        Ok(convert::sregs_from_kvm(&s))
    }

    fn set_sregs(&mut self, sregs: &Sregs) -> Result<()> {
        let mut k = self.fd.get_sregs().map_err(vcpu_err("KVM_GET_SREGS"))?;
        convert::sregs_into_kvm(sregs, &mut k);
        self.fd.set_sregs(&k).map_err(vcpu_err("KVM_SET_SREGS"))
    }

    /// From KVM_GET_XSAVE where the host has it: the kernel fills the legacy area of
    /// its XSAVE image in full, with the reset values of the parts the guest left in
    /// their initial state. KVM_GET_FPU copies that area raw, so on an XSAVE host it
    /// gives a stale or zero MXCSR and XMM registers whose component is not marked in use.
    fn fpu(&self) -> Result<FpuState> {
        if let Ok(x) = self.fd.get_xsave() {
            return Ok(FpuState {
                fxsave: fxsave::from_xsave(&x),
            });
        }
        let f = self.fd.get_fpu().map_err(vcpu_err("KVM_GET_FPU"))?;
        Ok(FpuState::from_fields(&FxsaveFields {
            fcw: f.fcw,
            fsw: f.fsw,
            ftw: f.ftwx,
            fop: f.last_opcode,
            fip: f.last_ip,
            fdp: f.last_dp,
            mxcsr: f.mxcsr,
            st: f.fpr,
            xmm: f.xmm,
        }))
    }

    /// Through KVM_SET_XSAVE where the host has it, with the x87 and SSE components
    /// marked in use. KVM_SET_FPU writes the legacy area only: the kernel's XRSTOR then
    /// loads the initial state of any component its header does not mark (a fresh vCPU's
    /// XMM registers come back as zeros).
    fn set_fpu(&mut self, fpu: &FpuState) -> Result<()> {
        if let Ok(mut x) = self.fd.get_xsave() {
            fxsave::into_xsave(&fpu.fxsave, &mut x);
            // SAFETY: `x` is a whole 4 KiB kvm_xsave, as KVM_GET_XSAVE filled it. KVM
            // reads its guest FPU's uabi size, larger only for a process that asked for
            // dynamic XSAVE features (AMX) for its guests; Vessel never does.
            return unsafe { self.fd.set_xsave(&x) }.map_err(vcpu_err("KVM_SET_XSAVE"));
        }
        let x = fpu.fields();
        let f = kvm_fpu {
            fcw: x.fcw,
            fsw: x.fsw,
            ftwx: x.ftw,
            last_opcode: x.fop,
            last_ip: x.fip,
            last_dp: x.fdp,
            mxcsr: x.mxcsr,
            fpr: x.st,
            xmm: x.xmm,
            ..Default::default()
        };
        self.fd.set_fpu(&f).map_err(vcpu_err("KVM_SET_FPU"))
    }

    fn set_cpuid(&mut self, entries: &[CpuIdEntry]) -> Result<()> {
        let kvm_entries: Vec<_> = entries
            .iter()
            .map(|e| kvm_bindings::kvm_cpuid_entry2 {
                function: e.function,
                index: e.index,
                flags: if e.significant_index {
                    kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX
                } else {
                    0
                },
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
                ..Default::default()
            })
            .collect();
        let cpuid = CpuId::from_entries(&kvm_entries).map_err(|_| Error::Unsupported {
            what: format!("a CPUID table of {} entries", entries.len()),
        })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(vcpu_err("KVM_SET_CPUID2"))
    }

    fn set_msrs(&mut self, msrs: &[MsrEntry]) -> Result<()> {
        let entries: Vec<_> = msrs
            .iter()
            .map(|m| kvm_bindings::kvm_msr_entry {
                index: m.index,
                data: m.value,
                ..Default::default()
            })
            .collect();
        let kmsrs = Msrs::from_entries(&entries).map_err(|_| Error::Unsupported {
            what: format!("an MSR list of {} entries", msrs.len()),
        })?;
        let written = self.fd.set_msrs(&kmsrs).map_err(vcpu_err("KVM_SET_MSRS"))?;
        if written != msrs.len() {
            let failed = msrs.get(written).map(|m| m.index).unwrap_or_default();
            return Err(Error::Unsupported {
                what: format!("MSR {failed:#x}"),
            });
        }
        Ok(())
    }

    fn msrs(&self, indices: &[u32]) -> Result<Vec<MsrEntry>> {
        let entries: Vec<_> = indices
            .iter()
            .map(|&index| kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut kmsrs = Msrs::from_entries(&entries).map_err(|_| Error::Unsupported {
            what: format!("an MSR list of {} entries", indices.len()),
        })?;
        let read = self
            .fd
            .get_msrs(&mut kmsrs)
            .map_err(vcpu_err("KVM_GET_MSRS"))?;
        Ok(kmsrs.as_slice()[..read]
            .iter()
            .map(|e| MsrEntry {
                index: e.index,
                value: e.data,
            })
            .collect())
    }

    fn guest_paused(&mut self) -> Result<()> {
        // EINVAL when the guest has not enabled kvmclock: nothing to tell it then.
        if let Err(e) = self.fd.kvmclock_ctrl() {
            tracing::debug!("KVM_KVMCLOCK_CTRL: {e}");
        }
        Ok(())
    }

    fn configure_local_interrupts(&mut self) -> Result<()> {
        let mut lapic = self.fd.get_lapic().map_err(vcpu_err("KVM_GET_LAPIC"))?;
        for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let mut b = [0u8; 4];
            for (i, byte) in b.iter_mut().enumerate() {
                *byte = lapic.regs[offset + i] as u8;
            }
            let v = lvt_with_mode(u32::from_le_bytes(b), mode).to_le_bytes();
            for (i, byte) in v.iter().enumerate() {
                lapic.regs[offset + i] = *byte as _;
            }
        }
        self.fd.set_lapic(&lapic).map_err(vcpu_err("KVM_SET_LAPIC"))
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        self.kicker.clone()
    }

    fn run(&mut self, io: &dyn IoHandler) -> Result<VcpuExit> {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        if self.thread != Some(me) {
            self.thread = Some(me);
            self.kicker
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .thread = Some(me);
        }
        let immediate_exit = self.immediate_exit;
        let result = self.fd.run();
        if matches!(&result, Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN) {
            // The kick is taken: the caller looks at its state next.
            // SAFETY: the byte lives in `fd`'s kvm_run mapping, valid while `self` is,
            // and is only accessed atomically from Rust (see KvmKicker).
            unsafe { AtomicU8::from_ptr(immediate_exit) }.store(0, Ordering::SeqCst);
        }
        match result {
            Ok(exit) => Ok(match exit {
                KvmExit::IoIn(port, data) => {
                    io.pio_read(port, data);
                    VcpuExit::Io
                }
                KvmExit::IoOut(port, data) => {
                    io.pio_write(port, data);
                    VcpuExit::Io
                }
                KvmExit::MmioRead(addr, data) => {
                    io.mmio_read(addr, data);
                    VcpuExit::Io
                }
                KvmExit::MmioWrite(addr, data) => {
                    io.mmio_write(addr, data);
                    VcpuExit::Io
                }
                KvmExit::Hlt => VcpuExit::Hlt,
                KvmExit::Shutdown => VcpuExit::Shutdown,
                KvmExit::Intr => VcpuExit::Interrupted,
                KvmExit::SystemEvent(kind, _) => match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => VcpuExit::Reset,
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VcpuExit::PowerOff,
                    other => VcpuExit::InternalError(format!("system event {other}")),
                },
                KvmExit::FailEntry(reason, cpu) => VcpuExit::InternalError(format!(
                    "VM entry failed (hardware reason {reason:#x}, cpu {cpu})"
                )),
                KvmExit::InternalError => VcpuExit::InternalError(
                    "KVM internal error (an instruction KVM could not emulate)".to_string(),
                ),
                other => VcpuExit::InternalError(format!("unexpected KVM exit {other:?}")),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Ok(VcpuExit::Interrupted)
            }
            Err(e) => Err(Error::Run(io_err(e))),
        }
    }
}
