//! riscv64 guests: a `VmConfig` with `arch: riscv64` runs on Vessel's RISC-V CPU
//! (`rv64emu`) on its `virt`-like machine, under the same [`VmControl`] as an x86 VM
//! (the control API pauses, resumes, stops and resets it; it has no power button) and
//! the same seccomp roles for its threads. What that machine does not have yet is
//! refused by name rather than ignored.

use crate::config::{Accel, ConfigError, SerialConfig, VmConfig};
use crate::control::VmControl;
use devices::{ExitReason, ExitSignal};
use rv64emu::virt::{DiskSpec, HartGate, VirtConfig, VirtioSpec};
use std::path::PathBuf;
use std::sync::Arc;

/// Debian's OpenSBI (package `opensbi`), the default M-mode firmware.
pub const DEFAULT_OPENSBI: &str = "/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin";

#[derive(Debug, thiserror::Error)]
pub enum RiscvError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("riscv64 guests do not have {0} yet")]
    Unsupported(&'static str),
    #[error(
        "{0} vCPUs: the riscv64 machine has 1 to {max} harts",
        max = rv64emu::virt::layout::MAX_HARTS
    )]
    Harts(u8),
    #[error(
        "--accel {0:?}: a riscv64 guest runs only on Vessel's RISC-V CPU (--accel auto or emu)"
    )]
    Accel(Accel),
    #[error("OpenSBI firmware {0} not found: apt-get install opensbi, or give --firmware")]
    NoFirmware(PathBuf),
    #[error("network interface {0}: {1}")]
    Net(String, String),
    #[error("opening the serial log {0}: {1}")]
    SerialFile(PathBuf, std::io::Error),
    #[error(transparent)]
    Machine(#[from] rv64emu::virt::VirtError),
    #[error("starting a thread: {0}")]
    Thread(std::io::Error),
    #[error("holding the threads' requests to the VM's descriptors")]
    PinFds(#[source] sandbox::Error),
    #[error("the hart's thread ended before the machine was built")]
    HartGone,
    #[error("waiting for the VM's end: {0}")]
    Wait(String),
}

/// The line `vessel run` prints about the CPU a riscv64 guest runs on.
pub const NOTE: &str = "riscv64 guest on Vessel's RISC-V CPU (rv64emu)";

/// Checks that the `virt`-like machine can run `config`, whose files are looked at
/// only when it starts (the manager checks a definition with it): what the machine
/// lacks is refused by name.
pub fn check(config: &VmConfig) -> Result<(), RiscvError> {
    match config.accel {
        Accel::Auto | Accel::Emu => {}
        other => return Err(RiscvError::Accel(other)),
    }
    if config.cpus == 0 || u32::from(config.cpus) > rv64emu::virt::layout::MAX_HARTS {
        return Err(RiscvError::Harts(config.cpus));
    }
    if config.vsock.is_some() {
        return Err(RiscvError::Unsupported("vsock"));
    }
    if config.virtio_console.is_some() || config.cloud_init.is_some() {
        return Err(RiscvError::Unsupported("virtio-console or cloud-init"));
    }
    if config.balloon.is_some() {
        return Err(RiscvError::Unsupported("a virtio-balloon device"));
    }
    if config.nets.iter().any(|n| n.transport.is_some()) {
        return Err(RiscvError::Unsupported(
            "a network transport choice (virtio-mmio only)",
        ));
    }
    if config.disks.iter().any(|d| d.format.is_some()) {
        return Err(RiscvError::Unsupported("disk formats other than raw"));
    }
    if config.kernel.is_none() {
        return Err(ConfigError::NothingToBoot.into());
    }
    Ok(())
}

/// The M-mode firmware `config` boots: its own, or Debian's OpenSBI.
pub fn firmware(config: &VmConfig) -> PathBuf {
    config
        .firmware
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_OPENSBI))
}

