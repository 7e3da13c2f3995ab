//! Domain definitions and runtime states.
//!
//! A definition's machine part is exactly `vmm::VmConfig` (the one description of a VM);
//! around it the manager keeps what only a manager needs: the name, which driver runs it,
//! autostart, and which networks its interfaces join.

use serde::{Deserialize, Serialize};
use vmm::VmConfig;

use crate::error::{Error, Result};

/// Which hypervisor runs a domain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    /// Vessel's own VMM (`vessel run`), one process per domain.
    #[default]
    Vessel,
    /// `qemu-system-x86_64` (TCG here; KVM where the host has VT-x/AMD-V), driven by QMP.
    Qemu,
}

impl DriverKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::Vessel => "vessel",
            DriverKind::Qemu => "qemu",
        }
    }
}

impl std::str::FromStr for DriverKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "vessel" => Ok(DriverKind::Vessel),
            "qemu" | "kvm" => Ok(DriverKind::Qemu),
            other => Err(Error::invalid(
                "driver",
                format!("{other:?} (vessel or qemu)"),
            )),
        }
    }
}

/// A network interface: on a Vessel network or an existing host bridge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub bridge: Option<String>,
    #[serde(default)]
    pub mac: Option<String>,
    /// virtio-mmio or virtio-pci (libvirt's `<address type='virtio-mmio'/>` or
    /// `<address type='pci'/>`); the machine's `virtio_transport` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<vmm::config::Transport>,
}

/// What `define` takes and `GET /v1/domains/{name}` returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainDef {
    pub name: String,
    /// Assigned at define time when absent.
    #[serde(default)]
    pub uuid: Option<String>,
    #[serde(default)]
    pub driver: DriverKind,
    #[serde(default)]
    pub autostart: bool,
    /// libvirt's `<title>`: a short description, kept as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// libvirt's `<description>`, kept as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// libvirt's `<emulator>`: the program the domain's driver runs. Define refuses one
    /// that is not the program this daemon runs for that driver (a client never chooses
    /// what the daemon executes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emulator: Option<std::path::PathBuf>,
    /// The machine: kernel, initrd, cmdline, memory, CPUs, accelerator, disks. Its `serial`
    /// is set by the manager at start (a log file plus the console socket).
    pub vm: VmConfig,
    /// Interfaces on Vessel networks or host bridges; at start each becomes a TAP device in
    /// `vm.nets`.
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    /// The pool volumes behind disks (file path → "POOL/VOLUME"), recorded when a
    /// `vol://POOL/VOLUME` disk (libvirt's `<disk type='volume'>`) is resolved at define,
    /// so a dump names the volume again rather than its file.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub volumes: std::collections::BTreeMap<String, String>,
    /// The chain of each file disk (disk path → its image, then its backing files),
    /// recorded by define from the files themselves (whatever a definition gives here is
    /// replaced); a start refuses a disk outside the pools whose chain differs
    /// ([`crate::disk_chain`]).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub chains: std::collections::BTreeMap<String, Vec<crate::disk_chain::ChainFile>>,
    /// Where each file the VM boots from besides its disks (kernel, initrd, firmware,
    /// option ROMs, cloud-init files, UEFI variables) led at define, links followed, and
    /// which file it was (whatever a definition gives here is replaced); a start refuses
    /// one that leads elsewhere or is another file ([`crate::boot_files`]).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub boot_files: std::collections::BTreeMap<String, crate::boot_files::BootFile>,
}

