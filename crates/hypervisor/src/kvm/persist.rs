//! Snapshots of a KVM VM: the in-kernel irqchip (both PICs and the IOAPIC), the PIT and
//! the VM clock; per vCPU its registers, FPU (and XSAVE where the host gives it), the
//! MSRs a guest kernel keeps state in, the LAPIC, pending events, MP state and debug
//! registers, in kvm-bindings' own (serde) shapes.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xsave, Msrs, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use serde::{Deserialize, Serialize};

use super::{io_err, vcpu_err, KvmVcpu, KvmVm};
use crate::{Error, FpuState, Result, Vcpu};

/// MSRs a snapshot keeps: SYSCALL/SYSENTER, the GS swap, PAT, TSC and TSC_AUX,
/// MISC_ENABLE, and kvmclock's registrations (EFER and the APIC base are in `sregs`).
const MSRS: [u32; 14] = [
    0x10,        // TSC
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x1a0,       // MISC_ENABLE
    0x277,       // PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
    0x4b56_4d00, // KVM wall clock
    0x4b56_4d01, // KVM system time
];

#[derive(Serialize, Deserialize)]
struct VmState {
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

#[derive(Serialize, Deserialize)]
struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    /// The FXSAVE image.
    fxsave: Vec<u8>,
    /// Where the host gives it (not on every PVM host).
    xsave: Option<kvm_xsave>,
    msrs: Vec<kvm_msr_entry>,
    lapic: kvm_lapic_state,
    events: kvm_vcpu_events,
    mp_state: kvm_mp_state,
    debugregs: kvm_debugregs,
}

fn state_err(e: impl std::fmt::Display) -> Error {
    Error::State(e.to_string())
}

fn vm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |e| Error::VmIoctl {
        op,
        source: io_err(e),
    }
}

