//! The VMM's confinement (issue 22): each thread of `vessel run` confines itself when it
//! starts, according to its [`Role`]: NoNewPrivs, no capabilities, and a seccomp filter
//! that allows only the system calls that role makes (`filters`).
//!
//! The binary chooses a [`Mode`] once with [`configure`]; until then [`enter`] does
//! nothing, so libraries, their tests and the manager daemon (which share the code that
//! spawns these threads) run unconfined.
//!
//! A forbidden system call, by default ([`Mode::Trap`]), raises SIGSYS; the handler
//! writes the call's number and the thread's role to stderr and ends the process with
//! [`BAD_SYSCALL_STATUS`]. [`Mode::Kill`] lets the kernel kill the process (SIGSYS,
//! SECCOMP_RET_KILL_PROCESS), [`Mode::Log`] only has the kernel log the call (the audit
//! log, `dmesg`), and [`Mode::None`] installs no filter, for development.

mod caps;
pub mod cgroup;
mod filters;
mod ioctls;
pub mod jail;

use std::cell::{Cell, RefCell};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use seccompiler::BpfProgram;

pub use filters::Role;

/// The exit status of a VMM whose thread made a forbidden system call (in
/// [`Mode::Trap`]); the same number as Firecracker's.
pub const BAD_SYSCALL_STATUS: i32 = 148;

/// The environment variable that makes a thread of the named role (`vcpu`, `io`,
/// `vsock`, `api`, `console`, `main`) make a forbidden system call right after it is confined: the test
/// hook for "a forbidden system call ends only that VMM, with its documented status".
/// With [`SELF_TEST_FOREIGN_FD`], a vCPU thread of a KVM VM instead reads registers
/// (KVM_GET_REGS, a request its role makes) from another descriptor: the first vCPU's,
/// or the VM's for the first vCPU itself (see `foreign_fd_self_test`); with
/// [`SELF_TEST_TAP_FOREIGN_FD`], the first vCPU thread sets a TAP's offloads
/// (TUNSETOFFLOAD) on the VM's first TAP queue and then on standard input.
pub const SELF_TEST_ENV: &str = "VESSEL_SECCOMP_SELFTEST";

/// [`SELF_TEST_ENV`]'s value for a vCPU request on a descriptor that is not the vCPU's.
pub const SELF_TEST_FOREIGN_FD: &str = "vcpu-foreign-fd";

/// [`SELF_TEST_ENV`]'s value for a TAP request on a descriptor that is not one of the
/// VM's TAP queues (see `tap_foreign_fd_self_test`).
pub const SELF_TEST_TAP_FOREIGN_FD: &str = "tap-foreign-fd";

/// The descriptors of the VM this process runs, once it is built: KVM's, the VM's and
/// its vCPUs' (none where the accelerator has none: emu, the riscv64 machine), and its
/// TAP queues'.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmFds {
    pub vm: Option<RawFd>,
    pub vcpus: Vec<RawFd>,
    pub taps: Vec<RawFd>,
}

/// What [`SELF_TEST_ENV`] asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SelfTest {
    /// A thread of this role calls getppid.
    Syscall(Role),
    /// A vCPU thread reads registers from another KVM descriptor.
    ForeignFd,
    /// A vCPU thread sets offloads on a descriptor that is not a TAP queue.
    TapForeignFd,
}

/// What a forbidden system call does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No filter (development only). Capabilities are still dropped.
    None,
    /// The kernel logs the call (audit log) and lets it run: for finding what a filter
    /// lacks.
    Log,
    /// SIGSYS: Vessel reports the call and its thread, and exits with
    /// [`BAD_SYSCALL_STATUS`].
    Trap,
    /// The kernel kills the process at once (SECCOMP_RET_KILL_PROCESS).
    Kill,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Mode::None),
            "log" => Ok(Mode::Log),
            "trap" => Ok(Mode::Trap),
            "kill" => Ok(Mode::Kill),
            _ => Err(format!("{s:?}: expected trap, kill, log or none")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::None => "none",
            Mode::Log => "log",
            Mode::Trap => "trap",
            Mode::Kill => "kill",
        })
    }
}

