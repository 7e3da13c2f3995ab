//! The `virt`-like riscv64 machine: RAM at 2 GiB, OpenSBI as M-mode firmware, a device
//! tree generated here, CLINT (served by the CPU), PLIC, the 8250 UART, the Goldfish RTC,
//! virtio-mmio disks and the other virtio-mmio devices the VMM hands in (network,
//! entropy), and a SiFive test device for poweroff. [`boot`] loads everything and runs the hart.

mod fdt;
pub mod layout;
pub mod plic;
pub mod rtc;

use crate::cpu::{Cpu, RunExit, TimeSource};
use crate::ram::GuestRam;
use crate::Bus;
use devices::bus::BusDevice;
use devices::serial::{IrqTrigger, SerialDevice, SerialOut};
use layout::*;
use plic::Plic;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use virtio::mmio::MmioTransport;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// A disk for a virtio-blk slot.
#[derive(Clone, Debug)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub read_only: bool,
}

/// A virtio device besides the disks, built by the VMM (which owns the host side: a
/// TAP, a rate limiter), and what its I/O thread waits on besides the guest's notifies.
pub struct VirtioSpec {
    /// The I/O thread's name.
    pub name: String,
    pub device: Box<dyn virtio::VirtioDevice>,
    /// Host input for a queue (a TAP's descriptor for net's receive queue).
    pub host_input: Option<Box<dyn virtio::transport::HostInput>>,
    /// A queue served a while after its first notify (net's transmit queue).
    pub coalesce: Option<(usize, Duration)>,
}

/// What to boot.
pub struct VirtConfig {
    pub memory_mib: u64,
    /// OpenSBI's `fw_dynamic.bin`.
    pub firmware: PathBuf,
    /// A riscv64 Linux `Image`.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub disks: Vec<DiskSpec>,
    /// Further virtio devices, in slots after the disks.
    pub devices: Vec<VirtioSpec>,
    /// How many harts (1 to [`MAX_HARTS`]).
    pub harts: u32,
    /// Where the UART's output goes (its input is [`Machine::uart`]'s to feed).
    pub serial_out: SerialOut,
    /// The machine's end: set by the guest (poweroff, reset) or from outside (the
    /// VMM's stop or reset), which the hart sees between stints.
    pub exit: Arc<devices::ExitSignal>,
    /// The gate the I/O threads pass (closed while the VMM pauses the machine).
    pub io_gate: Arc<virtio::transport::IoGate>,
}

/// The VMM's hold on the hart: it passes this gate before each stint of guest code, so
/// a pause parks it between two stints (at most a budget of instructions or a WFI
/// wait later).
pub trait HartGate {
    /// Before a stint: false when the machine is ending instead (the hart then looks
    /// at the exit signal).
    fn enter(&self) -> bool;
    /// After the stint `enter` let through.
    fn leave(&self);
    /// First thing on the thread of each hart but the first (the caller's).
    fn hart_thread_started(&self) {}
}

/// A gate always open, for a machine nothing else controls.
#[derive(Debug, Default)]
pub struct OpenGate;

impl HartGate for OpenGate {
    fn enter(&self) -> bool {
        true
    }
    fn leave(&self) {}
}

/// How the machine ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtExit {
    Poweroff,
    Reset,
    /// The test device's failure command, with its code.
    Failure(u32),
    /// Ended from outside (the exit signal's reason: the VMM's stop or reset).
    Ended(devices::ExitReason),
}

