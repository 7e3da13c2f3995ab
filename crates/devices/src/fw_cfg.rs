//! QEMU's firmware configuration interface (fw_cfg) on x86 (QEMU's
//! `docs/specs/fw_cfg.rst`): a 16-bit selector at port 0x510 picks an item, the
//! byte-wide data port 0x511 reads it from the start; with guest memory to reach
//! ([`FwCfg::with_dma`]), the DMA interface at 0x514 (a big-endian 64-bit address,
//! written high half then low half, of a control structure) moves whole items at once.
//! Firmware that runs on QEMU (SeaBIOS, OVMF) finds the machine's facts here: the
//! signature "QEMU", the feature bitmap, RAM size, CPU counts, and named files listed in
//! the file directory (key 0x19) — `etc/e820`, boot order, serial console.
//!
//! Items are fixed when the VM is built; guest writes to them are ignored on the data
//! port (as QEMU has done since 2.4) and refused with the error bit through DMA.

use std::collections::BTreeMap;

/// The selector port; the data port is the next one.
pub const FW_CFG_PORT: u16 = 0x510;
/// Ports the device answers on: selector word (+0), data byte (+1), DMA address
/// (+4 high half, +8 low half, both big-endian).
pub const FW_CFG_PORTS: u64 = 12;
/// The DMA address register's offsets in the port range.
const DMA_HIGH: u64 = 4;
const DMA_LOW: u64 = 8;
/// What reading the DMA address register returns: "QEMU CFG", big-endian.
const DMA_SIGNATURE: u64 = 0x5145_4d55_2043_4647;
/// FWCfgDmaAccess control bits.
const DMA_CTL_ERROR: u32 = 1 << 0;
const DMA_CTL_READ: u32 = 1 << 1;
const DMA_CTL_SKIP: u32 = 1 << 2;
const DMA_CTL_SELECT: u32 = 1 << 3;
const DMA_CTL_WRITE: u32 = 1 << 4;

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
/// FW_CFG_ID bit 0: the traditional (port) interface; bit 1: DMA.
const ID_TRADITIONAL: u32 = 1;
const ID_DMA: u32 = 1 << 1;
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

/// A guest-physical range that DMA could not reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaFault;

/// Guest memory as fw_cfg's DMA interface reaches it (the VMM's RAM map).
pub trait DmaMemory: Send + std::fmt::Debug {
    /// Fills `buf` from guest-physical `addr`.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaFault>;
    /// Writes `data` at guest-physical `addr`.
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaFault>;
}

/// The fw_cfg device.
#[derive(Debug, Default)]
pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    files: Vec<(String, u16)>,
    selected: u16,
    offset: usize,
    /// Guest memory, when the DMA interface is on.
    dma: Option<Box<dyn DmaMemory>>,
    /// The DMA address's high half, as last written.
    dma_high: u32,
}

/// Where the guest's fw_cfg access stands, for a snapshot: the selected item, the offset
/// in it, and the DMA address's high half. The items are the VM's configuration, built
/// again on restore.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FwCfgPosition {
    pub selected: u16,
    pub offset: u64,
    pub dma_high: u32,
}

impl FwCfg {
    /// The access position, for a snapshot.
    pub fn position(&self) -> FwCfgPosition {
        FwCfgPosition {
            selected: self.selected,
            offset: self.offset as u64,
            dma_high: self.dma_high,
        }
    }

    /// Puts back an access position (an offset past the item's end reads zeros).
    pub fn set_position(&mut self, p: FwCfgPosition) {
        self.selected = p.selected;
        self.offset = usize::try_from(p.offset).unwrap_or(usize::MAX);
        self.dma_high = p.dma_high;
    }
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

