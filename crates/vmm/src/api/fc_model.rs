//! Firecracker's request bodies and configuration records, with the names, defaults and
//! enums of its swagger (`firecracker.yaml`), and the checks Firecracker makes on them
//! before a request reaches the VM: resource ID syntax, token buckets, unique MACs and TAPs.
//!
//! `FcConfig` is what the API has been told, kept as given (IDs, order, `null`s), so
//! `GET /vm/config` answers in Firecracker's shape before and after boot; `to_vm_config`
//! turns it into the one `VmConfig` the VMM boots, or refuses naming the field it cannot
//! honour.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Value};

use crate::config::{DiskConfig, DiskFormat, NetConfig, SerialConfig, VmConfig, VsockConfig};

/// Firecracker's limit on vCPUs (`MAX_SUPPORTED_VCPUS`).
pub const MAX_VCPUS: u8 = 32;
/// Firecracker's default machine: 1 vCPU, 128 MiB.
pub const DEFAULT_MEM_MIB: u64 = 128;

/// Firecracker's resource ID rule (`checked_id`): not empty, alphanumeric or `_`.
pub fn check_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        return Err("The ID cannot be empty.");
    }
    if !id.chars().all(|c| c == '_' || c.is_alphanumeric()) {
        return Err("API Resource IDs can only contain alphanumeric characters and underscores.");
    }
    Ok(())
}

/// A Linux interface name: 1 to 15 bytes (IFNAMSIZ - 1), no '/', ':' or whitespace.
fn tap_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// A MAC address as Firecracker parses it: six two-digit hex bytes separated by ':'.
/// (Whether the guest can use it, e.g. not multicast, is `VmConfig::validate`'s
/// question, asked at InstanceStart, as Firecracker accepts any address when it is put.)
fn mac_bytes(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next().filter(|p| p.len() == 2)?;
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// A static CPU template (deprecated in Firecracker, still accepted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CpuTemplate {
    C3,
    T2,
    T2S,
    T2CL,
    T2A,
    V1N1,
    #[default]
    None,
}

/// How guest memory is backed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    #[default]
    None,
    Transparent,
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// `PUT /machine-config` body, and the machine part of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: u64,
    #[serde(default)]
    pub smt: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub huge_pages: HugePages,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: DEFAULT_MEM_MIB,
            smt: false,
            cpu_template: None,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
        }
    }
}

/// `PATCH /machine-config` body: only the fields given change.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    pub vcpu_count: Option<u8>,
    pub mem_size_mib: Option<u64>,
    pub smt: Option<bool>,
    pub cpu_template: Option<CpuTemplate>,
    pub track_dirty_pages: Option<bool>,
    pub huge_pages: Option<HugePages>,
}

impl MachineConfigUpdate {
    pub fn is_empty(&self) -> bool {
        self.vcpu_count.is_none()
            && self.mem_size_mib.is_none()
            && self.smt.is_none()
            && self.cpu_template.is_none()
            && self.track_dirty_pages.is_none()
            && self.huge_pages.is_none()
    }
}

impl MachineConfig {
    /// Firecracker's `MachineConfig::update`: the result of applying `u`, checked.
    pub fn updated(&self, u: &MachineConfigUpdate) -> Result<MachineConfig, String> {
        let m = MachineConfig {
            vcpu_count: u.vcpu_count.unwrap_or(self.vcpu_count),
            mem_size_mib: u.mem_size_mib.unwrap_or(self.mem_size_mib),
            smt: u.smt.unwrap_or(self.smt),
            cpu_template: u.cpu_template.or(self.cpu_template),
            track_dirty_pages: u.track_dirty_pages.unwrap_or(self.track_dirty_pages),
            huge_pages: u.huge_pages.unwrap_or(self.huge_pages),
        };
        if m.vcpu_count == 0
            || m.vcpu_count > MAX_VCPUS
            || (m.smt && m.vcpu_count > 1 && !m.vcpu_count.is_multiple_of(2))
        {
            return Err(format!(
                "The number of vCPUs must be greater than 0, less than {MAX_VCPUS} and must be 1 \
                 or an even number if SMT is enabled."
            ));
        }
        let page_mib = if m.huge_pages == HugePages::Hugetlbfs2M {
            2
        } else {
            1
        };
        if m.mem_size_mib == 0 || !m.mem_size_mib.is_multiple_of(page_mib) {
            return Err(
                "The memory size (MiB) is either 0, or not a multiple of the configured \
                        page size."
                    .into(),
            );
        }
        Ok(m)
    }
}

