//! Which `ioctl` requests each kind of VMM thread may make, by exact request number (the
//! filter compares the second argument), as Firecracker's per-thread filters do. A
//! thread that was never seen to make a request is not allowed it: the vCPU's state
//! and KVM_RUN only on vCPU threads (and reading it on the API's, which snapshots the
//! paused vCPUs), interrupts where devices raise them, the VM's memory slots and
//! interrupt controllers never after the build but where a snapshot or migration reads
//! them.
//!
//! Request numbers are built as `<asm-generic/ioctl.h>` builds them, from the sizes of
//! the kernel's structures as kvm-bindings declares them (the same source kvm-ioctls
//! takes them from), so they match what the VMM really sends; the unit tests pin a few
//! against the values in `<linux/kvm.h>`.

use std::mem::size_of;

use kvm_bindings as kb;

use crate::filters::Role;

const KVMIO: u64 = 0xae;

const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}
const fn io(nr: u64) -> u64 {
    ioc(0, KVMIO, nr, 0)
}
const fn iow(nr: u64, size: usize) -> u64 {
    ioc(1, KVMIO, nr, size)
}
const fn ior(nr: u64, size: usize) -> u64 {
    ioc(2, KVMIO, nr, size)
}
const fn iowr(nr: u64, size: usize) -> u64 {
    ioc(3, KVMIO, nr, size)
}

// /dev/kvm's requests (the build's; KVM_CHECK_EXTENSION also on the VM's descriptor).
pub(crate) const KVM_CHECK_EXTENSION: u64 = io(0x03);
pub(crate) const KVM_GET_VCPU_MMAP_SIZE: u64 = io(0x04);
pub(crate) const KVM_GET_SUPPORTED_CPUID: u64 = iowr(0x05, size_of::<kb::kvm_cpuid2>());

// The VM's requests.
pub(crate) const KVM_CREATE_VM: u64 = io(0x01);
pub(crate) const KVM_CREATE_VCPU: u64 = io(0x41);
pub(crate) const KVM_GET_DIRTY_LOG: u64 = iow(0x42, size_of::<kb::kvm_dirty_log>());
pub(crate) const KVM_CLEAR_DIRTY_LOG: u64 = iowr(0xc0, size_of::<kb::kvm_clear_dirty_log>());
pub(crate) const KVM_SET_USER_MEMORY_REGION: u64 =
    iow(0x46, size_of::<kb::kvm_userspace_memory_region>());
pub(crate) const KVM_SET_TSS_ADDR: u64 = io(0x47);
pub(crate) const KVM_SET_IDENTITY_MAP_ADDR: u64 = iow(0x48, size_of::<u64>());
pub(crate) const KVM_CREATE_IRQCHIP: u64 = io(0x60);
pub(crate) const KVM_IRQ_LINE: u64 = iow(0x61, size_of::<kb::kvm_irq_level>());
pub(crate) const KVM_GET_IRQCHIP: u64 = iowr(0x62, size_of::<kb::kvm_irqchip>());
pub(crate) const KVM_SET_IRQCHIP: u64 = ior(0x63, size_of::<kb::kvm_irqchip>());
pub(crate) const KVM_SET_GSI_ROUTING: u64 = iow(0x6a, size_of::<kb::kvm_irq_routing>());
pub(crate) const KVM_IRQFD: u64 = iow(0x76, size_of::<kb::kvm_irqfd>());
pub(crate) const KVM_CREATE_PIT2: u64 = iow(0x77, size_of::<kb::kvm_pit_config>());
pub(crate) const KVM_IOEVENTFD: u64 = iow(0x79, size_of::<kb::kvm_ioeventfd>());
pub(crate) const KVM_SET_CLOCK: u64 = iow(0x7b, size_of::<kb::kvm_clock_data>());
pub(crate) const KVM_GET_CLOCK: u64 = ior(0x7c, size_of::<kb::kvm_clock_data>());
pub(crate) const KVM_GET_PIT2: u64 = ior(0x9f, size_of::<kb::kvm_pit_state2>());
pub(crate) const KVM_SET_PIT2: u64 = iow(0xa0, size_of::<kb::kvm_pit_state2>());
pub(crate) const KVM_SIGNAL_MSI: u64 = iow(0xa5, size_of::<kb::kvm_msi>());
pub(crate) const KVM_CREATE_DEVICE: u64 = iowr(0xe0, size_of::<kb::kvm_create_device>());
/// On the VM's descriptor (the hybrid accelerator's TSC rate) as on a vCPU's.
pub(crate) const KVM_GET_TSC_KHZ: u64 = io(0xa3);

