//! Compiled code shared by the CPUs of one machine.
//!
//! Each CPU used to compile every hot block for itself, so a guest with N vCPUs ran each
//! block interpreted up to `threshold` times and compiled it up to N times (an 8-vCPU
//! Linux boot interpreted three times as many instructions as a 1-vCPU one). Here a block
//! is compiled once, by the first CPU that finds it hot, and every other CPU whose
//! decoded block has the same bytes at the same place runs that code at once.
//!
//! The code is one memfd, written through one read-write mapping. Each CPU maps it
//! read-execute at an address of its own, with a private read-write region right after
//! it (`View`): compiled code reaches what differs per CPU either through R15 (the state
//! and `Ctx`) or through its block's record in that region, at a fixed distance from the
//! code (see `emit::RECORD_SLOT`), so the same bytes run correctly in every view. Links
//! between blocks live in the records: a CPU chains only blocks it checked itself.
//!
//! Code is never changed once placed: a block whose guest bytes change is decoded and
//! compiled again elsewhere. When the memory is full, every CPU drops its compiled blocks
//! and the memory is reused once each has (a CPU outside `Cpu::run` runs no compiled code
//! and drops its blocks before it runs again): see `Jit::quiesce`.

use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Where a CPU stands with a flush of the shared code (see `Shared::try_reset`).
#[derive(Debug, Default)]
pub(crate) struct Mark {
    /// Inside `Cpu::run`, where compiled code may run.
    pub(crate) in_run: AtomicBool,
    /// The last flush this CPU dropped its compiled blocks for.
    pub(crate) seen: AtomicU64,
}

/// What a compiled block is compiled from: the same bytes at the same guest-physical
/// address and IP, in the same mode, for the same CPU model, compile to the same code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub(crate) gpa: u64,
    pub(crate) ip: u64,
    /// The block cache's bitness byte (page-crossing blocks have their own).
    pub(crate) bitness: u8,
    /// For a page-crossing block, the physical page its bytes continue in.
    pub(crate) cross_gpa: u64,
    pub(crate) model: u64,
}

/// A block's code in the shared memory, as offsets from its start.
#[derive(Debug)]
pub(crate) struct Placed {
    /// The guest bytes it was compiled from, and the IP of the first.
    pub(crate) bytes: Box<[u8]>,
    pub(crate) ip: u64,
    pub(crate) off: usize,
    pub(crate) len: usize,
    /// Where its record lies in each CPU's record region.
    pub(crate) rec: usize,
    pub(crate) entry: usize,
    pub(crate) chain_entry: usize,
    /// Per link slot of the record: the offset of the exit's unlinked path, and whether it
    /// goes forward.
    pub(crate) links: Box<[(usize, bool)]>,
}

/// Code placed for a decoded block (see `Decoded::placed`): valid while the memory is at
/// the flush it was placed in (the count in `Shared::flush` has not moved), for the CPU
/// model it was compiled for.
#[derive(Debug)]
pub(crate) struct PlacedFor {
    pub(crate) flush: u64,
    pub(crate) model: u64,
    pub(crate) code: Arc<Placed>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    /// Bytes placed, from the start (the runtime first: `pinned` bytes kept across
    /// flushes).
    pub(crate) used: usize,
    pub(crate) pinned: usize,
    /// Bytes of every CPU's record region handed out (records are packed: a CPU touches
    /// only the pages that hold the records of blocks it runs).
    pub(crate) records: usize,
    pub(crate) blocks: FxHashMap<Key, Arc<Placed>>,
    /// Runs of blocks not compiled yet, summed over the CPUs that reported them: a block
    /// every CPU runs a little is hot for the machine (see `Jit::compile`).
    pub(crate) heat: FxHashMap<Key, u32>,
    /// The flush (see `Shared::flush`) whose memory was last given back.
    pub(crate) reset: u64,
    pub(crate) marks: Vec<Arc<Mark>>,
}

