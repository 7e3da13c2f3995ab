//! A Debian cloud-style disk image (scripts/cloud-image.sh), unmodified, booted the way
//! cloud users boot one: `vessel run --disk IMAGE,format=qcow2 --cloud-init user-data=FILE` on emu,
//! through SeaBIOS and the image's GRUB (its 32-bit `linux` entry) to Debian's kernel,
//! initramfs and systemd; cloud-init reads the NoCloud seed, sets the hostname from the
//! VM's name and runs the user-data's `runcmd`, whose token the test reads on the serial
//! console, then powers the machine off. The same image and seed boot under QEMU's q35
//! (TCG, SeaBIOS) as a cross-check.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Boot to cloud-init's power-off: a few minutes on emu.
const LIMIT: Duration = Duration::from_secs(600);

fn cloud_image() -> PathBuf {
    let dir = std::env::var_os("VESSEL_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/vessel/assets")
        });
    let image = dir.join("debian-bookworm-cloud.qcow2");
    assert!(
        image.is_file(),
        "{} is missing: run scripts/cloud-image.sh (as root) first",
        image.display()
    );
    image
}

/// A qcow2 overlay on the cloud image, so the base stays as built.
fn overlay(dir: &TempDir) -> PathBuf {
    let base = cloud_image();
    let overlay = dir.path().join("disk.qcow2");
    let st = vessel()
        .args(["img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&overlay)
        .status()
        .expect("vessel img create");
    assert!(
        st.success(),
        "vessel img create (overlay on {})",
        base.display()
    );
    overlay
}

/// user-data: print a token and the hostname on the serial console, then power off.
fn user_data(dir: &TempDir, token: &str) -> PathBuf {
    user_data_then(dir, token, true)
}

/// The same, powering off only with `power_off` (else the test presses the button).
fn user_data_then(dir: &TempDir, token: &str, power_off: bool) -> PathBuf {
    let power_state = if power_off {
        "power_state:\n  mode: poweroff\n  condition: true\n"
    } else {
        ""
    };
    dir.file(
        "user-data",
        format!(
            "#cloud-config\n\
             runcmd:\n\
             \x20 - [sh, -c, 'echo \"{token} host=$(hostname) user=$(id -un)\" > /dev/ttyS0']\n\
             \x20 - [sh, -c, 'echo \"{token} dmi=$(cat /sys/class/dmi/id/sys_vendor),$(cat /sys/class/dmi/id/product_serial),$(cat /sys/class/dmi/id/product_uuid)\" > /dev/ttyS0']\n\
             \x20 - [sh, -c, 'echo \"{token} efi=$(test -d /sys/firmware/efi && echo yes || echo no)\" > /dev/ttyS0']\n\
             {power_state}"
        )
        .as_bytes(),
    )
}

/// Runs `cmd` with its console going to `console` until it exits; panics with the
/// console's tail after `limit`. Returns the exit code and the console.
fn run_logged(cmd: &mut Command, console: &Path, limit: Duration) -> (Option<i32>, String) {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut g = Guarded(child);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = g.0.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > limit {
            let text = std::fs::read_to_string(console).unwrap_or_default();
            let tail: String = text
                .chars()
                .rev()
                .take(6000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            panic!("still running after {limit:?}; console tail:\n{tail}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = std::fs::read_to_string(console).unwrap_or_default();
    (status.code(), text)
}

fn check_console(who: &str, text: &str, token: &str, name: &str) {
    let tail: String = text
        .chars()
        .rev()
        .take(8000)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    assert!(text.contains("Linux version"), "{who}: no kernel: {tail}");
    assert!(
        text.contains("Welcome to") && text.contains("Debian GNU/Linux"),
        "{who}: systemd did not start: {tail}"
    );
    assert!(
        text.contains("Cloud-init v."),
        "{who}: cloud-init did not run: {tail}"
    );
    let want = format!("{token} host={name} user=root");
    assert!(
        text.contains(&want),
        "{who}: no {want:?} from the user-data's runcmd: {tail}"
    );
}

#[test]
fn a_cloud_image_boots_through_seabios_and_grub_and_cloud_init_configures_it() {
    let dir = TempDir::new("cloud-image");
    let disk = overlay(&dir);
    let token = format!("vessel-ci-{}", std::process::id());
    let ud = user_data(&dir, &token);
    let console = dir.path().join("console.log");
    let name = "ci-guest";
    let uuid = "6f1e2d3c-4b5a-4978-8796-a5b4c3d2e1f0";
    let (code, text) = run_logged(
        vessel()
            .args(["run", "--accel", "emu", "--memory", "1G", "--name", name])
            .args(["--uuid", uuid])
            .arg("--disk")
            .arg(format!("{},format=qcow2", disk.display()))
            .arg("--cloud-init")
            .arg(format!("user-data={}", ud.display()))
            .arg("--serial")
            .arg(format!("file:{}", console.display())),
        &console,
        LIMIT,
    );
    check_console("vessel", &text, &token, name);
    assert!(text.contains("SeaBIOS (version"), "SeaBIOS: {text}");
    assert!(
        text.contains("Loading Linux"),
        "the image's grub.cfg ran: {text}"
    );
    // SMBIOS through fw_cfg: the system's vendor, the VM's name as its serial and the
    // given UUID as the system UUID, as the guest's kernel reads them.
    let want = format!("{token} dmi=Vessel,{name},{uuid}");
    assert!(text.contains(&want), "no {want:?} on the console: {text}");
    assert!(
        text.contains(&format!("{token} efi=no")),
        "a BIOS boot: {text}"
    );
    // cloud-init's power_state module powered the machine off through ACPI.
    assert_eq!(code, Some(0), "vessel's exit status; console:\n{text}");
}

/// UTF-16LE, as UEFI variable names are stored.
fn utf16(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

#[test]
fn a_cloud_image_boots_through_ovmf_and_its_efi_grub() {
    let code = Path::new(vmm::config::OVMF_CODE);
    let template = Path::new(vmm::config::OVMF_VARS_TEMPLATE);
    assert!(
        code.is_file() && template.is_file(),
        "{} is missing: apt-get install ovmf",
        code.display()
    );
    let dir = TempDir::new("cloud-image-ovmf");
    let disk = overlay(&dir);
    let token = format!("vessel-uefi-{}", std::process::id());
    // No power-off from cloud-init: the test presses the power button.
    let ud = user_data_then(&dir, &token, false);
    let console = dir.path().join("console.log");
    let sock = dir.path().join("api.sock");
    // Made from the template, then kept: the variables the boot manager writes stay.
    let vars = dir.path().join("vars.fd");
    let name = "uefi-guest";
    let uuid = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
    // 3 GiB: more than fits below OVMF's ECAM at 0xb0000000, so RAM goes on above 4 GiB.
    let child = vessel()
        .args(["run", "--accel", "emu", "--memory", "3G", "--name", name])
        .args(["--uuid", uuid, "--firmware", "ovmf", "--firmware-vars"])
        .arg(&vars)
        .arg("--disk")
        .arg(format!("{},format=qcow2", disk.display()))
        .arg("--cloud-init")
        .arg(format!("user-data={}", ud.display()))
        .arg("--serial")
        .arg(format!("file:{}", console.display()))
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vessel");
    let mut g = Guarded(child);
    // The last runcmd line: cloud-init is done with the user-data, systemd-logind has
    // long been up to act on the button.
    wait_for_text(&console, &format!("{token} efi="), LIMIT);
    // The power button, a GPE on the SCI of this full ACPI platform; the guest shuts
    // itself down.
    let (status, body) = api(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    );
    assert_eq!(status, 204, "{body}");
    let t0 = Instant::now();
    let exit = loop {
        if let Some(s) = g.0.try_wait().unwrap() {
            break s.code();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the guest did not power off after the power button; console:\n{}",
            std::fs::read_to_string(&console).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    check_console("vessel", &text, &token, name);
    assert!(
        text.contains("BIOS-e820: [mem 0x0000000100000000-"),
        "the RAM above 4 GiB, through OVMF's memory map: {text}"
    );
    assert!(
        text.contains("reboot: Power down"),
        "the guest powered off through ACPI: {text}"
    );
    // OVMF's boot manager on the serial console (through the LPC bridge's COM1), the
    // ESP's GRUB, and a kernel that sees EFI.
    assert!(
        text.contains("BdsDxe: starting Boot"),
        "OVMF's boot manager: {text}"
    );
    assert!(
        text.contains("Loading Linux"),
        "the image's EFI GRUB: {text}"
    );
    assert!(
        text.contains("efi: EFI v2"),
        "the kernel saw no EFI: {text}"
    );
    assert!(
        text.contains(&format!("{token} efi=yes")),
        "/sys/firmware/efi in the guest: {text}"
    );
    // The tables came through OVMF's run of the table loader (Vessel's OEM ID on the
    // FADT the kernel lists), SMBIOS through its SMBIOS driver.
    assert!(
        text.contains("ACPI: FACP") && text.contains("VESSEL"),
        "Vessel's ACPI tables: {text}"
    );
    let want = format!("{token} dmi=Vessel,{name},{uuid}");
    assert!(text.contains(&want), "no {want:?} on the console: {text}");
    assert_eq!(exit, Some(0), "vessel's exit status; console:\n{text}");
    // The variable store was written in place: the boot manager's BootOrder is in it.
    let store = std::fs::read(&vars).expect("the variable store");
    assert_eq!(
        store.len() as u64,
        std::fs::metadata(template).unwrap().len()
    );
    assert_ne!(store, std::fs::read(template).unwrap(), "variables written");
    let boot_order = utf16("BootOrder");
    assert!(
        store.windows(boot_order.len()).any(|w| w == boot_order),
        "no BootOrder variable in the flash"
    );
}

#[test]
fn the_same_image_and_seed_boot_under_qemu_q35() {
    let qemu = "qemu-system-x86_64";
    assert!(
        Command::new(qemu)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "{qemu} is missing: apt-get install qemu-system-x86"
    );
    let dir = TempDir::new("cloud-image-qemu");
    let disk = overlay(&dir);
    let token = format!("vessel-ci-{}", std::process::id());
    let ud = user_data(&dir, &token);
    let name = "ci-guest";
    // The seed Vessel would attach, as a file for QEMU.
    let seed = vmm::cloud_init::seed_image(
        &vmm::cloud_init::CloudInitConfig {
            user_data: ud,
            meta_data: None,
            network_config: None,
        },
        name,
    )
    .expect("the seed");
    let seed = dir.file("seed.img", &seed);
    let console = dir.path().join("console.log");
    let (code, text) = run_logged(
        Command::new(qemu)
            .args([
                "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "1G",
            ])
            .args(["-display", "none", "-monitor", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=qcow2", disk.display()))
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw,readonly=on",
                seed.display()
            )),
        &console,
        LIMIT,
    );
    check_console("qemu", &text, &token, name);
    assert_eq!(code, Some(0), "qemu's exit status; console:\n{text}");
}

#[test]
fn the_same_image_and_seed_boot_under_qemu_q35_with_ovmf() {
    let qemu = "qemu-system-x86_64";
    assert!(
        Command::new(qemu)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "{qemu} is missing: apt-get install qemu-system-x86"
    );
    let code = Path::new(vmm::config::OVMF_CODE);
    assert!(
        code.is_file(),
        "{} is missing: apt-get install ovmf",
        code.display()
    );
    let dir = TempDir::new("cloud-image-qemu-ovmf");
    let disk = overlay(&dir);
    let token = format!("vessel-ci-{}", std::process::id());
    let ud = user_data(&dir, &token);
    let name = "ci-guest";
    let seed = vmm::cloud_init::seed_image(
        &vmm::cloud_init::CloudInitConfig {
            user_data: ud,
            meta_data: None,
            network_config: None,
        },
        name,
    )
    .expect("the seed");
    let seed = dir.file("seed.img", &seed);
    let vars = dir.file(
        "vars.fd",
        &std::fs::read(vmm::config::OVMF_VARS_TEMPLATE).expect("OVMF's variable template"),
    );
    let console = dir.path().join("console.log");
    let (exit, text) = run_logged(
        Command::new(qemu)
            .args([
                "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "1G",
            ])
            .args(["-display", "none", "-monitor", "none", "-no-reboot"])
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                code.display()
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                vars.display()
            ))
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=qcow2", disk.display()))
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw,readonly=on",
                seed.display()
            )),
        &console,
        LIMIT,
    );
    check_console("qemu", &text, &token, name);
    assert!(
        text.contains(&format!("{token} efi=yes")),
        "QEMU booted through UEFI: {text}"
    );
    assert_eq!(exit, Some(0), "qemu's exit status; console:\n{text}");
}

#[test]
fn cloud_init_installs_an_ssh_key_and_the_test_logs_in_over_a_tap() {
    for tool in ["ssh", "ssh-keygen"] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .status()
                .is_ok_and(|s| s.success()),
            "{tool} is missing: apt-get install openssh-client"
        );
    }
    let dir = TempDir::new("cloud-ssh");
    let disk = overlay(&dir);
    let key = dir.path().join("id_ed25519");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "vessel-test", "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen");
    assert!(st.success(), "ssh-keygen");
    let pubkey = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let token = format!("vessel-ssh-{}", std::process::id());
    let ud = dir.file(
        "user-data",
        format!(
            "#cloud-config\n\
             ssh_authorized_keys:\n\
             \x20 - {}\n\
             runcmd:\n\
             \x20 - [sh, -c, 'echo \"{token} up\" > /dev/ttyS0']\n",
            pubkey.trim()
        )
        .as_bytes(),
    );
    let mac = "52:54:00:12:34:56";
    let nc = dir.file(
        "network-config",
        format!(
            "version: 2\n\
             ethernets:\n\
             \x20 nic0:\n\
             \x20   match:\n\
             \x20     macaddress: \"{mac}\"\n\
             \x20   addresses: [10.0.2.15/24]\n"
        )
        .as_bytes(),
    );
    let ns = common::NetNs::new("cloud");
    let console = dir.path().join("console.log");
    let name = "ssh-guest";
    let child = ns
        .exec()
        .arg(env!("CARGO_BIN_EXE_vessel"))
        .args(["run", "--accel", "emu", "--memory", "1G", "--name", name])
        .arg("--disk")
        .arg(format!("{},format=qcow2", disk.display()))
        .arg("--cloud-init")
        .arg(format!(
            "user-data={},network-config={}",
            ud.display(),
            nc.display()
        ))
        .args(["--net", &format!("tap=vtap0,mac={mac}")])
        .arg("--serial")
        .arg(format!("file:{}", console.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vessel");
    let mut vm = Guarded(child);
    let t0 = Instant::now();
    let text = || std::fs::read_to_string(&console).unwrap_or_default();
    // The VMM creates vtap0 in the namespace: give the host side its address.
    loop {
        let o = ns
            .exec()
            .args(["ip", "link", "show", "vtap0"])
            .output()
            .unwrap();
        if o.status.success() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "no vtap0 appeared");
        assert!(
            vm.0.try_wait().unwrap().is_none(),
            "vessel ended: {}",
            text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for args in [
        vec!["ip", "link", "set", "lo", "up"],
        vec!["ip", "addr", "add", "10.0.2.1/24", "dev", "vtap0"],
        vec!["ip", "link", "set", "vtap0", "up"],
    ] {
        let o = ns.exec().args(&args).output().unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    while !text().contains(&format!("{token} up")) {
        assert!(
            t0.elapsed() < LIMIT,
            "cloud-init's runcmd never ran:\n{}",
            text()
        );
        assert!(
            vm.0.try_wait().unwrap().is_none(),
            "vessel ended: {}",
            text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Debian's default cloud user, with the key cloud-init installed.
    let ssh = |cmd: &str| {
        ns.exec()
            .arg("ssh")
            .arg("-i")
            .arg(&key)
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=20",
                "debian@10.0.2.15",
                cmd,
            ])
            .output()
            .unwrap()
    };
    let out = loop {
        let o = ssh("hostname; id -un");
        if o.status.success() {
            break String::from_utf8_lossy(&o.stdout).into_owned();
        }
        assert!(
            t0.elapsed() < LIMIT,
            "ssh never succeeded: {}\nconsole:\n{}",
            String::from_utf8_lossy(&o.stderr),
            text()
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), [name, "debian"]);
    // Shut down from inside; the VMM ends with the guest's power-off.
    let _ = ssh("sudo systemctl poweroff");
    let t1 = Instant::now();
    let status = loop {
        if let Some(s) = vm.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(180),
            "no power-off:\n{}",
            text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(status.code(), Some(0), "console:\n{}", text());
}
