//! The VMM's Firecracker-compatible API at the HTTP level: the curl calls of Firecracker's
//! getting-started guide against `vessel run --api-sock` (nothing else: it waits for its
//! configuration), booting a tiny KVM guest, then runtime requests (pause and resume, the
//! power button) and their Firecracker-style refusals; and a Linux guest under emu whose
//! drive is given a new backing file while it runs.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::guest::{linux64_elf, Lib64};
use common::{wait_for_text, TempDir};
use iced_x86::code_asm::*;
use serde_json::Value;

/// `curl --unix-socket SOCK -i -X METHOD URL [-d BODY]`: (status, body).
fn curl(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-s", "-i", "--unix-socket"])
        .arg(sock)
        .args(["-X", method])
        .arg(format!("http://localhost{path}"))
        .args(["-H", "Accept: application/json"]);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "-d", b]);
    }
    let o = c.output().expect("curl not found: apt-get install curl");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let status = out
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status from curl: {out:?}"));
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// [`curl`] run as another user (`setpriv`): a client whose rights are not the VMM's.
fn curl_as(uid: u32, sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let o = Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .args(["--clear-groups", "curl", "-s", "-i", "--unix-socket"])
        .arg(sock)
        .args(["-X", method])
        .arg(format!("http://localhost{path}"))
        .args(["-H", "Content-Type: application/json", "-d", body])
        .output()
        .expect("setpriv not found: apt-get install util-linux");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let status = out
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no HTTP status from curl as uid {uid}: {out:?} {}",
                String::from_utf8_lossy(&o.stderr)
            )
        });
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn fault(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body:?}"));
    v["fault_message"]
        .as_str()
        .unwrap_or_else(|| panic!("no fault_message: {body}"))
        .to_string()
}

