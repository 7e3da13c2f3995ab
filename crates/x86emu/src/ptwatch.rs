//! Page tables watched for another translator of them.
//!
//! The hybrid accelerator runs guest user code on a KVM vCPU, which keeps shadow copies of
//! the guest's page tables built as user code touches memory, and is not told when x86emu
//! (running the guest kernel) stores to them. Dropping all of KVM's copies costs a memslot
//! replacement (0.1-10 ms); dropping them at every TLB flush made each context switch pay
//! it. This keeps, instead, a copy of every page table reachable from the user half of the
//! roots the KVM vCPU was given since its copies were last dropped, and has x86emu note the
//! stores to them (the `TABLE` mark of [`crate::code::CodeTracker`], stripped from compiled
//! code like a code mark). [`TableWatch::sync`] compares the stored-to tables with their
//! copies: an entry that lost a mapping or a right that a shadow may hold means the shadow
//! must go; entries that only gained (a page faulted in, a write allowed) need nothing,
//! since KVM walks the guest's tables again when its own copy faults.
//!
//! A dirty bit is the one thing KVM sets in the guest's tables itself, unseen here: a
//! writable leaf without it, in a table the kernel stored to, may be one whose dirty bit
//! the kernel just cleared while KVM's copy still allows writes, so it counts as lost.
//! Linux maps writable pages dirty, so this is rare.

use std::collections::{HashMap, HashSet};

use crate::mmu::PHYS_ADDR_BITS;
use crate::Cpu;

const P: u64 = 1;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const NX: u64 = 1 << 63;
/// Bits a translator ignores: global, the software bits 9-11 and 52-58.
const IGNORED: u64 = (1 << 8) | (0x7 << 9) | (0x7f << 52);
const ADDR: u64 = ((1u64 << PHYS_ADDR_BITS) - 1) & !0xfff;
/// Copies kept at most (64 MiB of them): past that the watch starts again from the roots.
const MAX_TABLES: usize = 16_384;
/// Lost pages collected at most before dropping every copy is the cheaper way.
const MAX_LOST: usize = 64;

/// What [`TableWatch::sync`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableSync {
    /// Every copy the other translator may hold is still right.
    Clean,
    /// Some entry lost a mapping or a right: the other translator must drop its copies,
    /// then call [`TableWatch::restart`].
    Stale,
    /// Only leaf entries did: the other translator must drop its translations to the
    /// pages [`TableWatch::take_lost_pages`] gives (what they mapped before), wherever
    /// they are, and nothing else.
    Pages,
}

#[derive(Debug)]
struct Table {
    /// 4 for a PML4, 1 for a page table.
    level: u8,
    entries: Box<[u64; 512]>,
}

/// The watched page tables of one VM's other translator (see the module text).
#[derive(Debug, Default)]
pub struct TableWatch {
    tables: HashMap<usize, Table>,
    roots: HashSet<usize>,
    /// The tracker's table-write count when the writes were last taken.
    seen: u64,
    /// A stale entry was found since the last restart.
    stale: bool,
    /// Guest-physical ranges that lost leaf mappings since they were last taken.
    lost: Vec<(u64, u64)>,
}

/// Whether an entry changed from `old` to `new` lost something a translation copied from
/// `old` may still grant.
fn narrows(old: u64, new: u64, leaf: bool) -> bool {
    if old & P == 0 {
        return false;
    }
    if new & P == 0 {
        return true;
    }
    if leaf && new & RW != 0 && new & D == 0 {
        return true;
    }
    let gains = A | D | RW | US | NX;
    let fixed = !(gains | IGNORED);
    old & fixed != new & fixed
        || (old & RW != 0 && new & RW == 0)
        || (old & US != 0 && new & US == 0)
        || (old & NX == 0 && new & NX != 0)
}

fn read_table(cpu: &Cpu, pfn: usize) -> Option<Box<[u64; 512]>> {
    let mut bytes = [0u8; 4096];
    if !cpu.ram().read((pfn as u64) << 12, &mut bytes) {
        return None;
    }
    let mut t = Box::new([0u64; 512]);
    for (e, b) in t.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut q = [0u8; 8];
        q.copy_from_slice(b);
        *e = u64::from_le_bytes(q);
    }
    Some(t)
}

/// Whether entry `e` at `level` maps a page (rather than linking a table).
fn is_leaf(level: u8, e: u64) -> bool {
    level == 1 || (level < 4 && e & PS != 0)
}

/// The table an entry at `level` links to, if it links one (and, in a PML4, only in the
/// user half: the other translator runs user code only).
fn child(level: u8, index: usize, e: u64) -> Option<usize> {
    let links = e & P != 0 && level > 1 && !is_leaf(level, e) && (level < 4 || index < 256);
    links.then_some(((e & ADDR) >> 12) as usize)
}

