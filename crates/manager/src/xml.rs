//! libvirt domain XML, the common subset: name, uuid, memory/currentMemory with units, vcpu,
//! os/kernel/initrd/cmdline, file disks, network/bridge interfaces, serial/console. Parsed
//! with roxmltree into a [`DomainDef`]; written back by [`to_xml`] (`vessel dumpxml`).
//!
//! `<domain type='…'>`: `kvm` and `qemu` (software CPU, TCG) run on QEMU with that
//! accelerator, unless Vessel's metadata element (`<metadata><vessel:domain
//! xmlns:vessel='…' driver='vessel' accel='…'/>`, libvirt's convention for application
//! data) says the domain runs on Vessel's VMM; `vessel` is still read, and dumps write
//! `kvm` plus the metadata so they validate against libvirt's schema. Every element and
//! attribute is either mapped (the table in `xml_support`) or refused in libvirt's wording
//! (`unsupported configuration: …`): nothing is dropped without a word.

use std::path::PathBuf;

use roxmltree::{Document, Node};
use vmm::{Accel, VmConfig};

use vmm::config::{DiskConfig, DiskFormat};

use crate::domain::{DomainDef, DriverKind, Interface};
use crate::error::{Error, Result};
use crate::xml_support::unsupported;

/// The namespace of Vessel's element in `<metadata>`.
pub const VESSEL_NS: &str = "https://vessel.dev/xmlns/domain/1";

fn refuse(what: impl std::fmt::Display) -> Error {
    bad(unsupported(what))
}

/// What Vessel's `<metadata>` element says.
struct VesselMetadata {
    driver: DriverKind,
    accel: Accel,
    /// The host socket of the vsock device, when the definition names one.
    vsock_uds: Option<String>,
    /// `<vessel:cloud-init user-data='FILE' [meta-data='FILE'] [network-config='FILE']/>`:
    /// the domain's NoCloud seed, as `cloud_init` in JSON definitions.
    cloud_init: Option<vmm::cloud_init::CloudInitConfig>,
}

/// The attributes of `<vessel:cloud-init>`, in JSON's field order.
const CLOUD_INIT_ATTRS: [&str; 3] = ["user-data", "meta-data", "network-config"];