/// A definition in JSON. A QEMU domain that names no `vm.virtio_transport` gets
/// QEMU's, PCI (q35), rather than `VmConfig`'s default virtio-mmio, which the QEMU driver
/// refuses; one that names mmio is refused by name at define.
pub fn from_json(text: &str) -> Result<DomainDef> {
    let bad = |e: serde_json::Error| Error::invalid("domain JSON", e.to_string());
    let mut v: serde_json::Value = serde_json::from_str(text).map_err(bad)?;
    let qemu = matches!(
        v.get("driver").and_then(|d| d.as_str()),
        Some("qemu" | "kvm")
    );
    if let Some(vm) = v.get_mut("vm").and_then(|vm| vm.as_object_mut()) {
        if qemu && !vm.contains_key("virtio_transport") {
            vm.insert("virtio_transport".into(), "pci".into());
        }
    }
    serde_json::from_value(v).map_err(bad)
}

/// A disk path `vol://POOL/VOLUME` names a pool volume; `define` resolves it to the file.
pub const VOLUME_PREFIX: &str = "vol://";

/// Names are used in paths and URLs: keep them plain.
pub fn check_name(kind: &'static str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            kind,
            format!(
                "name {name:?}: use 1-64 letters, digits, '-', '_' or '.', not starting with '.'"
            ),
        ))
    }
}

impl DomainDef {
    /// Checks what can be checked at define time (files are checked again at start).
    pub fn validate(&self) -> Result<()> {
        check_name("domain name", &self.name)?;
        if let Some(u) = &self.uuid {
            check_uuid(u)?;
        }
        self.vm
            .validate()
            .map_err(|e| Error::invalid("domain machine config", e.to_string()))?;
        crate::driver::of(self.driver).check(&self.vm)?;
        // The manager owns the serial console (its log and console socket): a serial
        // given in a definition would be replaced at start.
        if !matches!(
            self.vm.serial,
            vmm::SerialConfig::Stdio | vmm::SerialConfig::Null
        ) {
            return Err(Error::invalid(
                "domain machine config",
                "unsupported configuration: vm.serial is the manager's (a log plus the \
                 console socket: vessel console NAME); leave it out",
            ));
        }
        for n in &self.vm.nets {
            check_tap_name(&n.tap)?;
            if let Some(m) = &n.mac {
                if !valid_mac(m) {
                    return Err(Error::invalid("interface", format!("MAC address {m:?}")));
                }
            }
        }
        for i in &self.interfaces {
            if i.network.is_some() == i.bridge.is_some() {
                return Err(Error::invalid(
                    "interface",
                    "give exactly one of network or bridge",
                ));
            }
            if let Some(m) = &i.mac {
                if !valid_mac(m) {
                    return Err(Error::invalid("interface", format!("MAC address {m:?}")));
                }
            }
        }
        Ok(())
    }
}

/// A TAP device name as Linux takes it (1-15 bytes) and nothing else: it goes into
/// QEMU's `-netdev tap,ifname=…` and the VMM's `--net tap=…`, where a ',' would add
/// options (`"vq0,ifname=vq1"` made QEMU create TAP vq1).
pub fn check_tap_name(name: &str) -> Result<()> {
    let ok = (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.')
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "TAP name",
            format!("{name:?}: use 1-15 letters, digits, '-', '_' or '.'"),
        ))
    }
}

fn valid_mac(m: &str) -> bool {
    let parts: Vec<&str> = m.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Runtime state, with libvirt's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DomainState {
    Shutoff,
    Running,
    Paused,
    /// A graceful shutdown was requested; the guest has not powered off yet.
    InShutdown,
    /// The VMM process ended on an error or a signal.
    Crashed,
}

impl DomainState {
    pub fn as_str(self) -> &'static str {
        match self {
            DomainState::Shutoff => "shut off",
            DomainState::Running => "running",
            DomainState::Paused => "paused",
            DomainState::InShutdown => "in shutdown",
            DomainState::Crashed => "crashed",
        }
    }

    pub fn is_active(self) -> bool {
        matches!(
            self,
            DomainState::Running | DomainState::Paused | DomainState::InShutdown
        )
    }
}

/// A random RFC 4122 version-4 UUID.
/// A UUID in its text form, as libvirt writes it.
pub fn check_uuid(u: &str) -> Result<()> {
    let ok = u.len() == 36
        && u.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "uuid",
            format!("{u:?} (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)"),
        ))
    }
}

