//! The `hybrid` accelerator's native half: guest user code (CPL3) on a KVM vCPU of a PVM
//! host, over the same guest memory, while the guest kernel runs on x86emu.
//!
//! How control comes back (measured in `crates/hypervisor/tests/pvm_hybrid.rs`): the KVM
//! vCPU is only ever entered at CPL3, with an empty IDT and GDT and no PVM set-up, so
//! every event that would enter the guest kernel (SYSCALL, exceptions, page faults) ends
//! KVM_RUN with KVM_EXIT_SHUTDOWN and leaves the user state in place: a fault leaves RIP
//! at the instruction (RFLAGS.RF set), int3 leaves RIP after itself (RF clear), SYSCALL
//! leaves RIP = LSTAR (set to [`LSTAR_MARK`]), RCX = the return address and R11 = RFLAGS.
//! x86emu then goes on from the instruction, raising the real event through the guest's
//! IDT. Timers and interrupts from other threads end KVM_RUN with a signal (SIGRTMIN, the
//! VMM's kick signal, whose handler does nothing): a per-thread POSIX timer armed for the
//! interrupt controller's next deadline, and the irqchip's event notifier.
//!
//! KVM shadows the guest page tables and does not see x86emu's writes to them. With one
//! vCPU, x86emu watches every page table KVM may have copied (`x86emu::ptwatch`): when a
//! store took a mapping or a right away, every memslot is deleted and added again, which
//! drops the shadow; context switches and page faults cost nothing. With several vCPUs
//! (whose kernels store to tables while another runs natively) the memslots are replaced
//! whenever x86emu flushed its TLB since the last entry (INVLPG, CR3 writes).

use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_enable_cap, kvm_msr_entry,
    kvm_segment, kvm_sregs, kvm_userspace_memory_region, kvm_xsave, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VcpuExit as KvmExit, VcpuFd, VmFd};
use x86emu::code::CodeTracker;
use x86emu::ptwatch::{TableSync, TableWatch};
use x86emu::{Cpu, Platform, Seg};

use crate::convert;

/// What the KVM vCPU's LSTAR holds: a SYSCALL in user code ends KVM_RUN with RIP here
/// (a kernel-half address user code cannot reach itself without faulting).
pub const LSTAR_MARK: u64 = 0xffff_ffff_dead_b000;

const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_TSC_AUX: u32 = 0xc000_0103;
/// MSR_MISC_FEATURES_ENABLES bit 0: CPUID faulting (CPUID at CPL > 0 raises #GP).
const MSR_MISC_FEATURES_ENABLES: u32 = 0x140;

/// The selectors PVM accepts for a vCPU that runs at CPL3 (Linux's own).
pub const USER_CS: u16 = 0x33;
pub const USER_SS: u16 = 0x2b;

const RFLAGS_TF: u64 = 1 << 8;
const RFLAGS_RF: u64 = 1 << 16;
const RFLAGS_VM: u64 = 1 << 17;
const CR4_FSGSBASE: u64 = 1 << 16;
/// CR4 features the KVM vCPU does not reproduce (RDTSC faulting, 5-level paging,
/// protection keys, CET): a vCPU with any of them stays on x86emu.
const CR4_NOT_CARRIED: u64 = (1 << 2) | (1 << 12) | (1 << 22) | (1 << 23);

/// The CR4 bits the KVM vCPU gets: what matters to user code and that KVM accepts with
/// its supported CPUID (no OSXSAVE, no PCIDE). User code on PVM runs with the host's XCR0
/// whatever KVM_SET_XCRS says (measured: XGETBV returns 0xe7 on a guest XCR0 of 7), so the
/// hybrid CPUID offers no XSAVE at all (see `cpuid::restrict_for_hybrid`).
const CR4_KVM_MASK: u64 = (1 << 4) | (1 << 5) | (1 << 7) | (1 << 9) | (1 << 10) | CR4_FSGSBASE;

/// Longest native stint before the thread comes back to serve the VMM (the timer's
/// period, also the bound on a timer signal lost just before KVM_RUN).
const MAX_STINT: Duration = Duration::from_millis(4);
/// Don't enter KVM for less than this: the round trip alone costs ~80 µs.
const MIN_STINT: Duration = Duration::from_micros(200);
/// Emulated slice length while looking for a stretch of user code to move to KVM.
pub const PROBE_SLICE: u64 = 10_000;
/// A stint that ran less than this before the kernel was needed did not pay for itself:
/// KVM_RUN alone takes ~50 µs on a PVM host, and the rest of the round trip ~60 µs, while
/// x86emu runs user code ~15x slower than the host: past ~10 µs of user work, native won.
const SHORT_STINT: Duration = Duration::from_micros(60);
/// How often the statistics are logged (at info level) while the vCPU runs.
const STATS_EVERY: Duration = Duration::from_secs(2);
/// At most this many user-only probe slices are required before the next stint.
const MAX_NEED: u32 = 64;
/// Address spaces whose stint history is kept (forgotten all at once past that).
const MAX_SPACES: usize = 1024;
/// CR3 without its PCID and flag bits: the address space.
const CR3_ROOT: u64 = 0x000f_ffff_ffff_f000;

#[derive(Debug, thiserror::Error)]
pub enum HybridError {
    #[error("opening /dev/kvm for the hybrid accelerator: {0}")]
    Open(kvm_ioctls::Error),
    #[error("hybrid accelerator: {op}: {source}")]
    Ioctl {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("hybrid accelerator: {0}")]
    Unexpected(String),
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HybridError {
    move |source| HybridError::Ioctl { op, source }
}

/// The KVM VM that mirrors an emu VM's RAM.
pub struct HybridVm {
    vm: VmFd,
    cpuid: kvm_bindings::CpuId,
    slots: Mutex<Vec<kvm_userspace_memory_region>>,
    tsc_hz: u64,
    /// The page tables KVM may hold copies of (used while the VM has one vCPU).
    watch: Mutex<TableWatch>,
    vcpus: AtomicU32,
    /// VESSEL_HYBRID_WATCH=0: replace the memslots at every TLB flush, as with several
    /// vCPUs (for comparison).
    watch_off: bool,
    /// KVM logs native stores to the pages x86emu holds code from (see `CodeLog`):
    /// false where KVM lacks manual dirty-log protection, or VESSEL_HYBRID_CODELOG=0.
    code_log_on: AtomicBool,
    code_log: Mutex<CodeLog>,
}

/// Which of x86emu's code pages KVM write-protects for its dirty log ("armed"), a bit per
/// guest page. Native user code may store to guest code (a JIT, a dynamic linker's
/// text relocations); without the log, every stint would have to make x86emu check all
/// its cached blocks against memory again.
#[derive(Debug, Default)]
struct CodeLog {
    armed: Vec<u64>,
    /// Arm every code page at the next stint (the memslots were replaced, which sets
    /// every page dirty and unprotected again).
    full: bool,
}

impl std::fmt::Debug for HybridVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HybridVm")
            .field("tsc_hz", &self.tsc_hz)
            .finish_non_exhaustive()
    }
}

