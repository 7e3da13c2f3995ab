//! Fuzz targets: one entry point per target, each taking arbitrary bytes and returning a
//! short outcome (how the input ended: a status, an error kind). Whatever the bytes, an
//! entry point must return; a panic is a bug. The same functions back the cargo-fuzz
//! targets in `fuzz/` (libFuzzer, nightly) and the stable runner `fuzz-run` in this
//! crate, which mutates a corpus for a bounded time and keeps inputs with new outcomes.

pub mod mutate;
pub mod targets;

/// One fuzz target.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub name: &'static str,
    /// Runs one input; its outcome, one feature a line, steers the runner (an input that
    /// gives a feature not seen before is kept).
    pub run: fn(&[u8]) -> String,
    /// Starting inputs.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Tokens the mutator splices in (syntax of the input's format).
    pub dictionary: &'static [&'static [u8]],
    /// Inputs are cut to this length.
    pub max_len: usize,
}

/// Every target, by name.
pub fn all() -> Vec<Target> {
    targets::ALL.to_vec()
}

/// The target named `name`.
pub fn by_name(name: &str) -> Option<Target> {
    targets::ALL.iter().copied().find(|t| t.name == name)
}
