//! Decoded basic blocks, cached by the physical address of their first instruction.
//!
//! A block is a run of instructions inside one 4 KiB page that ends at the first branch,
//! at an instruction that changes how the following ones must be decoded or fetched
//! (mode, paging, segments, interrupt flags) or at the page end. The run loop translates
//! RIP and looks up a block once, then executes its instructions back to back, so the
//! translation and lookup cost is paid per block instead of per instruction.
//!
//! A block keeps the raw bytes it was decoded from and runs only while guest memory still
//! holds them. Comparing them on every entry would cost a memcmp per block, so the CPU
//! keeps a code epoch: a block compared once is trusted until the epoch moves, which it
//! does when this CPU writes to a page that holds checked code (the write path tests a
//! bitmap of such pages), at every `Cpu::run` call (other vCPUs and devices write between
//! runs) and after every device access (a device may have written RAM). A write into the
//! block being executed ends it, so code patched ahead of RIP runs patched. What is not
//! seen: a device writing code asynchronously (an I/O thread's DMA) that the guest then
//! runs without an interrupt or device access in between, and page-table A/D updates
//! landing in a code page.

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic as M, OpKind, RflagsBits,
};

use std::sync::atomic::Ordering;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use crate::decoded::{Decoded, DecodedBlocks};
use crate::exec::fast::{cannot_fault, skips_dead_flags, uop_for, Uop};
use crate::exec::{handler_for, Handler};
use crate::jit::{Compiled, Enter, Jit, NoCode};

/// Block slots of a CPU by default (direct mapped by physical address and IP page). A
/// systemd boot runs about 375k distinct blocks: with 128k slots they evicted one another
/// into 2.5M decodes, with 512k about 0.9M. The cost is memory: slots are touched lazily,
/// but each filled one keeps its decoded block (about 600 bytes); after bench/real.sh's
/// workloads a 1-vCPU VMM peaks at 653 MiB (292 with 128k slots, QEMU 1333), 504 with
/// 256k. Every CPU has its own cache: a VMM with several gives each fewer
/// (`Cpu::set_block_slots`).
pub const DEFAULT_BLOCK_SLOTS: usize = 1 << 19;
/// The fewest slots a cache gets.
const MIN_SLOTS: usize = 1 << 12;
/// Longest block: bounds the work lost when a block must be rebuilt.
const MAX_BLOCK: usize = 32;
/// Marks (in `Block::bitness`) a block whose first instruction runs past its page end:
/// its bytes lie in two pages, so it is valid only while the next page still maps to the
/// physical page it was decoded from (see `BlockCache::get_cross`). Lookups that compare
/// the bitness alone never match it; compiled code's lookup does, as the block's code
/// checks the TLB generation and privilege it was found in before it runs.
const CROSS: u8 = 0x80;

/// One decoded instruction: the iced-x86 form, its handler and the operands the fast
/// handlers use, plus (in a block) the bytes it was decoded from.
#[derive(Clone, Copy)]
pub(crate) struct Insn {
    pub(crate) instr: Instruction,
    pub(crate) handler: Handler,
    pub(crate) uop: Uop,
    /// Ends its block: a branch, or an instruction that may change the mode.
    pub(crate) ends: bool,
    /// A near branch: the next block runs in the same mode and address space.
    pub(crate) near_branch: bool,
    /// `handler` is a specialised fast form (which never faults unless it touches memory,
    /// and skips dead flags).
    fast: bool,
    /// For instructions the host runs: where `exec::hostexec` looks for its stub first.
    pub(crate) host_key: u32,
}

impl std::fmt::Debug for Insn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.instr)
    }
}

impl Insn {
    pub(crate) fn new(instr: Instruction) -> Self {
        let (handler, fast) = handler_for(&instr);
        Insn {
            instr,
            handler,
            fast,
            uop: uop_for(&instr),
            ends: ends_block(&instr),
            near_branch: is_near_branch(&instr),
            // Fast forms are integer instructions the host path never runs: skip the
            // routing test for them, the common case when a block is decoded.
            host_key: if !fast && crate::exec::hostexec::routes(&instr) {
                crate::exec::hostexec::key(&instr)
            } else {
                0
            },
        }
    }
}

/// The cache's slots (a power of two), in an anonymous mapping: page-aligned (so a slot is
/// one cache line) and zeroed lazily by the OS (a CPU pays for the slots it fills, not for
/// all 32 MiB up front; the global allocator would clear them by hand for this alignment).
struct Slots {
    ptr: std::ptr::NonNull<Block>,
    len: usize,
    /// The slots that were ever filled (the only ones with a body, a run count or code):
    /// walking them instead of all slots keeps the untouched pages untouched.
    filled: Vec<u32>,
}

// SAFETY: the mapping is owned like a Box<[Block]>, and a Block is Send: its pointer to
// its instructions points into the decoded block its body holds, which is never changed.
unsafe impl Send for Slots {}

impl Slots {
    /// `len` slots, rounded to a power of two (at least `MIN_SLOTS`).
    fn new(len: usize) -> Self {
        let len = len.max(MIN_SLOTS).next_power_of_two();
        let bytes = len * std::mem::size_of::<Block>();
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        let layout = std::alloc::Layout::array::<Block>(len)
            .unwrap_or_else(|_| std::alloc::Layout::new::<Block>());
        if p == libc::MAP_FAILED {
            std::alloc::handle_alloc_error(layout);
        }
        // SAFETY: advice on the mapping just made; it changes no contents.
        unsafe { libc::madvise(p, bytes, libc::MADV_HUGEPAGE) };
        match std::ptr::NonNull::new(p.cast::<Block>()) {
            Some(ptr) => Slots {
                ptr,
                len,
                filled: Vec::new(),
            },
            None => std::alloc::handle_alloc_error(layout),
        }
    }
}

impl std::ops::Deref for Slots {
    type Target = [Block];
    fn deref(&self) -> &[Block] {
        // SAFETY: the mapping holds `len` Blocks: all-zero bytes are an empty Block
        // (integers 0 - bitness 0 matches no lookup, entry 0 is no code - and the `None`
        // option of a Box, which is guaranteed null), and the mapping is page-aligned.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for Slots {
    fn deref_mut(&mut self) -> &mut [Block] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        for i in std::mem::take(&mut self.filled) {
            if let Some(b) = self.get_mut(i as usize) {
                b.body = None;
            }
        }
        // SAFETY: every body was dropped above (the other slots have none, and a Block's
        // other fields need no drop); unmaps exactly the mapping `new` made, which nothing
        // refers to afterwards.
        unsafe {
            libc::munmap(
                self.ptr.as_ptr().cast(),
                self.len * std::mem::size_of::<Block>(),
            );
        }
    }
}

impl std::fmt::Debug for Slots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slots").field("len", &self.len).finish()
    }
}

