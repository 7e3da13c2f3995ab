//! Counters for the dashboard's graphs and the Prometheus endpoint: per domain, the CPU
//! time of its VMM process split into guest (vCPU threads) and VMM (every other thread),
//! its resident memory, and what its disks and interfaces served (from the Vessel VMM's
//! `GET /vessel/counters`); per host, CPU, memory, disk and network from /proc.
//!
//! Everything is cumulative and sampled when asked (nothing runs while nobody looks):
//! the browser turns two samples into rates, as Prometheus does with `rate()`.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::domain::DriverKind;
use crate::manager::Manager;

/// One domain's counters.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DomainStats {
    pub name: String,
    pub state: &'static str,
    pub driver: &'static str,
    pub accel: String,
    pub vcpus: u8,
    pub memory_bytes: u64,
    /// CPU seconds of the vCPU threads (`vcpuN`, QEMU's `CPU N/…`).
    pub cpu_guest_s: Option<f64>,
    /// CPU seconds of the VMM's other threads (devices, I/O, the API).
    pub cpu_vmm_s: Option<f64>,
    pub rss_bytes: Option<u64>,
    pub disk_read_bytes: Option<u64>,
    pub disk_write_bytes: Option<u64>,
    pub net_rx_bytes: Option<u64>,
    pub net_tx_bytes: Option<u64>,
}

/// The host's counters.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HostStats {
    pub hostname: String,
    pub cpus: usize,
    /// CPU seconds all CPUs spent busy, and in all, since boot.
    pub cpu_busy_s: f64,
    pub cpu_total_s: f64,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
}

/// One sample of everything.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    /// Seconds since the Unix epoch when the sample was taken.
    pub time: f64,
    pub host: HostStats,
    pub domains: Vec<DomainStats>,
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf reads a configuration value; no memory is involved.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime (in ticks) and the thread name from a /proc/…/stat line.
fn parse_stat(s: &str) -> Option<(String, u64)> {
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = s.get(close + 1..)?.split_whitespace().collect();
    // After the name: state(0) ppid(1) … utime(11) stime(12).
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

fn is_vcpu_thread(comm: &str) -> bool {
    comm.starts_with("vcpu") || comm.starts_with("CPU ")
}

/// (vCPU threads found, guest ticks, vmm ticks) of one process, from its threads.
fn threads_cpu(pid: i32) -> Option<(bool, u64, u64)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let (mut vcpus, mut guest, mut vmm) = (false, 0u64, 0u64);
    for t in tasks.flatten() {
        let Ok(s) = std::fs::read_to_string(t.path().join("stat")) else {
            continue; // the thread ended meanwhile
        };
        if let Some((comm, ticks)) = parse_stat(&s) {
            if is_vcpu_thread(&comm) {
                vcpus = true;
                guest += ticks;
            } else {
                vmm += ticks;
            }
        }
    }
    Some((vcpus, guest, vmm))
}

