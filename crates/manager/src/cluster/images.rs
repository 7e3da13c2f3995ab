//! Images without shared storage: copy on first use. When a domain is placed on a host
//! whose pool lacks a `vol://POOL/VOLUME` disk of its definition, that host's reconcile
//! fetches the volume, before it defines the domain, from another host of the cluster
//! that has it (over the peers' APIs: the volume's guest-visible bytes, 16 MiB at a time,
//! all-zero pieces left unwritten) into a volume of the same name, format and capacity in
//! its own pool. From then on the copy is this host's own: later domains and starts here
//! use it, so a base image crosses the network once per host. Writes stay on the host
//! that makes them: the copy is for images used read-only or as a new domain's first
//! disk, not a replica (live migration still needs the disk at one path on both hosts).

use std::time::Instant;

use super::{Cluster, State};
use crate::domain::{DomainDef, VOLUME_PREFIX};
use crate::error::{Error, Result};
use crate::storage;

/// The most one request moves (the volume data route's own limit).
const CHUNK: u64 = 16 << 20;

/// Fetches every `vol://` volume of `def` that this host's pools lack.
pub(super) fn fetch_missing(c: &Cluster, state: &State, def: &DomainDef) -> Result<()> {
    for d in &def.vm.disks {
        let Some(rest) = d.path.to_str().and_then(|p| p.strip_prefix(VOLUME_PREFIX)) else {
            continue;
        };
        let Some((pool, vol)) = rest.split_once('/') else {
            continue;
        };
        if storage::volume_info(&*c.m, pool, vol).is_ok() {
            continue;
        }
        fetch(c, state, pool, vol)?;
    }
    Ok(())
}

fn fetch(c: &Cluster, state: &State, pool: &str, vol: &str) -> Result<()> {
    let me = c.opts.host.as_str();
    let mut why = Vec::new();
    for h in state
        .hosts
        .values()
        .filter(|h| h.name != me && h.pools.iter().any(|p| p == pool))
    {
        let peer = c.peer(h);
        let info = match peer.get(&format!("/v1/pools/{pool}/volumes/{vol}")) {
            Ok(v) => v,
            Err(e) => {
                why.push(format!("{}: {e}", h.name));
                continue;
            }
        };
        let capacity = info["capacity"].as_u64().unwrap_or(0);
        let format = match info["format"].as_str() {
            Some("raw") => block::Format::Raw,
            Some("qcow2") => block::Format::Qcow2,
            other => {
                why.push(format!("{}: a volume of format {other:?}", h.name));
                continue;
            }
        };
        let t0 = Instant::now();
        storage::create_volume(&*c.m, pool, vol, capacity, format, None)?;
        match copy(c, &peer, pool, vol, capacity) {
            Ok(written) => {
                tracing::info!(
                    pool,
                    volume = vol,
                    from = %h.name,
                    capacity,
                    written,
                    ms = t0.elapsed().as_millis() as u64,
                    "volume copied on first use"
                );
                return Ok(());
            }
            Err(e) => {
                let _ = storage::delete_volume(&*c.m, pool, vol);
                why.push(format!("{}: {e}", h.name));
            }
        }
    }
    Err(Error::Conflict(format!(
        "volume {pool}/{vol} is not in this host's ({me}) pool, and no other host gave it{}{}",
        if why.is_empty() { "" } else { ": " },
        why.join("; ")
    )))
}

/// Copies the volume's content from `peer`; returns the bytes written (zeros are not).
fn copy(
    c: &Cluster,
    peer: &crate::client::Client,
    pool: &str,
    vol: &str,
    capacity: u64,
) -> Result<u64> {
    let mut written = 0;
    let mut off = 0;
    while off < capacity {
        let len = CHUNK.min(capacity - off);
        let r = peer
            .raw(
                "GET",
                &format!("/v1/pools/{pool}/volumes/{vol}/data?offset={off}&length={len}"),
                None,
            )
            .map_err(|e| Error::Conflict(format!("reading at {off}: {e}")))?;
        if r.body.len() as u64 != len {
            return Err(Error::Conflict(format!(
                "{} bytes at {off} where {len} were asked",
                r.body.len()
            )));
        }
        if r.body.iter().any(|b| *b != 0) {
            storage::write_volume(&*c.m, pool, vol, off, &r.body)?;
            written += len;
        }
        off += len;
    }
    Ok(written)
}
