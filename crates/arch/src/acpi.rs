//! ACPI tables: RSDP, XSDT, FADT, MADT, MCFG, DSDT.
//!
//! Debian's cloud kernel has no MP-table parser, so ACPI is how it finds CPUs, the IOAPIC,
//! virtio-mmio devices and how to power off. The platform is *hardware-reduced* ACPI, as
//! Cloud Hypervisor and Firecracker present it: no SCI, no PM1 blocks, no FACS; power-off
//! goes through the FADT sleep control register and reset through its reset register.
//!
//! Events the host raises (the power button) come through a Generic Event Device
//! (`ACPI0013`): its interrupt makes the guest run its `_EVT` method, which reads the
//! event register at [`GED_PORT`] (reading clears it) and notifies the power button
//! device (`PNP0C0C`) for bit [`GED_EVENT_POWER_BUTTON`]. Linux's built-in `evged` driver
//! serves the GED; its `button` driver turns the notification into KEY_POWER.

use acpi_tables::{aml, sdt::Sdt, Aml, AmlSink};

use crate::layout::{
    APIC_START, IOAPIC_START, PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO_SIZE, PCI_MMIO_START,
};

/// The I/O ports the VMM's power-management device answers on.
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
pub const SLEEP_STATUS_PORT: u16 = 0x601;
pub const RESET_PORT: u16 = 0x602;
/// The value the guest writes to RESET_PORT to reset.
pub const RESET_VALUE: u8 = 0x1;
/// The SLP_TYP of S5 (soft off) we publish in `\_S5_`.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Sleep control register: SLP_EN and the SLP_TYP field.
pub const SLEEP_CONTROL_SLP_EN: u8 = 1 << 5;
pub const SLEEP_CONTROL_SLP_TYP_SHIFT: u8 = 2;

/// COM1, which the DSDT describes so Linux routes its interrupt.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_GSI: u32 = 4;

/// The CMOS RTC (MC146818): index/data ports and its ISA interrupt.
pub const RTC_PORT: u16 = 0x70;
pub const RTC_GSI: u32 = 8;
/// The CMOS byte that holds the century, as the FADT's CENTURY field names it.
pub const RTC_CENTURY_INDEX: u8 = 0x32;

/// A full (not hardware-reduced) platform's PM1a event block (PM1_STS, PM1_EN: two
/// 16-bit registers) and PM1a control block (PM1_CNT), and its SCI's interrupt.
pub const PM1A_EVT_PORT: u16 = 0x620;
pub const PM1A_CNT_PORT: u16 = 0x624;
pub const SCI_GSI: u16 = 9;
/// A full platform's GPE0 block (GPE0_STS, GPE0_EN: 16 events each), which drives the
/// SCI, and the events in it.
pub const GPE0_PORT: u16 = 0x630;
pub const GPE0_LEN: u8 = 4;
/// The power button's GPE: `\_GPE._E00` notifies `\_SB.PWRB`.
pub const GPE_POWER_BUTTON: u8 = 0;

/// The Generic Event Device's event register (one byte, read clears it).
pub const GED_PORT: u16 = 0x610;
/// The GED's interrupt: an ISA line nothing else uses (16..23 belong to virtio-mmio).
pub const GED_GSI: u32 = 5;
/// Event register bit: the power button was pressed.
pub const GED_EVENT_POWER_BUTTON: u8 = 1 << 0;
/// The Notify value ACPI defines for a button press (`ACPI_BUTTON_NOTIFY_STATUS`).
const BUTTON_NOTIFY_STATUS: u8 = 0x80;

/// A virtio-mmio device as the DSDT describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}

/// The PCI host bridge as the tables describe it: ECAM (MCFG), the bridge with its
/// windows (`PCI0`, `PNP0A08`) and where each slot's INTA#..INTD# arrive (`_PRT`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciHost {
    /// (slot, GSI): every pin of the slot's function goes to that one GSI (level,
    /// active low, as PCI lines are).
    pub intx: Vec<(u8, u32)>,
    /// Where bus 0's ECAM is (MCFG, and the motherboard resource reserving it).
    pub ecam_base: u64,
    /// The 32-bit memory window BARs are placed in: (start, size).
    pub mmio_window: (u64, u64),
}

impl PciHost {
    /// The host bridge at the places [`crate::layout`] gives it.
    pub fn new(intx: Vec<(u8, u32)>) -> Self {
        PciHost {
            intx,
            ecam_base: PCI_ECAM_START,
            mmio_window: (PCI_MMIO_START, PCI_MMIO_SIZE),
        }
    }
}

