//! Opens arbitrary bytes as a qcow2 image in memory and exercises reads, writes,
//! discards, block status, growth and the checker: nothing may panic or allocate without
//! bound. Seed it with small images from `qemu-img create`/`convert -c`.
#![no_main]

use block::storage::MemStorage;
use block::{BlockBackend, Qcow2};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let store = MemStorage::with_limit(data.to_vec(), 64 << 20);
    let Ok(mut q) = Qcow2::open(Box::new(store), false) else {
        return;
    };
    let size = q.size();
    let mut buf = vec![0u8; 8192];
    for off in [0, size / 3, size / 2, size.saturating_sub(8192)] {
        let n = (size - off.min(size)).min(buf.len() as u64) as usize;
        let _ = q.read_at(off, &mut buf[..n]);
        let _ = q.write_at(off, &buf[..n]);
    }
    let _ = q.write_zeroes(0, size.min(1 << 20));
    let _ = q.discard(size / 4, (size / 4).min(1 << 20));
    let _ = q.block_status(0, size.min(1 << 20));
    let _ = q.resize(size.saturating_add(1 << 20));
    let _ = q.flush();
    let _ = block::qcow2::check::check(&mut q, true);
});