/// The code memory of one machine.
#[derive(Debug)]
pub(crate) struct Shared {
    fd: libc::c_int,
    rw: *mut u8,
    pub(crate) len: usize,
    /// Moves when the memory is full: every CPU must drop its compiled blocks.
    pub(crate) flush: AtomicU64,
    /// CPUs with a view (`inner.marks.len()`), readable without the lock.
    pub(crate) cpus: std::sync::atomic::AtomicUsize,
    pub(crate) inner: Mutex<Inner>,
    /// Offsets of the runtime's entry points (see `emit::Runtime`), placed first.
    pub(crate) rt: [usize; 4],
}

// SAFETY: the raw pointer is the writable mapping, written only under `inner`'s lock at
// offsets no CPU runs yet (see `Shared::place`); the descriptor is only mapped.
unsafe impl Send for Shared {}
// SAFETY: as for Send.
unsafe impl Sync for Shared {}

impl Shared {
    /// The memory, with the runtime `runtime` assembles (given where it lands) placed at
    /// its start. None when the host refuses the mappings (the CPU then only interprets).
    pub(crate) fn new(
        len: usize,
        runtime: impl FnOnce(u64) -> Option<(Vec<u8>, [u64; 4])>,
    ) -> Option<Self> {
        let fd = codemem::memfd()?;
        // SAFETY: `fd` is the memfd just created.
        let sized = unsafe { libc::ftruncate(fd, len as libc::off_t) } == 0;
        // SAFETY: a fresh shared mapping of the memfd just sized; no existing memory is
        // touched.
        let rw = sized.then(|| unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        });
        let rw = match rw {
            Some(p) if p != libc::MAP_FAILED => p.cast::<u8>(),
            _ => {
                // SAFETY: closes the descriptor made above, which nothing else holds.
                unsafe { libc::close(fd) };
                return None;
            }
        };
        let mut s = Shared {
            fd,
            rw,
            len,
            flush: AtomicU64::new(0),
            cpus: Default::default(),
            inner: Mutex::new(Inner {
                used: 0,
                pinned: 0,
                records: 0,
                blocks: FxHashMap::default(),
                heat: FxHashMap::default(),
                reset: 0,
                marks: Vec::new(),
            }),
            rt: [0; 4],
        };
        // The runtime is assembled for address 0 + its offsets: it has no absolute
        // references (only labels), so it runs the same in every view.
        let (code, at) = runtime(0)?;
        if code.len() > len {
            return None;
        }
        s.write(0, &code);
        s.rt = at.map(|a| a as usize);
        let inner = s.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        inner.used = code.len();
        inner.pinned = code.len();
        Some(s)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Copies `code` to offset `off` (the caller holds the lock and no CPU runs there).
    fn write(&self, off: usize, code: &[u8]) {
        if off
            .checked_add(code.len())
            .is_some_and(|end| end <= self.len)
        {
            // SAFETY: off..off + len lies inside the writable mapping, and no code that
            // runs lies there (offsets past `used`, or memory given back by a flush).
            unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), self.rw.add(off), code.len()) };
        }
    }

    /// Where the next block lands (16-byte aligned), and the room after it.
    pub(crate) fn next(inner: &Inner) -> usize {
        (inner.used + 15) & !15
    }

    /// Places `code` at `off` (= `next`) and its record of `record` bytes at `rec` (=
    /// `records`) in the record regions. False when either does not fit.
    pub(crate) fn place(
        &self,
        inner: &mut Inner,
        off: usize,
        code: &[u8],
        rec: usize,
        record: usize,
    ) -> bool {
        let (Some(end), Some(rec_end)) = (off.checked_add(code.len()), rec.checked_add(record))
        else {
            return false;
        };
        if end > self.len || rec_end > self.len || off != Self::next(inner) || rec != inner.records
        {
            return false;
        }
        self.write(off, code);
        inner.used = end;
        inner.records = (rec_end + 7) & !7;
        true
    }

    /// Asks every CPU to drop its compiled blocks (the memory is full); the memory is
    /// given back once each has (`try_reset`).
    pub(crate) fn request_flush(&self, inner: &mut Inner) {
        if self.flush.load(Ordering::SeqCst) == inner.reset {
            self.flush.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Whether a flush waits for CPUs to drop their blocks (nothing is compiled then).
    pub(crate) fn flushing(&self, inner: &Inner) -> bool {
        self.flush.load(Ordering::SeqCst) != inner.reset
    }

    /// Gives the memory back if a flush is pending and no CPU can still run code from
    /// before it: each is outside `Cpu::run` or has dropped its blocks. (A CPU entering
    /// `run` marks itself first and then looks at `flush`; this reads `flush` first and
    /// then the marks: with both sequentially consistent, one of the two sees the other.)
    pub(crate) fn try_reset(&self, inner: &mut Inner) {
        let flush = self.flush.load(Ordering::SeqCst);
        if flush == inner.reset {
            return;
        }
        let quiet = inner
            .marks
            .iter()
            .all(|m| !m.in_run.load(Ordering::SeqCst) || m.seen.load(Ordering::SeqCst) == flush);
        if quiet {
            inner.used = inner.pinned;
            inner.records = 0;
            inner.blocks.clear();
            inner.heat.clear();
            inner.reset = flush;
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping `new` made and closes its descriptor; every view (which
        // holds an Arc to this) is gone.
        unsafe {
            libc::munmap(self.rw.cast(), self.len);
            libc::close(self.fd);
        }
    }
}

/// One CPU's view of the shared code: the memfd mapped read-execute at `base`, and
/// `len` bytes of private read-write memory right after it for the blocks' records
/// (block i's at the same offset in every CPU's region).
/// Never writable and executable at once (W^X).
#[derive(Debug)]
pub(crate) struct View {
    pub(crate) base: *mut u8,
    pub(crate) len: usize,
}

// SAFETY: the mappings belong to one CPU, used by one thread at a time.
unsafe impl Send for View {}

impl View {
    pub(crate) fn new(shared: &Shared) -> Option<Self> {
        let len = shared.len;
        let total = len.checked_mul(2)?;
        // SAFETY: reserves fresh address space; nothing existing is touched.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        let view = View {
            base: base.cast(),
            len,
        };
        // SAFETY: both replace parts of the reservation just made, which only `view`
        // owns.
        let (code, records) = unsafe {
            (
                libc::mmap(
                    base,
                    len,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    shared.fd,
                    0,
                ),
                libc::mmap(
                    view.base.add(len).cast(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    -1,
                    0,
                ),
            )
        };
        (code != libc::MAP_FAILED && records != libc::MAP_FAILED).then_some(view)
    }

    /// The address of offset `off` of the code in this view.
    pub(crate) fn at(&self, off: usize) -> u64 {
        self.base as u64 + off as u64
    }

    /// The record word at `at` (an address in this view's records), if it is one.
    fn record_word(&self, at: u64) -> Option<*mut u64> {
        let off = at.checked_sub(self.base as u64)? as usize;
        if off < self.len || off.checked_add(8)? > 2 * self.len {
            return None;
        }
        // SAFETY: len <= off < 2 * len - 8: inside the private mapping.
        Some(unsafe { self.base.add(off) }.cast())
    }

    /// Writes a record word (ignored outside the records).
    pub(crate) fn write(&mut self, at: u64, v: u64) {
        if let Some(p) = self.record_word(at) {
            // SAFETY: `p` lies in this CPU's private mapping, which only this thread uses.
            unsafe { p.write_unaligned(v) };
        }
    }

    /// Reads a record word (0 outside the records).
    pub(crate) fn read(&self, at: u64) -> u64 {
        match self.record_word(at) {
            // SAFETY: as in `write`.
            Some(p) => unsafe { p.read_unaligned() },
            None => 0,
        }
    }
}

impl Drop for View {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the reservation `new` made (both parts); no compiled code
        // of this CPU runs any more.
        unsafe { libc::munmap(self.base.cast(), 2 * self.len) };
    }
}

/// The compiled code the CPUs of one machine share (see [`crate::Cpu::share_code`]).
#[derive(Clone, Debug)]
pub struct CodeCache(pub(crate) Arc<Shared>);

impl CodeCache {
    /// Code memory of `size` bytes (a CPU makes one of `jit::CODE_SIZE` for itself);
    /// None where the host cannot run compiled code.
    pub fn new(size: usize) -> Option<Self> {
        Some(CodeCache(Arc::new(super::Jit::memory(size)?)))
    }

    /// How many times the memory filled up and every CPU dropped its compiled blocks.
    pub fn flushes(&self) -> u64 {
        self.0.flush.load(Ordering::SeqCst)
    }
}