/// KVM_GET_TSC_KHZ on a VM fd (KVM_CAP_VM_TSC_CONTROL): _IO(KVMIO, 0xa3).
const KVM_GET_TSC_KHZ: libc::c_ulong = 0xaea3;
/// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with both its flags: KVM_GET_DIRTY_LOG protects
/// nothing, and a new memslot starts with every page dirty and unprotected, so only the
/// pages cleared with KVM_CLEAR_DIRTY_LOG are ever write-protected.
const KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: u32 = 168;
const MANUAL_PROTECT_INITIALLY_SET: u64 = 3;
/// KVM_CLEAR_DIRTY_LOG: _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log).
const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = 0xc018_aec0;
/// Memslots whose dirty log lines up with the code tracker's words start at a multiple
/// of 64 pages.
const LOG_ALIGN: u64 = 64 << 12;

impl HybridVm {
    /// The KVM VM's descriptor, for the vCPU threads' seccomp filters.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.vm)
    }

    pub fn new() -> Result<Self, HybridError> {
        let kvm = Kvm::new().map_err(HybridError::Open)?;
        let vm = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        // SAFETY: KVM_GET_TSC_KHZ takes no argument and only returns a value.
        let khz = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&vm), KVM_GET_TSC_KHZ) };
        let tsc_hz = if khz > 0 {
            khz as u64 * 1000
        } else {
            calibrate_tsc_hz()
        };
        ensure_kick_handler();
        ensure_segv_guard();
        let code_log_on = std::env::var_os("VESSEL_HYBRID_CODELOG").is_none_or(|v| v != "0")
            && vm
                .enable_cap(&kvm_enable_cap {
                    cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    args: [MANUAL_PROTECT_INITIALLY_SET, 0, 0, 0],
                    ..Default::default()
                })
                .is_ok();
        tracing::info!(tsc_hz, code_log_on, "hybrid accelerator: KVM VM created");
        Ok(HybridVm {
            vm,
            cpuid,
            slots: Mutex::new(Vec::new()),
            tsc_hz,
            watch: Mutex::new(TableWatch::new()),
            vcpus: AtomicU32::new(0),
            watch_off: std::env::var_os("VESSEL_HYBRID_WATCH").is_some_and(|v| v == "0"),
            code_log_on: AtomicBool::new(code_log_on),
            code_log: Mutex::new(CodeLog {
                armed: Vec::new(),
                full: true,
            }),
        })
    }

    /// The host TSC rate: the guest TSC is the host's (user code reads it natively).
    pub fn tsc_hz(&self) -> u64 {
        self.tsc_hz
    }

    /// Mirror a RAM region of the emu VM.
    ///
    /// # Safety
    /// `host` must stay mapped for `len` bytes as long as the VM exists.
    pub unsafe fn add_region(&self, gpa: u64, host: *mut u8, len: u64) -> Result<(), HybridError> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if !gpa.is_multiple_of(LOG_ALIGN) {
            self.code_log_on.store(false, Ordering::SeqCst);
        }
        let region = kvm_userspace_memory_region {
            slot: slots.len() as u32,
            flags: if self.code_log_on.load(Ordering::SeqCst) {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host as u64,
        };
        // SAFETY: the caller guarantees the host range outlives the VM.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        slots.push(region);
        Ok(())
    }

    /// Drop KVM's translations to guest-physical `ranges` (start, length), wherever its
    /// shadow page tables hold them, and nothing else: a protection change of the host
    /// pages behind them makes the host's MMU notifier zap every mapping of those pages
    /// (measured: ~7 µs a page, where replacing the memslots costs 0.1-20 ms).
    fn drop_translations(&self, ranges: &[(u64, u64)]) -> Result<(), HybridError> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        for &(gpa, len) in ranges {
            let Some(r) = slots
                .iter()
                .find(|r| gpa >= r.guest_phys_addr && gpa - r.guest_phys_addr < r.memory_size)
            else {
                // Not RAM KVM maps: nothing of it to drop.
                continue;
            };
            let off = gpa - r.guest_phys_addr;
            let len = len.min(r.memory_size - off) as usize;
            let host = (r.userspace_addr + off) as *mut libc::c_void;
            DROP_START.store(host as usize, Ordering::SeqCst);
            DROP_END.store(host as usize + len, Ordering::SeqCst);
            for prot in [libc::PROT_READ, libc::PROT_READ | libc::PROT_WRITE] {
                // SAFETY: `host..host + len` lies in a memslot's host range (page aligned),
                // guest RAM the VMM mapped readable and writable; the second call restores
                // that. Only the page protection changes, never the mapping.
                if unsafe { libc::mprotect(host, len, prot) } != 0 {
                    DROP_START.store(0, Ordering::SeqCst);
                    return Err(HybridError::Unexpected(format!(
                        "mprotect of guest RAM at {gpa:#x}: {}",
                        std::io::Error::last_os_error()
                    )));
                }
            }
            DROP_START.store(0, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Drop KVM's shadow page tables: delete every memslot and add it back.
    fn refresh_slots(&self) -> Result<(), HybridError> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        for r in slots.iter() {
            let gone = kvm_userspace_memory_region {
                memory_size: 0,
                ..*r
            };
            // SAFETY: deleting a slot removes KVM's use of the host range.
            unsafe { self.vm.set_user_memory_region(gone) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION (delete)"))?;
            // SAFETY: the same region `add_region` registered, still mapped.
            unsafe { self.vm.set_user_memory_region(*r) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION (re-add)"))?;
        }
        self.code_log.lock().unwrap_or_else(|p| p.into_inner()).full = true;
        Ok(())
    }

    /// Before a stint: KVM write-protects the pages x86emu marked as code since the last
    /// call (all of them after the memslots were replaced), so native stores to them show
    /// in the dirty log.
    fn arm_code_log(&self, tracker: &CodeTracker) -> Result<(), HybridError> {
        let mut log = self.code_log.lock().unwrap_or_else(|p| p.into_inner());
        let words = if std::mem::take(&mut log.full) {
            tracker.log_new_code();
            tracker.take_new_code();
            log.armed = vec![0; tracker.pages().div_ceil(64)];
            tracker.code_pages()
        } else {
            tracker.take_new_code()
        };
        if words.is_empty() {
            return Ok(());
        }
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        for r in slots.iter() {
            let (first, end) = log_words(r);
            let pages = (r.memory_size >> 12) as usize;
            let mine: Vec<(usize, u64)> = words
                .iter()
                .copied()
                .filter(|&(i, _)| i >= first && i < end)
                .collect();
            let (Some(&(lo, _)), Some(&(hi, _))) = (mine.first(), mine.last()) else {
                continue;
            };
            let first_page = (lo - first) * 64;
            let num_pages = ((hi - lo + 1) * 64).min(pages - first_page);
            let mut bitmap = vec![0u64; hi - lo + 1];
            for (i, bits) in mine {
                // Bits past the slot's end are not its pages.
                let valid = match pages.saturating_sub((i - first) * 64) {
                    n if n >= 64 => u64::MAX,
                    n => (1u64 << n) - 1,
                };
                bitmap[i - lo] = bits & valid;
                if let Some(a) = log.armed.get_mut(i) {
                    *a |= bits & valid;
                }
            }
            let mut arg = kvm_clear_dirty_log {
                slot: r.slot,
                num_pages: num_pages as u32,
                first_page: first_page as u64,
                __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                    dirty_bitmap: bitmap.as_mut_ptr().cast(),
                },
            };
            // SAFETY: `arg` names a slot of this VM and a bitmap of at least `num_pages`
            // bits that lives across the call; KVM only reads it.
            let rc = unsafe {
                libc::ioctl(
                    std::os::fd::AsRawFd::as_raw_fd(&self.vm),
                    KVM_CLEAR_DIRTY_LOG,
                    &mut arg,
                )
            };
            if rc != 0 {
                return Err(HybridError::Ioctl {
                    op: "KVM_CLEAR_DIRTY_LOG",
                    source: kvm_ioctls::Error::last(),
                });
            }
        }
        Ok(())
    }

    /// After a stint: the armed code pages native code stored to are noted as written in
    /// `tracker` (x86emu checks their blocks again before running them) and disarmed (the
    /// note unmarks them; marking one again arms it again). Returns how many.
    fn take_code_writes(&self, tracker: &CodeTracker) -> Result<u64, HybridError> {
        let mut log = self.code_log.lock().unwrap_or_else(|p| p.into_inner());
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for r in slots.iter() {
            let (first, end) = log_words(r);
            let end = end.min(log.armed.len());
            let Some(armed) = log.armed.get_mut(first..end) else {
                continue;
            };
            if armed.iter().all(|&w| w == 0) {
                continue;
            }
            let dirty = self
                .vm
                .get_dirty_log(r.slot, r.memory_size as usize)
                .map_err(ioctl("KVM_GET_DIRTY_LOG"))?;
            for (k, (a, d)) in armed.iter_mut().zip(dirty).enumerate() {
                let mut hit = *a & d;
                *a &= !hit;
                while hit != 0 {
                    let pfn = (first + k) * 64 + hit.trailing_zeros() as usize;
                    tracker.note_external_write((pfn as u64) << 12, 4096);
                    hit &= hit - 1;
                    n += 1;
                }
            }
        }
        Ok(n)
    }
}

/// The words of the code tracker's bitmaps (a bit per guest page) that memslot `r` covers:
/// first, end (exclusive). Slots with a dirty log start at a multiple of 64 pages.
fn log_words(r: &kvm_userspace_memory_region) -> (usize, usize) {
    let first = (r.guest_phys_addr >> 12) as usize / 64;
    (first, first + (r.memory_size >> 12).div_ceil(64) as usize)
}

/// The host TSC rate measured against the monotonic clock (when KVM cannot say).
fn calibrate_tsc_hz() -> u64 {
    let t0 = Instant::now();
    // SAFETY: RDTSC has no memory effects.
    let c0 = unsafe { std::arch::x86_64::_rdtsc() };
    std::thread::sleep(Duration::from_millis(20));
    // SAFETY: as above.
    let c1 = unsafe { std::arch::x86_64::_rdtsc() };
    let ns = t0.elapsed().as_nanos().max(1) as u64;
    ((u128::from(c1.wrapping_sub(c0)) * 1_000_000_000) / u128::from(ns)) as u64
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// SIGRTMIN must have a handler (the VMM installs a no-op one): its default action ends
/// the process. Installs a no-op handler if there is none.
fn ensure_kick_handler() {
    let sig = libc::SIGRTMIN();
    // SAFETY: querying the current action into a zeroed sigaction.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only reads the old one.
    if unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) } != 0 {
        return;
    }
    if old.sa_sigaction != libc::SIG_DFL {
        return;
    }
    // SAFETY: a zeroed sigaction with a handler that does nothing (async-signal-safe).
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_kick as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: installing a valid handler.
    unsafe { libc::sigaction(sig, &act, std::ptr::null_mut()) };
}

