//! Virtual networks: a Linux bridge with the gateway address, optional NAT to the host's
//! uplink (iptables MASQUERADE), and DHCP for guests from dnsmasq (Debian's
//! `dnsmasq-base`), started and stopped by the daemon. Each domain interface on a network
//! becomes a TAP device enslaved to the bridge, created at domain start and removed at
//! stop.
//!
//! A network's runtime state is observable (the bridge in /sys/class/net, dnsmasq's
//! pidfile in `run-net/<name>/`), so a restarted daemon finds active networks again.

use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::domain::{check_name, DomainDef, DriverKind};
use crate::driver::{self, ProcId};
use crate::error::{Error, Result};

/// A fixed DHCP lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DhcpHost {
    pub mac: String,
    pub ip: Ipv4Addr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DhcpRange {
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
}

/// What `net-define` takes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkDef {
    pub name: String,
    /// libvirt's network UUID: kept as given, made at define when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Bridge device name (default `vbr-<name>`, cut to 15 bytes).
    #[serde(default)]
    pub bridge: Option<String>,
    /// The host's (gateway's) address on the network, with its prefix: `192.168.100.1/24`.
    pub address: String,
    #[serde(default)]
    pub dhcp: Option<DhcpRange>,
    #[serde(default)]
    pub hosts: Vec<DhcpHost>,
    /// Masquerade traffic leaving the network's subnet.
    #[serde(default = "yes")]
    pub nat: bool,
    /// With NAT: the source ports TCP and UDP are masqueraded to (libvirt's
    /// `<nat><port start end/>`, 1024-65535 unless it says); None masquerades keeping any
    /// port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat_ports: Option<(u16, u16)>,
    /// The bridge's spanning tree protocol (libvirt's `<bridge stp>`, on unless it says).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stp: bool,
    /// With STP: the bridge's forward delay in seconds (libvirt's `<bridge delay>`; the
    /// kernel makes it at least 2 while STP is on).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub delay: u32,
    /// The bridge's own MAC address (libvirt's `<mac address>`). `net-define` makes one
    /// (52:54:00:xx:xx:xx, as libvirt does) when the definition has none and stores it, so
    /// the bridge keeps one address: a bridge without its own takes its lowest port's,
    /// which changes when that guest's TAP goes and strands the other guests' ARP entries
    /// for the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default)]
    pub autostart: bool,
    /// Joins the bridge to the same network's bridges on a cluster's other hosts with a
    /// VXLAN overlay of this VNI (1 to 16777215; cluster daemons, see
    /// `cluster::overlay`). Its guests' addresses are then the cluster's, and the
    /// dnsmasq here answers only the domains placed on this host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn yes() -> bool {
    true
}

fn bad(why: impl Into<String>) -> Error {
    Error::invalid("network", why)
}

/// Interface names are at most 15 bytes (IFNAMSIZ - 1).
fn check_ifname(n: &str) -> Result<()> {
    if n.is_empty()
        || n.len() > 15
        || !n
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(bad(format!(
            "interface name {n:?}: 1-15 letters, digits, '-', '_' or '.'"
        )));
    }
    Ok(())
}

impl NetworkDef {
    pub fn bridge_name(&self) -> String {
        self.bridge.clone().unwrap_or_else(|| {
            let mut b = format!("vbr-{}", self.name);
            b.truncate(15);
            b
        })
    }

