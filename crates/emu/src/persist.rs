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
    // The clock first: the chip's timers are in its time.
    vm.clock
        .resume_at(s.vm_ns.saturating_add(elapsed_ns), s.boot_unix_ns);
    vm.chip.restore(&s.chip).map_err(state_error)?;
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