/// What the tables describe.
#[derive(Clone, Debug, Default)]
pub struct AcpiConfig {
    pub cpus: u8,
    pub virtio_devices: Vec<VirtioMmioDevice>,
    /// The PCI host bridge, if the machine has one.
    pub pci: Option<PciHost>,
    /// A full ACPI platform (PM1 blocks, SCI, FACS) instead of a hardware-reduced one:
    /// for machines booted through firmware, which leaves the legacy 8259 programmed —
    /// on a hardware-reduced platform Linux assumes there is none and never masks it.
    pub full: bool,
}

const OEM_ID: [u8; 6] = *b"VESSEL";
const OEM_TABLE: [u8; 8] = *b"VESSELVM";

/// The tables before they have an address: the RSDP, and XSDT | FADT | MADT | [MCFG] |
/// DSDT in one blob whose pointers (and the RSDP's XSDT pointer) hold offsets into the
/// blob. Whoever places the blob adds its address to each pointer and recomputes the
/// checksums: the VMM for direct boot ([`build_tables`]), firmware through the table
/// loader for firmware boot ([`table_loader`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relocatable {
    pub rsdp: [u8; 36],
    pub tables: Vec<u8>,
    /// Offsets in `tables` of the 64-bit pointers to other tables in `tables`.
    pub pointers: Vec<usize>,
    /// (offset, length) of each table in `tables` (its checksum byte is at offset 9).
    pub sdts: Vec<(usize, usize)>,
}

/// Offset of the XSDT address in the RSDP, and of the checksums.
const RSDP_XSDT: usize = 24;
const RSDP_CHECKSUM: usize = 8;
const RSDP_EXT_CHECKSUM: usize = 32;
/// The FADT's X_DSDT and X_FIRMWARE_CTRL (the FACS) fields.
const FADT_X_DSDT: usize = 140;
const FADT_X_FIRMWARE_CTRL: usize = 132;
/// The FACS's size (it has no checksum).
const FACS_LEN: usize = 64;

/// The Firmware ACPI Control Structure a full platform needs: signature, length, no
/// hardware signature, no waking vector, version 2.
fn facs() -> [u8; FACS_LEN] {
    let mut f = [0u8; FACS_LEN];
    f[0..4].copy_from_slice(b"FACS");
    f[4..8].copy_from_slice(&(FACS_LEN as u32).to_le_bytes());
    f[32] = 2;
    f
}
/// An SDT's checksum byte.
const SDT_CHECKSUM: usize = 9;

/// The tables, with offsets in place of addresses.
pub fn relocatable_tables(cfg: &AcpiConfig) -> Relocatable {
    let dsdt = dsdt(cfg);
    let madt = madt(cfg);
    let mcfg = cfg.pci.as_ref().map(mcfg);
    let xsdt_len = 36 + 8 * (2 + usize::from(mcfg.is_some()));
    // A full platform's FACS goes first: it must be 64-byte aligned, and the blob is.
    let facs_len = if cfg.full { FACS_LEN } else { 0 };
    let xsdt_at = facs_len;
    let fadt_at = xsdt_at + xsdt_len;
    let fadt_len = 276;
    let madt_at = fadt_at + fadt_len;
    let mcfg_at = madt_at + madt.len();
    let dsdt_at = mcfg_at + mcfg.as_ref().map_or(0, |m| m.len());
    let fadt = fadt(cfg, dsdt_at as u64);
    let mut xsdt = Sdt::new(*b"XSDT", 36, 1, OEM_ID, OEM_TABLE, 1);
    xsdt.append(fadt_at as u64);
    xsdt.append(madt_at as u64);
    if mcfg.is_some() {
        xsdt.append(mcfg_at as u64);
    }
    let mut tables = Vec::new();
    if cfg.full {
        tables.extend_from_slice(&facs());
    }
    let mut sdts = Vec::new();
    let mut add = |t: &[u8]| {
        sdts.push((tables.len(), t.len()));
        tables.extend_from_slice(t);
    };
    add(xsdt.as_slice());
    add(fadt.as_slice());
    add(&madt);
    if let Some(m) = &mcfg {
        add(m.as_slice());
    }
    add(dsdt.as_slice());
    let mut pointers: Vec<usize> = (xsdt_at + 36..xsdt_at + xsdt_len).step_by(8).collect();
    pointers.push(fadt_at + FADT_X_DSDT);
    if cfg.full {
        // The FACS is at offset 0: X_FIRMWARE_CTRL holds 0 plus the blob's address.
        pointers.push(fadt_at + FADT_X_FIRMWARE_CTRL);
    }
    Relocatable {
        rsdp: rsdp(xsdt_at as u64),
        tables,
        pointers,
        sdts,
    }
}

