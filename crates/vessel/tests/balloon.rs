//! The virtio balloon with a real guest: Debian's kernel and its virtio_balloon module
//! (the guest assets' initramfs) on the emu accelerator, steered through Firecracker's
//! `/balloon` API as its ballooning guide does, and through `vessel run --balloon` on
//! virtio-pci. The guest's /proc/meminfo and the VMM's RSS show the memory going and
//! coming back.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::console::{Console, CMDLINE};
use common::*;
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(120);
const CMD: Duration = Duration::from_secs(60);
const SETTLE: Duration = Duration::from_secs(90);

/// The initramfs carries virtio_balloon.ko (scripts/guest-assets.sh puts it in).
fn require_balloon_module() {
    let a = assets();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "gzip -dc '{}' | cpio -t --quiet",
            a.join("initramfs.cpio.gz").display()
        ))
        .output()
        .expect("gzip and cpio");
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        list.contains("virtio_balloon.ko"),
        "the guest assets' initramfs has no virtio_balloon.ko: run scripts/guest-assets.sh \
         (its stamp changed with the module list, so it rebuilds)"
    );
}

/// A line of the guest's /proc/meminfo, in KiB.
fn meminfo(c: &mut Console, key: &str) -> u64 {
    let out = c.run(&format!("grep '^{key}:' /proc/meminfo"), CMD);
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in the guest's /proc/meminfo: {out:?}"))
}

