//! Decoded blocks shared by the CPUs of one machine.
//!
//! Each CPU has its own block cache (`decode::BlockCache`), so on an 8-vCPU guest the same
//! kernel block used to be decoded up to eight times: Linux balances new tasks onto idle
//! CPUs, and every CPU a module load or a system call lands on decodes its code afresh
//! (decoding and the allocations it made were a fifth of the extra host CPU an 8-vCPU boot
//! costs over a 1-vCPU one). A decoded block depends only on its bytes, its first IP and
//! the bitness, so a CPU that misses looks here first and takes what another CPU decoded
//! from the same bytes at the same place; it decodes only when nobody has, or the bytes
//! have changed since.
//!
//! The map holds weak references: a decoded block lives as long as some CPU's slot holds
//! it, and the map forgets it soon after the last one lets go.

use std::sync::atomic::{AtomicBool, AtomicU32};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use rustc_hash::FxHashMap;

use crate::decode::Insn;

/// A decoded block: never changed once made, but for what the CPUs note on it (the
/// compiled hint, the heat, the code placed for it).
pub(crate) struct Decoded {
    /// The guest bytes it was decoded from: it stands for them only while memory holds them.
    pub(crate) code: Box<[u8]>,
    pub(crate) insns: Box<[Insn]>,
    /// A hint that some CPU compiled it: the others holding it look for that code at their
    /// next run of it, instead of at their next count of runs that asks the machine (4,
    /// 16, 64), meanwhile interpreting it. Cleared by one that then finds no code.
    pub(crate) compiled: AtomicBool,
    /// Runs of it before it was compiled, summed over the CPUs that reported them: a
    /// block every CPU runs a little is hot for the machine (see `Jit::compile`).
    pub(crate) heat: AtomicU32,
    /// The code some CPU placed for it (see `jit::shared::PlacedFor`): the others take it
    /// from here, without the code memory's lock, map lookup and byte comparison.
    pub(crate) placed: Mutex<Option<crate::jit::shared::PlacedFor>>,
}

impl Decoded {
    pub(crate) fn new(code: Box<[u8]>, insns: Box<[Insn]>) -> Decoded {
        Decoded {
            code,
            insns,
            compiled: AtomicBool::new(false),
            heat: AtomicU32::new(0),
            placed: Mutex::new(None),
        }
    }

    /// The code placed for it while the code memory is at flush `flush`, for CPU model
    /// `model`.
    pub(crate) fn placed(&self, flush: u64, model: u64) -> Option<Arc<crate::jit::shared::Placed>> {
        let p = self.placed.lock().unwrap_or_else(PoisonError::into_inner);
        p.as_ref()
            .filter(|p| p.flush == flush && p.model == model)
            .map(|p| p.code.clone())
    }

    /// Notes `code`, placed for it at flush `flush` for CPU model `model` (see
    /// [`Decoded::placed`]).
    pub(crate) fn set_placed(
        &self,
        flush: u64,
        model: u64,
        code: &Arc<crate::jit::shared::Placed>,
    ) {
        let placed = crate::jit::shared::PlacedFor {
            flush,
            model,
            code: code.clone(),
        };
        *self.placed.lock().unwrap_or_else(PoisonError::into_inner) = Some(placed);
    }
}

/// Shards of the map, so that CPUs missing at once rarely wait for one another.
const SHARDS: usize = 64;

#[derive(Default)]
struct Shard {
    map: FxHashMap<(u64, u64, u32), Weak<Decoded>>,
    /// The map's size at which the entries nobody holds any more are dropped.
    purge_at: usize,
}

/// Entries a shard keeps before it first looks for dead ones.
const FIRST_PURGE: usize = 1024;

/// The decoded blocks the CPUs of one machine share (see [`crate::Cpu::share_decoded`]).
#[derive(Clone)]
pub struct DecodedBlocks(Arc<[Mutex<Shard>; SHARDS]>);

impl Default for DecodedBlocks {
    fn default() -> Self {
        DecodedBlocks(Arc::new(std::array::from_fn(|_| Mutex::default())))
    }
}

impl std::fmt::Debug for DecodedBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodedBlocks").finish_non_exhaustive()
    }
}

impl DecodedBlocks {
    /// Whether both are the same machine's.
    pub(crate) fn same(&self, other: &DecodedBlocks) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    fn shard(&self, gpa: u64, ip: u64) -> &Mutex<Shard> {
        let h = (gpa ^ (gpa >> 12) ^ (ip >> 12)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58;
        &self.0[(h as usize) & (SHARDS - 1)]
    }

    /// The block another CPU decoded at `gpa` for `ip` in this bitness, if its bytes are
    /// still the ones `avail` (the rest of the page from `gpa` on) starts with.
    pub(crate) fn find(
        &self,
        gpa: u64,
        ip: u64,
        bitness: u32,
        avail: &[u8],
    ) -> Option<Arc<Decoded>> {
        let shard = self
            .shard(gpa, ip)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let d = shard.map.get(&(gpa, ip, bitness))?.upgrade()?;
        drop(shard);
        avail.starts_with(&d.code).then_some(d)
    }

    /// Offers the block just decoded at `gpa` for `ip` to the other CPUs.
    pub(crate) fn offer(&self, gpa: u64, ip: u64, bitness: u32, d: &Arc<Decoded>) {
        let mut shard = self
            .shard(gpa, ip)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        shard.map.insert((gpa, ip, bitness), Arc::downgrade(d));
        if shard.map.len() >= shard.purge_at.max(FIRST_PURGE) {
            shard.map.retain(|_, w| w.strong_count() > 0);
            shard.purge_at = 2 * shard.map.len();
        }
    }
}
