//! SMBIOS (DMTF DSP0134, version 2.8 structures behind a 2.1 "_SM_" entry point): what
//! `dmidecode`, `/sys/class/dmi/id`, systemd and cloud-init read to learn who made the
//! machine and which machine it is (the system UUID).
//!
//! Vessel hands the tables to the firmware the way QEMU does, as two fw_cfg files:
//! `etc/smbios/smbios-tables` (the structures) and `etc/smbios/smbios-anchor` (the
//! 31-byte entry point, its table address left zero). SeaBIOS copies the structures into
//! its own memory, adds its type 0 (BIOS information), fixes the address and checksums,
//! and places the entry point in the F segment where the guest's kernel finds it.

/// Who the guest sees as the system's maker and what it sees as the product.
pub const MANUFACTURER: &str = "Vessel";
pub const PRODUCT: &str = "Vessel Virtual Machine";

/// Structure types.
const TYPE_SYSTEM: u8 = 1;
const TYPE_CHASSIS: u8 = 3;
const TYPE_END: u8 = 127;
/// Type 1's formatted length in SMBIOS 2.4 and later (with SKU and family).
const SYSTEM_LEN: u8 = 0x1b;
/// Type 3's formatted length through the contained-element fields (none), SMBIOS 2.3+.
const CHASSIS_LEN: u8 = 0x15;
/// Type 1's wake-up type "power switch".
const WAKE_POWER_SWITCH: u8 = 6;
/// Type 3's chassis type "other", and the safe state (3) for its state fields.
const CHASSIS_OTHER: u8 = 1;
const STATE_SAFE: u8 = 3;
/// The 2.1 entry point's size and the version the structures follow.
pub const ENTRY_POINT_LEN: usize = 0x1f;
const VERSION: (u8, u8) = (2, 8);

/// What the tables say about this VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmbiosInfo {
    /// The system UUID (the domain's UUID), in RFC 4122 byte order.
    pub uuid: Option<[u8; 16]>,
    /// The VM's name, as the system serial number (cloud-init and `dmidecode` show it).
    pub serial: Option<String>,
}

/// Parses "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" (either case) into RFC 4122 byte
/// order; None for anything else.
///
/// ```
/// let u = arch::smbios::parse_uuid("00112233-4455-6677-8899-AABBCCDDEEFF").unwrap();
/// assert_eq!(u[0], 0x00);
/// assert_eq!(u[15], 0xff);
/// assert!(arch::smbios::parse_uuid("0011223344556677-8899-aabbccddeeff").is_none());
/// ```
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b.get(i) != Some(&b'-')) {
        return None;
    }
    let hex: Vec<u8> = b.iter().copied().filter(|&c| c != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// A structure's strings: appended in order, referred to by 1-based index (0 = none).
#[derive(Default)]
struct Strings(Vec<u8>);

impl Strings {
    fn add(&mut self, s: &str) -> u8 {
        // Strings are NUL-terminated: a NUL inside would cut it (and shift the rest).
        let clean: String = s.chars().filter(|&c| c != '\0').take(64).collect();
        if clean.is_empty() {
            return 0;
        }
        self.0.extend_from_slice(clean.as_bytes());
        self.0.push(0);
        u8::try_from(self.0.iter().filter(|&&c| c == 0).count()).unwrap_or(0)
    }

    /// The string set as stored after the formatted area: a structure without strings
    /// still ends in two NULs.
    fn finish(mut self) -> Vec<u8> {
        if self.0.is_empty() {
            self.0.push(0);
        }
        self.0.push(0);
        self.0
    }
}

fn system(info: &SmbiosInfo, handle: u16) -> Vec<u8> {
    let mut s = Strings::default();
    let mut t = vec![TYPE_SYSTEM, SYSTEM_LEN];
    t.extend_from_slice(&handle.to_le_bytes());
    t.push(s.add(MANUFACTURER));
    t.push(s.add(PRODUCT));
    t.push(s.add(env!("CARGO_PKG_VERSION")));
    t.push(s.add(info.serial.as_deref().unwrap_or("")));
    // Since SMBIOS 2.6 the first three UUID fields are stored little-endian.
    let mut u = info.uuid.unwrap_or([0; 16]);
    u[0..4].reverse();
    u[4..6].reverse();
    u[6..8].reverse();
    t.extend_from_slice(&u);
    t.push(WAKE_POWER_SWITCH);
    t.push(0); // SKU
    t.push(s.add(MANUFACTURER)); // family
    debug_assert_eq!(t.len(), usize::from(SYSTEM_LEN));
    t.extend_from_slice(&s.finish());
    t
}

fn chassis(handle: u16) -> Vec<u8> {
    let mut s = Strings::default();
    let mut t = vec![TYPE_CHASSIS, CHASSIS_LEN];
    t.extend_from_slice(&handle.to_le_bytes());
    t.push(s.add(MANUFACTURER));
    t.push(CHASSIS_OTHER);
    t.extend_from_slice(&[0, 0, 0]); // version, serial, asset tag: none
    t.extend_from_slice(&[STATE_SAFE, STATE_SAFE, STATE_SAFE]); // boot-up, power, thermal
    t.push(2); // security status: unknown
    t.extend_from_slice(&[0; 4]); // OEM-defined
    t.extend_from_slice(&[0, 0, 0, 0]); // height, power cords, contained count and size
    debug_assert_eq!(t.len(), usize::from(CHASSIS_LEN));
    t.extend_from_slice(&s.finish());
    t
}

fn end(handle: u16) -> Vec<u8> {
    let mut t = vec![TYPE_END, 4];
    t.extend_from_slice(&handle.to_le_bytes());
    t.extend_from_slice(&[0, 0]);
    t
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, &b| a.wrapping_add(b))
        .wrapping_neg()
}

