//! Many hosts on one machine: three etcd members (Debian's `etcd`, on loopback ports
//! picked free) and three `vessel daemon --cluster` hosts, each with its own socket and
//! state folder, sharing one pool folder as shared storage. Placement by the spread
//! weigher, a drain, evacuation after SIGKILL of a host, fencing, and etcd member and
//! quorum loss. The overlay network test puts each host in a network namespace of its
//! own, on an underlay bridge in another (where etcd runs): see [`Netns`]. Every
//! process is started here and killed by PID at the end; the namespaces are deleted.
//!
//! Needs `etcd` and `etcdctl` (`apt-get install etcd-server etcd-client`; scripts/test.sh
//! does) and /dev/kvm for the tiny guests; without them these tests fail saying so.

mod common;

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::guest::{linux64_elf, Lib64};
use iced_x86::code_asm::*;
use serde_json::{json, Value};

const EXE: &str = env!("CARGO_BIN_EXE_vessel");
/// Short, so that the tests see expiry soon; a real cluster uses the default 10 s.
/// (Hosts fence 1.5 s before it could expire without a renewal, and retry renewals
/// on other members well before that.)
const LEASE_TTL: &str = "6";

fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a PID this test started; no memory involved.
    unsafe {
        libc::kill(pid, sig);
    }
}

fn pid_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .map(|i| !s[i + 1..].trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot.
fn pid_start_time(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 1..]
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < within, "timed out after {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

struct Etcd {
    client: String,
    /// The network namespace it runs in, if any.
    ns: Option<String>,
    /// Its command line, to start it again on the same data.
    args: Vec<std::ffi::OsString>,
    log: PathBuf,
    child: Option<Child>,
}

impl Etcd {
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = in_ns(self.ns.as_deref(), "etcd")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }
}

/// `prog` to run in network namespace `ns`, or here.
fn in_ns(ns: Option<&str>, prog: &str) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, prog]);
            c
        }
        None => Command::new(prog),
    }
}

/// Host `i`'s address on the underlay of a cluster in network namespaces.
fn underlay_ip(i: usize) -> String {
    format!("10.250.0.{}", i + 1)
}

/// Where the etcd members of a cluster in network namespaces listen.
const UNDERLAY_ETCD: &str = "10.250.0.254";

/// The network namespaces of a cluster whose hosts stand in namespaces of their own:
/// `BASE-w` holds the underlay (a bridge, 10.250.0.254/24) and the etcd members, and
/// `BASE-hI` holds host I, on the underlay at 10.250.0.I+1 by a veth. Dropping it
/// deletes them, and with them every link made in them.
struct Netns {
    base: String,
}

impl Netns {
    fn wire(&self) -> String {
        format!("{}-w", self.base)
    }

    fn host(&self, i: usize) -> String {
        format!("{}-h{i}", self.base)
    }

    fn ip(ns: &str, args: &[&str]) {
        let o = Command::new("ip")
            .args(["-n", ns])
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "ip -n {ns} {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    fn new(tag: &str) -> Netns {
        let n = Netns {
            base: format!("vc{}{tag}", std::process::id()),
        };
        let w = n.wire();
        let add = |ns: &str| {
            let st = Command::new("ip")
                .args(["netns", "add", ns])
                .status()
                .expect("ip (iproute2) is needed");
            assert!(st.success(), "ip netns add {ns} failed (needs root)");
        };
        add(&w);
        Netns::ip(&w, &["link", "set", "lo", "up"]);
        // A fixed MAC: a bridge without one takes its lowest port's, so deleting a host's
        // namespace (and its veth) changed the address etcd answers from, and every other
        // host lost etcd until its ARP entry went stale (~6 s: all of them fenced).
        Netns::ip(
            &w,
            &[
                "link",
                "add",
                "wire",
                "address",
                "02:00:0a:fa:00:fe",
                "type",
                "bridge",
            ],
        );
        Netns::ip(
            &w,
            &["addr", "add", &format!("{UNDERLAY_ETCD}/24"), "dev", "wire"],
        );
        Netns::ip(&w, &["link", "set", "wire", "up"]);
        for i in 0..3 {
            let h = n.host(i);
            add(&h);
            Netns::ip(&h, &["link", "set", "lo", "up"]);
            let port = format!("w{i}");
            Netns::ip(
                &w,
                &[
                    "link", "add", &port, "type", "veth", "peer", "name", "uplink", "netns", &h,
                ],
            );
            Netns::ip(&w, &["link", "set", &port, "master", "wire", "up"]);
            Netns::ip(
                &h,
                &[
                    "addr",
                    "add",
                    &format!("{}/24", underlay_ip(i)),
                    "dev",
                    "uplink",
                ],
            );
            Netns::ip(&h, &["link", "set", "uplink", "up"]);
        }
        n
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in [self.host(0), self.host(1), self.host(2), self.wire()] {
            // One a test deleted already (a host killed with its namespace) is not there.
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Three etcd members and three daemons; dropping it kills them all, the VMMs and
/// dnsmasqs the daemons recorded, by PID, and then deletes its namespaces, if any.
struct Cluster {
    dir: PathBuf,
    etcd: Vec<Etcd>,
    hosts: Vec<Host>,
    netns: Option<Netns>,
    /// Where the certificates of a cluster whose etcd speaks TLS are (see [`Certs`]).
    certs: Option<Certs>,
}

/// Certificates for etcd with TLS and client-certificate auth, made with the openssl CLI:
/// a CA, a certificate for the etcd members and the daemons (server and client use,
/// for 127.0.0.1 and the underlay's etcd address), and a second CA with a client
/// certificate of its own, which etcd must refuse.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn openssl(dir: &Path, args: &[&str]) {
        let o = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("openssl not found: apt-get install openssl");
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    fn new(dir: &Path) -> Certs {
        let dir = dir.join("certs");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("openssl.cnf"),
            "[req]\ndistinguished_name=dn\n[dn]\n[ca]\nbasicConstraints=critical,CA:TRUE\n\
             keyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("leaf.ext"),
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage=serverAuth,clientAuth\n\
                 subjectAltName=IP:127.0.0.1,IP:{UNDERLAY_ETCD},DNS:localhost\n\
                 authorityKeyIdentifier=keyid\n"
            ),
        )
        .unwrap();
        for ca in ["ca", "other-ca"] {
            Certs::openssl(
                &dir,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.pem"),
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN=vessel test {ca}"),
                    "-config",
                    "openssl.cnf",
                    "-extensions",
                    "ca",
                ],
            );
        }
        for (leaf, ca) in [("etcd", "ca"), ("other", "other-ca")] {
            Certs::openssl(
                &dir,
                &[
                    "req",
                    "-new",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-keyout",
                    &format!("{leaf}.key"),
                    "-out",
                    &format!("{leaf}.csr"),
                    "-subj",
                    &format!("/CN=vessel test {leaf}"),
                    "-config",
                    "openssl.cnf",
                ],
            );
            Certs::openssl(
                &dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{leaf}.csr"),
                    "-CA",
                    &format!("{ca}.pem"),
                    "-CAkey",
                    &format!("{ca}.key"),
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    "leaf.ext",
                    "-out",
                    &format!("{leaf}.pem"),
                ],
            );
        }
        Certs { dir }
    }

    fn path(&self, f: &str) -> String {
        self.dir.join(f).to_str().unwrap().to_string()
    }

    /// The daemon's (and etcdctl's) options for the right CA and client certificate.
    fn daemon_args(&self) -> Vec<String> {
        vec![
            "--etcd-cacert".into(),
            self.path("ca.pem"),
            "--etcd-cert".into(),
            self.path("etcd.pem"),
            "--etcd-key".into(),
            self.path("etcd.key"),
        ]
    }
}

struct Host {
    name: String,
    dir: PathBuf,
    /// Its TCP API (`127.0.0.1:PORT`, or its underlay address), where the other hosts
    /// send live migrations.
    tcp: String,
    /// The network namespace it runs in, if any.
    ns: Option<String>,
    child: Option<Child>,
}

