//! ELF64 kernels (an uncompressed `vmlinux`): loadable segments and the PVH entry note.

/// One PT_LOAD segment: where it goes and what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub paddr: u64,
    pub file_offset: u64,
    pub file_size: u64,
    pub mem_size: u64,
}

/// What the loader needs from an ELF kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElfKernel {
    /// e_entry: for x86 vmlinux, the physical address of startup_64.
    pub entry: u64,
    /// The 32-bit PVH entry (XEN_ELFNOTE_PHYS32_ENTRY), when the kernel has one.
    pub pvh_entry: Option<u32>,
    pub segments: Vec<Segment>,
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    #[error("not an ELF file")]
    BadMagic,
    #[error("not a 64-bit little-endian x86-64 executable ELF")]
    WrongKind,
    #[error("ELF header is truncated")]
    Truncated,
    #[error("ELF program headers lie outside the file")]
    ProgramHeadersOutside,
    #[error("segment at {paddr:#x}: file range {offset:#x}+{size:#x} lies outside the file")]
    SegmentOutside { paddr: u64, offset: u64, size: u64 },
    #[error("segment at {paddr:#x} claims {mem_size:#x} bytes in memory, beyond any sane kernel")]
    AbsurdSegment { paddr: u64, mem_size: u64 },
    #[error("ELF has no loadable segments")]
    NoSegments,
}

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// XEN_ELFNOTE_PHYS32_ENTRY, in a note named "Xen".
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const MAX_SEGMENT: u64 = 1 << 32;
const MAX_PHDRS: usize = 256;

fn get<const N: usize>(b: &[u8], o: u64) -> Option<[u8; N]> {
    let o = usize::try_from(o).ok()?;
    b.get(o..o.checked_add(N)?)?.try_into().ok()
}
fn u16_at(b: &[u8], o: u64) -> Option<u16> {
    get::<2>(b, o).map(u16::from_le_bytes)
}
fn u32_at(b: &[u8], o: u64) -> Option<u32> {
    get::<4>(b, o).map(u32::from_le_bytes)
}
fn u64_at(b: &[u8], o: u64) -> Option<u64> {
    get::<8>(b, o).map(u64::from_le_bytes)
}

impl ElfKernel {
    pub fn is_elf(image: &[u8]) -> bool {
        image.starts_with(b"\x7fELF")
    }

    pub fn parse(image: &[u8]) -> Result<Self, ElfError> {
        if !Self::is_elf(image) {
            return Err(ElfError::BadMagic);
        }
        if image.len() < 64 {
            return Err(ElfError::Truncated);
        }
        // ELFCLASS64, little-endian, ET_EXEC, EM_X86_64.
        if image[4] != 2
            || image[5] != 1
            || u16_at(image, 16) != Some(2)
            || u16_at(image, 18) != Some(62)
        {
            return Err(ElfError::WrongKind);
        }
        let t = ElfError::Truncated;
        let entry = u64_at(image, 24).ok_or(t.clone())?;
        let phoff = u64_at(image, 32).ok_or(t.clone())?;
        let phentsize = u64::from(u16_at(image, 54).ok_or(t.clone())?);
        let phnum = usize::from(u16_at(image, 56).ok_or(t)?);
        if phentsize < 56 || phnum > MAX_PHDRS {
            return Err(ElfError::ProgramHeadersOutside);
        }
        let mut segments = Vec::new();
        let mut pvh_entry = None;
        for i in 0..phnum as u64 {
            let ph = phoff
                .checked_add(i * phentsize)
                .ok_or(ElfError::ProgramHeadersOutside)?;
            let field = |o: u64| {
                ph.checked_add(o)
                    .and_then(|at| u64_at(image, at))
                    .ok_or(ElfError::ProgramHeadersOutside)
            };
            let p_type = u32_at(image, ph).ok_or(ElfError::ProgramHeadersOutside)?;
            let (offset, paddr, filesz, memsz) = (field(8)?, field(24)?, field(32)?, field(40)?);
            let in_file = offset
                .checked_add(filesz)
                .is_some_and(|end| end <= image.len() as u64);
            match p_type {
                PT_LOAD => {
                    if !in_file {
                        return Err(ElfError::SegmentOutside {
                            paddr,
                            offset,
                            size: filesz,
                        });
                    }
                    if memsz > MAX_SEGMENT || filesz > memsz {
                        return Err(ElfError::AbsurdSegment {
                            paddr,
                            mem_size: memsz,
                        });
                    }
                    segments.push(Segment {
                        paddr,
                        file_offset: offset,
                        file_size: filesz,
                        mem_size: memsz,
                    });
                }
                PT_NOTE if in_file => {
                    pvh_entry = pvh_entry.or_else(|| find_pvh_note(image, offset, filesz));
                }
                _ => {}
            }
        }
        if segments.is_empty() {
            return Err(ElfError::NoSegments);
        }
        Ok(ElfKernel {
            entry,
            pvh_entry,
            segments,
        })
    }
}

