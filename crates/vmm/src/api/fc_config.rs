//! `FcConfig`: what the Firecracker-compatible API has been told, kept as given (IDs,
//! order, `null`s), so `GET /vm/config` answers in Firecracker's shape before and after
//! boot; `insert_drive`/`insert_net` put devices as Firecracker's builders do, and
//! `to_vm_config` turns it into the one `VmConfig` the VMM boots, or refuses naming the
//! field it cannot honour.

use serde_json::{json, Value};

use super::fc_model::{
    mac_bytes, tap_name_ok, Balloon, BootSource, CacheType, CpuConfig, CpuTemplate, Drive, Entropy,
    HugePages, IoEngine, Logger, MachineConfig, Metrics, NetworkInterface, Serial, Vsock,
};
use crate::config::{DiskConfig, DiskFormat, NetConfig, SerialConfig, VmConfig, VsockConfig};

/// Everything the API has been told, kept as given (and carried in snapshots,
/// `VmSnapshot::api`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct FcConfig {
    pub machine: MachineConfig,
    pub boot: Option<BootSource>,
    pub cpu_config: Option<CpuConfig>,
    /// In the order they were first put (a later PUT with the same ID replaces in place).
    pub drives: Vec<Drive>,
    pub nets: Vec<NetworkInterface>,
    pub vsock: Option<Vsock>,
    pub entropy: Option<Entropy>,
    pub balloon: Option<Balloon>,
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
            balloon: c.balloon.as_ref().map(|b| Balloon {
                amount_mib: b.amount_mib,
                deflate_on_oom: b.deflate_on_oom,
                stats_polling_interval_s: b.stats_polling_interval_s,
                ..Balloon::default()
            }),
            ..FcConfig::default()
        }
    }

    /// What the API shows for a VM restored from a snapshot: what the API that took it
    /// had been told (`api`, the snapshot's), or else what its configuration says
    /// ([`FcConfig::from_vm_config`]); the logger, metrics and serial are this VMM's own
    /// (`self`, configured before the load), not the snapshot's.
    pub fn restored(&self, api: Option<&Value>, config: &VmConfig) -> FcConfig {
        let mut view = api
            .and_then(|v| serde_json::from_value::<FcConfig>(v.clone()).ok())
            .unwrap_or_else(|| FcConfig::from_vm_config(config));
        view.logger = self.logger.clone();
        view.metrics = self.metrics.clone();
        view.serial = self.serial.clone();
        view
    }

    /// `GET /vm/config`: Firecracker's `FullVmConfiguration`. As Firecracker, the logger,
    /// metrics and CPU template are not echoed (`null`), and devices this VMM does not
    /// have (MMDS, pmem, memory hot-plug) are absent (`null`, `[]`).
    pub fn full(&self) -> Value {
        json!({
            "balloon": self.balloon,
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
            // How the host submits I/O, not what the guest sees: served by Vessel's own
            // engine (preadv/pwritev on the disk's I/O thread), said in the log.
            tracing::warn!(
                drive = d.drive_id,
                "io_engine Async: this VMM has no io_uring engine; the drive is served by \
                 its synchronous engine on its own I/O thread"
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
        // track_dirty_pages needs nothing to be switched on: an accelerator that keeps a
        // dirty log keeps it always, and a Diff snapshot under one that does not is
        // refused when asked for.
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
                    folder: None,
                    fds: Vec::new(),
                    transport: None,
                    rate_limiter: d.rate_limiter,
                    queues: None,
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
                queues: None,
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
        c.balloon = match &self.balloon {
            Some(b) if b.free_page_hinting || b.free_page_reporting => {
                return no("balloon free_page_hinting and free_page_reporting are not \
                     supported by this VMM's balloon"
                    .into())
            }
            Some(b) => Some(crate::config::BalloonConfig {
                amount_mib: b.amount_mib,
                deflate_on_oom: b.deflate_on_oom,
                stats_polling_interval_s: b.stats_polling_interval_s,
            }),
            None => None,
        };
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