/// A cache slot. The fields a lookup reads fill one cache line (compiled code reads them
/// too, see `block_layout`); the decoded instructions live behind a pointer, allocated
/// when the slot is first filled.
#[derive(Default)]
#[repr(C, align(64))]
pub(crate) struct Block {
    gpa: u64,
    /// The first instruction's IP: the same physical bytes mapped at two addresses decode
    /// to different branch targets.
    ip: u64,
    /// 16, 32 or 64; 0 for an empty slot.
    bitness: u8,
    /// How many instructions `insns` points to.
    len: u8,
    /// Runs since decoded, counted until the block is compiled (or found not to be).
    runs: u32,
    /// The CPU's code epoch when the block's bytes were last found in memory (see
    /// `Core::code_epoch`), or [`STALE`] since its page was written.
    epoch: u64,
    /// Host code for the block's leading instructions (64-bit code only): its entry
    /// (for `Jit::enter`) and its chain entry (both 0 when there is no code).
    entry: u64,
    chain: u64,
    body: Option<Box<Body>>,
    /// The instructions of `body.decoded`, so that running a block reads its slot and then
    /// its instructions, not the body and the decoded block in between (these are cache
    /// misses for code that runs rarely, most of a boot). Reset whenever `body.decoded`
    /// changes.
    insns: Option<std::ptr::NonNull<Insn>>,
}

// A lookup reads one cache line (compiled code relies on the size too).
const _: () = assert!(std::mem::size_of::<Block>() == 64);

#[derive(Default)]
struct Body {
    /// The block's bytes and instructions (shared with the machine's other CPUs: see
    /// `crate::decoded`); it runs only while guest memory still holds the bytes.
    decoded: Option<Arc<Decoded>>,
    /// Link slots in other blocks' code that jump to this block's chain entry.
    incoming: Vec<usize>,
    /// For a page-crossing block: the physical page its bytes continue in, and the TLB
    /// generation (`Tlb::flushes`) in which the next linear page was last found mapping
    /// it. Its compiled code goes on only in that generation (between flushes a CPU may
    /// use the translation it has, however the page tables changed).
    cross_gpa: u64,
    tlb_gen: u64,
    /// Its compiled code's record in this CPU's view, while it has code.
    record: crate::jit::Record,
}

impl Body {
    fn code(&self) -> &[u8] {
        self.decoded.as_ref().map_or(&[], |d| &d.code)
    }
}

impl Block {
    pub(crate) fn insns(&self) -> &[Insn] {
        match self.insns {
            // SAFETY: `insns` and `len` describe `body.decoded`'s instructions as `fill`
            // left them: a decoded block never changes, and the body holds it until the
            // next `fill`, which resets them first.
            Some(p) => unsafe { std::slice::from_raw_parts(p.as_ptr(), usize::from(self.len)) },
            None => &[],
        }
    }

    pub(crate) fn compiled(&self) -> Option<Compiled> {
        (self.entry != 0).then_some(Compiled {
            entry: self.entry,
            chain_entry: self.chain,
        })
    }

    fn set_compiled(&mut self, c: Option<Compiled>) {
        self.entry = c.map_or(0, |c| c.entry);
        self.chain = c.map_or(0, |c| c.chain_entry);
    }
}

/// Where compiled code finds a slot's fields: (slot size, offsets of the physical
/// address, IP, bitness, epoch and chain entry). The slot mask is in `Ctx`.
pub(crate) fn block_layout() -> (usize, i32, i32, i32, i32, i32) {
    use std::mem::{offset_of, size_of};
    (
        size_of::<Block>(),
        offset_of!(Block, gpa) as i32,
        offset_of!(Block, ip) as i32,
        offset_of!(Block, bitness) as i32,
        offset_of!(Block, epoch) as i32,
        offset_of!(Block, chain) as i32,
    )
}

/// A block's epoch once its page was written: no code epoch (they count up from 0).
const STALE: u64 = u64::MAX;

/// Whether the block in a slot holds code from RAM page `pfn` (a page-crossing block
/// holds code from two).
fn on_page(b: &Block, pfn: usize) -> bool {
    b.bitness != 0
        && ((b.gpa >> 12) as usize == pfn
            || (b.bitness & CROSS != 0
                && b.body
                    .as_ref()
                    .is_some_and(|body| (body.cross_gpa >> 12) as usize == pfn)))
}

/// Keeps, once each, the slots of `list` that still hold a block with code from page
/// `pfn`.
fn keep_on_page(blocks: &Slots, pfn: usize, list: &mut Vec<u32>) {
    list.sort_unstable();
    list.dedup();
    list.retain(|&s| blocks.get(s as usize).is_some_and(|b| on_page(b, pfn)));
}

/// Runs after which a block compiled before its code was dropped (the arena filled) is
/// compiled again.
const RECOMPILE_RUNS: u32 = 8;

/// Where compiled code finds a block's body entry (`Compiled::entry`) in its slot.
pub(crate) fn block_entry_offset() -> i32 {
    std::mem::offset_of!(Block, entry) as i32
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("gpa", &self.gpa)
            .field("ip", &self.ip)
            .field("len", &self.insns().len())
            .finish()
    }
}

enum Lookup {
    /// Checked in the current code epoch.
    Trusted,
    /// Checked now and still the same.
    Unchanged,
    /// Absent or changed: decode it.
    Miss,
}

#[derive(Debug)]
pub(crate) struct BlockCache {
    blocks: Slots,
    /// Compiles hot 64-bit blocks; None when the host cannot or it is switched off.
    jit: Option<Jit>,
    /// Moves whenever all compiled code is dropped (link slots from before are gone).
    generation: u64,
    /// The links made since they were last cut, each with the slot it leads to (see
    /// `sync_links`), and the code epoch they were made in.
    live_links: Vec<(u64, u32)>,
    links_epoch: u64,
    /// Compiled code's jump cache: for 64-bit kernel and user code, then 32-bit kernel
    /// and user code, `JUMP_CACHE` entries of
    /// [RIP, stamp, chain entry, unused], hashed by RIP (see `jit::emit::look_up_and_go`).
    /// An entry counts only while its stamp is `jc_stamp`, which moves whenever what it
    /// says may have changed: the code epoch, the TLB's translations (a flush), or a
    /// compiled block's slot.
    jump_cache: Vec<[u64; 4]>,
    jc_stamp: u64,
    jc_seen: (u64, u64),
    /// Some block has code (since the last `drop_compiled`).
    any_compiled: bool,
    /// Where blocks decoded by this machine's CPUs are found (see `crate::decoded`); None
    /// until the CPU is given others' (alone, it would only pay for offering its own).
    decoded: Option<DecodedBlocks>,
    /// Reused for decoding.
    scratch: Vec<Insn>,
    /// Blocks this CPU decoded, and those it took from another CPU's decoding instead.
    decodes: u64,
    taken: u64,
    /// Blocks found unchanged when compared with memory again (their page was written, or
    /// the code epoch moved).
    rechecks: u64,
    /// The most slots `enter_run` doubles the cache to while it evicts much (see
    /// `note_eviction`).
    max_slots: usize,
    /// Lookups, and misses that evicted another block, since the eviction count last
    /// reached a sixteenth of the slots.
    lookups: u64,
    evictions: u64,
    /// The cache evicted often enough to grow at the next `enter_run`.
    grow: bool,
    /// Per RAM page, the slots filled with blocks from it since the slots were made, so
    /// that a write to a page makes only its blocks be checked again (see
    /// `stale_pages`). Slots filled since with other pages' blocks stay listed until a
    /// sweep (see `index`).
    by_page: FxHashMap<usize, Vec<u32>>,
    /// How many pages `by_page` may list before the pages none of whose blocks are left
    /// are swept out of it (see `index`).
    by_page_limit: usize,
}

