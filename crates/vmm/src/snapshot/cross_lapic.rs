//! Each vCPU's local APIC carried to another accelerator (emu ↔ kvm) instead of starting
//! fresh: its registers, the vectors pending and in service, and its timer with the
//! count left. The go-between is the APIC's own register page (the xAPIC MMIO layout,
//! which is also KVM's `kvm_lapic_state`): emu's `LapicState` is written into one and
//! read back from one. Both count the timer at 1 GHz (KVM's APIC bus; emu's
//! `DEFAULT_TIMER_HZ`), so a count means the same time on either side.
//!
//! Not carried (still refused by the blockers): a timer in TSC-deadline mode that is
//! armed, a pending NMI.

use devices::irqchip::lapic::LapicState;
use hypervisor::{Vcpu, Vm};

use super::SnapshotError;

const PAGE: usize = 1024;
const ID: usize = 0x20;
const TPR: usize = 0x80;
const LDR: usize = 0xd0;
const DFR: usize = 0xe0;
const SVR: usize = 0xf0;
const ISR: usize = 0x100;
const TMR: usize = 0x180;
const IRR: usize = 0x200;
const ESR: usize = 0x280;
const ICR_LOW: usize = 0x300;
const ICR_HIGH: usize = 0x310;
/// Timer, thermal, perfmon, LINT0, LINT1, error, CMCI: emu's `lvt` order.
const LVT: [usize; 7] = [0x320, 0x330, 0x340, 0x350, 0x360, 0x370, 0x2f0];
const TMICT: usize = 0x380;
const TMCCT: usize = 0x390;
const TDCR: usize = 0x3e0;

fn get(page: &[u8; PAGE], off: usize) -> u32 {
    u32::from_le_bytes([page[off], page[off + 1], page[off + 2], page[off + 3]])
}

