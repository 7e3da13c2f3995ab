//! The VMM's control API, compatible with Firecracker's: the paths, bodies, status codes
//! and fault messages of its swagger (`firecracker.yaml`), documented in openapi/vmm.yaml.
//!
//! Before boot, requests build an [`FcConfig`] (Firecracker's records kept as given:
//! IDs, order, defaults); `PUT /actions {"action_type": "InstanceStart"}` turns it into a
//! `VmConfig` (refusing, naming the field, what this VMM cannot honour), builds the VM
//! with `Vmm::new` and runs it on a thread. After boot only runtime requests are
//! accepted: `PATCH /vm` pauses and resumes the vCPUs (guest time keeps running, as in
//! Firecracker), and `SendCtrlAltDel` asks the guest to shut down: Firecracker presses
//! Ctrl-Alt-Del on its i8042; this VMM presses the ACPI power button (the guest's GED
//! interrupt, `PNP0C0C`), which Linux turns into KEY_POWER for its init or acpid.
//!
//! Requests are checked as Firecracker checks them, in its order: the method, path and
//! body presence; resource IDs (alphanumeric and `_`); the JSON body (unknown fields
//! refused); then the VM's phase (pre-boot only, run time only); then the content
//! (unique root drive, MACs and TAPs, vCPU and memory rules). Endpoints of the swagger
//! for devices this VMM does not have (MMDS, pmem, memory hot-plug, the balloon's free
//! page hinting) are answered 400 with a message naming the endpoint and why.
//!
//! Beyond Firecracker, for the manager: `action_type` `Stop` (end the VMM now, as
//! quitting the console does), `Reset` (reset the machine: the VM ends as when the guest
//! reboots, `vessel run` exits with its reboot status and the manager starts the domain
//! again) and `GET /vessel/status` (state and how the VM ended).

use std::path::Path;
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};

use serde::Deserialize;
use serde_json::json;

use super::access::{self, Want};
use super::fc_config::FcConfig;
use super::fc_log::{self, ApiMetrics, MetricsSink};
use super::fc_model::{
    check_id, Balloon, BalloonStatsUpdate, BalloonUpdate, CpuConfig, Drive, DriveUpdate, Entropy,
    Logger, MachineConfig, MachineConfigUpdate, Metrics, NetworkInterface, NetworkInterfaceUpdate,
    RateLimiter, Serial, Vsock,
};
use super::http::{Handler, Reply, Request, Response};
use crate::config::{SerialConfig, VmConfig};
use crate::{ExitReason, VmControl, Vmm};

/// A Firecracker-style error: a status and a fault message.
pub fn fault(status: u16, msg: impl Into<String>) -> Response {
    Response::json(status, &json!({ "fault_message": msg.into() }))
}

/// Firecracker's wording for requests in the wrong phase.
pub const NOT_BEFORE_START: &str =
    "The requested operation is not supported before starting the microVM.";
pub const NOT_AFTER_START: &str =
    "The requested operation is not supported after starting the microVM.";

/// Firecracker's balloon refusals.
const NO_BALLOON: &str = "No balloon device found.";
const BALLOON_TOO_MANY_PAGES: &str = "Amount of pages requested is too large.";

/// How often metrics are written once `/metrics` is configured (Firecracker's period).
const METRICS_PERIOD: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug, Deserialize)]
enum ActionType {
    FlushMetrics,
    InstanceStart,
    SendCtrlAltDel,
    /// Vessel: end the VMM now.
    Stop,
    /// Vessel: reset the machine.
    Reset,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Action {
    action_type: ActionType,
}

#[derive(Debug, Deserialize)]
enum VmStateName {
    Paused,
    Resumed,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmState {
    state: VmStateName,
}

#[derive(Debug)]
enum Phase {
    /// Configuring.
    PreBoot,
    Running {
        config: VmConfig,
        control: Arc<VmControl>,
        /// None only for a stand-in VM (the API's tests).
        snapshotter: Option<Arc<crate::snapshot::Snapshotter>>,
    },
    Finished {
        config: VmConfig,
        how: String,
    },
}

/// The phase and what the API has been told, under one lock.
#[derive(Debug)]
struct State {
    phase: Phase,
    fc: FcConfig,
}

impl State {
    fn preboot(&self) -> bool {
        matches!(self.phase, Phase::PreBoot)
    }
}

/// The API's state, shared between the HTTP threads and whoever runs the VM.
#[derive(Debug)]
pub struct VmmApi {
    state: Mutex<State>,
    ended: Condvar,
    /// Serial backend and accelerator for a VM started through the API (Firecracker's API
    /// has no field for either: they come from the command line; `PUT /serial` may
    /// replace the serial backend).
    serial: SerialConfig,
    accel: crate::config::Accel,
    /// What the VM thread ended with.
    result: Mutex<Option<Result<ExitReason, String>>>,
    metrics: Arc<ApiMetrics>,
    metrics_sink: Mutex<Option<Arc<MetricsSink>>>,
    /// Where InstanceStart hands the build, when a thread other than the API's builds and
    /// runs the VM ([`VmmApi::builds_elsewhere`]).
    builder: Mutex<Option<mpsc::Sender<StartRequest>>>,
    /// A migration that succeeded: this VMM ends once its answer is sent.
    migrated: Mutex<Option<Arc<crate::snapshot::Snapshotter>>>,
    /// The largest request body answered ([`MAX_PAYLOAD`] unless the command line says;
    /// Firecracker's `--http-api-max-payload-size`).
    max_payload: std::sync::atomic::AtomicU64,
    /// Whether a failed `PUT /snapshot/load` ends this VMM, as it ends Firecracker
    /// ([`VmmApi::end_after_failed_load`]).
    load_failure_ends: std::sync::atomic::AtomicBool,
    /// Why the last load failed, when that ends this VMM: it ends once the client has
    /// the answer.
    failed_load: Mutex<Option<String>>,
}

/// InstanceStart's validated configuration, for the thread that builds and runs the VM
/// (so the API's threads never open files or create VMs, and stay in their own
/// seccomp filter). Answer with [`StartRequest::started`] or [`StartRequest::failed`].
#[derive(Debug)]
pub struct StartRequest {
    pub config: VmConfig,
    /// A snapshot to restore (`PUT /snapshot/load`) instead of booting `config`, and
    /// whether its vCPUs wait paused.
    pub restore: Option<(Box<crate::snapshot::Loaded>, bool)>,
    reply: mpsc::Sender<Result<Started, String>>,
}

/// What the API keeps of a VM built elsewhere: its control and its snapshotter.
type Started = (Arc<VmControl>, Arc<crate::snapshot::Snapshotter>);

impl StartRequest {
    /// The VM is built: the API now controls it through `control`, and snapshots it with
    /// `snapshotter`.
    pub fn started(self, control: Arc<VmControl>, snapshotter: Arc<crate::snapshot::Snapshotter>) {
        let _ = self.reply.send(Ok((control, snapshotter)));
    }