/// The host range whose protection `drop_translations` changes right now (start, end; 0
/// when none): another thread's store there (a device's DMA) waits for it to end.
static DROP_START: AtomicUsize = AtomicUsize::new(0);
static DROP_END: AtomicUsize = AtomicUsize::new(0);
/// The SIGSEGV handler installed before (Rust's stack-overflow report), as an address.
static OLD_SEGV: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_segv(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let mut waited = false;
    loop {
        let (start, end) = (
            DROP_START.load(Ordering::SeqCst),
            DROP_END.load(Ordering::SeqCst),
        );
        if start == 0 || addr < start || addr >= end {
            break;
        }
        waited = true;
        // SAFETY: sched_yield is async-signal-safe and has no memory effects.
        unsafe { libc::sched_yield() };
    }
    if !waited {
        // A fault of the VMM's own: what handled it before (Rust's stack-overflow report,
        // which then lets it end the process), or the end.
        let old = OLD_SEGV.load(Ordering::SeqCst);
        if old == 0 {
            // SAFETY: abort does not return.
            unsafe { libc::abort() };
        }
        // SAFETY: `old` is the SA_SIGINFO handler that was installed, called as the
        // kernel would have called it.
        let old: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(old) };
        old(sig, info, ctx);
    }
    // Returning runs the store again, now that the page is writable.
}

