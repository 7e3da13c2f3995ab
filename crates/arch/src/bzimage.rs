//! The Linux x86 boot protocol's bzImage: its setup header and protected-mode payload.
//!
//! Field offsets are those of Documentation/arch/x86/boot.rst. Everything here reads a
//! file a user handed us, so every offset is checked and every size bounded.

/// The header fields Vessel acts on, plus the raw header bytes to copy into the zero page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetupHeader {
    /// Boot protocol version, e.g. 0x020f for 2.15.
    pub version: u16,
    pub setup_sects: u8,
    pub loadflags: u8,
    pub xloadflags: u16,
    pub kernel_alignment: u32,
    pub relocatable: bool,
    pub cmdline_size: u32,
    pub initrd_addr_max: u32,
    pub pref_address: u64,
    /// Bytes of memory the kernel needs from its load address to decompress and run.
    pub init_size: u32,
    /// Offset and length of the compressed payload inside the protected-mode code.
    pub payload_offset: u32,
    pub payload_length: u32,
    /// Header bytes from 0x1f1 to the end of the header, verbatim.
    pub raw: Vec<u8>,
}

/// A parsed bzImage: header and the protected-mode kernel to load.
#[derive(Clone, Debug)]
pub struct BzImage<'a> {
    pub header: SetupHeader,
    /// The protected-mode kernel (everything after the real-mode setup sectors).
    pub kernel: &'a [u8],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BzImageError {
    #[error("file is too small to be a bzImage ({0} bytes)")]
    TooSmall(usize),
    #[error("no boot sector signature 0xaa55 (found {0:#06x}): not a bzImage")]
    BadBootFlag(u16),
    #[error("no \"HdrS\" setup header magic: not a Linux bzImage")]
    BadHeaderMagic,
    #[error(
        "boot protocol {major}.{minor:02} is too old: 2.12 or later is needed for 64-bit entry"
    )]
    ProtocolTooOld { major: u8, minor: u8 },
    #[error("kernel has no 64-bit entry point (XLF_KERNEL_64 clear)")]
    Not64Bit,
    #[error(
        "setup sectors ({setup_bytes} bytes) run past the end of the file ({file_size} bytes)"
    )]
    SetupPastEnd {
        setup_bytes: usize,
        file_size: usize,
    },
    #[error("header claims init_size of {0:#x} bytes, beyond any sane kernel")]
    AbsurdInitSize(u32),
    #[error("header claims a preferred load address of {0:#x}, beyond any sane kernel")]
    AbsurdLoadAddress(u64),
    #[error(
        "the protected-mode kernel is {have} bytes but the header says {want}: a truncated image"
    )]
    Truncated { have: usize, want: u64 },
}

const HDR_START: usize = 0x1f1;
const BOOT_FLAG: usize = 0x1fe;
const HEADER_MAGIC: usize = 0x202;
/// XLF_KERNEL_64: the kernel has the legacy 64-bit entry point at +0x200.
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// Largest init_size accepted: 1 GiB is far beyond any real kernel.
const MAX_INIT_SIZE: u32 = 1 << 30;
const MAX_PREF_ADDRESS: u64 = 1 << 32;

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from(u32_at(b, o)) | (u64::from(u32_at(b, o + 4)) << 32)
}

impl<'a> BzImage<'a> {
    /// Recognise a bzImage without parsing it in full.
    pub fn is_bzimage(image: &[u8]) -> bool {
        image.len() > HEADER_MAGIC + 4 && &image[HEADER_MAGIC..HEADER_MAGIC + 4] == b"HdrS"
    }

    pub fn parse(image: &'a [u8]) -> Result<Self, BzImageError> {
        // The 2.12+ header ends at 0x268 (init_size is at 0x260).
        if image.len() < 0x268 {
            return Err(BzImageError::TooSmall(image.len()));
        }
        let flag = u16_at(image, BOOT_FLAG);
        if flag != 0xaa55 {
            return Err(BzImageError::BadBootFlag(flag));
        }
        if &image[HEADER_MAGIC..HEADER_MAGIC + 4] != b"HdrS" {
            return Err(BzImageError::BadHeaderMagic);
        }
        let version = u16_at(image, 0x206);
        if version < 0x020c {
            return Err(BzImageError::ProtocolTooOld {
                major: (version >> 8) as u8,
                minor: version as u8,
            });
        }
        let xloadflags = u16_at(image, 0x236);
        if xloadflags & XLF_KERNEL_64 == 0 {
            return Err(BzImageError::Not64Bit);
        }
        // A setup_sects of 0 means 4, for compatibility with ancient loaders.
        let setup_sects = match image[HDR_START] {
            0 => 4,
            n => n,
        };
        let setup_bytes = (usize::from(setup_sects) + 1) * 512;
        if setup_bytes >= image.len() {
            return Err(BzImageError::SetupPastEnd {
                setup_bytes,
                file_size: image.len(),
            });
        }
        // syssize: the protected-mode code's size in 16-byte units.
        let want = u64::from(u32_at(image, 0x1f4)) * 16;
        let have = image.len() - setup_bytes;
        if want > have as u64 {
            return Err(BzImageError::Truncated { have, want });
        }
        let init_size = u32_at(image, 0x260);
        if init_size > MAX_INIT_SIZE {
            return Err(BzImageError::AbsurdInitSize(init_size));
        }
        let pref_address = u64_at(image, 0x258);
        if pref_address > MAX_PREF_ADDRESS {
            return Err(BzImageError::AbsurdLoadAddress(pref_address));
        }
        // The header's own length: byte 0x201 is the offset of its end from 0x202.
        let header_end = (0x202 + usize::from(image[0x201])).clamp(0x268, image.len());
        let header = SetupHeader {
            version,
            setup_sects,
            loadflags: image[0x211],
            xloadflags,
            kernel_alignment: u32_at(image, 0x230),
            relocatable: image[0x234] != 0,
            cmdline_size: u32_at(image, 0x238),
            initrd_addr_max: u32_at(image, 0x22c),
            pref_address,
            init_size,
            payload_offset: u32_at(image, 0x248),
            payload_length: u32_at(image, 0x24c),
            raw: image[HDR_START..header_end].to_vec(),
        };
        Ok(BzImage {
            header,
            kernel: &image[setup_bytes..],
        })
    }