fn cloud_init_metadata(el: Node) -> Result<Option<vmm::cloud_init::CloudInitConfig>> {
    let mut found = None;
    for c in el.children().filter(|c| c.is_element()) {
        if c.tag_name().namespace() != Some(VESSEL_NS) || c.tag_name().name() != "cloud-init" {
            return Err(bad(format!(
                "Vessel metadata element <{}> (only <vessel:cloud-init> goes inside \
                 <vessel:domain>)",
                c.tag_name().name()
            )));
        }
        if found.is_some() {
            return Err(bad("more than one <vessel:cloud-init>"));
        }
        if let Some(a) = c
            .attributes()
            .find(|a| !CLOUD_INIT_ATTRS.contains(&a.name()))
        {
            return Err(bad(format!(
                "<vessel:cloud-init> attribute {:?} (user-data, meta-data, network-config)",
                a.name()
            )));
        }
        let file = |name: &str| {
            c.attribute(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        found = Some(vmm::cloud_init::CloudInitConfig {
            user_data: file("user-data")
                .ok_or_else(|| bad("<vessel:cloud-init> needs user-data='FILE'"))?,
            meta_data: file("meta-data"),
            network_config: file("network-config"),
        });
    }
    Ok(found)
}

/// Vessel's `<metadata>` element: which driver runs the domain, its accelerator, the
/// host socket of its vsock device and its cloud-init seed, when the definition says.
fn vessel_metadata(root: Node) -> Result<Option<VesselMetadata>> {
    let Some(el) = child(root, "metadata").and_then(|m| {
        m.children()
            .find(|c| c.is_element() && c.tag_name().namespace() == Some(VESSEL_NS))
    }) else {
        return Ok(None);
    };
    let driver = match el.attribute("driver").unwrap_or("vessel") {
        "vessel" => DriverKind::Vessel,
        "qemu" => DriverKind::Qemu,
        other => {
            return Err(bad(format!(
                "Vessel metadata driver {other:?} (vessel or qemu)"
            )))
        }
    };
    let accel: Accel = el
        .attribute("accel")
        .unwrap_or("auto")
        .parse()
        .map_err(|e: String| bad(format!("Vessel metadata: {e}")))?;
    Ok(Some(VesselMetadata {
        driver,
        accel,
        vsock_uds: el.attribute("vsock_uds").map(str::to_string),
        cloud_init: cloud_init_metadata(el)?,
    }))
}

/// Every refusal a definition earns, at once (a new user's libvirt XML would otherwise
/// take a define per element): the value checks, then the table's, each element named
/// once, as one `unsupported configuration: A; B; …`.
fn refuse_all(root: Node) -> Result<()> {
    const MAX: usize = 24;
    let mut why = check_values(root);
    let valued: Vec<roxmltree::NodeId> = why.iter().map(|(id, _)| *id).collect();
    why.extend(
        crate::xml_support::refusals(root)
            .into_iter()
            .filter(|(id, _)| !valued.contains(id)),
    );
    // In document order, as the user reads the file.
    why.sort_by_key(|(id, _)| id.get());
    let mut said: Vec<String> = Vec::new();
    for (_, w) in why {
        let w = w
            .strip_prefix("unsupported configuration: ")
            .unwrap_or(&w)
            .to_string();
        if !said.contains(&w) {
            said.push(w);
        }
    }
    match said.len() {
        0 => Ok(()),
        n if n > MAX => {
            said.truncate(MAX);
            Err(refuse(format!("{}; and {} more", said.join("; "), n - MAX)))
        }
        _ => Err(refuse(said.join("; "))),
    }
}

/// The virtio transport an x86_64 `<type machine=…>` names: Vessel's two machines are
/// q35 (virtio-pci, as QEMU's q35) and microvm (virtio-mmio, as QEMU's and Firecracker's
/// microvm). Any other (i440fx's `pc`, `isapc`, …) is refused: running it as q35 would
/// change the guest's chipset without a word.
fn x86_machine(m: &str) -> Result<vmm::config::Transport> {
    match m {
        "q35" => Ok(vmm::config::Transport::Pci),
        _ if m.starts_with("pc-q35-") => Ok(vmm::config::Transport::Pci),
        "microvm" => Ok(vmm::config::Transport::Mmio),
        _ => Err(refuse(format!(
            "<type machine='{m}'>: Vessel's x86_64 machines are q35 (virtio-pci) and microvm \
             (virtio-mmio)"
        ))),
    }
}

/// The transport a device's `<address>` chooses: `<address type='pci'/>` (Vessel places
/// it on its PCI bus) or `<address type='virtio-mmio'/>`; a fixed slot or any other bus is
/// refused, as Vessel assigns addresses itself.
fn device_transport(dev: Node) -> Result<Option<vmm::config::Transport>> {
    let Some(a) = child(dev, "address") else {
        return Ok(None);
    };
    let kind = a.attribute("type").unwrap_or("");
    let fixed: Vec<String> = a
        .attributes()
        .filter(|x| x.name() != "type")
        .map(|x| format!("{}='{}'", x.name(), x.value()))
        .collect();
    if !fixed.is_empty() {
        return Err(refuse(format!(
            "<address type='{kind}' {}>: Vessel assigns device addresses itself; \
             <address type='pci'/> or <address type='virtio-mmio'/> chooses the transport",
            fixed.join(" ")
        )));
    }
    match kind {
        "pci" => Ok(Some(vmm::config::Transport::Pci)),
        "virtio-mmio" => Ok(Some(vmm::config::Transport::Mmio)),
        other => Err(refuse(format!(
            "<address type='{other}'>: Vessel's virtio devices are on PCI (type='pci') or \
             virtio-mmio (type='virtio-mmio')"
        ))),
    }
}

/// The value checks behind `xml_support`'s table: what each mapped element may say.
/// Every element is looked at, so a definition's refusals come all at once.
fn check_values(root: Node) -> Vec<(roxmltree::NodeId, String)> {
    root.descendants()
        .filter(|n| n.is_element())
        .filter_map(|n| match check_value(n) {
            Ok(()) => None,
            Err(Error::Invalid { why, .. }) => Some((n.id(), why)),
            Err(e) => Some((n.id(), e.to_string())),
        })
        .collect()
}

/// [`check_values`] for one element.
fn check_value(n: Node) -> Result<()> {
    let attr = |n: Node, a: &str| n.attribute(a).map(str::to_string);
    let parent = n
        .parent_element()
        .map(|p| p.tag_name().name())
        .unwrap_or("");
    let name = n.tag_name().name();
    let value_ok = |a: &str, allowed: &[&str]| match n.attribute(a) {
        Some(v) if !allowed.contains(&v) => Err(refuse(format!(
            "<{name} {a}='{v}'>: Vessel supports {}",
            allowed.join(", ")
        ))),
        _ => Ok(()),
    };
    let text_ok = |allowed: &[&str]| {
        let t = text(n);
        if t.is_empty() || allowed.contains(&t.as_str()) {
            Ok(())
        } else {
            Err(refuse(format!(
                "<{name}>{t}</{name}>: Vessel supports {}",
                allowed.join(", ")
            )))
        }
    };
    match (parent, name) {
        ("os", "type") => {
            match (attr(n, "arch").as_deref(), attr(n, "machine").as_deref()) {
                (None | Some("x86_64"), None) => {}
                (None | Some("x86_64"), Some(m)) => {
                    x86_machine(m)?;
                }
                // On Vessel's RISC-V CPU, whose machine is laid out as QEMU's virt.
                (Some("riscv64"), None | Some("virt")) => {}
                (Some("riscv64"), Some(m)) => {
                    return Err(refuse(format!(
                        "<type arch='riscv64' machine='{m}'>: Vessel's riscv64 machine is virt"
                    )))
                }
                (Some(a), _) => {
                    return Err(refuse(format!(
                        "architecture '{a}': Vessel runs x86_64 and riscv64 guests"
                    )))
                }
            }
            text_ok(&["hvm"])?;
        }
        ("os", "boot") => value_ok("dev", &["hd"])?,
        ("os", "loader") => value_ok("type", &["rom", "pflash"])?,
        ("domain", "os") => value_ok("firmware", &["efi", "bios"])?,
        ("domain", "vcpu") => value_ok("placement", &["static"])?,
        ("domain", "clock") => value_ok("offset", &["utc"])?,
        ("domain", "on_poweroff") => text_ok(&["destroy"])?,
        ("domain", "on_reboot") => text_ok(&["restart"])?,
        ("domain", "on_crash") => text_ok(&["destroy"])?,
        ("devices", "disk") => {
            value_ok("type", &["file", "volume"])?;
            value_ok("device", &["disk"])?;
        }
        ("devices", "interface") => value_ok("type", &["network", "bridge"])?,
        ("disk" | "interface", "address") => {
            if let Some(dev) = n.parent_element() {
                device_transport(dev)?;
            }
        }
        ("disk", "driver") => value_ok("name", &["qemu"])?,
        ("disk", "target") => value_ok("bus", &["virtio"])?,
        ("interface", "model") => value_ok("type", &["virtio"])?,
        ("devices", "serial") => value_ok("type", &["pty"])?,
        ("serial", "target") => {
            value_ok("port", &["0"])?;
            value_ok("type", &["isa-serial"])?;
        }
        ("target", "model") => value_ok("name", &["isa-serial"])?,
        ("devices", "console") => value_ok("type", &["pty"])?,
        ("console", "target") => {
            value_ok("type", &["serial", "virtio"])?;
            value_ok("port", &["0"])?;
        }
        ("devices", "rng") => value_ok("model", &["virtio"])?,
        ("rng", "backend") => {
            value_ok("model", &["random"])?;
            text_ok(&["/dev/urandom", "/dev/random"])?;
        }
        ("devices", "memballoon") => {
            value_ok("model", &["none", "virtio"])?;
            value_ok("autodeflate", &["on", "off"])?;
            if n.attribute("freePageReporting") == Some("on") {
                return Err(refuse(
                    "<memballoon freePageReporting='on'>: Vessel's balloon has no free page \
                     reporting (inflate, deflate, autodeflate and stats are supported)",
                ));
            }
            value_ok("freePageReporting", &["off"])?;
        }
        ("memballoon", "stats")
            if n.attribute("period")
                .is_some_and(|p| p.parse::<u16>().is_err()) =>
        {
            return Err(bad("<memballoon><stats period>: seconds, 0 to 65535"));
        }
        ("devices", "vsock") => value_ok("model", &["virtio"])?,
        ("devices", "controller") => {
            let ok = matches!(
                (n.attribute("type"), n.attribute("model")),
                (Some("pci"), Some("pci-root" | "pcie-root")) | (Some("usb"), Some("none"))
            );
            if !ok || n.attribute("index").is_some_and(|i| i != "0") {
                return Err(refuse(format!(
                    "<controller type='{}' model='{}'>: Vessel has its own PCI root and no \
                     other controllers (type='usb' model='none' says there is no USB)",
                    n.attribute("type").unwrap_or(""),
                    n.attribute("model").unwrap_or("")
                )));
            }
        }
        _ => {}
    }

    Ok(())
}

fn child<'a, 'i>(n: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    n.children().find(|c| c.has_tag_name(name))
}

fn text(n: Node) -> String {
    n.text().unwrap_or("").trim().to_string()
}

/// `<cpu>`: libvirt's host-passthrough, host-model and maximum modes are everything the
/// accelerator offers (`max`); a custom `<model>` names one of Vessel's models.
fn cpu_model(c: Node) -> Result<vmm::CpuModel> {
    let model = child(c, "model").map(text).filter(|s| !s.is_empty());
    match (c.attribute("mode").unwrap_or("custom"), model) {
        ("host-passthrough" | "host-model" | "maximum", _) => Ok(vmm::CpuModel::Max),
        ("custom", Some(m)) => m.parse().map_err(bad),
        ("custom", None) => Ok(vmm::CpuModel::Max),
        (other, _) => Err(bad(format!(
            "<cpu mode={other:?}>: host-passthrough, host-model, maximum or custom"
        ))),
    }
}

/// `<cpu><topology>`: Vessel's guests have one socket (one die, one cluster) of cores
/// with one or two threads each, and as many CPUs as `<vcpu>` says.
fn topology_threads(t: Node, cpus: u8) -> Result<u8> {
    let n = |a: &str| -> Result<u32> {
        match t.attribute(a) {
            None => Ok(1),
            Some(v) => v
                .parse()
                .map_err(|_| bad(format!("<topology {a}='{v}'> is not a number"))),
        }
    };
    let (sockets, dies, clusters, cores, threads) = (
        n("sockets")?,
        n("dies")?,
        n("clusters")?,
        n("cores")?,
        n("threads")?,
    );
    if sockets != 1 || dies != 1 || clusters != 1 {
        return Err(refuse(format!(
            "<topology sockets='{sockets}' dies='{dies}' clusters='{clusters}'>: Vessel's \
             guests have one socket"
        )));
    }
    if !(1..=2).contains(&threads) {
        return Err(refuse(format!(
            "<topology threads='{threads}'>: one or two threads per core"
        )));
    }
    if cores * threads != u32::from(cpus) {
        return Err(bad(format!(
            "<topology cores='{cores}' threads='{threads}'> is not the {cpus} vCPUs of <vcpu>"
        )));
    }
    Ok(threads as u8)
}

fn bad(why: impl Into<String>) -> Error {
    Error::invalid("domain XML", why)
}

/// libvirt's memory units, to bytes.
fn unit_bytes(unit: &str) -> Result<u64> {
    Ok(match unit {
        "b" | "B" | "byte" | "bytes" => 1,
        "KB" => 1000,
        "k" | "K" | "KiB" => 1 << 10,
        "MB" => 1000 * 1000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1000 * 1000 * 1000,
        "G" | "GiB" => 1 << 30,
        "TB" => 1000 * 1000 * 1000 * 1000,
        "T" | "TiB" => 1 << 40,
        other => return Err(bad(format!("unknown memory unit {other:?}"))),
    })
}

fn memory_mib(n: Node) -> Result<u64> {
    let v: u64 = text(n)
        .parse()
        .map_err(|_| bad(format!("<{}> is not a number", n.tag_name().name())))?;
    let unit = unit_bytes(n.attribute("unit").unwrap_or("KiB"))?;
    let bytes = v
        .checked_mul(unit)
        .ok_or_else(|| bad("memory size out of range"))?;
    if bytes % (1 << 20) != 0 {
        let (down, up) = (bytes >> 20, (bytes >> 20) + 1);
        return Err(refuse(format!(
            "<{} unit='{}'>{v}</{0}>: Vessel gives a guest whole MiB of memory; this is \
             {:.2} MiB (use {} or {} KiB)",
            n.tag_name().name(),
            n.attribute("unit").unwrap_or("KiB"),
            bytes as f64 / f64::from(1 << 20),
            down << 10,
            up << 10
        )));
    }
    Ok(bytes >> 20)
}

/// Deepest element nesting accepted (a libvirt domain needs about 6).
pub const MAX_DEPTH: usize = 64;
/// Most elements in one document.
pub const MAX_ELEMENTS: usize = 10_000;
/// Most attributes on one element (roxmltree checks duplicates pairwise).
pub const MAX_ATTRIBUTES_PER_ELEMENT: usize = 64;
/// Most attributes in one document.
pub const MAX_ATTRIBUTES: usize = 20_000;

/// Bounds a document's shape in one linear pass before it reaches the parser: nesting
/// deeper than [`MAX_DEPTH`] once overflowed the connection thread's stack, and hundreds
/// of thousands of attributes took the parser minutes (quadratic duplicate checks).
/// Only counts: whatever is malformed is left for the parser to report.
fn check_shape(xml: &str) -> Result<()> {
    let b = xml.as_bytes();
    let (mut i, mut depth, mut elements, mut attrs_total) = (0usize, 0usize, 0usize, 0usize);
    // Skips to just past `end`, or to the end of the document.
    let skip_past = |from: usize, end: &str| {
        xml.get(from..)
            .and_then(|rest| rest.find(end))
            .map_or(b.len(), |at| from + at + end.len())
    };
    while i < b.len() {
        let Some(at) = xml.get(i..).and_then(|rest| rest.find('<')) else {
            break;
        };
        i += at;
        let rest = &b[i..];
        if rest.starts_with(b"<!--") {
            i = skip_past(i + 4, "-->");
        } else if rest.starts_with(b"<![CDATA[") {
            i = skip_past(i + 9, "]]>");
        } else if rest.starts_with(b"<?") {
            i = skip_past(i + 2, "?>");
        } else if rest.starts_with(b"<!") {
            // A DTD: refused by the parser (entities are not allowed).
            return Ok(());
        } else if rest.starts_with(b"</") {
            depth = depth.saturating_sub(1);
            i = skip_past(i + 2, ">");
        } else {
            elements += 1;
            if elements > MAX_ELEMENTS {
                return Err(bad(format!("more than {MAX_ELEMENTS} elements")));
            }
            // The start tag: attributes are counted by their '=' outside quotes.
            let (mut j, mut quote, mut attrs, mut last) = (i + 1, None, 0usize, 0u8);
            while j < b.len() {
                let c = b[j];
                match quote {
                    Some(q) if c == q => quote = None,
                    Some(_) => {}
                    None if c == b'"' || c == b'\'' => quote = Some(c),
                    None if c == b'=' => attrs += 1,
                    None if c == b'>' => break,
                    None => {}
                }
                if !c.is_ascii_whitespace() {
                    last = c;
                }
                j += 1;
            }
            if attrs > MAX_ATTRIBUTES_PER_ELEMENT {
                return Err(bad(format!(
                    "an element with more than {MAX_ATTRIBUTES_PER_ELEMENT} attributes"
                )));
            }
            attrs_total += attrs;
            if attrs_total > MAX_ATTRIBUTES {
                return Err(bad(format!("more than {MAX_ATTRIBUTES} attributes")));
            }
            if last != b'/' {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(bad(format!(
                        "elements nested deeper than {MAX_DEPTH} levels"
                    )));
                }
            }
            i = j + 1;
        }
    }
    Ok(())
}

/// Parses a libvirt domain XML document. Its shape is bounded first ([`MAX_DEPTH`],
/// [`MAX_ELEMENTS`], [`MAX_ATTRIBUTES`]), in time linear in its length.
pub fn parse_domain(xml: &str) -> Result<DomainDef> {
    check_shape(xml)?;
    let opts = roxmltree::ParsingOptions {
        allow_dtd: false,
        // Elements, attributes' text and text nodes: a backstop behind check_shape.
        nodes_limit: 4 * MAX_ELEMENTS as u32,
    };
    let doc = Document::parse_with_options(xml, opts).map_err(|e| bad(e.to_string()))?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return Err(bad(format!(
            "the root element is <{}>, not <domain>",
            root.tag_name().name()
        )));
    }
    let (mut driver, mut accel) = match root.attribute("type").unwrap_or("qemu") {
        "vessel" => (DriverKind::Vessel, Accel::Auto),
        "qemu" => (DriverKind::Qemu, Accel::Emu),
        "kvm" => (DriverKind::Qemu, Accel::Kvm),
        other => {
            return Err(refuse(format!(
                "<domain type='{other}'>: Vessel runs kvm and qemu domains (and vessel)"
            )))
        }
    };
    // Values first (the clearer message for a mapped element used in a way Vessel has
    // not), then every element and attribute against the table.
    refuse_all(root)?;
    let mut vsock_uds = None;
    let mut cloud_init = None;
    let mut explicit_driver = false;
    if let Some(m) = vessel_metadata(root)? {
        explicit_driver = true;
        driver = m.driver;
        if m.driver == DriverKind::Vessel {
            accel = m.accel;
        }
        vsock_uds = m.vsock_uds;
        cloud_init = m.cloud_init;
    }
    let name = child(root, "name")
        .map(text)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad("missing <name>"))?;
    let uuid = child(root, "uuid").map(text).filter(|s| !s.is_empty());
    // Kept as given (libvirt keeps them; a dump gives them back).
    let title = child(root, "title").map(text);
    let description = child(root, "description").map(text);
    let emulator = child(root, "devices")
        .and_then(|d| child(d, "emulator"))
        .map(text)
        .map(PathBuf::from);
    // With a virtio balloon, currentMemory is what the guest keeps: the balloon's
    // target is the rest (libvirt's meaning). Without one, the smaller is the memory.
    let balloon = child(root, "devices")
        .and_then(|d| child(d, "memballoon"))
        .filter(|b| b.attribute("model") == Some("virtio"));
    let mut balloon_mib = 0;
    let memory = match (child(root, "memory"), child(root, "currentMemory")) {
        (Some(m), Some(c)) if balloon.is_some() => {
            let (m, c) = (memory_mib(m)?, memory_mib(c)?);
            balloon_mib = m.saturating_sub(c);
            m
        }
        (Some(m), Some(c)) => memory_mib(m)?.min(memory_mib(c)?),
        (Some(m), None) => memory_mib(m)?,
        (None, Some(c)) => memory_mib(c)?,
        (None, None) => return Err(bad("missing <memory>")),
    };
    let cpus = match child(root, "vcpu") {
        Some(v) => {
            let n = text(v)
                .parse::<u8>()
                .map_err(|_| bad(format!("<vcpu> {:?} is not a CPU count (1-254)", text(v))))?;
            if let Some(c) = v.attribute("current").filter(|c| c.parse::<u8>() != Ok(n)) {
                return Err(refuse(format!(
                    "<vcpu current='{c}'>{n}</vcpu>: Vessel boots every vCPU and has no CPU \
                     hot-plug, so current must equal the count"
                )));
            }
            n
        }
        None => 1,
    };
    let os = child(root, "os").ok_or_else(|| bad("missing <os>"))?;
    let kernel = child(os, "kernel").map(text).filter(|s| !s.is_empty());
    // `<os firmware='efi'>` with no loader of its own: Debian's OVMF.
    let efi = os.attribute("firmware") == Some("efi");
    let loader = child(os, "loader")
        .map(text)
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .or_else(|| efi.then(|| vmm::config::OVMF_CODE.into()));
    let nvram = child(os, "nvram")
        .map(text)
        .filter(|s| !s.is_empty())
        .map(PathBuf::from);
    let boot_hd = os
        .children()
        .any(|n| n.has_tag_name("boot") && n.attribute("dev") == Some("hd"));
    let initrd = child(os, "initrd")
        .map(text)
        .filter(|s| !s.is_empty())
        .map(PathBuf::from);
    let mut vm = match kernel {
        Some(k) => VmConfig::new(k),
        // A disk image's own bootloader, through the BIOS (SeaBIOS unless <loader>
        // names another), with its disks on virtio-pci as firmware needs them.
        None if boot_hd || loader.is_some() => {
            let mut vm = VmConfig::new("");
            vm.kernel = None;
            vm.firmware = Some(loader.unwrap_or_else(|| vmm::config::DEFAULT_BIOS.into()));
            vm.virtio_transport = vmm::config::Transport::Pci;
            vm
        }
        None => {
            return Err(bad(
                "missing <os><kernel> (direct kernel boot) or <os><boot dev='hd'/> \
                 (the disk's bootloader through SeaBIOS)",
            ))
        }
    };
    vm.initrd = initrd;
    vm.firmware_vars = nvram;
    if let Some(c) = child(os, "cmdline") {
        vm.cmdline = text(c);
    }
    vm.memory_mib = memory;
    vm.cpus = cpus;
    if let Some(c) = child(root, "cpu") {
        vm.cpu_model = cpu_model(c)?;
        if let Some(t) = child(c, "topology") {
            vm.threads_per_core = topology_threads(t, cpus)?;
        }
    }
    vm.accel = accel;
    vm.serial = vmm::SerialConfig::Null;
    if child(os, "type").and_then(|t| t.attribute("arch")) == Some("riscv64") {
        vm.arch = vmm::config::Arch::Riscv64;
        // A riscv64 guest runs on Vessel's software CPU: QEMU's TCG (type='qemu') is
        // what that is in libvirt's terms, and only the Vessel driver has it.
        if !explicit_driver {
            if root.attribute("type") == Some("kvm") {
                return Err(refuse(
                    "<domain type='kvm'> with a riscv64 guest: this host has no riscv64 \
                     KVM; use type='qemu' (Vessel's RISC-V CPU)",
                ));
            }
            driver = DriverKind::Vessel;
            accel = Accel::Auto;
            vm.accel = accel;
        }
    }

    // The machine names the transport; without one a QEMU domain is q35 (its virtio
    // devices PCI), a Vessel one keeps Vessel's default for how it boots.
    let machine = child(os, "type").and_then(|t| t.attribute("machine"));
    if vm.arch == vmm::config::Arch::X86_64 {
        match machine {
            Some(m) => vm.virtio_transport = x86_machine(m)?,
            None if driver == DriverKind::Qemu => vm.virtio_transport = vmm::config::Transport::Pci,
            None => {}
        }
    }

    let mut disks = Vec::new();
    let mut interfaces = Vec::new();
    if let Some(devices) = child(root, "devices") {
        for dev in devices.children().filter(|n| n.is_element()) {
            match dev.tag_name().name() {
                "disk" => disks.push(parse_disk(dev)?),
                "interface" => interfaces.push(parse_interface(dev)?),
                "rng" => vm.rng = true,
                "vsock" => {
                    let cid = child(dev, "cid");
                    let guest_cid = match cid.and_then(|c| c.attribute("address")) {
                        Some(a) if cid.and_then(|c| c.attribute("auto")) != Some("yes") => a
                            .parse::<u64>()
                            .ok()
                            .filter(|c| (3..u64::from(u32::MAX)).contains(c))
                            .ok_or_else(|| {
                                refuse(format!(
                                    "<cid address='{a}'>: CIDs 0 to 2 are reserved, use 3 or more"
                                ))
                            })?,
                        // Firecracker-style vsock: the host side is a Unix socket, so no
                        // host-wide unique CID is needed.
                        _ => 3,
                    };
                    vm.vsock = Some(vmm::config::VsockConfig {
                        guest_cid,
                        // Empty: the manager puts it in the domain's run folder.
                        uds_path: vsock_uds.clone().unwrap_or_default().into(),
                    });
                }
                "console"
                    if child(dev, "target").and_then(|t| t.attribute("type")) == Some("virtio") =>
                {
                    // hvc0; the manager gives it the domain's run folder at start.
                    vm.virtio_console = Some(vmm::SerialConfig::Null);
                }
                "memballoon" if dev.attribute("model") == Some("virtio") => {
                    vm.balloon = Some(vmm::config::BalloonConfig {
                        amount_mib: u32::try_from(balloon_mib)
                            .map_err(|_| bad("<currentMemory> leaves a balloon too large"))?,
                        deflate_on_oom: dev.attribute("autodeflate") == Some("on"),
                        stats_polling_interval_s: child(dev, "stats")
                            .and_then(|s| s.attribute("period"))
                            .and_then(|p| p.parse().ok())
                            .unwrap_or(0),
                    });
                }
                // Checked by the table and check_values: the UART, the implicit PCI
                // root, model='none' balloons, each driver's own binary.
                _ => {}
            }
        }
    }
    vm.disks = disks;
    vm.cloud_init = cloud_init;
    Ok(DomainDef {
        name,
        uuid,
        driver,
        autostart: false,
        title,
        description,
        emulator,
        vm,
        interfaces,
        volumes: Default::default(),
        chains: Default::default(),
        boot_files: Default::default(),
    })
}

