//! virtio-vsock with a host side on Unix sockets, in Firecracker's style:
//! - a host program connects to `uds_path` and writes `CONNECT <port>\n`; the device opens
//!   a stream to that guest port and answers `OK <host port>\n` once the guest accepts;
//! - a guest connection to the host (CID 2) port P is forwarded to `<uds_path>_P`.
//!
//! The device keeps the stream protocol (request/response, credit-based flow control,
//! shutdown/reset) and the connections in a [`Backend`]. The device's I/O thread drives
//! both sides: the driver's notifies, and the host sockets through [`VsockInput`].

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::queue::{gather, scatter, Chain};
use crate::{device_type, read_config_bytes, DeviceError, QueueOutcome, VirtioDevice};

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
/// virtio_vsock_event's id for a transport reset: the driver drops every connection
/// and reads the guest CID again.
const EVENT_TRANSPORT_RESET: u32 = 0;
pub const HOST_CID: u64 = 2;
const HDR_LEN: usize = 44;
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_BOTH: u32 = 3;
/// What we tell the guest it may have in flight towards us per connection.
const BUF_ALLOC: u32 = 256 << 10;
/// Largest payload in one packet.
const MAX_PKT: usize = 64 << 10;
/// Host ports for host-initiated connections are allocated from here.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("binding the vsock socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the descriptor handed over for the vsock socket {path} is not its listener: {why}")]
    NotThisListener { path: PathBuf, why: String },
}

/// A packet header (virtio_vsock_hdr), host-endian fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Hdr {
    fn parse(b: &[u8]) -> Option<Hdr> {
        let b = b.get(..HDR_LEN)?;
        let q = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let d = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let w = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Some(Hdr {
            src_cid: q(0),
            dst_cid: q(8),
            src_port: d(16),
            dst_port: d(20),
            len: d(24),
            type_: w(28),
            op: w(30),
            flags: d(32),
            buf_alloc: d(36),
            fwd_cnt: d(40),
        })
    }

    fn bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[derive(Debug, PartialEq, Eq)]
enum ConnState {
    /// We sent REQUEST for a host-initiated connection and wait for RESPONSE.
    Connecting,
    Established,
}

#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    state: ConnState,
    /// The guest's receive buffer and how much of what we sent it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes we sent to the guest.
    tx_cnt: u32,
    /// Bytes from the guest we wrote to the host stream, and the value last reported.
    fwd_cnt: u32,
    fwd_reported: u32,
    host_eof: bool,
}

