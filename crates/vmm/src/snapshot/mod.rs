//! Snapshots of a paused VM: a state file (`format`: header, checksum, JSON body) that
//! holds the VM's configuration and the state of every vCPU and device, and guest
//! memory in a file of its own (`memory`). docs/SNAPSHOT.md describes both.
//!
//! [`Snapshotter`] is what a built VM hands the API: it reaches the vCPUs, the
//! accelerator's VM state and every device that has state. [`load`] reads and checks a
//! snapshot without starting anything; `Vmm::restore` builds the VM from it, the same
//! recipe as a boot with the kernel loading replaced by the saved state.
//!
//! What is refused, before any file is written (create) or any device started (load):
//! a VM that is not paused; on load, a file
//! that is truncated, corrupt or of another format version, a memory file of another
//! size, a disk whose size changed, a UEFI variable store or firmware of another size
//! (or a snapshot whose platform state is not its firmware's), another accelerator, a host whose CPU features
//! differ from the snapshot's, or (hybrid) a host TSC that is not the one it was taken
//! with (`emu::persist`).

pub(crate) mod cross_lapic;
pub mod format;
pub mod memory;
pub mod portable;
pub(crate) mod untouched;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use devices::fw_cfg::{FwCfg, FwCfgPosition};
use devices::ged::Ged;
use devices::irqchip::rtc::Rtc;
use devices::legacy::{Pm1, PmTimer};
use devices::pci::q35::ChipsetFunction;
use devices::pci::PciRoot;
use devices::pflash::{Pflash, PflashSnapshot};
use devices::serial::{SerialDevice, SerialSnapshot};
use hypervisor::{CpuIdEntry, Vcpu};
use serde::{Deserialize, Serialize};
use virtio::mmio::{MmioSnapshot, MmioTransport};
use virtio::pci::{PciSnapshot, PciTransport};
use vm_memory::GuestMemoryMmap;

use crate::config::VmConfig;
use crate::control::VmControl;

pub use memory::MemRegion;

/// What the CMOS RTC keeps (its time follows the host's clock plus the guest's offset).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcSnapshot {
    pub index: u8,
    /// The 128 bytes of CMOS RAM.
    pub ram: Vec<u8>,
    /// Seconds the guest moved the clock by.
    pub offset_s: i64,
    /// The time held while register B's SET bit is on.
    pub held: Option<i64>,
}

impl RtcSnapshot {
    pub fn of(rtc: &Rtc) -> Self {
        RtcSnapshot {
            index: rtc.index,
            ram: rtc.ram.to_vec(),
            offset_s: rtc.offset_s,
            held: rtc.held,
        }
    }

    /// Puts the saved registers into `rtc` (whose time base is this host's clock).
    pub fn apply(&self, rtc: &mut Rtc) -> Result<(), SnapshotError> {
        if self.ram.len() != rtc.ram.len() {
            return Err(SnapshotError::Invalid(format!(
                "the RTC's CMOS RAM has {} bytes, not {}",
                self.ram.len(),
                rtc.ram.len()
            )));
        }
        rtc.index = self.index & 0x7f;
        rtc.ram.copy_from_slice(&self.ram);
        rtc.offset_s = self.offset_s;
        rtc.held = self.held;
        Ok(())
    }
}

/// A disk as the snapshot saw it: a restore refuses a disk whose size changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskIdentity {
    pub path: PathBuf,
    pub len: u64,
}

/// A virtio device's transport and state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VirtioSnapshot {
    Mmio(MmioSnapshot),
    Pci(PciSnapshot),
}

/// A virtio device's transport, as the snapshotter reaches it.
pub(crate) enum VirtioTransport {
    Mmio(Arc<Mutex<MmioTransport>>),
    Pci(Arc<Mutex<PciTransport>>),
}

/// What a VM booted through firmware has besides: where its fw_cfg access stands and
/// its ACPI PM1 registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareSnapshot {
    pub fw_cfg: FwCfgPosition,
    pub pm1: [u8; 6],
    /// GPE0_STS and GPE0_EN (absent from snapshots that predate the block: all clear).
    #[serde(default)]
    pub gpe0: [u8; 4],
    /// The q35 platform of UEFI firmware; absent for a BIOS (and from every snapshot
    /// before UEFI VMs could be taken: they were refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uefi: Option<UefiSnapshot>,
}

/// What UEFI firmware's platform holds beyond a BIOS's: the variable store's flash
/// (contents and command cycle), the q35 chipset functions' configuration space (what
/// the firmware programmed: PCIEXBAR, PMBASE, PIRQ routing…), the ACPI PM timer's count
/// and the PCI configuration address register. The code is in guest memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UefiSnapshot {
    pub vars: PflashSnapshot,
    /// The MCH's (00:00.0) and the LPC bridge's (00:1f.0) 4 KiB configuration spaces.
    pub mch: Vec<u8>,
    pub lpc: Vec<u8>,
    pub pm_timer: u32,
    pub pci_address: u32,
}

