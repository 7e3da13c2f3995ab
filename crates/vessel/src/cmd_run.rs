//! `vessel run`: build a `VmConfig` from flags and run the VMM in the foreground.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use vmm::config::{parse_memory_mib, DEFAULT_CMDLINE};
use vmm::config::{DiskConfig, NetConfig, VsockConfig};
use vmm::{Accel, ExitReason, SerialConfig, VmConfig, Vmm};

/// The flags that describe the guest machine: what `--config`, a snapshot (`--restore`)
/// and a migration's source (`--incoming`) each give instead.
const GUEST_FLAGS: [&str; 20] = [
    "arch",
    "kernel",
    "initrd",
    "firmware",
    "firmware_vars",
    "option_roms",
    "cmdline",
    "memory",
    "cpus",
    "cpu_model",
    "disks",
    "rng",
    "balloon",
    "virtio_console",
    "nets",
    "vsock",
    "virtio_transport",
    "cloud_init",
    "name",
    "uuid",
];

/// `a` then `b`, in a constant (`T` must be their total length).
const fn join<const A: usize, const B: usize, const T: usize>(
    a: [&'static str; A],
    b: [&'static str; B],
) -> [&'static str; T] {
    assert!(A + B == T);
    let mut out = [""; T];
    let mut i = 0;
    while i < T {
        out[i] = if i < A { a[i] } else { b[i - A] };
        i += 1;
    }
    out
}

/// The flags that describe the VM: `--config` gives all of that as data instead.
const CONFIG_FLAGS: [&str; 22] = join(GUEST_FLAGS, ["accel", "serial"]);

/// What a migrated VM takes from its source, not from flags (--config names the VM
/// expected, see --incoming).
const INCOMING_CONFLICTS: [&str; 22] = join(GUEST_FLAGS, ["restore", "api_only"]);

/// What a restored VM takes from its snapshot, not from flags (--config names the VM
/// expected, see --restore).
const RESTORE_CONFLICTS: [&str; 20] = GUEST_FLAGS;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The whole VM as a JSON `VmConfig` (what a manager stores for a domain), instead of
    /// the flags that describe it; the flags below it that serve the running VMM
    /// (--api-sock, --console-sock, --status-file...) still apply.
    #[arg(long, conflicts_with_all = CONFIG_FLAGS)]
    config: Option<PathBuf>,
    /// Guest architecture: x86_64, or riscv64 (Vessel's RISC-V CPU on a `virt`-like
    /// machine, OpenSBI as firmware; kernel and initramfs default to
    /// scripts/riscv-assets.sh's).
    #[arg(long, default_value = "x86_64")]
    arch: vmm::config::Arch,
    /// Kernel image: a bzImage or an ELF vmlinux (PVH when it has the Xen entry note).
    /// Without it, a first --disk with a boot sector boots through the firmware (its
    /// bootloader, kernel and initramfs); otherwise the guest assets' kernel boots
    /// (scripts/guest-assets.sh).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk. Default: the guest assets' initramfs when --kernel is not given.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Boot through this BIOS image instead of a kernel. Default, when the first --disk
    /// has a boot sector and no --kernel is given: Debian's SeaBIOS,
    /// /usr/share/seabios/bios.bin.
    /// With --kernel, the kernel boots through the firmware (give QEMU's linuxboot
    /// option ROM with --option-rom). `ovmf` (or a UEFI image's path) boots through
    /// UEFI: Debian's OVMF, /usr/share/OVMF/OVMF_CODE_4M.fd.
    #[arg(long)]
    firmware: Option<PathBuf>,
    /// UEFI firmware's variable store, kept across runs (QEMU's second pflash drive);
    /// made from the template beside the code (OVMF_VARS_4M.fd) when it does not exist.
    /// Without it, variables last for this run only.
    #[arg(long = "firmware-vars", requires = "firmware")]
    firmware_vars: Option<PathBuf>,
    /// An option ROM for the firmware to run, e.g. /usr/share/qemu/linuxboot.bin.
    #[arg(long = "option-rom", requires = "firmware")]
    option_roms: Vec<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest memory, e.g. 512M or 2G.
    #[arg(long, default_value = "512M", value_parser = parse_memory_mib)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Accelerator: auto picks what really works on this host.
    #[arg(long, default_value = "auto")]
    accel: Accel,
    /// CPU model: qemu64, x86-64-v2, x86-64-v3, or max (everything the accelerator
    /// implements on this host).
    #[arg(long = "cpu", default_value = "max")]
    cpu_model: vmm::CpuModel,
    /// Serial console: stdio, null, or file:PATH.
    #[arg(long, default_value = "stdio")]
    serial: SerialConfig,
    /// A virtio-blk disk: path[,format=raw|qcow2][,readonly][,transport=mmio|pci][,queues=N]
    /// (N request queues, QEMU's num-queues; by default one per vCPU on virtio-pci, else 1). Repeat for more disks. Without format= the disk is raw (formats are never guessed from
    /// what a guest may have written); a file with a qcow2 header then needs format=.
    #[arg(long = "disk")]
    disks: Vec<DiskConfig>,
    /// A virtio-rng device (entropy from the host's getrandom).
    #[arg(long)]
    rng: bool,
    /// A virtio-balloon device: AMOUNT_MIB[,deflate_on_oom][,stats=SECONDS] (the target
    /// the guest is asked to give back; statistics every SECONDS, 0 for none).
    #[arg(long)]
    balloon: Option<vmm::config::BalloonConfig>,
    /// A virtio-console (hvc0 in the guest) writing to stdio, null or file:PATH.
    #[arg(long)]
    virtio_console: Option<SerialConfig>,
    /// A virtio-net interface on a host TAP device:
    /// tap=NAME[,mac=52:54:00:12:34:56][,transport=mmio|pci][,queues=N] (N queue pairs on
    /// a multi-queue TAP, QEMU's queues; by default one per vCPU on virtio-pci, else 1).
    #[arg(long = "net")]
    nets: Vec<NetConfig>,
    /// A virtio-vsock device: cid=N,uds=PATH (host side on a Unix socket, Firecracker style).
    #[arg(long)]
    vsock: Option<VsockConfig>,
    /// How virtio devices attach when they do not say: mmio (windows described in ACPI,
    /// the default for direct kernel boot) or pci (virtio-pci functions with MSI-X, the
    /// default when booting through firmware, which drives only those).
    #[arg(long)]
    virtio_transport: Option<vmm::config::Transport>,
    /// cloud-init NoCloud data: user-data=FILE[,meta-data=FILE][,network-config=FILE].
    /// Attached as a read-only disk labelled cidata after the --disk ones; without
    /// meta-data, the instance-id and hostname are the VM's --name.
    #[arg(long = "cloud-init")]
    cloud_init: Option<vmm::cloud_init::CloudInitConfig>,
    /// The VM's name (a DNS label); default "vessel".
    #[arg(long)]
    name: Option<String>,
    /// The system UUID the guest reads from SMBIOS (firmware boot): dmidecode's and
    /// /sys/class/dmi/id/product_uuid's, which cloud-init and systemd use.
    #[arg(long)]
    uuid: Option<String>,
    /// Restore the VM a snapshot describes instead of booting one: a snapshot folder
    /// (holding `vmstate` and `memory`, as `PUT /snapshot/create` writes them when given
    /// those names), or a state file with --restore-mem. The console goes where --serial
    /// says; --accel, when given and not the snapshot's, restores under that accelerator
    /// from the vCPUs' registers (refused when its interrupt state cannot be carried).
    /// --config FILE names the VM expected (another is refused) and gives the files its
    /// disks use, handed over open (a manager's `fds`), instead of the names the snapshot
    /// recorded.
    #[arg(long, conflicts_with_all = RESTORE_CONFLICTS)]
    restore: Option<PathBuf>,
    /// Wait for a VM migrating in from another VMM (`PUT /migration/send` there) at
    /// unix:PATH or tcp:HOST:PORT, as QEMU's -incoming; run it once it has arrived. The
    /// VM is the source's: the flags that describe one are refused, as with --restore;
    /// --config FILE names the VM expected (one with another configuration is refused),
    /// and is what --jail needs.
    #[arg(long, conflicts_with_all = INCOMING_CONFLICTS)]
    incoming: Option<vmm::migration::Endpoint>,
    /// With --restore STATE: the snapshot's memory file.
    #[arg(long, requires = "restore")]
    restore_mem: Option<PathBuf>,
    /// Serve the Firecracker-compatible control API on this Unix socket. Without
    /// --kernel, --firmware, --config, --disk or --restore, nothing boots until the API's
    /// InstanceStart or a snapshot load (as Firecracker does).
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Build the VM with its vCPUs paused: not one guest instruction runs until the API's
    /// `PATCH /vm {"state": "Resumed"}` (`virsh start --paused`, QEMU's -S).
    #[arg(long, requires = "api_sock", conflicts_with_all = ["api_only", "incoming"])]
    paused: bool,
    /// With --api-sock: boot nothing until the API's InstanceStart, whatever else is given;
    /// a failed `PUT /snapshot/load` leaves the VMM waiting for another (without it, a VMM
    /// waiting for configuration exits after a failed load, as Firecracker does).
    #[arg(long, requires = "api_sock")]
    api_only: bool,
    /// With --api-sock: the largest request body the API answers, in bytes (default
    /// 51200, Firecracker's; its flag of the same name).
    #[arg(long, requires = "api_sock", value_name = "BYTES")]
    http_api_max_payload_size: Option<u64>,
    /// Serve the serial console (with --serial stdio) on this Unix socket instead of the
    /// terminal, for a manager to attach to.
    #[arg(long)]
    console_sock: Option<PathBuf>,
    /// With --console-sock: also append the console output to this file.
    #[arg(long, requires = "console_sock")]
    console_log: Option<PathBuf>,
    /// Write the exit status here when the VM ends, for a supervisor that is not this
    /// process's parent (a restarted manager that re-adopted it).
    #[arg(long)]
    status_file: Option<PathBuf>,
    /// What a VMM thread's forbidden system call does: trap (report it and exit with
    /// status 148), kill (the kernel kills the VMM), log (the kernel logs it and lets it
    /// run) or none (no seccomp filter: development only). Every thread also sets
    /// NoNewPrivs and drops its capabilities once the VM is built.
    #[arg(long, env = "VESSEL_SECCOMP", default_value = "trap")]
    seccomp: sandbox::Mode,
    /// Jail the VMM before it builds the VM: new mount, IPC and UTS namespaces (and a
    /// network namespace when the VM has no --net), and pivot_root into this empty
    /// folder, where only the VM's own files are bound (kernel, initrd, firmware, disks
    /// and their backing files, logs, the folders of its sockets and exit status). The
    /// manager passes it for every Vessel VMM unless its daemon runs with --no-jail.
    #[arg(long, conflicts_with = "api_only")]
    jail: Option<PathBuf>,
    /// Once the VM is built (its files open, its sockets bound), every VMM thread becomes
    /// this user (and --gid's group, with no supplementary groups). The manager passes
    /// its --vmm-uid/--vmm-gid (65534, nobody, by default) with --jail.
    #[arg(long, requires = "gid")]
    uid: Option<u32>,
    /// The group for --uid.
    #[arg(long, requires = "uid")]
    gid: Option<u32>,
    /// With --jail: a resource limit for the VMM (soft and hard), named as Firecracker's
    /// jailer names them: fsize=BYTES (no file it writes grows past this: a write past
    /// it fails, the VMM goes on) or no-file=N (descriptors). Repeatable. Without
    /// no-file, a jailed VMM gets 4096.
    #[arg(
        long = "resource-limit",
        value_name = "RESOURCE=VALUE",
        requires = "jail"
    )]
    resource_limits: Vec<sandbox::jail::ResourceLimit>,
    /// With --jail: write VALUE to FILE in the VMM's own cgroup before it starts
    /// (cpu.max=200000 100000, memory.max=1073741824 on cgroup v2;
    /// cpu.cfs_quota_us=200000, memory.limit_in_bytes=1073741824 on v1), as
    /// Firecracker's jailer's --cgroup. Repeatable. The group is
    /// PARENT/ID below the caller's own group (see --parent-cgroup, --id).
    #[arg(long = "cgroup", value_name = "FILE=VALUE", requires = "jail")]
    cgroups: Vec<sandbox::cgroup::Setting>,
    /// The cgroup version --cgroup writes to: 1 or 2 (default: this host's, 2 when
    /// the unified hierarchy has the cpu and memory controllers).
    #[arg(long, requires = "cgroups")]
    cgroup_version: Option<sandbox::cgroup::Version>,
    /// The folder, relative to the caller's own cgroup, that holds the VMM's group
    /// (default: vessel).
    #[arg(long, requires = "cgroups")]
    parent_cgroup: Option<PathBuf>,
    /// The name of the VMM's cgroup (Firecracker's jailer's --id; default: vessel-PID).
    #[arg(long, requires = "cgroups")]
    id: Option<String>,
}