impl Conn {
    fn peer_free(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// A host connection that has not yet said which guest port it wants.
#[derive(Debug)]
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The vsock state shared by the device and the VMM's host-socket thread.
#[derive(Debug)]
pub struct Backend {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    pending: Vec<Pending>,
    /// Keyed by (host port, guest port).
    conns: HashMap<(u32, u32), Conn>,
    rx: VecDeque<Vec<u8>>,
    next_port: u32,
}

impl Backend {
    fn hdr(&self, local: u32, peer: u32, op: u16, len: u32, conn: Option<&Conn>) -> Hdr {
        Hdr {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: local,
            dst_port: peer,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: conn.map_or(0, |c| c.fwd_cnt),
        }
    }

    fn push(&mut self, hdr: Hdr, payload: &[u8]) {
        let mut p = hdr.bytes().to_vec();
        p.extend_from_slice(payload);
        self.rx.push_back(p);
    }

    fn reset(&mut self, local: u32, peer: u32) {
        self.conns.remove(&(local, peer));
        let h = self.hdr(local, peer, OP_RST, 0, None);
        self.push(h, &[]);
    }

    /// True when packets wait for the guest's receive buffers.
    pub fn has_rx(&self) -> bool {
        !self.rx.is_empty()
    }

    /// Descriptors to wait on: the listener, connections still sending their CONNECT
    /// line, and every stream the guest has credit for (one it has none for stays
    /// readable until the guest reports what it consumed, which comes through the
    /// transmit queue).
    pub fn poll_fds(&self, fds: &mut Vec<RawFd>) {
        fds.push(self.listener.as_raw_fd());
        fds.extend(self.pending.iter().map(|p| p.stream.as_raw_fd()));
        fds.extend(
            self.conns
                .values()
                .filter(|c| c.state == ConnState::Established && !c.host_eof)
                .filter(|c| c.peer_free() > 0)
                .map(|c| c.stream.as_raw_fd()),
        );
    }

    /// Accept host connections, read their CONNECT lines, and turn host data into RW
    /// packets as far as the guest's credit allows.
    pub fn poll_host(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            if stream.set_nonblocking(true).is_ok() {
                self.pending.push(Pending {
                    stream,
                    line: Vec::new(),
                });
            }
        }
        let mut ready = Vec::new();
        let mut i = 0;
        while i < self.pending.len() {
            let p = &mut self.pending[i];
            let mut b = [0u8; 64];
            let done = match p.stream.read(&mut b) {
                Ok(0) => Some(None),
                Ok(n) => {
                    p.line.extend_from_slice(&b[..n]);
                    if p.line.contains(&b'\n') {
                        Some(Some(()))
                    } else if p.line.len() > 64 {
                        Some(None)
                    } else {
                        None
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => None,
                Err(_) => Some(None),
            };
            match done {
                None => i += 1,
                Some(ok) => {
                    let p = self.pending.swap_remove(i);
                    if ok.is_some() {
                        ready.push(p);
                    }
                }
            }
        }
        for p in ready {
            let line = String::from_utf8_lossy(&p.line).into_owned();
            let port = line
                .trim()
                .strip_prefix("CONNECT ")
                .and_then(|s| s.trim().parse::<u32>().ok());
            let Some(port) = port else {
                let mut s = p.stream;
                let _ = s.write_all(b"ERR expected CONNECT <port>\n");
                continue;
            };
            let local = self.next_port;
            self.next_port = self.next_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
            let conn = Conn {
                stream: p.stream,
                state: ConnState::Connecting,
                peer_buf_alloc: 0,
                peer_fwd_cnt: 0,
                tx_cnt: 0,
                fwd_cnt: 0,
                fwd_reported: 0,
                host_eof: false,
            };
            let h = self.hdr(local, port, OP_REQUEST, 0, Some(&conn));
            self.conns.insert((local, port), conn);
            self.push(h, &[]);
        }
        // Host data towards the guest.
        let keys: Vec<(u32, u32)> = self.conns.keys().copied().collect();
        for key in keys {
            let mut out: Vec<(Hdr, Vec<u8>)> = Vec::new();
            if let Some(c) = self.conns.get_mut(&key) {
                if c.state != ConnState::Established || c.host_eof {
                    continue;
                }
                loop {
                    let room = (c.peer_free() as usize).min(MAX_PKT);
                    if room == 0 {
                        break;
                    }
                    let mut buf = vec![0u8; room];
                    match c.stream.read(&mut buf) {
                        Ok(0) => {
                            c.host_eof = true;
                            out.push((
                                Hdr {
                                    op: OP_SHUTDOWN,
                                    flags: SHUTDOWN_BOTH,
                                    ..Hdr::default()
                                },
                                Vec::new(),
                            ));
                            break;
                        }
                        Ok(n) => {
                            buf.truncate(n);
                            c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                            out.push((
                                Hdr {
                                    op: OP_RW,
                                    len: n as u32,
                                    ..Hdr::default()
                                },
                                buf,
                            ));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(_) => {
                            c.host_eof = true;
                            break;
                        }
                    }
                }
            }
            for (partial, payload) in out {
                let conn = self.conns.get(&key);
                let mut h = self.hdr(key.0, key.1, partial.op, partial.len, conn);
                h.flags = partial.flags;
                self.push(h, &payload);
            }
        }
    }

    /// One packet from the guest.
    fn handle_tx(&mut self, hdr: Hdr, payload: &[u8]) {
        if hdr.dst_cid != HOST_CID || hdr.src_cid != self.cid || hdr.type_ != TYPE_STREAM {
            tracing::debug!(?hdr, "vsock packet not for the host; dropped");
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = hdr.buf_alloc;
            c.peer_fwd_cnt = hdr.fwd_cnt;
        }
        match hdr.op {
            OP_REQUEST => {
                let path = format!("{}_{}", self.uds_path.display(), hdr.dst_port);
                match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|_| s)) {
                    Ok(stream) => {
                        let conn = Conn {
                            stream,
                            state: ConnState::Established,
                            peer_buf_alloc: hdr.buf_alloc,
                            peer_fwd_cnt: hdr.fwd_cnt,
                            tx_cnt: 0,
                            fwd_cnt: 0,
                            fwd_reported: 0,
                            host_eof: false,
                        };
                        let h = self.hdr(key.0, key.1, OP_RESPONSE, 0, Some(&conn));
                        self.conns.insert(key, conn);
                        self.push(h, &[]);
                    }
                    Err(e) => {
                        tracing::debug!("vsock: no host listener at {path}: {e}");
                        self.reset(key.0, key.1);
                    }
                }
            }
            OP_RESPONSE => match self.conns.get_mut(&key) {
                Some(c) if c.state == ConnState::Connecting => {
                    c.state = ConnState::Established;
                    let msg = format!("OK {}\n", key.0);
                    if c.stream.write_all(msg.as_bytes()).is_err() {
                        self.reset(key.0, key.1);
                    }
                }
                _ => self.reset(key.0, key.1),
            },
            OP_RW => {
                let Some(c) = self.conns.get_mut(&key) else {
                    self.reset(key.0, key.1);
                    return;
                };
                // The stream is non-blocking; a host reader that stalls past the socket
                // buffer loses the connection rather than the vCPU.
                let written = write_fully(&mut c.stream, payload);
                c.fwd_cnt = c.fwd_cnt.wrapping_add(payload.len() as u32);
                let report = c.fwd_cnt.wrapping_sub(c.fwd_reported) >= BUF_ALLOC / 4;
                if !written {
                    self.reset(key.0, key.1);
                } else if report {
                    c.fwd_reported = c.fwd_cnt;
                    let h = self.hdr(key.0, key.1, OP_CREDIT_UPDATE, 0, self.conns.get(&key));
                    self.push(h, &[]);
                }
            }
            OP_CREDIT_REQUEST => {
                if let Some(c) = self.conns.get_mut(&key) {
                    c.fwd_reported = c.fwd_cnt;
                }
                let h = self.hdr(key.0, key.1, OP_CREDIT_UPDATE, 0, self.conns.get(&key));
                self.push(h, &[]);
            }
            OP_CREDIT_UPDATE => {}
            OP_SHUTDOWN => {
                if hdr.flags & SHUTDOWN_BOTH == SHUTDOWN_BOTH {
                    self.reset(key.0, key.1);
                } else if let Some(c) = self.conns.get(&key) {
                    let how = if hdr.flags & 2 != 0 {
                        std::net::Shutdown::Write
                    } else {
                        std::net::Shutdown::Read
                    };
                    let _ = c.stream.shutdown(how);
                }
            }
            OP_RST => {
                self.conns.remove(&key);
            }
            _ => self.reset(key.0, key.1),
        }
    }
}

fn write_fully(stream: &mut UnixStream, mut data: &[u8]) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
    while !data.is_empty() {
        match stream.write(data) {
            Ok(0) => return false,
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if std::time::Instant::now() > deadline {
                    return false;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(_) => return false,
        }
    }
    true
}

/// vsock's host side for its I/O thread: accepts host connections and reads host data
/// into packets for the receive queue.
#[derive(Debug)]
pub struct VsockInput {
    backend: Arc<Mutex<Backend>>,
}

impl crate::transport::HostInput for VsockInput {
    fn fds(&mut self, out: &mut Vec<RawFd>) {
        self.backend
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .poll_fds(out);
    }

    fn ready(&mut self, _revents: &[i16]) -> Option<usize> {
        let mut b = self.backend.lock().unwrap_or_else(|p| p.into_inner());
        b.poll_host();
        b.has_rx().then_some(RX_QUEUE)
    }
}

pub struct Vsock {
    config: [u8; 8],
    backend: Arc<Mutex<Backend>>,
    /// A restore must tell the driver its connections are gone (Firecracker does the
    /// same): an event waits for the driver's next event buffer.
    reset_pending: bool,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock").finish_non_exhaustive()
    }
}

impl Vsock {
    /// Listen on `uds_path` (replacing a stale socket file) for guest CID `cid`. Anything
    /// there that is not a socket is left alone and the bind fails: the path may come
    /// from an API client, and must never delete a file.
    pub fn new(cid: u64, uds_path: &Path) -> Result<Vsock, VsockError> {
        use std::os::unix::fs::FileTypeExt;
        if std::fs::symlink_metadata(uds_path).is_ok_and(|m| m.file_type().is_socket())
            && std::os::unix::net::UnixStream::connect(uds_path).is_err()
        {
            let _ = std::fs::remove_file(uds_path);
        }
        let listener = UnixListener::bind(uds_path)
            .and_then(|l| l.set_nonblocking(true).map(|_| l))
            .map_err(|source| VsockError::Bind {
                path: uds_path.to_path_buf(),
                source,
            })?;
        Ok(Self::with_listener(cid, uds_path, listener))
    }

