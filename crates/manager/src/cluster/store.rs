//! The cluster's keys read back into records, from one consistent etcd read.

use std::collections::{BTreeMap, BTreeSet};

use super::placement::{DomainRecord, Group, HostRecord};
use super::PREFIX;

/// The holder of a domain's `running/N` key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub host: String,
    /// The lease the key lives under: a host's key from a lease it has since lost is stale.
    pub lease: i64,
    pub mod_rev: i64,
}

/// A live migration between hosts under way (`migrations/N`, under the source's lease:
/// it goes with the source, and with it the hold on both hosts' reconciling of N).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Migration {
    pub from: String,
    pub to: String,
}

/// Everything under the prefix at one revision.
#[derive(Debug, Default)]
pub struct State {
    pub revision: i64,
    pub hosts: BTreeMap<String, HostRecord>,
    /// Each live host's lease (its record's).
    pub leases: BTreeMap<String, i64>,
    /// Domain → the migration moving it, and its key's mod revision.
    pub migrations: BTreeMap<String, (Migration, i64)>,
    pub groups: BTreeMap<String, Group>,
    pub maintenance: BTreeSet<String>,
    /// Each domain's record and its key's mod revision (for compare-and-swap).
    pub domains: BTreeMap<String, (DomainRecord, i64)>,
    /// Domain → who holds its running lock.
    pub running: BTreeMap<String, Holder>,
    /// The epoch key's mod revision (0 before the first placement).
    pub epoch_rev: i64,
}

impl State {
    /// Keys that do not parse are logged and left out: another version of Vessel, or a
    /// hand-written key, must not stop the cluster.
    pub fn from_response(r: &etcd_client::GetResponse) -> State {
        let mut s = State {
            revision: r.header().map_or(0, |h| h.revision()),
            ..State::default()
        };
        for kv in r.kvs() {
            let Some(rest) = kv.key_str().ok().and_then(|k| k.strip_prefix(PREFIX)) else {
                continue;
            };
            let parsed = match rest.split_once('/') {
                Some(("hosts", h)) => serde_json::from_slice(kv.value())
                    .map(|rec: HostRecord| {
                        s.leases.insert(h.to_string(), kv.lease());
                        s.hosts.insert(h.to_string(), rec);
                    })
                    .map_err(|e| e.to_string()),
                Some(("maintenance", h)) => {
                    s.maintenance.insert(h.to_string());
                    Ok(())
                }
                Some(("domains", n)) => serde_json::from_slice(kv.value())
                    .map(|rec: DomainRecord| {
                        s.domains.insert(n.to_string(), (rec, kv.mod_revision()));
                    })
                    .map_err(|e| e.to_string()),
                Some(("migrations", n)) => serde_json::from_slice(kv.value())
                    .map(|m: Migration| {
                        s.migrations.insert(n.to_string(), (m, kv.mod_revision()));
                    })
                    .map_err(|e| e.to_string()),
                Some(("groups", g)) => serde_json::from_slice(kv.value())
                    .map(|rec: Group| {
                        s.groups.insert(g.to_string(), rec);
                    })
                    .map_err(|e| e.to_string()),
                Some(("running", n)) => {
                    s.running.insert(
                        n.to_string(),
                        Holder {
                            host: String::from_utf8_lossy(kv.value()).into_owned(),
                            lease: kv.lease(),
                            mod_rev: kv.mod_revision(),
                        },
                    );
                    Ok(())
                }
                None if rest == "epoch" => {
                    s.epoch_rev = kv.mod_revision();
                    Ok(())
                }
                _ => Ok(()),
            };
            if let Err(e) = parsed {
                tracing::warn!(key = rest, "ignoring a cluster key: {e}");
            }
        }
        s
    }
}