/// The UEFI platform's devices, as the snapshotter reaches them.
pub(crate) struct UefiDevices {
    pub(crate) vars: Arc<Mutex<Pflash>>,
    pub(crate) mch: Arc<Mutex<ChipsetFunction>>,
    pub(crate) lpc: Arc<Mutex<ChipsetFunction>>,
    pub(crate) pm_timer: Arc<Mutex<PmTimer>>,
    pub(crate) pci: Arc<PciRoot>,
}

impl UefiDevices {
    fn snapshot(&self) -> UefiSnapshot {
        UefiSnapshot {
            vars: lock(&self.vars).snapshot(),
            mch: lock(&self.mch).snapshot(),
            lpc: lock(&self.lpc).snapshot(),
            pm_timer: lock(&self.pm_timer).count(),
            pci_address: self.pci.address(),
        }
    }
}

/// The state file's body.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshot {
    /// The VM as it was configured (its serial backend is replaced by the restoring
    /// VMM's).
    pub config: VmConfig,
    /// The accelerator whose state `vm` and `vcpus` are ("emu").
    pub accel: String,
    /// The host's wall-clock time when the snapshot was taken, in ns since the Unix
    /// epoch: the restored VM's clock moves on by the time since.
    pub saved_unix_ns: u64,
    /// A fingerprint of the guest's CPUID table: a host that would give the guest other
    /// CPU features cannot restore it.
    pub cpuid_fingerprint: u64,
    /// Where each RAM region's bytes are in the memory file.
    pub memory: Vec<MemRegion>,
    pub disks: Vec<DiskIdentity>,
    /// The accelerator's VM state (interrupt controllers, PIT, the VM clock).
    pub vm: serde_json::Value,
    /// Each vCPU's state, by index.
    pub vcpus: Vec<serde_json::Value>,
    pub serial: SerialSnapshot,
    /// Events the GED raised that the guest has not read.
    pub ged_pending: u8,
    pub rtc: RtcSnapshot,
    /// The virtio devices, in the VM's device order.
    pub virtio: Vec<VirtioSnapshot>,
    /// For a VM booted through firmware.
    #[serde(default)]
    pub firmware: Option<FirmwareSnapshot>,
    /// The vCPUs' state for a restore under another accelerator (absent from snapshots
    /// that predate it).
    #[serde(default)]
    pub portable: Option<portable::Portable>,
    /// What the Firecracker-compatible API had been told (its IDs, cache types, boot
    /// arguments as given, rate limiters as PATCHed), so a VMM restoring it answers
    /// `GET /vm/config` as the one that took it did. Absent when no API served the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the VM must be paused to take a snapshot (PATCH /vm {{\"state\": \"Paused\"}})")]
    NotPaused,
    #[error(transparent)]
    Format(#[from] format::FormatError),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error("{accel}: {source}")]
    Accel {
        accel: String,
        source: hypervisor::Error,
    },
    #[error("a snapshot taken under {from} cannot go on under {to}: {why}")]
    CrossAccel {
        from: String,
        to: String,
        why: String,
    },
    #[error("the snapshot is invalid: {0}")]
    Invalid(String),
    #[error("the snapshot does not match this host or VM: {0}")]
    Mismatch(String),
    #[error("encoding the state: {0}")]
    Encode(String),
}

impl SnapshotError {
    /// The snapshot's virtio devices are not the ones this VM builds.
    pub(crate) fn foreign_virtio() -> Self {
        SnapshotError::Mismatch("its virtio devices are not this VM's (count or transport)".into())
    }
}

/// What a snapshot's memory file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotKind {
    /// All of guest memory.
    Full,
    /// The pages written since the VMM's previous snapshot, its restore, or (with
    /// none) its boot; the rest are holes, taken from the snapshot it follows
    /// (`memory::rebase`).
    Diff,
}

