//! Executable memory for compiled blocks: one per CPU, filled front to back and emptied as
//! a whole when full (every compiled block is dropped then).
//!
//! Never writable and executable at once (W^X): the memory is a memfd mapped twice, once
//! read-write (where the compiler places code and patches links) and once read-execute
//! (where it runs). A guest that finds a way to make the host write somewhere it chooses
//! still cannot write code at an address the host executes.

/// A memfd mapped read-write and read-execute.
pub(crate) struct Arena {
    /// The executable view: code runs here, and every address handed out is in it.
    base: *mut u8,
    /// The writable view of the same bytes.
    rw: *mut u8,
    len: usize,
    used: usize,
    /// Bytes kept across `reset` (code every block uses).
    pinned: usize,
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
    pub(crate) fn new(len: usize) -> Option<Self> {
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
                pinned: 0,
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

    /// The writable view of the 8 bytes at `at` (an address in the executable view), if
    /// they lie in the arena.
    fn writable_u64(&self, at: u64) -> Option<*mut u64> {
        let off = at.checked_sub(self.base as u64)? as usize;
        if off.checked_add(8)? > self.len {
            return None;
        }
        // SAFETY: off + 8 <= len: inside the writable mapping.
        Some(unsafe { self.rw.add(off) }.cast())
    }

    /// Writes the 8 bytes at `at` (a link slot in placed code), through the writable view;
    /// ignored outside the arena.
    pub(crate) fn write_u64(&mut self, at: u64, v: u64) {
        if let Some(p) = self.writable_u64(at) {
            // SAFETY: `p` lies in the writable mapping (see `writable_u64`); the code
            // there is not running (one thread per CPU, and it is compiling now).
            unsafe { p.write_unaligned(v) };
        }
    }

    /// Reads the 8 bytes at `at` in the arena (0 outside it).
    pub(crate) fn read_u64(&self, at: u64) -> u64 {
        match self.writable_u64(at) {
            // SAFETY: as in `write_u64`.
            Some(p) => unsafe { p.read_unaligned() },
            None => 0,
        }
    }

    /// Where the next `put` places its code.
    pub(crate) fn next(&self) -> u64 {
        (self.base as u64 + self.used as u64 + 15) & !15
    }

    /// Copies `code` in at `next()` and returns where it starts; None when the arena is
    /// full.
    pub(crate) fn put(&mut self, code: &[u8]) -> Option<*mut u8> {
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
    pub(crate) fn room(&self) -> usize {
        self.len - self.used
    }

    /// Keeps what was placed so far across `reset`.
    pub(crate) fn pin(&mut self) {
        self.pinned = self.used;
    }

    /// Forgets everything placed since `pin`; the caller drops every pointer `put`
    /// returned for it.
    pub(crate) fn reset(&mut self) {
        self.used = self.pinned;
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

/// A memfd for code (executable, where the kernel asks that it be said).
fn memfd() -> Option<libc::c_int> {
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
        // A patch through the writable view is what runs next.
        a.write_u64(at, u64::from_le_bytes([0xb8, 7, 0, 0, 0, 0xc3, 0, 0]));
        assert_eq!(a.read_u64(at) & 0xff, 0xb8);
        assert_eq!(f(), 7);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        assert!(
            !maps
                .lines()
                .any(|l| l.split(' ').nth(1).is_some_and(|p| p.starts_with("rwx"))),
            "a writable and executable mapping:\n{maps}"
        );
    }
}
