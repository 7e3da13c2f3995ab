//! Request tests for the Firecracker-compatible API: each endpoint and validation rule,
//! in the sequences Firecracker's own integration tests (`test_api.py`) use, with our own
//! files and values.

use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::*;
use crate::config::Accel;

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

fn json_of(r: &Response) -> Value {
    serde_json::from_slice(&r.body).unwrap()
}

/// A scratch folder with a few files to use as kernels and drives.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("vessel-fc-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        for f in ["vmlinux", "rootfs.ext4", "scratch.ext4", "other.ext4"] {
            std::fs::write(d.join(f), vec![0u8; 4096]).unwrap();
        }
        Scratch(d)
    }
    fn path(&self, f: &str) -> String {
        self.0.join(f).display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Api(Arc<VmmApi>);

impl Api {
    fn preboot() -> Api {
        Api(VmmApi::new_preboot(SerialConfig::Null, Accel::Auto))
    }
    fn call(&self, method: &str, path: &str, body: &str) -> Response {
        self.0.handle_req(&req(method, path, body))
    }
    /// Asserts a 204.
    fn ok(&self, method: &str, path: &str, body: &str) -> Response {
        let r = self.call(method, path, body);
        assert_eq!(
            r.status,
            204,
            "{method} {path} {body}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        r
    }
    /// Asserts a 400 whose fault message contains `want`.
    fn refused(&self, method: &str, path: &str, body: &str, want: &str) {
        let r = self.call(method, path, body);
        assert_eq!(r.status, 400, "{method} {path} {body}");
        assert!(
            msg(&r).contains(want),
            "{method} {path} {body}: {}",
            msg(&r)
        );
    }
    /// Moves the API to its running phase with the configuration it was given, as a
    /// successful InstanceStart does, over a VM that is never run.
    fn boot_without_a_vm(&self) {
        struct NoIrq;
        impl hypervisor::IrqChip for NoIrq {
            fn set_irq_line(&self, _: u32, _: bool) -> hypervisor::Result<()> {
                Ok(())
            }
            fn signal_msi(&self, _: u64, _: u32) -> hypervisor::Result<()> {
                Ok(())
            }
        }
        let exit = Arc::new(devices::ExitSignal::new());
        let ged = Arc::new(Mutex::new(devices::ged::Ged::new(Arc::new(NoIrq), 5)));
        let control = Arc::new(VmControl::new(exit, ged));
        let mut st = lock(&self.0.state);
        let config = st
            .fc
            .to_vm_config(&SerialConfig::Null, Accel::Auto)
            .expect("a bootable configuration");
        // The changeable devices the VM would have: real disks over the files, on a
        // transport core no driver ever starts; the interfaces' limiters.
        let mem = vm_memory::GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)])
            .unwrap();
        for disk in &config.disks {
            let block = virtio::blk::Block::new(disk.open().unwrap(), "t", disk.read_only);
            let change = crate::runtime::Changeable::Disk(disk.clone(), block.handle());
            let core = Arc::new(virtio::transport::DeviceCore::new(
                Box::new(block),
                mem.clone(),
                Box::new(virtio::transport::GsiEdge::new(Arc::new(NoIrq), 16)),
            ));
            control.devices().add(change, core.clone());
        }
        for _ in &config.nets {
            let core = Arc::new(virtio::transport::DeviceCore::new(
                Box::new(virtio::rng::Rng),
                mem.clone(),
                Box::new(virtio::transport::GsiEdge::new(Arc::new(NoIrq), 17)),
            ));
            control.devices().add(
                crate::runtime::Changeable::Net(virtio::net::NetLimiters::default()),
                core,
            );
        }
        if let Some(b) = &config.balloon {
            let dev = virtio::balloon::Balloon::new(
                vec![(0, 1 << 20)],
                b.target_pages(),
                b.deflate_on_oom,
                std::time::Duration::from_secs(b.stats_polling_interval_s.into()),
            );
            let change = crate::runtime::Changeable::Balloon(dev.handle());
            let core = Arc::new(virtio::transport::DeviceCore::new(
                Box::new(dev),
                mem.clone(),
                Box::new(virtio::transport::GsiEdge::new(Arc::new(NoIrq), 18)),
            ));
            control.devices().add(change, core);
        }
        st.phase = Phase::Running {
            config,
            control,
            snapshotter: None,
        };
    }
    fn config(&self) -> Value {
        let r = self.call("GET", "/vm/config", "");
        assert_eq!(r.status, 200);
        json_of(&r)
    }
}

fn basic_config(api: &Api, s: &Scratch) {
    api.ok(
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{}", "boot_args": ""}}"#,
            s.path("vmlinux")
        ),
    );
    api.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 256}"#,
    );
    api.ok(
        "PUT",
        "/drives/rootfs",
        &format!(
            r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true, "is_read_only": true}}"#,
            s.path("rootfs.ext4")
        ),
    );
}

#[test]
fn preboot_requests_build_a_config() {
    let s = Scratch::new("build");
    let api = Api::preboot();
    api.ok(
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}}"#,
            s.path("vmlinux")
        ),
    );
    api.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 256}"#,
    );
    api.ok(
        "PUT",
        "/drives/scratch",
        &format!(
            r#"{{"drive_id": "scratch", "path_on_host": "{}", "is_root_device": false}}"#,
            s.path("scratch.ext4")
        ),
    );
    api.ok(
        "PUT",
        "/drives/rootfs",
        &format!(
            r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true, "is_read_only": true}}"#,
            s.path("rootfs.ext4")
        ),
    );
    api.ok(
        "PUT",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "guest_mac": "06:00:AC:10:00:02", "host_dev_name": "tap0",
            "mtu": 9000}"#,
    );
    api.ok(
        "PUT",
        "/vsock",
        r#"{"guest_cid": 3, "uds_path": "/tmp/v.sock"}"#,
    );
    api.ok("PUT", "/entropy", "{}");
    api.ok(
        "PUT",
        "/serial",
        r#"{"serial_out_path": "/tmp/serial.out"}"#,
    );
    let c = lock(&api.0.state)
        .fc
        .to_vm_config(&SerialConfig::Null, Accel::Auto)
        .unwrap();
    assert_eq!((c.cpus, c.memory_mib), (2, 256));
    assert_eq!(c.cmdline, "console=ttyS0 root=/dev/vda ro");
    // The root drive comes first (vda), whatever the order it was put in.
    assert_eq!(c.disks.len(), 2);
    assert!(c.disks[0].path.ends_with("rootfs.ext4") && c.disks[0].read_only);
    assert!(!c.disks[1].read_only);
    // Drives are raw, as Firecracker's: never probed (issue 22).
    assert_eq!(c.disks[0].format, Some(crate::config::DiskFormat::Raw));
    assert_eq!(c.nets[0].tap, "tap0");
    assert_eq!(c.nets[0].mac.as_deref(), Some("06:00:AC:10:00:02"));
    assert_eq!(c.nets[0].mtu, Some(9000));
    let v = c.vsock.as_ref().unwrap();
    assert_eq!((v.guest_cid, v.uds_path.to_str()), (3, Some("/tmp/v.sock")));
    assert!(c.rng, "PUT /entropy adds the virtio-rng device");
    assert_eq!(c.serial, SerialConfig::File("/tmp/serial.out".into()));
}