#[derive(Debug, Error)]
pub enum VirtError {
    #[error("guest memory of {0} MiB: {1}")]
    Memory(u64, String),
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{what} ({size} bytes) does not fit in guest RAM at {at:#x}")]
    TooBig {
        what: &'static str,
        size: u64,
        at: u64,
    },
    #[error("{0} is not a riscv64 Linux Image (no RISCV magic in its header)")]
    NotAnImage(PathBuf),
    #[error("building the device tree: {0}")]
    Fdt(vm_fdt::Error),
    #[error("opening disk {0}: {1}")]
    Disk(PathBuf, block::OpenError),
    #[error("starting a device thread: {0}")]
    Thread(std::io::Error),
    #[error("more than {VIRTIO_SLOTS} virtio devices")]
    TooManyDevices,
    #[error("{0} harts: the machine takes 1 to {MAX_HARTS}")]
    Harts(u32),
}

/// The RTC and its line as last driven: the PLIC hears only changes (a level re-driven
/// high would pend again while the guest's handler runs).
#[derive(Debug, Default)]
struct RtcSlot {
    rtc: rtc::GoldfishRtc,
    line: bool,
}

/// Everything outside RAM and the CLINT, shared by the harts.
struct Devices {
    plic: Arc<Plic>,
    uart: Arc<Mutex<SerialDevice>>,
    virtio: Mutex<Vec<MmioTransport>>,
    rtc: Mutex<RtcSlot>,
    /// What the test device was told (poweroff, reset, failure).
    exit: Mutex<Option<VirtExit>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Devices {
    /// Fires the RTC's alarm when due and drives its line.
    fn poll_rtc(&self) {
        let mut slot = lock(&self.rtc);
        let level = slot.rtc.poll(rtc::host_now_ns());
        self.drive_rtc_line(&mut slot, level);
    }

    fn drive_rtc_line(&self, slot: &mut RtcSlot, level: bool) {
        if level != slot.line {
            slot.line = level;
            self.plic.set_line(RTC_IRQ, level);
        }
    }

    fn exit(&self) -> Option<VirtExit> {
        *lock(&self.exit)
    }
}

/// One hart's view of the platform: the shared devices, and its own PLIC output.
pub struct VirtBus {
    dev: Arc<Devices>,
    hart: usize,
}

impl Bus for VirtBus {
    fn read(&mut self, pa: u64, size: u8) -> Option<u64> {
        let n = size as usize;
        let dev = &self.dev;
        if pa.wrapping_sub(UART_BASE) < 0x100 {
            let mut b = [0u8; 8];
            lock(&dev.uart).read(pa - UART_BASE, &mut b[..n.min(1)]);
            return Some(b[0] as u64);
        }
        if pa.wrapping_sub(PLIC_BASE) < plic::SIZE {
            return Some(dev.plic.read(pa - PLIC_BASE) as u64);
        }
        let slot = pa.wrapping_sub(VIRTIO_BASE) / VIRTIO_STRIDE;
        if pa >= VIRTIO_BASE && slot < VIRTIO_SLOTS as u64 {
            let off = pa - VIRTIO_BASE - slot * VIRTIO_STRIDE;
            let mut virtio = lock(&dev.virtio);
            let Some(t) = virtio.get_mut(slot as usize) else {
                // An empty slot reads as magic 0: "no device".
                return Some(0);
            };
            let mut b = [0u8; 8];
            t.read(off, &mut b[..n]);
            return Some(u64::from_le_bytes(b));
        }
        if pa.wrapping_sub(TEST_BASE) < 0x1000 {
            return Some(0);
        }
        if pa.wrapping_sub(RTC_BASE) < rtc::SIZE {
            return Some(lock(&dev.rtc).rtc.read(pa - RTC_BASE, rtc::host_now_ns()) as u64);
        }
        None
    }

    fn write(&mut self, pa: u64, size: u8, value: u64) -> bool {
        let n = size as usize;
        let b = value.to_le_bytes();
        let dev = &self.dev;
        if pa.wrapping_sub(UART_BASE) < 0x100 {
            lock(&dev.uart).write(pa - UART_BASE, &b[..1]);
            return true;
        }
        if pa.wrapping_sub(PLIC_BASE) < plic::SIZE {
            dev.plic.write(pa - PLIC_BASE, value as u32);
            return true;
        }
        let slot = pa.wrapping_sub(VIRTIO_BASE) / VIRTIO_STRIDE;
        if pa >= VIRTIO_BASE && slot < VIRTIO_SLOTS as u64 {
            let off = pa - VIRTIO_BASE - slot * VIRTIO_STRIDE;
            if let Some(t) = lock(&dev.virtio).get_mut(slot as usize) {
                t.write(off, &b[..n]);
            }
            return true;
        }
        if pa.wrapping_sub(TEST_BASE) < 0x1000 {
            let v = value as u32;
            let exit = match v & 0xffff {
                x if x == TEST_POWEROFF => Some(VirtExit::Poweroff),
                x if x == TEST_RESET => Some(VirtExit::Reset),
                x if x == TEST_FAIL => Some(VirtExit::Failure(v >> 16)),
                _ => None,
            };
            if let Some(e) = exit {
                // The first command wins, as the exit signal's first reason does.
                lock(&dev.exit).get_or_insert(e);
            }
            return true;
        }
        if pa.wrapping_sub(RTC_BASE) < rtc::SIZE {
            let mut slot = lock(&dev.rtc);
            slot.rtc
                .write(pa - RTC_BASE, value as u32, rtc::host_now_ns());
            let level = slot.rtc.irq();
            dev.drive_rtc_line(&mut slot, level);
            return true;
        }
        false
    }