fn add_u64(bytes: &mut [u8], at: usize, delta: u64) {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    let v = u64::from_le_bytes(b).wrapping_add(delta);
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// The tables, laid out for `base`: RSDP (padded to 64 bytes) then the rest; the RSDP
/// is at `base`.
pub fn build_tables(cfg: &AcpiConfig, base: u64) -> Vec<u8> {
    let mut r = relocatable_tables(cfg);
    let tables_at = base + 64;
    for &p in &r.pointers {
        add_u64(&mut r.tables, p, tables_at);
    }
    for &(at, len) in &r.sdts {
        r.tables[at + SDT_CHECKSUM] = 0;
        r.tables[at + SDT_CHECKSUM] = checksum(&r.tables[at..at + len]);
    }
    let mut rsdp = r.rsdp;
    add_u64(&mut rsdp, RSDP_XSDT, tables_at);
    for (at, len) in [(RSDP_CHECKSUM, 20), (RSDP_EXT_CHECKSUM, 36)] {
        rsdp[at] = 0;
        rsdp[at] = checksum(&rsdp[..len]);
    }
    let mut out = rsdp.to_vec();
    out.resize(64, 0);
    out.extend_from_slice(&r.tables);
    out
}

/// fw_cfg file names of QEMU's ACPI table loader, which SeaBIOS and OVMF run.
pub const LOADER_FILE: &str = "etc/table-loader";
pub const LOADER_RSDP_FILE: &str = "etc/acpi/rsdp";
pub const LOADER_TABLES_FILE: &str = "etc/acpi/tables";

/// Table-loader commands: 128 bytes each, a little-endian command word then its
/// arguments (file names NUL-padded to 56 bytes).
const LOADER_ENTRY: usize = 128;
const LOADER_NAME: usize = 56;
const LOADER_ALLOCATE: u32 = 1;
const LOADER_ADD_POINTER: u32 = 2;
const LOADER_ADD_CHECKSUM: u32 = 3;
/// Allocation zones: anywhere in high memory, or the F segment (the RSDP, which an OS
/// scans for below 1 MiB).
const ZONE_HIGH: u8 = 1;
const ZONE_FSEG: u8 = 2;

struct Loader(Vec<u8>);

impl Loader {
    fn entry(&mut self, command: u32, args: &[&[u8]]) {
        let mut e = vec![0u8; LOADER_ENTRY];
        e[0..4].copy_from_slice(&command.to_le_bytes());
        let mut at = 4;
        for a in args {
            e[at..at + a.len()].copy_from_slice(a);
            at += a.len();
        }
        self.0.extend_from_slice(&e);
    }
}

fn loader_name(name: &str) -> [u8; LOADER_NAME] {
    let mut n = [0u8; LOADER_NAME];
    n[..name.len()].copy_from_slice(name.as_bytes());
    n
}

/// What firmware needs to install the tables itself (QEMU's BIOS linker/loader): the
/// RSDP and table blobs for [`LOADER_RSDP_FILE`] and [`LOADER_TABLES_FILE`], and the
/// commands for [`LOADER_FILE`]: allocate both, add the tables' address to every
/// pointer, then fix every checksum.
pub fn table_loader(cfg: &AcpiConfig) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let mut r = relocatable_tables(cfg);
    // Every checksum byte starts at zero: OVMF stores the checksum of the range, which
    // includes the byte itself (SeaBIOS subtracts it from what is there, which gives
    // the same result from zero).
    for &(at, _) in &r.sdts {
        r.tables[at + SDT_CHECKSUM] = 0;
    }
    r.rsdp[RSDP_CHECKSUM] = 0;
    r.rsdp[RSDP_EXT_CHECKSUM] = 0;
    let rsdp_name = loader_name(LOADER_RSDP_FILE);
    let tables_name = loader_name(LOADER_TABLES_FILE);
    let mut l = Loader(Vec::new());
    l.entry(
        LOADER_ALLOCATE,
        &[&rsdp_name, &16u32.to_le_bytes(), &[ZONE_FSEG]],
    );
    l.entry(
        LOADER_ALLOCATE,
        &[&tables_name, &64u32.to_le_bytes(), &[ZONE_HIGH]],
    );
    for &p in &r.pointers {
        l.entry(
            LOADER_ADD_POINTER,
            &[&tables_name, &tables_name, &(p as u32).to_le_bytes(), &[8]],
        );
    }
    l.entry(
        LOADER_ADD_POINTER,
        &[
            &rsdp_name,
            &tables_name,
            &(RSDP_XSDT as u32).to_le_bytes(),
            &[8],
        ],
    );
    for &(at, len) in &r.sdts {
        l.entry(
            LOADER_ADD_CHECKSUM,
            &[
                &tables_name,
                &((at + SDT_CHECKSUM) as u32).to_le_bytes(),
                &(at as u32).to_le_bytes(),
                &(len as u32).to_le_bytes(),
            ],
        );
    }
    for (at, len) in [(RSDP_CHECKSUM, 20u32), (RSDP_EXT_CHECKSUM, 36)] {
        l.entry(
            LOADER_ADD_CHECKSUM,
            &[
                &rsdp_name,
                &(at as u32).to_le_bytes(),
                &0u32.to_le_bytes(),
                &len.to_le_bytes(),
            ],
        );
    }
    (r.rsdp.to_vec(), r.tables, l.0)
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

fn rsdp(xsdt_addr: u64) -> [u8; 36] {
    let mut r = [0u8; 36];
    r[0..8].copy_from_slice(b"RSD PTR ");
    r[9..15].copy_from_slice(&OEM_ID);
    r[15] = 2; // revision: ACPI 2.0+, XSDT valid
    r[20..24].copy_from_slice(&36u32.to_le_bytes());
    r[24..32].copy_from_slice(&xsdt_addr.to_le_bytes());
    r[8] = checksum(&r[0..20]);
    r[32] = checksum(&r);
    r
}

/// A Generic Address Structure in system I/O space.
fn gas_io(port: u16, bits: u8) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O
    g[1] = bits;
    g[3] = 1; // byte access
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

fn fadt(cfg: &AcpiConfig, dsdt_addr: u64) -> Sdt {
    let mut f = Sdt::new(*b"FACP", 276, 6, OEM_ID, OEM_TABLE, 1);
    // CENTURY: the CMOS byte with the century (the RTC emulates it).
    f.write_u8(108, RTC_CENTURY_INDEX);
    // IAPC_BOOT_ARCH: no VGA (bit 2). The CMOS RTC is there (bit 5 clear) and described
    // in the DSDT. No 8042 bit: Linux would probe a keyboard controller we only emulate
    // for its reset line.
    f.write_u16(109, 1 << 2);
    // Flags: WBINVD, PROC_C1, PWR_BUTTON and SLP_BUTTON (set: no fixed-feature buttons;
    // the power button is the DSDT's control-method device), RESET_REG_SUP, and
    // HW_REDUCED_ACPI unless the platform is a full one.
    let mut flags: u32 = 1 | (1 << 2) | (1 << 4) | (1 << 5) | (1 << 10);
    if cfg.full {
        // SCI_INT; SMI_CMD stays 0 (always in ACPI mode); the PM1a blocks, 32-bit
        // and extended.
        f.write_u16(46, SCI_GSI);
        f.write_u32(56, u32::from(PM1A_EVT_PORT));
        f.write_u32(64, u32::from(PM1A_CNT_PORT));
        f.write_u8(88, 4);
        f.write_u8(89, 2);
        f.write_bytes(148, &gas_io(PM1A_EVT_PORT, 32));
        f.write_bytes(172, &gas_io(PM1A_CNT_PORT, 16));
        // GPE0_BLK and its length, 32-bit and extended.
        f.write_u32(80, u32::from(GPE0_PORT));
        f.write_u8(92, GPE0_LEN);
        f.write_bytes(220, &gas_io(GPE0_PORT, 8 * GPE0_LEN));
    } else {
        flags |= 1 << 20;
    }
    f.write_u32(112, flags);
    f.write_bytes(116, &gas_io(RESET_PORT, 8));
    f.write_u8(128, RESET_VALUE);
    f.write_u8(131, 3); // FADT minor version (6.3)
    f.write_u64(140, dsdt_addr);
    f.write_bytes(244, &gas_io(SLEEP_CONTROL_PORT, 8));
    f.write_bytes(256, &gas_io(SLEEP_STATUS_PORT, 8));
    f.write_bytes(268, b"VESSELVM");
    f
}

fn madt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut m = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE, 1);
    m.write_u32(36, APIC_START as u32);
    m.write_u32(40, 1); // PCAT_COMPAT: there is a dual 8259 to mask
    let mut body = Vec::new();
    for id in 0..cfg.cpus {
        // Processor Local APIC: uid, APIC id, enabled.
        body.extend_from_slice(&[0, 8, id, id, 1, 0, 0, 0]);
    }
    // I/O APIC: id, reserved, address, GSI base.
    body.extend_from_slice(&[1, 12, 0, 0]);
    body.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    // ISA IRQ 0 (the PIT) arrives on GSI 2, edge, active high, as on every PC.
    body.extend_from_slice(&[2, 10, 0, 0]);
    body.extend_from_slice(&2u32.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    if cfg.full {
        // The SCI on ISA IRQ 9 = GSI 9, level-triggered and active high, as QEMU's q35
        // describes it (without this entry Linux takes an SCI as level and active low).
        body.extend_from_slice(&[2, 10, 0, SCI_GSI as u8]);
        body.extend_from_slice(&u32::from(SCI_GSI).to_le_bytes());
        body.extend_from_slice(&0x000du16.to_le_bytes());
    }
    // Local APIC NMI: all processors, LINT1.
    body.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    m.append_slice(&body);
    m.as_slice().to_vec()
}

