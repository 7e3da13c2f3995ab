//! The device tree the VMM hands OpenSBI and Linux: the harts, RAM, CLINT, PLIC, the
//! 16550 UART, the Goldfish RTC, a SiFive test device (poweroff/reboot), and the virtio-mmio slots.

use super::layout::*;

/// What the tree describes beyond the fixed layout.
#[derive(Clone, Debug)]
pub struct FdtParams {
    pub ram_size: u64,
    pub cmdline: String,
    /// Guest-physical start and end of the initrd, if any.
    pub initrd: Option<(u64, u64)>,
    /// How many virtio-mmio slots are populated.
    pub virtio_slots: u32,
    /// How many harts (hart ids 0..harts).
    pub harts: u32,
}

const PH_PLIC: u32 = 2;
const PH_TEST: u32 = 3;
/// Hart n's interrupt controller is PH_CPU_INTC + n.
const PH_CPU_INTC: u32 = 0x100;

/// Builds the flattened device tree.
pub fn build(p: &FdtParams) -> Result<Vec<u8>, vm_fdt::Error> {
    let mut f = vm_fdt::FdtWriter::new()?;
    let root = f.begin_node("")?;
    f.property_u32("#address-cells", 2)?;
    f.property_u32("#size-cells", 2)?;
    f.property_string("compatible", "riscv-virtio")?;
    f.property_string("model", "vessel,riscv-virt")?;

    let chosen = f.begin_node("chosen")?;
    f.property_string("bootargs", &p.cmdline)?;
    f.property_string("stdout-path", &format!("/soc/serial@{UART_BASE:x}"))?;
    if let Some((start, end)) = p.initrd {
        f.property_u64("linux,initrd-start", start)?;
        f.property_u64("linux,initrd-end", end)?;
    }
    f.end_node(chosen)?;

    let mem = f.begin_node(&format!("memory@{RAM_BASE:x}"))?;
    f.property_string("device_type", "memory")?;
    f.property_array_u64("reg", &[RAM_BASE, p.ram_size])?;
    f.end_node(mem)?;

    let cpus = f.begin_node("cpus")?;
    f.property_u32("#address-cells", 1)?;
    f.property_u32("#size-cells", 0)?;
    f.property_u32("timebase-frequency", TIMEBASE_HZ as u32)?;
    for hart in 0..p.harts {
        let cpu = f.begin_node(&format!("cpu@{hart}"))?;
        f.property_string("device_type", "cpu")?;
        f.property_u32("reg", hart)?;
        f.property_string("status", "okay")?;
        f.property_string("compatible", "riscv")?;
        f.property_string("riscv,isa", ISA)?;
        f.property_string("mmu-type", "riscv,sv48")?;
        let intc = f.begin_node("interrupt-controller")?;
        f.property_u32("#interrupt-cells", 1)?;
        f.property_null("interrupt-controller")?;
        f.property_string("compatible", "riscv,cpu-intc")?;
        f.property_phandle(PH_CPU_INTC + hart)?;
        f.end_node(intc)?;
        f.end_node(cpu)?;
    }
    f.end_node(cpus)?;

    let soc = f.begin_node("soc")?;
    f.property_u32("#address-cells", 2)?;
    f.property_u32("#size-cells", 2)?;
    f.property_string("compatible", "simple-bus")?;
    f.property_null("ranges")?;

    let test = f.begin_node(&format!("test@{TEST_BASE:x}"))?;
    f.property_string_list(
        "compatible",
        vec![
            "sifive,test1".into(),
            "sifive,test0".into(),
            "syscon".into(),
        ],
    )?;
    f.property_array_u64("reg", &[TEST_BASE, 0x1000])?;
    f.property_phandle(PH_TEST)?;
    f.end_node(test)?;
    let poweroff = f.begin_node("poweroff")?;
    f.property_string("compatible", "syscon-poweroff")?;
    f.property_u32("regmap", PH_TEST)?;
    f.property_u32("offset", 0)?;
    f.property_u32("value", TEST_POWEROFF)?;
    f.end_node(poweroff)?;
    let reboot = f.begin_node("reboot")?;
    f.property_string("compatible", "syscon-reboot")?;
    f.property_u32("regmap", PH_TEST)?;
    f.property_u32("offset", 0)?;
    f.property_u32("value", TEST_RESET)?;
    f.end_node(reboot)?;

    let rtc = f.begin_node(&format!("rtc@{RTC_BASE:x}"))?;
    f.property_string("compatible", "google,goldfish-rtc")?;
    f.property_array_u64("reg", &[RTC_BASE, super::rtc::SIZE])?;
    f.property_u32("interrupt-parent", PH_PLIC)?;
    f.property_u32("interrupts", RTC_IRQ)?;
    f.end_node(rtc)?;

    let uart = f.begin_node(&format!("serial@{UART_BASE:x}"))?;
    f.property_string("compatible", "ns16550a")?;
    f.property_array_u64("reg", &[UART_BASE, 0x100])?;
    f.property_u32("clock-frequency", 3_686_400)?;
    f.property_u32("interrupt-parent", PH_PLIC)?;
    f.property_u32("interrupts", UART_IRQ)?;
    f.end_node(uart)?;

    for slot in 0..p.virtio_slots {
        let base = VIRTIO_BASE + slot as u64 * VIRTIO_STRIDE;
        let n = f.begin_node(&format!("virtio_mmio@{base:x}"))?;
        f.property_string("compatible", "virtio,mmio")?;
        f.property_array_u64("reg", &[base, VIRTIO_STRIDE])?;
        f.property_u32("interrupt-parent", PH_PLIC)?;
        f.property_u32("interrupts", VIRTIO_IRQ_BASE + slot)?;
        f.end_node(n)?;
    }

    let clint = f.begin_node(&format!("clint@{CLINT_BASE:x}"))?;
    f.property_string_list(
        "compatible",
        vec!["sifive,clint0".into(), "riscv,clint0".into()],
    )?;
    f.property_array_u64("reg", &[CLINT_BASE, crate::cpu::CLINT_SIZE])?;
    // Each hart's software (3) and timer (7) interrupts.
    let lines: Vec<u32> = (0..p.harts)
        .flat_map(|h| [PH_CPU_INTC + h, 3, PH_CPU_INTC + h, 7])
        .collect();
    f.property_array_u32("interrupts-extended", &lines)?;
    f.end_node(clint)?;

    let plic = f.begin_node(&format!("plic@{PLIC_BASE:x}"))?;
    f.property_string_list(
        "compatible",
        vec!["sifive,plic-1.0.0".into(), "riscv,plic0".into()],
    )?;
    f.property_array_u64("reg", &[PLIC_BASE, super::plic::SIZE])?;
    f.property_u32("#address-cells", 0)?;
    f.property_u32("#interrupt-cells", 1)?;
    f.property_null("interrupt-controller")?;
    f.property_u32("riscv,ndev", super::plic::NUM_SOURCES - 1)?;
    // Contexts 2h and 2h + 1: hart h's M (11) and S (9) external interrupts.
    let lines: Vec<u32> = (0..p.harts)
        .flat_map(|h| [PH_CPU_INTC + h, 11, PH_CPU_INTC + h, 9])
        .collect();
    f.property_array_u32("interrupts-extended", &lines)?;
    f.property_phandle(PH_PLIC)?;
    f.end_node(plic)?;

    f.end_node(soc)?;
    f.end_node(root)?;
    f.finish()
}
