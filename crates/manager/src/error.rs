//! The manager's one error type: each variant knows its HTTP status, and its message says
//! what went wrong and, where it can, what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{kind} {name:?} does not exist")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} {name:?} already exists")]
    Exists { kind: &'static str, name: String },
    #[error("invalid {what}: {why}")]
    Invalid { what: &'static str, why: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unsupported(String),
    /// The client may not use what it named (a host file outside its rights).
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("QMP: {0}")]
    Qmp(#[from] crate::qmp::QmpError),
    #[error("starting {what}: {why}")]
    Spawn { what: String, why: String },
    #[error("disk image: {0}")]
    Block(String),
    /// The cluster's etcd is unreachable or without quorum.
    #[error("cluster: {0}")]
    Cluster(String),
}

impl Error {
    pub fn invalid(what: &'static str, why: impl Into<String>) -> Self {
        Error::Invalid {
            what,
            why: why.into(),
        }
    }

    pub fn not_found(kind: &'static str, name: &str) -> Self {
        Error::NotFound {
            kind,
            name: name.to_string(),
        }
    }

    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            what,
            path: path.into(),
            source,
        }
    }

    /// The HTTP status the REST API answers with.
    pub fn status(&self) -> u16 {
        match self {
            Error::NotFound { .. } => 404,
            Error::Exists { .. } | Error::Conflict(_) => 409,
            Error::Invalid { .. } => 400,
            Error::Unsupported(_) => 501,
            Error::Forbidden(_) => 403,
            Error::Cluster(_) => 503,
            _ => 500,
        }
    }

    /// A short machine-readable code for clients.
    pub fn code(&self) -> &'static str {
        match self {
            Error::NotFound { .. } => "not_found",
            Error::Exists { .. } => "exists",
            Error::Invalid { .. } => "invalid",
            Error::Conflict(_) => "conflict",
            Error::Unsupported(_) => "unsupported",
            Error::Forbidden(_) => "forbidden",
            Error::Db(_) => "database",
            Error::Io { .. } => "io",
            Error::Qmp(_) => "qmp",
            Error::Spawn { .. } => "spawn",
            Error::Block(_) => "block",
            Error::Cluster(_) => "cluster_unavailable",
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
