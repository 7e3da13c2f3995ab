//! A small LRU cache of L2 tables, write-through: an entry update goes to disk at once,
//! so evicting a table never needs a write and a crash never loses a cached update.

use std::collections::HashMap;

use crate::error::Qcow2Error;
use crate::storage::Storage;

#[derive(Debug)]
pub struct L2Cache {
    cap: usize,
    tick: u64,
    tables: HashMap<u64, (Vec<u64>, u64)>,
    entries: usize,
    reads: u64,
}

impl L2Cache {
    /// A cache holding up to `cap` tables of `entries` entries each.
    pub fn new(cap: usize, entries: usize) -> Self {
        L2Cache {
            cap: cap.max(1),
            tick: 0,
            tables: HashMap::new(),
            entries,
            reads: 0,
        }
    }

    /// Tables it holds at most.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Holds up to `cap` tables from now on (an image that grew).
    pub fn set_capacity(&mut self, cap: usize) {
        self.cap = cap.max(1);
        while self.tables.len() > self.cap {
            self.evict_one();
        }
    }

    /// Tables read from disk so far (misses).
    #[cfg(test)]
    pub fn reads(&self) -> u64 {
        self.reads
    }

    fn make_room(&mut self) {
        if self.tables.len() < self.cap {
            return;
        }
        self.evict_one();
    }

    fn evict_one(&mut self) {
        if let Some(&victim) = self
            .tables
            .iter()
            .min_by_key(|(_, (_, t))| *t)
            .map(|(k, _)| k)
        {
            self.tables.remove(&victim);
        }
    }

    /// The table at host `offset`, read from disk on a miss.
    pub fn get(&mut self, f: &dyn Storage, offset: u64) -> Result<&[u64], Qcow2Error> {
        self.tick += 1;
        let tick = self.tick;
        if !self.tables.contains_key(&offset) {
            self.make_room();
            let mut raw = vec![0u8; self.entries * 8];
            self.reads += 1;
            f.read_at(offset, &mut raw)
                .map_err(|source| Qcow2Error::ReadL2 { offset, source })?;
            let table = raw
                .chunks_exact(8)
                .map(|c| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    u64::from_be_bytes(a)
                })
                .collect();
            self.tables.insert(offset, (table, tick));
        }
        match self.tables.get_mut(&offset) {
            Some((t, last)) => {
                *last = tick;
                Ok(t)
            }
            None => Ok(&[]),
        }
    }

    /// The table at host `offset` if it is cached, or if the host has its bytes in the
    /// page cache (read with [`Storage::try_read_vectored_at`], then kept): never waits
    /// for the disk. None when it would.
    pub fn try_get(&mut self, f: &dyn Storage, offset: u64) -> Option<&[u64]> {
        if !self.tables.contains_key(&offset) {
            let mut raw = vec![0u8; self.entries * 8];
            if !f.try_read_vectored_at(offset, &mut [std::io::IoSliceMut::new(&mut raw)]) {
                return None;
            }
            self.make_room();
            self.reads += 1;
            let table = raw
                .chunks_exact(8)
                .map(|c| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    u64::from_be_bytes(a)
                })
                .collect();
            self.tables.insert(offset, (table, 0));
        }
        self.tick += 1;
        let tick = self.tick;
        self.tables.get_mut(&offset).map(|(t, last)| {
            *last = tick;
            t.as_slice()
        })
    }

    /// Records a freshly written all-zero table without reading it back.
    pub fn insert_zeroed(&mut self, offset: u64) {
        self.make_room();
        self.tick += 1;
        self.tables
            .insert(offset, (vec![0; self.entries], self.tick));
    }

    /// Sets entry `index` of the table at `offset`, on disk and in the cache.
    pub fn set(
        &mut self,
        f: &dyn Storage,
        offset: u64,
        index: usize,
        value: u64,
    ) -> Result<(), Qcow2Error> {
        let at = offset + index as u64 * 8;
        f.write_at(at, &value.to_be_bytes())
            .map_err(|source| Qcow2Error::WriteL2 { offset, source })?;
        if let Some(slot) = self
            .tables
            .get_mut(&offset)
            .and_then(|(t, _)| t.get_mut(index))
        {
            *slot = value;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn evicts_least_recently_used_and_writes_through() {
        let f = MemStorage::new(vec![0u8; 4 * 512]);
        let mut c = L2Cache::new(2, 64);
        c.set(&f, 0, 3, 0xabc).unwrap(); // not cached: disk only
        assert_eq!(c.get(&f, 0).unwrap()[3], 0xabc);
        c.insert_zeroed(512);
        c.get(&f, 0).unwrap(); // 0 is now more recent than 512
        c.get(&f, 1024).unwrap(); // evicts 512
        assert_eq!(c.tables.len(), 2);
        assert!(c.tables.contains_key(&0) && c.tables.contains_key(&1024));
        c.set(&f, 1024, 63, 7).unwrap();
        let mut raw = [0u8; 8];
        f.read_at(1024 + 63 * 8, &mut raw).unwrap();
        assert_eq!(u64::from_be_bytes(raw), 7);
        assert_eq!(c.get(&f, 1024).unwrap()[63], 7);
    }
}