    /// Turn the DMA interface on, reaching guest memory through `mem` (and say so in
    /// the feature bitmap, where firmware looks).
    pub fn with_dma(mut self, mem: Box<dyn DmaMemory>) -> Self {
        self.dma = Some(mem);
        self.items
            .insert(KEY_ID, (ID_TRADITIONAL | ID_DMA).to_le_bytes().to_vec());
        self
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

    fn select(&mut self, selector: u16) {
        self.selected = selector;
        self.offset = 0;
        if tracing::enabled!(tracing::Level::TRACE) {
            let key = selector & !KEY_WRITE_CHANNEL;
            let name = self.files.iter().find(|(_, k)| *k == key).map(|(n, _)| n);
            tracing::trace!(key, ?name, "fw_cfg: item selected");
        }
    }

    /// One DMA request: the control structure at `addr` (big-endian control, length,
    /// address), carried out, then its control word rewritten: 0 when done, the error
    /// bit when it failed. A structure the device cannot read is left alone.
    fn dma_request(&mut self, mem: &dyn DmaMemory, addr: u64) {
        let mut access = [0u8; 16];
        if mem.read(addr, &mut access).is_err() {
            tracing::debug!(addr, "fw_cfg: DMA control structure outside guest memory");
            return;
        }
        let word = |at: usize| {
            u32::from_be_bytes([access[at], access[at + 1], access[at + 2], access[at + 3]])
        };
        let (control, length) = (word(0), word(4));
        let target = (u64::from(word(8)) << 32) | u64::from(word(12));
        if control & DMA_CTL_SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        let ok = if control & DMA_CTL_WRITE != 0 {
            // Every item is read-only.
            false
        } else if control & (DMA_CTL_READ | DMA_CTL_SKIP) != 0 {
            self.dma_transfer(mem, control & DMA_CTL_READ != 0, length, target)
        } else {
            true
        };
        let status = if ok { 0 } else { DMA_CTL_ERROR };
        // Nowhere to report a failure of this write either.
        let _ = mem.write(addr, &status.to_be_bytes());
    }

    /// Reads (or skips) `length` bytes of the selected item from the current offset into
    /// guest memory at `target`; past the item's end, zeros. Whether every write landed.
    fn dma_transfer(&mut self, mem: &dyn DmaMemory, read: bool, length: u32, target: u64) -> bool {
        let key = self.selected & !KEY_WRITE_CHANNEL;
        let item: &[u8] = self.items.get(&key).map_or(&[], Vec::as_slice);
        let start = self.offset.min(item.len());
        let n = (length as usize).min(item.len() - start);
        let mut ok = true;
        if read {
            ok &= mem.write(target, &item[start..start + n]).is_ok();
            // The rest of the buffer reads as zeros, written a page at a time.
            let zeros = [0u8; 4096];
            let mut at = n as u64;
            while ok && at < u64::from(length) {
                let chunk = (u64::from(length) - at).min(zeros.len() as u64) as usize;
                ok &= target
                    .checked_add(at)
                    .is_some_and(|a| mem.write(a, &zeros[..chunk]).is_ok());
                at += chunk as u64;
            }
        }
        self.offset = start + n;
        ok
    }
}

impl crate::BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            // The data port: each byte read is the next byte of the item.
            1 => data.iter_mut().for_each(|b| *b = self.data_byte()),
            // The DMA address register reads as its signature.
            DMA_HIGH..=11 if self.dma.is_some() => {
                let sig = DMA_SIGNATURE.to_be_bytes();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = usize::try_from(offset - DMA_HIGH)
                        .ok()
                        .and_then(|o| o.checked_add(i))
                        .and_then(|o| sig.get(o))
                        .copied()
                        .unwrap_or(0);
                }
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (0, 2) => self.select(u16::from_le_bytes([data[0], data[1]])),
            (DMA_HIGH, 4) => {
                self.dma_high = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
            }
            // Writing the low half starts the request.
            (DMA_LOW, 4) => {
                let low = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                let addr = (u64::from(std::mem::take(&mut self.dma_high)) << 32) | u64::from(low);
                if let Some(mem) = self.dma.take() {
                    self.dma_request(&*mem, addr);
                    self.dma = Some(mem);
                }
            }
            _ => {}
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

    /// Guest memory for DMA tests: 64 KiB from address 0.
    #[derive(Debug, Clone, Default)]
    struct Ram(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Ram {
        fn new() -> Self {
            Ram(std::sync::Arc::new(std::sync::Mutex::new(vec![
                0xaa;
                1 << 16
            ])))
        }
        fn get(&self, at: usize, len: usize) -> Vec<u8> {
            self.0.lock().unwrap()[at..at + len].to_vec()
        }
        fn put(&self, at: usize, bytes: &[u8]) {
            self.0.lock().unwrap()[at..at + bytes.len()].copy_from_slice(bytes);
        }
    }

    impl DmaMemory for Ram {
        fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
            let m = self.0.lock().unwrap();
            let at = usize::try_from(addr).map_err(|_| DmaFault)?;
            let src = m
                .get(at..at.checked_add(buf.len()).ok_or(DmaFault)?)
                .ok_or(DmaFault)?;
            buf.copy_from_slice(src);
            Ok(())
        }
        fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaFault> {
            let mut m = self.0.lock().unwrap();
            let at = usize::try_from(addr).map_err(|_| DmaFault)?;
            let dst = m
                .get_mut(at..at.checked_add(data.len()).ok_or(DmaFault)?)
                .ok_or(DmaFault)?;
            dst.copy_from_slice(data);
            Ok(())
        }
    }

