//! riscv64 guests on Vessel's RISC-V CPU: Debian's riscv64 kernel boots through Debian's
//! OpenSBI to the busybox init of scripts/riscv-assets.sh, runs a command, reads and
//! writes a virtio-blk disk, and `poweroff -f` ends the VMM with status 0.

mod common;

use common::{run_with_timeout, vessel, TempDir};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The riscv64 assets; panics naming the setup step when they are missing.
fn riscv_assets() -> PathBuf {
    let dir = std::env::var_os("VESSEL_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/vessel/assets")
        })
        .join("riscv64");
    assert!(
        dir.join("Image").is_file() && dir.join("initramfs.cpio.gz").is_file(),
        "riscv64 guest assets missing in {}: run scripts/riscv-assets.sh",
        dir.display()
    );
    assert!(
        std::path::Path::new(vmm::riscv::DEFAULT_OPENSBI).is_file(),
        "{} missing: apt-get install opensbi",
        vmm::riscv::DEFAULT_OPENSBI
    );
    dir
}

/// `vessel run` of the riscv64 assets' kernel and initramfs, without seccomp; the caller
/// adds the rest.
fn riscv_run_args(assets: &Path) -> Vec<std::ffi::OsString> {
    let mut v: Vec<std::ffi::OsString> = ["run", "--arch", "riscv64", "--seccomp", "none"]
        .iter()
        .map(Into::into)
        .collect();
    v.push("--kernel".into());
    v.push(assets.join("Image").into());
    v.push("--initrd".into());
    v.push(assets.join("initramfs.cpio.gz").into());
    v
}

fn riscv_run(assets: &Path) -> std::process::Command {
    let mut c = vessel();
    c.args(riscv_run_args(assets));
    c
}

const LIMIT: Duration = Duration::from_secs(600);

#[test]
fn debian_riscv64_kernel_boots_to_busybox_and_powers_off() {
    let assets = riscv_assets();
    let out = run_with_timeout(
        riscv_run(&assets).args([
            "--cmdline",
            "console=ttyS0 vessel.run=echo+rv-$((6*7));cat+/proc/cpuinfo",
        ]),
        LIMIT,
    );
    assert!(
        out.stdout.contains("OpenSBI v"),
        "OpenSBI did not start:\n{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("Linux version") && out.stdout.contains("riscv64"),
        "no kernel boot log:\n{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("vessel-init: riscv64"),
        "init did not run:\n{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("rv-42"),
        "the shell did not run the command:\n{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("rv64imafdc"),
        "the guest did not see the ISA:\n{}",
        out.stdout
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "poweroff should end the VMM with 0; stderr:\n{}",
        out.stderr
    );
    // No --accel: auto picks the software CPU for the foreign architecture.
    assert!(
        out.stderr.contains(vmm::riscv::NOTE),
        "auto did not say it picked rv64emu:\n{}",
        out.stderr
    );
}

