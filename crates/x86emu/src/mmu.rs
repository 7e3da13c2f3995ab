//! Linear-to-physical translation: 4-level paging, the soft TLB, and the guest memory
//! accessors every instruction uses.

use crate::code::WriteMap;
use crate::cpu::Core;
use crate::exceptions::{pf, vector, Fault, Result};
use crate::platform::Platform;
use crate::state::cr;
use std::sync::Arc;

/// Kind of a memory access, for permission checks and #PF error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Fetch,
}

/// Entries of the soft TLB (direct mapped by page number). 1024 left a Python loop's
/// code, stack and heap evicting one another: 26M refills and compiled-code exits in a run
/// that needs 0.5M with 4096. A systemd boot still walked the page tables 2.2M times with
/// 4096 (1.4M compiled-code exits), 0.9M times with 16384 (0.86M exits). 65536: the slot
/// is the page number's low 16 bits, which compiled code picks with RORX and MOVZX (two
/// 1-cycle steps where PEXT and a scaling LEA took four, on every memory access's
/// dependency chain); 4 MiB of entries and 2.5 MiB of `JitView` per vCPU.
const TLB_SIZE: usize = 65536;

// Permission bits cached in a TLB entry. Write bits are only set once the dirty bit is set,
// so the first write to a clean page takes the slow path and sets D.
const P_READ_SUP: u8 = 1 << 0;
const P_READ_USER: u8 = 1 << 1;
const P_WRITE_SUP: u8 = 1 << 2;
const P_WRITE_USER: u8 = 1 << 3;
const P_EXEC_SUP: u8 = 1 << 4;
const P_EXEC_USER: u8 = 1 << 5;
const P_GLOBAL: u8 = 1 << 6;
/// The page is MMIO: no host pointer (its fetch bits are clear too, so compiled code's
/// block lookup, which tests only those, never runs code from it).
const P_MMIO: u8 = 1 << 7;

#[derive(Clone, Copy, Debug)]
#[repr(C)]
struct TlbEntry {
    /// Linear page number; `u64::MAX` = empty.
    vpn: u64,
    /// Host address of the page minus its linear address (wrapping), so that compiled code
    /// gets a host pointer with one add; see `host` (0 for MMIO).
    addend: u64,
    gpa_page: u64,
    /// For compiled code: `!vpn` where a read (0: supervisor, 1: user) or a write (2, 3)
    /// is allowed and the page is RAM, else [`NO_TAG`], so one compare checks the page,
    /// the permission and that there is a host pointer. Complemented, because compiled
    /// code compares with one LEA: `!tag + page + 1` is 0 only for `tag == page`.
    tags: [u64; 4],
    perm: u8,
    /// log2 of the page size of the mapping this entry was filled from (12, 21, 30).
    page_shift: u8,
}

/// The tag of an access that is not allowed: `!u64::MAX`, which no page number matches.
const NO_TAG: u64 = 0;

const EMPTY: TlbEntry = TlbEntry {
    vpn: u64::MAX,
    addend: 0,
    gpa_page: 0,
    tags: [NO_TAG; 4],
    perm: P_MMIO,
    page_shift: 12,
};

impl TlbEntry {
    /// Whether compiled code may store through this entry at some privilege.
    fn writable(&self) -> bool {
        self.tags[2] != NO_TAG || self.tags[3] != NO_TAG
    }

    fn pfn(&self) -> usize {
        (self.gpa_page >> 12) as usize
    }

    /// The host pointer to the page, or null for MMIO.
    fn host(&self) -> *mut u8 {
        if self.perm & P_MMIO != 0 {
            return std::ptr::null_mut();
        }
        std::ptr::with_exposed_provenance_mut(self.addend.wrapping_add(self.vpn << 12) as usize)
    }
}

/// Where compiled code finds the tags for an access in `Tlb::view_ptr` (see
/// `TlbEntry::tags`): an array of one `u64` per slot.
pub(crate) fn tlb_tag_offset(write: bool, user: bool) -> u64 {
    let i = usize::from(write) * 2 + usize::from(user);
    (8 * TLB_SIZE * i) as u64
}

/// Where compiled code finds the host addends in `Tlb::view_ptr`: one `u64` per slot.
pub(crate) fn tlb_addend_offset() -> u64 {
    (8 * TLB_SIZE * 4) as u64
}

/// What compiled code reads of the TLB, one array per field (the four tags of
/// `TlbEntry::tags`, then the addends), so that the entries of neighbouring pages share
/// cache lines and a slot's field is at `base + slot * 8`. Kept equal to `entries` by
/// every change to a slot (`Tlb::sync`).
struct JitView(Box<[u64]>);

impl std::fmt::Debug for JitView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JitView")
    }
}

impl JitView {
    fn new() -> Self {
        // NO_TAG and a zero addend: the view of an empty slot.
        JitView(vec![0; 5 * TLB_SIZE].into_boxed_slice())
    }

    fn set(&mut self, i: usize, e: &TlbEntry) {
        for (k, tag) in e.tags.iter().enumerate() {
            if let Some(v) = self.0.get_mut(k * TLB_SIZE + i) {
                *v = *tag;
            }
        }
        if let Some(v) = self.0.get_mut(4 * TLB_SIZE + i) {
            *v = e.addend;
        }
    }
}

/// Where compiled code finds a TLB entry's fields: (entry size, offsets of the page
/// number, host addend, guest-physical page and permission bits, number of slots).
pub(crate) fn tlb_layout() -> (usize, i32, i32, i32, i32, usize) {
    use std::mem::{offset_of, size_of};
    (
        size_of::<TlbEntry>(),
        offset_of!(TlbEntry, vpn) as i32,
        offset_of!(TlbEntry, addend) as i32,
        offset_of!(TlbEntry, gpa_page) as i32,
        offset_of!(TlbEntry, perm) as i32,
        TLB_SIZE,
    )
}

