//! Arbitrary guest memory (descriptor tables, rings, requests) and queue geometry against
//! virtio-blk, virtio-rng and virtio-console: the devices must refuse or serve, never panic
//! (`fuzzing::targets::virtio_queues`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fuzzing::targets::virtio_queues(data);
});