    fn external_pending(&mut self) -> u64 {
        self.dev.plic.output_for(self.hart)
    }

    fn stop_requested(&mut self) -> bool {
        self.dev.exit().is_some()
    }
}

/// OpenSBI's `struct fw_dynamic_info` (version 2): how fw_dynamic learns where the next
/// stage is and in which mode to enter it.
fn fw_dynamic_info(next_addr: u64) -> [u8; 48] {
    const MAGIC: u64 = 0x4942_534f; // "OSBI"
    const VERSION: u64 = 2;
    const NEXT_MODE_S: u64 = 1;
    let fields = [MAGIC, VERSION, next_addr, NEXT_MODE_S, 0, 0];
    let mut out = [0u8; 48];
    for (i, f) in fields.iter().enumerate() {
        out[8 * i..8 * i + 8].copy_from_slice(&f.to_le_bytes());
    }
    out
}

fn read(path: &PathBuf) -> Result<Vec<u8>, VirtError> {
    std::fs::read(path).map_err(|e| VirtError::Read(path.clone(), e))
}

/// Where the Image wants to sit above the start of RAM (its header's text_offset).
fn image_offset(path: &std::path::Path, image: &[u8]) -> Result<u64, VirtError> {
    let magic_ok =
        image.get(48..56) == Some(b"RISCV\0\0\0") || image.get(56..60) == Some(b"RSC\x05");
    if !magic_ok {
        return Err(VirtError::NotAnImage(path.to_path_buf()));
    }
    let mut off = [0u8; 8];
    off.copy_from_slice(&image[8..16]);
    let off = u64::from_le_bytes(off);
    Ok(if off == 0 { 0x20_0000 } else { off })
}

/// A built machine: its hart, bus, memory and running I/O threads.
pub struct Machine {
    cpus: Vec<Cpu>,
    dev: Arc<Devices>,
    memory: GuestMemoryMmap<()>,
    exit: Arc<devices::ExitSignal>,
    io_threads: Vec<std::thread::JoinHandle<()>>,
}

/// Builds the machine and runs it to its end, nothing else controlling it.
pub fn boot(cfg: VirtConfig) -> Result<VirtExit, VirtError> {
    Ok(build(cfg)?.run(&OpenGate))
}

/// Loads firmware, kernel, initrd and device tree into a new machine and starts its
/// devices' I/O threads; the hart has not run yet.
pub fn build(cfg: VirtConfig) -> Result<Machine, VirtError> {
    if cfg.harts == 0 || cfg.harts > MAX_HARTS {
        return Err(VirtError::Harts(cfg.harts));
    }
    let ram_size = cfg.memory_mib << 20;
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(RAM_BASE), ram_size as usize)])
        .map_err(|e| VirtError::Memory(cfg.memory_mib, e.to_string()))?;
    let mut ram = GuestRam::new();
    for region in memory.iter() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| VirtError::Memory(cfg.memory_mib, e.to_string()))?;
        // SAFETY: `memory` owns the mapping; the `Machine` holding it drops it only after
        // every hart has finished. Devices reach it only through vm-memory's raw accesses.
        unsafe { ram.add_region(region.start_addr().0, host, region.len() as usize) }
            .map_err(|e| VirtError::Memory(cfg.memory_mib, e.to_string()))?;
    }
    let ram_end = RAM_BASE + ram_size;
    let put = |what: &'static str, at: u64, data: &[u8]| -> Result<(), VirtError> {
        if at + data.len() as u64 > ram_end || !ram.write_bytes(at, data) {
            return Err(VirtError::TooBig {
                what,
                size: data.len() as u64,
                at,
            });
        }
        Ok(())
    };

    let firmware = read(&cfg.firmware)?;
    put("firmware", RAM_BASE, &firmware)?;
    let kernel = read(&cfg.kernel)?;
    let kernel_at = RAM_BASE + image_offset(&cfg.kernel, &kernel)?;
    put("kernel", kernel_at, &kernel)?;

    // The device tree and OpenSBI's boot info at the top of RAM, the initrd below them.
    let fdt_at = (ram_end - 0x20_0000) & !0xfff;
    let info_at = ram_end - 0x1000;
    let initrd = match &cfg.initrd {
        Some(p) => {
            let data = read(p)?;
            let start = (fdt_at - data.len() as u64) & !0xfff;
            if start < kernel_at + kernel.len() as u64 + 0x100_0000 {
                return Err(VirtError::TooBig {
                    what: "initrd",
                    size: data.len() as u64,
                    at: start,
                });
            }
            put("initrd", start, &data)?;
            Some((start, start + data.len() as u64))
        }
        None => None,
    };

    let harts = cfg.harts;
    let plic = Arc::new(Plic::for_harts(harts as usize));
    let mut virtio = Vec::new();
    for (n, d) in cfg.disks.iter().enumerate() {
        let backend = block::open(&d.path, None, d.read_only)
            .map_err(|e| VirtError::Disk(d.path.clone(), e))?;
        let dev = virtio::blk::Block::new(backend, &format!("vd{n}"), d.read_only);
        virtio.push(MmioTransport::new(
            Box::new(dev),
            memory.clone(),
            plic.clone(),
            VIRTIO_IRQ_BASE + n as u32,
        ));
    }
    let mut setups: Vec<(String, Option<Box<dyn virtio::transport::HostInput>>, _)> = (0..virtio
        .len())
        .map(|n| (format!("virtio-mmio{n}"), None, None))
        .collect();
    for spec in cfg.devices {
        let slot = virtio.len() as u32;
        virtio.push(MmioTransport::new(
            spec.device,
            memory.clone(),
            plic.clone(),
            VIRTIO_IRQ_BASE + slot,
        ));
        setups.push((spec.name, spec.host_input, spec.coalesce));
    }
    if virtio.len() > VIRTIO_SLOTS as usize {
        return Err(VirtError::TooManyDevices);
    }
    // Each device is served on an I/O thread, as on x86: the block device completes
    // requests there, the network device reads its TAP there, and notifies only wake it.
    let exit_signal = cfg.exit.clone();
    let gate = cfg.io_gate.clone();
    let mut io_threads = Vec::new();
    for (t, (name, host_input, coalesce)) in virtio.iter_mut().zip(setups) {
        let mut io = t.io_thread(&name, host_input).map_err(VirtError::Thread)?;
        if let Some((queue, delay)) = coalesce {
            io.coalesce(queue, delay);
        }
        io_threads.push(
            io.spawn(exit_signal.clone(), gate.clone())
                .map_err(VirtError::Thread)?,
        );
    }

    let blob = fdt::build(&fdt::FdtParams {
        ram_size,
        cmdline: cfg.cmdline.clone(),
        initrd,
        virtio_slots: virtio.len() as u32,
        harts,
    })
    .map_err(VirtError::Fdt)?;
    put("device tree", fdt_at, &blob)?;
    put("boot info", info_at, &fw_dynamic_info(kernel_at))?;

    let uart = Arc::new(Mutex::new(SerialDevice::new(
        IrqTrigger::new(plic.clone(), UART_IRQ),
        cfg.serial_out,
    )));
    let dev = Arc::new(Devices {
        plic,
        uart,
        virtio: Mutex::new(virtio),
        rtc: Mutex::new(RtcSlot::default()),
        exit: Mutex::new(None),
    });

    // Every hart starts in OpenSBI with its id, the device tree and the boot info;
    // fw_dynamic_info names hart 0 the boot hart, the others wait for an HSM start.
    let clint = Arc::new(crate::clint::Clint::new(harts as usize));
    let time = TimeSource::Host {
        start: Instant::now(),
        hz: TIMEBASE_HZ,
    };
    let mut cpus = Vec::new();
    for hart in 0..harts {
        let ram = if hart == 0 {
            std::mem::take(&mut ram)
        } else {
            hart_ram(&memory, cfg.memory_mib)?
        };
        let mut cpu = Cpu::new(ram, RAM_BASE);
        cpu.hartid = hart as u64;
        cpu.clint = clint.clone();
        cpu.clint_base = Some(CLINT_BASE);
        cpu.time = time;
        cpu.x[10] = hart as u64;
        cpu.x[11] = fdt_at;
        cpu.x[12] = info_at;
        cpus.push(cpu);
    }
    tracing::info!(kernel_at, fdt_at, ?initrd, harts, "riscv64 virt: built");
    Ok(Machine {
        cpus,
        dev,
        memory,
        exit: exit_signal,
        io_threads,
    })
}