/// MCFG: one ECAM allocation, segment 0, bus 0 only.
fn mcfg(pci: &PciHost) -> Sdt {
    let mut m = Sdt::new(*b"MCFG", 44, 1, OEM_ID, OEM_TABLE, 1);
    let mut entry = Vec::with_capacity(16);
    entry.extend_from_slice(&pci.ecam_base.to_le_bytes());
    entry.extend_from_slice(&0u16.to_le_bytes()); // PCI segment group
    entry.extend_from_slice(&[0, 0]); // start and end bus
    entry.extend_from_slice(&0u32.to_le_bytes());
    m.append_slice(&entry);
    m
}

/// The host bridge `\_SB.PCI0` (PCI Express root, `PNP0A08`, compatible with
/// `PNP0A03`): bus 0, the configuration ports, all other I/O ports and the 32-bit
/// memory window as its resources, and the `_PRT` routing each slot's interrupt pins
/// to a GSI. Then `\_SB.MRES` (`PNP0C02`, motherboard resources) reserving ECAM, which
/// Linux requires before it trusts MCFG.
fn pci_host(pci: &PciHost, sink: &mut dyn AmlSink) {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08"));
    let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"));
    let adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let buses = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let cfg_ports = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = aml::AddressSpace::new_io(0u16, 0x0cf7u16, None);
    let io_high = aml::AddressSpace::new_io(0x0d00u16, 0xffffu16, None);
    let mem = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        pci.mmio_window.0 as u32,
        (pci.mmio_window.0 + pci.mmio_window.1 - 1) as u32,
        None,
    );
    let crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![&buses, &cfg_ports, &io_low, &io_high, &mem]),
    );
    // _PRT: Package { Address (slot << 16 | 0xffff), Pin (0 = INTA#), Source (0: a
    // GSI), Source Index (the GSI) } per slot and pin.
    let entries: Vec<(u32, u8, u32)> = pci
        .intx
        .iter()
        .flat_map(|&(slot, gsi)| {
            (0u8..4).map(move |pin| ((u32::from(slot) << 16) | 0xffff, pin, gsi))
        })
        .collect();
    let packages: Vec<aml::Package> = entries
        .iter()
        .map(|(addr, pin, gsi)| aml::Package::new(vec![addr, pin, &aml::ZERO, gsi]))
        .collect();
    let prt_items: Vec<&dyn Aml> = packages.iter().map(|p| p as &dyn Aml).collect();
    let prt = aml::Name::new("_PRT".into(), &aml::Package::new(prt_items));
    aml::Device::new(
        "_SB_.PCI0".into(),
        vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs, &prt],
    )
    .to_aml_bytes(sink);

    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let ecam = aml::Memory32Fixed::new(false, pci.ecam_base as u32, PCI_ECAM_SIZE as u32);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&ecam]));
    aml::Device::new("_SB_.MRES".into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
}

