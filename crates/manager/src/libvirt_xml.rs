//! libvirt's network, storage pool and storage volume XML, for the virsh-shaped verbs
//! (`net-define FILE`, `pool-define FILE`, `vol-create POOL FILE` and the `*-dumpxml`
//! verbs). As for domains, every element and attribute is either mapped to Vessel's
//! definition or refused in libvirt's wording; elements libvirt itself only reports
//! (a pool's capacity, a volume's allocation of 0) are accepted and not kept, as libvirt
//! does.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use roxmltree::{Document, Node};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::network::{DhcpHost, DhcpRange, NetworkDef};
use crate::storage::Permissions;
use crate::xml_support::unsupported;

fn bad(what: &'static str, why: impl Into<String>) -> Error {
    Error::invalid(what, why)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

fn text(n: Node) -> String {
    n.text().unwrap_or("").trim().to_string()
}

fn child<'a, 'i>(n: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    n.children().find(|c| c.has_tag_name(name))
}

/// Parses a document of one of these small kinds, after the same bounds as domains, and
/// checks each element path and attribute against `table`.
fn parse<'i>(
    what: &'static str,
    xml: &'i str,
    root_name: &str,
    table: &[(&str, &[&str])],
) -> Result<Document<'i>> {
    if xml.len() > 1 << 20 {
        return Err(bad(what, "more than 1 MiB of XML"));
    }
    let opts = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: 10_000,
    };
    let doc = Document::parse_with_options(xml, opts).map_err(|e| bad(what, e.to_string()))?;
    let root = doc.root_element();
    if !root.has_tag_name(root_name) {
        return Err(bad(
            what,
            format!(
                "the root element is <{}>, not <{root_name}>",
                root.tag_name().name()
            ),
        ));
    }
    for n in root.descendants().filter(|n| n.is_element()) {
        let mut parts: Vec<&str> = n
            .ancestors()
            .filter(|a| a.is_element())
            .map(|a| a.tag_name().name())
            .collect();
        parts.reverse();
        let path = parts.join("/");
        let name = n.tag_name().name();
        let Some((_, attrs)) = table.iter().find(|(p, _)| *p == path) else {
            return Err(bad(
                what,
                unsupported(format!("<{name}> ({path}): Vessel does not support it")),
            ));
        };
        if let Some(a) = n
            .attributes()
            .find(|a| a.namespace().is_some() || !attrs.contains(&a.name()))
        {
            return Err(bad(
                what,
                unsupported(format!(
                    "<{name} {}='{}'> ({path}): Vessel does not support this attribute",
                    a.name(),
                    a.value()
                )),
            ));
        }
    }
    Ok(doc)
}

const NETWORK: &[(&str, &[&str])] = &[
    ("network", &[]),
    ("network/name", &[]),
    ("network/uuid", &[]),
    ("network/bridge", &["name", "stp", "delay"]),
    ("network/mac", &["address"]),
    ("network/forward", &["mode"]),
    ("network/forward/nat", &[]),
    ("network/forward/nat/port", &["start", "end"]),
    ("network/ip", &["address", "netmask", "prefix", "family"]),
    ("network/ip/dhcp", &[]),
    ("network/ip/dhcp/range", &["start", "end"]),
    ("network/ip/dhcp/host", &["mac", "ip"]),
];

fn ipv4(what: &'static str, s: &str) -> Result<Ipv4Addr> {
    s.parse()
        .map_err(|_| bad(what, format!("{s:?} is not an IPv4 address")))
}