/// Direct-mapped soft TLB; a hit is an index, a compare and a bit test.
#[derive(Debug)]
pub(crate) struct Tlb {
    entries: Box<[TlbEntry; TLB_SIZE]>,
    view: JitView,
    /// Slots filled with non-global entries since the last flush of them, so a CR3 reload
    /// (every context switch) clears only those instead of scanning the whole TLB, or
    /// walking the kernel's global entries that survive it.
    filled: Listed,
    /// Slots filled with global entries since the last full flush.
    global: Listed,
    /// Flushes of any kind so far (see `Core::tlb_flushes`).
    pub(crate) flushes: u64,
    /// The largest page shift any entry was filled from since the last full flush: an
    /// INVLPG looks beyond the address's own slot only for mappings that large.
    max_shift: u8,
    /// The pages compiled code may store to through these entries (see `code`).
    pub(crate) writers: Arc<WriteMap>,
    /// Per page: the slot last filled with an entry that lets compiled code store to it,
    /// where `strip_page` looks first (a page usually has one such entry: the guest
    /// kernel's direct map).
    last_writable: Box<[u16]>,
}

/// Slot numbers, with their capacity reserved up front; once full, the flush that would
/// walk them scans every slot instead.
#[derive(Debug)]
struct Listed(Vec<u16>);

impl Listed {
    fn new() -> Self {
        Listed(Vec::with_capacity(TLB_SIZE))
    }

    fn push(&mut self, i: usize) {
        if self.0.len() < TLB_SIZE {
            self.0.push(i as u16);
        }
    }

    /// The slots, or None when some were not listed.
    fn slots(&self) -> Option<&[u16]> {
        (self.0.len() < TLB_SIZE).then_some(&self.0)
    }
}

// SAFETY: the host pointers are into guest RAM owned by the `GuestRam` map of the same CPU,
// which is itself Send; the TLB is never shared between threads.
unsafe impl Send for Tlb {}

impl Tlb {
    pub(crate) fn new(writers: Arc<WriteMap>) -> Self {
        Tlb {
            // Built on the heap: 4 MiB would not fit a vCPU thread's stack.
            entries: vec![EMPTY; TLB_SIZE]
                .into_boxed_slice()
                .try_into()
                .unwrap_or_else(|_| unreachable!("TLB_SIZE entries")),
            view: JitView::new(),
            filled: Listed::new(),
            global: Listed::new(),
            flushes: 0,
            max_shift: 12,
            last_writable: vec![0; writers.pages()].into_boxed_slice(),
            writers,
        }
    }

    /// Empties slot `i`'s entry `e`, keeping the write map's count.
    fn drop_entry(writers: &WriteMap, view: &mut JitView, i: usize, e: &mut TlbEntry) {
        if e.writable() {
            writers.remove(e.pfn());
        }
        *e = EMPTY;
        view.set(i, e);
    }

    /// Takes from slot `i` the right of compiled code to store through it: true if it had it.
    pub(crate) fn strip_slot(&mut self, i: usize) -> bool {
        match self.entries.get_mut(i) {
            Some(e) if e.writable() => {
                self.writers.remove(e.pfn());
                e.tags[2] = NO_TAG;
                e.tags[3] = NO_TAG;
                self.view.set(i, e);
                true
            }
            _ => false,
        }
    }

    /// Takes from every entry of guest-physical page `pfn` the right of compiled code to
    /// store through it: true if one had it.
    pub(crate) fn strip_page(&mut self, pfn: usize) -> bool {
        let mut left = self.writers.count(pfn);
        if left == 0 {
            return false;
        }
        if let Some(&i) = self.last_writable.get(pfn) {
            let i = usize::from(i);
            if self
                .entries
                .get(i)
                .is_some_and(|e| e.writable() && e.pfn() == pfn)
            {
                self.strip_slot(i);
                if left == 1 {
                    return true;
                }
                left = left.saturating_sub(1);
            }
        }
        let (entries, writers, view) = (&mut self.entries, &self.writers, &mut self.view);
        // Counts of u8::MAX are "at least": scan everything then.
        let exact = left != u8::MAX;
        let mut strip = |i: usize| match entries.get_mut(i) {
            Some(e) if e.writable() && e.pfn() == pfn => {
                writers.remove(pfn);
                e.tags[2] = NO_TAG;
                e.tags[3] = NO_TAG;
                view.set(i, e);
                true
            }
            _ => false,
        };
        let mut any = false;
        let mut visit = |i: usize| {
            if strip(i) {
                any = true;
                left = left.saturating_sub(1);
            }
            exact && left == 0
        };
        match (self.filled.slots(), self.global.slots()) {
            (Some(filled), Some(global)) => {
                for &i in filled.iter().chain(global) {
                    if visit(usize::from(i)) {
                        break;
                    }
                }
            }
            _ => {
                for i in 0..TLB_SIZE {
                    if visit(i) {
                        break;
                    }
                }
            }
        }
        any
    }

    /// Gives slot `i` back the right of compiled code to store through it, as its
    /// permissions allow (the caller checked that its page holds no code).
    fn arm_slot(&mut self, i: usize) {
        let Some(e) = self.entries.get_mut(i) else {
            return;
        };
        if e.vpn == u64::MAX || e.writable() || e.perm & P_MMIO != 0 {
            return;
        }
        let tag = |bit: u8| if e.perm & bit != 0 { !e.vpn } else { NO_TAG };
        e.tags[2] = tag(P_WRITE_SUP);
        e.tags[3] = tag(P_WRITE_USER);
        self.view.set(i, e);
        if e.writable() {
            self.writers.add(e.pfn());
            if let Some(h) = self.last_writable.get_mut(e.pfn()) {
                *h = i as u16;
            }
        }
    }

    /// The first entry, for compiled code (see `tlb_layout`).
    pub(crate) fn entries_ptr(&self) -> *const u8 {
        self.entries.as_ptr().cast()
    }

    /// The arrays compiled code checks and translates memory accesses with (see
    /// `JitView`, `tlb_tag_offset`, `tlb_addend_offset`).
    pub(crate) fn view_ptr(&self) -> *const u8 {
        self.view.0.as_ptr().cast()
    }

