//! Refcount table and refcount blocks: reading, updating (write-through) and cluster
//! allocation, including growing the refcount table.
//!
//! Ordering rule kept by every caller: a cluster's refcount is written (and synced) before
//! anything on disk points at the cluster, and a reference is removed (and synced) before
//! the refcount drops. A crash then only ever leaks clusters.

use std::collections::HashMap;

use tracing::debug;

use super::header::{MAX_REFTABLE_BYTES, OFF_REFTABLE};
use crate::error::Qcow2Error;
use crate::storage::Storage;

/// Refcount blocks kept in memory at once (write-through, so eviction is free).
const BLOCK_CACHE_CAP: usize = 64;
/// Largest host offset qcow2 entries can hold (bits 9..=55).
const MAX_HOST_OFFSET: u64 = 1 << 56;

/// Mask of the offset bits in a refcount table entry.
const REFTABLE_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

#[derive(Debug)]
pub struct Refcounts {
    cluster_bits: u32,
    refcount_order: u32,
    /// Offsets of the refcount blocks; 0 means not allocated.
    table: Vec<u64>,
    table_offset: u64,
    /// Range index → block bytes.
    cache: HashMap<u64, Vec<u8>>,
    /// Lowest cluster index that might be free.
    free_hint: u64,
    /// End of the highest cluster known to be in use (bytes, cluster aligned).
    file_end: u64,
    /// Clusters that must never be handed out regardless of their refcount: the header and
    /// the in-memory tables (guards against images whose refcounts lie).
    reserved: Vec<(u64, u64)>,
    /// Clusters claimed by an allocation in progress whose refcounts are not yet written.
    pending: Vec<(u64, u64)>,
}

