//! Raw HTTP requests through the daemon's HTTP parser and the manager API's request
//! parsing (`fuzzing::targets::manager_api`).
//!
//! `cargo +nightly fuzz run manager_api` from the repository root; on stable,
//! `cargo run -p fuzzing --bin fuzz-run -- manager_api`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fuzzing::targets::manager_api(data);
});