    pub(crate) fn flush_all(&mut self) {
        self.flushes += 1;
        self.max_shift = 12;
        match (self.filled.slots(), self.global.slots()) {
            (Some(filled), Some(global)) => {
                for &i in filled.iter().chain(global) {
                    let i = usize::from(i);
                    if let Some(e) = self.entries.get_mut(i) {
                        Self::drop_entry(&self.writers, &mut self.view, i, e);
                    }
                }
            }
            _ => {
                self.entries.fill(EMPTY);
                self.view.0.fill(0);
                self.writers.clear();
            }
        }
        self.filled.0.clear();
        self.global.0.clear();
    }

    /// CR3 reload: global pages survive.
    pub(crate) fn flush_non_global(&mut self) {
        self.flushes += 1;
        let (writers, view) = (&self.writers, &mut self.view);
        let mut drop = |i: usize, e: &mut TlbEntry| {
            if e.perm & P_GLOBAL == 0 {
                Self::drop_entry(writers, view, i, e);
            }
        };
        match self.filled.slots() {
            Some(filled) => {
                for &i in filled {
                    // A slot refilled with a global entry since is listed as global too.
                    let i = usize::from(i);
                    if let Some(e) = self.entries.get_mut(i) {
                        drop(i, e);
                    }
                }
            }
            None => self
                .entries
                .iter_mut()
                .enumerate()
                .for_each(|(i, e)| drop(i, e)),
        }
        self.filled.0.clear();
    }

    /// Fills slot `i`, keeping every non-empty slot listed under the kind of entry it
    /// holds.
    #[inline]
    fn put(&mut self, i: usize, new: TlbEntry) {
        let Some(e) = self.entries.get_mut(i) else {
            return;
        };
        let old = std::mem::replace(e, new);
        self.view.set(i, &new);
        if old.writable() {
            self.writers.remove(old.pfn());
        }
        if new.writable() {
            self.writers.add(new.pfn());
            if let Some(h) = self.last_writable.get_mut(new.pfn()) {
                *h = i as u16;
            }
        }
        let was = (old.vpn != u64::MAX).then_some(old.perm & P_GLOBAL != 0);
        let global = new.perm & P_GLOBAL != 0;
        if was != Some(global) {
            if global {
                self.global.push(i);
            } else {
                self.filled.push(i);
            }
        }
    }

    /// INVLPG: drops every entry filled from the mapping that covers `lin`, whatever its size.
    pub(crate) fn flush_page(&mut self, lin: u64) {
        self.flushes += 1;
        // Entries from one mapping of 2^shift bytes sit in the slots of its 4 KiB pages:
        // consecutive ones (mod TLB_SIZE) from the mapping's first.
        let span = 1usize << (self.max_shift - 12).min(TLB_SIZE.trailing_zeros() as u8);
        let first = ((lin >> self.max_shift) << (self.max_shift - 12)) as usize;
        for i in 0..span {
            let i = first.wrapping_add(i) & (TLB_SIZE - 1);
            let Some(e) = self.entries.get_mut(i) else {
                continue;
            };
            if e.vpn != u64::MAX {
                let shift = u32::from(e.page_shift);
                if (e.vpn << 12) >> shift == lin >> shift {
                    Self::drop_entry(&self.writers, &mut self.view, i, e);
                }
            }
        }
    }
}

#[inline(always)]
pub(crate) fn needed_perm(access: Access, user: bool) -> u8 {
    match (access, user) {
        (Access::Read, false) => P_READ_SUP,
        (Access::Read, true) => P_READ_USER,
        (Access::Write, false) => P_WRITE_SUP,
        (Access::Write, true) => P_WRITE_USER,
        (Access::Fetch, false) => P_EXEC_SUP,
        (Access::Fetch, true) => P_EXEC_USER,
    }
}

/// Physical address bits the CPU reports in CPUID 0x80000008.
pub const PHYS_ADDR_BITS: u32 = 40;
const PHYS_MASK: u64 = ((1u64 << PHYS_ADDR_BITS) - 1) & !0xfff;

/// A translated page.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Translation {
    pub(crate) host: *mut u8,
    pub(crate) gpa_page: u64,
}

impl Core {
    /// Translates the page holding `lin`, consulting and filling the TLB.
    #[inline]
    pub(crate) fn translate(
        &mut self,
        lin: u64,
        access: Access,
        user: bool,
    ) -> Result<Translation> {
        let vpn = lin >> 12;
        let slot = (vpn as usize) & (TLB_SIZE - 1);
        let e = &self.tlb.entries[slot];
        let t = if e.vpn == vpn && e.perm & needed_perm(access, user) != 0 {
            let stripped = access == Access::Write
                && e.perm & P_MMIO == 0
                && e.tags[2 + usize::from(user)] != !vpn;
            let t = Translation {
                host: e.host(),
                gpa_page: e.gpa_page,
            };
            if stripped {
                self.note_write(t.gpa_page);
                self.arm_for_stores(slot);
                return Ok(t);
            }
            t
        } else {
            self.translate_slow(lin, access, user)?
        };
        if access == Access::Write {
            self.note_write(t.gpa_page);
        }
        Ok(t)
    }

    /// A store the interpreter made through slot `i`, whose entry compiled code may not
    /// store through: it may again, unless its page holds code (still, or again). Called
    /// after the store was noted, which cleared the page's mark.
    #[cold]
    pub(crate) fn arm_for_stores(&mut self, i: usize) {
        let Some(pfn) = self.tlb.entries.get(i).map(TlbEntry::pfn) else {
            return;
        };
        // Marked since the store was noted (when it was not): the other CPU may have
        // compared its blocks before the bytes change, and asked nothing of this one (its
        // entry could not store), so the store is counted once made (`stores_done`).
        if self.code.is_marked(pfn) {
            self.note_stored_code(pfn);
            return;
        }
        self.tlb.arm_slot(i);
        // After the count it made: a CPU marking the page meanwhile either saw it (and
        // asked this one to strip) or is seen here, and is told of the store as above.
        if self.code.is_marked(pfn) {
            self.note_stored_code(pfn);
            self.tlb.strip_slot(i);
        }
    }

