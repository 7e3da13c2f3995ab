//! Control APIs over Unix sockets: the HTTP plumbing shared with the manager, and the VMM's
//! own Firecracker-compatible REST API.

pub mod access;
pub mod console;
pub mod counters;
pub mod fc_config;
pub mod fc_log;
pub mod fc_model;
pub mod firecracker;
pub mod http;
pub mod migration;
pub mod snapshot;