/// A libvirt `<network>`: a bridge, NAT (`<forward/>` or `mode='nat'`; none means an
/// isolated network), one IPv4 subnet with its DHCP range and fixed hosts.
pub fn network_from_xml(xml: &str) -> Result<NetworkDef> {
    const W: &str = "network XML";
    let doc = parse(W, xml, "network", NETWORK)?;
    let root = doc.root_element();
    let name = child(root, "name")
        .map(text)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad(W, "missing <name>"))?;
    let nat = match child(root, "forward") {
        None => false,
        Some(f) => match f.attribute("mode").unwrap_or("nat") {
            "nat" => true,
            other => {
                return Err(bad(
                    W,
                    unsupported(format!(
                        "<forward mode='{other}'>: Vessel's networks are NAT or isolated"
                    )),
                ))
            }
        },
    };
    // libvirt's NAT masquerades TCP and UDP to ports 1024-65535 unless <port> says.
    let nat_ports = match child(root, "forward").and_then(|f| child(f, "nat")) {
        _ if !nat => None,
        Some(n) => match child(n, "port") {
            Some(p) => {
                let port = |a: &str| {
                    p.attribute(a)
                        .and_then(|v| v.parse::<u16>().ok())
                        .ok_or_else(|| bad(W, format!("<port> needs a {a} port (1-65535)")))
                };
                Some((port("start")?, port("end")?))
            }
            None => Some((1024, 65535)),
        },
        None => Some((1024, 65535)),
    };
    let bridge_el = child(root, "bridge");
    let stp = match bridge_el.and_then(|b| b.attribute("stp")) {
        None | Some("on") => true,
        Some("off") => false,
        Some(o) => return Err(bad(W, format!("<bridge stp='{o}'>: on or off"))),
    };
    let delay = match bridge_el.and_then(|b| b.attribute("delay")) {
        None => 0,
        Some(d) => d
            .parse::<u32>()
            .ok()
            .filter(|d| *d <= 30)
            .ok_or_else(|| bad(W, format!("<bridge delay='{d}'>: 0 to 30 seconds")))?,
    };
    let mac = child(root, "mac")
        .and_then(|m| m.attribute("address"))
        .map(str::to_string);
    let ips: Vec<Node> = root.children().filter(|c| c.has_tag_name("ip")).collect();
    let [ip] = ips.as_slice() else {
        return Err(bad(
            W,
            unsupported("a network needs exactly one IPv4 <ip> (Vessel has no IPv6 yet)"),
        ));
    };
    if let Some(f) = ip.attribute("family").filter(|f| *f != "ipv4") {
        return Err(bad(W, unsupported(format!("<ip family='{f}'>: IPv4 only"))));
    }
    let address = ipv4(
        W,
        ip.attribute("address")
            .ok_or_else(|| bad(W, "<ip> without address"))?,
    )?;
    let prefix = match (ip.attribute("prefix"), ip.attribute("netmask")) {
        (Some(p), None) => p
            .parse::<u8>()
            .ok()
            .filter(|p| (1..=30).contains(p))
            .ok_or_else(|| bad(W, format!("prefix {p:?} (1 to 30)")))?,
        (None, Some(m)) => {
            let bits = u32::from(ipv4(W, m)?);
            if bits.leading_ones() + bits.trailing_zeros() != 32 {
                return Err(bad(W, format!("netmask {m} is not contiguous")));
            }
            // The prefix's own range: a /31, /32 or /0 network has no host addresses to
            // lease (the dump, which says prefix=, would not read back either).
            let p = bits.leading_ones() as u8;
            if !(1..=30).contains(&p) {
                return Err(bad(W, format!("netmask {m} (prefix {p}; 1 to 30)")));
            }
            p
        }
        _ => return Err(bad(W, "<ip> needs one of netmask or prefix")),
    };
    let (mut dhcp, mut hosts) = (None, Vec::new());
    if let Some(d) = child(*ip, "dhcp") {
        for n in d.children().filter(|n| n.is_element()) {
            let attr = |a: &str| {
                n.attribute(a)
                    .ok_or_else(|| bad(W, format!("<{}> without {a}", n.tag_name().name())))
            };
            match n.tag_name().name() {
                "range" if dhcp.is_some() => {
                    return Err(bad(W, unsupported("more than one DHCP <range>")))
                }
                "range" => {
                    dhcp = Some(DhcpRange {
                        start: ipv4(W, attr("start")?)?,
                        end: ipv4(W, attr("end")?)?,
                    })
                }
                _ => hosts.push(DhcpHost {
                    mac: attr("mac")?.to_string(),
                    ip: ipv4(W, attr("ip")?)?,
                }),
            }
        }
    }
    let def = NetworkDef {
        name,
        uuid: match child(root, "uuid").map(text) {
            Some(u) => {
                crate::domain::check_uuid(&u)?;
                Some(u)
            }
            None => None,
        },
        bridge: child(root, "bridge")
            .and_then(|b| b.attribute("name"))
            .map(str::to_string),
        address: format!("{address}/{prefix}"),
        dhcp,
        hosts,
        nat,
        nat_ports,
        stp,
        delay,
        mac,
        autostart: false,
        vni: None,
    };
    Ok(def)
}

