//! Dropping every capability of the calling thread (capabilities are per thread in
//! Linux; a thread starts with its creator's).

use std::io;

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The calling thread's permitted set is non-empty.
fn has_any() -> io::Result<bool> {
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two CapData (version 3) into `data`, which has room for them.
    if unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(data
        .iter()
        .any(|d| d.effective | d.permitted | d.inheritable != 0))
}

/// Empties the bounding and ambient sets of the calling thread (before a change of user,
/// which takes CAP_SETPCAP away). Nothing to do for a thread whose creator did it.
pub fn drop_bounding() -> io::Result<()> {
    if !has_any()? {
        return Ok(());
    }
    for cap in 0..64 {
        // SAFETY: integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            let e = io::Error::last_os_error();
            // EINVAL: past the last capability this kernel knows. EPERM: no
            // CAP_SETPCAP (an unprivileged user's thread); NoNewPrivs already keeps
            // an exec from gaining anything.
            if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EPERM)) {
                break;
            }
            return Err(e);
        }
    }
    // SAFETY: integer arguments only.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Empties the inheritable, permitted and effective sets of the calling thread. A thread
/// whose creator already dropped them has none, and makes no further calls (its creator's
/// seccomp filter does not allow them).
pub fn drop_all() -> io::Result<()> {
    if !has_any()? {
        return Ok(());
    }
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads the header and two CapData, both valid for the call.
    if unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