fn dsdt(cfg: &AcpiConfig) -> Sdt {
    let mut d = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLEEP_TYPE, &aml::ZERO]),
    );
    s5.to_aml_bytes(&mut d);
    // COM1 as a PNP device: with hardware-reduced ACPI Linux sets up no legacy ISA
    // interrupts, so the UART's IRQ 4 only gets an IOAPIC route through this _CRS.
    let com1_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com1_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let com1_io = aml::IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_GSI);
    let com1_crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]),
    );
    aml::Device::new("_SB_.COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs])
        .to_aml_bytes(&mut d);
    rtc(&mut d);
    power_button(&mut d);
    ged(&mut d);
    if cfg.full {
        gpe_methods(&mut d);
    }
    if let Some(pci) = &cfg.pci {
        pci_host(pci, &mut d);
    }
    let names: Vec<String> = (0..cfg.virtio_devices.len())
        .map(|i| format!("V{i:03X}"))
        .collect();
    for (i, dev) in cfg.virtio_devices.iter().enumerate() {
        let mem = aml::Memory32Fixed::new(true, dev.base as u32, dev.size as u32);
        let irq = aml::Interrupt::new(true, true, false, false, dev.gsi);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid_val = i as u32;
        let uid = aml::Name::new("_UID".into(), &uid_val);
        let crs_name = aml::Name::new("_CRS".into(), &crs);
        let device = aml::Device::new(
            format!("_SB_.{}", names[i]).as_str().into(),
            vec![&hid, &uid, &crs_name],
        );
        device.to_aml_bytes(&mut d);
    }
    d
}