/// A SIGSEGV handler that holds a store to guest RAM made while `drop_translations`
/// has its page read-only, and ends the process on any other fault.
fn ensure_segv_guard() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with an async-signal-safe handler.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_segv as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: as above, for the action it replaces.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: installing a valid handler, keeping the old action.
        if unsafe { libc::sigaction(libc::SIGSEGV, &act, &mut old) } == 0
            && old.sa_flags & libc::SA_SIGINFO != 0
            && old.sa_sigaction > 1
        {
            OLD_SEGV.store(old.sa_sigaction, Ordering::SeqCst);
        }
    });
}

/// How another thread gets a vCPU out of KVM_RUN.
#[derive(Debug, Default)]
pub struct Kicker {
    in_kvm: AtomicBool,
    /// The vCPU thread and the address of its kvm_run's `immediate_exit` byte.
    target: Mutex<Option<(libc::pthread_t, usize)>>,
    kicks: std::sync::atomic::AtomicU64,
}

impl Kicker {
    /// Called by the irqchip when an event is pending for the vCPU.
    pub fn kick(&self) {
        fence(Ordering::SeqCst);
        if !self.in_kvm.load(Ordering::SeqCst) {
            return;
        }
        let target = self.target.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((thread, immediate_exit)) = *target {
            self.kicks.fetch_add(1, Ordering::Relaxed);
            // SAFETY: `immediate_exit` points into the vCPU's kvm_run mapping, which lives
            // while `target` is set (cleared under this lock before the vCPU fd closes);
            // AtomicU8 has u8's layout, and KVM reads the byte at each KVM_RUN entry.
            unsafe { (*(immediate_exit as *const AtomicU8)).store(1, Ordering::SeqCst) };
            // SAFETY: the vCPU thread is alive while `target` is set; the signal's handler
            // does nothing, it only interrupts KVM_RUN.
            unsafe { libc::pthread_kill(thread, libc::SIGRTMIN()) };
        }
    }
}

/// A POSIX timer that sends SIGRTMIN to one thread.
struct StintTimer(libc::timer_t);

// SAFETY: a timer id is a process-wide handle; timer_settime/timer_delete work from any
// thread.
unsafe impl Send for StintTimer {}

impl StintTimer {
    fn for_this_thread() -> std::io::Result<Self> {
        // SAFETY: a zeroed sigevent is valid; the fields set below are the ones used.
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = libc::SIGRTMIN();
        // SAFETY: gettid has no preconditions.
        sev.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: valid pointers to a sigevent and to the id to fill.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut id) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(StintTimer(id))
    }

    fn set(&self, first: Duration, every: Duration) {
        let ts = |d: Duration| libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        };
        let spec = libc::itimerspec {
            it_interval: ts(every),
            it_value: ts(first),
        };
        // SAFETY: a live timer id and a valid itimerspec.
        unsafe { libc::timer_settime(self.0, 0, &spec, std::ptr::null_mut()) };
    }

    fn disarm(&self) {
        self.set(Duration::ZERO, Duration::ZERO);
    }
}

impl Drop for StintTimer {
    fn drop(&mut self) {
        // SAFETY: the id came from timer_create and is deleted once.
        unsafe { libc::timer_delete(self.0) };
    }
}

/// Why a native stint ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StintEnd {
    /// User code needs the kernel (SYSCALL, exception): x86emu goes on from the instruction.
    Kernel,
    /// An interrupt or timer is due, or the VMM kicked the thread.
    Kicked,
    /// A timer is due too soon for a stint: nothing ran, x86emu goes on.
    NotEntered,
}

/// Counters, logged when the vCPU goes away.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub stints: u64,
    pub kernel_exits: u64,
    pub syscalls: u64,
    pub kicked_exits: u64,
    pub mmio_exits: u64,
    pub slot_refreshes: u64,
    pub native: Duration,
    pub switch: Duration,
    /// Time spent replacing memslots or dropping translations (part of `switch`).
    pub refresh: Duration,
    /// Pages whose translations KVM dropped (instead of replacing the memslots).
    pub page_drops: u64,
    /// Code pages native code stored to (seen in KVM's dirty log).
    pub code_writes: u64,
    /// Emulated probe slices that ran user code only, and the others.
    pub user_slices: u64,
    pub other_slices: u64,
}

/// One vCPU's KVM half and the policy that decides when to use it.
pub struct HybridVcpu {
    vm: Arc<HybridVm>,
    id: u32,
    /// Made with the vCPU, on the thread that builds the VM, so the vCPU's thread knows
    /// it from the start (its seccomp filter allows vCPU requests on this descriptor
    /// only) and never creates one; None when KVM refused (the vCPU stays on x86emu).
    fd: Option<VcpuFd>,
    /// Whether `ensure_vcpu` set `fd` up (CPUID, MSRs) on the vCPU's own thread.
    prepared: bool,
    timer: Option<StintTimer>,
    kicker: Arc<Kicker>,
    template: kvm_sregs,
    last_sregs: Option<kvm_sregs>,
    /// The FPU state KVM holds (what was last loaded or read back).
    last_fpu: Option<x86emu::FpuState>,
    xstate_avx: bool,
    tsc_aux: Option<u64>,
    flushes_seen: Option<u64>,
    /// User-only probe slices seen in a row, and how many each address space (by CR3)
    /// needs before a stint: processes differ (in a pipeline, one makes a system call
    /// every few microseconds, the other computes for milliseconds).
    streak: u32,
    need: std::collections::HashMap<u64, u32>,
    /// Set after an error: this vCPU stays on x86emu.
    disabled: bool,
    last_log: Instant,
    pub stats: Stats,
}