    /// (gateway, prefix length, network address).
    pub fn subnet(&self) -> Result<(Ipv4Addr, u8, Ipv4Addr)> {
        let (ip, pfx) = self
            .address
            .split_once('/')
            .ok_or_else(|| bad(format!("address {:?}: give it as IP/PREFIX", self.address)))?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| bad(format!("address {ip:?} is not an IPv4 address")))?;
        let pfx: u8 = pfx
            .parse()
            .ok()
            .filter(|p| (8..=30).contains(p))
            .ok_or_else(|| bad(format!("prefix /{pfx}: use 8 to 30")))?;
        let mask = u32::MAX << (32 - pfx);
        let net = Ipv4Addr::from(u32::from(ip) & mask);
        if ip == net || u32::from(ip) | !mask == u32::from(ip) {
            return Err(bad(format!(
                "{ip} is the network or broadcast address of /{pfx}"
            )));
        }
        Ok((ip, pfx, net))
    }

    fn contains(&self, a: Ipv4Addr) -> Result<bool> {
        let (_, pfx, net) = self.subnet()?;
        let mask = u32::MAX << (32 - pfx);
        Ok(u32::from(a) & mask == u32::from(net))
    }

    pub fn validate(&self) -> Result<()> {
        check_name("network name", &self.name)?;
        if let Some(m) = &self.mac {
            vmm::config::parse_mac(m).map_err(bad)?;
        }
        if let Some((start, end)) = self.nat_ports {
            if start == 0 || start > end {
                return Err(bad(format!(
                    "NAT ports {start}-{end}: an ordered range from 1"
                )));
            }
        }
        if let Some(u) = &self.uuid {
            crate::domain::check_uuid(u)?;
        }
        if self.vni.is_some_and(|v| !(1..=0xff_ffff).contains(&v)) {
            return Err(bad("VNI: use 1 to 16777215"));
        }
        check_ifname(&self.bridge_name())?;
        let (gw, _, _) = self.subnet()?;
        if let Some(r) = &self.dhcp {
            if !self.contains(r.start)? || !self.contains(r.end)? || r.start > r.end {
                return Err(bad(format!(
                    "DHCP range {}-{} is not an ordered range inside {}",
                    r.start, r.end, self.address
                )));
            }
            if (r.start..=r.end).contains(&gw) {
                return Err(bad("the DHCP range contains the gateway address"));
            }
        }
        for h in &self.hosts {
            vmm::config::parse_mac(&h.mac).map_err(bad)?;
            if !self.contains(h.ip)? || h.ip == gw {
                return Err(bad(format!(
                    "host address {} is outside {} or is the gateway",
                    h.ip, self.address
                )));
            }
        }
        Ok(())
    }
}

