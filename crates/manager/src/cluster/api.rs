//! The REST API's cluster routes, and the domain routes that change meaning in a cluster:
//! define places the domain, start asks its host to start it, and a request for a domain
//! placed on another host is refused with that host's name and address.

use std::time::Duration;

use serde_json::json;
use vmm::api::http::{Reply, Request, Response};

use super::Cluster;
use crate::api::Api;
use crate::error::{Error, Result};

/// How long `start` waits for the domain's host to report it running.
const START_WAIT: Duration = Duration::from_secs(60);

fn ok(v: serde_json::Value) -> Result<Option<Reply>> {
    Ok(Some(Response::json(200, &v).into()))
}

/// Some(reply) when the cluster answers the request; None when the host's own API does.
/// An etcd error that passes (a member lost, a new leader being elected) is retried
/// for a few seconds: losing one member of three must change nothing for clients. When
/// a majority of etcd's members has no leader, or does not answer, the error says so at
/// once: no retry can help until they are back.
pub fn route(c: &Cluster, api: &Api, req: &Request, seg: &[&str]) -> Result<Option<Reply>> {
    let t0 = std::time::Instant::now();
    if let ("POST", ["cluster", "promise"]) = (req.method.as_str(), seg) {
        // Asked by a host whose lease renewals fail: answered without etcd.
        let asker = serde_json::from_slice::<serde_json::Value>(&req.body)
            .ok()
            .and_then(|v| v["host"].as_str().map(str::to_string))
            .unwrap_or_default();
        return ok(json!(c.promise(&asker)));
    }
    loop {
        match route_once(c, api, req, seg) {
            Err(e) if super::is_transient(&e) => {
                // A majority of members down ends at once; members without a leader may
                // be electing one, which the retries wait out.
                let lost = c.no_quorum();
                match lost {
                    Some((why, true)) => return Err(Error::Cluster(why)),
                    Some((why, false)) if t0.elapsed() >= super::RETRY_FOR => {
                        return Err(Error::Cluster(why))
                    }
                    None if t0.elapsed() >= super::RETRY_FOR => return Err(e),
                    _ => {}
                }
                tracing::debug!("retrying a cluster request: {e}");
                std::thread::sleep(Duration::from_millis(250));
            }
            other => return other,
        }
    }
}

fn route_once(c: &Cluster, api: &Api, req: &Request, seg: &[&str]) -> Result<Option<Reply>> {
    let me = c.opts.host.as_str();
    match (req.method.as_str(), seg) {
        ("GET", ["cluster", "hosts"]) => {
            let hosts: Vec<_> = c.hosts()?.into_values().collect();
            ok(json!(hosts))
        }
        ("GET", ["cluster", "hosts", h]) => {
            let mut hosts = c.hosts()?;
            match hosts.remove(*h) {
                Some(v) => ok(v),
                None => Err(Error::not_found("host", h)),
            }
        }
        ("PUT", ["cluster", "hosts", h, "maintenance"]) => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct M {
                maintenance: bool,
            }
            let m: M = serde_json::from_slice(&req.body)
                .map_err(|e| Error::invalid("maintenance body", e.to_string()))?;
            let moved = c.set_maintenance(h, m.maintenance)?;
            ok(json!({"host": h, "maintenance": m.maintenance, "moved": moved}))
        }
        ("GET", ["cluster", "groups"]) => ok(json!(c.groups()?)),
        ("POST", ["cluster", "groups"]) => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct G {
                name: String,
                policy: super::Policy,
            }
            let g: G = serde_json::from_slice(&req.body)
                .map_err(|e| Error::invalid("server group body", e.to_string()))?;
            let g = c.create_group(&g.name, g.policy)?;
            Ok(Some(Response::json(201, &json!(g)).into()))
        }
        ("DELETE", ["cluster", "groups", g]) => {
            c.delete_group(g)?;
            Ok(Some(Response::empty(204).into()))
        }
        ("POST", ["migrations", "incoming"]) => {
            // Only a migration the cluster recorded to this host may come in: anything
            // else would be a domain here that etcd does not place here.
            let v: serde_json::Value = serde_json::from_slice(&req.body)
                .map_err(|e| Error::invalid("incoming migration body", e.to_string()))?;
            let name = v["definition"]["name"].as_str().unwrap_or_default();
            let state = c.state()?;
            match state.migrations.get(name) {
                Some((m, _)) if m.to == me => Ok(None),
                _ => Err(Error::Conflict(format!(
                    "no live migration of domain {name:?} to host {me} is recorded in the \
                     cluster: cluster domains move with `vessel migrate NAME --live [--to HOST]`"
                ))),
            }
        }
        ("POST", ["networks"]) => {
            // A body that does not parse is the host's API's to refuse.
            match serde_json::from_slice::<crate::network::NetworkDef>(&req.body) {
                Ok(def) => check_network(c, &def).map(|()| None),
                Err(_) => Ok(None),
            }
        }
        ("POST", ["networks", name, "start"]) => {
            let defs = api.m.store.list_networks()?;
            match defs.iter().find(|d| d.name == *name) {
                Some(def) => check_network(c, def).map(|()| None),
                None => Ok(None),
            }
        }
        ("POST", ["domains"]) => {
            if c.is_fenced() {
                return Err(Error::Cluster(format!(
                    "host {me} could not renew its etcd lease in time and has stopped its domains: no placement through it until etcd answers again"
                )));
            }
            let mut def = crate::api::parse_definition(req)?;
            api.check_domain_files(&def, req)?;
            // As a single host's define: the files the names lead to are recorded
            // (which file each is), and the client's rights are checked on those open
            // files, so a swap after the name check is refused, not recorded; the
            // placed host, when it is this one, defines only the same files.
            crate::disk_chain::after_client_check_hook(&def.name);
            crate::disk_chain::record_all(&mut def)?;
            crate::boot_files::record_all(&mut def)?;
            api.check_recorded_files(&def, req)?;
            let name = def.name.clone();
            let group = req.query("group").map(str::to_string);
            let rec = c.define_recorded(def, group, Some(me.to_string()))?;
            Ok(Some(
                Response::json(
                    201,
                    &json!({"name": name, "host": rec.host, "addresses": rec.addresses}),
                )
                .into(),
            ))
        }
        ("POST", ["domains", name, "start"]) => {
            let Some(rec) = c.set_running(name, true)? else {
                return Ok(None);
            };
            let host = c.wait_running(name, START_WAIT)?;
            ok(json!({"name": name, "host": host, "wanted": rec.host, "state": "running"}))
        }
        (_, ["domains", name, rest @ ..]) => {
            let state = c.state()?;
            let Some((rec, _)) = state.domains.get(*name) else {
                return Ok(None);
            };
            if state.migrations.get(*name).is_some_and(|(m, _)| m.to == me) {
                // The source's requests while it migrates here (its clean-up after a
                // failed migration among them): this host's own business until then.
                return Ok(None);
            }
            if let ("POST", ["migrate"]) = (req.method.as_str(), rest) {
                return migrate(c, &state, rec, req).map(|v| Some(Response::json(200, &v).into()));
            }
            if rec.host != me {
                let api = state
                    .hosts
                    .get(&rec.host)
                    .map(|h| h.api.clone())
                    .unwrap_or_else(|| "its lease has expired".into());
                return Err(Error::Conflict(format!(
                    "domain {name:?} is placed on host {} ({api}): send the request to that \
                     host's daemon",
                    rec.host
                )));
            }
            match (req.method.as_str(), rest) {
                // Stopped on purpose: evacuation must not start it again elsewhere.
                ("POST", ["shutdown" | "destroy"]) => {
                    c.set_running(name, false)?;
                    Ok(None)
                }
                ("DELETE", []) => {
                    api.m.undefine(name)?;
                    c.forget(name)?;
                    Ok(Some(Response::empty(204).into()))
                }
                _ => Ok(None),
            }
        }
        _ => Ok(None),
    }
}

