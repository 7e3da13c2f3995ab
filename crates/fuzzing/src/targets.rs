//! The targets: the manager API's request parsing, the libvirt XML importers (domains;
//! networks, pools and volumes), the Firecracker-compatible API, and the three older ones (x86emu instruction bytes,
//! virtqueues, qcow2 images).

use std::sync::Arc;

use vmm::api::http::{self, Handler, Reply};

use crate::Target;

pub const ALL: &[Target] = &[
    Target {
        name: "manager_api",
        run: manager_api,
        seeds: manager_api_seeds,
        dictionary: HTTP_JSON,
        max_len: 16 << 10,
    },
    Target {
        name: "libvirt_xml",
        run: libvirt_xml,
        seeds: libvirt_xml_seeds,
        dictionary: XML,
        max_len: 16 << 10,
    },
    Target {
        name: "libvirt_net_storage_xml",
        run: libvirt_net_storage_xml,
        seeds: libvirt_net_storage_xml_seeds,
        dictionary: NET_STORAGE_XML,
        max_len: 16 << 10,
    },
    Target {
        name: "firecracker_api",
        run: firecracker_api,
        seeds: firecracker_api_seeds,
        dictionary: FIRECRACKER,
        max_len: 16 << 10,
    },
    Target {
        name: "x86emu_exec",
        run: x86emu_exec,
        seeds: x86emu_seeds,
        dictionary: &[],
        max_len: 4200,
    },
    Target {
        name: "virtio_queues",
        run: virtio_queues,
        seeds: virtio_seeds,
        dictionary: &[],
        max_len: 64 << 10,
    },
    Target {
        name: "qcow2_ops",
        run: qcow2_ops,
        seeds: qcow2_seeds,
        dictionary: &[],
        max_len: 1 << 20,
    },
];

/// The variant of a Debug-printed value (`Malformed("…")` → `Malformed`).
fn variant(debug: String) -> String {
    debug
        .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .next()
        .unwrap_or("")
        .to_string()
}

/// An error message without the parts that come from the input (quoted text, numbers,
/// names after the first few words), so that outcomes stay few.
fn shape(msg: &str) -> String {
    let mut out = String::new();
    for c in msg.chars() {
        if matches!(c, '"' | '\'' | '<' | '`') || c.is_ascii_digit() || out.len() >= 48 {
            break;
        }
        out.push(c);
    }
    out.split_whitespace().take(7).collect::<Vec<_>>().join(" ")
}

/// `parse_only`'s answer: its status and code, and the shape of its message.
fn api_outcome(s: String) -> String {
    match s.split_once(": ") {
        Some((head, rest)) => format!("{head}: {}", shape(rest)),
        None => s,
    }
}

