//! Consistency check: recomputes every cluster's refcount from the header, L1/L2 tables,
//! refcount structures and snapshot table, and compares with the stored refcounts.
//! Stored > computed is a leak (harmless); stored < computed, references to clusters past
//! the end of the file or misaligned, and wrong COPIED flags are corruptions.

use std::collections::HashMap;

use serde::Serialize;

use super::{
    compressed, header::MAX_L1_BYTES, Qcow2, COMPRESSED, COPIED, L1_RESERVED, L2_RESERVED,
    OFFSET_MASK, ZERO,
};
use crate::error::Qcow2Error;

/// Messages kept in a report; counts stay exact beyond it.
const MAX_MESSAGES: usize = 200;
/// Snapshots qemu allows in one image.
const MAX_SNAPSHOTS: u32 = 65536;

/// Result of checking an image.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct CheckReport {
    /// Problems that can lose or expose data (refcount too low, bad pointers).
    pub corruptions: u64,
    /// Clusters with a refcount but no reference: wasted space only.
    pub leaks: u64,
    /// Leaked clusters whose refcount was lowered by a repair.
    pub leaks_fixed: u64,
    /// COPIED flags set right by a leak repair: a cluster whose leaked reference no
    /// longer counts may have refcount 1 now (`qemu-img check -r leaks` does the same).
    #[serde(default)]
    pub flags_fixed: u64,
    /// Guest clusters with data allocated in this image.
    pub allocated_clusters: u64,
    /// Guest clusters the virtual size spans.
    pub total_clusters: u64,
    /// End of the last cluster in use.
    pub image_end_offset: u64,
    /// Human-readable findings (capped).
    pub messages: Vec<String>,
}

impl CheckReport {
    /// True when there is nothing worse than leaks.
    pub fn is_consistent(&self) -> bool {
        self.corruptions == 0
    }

    fn corrupt(&mut self, msg: String) {
        self.corruptions += 1;
        self.note(msg);
    }

    fn note(&mut self, msg: String) {
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(msg);
        }
    }
}

/// An active L1 or L2 entry and where it lies, for the COPIED check.
struct Flagged {
    /// The cluster it points at.
    host: u64,
    /// The entry as stored, and its file offset.
    entry: u64,
    at: u64,
    what: &'static str,
}

struct Walker<'a> {
    q: &'a mut Qcow2,
    expect: HashMap<u64, u64>,
    /// Active L2 tables and data clusters, whose COPIED flags are checked.
    copied: Vec<Flagged>,
    /// L2 table offset -> (L1 entries pointing at it, whether the active L1 is among them).
    l2_refs: HashMap<u64, (u64, bool)>,
    report: CheckReport,
    file_len: u64,
}