/// Runs a host command; a failure carries its stderr.
fn sh(prog: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Spawn {
            what: prog.to_string(),
            why: if e.kind() == std::io::ErrorKind::NotFound {
                format!("{e}: install it ({})", package_of(prog))
            } else {
                e.to_string()
            },
        })?;
    if !out.status.success() {
        return Err(Error::Spawn {
            what: format!("{prog} {}", args.join(" ")),
            why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn package_of(prog: &str) -> &'static str {
    match prog {
        "dnsmasq" => "apt-get install dnsmasq-base",
        "iptables" => "apt-get install iptables",
        _ => "apt-get install iproute2",
    }
}

/// Whether a network device exists in this process's network namespace. (/proc/self/net
/// follows the namespace; /sys/class/net shows the one sysfs was mounted in.)
pub fn link_exists(name: &str) -> bool {
    std::fs::read_to_string("/proc/self/net/dev")
        .unwrap_or_default()
        .lines()
        .skip(2)
        .any(|l| l.split(':').next().map(str::trim) == Some(name))
}

fn is_bridge(name: &str) -> bool {
    link_exists(name)
        && Command::new("ip")
            .args(["-o", "-d", "link", "show", "dev", name])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(" bridge "))
}

fn run_dir(state: &Path, name: &str) -> PathBuf {
    state.join("run-net").join(name)
}

fn nat_rules(def: &NetworkDef) -> Result<Vec<Vec<String>>> {
    let (_, pfx, net) = def.subnet()?;
    let cidr = format!("{net}/{pfx}");
    let br = def.bridge_name();
    let tag = format!("vessel-net-{}", def.name);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    // Outgoing traffic of the subnet, masqueraded: `to_ports` with `-p PROTO`.
    let masquerade = |to_ports: Option<(&str, &str)>| {
        let mut r = s(&["-t", "nat", "POSTROUTING", "-s", &cidr, "!", "-d", &cidr]);
        if let Some((proto, _)) = to_ports {
            r.extend(s(&["-p", proto]));
        }
        r.extend(s(&["-j", "MASQUERADE"]));
        if let Some((_, ports)) = to_ports {
            r.extend(s(&["--to-ports", ports]));
        }
        r.extend(s(&["-m", "comment", "--comment", &tag]));
        r
    };
    // TCP and UDP to their port range first (libvirt's order), then everything else.
    let mut rules = Vec::new();
    if let Some((start, end)) = def.nat_ports {
        let ports = format!("{start}-{end}");
        for proto in ["tcp", "udp"] {
            rules.push(masquerade(Some((proto, &ports))));
        }
    }
    rules.extend([
        masquerade(None),
        s(&[
            "-t",
            "filter",
            "FORWARD",
            "-i",
            &br,
            "-j",
            "ACCEPT",
            "-m",
            "comment",
            "--comment",
            &tag,
        ]),
        s(&[
            "-t",
            "filter",
            "FORWARD",
            "-o",
            &br,
            "-j",
            "ACCEPT",
            "-m",
            "comment",
            "--comment",
            &tag,
        ]),
    ]);
    Ok(rules)
}

fn iptables(op: &str, rule: &[String]) -> Result<()> {
    // rule = [-t, table, CHAIN, ...]: insert the operation before the chain.
    let mut args: Vec<&str> = rule.iter().take(2).map(String::as_str).collect();
    args.push(op);
    args.extend(rule.iter().skip(2).map(String::as_str));
    sh("iptables", &args)
}

/// `ip` arguments that create the network's bridge with its MAC and spanning tree.
fn bridge_add_args(def: &NetworkDef) -> Vec<String> {
    let mut a: Vec<String> = vec!["link".into(), "add".into(), def.bridge_name()];
    if let Some(m) = &def.mac {
        a.extend(["address".into(), m.clone()]);
    }
    a.extend(["type".into(), "bridge".into()]);
    if def.stp {
        // The delay first: the kernel holds an STP bridge's to its minimum.
        a.extend([
            "forward_delay".into(),
            (u64::from(def.delay) * 100).to_string(),
            "stp_state".into(),
            "1".into(),
        ]);
    }
    a
}

/// Whether the network's bridge and (when it has DHCP) its dnsmasq are up.
pub fn is_active(state: &Path, def: &NetworkDef) -> bool {
    if !is_bridge(&def.bridge_name()) {
        return false;
    }
    if def.dhcp.is_some() || !def.hosts.is_empty() {
        return ProcId::read(&run_dir(state, &def.name).join("dnsmasq.pid"))
            .is_some_and(|p| p.alive());
    }
    true
}

/// Brings a network up; on failure, undoes what it did. `mtu`: an overlay network's
/// (its bridge's, and what DHCP offers its guests).
pub fn start(
    state: &Path,
    def: &NetworkDef,
    mtu: Option<u32>,
) -> Result<Option<std::process::Child>> {
    def.validate()?;
    let br = def.bridge_name();
    if link_exists(&br) {
        return Err(Error::Conflict(format!(
            "a network device named {br} already exists: stop what uses it, or give the network another bridge name"
        )));
    }
    let mut undo: Vec<Box<dyn FnOnce()>> = Vec::new();
    let r = (|| -> Result<Option<std::process::Child>> {
        let args = bridge_add_args(def);
        sh("ip", &args.iter().map(String::as_str).collect::<Vec<_>>())?;
        let b2 = br.clone();
        undo.push(Box::new(move || {
            let _ = sh("ip", &["link", "del", &b2]);
        }));
        sh("ip", &["addr", "add", &def.address, "dev", &br])?;
        if let Some(m) = mtu {
            set_mtu(&br, m)?;
        }
        sh("ip", &["link", "set", &br, "up"])?;
        if def.nat {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|e| {
                Error::io("enabling IP forwarding", "/proc/sys/net/ipv4/ip_forward", e)
            })?;
            for rule in nat_rules(def)? {
                iptables("-A", &rule)?;
                undo.push(Box::new(move || {
                    let _ = iptables("-D", &rule);
                }));
            }
        }
        if def.dhcp.is_none() && def.hosts.is_empty() && def.vni.is_none() {
            return Ok(None);
        }
        let dir = run_dir(state, &def.name);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
        let (_, pfx, _) = def.subnet()?;
        let mask = Ipv4Addr::from(u32::MAX << (32 - pfx));
        let mut cmd = Command::new("dnsmasq");
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--bind-interfaces",
            "--except-interface=lo",
            "--port=0",
            "--dhcp-authoritative",
            "--log-dhcp",
            // Into dnsmasq.log, beside its other output (there may be no syslog).
            "--log-facility=-",
        ])
        .arg(format!("--interface={br}"))
        .arg(format!("--dhcp-leasefile={}", dir.join("leases").display()))
        .arg(format!(
            "--pid-file={}",
            dir.join("dnsmasq.own.pid").display()
        ));
        match (&def.dhcp, def.vni) {
            (Some(r), None) => cmd.arg(format!("--dhcp-range={},{},{mask},1h", r.start, r.end)),
            // Fixed leases only: on an overlay, the cluster's, for the domains placed here
            // (re-read on SIGHUP, see set_cluster_leases).
            _ => cmd.arg(format!("--dhcp-range={},static,{mask},1h", def.subnet()?.2)),
        };
        if def.vni.is_some() {
            let f = cluster_leases_file(state, def);
            write_readable(&f, "")?;
            cmd.arg(format!("--dhcp-hostsfile={}", f.display()));
            // Room for the VXLAN header on the underlay (option 26; guests also get it
            // from their virtio-net device, VIRTIO_NET_F_MTU).
            let m = mtu.unwrap_or(DEFAULT_OVERLAY_MTU);
            cmd.arg(format!("--dhcp-option=option:mtu,{m}"));
        }
        for h in &def.hosts {
            cmd.arg(format!("--dhcp-host={},{}", h.mac, h.ip));
        }
        let log = std::fs::File::create(dir.join("dnsmasq.log"))
            .map_err(|e| Error::io("creating", dir.join("dnsmasq.log"), e))?;
        driver::default_signals(&mut cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| Error::Spawn {
                what: "dnsmasq".into(),
                why: format!("{e}: install it (apt-get install dnsmasq-base)"),
            })?;
        // dnsmasq reports bad options by exiting at once.
        std::thread::sleep(std::time::Duration::from_millis(50));
        if let Ok(Some(st)) = child.try_wait() {
            let msg = std::fs::read_to_string(dir.join("dnsmasq.log")).unwrap_or_default();
            return Err(Error::Spawn {
                what: "dnsmasq".into(),
                why: format!("exited at once ({st}): {}", msg.trim()),
            });
        }
        let id =
            driver::proc_id(child.id() as i32, DriverKind::Qemu).ok_or_else(|| Error::Spawn {
                what: "dnsmasq".into(),
                why: "it vanished after starting".into(),
            })?;
        if let Err(e) = id.write(&dir.join("dnsmasq.pid")) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        Ok(Some(child))
    })();
    if r.is_err() {
        for u in undo.into_iter().rev() {
            u();
        }
        let _ = std::fs::remove_dir_all(run_dir(state, &def.name));
    }
    r
}