/// The CMOS RTC, so Linux's rtc_cmos binds to it through PNP (hardware-reduced ACPI
/// registers no legacy RTC on its own).
fn rtc(sink: &mut dyn AmlSink) {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0B00"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let io = aml::IO::new(RTC_PORT, RTC_PORT, 1, 2);
    let irq = aml::Interrupt::new(true, true, false, false, RTC_GSI);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&io, &irq]));
    aml::Device::new("_SB_.RTC_".into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
}

/// The power button as a control-method device: the GED's `_EVT` notifies it.
fn power_button(sink: &mut dyn AmlSink) {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    aml::Device::new("_SB_.PWRB".into(), vec![&hid, &uid]).to_aml_bytes(sink);
}

/// A full platform's events come as GPEs on the SCI: `\_GPE._E00` (edge: the OS clears
/// the status before it runs the method) notifies the power button.
fn gpe_methods(sink: &mut dyn AmlSink) {
    let button: aml::Path = "\\_SB_.PWRB".into();
    let notify = aml::Notify::new(&button, &BUTTON_NOTIFY_STATUS);
    let name = format!("_E{GPE_POWER_BUTTON:02X}");
    let method = aml::Method::new(name.as_str().into(), 0, false, vec![&notify]);
    aml::Scope::new("\\_GPE".into(), vec![&method]).to_aml_bytes(sink);
}