/// The parent PID field of a /proc/PID/stat line.
fn parse_ppid(s: &str) -> Option<i32> {
    s.get(s.rfind(')')? + 1..)?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `pid`'s descendants (a jailed VMM runs as the child of a waiting parent), found by
/// one pass over /proc.
fn descendants(pid: i32) -> Vec<i32> {
    let all: Vec<(i32, i32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let p: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            Some((p, parse_ppid(&stat)?))
        })
        .collect();
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for &(c, _) in all.iter().filter(|(_, pp)| *pp == p) {
            if !out.contains(&c) && out.len() < 64 {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out
}

/// The VMM's processes: `pid`, and its descendants when the vCPU threads are not its own.
fn vmm_processes(pid: i32) -> Vec<i32> {
    match threads_cpu(pid) {
        Some((true, _, _)) => vec![pid],
        Some(_) => std::iter::once(pid).chain(descendants(pid)).collect(),
        None => Vec::new(),
    }
}

/// (guest, vmm) CPU seconds of processes `pids`.
fn process_cpu(pids: &[i32]) -> Option<(f64, f64)> {
    if pids.is_empty() {
        return None;
    }
    let hz = clock_ticks();
    let (mut guest, mut vmm) = (0u64, 0u64);
    for &p in pids {
        if let Some((_, g, v)) = threads_cpu(p) {
            guest += g;
            vmm += v;
        }
    }
    Some((guest as f64 / hz, vmm as f64 / hz))
}

/// A `Key:   N kB` field of /proc/…/status or /proc/meminfo, in bytes.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|k| k.saturating_mul(1024))
}

fn vmm_counters(run_api: &Path) -> Option<serde_json::Value> {
    let r = vmm::api::http::client_request(run_api, "GET", "/vessel/counters", None).ok()?;
    (r.status == 200)
        .then(|| serde_json::from_slice(&r.body).ok())
        .flatten()
}

/// A QEMU domain's counters: its block devices' from QMP `query-blockstats`, its network
/// traffic from its TAP devices (what the host's end receives, the guest sent).
fn qemu_counters(m: &Manager, name: &str, s: &mut DomainStats) {
    if let Ok(v) = crate::driver::qmp(&m.run_dir(name), "query-blockstats") {
        let devs = v.as_array().map(Vec::as_slice).unwrap_or_default();
        let sum = |k: &str| -> u64 {
            devs.iter()
                .filter_map(|d| d.get("stats")?.get(k)?.as_u64())
                .fold(0, u64::saturating_add)
        };
        s.disk_read_bytes = Some(sum("rd_bytes"));
        s.disk_write_bytes = Some(sum("wr_bytes"));
    }
    let taps: Vec<String> = m
        .interfaces(name)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|i| i.tap)
        .filter(|t| !t.is_empty() && !t.contains('/') && t != "." && t != "..")
        .collect();
    let stat = |tap: &str, f: &str| -> u64 {
        std::fs::read_to_string(format!("/sys/class/net/{tap}/statistics/{f}"))
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    s.net_rx_bytes = Some(taps.iter().map(|t| stat(t, "tx_bytes")).sum());
    s.net_tx_bytes = Some(taps.iter().map(|t| stat(t, "rx_bytes")).sum());
}

fn counter(v: &serde_json::Value, group: &str, name: &str) -> u64 {
    v.get(group)
        .and_then(|g| g.get(name))
        .and_then(|n| n.as_u64())
        .unwrap_or(0)
}

fn domain_stats(m: &Manager) -> Vec<DomainStats> {
    let defs = m.store.list_domains().unwrap_or_default();
    let infos = m.list().unwrap_or_default();
    infos
        .into_iter()
        .map(|i| {
            let def = defs.iter().find(|d| d.name == i.name);
            let accel = def
                .and_then(|d| serde_json::to_value(d.vm.accel).ok())
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let mut s = DomainStats {
                name: i.name.clone(),
                state: i.state_text,
                driver: i.driver.as_str(),
                accel,
                vcpus: i.cpus,
                memory_bytes: i.memory_mib.saturating_mul(1 << 20),
                ..Default::default()
            };
            if let (Some(pid), true) = (i.pid, i.state.is_active()) {
                let procs = vmm_processes(pid);
                if let Some((g, v)) = process_cpu(&procs) {
                    s.cpu_guest_s = Some(g);
                    s.cpu_vmm_s = Some(v);
                }
                s.rss_bytes = procs
                    .iter()
                    .filter_map(|p| {
                        let t = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
                        kib_field(&t, "VmRSS")
                    })
                    .reduce(|a, b| a.saturating_add(b));
                if i.driver == DriverKind::Qemu {
                    qemu_counters(m, &i.name, &mut s);
                } else if let Some(c) = vmm_counters(&m.run_dir(&i.name).api()) {
                    // A VM without disks or interfaces has served nothing: zero.
                    s.disk_read_bytes = Some(counter(&c, "block", "read_bytes"));
                    s.disk_write_bytes = Some(counter(&c, "block", "write_bytes"));
                    s.net_rx_bytes = Some(counter(&c, "net", "rx_bytes_count"));
                    s.net_tx_bytes = Some(counter(&c, "net", "tx_bytes_count"));
                }
            }
            s
        })
        .collect()
}

/// Whole disks (those in /sys/block), not partitions, loop or RAM devices.
fn host_disks(diskstats: &str) -> (u64, u64) {
    let (mut r, mut w) = (0u64, 0u64);
    for l in diskstats.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let Some(name) = f.get(2) else { continue };
        if name.starts_with("loop")
            || name.starts_with("ram")
            || !Path::new("/sys/block").join(name).exists()
        {
            continue;
        }
        let sectors = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        r = r.saturating_add(sectors(5).saturating_mul(512));
        w = w.saturating_add(sectors(9).saturating_mul(512));
    }
    (r, w)
}

/// Bytes received and sent on every interface but loopback.
fn host_net(netdev: &str) -> (u64, u64) {
    let (mut rx, mut tx) = (0u64, 0u64);
    for l in netdev.lines().skip(2) {
        let Some((name, rest)) = l.split_once(':') else {
            continue;
        };
        if name.trim() == "lo" {
            continue;
        }
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        rx = rx.saturating_add(f.first().copied().unwrap_or(0));
        tx = tx.saturating_add(f.get(8).copied().unwrap_or(0));
    }
    (rx, tx)
}