/// The dnsmasq hosts file of an overlay network: the cluster's leases of this host's
/// domains. dnsmasq reads it again on SIGHUP after it has given up root for `nobody`,
/// so it cannot lie in the state folder (the daemon's alone): it lies in a folder of its
/// own under /run, readable, as libvirt keeps its dnsmasq hosts files (MACs and
/// addresses, nothing secret), named for the state folder and the network.
pub fn cluster_leases_file(state: &Path, def: &NetworkDef) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in state.as_os_str().as_bytes() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    PathBuf::from(CLUSTER_LEASES_DIR).join(format!("{h:016x}-{}.hosts", def.name))
}

const CLUSTER_LEASES_DIR: &str = "/run/vessel-dnsmasq";

/// Writes `text` to `f` atomically, readable by all (dnsmasq as `nobody`).
fn write_readable(f: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(CLUSTER_LEASES_DIR)
        .and_then(|()| {
            // The daemon's umask would leave it to root alone.
            std::fs::set_permissions(CLUSTER_LEASES_DIR, std::fs::Permissions::from_mode(0o755))
        })
        .map_err(|e| Error::io("creating", Path::new(CLUSTER_LEASES_DIR), e))?;
    let tmp = f.with_extension("new");
    std::fs::write(&tmp, text).map_err(|e| Error::io("writing", &tmp, e))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
        .map_err(|e| Error::io("writing", &tmp, e))?;
    std::fs::rename(&tmp, f).map_err(|e| Error::io("writing", f, e))
}