/// How long the parts of a snapshot took, for the log and the bench.
#[derive(Clone, Copy, Debug, Default)]
pub struct CreateTimes {
    pub state: Duration,
    pub memory: Duration,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

/// FNV-1a over the CPUID entries, in order.
pub(crate) fn cpuid_fingerprint(entries: &[CpuIdEntry]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |v: u32| {
        for b in v.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for e in entries {
        for v in [
            e.function,
            e.index,
            u32::from(e.significant_index),
            e.eax,
            e.ebx,
            e.ecx,
            e.edx,
        ] {
            eat(v);
        }
    }
    h
}

/// Whether the firmware at `path` is UEFI code (read from its header, through the
/// descriptor handed over for it when there is one).
pub(crate) fn is_uefi_file(config: &VmConfig, path: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let mut head = [0u8; 64];
    config
        .open_named(path)
        .and_then(|f| f.read_exact_at(&mut head, 0))
        .is_ok_and(|()| arch::firmware::is_uefi(&head))
}

/// The size the guest sees of the disk at `path`: a qcow2 image's virtual size (its file
/// grows as clusters are allocated, and a revert puts an older, shorter file back),
/// else the file's length.
fn disk_len(d: &crate::config::DiskConfig) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    // The file the VM uses: handed over open to a jailed VMM, which has no path to it.
    let f = d.image_file()?;
    let len = f.metadata()?.len();
    if d.format == Some(crate::config::DiskFormat::Raw) {
        return Ok(len);
    }
    // qcow2's header: magic "QFI\xfb", then the virtual size at byte 24 (big-endian).
    let mut head = [0u8; 32];
    match f.read_exact_at(&mut head, 0) {
        Ok(()) if head[..4] == *b"QFI\xfb" => {
            let mut size = [0u8; 8];
            size.copy_from_slice(&head[24..32]);
            Ok(u64::from_be_bytes(size))
        }
        _ => Ok(len),
    }
}

/// The disks of `config` as they are now.
pub(crate) fn disk_identities(config: &VmConfig) -> Result<Vec<DiskIdentity>, SnapshotError> {
    config
        .disks
        .iter()
        .map(|d| {
            let len = disk_len(d)
                .map_err(|e| SnapshotError::Mismatch(format!("disk {}: {e}", d.path.display())))?;
            Ok(DiskIdentity {
                path: d.path.clone(),
                len,
            })
        })
        .collect()
}

/// fw_cfg and the PM1 registers of a VM booted through firmware.
pub(crate) type FirmwareDevices = (
    Arc<Mutex<FwCfg>>,
    Arc<Mutex<Pm1>>,
    Arc<Mutex<devices::gpe::Gpe0>>,
);

/// Everything of a built VM that has state, for [`Snapshotter::create`].
pub struct Snapshotter {
    pub(crate) config: VmConfig,
    pub(crate) accel: String,
    pub(crate) cpuid_fingerprint: u64,
    /// The CPUID feature words the guest sees, for `portable`.
    pub(crate) cpuid_features: Vec<portable::FeatureWord>,
    pub(crate) control: Arc<VmControl>,
    pub(crate) vm: Arc<dyn hypervisor::Vm>,
    pub(crate) memory: GuestMemoryMmap,
    pub(crate) vcpus: Vec<Arc<Mutex<Box<dyn Vcpu>>>>,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub(crate) ged: Arc<Mutex<Ged>>,
    pub(crate) rtc: Arc<Mutex<Rtc>>,
    /// The virtio devices, in the VM's device order.
    pub(crate) virtio: Vec<VirtioTransport>,
    /// fw_cfg and the PM1 registers, for a VM booted through firmware.
    pub(crate) firmware: Option<FirmwareDevices>,
    /// The q35 platform's devices, for a VM booted through UEFI firmware.
    pub(crate) uefi: Option<UefiDevices>,
    /// One snapshot at a time.
    pub(crate) busy: Mutex<()>,
    /// The configuration as the VMM's API changed it since the build (a drive given
    /// another file, rate limiters PATCHed) and the API's own view of it
    /// ([`Snapshotter::set_live`]): what a snapshot or a migration carries, not the
    /// configuration the VM was built with.
    pub(crate) live: Mutex<Option<(VmConfig, serde_json::Value)>>,
}

impl std::fmt::Debug for Snapshotter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshotter")
            .field("accel", &self.accel)
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

impl Snapshotter {
    /// Records the configuration the VM runs with now and the API's view of it (see
    /// `live`): the next snapshot or migration carries these.
    pub fn set_live(&self, config: &VmConfig, api: serde_json::Value) {
        *lock(&self.live) = Some((config.clone(), api));
    }

    /// The configuration the VM runs with now.
    fn config_now(&self) -> VmConfig {
        match &*lock(&self.live) {
            Some((c, _)) => c.clone(),
            None => self.config.clone(),
        }
    }

    /// Writes the paused VM's state to `state_path` and its memory to `mem_path`.
    pub fn create(
        &self,
        state_path: &Path,
        mem_path: &Path,
        kind: SnapshotKind,
    ) -> Result<CreateTimes, SnapshotError> {
        let _one = lock(&self.busy);
        self.control
            .while_paused(|| self.create_paused(state_path, mem_path, kind))
            .ok_or(SnapshotError::NotPaused)?
    }