    #[cold]
    fn translate_slow(&mut self, lin: u64, access: Access, user: bool) -> Result<Translation> {
        // A walk that lost an A/D-bit race with another vCPU starts over.
        let mut tries = 0;
        let (gpa_page, perm, page_shift) = loop {
            self.walk_raced = false;
            let r = self.walk(lin, access, user);
            tries += 1;
            if !self.walk_raced || tries >= 64 {
                break r?;
            }
        };
        let host = self.ram.page_ptr(gpa_page).unwrap_or(std::ptr::null_mut());
        let vpn = lin >> 12;
        let slot = (vpn as usize) & (TLB_SIZE - 1);
        self.tlb.max_shift = self.tlb.max_shift.max(page_shift);
        let tag = |bit: u8| {
            if perm & bit != 0 && !host.is_null() {
                !vpn
            } else {
                NO_TAG
            }
        };
        // MMIO: no host pointer, and no fetch from the TLB (see P_MMIO).
        let perm = if host.is_null() {
            (perm & !(P_EXEC_SUP | P_EXEC_USER)) | P_MMIO
        } else {
            perm
        };
        let entry = TlbEntry {
            vpn,
            addend: if host.is_null() {
                0
            } else {
                (host.expose_provenance() as u64).wrapping_sub(vpn << 12)
            },
            gpa_page,
            tags: [
                tag(P_READ_SUP),
                tag(P_READ_USER),
                tag(P_WRITE_SUP),
                tag(P_WRITE_USER),
            ],
            perm,
            page_shift,
        };
        let writable = entry.writable();
        self.tlb.put(slot, entry);
        // After the count `put` made: see `arm_for_stores`.
        if writable && self.code.is_marked(entry.pfn()) {
            if access == Access::Write {
                self.note_stored_code(entry.pfn());
            }
            self.tlb.strip_slot(slot);
        }
        Ok(Translation { host, gpa_page })
    }

    /// Walks the paging structures of the current mode: (frame, permissions, page shift).
    fn walk(&mut self, lin: u64, access: Access, user: bool) -> Result<(u64, u8, u8)> {
        if self.s.cr0 & cr::CR0_PG == 0 {
            let all =
                P_READ_SUP | P_READ_USER | P_WRITE_SUP | P_WRITE_USER | P_EXEC_SUP | P_EXEC_USER;
            Ok(((lin & 0xffff_ffff) & !0xfff, all, 12))
        } else if self.s.efer & cr::EFER_LMA != 0 {
            self.walk_4level(lin, access, user)
        } else if self.s.cr4 & cr::CR4_PAE != 0 {
            self.walk_pae(lin, access, user)
        } else {
            self.walk_32bit(lin, access, user)
        }
    }

    fn pf(&mut self, lin: u64, access: Access, user: bool, bits: u32) -> Fault {
        let mut code = bits;
        if access == Access::Write {
            code |= pf::WRITE;
        }
        if user {
            code |= pf::USER;
        }
        if access == Access::Fetch && self.s.efer & cr::EFER_NXE != 0 {
            code |= pf::FETCH;
        }
        self.s.cr2 = lin;
        Fault::with_error(vector::PF, code)
    }

    fn read_pte(&mut self, gpa: u64) -> u64 {
        self.ram.load_pte(gpa, true)
    }

    fn read_pte32(&mut self, gpa: u64) -> u64 {
        self.ram.load_pte(gpa, false)
    }

    /// Applies the access rules to the accumulated rights and sets A/D bits.
    /// `entries` are the gpas of the walked entries, leaf last.
    #[allow(clippy::too_many_arguments)]
    fn finish_walk(
        &mut self,
        lin: u64,
        access: Access,
        user: bool,
        entries: &[(u64, u64)],
        writable: bool,
        user_ok: bool,
        nx: bool,
        wide: bool,
    ) -> Result<(u8, bool)> {
        let wp = self.s.cr0 & cr::CR0_WP != 0;
        let denied = match access {
            Access::Read => user && !user_ok,
            Access::Write => (user && !user_ok) || (!writable && (user || wp)),
            Access::Fetch => nx || (user && !user_ok),
        };
        if denied {
            return Err(self.pf(lin, access, user, pf::PRESENT));
        }
        let mut dirty = false;
        for (i, &(gpa, e)) in entries.iter().enumerate() {
            let leaf = i + 1 == entries.len();
            let mut ne = e | 0x20;
            if leaf && access == Access::Write {
                ne |= 0x40;
            }
            if leaf {
                dirty = ne & 0x40 != 0;
            }
            // Atomic like the hardware's locked A/D update: another vCPU may be changing
            // this entry (e.g. clearing it); never write back a stale copy.
            if ne != e {
                if !self.ram.compare_exchange_pte(gpa, e, ne, wide) {
                    self.walk_raced = true;
                    return Err(Fault::gp0());
                }
                // A store like any other, for the dirty log (and code marks).
                self.note_write(gpa & !0xfff);
            }
        }
        let mut perm = P_READ_SUP;
        if user_ok {
            perm |= P_READ_USER;
        }
        if !nx {
            perm |= P_EXEC_SUP;
            if user_ok {
                perm |= P_EXEC_USER;
            }
        }
        if dirty {
            if writable || !wp {
                perm |= P_WRITE_SUP;
            }
            if writable && user_ok {
                perm |= P_WRITE_USER;
            }
        }
        Ok((perm, dirty))
    }

