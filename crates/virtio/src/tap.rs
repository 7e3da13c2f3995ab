//! A host TAP device (`/dev/net/tun`, IFF_TAP) with virtio-net headers: the kernel
//! prefixes every frame with the same 12-byte `virtio_net_hdr_v1` the guest uses, so
//! frames and their offload metadata (partial checksums, GSO) pass between the TAP and
//! the guest's buffers untouched. Which offloads the kernel may put on frames it hands
//! us is set with [`Tap::set_offload`], from what the guest negotiated.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// The virtio 1.x net header length (with num_buffers).
pub const VNET_HDR_LEN: usize = 12;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
const IFF_DETACH_QUEUE: libc::c_short = 0x0400;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;

/// TUNSETOFFLOAD flags (linux/if_tun.h): what frames read from the TAP may carry.
pub mod offload {
    /// Partial checksums (VIRTIO_NET_HDR_F_NEEDS_CSUM); required by all the others.
    pub const CSUM: u32 = 0x01;
    pub const TSO4: u32 = 0x02;
    pub const TSO6: u32 = 0x04;
    pub const TSO_ECN: u32 = 0x08;
    pub const UFO: u32 = 0x10;
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("opening /dev/net/tun: {0}")]
    OpenTun(std::io::Error),
    #[error("TAP name {0:?} is empty or longer than 15 bytes")]
    BadName(String),
    #[error("TAP {0} is in use by another process (a TAP made without multi_queue takes one)")]
    Busy(String),
    #[error("creating or attaching TAP {name}: {source} (needs CAP_NET_ADMIN)")]
    SetIff {
        name: String,
        source: std::io::Error,
    },
    #[error("the descriptor handed over for TAP {name} is not that TAP: {why}")]
    NotThisTap { name: String, why: String },
    #[error("configuring TAP {name}: {op}: {source}")]
    Configure {
        name: String,
        op: &'static str,
        source: std::io::Error,
    },
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Create (or attach to an existing persistent) TAP device `name`, non-blocking.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        Self::open_with(name, 0)
    }

    /// `queues` queues of the multi-queue TAP device `name` (IFF_MULTI_QUEUE; created
    /// if missing, attached if it exists and is multi-queue), one descriptor each: the
    /// kernel spreads the flows it sends over them. One queue is [`Tap::open`].
    pub fn open_queues(name: &str, queues: usize) -> Result<Vec<Tap>, TapError> {
        if queues <= 1 {
            return Ok(vec![Self::open(name)?]);
        }
        (0..queues)
            .map(|_| Self::open_with(name, IFF_MULTI_QUEUE))
            .collect()
    }

    fn open_with(name: &str, extra: libc::c_short) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() > 15 {
            return Err(TapError::BadName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | extra,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is laid out as.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EBUSY) {
                return Err(TapError::Busy(name.to_string()));
            }
            return Err(TapError::SetIff {
                name: name.to_string(),
                source: e,
            });
        }
        let hdr = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) } < 0 {
            return Err(TapError::Configure {
                name: name.to_string(),
                op: "TUNSETVNETHDRSZ",
                source: std::io::Error::last_os_error(),
            });
        }
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        // No offloads until a guest driver negotiates some: until then the kernel must
        // hand us whole, checksummed frames.
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// A queue of TAP `name` that another VMM had open (a migration's source on this
    /// host, [`crate::HostHandle::Tap`]): the same open file, so its flags, offloads
    /// and queued frames come with it. Refused unless the descriptor is a TAP of that
    /// name with virtio-net headers (the source is not trusted).
    pub fn from_fd(name: &str, fd: std::os::fd::OwnedFd) -> Result<Tap, TapError> {
        let file = File::from(fd);
        let mut req = IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        let not = |why: String| TapError::NotThisTap {
            name: name.to_string(),
            why,
        };
        // SAFETY: TUNGETIFF writes an ifreq, which `req` is laid out as; on a descriptor
        // that is not a TUN/TAP the kernel refuses it without writing.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNGETIFF, &mut req) } < 0 {
            return Err(not(std::io::Error::last_os_error().to_string()));
        }
        let got = req.name.split(|&b| b == 0).next().unwrap_or_default();
        if got != name.as_bytes() {
            return Err(not(format!("it is {:?}", String::from_utf8_lossy(got))));
        }
        let want = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if req.flags & want != want {
            return Err(not(format!("its flags are {:#x}", req.flags)));
        }
        // SAFETY: F_GETFL on a descriptor this function owns.
        let fl = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        let set = if fl < 0 {
            fl
        } else {
            // SAFETY: F_SETFL with the flags just read, on the same descriptor.
            unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) }
        };
        if fl < 0 || set < 0 {
            return Err(TapError::Configure {
                name: name.to_string(),
                op: "O_NONBLOCK",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// Let the kernel hand us frames with these offloads ([`offload`] flags) — only
    /// those the guest accepted, since frames go to it as they are.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0
        {
            return Err(TapError::Configure {
                name: self.name.clone(),
                op: "TUNSETOFFLOAD",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Attaches or detaches this queue of a multi-queue TAP (TUNSETQUEUE): the kernel
    /// hands frames only to attached queues.
    pub fn set_queue_enabled(&self, enabled: bool) -> Result<(), TapError> {
        let mut req = IfReq {
            name: [0; 16],
            flags: if enabled {
                IFF_ATTACH_QUEUE
            } else {
                IFF_DETACH_QUEUE
            },
            _pad: [0; 22],
        };
        // SAFETY: TUNSETQUEUE reads an ifreq's flags, which `req` is laid out as.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETQUEUE, &mut req) } < 0 {
            return Err(TapError::Configure {
                name: self.name.clone(),
                op: "TUNSETQUEUE",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// A duplicate descriptor of the same TAP queue (for readiness polling).
    pub fn try_clone_fd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        self.file.as_fd().try_clone_to_owned()
    }

    /// Read one frame (with its vnet header); Ok(None) when none is waiting.
    pub fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        match self.file.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Send one frame (with its vnet header).
    pub fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.file.write_all(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