impl HybridVcpu {
    pub fn new(vm: Arc<HybridVm>, id: u32) -> Self {
        vm.vcpus.fetch_add(1, Ordering::SeqCst);
        let fd = match vm.vm.create_vcpu(u64::from(id)) {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!(
                    vcpu = id,
                    "hybrid: KVM_CREATE_VCPU: {e}; this vCPU stays on x86emu"
                );
                None
            }
        };
        HybridVcpu {
            vm,
            id,
            disabled: fd.is_none(),
            fd,
            prepared: false,
            timer: None,
            kicker: Arc::new(Kicker::default()),
            template: kvm_sregs::default(),
            last_sregs: None,
            last_fpu: None,
            xstate_avx: true,
            tsc_aux: None,
            flushes_seen: None,
            streak: 0,
            need: std::collections::HashMap::new(),
            last_log: Instant::now(),
            stats: Stats::default(),
        }
    }

    pub fn kicker(&self) -> Arc<Kicker> {
        self.kicker.clone()
    }

    /// Whether `cpu` is at CPL3 in 64-bit mode with the selectors PVM accepts, and can
    /// take interrupts (so nothing in its own state forbids moving it to KVM).
    pub fn eligible(&self, cpu: &Cpu) -> bool {
        if self.disabled {
            return false;
        }
        let s = cpu.state();
        let cs = &s.seg[Seg::Cs as usize];
        let ss = &s.seg[Seg::Ss as usize];
        s.efer & (1 << 10) != 0
            && s.cr0 & (1 << 31) != 0
            && cs.selector == USER_CS
            && ss.selector == USER_SS
            && cs.attr & x86emu::Segment::ATTR_L != 0
            && s.rflags & (RFLAGS_TF | RFLAGS_VM) == 0
            && s.dr[7] & 0xff == 0
            && s.cr4 & CR4_NOT_CARRIED == 0
            && cpu.interrupts_enabled()
    }

    /// The emulated slice length to use while `cpu` is eligible.
    pub fn probe_slice(&self) -> u64 {
        PROBE_SLICE
    }

    /// After an emulated slice: whether it ran user code only (CPL3 at both ends, no
    /// kernel entry in between).
    pub fn note_slice(&mut self, user_only: bool) {
        if user_only {
            self.streak = self.streak.saturating_add(1);
            self.stats.user_slices += 1;
        } else {
            self.streak = 0;
            self.stats.other_slices += 1;
        }
    }

    /// Whether enough user-only slices ran in a row (for this address space) to try a
    /// native stint. When the entry has to replace the memslots first (see
    /// `refresh_due`), that costs ~0.1-20 ms here: ask for a stretch of user code about as
    /// long as the refresh (one probe slice is ~70 µs of emulation) before paying it.
    pub fn ready(&mut self, cpu: &mut Cpu) -> bool {
        let need = self.need_of(cpu.state().cr3);
        if self.streak < need {
            return false;
        }
        let need = if self.refresh_due(cpu) {
            let mean_us = (self.stats.refresh.as_micros() as u64)
                .checked_div(self.stats.slot_refreshes)
                .unwrap_or(0);
            need.max(((mean_us / 70) as u32).clamp(1, MAX_NEED))
        } else {
            need
        };
        self.streak >= need
    }

    fn need_of(&self, cr3: u64) -> u32 {
        self.need.get(&(cr3 & CR3_ROOT)).copied().unwrap_or(1)
    }

    fn set_need(&mut self, cr3: u64, need: u32) {
        if self.need.len() >= MAX_SPACES {
            self.need.clear();
        }
        self.need.insert(cr3 & CR3_ROOT, need);
    }

    /// Whether KVM's dirty log tells which code pages native code stored to (one vCPU:
    /// with several, another's stint could store while this one's x86emu runs).
    fn code_log_active(&self) -> bool {
        self.vm.code_log_on.load(Ordering::Relaxed) && self.vm.vcpus.load(Ordering::Relaxed) == 1
    }

    /// Whether KVM watches its copies of the page tables through `TableWatch`.
    fn watching(&self) -> bool {
        !self.vm.watch_off && self.vm.vcpus.load(Ordering::Relaxed) == 1
    }

    fn watch(&self) -> std::sync::MutexGuard<'_, TableWatch> {
        self.vm.watch.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the next entry has to drop KVM's copies of the page tables first.
    fn refresh_due(&mut self, cpu: &mut Cpu) -> bool {
        if self.watching() {
            self.watch().sync(cpu) == TableSync::Stale
        } else {
            self.flushes_seen.is_some_and(|f| f != cpu.tlb_flushes())
        }
    }

    /// Replaces the memslots (dropping all of KVM's shadow page tables), counted.
    fn refresh_slots(&mut self) -> Result<(), HybridError> {
        let t = Instant::now();
        self.vm.refresh_slots()?;
        self.stats.slot_refreshes += 1;
        self.stats.refresh += t.elapsed();
        Ok(())
    }

    /// The KVM vCPU's descriptor, for the vCPU thread's seccomp filter.
    pub fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        self.fd.as_ref().map(std::os::fd::AsRawFd::as_raw_fd)
    }

    fn ensure_vcpu(&mut self) -> Result<(), HybridError> {
        if self.prepared {
            return Ok(());
        }
        let mut fd = self.fd.take().ok_or_else(no_vcpu)?;
        let prepared = self.prepare(&mut fd);
        // Kept whatever happened: the descriptor's number stays the vCPU's.
        self.fd = Some(fd);
        prepared?;
        self.prepared = true;
        Ok(())
    }

    /// Sets the KVM vCPU up on its own thread: CPUID, MSRs, its timer and kicker.
    fn prepare(&mut self, fd: &mut VcpuFd) -> Result<(), HybridError> {
        fd.set_cpuid2(&self.vm.cpuid)
            .map_err(ioctl("KVM_SET_CPUID2"))?;
        let set_msr = |fd: &VcpuFd, index: u32, data: u64| -> bool {
            Msrs::from_entries(&[kvm_msr_entry {
                index,
                data,
                ..Default::default()
            }])
            .ok()
            .and_then(|m| fd.set_msrs(&m).ok())
                == Some(1)
        };
        if !set_msr(fd, MSR_LSTAR, LSTAR_MARK) {
            return Err(HybridError::Unexpected("KVM refused LSTAR".into()));
        }
        // CPUID faulting, so user CPUID is answered by x86emu's table, not the host's.
        let faulting = set_msr(fd, MSR_MISC_FEATURES_ENABLES, 1);
        tracing::info!(
            vcpu = self.id,
            cpuid_faulting = faulting,
            "hybrid: KVM vCPU set up"
        );
        self.template = fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        let timer = StintTimer::for_this_thread()
            .map_err(|e| HybridError::Unexpected(format!("timer_create: {e}")))?;
        let immediate_exit = std::ptr::addr_of_mut!(fd.get_kvm_run().immediate_exit) as usize;
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        *self.kicker.target.lock().unwrap_or_else(|p| p.into_inner()) = Some((me, immediate_exit));
        self.timer = Some(timer);
        Ok(())
    }

    fn sregs_for(&self, cpu: &Cpu) -> kvm_sregs {
        let s = cpu.state();
        let mut k = self.template;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: USER_CS,
            type_: 0xb,
            present: 1,
            dpl: 3,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = |sel: u16, base: u64| kvm_segment {
            selector: sel,
            base,
            type_: 3,
            db: 1,
            l: 0,
            ..code
        };
        let seg = |x: Seg| &s.seg[x as usize];
        k.cs = code;
        k.ss = data(USER_SS, 0);
        k.ds = data(seg(Seg::Ds).selector, 0);
        k.es = data(seg(Seg::Es).selector, 0);
        k.fs = data(seg(Seg::Fs).selector, seg(Seg::Fs).base);
        k.gs = data(seg(Seg::Gs).selector, seg(Seg::Gs).base);
        k.tr = kvm_segment {
            selector: 0x40,
            type_: 0xb,
            s: 0,
            db: 0,
            limit: 0x67,
            g: 0,
            ..data(0, 0)
        };
        k.ldt = kvm_segment {
            unusable: 1,
            present: 0,
            ..data(0, 0)
        };
        // No IDT and no GDT: every event escalates to a shutdown exit.
        k.idt.base = 0;
        k.idt.limit = 0;
        k.gdt.base = 0;
        k.gdt.limit = 0;
        k.cr0 = s.cr0;
        k.cr3 = s.cr3 & 0x000f_ffff_ffff_f000;
        k.cr4 = s.cr4 & CR4_KVM_MASK;
        k.efer = s.efer;
        k
    }

    fn load_xsave(&mut self, fpu: &x86emu::FpuState) -> Result<(), HybridError> {
        if self.last_fpu.as_ref() == Some(fpu) {
            return Ok(());
        }
        let img = convert::fpu_from_emu(fpu).fxsave;
        let mut xs = kvm_xsave::default();
        for (w, b) in xs.region.iter_mut().zip(img.chunks_exact(4)) {
            *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        for (i, y) in fpu.ymm_hi.iter().enumerate() {
            for d in 0..4 {
                xs.region[144 + i * 4 + d] = (y >> (32 * d)) as u32;
            }
        }
        let fd = self.fd.as_ref().ok_or_else(no_vcpu)?;
        xs.region[128] = if self.xstate_avx { 7 } else { 3 };
        // SAFETY: `xs` is a whole 4 KiB kvm_xsave, as the legacy ioctl expects.
        if unsafe { fd.set_xsave(&xs) }.is_err() && self.xstate_avx {
            // A host whose KVM refuses AVX state: carry x87/SSE only.
            self.xstate_avx = false;
            xs.region[128] = 3;
            // SAFETY: as above.
            unsafe { fd.set_xsave(&xs) }.map_err(ioctl("KVM_SET_XSAVE"))?;
        }
        self.last_fpu = Some(*fpu);
        Ok(())
    }

    fn save_xsave(&mut self, fpu: &mut x86emu::FpuState) -> Result<(), HybridError> {
        let fd = self.fd.as_ref().ok_or_else(no_vcpu)?;
        let xs = fd.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?;
        let mut img = [0u8; 512];
        for (b, w) in img.chunks_exact_mut(4).zip(xs.region.iter()) {
            b.copy_from_slice(&w.to_le_bytes());
        }
        let bv = xs.region[128];
        let mut f = hypervisor::FpuState { fxsave: img };
        if bv & 1 == 0 {
            // x87 in its initial state.
            let init = hypervisor::FpuState::default();
            f.fxsave[..24].copy_from_slice(&init.fxsave[..24]);
            f.fxsave[32..160].fill(0);
        }
        if bv & 2 == 0 {
            f.fxsave[160..416].fill(0);
        }
        convert::fpu_into_emu(&f, fpu);
        for (i, y) in fpu.ymm_hi.iter_mut().enumerate() {
            *y = if bv & 4 == 0 {
                0
            } else {
                (0..4).fold(0u128, |acc, d| {
                    acc | (u128::from(xs.region[144 + i * 4 + d]) << (32 * d))
                })
            };
        }
        self.last_fpu = Some(*fpu);
        Ok(())
    }

    /// Run `cpu`'s user code on the KVM vCPU until it needs the kernel, an interrupt or
    /// timer is due, or the thread is kicked; `cpu` then holds the state to go on from.
    /// `next_deadline` gives the interrupt controller's next deadline from now, `pending`
    /// whether an event is pending for this vCPU; MMIO and port I/O exits go to `platform`.
    pub fn run(
        &mut self,
        cpu: &mut Cpu,
        platform: &mut dyn Platform,
        next_deadline: &dyn Fn() -> Option<Duration>,
        pending: &dyn Fn() -> bool,
    ) -> Result<StintEnd, HybridError> {
        if next_deadline().is_some_and(|d| d < MIN_STINT) {
            // A timer is due before a stint could pay for its switch.
            return Ok(StintEnd::NotEntered);
        }
        let r = self.run_inner(cpu, platform, next_deadline, pending);
        if r.is_err() {
            self.disabled = true;
        }
        r
    }

    fn run_inner(
        &mut self,
        cpu: &mut Cpu,
        platform: &mut dyn Platform,
        next_deadline: &dyn Fn() -> Option<Duration>,
        pending: &dyn Fn() -> bool,
    ) -> Result<StintEnd, HybridError> {
        let t_in = Instant::now();
        self.ensure_vcpu()?;
        self.streak = 0;
        let flushes = cpu.tlb_flushes();
        if self.watching() {
            let cr3 = cpu.state().cr3;
            let vm = self.vm.clone();
            let mut w = vm.watch.lock().unwrap_or_else(|p| p.into_inner());
            let mut sync = w.sync(cpu);
            if sync == TableSync::Pages {
                let t = Instant::now();
                let lost = w.take_lost_pages();
                match vm.drop_translations(&lost) {
                    Ok(()) => {
                        self.stats.page_drops += lost.len() as u64;
                        self.stats.refresh += t.elapsed();
                    }
                    Err(e) => {
                        tracing::debug!("hybrid: dropping KVM's translations to pages: {e}");
                        w.set_stale();
                        sync = TableSync::Stale;
                    }
                }
            }
            if sync == TableSync::Stale {
                self.refresh_slots()?;
                w.restart(cpu, cr3);
            } else {
                w.add_root(cpu, cr3);
            }
        } else if self.refresh_due(cpu) {
            self.refresh_slots()?;
        }
        self.flushes_seen = Some(flushes);
        let tracker = cpu.code_tracker();
        let code_log = self.code_log_active() && {
            let armed = self.vm.arm_code_log(&tracker);
            if let Err(e) = &armed {
                tracing::debug!("hybrid: arming the code log: {e}");
                self.vm.code_log_on.store(false, Ordering::SeqCst);
            }
            armed.is_ok()
        };

        let s = cpu.state();
        let mut regs = hypervisor::kvm::regs_to_kvm(&convert::regs_from_emu(s));
        regs.rflags = (s.rflags | 2) & !RFLAGS_RF;
        let sregs = self.sregs_for(cpu);
        let tsc_aux = s.msr.tsc_aux;
        let fpu = s.fpu;
        let fsgsbase = s.cr4 & CR4_FSGSBASE != 0;
        {
            let fd = self.fd.as_ref().ok_or_else(no_vcpu)?;
            fd.set_regs(&regs).map_err(ioctl("KVM_SET_REGS"))?;
            if self.last_sregs != Some(sregs) {
                fd.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
                self.last_sregs = Some(sregs);
            }
            if self.tsc_aux != Some(tsc_aux) {
                let m = Msrs::from_entries(&[kvm_msr_entry {
                    index: MSR_TSC_AUX,
                    data: tsc_aux,
                    ..Default::default()
                }])
                .map_err(|e| HybridError::Unexpected(format!("MSR list: {e:?}")))?;
                fd.set_msrs(&m).map_err(ioctl("KVM_SET_MSRS"))?;
                self.tsc_aux = Some(tsc_aux);
            }
        }
        self.load_xsave(&fpu)?;

        let t_run = Instant::now();
        let ram = cpu.ram();
        let end = self.run_loop(ram, platform, next_deadline, pending)?;
        let t_out = Instant::now();

        let fd = self.fd.as_ref().ok_or_else(no_vcpu)?;
        let mut r = fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
        // A SYSCALL may also show after a kick: the signal can end KVM_RUN before KVM
        // turns the event into a shutdown exit (which then comes at the next entry, and is
        // harmless: x86emu runs the instruction at RIP).
        let code = |va: u64, n: usize| read_user(cpu, va, n);
        if r.rip == LSTAR_MARK && code(r.rcx.wrapping_sub(2), 2) == Some(vec![0x0f, 0x05]) {
            // SYSCALL: RCX holds the address after it; x86emu runs it again.
            r.rip = r.rcx.wrapping_sub(2);
            r.rflags = r.r11;
            self.stats.syscalls += 1;
        } else if end == StintEnd::Kernel
            && r.rflags & RFLAGS_RF == 0
            && code(r.rip.wrapping_sub(1), 1) == Some(vec![0xcc])
        {
            // A trap (int3) leaves RIP after the instruction: back up over the 0xCC.
            r.rip = r.rip.wrapping_sub(1);
        } else if r.rip == LSTAR_MARK {
            return Err(HybridError::Unexpected(format!(
                "KVM_RUN ended at the LSTAR marker without a SYSCALL before {:#x}",
                r.rcx
            )));
        }
        let fs_gs = if fsgsbase {
            let k = fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
            // Keep the cached copy in step with what KVM now holds.
            if let Some(last) = &mut self.last_sregs {
                last.fs.base = k.fs.base;
                last.gs.base = k.gs.base;
            }
            Some((k.fs.base, k.gs.base))
        } else {
            None
        };
        let mut fpu = fpu;
        self.save_xsave(&mut fpu)?;
        let code_writes = code_log
            .then(|| self.vm.take_code_writes(&tracker))
            .and_then(|r| {
                r.inspect_err(|e| {
                    tracing::debug!("hybrid: reading the code log: {e}");
                    self.vm.code_log_on.store(false, Ordering::SeqCst);
                })
                .ok()
            });
        match code_writes {
            Some(n) => self.stats.code_writes += n,
            None => cpu.code_written_elsewhere(),
        }
        let s = cpu.state_mut();
        convert::regs_into_emu(&hypervisor::kvm::regs_from_kvm(&r), s);
        s.rflags &= !RFLAGS_RF;
        s.fpu = fpu;
        if let Some((fs, gs)) = fs_gs {
            s.seg[Seg::Fs as usize].base = fs;
            s.seg[Seg::Gs as usize].base = gs;
        }

        if self.last_log.elapsed() > STATS_EVERY {
            self.last_log = Instant::now();
            self.log_stats("hybrid vCPU statistics so far");
        }
        let native = t_out - t_run;
        self.stats.stints += 1;
        self.stats.native += native;
        self.stats.switch += (t_run - t_in) + t_out.elapsed();
        let cr3 = cpu.state().cr3;
        match end {
            StintEnd::Kernel => {
                self.stats.kernel_exits += 1;
                // Short stretches of user code between kernel entries: emulating them is
                // cheaper than the switch; ask for longer user-only stretches first.
                let need = if native < SHORT_STINT {
                    (self.need_of(cr3) * 2).min(MAX_NEED)
                } else {
                    1
                };
                self.set_need(cr3, need);
            }
            StintEnd::Kicked | StintEnd::NotEntered => {
                self.stats.kicked_exits += 1;
                self.set_need(cr3, 1);
            }
        }
        Ok(end)
    }

    fn run_loop(
        &mut self,
        ram: &x86emu::GuestRam,
        platform: &mut dyn Platform,
        next_deadline: &dyn Fn() -> Option<Duration>,
        pending: &dyn Fn() -> bool,
    ) -> Result<StintEnd, HybridError> {
        let kicker = self.kicker.clone();
        let fd = self.fd.as_mut().ok_or_else(no_vcpu)?;
        let timer = self.timer.as_ref().ok_or_else(no_vcpu)?;
        loop {
            let until = next_deadline().unwrap_or(MAX_STINT).min(MAX_STINT);
            if until < MIN_STINT {
                return Ok(StintEnd::Kicked);
            }
            timer.set(until, MAX_STINT);
            fd.set_kvm_immediate_exit(0);
            kicker.in_kvm.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if pending() {
                kicker.in_kvm.store(false, Ordering::SeqCst);
                timer.disarm();
                return Ok(StintEnd::Kicked);
            }
            let exit = fd.run();
            kicker.in_kvm.store(false, Ordering::SeqCst);
            timer.disarm();
            match exit {
                Ok(KvmExit::Shutdown) => return Ok(StintEnd::Kernel),
                Ok(KvmExit::Intr) => return Ok(StintEnd::Kicked),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    return Ok(StintEnd::Kicked)
                }
                // User code touched device memory (or RAM while a memslot was being
                // replaced for another vCPU): serve it as x86emu would.
                // RAM shows up as MMIO while another vCPU replaces the memslots.
                Ok(KvmExit::MmioRead(addr, data)) => {
                    if !ram.read(addr, data) {
                        platform.mmio_read(addr, data);
                    }
                }
                Ok(KvmExit::MmioWrite(addr, data)) => {
                    if !ram.write(addr, data) {
                        platform.mmio_write(addr, data);
                    }
                }
                Ok(KvmExit::IoIn(port, data)) => {
                    platform.pio_read(port, data);
                }
                Ok(KvmExit::IoOut(port, data)) => {
                    platform.pio_write(port, data);
                }
                Ok(other) => {
                    return Err(HybridError::Unexpected(format!(
                        "KVM_RUN at CPL3 ended with {other:?}"
                    )))
                }
                Err(e) => {
                    return Err(HybridError::Ioctl {
                        op: "KVM_RUN",
                        source: e,
                    })
                }
            }
            self.stats.mmio_exits += 1;
            // Complete the access inside KVM without running on.
            fd.set_kvm_immediate_exit(1);
            match fd.run() {
                Err(e) if e.errno() == libc::EINTR => {}
                other => {
                    return Err(HybridError::Unexpected(format!(
                        "completing an I/O exit: {other:?}"
                    )))
                }
            }
            fd.set_kvm_immediate_exit(0);
        }
    }
}