    fn walk_4level(&mut self, lin: u64, access: Access, user: bool) -> Result<(u64, u8, u8)> {
        let nxe = self.s.efer & cr::EFER_NXE != 0;
        let rsvd_hi =
            !((1u64 << PHYS_ADDR_BITS) - 1) & 0x000f_ffff_ffff_f000 | if nxe { 0 } else { 1 << 63 };
        let mut table = self.s.cr3 & PHYS_MASK;
        let mut entries = [(0u64, 0u64); 4];
        let (mut writable, mut user_ok, mut nx) = (true, true, false);
        let mut level = 4;
        let mut n = 0;
        loop {
            let shift = 12 + 9 * (level - 1);
            let idx = (lin >> shift) & 0x1ff;
            let gpa = table + idx * 8;
            let e = self.read_pte(gpa);
            if e & 1 == 0 {
                return Err(self.pf(lin, access, user, 0));
            }
            let large = e & 0x80 != 0 && (level == 2 || level == 3);
            let mut rsvd = e & rsvd_hi != 0 || (level == 4 && e & 0x80 != 0);
            if large {
                // Large-page frame must be aligned: bits 12..shift-1 except PAT bit 12 are reserved.
                let low = ((1u64 << shift) - 1) & !0x1fff & 0x000f_ffff_ffff_f000;
                rsvd |= e & low != 0;
            }
            if rsvd {
                return Err(self.pf(lin, access, user, pf::PRESENT | pf::RSVD));
            }
            writable &= e & 2 != 0;
            user_ok &= e & 4 != 0;
            nx |= nxe && e & (1 << 63) != 0;
            entries[n] = (gpa, e);
            n += 1;
            if level == 1 || large {
                let frame_mask = PHYS_MASK & !((1u64 << shift) - 1);
                let gpa_page = (e & frame_mask) | (lin & ((1u64 << shift) - 1) & !0xfff);
                let (mut perm, _) = self.finish_walk(
                    lin,
                    access,
                    user,
                    &entries[..n],
                    writable,
                    user_ok,
                    nx,
                    true,
                )?;
                if e & 0x100 != 0 && self.s.cr4 & cr::CR4_PGE != 0 {
                    perm |= P_GLOBAL;
                }
                return Ok((gpa_page, perm, shift as u8));
            }
            table = e & PHYS_MASK;
            level -= 1;
        }
    }

    fn walk_pae(&mut self, lin: u64, access: Access, user: bool) -> Result<(u64, u8, u8)> {
        let lin = lin & 0xffff_ffff;
        let nxe = self.s.efer & cr::EFER_NXE != 0;
        let pdpte = self.read_pte((self.s.cr3 & 0xffff_ffe0) + ((lin >> 30) & 3) * 8);
        if pdpte & 1 == 0 {
            return Err(self.pf(lin, access, user, 0));
        }
        let mut table = pdpte & PHYS_MASK;
        let mut entries = [(0u64, 0u64); 2];
        let (mut writable, mut user_ok, mut nx) = (true, true, false);
        for (n, level) in [2u32, 1].into_iter().enumerate() {
            let shift = 12 + 9 * (level - 1);
            let gpa = table + ((lin >> shift) & 0x1ff) * 8;
            let e = self.read_pte(gpa);
            if e & 1 == 0 {
                return Err(self.pf(lin, access, user, 0));
            }
            if !nxe && e & (1 << 63) != 0 {
                return Err(self.pf(lin, access, user, pf::PRESENT | pf::RSVD));
            }
            writable &= e & 2 != 0;
            user_ok &= e & 4 != 0;
            nx |= nxe && e & (1 << 63) != 0;
            entries[n] = (gpa, e);
            if level == 1 || e & 0x80 != 0 {
                let frame_mask = PHYS_MASK & !((1u64 << shift) - 1);
                let gpa_page = (e & frame_mask) | (lin & ((1u64 << shift) - 1) & !0xfff);
                let (mut perm, _) = self.finish_walk(
                    lin,
                    access,
                    user,
                    &entries[..=n],
                    writable,
                    user_ok,
                    nx,
                    true,
                )?;
                if e & 0x100 != 0 && self.s.cr4 & cr::CR4_PGE != 0 {
                    perm |= P_GLOBAL;
                }
                return Ok((gpa_page, perm, shift as u8));
            }
            table = e & PHYS_MASK;
        }
        Err(self.pf(lin, access, user, 0))
    }

    fn walk_32bit(&mut self, lin: u64, access: Access, user: bool) -> Result<(u64, u8, u8)> {
        let lin = lin & 0xffff_ffff;
        let pde_gpa = (self.s.cr3 & 0xffff_f000) + ((lin >> 22) & 0x3ff) * 4;
        let pde = self.read_pte32(pde_gpa);
        if pde & 1 == 0 {
            return Err(self.pf(lin, access, user, 0));
        }
        if pde & 0x80 != 0 && self.s.cr4 & cr::CR4_PSE != 0 {
            let gpa_page = (pde & 0xffc0_0000) | (lin & 0x003f_f000);
            let (mut perm, _) = self.finish_walk(
                lin,
                access,
                user,
                &[(pde_gpa, pde)],
                pde & 2 != 0,
                pde & 4 != 0,
                false,
                false,
            )?;
            if pde & 0x100 != 0 && self.s.cr4 & cr::CR4_PGE != 0 {
                perm |= P_GLOBAL;
            }
            return Ok((gpa_page, perm, 22));
        }
        let pte_gpa = (pde & 0xffff_f000) + ((lin >> 12) & 0x3ff) * 4;
        let pte = self.read_pte32(pte_gpa);
        if pte & 1 == 0 {
            return Err(self.pf(lin, access, user, 0));
        }
        let (mut perm, _) = self.finish_walk(
            lin,
            access,
            user,
            &[(pde_gpa, pde), (pte_gpa, pte)],
            pde & pte & 2 != 0,
            pde & pte & 4 != 0,
            false,
            false,
        )?;
        if pte & 0x100 != 0 && self.s.cr4 & cr::CR4_PGE != 0 {
            perm |= P_GLOBAL;
        }
        Ok((pte & 0xffff_f000, perm, 12))
    }

