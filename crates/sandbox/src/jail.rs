//! The jail a VMM enters before it builds its VM (`vessel run --jail ROOT`, which the
//! manager passes by default): a new PID namespace (the VMM goes on as its process 1,
//! its parent stays outside as a confined waiter), new mount, IPC and UTS namespaces (and
//! a network namespace when the VM has no TAP), and `pivot_root` into `ROOT`, a fresh tmpfs holding only bind
//! mounts of the files and folders the VM uses, at the same paths as outside, so the
//! VM's configuration needs no rewriting. Everything else of the host's file system is
//! gone for the process.
//!
//! It must run while the process has one thread: namespaces and the root are per thread
//! in Linux, and threads started later inherit them.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// How a path is bound into the jail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read-only (kernel, initrd, firmware, read-only disks, host facts under /proc).
    ReadOnly,
    /// Read-write (disks, logs, the run folder where the sockets and exit status go).
    ReadWrite,
    /// A device node (/dev/kvm, /dev/net/tun): read-write, devices allowed.
    Device,
}

/// What goes into the jail.
#[derive(Clone, Debug, Default)]
pub struct JailSpec {
    /// The (empty) folder that becomes the root.
    pub root: PathBuf,
    /// Paths (absolute, existing) to bind at the same place inside.
    pub binds: Vec<(PathBuf, Access)>,
    /// Files the VMM holds open (descriptor, the absolute path to bind it at inside,
    /// access): the open file itself is bound, not whatever its name leads to now, for
    /// a machine that opens its files by name (riscv64's).
    pub held: Vec<(std::os::fd::RawFd, PathBuf, Access)>,
    /// A network namespace of its own (no host interfaces): for VMs without a TAP.
    pub new_net: bool,
    /// What a forbidden call of the waiting parent does (see [`enter`]).
    pub mode: Option<crate::Mode>,
    /// The user and group the waiting parent becomes.
    pub ids: Option<crate::Ids>,
    /// Resource limits for the VMM and its waiter (`--resource-limit`); without a
    /// `no-file` limit, [`JAIL_MAX_FILES`].
    pub rlimits: Vec<ResourceLimit>,
    /// The VMM's own cgroup and the limits in it (`--cgroup`).
    pub cgroup: Option<crate::cgroup::Spec>,
}

/// The smallest `fsize` limit. RLIMIT_FSIZE bounds memory files as any other, and the
/// emulator's code arenas are memory files: the VM's code memory for compiled blocks is
/// sized when its first vCPU is made, before the limit is set ([`apply_file_size_limit`]), but the
/// 1 MiB arena for host stubs is made later, on the vCPU's thread, as the guest first
/// needs one, and must fit under the limit.
pub const MIN_FILE_SIZE_LIMIT: u64 = 1 << 20;

/// The `fsize` limit the jail was given, set by [`apply_file_size_limit`] (0: none).
static FILE_SIZE_LIMIT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Sets the jail's `fsize` limit (RLIMIT_FSIZE), if it was given one. The VMM calls this
/// once its VM is built and before its vCPUs run: the limit bounds memory files too, and
/// the emulator's 64 MiB code arena per vCPU is a memory file sized when the vCPU is made,
/// so a limit set before that would leave the guest interpreted only (and would need a
/// floor of 128 MiB, which could not cap a console log). Until then nothing the guest
/// controls has written a byte.
pub fn apply_file_size_limit() -> Result<(), JailError> {
    let n = FILE_SIZE_LIMIT.swap(0, std::sync::atomic::Ordering::SeqCst);
    if n == 0 {
        return Ok(());
    }
    set_limit(libc::RLIMIT_FSIZE, n, n, "fsize")
}

/// A resource limit the jail sets (soft and hard) for the VMM, named as Firecracker's
/// jailer's `--resource-limit` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResourceLimit {
    /// `fsize=BYTES`: no file the VMM writes grows past this (RLIMIT_FSIZE). The VMM
    /// ignores SIGXFSZ, so a write past it fails (EFBIG: the guest sees an I/O error, a
    /// log stops growing) instead of killing the VMM.
    FileSize(u64),
    /// `no-file=N`: one more than the highest descriptor number the VMM may open
    /// (RLIMIT_NOFILE).
    OpenFiles(u64),
}