fn parse_disk(n: Node) -> Result<DiskConfig> {
    let ty = n.attribute("type").unwrap_or("file");
    if ty != "file" && ty != "volume" {
        return Err(refuse(format!(
            "<disk type='{ty}'>: Vessel's disks are image files (type='file') or pool \
             volumes (type='volume')"
        )));
    }
    if let Some(d) = n.attribute("device").filter(|d| *d != "disk") {
        return Err(refuse(format!(
            "<disk device='{d}'>: Vessel's disks are virtio disks (attach a CD image as a \
             read-only disk)"
        )));
    }
    let src = child(n, "source");
    let source = if ty == "volume" {
        // A pool volume: resolved to its file when the domain is defined.
        let pool = src.and_then(|s| s.attribute("pool"));
        let vol = src.and_then(|s| s.attribute("volume"));
        match (pool, vol) {
            (Some(p), Some(v)) => format!("{}{p}/{v}", crate::domain::VOLUME_PREFIX),
            _ => return Err(bad("<disk type='volume'> without <source pool=… volume=…>")),
        }
    } else {
        src.and_then(|s| s.attribute("file"))
            .ok_or_else(|| bad("<disk> without <source file=…>"))?
            .to_string()
    };
    let format = match child(n, "driver").and_then(|d| d.attribute("type")) {
        None => None,
        Some("raw") => Some(DiskFormat::Raw),
        Some("qcow2") => Some(DiskFormat::Qcow2),
        Some(other) => {
            return Err(refuse(format!(
                "<driver type='{other}'>: Vessel's disk formats are raw and qcow2"
            )))
        }
    };
    // Disks appear to the guest in definition order (vda, vdb, …); <target dev> is not used.
    Ok(DiskConfig {
        path: source.into(),
        format,
        read_only: child(n, "readonly").is_some(),
        folder: None,
        fds: Vec::new(),
        transport: device_transport(n)?,
        rate_limiter: None,
        queues: None,
    })
}

