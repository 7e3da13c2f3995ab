//! libvirt domain XML through the importer, and what it accepts through the exporter and
//! back (`fuzzing::targets::libvirt_xml`).
//!
//! `cargo +nightly fuzz run libvirt_xml` from the repository root; on stable,
//! `cargo run -p fuzzing --bin fuzz-run -- libvirt_xml`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fuzzing::targets::libvirt_xml(data);
});
