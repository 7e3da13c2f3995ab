//! `VmConfig`: the one description of a VM. CLI flags, the VMM's API and the manager's
//! domain definitions all produce this shape, and `validate()` runs on every path.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use arch::cpuid::CpuModel;

/// Which accelerator runs the vCPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Pick what really works on this host (see `accel::choose`).
    #[default]
    Auto,
    Kvm,
    Emu,
    /// The guest kernel on `emu`, long stretches of guest user code natively on a PVM
    /// host's KVM (never picked by `auto` yet).
    Hybrid,
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "emu" => Ok(Accel::Emu),
            "hybrid" => Ok(Accel::Hybrid),
            other => Err(format!(
                "unknown accelerator {other:?} (auto, kvm, emu or hybrid)"
            )),
        }
    }
}

/// Where the UART's output goes (and its input comes from).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "type", content = "path")]
pub enum SerialConfig {
    /// The VMM's stdin/stdout; raw and interactive on a terminal.
    #[default]
    Stdio,
    /// Append output to a file; no input.
    File(PathBuf),
    /// Discard output.
    Null,
}

impl std::str::FromStr for SerialConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdio" => Ok(SerialConfig::Stdio),
            "null" | "none" => Ok(SerialConfig::Null),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(SerialConfig::File(PathBuf::from(p))),
                _ => Err(format!(
                    "unknown serial backend {s:?} (stdio, null or file:PATH)"
                )),
            },
        }
    }
}

/// How a virtio device reaches the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// virtio-mmio: a window and a GSI each, described in the DSDT. What direct kernel
    /// boot has always used; no PCI enumeration.
    #[default]
    Mmio,
    /// virtio-pci (modern): a function on the PCI bus with MSI-X, as firmware, GRUB and
    /// distribution initramfs images expect.
    Pci,
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mmio" => Ok(Transport::Mmio),
            "pci" => Ok(Transport::Pci),
            other => Err(format!("unknown virtio transport {other:?} (mmio or pci)")),
        }
    }
}

pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1";

/// The BIOS a disk image boots through when no kernel is given: Debian's SeaBIOS
/// (package `seabios`), as QEMU's q35 machine uses it.
pub const DEFAULT_BIOS: &str = "/usr/share/seabios/bios.bin";
/// UEFI firmware: Debian's OVMF (package `ovmf`), its 4 MiB build without Secure Boot, as
/// QEMU takes it on two pflash drives: the code, and a copy of the variable template.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS_TEMPLATE: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// Which firmware boots a disk image (see [`DiskConfig::firmware_boot`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirmwareBoot {
    Bios,
    Uefi,
}

/// The boot code's part of an MBR (the disk signature and partition table follow).
const MBR_CODE_LEN: usize = 440;

/// The variable-store template that ships beside UEFI code: OVMF_CODE*.fd's
/// OVMF_VARS*.fd (Debian's and Fedora's naming), or None if the name has no "CODE".
pub fn uefi_vars_template(code: &std::path::Path) -> Option<PathBuf> {
    let name = code.file_name()?.to_str()?;
    name.contains("CODE")
        .then(|| code.with_file_name(name.replacen("CODE", "VARS", 1)))
}
pub const DEFAULT_MEMORY_MIB: u64 = 512;
/// APIC IDs are 8 bits and 0xff is the broadcast ID.
pub const MAX_CPUS: u8 = 254;
/// Below this the boot data alone does not fit.
pub const MIN_MEMORY_MIB: u64 = 8;

/// The guest's instruction-set architecture.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// x86-64 on KVM or Vessel's x86-64 CPU.
    #[default]
    X86_64,
    /// riscv64 on Vessel's RISC-V CPU (`rv64emu`), on the `virt`-like machine.
    Riscv64,
}

impl Arch {
    pub fn is_x86_64(&self) -> bool {
        *self == Arch::X86_64
    }
}

impl std::str::FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "x86_64" | "x86-64" | "amd64" => Ok(Arch::X86_64),
            "riscv64" => Ok(Arch::Riscv64),
            other => Err(format!(
                "unknown architecture {other:?} (x86_64 or riscv64)"
            )),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The guest architecture; x86_64 unless said.
    #[serde(default, skip_serializing_if = "Arch::is_x86_64")]
    pub arch: Arch,
    /// The kernel for direct boot; None with `firmware`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// A BIOS image (SeaBIOS's `bios.bin`) to boot through instead of a kernel: mapped
    /// below 4 GiB, its last 128 KiB also at 0xe0000, the vCPU starting at the reset
    /// vector, the machine described to it through fw_cfg.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<PathBuf>,
    /// Option ROMs the firmware runs (fw_cfg `genroms/NAME`). With both a kernel and a
    /// firmware, QEMU's `linuxboot.bin` among them boots the kernel through the firmware.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub option_roms: Vec<PathBuf>,
    /// UEFI firmware's variable store (QEMU's second pflash drive, OVMF_VARS.fd): read
    /// and written in place, so variables persist. None with UEFI firmware: a copy of
    /// the template next to the code (OVMF_CODE*.fd -> OVMF_VARS*.fd) lives in memory
    /// for this run only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware_vars: Option<PathBuf>,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    #[serde(default = "default_cpus")]
    pub cpus: u8,
    #[serde(default)]
    pub accel: Accel,
    /// The CPU model the guest sees (`--cpu`): which instruction-set extensions it is
    /// promised. The VM fails to start if the accelerator cannot provide them.
    #[serde(default)]
    pub cpu_model: CpuModel,
    /// CPUID bits set or cleared on top of the model (Firecracker's custom CPU template
    /// modifiers, `PUT /cpu-config`); a feature bit the accelerator lacks fails the start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpuid_modifiers: Vec<arch::cpuid::CpuidModifier>,
    /// Threads per core in the guest's CPU topology: 1, or 2 (Firecracker's `smt`; the
    /// CPU count must then be 1 or even).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub threads_per_core: u8,
    #[serde(default)]
    pub serial: SerialConfig,
    /// A bytes bucket on the UART's output (Firecracker's `/serial` `rate_limiter`):
    /// output beyond it is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_rate_limiter: Option<TokenBucketConfig>,
    /// virtio-blk disks, in order (the guest sees vda, vdb, ...).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// A virtio-rng device fed from the host's getrandom.
    #[serde(default)]
    pub rng: bool,
    /// Firecracker's entropy `rate_limiter` on that device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng_rate_limiter: Option<RateLimiterConfig>,
    /// A virtio-console (hvc0) besides the UART, and where its output goes.
    #[serde(default)]
    pub virtio_console: Option<SerialConfig>,
    /// A virtio-balloon device (Firecracker's `/balloon`, libvirt's
    /// `<memballoon model='virtio'>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    /// virtio-net interfaces on host TAP devices.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// A virtio-vsock device with its host side on a Unix socket.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// The transport of virtio devices that do not choose their own (disks and
    /// interfaces may).
    #[serde(default)]
    pub virtio_transport: Transport,
    /// The VM's name: a DNS label. cloud-init's default instance-id and hostname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// cloud-init NoCloud data, attached as a read-only `cidata` disk after `disks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<crate::cloud_init::CloudInitConfig>,
    /// The system UUID the firmware's SMBIOS tables give the guest
    /// (`/sys/class/dmi/id/product_uuid`): the manager passes the domain's UUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Files this configuration names (kernel, initrd, firmware, option ROMs, cloud-init
    /// files) that the VMM inherited open, by the name they stand for: it reads those
    /// from the descriptor and never opens the name, so a file swapped in after the
    /// manager's check is never what the guest gets. Set by a manager for each start,
    /// like [`DiskConfig::fds`]; never kept in a snapshot, refused from API clients.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub opened: Vec<OpenedFile>,
}

