//! Sequences of requests to a pre-boot VMM's Firecracker-compatible API
//! (`fuzzing::targets::firecracker_api`).
//!
//! `cargo +nightly fuzz run firecracker_api` from the repository root; on stable,
//! `cargo run -p fuzzing --bin fuzz-run -- firecracker_api`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fuzzing::targets::firecracker_api(data);
});
