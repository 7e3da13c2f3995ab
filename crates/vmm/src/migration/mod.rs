//! Live migration between two VMM processes: the source sends guest memory in rounds
//! while the guest runs (each round the pages written during the one before, from the
//! accelerator's dirty log), then pauses the guest and sends the pages written last and
//! the VM's state; the destination builds the VM from them as a snapshot restore does,
//! runs it and answers; the source then ends. docs/MIGRATION.md has the stream and the
//! options.
//!
//! `send` is the source's side (`PUT /migration/send`), `receive` the destination's
//! (`vessel run --incoming URL`), `wire` the stream they share.

pub mod fds;
pub mod receive;
pub mod send;
pub mod wire;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where a migration goes: `unix:PATH` or `tcp:HOST:PORT` (QEMU's and Cloud
/// Hypervisor's URL forms).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(Endpoint::Unix(p.into()));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            let ok = a
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                return Err(format!("tcp:{a}: give tcp:HOST:PORT"));
            }
            return Ok(Endpoint::Tcp(a.into()));
        }
        Err(format!("{s}: give unix:PATH or tcp:HOST:PORT"))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// A connection of either kind. A Unix one keeps the descriptors that came with the
/// bytes read so far (`fds`), for the HANDLES record to claim.
#[derive(Debug)]
pub enum Conn {
    Unix(UnixStream, Vec<std::os::fd::OwnedFd>),
    Tcp(TcpStream),
}

impl Conn {
    pub fn connect(to: &Endpoint) -> std::io::Result<Conn> {
        Ok(match to {
            Endpoint::Unix(p) => Conn::Unix(UnixStream::connect(p)?, Vec::new()),
            Endpoint::Tcp(a) => {
                let s = TcpStream::connect(a.as_str())?;
                s.set_nodelay(true)?;
                Conn::Tcp(s)
            }
        })
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Conn::Unix(s, _) => s.set_read_timeout(t),
            Conn::Tcp(s) => s.set_read_timeout(t),
        }
    }

    /// Ends the connection both ways: writes still buffered fail at once.
    fn shutdown(&self) {
        let _ = match self {
            Conn::Unix(s, _) => s.shutdown(std::net::Shutdown::Both),
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Conn::Unix(s, _) => s.set_write_timeout(t),
            Conn::Tcp(s) => s.set_write_timeout(t),
        }
    }

    /// Writes `data` with `fds` attached where the connection can carry them (Unix);
    /// over TCP the descriptors stay behind.
    fn write_with_fds(&mut self, data: &[u8], fds: &[std::os::fd::OwnedFd]) -> std::io::Result<()> {
        match self {
            Conn::Unix(s, _) => fds::send(s, data, fds),
            Conn::Tcp(s) => s.write_all(data),
        }
    }

    /// The descriptors received so far, taken.
    fn take_fds(&mut self) -> Vec<std::os::fd::OwnedFd> {
        match self {
            Conn::Unix(_, got) => std::mem::take(got),
            Conn::Tcp(_) => Vec::new(),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s, got) => fds::recv(s, buf, got),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s, _) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Unix(s, _) => s.flush(),
            Conn::Tcp(s) => s.flush(),
        }
    }
}

/// What a HANDLES record says its descriptors are, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum HandleKind {
    /// `queues` descriptors: the queues of the TAP device `name`.
    Tap { name: String, queues: u32 },
    /// One descriptor: vsock's listening socket at `path`.
    Vsock { path: PathBuf },
}

/// Host descriptors a migration's source on this host handed over, for the VM's
/// devices to take instead of opening their TAP or binding their socket again.
#[derive(Debug, Default)]
pub struct Handover {
    taps: std::collections::HashMap<String, Vec<std::os::fd::OwnedFd>>,
    vsock: std::collections::HashMap<PathBuf, std::os::fd::OwnedFd>,
}

impl Handover {
    /// Pairs the descriptors received with what the record says they are; None when
    /// their count is not the one it says (they did not come through: a relay that
    /// passes bytes only), so the devices open theirs by name.
    pub fn of(kinds: &[HandleKind], mut fds: Vec<std::os::fd::OwnedFd>) -> Option<Handover> {
        let want: usize = kinds
            .iter()
            .map(|k| match k {
                HandleKind::Tap { queues, .. } => *queues as usize,
                HandleKind::Vsock { .. } => 1,
            })
            .sum();
        if want != fds.len() {
            return None;
        }
        let mut h = Handover::default();
        let mut rest = fds.drain(..);
        for k in kinds {
            match k {
                HandleKind::Tap { name, queues } => {
                    let q: Vec<_> = rest.by_ref().take(*queues as usize).collect();
                    h.taps.insert(name.clone(), q);
                }
                HandleKind::Vsock { path } => {
                    if let Some(fd) = rest.next() {
                        h.vsock.insert(path.clone(), fd);
                    }
                }
            }
        }
        Some(h)
    }