fn parse_interface(n: Node) -> Result<Interface> {
    let src = child(n, "source");
    let mac = child(n, "mac")
        .and_then(|m| m.attribute("address"))
        .map(str::to_string);
    let transport = device_transport(n)?;
    match n.attribute("type") {
        Some("network") => Ok(Interface {
            network: Some(
                src.and_then(|s| s.attribute("network"))
                    .ok_or_else(|| bad("<interface type='network'> without <source network=…>"))?
                    .to_string(),
            ),
            bridge: None,
            mac,
            transport,
        }),
        Some("bridge") => Ok(Interface {
            network: None,
            bridge: Some(
                src.and_then(|s| s.attribute("bridge"))
                    .ok_or_else(|| bad("<interface type='bridge'> without <source bridge=…>"))?
                    .to_string(),
            ),
            mac,
            transport,
        }),
        other => Err(refuse(format!(
            "<interface type='{}'>: Vessel's interfaces are on a network (type='network') or \
             a host bridge (type='bridge')",
            other.unwrap_or("")
        ))),
    }
}

/// `s` escaped for XML text and attribute values (quoted either way).
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c => o.push(c),
        }
    }
    o
}

/// Writes a definition as libvirt domain XML.
/// What of `d` its libvirt XML cannot say (`vm.rng_rate_limiter`, `interfaces`, …):
/// the fields that differ once the dump is read back. A dump of such a domain is not
/// the whole of it, and `dumpxml` says so.
pub fn unsaid(d: &DomainDef) -> Vec<String> {
    let again = match parse_domain(&to_xml(d)) {
        Ok(a) => a,
        Err(e) => return vec![format!("(the dump does not read back: {e})")],
    };
    let (Ok(was), Ok(now)) = (serde_json::to_value(d), serde_json::to_value(&again)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let empty = serde_json::Map::new();
    let was_vm = was["vm"].as_object().unwrap_or(&empty);
    for (k, v) in was_vm {
        if now["vm"].get(k) != Some(v) {
            out.push(format!("vm.{k}"));
        }
    }
    for k in ["name", "uuid", "driver", "interfaces"] {
        if was.get(k) != now.get(k) {
            out.push(k.to_string());
        }
    }
    out
}

/// One device element, as `virsh attach-device`/`detach-device` take it: a `<disk>` or an
/// `<interface>`, checked against the same table and values as in a domain.
pub fn parse_device(xml: &str) -> Result<crate::manager::Device> {
    check_shape(xml)?;
    let doc = Document::parse_with_options(
        xml,
        roxmltree::ParsingOptions {
            allow_dtd: false,
            nodes_limit: 4 * MAX_ELEMENTS as u32,
        },
    )
    .map_err(|e| bad(e.to_string()))?;
    let root = doc.root_element().tag_name().name();
    if root != "disk" && root != "interface" {
        return Err(refuse(format!(
            "<{root}>: Vessel attaches and detaches <disk> and <interface> devices"
        )));
    }
    // The element in a domain of its own, so every check a domain's devices get applies.
    let body = &xml[doc.root_element().range()];
    let d = parse_domain(&format!(
        "<domain type='kvm'><name>device</name><memory unit='MiB'>1</memory>\
         <os><kernel>/k</kernel></os><devices>{body}</devices></domain>"
    ))?;
    Ok(
        match (
            d.vm.disks.into_iter().next(),
            d.interfaces.into_iter().next(),
        ) {
            (Some(disk), None) => crate::manager::Device::Disk(disk),
            (None, Some(itf)) => crate::manager::Device::Interface(itf),
            _ => return Err(bad("not one <disk> or <interface>")),
        },
    )
}

/// A device's own transport as libvirt writes it (none: the machine's).
fn address(t: Option<vmm::config::Transport>) -> &'static str {
    match t {
        None => "",
        Some(vmm::config::Transport::Pci) => "      <address type='pci'/>\n",
        Some(vmm::config::Transport::Mmio) => "      <address type='virtio-mmio'/>\n",
    }
}

