//! libvirt network, pool and volume XML through their importers, and an accepted
//! network through the exporter and back (`fuzzing::targets::libvirt_net_storage_xml`).
//!
//! `cargo +nightly fuzz run libvirt_net_storage_xml` from the repository root; on stable,
//! `cargo run -p fuzzing --bin fuzz-run -- libvirt_net_storage_xml`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fuzzing::targets::libvirt_net_storage_xml(data);
});