fn put(page: &mut [u8; PAGE], off: usize, v: u32) {
    page[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// emu's LAPIC as a register page at VM time `now_ns`.
fn page_from_emu(l: &LapicState, now_ns: u64) -> [u8; PAGE] {
    let mut p = [0u8; PAGE];
    put(&mut p, ID, l.id << 24);
    put(&mut p, TPR, l.tpr);
    put(&mut p, LDR, l.ldr);
    put(&mut p, DFR, l.dfr);
    put(&mut p, SVR, l.svr);
    for w in 0..8 {
        put(&mut p, ISR + 16 * w, l.isr[w]);
        put(&mut p, TMR + 16 * w, l.tmr[w]);
        put(&mut p, IRR + 16 * w, l.irr[w]);
    }
    put(&mut p, ESR, l.esr);
    put(&mut p, ICR_LOW, l.icr_low);
    put(&mut p, ICR_HIGH, l.icr_high);
    for (i, off) in LVT.iter().enumerate() {
        put(&mut p, *off, l.lvt[i]);
    }
    put(&mut p, TMICT, l.initial_count);
    put(&mut p, TMCCT, l.timer_count_at(now_ns));
    put(&mut p, TDCR, l.divide_config);
    p
}

/// A register page into emu's LAPIC `l` (a fresh one: its id, clocks and APIC base
/// stay), its timer armed at VM time `now_ns`.
fn page_into_emu(p: &[u8; PAGE], l: &mut LapicState, now_ns: u64) {
    l.tpr = get(p, TPR) & 0xff;
    l.ldr = get(p, LDR);
    l.dfr = get(p, DFR);
    l.svr = get(p, SVR);
    for w in 0..8 {
        l.isr[w] = get(p, ISR + 16 * w);
        l.tmr[w] = get(p, TMR + 16 * w);
        l.irr[w] = get(p, IRR + 16 * w);
    }
    l.esr = get(p, ESR);
    l.icr_low = get(p, ICR_LOW);
    l.icr_high = get(p, ICR_HIGH);
    for (i, off) in LVT.iter().enumerate() {
        l.lvt[i] = get(p, *off);
    }
    l.initial_count = get(p, TMICT);
    l.divide_config = get(p, TDCR);
    // Level-triggered vectors in service wait for the EOI that clears the IOAPIC's
    // remote IRR; every one the page marks so.
    l.eoi_vectors = (0..=255u8)
        .filter(|&v| {
            let (w, b) = (usize::from(v / 32), v % 32);
            l.isr[w] & l.tmr[w] & (1 << b) != 0
        })
        .collect();
    l.arm_timer_at(now_ns, get(p, TMCCT));
}

/// A KVM vCPU state's LAPIC page (kvm-bindings' serde form: the structure's bytes).
fn json_page(v: &serde_json::Value) -> Option<[u8; PAGE]> {
    let regs = v.get("lapic")?.as_array()?;
    let mut p = [0u8; PAGE];
    if regs.len() != PAGE {
        return None;
    }
    for (b, r) in p.iter_mut().zip(regs) {
        *b = r.as_i64()? as u8;
    }
    Some(p)
}

fn invalid(why: impl Into<String>) -> SnapshotError {
    SnapshotError::Invalid(why.into())
}

/// Each vCPU's LAPIC page in the snapshot's own state (`from`: "emu" or "kvm").
fn source_pages(
    from: &str,
    vm: &serde_json::Value,
    vcpus: &[serde_json::Value],
) -> Result<Vec<[u8; PAGE]>, SnapshotError> {
    match from {
        "emu" => {
            let s: emu::persist::EmuVmState = serde_json::from_value(vm.clone())
                .map_err(|e| invalid(format!("its emu VM state does not decode: {e}")))?;
            Ok(s.chip
                .lapics
                .iter()
                .map(|l| page_from_emu(l, s.vm_ns))
                .collect())
        }
        "kvm" => vcpus
            .iter()
            .map(|v| {
                let mut p =
                    json_page(v).ok_or_else(|| invalid("a KVM LAPIC page that is not 1 KiB"))?;
                // An interrupt KVM had taken from the LAPIC (IRR → ISR) but not yet
                // delivered goes back to pending, as on a VM exit before injection.
                // kvm_vcpu_events' bytes: the interrupt's `injected` at 8, `nr` at 9.
                let byte = |i: usize| v["events"].get(i).and_then(|b| b.as_u64()).unwrap_or(0);
                if byte(8) != 0 {
                    let vector = byte(9) as usize & 0xff;
                    let (w, b) = (vector / 32, vector % 32);
                    let (isr, irr) = (get(&p, ISR + 16 * w), get(&p, IRR + 16 * w));
                    put(&mut p, ISR + 16 * w, isr & !(1 << b));
                    put(&mut p, IRR + 16 * w, irr | 1 << b);
                }
                Ok(p)
            })
            .collect(),
        other => Err(invalid(format!("no LAPIC state of accelerator {other}"))),
    }
}

/// Puts the snapshot's LAPICs (taken under `from`) into the new VM's, under `to`.
pub(crate) fn carry(
    from: &str,
    to: &str,
    snap_vm: &serde_json::Value,
    snap_vcpus: &[serde_json::Value],
    vm: &dyn Vm,
    vcpus: &mut [Box<dyn Vcpu>],
) -> Result<(), SnapshotError> {
    let pages = source_pages(from, snap_vm, snap_vcpus)?;
    if pages.len() != vcpus.len() {
        return Err(invalid(format!(
            "{} LAPIC states for {} vCPUs",
            pages.len(),
            vcpus.len()
        )));
    }
    let accel = |source| SnapshotError::Accel {
        accel: to.into(),
        source,
    };
    match to {
        "kvm" => {
            for (vcpu, page) in vcpus.iter_mut().zip(&pages) {
                // The fresh vCPU's own state (already holding the portable registers)
                // with the carried page: KVM restarts the timer from TMCCT.
                let mut st = vcpu.save_state().map_err(accel)?;
                let mut fresh = json_page(&st).ok_or_else(|| invalid("KVM gave no LAPIC page"))?;
                // The ID register stays the new vCPU's.
                let id = get(&fresh, ID);
                fresh.copy_from_slice(page);
                put(&mut fresh, ID, id);
                st["lapic"] = fresh.iter().copied().collect();
                vcpu.restore_state(&st).map_err(accel)?;
            }
        }
        "emu" => {
            let mut st: emu::persist::EmuVmState =
                serde_json::from_value(vm.save_state().map_err(accel)?)
                    .map_err(|e| invalid(format!("emu's own VM state does not decode: {e}")))?;
            for (l, page) in st.chip.lapics.iter_mut().zip(&pages) {
                page_into_emu(page, l, st.vm_ns);
            }
            let st = serde_json::to_value(st).map_err(|e| invalid(e.to_string()))?;
            vm.restore_state(&st, 0).map_err(accel)?;
        }
        other => return Err(invalid(format!("no LAPIC state for accelerator {other}"))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emu_lapic_goes_through_a_register_page_and_back() {
        let mut l = devices::irqchip::lapic::Lapic::new(0, true).state();
        l.svr = 0x1ff;
        l.tpr = 0x20;
        l.lvt[0] = 0x40 | 1 << 17; // periodic, vector 0x40
        l.divide_config = 0xb; // by 1
        l.initial_count = 1_000_000;
        l.arm_timer_at(0, 1_000_000);
        l.isr[2] = 1; // 0x40 in service
        l.irr[1] = 1 << 3; // 0x23 pending
        let page = page_from_emu(&l, 250_000);
        assert_eq!(get(&page, TMCCT), 750_000);
        let mut back = devices::irqchip::lapic::Lapic::new(0, true).state();
        page_into_emu(&page, &mut back, 10_000_000);
        assert_eq!(
            (back.svr, back.tpr, back.lvt, back.isr, back.irr),
            (l.svr, l.tpr, l.lvt, l.isr, l.irr)
        );
        assert_eq!(back.initial_count, 1_000_000);
        // 750 000 counts left at 1 GHz from VM time 10 ms.
        assert_eq!(back.timer_deadline_ns, Some(10_750_000));
        assert_eq!(back.timer_count_at(10_250_000), 500_000);
        assert!(back.eoi_vectors.is_empty());
    }

    #[test]
    fn a_one_shot_timer_that_ran_out_stays_disarmed() {
        let mut page = [0u8; PAGE];
        put(&mut page, LVT[0], 0x40);
        put(&mut page, TDCR, 0xb);
        put(&mut page, TMICT, 1000);
        let mut l = devices::irqchip::lapic::Lapic::new(0, true).state();
        page_into_emu(&page, &mut l, 5);
        assert_eq!(l.timer_deadline_ns, None);
    }
}
