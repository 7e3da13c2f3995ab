//! Issue 16's CI hygiene, checked where a change would break it: one `rust-version`,
//! declared by the workspace and inherited by every crate, and a `rust-toolchain.toml`
//! that brings the two tools `scripts/test.sh` enforces.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn every_crate_inherits_the_workspace_rust_version_and_the_toolchain_file_names_ci_tools() {
    let ws = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let declared: Vec<&str> = ws
        .lines()
        .filter(|l| l.trim_start().starts_with("rust-version"))
        .collect();
    assert_eq!(
        declared.len(),
        1,
        "one rust-version in the workspace: {declared:?}"
    );
    let mut crates = 0;
    for e in std::fs::read_dir(root().join("crates")).unwrap().flatten() {
        let manifest = e.path().join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        crates += 1;
        assert!(
            text.lines()
                .any(|l| l.replace(' ', "") == "rust-version.workspace=true"),
            "{} does not inherit the workspace's rust-version",
            manifest.display()
        );
    }
    assert!(crates >= 10, "found only {crates} crates");
    let tc = std::fs::read_to_string(root().join("rust-toolchain.toml"))
        .expect("rust-toolchain.toml at the repository root");
    for want in ["[toolchain]", "channel", "rustfmt", "clippy"] {
        assert!(tc.contains(want), "rust-toolchain.toml lacks {want}:\n{tc}");
    }
    let ci = std::fs::read_to_string(root().join("scripts/test.sh")).unwrap();
    for want in [
        "cargo fmt --all --check",
        "cargo clippy --workspace --all-targets -- -D warnings",
    ] {
        assert!(ci.contains(want), "scripts/test.sh no longer runs {want}");
    }
}