    fn create_paused(
        &self,
        state_path: &Path,
        mem_path: &Path,
        kind: SnapshotKind,
    ) -> Result<CreateTimes, SnapshotError> {
        let t0 = Instant::now();
        let mut snap = self.state()?;
        let t_state = t0.elapsed();
        let t1 = Instant::now();
        // The dirty log's take both gives a Diff its pages and makes this snapshot the
        // base of the next Diff (where the log costs the guest nothing it runs from every
        // snapshot on; under kvm from the first Diff, which has every page). An
        // accelerator without a log takes Full snapshots only.
        snap.memory = match kind {
            SnapshotKind::Full => {
                if self.vm.dirty_log_is_free() {
                    let _ = self.vm.take_dirty_log();
                }
                memory::write(&self.memory, mem_path)
            }
            SnapshotKind::Diff => {
                let dirty = self
                    .vm
                    .take_dirty_log()
                    .map_err(|source| SnapshotError::Accel {
                        accel: self.accel.clone(),
                        source,
                    })?;
                memory::write_diff(&self.memory, mem_path, &dirty)
            }
        }
        .inspect_err(|_| {
            // The pages the log gave up are nowhere now: the next Diff has them all.
            self.vm.stop_dirty_log();
        })?;
        let t_memory = t1.elapsed();
        let body = serde_json::to_vec(&snap).map_err(|e| SnapshotError::Encode(e.to_string()))?;
        format::write(state_path, &body)?;
        let times = CreateTimes {
            state: t_state + t0.elapsed().saturating_sub(t_state + t_memory),
            memory: t_memory,
        };
        tracing::info!(
            state = %state_path.display(),
            memory = %mem_path.display(),
            ?times,
            "snapshot created"
        );
        Ok(times)
    }

    /// Runs, in each restored device, what it must tell its driver about the move.
    pub(crate) fn after_restore(&self) {
        for t in &self.virtio {
            let core = match t {
                VirtioTransport::Mmio(t) => lock(t).core(),
                VirtioTransport::Pci(t) => lock(t).core(),
            };
            core.after_restore();
        }
    }

    /// Duplicates of the host descriptors the VM's devices work through (TAP queues,
    /// vsock listeners), with what each is, for a migration's destination on this host.
    pub(crate) fn host_handles(
        &self,
    ) -> std::io::Result<(Vec<crate::migration::HandleKind>, Vec<std::os::fd::OwnedFd>)> {
        use crate::migration::HandleKind;
        let (mut kinds, mut fds) = (Vec::new(), Vec::new());
        for t in &self.virtio {
            let core = match t {
                VirtioTransport::Mmio(t) => lock(t).core(),
                VirtioTransport::Pci(t) => lock(t).core(),
            };
            match core.host_handles()? {
                Some(virtio::HostHandle::Tap { name, queues }) => {
                    kinds.push(HandleKind::Tap {
                        name,
                        queues: queues.len() as u32,
                    });
                    fds.extend(queues);
                }
                Some(virtio::HostHandle::VsockListener { path, fd }) => {
                    kinds.push(HandleKind::Vsock { path });
                    fds.push(fd);
                }
                None => {}
            }
        }
        Ok((kinds, fds))
    }

    /// The paused VM's state, its memory laid out as [`memory::layout`] places it.
    pub(crate) fn state(&self) -> Result<VmSnapshot, SnapshotError> {
        let accel_err = |source| SnapshotError::Accel {
            accel: self.accel.clone(),
            source,
        };
        let saved_unix_ns = unix_now_ns();
        let vm = self.vm.save_state().map_err(accel_err)?;
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| lock(v).save_state())
            .collect::<hypervisor::Result<Vec<_>>>()
            .map_err(accel_err)?;
        let portable_vcpus = self
            .vcpus
            .iter()
            .map(|v| portable::save(lock(v).as_ref()))
            .collect::<hypervisor::Result<Vec<_>>>()
            .map_err(accel_err)?;
        let virtio = self
            .virtio
            .iter()
            .map(|t| match t {
                VirtioTransport::Mmio(t) => VirtioSnapshot::Mmio(lock(t).snapshot()),
                VirtioTransport::Pci(t) => VirtioSnapshot::Pci(lock(t).snapshot()),
            })
            .collect();
        let config = self.config_now();
        let api = lock(&self.live).as_ref().map(|(_, a)| a.clone());
        Ok(VmSnapshot {
            // Descriptors mean nothing to the process that restores it: it opens by name.
            config: config.without_fds(),
            accel: self.accel.clone(),
            saved_unix_ns,
            cpuid_fingerprint: self.cpuid_fingerprint,
            memory: memory::layout(&self.memory),
            disks: disk_identities(&config)?,
            vm,
            vcpus,
            serial: lock(&self.serial).snapshot(),
            ged_pending: lock(&self.ged).pending(),
            rtc: RtcSnapshot::of(&lock(&self.rtc)),
            virtio,
            firmware: self.firmware.as_ref().map(|(f, p, g)| FirmwareSnapshot {
                fw_cfg: lock(f).position(),
                pm1: lock(p).regs(),
                gpe0: lock(g).regs(),
                uefi: self.uefi.as_ref().map(UefiDevices::snapshot),
            }),
            portable: Some(portable::Portable {
                vcpus: portable_vcpus,
                features: self.cpuid_features.clone(),
            }),
            api,
        })
    }
}

