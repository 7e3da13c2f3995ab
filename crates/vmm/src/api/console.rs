//! `vessel run --console-sock PATH`: the VMM's stdio console served on a Unix socket, so a
//! manager can attach to it (and re-attach after its own restart) without a pipe that
//! would tie the VMM's life to the manager's.
//!
//! The process's stdin and stdout become one end of a socket pair; a relay thread copies
//! what the guest writes to a log file and to the attached client (one at a time: a new
//! client replaces the old one), and what the client types back into the pair.

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

type Client = Arc<Mutex<Option<UnixStream>>>;

/// The relay's handle: [`ConsoleRelay::flush`] before the process exits, so the guest's
/// last words reach the log and the client.
#[derive(Debug)]
pub struct ConsoleRelay {
    outer: UnixStream,
    /// Held while bytes are read from the pair and passed on.
    pump: Arc<Mutex<()>>,
}

impl ConsoleRelay {
    /// Waits (at most 2 s) until everything written to the console so far has been
    /// relayed.
    pub fn flush(&self) {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < std::time::Duration::from_secs(2) {
            {
                let _g = self.pump.lock().unwrap_or_else(|p| p.into_inner());
                let mut pending: libc::c_int = 0;
                // SAFETY: FIONREAD writes one int through the valid pointer we pass.
                let r =
                    unsafe { libc::ioctl(self.outer.as_raw_fd(), libc::FIONREAD, &mut pending) };
                if r != 0 || pending == 0 {
                    return;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

/// Redirects stdin/stdout to a socket pair and serves it on `sock`, logging output to `log`.
/// Call before the VM starts, with the serial console on stdio.
pub fn serve_stdio(sock: &Path, log: Option<PathBuf>) -> io::Result<ConsoleRelay> {
    let listener = super::http::bind(sock)?;
    let (inner, outer) = UnixStream::pair()?;
    for fd in [0, 1] {
        // SAFETY: dup2 onto the process's own stdin/stdout with a descriptor we own; no
        // memory is involved and both descriptors stay valid.
        if unsafe { libc::dup2(inner.as_raw_fd(), fd) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    drop(inner);
    let client: Client = Arc::new(Mutex::new(None));

    // Guest output: to the log and the attached client.
    let mut from_guest = outer.try_clone()?;
    let out_client = client.clone();
    let pump = Arc::new(Mutex::new(()));
    let relay = ConsoleRelay {
        outer: outer.try_clone()?,
        pump: pump.clone(),
    };
    let mut log = match log {
        Some(p) => Some(OpenOptions::new().create(true).append(true).open(p)?),
        None => None,
    };
    std::thread::Builder::new()
        .name("console-out".into())
        .spawn(move || {
            sandbox::enter(sandbox::Role::Console);
            let mut buf = [0u8; 4096];
            loop {
                // Wait for bytes without holding the lock, then read and pass them on
                // under it, so `flush` sees either pending bytes or finished work.
                let mut pfd = libc::pollfd {
                    fd: from_guest.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: poll on one valid pollfd we own, for the length we pass.
                if unsafe { libc::poll(&mut pfd, 1, -1) } < 0 {
                    if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return;
                }
                let _g = pump.lock().unwrap_or_else(|p| p.into_inner());
                let n = match from_guest.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if let Some(l) = log.as_mut() {
                    let _ = l.write_all(&buf[..n]);
                }
                let mut c = out_client.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(s) = c.as_mut() {
                    if s.write_all(&buf[..n]).is_err() {
                        *c = None;
                    }
                }
            }
        })?;

    // Clients: each one's input goes to the guest until it leaves or another arrives.
    std::thread::Builder::new()
        .name("console-accept".into())
        .spawn(move || {
            // Its per-client threads inherit this filter.
            sandbox::enter(sandbox::Role::Console);
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (Ok(reader), Ok(mut to_guest)) = (conn.try_clone(), outer.try_clone()) else {
                    continue;
                };
                let old = client
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .replace(conn);
                if let Some(o) = old {
                    let _ = o.shutdown(std::net::Shutdown::Both);
                }
                let confined = sandbox::inherited();
                let _ = std::thread::Builder::new()
                    .name("console-in".into())
                    .spawn(move || {
                        sandbox::inherit(confined);
                        let mut reader = reader;
                        let _ = io::copy(&mut reader, &mut to_guest);
                    });
            }
        })?;
    Ok(relay)
}
