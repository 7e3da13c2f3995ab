//! Arbitrary guest memory (descriptor tables, rings, requests) and queue geometry against
//! virtio-blk, virtio-rng and virtio-console: the devices must refuse or serve, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio::fuzzing::{run, Target};

fuzz_target!(|data: &[u8]| {
    let target = match data.first().map(|b| b % 3) {
        Some(0) => Target::Block,
        Some(1) => Target::Rng,
        _ => Target::Console,
    };
    run(target, data.get(1..).unwrap_or_default());
});
