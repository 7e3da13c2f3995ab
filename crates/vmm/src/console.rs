//! The serial console on the VMM's terminal: raw mode, input pumping, and the escape key
//! (Ctrl-A x quits, Ctrl-A Ctrl-A sends a literal Ctrl-A), as QEMU's `-serial stdio` does.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::serial::SerialDevice;
use devices::{ExitReason, ExitSignal};

pub const ESCAPE: u8 = 0x01;

/// Puts a terminal in raw mode for as long as it lives.
pub struct RawTerminal {
    fd: i32,
    saved: libc::termios,
}

impl RawTerminal {
    /// Raw mode on `fd` if it is a terminal; None otherwise.
    pub fn enter(fd: i32) -> Option<Self> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it or fails.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a terminal and `saved` is a valid termios to fill.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the struct we own.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: fd is a terminal and `raw` a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read from the same descriptor.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// What the escape-key state machine makes of one input byte.
#[derive(Debug, PartialEq, Eq)]
enum Key {
    Forward(u8),
    Quit,
    Nothing,
}

#[derive(Default)]
struct EscapeState {
    pending: bool,
}

impl EscapeState {
    fn feed(&mut self, b: u8) -> Key {
        if self.pending {
            self.pending = false;
            return match b {
                b'x' | b'X' => Key::Quit,
                ESCAPE => Key::Forward(ESCAPE),
                _ => Key::Nothing,
            };
        }
        if b == ESCAPE {
            self.pending = true;
            Key::Nothing
        } else {
            Key::Forward(b)
        }
    }
}

/// Pump stdin into the UART until EOF or the VM stops. With `interactive`, the escape key
/// is honoured (a terminal user); otherwise bytes pass through untouched (a pipe).
pub fn spawn_stdin_pump(
    serial: Arc<Mutex<SerialDevice>>,
    exit: Arc<ExitSignal>,
    interactive: bool,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            sandbox::enter(sandbox::Role::Console);
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 256];
            let mut esc = EscapeState::default();
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut out = Vec::with_capacity(n);
                for &b in &buf[..n] {
                    if !interactive {
                        out.push(b);
                        continue;
                    }
                    match esc.feed(b) {
                        Key::Forward(b) => out.push(b),
                        Key::Quit => {
                            exit.request(ExitReason::Quit);
                            return;
                        }
                        Key::Nothing => {}
                    }
                }
                let mut sent = 0;
                while sent < out.len() {
                    if exit.get().is_some() {
                        return;
                    }
                    let n = serial
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .enqueue_input(&out[sent..]);
                    sent += n;
                    if n == 0 {
                        // The guest has not drained the FIFO yet.
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences() {
        let mut e = EscapeState::default();
        assert_eq!(e.feed(b'a'), Key::Forward(b'a'));
        assert_eq!(e.feed(ESCAPE), Key::Nothing);
        assert_eq!(e.feed(ESCAPE), Key::Forward(ESCAPE));
        assert_eq!(e.feed(ESCAPE), Key::Nothing);
        assert_eq!(e.feed(b'q'), Key::Nothing);
        assert_eq!(e.feed(b'x'), Key::Forward(b'x'));
        assert_eq!(e.feed(ESCAPE), Key::Nothing);
        assert_eq!(e.feed(b'x'), Key::Quit);
    }
}

/// Serial output within a bytes bucket (Firecracker's `/serial` `rate_limiter`): what the
/// guest writes beyond it is dropped, as Firecracker drops it, and counted.
pub struct RateLimitedOutput {
    inner: Box<dyn std::io::Write + Send>,
    limiter: virtio::rate_limiter::RateLimiter,
    /// Bytes dropped so far.
    pub dropped: u64,
}

impl RateLimitedOutput {
    pub fn new(
        inner: Box<dyn std::io::Write + Send>,
        bucket: virtio::rate_limiter::TokenBucket,
    ) -> Self {
        RateLimitedOutput {
            inner,
            limiter: virtio::rate_limiter::RateLimiter::new(Some(bucket), None),
            dropped: 0,
        }
    }
}

impl std::io::Write for RateLimitedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.limiter.consume(0, buf.len() as u64).is_err() {
            self.dropped += buf.len() as u64;
            if self.dropped == buf.len() as u64 {
                tracing::info!("serial output over its rate limit: dropping bytes");
            }
            return Ok(buf.len());
        }
        self.inner.write_all(buf).map(|()| buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod rate_tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_output_over_its_bucket_is_dropped() {
        let sink = Sink::default();
        let bucket = virtio::rate_limiter::TokenBucket::new(10, 0, 60_000).unwrap();
        let mut out = RateLimitedOutput::new(Box::new(sink.clone()), bucket);
        for _ in 0..5 {
            assert_eq!(
                out.write(b"abcd").unwrap(),
                4,
                "the guest's write always completes"
            );
        }
        // 10 bytes a minute: two writes pass (8 bytes), the 2 left are too few for the
        // next; the other three writes are dropped.
        let got = sink.0.lock().unwrap().len();
        assert_eq!(got, 8);
        assert_eq!(out.dropped, 12);
    }
}
