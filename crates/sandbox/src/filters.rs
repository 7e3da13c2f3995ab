//! The allowlists: which system calls each kind of VMM thread may make, built from what
//! those threads were seen to call (`strace -f` of boots with every device, the API and
//! console sockets, the KVM, emu and hybrid accelerators, and firmware boots; see
//! docs/SECURITY.md).
//!
//! Every thread gets three filters (seccomp runs them all and the strictest answer wins):
//! - `clone3` fails with ENOSYS, so glibc falls back to `clone`, whose flags a filter can
//!   see (`clone3` passes them in memory);
//! - in the roles that open no files (all but the main thread and the API), `openat`
//!   fails with EACCES (glibc's malloc reads `/proc/sys/vm/overcommit_memory` once, from
//!   whichever thread first shrinks an arena, and copes with the failure);
//! - the role's allowlist; anything else is the mode's action.
//!
//! Once the VM is built every thread gets a fourth ([`pinned`]): KVM's and the TAPs'
//! requests only on the descriptors they belong to.

use std::collections::BTreeMap;
use std::os::fd::RawFd;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule,
};

use crate::{ioctls, Error, Mode};

/// The kinds of threads in a VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The thread that built the VM and waits for its end (and, after that, removes its
    /// sockets and writes its exit status).
    Main,
    /// A vCPU: runs guest code (KVM_RUN, or the emulator and its compiler) and the
    /// device registers the guest touches.
    Vcpu,
    /// A device's I/O thread (virtio queues, disks, TAP) and emu's irqfd thread.
    Io,
    /// vsock's I/O thread: also connects to the host's Unix sockets (`UDS_PORT`).
    Vsock,
    /// The API socket's acceptor and its connections.
    Api,
    /// Serial console plumbing: standard input, the console socket and its log.
    Console,
}

impl Role {
    /// Whether threads of this role open files after they are confined: the main thread
    /// (its exit status), and the API, which opens the files it is given to check them
    /// (`/boot-source`, `/drives`) and to write to (`/logger`, `/metrics`).
    fn opens_files(self) -> bool {
        matches!(self, Role::Main | Role::Api)
    }

    pub const ALL: [Role; 6] = [
        Role::Main,
        Role::Vcpu,
        Role::Io,
        Role::Vsock,
        Role::Api,
        Role::Console,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::Main => "main",
            Role::Vcpu => "vcpu",
            Role::Io => "io",
            Role::Vsock => "vsock",
            Role::Api => "api",
            Role::Console => "console",
        }
    }

    pub fn from_name(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == name)
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// Every role's compiled filters.
pub(crate) struct Programs {
    clone3: BpfProgram,
    no_open: BpfProgram,
    allow: Vec<Option<BpfProgram>>,
}

impl Programs {
    pub(crate) fn build(mode: Mode) -> Result<Programs, Error> {
        let mismatch = match mode {
            Mode::None => None,
            Mode::Log => Some(SeccompAction::Log),
            Mode::Trap => Some(SeccompAction::Trap),
            Mode::Kill => Some(SeccompAction::KillProcess),
        };
        let compile = |role: &'static str, rules, mismatch, matched| {
            let f = SeccompFilter::new(rules, mismatch, matched, arch())
                .map_err(|source| Error::BuildFilter { role, source })?;
            BpfProgram::try_from(f).map_err(|source| Error::BuildFilter { role, source })
        };
        let clone3 = compile(
            "every",
            [(libc::SYS_clone3, vec![])].into_iter().collect(),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
        )?;
        let no_open = compile(
            "every",
            [(libc::SYS_openat, vec![]), (libc::SYS_open, vec![])]
                .into_iter()
                .collect(),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EACCES as u32),
        )?;
        let mut allow = Vec::new();
        for role in Role::ALL {
            allow.push(match &mismatch {
                None => None,
                Some(action) => Some(compile(
                    role.name(),
                    rules(role)?,
                    action.clone(),
                    SeccompAction::Allow,
                )?),
            });
        }
        Ok(Programs {
            clone3,
            no_open,
            allow,
        })
    }

    /// The filters a thread of `role` installs, in order (none in [`Mode::None`]).
    pub(crate) fn for_role(&self, role: Role) -> Vec<&BpfProgram> {
        let Some(Some(allow)) = self.allow.get(role.index()) else {
            return Vec::new();
        };
        let mut v = vec![&self.clone3];
        if !role.opens_files() {
            v.push(&self.no_open);
        }
        v.push(allow);
        v
    }
}

