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
}

/// A domain as the cluster records it: its definition, the host it is placed on, and
/// whether it should be running (so that evacuation restarts only what was running).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DomainRecord {
    pub def: DomainDef,
    pub host: String,
    #[serde(default)]
    pub running: bool,
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

/// Picks the host for `def` among `hosts` (the live ones not in maintenance), given every
/// domain already placed. Errors name each host and why it did not fit.
pub fn place(
    def: &DomainDef,
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
        match refusal(h, &u, def) {
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
            let h = place(&d, hosts, &placed, w).unwrap();
            placed.push(DomainRecord {
                def: d,
                host: h,
                running: false,
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
            place(&def("x", 512), &hosts, &[], Weigher::Pack).unwrap(),
            "b"
        );
        let e = place(&def("x", 8192), &hosts, &[], Weigher::Spread).unwrap_err();
        assert!(
            e.contains("a: 100 MiB free") && e.contains("b: 4096 MiB free"),
            "{e}"
        );
        let mut kvm = def("k", 64);
        kvm.vm.accel = vmm::config::Accel::Kvm;
        let e = place(&kvm, &hosts, &[], Weigher::Spread).unwrap_err();
        assert!(e.contains("no kvm accelerator"), "{e}");
        // vCPUs: sixteen on each host, a seventeenth does not fit.
        let mut big = def("big", 64);
        big.vm.cpus = 17;
        assert!(place(&big, &hosts, &[], Weigher::Spread)
            .unwrap_err()
            .contains("16 vCPUs free"));
        assert!(place(&def("x", 1), &[], &[], Weigher::Spread).is_err());
    }
}
