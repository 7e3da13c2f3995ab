//! QEMU's firmware configuration interface (fw_cfg), the traditional port interface of
//! x86: a 16-bit selector at port 0x510 picks an item, the byte-wide data port 0x511
//! reads it from the start (QEMU's `docs/specs/fw_cfg.rst`). Firmware that runs on QEMU
//! (SeaBIOS, OVMF) finds the machine's facts here: the signature "QEMU", the feature
//! bitmap (traditional interface only: no DMA), RAM size, CPU counts, and named files
//! listed in the file directory (key 0x19) — `etc/e820`, boot order, serial console.
//!
//! Items are fixed when the VM is built; guest writes to the data port are ignored (as
//! QEMU has done since 2.4 for the port interface).

use std::collections::BTreeMap;

/// The selector port; the data port is the next one.
pub const FW_CFG_PORT: u16 = 0x510;
/// Ports the device answers on (selector word, data byte).
pub const FW_CFG_PORTS: u64 = 2;

/// Well-known keys.
pub const KEY_SIGNATURE: u16 = 0x00;
pub const KEY_ID: u16 = 0x01;
pub const KEY_RAM_SIZE: u16 = 0x03;
pub const KEY_NOGRAPHIC: u16 = 0x04;
pub const KEY_NB_CPUS: u16 = 0x05;
pub const KEY_KERNEL_ADDR: u16 = 0x07;
pub const KEY_KERNEL_SIZE: u16 = 0x08;
pub const KEY_INITRD_ADDR: u16 = 0x0a;
pub const KEY_INITRD_SIZE: u16 = 0x0b;
pub const KEY_MAX_CPUS: u16 = 0x0f;
pub const KEY_KERNEL_DATA: u16 = 0x11;
pub const KEY_INITRD_DATA: u16 = 0x12;
pub const KEY_CMDLINE_ADDR: u16 = 0x13;
pub const KEY_CMDLINE_SIZE: u16 = 0x14;
pub const KEY_CMDLINE_DATA: u16 = 0x15;
pub const KEY_SETUP_ADDR: u16 = 0x16;
pub const KEY_SETUP_SIZE: u16 = 0x17;
pub const KEY_SETUP_DATA: u16 = 0x18;
pub const KEY_FILE_DIR: u16 = 0x19;
/// Files take keys from here up.
pub const KEY_FILE_FIRST: u16 = 0x20;
/// Selector bits that are not part of the key: the obsolete write channel (bit 14).
const KEY_WRITE_CHANNEL: u16 = 0x4000;
/// FW_CFG_ID bit 0: the traditional (port) interface.
const ID_TRADITIONAL: u32 = 1;
/// A file name's room in the directory, NUL included.
pub const MAX_FILE_NAME: usize = 56;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FwCfgError {
    #[error("fw_cfg file name {0:?} is empty or longer than 55 bytes")]
    Name(String),
    #[error("fw_cfg file {0:?} exists already")]
    Duplicate(String),
    #[error("fw_cfg item of {0} bytes is too large")]
    TooLarge(usize),
    #[error("no fw_cfg keys left for more files")]
    Full,
}

/// The fw_cfg device.
#[derive(Debug, Default)]
pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    files: Vec<(String, u16)>,
    selected: u16,
    offset: usize,
}

impl FwCfg {
    /// The device with the signature, the feature bitmap and an empty file directory.
    ///
    /// ```
    /// use devices::fw_cfg::FwCfg;
    /// use devices::BusDevice;
    /// let mut f = FwCfg::new();
    /// f.write(0, &0u16.to_le_bytes());
    /// let mut sig = [0u8; 4];
    /// for b in &mut sig {
    ///     let mut d = [0u8];
    ///     f.read(1, &mut d);
    ///     *b = d[0];
    /// }
    /// assert_eq!(&sig, b"QEMU");
    /// ```
    pub fn new() -> Self {
        let mut f = FwCfg::default();
        f.items.insert(KEY_SIGNATURE, b"QEMU".to_vec());
        f.items
            .insert(KEY_ID, ID_TRADITIONAL.to_le_bytes().to_vec());
        f.items.insert(KEY_FILE_DIR, f.directory());
        f
    }

    /// Set a well-known item.
    pub fn set(&mut self, key: u16, data: Vec<u8>) {
        self.items.insert(key, data);
    }

    /// Add a named file (listed in the directory).
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<(), FwCfgError> {
        if name.is_empty() || name.len() >= MAX_FILE_NAME {
            return Err(FwCfgError::Name(name.to_string()));
        }
        if self.files.iter().any(|(n, _)| n == name) {
            return Err(FwCfgError::Duplicate(name.to_string()));
        }
        if u32::try_from(data.len()).is_err() {
            return Err(FwCfgError::TooLarge(data.len()));
        }
        let key = u16::try_from(self.files.len())
            .ok()
            .and_then(|n| KEY_FILE_FIRST.checked_add(n))
            .filter(|&k| k < KEY_WRITE_CHANNEL)
            .ok_or(FwCfgError::Full)?;
        self.items.insert(key, data);
        self.files.push((name.to_string(), key));
        let dir = self.directory();
        self.items.insert(KEY_FILE_DIR, dir);
        Ok(())
    }