// A vCPU's requests.
pub(crate) const KVM_RUN: u64 = io(0x80);
pub(crate) const KVM_GET_REGS: u64 = ior(0x81, size_of::<kb::kvm_regs>());
pub(crate) const KVM_SET_REGS: u64 = iow(0x82, size_of::<kb::kvm_regs>());
pub(crate) const KVM_GET_SREGS: u64 = ior(0x83, size_of::<kb::kvm_sregs>());
pub(crate) const KVM_SET_SREGS: u64 = iow(0x84, size_of::<kb::kvm_sregs>());
pub(crate) const KVM_TRANSLATE: u64 = iowr(0x85, size_of::<kb::kvm_translation>());
pub(crate) const KVM_INTERRUPT: u64 = iow(0x86, size_of::<kb::kvm_interrupt>());
pub(crate) const KVM_GET_MSRS: u64 = iowr(0x88, size_of::<kb::kvm_msrs>());
pub(crate) const KVM_SET_MSRS: u64 = iow(0x89, size_of::<kb::kvm_msrs>());
pub(crate) const KVM_GET_FPU: u64 = ior(0x8c, size_of::<kb::kvm_fpu>());
pub(crate) const KVM_SET_FPU: u64 = iow(0x8d, size_of::<kb::kvm_fpu>());
pub(crate) const KVM_GET_LAPIC: u64 = ior(0x8e, size_of::<kb::kvm_lapic_state>());
pub(crate) const KVM_SET_LAPIC: u64 = iow(0x8f, size_of::<kb::kvm_lapic_state>());
pub(crate) const KVM_SET_CPUID2: u64 = iow(0x90, size_of::<kb::kvm_cpuid2>());
pub(crate) const KVM_GET_CPUID2: u64 = iowr(0x91, size_of::<kb::kvm_cpuid2>());
pub(crate) const KVM_GET_MP_STATE: u64 = ior(0x98, size_of::<kb::kvm_mp_state>());
pub(crate) const KVM_SET_MP_STATE: u64 = iow(0x99, size_of::<kb::kvm_mp_state>());
pub(crate) const KVM_NMI: u64 = io(0x9a);
pub(crate) const KVM_SET_GUEST_DEBUG: u64 = iow(0x9b, size_of::<kb::kvm_guest_debug>());
pub(crate) const KVM_GET_VCPU_EVENTS: u64 = ior(0x9f, size_of::<kb::kvm_vcpu_events>());
pub(crate) const KVM_SET_VCPU_EVENTS: u64 = iow(0xa0, size_of::<kb::kvm_vcpu_events>());
pub(crate) const KVM_GET_DEBUGREGS: u64 = ior(0xa1, size_of::<kb::kvm_debugregs>());
pub(crate) const KVM_SET_DEBUGREGS: u64 = iow(0xa2, size_of::<kb::kvm_debugregs>());
pub(crate) const KVM_GET_XSAVE: u64 = ior(0xa4, size_of::<kb::kvm_xsave>());
pub(crate) const KVM_SET_XSAVE: u64 = iow(0xa5, size_of::<kb::kvm_xsave>());
pub(crate) const KVM_GET_XCRS: u64 = ior(0xa6, size_of::<kb::kvm_xcrs>());
pub(crate) const KVM_SET_XCRS: u64 = iow(0xa7, size_of::<kb::kvm_xcrs>());
pub(crate) const KVM_KVMCLOCK_CTRL: u64 = io(0xad);
pub(crate) const KVM_GET_XSAVE2: u64 = ior(0xcf, size_of::<kb::kvm_xsave>());

