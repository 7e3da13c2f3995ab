//! Address translation: the Sv39/Sv48 page-table walk with hardware A/D updates, and the
//! soft TLB that caches its result with the host page behind it.

use crate::ram::GuestRam;
use crate::trap::Exception;

/// The kind of access being translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Fetch = 0,
    Load = 1,
    Store = 2,
}

impl Access {
    fn page_fault(self, va: u64) -> Exception {
        match self {
            Access::Fetch => Exception::InstructionPageFault(va),
            Access::Load => Exception::LoadPageFault(va),
            Access::Store => Exception::StorePageFault(va),
        }
    }

    pub(crate) fn access_fault(self, pa_or_va: u64) -> Exception {
        match self {
            Access::Fetch => Exception::InstructionAccessFault(pa_or_va),
            Access::Load => Exception::LoadAccessFault(pa_or_va),
            Access::Store => Exception::StoreAccessFault(pa_or_va),
        }
    }
}

/// PTE bits.
pub mod pte {
    pub const V: u64 = 1 << 0;
    pub const R: u64 = 1 << 1;
    pub const W: u64 = 1 << 2;
    pub const X: u64 = 1 << 3;
    pub const U: u64 = 1 << 4;
    pub const G: u64 = 1 << 5;
    pub const A: u64 = 1 << 6;
    pub const D: u64 = 1 << 7;
    /// Svpbmt/Svnapot bits and the reserved bits above the PPN: a leaf with any set is
    /// malformed here (we advertise neither extension).
    pub const RESERVED: u64 = 0xffc0_0000_0000_0000;
    pub const PPN_MASK: u64 = 0x003f_ffff_ffff_fc00;
}

/// Who is accessing, as the permission check needs it.
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    /// The effective privilege is U.
    pub user: bool,
    /// mstatus.SUM.
    pub sum: bool,
    /// mstatus.MXR.
    pub mxr: bool,
}

impl Ctx {
    /// The context as a small nonzero number, which TLB entries record once their
    /// permissions passed for it.
    #[inline]
    pub fn key(self) -> u8 {
        1 | (self.user as u8) << 1 | (self.sum as u8) << 2 | (self.mxr as u8) << 3
    }
}

/// Translation modes `satp` selects.
pub const SATP_BARE: u64 = 0;
pub const SATP_SV39: u64 = 8;
pub const SATP_SV48: u64 = 9;

const TLB_SIZE: usize = 512;

/// What compiled code's inline fast path (`jit`) reads: entries of one access kind are
/// `TLB_SLOTS` of `TLB_ENTRY_SIZE` bytes, the kinds one after another, behind the pointer
/// at `TLB_ENTRIES` in a `Tlb`.
pub(crate) const TLB_SLOTS: usize = TLB_SIZE;
pub(crate) const TLB_ENTRY_SIZE: usize = std::mem::size_of::<Entry>();
pub(crate) const TLB_ENTRY_TAG: usize = std::mem::offset_of!(Entry, tag);
pub(crate) const TLB_ENTRY_CTX: usize = std::mem::offset_of!(Entry, ctx);
pub(crate) const TLB_ENTRY_HOST: usize = std::mem::offset_of!(Entry, host);
pub(crate) const TLB_ENTRIES: usize = std::mem::offset_of!(Tlb, entries);

#[derive(Clone, Copy, Debug)]
struct Entry {
    /// Virtual page number + 1 (0 is empty).
    tag: u64,
    /// Physical page address.
    pa_page: u64,
    /// PTE permission bits (R W X U D); for bare translation all of them.
    perm: u64,
    /// Host address of the page if it is RAM, else null (MMIO).
    host: *mut u8,
    /// The [`Ctx::key`] the permissions last passed for: a hit in the same context
    /// skips the permission check.
    ctx: u8,
}

const EMPTY: Entry = Entry {
    tag: 0,
    pa_page: 0,
    perm: 0,
    host: std::ptr::null_mut(),
    ctx: 0,
};

/// A translation the TLB hands back.
#[derive(Clone, Copy, Debug)]
pub struct Hit {
    pub pa: u64,
    /// Host address of the byte at `pa` if it is RAM.
    pub host: *mut u8,
}

/// The soft TLB: direct-mapped, one array per access kind so a hit needs no permission
/// recheck beyond the privilege bits.
#[derive(Debug)]
pub struct Tlb {
    entries: Box<[[Entry; TLB_SIZE]; 3]>,
}

// SAFETY: the host pointers are pages of the GuestRam the same CPU holds (and moves
// with it); they are only dereferenced by that CPU.
unsafe impl Send for Tlb {}

impl Default for Tlb {
    fn default() -> Self {
        Tlb {
            entries: Box::new([[EMPTY; TLB_SIZE]; 3]),
        }
    }
}

fn perm_ok(perm: u64, access: Access, ctx: Ctx) -> bool {
    let user_page = perm & pte::U != 0;
    // U pages are the user's; S reaches them for data only with SUM, never to execute.
    let priv_ok = if user_page {
        ctx.user || (ctx.sum && access != Access::Fetch)
    } else {
        !ctx.user
    };
    let kind_ok = match access {
        Access::Fetch => perm & pte::X != 0,
        Access::Load => perm & pte::R != 0 || (ctx.mxr && perm & pte::X != 0),
        Access::Store => perm & pte::W != 0,
    };
    priv_ok && kind_ok
}

impl Tlb {
    pub fn flush(&mut self) {
        for set in self.entries.iter_mut() {
            set.fill(EMPTY);
        }
    }