/// The Generic Event Device: one edge interrupt, and an `_EVT` that reads the event
/// register and notifies the device behind each set bit.
///
/// ```text
/// Device (\_SB.GED_) {
///   Name (_HID, "ACPI0013")  Name (_UID, 0)
///   Name (_CRS, ResourceTemplate () { Interrupt (Consumer, Edge, ActiveHigh) { GED_GSI } })
///   OperationRegion (GDST, SystemIO, GED_PORT, 1)
///   Field (GDST, ByteAcc, NoLock, WriteAsZeros) { GDAT, 8 }
///   Method (_EVT, 1, Serialized) {
///     Local0 = GDAT
///     If ((Local0 & GED_EVENT_POWER_BUTTON) == GED_EVENT_POWER_BUTTON) {
///       Notify (\_SB.PWRB, 0x80)
///     }
///   }
/// }
/// ```
fn ged(sink: &mut dyn AmlSink) {
    let hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let irq = aml::Interrupt::new(true, true, false, false, GED_GSI);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&irq]));
    let port = GED_PORT;
    let len = 1u8;
    let region = aml::OpRegion::new("GDST".into(), aml::OpRegionSpace::SystemIO, &port, &len);
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 8)],
    );
    let local0 = aml::Local(0);
    let gdat: aml::Path = "GDAT".into();
    let read = aml::Store::new(&local0, &gdat);
    let bit = GED_EVENT_POWER_BUTTON;
    let masked = aml::And::new(&aml::ZERO, &local0, &bit);
    let pressed = aml::Equal::new(&masked, &bit);
    let button: aml::Path = "\\_SB_.PWRB".into();
    let notify = aml::Notify::new(&button, &BUTTON_NOTIFY_STATUS);
    let on_button = aml::If::new(&pressed, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&read, &on_button]);
    aml::Device::new(
        "_SB_.GED_".into(),
        vec![&hid, &uid, &crs, &region, &field, &evt],
    )
    .to_aml_bytes(sink);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs table-loader commands the way firmware does, placing each file at the
    /// address `place` gives it; returns the files.
    /// Runs the loader's commands as firmware does: SeaBIOS subtracts a range's sum
    /// from the checksum byte, OVMF (`stores_checksum`) stores the checksum of the range
    /// (the byte included) in it.
    fn run_loader(
        loader: &[u8],
        files: &mut std::collections::HashMap<String, (u64, Vec<u8>)>,
        stores_checksum: bool,
    ) {
        let name = |b: &[u8]| {
            String::from_utf8(b.iter().take_while(|&&c| c != 0).copied().collect()).unwrap()
        };
        let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        for e in loader.chunks(128) {
            match u32_at(e, 0) {
                1 => assert!(files.contains_key(&name(&e[4..60])), "allocate"),
                2 => {
                    let src = files[&name(&e[60..116])].0;
                    let (_, dest) = files.get_mut(&name(&e[4..60])).unwrap();
                    let at = u32_at(e, 116) as usize;
                    assert_eq!(e[120], 8);
                    add_u64(dest, at, src);
                }
                3 => {
                    let (_, f) = files.get_mut(&name(&e[4..60])).unwrap();
                    let (at, start, len) = (
                        u32_at(e, 60) as usize,
                        u32_at(e, 64) as usize,
                        u32_at(e, 68) as usize,
                    );
                    let sum = f[start..start + len]
                        .iter()
                        .fold(0u8, |a, b| a.wrapping_add(*b));
                    f[at] = if stores_checksum {
                        0u8.wrapping_sub(sum)
                    } else {
                        f[at].wrapping_sub(sum)
                    };
                }
                c => panic!("unknown loader command {c}"),
            }
        }
    }

    #[test]
    fn the_table_loader_yields_the_same_tables_as_direct_placement() {
        let cfg = AcpiConfig {
            cpus: 2,
            virtio_devices: vec![],
            pci: Some(PciHost::new(vec![(1, 16)])),
            full: false,
        };
        for full in [false, true] {
            let cfg = AcpiConfig {
                full,
                ..cfg.clone()
            };
            check_loader(&cfg);
        }
    }

    fn check_loader(cfg: &AcpiConfig) {
        let (rsdp, tables, loader) = table_loader(cfg);
        assert_eq!(loader.len() % 128, 0);
        // Firmware puts the RSDP in the F segment and the tables where it likes.
        let (rsdp_at, tables_at) = (0xf5000u64, 0x7ffe_0000u64);
        let mut files = std::collections::HashMap::new();
        files.insert(LOADER_RSDP_FILE.to_string(), (rsdp_at, rsdp));
        files.insert(LOADER_TABLES_FILE.to_string(), (tables_at, tables));
        // Both firmwares' ways with checksums give the same tables.
        let mut ovmf_files = files.clone();
        run_loader(&loader, &mut files, false);
        run_loader(&loader, &mut ovmf_files, true);
        assert_eq!(files, ovmf_files);
        let rsdp = &files[LOADER_RSDP_FILE].1;
        let tables = &files[LOADER_TABLES_FILE].1;
        // Direct placement with the RSDP 64 bytes before the tables gives the same bytes.
        let direct = build_tables(cfg, tables_at - 64);
        assert_eq!(&direct[64..], &tables[..]);
        assert_eq!(&direct[..36], &rsdp[..]);
        assert_eq!(checksum(&rsdp[..20]), 0);
        assert_eq!(checksum(&rsdp[..36]), 0);
        if cfg.full {
            // The FACS leads the blob, and the FADT (after the XSDT) points at it and
            // at the PM1 blocks, without HW_REDUCED_ACPI.
            assert_eq!(&tables[..4], b"FACS");
            let fadt = &tables[FACS_LEN + 36 + 8 * 3..];
            assert_eq!(&fadt[..4], b"FACP");
            let x_facs = u64::from_le_bytes(fadt[132..140].try_into().unwrap());
            assert_eq!(x_facs, tables_at);
            assert_eq!(
                u32::from_le_bytes(fadt[112..116].try_into().unwrap()) & (1 << 20),
                0
            );
            assert_eq!(
                u16::from_le_bytes(fadt[46..48].try_into().unwrap()),
                SCI_GSI
            );
            assert_eq!(fadt[88], 4);
            // The GPE0 block, and the power button's method for its GPE.
            assert_eq!(
                u32::from_le_bytes(fadt[80..84].try_into().unwrap()),
                u32::from(GPE0_PORT)
            );
            assert_eq!(fadt[92], GPE0_LEN);
            assert_eq!(
                u64::from_le_bytes(fadt[224..232].try_into().unwrap()),
                u64::from(GPE0_PORT)
            );
            assert!(tables.windows(4).any(|w| w == b"_GPE"));
            assert!(tables.windows(4).any(|w| w == b"_E00"));
            // The MADT routes the SCI as level-triggered, active high.
            let sci_override = [2, 10, 0, 9, 9, 0, 0, 0, 0x0d, 0];
            assert!(tables.windows(10).any(|w| w == sci_override));
        } else {
            // Hardware-reduced: the FADT right after the XSDT, flagged so.
            let fadt = &tables[36 + 8 * 3..];
            assert_eq!(&fadt[..4], b"FACP");
            assert_ne!(
                u32::from_le_bytes(fadt[112..116].try_into().unwrap()) & (1 << 20),
                0
            );
        }
    }

    fn table_at(blob: &[u8], base: u64, addr: u64) -> &[u8] {
        let off = (addr - base) as usize;
        let len = u32::from_le_bytes(blob[off + 4..off + 8].try_into().unwrap()) as usize;
        &blob[off..off + len]
    }

    #[test]
    fn tables_chain_together_with_valid_checksums() {
        let base = 0xe0000;
        let cfg = AcpiConfig {
            cpus: 2,
            virtio_devices: vec![VirtioMmioDevice {
                base: 0xd000_0000,
                size: 0x1000,
                gsi: 5,
            }],
            pci: Some(PciHost::new(vec![(1, 16), (2, 17)])),
            full: false,
        };
        let blob = build_tables(&cfg, base);
        assert_eq!(&blob[0..8], b"RSD PTR ");
        assert_eq!(checksum(&blob[0..20]), 0);
        assert_eq!(checksum(&blob[0..36]), 0);
        let xsdt_addr = u64::from_le_bytes(blob[24..32].try_into().unwrap());
        let xsdt = table_at(&blob, base, xsdt_addr);
        assert_eq!(&xsdt[0..4], b"XSDT");
        assert_eq!(checksum(xsdt), 0);
        let mut sigs = vec![];
        for e in xsdt[36..].chunks(8) {
            let t = table_at(&blob, base, u64::from_le_bytes(e.try_into().unwrap()));
            assert_eq!(checksum(t), 0, "{:?}", std::str::from_utf8(&t[0..4]));
            sigs.push(t[0..4].to_vec());
            if &t[0..4] == b"FACP" {
                let dsdt_addr = u64::from_le_bytes(t[140..148].try_into().unwrap());
                let dsdt = table_at(&blob, base, dsdt_addr);
                assert_eq!(&dsdt[0..4], b"DSDT");
                assert_eq!(checksum(dsdt), 0);
                let hay = String::from_utf8_lossy(dsdt);
                assert!(hay.contains("_S5_") && hay.contains("LNRO0005"));
                assert!(hay.contains("COM1"));
                // The GED with its event method and register, the button it notifies,
                // and the RTC.
                for name in [
                    "GED_", "ACPI0013", "_EVT", "GDST", "GDAT", "PWRB", "RTC_", "PCI0", "_PRT",
                    "MRES",
                ] {
                    assert!(hay.contains(name), "{name} missing from the DSDT");
                }
                assert_eq!(t[108], RTC_CENTURY_INDEX);
                assert_eq!(t[109] & (1 << 5), 0, "the CMOS RTC is present");
            }
            if &t[0..4] == b"MCFG" {
                assert_eq!(t.len(), 60);
                assert_eq!(
                    u64::from_le_bytes(t[44..52].try_into().unwrap()),
                    PCI_ECAM_START
                );
                assert_eq!(&t[54..56], &[0, 0], "bus 0 only");
            }
            if &t[0..4] == b"APIC" {
                let lapics = t[44..].windows(2).filter(|w| w == &[0, 8]).count();
                assert!(lapics >= 2);
            }
        }
        assert_eq!(
            sigs,
            vec![b"FACP".to_vec(), b"APIC".to_vec(), b"MCFG".to_vec()]
        );
        assert!(blob.len() < (crate::layout::ACPI_END - crate::layout::ACPI_START) as usize);
    }
}
