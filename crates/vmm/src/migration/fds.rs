//! Descriptors passed along a Unix-socket migration stream (SCM_RIGHTS): the TAP
//! queues and vsock listeners a destination on the same host takes over as they are.
//! The source attaches them to the bytes of its HANDLES record; the destination reads
//! every byte of a Unix stream with `recvmsg`, so descriptors that come along are kept
//! whichever read meets them, and the record then claims them.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// The most descriptors one migration passes (a TAP has at most 16 queues here; a VM
/// a handful of TAPs and one vsock device).
pub const MAX_FDS: usize = 64;

/// Room for a control message holding `n` descriptors.
fn space(n: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE((n * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// Writes all of `data`, the first byte carrying `fds`.
pub fn send(sock: &UnixStream, data: &[u8], fds: &[OwnedFd]) -> std::io::Result<()> {
    use std::io::Write;
    if fds.is_empty() {
        return (&*sock).write_all(data);
    }
    if fds.len() > MAX_FDS || data.is_empty() {
        return Err(std::io::Error::other("too many descriptors to pass"));
    }
    let mut control = vec![0u8; space(fds.len())];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is valid; its pointers are set just below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() as _;
    // SAFETY: `msg` points at `control`, which has room for one SCM_RIGHTS message of
    // `fds.len()` descriptors (CMSG_SPACE above); CMSG_FIRSTHDR/CMSG_DATA stay in it.
    let sent = unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN((fds.len() * std::mem::size_of::<RawFd>()) as u32) as _;
        let out = libc::CMSG_DATA(c).cast::<RawFd>();
        for (i, fd) in fds.iter().enumerate() {
            out.add(i).write_unaligned(fd.as_raw_fd());
        }
        libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The descriptors went with the first byte; the rest is plain data.
    (&*sock).write_all(data.get(sent as usize..).unwrap_or_default())
}

/// Reads into `buf` as `read` does, keeping descriptors that come along in `got`
/// (beyond [`MAX_FDS`] in all, the kernel closes them and they are not kept).
pub fn recv(sock: &UnixStream, buf: &mut [u8], got: &mut Vec<OwnedFd>) -> std::io::Result<usize> {
    let mut control = vec![0u8; space(MAX_FDS)];
    let mut iov = [IoSliceMut::new(buf)];
    // SAFETY: an all-zero msghdr is valid; its pointers are set just below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr().cast();
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() as _;
    // SAFETY: `msg` describes `buf` and `control`, both alive and writable for the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel filled `control` up to msg_controllen; CMSG_FIRSTHDR/NXTHDR
    // walk only within it, and each SCM_RIGHTS message holds cmsg_len's worth of
    // descriptors, which are now this process's to own.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    let fd = OwnedFd::from_raw_fd(data.add(i).read_unaligned());
                    if got.len() < MAX_FDS {
                        got.push(fd);
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn descriptors_come_with_their_bytes_through_reads_of_any_size() {
        let (a, b) = UnixStream::pair().unwrap();
        let (p, q) = UnixStream::pair().unwrap();
        send(&a, b"before", &[]).unwrap();
        send(&a, b"with", &[OwnedFd::from(p)]).unwrap();
        drop(a);
        let mut got = Vec::new();
        let mut all = Vec::new();
        let mut buf = [0u8; 3];
        loop {
            let n = recv(&b, &mut buf, &mut got).unwrap();
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
        }
        assert_eq!(all, b"beforewith");
        assert_eq!(got.len(), 1);
        // The descriptor is the other end of `q`'s pair.
        let mut p = UnixStream::from(got.pop().unwrap());
        use std::io::Write;
        p.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        (&q).read_exact(&mut one).unwrap();
        assert_eq!(&one, b"x");
    }
}