    /// The listening socket another VMM bound at `uds_path` (a migration's source on
    /// this host, [`crate::HostHandle::VsockListener`]): host programs that connect
    /// during the move wait in its backlog. Refused unless it is a Unix socket that
    /// listens at that path (the source is not trusted).
    pub fn from_listener_fd(
        cid: u64,
        uds_path: &Path,
        fd: std::os::fd::OwnedFd,
    ) -> Result<Vsock, VsockError> {
        let not = |why: String| VsockError::NotThisListener {
            path: uds_path.to_path_buf(),
            why,
        };
        let mut on: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: SO_ACCEPTCONN writes one int into `on`, whose size `len` gives.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ACCEPTCONN,
                (&mut on as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r < 0 || on == 0 {
            return Err(not("not a listening socket".into()));
        }
        let listener = UnixListener::from(fd);
        let at = listener
            .local_addr()
            .map_err(|e| not(e.to_string()))?
            .as_pathname()
            .map(Path::to_path_buf);
        if at.as_deref() != Some(uds_path) {
            return Err(not(format!("it listens at {at:?}")));
        }
        listener
            .set_nonblocking(true)
            .map_err(|e| not(e.to_string()))?;
        Ok(Self::with_listener(cid, uds_path, listener))
    }

    fn with_listener(cid: u64, uds_path: &Path, listener: UnixListener) -> Vsock {
        Vsock {
            reset_pending: false,
            config: cid.to_le_bytes(),
            backend: Arc::new(Mutex::new(Backend {
                cid,
                uds_path: uds_path.to_path_buf(),
                listener,
                pending: Vec::new(),
                conns: HashMap::new(),
                rx: VecDeque::new(),
                next_port: FIRST_LOCAL_PORT,
            })),
        }
    }

    /// The host sockets, as the device's I/O thread waits for them.
    pub fn host_input(&self) -> VsockInput {
        VsockInput {
            backend: self.backend.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Backend> {
        self.backend.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 256, 64]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn host_handles(&self) -> std::io::Result<Option<crate::HostHandle>> {
        use std::os::fd::AsFd;
        let b = self.lock();
        Ok(Some(crate::HostHandle::VsockListener {
            path: b.uds_path.clone(),
            fd: b.listener.as_fd().try_clone_to_owned()?,
        }))
    }

    fn reset(&mut self) {
        self.reset_pending = false;
    }

    fn restored(&mut self) -> Vec<usize> {
        // The host ends of the guest's connections stayed with the VMM it left.
        self.reset_pending = true;
        vec![EVENT_QUEUE]
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceError> {
        let mut outcome = QueueOutcome::default();
        let size = queue.size();
        match index {
            TX_QUEUE => {
                while let Some(chain) = queue.pop_descriptor_chain(mem) {
                    let chain = Chain::collect(chain, size, mem)?;
                    let pkt = gather(mem, &chain.readable, (HDR_LEN + MAX_PKT) as u64)?;
                    let hdr = Hdr::parse(&pkt).ok_or(DeviceError::BadRequest(
                        "vsock packet shorter than its header",
                    ))?;
                    let payload = pkt.get(HDR_LEN..HDR_LEN + hdr.len as usize).unwrap_or(&[]);
                    self.lock().handle_tx(hdr, payload);
                    queue
                        .add_used(mem, chain.head, 0)
                        .map_err(|_| DeviceError::BadRequest("cannot add to the used ring"))?;
                    outcome.used = true;
                }
                if self.lock().has_rx() {
                    outcome.also_process = Some(RX_QUEUE);
                }
            }
            RX_QUEUE => {
                let mut b = self.lock();
                while let Some(pkt) = b.rx.front() {
                    let Some(chain) = queue.pop_descriptor_chain(mem) else {
                        break;
                    };
                    let chain = Chain::collect(chain, size, mem)?;
                    let room: usize = chain.writable.iter().map(|d| d.len() as usize).sum();
                    let len = if pkt.len() <= room {
                        scatter(mem, &chain.writable, pkt)?;
                        pkt.len() as u32
                    } else {
                        // A guest buffer smaller than one packet: the packet is lost.
                        tracing::debug!(room, len = pkt.len(), "vsock rx buffer too small");
                        0
                    };
                    b.rx.pop_front();
                    queue
                        .add_used(mem, chain.head, len)
                        .map_err(|_| DeviceError::BadRequest("cannot add to the used ring"))?;
                    outcome.used = true;
                }
            }
            EVENT_QUEUE if self.reset_pending => {
                // Without a buffer it waits for the driver's next notify of this queue.
                if let Some(chain) = queue.pop_descriptor_chain(mem) {
                    let chain = Chain::collect(chain, size, mem)?;
                    let event = EVENT_TRANSPORT_RESET.to_le_bytes();
                    let room: u64 = chain.writable.iter().map(|d| u64::from(d.len())).sum();
                    let len = if room >= event.len() as u64 {
                        scatter(mem, &chain.writable, &event)?;
                        event.len() as u32
                    } else {
                        0
                    };
                    queue
                        .add_used(mem, chain.head, len)
                        .map_err(|_| DeviceError::BadRequest("cannot add to the used ring"))?;
                    self.reset_pending = false;
                    outcome.used = true;
                    tracing::info!("vsock: transport reset sent to the driver");
                }
            }
            _ => {}
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = Hdr {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 5678,
            len: 9,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 77,
        };
        assert_eq!(Hdr::parse(&h.bytes()), Some(h));
        assert_eq!(Hdr::parse(&[0u8; 10]), None);
    }

    #[test]
    fn a_stream_the_guest_has_no_credit_for_is_not_waited_on() {
        // The I/O thread polls without a timeout: a readable stream it may not read
        // from would wake it again and again.
        let dir = std::env::temp_dir().join(format!("vessel-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let dev = Vsock::new(3, &path).unwrap();
        let mut host = UnixStream::connect(&path).unwrap();
        host.write_all(b"CONNECT 1234\n").unwrap();
        let mut b = dev.lock();
        b.poll_host();
        let fds = |b: &Backend| {
            let mut v = Vec::new();
            b.poll_fds(&mut v);
            v.len()
        };
        assert_eq!(
            fds(&b),
            1,
            "only the listener while the guest has not answered"
        );
        let answer = |op, buf_alloc| Hdr {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1234,
            dst_port: FIRST_LOCAL_PORT,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc,
            fwd_cnt: 0,
        };
        b.handle_tx(answer(OP_RESPONSE, 0), &[]);
        host.write_all(b"data the guest has no room for").unwrap();
        assert_eq!(fds(&b), 1, "no credit: the stream is left alone");
        b.handle_tx(answer(OP_CREDIT_UPDATE, 4096), &[]);
        assert_eq!(fds(&b), 2, "credit: the stream is waited on");
        drop(b);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Issue 22: a `uds_path` naming an existing file fails and leaves the file alone
    /// (it used to be deleted); a stale socket is replaced.
    #[test]
    fn a_uds_path_on_a_file_never_deletes_it() {
        let dir = std::env::temp_dir().join(format!("vsock-uds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("v.sock");
        std::fs::write(&p, "precious").unwrap();
        assert!(Vsock::new(3, &p).is_err());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "precious");
        std::fs::remove_file(&p).unwrap();
        drop(UnixListener::bind(&p).unwrap());
        let v = Vsock::new(3, &p).unwrap();
        drop(v);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A handed-over descriptor is taken only when it is a socket listening at the
    /// device's path (a TAP's, only when it is that TAP); a restored device asks for its
    /// event queue to be run (the transport reset; `snapshot.rs` sees the guest get it).
    #[test]
    fn handed_over_descriptors_are_checked() {
        let dir = std::env::temp_dir().join(format!("vsock-hand-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (p, q) = (dir.join("a.sock"), dir.join("b.sock"));
        let l = UnixListener::bind(&p).unwrap();
        let fd = || std::os::fd::OwnedFd::from(l.try_clone().unwrap());
        let null = || std::os::fd::OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        assert!(Vsock::from_listener_fd(3, &q, fd()).is_err());
        assert!(Vsock::from_listener_fd(3, &p, null()).is_err());
        assert!(crate::tap::Tap::from_fd("vtap0", null()).is_err());
        let mut v = Vsock::from_listener_fd(3, &p, fd()).unwrap();
        assert_eq!(v.restored(), vec![EVENT_QUEUE]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