/// Process exit statuses, so scripts can tell how the guest ended.
pub mod status {
    /// The guest powered off, or the user quit with Ctrl-A x.
    pub const POWER_OFF: i32 = 0;
    /// The VMM failed (also used for bad input).
    pub const ERROR: i32 = 1;
    /// The guest rebooted (i8042 reset, ACPI reset, panic with panic=-1).
    pub const REBOOT: i32 = 10;
    /// A vCPU triple-faulted.
    pub const TRIPLE_FAULT: i32 = 12;
    // 148 (`sandbox::BAD_SYSCALL_STATUS`, the SIGSYS handler's): a VMM thread made a
    // system call its seccomp filter forbids (`--seccomp trap`).
}

/// Where scripts/guest-assets.sh caches Debian's kernel and the busybox initramfs.
pub fn assets_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VESSEL_ASSETS") {
        return d.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    cache.join("vessel/assets")
}

fn config_from(args: &RunArgs) -> anyhow::Result<VmConfig> {
    let args = RunArgs {
        config: args.config.clone(),
        kernel: args.kernel.clone(),
        initrd: args.initrd.clone(),
        firmware: args.firmware.clone(),
        firmware_vars: args.firmware_vars.clone(),
        option_roms: args.option_roms.clone(),
        cmdline: args.cmdline.clone(),
        disks: args.disks.clone(),
        serial: args.serial.clone(),
        virtio_console: args.virtio_console.clone(),
        balloon: args.balloon.clone(),
        nets: args.nets.clone(),
        vsock: args.vsock.clone(),
        cloud_init: args.cloud_init.clone(),
        name: args.name.clone(),
        uuid: args.uuid.clone(),
        api_sock: None,
        console_sock: None,
        console_log: None,
        status_file: None,
        jail: None,
        uid: None,
        gid: None,
        resource_limits: Vec::new(),
        cgroups: Vec::new(),
        cgroup_version: None,
        parent_cgroup: None,
        id: None,
        restore: None,
        incoming: None,
        restore_mem: None,
        ..*args
    };
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the VM config {}", path.display()))?;
        return serde_json::from_str(&text)
            .with_context(|| format!("{}: not a Vessel VM config", path.display()));
    }
    if args.arch == vmm::config::Arch::Riscv64 {
        return riscv_config(args);
    }
    // `--firmware ovmf`: Debian's OVMF.
    let named_firmware = args.firmware.map(|f| {
        if f.as_os_str() == "ovmf" {
            PathBuf::from(vmm::config::OVMF_CODE)
        } else {
            f
        }
    });
    let (kernel, initrd, firmware) = match (args.kernel, named_firmware) {
        (Some(k), f) => (Some(k), args.initrd, f),
        (None, Some(f)) => (None, None, Some(f)),
        // A disk image with a boot sector and no kernel: its own bootloader boots it,
        // through SeaBIOS, or through OVMF when it is a UEFI-only image. (A bare root
        // file system falls through to the assets' kernel.)
        (None, None) if args.disks.first().is_some_and(|d| d.has_boot_sector()) => {
            let uefi = args.disks.first().and_then(|d| d.firmware_boot())
                == Some(vmm::config::FirmwareBoot::Uefi);
            let (firmware, package) = if uefi {
                (vmm::config::OVMF_CODE, "ovmf")
            } else {
                (vmm::config::DEFAULT_BIOS, "seabios")
            };
            let firmware = PathBuf::from(firmware);
            if !firmware.is_file() {
                bail!(
                    "no --kernel given: booting the disk through firmware needs {} \
                     (apt-get install {package}) or --firmware PATH",
                    firmware.display()
                );
            }
            (None, None, Some(firmware))
        }
        (None, None) => {
            let dir = assets_dir();
            let k = dir.join("vmlinuz");
            if !k.is_file() {
                bail!(
                    "no --kernel given and no guest assets in {}: run scripts/guest-assets.sh first",
                    dir.display()
                );
            }
            (
                Some(k),
                args.initrd.or(Some(dir.join("initramfs.cpio.gz"))),
                None,
            )
        }
    };
    let virtio_transport = args.virtio_transport.unwrap_or(if firmware.is_some() {
        vmm::config::Transport::Pci
    } else {
        vmm::config::Transport::Mmio
    });
    Ok(VmConfig {
        arch: args.arch,
        kernel,
        firmware,
        firmware_vars: args.firmware_vars,
        option_roms: args.option_roms,
        initrd,
        cmdline: args.cmdline,
        memory_mib: args.memory,
        cpus: args.cpus,
        accel: args.accel,
        cpu_model: args.cpu_model,
        cpuid_modifiers: Vec::new(),
        threads_per_core: 1,
        serial: args.serial,
        serial_rate_limiter: None,
        disks: args.disks,
        rng: args.rng,
        rng_rate_limiter: None,
        virtio_console: args.virtio_console,
        balloon: args.balloon,
        nets: args.nets,
        vsock: args.vsock,
        virtio_transport,
        name: args.name,
        cloud_init: args.cloud_init,
        uuid: args.uuid,
        opened: Vec::new(),
    })
}

