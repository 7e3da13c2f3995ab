//! The `emu` accelerator: Vessel's software x86-64 CPU (`x86emu`) and the user-space
//! interrupt controllers (`devices::irqchip`) behind the `hypervisor` traits, so the VMM
//! runs a VM the same way whether KVM or the emulator executes it.

pub mod clock;
pub mod convert;
pub mod cpuid;
mod eventfds;
pub mod hybrid;
pub mod kvmclock;
pub mod persist;
pub mod platform;
pub mod vcpu;

use std::sync::{Arc, Mutex};

use devices::irqchip::chip::UserIrqChip;
use hypervisor::{CpuIdEntry, EventFd, Hypervisor, IoEventAddress, IrqChip, Result, Vcpu, Vm};
use x86emu::code::CodeTracker;
use x86emu::{Cpu, GuestRam};

use clock::VmClock;

/// The LAPIC timer's input clock: 1 GHz, like the TSC, so one tick is one nanosecond.
pub const LAPIC_TIMER_HZ: u64 = 1_000_000_000;

/// The software-CPU accelerator; in hybrid mode guest user code runs on KVM (see
/// [`hybrid`]).
#[derive(Debug, Default)]
pub struct EmuHypervisor {
    hybrid: bool,
}

impl EmuHypervisor {
    pub fn new() -> Self {
        EmuHypervisor { hybrid: false }
    }

    /// The `hybrid` accelerator: the guest kernel on x86emu, long stretches of guest user
    /// code on a KVM vCPU (PVM hosts run CPL3 code natively).
    pub fn hybrid() -> Self {
        EmuHypervisor { hybrid: true }
    }
}

impl Hypervisor for EmuHypervisor {
    fn name(&self) -> &'static str {
        if self.hybrid {
            "hybrid"
        } else {
            "emu"
        }
    }

    fn create_vm(&self, cpus: u8) -> Result<Arc<dyn Vm>> {
        let kvm = if self.hybrid {
            let vm = hybrid::HybridVm::new().map_err(|e| hypervisor::Error::Unsupported {
                what: e.to_string(),
            })?;
            Some(Arc::new(vm))
        } else {
            None
        };
        // With user code reading the host's TSC natively, the guest TSC is the host's.
        let clock = match &kvm {
            Some(k) => VmClock::with_host_tsc(k.tsc_hz()),
            None => VmClock::new(),
        };
        let chip = UserIrqChip::new(u32::from(cpus.max(1)), LAPIC_TIMER_HZ, clock.tsc_hz());
        let irqfds = eventfds::Irqfds::new().map_err(|e| hypervisor::Error::VmIoctl {
            op: "creating the irqfd thread's eventfd",
            source: e,
        })?;
        Ok(Arc::new(EmuVm {
            shared: Arc::new(VmShared {
                chip,
                clock,
                ioevents: eventfds::IoEvents::default(),
                moderate: kvm.is_none(),
                poll_cpus: if cpus > 1 { host_cpus() } else { 0 },
            }),
            irqfds,
            code: Arc::new(Mutex::new(None)),
            compiled: Mutex::new(None),
            decoded: x86emu::DecodedBlocks::default(),
            writes_reported: Default::default(),
            regions: Mutex::new(Vec::new()),
            kvm,
            cpus: cpus.max(1),
        }))
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuIdEntry>> {
        let mut c = cpuid::supported();
        if self.hybrid {
            cpuid::restrict_for_hybrid(&mut c);
        }
        Ok(c)
    }
}

/// What every vCPU of one VM shares.
pub(crate) struct VmShared {
    pub(crate) chip: UserIrqChip,
    pub(crate) clock: VmClock,
    pub(crate) ioevents: eventfds::IoEvents,
    /// Whether device interrupts may be held until a vCPU halts (not in hybrid mode).
    pub(crate) moderate: bool,
    /// A halted vCPU polls before it sleeps while at most this many vCPUs are awake
    /// (itself included): the host CPUs, on a VM with 2 or more vCPUs (0: never). Polling
    /// where more vCPUs are awake than host CPUs would take a CPU from one the poller
    /// may be waiting for; where fewer are (most of an 8-vCPU guest's vCPUs idle on a
    /// 2-core host), it spares the poller a wake-up: a guest's cross-CPU pipe round trip
    /// took 228 µs there with every halt sleeping, and 54 µs polling.
    pub(crate) poll_cpus: usize,
}

impl VmShared {
    /// Whether a halted vCPU may poll now (see `poll_cpus`).
    pub(crate) fn may_poll(&self) -> bool {
        self.chip.awake_cpus() <= self.poll_cpus
    }
}

/// The host CPUs this process may run on (its affinity and cgroup quota).
fn host_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

struct Region {
    gpa: u64,
    host: usize,
    len: u64,
}