    /// The VM could not be built; the API stays in its pre-boot phase.
    pub fn failed(self, why: String) {
        let _ = self.reply.send(Err(why));
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A 204 that carries Firecracker's `Deprecation` header when `deprecated` says why.
fn no_content(deprecated: Option<&str>) -> Response {
    let mut r = Response::empty(204);
    if let Some(why) = deprecated {
        tracing::warn!("{why}");
        r.headers.push(("Deprecation".into(), "true".into()));
    }
    r
}

/// What a request handler returns: the response either way.
type Answer = Result<Response, Response>;

fn parse<T: serde::de::DeserializeOwned>(req: &Request) -> Result<T, Response> {
    serde_json::from_slice(&req.body).map_err(|e| {
        fault(
            400,
            format!("An error occurred when deserializing the json body of a request: {e}."),
        )
    })
}

/// Firecracker's answer to a path it does not know.
fn bad_path(req: &Request) -> Response {
    fault(
        400,
        format!(
            "Invalid request method and/or path: {} {}.",
            req.method, req.path
        ),
    )
}

/// The checked resource ID from the path.
fn path_id<'a>(seg: &[&'a str]) -> Result<&'a str, Response> {
    let id = seg.get(1).copied().unwrap_or("");
    check_id(id).map_err(|e| fault(400, e))?;
    Ok(id)
}

fn unsupported_device(method: &str, path: &str, what: &str) -> Response {
    fault(
        400,
        format!("{method} {path}: this VMM has no {what}; the endpoint is not supported."),
    )
}

impl VmmApi {
    fn with_state(
        phase: Phase,
        fc: FcConfig,
        serial: SerialConfig,
        accel: crate::config::Accel,
    ) -> Arc<Self> {
        Arc::new(VmmApi {
            state: Mutex::new(State { phase, fc }),
            ended: Condvar::new(),
            serial,
            accel,
            result: Mutex::new(None),
            metrics: Arc::default(),
            metrics_sink: Mutex::new(None),
            builder: Mutex::new(None),
            migrated: Mutex::new(None),
            max_payload: std::sync::atomic::AtomicU64::new(MAX_PAYLOAD),
            load_failure_ends: std::sync::atomic::AtomicBool::new(false),
            failed_load: Mutex::new(None),
        })
    }