#[test]
fn firecracker_getting_started_sequence() {
    let dir = TempDir::new("fcapi");
    // The guest prints a line, then a dot after every stretch of busy work, forever: its
    // serial output is its progress.
    let mut a = CodeAssembler::new(64).unwrap();
    let mut lib = Lib64::new(&mut a);
    lib.print(&mut a, "fc guest up\n").unwrap();
    let mut again = a.create_label();
    let mut busy = a.create_label();
    a.set_label(&mut again).unwrap();
    a.mov(ecx, 20_000u32).unwrap();
    a.set_label(&mut busy).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(busy).unwrap();
    a.mov(al, b'.' as u32).unwrap();
    a.call(lib.putc).unwrap();
    a.jmp(again).unwrap();
    lib.emit(&mut a).unwrap();
    let code = a.assemble(common::guest::LOAD).unwrap();
    let kernel = dir.file("vmlinux.elf", &linux64_elf(&code));
    let rootfs = dir.file("rootfs.ext4", &vec![0u8; 1 << 20]);
    let sock = dir.path().join("firecracker.socket");
    let log = dir.path().join("serial.log");

    let child = Command::new(env!("CARGO_BIN_EXE_vessel"))
        // As Firecracker's guide starts it: an API socket and nothing to boot, so the
        // VMM waits for its configuration (no --api-only needed).
        .args(["run", "--accel", "kvm", "--api-sock"])
        .arg(&sock)
        .arg("--serial")
        .arg(format!("file:{}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut vmm = common::Guarded(child);
    common::wait_for_socket(&sock, Duration::from_secs(10));

    let (s, b) = curl(&sock, "GET", "/", None);
    assert_eq!(s, 200);
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["state"], "Not started");

    // The guide's calls, in its order: the logger first.
    let fclog = dir.path().join("firecracker.log");
    let logger = format!(
        r#"{{"log_path": "{}", "level": "Debug", "show_level": true, "show_log_origin": true}}"#,
        fclog.display()
    );
    assert_eq!(curl(&sock, "PUT", "/logger", Some(&logger)).0, 204);
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"}}"#,
        kernel.display()
    );
    assert_eq!(curl(&sock, "PUT", "/boot-source", Some(&boot)).0, 204);
    assert_eq!(
        curl(
            &sock,
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#)
        )
        .0,
        204
    );
    let drive = format!(
        r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true, "is_read_only": false}}"#,
        rootfs.display()
    );
    assert_eq!(curl(&sock, "PUT", "/drives/rootfs", Some(&drive)).0, 204);
    // Refusals in Firecracker's shape.
    let (s, b) = curl(&sock, "PUT", "/machine-config", Some("{\"vcpu_count\": "));
    assert_eq!(s, 400);
    assert!(fault(&b).contains("deserializing"), "{b}");
    let (s, b) = curl(
        &sock,
        "PUT",
        "/vsock",
        Some(r#"{"guest_cid": 1, "uds_path": "./v.sock"}"#),
    );
    assert_eq!(s, 400);
    assert!(fault(&b).contains("reserved"), "{b}");
    let vsock = dir.path().join("v.sock");
    let body = format!(r#"{{"guest_cid": 3, "uds_path": "{}"}}"#, vsock.display());
    assert_eq!(curl(&sock, "PUT", "/vsock", Some(&body)).0, 204);
    let (s, b) = curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(s, 400);
    assert!(fault(&b).contains("before starting"), "{b}");

    let (s, b) = curl(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(s, 204, "InstanceStart: {b}");

    let (_, b) = curl(&sock, "GET", "/", None);
    assert_eq!(
        serde_json::from_str::<Value>(&b).unwrap()["state"],
        "Running"
    );
    let (_, b) = curl(&sock, "GET", "/vm/config", None);
    let cfg: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(cfg["machine-config"]["mem_size_mib"], 64);
    assert_eq!(cfg["drives"][0]["is_root_device"], true);
    // Firecracker's records as given: the drive's ID, the boot arguments without the
    // root= the VMM adds for the root drive.
    assert_eq!(cfg["drives"][0]["drive_id"], "rootfs");
    assert_eq!(
        cfg["boot-source"]["boot_args"],
        "console=ttyS0 reboot=k panic=1 pci=off"
    );
    assert_eq!(cfg["vsock"]["guest_cid"], 3);
    // The logger file has the API's requests, in Firecracker's line layout.
    let text = std::fs::read_to_string(&fclog).unwrap();
    assert!(
        text.contains("[anonymous-instance:") && text.contains(":INFO:"),
        "{text}"
    );
    assert!(text.contains("PUT request on \"/drives/rootfs\""), "{text}");
    assert!(vsock.exists(), "the vsock device listens on its socket");
    wait_for_text(&log, "fc guest up", Duration::from_secs(20));

    // After boot: configuration is refused.
    let (s, b) = curl(
        &sock,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 64}"#),
    );
    assert_eq!(s, 400);
    assert!(fault(&b).contains("after starting"), "{b}");
    let (s, b) = curl(&sock, "PUT", "/vsock", Some(&body));
    assert_eq!(s, 400);
    assert!(fault(&b).contains("after starting"), "{b}");

    // Pause: the vCPU stops, so its output stops; resume: it goes on.
    let len = || std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let grows = |within: Duration| {
        let (l0, t0) = (len(), Instant::now());
        while len() == l0 {
            if t0.elapsed() > within {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    };
    assert!(
        grows(Duration::from_secs(10)),
        "the guest makes no progress"
    );
    let (s, b) = curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(s, 204, "{b}");
    let (_, b) = curl(&sock, "GET", "/", None);
    assert_eq!(
        serde_json::from_str::<Value>(&b).unwrap()["state"],
        "Paused"
    );
    let (_, b) = curl(&sock, "GET", "/vessel/status", None);
    assert_eq!(
        serde_json::from_str::<Value>(&b).unwrap()["state"],
        "Paused"
    );
    let paused_at = len();
    assert!(!grows(Duration::from_millis(500)), "output while paused");
    assert_eq!(len(), paused_at);
    // Pausing again changes nothing; resume.
    assert_eq!(
        curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0,
        204
    );
    let (s, b) = curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(s, 204, "{b}");
    assert!(grows(Duration::from_secs(10)), "no progress after resume");
    let (_, b) = curl(&sock, "GET", "/", None);
    assert_eq!(
        serde_json::from_str::<Value>(&b).unwrap()["state"],
        "Running"
    );
    let (s, b) = curl(&sock, "GET", "/no/such/path", None);
    assert_eq!(s, 400);
    assert!(
        fault(&b).contains("Invalid request method and/or path"),
        "{b}"
    );

    // The guest-shutdown request presses the ACPI power button; this guest has no ACPI and
    // ignores it (emu_power.rs shows Linux acting on it).
    let (s, b) = curl(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    );
    assert_eq!(s, 204, "{b}");
    let (s, b) = curl(&sock, "GET", "/vessel/status", None);
    assert_eq!(s, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&b).unwrap()["state"],
        "Running"
    );

    // Vessel's addition: Stop ends the VMM cleanly.
    assert_eq!(
        curl(&sock, "PUT", "/actions", Some(r#"{"action_type": "Stop"}"#)).0,
        204
    );
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = vmm.0.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "VMM did not stop");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0));
    assert!(!sock.exists(), "the API socket is removed at exit");
}

/// A Linux guest (emu) started through the API sees `PATCH /drives` at once: the new
/// backing file's size, after the configuration-change interrupt; a rate limiter PATCH
/// is taken bucket by bucket.
#[test]
fn a_running_guest_sees_a_drive_patched_to_a_new_file() {
    let a = common::assets();
    let dir = common::TempDir::new("fc-patch");
    let small = dir.file("small.img", &vec![b'A'; 1 << 20]);
    let big = dir.file("big.img", &vec![b'B'; 4 << 20]);
    let sock = dir.path().join("api.sock");
    let log = dir.path().join("serial.log");
    let child = Command::new(env!("CARGO_BIN_EXE_vessel"))
        .args(["run", "--accel", "emu", "--api-sock"])
        .arg(&sock)
        .arg("--serial")
        .arg(format!("file:{}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _vmm = common::Guarded(child);
    common::wait_for_socket(&sock, Duration::from_secs(10));
    // The guest prints its disk's size and first byte every half second.
    let run = "while+true;do+echo+SIZE=$(cat+/sys/block/vda/size)+BYTE=$(head+-c1+/dev/vda);\
               sleep+0.5;done";
    // (After the swap only the size is checked: the guest's page cache may still hold
    // the old first block, as it would under Firecracker.)
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "initrd_path": "{}",
            "boot_args": "console=ttyS0 panic=-1 quiet vessel.run={run}"}}"#,
        a.join("vmlinuz").display(),
        a.join("initramfs.cpio.gz").display()
    );
    assert_eq!(curl(&sock, "PUT", "/boot-source", Some(&boot)).0, 204);
    let drive = format!(
        r#"{{"drive_id": "scratch", "path_on_host": "{}", "is_root_device": false,
            "rate_limiter": {{"ops": {{"size": 1000, "refill_time": 100}}}}}}"#,
        small.display()
    );
    assert_eq!(curl(&sock, "PUT", "/drives/scratch", Some(&drive)).0, 204);
    let metrics = dir.path().join("metrics.json");
    let body = format!(r#"{{"metrics_path": "{}"}}"#, metrics.display());
    assert_eq!(curl(&sock, "PUT", "/metrics", Some(&body)).0, 204);
    let (s, b) = curl(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(s, 204, "{b}");
    common::wait_for_text(&log, "SIZE=2048 BYTE=A", Duration::from_secs(120));
    // The guest's reads show in Firecracker's block metrics.
    let (s, b) = curl(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
    );
    assert_eq!(s, 204, "{b}");
    let text = std::fs::read_to_string(&metrics).unwrap();
    let line: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert!(line["block"]["read_bytes"].as_u64().unwrap() > 0, "{line}");
    assert!(line["block"]["read_count"].as_u64().unwrap() > 0, "{line}");

    let patch = format!(
        r#"{{"drive_id": "scratch", "path_on_host": "{}"}}"#,
        big.display()
    );
    let (s, b) = curl(&sock, "PATCH", "/drives/scratch", Some(&patch));
    assert_eq!(s, 204, "{b}");
    common::wait_for_text(&log, "SIZE=8192", Duration::from_secs(60));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("new size") || text.contains("SIZE=8192"),
        "{text}"
    );
    let limiter = r#"{"drive_id": "scratch", "rate_limiter": {"bandwidth": {"size": 1048576, "refill_time": 100}}}"#;
    let (s, b) = curl(&sock, "PATCH", "/drives/scratch", Some(limiter));
    assert_eq!(s, 204, "{b}");
    let (_, b) = curl(&sock, "GET", "/vm/config", None);
    let cfg: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(cfg["drives"][0]["path_on_host"], big.display().to_string());
    assert_eq!(cfg["drives"][0]["rate_limiter"]["ops"]["size"], 1000);
    assert_eq!(
        cfg["drives"][0]["rate_limiter"]["bandwidth"]["size"],
        1048576
    );
    let (s, _) = curl(&sock, "PUT", "/actions", Some(r#"{"action_type": "Stop"}"#));
    assert_eq!(s, 204);
}

/// `PUT /cpu-config`: a custom template's CPUID modifiers reach the guest (a feature
/// cleared is gone from its /proc/cpuinfo), and one that asks for a feature the
/// accelerator lacks fails InstanceStart rather than booting without it.
#[test]
fn a_custom_cpu_template_reaches_the_guest() {
    let a = common::assets();
    let dir = common::TempDir::new("fc-cpu");
    let sock = dir.path().join("api.sock");
    let log = dir.path().join("serial.log");
    let child = Command::new(env!("CARGO_BIN_EXE_vessel"))
        .args(["run", "--accel", "emu", "--api-sock"])
        .arg(&sock)
        .arg("--serial")
        .arg(format!("file:{}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _vmm = common::Guarded(child);
    common::wait_for_socket(&sock, Duration::from_secs(10));
    let run = "grep+-c+sse4_2+/proc/cpuinfo;echo+FLAGS-$(grep+-c+sse4_1+/proc/cpuinfo)-DONE";
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "initrd_path": "{}",
            "boot_args": "console=ttyS0 panic=-1 quiet vessel.run={run}"}}"#,
        a.join("vmlinuz").display(),
        a.join("initramfs.cpio.gz").display()
    );
    assert_eq!(curl(&sock, "PUT", "/boot-source", Some(&boot)).0, 204);
    // AVX-512F (leaf 7 EBX bit 16): not something the emu accelerator offers.
    let avx512 = r#"{"cpuid_modifiers": [{"leaf": "0x7", "subleaf": "0x0", "flags": 1,
        "modifiers": [{"register": "ebx", "bitmap": "0bxxxxxxxxxxxxxxx1xxxxxxxxxxxxxxxx"}]}]}"#;
    assert_eq!(curl(&sock, "PUT", "/cpu-config", Some(avx512)).0, 204);
    let (s, b) = curl(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(s, 400, "{b}");
    assert!(
        fault(&b).contains("cpu-config") && fault(&b).contains("does not offer"),
        "{b}"
    );
    // Clear SSE4.2 (leaf 1 ECX bit 20): the guest does not see it; SSE4.1 stays.
    let no_sse42 = r#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
        "modifiers": [{"register": "ecx", "bitmap": "0bxxxxxxxxxxx0xxxxxxxxxxxxxxxxxxxx"}]}]}"#;
    assert_eq!(curl(&sock, "PUT", "/cpu-config", Some(no_sse42)).0, 204);
    let (s, b) = curl(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(s, 204, "{b}");
    common::wait_for_text(&log, "-DONE", Duration::from_secs(120));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("FLAGS-1-DONE"),
        "SSE4.1 is still there: {text}"
    );
    let line = text.lines().find(|l| l.trim() == "0" || l.trim() == "1");
    assert_eq!(line.map(str::trim), Some("0"), "SSE4.2 is gone: {text}");
}