struct EmuVm {
    shared: Arc<VmShared>,
    irqfds: eventfds::Irqfds,
    regions: Mutex<Vec<Region>>,
    /// The vCPUs' shared record of code pages (the first vCPU's), so code one writes is
    /// checked again by the others.
    code: Arc<Mutex<Option<Arc<CodeTracker>>>>,
    /// The vCPUs' shared compiled code (the first compiling vCPU's): a block is compiled
    /// once per VM, and a vCPU runs at once what another compiled.
    compiled: Mutex<Option<x86emu::CodeCache>>,
    /// The vCPUs' shared decoded blocks: a block is decoded once per VM while its bytes
    /// stay the same.
    decoded: x86emu::DecodedBlocks,
    /// The VMM reports device writes to RAM (see `ram_write_observer`), so vCPUs need not
    /// check their cached code against memory on every slice.
    writes_reported: std::sync::atomic::AtomicBool,
    /// The KVM VM user code runs in (hybrid mode).
    kvm: Option<Arc<hybrid::HybridVm>>,
    /// vCPUs the VM was created for.
    cpus: u8,
}

struct ChipHandle(Arc<VmShared>);

impl IrqChip for ChipHandle {
    fn set_irq_line(&self, gsi: u32, active: bool) -> Result<()> {
        self.0.chip.set_irq_line(gsi, active);
        Ok(())
    }
    fn signal_msi(&self, address: u64, data: u32) -> Result<()> {
        self.0.chip.signal_msi(address, data);
        Ok(())
    }
    fn moderates(&self) -> bool {
        // A hybrid vCPU runs guest user code on KVM for stretches that end only at its
        // next timer, which would hold an interrupt that long: not moderated there.
        self.0.moderate
    }
    fn pulse_irq_line_moderated(&self, gsi: u32, max_delay: std::time::Duration) -> Result<()> {
        self.0.chip.pulse_irq_line_moderated(gsi, max_delay);
        Ok(())
    }
    fn signal_msi_moderated(
        &self,
        address: u64,
        data: u32,
        max_delay: std::time::Duration,
    ) -> Result<()> {
        self.0.chip.signal_msi_moderated(address, data, max_delay);
        Ok(())
    }
    fn release_moderated(&self) {
        self.0.chip.release_held();
    }
    fn pulse_irq_line_at_halt(&self, gsi: u32, max_delay: std::time::Duration) -> Result<()> {
        if self.0.moderate {
            self.0.chip.pulse_irq_line_at_halt(gsi, max_delay);
        } else {
            self.0.chip.set_irq_line(gsi, true);
            self.0.chip.set_irq_line(gsi, false);
        }
        Ok(())
    }
    fn signal_msi_at_halt(
        &self,
        address: u64,
        data: u32,
        max_delay: std::time::Duration,
    ) -> Result<()> {
        if self.0.moderate {
            self.0.chip.signal_msi_at_halt(address, data, max_delay);
        } else {
            self.0.chip.signal_msi(address, data);
        }
        Ok(())
    }
}

impl EmuVm {
    fn ram_map(&self) -> Result<GuestRam> {
        let mut ram = GuestRam::new();
        let regions = self.regions.lock().unwrap_or_else(|p| p.into_inner());
        for r in regions.iter() {
            // SAFETY: add_memory_region's contract: the host range outlives the VM.
            unsafe { ram.add_region(r.gpa, r.host as *mut u8, r.len as usize) }.map_err(|e| {
                hypervisor::Error::Unsupported {
                    what: format!("guest RAM layout: {e}"),
                }
            })?;
        }
        Ok(ram)
    }
}

impl Vm for EmuVm {
    fn host_fd(&self) -> Option<std::os::fd::RawFd> {
        self.kvm.as_ref().map(|k| k.raw_fd())
    }

