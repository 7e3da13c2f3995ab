//! Vessel's manager, in libvirt's role: domain definitions in SQLite, two drivers (Vessel's
//! VMM and QEMU through QMP), supervision and re-adoption of VMM processes, directory
//! storage pools with raw/qcow2 volumes, events, and a REST API on a Unix socket.

pub mod api;
pub mod client;
pub mod domain;
pub mod driver;
pub mod error;
pub mod events;
pub mod manager;
pub mod network;
pub mod qmp;
pub mod storage;
pub mod store;
pub mod xml;

use std::path::Path;
use std::sync::Arc;

pub use error::{Error, Result};
pub use manager::{Config, Manager};

/// Opens the state, binds the socket and serves the API until the process ends.
pub fn serve(cfg: Config, socket: &Path) -> Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("creating socket folder", dir, e))?;
    }
    let listener = vmm::api::http::bind(socket).map_err(|e| Error::io("binding", socket, e))?;
    let m = Manager::open(cfg)?;
    tracing::info!(socket = %socket.display(), "vessel daemon listening");
    let auto = m.clone();
    std::thread::spawn(move || auto.autostart_all());
    vmm::api::http::serve(listener, Arc::new(api::Api { m }), api::protocol_error);
    Ok(())
}