/// The structures and the 2.1 entry point describing them (structure table address 0,
/// for the firmware to fill): the contents of `etc/smbios/smbios-tables` and
/// `etc/smbios/smbios-anchor`.
///
/// ```
/// use arch::smbios::{tables, SmbiosInfo, ENTRY_POINT_LEN};
/// let (t, ep) = tables(&SmbiosInfo { uuid: None, serial: Some("web1".into()) });
/// assert_eq!(ep.len(), ENTRY_POINT_LEN);
/// assert_eq!(&ep[0..4], b"_SM_");
/// assert_eq!(u16::from_le_bytes([ep[0x16], ep[0x17]]) as usize, t.len());
/// ```
pub fn tables(info: &SmbiosInfo) -> (Vec<u8>, Vec<u8>) {
    let structures = [system(info, 0x100), chassis(0x300), end(0x7f00)];
    let max = structures.iter().map(Vec::len).max().unwrap_or(0);
    let table: Vec<u8> = structures.concat();
    let mut ep = vec![0u8; ENTRY_POINT_LEN];
    ep[0..4].copy_from_slice(b"_SM_");
    ep[5] = ENTRY_POINT_LEN as u8;
    ep[6] = VERSION.0;
    ep[7] = VERSION.1;
    ep[8..10].copy_from_slice(&u16::try_from(max).unwrap_or(u16::MAX).to_le_bytes());
    ep[0x10..0x15].copy_from_slice(b"_DMI_");
    ep[0x16..0x18].copy_from_slice(&u16::try_from(table.len()).unwrap_or(u16::MAX).to_le_bytes());
    // 0x18..0x1c: the structure table's address, the firmware's to fill.
    ep[0x1c..0x1e].copy_from_slice(&(structures.len() as u16).to_le_bytes());
    ep[0x1e] = (VERSION.0 << 4) | VERSION.1;
    ep[0x15] = checksum(&ep[0x10..]);
    ep[4] = checksum(&ep);
    (table, ep)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the structure table: (type, formatted bytes, strings) for each structure.
    fn walk(mut t: &[u8]) -> Vec<(u8, Vec<u8>, Vec<String>)> {
        let mut out = Vec::new();
        while !t.is_empty() {
            let len = t[1] as usize;
            let formatted = t[..len].to_vec();
            let rest = &t[len..];
            let end = rest.windows(2).position(|w| w == [0, 0]).unwrap();
            let strings = rest[..end]
                .split(|&c| c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8(s.to_vec()).unwrap())
                .collect();
            out.push((formatted[0], formatted, strings));
            t = &rest[end + 2..];
        }
        out
    }

    #[test]
    fn the_system_structure_carries_vendor_product_serial_and_the_uuid() {
        let uuid = parse_uuid("6f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0").unwrap();
        let (t, ep) = tables(&SmbiosInfo {
            uuid: Some(uuid),
            serial: Some("web1".into()),
        });
        let s = walk(&t);
        assert_eq!(
            s.iter().map(|x| x.0).collect::<Vec<_>>(),
            [TYPE_SYSTEM, TYPE_CHASSIS, TYPE_END]
        );
        let (_, f, strings) = &s[0];
        assert_eq!(strings[usize::from(f[4]) - 1], MANUFACTURER);
        assert_eq!(strings[usize::from(f[5]) - 1], PRODUCT);
        assert_eq!(strings[usize::from(f[7]) - 1], "web1");
        // Little-endian first three fields, as Linux's product_uuid decodes them.
        assert_eq!(
            &f[8..24],
            &[
                0x3c, 0x2d, 0x1e, 0x6f, 0x5a, 0x4b, 0x78, 0x69, 0x87, 0x96, 0xa5, 0xb4, 0xc3, 0xd2,
                0xe1, 0xf0
            ]
        );
        assert_eq!(ep[0x1c], 3, "three structures");
        // The largest structure, strings included, is the system structure.
        let info = SmbiosInfo {
            uuid: Some(uuid),
            serial: Some("web1".into()),
        };
        assert_eq!(
            usize::from(u16::from_le_bytes([ep[8], ep[9]])),
            system(&info, 0x100).len()
        );
    }

    #[test]
    fn the_entry_point_checksums_and_lengths_hold() {
        let (t, ep) = tables(&SmbiosInfo {
            uuid: None,
            serial: None,
        });
        assert_eq!(ep.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        assert_eq!(ep[0x10..].iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        assert_eq!(&ep[0x10..0x15], b"_DMI_");
        assert_eq!(
            usize::from(u16::from_le_bytes([ep[0x16], ep[0x17]])),
            t.len()
        );
        assert_eq!(&ep[0x18..0x1c], &[0; 4], "the firmware places the table");
        // A structure without strings still ends in two NULs.
        let s = walk(&t);
        assert!(s[0].2.len() >= 2 && s[2].2.is_empty());
    }

    #[test]
    fn hostile_strings_and_uuids_are_contained() {
        for bad in [
            "",
            "6f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f",
            "6f1e2d3c+4b5a-6978-8796-a5b4c3d2e1f0",
            "6f1e2d3c-4b5a-6978-8796-a5b4c3d2e1fg",
            "6f1e2d3c-4b5a-6978-8796-a5b4c3d2é1",
        ] {
            assert!(parse_uuid(bad).is_none(), "{bad:?}");
        }
        let (t, _) = tables(&SmbiosInfo {
            uuid: None,
            serial: Some("a\0b".repeat(100)),
        });
        let s = walk(&t);
        let (_, f, strings) = &s[0];
        assert_eq!(strings[usize::from(f[7]) - 1], "ab".repeat(32));
    }
}
