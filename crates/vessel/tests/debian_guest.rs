//! A stock Debian bookworm userland, unmodified, on the emu accelerator: systemd as init,
//! root logged in on the serial console, and a battery of Debian's own programs (coreutils,
//! bash, gawk, perl, python3, openssl, glibc's ld.so) whose output must equal the same
//! commands run on the host. The image comes from `scripts/debian-rootfs.sh`; each test
//! boots a qcow2 overlay on it, so the cached image is never written.
//!
//! The battery runs once per CPU model (`--cpu`); `VESSEL_DEBIAN_CPU=MODEL` makes the
//! default-model test pass that model too. `debian_battery_on_qemu_tcg` runs the same
//! battery under QEMU TCG (`-cpu max`), the reference that shows the image and the
//! battery are sound when an emu run fails.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use base64::Engine;
use common::{assets, vessel, Guarded, TempDir};

const IMAGE: &str = "debian-bookworm.ext4";
const STAMP: &str = "debian-bookworm.stamp";
const SETUP: &str = "scripts/debian-rootfs.sh";
const CMDLINE: &str = "console=ttyS0 vessel.root=/dev/vda quiet panic=-1";
/// Under emu systemd reaches the prompt in about 35 s on an idle machine; tests share it.
const BOOT: Duration = Duration::from_secs(300);
const CMD: Duration = Duration::from_secs(120);
const POWEROFF: Duration = Duration::from_secs(120);
/// What root's bash prints once agetty has logged it in.
const PROMPT: &str = "root@vessel-debian:~# ";
/// The ext4 label of the disk that carries the x86-64-v3 test program.
const V3_LABEL: &str = "vessel-v3";

/// Commands whose output (stdout and stderr) must be the host's, byte for byte. Each one
/// exercises floating point or wide arithmetic through glibc (x87 `long double` in seq,
/// printf, numfmt and sort -g; libm in awk, perl and python3).
const SAME_AS_HOST: &[&str] = &[
    "seq 3",
    "printf '%f\\n' 1.5",
    "numfmt --to=iec 123456789",
    "awk 'BEGIN{printf \"%.10f\\n\", atan2(1,1)*4}'",
    "perl -e 'printf \"%.12g\\n\", sin(1)+exp(1)'",
    "python3 -c 'import math,decimal,json; print(math.sqrt(2), math.lgamma(3.5), \
     decimal.Decimal(1)/7, json.dumps({\"a\":1.5}))'",
    "printf '3\\n1e3\\n-2.5\\n' | sort -g",
    "factor 1234567890123",
];

/// A static program built on the host with `-march=x86-64-v3`: AVX2, FMA, BMI1/2 and MOVBE
/// results folded into checksums.
const V3_PROGRAM: &str = r#"
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>