    /// The compressed payload inside the protected-mode kernel, when the header's
    /// offsets point inside it.
    pub fn payload(&self) -> Option<&'a [u8]> {
        let start = usize::try_from(self.header.payload_offset).ok()?;
        let len = usize::try_from(self.header.payload_length).ok()?;
        self.kernel.get(start..start.checked_add(len)?)
    }
}

/// The LZ4 "legacy" frame Linux's `lz4 -l` payloads use: a magic, then blocks of
/// (little-endian compressed length, data), each expanding to at most 8 MiB.
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// No kernel image is bigger than this once decompressed.
const MAX_VMLINUX: usize = 512 << 20;

impl BzImage<'_> {
    /// Decompress an LZ4 payload on the host, returning the ELF vmlinux; None when the
    /// payload is another format or does not decompress cleanly (the caller then lets the
    /// kernel's own decompressor do it).
    pub fn decompress_lz4_payload(&self) -> Option<Vec<u8>> {
        let mut p = self.payload()?;
        p = p.strip_prefix(&LZ4_LEGACY_MAGIC[..])?;
        let mut out = Vec::new();
        while p.len() >= 4 {
            let len = u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as usize;
            // The payload ends with the uncompressed size, which is no block length.
            if len == 0 || len > p.len() - 4 {
                break;
            }
            let block = lz4_flex::block::decompress(&p[4..4 + len], LZ4_LEGACY_BLOCK).ok()?;
            out.extend_from_slice(&block);
            if out.len() > MAX_VMLINUX {
                return None;
            }
            p = &p[4 + len..];
        }
        // What follows the last block is the build's 4-byte uncompressed size: anything
        // else is a truncated or corrupted payload.
        let size = p
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
        (p.len() == 4 && size == Some(out.len()) && out.starts_with(b"\x7fELF")).then_some(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal header that parses: protocol 2.15, 64-bit, one setup sector.
    pub fn fake_bzimage() -> Vec<u8> {
        let mut img = vec![0u8; 4096];
        img[HDR_START] = 1;
        img[BOOT_FLAG..BOOT_FLAG + 2].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x201] = 0x66;
        img[HEADER_MAGIC..HEADER_MAGIC + 4].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x236..0x238].copy_from_slice(&XLF_KERNEL_64.to_le_bytes());
        img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
        img[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        img[0x260..0x264].copy_from_slice(&0x20_0000u32.to_le_bytes());
        img[0x1f4..0x1f8].copy_from_slice(&((4096u32 - 1024) / 16).to_le_bytes());
        img
    }

    #[test]
    fn parses_a_minimal_header() {
        let img = fake_bzimage();
        let bz = BzImage::parse(&img).unwrap();
        assert_eq!(bz.header.version, 0x020f);
        assert_eq!(bz.header.pref_address, 0x100_0000);
        assert_eq!(bz.kernel.len(), 4096 - 1024);
    }

    #[test]
    fn malformed_images_are_clean_errors() {
        let good = fake_bzimage();
        let cases: Vec<(Vec<u8>, BzImageError)> = vec![
            (good[..100].to_vec(), BzImageError::TooSmall(100)),
            (
                {
                    let mut i = good.clone();
                    i[BOOT_FLAG] = 0;
                    i
                },
                BzImageError::BadBootFlag(0xaa00),
            ),
            (
                {
                    let mut i = good.clone();
                    i[HEADER_MAGIC] = b'X';
                    i
                },
                BzImageError::BadHeaderMagic,
            ),
            (
                {
                    let mut i = good.clone();
                    i[0x206] = 0x0b;
                    i
                },
                BzImageError::ProtocolTooOld {
                    major: 2,
                    minor: 11,
                },
            ),
            (
                {
                    let mut i = good.clone();
                    i[0x236] = 0;
                    i
                },
                BzImageError::Not64Bit,
            ),
            (
                {
                    let mut i = good.clone();
                    i[HDR_START] = 200;
                    i
                },
                BzImageError::SetupPastEnd {
                    setup_bytes: 201 * 512,
                    file_size: 4096,
                },
            ),
            (
                {
                    let mut i = good.clone();
                    i[0x260..0x264].copy_from_slice(&u32::MAX.to_le_bytes());
                    i
                },
                BzImageError::AbsurdInitSize(u32::MAX),
            ),
            (
                {
                    let mut i = good.clone();
                    i[0x258..0x260].copy_from_slice(&u64::MAX.to_le_bytes());
                    i
                },
                BzImageError::AbsurdLoadAddress(u64::MAX),
            ),
        ];
        for (img, want) in cases {
            assert_eq!(BzImage::parse(&img).unwrap_err(), want);
        }
    }

    #[test]
    fn every_truncation_is_an_error_or_a_parse_never_a_panic() {
        let img = fake_bzimage();
        for len in 0..img.len() {
            let _ = BzImage::parse(&img[..len]);
        }
    }
}