/// The fourth filter, once the VM is built (`crate::pin_fds`): KVM's and the TAPs'
/// requests only on the descriptors they belong to. vCPU requests on `own_vcpu` alone
/// for a vCPU thread (none for one without a KVM vCPU: emu's), on any of the VM's vCPUs
/// for the API's (a snapshot reads them all), on none for the others; the VM's requests
/// (interrupts, eventfds, memory slots, dirty log, interrupt controllers' state) on the
/// VM's descriptor alone, in every role; a TAP's (offloads, header size, queues) on the
/// VM's TAP queues alone (none where it has no TAP). The role's allowlist still decides
/// which requests a role makes at all; this one only says where. A request on another
/// descriptor gets the mode's action, as a forbidden call does. None in [`Mode::None`].
pub(crate) fn pinned(
    mode: Mode,
    role: Role,
    own_vcpu: Option<RawFd>,
    fds: &crate::VmFds,
) -> Result<Option<BpfProgram>, Error> {
    let action = match mode {
        Mode::None => return Ok(None),
        Mode::Log => SeccompAction::Log,
        Mode::Trap => SeccompAction::Trap,
        Mode::Kill => SeccompAction::KillProcess,
    };
    let vcpus: Vec<RawFd> = match role {
        Role::Vcpu => own_vcpu.into_iter().collect(),
        Role::Api => fds.vcpus.clone(),
        _ => Vec::new(),
    };
    let mut held = Held {
        vcpus,
        vm: fds.vm,
        taps: fds.taps.clone(),
    };
    let mut compiled = compile_pinned(&action, role, &held);
    // Many vCPUs or TAP queues whose descriptors are far apart (the API's filter names
    // every vCPU): all the numbers from the lowest one's to the highest's, the vCPUs'
    // first.
    for widen in [Held::vcpus_as_range, Held::taps_as_range] {
        if let Err(seccompiler::BackendError::FilterTooLarge(len)) = compiled {
            tracing::debug!(role = role.name(), len, "descriptors as one range");
            widen(&mut held);
            compiled = compile_pinned(&action, role, &held);
        }
    }
    compiled.map_err(|source| Error::BuildFilter {
        role: role.name(),
        source,
    })
}

/// The descriptors a [`pinned`] filter holds requests to.
struct Held {
    vcpus: Vec<RawFd>,
    vm: Option<RawFd>,
    taps: Vec<RawFd>,
}

impl Held {
    fn vcpus_as_range(&mut self) {
        self.vcpus = hull(&self.vcpus);
    }

    fn taps_as_range(&mut self) {
        self.taps = hull(&self.taps);
    }
}

/// Every number from the lowest of `fds` to the highest.
fn hull(fds: &[RawFd]) -> Vec<RawFd> {
    match (fds.iter().min(), fds.iter().max()) {
        (Some(&lo), Some(&hi)) => (lo..=hi).collect(),
        _ => Vec::new(),
    }
}

/// [`pinned`]'s filter for the descriptors in `held`, covering the requests `role`
/// makes at all (its allowlist refuses the others anywhere). None when the role makes
/// none of these requests (emu's main thread): seccompiler reads a system call with no
/// rules as one that always matches, which would refuse every ioctl.
fn compile_pinned(
    action: &SeccompAction,
    role: Role,
    held: &Held,
) -> Result<Option<BpfProgram>, seccompiler::BackendError> {
    let made = ioctls::allowed(role);
    let vm: Vec<RawFd> = held.vm.into_iter().collect();
    let either: Vec<RawFd> = held.vcpus.iter().chain(&vm).copied().collect();
    let classes: [(Vec<u64>, &[RawFd]); 4] = [
        (ioctls::on_vcpu(), &held.vcpus),
        (ioctls::ON_VM.to_vec(), &vm),
        (ioctls::ON_VM_OR_VCPU.to_vec(), &either),
        (ioctls::ON_TAP.to_vec(), &held.taps),
    ];
    let mut forbidden = Vec::new();
    for (requests, allowed) in classes {
        for nr in requests.into_iter().filter(|nr| made.contains(nr)) {
            forbidden.extend(outside(nr, allowed)?);
        }
    }
    if forbidden.is_empty() {
        return Ok(None);
    }
    let rules: Rules = [(libc::SYS_ioctl, forbidden)].into_iter().collect();
    let f = SeccompFilter::new(rules, SeccompAction::Allow, action.clone(), arch())?;
    BpfProgram::try_from(f).map(Some)
}