    unsafe fn add_memory_region(
        &self,
        _slot: u32,
        guest_addr: u64,
        host_addr: *mut u8,
        size: u64,
    ) -> Result<()> {
        if let Some(k) = &self.kvm {
            // SAFETY: add_memory_region's contract: the host range outlives the VM.
            unsafe { k.add_region(guest_addr, host_addr, size) }.map_err(|e| {
                hypervisor::Error::Unsupported {
                    what: e.to_string(),
                }
            })?;
        }
        self.regions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Region {
                gpa: guest_addr,
                host: host_addr as usize,
                len: size,
            });
        Ok(())
    }

    fn ram_write_observer(&self) -> Option<Arc<dyn Fn(u64, u64) + Send + Sync>> {
        self.writes_reported
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let code = self.code.clone();
        Some(Arc::new(move |gpa, len| {
            let t = code.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(t) = &*t {
                t.note_external_write(gpa, len);
            }
        }))
    }

    fn take_dirty_log(&self) -> Result<Vec<u64>> {
        // In hybrid mode user code writes RAM natively, where nothing sees it.
        if self.kvm.is_some() {
            return Err(hypervisor::Error::Unsupported {
                what: "dirty page tracking with the hybrid accelerator".into(),
            });
        }
        let code = self.code.lock().unwrap_or_else(|p| p.into_inner());
        match &*code {
            Some(t) => Ok(t.take_dirty_log()),
            None => Err(hypervisor::Error::Unsupported {
                what: "dirty page tracking before the vCPUs exist".into(),
            }),
        }
    }

    fn dirty_log_is_free(&self) -> bool {
        self.kvm.is_none()
    }

    fn stop_dirty_log(&self) {
        if let Some(t) = &*self.code.lock().unwrap_or_else(|p| p.into_inner()) {
            t.stop_dirty_log();
        }
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>> {
        let mut cpu = Cpu::new(self.ram_map()?);
        // Each vCPU caches the blocks it decodes; together they get about what one would
        // (each filled slot holds memory), but no fewer than 64k each.
        if self.cpus > 1 {
            cpu.set_block_slots(
                (x86emu::DEFAULT_BLOCK_SLOTS / usize::from(self.cpus)).max(1 << 16),
            );
            // One that runs more of the guest's code than that (on a VM with more than 4
            // vCPUs) gets up to a quarter of what one vCPU gets: an 8-vCPU guest running
            // processes one after another took 8.25 ms per fork and exec against 9.97 ms
            // with 64k slots each, for 32 MB more RSS (256k each took 7.5 ms in one run,
            // for 24 MB more per vCPU).
            cpu.let_block_slots_grow(x86emu::DEFAULT_BLOCK_SLOTS / 4);
        }
        // In hybrid mode user code also writes RAM natively, unseen: the hybrid vCPU has
        // x86emu check its user code again after each native stint instead.
        if self
            .writes_reported
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            cpu.set_recheck_each_run(false);
        }
        cpu.set_tsc_epoch(self.shared.clock.epoch());
        if self.shared.clock.host_tsc() {
            cpu.set_tsc_host(true);
        }
        {
            let mut code = self.code.lock().unwrap_or_else(|p| p.into_inner());
            match &*code {
                Some(t) => cpu.set_code_tracker(t.clone()),
                None => *code = Some(cpu.code_tracker()),
            }
        }
        // Interrupts raised by device threads (virtio I/O threads, the console) are taken
        // at the next block boundary instead of at the end of the slice.
        if let Some(flag) = self.shared.chip.event_flag(id) {
            cpu.set_kick(flag);
        }
        // `VESSEL_EMU_JIT=0` interprets only (to compare); `=N` compiles blocks after N runs.
        if let Some(v) = std::env::var_os("VESSEL_EMU_JIT") {
            let threshold = v.to_str().and_then(|v| v.parse::<u32>().ok());
            cpu.set_jit_threshold(threshold.filter(|t| *t > 0));
        }
        {
            let mut compiled = self.compiled.lock().unwrap_or_else(|p| p.into_inner());
            match &*compiled {
                Some(c) => cpu.share_code(c),
                None => *compiled = cpu.code_cache(),
            }
        }
        if self.cpus > 1 {
            cpu.share_decoded(&self.decoded);
        }
        if id != 0 {
            // Application processors wait for INIT/SIPI from the bootstrap processor.
            cpu.init(true);
        }
        let hybrid = self.kvm.as_ref().map(|k| {
            let h = hybrid::HybridVcpu::new(k.clone(), id);
            let kicker = h.kicker();
            self.shared
                .chip
                .set_event_notifier(id, Arc::new(move || kicker.kick()));
            h
        });
        Ok(Box::new(vcpu::EmuVcpu::new(
            id,
            cpu,
            self.ram_map()?,
            self.shared.clone(),
            hybrid,
        )))
    }

    fn irq_chip(&self) -> Arc<dyn IrqChip> {
        Arc::new(ChipHandle(self.shared.clone()))
    }

    fn register_ioevent(
        &self,
        addr: IoEventAddress,
        datamatch: Option<u32>,
        fd: &EventFd,
    ) -> Result<()> {
        self.shared
            .ioevents
            .register(addr, datamatch, fd)
            .map_err(|source| hypervisor::Error::VmIoctl {
                op: "registering an ioevent",
                source,
            })
    }

    fn unregister_ioevent(
        &self,
        addr: IoEventAddress,
        datamatch: Option<u32>,
        _fd: &EventFd,
    ) -> Result<()> {
        if self.shared.ioevents.unregister(addr, datamatch) {
            Ok(())
        } else {
            Err(hypervisor::Error::VmIoctl {
                op: "unregistering an ioevent",
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })
        }
    }

    fn save_state(&self) -> Result<serde_json::Value> {
        persist::save_vm(&self.shared)
    }

    fn restore_state(&self, state: &serde_json::Value, elapsed_ns: u64) -> Result<()> {
        persist::restore_vm(&self.shared, state, elapsed_ns)
    }

    fn register_irqfd(&self, gsi: u32, fd: &EventFd) -> Result<()> {
        self.irqfds
            .register(&self.shared, gsi, fd)
            .map_err(|source| hypervisor::Error::VmIoctl {
                op: "registering an irqfd",
                source,
            })
    }

    fn inline_io(&self) -> bool {
        true
    }
}
