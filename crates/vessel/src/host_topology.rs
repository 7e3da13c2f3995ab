//! The host's CPU topology as virsh's `nodeinfo` prints it, read from /proc/cpuinfo and
//! /sys (the daemon's host when the client reaches it over its Unix socket).

/// What `nodeinfo` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub cpus: usize,
    pub mhz: u64,
    pub sockets: usize,
    pub cores_per_socket: usize,
    pub threads_per_core: usize,
    pub numa_cells: usize,
}

/// Reads the host's topology; what a file does not say counts as one.
pub fn read() -> Topology {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let nodes = std::fs::read_dir("/sys/devices/system/node")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.strip_prefix("node")
                        .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
                })
                .count()
        })
        .unwrap_or(0);
    from_cpuinfo(&cpuinfo, nodes)
}

/// The topology /proc/cpuinfo's text describes, with `nodes` NUMA nodes.
pub fn from_cpuinfo(text: &str, nodes: usize) -> Topology {
    let mut cpus = 0usize;
    let mut mhz = 0f64;
    let mut sockets = std::collections::BTreeSet::new();
    let mut cores = 0usize;
    let mut siblings = 0usize;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k.trim() {
            "processor" => cpus += 1,
            "cpu MHz" if mhz == 0.0 => mhz = v.parse().unwrap_or(0.0),
            "physical id" => {
                sockets.insert(v.to_string());
            }
            "cpu cores" if cores == 0 => cores = v.parse().unwrap_or(0),
            "siblings" if siblings == 0 => siblings = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    let cpus = cpus.max(1);
    let sockets = sockets.len().max(1);
    let cores = if cores == 0 { cpus / sockets } else { cores }.max(1);
    let threads = if siblings >= cores {
        siblings / cores
    } else {
        1
    }
    .max(1);
    Topology {
        cpus,
        mhz: mhz as u64,
        sockets,
        cores_per_socket: cores,
        threads_per_core: threads,
        numa_cells: nodes.max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_sockets_of_four_cores_of_two_threads() {
        let mut text = String::new();
        for cpu in 0..16 {
            text.push_str(&format!(
                "processor\t: {cpu}\ncpu MHz\t\t: 2100.000\nphysical id\t: {}\nsiblings\t: 8\ncpu cores\t: 4\n\n",
                cpu / 8
            ));
        }
        assert_eq!(
            from_cpuinfo(&text, 2),
            Topology {
                cpus: 16,
                mhz: 2100,
                sockets: 2,
                cores_per_socket: 4,
                threads_per_core: 2,
                numa_cells: 2
            }
        );
        // A guest's cpuinfo without topology lines: one socket of single-thread cores.
        let t = from_cpuinfo("processor : 0\nprocessor : 1\n", 0);
        assert_eq!(
            (t.cpus, t.sockets, t.cores_per_socket, t.threads_per_core),
            (2, 1, 2, 1)
        );
    }
}