    /// From now on a `PUT /snapshot/load` that fails once its body is understood and
    /// the VMM may load (the files, the state, the build) ends this VMM with an error
    /// after the client has the answer, as Firecracker's process exits ("too dirty to
    /// recover"). Without it the VMM stays in its pre-boot phase and may load again.
    pub fn end_after_failed_load(&self) {
        self.load_failure_ends
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Ends the VM phase with `why` and lets the thread waiting for InstanceStart go
    /// ([`VmmApi::builds_elsewhere`]'s receiver sees no more requests).
    fn end_failed(&self, why: String) {
        *lock(&self.builder) = None;
        self.finish(Err(why));
    }

    /// Raises (or lowers) the largest request body the API answers, up to the HTTP
    /// layer's own limit.
    pub fn set_max_payload(&self, bytes: u64) -> Result<(), String> {
        let most = super::http::MAX_BODY as u64;
        if bytes == 0 || bytes > most {
            return Err(format!(
                "the API's payload limit must be between 1 and {most} bytes, not {bytes}"
            ));
        }
        self.max_payload
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// From now on InstanceStart sends its configuration to the returned receiver and
    /// waits for the answer, instead of building and running the VM on a thread of its
    /// own. The receiver's owner runs the VM and calls [`VmmApi::finish`].
    pub fn builds_elsewhere(&self) -> mpsc::Receiver<StartRequest> {
        let (tx, rx) = mpsc::channel();
        *lock(&self.builder) = Some(tx);
        rx
    }

    /// An API waiting for configuration and InstanceStart.
    pub fn new_preboot(serial: SerialConfig, accel: crate::config::Accel) -> Arc<Self> {
        Self::with_state(Phase::PreBoot, FcConfig::default(), serial, accel)
    }

    /// An API for a VM already started from command-line flags or a `VmConfig` file (or
    /// restored from a snapshot given on the command line).
    pub fn new_running(config: VmConfig, vmm: &Vmm) -> Arc<Self> {
        let fc = FcConfig::from_vm_config(&config);
        let (serial, accel) = (config.serial.clone(), config.accel);
        let phase = Phase::Running {
            config,
            control: vmm.control(),
            snapshotter: Some(vmm.snapshotter()),
        };
        Self::with_state(phase, fc, serial, accel)
    }

    /// For a VM restored from a snapshot on the command line: shows what the API that
    /// took the snapshot had been told (`VmSnapshot::api`), when it carries that.
    pub fn show_restored(&self, api: Option<&serde_json::Value>) {
        let mut st = lock(&self.state);
        if let (Some(_), Phase::Running { config, .. }) = (api, &st.phase) {
            let view = st.fc.restored(api, &config.clone());
            st.fc = view;
        }
    }

    /// The API of a running VM that cannot be snapshotted or migrated (a riscv64 one):
    /// its control only.
    pub fn new_running_without_snapshots(config: VmConfig, control: Arc<VmControl>) -> Arc<Self> {
        let fc = FcConfig::from_vm_config(&config);
        let (serial, accel) = (config.serial.clone(), config.accel);
        let phase = Phase::Running {
            config,
            control,
            snapshotter: None,
        };
        Self::with_state(phase, fc, serial, accel)
    }

    /// Records how the VM ended and wakes [`VmmApi::wait_finished`].
    pub fn finish(&self, r: Result<ExitReason, String>) {
        let mut st = lock(&self.state);
        let config = match &st.phase {
            Phase::Running { config, .. } | Phase::Finished { config, .. } => config.clone(),
            Phase::PreBoot => VmConfig::new(""),
        };
        let how = match &r {
            Ok(reason) => format!("{reason:?}"),
            Err(e) => format!("error: {e}"),
        };
        st.phase = Phase::Finished { config, how };
        *lock(&self.result) = Some(r);
        self.ended.notify_all();
    }

    /// Blocks until a VM started through the API has ended.
    pub fn wait_finished(&self) -> Result<ExitReason, String> {
        let mut st = lock(&self.state);
        loop {
            if matches!(st.phase, Phase::Finished { .. }) {
                return lock(&self.result)
                    .clone()
                    .unwrap_or(Err("no result".into()));
            }
            st = self.ended.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn state_name(&self) -> &'static str {
        match &lock(&self.state).phase {
            Phase::PreBoot => "Not started",
            Phase::Running { control, .. } if control.is_paused() => "Paused",
            Phase::Running { .. } => "Running",
            Phase::Finished { .. } => "Finished",
        }
    }

    /// The running VM's control handle, or the Firecracker-style refusal.
    fn control(&self) -> Result<Arc<VmControl>, Response> {
        match &lock(&self.state).phase {
            Phase::Running { control, .. } => Ok(control.clone()),
            Phase::PreBoot => Err(fault(400, NOT_BEFORE_START)),
            Phase::Finished { .. } => Err(fault(400, "The microVM is not running.")),
        }
    }

    /// Runs a control operation on the running VM: 204, or 400 with its error.
    fn with_control(
        &self,
        op: impl FnOnce(&VmControl) -> Result<(), crate::ControlError>,
    ) -> Answer {
        let c = self.control()?;
        op(&c).map_err(|e| fault(400, e.to_string()))?;
        Ok(Response::empty(204))
    }

    /// Locks the state for a pre-boot change, or answers Firecracker's refusal.
    fn preboot(&self) -> Result<MutexGuard<'_, State>, Response> {
        let st = lock(&self.state);
        if st.preboot() {
            Ok(st)
        } else {
            Err(fault(400, NOT_AFTER_START))
        }
    }

    fn instance_start(self: &Arc<Self>) -> Answer {
        let mut st = self.preboot()?;
        let start_err = |e: String| fault(400, format!("Start microvm error: {e}"));
        let config = st
            .fc
            .to_vm_config(&self.serial, self.accel)
            .map_err(|e| start_err(e.to_string()))?;
        config.validate().map_err(|e| start_err(e.to_string()))?;
        let builder = lock(&self.builder).clone();
        if let Some(builder) = builder {
            let (reply, answer) = mpsc::channel();
            let gone = || "the VMM's main thread is gone".to_string();
            builder
                .send(StartRequest {
                    config: config.clone(),
                    restore: None,
                    reply,
                })
                .map_err(|_| start_err(gone()))?;
            let (control, snapshotter) = answer
                .recv()
                .unwrap_or_else(|_| Err(gone()))
                .map_err(start_err)?;
            st.phase = Phase::Running {
                config,
                control,
                snapshotter: Some(snapshotter),
            };
            return Ok(Response::empty(204));
        }
        let vmm = Vmm::new(config.clone()).map_err(|e| start_err(e.to_string()))?;
        self.start(st, config, vmm)
            .map_err(|e| start_err(e.to_string()))
    }

    /// Runs `vmm` on a thread of its own; the API serves it from now on.
    fn start(
        self: &Arc<Self>,
        mut st: MutexGuard<'_, State>,
        config: VmConfig,
        vmm: Vmm,
    ) -> Result<Response, std::io::Error> {
        let exit = vmm.exit_signal();
        st.phase = Phase::Running {
            config,
            control: vmm.control(),
            snapshotter: Some(vmm.snapshotter()),
        };
        drop(st);
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("vm".into())
            .spawn(move || me.finish(vmm.run().map_err(|e| e.to_string())));
        if let Err(e) = spawned {
            exit.request(ExitReason::Error);
            self.finish(Err(e.to_string()));
            return Err(e);
        }
        Ok(Response::empty(204))
    }

    /// The running VM's snapshotter, told the configuration the VM runs with now and
    /// what this API was told (IDs, PATCHes), which a snapshot or a migration carries
    /// ([`crate::snapshot::Snapshotter::set_live`]). Err(None): the VM has none.
    fn live_snapshotter(&self) -> Result<Arc<crate::snapshot::Snapshotter>, Option<Response>> {
        let st = lock(&self.state);
        match &st.phase {
            Phase::Running {
                snapshotter: Some(s),
                config,
                ..
            } => {
                let api = serde_json::to_value(&st.fc).unwrap_or(serde_json::Value::Null);
                s.set_live(config, api);
                Ok(s.clone())
            }
            Phase::Running { .. } => Err(None),
            Phase::PreBoot => Err(Some(fault(400, NOT_BEFORE_START))),
            Phase::Finished { .. } => Err(Some(fault(400, "The microVM is not running."))),
        }
    }

    /// `PUT /snapshot/create`: the paused VM's state and memory into two files.
    fn snapshot_create(&self, req: &Request) -> Answer {
        let params: super::snapshot::SnapshotCreateParams = parse(req)?;
        let kind = params.check().map_err(|msg| fault(400, msg))?;
        for p in [&params.snapshot_path, &params.mem_file_path] {
            access::check(p, req.peer.as_ref(), Want::Create)
                .map_err(|e| fault(400, format!("Failed to create the snapshot: {e}")))?;
        }
        let snapshotter = self
            .live_snapshotter()
            .map_err(|e| e.unwrap_or_else(|| fault(400, "This VM cannot be snapshotted.")))?;
        snapshotter
            .create(&params.snapshot_path, &params.mem_file_path, kind)
            .map_err(|e| fault(400, format!("Failed to create the snapshot: {e}")))?;
        Ok(Response::empty(204))
    }

    /// `PUT /migration/send`: the running (or paused) VM moves to the VMM waiting at
    /// `destination_url`; the answer reports the rounds, downtime and total time, and this
    /// VMM ends after sending it. On failure the VM goes on here.
    fn migration_send(&self, req: &Request) -> Answer {
        let params: super::migration::MigrationSendParams = parse(req)?;
        let (to, limits) = params
            .check()
            .map_err(|e| fault(400, format!("Failed to migrate: {e}")))?;
        let snapshotter = self
            .live_snapshotter()
            .map_err(|e| e.unwrap_or_else(|| fault(400, "This VM cannot be migrated.")))?;
        let report = snapshotter
            .migrate(&to, limits)
            .map_err(|e| fault(400, format!("Failed to migrate: {e}")))?;
        *lock(&self.migrated) = Some(snapshotter);
        Ok(Response::json(200, &json!(report)))
    }

    /// `PUT /snapshot/load`: a VM restored from a snapshot instead of booted; it runs at
    /// once with `resume_vm`, else it waits paused for `PATCH /vm`.
    fn snapshot_load(self: &Arc<Self>, req: &Request) -> Answer {
        let params: super::snapshot::SnapshotLoadParams = parse(req)?;
        // Firecracker marks a body with the deprecated field on every answer, refusals
        // included.
        let Some(why) = params.deprecated() else {
            return self.load_snapshot_as(req, &params);
        };
        tracing::warn!("{why}");
        let mark = |mut r: Response| {
            r.headers.push(("Deprecation".into(), "true".into()));
            r
        };
        self.load_snapshot_as(req, &params).map(mark).map_err(mark)
    }

    fn load_snapshot_as(
        self: &Arc<Self>,
        req: &Request,
        params: &super::snapshot::SnapshotLoadParams,
    ) -> Answer {
        let mem = params.mem_path().map_err(|msg| fault(400, msg))?;
        let st = lock(&self.state);
        if !st.preboot() {
            return Err(fault(
                400,
                "Loading a snapshot is not allowed after the microVM has started.",
            ));
        }
        let r = self.restore_snapshot(req, params, &mem, st);
        if let Err(resp) = &r {
            if self
                .load_failure_ends
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                let why = String::from_utf8_lossy(&resp.body).trim().to_string();
                *lock(&self.failed_load) = Some(format!("PUT /snapshot/load failed: {why}"));
            }
        }
        r
    }

    /// The part of a load past its checks of the request: its failures leave the VMM
    /// "too dirty to recover" for Firecracker ([`VmmApi::end_after_failed_load`]).
    fn restore_snapshot(
        self: &Arc<Self>,
        req: &Request,
        params: &super::snapshot::SnapshotLoadParams,
        mem: &std::path::Path,
        mut st: MutexGuard<'_, State>,
    ) -> Answer {
        let refused = |e: String| fault(400, format!("Failed to load the snapshot: {e}"));
        for p in [&params.snapshot_path, &mem.to_path_buf()] {
            access::check(p, req.peer.as_ref(), Want::Read).map_err(refused)?;
        }
        let loaded = crate::snapshot::load(&params.snapshot_path, mem)
            .map_err(|e| fault(400, format!("Failed to load the snapshot: {e}")))?;
        // The state file is the client's: the files its configuration names are too.
        access::check_config(&loaded.snapshot.config, req.peer.as_ref()).map_err(refused)?;
        let restored_view = st
            .fc
            .restored(loaded.snapshot.api.as_ref(), &loaded.snapshot.config);
        let builder = lock(&self.builder).clone();
        if let Some(builder) = builder {
            // Built on the main thread, as for InstanceStart (this thread's filter lets
            // it build nothing).
            let mut config = loaded.snapshot.config.clone();
            config.serial = self.serial.clone();
            let (reply, answer) = mpsc::channel();
            let failed = |e: String| fault(400, format!("Failed to restore the microVM: {e}"));
            let gone = || "the VMM's main thread is gone".to_string();
            builder
                .send(StartRequest {
                    config: config.clone(),
                    restore: Some((Box::new(loaded), !params.resume_vm)),
                    reply,
                })
                .map_err(|_| failed(gone()))?;
            let (control, snapshotter) = answer
                .recv()
                .unwrap_or_else(|_| Err(gone()))
                .map_err(failed)?;
            st.fc = restored_view;
            st.phase = Phase::Running {
                config,
                control,
                snapshotter: Some(snapshotter),
            };
            return Ok(Response::empty(204));
        }
        let vmm = Vmm::restore(&loaded, self.serial.clone(), self.accel)
            .map_err(|e| fault(400, format!("Failed to restore the microVM: {e}")))?;
        if !params.resume_vm {
            // No vCPU thread has started: this only sets the gate they find closed.
            vmm.control()
                .pause()
                .map_err(|e| fault(400, format!("Failed to restore the microVM paused: {e}")))?;
        }
        let mut config = loaded.snapshot.config;
        config.serial = self.serial.clone();
        st.fc = restored_view;
        self.start(st, config, vmm)
            .map_err(|e| fault(400, format!("Failed to restore the microVM: {e}")))
    }

    fn put_actions(self: &Arc<Self>, req: &Request) -> Answer {
        let a: Action = parse(req)?;
        match a.action_type {
            ActionType::InstanceStart => self.instance_start(),
            // The guest-shutdown request: the ACPI power button.
            ActionType::SendCtrlAltDel => self.with_control(VmControl::press_power_button),
            ActionType::FlushMetrics => {
                self.control()?;
                // As Firecracker: with no metrics file configured there is nothing to do.
                self.flush_metrics()
                    .map_err(|e| fault(400, format!("Internal VMM error: {e}")))?;
                Ok(Response::empty(204))
            }
            ActionType::Stop => self.with_control(VmControl::stop),
            ActionType::Reset => self.with_control(VmControl::reset),
        }
    }

    fn put_boot_source(&self, req: &Request) -> Answer {
        let b: super::fc_model::BootSource = parse(req)?;
        let mut st = self.preboot()?;
        let err = |m: String| fault(400, format!("Boot source error: {m}"));
        for p in std::iter::once(&b.kernel_image_path).chain(b.initrd_path.iter()) {
            access::check(Path::new(p), req.peer.as_ref(), Want::Read).map_err(err)?;
        }
        std::fs::File::open(&b.kernel_image_path)
            .map_err(|e| err(format!("The kernel file cannot be opened: {e}")))?;
        if !std::path::Path::new(&b.kernel_image_path).is_file() {
            return Err(err(format!(
                "The kernel file cannot be opened: {} is not a file",
                b.kernel_image_path
            )));
        }
        if let Some(i) = &b.initrd_path {
            std::fs::File::open(i).map_err(|e| {
                err(format!(
                    "The initrd file cannot be opened due to invalid path or invalid \
                     permissions. {e}"
                ))
            })?;
        }
        st.fc.boot = Some(b);
        Ok(Response::empty(204))
    }

    fn put_machine_config(&self, req: &Request) -> Answer {
        let m: MachineConfig = parse(req)?;
        let deprecated = m.cpu_template.is_some();
        let mut st = self.preboot()?;
        // A PUT replaces the whole machine configuration: what it leaves out is default.
        let update = MachineConfigUpdate {
            vcpu_count: Some(m.vcpu_count),
            mem_size_mib: Some(m.mem_size_mib),
            smt: Some(m.smt),
            cpu_template: m.cpu_template,
            track_dirty_pages: Some(m.track_dirty_pages),
            huge_pages: Some(m.huge_pages),
        };
        st.fc.machine = MachineConfig::default()
            .updated(&update)
            .map_err(|e| fault(400, format!("Machine config error: {e}")))?;
        if deprecated {
            self.metrics.deprecated();
        }
        Ok(no_content(deprecated.then_some(
            "PUT /machine-config: cpu_template field is deprecated.",
        )))
    }

    fn patch_machine_config(&self, req: &Request) -> Answer {
        let u: MachineConfigUpdate = parse(req)?;
        if u.is_empty() {
            return Err(fault(400, "Empty PATCH request."));
        }
        let mut st = self.preboot()?;
        st.fc.machine = st
            .fc
            .machine
            .updated(&u)
            .map_err(|e| fault(400, format!("Machine config error: {e}")))?;
        let deprecated = u.cpu_template.is_some();
        if deprecated {
            self.metrics.deprecated();
        }
        Ok(no_content(deprecated.then_some(
            "PATCH /machine-config: cpu_template field is deprecated.",
        )))
    }

    fn put_drive(&self, req: &Request, seg: &[&str]) -> Answer {
        let id = path_id(seg)?;
        let mut d: Drive = parse(req)?;
        if d.drive_id != id {
            return Err(fault(
                400,
                "The id from the path does not match the id from the body!",
            ));
        }
        if let Some(p) = &d.path_on_host {
            let want = if d.is_read_only.unwrap_or(false) {
                Want::Read
            } else {
                Want::ReadWrite
            };
            access::check(Path::new(p), req.peer.as_ref(), want)
                .map_err(|e| fault(400, format!("Drive config error: {e}")))?;
        }
        let mut st = self.preboot()?;
        d.rate_limiter = RateLimiter::normalized(d.rate_limiter);
        st.fc
            .insert_drive(d)
            .map_err(|e| fault(400, format!("Drive config error: {e}")))?;
        Ok(Response::empty(204))
    }

    fn patch_drive(&self, req: &Request, seg: &[&str]) -> Answer {
        let id = path_id(seg)?;
        let u: DriveUpdate = parse(req)?;
        if u.drive_id != id {
            return Err(fault(
                400,
                "The id from the path does not match the id from the body!",
            ));
        }
        let err = |m: String| {
            fault(
                400,
                format!(
                    "Drive config error: Unable to patch the block device: {m} Please verify \
                     the request arguments."
                ),
            )
        };
        let control = self.control()?;
        let mut st = lock(&self.state);
        let Some(index) = st.fc.disk_index(&u.drive_id) else {
            return Err(err(format!("No drive with ID {}.", u.drive_id)));
        };
        if u.path_on_host.is_none() && u.rate_limiter.is_none() {
            return Err(err("Running method expected different backend.".into()));
        }
        if let Some(p) = &u.path_on_host {
            let read_only = st
                .fc
                .drives
                .iter()
                .find(|d| d.drive_id == u.drive_id)
                .is_some_and(|d| d.is_read_only.unwrap_or(false));
            let want = if read_only {
                Want::Read
            } else {
                Want::ReadWrite
            };
            access::check(Path::new(p), req.peer.as_ref(), want).map_err(&err)?;
            // The file's own error first, in Firecracker's words.
            if let Err(e) = std::fs::File::open(p) {
                return Err(err(format!("Error manipulating the backing file: {e} {p}")));
            }
            control
                .devices()
                .replace_disk(index, p)
                .map_err(|e| err(e.to_string()))?;
        }
        if let Some(r) = &u.rate_limiter {
            control
                .devices()
                .update_disk_limiter(index, r)
                .map_err(|e| err(e.to_string()))?;
        }
        let State { phase, fc } = &mut *st;
        if let Some(d) = fc.drives.iter_mut().find(|d| d.drive_id == u.drive_id) {
            if let Some(p) = &u.path_on_host {
                d.path_on_host = Some(p.clone());
            }
            d.rate_limiter = RateLimiter::patched(d.rate_limiter, u.rate_limiter);
            if let Phase::Running { config, .. } = phase {
                if let Some(disk) = config.disks.get_mut(index) {
                    if let Some(p) = &u.path_on_host {
                        disk.path = p.into();
                        // Reopened by the new name: the inherited files are not it.
                        disk.fds.clear();
                    }
                    disk.rate_limiter = d.rate_limiter;
                }
            }
        }
        Ok(Response::empty(204))
    }

    fn put_net(&self, req: &Request, seg: &[&str]) -> Answer {
        let id = path_id(seg)?;
        let mut n: NetworkInterface = parse(req)?;
        if n.iface_id != id {
            return Err(fault(
                400,
                format!(
                    "The id from the path [{id}] does not match the id from the body [{}]!",
                    n.iface_id
                ),
            ));
        }
        let mut st = self.preboot()?;
        n.rx_rate_limiter = RateLimiter::normalized(n.rx_rate_limiter);
        n.tx_rate_limiter = RateLimiter::normalized(n.tx_rate_limiter);
        st.fc
            .insert_net(n)
            .map_err(|e| fault(400, format!("Network config error: {e}")))?;
        Ok(Response::empty(204))
    }

    fn patch_net(&self, req: &Request, seg: &[&str]) -> Answer {
        let id = path_id(seg)?;
        let u: NetworkInterfaceUpdate = parse(req)?;
        if u.iface_id != id {
            return Err(fault(
                400,
                format!(
                    "The id from the path [{id}] does not match the id from the body [{}]!",
                    u.iface_id
                ),
            ));
        }
        let control = self.control()?;
        let mut st = lock(&self.state);
        let Some(index) = st.fc.nets.iter().position(|n| n.iface_id == u.iface_id) else {
            return Err(fault(
                400,
                format!(
                    "Network config error: Unable to update the net device: no interface \
                     with ID {}.",
                    u.iface_id
                ),
            ));
        };
        control
            .devices()
            .update_net_limiters(
                index,
                u.rx_rate_limiter.as_ref(),
                u.tx_rate_limiter.as_ref(),
            )
            .map_err(|e| {
                fault(
                    400,
                    format!("Network config error: Unable to update the net device: {e}"),
                )
            })?;
        let State { phase, fc } = &mut *st;
        if let Some(n) = fc.nets.get_mut(index) {
            n.rx_rate_limiter = RateLimiter::patched(n.rx_rate_limiter, u.rx_rate_limiter);
            n.tx_rate_limiter = RateLimiter::patched(n.tx_rate_limiter, u.tx_rate_limiter);
            if let Phase::Running { config, .. } = phase {
                if let Some(c) = config.nets.get_mut(index) {
                    c.rx_rate_limiter = n.rx_rate_limiter;
                    c.tx_rate_limiter = n.tx_rate_limiter;
                }
            }
        }
        Ok(Response::empty(204))
    }

    fn put_vsock(&self, req: &Request) -> Answer {
        let v: Vsock = parse(req)?;
        let mut st = self.preboot()?;
        // The same rules as --vsock: CIDs 0-2 and VMADDR_CID_ANY are reserved.
        if v.guest_cid < 3 || v.guest_cid == u32::MAX {
            return Err(fault(
                400,
                format!(
                    "Vsock config error: Invalid vsock guest_cid {}: it is reserved (use 3 or \
                     more).",
                    v.guest_cid
                ),
            ));
        }
        if v.uds_path.is_empty() {
            return Err(fault(
                400,
                "Vsock config error: Invalid vsock uds_path: it is empty.",
            ));
        }
        access::check(Path::new(&v.uds_path), req.peer.as_ref(), Want::Create)
            .map_err(|e| fault(400, format!("Vsock config error: {e}")))?;
        let deprecated = v.vsock_id.is_some();
        st.fc.vsock = Some(v);
        if deprecated {
            self.metrics.deprecated();
        }
        Ok(no_content(
            deprecated.then_some("PUT /vsock: vsock_id field is deprecated."),
        ))
    }

    fn put_entropy(&self, req: &Request) -> Answer {
        let mut e: Entropy = parse(req)?;
        let mut st = self.preboot()?;
        e.rate_limiter = RateLimiter::normalized(e.rate_limiter);
        st.fc.entropy = Some(e);
        Ok(Response::empty(204))
    }

    fn put_balloon(&self, req: &Request) -> Answer {
        let b: Balloon = parse(req)?;
        let mut st = self.preboot()?;
        if b.free_page_hinting || b.free_page_reporting {
            return Err(fault(
                400,
                "PUT /balloon: free_page_hinting and free_page_reporting are not supported by \
                 this VMM's balloon (inflate, deflate, deflate_on_oom and statistics are).",
            ));
        }
        if b.amount_mib.checked_mul(256).is_none() {
            return Err(fault(400, BALLOON_TOO_MANY_PAGES));
        }
        st.fc.balloon = Some(b);
        Ok(Response::empty(204))
    }

    /// `PATCH /balloon`: a new target, before boot or (told to the guest) after.
    fn patch_balloon(&self, req: &Request) -> Answer {
        let u: BalloonUpdate = parse(req)?;
        let mut st = lock(&self.state);
        if st.fc.balloon.is_none() {
            return Err(fault(400, NO_BALLOON));
        }
        if u.amount_mib.checked_mul(256).is_none() {
            return Err(fault(400, BALLOON_TOO_MANY_PAGES));
        }
        let memory = st.fc.machine.mem_size_mib;
        match &mut st.phase {
            Phase::PreBoot => {}
            Phase::Running {
                control, config, ..
            } => {
                if u64::from(u.amount_mib) > memory {
                    return Err(fault(
                        400,
                        format!("Requested memory should be less than {memory}MiB"),
                    ));
                }
                control
                    .devices()
                    .set_balloon_target(u.amount_mib)
                    .map_err(|e| fault(400, e.to_string()))?;
                if let Some(b) = config.balloon.as_mut() {
                    b.amount_mib = u.amount_mib;
                }
            }
            Phase::Finished { .. } => return Err(fault(400, "The microVM is not running.")),
        }
        if let Some(b) = st.fc.balloon.as_mut() {
            b.amount_mib = u.amount_mib;
        }
        Ok(Response::empty(204))
    }

    /// `PATCH /balloon/statistics`: a new polling interval; statistics cannot be turned
    /// on or off after boot (the stats queue exists or not).
    fn patch_balloon_stats(&self, req: &Request) -> Answer {
        let u: BalloonStatsUpdate = parse(req)?;
        let mut st = lock(&self.state);
        let Some(now) = st.fc.balloon.as_ref().map(|b| b.stats_polling_interval_s) else {
            return Err(fault(400, NO_BALLOON));
        };
        match &st.phase {
            Phase::PreBoot => {}
            Phase::Running { control, .. } => {
                if (now == 0) != (u.stats_polling_interval_s == 0) {
                    return Err(fault(
                        400,
                        "Statistics cannot be enabled/disabled after activation.",
                    ));
                }
                control
                    .devices()
                    .set_balloon_interval(u.stats_polling_interval_s)
                    .map_err(|e| fault(400, e.to_string()))?;
            }
            Phase::Finished { .. } => return Err(fault(400, "The microVM is not running.")),
        }
        if let Some(b) = st.fc.balloon.as_mut() {
            b.stats_polling_interval_s = u.stats_polling_interval_s;
        }
        Ok(Response::empty(204))
    }

    fn get_balloon(&self) -> Answer {
        match &lock(&self.state).fc.balloon {
            Some(b) => Ok(Response::json(200, &json!(b))),
            None => Err(fault(400, NO_BALLOON)),
        }
    }

    /// `GET /balloon/statistics`: the balloon's size from its config space and the
    /// guest's last figures, with Firecracker's field names.
    fn get_balloon_stats(&self) -> Answer {
        let st = lock(&self.state);
        let control = match &st.phase {
            Phase::Running { control, .. } => control.clone(),
            Phase::PreBoot => return Err(fault(400, NOT_BEFORE_START)),
            Phase::Finished { .. } => return Err(fault(400, "The microVM is not running.")),
        };
        match &st.fc.balloon {
            None => return Err(fault(400, NO_BALLOON)),
            Some(b) if b.stats_polling_interval_s == 0 => {
                return Err(fault(400, "Received stats query when stats are disabled."))
            }
            Some(_) => {}
        }
        drop(st);
        let s = control
            .devices()
            .balloon_stats()
            .map_err(|e| fault(400, e.to_string()))?;
        let mut v = json!({
            "target_pages": s.target_pages,
            "actual_pages": s.actual_pages,
            "target_mib": s.target_pages / 256,
            "actual_mib": s.actual_pages / 256,
        });
        for (name, value) in virtio::balloon::STAT_NAMES.iter().zip(s.values) {
            if let Some(x) = value {
                v[*name] = json!(x);
            }
        }
        Ok(Response::json(200, &v))
    }

    fn put_serial(&self, req: &Request) -> Answer {
        let s: Serial = parse(req)?;
        let mut st = self.preboot()?;
        st.fc.serial = Some(s);
        Ok(Response::empty(204))
    }

    fn put_logger(&self, req: &Request) -> Answer {
        let l: Logger = parse(req)?;
        let mut st = self.preboot()?;
        if let Some(p) = &l.log_path {
            access::check(p, req.peer.as_ref(), Want::Create)
                .map_err(|e| fault(400, format!("Logger error: {e}")))?;
        }
        fc_log::configure_logger(&l).map_err(|e| fault(400, format!("Logger error: {e}")))?;
        st.fc.logger = Some(l);
        Ok(Response::empty(204))
    }

    /// Writes a metrics line, when `/metrics` named a file.
    fn flush_metrics(&self) -> Result<(), String> {
        let Some(sink) = lock(&self.metrics_sink).clone() else {
            return Ok(());
        };
        let devices = match &lock(&self.state).phase {
            Phase::Running { control, .. } => Some(control.devices().totals()),
            _ => None,
        };
        sink.flush(&self.metrics, devices)
    }

    fn put_metrics(self: &Arc<Self>, req: &Request) -> Answer {
        let m: Metrics = parse(req)?;
        let mut st = self.preboot()?;
        access::check(&m.metrics_path, req.peer.as_ref(), Want::Create).map_err(|e| {
            fault(
                400,
                format!(
                    "Metrics error: Cannot initialize the metrics system due to bad user                      input: {e}"
                ),
            )
        })?;
        let mut sink = lock(&self.metrics_sink);
        if sink.is_some() {
            return Err(fault(
                400,
                "Metrics error: Reinitialization of metrics not allowed.",
            ));
        }
        let s = MetricsSink::open(m.clone()).map_err(|e| {
            fault(
                400,
                format!(
                    "Metrics error: Cannot initialize the metrics system due to bad user \
                     input: {e}"
                ),
            )
        })?;
        let me = Arc::downgrade(self);
        fc_log::flush_periodically(METRICS_PERIOD, move || {
            let Some(api) = me.upgrade() else {
                return false;
            };
            if let Err(e) = api.flush_metrics() {
                tracing::warn!("writing metrics: {e}");
            }
            true
        });
        *sink = Some(s);
        st.fc.metrics = Some(m);
        Ok(Response::empty(204))
    }

    fn put_cpu_config(&self, req: &Request) -> Answer {
        let c: CpuConfig = parse(req)?;
        let mut st = self.preboot()?;
        c.check()
            .map_err(|e| fault(400, format!("Configure CPU error: {e}")))?;
        st.fc.cpu_config = Some(c);
        Ok(Response::empty(204))
    }

    fn patch_vm(&self, req: &Request) -> Answer {
        let s: VmState = parse(req)?;
        match s.state {
            VmStateName::Paused => self.with_control(VmControl::pause),
            VmStateName::Resumed => self.with_control(VmControl::resume),
        }
    }

    /// Devices of Firecracker's swagger this VMM does not have. A PATCH or a GET of
    /// run-time state before boot gets Firecracker's pre-boot refusal first.
    fn absent_device(&self, req: &Request, first: &str) -> Response {
        let what = match first {
            "balloon" => "free page hinting on its virtio-balloon device",
            "mmds" => "microVM metadata service (MMDS)",
            "pmem" => "virtio-pmem device",
            _ => "virtio-mem device (memory hot-plug)",
        };
        let runtime_only = req.method == "PATCH"
            || req.method == "DELETE"
            || (req.method == "GET" && first != "mmds");
        if runtime_only && lock(&self.state).preboot() {
            return fault(400, NOT_BEFORE_START);
        }
        unsupported_device(&req.method, &req.path, what)
    }

    fn get_instance_info(&self) -> Response {
        Response::json(
            200,
            &json!({
                "id": fc_log::INSTANCE_ID,
                "state": self.state_name(),
                "vmm_version": env!("CARGO_PKG_VERSION"),
                "app_name": "vessel",
            }),
        )
    }

    fn get_status(&self) -> Response {
        let v = match &lock(&self.state).phase {
            Phase::PreBoot => json!({"state": "Not started"}),
            Phase::Running { control, .. } if control.is_paused() => json!({"state": "Paused"}),
            Phase::Running { .. } => json!({"state": "Running"}),
            Phase::Finished { how, .. } => json!({"state": "Finished", "exit": how}),
        };
        Response::json(200, &v)
    }

    /// Routes one request (Firecracker's `ParsedRequest::try_from` order: method, path,
    /// body presence; then the handler's checks).
    fn route(self: &Arc<Self>, req: &Request) -> Answer {
        let seg = req.segments();
        let first = seg.first().copied().unwrap_or("");
        let body = !req.body.is_empty();
        match (req.method.as_str(), first, body) {
            ("GET", "", false) => Ok(self.get_instance_info()),
            ("GET", "version", false) => Ok(Response::json(
                200,
                &json!({"firecracker_version": env!("CARGO_PKG_VERSION")}),
            )),
            ("GET", "vm", false) if seg.get(1) == Some(&"config") => {
                Ok(Response::json(200, &lock(&self.state).fc.full()))
            }
            ("GET", "machine-config", false) => {
                Ok(Response::json(200, &json!(lock(&self.state).fc.machine)))
            }
            ("GET", "vessel", false) if seg.get(1) == Some(&"status") => Ok(self.get_status()),
            ("GET", "vessel", false) if seg.get(1) == Some(&"counters") => {
                let totals = match &lock(&self.state).phase {
                    Phase::Running { control, .. } => Some(control.devices().totals()),
                    _ => None,
                };
                Ok(Response::json(
                    200,
                    &super::counters::to_json(totals.as_ref()),
                ))
            }
            ("GET", "balloon", false) => match seg.get(1) {
                None => self.get_balloon(),
                Some(&"statistics") if seg.len() == 2 => self.get_balloon_stats(),
                Some(&"hinting") => Err(self.absent_device(req, first)),
                _ => Err(bad_path(req)),
            },
            ("GET", "mmds", false) => Err(self.absent_device(req, first)),
            ("GET", "hotplug", false) if seg.get(1) == Some(&"memory") => {
                Err(self.absent_device(req, first))
            }
            ("GET", _, true) => Err(fault(400, "GET request cannot have a body.")),
            ("PUT", "actions", true) => self.put_actions(req),
            ("PUT", "boot-source", true) => self.put_boot_source(req),
            ("PUT", "cpu-config", true) => self.put_cpu_config(req),
            ("PUT", "drives", true) => self.put_drive(req, &seg),
            ("PUT", "logger", true) => self.put_logger(req),
            ("PUT", "serial", true) => self.put_serial(req),
            ("PUT", "machine-config", true) => self.put_machine_config(req),
            ("PUT", "metrics", true) => self.put_metrics(req),
            ("PUT", "network-interfaces", true) => self.put_net(req, &seg),
            ("PUT", "vsock", true) => self.put_vsock(req),
            ("PUT", "entropy", true) => self.put_entropy(req),
            ("PUT", "migration", true) if seg.get(1) == Some(&"send") => self.migration_send(req),
            ("PUT", "snapshot", true) => match seg.get(1) {
                Some(&"create") => self.snapshot_create(req),
                Some(&"load") => self.snapshot_load(req),
                _ => Err(fault(
                    400,
                    format!("Invalid request method and/or path: PUT {}.", req.path),
                )),
            },
            ("PUT", "balloon", true) if seg.len() == 1 => self.put_balloon(req),
            ("PUT", "mmds" | "pmem", true) => Err(self.absent_device(req, first)),
            ("PUT", "hotplug", true) if seg.get(1) == Some(&"memory") => {
                Err(self.absent_device(req, first))
            }
            ("PUT", _, false) => Err(fault(400, "Empty PUT request.")),
            ("PATCH", "drives", true) => self.patch_drive(req, &seg),
            ("PATCH", "machine-config", true) => self.patch_machine_config(req),
            ("PATCH", "network-interfaces", true) => self.patch_net(req, &seg),
            ("PATCH", "vm", true) => self.patch_vm(req),
            ("PATCH", "balloon", _) => match (seg.get(1), body) {
                (None, true) => self.patch_balloon(req),
                (Some(&"statistics"), true) if seg.len() == 2 => self.patch_balloon_stats(req),
                (Some(&"hinting"), _) => Err(self.absent_device(req, first)),
                (_, false) => Err(fault(400, "Empty PATCH request.")),
                _ => Err(bad_path(req)),
            },
            ("PATCH", "mmds" | "pmem", _) => Err(self.absent_device(req, first)),
            ("PATCH", "hotplug", true) if seg.get(1) == Some(&"memory") => {
                Err(self.absent_device(req, first))
            }
            ("PATCH", _, false) => Err(fault(400, "Empty PATCH request.")),
            ("DELETE", "drives" | "network-interfaces" | "pmem", false) => {
                path_id(&seg)?;
                self.control()?;
                Err(fault(
                    400,
                    format!(
                        "DELETE {}: hot-unplugging devices is not supported by this VMM.",
                        req.path
                    ),
                ))
            }
            ("DELETE", _, true) => Err(fault(400, "Empty Delete request.")),
            (m, path, _) => Err(fault(
                400,
                format!("Invalid request method and/or path: {m} {path}."),
            )),
        }
    }

    fn handle_req(self: &Arc<Self>, req: &Request) -> Response {
        tracing::info!(
            "The API server received a {} request on {:?}.",
            req.method,
            req.path
        );
        let r = self.route(req).unwrap_or_else(|e| e);
        let first = req.segments().first().copied().unwrap_or("");
        self.metrics.record(&req.method, first, r.status >= 400);
        if r.status >= 400 {
            tracing::info!(
                "Received Error. Status code: {}. Message: {}",
                r.status,
                String::from_utf8_lossy(&r.body).trim()
            );
        }
        r
    }
}

/// The HTTP face of a [`VmmApi`].
pub struct ApiHandler(pub Arc<VmmApi>);

/// Largest request body, as Firecracker's API server (`MAX_PAYLOAD_SIZE`): checked from
/// Content-Length before the body is read.
pub const MAX_PAYLOAD: u64 = 51_200;

impl Handler for ApiHandler {
    fn handle(&self, req: Request) -> Reply {
        // A connection's thread may predate the VM (served before InstanceStart): from
        // the first request after the build, its KVM requests are held to the VM's
        // descriptors too.
        sandbox::catch_up(sandbox::Role::Api);
        let resp = self.0.handle_req(&req);
        if let Some(why) = lock(&self.0.failed_load).take() {
            // A failed load ends this VMM (as Firecracker) once the client has the answer.
            let api = self.0.clone();
            return Reply::Upgrade(resp, Box::new(move |_| api.end_failed(why)));
        }
        match lock(&self.0.migrated).take() {
            // The VM runs elsewhere now: this VMM ends once the client has the report.
            Some(s) => Reply::Upgrade(resp, Box::new(move |_| s.finish_migration())),
            None => Reply::Response(resp),
        }
    }

    fn admit(&self, _req: &Request, body_len: u64) -> Option<Response> {
        let limit = self
            .0
            .max_payload
            .load(std::sync::atomic::Ordering::Relaxed);
        (body_len > limit).then(|| {
            fault(
                400,
                format!(
                    "Request payload with size {body_len} is larger than the limit of \
                     {limit} allowed by server."
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
        .spawn(move || {
            sandbox::enter(sandbox::Role::Api);
            super::http::serve(listener, Arc::new(ApiHandler(api)), fault)
        })?;
    Ok(())
}

#[cfg(test)]
#[path = "fc_tests.rs"]
mod tests;