/// `smt: true`: the guest sees its two vCPUs as the two threads of one core.
#[test]
fn smt_makes_two_vcpus_one_core_of_two_threads() {
    let a = common::assets();
    let dir = common::TempDir::new("fc-smt");
    let sock = dir.path().join("api.sock");
    let log = dir.path().join("serial.log");
    let child = Command::new(env!("CARGO_BIN_EXE_vessel"))
        .args(["run", "--accel", "emu", "--api-sock"])
        .arg(&sock)
        .arg("--serial")
        .arg(format!("file:{}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _vmm = common::Guarded(child);
    common::wait_for_socket(&sock, Duration::from_secs(10));
    let run = "echo+SIBLINGS-$(cat+/sys/devices/system/cpu/cpu0/topology/thread_siblings_list)-END";
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "initrd_path": "{}",
            "boot_args": "console=ttyS0 panic=-1 quiet vessel.run={run}"}}"#,
        a.join("vmlinuz").display(),
        a.join("initramfs.cpio.gz").display()
    );
    assert_eq!(curl(&sock, "PUT", "/boot-source", Some(&boot)).0, 204);
    let m = r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": true}"#;
    assert_eq!(curl(&sock, "PUT", "/machine-config", Some(m)).0, 204);
    let (s, b) = curl(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(s, 204, "{b}");
    common::wait_for_text(&log, "-END", Duration::from_secs(120));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("SIBLINGS-0-1-END"), "{text}");
}