impl Refcounts {
    /// Loads the refcount table. `file_len` is the image file's length.
    pub fn load(
        f: &dyn Storage,
        cluster_bits: u32,
        refcount_order: u32,
        table_offset: u64,
        table_clusters: u32,
        file_len: u64,
    ) -> Result<Self, Qcow2Error> {
        let cs = 1u64 << cluster_bits;
        let bytes = u64::from(table_clusters) * cs;
        debug_assert!(bytes <= MAX_REFTABLE_BYTES);
        let mut raw = vec![0u8; bytes as usize];
        f.read_at(table_offset, &mut raw)
            .map_err(Qcow2Error::ReadRefcountTable)?;
        let mut table = Vec::with_capacity(raw.len() / 8);
        for (i, c) in raw.chunks_exact(8).enumerate() {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            let e = u64::from_be_bytes(a);
            let off = e & REFTABLE_OFFSET_MASK;
            if e != off || !off.is_multiple_of(cs) {
                return Err(Qcow2Error::InvalidRefcountTableEntry {
                    index: i as u64,
                    entry: e,
                    why: "unaligned or reserved bits set",
                });
            }
            if off != 0 && off >= file_len {
                return Err(Qcow2Error::InvalidRefcountTableEntry {
                    index: i as u64,
                    entry: e,
                    why: "points past the end of the file",
                });
            }
            table.push(off);
        }
        let file_end = file_len.div_ceil(cs) * cs;
        Ok(Refcounts {
            cluster_bits,
            refcount_order,
            table,
            table_offset,
            cache: HashMap::new(),
            free_hint: 1,
            file_end,
            reserved: vec![
                (0, 1),
                (table_offset >> cluster_bits, u64::from(table_clusters)),
            ],
            pending: Vec::new(),
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Refcount entries per refcount block.
    pub fn entries_per_block(&self) -> u64 {
        (self.cs() * 8) >> self.refcount_order
    }

    pub fn max_refcount(&self) -> u64 {
        if self.bits() == 64 {
            u64::MAX
        } else {
            (1u64 << self.bits()) - 1
        }
    }

    /// Cluster-aligned end of the space in use, for bounds checks and placement.
    pub fn file_end(&self) -> u64 {
        self.file_end
    }

    pub fn table(&self) -> &[u64] {
        &self.table
    }

    pub fn table_offset(&self) -> u64 {
        self.table_offset
    }

    pub fn table_clusters(&self) -> u64 {
        (self.table.len() as u64 * 8).div_ceil(self.cs())
    }

    /// Replaces the reserved range of the L1 table (after it moved).
    pub fn set_l1_reserved(&mut self, offset: u64, bytes: u64) {
        self.reserved.truncate(2);
        if bytes > 0 {
            let start = offset >> self.cluster_bits;
            self.reserved.push((start, bytes.div_ceil(self.cs())));
        }
    }

    fn block(&mut self, f: &dyn Storage, range: u64) -> Result<Option<&mut Vec<u8>>, Qcow2Error> {
        let Some(&off) = self.table.get(range as usize) else {
            return Ok(None);
        };
        if off == 0 {
            return Ok(None);
        }
        if !self.cache.contains_key(&range) {
            if self.cache.len() >= BLOCK_CACHE_CAP {
                self.cache.clear();
            }
            let mut buf = vec![0u8; self.cs() as usize];
            f.read_at(off, &mut buf)
                .map_err(|source| Qcow2Error::ReadRefcountBlock {
                    offset: off,
                    source,
                })?;
            self.cache.insert(range, buf);
        }
        Ok(self.cache.get_mut(&range))
    }

    /// Reads the refcount of cluster index `idx`.
    pub fn get(&mut self, f: &dyn Storage, idx: u64) -> Result<u64, Qcow2Error> {
        let epb = self.entries_per_block();
        let order = self.refcount_order;
        match self.block(f, idx / epb)? {
            None => Ok(0),
            Some(b) => Ok(get_entry(b, order, idx % epb)),
        }
    }

    /// Writes the refcount of `idx`; its refcount block must exist.
    pub(super) fn set(&mut self, f: &dyn Storage, idx: u64, value: u64) -> Result<(), Qcow2Error> {
        if value > self.max_refcount() {
            return Err(Qcow2Error::RefcountOverflow {
                cluster: idx,
                bits: self.bits(),
            });
        }
        let epb = self.entries_per_block();
        let order = self.refcount_order;
        let range = idx / epb;
        let block_off = self.table.get(range as usize).copied().unwrap_or(0);
        let Some(b) = self.block(f, range)? else {
            return Err(Qcow2Error::RefcountBlockPlacement { cluster: idx });
        };
        let (lo, hi) = set_entry(b, order, idx % epb, value);
        let offset = block_off + lo as u64;
        f.write_at(offset, &b[lo..hi])
            .map_err(|source| Qcow2Error::WriteRefcountBlock { offset, source })
    }

    /// Adds `delta` (may be negative) to the refcount of the cluster at host `offset`.
    pub fn update(&mut self, f: &dyn Storage, offset: u64, delta: i64) -> Result<u64, Qcow2Error> {
        let idx = offset >> self.cluster_bits;
        let cur = self.get(f, idx)?;
        let new = if delta < 0 {
            cur.checked_sub(delta.unsigned_abs())
                .ok_or(Qcow2Error::RefcountUnderflow { cluster: idx })?
        } else {
            cur.checked_add(delta as u64)
                .ok_or(Qcow2Error::RefcountOverflow {
                    cluster: idx,
                    bits: self.bits(),
                })?
        };
        if new > 0 && cur == 0 {
            self.ensure_block(f, idx / self.entries_per_block())?;
        }
        self.set(f, idx, new)?;
        if new == 0 && idx < self.free_hint {
            self.free_hint = idx.max(1);
        }
        Ok(new)
    }

    /// Tells the allocator that cluster `idx` became free.
    pub(super) fn note_freed(&mut self, idx: u64) {
        self.free_hint = self.free_hint.min(idx.max(1));
    }

    fn is_blocked(&self, idx: u64) -> bool {
        self.reserved
            .iter()
            .chain(self.pending.iter())
            .any(|&(s, n)| idx >= s && idx < s + n)
    }

    /// Finds `n` contiguous free clusters (refcount 0, not reserved or pending).
    /// Also returns the lowest free cluster seen (a hint for the next search).
    fn find_free(&mut self, f: &dyn Storage, n: u64) -> Result<(u64, u64), Qcow2Error> {
        let epb = self.entries_per_block();
        let max_idx = MAX_HOST_OFFSET >> self.cluster_bits;
        let mut start = self.free_hint.max(1);
        let mut first_free = None;
        let mut idx = start;
        while idx - start < n {
            if idx >= max_idx {
                return Err(Qcow2Error::ImageFull);
            }
            let range = idx / epb;
            let covered = self.table.get(range as usize).is_some_and(|&o| o != 0);
            if !covered
                && !self
                    .pending
                    .iter()
                    .chain(self.reserved.iter())
                    .any(|&(s, c)| s + c > idx && s < (range + 1) * epb)
            {
                // A whole range without a refcount block is free.
                first_free.get_or_insert(idx);
                idx = (range + 1) * epb;
                continue;
            }
            // Clusters past the end of the file hold nothing, whatever their refcount says
            // (qemu-img check ignores those refcounts too): treating them as free bounds
            // this scan by the file size even when a hostile refcount table claims huge
            // areas are in use.
            let past_eof = idx >= self.file_end >> self.cluster_bits;
            if self.is_blocked(idx) || (!past_eof && self.get(f, idx)? != 0) {
                idx += 1;
                start = idx;
            } else {
                first_free.get_or_insert(idx);
                idx += 1;
            }
        }
        let hint = match first_free {
            Some(f) if f < start => f,
            _ => start + n,
        };
        Ok((start, hint))
    }

    /// Allocates `n` contiguous clusters with refcount 1 and returns the host offset of the
    /// first. The refcounts are written but not synced: the caller syncs before linking.
    pub fn alloc(&mut self, f: &dyn Storage, n: u64) -> Result<u64, Qcow2Error> {
        let (start, hint) = self.find_free(f, n)?;
        let hint_before = self.free_hint;
        self.pending.push((start, n));
        let res = self.claim(f, start, n);
        self.pending.retain(|&p| p != (start, n));
        res?;
        // Nothing below `hint` was free when the search began; frees lower it again.
        self.free_hint = if self.free_hint == hint_before {
            hint
        } else {
            self.free_hint.min(hint)
        };
        let end = (start + n) << self.cluster_bits;
        self.file_end = self.file_end.max(end);
        debug!(
            offset = start << self.cluster_bits,
            clusters = n,
            "qcow2: allocated"
        );
        Ok(start << self.cluster_bits)
    }

    fn claim(&mut self, f: &dyn Storage, start: u64, n: u64) -> Result<(), Qcow2Error> {
        let epb = self.entries_per_block();
        let first = start / epb;
        let last = (start + n - 1) / epb;
        for range in first..=last {
            self.ensure_block(f, range)?;
        }
        for idx in start..start + n {
            self.set(f, idx, 1)?;
        }
        Ok(())
    }

    /// Makes sure range `range` has a refcount block, growing the table if needed.
    fn ensure_block(&mut self, f: &dyn Storage, range: u64) -> Result<(), Qcow2Error> {
        if range as usize >= self.table.len() {
            self.grow_table(f, range + 1)?;
        }
        if self.table.get(range as usize).is_some_and(|&o| o != 0) {
            return Ok(());
        }
        let epb = self.entries_per_block();
        let cs = self.cs();
        // Prefer a cluster inside the range itself, so the block describes itself.
        let spot = (range * epb..(range + 1) * epb).find(|&i| !self.is_blocked(i));
        let mut block = vec![0u8; cs as usize];
        let block_idx = match spot {
            Some(i) => {
                set_entry(&mut block, self.refcount_order, i - range * epb, 1);
                i
            }
            None => self.alloc(f, 1)? >> self.cluster_bits,
        };
        let offset = block_idx << self.cluster_bits;
        f.write_at(offset, &block)
            .map_err(|source| Qcow2Error::WriteRefcountBlock { offset, source })?;
        f.sync().map_err(Qcow2Error::Sync)?;
        let at = self.table_offset + range * 8;
        f.write_at(at, &offset.to_be_bytes())
            .map_err(Qcow2Error::WriteRefcountTable)?;
        if let Some(slot) = self.table.get_mut(range as usize) {
            *slot = offset;
        }
        self.cache.insert(range, block);
        self.file_end = self.file_end.max(offset + cs);
        debug!(range, offset, "qcow2: new refcount block");
        Ok(())
    }

    /// Moves the refcount table to a larger one at the end of the image, with new refcount
    /// blocks covering itself; switches the header over, then frees the old table.
    fn grow_table(&mut self, f: &dyn Storage, min_entries: u64) -> Result<(), Qcow2Error> {
        let cs = self.cs();
        let epb = self.entries_per_block();
        let per_cluster = cs / 8;
        let max_entries = MAX_REFTABLE_BYTES / 8;
        let mut entries = min_entries.max(self.table.len() as u64 * 2);
        let pend_end = self.pending.iter().map(|&(s, n)| s + n).max().unwrap_or(0);
        let start = (self.table.len() as u64 * epb)
            .max(self.file_end >> self.cluster_bits)
            .max(pend_end);
        let (table_clusters, blocks) = loop {
            entries = entries.div_ceil(per_cluster) * per_cluster;
            if entries > max_entries {
                return Err(Qcow2Error::RefcountTableFull);
            }
            let tc = entries / per_cluster;
            let mut m = 0;
            loop {
                let first = start / epb;
                let last = (start + tc + m - 1) / epb;
                let need = last - first + 1;
                if need == m {
                    break;
                }
                m = need;
            }
            let last_range = (start + tc + m - 1) / epb;
            if last_range < entries {
                break (tc, m);
            }
            entries = last_range + 1;
        };
        let table_off = start << self.cluster_bits;
        let blocks_start = start + table_clusters;
        let area_end = blocks_start + blocks;
        let first_range = start / epb;
        let mut new_table = self.table.clone();
        new_table.resize(entries as usize, 0);
        for (k, range) in (first_range..first_range + blocks).enumerate() {
            let mut block = vec![0u8; cs as usize];
            let lo = (range * epb).max(start);
            let hi = ((range + 1) * epb).min(area_end);
            for idx in lo..hi {
                set_entry(&mut block, self.refcount_order, idx - range * epb, 1);
            }
            let off = (blocks_start + k as u64) << self.cluster_bits;
            f.write_at(off, &block)
                .map_err(|source| Qcow2Error::WriteRefcountBlock {
                    offset: off,
                    source,
                })?;
            if let Some(slot) = new_table.get_mut(range as usize) {
                *slot = off;
            }
            self.cache.insert(range, block);
        }
        let mut raw = Vec::with_capacity((table_clusters * cs) as usize);
        for e in &new_table {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        raw.resize((table_clusters * cs) as usize, 0);
        f.write_at(table_off, &raw)
            .map_err(Qcow2Error::WriteRefcountTable)?;
        f.sync().map_err(Qcow2Error::Sync)?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&table_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        f.write_at(OFF_REFTABLE, &hdr)
            .map_err(Qcow2Error::WriteHeader)?;
        f.sync().map_err(Qcow2Error::Sync)?;
        let old_off = self.table_offset;
        let old_clusters = self.table_clusters();
        self.table = new_table;
        self.table_offset = table_off;
        self.file_end = self.file_end.max(area_end << self.cluster_bits);
        if let Some(r) = self.reserved.get_mut(1) {
            *r = (start, table_clusters);
        }
        debug!(entries, offset = table_off, "qcow2: refcount table grown");
        for c in 0..old_clusters {
            self.update(f, old_off + c * cs, -1)?;
        }
        Ok(())
    }
}

/// Reads entry `i` of a refcount block with `1 << order`-bit entries.
pub fn get_entry(block: &[u8], order: u32, i: u64) -> u64 {
    let bits = 1u64 << order;
    if bits >= 8 {
        let n = (bits / 8) as usize;
        let at = i as usize * n;
        block.get(at..at + n).map_or(0, |s| {
            s.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
        })
    } else {
        let bit = i * bits;
        let byte = block.get((bit / 8) as usize).copied().unwrap_or(0);
        (u64::from(byte) >> (bit % 8)) & ((1 << bits) - 1)
    }
}

/// Writes entry `i`; returns the byte range of `block` that changed.
pub fn set_entry(block: &mut [u8], order: u32, i: u64, value: u64) -> (usize, usize) {
    let bits = 1u64 << order;
    if bits >= 8 {
        let n = (bits / 8) as usize;
        let at = i as usize * n;
        if let Some(s) = block.get_mut(at..at + n) {
            for (k, b) in s.iter_mut().enumerate() {
                *b = (value >> (8 * (n - 1 - k))) as u8;
            }
        }
        (at, at + n)
    } else {
        let bit = i * bits;
        let at = (bit / 8) as usize;
        let mask = (((1u64 << bits) - 1) << (bit % 8)) as u8;
        if let Some(b) = block.get_mut(at) {
            *b = (*b & !mask) | (((value << (bit % 8)) as u8) & mask);
        }
        (at, at + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::storage::MemStorage;

    /// A 512-byte-cluster image skeleton: header at 0, refcount table at 1, one refcount
    /// block at 2 (16-bit entries, so it covers 256 clusters), refcounts of 0..=2 set.
    fn skeleton() -> MemStorage {
        let mut b = vec![0u8; 3 * 512];
        b[512..520].copy_from_slice(&1024u64.to_be_bytes());
        for i in 0..3 {
            b[1024 + i * 2 + 1] = 1;
        }
        MemStorage::new(b)
    }

    #[test]
    fn allocates_frees_and_grows() {
        let f = skeleton();
        let mut r = Refcounts::load(&f, 9, 4, 512, 1, 3 * 512).unwrap();
        assert_eq!(r.entries_per_block(), 256);
        let a = r.alloc(&f, 1).unwrap();
        assert_eq!(a, 3 * 512);
        let run = r.alloc(&f, 4).unwrap();
        assert_eq!(run, 4 * 512);
        assert_eq!(r.update(&f, a, -1).unwrap(), 0);
        assert_eq!(r.alloc(&f, 1).unwrap(), a, "freed cluster is reused first");
        assert!(matches!(
            r.update(&f, 100 * 512, -1),
            Err(Qcow2Error::RefcountUnderflow { .. })
        ));
        // Past 256 clusters a second refcount block appears; past 64 blocks (the table's
        // one cluster) the table moves.
        let far = r.alloc(&f, 300).unwrap();
        assert!(r.table()[1] != 0);
        for _ in 0..70 {
            r.alloc(&f, 256).unwrap();
        }
        assert!(r.table().len() > 64);
        assert_ne!(r.table_offset(), 512);
        assert_eq!(r.get(&f, far / 512).unwrap(), 1);
        assert_eq!(r.get(&f, 1).unwrap(), 0, "old table cluster freed");
    }

    #[test]
    fn entries_all_widths() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 512];
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            let n = (512 * 8) >> order;
            for i in 0..n {
                set_entry(&mut b, order, i, (i * 7 + 3) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_entry(&b, order, i),
                    (i * 7 + 3) & max,
                    "order {order} i {i}"
                );
            }
        }
    }
}
