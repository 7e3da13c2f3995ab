//! Executable memory for compiled blocks: one mapping per CPU, filled front to back and
//! emptied as a whole when full (every compiled block is dropped then).

/// An anonymous read-write-execute mapping.
pub(crate) struct Arena {
    base: *mut u8,
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
    /// None when the host refuses an executable mapping (the CPU then only interprets).
    pub(crate) fn new(len: usize) -> Option<Self> {
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            tracing::debug!("no executable mapping for compiled blocks; interpreting only");
            return None;
        }
        Some(Arena {
            base: base.cast(),
            len,
            used: 0,
            pinned: 0,
        })
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
        // SAFETY: start..end lies inside the mapping, which nothing else references (code
        // placed earlier lies below `start`).
        unsafe {
            let dst = self.base.add(start);
            std::ptr::copy_nonoverlapping(code.as_ptr(), dst, code.len());
            self.used = end;
            Some(dst)
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
        // SAFETY: unmaps exactly the mapping `new` made; no compiled code outlives the CPU
        // that owns this arena.
        unsafe {
            libc::munmap(self.base.cast(), self.len);
        }
    }
}