/// The fewest pages `BlockCache::by_page` lists before it is swept.
const BY_PAGE_MIN: usize = 4096;

/// Links remembered before all are cut regardless of the epoch (see `BlockCache::link`).
const MAX_LIVE_LINKS: usize = 1 << 20;

/// Whether `page[off..]` starts with `code`.
///
/// # Safety
/// `page` must point to a readable 4 KiB page.
#[inline(always)]
unsafe fn still_there(page: *const u8, off: usize, code: &[u8]) -> bool {
    if off + code.len() > 4096 {
        return false;
    }
    // SAFETY: off + len <= 4096 inside a valid page (caller contract).
    let mem = unsafe { std::slice::from_raw_parts(page.add(off), code.len()) };
    mem == code
}

impl BlockCache {
    pub(crate) fn new() -> Self {
        BlockCache {
            blocks: Slots::new(DEFAULT_BLOCK_SLOTS),
            jit: Jit::new(crate::jit::DEFAULT_THRESHOLD),
            generation: 0,
            live_links: Vec::new(),
            links_epoch: 0,
            jump_cache: vec![[0; 4]; 4 * crate::jit::JUMP_CACHE],
            // Zeroed entries never match: no chain entry is 0.
            jc_stamp: 1,
            jc_seen: (0, 0),
            any_compiled: false,
            decoded: None,
            scratch: Vec::with_capacity(MAX_BLOCK),
            decodes: 0,
            taken: 0,
            rechecks: 0,
            max_slots: DEFAULT_BLOCK_SLOTS,
            lookups: 0,
            evictions: 0,
            grow: false,
            by_page: FxHashMap::default(),
            by_page_limit: BY_PAGE_MIN,
        }
    }

    /// Notes that `slot` now holds a block with code from RAM page `pfn`.
    fn index(&mut self, pfn: usize, slot: usize) {
        if self.by_page.len() >= self.by_page_limit {
            self.sweep_pages();
        }
        let list = self.by_page.entry(pfn).or_default();
        if list.len() == list.capacity() && list.len() >= 16 {
            // Full: sweep out the slots that hold other blocks by now (and repeats) before
            // the list grows; where most stay, it grows at once, so that the next sweep
            // comes after as many pushes as it had entries.
            keep_on_page(&self.blocks, pfn, list);
            if list.len() > list.capacity() / 2 {
                list.reserve(list.capacity());
            }
        }
        list.push(slot as u32);
    }

    /// Forgets the pages none of whose listed slots holds a block from them any more: a
    /// guest that runs code from ever more pages (a big page cache, a JIT) would otherwise
    /// have the index grow without bound. The next sweep comes when the pages listed have
    /// doubled.
    #[cold]
    fn sweep_pages(&mut self) {
        let blocks = &self.blocks;
        self.by_page.retain(|&pfn, list| {
            keep_on_page(blocks, pfn, list);
            !list.is_empty()
        });
        self.by_page_limit = (self.by_page.len() * 2).max(BY_PAGE_MIN);
    }

    /// The blocks with code from these RAM pages (taken) are compared with memory again
    /// before they run next: the pages were written. Links to them are cut and the jump
    /// cache forgets them, so that compiled code reaches them only through its lookup,
    /// which finds their epoch stale. (Moving the code epoch instead made every block of
    /// every CPU be compared at each of the ~1700 writes to code of a boot: a tenth of
    /// all lookups on 1 vCPU, more on 8.)
    #[cold]
    pub(crate) fn stale_pages(&mut self, pages: &mut Vec<usize>) {
        pages.sort_unstable();
        pages.dedup();
        for pfn in pages.drain(..) {
            let Some(mut list) = self.by_page.remove(&pfn) else {
                continue;
            };
            keep_on_page(&self.blocks, pfn, &mut list);
            for &slot in &list {
                let Some(b) = self.blocks.get_mut(slot as usize) else {
                    continue;
                };
                b.epoch = STALE;
                if let Some(body) = &mut b.body {
                    // A link slot lies in the arena, which is not reused before
                    // `drop_compiled` empties every `incoming` list.
                    for link in body.incoming.drain(..) {
                        if let Some(j) = &mut self.jit {
                            j.unlink(link as u64);
                        }
                    }
                }
                let ip = b.ip;
                let at = crate::jit::jump_cache_index(ip);
                for table in 0..4 {
                    if let Some(e) = self.jump_cache.get_mut(table * crate::jit::JUMP_CACHE + at) {
                        // Stored complemented (see `jit::emit::jump_cache_fill`); a stamp
                        // of 0 never matches.
                        if e[0] == !ip {
                            e[1] = 0;
                        }
                    }
                }
            }
            if !list.is_empty() {
                self.by_page.insert(pfn, list);
            }
        }
    }

    /// Blocks this CPU decoded itself, and blocks it took as another CPU decoded them.
    pub(crate) fn decode_counts(&self) -> (u64, u64) {
        (self.decodes, self.taken)
    }

    pub(crate) fn rechecked_blocks(&self) -> u64 {
        self.rechecks
    }

    /// Takes decoded blocks from `blocks` and offers this CPU's there from now on.
    pub(crate) fn share_decoded(&mut self, blocks: &DecodedBlocks) {
        if !self.decoded.as_ref().is_some_and(|d| d.same(blocks)) {
            self.decoded = Some(blocks.clone());
        }
    }

    /// Where this CPU offers the blocks it decodes (from now on).
    pub(crate) fn decoded_blocks(&mut self) -> DecodedBlocks {
        self.decoded
            .get_or_insert_with(DecodedBlocks::default)
            .clone()
    }