pub fn new_uuid() -> String {
    let mut b = [0u8; 16];
    let got = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    if got.is_err() {
        // Fall back to time and pid: unique enough for a local name.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        b[..16].copy_from_slice(&(t ^ u128::from(std::process::id())).to_le_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_uuids() {
        assert!(check_name("domain", "web-1.a_b").is_ok());
        for bad in ["", ".x", "a/b", "a b", "../x", &"x".repeat(65)] {
            assert!(check_name("domain", bad).is_err(), "{bad}");
        }
        let u = new_uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(valid_mac("52:54:00:12:34:56"));
        let mut d: DomainDef =
            serde_json::from_str(r#"{"name":"a","uuid":"nope","vm":{"kernel":"/k"}}"#).unwrap();
        assert!(d.validate().unwrap_err().to_string().contains("uuid"));
        d.uuid = Some(u.to_uppercase().replace('-', "_"));
        assert!(d.validate().is_err());
        assert!(!valid_mac("52:54:00:12:34"));
    }

    #[test]
    fn json_definition_is_vmconfig_plus_manager_fields() {
        let d: DomainDef = serde_json::from_str(
            r#"{"name":"a","driver":"qemu","vm":{"kernel":"/k","memory_mib":256}}"#,
        )
        .unwrap();
        assert_eq!(d.driver, DriverKind::Qemu);
        assert_eq!(d.vm.memory_mib, 256);
        // A QEMU domain that names no transport is q35's (virtio-pci); one that names
        // mmio keeps it, and the QEMU driver refuses it by name; a Vessel domain keeps
        // Vessel's default.
        use vmm::config::Transport;
        let t = |j: &str| from_json(j).unwrap().vm.virtio_transport;
        assert_eq!(
            t(r#"{"name":"a","driver":"qemu","vm":{"kernel":"/k"}}"#),
            Transport::Pci
        );
        let mmio = format!(
            r#"{{"name":"a","driver":"qemu","vm":{{"kernel":"{}","virtio_transport":"mmio"}}}}"#,
            std::env::current_exe().unwrap().display()
        );
        assert_eq!(t(&mmio), Transport::Mmio);
        let e = from_json(&mmio)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("machine='microvm'") && e.contains("q35"), "{e}");
        assert_eq!(t(r#"{"name":"a","vm":{"kernel":"/k"}}"#), Transport::Mmio);
        assert!(
            serde_json::from_str::<DomainDef>(r#"{"name":"a","vm":{"kernel":"/k"},"x":1}"#)
                .is_err()
        );
    }

    #[test]
    fn the_qemu_driver_refuses_fields_it_would_drop() {
        let kernel = std::env::current_exe().unwrap();
        let with = |driver: &str, vm_extra: &str| {
            let json = format!(
                r#"{{"name":"a","driver":"{driver}","vm":{{"kernel":"{}"{vm_extra}}}}}"#,
                kernel.display()
            );
            from_json(&json).unwrap().validate()
        };
        let vsock = r#","vsock":{"guest_cid":3,"uds_path":"/tmp/v.sock"}"#;
        let hvc = r#","virtio_console":{"type":"null"}"#;
        let limited = format!(
            r#","disks":[{{"path":"{}","format":"raw","rate_limiter":{{"ops":{{"size":1,"refill_time":100}}}}}}]"#,
            kernel.display()
        );
        for (extra, field) in [
            (vsock, "vm.vsock"),
            (hvc, "vm.virtio_console"),
            (limited.as_str(), "rate_limiter"),
        ] {
            let e = with("qemu", extra).unwrap_err().to_string();
            assert!(
                e.contains("unsupported configuration") && e.contains(field),
                "{e}"
            );
            // The Vessel driver gets the VmConfig itself: nothing to refuse.
            with("vessel", extra).unwrap();
        }
        with("qemu", "").unwrap();
    }
}