/// (busy, total) CPU seconds from /proc/stat's first line.
fn host_cpu(stat: &str) -> (f64, f64) {
    let hz = clock_ticks();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0.0, 0.0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle) as f64 / hz, total as f64 / hz)
}

fn host_stats() -> HostStats {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let (cpu_busy_s, cpu_total_s) = host_cpu(&read("/proc/stat"));
    let meminfo = read("/proc/meminfo");
    let (disk_read_bytes, disk_write_bytes) = host_disks(&read("/proc/diskstats"));
    let (net_rx_bytes, net_tx_bytes) = host_net(&read("/proc/net/dev"));
    HostStats {
        hostname: read("/proc/sys/kernel/hostname").trim().to_string(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_busy_s,
        cpu_total_s,
        memory_total_bytes: kib_field(&meminfo, "MemTotal").unwrap_or(0),
        memory_available_bytes: kib_field(&meminfo, "MemAvailable").unwrap_or(0),
        disk_read_bytes,
        disk_write_bytes,
        net_rx_bytes,
        net_tx_bytes,
    }
}

/// Takes one sample of the host and every domain.
pub fn sample(m: &Manager) -> Sample {
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    Sample {
        time,
        host: host_stats(),
        domains: domain_stats(m),
    }
}

/// A label value in the text format: backslash, quote and newline escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes one metric family: its HELP and TYPE lines, then one line per sample.
fn family(out: &mut String, name: &str, kind: &str, help: &str, lines: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in lines {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

/// The sample in Prometheus' text exposition format (version 0.0.4).
pub fn prometheus(s: &Sample) -> String {
    let mut out = String::new();
    let dl = |d: &DomainStats| format!("{{domain=\"{}\"}}", label(&d.name));
    let per = |f: &dyn Fn(&DomainStats) -> Option<f64>| -> Vec<(String, f64)> {
        s.domains
            .iter()
            .filter_map(|d| f(d).map(|v| (dl(d), v)))
            .collect()
    };
    let info: Vec<(String, f64)> = s
        .domains
        .iter()
        .map(|d| {
            (
                format!(
                    "{{domain=\"{}\",state=\"{}\",driver=\"{}\",accel=\"{}\"}}",
                    label(&d.name),
                    label(d.state),
                    label(d.driver),
                    label(&d.accel)
                ),
                1.0,
            )
        })
        .collect();
    family(
        &mut out,
        "vessel_domain_info",
        "gauge",
        "Each defined domain, with its state, driver and accelerator.",
        &info,
    );
    family(
        &mut out,
        "vessel_domain_vcpus",
        "gauge",
        "Virtual CPUs of the domain.",
        &per(&|d| Some(f64::from(d.vcpus))),
    );
    family(
        &mut out,
        "vessel_domain_memory_bytes",
        "gauge",
        "Memory given to the domain.",
        &per(&|d| Some(d.memory_bytes as f64)),
    );
    family(
        &mut out,
        "vessel_domain_resident_bytes",
        "gauge",
        "Resident memory of the domain's VMM process.",
        &per(&|d| d.rss_bytes.map(|v| v as f64)),
    );
    let cpu: Vec<(String, f64)> = s
        .domains
        .iter()
        .flat_map(|d| {
            [("guest", d.cpu_guest_s), ("vmm", d.cpu_vmm_s)]
                .into_iter()
                .filter_map(move |(k, v)| {
                    v.map(|v| {
                        (
                            format!("{{domain=\"{}\",thread=\"{k}\"}}", label(&d.name)),
                            v,
                        )
                    })
                })
        })
        .collect();
    family(
        &mut out,
        "vessel_domain_cpu_seconds_total",
        "counter",
        "CPU time of the domain's VMM process: vCPU threads (guest) and the others (vmm).",
        &cpu,
    );
    for (name, help, f) in [
        (
            "vessel_domain_disk_read_bytes_total",
            "Bytes the domain's disks read.",
            (|d: &DomainStats| d.disk_read_bytes) as fn(&DomainStats) -> Option<u64>,
        ),
        (
            "vessel_domain_disk_written_bytes_total",
            "Bytes the domain's disks wrote.",
            |d| d.disk_write_bytes,
        ),
        (
            "vessel_domain_net_receive_bytes_total",
            "Bytes the domain's interfaces received.",
            |d| d.net_rx_bytes,
        ),
        (
            "vessel_domain_net_transmit_bytes_total",
            "Bytes the domain's interfaces sent.",
            |d| d.net_tx_bytes,
        ),
    ] {
        family(
            &mut out,
            name,
            "counter",
            help,
            &per(&|d| f(d).map(|v| v as f64)),
        );
    }
    let h = &s.host;
    let host = |name: &str, kind: &str, help: &str, v: f64, out: &mut String| {
        family(out, name, kind, help, &[(String::new(), v)]);
    };
    host(
        "vessel_host_cpus",
        "gauge",
        "CPUs of the host.",
        h.cpus as f64,
        &mut out,
    );
    family(
        &mut out,
        "vessel_host_cpu_seconds_total",
        "counter",
        "CPU time of all the host's CPUs, busy and idle.",
        &[
            ("{mode=\"busy\"}".into(), h.cpu_busy_s),
            ("{mode=\"idle\"}".into(), h.cpu_total_s - h.cpu_busy_s),
        ],
    );
    host(
        "vessel_host_memory_total_bytes",
        "gauge",
        "Memory of the host.",
        h.memory_total_bytes as f64,
        &mut out,
    );
    host(
        "vessel_host_memory_available_bytes",
        "gauge",
        "Memory the host can still give out (MemAvailable).",
        h.memory_available_bytes as f64,
        &mut out,
    );
    host(
        "vessel_host_disk_read_bytes_total",
        "counter",
        "Bytes the host's disks read.",
        h.disk_read_bytes as f64,
        &mut out,
    );
    host(
        "vessel_host_disk_written_bytes_total",
        "counter",
        "Bytes the host's disks wrote.",
        h.disk_write_bytes as f64,
        &mut out,
    );
    host(
        "vessel_host_net_receive_bytes_total",
        "counter",
        "Bytes the host received (all interfaces but loopback).",
        h.net_rx_bytes as f64,
        &mut out,
    );
    host(
        "vessel_host_net_transmit_bytes_total",
        "counter",
        "Bytes the host sent (all interfaces but loopback).",
        h.net_tx_bytes as f64,
        &mut out,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files_without_trusting_them() {
        let (comm, t) = parse_stat("42 (CPU 0/TCG) S 1 2 3 4 5 6 7 8 9 10 100 23 0 0").unwrap();
        assert_eq!((comm.as_str(), t), ("CPU 0/TCG", 123));
        assert!(is_vcpu_thread(&comm) && is_vcpu_thread("vcpu3") && !is_vcpu_thread("http-conn"));
        // A name with a ')' inside, and truncated or garbled lines.
        assert_eq!(
            parse_stat("1 (a) b) S 1 2 3 4 5 6 7 8 9 10 1 2").unwrap().1,
            3
        );
        assert_eq!(parse_ppid("7 (x) y) S 42 1"), Some(42));
        assert_eq!(parse_ppid("7 (x"), None);
        // This test's own process: its threads are found, none is a vCPU.
        let me = std::process::id() as i32;
        assert!(matches!(threads_cpu(me), Some((false, _, _))));
        assert!(vmm_processes(me).contains(&me));
        assert!(parse_stat("1 (x S 1").is_none());
        assert!(parse_stat("").is_none());
        assert_eq!(kib_field("VmRSS:\t  2048 kB\n", "VmRSS"), Some(2 << 20));
        assert_eq!(kib_field("VmRSS: lots\n", "VmRSS"), None);
        let (rx, tx) =
            host_net("h\nh\n  lo: 5 0 0 0 0 0 0 0 5 0\n eth0: 100 1 0 0 0 0 0 0 200 2\nbad\n");
        assert_eq!((rx, tx), (100, 200));
        let (busy, total) = host_cpu("cpu  10 0 10 70 10 0 0 0 0 0\ncpu0 1\n");
        let hz = clock_ticks();
        assert_eq!((busy * hz, total * hz), (20.0, 100.0));
        assert_eq!(host_cpu("garbage"), (0.0, 0.0));
    }

    #[test]
    fn prometheus_text_escapes_labels() {
        let s = Sample {
            time: 1.0,
            host: HostStats {
                cpus: 2,
                ..Default::default()
            },
            domains: vec![DomainStats {
                name: "a\"b\\c".into(),
                state: "running",
                driver: "vessel",
                accel: "emu".into(),
                vcpus: 1,
                cpu_guest_s: Some(1.5),
                ..Default::default()
            }],
        };
        let t = prometheus(&s);
        assert!(
            t.contains(
                "vessel_domain_cpu_seconds_total{domain=\"a\\\"b\\\\c\",thread=\"guest\"} 1.5"
            ),
            "{t}"
        );
        assert!(
            t.contains("# TYPE vessel_host_cpus gauge\nvessel_host_cpus 2\n"),
            "{t}"
        );
        assert!(
            !t.contains("thread=\"vmm\""),
            "absent counters are left out: {t}"
        );
    }
}
