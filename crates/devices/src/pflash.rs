//! A parallel NOR flash with the Intel/Sharp command set (CFI command set 0001), as QEMU's
//! `pflash_cfi01` gives UEFI firmware its variable store.
//!
//! OVMF keeps its non-volatile variables in the flash just below its code; it finds the
//! device by probing (a flash answers CLEAR STATUS / READ STATUS with a cleared status,
//! where RAM would read the command back and ROM would not change) and then programs it a
//! byte at a time and erases it a block at a time. The contents are in memory; with a
//! backing file every change is written through to it at once, so the variables survive
//! the VM as they do with QEMU's `-drive if=pflash,file=VARS.fd`.
//!
//! Only what firmware uses is decoded: read array, read status, clear status, byte
//! program, block erase and read identifier. Other commands are ignored (the flash stays
//! in read-array mode); accesses past the end read 0xff and write nothing.

use std::os::unix::fs::FileExt;

use crate::bus::BusDevice;

/// The erase block: QEMU's x86 flash uses 4 KiB sectors, and OVMF's FVB driver assumes
/// that size.
pub const BLOCK_SIZE: u64 = 4096;

/// Commands (the first byte of a cycle).
const CMD_READ_ARRAY: u8 = 0xff;
const CMD_READ_ARRAY_ALT: u8 = 0x00;
const CMD_PROGRAM: u8 = 0x10;
const CMD_PROGRAM_ALT: u8 = 0x40;
const CMD_BLOCK_ERASE: u8 = 0x20;
const CMD_CLEAR_STATUS: u8 = 0x50;
const CMD_READ_STATUS: u8 = 0x70;
const CMD_READ_ID: u8 = 0x90;
const CMD_ERASE_CONFIRM: u8 = 0xd0;

/// Status register: the write state machine is ready; an erase or program failed.
const STATUS_READY: u8 = 0x80;
const STATUS_ERASE_ERROR: u8 = 0x20;
const STATUS_PROGRAM_ERROR: u8 = 0x10;

/// Identifier codes (read-identifier mode, offsets 0 and 1): Intel's manufacturer code and
/// a device code from the same family QEMU reports.
const MANUFACTURER_ID: u8 = 0x89;
const DEVICE_ID: u8 = 0x18;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    ReadArray,
    ReadStatus,
    ReadId,
    /// The next write is the byte to program.
    Program,
    /// The next write must be ERASE CONFIRM.
    EraseSetup,
}

#[derive(Debug, thiserror::Error)]
pub enum PflashError {
    #[error("a flash image of {0} bytes: it must be a non-zero multiple of {BLOCK_SIZE}")]
    Size(u64),
    #[error("writing the flash's backing file: {0}")]
    Io(#[from] std::io::Error),
    #[error("a saved flash of {saved} bytes does not fit this flash of {have}")]
    SavedSize { saved: u64, have: u64 },
    #[error("a saved flash block at {0:#x} is not a whole block inside the flash")]
    SavedBlock(u64),
}

/// A flash's state in a snapshot: where its command cycle stands, its status, and its
/// contents as the blocks that are not erased (all 0xff), each in hex.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PflashSnapshot {
    pub len: u64,
    pub mode: Mode,
    pub status: u8,
    pub blocks: Vec<SavedBlock>,
}

/// One [`BLOCK_SIZE`] block of a [`PflashSnapshot`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedBlock {
    pub offset: u64,
    #[serde(with = "hex::serde")]
    pub bytes: Vec<u8>,
}

/// The flash device, mapped at the start of its range on the MMIO bus.
pub struct Pflash {
    data: Vec<u8>,
    backing: Option<std::fs::File>,
    read_only: bool,
    mode: Mode,
    status: u8,
}

