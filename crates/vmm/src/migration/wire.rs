//! The migration stream: a header, the guest's RAM layout, pages in rounds, the VM's
//! state, and the destination's one answer. docs/MIGRATION.md describes it.
//!
//! ```text
//! header   "VESSELMG", u32 version (1), u32 0
//! LAYOUT   u8 1, u32 n, n × (u64 gpa, u64 len)
//! PAGES    u8 2, u64 gpa, u32 count, count × 4096 bytes
//! ZERO     u8 3, u64 gpa, u32 count                 (pages that are all zero)
//! STATE    u8 4, u64 len, len bytes: the snapshot state file's JSON body
//! HANDLES  u8 6, u64 len, len bytes: JSON list of the descriptors attached to the
//!          record's bytes with SCM_RIGHTS (Unix streams only; optional)
//! END      u8 5
//! answer   (destination → source) u8 0: running; u8 1, u32 len, UTF-8 reason: refused
//! ```
//! All integers little-endian. A destination refuses a stream that breaks these rules
//! (a page outside the layout, a record it does not know, a layout too large) with an
//! error, never a panic: the source is no more trusted than a guest.

use std::io::{Read, Write};

pub const MAGIC: &[u8; 8] = b"VESSELMG";
pub const VERSION: u32 = 1;
pub const PAGE: usize = 4096;
/// Pages in one PAGES or ZERO record at most.
pub const MAX_RUN: u32 = 256;
/// The largest state body a destination reads (a state file is tens of KiB).
pub const MAX_STATE: u64 = 64 << 20;
/// The most RAM regions a layout may have.
pub const MAX_REGIONS: u32 = 16;
/// The longest refusal reason a source reads.
const MAX_REASON: u32 = 64 << 10;

pub const LAYOUT: u8 = 1;
pub const PAGES: u8 = 2;
pub const ZERO: u8 = 3;
pub const STATE: u8 = 4;
pub const END: u8 = 5;
pub const HANDLES: u8 = 6;
/// The largest HANDLES body a destination reads.
const MAX_HANDLES: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the migration stream broke: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a Vessel migration stream")]
    Magic,
    #[error("migration stream version {0}; this Vessel speaks version {VERSION} only")]
    Version(u32),
    #[error("the migration stream is invalid: {0}")]
    Invalid(String),
    #[error("the destination closed the stream without answering (it ended before it ran the VM)")]
    NoAnswer,
}

/// One record as the destination reads it (page data is read by the caller).
#[derive(Debug, PartialEq, Eq)]
pub enum Record {
    Layout(Vec<(u64, u64)>),
    Pages { gpa: u64, count: u32 },
    Zero { gpa: u64, count: u32 },
    State(Vec<u8>),
    Handles(Vec<u8>),
    End,
}

fn u8_of(r: &mut impl Read) -> std::io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

fn u32_of(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn u64_of(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

pub fn write_header(w: &mut impl Write) -> std::io::Result<()> {
    w.write_all(MAGIC)?;
    w.write_all(&VERSION.to_le_bytes())?;
    w.write_all(&0u32.to_le_bytes())
}

pub fn read_header(r: &mut impl Read) -> Result<(), WireError> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(WireError::Magic);
    }
    let version = u32_of(r)?;
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    u32_of(r)?;
    Ok(())
}

pub fn write_layout(w: &mut impl Write, regions: &[(u64, u64)]) -> std::io::Result<()> {
    w.write_all(&[LAYOUT])?;
    w.write_all(&(regions.len() as u32).to_le_bytes())?;
    for (gpa, len) in regions {
        w.write_all(&gpa.to_le_bytes())?;
        w.write_all(&len.to_le_bytes())?;
    }
    Ok(())
}

/// A PAGES record's head; its `count` pages follow.
pub fn write_pages_head(w: &mut impl Write, gpa: u64, count: u32) -> std::io::Result<()> {
    w.write_all(&[PAGES])?;
    w.write_all(&gpa.to_le_bytes())?;
    w.write_all(&count.to_le_bytes())
}

pub fn write_zero(w: &mut impl Write, gpa: u64, count: u32) -> std::io::Result<()> {
    w.write_all(&[ZERO])?;
    w.write_all(&gpa.to_le_bytes())?;
    w.write_all(&count.to_le_bytes())
}

pub fn write_state(w: &mut impl Write, body: &[u8]) -> std::io::Result<()> {
    w.write_all(&[STATE])?;
    w.write_all(&(body.len() as u64).to_le_bytes())?;
    w.write_all(body)
}

/// A HANDLES record whole, to be written with its descriptors attached.
pub fn handles_record(body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + body.len());
    v.push(HANDLES);
    v.extend_from_slice(&(body.len() as u64).to_le_bytes());
    v.extend_from_slice(body);
    v
}

pub fn write_end(w: &mut impl Write) -> std::io::Result<()> {
    w.write_all(&[END])
}

