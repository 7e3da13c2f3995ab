//! The qcow2 header and its extensions (qemu docs/interop/qcow2.txt), parsed defensively:
//! every field an image can lie about is range-checked before anything is sized from it.

use thiserror::Error;

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Bytes of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Bytes of the version 3 header fields up to and including `header_length`.
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// The header length this crate writes (adds the compression type byte and padding).
pub const V3_HEADER_LEN: u32 = 112;
/// Smallest and largest cluster sizes the spec (and qemu) allow.
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Upper bounds taken from qemu so that a header cannot make us allocate absurd tables.
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name qemu accepts.
pub const MAX_BACKING_NAME: u32 = 1023;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// Header extension types.
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_DATA_FILE: u32 = 0x4441_5441;
const EXT_ENCRYPTION: u32 = 0x0537_be77;

/// Byte offsets of the fields this crate rewrites in place.
pub const OFF_SIZE: u64 = 24;
pub const OFF_L1_SIZE: u64 = 36;
pub const OFF_REFTABLE: u64 = 48;
pub const OFF_INCOMPAT: u64 = 72;
pub const OFF_AUTOCLEAR: u64 = 88;

/// Why a header was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("image is shorter than a qcow2 header")]
    Truncated,
    #[error("bad magic {0:#010x}: not a qcow2 image")]
    BadMagic(u32),
    #[error("unsupported qcow2 version {0}")]
    UnsupportedVersion(u32),
    #[error("cluster_bits {0} out of range 9..=21")]
    ClusterBits(u32),
    #[error("header_length {0} invalid")]
    HeaderLength(u32),
    #[error("refcount_order {0} out of range 0..=6 (v2 requires 4)")]
    RefcountOrder(u32),
    #[error("encrypted images are not supported (crypt_method {0})")]
    Encrypted(u32),
    #[error("unknown incompatible features {0:#x}")]
    UnknownIncompatible(u64),
    #[error("unsupported incompatible feature: {0}")]
    UnsupportedFeature(&'static str),
    #[error("compression type {0} unknown")]
    CompressionType(u8),
    #[error("virtual size {0} too large")]
    VirtualSize(u64),
    #[error("L1 table: {0}")]
    L1(&'static str),
    #[error("refcount table: {0}")]
    RefcountTable(&'static str),
    #[error("snapshot table offset {0:#x} not cluster-aligned")]
    SnapshotTable(u64),
    #[error("backing file name: {0}")]
    BackingName(&'static str),
    #[error("header extension at {0:#x} runs past the header cluster")]
    Extension(u64),
}

/// A parsed and validated qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    /// From the header-cluster contents, not the fixed fields.
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
}

fn be32(b: &[u8], at: usize) -> Result<u32, HeaderError> {
    let s = b.get(at..at + 4).ok_or(HeaderError::Truncated)?;
    let mut a = [0u8; 4];
    a.copy_from_slice(s);
    Ok(u32::from_be_bytes(a))
}

fn be64(b: &[u8], at: usize) -> Result<u64, HeaderError> {
    let s = b.get(at..at + 8).ok_or(HeaderError::Truncated)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_be_bytes(a))
}

/// L1 entries needed to map `size` bytes with the given cluster size.
pub fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
    let bytes_per_l2 = 1u128 << (cluster_bits * 2 - 3);
    (u128::from(size).div_ceil(bytes_per_l2)) as u64
}