/// `n` bytes of guest memory at user virtual address `va`, through the guest's 4-level
/// page tables as `cpu` has them (None if any page is not present or not user-accessible).
fn read_user(cpu: &Cpu, va: u64, n: usize) -> Option<Vec<u8>> {
    let ram = cpu.ram();
    let cr3 = cpu.state().cr3 & 0x000f_ffff_ffff_f000;
    let mut out = vec![0u8; n];
    for (i, b) in out.iter_mut().enumerate() {
        let va = va.wrapping_add(i as u64);
        let mut table = cr3;
        let mut gpa = None;
        for level in (0..4).rev() {
            let idx = (va >> (12 + 9 * level)) & 511;
            let mut e = [0u8; 8];
            if !ram.read(table + idx * 8, &mut e) {
                return None;
            }
            let e = u64::from_le_bytes(e);
            if e & 1 == 0 || e & 4 == 0 {
                return None;
            }
            let frame = e & 0x000f_ffff_ffff_f000;
            if level == 0 {
                gpa = Some(frame | (va & 0xfff));
            } else if (level == 1 || level == 2) && e & 0x80 != 0 {
                let size = 1u64 << (12 + 9 * level);
                gpa = Some((frame & !(size - 1)) | (va & (size - 1)));
                break;
            } else {
                table = frame;
            }
            if gpa.is_some() {
                break;
            }
        }
        ram.read(gpa?, std::slice::from_mut(b)).then_some(())?;
    }
    Some(out)
}