pub fn to_xml(d: &DomainDef) -> String {
    // libvirt's schema knows kvm and qemu: a Vessel domain is kvm plus Vessel's metadata.
    // A riscv64 guest is emulated on this host: qemu (TCG) in libvirt's terms.
    let ty = match (d.driver, d.vm.accel) {
        _ if d.vm.arch == vmm::config::Arch::Riscv64 => "qemu",
        (DriverKind::Vessel, _) | (DriverKind::Qemu, Accel::Kvm) => "kvm",
        (DriverKind::Qemu, _) => "qemu",
    };
    let mut x = format!("<domain type='{ty}'>\n  <name>{}</name>\n", esc(&d.name));
    if let Some(u) = &d.uuid {
        x.push_str(&format!("  <uuid>{}</uuid>\n", esc(u)));
    }
    if let Some(t) = &d.title {
        x.push_str(&format!("  <title>{}</title>\n", esc(t)));
    }
    if let Some(t) = &d.description {
        x.push_str(&format!("  <description>{}</description>\n", esc(t)));
    }
    if d.driver == DriverKind::Vessel || d.vm.cloud_init.is_some() {
        let accel = serde_json::to_value(d.vm.accel)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| "auto".into());
        let uds = match &d.vm.vsock {
            Some(v) if !v.uds_path.as_os_str().is_empty() => {
                format!(" vsock_uds='{}'", esc(&v.uds_path.to_string_lossy()))
            }
            _ => String::new(),
        };
        let driver = match d.driver {
            DriverKind::Vessel => "vessel",
            DriverKind::Qemu => "qemu",
        };
        let head = format!(
            "  <metadata>\n    <vessel:domain xmlns:vessel='{VESSEL_NS}' driver='{driver}' \
             accel='{accel}'{uds}"
        );
        x.push_str(&head);
        match &d.vm.cloud_init {
            Some(ci) => {
                x.push_str(">\n      <vessel:cloud-init");
                let files = [
                    Some(&ci.user_data),
                    ci.meta_data.as_ref(),
                    ci.network_config.as_ref(),
                ];
                for (name, f) in CLOUD_INIT_ATTRS.iter().zip(files) {
                    if let Some(f) = f {
                        x.push_str(&format!(" {name}='{}'", esc(&f.to_string_lossy())));
                    }
                }
                x.push_str("/>\n    </vessel:domain>\n  </metadata>\n");
            }
            None => x.push_str("/>\n  </metadata>\n"),
        }
    }
    let kib = d.vm.memory_mib << 10;
    x.push_str(&format!("  <memory unit='KiB'>{kib}</memory>\n"));
    // The balloon's target is what currentMemory leaves out (libvirt's meaning).
    let ballooned =
        d.vm.balloon
            .as_ref()
            .map_or(0, |b| u64::from(b.amount_mib) << 10);
    x.push_str(&format!(
        "  <currentMemory unit='KiB'>{}</currentMemory>\n",
        kib.saturating_sub(ballooned)
    ));
    x.push_str(&format!(
        "  <vcpu placement='static'>{}</vcpu>\n",
        d.vm.cpus
    ));
    let topology = match d.vm.threads_per_core {
        2 => format!(
            "    <topology sockets='1' cores='{}' threads='2'/>\n",
            (d.vm.cpus / 2).max(1)
        ),
        _ => String::new(),
    };
    match d.vm.cpu_model {
        vmm::CpuModel::Max if topology.is_empty() => x.push_str("  <cpu mode='maximum'/>\n"),
        vmm::CpuModel::Max => x.push_str(&format!("  <cpu mode='maximum'>\n{topology}  </cpu>\n")),
        m => x.push_str(&format!(
            "  <cpu mode='custom' match='exact'>\n    <model fallback='forbid'>{m}</model>\n{topology}  </cpu>\n"
        )),
    }
    x.push_str(match (d.vm.arch, d.vm.virtio_transport) {
        (vmm::config::Arch::X86_64, vmm::config::Transport::Pci) => {
            "  <os>\n    <type arch='x86_64' machine='q35'>hvm</type>\n"
        }
        (vmm::config::Arch::X86_64, vmm::config::Transport::Mmio) => {
            "  <os>\n    <type arch='x86_64' machine='microvm'>hvm</type>\n"
        }
        (vmm::config::Arch::Riscv64, _) => {
            "  <os>\n    <type arch='riscv64' machine='virt'>hvm</type>\n"
        }
    });
    if let Some(k) = &d.vm.kernel {
        x.push_str(&format!(
            "    <kernel>{}</kernel>\n",
            esc(&k.to_string_lossy())
        ));
    }
    if let Some(f) = &d.vm.firmware {
        // UEFI code with its variable store, as libvirt writes it.
        let kind = if d.vm.firmware_vars.is_some() {
            " readonly='yes' type='pflash'"
        } else {
            ""
        };
        x.push_str(&format!(
            "    <loader{kind}>{}</loader>\n",
            esc(&f.to_string_lossy())
        ));
    }
    if let Some(v) = &d.vm.firmware_vars {
        x.push_str(&format!(
            "    <nvram>{}</nvram>\n",
            esc(&v.to_string_lossy())
        ));
    }
    if d.vm.kernel.is_none() {
        x.push_str("    <boot dev='hd'/>\n");
    }
    if let Some(i) = &d.vm.initrd {
        x.push_str(&format!(
            "    <initrd>{}</initrd>\n",
            esc(&i.to_string_lossy())
        ));
    }
    x.push_str(&format!(
        "    <cmdline>{}</cmdline>\n  </os>\n",
        esc(&d.vm.cmdline)
    ));
    // What every Vessel machine has and does, said as libvirt says it: an x86 machine
    // always has ACPI and APICs, its RTC follows UTC, power-off and crash stop it and a
    // reboot restarts it.
    if d.vm.arch == vmm::config::Arch::X86_64 {
        x.push_str("  <features>\n    <acpi/>\n    <apic/>\n  </features>\n");
        x.push_str("  <clock offset='utc'/>\n");
    }
    x.push_str(
        "  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  \
         <on_crash>destroy</on_crash>\n",
    );
    x.push_str("  <devices>\n");
    if let Some(e) = &d.emulator {
        x.push_str(&format!(
            "    <emulator>{}</emulator>\n",
            esc(&e.to_string_lossy())
        ));
    }
    for (i, disk) in d.vm.disks.iter().enumerate() {
        let volume = d
            .volumes
            .get(disk.path.to_string_lossy().as_ref())
            .and_then(|v| v.split_once('/'));
        x.push_str(&format!(
            "    <disk type='{}' device='disk'>\n",
            if volume.is_some() { "volume" } else { "file" }
        ));
        if let Some(f) = disk.format {
            let f = match f {
                DiskFormat::Raw => "raw",
                DiskFormat::Qcow2 => "qcow2",
            };
            x.push_str(&format!("      <driver name='qemu' type='{f}'/>\n"));
        }
        match volume {
            Some((pool, vol)) => x.push_str(&format!(
                "      <source pool='{}' volume='{}'/>\n",
                esc(pool),
                esc(vol)
            )),
            None => x.push_str(&format!(
                "      <source file='{}'/>\n",
                esc(&disk.path.to_string_lossy())
            )),
        }
        let dev = format!("vd{}", (b'a' + (i % 26) as u8) as char);
        x.push_str(&format!("      <target dev='{dev}' bus='virtio'/>\n"));
        if disk.read_only {
            x.push_str("      <readonly/>\n");
        }
        x.push_str(address(disk.transport));
        x.push_str("    </disk>\n");
    }
    for i in &d.interfaces {
        let (t, a, v) = match (&i.network, &i.bridge) {
            (Some(n), _) => ("network", "network", n),
            (None, Some(b)) => ("bridge", "bridge", b),
            (None, None) => continue,
        };
        x.push_str(&format!("    <interface type='{t}'>\n"));
        x.push_str(&format!("      <source {a}='{}'/>\n", esc(v)));
        if let Some(m) = &i.mac {
            x.push_str(&format!("      <mac address='{}'/>\n", esc(m)));
        }
        x.push_str("      <model type='virtio'/>\n");
        x.push_str(address(i.transport));
        x.push_str("    </interface>\n");
    }
    x.push_str("    <serial type='pty'>\n      <target port='0'/>\n    </serial>\n");
    x.push_str(
        "    <console type='pty'>\n      <target type='serial' port='0'/>\n    </console>\n",
    );
    if d.vm.virtio_console.is_some() {
        x.push_str(
            "    <console type='pty'>\n      <target type='virtio' port='0'/>\n    </console>\n",
        );
    }
    if let Some(v) = &d.vm.vsock {
        x.push_str(&format!(
            "    <vsock model='virtio'>\n      <cid auto='no' address='{}'/>\n    </vsock>\n",
            v.guest_cid
        ));
    }
    if d.vm.rng {
        x.push_str(
            "    <rng model='virtio'>\n      <backend model='random'>/dev/urandom</backend>\n    </rng>\n",
        );
    }
    // No USB, and no balloon unless there is one, said explicitly (libvirt would
    // otherwise add both); q35's PCI Express root.
    if d.vm.arch == vmm::config::Arch::X86_64 {
        if d.vm.virtio_transport == vmm::config::Transport::Pci {
            x.push_str("    <controller type='pci' index='0' model='pcie-root'/>\n");
        }
        x.push_str("    <controller type='usb' index='0' model='none'/>\n");
    }
    match &d.vm.balloon {
        Some(b) => {
            let deflate = if b.deflate_on_oom { "on" } else { "off" };
            match b.stats_polling_interval_s {
                0 => x.push_str(&format!(
                    "    <memballoon model='virtio' autodeflate='{deflate}'/>\n"
                )),
                p => x.push_str(&format!(
                    "    <memballoon model='virtio' autodeflate='{deflate}'>\n      \
                     <stats period='{p}'/>\n    </memballoon>\n"
                )),
            }
        }
        None if d.vm.arch == vmm::config::Arch::X86_64 => {
            x.push_str("    <memballoon model='none'/>\n")
        }
        None => {}
    }
    x.push_str("  </devices>\n</domain>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused_fast(xml: &str, what: &str) {
        let t0 = std::time::Instant::now();
        let e = parse_domain(xml).unwrap_err();
        assert!(matches!(e, Error::Invalid { .. }), "{e:?}");
        assert!(e.to_string().contains(what), "{e}");
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            t0.elapsed()
        );
    }

    #[test]
    fn deep_nesting_is_refused_without_recursion() {
        // 3,000 nested elements in 21 KB once overflowed the http-conn thread's stack.
        let n = 3000;
        let xml = format!("<domain>{}{}</domain>", "<a>".repeat(n), "</a>".repeat(n));
        assert!(xml.len() < 22_000);
        // On a small stack, as the connection threads have.
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || refused_fast(&xml, "nested deeper than 64"))
            .unwrap()
            .join()
            .unwrap();
        // The bound itself: 64 levels pass the shape check (and fail later for content).
        let ok = format!("{}{}", "<a>".repeat(MAX_DEPTH), "</a>".repeat(MAX_DEPTH));
        assert!(check_shape(&ok).is_ok());
        let deep = format!(
            "{}{}",
            "<a>".repeat(MAX_DEPTH + 1),
            "</a>".repeat(MAX_DEPTH + 1)
        );
        assert!(check_shape(&deep).is_err());
        // Self-closing and commented-out tags do not nest.
        let flat = format!(
            "<domain>{}<!--{}--></domain>",
            "<a/>".repeat(200),
            "<b>".repeat(200)
        );
        assert!(check_shape(&flat).is_ok());
    }

    #[test]
    fn many_attributes_are_refused_in_linear_time() {
        // 500,000 attributes once kept the daemon busy for minutes.
        let attrs: String = (0..500_000).map(|i| format!(" a{i}='x'")).collect();
        refused_fast(&format!("<domain{attrs}/>"), "more than 64 attributes");
        // Spread over many elements.
        let many: String = (0..9_000)
            .map(|i| format!("<e a='{i}' b='1' c='2'/>"))
            .collect();
        refused_fast(&format!("<domain>{many}</domain>"), "attributes");
        let elems = "<e/>".repeat(MAX_ELEMENTS + 1);
        refused_fast(&format!("<domain>{elems}</domain>"), "elements");
        // Quoted '=' and '>' are values, not attributes or tag ends.
        assert!(check_shape("<a b='x=y>z' c=\"=\"/>").is_ok());
    }

    const XML: &str = r#"<domain type='kvm'>
  <name>web</name>
  <uuid>8c0b7b34-1c0e-4c47-9a4a-7c1e0c7e5f11</uuid>
  <memory unit='GiB'>1</memory>
  <currentMemory unit='MiB'>512</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <cpu mode='custom' match='exact'><model fallback='forbid'>x86-64-v2</model></cpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <kernel>/boot/vmlinuz</kernel><initrd>/boot/initrd</initrd>
    <cmdline>console=ttyS0 &amp; quiet</cmdline></os>
  <features><acpi/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/var/lib/x.qcow2'/><target dev='vda' bus='virtio'/><readonly/></disk>
    <interface type='network'><mac address='52:54:00:00:00:01'/><source network='default'/></interface>
    <disk type='volume' device='disk'><source pool='images' volume='data.raw'/></disk>
    <interface type='bridge'><source bridge='br0'/></interface>
    <serial type='pty'/><console type='pty'/>
  </devices>
