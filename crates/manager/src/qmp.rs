//! A small QMP client: connect to QEMU's monitor socket, negotiate capabilities, run
//! commands. Events that arrive between a command and its answer are kept for
//! [`Qmp::wait_event`] (a device unplug ends in one).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connecting to {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("i/o on the monitor socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("QEMU closed the monitor connection")]
    Closed,
    #[error("unexpected reply from QEMU: {0}")]
    Protocol(String),
    #[error("QEMU refused {command}: {desc}")]
    Command { command: String, desc: String },
}

/// A negotiated QMP connection.
#[derive(Debug)]
pub struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
    /// Events read while waiting for an answer, oldest first (at most [`KEPT_EVENTS`]).
    events: std::collections::VecDeque<Value>,
}

/// How many unclaimed events a connection keeps.
const KEPT_EVENTS: usize = 256;

impl Qmp {
    /// Connects and leaves capabilities negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let s = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let w = s.try_clone()?;
        let mut q = Qmp {
            r: BufReader::new(s),
            w,
            events: Default::default(),
        };
        let greeting = q.read_msg()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(greeting.to_string()));
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read_msg(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.r.by_ref().take(1 << 20).read_line(&mut line)?;
            if n == 0 {
                return Err(QmpError::Closed);
            }
            if line.trim().is_empty() {
                continue;
            }
            return serde_json::from_str(line.trim())
                .map_err(|_| QmpError::Protocol(line.trim().to_string()));
        }
    }

    /// Runs a command and returns its `return` value.
    pub fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        let line = Self::line(command, args);
        self.w.write_all(line.as_bytes())?;
        self.answer(command)
    }

    fn line(command: &str, args: Option<Value>) -> String {
        let mut msg = json!({ "execute": command });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        line
    }

    /// Gives QEMU a copy of the open file `fd` (`add-fd`, the descriptor passed with
    /// SCM_RIGHTS on the monitor socket); returns its fd set and the descriptor's number
    /// in QEMU, which QEMU can open as `/proc/self/fd/N` (the file itself, not a name).
    pub fn add_fd(&mut self, fd: std::os::fd::BorrowedFd<'_>) -> Result<(i64, i64), QmpError> {
        use std::os::fd::AsRawFd;
        let line = Self::line("add-fd", None);
        let mut iov = libc::iovec {
            iov_base: line.as_ptr() as *mut libc::c_void,
            iov_len: line.len(),
        };
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) };
        let mut control = vec![0u8; space as usize];
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len() as _;
        // SAFETY: `msg` points at `control`, which has room for one cmsg with an int
        // (CMSG_SPACE above), so CMSG_FIRSTHDR is non-null and CMSG_DATA is in bounds.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>(), fd.as_raw_fd());
        }
        // SAFETY: `msg`, `iov`, `line` and `control` outlive the call; the socket is ours.
        let n = unsafe { libc::sendmsg(self.w.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        if (n as usize) < line.len() {
            // The descriptor went with the first byte; the rest of the line follows.
            self.w.write_all(&line.as_bytes()[n as usize..])?;
        }
        let r = self.answer("add-fd")?;
        let num = |k: &str| r.get(k).and_then(Value::as_i64);
        match (num("fdset-id"), num("fd")) {
            (Some(set), Some(fd)) => Ok((set, fd)),
            _ => Err(QmpError::Protocol(r.to_string())),
        }
    }

    /// Reads until the answer to `command` (keeping events).
    fn answer(&mut self, command: &str) -> Result<Value, QmpError> {
        loop {
            let v = self.read_msg()?;
            if v.get("event").is_some() {
                tracing::debug!(event = %v, "QMP event");
                self.keep(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    desc: e
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown error")
                        .to_string(),
                });
            }
            return Err(QmpError::Protocol(v.to_string()));
        }
    }

    fn keep(&mut self, event: Value) {
        if self.events.len() == KEPT_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// Waits up to `limit` for the event `name` whose `data` satisfies `matches`, seen
    /// since this connection began; returns its data, or None at the limit.
    pub fn wait_event(
        &mut self,
        name: &str,
        matches: impl Fn(&Value) -> bool,
        limit: Duration,
    ) -> Result<Option<Value>, QmpError> {
        let is = |e: &Value| e["event"] == name && matches(&e["data"]);
        if let Some(i) = self.events.iter().position(is) {
            return Ok(self.events.remove(i).map(|e| e["data"].clone()));
        }
        let deadline = Instant::now() + limit;
        let old = self.r.get_ref().read_timeout()?;
        let found = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break None;
            }
            self.r.get_ref().set_read_timeout(Some(left))?;
            match self.read_msg() {
                Ok(e) if is(&e) => break Some(e["data"].clone()),
                Ok(e) if e.get("event").is_some() => self.keep(e),
                Ok(other) => {
                    return Err(QmpError::Protocol(other.to_string()));
                }
                Err(QmpError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break None
                }
                Err(e) => return Err(e),
            }
        };
        self.r.get_ref().set_read_timeout(old)?;
        Ok(found)
    }

    /// `query-status`'s `status` (running, paused, shutdown, …).
    pub fn status(&mut self) -> Result<String, QmpError> {
        let r = self.execute("query-status", None)?;
        r.get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| QmpError::Protocol(r.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake QEMU that answers a scripted conversation.
    #[test]
    fn negotiates_skips_events_and_reports_errors() {
        let dir = std::env::temp_dir().join(format!("vessel-qmp-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let sock = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&sock);
        let l = UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            let mut line = String::new();
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .unwrap();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("qmp_capabilities"));
            w.write_all(b"{\"return\": {}}\r\n").unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            w.write_all(b"{\"event\": \"STOP\"}\r\n{\"return\": {\"status\": \"paused\", \"running\": false}}\r\n").unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            w.write_all(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\r\n")
                .unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            w.write_all(b"not json\r\n").unwrap();
        });
        let mut q = Qmp::connect(&sock, Duration::from_secs(5)).unwrap();
        assert_eq!(q.status().unwrap(), "paused");
        // The STOP event that came before the answer was kept.
        let stop = q.wait_event("STOP", |_| true, Duration::from_millis(1));
        assert_eq!(stop.unwrap(), Some(Value::Null));
        let e = q.execute("cont", None).unwrap_err();
        assert!(e.to_string().contains("nope"));
        assert!(matches!(q.execute("x", None), Err(QmpError::Protocol(_))));
        t.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