/// The name the machine (which opens its files by name) is given for `path`, a file of
/// `config` whose descriptor `fd` may have been handed over: `/proc/self/fd/N`, which
/// reopens that file, not whatever the name leads to now. In a jail, which has no
/// `/proc/self`, the held file is bound at its name instead (`vessel run --jail`), and
/// the name is what reaches it.
fn reopened(path: &std::path::Path, fd: Option<i32>) -> PathBuf {
    match fd {
        Some(fd) if std::path::Path::new("/proc/self/fd").is_dir() => {
            PathBuf::from(format!("/proc/self/fd/{fd}"))
        }
        _ => path.to_path_buf(),
    }
}

/// [`reopened`] for a boot file of `config`.
fn boot_file(config: &VmConfig, path: &std::path::Path) -> PathBuf {
    reopened(path, config.opened_file(path).map(|o| o.fd))
}

/// A checked riscv64 VM and the handle that controls it once it runs (pause, resume,
/// stop, reset: the control API's calls).
pub struct RiscvVm {
    config: VmConfig,
    control: Arc<VmControl>,
}

/// The hart's side of [`VmControl`]: the pause gate before each stint.
struct ControlGate(Arc<VmControl>);

impl HartGate for ControlGate {
    fn enter(&self) -> bool {
        self.0.enter_run().is_some()
    }
    fn leave(&self) {
        self.0.leave_run();
    }
    fn hart_thread_started(&self) {
        sandbox::enter(sandbox::Role::Vcpu);
    }
}

impl RiscvVm {
    pub fn new(config: VmConfig) -> Result<Self, RiscvError> {
        // `firmware` is x86's BIOS to validate(); here it is the M-mode firmware, which
        // boots the kernel and is checked below.
        let mut checked = config.clone();
        checked.firmware = None;
        checked.validate()?;
        check(&config)?;
        let fw = firmware(&config);
        if config.opened_file(&fw).is_none() && !fw.is_file() {
            return Err(RiscvError::NoFirmware(fw));
        }
        let control = Arc::new(VmControl::without_power_button(
            Arc::new(ExitSignal::new()),
            "riscv64 virt",
        ));
        Ok(RiscvVm { config, control })
    }

    pub fn control(&self) -> Arc<VmControl> {
        self.control.clone()
    }

    /// Runs the VM to its end, as `Vmm::run` does an x86 one: the hart on its own
    /// thread (the vCPU's seccomp filter), the devices on I/O threads, the host's stdin
    /// fed to the UART (Ctrl-A x quits on a terminal), and this thread waiting for the
    /// end or a termination signal.
    pub fn run(self) -> Result<ExitReason, RiscvError> {
        let config = &self.config;
        let (serial_out, stdin): (devices::serial::SerialOut, bool) = match &config.serial {
            SerialConfig::Stdio => (Box::new(std::io::stdout()), true),
            SerialConfig::Null => (Box::new(std::io::sink()), false),
            SerialConfig::File(p) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| RiscvError::SerialFile(p.clone(), e))?;
                (Box::new(f), false)
            }
        };
        let Some(kernel) = config.kernel.clone() else {
            return Err(ConfigError::NothingToBoot.into());
        };
        let mut tap_fds = Vec::new();
        let devices = virtio_devices(config, &mut tap_fds)?;
        let exit = self.control.exit_signal().clone();
        let machine = VirtConfig {
            memory_mib: config.memory_mib,
            harts: config.cpus.into(),
            firmware: boot_file(config, &firmware(config)),
            kernel: boot_file(config, &kernel),
            initrd: config.initrd.as_deref().map(|i| boot_file(config, i)),
            cmdline: config.cmdline.clone(),
            disks: config
                .disks
                .iter()
                .map(|d| DiskSpec {
                    path: reopened(&d.path, d.fds.first().map(|f| f.fd)),
                    read_only: d.read_only,
                })
                .collect(),
            devices,
            serial_out,
            exit: exit.clone(),
            io_gate: self.control.io_gate(),
        };
        let term = crate::vm::termination_eventfd().map_err(RiscvError::Thread)?;
        // Before the hart's and the devices' threads are confined: TAP requests only on
        // the TAPs opened above (and none of KVM's: there is no KVM here).
        sandbox::pin_fds(sandbox::VmFds {
            taps: tap_fds,
            ..Default::default()
        })
        .map_err(RiscvError::PinFds)?;
        let (built_tx, built_rx) = std::sync::mpsc::channel();
        let control = self.control.clone();
        let hart = std::thread::Builder::new()
            .name("hart0".into())
            .spawn(move || {
                // Built here, the hart's memory and caches staying on its thread, and
                // before its filter: building opens the firmware, kernel and disks.
                let machine = match rv64emu::virt::build(machine) {
                    Ok(m) => m,
                    Err(e) => {
                        let _ = built_tx.send(Err(e));
                        return;
                    }
                };
                sandbox::enter(sandbox::Role::Vcpu);
                let _ = built_tx.send(Ok(machine.uart()));
                machine.run(&ControlGate(control));
            })
            .map_err(RiscvError::Thread)?;
        let uart = match built_rx.recv() {
            Ok(Ok(uart)) => uart,
            Ok(Err(e)) => {
                // Ends the I/O threads a partly built machine started.
                exit.request(ExitReason::Error);
                self.control.release();
                let _ = hart.join();
                return Err(e.into());
            }
            Err(_) => {
                exit.request(ExitReason::Error);
                let _ = hart.join();
                return Err(RiscvError::HartGone);
            }
        };
        if stdin {
            let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
            crate::console::spawn_stdin_pump(uart, exit.clone(), interactive)
                .map_err(RiscvError::Thread)?;
        }
        // Every thread is started: from here this one only waits and tears down.
        sandbox::enter(sandbox::Role::Main);
        let reason = crate::vm::wait_for_exit(&exit, term).map_err(|e| {
            exit.request(ExitReason::Error);
            RiscvError::Wait(e.to_string())
        });
        self.control.release();
        let _ = hart.join();
        reason
    }
}

