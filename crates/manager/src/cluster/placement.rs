//! Where a domain goes: Nova's filter-then-weigh scheduling over the hosts registered in
//! etcd. Pure functions over records, so the choice is the same on every daemon that
//! computes it and can be tested without a cluster.

use serde::{Deserialize, Serialize};

use crate::domain::DomainDef;

/// One host as it registers itself (under its lease): what it has, not what is used.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    pub name: String,
    /// vCPUs it accepts in all (its CPUs times the daemon's CPU allocation ratio).
    pub vcpus: u64,
    pub memory_mib: u64,
    /// Accelerators its VMMs can use ("emu" always, "kvm" with /dev/kvm).
    pub accelerators: Vec<String>,
    pub pools: Vec<String>,
    pub networks: Vec<String>,
    /// Where its daemon answers (its Unix socket, and TCP address when it has one).
    pub api: String,
    /// Its daemon's Unix socket, for hosts that share a file system with it.
    #[serde(default)]
    pub socket: String,
    /// Its daemon's TCP API (`HOST:PORT`), where other hosts send live migrations.
    #[serde(default)]
    pub tcp: Option<String>,
    /// Where its overlay networks' VXLAN packets come to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay_ip: Option<std::net::Ipv4Addr>,
    /// Its overlay networks (those with a VNI), whose addresses the cluster allocates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overlays: Vec<crate::network::NetworkDef>,
}

/// A domain interface's address on an overlay network: the cluster's, unique among its
/// domains, and the domain's wherever it runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    pub network: String,
    pub mac: String,
    pub ip: std::net::Ipv4Addr,
}

/// A domain as the cluster records it: its definition, the host it is placed on, and
/// whether it should be running (so that evacuation restarts only what was running).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DomainRecord {
    pub def: DomainDef,
    pub host: String,
    #[serde(default)]
    pub running: bool,
    /// The server group it joined at define (never changes afterwards, as in Nova).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Its addresses on overlay networks, allocated at placement.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<Address>,
    /// The host whose API recorded the definition's files (`def.chains`,
    /// `def.boot_files`: where each name led and which file it was) and checked the
    /// client's rights on them: that host's define compares the files it opens with
    /// those records, as a single host's define does. Another host's files are its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_recorded_on: Option<String>,
}

/// Nova's server group policies: members on one host, or each on a host of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    Affinity,
    AntiAffinity,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "affinity" => Ok(Policy::Affinity),
            "anti-affinity" => Ok(Policy::AntiAffinity),
            _ => Err(format!("policy {s:?}: use affinity or anti-affinity")),
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Policy::Affinity => "affinity",
            Policy::AntiAffinity => "anti-affinity",
        })
    }
}

/// A server group (`groups/G` in etcd). Its members are the domains whose record names
/// it, so a domain that is undefined leaves it with nothing else to update.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    pub policy: Policy,
}

/// Why `host` breaks `group` for domain `name`, given where the other members are
/// placed; `hosts` are the hosts it may go to now (an affinity group follows its
/// members only where they can still be followed: not to a drained or lost host).
pub fn group_refusal(
    group: &Group,
    name: &str,
    host: &str,
    hosts: &[HostRecord],
    domains: &[DomainRecord],
) -> Option<String> {
    let members = domains
        .iter()
        .filter(|d| d.group.as_deref() == Some(group.name.as_str()) && d.def.name != name);
    match group.policy {
        Policy::AntiAffinity => {
            let here: Vec<&str> = members
                .filter(|d| d.host == host)
                .map(|d| d.def.name.as_str())
                .collect();
            (!here.is_empty()).then(|| {
                format!(
                    "{host}: anti-affinity group {:?} has {} here",
                    group.name,
                    here.join(", ")
                )
            })
        }
        Policy::Affinity => {
            let mut at: Vec<&str> = members
                .map(|d| d.host.as_str())
                .filter(|h| hosts.iter().any(|x| x.name == *h))
                .collect();
            at.sort_unstable();
            at.dedup();
            (!at.is_empty() && !at.contains(&host)).then(|| {
                format!(
                    "{host}: affinity group {:?} has its members on {}",
                    group.name,
                    at.join(", ")
                )
            })
        }
    }
}

/// Spread fills the emptiest host first (Nova's default RAM weigher); pack the fullest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weigher {
    #[default]
    Spread,
    Pack,
}

impl std::str::FromStr for Weigher {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "spread" => Ok(Weigher::Spread),
            "pack" => Ok(Weigher::Pack),
            _ => Err(format!("weigher {s:?}: use spread or pack")),
        }
    }
}

/// A host's capacity less what the domains placed on it take.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub domains: u64,
    pub vcpus: u64,
    pub memory_mib: u64,
}