    /// The file directory: a big-endian count, then 64-byte entries (big-endian size,
    /// big-endian key, two reserved bytes, the NUL-padded name), sorted by name as QEMU
    /// lists them.
    fn directory(&self) -> Vec<u8> {
        let mut files = self.files.clone();
        files.sort();
        let mut d = (files.len() as u32).to_be_bytes().to_vec();
        for (name, key) in files {
            let size = self.items.get(&key).map_or(0, Vec::len) as u32;
            d.extend_from_slice(&size.to_be_bytes());
            d.extend_from_slice(&key.to_be_bytes());
            d.extend_from_slice(&[0, 0]);
            let mut n = [0u8; MAX_FILE_NAME];
            n[..name.len()].copy_from_slice(name.as_bytes());
            d.extend_from_slice(&n);
        }
        d
    }

    fn data_byte(&mut self) -> u8 {
        let key = self.selected & !KEY_WRITE_CHANNEL;
        let b = self
            .items
            .get(&key)
            .and_then(|d| d.get(self.offset))
            .copied();
        // Past the end (or no such item): zeros, and the offset stops moving.
        match b {
            Some(b) => {
                self.offset += 1;
                b
            }
            None => 0,
        }
    }
}

impl crate::BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            // The data port: each byte read is the next byte of the item.
            1 => data.iter_mut().for_each(|b| *b = self.data_byte()),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (0, Ok(b)) = (offset, <[u8; 2]>::try_from(data)) {
            self.selected = u16::from_le_bytes(b);
            self.offset = 0;
        }
    }
}

/// QEMU's debug console port: firmware writes its log there byte by byte, and reads
/// 0xe9 back to learn the port is present.
pub const DEBUGCON_PORT: u16 = 0x402;
const DEBUGCON_READBACK: u8 = 0xe9;

/// The debug console: bytes go to a writer (a log file, or the serial output).
pub struct DebugCon {
    out: Box<dyn std::io::Write + Send>,
}

impl std::fmt::Debug for DebugCon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DebugCon")
    }
}

impl DebugCon {
    pub fn new(out: Box<dyn std::io::Write + Send>) -> Self {
        DebugCon { out }
    }
}

impl crate::BusDevice for DebugCon {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = DEBUGCON_READBACK;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            let _ = self.out.write_all(&[b]);
            if b == b'\n' {
                let _ = self.out.flush();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BusDevice;

    fn read_item(f: &mut FwCfg, key: u16, len: usize) -> Vec<u8> {
        f.write(0, &key.to_le_bytes());
        (0..len)
            .map(|_| {
                let mut b = [0u8];
                f.read(1, &mut b);
                b[0]
            })
            .collect()
    }

    #[test]
    fn items_read_from_the_start_after_each_select_and_zeros_past_the_end() {
        let mut f = FwCfg::new();
        f.set(KEY_RAM_SIZE, (256u64 << 20).to_le_bytes().to_vec());
        assert_eq!(read_item(&mut f, KEY_SIGNATURE, 6), b"QEMU\0\0");
        assert_eq!(read_item(&mut f, KEY_ID, 4), vec![1, 0, 0, 0]);
        assert_eq!(
            read_item(&mut f, KEY_RAM_SIZE, 8),
            (256u64 << 20).to_le_bytes()
        );
        assert_eq!(read_item(&mut f, 0x1234, 2), vec![0, 0], "no such item");
        // The write-channel bit selects the same item.
        assert_eq!(read_item(&mut f, KEY_SIGNATURE | 0x4000, 4), b"QEMU");
        // A wide read of the data port is successive bytes.
        f.write(0, &KEY_SIGNATURE.to_le_bytes());
        let mut w = [0u8; 4];
        f.read(1, &mut w);
        assert_eq!(&w, b"QEMU");
        // Odd accesses do nothing harmful.
        f.write(0, &[1]);
        f.write(1, &[1, 2, 3]);
        f.read(0, &mut w);
    }

    #[test]
    fn the_directory_lists_files_by_name_with_big_endian_fields() {
        let mut f = FwCfg::new();
        f.add_file("etc/sercon-port", 0x3f8u16.to_le_bytes().to_vec())
            .unwrap();
        f.add_file("etc/e820", vec![0; 40]).unwrap();
        assert_eq!(
            f.add_file("etc/e820", vec![]),
            Err(FwCfgError::Duplicate("etc/e820".into()))
        );
        assert!(f.add_file(&"x".repeat(56), vec![]).is_err());
        assert!(f.add_file("", vec![]).is_err());
        let dir = read_item(&mut f, KEY_FILE_DIR, 4 + 2 * 64);
        assert_eq!(&dir[0..4], &[0, 0, 0, 2]);
        let e = &dir[4..68];
        assert_eq!(&e[0..4], &40u32.to_be_bytes());
        assert_eq!(&e[4..6], &0x21u16.to_be_bytes());
        assert!(e[8..].starts_with(b"etc/e820\0"));
        let s = &dir[68..132];
        assert_eq!(&s[4..6], &0x20u16.to_be_bytes());
        assert!(s[8..].starts_with(b"etc/sercon-port\0"));
        assert_eq!(read_item(&mut f, 0x20, 2), vec![0xf8, 0x03]);
    }

    #[test]
    fn the_debug_console_reads_back_its_signature() {
        let mut d = DebugCon::new(Box::new(std::io::sink()));
        let mut b = [0u8];
        d.read(0, &mut b);
        assert_eq!(b[0], 0xe9);
        d.write(0, b"x");
    }
}