/// Why the confinement could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("building the seccomp filter for {role} threads: {source}")]
    BuildFilter {
        role: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("installing a seccomp filter: {0}")]
    InstallFilter(#[source] seccompiler::Error),
    #[error("setting NoNewPrivs: {0}")]
    NoNewPrivs(#[source] std::io::Error),
    #[error("dropping capabilities: {0}")]
    DropCaps(#[source] std::io::Error),
    #[error("installing the SIGSYS handler: {0}")]
    SigsysHandler(#[source] std::io::Error),
    #[error("becoming the VMM's user and group: {0}")]
    Ids(#[source] std::io::Error),
    #[error("setting resource limits: {0}")]
    Rlimit(#[source] std::io::Error),
    #[error("the sandbox is already configured")]
    AlreadyConfigured,
    #[error("installing the handler that tightens early threads' filters: {0}")]
    PinHandler(#[source] std::io::Error),
}

/// The unprivileged user and group a VMM's threads take once the VM is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
}

/// The chosen mode and the filters, compiled once.
struct Policy {
    mode: Mode,
    programs: filters::Programs,
    self_test: Option<SelfTest>,
    ids: Option<Ids>,
}

static POLICY: OnceLock<Policy> = OnceLock::new();

/// The descriptors [`pin_fds`] recorded, and the threads confined before them.
struct Pins {
    fds: Option<VmFds>,
    /// Threads confined before the VM's descriptors were known (the API's, the
    /// console's, served before the build), by thread id: [`pin_fds`] has each add its
    /// pinned filter at once ([`on_pin_signal`]), whatever it is waiting for. A thread
    /// takes itself off when it ends ([`EarlyGuard`]).
    early: Vec<libc::pid_t>,
}

static PINS: Mutex<Pins> = Mutex::new(Pins {
    fds: None,
    early: Vec::new(),
});

fn pins() -> std::sync::MutexGuard<'static, Pins> {
    PINS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Each role's [`filters::pinned`] filter (a vCPU's without a vCPU of its own), compiled
/// by [`pin_fds`] for the threads confined before it: the signal handler installs one
/// without allocating.
static EARLY_PROGRAMS: OnceLock<Vec<Option<BpfProgram>>> = OnceLock::new();

/// Signals [`on_pin_signal`] has handled, for [`pin_fds`] to wait on.
static TIGHTENED: AtomicUsize = AtomicUsize::new(0);

/// How long [`pin_fds`] waits for the threads it signalled.
const TIGHTEN_WAIT: Duration = Duration::from_secs(2);

/// The signal that has a thread confined before the VM was built add its pinned filter.
fn pin_signal() -> libc::c_int {
    // SIGRTMIN itself is the hybrid accelerator's kick.
    libc::SIGRTMIN() + 1
}

/// This process is the VMM inside a jail, whose waiter's death must kill it
/// (PR_SET_PDEATHSIG, which a change of user clears: re-armed after each).
pub(crate) static JAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

thread_local! {
    /// The role this thread entered, for the SIGSYS handler's report.
    /// A thread started by a confined one inherits its filter without entering a role.
    static ROLE: Cell<&'static str> = const { Cell::new("inherited-filter") };
    /// This thread's role, once it entered or inherited one.
    static CONFINED_AS: Cell<Option<Role>> = const { Cell::new(None) };
    /// Whether this thread's KVM and TAP requests are held to their descriptors
    /// ([`filters::pinned`]).
    static PINNED: Cell<bool> = const { Cell::new(false) };
    /// Set while this thread, confined before the VM's descriptors were known, waits for
    /// them: the role whose pinned filter [`on_pin_signal`] installs. Read by the
    /// signal handler: a constant-initialized `Cell` without a destructor.
    static EARLY: Cell<Option<Role>> = const { Cell::new(None) };
    /// Takes this thread off [`Pins::early`] when it ends.
    static EARLY_GUARD: RefCell<Option<EarlyGuard>> = const { RefCell::new(None) };
}

/// A thread's place on [`Pins::early`], given back when the thread ends (so that the
/// connections a client opens and closes before the build leave nothing behind).
struct EarlyGuard(libc::pid_t);

impl Drop for EarlyGuard {
    fn drop(&mut self) {
        pins().early.retain(|&t| t != self.0);
    }
}

fn gettid() -> libc::pid_t {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// Chooses the mode for this process; from now on [`enter`] confines the calling thread
/// (and, with `ids`, makes it that user and group, with no supplementary groups).
/// Compiles every role's filter (so a filter that cannot be built fails here, before any
/// VM runs) and, in [`Mode::Trap`], installs the SIGSYS handler.
pub fn configure(mode: Mode, ids: Option<Ids>) -> Result<(), Error> {
    let programs = filters::Programs::build(mode)?;
    let self_test = std::env::var(SELF_TEST_ENV).ok().and_then(|v| {
        if v == SELF_TEST_FOREIGN_FD {
            Some(SelfTest::ForeignFd)
        } else if v == SELF_TEST_TAP_FOREIGN_FD {
            Some(SelfTest::TapForeignFd)
        } else {
            Role::from_name(&v).map(SelfTest::Syscall)
        }
    });
    if mode == Mode::Trap {
        install_sigsys_handler()?;
    }
    if mode != Mode::None {
        install_pin_handler()?;
    }
    no_core_dumps()?;
    POLICY
        .set(Policy {
            mode,
            programs,
            self_test,
            ids,
        })
        .map_err(|_| Error::AlreadyConfigured)
}

/// Confines the calling thread for `role`: NoNewPrivs, no capabilities (effective,
/// permitted, inheritable, ambient and bounding sets), the configured user and group,
/// then the role's seccomp filter, and the filter that holds KVM's and the TAPs'
/// requests to their descriptors: now if the VM is built ([`pin_fds`]), else as soon as
/// it is.
/// Does nothing before [`configure`]. A thread that cannot be confined must not go on
/// running unconfined: the failure is reported and the process exits with status 1.
/// A vCPU thread enters with [`enter_vcpu`].
pub fn enter(role: Role) {
    enter_with(role, None);
}

/// [`enter`] for a vCPU thread whose vCPU has KVM descriptor `own` (None: no KVM vCPU):
/// its vCPU requests are allowed on `own` alone. Call [`pin_fds`] first.
pub fn enter_vcpu(own: Option<RawFd>) {
    enter_with(Role::Vcpu, Some(own));
}

fn enter_with(role: Role, own_vcpu: Option<Option<RawFd>>) {
    let Some(policy) = POLICY.get() else {
        return;
    };
    if let Err(e) = confine(policy, role).and_then(|()| pin(policy, role, own_vcpu.flatten())) {
        fail(role, &e);
    }
    ROLE.with(|r| r.set(role.name()));
    CONFINED_AS.with(|r| r.set(Some(role)));
    tracing::debug!(role = role.name(), mode = %policy.mode, "thread confined");
    match policy.self_test {
        Some(SelfTest::Syscall(r)) if r == role => {
            tracing::warn!(
                role = role.name(),
                "{SELF_TEST_ENV}: making a forbidden system call (getppid)"
            );
            // SAFETY: getppid takes no arguments and touches no memory; with the filter
            // on, it never returns to here.
            unsafe { libc::syscall(libc::SYS_getppid) };
        }
        Some(SelfTest::ForeignFd) if role == Role::Vcpu => {
            if let Some(own) = own_vcpu.flatten() {
                foreign_fd_self_test(own);
            }
        }
        Some(SelfTest::TapForeignFd) if role == Role::Vcpu => {
            tap_foreign_fd_self_test(own_vcpu.flatten())
        }
        _ => {}
    }
}

fn fail(role: Role, e: &Error) -> ! {
    tracing::error!(role = role.name(), "cannot confine this thread: {e}");
    eprintln!("vessel: cannot confine a {} thread: {e}", role.name());
    std::process::exit(1);
}

/// Records the built VM's descriptors: from now on threads make KVM's and the TAPs'
/// requests only on the descriptors they belong to. Threads confined from now on
/// ([`enter`], [`enter_vcpu`], [`inherit`]) add that filter as they start; threads
/// confined before (the API's and the console's, serving before the build) are made to
/// add it now, with a signal whose handler installs it, whatever they are waiting for
/// (an idle connection, `accept`): this returns once they have, or after
/// [`TIGHTEN_WAIT`] (a thread that ended meanwhile). Call it once the VM is built,
/// before its vCPU and I/O threads start. Does nothing before [`configure`].
pub fn pin_fds(fds: VmFds) -> Result<(), Error> {
    let Some(policy) = POLICY.get() else {
        return Ok(());
    };
    tracing::debug!(vm = ?fds.vm, vcpus = ?fds.vcpus, taps = ?fds.taps,
        "KVM and TAP requests pinned to their descriptors");
    let early = {
        let mut pins = pins();
        if policy.mode == Mode::None {
            // No filters, and no handler for the signal.
            pins.fds = Some(fds);
            return Ok(());
        }
        if !pins.early.is_empty() && EARLY_PROGRAMS.get().is_none() {
            let programs = Role::ALL
                .into_iter()
                .map(|role| filters::pinned(policy.mode, role, None, &fds))
                .collect::<Result<Vec<_>, _>>()?;
            let _ = EARLY_PROGRAMS.set(programs);
        }
        pins.fds = Some(fds);
        std::mem::take(&mut pins.early)
    };
    if early.is_empty() {
        return Ok(());
    }
    let before = TIGHTENED.load(Ordering::SeqCst);
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let mut sent = 0;
    for tid in &early {
        // SAFETY: tgkill takes integers. A listed thread takes itself off the list
        // before it ends, so `tid` is a live thread of this process unless it ended
        // after the list was taken: then the call fails (ESRCH), or, were the id
        // reused already, the new thread's handler finds nothing to do.
        if unsafe { libc::syscall(libc::SYS_tgkill, pid, *tid, pin_signal()) } == 0 {
            sent += 1;
        }
    }
    let t0 = Instant::now();
    while TIGHTENED.load(Ordering::SeqCst).wrapping_sub(before) < sent {
        if t0.elapsed() > TIGHTEN_WAIT {
            tracing::warn!(
                sent,
                "not every thread confined before the build has tightened its filter yet"
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    tracing::debug!(
        threads = sent,
        "threads confined before the build tightened"
    );
    Ok(())
}

/// For a thread confined before the VM was built (the API's, serving requests before
/// InstanceStart): adds the filter [`enter`] would add now, once, if it has not been
/// added already ([`pin_fds`] has such threads add it). Cheap when there is nothing to
/// do.
pub fn catch_up(role: Role) {
    let Some(policy) = POLICY.get() else {
        return;
    };
    if PINNED.with(|p| p.get()) {
        return;
    }
    if let Err(e) = pin(policy, role, None) {
        fail(role, &e);
    }
}

/// What a thread started by a confined thread has from it (its filters, and so its
/// role): see [`inherit`]. Taken by the starting thread.
#[derive(Clone, Copy, Debug)]
pub struct Inherited {
    role: Option<Role>,
    pinned: bool,
}

/// The calling thread's [`Inherited`], for a thread it is about to start.
pub fn inherited() -> Inherited {
    Inherited {
        role: CONFINED_AS.with(|r| r.get()),
        pinned: PINNED.with(|p| p.get()),
    }
}

/// For a thread started by a confined thread (the API's connections, the console's
/// clients), first thing: it runs under its creator's filters already; this adds the
/// pinned filter if the creator had not (now if the VM is built, else when it is) and
/// names the role in reports. Nothing for a thread started by an unconfined one.
pub fn inherit(from: Inherited) {
    let (Some(policy), Some(role)) = (POLICY.get(), from.role) else {
        return;
    };
    ROLE.with(|r| r.set(role.name()));
    CONFINED_AS.with(|r| r.set(Some(role)));
    if from.pinned {
        PINNED.with(|p| p.set(true));
        return;
    }
    if let Err(e) = pin(policy, role, None) {
        fail(role, &e);
    }
}

/// Installs [`filters::pinned`] for this thread when the VM's descriptors are known;
/// else puts the thread on [`Pins::early`], for [`pin_fds`] to signal.
fn pin(policy: &Policy, role: Role, own_vcpu: Option<RawFd>) -> Result<(), Error> {
    if policy.mode == Mode::None {
        return Ok(());
    }
    // Not interrupted by its own signal handler meanwhile: a signal sent now waits
    // until the end, and then finds nothing left to do.
    let _blocked = BlockPinSignal::new();
    let mut pins = pins();
    let Some(fds) = pins.fds.clone() else {
        if EARLY.with(|e| e.get()).is_none() {
            let tid = gettid();
            pins.early.push(tid);
            EARLY.with(|e| e.set(Some(role)));
            drop(pins);
            EARLY_GUARD.with(|g| *g.borrow_mut() = Some(EarlyGuard(tid)));
        }
        return Ok(());
    };
    drop(pins);
    EARLY.with(|e| e.set(None));
    if let Some(prog) = filters::pinned(policy.mode, role, own_vcpu, &fds)? {
        seccompiler::apply_filter(&prog).map_err(Error::InstallFilter)?;
    }
    PINNED.with(|p| p.set(true));
    Ok(())
}

/// The pin signal blocked on this thread while it lives.
struct BlockPinSignal(Option<libc::sigset_t>);

impl BlockPinSignal {
    fn new() -> Self {
        // SAFETY: sigset_t is plain data, filled by sigemptyset/sigaddset; the old mask
        // is written into `old`.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, pin_signal());
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) != 0 {
                return BlockPinSignal(None);
            }
            BlockPinSignal(Some(old))
        }
    }
}

impl Drop for BlockPinSignal {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            // SAFETY: restores the mask read in `new`.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut()) };
        }
    }
}

/// [`pin_fds`]'s signal: a thread confined before the build installs its role's
/// pinned filter (compiled beforehand: no allocation, no lock here). A thread that
/// waits for nothing (it pinned itself meanwhile) only counts the signal.
extern "C" fn on_pin_signal(_sig: libc::c_int) {
    if let Some(role) = EARLY.with(|e| e.replace(None)) {
        if let Some(Some(prog)) = EARLY_PROGRAMS.get().and_then(|p| p.get(role.index())) {
            // prctl and seccomp(2), as seccompiler makes them: async-signal-safe, and
            // its error is an OS error code (no allocation).
            if seccompiler::apply_filter(prog).is_err() {
                let msg = b"vessel: cannot add the pinned seccomp filter to a thread confined before the build\n";
                // SAFETY: write and _exit are async-signal-safe; `msg` is valid.
                unsafe {
                    libc::write(2, msg.as_ptr().cast(), msg.len());
                    libc::_exit(1);
                }
            }
        }
        PINNED.with(|p| p.set(true));
    }
    TIGHTENED.fetch_add(1, Ordering::SeqCst);
}

fn install_pin_handler() -> Result<(), Error> {
    // SAFETY: a zeroed sigaction is a valid starting point; the handler only makes
    // async-signal-safe calls. SA_RESTART: calls that can be restarted are.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_pin_signal as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(pin_signal(), &sa, std::ptr::null_mut()) != 0 {
            return Err(Error::PinHandler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// [`SELF_TEST_TAP_FOREIGN_FD`], on the first vCPU thread (a role that sets a TAP's
/// offloads when the guest acknowledges virtio-net's features), before the guest runs:
/// TUNSETOFFLOAD with no offloads (what a TAP has until its guest negotiates some) on
/// the first TAP queue, which must be let through, then on the lowest descriptor that
/// is not a TAP queue (standard input): with the filter on, that ends the VMM. On a KVM
/// vCPU (`own`), the first vCPU's thread alone: the guest starts there, so the test is
/// done before any guest code runs (a later vCPU's thread that came first let the first
/// run the guest meanwhile, whose output a loaded host then saw before the VMM ended).
fn tap_foreign_fd_self_test(own: Option<RawFd>) {
    static DONE: AtomicBool = AtomicBool::new(false);
    let fds = pins().fds.clone();
    if own.is_some() && fds.as_ref().and_then(|f| f.vcpus.first().copied()) != own {
        return;
    }
    let taps = fds.map(|f| f.taps).unwrap_or_default();
    let Some(&tap) = taps.first() else {
        return;
    };
    if DONE.swap(true, Ordering::SeqCst) {
        return;
    }
    let Some(other) = (0..).find(|fd| !taps.contains(fd)) else {
        return;
    };
    for (fd, what) in [(tap, "a TAP queue"), (other, "another descriptor")] {
        tracing::warn!(fd, "{SELF_TEST_ENV}: TUNSETOFFLOAD on {what}");
        // SAFETY: TUNSETOFFLOAD takes its flags by value; 0 asks for no offloads. On a
        // descriptor that is not a TAP the kernel refuses it (ENOTTY, EINVAL), and with
        // the filter on it never runs.
        let rc = unsafe { libc::ioctl(fd, ioctls::TUNSETOFFLOAD as libc::c_ulong, 0) };
        tracing::warn!(fd, rc, "{SELF_TEST_ENV}: the request was let through");
    }
}

/// [`SELF_TEST_FOREIGN_FD`]: KVM_GET_REGS on a KVM descriptor that is not `own`: the
/// first vCPU's for every other vCPU, the VM's for the first. Never a later vCPU's: a
/// vCPU request waits for that vCPU's KVM_RUN to return, and a vCPU waiting for its
/// start-up IPI stays there, so with the filter only logging the first vCPU would wait
/// forever and the guest would never run.
fn foreign_fd_self_test(own: RawFd) {
    let fds = pins().fds.clone();
    let Some(target) = fds.and_then(|f| match f.vcpus.first() {
        Some(&first) if first != own => Some(first),
        _ => f.vm,
    }) else {
        return;
    };
    tracing::warn!(
        own,
        target,
        "{SELF_TEST_ENV}: reading registers from another KVM descriptor"
    );
    let mut regs = kvm_bindings::kvm_regs::default();
    // SAFETY: KVM_GET_REGS writes one kvm_regs, which `regs` is; on a descriptor that is
    // not a vCPU's the kernel refuses it, and with the filter on it never runs.
    let rc = unsafe {
        libc::ioctl(
            target,
            ioctls::KVM_GET_REGS as libc::c_ulong,
            &mut regs as *mut kvm_bindings::kvm_regs,
        )
    };
    tracing::warn!(
        rc,
        rip = regs.rip,
        "{SELF_TEST_ENV}: the request was let through"
    );
}

fn confine(policy: &Policy, role: Role) -> Result<(), Error> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(Error::NoNewPrivs(std::io::Error::last_os_error()));
    }
    // The bounding set needs CAP_SETPCAP, which a change of user takes away.
    caps::drop_bounding().map_err(Error::DropCaps)?;
    if let Some(ids) = policy.ids {
        if become_user(ids).map_err(Error::Ids)?
            && JAILED.load(std::sync::atomic::Ordering::Relaxed)
        {
            // SAFETY: integer arguments only.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
        }
    }
    caps::drop_all().map_err(Error::DropCaps)?;
    for prog in policy.programs.for_role(role) {
        seccompiler::apply_filter(prog).map_err(Error::InstallFilter)?;
    }
    Ok(())
}

/// Confines the jail's waiting parent (`jail::enter`): NoNewPrivs, no capabilities,
/// `ids`, and a filter that allows waiting for `child`, signalling it, and exiting.
pub(crate) fn confine_waiter(
    child: libc::pid_t,
    mode: Option<Mode>,
    ids: Option<Ids>,
) -> Result<(), Error> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(Error::NoNewPrivs(std::io::Error::last_os_error()));
    }
    caps::drop_bounding().map_err(Error::DropCaps)?;
    if let Some(ids) = ids {
        become_user(ids).map_err(Error::Ids)?;
    }
    caps::drop_all().map_err(Error::DropCaps)?;
    if let Some(prog) = filters::waiter(mode.unwrap_or(Mode::Trap), child)? {
        seccompiler::apply_filter(&prog).map_err(Error::InstallFilter)?;
    }
    Ok(())
}

/// Makes the calling thread (only: credentials are per thread in Linux, and the raw
/// system calls, unlike glibc's wrappers, do not broadcast) `ids`, with no supplementary
/// groups. A thread started by one that did this already is that user, and makes no
/// calls (its creator's seccomp filter does not allow them). True when it changed.
fn become_user(ids: Ids) -> std::io::Result<bool> {
    // SAFETY: getuid and getgid take no arguments.
    if unsafe { (libc::getuid(), libc::getgid()) } == (ids.uid, ids.gid) {
        return Ok(false);
    }
    let (uid, gid) = (ids.uid as libc::c_long, ids.gid as libc::c_long);
    // SAFETY: setgroups with size 0 reads no memory; setresgid and setresuid take
    // integers.
    let rcs = unsafe {
        [
            libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()),
            libc::syscall(libc::SYS_setresgid, gid, gid, gid),
            libc::syscall(libc::SYS_setresuid, uid, uid, uid),
        ]
    };
    if rcs.iter().any(|&rc| rc != 0) {
        return Err(std::io::Error::last_os_error());
    }
    Ok(true)
}

/// SIGSYS from a seccomp filter (SECCOMP_RET_TRAP): report and exit. Only
/// async-signal-safe calls (write, _exit), no allocation.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // siginfo_t for SIGSYS (asm-generic/siginfo.h): after si_signo, si_errno, si_code
    // and padding, at offset 16: void *_call_addr; int _syscall; unsigned int _arch.
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel hands the handler a valid siginfo_t, which is 128 bytes;
        // offset 24 is the SIGSYS layout's `_syscall` field.
        unsafe { std::ptr::read_unaligned(info.cast::<u8>().add(24).cast::<i32>()) }
    };
    let role = ROLE.with(|r| r.get());
    let mut name = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into `name`; every filter allows it.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr(), 0, 0, 0) };
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(16);
    let mut buf = [0u8; 256];
    let mut w = StackWriter {
        buf: &mut buf,
        len: 0,
    };
    w.push(b"\r\nvessel: seccomp: a ");
    w.push(role.as_bytes());
    w.push(b" thread (");
    w.push(name.get(..name_len).unwrap_or_default());
    w.push(b") made a forbidden system call (number ");
    w.push_int(i64::from(nr));
    if i64::from(nr) == libc::SYS_ioctl && !ctx.is_null() {
        // SAFETY: for an SA_SIGINFO handler the kernel passes the interrupted thread's
        // ucontext_t; the system call's arguments are in its saved registers.
        let (fd, request) = unsafe {
            let uc = &*ctx.cast::<libc::ucontext_t>();
            let gregs = &uc.uc_mcontext.gregs;
            (
                gregs.get(libc::REG_RDI as usize).copied().unwrap_or(-1),
                gregs.get(libc::REG_RSI as usize).copied().unwrap_or(-1),
            )
        };
        w.push(b": ioctl request ");
        w.push_hex(request as u32);
        w.push(b" on descriptor ");
        w.push_int(i64::from(fd as i32));
    }
    w.push(b"); the VMM stops (exit status ");
    w.push_int(i64::from(BAD_SYSCALL_STATUS));
    w.push(b")\n");
    let len = w.len;
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `buf` outlives the call.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(BAD_SYSCALL_STATUS);
    }
}

