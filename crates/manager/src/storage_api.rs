//! The storage part of the manager's REST API (`/v1/pools/…`): request bodies and
//! routes over the operations in `storage`, which knows nothing of HTTP.

use std::path::PathBuf;
use std::sync::Arc;

use block::Format;
use serde::{Deserialize, Serialize};
use vmm::api::http::{Reply, Request, Response};

use crate::error::{Error, Result};
use crate::manager::Manager;
use crate::storage::{
    check_pool_root, clone_volume, create_volume, define_pool, delete_volume, pool_dir,
    pool_info_of, read_volume, resize_volume, volume_files, volume_info, write_volume, PoolInfo,
    VolumeInfo,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolReq {
    name: String,
    path: PathBuf,
    /// Create the folder when it does not exist (`pool-build`).
    #[serde(default)]
    create: bool,
    /// libvirt's pool UUID; made when absent.
    #[serde(default)]
    uuid: Option<String>,
    /// libvirt's <permissions>: given to a folder made here, checked on one that exists.
    #[serde(default)]
    permissions: Option<crate::storage::Permissions>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VolReq {
    name: String,
    capacity: u64,
    #[serde(default = "default_format")]
    format: String,
    /// libvirt's <permissions>, given to the new file.
    #[serde(default)]
    permissions: Option<crate::storage::Permissions>,
}

fn default_format() -> String {
    "qcow2".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CloneReq {
    name: String,
    /// overlay (a qcow2 whose backing file is the source) or copy (a full copy).
    #[serde(default = "default_mode")]
    mode: String,
    /// Format of a full copy (default: the source's).
    #[serde(default)]
    format: Option<String>,
}

fn default_mode() -> String {
    "overlay".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResizeReq {
    capacity: u64,
}

fn parse_format(s: &str) -> Result<Format> {
    s.parse()
        .map_err(|e: block::UnknownFormat| Error::invalid("volume format", e.to_string()))
}

fn ok(v: serde_json::Value) -> Result<Reply> {
    Ok(Response::json(200, &v).into())
}

fn val<T: Serialize>(t: &T) -> serde_json::Value {
    serde_json::to_value(t).unwrap_or(serde_json::Value::Null)
}

fn body<T: serde::de::DeserializeOwned>(req: &Request, what: &'static str) -> Result<T> {
    serde_json::from_slice(&req.body).map_err(|e| Error::invalid(what, e.to_string()))
}

fn q_u64(req: &Request, name: &'static str, default: u64) -> Result<u64> {
    match req.query(name) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| Error::invalid("query parameter", format!("{name}={v:?}"))),
    }
}

/// `/v1/pools/...` routes; `seg` is what follows `pools`.
pub fn route(m: &Arc<Manager>, req: &Request, seg: &[&str]) -> Result<Reply> {
    let m: &dyn crate::storage::PoolHost = &**m;
    match (req.method.as_str(), seg) {
        ("GET", []) => {
            let pools: Vec<PoolInfo> = m
                .store()
                .list_pools()?
                .iter()
                .map(|(n, p)| pool_info_of(m, n, p))
                .collect::<Result<_>>()?;
            ok(val(&pools))
        }
        ("POST", []) => {
            let r: PoolReq = body(req, "pool definition")?;
            Ok(Response::json(
                201,
                &val(&define_pool(
                    m,
                    &r.name,
                    &r.path,
                    r.create,
                    r.uuid.as_deref(),
                    r.permissions,
                )?),
            )
            .into())
        }
        ("GET", [p]) => ok(val(&pool_info_of(m, p, &m.store().get_pool(p)?)?)),
        ("POST", [p, "build"]) => {
            // virsh's pool-build: make the pool's folder (again), under a pool root.
            let path = m.store().get_pool(p)?;
            check_pool_root(m, &path)?;
            std::fs::create_dir_all(&path)
                .map_err(|e| Error::io("creating pool folder", &path, e))?;
            ok(val(&pool_info_of(m, p, &path)?))
        }
        ("DELETE", [p]) => {
            m.store().get_pool(p)?;
            m.store().delete_pool(p)?;
            Ok(Response::empty(204).into())
        }
        ("GET", [p, "volumes"]) => {
            let dir = pool_dir(m, p)?;
            let vols: Vec<VolumeInfo> = volume_files(&dir)?
                .iter()
                .filter_map(|v| volume_info(m, p, v).ok())
                .collect();
            ok(val(&vols))
        }
        ("POST", [p, "volumes"]) => {
            let r: VolReq = body(req, "volume definition")?;
            let f = parse_format(&r.format)?;
            Ok(Response::json(
                201,
                &val(&create_volume(m, p, &r.name, r.capacity, f, r.permissions)?),
            )
            .into())
        }
        ("GET", [p, "volumes", v]) => ok(val(&volume_info(m, p, v)?)),
        ("DELETE", [p, "volumes", v]) => {
            delete_volume(m, p, v)?;
            Ok(Response::empty(204).into())
        }
        ("POST", [p, "volumes", v, "clone"]) => {
            let r: CloneReq = body(req, "clone request")?;
            let overlay = match r.mode.as_str() {
                "overlay" => true,
                "copy" => false,
                other => {
                    return Err(Error::invalid(
                        "clone mode",
                        format!("{other:?} (overlay or copy)"),
                    ))
                }
            };
            let f = r.format.as_deref().map(parse_format).transpose()?;
            Ok(Response::json(201, &val(&clone_volume(m, p, v, &r.name, overlay, f)?)).into())
        }
        ("POST", [p, "volumes", v, "resize"]) => {
            let r: ResizeReq = body(req, "resize request")?;
            ok(val(&resize_volume(m, p, v, r.capacity)?))
        }
        ("PUT", [p, "volumes", v, "data"]) => {
            let off = q_u64(req, "offset", 0)?;
            write_volume(m, p, v, off, &req.body)?;
            Ok(Response::empty(204).into())
        }
        ("GET", [p, "volumes", v, "data"]) => {
            let off = q_u64(req, "offset", 0)?;
            let len = q_u64(req, "length", 16 << 20)?;
            let data = read_volume(m, p, v, off, len)?;
            Ok(Response::bytes(200, "application/octet-stream", data).into())
        }
        _ => Err(Error::not_found(
            "API path",
            &format!("{} {}", req.method, req.path),
        )),
    }
}