/// Rules that match `ioctl` request `nr` on any descriptor but `fds`: below the lowest,
/// in each gap between runs of consecutive numbers, above the highest (a few rules
/// whatever the number of descriptors, when they were made one after another).
fn outside(nr: u64, fds: &[RawFd]) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let is_nr = || SeccompCondition::new(1, Len::Dword, Op::Eq, nr);
    let fd = |op, v| SeccompCondition::new(0, Len::Dword, op, v);
    let mut sorted: Vec<u64> = fds
        .iter()
        .filter_map(|&fd| u32::try_from(fd).ok())
        .map(u64::from)
        .collect();
    sorted.sort_unstable();
    sorted.dedup();
    let (Some(&lowest), Some(&highest)) = (sorted.first(), sorted.last()) else {
        return Ok(vec![SeccompRule::new(vec![is_nr()?])?]);
    };
    let mut rules = Vec::new();
    if lowest > 0 {
        rules.push(SeccompRule::new(vec![is_nr()?, fd(Op::Lt, lowest)?])?);
    }
    for pair in sorted.windows(2) {
        if let [a, b] = *pair {
            if b > a + 1 {
                rules.push(SeccompRule::new(vec![
                    is_nr()?,
                    fd(Op::Gt, a)?,
                    fd(Op::Lt, b)?,
                ])?);
            }
        }
    }
    rules.push(SeccompRule::new(vec![is_nr()?, fd(Op::Gt, highest)?])?);
    Ok(rules)
}

/// The jail's waiting parent (see `jail::enter`): wait for `child`, pass signals on to
/// it, exit. It has no SIGSYS handler, so a forbidden call kills it (KILL_PROCESS) in
/// both trap and kill modes; none in [`Mode::None`].
pub(crate) fn waiter(mode: Mode, child: libc::pid_t) -> Result<Option<BpfProgram>, Error> {
    let mismatch = match mode {
        Mode::None => return Ok(None),
        Mode::Log => SeccompAction::Log,
        Mode::Trap | Mode::Kill => SeccompAction::KillProcess,
    };
    let mut r = Rules::new();
    allow(
        &mut r,
        &[
            libc::SYS_wait4,
            libc::SYS_rt_sigreturn,
            libc::SYS_restart_syscall,
            libc::SYS_exit_group,
            libc::SYS_exit,
        ],
    );
    allow_if(
        &mut r,
        libc::SYS_kill,
        vec![rule(vec![cond(0, Len::Dword, Op::Eq, child as u64)?])?],
    );
    let f = SeccompFilter::new(r, mismatch, SeccompAction::Allow, arch()).map_err(|source| {
        Error::BuildFilter {
            role: "waiter",
            source,
        }
    })?;
    BpfProgram::try_from(f)
        .map(Some)
        .map_err(|source| Error::BuildFilter {
            role: "waiter",
            source,
        })
}