/// A hart's map of the machine's RAM.
fn hart_ram(memory: &GuestMemoryMmap<()>, mib: u64) -> Result<GuestRam, VirtError> {
    let mut ram = GuestRam::new();
    for region in memory.iter() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| VirtError::Memory(mib, e.to_string()))?;
        // SAFETY: `memory` owns the mapping; the `Machine` holding it drops it only after
        // every hart has finished. Harts and devices reach it through raw accesses only.
        unsafe { ram.add_region(region.start_addr().0, host, region.len() as usize) }
            .map_err(|e| VirtError::Memory(mib, e.to_string()))?;
    }
    Ok(ram)
}

impl Machine {
    /// The UART, whose input the VMM feeds (the host's stdin or a console socket).
    pub fn uart(&self) -> Arc<Mutex<SerialDevice>> {
        self.dev.uart.clone()
    }

    /// Runs the harts to the machine's end (hart 0 on this thread, each other on one
    /// of its own, which calls [`HartGate::hart_thread_started`] first), each passing
    /// `gate` before each stint; sets the exit signal (if nothing outside did) and
    /// waits for the I/O threads.
    pub fn run(self, gate: &(dyn HartGate + Sync)) -> VirtExit {
        let Machine {
            mut cpus,
            dev,
            memory,
            exit: exit_signal,
            io_threads,
        } = self;
        tracing::info!(harts = cpus.len(), "riscv64 virt: starting OpenSBI");
        let others: Vec<Cpu> = cpus.drain(1..).collect();
        let exit = std::thread::scope(|scope| {
            for cpu in others {
                let bus = VirtBus {
                    dev: dev.clone(),
                    hart: cpu.hartid as usize,
                };
                let exit_signal = &exit_signal;
                let spawned = std::thread::Builder::new()
                    .name(format!("hart{}", cpu.hartid))
                    .spawn_scoped(scope, move || {
                        gate.hart_thread_started();
                        run_hart(cpu, bus, gate, exit_signal);
                    });
                if let Err(e) = spawned {
                    tracing::error!("starting a hart's thread: {e}");
                    exit_signal.request(devices::ExitReason::Error);
                }
            }
            match cpus.pop() {
                Some(cpu) => {
                    let bus = VirtBus {
                        dev: dev.clone(),
                        hart: 0,
                    };
                    run_hart(cpu, bus, gate, &exit_signal)
                }
                None => VirtExit::Ended(devices::ExitReason::Error),
            }
        });
        for t in io_threads {
            let _ = t.join();
        }
        drop(memory);
        exit
    }
}