/// What the domains placed on `host` take (defined or running: a placement holds its
/// resources, as Nova's allocations do, so a later start cannot fail for room).
pub fn usage<'a>(host: &str, domains: impl IntoIterator<Item = &'a DomainRecord>) -> Usage {
    let mut u = Usage {
        domains: 0,
        vcpus: 0,
        memory_mib: 0,
    };
    for d in domains.into_iter().filter(|d| d.host == host) {
        u.domains += 1;
        u.vcpus += u64::from(d.def.vm.cpus.max(1));
        u.memory_mib += d.def.vm.memory_mib;
    }
    u
}

/// The accelerator a definition asks for, as hosts list theirs ("auto" fits any host).
pub fn accel_name(def: &DomainDef) -> String {
    serde_json::to_value(def.vm.accel)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "auto".into())
}

/// Why a host was passed over, for the error when none fits.
fn refusal(h: &HostRecord, u: &Usage, def: &DomainDef) -> Option<String> {
    let need_cpus = u64::from(def.vm.cpus.max(1));
    if u.memory_mib.saturating_add(def.vm.memory_mib) > h.memory_mib {
        return Some(format!(
            "{}: {} MiB free, {} MiB asked",
            h.name,
            h.memory_mib.saturating_sub(u.memory_mib),
            def.vm.memory_mib
        ));
    }
    if u.vcpus.saturating_add(need_cpus) > h.vcpus {
        return Some(format!(
            "{}: {} vCPUs free, {need_cpus} asked",
            h.name,
            h.vcpus.saturating_sub(u.vcpus)
        ));
    }
    let accel = accel_name(def);
    if accel != "auto" && !h.accelerators.contains(&accel) {
        return Some(format!("{}: no {accel} accelerator", h.name));
    }
    for net in def.interfaces.iter().filter_map(|i| i.network.as_ref()) {
        if !h.networks.contains(net) {
            return Some(format!("{}: no network {net:?}", h.name));
        }
    }
    for vol in def.volumes.values() {
        let pool = vol.split('/').next().unwrap_or_default();
        if !h.pools.iter().any(|p| p == pool) {
            return Some(format!("{}: no pool {pool:?}", h.name));
        }
    }
    None
}