/// `PUT /boot-source` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: String,
    #[serde(default)]
    pub initrd_path: Option<String>,
    #[serde(default)]
    pub boot_args: Option<String>,
}

/// Firecracker's `TokenBucket` and `RateLimiter`: the same records `VmConfig` keeps.
pub use crate::config::{RateLimiterConfig as RateLimiter, TokenBucketConfig as TokenBucket};

/// Block cache policy. Vessel's virtio-blk always offers FLUSH and honours it, which is
/// `Writeback`; `Unsafe` (flushes ignored) is accepted and served the safe way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    #[default]
    Unsafe,
    Writeback,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    #[default]
    Sync,
    Async,
}

/// `PUT /drives/{drive_id}` body.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    #[serde(default)]
    pub partuuid: Option<String>,
    pub is_root_device: bool,
    #[serde(default)]
    pub cache_type: CacheType,
    #[serde(default)]
    pub is_read_only: Option<bool>,
    #[serde(default)]
    pub path_on_host: Option<String>,
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
    #[serde(default)]
    pub io_engine: Option<IoEngine>,
    #[serde(default)]
    pub socket: Option<String>,
}

impl Drive {
    /// The record `GET /vm/config` shows (defaults filled in as Firecracker does).
    fn shown(&self) -> Value {
        json!({
            "drive_id": self.drive_id,
            "partuuid": self.partuuid,
            "is_root_device": self.is_root_device,
            "cache_type": self.cache_type,
            "is_read_only": self.is_read_only.unwrap_or(false),
            "path_on_host": self.path_on_host,
            "rate_limiter": self.rate_limiter,
            "io_engine": self.io_engine.unwrap_or_default(),
            "socket": self.socket,
        })
    }
}

/// `PATCH /drives/{drive_id}` body.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    pub drive_id: String,
    #[serde(default)]
    pub path_on_host: Option<String>,
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /network-interfaces/{iface_id}` body.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default)]
    pub guest_mac: Option<String>,
    #[serde(default)]
    pub mtu: Option<u16>,
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PATCH /network-interfaces/{iface_id}` body.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceUpdate {
    pub iface_id: String,
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PUT /vsock` body. `vsock_id` is deprecated: accepted, answered with a Deprecation
/// header, not kept.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    #[serde(default, skip_serializing)]
    pub vsock_id: Option<String>,
    pub guest_cid: u32,
    pub uds_path: String,
}

/// `PUT /entropy` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Entropy {
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /serial` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Serial {
    #[serde(default)]
    pub serial_out_path: Option<PathBuf>,
    #[serde(default)]
    pub rate_limiter: Option<TokenBucket>,
}

/// Log levels, matched without regard to case as Firecracker does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum LogLevel {
    Off,
    Error,
    Warning,
    Info,
    Debug,
    Trace,
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.to_ascii_lowercase().as_str() {
            "off" => LogLevel::Off,
            "error" => LogLevel::Error,
            "warning" | "warn" => LogLevel::Warning,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            _ => {
                return Err(serde::de::Error::unknown_variant(
                    &s,
                    &["Off", "Error", "Warning", "Info", "Debug", "Trace"],
                ))
            }
        })
    }
}

/// `PUT /logger` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    #[serde(default)]
    pub level: Option<LogLevel>,
    #[serde(default)]
    pub log_path: Option<PathBuf>,
    #[serde(default)]
    pub show_level: Option<bool>,
    #[serde(default)]
    pub show_log_origin: Option<bool>,
    #[serde(default)]
    pub module: Option<String>,
}

/// `PUT /metrics` body.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub metrics_path: PathBuf,
    #[serde(default)]
    pub emit_id: bool,
    #[serde(default)]
    pub properties: Option<BTreeMap<String, String>>,
}

