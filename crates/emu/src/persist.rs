//! Snapshots of an emu VM: what `Vm::save_state` and `Vcpu::save_state` give the VMM,
//! and how they are put back.
//!
//! The VM part is the user-space interrupt controllers (LAPICs with their timers,
//! IOAPIC, PIC pair, PIT) and the VM clock; the vCPU part is x86emu's architectural
//! state with its pending events and TSC, and the vCPU's kvmclock registration. Times
//! are in VM nanoseconds: a restored VM's clock goes on from the saved time plus the
//! time it spent saved, and each TSC keeps its distance to that clock, so timers due
//! while the VM was saved fire at once and the guest's wall clock stays the host's.
//! The hybrid accelerator (guest TSC = host TSC) is refused.

use devices::irqchip::UserIrqChipState;
use serde::{Deserialize, Serialize};
use x86emu::persist::CpuSnapshot;

use crate::platform::KvmClockState;
use crate::VmShared;

/// The VM-wide part.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EmuVmState {
    pub chip: UserIrqChipState,
    /// VM time (ns since it booted) when the snapshot was taken.
    pub vm_ns: u64,
    /// The host's wall-clock time at VM time 0 (kvmclock's wall clock).
    pub boot_unix_ns: u64,
}

/// One vCPU.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EmuVcpuState {
    pub cpu: CpuSnapshot,
    /// VM time when `cpu.tsc` was read.
    pub vm_ns: u64,
    /// Guest-physical address of the vCPU's kvmclock page, when enabled.
    pub kvmclock_page: Option<u64>,
    pub kvmclock_version: u32,
}

fn state_error(what: impl std::fmt::Display) -> hypervisor::Error {
    hypervisor::Error::State(what.to_string())
}

fn refuse_host_tsc(vm: &VmShared) -> hypervisor::Result<()> {
    if vm.clock.host_tsc() {
        return Err(hypervisor::Error::Unsupported {
            what: "snapshots with the hybrid accelerator (its guest TSC is the host's)".into(),
        });
    }
    Ok(())
}

pub(crate) fn save_vm(vm: &VmShared) -> hypervisor::Result<serde_json::Value> {
    refuse_host_tsc(vm)?;
    let s = EmuVmState {
        chip: vm.chip.state(),
        vm_ns: vm.clock.now_ns(),
        boot_unix_ns: u64::try_from(vm.clock.boot_unix_ns()).unwrap_or(u64::MAX),
    };
    serde_json::to_value(s).map_err(state_error)
}

pub(crate) fn restore_vm(
    vm: &VmShared,
    state: &serde_json::Value,
    elapsed_ns: u64,
) -> hypervisor::Result<()> {
    refuse_host_tsc(vm)?;
    let s: EmuVmState = serde_json::from_value(state.clone()).map_err(state_error)?;
    // The chip refuses another vCPU count before anything changes; its timers are in
    // the VM time the clock then goes on from.
    vm.chip.restore(&s.chip).map_err(state_error)?;
    vm.clock
        .resume_at(s.vm_ns.saturating_add(elapsed_ns), s.boot_unix_ns);
    tracing::debug!(vm_ns = s.vm_ns, elapsed_ns, "emu VM state restored");
    Ok(())
}

pub(crate) fn save_vcpu(
    vm: &VmShared,
    cpu: &x86emu::Cpu,
    kvmclock: &KvmClockState,
) -> hypervisor::Result<serde_json::Value> {
    refuse_host_tsc(vm)?;
    let s = EmuVcpuState {
        cpu: cpu.snapshot(),
        vm_ns: vm.clock.now_ns(),
        kvmclock_page: kvmclock.system_time,
        kvmclock_version: kvmclock.version,
    };
    serde_json::to_value(s).map_err(state_error)
}

pub(crate) fn restore_vcpu(
    vm: &VmShared,
    cpu: &mut x86emu::Cpu,
    kvmclock: &mut KvmClockState,
    state: &serde_json::Value,
) -> hypervisor::Result<()> {
    refuse_host_tsc(vm)?;
    let s: EmuVcpuState = serde_json::from_value(state.clone()).map_err(state_error)?;
    // The TSC keeps its distance to the VM clock, which went on (see `restore_vm`).
    let tsc = s
        .cpu
        .tsc
        .wrapping_sub(s.vm_ns)
        .wrapping_add(vm.clock.now_ns());
    cpu.restore(&s.cpu, tsc);
    kvmclock.system_time = s.kvmclock_page;
    kvmclock.version = s.kvmclock_version;
    Ok(())
}