impl std::str::FromStr for ResourceLimit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, value) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected RESOURCE=VALUE (fsize=BYTES, no-file=N)"))?;
        let n: u64 = value
            .parse()
            .map_err(|_| format!("{value:?}: not a number"))?;
        match name {
            "fsize" if n < MIN_FILE_SIZE_LIMIT => Err(format!(
                "fsize={n}: at least {MIN_FILE_SIZE_LIMIT} (the emulator's host-stub arena is a memory file it bounds too)"
            )),
            "fsize" => Ok(ResourceLimit::FileSize(n)),
            "no-file" => Ok(ResourceLimit::OpenFiles(n)),
            _ => Err(format!("{name:?}: the resources are fsize and no-file")),
        }
    }
}

impl std::fmt::Display for ResourceLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResourceLimit::FileSize(n) => write!(f, "fsize={n}"),
            ResourceLimit::OpenFiles(n) => write!(f, "no-file={n}"),
        }
    }
}

/// Why the jail could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("the jail root {0} must be an existing, empty folder")]
    Root(PathBuf),
    #[error("{path}: {why}")]
    Path { path: PathBuf, why: String },
    #[error("the jail must be entered while the process has one thread (it has {0})")]
    Threads(usize),
    #[error("the VMM's cgroup: {0}")]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error("{step}: {source}")]
    Sys {
        step: String,
        #[source]
        source: io::Error,
    },
}

fn sys(step: impl Into<String>) -> impl FnOnce(io::Error) -> JailError {
    let step = step.into();
    move |source| JailError::Sys { step, source }
}

fn cstr(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::Path {
        path: p.into(),
        why: "contains a NUL byte".into(),
    })
}

fn check(rc: libc::c_int, step: impl Into<String>) -> Result<(), JailError> {
    if rc != 0 {
        return Err(sys(step)(io::Error::last_os_error()));
    }
    Ok(())
}

fn mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let src = src.map(cstr).transpose()?;
    let target_c = cstr(target)?;
    let fstype = fstype.map(|s| CString::new(s).unwrap_or_default());
    let data = data.map(|s| CString::new(s).unwrap_or_default());
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is a NUL-terminated string that outlives the call, or null
    // where mount(2) accepts null.
    let rc = unsafe {
        libc::mount(
            ptr(&src),
            target_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    check(rc, format!("mount on {}", target.display()))
}

/// The process's thread count (from /proc/self/status).
fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(1)
}

