//! Building and running a VM from a `VmConfig`: a linear recipe (memory → kernel →
//! devices → vCPUs → run), then one thread per vCPU until something ends the VM.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use arch::acpi::{self, AcpiConfig, VirtioMmioDevice};
use arch::layout;
use devices::legacy::{
    AcpiPm, DebugExit, ResetControl, DEBUG_EXIT_PORT, I8042, RESET_CONTROL_PORT,
};
use devices::serial::{IrqTrigger, SerialDevice, SerialOut, COM1_GSI, COM1_PORT};
use devices::{BusDevice, ExitReason, ExitSignal};
use hypervisor::{EventFd, FpuState, IoEventAddress, Vcpu, VcpuExit};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use crate::accel;
use crate::config::{ConfigError, SerialConfig, Transport, VmConfig};
use crate::console;
use crate::control::VmControl;
use crate::io::IoBuses;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("setting the jail's file size limit")]
    FileSizeLimit(#[source] sandbox::jail::JailError),
    #[error("holding the threads' requests to the VM's descriptors")]
    PinFds(#[source] sandbox::Error),
    #[error("building the cloud-init seed")]
    CloudInitSeed(#[from] crate::cloud_init::SeedError),
    #[error(transparent)]
    Accel(#[from] accel::AccelError),
    #[error("reading {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("allocating {0} MiB of guest memory: {1}")]
    GuestMemory(u64, String),
    #[error("{path}: {source}")]
    Load {
        path: std::path::PathBuf,
        source: arch::LoadError,
    },
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::Error),
    #[error("placing a device: {0}")]
    Bus(#[from] devices::BusError),
    #[error("opening serial output {path}: {source}")]
    SerialFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    CpuModel(#[from] arch::cpuid::ModelError),
    #[error("cpu-config: {0}")]
    CpuidModifier(#[from] arch::cpuid::ModifierError),
    #[error("starting a thread: {0}")]
    Thread(std::io::Error),
    #[error("creating an eventfd for {what}: {source}")]
    EventFd {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("opening disk {path}: {source}")]
    Disk {
        path: std::path::PathBuf,
        source: block::OpenError,
    },
    #[error("network interface: {0}")]
    Tap(#[from] virtio::tap::TapError),
    #[error("network interface: {0}")]
    Net(String),
    #[error("vsock: {0}")]
    Vsock(#[from] virtio::vsock::VsockError),
    #[error("PCI: {0}")]
    Pci(#[from] devices::pci::PciError),
    #[error("virtio-pci: {0}")]
    VirtioPci(#[from] virtio::pci::PciTransportError),
    #[error("firmware: {0}")]
    Firmware(#[from] arch::firmware::FirmwareError),
    #[error(
        "UEFI firmware needs a variable store: give one (a copy of OVMF_VARS_4M.fd) \
         or keep the code beside its OVMF_VARS template"
    )]
    UefiVarsTemplate,
    #[error("UEFI variable store: {0}")]
    Flash(String),
    #[error("fw_cfg: {0}")]
    FwCfg(#[from] devices::fw_cfg::FwCfgError),
    #[error("restoring the snapshot: {0}")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

/// A device's own I/O thread, which runs it on the driver's notifies and, when given
/// some, on host input (a TAP, vsock's sockets).
struct IoThreadSetup {
    name: String,
    host_input: Option<Box<dyn virtio::transport::HostInput>>,
    /// A queue served a while after its first notify (net's transmit queue).
    coalesce: Option<(usize, Duration)>,
    /// What the thread's seccomp filter allows.
    role: sandbox::Role,
    /// Queues served by threads of their own beside it (a multi-queue NIC's pairs).
    split: Vec<virtio::transport::QueueGroup>,
}

/// A virtio device, its I/O thread if it has one (else it runs on the notifying vCPU),
/// and its transport.
type VirtioSetup = (
    Box<dyn virtio::VirtioDevice>,
    Option<IoThreadSetup>,
    Transport,
    Option<crate::runtime::Changeable>,
);

/// The host's wall-clock time: whole seconds and the fraction of the current one (ns).
fn unix_now() -> (i64, u32) {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| (d.as_secs() as i64, d.subsec_nanos()))
        .unwrap_or_default()
}

/// The first IOAPIC pin virtio devices use: 16..23 are free of ISA interrupts.
const VIRTIO_FIRST_GSI: u32 = 16;

/// Where a serial-like device's output goes.
fn output_for(serial: &SerialConfig) -> Result<SerialOut, VmmError> {
    Ok(match serial {
        SerialConfig::Stdio => Box::new(std::io::stdout()),
        SerialConfig::Null => Box::new(std::io::sink()),
        SerialConfig::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| VmmError::SerialFile {
                    path: path.clone(),
                    source,
                })?,
        ),
    })
}

/// The queue count of a disk or interface whose configuration names none, on a VM that
/// boots afresh: one per vCPU on virtio-pci (as QEMU's virtio-blk-pci since 5.2), where
/// each queue interrupts on a vector of its own and the guest gives every CPU its own
/// queue; up to `max`. One on virtio-mmio, whose device has a single interrupt.
fn default_queues(config: &VmConfig, transport: Transport, max: u16) -> Option<u16> {
    let n = u16::from(config.cpus).min(max);
    (transport == Transport::Pci && n > 1).then_some(n)
}

/// How many queues each disk, and queue pairs each interface, opens.
#[derive(Debug, PartialEq, Eq)]
struct QueueCounts {
    disks: Vec<u16>,
    /// With whether one pair will do when the TAP takes no more (a default's).
    nets: Vec<(u16, bool)>,
}

impl QueueCounts {
    /// The configuration's counts; where it names none, on a fresh boot
    /// [`default_queues`], on a restore what the snapshot's device has (the
    /// configuration is left as defined, so a manager still finds its definition in
    /// the snapshot, and snapshots from before the default restore as they were).
    fn of(config: &VmConfig, restore: Option<&crate::snapshot::Loaded>) -> Self {
        let machine = config.virtio_transport;
        let saved = |i: usize| {
            let snap = restore?.snapshot.virtio.get(i)?;
            let core = match snap {
                crate::snapshot::VirtioSnapshot::Mmio(m) => &m.core,
                crate::snapshot::VirtioSnapshot::Pci(p) => &p.core,
            };
            u16::try_from(core.queues.len()).ok()
        };
        let disks = config
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                d.queues
                    .or_else(|| match restore {
                        // Bounded: a snapshot is untrusted input.
                        Some(_) => saved(i).map(|n| n.clamp(1, virtio::blk::MAX_QUEUES)),
                        None => default_queues(
                            config,
                            d.transport.unwrap_or(machine),
                            virtio::blk::MAX_QUEUES,
                        ),
                    })
                    .unwrap_or(1)
            })
            .collect();
        // Interfaces follow the disks and the cloud-init seed; rx and tx per pair, and a
        // control queue with several.
        let first_net = config.disks.len() + usize::from(config.cloud_init.is_some());
        let nets = config
            .nets
            .iter()
            .enumerate()
            .map(|(i, n)| match (n.queues, restore) {
                (Some(q), _) => (q, false),
                (None, Some(_)) => (
                    saved(first_net + i)
                        .map_or(1, |q| (q / 2).clamp(1, virtio::net::MAX_QUEUE_PAIRS)),
                    false,
                ),
                (None, None) => (
                    default_queues(
                        config,
                        n.transport.unwrap_or(machine),
                        virtio::net::MAX_QUEUE_PAIRS,
                    )
                    .unwrap_or(1),
                    true,
                ),
            })
            .collect();
        QueueCounts { disks, nets }
    }
}

/// The VM's virtio devices, in the order their GSIs, MMIO windows and PCI slots are
/// assigned.
/// The descriptors of the TAP queues it opens are added to `tap_fds`.
fn virtio_devices(
    config: &VmConfig,
    ram: &[(u64, u64)],
    counts: &QueueCounts,
    handover: Option<&Mutex<crate::migration::Handover>>,
    tap_fds: &mut Vec<std::os::fd::RawFd>,
) -> Result<Vec<VirtioSetup>, VmmError> {
    let take = |f: &mut dyn FnMut(&mut crate::migration::Handover)| {
        if let Some(h) = handover {
            f(&mut h.lock().unwrap_or_else(|p| p.into_inner()));
        }
    };
    let mut devs: Vec<VirtioSetup> = Vec::new();
    let machine = config.virtio_transport;
    for (i, disk) in config.disks.iter().enumerate() {
        let backend = disk.open().map_err(|source| VmmError::Disk {
            path: disk.path.clone(),
            source,
        })?;
        let id = disk
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let io = IoThreadSetup {
            name: format!("blk{}", devs.len()),
            host_input: None,
            coalesce: None,
            role: sandbox::Role::Io,
            split: Vec::new(),
        };
        let dev = virtio::blk::Block::new(backend, &id, disk.read_only)
            .with_rate_limiter(crate::config::RateLimiterConfig::limiter(
                disk.rate_limiter.as_ref(),
            ))
            .with_queues(counts.disks.get(i).copied().unwrap_or(1));
        let change = crate::runtime::Changeable::Disk(disk.clone(), dev.handle());
        devs.push((
            Box::new(dev),
            Some(io),
            disk.transport.unwrap_or(machine),
            Some(change),
        ));
    }
    if let Some(ci) = &config.cloud_init {
        // The NoCloud seed: built in memory, read-only, after the configured disks.
        let backend = crate::cloud_init::seed_disk(ci, config.name(), &|p| config.open_named(p))?;
        let io = IoThreadSetup {
            name: format!("blk{}", devs.len()),
            host_input: None,
            coalesce: None,
            role: sandbox::Role::Io,
            split: Vec::new(),
        };
        devs.push((
            Box::new(virtio::blk::Block::new(backend, "cidata", true)),
            Some(io),
            machine,
            None,
        ));
    }
    for (i, net) in config.nets.iter().enumerate() {
        let mac = match net.mac_bytes() {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(VmmError::Net(e)),
            None => virtio::net::default_mac(&net.tap),
        };
        let (pairs, one_will_do) = counts.nets.get(i).copied().unwrap_or((1, false));
        let mut handed = None;
        take(&mut |h| handed = h.take_tap(&net.tap));
        let opened = match handed {
            // The queues the migration's source had open: as many as it used.
            Some(fds) => fds
                .into_iter()
                .map(|fd| virtio::tap::Tap::from_fd(&net.tap, fd))
                .collect::<Result<Vec<_>, _>>(),
            None => virtio::tap::Tap::open_queues(&net.tap, usize::from(pairs)),
        };
        let taps = match opened {
            Ok(taps) => taps,
            Err(e) if pairs > 1 && one_will_do => {
                // A TAP made without multi_queue takes one queue only: not an error
                // when the configuration asked for no count.
                tracing::info!(tap = net.tap, "one queue pair: {e}");
                virtio::tap::Tap::open_queues(&net.tap, 1)?
            }
            Err(e) => return Err(e.into()),
        };
        tap_fds.extend(taps.iter().map(std::os::fd::AsRawFd::as_raw_fd));
        let backends = taps
            .into_iter()
            .map(|t| Box::new(t) as Box<dyn virtio::net::NetBackend>)
            .collect();
        let dev = virtio::net::Net::with_backends(backends, mac)
            .with_mtu(net.mtu)
            .with_rate_limiters(
                crate::config::RateLimiterConfig::limiter(net.rx_rate_limiter.as_ref()),
                crate::config::RateLimiterConfig::limiter(net.tx_rate_limiter.as_ref()),
            );
        let change = crate::runtime::Changeable::Net(dev.limiters());
        let input = |pair: usize| {
            dev.host_input(pair)
                .map_err(|e| VmmError::Net(format!("duplicating the TAP descriptor: {e}")))
        };
        // Each further queue pair on a thread of its own, with its TAP queue; the first
        // thread keeps the first pair and the control queue.
        let split = (1..dev.queue_pairs())
            .map(|pair| {
                Ok(virtio::transport::QueueGroup {
                    name: format!("net-{}-{pair}", net.tap),
                    queues: vec![2 * pair, 2 * pair + 1],
                    host_input: Some(Box::new(input(pair)?)),
                    coalesce: Some((2 * pair + 1, virtio::net::TX_COALESCE)),
                })
            })
            .collect::<Result<Vec<_>, VmmError>>()?;
        let io = IoThreadSetup {
            name: format!("net-{}", net.tap),
            host_input: Some(Box::new(input(0)?)),
            coalesce: Some((virtio::net::TX_QUEUE, virtio::net::TX_COALESCE)),
            role: sandbox::Role::Io,
            split,
        };
        devs.push((
            Box::new(dev),
            Some(io),
            net.transport.unwrap_or(machine),
            Some(change),
        ));
    }
    if let Some(v) = &config.vsock {
        let mut handed = None;
        take(&mut |h| handed = h.take_vsock(&v.uds_path));
        let dev = match handed {
            Some(fd) => virtio::vsock::Vsock::from_listener_fd(v.guest_cid, &v.uds_path, fd)?,
            None => virtio::vsock::Vsock::new(v.guest_cid, &v.uds_path)?,
        };
        let io = IoThreadSetup {
            name: "vsock".into(),
            host_input: Some(Box::new(dev.host_input())),
            coalesce: None,
            // The guest's connections go to host sockets by path.
            role: sandbox::Role::Vsock,
            split: Vec::new(),
        };
        devs.push((Box::new(dev), Some(io), machine, None));
    }
    if config.rng {
        match config.rng_rate_limiter.filter(|r| r.limits()) {
            // Throttled requests wait for a timer: on an I/O thread of its own.
            Some(r) => {
                let dev = virtio::rng::LimitedRng {
                    limiter: crate::config::RateLimiterConfig::limiter(Some(&r)),
                };
                let io = IoThreadSetup {
                    name: "rng".into(),
                    host_input: None,
                    coalesce: None,
                    role: sandbox::Role::Io,
                    split: Vec::new(),
                };
                devs.push((Box::new(dev), Some(io), machine, None));
            }
            None => devs.push((Box::new(virtio::rng::Rng), None, machine, None)),
        }
    }
    if let Some(b) = &config.balloon {
        // On an I/O thread: its timer brings the stats buffer back each interval, and
        // discarding pages is not a vCPU's work.
        let dev = virtio::balloon::Balloon::new(
            ram.to_vec(),
            b.target_pages(),
            b.deflate_on_oom,
            Duration::from_secs(b.stats_polling_interval_s.into()),
        );
        let change = crate::runtime::Changeable::Balloon(dev.handle());
        let io = IoThreadSetup {
            name: "balloon".into(),
            host_input: None,
            coalesce: None,
            role: sandbox::Role::Io,
            split: Vec::new(),
        };
        devs.push((Box::new(dev), Some(io), machine, Some(change)));
    }
    if let Some(out) = &config.virtio_console {
        // Guest output is written on a thread of its own, not the vCPU's.
        let io = IoThreadSetup {
            name: "hvc".into(),
            host_input: None,
            coalesce: None,
            role: sandbox::Role::Io,
            split: Vec::new(),
        };
        devs.push((
            Box::new(virtio::console::Console::new(output_for(out)?)),
            Some(io),
            machine,
            None,
        ));
    }
    Ok(devs)
}

/// Where a virtio device attaches.
#[derive(Clone, Copy, Debug)]
enum Placement {
    Mmio(VirtioMmioDevice),
    /// A PCI slot on bus 0, and the GSI its INTx line is routed to.
    Pci {
        slot: u8,
        gsi: u32,
    },
}

/// Device i gets GSI 16 + i whatever its transport; virtio-mmio devices take the
/// windows in order, virtio-pci ones the slots after the host bridge.
fn placements(devs: &[VirtioSetup]) -> Vec<Placement> {
    let (mut windows, mut slots) = (0u64, 1u8);
    devs.iter()
        .enumerate()
        .map(|(i, (_, _, transport, _))| {
            let gsi = VIRTIO_FIRST_GSI + i as u32;
            match transport {
                Transport::Mmio => {
                    let base = layout::VIRTIO_MMIO_START + windows * layout::VIRTIO_MMIO_SIZE;
                    windows += 1;
                    Placement::Mmio(VirtioMmioDevice {
                        base,
                        size: layout::VIRTIO_MMIO_SIZE,
                        gsi,
                    })
                }
                Transport::Pci => {
                    let slot = slots;
                    slots += 1;
                    Placement::Pci { slot, gsi }
                }
            }
        })
        .collect()
}

/// A VM ready to run.
pub struct Vmm {
    config: VmConfig,
    note: Option<String>,
    exit: Arc<ExitSignal>,
    control: Arc<VmControl>,
    io: Arc<IoBuses>,
    serial: Arc<Mutex<SerialDevice>>,
    /// Devices that run on I/O threads of their own (block, net, vsock, console).
    io_threads: Vec<virtio::transport::IoThread>,
    /// Each locked by its thread while it runs, and by a snapshot of the paused VM.
    vcpus: Vec<Arc<Mutex<Box<dyn Vcpu>>>>,
    snapshotter: Arc<crate::snapshot::Snapshotter>,
    /// The TAP queues' descriptors (the net devices hold the files): TAP requests are
    /// allowed on these alone once the VM runs.
    tap_fds: Vec<std::os::fd::RawFd>,
    /// Hears the devices' writes to guest RAM for the accelerator (kept alive here: the
    /// registry in `virtio::ram_watch` holds it weakly).
    _ram_watch: Option<Arc<virtio::ram_watch::Observer>>,
    // Kept alive for as long as the VM: the vCPUs refer to its memory slots.
    _memory: GuestMemoryMmap,
    _vm: Arc<dyn hypervisor::Vm>,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A file the configuration names: from the descriptor a manager handed over for it
/// ([`VmConfig::opened`]), else by name.
fn read_file(
    config: &VmConfig,
    what: &'static str,
    path: &std::path::Path,
) -> Result<Vec<u8>, VmmError> {
    config
        .read_named(path)
        .map_err(|source| VmmError::ReadFile {
            what,
            path: path.to_path_buf(),
            source,
        })
}

impl Vmm {
    /// Build the VM: validate, pick the accelerator, lay out memory, load the kernel,
    /// attach devices and configure vCPUs.
    pub fn new(config: VmConfig) -> Result<Self, VmmError> {
        config.validate()?;
        Self::build(config, None)
    }

    /// Build the VM a snapshot describes, as `new` would with the kernel loading
    /// replaced by the saved memory and state; `serial` is where its console goes now.
    /// The VM has not run when this returns; a refusal leaves nothing started.
    pub fn restore(
        loaded: &crate::snapshot::Loaded,
        serial: SerialConfig,
        accel: crate::config::Accel,
    ) -> Result<Self, VmmError> {
        let mut config = loaded.config().clone();
        config.serial = serial;
        match config.validate() {
            // A restored VM does not load its kernel again.
            Ok(()) | Err(ConfigError::KernelMissing(_)) | Err(ConfigError::InitrdMissing(_)) => {}
            Err(e) => return Err(e.into()),
        }
        // Another accelerator than the snapshot's goes on from its portable state
        // (`snapshot::portable`), which `build` checks.
        if accel != crate::config::Accel::Auto {
            config.accel = accel;
        }
        Self::build(config, Some(loaded))
    }

    fn build(
        mut config: VmConfig,
        restore: Option<&crate::snapshot::Loaded>,
    ) -> Result<Self, VmmError> {
        let choice = accel::choose(config.accel)?;
        let hv = choice.hypervisor;
        tracing::info!(accel = hv.name(), "accelerator chosen");
        // A restore under another accelerator than the snapshot's: the vCPUs take its
        // portable registers and the interrupt controllers start fresh.
        let cross = restore.filter(|r| r.snapshot.accel != hv.name());

        // Memory: RAM, and the BIOS image's region below 4 GiB when booting through one.
        let mem_size = config.memory_bytes();
        let bios = match &config.firmware {
            Some(p) => Some(read_file(&config, "firmware", p)?),
            None => None,
        };
        // UEFI firmware boots on a q35-like platform (see `uefi`), a BIOS on the
        // generic one.
        let mut uefi = match &bios {
            Some(image) if arch::firmware::is_uefi(image) => {
                Some(UefiPlatform::new(image, &config)?)
            }
            _ => None,
        };
        let gap_start = if uefi.is_some() {
            layout::UEFI_MMIO_GAP_START
        } else {
            layout::MMIO_GAP_START
        };
        let ram = layout::ram_regions_below(mem_size, gap_start);
        let mut ranges: Vec<(GuestAddress, usize)> = ram
            .iter()
            .map(|&(start, len)| (GuestAddress(start), len as usize))
            .collect();
        match (&bios, &uefi) {
            // The code is memory; the variable store is a device (a flash the
            // firmware programs).
            (_, Some(u)) => {
                ranges.push((GuestAddress(u.flash.code_base), u.flash.code_len as usize))
            }
            (Some(image), None) => {
                let (base, len) = arch::firmware::bios_region(image.len() as u64)?;
                ranges.push((GuestAddress(base), len as usize));
            }
            (None, None) => {}
        }
        // Below 4 GiB, before the RAM above it: the regions go in address order.
        ranges.sort_by_key(|&(start, _)| start);
        let memory = match restore {
            // The snapshot's memory file, mapped privately: pages load as the guest
            // touches them.
            Some(r) => match &r.received {
                Some(m) => m.clone(),
                None => crate::snapshot::memory::map(&r.mem_path, &r.snapshot.memory)
                    .map_err(crate::snapshot::SnapshotError::from)?,
            },
            None => GuestMemoryMmap::from_ranges(&ranges)
                .map_err(|e| VmmError::GuestMemory(config.memory_mib, e.to_string()))?,
        };
        let vm = hv.create_vm(config.cpus)?;
        for (slot, region) in memory.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| VmmError::GuestMemory(config.memory_mib, e.to_string()))?;
            // Huge pages let KVM map guest RAM in 2 MiB steps. A software MMU gains
            // little from them and pays their first touch: each fault in a
            // MADV_HUGEPAGE range compacts and zeroes 2 MiB (measured on the Debian guest:
            // boot 6.1 -> 5.5 s under emu, 6.9 -> 6.0 s under hybrid, without them).
            if hv.name() == "kvm" {
                // SAFETY: advice on a mapping `memory` owns; it changes no contents.
                unsafe {
                    libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE);
                }
            }
            // SAFETY: `memory` owns the mapping and lives in the Vmm alongside the VM.
            unsafe {
                vm.add_memory_region(slot as u32, region.start_addr().0, host, region.len())?
            };
        }

        // Before any vCPU exists: the accelerator decides from it how vCPUs see device
        // writes.
        let ram_watch = vm.ram_write_observer();
        if let Some(o) = &ram_watch {
            virtio::ram_watch::watch(o);
        }

        // Virtio devices are opened first: the ACPI tables describe them.
        let mut tap_fds = Vec::new();
        let virtio = virtio_devices(
            &config,
            &ram,
            &QueueCounts::of(&config, restore),
            restore.map(|r| &r.handover),
            &mut tap_fds,
        )?;
        let places = placements(&virtio);
        let mmio_windows: Vec<VirtioMmioDevice> = places
            .iter()
            .filter_map(|p| match p {
                Placement::Mmio(w) => Some(*w),
                Placement::Pci { .. } => None,
            })
            .collect();
        let pci_intx: Vec<(u8, u32)> = places
            .iter()
            .filter_map(|p| match *p {
                Placement::Pci { slot, gsi } => Some((slot, gsi)),
                Placement::Mmio(_) => None,
            })
            .collect();

        // What the ACPI tables describe, whoever places them.
        let mut pci_host = acpi::PciHost::new(pci_intx);
        if uefi.is_some() {
            pci_host.ecam_base = layout::UEFI_PCI_ECAM_START;
            pci_host.mmio_window = (layout::UEFI_PCI_MMIO_START, layout::UEFI_PCI_MMIO_SIZE);
        }
        let acpi_config = AcpiConfig {
            cpus: config.cpus,
            virtio_devices: mmio_windows,
            pci: Some(pci_host),
            // Firmware leaves the 8259 programmed: only a full platform has Linux mask it.
            full: bios.is_some(),
        };

        // Kernel, initrd, boot tables — or the firmware, which finds its own way.
        let loaded = match (&config.kernel, &bios) {
            // Memory already holds the kernel, and the vCPUs their state.
            _ if restore.is_some() => None,
            (_, Some(image)) if uefi.is_some() => {
                if let Some(u) = &uefi {
                    arch::firmware::load_uefi_code(&memory, &u.flash, image)?;
                }
                tracing::info!(size = image.len(), "UEFI firmware loaded");
                None
            }
            (_, Some(image)) => {
                arch::firmware::load_bios(&memory, image)?;
                tracing::info!(size = image.len(), "firmware loaded");
                None
            }
            (Some(path), None) => {
                let kernel = read_file(&config, "kernel", path)?;
                let initrd = match &config.initrd {
                    Some(p) => Some(read_file(&config, "initrd", p)?),
                    None => None,
                };
                let boot = arch::BootConfig {
                    kernel: &kernel,
                    initrd: initrd.as_deref(),
                    cmdline: &config.cmdline,
                    mem_size,
                    acpi: acpi_config.clone(),
                };
                let loaded =
                    arch::load_kernel(&memory, &boot).map_err(|source| VmmError::Load {
                        path: path.clone(),
                        source,
                    })?;
                tracing::info!(?loaded, "kernel loaded");
                Some(loaded)
            }
            (None, None) => return Err(ConfigError::NothingToBoot.into()),
        };

        // Devices.
        let exit = Arc::new(ExitSignal::new());
        let irq = vm.irq_chip();
        let mut out = output_for(&config.serial)?;
        if let Some(bucket) = config.serial_rate_limiter.as_ref().and_then(|b| b.bucket()) {
            out = Box::new(crate::console::RateLimitedOutput::new(out, bucket));
        }
        let trigger = IrqTrigger::new(irq.clone(), COM1_GSI);
        let serial = Arc::new(Mutex::new(match restore {
            Some(r) => SerialDevice::restored(trigger, out, &r.snapshot.serial)
                .map_err(|e| crate::snapshot::SnapshotError::Invalid(e.to_string()))?,
            None => SerialDevice::new(trigger, out),
        }));
        let mut io = IoBuses::default();
        let dev = |d: Arc<Mutex<dyn BusDevice>>| d;
        io.pio
            .insert(dev(serial.clone()), u64::from(COM1_PORT), 8)?;
        io.pio
            .insert(dev(Arc::new(Mutex::new(I8042::new(exit.clone())))), 0x60, 5)?;
        io.pio.insert(
            dev(Arc::new(Mutex::new(ResetControl::new(exit.clone())))),
            u64::from(RESET_CONTROL_PORT),
            1,
        )?;
        io.pio.insert(
            dev(Arc::new(Mutex::new(AcpiPm::new(
                exit.clone(),
                acpi::S5_SLEEP_TYPE,
                acpi::RESET_VALUE,
            )))),
            u64::from(acpi::SLEEP_CONTROL_PORT),
            3,
        )?;
        // The CMOS RTC lives in user space with either accelerator (KVM has none). Its
        // seconds turn over with the host's, so Linux, which sets its clock from them at
        // boot, starts within half a second of the host. Its clock and its start time
        // are read together.
        let rtc_clock: Arc<dyn devices::irqchip::Clock> =
            Arc::new(devices::irqchip::MonotonicClock::new());
        let (secs, subsec) = unix_now();
        let mut rtc = devices::irqchip::rtc::Rtc::new(secs).with_subsecond(subsec);
        let mut firmware_devices = None;
        // The variable store's flash and the ACPI timer of a UEFI platform.
        let mut uefi_devices = None;
        let saved_uefi = restore
            .and_then(|r| r.snapshot.firmware.as_ref())
            .and_then(|f| f.uefi.as_ref());
        if bios.is_some() {
            // A BIOS sizes memory from the CMOS as well as from fw_cfg.
            for (index, value) in cmos_memory_bytes(mem_size, gap_start) {
                rtc.set_cmos_byte(index, value);
            }
            let pm1 = Arc::new(Mutex::new(devices::legacy::Pm1::new(
                exit.clone(),
                acpi::S5_SLEEP_TYPE,
            )));
            let fw = Arc::new(Mutex::new(
                fw_cfg(&config, &ram, uefi.is_some(), &acpi_config)?.with_dma(Box::new(FwCfgDma {
                    memory: memory.clone(),
                    watch: ram_watch.clone(),
                })),
            ));
            // The GPE0 block: a full platform's events, on the SCI.
            let gpe = Arc::new(Mutex::new(devices::gpe::Gpe0::new(
                irq.clone(),
                u32::from(acpi::SCI_GSI),
            )));
            if let Some(saved) = restore.and_then(|r| r.snapshot.firmware.as_ref()) {
                lock(&pm1).set_regs(saved.pm1);
                lock(&fw).set_position(saved.fw_cfg);
                lock(&gpe).set_regs(saved.gpe0)?;
            }
            io.pio.insert(
                dev(gpe.clone()),
                u64::from(acpi::GPE0_PORT),
                devices::gpe::GPE0_PORTS,
            )?;
            io.pio.insert(
                dev(pm1.clone()),
                u64::from(acpi::PM1A_EVT_PORT),
                devices::legacy::PM1_PORTS,
            )?;
            io.pio.insert(
                dev(fw.clone()),
                u64::from(devices::fw_cfg::FW_CFG_PORT),
                devices::fw_cfg::FW_CFG_PORTS,
            )?;
            firmware_devices = Some((fw, pm1, gpe));
            if let Some(mut u) = uefi.take() {
                // The variable store's flash, and the ACPI timer OVMF counts its
                // delays with (at the PMBASE it programs into the LPC bridge; the
                // FADT leaves it out, so Linux keeps its own clocks). A restore takes
                // the snapshot's flash (its file is written once the VM is built).
                let mut pm_timer = devices::legacy::PmTimer::new();
                if let Some(saved) = saved_uefi {
                    u.vars.restore(&saved.vars).map_err(|e| {
                        crate::snapshot::SnapshotError::Mismatch(format!(
                            "UEFI variable store: {e}"
                        ))
                    })?;
                    pm_timer = devices::legacy::PmTimer::starting_at(saved.pm_timer);
                }
                let vars = Arc::new(Mutex::new(u.vars));
                let pm_timer = Arc::new(Mutex::new(pm_timer));
                io.mmio
                    .insert(dev(vars.clone()), u.flash.vars_base, u.flash.vars_len)?;
                io.pio.insert(
                    dev(pm_timer.clone()),
                    u64::from(devices::pci::q35::PM_TIMER_PORT),
                    4,
                )?;
                uefi_devices = Some((vars, pm_timer));
            }
            io.pio.insert(
                dev(Arc::new(Mutex::new(devices::fw_cfg::DebugCon::new(
                    Box::new(FirmwareLog::default()),
                )))),
                u64::from(devices::fw_cfg::DEBUGCON_PORT),
                1,
            )?;
        }
        if let Some(r) = restore {
            r.snapshot.rtc.apply(&mut rtc)?;
        }
        let rtc = Arc::new(Mutex::new(rtc));
        io.pio.insert(
            dev(Arc::new(Mutex::new(devices::irqchip::Clocked::new(
                rtc.clone(),
                rtc_clock,
            )))),
            0x70,
            2,
        )?;
        io.pio.insert(
            dev(Arc::new(Mutex::new(DebugExit::new(exit.clone())))),
            u64::from(DEBUG_EXIT_PORT),
            4,
        )?;
        // The Generic Event Device the DSDT describes: the power button.
        const _: () = assert!(acpi::GED_EVENT_POWER_BUTTON == devices::ged::EVENT_POWER_BUTTON);
        let mut ged = devices::ged::Ged::new(irq.clone(), acpi::GED_GSI);
        if let Some((_, _, gpe)) = &firmware_devices {
            // A full platform signals its events as GPEs on the SCI.
            ged = ged.through_gpe(gpe.clone(), acpi::GPE_POWER_BUTTON);
        }
        let ged = Arc::new(Mutex::new(ged));
        if let Some(r) = restore {
            lock(&ged).set_pending(r.snapshot.ged_pending);
        }
        io.pio
            .insert(dev(ged.clone()), u64::from(acpi::GED_PORT), 1)?;
        let control = Arc::new(VmControl::new(exit.clone(), ged.clone()));

        // Virtio devices, on their transports; the PCI ones go on the root bus below.
        // A UEFI platform's chipset functions, with what the firmware programmed into
        // them on a restore.
        let chipset = match &uefi_devices {
            Some(_) => {
                let (mut mch, mut lpc) = (
                    devices::pci::q35::ChipsetFunction::mch(),
                    devices::pci::q35::ChipsetFunction::lpc(),
                );
                if let Some(saved) = saved_uefi {
                    let bad = |e: devices::pci::config::ConfigSizeError| {
                        crate::snapshot::SnapshotError::Invalid(format!("q35 chipset: {e}"))
                    };
                    mch.restore(&saved.mch).map_err(bad)?;
                    lpc.restore(&saved.lpc).map_err(bad)?;
                }
                Some((Arc::new(Mutex::new(mch)), Arc::new(Mutex::new(lpc))))
            }
            None => None,
        };
        let uefi_platform = chipset.is_some();
        let mut pci_root = match &chipset {
            Some((mch, _)) => devices::pci::PciRoot::with_host_bridge(mch.clone()),
            None => devices::pci::PciRoot::new(),
        };
        if let Some((_, lpc)) = &chipset {
            pci_root.add(devices::pci::q35::LPC_SLOT, lpc.clone())?;
        }
        let mut io_threads = Vec::new();
        let mut virtio_transports = Vec::new();
        let mut saved_virtio = restore.map(|r| r.snapshot.virtio.iter());
        for ((device, io_setup, _, change), place) in virtio.into_iter().zip(places) {
            match place {
                Placement::Mmio(window) => {
                    let mut t = virtio::mmio::MmioTransport::new(
                        device,
                        memory.clone(),
                        irq.clone(),
                        window.gsi,
                    );
                    // Completions are eventfd writes the accelerator turns into edges.
                    let irqfd = EventFd::new(EFD_NONBLOCK).map_err(|source| VmmError::EventFd {
                        what: "a virtio interrupt",
                        source,
                    })?;
                    vm.register_irqfd(window.gsi, &irqfd)?;
                    t.use_irqfd(irqfd);
                    if let Some(c) = change {
                        control.devices().add(c, t.core());
                    }
                    if let Some(thread) =
                        io_thread(io_setup, |name, input| t.io_thread(name, input))?
                    {
                        balloon_kick(&control, &t.core(), &thread)?;
                        // A queue notify is an eventfd write by the accelerator, which
                        // wakes the I/O thread without the bus or the transport; or, on
                        // a software CPU, it reaches the transport, which serves on the
                        // vCPU what needs no waiting.
                        let doorbell = window.base + virtio::mmio::QUEUE_NOTIFY_OFFSET;
                        let inline = vm.inline_io() && t.serve_inline();
                        for (queue, fd) in thread.queue_notifiers() {
                            if inline && t.serves_inline(queue) {
                                continue;
                            }
                            vm.register_ioevent(IoEventAddress::Mmio(doorbell), Some(queue), fd)?;
                        }
                        io_threads.push(thread);
                    }
                    if let Some(saved) = &mut saved_virtio {
                        let Some(crate::snapshot::VirtioSnapshot::Mmio(state)) = saved.next()
                        else {
                            return Err(crate::snapshot::SnapshotError::foreign_virtio().into());
                        };
                        t.restore(state)
                            .map_err(|e| crate::snapshot::SnapshotError::Mismatch(e.to_string()))?;
                    }
                    let t = Arc::new(Mutex::new(t));
                    virtio_transports.push(crate::snapshot::VirtioTransport::Mmio(t.clone()));
                    io.mmio.insert(dev(t), window.base, window.size)?;
                }
                Placement::Pci { slot, gsi } => {
                    // Interrupts stay calls into the chip (MSI-X messages, or the level
                    // INTx line); notifies are ioevents that follow the BAR wherever the
                    // guest places it.
                    let mut t =
                        virtio::pci::PciTransport::new(device, memory.clone(), irq.clone(), gsi)?;
                    if let Some(c) = change {
                        control.devices().add(c, t.core());
                    }
                    if let Some(thread) =
                        io_thread(io_setup, |name, input| t.io_thread(name, input))?
                    {
                        balloon_kick(&control, &t.core(), &thread)?;
                        // As for virtio-mmio: no ioevents where the vCPU serves inline.
                        let inline = vm.inline_io() && t.serve_inline();
                        let notifiers = thread
                            .queue_notifiers()
                            .filter(|(queue, _)| !(inline && t.serves_inline(*queue)))
                            .map(|(queue, fd)| fd.try_clone().map(|fd| (queue, fd)))
                            .collect::<std::io::Result<Vec<_>>>()
                            .map_err(|source| VmmError::EventFd {
                                what: "a virtio-pci notify ioevent",
                                source,
                            })?;
                        if !notifiers.is_empty() {
                            t.notify_through_ioevents(vm.clone(), notifiers);
                        }
                        io_threads.push(thread);
                    }
                    // After the ioevents' hook (a restore places them where BAR 0 was),
                    // before the bus decodes its BARs.
                    if let Some(saved) = &mut saved_virtio {
                        let Some(crate::snapshot::VirtioSnapshot::Pci(state)) = saved.next() else {
                            return Err(crate::snapshot::SnapshotError::foreign_virtio().into());
                        };
                        t.restore(state)
                            .map_err(|e| crate::snapshot::SnapshotError::Mismatch(e.to_string()))?;
                    }
                    let t = Arc::new(Mutex::new(t));
                    virtio_transports.push(crate::snapshot::VirtioTransport::Pci(t.clone()));
                    pci_root.add(usize::from(slot), t)?;
                }
            }
        }

        // The PCI host bridge: the configuration ports, ECAM, and the BARs behind them.
        let pci = Arc::new(pci_root);
        if let Some(saved) = saved_uefi {
            pci.set_address(saved.pci_address);
        }
        io.pio.insert(
            dev(Arc::new(Mutex::new(devices::pci::ConfigAddress(
                pci.clone(),
            )))),
            u64::from(devices::pci::CONFIG_ADDRESS_PORT),
            1,
        )?;
        io.pio.insert(
            dev(Arc::new(Mutex::new(devices::pci::ConfigData(pci.clone())))),
            u64::from(devices::pci::CONFIG_DATA_PORT),
            4,
        )?;
        let (ecam_base, ecam_size) = if uefi_platform {
            (layout::UEFI_PCI_ECAM_START, layout::UEFI_PCI_ECAM_SIZE)
        } else {
            (layout::PCI_ECAM_START, layout::PCI_ECAM_SIZE)
        };
        io.mmio.insert(
            dev(Arc::new(Mutex::new(devices::pci::Ecam(pci.clone())))),
            ecam_base,
            ecam_size,
        )?;
        io.pci = Some(pci.clone());

        // vCPUs: every CPU gets CPUID, MSRs and LINT wiring; only the BSP gets the entry
        // state: the others wait for INIT/SIPI from the guest.
        let model = arch::cpuid::apply_model(&hv.supported_cpuid()?, config.cpu_model)?;
        let mut supported = model.clone();
        arch::cpuid::apply_modifiers(&mut supported, &config.cpuid_modifiers)?;
        let mut guest_cpuid =
            arch::cpuid::guest_cpuid_smt(&supported, 0, config.cpus, config.threads_per_core);
        let portable = match cross {
            Some(r) => {
                let p = crate::snapshot::portable::check(
                    &r.snapshot,
                    hv.name(),
                    config.cpus,
                    &guest_cpuid,
                )?;
                // The guest keeps the features it was shown, no more.
                let narrow = crate::snapshot::portable::narrowing(p, &guest_cpuid);
                if !narrow.is_empty() {
                    config.cpuid_modifiers.extend(narrow);
                    supported = model;
                    arch::cpuid::apply_modifiers(&mut supported, &config.cpuid_modifiers)?;
                    guest_cpuid = arch::cpuid::guest_cpuid_smt(
                        &supported,
                        0,
                        config.cpus,
                        config.threads_per_core,
                    );
                }
                Some(p)
            }
            None => None,
        };
        let cpuid_fingerprint = crate::snapshot::cpuid_fingerprint(&guest_cpuid);
        let cpuid_features = crate::snapshot::portable::features(&guest_cpuid);
        if let Some(r) = restore {
            if saved_virtio.is_some_and(|mut rest| rest.next().is_some()) {
                return Err(crate::snapshot::SnapshotError::Invalid(
                    "more virtio device states than devices".into(),
                )
                .into());
            }
            if portable.is_none() && r.snapshot.cpuid_fingerprint != cpuid_fingerprint {
                return Err(crate::snapshot::SnapshotError::Mismatch(
                    "this host would give the guest other CPU features (CPUID) than it had".into(),
                )
                .into());
            }
            // Before the vCPUs: their TSCs follow the VM clock this sets.
            let elapsed = crate::snapshot::unix_now_ns().saturating_sub(r.snapshot.saved_unix_ns);
            if portable.is_none() {
                vm.restore_state(&r.snapshot.vm, elapsed)
                    .map_err(|source| crate::snapshot::SnapshotError::Accel {
                        accel: hv.name().into(),
                        source,
                    })?;
            }
        }
        let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
        for id in 0..config.cpus {
            let mut vcpu = vm.create_vcpu(u32::from(id))?;
            vcpu.set_cpuid(&arch::cpuid::guest_cpuid_smt(
                &supported,
                id,
                config.cpus,
                config.threads_per_core,
            ))?;
            vcpu.set_msrs(&arch::entry::boot_msrs())?;
            vcpu.configure_local_interrupts()?;
            // Through firmware the BSP starts where a CPU comes out of reset.
            if let (0, Some(loaded)) = (id, &loaded) {
                vcpu.set_regs(&arch::entry::boot_regs(loaded.protocol, loaded.entry))?;
                vcpu.set_sregs(&arch::entry::boot_sregs(loaded.protocol))?;
                vcpu.set_fpu(&FpuState::default())?;
            }
            if let Some(p) = portable.and_then(|p| p.vcpus.get(usize::from(id))) {
                crate::snapshot::portable::apply(vcpu.as_mut(), p).map_err(|source| {
                    crate::snapshot::SnapshotError::Accel {
                        accel: hv.name().into(),
                        source,
                    }
                })?;
            } else if let Some(state) = restore.and_then(|r| r.snapshot.vcpus.get(usize::from(id)))
            {
                vcpu.restore_state(state).map_err(|source| {
                    crate::snapshot::SnapshotError::Accel {
                        accel: hv.name().into(),
                        source,
                    }
                })?;
                // Its watchdogs are told the time it spent saved was a pause.
                vcpu.guest_paused()?;
            }
            vcpus.push(vcpu);
        }
        if let Some(r) = cross {
            // The LAPICs go on from the snapshot's (the rest of the interrupt
            // controllers start fresh: `portable::check` made sure they were quiet).
            crate::snapshot::cross_lapic::carry(
                &r.snapshot.accel,
                hv.name(),
                &r.snapshot.vm,
                &r.snapshot.vcpus,
                vm.as_ref(),
                &mut vcpus,
            )?;
        }
        control.set_kickers(vcpus.iter().map(|v| v.kicker()).collect());
        let vcpus: Vec<Arc<Mutex<Box<dyn Vcpu>>>> =
            vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect();
        let snapshotter = Arc::new(crate::snapshot::Snapshotter {
            config: config.clone(),
            accel: hv.name().into(),
            cpuid_fingerprint,
            cpuid_features,
            control: control.clone(),
            vm: vm.clone(),
            memory: memory.clone(),
            vcpus: vcpus.clone(),
            serial: serial.clone(),
            ged,
            rtc,
            virtio: virtio_transports,
            firmware: firmware_devices,
            uefi: uefi_devices
                .zip(chipset)
                .map(
                    |((vars, pm_timer), (mch, lpc))| crate::snapshot::UefiDevices {
                        vars,
                        mch,
                        lpc,
                        pm_timer,
                        pci,
                    },
                ),
            busy: Mutex::new(()),
            live: Mutex::new(None),
        });
        if let Some(r) = restore {
            // The memory file is the base of the first Diff snapshot: the dirty log
            // starts here (an accelerator without one refuses Diff snapshots anyway).
            if r.received.is_none() && vm.dirty_log_is_free() {
                let _ = vm.take_dirty_log();
            }
            // What the devices must tell their drivers about the move (vsock's
            // transport reset), before the guest runs.
            snapshotter.after_restore();
            // The variable store's file holds what the restored flash does, now that
            // nothing is left to refuse the restore.
            if let Some(u) = &snapshotter.uefi {
                lock(&u.vars)
                    .write_back()
                    .map_err(|e| VmmError::Flash(e.to_string()))?;
            }
            tracing::info!(state = %r.state_path.display(), "VM restored from a snapshot");
        }

        Ok(Vmm {
            config,
            note: choice.note,
            exit,
            control,
            io: Arc::new(io),
            serial,
            io_threads,
            vcpus,
            snapshotter,
            tap_fds,
            _ram_watch: ram_watch,
            _memory: memory,
            _vm: vm,
        })
    }

    /// A line the user should see about how the VM runs (e.g. a forced slow accelerator).
    pub fn note(&self) -> Option<&str> {
        self.note.as_deref()
    }

    /// The handle devices and callers use to stop the VM.
    pub fn exit_signal(&self) -> Arc<ExitSignal> {
        self.exit.clone()
    }

    /// The handle to pause, resume, reset the VM or press its power button.
    pub fn control(&self) -> Arc<VmControl> {
        self.control.clone()
    }

    /// The handle that snapshots the VM (paused) while it runs.
    pub fn snapshotter(&self) -> Arc<crate::snapshot::Snapshotter> {
        self.snapshotter.clone()
    }

    /// Run until the guest powers off or resets, or something stops the VM.
    pub fn run(self) -> Result<ExitReason, VmmError> {
        // Now that every vCPU (and its code arena, a memory file) exists, before any runs.
        sandbox::jail::apply_file_size_limit().map_err(VmmError::FileSizeLimit)?;
        // Installed before the guest runs: a SIGTERM that comes as soon as the guest
        // shows signs of life still ends the VM as a quit.
        let term = termination_eventfd().map_err(|source| VmmError::EventFd {
            what: "termination signals",
            source,
        })?;
        // Before any thread of the running VM is confined: from here KVM's and the TAPs'
        // requests are allowed only on the descriptors they belong to (a vCPU's on its
        // own); threads confined before (the API's, the console's) add that now.
        let vcpu_fds: Vec<Option<std::os::fd::RawFd>> = self
            .vcpus
            .iter()
            .map(|v| v.lock().unwrap_or_else(|p| p.into_inner()).host_fd())
            .collect();
        sandbox::pin_fds(sandbox::VmFds {
            vm: self._vm.host_fd(),
            vcpus: vcpu_fds.iter().flatten().copied().collect(),
            taps: self.tap_fds.clone(),
        })
        .map_err(VmmError::PinFds)?;
        if self.config.serial == SerialConfig::Stdio {
            let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
            console::spawn_stdin_pump(self.serial.clone(), self.exit.clone(), interactive)
                .map_err(VmmError::Thread)?;
        }

        for io in self.io_threads {
            io.spawn(self.exit.clone(), self.control.io_gate())
                .map_err(VmmError::Thread)?;
        }

        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        for ((id, vcpu), own) in self.vcpus.into_iter().enumerate().zip(vcpu_fds) {
            let io = self.io.clone();
            let control = self.control.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    sandbox::enter_vcpu(own);
                    vcpu_loop(id, &vcpu, &io, &control)
                })
                .map_err(VmmError::Thread)?;
            threads.push(t);
        }

        // Every thread is started: from here this one only waits, tears down and reports.
        sandbox::enter(sandbox::Role::Main);
        let reason = wait_for_exit(&self.exit, term)?;
        // Each vCPU leaves `run()` (a kick is never lost), parked ones and paused I/O
        // threads wake up to see the end.
        self.control.release();
        for t in threads {
            let _ = t.join();
        }
        Ok(reason)
    }
}

/// The CMOS bytes a PC BIOS reads the memory size from: extended memory in KiB
/// (0x30/0x31, and 0x17/0x18), memory above 16 MiB in 64 KiB units (0x34/0x35), and
/// memory above 4 GiB in 64 KiB units (0x5b-0x5d).
fn cmos_memory_bytes(mem_size: u64, gap_start: u64) -> Vec<(u8, u8)> {
    let low = mem_size.min(gap_start);
    let ext_kib = (low.saturating_sub(1 << 20) >> 10).min(0xffff);
    let above_16m = (low.saturating_sub(16 << 20) >> 16).min(0xffff);
    let high = (mem_size.saturating_sub(gap_start) >> 16).min(0xff_ffff);
    vec![
        (0x17, ext_kib as u8),
        (0x18, (ext_kib >> 8) as u8),
        (0x30, ext_kib as u8),
        (0x31, (ext_kib >> 8) as u8),
        (0x34, above_16m as u8),
        (0x35, (above_16m >> 8) as u8),
        (0x5b, high as u8),
        (0x5c, (high >> 8) as u8),
        (0x5d, (high >> 16) as u8),
    ]
}

/// What UEFI firmware boots on beyond what a BIOS gets: its two flash devices (the
/// code in memory, the variable store a flash device), the q35 chipset functions it
/// programs, ECAM where its q35 build puts it and the ACPI timer it counts time with.
struct UefiPlatform {
    flash: arch::firmware::UefiFlash,
    vars: devices::pflash::Pflash,
}

impl UefiPlatform {
    fn new(code: &[u8], config: &VmConfig) -> Result<Self, VmmError> {
        // The store the user named, written in place; or the template beside the code,
        // in memory only.
        let (vars, backing) = match &config.firmware_vars {
            Some(path) => {
                let file =
                    config
                        .open_named_writable(path)
                        .map_err(|source| VmmError::ReadFile {
                            what: "UEFI variable store",
                            path: path.clone(),
                            source,
                        })?;
                (read_file(config, "UEFI variable store", path)?, Some(file))
            }
            None => {
                let template = config
                    .firmware
                    .as_deref()
                    .and_then(crate::config::uefi_vars_template)
                    .ok_or(VmmError::UefiVarsTemplate)?;
                (
                    read_file(config, "UEFI variable template", &template)?,
                    None,
                )
            }
        };
        let flash = arch::firmware::uefi_flash(code.len() as u64, vars.len() as u64)?;
        let vars = devices::pflash::Pflash::new(vars, backing, false)
            .map_err(|e| VmmError::Flash(e.to_string()))?;
        Ok(UefiPlatform { flash, vars })
    }
}

/// Guest RAM as fw_cfg's DMA interface reaches it, with the accelerator's observer of
/// device writes (emu: its decoded code and its dirty log must see them).
struct FwCfgDma {
    memory: GuestMemoryMmap,
    watch: Option<Arc<virtio::ram_watch::Observer>>,
}

impl std::fmt::Debug for FwCfgDma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FwCfgDma")
            .field("watched", &self.watch.is_some())
            .finish_non_exhaustive()
    }
}

