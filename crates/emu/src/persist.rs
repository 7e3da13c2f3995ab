//! Snapshots of an emu VM: what `Vm::save_state` and `Vcpu::save_state` give the VMM,
//! and how they are put back.
//!
//! The VM part is the user-space interrupt controllers (LAPICs with their timers,
//! IOAPIC, PIC pair, PIT) and the VM clock; the vCPU part is x86emu's architectural
//! state with its pending events and TSC, and the vCPU's kvmclock registration. Times
//! are in VM nanoseconds: a restored VM's clock goes on from the saved time plus the
//! time it spent saved, and each TSC keeps its distance to that clock, so timers due
//! while the VM was saved fire at once and the guest's wall clock stays the host's.
//! The hybrid accelerator's guest TSC is the host's (its user code reads it natively, and
//! PVM applies no offset), so its VM state holds the host TSC beside the VM time, and it
//! goes on only where that TSC went on too: on the host, and in the boot, it was taken on
//! ([`restore_vm`] checks the TSC's advance against the wall clock's). Its VM time then
//! goes on by the TSC's advance, so the two keep their distance.

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
    /// Under the hybrid accelerator, the host TSC (the guest's) at `vm_ns`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_tsc: Option<u64>,
}

/// How far the host TSC's advance since a hybrid snapshot may stray from the wall
/// clock's before the TSC is taken for another host's, or another boot's.
const TSC_TOLERANCE_NS: u64 = 2_000_000_000;

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

pub(crate) fn save_vm(vm: &VmShared) -> hypervisor::Result<serde_json::Value> {
    let (tsc, vm_ns) = vm.clock.tsc_and_ns();
    let s = EmuVmState {
        chip: vm.chip.state(),
        vm_ns,
        boot_unix_ns: u64::try_from(vm.clock.boot_unix_ns()).unwrap_or(u64::MAX),
        host_tsc: vm.clock.host_tsc().then_some(tsc),
    };
    serde_json::to_value(s).map_err(state_error)
}

/// The VM time that passed since a hybrid VM state was saved at host TSC `saved`, by the
/// host TSC now (running at `tsc_hz`); refused when the TSC did not go on from there as
/// the wall clock did (`wall_ns` since): another host's TSC, or one reset by a reboot.
fn host_tsc_elapsed(
    saved: Option<u64>,
    now: u64,
    tsc_hz: u64,
    wall_ns: u64,
) -> hypervisor::Result<u64> {
    let refuse = |why: String| hypervisor::Error::Unsupported {
        what: format!(
            "restoring this hybrid snapshot here: the guest TSC is the host's, so a hybrid \
             snapshot goes on only on the host and in the boot it was taken in ({why})"
        ),
    };
    let Some(saved) = saved else {
        return Err(refuse("it holds no host TSC".into()));
    };
    let Some(ticks) = now.checked_sub(saved) else {
        return Err(refuse("the host TSC is behind the snapshot's".into()));
    };
    let ns = u64::try_from(u128::from(ticks) * 1_000_000_000 / u128::from(tsc_hz.max(1)))
        .unwrap_or(u64::MAX);
    if ns.abs_diff(wall_ns) > TSC_TOLERANCE_NS {
        return Err(refuse(format!(
            "the host TSC moved {} ms since, the wall clock {} ms",
            ns / 1_000_000,
            wall_ns / 1_000_000
        )));
    }
    Ok(ns)
}

pub(crate) fn restore_vm(
    vm: &VmShared,
    state: &serde_json::Value,
    elapsed_ns: u64,
) -> hypervisor::Result<()> {
    let s: EmuVmState = serde_json::from_value(state.clone()).map_err(state_error)?;
    // Under hybrid the VM time goes on by the guest's (the host's) TSC, checked first.
    let elapsed_ns = if vm.clock.host_tsc() {
        // SAFETY: RDTSC has no memory effects; every x86-64 host has it.
        let now = unsafe { std::arch::x86_64::_rdtsc() };
        host_tsc_elapsed(s.host_tsc, now, vm.clock.tsc_hz(), elapsed_ns)?
    } else if s.host_tsc.is_some() {
        return Err(state_error(
            "a hybrid VM state for a VM whose TSC is not the host's",
        ));
    } else {
        elapsed_ns
    };
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
    let s: EmuVcpuState = serde_json::from_value(state.clone()).map_err(state_error)?;
    // The TSC keeps its distance to the VM clock, which went on (see `restore_vm`).
    let tsc = s
        .cpu
        .tsc
        .wrapping_sub(s.vm_ns)
        .wrapping_add(vm.clock.now_ns());
    cpu.restore(&s.cpu, tsc);
    if vm.clock.host_tsc() {
        // The host's TSC with no offset, as user code reads it natively; the VM clock
        // went on by its advance (`restore_vm`), so they keep their distance.
        cpu.set_tsc_host(true);
    }
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

    /// A hybrid VM state goes on by the host TSC's advance when it agrees with the wall
    /// clock's, and is refused, naming why, when the TSC went back (a reboot) or moved
    /// other than the wall clock (another host).
    #[test]
    fn a_hybrid_state_goes_on_only_where_the_host_tsc_went_on() {
        let hz = 2_000_000_000;
        // 3 s of TSC at 2 GHz, 3.1 s of wall clock.
        assert_eq!(
            super::host_tsc_elapsed(Some(1_000), 1_000 + 6_000_000_000, hz, 3_100_000_000).unwrap(),
            3_000_000_000
        );
        for (saved, now, wall, why) in [
            (Some(10_000), 5_000, 1_000, "behind"),
            (Some(0), 60_000_000_000, 1_000_000_000, "moved 30000 ms"),
            (None, 5_000, 1_000, "no host TSC"),
        ] {
            let e = super::host_tsc_elapsed(saved, now, hz, wall)
                .unwrap_err()
                .to_string();
            assert!(e.contains(why) && e.contains("hybrid snapshot"), "{e}");
        }
    }
}