/// `path` with `.` and `..` resolved textually, refused when relative.
fn normal(path: &Path) -> Result<PathBuf, JailError> {
    if !path.is_absolute() {
        return Err(JailError::Path {
            path: path.into(),
            why: "not an absolute path".into(),
        });
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The binds to make, parents first, without those already inside a bound folder.
fn plan(binds: &[(PathBuf, Access)]) -> Result<Vec<(PathBuf, Access)>, JailError> {
    let mut v = binds
        .iter()
        .map(|(p, a)| Ok((normal(p)?, *a)))
        .collect::<Result<Vec<_>, JailError>>()?;
    if let Some((p, _)) = v.iter().find(|(p, _)| p == Path::new("/")) {
        return Err(JailError::Path {
            path: p.clone(),
            why: "the host's root cannot be bound into the jail".into(),
        });
    }
    v.sort_by_key(|(p, _)| p.components().count());
    let mut out: Vec<(PathBuf, Access)> = Vec::new();
    for (p, a) in v {
        let covered = out
            .iter()
            .any(|(q, qa)| p.starts_with(q) && (*qa == a || *qa == Access::ReadWrite));
        if !covered {
            out.push((p, a));
        }
    }
    Ok(out)
}

/// Enters the jail `spec` describes. See the module's documentation.
///
/// The VMM goes on in a child, process 1 of a new PID namespace (it sees no other
/// process). The process that called this stays outside as the child's waiter — the PID
/// the caller's parent (the manager) knows — and never returns: it confines itself
/// (NoNewPrivs, no capabilities, `spec.ids`, a filter allowing only `wait4`, `kill` of
/// the child and exit), passes SIGTERM, SIGINT and SIGHUP on to the child, and exits
/// with the child's status (128 + the signal when a signal killed it). The child dies
/// with its waiter (PR_SET_PDEATHSIG).
pub fn enter(spec: &JailSpec) -> Result<(), JailError> {
    let n = threads();
    if n != 1 {
        return Err(JailError::Threads(n));
    }
    // Before the fork: the waiter is limited and in the group too, and the VMM never
    // runs outside them (its `fsize` is set once its VM is built, before the guest runs).
    set_limits(&spec.rlimits)?;
    if let Some(cg) = &spec.cgroup {
        crate::cgroup::enter(cg)?;
    }
    split_pid_namespace(spec)?;
    let root = normal(&spec.root)?;
    let empty = std::fs::read_dir(&root)
        .map(|mut d| d.next().is_none())
        .unwrap_or(false);
    if !empty {
        return Err(JailError::Root(root));
    }
    let binds = plan(&spec.binds)?;
    // SAFETY: umask only sets the process's mask (one thread, checked above).
    let umask = unsafe { libc::umask(0o022) };
    let r = build_and_enter(spec, &root, &binds);
    // SAFETY: as above.
    unsafe { libc::umask(umask) };
    r
}

/// Descriptors a jailed VMM may hold: its disks, TAPs, eventfds, API connections (at most
/// 512, three descriptors each) and the guest's vsock connections, with room to spare.
/// A guest that opens vsock connections without end runs into this, not the host's
/// limit.
pub const JAIL_MAX_FILES: u64 = 4096;

/// Sets `limits`, and RLIMIT_NOFILE at [`JAIL_MAX_FILES`] (or below the hard limit
/// already set) when they have no `no-file`.
fn set_limits(limits: &[ResourceLimit]) -> Result<(), JailError> {
    if !limits
        .iter()
        .any(|l| matches!(l, ResourceLimit::OpenFiles(_)))
    {
        let mut now = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit, valid for the call.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) };
        check(rc, "reading RLIMIT_NOFILE")?;
        let max = now.rlim_max.min(JAIL_MAX_FILES);
        set_limit(libc::RLIMIT_NOFILE, now.rlim_cur.min(max), max, "no-file")?;
    }
    for l in limits {
        match *l {
            ResourceLimit::FileSize(n) => {
                // SAFETY: SIG_IGN for SIGXFSZ; no handler runs.
                if unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) } == libc::SIG_ERR {
                    return Err(sys("ignoring SIGXFSZ")(io::Error::last_os_error()));
                }
                // Set once the VM is built: see `apply_file_size_limit`.
                FILE_SIZE_LIMIT.store(n.max(1), std::sync::atomic::Ordering::SeqCst);
            }
            ResourceLimit::OpenFiles(n) => set_limit(libc::RLIMIT_NOFILE, n, n, "no-file")?,
        }
    }
    Ok(())
}

fn set_limit(
    resource: libc::__rlimit_resource_t,
    cur: u64,
    max: u64,
    name: &str,
) -> Result<(), JailError> {
    let new = libc::rlimit {
        rlim_cur: cur,
        rlim_max: max,
    };
    // SAFETY: setrlimit reads one rlimit, valid for the call.
    let rc = unsafe { libc::setrlimit(resource, &new) };
    check(rc, format!("setting the {name} limit to {max}"))
}

/// The child's PID, for the waiter's signal handler.
static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let child = CHILD.load(std::sync::atomic::Ordering::Relaxed);
    if child > 0 {
        // SAFETY: kill(2) is async-signal-safe and touches no memory.
        unsafe { libc::kill(child, sig) };
    }
}

/// Forks into a new PID namespace; returns in the child, waits in the parent.
fn split_pid_namespace(spec: &JailSpec) -> Result<(), JailError> {
    // SAFETY: unshare takes flags only; the process has one thread.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWPID) };
    check(rc, "unshare (PID namespace)")?;
    // The child learns of a waiter that died before PR_SET_PDEATHSIG took hold: the
    // pipe's only writer is gone.
    let mut pipe = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into `pipe`.
    let rc = unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) };
    check(rc, "pipe")?;
    let [alive_r, alive_w] = pipe;
    // SAFETY: the process has one thread, so the child is a full copy that may go on
    // running Rust code.
    let child = unsafe { libc::fork() };
    match child {
        -1 => Err(sys("fork")(io::Error::last_os_error())),
        0 => {
            // SAFETY: integer arguments; close on descriptors this process owns; poll
            // on one pollfd it owns.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                libc::close(alive_w);
                let mut p = libc::pollfd {
                    fd: alive_r,
                    events: libc::POLLIN,
                    revents: 0,
                };
                if libc::poll(&mut p, 1, 0) > 0 && p.revents & libc::POLLHUP != 0 {
                    libc::_exit(1);
                }
                libc::close(alive_r);
            }
            crate::JAILED.store(true, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
        child => {
            // SAFETY: closing a descriptor this process owns.
            unsafe { libc::close(alive_r) };
            wait_for(child, spec)
        }
    }
}

