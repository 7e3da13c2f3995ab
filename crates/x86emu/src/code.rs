//! Which guest pages hold code, shared by every CPU of a VM.
//!
//! A CPU marks a RAM page when it has checked blocks decoded from it in its current code
//! epoch; any CPU's store to a marked page clears the mark and counts a code write. Each
//! CPU compares that count with the last one it saw at its block boundaries and, when it
//! moved, checks its cached blocks against memory again. So code one vCPU writes is seen
//! by the others without a lock around execution: at the latest at their next block
//! boundary outside a chain of compiled blocks, which is what x86's cross-modifying-code
//! rule asks of a guest anyway (the writer makes the others serialise, by an IPI).
//!
//! Each counted write also names its page in a short log, so that a CPU which sees the
//! count move checks again only its blocks from the pages written (QEMU invalidates its
//! translated blocks by page too); when it fell behind the log, or a writer has not yet
//! logged its page, it checks them all.
//!
//! Compiled stores do not look at the marks: a TLB entry lets compiled code store to its
//! page only while the page is not marked (its write tags are stripped otherwise, as
//! QEMU's TLB_NOTDIRTY does), so such a store leaves compiled code and the interpreter
//! notes it. Marking a page therefore strips the entries that still allow stores to it:
//! the marking CPU's own at once, the other CPUs' at their next block boundary outside a
//! chain, when each also counts a code write to the page in case it stored to it
//! meanwhile (see [`WriteMap`]).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

/// Per CPU: how many of its TLB entries let compiled code store to each RAM page, so
/// that a CPU marking a page finds the CPUs that must strip theirs; and the pages others
/// marked for it to strip.
#[derive(Debug)]
pub(crate) struct WriteMap {
    /// Written by the owning CPU only. 255 means "at least that many", and stays so
    /// until its TLB is emptied.
    counts: Box<[AtomicU8]>,
    /// Pages other CPUs marked while this CPU's count for them was not zero.
    requests: Mutex<Vec<usize>>,
    pending: AtomicBool,
    /// The owning CPU is in `Cpu::run` (where it may store through its entries). It
    /// takes its requests before it leaves, and before it runs anything on entering.
    running: AtomicBool,
    /// The owning CPU's kick flag (see `Cpu::set_kick`): a request raises it, so the CPU
    /// leaves a chain of compiled blocks (where it may store through an entry the request
    /// is about) at its next backward edge and strips, instead of running on in the chain
    /// (a spin loop whose PAUSEs stay compiled can) and storing to the code unnoted after
    /// the marking CPU already looked for writes at a serialising instruction.
    kick: OnceLock<Arc<AtomicBool>>,
}

impl WriteMap {
    pub(crate) fn new(pages: usize) -> Self {
        WriteMap {
            counts: (0..pages).map(|_| AtomicU8::new(0)).collect(),
            requests: Mutex::new(Vec::new()),
            pending: AtomicBool::new(false),
            running: AtomicBool::new(false),
            kick: OnceLock::new(),
        }
    }

    /// Whether some entry may let compiled code store to `pfn`. Sequentially consistent
    /// with `add`: see [`CodeTracker::mark`].
    fn any(&self, pfn: usize) -> bool {
        self.counts
            .get(pfn)
            .is_some_and(|c| c.load(Ordering::SeqCst) != 0)
    }

