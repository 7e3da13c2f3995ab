//! Firecracker's `/logger` and `/metrics`: a log file the API can point the VMM's
//! `tracing` events at, and a metrics file of JSON lines.
//!
//! Logging: [`ApiLogLayer`] is a `tracing_subscriber` layer the `vessel` binary installs
//! beside its stderr output, behind a level filter it can change at run time
//! ([`set_level_hook`]); until `PUT /logger` names a file its filter is `OFF`, so it
//! costs nothing. Lines look like Firecracker's:
//! `2026-12-05T10:20:35.123456789 [anonymous-instance:vmm-api:WARN:crates/…:42] text`
//! (level and origin only when `show_level` / `show_log_origin` ask for them).
//!
//! Metrics: the API's own counters (requests per endpoint and their failures,
//! deprecated fields used) and the devices' (`block`: reads, writes, flushes and their
//! bytes; `net`: packets and bytes each way), written as one JSON line per flush with
//! Firecracker's names (`put_api_requests.drive_count`, `block.read_bytes`, …) and its
//! delta semantics (each line counts what happened since the previous one); on
//! `FlushMetrics` and every 60 s. Firecracker's other groups (vcpu, vmm, uart, …) are not
//! kept.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::{json, Map, Value};
use tracing::field::{Field, Visit};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::Context;

use super::fc_model::{LogLevel, Logger, Metrics};

/// Firecracker's instance ID when the jailer gave none.
pub const INSTANCE_ID: &str = "anonymous-instance";

struct LogSink {
    file: File,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
}

fn sink() -> &'static Mutex<Option<LogSink>> {
    static SINK: OnceLock<Mutex<Option<LogSink>>> = OnceLock::new();
    SINK.get_or_init(|| Mutex::new(None))
}

type LevelHook = Box<dyn Fn(LevelFilter) + Send + Sync>;

fn level_hook() -> &'static OnceLock<LevelHook> {
    static HOOK: OnceLock<LevelHook> = OnceLock::new();
    &HOOK
}

/// Called by whoever installed [`ApiLogLayer`] with a reloadable filter: sets that
/// filter's level when `PUT /logger` asks.
pub fn set_level_hook(f: impl Fn(LevelFilter) + Send + Sync + 'static) {
    let _ = level_hook().set(Box::new(f));
}

fn level_filter(l: LogLevel) -> LevelFilter {
    match l {
        LogLevel::Off => LevelFilter::OFF,
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warning => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Trace => LevelFilter::TRACE,
    }
}

/// `PUT /logger`: opens (creating if needed) the log file and sets the level
/// (Firecracker's default: Info). A later call changes what it names.
pub fn configure_logger(cfg: &Logger) -> Result<(), String> {
    let mut guard = sink().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(path) = &cfg.log_path {
        let file = open_append(path).map_err(|e| format!("{}: {e}", path.display()))?;
        *guard = Some(LogSink {
            file,
            show_level: false,
            show_origin: false,
            module: None,
        });
    }
    if let Some(s) = guard.as_mut() {
        if let Some(v) = cfg.show_level {
            s.show_level = v;
        }
        if let Some(v) = cfg.show_log_origin {
            s.show_origin = v;
        }
        if cfg.module.is_some() {
            s.module.clone_from(&cfg.module);
        }
    }
    let level = cfg.level.unwrap_or(LogLevel::Info);
    drop(guard);
    if let Some(hook) = level_hook().get() {
        hook(level_filter(level));
    }
    Ok(())
}

fn open_append(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
}

/// Civil date and time (UTC) for a Unix time, as Firecracker stamps its log lines.
fn timestamp(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_nanos()
    )
}

struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let m = format!("{value:?}");
            self.0.insert_str(0, &m);
        } else {
            self.0.push_str(&format!(" {}={value:?}", field.name()));
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.insert_str(0, value);
        } else {
            self.0.push_str(&format!(" {}={value}", field.name()));
        }
    }
}

/// One log line in Firecracker's layout.
fn format_line(
    meta: &tracing::Metadata<'_>,
    message: &str,
    show_level: bool,
    show_origin: bool,
) -> String {
    let thread = std::thread::current();
    let mut head = format!("{INSTANCE_ID}:{}", thread.name().unwrap_or("-"));
    if show_level {
        head.push(':');
        head.push_str(meta.level().as_str());
    }
    if show_origin {
        head.push_str(&format!(
            ":{}:{}",
            meta.file().unwrap_or("?"),
            meta.line().unwrap_or(0)
        ));
    }
    format!(
        "{} [{head}] {message}\n",
        timestamp(std::time::SystemTime::now())
    )
}