    /// Places compiled code in `cache` from now on, and runs what other CPUs placed there.
    pub(crate) fn share_code(&mut self, cache: &crate::jit::shared::CodeCache) {
        let Some(j) = &self.jit else { return };
        if std::sync::Arc::ptr_eq(j.shared(), &cache.0) {
            return;
        }
        let threshold = j.threshold;
        self.drop_compiled();
        self.jit = Jit::with(cache.0.clone(), threshold);
    }

    /// The code memory this CPU places compiled code in.
    pub(crate) fn code_cache(&self) -> Option<crate::jit::shared::CodeCache> {
        self.jit
            .as_ref()
            .map(|j| crate::jit::shared::CodeCache(j.shared().clone()))
    }

    /// Blocks this CPU took from another CPU's compiler.
    pub(crate) fn adopted_blocks(&self) -> u64 {
        self.jit.as_ref().map_or(0, |j| j.adopted)
    }

    /// Entering `Cpu::run`: drops every compiled block first when a flush of the shared
    /// code asks for it.
    #[inline(always)]
    pub(crate) fn enter_run(&mut self) {
        if self.grow {
            self.grow_slots();
        }
        if let Some(j) = &mut self.jit {
            if j.running(true) {
                self.drop_for_flush();
            }
        }
    }

    /// Leaving `Cpu::run`: no compiled code of this CPU runs until `enter_run`.
    #[inline(always)]
    pub(crate) fn leave_run(&mut self) {
        if let Some(j) = &mut self.jit {
            j.running(false);
        }
    }

    /// Between blocks in `Cpu::run`: drops every compiled block when another CPU asked
    /// for a flush of the shared code.
    #[inline(always)]
    pub(crate) fn see_flush(&mut self) {
        if self.jit.as_ref().is_some_and(|j| j.flush_asked()) {
            self.drop_for_flush();
        }
    }

    /// Drops every compiled block (hot ones compile again soon) and tells the shared code
    /// memory this CPU no longer holds any of its code.
    #[cold]
    fn drop_for_flush(&mut self) {
        self.drop_compiled_keeping(true);
        if let Some(j) = &mut self.jit {
            j.quiesce();
        }
    }

    /// Replaces the slots with `n` of them (rounded to a power of two), dropping every
    /// cached block; the cache stays that size.
    pub(crate) fn set_slots(&mut self, n: usize) {
        self.drop_compiled();
        self.blocks = Slots::new(n);
        self.by_page.clear();
        self.by_page_limit = BY_PAGE_MIN;
        self.max_slots = self.blocks.len;
        self.lookups = 0;
        self.evictions = 0;
        self.grow = false;
    }

    /// Lets the cache double (at most to `max` slots) while it evicts often (see
    /// `note_eviction`).
    pub(crate) fn let_slots_grow(&mut self, max: usize) {
        self.max_slots = max.max(self.blocks.len);
    }

    /// A miss evicted another block. Each of 8 vCPUs gets an eighth of the slots one
    /// would, and one that runs much of the guest's code evicts its own working set: 8
    /// vCPUs running one process after another, on whichever is idle, missed on 9% of
    /// their lookups, and each fork and exec took 10.2 ms against 4.8 ms on one vCPU
    /// (7.5 ms with four times the slots). Evicting a sixteenth of the slots within fewer
    /// than 32 lookups per slot (more than one lookup in 512) doubles the cache at the
    /// next `enter_run`.
    #[cold]
    fn note_eviction(&mut self) {
        self.evictions += 1;
        let len = self.blocks.len as u64;
        if self.evictions >= len >> 4 {
            self.grow |= self.lookups < len << 5 && self.blocks.len < self.max_slots;
            self.evictions = 0;
            self.lookups = 0;
        }
    }

    /// Doubles the slots, moving every cached block, compiled code and all, to its place
    /// in the new ones (where two now meet, the first stays). Links between compiled
    /// blocks name their slots: they are cut, and made again as the blocks run.
    #[cold]
    fn grow_slots(&mut self) {
        self.grow = false;
        self.lookups = 0;
        self.evictions = 0;
        let n = (self.blocks.len * 2).min(self.max_slots);
        if n <= self.blocks.len {
            return;
        }
        self.cut_links(self.links_epoch);
        // The jump cache names the chain entries of blocks left behind.
        self.jc_stamp += 1;
        let mut old = std::mem::replace(&mut self.blocks, Slots::new(n));
        self.by_page.clear();
        for i in old.filled.clone() {
            let Some(b) = old.get_mut(i as usize) else {
                continue;
            };
            if b.bitness == 0 {
                continue;
            }
            let slot = self.way(b.gpa, b.ip);
            let free = self.blocks.get(slot).is_some_and(|t| t.bitness == 0);
            if free {
                let moved = std::mem::take(b);
                // Its code names its slot in its record.
                if let (Some(_), Some(body), Some(j)) =
                    (moved.compiled(), &moved.body, &mut self.jit)
                {
                    j.move_record(body.record, slot);
                }
                if self.blocks.get(slot).is_some_and(|t| t.body.is_none()) {
                    self.blocks.filled.push(slot as u32);
                }
                let pages = (
                    (moved.gpa >> 12) as usize,
                    moved
                        .body
                        .as_ref()
                        .filter(|_| moved.bitness & CROSS != 0)
                        .map(|body| (body.cross_gpa >> 12) as usize),
                );
                if let Some(t) = self.blocks.get_mut(slot) {
                    *t = moved;
                }
                self.index(pages.0, slot);
                if let Some(p) = pages.1 {
                    self.index(p, slot);
                }
            }
        }
    }

    /// The mask that picks a slot (compiled code computes slots too).
    pub(crate) fn slot_mask(&self) -> u64 {
        (self.blocks.len - 1) as u64
    }

    /// Compile blocks after `threshold` runs (0: at once), or never (None).
    pub(crate) fn set_jit_threshold(&mut self, threshold: Option<u32>) {
        self.drop_compiled();
        match threshold {
            None => self.jit = None,
            Some(t) => match &mut self.jit {
                Some(j) => j.threshold = t,
                None => self.jit = Jit::new(t),
            },
        }
    }

    pub(crate) fn compiled_blocks(&self) -> u64 {
        self.jit.as_ref().map_or(0, |j| j.compiled)
    }

    /// Compiled code covers what the CPU model has: when the model's ISA changes, what was
    /// compiled for the old one goes.
    pub(crate) fn set_jit_model(&mut self, model: u64) {
        let Some(j) = &mut self.jit else { return };
        if j.model != model {
            j.model = model;
            self.drop_compiled();
        }
    }

    fn drop_compiled(&mut self) {
        self.drop_compiled_keeping(false);
    }

