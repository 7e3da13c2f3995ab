//! Firecracker's snapshot requests: `PUT /snapshot/create` on a paused VM, and
//! `PUT /snapshot/load` on a VMM that has not started one (`vessel run --api-sock
//! --api-only`). The bodies carry Firecracker's field names; what this VMM cannot do
//! (a userfaultfd memory backend) is refused with a message that says so.

use std::path::PathBuf;

use serde::Deserialize;

/// `PUT /snapshot/create` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    pub snapshot_path: PathBuf,
    pub mem_file_path: PathBuf,
    /// "Full" (the default) or "Diff".
    #[serde(default)]
    pub snapshot_type: Option<String>,
    /// Firecracker's deprecated target version: accepted and ignored.
    #[serde(default)]
    pub version: Option<String>,
}

/// Where a loaded snapshot's memory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum BackendType {
    File,
    Uffd,
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    pub backend_type: BackendType,
    pub backend_path: PathBuf,
}

/// `PUT /snapshot/load` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    pub snapshot_path: PathBuf,
    /// Deprecated in Firecracker; exactly one of it and `mem_backend`.
    #[serde(default)]
    pub mem_file_path: Option<PathBuf>,
    #[serde(default)]
    pub mem_backend: Option<MemoryBackend>,
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub resume_vm: bool,
    #[serde(default)]
    pub network_overrides: Option<serde_json::Value>,
}

impl SnapshotCreateParams {
    /// Full or Diff, or why the request is refused.
    pub fn check(&self) -> Result<crate::snapshot::SnapshotKind, String> {
        match self.snapshot_type.as_deref() {
            None | Some("Full") => Ok(crate::snapshot::SnapshotKind::Full),
            Some("Diff") => Ok(crate::snapshot::SnapshotKind::Diff),
            Some(other) => Err(format!("Invalid snapshot_type {other:?} (Full or Diff).")),
        }
    }
}

/// How Firecracker begins the message of a body it cannot deserialize.
pub const DESERIALIZING: &str = "An error occurred when deserializing the json body of a request: ";

impl SnapshotLoadParams {
    /// Firecracker's deprecation note when the body uses `mem_file_path`.
    pub fn deprecated(&self) -> Option<&'static str> {
        self.mem_file_path.as_ref().map(|_| {
            "PUT /snapshot/load: mem_file_path and enable_diff_snapshots fields are deprecated."
        })
    }

    /// The memory file, or why the request is refused.
    pub fn mem_path(&self) -> Result<PathBuf, String> {
        // enable_diff_snapshots / track_dirty_pages: a restored VM's dirty log starts at
        // the restore whatever they say (Diff snapshots then follow the loaded one).
        if self
            .network_overrides
            .as_ref()
            .is_some_and(|v| !v.as_array().is_some_and(Vec::is_empty))
        {
            return Err("network_overrides are not supported by this VMM yet.".into());
        }
        // Firecracker's words for the two body shapes it refuses while deserializing.
        match (&self.mem_file_path, &self.mem_backend) {
            (Some(p), None) => Ok(p.clone()),
            (None, Some(b)) if b.backend_type == BackendType::File => Ok(b.backend_path.clone()),
            (None, Some(_)) => Err(
                "The Uffd memory backend is not supported by this VMM: use File (the memory \
                 file is mapped privately and loaded on demand)."
                    .into(),
            ),
            (Some(_), Some(_)) => Err(format!(
                "{DESERIALIZING}too many fields: either `mem_backend` or `mem_file_path` \
                 exclusively is required."
            )),
            (None, None) => Err(format!(
                "{DESERIALIZING}missing field: either `mem_backend` or `mem_file_path` is \
                 required."
            )),
        }
    }
}