/// A riscv64 VM: the firmware (`--firmware`) defaults to Debian's OpenSBI, the kernel
/// and initramfs to scripts/riscv-assets.sh's.
fn riscv_config(args: RunArgs) -> anyhow::Result<VmConfig> {
    let (kernel, initrd) = match args.kernel {
        Some(k) => (k, args.initrd),
        None => {
            let dir = assets_dir().join("riscv64");
            let k = dir.join("Image");
            if !k.is_file() {
                bail!(
                    "no --kernel given and no riscv64 guest assets in {}: run scripts/riscv-assets.sh first",
                    dir.display()
                );
            }
            (k, args.initrd.or(Some(dir.join("initramfs.cpio.gz"))))
        }
    };
    let mut vm = VmConfig::new(kernel);
    vm.arch = args.arch;
    vm.initrd = initrd;
    vm.firmware = args.firmware;
    vm.cmdline = args.cmdline;
    vm.memory_mib = args.memory;
    vm.cpus = args.cpus;
    vm.accel = args.accel;
    vm.serial = args.serial;
    vm.disks = args.disks;
    vm.rng = args.rng;
    vm.virtio_console = args.virtio_console;
    vm.balloon = args.balloon;
    vm.nets = args.nets;
    vm.vsock = args.vsock;
    vm.name = args.name;
    vm.cloud_init = args.cloud_init;
    vm.uuid = args.uuid;
    Ok(vm)
}

pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    let status_file = args.status_file.clone();
    let code = run_vm(args)?;
    if let Some(path) = status_file {
        std::fs::write(&path, format!("{code}\n"))
            .with_context(|| format!("writing the exit status to {}", path.display()))?;
    }
    Ok(code)
}

fn run_vm(args: RunArgs) -> anyhow::Result<i32> {
    if let Some(from) = args.incoming.clone() {
        return run_incoming(args, &from);
    }
    let api_sock = args.api_sock.clone();
    let console_sock = args.console_sock.clone();
    // As Firecracker: an API socket and nothing to boot means "wait to be configured".
    let nothing_to_boot = args.kernel.is_none()
        && args.firmware.is_none()
        && args.config.is_none()
        && args.disks.is_empty()
        && args.restore.is_none();
    // (A riscv64 VM boots the riscv64 assets when it names no kernel.)
    let preboot = args.api_only
        || (api_sock.is_some() && nothing_to_boot && args.arch != vmm::config::Arch::Riscv64);
    // The VM's description first: the jail needs its files, and must be entered before
    // any thread starts.
    // A snapshot to restore is read first too: its configuration names the VM's files.
    let mut loaded = None;
    let mut snapshot_files = Vec::new();
    // Files a restore opened for its VM (without --config): open while it runs.
    let mut _held_files = Vec::new();
    let config = if preboot {
        if args.arch == vmm::config::Arch::Riscv64 {
            bail!("--api-only with --arch riscv64: the API's InstanceStart builds x86_64 VMs only");
        }
        if args.jail.is_some() {
            bail!("--jail needs the VM's files up front: it cannot wait for InstanceStart");
        }
        None
    } else if let Some(path) = &args.restore {
        let expected = match &args.config {
            Some(_) => Some(config_from(&args)?),
            None => None,
        };
        let (l, state, memory, held) =
            load_snapshot(path, args.restore_mem.as_deref(), expected.as_ref())?;
        _held_files = held;
        let mut config = l.snapshot.config.clone();
        config.serial = args.serial.clone();
        loaded = Some((l, state.clone()));
        snapshot_files = vec![state, memory];
        Some(config)
    } else {
        let config = config_from(&args)?;
        // Before the jail, which binds the store: it must exist.
        config.prepare_firmware_vars()?;
        Some(config)
    };
    let ids = args
        .uid
        .zip(args.gid)
        .map(|(uid, gid)| sandbox::Ids { uid, gid });
    if let (Some(root), Some(config)) = (&args.jail, &config) {
        // From here on this is the VMM, process 1 of its PID namespace (the filters
        // below name its own PID).
        enter_jail(root, config, &args, ids, &snapshot_files)?;
    }
    sandbox::configure(args.seccomp, ids).context("setting up the VMM's seccomp filters")?;
    if args.seccomp == sandbox::Mode::None {
        tracing::warn!("--seccomp none: the VMM's threads run without a seccomp filter");
    }
    let mut relay = None;
    if let Some(sock) = &console_sock {
        if args.serial != SerialConfig::Stdio {
            bail!("--console-sock serves the stdio console: use it with --serial stdio");
        }
        relay = Some(
            vmm::api::console::serve_stdio(sock, args.console_log.clone())
                .with_context(|| format!("serving the console on {}", sock.display()))?,
        );
    }
    let _cleanup = RemoveOnDrop(console_sock, relay);
    if let Some(config) = config
        .as_ref()
        .filter(|c| c.arch == vmm::config::Arch::Riscv64)
    {
        if loaded.is_some() {
            bail!("a riscv64 VM cannot be restored from a snapshot");
        }
        return run_riscv(config.clone(), api_sock.as_deref(), args.paused);
    }
    if preboot {
        let sock = api_sock.unwrap_or_default();
        let api = vmm::api::firecracker::VmmApi::new_preboot(args.serial.clone(), args.accel);
        if let Some(n) = args.http_api_max_payload_size {
            api.set_max_payload(n).map_err(anyhow::Error::msg)?;
        }
        // Started as Firecracker is (an API socket, nothing to boot): a failed snapshot
        // load ends the VMM as it ends Firecracker. --api-only (Vessel's) keeps waiting,
        // so another load may follow.
        if !args.api_only {
            api.end_after_failed_load();
        }
        // InstanceStart's VM is built and run here, as Firecracker's VMM thread does: the
        // API's threads stay in their own seccomp filter.
        let starts = api.builds_elsewhere();
        vmm::api::firecracker::spawn(&sock, api.clone())
            .with_context(|| format!("serving the API on {}", sock.display()))?;
        let reason = loop {
            let Ok(start) = starts.recv() else {
                break api.wait_finished();
            };
            let built = match &start.restore {
                None => Vmm::new(start.config.clone()).map_err(|e| e.to_string()),
                Some((loaded, paused)) => Vmm::restore(loaded, args.serial.clone(), args.accel)
                    .map_err(|e| e.to_string())
                    .and_then(|vmm| {
                        if *paused {
                            // No vCPU thread has started: this only closes their gate.
                            vmm.control().pause().map_err(|e| e.to_string())?;
                        }
                        Ok(vmm)
                    }),
            };
            match built {
                Ok(vmm) => {
                    start.started(vmm.control(), vmm.snapshotter());
                    let r = vmm.run().map_err(|e| e.to_string());
                    api.finish(r.clone());
                    break r;
                }
                Err(e) => start.failed(e),
            }
        };
        vmm::api::http::remove_socket(&sock);
        return report(reason.map_err(anyhow::Error::msg));
    }
    let Some(config) = config else {
        bail!("no VM configuration");
    };
    let restored_api = loaded.as_ref().and_then(|(l, _)| l.snapshot.api.clone());
    let vmm = match loaded {
        Some((loaded, state)) => Vmm::restore(&loaded, args.serial.clone(), args.accel)
            .with_context(|| format!("cannot restore the snapshot {}", state.display()))?,
        None => Vmm::new(config.clone()).context("cannot start the VM")?,
    };
    if args.paused {
        // No vCPU thread has started: this only closes the gate they find first.
        vmm.control()
            .pause()
            .map_err(|e| anyhow::anyhow!("cannot start the VM paused: {e}"))?;
    }
    if let Some(sock) = &api_sock {
        let api = vmm::api::firecracker::VmmApi::new_running(config, &vmm);
        api.show_restored(restored_api.as_ref());
        if let Some(n) = args.http_api_max_payload_size {
            api.set_max_payload(n).map_err(anyhow::Error::msg)?;
        }
        vmm::api::firecracker::spawn(sock, api)
            .with_context(|| format!("serving the API on {}", sock.display()))?;
    }
    if let Some(note) = vmm.note() {
        eprintln!("vessel: {note}");
    }
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    let raw = if interactive {
        eprintln!("vessel: console on this terminal; Ctrl-A x quits");
        vmm::console::RawTerminal::enter(0)
    } else {
        None
    };
    let reason = vmm.run();
    drop(raw);
    if let Some(sock) = &api_sock {
        vmm::api::http::remove_socket(sock);
    }
    report(reason.map_err(anyhow::Error::from))
}