/// The balloon device, with Firecracker's field names and meaning.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// The target size in MiB: memory the guest is asked to give back.
    pub amount_mib: u32,
    /// The guest deflates the balloon instead of killing a process when it runs out of
    /// memory (VIRTIO_BALLOON_F_DEFLATE_ON_OOM).
    #[serde(default)]
    pub deflate_on_oom: bool,
    /// Seconds between statistics updates; 0: no statistics (no stats queue).
    #[serde(default)]
    pub stats_polling_interval_s: u16,
}

impl BalloonConfig {
    /// The target in the balloon's 4 KiB pages.
    pub fn target_pages(&self) -> u32 {
        self.amount_mib.saturating_mul(256)
    }
}

/// A file of the configuration the VMM inherited open ([`VmConfig::opened`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenedFile {
    /// The descriptor number in the VMM (3 or more).
    pub fd: i32,
    /// The name the configuration gives the file.
    pub path: PathBuf,
}

/// The name a VM without one goes by (its cloud-init instance-id and hostname).
pub const DEFAULT_VM_NAME: &str = "vessel";

/// virtio-vsock, Firecracker style: host programs connect to `uds_path` and say
/// `CONNECT <port>`; guest connections to host port P go to `<uds_path>_P`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
}

impl std::str::FromStr for VsockConfig {
    type Err = String;
    /// `cid=N,uds=PATH`
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut cid, mut uds) = (None, None);
        for opt in s.split(',') {
            match opt.split_once('=') {
                Some(("cid", v)) => {
                    cid = Some(
                        v.parse::<u64>()
                            .map_err(|_| format!("bad vsock cid {v:?}"))?,
                    )
                }
                Some(("uds", v)) if !v.is_empty() => uds = Some(PathBuf::from(v)),
                _ => return Err(format!("unknown --vsock option {opt:?} (cid=N, uds=PATH)")),
            }
        }
        let guest_cid = cid.ok_or("--vsock needs cid=N")?;
        // 0-2 are reserved (hypervisor, local, host); u32::MAX is VMADDR_CID_ANY.
        if guest_cid < 3 || guest_cid >= u64::from(u32::MAX) {
            return Err(format!("vsock cid {guest_cid} is reserved (use 3 or more)"));
        }
        Ok(VsockConfig {
            guest_cid,
            uds_path: uds.ok_or("--vsock needs uds=PATH")?,
        })
    }
}

/// One virtio-net interface backed by a host TAP device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The TAP device: created if missing, attached if it exists (persistent TAPs).
    pub tap: String,
    /// The guest's MAC, "52:54:00:12:34:56"; derived from the TAP name when absent.
    #[serde(default)]
    pub mac: Option<String>,
    /// virtio-mmio or virtio-pci; the machine's `virtio_transport` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
    /// The MTU advertised to the guest (VIRTIO_NET_F_MTU), 68 to 65535.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Queue pairs (VIRTIO_NET_F_MQ, QEMU's `queues`): several need a multi-queue TAP
    /// (one is created so when missing). 1 when absent; at most
    /// [`virtio::net::MAX_QUEUE_PAIRS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u16>,
    /// Firecracker's token-bucket limits on received and transmitted frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

impl NetConfig {
    /// The MAC as bytes, if given and well-formed.
    pub fn mac_bytes(&self) -> Option<Result<[u8; 6], String>> {
        self.mac.as_ref().map(|m| parse_mac(m))
    }
}

pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || format!("bad MAC address {s:?} (e.g. 52:54:00:12:34:56)");
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("MAC address {s:?} is multicast"));
    }
    Ok(mac)
}

impl std::str::FromStr for NetConfig {
    type Err = String;
    /// `tap=NAME[,mac=52:54:00:12:34:56][,transport=mmio|pci][,queues=N]`
    fn from_str(s: &str) -> Result<Self, String> {
        let mut tap = None;
        let mut mac = None;
        let mut transport = None;
        let mut queues = None;
        for opt in s.split(',') {
            match opt.split_once('=') {
                Some(("tap", v)) if !v.is_empty() => tap = Some(v.to_string()),
                Some(("mac", v)) => {
                    parse_mac(v)?;
                    mac = Some(v.to_string());
                }
                Some(("transport", v)) => transport = Some(v.parse()?),
                Some(("queues", v)) => queues = Some(parse_queues(v)?),
                _ => {
                    return Err(format!(
                        "unknown --net option {opt:?} (tap=NAME, mac=MAC, transport=mmio|pci, queues=N)"
                    ))
                }
            }
        }
        Ok(NetConfig {
            tap: tap.ok_or("--net needs tap=NAME")?,
            mac,
            transport,
            mtu: None,
            queues,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        })
    }
}

/// A `queues=N` option's value: 1 or more.
fn parse_queues(v: &str) -> Result<u16, String> {
    v.parse::<u16>()
        .ok()
        .filter(|&n| n >= 1)
        .ok_or_else(|| format!("queues={v:?}: a queue count, 1 or more"))
}

/// Disk image formats `--disk` accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

/// One virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    /// None opens the image as raw, and refuses one that starts with a qcow2 header (the
    /// user says which was meant). The format is never guessed from content a guest can
    /// write: see [`block::open_guest_disk`] and docs/SECURITY.md.
    #[serde(default)]
    pub format: Option<DiskFormat>,
    #[serde(default)]
    pub read_only: bool,
    /// The folder the image and every backing file of its chain must be in, opened
    /// beneath it without following links (`block::open_guest_disk_in`): the manager sets
    /// it to a pool volume's pool, so a qcow2 header naming a host file outside the pool,
    /// or a link swapped in for the volume, is refused. An absolute path with no link on
    /// it; `path` must lie below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folder: Option<PathBuf>,
    /// The files of the disk's chain, open already: the image, then each backing file,
    /// as descriptors this VMM inherited from the manager that opened and checked them
    /// (issue 22). When given, the disk is built from these alone and `path` and
    /// `folder` only name it: nothing is opened by name, so a file swapped in after the
    /// check is never what the guest gets. Set by a manager for each start, in the
    /// config file it hands the VMM; never kept in a snapshot, and refused from API
    /// clients (a descriptor number names whatever this process has open).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fds: Vec<InheritedFile>,
    /// virtio-mmio or virtio-pci; the machine's `virtio_transport` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
    /// Firecracker's token-bucket limits on the disk's requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
    /// Request queues (VIRTIO_BLK_F_MQ, QEMU's `num-queues`): a guest with several CPUs
    /// submits on several. 1 when absent; at most [`virtio::blk::MAX_QUEUES`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u16>,
}