fn http_request(method: &str, path: &str, ctype: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {ctype}\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Reads a request as the server does, then (when the bytes have a head at all) again
/// with its Content-Length set to the bytes that follow the head: mutations that change
/// a body's length still reach the body's parser.
fn requests(
    data: &[u8],
) -> (
    Result<Option<http::Request>, http::HttpError>,
    Option<http::Request>,
) {
    let strict = http::read_request(&mut &data[..]);
    let lenient = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .and_then(|end| {
            let head = &data[..end];
            let body = &data[end + 4..];
            let mut fixed: Vec<u8> = Vec::with_capacity(data.len() + 32);
            for line in head.split(|&b| b == b'\n') {
                let l = line.strip_suffix(b"\r").unwrap_or(line);
                if l.len() >= 15 && l[..15].eq_ignore_ascii_case(b"content-length:") {
                    continue;
                }
                fixed.extend_from_slice(l);
                fixed.extend_from_slice(b"\r\n");
            }
            fixed.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
            fixed.extend_from_slice(body);
            http::read_request(&mut &fixed[..]).ok().flatten()
        });
    (strict, lenient)
}

// ---- manager_api ----------------------------------------------------------------------

/// A raw HTTP request through the daemon's HTTP parser and the API's request parsing
/// (`manager::api::parse_only`).
pub fn manager_api(data: &[u8]) -> String {
    let (strict, lenient) = requests(data);
    let first = match strict {
        Ok(Some(req)) => api_outcome(manager::api::parse_only(&req)),
        Ok(None) => "empty".into(),
        Err(e) => format!("http {}", variant(format!("{e:?}"))),
    };
    match lenient {
        Some(req) => format!("{first}\n{}", api_outcome(manager::api::parse_only(&req))),
        None => first,
    }
}

const DOMAIN_JSON: &str = r#"{"name": "web", "driver": "vessel", "autostart": false, "vm": {"kernel": "/etc/passwd", "initrd": "/etc/passwd", "cmdline": "console=ttyS0", "memory_mib": 256, "cpus": 2, "accel": "emu", "disks": [{"path": "vol://p/v", "format": "qcow2"}, {"path": "/d.raw", "read_only": true}], "rng": true, "vsock": {"guest_cid": 3, "uds_path": "/v.sock"}}, "interfaces": [{"network": "default", "mac": "52:54:00:00:00:01"}]}"#;

fn manager_api_seeds() -> Vec<Vec<u8>> {
    vec![
        http_request("GET", "/v1/domains", "application/json", ""),
        http_request("POST", "/v1/domains", "application/json", DOMAIN_JSON),
        http_request(
            "POST",
            "/v1/domains",
            "application/json",
            r#"{"name": "small", "vm": {"kernel": "/etc/passwd", "memory_mib": 64, "disks": [{"path": "/etc/hostname", "format": "raw", "read_only": true}]}}"#,
        ),
        http_request("PUT", "/v1/domains/web", "application/json", DOMAIN_JSON),
        http_request("POST", "/v1/domains", "application/xml", DOMAIN_XML),
        http_request(
            "POST",
            "/v1/networks",
            "application/json",
            r#"{"name": "n", "bridge": "vbr0", "address": "10.0.7.1/24", "dhcp": {"start": "10.0.7.10", "end": "10.0.7.99"}, "hosts": [{"mac": "52:54:00:00:00:02", "ip": "10.0.7.20"}], "nat": true}"#,
        ),
        http_request(
            "POST",
            "/v1/domains/web/shutdown?wait=5",
            "application/json",
            "",
        ),
        http_request(
            "POST",
            "/v1/domains/web/save",
            "application/json",
            r#"{"path": "/tmp/s"}"#,
        ),
        http_request(
            "POST",
            "/v1/pools/p/volumes",
            "application/json",
            r#"{"name": "v", "capacity": 1048576, "format": "qcow2"}"#,
        ),
        http_request(
            "PUT",
            "/v1/pools/p/volumes/v/data?offset=0",
            "application/octet-stream",
            "abcd",
        ),
        b"GET /v1/domains/a%20b?x=%zz&y HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
    ]
}

const HTTP_JSON: &[&[u8]] = &[
    b"\r\n",
    b"\r\n\r\n",
    b"Content-Length: ",
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Type: application/xml\r\n",
    b"Authorization: Bearer x\r\n",
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b" HTTP/1.1",
    b"/v1/domains/",
    b"/v1/pools/p/volumes/",
    b"/v1/networks/",
    b"/data",
    b"/start",
    b"%2F",
    b"%00",
    b"?wait=",
    b"?offset=",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"null",
    b"true",
    b"\"name\": ",
    b"\"vm\": ",
    b"\"kernel\": ",
    b"\"disks\": ",
    b"\"path\": ",
    b"\"format\": ",
    b"\"interfaces\": ",
    b"\"mac\": ",
    b"\"tap\": ",
    b"\"cloud_init\": ",
    b"\"firmware\": ",
    b"vol://",
    b"\\u0000",
    b"\\ud800",
    b"..",
];

// ---- libvirt_xml ----------------------------------------------------------------------

/// libvirt domain XML through the importer; what it accepts must survive a round trip
/// through the exporter unchanged.
pub fn libvirt_xml(data: &[u8]) -> String {
    let Ok(text) = std::str::from_utf8(data) else {
        return "utf8".into();
    };
    match manager::xml::parse_domain(text) {
        Err(e) => format!("err {}", shape(&e.to_string())),
        Ok(d) => {
            let x = manager::xml::to_xml(&d);
            match manager::xml::parse_domain(&x) {
                Ok(again) => {
                    assert_eq!(again, d, "the XML round trip changed the domain:\n{x}");
                    format!("ok {:?} {}", d.driver, d.vm.disks.len().min(4))
                }
                Err(e) => panic!("our own XML does not import again: {e}\n{x}"),
            }
        }
    }
}

const DOMAIN_XML: &str = r#"<domain type='kvm'>
  <name>web</name>
  <uuid>8c0b7b34-1c0e-4c47-9a4a-7c1e0c7e5f11</uuid>
  <memory unit='GiB'>1</memory>
  <currentMemory unit='MiB'>512</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <cpu mode='custom' match='exact'><model fallback='forbid'>x86-64-v2</model></cpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>/etc/passwd</kernel><initrd>/etc/hostname</initrd>
    <cmdline>console=ttyS0 &amp; quiet</cmdline></os>
  <features><acpi/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/var/lib/x.qcow2'/><target dev='vda' bus='virtio'/><readonly/></disk>
    <interface type='network'><mac address='52:54:00:00:00:01'/><source network='default'/></interface>
    <disk type='volume' device='disk'><source pool='images' volume='data.raw'/></disk>
    <interface type='bridge'><source bridge='br0'/></interface>
    <serial type='pty'/><console type='pty'/>
  </devices>
</domain>"#;

fn libvirt_xml_seeds() -> Vec<Vec<u8>> {
    vec![
        DOMAIN_XML.as_bytes().to_vec(),
        b"<domain type='vessel'><name>img</name><memory unit='MiB'>1024</memory>
            <os><type arch='x86_64' machine='q35'>hvm</type><boot dev='hd'/></os>
            <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
            <source file='/var/lib/cloud.qcow2'/><target dev='vda' bus='virtio'/></disk>
            </devices></domain>"
            .to_vec(),
        b"<domain><name>a</name><memory>1024</memory><cpu mode='host-passthrough'/><os><kernel>/k</kernel></os></domain>".to_vec(),
        b"<domain type='kvm'><name>k</name><memory unit='MiB'>64</memory><os><kernel>/etc/passwd</kernel></os><devices><disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/etc/hostname'/><target dev='vda' bus='virtio'/></disk></devices></domain>".to_vec(),
        b"<?xml version='1.0'?><!-- c --><domain type='qemu'><name>q</name><memory unit='KiB'>262144</memory><vcpu>1</vcpu><os><type>hvm</type><kernel>/k</kernel><cmdline>a=&quot;b&quot;</cmdline></os><devices><rng model='virtio'><backend model='random'>/dev/urandom</backend></rng></devices></domain>".to_vec(),
    ]
}

// ---- libvirt_net_storage_xml -------------------------------------------------------

/// libvirt network, pool and volume XML (what `net-define`, `pool-define` and
/// `vol-create` read) through their importers; a network they accept must come back
/// unchanged through `net-dumpxml`'s exporter and the importer.
pub fn libvirt_net_storage_xml(data: &[u8]) -> String {
    let Ok(text) = std::str::from_utf8(data) else {
        return "utf8".into();
    };
    use manager::libvirt_xml as lx;
    let net = match lx::network_from_xml(text) {
        Err(e) => format!("net err {}", shape(&e.to_string())),
        Ok(d) => {
            let bridge = d.bridge.clone().unwrap_or_else(|| "virbr0".into());
            let x = lx::network_to_xml(&d, &bridge);
            match lx::network_from_xml(&x) {
                Ok(mut again) => {
                    // The dump names the bridge the network runs on.
                    again.bridge = d.bridge.clone();
                    assert_eq!(again, d, "the network XML round trip changed it:\n{x}");
                    format!("net ok nat={} dhcp={}", d.nat, d.dhcp.is_some())
                }
                Err(e) => panic!("our own network XML does not import again: {e}\n{x}"),
            }
        }
    };
    let pool = match lx::pool_from_xml(text) {
        Err(e) => format!("pool err {}", shape(&e.to_string())),
        Ok((_, _, uuid, perms)) => format!("pool ok {} {}", uuid.is_some(), perms.is_some()),
    };
    let vol = match lx::volume_from_xml(text) {
        Err(e) => format!("vol err {}", shape(&e.to_string())),
        Ok((_, _, format, _)) => format!("vol ok {format}"),
    };
    format!("{net} | {pool} | {vol}")
}

fn libvirt_net_storage_xml_seeds() -> Vec<Vec<u8>> {
    vec![
        b"<network><name>default</name><uuid>a4ecf0f4-3a0a-4bd4-a6b5-3e0c1b7f1a2e</uuid>
            <forward mode='nat'><nat><port start='1024' end='65535'/></nat></forward>
            <bridge name='virbr0' stp='on' delay='0'/><mac address='52:54:00:0a:0b:0c'/>
            <ip address='192.168.122.1' netmask='255.255.255.0'><dhcp>
            <range start='192.168.122.2' end='192.168.122.254'/>
            <host mac='52:54:00:00:00:07' ip='192.168.122.7'/></dhcp></ip></network>"
            .to_vec(),
        b"<network><name>iso</name><ip address='10.1.0.1' prefix='16'/></network>".to_vec(),
        b"<pool type='dir'><name>images</name><uuid>0b7a2f0e-1c5d-4b8e-9f3a-2d4c6e8a0b1c</uuid>
            <target><path>/var/lib/vessel/images</path><permissions><mode>0755</mode>
            <owner>0</owner><group>0</group></permissions></target></pool>"
            .to_vec(),
        b"<pool type='logical'><name>vg</name><source><device path='/dev/sdb'/></source></pool>"
            .to_vec(),
        b"<volume><name>disk.qcow2</name><capacity unit='GiB'>1</capacity>
            <allocation>0</allocation><target><format type='qcow2'/>
            <permissions><mode>0600</mode></permissions></target></volume>"
            .to_vec(),
        b"<volume type='file'><name>r.raw</name><capacity unit='bytes'>1048576</capacity></volume>"
            .to_vec(),
    ]
}

const NET_STORAGE_XML: &[&[u8]] = &[
    b"<network>",
    b"</network>",
    b"<pool type='dir'>",
    b"</pool>",
    b"<volume>",
    b"</volume>",
    b"<name>",
    b"</name>",
    b"<uuid>",
    b"<forward mode='nat'>",
    b"<forward mode='route'/>",
    b"<nat><port start='1' end='65535'/></nat>",
    b"<bridge name='br0' stp='off' delay='5'/>",
    b"<mac address='52:54:00:00:00:01'/>",
    b"<ip address='10.0.0.1' netmask='255.255.255.0'>",
    b"<ip family='ipv6' address='fd00::1' prefix='64'/>",
    b"<dhcp>",
    b"<range start='10.0.0.2' end='10.0.0.9'/>",
    b"<host mac='52:54:00:00:00:02' ip='10.0.0.5'/>",
    b"<target><path>",
    b"</path></target>",
    b"<permissions><mode>0700</mode><owner>107</owner><group>107</group></permissions>",
    b"<capacity unit='KiB'>",
    b"</capacity>",
    b"<allocation unit='MiB'>0</allocation>",
    b"<format type='raw'/>",
    b"<format type='qcow2'/>",
    b"<compat>1.1</compat>",
    b"<features><lazy_refcounts/></features>",
    b"<backingStore><path>/b</path></backingStore>",
    b"<label>system_u:object_r:virt_image_t:s0</label>",
    b"18446744073709551615",
    b"&amp;",
    b"<![CDATA[x]]>",
];

const XML: &[&[u8]] = &[
    b"<domain type='kvm'>",
    b"<domain type='vessel'>",
    b"</domain>",
    b"<name>",
    b"</name>",
    b"<memory unit='MiB'>",
    b"</memory>",
    b"<vcpu>",
    b"</vcpu>",
    b"<os>",
    b"</os>",
    b"<kernel>",
    b"</kernel>",
    b"<initrd>",
    b"<cmdline>",
    b"<devices>",
    b"</devices>",
    b"<disk type='file' device='disk'>",
    b"<disk type='volume' device='disk'>",
    b"<disk type='file' device='cdrom'>",
    b"</disk>",
    b"<source file='",
    b"<source pool='p' volume='v'/>",
    b"'/>",
    b"<driver name='qemu' type='qcow2'/>",
    b"<target dev='vda' bus='virtio'/>",
    b"<interface type='network'>",
    b"<interface type='bridge'>",
    b"<mac address='",
    b"<model type='virtio'/>",
    b"<cpu mode='custom'>",
    b"<model>",
    b"<feature policy='require' name='avx2'/>",
    b"<boot dev='hd'/>",
    b"<loader>",
    b"<serial type='pty'/>",
    b"<metadata>",
    b"<vessel:",
    b"xmlns:vessel='https://vessel.dev/xmlns/domain/1'",
    b"<!DOCTYPE d [<!ENTITY e 'x'>]>",
    b"<![CDATA[",
    b"]]>",
    b"<!--",
    b"-->",
    b"<?xml version='1.0'?>",
    b"&amp;",
    b"&lt;",
    b"&#x41;",
    b"&#0;",
    b" a='b'",
    b" unit='GiB'",
    b"/>",
];

// ---- firecracker_api ------------------------------------------------------------------

/// Requests separated by two NUL bytes, in order, to one pre-boot VMM API: each through
/// the HTTP parser and the API (state carries over, as for a real client). Requests
/// that would start a VM or create files (`/actions`, `/logger`, `/metrics`,
/// `/snapshot/…`), or whose body names `/dev`, `/proc`, `/sys` or `/run`, are parsed
/// but not sent.
pub fn firecracker_api(data: &[u8]) -> String {
    let api = vmm::api::firecracker::VmmApi::new_preboot(vmm::SerialConfig::Null, vmm::Accel::Emu);
    let handler = vmm::api::firecracker::ApiHandler(Arc::clone(&api));
    let mut out = std::collections::BTreeSet::new();
    let mut rest = data;
    for _ in 0..16 {
        let (one, next) = match rest.windows(2).position(|w| w == b"\0\0") {
            Some(i) => (&rest[..i], Some(&rest[i + 2..])),
            None => (rest, None),
        };
        let (strict, lenient) = requests(one);
        if let Err(e) = &strict {
            out.insert(variant(format!("{e:?}")));
        }
        match lenient.map(|r| Ok(Some(r))).unwrap_or(strict) {
            Ok(Some(req)) => {
                let first = req.segments().first().map(|s| s.to_string());
                // `/boot-source` opens its files: never a device or a kernel file (a
                // watchdog starts when opened, a FIFO blocks).
                let special = [&b"/dev"[..], b"/proc", b"/sys", b"/run"]
                    .iter()
                    .any(|p| req.body.windows(p.len()).any(|w| w == *p));
                let skip = special
                    || matches!(
                        first.as_deref(),
                        Some("actions" | "logger" | "metrics" | "snapshot")
                    );
                let path = req.path.clone();
                if skip {
                    out.insert("skipped".to_string());
                } else if handler.admit(&req, req.body.len() as u64).is_some() {
                    out.insert("too big".to_string());
                } else if let Reply::Response(r) = handler.handle(req) {
                    // The status and the start of the fault message, per endpoint.
                    let msg = String::from_utf8_lossy(&r.body);
                    let fault = msg.split("fault_message").nth(1).unwrap_or("");
                    let ep = path.split('/').nth(1).unwrap_or("").chars().take(20);
                    out.insert(format!(
                        "{} {} {}",
                        ep.collect::<String>(),
                        r.status,
                        shape(fault.trim_start_matches(['"', ':', ' ']))
                    ));
                }
            }
            Ok(None) => {}
            Err(e) => {
                out.insert(variant(format!("{e:?}")));
            }
        }
        match next {
            Some(n) => rest = n,
            None => break,
        }
    }
    // One line per kind of answer: the runner keeps an input that gives a new one.
    out.into_iter().collect::<Vec<_>>().join("\n")
}

fn firecracker_api_seeds() -> Vec<Vec<u8>> {
    let j = "application/json";
    let seq = |reqs: &[Vec<u8>]| reqs.join(&b"\0\0"[..]);
    vec![
        seq(&[
            http_request(
                "PUT",
                "/boot-source",
                j,
                r#"{"kernel_image_path": "/nonexistent/vmlinux", "boot_args": "console=ttyS0 reboot=k panic=1", "initrd_path": "/nonexistent/initrd"}"#,
            ),
            http_request(
                "PUT",
                "/machine-config",
                j,
                r#"{"vcpu_count": 2, "mem_size_mib": 128, "smt": false, "track_dirty_pages": false}"#,
            ),
            http_request("PATCH", "/machine-config", j, r#"{"vcpu_count": 1}"#),
            http_request(
                "PUT",
                "/drives/rootfs",
                j,
                r#"{"drive_id": "rootfs", "path_on_host": "/nonexistent/rootfs.ext4", "is_root_device": true, "is_read_only": false, "rate_limiter": {"bandwidth": {"size": 1048576, "refill_time": 100, "one_time_burst": 0}, "ops": {"size": 100, "refill_time": 1000}}}"#,
            ),
            http_request("GET", "/vm/config", j, ""),
        ]),
        seq(&[
            http_request(
                "PUT",
                "/network-interfaces/eth0",
                j,
                r#"{"iface_id": "eth0", "guest_mac": "06:00:AC:10:00:02", "host_dev_name": "tap0", "rx_rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 10}}}"#,
            ),
            http_request(
                "PUT",
                "/vsock",
                j,
                r#"{"guest_cid": 3, "uds_path": "/nonexistent/v.sock"}"#,
            ),
            http_request(
                "PUT",
                "/entropy",
                j,
                r#"{"rate_limiter": {"ops": {"size": 10, "refill_time": 100}}}"#,
            ),
            http_request(
                "PUT",
                "/cpu-config",
                j,
                r#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0, "modifiers": [{"register": "ecx", "bitmap": "0bxxxx000000000011111111111111111111"}]}]}"#,
            ),
            http_request(
                "PUT",
                "/balloon",
                j,
                r#"{"amount_mib": 0, "deflate_on_oom": false}"#,
            ),
            http_request("PATCH", "/balloon", j, r#"{"amount_mib": 4294967295}"#),
            http_request(
                "PATCH",
                "/balloon/statistics",
                j,
                r#"{"stats_polling_interval_s": 1}"#,
            ),
            http_request(
                "PUT",
                "/mmds",
                j,
                r#"{"latest": {"meta-data": {"a": "b"}}}"#,
            ),
            http_request("PATCH", "/vm", j, r#"{"state": "Paused"}"#),
            http_request("GET", "/", j, ""),
        ]),
        seq(&[
            http_request(
                "PUT",
                "/serial",
                j,
                r#"{"serial_out_path": "/nonexistent/s"}"#,
            ),
            http_request("GET", "/machine-config", j, ""),
            http_request("PUT", "/drives/x", j, r#"{"drive_id": "y"}"#),
        ]),
    ]
}

const FIRECRACKER: &[&[u8]] = &[
    b"\0\0",
    b"\r\n",
    b"\r\n\r\n",
    b"Content-Length: ",
    b"PUT ",
    b"PATCH ",
    b"GET ",
    b" HTTP/1.1",
    b"/boot-source",
    b"/drives/",
    b"/machine-config",
    b"/network-interfaces/",
    b"/vsock",
    b"/entropy",
    b"/cpu-config",
    b"/balloon",
    b"/balloon/statistics",
    b"/mmds",
    b"/mmds/config",
    b"/vm",
    b"/serial",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"null",
    b"\"kernel_image_path\": ",
    b"\"boot_args\": ",
    b"\"vcpu_count\": ",
    b"\"mem_size_mib\": ",
    b"\"smt\": true",
    b"\"drive_id\": ",
    b"\"path_on_host\": ",
    b"\"is_root_device\": true",
    b"\"is_read_only\": ",
    b"\"partuuid\": ",
    b"\"rate_limiter\": ",
    b"\"bandwidth\": ",
    b"\"ops\": ",
    b"\"size\": ",
    b"\"refill_time\": ",
    b"\"one_time_burst\": ",
    b"\"guest_cid\": ",
    b"\"uds_path\": ",
    b"\"iface_id\": ",
    b"\"guest_mac\": ",
    b"\"host_dev_name\": ",
    b"\"cpu_template\": \"T2\"",
    b"\"cpuid_modifiers\": ",
    b"\"leaf\": ",
    b"\"register\": ",
    b"\"bitmap\": ",
    b"\"state\": ",
    b"\"io_engine\": \"Async\"",
];

// ---- x86emu_exec ----------------------------------------------------------------------

/// Instruction bytes and register state (two control bytes: mode and register fill)
/// run for at most 256 instructions: the emulator must execute or raise an exception
/// into the guest.
pub fn x86emu_exec(data: &[u8]) -> String {
    use x86emu::state::{Seg, Segment};
    use x86emu::testing::{gdt_entries, long_mode_state, PageTableBuilder, PTE_U, PTE_W};
    use x86emu::{Cpu, GuestRam, NoDevices};
    const CODE: u64 = 0x10_0000;
    if data.len() < 2 {
        return "short".into();
    }
    let (ctl, rest) = data.split_at(2);
    let mut ram = GuestRam::new();
    if ram.add_owned(0, 0x40_0000).is_err() {
        return "no ram".into();
    }
    let mut pt = PageTableBuilder::new(&ram, 0x1000, 0x20000);
    let mut va = 0;
    while va < 0x40_0000 {
        pt.map(&ram, va, va, 2, PTE_W | PTE_U);
        va += 0x20_0000;
    }
    for (i, e) in gdt_entries(0x21000).iter().enumerate() {
        ram.write(0x20000 + i as u64 * 8, &e.to_le_bytes());
    }
    let code_len = rest.len().min(64);
    ram.write(CODE, &rest[..code_len]);
    ram.write(0x22000, &rest[code_len..rest.len().min(code_len + 4096)]);
    let mut cpu = Cpu::new(ram);
    let mut s = long_mode_state(pt.root, 0x20000, 0x22000, ctl[0] & 3);
    s.rip = CODE;
    s.gpr[4] = 0x30_0000;
    for (k, g) in s.gpr.iter_mut().enumerate() {
        if k != 4 {
            *g = u64::from(ctl[1]).wrapping_mul(0x0101_0101_0101_0101) ^ (k as u64) << 20;
        }
    }
    match ctl[0] >> 6 {
        1 => {
            s.seg[Seg::Cs as usize].attr =
                (s.seg[Seg::Cs as usize].attr & !Segment::ATTR_L) | Segment::ATTR_DB
        }
        2 => {
            s = x86emu::CpuState::reset();
            s.seg[Seg::Cs as usize] = Segment::real_mode((CODE >> 4) as u16, true);
            s.rip = 0;
        }
        _ => {}
    }
    cpu.set_state(s);
    variant(format!("{:?}", cpu.run(&mut NoDevices, 256)))
}

fn x86emu_seeds() -> Vec<Vec<u8>> {
    vec![
        vec![0, 0, 0x48, 0x89, 0xd8, 0x48, 0x01, 0xc3, 0xf4],
        vec![3, 0x55, 0x0f, 0x05, 0xf4],
        vec![0x40, 1, 0xb8, 0x34, 0x12, 0, 0, 0xcd, 0x80],
        vec![0x80, 2, 0xb4, 0x0e, 0xcd, 0x10, 0xea, 0, 0, 0xff, 0xff],
        vec![
            0, 7, 0x66, 0x0f, 0xfe, 0xc1, 0xc5, 0xfd, 0xfe, 0xc1, 0x0f, 0x01, 0xd0, 0xf3, 0xa4,
        ],
        vec![1, 0xff, 0xe8, 0, 0, 0, 0, 0xc3, 0x48, 0xcf, 0x0f, 0x0b],
    ]
}

// ---- virtio_queues --------------------------------------------------------------------

/// Guest memory and queue geometry against virtio-blk, -rng, -console or -balloon (first
/// byte).
pub fn virtio_queues(data: &[u8]) -> String {
    use virtio::fuzzing::{run, Target};
    let target = match data.first().map(|b| b % 4) {
        Some(0) => Target::Block,
        Some(1) => Target::Rng,
        Some(3) => Target::Balloon,
        _ => Target::Console,
    };
    format!(
        "{target:?} {}",
        run(target, data.get(1..).unwrap_or_default())
    )
}

fn virtio_seeds() -> Vec<Vec<u8>> {
    (0..4u8)
        .map(|t| {
            let mut v = vec![t];
            v.extend((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
            v
        })
        .chain([vec![0; 512], vec![1; 64], vec![2, 0xff, 0xff, 0, 0]])
        .collect()
}

// ---- qcow2_ops ------------------------------------------------------------------------

/// Arbitrary bytes opened as a qcow2 image in memory: reads, writes, discards, block
/// status, growth and the checker.
pub fn qcow2_ops(data: &[u8]) -> String {
    use block::storage::MemStorage;
    use block::{BlockBackend, Qcow2};
    let store = MemStorage::with_limit(data.to_vec(), 64 << 20);
    let mut q = match Qcow2::open(Box::new(store), false) {
        Ok(q) => q,
        Err(e) => return format!("open {}", variant(format!("{e:?}"))),
    };
    let size = q.size();
    let mut buf = vec![0u8; 8192];
    let mut failed = 0;
    for off in [0, size / 3, size / 2, size.saturating_sub(8192)] {
        let n = (size - off.min(size)).min(buf.len() as u64) as usize;
        failed += usize::from(q.read_at(off, &mut buf[..n]).is_err());
        failed += usize::from(q.write_at(off, &buf[..n]).is_err());
    }
    failed += usize::from(q.write_zeroes(0, size.min(1 << 20)).is_err());
    failed += usize::from(q.discard(size / 4, (size / 4).min(1 << 20)).is_err());
    failed += usize::from(q.block_status(0, size.min(1 << 20)).is_err());
    failed += usize::from(q.resize(size.saturating_add(1 << 20)).is_err());
    failed += usize::from(q.flush().is_err());
    let checked = match block::qcow2::check::check(&mut q, true) {
        Ok(r) => format!("c{}l{}", r.corruptions.min(3), r.leaks.min(3)),
        Err(e) => variant(format!("{e:?}")),
    };
    format!("opened {failed} {checked}")
}

fn qcow2_seeds() -> Vec<Vec<u8>> {
    let dir = std::env::temp_dir().join(format!("fuzz-qcow2-seeds-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let mut out = Vec::new();
    for (i, (size, cluster)) in [(1u64 << 20, 4096u64), (8 << 20, 65536), (3 << 20, 512)]
        .into_iter()
        .enumerate()
    {
        let p = dir.join(format!("s{i}.qcow2"));
        let opts = block::CreateOptions {
            format: block::Format::Qcow2,
            size: Some(size),
            backing: None,
            cluster_size: Some(cluster),
        };
        if block::ops::create_with(&p, &opts).is_ok() {
            if let Ok(mut d) = block::open(&p, Some(block::Format::Qcow2), false) {
                let _ = d.write_at(0, &[0x5a; 5000]);
                let _ = d.write_at(size / 2, &[0xa5; 700]);
                let _ = d.flush();
            }
            if let Ok(b) = std::fs::read(&p) {
                out.push(b);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(first) = out.first() {
        let cut = first[..first.len().min(200)].to_vec();
        out.push(cut);
    }
    out
}