/// A riscv64 VM on Vessel's RISC-V CPU, with the control API on `api_sock` (no
/// snapshots or migration: its machine has neither).
fn run_riscv(config: VmConfig, api_sock: Option<&Path>, paused: bool) -> anyhow::Result<i32> {
    let vm = vmm::riscv::RiscvVm::new(config.clone()).context("cannot run the riscv64 VM")?;
    if paused {
        // The hart has not started: it finds the gate closed.
        vm.control()
            .pause()
            .map_err(|e| anyhow::anyhow!("cannot start the VM paused: {e}"))?;
    }
    if let Some(sock) = api_sock {
        let api =
            vmm::api::firecracker::VmmApi::new_running_without_snapshots(config, vm.control());
        vmm::api::firecracker::spawn(sock, api)
            .with_context(|| format!("serving the API on {}", sock.display()))?;
    }
    eprintln!("vessel: {}", vmm::riscv::NOTE);
    let raw = if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        eprintln!("vessel: console on this terminal; Ctrl-A x quits");
        vmm::console::RawTerminal::enter(0)
    } else {
        None
    };
    let reason = vm.run();
    drop(raw);
    if let Some(sock) = api_sock {
        vmm::api::http::remove_socket(sock);
    }
    report(reason.context("cannot run the riscv64 VM"))
}