fn block_format(f: DiskFormat) -> block::Format {
    match f {
        DiskFormat::Raw => block::Format::Raw,
        DiskFormat::Qcow2 => block::Format::Qcow2,
    }
}

/// One file of a disk's chain that the VMM inherited open ([`DiskConfig::fds`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InheritedFile {
    /// The descriptor number in the VMM (3 or more).
    pub fd: i32,
    pub format: DiskFormat,
    /// The name it was opened by, for messages.
    pub path: PathBuf,
}

impl InheritedFile {
    /// A descriptor of its own for the file (close-on-exec): the disk can be opened more
    /// than once (a boot-sector probe, then the VM's open), and the inherited one stays
    /// for the VMM's life.
    fn dup(&self) -> std::io::Result<std::fs::File> {
        dup_inherited(self.fd)
    }
}

/// A descriptor of its own (close-on-exec) for inherited descriptor `fd`; refused below 3
/// (the standard streams) and for a number not open.
fn dup_inherited(fd: i32) -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    if fd < 3 {
        return Err(std::io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: F_DUPFD_CLOEXEC reads no memory; on a descriptor not open it fails
    // with EBADF, which is returned.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` was just made by F_DUPFD_CLOEXEC and is owned by nothing else.
    Ok(unsafe { std::fs::File::from_raw_fd(new) })
}

/// A file's whole content read from offset 0 with `read_at`, whatever the (shared)
/// offset of the descriptor is.
pub fn read_whole(f: &std::fs::File) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut out = Vec::with_capacity(f.metadata()?.len().min(1 << 30) as usize);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read_at(&mut buf, out.len() as u64) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(buf.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// A token bucket as Firecracker's API defines it: `size` tokens refilled over
/// `refill_time` milliseconds, plus a `one_time_burst`; size or refill time 0 is no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    pub size: u64,
    #[serde(default)]
    pub one_time_burst: Option<u64>,
    pub refill_time: u64,
}

impl TokenBucketConfig {
    /// Whether this bucket limits anything.
    pub fn limits(&self) -> bool {
        self.size != 0 && self.refill_time != 0
    }

    /// The device side of it (a full bucket); None when it limits nothing.
    pub fn bucket(&self) -> Option<virtio::rate_limiter::TokenBucket> {
        virtio::rate_limiter::TokenBucket::new(
            self.size,
            self.one_time_burst.unwrap_or(0),
            self.refill_time,
        )
    }
}

/// A rate limiter: a bytes bucket (`bandwidth`) and an operations bucket (`ops`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    #[serde(default)]
    pub bandwidth: Option<TokenBucketConfig>,
    #[serde(default)]
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimiterConfig {
    /// Whether either bucket limits anything.
    pub fn limits(&self) -> bool {
        self.bandwidth.is_some_and(|b| b.limits()) || self.ops.is_some_and(|b| b.limits())
    }

    /// `{}` means "no limiter", as Firecracker stores it.
    pub fn normalized(r: Option<RateLimiterConfig>) -> Option<RateLimiterConfig> {
        r.filter(|r| r.bandwidth.is_some() || r.ops.is_some())
    }

    /// A PATCH: a bucket given replaces the old one, a bucket left out stays.
    pub fn patched(
        old: Option<RateLimiterConfig>,
        new: Option<RateLimiterConfig>,
    ) -> Option<RateLimiterConfig> {
        let Some(new) = new else { return old };
        let old = old.unwrap_or_default();
        RateLimiterConfig::normalized(Some(RateLimiterConfig {
            bandwidth: new.bandwidth.or(old.bandwidth),
            ops: new.ops.or(old.ops),
        }))
    }

    /// The device's limiter.
    pub fn limiter(r: Option<&RateLimiterConfig>) -> virtio::rate_limiter::RateLimiter {
        virtio::rate_limiter::RateLimiter::new(
            r.and_then(|r| r.bandwidth.as_ref())
                .and_then(TokenBucketConfig::bucket),
            r.and_then(|r| r.ops.as_ref())
                .and_then(TokenBucketConfig::bucket),
        )
    }

    /// The change a PATCH with this limiter makes to a running device's buckets: each one
    /// given is replaced (or removed, when it limits nothing), each one left out stays.
    pub fn update(
        &self,
    ) -> (
        virtio::rate_limiter::BucketUpdate,
        virtio::rate_limiter::BucketUpdate,
    ) {
        use virtio::rate_limiter::BucketUpdate;
        let one = |b: Option<TokenBucketConfig>| match b {
            None => BucketUpdate::Keep,
            Some(b) => b.bucket().map_or(BucketUpdate::Disable, BucketUpdate::Set),
        };
        (one(self.bandwidth), one(self.ops))
    }
}

impl VmConfig {
    /// This configuration without what a manager derives for each start rather than
    /// defines (each disk's [`DiskConfig::folder`]), for comparing a saved VM with a
    /// definition.
    pub fn as_defined(&self) -> VmConfig {
        let mut c = self.clone();
        c.opened.clear();
        for d in &mut c.disks {
            d.folder = None;
            d.fds.clear();
        }
        c
    }

    /// Takes the disks' descriptors and folders from `expected` (a manager's `--config`
    /// for a restore or an incoming migration), when it describes this same VM (compared
    /// as defined, the serial console aside): the state names its disks by path, and the
    /// restoring VMM then opens the files the manager checked, not whatever the names
    /// lead to now. Descriptors the state itself names are dropped: a state file is
    /// data, and a number in it would name whatever this process has open.
    pub fn adopt_files(&mut self, expected: Option<&VmConfig>) -> Result<(), String> {
        self.opened.clear();
        for d in &mut self.disks {
            d.fds.clear();
        }
        let Some(want) = expected else {
            return Ok(());
        };
        // Where vsock's host socket is, is the destination's to say, as its serial output
        // is (a daemon puts it in the domain's run folder, which differs between daemons);
        // the device binds it afresh there.
        if let (Some(v), Some(w)) = (self.vsock.as_mut(), want.vsock.as_ref()) {
            v.uds_path = w.uds_path.clone();
        }
        let mut got = self.as_defined();
        got.serial = want.serial.clone();
        if got != want.as_defined() {
            return Err("the VM is not the one --config describes".into());
        }
        for (d, w) in self.disks.iter_mut().zip(&want.disks) {
            d.fds = w.fds.clone();
            d.folder = w.folder.clone();
        }
        self.opened = want.opened.clone();
        Ok(())
    }

    /// This configuration without the descriptors it was handed ([`DiskConfig::fds`]):
    /// what a snapshot or a migration keeps, since those numbers mean nothing to another
    /// process.
    pub fn without_fds(&self) -> VmConfig {
        let mut c = self.clone();
        c.opened.clear();
        for d in &mut c.disks {
            d.fds.clear();
        }
        c
    }
}

impl DiskConfig {
    /// Opens the disk for the guest: with its given format, or raw when none was given
    /// (never probed; a qcow2-looking file without a format is refused).
    pub fn open(&self) -> Result<Box<dyn block::BlockBackend>, block::OpenError> {
        self.open_with(self.read_only, false)
    }

    /// [`DiskConfig::open`], read-only when asked, sharing the image's locks with
    /// `force_share` (`block::open_guest_disk_with`); beneath [`DiskConfig::folder`] when
    /// it is given.
    pub fn open_with(
        &self,
        read_only: bool,
        force_share: bool,
    ) -> Result<Box<dyn block::BlockBackend>, block::OpenError> {
        if !self.fds.is_empty() {
            let files = self
                .fds
                .iter()
                .map(|f| {
                    Ok(block::ChainFile {
                        path: f.path.clone(),
                        file: f.dup().map_err(|source| block::OpenError::OpenFile {
                            path: f.path.clone(),
                            source,
                        })?,
                        format: block_format(f.format),
                    })
                })
                .collect::<Result<Vec<_>, block::OpenError>>()?;
            return block::open_guest_disk_files(files, read_only, force_share);
        }
        match &self.folder {
            Some(dir) => {
                let folder = block::Folder::open(dir)?;
                block::open_guest_disk_in(
                    &folder,
                    &self.path,
                    self.block_format(),
                    read_only,
                    force_share,
                )
            }
            None => {
                block::open_guest_disk_with(&self.path, self.block_format(), read_only, force_share)
            }
        }
    }

    /// The image's file, read-only unless it was handed over open ([`DiskConfig::fds`]:
    /// then as it was handed over), for reading its size; nothing of its chain.
    pub fn image_file(&self) -> std::io::Result<std::fs::File> {
        match self.fds.first() {
            Some(f) => f.dup(),
            None => std::fs::File::open(&self.path),
        }
    }

    /// The files [`DiskConfig::open`] opens: the image, then its backing chain (with a
    /// folder, only as far as the chain stays in it: the open refuses the rest).
    pub fn files(&self) -> Vec<PathBuf> {
        if !self.fds.is_empty() {
            // Open already: nothing to reach by name.
            return Vec::new();
        }
        match self.folder.as_deref().map(block::Folder::open) {
            Some(Ok(folder)) => {
                block::guest_disk_files_in(&folder, &self.path, self.block_format())
            }
            Some(Err(_)) => Vec::new(),
            None => block::guest_disk_files(&self.path, self.block_format()),
        }
    }

    fn block_format(&self) -> Option<block::Format> {
        self.format.map(block_format)
    }

    /// Whether the image's first sector ends in the boot signature 0x55 0xAA, which a PC
    /// BIOS checks before it boots a disk. Read without taking the image's locks, with
    /// the guest's rules (never probed); false when it cannot be read (opening it for the
    /// VM reports why).
    pub fn has_boot_sector(&self) -> bool {
        self.firmware_boot().is_some()
    }

    /// How firmware would boot the image, read as [`DiskConfig::has_boot_sector`] reads
    /// it: a boot sector with code in it is a BIOS's to run; one with no code (GPT's
    /// protective MBR) in front of a GPT header is a UEFI-only image, which boots from
    /// its EFI system partition; None without the boot signature.
    pub fn firmware_boot(&self) -> Option<FirmwareBoot> {
        use block::BlockBackend as _;
        let mut image = self.open_with(true, true).ok()?;
        let mut sectors = [0u8; 1024];
        image.read_at(0, &mut sectors).ok()?;
        if sectors[510..512] != [0x55, 0xaa] {
            return None;
        }
        let no_code = sectors[..MBR_CODE_LEN].iter().all(|&b| b == 0);
        Some(if no_code && &sectors[512..520] == b"EFI PART" {
            FirmwareBoot::Uefi
        } else {
            FirmwareBoot::Bios
        })
    }
}

impl std::str::FromStr for BalloonConfig {
    type Err = String;
    /// `AMOUNT_MIB[,deflate_on_oom][,stats=SECONDS]`
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let amount = parts.next().unwrap_or_default();
        let mut b = BalloonConfig {
            amount_mib: amount
                .parse()
                .map_err(|_| format!("--balloon: {amount:?} is not a size in MiB"))?,
            ..BalloonConfig::default()
        };
        for opt in parts {
            match opt.split_once('=') {
                None if opt == "deflate_on_oom" => b.deflate_on_oom = true,
                Some(("stats", n)) => {
                    b.stats_polling_interval_s = n
                        .parse()
                        .map_err(|_| format!("--balloon stats={n}: seconds, 0 to 65535"))?
                }
                _ => {
                    return Err(format!(
                        "unknown --balloon option {opt:?} (deflate_on_oom, stats=SECONDS)"
                    ))
                }
            }
        }
        Ok(b)
    }
}