// Terminals (the console) and TAP devices (`<asm-generic/ioctls.h>`, `<linux/if_tun.h>`).
pub(crate) const TCGETS: u64 = 0x5401;
pub(crate) const TCSETS: u64 = 0x5402;
pub(crate) const TCSETSW: u64 = 0x5403;
pub(crate) const TCSETSF: u64 = 0x5404;
pub(crate) const TIOCGWINSZ: u64 = 0x5413;
pub(crate) const FIONREAD: u64 = 0x541b;
pub(crate) const FIONBIO: u64 = 0x5421;
pub(crate) const FIONCLEX: u64 = 0x5450;
pub(crate) const FIOCLEX: u64 = 0x5451;
pub(crate) const TUNSETIFF: u64 = ioc(1, b'T' as u64, 202, size_of::<libc::c_int>());
pub(crate) const TUNSETOFFLOAD: u64 = ioc(1, b'T' as u64, 208, size_of::<libc::c_uint>());
pub(crate) const TUNSETVNETHDRSZ: u64 = ioc(1, b'T' as u64, 216, size_of::<libc::c_int>());
pub(crate) const TUNSETQUEUE: u64 = ioc(1, b'T' as u64, 217, size_of::<libc::c_int>());
/// No confined thread's: what a TAP handed over by a migration's source is, checked
/// while the VM is built.
#[cfg(test)]
pub(crate) const TUNGETIFF: u64 = ioc(2, b'T' as u64, 210, size_of::<libc::c_uint>());

/// Raising interrupts: every thread that runs a device model (a device's I/O thread, the
/// console's input, a vCPU's register write, the API's power button).
const INTERRUPTS: &[u64] = &[KVM_IRQ_LINE, KVM_SIGNAL_MSI];

/// Reading a vCPU's whole state: the vCPU itself, and a snapshot of the paused vCPUs.
const VCPU_READ: &[u64] = &[
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_GET_FPU,
    KVM_GET_MSRS,
    KVM_GET_LAPIC,
    KVM_GET_XSAVE,
    KVM_GET_XSAVE2,
    KVM_GET_XCRS,
    KVM_GET_VCPU_EVENTS,
    KVM_GET_MP_STATE,
    KVM_GET_DEBUGREGS,
    KVM_GET_CPUID2,
    KVM_GET_TSC_KHZ,
];

/// Running a vCPU and setting its state (a reset, an injected interrupt, the hybrid
/// accelerator's switches between emulation and native runs).
const VCPU_RUN: &[u64] = &[
    KVM_RUN,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    KVM_SET_FPU,
    KVM_SET_MSRS,
    KVM_SET_LAPIC,
    KVM_SET_XSAVE,
    KVM_SET_XCRS,
    KVM_SET_VCPU_EVENTS,
    KVM_SET_MP_STATE,
    KVM_SET_DEBUGREGS,
    KVM_SET_CPUID2,
    KVM_SET_GUEST_DEBUG,
    KVM_TRANSLATE,
    KVM_INTERRUPT,
    KVM_NMI,
    KVM_KVMCLOCK_CTRL,
    // A virtio device the guest activates (a register write, on its vCPU) gets its
    // notifications and interrupts as eventfds; a PCI BAR moved by the guest moves its
    // ioeventfds.
    KVM_IOEVENTFD,
    KVM_IRQFD,
];

/// The hybrid accelerator sets its KVM vCPU up on the vCPU's thread (made with the
/// vCPU, on the main thread), and maps and remaps guest memory there; around each
/// native stint it arms and reads the dirty log of the pages x86emu holds code from.
const HYBRID_VCPU: &[u64] = &[
    KVM_SET_USER_MEMORY_REGION,
    KVM_GET_DIRTY_LOG,
    KVM_CLEAR_DIRTY_LOG,
    KVM_CHECK_EXTENSION,
];