/// A snapshot read and checked, ready for `Vmm::restore`.
#[derive(Debug)]
pub struct Loaded {
    pub snapshot: VmSnapshot,
    pub state_path: PathBuf,
    pub mem_path: PathBuf,
    /// Guest memory received from a migration's source, used instead of `mem_path`.
    pub received: Option<GuestMemoryMmap>,
    /// TAP queues and vsock listeners a migration's source on this host handed over
    /// (taken by the devices that use them).
    pub handover: Mutex<crate::migration::Handover>,
}

impl Loaded {
    /// The VM's configuration, with the restoring VMM's serial backend.
    pub fn config(&self) -> &VmConfig {
        &self.snapshot.config
    }
}

/// Reads and checks the state file at `state_path` and the size of the memory file at
/// `mem_path`; starts nothing.
pub fn load(state_path: &Path, mem_path: &Path) -> Result<Loaded, SnapshotError> {
    load_as(state_path, mem_path, None)
}

/// [`load`], the snapshot's disks taking the files `expected` was handed
/// ([`VmConfig::adopt_files`]) before they are checked; refused when `expected` is
/// another VM.
pub fn load_as(
    state_path: &Path,
    mem_path: &Path,
    expected: Option<&VmConfig>,
) -> Result<Loaded, SnapshotError> {
    let body = format::read(state_path)?;
    let mut snapshot: VmSnapshot =
        serde_json::from_slice(&body).map_err(|e| format::FormatError::Body {
            path: state_path.into(),
            why: e.to_string(),
        })?;
    snapshot
        .config
        .adopt_files(expected)
        .map_err(SnapshotError::Mismatch)?;
    check_layout(&snapshot)?;
    let want: u64 = snapshot.memory.iter().map(|r| r.len).sum();
    let have = std::fs::metadata(mem_path)
        .map_err(|source| memory::MemoryError::Open {
            path: mem_path.into(),
            source,
        })?
        .len();
    if have != want {
        return Err(memory::MemoryError::Size {
            path: mem_path.into(),
            want,
            have,
        }
        .into());
    }
    check_host(&snapshot)?;
    Ok(Loaded {
        snapshot,
        state_path: state_path.into(),
        mem_path: mem_path.into(),
        received: None,
        handover: Mutex::default(),
    })
}

/// Whether the snapshot's vCPUs and memory regions are what its configuration builds.
pub(crate) fn check_layout(snapshot: &VmSnapshot) -> Result<(), SnapshotError> {
    if snapshot.vcpus.len() != usize::from(snapshot.config.cpus) {
        return Err(SnapshotError::Invalid(format!(
            "{} vCPU states for {} vCPUs",
            snapshot.vcpus.len(),
            snapshot.config.cpus
        )));
    }
    // Exactly the RAM layout its configuration gives (and the firmware's region below
    // 4 GiB), nothing placed elsewhere.
    let config = &snapshot.config;
    let uefi = config
        .firmware
        .as_deref()
        .is_some_and(|f| is_uefi_file(config, f));
    let saved_uefi = snapshot.firmware.as_ref().and_then(|f| f.uefi.as_ref());
    if config.firmware.is_some() != snapshot.firmware.is_some() {
        return Err(SnapshotError::Invalid(
            "its firmware state does not match its configuration".into(),
        ));
    }
    if uefi != saved_uefi.is_some() {
        return Err(SnapshotError::Mismatch(if uefi {
            "its firmware is UEFI now, and the snapshot holds no UEFI platform state".into()
        } else {
            "the snapshot holds UEFI platform state, and its firmware is not UEFI".into()
        }));
    }
    // UEFI's platform leaves a larger hole below 4 GiB.
    let gap_start = if uefi {
        arch::layout::UEFI_MMIO_GAP_START
    } else {
        arch::layout::MMIO_GAP_START
    };
    let mut ram = arch::layout::ram_regions_below(config.memory_bytes(), gap_start);
    if let Some(f) = &config.firmware {
        let bad = |e: &dyn std::fmt::Display| {
            SnapshotError::Mismatch(format!("firmware {}: {e}", f.display()))
        };
        let len = (config.open_named(f).and_then(|f| f.metadata()))
            .map_err(|e| bad(&e))?
            .len();
        let region = match saved_uefi {
            Some(u) => arch::firmware::uefi_flash(len, u.vars.len)
                .map(|l| (l.code_base, l.code_len))
                .map_err(|e| bad(&e))?,
            None => arch::firmware::bios_region(len).map_err(|e| bad(&e))?,
        };
        ram.push(region);
        // Memory regions go in address order: the firmware's below the RAM above 4 GiB.
        ram.sort_by_key(|&(gpa, _)| gpa);
    }
    let layout_ok = snapshot.memory.len() == ram.len()
        && snapshot
            .memory
            .iter()
            .zip(&ram)
            .all(|(m, &(gpa, len))| m.gpa == gpa && m.len == len);
    if !layout_ok {
        return Err(SnapshotError::Invalid(format!(
            "its memory regions are not the RAM layout of {} MiB",
            snapshot.config.memory_mib
        )));
    }
    Ok(())
}