impl devices::fw_cfg::DmaMemory for FwCfgDma {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), devices::fw_cfg::DmaFault> {
        use vm_memory::Bytes;
        self.memory
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| devices::fw_cfg::DmaFault)
    }

    fn write(&self, addr: u64, data: &[u8]) -> Result<(), devices::fw_cfg::DmaFault> {
        use vm_memory::Bytes;
        self.memory
            .write_slice(data, GuestAddress(addr))
            .map_err(|_| devices::fw_cfg::DmaFault)?;
        if let Some(w) = &self.watch {
            w(addr, data.len() as u64);
        }
        Ok(())
    }
}

/// What a BIOS finds in fw_cfg: memory, CPUs, the E820 map, and its console on COM1.
fn fw_cfg(
    config: &VmConfig,
    ram: &[(u64, u64)],
    uefi: bool,
    acpi_config: &AcpiConfig,
) -> Result<devices::fw_cfg::FwCfg, VmmError> {
    let mem_size = config.memory_bytes();
    use devices::fw_cfg::*;
    let mut f = FwCfg::new();
    f.set(KEY_RAM_SIZE, mem_size.to_le_bytes().to_vec());
    f.set(KEY_NB_CPUS, u16::from(config.cpus).to_le_bytes().to_vec());
    f.set(KEY_MAX_CPUS, u16::from(config.cpus).to_le_bytes().to_vec());
    f.set(KEY_NOGRAPHIC, 1u16.to_le_bytes().to_vec());
    // etc/e820: { u64 address; u64 length; u32 type } little-endian, RAM only: the
    // BIOS reserves its own areas.
    let mut e820 = Vec::new();
    for &(start, len) in ram {
        e820.extend_from_slice(&start.to_le_bytes());
        e820.extend_from_slice(&len.to_le_bytes());
        e820.extend_from_slice(&arch::e820::E820_RAM.to_le_bytes());
    }
    f.add_file("etc/e820", e820)?;
    // No display: the BIOS's screen output goes to COM1, and it does not wait for a
    // boot-menu key.
    f.add_file(
        "etc/sercon-port",
        u64::from(COM1_PORT).to_le_bytes().to_vec(),
    )?;
    f.add_file("etc/show-boot-menu", 0u64.to_le_bytes().to_vec())?;
    // With nothing to boot it retries (a reset: the VM ends as on a reboot) after 5 s
    // rather than its default minute.
    f.add_file("etc/boot-fail-wait", 5000u32.to_le_bytes().to_vec())?;
    if uefi {
        // No 64-bit PCI window: OVMF would place BARs above 32 GiB, outside the window
        // the DSDT gives Linux; in the 32-bit window there is room for ours.
        f.add_file("opt/ovmf/X-PciMmio64Mb", b"0".to_vec())?;
    }
    // The same ACPI tables a directly booted kernel gets, for the firmware to place
    // through QEMU's table loader.
    // SMBIOS as QEMU hands it to SeaBIOS: the structures and a 2.1 entry point, which
    // the firmware completes with its own type 0 and places in the F segment.
    let (smbios, anchor) = arch::smbios::tables(&arch::smbios::SmbiosInfo {
        uuid: config.uuid.as_deref().and_then(arch::smbios::parse_uuid),
        serial: config.name.clone(),
    });
    f.add_file("etc/smbios/smbios-tables", smbios)?;
    f.add_file("etc/smbios/smbios-anchor", anchor)?;
    let (rsdp, tables, loader) = acpi::table_loader(acpi_config);
    f.add_file(acpi::LOADER_RSDP_FILE, rsdp)?;
    f.add_file(acpi::LOADER_TABLES_FILE, tables)?;
    f.add_file(acpi::LOADER_FILE, loader)?;
    for rom in &config.option_roms {
        let name = rom
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        f.add_file(
            &format!("genroms/{name}"),
            read_file(config, "option ROM", rom)?,
        )?;
        // The Linux loader goes first in the boot order.
        if name.starts_with("linuxboot") && config.kernel.is_some() {
            f.add_file("bootorder", format!("/rom@genroms/{name}\n").into_bytes())?;
        }
    }
    // A kernel booted through the firmware: the loader ROM copies it from here.
    if let Some(path) = &config.kernel {
        let kernel = read_file(config, "kernel", path)?;
        let initrd = match &config.initrd {
            Some(p) => Some(read_file(config, "initrd", p)?),
            None => None,
        };
        let low_end = ram.first().map_or(0, |&(_, len)| len);
        let linux = arch::firmware::linux_for_firmware(
            &kernel,
            initrd.as_deref(),
            &config.cmdline,
            low_end,
        )
        .map_err(|source| VmmError::Load {
            path: path.clone(),
            source,
        })?;
        let u32le = |v: u32| v.to_le_bytes().to_vec();
        let len = |d: &[u8]| u32le(d.len() as u32);
        f.set(KEY_SETUP_ADDR, u32le(linux.setup_addr));
        f.set(KEY_SETUP_SIZE, len(&linux.setup));
        f.set(KEY_SETUP_DATA, linux.setup);
        f.set(KEY_KERNEL_ADDR, u32le(linux.kernel_addr));
        f.set(KEY_KERNEL_SIZE, len(&linux.kernel));
        f.set(KEY_KERNEL_DATA, linux.kernel);
        f.set(KEY_CMDLINE_ADDR, u32le(linux.cmdline_addr));
        f.set(KEY_CMDLINE_SIZE, len(&linux.cmdline));
        f.set(KEY_CMDLINE_DATA, linux.cmdline);
        f.set(KEY_INITRD_ADDR, u32le(linux.initrd_addr));
        f.set(KEY_INITRD_SIZE, len(&linux.initrd));
        f.set(KEY_INITRD_DATA, linux.initrd);
    }
    Ok(f)
}