/// Makes the overlay network's dnsmasq answer exactly these `(MAC, address)` pairs (the
/// domains placed on this host); true when they changed.
pub fn set_cluster_leases(
    state: &Path,
    def: &NetworkDef,
    leases: &[(String, Ipv4Addr)],
) -> Result<bool> {
    let dir = run_dir(state, &def.name);
    let f = cluster_leases_file(state, def);
    let text: String = leases.iter().map(|(m, ip)| format!("{m},{ip}\n")).collect();
    if std::fs::read_to_string(&f).is_ok_and(|t| t == text) {
        return Ok(false);
    }
    write_readable(&f, &text)?;
    // dnsmasq reads its hosts files again on SIGHUP.
    if let Some(id) = ProcId::read(&dir.join("dnsmasq.pid")) {
        driver::signal(&id, libc::SIGHUP);
    }
    Ok(true)
}

/// Tells the bridges and overlays that MAC `mac` is now behind TAP `tap` on `bridge`, as
/// a guest that has just migrated in has not yet done: the TAP becomes the MAC's port on
/// this bridge, and RARP broadcasts with the MAC as their source (what QEMU sends after
/// a migration) leave through the bridge, so that learning bridges and VXLAN devices on
/// other hosts move the MAC here. Sent a few times over a second, in the background.
pub fn announce(bridge: &str, tap: &str, mac: &str) -> Result<()> {
    let m = vmm::config::parse_mac(mac).map_err(bad)?;
    sh(
        "bridge",
        &["fdb", "replace", mac, "dev", tap, "master", "dynamic"],
    )?;
    let c = std::ffi::CString::new(bridge).map_err(|_| bad("bridge name"))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string that lives through the call.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if ifindex == 0 {
        return Err(bad(format!("no bridge {bridge} here")));
    }
    let mut frame = vec![0xffu8; 6];
    frame.extend_from_slice(&m);
    frame.extend_from_slice(&[0x80, 0x35]); // RARP
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 3]); // Ethernet, IPv4, reverse request
    for _ in 0..2 {
        frame.extend_from_slice(&m);
        frame.extend_from_slice(&[0, 0, 0, 0]);
    }
    frame.resize(60, 0);
    let mac = mac.to_string();
    std::thread::spawn(move || {
        for wait in [0u64, 100, 200, 400, 800] {
            std::thread::sleep(std::time::Duration::from_millis(wait));
            if let Err(e) = send_frame(ifindex, &frame) {
                tracing::warn!(%mac, "announcing a migrated guest: {e}");
                return;
            }
        }
    });
    Ok(())
}

/// Sends one Ethernet frame out of interface `ifindex`.
fn send_frame(ifindex: u32, frame: &[u8]) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: socket(2) with constant arguments; the descriptor is owned just below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data, valid all zero.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_ifindex = ifindex as i32;
    sa.sll_halen = 6;
    sa.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: the buffer and the address live through the call, with their lengths.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&sa as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Takes a network down: dnsmasq, NAT rules, the bridge.