static uint64_t fold(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

int main(int argc, char **argv) {
    (void)argv;
    /* argc keeps the compiler from folding everything at build time. */
    uint32_t seed = 0x9e3779b9u + (uint32_t)argc;

    __m256i acc = _mm256_set1_epi32((int)seed);
    const __m256i perm = _mm256_setr_epi32(7, 0, 6, 1, 5, 2, 4, 3);
    const __m256i shuf = _mm256_setr_epi8(3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8, 15, 14, 13, 12,
                                          1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    for (int i = 0; i < 200000; i++) {
        __m256i v = _mm256_setr_epi32(i, i * 3, i * 5, i * 7, i ^ 0x55, i + 11, i * 13, i - 17);
        acc = _mm256_add_epi32(_mm256_mullo_epi32(acc, _mm256_set1_epi32(0x01000193)), v);
        acc = _mm256_xor_si256(acc, _mm256_shuffle_epi8(acc, shuf));
        acc = _mm256_permutevar8x32_epi32(acc, perm);
        acc = _mm256_add_epi64(acc, _mm256_srlv_epi64(acc, _mm256_set1_epi64x(i & 31)));
    }
    uint32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, acc);

    __m256d x = _mm256_setr_pd(1.0, 0.5, 0.25, 0.125 * argc);
    const __m256d y = _mm256_set1_pd(0.9999999);
    const __m256d z = _mm256_set1_pd(1e-3);
    __m256 f = _mm256_set1_ps(1.0f);
    for (int i = 0; i < 200000; i++) {
        x = _mm256_fmadd_pd(x, y, z);
        f = _mm256_fmsub_ps(f, _mm256_set1_ps(1.0000001f), _mm256_set1_ps(1e-7f * (float)(i & 7)));
    }
    double xs[4];
    float fs[8];
    _mm256_storeu_pd(xs, x);
    _mm256_storeu_ps(fs, f);

    uint64_t b = 0x0123456789abcdefull ^ seed, hi, bits = 0;
    for (int i = 0; i < 100000; i++) {
        b = _pdep_u64(b, 0x5555555555555555ull) ^ _pext_u64(b, 0xf0f0f0f0f0f0f0f0ull);
        b += _mulx_u64(b | 1, 0x9e3779b97f4a7c15ull, (unsigned long long *)&hi) ^ hi;
        b = _bzhi_u64(b, 63 - (i & 15)) ^ (b << (i & 31)) ^ _blsr_u64(b ^ (uint64_t)i);
        bits += _lzcnt_u64(b) + _tzcnt_u64(b | 1ull << 63) + (uint64_t)_andn_u64(b, hi) % 7;
        b = __builtin_bswap64(b);
    }
    /* Byte-swapping loads: MOVBE with -march=x86-64-v3. */
    uint32_t mv = (uint32_t)b;
    for (int k = 0; k < 8; k++) mv = (mv << 3 | mv >> 29) ^ __builtin_bswap32(lanes[k]);

    printf("avx2 %016llx\n", (unsigned long long)fold(0xcbf29ce484222325ull, lanes, sizeof lanes));
    printf("fma %016llx %.17g %.9g\n", (unsigned long long)fold(0xcbf29ce484222325ull, xs, sizeof xs),
           xs[3], (double)fs[0]);
    printf("bmi %016llx %llu %08x\n", (unsigned long long)b, (unsigned long long)bits, mv);
    return 0;
}
"#;

/// What the v3 program prints on an x86-64-v3 CPU (recorded on an AMD EPYC host with
/// gcc 12.2): the reference when the host itself cannot run it.
const V3_EXPECTED: &str = "avx2 e49f24c41af1a914\n\
                           fma 3f6018ccc605c288 198.13580156951568 0.953806341\n\
                           bmi 9e860100d4cc0ac2 502352 3577f30b";

// ---------------------------------------------------------------------------------------
// Setup: the image, an overlay on it, the v3 program's disk.

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The Debian image, built and current; panics with the setup step otherwise.
fn debian_image() -> PathBuf {
    let dir = assets();
    let image = dir.join(IMAGE);
    assert!(
        image.is_file(),
        "the Debian bookworm image {} is missing: run {SETUP} (scripts/test.sh does) to \
         build it with debootstrap",
        image.display()
    );
    let script = repo_root().join(SETUP);
    let out = Command::new("sha256sum")
        .arg(&script)
        .output()
        .expect("sha256sum (coreutils)");
    let want = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    let have = std::fs::read_to_string(dir.join(STAMP)).unwrap_or_default();
    assert_eq!(
        have.trim(),
        want,
        "{} was built by another version of {SETUP}: run {SETUP} to rebuild it",
        image.display()
    );
    image
}

/// A qcow2 overlay on the image in `dir`: the guest writes there, the base stays as built.
fn overlay(dir: &TempDir, base: &Path) -> PathBuf {
    let ov = dir.path().join("debian.qcow2");
    let out = vessel()
        .args(["img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(&ov)
        .output()
        .expect("vessel img create");
    assert!(
        out.status.success(),
        "vessel img create (overlay on {}): {}",
        base.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    ov
}

fn mkfs_ext4() -> Command {
    let found = ["mkfs.ext4", "/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
        .into_iter()
        .find(|p| {
            Command::new(p)
                .arg("-V")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("mkfs.ext4 is needed: apt-get install e2fsprogs");
    Command::new(found)
}

/// The v3 program built on the host (static, `-march=x86-64-v3 -O2`) on a small ext4 disk
/// labelled [`V3_LABEL`]; returns the disk and the program.
fn v3_disk(dir: &TempDir) -> (PathBuf, PathBuf) {
    let src = dir.file("v3.c", V3_PROGRAM.as_bytes());
    let content = dir.path().join("v3-content");
    std::fs::create_dir_all(&content).unwrap();
    let prog = content.join("v3");
    let out = Command::new("gcc")
        .args(["-static", "-march=x86-64-v3", "-O2", "-o"])
        .arg(&prog)
        .arg(&src)
        .output()
        .expect("gcc is needed for the x86-64-v3 program: apt-get install gcc libc6-dev");
    assert!(
        out.status.success(),
        "gcc -static -march=x86-64-v3 failed (needs libc6-dev's libc.a):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img = dir.path().join("v3.ext4");
    let out = mkfs_ext4()
        .args(["-q", "-F", "-L", V3_LABEL, "-d"])
        .arg(&content)
        .arg(&img)
        .arg("16M")
        .output()
        .expect("mkfs.ext4");
    assert!(
        out.status.success(),
        "mkfs.ext4 -d for the v3 disk: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (img, prog)
}

/// The v3 program's output on the host, or the recorded one where the host is not v3.
fn v3_reference(prog: &Path) -> String {
    let levels = Command::new("/lib64/ld-linux-x86-64.so.2")
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if !levels.contains("x86-64-v3 (supported") {
        eprintln!("host is not x86-64-v3: comparing with the recorded checksums");
        return V3_EXPECTED.to_string();
    }
    let out = Command::new(prog).output().expect("run the v3 program");
    assert!(out.status.success(), "the v3 program failed on the host");
    normalize(&String::from_utf8_lossy(&out.stdout))
}

/// `cmd` on the host, in the C locale as the guest's login shell is, stderr with stdout.
fn host(cmd: &str) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("{cmd} 2>&1"))
        .env("LC_ALL", "C")
        .output()
        .expect("bash");
    normalize(&String::from_utf8_lossy(&out.stdout))
}

/// Console text without carriage returns and terminal escape sequences (bash turns
/// bracketed paste on and off around each prompt).
fn normalize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {}
            '\u{1b}' => {
                // CSI: ESC [ parameters... final byte in @..~
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for d in chars.by_ref() {
                        if ('@'..='~').contains(&d) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            _ => out.push(c),
        }
    }
    out.trim().to_string()
}

// ---------------------------------------------------------------------------------------
// The guest's serial console.

/// A VM (Vessel or QEMU) whose serial console is its stdin/stdout.
struct Guest {
    guard: Guarded,
    stdin: ChildStdin,
    rx: Receiver<Vec<u8>>,
    seen: Vec<u8>,
    mark: usize,
    what: String,
}

impl Guest {
    fn spawn(mut cmd: Command, what: &str) -> Guest {
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let mut guard = Guarded(child);
        let stdin = guard.0.stdin.take().unwrap();
        let mut out = guard.0.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Guest {
            guard,
            stdin,
            rx,
            seen: Vec::new(),
            mark: 0,
            what: what.to_string(),
        }
    }

    fn console(&self) -> String {
        String::from_utf8_lossy(&self.seen).into_owned()
    }

    /// Wait for `needle` after everything matched so far; the text up to it, or why not.
    fn expect(&mut self, needle: &str, limit: Duration) -> Result<String, String> {
        let mut deadline = Instant::now() + limit;
        let mut panicked = false;
        loop {
            let hay = String::from_utf8_lossy(&self.seen[self.mark..]).into_owned();
            if let Some(i) = hay.find(needle) {
                let upto = hay[..i + needle.len()].to_string();
                self.mark += upto.len();
                return Ok(upto);
            }
            // A guest kernel that panicked prints nothing more worth waiting for (and
            // may not reset): keep its trace coming for a moment, then say so.
            if !panicked && hay.contains("Kernel panic - not syncing") {
                panicked = true;
                deadline = deadline.min(Instant::now() + Duration::from_secs(3));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(chunk) => self.seen.extend(chunk),
                Err(_) => {
                    let exited = self.guard.0.try_wait().ok().flatten();
                    return Err(format!(
                        "{} never printed {needle:?} within {limit:?}{}{}",
                        self.what,
                        if panicked {
                            " (the guest kernel panicked)"
                        } else {
                            ""
                        },
                        exited.map_or(String::new(), |s| format!(" ({} exited: {s})", self.what))
                    ));
                }
            }
        }
    }

    fn send(&mut self, line: &str) {
        // A VMM that died leaves a broken pipe: the next expect() says so.
        let _ = self.stdin.write_all(line.as_bytes());
        let _ = self.stdin.write_all(b"\n");
        let _ = self.stdin.flush();
    }

    /// Run a shell command and return what it printed (normalized). The markers are
    /// quoted apart in the typed line, so its echo never matches them.
    fn run(&mut self, cmd: &str, limit: Duration) -> Result<String, String> {
        self.send(&format!("echo '@@'B; {cmd}; echo '@@'E"));
        self.expect("@@B", limit)?;
        let out = self
            .expect("@@E", limit)
            .map_err(|e| format!("`{cmd}` did not finish: {e}"))?;
        Ok(normalize(out.trim_end_matches("@@E")))
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.guard.0.try_wait() {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

// ---------------------------------------------------------------------------------------
// The battery.

/// Which machine runs the image.
enum Vmm<'a> {
    /// `vessel run --accel emu`, with `--cpu MODEL` when given.
    Emu(Option<&'a str>),
    /// `vessel run --accel hybrid`: the kernel on x86emu, user code on a KVM vCPU.
    Hybrid,
    /// QEMU TCG q35, virtio-blk-pci, `-cpu max`: the reference.
    QemuTcg,
}

/// The x86-64 micro-architecture levels glibc's ld.so reports, each with the
/// /proc/cpuinfo flags that make it (glibc's sysdeps/x86/get-isa-level.h).
const LEVELS: &[(&str, &[&str])] = &[
    (
        "x86-64-v2",
        &[
            "cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3",
        ],
    ),
    (
        "x86-64-v3",
        &[
            "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave",
        ],
    ),
    (
        "x86-64-v4",
        &["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"],
    ),
];

/// The level a `--cpu` model promises, by name.
fn model_level(model: &str) -> Option<&'static str> {
    match model {
        "x86-64-v2" => Some("x86-64-v2"),
        "x86-64-v3" => Some("x86-64-v3"),
        "x86-64-v4" => Some("x86-64-v4"),
        _ => None,
    }
}

/// Failed checks, collected so one boot reports everything that is wrong.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn check(&mut self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            let m = msg();
            eprintln!("FAILED: {m}");
            self.0.push(m);
        }
    }
}

fn battery(vmm: Vmm) {
    let image = debian_image();
    let dir = TempDir::new("debian");
    let (v3_img, v3_prog) = v3_disk(&dir);
    let (cmd, what, model) = match vmm {
        Vmm::Emu(_) | Vmm::Hybrid => {
            let (accel, model) = match vmm {
                Vmm::Emu(model) => ("emu", model),
                _ => ("hybrid", None),
            };
            let ov = overlay(&dir, &image);
            let mut cmd = vessel();
            cmd.args([
                "run", "--accel", accel, "--memory", "1G", "--serial", "stdio",
            ])
            .arg("--kernel")
            .arg(assets().join("vmlinuz"))
            .arg("--initrd")
            .arg(assets().join("initramfs.cpio.gz"))
            .args(["--cmdline", CMDLINE])
            .arg("--disk")
            .arg(format!("{},format=qcow2", ov.display()))
            .arg("--disk")
            .arg(format!("{},format=raw,readonly", v3_img.display()));
            if let Some(m) = model {
                cmd.args(["--cpu", m]);
            }
            let what = format!("vessel {accel} (--cpu {})", model.unwrap_or("default"));
            (cmd, what, model)
        }
        Vmm::QemuTcg => {
            let mut cmd = Command::new("qemu-system-x86_64");
            cmd.args(["-M", "q35", "-accel", "tcg", "-cpu", "max", "-m", "1024"])
                .args([
                    "-nodefaults",
                    "-display",
                    "none",
                    "-serial",
                    "stdio",
                    "-no-reboot",
                ])
                .arg("-kernel")
                .arg(assets().join("vmlinuz"))
                .arg("-initrd")
                .arg(assets().join("initramfs.cpio.gz"))
                .args(["-append", CMDLINE])
                .arg("-drive")
                .arg(format!(
                    "file={},format=raw,if=none,id=root,snapshot=on",
                    image.display()
                ))
                .args(["-device", "virtio-blk-pci,drive=root"])
                .arg("-drive")
                .arg(format!(
                    "file={},format=raw,if=none,id=v3,readonly=on",
                    v3_img.display()
                ))
                .args(["-device", "virtio-blk-pci,drive=v3"]);
            (cmd, "QEMU TCG (q35, -cpu max)".to_string(), Some("max"))
        }
    };

    let start = Instant::now();
    let mut g = Guest::spawn(cmd, &what);
    let booted = g
        .expect("login: root (automatic login)", BOOT)
        .and_then(|_| g.expect(PROMPT, BOOT));
    if let Err(e) = booted {
        panic!(
            "{e}: Debian's systemd did not get to root's shell on the serial console.\n\
             console:\n{}",
            g.console()
        );
    }
    eprintln!("{what}: root shell {:.1?} after start", start.elapsed());

    let mut f = Failures::default();
    let mut result = run_battery(&mut g, model, &v3_prog, &mut f);
    if result.is_ok() && matches!(vmm, Vmm::Emu(None) | Vmm::Hybrid) {
        result = run_workloads(&mut g, &mut f);
    }
    if let Err(e) = result {
        f.0.push(format!("the battery stopped: {e}"));
        // What the kernel said about the programs that died, for the report.
        let traps = g
            .run(
                "journalctl -k --no-pager | grep -E 'traps:|segfault' | tail -n 20",
                Duration::from_secs(20),
            )
            .unwrap_or_default();
        panic!(
            "{what}: {} check(s) failed:\n- {}\nkernel traps:\n{traps}\nconsole:\n{}",
            f.0.len(),
            f.0.join("\n- "),
            g.console()
        );
    }

    // systemd shuts down and the kernel powers off through ACPI: the VMM exits 0.
    g.send("systemctl poweroff");
    let code = g.wait_exit(POWEROFF);
    f.check(code == Some(0), || {
        format!("`systemctl poweroff` should end the VM with status 0 within {POWEROFF:?}; got {code:?}")
    });
    assert!(
        f.0.is_empty(),
        "{what}: {} check(s) failed:\n- {}\nconsole:\n{}",
        f.0.len(),
        f.0.join("\n- "),
        g.console()
    );
}

/// The checks; `Err` when the guest stopped answering (later checks cannot run).
fn run_battery(
    g: &mut Guest,
    model: Option<&str>,
    v3_prog: &Path,
    f: &mut Failures,
) -> Result<(), String> {
    // Boot has finished and no unit failed (a service that died of SIGILL would be here).
    let state = g.run("systemctl is-system-running --wait", CMD)?;
    if state != "running" {
        let failed = g.run("systemctl --failed --no-pager --no-legend", CMD)?;
        f.check(false, || {
            format!("systemd should be `running` after boot, is {state:?}; failed units:\n{failed}")
        });
    }

    for cmd in SAME_AS_HOST {
        let guest = g.run(&format!("{cmd} 2>&1"), CMD)?;
        let want = host(cmd);
        f.check(guest == want, || {
            format!("`{cmd}` in the guest printed {guest:?}, the host {want:?}")
        });
    }

    // dd's closing statistics (a double formatted by glibc).
    let dd = g.run("dd if=/dev/zero of=/dev/null bs=1M count=4 2>&1", CMD)?;
    let lines: Vec<&str> = dd.lines().collect();
    let status_ok = lines.len() == 3
        && lines[0] == "4+0 records in"
        && lines[1] == "4+0 records out"
        && lines[2].starts_with("4194304 bytes (4.2 MB, 4.0 MiB) copied, ")
        && lines[2].ends_with("B/s");
    f.check(status_ok, || {
        format!("`dd if=/dev/zero of=/dev/null bs=1M count=4` should print its three status lines, printed {dd:?}")
    });

    // openssl's SHA-256 (its assembly picks code paths by CPUID) runs to the end.
    let speed = g.run("openssl speed -seconds 1 sha256 2>&1 | tail -n 3", CMD)?;
    let row = speed.lines().find(|l| l.starts_with("sha256"));
    let row_ok = row.is_some_and(|r| {
        let cols: Vec<&str> = r.split_whitespace().collect();
        cols.len() == 7
            && cols[1..]
                .iter()
                .all(|c| c.ends_with('k') && c.trim_end_matches('k').parse::<f64>().is_ok())
    });
    f.check(row_ok, || {
        format!("`openssl speed -seconds 1 sha256` should end with a sha256 row of six figures, printed {speed:?}")
    });

    // glibc's ld.so names the hwcaps levels the CPU supports: exactly the ones that
    // /proc/cpuinfo's flags make, and the one the model promises.
    let hwcaps = g.run(
        "/lib64/ld-linux-x86-64.so.2 --help 2>&1 | grep 'x86-64-v'",
        CMD,
    )?;
    let flags_line = g.run("grep -m1 '^flags' /proc/cpuinfo", CMD)?;
    let flags: Vec<&str> = flags_line.split_whitespace().collect();
    let mut supported_levels = Vec::new();
    for (level, needs) in LEVELS {
        let claimed = needs.iter().all(|n| flags.contains(n));
        let supported = hwcaps.contains(&format!("{level} (supported"));
        f.check(claimed == supported, || {
            let missing: Vec<_> = needs.iter().filter(|n| !flags.contains(n)).collect();
            format!(
                "ld.so says {level} is {}supported while /proc/cpuinfo {} (missing {missing:?}); \
                 ld.so --help:\n{hwcaps}",
                if supported { "" } else { "not " },
                if claimed {
                    "has all its flags"
                } else {
                    "lacks some"
                }
            )
        });
        supported_levels.push(supported);
    }
    // Levels build on each other: the highest of an unbroken run from v2.
    let best = supported_levels
        .iter()
        .take_while(|s| **s)
        .count()
        .checked_sub(1)
        .map(|i| LEVELS[i].0);
    if let Some(want) = model.and_then(model_level) {
        f.check(best == Some(want), || {
            format!(
                "--cpu {} promises {want}; ld.so's highest supported level is {}:\n{hwcaps}",
                model.unwrap_or_default(),
                best.unwrap_or("baseline")
            )
        });
    }

    // A CPU that claims x86-64-v3 runs v3 code: the host's checksums.
    eprintln!(
        "ld.so's highest hwcaps level: {}",
        best.unwrap_or("baseline")
    );
    let v3 = |l: Option<&str>| matches!(l, Some("x86-64-v3" | "x86-64-v4"));
    if v3(best) || v3(model.and_then(model_level)) {
        let out = g.run(
            &format!("mount -o ro -L {V3_LABEL} /mnt && /mnt/v3 2>&1; umount /mnt"),
            CMD,
        )?;
        let want = v3_reference(v3_prog);
        eprintln!("x86-64-v3 program in the guest:\n{out}");
        f.check(out == want, || {
            format!(
                "the -march=x86-64-v3 program printed {out:?} in the guest, {want:?} on the host"
            )
        });
    }

    // No program died of an invalid opcode, and the journal can say so: it holds the
    // kernel's log from the start.
    let banner = g.run("journalctl -k --no-pager | grep -c 'Linux version'", CMD)?;
    f.check(banner != "0", || {
        format!("journalctl -k should hold the kernel log (its `Linux version` line); grep -c says {banner:?}")
    });
    let traps = g.run("journalctl -k --no-pager | grep -c 'invalid opcode'", CMD)?;
    if traps != "0" {
        let lines = g.run(
            "journalctl -k --no-pager | grep 'invalid opcode' | head -n 20",
            CMD,
        )?;
        f.check(false, || {
            format!(
                "journalctl -k should hold no `invalid opcode` traps; {traps} of them:\n{lines}"
            )
        });
    }

    // The CPU's vendor is one Linux knows (no "vendor_id ... unknown, using generic init").
    let vendor = g.run(
        "dmesg | grep -i -E \"vendor_id .*unknown|may be unstable\" || true",
        CMD,
    )?;
    f.check(vendor.is_empty(), || {
        format!("the kernel log should have no unknown-vendor warning; it has:\n{vendor}")
    });
    Ok(())
}

/// Memory management seen from user code: copy-on-write after fork, memory unmapped and
/// mapped again, MADV_DONTNEED, mprotect. Under `hybrid` the kernel changes the page
/// tables on x86emu while user code reads them through KVM's shadow copies.
const MM_SCRIPT: &str = r#"import ctypes, mmap, os
libc = ctypes.CDLL(None, use_errno=True)
P = 4096
N = 32
bad = []
def addr(m):
    return ctypes.addressof(ctypes.c_char.from_buffer(m))
# Copy-on-write after fork: each side sees its own writes only.
buf = mmap.mmap(-1, N * P, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for r in range(16):
    for i in range(N):
        buf[i * P] = r
    pid = os.fork()
    if pid == 0:
        for i in range(N):
            buf[i * P] = 0xEE
        os._exit(0 if all(buf[i * P] == 0xEE for i in range(N)) else 1)
    _, st = os.waitpid(pid, 0)
    if st != 0 or any(buf[i * P] != r for i in range(N)):
        bad.append("cow %d" % r)
# Unmapped and mapped again: fresh zero pages, never the old contents.
for r in range(16):
    m = mmap.mmap(-1, N * P, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m[:] = b"\x55" * (N * P)
    m.close()
    m = mmap.mmap(-1, N * P, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if m[:] != bytes(N * P):
        bad.append("remap %d" % r)
    m.close()
# MADV_DONTNEED on private anonymous memory: zeros on the next read.
m = mmap.mmap(-1, N * P, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for r in range(16):
    m[:] = b"\x66" * (N * P)
    libc.madvise(ctypes.c_void_p(addr(m)), N * P, 4)
    if m[:] != bytes(N * P):
        bad.append("dontneed %d" % r)
# Write-protected by mprotect: a store kills the writer with SIGSEGV.
for r in range(8):
    pid = os.fork()
    if pid == 0:
        m[0] = 1
        libc.mprotect(ctypes.c_void_p(addr(m)), N * P, 1)
        m[0] = 2
        os._exit(0)
    _, st = os.waitpid(pid, 0)
    if not (os.WIFSIGNALED(st) and os.WTERMSIG(st) == 11):
        bad.append("mprotect %d: %x" % (r, st))
print("mm", "ok" if not bad else " ".join(bad))
"#;

/// bench/real.sh's workloads (smaller) and the memory-management script: their results.
fn run_workloads(g: &mut Guest, f: &mut Failures) -> Result<(), String> {
    let checks: [(&str, &str); 5] = [
        (
            "python3 -c $'s=0\\nfor i in range(1000000): s+=i*i\\nprint(s)'",
            "333332833333500000",
        ),
        (
            "head -c 64M /dev/zero | sha256sum",
            "3b6a07d0d404fab4e23b6d34bc6696a6a312dd92821332385e5af7c01c421351  -",
        ),
        (
            "seq 1 2000000 | gzip -c | gzip -dc | sha256sum",
            "d2d7c0abc3eb76d91b0b5a2702e92a9f2908269c9c1b3604bdfe2521c71d6274  -",
        ),
        (
            "n=0; for i in $(seq 200); do /bin/true && n=$((n+1)); done; echo $n",
            "200",
        ),
        (
            "echo ${MM} | base64 -d > /tmp/mm.py && python3 /tmp/mm.py",
            "mm ok",
        ),
    ];
    let b64 = base64::engine::general_purpose::STANDARD.encode(MM_SCRIPT);
    for (cmd, want) in checks {
        let cmd = cmd.replace("${MM}", &b64);
        let out = g.run(&cmd, CMD)?;
        f.check(out == want, || {
            let shown: String = cmd.chars().take(80).collect();
            format!("`{shown}` printed {out:?}, should print {want:?}")
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// One test per CPU model.

#[test]
fn debian_bookworm_on_emu_default_cpu_matches_the_host() {
    let model = std::env::var("VESSEL_DEBIAN_CPU").ok();
    battery(Vmm::Emu(model.as_deref()));
}

#[test]
fn debian_bookworm_on_emu_x86_64_v2_matches_the_host() {
    battery(Vmm::Emu(Some("x86-64-v2")));
}

#[test]
fn debian_bookworm_on_emu_x86_64_v3_matches_the_host() {
    battery(Vmm::Emu(Some("x86-64-v3")));
}

/// The battery, bench/real.sh's workloads and the memory-management checks with guest user
/// code running natively (`--accel hybrid`, a PVM host's /dev/kvm).
#[test]
fn debian_bookworm_on_hybrid_matches_the_host() {
    battery(Vmm::Hybrid);
}

/// The reference: the same image and battery under QEMU TCG. When this passes and an emu
/// test fails, the difference is Vessel's CPU.
#[test]
fn debian_bookworm_on_qemu_tcg_matches_the_host() {
    battery(Vmm::QemuTcg);
}