/// The firmware's debug console, a line at a time into the log.
#[derive(Default)]
struct FirmwareLog(Vec<u8>);

impl std::io::Write for FirmwareLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                tracing::debug!(target: "firmware", "{}", String::from_utf8_lossy(&self.0));
                self.0.clear();
            } else if self.0.len() < 4096 {
                self.0.push(b);
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Gives the runtime the balloon's stats queue doorbell (a poll asked for over the API
/// wakes its I/O thread through it); nothing for other devices.
fn balloon_kick(
    control: &VmControl,
    core: &virtio::transport::DeviceCore,
    thread: &virtio::transport::IoThread,
) -> Result<(), VmmError> {
    if core.device_type() != virtio::device_type::BALLOON {
        return Ok(());
    }
    let stats = virtio::balloon::STATS_QUEUE as u32;
    if let Some((_, fd)) = thread.queue_notifiers().find(|(q, _)| *q == stats) {
        let fd = fd.try_clone().map_err(|source| VmmError::EventFd {
            what: "the balloon's statistics doorbell",
            source,
        })?;
        control.devices().set_balloon_kick(fd);
    }
    Ok(())
}

/// The I/O thread `setup` asks for, made by its transport's `io_thread`.
fn io_thread(
    setup: Option<IoThreadSetup>,
    make: impl FnOnce(
        &str,
        Option<Box<dyn virtio::transport::HostInput>>,
    ) -> std::io::Result<virtio::transport::IoThread>,
) -> Result<Option<virtio::transport::IoThread>, VmmError> {
    let Some(IoThreadSetup {
        name,
        host_input,
        coalesce,
        role,
        split,
    }) = setup
    else {
        return Ok(None);
    };
    let mut thread = make(&name, host_input).map_err(VmmError::Thread)?;
    thread.confine_as(role);
    if let Some((queue, delay)) = coalesce {
        thread.coalesce(queue, delay);
    }
    for group in split {
        thread.split_off(group);
    }
    Ok(Some(thread))
}

/// Waits for the VM's end, or a termination signal through `term` (which ends it as a
/// quit).
pub(crate) fn wait_for_exit(exit: &ExitSignal, term: &EventFd) -> Result<ExitReason, VmmError> {
    let ended = exit.subscribe().map_err(|source| VmmError::EventFd {
        what: "the VM's end",
        source,
    })?;
    let mut pfds = [ended.as_raw_fd(), term.as_raw_fd()].map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        if let Some(r) = exit.get() {
            return Ok(r);
        }
        // SAFETY: `pfds` is a valid array of pollfd for the duration of the call.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            // Cannot wait on descriptors: fall back to the condition variable.
            return Ok(loop {
                if let Some(r) = exit.wait_timeout(Duration::from_secs(3600)) {
                    break r;
                }
            });
        }
        if pfds[1].revents != 0 {
            let _ = term.read();
            exit.request(ExitReason::Quit);
        }
    }
}