fn arch() -> seccompiler::TargetArch {
    seccompiler::TargetArch::x86_64
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn cond(arg: u8, len: Len, op: Op, value: u64) -> Result<SeccompCondition, Error> {
    SeccompCondition::new(arg, len, op, value).map_err(|source| Error::BuildFilter {
        role: "every",
        source,
    })
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, Error> {
    SeccompRule::new(conds).map_err(|source| Error::BuildFilter {
        role: "every",
        source,
    })
}

/// Allows `nrs` whatever their arguments.
fn allow(r: &mut Rules, nrs: &[libc::c_long]) {
    for &nr in nrs {
        r.insert(nr, Vec::new());
    }
}

/// Allows `nr` when any of `rules` matches (an empty list would allow it outright).
fn allow_if(r: &mut Rules, nr: libc::c_long, rules: Vec<SeccompRule>) {
    r.entry(nr).or_default().extend(rules);
}

/// `ioctl` for `role`: only the requests that role makes, each by its exact number
/// (`ioctls::allowed`).
fn ioctl_rules(role: Role) -> Result<Vec<SeccompRule>, Error> {
    ioctls::allowed(role)
        .into_iter()
        .map(|nr| rule(vec![cond(1, Len::Dword, Op::Eq, nr)?]))
        .collect()
}

/// What every thread does: memory (never writable and executable at once), locks,
/// time, signals, reading and writing the descriptors it was given, thread start and
/// end, and confining the threads it starts.
fn common(r: &mut Rules) -> Result<(), Error> {
    allow(
        r,
        &[
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_readv,
            libc::SYS_writev,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_preadv2,
            libc::SYS_pwritev2,
            libc::SYS_lseek,
            libc::SYS_close,
            libc::SYS_fstat,
            libc::SYS_fcntl,
            libc::SYS_eventfd2,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_futex,
            libc::SYS_sched_yield,
            libc::SYS_sched_getaffinity,
            libc::SYS_nanosleep,
            libc::SYS_clock_nanosleep,
            libc::SYS_clock_gettime,
            libc::SYS_clock_getres,
            libc::SYS_gettimeofday,
            // Its own context switches: whether a write on a vCPU had to sleep.
            libc::SYS_getrusage,
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_getuid,
            libc::SYS_getgid,
            libc::SYS_geteuid,
            libc::SYS_getegid,
            libc::SYS_getrandom,
            libc::SYS_rt_sigprocmask,
            libc::SYS_rt_sigreturn,
            libc::SYS_sigaltstack,
            libc::SYS_restart_syscall,
            libc::SYS_munmap,
            libc::SYS_madvise,
            libc::SYS_mremap,
            libc::SYS_brk,
            libc::SYS_rseq,
            libc::SYS_set_robust_list,
            libc::SYS_exit,
            libc::SYS_exit_group,
            // Confining threads started by a confined thread (filters only narrow).
            libc::SYS_capget,
            libc::SYS_seccomp,
            // Made to fail with ENOSYS by the first filter.
            libc::SYS_clone3,
        ],
    );
    // W^X: never a mapping both writable and executable.
    let prot = libc::PROT_WRITE as u64 | libc::PROT_EXEC as u64;
    for nr in [libc::SYS_mmap, libc::SYS_mprotect] {
        allow_if(
            r,
            nr,
            vec![
                rule(vec![cond(2, Len::Dword, Op::MaskedEq(prot), 0)?])?,
                rule(vec![cond(
                    2,
                    Len::Dword,
                    Op::MaskedEq(prot),
                    libc::PROT_WRITE as u64,
                )?])?,
                rule(vec![cond(
                    2,
                    Len::Dword,
                    Op::MaskedEq(prot),
                    libc::PROT_EXEC as u64,
                )?])?,
            ],
        );
    }
    // Threads, never processes.
    let thread = libc::CLONE_THREAD as u64;
    allow_if(
        r,
        libc::SYS_clone,
        vec![rule(vec![cond(
            0,
            Len::Qword,
            Op::MaskedEq(thread),
            thread,
        )?])?],
    );
    // Naming a new thread, NoNewPrivs before a filter.
    let mut prctls = Vec::new();
    for op in [
        libc::PR_SET_NAME,
        libc::PR_GET_NAME,
        libc::PR_SET_NO_NEW_PRIVS,
    ] {
        prctls.push(rule(vec![cond(0, Len::Dword, Op::Eq, op as u64)?])?);
    }
    allow_if(r, libc::SYS_prctl, prctls);
    // Kicking a vCPU thread: signals only to this process's own threads.
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u64;
    allow_if(
        r,
        libc::SYS_tgkill,
        vec![rule(vec![cond(0, Len::Dword, Op::Eq, pid)?])?],
    );
    Ok(())
}

/// Serving on sockets bound before: the API and console sockets, vsock's listener.
fn serve_sockets(r: &mut Rules) {
    allow(
        r,
        &[
            libc::SYS_accept4,
            libc::SYS_sendto,
            libc::SYS_recvfrom,
            libc::SYS_sendmsg,
            libc::SYS_recvmsg,
            libc::SYS_shutdown,
            libc::SYS_getsockopt,
            libc::SYS_setsockopt,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
        ],
    );
}

/// Connecting to Unix sockets by path (vsock's guest-initiated connections) — the only
/// thread that reaches the host's file system after setup, besides the main thread.
fn connect_unix_sockets(r: &mut Rules) -> Result<(), Error> {
    serve_sockets(r);
    allow(r, &[libc::SYS_connect]);
    allow_if(
        r,
        libc::SYS_socket,
        vec![rule(vec![cond(
            0,
            Len::Dword,
            Op::Eq,
            libc::AF_UNIX as u64,
        )?])?],
    );
    Ok(())
}

fn rules(role: Role) -> Result<Rules, Error> {
    let mut r = Rules::new();
    common(&mut r)?;
    allow_if(&mut r, libc::SYS_ioctl, ioctl_rules(role)?);
    // In the roles that open no files, answered with EACCES by the second filter (the
    // allowlist must let them through for that answer to be the one that counts).
    allow(&mut r, &[libc::SYS_openat]);
    match role {
        Role::Vcpu => {
            allow(
                &mut r,
                &[
                    // The compiler's W^X code arenas (a memfd mapped twice).
                    libc::SYS_memfd_create,
                    libc::SYS_ftruncate,
                    // The hybrid accelerator's per-thread timer and its signal.
                    libc::SYS_timer_create,
                    libc::SYS_timer_settime,
                    libc::SYS_timer_gettime,
                    libc::SYS_timer_delete,
                    libc::SYS_rt_sigaction,
                    libc::SYS_fsync,
                    libc::SYS_fdatasync,
                ],
            );
        }
        Role::Io | Role::Vsock => {
            allow(
                &mut r,
                &[
                    libc::SYS_fsync,
                    libc::SYS_fdatasync,
                    libc::SYS_fallocate,
                    libc::SYS_ftruncate,
                    libc::SYS_timerfd_create,
                    libc::SYS_timerfd_settime,
                    libc::SYS_timerfd_gettime,
                ],
            );
            if role == Role::Vsock {
                connect_unix_sockets(&mut r)?;
            }
        }
        Role::Api => {
            // Before InstanceStart the API checks that the files it is given exist (the
            // VM is then built on the main thread, also one restored by
            // `PUT /snapshot/load`), and opens a drive PATCHed in at run time (its path
            // canonicalized).
            allow(
                &mut r,
                &[
                    libc::SYS_statx,
                    libc::SYS_newfstatat,
                    libc::SYS_readlink,
                    libc::SYS_readlinkat,
                    libc::SYS_getcwd,
                    // `PUT /snapshot/create` writes the state and memory files under
                    // temporary names, synced, then renamed (or removed on failure).
                    libc::SYS_ftruncate,
                    libc::SYS_fallocate,
                    libc::SYS_lseek,
                    libc::SYS_pwrite64,
                    libc::SYS_fsync,
                    libc::SYS_fdatasync,
                    libc::SYS_fchmod,
                    libc::SYS_rename,
                    libc::SYS_renameat,
                    libc::SYS_renameat2,
                    libc::SYS_unlink,
                    libc::SYS_unlinkat,
                ],
            );
            serve_sockets(&mut r);
            // `PUT /migration/send` connects to the destination VMM (Unix or TCP).
            allow(&mut r, &[libc::SYS_connect]);
            let families = [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6]
                .into_iter()
                .map(|f| rule(vec![cond(0, Len::Dword, Op::Eq, f as u64)?]))
                .collect::<Result<Vec<_>, _>>()?;
            allow_if(&mut r, libc::SYS_socket, families);
        }
        Role::Console => serve_sockets(&mut r),
        Role::Main => {
            allow(
                &mut r,
                &[
                    libc::SYS_openat,
                    libc::SYS_unlink,
                    libc::SYS_unlinkat,
                    libc::SYS_statx,
                    libc::SYS_newfstatat,
                    libc::SYS_fsync,
                    libc::SYS_fdatasync,
                    libc::SYS_ftruncate,
                    libc::SYS_rt_sigaction,
                    libc::SYS_timer_delete,
                ],
            );
            serve_sockets(&mut r);
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_compiles_in_every_mode() {
        for mode in [Mode::Log, Mode::Trap, Mode::Kill] {
            let p = Programs::build(mode).unwrap();
            for role in Role::ALL {
                assert!(!p.for_role(role).is_empty(), "{role:?}");
                assert_eq!(Role::from_name(role.name()), Some(role));
            }
        }
        let none = Programs::build(Mode::None).unwrap();
        assert!(none.for_role(Role::Vcpu).is_empty());
    }

    /// Runs `ioctl(-1, request)` in a child process confined to `role` (kill mode): true
    /// when the filter let the call through (it then fails with EBADF).
    fn ioctl_allowed(role: Role, request: u64) -> bool {
        let p = Programs::build(Mode::Kill).unwrap();
        let prog: BpfProgram = (*p.for_role(role).last().unwrap()).clone();
        ioctl_allowed_under(&[prog], -1, request)
    }

    /// Runs `ioctl(fd, request)` in a child process under `progs` (kill mode): true when
    /// the filters let the call through (it then fails: `fd` is not open).
    fn ioctl_allowed_under(progs: &[BpfProgram], fd: i32, request: u64) -> bool {
        // SAFETY: the child only installs prepared filters, makes one system call and
        // exits (no allocation, no locks); the parent waits for that child.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                for prog in progs {
                    let f = libc::sock_fprog {
                        len: prog.len() as u16,
                        filter: prog.as_ptr() as *mut libc::sock_filter,
                    };
                    // seccomp(2), as seccompiler installs them (each filter allows it;
                    // prctl(PR_SET_SECCOMP) it does not).
                    let set_filter = 1; // SECCOMP_SET_MODE_FILTER
                    if libc::syscall(libc::SYS_seccomp, set_filter, 0, &f) != 0 {
                        libc::_exit(3);
                    }
                }
                libc::ioctl(fd, request as libc::c_ulong);
                libc::_exit(0);
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
                    || libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
                "{fd} {request:#x}: status {status:#x}"
            );
            libc::WIFEXITED(status)
        }
    }

    /// Issue 22: once the VM is built, a vCPU thread makes vCPU requests on its own
    /// vCPU's descriptor only, and every thread makes the VM's requests on the VM's
    /// descriptor only; the API's reads any of the VM's vCPUs (not other descriptors).
    /// Descriptor numbers need not be open: the filter decides before the kernel looks.
    #[test]
    fn kvm_requests_are_held_to_their_descriptors() {
        use ioctls::*;
        let p = Programs::build(Mode::Kill).unwrap();
        let role_filter = |role: Role| (*p.for_role(role).last().unwrap()).clone();
        // The VM on 900, vCPUs on 901, 902 and 905 (not made one after another).
        let fds = crate::VmFds {
            vm: Some(900),
            vcpus: vec![901, 902, 905],
            taps: vec![910, 911, 914],
        };
        let vcpu = [
            role_filter(Role::Vcpu),
            pinned(Mode::Kill, Role::Vcpu, Some(902), &fds)
                .unwrap()
                .unwrap(),
        ];
        for (fd, req, ok) in [
            (902, KVM_RUN, true),
            (902, KVM_GET_REGS, true),
            (902, KVM_SET_SREGS, true),
            (902, KVM_GET_TSC_KHZ, true),
            (900, KVM_GET_TSC_KHZ, true),
            (901, KVM_RUN, false),
            (905, KVM_GET_REGS, false),
            (900, KVM_SET_REGS, false),
            (903, KVM_RUN, false),
            (-1, KVM_RUN, false),
            (0, KVM_GET_REGS, false),
            (900, KVM_IRQ_LINE, true),
            (900, KVM_IOEVENTFD, true),
            (900, KVM_SET_USER_MEMORY_REGION, true),
            (902, KVM_IRQ_LINE, false),
            (901, KVM_IRQFD, false),
            (3, KVM_SIGNAL_MSI, false),
            (901, KVM_GET_TSC_KHZ, false),
            // Not KVM's: any descriptor, as the role allows.
            (7, FIONBIO, true),
            (902, FIONBIO, true),
        ] {
            assert_eq!(
                ioctl_allowed_under(&vcpu, fd, req),
                ok,
                "vcpu on 902: {req:#x} on {fd}"
            );
        }
        // Without a KVM vCPU (emu), none of a vCPU's requests anywhere.
        let emu = [
            role_filter(Role::Vcpu),
            pinned(Mode::Kill, Role::Vcpu, None, &crate::VmFds::default())
                .unwrap()
                .unwrap(),
        ];
        for fd in [0, 5, 902] {
            assert!(
                !ioctl_allowed_under(&emu, fd, KVM_RUN),
                "emu KVM_RUN on {fd}"
            );
            assert!(!ioctl_allowed_under(&emu, fd, KVM_IRQ_LINE), "emu irq {fd}");
        }
        assert!(ioctl_allowed_under(&emu, 5, FIONBIO));
        // A role that makes none of KVM's requests on a VM without KVM (emu's main thread,
        // which reads a console socket's pending bytes at the end): no filter, every
        // request its allowlist has goes through, FIONREAD too.
        let no_kvm = crate::VmFds::default();
        let main: Vec<BpfProgram> = std::iter::once(role_filter(Role::Main))
            .chain(pinned(Mode::Kill, Role::Main, None, &no_kvm).unwrap())
            .collect();
        for fd in [0, 6, 900] {
            assert!(
                ioctl_allowed_under(&main, fd, FIONREAD),
                "main FIONREAD on {fd}"
            );
        }
        // The API's reads every vCPU of the VM, nothing else.
        let api = [
            role_filter(Role::Api),
            pinned(Mode::Kill, Role::Api, None, &fds).unwrap().unwrap(),
        ];
        for (fd, req, ok) in [
            (901, KVM_GET_REGS, true),
            (902, KVM_GET_XSAVE, true),
            (905, KVM_GET_MSRS, true),
            (903, KVM_GET_REGS, false),
            (904, KVM_GET_REGS, false),
            (900, KVM_GET_REGS, false),
            (906, KVM_GET_REGS, false),
            (900, KVM_GET_IRQCHIP, true),
            (901, KVM_GET_IRQCHIP, false),
            (900, KVM_GET_DIRTY_LOG, true),
            (899, KVM_GET_DIRTY_LOG, false),
        ] {
            assert_eq!(
                ioctl_allowed_under(&api, fd, req),
                ok,
                "api: {req:#x} on {fd}"
            );
        }
        // An I/O thread raises interrupts on the VM's descriptor only.
        let io = [
            role_filter(Role::Io),
            pinned(Mode::Kill, Role::Io, None, &fds).unwrap().unwrap(),
        ];
        assert!(ioctl_allowed_under(&io, 900, KVM_IRQ_LINE));
        assert!(!ioctl_allowed_under(&io, 901, KVM_IRQ_LINE));
        assert!(!ioctl_allowed_under(&io, 950, KVM_SIGNAL_MSI));
        // In no mode but none does the filter let another descriptor through.
        assert!(pinned(Mode::None, Role::Vcpu, Some(902), &fds)
            .unwrap()
            .is_none());
        // Many scattered vCPUs still compile (the BPF length limit is 4096).
        let scattered = crate::VmFds {
            vm: Some(3),
            vcpus: (0..255).map(|i| 10 + 2 * i).collect(),
            taps: (0..255).map(|i| 600 + 2 * i).collect(),
        };
        pinned(Mode::Trap, Role::Api, None, &scattered).unwrap();
        for role in [Role::Vcpu, Role::Io] {
            pinned(Mode::Trap, role, Some(10), &scattered).unwrap();
        }
    }

    /// Issue 22: once the VM is built, a TAP's requests (offloads, header size, queues)
    /// go only to the VM's TAP queues, in every role that makes them; a VM without a
    /// TAP makes none. Other requests stay where the role allows them.
    #[test]
    fn tap_requests_are_held_to_the_vms_taps() {
        use ioctls::*;
        let p = Programs::build(Mode::Kill).unwrap();
        let role_filter = |role: Role| (*p.for_role(role).last().unwrap()).clone();
        // Queues on 910, 911 and 914 (two TAPs, one with two queues); KVM on 900..=902.
        let fds = crate::VmFds {
            vm: Some(900),
            vcpus: vec![901, 902],
            taps: vec![910, 911, 914],
        };
        for (role, own) in [
            (Role::Vcpu, Some(901)),
            (Role::Io, None),
            (Role::Vsock, None),
        ] {
            let progs = [
                role_filter(role),
                pinned(Mode::Kill, role, own, &fds).unwrap().unwrap(),
            ];
            for (fd, req, ok) in [
                (910, TUNSETOFFLOAD, true),
                (911, TUNSETQUEUE, true),
                (914, TUNSETVNETHDRSZ, true),
                (914, TUNSETOFFLOAD, true),
                (912, TUNSETOFFLOAD, false),
                (913, TUNSETQUEUE, false),
                (909, TUNSETOFFLOAD, false),
                (915, TUNSETVNETHDRSZ, false),
                (0, TUNSETOFFLOAD, false),
                (900, TUNSETOFFLOAD, false),
                (-1, TUNSETQUEUE, false),
                (912, FIONBIO, true),
                (900, KVM_IRQ_LINE, true),
            ] {
                assert_eq!(
                    ioctl_allowed_under(&progs, fd, req),
                    ok,
                    "{role:?}: {req:#x} on {fd}"
                );
            }
        }
        // No TAP: a TAP request nowhere (emu, where there is no KVM descriptor either).
        let none = [
            role_filter(Role::Io),
            pinned(Mode::Kill, Role::Io, None, &crate::VmFds::default())
                .unwrap()
                .unwrap(),
        ];
        for fd in [0, 3, 910] {
            assert!(!ioctl_allowed_under(&none, fd, TUNSETOFFLOAD), "{fd}");
        }
        assert!(ioctl_allowed_under(&none, 3, FIONBIO));
        // Roles that make no TAP request never did: TUNSETIFF and TUNGETIFF nowhere.
        for role in Role::ALL {
            for nr in [TUNSETIFF, TUNGETIFF] {
                assert!(!ioctl_allowed(role, nr), "{role:?} may {nr:#x}");
            }
            assert_eq!(
                ioctl_allowed(role, TUNSETOFFLOAD),
                matches!(role, Role::Vcpu | Role::Io | Role::Vsock),
                "{role:?}"
            );
        }
    }

    /// Issue 22: each role may make only its own `ioctl` requests, by number: the
    /// requests that build a VM are refused to every confined thread, KVM_RUN and a
    /// vCPU's registers to all but vCPU threads (the API's may read them, for a
    /// snapshot), the hybrid accelerator's vCPU creation and memory slots to all but
    /// vCPU threads (the API's switches dirty logging on the slots).
    #[test]
    fn each_role_makes_only_its_own_ioctl_requests() {
        use ioctls::*;
        for role in Role::ALL {
            for nr in BUILD_ONLY {
                assert!(!ioctl_allowed(role, *nr), "{role:?} may {nr:#x}");
            }
            let vcpu = role == Role::Vcpu;
            assert_eq!(ioctl_allowed(role, KVM_RUN), vcpu, "{role:?} KVM_RUN");
            assert_eq!(ioctl_allowed(role, KVM_SET_REGS), vcpu, "{role:?}");
            assert_eq!(
                ioctl_allowed(role, KVM_GET_REGS),
                vcpu || role == Role::Api,
                "{role:?}"
            );
            assert_eq!(
                ioctl_allowed(role, KVM_SET_USER_MEMORY_REGION),
                vcpu || role == Role::Api,
                "{role:?}"
            );
            assert_eq!(
                ioctl_allowed(role, KVM_IRQ_LINE),
                role != Role::Main,
                "{role:?}"
            );
            // The API's thread for migration, a vCPU's for the hybrid accelerator's log
            // of stores to code pages.
            assert_eq!(
                ioctl_allowed(role, KVM_GET_DIRTY_LOG),
                matches!(role, Role::Api | Role::Vcpu),
                "{role:?}"
            );
            assert_eq!(
                ioctl_allowed(role, KVM_CLEAR_DIRTY_LOG),
                role == Role::Vcpu,
                "{role:?}"
            );
            assert_eq!(
                ioctl_allowed(role, TCSETS),
                matches!(role, Role::Console | Role::Main),
                "{role:?}"
            );
            assert!(ioctl_allowed(role, FIONBIO), "{role:?} FIONBIO");
            // An unknown request of a known type, and one of another type.
            assert!(!ioctl_allowed(role, 0xaeff), "{role:?}");
            assert!(!ioctl_allowed(role, 0x8000_4d00), "{role:?}");
        }
    }

    #[test]
    fn the_self_test_call_is_forbidden_everywhere() {
        for role in Role::ALL {
            let r = rules(role).unwrap();
            assert!(!r.contains_key(&libc::SYS_getppid), "{role:?}");
            for nr in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_ptrace,
                libc::SYS_mount,
                libc::SYS_setuid,
                libc::SYS_capset,
            ] {
                assert!(!r.contains_key(&nr), "{role:?} allows {nr}");
            }
            // Only vsock's thread (to sockets by path) and the API's (to a migration's
            // destination) connect.
            assert_eq!(
                r.contains_key(&libc::SYS_connect),
                role == Role::Vsock || role == Role::Api,
                "{role:?}"
            );
        }
    }
}