impl std::fmt::Debug for Pflash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pflash")
            .field("len", &self.data.len())
            .field("mode", &self.mode)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl Pflash {
    /// A flash holding `data`; changes are written through to `backing` (at the same
    /// offsets) when given. A read-only flash accepts commands but programs and erases
    /// nothing (the status reports the failure).
    pub fn new(
        data: Vec<u8>,
        backing: Option<std::fs::File>,
        read_only: bool,
    ) -> Result<Self, PflashError> {
        let len = data.len() as u64;
        if len == 0 || !len.is_multiple_of(BLOCK_SIZE) {
            return Err(PflashError::Size(len));
        }
        Ok(Pflash {
            data,
            backing,
            read_only,
            mode: Mode::ReadArray,
            status: 0,
        })
    }

    /// The flash's size in bytes.
    pub fn len(&self) -> u64 {
        self.data.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The current contents.
    pub fn contents(&self) -> &[u8] {
        &self.data
    }

    /// The flash's state, for a snapshot.
    pub fn snapshot(&self) -> PflashSnapshot {
        let blocks = self
            .data
            .chunks(BLOCK_SIZE as usize)
            .enumerate()
            .filter(|(_, b)| b.iter().any(|&x| x != 0xff))
            .map(|(i, b)| SavedBlock {
                offset: i as u64 * BLOCK_SIZE,
                bytes: b.to_vec(),
            })
            .collect();
        PflashSnapshot {
            len: self.len(),
            mode: self.mode,
            status: self.status,
            blocks,
        }
    }

    /// Takes a snapshot's state (blocks it does not list are erased). The backing file
    /// is not written: [`Pflash::write_back`] does, once the restore is sure to go on.
    /// Refused, the flash unchanged, when the saved flash is of another size.
    pub fn restore(&mut self, saved: &PflashSnapshot) -> Result<(), PflashError> {
        if saved.len != self.len() {
            return Err(PflashError::SavedSize {
                saved: saved.len,
                have: self.len(),
            });
        }
        let mut data = vec![0xffu8; self.data.len()];
        for b in &saved.blocks {
            let at = usize::try_from(b.offset)
                .ok()
                .filter(|_| {
                    b.offset.is_multiple_of(BLOCK_SIZE) && b.bytes.len() == BLOCK_SIZE as usize
                })
                .and_then(|o| data.get_mut(o..o.checked_add(BLOCK_SIZE as usize)?))
                .ok_or(PflashError::SavedBlock(b.offset))?;
            at.copy_from_slice(&b.bytes);
        }
        self.data = data;
        self.mode = saved.mode;
        self.status = saved.status;
        Ok(())
    }

    /// Writes the whole contents to the backing file, if there is one.
    pub fn write_back(&self) -> Result<(), PflashError> {
        if let Some(file) = &self.backing {
            file.write_all_at(&self.data, 0)?;
            file.set_len(self.len())?;
        }
        Ok(())
    }

    fn write_through(&mut self, offset: usize, len: usize) {
        let Some(file) = &self.backing else { return };
        if let Err(e) = file.write_all_at(&self.data[offset..offset + len], offset as u64) {
            // The guest sees a failed operation; the VM goes on.
            tracing::warn!("flash backing file: {e}");
            self.status |= STATUS_PROGRAM_ERROR;
        }
    }

    fn program(&mut self, offset: u64, value: u8) {
        self.status |= STATUS_READY;
        let Some(at) = usize::try_from(offset)
            .ok()
            .filter(|&o| o < self.data.len())
        else {
            self.status |= STATUS_PROGRAM_ERROR;
            return;
        };
        if self.read_only {
            self.status |= STATUS_PROGRAM_ERROR;
            return;
        }
        // As QEMU's flash (and unlike a real one) the byte is stored as written, not
        // ANDed into the old value: firmware erases before it programs ones anyway.
        self.data[at] = value;
        self.write_through(at, 1);
    }

    fn erase(&mut self, offset: u64) {
        self.status |= STATUS_READY;
        let start = offset - offset % BLOCK_SIZE;
        let Some(start) = usize::try_from(start).ok().filter(|&s| s < self.data.len()) else {
            self.status |= STATUS_ERASE_ERROR;
            return;
        };
        if self.read_only {
            self.status |= STATUS_ERASE_ERROR;
            return;
        }
        let len = BLOCK_SIZE as usize;
        self.data[start..start + len].fill(0xff);
        self.write_through(start, len);
    }

    fn command(&mut self, offset: u64, value: u8) {
        self.mode = match (self.mode, value) {
            (Mode::Program, v) => {
                self.program(offset, v);
                Mode::ReadStatus
            }
            (Mode::EraseSetup, CMD_ERASE_CONFIRM) => {
                self.erase(offset);
                Mode::ReadStatus
            }
            // A setup not followed by its confirmation is a sequence error.
            (Mode::EraseSetup, _) => {
                self.status |= STATUS_ERASE_ERROR | STATUS_PROGRAM_ERROR;
                Mode::ReadStatus
            }
            (_, CMD_READ_ARRAY | CMD_READ_ARRAY_ALT) => Mode::ReadArray,
            (_, CMD_PROGRAM | CMD_PROGRAM_ALT) => Mode::Program,
            (_, CMD_BLOCK_ERASE) => Mode::EraseSetup,
            (_, CMD_CLEAR_STATUS) => {
                self.status = 0;
                Mode::ReadArray
            }
            (_, CMD_READ_STATUS) => Mode::ReadStatus,
            (_, CMD_READ_ID) => Mode::ReadId,
            (_, other) => {
                tracing::debug!(command = other, "flash command not decoded");
                Mode::ReadArray
            }
        };
    }
}

impl BusDevice for Pflash {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.mode {
            Mode::ReadArray => {
                for (i, b) in data.iter_mut().enumerate() {
                    *b = usize::try_from(offset)
                        .ok()
                        .and_then(|o| o.checked_add(i))
                        .and_then(|o| self.data.get(o))
                        .copied()
                        .unwrap_or(0xff);
                }
            }
            Mode::ReadId => {
                for (i, b) in data.iter_mut().enumerate() {
                    *b = match offset.wrapping_add(i as u64) {
                        0 => MANUFACTURER_ID,
                        1 => DEVICE_ID,
                        _ => 0,
                    };
                }
            }
            // While a command waits for its second cycle the status is what reads.
            Mode::ReadStatus | Mode::Program | Mode::EraseSetup => data.fill(self.status),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Commands and program data are bytes; a wider write carries its command in
        // the low byte, as a flash on an 8-bit bus sees it.
        if let Some(&value) = data.first() {
            self.command(offset, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flash(len: usize) -> Pflash {
        Pflash::new(vec![0u8; len], None, false).unwrap()
    }

    fn read8(f: &mut Pflash, at: u64) -> u8 {
        let mut b = [0u8];
        f.read(at, &mut b);
        b[0]
    }

    #[test]
    fn ovmf_probe_finds_a_flash_not_ram_or_rom() {
        let mut data = vec![0u8; 8192];
        data[40] = b'_';
        let mut f = Pflash::new(data, None, false).unwrap();
        // The probe: CLEAR STATUS must not read back as written (that is RAM)...
        let original = read8(&mut f, 40);
        f.write(40, &[CMD_CLEAR_STATUS]);
        assert_eq!(read8(&mut f, 40), original);
        // ...and READ STATUS then reads the cleared status, not the array (ROM).
        f.write(40, &[CMD_READ_STATUS]);
        assert_eq!(read8(&mut f, 40), 0x00);
        f.write(40, &[CMD_READ_ARRAY]);
        assert_eq!(read8(&mut f, 40), b'_');
    }

    #[test]
    fn program_and_erase_change_the_array_and_report_ready() {
        let mut f = flash(3 * BLOCK_SIZE as usize);
        f.write(BLOCK_SIZE + 5, &[CMD_PROGRAM]);
        f.write(BLOCK_SIZE + 5, &[0xab]);
        assert_eq!(read8(&mut f, BLOCK_SIZE + 5), STATUS_READY);
        f.write(0, &[CMD_READ_ARRAY]);
        assert_eq!(read8(&mut f, BLOCK_SIZE + 5), 0xab);
        let mut wide = [0u8; 4];
        f.read(BLOCK_SIZE + 4, &mut wide);
        assert_eq!(wide, [0, 0xab, 0, 0]);

        // Erase the middle block only.
        f.write(BLOCK_SIZE + 100, &[CMD_BLOCK_ERASE]);
        f.write(BLOCK_SIZE + 100, &[CMD_ERASE_CONFIRM]);
        assert_eq!(read8(&mut f, 0) & STATUS_READY, STATUS_READY);
        f.write(0, &[CMD_READ_ARRAY]);
        assert!(f.contents()[BLOCK_SIZE as usize..2 * BLOCK_SIZE as usize]
            .iter()
            .all(|&b| b == 0xff));
        assert_eq!(f.contents()[BLOCK_SIZE as usize - 1], 0);
        assert_eq!(f.contents()[2 * BLOCK_SIZE as usize], 0);
    }

    #[test]
    fn an_erase_without_confirmation_is_an_error_and_erases_nothing() {
        let mut f = flash(BLOCK_SIZE as usize);
        f.write(0, &[CMD_BLOCK_ERASE]);
        f.write(0, &[CMD_READ_ARRAY]);
        assert_ne!(read8(&mut f, 0) & STATUS_ERASE_ERROR, 0);
        f.write(0, &[CMD_CLEAR_STATUS]);
        assert!(f.contents().iter().all(|&b| b == 0));
        assert_eq!(read8(&mut f, 0), 0);
    }

    #[test]
    fn a_read_only_flash_refuses_changes_and_stays_alive() {
        let mut f = Pflash::new(vec![7u8; BLOCK_SIZE as usize], None, true).unwrap();
        f.write(3, &[CMD_PROGRAM]);
        f.write(3, &[1]);
        assert_ne!(read8(&mut f, 3) & STATUS_PROGRAM_ERROR, 0);
        f.write(0, &[CMD_BLOCK_ERASE]);
        f.write(0, &[CMD_ERASE_CONFIRM]);
        assert!(f.contents().iter().all(|&b| b == 7));
    }

    #[test]
    fn accesses_past_the_end_are_harmless() {
        let mut f = flash(BLOCK_SIZE as usize);
        let mut b = [0u8; 8];
        f.read(BLOCK_SIZE - 4, &mut b);
        assert_eq!(b, [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        f.read(u64::MAX, &mut b);
        f.write(u64::MAX, &[CMD_PROGRAM]);
        f.write(u64::MAX, &[0]);
        assert_ne!(read8(&mut f, 0) & STATUS_PROGRAM_ERROR, 0);
        f.write(u64::MAX, &[CMD_BLOCK_ERASE]);
        f.write(u64::MAX, &[CMD_ERASE_CONFIRM]);
        f.write(0, &[]);
        assert!(Pflash::new(vec![0; 100], None, false).is_err());
    }

    #[test]
    fn a_snapshot_restores_contents_and_command_state_and_refuses_another_size() {
        let mut f = flash(4 * BLOCK_SIZE as usize);
        f.write(BLOCK_SIZE + 3, &[CMD_PROGRAM]);
        f.write(BLOCK_SIZE + 3, &[0x42]);
        // Erased blocks are left out of the snapshot.
        f.write(3 * BLOCK_SIZE, &[CMD_BLOCK_ERASE]);
        f.write(3 * BLOCK_SIZE, &[CMD_ERASE_CONFIRM]);
        // Mid-cycle: the next write is the byte to program.
        f.write(7, &[CMD_PROGRAM]);
        let snap = f.snapshot();
        assert_eq!(snap.blocks.len(), 3);
        let json = serde_json::to_string(&snap).unwrap();
        let snap: PflashSnapshot = serde_json::from_str(&json).unwrap();

        let mut g = Pflash::new(vec![9u8; 4 * BLOCK_SIZE as usize], None, false).unwrap();
        g.restore(&snap).unwrap();
        assert_eq!(g.contents(), f.contents());
        // The program cycle goes on where it stood.
        g.write(7, &[0x99]);
        g.write(0, &[CMD_READ_ARRAY]);
        assert_eq!(read8(&mut g, 7), 0x99);
        assert_eq!(read8(&mut g, BLOCK_SIZE + 3), 0x42);
        assert_eq!(read8(&mut g, 3 * BLOCK_SIZE), 0xff);

        let mut small = flash(BLOCK_SIZE as usize);
        assert!(matches!(
            small.restore(&snap),
            Err(PflashError::SavedSize { .. })
        ));
        assert!(small.contents().iter().all(|&b| b == 0));
        let mut bad = snap.clone();
        bad.blocks[0].offset = 1;
        assert!(matches!(g.restore(&bad), Err(PflashError::SavedBlock(1))));
        bad.blocks[0].offset = 4 * BLOCK_SIZE;
        assert!(g.restore(&bad).is_err());
        bad.blocks[0].offset = 0;
        bad.blocks[0].bytes.pop();
        assert!(g.restore(&bad).is_err());
    }

    #[test]
    fn changes_are_written_through_to_the_backing_file() {
        let path = std::env::temp_dir().join(format!("vessel-pflash-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 2 * BLOCK_SIZE as usize]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let data = std::fs::read(&path).unwrap();
        let mut f = Pflash::new(data, Some(file), false).unwrap();
        f.write(10, &[CMD_PROGRAM]);
        f.write(10, &[0x5a]);
        f.write(BLOCK_SIZE, &[CMD_BLOCK_ERASE]);
        f.write(BLOCK_SIZE, &[CMD_ERASE_CONFIRM]);
        let on_disk = std::fs::read(&path).unwrap();
        // A restore changes the file only when written back.
        let mut snap = f.snapshot();
        snap.blocks.clear();
        f.restore(&snap).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), on_disk);
        f.write_back().unwrap();
        let erased = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(erased.iter().all(|&b| b == 0xff));
        assert_eq!(on_disk[10], 0x5a);
        assert_eq!(on_disk[9], 0);
        assert!(on_disk[BLOCK_SIZE as usize..].iter().all(|&b| b == 0xff));
    }
}
