//! Networks across hosts. A network whose definition has a VNI is an overlay network: on
//! each cluster host where it is active, a VXLAN device of that VNI joins its bridge to
//! the same network's bridges on the other hosts that announce it. The device floods to
//! those hosts (head-end replication, one all-zero FDB entry per peer, kept equal to
//! what etcd lists) and learns which host each guest MAC is behind from the traffic; a
//! host that receives a live migration announces the guest's MACs at once
//! ([`crate::network::announce`]), so the others learn its new place before it answers.
//!
//! DHCP is served once per network: the addresses are the cluster's (allocated at
//! placement, recorded with the domain in etcd, unique across hosts, kept when it moves),
//! and the one dnsmasq that answers a guest is the one on its host, which knows only the
//! domains placed there. A bridge-family nftables table per network keeps DHCP, and ARP
//! requests for the gateway (every host's bridge has that address), from crossing the
//! overlay, so a guest always talks to its own host's dnsmasq and gateway.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use crate::error::{Error, Result};
use crate::network::{self, NetworkDef};

/// VXLAN's UDP port (IANA's).
pub const PORT: u16 = 4789;

/// The VXLAN device of the overlay with VNI `vni` (at most 11 bytes).
pub fn device(vni: u32) -> String {
    format!("vxl{vni}")
}

/// The nftables table that fences the network's DHCP and gateway in.
fn table(def: &NetworkDef) -> String {
    format!("vessel_overlay_{}", def.name.replace(['-', '.'], "_"))
}