fn irqchip(vm: &KvmVm, id: u32) -> Result<kvm_irqchip> {
    let mut c = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    vm.fd
        .get_irqchip(&mut c)
        .map_err(vm_err("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

pub(super) fn save_vm(vm: &KvmVm) -> Result<serde_json::Value> {
    let s = VmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.fd.get_pit2().map_err(vm_err("KVM_GET_PIT2"))?,
        clock: vm.fd.get_clock().map_err(vm_err("KVM_GET_CLOCK"))?,
    };
    serde_json::to_value(s).map_err(state_err)
}

pub(super) fn restore_vm(vm: &KvmVm, state: &serde_json::Value, elapsed_ns: u64) -> Result<()> {
    let s: VmState = serde_json::from_value(state.clone()).map_err(state_err)?;
    for (c, id) in [
        (&s.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&s.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&s.ioapic, KVM_IRQCHIP_IOAPIC),
    ] {
        if c.chip_id != id {
            return Err(state_err(format!(
                "irqchip {} where {id} belongs",
                c.chip_id
            )));
        }
        vm.fd.set_irqchip(c).map_err(vm_err("KVM_SET_IRQCHIP"))?;
    }
    vm.fd.set_pit2(&s.pit).map_err(vm_err("KVM_SET_PIT2"))?;
    // Guest time goes on by the time the VM spent saved.
    let mut clock = s.clock;
    clock.clock = clock.clock.saturating_add(elapsed_ns);
    clock.flags = 0;
    vm.fd.set_clock(&clock).map_err(vm_err("KVM_SET_CLOCK"))?;
    Ok(())
}

pub(super) fn save_vcpu(v: &KvmVcpu) -> Result<serde_json::Value> {
    let fd = &v.fd;
    let entries: Vec<kvm_msr_entry> = MSRS
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(state_err)?;
    let n = fd.get_msrs(&mut msrs).map_err(vcpu_err("KVM_GET_MSRS"))?;
    let s = VcpuState {
        regs: fd.get_regs().map_err(vcpu_err("KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(vcpu_err("KVM_GET_SREGS"))?,
        fxsave: v.fpu()?.fxsave.to_vec(),
        xsave: fd.get_xsave().ok(),
        // KVM stops at the first MSR it does not have.
        msrs: msrs.as_slice().iter().take(n).copied().collect(),
        lapic: fd.get_lapic().map_err(vcpu_err("KVM_GET_LAPIC"))?,
        events: fd
            .get_vcpu_events()
            .map_err(vcpu_err("KVM_GET_VCPU_EVENTS"))?,
        mp_state: fd.get_mp_state().map_err(vcpu_err("KVM_GET_MP_STATE"))?,
        debugregs: fd.get_debug_regs().map_err(vcpu_err("KVM_GET_DEBUGREGS"))?,
    };
    serde_json::to_value(s).map_err(state_err)
}

pub(super) fn restore_vcpu(v: &mut KvmVcpu, state: &serde_json::Value) -> Result<()> {
    let s: VcpuState = serde_json::from_value(state.clone()).map_err(state_err)?;
    let fxsave: [u8; 512] = s
        .fxsave
        .as_slice()
        .try_into()
        .map_err(|_| state_err("an FXSAVE image that is not 512 bytes"))?;
    // The order KVM needs: special registers (paging, APIC base) before the MSRs and
    // the LAPIC, events last.
    v.fd.set_sregs(&s.sregs)
        .map_err(vcpu_err("KVM_SET_SREGS"))?;
    v.fd.set_regs(&s.regs).map_err(vcpu_err("KVM_SET_REGS"))?;
    v.set_fpu(&FpuState { fxsave })?;
    if let Some(x) = &s.xsave {
        // SAFETY: `x` is a whole 4 KiB kvm_xsave. KVM reads its guest FPU's uabi size,
        // which is larger only for a process that asked for dynamic XSAVE features for
        // its guests (ARCH_REQ_XCOMP_GUEST_PERM, AMX); Vessel never does.
        unsafe { v.fd.set_xsave(x) }.map_err(vcpu_err("KVM_SET_XSAVE"))?;
    }
    let msrs = Msrs::from_entries(&s.msrs).map_err(state_err)?;
    v.fd.set_msrs(&msrs).map_err(vcpu_err("KVM_SET_MSRS"))?;
    v.fd.set_lapic(&s.lapic)
        .map_err(vcpu_err("KVM_SET_LAPIC"))?;
    v.fd.set_mp_state(s.mp_state)
        .map_err(vcpu_err("KVM_SET_MP_STATE"))?;
    v.fd.set_debug_regs(&s.debugregs)
        .map_err(vcpu_err("KVM_SET_DEBUGREGS"))?;
    v.fd.set_vcpu_events(&s.events)
        .map_err(vcpu_err("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// Why the interrupt and event state in a KVM snapshot cannot be carried to another
/// accelerator, or None when it is quiet: a cross-accelerator restore moves the CPU
/// registers and the LAPIC (`vmm::snapshot::cross_lapic`) and starts the target's other
/// interrupt controllers fresh, so anything in flight there (a PIC interrupt pending or
/// in service, an unmasked IOAPIC pin, a programmed PIT, a TSC-deadline timer, an
/// exception or NMI being injected, kvmclock) would be lost.
pub fn cross_restore_blocker(
    vm: &serde_json::Value,
    vcpus: &[serde_json::Value],
) -> Option<String> {
    let vm: VmState = match serde_json::from_value(vm.clone()) {
        Ok(s) => s,
        Err(e) => return Some(format!("its KVM VM state does not decode: {e}")),
    };
    for (c, name) in [(&vm.pic_master, "master"), (&vm.pic_slave, "slave")] {
        // SAFETY: both PIC chips' ids select the `pic` member (checked on restore too),
        // and every member of the union is plain bytes, valid for any bit pattern.
        let pic = unsafe { c.chip.pic };
        if pic.isr != 0 || pic.irr & !pic.imr != 0 {
            return Some(format!(
                "the {name} PIC has an interrupt pending or in service"
            ));
        }
    }
    // SAFETY: as above; the IOAPIC chip's id selects the `ioapic` member.
    let ioapic = unsafe { vm.ioapic.chip.ioapic };
    for (pin, e) in ioapic.redirtbl.iter().enumerate() {
        // SAFETY: `bits` covers the whole 64-bit entry.
        if unsafe { e.bits } & (1 << 16) == 0 {
            return Some(format!("IOAPIC pin {pin} is unmasked"));
        }
    }
    if vm.pit.channels[0].mode <= 5 {
        return Some("PIT channel 0 is programmed".into());
    }
    for (i, v) in vcpus.iter().enumerate() {
        let s: VcpuState = match serde_json::from_value(v.clone()) {
            Ok(s) => s,
            Err(e) => return Some(format!("vCPU {i}'s KVM state does not decode: {e}")),
        };
        let reg = |off: usize| -> u32 {
            let b = &s.lapic.regs[off..off + 4];
            u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
        };
        // The LAPIC's registers, vectors and count timer are carried, an interrupt
        // taken from it but not yet delivered too (`vmm::snapshot::cross_lapic`); a
        // TSC deadline is not (LVT timer at 0x320, mode in bits 17-18, bit 16 masked;
        // the deadline MSR is not kept, so an unmasked timer in that mode counts as
        // armed).
        if reg(0x320) & (3 << 17 | 1 << 16) == 2 << 17 {
            return Some(format!(
                "vCPU {i}'s LAPIC timer is armed in TSC-deadline mode"
            ));
        }
        let e = &s.events;
        if e.exception.injected != 0
            || e.exception.pending != 0
            || e.interrupt.shadow != 0
            || e.nmi.injected != 0
            || e.nmi.pending != 0
        {
            return Some(format!("vCPU {i} has an event being delivered"));
        }
        if s.mp_state.mp_state != kvm_bindings::KVM_MP_STATE_RUNNABLE {
            return Some(format!(
                "vCPU {i} is not runnable (halted or waiting for a startup IPI)"
            ));
        }
        if s.msrs
            .iter()
            .any(|m| m.index == 0x4b56_4d01 && m.data & 1 != 0)
        {
            return Some(format!("vCPU {i} registered kvmclock"));
        }
    }
    None
}