    /// The host address of `va` when its page is RAM and its entry already passed for
    /// the context `key`: the hot path of loads and stores.
    #[inline(always)]
    pub fn fast(&self, va: u64, access: Access, key: u8) -> Option<*mut u8> {
        let vpn = va >> 12;
        let e = &self.entries[access as usize][(vpn as usize) % TLB_SIZE];
        if e.tag == vpn.wrapping_add(1) && e.ctx == key && !e.host.is_null() {
            Some(e.host.wrapping_add((va & 0xfff) as usize))
        } else {
            None
        }
    }

    /// A cached translation of `va`, if one exists that allows this access.
    #[inline]
    pub fn lookup(&mut self, va: u64, access: Access, ctx: Ctx) -> Option<Hit> {
        let vpn = va >> 12;
        let e = &mut self.entries[access as usize][(vpn as usize) % TLB_SIZE];
        if e.tag != vpn.wrapping_add(1) {
            return None;
        }
        if !perm_ok(e.perm, access, ctx) || (access == Access::Store && e.perm & pte::D == 0) {
            return None;
        }
        e.ctx = ctx.key();
        let off = va & 0xfff;
        Some(Hit {
            pa: e.pa_page | off,
            host: if e.host.is_null() {
                e.host
            } else {
                e.host.wrapping_add(off as usize)
            },
        })
    }

    fn insert(
        &mut self,
        va: u64,
        access: Access,
        pa_page: u64,
        perm: u64,
        host: *mut u8,
        ctx: Ctx,
    ) {
        let vpn = va >> 12;
        self.entries[access as usize][(vpn as usize) % TLB_SIZE] = Entry {
            tag: vpn.wrapping_add(1),
            pa_page,
            perm,
            host,
            ctx: ctx.key(),
        };
    }
}

/// Walks the page tables for `va`, setting A (and D on a store) in the leaf, and fills
/// the TLB. `satp` is the current `satp`; translation must be on (Sv39 or Sv48).
pub fn walk(
    ram: &GuestRam,
    tlb: &mut Tlb,
    satp: u64,
    va: u64,
    access: Access,
    ctx: Ctx,
) -> Result<Hit, Exception> {
    let levels: u32 = if satp >> 60 == SATP_SV48 { 4 } else { 3 };
    let va_bits = 12 + 9 * levels;
    // The address must be the sign extension of its low va_bits.
    let shift = 64 - va_bits;
    if (((va << shift) as i64) >> shift) as u64 != va {
        return Err(access.page_fault(va));
    }
    let mut table = (satp & 0xfff_ffff_ffff) << 12;
    let mut level = levels;
    loop {
        level -= 1;
        let idx = (va >> (12 + 9 * level)) & 0x1ff;
        let pte_addr = table + idx * 8;
        let entry = ram
            .load_u64_atomic(pte_addr)
            .ok_or(access.access_fault(va))?;
        if entry & pte::V == 0 || (entry & pte::R == 0 && entry & pte::W != 0) {
            return Err(access.page_fault(va));
        }
        if entry & pte::RESERVED != 0 {
            return Err(access.page_fault(va));
        }
        let ppn = (entry & pte::PPN_MASK) >> 10;
        if entry & (pte::R | pte::X) == 0 {
            // Pointer to the next level.
            if level == 0 || entry & (pte::A | pte::D | pte::U) != 0 {
                return Err(access.page_fault(va));
            }
            table = ppn << 12;
            continue;
        }
        if !perm_ok(entry, access, ctx) {
            return Err(access.page_fault(va));
        }
        // A superpage's PPN must be aligned to its size.
        let span_pages = 1u64 << (9 * level);
        if ppn & (span_pages - 1) != 0 {
            return Err(access.page_fault(va));
        }
        let mut want = entry | pte::A;
        if access == Access::Store {
            want |= pte::D;
        }
        if want != entry && !ram.cas_u64(pte_addr, entry, want) {
            // Another hart changed the entry under us: walk again.
            level = levels;
            table = (satp & 0xfff_ffff_ffff) << 12;
            continue;
        }
        let vpn_low = (va >> 12) & (span_pages - 1);
        let pa_page = (ppn | vpn_low) << 12;
        let host = ram.page_ptr(pa_page).unwrap_or(std::ptr::null_mut());
        // A load-side entry must not let a later store skip setting D.
        let perm = want & (pte::R | pte::W | pte::X | pte::U | pte::D);
        tlb.insert(va, access, pa_page, perm, host, ctx);
        let off = va & 0xfff;
        return Ok(Hit {
            pa: pa_page | off,
            host: if host.is_null() {
                host
            } else {
                host.wrapping_add(off as usize)
            },
        });
    }
}

/// Fills the TLB with an identity mapping (translation off).
pub fn identity(ram: &GuestRam, tlb: &mut Tlb, pa: u64, access: Access, ctx: Ctx) -> Hit {
    let page = pa & !0xfff;
    let host = ram.page_ptr(page).unwrap_or(std::ptr::null_mut());
    let ctx_free = pte::R | pte::W | pte::X | pte::D;
    // Identity entries must pass the check for any privilege: store them with U clear
    // and the bare-mode lookup path ignores the U rule (see Cpu::translate).
    tlb.insert(pa, access, page, ctx_free, host, ctx);
    let off = pa & 0xfff;
    Hit {
        pa,
        host: if host.is_null() {
            host
        } else {
            host.wrapping_add(off as usize)
        },
    }
}