    /// Drops every compiled block; with `heat`, those compiled so far are compiled again
    /// after `RECOMPILE_RUNS` runs instead of `threshold` (for a full arena, when the
    /// threshold stays).
    fn drop_compiled_keeping(&mut self, heat: bool) {
        let threshold = self.jit.as_ref().map_or(0, |j| j.threshold);
        for i in 0..self.blocks.filled.len() {
            let Some(&slot) = self.blocks.filled.get(i) else {
                break;
            };
            if let Some(b) = self.blocks.get_mut(slot as usize) {
                // A block that was compiled is compiled again after a few runs, not after
                // `threshold` more: a hot block would otherwise run interpreted that long.
                b.runs = if heat && b.compiled().is_some() {
                    threshold.saturating_sub(RECOMPILE_RUNS)
                } else {
                    0
                };
                b.set_compiled(None);
                if let Some(body) = &mut b.body {
                    body.incoming.clear();
                }
            }
        }
        self.live_links.clear();
        self.jc_stamp += 1;
        self.generation += 1;
        self.any_compiled = false;
    }

    /// Counts a run of the block in `slot` and compiles it when it turns hot.
    #[inline(always)]
    fn count_run(&mut self, slot: usize) {
        let Some(jit) = &mut self.jit else { return };
        let Some(b) = self.blocks.get_mut(slot) else {
            return;
        };
        // A block with code (compiled here, or another CPU's adopted at its first run) is
        // done: installing its code again would reset its links, and each would cost an
        // exit to the run loop to make again (0.9M of them in 500 process starts on an
        // 8-vCPU guest).
        if b.runs > jit.threshold || b.entry != 0 || !matches!(b.bitness & !CROSS, 64 | 32) {
            return;
        }
        b.runs += 1;
        if b.runs > jit.threshold {
            self.compile(slot, None);
        } else if matches!(b.runs, 1 | 4 | 16 | 64) {
            // Another CPU may have compiled it meanwhile, or the CPUs together may have
            // run it often enough: then it runs compiled from now on. The first run only
            // looks for code: most blocks of a boot run a few times, and counting them all
            // in the machine's heat map made it the biggest lookup of an 8-vCPU boot.
            let runs = match b.runs {
                1 => 0,
                4 => 4,
                r => r - r / 4,
            };
            self.compile(slot, Some(runs));
        } else if b
            .body
            .as_ref()
            .and_then(|body| body.decoded.as_ref())
            .is_some_and(|d| d.compiled.load(Ordering::Relaxed))
        {
            // Another CPU compiled it from this decoding since (see `Decoded::compiled`).
            self.compile(slot, Some(0));
        }
    }

    /// Gives the block in `slot` code: compiled now, or (with `warming`, the runs since
    /// the last call) if another CPU of the machine compiled the same or the CPUs
    /// together made it hot.
    #[cold]
    fn compile(&mut self, slot: usize, warming: Option<u32>) {
        let Some(jit) = &mut self.jit else { return };
        let Some(b) = self.blocks.get_mut(slot) else {
            return;
        };
        let Some(body) = &b.body else { return };
        // A page-crossing block's code checks that the TLB generation is the one its next
        // page was found in.
        let tlb_gen = (b.bitness & CROSS != 0).then_some(&body.tlb_gen as *const u64);
        let key = crate::jit::shared::Key {
            gpa: b.gpa,
            ip: b.ip,
            bitness: b.bitness,
            cross_gpa: body.cross_gpa,
            model: jit.model,
        };
        let result = jit.compile(
            key,
            body.code(),
            b.insns(),
            slot,
            tlb_gen,
            warming,
            body.decoded.as_deref(),
        );
        if let Some(d) = &body.decoded {
            // Tell the other CPUs holding it; or, finding none for the hint, drop it.
            match (&result, warming) {
                (Ok(_), _) => d.compiled.store(true, Ordering::Relaxed),
                (Err(_), Some(0)) => d.compiled.store(false, Ordering::Relaxed),
                _ => {}
            }
        }
        match result {
            Ok((c, record)) => {
                b.set_compiled(Some(c));
                if let Some(body) = &mut b.body {
                    body.record = record;
                }
                self.any_compiled = true;
            }
            Err(NoCode::Uncovered) => {}
            Err(NoCode::Full) if warming.is_some() => {}
            Err(NoCode::Full) => {
                // The code memory is full: start over; hot blocks compile again once every
                // CPU has let go of the old code.
                if self.any_compiled || jit.flush_asked() {
                    self.drop_for_flush();
                }
                let threshold = self.jit.as_ref().map_or(0, |j| j.threshold);
                if let Some(b) = self.blocks.get_mut(slot) {
                    b.runs = threshold.saturating_sub(RECOMPILE_RUNS);
                }
            }
        }
    }

    /// The slot of the block at `gpa` for `ip`. The page of `ip` counts as well: a shared
    /// library's code is the same physical page in every process but mapped at a
    /// different address in each (ASLR), and those blocks would otherwise evict one
    /// another at every process switch.
    #[inline(always)]
    fn slot(&self, gpa: u64, ip: u64) -> usize {
        // Adds, not xors: compiled code computes it with flag-free LEAs.
        (gpa.wrapping_add(gpa >> 12).wrapping_add(ip >> 12) as usize) & (self.blocks.len - 1)
    }

    /// The slot that holds the block at `gpa` for `ip`, or the one to decode it into. Each
    /// hash picks a pair of slots (`slot` and its neighbour, one 128-byte line pair): two
    /// hot blocks whose hashes collide would otherwise evict each other at every run (a
    /// system call's entry and exit did, twice per call) and never compile. A new block
    /// goes to an empty slot of the pair, else over the colder one (fewer runs; compiled
    /// blocks are the hottest).
    #[inline(always)]
    fn way(&self, gpa: u64, ip: u64) -> usize {
        let first = self.slot(gpa, ip);
        let holds = |s: usize| {
            self.blocks
                .get(s)
                .is_some_and(|b| b.gpa == gpa && b.ip == ip && b.bitness != 0)
        };
        if holds(first) {
            return first;
        }
        let second = first ^ 1;
        if holds(second) {
            return second;
        }
        let heat = |s: usize| {
            self.blocks
                .get(s)
                .map_or(0, |b| match (b.bitness, b.entry) {
                    (0, _) => 0,
                    (_, 0) => u64::from(b.runs) + 1,
                    _ => u64::MAX,
                })
        };
        if heat(second) < heat(first) {
            second
        } else {
            first
        }
    }
    /// The block starting at `gpa` for `ip`, decoding it from `page` (the host page that
    /// holds `gpa`) on a miss or when its code changed. A block already checked in code
    /// epoch `epoch` is not compared again. Returns the block and whether it was checked or
    /// decoded now (its page must then be marked as holding code); None when not even the
    /// first instruction fits in the page (the caller fetches it the slow way).
    #[inline(always)]
    pub(crate) fn get(
        &mut self,
        gpa: u64,
        ip: u64,
        bitness: u32,
        page: *const u8,
        epoch: u64,
    ) -> Option<(usize, bool)> {
        let slot = self.way(gpa, ip);
        self.lookups += 1;
        let mut evicts = false;
        let state = {
            let b = self.blocks.get(slot)?;
            if b.gpa != gpa || b.ip != ip {
                evicts = b.bitness != 0;
                Lookup::Miss
            } else if u32::from(b.bitness) == bitness | u32::from(CROSS) {
                // The first instruction crosses the page end: see `get_cross`.
                return None;
            } else if u32::from(b.bitness) != bitness {
                Lookup::Miss
            } else if b.epoch == epoch {
                Lookup::Trusted
            // SAFETY: `page` is a valid page (caller contract).
            } else if b
                .body
                .as_ref()
                // SAFETY: `page` is a valid page (caller contract).
                .is_some_and(|body| unsafe {
                    still_there(page, (gpa & 0xfff) as usize, body.code())
                })
            {
                Lookup::Unchanged
            } else {
                Lookup::Miss
            }
        };
        match state {
            Lookup::Trusted => {}
            Lookup::Unchanged => {
                self.rechecks += 1;
                self.blocks.get_mut(slot)?.epoch = epoch;
            }
            Lookup::Miss => {
                if evicts {
                    self.note_eviction();
                }
                self.fill(slot, gpa, ip, bitness, page, epoch)?
            }
        }
        if self.blocks.get(slot)?.insns().is_empty() {
            // A page-crossing first instruction: see `get_cross`.
            return None;
        }
        self.count_run(slot);
        Some((slot, !matches!(state, Lookup::Trusted)))
    }