/// `--incoming`: waits for the VM, builds it as a restore does, tells the source it
/// runs here, and runs it.
fn run_incoming(args: RunArgs, from: &vmm::migration::Endpoint) -> anyhow::Result<i32> {
    use vmm::migration::receive;
    let expected = match &args.config {
        Some(_) => Some(config_from(&args)?),
        None => None,
    };
    let listener = receive::Listener::bind(from)
        .with_context(|| format!("listening for a migration on {from}"))?;
    // Read before the jail hides the marker.
    let die_before_answer = die_before_answer_hook();
    let ids = args
        .uid
        .zip(args.gid)
        .map(|(uid, gid)| sandbox::Ids { uid, gid });
    if let Some(root) = &args.jail {
        let Some(config) = &expected else {
            bail!(
                "--jail with --incoming needs --config: the VM's files are bound before it arrives"
            );
        };
        enter_jail(root, config, &args, ids, &[])?;
    }
    sandbox::configure(args.seccomp, ids).context("setting up the VMM's seccomp filters")?;
    let console_sock = args.console_sock.clone();
    let mut relay = None;
    if let Some(sock) = &console_sock {
        if args.serial != SerialConfig::Stdio {
            bail!("--console-sock serves the stdio console: use it with --serial stdio");
        }
        relay = Some(
            vmm::api::console::serve_stdio(sock, args.console_log.clone())
                .with_context(|| format!("serving the console on {}", sock.display()))?,
        );
    }
    let _cleanup = RemoveOnDrop(console_sock, relay);
    tracing::info!(at = %from, "waiting for a migrating VM");
    // Checked against --config, and its disks given the files handed over with it.
    let mut incoming = receive::receive_as(&listener, from, expected.as_ref())
        .with_context(|| format!("receiving a migrating VM on {from}"))?;
    // Without --config, the files the state names, opened on arrival: held while it runs.
    let _held = std::mem::take(&mut incoming.held);
    drop(listener);
    let vmm = match Vmm::restore(&incoming.loaded, args.serial.clone(), args.accel) {
        Ok(vmm) => vmm,
        Err(e) => {
            let _ = incoming.answer(&Err(e.to_string()));
            return Err(anyhow::Error::from(e).context("cannot run the migrated VM"));
        }
    };
    let mut config = incoming.loaded.config().clone();
    config.serial = args.serial.clone();
    if let Some(sock) = &args.api_sock {
        let api = vmm::api::firecracker::VmmApi::new_running(config, &vmm);
        if let Some(n) = args.http_api_max_payload_size {
            api.set_max_payload(n).map_err(anyhow::Error::msg)?;
        }
        if let Err(e) = vmm::api::firecracker::spawn(sock, api) {
            let _ = incoming.answer(&Err(format!("serving the API: {e}")));
            return Err(e).with_context(|| format!("serving the API on {}", sock.display()));
        }
    }
    tracing::info!(pages = incoming.pages, "migrated VM received");
    if die_before_answer {
        tracing::warn!("test hook: ending with the VM received whole and not answered");
        std::process::exit(1);
    }
    // Once answered the source ends: this VMM runs the VM from here on.
    incoming
        .answer(&Ok(()))
        .context("telling the migration's source that the VM runs here")?;
    let reason = vmm.run();
    if let Some(sock) = &args.api_sock {
        vmm::api::http::remove_socket(sock);
    }
    report(reason.map_err(anyhow::Error::from))
}