/// The layer that writes events to the `/logger` file (see the module documentation).
#[derive(Debug, Default, Clone, Copy)]
pub struct ApiLogLayer;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for ApiLogLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut guard = sink().lock().unwrap_or_else(|p| p.into_inner());
        let Some(s) = guard.as_mut() else { return };
        let meta = event.metadata();
        if let Some(m) = &s.module {
            let path = meta.module_path().unwrap_or(meta.target());
            if !path.starts_with(m.as_str()) {
                return;
            }
        }
        let mut msg = Message(String::new());
        event.record(&mut msg);
        let line = format_line(meta, &msg.0, s.show_level, s.show_origin);
        // A full pipe or a failing disk must not stop the VMM: the line is dropped.
        let _ = s.file.write_all(line.as_bytes());
    }
}

/// The API's request counters, by Firecracker's metric names.
#[derive(Debug, Default)]
pub struct ApiMetrics {
    counters: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    deprecated: AtomicU64,
    /// The device totals at the previous line, to report their change.
    last_devices: Mutex<crate::runtime::DeviceTotals>,
}

/// Firecracker's name for an endpoint's counters (`drive` for `/drives/…`).
fn endpoint_metric(method: &str, first: &str) -> Option<(&'static str, &'static str)> {
    let group = match method {
        "GET" => "get_api_requests",
        "PUT" => "put_api_requests",
        "PATCH" => "patch_api_requests",
        _ => return None,
    };
    let name = match (method, first) {
        ("GET", "") => "instance_info",
        ("GET", "version") => "vmm_version",
        ("GET", "vm") => "vm_config",
        (_, "machine-config") => "machine_cfg",
        (_, "actions") => "actions",
        (_, "boot-source") => "boot_source",
        (_, "drives") => "drive",
        (_, "network-interfaces") => "network",
        (_, "logger") => "logger",
        (_, "metrics") => "metrics",
        (_, "vsock") => "vsock",
        (_, "serial") => "serial",
        (_, "cpu-config") => "cpu_cfg",
        (_, "entropy") => "entropy",
        (_, "mmds") => "mmds",
        (_, "balloon") => "balloon",
        (_, "pmem") => "pmem",
        (_, "hotplug") => "hotplug_memory",
        _ => return None,
    };
    Some((group, name))
}

impl ApiMetrics {
    /// Counts one request and, when it failed, one failure.
    pub fn record(&self, method: &str, first: &str, failed: bool) {
        let Some((group, name)) = endpoint_metric(method, first) else {
            return;
        };
        let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        *c.entry((group, name)).or_default() += 1;
        if failed {
            // Firecracker's names: `<endpoint>_count` and `<endpoint>_fails`.
            *c.entry((group, fails_name(name))).or_default() += 1;
        }
    }

    /// Counts a request that used a deprecated field.
    pub fn deprecated(&self) {
        self.deprecated.fetch_add(1, Ordering::Relaxed);
    }