#[test]
fn a_root_drive_with_a_partuuid_is_named_by_it() {
    let s = Scratch::new("partuuid");
    let api = Api::preboot();
    api.ok(
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "quiet"}}"#,
            s.path("vmlinux")
        ),
    );
    api.ok(
        "PUT",
        "/drives/root",
        &format!(
            r#"{{"drive_id": "root", "path_on_host": "{}", "is_root_device": true, "partuuid": "0eaa91a0-01"}}"#,
            s.path("rootfs.ext4")
        ),
    );
    let c = lock(&api.0.state)
        .fc
        .to_vm_config(&SerialConfig::Null, Accel::Auto)
        .unwrap();
    assert_eq!(c.cmdline, "quiet root=PARTUUID=0eaa91a0-01 rw");
}

#[test]
fn full_config_has_firecrackers_shape_and_keeps_ids_after_boot() {
    let s = Scratch::new("full");
    let api = Api::preboot();
    basic_config(&api, &s);
    api.ok(
        "PUT",
        "/network-interfaces/net1",
        r#"{"iface_id": "net1", "host_dev_name": "vtap1", "guest_mac": "06:00:00:00:00:01",
            "tx_rate_limiter": {"bandwidth": {"size": 0, "refill_time": 100}}}"#,
    );
    api.ok(
        "PUT",
        "/vsock",
        r#"{"guest_cid": 15, "uds_path": "vsock.sock"}"#,
    );
    let expected = serde_json::json!({
        "balloon": null,
        "drives": [{
            "drive_id": "rootfs",
            "partuuid": null,
            "is_root_device": true,
            "cache_type": "Unsafe",
            "is_read_only": true,
            "path_on_host": s.path("rootfs.ext4"),
            "rate_limiter": null,
            "io_engine": "Sync",
            "socket": null,
        }],
        "boot-source": {
            "kernel_image_path": s.path("vmlinux"),
            "initrd_path": null,
            "boot_args": "",
        },
        "cpu-config": null,
        "logger": null,
        "machine-config": {
            "vcpu_count": 2,
            "mem_size_mib": 256,
            "smt": false,
            "track_dirty_pages": false,
            "huge_pages": "None",
        },
        "metrics": null,
        "memory-hotplug": null,
        "mmds-config": null,
        "network-interfaces": [{
            "iface_id": "net1",
            "host_dev_name": "vtap1",
            "guest_mac": "06:00:00:00:00:01",
            "mtu": null,
            "rx_rate_limiter": null,
            "tx_rate_limiter": {
                "bandwidth": {"size": 0, "one_time_burst": null, "refill_time": 100},
                "ops": null,
            },
        }],
        "pmem": [],
        "vsock": {"guest_cid": 15, "uds_path": "vsock.sock"},
        "entropy": null,
    });
    assert_eq!(api.config(), expected);
    api.boot_without_a_vm();
    // After boot: the same IDs (not drive0/eth0), the same shape.
    assert_eq!(api.config(), expected);
    let r = api.call("GET", "/machine-config", "");
    assert_eq!(json_of(&r)["vcpu_count"], 2);
}