impl Walker<'_> {
    fn cs(&self) -> u64 {
        self.q.cs()
    }

    /// Counts `times` references to the `n` clusters from `offset`; false if invalid.
    fn reference(&mut self, offset: u64, n: u64, times: u64, what: &str) -> bool {
        let cs = self.cs();
        if !offset.is_multiple_of(cs) {
            self.report
                .corrupt(format!("{what} at {offset:#x} is not cluster-aligned"));
            return false;
        }
        if n.checked_mul(cs)
            .is_none_or(|b| offset.saturating_add(b) > self.file_len.div_ceil(cs) * cs)
        {
            self.report.corrupt(format!(
                "{what} at {offset:#x} lies past the end of the file"
            ));
            return false;
        }
        for c in 0..n {
            let slot = self.expect.entry(offset / cs + c).or_insert(0);
            *slot = slot.saturating_add(times);
        }
        true
    }

    fn read_table(&mut self, offset: u64, entries: u64) -> Result<Vec<u64>, Qcow2Error> {
        let mut raw = vec![0u8; (entries * 8) as usize];
        self.q
            .file
            .read_at(offset, &mut raw)
            .map_err(|source| Qcow2Error::ReadL2 { offset, source })?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                u64::from_be_bytes(a)
            })
            .collect())
    }

    /// Records the L2 tables an L1 table (the active one when `active`) points at.
    fn collect_l1(&mut self, l1: &[u64], l1_off: u64, active: bool) {
        let which = if active { "L1" } else { "snapshot L1" };
        for (i, &e) in l1.iter().enumerate() {
            if e & L1_RESERVED != 0 {
                self.report
                    .corrupt(format!("{which} entry {i} ({e:#x}) has reserved bits set"));
            }
            let l2_off = e & OFFSET_MASK;
            if l2_off == 0 {
                if e & !L1_RESERVED != 0 {
                    // Flags with no table (qemu-img reads the header as the table).
                    self.report.corrupt(format!(
                        "{which} entry {i} ({e:#x}) has flags but no L2 table"
                    ));
                }
                continue;
            }
            let slot = self.l2_refs.entry(l2_off).or_insert((0, false));
            slot.0 += 1;
            slot.1 |= active;
            if active {
                self.copied.push(Flagged {
                    host: l2_off,
                    entry: e,
                    at: l1_off + i as u64 * 8,
                    what: "L2 table",
                });
            }
        }
    }

    /// Reads every referenced L2 table once and counts its references, and those of the
    /// clusters it maps, as many times as L1 entries point at it (as qemu-img counts
    /// tables shared with snapshots). Reading each table once bounds the work by the file
    /// size even when a hostile L1 points all its entries at one table.
    fn walk_l2s(&mut self) -> Result<(), Qcow2Error> {
        let l2_entries = self.cs() / 8;
        let mut tables: Vec<(u64, (u64, bool))> = self.l2_refs.drain().collect();
        tables.sort_unstable();
        for (l2_off, (times, active)) in tables {
            if !self.reference(l2_off, 1, times, "L2 table") {
                continue;
            }
            let table = self.read_table(l2_off, l2_entries)?;
            for (i, &entry) in table.iter().enumerate() {
                if entry & COMPRESSED == 0 && entry & L2_RESERVED != 0 {
                    self.report.corrupt(format!(
                        "L2 table at {l2_off:#x}, entry {i} ({entry:#x}) has reserved bits set"
                    ));
                }
                if entry & COMPRESSED != 0 {
                    if entry & COPIED != 0 {
                        self.report.corrupt(format!(
                            "L2 table at {l2_off:#x}, entry {i}: a compressed cluster with the \
                             COPIED flag"
                        ));
                    }
                    let entry = entry & !COPIED;
                    let (start, n) = compressed::host_clusters(&self.q.header, entry);
                    if active {
                        self.report.allocated_clusters += 1;
                    }
                    self.reference(start, n, times, "compressed cluster");
                    continue;
                }
                let host = entry & OFFSET_MASK;
                if host == 0 {
                    continue;
                }
                if entry & ZERO == 0 && active {
                    self.report.allocated_clusters += 1;
                }
                if self.reference(host, 1, times, "data cluster") && active {
                    self.copied.push(Flagged {
                        host,
                        entry,
                        at: l2_off + i as u64 * 8,
                        what: "data cluster",
                    });
                }
            }
        }
        Ok(())
    }

    fn walk_snapshots(&mut self) -> Result<(), Qcow2Error> {
        let h = self.q.header.clone();
        // The table's offset is checked even with no snapshots, as qemu-img does.
        if !h.snapshots_offset.is_multiple_of(self.cs()) || h.snapshots_offset > i64::MAX as u64 {
            self.report.corrupt(format!(
                "snapshot table offset {:#x} is invalid",
                h.snapshots_offset
            ));
            return Ok(());
        }
        if h.nb_snapshots == 0 {
            return Ok(());
        }
        if h.nb_snapshots > MAX_SNAPSHOTS {
            self.report
                .corrupt(format!("{} snapshots is more than allowed", h.nb_snapshots));
            return Ok(());
        }
        let mut pos = h.snapshots_offset;
        let mut l1s = Vec::new();
        for i in 0..h.nb_snapshots {
            let mut e = [0u8; 40];
            if pos.saturating_add(40) > self.file_len {
                self.report
                    .corrupt("snapshot table runs past the end of the file".into());
                return Ok(());
            }
            self.q
                .file
                .read_at(pos, &mut e)
                .map_err(Qcow2Error::ReadL1)?;
            let l1_off = u64::from_be_bytes(e[0..8].try_into().unwrap_or_default());
            let l1_size = u32::from_be_bytes(e[8..12].try_into().unwrap_or_default());
            let id_len = u16::from_be_bytes(e[12..14].try_into().unwrap_or_default());
            let name_len = u16::from_be_bytes(e[14..16].try_into().unwrap_or_default());
            let extra = u32::from_be_bytes(e[36..40].try_into().unwrap_or_default());
            // Version 3 snapshots carry their VM state and disk sizes in the extra data.
            if h.version >= 3 && extra < 16 {
                self.report
                    .corrupt(format!("snapshot table entry {i} is incomplete"));
            }
            let len = 40 + u64::from(extra) + u64::from(id_len) + u64::from(name_len);
            pos = pos.saturating_add(len.div_ceil(8) * 8);
            l1s.push((l1_off, l1_size));
        }
        let cs = self.cs();
        let table_clusters = (pos - h.snapshots_offset).div_ceil(cs);
        self.reference(h.snapshots_offset, table_clusters, 1, "snapshot table");
        for (off, size) in l1s {
            let bytes = u64::from(size) * 8;
            if bytes > MAX_L1_BYTES {
                self.report
                    .corrupt(format!("snapshot L1 table at {off:#x} is too large"));
                continue;
            }
            if !self.reference(off, bytes.div_ceil(cs), 1, "snapshot L1 table") {
                continue;
            }
            let l1 = self.read_table(off, u64::from(size))?;
            self.collect_l1(&l1, off, false);
        }
        Ok(())
    }
}