/// One CPUID register modifier of a custom CPU template.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidRegisterModifier {
    pub register: CpuidRegister,
    pub bitmap: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuidRegister {
    Eax = 0,
    Ebx = 1,
    Ecx = 2,
    Edx = 3,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidLeafModifier {
    pub leaf: String,
    pub subleaf: String,
    pub flags: i32,
    pub modifiers: Vec<CpuidRegisterModifier>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MsrModifier {
    pub addr: String,
    pub bitmap: String,
}

/// `PUT /cpu-config` body: a custom CPU template. aarch64's `reg_modifiers` and
/// `vcpu_features` are refused on this x86-64 VMM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CpuConfig {
    #[serde(default)]
    pub kvm_capabilities: Vec<String>,
    #[serde(default)]
    pub cpuid_modifiers: Vec<CpuidLeafModifier>,
    #[serde(default)]
    pub msr_modifiers: Vec<MsrModifier>,
    #[serde(default)]
    pub reg_modifiers: Vec<Value>,
    #[serde(default)]
    pub vcpu_features: Vec<Value>,
}

/// A number as Firecracker's templates write it: `0x…`, `0b…` or decimal.
fn parse_number(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(&h.replace('_', ""), 16).ok()
    } else if let Some(b) = s.strip_prefix("0b") {
        u64::from_str_radix(&b.replace('_', ""), 2).ok()
    } else {
        s.parse().ok()
    }
}

/// A bitmap `0b` + `bits` characters of `0`, `1`, `x` (underscores ignored).
fn check_bitmap(s: &str, bits: usize) -> Result<(), String> {
    let body: String = s
        .strip_prefix("0b")
        .ok_or_else(|| format!("bitmap {s:?} does not start with 0b"))?
        .chars()
        .filter(|&c| c != '_')
        .collect();
    if body.len() != bits || !body.chars().all(|c| matches!(c, '0' | '1' | 'x')) {
        return Err(format!(
            "bitmap {s:?} is not {bits} characters of 0, 1 or x"
        ));
    }
    Ok(())
}

impl CpuConfig {
    /// The template's syntax, as Firecracker checks it when it is put.
    pub fn check(&self) -> Result<(), String> {
        for l in &self.cpuid_modifiers {
            for (what, v) in [("leaf", &l.leaf), ("subleaf", &l.subleaf)] {
                if parse_number(v).is_none_or(|n| n > u64::from(u32::MAX)) {
                    return Err(format!("CPUID {what} {v:?} is not a 32-bit number"));
                }
            }
            for m in &l.modifiers {
                check_bitmap(&m.bitmap, 32)?;
            }
        }
        for m in &self.msr_modifiers {
            if parse_number(&m.addr).is_none_or(|n| n > u64::from(u32::MAX)) {
                return Err(format!("MSR address {:?} is not a 32-bit number", m.addr));
            }
            check_bitmap(&m.bitmap, 64)?;
        }
        for c in &self.kvm_capabilities {
            if c.trim_start_matches('!').parse::<u32>().is_err() {
                return Err(format!("KVM capability {c:?} is not a number"));
            }
        }
        Ok(())
    }

    /// The CPUID modifiers as `VmConfig` applies them, or what in the template this VMM
    /// cannot apply (MSR modifiers, KVM capabilities, aarch64's registers and features).
    pub fn cpuid_modifiers(&self) -> Result<Vec<arch::cpuid::CpuidModifier>, String> {
        let refuse = |what: &str| {
            Err(format!(
                "cpu-config {what}: not applied by this VMM (only cpuid_modifiers are)"
            ))
        };
        if !self.msr_modifiers.is_empty() {
            return refuse("msr_modifiers");
        }
        if !self.kvm_capabilities.is_empty() {
            return refuse("kvm_capabilities");
        }
        if !self.reg_modifiers.is_empty() || !self.vcpu_features.is_empty() {
            return refuse("reg_modifiers/vcpu_features (aarch64)");
        }
        let mut out = Vec::new();
        for l in &self.cpuid_modifiers {
            let number = |v: &str| {
                parse_number(v)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| format!("CPUID {v:?} is not a 32-bit number"))
            };
            let (leaf, subleaf) = (number(&l.leaf)?, number(&l.subleaf)?);
            for m in &l.modifiers {
                let bits: Vec<char> = m
                    .bitmap
                    .trim_start_matches("0b")
                    .chars()
                    .filter(|&c| c != '_')
                    .collect();
                let (mut set, mut clear) = (0u32, 0u32);
                // Most significant bit first.
                for (i, c) in bits.iter().rev().enumerate().take(32) {
                    match c {
                        '1' => set |= 1 << i,
                        '0' => clear |= 1 << i,
                        _ => {}
                    }
                }
                out.push(arch::cpuid::CpuidModifier {
                    leaf,
                    subleaf,
                    register: m.register as u8,
                    set,
                    clear,
                });
            }
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.kvm_capabilities.is_empty()
            && self.cpuid_modifiers.is_empty()
            && self.msr_modifiers.is_empty()
            && self.reg_modifiers.is_empty()
            && self.vcpu_features.is_empty()
    }
}

