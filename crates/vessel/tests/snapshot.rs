//! Snapshot and restore of a Linux guest under the emu accelerator, through
//! Firecracker's API and `vessel run --restore`: a guest shell loop that counts and
//! prints the wall-clock time goes on in a new VMM process without a gap or a repeat,
//! its clock agrees with the host's, and what it wrote to its virtio-blk disk before the
//! snapshot is read back (from the disk, not the page cache) after it. Snapshots that
//! are truncated, of another format version, or that do not fit the host (memory file,
//! disk, accelerator) are refused with a message and nothing started, on the command
//! line and through `PUT /snapshot/load`, whose VMM then still loads a good one.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{ChildStdin, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{api, assets, chain_step_args, vessel, wait_for_socket, Guarded, TempDir};

const BOOT: Duration = Duration::from_secs(120);
const CMD: Duration = Duration::from_secs(30);
const CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// A VMM process with its console on pipes.
struct Vm {
    child: Guarded,
    stdin: ChildStdin,
    out: Arc<Mutex<Vec<u8>>>,
}

impl Vm {
    fn spawn(args: &[&std::ffi::OsStr]) -> Vm {
        Vm::spawn_with(vessel(), args)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    /// Waits for `needle` after byte `from`; returns the offset past it.
    fn wait_for(&mut self, needle: &str, from: usize, limit: Duration) -> usize {
        let t0 = Instant::now();
        loop {
            let text = self.text();
            if let Some(i) = text.get(from..).and_then(|t| t.find(needle)) {
                return from + i + needle.len();
            }
            if let Ok(Some(status)) = self.child.0.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = self.child.0.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("the VMM exited ({status}) before {needle:?}:\n{text}\n{err}");
            }
            assert!(
                t0.elapsed() < limit,
                "the guest never printed {needle:?} within {limit:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn type_line(&mut self, line: &str) {
        self.stdin.write_all(line.as_bytes()).unwrap();
        self.stdin.write_all(b"\n").unwrap();
        self.stdin.flush().unwrap();
    }
}

/// Whether what follows a line ends it: a whole "\r\n" (or "\n"). A line the VMM stopped
/// after its '\r' is not whole yet: the next VMM prints its '\n'.
fn ended(rest: &str) -> bool {
    rest.starts_with("\r\n") || rest.starts_with('\n')
}

/// The guest loop's lines: (count, guest wall-clock seconds), whole lines only.
fn ticks(text: &str) -> Vec<(u64, u64)> {
    text.split("tick ")
        .skip(1)
        .filter_map(|t| {
            let line = t.split(['\r', '\n']).next()?;
            ended(t.get(line.len()..)?).then_some(())?;
            let mut f = line.split_whitespace();
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Checks that the counts in `all` go up by one from `first` with nothing lost or
/// repeated.
fn assert_consecutive(all: &[(u64, u64)], first: u64, what: &str) {
    let counts: Vec<u64> = all.iter().map(|t| t.0).collect();
    assert_eq!(counts.first(), Some(&first), "{what}: {counts:?}");
    assert!(
        counts.windows(2).all(|w| w[1] == w[0] + 1),
        "{what}: ticks lost or repeated: {counts:?}"
    );
}

/// Restoring from the command line must fail fast, say `why`, and leave no API socket.
fn assert_refused(args: &[&std::ffi::OsStr], sock: &Path, why: &str) {
    let t0 = Instant::now();
    let out = vessel()
        .args(args)
        .arg("--api-sock")
        .arg(sock)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(err.contains(why), "{args:?}: wanted {why:?} in:\n{err}");
    // Said once: the message does not end in a reason followed by itself again.
    let line = err.lines().find(|l| l.contains(why)).unwrap_or_default();
    let parts: Vec<&str> = line.split(": ").collect();
    for i in 1..parts.len() {
        let tail = parts[i..].join(": ");
        assert!(
            !line.ends_with(&format!("{tail}: {tail}")),
            "{args:?}: the reason is said twice:\n{err}"
        );
    }
    assert!(t0.elapsed() < CMD, "{args:?} took {:?}", t0.elapsed());
    assert!(!sock.exists(), "{args:?} left an API socket");
}

fn copy_snapshot(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["vmstate", "memory"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

#[test]
fn a_guest_goes_on_in_a_new_vmm_after_snapshot_and_restore() {
    let a = assets();
    let dir = TempDir::new("snap");
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let snap = dir.path().join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let s1 = dir.path().join("api1.sock");
    let os = |s: &str| std::ffi::OsString::from(s);
    let boot_args: Vec<std::ffi::OsString> = vec![
        os("run"),
        os("--accel"),
        os("emu"),
        os("--memory"),
        os("256M"),
        os("--serial"),
        os("stdio"),
        os("--kernel"),
        a.join("vmlinuz").into(),
        os("--initrd"),
        a.join("initramfs.cpio.gz").into(),
        os("--cmdline"),
        os(CMDLINE),
        os("--disk"),
        disk.clone().into(),
        os("--api-sock"),
        s1.clone().into(),
    ];
    let args: Vec<&std::ffi::OsStr> = boot_args.iter().map(|s| s.as_os_str()).collect();
    let mut vm1 = Vm::spawn(&args);
    let at = vm1.wait_for("~ #", 0, BOOT);
    // A marker on the disk's first sector, flushed; then the counting loop.
    vm1.type_line(
        "echo disk-marker-before | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null; \
         i=0; while true; do i=$((i+1)); echo \"tick $i $(date +%s)\"; sleep 0.2; done &",
    );
    vm1.wait_for("tick 5 ", at, CMD);

    // Snapshot creation is refused while the VM runs, then taken paused.
    let create = format!(
        r#"{{"snapshot_type": "Full", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        snap.join("vmstate").display(),
        snap.join("memory").display()
    );
    let (s, v) = api(&s1, "PUT", "/snapshot/create", Some(&create));
    assert_eq!(s, 400, "{v}");
    assert!(
        v["fault_message"].as_str().unwrap().contains("paused"),
        "{v}"
    );
    let bogus = create.replace("\"Full\"", "\"Partial\"");
    let (s, v) = api(&s1, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(s, 204, "{v}");
    let (s, v) = api(&s1, "PUT", "/snapshot/create", Some(&bogus));
    assert_eq!(s, 400, "{v}");
    assert!(
        v["fault_message"]
            .as_str()
            .unwrap()
            .contains("Full or Diff"),
        "{v}"
    );
    let t0 = Instant::now();
    let (s, v) = api(&s1, "PUT", "/snapshot/create", Some(&create));
    assert_eq!(s, 204, "{v}");
    eprintln!("snapshot created in {:?}", t0.elapsed());
    // The old VMM dies; what it printed is the first half of the count.
    vm1.child.0.kill().unwrap();
    vm1.child.0.wait().unwrap();
    let before = vm1.text();
    let before_ticks = ticks(&before);
    let last = before_ticks.last().expect("ticks before the snapshot").0;
    // A line the old VMM was printing when it paused may end in the new one's output.
    let tail = before.rsplit_once('\n').map_or("", |(_, t)| t).to_string();

    // The refusals, each with nothing started.
    let bad = dir.path().join("bad");
    copy_snapshot(&snap, &bad);
    let state = std::fs::read(snap.join("vmstate")).unwrap();
    let sock = dir.path().join("refused.sock");
    let restore_bad = |why: &str| {
        assert_refused(
            &[
                "run".as_ref(),
                "--restore".as_ref(),
                bad.as_os_str(),
                "--serial".as_ref(),
                "null".as_ref(),
            ],
            &sock,
            why,
        )
    };
    std::fs::write(bad.join("vmstate"), &state[..state.len() / 2]).unwrap();
    restore_bad("truncated");
    let mut other = state.clone();
    other[8] = 2;
    std::fs::write(bad.join("vmstate"), &other).unwrap();
    restore_bad("version 2");
    let mut flipped = state.clone();
    *flipped.last_mut().unwrap() ^= 0x20;
    std::fs::write(bad.join("vmstate"), &flipped).unwrap();
    restore_bad("checksum");
    std::fs::write(bad.join("vmstate"), &state).unwrap();
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(bad.join("memory"))
        .unwrap();
    mem.set_len(128 << 20).unwrap();
    restore_bad("memory file");
    assert_refused(
        &[
            "run".as_ref(),
            "--restore".as_ref(),
            snap.as_os_str(),
            "--accel".as_ref(),
            "kvm".as_ref(),
        ],
        &sock,
        "cannot go on under kvm",
    );

    // Through the API: a refused load leaves the VMM waiting, and a good one then runs.
    let s2 = dir.path().join("api2.sock");
    let mut vm2 = Vm::spawn(&[
        "run".as_ref(),
        "--api-sock".as_ref(),
        s2.as_os_str(),
        "--api-only".as_ref(),
        "--accel".as_ref(),
        "emu".as_ref(),
        "--serial".as_ref(),
        "stdio".as_ref(),
    ]);
    wait_for_socket(&s2, CMD);
    std::fs::write(bad.join("vmstate"), &state[..100]).unwrap();
    let load = |state: &Path, mem: &Path| {
        format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true}}"#,
            state.display(),
            mem.display()
        )
    };
    let (s, v) = api(
        &s2,
        "PUT",
        "/snapshot/load",
        Some(&load(&bad.join("vmstate"), &snap.join("memory"))),
    );
    assert_eq!(s, 400, "{v}");
    assert!(
        v["fault_message"].as_str().unwrap().contains("truncated"),
        "{v}"
    );
    assert_eq!(api(&s2, "GET", "/", None).1["state"], "Not started");
    let uffd = load(&snap.join("vmstate"), &snap.join("memory")).replace("\"File\"", "\"Uffd\"");
    let (s, v) = api(&s2, "PUT", "/snapshot/load", Some(&uffd));
    assert_eq!(s, 400, "{v}");
    assert!(v["fault_message"].as_str().unwrap().contains("Uffd"), "{v}");
    // Loaded without resume_vm: it waits paused, printing nothing, until resumed.
    let paused = load(&snap.join("vmstate"), &snap.join("memory"))
        .replace("\"resume_vm\": true", "\"resume_vm\": false");
    let t0 = Instant::now();
    let (s, v) = api(&s2, "PUT", "/snapshot/load", Some(&paused));
    assert_eq!(s, 204, "{v}");
    eprintln!("restored (paused) in {:?}", t0.elapsed());
    assert_eq!(api(&s2, "GET", "/", None).1["state"], "Paused");
    let (s, v) = api(
        &s2,
        "PUT",
        "/snapshot/load",
        Some(&load(&snap.join("vmstate"), &snap.join("memory"))),
    );
    assert_eq!(s, 400, "a second load: {v}");
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        ticks(&vm2.text()).is_empty(),
        "the guest ran before it was resumed: {}",
        vm2.text()
    );
    let (s, v) = api(&s2, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(s, 204, "{v}");
    assert_eq!(api(&s2, "GET", "/", None).1["state"], "Running");
    let want = format!("tick {} ", last + 5);
    vm2.wait_for(&want, 0, CMD);
    let host = unix_now();
    let after = format!("{tail}{}", vm2.text());
    let all: Vec<(u64, u64)> = before_ticks.iter().copied().chain(ticks(&after)).collect();
    assert_consecutive(&all, 1, "snapshot, then load through the API");
    let guest = all.last().unwrap().1;
    assert!(
        guest.abs_diff(host) <= 2,
        "the restored guest's clock says {guest}, the host's {host}"
    );
    let (s, v) = api(&s2, "PUT", "/actions", Some(r#"{"action_type": "Stop"}"#));
    assert_eq!(s, 204, "{v}");
    drop(vm2);

    // From the command line, a while later: the count goes on from the same point, the
    // clock has moved on with the host's, and the disk holds what was written before.
    std::thread::sleep(Duration::from_secs(2));
    let s3 = dir.path().join("api3.sock");
    let mut vm3 = Vm::spawn(&[
        "run".as_ref(),
        "--restore".as_ref(),
        snap.as_os_str(),
        "--serial".as_ref(),
        "stdio".as_ref(),
        "--api-sock".as_ref(),
        s3.as_os_str(),
    ]);
    let at = vm3.wait_for(&want, 0, CMD);
    let host = unix_now();
    let after = format!("{tail}{}", vm3.text());
    let all: Vec<(u64, u64)> = before_ticks.iter().copied().chain(ticks(&after)).collect();
    assert_consecutive(&all, 1, "snapshot, then vessel run --restore");
    let guest = all.last().unwrap().1;
    assert!(
        guest.abs_diff(host) <= 2,
        "the restored guest's clock says {guest}, the host's {host}"
    );
    vm3.type_line(
        "echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=512 count=1 2>/dev/null | \
         head -c 18; echo; echo disk-marker-after | dd of=/dev/vda bs=512 seek=1 count=1 \
         conv=sync,fsync 2>/dev/null && echo wrote''-after",
    );
    let end = vm3.wait_for("wrote-after", at, CMD);
    assert!(
        vm3.text()[at..end].contains("\ndisk-marker-before"),
        "the disk's first sector after the restore:\n{}",
        &vm3.text()[at..end]
    );
    // A snapshot of the restored VM over the files it was restored from (whose memory
    // file it maps), restored again: the count still goes on.
    let (s, v) = api(&s3, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(s, 204, "{v}");
    let (s, v) = api(&s3, "PUT", "/snapshot/create", Some(&create));
    assert_eq!(s, 204, "{v}");
    vm3.child.0.kill().unwrap();
    vm3.child.0.wait().unwrap();
    let second = format!("{tail}{}", vm3.text());
    let second_ticks: Vec<(u64, u64)> =
        before_ticks.iter().copied().chain(ticks(&second)).collect();
    let last2 = second_ticks.last().unwrap().0;
    let tail2 = second.rsplit_once('\n').map_or("", |(_, t)| t).to_string();
    let mut vm4 = Vm::spawn(&[
        "run".as_ref(),
        "--restore".as_ref(),
        snap.as_os_str(),
        "--serial".as_ref(),
        "stdio".as_ref(),
    ]);
    vm4.wait_for(&format!("tick {} ", last2 + 3), 0, CMD);
    let all: Vec<(u64, u64)> = second_ticks
        .iter()
        .copied()
        .chain(ticks(&format!("{tail2}{}", vm4.text())))
        .collect();
    assert_consecutive(&all, 1, "a snapshot of a restored VM, restored");
    vm4.type_line("sync; poweroff -f");
    let t0 = Instant::now();
    while vm4.child.0.try_wait().unwrap().is_none() {
        assert!(t0.elapsed() < CMD, "the restored VMM did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    let on_disk = std::fs::read(&disk).unwrap();
    assert!(on_disk.starts_with(b"disk-marker-before"));
    assert!(on_disk[512..].starts_with(b"disk-marker-after"));

    // A disk that changed size since the snapshot is refused.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(9 << 20)
        .unwrap();
    assert_refused(
        &["run".as_ref(), "--restore".as_ref(), snap.as_os_str()],
        &sock,
        "disk",
    );
}

/// Each vCPU's counting loop's lines "cpuC tick N", whole lines only: (C, N).
fn cpu_ticks(text: &str) -> Vec<(u32, u64)> {
    text.split("cpu")
        .skip(1)
        .filter_map(|t| {
            let line = t.split(['\r', '\n']).next()?;
            ended(t.get(line.len()..)?).then_some(())?;
            let (c, n) = line.split_once(" tick ")?;
            Some((c.parse().ok()?, n.parse().ok()?))
        })
        .collect()
}

/// Two vCPUs, and the disk on virtio-pci (MSI-X, a BAR the guest placed).
#[test]
fn two_vcpus_each_go_on_after_a_restore_with_virtio_pci() {
    let a = assets();
    let dir = TempDir::new("snap-smp");
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let snap = dir.path().join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let s1 = dir.path().join("api1.sock");
    let mut vm1 = Vm::spawn(&[
        "run".as_ref(),
        "--accel".as_ref(),
        "emu".as_ref(),
        "--cpus".as_ref(),
        "2".as_ref(),
        "--memory".as_ref(),
        "256M".as_ref(),
        "--serial".as_ref(),
        "stdio".as_ref(),
        "--kernel".as_ref(),
        a.join("vmlinuz").as_os_str(),
        "--initrd".as_ref(),
        a.join("initramfs.cpio.gz").as_os_str(),
        "--cmdline".as_ref(),
        CMDLINE.as_ref(),
        "--api-sock".as_ref(),
        s1.as_os_str(),
        "--virtio-transport".as_ref(),
        "pci".as_ref(),
        "--disk".as_ref(),
        disk.as_os_str(),
    ]);
    let at = vm1.wait_for("~ #", 0, BOOT);
    vm1.type_line(
        "ls /sys/bus/pci/drivers/virtio-pci/ | grep -c 0000: ; echo pci-marker | dd of=/dev/vda \
         bs=512 count=1 conv=sync,fsync 2>/dev/null; echo marker''-written",
    );
    let written = vm1.wait_for("marker-written", at, CMD);
    assert!(
        vm1.text()[at..written].contains("\n1\r\n"),
        "the disk is not a virtio-pci function: {}",
        &vm1.text()[at..written]
    );
    let at = written;
    // One loop pinned to each CPU: both CPUs' state (and their IPIs, timers) matter.
    vm1.type_line(
        "for c in 0 1; do taskset $((c+1)) sh -c \"i=0; while true; do i=\\$((i+1)); \
         echo cpu$c tick \\$i; sleep 0.2; done\" & done",
    );
    vm1.wait_for("cpu1 tick 5\r\n", at, CMD);
    let (s, v) = api(&s1, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(s, 204, "{v}");
    let create = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        snap.join("vmstate").display(),
        snap.join("memory").display()
    );
    let (s, v) = api(&s1, "PUT", "/snapshot/create", Some(&create));
    assert_eq!(s, 204, "{v}");
    vm1.child.0.kill().unwrap();
    vm1.child.0.wait().unwrap();
    let before = vm1.text();
    let tail = before.rsplit_once('\n').map_or("", |(_, t)| t).to_string();
    let last = |all: &[(u32, u64)], c: u32| all.iter().rev().find(|t| t.0 == c).map(|t| t.1);
    let before_ticks = cpu_ticks(&before);
    let (last0, last1) = (
        last(&before_ticks, 0).unwrap(),
        last(&before_ticks, 1).unwrap(),
    );

    let mut vm2 = Vm::spawn(&[
        "run".as_ref(),
        "--restore".as_ref(),
        snap.as_os_str(),
        "--serial".as_ref(),
        "stdio".as_ref(),
    ]);
    vm2.wait_for(&format!("cpu0 tick {}\r\n", last0 + 5), 0, CMD);
    vm2.wait_for(&format!("cpu1 tick {}\r\n", last1 + 5), 0, CMD);
    let all: Vec<(u32, u64)> = before_ticks
        .into_iter()
        .chain(cpu_ticks(&format!("{tail}{}", vm2.text())))
        .collect();
    for c in [0, 1] {
        let counts: Vec<u64> = all.iter().filter(|t| t.0 == c).map(|t| t.1).collect();
        assert!(
            counts.first() == Some(&1) && counts.windows(2).all(|w| w[1] == w[0] + 1),
            "cpu{c}'s loop lost or repeated ticks: {counts:?}"
        );
    }
    vm2.type_line(
        "grep -c ^processor /proc/cpuinfo; echo 3 > /proc/sys/vm/drop_caches; \
         dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 10; echo; \
         echo vda-queues-$(ls /sys/block/vda/mq | wc -l); echo cpus''-counted",
    );
    let end = vm2.wait_for("cpus-counted", 0, CMD);
    let text = &vm2.text()[..end];
    assert!(text.contains("\n2\r\n"), "{text}");
    // A virtio-pci disk with no queue count has one per vCPU, and the restored VMM
    // opened as many as the snapshot's device had.
    assert!(text.contains("vda-queues-2"), "{text}");
    assert!(
        text.contains("\npci-marker"),
        "the disk after the restore:\n{text}"
    );
}

/// A kernel booted through SeaBIOS and QEMU's linuxboot_dma option ROM (fw_cfg, the full
/// ACPI platform with PM1, virtio on PCI) goes on after a restore too.
#[test]
fn a_firmware_booted_guest_goes_on_after_a_restore() {
    const BIOS: &str = "/usr/share/seabios/bios.bin";
    const ROM: &str = "/usr/share/qemu/linuxboot_dma.bin";
    assert!(
        Path::new(BIOS).is_file() && Path::new(ROM).is_file(),
        "apt-get install seabios qemu-system-data"
    );
    let a = assets();
    let dir = TempDir::new("snap-fw");
    let snap = dir.path().join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let s1 = dir.path().join("api1.sock");
    let mut vm1 = Vm::spawn(&[
        "run".as_ref(),
        "--accel".as_ref(),
        "emu".as_ref(),
        "--memory".as_ref(),
        "256M".as_ref(),
        "--serial".as_ref(),
        "stdio".as_ref(),
        "--firmware".as_ref(),
        BIOS.as_ref(),
        "--option-rom".as_ref(),
        ROM.as_ref(),
        "--kernel".as_ref(),
        a.join("vmlinuz").as_os_str(),
        "--initrd".as_ref(),
        a.join("initramfs.cpio.gz").as_os_str(),
        "--cmdline".as_ref(),
        CMDLINE.as_ref(),
        "--api-sock".as_ref(),
        s1.as_os_str(),
    ]);
    let at = vm1.wait_for("~ #", 0, BOOT);
    vm1.type_line(
        "i=0; while true; do i=$((i+1)); echo \"tick $i $(date +%s)\"; sleep 0.2; done &",
    );
    vm1.wait_for("tick 5 ", at, CMD);
    let (s, v) = api(&s1, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(s, 204, "{v}");
    let create = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        snap.join("vmstate").display(),
        snap.join("memory").display()
    );
    let (s, v) = api(&s1, "PUT", "/snapshot/create", Some(&create));
    assert_eq!(s, 204, "{v}");
    vm1.child.0.kill().unwrap();
    vm1.child.0.wait().unwrap();
    let before = vm1.text();
    let tail = before.rsplit_once('\n').map_or("", |(_, t)| t).to_string();
    let before_ticks = ticks(&before);
    let last = before_ticks.last().unwrap().0;

    let mut vm2 = Vm::spawn(&[
        "run".as_ref(),
        "--restore".as_ref(),
        snap.as_os_str(),
        "--serial".as_ref(),
        "stdio".as_ref(),
    ]);
    vm2.wait_for(&format!("tick {} ", last + 5), 0, CMD);
    let host = unix_now();
    let all: Vec<(u64, u64)> = before_ticks
        .into_iter()
        .chain(ticks(&format!("{tail}{}", vm2.text())))
        .collect();
    assert_consecutive(&all, 1, "a firmware-booted guest");
    let guest = all.last().unwrap().1;
    assert!(guest.abs_diff(host) <= 2, "guest {guest}, host {host}");
}

/// The MD5 the guest printed after `name ` on a line of its own.
fn md5_after(text: &str, name: &str) -> Option<String> {
    let at = text.rfind(&format!("{name} "))? + name.len() + 1;
    let sum = text.get(at..at + 32)?;
    sum.bytes()
        .all(|b| b.is_ascii_hexdigit())
        .then(|| sum.to_string())
}

/// Waits for the guest to print `name MD5` after byte `from`; returns the MD5.
fn wait_md5(vm: &Vm, name: &str, from: usize) -> String {
    let t0 = Instant::now();
    loop {
        let text = vm.text();
        if let Some(sum) = text.get(from..).and_then(|t| md5_after(t, name)) {
            return sum;
        }
        assert!(
            t0.elapsed() < CMD,
            "the guest never printed {name}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A guest booted through UEFI firmware (Debian's OVMF, on the q35 platform: its
/// variable store a flash, its chipset programmed by the firmware) goes on after a
/// snapshot and restore, then after a live migration to another VMM: its count without a
/// gap or repeat, the LPC bridge's configuration space (PMBASE and the rest OVMF wrote)
/// as it read before, its clock the host's. The restore writes the snapshot's flash back
/// into the variable store's file; a variable store of another size is refused with
/// nothing started.
#[test]
fn a_uefi_guest_goes_on_after_a_restore_and_a_live_migration() {
    const ROM: &str = "/usr/share/qemu/linuxboot_dma.bin";
    let template = Path::new(vmm::config::OVMF_VARS_TEMPLATE);
    assert!(
        Path::new(vmm::config::OVMF_CODE).is_file() && template.is_file(),
        "{} is missing: apt-get install ovmf",
        vmm::config::OVMF_CODE
    );
    assert!(Path::new(ROM).is_file(), "apt-get install qemu-system-data");
    let a = assets();
    let dir = TempDir::new("snap-uefi");
    let snap = dir.path().join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let vars = dir.path().join("VARS.fd");
    std::fs::copy(template, &vars).unwrap();
    let s1 = dir.path().join("api1.sock");
    let mut vm1 = Vm::spawn(&[
        "run".as_ref(),
        "--accel".as_ref(),
        "emu".as_ref(),
        "--memory".as_ref(),
        "256M".as_ref(),
        "--serial".as_ref(),
        "stdio".as_ref(),
        "--firmware".as_ref(),
        "ovmf".as_ref(),
        "--firmware-vars".as_ref(),
        vars.as_os_str(),
        "--option-rom".as_ref(),
        ROM.as_ref(),
        "--kernel".as_ref(),
        a.join("vmlinuz").as_os_str(),
        "--initrd".as_ref(),
        a.join("initramfs.cpio.gz").as_os_str(),
        "--cmdline".as_ref(),
        CMDLINE.as_ref(),
        "--api-sock".as_ref(),
        s1.as_os_str(),
    ]);
    let at = vm1.wait_for("~ #", 0, BOOT);
    // The LPC bridge's first 256 bytes, as Linux reads them through the chipset.
    let lpc = "echo \"lpc $(md5sum </sys/bus/pci/devices/0000:00:1f.0/config | cut -c1-32)\"";
    vm1.type_line(lpc);
    let lpc_before = wait_md5(&vm1, "lpc", at);
    vm1.type_line(
        "i=0; while true; do i=$((i+1)); echo \"tick $i $(date +%s)\"; sleep 0.2; done &",
    );
    vm1.wait_for("tick 5 ", at, CMD);
    let (s, v) = api(&s1, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(s, 204, "{v}");
    let create = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        snap.join("vmstate").display(),
        snap.join("memory").display()
    );
    let (s, v) = api(&s1, "PUT", "/snapshot/create", Some(&create));
    assert_eq!(s, 204, "{v}");
    vm1.child.0.kill().unwrap();
    vm1.child.0.wait().unwrap();
    let flash_then = std::fs::read(&vars).unwrap();
    let before = vm1.text();
    let tail = before.rsplit_once('\n').map_or("", |(_, t)| t).to_string();
    let before_ticks = ticks(&before);
    let last = before_ticks.last().unwrap().0;

    // A variable store of another size than the snapshot's flash: refused.
    let s2 = dir.path().join("api2.sock");
    let restore: [&std::ffi::OsStr; 3] = ["run".as_ref(), "--restore".as_ref(), snap.as_os_str()];
    std::fs::write(&vars, vec![0xffu8; flash_then.len() / 2]).unwrap();
    assert_refused(&restore, &s2, "the UEFI variable store");
    // Of the right size, other contents: the restore puts the snapshot's back.
    std::fs::write(&vars, vec![0xffu8; flash_then.len()]).unwrap();
    let mut vm2 = Vm::spawn(&[
        "run".as_ref(),
        "--restore".as_ref(),
        snap.as_os_str(),
        "--serial".as_ref(),
        "stdio".as_ref(),
        "--api-sock".as_ref(),
        s2.as_os_str(),
    ]);
    vm2.wait_for(&format!("tick {} ", last + 5), 0, CMD);
    assert!(
        std::fs::read(&vars).unwrap() == flash_then,
        "the variable store's file does not hold the snapshot's flash"
    );
    let from = vm2.text().len();
    vm2.type_line(lpc);
    assert_eq!(
        wait_md5(&vm2, "lpc", from),
        lpc_before,
        "the LPC bridge's configuration space changed across the restore"
    );
    let host = unix_now();
    let restored: Vec<(u64, u64)> = before_ticks
        .into_iter()
        .chain(ticks(&format!("{tail}{}", vm2.text())))
        .collect();
    assert_consecutive(&restored, 1, "a UEFI guest after its restore");
    let guest = restored.last().unwrap().1;
    assert!(guest.abs_diff(host) <= 2, "guest {guest}, host {host}");

    // On to another VMM, live.
    let incoming = dir.path().join("incoming.sock");
    let mut vm3 = Vm::spawn(&[
        "run".as_ref(),
        "--incoming".as_ref(),
        format!("unix:{}", incoming.display()).as_ref(),
        "--serial".as_ref(),
        "stdio".as_ref(),
    ]);
    wait_for_socket(&incoming, CMD);
    migrate(&s2, &format!("unix:{}", incoming.display()), &mut vm2);
    let middle = vm2.text();
    let tail2 = middle.rsplit_once('\n').map_or("", |(_, t)| t).to_string();
    let last = ticks(&middle).last().unwrap().0;
    vm3.wait_for(&format!("tick {} ", last + 5), 0, CMD);
    let from = vm3.text().len();
    vm3.type_line(lpc);
    assert_eq!(
        wait_md5(&vm3, "lpc", from),
        lpc_before,
        "the LPC bridge's configuration space changed across the migration"
    );
    let host = unix_now();
    let moved: Vec<(u64, u64)> = ticks(&middle)
        .into_iter()
        .chain(ticks(&format!("{tail2}{}", vm3.text())))
        .collect();
    assert_consecutive(&moved, moved[0].0, "a UEFI guest after its live migration");
    let guest = moved.last().unwrap().1;
    assert!(guest.abs_diff(host) <= 2, "guest {guest}, host {host}");
    assert!(
        std::fs::read(&vars).unwrap() == flash_then,
        "the variable store's file changed across the migration"
    );
}

/// A generated 64-bit guest that counts in a register and prints `count N` (hex) between
/// short spins: CPU state only, so it shows a lost or repeated step across a restore.
fn counting_guest() -> Vec<u8> {
    use common::guest::{Lib64, LOAD};
    use iced_x86::code_asm::*;

    let mut a = CodeAssembler::new(64).unwrap();
    let mut lib = Lib64::new(&mut a);
    let mut top = a.create_label();
    let mut wait = a.create_label();
    a.xor(r12d, r12d).unwrap();
    a.set_label(&mut top).unwrap();
    a.inc(r12).unwrap();
    lib.print(&mut a, "count ").unwrap();
    a.mov(rax, r12).unwrap();
    a.call(lib.puthex).unwrap();
    lib.print(&mut a, "\n").unwrap();
    a.mov(ecx, 20_000u32).unwrap();
    a.set_label(&mut wait).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(wait).unwrap();
    a.jmp(top).unwrap();
    lib.emit(&mut a).unwrap();
    a.assemble(LOAD).unwrap()
}

/// The kvm accelerator (the in-kernel irqchip, PIT and clock; registers, LAPIC, MSRs and
/// events from KVM): a generated guest that counts in a register and prints the count
/// goes on after a restore in a new VMM.
#[test]
fn a_kvm_guest_goes_on_after_a_restore() {
    use common::guest::linux64_elf;

    let code = counting_guest();

    let dir = TempDir::new("snap-kvm");
    let kernel = dir.file("count.elf", &linux64_elf(&code));
    let snap = dir.path().join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let s1 = dir.path().join("api1.sock");
    let mut vm1 = Vm::spawn(&[
        "run".as_ref(),
        "--accel".as_ref(),
        "kvm".as_ref(),
        "--memory".as_ref(),
        "64M".as_ref(),
        "--serial".as_ref(),
        "stdio".as_ref(),
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--api-sock".as_ref(),
        s1.as_os_str(),
    ]);
    vm1.wait_for(&format!("count {:016x}\n", 20), 0, CMD);
    let (s, v) = api(&s1, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(s, 204, "{v}");
    let create = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        snap.join("vmstate").display(),
        snap.join("memory").display()
    );
    let (s, v) = api(&s1, "PUT", "/snapshot/create", Some(&create));
    assert_eq!(s, 204, "{v}");
    vm1.child.0.kill().unwrap();
    vm1.child.0.wait().unwrap();
    let counts = |text: &str| -> Vec<u64> {
        text.split("count ")
            .skip(1)
            .filter_map(|t| {
                let n = t.get(..16)?;
                t.get(16..)?.starts_with('\n').then_some(())?;
                u64::from_str_radix(n, 16).ok()
            })
            .collect()
    };
    let before = vm1.text();
    let tail = before.rsplit_once('\n').map_or("", |(_, t)| t).to_string();
    let last = *counts(&before).last().unwrap();

    let mut vm2 = Vm::spawn(&[
        "run".as_ref(),
        "--restore".as_ref(),
        snap.as_os_str(),
        "--serial".as_ref(),
        "stdio".as_ref(),
    ]);
    vm2.wait_for(&format!("count {:016x}\n", last + 20), 0, CMD);
    let all: Vec<u64> = counts(&before)
        .into_iter()
        .chain(counts(&format!("{tail}{}", vm2.text())))
        .collect();
    assert!(
        all.first() == Some(&1) && all.windows(2).all(|w| w[1] == w[0] + 1),
        "counts lost or repeated across the restore: {all:?}"
    );
}

/// Pauses `vm` (API socket `sock`), snapshots it into `snap` and ends it; returns its
/// output.
fn snapshot_and_kill(mut vm: Vm, sock: &Path, snap: &Path) -> String {
    std::fs::create_dir_all(snap).unwrap();
    let (s, v) = api(sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(s, 204, "{v}");
    let create = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        snap.join("vmstate").display(),
        snap.join("memory").display()
    );
    let (s, v) = api(sock, "PUT", "/snapshot/create", Some(&create));
    assert_eq!(s, 204, "{v}");
    vm.child.0.kill().unwrap();
    vm.child.0.wait().unwrap();
    vm.text()
}

/// The generated guest's "count N" lines (N in 16 hex digits), whole lines only.
fn hex_counts(text: &str) -> Vec<u64> {
    text.split("count ")
        .skip(1)
        .filter_map(|t| {
            let n = t.get(..16)?;
            t.get(16..)?.starts_with('\n').then_some(())?;
            u64::from_str_radix(n, 16).ok()
        })
        .collect()
}

/// Issue #17's cross-accelerator restore on a PVM host: a generated guest that counts in
/// a register (CPU state only: no interrupts, no kvmclock) boots under kvm, goes on
/// under emu from kvm's snapshot, and back under kvm from emu's, each time without a
/// lost or repeated count; each snapshot says which accelerator took it. A guest booted
/// under emu with every feature emu has (`--cpu-model max`) was shown CPU features this
/// host's KVM does not offer, and its snapshot is refused under kvm.
#[test]
fn a_generated_guest_goes_on_across_accelerators() {
    use common::guest::linux64_elf;

    let code = counting_guest();

    let dir = TempDir::new("snap-cross");
    let kernel = dir.file("count.elf", &linux64_elf(&code));
    // A guest that is to move between accelerators is shown only what both offer (as
    // between hosts of different CPUs, a CPU template): under KVM it would see the leaf-7
    // extensions of this host's CPU (AMD's CLWB or UMIP, Intel's RTM or MOVDIRI, …),
    // which emu lacks, and the restore under emu would be refused. This guest needs none
    // of leaf 7; the named models are no help here, as this host's KVM (PVM) reports
    // too little to satisfy them.
    let clear = |register: u32| {
        format!(
            r#"{{"leaf": 7, "subleaf": 0, "register": {register}, "set": 0, "clear": {}}}"#,
            u32::MAX
        )
    };
    let config = dir.file(
        "vm.json",
        format!(
            r#"{{"kernel": "{}", "memory_mib": 64, "accel": "kvm", "serial": {{"type": "stdio"}},
                "cpuid_modifiers": [{}, {}, {}]}}"#,
            kernel.display(),
            clear(1),
            clear(2),
            clear(3)
        )
        .as_bytes(),
    );
    let mut all_text = String::new();
    let mut from: Option<std::path::PathBuf> = None;
    for (step, accel) in ["kvm", "emu", "kvm"].into_iter().enumerate() {
        let sock = dir.path().join(format!("api{step}.sock"));
        let args = chain_step_args(&sock, &config, from.as_deref(), accel);
        let mut vm = Vm::spawn(&args);
        let next = hex_counts(&all_text).last().copied().unwrap_or(0) + 20;
        vm.wait_for(&format!("count {next:016x}\n"), 0, CMD);
        let snap = dir.path().join(format!("snap{step}"));
        let out = snapshot_and_kill(vm, &sock, &snap);
        // A line the old VMM was printing when it paused ends in the new one's output.
        all_text.push_str(&out);
        let state = std::fs::read(snap.join("vmstate")).unwrap();
        let tag = format!("\"accel\":\"{accel}\"");
        assert!(
            state.windows(tag.len()).any(|w| w == tag.as_bytes()),
            "step {step}: the snapshot was not taken under {accel}"
        );
        from = Some(snap);
    }
    let all = hex_counts(&all_text);
    assert!(
        all.len() > 60 && all.first() == Some(&1) && all.windows(2).all(|w| w[1] == w[0] + 1),
        "counts lost or repeated across the accelerators: {all:?}"
    );

    let sock = dir.path().join("api-emu.sock");
    let mut vm = Vm::spawn(&[
        "run".as_ref(),
        "--accel".as_ref(),
        "emu".as_ref(),
        "--memory".as_ref(),
        "64M".as_ref(),
        "--serial".as_ref(),
        "stdio".as_ref(),
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--api-sock".as_ref(),
        sock.as_os_str(),
    ]);
    vm.wait_for(&format!("count {:016x}\n", 5), 0, CMD);
    let snap = dir.path().join("snap-emu");
    snapshot_and_kill(vm, &sock, &snap);
    assert_refused(
        &[
            "run".as_ref(),
            "--restore".as_ref(),
            snap.as_os_str(),
            "--accel".as_ref(),
            "kvm".as_ref(),
        ],
        &dir.path().join("refused.sock"),
        "kvm lacks CPU features the guest was shown",
    );
}

/// A cycle count from the environment variable `name` (a soak run asks for more, e.g.
/// bench/snapshot-soak.sh), or `default`.
fn cycles_from_env(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a cycle count")),
        Err(_) => default,
    }
}

/// Snapshot → kill → restore, over and over (`VESSEL_SNAPSHOT_CYCLES`, default 10; the
/// issue's figure is 100), each restore from the snapshot the previous VMM took: the
/// count never loses or repeats a tick.
#[test]
fn snapshot_and_restore_cycles_in_a_row() {
    let cycles = cycles_from_env("VESSEL_SNAPSHOT_CYCLES", 10);
    let a = assets();
    let dir = TempDir::new("snap-cycles");
    let snap = dir.path().join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let sock = dir.path().join("api.sock");
    let create = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        snap.join("vmstate").display(),
        snap.join("memory").display()
    );
    let mut vm = Vm::spawn(&[
        "run".as_ref(),
        "--accel".as_ref(),
        "emu".as_ref(),
        "--memory".as_ref(),
        "128M".as_ref(),
        "--serial".as_ref(),
        "stdio".as_ref(),
        "--kernel".as_ref(),
        a.join("vmlinuz").as_os_str(),
        "--initrd".as_ref(),
        a.join("initramfs.cpio.gz").as_os_str(),
        "--cmdline".as_ref(),
        CMDLINE.as_ref(),
        "--api-sock".as_ref(),
        sock.as_os_str(),
    ]);
    let at = vm.wait_for("~ #", 0, BOOT);
    vm.type_line(
        "i=0; while true; do i=$((i+1)); echo \"tick $i $(date +%s)\"; sleep 0.05; done &",
    );
    vm.wait_for("tick 3 ", at, CMD);
    let mut all: Vec<(u64, u64)> = Vec::new();
    let mut tail = String::new();
    for cycle in 0..=cycles {
        if cycle > 0 {
            vm = Vm::spawn(&[
                "run".as_ref(),
                "--restore".as_ref(),
                snap.as_os_str(),
                "--serial".as_ref(),
                "stdio".as_ref(),
                "--api-sock".as_ref(),
                sock.as_os_str(),
            ]);
            let last = all.last().map_or(0, |t| t.0);
            vm.wait_for(&format!("tick {} ", last + 2), 0, CMD);
            wait_for_socket(&sock, CMD);
        }
        let (s, v) = api(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
        assert_eq!(s, 204, "cycle {cycle}: {v}");
        let (s, v) = api(&sock, "PUT", "/snapshot/create", Some(&create));
        assert_eq!(s, 204, "cycle {cycle}: {v}");
        vm.child.0.kill().unwrap();
        vm.child.0.wait().unwrap();
        let _ = std::fs::remove_file(&sock);
        let text = format!("{tail}{}", vm.text());
        all.extend(ticks(&text));
        tail = text.rsplit_once('\n').map_or("", |(_, t)| t).to_string();
        assert_consecutive(&all, 1, &format!("after {cycle} restores"));
    }
    let host = unix_now();
    let guest = all.last().unwrap().1;
    assert!(guest.abs_diff(host) <= 2, "guest {guest}, host {host}");
}

/// Whether a socket listens on 127.0.0.1:`port` (/proc/net/tcp, state 0A).
fn tcp_listening(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&want.as_str()) && f.get(3) == Some(&"0A")
        })
}

/// The writer's last "churn N." line.
fn churns(text: &str) -> u64 {
    text.split("churn ")
        .filter_map(|t| t.split_once('.')?.0.parse().ok())
        .max()
        .unwrap_or(0)
}

/// The guest's lines "sum NAME MD5".
fn sum_of(text: &str, name: &str) -> Option<String> {
    let key = format!("sum {name} ");
    let at = text.rfind(&key)? + key.len();
    Some(text.get(at..at + 32)?.to_string())
}

/// Sends the VM behind `from` to `to` (a VMM started with `--incoming`), checks the
/// report, and waits for the source to end; returns the report.
fn migrate(from: &Path, to: &str, source: &mut Vm) -> serde_json::Value {
    let body = format!(r#"{{"destination_url": "{to}"}}"#);
    let t0 = Instant::now();
    let (s, v) = api(from, "PUT", "/migration/send", Some(&body));
    assert_eq!(s, 200, "{v}");
    eprintln!("migrated to {to} in {:?}: {v}", t0.elapsed());
    assert!(v["rounds"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["downtime_ms"].as_f64().unwrap() > 0.0, "{v}");
    assert!(
        v["total_ms"].as_f64().unwrap() >= v["downtime_ms"].as_f64().unwrap(),
        "{v}"
    );
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = source.child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < CMD,
            "the source VMM did not end after migrating"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("the source VMM ended {:?} after its report", t0.elapsed());
    let mut err = String::new();
    if let Some(mut e) = source.child.0.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(err.contains("migrated"), "{err}");
    v
}

/// Live migration of a Linux guest under emu while it writes memory: from one VMM to
/// another over a Unix socket, then on to a third over TCP. A refused migration (no one
/// listening) leaves the guest running where it was. The guest's count goes on without a
/// gap or repeat in each new VMM, a file it wrote in memory (tmpfs) before keeps its
/// checksum, and its clock agrees with the host's.
#[test]
fn a_guest_goes_on_in_another_vmm_after_live_migration() {
    let a = assets();
    let dir = TempDir::new("migrate");
    let s1 = dir.path().join("api1.sock");
    let s2 = dir.path().join("api2.sock");
    let s3 = dir.path().join("api3.sock");
    let incoming = dir.path().join("incoming.sock");
    // A disk both VMMs reach under the same path (shared storage).
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let mut vm1 = Vm::spawn(&[
        "run".as_ref(),
        "--accel".as_ref(),
        "emu".as_ref(),
        "--memory".as_ref(),
        "256M".as_ref(),
        "--serial".as_ref(),
        "stdio".as_ref(),
        "--kernel".as_ref(),
        a.join("vmlinuz").as_os_str(),
        "--initrd".as_ref(),
        a.join("initramfs.cpio.gz").as_os_str(),
        "--cmdline".as_ref(),
        CMDLINE.as_ref(),
        "--api-sock".as_ref(),
        s1.as_os_str(),
        "--disk".as_ref(),
        disk.as_os_str(),
    ]);
    let at = vm1.wait_for("~ #", 0, BOOT);
    // A file in memory whose checksum must survive; a writer that keeps rewriting 8 MiB
    // of memory and checks, before each rewrite, that the last one still has the
    // checksum it had when written (a page a migration lost or sent stale breaks it);
    // the count.
    vm1.type_line(
        "echo disk-marker-before | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null; \
         dd if=/dev/urandom of=/tmp/fixed bs=1M count=4 2>/dev/null; \
         echo \"sum fi\"\"xed $(md5sum </tmp/fixed | cut -c1-32)\"; \
         j=0; while true; do \
           if [ -f /tmp/sum ] && [ \"$(md5sum </tmp/data)\" != \"$(cat /tmp/sum)\" ]; then \
             echo \"churn-\"\"bad\"; fi; \
           dd if=/dev/urandom of=/tmp/data bs=1M count=8 2>/dev/null; \
           md5sum </tmp/data >/tmp/sum; j=$((j+1)); echo \"churn $j.\"; done & \
         i=0; while true; do i=$((i+1)); echo \"tick $i $(date +%s)\"; sleep 0.1; done &",
    );
    let sum = vm1.wait_for("sum fixed ", at, CMD);
    vm1.wait_for("\n", sum, CMD);
    vm1.wait_for("tick 5 ", at, CMD);
    let fixed = sum_of(&vm1.text(), "fixed").expect("the guest's checksum");

    // No one listening: refused, and the guest goes on here.
    let nowhere = format!("unix:{}", dir.path().join("nowhere.sock").display());
    let (s, v) = api(
        &s1,
        "PUT",
        "/migration/send",
        Some(&format!(r#"{{"destination_url": "{nowhere}"}}"#)),
    );
    assert_eq!(s, 400, "{v}");
    let last = ticks(&vm1.text()).last().unwrap().0;
    vm1.wait_for(&format!("tick {} ", last + 3), 0, CMD);

    // A destination that expects another VM refuses this one after it arrived: the
    // source goes on, with its disk's image lock taken back.
    let other = dir.path().join("other.json");
    let mut cfg = vmm::VmConfig::new(a.join("vmlinuz"));
    cfg.memory_mib = 128;
    cfg.serial = vmm::SerialConfig::Null;
    std::fs::write(&other, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let refusing = dir.path().join("refusing.sock");
    let mut no = Vm::spawn(&[
        "run".as_ref(),
        "--incoming".as_ref(),
        format!("unix:{}", refusing.display()).as_ref(),
        "--config".as_ref(),
        other.as_os_str(),
    ]);
    wait_for_socket(&refusing, CMD);
    let (s, v) = api(
        &s1,
        "PUT",
        "/migration/send",
        Some(&format!(
            r#"{{"destination_url": "unix:{}"}}"#,
            refusing.display()
        )),
    );
    assert_eq!(s, 400, "{v}");
    assert!(v.to_string().contains("--config"), "{v}");
    let _ = no.child.0.wait();
    let last = ticks(&vm1.text()).last().unwrap().0;
    vm1.wait_for(&format!("tick {} ", last + 3), 0, CMD);
    let resize = vessel()
        .args(["img", "resize"])
        .arg(&disk)
        .arg("8M")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&resize.stderr);
    assert!(
        !resize.status.success() && err.contains("in use"),
        "the source's image lock was not taken back: {err}"
    );

    // Over a Unix socket.
    let mut vm2 = Vm::spawn(&[
        "run".as_ref(),
        "--incoming".as_ref(),
        format!("unix:{}", incoming.display()).as_ref(),
        "--serial".as_ref(),
        "stdio".as_ref(),
        "--api-sock".as_ref(),
        s2.as_os_str(),
    ]);
    wait_for_socket(&incoming, CMD);
    migrate(&s1, &format!("unix:{}", incoming.display()), &mut vm1);
    let before = vm1.text();
    let tail = before.rsplit_once('\n').map_or("", |(_, t)| t).to_string();
    let last = ticks(&before).last().unwrap().0;
    vm2.wait_for(&format!("tick {} ", last + 5), 0, CMD);
    assert!(!incoming.exists(), "the incoming socket is left behind");

    // On over TCP, from the VMM the VM migrated to.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tcp = format!("tcp:127.0.0.1:{port}");
    let mut vm3 = Vm::spawn(&[
        "run".as_ref(),
        "--incoming".as_ref(),
        tcp.as_ref(),
        "--serial".as_ref(),
        "stdio".as_ref(),
        "--api-sock".as_ref(),
        s3.as_os_str(),
    ]);
    // Listening, seen from the kernel's table: a probe connection would be taken for
    // the source.
    let t0 = Instant::now();
    while !tcp_listening(port) {
        assert!(t0.elapsed() < CMD, "nothing listens on {tcp}");
        std::thread::sleep(Duration::from_millis(10));
    }
    wait_for_socket(&s2, CMD);
    migrate(&s2, &tcp, &mut vm2);
    let middle = format!("{tail}{}", vm2.text());
    let tail2 = middle.rsplit_once('\n').map_or("", |(_, t)| t).to_string();
    let last = ticks(&middle).last().unwrap().0;
    let at = vm3.wait_for(&format!("tick {} ", last + 5), 0, CMD);
    // The disk: what the first VMM wrote is read back (from the disk, not the page cache),
    // and the third writes on.
    vm3.type_line(
        "echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=512 count=1 2>/dev/null | \
         head -c 18; echo; echo disk-marker-after | dd of=/dev/vda bs=512 seek=1 count=1 \
         conv=sync,fsync 2>/dev/null && echo wrote''-after",
    );
    let end = vm3.wait_for("wrote-after", at, CMD);
    assert!(
        vm3.text()[at..end].contains("\ndisk-marker-before"),
        "the disk's first sector after two migrations:\n{}",
        &vm3.text()[at..end]
    );
    let on_disk = std::fs::read(&disk).unwrap();
    assert!(on_disk[512..].starts_with(b"disk-marker-after"));
    // Split so that the shell's echo of the line is not taken for its output.
    vm3.type_line("echo \"sum af\"\"ter $(md5sum </tmp/fixed | cut -c1-32)\"");
    let sum = vm3.wait_for("sum after ", at, CMD);
    vm3.wait_for("\n", sum, CMD);
    assert_eq!(
        sum_of(&vm3.text(), "after").as_deref(),
        Some(fixed.as_str()),
        "the file in guest memory changed across two migrations"
    );

    // The writer went on in each VMM, and never found its memory changed under it.
    let full = format!("{before}{middle}{}", vm3.text());
    assert!(!full.contains("churn-bad"), "{full}");
    let mut churned = 0;
    for (name, text) in [("first", &before), ("second", &middle)] {
        let n = churns(text);
        assert!(n > churned, "no rewrite in the {name} VMM: {text}");
        churned = n;
    }
    let t0 = Instant::now();
    while churns(&vm3.text()) < churned + 2 {
        assert!(t0.elapsed() < CMD, "the writer stopped in the third VMM");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!vm3.text().contains("churn-bad"), "{}", vm3.text());

    let mut all = ticks(&before);
    all.extend(ticks(&middle));
    all.extend(ticks(&format!("{tail2}{}", vm3.text())));
    assert_consecutive(&all, 1, "across two live migrations");
    let host = unix_now();
    let guest = all.last().unwrap().1;
    assert!(guest.abs_diff(host) <= 2, "guest {guest}, host {host}");
}

/// Blocks a file takes on disk.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Diff snapshots (Firecracker's `snapshot_type: "Diff"`): a Full snapshot, then a Diff
/// that holds only the pages written since (far less than the Full's memory), rebased
/// onto a copy of the Full's memory file with `vessel rebase-snap`, restores to a guest
/// whose count goes on from the Diff; a Diff taken in the restored VMM follows the
/// snapshot it was restored from, and restores the same way.
#[test]
fn diff_snapshots_rebased_onto_their_base_restore() {
    let a = assets();
    let dir = TempDir::new("snap-diff");
    let sock = dir.path().join("api.sock");
    let [full, diff1, diff2] = ["full", "diff1", "diff2"].map(|n| {
        let d = dir.path().join(n);
        std::fs::create_dir_all(&d).unwrap();
        d
    });
    let create = |to: &Path, kind: &str| {
        format!(
            r#"{{"snapshot_type": "{kind}", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            to.join("vmstate").display(),
            to.join("memory").display()
        )
    };
    let mut vm = Vm::spawn(&[
        "run".as_ref(),
        "--accel".as_ref(),
        "emu".as_ref(),
        "--memory".as_ref(),
        "128M".as_ref(),
        "--serial".as_ref(),
        "stdio".as_ref(),
        "--kernel".as_ref(),
        a.join("vmlinuz").as_os_str(),
        "--initrd".as_ref(),
        a.join("initramfs.cpio.gz").as_os_str(),
        "--cmdline".as_ref(),
        CMDLINE.as_ref(),
        "--api-sock".as_ref(),
        sock.as_os_str(),
    ]);
    let at = vm.wait_for("~ #", 0, BOOT);
    vm.type_line(
        "i=0; while true; do i=$((i+1)); echo \"tick $i $(date +%s)\"; sleep 0.05; done &",
    );
    vm.wait_for("tick 3 ", at, CMD);
    let pause = |sock: &Path| {
        let (s, v) = api(sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
        assert_eq!(s, 204, "{v}");
    };
    let snapshot = |sock: &Path, to: &Path, kind: &str| {
        let (s, v) = api(sock, "PUT", "/snapshot/create", Some(&create(to, kind)));
        assert_eq!(s, 204, "{kind}: {v}");
    };
    pause(&sock);
    snapshot(&sock, &full, "Full");
    let (s, v) = api(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(s, 204, "{v}");
    let last = ticks(&vm.text()).last().unwrap().0;
    vm.wait_for(&format!("tick {} ", last + 10), 0, CMD);
    pause(&sock);
    snapshot(&sock, &diff1, "Diff");
    vm.child.0.kill().unwrap();
    vm.child.0.wait().unwrap();
    let _ = std::fs::remove_file(&sock);
    let mut text = vm.text();
    let (full_mem, diff_mem) = (
        allocated(&full.join("memory")),
        allocated(&diff1.join("memory")),
    );
    eprintln!("full snapshot memory {full_mem} bytes, diff {diff_mem} bytes");
    assert!(
        diff_mem * 4 < full_mem,
        "the diff is not much smaller than the full snapshot: {diff_mem} vs {full_mem}"
    );

    let merged = dir.path().join("merged");
    std::fs::create_dir_all(&merged).unwrap();
    std::fs::copy(full.join("memory"), merged.join("memory")).unwrap();
    let rebase = |base: &Path, diff: &Path| {
        let out = vessel()
            .arg("rebase-snap")
            .arg("--base-file")
            .arg(base)
            .arg("--diff-file")
            .arg(diff)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    rebase(&merged.join("memory"), &diff1.join("memory"));

    // Restored from the diff's state and the rebased memory; a second Diff there.
    let restore = |state: &Path, mem: &Path| {
        Vm::spawn(&[
            "run".as_ref(),
            "--restore".as_ref(),
            state.as_os_str(),
            "--restore-mem".as_ref(),
            mem.as_os_str(),
            "--serial".as_ref(),
            "stdio".as_ref(),
            "--api-sock".as_ref(),
            sock.as_os_str(),
        ])
    };
    let mut all = ticks(&text);
    let mut tail = text.rsplit_once('\n').map_or("", |(_, t)| t).to_string();
    let mut vm = restore(&diff1.join("vmstate"), &merged.join("memory"));
    let last = all.last().unwrap().0;
    vm.wait_for(&format!("tick {} ", last + 10), 0, CMD);
    wait_for_socket(&sock, CMD);
    pause(&sock);
    snapshot(&sock, &diff2, "Diff");
    vm.child.0.kill().unwrap();
    vm.child.0.wait().unwrap();
    let _ = std::fs::remove_file(&sock);
    text = format!("{tail}{}", vm.text());
    all.extend(ticks(&text));
    tail = text.rsplit_once('\n').map_or("", |(_, t)| t).to_string();
    assert_consecutive(&all, 1, "after restoring the first diff");
    assert!(allocated(&diff2.join("memory")) * 4 < full_mem);

    // The restored VMM's memory file is the second diff's base.
    rebase(&merged.join("memory"), &diff2.join("memory"));
    let mut vm = restore(&diff2.join("vmstate"), &merged.join("memory"));
    let last = all.last().unwrap().0;
    vm.wait_for(&format!("tick {} ", last + 10), 0, CMD);
    vm.child.0.kill().unwrap();
    vm.child.0.wait().unwrap();
    all.extend(ticks(&format!("{tail}{}", vm.text())));
    assert_consecutive(&all, 1, "after restoring the second diff");
}

/// Live migration under kvm (KVM's dirty log), with a generated guest (these PVM hosts
/// run no stock kernel under kvm): it counts, and each round rewrites one page of a
/// 64-page ring after checking that the page still holds what it wrote there 64 rounds
/// before; a page the migration lost or sent stale prints BAD. The count goes on at the
/// destination without a gap, and every page of the ring is checked there.
#[test]
fn a_kvm_guest_goes_on_after_live_migration() {
    use common::guest::{linux64_elf, Lib64, LOAD};
    use iced_x86::code_asm::*;
    const RING: u64 = 0x200_0000;
    const PAGES: u64 = 64;

    let mut a = CodeAssembler::new(64).unwrap();
    let mut lib = Lib64::new(&mut a);
    let (mut top, mut fill, mut wait, mut bad, mut stop) = (
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
    );
    a.xor(r12d, r12d).unwrap();
    a.set_label(&mut top).unwrap();
    a.inc(r12).unwrap();
    // r13: the ring page of this round.
    a.mov(r13, r12).unwrap();
    a.and(r13, (PAGES - 1) as i32).unwrap();
    a.shl(r13, 12).unwrap();
    a.mov(rax, RING).unwrap();
    a.add(r13, rax).unwrap();
    a.cmp(r12, PAGES as i32).unwrap();
    a.jbe(fill).unwrap();
    a.mov(r14, r12).unwrap();
    a.sub(r14, PAGES as i32).unwrap();
    a.cmp(qword_ptr(r13), r14).unwrap();
    a.jne(bad).unwrap();
    a.cmp(qword_ptr(r13 + 4088), r14).unwrap();
    a.jne(bad).unwrap();
    a.set_label(&mut fill).unwrap();
    a.mov(rdi, r13).unwrap();
    a.mov(rax, r12).unwrap();
    a.mov(ecx, 512u32).unwrap();
    a.rep().stosq().unwrap();
    lib.print(&mut a, "count ").unwrap();
    a.mov(rax, r12).unwrap();
    a.call(lib.puthex).unwrap();
    lib.print(&mut a, "\n").unwrap();
    a.mov(ecx, 2_000u32).unwrap();
    a.set_label(&mut wait).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(wait).unwrap();
    a.jmp(top).unwrap();
    a.set_label(&mut bad).unwrap();
    lib.print(&mut a, "BAD\n").unwrap();
    a.set_label(&mut stop).unwrap();
    a.hlt().unwrap();
    a.jmp(stop).unwrap();
    lib.emit(&mut a).unwrap();
    let code = a.assemble(LOAD).unwrap();

    let dir = TempDir::new("migrate-kvm");
    let kernel = dir.file("ring.elf", &linux64_elf(&code));
    let s1 = dir.path().join("api1.sock");
    let incoming = dir.path().join("in.sock");
    let mut vm1 = Vm::spawn(&[
        "run".as_ref(),
        "--accel".as_ref(),
        "kvm".as_ref(),
        "--memory".as_ref(),
        "64M".as_ref(),
        "--serial".as_ref(),
        "stdio".as_ref(),
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--api-sock".as_ref(),
        s1.as_os_str(),
    ]);
    vm1.wait_for(&format!("count {:016x}\n", PAGES + 8), 0, CMD);
    let counts = |text: &str| -> Vec<u64> {
        text.split("count ")
            .skip(1)
            .filter_map(|t| {
                let n = t.get(..16)?;
                t.get(16..)?.starts_with('\n').then_some(())?;
                u64::from_str_radix(n, 16).ok()
            })
            .collect()
    };
    let mut vm2 = Vm::spawn(&[
        "run".as_ref(),
        "--incoming".as_ref(),
        format!("unix:{}", incoming.display()).as_ref(),
        "--serial".as_ref(),
        "stdio".as_ref(),
    ]);
    wait_for_socket(&incoming, CMD);
    migrate(&s1, &format!("unix:{}", incoming.display()), &mut vm1);
    let before = vm1.text();
    assert!(!before.contains("BAD"), "{before}");
    let tail = before.rsplit_once('\n').map_or("", |(_, t)| t).to_string();
    let last = *counts(&before).last().unwrap();
    vm2.wait_for(&format!("count {:016x}\n", last + 2 * PAGES), 0, CMD);
    let after = vm2.text();
    assert!(!after.contains("BAD"), "a page came over wrong: {after}");
    let all: Vec<u64> = counts(&before)
        .into_iter()
        .chain(counts(&format!("{tail}{after}")))
        .collect();
    assert!(
        all.first() == Some(&1) && all.windows(2).all(|w| w[1] == w[0] + 1),
        "counts lost or repeated across the migration: {all:?}"
    );
}

/// A network namespace this test creates and deletes, with a persistent TAP device in
/// it (as the manager's are) whose host end has `host_ip`/24.
fn netns_with_tap(tag: &str, tap: &str, host_ip: &str, multi_queue: bool) -> common::NetNs {
    let ns = common::NetNs::new(tag);
    let addr = format!("{host_ip}/24");
    let mut add = vec!["tuntap", "add", "dev", tap, "mode", "tap"];
    if multi_queue {
        add.push("multi_queue");
    }
    for args in [
        vec!["link", "set", "lo", "up"],
        add,
        vec!["addr", "add", &addr, "dev", tap],
        vec!["link", "set", tap, "up"],
    ] {
        ns.ip(&args);
    }
    ns
}

/// A vessel command that runs in the namespace `ns`.
fn vessel_in(ns: &common::NetNs) -> std::process::Command {
    let mut c = ns.exec();
    c.arg(env!("CARGO_BIN_EXE_vessel"));
    c
}

impl Vm {
    /// A VMM from `cmd` (`vessel()`, or a vessel in a namespace) with `args`, its output
    /// collected as it comes.
    fn spawn_with(mut cmd: std::process::Command, args: &[&std::ffi::OsStr]) -> Vm {
        let mut child = cmd
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vessel");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let o = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                o.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Vm {
            child: Guarded(child),
            stdin,
            out,
        }
    }
}

/// The test's TCP peer, in the namespace: takes one connection, notes every "tcp N"
/// line the guest sends and answers each with "ack N".
struct Peer {
    got: Arc<Mutex<Vec<u64>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Peer {
    fn listen(ns: &common::NetNs, addr: &'static str) -> Peer {
        use std::os::fd::AsRawFd;
        let netns = std::fs::File::open(format!("/var/run/netns/{}", ns.0)).unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (g, s) = (got.clone(), stop.clone());
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            // SAFETY: setns on this thread alone, with a namespace file held open.
            let r = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            let l = std::net::TcpListener::bind(addr).unwrap();
            l.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            let conn = loop {
                match l.accept() {
                    Ok((c, _)) => break c,
                    Err(_) if !s.load(std::sync::atomic::Ordering::Relaxed) => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(_) => return,
                }
            };
            conn.set_nonblocking(false).unwrap();
            conn.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let mut w = conn.try_clone().unwrap();
            let mut r = std::io::BufReader::new(conn);
            let mut line = String::new();
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                use std::io::BufRead;
                match r.read_line(&mut line) {
                    Ok(0) => return,
                    Ok(_) if line.ends_with('\n') => {
                        if let Some(n) = line.trim().strip_prefix("tcp ") {
                            if let Ok(n) = n.parse::<u64>() {
                                g.lock().unwrap().push(n);
                                let _ = w.write_all(format!("ack {n}\n").as_bytes());
                            }
                        }
                        line.clear();
                    }
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => return,
                }
            }
        });
        ready.recv_timeout(CMD).expect("the peer never listened");
        Peer {
            got,
            stop,
            thread: Some(thread),
        }
    }

    fn last(&self) -> u64 {
        self.got.lock().unwrap().last().copied().unwrap_or(0)
    }

    /// Waits until the guest's lines reach `n`.
    fn wait_for(&self, n: u64, what: &str) {
        let t0 = Instant::now();
        while self.last() < n {
            assert!(
                t0.elapsed() < CMD,
                "{what}: the TCP peer got up to {} only, not {n}",
                self.last()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How far the guest's clock is behind the host's, in s: the guest prints its clock to
/// the microsecond (busybox `adjtimex`: its `date` has no sub-second format) and the host
/// reads its own when the line arrives. The line's way out (a few processes, the serial
/// port, the test's polling) only adds, so the least of three readings is taken.
fn clock_offset(vm: &mut Vm, what: &str) -> f64 {
    let mut least = f64::MAX;
    for _ in 0..3 {
        let from = vm.text().len();
        vm.type_line(
            "echo \"cl\"\"k $(adjtimex | grep -E 'status|tv_' | tr -s ' \\n' '  ') e\"\"nd\"",
        );
        let at = vm.wait_for("clk ", from, CMD);
        let end = vm.wait_for(" end", at, CMD);
        let host = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let line = vm.text()[at..end - 4].to_string();
        let field = |name: &str| -> u64 {
            line.split(name)
                .nth(1)
                .and_then(|t| t.split_whitespace().next()?.parse().ok())
                .unwrap_or_else(|| panic!("{what}: no {name} in the guest's {line:?}"))
        };
        // STA_NANO (0x2000): the "usec" field holds nanoseconds.
        let scale = if field("status:") & 0x2000 != 0 {
            1e-9
        } else {
            1e-6
        };
        let guest = field("tv_sec:") as f64 + field("tv_usec:") as f64 * scale;
        least = least.min(host - guest);
    }
    eprintln!("{what}: the guest's clock is {least:.3} s behind the host's");
    least
}

/// The guest's clock after a move is where it was before it, against the host's (within
/// 0.2 s: the measurement's own spread), and within the issue's 1 s of the host's.
/// (Its offset from boot on is the CMOS RTC's: Linux sets its clock from the RTC's
/// whole seconds plus half a second, and the RTC's seconds turn over with the host's,
/// so a guest starts within half a second of the host, moves or not.)
fn assert_clock_kept(vm: &mut Vm, before: f64, what: &str) {
    let now = clock_offset(vm, what);
    assert!(
        (now - before).abs() <= 0.2,
        "{what}: the guest's clock is {now:.3} s behind the host's, {before:.3} s before"
    );
    assert!(
        now.abs() <= 1.0,
        "{what}: the guest's clock is {now:.3} s behind the host's"
    );
}

/// The issue's guest program across snapshots and restores and live migrations,
/// on an interface to a TAP in a namespace the test makes: a counter with the wall
/// clock, a file in memory whose checksum must hold, a writer that keeps rewriting 8
/// MiB of memory (at 50 MB/s or more, measured) and checks before each rewrite that the
/// last one kept its checksum, a TCP connection to a peer in the namespace that carries a line each
/// count (answered by the peer), and a file on an ext2 virtio disk kept open and
/// appended to each count. After each move: the count goes on without a gap or repeat,
/// the TCP connection carries data both ways, the file takes more records (checked
/// from the disk, in order), the memory checksums hold, and the guest's clock stays as
/// far from the host's as before the move and within 1 s of it (see
/// [`assert_clock_kept`]). The migration goes over a Unix socket, so the TAP's queue is
/// handed over with SCM_RIGHTS while the source still holds it. A cycle is a restore
/// and a migration; `VESSEL_HOSTIO_CYCLES` of them (default 2) run one after another,
/// each from where the last left the guest (bench/snapshot-soak.sh runs 100).
#[test]
fn a_guest_keeps_its_tcp_connection_and_open_file_across_restore_and_live_migration() {
    host_io_across_moves("hostio", false);
}

/// The same with two vCPUs on a multi-queue TAP (two queue pairs on virtio-pci): after
/// the moves each vCPU's pings still go out on its own queue pair and come back.
#[test]
fn a_two_cpu_guest_on_a_multi_queue_tap_keeps_its_connection_across_restore_and_live_migration() {
    host_io_across_moves("hostmq", true);
}

fn host_io_across_moves(tag: &str, multi_queue: bool) {
    let a = assets();
    let dir = TempDir::new(tag);
    let ns = netns_with_tap(tag, "vsnap0", "10.0.3.1", multi_queue);
    let peer = Peer::listen(&ns, "10.0.3.1:7000");
    let s1 = dir.path().join("api1.sock");
    let snap = dir.path().join("snap");
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 16 << 20]).unwrap();
    let mut vm1 = Vm::spawn_with(
        vessel_in(&ns),
        &[
            "run".as_ref(),
            "--accel".as_ref(),
            "emu".as_ref(),
            "--memory".as_ref(),
            "256M".as_ref(),
            "--serial".as_ref(),
            "stdio".as_ref(),
            "--kernel".as_ref(),
            a.join("vmlinuz").as_os_str(),
            "--initrd".as_ref(),
            a.join("initramfs.cpio.gz").as_os_str(),
            "--cmdline".as_ref(),
            CMDLINE.as_ref(),
            "--api-sock".as_ref(),
            s1.as_os_str(),
            "--disk".as_ref(),
            disk.as_os_str(),
            "--net".as_ref(),
            if multi_queue {
                "tap=vsnap0,mac=52:54:00:12:34:57,queues=2"
            } else {
                "tap=vsnap0,mac=52:54:00:12:34:57"
            }
            .as_ref(),
            "--cpus".as_ref(),
            if multi_queue { "2" } else { "1" }.as_ref(),
            "--virtio-transport".as_ref(),
            if multi_queue { "pci" } else { "mmio" }.as_ref(),
        ],
    );
    let at = vm1.wait_for("~ #", 0, BOOT);
    vm1.type_line(
        "ip addr add 10.0.3.15/24 dev eth0 && ip link set eth0 up && \
         mke2fs -q /dev/vda && mkdir -p /mnt && mount -t ext2 /dev/vda /mnt && \
         echo mount''ed-ok",
    );
    let at = vm1.wait_for("mounted-ok", at, CMD);
    vm1.type_line(
        "dd if=/dev/urandom of=/tmp/fixed bs=1M count=4 2>/dev/null; \
         echo \"sum fi\"\"xed $(md5sum </tmp/fixed | cut -c1-32)\"; \
         dd if=/dev/urandom of=/tmp/a bs=1M count=8 2>/dev/null; md5sum </tmp/a >/tmp/a.sum; \
         dd if=/dev/urandom of=/tmp/b bs=1M count=8 2>/dev/null; md5sum </tmp/b >/tmp/b.sum; \
         j=0; p=; while true; do for f in a b; do \
           if [ -n \"$p\" ] && [ \"$(md5sum </tmp/data)\" != \"$(cat /tmp/$p.sum)\" ]; then \
             echo \"churn-\"\"bad\"; fi; \
           cp /tmp/$f /tmp/data; cp /tmp/$f /tmp/d2; cp /tmp/$f /tmp/d3; \
           p=$f; j=$((j+1)); echo \"churn $j.\"; done; done & \
         (exec 3>>/mnt/log; i=0; while true; do i=$((i+1)); echo \"rec $i\" >&3; \
           echo \"tcp $i\"; echo \"tick $i $(date +%s)\" >&2; sleep 0.1; done) \
           | nc 10.0.3.1 7000 > /tmp/acks &",
    );
    let sum = vm1.wait_for("sum fixed ", at, CMD);
    vm1.wait_for("\n", sum, CMD);
    vm1.wait_for("tick 10 ", at, CMD);
    peer.wait_for(10, "before the snapshot");
    let offset = clock_offset(&mut vm1, "before the snapshot");
    assert!(
        offset.abs() <= 1.0,
        "the booted guest's clock is {offset:.3} s behind the host's"
    );
    let fixed = sum_of(&vm1.text(), "fixed").expect("the guest's checksum");

    // Each cycle: snapshot, end the VMM, restore in a new one; then a live migration
    // over a Unix socket, the writer running, to another.
    let cycles = cycles_from_env("VESSEL_HOSTIO_CYCLES", 2);
    let (mut vm, mut sock) = (vm1, s1);
    // Every VMM's output, whole lines counted once (`tail`: the line one VMM left
    // unfinished, which the next ends).
    let (mut all, mut full, mut tail) = (Vec::new(), String::new(), String::new());
    let mut take = |text: String, all: &mut Vec<(u64, u64)>, full: &mut String| {
        let text = format!("{tail}{text}");
        all.extend(ticks(&text));
        tail = text.rsplit_once('\n').map_or("", |(_, t)| t).to_string();
        full.push_str(&text);
        all.last().unwrap().0
    };
    let t_cycles = Instant::now();
    for cycle in 1..=cycles {
        let before = snapshot_and_kill(vm, &sock, &snap);
        let _ = std::fs::remove_file(&sock);
        let last = take(before, &mut all, &mut full);
        let restored_sock = dir.path().join(format!("r{cycle}.sock"));
        let mut restored = Vm::spawn_with(
            vessel_in(&ns),
            &[
                "run".as_ref(),
                "--restore".as_ref(),
                snap.as_os_str(),
                "--serial".as_ref(),
                "stdio".as_ref(),
                "--api-sock".as_ref(),
                restored_sock.as_os_str(),
            ],
        );
        restored.wait_for(&format!("tick {} ", last + 5), 0, CMD);
        peer.wait_for(last + 5, &format!("after restore {cycle}"));
        assert_clock_kept(&mut restored, offset, &format!("after restore {cycle}"));

        let incoming = dir.path().join(format!("in{cycle}.sock"));
        let next_sock = dir.path().join(format!("m{cycle}.sock"));
        let mut next = Vm::spawn_with(
            vessel_in(&ns),
            &[
                "run".as_ref(),
                "--incoming".as_ref(),
                format!("unix:{}", incoming.display()).as_ref(),
                "--serial".as_ref(),
                "stdio".as_ref(),
                "--api-sock".as_ref(),
                next_sock.as_os_str(),
            ],
        );
        wait_for_socket(&incoming, CMD);
        wait_for_socket(&restored_sock, CMD);
        let churned = if cycle == 1 {
            // The writer's rate just before the migration (three 8 MiB copies a
            // round), as the guest's rounds show it: the issue asks for a migration
            // under at least 50 MB/s.
            let (c0, t0) = (churns(&restored.text()), Instant::now());
            std::thread::sleep(Duration::from_secs(2));
            let churned = churns(&restored.text());
            let rate = (churned - c0) as f64 * 24.0 * 1.048_576 / t0.elapsed().as_secs_f64();
            eprintln!("the guest writes {rate:.0} MB/s");
            // Two emu vCPUs share the host's time: the rate is held to the issue's
            // figure with one (on a host whose cores are not all taken).
            if !multi_queue {
                assert!(
                    rate >= 50.0,
                    "the guest's writer does {rate:.0} MB/s, under 50 (host load: {})",
                    std::fs::read_to_string("/proc/loadavg")
                        .unwrap_or_default()
                        .trim()
                );
            }
            Some(churned)
        } else {
            None
        };
        let report = migrate(
            &restored_sock,
            &format!("unix:{}", incoming.display()),
            &mut restored,
        );
        let middle = restored.text();
        if let Some(churned) = churned {
            // A migration shorter than one of the writer's rounds shows the writer ran by
            // what it dirtied meanwhile: another pre-copy round, or megabytes sent at the
            // stop (an idle guest dirties a few pages).
            let rounds = report["rounds"].as_u64().unwrap_or(0);
            let last = report["last_pages"].as_u64().unwrap_or(0);
            assert!(
                churns(&middle) > churned || rounds >= 2 || last >= 1024,
                "the writer did not run during the migration: {report}"
            );
        }
        let last = take(middle, &mut all, &mut full);
        next.wait_for(&format!("tick {} ", last + 5), 0, CMD);
        peer.wait_for(last + 5, &format!("after live migration {cycle}"));
        // The writer goes on at the destination.
        let (seen, t0) = (churns(&full), Instant::now());
        while churns(&next.text()) <= seen {
            assert!(
                t0.elapsed() < CMD,
                "the writer stopped after live migration {cycle}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_clock_kept(&mut next, offset, &format!("after live migration {cycle}"));
        assert_consecutive(&all, 1, &format!("after {cycle} cycles"));
        (vm, sock) = (next, next_sock);
    }
    eprintln!(
        "{cycles} cycles of restore and live migration in {:.1} s",
        t_cycles.elapsed().as_secs_f64()
    );

    // The peer's answers reached the guest after every move, the file on disk has every
    // record in order (read back from the disk), and the file in memory is unchanged.
    let last = all.last().unwrap().0;
    let at = vm.text().len();
    vm.type_line(
        "sync; echo 3 > /proc/sys/vm/drop_caches; echo \"acks $(tail -n 1 /tmp/acks | cut -d' ' -f2).\"; \
         awk '$2 != NR { bad = 1 } END { print (bad ? \"log-\" \"bad\" : \"log-\" \"ok\"), NR \".\" }' /mnt/log; \
         echo \"sum af\"\"ter $(md5sum </tmp/fixed | cut -c1-32)\"",
    );
    let s = vm.wait_for("sum after ", at, CMD);
    vm.wait_for("\n", s, CMD);
    let text = vm.text();
    // The last of each: the shell's echo of the command line holds the words too.
    let acks: u64 = text[at..]
        .rsplit("acks ")
        .next()
        .and_then(|t| t.split('.').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no ack count: {}", &text[at..]));
    assert!(
        acks > last,
        "the guest's last answer from the peer is {acks}, not past {last}"
    );
    let records: u64 = text[at..]
        .rsplit("log-ok ")
        .next()
        .filter(|_| text[at..].contains("log-ok "))
        .and_then(|t| t.split('.').next()?.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "the file's records are not all there in order: {}",
                &text[at..]
            )
        });
    assert!(
        records > last,
        "the file has {records} records, not past {last}"
    );
    assert_eq!(
        sum_of(&text, "after").as_deref(),
        Some(fixed.as_str()),
        "the file in guest memory changed"
    );
    if multi_queue {
        let out = vm.text().len();
        vm.type_line(
            "ls /sys/class/net/eth0/queues; for cpu in 0 1; do taskset -c $cpu ping -c 2 -W 5 \
             10.0.3.1 | grep -c 'bytes from' | sed 's/^/pin''gs-/'; done",
        );
        let end = vm.wait_for("pings-", out, CMD);
        let end = vm.wait_for("pings-", end, CMD);
        vm.wait_for("\n", end, CMD);
        let got = vm.text()[out..].to_string();
        assert!(got.contains("rx-1") && got.contains("tx-1"), "{got}");
        assert_eq!(
            got.matches("pings-2").count(),
            2,
            "pings from each vCPU: {got}"
        );
    }

    take(vm.text(), &mut all, &mut full);
    assert!(!full.contains("churn-bad"), "{full}");
    assert_consecutive(
        &all,
        1,
        &format!("across {cycles} restores and live migrations"),
    );
    let sent = peer.got.lock().unwrap().clone();
    assert!(
        sent.windows(2).all(|w| w[1] == w[0] + 1) && sent.first() == Some(&1),
        "the TCP stream lost or repeated lines: {sent:?}"
    );
    drop(vm);
}

/// vsock across a snapshot and restore and a live migration: the guest's connection to
/// a host program ends with a transport reset (the host end stayed with the old VMM,
/// which closed it), as Firecracker's snapshots do; its listening sockets stay, and
/// new host connections reach them through the same socket path in each new VMM. The
/// migration hands the listening socket over (SCM_RIGHTS), so the path never stops
/// answering.
#[test]
fn vsock_connections_reset_and_new_ones_work_after_restore_and_live_migration() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixStream;

    let a = assets();
    let dir = TempDir::new("snap-vsock");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest-src/vsock-test.c");
    let initrd = common::initramfs_with_program(dir.path(), &src, "vsock-test", &[]);
    let uds = dir.path().join("v.sock");
    let s1 = dir.path().join("api1.sock");
    let s2 = dir.path().join("api2.sock");
    let s3 = dir.path().join("api3.sock");
    let snap = dir.path().join("snap");
    let incoming = dir.path().join("incoming.sock");
    let vsock_arg = format!("cid=3,uds={}", uds.display());
    let mut vm1 = Vm::spawn(&[
        "run".as_ref(),
        "--accel".as_ref(),
        "emu".as_ref(),
        "--memory".as_ref(),
        "128M".as_ref(),
        "--serial".as_ref(),
        "stdio".as_ref(),
        "--kernel".as_ref(),
        a.join("vmlinuz").as_os_str(),
        "--initrd".as_ref(),
        initrd.as_os_str(),
        "--cmdline".as_ref(),
        CMDLINE.as_ref(),
        "--api-sock".as_ref(),
        s1.as_os_str(),
        "--vsock".as_ref(),
        vsock_arg.as_ref(),
    ]);
    vm1.wait_for("vessel-init:", 0, BOOT);
    let at = vm1.wait_for("# ", 0, BOOT);
    // Host to guest: CONNECT, then a message and its answer.
    let connect = |port: u32| -> (UnixStream, BufReader<UnixStream>) {
        let mut s = UnixStream::connect(&uds).unwrap();
        s.set_read_timeout(Some(CMD)).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.starts_with("OK "), "CONNECT {port}: {line:?}");
        (s, r)
    };
    let ping = |port: u32, vm: &mut Vm, from: usize| {
        let (mut s, mut r) = connect(port);
        s.write_all(b"ping").unwrap();
        let mut reply = [0u8; 16];
        let n = r.read(&mut reply).unwrap();
        assert_eq!(&reply[..n], b"pong:ping", "port {port}");
        vm.wait_for("GUEST-ACCEPTED ping", from, CMD);
    };
    vm1.type_line("/vsock-test hold 5000 & /vsock-test listen 5001 &");
    vm1.wait_for("HOLDING 5000", at, CMD);
    vm1.wait_for("LISTENING 5001", at, CMD);
    let (mut held, mut held_r) = connect(5000);
    held.write_all(b"first").unwrap();
    vm1.wait_for("GUEST-HELD first", at, CMD);

    // Snapshot and restore: the host end sees the old VMM close it; the guest's end is
    // reset; the listener on 5001 takes a new connection.
    snapshot_and_kill(vm1, &s1, &snap);
    let _ = std::fs::remove_file(&s1);
    let mut rest = Vec::new();
    let n = held_r.read_to_end(&mut rest).unwrap_or(0);
    assert_eq!(n, 0, "the held connection went on at the host: {rest:?}");
    let mut vm2 = Vm::spawn(&[
        "run".as_ref(),
        "--restore".as_ref(),
        snap.as_os_str(),
        "--serial".as_ref(),
        "stdio".as_ref(),
        "--api-sock".as_ref(),
        s2.as_os_str(),
    ]);
    vm2.wait_for("GUEST-RESET", 0, CMD);
    ping(5001, &mut vm2, 0);

    // Live migration: the same again, and the socket path answers at the destination.
    let at = vm2.text().len();
    vm2.type_line("/vsock-test hold 5002 & /vsock-test listen 5003 &");
    vm2.wait_for("HOLDING 5002", at, CMD);
    vm2.wait_for("LISTENING 5003", at, CMD);
    let (mut held, mut held_r) = connect(5002);
    held.write_all(b"second").unwrap();
    vm2.wait_for("GUEST-HELD second", at, CMD);
    let mut vm3 = Vm::spawn(&[
        "run".as_ref(),
        "--incoming".as_ref(),
        format!("unix:{}", incoming.display()).as_ref(),
        "--serial".as_ref(),
        "stdio".as_ref(),
        "--api-sock".as_ref(),
        s3.as_os_str(),
    ]);
    wait_for_socket(&incoming, CMD);
    wait_for_socket(&s2, CMD);
    migrate(&s2, &format!("unix:{}", incoming.display()), &mut vm2);
    let n = held_r.read_to_end(&mut rest).unwrap_or(0);
    assert_eq!(n, 0, "the held connection went on at the host: {rest:?}");
    vm3.wait_for("GUEST-RESET", 0, CMD);
    ping(5003, &mut vm3, 0);
    let _ = held.shutdown(std::net::Shutdown::Both);
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a process this test started and has not reaped; no memory.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Starts `PUT /migration/send` to `to` on a thread; its answer comes from the handle.
fn migrate_in_background(
    from: &Path,
    to: &str,
) -> std::thread::JoinHandle<(u16, serde_json::Value, Duration)> {
    let (from, body) = (
        from.to_path_buf(),
        format!(r#"{{"destination_url": "{to}"}}"#),
    );
    std::thread::spawn(move || {
        let t0 = Instant::now();
        let (s, v) = api(&from, "PUT", "/migration/send", Some(&body));
        (s, v, t0.elapsed())
    })
}

/// Issue 17: live migrations that fail part-way leave the source VM as it was. The
/// destination VMM killed while it reads the first round; a destination that closes the
/// stream after a megabyte; one that takes the whole stream, the guest stopped at the
/// source, and closes without an answer (a destination that died while building the VM);
/// a socket nobody listens on any more. Each time the source answers 400 within seconds
/// and goes on: the guest runs (its count goes on without a gap or repeat), the API
/// answers, the disk's image lock is held again, the vsock socket answers and the
/// guest's vsock connection to the host is still open at both ends. Then the VM still
/// migrates. A destination whose source breaks off the stream ends with an error and
/// leaves no socket behind.
#[test]
fn failed_live_migrations_leave_the_source_running_and_nothing_behind() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::{UnixListener, UnixStream};

    let a = assets();
    let dir = TempDir::new("migfail");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest-src/vsock-test.c");
    let initrd = common::initramfs_with_program(dir.path(), &src, "vsock-test", &[]);
    let uds = dir.path().join("v.sock");
    let s1 = dir.path().join("api1.sock");
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let vsock_arg = format!("cid=3,uds={}", uds.display());
    let mut vm = Vm::spawn(&[
        "run".as_ref(),
        "--accel".as_ref(),
        "emu".as_ref(),
        "--memory".as_ref(),
        "256M".as_ref(),
        "--serial".as_ref(),
        "stdio".as_ref(),
        "--kernel".as_ref(),
        a.join("vmlinuz").as_os_str(),
        "--initrd".as_ref(),
        initrd.as_os_str(),
        "--cmdline".as_ref(),
        CMDLINE.as_ref(),
        "--api-sock".as_ref(),
        s1.as_os_str(),
        "--disk".as_ref(),
        disk.as_os_str(),
        "--vsock".as_ref(),
        vsock_arg.as_ref(),
    ]);
    vm.wait_for("vessel-init:", 0, BOOT);
    let at = vm.wait_for("# ", 0, BOOT);
    // RAM in use (so the first round is tens of MiB), a vsock connection the guest holds,
    // a vsock listener, and the count.
    vm.type_line(
        "dd if=/dev/urandom of=/tmp/fill bs=1M count=32 2>/dev/null; \
         /vsock-test hold 5000 & while true; do /vsock-test listen 5001; done & \
         i=0; while true; do i=$((i+1)); echo \"tick $i $(date +%s)\"; sleep 0.1; done &",
    );
    vm.wait_for("HOLDING 5000", at, CMD);
    vm.wait_for("LISTENING 5001", at, CMD);
    vm.wait_for("tick 3 ", at, CMD);
    let mut held = UnixStream::connect(&uds).unwrap();
    held.set_read_timeout(Some(CMD)).unwrap();
    held.write_all(b"CONNECT 5000\n").unwrap();
    let mut held_r = BufReader::new(held.try_clone().unwrap());
    let mut line = String::new();
    held_r.read_line(&mut line).unwrap();
    assert!(line.starts_with("OK "), "CONNECT 5000: {line:?}");
    held.write_all(b"first").unwrap();
    vm.wait_for("GUEST-HELD first", at, CMD);

    // What must hold after each failure.
    let mut goes_on = |vm: &mut Vm, what: &str| {
        let (s, v) = api(&s1, "GET", "/vessel/status", None);
        assert_eq!(s, 200, "{what}: {v}");
        assert_eq!(v["state"], "Running", "{what}: {v}");
        let last = ticks(&vm.text()).last().unwrap().0;
        vm.wait_for(&format!("tick {} ", last + 3), 0, CMD);
        let resize = vessel()
            .args(["img", "resize"])
            .arg(&disk)
            .arg("8M")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&resize.stderr);
        assert!(
            !resize.status.success() && err.contains("in use"),
            "{what}: the source's image lock was not taken back: {err}"
        );
        // The guest's listener answers at the same path (the guest starts it again after
        // each connection: until then the device refuses); the held connection is open
        // at both ends (nothing to read, no end of stream; the guest saw no reset).
        let t0 = Instant::now();
        loop {
            let mut s = UnixStream::connect(&uds)
                .unwrap_or_else(|e| panic!("{what}: the vsock socket: {e}"));
            s.set_read_timeout(Some(CMD)).unwrap();
            s.write_all(b"CONNECT 5001\n").unwrap();
            let mut r = BufReader::new(s);
            let mut ok = String::new();
            let _ = r.read_line(&mut ok);
            if ok.starts_with("OK ") {
                break;
            }
            assert!(t0.elapsed() < CMD, "{what}: CONNECT 5001: {ok:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        held.set_nonblocking(true).unwrap();
        let mut b = [0u8; 16];
        let open = matches!(held_r.get_mut().read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        held.set_nonblocking(false).unwrap();
        assert!(open, "{what}: the held vsock connection ended at the host");
        let text = vm.text();
        assert!(
            !text.contains("GUEST-RESET") && !text.contains("GUEST-EOF"),
            "{what}: the guest's vsock connection ended:\n{text}"
        );
    };
    // The answer to a failed migration: a 400 that says `why`, soon.
    let failed = |h: std::thread::JoinHandle<(u16, serde_json::Value, Duration)>, why: &str| {
        let t0 = Instant::now();
        while !h.is_finished() {
            assert!(t0.elapsed() < CMD, "{why}: no answer after {CMD:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let (s, v, took) = h.join().unwrap();
        eprintln!("{why}: {s} {v} after {took:?}");
        assert_eq!(s, 400, "{why}: {v}");
        assert!(v.to_string().contains(why), "{why}: {v}");
        assert!(took < CMD, "{why}: answered after {took:?}");
        took
    };

    // 1. The destination VMM is killed part-way through the first round: the stream
    //    goes through the test, which stops the destination once 4 MiB passed (so that
    //    it cannot finish), then kills it.
    let in1 = dir.path().join("in1.sock");
    let front = dir.path().join("front.sock");
    let mut dest = Vm::spawn(&[
        "run".as_ref(),
        "--incoming".as_ref(),
        format!("unix:{}", in1.display()).as_ref(),
        "--serial".as_ref(),
        "null".as_ref(),
    ]);
    wait_for_socket(&in1, CMD);
    let pid = dest.child.0.id();
    let l = UnixListener::bind(&front).unwrap();
    let relay = std::thread::spawn(move || {
        let (mut from, _) = l.accept().unwrap();
        let mut to = UnixStream::connect(&in1).unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let (mut total, mut killed) = (0u64, false);
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
            total += n as u64;
            if total >= 4 << 20 && !killed {
                signal(pid, libc::SIGSTOP);
                std::thread::sleep(Duration::from_millis(300));
                signal(pid, libc::SIGKILL);
                killed = true;
            }
        }
        killed
    });
    let h = migrate_in_background(&s1, &format!("unix:{}", front.display()));
    assert!(relay.join().unwrap(), "the stream ended before 4 MiB");
    let _ = dest.child.0.wait();
    failed(h, "the migration stream broke");
    goes_on(&mut vm, "after the destination was killed");

    // 2. A destination that closes the stream after 1 MiB.
    let in2 = dir.path().join("in2.sock");
    let l = UnixListener::bind(&in2).unwrap();
    let closer = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut got = vec![0u8; 1 << 20];
        c.read_exact(&mut got).unwrap();
    });
    let h = migrate_in_background(&s1, &format!("unix:{}", in2.display()));
    closer.join().unwrap();
    failed(h, "the migration stream broke");
    goes_on(&mut vm, "after the stream was closed");

    // 3. A destination that reads the whole stream (the source then waits, the guest
    //    stopped, for its answer) and closes without one.
    let in3 = dir.path().join("in3.sock");
    let l = UnixListener::bind(&in3).unwrap();
    let silent = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        // Until the source has sent all and waits.
        while let Ok(n) = c.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        total
    });
    let h = migrate_in_background(&s1, &format!("unix:{}", in3.display()));
    let total = silent.join().unwrap();
    assert!(total > 16 << 20, "the stream held {total} bytes");
    failed(h, "closed the stream without answering");
    goes_on(&mut vm, "after no answer came");

    // 4. A socket file nobody listens on any more.
    let in4 = dir.path().join("in4.sock");
    drop(UnixListener::bind(&in4).unwrap());
    let h = migrate_in_background(&s1, &format!("unix:{}", in4.display()));
    failed(h, "Connection refused");
    goes_on(&mut vm, "after the connection was refused");

    // 5. A destination that takes the connection and then reads nothing (hung): the
    //    source gives up after its stall limit (5 to 10 s) instead of waiting for good.
    let in5 = dir.path().join("in5.sock");
    let l = UnixListener::bind(&in5).unwrap();
    let (hold, held_until) = std::sync::mpsc::channel::<()>();
    let hung = std::thread::spawn(move || {
        let (c, _) = l.accept().unwrap();
        let _ = held_until.recv();
        drop(c);
    });
    let h = migrate_in_background(&s1, &format!("unix:{}", in5.display()));
    let took = failed(h, "the destination stopped taking the stream");
    assert!(took < Duration::from_secs(15), "gave up after {took:?}");
    hold.send(()).unwrap();
    hung.join().unwrap();
    goes_on(&mut vm, "after the destination hung");

    // A destination whose source breaks off: it ends with an error and removes its
    // socket; no API socket appears.
    let in6 = dir.path().join("in6.sock");
    let s5 = dir.path().join("api5.sock");
    let mut broken = Vm::spawn(&[
        "run".as_ref(),
        "--incoming".as_ref(),
        format!("unix:{}", in6.display()).as_ref(),
        "--serial".as_ref(),
        "null".as_ref(),
        "--api-sock".as_ref(),
        s5.as_os_str(),
    ]);
    wait_for_socket(&in6, CMD);
    {
        let mut c = UnixStream::connect(&in6).unwrap();
        let mut head = b"VESSELMG".to_vec();
        head.extend(1u32.to_le_bytes());
        head.extend(0u32.to_le_bytes());
        head.push(1);
        head.extend(1u32.to_le_bytes());
        head.extend(0u64.to_le_bytes());
        head.extend((64u64 << 20).to_le_bytes());
        head.push(2);
        head.extend(0u64.to_le_bytes());
        head.extend(4u32.to_le_bytes());
        head.extend(vec![0xaau8; 4096 * 2]);
        c.write_all(&head).unwrap();
    }
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = broken.child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < CMD,
            "the destination waits on a broken stream"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "a destination without its VM exited 0");
    assert!(!in6.exists(), "the broken destination left its socket");
    assert!(!s5.exists(), "the broken destination left an API socket");

    // After all that the VM still migrates, and its count goes on there.
    let incoming = dir.path().join("incoming.sock");
    let s6 = dir.path().join("api6.sock");
    let mut there = Vm::spawn(&[
        "run".as_ref(),
        "--incoming".as_ref(),
        format!("unix:{}", incoming.display()).as_ref(),
        "--serial".as_ref(),
        "stdio".as_ref(),
        "--api-sock".as_ref(),
        s6.as_os_str(),
    ]);
    wait_for_socket(&incoming, CMD);
    migrate(&s1, &format!("unix:{}", incoming.display()), &mut vm);
    let before = vm.text();
    let tail = before.rsplit_once('\n').map_or("", |(_, t)| t).to_string();
    let last = ticks(&before).last().unwrap().0;
    there.wait_for(&format!("tick {} ", last + 5), 0, CMD);
    let mut all = ticks(&before);
    all.extend(ticks(&format!("{tail}{}", there.text())));
    assert_consecutive(&all, 1, "across four failed migrations and one that worked");
}

/// Issue 17: a Linux guest under the hybrid accelerator (its kernel on x86emu, its user
/// code natively on KVM, its TSC the host's) goes on after a snapshot and restore, then
/// after a live migration, on this host: its count goes on without a gap or repeat and
/// its clock stays as far from the host's as before (the VM clock goes on by the host
/// TSC's advance). Its snapshot is refused under emu, by name. (A state whose host TSC is
/// not this boot's is refused too: `emu::persist`'s unit test.)
#[test]
fn a_hybrid_guest_goes_on_after_a_restore_and_a_live_migration_on_its_host() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("--accel hybrid needs /dev/kvm (a PVM host on this project's machines): {e}");
    }
    let a = assets();
    let dir = TempDir::new("hybridsnap");
    let snap = dir.path().join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let (s1, s2, s3) = (
        dir.path().join("api1.sock"),
        dir.path().join("api2.sock"),
        dir.path().join("api3.sock"),
    );
    let incoming = dir.path().join("incoming.sock");
    let mut vm1 = Vm::spawn(&[
        "run".as_ref(),
        "--accel".as_ref(),
        "hybrid".as_ref(),
        "--memory".as_ref(),
        "256M".as_ref(),
        "--serial".as_ref(),
        "stdio".as_ref(),
        "--kernel".as_ref(),
        a.join("vmlinuz").as_os_str(),
        "--initrd".as_ref(),
        a.join("initramfs.cpio.gz").as_os_str(),
        "--cmdline".as_ref(),
        CMDLINE.as_ref(),
        "--api-sock".as_ref(),
        s1.as_os_str(),
    ]);
    let at = vm1.wait_for("~ #", 0, BOOT);
    let clock = clock_offset(&mut vm1, "hybrid, booted");
    vm1.type_line(
        "i=0; while true; do i=$((i+1)); echo \"tick $i $(date +%s)\"; sleep 0.2; done &",
    );
    vm1.wait_for("tick 5 ", at, CMD);
    let (s, v) = api(&s1, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(s, 204, "{v}");
    let create = format!(
        r#"{{"snapshot_type": "Full", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        snap.join("vmstate").display(),
        snap.join("memory").display()
    );
    let (s, v) = api(&s1, "PUT", "/snapshot/create", Some(&create));
    assert_eq!(s, 204, "{v}");
    vm1.child.0.kill().unwrap();
    vm1.child.0.wait().unwrap();
    let before = vm1.text();
    let first = ticks(&before);
    let last = first.last().expect("ticks before the snapshot").0;
    let tail = before.rsplit_once('\n').map_or("", |(_, t)| t).to_string();

    // Under emu: refused by name, nothing started.
    assert_refused(
        &[
            "run".as_ref(),
            "--restore".as_ref(),
            snap.as_os_str(),
            "--accel".as_ref(),
            "emu".as_ref(),
        ],
        &dir.path().join("refused.sock"),
        "taken under hybrid cannot go on under emu",
    );

    // Restored a few seconds later, under hybrid (the snapshot's accelerator).
    std::thread::sleep(Duration::from_secs(2));
    let mut vm2 = Vm::spawn(&[
        "run".as_ref(),
        "--restore".as_ref(),
        snap.as_os_str(),
        "--serial".as_ref(),
        "stdio".as_ref(),
        "--api-sock".as_ref(),
        s2.as_os_str(),
    ]);
    vm2.wait_for(&format!("tick {} ", last + 5), 0, CMD);
    let mut all = first.clone();
    all.extend(ticks(&format!("{tail}{}", vm2.text())));
    assert_consecutive(&all, 1, "hybrid, restored");
    assert_clock_kept(&mut vm2, clock, "hybrid, restored");

    // Migrated live to another VMM on this host.
    let mut vm3 = Vm::spawn(&[
        "run".as_ref(),
        "--incoming".as_ref(),
        format!("unix:{}", incoming.display()).as_ref(),
        "--accel".as_ref(),
        "hybrid".as_ref(),
        "--serial".as_ref(),
        "stdio".as_ref(),
        "--api-sock".as_ref(),
        s3.as_os_str(),
    ]);
    wait_for_socket(&incoming, CMD);
    migrate(&s2, &format!("unix:{}", incoming.display()), &mut vm2);
    let source = format!("{tail}{}", vm2.text());
    let tail = source.rsplit_once('\n').map_or("", |(_, t)| t).to_string();
    let last = ticks(&source).last().unwrap().0;
    vm3.wait_for(&format!("tick {} ", last + 5), 0, CMD);
    all = first;
    all.extend(ticks(&source));
    all.extend(ticks(&format!("{tail}{}", vm3.text())));
    assert_consecutive(&all, 1, "hybrid, migrated");
    assert_clock_kept(&mut vm3, clock, "hybrid, migrated");
}
