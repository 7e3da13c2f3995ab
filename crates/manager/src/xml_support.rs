//! Which parts of libvirt's domain XML Vessel maps, and the refusal for everything else:
//! nothing in a definition is dropped without a word.
//!
//! [`MAPPED`] is the table of element paths Vessel understands, each with the attributes it
//! reads; `xml::parse_domain` then checks their values. An element or attribute not in
//! the table is refused in libvirt's wording (`unsupported configuration: …`), with the
//! reason from [`REASONS`] when there is one. `<metadata>` is libvirt's place for
//! application data: its content is never interpreted except Vessel's own element.

use roxmltree::Node;

/// An element path from `<domain>` (tag names joined by `/`), and the attributes
/// Vessel reads on it.
pub struct Mapped {
    pub path: &'static str,
    pub attrs: &'static [&'static str],
    /// What it becomes in Vessel (for the documentation table and the tests).
    pub maps_to: &'static str,
}

const fn m(path: &'static str, attrs: &'static [&'static str], maps_to: &'static str) -> Mapped {
    Mapped {
        path,
        attrs,
        maps_to,
    }
}

/// Every element Vessel maps.
pub const MAPPED: &[Mapped] = &[
    m(
        "domain",
        &["type", "id"],
        "the driver: kvm/qemu (QEMU, or Vessel with Vessel's metadata), vessel",
    ),
    m("domain/name", &[], "the domain's name"),
    m("domain/uuid", &[], "the domain's UUID"),
    m("domain/title", &[], "DomainDef.title, kept as given"),
    m(
        "domain/description",
        &[],
        "DomainDef.description, kept as given",
    ),
    m(
        "domain/metadata",
        &[],
        "application data; Vessel reads its own <vessel:domain>",
    ),
    m(
        "domain/memory",
        &["unit"],
        "VmConfig.memory_mib (with currentMemory: the smaller, unless a virtio balloon takes \
         the difference)",
    ),
    m("domain/currentMemory", &["unit"], "VmConfig.memory_mib"),
    m(
        "domain/vcpu",
        &["placement", "current"],
        "VmConfig.cpus (current must equal the count)",
    ),
    m(
        "domain/cpu",
        &["mode", "match", "check", "migratable"],
        "VmConfig.cpu_model",
    ),
    m("domain/cpu/model", &["fallback"], "VmConfig.cpu_model"),
    m(
        "domain/cpu/topology",
        &["sockets", "dies", "clusters", "cores", "threads"],
        "one socket of cores × threads (1 or 2): VmConfig.threads_per_core",
    ),
    m(
        "domain/os",
        &["firmware"],
        "boot; firmware='efi': Debian's OVMF (VmConfig.firmware)",
    ),
    m(
        "domain/os/type",
        &["arch", "machine"],
        "VmConfig.arch: x86_64 on q35 (virtio_transport pci) or microvm (mmio), or riscv64 \
         on machine virt (Vessel's RISC-V CPU)",
    ),
    m("domain/os/kernel", &[], "VmConfig.kernel"),
    m("domain/os/initrd", &[], "VmConfig.initrd"),
    m("domain/os/cmdline", &[], "VmConfig.cmdline"),
    m(
        "domain/os/loader",
        &["type", "readonly"],
        "VmConfig.firmware (a BIOS ROM, or UEFI code on pflash)",
    ),
    m(
        "domain/os/nvram",
        &["template"],
        "VmConfig.firmware_vars (made from the code's OVMF_VARS template)",
    ),
    m(
        "domain/os/boot",
        &["dev"],
        "dev='hd': the first disk's bootloader through the BIOS",
    ),
    m("domain/features", &[], "platform features"),
    m("domain/features/acpi", &[], "always present"),
    m("domain/features/apic", &[], "always present"),
    m("domain/features/pae", &[], "always present (long mode)"),
    m(
        "domain/clock",
        &["offset"],
        "offset='utc': the RTC follows the host's UTC clock",
    ),
    m("domain/on_poweroff", &[], "destroy: the domain stops"),
    m(
        "domain/on_reboot",
        &[],
        "restart: the manager starts the domain again",
    ),
    m(
        "domain/on_crash",
        &[],
        "destroy: the domain stops (crashed)",
    ),
    m("domain/devices", &[], "devices"),
    m(
        "domain/devices/emulator",
        &[],
        "DomainDef.emulator: must be the program the daemon runs for the driver",
    ),
    m(
        "domain/devices/disk",
        &["type", "device"],
        "VmConfig.disks (file, or volume resolved at define)",
    ),
    m(
        "domain/devices/disk/driver",
        &["name", "type"],
        "DiskConfig.format",
    ),
    m(
        "domain/devices/disk/source",
        &["file", "pool", "volume"],
        "DiskConfig.path",
    ),
    m(
        "domain/devices/disk/target",
        &["dev", "bus"],
        "virtio disks in definition order (vda, vdb, …)",
    ),
    m("domain/devices/disk/readonly", &[], "DiskConfig.read_only"),
    m(
        "domain/devices/disk/address",
        &["type"],
        "DiskConfig.transport: type='pci' or type='virtio-mmio', no fixed slot",
    ),
    m("domain/devices/disk/alias", &["name"], "a live name only"),
    m(
        "domain/devices/interface",
        &["type"],
        "an interface on a Vessel network or a host bridge",
    ),
    m(
        "domain/devices/interface/source",
        &["network", "bridge"],
        "Interface.network / bridge",
    ),
    m(
        "domain/devices/interface/mac",
        &["address"],
        "Interface.mac",
    ),
    m("domain/devices/interface/model", &["type"], "virtio-net"),
    m(
        "domain/devices/interface/address",
        &["type"],
        "Interface.transport: type='pci' or type='virtio-mmio', no fixed slot",
    ),
    m(
        "domain/devices/interface/alias",
        &["name"],
        "a live name only",
    ),
    m(
        "domain/devices/serial",
        &["type"],
        "the 8250 UART on COM1, on the domain's console",
    ),
    m("domain/devices/serial/target", &["type", "port"], "COM1"),
    m(
        "domain/devices/serial/target/model",
        &["name"],
        "isa-serial",
    ),
    m("domain/devices/serial/alias", &["name"], "a live name only"),
    m(
        "domain/devices/console",
        &["type"],
        "the serial console, or a virtio console (hvc0)",
    ),
    m(
        "domain/devices/console/target",
        &["type", "port"],
        "serial: COM1; virtio: VmConfig.virtio_console",
    ),
    m(
        "domain/devices/console/alias",
        &["name"],
        "a live name only",
    ),
    m(
        "domain/devices/rng",
        &["model"],
        "VmConfig.rng (virtio-rng)",
    ),
    m(
        "domain/devices/rng/backend",
        &["model"],
        "the host's random source",
    ),
    m("domain/devices/rng/alias", &["name"], "a live name only"),
    m(
        "domain/devices/vsock",
        &["model"],
        "VmConfig.vsock (Firecracker-style: the host side on a Unix socket in the run folder)",
    ),
    m(
        "domain/devices/vsock/cid",
        &["auto", "address"],
        "VsockConfig.guest_cid (auto: 3; the host side needs no unique CID)",
    ),
    m(
        "domain/devices/memballoon",
        &["model", "autodeflate", "freePageReporting"],
        "VmConfig.balloon (virtio-balloon; target = memory - currentMemory; autodeflate: \
         deflate_on_oom; freePageReporting='on' refused)",
    ),
    m(
        "domain/devices/memballoon/stats",
        &["period"],
        "BalloonConfig.stats_polling_interval_s",
    ),
    m(
        "domain/devices/memballoon/alias",
        &["name"],
        "a live name only",
    ),
    m(
        "domain/devices/controller",
        &["type", "index", "model"],
        "the implicit PCI root; USB model='none'",
    ),
];

/// Why the elements libvirt users meet most often are refused: by name, or by
/// `parent/name` where the name means different things in different places.
pub const REASONS: &[(&str, &str)] = &[
    (
        "hostdev",
        "host device assignment (VFIO) is not supported by Vessel",
    ),
    (
        "graphics",
        "Vessel has no graphical console (its consoles are serial and virtio)",
    ),
    ("video", "Vessel has no video device"),
    ("sound", "Vessel has no sound device"),
    ("audio", "Vessel has no sound device"),
    ("watchdog", "Vessel has no watchdog device"),
    ("input", "Vessel has no PS/2, USB or virtio input devices"),
    ("redirdev", "Vessel has no USB"),
    ("smartcard", "Vessel has no smartcard device"),
    ("hub", "Vessel has no USB"),
    (
        "panic",
        "Vessel has no pvpanic device (a guest panic ends the VM as a reboot)",
    ),
    ("tpm", "Vessel has no TPM"),
    ("filesystem", "Vessel has no virtio-fs or 9p device"),
    ("channel", "Vessel has no virtio-serial channels"),
    ("parallel", "Vessel has no parallel port"),
    ("shmem", "Vessel has no shared memory device"),
    ("iommu", "Vessel has no IOMMU"),
    ("memory", "Vessel has no memory hot-plug"),
    ("lease", "Vessel keeps no leases"),
    (
        "memoryBacking",
        "Vessel chooses how guest memory is backed (hugepages, sharing, locking cannot be set)",
    ),
    ("maxMemory", "Vessel has no memory hot-plug"),
    ("numatune", "Vessel has no NUMA placement"),
    ("cputune", "Vessel has no vCPU pinning or scheduling tuning"),
    ("memtune", "Vessel has no memory limits"),
    ("blkiotune", "Vessel has no block I/O tuning"),
    (
        "iothreads",
        "Vessel gives each device an I/O thread of its own; their number cannot be set",
    ),
    (
        "iothreadids",
        "Vessel gives each device an I/O thread of its own",
    ),
    (
        "launchSecurity",
        "Vessel has no confidential computing (SEV/TDX)",
    ),
    ("sysinfo", "Vessel has no SMBIOS tables"),
    ("seclabel", "Vessel applies no SELinux/AppArmor labels"),
    ("resource", "Vessel places no VM in a resource partition"),
    ("numa", "Vessel has no guest NUMA topology"),
    (
        "feature",
        "CPU feature policies are not supported: choose a CPU model",
    ),
    (
        "timer",
        "Vessel's timers (PIT, RTC, kvmclock) follow the host clock; their policies cannot be set",
    ),
    (
        "address",
        "Vessel assigns device addresses itself (on a disk or interface, <address \
         type='pci'/> or <address type='virtio-mmio'/> chooses its transport)",
    ),
    (
        "boot",
        "per-device boot order is not supported: <os><boot dev='hd'/> boots the first disk",
    ),
    ("vlan", "Vessel's interfaces carry no VLAN tags"),
    (
        "virtualport",
        "Vessel's interfaces have no virtual port profiles (Open vSwitch, 802.1Qbh)",
    ),
    (
        "interface/port",
        "Vessel's interfaces have no port isolation",
    ),
    ("bandwidth", "Vessel's interfaces have no bandwidth limits"),
    ("filterref", "Vessel has no network filters"),
    ("interface/target", "Vessel names TAP devices itself"),
    (
        "disk/serial",
        "Vessel reports the disk's file name as its serial",
    ),
    ("rng/rate", "Vessel's virtio-rng has no rate limit"),
];

/// libvirt's wording for something a driver cannot do.
pub fn unsupported(what: impl std::fmt::Display) -> String {
    format!("unsupported configuration: {what}")
}

fn path_of(n: Node) -> String {
    let mut parts: Vec<&str> = n
        .ancestors()
        .filter(|a| a.is_element())
        .map(|a| a.tag_name().name())
        .collect();
    parts.reverse();
    parts.join("/")
}

/// Every element and attribute not in [`MAPPED`], in document order, each refused with
/// its reason (an unmapped element's own content is not looked into).
pub fn refusals(root: Node) -> Vec<(roxmltree::NodeId, String)> {
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(n) = stack.pop() {
        let path = path_of(n);
        let name = n.tag_name().name();
        let Some(rule) = MAPPED.iter().find(|r| r.path == path) else {
            let parent = n.parent_element().map_or("", |p| p.tag_name().name());
            let why = REASONS
                .iter()
                .find(|(el, _)| *el == name || el.split_once('/') == Some((parent, name)))
                .map_or("Vessel does not support it", |(_, why)| why);
            out.push((n.id(), unsupported(format!("<{name}> ({path}): {why}"))));
            continue;
        };
        for a in n.attributes() {
            if a.namespace().is_some() || !rule.attrs.contains(&a.name()) {
                out.push((
                    n.id(),
                    unsupported(format!(
                        "<{name} {}='{}'> ({path}): Vessel does not support this attribute",
                        a.name(),
                        a.value()
                    )),
                ));
            }
        }
        // libvirt's application metadata: not Vessel's to interpret (its own element is
        // read by the parser).
        if path == "domain/metadata" {
            continue;
        }
        // Children in document order (the stack takes the last first).
        stack.extend(n.children().filter(|c| c.is_element()).rev());
    }
    out
}
