//! Compressed clusters: locating them in the file and inflating (deflate only; zstd is
//! refused with a clean error).

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
    if header.compression_type != 0 {
        return Err(err("zstd compression is not supported"));
    }
    let (offset, span) = descriptor(header, entry);
    let len = span - (offset % SECTOR);
    if offset.saturating_add(len) > file_end.saturating_add(SECTOR) || offset == 0 {
        return Err(err("compressed data lies past the end of the file"));
    }
    let mut input = vec![0u8; len as usize];
    f.read_at(offset, &mut input)
        .map_err(|source| Qcow2Error::ReadData { offset, source })?;
    let cs = header.cluster_size() as usize;
    let out = miniz_oxide::inflate::decompress_to_vec_with_limit(&input, cs)
        .map_err(|_| err("deflate stream is invalid"))?;
    if out.len() != cs {
        return Err(err("deflate stream does not fill the cluster"));
    }
    Ok(out)
}