/// A network definition as libvirt network XML (`net-dumpxml`).
pub fn network_to_xml(def: &NetworkDef, bridge: &str) -> String {
    let mut x = format!("<network>\n  <name>{}</name>\n", esc(&def.name));
    if let Some(u) = &def.uuid {
        x.push_str(&format!("  <uuid>{}</uuid>\n", esc(u)));
    }
    match (def.nat, def.nat_ports) {
        (true, Some((start, end))) => x.push_str(&format!(
            "  <forward mode='nat'>\n    <nat>\n      <port start='{start}' end='{end}'/>\n    \
             </nat>\n  </forward>\n"
        )),
        (true, None) => x.push_str("  <forward mode='nat'/>\n"),
        (false, _) => {}
    }
    x.push_str(&format!(
        "  <bridge name='{}' stp='{}' delay='{}'/>\n",
        esc(bridge),
        if def.stp { "on" } else { "off" },
        def.delay
    ));
    if let Some(m) = &def.mac {
        x.push_str(&format!("  <mac address='{}'/>\n", esc(m)));
    }
    let (addr, prefix) = def.address.split_once('/').unwrap_or((&def.address, "24"));
    x.push_str(&format!(
        "  <ip address='{}' prefix='{}'>\n",
        esc(addr),
        esc(prefix)
    ));
    if def.dhcp.is_some() || !def.hosts.is_empty() {
        x.push_str("    <dhcp>\n");
        if let Some(r) = &def.dhcp {
            x.push_str(&format!(
                "      <range start='{}' end='{}'/>\n",
                r.start, r.end
            ));
        }
        for h in &def.hosts {
            x.push_str(&format!(
                "      <host mac='{}' ip='{}'/>\n",
                esc(&h.mac),
                h.ip
            ));
        }
        x.push_str("    </dhcp>\n");
    }
    x.push_str("  </ip>\n</network>\n");
    x
}

const POOL: &[(&str, &[&str])] = &[
    ("pool", &["type"]),
    ("pool/name", &[]),
    ("pool/uuid", &[]),
    // Empty for a directory pool: anything inside it is refused by this table.
    ("pool/source", &[]),
    ("pool/target", &[]),
    ("pool/target/path", &[]),
    ("pool/target/permissions", &[]),
    ("pool/target/permissions/mode", &[]),
    ("pool/target/permissions/owner", &[]),
    ("pool/target/permissions/group", &[]),
    // What libvirt reports: accepted and not kept, as libvirt does on define.
    ("pool/capacity", &["unit"]),
    ("pool/allocation", &["unit"]),
    ("pool/available", &["unit"]),
];

/// `<target><permissions>`: mode in octal, owner and group as numbers (libvirt's -1 is
/// "unspecified").
fn permissions(what: &'static str, target: Option<Node>) -> Result<Option<Permissions>> {
    let Some(p) = target.and_then(|t| child(t, "permissions")) else {
        return Ok(None);
    };
    let part = |name: &str, radix: u32| -> Result<Option<u32>> {
        match child(p, name).map(text) {
            None => Ok(None),
            Some(v) if v == "-1" => Ok(None),
            Some(v) => u32::from_str_radix(&v, radix)
                .ok()
                .filter(|n| radix != 8 || *n <= 0o7777)
                .map(Some)
                .ok_or_else(|| {
                    bad(
                        what,
                        format!("<permissions><{name}>{v}</{name}> is not valid"),
                    )
                }),
        }
    };
    Ok(Some(Permissions {
        mode: part("mode", 8)?,
        owner: part("owner", 10)?,
        group: part("group", 10)?,
    }))
}

/// libvirt's `<permissions>` element for what a pool's or volume's JSON says it has.
fn permissions_xml(v: &Value, indent: &str) -> String {
    let p = &v["permissions"];
    let mut x = String::new();
    if let Some(m) = p["mode"].as_u64() {
        x.push_str(&format!("{indent}  <mode>{m:04o}</mode>\n"));
    }
    for k in ["owner", "group"] {
        if let Some(n) = p[k].as_u64() {
            x.push_str(&format!("{indent}  <{k}>{n}</{k}>\n"));
        }
    }
    if x.is_empty() {
        return x;
    }
    format!("{indent}<permissions>\n{x}{indent}</permissions>\n")
}

/// A libvirt pool as pool-define reads it.
type PoolXml = (String, PathBuf, Option<String>, Option<Permissions>);

