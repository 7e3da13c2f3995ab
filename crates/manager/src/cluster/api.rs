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
/// for a few seconds: losing one member of three must change nothing for clients.
pub fn route(c: &Cluster, api: &Api, req: &Request, seg: &[&str]) -> Result<Option<Reply>> {
    let t0 = std::time::Instant::now();
    loop {
        match route_once(c, api, req, seg) {
            Err(e) if super::is_transient(&e) && t0.elapsed() < super::RETRY_FOR => {
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
            let moved: Vec<_> = moved
                .into_iter()
                .map(|(d, to)| json!({"domain": d, "to": to}))
                .collect();
            ok(json!({"host": h, "maintenance": m.maintenance, "moved": moved}))
        }
        ("POST", ["domains"]) => {
            if c.is_fenced() {
                return Err(Error::Cluster(format!(
                    "host {me} has lost its etcd lease: no placement until it is back"
                )));
            }
            let def = crate::api::parse_definition(req)?;
            api.check_domain_files(&def, req)?;
            let name = def.name.clone();
            let host = c.define(def)?;
            Ok(Some(
                Response::json(201, &json!({"name": name, "host": host})).into(),
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