/// The network and entropy devices, as the x86 machine builds them (the same virtio
/// device code), for virtio-mmio slots after the disks. The descriptors of the TAPs it
/// opens are added to `tap_fds`.
fn virtio_devices(
    config: &VmConfig,
    tap_fds: &mut Vec<std::os::fd::RawFd>,
) -> Result<Vec<VirtioSpec>, RiscvError> {
    let mut out = Vec::new();
    for net in &config.nets {
        let mac = match net.mac_bytes() {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(RiscvError::Net(net.tap.clone(), e)),
            None => virtio::net::default_mac(&net.tap),
        };
        let tap = virtio::tap::Tap::open(&net.tap)
            .map_err(|e| RiscvError::Net(net.tap.clone(), e.to_string()))?;
        tap_fds.push(std::os::fd::AsRawFd::as_raw_fd(&tap));
        let dev = virtio::net::Net::new(tap, mac)
            .with_mtu(net.mtu)
            .with_rate_limiters(
                crate::config::RateLimiterConfig::limiter(net.rx_rate_limiter.as_ref()),
                crate::config::RateLimiterConfig::limiter(net.tx_rate_limiter.as_ref()),
            );
        let fd = dev.poll_fd().map_err(|e| {
            RiscvError::Net(
                net.tap.clone(),
                format!("duplicating the TAP descriptor: {e}"),
            )
        })?;
        out.push(VirtioSpec {
            name: format!("net-{}", net.tap),
            device: Box::new(dev),
            host_input: Some(Box::new(virtio::transport::FdInput::new(
                fd,
                virtio::net::RX_QUEUE,
            ))),
            coalesce: Some((virtio::net::TX_QUEUE, virtio::net::TX_COALESCE)),
        });
    }
    if config.rng {
        let device: Box<dyn virtio::VirtioDevice> =
            match config.rng_rate_limiter.filter(|r| r.limits()) {
                Some(r) => Box::new(virtio::rng::LimitedRng {
                    limiter: crate::config::RateLimiterConfig::limiter(Some(&r)),
                }),
                None => Box::new(virtio::rng::Rng),
            };
        out.push(VirtioSpec {
            name: "rng".into(),
            device,
            host_input: None,
            coalesce: None,
        });
    }
    Ok(out)
}
