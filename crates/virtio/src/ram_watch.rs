//! Who hears of device writes to guest RAM.
//!
//! The emu accelerator keeps guest code decoded and compiled; code a device writes (a
//! block read into a page that held code) must be decoded again. Devices write guest RAM
//! through `vm-memory`'s `GuestMemoryMmap`, which cannot carry a hook, so the writers in
//! this crate report here instead, and the VMM registers each VM's observer. A process may
//! hold several VMs (tests do): every observer hears every write, which costs a VM that
//! did not own the memory only a needless check of some cached code.

use std::sync::{Arc, RwLock, Weak};

/// Called with the guest-physical address and length of each write.
pub type Observer = dyn Fn(u64, u64) + Send + Sync;

static OBSERVERS: RwLock<Vec<Weak<Observer>>> = RwLock::new(Vec::new());

/// Registers `o` for as long as it lives (the registry keeps only a weak reference).
pub fn watch(o: &Arc<Observer>) {
    let mut v = OBSERVERS.write().unwrap_or_else(|p| p.into_inner());
    v.retain(|w| w.strong_count() > 0);
    v.push(Arc::downgrade(o));
}

/// A device wrote `len` bytes of guest RAM at `gpa`.
pub(crate) fn wrote(gpa: u64, len: u64) {
    let v = OBSERVERS.read().unwrap_or_else(|p| p.into_inner());
    for o in v.iter().filter_map(Weak::upgrade) {
        o(gpa, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn observers_hear_writes_while_they_live() {
        let seen = Arc::new(AtomicU64::new(0));
        let s = seen.clone();
        let o: Arc<Observer> = Arc::new(move |gpa, len| {
            if gpa == 0x1234_5000 {
                s.fetch_add(len, Ordering::SeqCst);
            }
        });
        watch(&o);
        wrote(0x1234_5000, 3);
        assert_eq!(seen.load(Ordering::SeqCst), 3);
        drop(o);
        wrote(0x1234_5000, 3);
        assert_eq!(
            seen.load(Ordering::SeqCst),
            3,
            "a dropped observer hears nothing"
        );
    }
}
