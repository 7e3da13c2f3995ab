//! One connection to a domain's console, shared by every viewer.
//!
//! A VMM's console socket serves one client at a time (a new one replaces the old), so
//! the daemon holds that one connection and fans the guest's output out to all viewers —
//! browser terminals and `vessel console` alike. One viewer at a time is the writer: what
//! the others type is dropped. A new viewer first gets the recent output (a backlog
//! seeded from the serial log), so its screen is not blank. The connection closes when
//! the last viewer leaves or the guest's side ends.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::error::{Error, Result};

/// Recent output a new viewer is shown first.
pub const BACKLOG: usize = 64 * 1024;
/// Chunks queued for one viewer before it counts as stuck and is dropped.
const QUEUE: usize = 1024;

/// What a viewer receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// Guest output.
    Output(Arc<[u8]>),
    /// This viewer became (true) or stopped being (false) the writer.
    Writer(bool),
}

/// A wakeup for a viewer that waits on file descriptors (the WebSocket loop polls it).
pub trait Wake: Send + Sync {
    fn wake(&self);
}

struct Viewer {
    id: u64,
    tx: SyncSender<Msg>,
    wake: Option<Arc<dyn Wake>>,
    wants_write: bool,
}

struct State {
    viewers: Vec<Viewer>,
    writer: Option<u64>,
    backlog: VecDeque<u8>,
    next_id: u64,
    closed: bool,
}

/// One domain's shared console connection.
pub struct Hub {
    name: String,
    to_guest: Mutex<UnixStream>,
    state: Mutex<State>,
    hubs: Weak<Hubs>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Viewer {
    /// Queues `m`; false when the viewer is gone or too far behind.
    fn send(&self, m: Msg) -> bool {
        let ok = match self.tx.try_send(m) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                tracing::warn!(viewer = self.id, "console viewer too slow: disconnected");
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        };
        if let Some(w) = &self.wake {
            w.wake();
        }
        ok
    }
}

impl State {
    /// Gives the writer's seat to the oldest viewer that asked to write, if it is free.
    fn fill_writer(&mut self) {
        if self.writer.is_some() {
            return;
        }
        if let Some(v) = self.viewers.iter().find(|v| v.wants_write) {
            self.writer = Some(v.id);
            v.send(Msg::Writer(true));
        }
    }
}

/// An attached viewer: output arrives on `rx`; `keys` types and leaves (when dropped).
pub struct Attachment {
    pub id: u64,
    pub rx: Receiver<Msg>,
    pub keys: Keys,
}

/// A viewer's seat: typing, taking the writer's seat; dropping it leaves.
pub struct Keys {
    id: u64,
    hub: Arc<Hub>,
}

impl Keys {
    /// Sends keystrokes to the guest if this viewer is the writer; false if it is not.
    pub fn input(&self, data: &[u8]) -> Result<bool> {
        if lock(&self.hub.state).writer != Some(self.id) {
            return Ok(false);
        }
        lock(&self.hub.to_guest)
            .write_all(data)
            .map_err(|e| Error::io("writing to the console of", &self.hub.name, e))?;
        Ok(true)
    }

    /// Takes the writer's seat from whoever has it.
    pub fn take_over(&self) {
        let mut st = lock(&self.hub.state);
        if st.writer == Some(self.id) {
            return;
        }
        let Some(pos) = st.viewers.iter().position(|v| v.id == self.id) else {
            return;
        };
        if let Some(old) = st.writer.take() {
            if let Some(v) = st.viewers.iter().find(|v| v.id == old) {
                v.send(Msg::Writer(false));
            }
        }
        if let Some(v) = st.viewers.get_mut(pos) {
            v.wants_write = true;
            v.send(Msg::Writer(true));
        }
        st.writer = Some(self.id);
    }

    pub fn is_writer(&self) -> bool {
        lock(&self.hub.state).writer == Some(self.id)
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        let last = {
            let mut st = lock(&self.hub.state);
            st.viewers.retain(|v| v.id != self.id);
            if st.writer == Some(self.id) {
                st.writer = None;
                st.fill_writer();
            }
            if st.viewers.is_empty() {
                st.closed = true;
            }
            st.closed
        };
        if last {
            // The reader thread sees the end and removes the hub.
            let _ = lock(&self.hub.to_guest).shutdown(Shutdown::Both);
        }
    }
}

/// Every open hub, by domain.
#[derive(Default)]
pub struct Hubs {
    hubs: Mutex<HashMap<String, Arc<Hub>>>,
}

/// The last `BACKLOG` bytes of the serial log.
fn log_tail(log: &Path) -> VecDeque<u8> {
    let mut out = Vec::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        let len = f.metadata().map_or(0, |m| m.len());
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(BACKLOG as u64)));
        let _ = f.take(BACKLOG as u64).read_to_end(&mut out);
    }
    out.into()
}

impl Hubs {
    pub fn new() -> Arc<Self> {
        Arc::new(Hubs::default())
    }