/// Whether this host can run the snapshot: its disks as they were, nothing refused.
pub(crate) fn check_host(snapshot: &VmSnapshot) -> Result<(), SnapshotError> {
    let disks = disk_identities(&snapshot.config)?;
    for (now, then) in disks.iter().zip(&snapshot.disks) {
        if now != then {
            return Err(SnapshotError::Mismatch(format!(
                "disk {} has {} bytes, it had {} when the snapshot was taken",
                now.path.display(),
                now.len,
                then.len
            )));
        }
    }
    if disks.len() != snapshot.disks.len() {
        return Err(SnapshotError::Invalid(
            "its disk list is inconsistent".into(),
        ));
    }
    check_uefi_vars(snapshot)
}

/// Whether the variable store the configuration gives a UEFI VM (its file, or without
/// one the template beside the code) is the size of the snapshot's flash.
fn check_uefi_vars(snapshot: &VmSnapshot) -> Result<(), SnapshotError> {
    let Some(saved) = snapshot.firmware.as_ref().and_then(|f| f.uefi.as_ref()) else {
        return Ok(());
    };
    let config = &snapshot.config;
    let path = match &config.firmware_vars {
        Some(p) => p.clone(),
        None => config
            .firmware
            .as_deref()
            .and_then(crate::config::uefi_vars_template)
            .ok_or_else(|| {
                SnapshotError::Mismatch(
                    "its UEFI firmware has no variable store and no template beside it".into(),
                )
            })?,
    };
    let len = (config.open_named(&path).and_then(|f| f.metadata()))
        .map_err(|e| {
            SnapshotError::Mismatch(format!("UEFI variable store {}: {e}", path.display()))
        })?
        .len();
    if len != saved.vars.len {
        return Err(SnapshotError::Mismatch(format!(
            "the UEFI variable store {} has {len} bytes, the snapshot's flash {}",
            path.display(),
            saved.vars.len
        )));
    }
    Ok(())
}

/// The state and memory files of a snapshot folder (`vessel run --restore DIR`).
pub fn files_in(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join(STATE_FILE), dir.join(MEMORY_FILE))
}