    /// The block at `gpa` for `ip` whose first instruction runs past the end of its page
    /// (`page`), after `get` found it does: its bytes go on in `next` (the host page of
    /// guest-physical `next_gpa`, which the next linear page maps in TLB generation
    /// `tlb_gen`). Decodes it from both pages when it is new, or when its bytes or the
    /// next page's physical address changed. 64-bit code only (the others are stepped).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn get_cross(
        &mut self,
        gpa: u64,
        ip: u64,
        bitness: u32,
        page: *const u8,
        next: *const u8,
        next_gpa: u64,
        tlb_gen: u64,
        epoch: u64,
    ) -> Option<(usize, bool)> {
        if bitness != 64 {
            return None;
        }
        let slot = self.way(gpa, ip);
        let off = (gpa & 0xfff) as usize;
        let head = 4096 - off;
        // SAFETY: `page` and `next` are valid 4 KiB pages (caller contract).
        let (first, second) = unsafe {
            (
                std::slice::from_raw_parts(page.add(off), head),
                std::slice::from_raw_parts(next, 4096),
            )
        };
        let state = {
            let b = self.blocks.get(slot)?;
            let body = b.body.as_ref()?;
            if b.gpa != gpa
                || b.ip != ip
                || b.bitness != 64 | CROSS
                || body.cross_gpa != next_gpa
                || b.insns().is_empty()
            {
                Lookup::Miss
            } else if b.epoch == epoch {
                Lookup::Trusted
            } else if body.code().len() > head
                && body.code().get(..head) == Some(first)
                && second.get(..body.code().len() - head) == body.code().get(head..)
            {
                Lookup::Unchanged
            } else {
                Lookup::Miss
            }
        };
        match state {
            Lookup::Trusted => {}
            Lookup::Unchanged => {
                self.rechecks += 1;
                self.blocks.get_mut(slot)?.epoch = epoch;
            }
            Lookup::Miss => self.fill_cross(slot, gpa, ip, first, second, next_gpa, epoch)?,
        }
        let b = self.blocks.get_mut(slot)?;
        b.body.as_mut()?.tlb_gen = tlb_gen;
        self.count_run(slot);
        Some((slot, !matches!(state, Lookup::Trusted)))
    }

    /// Decodes the page-crossing block at `gpa` from the rest of its page (`first`) and
    /// the next page (`second`, at `next_gpa`) into `slot`.
    #[cold]
    #[allow(clippy::too_many_arguments)]
    fn fill_cross(
        &mut self,
        slot: usize,
        gpa: u64,
        ip: u64,
        first: &[u8],
        second: &[u8],
        next_gpa: u64,
        epoch: u64,
    ) -> Option<()> {
        let mut bytes = Vec::with_capacity(first.len() + second.len());
        bytes.extend_from_slice(first);
        bytes.extend_from_slice(second);
        // Not shared: these are rare, and valid only with their next page's address.
        self.scratch.clear();
        let pos = decode_into(&mut self.scratch, 64, ip, &bytes);
        if pos <= first.len() || self.scratch.is_empty() {
            // The page changed under us and the instruction no longer crosses: the next
            // lookup decodes it again the ordinary way.
            self.reset_slot(slot)?;
            return None;
        }
        let decoded = Arc::new(Decoded::new(
            bytes.get(..pos)?.into(),
            self.scratch.as_slice().into(),
        ));
        let b = self.reset_slot(slot)?;
        let body = b.body.get_or_insert_with(Box::default);
        body.cross_gpa = next_gpa;
        b.insns = std::ptr::NonNull::new(decoded.insns.as_ptr().cast_mut());
        b.len = u8::try_from(decoded.insns.len()).ok()?;
        body.decoded = Some(decoded);
        b.epoch = epoch;
        b.gpa = gpa;
        b.ip = ip;
        b.bitness = 64 | CROSS;
        self.index((gpa >> 12) as usize, slot);
        self.index((next_gpa >> 12) as usize, slot);
        Some(())
    }

    /// Empties `slot` for a new block: no instructions, no code, nothing linked to it.
    fn reset_slot(&mut self, slot: usize) -> Option<&mut Block> {
        if self.blocks.get(slot)?.body.is_none() {
            self.blocks.filled.push(slot as u32);
        }
        let b = self.blocks.get_mut(slot)?;
        if b.entry != 0 {
            // The jump cache may name its chain entry.
            self.jc_stamp += 1;
        }
        b.bitness = 0;
        b.insns = None;
        b.len = 0;
        b.set_compiled(None);
        b.runs = 0;
        let body = b.body.get_or_insert_with(Box::default);
        body.decoded = None;
        body.cross_gpa = u64::MAX;
        // A link slot lies in the arena, which is not reused before `drop_compiled` empties
        // every `incoming` list.
        for link in body.incoming.drain(..) {
            if let Some(j) = &mut self.jit {
                j.unlink(link as u64);
            }
        }
        Some(b)
    }

    /// Runs compiled blocks (there are some only when this is Some).
    pub(crate) fn enter(&self) -> Option<Enter> {
        self.jit.as_ref().map(|j| j.enter)
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// The first slot, for compiled code (the slots never move).
    pub(crate) fn slots_ptr(&self) -> *const u8 {
        self.blocks.as_ptr().cast()
    }

    pub(crate) fn block(&self, slot: usize) -> Option<&Block> {
        self.blocks.get(slot)
    }

    /// Points the link slot `link` (an exit of a compiled block, reported by compiled
    /// code) at the chain entry of the block in `slot`, if that is compiled: the exit then
    /// goes straight on to it.
    pub(crate) fn link(&mut self, link: usize, slot: usize, generation: u64) {
        if generation != self.generation {
            return;
        }
        let Some(b) = self.blocks.get_mut(slot) else {
            return;
        };
        let (Some(c), Some(body), Some(j)) = (b.compiled(), &mut b.body, &mut self.jit) else {
            return;
        };
        // `link` is a link slot that compiled code reported: in the arena, and valid until
        // `drop_compiled`, which also forgets every `incoming` list.
        // A chain entry checks the kick flag and the instruction budget. Links forward
        // skip both: every cycle of linked blocks has a link backward (links stay in one
        // page, where a run of forward ones is at most a page of code long), and the
        // jump cache's entries check, so no run goes on unchecked for more than that.
        let target = if j.forward(link as u64) {
            c.entry
        } else {
            c.chain_entry
        };
        j.link(link as u64, target);
        body.incoming.push(link);
        self.live_links.push((link as u64, slot as u32));
        // Relinks after evictions add entries while the epoch stands still: cutting
        // everything now and then keeps the list bounded (a cut only costs relinks).
        if self.live_links.len() >= MAX_LIVE_LINKS {
            self.cut_links(self.links_epoch);
        }
    }

    /// Cuts every link when the code epoch has moved since the last call: a chain entry
    /// does not check the epoch, so a block whose bytes may have changed must be reached
    /// through a lookup (which checks it again) before it is linked to again. Costs one
    /// write per link made since the last cut.
    /// Also moves the jump cache's stamp when the epoch or the TLB's flush count has.
    #[inline(always)]
    pub(crate) fn sync_links(&mut self, epoch: u64, tlb_flushes: u64) {
        if epoch != self.links_epoch {
            self.cut_links(epoch);
        }
        if (epoch, tlb_flushes) != self.jc_seen {
            self.jc_seen = (epoch, tlb_flushes);
            self.jc_stamp += 1;
        }
    }

    /// The jump cache for code at this privilege and bitness (a RIP means other code in
    /// 32-bit and in 64-bit mode), and the stamp of its valid entries.
    pub(crate) fn jump_cache(&self, user: bool, bits32: bool) -> (u64, u64) {
        let at = (usize::from(user) + 2 * usize::from(bits32)) * crate::jit::JUMP_CACHE;
        let base = self.jump_cache.get(at..).map_or(0, |e| e.as_ptr() as u64);
        (base, self.jc_stamp)
    }

    /// Cuts every link now, as a full list of them does (see `link`).
    pub(crate) fn cut_all_links(&mut self) {
        self.cut_links(self.links_epoch);
    }

    #[cold]
    fn cut_links(&mut self, epoch: u64) {
        self.links_epoch = epoch;
        let Some(j) = &mut self.jit else {
            self.live_links.clear();
            return;
        };
        // Each link slot lies in the arena, which is not reused before `drop_compiled`
        // empties this list; a slot `reset_slot` already unlinked is written again,
        // harmlessly.
        for (link, slot) in self.live_links.drain(..) {
            j.unlink(link);
            if let Some(body) = self
                .blocks
                .get_mut(slot as usize)
                .and_then(|b| b.body.as_mut())
            {
                body.incoming.clear();
            }
        }
    }

    #[cold]
    fn fill(
        &mut self,
        slot: usize,
        gpa: u64,
        ip: u64,
        bitness: u32,
        page: *const u8,
        epoch: u64,
    ) -> Option<()> {
        let off = (gpa & 0xfff) as usize;
        // SAFETY: `page` is a valid 4 KiB page (caller contract) and off < 4096.
        let avail: &[u8] = unsafe { std::slice::from_raw_parts(page.add(off), 4096 - off) };
        let found = self
            .decoded
            .as_ref()
            .and_then(|s| s.find(gpa, ip, bitness, avail));
        let decoded = match found {
            Some(d) => {
                self.taken += 1;
                Some(d)
            }
            None => {
                self.decodes += 1;
                self.scratch.clear();
                let pos = decode_into(&mut self.scratch, bitness, ip, avail);
                (!self.scratch.is_empty()).then(|| {
                    let d = Arc::new(Decoded::new(
                        avail.get(..pos).unwrap_or_default().into(),
                        self.scratch.as_slice().into(),
                    ));
                    if let Some(s) = &self.decoded {
                        s.offer(gpa, ip, bitness, &d);
                    }
                    d
                })
            }
        };
        let b = self.reset_slot(slot)?;
        let bitness = bitness as u8;
        let Some(decoded) = decoded else {
            // The first instruction crosses the page end: remember that (with no code to
            // compare), so the next lookup goes to `get_cross` (or steps it) at once
            // instead of decoding it here again, and of evicting whatever this slot held
            // every time.
            b.epoch = epoch;
            b.gpa = gpa;
            b.ip = ip;
            b.bitness = bitness | CROSS;
            self.index((gpa >> 12) as usize, slot);
            return Some(());
        };
        b.insns = std::ptr::NonNull::new(decoded.insns.as_ptr().cast_mut());
        b.len = u8::try_from(decoded.insns.len()).ok()?;
        if let Some(body) = &mut b.body {
            body.decoded = Some(decoded);
        }
        b.epoch = epoch;
        b.gpa = gpa;
        b.ip = ip;
        b.bitness = bitness;
        self.index((gpa >> 12) as usize, slot);
        Some(())
    }
}