impl std::str::FromStr for DiskConfig {
    type Err = String;
    /// `path[,format=raw|qcow2][,readonly][,transport=mmio|pci][,queues=N]`
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or("--disk needs a path")?;
        let mut disk = DiskConfig {
            path: PathBuf::from(path),
            format: None,
            read_only: false,
            folder: None,
            fds: Vec::new(),
            transport: None,
            rate_limiter: None,
            queues: None,
        };
        for opt in parts {
            match opt {
                "readonly" | "ro" | "readonly=on" => disk.read_only = true,
                "format=raw" => disk.format = Some(DiskFormat::Raw),
                "format=qcow2" => disk.format = Some(DiskFormat::Qcow2),
                other => match other.split_once('=') {
                    Some(("transport", t)) => disk.transport = Some(t.parse()?),
                    Some(("queues", n)) => disk.queues = Some(parse_queues(n)?),
                    _ => {
                        return Err(format!(
                        "unknown --disk option {other:?} (format=raw|qcow2, readonly, transport=mmio|pci, queues=N)"
                    ))
                    }
                },
            }
        }
        Ok(disk)
    }
}

/// At most this many virtio devices: one IOAPIC pin each, GSIs 16..23 (a virtio-pci
/// function's INTx line is its own GSI too).
pub const MAX_VIRTIO_DEVICES: usize = 8;
/// The smallest MTU an IPv4 interface takes (RFC 791).
pub const MIN_MTU: u16 = 68;

fn one() -> u8 {
    1
}