fn run(prog: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawn_err = |e: std::io::Error| Error::Spawn {
        what: prog.to_string(),
        why: if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "{e}: install it (apt-get install {})",
                if prog == "nft" {
                    "nftables"
                } else {
                    "iproute2"
                }
            )
        } else {
            e.to_string()
        },
    };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(text.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(Error::Spawn {
            what: format!("{prog} {}", args.join(" ")),
            why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The peers the device floods to now (its all-zero FDB entries).
fn flood_peers(dev: &str) -> BTreeSet<Ipv4Addr> {
    run("bridge", &["fdb", "show", "dev", dev], None)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            if w.next()? != "00:00:00:00:00:00" {
                return None;
            }
            let mut w = w.skip_while(|x| *x != "dst");
            w.next()?;
            w.next()?.parse().ok()
        })
        .collect()
}

/// Makes the network's VXLAN device (sending from `local`, on the network's bridge, with
/// MTU `mtu`: the underlay's less the VXLAN overhead) and its filter when they are
/// missing, and floods to exactly `peers`.
pub fn ensure(
    def: &NetworkDef,
    vni: u32,
    local: Ipv4Addr,
    mtu: u32,
    peers: &BTreeSet<Ipv4Addr>,
) -> Result<()> {
    let dev = device(vni);
    let br = def.bridge_name();
    if !network::link_exists(&dev) {
        let (vni_s, local_s, port) = (vni.to_string(), local.to_string(), PORT.to_string());
        let mtu_s = mtu.to_string();
        run(
            "ip",
            &[
                "link", "add", &dev, "mtu", &mtu_s, "type", "vxlan", "id", &vni_s, "local",
                &local_s, "dstport", &port,
            ],
            None,
        )?;
        let up = run("ip", &["link", "set", &dev, "master", &br, "up"], None)
            .and_then(|_| filter(def, &dev));
        if let Err(e) = up {
            let _ = run("ip", &["link", "del", &dev], None);
            return Err(e);
        }
        tracing::info!(network = %def.name, vni, %local, "overlay up");
    } else if network::master_of(&dev).as_deref() != Some(br.as_str()) {
        // The bridge was made again (net-destroy, net-start): join the new one.
        run("ip", &["link", "set", &dev, "master", &br, "up"], None)?;
        filter(def, &dev)?;
    }
    // The underlay's MTU may have changed since (the bridge's own too: its gateway
    // address sends to the guests). A running guest keeps the MTU it booted with.
    for d in [&dev, &br] {
        let now = std::fs::read_to_string(format!("/sys/class/net/{d}/mtu"))
            .ok()
            .and_then(|m| m.trim().parse::<u32>().ok());
        if now.is_some_and(|m| m != mtu) {
            network::set_mtu(d, mtu)?;
            tracing::info!(network = %def.name, device = %d, mtu, "overlay MTU set");
        }
    }
    let have = flood_peers(&dev);
    // `bridge fdb append|del 00:00:00:00:00:00 dev DEV dst PEER`: the all-zero entry
    // floods broadcast and unknown traffic to that peer.
    let flood = |verb: &str, p: &Ipv4Addr| {
        let dst = p.to_string();
        let args = ["fdb", verb, "00:00:00:00:00:00", "dev", &dev, "dst", &dst];
        run("bridge", &args, None)
    };
    for p in peers.difference(&have) {
        flood("append", p)?;
        tracing::info!(network = %def.name, peer = %p, "overlay floods to a new host");
    }
    for p in have.difference(peers) {
        flood("del", p)?;
        tracing::info!(network = %def.name, peer = %p, "overlay stops flooding to a host gone");
    }
    Ok(())
}

/// DHCP (UDP 67 and 68) neither enters nor leaves through the overlay, and ARP requests
/// for the gateway from other hosts' guests are left to their own host to answer.
fn filter(def: &NetworkDef, dev: &str) -> Result<()> {
    let (gw, _, _) = def.subnet()?;
    let t = table(def);
    let _ = run("nft", &["delete", "table", "bridge", &t], None);
    let rules = format!(
        "table bridge {t} {{\n\
         chain from_overlay {{ type filter hook input priority 0; \
           iifname \"{dev}\" udp dport {{ 67, 68 }} drop; \
           iifname \"{dev}\" arp operation request arp daddr ip {gw} drop; }}\n\
         chain across_overlay {{ type filter hook forward priority 0; \
           iifname \"{dev}\" udp dport {{ 67, 68 }} drop; \
           oifname \"{dev}\" udp dport {{ 67, 68 }} drop; }}\n\
         chain to_overlay {{ type filter hook output priority 0; \
           oifname \"{dev}\" udp dport {{ 67, 68 }} drop; }}\n\
         }}\n"
    );
    run("nft", &["-f", "-"], Some(&rules)).map(|_| ())
}

/// Takes the network's overlay down (its bridge is gone or going).
pub fn remove(def: &NetworkDef, vni: u32) {
    let dev = device(vni);
    if network::link_exists(&dev) {
        if let Err(e) = run("ip", &["link", "del", &dev], None) {
            tracing::warn!(network = %def.name, "removing the overlay device: {e}");
        }
        tracing::info!(network = %def.name, "overlay down");
    }
    let _ = run("nft", &["delete", "table", "bridge", &table(def)], None);
}

/// The address for a guest interface with MAC `mac` on overlay network `def`: its fixed
/// lease if the network has one, else the lowest free one of its DHCP range.
pub fn allocate(def: &NetworkDef, mac: &str, taken: &BTreeSet<Ipv4Addr>) -> Result<Ipv4Addr> {
    if let Some(h) = def.hosts.iter().find(|h| h.mac.eq_ignore_ascii_case(mac)) {
        if taken.contains(&h.ip) {
            return Err(Error::Conflict(format!(
                "network {}: the fixed address {} of MAC {mac} is another domain's",
                def.name, h.ip
            )));
        }
        return Ok(h.ip);
    }
    let Some(r) = &def.dhcp else {
        return Err(Error::Conflict(format!(
            "network {} has no DHCP range and no fixed address for MAC {mac}",
            def.name
        )));
    };
    let fixed: BTreeSet<Ipv4Addr> = def.hosts.iter().map(|h| h.ip).collect();
    (u32::from(r.start)..=u32::from(r.end))
        .map(Ipv4Addr::from)
        .find(|a| !taken.contains(a) && !fixed.contains(a))
        .ok_or_else(|| {
            Error::Conflict(format!(
                "network {}: every address of {}-{} is taken in the cluster",
                def.name, r.start, r.end
            ))
        })
}

/// Why `def`, about to be defined or started on host `me`, does not match what the other
/// hosts announce (None when it does): an overlay network is one layer-2 network across
/// the hosts, so each host must define it alike: the same VNI and the same gateway
/// address and prefix. A VNI is one network's only, and a network without a VNI may not
/// take the name of another host's overlay.
pub fn mismatch(
    def: &NetworkDef,
    me: &str,
    hosts: &[crate::cluster::HostRecord],
) -> Option<String> {
    let show = |n: &NetworkDef| match n.vni {
        Some(v) => format!("VNI {v}, address {}", n.address),
        None => format!(
            "no VNI (a network of that host alone), address {}",
            n.address
        ),
    };
    let subnet = |n: &NetworkDef| n.subnet().ok().map(|(gw, pfx, _)| (gw, pfx));
    for h in hosts.iter().filter(|h| h.name != me) {
        let local =
            h.networks.contains(&def.name) && !h.overlays.iter().any(|o| o.name == def.name);
        if local && def.vni.is_some() {
            return Some(format!(
                "network {:?} is defined on host {} without a VNI (a network of that host \
                 alone), and here with {}: an overlay network must be defined alike on every \
                 host (undefine it there, or name this one otherwise)",
                def.name,
                h.name,
                show(def)
            ));
        }
        for o in &h.overlays {
            if o.name == def.name && (o.vni != def.vni || subnet(o) != subnet(def)) {
                return Some(format!(
                    "network {:?} is defined on host {} with {}, and here with {}: an overlay \
                     network must be defined alike on every host (undefine it here, or there, \
                     and define it again with the same VNI and address)",
                    def.name,
                    h.name,
                    show(o),
                    show(def)
                ));
            }
            if o.name != def.name && o.vni.is_some() && o.vni == def.vni {
                return Some(format!(
                    "VNI {} is network {:?}'s on host {}: each overlay network needs a VNI of \
                     its own (give {:?} another, or name it {:?} with that network's definition)",
                    o.vni.unwrap_or_default(),
                    o.name,
                    h.name,
                    def.name,
                    o.name
                ));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::{DhcpHost, DhcpRange};

    fn net(name: &str, address: &str, vni: Option<u32>) -> NetworkDef {
        serde_json::from_value(serde_json::json!({
            "name": name, "address": address, "vni": vni}))
        .unwrap()
    }

    fn host(name: &str, overlays: Vec<NetworkDef>) -> crate::cluster::HostRecord {
        serde_json::from_value(serde_json::json!({
            "name": name, "vcpus": 1, "memory_mib": 1, "accelerators": [], "pools": [],
            "networks": [], "api": "", "overlays": overlays}))
        .unwrap()
    }

    #[test]
    fn overlay_definitions_must_match_across_hosts() {
        let hosts = vec![
            host("h0", vec![net("ov", "10.1.0.1/24", Some(5001))]),
            host("h1", vec![]),
        ];
        assert_eq!(
            mismatch(&net("ov", "10.1.0.1/24", Some(5001)), "h1", &hosts),
            None
        );
        // Its own record does not count.
        assert_eq!(
            mismatch(&net("ov", "10.9.0.1/24", Some(7)), "h0", &hosts),
            None
        );
        let e = mismatch(&net("ov", "10.1.0.1/24", Some(5002)), "h1", &hosts).unwrap();
        assert!(
            e.contains("host h0 with VNI 5001") && e.contains("here with VNI 5002"),
            "{e}"
        );
        let e = mismatch(&net("ov", "10.2.0.1/24", Some(5001)), "h1", &hosts).unwrap();
        assert!(
            e.contains("address 10.1.0.1/24") && e.contains("address 10.2.0.1/24"),
            "{e}"
        );
        let e = mismatch(&net("ov", "10.1.0.1/16", Some(5001)), "h1", &hosts).unwrap();
        assert!(e.contains("10.1.0.1/16"), "{e}");
        let e = mismatch(&net("ov", "10.1.0.1/24", None), "h1", &hosts).unwrap();
        assert!(e.contains("no VNI"), "{e}");
        let e = mismatch(&net("other", "10.3.0.1/24", Some(5001)), "h1", &hosts).unwrap();
        assert!(e.contains("VNI 5001 is network \"ov\"'s on host h0"), "{e}");
        assert_eq!(
            mismatch(&net("other", "10.3.0.1/24", None), "h1", &hosts),
            None
        );
        // A network of h1 alone named as the overlay h2 defines.
        let mut h1 = host("h1", vec![]);
        h1.networks.push("ov".into());
        let e = mismatch(&net("ov", "10.1.0.1/24", Some(5001)), "h2", &[h1]).unwrap();
        assert!(e.contains("on host h1 without a VNI"), "{e}");
    }

    #[test]
    fn addresses_are_fixed_leases_or_the_lowest_free() {
        let mut def: NetworkDef = serde_json::from_value(serde_json::json!({
            "name": "ov", "address": "10.5.0.1/24", "vni": 5005,
            "dhcp": {"start": "10.5.0.10", "end": "10.5.0.12"}}))
        .unwrap();
        def.hosts.push(DhcpHost {
            mac: "52:54:00:00:00:0a".into(),
            ip: "10.5.0.11".parse().unwrap(),
        });
        let mut taken = BTreeSet::new();
        let a = allocate(&def, "52:54:00:00:00:01", &taken).unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 5, 0, 10));
        taken.insert(a);
        // .11 is a fixed lease: skipped for others, given to its MAC.
        let b = allocate(&def, "52:54:00:00:00:02", &taken).unwrap();
        assert_eq!(b, Ipv4Addr::new(10, 5, 0, 12));
        taken.insert(b);
        assert_eq!(
            allocate(&def, "52:54:00:00:00:0A", &taken).unwrap(),
            Ipv4Addr::new(10, 5, 0, 11)
        );
        let e = allocate(&def, "52:54:00:00:00:03", &taken).unwrap_err();
        assert!(e.to_string().contains("every address"), "{e}");
        def.dhcp = Some(DhcpRange {
            start: "10.5.0.20".parse().unwrap(),
            end: "10.5.0.20".parse().unwrap(),
        });
        taken.insert("10.5.0.11".parse().unwrap());
        let e = allocate(&def, "52:54:00:00:00:0a", &taken).unwrap_err();
        assert!(e.to_string().contains("another domain"), "{e}");
    }
}