fn no_vcpu() -> HybridError {
    HybridError::Unexpected("no KVM vCPU".into())
}

impl Drop for HybridVcpu {
    fn drop(&mut self) {
        // The kvm_run mapping goes with the fd: nobody may write to it after this.
        *self.kicker.target.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.log_stats("hybrid vCPU statistics");
    }
}

impl HybridVcpu {
    fn log_stats(&self, what: &str) {
        let s = &self.stats;
        tracing::info!(
            vcpu = self.id,
            stints = s.stints,
            kernel_exits = s.kernel_exits,
            syscalls = s.syscalls,
            kicked_exits = s.kicked_exits,
            kicks = self.kicker.kicks.load(Ordering::Relaxed),
            mmio_exits = s.mmio_exits,
            slot_refreshes = s.slot_refreshes,
            page_drops = s.page_drops,
            code_writes = s.code_writes,
            watched_tables = self.watch().tables(),
            native_ms = s.native.as_secs_f64() * 1e3,
            switch_us_mean = if s.stints > 0 {
                s.switch.as_secs_f64() * 1e6 / s.stints as f64
            } else {
                0.0
            },
            refresh_ms = s.refresh.as_secs_f64() * 1e3,
            switch_ms = s.switch.as_secs_f64() * 1e3,
            emulated_user_slices = s.user_slices,
            emulated_other_slices = s.other_slices,
            "{what}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store by another thread to a page made read-only for a translation drop waits
    /// for the page to be writable again, and lands.
    #[test]
    fn a_store_during_a_translation_drop_waits_and_lands() {
        ensure_segv_guard();
        const LEN: usize = 4096;
        // SAFETY: a fresh anonymous mapping, unmapped at the end.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let addr = p as usize;
        DROP_START.store(addr, Ordering::SeqCst);
        DROP_END.store(addr + LEN, Ordering::SeqCst);
        // SAFETY: the page mapped above.
        assert_eq!(unsafe { libc::mprotect(p, LEN, libc::PROT_READ) }, 0);
        let writer = std::thread::spawn(move || {
            let q = (addr + 64) as *mut u64;
            // SAFETY: a page of this test's mapping; the store faults until it is
            // writable again, and the guard holds it until then.
            unsafe { std::ptr::write_volatile(q, 0x1234) };
            Instant::now()
        });
        std::thread::sleep(Duration::from_millis(50));
        let reopened = Instant::now();
        // SAFETY: the page mapped above.
        let restored = unsafe { libc::mprotect(p, LEN, libc::PROT_READ | libc::PROT_WRITE) };
        assert_eq!(restored, 0);
        DROP_START.store(0, Ordering::SeqCst);
        let stored = writer.join().expect("the writer thread");
        assert!(stored >= reopened, "the store did not wait for the page");
        // SAFETY: the page mapped above, writable again.
        let v = unsafe { std::ptr::read_volatile((addr + 64) as *const u64) };
        assert_eq!(v, 0x1234);
        // SAFETY: unmapping the mapping made above.
        unsafe { libc::munmap(p, LEN) };
    }
}