/// The waiter: see [`enter`]. Never returns.
fn wait_for(child: libc::pid_t, spec: &JailSpec) -> ! {
    CHILD.store(child, std::sync::atomic::Ordering::Relaxed);
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction with a handler that only calls kill(2).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = forward as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    if let Err(e) = crate::confine_waiter(child, spec.mode, spec.ids) {
        eprintln!("vessel: cannot confine the jail's waiter: {e}");
        // SAFETY: kill and _exit take integers.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::_exit(1);
        }
    }
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes one int into `status`.
        let r = unsafe { libc::waitpid(child, &mut status, 0) };
        if r == child {
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else if libc::WIFSIGNALED(status) {
                128 + libc::WTERMSIG(status)
            } else {
                continue;
            };
            // SAFETY: _exit takes an integer; nothing of this process needs flushing.
            unsafe { libc::_exit(code) };
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // SAFETY: as above.
            unsafe { libc::_exit(1) };
        }
    }
}

/// [`enter`] once checked, with a umask that leaves the folders leading to each bound
/// path searchable (0755): a daemon's 077 would keep the VMM's unprivileged user from
/// reaching its own run folder.
fn build_and_enter(
    spec: &JailSpec,
    root: &Path,
    binds: &[(PathBuf, Access)],
) -> Result<(), JailError> {
    // Relative paths in the VM's configuration resolve from the same folder inside.
    let cwd = std::env::current_dir().ok();
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if spec.new_net {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: unshare takes flags only; the process has one thread (checked above).
    check(unsafe { libc::unshare(flags) }, "unshare (namespaces)")?;
    // Nothing mounted here propagates back to the host.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("mode=0755,size=1m"),
    )?;
    for (path, access) in binds {
        bind(root, path, *access)?;
    }
    for (fd, at, access) in &spec.held {
        let at = normal(at)?;
        // A mount of another namespace cannot be bound (EINVAL): the file is reached
        // again in this one, where it is now, and must be the same file.
        let here = reopen_here(*fd, &at)?;
        use std::os::fd::AsRawFd;
        let source = format!("/proc/self/fd/{}", here.as_raw_fd());
        bind_at(root, Path::new(&source), &at, *access)?;
    }
    if let Some(rel) = cwd.as_deref().and_then(|c| c.strip_prefix("/").ok()) {
        // Inside a bound folder it exists already (nothing is made on the host).
        let _ = std::fs::create_dir_all(root.join(rel));
    }
    let old = root.join(".old");
    std::fs::create_dir(&old).map_err(sys("creating the old root's mount point"))?;
    let (new_c, old_c) = (cstr(root)?, cstr(&old)?);
    // SAFETY: two NUL-terminated paths valid for the call.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, new_c.as_ptr(), old_c.as_ptr()) };
    check(rc as libc::c_int, "pivot_root")?;
    std::env::set_current_dir("/").map_err(sys("chdir /"))?;
    let old_in = cstr(Path::new("/.old"))?;
    // SAFETY: a NUL-terminated path valid for the call.
    let rc = unsafe { libc::umount2(old_in.as_ptr(), libc::MNT_DETACH) };
    check(rc, "unmounting the old root")?;
    std::fs::remove_dir("/.old").map_err(sys("removing the old root's mount point"))?;
    if let Some(cwd) = &cwd {
        let _ = std::env::set_current_dir(cwd);
    }
    // The new root itself read-only: nothing but the bound paths can be written.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    tracing::debug!(binds = binds.len(), net = spec.new_net, "entered the jail");
    Ok(())
}