fn is_one(v: &u8) -> bool {
    *v == 1
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}
fn default_memory() -> u64 {
    DEFAULT_MEMORY_MIB
}
fn default_cpus() -> u8 {
    1
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("kernel {0} does not exist or is not a file")]
    KernelMissing(PathBuf),
    #[error("firmware {0} does not exist or is not a file")]
    FirmwareMissing(PathBuf),
    #[error("nothing to boot: give a kernel or a firmware image")]
    NothingToBoot,
    #[error(
        "booting a kernel through firmware needs QEMU's linuxboot option ROM: \
         --option-rom /usr/share/qemu/linuxboot.bin (Debian's qemu-system-data)"
    )]
    KernelAndFirmware,
    #[error(
        "UEFI variable store {0} does not exist or is not a file, and there is no \
         OVMF_VARS template beside the code to make it from"
    )]
    FirmwareVarsMissing(PathBuf),
    #[error("making the UEFI variable store {0} from its template: {1}")]
    FirmwareVarsCreate(PathBuf, String),
    #[error("option ROM {0} does not exist or is not a file")]
    OptionRomMissing(PathBuf),
    #[error("initrd {0} does not exist or is not a file")]
    InitrdMissing(PathBuf),
    #[error("{0} MiB of memory is too small (at least {MIN_MEMORY_MIB} MiB)")]
    MemoryTooSmall(u64),
    #[error("{want} MiB of memory is more than this host has ({have} MiB)")]
    MemoryTooLarge { want: u64, have: u64 },
    #[error("a VM needs at least one CPU")]
    NoCpus,
    #[error("{0} CPUs is too many (at most {MAX_CPUS})")]
    TooManyCpus(u32),
    #[error("disk image {0} does not exist or is not a file")]
    DiskMissing(PathBuf),
    #[error("{0} virtio devices is too many (at most {MAX_VIRTIO_DEVICES})")]
    TooManyDevices(usize),
    #[error("{0}")]
    BadMac(String),
    #[error("{threads} threads per core with {cpus} CPUs: 1 or 2 threads, and an even CPU count (or 1) with 2")]
    BadThreads { threads: u8, cpus: u8 },
    #[error("MTU {0} is too small (at least {MIN_MTU})")]
    MtuTooSmall(u16),
    #[error("{what} with {queues} queues: 1 to {max}")]
    BadQueues {
        what: &'static str,
        queues: u16,
        max: u16,
    },
    #[error("VM name {0:?} is not a DNS label (letters, digits and inner hyphens, 1 to 63)")]
    BadName(String),
    #[error("cloud-init file {0} does not exist or is not a file")]
    CloudInitFileMissing(PathBuf),
    #[error("UUID {0:?} is not of the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx")]
    BadUuid(String),
    #[error("a balloon of {amount} MiB is larger than the guest's {memory} MiB of memory")]
    BalloonTooLarge { amount: u32, memory: u64 },
}