    /// Attaches a viewer to domain `name`'s console at `sock`, connecting to it if no one
    /// is attached yet. `write`: it wants to type (it gets the seat if the seat is free,
    /// or at once with `take_over`).
    pub fn attach(
        self: &Arc<Self>,
        name: &str,
        sock: &Path,
        log: &Path,
        write: bool,
        take_over: bool,
        wake: Option<Arc<dyn Wake>>,
    ) -> Result<Attachment> {
        // The map stays locked until the viewer is in: a hub its last viewer is leaving
        // (marked closed) is never joined.
        let mut hubs = lock(&self.hubs);
        let hub = match hubs.get(name).filter(|h| !lock(&h.state).closed).cloned() {
            Some(h) => h,
            None => {
                let h = self.connect(name, sock, log)?;
                hubs.insert(name.to_string(), h.clone());
                h
            }
        };
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let id = {
            let mut st = lock(&hub.state);
            let id = st.next_id;
            st.next_id += 1;
            let backlog: Vec<u8> = st.backlog.iter().copied().collect();
            let v = Viewer {
                id,
                tx,
                wake,
                wants_write: write,
            };
            if !backlog.is_empty() {
                v.send(Msg::Output(backlog.into()));
            }
            st.viewers.push(v);
            id
        };
        drop(hubs);
        let a = Attachment {
            id,
            rx,
            keys: Keys { id, hub },
        };
        if take_over {
            a.keys.take_over();
        } else {
            lock(&a.keys.hub.state).fill_writer();
        }
        Ok(a)
    }

    fn connect(self: &Arc<Self>, name: &str, sock: &Path, log: &Path) -> Result<Arc<Hub>> {
        let backlog = log_tail(log);
        let conn = UnixStream::connect(sock)
            .map_err(|e| Error::io("connecting to the console", sock, e))?;
        let mut from_guest = conn
            .try_clone()
            .map_err(|e| Error::io("cloning the console connection", sock, e))?;
        let hub = Arc::new(Hub {
            name: name.to_string(),
            to_guest: Mutex::new(conn),
            state: Mutex::new(State {
                viewers: Vec::new(),
                writer: None,
                backlog,
                next_id: 1,
                closed: false,
            }),
            hubs: Arc::downgrade(self),
        });
        let h = hub.clone();
        std::thread::Builder::new()
            .name("console-hub".into())
            .spawn(move || {
                let mut buf = [0u8; 8192];
                loop {
                    let n = match from_guest.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let chunk: Arc<[u8]> = buf.get(..n).unwrap_or_default().into();
                    let mut st = lock(&h.state);
                    st.backlog.extend(chunk.iter());
                    let excess = st.backlog.len().saturating_sub(BACKLOG);
                    st.backlog.drain(..excess);
                    st.viewers.retain(|v| v.send(Msg::Output(chunk.clone())));
                    if let Some(w) = st.writer {
                        if !st.viewers.iter().any(|v| v.id == w) {
                            st.writer = None;
                            st.fill_writer();
                        }
                    }
                }
                h.close();
            })
            .map_err(|e| Error::io("starting the console thread for", name, e))?;
        Ok(hub)
    }
}

impl Hub {
    /// Ends every viewer (their receivers see the end) and forgets the hub.
    fn close(self: &Arc<Self>) {
        {
            let mut st = lock(&self.state);
            st.closed = true;
            for v in st.viewers.drain(..) {
                let wake = v.wake.clone();
                drop(v);
                if let Some(w) = wake {
                    w.wake();
                }
            }
            st.writer = None;
        }
        if let Some(hubs) = self.hubs.upgrade() {
            let mut map = lock(&hubs.hubs);
            if map.get(&self.name).is_some_and(|h| Arc::ptr_eq(h, self)) {
                map.remove(&self.name);
            }
        }
        tracing::debug!(domain = %self.name, "console hub closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::time::Duration;

    fn recv_text(a: &Attachment, want: &str) -> String {
        let mut seen = String::new();
        let t0 = std::time::Instant::now();
        while !seen.contains(want) {
            assert!(t0.elapsed() < Duration::from_secs(5), "saw only {seen:?}");
            if let Ok(Msg::Output(b)) = a.rx.recv_timeout(Duration::from_millis(100)) {
                seen.push_str(&String::from_utf8_lossy(&b));
            }
        }
        seen
    }

    #[test]
    fn viewers_share_output_and_one_writes() {
        let dir = std::env::temp_dir().join(format!("hub-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("c.sock");
        let log = dir.join("serial.log");
        std::fs::write(&log, b"earlier output\n").unwrap();
        let l = UnixListener::bind(&sock).unwrap();
        let hubs = Hubs::new();
        let a = hubs.attach("d", &sock, &log, true, false, None).unwrap();
        let (mut guest, _) = l.accept().unwrap();
        let b = hubs.attach("d", &sock, &log, true, false, None).unwrap();
        assert!(a.keys.is_writer() && !b.keys.is_writer());
        recv_text(&a, "earlier output");
        recv_text(&b, "earlier output");
        guest.write_all(b"hello both\n").unwrap();
        recv_text(&a, "hello both");
        recv_text(&b, "hello both");
        // Only the writer's keys reach the guest.
        assert!(!b.keys.input(b"from b\n").unwrap());
        assert!(a.keys.input(b"from a\n").unwrap());
        let mut got = [0u8; 7];
        guest.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"from a\n");
        // The writer leaves: the other viewer that asked to write gets the seat.
        drop(a);
        assert!(b.keys.is_writer());
        // The guest's side ends: the viewer sees the end.
        drop(guest);
        let t0 = std::time::Instant::now();
        loop {
            match b.rx.recv_timeout(Duration::from_millis(100)) {
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                _ => assert!(t0.elapsed() < Duration::from_secs(5)),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
