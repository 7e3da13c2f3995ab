//! The VMM's confinement (issue 22), seen from outside as an attacker would see it:
//! every thread of a running `vessel run` has a seccomp filter, NoNewPrivs and no
//! capabilities, no mapping is writable and executable, and a forbidden system call ends
//! that VMM alone, with its documented status. Real guests on the emu accelerator, with
//! the devices that have threads of their own.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BOOT: Duration = Duration::from_secs(120);

/// getppid(2): what `VESSEL_SECCOMP_SELFTEST` makes a thread call.
const SELF_TEST_SYSCALL: i64 = 110;

/// A VMM with two vCPUs, a disk, rng, vsock, the API socket and the console socket,
/// whose guest idles after boot. `extra` args and `env` come last.
fn spawn_vmm(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Guarded {
    spawn_vmm_running(dir, "sleep+600", extra, env)
}

/// [`spawn_vmm`] whose guest runs `run` (the initramfs's `vessel.run=`, `+` for spaces).
fn spawn_vmm_running(dir: &Path, run: &str, extra: &[&str], env: &[(&str, &str)]) -> Guarded {
    let a = assets();
    let disk = dir.join("d.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut cmd = vessel();
    cmd.arg("run")
        .args(["--accel", "emu", "--cpus", "2", "--memory", "256M"])
        .arg("--kernel")
        .arg(a.join("vmlinuz"))
        .arg("--initrd")
        .arg(a.join("initramfs.cpio.gz"))
        .arg("--cmdline")
        .arg(format!("console=ttyS0 panic=-1 quiet vessel.run={run}"))
        .arg("--disk")
        .arg(format!("{},format=raw", disk.display()))
        .arg("--rng")
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", dir.join("v.sock").display()))
        .arg("--api-sock")
        .arg(dir.join("api.sock"))
        .arg("--console-sock")
        .arg(dir.join("con.sock"))
        .arg("--console-log")
        .arg(dir.join("serial.log"))
        .args(extra)
        .env_remove("VESSEL_SECCOMP")
        .env_remove("VESSEL_SECCOMP_SELFTEST")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr")).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Guarded(cmd.spawn().expect("spawn vessel"))
}

/// Waits for the guest's init: by then every VMM thread has started.
fn wait_booted(dir: &Path, vmm: &mut Child) {
    let log = dir.join("serial.log");
    let t0 = Instant::now();
    loop {
        if std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("vessel-init:")
        {
            return;
        }
        if let Ok(Some(st)) = vmm.try_wait() {
            panic!(
                "the VMM ended ({st}) before the guest booted: {}",
                std::fs::read_to_string(dir.join("stderr")).unwrap_or_default()
            );
        }
        assert!(t0.elapsed() < BOOT, "the guest did not boot");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The VMM a jailed `vessel run` (`waiter`) runs as its child, process 1 of a new PID
/// namespace.
fn jailed_vmm(waiter: u32) -> u32 {
    let t0 = Instant::now();
    loop {
        let children = std::fs::read_to_string(format!("/proc/{waiter}/task/{waiter}/children"))
            .unwrap_or_default();
        if let Some(c) = children.split_whitespace().next() {
            return c.parse().unwrap();
        }
        assert!(t0.elapsed() < BOOT, "the jailed VMM has no child");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One line of /proc/PID/task/TID/status, e.g. `Seccomp`.
fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in {status}"))
        .trim()
        .to_string()
}

/// (thread name, Seccomp, NoNewPrivs, CapEff, CapPrm, CapBnd) of every thread of `pid`.
fn threads(pid: u32) -> Vec<[String; 6]> {
    let mut v = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let Ok(status) = std::fs::read_to_string(t.join("status")) else {
            continue;
        };
        v.push([
            status_field(&status, "Name"),
            status_field(&status, "Seccomp"),
            status_field(&status, "NoNewPrivs"),
            status_field(&status, "CapEff"),
            status_field(&status, "CapPrm"),
            status_field(&status, "CapBnd"),
        ]);
    }
    v
}

#[test]
fn every_vmm_thread_is_confined_and_no_mapping_is_writable_and_executable() {
    let dir = TempDir::new("sandbox");
    let mut vmm = spawn_vmm(dir.path(), &[], &[]);
    wait_booted(dir.path(), &mut vmm.0);
    let pid = vmm.0.id();
    let ts = threads(pid);
    let names: Vec<&str> = ts.iter().map(|t| t[0].as_str()).collect();
    // The threads this VM has: the check below covers each kind.
    for want in [
        "vessel",
        "vcpu0",
        "vcpu1",
        "blk0",
        "vsock",
        "vmm-api",
        "console-out",
        "console-accept",
        "emu-irqfd",
    ] {
        assert!(names.contains(&want), "no {want} thread in {names:?}");
    }
    for [name, seccomp, nnp, eff, prm, bnd] in &ts {
        assert_eq!(seccomp, "2", "{name}: not in seccomp filter mode");
        assert_eq!(nnp, "1", "{name}: NoNewPrivs not set");
        for (set, v) in [("CapEff", eff), ("CapPrm", prm), ("CapBnd", bnd)] {
            assert_eq!(v, "0000000000000000", "{name}: {set} {v}");
        }
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let rwx: Vec<&str> = maps
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|p| p.starts_with("rwx"))
        })
        .collect();
    assert!(rwx.is_empty(), "writable and executable mappings: {rwx:#?}");
    // The compiler's code is there, mapped read-execute (so the check above saw it), on
    // hosts where it runs (BMI2; not turned off by VESSEL_EMU_JIT).
    let jit =
        std::arch::is_x86_feature_detected!("bmi2") && std::env::var_os("VESSEL_EMU_JIT").is_none();
    assert!(
        !jit || maps
            .lines()
            .any(|l| l.contains("vessel-jit") && l.split_whitespace().nth(1) == Some("r-xs")),
        "no read-execute JIT mapping in:\n{maps}"
    );
    // The API still works under its filter: pause and resume.
    for state in ["Paused", "Resumed"] {
        let o = Command::new("curl")
            .args(["-sf", "-X", "PATCH", "--unix-socket"])
            .arg(dir.path().join("api.sock"))
            .args(["http://localhost/vm", "-d"])
            .arg(format!(r#"{{"state": "{state}"}}"#))
            .output()
            .expect("curl");
        assert!(o.status.success(), "PATCH /vm {state}: {o:?}");
    }
    assert!(vmm.0.try_wait().unwrap().is_none(), "the VMM ended");

    // The same VMM with --seccomp none: the check above can fail.
    drop(vmm);
    let dir = TempDir::new("sandbox-none");
    let mut vmm = spawn_vmm(dir.path(), &["--seccomp", "none"], &[]);
    wait_booted(dir.path(), &mut vmm.0);
    let ts = threads(vmm.0.id());
    let vcpu = ts.iter().find(|t| t[0] == "vcpu0").expect("vcpu0");
    assert_eq!(vcpu[1], "0", "--seccomp none still filters: {ts:?}");
}

/// Waits for the VMM to end; its status and stderr.
fn wait_end(dir: &Path, vmm: &mut Guarded, limit: Duration) -> (std::process::ExitStatus, String) {
    let t0 = Instant::now();
    loop {
        if let Some(st) = vmm.0.try_wait().unwrap() {
            return (
                st,
                std::fs::read_to_string(dir.join("stderr")).unwrap_or_default(),
            );
        }
        assert!(t0.elapsed() < limit, "the VMM did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_forbidden_system_call_ends_only_that_vmm_with_status_148() {
    // A bystander VMM, booted and idle.
    let bystander_dir = TempDir::new("sandbox-bystander");
    let mut bystander = spawn_vmm(bystander_dir.path(), &[], &[]);
    wait_booted(bystander_dir.path(), &mut bystander.0);

    // Each kind of thread, in the default mode: the report names it and the call.
    for role in ["vcpu", "io", "vsock", "api", "console", "main"] {
        let dir = TempDir::new(&format!("sandbox-{role}"));
        let mut vmm = spawn_vmm(dir.path(), &[], &[("VESSEL_SECCOMP_SELFTEST", role)]);
        let (st, stderr) = wait_end(dir.path(), &mut vmm, BOOT);
        assert_eq!(st.code(), Some(148), "{role}: {st}: {stderr}");
        let report = format!(") made a forbidden system call (number {SELF_TEST_SYSCALL})");
        assert!(
            stderr.contains(&format!("a {role} thread (")) && stderr.contains(&report),
            "{role}: {stderr}"
        );
    }
    // --seccomp kill: the kernel kills the process with SIGSYS.
    let dir = TempDir::new("sandbox-kill");
    let mut vmm = spawn_vmm(
        dir.path(),
        &["--seccomp", "kill"],
        &[("VESSEL_SECCOMP_SELFTEST", "vcpu")],
    );
    let (st, stderr) = wait_end(dir.path(), &mut vmm, BOOT);
    assert_eq!(st.signal(), Some(libc::SIGSYS), "{st}: {stderr}");
    // --seccomp log: the call is let through and the guest boots.
    let dir = TempDir::new("sandbox-log");
    let mut vmm = spawn_vmm(
        dir.path(),
        &["--seccomp", "log"],
        &[("VESSEL_SECCOMP_SELFTEST", "vcpu")],
    );
    wait_booted(dir.path(), &mut vmm.0);

    assert!(
        bystander.0.try_wait().unwrap().is_none(),
        "the bystander VMM ended too"
    );
    let threads = threads(bystander.0.id());
    assert!(
        threads.iter().any(|t| t[0] == "vcpu0"),
        "bystander lost its vCPU: {threads:?}"
    );
}

/// `Seccomp_filters` (how many filters are stacked) of each thread of `pid` named
/// `name`, by thread id.
fn filter_counts(pid: u32, name: &str) -> Vec<(u32, u32)> {
    let mut v = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let Ok(status) = std::fs::read_to_string(t.join("status")) else {
            continue;
        };
        if status_field(&status, "Name") != name {
            continue;
        }
        let tid = t.file_name().unwrap().to_str().unwrap().parse().unwrap();
        v.push((
            tid,
            status_field(&status, "Seccomp_filters").parse().unwrap(),
        ));
    }
    v.sort_unstable();
    v
}

/// One keep-alive request on `conn`: its status; the connection stays open.
fn keep_alive_get(conn: &mut Option<vmm::api::http::KeptConn>, sock: &Path) -> u16 {
    let stream: Box<dyn vmm::api::http::Conn> = match conn.take() {
        Some(kept) => kept.into_inner(),
        None => Box::new(std::os::unix::net::UnixStream::connect(sock).unwrap()),
    };
    let (resp, kept) =
        vmm::api::http::client_exchange(stream, "GET", "/", None, true, &[]).unwrap();
    *conn = kept;
    resp.status
}

/// Issue 22: threads confined before the VM is built (the API's acceptor, a connection
/// left idle since before InstanceStart, the console's threads and an attached
/// console client) add the filter that holds KVM's and the TAPs' requests to the VM's
/// descriptors when the VM is built, without waiting for a request; connections made
/// later get it from their acceptor, and a request on the idle connection adds no
/// second one.
#[test]
fn threads_confined_before_the_build_are_held_to_its_descriptors_at_once() {
    let a = assets();
    let dir = TempDir::new("sandbox-early");
    let sock = dir.path().join("api.sock");
    let con = dir.path().join("con.sock");
    let log = dir.path().join("serial.log");
    let mut vmm = Guarded(
        vessel()
            .args(["run", "--accel", "emu", "--serial", "stdio", "--api-sock"])
            .arg(&sock)
            .arg("--console-sock")
            .arg(&con)
            .arg("--console-log")
            .arg(&log)
            .env_remove("VESSEL_SECCOMP")
            .env_remove("VESSEL_SECCOMP_SELFTEST")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
            .spawn()
            .expect("spawn vessel"),
    );
    wait_for_socket(&sock, Duration::from_secs(10));
    wait_for_socket(&con, Duration::from_secs(10));
    let pid = vmm.0.id();
    // A kept-alive connection, idle from its first answer on, and a console client.
    let mut idle = None;
    assert_eq!(keep_alive_get(&mut idle, &sock), 200);
    let _console = std::os::unix::net::UnixStream::connect(&con).unwrap();
    let early = [
        "vmm-api",
        "http-conn",
        "console-accept",
        "console-out",
        "console-in",
    ];
    let t0 = Instant::now();
    let before = loop {
        let counts: Vec<Vec<(u32, u32)>> = early.iter().map(|n| filter_counts(pid, n)).collect();
        if counts.iter().all(|c| c.len() == 1) {
            break counts;
        }
        assert!(t0.elapsed() < BOOT, "threads before the build: {counts:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    for (name, c) in early.iter().zip(&before) {
        assert!(c[0].1 >= 2, "{name}: {c:?}");
    }
    // The idle connection's thread runs under its acceptor's filters.
    assert_eq!(before[0][0].1, before[1][0].1);

    let boot = format!(
        r#"{{"kernel_image_path": "{}", "initrd_path": "{}",
            "boot_args": "console=ttyS0 panic=-1 quiet vessel.run=sleep+600"}}"#,
        a.join("vmlinuz").display(),
        a.join("initramfs.cpio.gz").display()
    );
    assert_eq!(api(&sock, "PUT", "/boot-source", Some(&boot)).0, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(api(&sock, "PUT", "/actions", Some(start)).0, 204);
    // The vCPU thread starts once the threads before it have tightened their filters.
    let t0 = Instant::now();
    while filter_counts(pid, "vcpu0").is_empty() {
        assert!(t0.elapsed() < BOOT, "no vCPU thread");
        std::thread::sleep(Duration::from_millis(20));
    }
    for (name, was) in early.iter().zip(&before) {
        let now = filter_counts(pid, name);
        let same = now.iter().find(|(tid, _)| *tid == was[0].0);
        assert_eq!(
            same.map(|t| t.1),
            Some(was[0].1 + 1),
            "{name} (thread {}) before the build {was:?}, after {now:?}",
            was[0].0
        );
    }
    // A request on the idle connection adds nothing; a new connection's thread has what
    // its acceptor has.
    let (idle_tid, idle_before) = before[1][0];
    assert_eq!(keep_alive_get(&mut idle, &sock), 200);
    let mut fresh = None;
    assert_eq!(keep_alive_get(&mut fresh, &sock), 200);
    let conns = filter_counts(pid, "http-conn");
    assert!(conns.len() >= 2, "{conns:?}");
    for (tid, n) in &conns {
        assert_eq!(
            *n,
            idle_before + 1,
            "http-conn {tid} (the idle one: {idle_tid})"
        );
    }
    assert!(vmm.0.try_wait().unwrap().is_none(), "the VMM ended");
}

#[test]
fn a_jailed_vmm_sees_only_its_own_files_and_namespaces() {
    let dir = TempDir::new("sandbox-jail");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let secret = dir.path().join("../vessel-jail-secret");
    std::fs::write(&secret, b"not for the VMM").unwrap();
    let mut vmm = spawn_vmm(
        dir.path(),
        &[
            "--jail",
            root.to_str().unwrap(),
            "--uid",
            "65534",
            "--gid",
            "65534",
        ],
        &[("VESSEL_LOG", "debug")],
    );
    wait_booted(dir.path(), &mut vmm.0);
    let waiter = vmm.0.id();
    let pid = jailed_vmm(waiter);
    // The VMM is process 1 of its own PID namespace; the process outside only waits for
    // it, confined too.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status_field(&status, "NSpid").ends_with("\t1")
            || status_field(&status, "NSpid").ends_with(" 1"),
        "{status}"
    );
    let w = std::fs::read_to_string(format!("/proc/{waiter}/status")).unwrap();
    for (key, want) in [
        ("Seccomp", "2"),
        ("NoNewPrivs", "1"),
        ("CapEff", "0000000000000000"),
        ("Threads", "1"),
    ] {
        assert_eq!(status_field(&w, key), want, "the waiter's {key}");
    }
    assert!(status_field(&w, "Uid").starts_with("65534"), "{w}");
    // Issue 22: at most 4096 descriptors (a guest opening vsock connections without
    // end meets this limit, not the host's).
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or("");
    assert_eq!(
        files.split_whitespace().skip(3).take(2).collect::<Vec<_>>(),
        ["4096", "4096"],
        "{limits}"
    );
    let inside = Path::new("/proc").join(pid.to_string()).join("root");
    for ns in ["mnt", "net", "ipc", "uts"] {
        let link = |p: String| std::fs::read_link(p).unwrap();
        assert_ne!(
            link(format!("/proc/{pid}/ns/{ns}")),
            link(format!("/proc/self/ns/{ns}")),
            "the jailed VMM shares the host's {ns} namespace"
        );
    }
    // Every thread is nobody (real, effective, saved and file-system ids).
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap();
        for key in ["Uid", "Gid"] {
            let ids = status_field(&status, key);
            assert!(
                ids.split_whitespace().all(|id| id == "65534"),
                "{key}: {ids} in\n{status}"
            );
        }
    }
    let at = |p: &Path| inside.join(p.strip_prefix("/").unwrap());
    assert!(at(&assets().join("vmlinuz")).is_file(), "no kernel inside");
    assert!(at(&dir.path().join("d.raw")).is_file(), "no disk inside");
    assert!(at(Path::new("/dev/kvm")).exists());
    for gone in ["/etc/passwd", "/usr/bin", "/bin/sh", "/root/.bashrc"] {
        assert!(
            !at(Path::new(gone)).exists(),
            "{gone} is visible in the jail"
        );
    }
    assert!(!at(&secret).exists(), "a sibling of its folder is visible");
    // Nothing is mounted on the host's side of the root folder.
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    // The sockets made inside are reachable outside: the API answers.
    let o = Command::new("curl")
        .args(["-sf", "--unix-socket"])
        .arg(dir.path().join("api.sock"))
        .arg("http://localhost/")
        .output()
        .expect("curl");
    assert!(o.status.success(), "GET / through the jailed API: {o:?}");
    let _ = std::fs::remove_file(&secret);
}

#[test]
fn a_jailed_vmm_with_a_tap_keeps_its_network_and_the_guest_pings_the_host() {
    let ns = common::NetNs::new("jailnet");
    let dir = TempDir::new("sandbox-jailnet");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let log = dir.path().join("serial.log");
    let a = assets();
    let script = "ip+addr+add+10.0.2.15/24+dev+eth0;ip+link+set+eth0+up;\
                  for+i+in+1+2+3+4+5+6+7+8+9+10;do+ping+-c1+-W2+10.0.2.1+&&+echo+PING-OK&&break;sleep+1;done";
    let mut vmm = Guarded(
        Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(env!("CARGO_BIN_EXE_vessel"))
            .args(["run", "--accel", "emu", "--memory", "256M"])
            .arg("--kernel")
            .arg(a.join("vmlinuz"))
            .arg("--initrd")
            .arg(a.join("initramfs.cpio.gz"))
            .arg("--cmdline")
            .arg(format!("console=ttyS0 panic=-1 quiet vessel.run={script}"))
            .args(["--net", "tap=vtapj0"])
            .arg("--serial")
            .arg(format!("file:{}", log.display()))
            .arg("--jail")
            .arg(&root)
            .env_remove("VESSEL_SECCOMP")
            .env_remove("VESSEL_SECCOMP_SELFTEST")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
            .spawn()
            .unwrap(),
    );
    // The TAP exists once the VM is built: give the host side its address.
    let t0 = Instant::now();
    loop {
        let up = Command::new("ip")
            .args(["netns", "exec", &ns.0, "ip", "link", "show", "vtapj0"])
            .output()
            .unwrap();
        if up.status.success() {
            break;
        }
        if let Ok(Some(st)) = vmm.0.try_wait() {
            panic!(
                "the VMM ended ({st}): {}",
                std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default()
            );
        }
        assert!(t0.elapsed() < BOOT, "no TAP");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Checked while the VMM surely runs (the guest powers off once it has pinged).
    // `ip netns exec` execs the VMM: it kept the namespace that holds its TAP (a network
    // namespace of its own would have cut the TAP's host side off), and has its own
    // mounts.
    use std::os::unix::fs::MetadataExt;
    let pid = jailed_vmm(vmm.0.id());
    let ino = |p: String| std::fs::metadata(p).unwrap().ino();
    assert_eq!(
        ino(format!("/proc/{pid}/ns/net")),
        ino(format!("/run/netns/{}", ns.0))
    );
    assert_ne!(
        ino(format!("/proc/{pid}/ns/mnt")),
        ino("/proc/self/ns/mnt".into())
    );
    for args in [
        vec!["ip", "addr", "add", "10.0.2.1/24", "dev", "vtapj0"],
        vec!["ip", "link", "set", "vtapj0", "up"],
    ] {
        let o = Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .args(&args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{args:?}: {o:?}");
    }
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("PING-OK") {
            break;
        }
        assert!(
            vmm.0.try_wait().unwrap().is_none(),
            "the VMM ended: {text}\n{}",
            std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default()
        );
        assert!(
            t0.elapsed() < BOOT,
            "the guest never reached the host: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The cgroup version the tests give `--cgroup-version`: 2 on a host whose
/// `/sys/fs/cgroup` is the unified hierarchy, 1 else (this project's hosts so far).
fn cgroup_v2() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// The folders of `pid`'s cgroups whose path ends in `leaf` (from /proc/PID/cgroup and
/// the mounts), by controller ("" for v2's).
fn cgroup_folders(pid: u32, leaf: &str) -> Vec<(String, std::path::PathBuf)> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mut v = Vec::new();
    for line in own.lines() {
        let mut f = line.splitn(3, ':');
        let (_, ctls, path) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
        if !path.ends_with(leaf) {
            continue;
        }
        let mount = mounts.lines().find_map(|m| {
            let m: Vec<&str> = m.split_whitespace().collect();
            let ok = match ctls {
                "" => m[2] == "cgroup2",
                c => m[2] == "cgroup" && m[3].split(',').any(|o| c.split(',').any(|x| x == o)),
            };
            ok.then(|| m[1].to_string())
        });
        let Some(mount) = mount else {
            continue;
        };
        v.push((
            ctls.to_string(),
            Path::new(&mount).join(path.trim_start_matches('/')),
        ));
    }
    v
}

/// Removes the test's cgroups once their processes are gone (and their parent).
struct CgroupCleanup(Vec<std::path::PathBuf>);

impl Drop for CgroupCleanup {
    fn drop(&mut self) {
        for g in &self.0 {
            let t0 = Instant::now();
            while std::fs::remove_dir(g).is_err() && g.exists() && t0.elapsed().as_secs() < 10 {
                std::thread::sleep(Duration::from_millis(50));
            }
            if let Some(parent) = g.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}

/// Issue 22: `--resource-limit` and `--cgroup` (Firecracker's jailer's flags): the jailed
/// VMM and its waiter are in a cgroup of their own with the values given, under the
/// caller's; its file size and descriptor limits are the ones given; a guest that
/// writes more to a growing (qcow2) disk than the file size limit gets I/O errors, the
/// image stays at the limit and uncorrupted, and the VMM goes on serving.
#[test]
fn a_jailed_vmm_is_held_to_its_cgroup_and_resource_limits() {
    let dir = TempDir::new("sandbox-limits");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let id = format!("limits-{}", std::process::id());
    // Where the group will be: below this test's own groups.
    let _cleanup = CgroupCleanup(
        cgroup_folders(std::process::id(), "")
            .into_iter()
            .map(|(_, g)| g.join("vessel-test-limits").join(&id))
            .collect(),
    );
    let (version, cpu, mem) = if cgroup_v2() {
        ("2", "cpu.max=200000 100000", "memory.max=805306368")
    } else {
        (
            "1",
            "cpu.cfs_quota_us=200000",
            "memory.limit_in_bytes=805306368",
        )
    };
    // Well below the emulator's 64 MiB code arena, a memory file RLIMIT_FSIZE bounds too:
    // the limit is set once the vCPUs (and their arenas) exist.
    const FSIZE: u64 = 16 << 20;
    let fsize = format!("fsize={FSIZE}");
    let qcow = dir.path().join("grow.qcow2");
    let st = vessel()
        .args(["img", "create", "-f", "qcow2"])
        .arg(&qcow)
        .arg("256M")
        .status()
        .unwrap();
    assert!(st.success());
    let disk = format!("{},format=qcow2", qcow.display());
    let mut vmm = spawn_vmm_running(
        dir.path(),
        // 64 MiB onto the qcow2 disk, which grows a cluster at a time.
        "dd+if=/dev/zero+of=/dev/vdb+bs=1M+count=64;echo+dd-rc=$?;sleep+600",
        &[
            "--disk",
            &disk,
            "--jail",
            root.to_str().unwrap(),
            "--uid",
            "65534",
            "--gid",
            "65534",
            "--resource-limit",
            &fsize,
            "--resource-limit",
            "no-file=512",
            "--cgroup-version",
            version,
            "--cgroup",
            cpu,
            "--cgroup",
            mem,
            "--parent-cgroup",
            "vessel-test-limits",
            "--id",
            &id,
        ],
        &[],
    );
    wait_booted(dir.path(), &mut vmm.0);
    let waiter = vmm.0.id();
    let pid = jailed_vmm(waiter);
    let groups = cgroup_folders(pid, &format!("/vessel-test-limits/{id}"));
    let ctls: Vec<&str> = groups.iter().map(|(c, _)| c.as_str()).collect();
    if version == "1" {
        assert!(
            ctls.iter().any(|c| c.split(',').any(|x| x == "cpu")) && ctls.contains(&"memory"),
            "the VMM is not in its own cpu and memory groups: {ctls:?}"
        );
    } else {
        assert_eq!(ctls, [""], "not in its own v2 group");
    }
    for (_, g) in &groups {
        let procs = std::fs::read_to_string(g.join("cgroup.procs")).unwrap();
        let procs: Vec<u32> = procs.lines().map(|l| l.parse().unwrap()).collect();
        assert!(
            procs.contains(&pid) && procs.contains(&waiter),
            "{}: {procs:?} lacks the VMM {pid} or its waiter {waiter}",
            g.display()
        );
        // The group lies below the test's own (nothing is made at the hierarchy's root
        // unless the caller is there).
        let parent = g.parent().unwrap();
        assert!(parent.ends_with("vessel-test-limits"), "{}", g.display());
    }
    for setting in [cpu, mem] {
        let (file, value) = setting.split_once('=').unwrap();
        let g = groups
            .iter()
            .find(|(_, g)| g.join(file).exists())
            .unwrap_or_else(|| panic!("no group has {file}"));
        assert_eq!(
            std::fs::read_to_string(g.1.join(file)).unwrap().trim(),
            value,
            "{file}"
        );
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit = |name: &str| {
        let l = limits.lines().find(|l| l.starts_with(name)).unwrap();
        l[name.len()..]
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        limit("Max file size"),
        format!("{FSIZE} {FSIZE}"),
        "{limits}"
    );
    assert_eq!(limit("Max open files"), "512 512", "{limits}");
    // The guest runs compiled code all the same: the code arena was sized first.
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(
        maps.lines()
            .any(|l| l.contains("vessel-jit") && l.split_whitespace().nth(1) == Some("r-xs")),
        "no code arena under fsize={FSIZE}:\n{maps}"
    );
    // The guest's writes past the limit fail; the image stops there; the VMM goes on.
    let log = dir.path().join("serial.log");
    wait_for_text(&log, "\ndd-rc=", BOOT);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("I/O error, dev vdb"),
        "no write failed: {text}"
    );
    let len = std::fs::metadata(&qcow).unwrap().len();
    assert!(len <= FSIZE, "the image grew to {len}");
    assert!(
        len > FSIZE / 2,
        "the guest's writes did not reach the image ({len})"
    );
    assert!(
        vmm.0.try_wait().unwrap().is_none(),
        "the VMM ended at the limit"
    );
    let o = Command::new("curl")
        .args(["-sf", "--unix-socket"])
        .arg(dir.path().join("api.sock"))
        .arg("http://localhost/")
        .output()
        .expect("curl");
    assert!(o.status.success(), "GET / after the image filled: {o:?}");
    // The image is whole: leaked clusters at most (qemu-img check exits 3), as after a
    // full disk.
    // SAFETY: kill(2) on our own child (the waiter passes SIGTERM on).
    unsafe { libc::kill(waiter as i32, libc::SIGTERM) };
    wait_end(dir.path(), &mut vmm, Duration::from_secs(30));
    let o = Command::new("qemu-img")
        .arg("check")
        .arg(&qcow)
        .output()
        .expect("qemu-img (apt-get install qemu-utils)");
    assert!(
        matches!(o.status.code(), Some(0) | Some(3)),
        "qemu-img check: {o:?}"
    );
}

/// Issue 22: a cgroup memory limit holds. A VMM whose guest needs more than its group's
/// limit is killed by the kernel (its waiter reports 128 + SIGKILL), and the group
/// counts the OOM kill; nothing outside the group is touched.
#[test]
fn a_vmm_over_its_cgroup_memory_limit_is_killed_alone() {
    let dir = TempDir::new("sandbox-oom");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let id = format!("oom-{}", std::process::id());
    let (version, mem) = if cgroup_v2() {
        ("2", "memory.max=50331648")
    } else {
        ("1", "memory.limit_in_bytes=50331648")
    };
    let mut vmm = spawn_vmm(
        dir.path(),
        &[
            "--jail",
            root.to_str().unwrap(),
            "--cgroup-version",
            version,
            "--cgroup",
            mem,
            "--parent-cgroup",
            "vessel-test-oom",
            "--id",
            &id,
        ],
        &[],
    );
    // Where the group is: below this test's own groups (the VMM may be gone already).
    let groups: Vec<_> = cgroup_folders(std::process::id(), "")
        .into_iter()
        .map(|(c, g)| (c, g.join("vessel-test-oom").join(&id)))
        .collect();
    let _cleanup = CgroupCleanup(groups.iter().map(|(_, g)| g.clone()).collect());
    let (st, stderr) = wait_end(dir.path(), &mut vmm, BOOT);
    assert_eq!(st.code(), Some(128 + libc::SIGKILL), "{st}: {stderr}");
    let (file, key) = if version == "2" {
        ("memory.events", "oom_kill")
    } else {
        ("memory.oom_control", "oom_kill")
    };
    let g = &groups
        .iter()
        .find(|(_, g)| g.join(file).exists())
        .unwrap()
        .1;
    let events = std::fs::read_to_string(g.join(file)).unwrap();
    let kills: u64 = events
        .lines()
        .find_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [k, n] if k == key => n.parse().ok(),
            _ => None,
        })
        .unwrap_or(0);
    assert!(kills >= 1, "no OOM kill counted: {events}");
    assert!(
        !std::fs::read_to_string(dir.path().join("serial.log"))
            .unwrap_or_default()
            .contains("vessel-init:"),
        "the guest booted within 48 MiB of VMM memory"
    );
}