/// The first number right after `key` in `text` (the command line echoed in a boot log
/// has the key without one).
fn number_after(text: &str, key: &str) -> Option<u64> {
    text.match_indices(key).find_map(|(at, _)| {
        let rest = &text[at + key.len()..];
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok()
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The Goldfish RTC: Linux finds it in the device tree, it reads the host's time, and
/// the kernel sets the system clock from it at boot (a file made now has a host-time
/// mtime).
#[test]
fn goldfish_rtc_gives_the_guest_the_hosts_time() {
    let assets = riscv_assets();
    let before = unix_now();
    let out = run_with_timeout(
        riscv_run(&assets)
            .args([
                "--cmdline",
                "console=ttyS0 quiet vessel.run=echo+rtc-name=$(cat+/sys/class/rtc/rtc0/name);\
                 echo+rtc=$(cat+/sys/class/rtc/rtc0/since_epoch);touch+/tmp/t;stat+-c+sys=%Y+/tmp/t;\
                 hwclock+-u+-r",
            ]),
        LIMIT,
    );
    let after = unix_now();
    assert_eq!(out.status.code(), Some(0), "stderr:\n{}", out.stderr);
    assert!(
        out.stdout.contains("rtc-name=goldfish_rtc"),
        "no Goldfish RTC as rtc0:\n{}",
        out.stdout
    );
    for key in ["rtc=", "sys="] {
        let t = number_after(&out.stdout, key)
            .unwrap_or_else(|| panic!("no {key} time in the output:\n{}", out.stdout));
        assert!(
            t + 2 >= before && t <= after + 2,
            "{key}{t} is not the host's time (between {before} and {after}):\n{}",
            out.stdout
        );
    }
    // About this year (an average year's seconds: a day off at most, near New Year).
    let year = 1970 + after / 31_556_952;
    assert!(
        (year - 1..=year + 1).any(|y| out.stdout.contains(&format!(" {y} "))),
        "hwclock did not read this year ({year}) from /dev/rtc0:\n{}",
        out.stdout
    );
}

/// Two harts: OpenSBI starts the second through SBI HSM (a CLINT software interrupt),
/// Linux brings it up and schedules on both; two processes pinned one to each hash the
/// same file at once (scheduler IPIs, remote TLB and I-cache fences through SBI, the
/// kernel's atomics and LR/SC across harts) and both get the right digest.
#[test]
fn two_harts_boot_and_run_pinned_processes_at_once() {
    let assets = riscv_assets();
    let out = run_with_timeout(
        vessel()
            .args([
                "run",
                "--arch",
                "riscv64",
                "--cpus",
                "2",
                "--seccomp",
                "none",
                "--kernel",
            ])
            .arg(assets.join("Image"))
            .arg("--initrd")
            .arg(assets.join("initramfs.cpio.gz"))
            .args([
                "--cmdline",
                "console=ttyS0 quiet vessel.run=head+-c+4000000+/dev/zero+>/tmp/z;\
                 for+m+in+1+2;do+taskset+$m+md5sum+/tmp/z+>/tmp/h$m&done;wait;cat+/tmp/h1+/tmp/h2;\
                 echo+pinned-$(taskset+2+awk+'{print+$39}'+/proc/self/stat)",
            ]),
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(0), "stderr:\n{}", out.stderr);
    assert!(
        out.stdout.contains("up, 2 cpu(s)"),
        "the guest did not bring up two harts:\n{}",
        out.stdout
    );
    assert_eq!(
        out.stdout
            .matches("90b741f98410e3bb408d92fa49f9c436  /tmp/z")
            .count(),
        2,
        "both harts' digests:\n{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("pinned-1"),
        "nothing ran on hart 1:\n{}",
        out.stdout
    );
}

#[test]
fn virtio_blk_reads_and_writes_a_disk() {
    let assets = riscv_assets();
    let dir = TempDir::new("riscv-blk");
    let mut image = vec![0u8; 4 << 20];
    image[..16].copy_from_slice(b"vessel-rv-disk!\n");
    let disk = dir.file("disk.raw", &image);
    let out = run_with_timeout(
        riscv_run(&assets)
            .arg("--disk")
            .arg(&disk)
            .args(["--firmware", vmm::riscv::DEFAULT_OPENSBI])
            .args([
                "--cmdline",
                "console=ttyS0 quiet vessel.run=head+-c+16+/dev/vda;echo+written-by-riscv|dd+of=/dev/vda+bs=4096+seek=1+conv=notrunc,fsync",
            ]),
        LIMIT,
    );
    assert!(
        out.stdout.contains("vessel-rv-disk!"),
        "the guest did not read the disk:\n{}",
        out.stdout
    );
    assert_eq!(out.status.code(), Some(0), "stderr:\n{}", out.stderr);
    let after = std::fs::read(&disk).unwrap();
    assert_eq!(
        &after[4096..4096 + 18],
        b"written-by-riscv\n\0",
        "the guest's write did not reach the disk"
    );
}

#[test]
fn virtio_net_pings_the_host_side_of_a_tap_and_virtio_rng_feeds_hwrng() {
    let assets = riscv_assets();
    let ns = common::NetNs::new("rvnet");
    // The VMM creates the TAP inside the namespace; give the host side its address as
    // soon as it appears, while the guest boots (the guest retries its ping meanwhile).
    let ns_name = ns.0.clone();
    let host_side = std::thread::spawn(move || {
        let ns = common::NetNs(ns_name);
        let deadline = std::time::Instant::now() + LIMIT;
        let mut configured = false;
        while std::time::Instant::now() < deadline {
            if ns.ip_succeeds(&["link", "show", "rvtap0"]) {
                configured = ns.ip_succeeds(&["addr", "add", "10.0.2.1/24", "dev", "rvtap0"])
                    && ns.ip_succeeds(&["link", "set", "rvtap0", "up"]);
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Not ours to delete: the test's NetNs does.
        std::mem::forget(ns);
        configured
    });
    let out = run_with_timeout(
        std::process::Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(env!("CARGO_BIN_EXE_vessel"))
            .args(riscv_run_args(&assets))
            .args(["--net", "tap=rvtap0,mac=52:54:00:12:34:57", "--rng"])
            .args([
                "--cmdline",
                "console=ttyS0 quiet vessel.run=cat+/sys/class/misc/hw_random/rng_current;\
                 head+-c+64+/dev/hwrng|wc+-c;\
                 ip+addr+add+10.0.2.15/24+dev+eth0;ip+link+set+eth0+up;\
                 for+i+in+$(seq+60);do+ping+-c1+-W2+10.0.2.1&&echo+ping-$((6*7))-ok&&break;sleep+1;done",
            ]),
        LIMIT,
    );
    assert!(
        host_side.join().unwrap(),
        "the VMM did not create rvtap0 in the namespace; stderr:\n{}",
        out.stderr
    );
    assert!(
        out.stdout.contains("virtio_rng"),
        "the guest's hwrng is not virtio-rng:\n{}",
        out.stdout
    );
    assert!(
        out.stdout.lines().any(|l| l.trim() == "64"),
        "the guest did not read 64 bytes from /dev/hwrng:\n{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("ping-42-ok"),
        "the guest did not ping the host side:\n{}",
        out.stdout
    );
    assert_eq!(out.status.code(), Some(0), "stderr:\n{}", out.stderr);
}

/// One request to the VMM's API socket: (status, body).
fn api(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let (status, body) = common::api_raw(sock, method, path, body);
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The counter lines (`count N`) of the console log so far.
fn counts(log: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix("count ")?.parse().ok())
        .collect()
}

/// `--api-sock` and `--console-sock` on the riscv64 run path, under the default seccomp
/// mode (trap: a forbidden call ends the VMM with 148): every thread is filtered, the
/// API reports the instance, pauses it (the guest's counter stops) and resumes it,
/// refuses the power button it does not have, and `Reset` ends the run with the reboot
/// status.
#[test]
fn api_socket_pauses_resumes_and_resets_a_confined_riscv64_vm() {
    let assets = riscv_assets();
    let dir = TempDir::new("riscv-api");
    let disk = dir.file("d.raw", &vec![0u8; 1 << 20]);
    let (sock, log) = (dir.path().join("api.sock"), dir.path().join("serial.log"));
    let mut child = common::Guarded(
        vessel()
            .args(["run", "--arch", "riscv64", "--kernel"])
            .arg(assets.join("Image"))
            .arg("--initrd")
            .arg(assets.join("initramfs.cpio.gz"))
            .args([
                "--cmdline",
                "console=ttyS0 quiet vessel.run=i=0;while+true;do+i=$((i-(-1)));echo+count+$i;sleep+0.2;done",
                "--rng",
            ])
            .arg("--disk")
            .arg(&disk)
            .arg("--api-sock")
            .arg(&sock)
            .arg("--console-sock")
            .arg(dir.path().join("con.sock"))
            .arg("--console-log")
            .arg(&log)
            .env_remove("VESSEL_SECCOMP")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
            .spawn()
            .expect("spawn vessel"),
    );
    let stderr = || std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default();
    let t0 = std::time::Instant::now();
    while counts(&log).last().copied().unwrap_or(0) < 3 {
        if let Ok(Some(st)) = child.0.try_wait() {
            panic!(
                "the VMM ended ({st}) before the guest counted: {}",
                stderr()
            );
        }
        assert!(
            t0.elapsed() < LIMIT,
            "the guest did not count: {}",
            stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Every thread of the VMM is in its seccomp filter, without privileges.
    let pid = child.0.id();
    let mut names = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(status) = std::fs::read_to_string(t.unwrap().path().join("status")) else {
            continue;
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{k}:")))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let name = field("Name");
        assert_eq!(field("Seccomp"), "2", "{name}: not in seccomp filter mode");
        assert_eq!(field("NoNewPrivs"), "1", "{name}: NoNewPrivs not set");
        assert_eq!(field("CapEff"), "0000000000000000", "{name}: capabilities");
        names.push(name);
    }
    for want in ["vessel", "hart0", "console-in", "console-out", "vmm-api"] {
        assert!(
            names.iter().any(|n| n == want),
            "no {want} thread in {names:?}"
        );
    }

    let (status, body) = api(&sock, "GET", "/", None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"Running\""), "{body}");
    let (status, body) = api(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(status, 204, "{body}");
    assert!(api(&sock, "GET", "/", None).1.contains("\"Paused\""));
    std::thread::sleep(Duration::from_millis(300));
    let at_pause = counts(&log).last().copied();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        counts(&log).last().copied(),
        at_pause,
        "the paused guest went on counting"
    );
    let (status, body) = api(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(status, 204, "{body}");
    let t0 = std::time::Instant::now();
    while counts(&log).last().copied() <= at_pause.map(|n| n + 2) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the resumed guest does not count"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, body) = api(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("no power button"), "{body}");
    let (status, body) = api(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "Reset"}"#),
    );
    assert_eq!(status, 204, "{body}");
    let t0 = std::time::Instant::now();
    let st = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "Reset did not end the VMM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        st.code(),
        Some(10),
        "the reboot status; stderr: {}",
        stderr()
    );
    assert!(!sock.exists(), "the API socket was left behind");
}