/// Largest virtual size this crate accepts: the L1 bound, capped at 2^61 bytes.
pub fn max_virtual_size(cluster_bits: u32) -> u64 {
    let by_l1 = (MAX_L1_BYTES / 8) as u128 * (1u128 << (cluster_bits * 2 - 3));
    by_l1.min(1u128 << 61) as u64
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Validates magic, version and cluster_bits from the first bytes of a file and
    /// returns cluster_bits, so the caller can size the header cluster read.
    pub fn peek_cluster_bits(buf: &[u8]) -> Result<u32, HeaderError> {
        let magic = be32(buf, 0)?;
        if magic != MAGIC {
            return Err(HeaderError::BadMagic(magic));
        }
        let version = be32(buf, 4)?;
        if version != 2 && version != 3 {
            return Err(HeaderError::UnsupportedVersion(version));
        }
        let cluster_bits = be32(buf, 20)?;
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(HeaderError::ClusterBits(cluster_bits));
        }
        Ok(cluster_bits)
    }

    /// Parses the header cluster (or as much of the file's start as exists).
    pub fn parse(buf: &[u8]) -> Result<Header, HeaderError> {
        let magic = be32(buf, 0)?;
        if magic != MAGIC {
            return Err(HeaderError::BadMagic(magic));
        }
        let version = be32(buf, 4)?;
        if version != 2 && version != 3 {
            return Err(HeaderError::UnsupportedVersion(version));
        }
        let cluster_bits = be32(buf, 20)?;
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(HeaderError::ClusterBits(cluster_bits));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8)?,
            backing_file_size: be32(buf, 16)?,
            cluster_bits,
            size: be64(buf, 24)?,
            l1_size: be32(buf, 36)?,
            l1_table_offset: be64(buf, 40)?,
            refcount_table_offset: be64(buf, 48)?,
            refcount_table_clusters: be32(buf, 56)?,
            nb_snapshots: be32(buf, 60)?,
            snapshots_offset: be64(buf, 64)?,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            backing_file: None,
            backing_format: None,
        };
        let crypt = be32(buf, 32)?;
        if crypt != 0 {
            return Err(HeaderError::Encrypted(crypt));
        }
        if version == 3 {
            h.incompatible_features = be64(buf, 72)?;
            h.compatible_features = be64(buf, 80)?;
            h.autoclear_features = be64(buf, 88)?;
            h.refcount_order = be32(buf, 96)?;
            h.header_length = be32(buf, 100)?;
            if h.header_length < V3_MIN_HEADER_LEN
                || u64::from(h.header_length) > cluster_size
                || !h.header_length.is_multiple_of(8)
            {
                return Err(HeaderError::HeaderLength(h.header_length));
            }
            if h.header_length > V3_MIN_HEADER_LEN {
                h.compression_type = *buf.get(104).ok_or(HeaderError::Truncated)?;
            }
            if h.refcount_order > 6 {
                return Err(HeaderError::RefcountOrder(h.refcount_order));
            }
        }
        let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(HeaderError::UnknownIncompatible(unknown));
        }
        if h.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(HeaderError::UnsupportedFeature("external data file"));
        }
        if h.incompatible_features & INCOMPAT_EXTL2 != 0 {
            return Err(HeaderError::UnsupportedFeature("extended L2 entries"));
        }
        let has_ctype = h.incompatible_features & INCOMPAT_COMPRESSION != 0;
        if (has_ctype && h.compression_type == 0) || h.compression_type > 1 {
            return Err(HeaderError::CompressionType(h.compression_type));
        }
        if h.compression_type != 0 && !has_ctype {
            return Err(HeaderError::CompressionType(h.compression_type));
        }
        if h.size > max_virtual_size(cluster_bits) {
            return Err(HeaderError::VirtualSize(h.size));
        }
        // L1 table.
        if u64::from(h.l1_size) * 8 > MAX_L1_BYTES {
            return Err(HeaderError::L1("too large"));
        }
        if u64::from(h.l1_size) < l1_entries_for(h.size, cluster_bits) {
            return Err(HeaderError::L1("too small for the virtual size"));
        }
        if !h.l1_table_offset.is_multiple_of(cluster_size)
            || (h.l1_size > 0 && h.l1_table_offset == 0)
        {
            return Err(HeaderError::L1("offset invalid"));
        }
        if h.l1_table_offset
            .checked_add(u64::from(h.l1_size) * 8)
            .is_none()
        {
            return Err(HeaderError::L1("offset invalid"));
        }
        // Refcount table.
        if h.refcount_table_clusters == 0
            || u64::from(h.refcount_table_clusters) * cluster_size > MAX_REFTABLE_BYTES
        {
            return Err(HeaderError::RefcountTable("size invalid"));
        }
        if h.refcount_table_offset == 0
            || !h.refcount_table_offset.is_multiple_of(cluster_size)
            || h.refcount_table_offset
                .checked_add(MAX_REFTABLE_BYTES)
                .is_none()
        {
            return Err(HeaderError::RefcountTable("offset invalid"));
        }
        if h.nb_snapshots > 0 && !h.snapshots_offset.is_multiple_of(cluster_size) {
            return Err(HeaderError::SnapshotTable(h.snapshots_offset));
        }
        // Backing file name: must sit inside the header cluster.
        if h.backing_file_offset != 0 {
            let end = h
                .backing_file_offset
                .checked_add(u64::from(h.backing_file_size));
            if h.backing_file_size > MAX_BACKING_NAME || end.is_none_or(|e| e > cluster_size) {
                return Err(HeaderError::BackingName("out of the header cluster"));
            }
            let start = h.backing_file_offset as usize;
            let name = buf
                .get(start..start + h.backing_file_size as usize)
                .ok_or(HeaderError::Truncated)?;
            let name =
                std::str::from_utf8(name).map_err(|_| HeaderError::BackingName("not UTF-8"))?;
            if name.is_empty() {
                return Err(HeaderError::BackingName("empty"));
            }
            h.backing_file = Some(name.to_owned());
        }
        h.parse_extensions(buf)?;
        Ok(h)
    }

    fn parse_extensions(&mut self, buf: &[u8]) -> Result<(), HeaderError> {
        let limit = if self.backing_file_offset != 0 {
            self.backing_file_offset
        } else {
            self.cluster_size()
        };
        let mut at = u64::from(self.header_length);
        while at + 8 <= limit {
            let Ok(ty) = be32(buf, at as usize) else {
                break; // file shorter than the cluster: no more extensions
            };
            let len = u64::from(be32(buf, at as usize + 4)?);
            if ty == EXT_END {
                return Ok(());
            }
            let data_start = at + 8;
            let data_end = data_start + len;
            if data_end > limit {
                return Err(HeaderError::Extension(at));
            }
            let data = buf
                .get(data_start as usize..data_end as usize)
                .ok_or(HeaderError::Truncated)?;
            match ty {
                EXT_BACKING_FORMAT => {
                    let f = std::str::from_utf8(data).map_err(|_| HeaderError::Extension(at))?;
                    self.backing_format = Some(f.to_owned());
                }
                EXT_DATA_FILE => return Err(HeaderError::UnsupportedFeature("external data file")),
                EXT_ENCRYPTION => return Err(HeaderError::Encrypted(0)),
                _ => {} // feature table, bitmaps and unknown extensions are not needed
            }
            at = data_start + len.div_ceil(8) * 8;
        }
        Ok(())
    }

    /// Serializes a fresh version 3 header cluster with the backing name and format.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.cluster_size() as usize);
        b.extend_from_slice(&MAGIC.to_be_bytes());
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&self.backing_file_offset.to_be_bytes());
        b.extend_from_slice(&self.backing_file_size.to_be_bytes());
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes()); // crypt_method
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        b.extend_from_slice(&self.incompatible_features.to_be_bytes());
        b.extend_from_slice(&self.compatible_features.to_be_bytes());
        b.extend_from_slice(&self.autoclear_features.to_be_bytes());
        b.extend_from_slice(&self.refcount_order.to_be_bytes());
        b.extend_from_slice(&self.header_length.to_be_bytes());
        b.push(self.compression_type);
        b.resize(self.header_length as usize, 0);
        if let Some(fmt) = &self.backing_format {
            b.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
            b.extend_from_slice(&(fmt.len() as u32).to_be_bytes());
            b.extend_from_slice(fmt.as_bytes());
            b.resize(b.len().div_ceil(8) * 8, 0);
        }
        b.extend_from_slice(&EXT_FEATURE_TABLE.to_be_bytes());
        let names: [(u8, u8, &str); 3] = [
            (0, 0, "dirty bit"),
            (0, 1, "corrupt bit"),
            (1, 0, "lazy refcounts"),
        ];
        b.extend_from_slice(&((names.len() * 48) as u32).to_be_bytes());
        for (ty, bit, name) in names {
            let mut entry = [0u8; 48];
            entry[0] = ty;
            entry[1] = bit;
            entry[2..2 + name.len()].copy_from_slice(name.as_bytes());
            b.extend_from_slice(&entry);
        }
        b.extend_from_slice(&[0u8; 8]); // end of extensions
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            compression_type: 0,
            backing_file: None,
            backing_format: Some("raw".into()),
        }
    }

    #[test]
    fn round_trip() {
        let h = sample();
        assert_eq!(Header::parse(&h.encode()).unwrap(), h);
    }

    #[test]
    fn refuses_bad_fields() {
        let good = sample().encode();
        let cases: [(usize, &[u8], HeaderError); 4] = [
            (0, &[0, 0, 0, 0], HeaderError::BadMagic(0)),
            (4, &[0, 0, 0, 9], HeaderError::UnsupportedVersion(9)),
            (20, &[0, 0, 0, 40], HeaderError::ClusterBits(40)),
            (32, &[0, 0, 0, 1], HeaderError::Encrypted(1)),
        ];
        for (at, bytes, want) in cases {
            let mut b = good.clone();
            b[at..at + bytes.len()].copy_from_slice(bytes);
            assert_eq!(Header::parse(&b), Err(want));
        }
        assert_eq!(Header::parse(&good[..50]), Err(HeaderError::Truncated));
    }

    #[test]
    fn l1_must_cover_size() {
        let mut h = sample();
        h.l1_size = 1;
        assert_eq!(
            Header::parse(&h.encode()),
            Err(HeaderError::L1("too small for the virtual size"))
        );
    }
}