impl TableWatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many page tables are watched.
    pub fn tables(&self) -> usize {
        self.tables.len()
    }

    /// Compares the watched tables stored to since the last call with their copies, and
    /// watches the tables they newly link. `Stale` stays the answer until
    /// [`TableWatch::restart`].
    pub fn sync(&mut self, cpu: &mut Cpu) -> TableSync {
        let tracker = cpu.code_tracker();
        let count = tracker.table_write_count();
        if count != self.seen {
            self.seen = count;
            let mut linked = Vec::new();
            for pfn in tracker.take_table_writes() {
                let Some(level) = self.tables.get(&pfn).map(|t| t.level) else {
                    continue;
                };
                // Watched again before it is read: a store meanwhile shows next time.
                cpu.watch_page_table(pfn);
                let Some(now) = read_table(cpu, pfn) else {
                    self.stale = true;
                    continue;
                };
                let Some(t) = self.tables.get_mut(&pfn) else {
                    continue;
                };
                for (i, (&old, &new)) in t.entries.iter().zip(now.iter()).enumerate() {
                    let leaf = is_leaf(level, new);
                    let lost = if old != new && narrows(old, new, leaf) {
                        Some(old)
                    } else if narrows(new, new, leaf) {
                        Some(new)
                    } else {
                        None
                    };
                    if let Some(e) = lost {
                        tracing::trace!(pfn, level, i, old, new, "page-table entry narrowed");
                        // A leaf's old page: dropping the translations to it is enough.
                        // A table's: everything under it may be stale.
                        if is_leaf(level, e) && self.lost.len() < MAX_LOST {
                            let size = match level {
                                1 => 1 << 12,
                                2 => 1 << 21,
                                _ => 1 << 30,
                            };
                            self.lost.push((e & ADDR & !(size - 1), size));
                        } else {
                            self.stale = true;
                        }
                    }
                    if let Some(c) = child(level, i, new) {
                        if child(level, i, old) != Some(c) {
                            linked.push((c, level - 1));
                        }
                    }
                }
                t.entries = now;
            }
            for (pfn, level) in linked {
                self.watch(cpu, pfn, level);
            }
        }
        if self.tables.len() > MAX_TABLES {
            self.stale = true;
        }
        if self.stale {
            TableSync::Stale
        } else if !self.lost.is_empty() {
            TableSync::Pages
        } else {
            TableSync::Clean
        }
    }

    /// The guest-physical ranges (start, length) that leaf entries mapped before they lost
    /// them, taken; after a [`TableSync::Pages`].
    pub fn take_lost_pages(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.lost)
    }

    /// Dropping the translations to the lost pages failed: treat it as stale.
    pub fn set_stale(&mut self) {
        self.stale = true;
    }

    /// Watches the user half of the tables under `cr3` (a no-op for a root already
    /// watched), before the other translator is given it.
    pub fn add_root(&mut self, cpu: &mut Cpu, cr3: u64) {
        let pfn = ((cr3 & ADDR) >> 12) as usize;
        if self.roots.insert(pfn) {
            self.watch(cpu, pfn, 4);
        }
    }

    /// The other translator dropped its copies: stop watching everything, then watch
    /// `cr3`'s tables as the first root again.
    pub fn restart(&mut self, cpu: &mut Cpu, cr3: u64) {
        let tracker = cpu.code_tracker();
        for &pfn in self.tables.keys() {
            tracker.unwatch_table(pfn);
        }
        self.seen = tracker.table_write_count();
        tracker.take_table_writes();
        self.tables.clear();
        self.roots.clear();
        self.stale = false;
        self.lost.clear();
        self.add_root(cpu, cr3);
    }

    /// Watches `pfn` as a table at `level` and every table it links, depth first.
    fn watch(&mut self, cpu: &mut Cpu, pfn: usize, level: u8) {
        let mut todo = vec![(pfn, level)];
        while let Some((pfn, level)) = todo.pop() {
            if self.tables.contains_key(&pfn) || self.tables.len() > MAX_TABLES {
                continue;
            }
            cpu.watch_page_table(pfn);
            let Some(entries) = read_table(cpu, pfn) else {
                // Not RAM: the other translator cannot map through it either.
                continue;
            };
            for (i, &e) in entries.iter().enumerate() {
                if let Some(c) = child(level, i, e) {
                    todo.push((c, level - 1));
                }
            }
            self.tables.insert(pfn, Table { level, entries });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 0x5000 | P | RW | US | A | D;

    #[test]
    fn gains_keep_copies_and_losses_drop_them() {
        // A page faulted in, a write allowed, the accessed bit set or cleared: fine.
        assert!(!narrows(0, PAGE, true));
        assert!(!narrows(PAGE & !RW, PAGE, true));
        assert!(!narrows(PAGE, PAGE & !A, true));
        assert!(!narrows(PAGE | NX, PAGE, true));
        assert!(!narrows(PAGE, PAGE | (1 << 9) | (1 << 58), true));
        // Unmapped, moved, write-protected (fork's COW), made kernel-only or no-exec.
        assert!(narrows(PAGE, 0, true));
        assert!(narrows(PAGE, PAGE ^ 0x3000, true));
        assert!(narrows(PAGE, PAGE & !RW, true));
        assert!(narrows(PAGE, PAGE & !US, true));
        assert!(narrows(PAGE, PAGE | NX, true));
        // A writable leaf without its dirty bit: the kernel may have cleared it.
        assert!(narrows(PAGE & !D, PAGE & !D, true));
        assert!(!narrows(PAGE & !D, PAGE & !D, false));
        assert!(!narrows(PAGE & !(D | RW), PAGE & !(D | RW), true));
        // A 2 MiB page split into a table, or the other way round.
        assert!(narrows(PAGE | PS, PAGE, false));
    }

    #[test]
    fn only_the_user_half_of_a_pml4_links_tables() {
        assert_eq!(child(4, 0, 0x7000 | P), Some(7));
        assert_eq!(child(4, 256, 0x7000 | P), None);
        assert_eq!(child(2, 3, 0x7000 | P | PS), None);
        assert_eq!(child(2, 3, 0x7000 | P), Some(7));
        assert_eq!(child(1, 3, 0x7000 | P), None);
        assert_eq!(child(3, 3, 0x7000), None);
    }
}
