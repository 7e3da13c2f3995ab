//! Debian's cloud kernel on the emu accelerator, driven through its serial console the way
//! a person would: type commands at the busybox shell, read the answers, power off.

mod common;

use std::time::{Duration, Instant};

use common::console::{Console, CMDLINE};
use common::*;

const BOOT: Duration = Duration::from_secs(90);
const CMD: Duration = Duration::from_secs(30);

#[test]
fn debian_kernel_boots_to_a_busybox_shell_and_powers_off() {
    let start = Instant::now();
    let mut c = Console::boot(&["--cmdline", CMDLINE]);
    let banner = c.expect("vessel-init:", BOOT);
    let boot = start.elapsed();
    c.expect("~ #", BOOT);
    eprintln!("boot to init: {boot:?}");
    let _ = banner;

    let kver = std::fs::read_to_string(assets().join("kernel-version")).unwrap();
    assert_eq!(c.run("uname -r", CMD), kver.trim());

    let cpuinfo = c.run("cat /proc/cpuinfo", CMD);
    assert!(cpuinfo.contains("processor\t: 0"), "{cpuinfo}");
    assert!(cpuinfo.contains("sse2"), "{cpuinfo}");

    // The kernel's speculation mitigations: none that would make emulated code slower
    // (retpolines, a branch-history loop at each system call) for what it cannot do.
    let v2 = c.run(
        "cat /sys/devices/system/cpu/vulnerabilities/spectre_v2",
        CMD,
    );
    assert!(
        v2.contains("Enhanced / Automatic IBRS") && v2.contains("BHI: BHI_DIS_S"),
        "{v2}"
    );
    assert!(!v2.contains("Retpoline"), "{v2}");

    let irqs = c.run("cat /proc/interrupts", CMD);
    assert!(irqs.contains("IO-APIC") && irqs.contains("ttyS0"), "{irqs}");
    assert!(irqs.contains("LOC:"), "{irqs}");

    let sum = c.run(
        "s=0; for i in $(seq 1 200); do s=$((s+i)); done; echo $s",
        CMD,
    );
    assert_eq!(sum, "20100");

    let clock = c.run("dmesg | grep -i clocksource", CMD);
    assert!(
        clock.contains("Switched to clocksource kvm-clock")
            || clock.contains("Switched to clocksource tsc"),
        "{clock}"
    );
    assert!(!clock.to_lowercase().contains("unstable"), "{clock}");

    // A timer the guest can trust: `sleep 2` takes about two seconds of host time.
    let t = Instant::now();
    c.run("sleep 2", CMD);
    let slept = t.elapsed();
    assert!(
        slept >= Duration::from_millis(1900) && slept < Duration::from_secs(6),
        "sleep 2 took {slept:?}"
    );

    // Compiled guest code runs from memory that is never writable where it runs (W^X):
    // the VMM, well into a boot, has no mapping both writable and executable.
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", c.pid())).unwrap();
    let rwx: Vec<&str> = maps
        .lines()
        .filter(|l| l.split(' ').nth(1).is_some_and(|p| p.starts_with("rwx")))
        .collect();
    assert!(rwx.is_empty(), "writable and executable mappings: {rwx:?}");
    assert!(
        maps.contains("vessel-jit"),
        "no compiled-code arena in the VMM's maps:\n{maps}"
    );

    // HLT sleeps: an idle guest at its prompt leaves the host CPU nearly idle (a vCPU
    // that spun on HLT would show a whole core).
    let cpu = cpu_ticks;
    let before = cpu(c.pid());
    std::thread::sleep(Duration::from_secs(5));
    let ticks = cpu(c.pid()) - before;
    // Clock ticks are 1/100 s: 5 s of one busy core would be 500.
    assert!(ticks < 100, "idle guest used {ticks} ticks of CPU in 5 s");

    c.send("poweroff -f");
    assert_eq!(c.wait_exit(CMD), Some(0));
}

#[test]
fn two_vcpus_come_online() {
    let mut c = Console::boot(&["--cmdline", CMDLINE, "--cpus", "2"]);
    let banner = c.expect("cpu(s)", BOOT);
    assert!(banner.contains("up, 2 cpu(s)"), "{banner}");
    c.expect("~ #", BOOT);
    assert_eq!(c.run("nproc", CMD), "2");
    let online = c.run("cat /sys/devices/system/cpu/online", CMD);
    assert_eq!(online, "0-1");
    c.send("poweroff -f");
    assert_eq!(c.wait_exit(CMD), Some(0));
}