impl Host {
    fn socket(&self) -> PathBuf {
        self.dir.join("s.sock")
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(EXE)
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "vessel {args:?} on {} failed: {}{}",
            self.name,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    fn fails(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert_eq!(o.status.code(), Some(1), "vessel {args:?} should fail");
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!e.contains("panicked"), "{e}");
        e
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Domain → VMM PID, for the VMMs of this host that are alive.
    fn running(&self) -> BTreeMap<String, i32> {
        std::fs::read_dir(self.dir.join("state/run"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                // "PID START_TIME DRIVER": the start time tells a reused PID (these
                // machines have pid_max 32768, and threads take PIDs too).
                let file = std::fs::read_to_string(e.path().join("vmm.pid")).ok()?;
                let mut it = file.split_whitespace();
                let pid: i32 = it.next()?.parse().ok()?;
                let start: u64 = it.next()?.parse().ok()?;
                (pid_alive(pid) && pid_start_time(pid) == Some(start))
                    .then(|| (e.file_name().to_string_lossy().into_owned(), pid))
            })
            .collect()
    }

    /// The PIDs of the dnsmasqs its networks run.
    fn dnsmasqs(&self) -> Vec<i32> {
        std::fs::read_dir(self.dir.join("state/run-net"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                std::fs::read_to_string(e.path().join("dnsmasq.pid"))
                    .ok()?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .filter(|p| pid_alive(*p))
            .collect()
    }

    /// The dnsmasq hosts files of its overlay networks, which the daemon keeps under
    /// /run, named for its state folder (FNV-1a, as `network::cluster_leases_file`).
    fn dhcp_hosts_files(&self) -> Vec<PathBuf> {
        use std::os::unix::ffi::OsStrExt;
        let state = self.dir.join("state");
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in state.as_os_str().as_bytes() {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        std::fs::read_dir(state.join("run-net"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| {
                Path::new("/run/vessel-dnsmasq").join(format!(
                    "{h:016x}-{}.hosts",
                    e.file_name().to_string_lossy()
                ))
            })
            .collect()
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(c.id() as i32, libc::SIGKILL);
            let _ = c.wait();
        }
    }
}

impl Cluster {
    fn start(tag: &str) -> Cluster {
        Cluster::start_with(tag, None, false)
    }

    /// Each host in a network namespace of its own, on an underlay bridge; etcd too.
    fn start_in_netns(tag: &str) -> Cluster {
        Cluster::start_with(tag, Some(Netns::new(tag)), false)
    }

    /// etcd serves its clients over TLS only, and only to clients whose certificate its
    /// CA signed; the daemons connect with `--etcd-cacert/--etcd-cert/--etcd-key`.
    fn start_tls(tag: &str) -> Cluster {
        Cluster::start_with(tag, None, true)
    }

    fn start_with(tag: &str, netns: Option<Netns>, tls: bool) -> Cluster {
        for (tool, arg) in [("etcd", "--version"), ("etcdctl", "version")] {
            let ok = Command::new(tool)
                .arg(arg)
                .env("ETCDCTL_API", "3")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                ok,
                "{tool} not found: apt-get install etcd-server etcd-client (scripts/test.sh does)"
            );
        }
        assert!(
            Path::new("/dev/kvm").exists(),
            "/dev/kvm missing: the cluster tests boot tiny KVM guests"
        );
        let dir = std::env::temp_dir().join(format!("vessel-cluster-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("shared")).unwrap();
        // One token for the cluster: hosts reach each other's TCP API with it.
        std::fs::write(dir.join("token"), "cluster-test-token-0123456789\n").unwrap();
        // In the underlay's namespace, which has nothing else listening, any ports do.
        let (etcd_ip, ports): (&str, Vec<(u16, u16)>) = match &netns {
            Some(_) => (
                UNDERLAY_ETCD,
                (0..3).map(|i| (2379 + 10 * i, 2380 + 10 * i)).collect(),
            ),
            None => (
                "127.0.0.1",
                (0..3).map(|_| (free_port(), free_port())).collect(),
            ),
        };
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("e{i}=http://{etcd_ip}:{p}"))
            .collect();
        let etcd_ns = netns.as_ref().map(Netns::wire);
        let certs = tls.then(|| Certs::new(&dir));
        let scheme = if tls { "https" } else { "http" };
        let mut c = Cluster {
            dir: dir.clone(),
            etcd: Vec::new(),
            hosts: Vec::new(),
            netns,
            certs,
        };
        for (i, (cp, pp)) in ports.iter().enumerate() {
            let name = format!("e{i}");
            let client = format!("{scheme}://{etcd_ip}:{cp}");
            let peer = format!("http://{etcd_ip}:{pp}");
            // In memory where there is /dev/shm: fsync on a busy disk made members miss
            // heartbeats. etcd's default election timing (100 ms heartbeats, 1 s election
            // timeout), well below the lease TTL, as a real cluster's must be: a host
            // rides out a leader's loss only if the election ends before its lease could.
            let shm = Path::new("/dev/shm");
            let data = if shm.is_dir() {
                shm.join(dir.file_name().unwrap()).join(&name)
            } else {
                dir.join(&name)
            };
            let mut args: Vec<std::ffi::OsString> = vec!["--name".into(), name.clone().into()];
            args.extend(["--data-dir".into(), data.into_os_string()]);
            for a in [
                "--heartbeat-interval",
                "100",
                "--election-timeout",
                "1000",
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &initial.join(","),
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                &format!("vessel-{tag}"),
            ] {
                args.push(a.into());
            }
            if let Some(certs) = &c.certs {
                for a in [
                    "--cert-file".to_string(),
                    certs.path("etcd.pem"),
                    "--key-file".into(),
                    certs.path("etcd.key"),
                    "--client-cert-auth".into(),
                    "--trusted-ca-file".into(),
                    certs.path("ca.pem"),
                ] {
                    args.push(a.into());
                }
            }
            let mut e = Etcd {
                client,
                ns: etcd_ns.clone(),
                args,
                log: dir.join(format!("{name}.log")),
                child: None,
            };
            e.spawn();
            c.etcd.push(e);
        }
        let eps = c.endpoints();
        wait_until("etcd cluster healthy", Duration::from_secs(30), || {
            c.etcdctl()
                .args([
                    "--endpoints",
                    &eps,
                    "--command-timeout=2s",
                    "put",
                    "/probe",
                    "1",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        for i in 0..3 {
            let name = format!("h{i}");
            let hdir = dir.join(&name);
            std::fs::create_dir_all(&hdir).unwrap();
            let mut h = Host {
                name,
                dir: hdir,
                tcp: match &c.netns {
                    Some(_) => format!("{}:7070", underlay_ip(i)),
                    None => format!("127.0.0.1:{}", free_port()),
                },
                ns: c.netns.as_ref().map(|n| n.host(i)),
                child: None,
            };
            c.spawn(&mut h);
            c.hosts.push(h);
        }
        // A daemon answers on its socket before it has joined the cluster.
        wait_until(
            "all three hosts registered",
            Duration::from_secs(30),
            || {
                let o = c.hosts[0].cli(&["--json", "host-list"]);
                serde_json::from_slice::<Value>(&o.stdout)
                    .is_ok_and(|v| v.as_array().is_some_and(|a| a.len() == 3))
            },
        );
        c
    }

    /// The etcd member that leads now (`etcdctl endpoint status`), among those running.
    fn leader(&self) -> usize {
        let eps: Vec<&str> = self
            .etcd
            .iter()
            .filter(|e| e.child.is_some())
            .map(|e| e.client.as_str())
            .collect();
        let o = self
            .etcdctl()
            .args([
                "--endpoints",
                &eps.join(","),
                "endpoint",
                "status",
                "-w",
                "json",
            ])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        let st = v.as_array().cloned().unwrap_or_default();
        let leader = st
            .iter()
            .find_map(|e| e["Status"]["leader"].as_u64())
            .expect("etcdctl endpoint status names a leader");
        let ep = st
            .iter()
            .find(|e| e["Status"]["header"]["member_id"].as_u64() == Some(leader))
            .and_then(|e| e["Endpoint"].as_str())
            .expect("the leader's endpoint")
            .to_string();
        self.etcd.iter().position(|e| e.client == ep).unwrap()
    }

    /// etcdctl (v3 API) where etcd runs, with the client certificate where etcd wants one.
    fn etcdctl(&self) -> Command {
        let mut cmd = in_ns(self.etcd[0].ns.as_deref(), "etcdctl");
        cmd.env("ETCDCTL_API", "3");
        if let Some(certs) = &self.certs {
            cmd.args([
                "--cacert",
                &certs.path("ca.pem"),
                "--cert",
                &certs.path("etcd.pem"),
                "--key",
                &certs.path("etcd.key"),
            ]);
        }
        cmd
    }

    fn endpoints(&self) -> String {
        self.etcd
            .iter()
            .map(|e| e.client.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&self, h: &mut Host) {
        let tls = self
            .certs
            .as_ref()
            .map(Certs::daemon_args)
            .unwrap_or_default();
        let child = self.daemon(h, &tls).spawn().unwrap();
        h.child = Some(child);
        let t0 = Instant::now();
        while UnixStream::connect(h.socket()).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "daemon {} did not come up: {}",
                h.name,
                h.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The command line of host `h`'s daemon, with `tls` for its etcd TLS options.
    fn daemon(&self, h: &Host, tls: &[String]) -> Command {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(h.dir.join("daemon.log"))
            .unwrap();
        // VXLAN leaves from the underlay address, where the TCP API listens.
        let overlay: Vec<&str> = match &h.ns {
            Some(_) => vec!["--overlay-ip", h.tcp.split(':').next().unwrap()],
            None => vec![],
        };
        let mut cmd = in_ns(h.ns.as_deref(), EXE);
        cmd.arg("daemon")
            .arg("--socket")
            .arg(h.socket())
            .arg("--state-dir")
            .arg(h.dir.join("state"))
            .arg("--pool-root")
            .arg(self.dir.join("shared"))
            .args(["--cluster", &self.endpoints(), "--host-name", &h.name])
            .args(["--lease-ttl", LEASE_TTL])
            .args(["--host-vcpus", "16", "--host-memory-mib", "4096"])
            .args(["--listen-tcp", &h.tcp, "--token-file"])
            .arg(self.dir.join("token"))
            .args(&overlay)
            .args(tls)
            .env("VESSEL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        cmd
    }

    /// Host → the domains placed on it, as any daemon reads them from etcd.
    fn placement(&self, via: usize) -> BTreeMap<String, Vec<String>> {
        let v = self.hosts[via].json(&["host-list"]);
        v.as_array()
            .unwrap()
            .iter()
            .map(|h| {
                let names: Vec<String> = h["domains"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d["name"].as_str().unwrap().to_string())
                    .collect();
                (h["host"]["name"].as_str().unwrap().to_string(), names)
            })
            .collect()
    }

    /// Domain → the hosts whose live VMMs run it.
    fn runners(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for h in &self.hosts {
            for d in h.running().into_keys() {
                out.entry(d).or_default().push(h.name.clone());
            }
        }
        out
    }

    fn kill_etcd(&mut self, i: usize) {
        if let Some(mut c) = self.etcd[i].child.take() {
            kill(c.id() as i32, libc::SIGKILL);
            let _ = c.wait();
        }
    }

    /// A tiny guest for Vessel's VMM on KVM: prints a line and halts for good.
    fn guest(&self) -> PathBuf {
        let p = self.dir.join("shared/tiny.elf");
        if !p.exists() {
            let mut a = CodeAssembler::new(64).unwrap();
            let mut lib = Lib64::new(&mut a);
            lib.print(&mut a, "tiny cluster guest up\n").unwrap();
            let mut spin = a.create_label();
            a.set_label(&mut spin).unwrap();
            a.hlt().unwrap();
            a.jmp(spin).unwrap();
            lib.emit(&mut a).unwrap();
            let code = a.assemble(common::guest::LOAD).unwrap();
            std::fs::write(&p, linux64_elf(&code)).unwrap();
        }
        p
    }

    /// Defines a domain through host `via` from a JSON file in the shared folder.
    fn define(&self, via: usize, name: &str, mem: u64) -> String {
        let def = json!({"name": name, "driver": "vessel",
            "vm": {"kernel": self.guest(), "cmdline": "", "memory_mib": mem, "accel": "kvm"}});
        let f = self.dir.join(format!("{name}.json"));
        std::fs::write(&f, def.to_string()).unwrap();
        let v = self.hosts[via].json(&["define", f.to_str().unwrap()]);
        v["host"].as_str().unwrap_or_default().to_string()
    }

    fn dump_logs(&self) {
        for h in &self.hosts {
            eprintln!("--- daemon {} log:\n{}", h.name, h.log());
            for e in std::fs::read_dir(h.dir.join("state/run-net"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let log = std::fs::read_to_string(e.path().join("dnsmasq.log")).unwrap_or_default();
                eprintln!("--- {} dnsmasq of {:?}:\n{log}", h.name, e.file_name());
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for h in &mut self.hosts {
            h.kill9();
            for pid in h.running().into_values() {
                kill(pid, libc::SIGKILL);
            }
            for pid in h.dnsmasqs() {
                kill(pid, libc::SIGKILL);
            }
            for f in h.dhcp_hosts_files() {
                let _ = std::fs::remove_file(f);
            }
        }
        // Only once empty: another test's daemons may still use it.
        let _ = std::fs::remove_dir("/run/vessel-dnsmasq");
        for i in 0..self.etcd.len() {
            self.kill_etcd(i);
        }
        if let Some(n) = self.dir.file_name() {
            let _ = std::fs::remove_dir_all(Path::new("/dev/shm").join(n));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Spread placement lands evenly; each owner defines its domains; a drain moves them
/// off; one etcd member lost changes nothing; quorum lost gives clear errors.
#[test]
fn placement_spreads_drains_and_survives_one_etcd_member() {
    let mut c = Cluster::start("place");
    let hosts = c.hosts[0].json(&["host-list"]);
    assert_eq!(hosts.as_array().unwrap().len(), 3, "{hosts}");

    // Nine domains defined through all three daemons in turn: 3/3/3.
    let t0 = Instant::now();
    for i in 0..9 {
        c.define(i % 3, &format!("d{i}"), 128);
    }
    eprintln!(
        "placement: {:?} per define (CLI round trip included)",
        t0.elapsed() / 9
    );
    let p = c.placement(1);
    for h in ["h0", "h1", "h2"] {
        assert_eq!(p[h].len(), 3, "spread placement: {p:?}");
    }
    // Each domain's own host defined it in its SQLite; the others did not.
    for (i, h) in c.hosts.iter().enumerate() {
        let want: Vec<String> = p[&h.name].clone();
        wait_until(
            &format!("host {} defines {want:?}", h.name),
            Duration::from_secs(15),
            || {
                let mut have: Vec<String> = h
                    .json(&["list", "--all"])
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d["name"].as_str().unwrap().to_string())
                    .collect();
                have.sort();
                have == want
            },
        );
        // A domain placed elsewhere: refused with its host's name.
        let other = &p[&format!("h{}", (i + 1) % 3)][0];
        let e = h.fails(&["dominfo", other]);
        assert!(
            e.contains(&format!("placed on host h{}", (i + 1) % 3)),
            "{e}"
        );
    }
    // host-info names the domains.
    let info = c.hosts[2].ok(&["host-info", "h0"]);
    for d in &p["h0"] {
        assert!(info.contains(d.as_str()), "{info}");
    }

    // Drain h1: its domains go to h0 and h2, nothing new lands on it.
    let out = c.hosts[0].ok(&["host-maintenance", "h1", "on"]);
    assert!(out.contains("moved to"), "{out}");
    let p = c.placement(2);
    assert!(p["h1"].is_empty(), "{p:?}");
    assert_eq!(p["h0"].len() + p["h2"].len(), 9, "{p:?}");
    wait_until(
        "h1 undefines its moved domains",
        Duration::from_secs(15),
        || {
            c.hosts[1]
                .json(&["list", "--all"])
                .as_array()
                .unwrap()
                .is_empty()
        },
    );
    assert_ne!(c.define(1, "after-drain", 128), "h1");
    c.hosts[1].ok(&["host-maintenance", "h1", "off"]);
    assert_eq!(c.define(0, "back", 128), "h1", "the emptiest host again");

    // A domain too large for any host: refused, naming each host's reason.
    let f = c.dir.join("huge.json");
    std::fs::write(
        &f,
        json!({"name": "huge", "driver": "vessel",
               "vm": {"kernel": c.guest(), "cmdline": "", "memory_mib": 8192, "accel": "kvm"}})
        .to_string(),
    )
    .unwrap();
    let e = c.hosts[0].fails(&["define", f.to_str().unwrap()]);
    assert!(e.contains("no host fits") && e.contains("h2:"), "{e}");

    // One etcd member lost, the leader (the worst one to lose: renewals wait out an
    // election): placement still works through every host, at once and once the lease
    // time has passed, and no host fences itself.
    let lost = c.leader();
    c.kill_etcd(lost);
    for round in 0..2 {
        for i in 0..3 {
            let h = c.define(i, &format!("one-member-down-{round}-{i}"), 64);
            assert!(["h0", "h1", "h2"].contains(&h.as_str()), "{h}");
        }
        std::thread::sleep(Duration::from_secs(7));
    }
    for h in &c.hosts {
        assert!(
            !h.log().contains("fencing this host"),
            "{} fenced:\n{}",
            h.name,
            h.log()
        );
    }

    // Quorum lost: clear errors, nothing placed.
    c.kill_etcd((lost + 1) % 3);
    let t0 = Instant::now();
    let f = c.dir.join("no-quorum.json");
    std::fs::write(
        &f,
        json!({"name": "no-quorum", "driver": "vessel",
               "vm": {"kernel": c.guest(), "cmdline": "", "memory_mib": 128, "accel": "kvm"}})
        .to_string(),
    )
    .unwrap();
    let e = c.hosts[1].fails(&["define", f.to_str().unwrap()]);
    assert!(
        e.contains("etcd has lost its quorum") && e.contains("read-only"),
        "{e}"
    );
    assert!(t0.elapsed() < Duration::from_secs(12), "{:?}", t0.elapsed());
    let e = c.hosts[2].fails(&["host-list"]);
    assert!(e.contains("etcd has lost its quorum"), "{e}");
}

/// SIGKILL of a host's daemon: its VMMs stop (the watchdog), its running domains run
/// again on the others within 30 s, never on two hosts at once. Losing etcd's quorum
/// makes the cluster read-only with clear errors and changes nothing (no host fences
/// itself); once it is back the cluster converges.
#[test]
fn killed_host_is_evacuated_once_and_lost_quorum_changes_nothing() {
    let mut c = Cluster::start("evac");
    let joined = Instant::now();
    for i in 0..3 {
        c.define(i, &format!("r{i}"), 64);
    }
    for i in 0..3 {
        let v = c.hosts[(i + 1) % 3].json(&["start", &format!("r{i}")]);
        assert_eq!(v["state"], "running", "{v}");
    }
    wait_until("three domains running", Duration::from_secs(30), || {
        c.runners().len() == 3
    });
    let before = c.runners();
    assert!(before.values().all(|h| h.len() == 1), "{before:?}");
    let victim_domains: Vec<String> = before
        .iter()
        .filter(|(_, h)| h[0] == "h0")
        .map(|(d, _)| d.clone())
        .collect();
    assert!(!victim_domains.is_empty(), "{before:?}");

    // A host takes over only the domains of hosts it read alive a lease TTL and 2 s
    // after it joined (docs/CLUSTER.md). Idle hosts read every 5 s, so their last read
    // of h0 may come 5 s before its lease ends, 6 s after the kill: the hosts must have
    // been up 7 s at the kill; 10 s leaves room for a slow machine.
    std::thread::sleep(Duration::from_secs(10).saturating_sub(joined.elapsed()));

    // The host's daemon dies: its watchdog stops its VMMs, its lease runs out.
    let vmms = c.hosts[0].running();
    c.hosts[0].kill9();
    let t0 = Instant::now();
    wait_until(
        "h0's VMMs stop with its daemon",
        Duration::from_secs(5),
        || vmms.values().all(|p| !pid_alive(*p)),
    );
    wait_until(
        "h0's domains running on h1/h2",
        Duration::from_secs(30),
        || {
            let now = c.runners();
            assert!(now.values().all(|h| h.len() == 1), "twice: {now:?}");
            victim_domains
                .iter()
                .all(|d| now.get(d).is_some_and(|h| h[0] != "h0"))
        },
    );
    eprintln!("evacuated in {:?}", t0.elapsed());
    let p = c.placement(1);
    assert!(!p.contains_key("h0"), "h0 still listed: {p:?}");
    // Nothing runs twice for a while after, either.
    for _ in 0..10 {
        let now = c.runners();
        assert!(now.values().all(|h| h.len() == 1), "twice: {now:?}");
        assert_eq!(now.len(), 3, "{now:?}");
        std::thread::sleep(Duration::from_millis(300));
    }

    // Drain h1: its running domains stop there and run on h2, never on both.
    let on_h1: Vec<String> = c.hosts[1].running().into_keys().collect();
    assert!(!on_h1.is_empty(), "{:?}", c.runners());
    c.hosts[2].ok(&["host-maintenance", "h1", "on"]);
    wait_until(
        "h1's domains running on h2",
        Duration::from_secs(30),
        || {
            let now = c.runners();
            assert!(now.values().all(|h| h.len() == 1), "twice: {now:?}");
            now.len() == 3 && now.values().all(|h| h[0] == "h2")
        },
    );
    c.hosts[2].ok(&["host-maintenance", "h1", "off"]);

    // One more domain, on h1 (the emptiest), so that both hosts run domains.
    assert_eq!(c.define(2, "r3", 64), "h1");
    c.hosts[2].ok(&["start", "r3"]);
    wait_until("four domains running", Duration::from_secs(30), || {
        c.runners().len() == 4
    });
    let before: BTreeMap<String, i32> = c.hosts[1..].iter().flat_map(|h| h.running()).collect();
    assert_eq!(before.len(), 4, "{before:?}");

    // Quorum lost (two of three members gone): every cluster verb answers an error that
    // names the cause, nothing is placed, started or moved, and no host fences itself:
    // neither reaches an etcd leader, so each holds the other's promise to take nothing
    // over (docs/CLUSTER.md, "Quorum lost").
    c.kill_etcd(0);
    c.kill_etcd(1);
    let t0 = Instant::now();
    let f = c.dir.join("no-quorum.json");
    std::fs::write(
        &f,
        json!({"name": "no-quorum", "driver": "vessel",
               "vm": {"kernel": c.guest(), "cmdline": "", "memory_mib": 64, "accel": "kvm"}})
        .to_string(),
    )
    .unwrap();
    for (via, args) in [
        (1, vec!["define", f.to_str().unwrap()]),
        (2, vec!["start", "r0"]),
        (1, vec!["shutdown", "r3"]),
        (2, vec!["migrate", "r3", "--live", "--to", "h2"]),
        (1, vec!["host-maintenance", "h2", "on"]),
        (2, vec!["host-list"]),
    ] {
        let t = Instant::now();
        let e = c.hosts[via].fails(&args);
        assert!(
            e.contains("etcd has lost its quorum") && e.contains("read-only"),
            "{args:?}: {e}"
        );
        eprintln!("without quorum, {} failed in {:?}", args[0], t.elapsed());
        assert!(
            t.elapsed() < Duration::from_secs(12),
            "{args:?} took {:?}",
            t.elapsed()
        );
    }
    // Well past the lease TTL: the same VMMs still run, each on one host.
    let hold = Duration::from_secs(3 * LEASE_TTL.parse::<u64>().unwrap());
    while t0.elapsed() < hold {
        let now: BTreeMap<String, i32> = c.hosts[1..].iter().flat_map(|h| h.running()).collect();
        assert_eq!(now, before, "the domains changed without quorum");
        std::thread::sleep(Duration::from_millis(500));
    }
    for h in &c.hosts[1..] {
        let log = h.log();
        assert!(!log.contains("fencing"), "{} fenced:\n{log}", h.name);
        assert!(
            log.contains("keeps its domains running"),
            "{} did not say why it holds on:\n{log}",
            h.name
        );
    }
    // A guest that ends meanwhile: its host cannot record that yet.
    let (ended, pid) = before
        .iter()
        .find(|(d, _)| d.as_str() == "r3")
        .map(|(d, p)| (d.clone(), *p))
        .unwrap();
    kill(pid, libc::SIGKILL);
    // A VMM takes a moment to die (its memory is torn down first): the check below
    // is about what the hosts do afterwards.
    let killed = Instant::now();
    let listed = || {
        c.hosts[1..]
            .iter()
            .any(|h| h.running().get("r3") == Some(&pid))
    };
    while listed() {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "r3's VMM {pid} is there 10 s after SIGKILL:\n{}",
            std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Quorum back: the hosts carry on under their leases (a new leader gives each a
    // whole TTL), the domains run on untouched, and what happened meanwhile is recorded.
    c.etcd[0].spawn();
    c.etcd[1].spawn();
    wait_until(
        "the cluster converges: r3 recorded as ended, the rest running untouched",
        Duration::from_secs(60),
        || {
            let now: BTreeMap<String, i32> =
                c.hosts[1..].iter().flat_map(|h| h.running()).collect();
            let mut want = before.clone();
            want.remove(&ended);
            assert_eq!(now, want, "the domains changed");
            let o = c.hosts[2].cli(&["--json", "host-info", "h1"]);
            serde_json::from_slice::<Value>(&o.stdout).is_ok_and(|v| {
                v["domains"].as_array().is_some_and(|a| {
                    a.iter().any(|d| {
                        d["name"] == "r3" && d["running"] == false && d["wanted"] == "shutoff"
                    })
                })
            })
        },
    );
    let hosts = c.hosts[1].json(&["host-list"]);
    assert_eq!(hosts.as_array().unwrap().len(), 2, "{hosts}");
    for h in &c.hosts[1..] {
        assert!(
            !h.log().contains("fencing"),
            "{} fenced:\n{}",
            h.name,
            h.log()
        );
    }
    // And it takes requests again.
    let h = c.define(1, "after-quorum", 64);
    let v = c.hosts[2].json(&["start", "after-quorum"]);
    assert_eq!(v["host"], h.as_str(), "{v}");
    let p = c.placement(1);
    assert!(p[&h].contains(&"after-quorum".to_string()), "{p:?}");
}

/// What the migrating guest runs (spaces as `+`): it writes a token to its disk (a file
/// in the shared folder), then prints `count N TOKEN` every 0.2 s, reading the token back
/// from the disk each time with the page cache dropped, so that the reads after a
/// migration go through the destination's VMM to the shared file.
const COUNTING_WITH_DISK: &str = "vessel.run=echo+disk-token-42+>/dev/vda;sync;i=0;\
    while+true;do+i=$((i-(-1)));echo+3+>/proc/sys/vm/drop_caches;\
    echo+count+$i+$(head+-c+13+/dev/vda);sleep+0.2;done";

/// `(count, token)` of each whole `count N TOKEN` line of a serial log.
fn counts(log: &str) -> Vec<(u64, String)> {
    log.lines()
        .filter_map(|l| {
            let mut w = l.trim_end().strip_prefix("count ")?.split(' ');
            let n = w.next()?.parse().ok()?;
            Some((n, w.next().unwrap_or_default().to_string()))
        })
        .collect()
}

impl Cluster {
    /// A Linux guest under emu running [`COUNTING_WITH_DISK`] on a raw disk in the
    /// shared folder, defined through host `via`; returns its host.
    fn define_counting(&self, via: usize, name: &str, extra: Value) -> String {
        let a = common::assets();
        assert!(
            a.join("vmlinuz").is_file() && a.join("initramfs.cpio.gz").is_file(),
            "guest assets missing in {}: run scripts/guest-assets.sh",
            a.display()
        );
        let disk = self.dir.join(format!("shared/{name}.raw"));
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
        let mut def = json!({"name": name, "driver": "vessel",
            "vm": {"kernel": a.join("vmlinuz"), "initrd": a.join("initramfs.cpio.gz"),
                   "cmdline": format!("console=ttyS0 panic=-1 quiet {COUNTING_WITH_DISK}"),
                   "memory_mib": 256, "accel": "emu",
                   "disks": [{"path": disk, "format": "raw"}]}});
        if let (Some(vm), Some(x)) = (def["vm"].as_object_mut(), extra.as_object()) {
            vm.extend(x.clone());
        }
        let f = self.dir.join(format!("{name}.json"));
        std::fs::write(&f, def.to_string()).unwrap();
        let v = self.hosts[via].json(&["define", f.to_str().unwrap()]);
        v["host"].as_str().unwrap_or_default().to_string()
    }

    fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).unwrap()
    }

    /// The counts domain `name` printed at host `h` so far.
    fn counts_at(&self, h: &str, name: &str) -> Vec<(u64, String)> {
        let o = self.host(h).cli(&["console", name, "--log"]);
        counts(&String::from_utf8_lossy(&o.stdout))
    }

    fn wait_count(&self, h: &str, name: &str, n: u64, what: &str) -> Vec<(u64, String)> {
        let t0 = Instant::now();
        loop {
            let got = self.counts_at(h, name);
            if got.last().is_some_and(|(c, _)| *c >= n) {
                return got;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "{what}: domain {name} on {h} printed {got:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The host whose live VMM runs `name` (exactly one).
    fn runner(&self, name: &str) -> String {
        let r = self.runners();
        assert!(r.values().all(|h| h.len() == 1), "twice: {r:?}");
        r.get(name).map(|h| h[0].clone()).unwrap_or_default()
    }

    /// Checks that `name`, which ran on `from` up to count `before`, goes on at `to`
    /// without restarting, reading the token back from the shared disk there.
    fn check_goes_on(&self, name: &str, to: &str, before: u64) {
        assert_eq!(self.runner(name), to);
        let p = self.placement(0);
        assert!(p[to].contains(&name.to_string()), "{p:?}");
        let got = self.wait_count(to, name, before + 5, "after the migration");
        let first = got.first().map_or(0, |(c, _)| *c);
        // A guest that booted again would count from 1.
        assert!(
            first > before.min(3),
            "the count restarted at {to}: {got:?}"
        );
        assert!(
            got.windows(2).all(|w| w[1].0 == w[0].0 + 1),
            "the count skipped or repeated at {to}: {got:?}"
        );
        assert!(
            got.iter().all(|(_, t)| t == "disk-token-42"),
            "the token written before the migration did not read back at {to}: {got:?}"
        );
        let log = self.host(to).ok(&["console", name, "--log"]);
        assert!(!log.contains("vessel-init:"), "booted again at {to}: {log}");
    }
}

/// A running guest moves live between hosts: `migrate --live --to HOST` and placement's
/// pick without `--to` (each over TCP between the hosts' daemons, asked through a daemon
/// that is not the domain's host); its counter goes on and the token it wrote to its disk
/// on shared storage before reads back after; etcd places it on the destination only
/// once the destination runs it. A vsock domain moves live too (its device resets the
/// guest's connections, as a restore does), and a drain then moves running domains live
/// and a shut-off one as it is.
#[test]
fn running_domains_migrate_live_between_hosts_and_drain_live() {
    let c = Cluster::start("live");
    let home = c.define_counting(0, "mover", json!({}));
    c.hosts[1].json(&["start", "mover"]);
    let got = c.wait_count(&home, "mover", 3, "first boot");
    assert!(got.iter().all(|(_, t)| t == "disk-token-42"), "{got:?}");
    let disk = std::fs::read(c.dir.join("shared/mover.raw")).unwrap();
    assert!(
        disk.starts_with(b"disk-token-42\n"),
        "the guest's write is not on the shared disk"
    );

    // To a named host, asked through its own host's daemon.
    let to = if home == "h1" { "h2" } else { "h1" };
    let via = c.hosts.iter().position(|h| h.name == home).unwrap();
    let before = c.counts_at(&home, "mover").last().unwrap().0;
    let t0 = Instant::now();
    let out = c.hosts[via].ok(&["migrate", "mover", "--live", "--to", to]);
    eprintln!(
        "migrate --to {to}: {out} (CLI round trip {:?})",
        t0.elapsed()
    );
    assert!(
        out.contains(&format!("from host {home} to host {to}")) && out.contains("downtime"),
        "{out}"
    );
    c.check_goes_on("mover", to, before);
    assert!(
        c.host(&home)
            .json(&["list", "--all"])
            .as_array()
            .unwrap()
            .is_empty(),
        "the source still defines the domain"
    );
    assert!(c
        .host(to)
        .log()
        .contains("migration stream received over TCP"));

    // Without --to, through a daemon that is not its host: placement picks.
    let other = c.hosts.iter().position(|h| h.name != to).unwrap();
    let before = c.counts_at(to, "mover").last().unwrap().0;
    let v = c.hosts[other].json(&["migrate", "mover", "--live"]);
    eprintln!("migrate (placement picks): {v}");
    let picked = v["to"].as_str().unwrap().to_string();
    assert_ne!(picked, to, "{v}");
    assert!(v["downtime_ms"].as_f64().unwrap() > 0.0, "{v}");
    c.check_goes_on("mover", &picked, before);

    // A daemon takes in only a migration etcd records to it: a stray incoming request
    // (here the domain's own definition, sent to a host it is not moving to) is refused.
    let stray = c.hosts.iter().find(|h| h.name != picked).unwrap();
    let def = std::fs::read_to_string(c.dir.join("mover.json")).unwrap();
    let body = format!("{{\"definition\":{def}}}");
    let mut s = UnixStream::connect(stray.socket()).unwrap();
    use std::io::{Read, Write};
    write!(
        s,
        "POST /v1/migrations/incoming HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 409") && answer.contains("no live migration of domain"),
        "{answer}"
    );
    assert!(stray.running().is_empty(), "{:?}", c.runners());

    // Refused: onto its own host, a host that does not exist, a shut-off domain.
    let e = c
        .host(&picked)
        .fails(&["migrate", "mover", "--live", "--to", &picked]);
    assert!(e.contains("already"), "{e}");
    let e = c
        .host(&picked)
        .fails(&["migrate", "mover", "--live", "--to", "h9"]);
    assert!(e.contains("h9"), "{e}");
    assert_eq!(c.runner("mover"), picked);

    // Beside it on the same host (the others in maintenance meanwhile, with nothing on
    // them to move): a domain with vsock, and one left shut off.
    let others: Vec<String> = ["h0", "h1", "h2"]
        .iter()
        .filter(|h| **h != picked)
        .map(|h| h.to_string())
        .collect();
    for h in &others {
        c.hosts[0].ok(&["host-maintenance", h, "on"]);
    }
    let pinned_host = c.define_counting(
        0,
        "pinned",
        json!({"vsock": {"guest_cid": 3, "uds_path": ""}}),
    );
    assert_eq!(pinned_host, picked);
    assert_eq!(c.define(1, "idle", 64), picked);
    for h in &others {
        c.hosts[0].ok(&["host-maintenance", h, "off"]);
    }
    c.hosts[0].json(&["start", "pinned"]);
    wait_until("pinned runs", Duration::from_secs(30), || {
        c.runner("pinned") == picked
    });
    c.wait_count(&picked, "pinned", 2, "pinned boots");

    // Drain its host: both running domains go live.
    let before = c.counts_at(&picked, "mover").last().unwrap().0;
    let i = c.hosts.iter().position(|h| h.name != picked).unwrap();
    let out = c.hosts[i].ok(&["host-maintenance", &picked, "on"]);
    eprintln!("drain: {out}");
    assert!(
        out.contains("mover moved to") && out.contains("live, downtime"),
        "{out}"
    );
    assert!(
        out.contains("pinned moved to") && out.matches("live, downtime").count() == 2,
        "{out}"
    );
    assert!(
        out.contains("idle moved to") && out.contains("(shut off)"),
        "{out}"
    );
    let now = c.runner("mover");
    assert_ne!(now, picked);
    c.check_goes_on("mover", &now, before);
    wait_until(
        "pinned runs again elsewhere",
        Duration::from_secs(30),
        || {
            let r = c.runner("pinned");
            !r.is_empty() && r != picked
        },
    );
    c.hosts[i].ok(&["host-maintenance", &picked, "off"]);
}

/// Server groups: anti-affinity members each on a host of their own, one more refused
/// with each host's reason; affinity members all on the first one's host even with
/// the spread weigher; a group with members cannot be deleted; a start that would
/// break the group (its record edited behind the cluster's back) is a clear error.
#[test]
fn server_groups_constrain_placement_and_start() {
    let c = Cluster::start("groups");
    c.hosts[0].ok(&["group-create", "web", "--policy", "anti-affinity"]);
    c.hosts[1].ok(&["group-create", "db", "--policy", "affinity"]);
    let e = c.hosts[2].fails(&["group-create", "web", "--policy", "affinity"]);
    assert!(e.contains("exists"), "{e}");
    let define = |via: usize, name: &str, group: &str| -> Result<String, String> {
        let def = json!({"name": name, "driver": "vessel",
            "vm": {"kernel": c.guest(), "cmdline": "", "memory_mib": 64, "accel": "kvm"}});
        let f = c.dir.join(format!("{name}.json"));
        std::fs::write(&f, def.to_string()).unwrap();
        let o = c.hosts[via].cli(&["--json", "define", f.to_str().unwrap(), "--group", group]);
        if o.status.success() {
            let v: Value = serde_json::from_slice(&o.stdout).unwrap();
            Ok(v["host"].as_str().unwrap().to_string())
        } else {
            Err(String::from_utf8_lossy(&o.stderr).into_owned())
        }
    };
    let mut web: Vec<String> = (0..3)
        .map(|i| define(i, &format!("web{i}"), "web").unwrap())
        .collect();
    web.sort();
    assert_eq!(web, ["h0", "h1", "h2"]);
    let e = define(0, "web3", "web").unwrap_err();
    assert!(
        e.contains("no host fits") && e.contains("anti-affinity group \"web\""),
        "{e}"
    );
    let db: Vec<String> = (0..3)
        .map(|i| define(i, &format!("db{i}"), "db").unwrap())
        .collect();
    assert!(db.iter().all(|h| *h == db[0]), "{db:?}");
    let e = define(0, "x", "nogroup").unwrap_err();
    assert!(e.contains("nogroup"), "{e}");
    let groups = c.hosts[2].ok(&["group-list"]);
    assert!(
        groups.contains("anti-affinity") && groups.contains("web0@"),
        "{groups}"
    );
    let e = c.hosts[0].fails(&["group-delete", "web"]);
    assert!(e.contains("still has members"), "{e}");

    // Starting the members is fine; then a record moved by hand onto web0's host.
    c.hosts[0].json(&["start", "web1"]);
    let web0_host = c
        .placement(0)
        .into_iter()
        .find(|(_, d)| d.contains(&"web0".to_string()))
        .unwrap()
        .0;
    let k = "/vessel/v1/domains/web2";
    let o = c
        .etcdctl()
        .args([
            "--endpoints",
            &c.endpoints(),
            "get",
            k,
            "--print-value-only",
        ])
        .output()
        .unwrap();
    let mut rec: Value = serde_json::from_slice(&o.stdout).unwrap();
    rec["host"] = json!(web0_host);
    let ok = c
        .etcdctl()
        .args(["--endpoints", &c.endpoints(), "put", k, &rec.to_string()])
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let e = c.hosts[1].fails(&["start", "web2"]);
    assert!(
        e.contains("may not start on host")
            && e.contains("anti-affinity group \"web\" has web0 here"),
        "{e}"
    );
    assert!(!c.runners().contains_key("web2"));

    // Without members, the group goes.
    for d in ["db0", "db1", "db2"] {
        let h = c
            .placement(0)
            .into_iter()
            .find(|(_, v)| v.contains(&d.to_string()))
            .unwrap()
            .0;
        let i = c.hosts.iter().position(|x| x.name == h).unwrap();
        c.hosts[i].ok(&["undefine", d]);
    }
    c.hosts[2].ok(&["group-delete", "db"]);
    assert!(!c.hosts[0].ok(&["group-list"]).contains("db"));
}

/// A guest command line (busybox under emu) that takes a DHCP lease on eth0 (printing
/// `addr IP`), then pings `peer` every 0.3 s for good, printing `TAG N ok|lost`, and asks
/// for its lease again every 25 pings (so that the host it runs on answers DHCP).
/// The underlay MTU of the overlay test: not 1500, so that the overlay's (1350) differs
/// from the 1450 a fixed allowance would give.
const UNDERLAY_MTU: u32 = 1400;

/// What a guest on the overlay runs: DHCP, then a ping of `peer` every 0.3 s (`TAG N
/// ok|lost`), and every 4th round two large ones (`TAG full|big ok|lost`): one the size
/// of the overlay's MTU, and one the size of the underlay's, which the guest must
/// fragment itself (it must know the overlay's MTU: the overlay drops larger frames).
/// It prints its interface's MTU first (`TAG mtu N`).
fn overlay_guest_cmdline(tag: &str, peer: &str) -> String {
    let dhcp = "udhcpc -i eth0 -s /s -q -n -t 3 -T 1 2>/dev/null";
    let (full, big) = (UNDERLAY_MTU - 50 - 28, UNDERLAY_MTU - 28);
    let script = format!(
        "ip link set eth0 up;\
         echo {tag} mtu $(cat /sys/class/net/eth0/mtu);\
         echo '#!/bin/sh' >/s;\
         echo 'ip addr add $ip/$mask dev $interface 2>/dev/null;echo addr $ip' >>/s;\
         chmod 755 /s;\
         udhcpc -i eth0 -s /s -q -n -t 20 -T 1 2>/dev/null;\
         i=0;while true;do i=$((i-(-1)));\
         if ping -c1 -W1 {peer} >/dev/null 2>&1;then echo {tag} $i ok;else echo {tag} $i lost;fi;\
         if [ $((i%4)) = 0 ];then \
         if ping -c1 -W1 -s {full} {peer} >/dev/null 2>&1;then echo {tag} full ok;else echo {tag} full lost;fi;\
         if ping -c1 -W1 -s {big} {peer} >/dev/null 2>&1;then echo {tag} big ok;else echo {tag} big lost;fi;\
         fi;\
         [ $((i%25)) = 0 ] && {dhcp};sleep 0.3;done"
    );
    format!("vessel.run={}", script.replace(' ', "+"))
}

/// `(N, ok)` of each `TAG N ok|lost` line of a serial log.
fn pings(log: &str, tag: &str) -> Vec<(u64, bool)> {
    log.lines()
        .filter_map(|l| {
            let mut w = l.trim_end().strip_prefix(tag)?.split_whitespace();
            let n = w.next()?.parse().ok()?;
            Some((n, w.next()? == "ok"))
        })
        .collect()
}

impl Cluster {
    /// A Linux guest under emu on overlay network `ov` that pings `peer` (see
    /// [`overlay_guest_cmdline`]), in server group `group`, defined through host `via`;
    /// returns the define's answer (host and addresses).
    fn define_overlay_guest(&self, via: usize, name: &str, peer: &str, group: &str) -> Value {
        let a = common::assets();
        assert!(
            a.join("vmlinuz").is_file() && a.join("initramfs.cpio.gz").is_file(),
            "guest assets missing in {}: run scripts/guest-assets.sh",
            a.display()
        );
        let def = json!({"name": name, "driver": "vessel",
            "interfaces": [{"network": "ov"}],
            "vm": {"kernel": a.join("vmlinuz"), "initrd": a.join("initramfs.cpio.gz"),
                   "cmdline": format!("console=ttyS0 panic=-1 quiet {}",
                                      overlay_guest_cmdline(name, peer)),
                   "memory_mib": 256, "accel": "emu"}});
        let f = self.dir.join(format!("{name}.json"));
        std::fs::write(&f, def.to_string()).unwrap();
        self.hosts[via].json(&["define", f.to_str().unwrap(), "--group", group])
    }

    fn pings_at(&self, h: &str, name: &str) -> Vec<(u64, bool)> {
        let o = self.host(h).cli(&["console", name, "--log"]);
        pings(&String::from_utf8_lossy(&o.stdout), name)
    }

    /// Waits until `name` at host `h` has `n` successful pings numbered above `after`.
    fn wait_pings(
        &self,
        h: &str,
        name: &str,
        after: u64,
        n: usize,
        within: Duration,
    ) -> Vec<(u64, bool)> {
        let t0 = Instant::now();
        loop {
            let got = self.pings_at(h, name);
            if got.iter().filter(|(i, ok)| *i > after && *ok).count() >= n {
                return got;
            }
            assert!(
                t0.elapsed() < within,
                "{name} at {h}: not {n} pings answered after #{after} within {within:?}: last \
                 {:?}\n{}",
                &got[got.len().saturating_sub(10)..],
                String::from_utf8_lossy(&self.host(h).cli(&["console", name, "--log"]).stdout)
                    .lines()
                    .take(40)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn in_ns(&self, host: usize, args: &[&str]) -> String {
        let ns = self
            .netns
            .as_ref()
            .expect("a cluster in network namespaces");
        let o = Command::new("ip")
            .args(["netns", "exec", &ns.host(host)])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn dnsmasq_log(&self, h: &str) -> String {
        std::fs::read_to_string(self.host(h).dir.join("state/run-net/ov/dnsmasq.log"))
            .unwrap_or_default()
    }
}

/// Issue 18, networks across hosts: each host in its own network namespace, joined by an
/// underlay bridge. One overlay network (VNI 5001) defined on every host: its bridges
/// are joined by VXLAN, addresses come from the cluster (unique, recorded with the
/// domain) and only a guest's own host answers its DHCP. Two guests on different hosts
/// ping each other; one migrates live to the third host, keeps its address, and goes
/// on answering; its DHCP is then answered by the new host, with the same address.
#[test]
fn overlay_network_joins_hosts_and_a_migrated_guest_keeps_its_address() {
    for tool in ["dnsmasq", "nft", "bridge"] {
        let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).exists());
        assert!(
            found,
            "{tool} not found: apt-get install dnsmasq-base nftables iproute2 (scripts/test.sh does)"
        );
    }
    let c = Cluster::start_in_netns("ovl");
    // An underlay of 1400 bytes: the overlay's MTU must follow it (1350).
    let netns = c.netns.as_ref().unwrap();
    let mtu = UNDERLAY_MTU.to_string();
    for i in 0..3 {
        Netns::ip(
            &netns.wire(),
            &["link", "set", &format!("w{i}"), "mtu", &mtu],
        );
        Netns::ip(&netns.host(i), &["link", "set", "uplink", "mtu", &mtu]);
    }
    Netns::ip(&netns.wire(), &["link", "set", "wire", "mtu", &mtu]);
    let overlay_mtu = format!("mtu {}", UNDERLAY_MTU - 50);
    for h in &c.hosts {
        h.ok(&[
            "net-define",
            "ov",
            "--address",
            "10.251.0.1/24",
            "--dhcp",
            "10.251.0.10,10.251.0.99",
            "--no-nat",
            "--vni",
            "5001",
        ]);
        h.ok(&["net-start", "ov"]);
    }
    // Each host announces the overlay, and its VXLAN device floods to the two others.
    for (i, h) in c.hosts.iter().enumerate() {
        wait_until(
            &format!("{} floods the overlay to the other hosts", h.name),
            Duration::from_secs(20),
            || {
                let fdb = c.in_ns(i, &["bridge", "fdb", "show", "dev", "vxl5001"]);
                (0..3)
                    .filter(|j| *j != i)
                    .all(|j| fdb.contains(&format!("dst {}", underlay_ip(j))))
                    && !fdb.contains(&format!("dst {}", underlay_ip(i)))
            },
        );
    }
    // The VXLAN devices and the bridges leave room for VXLAN's 50 bytes, and DHCP offers
    // the same MTU.
    for i in 0..3 {
        for dev in ["vxl5001", "vbr-ov"] {
            let l = c.in_ns(i, &["ip", "-o", "link", "show", dev]);
            assert!(l.contains(&format!("{overlay_mtu} ")), "host {i}: {l}");
        }
    }
    for h in &c.hosts {
        let pid = h.dnsmasqs()[0];
        let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(
            cmd.contains(&format!("option:mtu,{}", UNDERLAY_MTU - 50)),
            "{}: {cmd:?}",
            h.name
        );
    }
    c.hosts[0].ok(&["group-create", "apart", "--policy", "anti-affinity"]);
    // The cluster allocates the addresses: the lowest free ones of the range.
    let a = c.define_overlay_guest(0, "a", "10.251.0.11", "apart");
    let b = c.define_overlay_guest(1, "b", "10.251.0.10", "apart");
    assert_eq!(a["addresses"][0]["ip"], "10.251.0.10", "{a}");
    assert_eq!(b["addresses"][0]["ip"], "10.251.0.11", "{b}");
    let (ha, hb) = (
        a["host"].as_str().unwrap().to_string(),
        b["host"].as_str().unwrap().to_string(),
    );
    assert_ne!(ha, hb, "anti-affinity");
    c.hosts[2].ok(&["start", "a"]);
    c.hosts[2].ok(&["start", "b"]);
    // Across hosts, both ways, over the overlay.
    c.wait_pings(&ha, "a", 0, 3, Duration::from_secs(120));
    c.wait_pings(&hb, "b", 0, 3, Duration::from_secs(120));
    let log_a =
        String::from_utf8_lossy(&c.host(&ha).cli(&["console", "a", "--log"]).stdout).into_owned();
    assert!(log_a.contains("addr 10.251.0.10"), "{log_a}");
    // The guests' virtio-net devices gave them the overlay's MTU, and frames of that
    // size cross between the hosts, as do pings of the underlay's size (fragmented by
    // the guest, which knows the MTU, instead of dropped by the overlay).
    for (h, g) in [(&ha, "a"), (&hb, "b")] {
        let log =
            String::from_utf8_lossy(&c.host(h).cli(&["console", g, "--log"]).stdout).into_owned();
        assert!(log.contains(&format!("{g} {overlay_mtu}")), "{log}");
        wait_until(
            &format!("{g}'s large pings cross the overlay"),
            Duration::from_secs(60),
            || {
                let log = String::from_utf8_lossy(&c.host(h).cli(&["console", g, "--log"]).stdout)
                    .into_owned();
                let last = |kind: &str| {
                    log.lines()
                        .filter_map(|l| l.trim_end().strip_prefix(&format!("{g} {kind} ")))
                        .next_back()
                        .map(str::to_string)
                };
                last("full").as_deref() == Some("ok") && last("big").as_deref() == Some("ok")
            },
        );
        // The first large ping once the peer answers crosses at once: the guest had no
        // ICMP "fragmentation needed" from its host's VXLAN device to learn from first.
        let log =
            String::from_utf8_lossy(&c.host(h).cli(&["console", g, "--log"]).stdout).into_owned();
        let first_big = log
            .lines()
            .map(str::trim_end)
            .skip_while(|l| *l != format!("{g} full ok"))
            .find(|l| l.starts_with(&format!("{g} big ")));
        assert_eq!(first_big, Some(format!("{g} big ok").as_str()), "{log}");
    }
    // And no host fragmented a VXLAN packet on the underlay: each guest frame fit.
    // (With a guest MTU of 1500 the large pings cross too, but only because the hosts
    // fragment the outer packets, which underlays that drop fragments do not carry.)
    for i in 0..3 {
        let snmp = c.in_ns(i, &["cat", "/proc/net/snmp"]);
        let ip: Vec<Vec<&str>> = snmp
            .lines()
            .filter(|l| l.starts_with("Ip: "))
            .map(|l| l.split_whitespace().collect())
            .collect();
        let frags = ip[0]
            .iter()
            .position(|k| *k == "FragCreates")
            .map(|j| ip[1][j])
            .unwrap();
        assert_eq!(frags, "0", "host {i} fragmented underlay packets: {snmp}");
    }
    // Each guest's DHCP was answered by its own host's dnsmasq only.
    let mac_a = a["addresses"][0]["mac"].as_str().unwrap().to_string();
    for h in &c.hosts {
        let acked = c
            .dnsmasq_log(&h.name)
            .lines()
            .any(|l| l.contains("DHCPACK") && l.contains(&mac_a));
        assert_eq!(
            acked,
            h.name == ha,
            "DHCP of a at {}: {}",
            h.name,
            c.dnsmasq_log(&h.name)
        );
    }

    // b migrates live to the third host; a goes on reaching it at the same address.
    let third = ["h0", "h1", "h2"]
        .into_iter()
        .find(|h| *h != ha && *h != hb)
        .unwrap()
        .to_string();
    let before = c.pings_at(&ha, "a").last().map_or(0, |(n, _)| *n);
    let mac_b = b["addresses"][0]["mac"].as_str().unwrap().to_string();
    let acks = |log: &str| {
        log.lines()
            .filter(|l| l.contains("DHCPACK") && l.contains(&mac_b))
            .count()
    };
    let out = c.host(&hb).ok(&["migrate", "b", "--live", "--to", &third]);
    let acks_at_old = acks(&c.dnsmasq_log(&hb));
    eprintln!("migrate b: {out}");
    let got = c.wait_pings(&ha, "a", before, 10, Duration::from_secs(120));
    let after: Vec<&(u64, bool)> = got.iter().filter(|(n, _)| *n > before).collect();
    let lost = after.iter().filter(|(_, ok)| !ok).count();
    eprintln!(
        "overlay: a's pings of b across the live migration of b: {lost} lost of {} (0.3 s apart, 1 s timeout)",
        after.len()
    );
    assert!(
        after.iter().rev().take(5).all(|(_, ok)| *ok),
        "a no longer reaches b: {after:?}"
    );
    assert!(
        lost <= 8,
        "a lost {lost} pings of b across the migration: {after:?}"
    );
    // b runs on at the third host, where it goes on reaching a.
    let b_before = c.pings_at(&third, "b").last().map_or(0, |(n, _)| *n);
    c.wait_pings(&third, "b", b_before, 3, Duration::from_secs(60));
    assert!(c.host(&hb).running().is_empty(), "b left {hb}");
    // Its next DHCP request is answered by the third host, with the same address.
    wait_until(
        "the third host's dnsmasq leases b its address",
        Duration::from_secs(120),
        || {
            c.dnsmasq_log(&third)
                .lines()
                .any(|l| l.contains("DHCPACK") && l.contains(&mac_b) && l.contains("10.251.0.11"))
        },
    );
    // The host b left no longer answers for it (its requests reach it over the overlay
    // no more than anyone's, and its hosts file has dropped b).
    assert_eq!(
        acks(&c.dnsmasq_log(&hb)),
        acks_at_old,
        "{}",
        c.dnsmasq_log(&hb)
    );
}

/// Issue 18, images without shared storage: each host's pool `img` is a folder of its
/// own. A volume uploaded to h0 only is copied on first use by the host a domain using it
/// is placed on (h0 drained, so it is another), before that host defines the domain,
/// byte for byte; a host that has its copy does not fetch it again, and a domain started
/// on it runs from the copy.
#[test]
fn a_volume_is_copied_on_first_use_once_per_host() {
    let c = Cluster::start("cow");
    for (i, h) in c.hosts.iter().enumerate() {
        let dir = c.dir.join(format!("shared/img-h{i}"));
        h.ok(&["pool-define", "img", dir.to_str().unwrap(), "--build"]);
    }
    // 3 MiB with a pattern, and a zero MiB in the middle.
    let mut data = vec![0u8; 3 << 20];
    for (i, b) in data.iter_mut().enumerate() {
        if !(1 << 20..2 << 20).contains(&i) {
            *b = (i % 251) as u8 ^ 0x5a;
        }
    }
    let src = c.dir.join("base.raw");
    std::fs::write(&src, &data).unwrap();
    c.hosts[0].ok(&[
        "vol-create-as",
        "img",
        "base.raw",
        "--format",
        "raw",
        "--from",
        src.to_str().unwrap(),
    ]);
    c.hosts[0].ok(&["host-maintenance", "h0", "on"]);
    let define = |via: usize, name: &str| -> String {
        let def = json!({"name": name, "driver": "vessel",
            "vm": {"kernel": c.guest(), "cmdline": "", "memory_mib": 64, "accel": "kvm",
                   "disks": [{"path": "vol://img/base.raw", "format": "raw"}]}});
        let f = c.dir.join(format!("{name}.json"));
        std::fs::write(&f, def.to_string()).unwrap();
        let v = c.hosts[via].json(&["define", f.to_str().unwrap()]);
        v["host"].as_str().unwrap().to_string()
    };
    let mut placed = Vec::new();
    for (i, name) in ["c1", "c2", "c3", "c4"].into_iter().enumerate() {
        let h = define(i % 3, name);
        assert_ne!(h, "h0", "h0 is drained");
        let host = c.host(&h);
        wait_until(
            &format!("{h} defines {name}"),
            Duration::from_secs(30),
            || host.cli(&["dominfo", name]).status.success(),
        );
        placed.push((name, h));
    }
    for i in 1..3 {
        let copy = c.dir.join(format!("shared/img-h{i}/base.raw"));
        assert!(
            std::fs::read(&copy).is_ok_and(|d| d == data),
            "h{i}'s copy of base.raw differs or is missing"
        );
        let log = c.hosts[i].log();
        let n = log.matches("volume copied on first use").count();
        assert_eq!(n, 1, "h{i} fetched base.raw {n} times:\n{log}");
        assert!(
            log.contains(&format!("capacity={} ", 3 << 20)) && log.contains("from=h0"),
            "{log}"
        );
    }
    // A domain runs from its host's copy.
    let (name, h) = placed[0].clone();
    c.hosts[0].ok(&["start", name]);
    wait_until(
        &format!("{name} runs on {h}"),
        Duration::from_secs(30),
        || c.host(&h).running().contains_key(name),
    );
}

/// What a guest whose runs are counted writes (spaces as `+`): its boot's id and a
/// counter, to the start of its disk (a file in the shared folder), every 0.2 s.
const BOOT_TOKEN: &str = "vessel.run=b=$(head+-c+8+/proc/sys/kernel/random/boot_id);i=0;\
    while+true;do+i=$((i-(-1)));echo+tok+$b+$i+>/dev/vda;sync;sleep+0.2;done";

/// `(boot id, counter)` at the start of a guest's disk.
fn boot_token(disk: &Path) -> Option<(String, u64)> {
    let b = std::fs::read(disk).ok()?;
    let line = String::from_utf8_lossy(&b[..b.len().min(64)]).into_owned();
    let mut w = line.lines().next()?.strip_prefix("tok ")?.split(' ');
    let boot = w.next()?.to_string();
    let n = w.next()?.parse().ok()?;
    (boot.len() == 8).then_some((boot, n))
}

/// Samples the tokens of `disks` every 100 ms until `stop`; returns each disk's
/// sequence of distinct samples.
fn watch_tokens(
    disks: Vec<PathBuf>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<Vec<(String, u64)>>> {
    std::thread::spawn(move || {
        let mut seen: Vec<Vec<(String, u64)>> = vec![Vec::new(); disks.len()];
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            for (d, s) in disks.iter().zip(seen.iter_mut()) {
                if let Some(t) = boot_token(d) {
                    if s.last() != Some(&t) {
                        s.push(t);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        seen
    })
}

/// A guest ran once at a time: once a boot has written, no earlier boot writes again,
/// and each boot's counter only grows.
fn ran_once_at_a_time(samples: &[(String, u64)]) -> Result<(), String> {
    let mut boots: Vec<&str> = Vec::new();
    let mut last: Option<&(String, u64)> = None;
    for t in samples {
        match boots.iter().position(|b| *b == t.0) {
            Some(i) if i + 1 != boots.len() => {
                return Err(format!(
                    "boot {} wrote again after boot {}: {samples:?}",
                    t.0,
                    boots[boots.len() - 1]
                ))
            }
            Some(_) => {
                if last.is_some_and(|l| l.0 == t.0 && l.1 > t.1) {
                    return Err(format!(
                        "the counter of boot {} went back: {samples:?}",
                        t.0
                    ));
                }
            }
            None => boots.push(&t.0),
        }
        last = Some(t);
    }
    Ok(())
}

impl Cluster {
    /// A Linux guest under emu writing [`BOOT_TOKEN`] to a raw disk in the shared
    /// folder, defined through host `via`; returns its host and its disk.
    fn define_token_writer(&self, via: usize, name: &str) -> (String, PathBuf) {
        let a = common::assets();
        let disk = self.dir.join(format!("shared/{name}.raw"));
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
        let def = json!({"name": name, "driver": "vessel",
            "vm": {"kernel": a.join("vmlinuz"), "initrd": a.join("initramfs.cpio.gz"),
                   "cmdline": format!("console=ttyS0 panic=-1 quiet {BOOT_TOKEN}"),
                   "memory_mib": 256, "accel": "emu",
                   "disks": [{"path": disk, "format": "raw"}]}});
        let f = self.dir.join(format!("{name}.json"));
        std::fs::write(&f, def.to_string()).unwrap();
        let v = self.hosts[via].json(&["define", f.to_str().unwrap()]);
        (v["host"].as_str().unwrap_or_default().to_string(), disk)
    }

    /// Kills host `i` at once, as a machine that dies: its daemon and every process in
    /// its network namespace (its VMMs, its watchdog) with SIGKILL, then the namespace.
    fn kill_host_and_namespace(&mut self, i: usize) {
        let ns = self.hosts[i].ns.clone().expect("a host in a namespace");
        self.hosts[i].kill9();
        let o = Command::new("ip")
            .args(["netns", "pids", &ns])
            .output()
            .unwrap();
        for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
            if let Ok(p) = pid.parse::<i32>() {
                kill(p, libc::SIGKILL);
            }
        }
        let st = Command::new("ip")
            .args(["netns", "del", &ns])
            .status()
            .unwrap();
        assert!(st.success(), "ip netns del {ns}");
    }
}

/// The issue's scenario: SIGKILL of a host's daemon and of its namespace (everything in
/// it) → its running domains run again on the others within 30 s, and no domain ever
/// runs twice, as the guests themselves show: each writes its boot's id and a counter to
/// its disk on shared storage, and once a new boot writes, no earlier one does.
#[test]
fn a_killed_host_and_namespace_are_evacuated_and_no_guest_runs_twice() {
    let mut c = Cluster::start_in_netns("kns");
    let joined = Instant::now();
    // Spread placement: one guest on each of two hosts.
    let (h_a, disk_a) = c.define_token_writer(0, "tok-a");
    let (h_b, disk_b) = c.define_token_writer(1, "tok-b");
    assert_ne!(h_a, h_b);
    for d in ["tok-a", "tok-b"] {
        let v = c.hosts[2].json(&["start", d]);
        assert_eq!(v["state"], "running", "{v}");
    }
    let t = Instant::now();
    for d in [&disk_a, &disk_b] {
        wait_until(
            "the guests write their tokens",
            Duration::from_secs(180),
            || boot_token(d).is_some_and(|(_, n)| n >= 3),
        );
    }
    eprintln!("guests writing after {:?}", t.elapsed());
    let boot_a = boot_token(&disk_a).unwrap().0;
    let boot_b = boot_token(&disk_b).unwrap().0;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = watch_tokens(vec![disk_a.clone(), disk_b.clone()], stop.clone());
    // See killed_host_is_evacuated_once_and_lost_quorum_changes_nothing.
    std::thread::sleep(Duration::from_secs(10).saturating_sub(joined.elapsed()));

    let victim = c.hosts.iter().position(|h| h.name == h_a).unwrap();
    c.kill_host_and_namespace(victim);
    let t0 = Instant::now();
    wait_until(
        &format!("tok-a running again on a host other than {h_a}"),
        Duration::from_secs(30),
        || {
            let now = c.runners();
            assert!(now.values().all(|h| h.len() == 1), "twice: {now:?}");
            now.get("tok-a").is_some_and(|h| h[0] != h_a)
        },
    );
    eprintln!("evacuated (its VMM runs) in {:?}", t0.elapsed());
    wait_until("tok-a's new boot writes", Duration::from_secs(180), || {
        boot_token(&disk_a).is_some_and(|(b, n)| b != boot_a && n >= 5)
    });
    eprintln!("tok-a writes again {:?} after the kill", t0.elapsed());
    std::thread::sleep(Duration::from_secs(2));
    // The guest on a host that lived ran on untouched.
    assert!(
        boot_token(&disk_b).is_some_and(|(b, _)| b == boot_b),
        "tok-b rebooted"
    );
    assert_eq!(c.runner("tok-b"), h_b);

    // h_b cut off from everything (its uplink down): it reaches neither etcd nor the
    // other host, so nothing lets it hold on: it stops tok-b before its lease can
    // expire, and the last host runs tok-b, which never runs on both.
    let cut = c.hosts.iter().position(|h| h.name == h_b).unwrap();
    let ns = c.hosts[cut].ns.clone().unwrap();
    Netns::ip(&ns, &["link", "set", "uplink", "down"]);
    let t1 = Instant::now();
    wait_until(
        &format!("tok-b running on a host other than {h_b}"),
        Duration::from_secs(30),
        || {
            let now = c.runners();
            assert!(now.values().all(|h| h.len() == 1), "twice: {now:?}");
            now.get("tok-b").is_some_and(|h| h[0] != h_b)
        },
    );
    eprintln!(
        "cut-off host's domain runs elsewhere after {:?}",
        t1.elapsed()
    );
    wait_until("tok-b's new boot writes", Duration::from_secs(180), || {
        boot_token(&disk_b).is_some_and(|(b, n)| b != boot_b && n >= 5)
    });
    assert!(
        c.hosts[cut].log().contains("fencing this host"),
        "{}",
        c.hosts[cut].log()
    );
    Netns::ip(&ns, &["link", "set", "uplink", "up"]);
    wait_until(
        "the cut-off host registers again",
        Duration::from_secs(30),
        || c.placement(cut).len() == 2,
    );
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = sampler.join().unwrap();
    for (d, s) in ["tok-a", "tok-b"].iter().zip(&seen) {
        if let Err(e) = ran_once_at_a_time(s) {
            panic!("{d}: {e}");
        }
        assert!(
            s.iter()
                .map(|(b, _)| b)
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                == 2,
            "{d}: {s:?}"
        );
    }
    assert_eq!(c.runners().len(), 2, "{:?}", c.runners());
}

#[test]
fn boot_tokens_show_a_guest_that_ran_twice() {
    let t = |b: &str, n| (b.to_string(), n);
    assert!(ran_once_at_a_time(&[t("aaaaaaaa", 1), t("aaaaaaaa", 2), t("bbbbbbbb", 1)]).is_ok());
    assert!(ran_once_at_a_time(&[t("aaaaaaaa", 1), t("bbbbbbbb", 1), t("aaaaaaaa", 2)]).is_err());
    assert!(ran_once_at_a_time(&[t("aaaaaaaa", 2), t("aaaaaaaa", 1)]).is_err());
}

/// An overlay network must be defined alike on every host: a definition that differs
/// from another host's (VNI, address) is refused at net-define, and at net-start when
/// the two were defined while the hosts could not see each other's.
#[test]
fn overlay_definitions_that_differ_between_hosts_are_refused() {
    let mut c = Cluster::start("ovdef");
    let def = |h: usize, name: &str, addr: &str, vni: &str| {
        c.hosts[h].cli(&[
            "net-define",
            name,
            "--address",
            addr,
            "--no-nat",
            "--vni",
            vni,
        ])
    };
    assert!(def(0, "ovx", "10.253.0.1/24", "6001").status.success());
    wait_until("h0 announces ovx", Duration::from_secs(20), || {
        let v = c.hosts[1].json(&["host-info", "h0"]);
        v["host"]["overlays"]
            .as_array()
            .is_some_and(|a| a.iter().any(|o| o["name"] == "ovx"))
    });
    let e = c.hosts[1].fails(&[
        "net-define",
        "ovx",
        "--address",
        "10.253.0.1/24",
        "--no-nat",
        "--vni",
        "6002",
    ]);
    assert!(
        e.contains("defined on host h0 with VNI 6001") && e.contains("here with VNI 6002"),
        "{e}"
    );
    let e = c.hosts[1].fails(&[
        "net-define",
        "ovx",
        "--address",
        "10.254.0.1/24",
        "--no-nat",
        "--vni",
        "6001",
    ]);
    assert!(
        e.contains("address 10.253.0.1/24") && e.contains("10.254.0.1/24"),
        "{e}"
    );
    let e = c.hosts[2].fails(&[
        "net-define",
        "ovy",
        "--address",
        "10.252.0.1/24",
        "--no-nat",
        "--vni",
        "6001",
    ]);
    assert!(
        e.contains("VNI 6001 is network \"ovx\"'s on host h0"),
        "{e}"
    );
    // Alike: accepted.
    assert!(def(1, "ovx", "10.253.0.1/24", "6001").status.success());
    // Two definitions made apart (h0 down meanwhile): the one started second is refused.
    c.hosts[0].kill9();
    wait_until("h0's record gone", Duration::from_secs(30), || {
        c.placement(2).len() == 2
    });
    c.hosts[2].ok(&[
        "net-define",
        "ovz",
        "--address",
        "10.249.0.1/24",
        "--no-nat",
        "--vni",
        "6100",
    ]);
    // Meanwhile h0's daemon runs outside the cluster and defines ovz otherwise.
    let mut h0 = c.hosts.remove(0);
    let solo = h0.dir.join("solo.sock");
    let mut d = Command::new(EXE)
        .arg("daemon")
        .arg("--socket")
        .arg(&solo)
        .arg("--state-dir")
        .arg(h0.dir.join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("h0's daemon alone answers", Duration::from_secs(20), || {
        UnixStream::connect(&solo).is_ok()
    });
    let o = Command::new(EXE)
        .arg("--socket")
        .arg(&solo)
        .args([
            "net-define",
            "ovz",
            "--address",
            "10.249.0.1/24",
            "--no-nat",
            "--vni",
            "6101",
        ])
        .output()
        .unwrap();
    kill(d.id() as i32, libc::SIGKILL);
    let _ = d.wait();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    c.spawn(&mut h0);
    c.hosts.insert(0, h0);
    wait_until("h0 back, announcing ovz", Duration::from_secs(30), || {
        let o = c.hosts[2].cli(&["--json", "host-info", "h0"]);
        serde_json::from_slice::<Value>(&o.stdout).is_ok_and(|v| {
            v["host"]["overlays"]
                .as_array()
                .is_some_and(|a| a.iter().any(|o| o["name"] == "ovz"))
        })
    });
    for (h, other, here, there) in [(0, "h2", "6101", "6100"), (2, "h0", "6100", "6101")] {
        let e = c.hosts[h].fails(&["net-start", "ovz"]);
        assert!(
            e.contains(&format!("defined on host {other} with VNI {there}"))
                && e.contains(&format!("here with VNI {here}")),
            "{e}"
        );
    }
}

/// etcd with client TLS and client-certificate auth (`--cert-file`, `--client-cert-auth`,
/// `--trusted-ca-file`), certificates made by openssl: the daemons join over https://
/// with `--etcd-cacert/--etcd-cert/--etcd-key`, place and start a domain. A daemon
/// without a client certificate, with one of another CA, or that does not trust etcd's
/// CA is refused at once, and its error names the cause and the option to fix.
#[test]
fn cluster_runs_over_etcd_tls_with_client_certificates() {
    let c = Cluster::start_tls("tls");
    assert!(c.endpoints().starts_with("https://"), "{}", c.endpoints());
    let hosts = c.hosts[1].json(&["host-list"]);
    assert_eq!(hosts.as_array().unwrap().len(), 3, "{hosts}");
    let h = c.define(2, "over-tls", 64);
    let v = c.hosts[0].json(&["start", "over-tls"]);
    assert_eq!(v["host"], h.as_str(), "{v}");
    wait_until("over-tls runs on its host", Duration::from_secs(30), || {
        c.runners().get("over-tls") == Some(&vec![h.clone()])
    });
    // The daemons really spoke TLS: etcd's plain-text port is not there.
    let plain = c.endpoints().replace("https://", "http://");
    let o = c
        .etcdctl()
        .args(["--endpoints", &plain, "--command-timeout=2s", "get", "/x"])
        .output()
        .unwrap();
    assert!(!o.status.success(), "etcd answered over plain HTTP");

    let certs = c.certs.as_ref().unwrap();
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "no client certificate",
            vec!["--etcd-cacert".into(), certs.path("ca.pem")],
            "give --etcd-cert and --etcd-key",
        ),
        (
            "a client certificate of another CA",
            vec![
                "--etcd-cacert".into(),
                certs.path("ca.pem"),
                "--etcd-cert".into(),
                certs.path("other.pem"),
                "--etcd-key".into(),
                certs.path("other.key"),
            ],
            "refused this host's client certificate",
        ),
        (
            "another CA than etcd's",
            vec![
                "--etcd-cacert".into(),
                certs.path("other-ca.pem"),
                "--etcd-cert".into(),
                certs.path("etcd.pem"),
                "--etcd-key".into(),
                certs.path("etcd.key"),
            ],
            "not signed by the CA of --etcd-cacert",
        ),
        (
            "no CA at all",
            vec![],
            "https:// endpoints need --etcd-cacert",
        ),
    ];
    for (i, (what, args, want)) in cases.into_iter().enumerate() {
        let h = Host {
            name: format!("bad{i}"),
            dir: c.dir.join(format!("bad{i}")),
            tcp: format!("127.0.0.1:{}", free_port()),
            ns: None,
            child: None,
        };
        std::fs::create_dir_all(&h.dir).unwrap();
        let t0 = Instant::now();
        let mut child = c.daemon(&h, &args).spawn().unwrap();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if t0.elapsed() > Duration::from_secs(20) {
                kill(child.id() as i32, libc::SIGKILL);
                let _ = child.wait();
                panic!("{what}: the daemon still runs after 20 s: {}", h.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let log = h.log();
        eprintln!("{what}: refused in {:?}", t0.elapsed());
        assert!(!status.success(), "{what}: {log}");
        assert!(log.contains(want), "{what}: wanted {want:?} in: {log}");
        assert!(!log.contains("lost its quorum"), "{what}: {log}");
        // Refused, not timed out (each etcd request may take 5 s).
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{what}: {:?}",
            t0.elapsed()
        );
    }
    // None of them joined.
    let hosts = c.hosts[0].json(&["host-list"]);
    assert_eq!(hosts.as_array().unwrap().len(), 3, "{hosts}");
}

/// A host that died where no other host may evacuate it automatically keeps its domains'
/// records: here the other hosts registered again just after it died (their daemons
/// restarted within its lease), so none of them saw it alive a lease after joining, as
/// after an etcd outage that cut them off (docs/CLUSTER.md, "The rule against running a
/// domain twice"). `host-list` shows it down with its domains; `host-maintenance H on`
/// through another host moves them, and each domain that was running starts on a live
/// host and runs exactly once, as its guest-side token on shared storage shows. When the
/// dead host's daemon comes back, it runs none of them and drops their definitions.
#[test]
fn a_dead_host_that_was_not_evacuated_is_drained_by_hand() {
    let mut c = Cluster::start("drain-dead");
    // Everything on h2: the other hosts are in maintenance while the domains are placed.
    for h in ["h0", "h1"] {
        c.hosts[0].ok(&["host-maintenance", h, "on"]);
    }
    let (h_a, disk_a) = c.define_token_writer(0, "dd-a");
    let (h_b, disk_b) = c.define_token_writer(1, "dd-b");
    let h_off = c.define(2, "dd-off", 64);
    assert_eq!([h_a.as_str(), h_b.as_str(), h_off.as_str()], ["h2"; 3]);
    for h in ["h0", "h1"] {
        c.hosts[0].ok(&["host-maintenance", h, "off"]);
    }
    for d in ["dd-a", "dd-b"] {
        let v = c.hosts[0].json(&["start", d]);
        assert_eq!(v["host"], "h2", "{v}");
    }
    for d in [&disk_a, &disk_b] {
        wait_until(
            "the guests write their tokens",
            Duration::from_secs(180),
            || boot_token(d).is_some_and(|(_, n)| n >= 3),
        );
    }
    let boot_a = boot_token(&disk_a).unwrap().0;
    let boot_b = boot_token(&disk_b).unwrap().0;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = watch_tokens(vec![disk_a.clone(), disk_b.clone()], stop.clone());

    // h2 dies: its daemon with SIGKILL, and its watchdog stops its VMMs at once.
    c.hosts[2].kill9();
    wait_until(
        "h2's watchdog stops its VMMs",
        Duration::from_secs(10),
        || c.hosts[2].running().is_empty(),
    );
    // The others register again while h2's lease still runs.
    let mut hosts = std::mem::take(&mut c.hosts);
    for h in &mut hosts[..2] {
        h.kill9();
    }
    for h in &mut hosts[..2] {
        c.spawn(h);
    }
    c.hosts = hosts;
    let listed = |c: &Cluster| -> BTreeMap<String, Value> {
        c.hosts[0]
            .json(&["host-list"])
            .as_array()
            .unwrap()
            .iter()
            .map(|h| (h["host"]["name"].as_str().unwrap().to_string(), h.clone()))
            .collect()
    };
    wait_until(
        "h2's lease expires (host-list shows it down)",
        Duration::from_secs(30),
        || {
            let l = listed(&c);
            l.len() == 3 && l["h2"]["down"] == json!(true)
        },
    );
    let down_at = Instant::now();
    // Long enough for an evacuation to have begun (a TTL and 2 s after joining, the
    // others could take over a host they had seen alive), yet nothing moves.
    std::thread::sleep(Duration::from_secs(10));
    let l = listed(&c);
    let on_h2: Vec<&str> = l["h2"]["domains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(on_h2, ["dd-a", "dd-b", "dd-off"], "{l:?}");
    assert!(c.runners().is_empty(), "{:?}", c.runners());
    let table = c.hosts[1].ok(&["host-list"]);
    assert!(
        table
            .lines()
            .any(|l| l.trim_start().starts_with("h2 ") && l.contains("down")),
        "{table}"
    );

    // The operator drains it, through another host.
    let t0 = Instant::now();
    let v = c.hosts[1].json(&["host-maintenance", "h2", "on"]);
    let moved: BTreeMap<&str, &Value> = v["moved"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["domain"].as_str().unwrap(), m))
        .collect();
    assert_eq!(moved.len(), 3, "{v}");
    for d in ["dd-a", "dd-b"] {
        assert_eq!(moved[d]["how"], "cold", "{v}");
        assert!(
            moved[d]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("host h2 is down")),
            "{v}"
        );
    }
    assert_eq!(moved["dd-off"]["how"], "shut off", "{v}");
    for m in moved.values() {
        assert!(["h0", "h1"].contains(&m["to"].as_str().unwrap()), "{v}");
    }
    wait_until(
        "dd-a and dd-b run on their new hosts",
        Duration::from_secs(30),
        || {
            let now = c.runners();
            assert!(now.values().all(|h| h.len() == 1), "twice: {now:?}");
            ["dd-a", "dd-b"]
                .iter()
                .all(|d| now.get(*d) == Some(&vec![s_of(&moved[d]["to"])]))
        },
    );
    eprintln!(
        "drained {:?} after h2's lease expired; its domains run again {:?} after the drain",
        down_at.elapsed(),
        t0.elapsed()
    );
    for (d, boot) in [(&disk_a, &boot_a), (&disk_b, &boot_b)] {
        wait_until("the new boots write", Duration::from_secs(180), || {
            boot_token(d).is_some_and(|(b, n)| b != *boot && n >= 3)
        });
    }
    assert!(!c.runners().contains_key("dd-off"));
    let p = c.placement(0);
    assert!(p.get("h2").is_none_or(|d| d.is_empty()), "{p:?}");

    // h2 comes back: in maintenance, with none of its old domains defined or running.
    let mut h2 = c.hosts.remove(2);
    c.spawn(&mut h2);
    c.hosts.push(h2);
    wait_until(
        "h2 drops the definitions of the domains moved away",
        Duration::from_secs(30),
        || {
            let l = c.hosts[2].ok(&["list", "--all", "--name"]);
            !l.lines().any(|n| n.starts_with("dd-"))
        },
    );
    let l = listed(&c);
    assert_eq!(l["h2"]["maintenance"], json!(true), "{l:?}");
    assert!(l["h2"]["down"].is_null(), "{l:?}");
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = sampler.join().unwrap();
    for (d, s) in ["dd-a", "dd-b"].iter().zip(&seen) {
        if let Err(e) = ran_once_at_a_time(s) {
            panic!("{d}: {e}");
        }
        let boots: std::collections::BTreeSet<_> = s.iter().map(|(b, _)| b).collect();
        assert_eq!(boots.len(), 2, "{d}: {s:?}");
    }
    let r = c.runners();
    assert_eq!(r.len(), 2, "{r:?}");
    assert!(r.values().all(|h| h.len() == 1 && h[0] != "h2"), "{r:?}");
}

/// A host drained right after its daemon died, while its lease still runs: its running
/// domain cannot migrate (nothing answers there), so its record moves cold, and the new
/// host starts it only once etcd has expired the dead host's lease (its `running/N` key
/// goes with it), never while the dead host could still hold it.
#[test]
fn a_host_drained_while_its_dead_daemon_lease_runs_starts_its_domains_after_expiry() {
    let mut c = Cluster::start("drain-lease");
    for h in ["h0", "h1"] {
        c.hosts[0].ok(&["host-maintenance", h, "on"]);
    }
    assert_eq!(c.define(0, "dl", 64), "h2");
    for h in ["h0", "h1"] {
        c.hosts[0].ok(&["host-maintenance", h, "off"]);
    }
    c.hosts[1].json(&["start", "dl"]);
    wait_until("dl runs on h2", Duration::from_secs(30), || {
        c.runners().get("dl") == Some(&vec!["h2".to_string()])
    });
    c.hosts[2].kill9();
    let killed = Instant::now();
    wait_until(
        "h2's watchdog stops its VMM",
        Duration::from_secs(10),
        || c.hosts[2].running().is_empty(),
    );
    let v = c.hosts[0].json(&["host-maintenance", "h2", "on"]);
    let m = &v["moved"][0];
    assert_eq!(m["domain"], "dl", "{v}");
    assert_eq!(m["how"], "cold", "{v}");
    let to = s_of(&m["to"]);
    assert!(to == "h0" || to == "h1", "{v}");
    // Until h2's lease has expired, dl runs nowhere; then on its new host, once.
    let live = |c: &Cluster| {
        c.hosts[0]
            .json(&["host-list"])
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["host"]["name"] == "h2" && h["down"].is_null())
    };
    let mut lease_seen_gone = None;
    wait_until("dl runs on its new host", Duration::from_secs(30), || {
        let h2_live = live(&c);
        if !h2_live && lease_seen_gone.is_none() {
            lease_seen_gone = Some(killed.elapsed());
        }
        let now = c.runners();
        assert!(now.values().all(|h| h.len() == 1), "twice: {now:?}");
        match now.get("dl") {
            Some(h) => {
                assert!(
                    !h2_live || lease_seen_gone.is_some(),
                    "dl started on {h:?} while h2's lease still ran"
                );
                assert_eq!(h, &vec![to.clone()]);
                true
            }
            None => false,
        }
    });
    eprintln!(
        "h2's lease seen gone {lease_seen_gone:?} after the kill; dl ran on {to} {:?} after the kill",
        killed.elapsed()
    );
    assert!(lease_seen_gone.is_some());
}

fn s_of(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}