/// Picks the host for `def` (a member of `group`, if any) among `hosts` (the live ones not
/// in maintenance), given every domain already placed. Errors name each host and why it
/// did not fit.
pub fn place(
    def: &DomainDef,
    group: Option<&Group>,
    hosts: &[HostRecord],
    domains: &[DomainRecord],
    weigher: Weigher,
) -> Result<String, String> {
    if hosts.is_empty() {
        return Err("no host is available (none registered, or all in maintenance)".into());
    }
    let mut why = Vec::new();
    let mut fit = Vec::new();
    for h in hosts {
        // The domain's own record (a move) does not count against any host.
        let others = domains.iter().filter(|d| d.def.name != def.name);
        let u = usage(&h.name, others);
        let refused = refusal(h, &u, def)
            .or_else(|| group.and_then(|g| group_refusal(g, &def.name, &h.name, hosts, domains)));
        match refused {
            Some(r) => why.push(r),
            None => fit.push((h, u)),
        }
    }
    // Free memory as a share of the host's, then fewer domains, then the name: the
    // same answer on every daemon.
    let key = |(h, u): &(&HostRecord, Usage)| {
        let free = h.memory_mib.saturating_sub(u.memory_mib) as u128 * 1_000_000
            / u128::from(h.memory_mib.max(1));
        (free, u.domains)
    };
    let best = match weigher {
        Weigher::Spread => fit.iter().min_by(|a, b| {
            let (fa, da) = key(a);
            let (fb, db) = key(b);
            fb.cmp(&fa).then(da.cmp(&db)).then(a.0.name.cmp(&b.0.name))
        }),
        Weigher::Pack => fit.iter().min_by(|a, b| {
            let (fa, da) = key(a);
            let (fb, db) = key(b);
            fa.cmp(&fb).then(db.cmp(&da)).then(a.0.name.cmp(&b.0.name))
        }),
    };
    best.map(|(h, _)| h.name.clone())
        .ok_or_else(|| format!("no host fits domain {:?}: {}", def.name, why.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, mem: u64) -> HostRecord {
        HostRecord {
            name: name.into(),
            vcpus: 16,
            memory_mib: mem,
            accelerators: vec!["emu".into()],
            pools: vec![],
            networks: vec![],
            api: String::new(),
            socket: String::new(),
            tcp: None,
            overlay_ip: None,
            overlays: vec![],
        }
    }

    fn def(name: &str, mem: u64) -> DomainDef {
        serde_json::from_value(serde_json::json!({
            "name": name, "vm": {"cmdline": "", "memory_mib": mem, "accel": "emu"}
        }))
        .unwrap()
    }

    fn place_all(w: Weigher, hosts: &[HostRecord], n: usize) -> Vec<DomainRecord> {
        let mut placed = Vec::new();
        for i in 0..n {
            let d = def(&format!("d{i}"), 64);
            let h = place(&d, None, hosts, &placed, w).unwrap();
            placed.push(DomainRecord {
                def: d,
                host: h,
                running: false,
                group: None,
                addresses: vec![],
                files_recorded_on: None,
            });
        }
        placed
    }

    #[test]
    fn spread_lands_evenly_and_pack_fills_one_host() {
        let hosts = [host("a", 4096), host("b", 4096), host("c", 4096)];
        let placed = place_all(Weigher::Spread, &hosts, 30);
        for h in ["a", "b", "c"] {
            assert_eq!(usage(h, &placed).domains, 10, "{h}");
        }
        let placed = place_all(Weigher::Pack, &hosts, 5);
        assert!(placed.iter().all(|d| d.host == placed[0].host));
    }

    #[test]
    fn filters_refuse_with_each_hosts_reason() {
        let hosts = [host("a", 100), host("b", 4096)];
        assert_eq!(
            place(&def("x", 512), None, &hosts, &[], Weigher::Pack).unwrap(),
            "b"
        );
        let e = place(&def("x", 8192), None, &hosts, &[], Weigher::Spread).unwrap_err();
        assert!(
            e.contains("a: 100 MiB free") && e.contains("b: 4096 MiB free"),
            "{e}"
        );
        let mut kvm = def("k", 64);
        kvm.vm.accel = vmm::config::Accel::Kvm;
        let e = place(&kvm, None, &hosts, &[], Weigher::Spread).unwrap_err();
        assert!(e.contains("no kvm accelerator"), "{e}");
        // vCPUs: sixteen on each host, a seventeenth does not fit.
        let mut big = def("big", 64);
        big.vm.cpus = 17;
        assert!(place(&big, None, &hosts, &[], Weigher::Spread)
            .unwrap_err()
            .contains("16 vCPUs free"));
        assert!(place(&def("x", 1), None, &[], &[], Weigher::Spread).is_err());
    }

    /// Anti-affinity puts each member on a host of its own and refuses one more than
    /// there are hosts; affinity puts every member with the first, and follows it to
    /// another host only when the first member's host is no longer a candidate.
    #[test]
    fn server_groups_filter_hosts() {
        let hosts = [host("a", 4096), host("b", 4096), host("c", 4096)];
        let anti = Group {
            name: "web".into(),
            policy: Policy::AntiAffinity,
        };
        let mut placed: Vec<DomainRecord> = Vec::new();
        // Pack would put them all on one host: the group overrides the weigher.
        for i in 0..3 {
            let d = def(&format!("w{i}"), 64);
            let h = place(&d, Some(&anti), &hosts, &placed, Weigher::Pack).unwrap();
            placed.push(DomainRecord {
                def: d,
                host: h,
                running: false,
                group: Some("web".into()),
                addresses: vec![],
                files_recorded_on: None,
            });
        }
        let mut used: Vec<&str> = placed.iter().map(|d| d.host.as_str()).collect();
        used.sort_unstable();
        assert_eq!(used, ["a", "b", "c"]);
        let e = place(&def("w3", 64), Some(&anti), &hosts, &placed, Weigher::Pack).unwrap_err();
        assert!(
            e.contains("anti-affinity group \"web\" has w0 here") && e.contains("c:"),
            "{e}"
        );
        // A domain outside the group is not held back by it.
        assert!(place(&def("other", 64), None, &hosts, &placed, Weigher::Pack).is_ok());

        let aff = Group {
            name: "db".into(),
            policy: Policy::Affinity,
        };
        let mut placed: Vec<DomainRecord> = Vec::new();
        for i in 0..4 {
            let d = def(&format!("d{i}"), 64);
            let h = place(&d, Some(&aff), &hosts, &placed, Weigher::Spread).unwrap();
            placed.push(DomainRecord {
                def: d,
                host: h,
                running: false,
                group: Some("db".into()),
                addresses: vec![],
                files_recorded_on: None,
            });
        }
        assert!(
            placed.iter().all(|d| d.host == placed[0].host),
            "{placed:?}"
        );
        let first = placed[0].host.clone();
        let e = group_refusal(&aff, "d9", "zz", &hosts, &placed).unwrap();
        assert!(e.contains(&format!("has its members on {first}")), "{e}");
        // Its host drained: the members may go elsewhere, together.
        let rest: Vec<HostRecord> = hosts.iter().filter(|h| h.name != first).cloned().collect();
        let to = place(&placed[0].def, Some(&aff), &rest, &placed, Weigher::Spread).unwrap();
        assert_ne!(to, first);
        placed[0].host = to.clone();
        let next = place(&placed[1].def, Some(&aff), &rest, &placed, Weigher::Spread).unwrap();
        assert_eq!(next, to);
    }
}