/// Formats into a fixed buffer (no allocation in a signal handler).
struct StackWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl StackWriter<'_> {
    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if let Some(slot) = self.buf.get_mut(self.len) {
                *slot = b;
                self.len += 1;
            }
        }
    }

    fn push_hex(&mut self, v: u32) {
        self.push(b"0x");
        let mut started = false;
        for shift in (0..8).rev() {
            let d = ((v >> (shift * 4)) & 0xf) as u8;
            if d != 0 || started || shift == 0 {
                started = true;
                self.push(&[if d < 10 { b'0' + d } else { b'a' + d - 10 }]);
            }
        }
    }

    fn push_int(&mut self, v: i64) {
        if v < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut n = v.unsigned_abs();
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let (_, used) = digits.split_at(i);
        self.push(used);
    }
}

/// RLIMIT_CORE 0: a crashing VMM leaves no core file holding its guest's memory.
fn no_core_dumps() -> Result<(), Error> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads one rlimit, valid for the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) } != 0 {
        return Err(Error::Rlimit(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn install_sigsys_handler() -> Result<(), Error> {
    // SAFETY: a zeroed sigaction is a valid starting point; the handler has the
    // SA_SIGINFO signature and only makes async-signal-safe calls.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(Error::SigsysHandler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for m in [Mode::None, Mode::Log, Mode::Trap, Mode::Kill] {
            assert_eq!(m.to_string().parse::<Mode>(), Ok(m));
        }
        assert!("off".parse::<Mode>().is_err());
    }

    #[test]
    fn the_handler_formats_without_allocating() {
        let mut buf = [0u8; 16];
        let mut w = StackWriter {
            buf: &mut buf,
            len: 0,
        };
        w.push(b"n=");
        w.push_int(-39);
        w.push_int(0);
        assert_eq!(&buf[..6], b"n=-390");
        let mut small = [0u8; 3];
        let mut w = StackWriter {
            buf: &mut small,
            len: 0,
        };
        w.push_int(123_456);
        assert_eq!(&small, b"123");
        let mut hex = [0u8; 24];
        let mut w = StackWriter {
            buf: &mut hex,
            len: 0,
        };
        w.push_hex(0x8090_ae81);
        w.push(b" ");
        w.push_hex(0);
        assert_eq!(&hex[..14], b"0x8090ae81 0x0");
    }
}