pub fn stop(state: &Path, def: &NetworkDef) -> Result<()> {
    let dir = run_dir(state, &def.name);
    if let Some(id) = ProcId::read(&dir.join("dnsmasq.pid")) {
        driver::signal(&id, libc::SIGTERM);
        if !id.wait_exit_for(Some(std::time::Duration::from_secs(3))) {
            driver::signal(&id, libc::SIGKILL);
        }
    }
    if def.nat {
        for rule in nat_rules(def)? {
            let _ = iptables("-D", &rule);
        }
    }
    let br = def.bridge_name();
    if link_exists(&br) {
        sh("ip", &["link", "del", &br])?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    if def.vni.is_some() {
        let _ = std::fs::remove_file(cluster_leases_file(state, def));
    }
    Ok(())
}

/// A new random bridge MAC in libvirt's (QEMU's) locally used 52:54:00 range.
pub fn new_bridge_mac() -> String {
    let mut b = [0u8; 3];
    let got = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    if got.is_err() {
        // Fall back to time and pid: unique enough on one host.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default()
            ^ std::process::id().rotate_left(13);
        b.copy_from_slice(&t.to_le_bytes()[..3]);
    }
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

/// The TAP device name for a domain's interface `i`: stable across restarts.
pub fn tap_name(dom: &DomainDef, i: usize) -> String {
    let id: String = dom
        .uuid
        .as_deref()
        .unwrap_or(&dom.name)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(8)
        .collect();
    format!("vt{id}-{i}")
}

/// The other TAP name for a domain's interface `i`, for a VMM that cannot take over the
/// TAP a VMM of the domain holds on this host (a QEMU migrating in from another daemon
/// here: QEMU opens its TAP by name, and a TAP takes one holder): as libvirt gives each
/// QEMU process its own `vnetN`. A domain migrating back and forth alternates between the
/// two names.
pub fn other_tap_name(dom: &DomainDef, i: usize) -> String {
    let n = tap_name(dom, i);
    format!("vu{}", n.strip_prefix("vt").unwrap_or(&n))
}

/// The TAP for a domain migrating in from another daemon on this host to a VMM that
/// opens its TAP by name: the domain's TAP name when it is free, else the other one
/// ([`other_tap_name`]), made afresh on `bridge`; refused when both are in use.
pub fn fresh_tap_for_incoming(dom: &DomainDef, i: usize, bridge: &str) -> Result<String> {
    let held = |t: &str| link_exists(t) && tap_in_use(t);
    let tap = [tap_name(dom, i), other_tap_name(dom, i)]
        .into_iter()
        .find(|t| !held(t))
        .ok_or_else(|| {
            Error::Conflict(format!(
                "TAPs {} and {} of interface {i} are both in use here",
                tap_name(dom, i),
                other_tap_name(dom, i)
            ))
        })?;
    create_tap(&tap, bridge)?;
    Ok(tap)
}

/// The interface's MAC: given, or derived from the domain's UUID (locally administered,
/// QEMU's 52:54:00 prefix).
pub fn mac_for(dom: &DomainDef, i: usize) -> String {
    if let Some(m) = dom.interfaces.get(i).and_then(|x| x.mac.clone()) {
        return m;
    }
    let mut h: u32 = 2166136261;
    for b in dom
        .uuid
        .as_deref()
        .unwrap_or(&dom.name)
        .bytes()
        .chain([i as u8])
    {
        h = (h ^ u32::from(b)).wrapping_mul(16777619);
    }
    let b = h.to_be_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[1], b[2], b[3])
}

/// Whether a process has TAP `tap` open: an attached queue turns its carrier on (a
/// persistent TAP nobody holds has none). Read from sysfs; false for a TAP that is down.
pub fn tap_in_use(tap: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{tap}/carrier")).is_ok_and(|c| c.trim() == "1")
}

/// The bridge an interface is enslaved to, if any.
pub fn master_of(link: &str) -> Option<String> {
    std::fs::read_link(format!("/sys/class/net/{link}/master"))
        .ok()?
        .file_name()?
        .to_str()
        .map(str::to_string)
}

/// A TAP for a domain migrating in from another daemon on this host: its source's VMM
/// still holds the TAP of this name (the names follow the domain's UUID) and hands its
/// queues to the VMM here with the VM (`vmm::migration::fds`), so it is kept as it is,
/// when it is on the bridge this daemon would put it on; otherwise made afresh. Returns
/// whether it was kept.
pub fn take_over_tap(tap: &str, bridge: &str) -> Result<bool> {
    if link_exists(tap) && tap_in_use(tap) {
        let on = master_of(tap);
        if on.as_deref() == Some(bridge) {
            return Ok(true);
        }
        return Err(Error::Conflict(format!(
            "TAP {tap} is in use on {} here, not on bridge {bridge}",
            on.as_deref().unwrap_or("no bridge")
        )));
    }
    create_tap(tap, bridge).map(|()| false)
}

/// Removes TAP `tap` unless a VMM still holds it: after a migration to another daemon
/// on this host the VMM there goes on with it.
pub fn release_tap(tap: &str) {
    if tap_in_use(tap) {
        tracing::info!(
            tap,
            "TAP still in use (the domain migrated on this host): kept"
        );
        return;
    }
    delete_tap(tap);
}

/// The bytes VXLAN over IPv4 adds to a guest's frame: outer IPv4 (20), UDP (8), VXLAN
/// (8) and the inner Ethernet header (14), which the guest's MTU does not count.
pub const VXLAN_OVERHEAD: u32 = 50;

/// The guest-facing MTU of an overlay network when the underlay's is not known: a
/// 1500-byte underlay's, less [`VXLAN_OVERHEAD`].
pub const DEFAULT_OVERLAY_MTU: u32 = 1450;

/// The MTU of the interface that holds IPv4 address `ip` here (`ip -o -4 addr show`).
pub fn mtu_of_address(ip: Ipv4Addr) -> Option<u32> {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    // "2: uplink@if5    inet 10.250.0.1/24 brd … scope global uplink …"
    let ifname = String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut w = l.split_whitespace();
        let name = w.nth(1)?;
        (w.next()? == "inet" && w.next()?.split('/').next()? == ip.to_string().as_str())
            .then(|| name.split('@').next().unwrap_or(name).to_string())
    })?;
    check_ifname(&ifname).ok()?;
    std::fs::read_to_string(format!("/sys/class/net/{ifname}/mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The MTU of an overlay network's guests and devices: that of the underlay interface
/// holding `local` (the host's overlay address) less [`VXLAN_OVERHEAD`], so that a
/// guest's largest frame still crosses the underlay in one packet, as libvirt and
/// OpenStack set it; [`DEFAULT_OVERLAY_MTU`] when `local` is unknown.
pub fn overlay_mtu(local: Option<Ipv4Addr>) -> u32 {
    local
        .and_then(mtu_of_address)
        .map(|m| m.saturating_sub(VXLAN_OVERHEAD))
        // IPv4's minimum: an underlay too small for it leaves the default.
        .filter(|m| *m >= 576)
        .unwrap_or(DEFAULT_OVERLAY_MTU)
}

/// Sets a network device's MTU.
pub fn set_mtu(dev: &str, mtu: u32) -> Result<()> {
    sh("ip", &["link", "set", "dev", dev, "mtu", &mtu.to_string()])
}

/// Creates a TAP device on `bridge`.
pub fn create_tap(tap: &str, bridge: &str) -> Result<()> {
    if link_exists(tap) {
        // Left over from a VMM that ended while the daemon was down.
        let _ = sh("ip", &["link", "del", tap]);
    }
    sh("ip", &["tuntap", "add", "dev", tap, "mode", "tap"])?;
    if let Err(e) = sh("ip", &["link", "set", tap, "master", bridge, "up"]) {
        let _ = sh("ip", &["link", "del", tap]);
        return Err(e);
    }
    Ok(())
}

pub fn delete_tap(tap: &str) {
    if link_exists(tap) {
        if let Err(e) = sh("ip", &["link", "del", tap]) {
            tracing::warn!("removing {tap}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(address: &str) -> NetworkDef {
        NetworkDef {
            name: "n".into(),
            uuid: None,
            bridge: None,
            address: address.into(),
            dhcp: None,
            hosts: vec![],
            nat: true,
            nat_ports: None,
            stp: false,
            delay: 0,
            mac: None,
            autostart: false,
            vni: None,
        }
    }

    /// libvirt's bridge and NAT settings reach `ip` and iptables as libvirt applies them.
    #[test]
    fn bridge_and_nat_settings_become_commands() {
        let mut n = net("192.168.122.1/24");
        assert_eq!(bridge_add_args(&n).join(" "), "link add vbr-n type bridge");
        assert_eq!(nat_rules(&n).unwrap().len(), 3);
        n.stp = true;
        n.delay = 3;
        n.mac = Some("52:54:00:0a:0b:0c".into());
        n.nat_ports = Some((1024, 65535));
        assert_eq!(
            bridge_add_args(&n).join(" "),
            "link add vbr-n address 52:54:00:0a:0b:0c type bridge forward_delay 300 stp_state 1"
        );
        let rules: Vec<String> = nat_rules(&n).unwrap().iter().map(|r| r.join(" ")).collect();
        assert_eq!(rules.len(), 5);
        assert!(
            rules[0].contains("-p tcp -j MASQUERADE --to-ports 1024-65535"),
            "{rules:?}"
        );
        assert!(
            rules[1].contains("-p udp -j MASQUERADE --to-ports 1024-65535"),
            "{rules:?}"
        );
        assert!(
            rules[2].contains("! -d 192.168.122.0/24 -j MASQUERADE -m"),
            "{rules:?}"
        );
        n.nat_ports = Some((2000, 1000));
        assert!(n.validate().is_err());
        n.nat_ports = None;
        n.mac = Some("nope".into());
        assert!(n.validate().is_err());
    }

    #[test]
    fn generated_bridge_macs_are_valid_and_differ() {
        let a = new_bridge_mac();
        assert!(a.starts_with("52:54:00:"), "{a}");
        assert!(vmm::config::parse_mac(&a).is_ok(), "{a}");
        let mut n = net("10.0.0.1/24");
        n.mac = Some(a.clone());
        assert!(n.validate().is_ok());
        // 24 random bits: ten in a row all equal would be a broken source.
        assert!((0..10).any(|_| new_bridge_mac() != a));
    }

    #[test]
    fn validation() {
        let mut n = net("192.168.50.1/24");
        assert!(n.validate().is_ok());
        assert_eq!(n.bridge_name(), "vbr-n");
        n.dhcp = Some(DhcpRange {
            start: "192.168.50.10".parse().unwrap(),
            end: "192.168.50.99".parse().unwrap(),
        });
        assert!(n.validate().is_ok());
        n.hosts.push(DhcpHost {
            mac: "52:54:00:00:00:01".into(),
            ip: "192.168.51.5".parse().unwrap(),
        });
        assert!(n.validate().unwrap_err().to_string().contains("outside"));
        for bad in [
            "192.168.50.0/24",
            "192.168.50.255/24",
            "10.0.0.1",
            "10.0.0.1/31",
            "x/24",
        ] {
            assert!(net(bad).validate().is_err(), "{bad}");
        }
        let mut long = net("10.0.0.1/8");
        long.name = "a-very-long-network-name".into();
        assert_eq!(long.bridge_name().len(), 15);
    }
}
