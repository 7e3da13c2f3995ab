//! Compressed clusters: locating them in the file and inflating them (deflate or zstd).

use super::header::Header;
use crate::error::Qcow2Error;
use crate::storage::Storage;

/// Compressed data is addressed in 512-byte sectors.
const SECTOR: u64 = 512;

/// Splits a compressed L2 entry into (host byte offset, bytes spanned in whole sectors).
fn descriptor(header: &Header, entry: u64) -> (u64, u64) {
    let shift = 62 - (header.cluster_bits - 8);
    let offset = entry & ((1u64 << shift) - 1);
    let sectors = ((entry >> shift) & ((1u64 << (header.cluster_bits - 8)) - 1)) + 1;
    (offset, sectors * SECTOR)
}

/// The host clusters a compressed entry references, as (first cluster offset, count).
pub fn host_clusters(header: &Header, entry: u64) -> (u64, u64) {
    let (offset, span) = descriptor(header, entry);
    let cs = header.cluster_size();
    let start = offset & !(SECTOR - 1);
    let first = start / cs;
    let last = (start + span - 1) / cs;
    (first * cs, last - first + 1)
}

/// Reads and inflates one compressed cluster.
pub fn read_cluster(
    f: &dyn Storage,
    header: &Header,
    file_end: u64,
    guest: u64,
    entry: u64,
) -> Result<Vec<u8>, Qcow2Error> {
    let err = |why| Qcow2Error::Compressed { guest, why };
    let (offset, span) = descriptor(header, entry);
    let len = span - (offset % SECTOR);
    if offset.saturating_add(len) > file_end.saturating_add(SECTOR) || offset == 0 {
        return Err(err("compressed data lies past the end of the file"));
    }
    let mut input = vec![0u8; len as usize];
    f.read_at(offset, &mut input)
        .map_err(|source| Qcow2Error::ReadData { offset, source })?;
    let cs = header.cluster_size() as usize;
    if header.compression_type == COMPRESSION_ZSTD {
        return inflate_zstd(&input, cs).map_err(err);
    }
    let out = miniz_oxide::inflate::decompress_to_vec_with_limit(&input, cs)
        .map_err(|_| err("deflate stream is invalid"))?;
    if out.len() != cs {
        return Err(err("deflate stream does not fill the cluster"));
    }
    Ok(out)
}

/// Header compression_type value for zstd.
const COMPRESSION_ZSTD: u8 = 1;
/// zstd frame magic, little-endian on disk.
const ZSTD_MAGIC: u32 = 0xfd2f_b528;
/// Largest window a frame may ask for; the decoder reserves that much memory up front.
const ZSTD_MAX_WINDOW: u64 = 8 << 20;

/// Decodes one zstd frame that must produce exactly `cs` bytes. The frame header's window
/// size is checked first so a hostile frame cannot make the decoder reserve much memory.
fn inflate_zstd(input: &[u8], cs: usize) -> Result<Vec<u8>, &'static str> {
    use std::io::Read;

    let magic = input
        .get(..4)
        .map(|m| u32::from_le_bytes([m[0], m[1], m[2], m[3]]));
    if magic != Some(ZSTD_MAGIC) {
        return Err("zstd frame magic missing");
    }
    let fhd = *input.get(4).ok_or("zstd frame truncated")?;
    let single_segment = fhd & 0x20 != 0;
    if single_segment {
        // The window is the content size, which must be one cluster.
        let did_len = [0usize, 1, 2, 4][usize::from(fhd & 3)];
        let fcs_len = [1usize, 2, 4, 8][usize::from(fhd >> 6)];
        let at = 5 + did_len;
        let raw = input.get(at..at + fcs_len).ok_or("zstd frame truncated")?;
        let mut v = raw
            .iter()
            .rev()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
        if fcs_len == 2 {
            v += 256;
        }
        if v != cs as u64 {
            return Err("zstd frame content size is not one cluster");
        }
    } else {
        let wd = *input.get(5).ok_or("zstd frame truncated")?;
        let exp = u32::from(wd >> 3);
        let base = 1u64 << (10 + exp);
        if base + (base / 8) * u64::from(wd & 7) > ZSTD_MAX_WINDOW {
            return Err("zstd window too large");
        }
    }
    let mut src = input;
    let mut dec =
        ruzstd::decoding::StreamingDecoder::new(&mut src).map_err(|_| "zstd frame is invalid")?;
    let mut out = vec![0u8; cs];
    dec.read_exact(&mut out)
        .map_err(|_| "zstd stream does not fill the cluster")?;
    Ok(out)
}