/// The file held open as `fd`, opened again (`O_PATH`) where it is now, in the mount
/// namespace this process has entered; refused unless it is that very file (device and
/// inode). `at` names it in errors.
fn reopen_here(fd: std::os::fd::RawFd, at: &Path) -> Result<std::fs::File, JailError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let err = |why: String| JailError::Path {
        path: at.into(),
        why,
    };
    let held = std::fs::metadata(format!("/proc/self/fd/{fd}"))
        .map_err(|e| err(format!("the file handed over as descriptor {fd}: {e}")))?;
    let now = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map_err(|e| err(format!("where descriptor {fd} is: {e}")))?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(&now)
        .map_err(|e| err(format!("{}: {e}", now.display())))?;
    let meta = f.metadata().map_err(|e| err(e.to_string()))?;
    if (meta.dev(), meta.ino()) != (held.dev(), held.ino()) {
        return Err(err(format!(
            "{} is no longer the file handed over as descriptor {fd}",
            now.display()
        )));
    }
    Ok(f)
}

/// Binds `path` at the same place under `root` with `access`.
fn bind(root: &Path, path: &Path, access: Access) -> Result<(), JailError> {
    bind_at(root, path, path, access)
}

/// Binds `path` (a name, or an open file's `/proc/self/fd/N`) at `at` under `root`.
fn bind_at(root: &Path, path: &Path, at: &Path, access: Access) -> Result<(), JailError> {
    let meta = std::fs::metadata(path).map_err(|e| JailError::Path {
        path: path.into(),
        why: e.to_string(),
    })?;
    let rel = at.strip_prefix("/").unwrap_or(at);
    let target = root.join(rel);
    // A mount point inside a folder bound before is that folder's own file (same paths):
    // it exists, and nothing is created (or truncated) on the host.
    if meta.is_dir() {
        std::fs::create_dir_all(&target).map_err(sys(format!("creating {}", target.display())))?;
    } else if !target.exists() {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(sys(format!("creating {}", parent.display())))?;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)
            .map_err(sys(format!("creating {}", target.display())))?;
    }
    // Not recursive: what is mounted below a bound folder (the jail root itself, when it
    // lies in a bound run folder) stays out.
    mount(Some(path), &target, None, libc::MS_BIND, None)?;
    let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NOEXEC;
    match access {
        Access::ReadOnly => flags |= libc::MS_RDONLY | libc::MS_NODEV,
        Access::ReadWrite => flags |= libc::MS_NODEV,
        Access::Device => {}
    }
    mount(None, &target, None, flags, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_inside_a_bound_folder_are_left_out() {
        let p = |s: &str| PathBuf::from(s);
        let got = plan(&[
            (p("/run/vm/log"), Access::ReadWrite),
            (p("/run/vm"), Access::ReadWrite),
            (p("/img/k"), Access::ReadOnly),
            (p("/img"), Access::ReadOnly),
            (p("/img/disk"), Access::ReadWrite),
            (p("/a/../dev/kvm"), Access::Device),
        ])
        .unwrap();
        assert_eq!(
            got,
            vec![
                (p("/img"), Access::ReadOnly),
                (p("/run/vm"), Access::ReadWrite),
                (p("/img/disk"), Access::ReadWrite),
                (p("/dev/kvm"), Access::Device),
            ]
        );
        assert!(plan(&[(p("relative"), Access::ReadOnly)]).is_err());
        assert!(plan(&[(p("/x/.."), Access::ReadOnly)]).is_err());
    }

    #[test]
    fn resource_limits_are_named_as_firecrackers_jailer_names_them() {
        assert_eq!(
            "fsize=250000000".parse::<ResourceLimit>(),
            Ok(ResourceLimit::FileSize(250_000_000))
        );
        assert!("fsize=65536".parse::<ResourceLimit>().is_err());
        assert_eq!(
            "no-file=1024".parse::<ResourceLimit>(),
            Ok(ResourceLimit::OpenFiles(1024))
        );
        for bad in ["nofile=1", "fsize", "fsize=-1", "fsize=1k"] {
            assert!(bad.parse::<ResourceLimit>().is_err(), "{bad}");
        }
        assert_eq!(ResourceLimit::OpenFiles(7).to_string(), "no-file=7");
    }
}
