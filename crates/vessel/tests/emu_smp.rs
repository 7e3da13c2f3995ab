//! Several emu vCPUs running at once (issue #13): the guest assets' kernel and busybox
//! initramfs on `--cpus 4` and `--cpus 2`, every vCPU online, and a litmus program
//! (tests/guest-src/smp-litmus.c, built here with gcc -static and appended to the
//! initramfs) with one thread pinned to each CPU. It checks what x86 promises a
//! multiprocessor guest: message passing, store buffering (allowed without a fence, counted;
//! forbidden with MFENCE, a LOCKed OR, or a failed LOCK CMPXCHG), exact LOCK ADD/XADD
//! counters, LOCKed OR/AND/XOR/BTS/BTR/BTC on one word where each CPU owns a bit (Linux's
//! page flags), 16-bit XCHG beside 8-bit LOCK CMPXCHG in one word (the queued spinlock's
//! layout), CMPXCHG/XCHG/BTS spinlocks around a plain counter, LOCK CMPXCHG16B (alone and
//! against LOCK ADD on its high half), split locks (alone and against an aligned LOCK ADD
//! on the same bytes), a seqlock, untorn 8-byte (aligned, and unaligned inside a cache line)
//! and 16-byte MOVDQA accesses, and cross-modifying code (one CPU rewrites an immediate and
//! raises a flag; the other, after CPUID, must run the new code). Each check prints
//! `CHECK <name> PASS|FAIL <counts>`; the counts go to the test's stderr.
//!
//! The kernel's own torture tests (rcutorture, locktorture) are not possible here: neither
//! Debian's cloud kernel (the guest assets') nor its generic amd64 kernel ships those
//! modules (`dpkg -c` of linux-image-6.1.0-57-amd64 6.1.192-3 lists no `*torture*`).
//!
//! Checks are timed (BUDGET_MS each, split over the CPU pairs), not counted, so a test takes
//! under a minute even when the host's 2 cores carry 4 vCPUs.

mod common;

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::console::{Console, CMDLINE};
use common::*;

const BOOT: Duration = Duration::from_secs(180);
const CMD: Duration = Duration::from_secs(60);
/// Milliseconds each timed check runs in the guest (21 or 22 checks).
const BUDGET_MS: u32 = 1500;
/// The whole litmus run: about 20 x BUDGET_MS, with room for a loaded host.
const LITMUS: Duration = Duration::from_secs(300);

/// One guest at a time: the litmus threads need their vCPUs really running at once, and the
/// host has few cores.
static ONE_GUEST: Mutex<()> = Mutex::new(());

/// Boots `cpus` vCPUs, checks they are all online, runs the litmus program and asserts that
/// every check passed.
fn litmus_on(cpus: u32) {
    let _one = ONE_GUEST.lock().unwrap_or_else(|p| p.into_inner());
    let dir = TempDir::new("smp");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest-src/smp-litmus.c");
    let initrd = initramfs_with_program(dir.path(), &src, "smp-litmus", &["-pthread"]);
    let start = Instant::now();
    let n = cpus.to_string();
    let mut c = Console::boot(&[
        "--cpus",
        &n,
        "--cmdline",
        CMDLINE,
        "--initrd",
        initrd.to_str().unwrap(),
    ]);
    let banner = c.expect("cpu(s)", BOOT);
    assert!(banner.contains(&format!("up, {cpus} cpu(s)")), "{banner}");
    c.expect("~ #", BOOT);
    let boot = start.elapsed();
    assert_eq!(c.run("nproc", CMD), n);
    assert_eq!(
        c.run("cat /sys/devices/system/cpu/online", CMD),
        format!("0-{}", cpus - 1)
    );
    // Every CPU shows IA32_TSC_ADJUST, so Linux trusts one package's TSCs and skips its
    // pairwise warp test for each CPU it brings up; and it never found them out of step.
    assert_eq!(c.run("grep -c ' tsc_adjust' /proc/cpuinfo", CMD), n);
    assert_eq!(
        c.run(
            "dmesg | grep -c -e 'TSC.*unstable' -e 'TSC synchronization' -e 'TSC ADJUST'",
            CMD
        ),
        "0"
    );

    // CPUID leaf 4 describes the caches: each CPU has its own L1 and L2, and all share
    // the L3 (one package), as Linux reads them.
    let last = cpus - 1;
    assert_eq!(
        c.run(
            &format!(
                "cat /sys/devices/system/cpu/cpu{last}/cache/index2/shared_cpu_list \
                 /sys/devices/system/cpu/cpu{last}/cache/index3/shared_cpu_list"
            ),
            CMD
        )
        .split_whitespace()
        .collect::<Vec<_>>(),
        [last.to_string(), format!("0-{last}")]
    );

    let t = Instant::now();
    let out = c.run(&format!("/smp-litmus {BUDGET_MS}"), LITMUS);
    let took = t.elapsed();
    eprintln!("{cpus} vCPUs: boot to shell {boot:.1?}, litmus {took:.1?}\n{out}");
    c.send("poweroff -f");
    assert_eq!(c.wait_exit(CMD), Some(0));

    let done = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("LITMUS DONE checks="))
        .unwrap_or_else(|| panic!("the litmus program did not finish:\n{out}"));
    let checks: usize = done
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("odd summary {done:?}"));
    let lines: Vec<&str> = out
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("CHECK "))
        .collect();
    assert!(checks >= 21, "only {checks} checks ran:\n{out}");
    assert_eq!(lines.len(), checks, "{out}");
    let failed: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.split_whitespace().nth(2) != Some("PASS"))
        .collect();
    assert!(
        failed.is_empty(),
        "litmus checks failed on {cpus} vCPUs:\n{}\n\nall output:\n{out}",
        failed.join("\n")
    );
}

#[test]
fn litmus_checks_pass_on_four_vcpus() {
    litmus_on(4);
}

#[test]
fn litmus_checks_pass_on_two_vcpus() {
    litmus_on(2);
}
