//! Arbitrary instruction bytes and register state: the emulator must execute or raise an
//! exception into the guest, never panic (`fuzzing::targets::x86emu_exec`).
//!
//! `cargo +nightly fuzz run x86emu_exec` from the repository root; on stable,
//! `cargo run -p fuzzing --bin fuzz-run -- x86emu_exec`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fuzzing::targets::x86emu_exec(data);
});
