//! The state file's container: a fixed header, then a JSON body (see docs/SNAPSHOT.md).
//!
//! ```text
//! offset  size  field
//!      0     8  magic "VESSELSN"
//!      8     4  format version, little-endian (FORMAT_VERSION)
//!     12     4  flags (0)
//!     16     8  body length in bytes, little-endian
//!     24     4  CRC-32 (IEEE 802.3) of the body, little-endian
//!     28     4  reserved (0)
//!     32     …  body: the `VmSnapshot` as UTF-8 JSON
//! ```
//! A file that is shorter than its header says, whose checksum does not match, or whose
//! version is not this one is refused before anything else is read from it.

use std::io::Write;
use std::path::Path;

/// The first 8 bytes of every state file.
pub const MAGIC: &[u8; 8] = b"VESSELSN";
/// The only version this build reads and writes. Bump it on any change to the body's
/// meaning; there are no conversions between versions yet.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes before the body.
pub const HEADER_LEN: usize = 32;
/// The largest body read (the memory is elsewhere; a body is tens of KiB).
const MAX_BODY: u64 = 64 << 20;

/// Why a state file was refused.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("reading {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not a Vessel snapshot state file (no VESSELSN header)")]
    NotASnapshot(std::path::PathBuf),
    #[error(
        "{path} is snapshot format version {found}; this Vessel reads version {supported} only"
    )]
    Version {
        path: std::path::PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{path} is truncated: its header promises {want} bytes of state, the file has {have}")]
    Truncated {
        path: std::path::PathBuf,
        want: u64,
        have: u64,
    },
    #[error("{path} is corrupt: the state's checksum does not match")]
    Checksum { path: std::path::PathBuf },
    #[error("{path} is corrupt: {why}")]
    Body {
        path: std::path::PathBuf,
        why: String,
    },
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xedb88320), as zlib computes it.
///
/// ```
/// assert_eq!(vmm::snapshot::format::crc32(b"123456789"), 0xcbf4_3926);
/// ```
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// The header and `body`, as one buffer.
pub fn encode(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32(body).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// The body of `file` (the whole file's bytes), checked.
pub fn decode<'a>(path: &Path, file: &'a [u8]) -> Result<&'a [u8], FormatError> {
    let le32 = |at: usize| -> Option<u32> {
        let b = file.get(at..at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if file.get(..MAGIC.len()) != Some(&MAGIC[..]) {
        // A file cut inside the magic is truncated, anything else is not ours.
        if file.len() < MAGIC.len() && MAGIC.starts_with(file) {
            return Err(FormatError::Truncated {
                path: path.into(),
                want: HEADER_LEN as u64,
                have: file.len() as u64,
            });
        }
        return Err(FormatError::NotASnapshot(path.into()));
    }
    let (Some(version), Some(len_bytes), Some(crc)) = (
        le32(8),
        file.get(16..24),
        le32(24).filter(|_| file.len() >= HEADER_LEN),
    ) else {
        return Err(FormatError::Truncated {
            path: path.into(),
            want: HEADER_LEN as u64,
            have: file.len() as u64,
        });
    };
    if version != FORMAT_VERSION {
        return Err(FormatError::Version {
            path: path.into(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(len_bytes);
    let len = u64::from_le_bytes(len);
    let have = (file.len() - HEADER_LEN) as u64;
    if len != have {
        return Err(FormatError::Truncated {
            path: path.into(),
            want: HEADER_LEN as u64 + len,
            have: file.len() as u64,
        });
    }
    let body = &file[HEADER_LEN..];
    if crc32(body) != crc {
        return Err(FormatError::Checksum { path: path.into() });
    }
    Ok(body)
}

/// Creates (or truncates) `path`, readable and writable by its owner only.
pub(crate) fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Reads and checks the state file at `path`; returns its body.
pub fn read(path: &Path) -> Result<Vec<u8>, FormatError> {
    let read_err = |source| FormatError::Read {
        path: path.into(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    if len > MAX_BODY + HEADER_LEN as u64 {
        return Err(FormatError::Body {
            path: path.into(),
            why: format!("{len} bytes is more than a state file holds"),
        });
    }
    let file = std::fs::read(path).map_err(read_err)?;
    decode(path, &file).map(<[u8]>::to_vec)
}

/// Writes `body` with its header to `path`, through a temporary file renamed into
/// place, so a reader never sees half a state file.
pub fn write(path: &Path, body: &[u8]) -> Result<(), FormatError> {
    let write_err = |source| FormatError::Write {
        path: path.into(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp_name);
    let result = (|| {
        // Owner-only: the state holds the guest's registers (keys in flight included).
        let mut f = private_file(&tmp)?;
        f.write_all(&encode(body))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_trip_and_every_refusal() {
        let p = Path::new("state");
        let file = encode(b"{\"x\":1}");
        assert_eq!(decode(p, &file).unwrap(), b"{\"x\":1}");
        // Truncated anywhere: inside the magic, the header, the body.
        for cut in [3, 8, 20, HEADER_LEN, file.len() - 1] {
            assert!(
                matches!(decode(p, &file[..cut]), Err(FormatError::Truncated { .. })),
                "cut at {cut}: {:?}",
                decode(p, &file[..cut])
            );
        }
        let mut other = file.clone();
        other[8] = 2;
        assert!(matches!(
            decode(p, &other),
            Err(FormatError::Version { found: 2, .. })
        ));
        let mut flipped = file.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(
            decode(p, &flipped),
            Err(FormatError::Checksum { .. })
        ));
        assert!(matches!(
            decode(p, b"ELF\x7f and more bytes than a header"),
            Err(FormatError::NotASnapshot(_))
        ));
        assert!(matches!(decode(p, b""), Err(FormatError::Truncated { .. })));
    }
}