/// A libvirt `<pool type='dir'>`: its name, target path, UUID and permissions.
pub fn pool_from_xml(xml: &str) -> Result<PoolXml> {
    const W: &str = "pool XML";
    // The pool's type first: an iSCSI or LVM pool is refused as that, not for the first
    // element of its <source> (the table only knows a directory pool's).
    let opts = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: 10_000,
    };
    let ty = (xml.len() <= 1 << 20)
        .then(|| Document::parse_with_options(xml, opts).ok())
        .flatten()
        .and_then(|d| d.root_element().attribute("type").map(str::to_string));
    if let Some(t) = ty.filter(|t| t != "dir") {
        return Err(bad(
            W,
            unsupported(format!(
                "<pool type='{t}'>: Vessel's pools are directories (type='dir')"
            )),
        ));
    }
    let doc = parse(W, xml, "pool", POOL)?;
    let root = doc.root_element();
    if root.attribute("type") != Some("dir") {
        return Err(bad(
            W,
            unsupported("<pool> without type='dir': Vessel's pools are directories"),
        ));
    }
    let name = child(root, "name")
        .map(text)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad(W, "missing <name>"))?;
    let path = child(root, "target")
        .and_then(|t| child(t, "path"))
        .map(text)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad(W, "missing <target><path>"))?;
    let uuid = match child(root, "uuid").map(text) {
        Some(u) => {
            crate::domain::check_uuid(&u)?;
            Some(u)
        }
        None => None,
    };
    let perms = permissions(W, child(root, "target"))?;
    Ok((name, path.into(), uuid, perms))
}

/// A pool (the daemon's pool JSON) as libvirt pool XML (`pool-dumpxml`).
pub fn pool_to_xml(p: &Value) -> String {
    let n = |k: &str| p[k].as_u64().unwrap_or(0);
    let uuid = p["uuid"]
        .as_str()
        .map_or(String::new(), |u| format!("\n  <uuid>{}</uuid>", esc(u)));
    format!(
        "<pool type='dir'>\n  <name>{}</name>{uuid}\n  <capacity unit='bytes'>{}</capacity>\n  \
         <allocation unit='bytes'>{}</allocation>\n  <available unit='bytes'>{}</available>\n  \
         <source>\n  </source>\n  <target>\n    <path>{}</path>\n{}  </target>\n</pool>\n",
        esc(p["name"].as_str().unwrap_or("")),
        n("capacity"),
        n("capacity").saturating_sub(n("available")),
        n("available"),
        esc(p["path"].as_str().unwrap_or("")),
        permissions_xml(p, "    ")
    )
}

const VOLUME: &[(&str, &[&str])] = &[
    ("volume", &["type"]),
    ("volume/name", &[]),
    ("volume/key", &[]),
    // Empty in libvirt's dumps of file volumes: anything inside it is refused here.
    ("volume/source", &[]),
    ("volume/capacity", &["unit"]),
    ("volume/allocation", &["unit"]),
    ("volume/target", &[]),
    ("volume/target/path", &[]),
    ("volume/target/format", &["type"]),
    ("volume/target/permissions", &[]),
    ("volume/target/permissions/mode", &[]),
    ("volume/target/permissions/owner", &[]),
    ("volume/target/permissions/group", &[]),
    // What libvirt's vol-dumpxml reports of a file (taken, not kept: the new file has its
    // own), and a qcow2's version and cluster size, which must be what Vessel makes.
    ("volume/physical", &["unit"]),
    ("volume/target/timestamps", &[]),
    ("volume/target/timestamps/atime", &[]),
    ("volume/target/timestamps/mtime", &[]),
    ("volume/target/timestamps/ctime", &[]),
    ("volume/target/timestamps/btime", &[]),
    ("volume/target/compat", &[]),
    ("volume/target/clusterSize", &["unit"]),
    // Empty only: a qcow2 feature (lazy_refcounts, extended_l2) is refused by the table.
    ("volume/target/features", &[]),
];

/// libvirt's size units (`<capacity unit='G'>`), to bytes; bytes when none is given.
fn sized(what: &'static str, n: Node) -> Result<u64> {
    let v: u64 = text(n)
        .parse()
        .map_err(|_| bad(what, format!("<{}> is not a number", n.tag_name().name())))?;
    let unit: u64 = match n.attribute("unit").unwrap_or("bytes") {
        "b" | "B" | "byte" | "bytes" => 1,
        "KB" => 1000,
        "k" | "K" | "KiB" => 1 << 10,
        "MB" => 1000_u64.pow(2),
        "M" | "MiB" => 1 << 20,
        "GB" => 1000_u64.pow(3),
        "G" | "GiB" => 1 << 30,
        "TB" => 1000_u64.pow(4),
        "T" | "TiB" => 1 << 40,
        "PB" => 1000_u64.pow(5),
        "P" | "PiB" => 1 << 50,
        other => return Err(bad(what, format!("unknown size unit {other:?}"))),
    };
    v.checked_mul(unit)
        .ok_or_else(|| bad(what, "size out of range"))
}