/// Everything the API has been told, kept as given.
#[derive(Debug, Clone, Default)]
pub struct FcConfig {
    pub machine: MachineConfig,
    pub boot: Option<BootSource>,
    pub cpu_config: Option<CpuConfig>,
    /// In the order they were first put (a later PUT with the same ID replaces in place).
    pub drives: Vec<Drive>,
    pub nets: Vec<NetworkInterface>,
    pub vsock: Option<Vsock>,
    pub entropy: Option<Entropy>,
    pub serial: Option<Serial>,
    pub logger: Option<Logger>,
    pub metrics: Option<Metrics>,
}

/// Why a configuration cannot boot on this VMM, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unsupported(pub String);

impl FcConfig {
    /// What the API shows for a VM started from command-line flags or a `VmConfig`.
    /// Devices get the IDs Firecracker's config file would need (`drive0`, `eth0`, …).
    pub fn from_vm_config(c: &VmConfig) -> FcConfig {
        let root = c.cmdline.split_whitespace().any(|w| w == "root=/dev/vda");
        FcConfig {
            machine: MachineConfig {
                vcpu_count: c.cpus,
                mem_size_mib: c.memory_mib,
                smt: c.threads_per_core == 2,
                ..MachineConfig::default()
            },
            boot: c.kernel.as_ref().map(|k| BootSource {
                kernel_image_path: k.display().to_string(),
                initrd_path: c.initrd.as_ref().map(|i| i.display().to_string()),
                boot_args: Some(c.cmdline.clone()),
            }),
            drives: c
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| Drive {
                    drive_id: format!("drive{i}"),
                    partuuid: None,
                    is_root_device: i == 0 && root,
                    cache_type: CacheType::Writeback,
                    is_read_only: Some(d.read_only),
                    path_on_host: Some(d.path.display().to_string()),
                    rate_limiter: d.rate_limiter,
                    io_engine: Some(IoEngine::Sync),
                    socket: None,
                })
                .collect(),
            nets: c
                .nets
                .iter()
                .enumerate()
                .map(|(i, n)| NetworkInterface {
                    iface_id: format!("eth{i}"),
                    host_dev_name: n.tap.clone(),
                    guest_mac: n.mac.clone(),
                    mtu: n.mtu,
                    rx_rate_limiter: n.rx_rate_limiter,
                    tx_rate_limiter: n.tx_rate_limiter,
                })
                .collect(),
            vsock: c.vsock.as_ref().map(|v| Vsock {
                vsock_id: None,
                guest_cid: u32::try_from(v.guest_cid).unwrap_or(u32::MAX),
                uds_path: v.uds_path.display().to_string(),
            }),
            entropy: c.rng.then(Entropy::default),
            ..FcConfig::default()
        }
    }

    /// `GET /vm/config`: Firecracker's `FullVmConfiguration`. As Firecracker, the logger,
    /// metrics and CPU template are not echoed (`null`), and devices this VMM does not
    /// have (balloon, MMDS, pmem, memory hot-plug) are absent (`null`, `[]`).
    pub fn full(&self) -> Value {
        json!({
            "balloon": null,
            "drives": self.drives.iter().map(Drive::shown).collect::<Vec<_>>(),
            "boot-source": self.boot.clone().unwrap_or_default(),
            "cpu-config": null,
            "logger": null,
            "machine-config": self.machine,
            "metrics": null,
            "memory-hotplug": null,
            "mmds-config": null,
            "network-interfaces": self.nets,
            "pmem": [],
            "vsock": self.vsock,
            "entropy": self.entropy,
        })
    }

    /// The drive with this ID, if any.
    pub fn drive(&self, id: &str) -> Option<&Drive> {
        self.drives.iter().find(|d| d.drive_id == id)
    }

    /// The drives in the order the guest sees them (vda, vdb, …): the list's order, which
    /// [`FcConfig::insert_drive`] keeps with the root drive first.
    fn boot_order(&self) -> Vec<&Drive> {
        self.drives
            .iter()
            .filter(|d| d.path_on_host.is_some())
            .collect()
    }

    /// Where drive `id` is in `VmConfig::disks`.
    pub fn disk_index(&self, id: &str) -> Option<usize> {
        self.boot_order().iter().position(|d| d.drive_id == id)
    }

    /// Puts a drive as Firecracker's block builder does: a new root drive goes first (it
    /// is vda), another new one last; a drive put again keeps its place, and moves first
    /// when it becomes the root.
    pub fn insert_drive(&mut self, d: Drive) -> Result<(), String> {
        self.check_drive(&d)?;
        match self.drives.iter().position(|x| x.drive_id == d.drive_id) {
            None if d.is_root_device => self.drives.insert(0, d),
            None => self.drives.push(d),
            Some(i) => {
                let root = d.is_root_device;
                self.drives[i] = d;
                if root {
                    self.drives.swap(0, i);
                }
            }
        }
        Ok(())
    }

    /// Puts an interface as Firecracker's net builder does: a MAC in use by another
    /// interface is refused and nothing changes; otherwise an interface with the same ID
    /// is removed first (its place taken by the last one) and the new one is added last,
    /// so when the new one is then refused (its TAP is another interface's) the old one
    /// stays removed, as in Firecracker (its test_api.py relies on that: the MAC it had
    /// is free again).
    pub fn insert_net(&mut self, n: NetworkInterface) -> Result<(), String> {
        self.check_mac(&n)?;
        if let Some(i) = self.nets.iter().position(|x| x.iface_id == n.iface_id) {
            self.nets.swap_remove(i);
        }
        self.check_net(&n)?;
        self.nets.push(n);
        Ok(())
    }

    /// Firecracker's checks for a drive about to be put (its own earlier version aside).
    pub fn check_drive(&self, d: &Drive) -> Result<(), String> {
        if d.is_root_device
            && self
                .drives
                .iter()
                .any(|x| x.is_root_device && x.drive_id != d.drive_id)
        {
            return Err("A root block device already exists!".into());
        }
        if let Some(s) = &d.socket {
            return Err(format!(
                "Unable to create the virtio block device: vhost-user block devices \
                 (socket {s}) are not supported by this VMM"
            ));
        }
        let Some(path) = &d.path_on_host else {
            return Err(
                "Unable to create the virtio block device: path_on_host is required".into(),
            );
        };
        if let Err(e) = std::fs::File::open(path) {
            return Err(format!(
                "Unable to create the virtio block device: {e}: {path}"
            ));
        }
        if d.io_engine == Some(IoEngine::Async) {
            return Err(
                "Unable to create the virtio block device: io_engine Async (io_uring) is not \
                 supported by this VMM; use Sync"
                    .into(),
            );
        }
        Ok(())
    }

    /// A valid MAC not used by another interface.
    fn check_mac(&self, n: &NetworkInterface) -> Result<(), String> {
        let others = || self.nets.iter().filter(|x| x.iface_id != n.iface_id);
        if let Some(m) = &n.guest_mac {
            let bytes = mac_bytes(m).ok_or_else(|| {
                format!(
                    "Could not create the network device: invalid guest_mac {m:?} (six \
                     two-digit hex bytes separated by ':')"
                )
            })?;
            if others().any(|x| x.guest_mac.as_deref().and_then(mac_bytes) == Some(bytes)) {
                return Err(format!("The MAC address is already in use: {m}"));
            }
        }
        Ok(())
    }

    /// Firecracker's checks for an interface about to be put: a valid MAC not used by
    /// another interface, a TAP not used by another interface, a TAP name Linux takes.
    pub fn check_net(&self, n: &NetworkInterface) -> Result<(), String> {
        self.check_mac(n)?;
        let mut others = self.nets.iter().filter(|x| x.iface_id != n.iface_id);
        if let Some(x) = others.find(|x| x.host_dev_name == n.host_dev_name) {
            return Err(format!(
                "Could not create the network device: the TAP device {} is already used by \
                 interface {}",
                n.host_dev_name, x.iface_id
            ));
        }
        if !tap_name_ok(&n.host_dev_name) {
            return Err(format!(
                "Could not create the network device: {:?} is not a TAP device name (1 to 15 \
                 characters, no '/', ':' or spaces)",
                n.host_dev_name
            ));
        }
        if let Some(mtu) = n.mtu.filter(|&m| m < crate::config::MIN_MTU) {
            return Err(format!(
                "Could not create the network device: mtu {mtu} is below {}",
                crate::config::MIN_MTU
            ));
        }
        Ok(())
    }

    /// The `VmConfig` this configuration boots, or what in it this VMM cannot honour.
    /// `serial` and `accel` come from the command line (Firecracker's API has neither).
    pub fn to_vm_config(
        &self,
        serial: &SerialConfig,
        accel: crate::config::Accel,
    ) -> Result<VmConfig, Unsupported> {
        let no = |s: String| Err(Unsupported(s));
        let Some(boot) = &self.boot else {
            return no("Cannot start microvm without kernel configuration.".into());
        };
        let m = &self.machine;
        if let Some(t) = m.cpu_template.filter(|t| *t != CpuTemplate::None) {
            return no(format!(
                "machine-config cpu_template {t:?}: Firecracker's static CPU templates are \
                 not applied by this VMM (use \"None\")"
            ));
        }
        if m.track_dirty_pages {
            return no(
                "machine-config track_dirty_pages: dirty page tracking is not supported by \
                 this VMM"
                    .into(),
            );
        }
        // Vessel always advises transparent huge pages on guest RAM (madvise
        // MADV_HUGEPAGE, Firecracker's "Transparent"); hugetlbfs pages it does not use.
        if m.huge_pages == HugePages::Hugetlbfs2M {
            return no(
                "machine-config huge_pages \"2M\": hugetlbfs-backed guest memory is \
                       not supported by this VMM (\"Transparent\" is what it does)"
                    .into(),
            );
        }
        let cpuid_modifiers = match &self.cpu_config {
            Some(c) => c.cpuid_modifiers().map_err(Unsupported)?,
            None => Vec::new(),
        };
        let mut c = VmConfig::new(&boot.kernel_image_path);
        c.initrd = boot.initrd_path.as_ref().map(Into::into);
        c.cmdline = boot
            .boot_args
            .clone()
            .unwrap_or_else(|| crate::config::DEFAULT_CMDLINE.to_string());
        c.cpus = m.vcpu_count;
        c.memory_mib = m.mem_size_mib;
        c.cpuid_modifiers = cpuid_modifiers;
        // Firecracker's SMT: two threads per core (a 1-vCPU machine has one thread).
        c.threads_per_core = if m.smt && m.vcpu_count > 1 { 2 } else { 1 };
        // As Firecracker: the root device is the first disk (vda), named on the command
        // line by its partition UUID when it has one.
        let ordered = self.boot_order();
        let has_root = c.cmdline.split_whitespace().any(|w| w.starts_with("root="));
        if let Some(root) = ordered.iter().find(|d| d.is_root_device && !has_root) {
            let ro = root.is_read_only.unwrap_or(false);
            let dev = match &root.partuuid {
                Some(u) => format!("root=PARTUUID={u}"),
                None => "root=/dev/vda".into(),
            };
            c.cmdline = format!(
                "{} {dev} {}",
                c.cmdline.trim_end(),
                if ro { "ro" } else { "rw" }
            );
        }
        c.disks = ordered
            .iter()
            .filter_map(|d| {
                d.path_on_host.as_ref().map(|p| DiskConfig {
                    path: p.into(),
                    // As Firecracker's: drives are raw, their content never interpreted.
                    format: Some(DiskFormat::Raw),
                    read_only: d.is_read_only.unwrap_or(false),
                    transport: None,
                    rate_limiter: d.rate_limiter,
                })
            })
            .collect();
        c.nets = self
            .nets
            .iter()
            .map(|n| NetConfig {
                tap: n.host_dev_name.clone(),
                mac: n.guest_mac.clone(),
                transport: None,
                mtu: n.mtu,
                rx_rate_limiter: n.rx_rate_limiter,
                tx_rate_limiter: n.tx_rate_limiter,
            })
            .collect();
        c.vsock = self.vsock.as_ref().map(|v| VsockConfig {
            guest_cid: v.guest_cid.into(),
            uds_path: v.uds_path.clone().into(),
        });
        c.rng = self.entropy.is_some();
        c.rng_rate_limiter = self.entropy.as_ref().and_then(|e| e.rate_limiter);
        c.serial = match self.serial.as_ref().and_then(|s| s.serial_out_path.clone()) {
            Some(p) => SerialConfig::File(p),
            None => serial.clone(),
        };
        c.serial_rate_limiter = self
            .serial
            .as_ref()
            .and_then(|s| s.rate_limiter)
            .filter(|b| b.limits());
        c.accel = accel;
        Ok(c)
    }
}