/// Checks an open image. With `repair_leaks` (image open read-write) the refcounts of
/// leaked clusters are lowered to their real reference counts; corruptions are never
/// repaired here.
pub fn check(q: &mut Qcow2, repair_leaks: bool) -> Result<CheckReport, Qcow2Error> {
    let file_len = q.file.file_len().map_err(Qcow2Error::FileLength)?;
    let cs = q.cs();
    let mut w = Walker {
        q,
        expect: HashMap::new(),
        copied: Vec::new(),
        l2_refs: HashMap::new(),
        report: CheckReport::default(),
        file_len,
    };
    w.report.total_clusters = w.q.header.size.div_ceil(cs);
    w.reference(0, 1, 1, "header");
    let (l1_off, l1_size) = (w.q.header.l1_table_offset, w.q.header.l1_size);
    if l1_size > 0 {
        w.reference(l1_off, (u64::from(l1_size) * 8).div_ceil(cs), 1, "L1 table");
    }
    let rt_off = w.q.refs.table_offset();
    let rt_clusters = w.q.refs.table_clusters();
    w.reference(rt_off, rt_clusters, 1, "refcount table");
    let blocks: Vec<u64> =
        w.q.refs
            .table()
            .iter()
            .copied()
            .filter(|&o| o != 0)
            .collect();
    for b in &blocks {
        w.reference(*b, 1, 1, "refcount block");
    }
    let l1 = w.q.l1.clone();
    w.collect_l1(&l1, l1_off, true);
    w.walk_snapshots()?;
    w.walk_l2s()?;

    // Compare with the stored refcounts.
    let epb = w.q.refs.entries_per_block();
    let table_len = w.q.refs.table().len() as u64;
    let mut stored: HashMap<u64, u64> = HashMap::new();
    for range in 0..table_len {
        if w.q.refs.table().get(range as usize).copied().unwrap_or(0) == 0 {
            continue;
        }
        // Refcounts past the end of the file are ignored (see below), so the walk is
        // bounded by the file size whatever the refcount table claims.
        let file_clusters = w.file_len.div_ceil(cs);
        for idx in range * epb..((range + 1) * epb).min(file_clusters) {
            let r = w.q.refs.get(w.q.file.as_ref(), idx)?;
            if r != 0 {
                stored.insert(idx, r);
            }
        }
    }
    let mut all: Vec<u64> = w.expect.keys().chain(stored.keys()).copied().collect();
    all.sort_unstable();
    all.dedup();
    let mut end = 0;
    let mut leaked = Vec::new();
    for idx in all {
        let want = w.expect.get(&idx).copied().unwrap_or(0);
        let have = stored.get(&idx).copied().unwrap_or(0);
        if want > 0 {
            end = end.max((idx + 1) * cs);
        }
        if have > want {
            if idx >= w.file_len.div_ceil(cs) {
                // Like qemu-img, refcounts past the end of the file are not leaks: an
                // interrupted allocation leaves them and nothing occupies the space.
                continue;
            }
            w.report.leaks += 1;
            leaked.push((idx, want));
            w.report.note(format!(
                "leaked cluster {idx}: refcount={have} reference={want}"
            ));
        } else if have < want {
            w.report
                .corrupt(format!("cluster {idx}: refcount={have} reference={want}"));
        }
    }
    w.report.image_end_offset = end;
    let repairing = repair_leaks && !w.q.read_only && w.report.corruptions == 0;
    if repairing {
        // Only lowering refcounts that nothing references: safe in any order, and a crash
        // midway leaves the remaining leaks.
        for &(idx, want) in &leaked {
            w.q.refs.set(w.q.file.as_ref(), idx, want)?;
            if want == 0 {
                w.q.refs.note_freed(idx);
            }
            if want == 0 {
                stored.remove(&idx);
            } else {
                stored.insert(idx, want);
            }
            w.report.leaks_fixed += 1;
        }
    }
    // COPIED must be set exactly on entries whose cluster has refcount 1. After a leak
    // repair (and only when nothing else was wrong, as qemu-img) a wrong flag is set
    // right: the leaked references were what kept it right.
    let copied = std::mem::take(&mut w.copied);
    for f in copied {
        let have = stored.get(&(f.host / cs)).copied().unwrap_or(0);
        let flag = f.entry & COPIED != 0;
        if flag == (have == 1) {
            continue;
        }
        if repairing && w.report.leaks_fixed > 0 {
            let fixed = if have == 1 {
                f.entry | COPIED
            } else {
                f.entry & !COPIED
            };
            w.q.file
                .write_at(f.at, &fixed.to_be_bytes())
                .map_err(|source| Qcow2Error::WriteL2 {
                    offset: f.at,
                    source,
                })?;
            if f.what == "L2 table" {
                let i = ((f.at - l1_off) / 8) as usize;
                if let Some(e) = w.q.l1.get_mut(i) {
                    *e = fixed;
                }
            }
            w.report.flags_fixed += 1;
        } else {
            w.report.corrupt(format!(
                "{} at {:#x}: COPIED flag {flag} but refcount {have}",
                f.what, f.host
            ));
        }
    }
    if repairing {
        w.q.sync()?;
    }
    Ok(w.report)
}