/// A libvirt `<volume>`: name, capacity, format (raw or qcow2; raw when absent).
pub fn volume_from_xml(xml: &str) -> Result<(String, u64, String, Option<Permissions>)> {
    const W: &str = "volume XML";
    let doc = parse(W, xml, "volume", VOLUME)?;
    let root = doc.root_element();
    if let Some(t) = root.attribute("type").filter(|t| *t != "file") {
        return Err(bad(
            W,
            unsupported(format!("<volume type='{t}'>: files only")),
        ));
    }
    let name = child(root, "name")
        .map(text)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad(W, "missing <name>"))?;
    let capacity = sized(
        W,
        child(root, "capacity").ok_or_else(|| bad(W, "missing <capacity>"))?,
    )?;
    if let Some(a) = child(root, "allocation") {
        if sized(W, a)? != 0 {
            return Err(bad(
                W,
                unsupported("<allocation> above 0: Vessel does not preallocate volumes"),
            ));
        }
    }
    // A qcow2 the way Vessel makes it: version 3 (libvirt's compat 1.1), 64 KiB clusters.
    let target = child(root, "target");
    if let Some(c) = target.and_then(|t| child(t, "compat")).map(text) {
        if c != "1.1" {
            return Err(bad(
                W,
                unsupported(format!(
                    "<compat>{c}</compat>: Vessel makes qcow2 version 3 (compat 1.1)"
                )),
            ));
        }
    }
    if let Some(cs) = target.and_then(|t| child(t, "clusterSize")) {
        let bytes = sized(W, cs)?;
        if bytes != 64 << 10 {
            return Err(bad(
                W,
                unsupported(format!(
                    "<clusterSize> of {bytes} bytes: Vessel makes qcow2 clusters of 65536"
                )),
            ));
        }
    }
    let format = match child(root, "target").and_then(|t| child(t, "format")) {
        None => "raw".to_string(),
        Some(f) => match f.attribute("type") {
            Some(t @ ("raw" | "qcow2")) => t.to_string(),
            other => {
                return Err(bad(
                    W,
                    unsupported(format!(
                        "<format type='{}'>: raw or qcow2",
                        other.unwrap_or("")
                    )),
                ))
            }
        },
    };
    if let Some(p) = child(root, "target")
        .and_then(|t| child(t, "path"))
        .map(text)
    {
        if !p.ends_with(&format!("/{name}")) {
            return Err(bad(
                W,
                unsupported(format!(
                    "<target><path>{p}</path>: a volume's file is its pool's folder/name"
                )),
            ));
        }
    }
    let perms = permissions(W, child(root, "target"))?;
    Ok((name, capacity, format, perms))
}