/// A snapshot or migration (on the API's thread): the VM's interrupt controllers, PIT
/// and clock, its dirty log, and dirty logging switched on the memory slots.
const VM_READ: &[u64] = &[
    KVM_GET_IRQCHIP,
    KVM_GET_PIT2,
    KVM_GET_CLOCK,
    KVM_GET_DIRTY_LOG,
    KVM_SET_USER_MEMORY_REGION,
];

/// Requests on file descriptors every thread may hold: a descriptor's close-on-exec and
/// blocking flags (std's `set_nonblocking` on a socket is FIONBIO) and whether it is a
/// terminal (logging asks).
const ANY_FD: &[u64] = &[TCGETS, FIONBIO, FIOCLEX, FIONCLEX, FIONREAD];

/// The terminal's raw mode, set and restored by the console and, at the end, the main
/// thread.
const TERMINAL: &[u64] = &[TCSETS, TCSETSW, TCSETSF, TIOCGWINSZ];

/// A TAP's offloads, set when the guest acknowledges virtio-net's features, and which
/// of a multi-queue TAP's queues the kernel may use (the guest's queue pairs in use).
const TAP: &[u64] = &[TUNSETOFFLOAD, TUNSETVNETHDRSZ, TUNSETQUEUE];

/// Requests on a TAP queue's descriptor. Once the VM is built (`crate::pin_fds`), on
/// the VM's TAP queues only, in every role.
pub(crate) const ON_TAP: &[u64] = TAP;

/// The requests a thread of `role` may make. Never in any role: creating a VM, its
/// vCPUs, its interrupt controllers, PIT or devices, its TSS and identity map, restoring the VM's
/// state (the build does all that on the main thread before any filter), attaching a
/// TAP to another interface (TUNSETIFF), or routing GSIs.
pub(crate) fn allowed(role: Role) -> Vec<u64> {
    let mut v: Vec<u64> = ANY_FD.to_vec();
    let mut add = |s: &[u64]| v.extend_from_slice(s);
    match role {
        Role::Vcpu => {
            add(INTERRUPTS);
            add(VCPU_READ);
            add(VCPU_RUN);
            add(HYBRID_VCPU);
            add(TAP);
        }
        Role::Api => {
            add(INTERRUPTS);
            add(VCPU_READ);
            add(VM_READ);
        }
        Role::Io | Role::Vsock => {
            add(INTERRUPTS);
            add(TAP);
        }
        Role::Console => {
            add(INTERRUPTS);
            add(TERMINAL);
        }
        Role::Main => add(TERMINAL),
    }
    // Whatever the lists above say.
    v.retain(|nr| !BUILD_ONLY.contains(nr));
    v.sort_unstable();
    v.dedup();
    v
}