    /// Host pointer for a `size`-byte access at `lin` when the TLB already maps its page
    /// with the needed permission and the access stays in that page; None sends the
    /// caller down the full path (walk, MMIO, page crossing, faults). A write counts for
    /// the code epoch as any write does.
    #[inline(always)]
    pub(crate) fn tlb_hit(
        &mut self,
        lin: u64,
        size: usize,
        access: Access,
        user: bool,
    ) -> Option<*mut u8> {
        let off = (lin & 0xfff) as usize;
        if off + size > 4096 {
            return None;
        }
        let vpn = lin >> 12;
        let e = self.tlb.entries.get((vpn as usize) & (TLB_SIZE - 1))?;
        if e.vpn != vpn
            || e.perm & (needed_perm(access, user) | P_MMIO) != needed_perm(access, user)
        {
            return None;
        }
        let (host, gpa_page) = (e.host(), e.gpa_page);
        if access == Access::Write {
            let stripped = e.tags[2 + usize::from(user)] != !vpn;
            self.note_write(gpa_page);
            if stripped {
                self.arm_for_stores((vpn as usize) & (TLB_SIZE - 1));
            }
        }
        // SAFETY: `host` is a valid 4 KiB RAM page (TLB contract) and off < 4096.
        Some(unsafe { host.add(off) })
    }

    /// Whether an access at the current privilege is a user-mode access.
    #[inline]
    pub(crate) fn user(&self) -> bool {
        self.s.cpl() == 3
    }

    /// Reads `N` bytes at a linear address.
    #[inline]
    pub(crate) fn read_lin<const N: usize>(
        &mut self,
        p: &mut dyn Platform,
        lin: u64,
        user: bool,
    ) -> Result<[u8; N]> {
        let off = (lin & 0xfff) as usize;
        if off + N <= 4096 {
            let t = self.translate(lin, Access::Read, user)?;
            if !t.host.is_null() {
                let mut out = [0u8; N];
                // SAFETY: `t.host` is a valid RAM page (GuestRam contract) and off + N <= 4096.
                unsafe { std::ptr::copy_nonoverlapping(t.host.add(off), out.as_mut_ptr(), N) };
                return Ok(out);
            }
            let mut out = [0u8; N];
            self.io_done = true;
            p.mmio_read(t.gpa_page | off as u64, &mut out);
            return Ok(out);
        }
        let mut out = [0u8; N];
        self.read_lin_slow(p, lin, &mut out, user, Access::Read)?;
        Ok(out)
    }