#[test]
fn machine_config_put_replaces_and_patch_updates() {
    let api = Api::preboot();
    // Firecracker's defaults before any PUT.
    let m = json_of(&api.call("GET", "/machine-config", ""));
    assert_eq!(
        m,
        serde_json::json!({"vcpu_count": 1, "mem_size_mib": 128, "smt": false,
                           "track_dirty_pages": false, "huge_pages": "None"})
    );
    api.refused(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": "-2"}"#,
        "invalid type",
    );
    api.refused(
        "PUT",
        "/machine-config",
        r#"{"smt": "random_string"}"#,
        "invalid type",
    );
    api.refused(
        "PUT",
        "/machine-config",
        r#"{"cpu_template": "random_string"}"#,
        "unknown variant `random_string`",
    );
    api.ok("PATCH", "/machine-config", r#"{"track_dirty_pages": true}"#);
    // serde's own position in the message, as Firecracker's.
    api.refused(
        "PUT",
        "/machine-config",
        r#"{"mem_size_mib": 128}"#,
        "missing field `vcpu_count` at line 1 column 21.",
    );
    api.refused(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2}"#,
        "missing field `mem_size_mib` at line 1 column 17.",
    );
    api.ok(
        "PUT",
        "/machine-config",
        r#"{"mem_size_mib": 128, "vcpu_count": 1}"#,
    );
    let m = json_of(&api.call("GET", "/machine-config", ""));
    assert_eq!(m["smt"], false);
    assert_eq!(
        m["track_dirty_pages"], false,
        "a PUT resets what it leaves out"
    );
    api.ok("PATCH", "/machine-config", r#"{"smt": true}"#);
    api.refused(
        "PUT",
        "/machine-config",
        r#"{"mem_size_mib": "-2", "vcpu_count": 1}"#,
        "invalid type",
    );
    api.refused(
        "PUT",
        "/machine-config",
        r#"{"mem_size_mib": 18446744073709551616, "vcpu_count": 1}"#,
        "error occurred when deserializing the json body of a request: invalid type",
    );
    api.refused(
        "PATCH",
        "/machine-config",
        r#"{"mem_size_mib": 0}"#,
        "The memory size (MiB) is either 0, or not a multiple of the configured page size.",
    );
    api.refused(
        "PATCH",
        "/machine-config",
        r#"{"huge_pages": "2M", "mem_size_mib": 257}"#,
        "not a multiple of the configured page size",
    );
    for bad in [
        r#"{"vcpu_count": 0}"#,
        r#"{"vcpu_count": 33}"#,
        r#"{"vcpu_count": 3, "smt": true}"#,
    ] {
        api.refused(
            "PATCH",
            "/machine-config",
            bad,
            "The number of vCPUs must be",
        );
    }
    api.ok(
        "PATCH",
        "/machine-config",
        r#"{"vcpu_count": 1, "smt": true}"#,
    );
    api.refused("PATCH", "/machine-config", "{}", "Empty PATCH request.");
    api.refused(
        "PATCH",
        "/machine-config",
        r#"{"bogus": 1}"#,
        "unknown field `bogus`",
    );
    api.ok(
        "PATCH",
        "/machine-config",
        r#"{"vcpu_count": 4, "smt": false}"#,
    );
    let m = json_of(&api.call("GET", "/machine-config", ""));
    assert_eq!(
        (m["vcpu_count"].as_u64(), m["mem_size_mib"].as_u64()),
        (Some(4), Some(128))
    );
    // The deprecated cpu_template answers with a Deprecation header.
    let r = api.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 256, "cpu_template": "None"}"#,
    );
    assert!(r
        .headers
        .iter()
        .any(|(k, v)| k == "Deprecation" && v == "true"));
    let r = api.ok("PATCH", "/machine-config", r#"{"cpu_template": "C3"}"#);
    assert!(r.headers.iter().any(|(k, _)| k == "Deprecation"));
    assert_eq!(
        json_of(&api.call("GET", "/machine-config", ""))["cpu_template"],
        "C3"
    );
    let r = api.ok("PATCH", "/machine-config", r#"{"vcpu_count": 2}"#);
    assert!(r.headers.is_empty());
}

#[test]
fn drive_rules() {
    let s = Scratch::new("drives");
    let api = Api::preboot();
    basic_config(&api, &s);
    let drive = |id: &str, file: &str, root: bool| {
        format!(
            r#"{{"drive_id": "{id}", "path_on_host": "{file}", "is_root_device": {root}, "is_read_only": false}}"#
        )
    };
    // IDs: alphanumeric and underscores only, never empty.
    api.refused(
        "PUT",
        "/drives/a-b",
        &drive("a-b", &s.path("scratch.ext4"), false),
        "API Resource IDs can only contain alphanumeric characters and underscores.",
    );
    api.refused(
        "PUT",
        "/drives",
        &drive("", &s.path("scratch.ext4"), false),
        "The ID cannot be empty.",
    );
    api.refused(
        "PUT",
        "/drives/scratch",
        &drive("other", &s.path("scratch.ext4"), false),
        "The id from the path does not match the id from the body!",
    );
    api.ok(
        "PUT",
        "/drives/scratch_1",
        &drive("scratch_1", &s.path("scratch.ext4"), false),
    );
    api.refused(
        "PUT",
        "/drives/rootfs",
        &drive("rootfs", "foo.bar", true),
        "No such file or directory",
    );
    api.refused(
        "PUT",
        "/drives/scratch_1",
        &drive("scratch_1", &s.path("scratch.ext4"), true),
        "A root block device already exists!",
    );
    // The same drive may be put again as root (it is the root one).
    api.ok(
        "PUT",
        "/drives/rootfs",
        &drive("rootfs", &s.path("other.ext4"), true),
    );
    api.refused(
        "PUT",
        "/drives/x",
        r#"{"drive_id": "x", "is_read_only": true}"#,
        "missing field `is_root_device`",
    );
    api.refused(
        "PUT",
        "/drives/x",
        r#"{"drive_id": "x", "is_root_device": false}"#,
        "path_on_host is required",
    );
    api.refused(
        "PUT",
        "/drives/x",
        r#"{"drive_id": "x", "is_root_device": false, "socket": "/tmp/vub.sock"}"#,
        "vhost-user",
    );
    // Async (io_uring) is how the host submits I/O: accepted, kept as given.
    api.ok(
        "PUT",
        "/drives/async_1",
        &format!(r#"{{"drive_id": "async_1", "is_root_device": false, "path_on_host": "{}", "io_engine": "Async"}}"#, s.path("scratch.ext4")),
    );
    api.refused(
        "PUT",
        "/drives/x",
        &format!(r#"{{"drive_id": "x", "is_root_device": false, "path_on_host": "{}", "cache_type": "Bogus"}}"#, s.path("scratch.ext4")),
        "unknown variant `Bogus`",
    );
    // Rate limiters: {} is the same as none; buckets are checked for their fields.
    api.ok(
        "PUT",
        "/drives/nada",
        &format!(r#"{{"drive_id": "nada", "is_root_device": false, "path_on_host": "{}", "rate_limiter": {{}}}}"#, s.path("scratch.ext4")),
    );
    assert_eq!(api.config()["drives"][2]["io_engine"], "Async");
    assert_eq!(api.config()["drives"][3]["rate_limiter"], Value::Null);
    api.refused(
        "PUT",
        "/drives/bw",
        &format!(r#"{{"drive_id": "bw", "is_root_device": false, "path_on_host": "{}", "rate_limiter": {{"bandwidth": {{"size": 1}}}}}}"#, s.path("scratch.ext4")),
        "missing field `refill_time`",
    );
    // PATCH before boot is Firecracker's pre-boot refusal.
    api.refused(
        "PATCH",
        "/drives/scratch_1",
        r#"{"drive_id": "scratch_1", "path_on_host": "foo.bar"}"#,
        NOT_BEFORE_START,
    );
    // Firecracker's order: the root drive first, the others as first put.
    let ids: Vec<String> = api.config()["drives"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["drive_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["rootfs", "scratch_1", "async_1", "nada"]);
}

#[test]
fn drive_patch_after_boot() {
    let s = Scratch::new("dpatch");
    let api = Api::preboot();
    basic_config(&api, &s);
    api.ok(
        "PUT",
        "/drives/scratch",
        &format!(r#"{{"drive_id": "scratch", "path_on_host": "{}", "is_root_device": false, "is_read_only": false}}"#, s.path("scratch.ext4")),
    );
    api.boot_without_a_vm();
    api.refused(
        "PATCH",
        "/drives/scratch",
        r#"{"drive_id": "scratch"}"#,
        "Running method expected different backend.",
    );
    for field in [
        r#""is_read_only": true"#,
        r#""io_engine": "Sync""#,
        r#""is_root_device": false"#,
    ] {
        let name = field.split('"').nth(1).unwrap();
        api.refused(
            "PATCH",
            "/drives/scratch",
            &format!(r#"{{"drive_id": "scratch", "path_on_host": "foo.bar", {field}}}"#),
            &format!("unknown field `{name}`"),
        );
    }
    api.refused(
        "PATCH",
        "/drives/scratch",
        r#"{"drive_id": "scratch", "path_on_host": "foo.bar"}"#,
        "Error manipulating the backing file: No such file or directory (os error 2) foo.bar",
    );
    api.refused(
        "PATCH",
        "/drives/nothere",
        r#"{"drive_id": "nothere", "path_on_host": "foo.bar"}"#,
        "No drive with ID nothere",
    );
    // A new backing file, then a limiter with it, then a limiter alone.
    std::fs::write(s.path("scratch_new.ext4"), vec![0u8; 8192]).unwrap();
    api.ok(
        "PATCH",
        "/drives/scratch",
        &format!(
            r#"{{"drive_id": "scratch", "path_on_host": "{}"}}"#,
            s.path("scratch_new.ext4")
        ),
    );
    api.ok(
        "PATCH",
        "/drives/scratch",
        &format!(
            r#"{{"drive_id": "scratch", "path_on_host": "{}",
                "rate_limiter": {{"bandwidth": {{"size": 1000000, "refill_time": 100}},
                                  "ops": {{"size": 1, "refill_time": 100}}}}}}"#,
            s.path("scratch_new.ext4")
        ),
    );
    api.ok(
        "PATCH",
        "/drives/scratch",
        r#"{"drive_id": "scratch", "rate_limiter": {"bandwidth": {"size": 5000, "refill_time": 100},
            "ops": {"size": 500, "refill_time": 100}}}"#,
    );
    api.refused(
        "PATCH",
        "/drives/scratch",
        r#"{"drive_id": "scratch", "path_on_host": "foo.bar",
            "rate_limiter": {"bandwidth": {"size": 5000, "refill_time": 100}}}"#,
        "No such file or directory",
    );
    let drives = api.config()["drives"].clone();
    let scratch = drives
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["drive_id"] == "scratch")
        .unwrap()
        .clone();
    assert_eq!(
        scratch,
        serde_json::json!({
            "drive_id": "scratch",
            "partuuid": null,
            "is_root_device": false,
            "cache_type": "Unsafe",
            "is_read_only": false,
            "path_on_host": s.path("scratch_new.ext4"),
            "rate_limiter": {
                "bandwidth": {"size": 5000, "one_time_burst": null, "refill_time": 100},
                "ops": {"size": 500, "one_time_burst": null, "refill_time": 100},
            },
            "io_engine": "Sync",
            "socket": null,
        })
    );
    // The VM's own configuration follows (the disk is the second, after the root one).
    match &lock(&api.0.state).phase {
        Phase::Running { config, .. } => {
            assert!(config.disks[1].path.ends_with("scratch_new.ext4"));
            assert_eq!(config.disks[1].rate_limiter.unwrap().ops.unwrap().size, 500);
        }
        other => panic!("{other:?}"),
    }
    // Drives cannot be put after boot.
    api.refused(
        "PUT",
        "/drives/late",
        &format!(
            r#"{{"drive_id": "late", "path_on_host": "{}", "is_root_device": false}}"#,
            s.path("other.ext4")
        ),
        "not supported after starting the microVM",
    );
}

#[test]
fn network_interface_rules() {
    let api = Api::preboot();
    let net = |id: &str, tap: &str, mac: &str| {
        format!(r#"{{"iface_id": "{id}", "host_dev_name": "{tap}", "guest_mac": "{mac}"}}"#)
    };
    api.ok(
        "PUT",
        "/network-interfaces/1",
        &net("1", "fctap1", "06:00:00:00:00:01"),
    );
    api.ok(
        "PUT",
        "/network-interfaces/2",
        &net("2", "fctap2", "07:00:00:00:00:01"),
    );
    api.refused(
        "PUT",
        "/network-interfaces/2",
        &net("2", "fctap2", "06:00:00:00:00:01"),
        "The MAC address is already in use: 06:00:00:00:00:01",
    );
    // Case does not make a different MAC.
    api.refused(
        "PUT",
        "/network-interfaces/3",
        &net("3", "fctap3", "07:00:00:00:00:01"),
        "already in use",
    );
    api.ok(
        "PUT",
        "/network-interfaces/2",
        &net("2", "fctap2", "08:00:00:00:00:01"),
    );
    api.refused(
        "PUT",
        "/network-interfaces/1",
        &net("1", "fctap2", "06:00:00:00:00:01"),
        "Could not create the network device",
    );
    // As in Firecracker, the refused update removed interface 1: its MAC is free again.
    api.ok(
        "PUT",
        "/network-interfaces/3",
        &net("3", "fctap3", "06:00:00:00:00:01"),
    );
    api.refused(
        "PUT",
        "/network-interfaces/4",
        &net("5", "fctap4", "06:00:00:00:00:04"),
        "The id from the path [4] does not match the id from the body [5]!",
    );
    api.refused(
        "PUT",
        "/network-interfaces/a.b",
        &net("a.b", "t", "06:00:00:00:00:05"),
        "alphanumeric",
    );
    api.refused(
        "PUT",
        "/network-interfaces/4",
        &net("4", "t4", "zz"),
        "invalid guest_mac",
    );
    api.refused(
        "PUT",
        "/network-interfaces/4",
        &net("4", "t4", "6:0:0:0:0:1"),
        "invalid guest_mac",
    );
    api.refused(
        "PUT",
        "/network-interfaces/4",
        &net("4", "a-tap-name-longer-than-15", "06:00:00:00:00:06"),
        "not a TAP device name",
    );
    api.refused(
        "PUT",
        "/network-interfaces/4",
        r#"{"iface_id": "4", "host_dev_name": "t4", "mtu": 67}"#,
        "mtu 67 is below 68",
    );
    api.refused(
        "PUT",
        "/network-interfaces/4",
        r#"{"iface_id": "4", "host_dev_name": "t4", "mtu": 65536}"#,
        "invalid value",
    );
    api.refused(
        "PUT",
        "/network-interfaces/4",
        r#"{"iface_id": "4"}"#,
        "missing field `host_dev_name`",
    );
    api.refused(
        "PATCH",
        "/network-interfaces/1",
        r#"{"iface_id": "1"}"#,
        NOT_BEFORE_START,
    );
    let ids: Vec<Value> = api.config()["network-interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["iface_id"].clone())
        .collect();
    assert_eq!(ids, ["2", "3"]);
}

#[test]
fn phase_rules_after_boot() {
    let s = Scratch::new("after");
    let api = Api::preboot();
    basic_config(&api, &s);
    api.ok(
        "PUT",
        "/network-interfaces/1",
        r#"{"iface_id": "1", "host_dev_name": "fct1"}"#,
    );
    api.boot_without_a_vm();
    let kernel = format!(r#"{{"kernel_image_path": "{}"}}"#, s.path("vmlinux"));
    for (m, p, b) in [
        ("PUT", "/boot-source", kernel.as_str()),
        ("PATCH", "/machine-config", r#"{"vcpu_count": 4}"#),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 4, "mem_size_mib": 128}"#,
        ),
        (
            "PUT",
            "/vsock",
            r#"{"guest_cid": 17, "uds_path": "vsock.sock"}"#,
        ),
        ("PUT", "/entropy", "{}"),
        ("PUT", "/logger", r#"{"level": "Info"}"#),
        ("PUT", "/serial", "{}"),
        ("PUT", "/cpu-config", "{}"),
        ("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
    ] {
        api.refused(m, p, b, NOT_AFTER_START);
    }
    api.refused(
        "PATCH",
        "/boot-source",
        r#"{"kernel_image_path": "x"}"#,
        "Invalid request method",
    );
    api.refused(
        "PATCH",
        "/logger",
        r#"{"level": "Error"}"#,
        "Invalid request method",
    );
    let tx = r#"{"bandwidth": {"size": 1000000, "refill_time": 100, "one_time_burst": null}, "ops": null}"#;
    api.ok(
        "PATCH",
        "/network-interfaces/1",
        &format!(r#"{{"iface_id": "1", "tx_rate_limiter": {tx}}}"#),
    );
    let n = &api.config()["network-interfaces"][0];
    assert_eq!(
        n["tx_rate_limiter"],
        serde_json::from_str::<Value>(tx).unwrap()
    );
    assert_eq!(n["rx_rate_limiter"], Value::Null);
    api.refused(
        "PATCH",
        "/network-interfaces/1",
        r#"{"iface_id": "1", "host_dev_name": "other"}"#,
        "unknown field `host_dev_name`",
    );
    api.refused(
        "PATCH",
        "/network-interfaces/9",
        r#"{"iface_id": "9"}"#,
        "no interface with ID 9",
    );
    api.refused("DELETE", "/drives/rootfs", "", "hot-unplugging");
    let info = json_of(&api.call("GET", "/", ""));
    assert_eq!(info["state"], "Running");
    assert_eq!(info["id"], "anonymous-instance");
    let v1 = json_of(&api.call("GET", "/version", ""));
    assert!(v1["firecracker_version"].is_string());
}

#[test]
fn requests_firecracker_refuses_before_it_looks_at_them() {
    let api = Api::preboot();
    api.refused(
        "PATCH",
        "/boot-source",
        r#"{"kernel_image_path": "otherfile"}"#,
        "Invalid request method and/or path: PATCH boot-source.",
    );
    api.refused("PUT", "/machine-config", "", "Empty PUT request.");
    api.refused("PATCH", "/vm", "", "Empty PATCH request.");
    api.refused(
        "GET",
        "/machine-config",
        "{}",
        "GET request cannot have a body.",
    );
    api.refused("DELETE", "/", "", "Invalid request method");
    api.refused(
        "PUT",
        "/nothing",
        "{}",
        "Invalid request method and/or path: PUT nothing.",
    );
    api.refused(
        "PUT",
        "/actions",
        r#"{"action_type": "Explode"}"#,
        "unknown variant `Explode`",
    );
    api.refused(
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
        NOT_BEFORE_START,
    );
    api.refused(
        "PUT",
        "/actions",
        r#"{"action_type": "FlushMetrics"}"#,
        NOT_BEFORE_START,
    );
    api.refused("PATCH", "/vm", r#"{"state": "Resumed"}"#, NOT_BEFORE_START);
    api.refused(
        "PATCH",
        "/vm",
        r#"{"state": "Frozen"}"#,
        "unknown variant `Frozen`",
    );
    api.refused("PUT", "/machine-config", "{", "deserializing");
    api.refused(
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path": "foo.bar"}"#,
        "The kernel file cannot be opened: No such file or directory (os error 2)",
    );
    api.refused(
        "PUT",
        "/vsock",
        r#"{"guest_cid": 2, "uds_path": "/tmp/v.sock"}"#,
        "reserved",
    );
    api.refused(
        "PUT",
        "/entropy",
        r#"{"bogus": 1}"#,
        "unknown field `bogus`",
    );
    api.refused(
        "PUT",
        "/serial",
        r#"{"serial_out_path": 5}"#,
        "invalid type",
    );
}

#[test]
fn swagger_endpoints_for_absent_devices_say_so() {
    let api = Api::preboot();
    for (m, p, b, want) in [
        ("PUT", "/mmds", "{}", "MMDS"),
        ("GET", "/mmds", "", "MMDS"),
        (
            "PUT",
            "/mmds/config",
            r#"{"network_interfaces": []}"#,
            "MMDS",
        ),
        (
            "PUT",
            "/pmem/p",
            r#"{"id": "p", "path_on_host": "/x"}"#,
            "virtio-pmem",
        ),
        (
            "PUT",
            "/hotplug/memory",
            r#"{"total_size_mib": 1024}"#,
            "virtio-mem",
        ),
        // Run-time requests before boot: Firecracker's pre-boot refusal first.
        ("PATCH", "/pmem/p", r#"{"id": "p"}"#, NOT_BEFORE_START),
        (
            "PATCH",
            "/balloon/hinting/start",
            r#"{"acknowledge_on_stop": true}"#,
            NOT_BEFORE_START,
        ),
        ("GET", "/balloon/hinting/status", "", NOT_BEFORE_START),
        (
            "PATCH",
            "/hotplug/memory",
            r#"{"requested_size_mib": 512}"#,
            NOT_BEFORE_START,
        ),
        ("GET", "/balloon/statistics", "", NOT_BEFORE_START),
        ("DELETE", "/drives/d", "", NOT_BEFORE_START),
    ] {
        api.refused(m, p, b, want);
    }
    let r = api.call(
        "PUT",
        "/balloon",
        r#"{"amount_mib": 1, "deflate_on_oom": false, "free_page_reporting": true}"#,
    );
    assert!(
        msg(&r).contains("PUT /balloon") && msg(&r).contains("free_page_reporting"),
        "names the endpoint and the field: {}",
        msg(&r)
    );
}

/// Firecracker's balloon sequence: PUT before boot, PATCH (target and statistics
/// interval) before and after, GET of the device and of its statistics.
#[test]
fn balloon_is_configured_before_boot_and_steered_after() {
    let s = Scratch::new("balloon");
    let api = Api::preboot();
    basic_config(&api, &s);
    api.refused("GET", "/balloon", "", "No balloon device found.");
    api.refused(
        "PATCH",
        "/balloon",
        r#"{"amount_mib": 2}"#,
        "No balloon device found.",
    );
    api.refused(
        "PUT",
        "/balloon",
        r#"{"amount_mib": 1}"#,
        "missing field `deflate_on_oom`",
    );
    api.refused(
        "PUT",
        "/balloon",
        r#"{"amount_mib": 4294967295, "deflate_on_oom": false}"#,
        "Amount of pages requested is too large.",
    );
    api.ok(
        "PUT",
        "/balloon",
        r#"{"amount_mib": 16, "deflate_on_oom": true, "stats_polling_interval_s": 1}"#,
    );
    api.ok("PATCH", "/balloon", r#"{"amount_mib": 32}"#);
    api.ok(
        "PATCH",
        "/balloon/statistics",
        r#"{"stats_polling_interval_s": 5}"#,
    );
    let r = api.call("GET", "/balloon", "");
    assert_eq!(r.status, 200);
    assert_eq!(
        json_of(&r),
        serde_json::json!({"amount_mib": 32, "deflate_on_oom": true,
            "stats_polling_interval_s": 5, "free_page_hinting": false,
            "free_page_reporting": false})
    );
    assert_eq!(api.config()["balloon"]["amount_mib"], 32);
    api.refused("GET", "/balloon/statistics", "", NOT_BEFORE_START);
    api.boot_without_a_vm();
    {
        let st = lock(&api.0.state);
        let Phase::Running { config, .. } = &st.phase else {
            panic!("not running");
        };
        assert_eq!(
            config.balloon,
            Some(crate::config::BalloonConfig {
                amount_mib: 32,
                deflate_on_oom: true,
                stats_polling_interval_s: 5
            })
        );
    }
    api.refused(
        "PUT",
        "/balloon",
        r#"{"amount_mib": 1, "deflate_on_oom": false}"#,
        NOT_AFTER_START,
    );
    api.ok("PATCH", "/balloon", r#"{"amount_mib": 64}"#);
    api.refused(
        "PATCH",
        "/balloon",
        r#"{"amount_mib": 257}"#,
        "Requested memory should be less than 256MiB",
    );
    let r = api.call("GET", "/balloon/statistics", "");
    assert_eq!(r.status, 200, "{}", msg(&r));
    let v = json_of(&r);
    assert_eq!(v["target_pages"], 64 * 256);
    assert_eq!(v["target_mib"], 64);
    assert_eq!(v["actual_pages"], 0);
    assert_eq!(api.call("GET", "/balloon", "").status, 200);
    assert_eq!(json_of(&api.call("GET", "/balloon", ""))["amount_mib"], 64);
    api.ok(
        "PATCH",
        "/balloon/statistics",
        r#"{"stats_polling_interval_s": 2}"#,
    );
    api.refused(
        "PATCH",
        "/balloon/statistics",
        r#"{"stats_polling_interval_s": 0}"#,
        "Statistics cannot be enabled/disabled after activation.",
    );
    api.refused(
        "PATCH",
        "/balloon/hinting/start",
        "{}",
        "PATCH /balloon/hinting/start",
    );
}

#[test]
fn balloon_statistics_need_an_interval_set_before_boot() {
    let s = Scratch::new("balloon-nostats");
    let api = Api::preboot();
    basic_config(&api, &s);
    api.ok(
        "PUT",
        "/balloon",
        r#"{"amount_mib": 0, "deflate_on_oom": false}"#,
    );
    api.boot_without_a_vm();
    api.refused(
        "GET",
        "/balloon/statistics",
        "",
        "Received stats query when stats are disabled.",
    );
    api.refused(
        "PATCH",
        "/balloon/statistics",
        r#"{"stats_polling_interval_s": 1}"#,
        "Statistics cannot be enabled/disabled after activation.",
    );
}

#[test]
fn instance_start_refuses_what_it_cannot_honour_naming_the_field() {
    let s = Scratch::new("start");
    let api = Api::preboot();
    api.refused(
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
        "Cannot start microvm without kernel configuration.",
    );
    basic_config(&api, &s);
    let start = |want: &str| {
        api.refused(
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#,
            want,
        )
    };
    // SMT is two threads per core in the guest's topology.
    api.ok("PATCH", "/machine-config", r#"{"smt": true}"#);
    let c = lock(&api.0.state)
        .fc
        .to_vm_config(&SerialConfig::Null, Accel::Auto)
        .unwrap();
    assert_eq!((c.cpus, c.threads_per_core), (2, 2));
    api.ok("PATCH", "/machine-config", r#"{"smt": false}"#);
    api.ok(
        "PATCH",
        "/machine-config",
        r#"{"smt": false, "cpu_template": "T2"}"#,
    );
    start("cpu_template T2");
    // Dirty tracking needs no switch (the emu accelerator always keeps its log).
    api.ok(
        "PATCH",
        "/machine-config",
        r#"{"cpu_template": "None", "track_dirty_pages": true}"#,
    );
    assert!(lock(&api.0.state)
        .fc
        .to_vm_config(&SerialConfig::Null, Accel::Auto)
        .is_ok());
    api.ok(
        "PATCH",
        "/machine-config",
        r#"{"track_dirty_pages": false, "huge_pages": "2M"}"#,
    );
    start("huge_pages");
    api.ok("PATCH", "/machine-config", r#"{"huge_pages": "None"}"#);
    api.ok(
        "PUT",
        "/cpu-config",
        r#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
            "modifiers": [{"register": "ecx", "bitmap": "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx0"},
                          {"register": "eax", "bitmap": "0b0000_0000_0000_0000_0000_0000_0000_1x1x"}]}]}"#,
    );
    // CPUID modifiers reach the VmConfig (bit 0 of leaf 1 ECX cleared; EAX's low bits).
    let c = lock(&api.0.state)
        .fc
        .to_vm_config(&SerialConfig::Null, Accel::Auto)
        .unwrap();
    assert_eq!(
        c.cpuid_modifiers,
        [
            arch::cpuid::CpuidModifier {
                leaf: 1,
                subleaf: 0,
                register: 2,
                set: 0,
                clear: 1
            },
            arch::cpuid::CpuidModifier {
                leaf: 1,
                subleaf: 0,
                register: 0,
                set: 0b1010,
                clear: !0b1111,
            },
        ]
    );
    // What it cannot apply is refused, naming it.
    api.ok(
        "PUT",
        "/cpu-config",
        r#"{"msr_modifiers": [{"addr": "0x10a",
            "bitmap": "0b0000000000000000000000000000000000000000000000000000000000000001"}]}"#,
    );
    start("cpu-config msr_modifiers");
    api.ok("PUT", "/cpu-config", r#"{"kvm_capabilities": ["!56"]}"#);
    start("cpu-config kvm_capabilities");
    api.ok("PUT", "/cpu-config", "{}");
    api.ok(
        "PUT",
        "/drives/bw",
        &format!(
            r#"{{"drive_id": "bw", "path_on_host": "{}", "is_root_device": false,
            "rate_limiter": {{"bandwidth": {{"size": 1000000, "refill_time": 100}}}}}}"#,
            s.path("scratch.ext4")
        ),
    );
    // Drive, interface and entropy limiters are enforced: they reach the VmConfig.
    api.ok(
        "PUT",
        "/entropy",
        r#"{"rate_limiter": {"ops": {"size": 10, "refill_time": 100}}}"#,
    );
    let c = lock(&api.0.state)
        .fc
        .to_vm_config(&SerialConfig::Null, Accel::Auto)
        .unwrap();
    assert!(c.rng);
    assert_eq!(c.rng_rate_limiter.unwrap().ops.unwrap().size, 10);
    api.ok(
        "PUT",
        "/serial",
        r#"{"rate_limiter": {"size": 100, "refill_time": 100}}"#,
    );
    let c = lock(&api.0.state)
        .fc
        .to_vm_config(&SerialConfig::Null, Accel::Auto)
        .unwrap();
    assert_eq!(c.serial_rate_limiter.unwrap().size, 100);
    api.ok("PUT", "/serial", "{}");
    // A multicast MAC is accepted when put (as Firecracker does) and refused at start.
    api.ok(
        "PUT",
        "/network-interfaces/1",
        r#"{"iface_id": "1", "host_dev_name": "fct1", "guest_mac": "07:00:00:00:00:01"}"#,
    );
    start("multicast");
}

#[test]
fn cpu_config_is_checked_when_put() {
    let api = Api::preboot();
    api.refused(
        "PUT",
        "/cpu-config",
        r#"{"foo": false}"#,
        "unknown field `foo`",
    );
    api.refused(
        "PUT",
        "/cpu-config",
        r#"{"cpuid_modifiers": [{"leaf": "zz", "subleaf": "0", "flags": 0, "modifiers": []}]}"#,
        "Configure CPU error: CPUID leaf",
    );
    api.refused(
        "PUT",
        "/cpu-config",
        r#"{"msr_modifiers": [{"addr": "0x10a", "bitmap": "0b01"}]}"#,
        "not 64 characters",
    );
    api.refused(
        "PUT",
        "/cpu-config",
        r#"{"cpuid_modifiers": [{"leaf": "1", "subleaf": "0", "flags": 0,
            "modifiers": [{"register": "esi", "bitmap": "0b0"}]}]}"#,
        "unknown variant `esi`",
    );
    api.ok(
        "PUT",
        "/cpu-config",
        r#"{"kvm_capabilities": ["!56"], "msr_modifiers": [{"addr": "0x10a",
            "bitmap": "0b0000000000000000000000000000000000000000000000000000000000000001"}]}"#,
    );
}

#[test]
fn vsock_and_entropy_can_be_put_again_before_boot() {
    let api = Api::preboot();
    api.ok(
        "PUT",
        "/vsock",
        r#"{"guest_cid": 15, "uds_path": "vsock.sock"}"#,
    );
    api.ok(
        "PUT",
        "/vsock",
        r#"{"guest_cid": 166, "uds_path": "vsock.sock"}"#,
    );
    let r = api.ok(
        "PUT",
        "/vsock",
        r#"{"vsock_id": "vsock1", "guest_cid": 15, "uds_path": "vsock.sock"}"#,
    );
    assert!(r
        .headers
        .iter()
        .any(|(k, v)| k == "Deprecation" && v == "true"));
    assert_eq!(
        api.config()["vsock"],
        serde_json::json!({"guest_cid": 15, "uds_path": "vsock.sock"})
    );
    api.ok("PUT", "/entropy", "{}");
    api.ok(
        "PUT",
        "/entropy",
        r#"{"rate_limiter": {"ops": {"size": 0, "refill_time": 0}}}"#,
    );
    assert!(api.config()["entropy"].is_object());
}

#[test]
fn logger_and_metrics_write_their_files() {
    let s = Scratch::new("logmet");
    let api = Api::preboot();
    api.refused(
        "PUT",
        "/logger",
        r#"{"level": "Loud"}"#,
        "unknown variant `Loud`",
    );
    api.refused(
        "PUT",
        "/logger",
        r#"{"bogus": true}"#,
        "unknown field `bogus`",
    );
    let log = s.path("fc.log");
    api.ok(
        "PUT",
        "/logger",
        &format!(r#"{{"log_path": "{log}", "level": "WARNING", "show_level": true, "show_log_origin": true}}"#),
    );
    assert!(std::path::Path::new(&log).is_file());
    // The layer writes what reaches it, in Firecracker's layout.
    use tracing_subscriber::layer::SubscriberExt;
    let subscriber = tracing_subscriber::registry().with(fc_log::ApiLogLayer);
    tracing::subscriber::with_default(subscriber, || {
        tracing::warn!("PUT /machine-config: cpu_template field is deprecated.");
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("[anonymous-instance:"), "{text}");
    assert!(text.contains(":WARN:"), "{text}");
    assert!(text.contains("fc_tests.rs:"), "{text}");
    assert!(
        text.contains("PUT /machine-config: cpu_template field is deprecated."),
        "{text}"
    );

    let metrics = s.path("fc.metrics");
    api.refused("PUT", "/metrics", "{}", "missing field `metrics_path`");
    api.ok(
        "PUT",
        "/metrics",
        &format!(r#"{{"metrics_path": "{metrics}", "emit_id": true}}"#),
    );
    api.refused(
        "PUT",
        "/metrics",
        &format!(r#"{{"metrics_path": "{metrics}"}}"#),
        "Reinitialization of metrics not allowed.",
    );
    basic_config(&api, &s);
    api.boot_without_a_vm();
    api.ok("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#);
    let text = std::fs::read_to_string(&metrics).unwrap();
    let line: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(line["put_api_requests"]["metrics_count"], 3);
    assert_eq!(line["put_api_requests"]["metrics_fails"], 2);
    assert_eq!(line["put_api_requests"]["drive_count"], 1);
    assert_eq!(line["id"], "anonymous-instance");
    // The running VM's devices are counted too (this one never ran a request).
    assert_eq!(line["block"]["read_bytes"], 0);
    assert!(line["utc_timestamp_ms"].as_u64().unwrap() > 0);
}

#[test]
fn bodies_over_51200_bytes_are_refused_before_they_are_read() {
    use std::io::{Read, Write};
    let dir = std::env::temp_dir().join(format!("vmm-cap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let api = VmmApi::new_preboot(SerialConfig::Null, Accel::Auto);
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
    // At the limit the body is read and parsed.
    let mut body = br#"{"vcpu_count": 1, "mem_size_mib": 128}"#.to_vec();
    body.resize(51_200, b' ');
    let r = ask(body.len(), &body);
    assert!(r.starts_with("HTTP/1.1 204"), "{r}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Firecracker's `--http-api-max-payload-size` (`vessel run` takes the same flag): a
/// larger limit admits larger bodies, and the refusal names the limit in force.
#[test]
fn the_payload_limit_can_be_raised() {
    let api = VmmApi::new_preboot(SerialConfig::Null, Accel::Auto);
    let h = ApiHandler(api.clone());
    let r = req("PUT", "/mmds", "");
    assert!(h.admit(&r, 1 << 20).is_some());
    api.set_max_payload(2 << 20).unwrap();
    assert!(h.admit(&r, 1 << 20).is_none());
    let refused = h.admit(&r, (2 << 20) + 1).unwrap();
    assert!(
        msg(&refused).contains("larger than the limit of 2097152"),
        "{}",
        msg(&refused)
    );
    assert!(api.set_max_payload(0).is_err());
    assert!(api.set_max_payload(u64::MAX).is_err());
}

/// test_api.py's test_negative_snapshot_load_api: each malformed body gets Firecracker's
/// own words, and a body with the deprecated `mem_file_path` is marked deprecated even
/// when it is refused.
#[test]
fn snapshot_load_bodies_are_refused_in_firecrackers_words() {
    let api = Api::preboot();
    for (body, want) in [
        (
            r#"{"snapshot_path": "foo", "mem_backend": {"backend_type": "File", "backend_path": "bar"}, "mem_file_path": "bar"}"#,
            "too many fields: either `mem_backend` or `mem_file_path` exclusively is required.",
        ),
        (
            r#"{"snapshot_path": "foo", "mem_backend": {"backend_path": "bar"}}"#,
            "missing field `backend_type`",
        ),
        (
            r#"{"snapshot_path": "foo", "mem_backend": {"backend_type": "File"}}"#,
            "missing field `backend_path`",
        ),
        (
            r#"{"snapshot_path": "foo", "mem_backend": {"backend_type": "foo", "backend_path": "bar"}}"#,
            "unknown variant `foo`, expected `File` or `Uffd`",
        ),
        (
            r#"{"mem_backend": {"backend_type": "File", "backend_path": "bar"}}"#,
            "missing field `snapshot_path`",
        ),
        (
            r#"{"snapshot_path": "foo"}"#,
            "missing field: either `mem_backend` or `mem_file_path` is required",
        ),
    ] {
        api.refused("PUT", "/snapshot/load", body, want);
    }
    let r = api.call(
        "PUT",
        "/snapshot/load",
        r#"{"snapshot_path": "/nonexistent/foo", "mem_file_path": "/nonexistent/bar"}"#,
    );
    assert_eq!(r.status, 400);
    assert!(
        r.headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("deprecation") && v == "true"),
        "{:?}",
        r.headers
    );
}

/// Issue 22: the files a request names are checked against the rights of the client
/// that sent it (its socket peer), not the VMM's: a root VMM whose socket another user
/// may use does not hand that user root-only files as kernel, initrd, drive or snapshot,
/// nor let it create sockets, logs or metrics where it may not write.
#[test]
fn files_are_checked_against_the_api_clients_rights() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "run the tests as root: they check another user's rights"
    );
    let s = Scratch::new("peer");
    std::fs::set_permissions(&s.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = s.path("secret");
    std::fs::write(&secret, vec![0u8; 4096]).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let public = s.path("vmlinux");
    std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o644)).unwrap();
    let as_peer = |api: &Api, uid: u32, method: &str, path: &str, body: &str| {
        let mut r = req(method, path, body);
        r.peer = Some(super::super::http::Cred {
            pid: 0,
            uid,
            gid: uid,
        });
        api.0.handle_req(&r)
    };
    let api = Api::preboot();
    let nobody = 65534;
    let denied = |r: Response| {
        assert_eq!(r.status, 400, "{:?}", String::from_utf8_lossy(&r.body));
        assert!(msg(&r).contains("permission denied"), "{}", msg(&r));
    };
    let boot = |k: &str| format!(r#"{{"kernel_image_path": "{k}"}}"#);
    denied(as_peer(&api, nobody, "PUT", "/boot-source", &boot(&secret)));
    denied(as_peer(
        &api,
        nobody,
        "PUT",
        "/boot-source",
        &format!(r#"{{"kernel_image_path": "{public}", "initrd_path": "{secret}"}}"#),
    ));
    let drive = |p: &str, ro: bool| {
        format!(
            r#"{{"drive_id": "d", "path_on_host": "{p}", "is_root_device": false, "is_read_only": {ro}}}"#
        )
    };
    denied(as_peer(
        &api,
        nobody,
        "PUT",
        "/drives/d",
        &drive(&secret, true),
    ));
    // Readable is not writable.
    denied(as_peer(
        &api,
        nobody,
        "PUT",
        "/drives/d",
        &drive(&public, false),
    ));
    let vsock = |p: &str| format!(r#"{{"guest_cid": 3, "uds_path": "{p}"}}"#);
    denied(as_peer(
        &api,
        nobody,
        "PUT",
        "/vsock",
        &vsock(&s.path("v.sock")),
    ));
    denied(as_peer(
        &api,
        nobody,
        "PUT",
        "/logger",
        &format!(r#"{{"log_path": "{}"}}"#, s.path("fc.log")),
    ));
    denied(as_peer(
        &api,
        nobody,
        "PUT",
        "/metrics",
        &format!(r#"{{"metrics_path": "{}"}}"#, s.path("m.json")),
    ));
    denied(as_peer(
        &api,
        nobody,
        "PUT",
        "/snapshot/load",
        &format!(r#"{{"snapshot_path": "{secret}", "mem_file_path": "{public}"}}"#),
    ));
    // What the peer may use is accepted.
    for (path, body) in [
        ("/boot-source", boot(&public)),
        ("/drives/d", drive(&public, true)),
    ] {
        let r = as_peer(&api, nobody, "PUT", path, &body);
        assert_eq!(
            r.status,
            204,
            "{path}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
    }
    // The same requests from root are the VMM's own business.
    for (path, body) in [
        ("/boot-source", boot(&secret)),
        ("/drives/d", drive(&secret, false)),
        ("/vsock", vsock(&s.path("v.sock"))),
    ] {
        let r = as_peer(&api, 0, "PUT", path, &body);
        assert_eq!(
            r.status,
            204,
            "{path}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
    }
}