impl VmConfig {
    /// A config with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            arch: Arch::X86_64,
            kernel: Some(kernel.into()),
            firmware: None,
            option_roms: Vec::new(),
            firmware_vars: None,
            initrd: None,
            cmdline: default_cmdline(),
            memory_mib: DEFAULT_MEMORY_MIB,
            cpus: 1,
            accel: Accel::Auto,
            cpu_model: CpuModel::default(),
            cpuid_modifiers: Vec::new(),
            threads_per_core: 1,
            serial: SerialConfig::Stdio,
            serial_rate_limiter: None,
            disks: Vec::new(),
            rng: false,
            rng_rate_limiter: None,
            virtio_console: None,
            balloon: None,
            nets: Vec::new(),
            vsock: None,
            virtio_transport: Transport::Mmio,
            name: None,
            cloud_init: None,
            uuid: None,
            opened: Vec::new(),
        }
    }

    /// The descriptor this VMM inherited for `path` ([`VmConfig::opened`]), if any.
    pub fn opened_file(&self, path: &Path) -> Option<&OpenedFile> {
        self.opened.iter().find(|o| o.path == path)
    }

    /// A file this configuration names, from the descriptor handed over for it when
    /// there is one, else opened by name. Read it with `read_at` (see [`read_whole`]): a
    /// descriptor's copies share one file offset.
    pub fn open_named(&self, path: &Path) -> std::io::Result<std::fs::File> {
        match self.opened_file(path) {
            Some(o) => dup_inherited(o.fd),
            None => std::fs::File::open(path),
        }
    }

    /// [`VmConfig::open_named`] for reading and writing (the UEFI variable store): the
    /// descriptor handed over must have been opened so; a name is opened so.
    pub fn open_named_writable(&self, path: &Path) -> std::io::Result<std::fs::File> {
        match self.opened_file(path) {
            Some(o) => {
                let f = dup_inherited(o.fd)?;
                // SAFETY: F_GETFL reads the descriptor's flags and touches no memory.
                let flags = unsafe { libc::fcntl(o.fd, libc::F_GETFL) };
                if flags < 0 || flags & libc::O_ACCMODE != libc::O_RDWR {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        "the descriptor handed over for it is not open for writing",
                    ));
                }
                Ok(f)
            }
            None => std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path),
        }
    }

    /// Opens each file this configuration names, once, now, and names the open files in
    /// it ([`DiskConfig::fds`], [`VmConfig::opened`]) as a manager hands its checked
    /// files over: from here on the checks and the build read these files, whatever
    /// is renamed or swapped meanwhile. For a configuration the VMM takes from a state
    /// file with nothing to compare it to (`vessel run --restore` without `--config`).
    /// Files already handed over are kept. Returns the files opened: they must stay
    /// open while the VM runs.
    pub fn hold_files(&mut self) -> Result<Vec<std::fs::File>, String> {
        use std::os::fd::AsRawFd;
        let mut held = Vec::new();
        for d in self.disks.iter_mut().filter(|d| d.fds.is_empty()) {
            let refused = |e: &dyn std::fmt::Display| format!("disk {}: {e}", d.path.display());
            let format = d.format.map(block_format);
            let chain = match d.folder.as_deref() {
                Some(dir) => {
                    let folder = block::Folder::open(dir).map_err(|e| refused(&e))?;
                    block::open_guest_disk_chain_in(&folder, &d.path, format, d.read_only)
                }
                None => block::open_guest_disk_chain(&d.path, format, d.read_only),
            }
            .map_err(|e| refused(&e))?;
            for c in chain {
                d.fds.push(InheritedFile {
                    fd: c.file.as_raw_fd(),
                    format: match c.format {
                        block::Format::Raw => DiskFormat::Raw,
                        block::Format::Qcow2 => DiskFormat::Qcow2,
                    },
                    path: c.path,
                });
                held.push(c.file);
            }
        }
        let template = self
            .firmware
            .as_deref()
            .and_then(uefi_vars_template)
            .filter(|t| t.is_file());
        let read = self
            .kernel
            .iter()
            .chain(&self.initrd)
            .chain(&self.firmware)
            .chain(&self.option_roms)
            .cloned()
            .chain(
                self.cloud_init
                    .iter()
                    .flat_map(|c| c.files().map(Path::to_path_buf)),
            )
            .chain(template)
            .map(|p| (p, false));
        let vars = self
            .firmware_vars
            .clone()
            .filter(|v| v.exists())
            .map(|v| (v, true));
        for (p, write) in read.chain(vars).collect::<Vec<_>>() {
            if self.opened_file(&p).is_some() {
                continue;
            }
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(write)
                .open(&p)
                .map_err(|e| format!("{}: {e}", p.display()))?;
            self.opened.push(OpenedFile {
                fd: f.as_raw_fd(),
                path: p,
            });
            held.push(f);
        }
        Ok(held)
    }

    /// The whole of a file this configuration names ([`VmConfig::open_named`]).
    pub fn read_named(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        read_whole(&self.open_named(path)?)
    }

    /// Whether `path` is a regular file: the one handed over for it, else the name's.
    fn names_a_file(&self, path: &Path) -> bool {
        match self.opened_file(path) {
            Some(o) => dup_inherited(o.fd).is_ok_and(|f| f.metadata().is_ok_and(|m| m.is_file())),
            None => path.is_file(),
        }
    }

    /// The VM's name, or [`DEFAULT_VM_NAME`].
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(DEFAULT_VM_NAME)
    }

    /// How many virtio devices this VM has.
    pub fn virtio_device_count(&self) -> usize {
        self.disks.len()
            + usize::from(self.cloud_init.is_some())
            + self.nets.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.rng)
            + usize::from(self.virtio_console.is_some())
            + usize::from(self.balloon.is_some())
    }

    /// Makes the UEFI variable store from the template beside the code when it does
    /// not exist yet, as libvirt does with its nvram template. Nothing to do without
    /// one, or when it exists.
    pub fn prepare_firmware_vars(&self) -> Result<(), ConfigError> {
        let (Some(code), Some(vars)) = (&self.firmware, &self.firmware_vars) else {
            return Ok(());
        };
        // Handed over open (made by the manager if need be): the name is not looked at.
        if vars.exists() || self.opened_file(vars).is_some() {
            return Ok(());
        }
        let template = uefi_vars_template(code)
            .filter(|t| t.is_file())
            .ok_or_else(|| ConfigError::FirmwareVarsMissing(vars.clone()))?;
        std::fs::copy(&template, vars)
            .map(|_| ())
            .map_err(|e| ConfigError::FirmwareVarsCreate(vars.clone(), e.to_string()))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        match (&self.kernel, &self.firmware) {
            (None, None) => return Err(ConfigError::NothingToBoot),
            (Some(_), Some(_)) if !self.has_linuxboot_rom() => {
                return Err(ConfigError::KernelAndFirmware)
            }
            (Some(k), None) if !self.names_a_file(k) => {
                return Err(ConfigError::KernelMissing(k.clone()))
            }
            (None, Some(f)) if !self.names_a_file(f) => {
                return Err(ConfigError::FirmwareMissing(f.clone()))
            }
            _ => {}
        }
        if let Some(v) = self
            .firmware_vars
            .as_ref()
            .filter(|v| !self.names_a_file(v))
        {
            // One not made yet is made from the template on the first start.
            let can_make = !v.exists()
                && self
                    .firmware
                    .as_deref()
                    .and_then(uefi_vars_template)
                    .is_some_and(|t| t.is_file());
            if !can_make {
                return Err(ConfigError::FirmwareVarsMissing(v.clone()));
            }
        }
        if let Some(r) = self.option_roms.iter().find(|r| !self.names_a_file(r)) {
            return Err(ConfigError::OptionRomMissing(r.clone()));
        }
        if let Some(i) = &self.initrd {
            if !self.names_a_file(i) {
                return Err(ConfigError::InitrdMissing(i.clone()));
            }
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(self.memory_mib));
        }
        if let Some(have) = host_memory_mib() {
            if self.memory_mib > have {
                return Err(ConfigError::MemoryTooLarge {
                    want: self.memory_mib,
                    have,
                });
            }
        }
        if self.cpus == 0 {
            return Err(ConfigError::NoCpus);
        }
        if self.cpus > MAX_CPUS {
            return Err(ConfigError::TooManyCpus(self.cpus.into()));
        }
        if !(1..=2).contains(&self.threads_per_core)
            || (self.threads_per_core == 2 && self.cpus > 1 && self.cpus % 2 == 1)
        {
            return Err(ConfigError::BadThreads {
                threads: self.threads_per_core,
                cpus: self.cpus,
            });
        }
        // A disk handed over open has no name to reach (a jailed VMM sees none).
        if let Some(d) = self
            .disks
            .iter()
            .find(|d| d.fds.is_empty() && !d.path.is_file())
        {
            return Err(ConfigError::DiskMissing(d.path.clone()));
        }
        if let Some(n) = self
            .name
            .as_ref()
            .filter(|n| !crate::cloud_init::valid_hostname(n))
        {
            return Err(ConfigError::BadName(n.clone()));
        }
        if let Some(u) = self
            .uuid
            .as_ref()
            .filter(|u| arch::smbios::parse_uuid(u).is_none())
        {
            return Err(ConfigError::BadUuid(u.clone()));
        }
        if let Some(f) = self
            .cloud_init
            .iter()
            .flat_map(|c| c.files())
            .find(|f| !self.names_a_file(f))
        {
            return Err(ConfigError::CloudInitFileMissing(f.into()));
        }
        if let Some(b) = self
            .balloon
            .as_ref()
            .filter(|b| u64::from(b.amount_mib) > self.memory_mib)
        {
            return Err(ConfigError::BalloonTooLarge {
                amount: b.amount_mib,
                memory: self.memory_mib,
            });
        }
        if let Some(Err(e)) = self
            .nets
            .iter()
            .filter_map(|n| n.mac_bytes())
            .find(|m| m.is_err())
        {
            return Err(ConfigError::BadMac(e));
        }
        if let Some(m) = self
            .nets
            .iter()
            .filter_map(|n| n.mtu)
            .find(|&m| m < MIN_MTU)
        {
            return Err(ConfigError::MtuTooSmall(m));
        }
        let queue_counts = self
            .disks
            .iter()
            .map(|d| ("a disk", d.queues, virtio::blk::MAX_QUEUES))
            .chain(
                self.nets
                    .iter()
                    .map(|n| ("an interface", n.queues, virtio::net::MAX_QUEUE_PAIRS)),
            );
        for (what, queues, max) in queue_counts {
            if let Some(q) = queues.filter(|&q| q == 0 || q > max) {
                return Err(ConfigError::BadQueues {
                    what,
                    queues: q,
                    max,
                });
            }
        }
        if self.virtio_device_count() > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(self.virtio_device_count()));
        }
        Ok(())
    }

    /// Whether one of the option ROMs is QEMU's Linux loader (`linuxboot*.bin`).
    pub fn has_linuxboot_rom(&self) -> bool {
        self.option_roms.iter().any(|r| {
            r.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("linuxboot"))
        })
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
}

fn host_memory_mib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024)
}