/// Walk a note segment looking for Xen's PHYS32_ENTRY.
fn find_pvh_note(image: &[u8], offset: u64, size: u64) -> Option<u32> {
    let end = offset + size;
    let mut at = offset;
    let align4 = |n: u64| (n + 3) & !3;
    while at + 12 <= end {
        let namesz = u64::from(u32_at(image, at)?);
        let descsz = u64::from(u32_at(image, at + 4)?);
        let kind = u32_at(image, at + 8)?;
        let name_at = at + 12;
        let desc_at = name_at.checked_add(align4(namesz))?;
        let next = desc_at.checked_add(align4(descsz))?;
        if next > end {
            return None;
        }
        let name = image.get(name_at as usize..(name_at + namesz) as usize)?;
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && name.starts_with(b"Xen") && descsz >= 4 {
            return u32_at(image, desc_at);
        }
        at = next;
    }
    None
}

/// Build a minimal ELF64 kernel image: one PT_LOAD of `code` at `paddr` and, optionally, a
/// PVH note. Tests use it to boot generated guest programs through the real loader.
pub fn build_test_elf(paddr: u64, code: &[u8], entry: u64, pvh_entry: Option<u32>) -> Vec<u8> {
    let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
    let code_off = 0x1000u64;
    let mut f = vec![0u8; 64 + 56 * usize::from(phnum)];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes());
    f[18..20].copy_from_slice(&62u16.to_le_bytes());
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&entry.to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes());
    f[52..54].copy_from_slice(&64u16.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&phnum.to_le_bytes());
    let mut ph = |i: usize, p_type: u32, off: u64, paddr: u64, size: u64| {
        let b = 64 + 56 * i;
        f[b..b + 4].copy_from_slice(&p_type.to_le_bytes());
        f[b + 4..b + 8].copy_from_slice(&7u32.to_le_bytes());
        f[b + 8..b + 16].copy_from_slice(&off.to_le_bytes());
        f[b + 16..b + 24].copy_from_slice(&paddr.to_le_bytes());
        f[b + 24..b + 32].copy_from_slice(&paddr.to_le_bytes());
        f[b + 32..b + 40].copy_from_slice(&size.to_le_bytes());
        f[b + 40..b + 48].copy_from_slice(&size.to_le_bytes());
    };
    ph(0, PT_LOAD, code_off, paddr, code.len() as u64);
    let note_off = 0x800u64;
    if pvh_entry.is_some() {
        ph(1, PT_NOTE, note_off, 0, 20);
    }
    f.resize(code_off as usize, 0);
    if let Some(e) = pvh_entry {
        let n = note_off as usize;
        f[n..n + 4].copy_from_slice(&4u32.to_le_bytes());
        f[n + 4..n + 8].copy_from_slice(&4u32.to_le_bytes());
        f[n + 8..n + 12].copy_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
        f[n + 12..n + 16].copy_from_slice(b"Xen\0");
        f[n + 16..n + 20].copy_from_slice(&e.to_le_bytes());
    }
    f.extend_from_slice(code);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_elf_round_trips() {
        let f = build_test_elf(0x100_0000, &[0xf4; 16], 0x100_0000, Some(0x100_0008));
        let k = ElfKernel::parse(&f).unwrap();
        assert_eq!(k.entry, 0x100_0000);
        assert_eq!(k.pvh_entry, Some(0x100_0008));
        assert_eq!(k.segments.len(), 1);
        assert_eq!(k.segments[0].file_size, 16);
    }

    #[test]
    fn malformed_elves_are_errors_not_panics() {
        let good = build_test_elf(0x100_0000, &[0xf4; 16], 0x100_0000, Some(1));
        assert_eq!(ElfKernel::parse(b"nope"), Err(ElfError::BadMagic));
        for len in 0..good.len() {
            let _ = ElfKernel::parse(&good[..len]);
        }
        let mut bad = good.clone();
        bad[64 + 8..64 + 16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            ElfKernel::parse(&bad),
            Err(ElfError::SegmentOutside { .. })
        ));
        let mut bad = good.clone();
        bad[64 + 40..64 + 48].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            ElfKernel::parse(&bad),
            Err(ElfError::AbsurdSegment { .. })
        ));
        let mut bad = good;
        bad[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(ElfKernel::parse(&bad), Err(ElfError::ProgramHeadersOutside));
    }
}