/// Reads the next record's head (and a layout's or state's body).
pub fn read_record(r: &mut impl Read) -> Result<Record, WireError> {
    let kind = u8_of(r)?;
    match kind {
        LAYOUT => {
            let n = u32_of(r)?;
            if n == 0 || n > MAX_REGIONS {
                return Err(WireError::Invalid(format!("a layout of {n} regions")));
            }
            let mut regions = Vec::with_capacity(n as usize);
            for _ in 0..n {
                regions.push((u64_of(r)?, u64_of(r)?));
            }
            Ok(Record::Layout(regions))
        }
        PAGES | ZERO => {
            let gpa = u64_of(r)?;
            let count = u32_of(r)?;
            if count == 0 || count > MAX_RUN || gpa % PAGE as u64 != 0 {
                return Err(WireError::Invalid(format!(
                    "a run of {count} pages at {gpa:#x}"
                )));
            }
            Ok(if kind == PAGES {
                Record::Pages { gpa, count }
            } else {
                Record::Zero { gpa, count }
            })
        }
        STATE => {
            let len = u64_of(r)?;
            if len > MAX_STATE {
                return Err(WireError::Invalid(format!("a state of {len} bytes")));
            }
            let mut body = vec![0u8; len as usize];
            r.read_exact(&mut body)?;
            Ok(Record::State(body))
        }
        HANDLES => {
            let len = u64_of(r)?;
            if len > MAX_HANDLES {
                return Err(WireError::Invalid(format!("a handle list of {len} bytes")));
            }
            let mut body = vec![0u8; len as usize];
            r.read_exact(&mut body)?;
            Ok(Record::Handles(body))
        }
        END => Ok(Record::End),
        other => Err(WireError::Invalid(format!("unknown record type {other}"))),
    }
}

/// The destination's answer: the VM runs there, or why it does not.
pub fn write_answer(w: &mut impl Write, result: &Result<(), String>) -> std::io::Result<()> {
    match result {
        Ok(()) => w.write_all(&[0])?,
        Err(why) => {
            let b = why.as_bytes();
            let b = &b[..b.len().min(MAX_REASON as usize)];
            w.write_all(&[1])?;
            w.write_all(&(b.len() as u32).to_le_bytes())?;
            w.write_all(b)?;
        }
    }
    w.flush()
}

pub fn read_answer(r: &mut impl Read) -> Result<Result<(), String>, WireError> {
    let first = u8_of(r).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => WireError::NoAnswer,
        _ => WireError::Io(e),
    })?;
    match first {
        0 => Ok(Ok(())),
        1 => {
            let n = u32_of(r)?;
            if n > MAX_REASON {
                return Err(WireError::Invalid("an overlong refusal".into()));
            }
            let mut b = vec![0u8; n as usize];
            r.read_exact(&mut b)?;
            Ok(Err(String::from_utf8_lossy(&b).into_owned()))
        }
        other => Err(WireError::Invalid(format!("answer {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_ones_are_refused() {
        let mut w = Vec::new();
        write_header(&mut w).unwrap();
        write_layout(&mut w, &[(0, 1 << 20)]).unwrap();
        write_pages_head(&mut w, 0x1000, 1).unwrap();
        w.extend_from_slice(&[7u8; PAGE]);
        write_zero(&mut w, 0x2000, 3).unwrap();
        write_state(&mut w, b"{}").unwrap();
        write_end(&mut w).unwrap();
        let mut r = &w[..];
        read_header(&mut r).unwrap();
        assert_eq!(
            read_record(&mut r).unwrap(),
            Record::Layout(vec![(0, 1 << 20)])
        );
        assert_eq!(
            read_record(&mut r).unwrap(),
            Record::Pages {
                gpa: 0x1000,
                count: 1
            }
        );
        r = &r[PAGE..];
        assert_eq!(
            read_record(&mut r).unwrap(),
            Record::Zero {
                gpa: 0x2000,
                count: 3
            }
        );
        assert_eq!(read_record(&mut r).unwrap(), Record::State(b"{}".to_vec()));
        assert_eq!(read_record(&mut r).unwrap(), Record::End);

        let mut bad = Vec::new();
        write_pages_head(&mut bad, 0x1001, 1).unwrap();
        assert!(matches!(
            read_record(&mut &bad[..]),
            Err(WireError::Invalid(_))
        ));
        let mut big = vec![STATE];
        big.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            read_record(&mut &big[..]),
            Err(WireError::Invalid(_))
        ));
        assert!(matches!(
            read_record(&mut &[9u8][..]),
            Err(WireError::Invalid(_))
        ));
        assert!(matches!(
            read_header(&mut &b"VESSELSN\x01\0\0\0\0\0\0\0"[..]),
            Err(WireError::Magic)
        ));
        let mut v2 = MAGIC.to_vec();
        v2.extend_from_slice(&2u32.to_le_bytes());
        v2.extend_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            read_header(&mut &v2[..]),
            Err(WireError::Version(2))
        ));
        let mut a = Vec::new();
        write_answer(&mut a, &Err("no room".into())).unwrap();
        assert_eq!(read_answer(&mut &a[..]).unwrap(), Err("no room".into()));
        // A destination that closed without a word.
        assert!(matches!(
            read_answer(&mut &[][..]),
            Err(WireError::NoAnswer)
        ));
    }
}
