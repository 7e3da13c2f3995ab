//! The VMM's control API, compatible with Firecracker's (paths, field names, error shape
//! `{"fault_message": "..."}`), documented in openapi/vmm.yaml.
//!
//! Before boot, requests build a `VmConfig` (`/machine-config`, `/boot-source`, `/drives`
//! as virtio-blk disks, `/network-interfaces` as virtio-net on TAP devices, `/vsock`);
//! `PUT /actions {"action_type": "InstanceStart"}` validates it, builds the VM with
//! `Vmm::new` and runs it on a thread. After boot only runtime requests are accepted:
//! `PATCH /vm` pauses and resumes the vCPUs (guest time keeps running, as in
//! Firecracker), and `SendCtrlAltDel` asks the guest to shut down: Firecracker presses
//! Ctrl-Alt-Del on its i8042; this VMM presses the ACPI power button (the guest's GED
//! interrupt, `PNP0C0C`), which Linux turns into KEY_POWER for its init or acpid. What
//! the VMM cannot do (rate limiters, changing devices after boot) is refused with a 400
//! that says so, as Firecracker refuses what it does not support.
//!
//! Beyond Firecracker, for the manager: `action_type` `Stop` (end the VMM now, as
//! quitting the console does), `Reset` (reset the machine: the VM ends as when the guest
//! reboots, `vessel run` exits with its reboot status and the manager starts the domain
//! again) and `GET /vessel/status` (state and how the VM ended).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::http::{Handler, Reply, Request, Response};
use crate::config::{SerialConfig, VmConfig, VsockConfig};
use crate::{ExitReason, VmControl, Vmm};

/// A Firecracker-style error: status 400 and a fault message.
pub fn fault(status: u16, msg: impl Into<String>) -> Response {
    Response::json(status, &json!({ "fault_message": msg.into() }))
}

/// `PUT /machine-config` body (Firecracker's names).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: u64,
    #[serde(default)]
    pub smt: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

/// `PUT /boot-source` body.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// `PUT /drives/{drive_id}` body.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    pub path_on_host: String,
    pub is_root_device: bool,
    #[serde(default)]
    pub is_read_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<Value>,
}

/// `PUT /network-interfaces/{iface_id}` body.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<Value>,
}

