//! Executable memory for generated host code (x86emu's host-instruction stubs, rv64emu's
//! compiled blocks): filled front to back and emptied as a whole when full.
//!
//! Never writable and executable at once (W^X): the memory is a memfd mapped twice, once
//! read-write (where code is placed) and once read-execute
//! (where it runs). A guest that finds a way to make the host write somewhere it chooses
//! still cannot write code at an address the host executes.

/// A memfd mapped read-write and read-execute.
pub struct Arena {
    /// The executable view: code runs here, and every address handed out is in it.
    base: *mut u8,
    /// The writable view of the same bytes.
    rw: *mut u8,
    len: usize,
    used: usize,
}

// SAFETY: the mapping is owned by one CPU, which is used by one thread at a time.
unsafe impl Send for Arena {}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("len", &self.len)
            .field("used", &self.used)
            .finish()
    }
}

impl Arena {
    /// None when the host refuses the mappings (the CPU then only interprets).
    pub fn new(len: usize) -> Option<Self> {
        let fd = memfd()?;
        let map = |prot| {
            // SAFETY: a fresh shared mapping of the memfd just sized; no existing memory
            // is touched.
            let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0) };
            (p != libc::MAP_FAILED).then_some(p)
        };
        // SAFETY: `fd` is the memfd just created.
        let sized = unsafe { libc::ftruncate(fd, len as libc::off_t) } == 0;
        let rw = if sized {
            map(libc::PROT_READ | libc::PROT_WRITE)
        } else {
            None
        };
        let rx = rw.and_then(|_| map(libc::PROT_READ | libc::PROT_EXEC));
        // SAFETY: the mappings keep the memory; the descriptor is no longer needed.
        unsafe { libc::close(fd) };
        match (rw, rx) {
            (Some(rw), Some(rx)) => Some(Arena {
                base: rx.cast(),
                rw: rw.cast(),
                len,
                used: 0,
            }),
            _ => {
                if let Some(rw) = rw {
                    // SAFETY: unmaps the mapping made just above, which nothing uses.
                    unsafe { libc::munmap(rw, len) };
                }
                tracing::debug!("no executable mapping for compiled blocks; interpreting only");
                None
            }
        }
    }

    /// Where the next `put` places its code.
    pub fn next(&self) -> u64 {
        (self.base as u64 + self.used as u64 + 15) & !15
    }

    /// Copies `code` in at `next()` and returns where it starts; None when the arena is
    /// full.
    pub fn put(&mut self, code: &[u8]) -> Option<*mut u8> {
        let start = (self.next() - self.base as u64) as usize;
        let end = start.checked_add(code.len())?;
        if end > self.len {
            return None;
        }
        // SAFETY: start..end lies inside both views, which nothing else references (code
        // placed earlier lies below `start`).
        unsafe {
            std::ptr::copy_nonoverlapping(code.as_ptr(), self.rw.add(start), code.len());
            self.used = end;
            Some(self.base.add(start))
        }
    }

    /// Bytes still free.
    pub fn room(&self) -> usize {
        self.len - self.used
    }

    /// Forgets everything placed; the caller drops every pointer `put` returned.
    pub fn reset(&mut self) {
        self.used = 0;
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mappings `new` made; no compiled code outlives the CPU
        // that owns this arena.
        unsafe {
            libc::munmap(self.base.cast(), self.len);
            libc::munmap(self.rw.cast(), self.len);
        }
    }
}

/// perf's map of generated code for this process (`/tmp/perf-PID.map`), kept when
/// `VESSEL_PERF_MAP` is set, so `perf report` names compiled blocks.
pub struct PerfMap(std::fs::File);

impl PerfMap {
    /// Opened for appending (every CPU of the process writes to it); None unless asked for.
    pub fn open() -> Option<Self> {
        std::env::var_os("VESSEL_PERF_MAP")?;
        let path = format!("/tmp/perf-{}.map", std::process::id());
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            Ok(f) => Some(PerfMap(f)),
            Err(e) => {
                tracing::warn!(path, error = %e, "cannot open the perf map");
                None
            }
        }
    }

    /// Names `len` bytes of code at `start`.
    pub fn name(&mut self, start: u64, len: usize, name: std::fmt::Arguments<'_>) {
        use std::io::Write;
        // One write per line: with O_APPEND, lines of several CPUs do not interleave.
        let line = format!("{start:x} {len:x} {name}\n");
        let _ = self.0.write_all(line.as_bytes());
    }
}

impl std::fmt::Debug for PerfMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PerfMap")
    }
}

/// A memfd for code (executable, where the kernel asks that it be said).
pub fn memfd() -> Option<libc::c_int> {
    const NAME: &std::ffi::CStr = c"vessel-jit";
    // MFD_EXEC (kernels with vm.memfd_noexec) is refused as unknown by older ones.
    for flags in [libc::MFD_CLOEXEC | 0x10, libc::MFD_CLOEXEC] {
        // SAFETY: NAME is a valid C string; the flags are plain bits.
        let fd = unsafe { libc::memfd_create(NAME.as_ptr(), flags) };
        if fd >= 0 {
            return Some(fd);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The permissions /proc/self/maps shows for the mapping holding `addr`.
    fn perms_at(addr: u64) -> Option<String> {
        let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
        maps.lines().find_map(|l| {
            let (range, rest) = l.split_once(' ')?;
            let (lo, hi) = range.split_once('-')?;
            let (lo, hi) = (
                u64::from_str_radix(lo, 16).ok()?,
                u64::from_str_radix(hi, 16).ok()?,
            );
            (lo..hi)
                .contains(&addr)
                .then(|| rest.split(' ').next().unwrap_or("").to_string())
        })
    }

    #[test]
    fn code_is_never_writable_where_it_runs() {
        let mut a = Arena::new(1 << 16).expect("memfd arena");
        // mov eax, 42; ret
        let at = a.put(&[0xb8, 42, 0, 0, 0, 0xc3]).expect("room") as u64;
        assert_eq!(perms_at(at).as_deref(), Some("r-xs"));
        assert_eq!(perms_at(a.rw as u64).as_deref(), Some("rw-s"));
        // SAFETY: `at` holds the complete function just placed.
        let f: extern "C" fn() -> u32 = unsafe { std::mem::transmute(at as *const u8) };
        assert_eq!(f(), 42);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        assert!(
            !maps
                .lines()
                .any(|l| l.split(' ').nth(1).is_some_and(|p| p.starts_with("rwx"))),
            "a writable and executable mapping:\n{maps}"
        );
    }
}