/// The eventfd SIGTERM/SIGINT/SIGHUP write to (-1 until set): the VMM then stops the VM
/// and exits normally, so a raw terminal is restored and sockets are cleaned up, instead
/// of dying mid-write. It stays open for the life of the process.
static TERMINATION_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_termination(_: libc::c_int) {
    // Only an atomic load and write(2): async-signal-safe.
    let fd = TERMINATION_FD.load(std::sync::atomic::Ordering::Relaxed);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a local to an eventfd that is never closed.
        unsafe { libc::write(fd, std::ptr::addr_of!(one).cast(), 8) };
    }
}

/// The process's termination eventfd, with the signal handlers that write it installed.
pub(crate) fn termination_eventfd() -> std::io::Result<&'static EventFd> {
    static TERM: std::sync::OnceLock<EventFd> = std::sync::OnceLock::new();
    if let Some(t) = TERM.get() {
        return Ok(t);
    }
    let fd = EventFd::new(EFD_NONBLOCK)?;
    let t = TERM.get_or_init(|| fd);
    stop_on_termination_signals(t);
    Ok(t)
}

fn stop_on_termination_signals(term: &'static EventFd) {
    TERMINATION_FD.store(term.as_raw_fd(), std::sync::atomic::Ordering::Relaxed);
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: sigaction with a zeroed struct and a handler that only stores an atomic.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_termination as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn vcpu_loop(id: usize, vcpu: &Mutex<Box<dyn Vcpu>>, io: &IoBuses, control: &VmControl) {
    let exit = control.exit_signal();
    while exit.get().is_none() {
        // Parks here while the VM is paused.
        let Some(was_paused) = control.enter_run() else {
            break;
        };
        // Only a snapshot of the paused VM takes it besides this thread.
        let mut vcpu = lock(vcpu);
        if was_paused {
            if let Err(e) = vcpu.guest_paused() {
                tracing::warn!(vcpu = id, "telling the guest it was paused: {e}");
            }
        }
        let result = vcpu.run(io);
        control.leave_run();
        match result {
            Ok(VcpuExit::Io) | Ok(VcpuExit::Interrupted) => {}
            Ok(VcpuExit::Hlt) => {
                // Only reached without an in-kernel irqchip: nothing can wake the CPU.
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(VcpuExit::Shutdown) => {
                tracing::info!(vcpu = id, "triple fault");
                exit.request(ExitReason::TripleFault);
            }
            Ok(VcpuExit::Reset) => exit.request(ExitReason::Reset),
            Ok(VcpuExit::PowerOff) => exit.request(ExitReason::PowerOff),
            Ok(VcpuExit::InternalError(what)) => {
                let rip = vcpu.regs().map(|r| r.rip).unwrap_or_default();
                tracing::error!(vcpu = id, rip = format_args!("{rip:#x}"), "{what}");
                exit.request(ExitReason::Error);
            }
            Err(e) => {
                tracing::error!(vcpu = id, "{e}");
                exit.request(ExitReason::Error);
            }
        }
    }
}

#[cfg(test)]
mod queue_default_tests {
    use super::*;

    #[test]
    fn pci_devices_get_a_queue_per_vcpu_up_to_the_maximum_and_mmio_ones_one() {
        let mut config = VmConfig::new("/k");
        config.cpus = 4;
        config.virtio_transport = Transport::Pci;
        config.disks = vec![
            "/a".parse().unwrap(),
            "/b,queues=3".parse().unwrap(),
            "/c,transport=mmio".parse().unwrap(),
        ];
        config.nets = vec![
            "tap=t0".parse().unwrap(),
            "tap=t1,queues=1".parse().unwrap(),
        ];
        let counts = QueueCounts::of(&config, None);
        assert_eq!(counts.disks, vec![4, 3, 1]);
        assert_eq!(counts.nets, vec![(4, true), (1, false)]);
        config.cpus = 32;
        let counts = QueueCounts::of(&config, None);
        assert_eq!(counts.disks[0], virtio::blk::MAX_QUEUES);
        assert_eq!(counts.nets[0], (virtio::net::MAX_QUEUE_PAIRS, true));
        config.cpus = 1;
        assert_eq!(QueueCounts::of(&config, None).disks, vec![1, 3, 1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::fw_cfg::DmaMemory;

    /// fw_cfg's DMA writes reach the accelerator's observer (emu's dirty log and decoded
    /// code), as virtio devices' writes do; a write that misses RAM reports nothing.
    #[test]
    fn fw_cfg_dma_writes_are_reported_to_the_accelerator() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let watch: Arc<virtio::ram_watch::Observer> =
            Arc::new(move |gpa, len| s.lock().unwrap().push((gpa, len)));
        let dma = FwCfgDma {
            memory: memory.clone(),
            watch: Some(watch),
        };
        dma.write(0x3ff8, &[1; 16]).unwrap();
        let mut back = [0u8; 16];
        dma.read(0x3ff8, &mut back).unwrap();
        assert_eq!(back, [1; 16]);
        assert!(dma.write(0x20000, &[1]).is_err());
        assert_eq!(*seen.lock().unwrap(), vec![(0x3ff8, 16)]);
    }
}