/// A volume (the daemon's volume JSON) as libvirt volume XML (`vol-dumpxml`).
pub fn volume_to_xml(v: &Value) -> String {
    let path = v["path"].as_str().unwrap_or("");
    format!(
        "<volume type='file'>\n  <name>{}</name>\n  <key>{}</key>\n  \
         <capacity unit='bytes'>{}</capacity>\n  <allocation unit='bytes'>{}</allocation>\n  \
         <target>\n    <path>{}</path>\n    <format type='{}'/>\n{}  </target>\n</volume>\n",
        esc(v["name"].as_str().unwrap_or("")),
        esc(path),
        v["capacity"].as_u64().unwrap_or(0),
        v["allocation"].as_u64().unwrap_or(0),
        esc(path),
        esc(v["format"].as_str().unwrap_or("raw")),
        permissions_xml(v, "    ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of libvirt's own default network (written here, not copied).
    const DEFAULT_NET: &str = r#"<network>
  <name>default</name>
  <bridge name="virbr0"/>
  <forward/>
  <ip address="192.168.122.1" netmask="255.255.255.0">
    <dhcp>
      <range start="192.168.122.2" end="192.168.122.254"/>
    </dhcp>
  </ip>
</network>"#;

    #[test]
    fn libvirts_default_network_maps_and_round_trips() {
        let d = network_from_xml(DEFAULT_NET).unwrap();
        assert_eq!(d.name, "default");
        assert_eq!(d.bridge.as_deref(), Some("virbr0"));
        assert_eq!(d.address, "192.168.122.1/24");
        assert!(d.nat);
        let r = d.dhcp.clone().unwrap();
        assert_eq!(
            (r.start.to_string(), r.end.to_string()),
            ("192.168.122.2".into(), "192.168.122.254".into())
        );
        let again = network_from_xml(&network_to_xml(&d, "virbr0")).unwrap();
        assert_eq!(again, d);
        // No <forward>: isolated; hosts map; a prefix works as well as a netmask.
        let iso = network_from_xml(
            "<network><name>iso</name><ip address='10.1.0.1' prefix='16'><dhcp>\
             <host mac='52:54:00:00:00:07' ip='10.1.0.7'/></dhcp></ip></network>",
        )
        .unwrap();
        assert!(!iso.nat);
        assert_eq!(iso.address, "10.1.0.1/16");
        assert_eq!(iso.hosts[0].mac, "52:54:00:00:00:07");
    }

    /// libvirt's own schemas accept every network, pool and volume dump (virt-xml-validate
    /// from Debian's libvirt-clients, which scripts/test.sh installs), and each dump
    /// defines back to the same thing.
    /// libvirt's own dumps carry a network UUID and an empty volume <source>: both are
    /// taken (the UUID kept and dumped again), not refused.
    #[test]
    fn a_network_keeps_its_uuid_and_a_volume_may_have_an_empty_source() {
        let u = "7d1b2b8e-4bb4-4c64-9a55-3d2f5c1f0a11";
        let n = network_from_xml(&format!(
            "<network><name>n</name><uuid>{u}</uuid><ip address='10.9.0.1' prefix='24'/></network>"
        ))
        .unwrap();
        assert_eq!(n.uuid.as_deref(), Some(u));
        let dump = network_to_xml(&n, "vbr-n");
        assert!(dump.contains(&format!("<uuid>{u}</uuid>")), "{dump}");
        assert_eq!(network_from_xml(&dump).unwrap().uuid, n.uuid);
        // What `virsh net-dumpxml default` prints on a libvirt host defines as it says,
        // and dumps back to the same.
        let lv = format!(
            "<network><name>default</name><uuid>{u}</uuid><forward mode='nat'><nat>\
             <port start='1024' end='65535'/></nat></forward>\
             <bridge name='virbr0' stp='on' delay='0'/><mac address='52:54:00:0a:cd:21'/>\
             <ip address='192.168.122.1' netmask='255.255.255.0'><dhcp>\
             <range start='192.168.122.2' end='192.168.122.254'/></dhcp></ip></network>"
        );
        let d = network_from_xml(&lv).unwrap();
        assert!(d.stp && d.delay == 0 && d.nat_ports == Some((1024, 65535)));
        assert_eq!(d.mac.as_deref(), Some("52:54:00:0a:cd:21"));
        let dump = network_to_xml(&d, "virbr0");
        for said in [
            "<port start='1024' end='65535'/>",
            "<bridge name='virbr0' stp='on' delay='0'/>",
            "<mac address='52:54:00:0a:cd:21'/>",
        ] {
            assert!(dump.contains(said), "{said}: {dump}");
        }
        assert_eq!(network_from_xml(&dump).unwrap(), d);
        let (name, size, _, _) = volume_from_xml(
            "<volume><name>v</name><source>\n</source><capacity unit='M'>1</capacity></volume>",
        )
        .unwrap();
        assert_eq!((name.as_str(), size), ("v", 1 << 20));
        let e = volume_from_xml(
            "<volume><name>v</name><source><extent start='0' end='1'/></source>\
             <capacity>1</capacity></volume>",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unsupported configuration: <extent>"), "{e}");
    }

    #[test]
    fn network_pool_and_volume_dumps_pass_virt_xml_validate() {
        let dir = std::env::temp_dir().join(format!("vessel-nxv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut net = network_from_xml(DEFAULT_NET).unwrap();
        net.hosts.push(DhcpHost {
            mac: "52:54:00:00:00:07".into(),
            ip: "192.168.122.7".parse().unwrap(),
        });
        let mut iso = network_from_xml(
            "<network><name>iso</name><ip address='10.1.0.1' prefix='16'/></network>",
        )
        .unwrap();
        iso.uuid = Some("7d1b2b8e-4bb4-4c64-9a55-3d2f5c1f0a11".into());
        let pool = serde_json::json!({"name": "images", "path": "/var/lib/vessel/images",
                                      "uuid": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
                                      "permissions": {"mode": 0o755, "owner": 0, "group": 0},
                                      "capacity": 100, "available": 40});
        let vol = serde_json::json!({"name": "d.qcow2", "path": "/var/lib/vessel/images/d.qcow2",
                                     "capacity": 1u64 << 30, "allocation": 0, "format": "qcow2",
                                     "permissions": {"mode": 0o600, "owner": 0, "group": 107}});
        let dumps = [
            ("network", network_to_xml(&net, "virbr0")),
            ("network", network_to_xml(&iso, "vbr-iso")),
            ("storagepool", pool_to_xml(&pool)),
            ("storagevol", volume_to_xml(&vol)),
        ];
        for (i, (kind, xml)) in dumps.iter().enumerate() {
            let f = dir.join(format!("{i}.xml"));
            std::fs::write(&f, xml).unwrap();
            let out = std::process::Command::new("virt-xml-validate")
                .arg(&f)
                .arg(kind)
                .output()
                .expect("virt-xml-validate (apt-get install libvirt-clients)");
            assert!(
                out.status.success(),
                "{xml}\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert_eq!(network_from_xml(&dumps[0].1).unwrap(), net);
        assert_eq!(
            volume_from_xml(&dumps[3].1).unwrap(),
            (
                "d.qcow2".into(),
                1 << 30,
                "qcow2".into(),
                Some(Permissions {
                    mode: Some(0o600),
                    owner: Some(0),
                    group: Some(107)
                })
            )
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// What `virsh vol-dumpxml` prints of an empty qcow2 on a libvirt host (its timestamps,
    /// physical size, compat and cluster size) creates the same volume; another qcow2
    /// version or cluster size is refused by name.
    #[test]
    fn a_libvirt_volume_dump_creates_its_volume() {
        let dump = "<volume type='file'><name>d.qcow2</name><key>/i/d.qcow2</key>\
            <capacity unit='bytes'>1073741824</capacity><allocation unit='bytes'>0</allocation>\
            <physical unit='bytes'>196624</physical><target><path>/i/d.qcow2</path>\
            <format type='qcow2'/><permissions><mode>0600</mode><owner>0</owner>\
            <group>0</group></permissions><timestamps><atime>1700000000.1</atime>\
            <mtime>1700000000.1</mtime><ctime>1700000000.1</ctime></timestamps>\
            <compat>1.1</compat><clusterSize unit='B'>65536</clusterSize><features/>\
            </target></volume>";
        let (n, cap, f, p) = volume_from_xml(dump).unwrap();
        assert_eq!((n.as_str(), cap, f.as_str()), ("d.qcow2", 1 << 30, "qcow2"));
        assert_eq!(p.and_then(|p| p.mode), Some(0o600));
        for (from, to, want) in [
            (
                "<compat>1.1</compat>",
                "<compat>0.10</compat>",
                "<compat>0.10</compat>",
            ),
            (
                "65536</clusterSize>",
                "2097152</clusterSize>",
                "2097152 bytes",
            ),
            (
                "<features/>",
                "<features><lazy_refcounts/></features>",
                "<lazy_refcounts>",
            ),
        ] {
            let e = volume_from_xml(&dump.replace(from, to))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{to}: {e}");
        }
    }

    /// libvirt's pool and volume dumps carry <permissions>: read (mode in octal, -1 as
    /// unspecified) and written back; anything else in it (a label) refused.
    #[test]
    fn permissions_of_pools_and_volumes_read_and_dump() {
        let (_, _, _, p) = pool_from_xml(
            "<pool type='dir'><name>p</name><target><path>/p</path><permissions>\
             <mode>0711</mode><owner>-1</owner><group>107</group></permissions></target></pool>",
        )
        .unwrap();
        assert_eq!(
            p,
            Some(Permissions {
                mode: Some(0o711),
                owner: None,
                group: Some(107)
            })
        );
        let dump = pool_to_xml(&serde_json::json!({"name": "p", "path": "/p",
            "permissions": {"mode": 0o711, "owner": 0, "group": 107}}));
        assert!(
            dump.contains("<mode>0711</mode>") && dump.contains("<group>107</group>"),
            "{dump}"
        );
        let e = volume_from_xml(
            "<volume><name>v</name><capacity>1</capacity><target><permissions>\
             <label>virt_image_t</label></permissions></target></volume>",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unsupported configuration: <label>"), "{e}");
        let e = volume_from_xml(
            "<volume><name>v</name><capacity>1</capacity><target><permissions>\
             <mode>0999</mode></permissions></target></volume>",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("<mode>0999</mode> is not valid"), "{e}");
    }

    #[test]
    fn network_elements_vessel_lacks_are_refused() {
        for (xml, want) in [
            ("<network><name>n</name><forward mode='bridge'/><ip address='10.0.0.1' prefix='24'/></network>", "mode='bridge'"),
            ("<network><name>n</name><ip family='ipv6' address='fd00::1' prefix='64'/></network>", "family='ipv6'"),
            ("<network><name>n</name><dns><host ip='10.0.0.2'/></dns><ip address='10.0.0.1' prefix='24'/></network>", "<dns>"),
            ("<network><name>n</name><bridge name='b' stp='maybe'/><ip address='10.0.0.1' prefix='24'/></network>", "on or off"),
            ("<network><name>n</name><uuid>x</uuid><ip address='10.0.0.1' prefix='24'/></network>", "invalid uuid: \"x\""),
            ("<network><name>n</name><ip address='10.0.0.1' netmask='255.255.255.255'/></network>", "prefix 32; 1 to 30"),
            ("<network><name>n</name><ip address='10.0.0.1' netmask='0.0.0.0'/></network>", "prefix 0; 1 to 30"),
            ("<network><name>n</name><ip address='10.0.0.1' netmask='255.0.255.0'/></network>", "contiguous"),
            ("<network><name>n</name></network>", "exactly one IPv4"),
            ("<network><name>n</name><ip address='10.0.0.1' prefix='24'><dhcp><host mac='52:54:00:00:00:01' name='web' ip='10.0.0.5'/></dhcp></ip></network>", "name='web'"),
        ] {
            let e = network_from_xml(xml).unwrap_err().to_string();
            assert!(e.contains(want), "{xml}: {e}");
        }
    }

    #[test]
    fn pools_and_volumes_map_and_refuse() {
        let (n, p, _, _) = pool_from_xml(
            "<pool type='dir'><name>images</name><capacity unit='bytes'>1</capacity>\
             <source/><target><path>/var/lib/vessel/images</path></target></pool>",
        )
        .unwrap();
        assert_eq!(
            (n.as_str(), p.to_str()),
            ("images", Some("/var/lib/vessel/images"))
        );
        let dumped = pool_to_xml(
            &serde_json::json!({"name": "images", "path": "/var/lib/vessel/images", "capacity": 100, "available": 40}),
        );
        assert_eq!(pool_from_xml(&dumped).unwrap().1, p);
        // libvirt's pool dumps carry a UUID: taken, and dumped back.
        let u = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
        let (_, _, got, _) = pool_from_xml(&format!(
            "<pool type='dir'><name>images</name><uuid>{u}</uuid>\
             <target><path>/var/lib/vessel/images</path></target></pool>"
        ))
        .unwrap();
        assert_eq!(got.as_deref(), Some(u));
        let dumped = pool_to_xml(&serde_json::json!({"name": "images", "uuid": u,
            "path": "/var/lib/vessel/images", "capacity": 100, "available": 40}));
        assert_eq!(pool_from_xml(&dumped).unwrap().2.as_deref(), Some(u));
        for (xml, want) in [
            ("<pool type='logical'><name>v</name><target><path>/dev/v</path></target></pool>", "type='logical'"),
            ("<pool type='dir'><name>v</name><target><path>/p</path><permissions><label>x</label></permissions></target></pool>", "<label>"),
        ] {
            let e = pool_from_xml(xml).unwrap_err().to_string();
            assert!(e.contains(want), "{xml}: {e}");
        }
        let (n, cap, f, _) = volume_from_xml(
            "<volume><name>disk.qcow2</name><capacity unit='G'>10</capacity>\
             <allocation>0</allocation><target><format type='qcow2'/></target></volume>",
        )
        .unwrap();
        assert_eq!(
            (n.as_str(), cap, f.as_str()),
            ("disk.qcow2", 10 << 30, "qcow2")
        );
        let (_, cap, f, _) =
            volume_from_xml("<volume><name>r</name><capacity>512</capacity></volume>").unwrap();
        assert_eq!((cap, f.as_str()), (512, "raw"));
        let dumped = volume_to_xml(
            &serde_json::json!({"name": "r", "path": "/p/r", "capacity": 512, "allocation": 0, "format": "raw"}),
        );
        assert_eq!(
            volume_from_xml(&dumped).unwrap(),
            ("r".into(), 512, "raw".into(), None)
        );
        for (xml, want) in [
            ("<volume><name>v</name><capacity>1</capacity><allocation unit='M'>1</allocation></volume>", "preallocate"),
            ("<volume><name>v</name><capacity>1</capacity><target><format type='vmdk'/></target></volume>", "vmdk"),
            ("<volume><name>v</name><capacity>1</capacity><backingStore><path>/b</path></backingStore></volume>", "<backingStore>"),
            ("<volume><name>v</name><capacity unit='parsec'>1</capacity></volume>", "unit"),
        ] {
            let e = volume_from_xml(xml).unwrap_err().to_string();
            assert!(e.contains(want), "{xml}: {e}");
        }
    }
}