/// The VMM's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// Polls `GET /balloon/statistics` until `ok` holds for it; returns it.
fn wait_stats(sock: &Path, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + SETTLE;
    loop {
        let (status, v) = api(sock, "GET", "/balloon/statistics", None);
        assert_eq!(status, 200, "{v}");
        if ok(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {SETTLE:?}; last statistics: {v}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Makes the guest touch most of its memory and free it again: a tmpfs file as large as
/// `mib`, removed.
fn touch_guest_memory(c: &mut Console, mib: u64) {
    let out = c.run(
        &format!(
            "mkdir -p /t && mount -t tmpfs -o size={mib}m tmpfs /t && \
             dd if=/dev/zero of=/t/f bs=1M count={mib} 2>&1 | tail -n 1; rm /t/f; echo TOUCHED"
        ),
        CMD,
    );
    assert!(out.contains("TOUCHED"), "{out}");
}

#[test]
fn firecracker_balloon_api_inflates_deflates_and_reports_statistics() {
    require_balloon_module();
    let dir = TempDir::new("balloon-fc");
    let sock = dir.path().join("api.sock");
    let a = assets();
    // As Firecracker: the VMM waits on its socket for its configuration.
    let child = vessel()
        .args(["run", "--accel", "emu", "--serial", "stdio", "--api-sock"])
        .arg(&sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vessel");
    let mut c = Console::attach(child);
    wait_for_socket(&sock, Duration::from_secs(10));
    let put = |path: &str, body: String| {
        let (status, v) = api(&sock, "PUT", path, Some(&body));
        assert_eq!(status, 204, "PUT {path} {body}: {v}");
    };
    put(
        "/boot-source",
        format!(
            r#"{{"kernel_image_path": "{}", "initrd_path": "{}", "boot_args": "{CMDLINE}"}}"#,
            a.join("vmlinuz").display(),
            a.join("initramfs.cpio.gz").display()
        ),
    );
    put(
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 256}"#.into(),
    );
    put(
        "/balloon",
        r#"{"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1}"#.into(),
    );
    let (status, v) = api(&sock, "GET", "/balloon", None);
    assert_eq!(status, 200);
    assert_eq!(v["stats_polling_interval_s"], 1, "{v}");
    put("/actions", r#"{"action_type": "InstanceStart"}"#.into());
    c.expect("vessel-init:", BOOT);
    c.expect("# ", BOOT);
    let bound = c.run("ls /sys/bus/virtio/drivers/virtio_balloon/", CMD);
    assert!(
        bound.contains("virtio"),
        "no device bound to virtio_balloon: {bound:?}"
    );

    // The driver's first statistics come with its stats buffer; later ones each second.
    let stats = wait_stats(&sock, "no guest statistics", |v| {
        v["total_memory"].as_u64().is_some() && v["available_memory"].as_u64().is_some()
    });
    let total = stats["total_memory"].as_u64().unwrap();
    assert!(
        (200 << 20..=256 << 20).contains(&total),
        "total_memory {total} for a 256 MiB guest: {stats}"
    );
    assert_eq!(stats["target_pages"], 0);

    let mem_total = meminfo(&mut c, "MemTotal");
    let mem_avail = meminfo(&mut c, "MemAvailable");
    touch_guest_memory(&mut c, 160);
    let pid = c.pid();
    let rss_touched = rss_kib(pid);

    // Inflate by 128 MiB: the guest gives it up, the host frees it.
    let (status, v) = api(&sock, "PATCH", "/balloon", Some(r#"{"amount_mib": 128}"#));
    assert_eq!(status, 204, "{v}");
    let stats = wait_stats(&sock, "the balloon did not reach 128 MiB", |v| {
        v["actual_mib"] == 128
    });
    assert_eq!(stats["target_mib"], 128);
    assert_eq!(stats["target_pages"], 128 * 256);
    let rss_inflated = rss_kib(pid);
    let total_inflated = meminfo(&mut c, "MemTotal");
    let avail_inflated = meminfo(&mut c, "MemAvailable");
    eprintln!(
        "MemTotal {mem_total} -> {total_inflated} KiB, MemAvailable {mem_avail} -> \
         {avail_inflated} KiB, VMM RSS {rss_touched} -> {rss_inflated} KiB"
    );
    // Without deflate_on_oom Linux takes the balloon out of MemTotal.
    assert!(
        mem_total - total_inflated >= 120 << 10,
        "MemTotal {mem_total} -> {total_inflated} KiB"
    );
    assert!(
        mem_avail.saturating_sub(avail_inflated) >= 96 << 10,
        "MemAvailable {mem_avail} -> {avail_inflated} KiB"
    );
    assert!(
        rss_touched.saturating_sub(rss_inflated) >= 64 << 10,
        "the VMM's RSS {rss_touched} -> {rss_inflated} KiB: inflated pages were not freed"
    );
    // Statistics keep coming, and say so.
    let seen = wait_stats(&sock, "no fresh statistics after inflating", |v| {
        v["total_memory"]
            .as_u64()
            .is_some_and(|t| t <= total - (120 << 20))
    });
    assert!(seen["free_memory"].as_u64().is_some(), "{seen}");

    // A new polling interval is taken at once.
    let (status, v) = api(
        &sock,
        "PATCH",
        "/balloon/statistics",
        Some(r#"{"stats_polling_interval_s": 2}"#),
    );
    assert_eq!(status, 204, "{v}");
    assert_eq!(
        api(&sock, "GET", "/balloon", None).1["stats_polling_interval_s"],
        2
    );

    // Deflate: the guest gets its memory back.
    let (status, v) = api(&sock, "PATCH", "/balloon", Some(r#"{"amount_mib": 0}"#));
    assert_eq!(status, 204, "{v}");
    wait_stats(&sock, "the balloon did not deflate", |v| {
        v["actual_pages"] == 0
    });
    let total_deflated = meminfo(&mut c, "MemTotal");
    assert_eq!(total_deflated, mem_total, "MemTotal after deflating");
    // The memory is usable again: the guest writes it.
    touch_guest_memory(&mut c, 160);

    // A snapshot keeps the balloon: inflated again, paused and saved, then a new VMM
    // restored from it has the same sizes, its guest the same MemTotal, and the held
    // statistics buffer goes back, so statistics from the restored guest arrive.
    let (status, v) = api(&sock, "PATCH", "/balloon", Some(r#"{"amount_mib": 32}"#));
    assert_eq!(status, 204, "{v}");
    wait_stats(&sock, "the balloon did not inflate to 32 MiB", |v| {
        v["actual_pages"] == 8192
    });
    let total_kept = meminfo(&mut c, "MemTotal");
    assert!(total_kept + 30 * 1024 <= mem_total, "MemTotal {total_kept}");
    let (status, v) = api(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(status, 204, "{v}");
    let snap = dir.path().join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let (status, v) = api(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(&format!(
            r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            snap.join("vmstate").display(),
            snap.join("memory").display()
        )),
    );
    assert_eq!(status, 204, "{v}");
    drop(c);
    let sock = dir.path().join("restored.sock");
    let child = vessel()
        .args(["run", "--restore"])
        .arg(&snap)
        .args(["--serial", "stdio", "--api-sock"])
        .arg(&sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vessel --restore");
    let mut c = Console::attach(child);
    wait_for_socket(&sock, Duration::from_secs(30));
    let (status, v) = api(&sock, "GET", "/balloon", None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["amount_mib"], 32, "{v}");
    let v = wait_stats(&sock, "no statistics from the restored guest", |v| {
        v["target_pages"] == 8192 && v["actual_pages"] == 8192 && v.get("total_memory").is_some()
    });
    assert_eq!(
        v["total_memory"].as_u64(),
        Some(total_kept * 1024),
        "the restored guest's total memory: {v}"
    );
    assert_eq!(meminfo(&mut c, "MemTotal"), total_kept);
    // It still deflates.
    let (status, v) = api(&sock, "PATCH", "/balloon", Some(r#"{"amount_mib": 0}"#));
    assert_eq!(status, 204, "{v}");
    wait_stats(&sock, "the restored balloon did not deflate", |v| {
        v["actual_pages"] == 0
    });
    assert_eq!(meminfo(&mut c, "MemTotal"), mem_total);

    c.send("poweroff -f");
    assert_eq!(c.wait_exit(CMD), Some(0));
}

#[test]
fn balloon_flag_on_virtio_pci_starts_inflated_and_deflates_on_oom() {
    require_balloon_module();
    let dir = TempDir::new("balloon-pci");
    let sock = dir.path().join("api.sock");
    // The target from the start: the guest inflates as soon as its driver binds.
    let mut c = Console::boot(&[
        "--cmdline",
        CMDLINE,
        "--virtio-transport",
        "pci",
        "--balloon",
        "64,deflate_on_oom,stats=1",
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    c.expect("vessel-init:", BOOT);
    c.expect("# ", BOOT);
    let pci = c.run(
        "cat /sys/bus/virtio/devices/*/device; ls /sys/bus/pci/drivers/virtio-pci",
        CMD,
    );
    assert!(pci.contains("0x0005"), "no virtio device 5 on PCI: {pci}");
    // The balloon's size as the guest sees it: debugfs is not mounted in the initramfs,
    // MemAvailable is. With deflate_on_oom Linux keeps MemTotal and the balloon's
    // pages are simply in use.
    let deadline = Instant::now() + SETTLE;
    loop {
        let avail = meminfo(&mut c, "MemAvailable");
        let total = meminfo(&mut c, "MemTotal");
        if total - avail >= 64 << 10 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "MemAvailable {avail} of {total} KiB: the 64 MiB balloon never inflated"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    wait_stats(&sock, "the balloon did not reach 64 MiB", |v| {
        v["actual_mib"] == 64
    });
    // deflate_on_oom: the guest asks for 32 MiB more than it has; rather than kill a
    // process, Linux takes pages back from the balloon (its OOM notifier).
    let avail = meminfo(&mut c, "MemAvailable") >> 10;
    let want = avail + 32;
    let out = c.run(
        &format!(
            "mkdir -p /t && mount -t tmpfs -o size=250m tmpfs /t && \
             dd if=/dev/zero of=/t/f bs=1M count={want} 2>&1 | tail -n 1; echo WROTE"
        ),
        Duration::from_secs(120),
    );
    assert!(out.contains("WROTE"), "{out}");
    let size = c.run("ls -l /t/f", CMD);
    assert!(
        size.contains(&format!(" {} ", want << 20)),
        "the guest could not write {want} MiB: {size}\n{out}"
    );
    let v = wait_stats(&sock, "the balloon never deflated under pressure", |v| {
        v["actual_mib"].as_u64().is_some_and(|a| a <= 48)
    });
    assert_eq!(v["target_mib"], 64, "{v}");
    // Linux does not inflate again on its own after an OOM deflation: the host says the
    // target again (a configuration change) once the guest has memory to give.
    c.run("rm /t/f", CMD);
    let (status, v) = api(&sock, "PATCH", "/balloon", Some(r#"{"amount_mib": 64}"#));
    assert_eq!(status, 204, "{v}");
    wait_stats(&sock, "the balloon did not inflate again", |v| {
        v["actual_mib"] == 64
    });
    c.send("poweroff -f");
    assert_eq!(c.wait_exit(CMD), Some(0));
}
