//! Firecracker's request bodies and configuration records, with the names, defaults and
//! enums of its swagger (`firecracker.yaml`), and the checks Firecracker makes on them
//! before a request reaches the VM: resource ID syntax, token buckets, unique MACs and TAPs.
//!
//! What the API has been told is kept in `fc_config::FcConfig`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Value};

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
pub(super) fn tap_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// A MAC address as Firecracker parses it: six two-digit hex bytes separated by ':'.
/// (Whether the guest can use it, e.g. not multicast, is `VmConfig::validate`'s
/// question, asked at InstanceStart, as Firecracker accepts any address when it is put.)
pub(super) fn mac_bytes(s: &str) -> Option<[u8; 6]> {
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
    pub(super) fn shown(&self) -> Value {
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

/// `PUT /balloon` body (and `GET /balloon`'s answer).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Balloon {
    pub amount_mib: u32,
    pub deflate_on_oom: bool,
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// Free page hinting and reporting: refused (not offered by this VMM's balloon).
    #[serde(default)]
    pub free_page_hinting: bool,
    #[serde(default)]
    pub free_page_reporting: bool,
}

/// `PATCH /balloon` body.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    pub amount_mib: u32,
}

/// `PATCH /balloon/statistics` body.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    pub stats_polling_interval_s: u16,
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