    /// How many of the owner's entries may let compiled code store to `pfn` (`u8::MAX`:
    /// at least that many). For the owner.
    pub(crate) fn count(&self, pfn: usize) -> u8 {
        self.counts
            .get(pfn)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    pub(crate) fn pages(&self) -> usize {
        self.counts.len()
    }

    /// An entry that lets compiled code store to `pfn` was made. The caller then checks
    /// the page's mark (after this store: see [`CodeTracker::mark`]).
    pub(crate) fn add(&self, pfn: usize) {
        if let Some(c) = self.counts.get(pfn) {
            let n = c.load(Ordering::Relaxed);
            if n != u8::MAX {
                c.store(n + 1, Ordering::SeqCst);
            }
        }
    }

    /// Such an entry was dropped or stripped.
    pub(crate) fn remove(&self, pfn: usize) {
        if let Some(c) = self.counts.get(pfn) {
            let n = c.load(Ordering::Relaxed);
            if n != u8::MAX && n != 0 {
                c.store(n - 1, Ordering::Relaxed);
            }
        }
    }

    /// Every entry was dropped.
    pub(crate) fn clear(&self) {
        for c in self.counts.iter() {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// Whether other CPUs marked pages this CPU may store to.
    #[inline(always)]
    pub(crate) fn pending(&self) -> bool {
        self.pending.load(Ordering::Relaxed)
    }

    /// The pages to strip, taken; `pending` stays raised until [`WriteMap::requests_done`]
    /// (a CPU at a serialising instruction counts on it: see
    /// [`CodeTracker::stores_unnoted`]).
    pub(crate) fn take_requests(&self) -> Vec<usize> {
        std::mem::take(&mut *self.requests.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The requests taken were carried out (their writes noted), unless more came.
    pub(crate) fn requests_done(&self) {
        let requests = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
        if requests.is_empty() {
            self.pending.store(false, Ordering::SeqCst);
        }
    }

    /// The owner enters (`true`) or leaves `Cpu::run`.
    pub(crate) fn set_running(&self, on: bool) {
        self.running.store(on, Ordering::SeqCst);
    }

    /// The owner is in `Cpu::run` with requests it has not carried out: it may have
    /// stored to code since it was asked to strip, unnoted.
    fn may_store_unnoted(&self) -> bool {
        self.running.load(Ordering::SeqCst) && self.pending.load(Ordering::SeqCst)
    }

    fn request(&self, pfn: usize) {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(pfn);
        // SeqCst: the marking CPU compares the page's blocks with memory after this, and
        // the owner leaving `Cpu::run` looks at `pending` after its last stores (a fence
        // there): one of the two sees the other.
        self.pending.store(true, Ordering::SeqCst);
        if let Some(k) = self.kick.get() {
            k.store(true, Ordering::Release);
        }
    }

    /// The owning CPU's kick flag, raised with each request; the first one given stays.
    pub(crate) fn set_kick(&self, flag: Arc<AtomicBool>) {
        let _ = self.kick.set(flag);
    }
}

/// A page's byte in [`CodeTracker`]: it holds checked code.
const CODE: u8 = 1;
/// It was not written since the dirty log was last taken ([`CodeTracker::take_dirty_log`]).
const LOG_CLEAN: u8 = 2;
/// It is a page table that another translator of the guest's page tables (the hybrid
/// accelerator's KVM vCPU) may hold a copy of: the next store to it is recorded in
/// [`CodeTracker::take_table_writes`].
const TABLE: u8 = 4;

#[derive(Debug)]
pub struct CodeTracker {
    /// A byte per RAM page, [`CODE`], [`LOG_CLEAN`] and [`TABLE`]: stores to a page with
    /// any must be noted. (Compiled code reads it unchecked, so it covers all of RAM.)
    pages: Box<[AtomicU8]>,
    /// Stores to marked pages so far, by any CPU.
    writes: AtomicU64,
    /// The pages of the last [`WRITE_LOG`] counted writes: see [`CodeTracker::written_page`].
    log: Box<[AtomicU64]>,
    /// The write maps of the CPUs that share this tracker.
    cpus: RwLock<Vec<Arc<WriteMap>>>,
    /// Watched page tables stored to since [`CodeTracker::take_table_writes`], a bit per
    /// page, and how many such stores were noted so far.
    table_writes: Box<[AtomicU64]>,
    table_write_count: AtomicU64,
    /// More than one CPU shares it.
    shared: AtomicBool,
    /// Pages newly marked as code since [`CodeTracker::take_new_code`], a bit per page,
    /// kept once [`CodeTracker::log_new_code`] asked for them: another translator that
    /// runs the guest's code (the hybrid accelerator's KVM vCPU) watches those for stores.
    new_code: Box<[AtomicU64]>,
    log_new: AtomicBool,
    /// Some CPU's guest code stores to RAM where no CPU notes it (the hybrid accelerator's
    /// native stints without KVM's dirty log): a count of writes says nothing then.
    unseen: AtomicBool,
}

/// Writes named in [`CodeTracker`]'s log: a CPU that falls further behind checks every
/// block again. A device's DMA into pages that held code (a page-cache read) names a page
/// per 4 KiB; a vCPU idle through a module load misses about a thousand.
pub(crate) const WRITE_LOG: usize = 4096;

/// A logged write that may have been to any page (more than four in an instruction).
pub(crate) const ANY_PAGE: usize = usize::MAX;

/// A log entry's page field: this says "any page".
const LOG_ANY: u64 = 0xffff_ffff;

/// The nonzero words of a bitmap, each taken (left zero).
fn take_words(map: &[AtomicU64]) -> Vec<(usize, u64)> {
    map.iter()
        .enumerate()
        .filter(|(_, w)| w.load(Ordering::Relaxed) != 0)
        .map(|(i, w)| (i, w.swap(0, Ordering::SeqCst)))
        .filter(|&(_, bits)| bits != 0)
        .collect()
}

impl CodeTracker {
    /// A tracker for RAM that ends at guest-physical `ram_end`.
    pub fn new(ram_end: u64) -> Self {
        let n = (ram_end >> 12) as usize;
        CodeTracker {
            pages: (0..n).map(|_| AtomicU8::new(0)).collect(),
            writes: AtomicU64::new(0),
            // Never the entry of a write still to come (its number's low half is not
            // that of any write logged in its place before 2^32 writes).
            log: (0..WRITE_LOG).map(|_| AtomicU64::new(u64::MAX)).collect(),
            cpus: RwLock::new(Vec::new()),
            table_writes: (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            table_write_count: AtomicU64::new(0),
            shared: AtomicBool::new(false),
            new_code: (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            log_new: AtomicBool::new(false),
            unseen: AtomicBool::new(false),
        }
    }

    /// Pages covered.
    pub fn pages(&self) -> usize {
        self.pages.len()
    }

    /// A CPU with write map `own` shares this tracker from now on.
    pub(crate) fn register(&self, own: &Arc<WriteMap>) {
        let mut cpus = self.cpus.write().unwrap_or_else(PoisonError::into_inner);
        if !cpus.iter().any(|c| Arc::ptr_eq(c, own)) {
            cpus.push(own.clone());
        }
        self.shared.store(cpus.len() > 1, Ordering::Relaxed);
    }

    /// Marks `pfn` as holding checked code: true if the caller, whose write map is `own`,
    /// must strip its own entries that let compiled code store to it; the other CPUs'
    /// are asked to strip theirs.
    pub(crate) fn mark(&self, pfn: usize, own: &WriteMap) -> bool {
        self.mark_with(pfn, CODE, own)
    }

    /// Watches `pfn` as a page table: its next store is recorded for
    /// [`CodeTracker::take_table_writes`]. Strips stores as [`CodeTracker::mark`] does.
    pub(crate) fn watch_table(&self, pfn: usize, own: &WriteMap) -> bool {
        self.mark_with(pfn, TABLE, own)
    }

    fn mark_with(&self, pfn: usize, bit: u8, own: &WriteMap) -> bool {
        let Some(b) = self.pages.get(pfn) else {
            return false;
        };
        // Sequentially consistent with a CPU that makes a writable entry (`WriteMap::add`,
        // then `is_marked`): either it sees this mark, or this sees its count. A page
        // that is only clean for the dirty log may still have its strips pending: they
        // are asked for again (a CPU strips what it has, once).
        if b.load(Ordering::Relaxed) & bit != 0 || b.fetch_or(bit, Ordering::SeqCst) & bit != 0 {
            return false;
        }
        if bit == CODE && self.log_new.load(Ordering::Relaxed) {
            if let Some(w) = self.new_code.get(pfn / 64) {
                w.fetch_or(1 << (pfn % 64), Ordering::Relaxed);
            }
        }
        let cpus = self.cpus.read().unwrap_or_else(PoisonError::into_inner);
        for c in cpus.iter() {
            if !std::ptr::eq(Arc::as_ptr(c), own) && c.any(pfn) {
                c.request(pfn);
            }
        }
        own.any(pfn)
    }

    /// Whether `pfn` holds checked code; sequentially consistent with `mark`.
    pub(crate) fn is_marked(&self, pfn: usize) -> bool {
        self.pages
            .get(pfn)
            .is_some_and(|b| b.load(Ordering::SeqCst) != 0)
    }

    /// A store to `pfn`: true if the page held checked code (the caller's own epoch must
    /// move; the others' move when they see `writes`).
    #[inline(always)]
    pub(crate) fn note_write(&self, pfn: usize) -> bool {
        match self.pages.get(pfn) {
            Some(b) if b.load(Ordering::Relaxed) != 0 => {
                // Clearing LOG_CLEAN is what records the page as dirty.
                let old = b.swap(0, Ordering::Relaxed);
                if old & TABLE != 0 {
                    self.note_table_write(pfn);
                }
                if old & CODE == 0 {
                    return false;
                }
                self.count_write(pfn);
                true
            }
            _ => false,
        }
    }

    /// Whether a CPU other than the owner of `own` may have stored to checked code without
    /// noting it: one in `Cpu::run` that has not yet stripped the entries it was asked to.
    /// When none may, every store to checked code up to now is counted in `writes`
    /// (read after this).
    pub(crate) fn stores_unnoted(&self, own: &WriteMap) -> bool {
        let cpus = self.cpus.read().unwrap_or_else(PoisonError::into_inner);
        cpus.iter()
            .any(|c| !std::ptr::eq(Arc::as_ptr(c), own) && c.may_store_unnoted())
    }

    /// Guest code stored to RAM unseen (see `Cpu::code_written_elsewhere`), and may again.
    pub(crate) fn note_unseen_stores(&self) {
        if !self.unseen.load(Ordering::Relaxed) {
            self.unseen.store(true, Ordering::SeqCst);
        }
    }

    /// Whether guest code stores to RAM unseen: see [`CodeTracker::note_unseen_stores`].
    pub(crate) fn stores_unseen(&self) -> bool {
        self.unseen.load(Ordering::Relaxed)
    }

    /// Whether several CPUs share the tracker (code may change under one CPU by another's
    /// store, not only by its own).
    pub(crate) fn shared(&self) -> bool {
        self.shared.load(Ordering::Relaxed)
    }

    #[cold]
    fn note_table_write(&self, pfn: usize) {
        if let Some(w) = self.table_writes.get(pfn / 64) {
            w.fetch_or(1 << (pfn % 64), Ordering::SeqCst);
        }
        self.table_write_count.fetch_add(1, Ordering::SeqCst);
    }

    /// How many stores to watched page tables were noted so far: when it has not moved,
    /// [`CodeTracker::take_table_writes`] has nothing to give.
    pub fn table_write_count(&self) -> u64 {
        self.table_write_count.load(Ordering::SeqCst)
    }

    /// The watched page tables stored to since the last call, taken. Each is no longer
    /// watched (watch it again after reading it).
    pub fn take_table_writes(&self) -> Vec<usize> {
        let mut out = Vec::new();
        for (i, mut bits) in take_words(&self.table_writes) {
            while bits != 0 {
                out.push(i * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        }
        out
    }

    /// From now on, pages newly marked as code are kept for [`CodeTracker::take_new_code`].
    pub fn log_new_code(&self) {
        self.log_new.store(true, Ordering::SeqCst);
    }

    /// The pages newly marked as code since the last call, taken: (word, bits) pairs, bit
    /// `pfn % 64` of word `pfn / 64`, nonzero words only.
    pub fn take_new_code(&self) -> Vec<(usize, u64)> {
        take_words(&self.new_code)
    }

    /// Every page marked as code now, as (word, bits) pairs like [`Self::take_new_code`].
    pub fn code_pages(&self) -> Vec<(usize, u64)> {
        let mut out = Vec::new();
        for (i, chunk) in self.pages.chunks(64).enumerate() {
            let mut bits = 0u64;
            for (j, b) in chunk.iter().enumerate() {
                if b.load(Ordering::Relaxed) & CODE != 0 {
                    bits |= 1 << j;
                }
            }
            if bits != 0 {
                out.push((i, bits));
            }
        }
        out
    }

    /// Stops watching `pfn` as a page table.
    pub fn unwatch_table(&self, pfn: usize) {
        if let Some(b) = self.pages.get(pfn) {
            b.fetch_and(!TABLE, Ordering::SeqCst);
        }
    }

    /// Something other than a CPU (a device's DMA, the VMM) wrote guest-physical
    /// `gpa..gpa + len`: every CPU checks its blocks from there again before running them
    /// (at its next block boundary), as for another CPU's store.
    pub fn note_external_write(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = (gpa >> 12) as usize;
        let last = (gpa.saturating_add(len - 1) >> 12) as usize;
        for pfn in first..=last.min(self.pages.len().saturating_sub(1)) {
            self.note_write(pfn);
        }
    }

    /// Starts a dirty log of guest RAM, or takes the one running and starts the next:
    /// the pages any CPU or reported external write stored to since the previous call, as
    /// a bitmap (bit `pfn % 64` of word `pfn / 64`); every page counts as written on the
    /// first call. Live migration sends these again.
    ///
    /// It works as code marks do (QEMU's TLB_NOTDIRTY): a page logged clean takes every
    /// CPU's right to store to it from compiled code, so its next store goes through the
    /// interpreter's `note_write`, which clears the mark. A CPU that may have stored
    /// through an entry it still had (its strip not done yet) counts its page as written,
    /// here and again when it strips the entry.
    pub fn take_dirty_log(&self) -> Vec<u64> {
        let mut out = vec![0u64; self.pages.len().div_ceil(64)];
        let cpus = self.cpus.read().unwrap_or_else(PoisonError::into_inner);
        for (pfn, b) in self.pages.iter().enumerate() {
            let old = b.fetch_or(LOG_CLEAN, Ordering::SeqCst);
            let armed = cpus.iter().any(|c| c.any(pfn));
            if old & LOG_CLEAN == 0 || armed {
                if let Some(w) = out.get_mut(pfn / 64) {
                    *w |= 1 << (pfn % 64);
                }
            }
            if armed {
                for c in cpus.iter().filter(|c| c.any(pfn)) {
                    c.request(pfn);
                }
            }
        }
        out
    }

    /// Ends the dirty log: pages are no longer held clean (their entries regain the
    /// right to store at the next store through them).
    pub fn stop_dirty_log(&self) {
        for b in self.pages.iter() {
            b.fetch_and(!LOG_CLEAN, Ordering::SeqCst);
        }
    }

    /// Counts a store to checked code in page `pfn` (or [`ANY_PAGE`]) and logs the page:
    /// when noted, and once more after it was made (see `Core::stores_done`). A CPU that
    /// sees the count move before the page is logged finds the entry of an older write
    /// there and checks everything.
    pub(crate) fn count_write(&self, pfn: usize) {
        let seq = self.writes.fetch_add(1, Ordering::SeqCst);
        let page = match u32::try_from(pfn) {
            Ok(p) if u64::from(p) != LOG_ANY => u64::from(p),
            _ => LOG_ANY,
        };
        if let Some(e) = self.log.get(seq as usize % WRITE_LOG) {
            e.store((seq & 0xffff_ffff) << 32 | page, Ordering::Release);
        }
    }

    /// The page that write number `seq` (counting from 0) stored to: None when the log
    /// no longer knows, or does not yet (its writer counted it and is about to log it),
    /// or it may be any page.
    pub(crate) fn written_page(&self, seq: u64) -> Option<usize> {
        let e = self
            .log
            .get(seq as usize % WRITE_LOG)?
            .load(Ordering::Acquire);
        let page = e & 0xffff_ffff;
        (e >> 32 == seq & 0xffff_ffff && page != LOG_ANY).then_some(page as usize)
    }

    pub(crate) fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }
}