/// Parse sizes like `512M`, `2G`, `1048576K` or plain MiB (`512`) into MiB.
pub fn parse_memory_mib(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 0,
                'M' => 1,
                'G' => 1024,
                'T' => 1024 * 1024,
                _ => return Err(format!("bad size suffix in {s:?} (K, M, G or T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad memory size {s:?} (e.g. 512M or 2G)"))?;
    if mult == 0 {
        return Ok(n / 1024);
    }
    n.checked_mul(mult)
        .ok_or_else(|| format!("memory size {s:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_uefi_variable_store_is_made_from_the_template_beside_the_code() {
        assert_eq!(
            uefi_vars_template(std::path::Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd")),
            Some(PathBuf::from("/usr/share/OVMF/OVMF_VARS_4M.fd"))
        );
        assert_eq!(
            uefi_vars_template(std::path::Path::new("/x/bios.bin")),
            None
        );
        let d = std::env::temp_dir().join(format!("vessel-vars-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("OVMF_CODE.fd"), b"code").unwrap();
        std::fs::write(d.join("OVMF_VARS.fd"), b"template").unwrap();
        let mut c = VmConfig::new("/nonexistent/vmlinuz");
        c.kernel = None;
        c.firmware = Some(d.join("OVMF_CODE.fd"));
        c.firmware_vars = Some(d.join("mine.fd"));
        // A store not made yet is valid while its template is there.
        assert_eq!(c.validate(), Ok(()));
        c.prepare_firmware_vars().unwrap();
        assert_eq!(std::fs::read(d.join("mine.fd")).unwrap(), b"template");
        // An existing store is kept as it is.
        std::fs::write(d.join("mine.fd"), b"written").unwrap();
        c.prepare_firmware_vars().unwrap();
        assert_eq!(std::fs::read(d.join("mine.fd")).unwrap(), b"written");
        // No template: an error naming the store.
        std::fs::write(d.join("custom.fd"), b"code").unwrap();
        c.firmware = Some(d.join("custom.fd"));
        c.firmware_vars = Some(d.join("other.fd"));
        let e = c.prepare_firmware_vars().unwrap_err();
        assert!(e.to_string().contains("other.fd"), "{e}");
        assert_eq!(
            c.validate(),
            Err(ConfigError::FirmwareVarsMissing(d.join("other.fd")))
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_memory_mib("512M"), Ok(512));
        assert_eq!(parse_memory_mib("2G"), Ok(2048));
        assert_eq!(parse_memory_mib("256"), Ok(256));
        assert_eq!(parse_memory_mib("65536k"), Ok(64));
        assert!(parse_memory_mib("lots").is_err());
        assert!(parse_memory_mib("5X").is_err());
        assert!(parse_memory_mib("99999999999999999999G").is_err());
    }

    #[test]
    fn a_disk_has_a_boot_sector_only_with_the_bios_signature() {
        let dir = std::env::temp_dir().join(format!("vessel-bootsig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut mbr = vec![0u8; 4096];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        let bootable = dir.join("mbr.raw");
        std::fs::write(&bootable, &mbr).unwrap();
        let plain = dir.join("plain.raw");
        std::fs::write(&plain, vec![0u8; 4096]).unwrap();
        let disk = |path: &std::path::Path| DiskConfig {
            path: path.into(),
            format: Some(DiskFormat::Raw),
            read_only: false,
            folder: None,
            fds: Vec::new(),
            transport: None,
            rate_limiter: None,
            queues: None,
        };
        assert!(disk(&bootable).has_boot_sector());
        assert!(!disk(&plain).has_boot_sector());
        assert!(!disk(&dir.join("absent")).has_boot_sector());
        // No boot code, a GPT behind the protective MBR: a UEFI-only image. With code
        // (GRUB's boot.img, as the cloud image has) the BIOS boots it.
        assert_eq!(disk(&bootable).firmware_boot(), Some(FirmwareBoot::Bios));
        mbr[512..520].copy_from_slice(b"EFI PART");
        let gpt = dir.join("gpt.raw");
        std::fs::write(&gpt, &mbr).unwrap();
        assert_eq!(disk(&gpt).firmware_boot(), Some(FirmwareBoot::Uefi));
        mbr[0] = 0xeb;
        std::fs::write(&gpt, &mbr).unwrap();
        assert_eq!(disk(&gpt).firmware_boot(), Some(FirmwareBoot::Bios));
        assert_eq!(disk(&plain).firmware_boot(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Issue 22: a disk with a folder opens its image and chain beneath it only; the jail
    /// is given only the files of that confined chain.
    #[test]
    fn a_disk_with_a_folder_never_opens_a_backing_file_outside_it() {
        use block::BlockBackend as _;
        let dir = std::env::temp_dir().join(format!("vessel-folder-{}", std::process::id()));
        let pool = dir.join("pool");
        std::fs::create_dir_all(&pool).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, b"outside the pool").unwrap();
        let top = pool.join("top.qcow2");
        let name = secret.to_str().unwrap();
        block::create(
            &top,
            block::Format::Qcow2,
            Some(1 << 20),
            Some((name, Some(block::Format::Raw))),
        )
        .unwrap();
        let mut disk = DiskConfig {
            path: top.clone(),
            format: Some(DiskFormat::Qcow2),
            read_only: true,
            folder: None,
            fds: Vec::new(),
            transport: None,
            rate_limiter: None,
            queues: None,
        };
        let mut b = [0u8; 7];
        disk.open().unwrap().read_at(0, &mut b).unwrap();
        assert_eq!(&b, b"outside", "without a folder the header is followed");
        assert_eq!(disk.files(), vec![top.clone(), secret.clone()]);
        disk.folder = Some(pool.clone());
        let e = disk.open().unwrap_err().to_string();
        assert!(e.contains("backing file"), "{e}");
        assert_eq!(disk.files(), vec![top.clone()]);
        assert!(!disk.has_boot_sector());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn validation_rejects_bad_configs() {
        let exe = std::env::current_exe().unwrap();
        let ok = VmConfig::new(&exe);
        assert_eq!(ok.validate(), Ok(()));
        let bad = [
            (
                VmConfig::new("/nonexistent/vmlinuz"),
                ConfigError::KernelMissing("/nonexistent/vmlinuz".into()),
            ),
            (
                VmConfig {
                    memory_mib: 1,
                    ..ok.clone()
                },
                ConfigError::MemoryTooSmall(1),
            ),
            (
                VmConfig {
                    cpus: 0,
                    ..ok.clone()
                },
                ConfigError::NoCpus,
            ),
            (
                VmConfig {
                    cpus: 255,
                    ..ok.clone()
                },
                ConfigError::TooManyCpus(255),
            ),
            (
                VmConfig {
                    name: Some("a:b".into()),
                    ..ok.clone()
                },
                ConfigError::BadName("a:b".into()),
            ),
            (
                VmConfig {
                    cloud_init: Some(crate::cloud_init::CloudInitConfig {
                        user_data: exe.clone(),
                        meta_data: Some("/nonexistent/meta".into()),
                        network_config: None,
                    }),
                    ..ok.clone()
                },
                ConfigError::CloudInitFileMissing("/nonexistent/meta".into()),
            ),
        ];
        for (cfg, want) in bad {
            assert_eq!(cfg.validate(), Err(want));
        }
        let no_boot = VmConfig {
            kernel: None,
            ..ok.clone()
        };
        assert_eq!(no_boot.validate(), Err(ConfigError::NothingToBoot));
        let both = VmConfig {
            firmware: Some(exe.clone()),
            ..ok.clone()
        };
        assert_eq!(both.validate(), Err(ConfigError::KernelAndFirmware));
        let bios = VmConfig {
            firmware: Some(exe.clone()),
            ..no_boot.clone()
        };
        assert_eq!(bios.validate(), Ok(()));
        let missing = VmConfig {
            firmware: Some("/nonexistent/bios.bin".into()),
            ..no_boot
        };
        assert_eq!(
            missing.validate(),
            Err(ConfigError::FirmwareMissing("/nonexistent/bios.bin".into()))
        );
        let huge = VmConfig {
            memory_mib: 1 << 40,
            ..ok
        };
        assert!(matches!(
            huge.validate(),
            Err(ConfigError::MemoryTooLarge { .. })
        ));
    }

    #[test]
    fn serde_round_trip_and_defaults() {
        let c: VmConfig = serde_json::from_str(r#"{"kernel":"/k"}"#).unwrap();
        assert_eq!(c, VmConfig::new("/k"));
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<VmConfig>(&s).unwrap(), c);
        assert!(serde_json::from_str::<VmConfig>(r#"{"kernel":"/k","bogus":1}"#).is_err());
        assert_eq!(
            "file:/tmp/x".parse(),
            Ok(SerialConfig::File("/tmp/x".into()))
        );
        assert!("file:".parse::<SerialConfig>().is_err());
    }

    #[test]
    fn disk_flags_parse() {
        let d: DiskConfig = "/img/a.qcow2,format=qcow2,readonly".parse().unwrap();
        assert_eq!(
            d,
            DiskConfig {
                path: "/img/a.qcow2".into(),
                format: Some(DiskFormat::Qcow2),
                read_only: true,
                folder: None,
                fds: Vec::new(),
                transport: None,
                rate_limiter: None,
                queues: None,
            }
        );
        let pci: DiskConfig = "/x,transport=pci".parse().unwrap();
        assert_eq!(pci.transport, Some(Transport::Pci));
        assert!("/x,transport=isa".parse::<DiskConfig>().is_err());
        let n: NetConfig = "tap=t0,transport=mmio".parse().unwrap();
        assert_eq!(n.transport, Some(Transport::Mmio));
        // Multi-queue, as QEMU's num-queues and queues.
        let d: DiskConfig = "/x,queues=4".parse().unwrap();
        assert_eq!(d.queues, Some(4));
        let n: NetConfig = "tap=t0,queues=2".parse().unwrap();
        assert_eq!(n.queues, Some(2));
        assert!("/x,queues=0".parse::<DiskConfig>().is_err());
        assert!("tap=t0,queues=two".parse::<NetConfig>().is_err());
        // Files that exist, so only the queue count is wrong.
        let exe = std::env::current_exe().unwrap();
        let mut vm = VmConfig::new(&exe);
        vm.disks.push(DiskConfig {
            path: exe.clone(),
            queues: Some(virtio::blk::MAX_QUEUES),
            ..d
        });
        assert!(vm.validate().is_ok(), "{:?}", vm.validate());
        vm.disks[0].queues = Some(virtio::blk::MAX_QUEUES + 1);
        assert!(matches!(vm.validate(), Err(ConfigError::BadQueues { .. })));
        // Absent transports stay out of the JSON, so existing definitions round-trip.
        let json = serde_json::to_string(&"/x".parse::<DiskConfig>().unwrap()).unwrap();
        assert!(!json.contains("transport"), "{json}");
        assert_eq!("/x".parse::<DiskConfig>().unwrap().format, None);
        assert!("/x,format=vmdk".parse::<DiskConfig>().is_err());
        assert!("".parse::<DiskConfig>().is_err());
    }

    #[test]
    fn vsock_flags_parse() {
        let v: VsockConfig = "cid=3,uds=/tmp/v.sock".parse().unwrap();
        assert_eq!(v.guest_cid, 3);
        assert!("cid=2,uds=/x".parse::<VsockConfig>().is_err());
        assert!("cid=3".parse::<VsockConfig>().is_err());
        assert!("uds=/x".parse::<VsockConfig>().is_err());
    }

    #[test]
    fn net_flags_parse() {
        let n: NetConfig = "tap=vtap0,mac=52:54:00:aa:bb:cc".parse().unwrap();
        assert_eq!(n.tap, "vtap0");
        assert_eq!(n.mac_bytes(), Some(Ok([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc])));
        assert!("tap=x,mac=01:00:00:00:00:00".parse::<NetConfig>().is_err());
        assert!("mac=52:54:00:aa:bb:cc".parse::<NetConfig>().is_err());
        assert!("tap=x,mac=zz".parse::<NetConfig>().is_err());
    }

    /// Issue 22: a restore or an incoming migration takes the descriptors and folders
    /// of the manager's `--config` for the same VM; another VM is refused, and numbers a
    /// state file names itself are dropped.
    #[test]
    fn a_saved_vm_adopts_the_files_of_its_expected_config_only() {
        let mut saved: VmConfig = serde_json::from_value(serde_json::json!({
            "kernel": "/k", "initrd": "/i", "serial": {"type": "null"},
            "disks": [{"path": "/d.qcow2", "format": "qcow2",
                       "fds": [{"fd": 40, "format": "raw", "path": "/etc/shadow"}]}],
            "opened": [{"fd": 41, "path": "/k"}]}))
        .unwrap();
        let mut plain = saved.clone();
        plain.adopt_files(None).unwrap();
        assert!(plain.disks[0].fds.is_empty() && plain.opened.is_empty());
        let mut want = saved.as_defined();
        want.serial = SerialConfig::Stdio;
        want.disks[0].fds = vec![InheritedFile {
            fd: 7,
            format: DiskFormat::Qcow2,
            path: "/d.qcow2".into(),
        }];
        want.disks[0].folder = Some("/pool".into());
        want.opened = vec![OpenedFile {
            fd: 8,
            path: "/k".into(),
        }];
        saved.adopt_files(Some(&want)).unwrap();
        assert_eq!(saved.disks[0].fds, want.disks[0].fds);
        assert_eq!(saved.disks[0].folder, want.disks[0].folder);
        assert_eq!(saved.opened, want.opened);
        let mut other = want.clone();
        other.memory_mib += 1;
        let e = saved.clone().adopt_files(Some(&other)).unwrap_err();
        assert!(e.contains("--config"), "{e}");
    }

    /// Issue 22: a configuration taken from a state file with nothing to compare it to
    /// has its files opened once (`hold_files`): what is read afterwards is those files,
    /// whatever is renamed in under their names; the held files are handed on as a
    /// manager's are.
    #[test]
    fn held_files_are_read_whatever_is_renamed_in_afterwards() {
        let dir = std::env::temp_dir().join(format!("vessel-hold-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (k, d) = (dir.join("k"), dir.join("d.raw"));
        std::fs::write(&k, b"HELD KERNEL").unwrap();
        std::fs::write(&d, vec![b'h'; 4096]).unwrap();
        let mut c: VmConfig = serde_json::from_value(serde_json::json!({
            "kernel": k, "disks": [{"path": d, "format": "raw"}]}))
        .unwrap();
        let held = c.hold_files().unwrap();
        assert_eq!(held.len(), 2);
        assert_eq!(c.disks[0].fds.len(), 1);
        assert_eq!(c.opened.len(), 1);
        for p in [&k, &d] {
            std::fs::rename(p, dir.join("away")).unwrap();
            std::fs::write(p, b"SWAPPED").unwrap();
        }
        assert_eq!(c.read_named(&k).unwrap(), b"HELD KERNEL");
        let mut b = [0u8; 4];
        c.disks[0].open().unwrap().read_at(0, &mut b).unwrap();
        assert_eq!(&b, b"hhhh");
        // Holding again keeps what is held.
        assert!(c.hold_files().unwrap().is_empty());
        drop(held);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