/// Refuses to define or start a network here that another host defines otherwise (see
/// [`super::overlay::mismatch`]). An overlay network needs etcd's answer; one of this
/// host alone goes ahead when etcd does not answer.
fn check_network(c: &Cluster, def: &crate::network::NetworkDef) -> Result<()> {
    let state = match c.state() {
        Ok(s) => s,
        Err(e) if def.vni.is_some() => return Err(e),
        Err(_) => return Ok(()),
    };
    let hosts: Vec<super::HostRecord> = state.hosts.into_values().collect();
    match super::overlay::mismatch(def, &c.opts.host, &hosts) {
        Some(why) => Err(Error::Conflict(why)),
        None => Ok(()),
    }
}

/// `migrate NAME --live [--to HOST]` of a cluster domain: its host's daemon sends it
/// (a request to another daemon is passed on to that one).
fn migrate(
    c: &Cluster,
    state: &super::State,
    rec: &super::DomainRecord,
    req: &Request,
) -> Result<serde_json::Value> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct M {
        #[serde(default)]
        live: bool,
        #[serde(default)]
        to: Option<String>,
        /// A daemon outside the cluster: refused for a cluster domain.
        #[serde(default)]
        dest: Option<String>,
        #[serde(default)]
        dest_token: Option<String>,
        #[serde(default)]
        undefine_source: bool,
    }
    let m: M = serde_json::from_slice(&req.body)
        .map_err(|e| Error::invalid("migrate body", e.to_string()))?;
    let _ = (m.dest_token, m.undefine_source);
    if m.dest.is_some() {
        return Err(Error::Conflict(format!(
            "domain {:?} is a cluster domain: it moves to another host of the cluster \
             (`migrate NAME --live --to HOST`, or without --to where placement picks), not \
             to a daemon outside it",
            rec.def.name
        )));
    }
    if !m.live {
        return Err(Error::Unsupported(
            "only live migration is implemented: give --live".into(),
        ));
    }
    if rec.host == c.opts.host {
        return c.migrate_live(&rec.def.name, m.to.as_deref());
    }
    let Some(h) = state.hosts.get(&rec.host) else {
        return Err(Error::Conflict(format!(
            "domain {:?} is placed on host {}, whose lease has expired: it is evacuated, \
             not migrated",
            rec.def.name, rec.host
        )));
    };
    c.forward_migrate(h, &rec.def.name, m.to.as_deref())
}