    /// One metrics line: the counts since the previous one (`devices`: the devices'
    /// totals now, when a VM runs).
    pub fn take_line(&self, cfg: &Metrics, devices: Option<crate::runtime::DeviceTotals>) -> Value {
        let counts = std::mem::take(&mut *self.counters.lock().unwrap_or_else(|p| p.into_inner()));
        let mut groups: Map<String, Value> = Map::new();
        for group in ["get_api_requests", "put_api_requests", "patch_api_requests"] {
            groups.insert(group.into(), json!({}));
        }
        for ((group, name), n) in counts {
            let key = if name.ends_with("_fails") {
                name.to_string()
            } else {
                format!("{name}_count")
            };
            if let Some(Value::Object(g)) = groups.get_mut(group) {
                g.insert(key, json!(n));
            }
        }
        if let Some(now) = devices {
            let mut last = self.last_devices.lock().unwrap_or_else(|p| p.into_inner());
            for (&(group, name), &v) in &now {
                let before = last.get(&(group, name)).copied().unwrap_or(0);
                let g = groups.entry(group.to_string()).or_insert_with(|| json!({}));
                if let Value::Object(g) = g {
                    g.insert(name.into(), json!(v.saturating_sub(before)));
                }
            }
            *last = now;
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        groups.insert("utc_timestamp_ms".into(), json!(now_ms));
        groups.insert(
            "deprecated_api".into(),
            json!({"deprecated_http_api_calls": self.deprecated.swap(0, Ordering::Relaxed)}),
        );
        if cfg.emit_id {
            groups.insert("id".into(), json!(INSTANCE_ID));
        }
        if let Some(p) = &cfg.properties {
            groups.insert("properties".into(), json!(p));
        }
        Value::Object(groups)
    }
}

fn fails_name(name: &'static str) -> &'static str {
    match name {
        "instance_info" => "instance_info_fails",
        "vmm_version" => "vmm_version_fails",
        "vm_config" => "vm_config_fails",
        "machine_cfg" => "machine_cfg_fails",
        "actions" => "actions_fails",
        "boot_source" => "boot_source_fails",
        "drive" => "drive_fails",
        "network" => "network_fails",
        "logger" => "logger_fails",
        "metrics" => "metrics_fails",
        "vsock" => "vsock_fails",
        "serial" => "serial_fails",
        "cpu_cfg" => "cpu_cfg_fails",
        "entropy" => "entropy_fails",
        "mmds" => "mmds_fails",
        "balloon" => "balloon_fails",
        "pmem" => "pmem_fails",
        _ => "hotplug_memory_fails",
    }
}

/// Where metrics go once `PUT /metrics` named a file.
#[derive(Debug)]
pub struct MetricsSink {
    cfg: Metrics,
    file: Mutex<File>,
}

impl MetricsSink {
    /// Opens (creating if needed) the metrics file.
    pub fn open(cfg: Metrics) -> Result<Arc<MetricsSink>, String> {
        let file = open_append(&cfg.metrics_path)
            .map_err(|e| format!("{}: {e}", cfg.metrics_path.display()))?;
        Ok(Arc::new(MetricsSink {
            cfg,
            file: Mutex::new(file),
        }))
    }

    /// Writes one line of `metrics` (and of the devices' totals, when a VM runs).
    pub fn flush(
        &self,
        metrics: &ApiMetrics,
        devices: Option<crate::runtime::DeviceTotals>,
    ) -> Result<(), String> {
        let mut line = metrics.take_line(&self.cfg, devices).to_string();
        line.push('\n');
        self.file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_all(line.as_bytes())
            .map_err(|e| format!("{}: {e}", self.cfg.metrics_path.display()))
    }
}

/// Runs `flush` every `period` on a thread of its own, until it returns false.
pub fn flush_periodically(period: std::time::Duration, flush: impl Fn() -> bool + Send + 'static) {
    let spawned = std::thread::Builder::new()
        .name("vmm-metrics".into())
        .spawn(move || {
            sandbox::enter(sandbox::Role::Api);
            loop {
                std::thread::sleep(period);
                if !flush() {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no periodic metrics: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_civil_utc() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_764_930_035, 5);
        assert_eq!(timestamp(t), "2025-12-05T10:20:35.000000005");
        assert_eq!(
            timestamp(std::time::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000000"
        );
        let leap = std::time::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(&timestamp(leap)[..10], "2000-02-29");
    }

    #[test]
    fn metrics_lines_count_since_the_last_one() {
        let m = ApiMetrics::default();
        m.record("PUT", "drives", false);
        m.record("PUT", "drives", true);
        m.record("GET", "", false);
        m.record("DELETE", "drives", false);
        m.deprecated();
        let cfg = Metrics {
            metrics_path: "/dev/null".into(),
            emit_id: true,
            properties: Some([("k".to_string(), "v".to_string())].into()),
        };
        let mut devices = crate::runtime::DeviceTotals::new();
        devices.insert(("block", "read_bytes"), 4096);
        let l = m.take_line(&cfg, Some(devices.clone()));
        assert_eq!(l["block"]["read_bytes"], 4096);
        assert_eq!(l["put_api_requests"]["drive_count"], 2);
        assert_eq!(l["put_api_requests"]["drive_fails"], 1);
        assert_eq!(l["get_api_requests"]["instance_info_count"], 1);
        assert_eq!(l["deprecated_api"]["deprecated_http_api_calls"], 1);
        assert_eq!(l["id"], INSTANCE_ID);
        assert_eq!(l["properties"]["k"], "v");
        devices.insert(("block", "read_bytes"), 6144);
        let l = m.take_line(&cfg, Some(devices));
        assert_eq!(
            l["block"]["read_bytes"], 2048,
            "the change since the last line"
        );
        assert!(l["put_api_requests"].get("drive_count").is_none());
        assert_eq!(l["deprecated_api"]["deprecated_http_api_calls"], 0);
    }
}