/// Tests only (debug builds): whether this VMM is to end after the migrating VM came
/// whole and before it answers the source (a destination that dies at that moment, made
/// deterministic): `VESSEL_TEST_DIE_BEFORE_MIGRATION_ANSWER` names a marker file, which
/// the first VMM to find it removes, so only one dies.
fn die_before_answer_hook() -> bool {
    if !cfg!(debug_assertions) {
        return false;
    }
    std::env::var_os("VESSEL_TEST_DIE_BEFORE_MIGRATION_ANSWER")
        .is_some_and(|marker| std::fs::remove_file(marker).is_ok())
}

/// The snapshot at `path` (a folder, or a state file beside `mem`), read and checked,
/// with its state and memory files and the files it holds open for the VM (keep them
/// while it runs); refused with nothing started when it does not fit.
fn load_snapshot(
    path: &Path,
    mem: Option<&Path>,
    expected: Option<&VmConfig>,
) -> anyhow::Result<(vmm::snapshot::Loaded, PathBuf, PathBuf, Vec<std::fs::File>)> {
    let (state, memory) = match mem {
        Some(m) => (path.to_path_buf(), m.to_path_buf()),
        None if path.is_dir() => vmm::snapshot::files_in(path),
        None => bail!(
            "--restore {}: give a snapshot folder, or the state file with --restore-mem MEMORY",
            path.display()
        ),
    };
    let context = || format!("cannot restore the snapshot {}", state.display());
    // Without --config, the state's own configuration, its files opened once now and
    // held: the checks and the VM read the same files, whatever is swapped meanwhile.
    let mut held = Vec::new();
    let own;
    let expected = match expected {
        Some(e) => e,
        None => {
            let mut config = vmm::snapshot::load(&state, &memory)
                .with_context(context)?
                .snapshot
                .config;
            held = config
                .hold_files()
                .map_err(anyhow::Error::msg)
                .with_context(context)?;
            own = config;
            &own
        }
    };
    let loaded = vmm::snapshot::load_as(&state, &memory, Some(expected)).with_context(context)?;
    Ok((loaded, state, memory, held))
}