    /// Writes a control structure at 0x100 and starts it; returns the control word
    /// the device left.
    fn dma(f: &mut FwCfg, ram: &Ram, control: u32, len: u32, target: u64) -> u32 {
        let mut access = control.to_be_bytes().to_vec();
        access.extend_from_slice(&len.to_be_bytes());
        access.extend_from_slice(&target.to_be_bytes());
        ram.put(0x100, &access);
        f.write(DMA_HIGH, &0u32.to_be_bytes());
        f.write(DMA_LOW, &0x100u32.to_be_bytes());
        u32::from_be_bytes(ram.get(0x100, 4).try_into().unwrap())
    }

    #[test]
    fn dma_selects_reads_skips_and_zero_fills_and_refuses_writes() {
        let ram = Ram::new();
        let mut plain = FwCfg::new();
        // Without guest memory: no DMA bit, no signature, writes to the register inert.
        assert_eq!(
            read_item(&mut plain, KEY_ID, 4),
            ID_TRADITIONAL.to_le_bytes()
        );
        let mut sig = [0u8; 4];
        plain.read(DMA_HIGH, &mut sig);
        assert_eq!(sig, [0; 4]);

        let mut f = FwCfg::new().with_dma(Box::new(ram.clone()));
        f.add_file("etc/thing", (0u8..100).collect()).unwrap();
        let key = KEY_FILE_FIRST;
        assert_eq!(
            read_item(&mut f, KEY_ID, 4),
            (ID_TRADITIONAL | ID_DMA).to_le_bytes()
        );
        let mut sig = [0u8; 8];
        f.read(DMA_HIGH, &mut sig[..4]);
        f.read(DMA_LOW, &mut sig[4..]);
        assert_eq!(&sig, b"QEMU CFG");

        // Select and read 10 bytes, skip 20, read on past the end: zeros there.
        let sel = (u32::from(key) << 16) | DMA_CTL_SELECT;
        assert_eq!(dma(&mut f, &ram, sel | DMA_CTL_READ, 10, 0x1000), 0);
        assert_eq!(ram.get(0x1000, 10), (0u8..10).collect::<Vec<_>>());
        assert_eq!(ram.get(0x100a, 1), [0xaa], "nothing past the length");
        assert_eq!(dma(&mut f, &ram, DMA_CTL_SKIP, 20, 0), 0);
        assert_eq!(dma(&mut f, &ram, DMA_CTL_READ, 6000, 0x2000), 0);
        assert_eq!(ram.get(0x2000, 70), (30u8..100).collect::<Vec<_>>());
        assert!(ram.get(0x2000 + 70, 6000 - 70).iter().all(|&b| b == 0));
        assert_eq!(ram.get(0x2000 + 6000, 1), [0xaa]);
        // The traditional port goes on from where DMA left off: the end.
        let mut b = [0xffu8];
        f.read(1, &mut b);
        assert_eq!(b, [0]);

        // Writes are refused; so is a target outside memory (error bit, no panic).
        assert_eq!(
            dma(&mut f, &ram, sel | DMA_CTL_WRITE, 4, 0x3000),
            DMA_CTL_ERROR
        );
        assert_eq!(ram.get(0x8000, 4), [0xaa; 4]);
        assert_eq!(
            dma(&mut f, &ram, sel | DMA_CTL_READ, 100, 1 << 40),
            DMA_CTL_ERROR
        );
        assert_eq!(
            dma(&mut f, &ram, sel | DMA_CTL_READ, u32::MAX, 0xff00),
            DMA_CTL_ERROR
        );
        // A control structure outside memory is ignored; odd-sized writes do nothing.
        f.write(DMA_HIGH, &1u32.to_be_bytes());
        f.write(DMA_LOW, &0u32.to_be_bytes());
        f.write(DMA_LOW, &[1, 2]);
        f.write(DMA_HIGH + 1, &[1, 2, 3, 4]);
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