    /// The queues of TAP `name`, if they were handed over.
    pub fn take_tap(&mut self, name: &str) -> Option<Vec<std::os::fd::OwnedFd>> {
        self.taps.remove(name)
    }

    /// vsock's listener at `path`, if it was handed over.
    pub fn take_vsock(&mut self, path: &std::path::Path) -> Option<std::os::fd::OwnedFd> {
        self.vsock.remove(path)
    }

    pub fn is_empty(&self) -> bool {
        self.taps.is_empty() && self.vsock.is_empty()
    }
}

/// How the source decides when to stop the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Stop and copy once the pages left would take at most this long to send at the
    /// rate the last round achieved (QEMU's and Cloud Hypervisor's default: 300 ms).
    pub downtime_limit: Duration,
    /// Stop and copy after this many rounds whatever is left (a guest that writes
    /// faster than the link carries never converges).
    pub max_rounds: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            downtime_limit: Duration::from_millis(300),
            max_rounds: 30,
        }
    }
}

/// What a finished migration measured (source's view).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Rounds of pre-copy with the guest running (the first sends all of RAM).
    pub rounds: u32,
    /// Pages sent with the guest stopped.
    pub last_pages: u64,
    /// Pages sent in all.
    pub pages: u64,
    /// Of them, all-zero pages sent as a mark only.
    pub zero_pages: u64,
    /// Pages of the first round neither read nor sent: the guest never touched them
    /// (`/proc/self/pagemap`), so they are zero, as the destination's fresh memory is.
    #[serde(default)]
    pub untouched_pages: u64,
    /// Bytes written to the stream.
    pub bytes: u64,
    /// From the request to the destination's answer, ms.
    pub total_ms: f64,
    /// From the guest's pause here to the destination's answer that it runs it, ms.
    pub downtime_ms: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("connecting to {to}: {source}")]
    Connect { to: String, source: std::io::Error },
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error("{0}")]
    Accel(hypervisor::Error),
    #[error("pausing the VM: {0}")]
    Pause(String),
    #[error("the destination refused the VM: {0}")]
    Refused(String),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("the destination stopped taking the stream: a write of it waited {0:?}")]
    Stalled(Duration),
}

impl From<std::io::Error> for MigrationError {
    fn from(e: std::io::Error) -> Self {
        // The stream's writes give up after `send::STALL_TIMEOUT` (SO_SNDTIMEO).
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                MigrationError::Stalled(send::STALL_TIMEOUT)
            }
            _ => MigrationError::Wire(wire::WireError::Io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A HANDLES record reads back as written, and its descriptors go to the devices
    /// only when as many came as it lists.
    #[test]
    fn handles_pair_with_their_descriptors_only_when_all_came() {
        let kinds = vec![
            HandleKind::Tap {
                name: "vtap0".into(),
                queues: 2,
            },
            HandleKind::Vsock {
                path: "/run/v.sock".into(),
            },
        ];
        let body = serde_json::to_vec(&kinds).unwrap();
        let mut r = std::io::Cursor::new(wire::handles_record(&body));
        let wire::Record::Handles(got) = wire::read_record(&mut r).unwrap() else {
            panic!("not a HANDLES record");
        };
        assert_eq!(
            serde_json::from_slice::<Vec<HandleKind>>(&got).unwrap(),
            kinds
        );
        let fd = || std::os::fd::OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        assert!(Handover::of(&kinds, vec![fd(), fd()]).is_none());
        let mut h = Handover::of(&kinds, vec![fd(), fd(), fd()]).unwrap();
        assert_eq!(h.take_tap("vtap0").map(|q| q.len()), Some(2));
        assert!(h.take_tap("other").is_none());
        assert!(h.take_vsock(std::path::Path::new("/run/v.sock")).is_some());
        assert!(h.is_empty());
    }

    #[test]
    fn endpoints_parse_as_qemu_writes_them() {
        assert_eq!(
            "unix:/tmp/m.sock".parse(),
            Ok(Endpoint::Unix("/tmp/m.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:4444".parse(),
            Ok(Endpoint::Tcp("127.0.0.1:4444".into()))
        );
        assert_eq!("tcp:[::1]:5".parse(), Ok(Endpoint::Tcp("[::1]:5".into())));
        for bad in [
            "unix:",
            "tcp:host",
            "tcp::80",
            "tcp:h:99999",
            "/tmp/x",
            "fd:3",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
        assert_eq!(
            Endpoint::Unix("/a".into()).to_string(),
            "unix:/a",
            "shown as given"
        );
    }
}
