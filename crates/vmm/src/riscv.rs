//! riscv64 guests: a `VmConfig` with `arch: riscv64` runs on Vessel's RISC-V CPU
//! (`rv64emu`) on its `virt`-like machine, in the foreground. What that machine does not
//! have yet is refused by name rather than ignored.

use crate::config::{Accel, ConfigError, SerialConfig, VmConfig};
use devices::ExitReason;
use rv64emu::virt::{DiskSpec, VirtConfig, VirtExit, VirtioSpec};
use std::path::PathBuf;

/// Debian's OpenSBI (package `opensbi`), the default M-mode firmware.
pub const DEFAULT_OPENSBI: &str = "/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin";

#[derive(Debug, thiserror::Error)]
pub enum RiscvError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("riscv64 guests do not have {0} yet")]
    Unsupported(&'static str),
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
}

/// Runs `config` to its end; returns how it ended and a line naming the CPU.
pub fn run(config: &VmConfig) -> Result<(ExitReason, String), RiscvError> {
    // `firmware` is x86's BIOS to validate(); here it is the M-mode firmware, which
    // boots the kernel and is checked below.
    let mut checked = config.clone();
    checked.firmware = None;
    checked.validate()?;
    match config.accel {
        Accel::Auto | Accel::Emu => {}
        other => return Err(RiscvError::Accel(other)),
    }
    if config.cpus != 1 {
        return Err(RiscvError::Unsupported("more than one hart"));
    }
    if config.vsock.is_some() {
        return Err(RiscvError::Unsupported("vsock"));
    }
    if config.virtio_console.is_some() || config.cloud_init.is_some() {
        return Err(RiscvError::Unsupported("virtio-console or cloud-init"));
    }
    if config.nets.iter().any(|n| n.transport.is_some()) {
        return Err(RiscvError::Unsupported(
            "a network transport choice (virtio-mmio only)",
        ));
    }
    if config.disks.iter().any(|d| d.format.is_some()) {
        return Err(RiscvError::Unsupported("disk formats other than raw"));
    }
    let firmware = config
        .firmware
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_OPENSBI));
    if !firmware.is_file() {
        return Err(RiscvError::NoFirmware(firmware));
    }
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
    let devices = virtio_devices(config)?;
    let exit = rv64emu::virt::boot(VirtConfig {
        memory_mib: config.memory_mib,
        firmware,
        kernel,
        initrd: config.initrd.clone(),
        cmdline: config.cmdline.clone(),
        disks: config
            .disks
            .iter()
            .map(|d| DiskSpec {
                path: d.path.clone(),
                read_only: d.read_only,
            })
            .collect(),
        devices,
        serial_out,
        stdin,
    })?;
    let reason = match exit {
        VirtExit::Poweroff => ExitReason::PowerOff,
        VirtExit::Reset => ExitReason::Reset,
        VirtExit::Failure(code) => ExitReason::DebugExit(code),
    };
    Ok((
        reason,
        "riscv64 guest on Vessel's RISC-V CPU (rv64emu)".to_string(),
    ))
}

/// The network and entropy devices, as the x86 machine builds them (the same virtio
/// device code), for virtio-mmio slots after the disks.
fn virtio_devices(config: &VmConfig) -> Result<Vec<VirtioSpec>, RiscvError> {
    let mut out = Vec::new();
    for net in &config.nets {
        let mac = match net.mac_bytes() {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(RiscvError::Net(net.tap.clone(), e)),
            None => virtio::net::default_mac(&net.tap),
        };
        let tap = virtio::tap::Tap::open(&net.tap)
            .map_err(|e| RiscvError::Net(net.tap.clone(), e.to_string()))?;
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
