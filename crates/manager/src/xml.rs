//! libvirt domain XML, the common subset: name, uuid, memory/currentMemory with units, vcpu,
//! os/kernel/initrd/cmdline, file disks, network/bridge interfaces, serial/console. Parsed
//! with roxmltree into a [`DomainDef`]; written back by [`to_xml`] (`vessel dumpxml`).
//!
//! `<domain type='…'>`: `vessel` runs on Vessel's VMM; `qemu` (software CPU, TCG) and `kvm`
//! on QEMU with that accelerator. Elements outside the subset are ignored with a log line, as
//! libvirt ignores what a driver does not use; malformed values in the subset are errors.

use std::path::PathBuf;

use roxmltree::{Document, Node};
use vmm::{Accel, VmConfig};

use vmm::config::{DiskConfig, DiskFormat};

use crate::domain::{DomainDef, DriverKind, Interface};
use crate::error::{Error, Result};

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

fn bad(why: impl Into<String>) -> Error {
    Error::invalid("domain XML", why)
}

/// libvirt's memory units, to bytes.
fn unit_bytes(unit: &str) -> Result<u64> {
    Ok(match unit {
        "b" | "bytes" => 1,
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
    let (driver, accel) = match root.attribute("type").unwrap_or("qemu") {
        "vessel" => (DriverKind::Vessel, Accel::Auto),
        "qemu" => (DriverKind::Qemu, Accel::Emu),
        "kvm" => (DriverKind::Qemu, Accel::Kvm),
        other => return Err(bad(format!("domain type {other:?} (vessel, qemu or kvm)"))),
    };
    let name = child(root, "name")
        .map(text)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad("missing <name>"))?;
    let uuid = child(root, "uuid").map(text).filter(|s| !s.is_empty());
    let memory = match (child(root, "memory"), child(root, "currentMemory")) {
        (Some(m), Some(c)) => memory_mib(m)?.min(memory_mib(c)?),
        (Some(m), None) => memory_mib(m)?,
        (None, Some(c)) => memory_mib(c)?,
        (None, None) => return Err(bad("missing <memory>")),
    };
    let cpus = match child(root, "vcpu") {
        Some(v) => text(v)
            .parse::<u8>()
            .map_err(|_| bad(format!("<vcpu> {:?} is not a CPU count (1-254)", text(v))))?,
        None => 1,
    };
    let os = child(root, "os").ok_or_else(|| bad("missing <os>"))?;
    let kernel = child(os, "kernel").map(text).filter(|s| !s.is_empty());
    let loader = child(os, "loader")
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
    if let Some(c) = child(os, "cmdline") {
        vm.cmdline = text(c);
    }
    vm.memory_mib = memory;
    vm.cpus = cpus;
    if let Some(c) = child(root, "cpu") {
        vm.cpu_model = cpu_model(c)?;
    }
    vm.accel = accel;
    vm.serial = vmm::SerialConfig::Null;

    let mut disks = Vec::new();
    let mut interfaces = Vec::new();
    if let Some(devices) = child(root, "devices") {
        for dev in devices.children().filter(|n| n.is_element()) {
            match dev.tag_name().name() {
                "disk" => disks.push(parse_disk(dev)?),
                "interface" => interfaces.push(parse_interface(dev)?),
                "serial" | "console" | "emulator" => {}
                other => tracing::info!("domain XML: ignoring <{other}>"),
            }
        }
    }
    vm.disks = disks;
    Ok(DomainDef {
        name,
        uuid,
        driver,
        autostart: false,
        vm,
        interfaces,
    })
}

fn parse_disk(n: Node) -> Result<DiskConfig> {
    let ty = n.attribute("type").unwrap_or("file");
    if ty != "file" && ty != "volume" {
        return Err(bad(format!("<disk type={ty:?}>: file or volume disks")));
    }
    if let Some(d) = n.attribute("device") {
        if d != "disk" && d != "cdrom" {
            return Err(bad(format!("<disk device={d:?}>: disk or cdrom")));
        }
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
        Some(other) => return Err(bad(format!("disk format {other:?} (raw or qcow2)"))),
    };
    // Disks appear to the guest in definition order (vda, vdb, …); <target dev> is not used.
    Ok(DiskConfig {
        path: source.into(),
        format,
        read_only: child(n, "readonly").is_some(),
        transport: None,
    })
}

fn parse_interface(n: Node) -> Result<Interface> {
    let src = child(n, "source");
    let mac = child(n, "mac")
        .and_then(|m| m.attribute("address"))
        .map(str::to_string);
    match n.attribute("type") {
        Some("network") => Ok(Interface {
            network: Some(
                src.and_then(|s| s.attribute("network"))
                    .ok_or_else(|| bad("<interface type='network'> without <source network=…>"))?
                    .to_string(),
            ),
            bridge: None,
            mac,
        }),
        Some("bridge") => Ok(Interface {
            network: None,
            bridge: Some(
                src.and_then(|s| s.attribute("bridge"))
                    .ok_or_else(|| bad("<interface type='bridge'> without <source bridge=…>"))?
                    .to_string(),
            ),
            mac,
        }),
        other => Err(bad(format!(
            "<interface type={other:?}>: network or bridge"
        ))),
    }
}

fn esc(s: &str) -> String {
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
pub fn to_xml(d: &DomainDef) -> String {
    let ty = match (d.driver, d.vm.accel) {
        (DriverKind::Vessel, _) => "vessel",
        (DriverKind::Qemu, Accel::Kvm) => "kvm",
        (DriverKind::Qemu, _) => "qemu",
    };
    let mut x = format!("<domain type='{ty}'>\n  <name>{}</name>\n", esc(&d.name));
    if let Some(u) = &d.uuid {
        x.push_str(&format!("  <uuid>{}</uuid>\n", esc(u)));
    }
    let kib = d.vm.memory_mib << 10;
    x.push_str(&format!("  <memory unit='KiB'>{kib}</memory>\n"));
    x.push_str(&format!(
        "  <currentMemory unit='KiB'>{kib}</currentMemory>\n"
    ));
    x.push_str(&format!("  <vcpu>{}</vcpu>\n", d.vm.cpus));
    match d.vm.cpu_model {
        vmm::CpuModel::Max => x.push_str("  <cpu mode='maximum'/>\n"),
        m => x.push_str(&format!(
            "  <cpu mode='custom' match='exact'>\n    <model fallback='forbid'>{m}</model>\n  </cpu>\n"
        )),
    }
    x.push_str("  <os>\n    <type arch='x86_64'>hvm</type>\n");
    if let Some(k) = &d.vm.kernel {
        x.push_str(&format!(
            "    <kernel>{}</kernel>\n",
            esc(&k.to_string_lossy())
        ));
    }
    if let Some(f) = &d.vm.firmware {
        x.push_str(&format!(
            "    <loader>{}</loader>\n",
            esc(&f.to_string_lossy())
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
    x.push_str("  <devices>\n");
    for (i, disk) in d.vm.disks.iter().enumerate() {
        x.push_str("    <disk type='file' device='disk'>\n");
        if let Some(f) = disk.format {
            let f = match f {
                DiskFormat::Raw => "raw",
                DiskFormat::Qcow2 => "qcow2",
            };
            x.push_str(&format!("      <driver name='qemu' type='{f}'/>\n"));
        }
        x.push_str(&format!(
            "      <source file='{}'/>\n",
            esc(&disk.path.to_string_lossy())
        ));
        let dev = format!("vd{}", (b'a' + (i % 26) as u8) as char);
        x.push_str(&format!("      <target dev='{dev}' bus='virtio'/>\n"));
        if disk.read_only {
            x.push_str("      <readonly/>\n");
        }
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
        x.push_str("      <model type='virtio'/>\n    </interface>\n");
    }
    x.push_str("    <serial type='pty'><target port='0'/></serial>\n");
    x.push_str("    <console type='pty'><target type='serial' port='0'/></console>\n");
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
  <os><type arch='x86_64' machine='pc'>hvm</type>
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
    <serial type='pty'/><console type='pty'/><video/>
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
            ("<domain><name>a</name><memory>1024</memory><os><kernel>/k</kernel></os><devices><disk type='block'/></devices></domain>", "file or volume disks"),
            ("<domain><name>a</name><memory>1024</memory><os><kernel>/k</kernel></os><devices><interface type='user'/></devices></domain>", "interface"),
        ];
        for (xml, want) in cases {
            let e = parse_domain(xml).unwrap_err().to_string();
            assert!(e.contains(want), "{xml}: {e}");
        }
    }
}