/// Binds what the VM uses into the jail at `root` and enters it (see `--jail`).
fn enter_jail(
    root: &Path,
    config: &VmConfig,
    args: &RunArgs,
    ids: Option<sandbox::Ids>,
    snapshot_files: &[PathBuf],
) -> anyhow::Result<()> {
    use sandbox::jail::{Access, JailSpec};
    let mut binds: Vec<(PathBuf, Access)> = Vec::new();
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    // A file handed over open (a manager's `opened`) is read from its descriptor: its
    // name need not, and must not, be reachable.
    let ro = |p: &Path, binds: &mut Vec<(PathBuf, Access)>| {
        if config.opened_file(p).is_none() {
            binds.push((abs(p), Access::ReadOnly));
        }
    };
    // A riscv64 VM boots its M-mode firmware, Debian's OpenSBI unless it names one.
    let riscv_firmware =
        (config.arch == vmm::config::Arch::Riscv64).then(|| vmm::riscv::firmware(config));
    for p in config
        .kernel
        .iter()
        .chain(&riscv_firmware)
        .chain(snapshot_files)
        .chain(&config.initrd)
        .chain(&config.firmware)
        .chain(&config.option_roms)
    {
        ro(p, &mut binds);
    }
    // UEFI variables are written in place; without a store, the template is read.
    if let Some(v) = &config.firmware_vars {
        if config.opened_file(v).is_none() {
            binds.push((abs(v), Access::ReadWrite));
        }
    } else if let Some(t) = config
        .firmware
        .as_deref()
        .and_then(vmm::config::uefi_vars_template)
        .filter(|t| t.is_file())
    {
        ro(&t, &mut binds);
    }
    if let Some(c) = &config.cloud_init {
        for p in std::iter::once(&c.user_data)
            .chain(&c.meta_data)
            .chain(&c.network_config)
        {
            ro(p, &mut binds);
        }
    }
    for d in &config.disks {
        for (i, f) in d.files().iter().enumerate() {
            let access = if i == 0 && !d.read_only {
                Access::ReadWrite
            } else {
                Access::ReadOnly
            };
            binds.push((abs(f), access));
        }
    }
    // Files the VMM appends to: made now (as it would), then bound.
    let outputs = [
        &config.serial,
        config
            .virtio_console
            .as_ref()
            .unwrap_or(&SerialConfig::Null),
    ];
    let files = outputs
        .into_iter()
        .filter_map(|s| match s {
            SerialConfig::File(p) => Some(p.clone()),
            _ => None,
        })
        .chain(args.console_log.clone());
    for f in files {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&f)
            .with_context(|| format!("creating {}", f.display()))?;
        binds.push((abs(&f), Access::ReadWrite));
    }
    // Sockets and the exit status are created inside: their folders.
    let created = args
        .api_sock
        .iter()
        .chain(&args.console_sock)
        .chain(&args.status_file)
        .cloned()
        .chain(config.vsock.iter().map(|v| v.uds_path.clone()));
    for p in created {
        let p = abs(&p);
        if let Some(dir) = p.parent() {
            binds.push((dir.to_path_buf(), Access::ReadWrite));
        }
    }
    // Host facts the accelerator's choice reads, and the devices.
    for p in ["/proc/cpuinfo", "/proc/meminfo", "/sys/module"] {
        binds.push((PathBuf::from(p), Access::ReadOnly));
    }
    binds.push((PathBuf::from("/dev/kvm"), Access::Device));
    if !config.nets.is_empty() {
        binds.push((PathBuf::from("/dev/net/tun"), Access::Device));
    }
    binds.retain(|(p, _)| p.exists());
    let cgroup = if args.cgroups.is_empty() {
        None
    } else {
        let version = match args.cgroup_version {
            Some(v) => v,
            None => sandbox::cgroup::Version::detect().context(
                "--cgroup: this host has no cgroup hierarchy with the cpu and memory controllers",
            )?,
        };
        Some(sandbox::cgroup::Spec {
            version,
            parent: args
                .parent_cgroup
                .clone()
                .unwrap_or_else(|| PathBuf::from(sandbox::cgroup::DEFAULT_PARENT)),
            id: args
                .id
                .clone()
                .unwrap_or_else(|| format!("vessel-{}", std::process::id())),
            settings: args.cgroups.clone(),
        })
    };
    // riscv64's machine opens its files by name: a file handed over is bound at its name
    // from the open file (what the manager checked), not looked up again.
    let mut held = Vec::new();
    if config.arch == vmm::config::Arch::Riscv64 {
        for o in &config.opened {
            held.push((o.fd, abs(&o.path), Access::ReadOnly));
        }
        for d in &config.disks {
            if let Some(f) = d.fds.first() {
                let access = if d.read_only {
                    Access::ReadOnly
                } else {
                    Access::ReadWrite
                };
                held.push((f.fd, abs(&d.path), access));
            }
        }
    }
    let spec = JailSpec {
        root: abs(root),
        binds,
        held,
        new_net: config.nets.is_empty(),
        mode: Some(args.seccomp),
        ids,
        rlimits: args.resource_limits.clone(),
        cgroup,
    };
    sandbox::jail::enter(&spec).with_context(|| format!("jailing the VMM in {}", root.display()))
}

/// When `run` returns: relays the console's last output, removes its socket file.
struct RemoveOnDrop(Option<PathBuf>, Option<vmm::api::console::ConsoleRelay>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(r) = &self.1 {
            r.flush();
        }
        if let Some(p) = &self.0 {
            vmm::api::http::remove_socket(p);
        }
    }
}

fn report(reason: anyhow::Result<ExitReason>) -> anyhow::Result<i32> {
    let (code, what) = match reason? {
        ExitReason::PowerOff => (status::POWER_OFF, "guest powered off".to_string()),
        ExitReason::Quit => (status::POWER_OFF, "quit from the console".to_string()),
        ExitReason::Reset => (status::REBOOT, "guest rebooted".to_string()),
        ExitReason::TripleFault => (status::TRIPLE_FAULT, "guest triple-faulted".to_string()),
        ExitReason::DebugExit(v) => (
            ((v << 1) | 1) as i32,
            format!("guest wrote {v:#x} to the debug-exit port"),
        ),
        ExitReason::Error => (status::ERROR, "the VMM stopped on an error".to_string()),
        ExitReason::Migrated => (
            status::POWER_OFF,
            "the VM migrated to another VMM".to_string(),
        ),
    };
    eprintln!("\r\nvessel: {what} (exit status {code})");
    Ok(code)
}