/// `PUT /vsock` body. `vsock_id` is accepted and ignored, as Firecracker deprecated it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    pub guest_cid: u64,
    pub uds_path: String,
    #[serde(default, skip_serializing)]
    pub vsock_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Action {
    action_type: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmState {
    state: String,
}

#[derive(Debug)]
enum Phase {
    /// Configuring: what has been set so far.
    PreBoot {
        machine: Option<MachineConfig>,
        boot: Option<BootSource>,
        /// In the order they were first put (a later PUT with the same id replaces).
        drives: Vec<Drive>,
        nets: Vec<NetworkInterface>,
        vsock: Option<Vsock>,
    },
    Running {
        config: VmConfig,
        control: Arc<VmControl>,
    },
    Finished {
        config: VmConfig,
        how: String,
    },
}

/// The API's state, shared between the HTTP threads and whoever runs the VM.
#[derive(Debug)]
pub struct VmmApi {
    phase: Mutex<Phase>,
    ended: Condvar,
    /// Serial backend and accelerator for a VM started through the API (Firecracker's API
    /// has no field for either: they come from the command line).
    serial: SerialConfig,
    accel: crate::config::Accel,
    /// What the VM thread ended with.
    result: Mutex<Option<Result<ExitReason, String>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn parse<T: serde::de::DeserializeOwned>(req: &Request) -> Result<T, Response> {
    serde_json::from_slice(&req.body).map_err(|e| {
        fault(
            400,
            format!("An error occurred when deserializing the json body of a request: {e}."),
        )
    })
}

fn config_json(c: &VmConfig) -> Value {
    json!({
        "boot-source": {
            "kernel_image_path": c.kernel,
            "initrd_path": c.initrd,
            "boot_args": c.cmdline,
        },
        "machine-config": {
            "vcpu_count": c.cpus,
            "mem_size_mib": c.memory_mib,
            "smt": false,
            "track_dirty_pages": false,
        },
        "drives": c.disks.iter().enumerate().map(|(i, d)| json!({
            "drive_id": format!("drive{i}"),
            "path_on_host": d.path,
            "is_root_device": i == 0 && c.cmdline.contains("root=/dev/vda"),
            "is_read_only": d.read_only,
        })).collect::<Vec<_>>(),
        "network-interfaces": c.nets.iter().enumerate().map(|(i, n)| json!({
            "iface_id": format!("eth{i}"),
            "host_dev_name": n.tap,
            "guest_mac": n.mac,
        })).collect::<Vec<_>>(),
        "vsock": c.vsock.as_ref().map(|v| json!({
            "guest_cid": v.guest_cid,
            "uds_path": v.uds_path,
        })),
        "vessel": { "accel": c.accel },
    })
}

impl VmmApi {
    /// An API waiting for configuration and InstanceStart.
    pub fn new_preboot(serial: SerialConfig, accel: crate::config::Accel) -> Arc<Self> {
        Arc::new(VmmApi {
            accel,
            phase: Mutex::new(Phase::PreBoot {
                machine: None,
                boot: None,
                drives: Vec::new(),
                nets: Vec::new(),
                vsock: None,
            }),
            ended: Condvar::new(),
            serial,
            result: Mutex::new(None),
        })
    }

    /// An API for a VM already started from command-line flags.
    pub fn new_running(config: VmConfig, control: Arc<VmControl>) -> Arc<Self> {
        Arc::new(VmmApi {
            serial: config.serial.clone(),
            accel: config.accel,
            phase: Mutex::new(Phase::Running { config, control }),
            ended: Condvar::new(),
            result: Mutex::new(None),
        })
    }

    /// Records how the VM ended and wakes [`VmmApi::wait_finished`].
    pub fn finish(&self, r: Result<ExitReason, String>) {
        let mut p = lock(&self.phase);
        let config = match &*p {
            Phase::Running { config, .. } => config.clone(),
            Phase::Finished { config, .. } => config.clone(),
            Phase::PreBoot { .. } => VmConfig::new(""),
        };
        let how = match &r {
            Ok(reason) => format!("{reason:?}"),
            Err(e) => format!("error: {e}"),
        };
        *p = Phase::Finished { config, how };
        *lock(&self.result) = Some(r);
        self.ended.notify_all();
    }

    /// Blocks until a VM started through the API has ended.
    pub fn wait_finished(&self) -> Result<ExitReason, String> {
        let mut p = lock(&self.phase);
        loop {
            if matches!(*p, Phase::Finished { .. }) {
                return lock(&self.result)
                    .clone()
                    .unwrap_or(Err("no result".into()));
            }
            p = self.ended.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn state_name(&self) -> &'static str {
        match &*lock(&self.phase) {
            Phase::PreBoot { .. } => "Not started",
            Phase::Running { control, .. } if control.is_paused() => "Paused",
            Phase::Running { .. } => "Running",
            Phase::Finished { .. } => "Finished",
        }
    }

    /// The running VM's control handle, or the Firecracker-style refusal.
    fn control(&self) -> Result<Arc<VmControl>, Response> {
        match &*lock(&self.phase) {
            Phase::Running { control, .. } => Ok(control.clone()),
            Phase::PreBoot { .. } => Err(fault(
                400,
                "The requested operation is not supported before starting the microVM.",
            )),
            Phase::Finished { .. } => Err(fault(400, "The microVM is not running.")),
        }
    }

    /// Runs a control operation on the running VM: 204, or 400 with its error.
    fn with_control(
        &self,
        op: impl FnOnce(&VmControl) -> Result<(), crate::ControlError>,
    ) -> Response {
        match self.control() {
            Ok(c) => match op(&c) {
                Ok(()) => Response::empty(204),
                Err(e) => fault(400, e.to_string()),
            },
            Err(r) => r,
        }
    }

    fn build_config(
        &self,
        machine: &Option<MachineConfig>,
        boot: &Option<BootSource>,
        drives: &[Drive],
        nets: &[NetworkInterface],
        vsock: &Option<Vsock>,
    ) -> Result<VmConfig, Response> {
        let Some(boot) = boot else {
            return Err(fault(
                400,
                "Cannot start microvm without kernel configuration.",
            ));
        };
        let mut c = VmConfig::new(&boot.kernel_image_path);
        c.initrd = boot.initrd_path.as_ref().map(Into::into);
        if let Some(a) = &boot.boot_args {
            c.cmdline = a.clone();
        }
        if let Some(m) = machine {
            c.cpus = m.vcpu_count;
            c.memory_mib = m.mem_size_mib;
        }
        // As Firecracker: the root device is the first disk (vda), named on the command line.
        let mut ordered: Vec<&Drive> = drives.iter().filter(|d| d.is_root_device).collect();
        ordered.extend(drives.iter().filter(|d| !d.is_root_device));
        if let Some(root) = ordered.first().filter(|d| d.is_root_device) {
            if !c.cmdline.split_whitespace().any(|w| w.starts_with("root=")) {
                c.cmdline.push_str(if root.is_read_only {
                    " root=/dev/vda ro"
                } else {
                    " root=/dev/vda rw"
                });
            }
        }
        c.disks = ordered
            .iter()
            .map(|d| crate::config::DiskConfig {
                path: d.path_on_host.clone().into(),
                // As Firecracker's: drives are raw, their content never interpreted.
                format: Some(crate::config::DiskFormat::Raw),
                read_only: d.is_read_only,
                transport: None,
            })
            .collect();
        c.nets = nets
            .iter()
            .map(|n| crate::config::NetConfig {
                tap: n.host_dev_name.clone(),
                mac: n.guest_mac.clone(),
                transport: None,
            })
            .collect();
        c.vsock = vsock.as_ref().map(|v| VsockConfig {
            guest_cid: v.guest_cid,
            uds_path: v.uds_path.clone().into(),
        });
        c.serial = self.serial.clone();
        c.accel = self.accel;
        c.validate().map_err(|e| fault(400, e.to_string()))?;
        Ok(c)
    }

    fn instance_start(self: &Arc<Self>) -> Response {
        let mut p = lock(&self.phase);
        let Phase::PreBoot {
            machine,
            boot,
            drives,
            nets,
            vsock,
        } = &*p
        else {
            return fault(
                400,
                "The requested operation is not supported after starting the microVM.",
            );
        };
        let config = match self.build_config(machine, boot, drives, nets, vsock) {
            Ok(c) => c,
            Err(r) => return r,
        };
        let vmm = match Vmm::new(config.clone()) {
            Ok(v) => v,
            Err(e) => return fault(400, format!("Failed to start microVM: {e}")),
        };
        let exit = vmm.exit_signal();
        *p = Phase::Running {
            config,
            control: vmm.control(),
        };
        drop(p);
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("vm".into())
            .spawn(move || me.finish(vmm.run().map_err(|e| e.to_string())));
        if let Err(e) = spawned {
            exit.request(ExitReason::Error);
            self.finish(Err(e.to_string()));
            return fault(400, format!("Failed to start microVM: {e}"));
        }
        Response::empty(204)
    }

    fn handle_req(self: &Arc<Self>, req: &Request) -> Response {
        let seg = req.segments();
        let preboot = matches!(*lock(&self.phase), Phase::PreBoot { .. });
        let after_boot = || {
            fault(
                400,
                "The requested operation is not supported after starting the microVM.",
            )
        };
        match (req.method.as_str(), seg.as_slice()) {
            ("GET", []) => Response::json(
                200,
                &json!({
                    "id": "anonymous-instance",
                    "state": self.state_name(),
                    "vmm_version": env!("CARGO_PKG_VERSION"),
                    "app_name": "vessel",
                }),
            ),
            ("GET", ["version"]) => Response::json(
                200,
                &json!({"firecracker_version": env!("CARGO_PKG_VERSION")}),
            ),
            ("PUT", ["machine-config"]) | ("PATCH", ["machine-config"]) => {
                if !preboot {
                    return after_boot();
                }
                let m: MachineConfig = match parse(req) {
                    Ok(m) => m,
                    Err(r) => return r,
                };
                if m.vcpu_count == 0 || m.vcpu_count > crate::config::MAX_CPUS {
                    return fault(
                        400,
                        format!(
                            "Invalid vCPU count: {} (1 to {}).",
                            m.vcpu_count,
                            crate::config::MAX_CPUS
                        ),
                    );
                }
                if m.smt {
                    return fault(
                        400,
                        "Enabling simultaneous multithreading is not supported by this VMM.",
                    );
                }
                if m.mem_size_mib < crate::config::MIN_MEMORY_MIB {
                    return fault(
                        400,
                        format!(
                            "Invalid memory size: {} MiB (at least {}).",
                            m.mem_size_mib,
                            crate::config::MIN_MEMORY_MIB
                        ),
                    );
                }
                if let Phase::PreBoot { machine, .. } = &mut *lock(&self.phase) {
                    *machine = Some(m);
                }
                Response::empty(204)
            }
            ("GET", ["machine-config"]) => {
                let v = match &*lock(&self.phase) {
                    Phase::PreBoot { machine, .. } => machine
                        .as_ref()
                        .map(|m| serde_json::to_value(m).unwrap_or(Value::Null))
                        .unwrap_or(json!({"vcpu_count": 1, "mem_size_mib": crate::config::DEFAULT_MEMORY_MIB, "smt": false, "track_dirty_pages": false})),
                    Phase::Running { config, .. } | Phase::Finished { config, .. } => config_json(config)["machine-config"].clone(),
                };
                Response::json(200, &v)
            }
            ("PUT", ["boot-source"]) => {
                if !preboot {
                    return after_boot();
                }
                let b: BootSource = match parse(req) {
                    Ok(b) => b,
                    Err(r) => return r,
                };
                if !std::path::Path::new(&b.kernel_image_path).is_file() {
                    return fault(
                        400,
                        format!(
                            "The kernel file cannot be opened: {} does not exist or is not a file",
                            b.kernel_image_path
                        ),
                    );
                }
                if let Some(i) = &b.initrd_path {
                    if !std::path::Path::new(i).is_file() {
                        return fault(400, format!("The initrd file cannot be opened: {i} does not exist or is not a file"));
                    }
                }
                if let Phase::PreBoot { boot, .. } = &mut *lock(&self.phase) {
                    *boot = Some(b);
                }
                Response::empty(204)
            }
            ("PUT", ["drives", id]) => {
                if !preboot {
                    return after_boot();
                }
                let d: Drive = match parse(req) {
                    Ok(d) => d,
                    Err(r) => return r,
                };
                if d.drive_id != *id {
                    return fault(
                        400,
                        format!(
                            "The id from the path [{id}] does not match the id from the body [{}]!",
                            d.drive_id
                        ),
                    );
                }
                if d.rate_limiter.is_some() {
                    return fault(400, "Rate limiters are not supported by this VMM yet.");
                }
                if !std::path::Path::new(&d.path_on_host).is_file() {
                    return fault(
                        400,
                        format!(
                            "Unable to create the block device: {} does not exist or is not a file",
                            d.path_on_host
                        ),
                    );
                }
                if let Phase::PreBoot { drives, .. } = &mut *lock(&self.phase) {
                    if d.is_root_device
                        && drives
                            .iter()
                            .any(|x| x.is_root_device && x.drive_id != d.drive_id)
                    {
                        return fault(400, "A root block device already exists!");
                    }
                    match drives.iter_mut().find(|x| x.drive_id == d.drive_id) {
                        Some(x) => *x = d,
                        None => drives.push(d),
                    }
                }
                Response::empty(204)
            }
            ("PATCH", ["drives", _]) => fault(
                400,
                "Updating a drive after boot is not supported by this VMM yet.",
            ),
            ("PUT", ["network-interfaces", id]) => {
                if !preboot {
                    return after_boot();
                }
                let n: NetworkInterface = match parse(req) {
                    Ok(n) => n,
                    Err(r) => return r,
                };
                if n.iface_id != *id {
                    return fault(
                        400,
                        format!(
                            "The id from the path [{id}] does not match the id from the body [{}]!",
                            n.iface_id
                        ),
                    );
                }
                if n.rx_rate_limiter.is_some() || n.tx_rate_limiter.is_some() {
                    return fault(400, "Rate limiters are not supported by this VMM yet.");
                }
                if let Some(m) = &n.guest_mac {
                    if let Err(e) = crate::config::parse_mac(m) {
                        return fault(400, e);
                    }
                }
                if let Phase::PreBoot { nets, .. } = &mut *lock(&self.phase) {
                    match nets.iter_mut().find(|x| x.iface_id == n.iface_id) {
                        Some(x) => *x = n,
                        None => nets.push(n),
                    }
                }
                Response::empty(204)
            }
            ("PATCH", ["network-interfaces", _]) => fault(
                400,
                "Updating a network interface after boot is not supported by this VMM yet.",
            ),
            ("PUT", ["vsock"]) => {
                if !preboot {
                    return after_boot();
                }
                let v: Vsock = match parse(req) {
                    Ok(v) => v,
                    Err(r) => return r,
                };
                // The same rules as --vsock: CIDs 0-2 and VMADDR_CID_ANY are reserved.
                if v.guest_cid < 3 || v.guest_cid >= u64::from(u32::MAX) {
                    return fault(
                        400,
                        format!(
                            "Invalid vsock guest_cid {}: it is reserved (use 3 or more).",
                            v.guest_cid
                        ),
                    );
                }
                if v.uds_path.is_empty() {
                    return fault(400, "Invalid vsock uds_path: it is empty.");
                }
                if let Phase::PreBoot { vsock, .. } = &mut *lock(&self.phase) {
                    *vsock = Some(v);
                }
                Response::empty(204)
            }
            ("PUT", ["actions"]) => {
                let a: Action = match parse(req) {
                    Ok(a) => a,
                    Err(r) => return r,
                };
                match a.action_type.as_str() {
                    "InstanceStart" => self.instance_start(),
                    // The guest-shutdown request: the ACPI power button.
                    "SendCtrlAltDel" => self.with_control(VmControl::press_power_button),
                    "FlushMetrics" => fault(400, "Metrics are not configured."),
                    "Stop" => self.with_control(VmControl::stop),
                    "Reset" => self.with_control(VmControl::reset),
                    other => fault(400, format!("Invalid action_type {other:?} (InstanceStart, SendCtrlAltDel, FlushMetrics, Stop, Reset).")),
                }
            }
            ("PATCH", ["vm"]) => {
                let s: VmState = match parse(req) {
                    Ok(s) => s,
                    Err(r) => return r,
                };
                match s.state.as_str() {
                    "Paused" => self.with_control(VmControl::pause),
                    "Resumed" => self.with_control(VmControl::resume),
                    other => fault(
                        400,
                        format!("Invalid VM state {other:?} (Paused or Resumed)."),
                    ),
                }
            }
            ("GET", ["vm", "config"]) => {
                let v = match &*lock(&self.phase) {
                    Phase::PreBoot {
                        machine,
                        boot,
                        drives,
                        nets,
                        vsock,
                    } => json!({
                        "boot-source": boot,
                        "machine-config": machine,
                        "drives": drives,
                        "network-interfaces": nets,
                        "vsock": vsock,
                    }),
                    Phase::Running { config, .. } | Phase::Finished { config, .. } => {
                        config_json(config)
                    }
                };
                Response::json(200, &v)
            }
            ("GET", ["vessel", "status"]) => {
                let v = match &*lock(&self.phase) {
                    Phase::PreBoot { .. } => json!({"state": "Not started"}),
                    Phase::Running { control, .. } if control.is_paused() => {
                        json!({"state": "Paused"})
                    }
                    Phase::Running { .. } => json!({"state": "Running"}),
                    Phase::Finished { how, .. } => json!({"state": "Finished", "exit": how}),
                };
                Response::json(200, &v)
            }
            (m, _) => fault(
                400,
                format!("Invalid request method and/or path: {m} {}.", req.path),
            ),
        }
    }
}

/// The HTTP face of a [`VmmApi`].
pub struct ApiHandler(pub Arc<VmmApi>);

/// Largest request body, as Firecracker's API server (`MAX_PAYLOAD_SIZE`): checked from
/// Content-Length before the body is read.
pub const MAX_PAYLOAD: u64 = 51_200;

impl Handler for ApiHandler {
    fn handle(&self, req: Request) -> Reply {
        Reply::Response(self.0.handle_req(&req))
    }

    fn admit(&self, _req: &Request, body_len: u64) -> Option<Response> {
        (body_len > MAX_PAYLOAD).then(|| {
            fault(
                400,
                format!(
                    "Request payload with size {body_len} is larger than the limit of \
                     {MAX_PAYLOAD} allowed by server."
                ),
            )
        })
    }
}

/// Binds `path` and serves the API on a background thread.
pub fn spawn(path: &std::path::Path, api: Arc<VmmApi>) -> std::io::Result<()> {
    let listener = super::http::bind(path)?;
    std::thread::Builder::new()
        .name("vmm-api".into())
        .spawn(move || super::http::serve(listener, Arc::new(ApiHandler(api)), fault))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str, body: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            body: body.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    fn msg(r: &Response) -> String {
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        v["fault_message"].as_str().unwrap().to_string()
    }

    #[test]
    fn preboot_requests_build_a_config() {
        let api = VmmApi::new_preboot(SerialConfig::Null, crate::config::Accel::Auto);
        let exe = std::env::current_exe().unwrap();
        let boot = format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}}"#,
            exe.display()
        );
        assert_eq!(
            api.handle_req(&req("PUT", "/boot-source", &boot)).status,
            204
        );
        assert_eq!(
            api.handle_req(&req(
                "PUT",
                "/machine-config",
                r#"{"vcpu_count": 2, "mem_size_mib": 256}"#
            ))
            .status,
            204
        );
        let r = api.handle_req(&req("GET", "/vm/config", ""));
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["machine-config"]["vcpu_count"], 2);
        assert_eq!(v["boot-source"]["boot_args"], "console=ttyS0");
        let drive = format!(
            r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true, "is_read_only": true}}"#,
            exe.display()
        );
        assert_eq!(
            api.handle_req(&req("PUT", "/drives/rootfs", &drive)).status,
            204
        );
        let net =
            r#"{"iface_id": "eth0", "guest_mac": "06:00:AC:10:00:02", "host_dev_name": "tap0"}"#;
        assert_eq!(
            api.handle_req(&req("PUT", "/network-interfaces/eth0", net))
                .status,
            204
        );
        let vsock = r#"{"guest_cid": 3, "uds_path": "/tmp/v.sock"}"#;
        assert_eq!(api.handle_req(&req("PUT", "/vsock", vsock)).status, 204);
        let p = lock(&api.phase);
        let Phase::PreBoot {
            machine,
            boot,
            drives,
            nets,
            vsock,
        } = &*p
        else {
            panic!()
        };
        let c = api
            .build_config(machine, boot, drives, nets, vsock)
            .unwrap();
        let v = c.vsock.as_ref().unwrap();
        assert_eq!((v.guest_cid, v.uds_path.to_str()), (3, Some("/tmp/v.sock")));
        assert_eq!((c.cpus, c.memory_mib), (2, 256));
        assert_eq!(c.cmdline, "console=ttyS0 root=/dev/vda ro");
        assert_eq!(c.disks.len(), 1);
        assert!(c.disks[0].read_only);
        // Drives are raw, as Firecracker's: never probed (issue 22).
        assert_eq!(c.disks[0].format, Some(crate::config::DiskFormat::Raw));
        assert_eq!(c.nets[0].tap, "tap0");
    }

    #[test]
    fn bodies_over_51200_bytes_are_refused_before_they_are_read() {
        use std::io::{Read, Write};
        let dir = std::env::temp_dir().join(format!("vmm-cap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let api = VmmApi::new_preboot(SerialConfig::Null, crate::config::Accel::Auto);
        spawn(&sock, api).unwrap();
        let ask = |len: usize, body: &[u8]| {
            let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            write!(
                s,
                "PUT /machine-config HTTP/1.1\r\nConnection: close\r\nContent-Length: {len}\r\n\r\n"
            )
            .unwrap();
            s.write_all(body).unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out
        };
        // Only the head is sent: the answer comes without the server waiting for the body.
        let r = ask(51_201, b"");
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        assert!(r.contains("\"fault_message\""), "{r}");
        assert!(
            r.contains("size 51201 is larger than the limit of 51200"),
            "{r}"
        );
        let r = ask(usize::MAX, b"");
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        // At the limit the body is read and parsed (and refused for its content).
        let mut body = br#"{"vcpu_count": 1, "mem_size_mib": 128}"#.to_vec();
        body.resize(51_200, b' ');
        let r = ask(body.len(), &body);
        assert!(r.starts_with("HTTP/1.1 204"), "{r}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_requests_get_fault_messages() {
        let api = VmmApi::new_preboot(SerialConfig::Null, crate::config::Accel::Auto);
        let cases = [
            ("PUT", "/machine-config", "{", "deserializing"),
            (
                "PUT",
                "/machine-config",
                r#"{"vcpu_count": 0, "mem_size_mib": 128}"#,
                "vCPU count",
            ),
            (
                "PUT",
                "/machine-config",
                r#"{"vcpu_count": 1, "mem_size_mib": 128, "bogus": 1}"#,
                "unknown field",
            ),
            (
                "PUT",
                "/boot-source",
                r#"{"kernel_image_path": "/nonexistent"}"#,
                "cannot be opened",
            ),
            (
                "PUT",
                "/drives/rootfs",
                r#"{"drive_id": "rootfs"}"#,
                "missing field",
            ),
            (
                "PUT",
                "/drives/rootfs",
                r#"{"drive_id": "other", "path_on_host": "/x", "is_root_device": false}"#,
                "does not match",
            ),
            (
                "PUT",
                "/drives/rootfs",
                r#"{"drive_id": "rootfs", "path_on_host": "/nonexistent", "is_root_device": true}"#,
                "does not exist",
            ),
            (
                "PUT",
                "/network-interfaces/eth0",
                r#"{"iface_id": "eth0", "host_dev_name": "t", "guest_mac": "zz"}"#,
                "bad MAC",
            ),
            (
                "PUT",
                "/vsock",
                r#"{"guest_cid": 2, "uds_path": "/tmp/v.sock"}"#,
                "reserved",
            ),
            (
                "PUT",
                "/actions",
                r#"{"action_type": "SendCtrlAltDel"}"#,
                "before starting",
            ),
            ("PATCH", "/vm", r#"{"state": "Resumed"}"#, "before starting"),
            ("PATCH", "/vm", r#"{"state": "Frozen"}"#, "Invalid VM state"),
            (
                "PUT",
                "/actions",
                r#"{"action_type": "InstanceStart"}"#,
                "kernel configuration",
            ),
            (
                "PUT",
                "/actions",
                r#"{"action_type": "Explode"}"#,
                "Invalid action_type",
            ),
            ("PATCH", "/vm", r#"{"state": "Paused"}"#, "before starting"),
            ("DELETE", "/", "", "Invalid request"),
        ];
        for (m, p, b, want) in cases {
            let r = api.handle_req(&req(m, p, b));
            assert_eq!(r.status, 400, "{m} {p}");
            assert!(msg(&r).contains(want), "{m} {p}: {}", msg(&r));
        }
    }
}
