//! The ACPI power button and pause/resume through the VMM's API, as Firecracker's users
//! (and Vessel's manager) drive them: Debian's cloud kernel under the emu accelerator
//! (the ACPI devices it finds, pause and resume of a guest that prints as it runs, and a
//! shutdown through the power button that the guest carries out itself; one boot serves
//! every check), and the GED's interrupt through KVM's in-kernel irqchip.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{api, assets, vessel, wait_for_text, Guarded, TempDir};

const BOOT: Duration = Duration::from_secs(120);
const CMD: Duration = Duration::from_secs(30);

/// The VMM's console output so far, filled by a reader thread.
#[derive(Clone, Default)]
struct Output(Arc<Mutex<Vec<u8>>>);

impl Output {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Waits until `needle` appears after byte `from`; returns the offset just past it.
    fn wait_for(&self, needle: &str, from: usize, limit: Duration) -> usize {
        let t0 = Instant::now();
        loop {
            let text = self.text();
            if let Some(i) = text.get(from..).and_then(|t| t.find(needle)) {
                return from + i + needle.len();
            }
            assert!(
                t0.elapsed() < limit,
                "the guest never printed {needle:?} within {limit:?}; console:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// `PUT`/`PATCH`/`GET` on the VMM's API socket: (status, body).
/// `SendCtrlAltDel` through the Firecracker API: Vessel presses the ACPI power button.
fn press_power_button(sock: &Path) {
    let (s, v) = api(
        sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    );
    assert_eq!(s, 204, "{v}");
}

fn state(sock: &Path) -> String {
    api(sock, "GET", "/", None).1["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The guest's tick counter lines ("tick N") in `text`, in order.
fn ticks(text: &str) -> Vec<u64> {
    text.split("tick ")
        .skip(1)
        .filter_map(|t| {
            let n: String = t.chars().take_while(char::is_ascii_digit).collect();
            // Only whole lines: the last one may still be arriving.
            t[n.len()..]
                .starts_with(['\r', '\n'])
                .then(|| n.parse().ok())?
        })
        .collect()
}

#[test]
fn power_button_pause_and_resume_through_the_vmm_api() {
    let a = assets();
    let dir = TempDir::new("power");
    let sock = dir.path().join("api.sock");
    let child = vessel()
        .args([
            "run", "--accel", "emu", "--memory", "256M", "--serial", "stdio",
        ])
        .arg("--kernel")
        .arg(a.join("vmlinuz"))
        .arg("--initrd")
        .arg(a.join("initramfs.cpio.gz"))
        .args(["--cmdline", "console=ttyS0 panic=-1 quiet"])
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vessel");
    let mut vmm = Guarded(child);
    let mut stdin = vmm.0.stdin.take().unwrap();
    let mut stdout = vmm.0.stdout.take().unwrap();
    let out = Output::default();
    {
        let out = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.0.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
    }
    let mut type_line = |line: &str| {
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    };

    let t0 = Instant::now();
    let at = out.wait_for("~ #", 0, BOOT);
    eprintln!("boot to the shell: {:?}", t0.elapsed());

    // What the guest found in the DSDT: the RTC (rtc_cmos), the GED with its interrupt,
    // the power button, and the acpid that the initramfs starts for it.
    // (Markers are quoted apart in the typed line so its echo never matches them.)
    type_line(
        "dmesg | grep -e rtc_cmos -e 'Power Button'; grep Ged /proc/interrupts; \
         pidof acpid >/dev/null && echo acpid''-runs; echo checks''-done",
    );
    let end = out.wait_for("checks-done\r\n", at, CMD);
    let checks = out.text()[at..end].to_string();
    assert!(
        checks.contains("rtc_cmos 00:0") && checks.contains("registered as rtc0"),
        "{checks}"
    );
    assert!(
        checks.contains("ACPI: button: Power Button [PWRB]"),
        "{checks}"
    );
    assert!(checks.contains("ACPI:Ged"), "{checks}");
    assert!(checks.contains("acpid-runs"), "{checks}");

    // A guest loop that prints as it makes progress.
    type_line("i=0; while true; do i=$((i+1)); echo \"tick $i\"; sleep 0.2; done &");
    let at = out.wait_for("tick 3\r\n", end, CMD);
    assert_eq!(state(&sock), "Running");

    // Paused: no tick for a while, and the VMM leaves the host CPU alone.
    let (s, v) = api(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(s, 204, "{v}");
    assert_eq!(state(&sock), "Paused");
    let before = ticks(&out.text()[at..]).last().copied().unwrap_or(3);
    let len = out.len();
    std::thread::sleep(Duration::from_millis(2000));
    let during = out.text()[len..].to_string();
    assert!(
        ticks(&during).is_empty(),
        "the guest ran while paused: {during:?}"
    );
    // Resumed: the count goes on from where it stopped.
    let (s, v) = api(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(s, 204, "{v}");
    assert_eq!(state(&sock), "Running");
    let next = format!("tick {}\r\n", before + 3);
    out.wait_for(&next, len, CMD);
    let all = ticks(&out.text());
    assert!(
        all.windows(2).all(|w| w[1] == w[0] + 1),
        "ticks lost or repeated: {all:?}"
    );

    // The power button, pressed while paused: nothing happens until the resume, then the
    // guest's acpid runs poweroff and the VMM exits 0.
    let (s, v) = api(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(s, 204, "{v}");
    let len = out.len();
    press_power_button(&sock);
    std::thread::sleep(Duration::from_millis(1000));
    let during = out.text()[len..].to_string();
    assert!(
        !during.contains("power button pressed"),
        "the guest handled the button while paused: {during:?}"
    );
    let (s, v) = api(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(s, 204, "{v}");
    out.wait_for("vessel-init: power button pressed", len, CMD);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = vmm.0.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < CMD, "the guest did not power off");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    let _ = vmm.0.stderr.take().unwrap().read_to_string(&mut err);
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(err.contains("guest powered off"), "{err}");
    assert!(out.text().contains("reboot: Power down"), "{}", out.text());
    assert!(!sock.exists(), "the API socket is removed at exit");
}

/// The KVM accelerator's in-kernel irqchip carries the GED's interrupt as well: a tiny
/// guest routes the GED's IOAPIC pin to a handler that reads the event register and
/// reports what it read through the debug-exit port.
#[test]
fn the_power_button_interrupts_a_kvm_guest_through_the_in_kernel_irqchip() {
    use common::guest::{linux64_elf, load_idt, set_idt_gate, Lib64, LOAD};
    use iced_x86::code_asm::*;

    const VECTOR: u8 = 0x25;
    let ged_pin = arch::acpi::GED_GSI;
    let mut a = CodeAssembler::new(64).unwrap();
    let mut lib = Lib64::new(&mut a);
    let mut handler = a.create_label();
    set_idt_gate(&mut a, VECTOR, handler).unwrap();
    load_idt(&mut a).unwrap();
    // Mask both 8259s; enable the local APIC; route the GED's IOAPIC pin to VECTOR (edge,
    // active high, to APIC 0).
    a.mov(al, 0xff).unwrap();
    a.out(0x21, al).unwrap();
    a.out(0xa1, al).unwrap();
    a.mov(eax, 0xfee0_00f0u32).unwrap();
    a.mov(dword_ptr(rax), 0x1ff).unwrap();
    a.mov(eax, 0xfec0_0000u32).unwrap();
    a.mov(dword_ptr(rax), 0x10 + 2 * ged_pin).unwrap();
    a.mov(dword_ptr(rax + 0x10), u32::from(VECTOR)).unwrap();
    a.mov(dword_ptr(rax), 0x11 + 2 * ged_pin).unwrap();
    a.mov(dword_ptr(rax + 0x10), 0).unwrap();
    lib.print(&mut a, "READY\n").unwrap();
    a.sti().unwrap();
    let mut idle = a.create_label();
    a.set_label(&mut idle).unwrap();
    a.hlt().unwrap();
    a.jmp(idle).unwrap();
    // The handler: read the event register twice (the read clears it), print both.
    a.set_label(&mut handler).unwrap();
    a.mov(dx, arch::acpi::GED_PORT as u32).unwrap();
    a.xor(eax, eax).unwrap();
    a.in_(al, dx).unwrap();
    a.shl(eax, 8).unwrap();
    a.in_(al, dx).unwrap();
    lib.print(&mut a, "GED ").unwrap();
    a.call(lib.puthex).unwrap();
    lib.print(&mut a, "\n").unwrap();
    let mut stay = a.create_label();
    a.set_label(&mut stay).unwrap();
    a.hlt().unwrap();
    a.jmp(stay).unwrap();
    lib.emit(&mut a).unwrap();
    let code = a.assemble(LOAD).unwrap();

    let dir = TempDir::new("ged-kvm");
    let kernel = dir.file("ged.elf", &linux64_elf(&code));
    let sock = dir.path().join("api.sock");
    let log = dir.path().join("serial.log");
    let child = vessel()
        .args(["run", "--accel", "kvm", "--memory", "64M", "--kernel"])
        .arg(&kernel)
        .arg("--serial")
        .arg(format!("file:{}", log.display()))
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut vmm = Guarded(child);
    wait_for_text(&log, "READY", Duration::from_secs(20));
    // Nothing pending before the press: the guest is still waiting.
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        vmm.0.try_wait().unwrap().is_none(),
        "exited before the press"
    );
    press_power_button(&sock);
    // The first read has the power-button bit, the second nothing.
    let want = format!(
        "GED {:016x}",
        u64::from(arch::acpi::GED_EVENT_POWER_BUTTON) << 8
    );
    wait_for_text(&log, &want, Duration::from_secs(20));
    let (s, v) = api(&sock, "PUT", "/actions", Some(r#"{"action_type": "Stop"}"#));
    assert_eq!(s, 204, "{v}");
    let t0 = Instant::now();
    while vmm.0.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the VMM did not stop"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