/// One hart's loop: stints through `gate` until the machine ends. The hart that sees
/// the test device's command sets the exit signal, which ends the others.
fn run_hart(
    mut cpu: Cpu,
    mut bus: VirtBus,
    gate: &dyn HartGate,
    exit_signal: &devices::ExitSignal,
) -> VirtExit {
    let exit = loop {
        if let Some(r) = exit_signal.get() {
            break bus.dev.exit().unwrap_or(VirtExit::Ended(r));
        }
        if !gate.enter() {
            continue;
        }
        match cpu.run(&mut bus, 1_000_000) {
            RunExit::Budget => {
                bus.dev.poll_rtc();
                tracing::trace!(hart = cpu.hartid, pc = cpu.pc, prv = ?cpu.prv, instret = cpu.instret, "hart");
            }
            RunExit::Stop => {
                if let Some(e) = bus.dev.exit() {
                    gate.leave();
                    break e;
                }
            }
            RunExit::Wfi => wait_for_interrupt(&cpu, &mut bus, exit_signal),
            RunExit::Exception(e) => {
                // Only with exit_on_exception, which this machine never sets.
                tracing::error!(?e, "unexpected exception exit");
            }
        }
        gate.leave();
    };
    exit_signal.request(match exit {
        VirtExit::Poweroff => devices::ExitReason::PowerOff,
        VirtExit::Reset => devices::ExitReason::Reset,
        VirtExit::Failure(code) => devices::ExitReason::DebugExit(code),
        VirtExit::Ended(r) => r,
    });
    exit
}

/// WFI with nothing pending: sleep until the timer is due, a device raises a line or
/// the machine ends (within 10 ms, when the VMM's gate gets its turn).
fn wait_for_interrupt(cpu: &Cpu, bus: &mut VirtBus, exit: &devices::ExitSignal) {
    let deadline = Instant::now() + Duration::from_millis(10);
    loop {
        bus.dev.poll_rtc();
        if cpu.mip(bus) & cpu.csr.mie != 0 || Instant::now() >= deadline || exit.get().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}