/// Issue 22: the VMM checks the files a request names against the rights of the user
/// that sent it (the socket's peer), and a vsock `uds_path` naming an existing file
/// never deletes it. Before, a root VMM whose socket another user could reach accepted
/// `/etc/shadow`-like files from that user, and a `uds_path` on a file deleted it.
#[test]
fn requests_name_only_files_their_sender_may_use() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "run the tests as root: they send requests as another user"
    );
    let dir = TempDir::new("peer");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut a = CodeAssembler::new(64).unwrap();
    let mut lib = Lib64::new(&mut a);
    lib.print(&mut a, "peer guest up\n").unwrap();
    let mut spin = a.create_label();
    a.set_label(&mut spin).unwrap();
    a.jmp(spin).unwrap();
    lib.emit(&mut a).unwrap();
    let code = a.assemble(common::guest::LOAD).unwrap();
    let kernel = dir.file("vmlinux.elf", &linux64_elf(&code));
    let secret = dir.file("secret", &vec![7u8; 1 << 20]);
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let victim = dir.file("victim", b"precious");
    let sock = dir.path().join("api.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_vessel"))
        .args(["run", "--accel", "kvm", "--api-sock"])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _vmm = common::Guarded(child);
    common::wait_for_socket(&sock, Duration::from_secs(10));
    // The socket opened to others, as an operator sharing it with a group would.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
    let nobody = 65534;
    let boot = |k: &Path| format!(r#"{{"kernel_image_path": "{}"}}"#, k.display());
    let drive = |p: &Path| {
        format!(
            r#"{{"drive_id": "d", "path_on_host": "{}", "is_root_device": false, "is_read_only": true}}"#,
            p.display()
        )
    };
    for (path, body) in [
        ("/boot-source", boot(&secret)),
        ("/drives/d", drive(&secret)),
        (
            "/vsock",
            format!(r#"{{"guest_cid": 3, "uds_path": "{}"}}"#, victim.display()),
        ),
    ] {
        let (s, b) = curl_as(nobody, &sock, "PUT", path, &body);
        assert_eq!(s, 400, "{path} as nobody: {b}");
        assert!(fault(&b).contains("permission denied"), "{path}: {b}");
    }
    // Root may: the same secret is accepted from root (the kernel check only opens it).
    let (s, b) = curl(&sock, "PUT", "/drives/d", Some(&drive(&secret)));
    assert_eq!(s, 204, "{b}");
    // A uds_path on an existing file: the start fails naming it, the file stays.
    assert_eq!(
        curl(&sock, "PUT", "/boot-source", Some(&boot(&kernel))).0,
        204
    );
    let vsock = format!(r#"{{"guest_cid": 3, "uds_path": "{}"}}"#, victim.display());
    assert_eq!(curl(&sock, "PUT", "/vsock", Some(&vsock)).0, 204);
    let (s, b) = curl(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(s, 400, "InstanceStart with uds_path on a file: {b}");
    assert!(fault(&b).contains("victim"), "{b}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
}

/// Issue 16: started as Firecracker is (an API socket, nothing to boot), the VMM ends
/// with an error after a failed `PUT /snapshot/load`, as Firecracker's process exits;
/// a body it does not understand, or a load while it may not load, leaves it waiting.
/// With Vessel's `--api-only` it keeps waiting after a failed load too.
#[test]
fn a_failed_snapshot_load_ends_a_vmm_started_as_firecracker() {
    let dir = TempDir::new("fcload");
    let spawn = |sock: &Path, extra: &[&str]| {
        let child = Command::new(env!("CARGO_BIN_EXE_vessel"))
            .args(["run", "--accel", "emu", "--api-sock"])
            .arg(sock)
            .args(extra)
            .args(["--serial", "null"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        common::wait_for_socket(sock, Duration::from_secs(10));
        common::Guarded(child)
    };
    let missing = format!(
        r#"{{"snapshot_path": "{0}/none", "mem_backend": {{"backend_type": "File", "backend_path": "{0}/none.mem"}}}}"#,
        dir.path().display()
    );
    let sock = dir.path().join("fc.sock");
    let mut vmm = spawn(&sock, &[]);
    // Refused while parsing: no harm done, the VMM waits.
    let (s, b) = curl(
        &sock,
        "PUT",
        "/snapshot/load",
        Some(r#"{"snapshot_path": "x"}"#),
    );
    assert_eq!(s, 400, "{b}");
    assert!(fault(&b).contains("missing field"), "{b}");
    assert_eq!(curl(&sock, "GET", "/", None).0, 200, "after a body refused");
    // A load that fails: answered, then the process ends with an error.
    let (s, b) = curl(&sock, "PUT", "/snapshot/load", Some(&missing));
    assert_eq!(s, 400, "{b}");
    assert!(fault(&b).contains("Failed to load the snapshot"), "{b}");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = vmm.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the VMM still runs after a failed load"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "{status:?}");
    let mut err = String::new();
    std::io::Read::read_to_string(vmm.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("PUT /snapshot/load failed"), "{err}");

    // Vessel's --api-only: the same failed load leaves it waiting for another.
    let sock = dir.path().join("only.sock");
    let mut vmm = spawn(&sock, &["--api-only"]);
    let (s, _) = curl(&sock, "PUT", "/snapshot/load", Some(&missing));
    assert_eq!(s, 400);
    std::thread::sleep(Duration::from_millis(300));
    assert!(vmm.0.try_wait().unwrap().is_none(), "--api-only ended");
    let (s, b) = curl(&sock, "GET", "/", None);
    assert_eq!(
        (
            s,
            serde_json::from_str::<Value>(&b).unwrap()["state"].clone()
        ),
        (200, "Not started".into())
    );
}

/// Issue 16: a VMM that restores a snapshot answers `GET /vm/config` exactly as the one
/// that took it: the drive's ID and cache type as given, the boot arguments without the
/// root= the VMM adds, and a rate limiter PATCHed after boot (which the restored drive
/// has too: the snapshot carries the configuration the VM ran with, not the one it was
/// built with).
#[test]
fn a_restored_vm_shows_the_configuration_it_was_snapshotted_with() {
    let dir = TempDir::new("fcrestorecfg");
    let mut a = CodeAssembler::new(64).unwrap();
    let mut lib = Lib64::new(&mut a);
    lib.print(&mut a, "snap guest up\n").unwrap();
    let mut spin = a.create_label();
    a.set_label(&mut spin).unwrap();
    a.pause().unwrap();
    a.jmp(spin).unwrap();
    lib.emit(&mut a).unwrap();
    let code = a.assemble(common::guest::LOAD).unwrap();
    let kernel = dir.file("vmlinux.elf", &linux64_elf(&code));
    let rootfs = dir.file("rootfs.ext4", &vec![0u8; 1 << 20]);
    let spawn = |sock: &Path, log: &Path| {
        let child = Command::new(env!("CARGO_BIN_EXE_vessel"))
            .args(["run", "--accel", "emu", "--api-sock"])
            .arg(sock)
            .arg("--serial")
            .arg(format!("file:{}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        common::wait_for_socket(sock, Duration::from_secs(10));
        common::Guarded(child)
    };
    let ok = |sock: &Path, method: &str, path: &str, body: &str| {
        let (s, b) = curl(sock, method, path, Some(body));
        assert!(s == 204 || s == 200, "{method} {path}: {s} {b}");
    };
    let (sock, log) = (dir.path().join("a.sock"), dir.path().join("a.log"));
    let _first = spawn(&sock, &log);
    ok(
        &sock,
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0 reboot=k panic=1"}}"#,
            kernel.display()
        ),
    );
    ok(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 64}"#,
    );
    ok(
        &sock,
        "PUT",
        "/drives/rootfs",
        &format!(
            r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true, "is_read_only": false, "cache_type": "Unsafe"}}"#,
            rootfs.display()
        ),
    );
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    wait_for_text(&log, "snap guest up", Duration::from_secs(20));
    ok(
        &sock,
        "PATCH",
        "/drives/rootfs",
        r#"{"drive_id": "rootfs", "rate_limiter": {"bandwidth": {"size": 1048576, "refill_time": 100}}}"#,
    );
    ok(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    let (_, before) = curl(&sock, "GET", "/vm/config", None);
    let before: Value = serde_json::from_str(&before).unwrap();
    assert_eq!(before["drives"][0]["drive_id"], "rootfs", "{before}");
    assert_eq!(before["drives"][0]["cache_type"], "Unsafe", "{before}");
    assert_eq!(
        before["drives"][0]["rate_limiter"]["bandwidth"]["size"], 1048576,
        "{before}"
    );
    let (state, mem) = (dir.path().join("vm.state"), dir.path().join("vm.mem"));
    ok(
        &sock,
        "PUT",
        "/snapshot/create",
        &format!(
            r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            state.display(),
            mem.display()
        ),
    );
    drop(_first);

    let (sock2, log2) = (dir.path().join("b.sock"), dir.path().join("b.log"));
    let _second = spawn(&sock2, &log2);
    ok(
        &sock2,
        "PUT",
        "/snapshot/load",
        &format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": false}}"#,
            state.display(),
            mem.display()
        ),
    );
    let (_, after) = curl(&sock2, "GET", "/vm/config", None);
    let after: Value = serde_json::from_str(&after).unwrap();
    assert_eq!(after, before, "GET /vm/config after the restore");
    // The snapshot took the configuration the VM ran with: the PATCHed limiter.
    let saved = String::from_utf8_lossy(&std::fs::read(&state).unwrap()).into_owned();
    assert!(
        saved.contains("1048576"),
        "the state file lacks the PATCHed limiter"
    );
}