</domain>"#;

    #[test]
    fn parses_the_common_subset() {
        let d = parse_domain(XML).unwrap();
        assert_eq!(d.name, "web");
        assert_eq!(d.driver, DriverKind::Qemu);
        assert_eq!(d.vm.accel, Accel::Kvm);
        assert_eq!(d.vm.memory_mib, 512);
        assert_eq!(d.vm.cpus, 2);
        assert_eq!(d.vm.cpu_model, vmm::CpuModel::X86_64V2);
        assert_eq!(d.vm.cmdline, "console=ttyS0 & quiet");
        assert_eq!(
            d.vm.initrd.as_deref(),
            Some(std::path::Path::new("/boot/initrd"))
        );
        assert_eq!(d.vm.disks.len(), 2);
        assert_eq!(
            d.vm.disks[1].path,
            std::path::Path::new("vol://images/data.raw")
        );
        assert_eq!(d.vm.disks[0].format, Some(DiskFormat::Qcow2));
        assert!(d.vm.disks[0].read_only);
        assert_eq!(d.interfaces[0].network.as_deref(), Some("default"));
        assert_eq!(d.interfaces[1].bridge.as_deref(), Some("br0"));
        // Round trip through our own writer.
        let again = parse_domain(&to_xml(&d)).unwrap();
        assert_eq!(again, d);
    }

    #[test]
    fn cpu_modes_map_to_models() {
        let with = |cpu: &str| {
            let xml = format!(
                "<domain><name>a</name><memory>1024</memory>{cpu}<os><kernel>/k</kernel></os></domain>"
            );
            parse_domain(&xml).unwrap().vm.cpu_model
        };
        assert_eq!(with(""), vmm::CpuModel::Max);
        assert_eq!(with("<cpu mode='host-passthrough'/>"), vmm::CpuModel::Max);
        assert_eq!(with("<cpu mode='host-model'/>"), vmm::CpuModel::Max);
        assert_eq!(
            with("<cpu><model>qemu64</model></cpu>"),
            vmm::CpuModel::Qemu64
        );
        assert_eq!(
            with("<cpu mode='custom'><model>x86-64-v3</model></cpu>"),
            vmm::CpuModel::X86_64V3
        );
    }

    #[test]
    fn boot_dev_hd_without_a_kernel_boots_the_disk_through_seabios() {
        let xml = "<domain type='vessel'><name>img</name><memory unit='MiB'>1024</memory>
            <os><type arch='x86_64' machine='q35'>hvm</type><boot dev='hd'/></os>
            <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
            <source file='/var/lib/cloud.qcow2'/><target dev='vda' bus='virtio'/></disk>
            </devices></domain>";
        let d = parse_domain(xml).unwrap();
        assert_eq!(d.vm.kernel, None);
        assert_eq!(
            d.vm.firmware.as_deref(),
            Some(std::path::Path::new(vmm::config::DEFAULT_BIOS))
        );
        assert_eq!(d.vm.virtio_transport, vmm::config::Transport::Pci);
        // dumpxml says the same again.
        let again = parse_domain(&to_xml(&d)).unwrap();
        assert_eq!(again.vm, d.vm);
        assert!(to_xml(&d).contains("<boot dev='hd'/>"));
    }

    #[test]
    fn uefi_domains_name_ovmf_and_its_variable_store_as_libvirt_does() {
        // virt-install's form: the code on pflash, the store with its template.
        let xml = "<domain type='vessel'><name>efi</name><memory unit='MiB'>1024</memory>
            <os><type arch='x86_64' machine='q35'>hvm</type>
            <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
            <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/vessel/efi_VARS.fd</nvram>
            <boot dev='hd'/></os></domain>";
        let d = parse_domain(xml).unwrap();
        assert_eq!(
            d.vm.firmware.as_deref(),
            Some(std::path::Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd"))
        );
        assert_eq!(
            d.vm.firmware_vars.as_deref(),
            Some(std::path::Path::new("/var/lib/vessel/efi_VARS.fd"))
        );
        let out = to_xml(&d);
        assert!(
            out.contains("type='pflash'") && out.contains("<nvram>"),
            "{out}"
        );
        assert_eq!(parse_domain(&out).unwrap().vm, d.vm);
        // `<os firmware='efi'>` alone picks Debian's OVMF.
        let xml = "<domain type='vessel'><name>efi</name><memory unit='MiB'>1024</memory>
            <os firmware='efi'><type>hvm</type><boot dev='hd'/></os></domain>";
        let d = parse_domain(xml).unwrap();
        assert_eq!(
            d.vm.firmware.as_deref(),
            Some(std::path::Path::new(vmm::config::OVMF_CODE))
        );
        assert_eq!(d.vm.virtio_transport, vmm::config::Transport::Pci);
        let bad = "<domain type='vessel'><name>e</name><memory unit='MiB'>64</memory>
            <os firmware='coreboot'><type>hvm</type><boot dev='hd'/></os></domain>";
        assert!(parse_domain(bad).is_err());
    }

    #[test]
    fn rejects_malformed_and_unsupported() {
        let cases = [
            ("<domain", "domain XML"),
            ("<vm/>", "not <domain>"),
            ("<domain type='xen'><name>a</name></domain>", "xen"),
            ("<domain><memory>1</memory></domain>", "missing <name>"),
            ("<domain><name>a</name><memory unit='parsec'>1</memory><os><kernel>/k</kernel></os></domain>", "unit"),
            ("<domain><name>a</name><memory>x</memory></domain>", "not a number"),
            ("<domain><name>a</name><memory>99999999999999999999</memory></domain>", "not a number"),
            ("<domain><name>a</name><memory unit='TiB'>99999999</memory><os><kernel>/k</kernel></os></domain>", "out of range"),
            ("<domain><name>a</name><memory>1024</memory><vcpu>999</vcpu></domain>", "vcpu"),
            ("<domain><name>a</name><memory>1024</memory><os/></domain>", "kernel"),
            ("<domain><name>a</name><memory>1024</memory><cpu><model>Skylake</model></cpu><os><kernel>/k</kernel></os></domain>", "unknown CPU model"),
            ("<domain><name>a</name><memory>1024</memory><cpu mode='sideways'/><os><kernel>/k</kernel></os></domain>", "cpu mode"),
            ("<domain><name>a</name><memory>1024</memory><os><kernel>/k</kernel></os><devices><disk type='block'/></devices></domain>", "unsupported configuration: <disk type='block'>"),
            ("<domain><name>a</name><memory>1024</memory><os><kernel>/k</kernel></os><devices><interface type='user'/></devices></domain>", "unsupported configuration: <interface type='user'>"),
        ];
        for (xml, want) in cases {
            let e = parse_domain(xml).unwrap_err().to_string();
            assert!(e.contains(want), "{xml}: {e}");
        }
    }

    /// A domain around `devices` (and `extra` top-level elements), direct kernel boot.
    fn dom(extra: &str, devices: &str) -> String {
        format!(
            "<domain type='kvm'><name>t</name><memory unit='MiB'>256</memory>{extra}\
             <os><type arch='x86_64'>hvm</type><kernel>/k</kernel></os>\
             <devices>{devices}</devices></domain>"
        )
    }

    /// libvirt's riscv64 `virt` domain (type qemu: emulated) runs on Vessel's RISC-V
    /// CPU under the Vessel driver, and dumps back as the same architecture and machine.
    #[test]
    fn a_riscv64_virt_domain_is_vessels_and_keeps_its_arch() {
        let xml = dom(
            "",
            "<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>",
        )
        .replace("type='kvm'", "type='qemu'")
        .replace(
            "<type arch='x86_64'>",
            "<type arch='riscv64' machine='virt'>",
        );
        let d = parse_domain(&xml).unwrap();
        assert_eq!(d.vm.arch, vmm::config::Arch::Riscv64);
        assert_eq!((d.driver, d.vm.accel), (DriverKind::Vessel, Accel::Auto));
        assert!(d.vm.rng);
        let dump = to_xml(&d);
        assert!(
            dump.contains("<type arch='riscv64' machine='virt'>hvm</type>")
                && dump.starts_with("<domain type='qemu'>"),
            "{dump}"
        );
        let again = parse_domain(&dump).unwrap();
        assert_eq!(again.vm, d.vm, "{dump}");
        assert_eq!(again.driver, DriverKind::Vessel);
        // x86_64 stays as it was.
        let x86 = parse_domain(&dom("", "")).unwrap();
        assert_eq!(x86.vm.arch, vmm::config::Arch::X86_64);
        assert!(to_xml(&x86).contains("<type arch='x86_64' machine='q35'>hvm</type>"));
    }

    /// libvirt's element classes, each mapped (Ok) or refused with libvirt's wording and
    /// the element named (Err). Our own XML, in the shape of libvirt's test suite.
    #[test]
    fn every_element_is_mapped_or_refused_never_dropped() {
        let refused = [
            (dom("", "<hostdev mode='subsystem' type='pci'><source><address domain='0' bus='1' slot='0' function='0'/></source></hostdev>"), "<hostdev>"),
            (dom("", "<graphics type='vnc' port='-1'/>"), "<graphics>"),
            (dom("", "<video><model type='cirrus'/></video>"), "<video>"),
            (dom("", "<watchdog model='i6300esb' action='reset'/>"), "<watchdog>"),
            (dom("", "<input type='mouse' bus='ps2'/>"), "<input>"),
            (dom("", "<sound model='ich6'/>"), "<sound>"),
            (dom("", "<vsock model='vhost'><cid auto='yes'/></vsock>"), "model='vhost'"),
            (dom("", "<vsock model='virtio'><cid auto='no' address='2'/></vsock>"), "3 or more"),
            (dom("", "<memballoon model='virtio' freePageReporting='on'/>"), "freePageReporting='on'"),
            (dom("", "<memballoon model='xen'/>"), "model='xen'"),
            (dom("", "<controller type='usb' index='0'/>"), "<controller type='usb'"),
            (dom("", "<controller type='ide' index='0'/>"), "<controller type='ide'"),
            (dom("", "<panic model='isa'/>"), "<panic>"),
            (dom("", "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"), "<channel>"),
            (dom("<memoryBacking><hugepages/></memoryBacking>", ""), "<memoryBacking>"),
            (dom("<maxMemory slots='16' unit='KiB'>1524288</maxMemory>", ""), "<maxMemory>"),
            (dom("<numatune><memory mode='strict' nodeset='0'/></numatune>", ""), "<numatune>"),
            (dom("<cputune><shares>2048</shares></cputune>", ""), "<cputune>"),
            (dom("<launchSecurity type='sev'><policy>0x0003</policy></launchSecurity>", ""), "<launchSecurity>"),
            (dom("<vcpu>4</vcpu><cpu mode='host-model'><topology sockets='2' cores='2' threads='1'/></cpu>", ""), "one socket"),
            (dom("<vcpu>4</vcpu><cpu mode='host-model'><topology sockets='1' cores='1' threads='4'/></cpu>", ""), "threads='4'"),
            (dom("<cpu mode='custom'><model>qemu64</model><feature policy='require' name='ssse3'/></cpu>", ""), "<feature>"),
            (dom("<vcpu current='1'>2</vcpu>", ""), "current='1'"),
            (dom("<vcpu placement='auto'>2</vcpu>", ""), "placement='auto'"),
            (dom("<vcpu cpuset='1-2'>2</vcpu>", ""), "cpuset"),
            (dom("<clock offset='localtime'/>", ""), "offset='localtime'"),
            (dom("<clock offset='utc'><timer name='rtc' tickpolicy='catchup'/></clock>", ""), "<timer>"),
            (dom("<on_reboot>destroy</on_reboot>", ""), "<on_reboot>destroy"),
            (dom("<features><hyperv><relaxed state='on'/></hyperv></features>", ""), "<hyperv>"),
            (dom("<seclabel type='dynamic' model='selinux'/>", ""), "<seclabel>"),
            (dom("", "<disk type='file' device='disk'><source file='/d'/><target dev='hda' bus='ide'/></disk>"), "bus='ide'"),
            (dom("", "<disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/><source file='/d'/></disk>"), "cache='none'"),
            (dom("", "<disk type='file' device='disk' snapshot='no'><source file='/d'/></disk>"), "snapshot='no'"),
            (dom("", "<disk type='file' device='disk'><source file='/d'/><address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/></disk>"), "function='0x0'>: Vessel assigns device addresses itself"),
            (dom("", "<disk type='file' device='disk'><source file='/d'/><address type='ccw'/></disk>"), "<address type='ccw'>"),
            (dom("", "<interface type='network'><source network='default'/><address type='virtio-mmio' bus='1'/></interface>"), "bus='1'"),
            (dom("", "<rng model='virtio'><backend model='random'>/dev/urandom</backend><address type='pci'/></rng>"), "<address> (domain/devices/rng/address)"),
            (dom("", "").replace("<type arch='x86_64'>", "<type arch='x86_64' machine='pc'>"), "<type machine='pc'>: Vessel's x86_64 machines are q35"),
            (dom("", "").replace("<type arch='x86_64'>", "<type arch='x86_64' machine='pc-i440fx-7.2'>"), "machine='pc-i440fx-7.2'"),
            (dom("", "").replace("<type arch='x86_64'>", "<type arch='x86_64' machine='isapc'>"), "machine='isapc'"),
            (dom("", "<disk type='file' device='disk'><source file='/d'/><serial>WD-1</serial></disk>"), "<serial>"),
            (dom("", "<interface type='network'><source network='default'/><model type='e1000'/></interface>"), "type='e1000'"),
            (dom("", "<interface type='network'><source network='default'/><vlan><tag id='42'/></vlan></interface>"), "<vlan>"),
            (dom("", "<interface type='bridge'><source bridge='br0'/><virtualport type='openvswitch'/></interface>"), "<virtualport>"),
            (dom("", "<interface type='network'><source network='default'/><port isolated='yes'/></interface>"), "<port>"),
            (dom("", "<interface type='network'><source network='default'/><target dev='vnet7'/></interface>"), "<target>"),
            (dom("", "<rng model='virtio'><backend model='egd' type='tcp'/></rng>"), "<backend"),
            (dom("", "<serial type='file'><source path='/tmp/s'/></serial>"), "type='file'"),
            (dom("<memory dumpCore='off' unit='MiB'>256</memory>", "").replace("<memory unit='MiB'>256</memory>", ""), "dumpCore"),
            (dom("", "").replace("<type arch='x86_64'>", "<type arch='aarch64' machine='virt'>"), "architecture 'aarch64'"),
            (dom("", "").replace("<type arch='x86_64'>", "<type arch='i686'>"), "architecture 'i686'"),
            (dom("", "").replace("<type arch='x86_64'>", "<type arch='riscv64' machine='sifive_u'>"), "machine='sifive_u'"),
            (dom("", "").replace("<type arch='x86_64'>", "<type arch='riscv64' machine='virt'>"), "no riscv64 KVM"),
            (dom("", "").replace("<kernel>/k</kernel>", "<kernel>/k</kernel><boot dev='network'/>"), "dev='network'"),
        ];
        for (xml, want) in &refused {
            let e = parse_domain(xml).unwrap_err().to_string();
            assert!(e.contains("unsupported configuration"), "{xml}: {e}");
            assert!(e.contains(want), "{xml}: {e}");
            // Never Rust debug text.
            assert!(!e.contains("Some("), "{e}");
        }
        // Mapped: each changes the definition, or is what Vessel always does.
        let d = parse_domain(&dom(
            "<title>t</title><description>d</description><vcpu placement='static' current='2'>2</vcpu>\
             <features><acpi/><apic/><pae/></features><clock offset='utc'/>\
             <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>\
             <metadata><app:thing xmlns:app='urn:example'><deep attr='1'/></app:thing></metadata>",
            "<emulator>/usr/bin/qemu-system-x86_64</emulator>\
             <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>\
             <console type='pty'><target type='virtio' port='0'/></console>\
             <memballoon model='none'/><controller type='usb' index='0' model='none'/>\
             <controller type='pci' index='0' model='pcie-root'/>\
             <serial type='pty'><target type='isa-serial' port='0'><model name='isa-serial'/></target></serial>",
        ))
        .unwrap();
        assert!(d.vm.rng, "<rng> is virtio-rng");
        // vsock: the CID given (or 3), the host socket left to the manager's run folder.
        let v = parse_domain(&dom(
            "",
            "<vsock model='virtio'><cid auto='no' address='7'/></vsock>",
        ))
        .unwrap()
        .vm
        .vsock
        .unwrap();
        assert_eq!((v.guest_cid, v.uds_path.as_os_str().is_empty()), (7, true));
        let v = parse_domain(&dom("", "<vsock model='virtio'><cid auto='yes'/></vsock>"))
            .unwrap()
            .vm
            .vsock
            .unwrap();
        assert_eq!(v.guest_cid, 3);
        assert!(d.vm.virtio_console.is_some(), "a virtio <console> is hvc0");
        assert_eq!(d.vm.cpus, 2);
        // Each table entry names what it maps to.
        for r in crate::xml_support::MAPPED {
            assert!(!r.maps_to.is_empty(), "{}", r.path);
        }
    }

    #[test]
    fn vessel_metadata_selects_the_driver_and_dumps_say_kvm() {
        let xml = format!(
            "<domain type='kvm'><name>v</name><memory unit='MiB'>256</memory>\
             <metadata><vessel:domain xmlns:vessel='{VESSEL_NS}' driver='vessel' accel='emu'/></metadata>\
             <os><kernel>/k</kernel></os></domain>"
        );
        let d = parse_domain(&xml).unwrap();
        assert_eq!((d.driver, d.vm.accel), (DriverKind::Vessel, Accel::Emu));
        let dump = to_xml(&d);
        assert!(dump.starts_with("<domain type='kvm'>"), "{dump}");
        assert!(
            dump.contains("driver='vessel'") && dump.contains("accel='emu'"),
            "{dump}"
        );
        // Without the metadata, kvm is QEMU with KVM, as in libvirt.
        let plain = xml.replace(
            &xml[xml.find("<metadata>").unwrap()..xml.find("<os>").unwrap()],
            "",
        );
        let q = parse_domain(&plain).unwrap();
        assert_eq!((q.driver, q.vm.accel), (DriverKind::Qemu, Accel::Kvm));
        // The old spelling is still read.
        let old = plain.replace("type='kvm'", "type='vessel'");
        assert_eq!(parse_domain(&old).unwrap().driver, DriverKind::Vessel);
    }

    #[test]
    fn cloud_init_rides_in_vessel_metadata_on_both_drivers() {
        for driver in ["vessel", "qemu"] {
            let xml = format!(
                "<domain type='qemu'><name>web-1</name><memory unit='MiB'>1024</memory>\
                 <metadata><vessel:domain xmlns:vessel='{VESSEL_NS}' driver='{driver}' accel='emu'>\
                 <vessel:cloud-init user-data='/srv/ud.yaml' network-config='/srv/net &amp; co.yaml'/>\
                 </vessel:domain></metadata>\
                 <os><type>hvm</type><boot dev='hd'/></os></domain>"
            );
            let d = parse_domain(&xml).unwrap();
            let ci = d.vm.cloud_init.clone().expect("cloud_init");
            assert_eq!(ci.user_data, PathBuf::from("/srv/ud.yaml"));
            assert_eq!(ci.meta_data, None);
            assert_eq!(ci.network_config, Some("/srv/net & co.yaml".into()));
            // A dump says the same, and reads back the same.
            let dump = to_xml(&d);
            assert!(
                dump.contains("<vessel:cloud-init user-data='/srv/ud.yaml'"),
                "{dump}"
            );
            let again = parse_domain(&dump).unwrap();
            assert_eq!(again.vm.cloud_init, d.vm.cloud_init, "{dump}");
            assert_eq!(again.driver, d.driver, "{dump}");
        }
        let base = |inner: &str| {
            format!(
                "<domain type='kvm'><name>v</name><memory unit='MiB'>256</memory>\
                 <metadata><vessel:domain xmlns:vessel='{VESSEL_NS}'>{inner}</vessel:domain>\
                 </metadata><os><kernel>/k</kernel></os></domain>"
            )
        };
        for (inner, why) in [
            ("<vessel:cloud-init meta-data='/m'/>", "needs user-data"),
            (
                "<vessel:cloud-init user-data='/u' vendor-data='/v'/>",
                "vendor-data",
            ),
            (
                "<vessel:cloud-init user-data='/u'/><vessel:cloud-init user-data='/u'/>",
                "more than one",
            ),
            ("<vessel:seed user-data='/u'/>", "<seed>"),
        ] {
            let e = parse_domain(&base(inner)).unwrap_err().to_string();
            assert!(e.contains(why), "{inner}: {e}");
        }
    }

    /// Issue 16: a libvirt user's machine and device addresses say which virtio
    /// transport the guest gets (q35: PCI; microvm: virtio-mmio), and a dump says it
    /// again, so define -> dumpxml -> define keeps it.
    #[test]
    fn machine_and_address_choose_the_virtio_transport_and_dump_back() {
        use vmm::config::Transport::{Mmio, Pci};
        let vessel = |machine: &str, devices: &str| {
            let xml = dom("", devices)
                .replace(
                    "<type arch='x86_64'>",
                    &format!("<type arch='x86_64'{machine}>"),
                )
                .replace(
                    "<os>",
                    &format!(
                        "<metadata><vessel:domain xmlns:vessel='{VESSEL_NS}' driver='vessel'/>\
                         </metadata><os>"
                    ),
                );
            parse_domain(&xml).unwrap()
        };
        // Vessel: q35 is virtio-pci even for a direct kernel boot; microvm and no machine
        // are virtio-mmio (Vessel's default for a kernel).
        assert_eq!(vessel(" machine='q35'", "").vm.virtio_transport, Pci);
        assert_eq!(vessel(" machine='pc-q35-7.2'", "").vm.virtio_transport, Pci);
        assert_eq!(vessel(" machine='microvm'", "").vm.virtio_transport, Mmio);
        assert_eq!(vessel("", "").vm.virtio_transport, Mmio);
        // A QEMU domain without a machine is q35, as QEMU runs it.
        assert_eq!(parse_domain(&dom("", "")).unwrap().vm.virtio_transport, Pci);
        // A device's own <address type=…/> is its transport.
        let d = vessel(
            " machine='microvm'",
            "<disk type='file' device='disk'><source file='/a'/><address type='pci'/></disk>\
             <disk type='file' device='disk'><source file='/b'/></disk>\
             <disk type='file' device='disk'><source file='/c'/><address type='virtio-mmio'/></disk>\
             <interface type='bridge'><source bridge='br0'/><address type='pci'/></interface>",
        );
        let t: Vec<_> = d.vm.disks.iter().map(|d| d.transport).collect();
        assert_eq!(t, [Some(Pci), None, Some(Mmio)]);
        assert_eq!(d.interfaces[0].transport, Some(Pci));
        let dump = to_xml(&d);
        assert!(dump.contains("machine='microvm'"), "{dump}");
        assert_eq!(dump.matches("<address type='pci'/>").count(), 2, "{dump}");
        assert_eq!(dump.matches("<address type='virtio-mmio'/>").count(), 1);
        assert_eq!(parse_domain(&dump).unwrap(), d);
        // A JSON-defined Vessel domain on virtio-pci with a kernel dumps as q35 and
        // comes back as virtio-pci (the dump used to say no machine: mmio on define).
        let mut pci = vessel("", "");
        pci.vm.virtio_transport = Pci;
        assert_eq!(parse_domain(&to_xml(&pci)).unwrap(), pci);
    }

    /// `<memballoon model='virtio'>` is the VMM's balloon: its target is what
    /// currentMemory leaves out of memory, autodeflate is deflate_on_oom, stats period
    /// the polling interval; a dump says the same.
    #[test]
    fn a_virtio_memballoon_is_the_balloon_and_dumps_back() {
        let xml = dom(
            "",
            "<memballoon model='virtio' autodeflate='on'><stats period='5'/></memballoon>",
        )
        .replace(
            "<memory unit='MiB'>256</memory>",
            "<memory unit='MiB'>256</memory><currentMemory unit='MiB'>192</currentMemory>",
        );
        assert!(xml.contains("currentMemory"), "{xml}");
        let d = parse_domain(&xml).unwrap();
        assert_eq!(d.vm.memory_mib, 256);
        assert_eq!(
            d.vm.balloon,
            Some(vmm::config::BalloonConfig {
                amount_mib: 64,
                deflate_on_oom: true,
                stats_polling_interval_s: 5
            })
        );
        let dump = to_xml(&d);
        assert!(
            dump.contains("<currentMemory unit='KiB'>196608</currentMemory>"),
            "{dump}"
        );
        assert!(
            dump.contains("<memballoon model='virtio' autodeflate='on'>"),
            "{dump}"
        );
        assert!(dump.contains("<stats period='5'/>"), "{dump}");
        assert_eq!(parse_domain(&dump).unwrap(), d);
        // Without a balloon, the smaller of memory and currentMemory is the memory, and
        // the dump says model='none'.
        let none = parse_domain(&xml.replace(
            "<memballoon model='virtio' autodeflate='on'><stats period='5'/></memballoon>",
            "<memballoon model='none'/>",
        ))
        .unwrap();
        assert_eq!((none.vm.memory_mib, none.vm.balloon.clone()), (192, None));
        assert!(to_xml(&none).contains("<memballoon model='none'/>"));
    }

    /// A domain as virt-install writes one (our own text in that shape): every refusal
    /// comes in one answer, each element named once, rather than one define per element.
    #[test]
    fn every_refusal_of_a_definition_comes_at_once() {
        let xml = dom(
            "<features><acpi/><vmport state='off'/></features>\
             <clock offset='utc'><timer name='hpet' present='no'/></clock>\
             <pm><suspend-to-mem enabled='no'/></pm>",
            "<disk type='file' device='disk'><driver name='qemu' type='raw' discard='unmap'/>\
             <source file='/d'/><target dev='vda' bus='virtio'/>\
             <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/></disk>\
             <controller type='pci' index='1' model='pcie-root-port'><target chassis='1'/></controller>\
             <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
             <graphics type='spice' autoport='yes'/>\
             <memballoon model='virtio' freePageReporting='on'/>",
        );
        let e = parse_domain(&xml).unwrap_err().to_string();
        assert_eq!(e.matches("unsupported configuration").count(), 1, "{e}");
        for want in [
            "<vmport>",
            "<timer>",
            "<pm>",
            "discard='unmap'",
            "slot='0x00' function='0x0'>: Vessel assigns device addresses itself",
            "<controller type='pci' model='pcie-root-port'>",
            "<channel>",
            "<graphics>",
            "memballoon freePageReporting='on'",
        ] {
            assert!(e.contains(want), "{want}: {e}");
        }
        // A controller's <target> is not an interface's: no word about TAP names.
        assert!(!e.contains("TAP"), "{e}");
        // The <address> is named once: by its value check, not again by the table.
        assert!(!e.contains("(domain/devices/disk/address)"), "{e}");
        // In document order.
        assert!(e.find("<vmport>") < e.find("<graphics>"), "{e}");
    }

    /// A dump names what it cannot say (dumpxml warns), and nothing for a domain it says
    /// whole.
    #[test]
    fn unsaid_names_what_a_dump_would_lose() {
        for d in domains_to_dump() {
            assert_eq!(unsaid(&d), Vec::<String>::new(), "{}", to_xml(&d));
        }
        let mut d = parse_domain(XML).unwrap();
        d.vm.rng_rate_limiter =
            serde_json::from_value(serde_json::json!({"ops": {"size": 1, "refill_time": 100}}))
                .unwrap();
        d.vm.option_roms = vec!["/rom".into()];
        assert_eq!(unsaid(&d), ["vm.option_roms", "vm.rng_rate_limiter"]);
    }

    /// virsh attach-device's XML: one disk or interface, checked as in a domain.
    #[test]
    fn a_device_element_parses_as_in_a_domain() {
        use crate::manager::Device;
        let d = parse_device(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='/var/lib/d.qcow2'/><target dev='vdb' bus='virtio'/><readonly/></disk>",
        )
        .unwrap();
        let Device::Disk(d) = d else { panic!("{d:?}") };
        assert_eq!(
            (d.path.to_str(), d.format, d.read_only),
            (Some("/var/lib/d.qcow2"), Some(DiskFormat::Qcow2), true)
        );
        let i = parse_device(
            "<interface type='network'><mac address='52:54:00:00:00:09'/>\
             <source network='default'/><model type='virtio'/></interface>",
        )
        .unwrap();
        let Device::Interface(i) = i else {
            panic!("{i:?}")
        };
        assert_eq!(i.mac.as_deref(), Some("52:54:00:00:00:09"));
        for (xml, want) in [
            ("<hostdev mode='subsystem' type='pci'/>", "<hostdev>"),
            (
                "<disk type='file'><source file='/d'/><iotune/></disk>",
                "<iotune>",
            ),
            ("<interface type='user'/>", "type='user'"),
            (
                "<disk type='file'><source file='/d'/></disk><disk/>",
                "domain XML",
            ),
        ] {
            let e = parse_device(xml).unwrap_err().to_string();
            assert!(e.contains(want), "{xml}: {e}");
        }
    }

    fn domains_to_dump() -> Vec<DomainDef> {
        let mut v = parse_domain(XML).unwrap();
        v.vm.disks[1].path = "/var/lib/vessel/images/data.raw".into();
        let mut vessel = v.clone();
        vessel.driver = DriverKind::Vessel;
        vessel.vm.accel = Accel::Auto;
        vessel.vm.rng = true;
        vessel.vm.threads_per_core = 2;
        vessel.vm.virtio_console = Some(vmm::SerialConfig::Null);
        vessel.vm.vsock = Some(vmm::config::VsockConfig {
            guest_cid: 9,
            uds_path: "/run/vessel/web.vsock".into(),
        });
        // Vessel's virtio-mmio machine, one disk and one interface on PCI.
        vessel.vm.virtio_transport = vmm::config::Transport::Mmio;
        vessel.vm.disks[0].transport = Some(vmm::config::Transport::Pci);
        vessel.interfaces[0].transport = Some(vmm::config::Transport::Pci);
        vessel.interfaces[1].transport = Some(vmm::config::Transport::Mmio);
        let mut tcg = v.clone();
        tcg.vm.accel = Accel::Emu;
        let fw = parse_domain(
            "<domain type='qemu'><name>img</name><memory unit='MiB'>1024</memory>
            <os><type arch='x86_64' machine='q35'>hvm</type><boot dev='hd'/></os>
            <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
            <source file='/var/lib/cloud.qcow2'/><target dev='vda' bus='virtio'/></disk>
            </devices></domain>",
        )
        .unwrap();
        // What libvirt keeps as given: a title, a description, the emulator.
        let mut described = v.clone();
        described.title = Some("Web server".into());
        described.description = Some("the <front> & back".into());
        described.emulator = Some("/usr/bin/qemu-system-x86_64".into());
        vec![v, vessel, tcg, fw, described]
    }

    /// What a libvirt domain says that Vessel keeps or always does comes back in the
    /// dump: nothing accepted is dropped between define and dumpxml.
    #[test]
    fn a_dump_says_everything_its_definition_said() {
        let xml = dom(
            "<title>Web</title><description>front end</description>\
             <vcpu placement='static'>1</vcpu><features><acpi/><apic/></features>\
             <clock offset='utc'/><on_poweroff>destroy</on_poweroff>\
             <on_reboot>restart</on_reboot><on_crash>destroy</on_crash>",
            "<emulator>/usr/bin/qemu-system-x86_64</emulator>\
             <controller type='usb' index='0' model='none'/><memballoon model='none'/>\
             <controller type='pci' index='0' model='pcie-root'/>",
        );
        let d = parse_domain(&xml).unwrap();
        let dump = to_xml(&d);
        for said in [
            "<title>Web</title>",
            "<description>front end</description>",
            "<vcpu placement='static'>1</vcpu>",
            "<acpi/>",
            "<apic/>",
            "<clock offset='utc'/>",
            "<on_poweroff>destroy</on_poweroff>",
            "<on_reboot>restart</on_reboot>",
            "<on_crash>destroy</on_crash>",
            "<emulator>/usr/bin/qemu-system-x86_64</emulator>",
            "<controller type='usb' index='0' model='none'/>",
            "<controller type='pci' index='0' model='pcie-root'/>",
            "<memballoon model='none'/>",
        ] {
            assert!(dump.contains(said), "{said} missing from\n{dump}");
        }
        assert_eq!(parse_domain(&dump).unwrap(), d);
    }

    /// Memory in libvirt's units that is not a whole MiB used to be cut down to one in
    /// silence (219100 KiB ran as 218112 KiB): it is refused, naming the sizes that fit.
    #[test]
    fn memory_that_is_not_whole_mib_is_refused_with_the_sizes_that_are() {
        let xml = dom("", "").replace(
            "<memory unit='MiB'>256</memory>",
            "<memory unit='KiB'>219100</memory>",
        );
        let e = parse_domain(&xml).unwrap_err().to_string();
        assert!(
            e.contains("unsupported configuration: <memory unit='KiB'>219100</memory>")
                && e.contains("218112 or 219136 KiB"),
            "{e}"
        );
        let xml = dom("", "").replace(
            "<memory unit='MiB'>256</memory>",
            "<memory unit='KiB'>219136</memory><currentMemory>219100</currentMemory>",
        );
        let e = parse_domain(&xml).unwrap_err().to_string();
        assert!(e.contains("<currentMemory unit='KiB'>219100"), "{e}");
        let xml = dom("", "").replace(
            "<memory unit='MiB'>256</memory>",
            "<memory unit='KiB'>219136</memory>",
        );
        assert_eq!(parse_domain(&xml).unwrap().vm.memory_mib, 214);
    }

    #[test]
    fn dumpxml_define_dumpxml_is_identical() {
        for d in domains_to_dump() {
            let first = to_xml(&d);
            let again = parse_domain(&first).unwrap();
            assert_eq!(again, d, "{first}");
            assert_eq!(to_xml(&again), first);
        }
    }

    /// libvirt's own schema accepts every dump (virt-xml-validate from Debian's
    /// libvirt-clients, which scripts/test.sh installs).
    #[test]
    fn dumps_pass_virt_xml_validate() {
        let dir = std::env::temp_dir().join(format!("vessel-xmlv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A disk from a pool volume dumps as <disk type='volume'>.
        let mut with_volume = parse_domain(XML).unwrap();
        let file = "/var/lib/vessel/images/data.raw";
        with_volume.vm.disks[1].path = file.into();
        with_volume
            .volumes
            .insert(file.into(), "images/data.raw".into());
        let dump = to_xml(&with_volume);
        assert!(
            dump.contains("<source pool='images' volume='data.raw'/>"),
            "{dump}"
        );
        let mut all = domains_to_dump();
        all.push(with_volume);
        for (i, d) in all.iter().enumerate() {
            let f = dir.join(format!("d{i}.xml"));
            std::fs::write(&f, to_xml(d)).unwrap();
            let out = std::process::Command::new("virt-xml-validate")
                .arg(&f)
                .arg("domain")
                .output()
                .expect("virt-xml-validate (apt-get install libvirt-clients)");
            assert!(
                out.status.success(),
                "{}\n{}{}",
                to_xml(d),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