/// Decodes the block at the start of `avail` into `insns` (empty), with its dead flags
/// marked; returns its length in bytes.
fn decode_into(insns: &mut Vec<Insn>, bitness: u32, ip: u64, avail: &[u8]) -> usize {
    let mut d = Decoder::with_ip(bitness, avail, ip, DecoderOptions::NONE);
    let mut pos = 0usize;
    while insns.len() < MAX_BLOCK {
        let ins = d.decode();
        if ins.is_invalid() && d.last_error() == iced_x86::DecoderError::NoMoreBytes {
            break; // runs past the page end
        }
        let len = ins.len().min(15);
        let mut insn = Insn::new(ins);
        // STI goes on with the instruction after it, which its shadow covers: nothing
        // checks for interrupts inside a block. Unless nothing can follow in this block.
        if ins.mnemonic() == M::Sti && insns.len() + 1 < MAX_BLOCK {
            insn.ends = false;
        }
        let ends = insn.ends;
        insns.push(insn);
        pos += len;
        if ends {
            break;
        }
    }
    if let Some(last) = insns.last_mut() {
        if last.instr.mnemonic() == M::Sti {
            last.ends = true;
        }
    }
    mark_dead_flags(insns);
    pos
}

/// The block at the start of `bytes`, as the block cache would decode it.
pub(crate) fn decode_block(bitness: u32, ip: u64, bytes: &[u8]) -> Vec<Insn> {
    let mut insns = Vec::new();
    decode_into(&mut insns, bitness, ip, bytes);
    insns
}