/// The state file's name in a snapshot folder.
pub const STATE_FILE: &str = "vmstate";
/// The memory file's name in a snapshot folder.
pub const MEMORY_FILE: &str = "memory";

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vessel-snap-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A UEFI VM's snapshot carries its platform; one that does not fit its firmware
    /// (no platform state, another variable store size, a BIOS's state) is refused.
    #[test]
    fn a_uefi_snapshot_must_carry_a_platform_that_fits_its_firmware() {
        let d = scratch("uefi");
        let mut image = vec![0u8; 8 * 4096];
        image[40..44].copy_from_slice(b"_FVH");
        let code = d.join("OVMF_CODE.fd");
        std::fs::write(&code, &image).unwrap();
        let vars = d.join("vars.fd");
        std::fs::write(&vars, vec![0xffu8; 4 * 4096]).unwrap();
        let mut snap = snapshot(64);
        snap.config.kernel = None;
        snap.config.firmware = Some(code.clone());
        snap.config.firmware_vars = Some(vars.clone());
        let flash = devices::pflash::Pflash::new(vec![0xff; 4 * 4096], None, false).unwrap();
        let pci = PciRoot::new();
        let devices = UefiDevices {
            vars: Arc::new(Mutex::new(flash)),
            mch: Arc::new(Mutex::new(ChipsetFunction::mch())),
            lpc: Arc::new(Mutex::new(ChipsetFunction::lpc())),
            pm_timer: Arc::new(Mutex::new(PmTimer::starting_at(77))),
            pci: Arc::new(pci),
        };
        devices.pci.set_address(0x8000_f840);
        let platform = devices.snapshot();
        assert_eq!(platform.pci_address, 0x8000_f840);
        assert!(platform.pm_timer >= 77);
        snap.firmware = Some(FirmwareSnapshot {
            fw_cfg: FwCfgPosition::default(),
            pm1: [0; 6],
            gpe0: [0; 4],
            uefi: Some(platform),
        });
        // Below UEFI's gap, then the code ending at 4 GiB.
        let mut regions =
            arch::layout::ram_regions_below(64 << 20, arch::layout::UEFI_MMIO_GAP_START);
        regions.push((arch::layout::MMIO_GAP_END - 8 * 4096, 8 * 4096));
        let mut off = 0;
        snap.memory = regions
            .iter()
            .map(|&(gpa, len)| {
                off += len;
                MemRegion {
                    gpa,
                    len,
                    file_offset: off - len,
                }
            })
            .collect();
        let (state, mem) = write(&d, &snap, off);
        if let Err(e) = load(&state, &mem) {
            panic!("a UEFI VM's snapshot was refused: {e}");
        }
        // Round trip through JSON.
        let loaded = load(&state, &mem).unwrap();
        assert_eq!(loaded.snapshot.firmware, snap.firmware);

        // The variable store grew since.
        std::fs::write(&vars, vec![0xffu8; 8 * 4096]).unwrap();
        let e = load(&state, &mem).unwrap_err();
        assert!(matches!(e, SnapshotError::Mismatch(_)), "{e}");
        assert!(
            e.to_string()
                .contains("has 32768 bytes, the snapshot's flash 16384"),
            "{e}"
        );
        std::fs::write(&vars, vec![0xffu8; 4 * 4096]).unwrap();
        // No platform state for UEFI firmware.
        let mut bare = snap.clone();
        if let Some(f) = &mut bare.firmware {
            f.uefi = None;
        }
        let (state, mem) = write(&d, &bare, off);
        let e = load(&state, &mem).unwrap_err();
        assert!(
            e.to_string().contains("holds no UEFI platform state"),
            "{e}"
        );
        // UEFI state, and a BIOS in the configuration.
        let bios = d.join("bios.bin");
        std::fs::write(&bios, vec![0u8; 64 << 10]).unwrap();
        let mut wrong = snap.clone();
        wrong.config.firmware = Some(bios);
        let (state, mem) = write(&d, &wrong, off);
        let e = load(&state, &mem).unwrap_err();
        assert!(e.to_string().contains("its firmware is not UEFI"), "{e}");
        // Another code size moves the code: the layout is not the snapshot's.
        std::fs::write(&code, [image.as_slice(), &[0u8; 4096]].concat()).unwrap();
        let (state, mem) = write(&d, &snap, off);
        let e = load(&state, &mem).unwrap_err();
        assert!(e.to_string().contains("not the RAM layout"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    fn snapshot(mib: u64) -> VmSnapshot {
        let mut config = VmConfig::new("/nonexistent/vmlinuz");
        config.memory_mib = mib;
        let memory = arch::layout::ram_regions(config.memory_bytes())
            .into_iter()
            .scan(0, |off, (gpa, len)| {
                let r = MemRegion {
                    gpa,
                    len,
                    file_offset: *off,
                };
                *off += len;
                Some(r)
            })
            .collect();
        VmSnapshot {
            config,
            accel: "emu".into(),
            saved_unix_ns: 0,
            cpuid_fingerprint: 0,
            memory,
            disks: Vec::new(),
            vm: serde_json::Value::Null,
            vcpus: vec![serde_json::Value::Null],
            serial: SerialSnapshot::default(),
            ged_pending: 0,
            rtc: RtcSnapshot {
                index: 0,
                ram: vec![0; 128],
                offset_s: 0,
                held: None,
            },
            virtio: Vec::new(),
            firmware: None,
            portable: None,
            api: None,
        }
    }

    fn write(dir: &Path, snap: &VmSnapshot, mem_len: u64) -> (PathBuf, PathBuf) {
        let (state, mem) = files_in(dir);
        format::write(&state, &serde_json::to_vec(snap).unwrap()).unwrap();
        std::fs::File::create(&mem)
            .unwrap()
            .set_len(mem_len)
            .unwrap();
        (state, mem)
    }

    #[test]
    fn load_checks_the_layout_the_memory_file_and_the_vcpus() {
        let dir = scratch("load");
        let good = snapshot(64);
        let (state, mem) = write(&dir, &good, 64 << 20);
        let loaded = load(&state, &mem).unwrap();
        assert_eq!(loaded.config().memory_mib, 64);
        // The memory file of another size.
        write(&dir, &good, 32 << 20);
        let e = load(&state, &mem).unwrap_err().to_string();
        assert!(e.contains("has 33554432 bytes"), "{e}");
        // RAM placed where the configuration has none.
        let mut moved = good.clone();
        moved.memory[0].gpa = 0x1000_0000;
        write(&dir, &moved, 64 << 20);
        let e = load(&state, &mem).unwrap_err().to_string();
        assert!(e.contains("not the RAM layout"), "{e}");
        // vCPU states that do not match the vCPU count.
        let mut cpus = good.clone();
        cpus.config.cpus = 2;
        write(&dir, &cpus, 64 << 20);
        let e = load(&state, &mem).unwrap_err().to_string();
        assert!(e.contains("1 vCPU states for 2 vCPUs"), "{e}");
        // Unknown fields are a body this version does not read.
        let (state, mem) = files_in(&dir);
        let mut v = serde_json::to_value(&good).unwrap();
        v["extra"] = serde_json::json!(1);
        format::write(&state, &serde_json::to_vec(&v).unwrap()).unwrap();
        let e = load(&state, &mem).unwrap_err().to_string();
        assert!(e.contains("is corrupt"), "{e}");
        // A vsock device's snapshot loads (its host connections are not in it: the
        // restored device resets the driver's).
        let mut vsock = good;
        vsock.config.vsock = Some(crate::config::VsockConfig {
            guest_cid: 3,
            uds_path: "/tmp/v.sock".into(),
        });
        write(&dir, &vsock, 64 << 20);
        if let Err(e) = load(&state, &mem) {
            panic!("a vsock VM's snapshot was refused: {e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_diff_holds_the_dirty_pages_and_rebases_onto_its_base() {
        use vm_memory::{Bytes, GuestAddress};
        let dir = scratch("diff");
        let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        ram.write_slice(b"base", GuestAddress(0x3000)).unwrap();
        ram.write_slice(b"keep", GuestAddress(0x5000)).unwrap();
        let base = dir.join("base");
        memory::write(&ram, &base).unwrap();
        // Page 3 changes, page 7 is written, page 5 is zeroed: all three dirty.
        ram.write_slice(b"next", GuestAddress(0x3000)).unwrap();
        ram.write_slice(b"new!", GuestAddress(0x7000)).unwrap();
        ram.write_slice(&[0u8; 4], GuestAddress(0x5000)).unwrap();
        let mut dirty = vec![0u64; 4];
        dirty[0] = (1 << 3) | (1 << 5) | (1 << 7);
        let diff = dir.join("diff");
        memory::write_diff(&ram, &diff, &dirty).unwrap();
        let meta = std::fs::metadata(&diff).unwrap();
        assert_eq!(meta.len(), 1 << 20);
        {
            use std::os::unix::fs::MetadataExt;
            assert!(
                meta.blocks() * 512 <= 64 << 10,
                "only dirty pages are written"
            );
        }
        assert_eq!(memory::rebase(&base, &diff).unwrap() % 4096, 0);
        let merged = std::fs::read(&base).unwrap();
        assert_eq!(&merged[0x3000..0x3004], b"next");
        assert_eq!(&merged[0x7000..0x7004], b"new!");
        assert_eq!(
            &merged[0x5000..0x5004],
            &[0; 4],
            "a zeroed page is in the diff"
        );
        // A diff of another size is refused.
        std::fs::File::options()
            .write(true)
            .open(&diff)
            .unwrap()
            .set_len(1 << 19)
            .unwrap();
        assert!(memory::rebase(&base, &diff).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A restored VM's memory maps its snapshot's file: a snapshot of it holds the pages
    /// it got from that file and never touched, besides the ones it wrote; the pages it
    /// never touched over the file's holes stay holes.
    #[test]
    fn a_snapshot_of_restored_memory_keeps_the_pages_it_never_touched() {
        use std::os::unix::fs::MetadataExt;
        use vm_memory::{Bytes, GuestAddress};
        let dir = scratch("mem-again");
        let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        ram.write_slice(b"first", GuestAddress(0x1000)).unwrap();
        ram.write_slice(b"second", GuestAddress(0x20_0000)).unwrap();
        let (one, two) = (dir.join("one"), dir.join("two"));
        let regions = memory::write(&ram, &one).unwrap();
        let restored = memory::map(&one, &regions).unwrap();
        restored
            .write_slice(b"third", GuestAddress(0x30_0000))
            .unwrap();
        memory::write(&restored, &two).unwrap();
        let file = std::fs::read(&two).unwrap();
        assert_eq!(file.len(), 4 << 20);
        assert_eq!(&file[0x1000..0x1005], b"first");
        assert_eq!(&file[0x20_0000..0x20_0006], b"second");
        assert_eq!(&file[0x30_0000..0x30_0005], b"third");
        assert!(
            std::fs::metadata(&two).unwrap().blocks() * 512 <= 64 << 10,
            "untouched holes were written"
        );
        // Written again over itself, while a mapping of the old file lives.
        let again = memory::map(&two, &regions).unwrap();
        memory::write(&again, &two).unwrap();
        let file = std::fs::read(&two).unwrap();
        assert_eq!(&file[0x30_0000..0x30_0005], b"third");
        let mut b = [0u8; 5];
        again.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"first");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_memory_file_round_trip_is_sparse_and_private() {
        use vm_memory::{Bytes, GuestAddress};
        let dir = scratch("mem");
        let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        ram.write_slice(b"hello", GuestAddress(0x8_0000)).unwrap();
        let path = dir.join("memory");
        let regions = memory::write(&ram, &path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 1 << 20);
        {
            use std::os::unix::fs::MetadataExt;
            assert!(meta.blocks() * 512 < 1 << 20, "zero pages were written");
            assert_eq!(
                meta.mode() & 0o777,
                0o600,
                "guest memory readable by others"
            );
        }
        let mapped = memory::map(&path, &regions).unwrap();
        let mut b = [0u8; 5];
        mapped.read_slice(&mut b, GuestAddress(0x8_0000)).unwrap();
        assert_eq!(&b, b"hello");
        // Writes stay in the mapping, never in the file.
        mapped
            .write_slice(b"HELLO", GuestAddress(0x8_0000))
            .unwrap();
        let file = std::fs::read(&path).unwrap();
        assert_eq!(&file[0x8_0000..0x8_0005], b"hello");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