    /// Reads an arbitrary byte range, page by page (page-crossing accesses and fetches).
    pub(crate) fn read_lin_slow(
        &mut self,
        p: &mut dyn Platform,
        lin: u64,
        out: &mut [u8],
        user: bool,
        access: Access,
    ) -> Result<()> {
        // Translate every page first so a fault leaves nothing half-done.
        let mut done = 0;
        while done < out.len() {
            let a = self.wrap_lin(lin.wrapping_add(done as u64));
            let off = (a & 0xfff) as usize;
            let n = (4096 - off).min(out.len() - done);
            let t = self.translate(a, access, user)?;
            let chunk = &mut out[done..done + n];
            if t.host.is_null() {
                self.io_done = true;
                p.mmio_read(t.gpa_page | off as u64, chunk);
            } else {
                // SAFETY: valid RAM page, off + n <= 4096.
                unsafe { std::ptr::copy_nonoverlapping(t.host.add(off), chunk.as_mut_ptr(), n) };
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at a linear address.
    #[inline]
    pub(crate) fn write_lin(
        &mut self,
        p: &mut dyn Platform,
        lin: u64,
        data: &[u8],
        user: bool,
    ) -> Result<()> {
        let off = (lin & 0xfff) as usize;
        if off + data.len() <= 4096 {
            let t = self.translate(lin, Access::Write, user)?;
            if !t.host.is_null() {
                // SAFETY: valid RAM page, off + len <= 4096.
                unsafe {
                    std::ptr::copy_nonoverlapping(data.as_ptr(), t.host.add(off), data.len())
                };
                return Ok(());
            }
            self.io_done = true;
            p.mmio_write(t.gpa_page | off as u64, data);
            return Ok(());
        }
        // Page-crossing: check both pages before writing anything.
        let second = self.wrap_lin(lin.wrapping_add(data.len() as u64 - 1)) & !0xfff;
        self.translate(lin, Access::Write, user)?;
        self.translate(second, Access::Write, user)?;
        let mut done = 0;
        while done < data.len() {
            let a = self.wrap_lin(lin.wrapping_add(done as u64));
            let off = (a & 0xfff) as usize;
            let n = (4096 - off).min(data.len() - done);
            let t = self.translate(a, Access::Write, user)?;
            let chunk = &data[done..done + n];
            if t.host.is_null() {
                self.io_done = true;
                p.mmio_write(t.gpa_page | off as u64, chunk);
            } else {
                // SAFETY: valid RAM page, off + n <= 4096.
                unsafe { std::ptr::copy_nonoverlapping(chunk.as_ptr(), t.host.add(off), n) };
            }
            done += n;
        }
        Ok(())
    }

    /// Outside long mode linear addresses are 32 bits wide.
    #[inline]
    pub(crate) fn wrap_lin(&self, lin: u64) -> u64 {
        if self.s.efer & cr::EFER_LMA != 0 {
            lin
        } else {
            lin & 0xffff_ffff
        }
    }

    /// Host pointer for an aligned atomic access of `size` bytes, or None (MMIO or split).
    pub(crate) fn atomic_ptr(
        &mut self,
        lin: u64,
        size: usize,
        user: bool,
    ) -> Result<Option<*mut u8>> {
        let t = self.translate(lin, Access::Write, user)?;
        let off = (lin & 0xfff) as usize;
        if t.host.is_null() || !off.is_multiple_of(size) {
            return Ok(None);
        }
        // SAFETY: off < 4096 inside a valid RAM page.
        Ok(Some(unsafe { t.host.add(off) }))
    }

    /// Host pointer for a write of `size` bytes that stays inside one RAM page, aligned
    /// or not; None for MMIO or an access that crosses into the next page.
    pub(crate) fn ram_ptr_in_page(
        &mut self,
        lin: u64,
        size: usize,
        user: bool,
    ) -> Result<Option<*mut u8>> {
        let off = (lin & 0xfff) as usize;
        if off + size > 4096 {
            return Ok(None);
        }
        let t = self.translate(lin, Access::Write, user)?;
        if t.host.is_null() {
            return Ok(None);
        }
        // SAFETY: off + size <= 4096 inside a valid RAM page.
        Ok(Some(unsafe { t.host.add(off) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(vpn: u64, global: bool) -> TlbEntry {
        TlbEntry {
            vpn,
            perm: if global { P_GLOBAL } else { 0 },
            ..EMPTY
        }
    }

    fn present(t: &Tlb, i: usize) -> Option<bool> {
        let e = t.entries.get(i)?;
        (e.vpn != u64::MAX).then_some(e.perm & P_GLOBAL != 0)
    }

    /// A slot that changes kind (a conflict refill) is flushed by what flushes its new
    /// kind: the lists a CR3 reload or a full flush walk must not lose it.
    #[test]
    fn flushes_find_slots_refilled_with_the_other_kind() {
        let mut t = Tlb::new(Arc::new(WriteMap::new(16)));
        t.put(5, entry(5, true));
        t.put(7, entry(7, false));
        t.flush_non_global();
        assert_eq!((present(&t, 5), present(&t, 7)), (Some(true), None));
        // Global -> non-global in slot 5, non-global -> global in slot 7.
        t.put(5, entry(5 + TLB_SIZE as u64, false));
        t.put(7, entry(7, false));
        t.put(7, entry(7 + TLB_SIZE as u64, true));
        t.flush_non_global();
        assert_eq!((present(&t, 5), present(&t, 7)), (None, Some(true)));
        t.put(9, entry(9, false));
        t.flush_all();
        assert_eq!(
            (present(&t, 5), present(&t, 7), present(&t, 9)),
            (None, None, None)
        );
        assert!(t.filled.0.is_empty() && t.global.0.is_empty());
    }

    fn writable(vpn: u64, pfn: u64) -> TlbEntry {
        TlbEntry {
            vpn,
            gpa_page: pfn << 12,
            tags: [!vpn; 4],
            perm: P_READ_SUP | P_WRITE_SUP,
            ..EMPTY
        }
    }

    /// A page marked as code loses the entries that let compiled code store to it: the
    /// marking CPU's at once, another CPU's when it takes the request; a page no entry
    /// can store to asks no one.
    #[test]
    fn marking_a_page_strips_the_entries_compiled_stores_go_through() {
        use crate::code::CodeTracker;
        let code = CodeTracker::new(64 << 12);
        let (wa, wb) = (Arc::new(WriteMap::new(64)), Arc::new(WriteMap::new(64)));
        code.register(&wa);
        code.register(&wb);
        let (mut a, mut b) = (Tlb::new(wa.clone()), Tlb::new(wb.clone()));
        a.put(1, writable(1, 5));
        b.put(2, writable(2, 5));
        b.put(3, writable(3, 6));
        b.put(4, writable(4, 7));
        assert!(code.mark(5, &wa), "the marking CPU has an entry for page 5");
        assert!(a.strip_page(5) && !a.entries[1].writable());
        assert!(wb.pending());
        assert_eq!(wb.take_requests(), vec![5]);
        // Pending until carried out: a CPU at CPUID counts on it, if b is running.
        assert!(wb.pending());
        wb.set_running(true);
        assert!(code.stores_unnoted(&wa), "b may have stored unnoted");
        assert!(
            !code.stores_unnoted(&wb),
            "b's own requests are not another's"
        );
        assert!(b.strip_page(5));
        wb.requests_done();
        assert!(!wb.pending() && !code.stores_unnoted(&wa));
        assert!(!b.entries[2].writable() && b.entries[3].writable());
        // Marked already: nothing to do; once stripped, nothing to ask.
        assert!(!code.mark(5, &wa));
        assert!(code.note_write(5));
        assert!(!code.mark(5, &wa) && !wb.pending());
        // Dropped entries are forgotten: by INVLPG, a CR3 reload, a full flush.
        b.flush_page(3 << 12);
        assert!(!code.mark(6, &wa) && !wb.pending());
        b.flush_all();
        assert!(!code.mark(7, &wa) && !wb.pending());
        // A refill over a writable entry forgets the old page.
        a.put(9, writable(9, 10));
        a.put(9, writable(9 + TLB_SIZE as u64, 11));
        assert!(!code.mark(10, &wa));
        assert!(code.mark(11, &wa));
        // Two aliases of one page: both stripped, the one the hint names and the other.
        a.put(12, writable(12, 20));
        a.put(13, writable(13, 20));
        assert!(code.mark(20, &wa) && a.strip_page(20));
        assert!(!a.entries[12].writable() && !a.entries[13].writable());
        assert_eq!(wa.count(20), 0);
    }

    /// Two CPUs sharing a code tracker, a writer and a reader, over 64 KiB of RAM in `buf`
    /// (0x11000 bytes, kept alive by the caller while both CPUs live).
    fn writer_and_reader(buf: &mut [u8]) -> (crate::Cpu, crate::Cpu) {
        let off = buf.as_ptr().align_offset(4096);
        let p = buf[off..].as_mut_ptr();
        let map = || {
            let mut ram = crate::GuestRam::new();
            // SAFETY: the 64 KiB from `p` lie in `buf`, which the caller keeps alive
            // while both CPUs live.
            unsafe { ram.add_region(0, p, 0x10000).unwrap() };
            ram
        };
        let mut w = crate::Cpu::new(map());
        let r = crate::Cpu::new(map());
        w.set_code_tracker(r.code_tracker());
        r.code.register(&r.tlb.writers);
        (w, r)
    }

    /// An interpreted store noted while its page held no code, then marked by another CPU
    /// (which compared its blocks with the bytes not yet changed and asked nothing of
    /// this CPU, whose entry could not store) before the store was made: the store must
    /// be counted once made, or that CPU trusts its old blocks at its next CPUID. (Found
    /// by the guest litmus program's cross-modifying-code check, 1 in ~4M.)
    #[test]
    fn a_store_to_a_page_marked_on_its_way_is_counted_once_made() {
        let mut buf = vec![0u8; 0x11000];
        let (mut w, r) = writer_and_reader(&mut buf);
        // The writer's entry for page 5 had its stores stripped (the page held code).
        let mut e = writable(5, 5);
        e.tags[2] = NO_TAG;
        e.tags[3] = NO_TAG;
        w.tlb.put(5, e);
        assert!(!w.code.is_marked(5));
        w.note_write(5 << 12);
        assert_eq!(w.stored_pages, 0, "no code there when noted");
        // The reader marks the page (to compare its blocks): no one to ask.
        assert!(!r.code.mark(5, &r.tlb.writers));
        assert!(!w.tlb.writers.pending());
        w.arm_for_stores(5);
        assert!(!w.tlb.entries[5].writable(), "marked: stays stripped");
        let before = r.code.writes();
        w.stores_done();
        assert_ne!(r.code.writes(), before, "the store is counted once made");
        // CPUID on the reader: the count moved, so it checks the page's blocks again;
        // then nothing, until a CPU's code stores where none are noted (hybrid native
        // stints): then every block.
        let mut r = r;
        let epoch = r.code_epoch;
        let events = r.code_events;
        r.serialise_code();
        assert_eq!(r.stale_pages, [5], "the page written is checked again");
        assert_ne!(r.code_events, events, "the run loop takes it up");
        assert_eq!(r.code_epoch, epoch, "only that page");
        r.stale_pages.clear();
        r.serialise_code();
        assert!(r.stale_pages.is_empty(), "nothing written since");
        assert_eq!(r.code_epoch, epoch, "nothing written since");
        w.code_written_elsewhere();
        r.serialise_code();
        assert_ne!(r.code_epoch, epoch, "native stores are not counted");
        drop(buf);
    }

    /// A CPU that strips many entries at once (other CPUs checked code in pages it could
    /// store to) names each page in the count of writes: the other CPUs check the blocks
    /// of those pages again, not every block they hold.
    #[test]
    fn stripping_many_pages_names_each_page_written() {
        let mut buf = vec![0u8; 0x11000];
        let (mut w, mut r) = writer_and_reader(&mut buf);
        let pages = 1..=9usize;
        for pfn in pages.clone() {
            w.tlb.put(pfn, writable(pfn as u64, pfn as u64));
        }
        for pfn in pages.clone() {
            assert!(!r.code.mark(pfn, &r.tlb.writers));
        }
        assert!(w.tlb.writers.pending());
        // At its next block boundary (here: a serialising instruction).
        w.serialise_code();
        assert!(!w.tlb.writers.pending());
        assert!(pages.clone().all(|pfn| !w.tlb.entries[pfn].writable()));
        // No instruction ran: nothing is left to count once made.
        w.stores_done();
        let epoch = r.code_epoch;
        r.serialise_code();
        assert_eq!(r.code_epoch, epoch, "each page is named");
        r.stale_pages.sort_unstable();
        assert_eq!(r.stale_pages, pages.collect::<Vec<_>>());
        drop(buf);
    }

    #[test]
    fn the_dirty_log_sees_noted_stores_and_entries_still_armed() {
        use crate::code::CodeTracker;
        let code = CodeTracker::new(64 << 12);
        let wa = Arc::new(WriteMap::new(64));
        code.register(&wa);
        let mut a = Tlb::new(wa.clone());
        let bit = |log: &[u64], pfn: usize| log[pfn / 64] >> (pfn % 64) & 1 == 1;
        let first = code.take_dirty_log();
        assert!((0..64).all(|p| bit(&first, p)), "first take: all");
        assert!(
            code.take_dirty_log().iter().all(|&w| w == 0),
            "nothing written"
        );
        // A store the interpreter noted; an entry compiled code may still store through.
        assert!(!code.note_write(3), "not code");
        a.put(5, writable(5, 7));
        let log = code.take_dirty_log();
        assert!(bit(&log, 3) && bit(&log, 7) && !bit(&log, 4));
        assert!(wa.pending(), "the CPU is asked to strip the armed entry");
        for pfn in wa.take_requests() {
            if a.strip_page(pfn) {
                code.note_write(pfn);
            }
        }
        assert!(!a.entries[5].writable());
        let log = code.take_dirty_log();
        assert!(bit(&log, 7) && !bit(&log, 3), "stripped: counted once more");
        assert!(code.take_dirty_log().iter().all(|&w| w == 0));
        // Code marks still work on logged pages, and a store to code is both.
        assert!(!code.mark(9, &wa));
        assert!(code.is_marked(9));
        assert!(code.note_write(9), "a store to code");
        assert!(bit(&code.take_dirty_log(), 9));
        code.stop_dirty_log();
        assert!(!code.is_marked(10), "no longer held clean");
    }

    /// More fills than the lists hold: the flushes scan every slot instead.
    #[test]
    fn overflowing_lists_fall_back_to_a_full_scan() {
        let mut t = Tlb::new(Arc::new(WriteMap::new(16)));
        for round in 0..3u64 {
            for i in 0..TLB_SIZE {
                let global = (i as u64 + round).is_multiple_of(2);
                t.put(i, entry(i as u64 + round * TLB_SIZE as u64, global));
            }
        }
        t.flush_non_global();
        assert!((0..TLB_SIZE).all(|i| present(&t, i) != Some(false)));
        assert!((0..TLB_SIZE).any(|i| present(&t, i) == Some(true)));
        t.flush_all();
        assert!((0..TLB_SIZE).all(|i| present(&t, i).is_none()));
    }
}