/// Why the interrupt and event state in an emu snapshot cannot be carried to another
/// accelerator, or None when it is quiet (see `hypervisor::kvm::cross_restore_blocker`,
/// its KVM twin: the CPU registers and LAPICs move, the target's other interrupt
/// controllers start fresh).
pub fn cross_restore_blocker(
    vm: &serde_json::Value,
    vcpus: &[serde_json::Value],
) -> Option<String> {
    let vm: EmuVmState = match serde_json::from_value(vm.clone()) {
        Ok(s) => s,
        Err(e) => return Some(format!("its emu VM state does not decode: {e}")),
    };
    let chip = &vm.chip;
    // The LAPICs' registers, vectors and count timers are carried
    // (`vmm::snapshot::cross_lapic`); an NMI and a TSC deadline are not.
    for (i, l) in chip.lapics.iter().enumerate() {
        if l.nmi_pending {
            return Some(format!("vCPU {i}'s LAPIC has an NMI pending"));
        }
        if l.lvt[0] & (3 << 17) == 2 << 17 && l.timer_deadline_ns.is_some() {
            return Some(format!(
                "vCPU {i}'s LAPIC timer is armed in TSC-deadline mode"
            ));
        }
    }
    for (p, name) in [(&chip.pic_master, "master"), (&chip.pic_slave, "slave")] {
        if p.isr != 0 || p.irr & !p.imr != 0 {
            return Some(format!(
                "the {name} PIC has an interrupt pending or in service"
            ));
        }
    }
    if let Some(pin) = chip
        .ioapic
        .redirection
        .iter()
        .position(|e| e & (1 << 16) == 0)
    {
        return Some(format!("IOAPIC pin {pin} is unmasked"));
    }
    if chip.pit_channels[0].loaded {
        return Some("PIT channel 0 is programmed".into());
    }
    if chip.startup.iter().any(|s| !s.is_empty()) || chip.extint.iter().any(|&e| e) {
        return Some("a startup IPI or an ExtINT is waiting".into());
    }
    for (i, v) in vcpus.iter().enumerate() {
        let s: EmuVcpuState = match serde_json::from_value(v.clone()) {
            Ok(s) => s,
            Err(e) => return Some(format!("vCPU {i}'s emu state does not decode: {e}")),
        };
        let c = &s.cpu;
        if c.halted || c.wait_for_sipi || c.shutdown {
            return Some(format!(
                "vCPU {i} is not runnable (halted, waiting for a startup IPI or shut down)"
            ));
        }
        if c.shadow || c.nmi_pending {
            return Some(format!("vCPU {i} has an event being delivered"));
        }
        if s.kvmclock_page.is_some() {
            return Some(format!("vCPU {i} registered kvmclock"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use hypervisor::Hypervisor;

    #[test]
    fn a_restored_vm_clock_goes_on_by_the_time_away_and_tscs_keep_their_distance() {
        let hv = crate::EmuHypervisor::new();
        let a = hv.create_vm(2).unwrap();
        let mut cpu = a.create_vcpu(0).unwrap();
        let mut regs = cpu.regs().unwrap();
        regs.rax = 0x1234;
        cpu.set_regs(&regs).unwrap();
        let vm_state = a.save_state().unwrap();
        let cpu_state = cpu.save_state().unwrap();
        let saved: super::EmuVcpuState = serde_json::from_value(cpu_state.clone()).unwrap();
        let saved_vm: super::EmuVmState = serde_json::from_value(vm_state.clone()).unwrap();

        let b = hv.create_vm(2).unwrap();
        let away = 5_000_000_000;
        b.restore_state(&vm_state, away).unwrap();
        let mut restored = b.create_vcpu(0).unwrap();
        restored.restore_state(&cpu_state).unwrap();
        assert_eq!(restored.regs().unwrap().rax, 0x1234);
        let again: super::EmuVcpuState =
            serde_json::from_value(restored.save_state().unwrap()).unwrap();
        // VM time moved on by the time away (and the moments between the calls).
        assert!(
            again.vm_ns >= saved_vm.vm_ns + away,
            "{again:?} {saved_vm:?}"
        );
        assert!(again.vm_ns < saved_vm.vm_ns + away + 5_000_000_000);
        // The TSC kept its distance to VM time, within the time the calls took.
        let before = saved.cpu.tsc.wrapping_sub(saved.vm_ns) as i64;
        let after = again.cpu.tsc.wrapping_sub(again.vm_ns) as i64;
        assert!((after - before).abs() < 50_000_000, "{before} {after}");

        // Another vCPU count is refused.
        let one = hv.create_vm(1).unwrap();
        assert!(one.restore_state(&vm_state, 0).is_err());
        // State that is not emu's is refused, not a panic.
        assert!(b.restore_state(&serde_json::json!({"chip": 1}), 0).is_err());
        assert!(restored.restore_state(&serde_json::Value::Null).is_err());
    }
}