/// Requests on one vCPU's descriptor: its state and running it. Once the VM is built
/// (`crate::pin_fds`) a vCPU thread makes them on its own vCPU's descriptor only,
/// the API's on the VM's vCPUs' only.
pub(crate) fn on_vcpu() -> Vec<u64> {
    let mut v: Vec<u64> = VCPU_READ
        .iter()
        .chain(VCPU_RUN)
        .copied()
        .filter(|nr| !ON_VM.contains(nr) && !ON_VM_OR_VCPU.contains(nr))
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Requests on the VM's descriptor: interrupts, eventfds, memory slots, the dirty log,
/// the interrupt controllers' and clock's state. Once the VM is built, on its
/// descriptor only, in every role.
pub(crate) const ON_VM: &[u64] = &[
    KVM_IRQ_LINE,
    KVM_SIGNAL_MSI,
    KVM_IOEVENTFD,
    KVM_IRQFD,
    KVM_SET_USER_MEMORY_REGION,
    KVM_GET_DIRTY_LOG,
    KVM_CLEAR_DIRTY_LOG,
    KVM_CHECK_EXTENSION,
    KVM_GET_IRQCHIP,
    KVM_GET_PIT2,
    KVM_GET_CLOCK,
];

/// Requests valid on the VM's descriptor and on a vCPU's.
pub(crate) const ON_VM_OR_VCPU: &[u64] = &[KVM_GET_TSC_KHZ];

/// Requests no confined thread may make (the build's, before any filter).
pub(crate) const BUILD_ONLY: &[u64] = &[
    KVM_CREATE_VM,
    KVM_CREATE_VCPU,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_GET_SUPPORTED_CPUID,
    KVM_CREATE_IRQCHIP,
    KVM_CREATE_PIT2,
    KVM_CREATE_DEVICE,
    KVM_SET_TSS_ADDR,
    KVM_SET_IDENTITY_MAP_ADDR,
    KVM_SET_IRQCHIP,
    KVM_SET_PIT2,
    KVM_SET_CLOCK,
    KVM_SET_GSI_ROUTING,
    TUNSETIFF,
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers as `<linux/kvm.h>` and `<linux/if_tun.h>` give them on x86-64.
    #[test]
    fn request_numbers_are_the_kernels() {
        for (got, want) in [
            (KVM_RUN, 0xae80),
            (KVM_CREATE_VM, 0xae01),
            (KVM_CREATE_VCPU, 0xae41),
            (KVM_SET_USER_MEMORY_REGION, 0x4020_ae46),
            (KVM_IRQ_LINE, 0x4008_ae61),
            (KVM_SIGNAL_MSI, 0x4020_aea5),
            (KVM_IRQFD, 0x4020_ae76),
            (KVM_IOEVENTFD, 0x4040_ae79),
            (KVM_CREATE_PIT2, 0x4040_ae77),
            (KVM_CREATE_DEVICE, 0xc00c_aee0),
            (KVM_GET_REGS, 0x8090_ae81),
            (KVM_SET_SREGS, 0x4138_ae84),
            (KVM_GET_MSRS, 0xc008_ae88),
            (KVM_SET_CPUID2, 0x4008_ae90),
            (KVM_GET_SUPPORTED_CPUID, 0xc008_ae05),
            (KVM_GET_LAPIC, 0x8400_ae8e),
            (KVM_GET_XSAVE, 0x9000_aea4),
            (KVM_GET_VCPU_EVENTS, 0x8040_ae9f),
            (KVM_GET_PIT2, 0x8070_ae9f),
            (KVM_GET_IRQCHIP, 0xc208_ae62),
            (KVM_GET_CLOCK, 0x8030_ae7c),
            (KVM_GET_DIRTY_LOG, 0x4010_ae42),
            (KVM_CLEAR_DIRTY_LOG, 0xc018_aec0),
            (KVM_SET_IDENTITY_MAP_ADDR, 0x4008_ae48),
            (TUNSETIFF, 0x4004_54ca),
            (TUNSETOFFLOAD, 0x4004_54d0),
            (TUNSETVNETHDRSZ, 0x4004_54d8),
            (TUNSETQUEUE, 0x4004_54d9),
            (TUNGETIFF, 0x8004_54d2),
        ] {
            assert_eq!(got, want, "{got:#x} should be {want:#x}");
        }
    }

    #[test]
    fn only_vcpu_threads_run_a_vcpu_and_no_thread_builds_a_vm() {
        for role in Role::ALL {
            let a = allowed(role);
            assert_eq!(a.contains(&KVM_RUN), role == Role::Vcpu, "{role:?}");
            assert_eq!(a.contains(&KVM_SET_REGS), role == Role::Vcpu, "{role:?}");
            assert_eq!(
                a.contains(&KVM_GET_REGS),
                matches!(role, Role::Vcpu | Role::Api),
                "{role:?}"
            );
            for nr in BUILD_ONLY {
                assert!(!a.contains(nr), "{role:?} may {nr:#x}");
            }
        }
    }
}