/// Whether the instructions after `ins` cannot be decoded or run ahead of time: branches,
/// and instructions that change the mode, paging, segments, the interrupt flag or
/// single-stepping (what follows them must be fetched afresh).
fn ends_block(ins: &Instruction) -> bool {
    if ins.is_invalid() || ins.flow_control() != FlowControl::Next {
        return true;
    }
    let writes_special_reg = ins.op_count() > 0
        && ins.op0_kind() == OpKind::Register
        && (ins.op0_register().is_segment_register()
            || ins.op0_register().is_cr()
            || ins.op0_register().is_dr());
    writes_special_reg
        || matches!(
            ins.mnemonic(),
            M::Popf
                | M::Popfd
                | M::Popfq
                | M::Sti
                | M::Hlt
                | M::Lgdt
                | M::Lidt
                | M::Lldt
                | M::Ltr
                | M::Lmsw
                | M::Clts
                | M::Invlpg
                | M::Invpcid
                | M::Wrmsr
                | M::Xsetbv
                | M::Lss
                | M::Lds
                | M::Les
                | M::Lfs
                | M::Lgs
                | M::Mwait
                | M::Wbinvd
                | M::Invd
                | M::Rsm
                | M::Xrstor
                | M::Xrstor64
                | M::Fxrstor
                | M::Fxrstor64
                | M::Rdmsr
                | M::In
                | M::Insb
                | M::Insw
                | M::Insd
                | M::Out
                | M::Outsb
                | M::Outsw
                | M::Outsd
        )
}

/// The arithmetic status flags, as iced-x86 numbers them.
const STATUS_BITS: u32 = RflagsBits::OF
    | RflagsBits::SF
    | RflagsBits::ZF
    | RflagsBits::AF
    | RflagsBits::CF
    | RflagsBits::PF;

/// Marks the instructions whose status flags are overwritten, within the block, before
/// anything could observe them: no instruction reads them and none could fault (an
/// exception handler sees the flags) in between. Their handlers then skip the flags. At
/// the block end every flag counts as live.
fn mark_dead_flags(insns: &mut [Insn]) {
    for i in 0..insns.len() {
        let Some(first) = insns.get(i) else { break };
        if !skips_dead_flags(&first.instr, first.fast) {
            continue;
        }
        let mut need = surely_written(&first.instr);
        if need == 0 {
            continue;
        }
        let mut dead = false;
        for next in insns.iter().skip(i + 1) {
            let ins = &next.instr;
            if next.ends || ins.rflags_read() & need != 0 || !cannot_fault(ins, next.fast) {
                break;
            }
            need &= !surely_written(ins);
            if need == 0 {
                dead = true;
                break;
            }
        }
        if let Some(insn) = insns.get_mut(i) {
            insn.uop.flags_dead = dead;
        }
    }
}

/// Status flags `ins` always writes (a shift or rotate by 0 writes none; by CL, maybe none).
fn surely_written(ins: &Instruction) -> u32 {
    let shift = matches!(
        ins.mnemonic(),
        M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror | M::Rcl | M::Rcr | M::Shld | M::Shrd
    );
    if shift {
        // The count is masked to 6 bits for 64-bit operands, else to 5.
        let wide = match ins.op0_kind() {
            OpKind::Register => ins.op0_register().is_gpr64(),
            _ => ins.memory_size().size() == 8,
        };
        let count_mask = if wide { 0x3f } else { 0x1f };
        let imm_count = (0..ins.op_count())
            .find(|&k| ins.op_kind(k) == OpKind::Immediate8)
            .map(|_| u32::from(ins.immediate8()) & count_mask);
        match imm_count {
            Some(c) if c != 0 => {}
            _ => return 0,
        }
    }
    ins.rflags_modified() & STATUS_BITS
}

/// Near jumps, calls, returns and loops: they change nothing but RIP (and RSP).
fn is_near_branch(ins: &Instruction) -> bool {
    ins.is_jcc_short_or_near()
        || ins.is_jmp_short_or_near()
        || ins.is_jmp_near_indirect()
        || ins.is_call_near()
        || ins.is_call_near_indirect()
        || ins.is_loop()
        || ins.is_loopcc()
        || ins.is_jcx_short()
        || ins.mnemonic() == M::Ret
}

/// Decodes one instruction; None if the bytes run out before it ends.
pub(crate) fn decode(bitness: u32, ip: u64, bytes: &[u8]) -> Option<Instruction> {
    let mut d = Decoder::with_ip(bitness, bytes, ip, DecoderOptions::NONE);
    let ins = d.decode();
    if ins.is_invalid() && d.last_error() == iced_x86::DecoderError::NoMoreBytes {
        return None;
    }
    Some(ins)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest that runs code from ever more pages, each block evicting an older one, leaves
    /// the index of slots by page no bigger than what the slots hold warrants; a page
    /// whose block is still cached stays indexed, and a write to it still stales it.
    #[test]
    fn the_page_index_stays_bounded_as_new_pages_evict_old_ones() {
        // The same host page (RETs) stands for every guest page.
        let page = vec![0xc3u8; 4096];
        let mut c = BlockCache::new();
        c.set_jit_threshold(None);
        c.set_slots(MIN_SLOTS);
        let pages = 6 * BY_PAGE_MIN;
        let mut last = None;
        for pfn in 0..pages {
            let gpa = (pfn as u64) << 12;
            last = c.get(gpa, gpa, 64, page.as_ptr(), 0).map(|(slot, _)| slot);
            assert!(last.is_some(), "page {pfn}");
            // At most twice the pages whose blocks the slots can hold.
            let most = 2 * MIN_SLOTS.max(BY_PAGE_MIN);
            assert!(c.by_page.len() <= most, "{} pages listed", c.by_page.len());
        }
        let slot = last.unwrap();
        assert!(c.by_page.contains_key(&(pages - 1)));
        c.stale_pages(&mut vec![pages - 1]);
        assert_eq!(c.blocks.get(slot).map(|b| b.epoch), Some(STALE));
        let gpa = ((pages - 1) as u64) << 12;
        assert_eq!(
            c.get(gpa, gpa, 64, page.as_ptr(), 0),
            Some((slot, true)),
            "compared again"
        );
        assert_eq!(c.rechecked_blocks(), 1);
    }
}
