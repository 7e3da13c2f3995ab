//! The accelerator seam's kick, ioevents and irqfds: the same small guests and checks on
//! both backends — `kvm` on this machine's /dev/kvm (a PVM host emulates CPL0 code
//! slowly, plenty for these few instructions) and `emu`; and what emu's dirty log sees.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arch::entry::{boot_msrs, boot_regs, boot_sregs, gdt, identity_page_tables, BootProtocol};
use hypervisor::kvm::KvmHypervisor;
use hypervisor::{
    DescriptorTable, EventFd, FpuState, Hypervisor, IoEventAddress, IoHandler, Vcpu, VcpuExit, Vm,
};
use iced_x86::code_asm::*;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

const MEM: usize = 8 << 20;
const CODE: u64 = 0x10_0000;
const HANDLER: u64 = 0x10_1000;
const IDT: u64 = 0x20_0000;
const VECTOR: u64 = 0x30;
/// The GSI the irqfd test raises (the first virtio-mmio device's).
const GSI: u32 = 16;

fn backends() -> Vec<Box<dyn Hypervisor>> {
    let kvm = KvmHypervisor::new().unwrap_or_else(|e| {
        panic!("these tests need /dev/kvm (load the kvm module and give this user access): {e}")
    });
    vec![Box::new(kvm), Box::new(emu::EmuHypervisor::new())]
}

/// Guest RAM, mapped for the test's lifetime (leaked: the VMs refer to it).
fn ram() -> &'static mut [u8] {
    // SAFETY: a fresh anonymous private mapping, checked below; never unmapped.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap of guest RAM");
    // SAFETY: `p` is a valid, writable mapping of MEM bytes owned by nobody else.
    unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), MEM) }
}

fn assemble(at: u64, body: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    body(&mut a).unwrap();
    a.assemble(at).unwrap()
}

/// A VM with one vCPU in 64-bit mode at CODE, `handler` at HANDLER as the handler of
/// interrupt VECTOR.
fn guest(hv: &dyn Hypervisor, code: &[u8], handler: &[u8]) -> (Arc<dyn Vm>, Box<dyn Vcpu>) {
    let mem = ram();
    let mut put = |at: u64, bytes: &[u8]| {
        mem[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
    };
    let g: Vec<u8> = gdt(BootProtocol::Linux64)
        .iter()
        .flat_map(|e| e.to_le_bytes())
        .collect();
    put(arch::layout::BOOT_GDT_START, &g);
    for (at, page) in identity_page_tables() {
        put(at, &page);
    }
    put(CODE, code);
    put(HANDLER, handler);
    // A 64-bit interrupt gate: offset, CS, present DPL0 interrupt gate.
    let mut gate = [0u8; 16];
    gate[0..2].copy_from_slice(&(HANDLER as u16).to_le_bytes());
    gate[2..4].copy_from_slice(&arch::entry::LINUX64_CS.to_le_bytes());
    gate[5] = 0x8e;
    gate[6..8].copy_from_slice(&((HANDLER >> 16) as u16).to_le_bytes());
    gate[8..12].copy_from_slice(&((HANDLER >> 32) as u32).to_le_bytes());
    put(IDT + VECTOR * 16, &gate);

    let vm = hv.create_vm(1).unwrap();
    // SAFETY: `mem` is leaked, so it outlives the VM.
    unsafe { vm.add_memory_region(0, 0, mem.as_mut_ptr(), MEM as u64) }.unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let cpuid = arch::cpuid::guest_cpuid(&hv.supported_cpuid().unwrap(), 0, 1);
    vcpu.set_cpuid(&cpuid).unwrap();
    vcpu.set_msrs(&boot_msrs()).unwrap();
    vcpu.configure_local_interrupts().unwrap();
    vcpu.set_regs(&boot_regs(BootProtocol::Linux64, CODE))
        .unwrap();
    let mut sregs = boot_sregs(BootProtocol::Linux64);
    sregs.idt = DescriptorTable {
        base: IDT,
        limit: 0xfff,
    };
    vcpu.set_sregs(&sregs).unwrap();
    vcpu.set_fpu(&FpuState::default()).unwrap();
    (vm, vcpu)
}

/// Records what reaches the VMM's side of the seam.
#[derive(Default)]
struct Recorder {
    mmio_writes: Mutex<Vec<(u64, Vec<u8>)>>,
    port_80: Mutex<Vec<u8>>,
}

impl IoHandler for Recorder {
    fn pio_read(&self, _: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        if port == 0x80 {
            self.port_80.lock().unwrap().extend_from_slice(data);
        }
    }
    fn mmio_read(&self, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.mmio_writes.lock().unwrap().push((addr, data.to_vec()));
    }
}

/// Runs until `done`, failing after `limit`.
fn run_until(
    name: &str,
    vcpu: &mut dyn Vcpu,
    io: &Recorder,
    limit: Duration,
    done: impl Fn(&Recorder) -> bool,
) {
    let t0 = Instant::now();
    while !done(io) {
        assert!(t0.elapsed() < limit, "{name}: the guest did not get there");
        match vcpu.run(io).unwrap() {
            VcpuExit::Io | VcpuExit::Interrupted | VcpuExit::Hlt => {}
            other => panic!("{name}: unexpected exit {other:?}"),
        }
    }
}

#[test]
fn a_kick_is_not_lost_before_run_and_ends_a_run_in_progress() {
    for hv in backends() {
        let name = hv.name();
        // Count in RAX forever, or sleep with interrupts off.
        let spin = assemble(CODE, |a| {
            let mut top = a.create_label();
            a.set_label(&mut top)?;
            a.inc(rax)?;
            a.jmp(top)
        });
        let (_vm, mut vcpu) = guest(&*hv, &spin, &[]);
        let io = Recorder::default();
        // Kicked before `run`: it returns without running the guest.
        vcpu.kicker().kick();
        assert_eq!(vcpu.run(&io).unwrap(), VcpuExit::Interrupted, "{name}");
        assert_eq!(
            vcpu.regs().unwrap().rax,
            0,
            "{name}: ran the guest after a kick"
        );

        // Kicked while halted with interrupts off: only the kick can end this `run`
        // under KVM (its in-kernel irqchip sleeps in KVM_RUN).
        let halt = assemble(CODE, |a| {
            a.cli()?;
            let mut top = a.create_label();
            a.set_label(&mut top)?;
            a.hlt()?;
            a.jmp(top)
        });
        let (_vm, mut vcpu) = guest(&*hv, &halt, &[]);
        let kicker = vcpu.kicker();
        let stop = Arc::new(AtomicBool::new(false));
        let t = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                stop.store(true, Ordering::SeqCst);
                kicker.kick();
            })
        };
        let t0 = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            // emu returns from a halt on its own now and then; KVM only for the kick.
            vcpu.run(&io).unwrap();
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "{name}: never kicked"
            );
        }
        t.join().unwrap();
    }
}

#[test]
fn an_ioevent_takes_a_matching_write_away_from_the_buses() {
    for hv in backends() {
        let name = hv.name();
        const DOORBELL: u64 = 0xd000_0050;
        let code = assemble(CODE, |a| {
            a.mov(eax, DOORBELL as u32)?;
            a.mov(dword_ptr(rax), 1)?;
            a.mov(dword_ptr(rax), 1)?;
            a.mov(dword_ptr(rax), 2)?;
            a.mov(al, 0xee)?;
            a.out(0x80, al)?;
            let mut top = a.create_label();
            a.set_label(&mut top)?;
            a.cli()?;
            a.hlt()?;
            a.jmp(top)
        });
        let (vm, mut vcpu) = guest(&*hv, &code, &[]);
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        vm.register_ioevent(IoEventAddress::Mmio(DOORBELL), Some(1), &fd)
            .unwrap();
        let io = Recorder::default();
        run_until(name, &mut *vcpu, &io, Duration::from_secs(20), |io| {
            !io.port_80.lock().unwrap().is_empty()
        });
        assert_eq!(
            fd.read().unwrap(),
            2,
            "{name}: both matching writes signalled"
        );
        assert_eq!(
            *io.mmio_writes.lock().unwrap(),
            vec![(DOORBELL, 2u32.to_le_bytes().to_vec())],
            "{name}: only the write that matched no ioevent reaches the buses"
        );
    }
}

#[test]
fn an_irqfd_write_interrupts_the_guest_through_its_gsi() {
    for hv in backends() {
        let name = hv.name();
        let code = assemble(CODE, |a| {
            // PICs masked, local APIC on, IOAPIC pin GSI to VECTOR (edge, fixed, CPU 0).
            a.mov(al, 0xff)?;
            a.out(0x21, al)?;
            a.out(0xa1, al)?;
            a.mov(eax, 0xfee0_00f0u32)?;
            a.mov(dword_ptr(rax), 0x1ff)?;
            a.mov(eax, 0xfec0_0000u32)?;
            a.mov(dword_ptr(rax), 0x10 + 2 * GSI)?;
            a.mov(dword_ptr(rax + 0x10), VECTOR as u32)?;
            a.mov(dword_ptr(rax), 0x11 + 2 * GSI)?;
            a.mov(dword_ptr(rax + 0x10), 0)?;
            a.mov(al, 1)?;
            a.out(0x80, al)?;
            a.sti()?;
            let mut top = a.create_label();
            a.set_label(&mut top)?;
            a.hlt()?;
            a.jmp(top)
        });
        let handler = assemble(HANDLER, |a| {
            a.mov(eax, 0xfee0_00b0u32)?;
            a.mov(dword_ptr(rax), 0)?;
            a.mov(al, 0x42)?;
            a.out(0x80, al)?;
            let mut top = a.create_label();
            a.set_label(&mut top)?;
            a.cli()?;
            a.hlt()?;
            a.jmp(top)
        });
        let (vm, mut vcpu) = guest(&*hv, &code, &handler);
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        vm.register_irqfd(GSI, &fd).unwrap();
        let io = Recorder::default();
        run_until(name, &mut *vcpu, &io, Duration::from_secs(20), |io| {
            *io.port_80.lock().unwrap() == [1]
        });
        // The guest now sleeps in HLT; the write comes from another thread, as a device
        // thread's completion would.
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            fd.write(1).unwrap();
        });
        run_until(name, &mut *vcpu, &io, Duration::from_secs(20), |io| {
            *io.port_80.lock().unwrap() == [1, 0x42]
        });
        writer.join().unwrap();
    }
}

/// Pulses GSI when the guest writes 1 to port 0x80; records port 0x80.
struct RaiseOnSignal {
    vm: std::sync::OnceLock<Arc<dyn Vm>>,
    rec: Recorder,
}

impl IoHandler for RaiseOnSignal {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.rec.pio_read(port, data);
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        if port == 0x80 && data == [1] {
            let vm = self.vm.get().expect("the VM is set before running");
            vm.irq_chip().pulse_irq_line(GSI).unwrap();
        }
        self.rec.pio_write(port, data);
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.rec.mmio_read(addr, data);
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.rec.mmio_write(addr, data);
    }
}

/// A guest that takes an interrupt while IF is clear, spins for several of emu's slices,
/// then (if `block`) raises its task priority above the interrupt's, sets IF with POPF
/// and writes 2 to port 0x80. Its handler writes 0x42.
fn window_guest(hv: &dyn Hypervisor, block: bool) -> (Arc<dyn Vm>, Box<dyn Vcpu>) {
    let code = assemble(CODE, |a| {
        a.cli()?;
        // Local APIC on, IOAPIC pin GSI to VECTOR (edge, fixed, CPU 0), then ask for it.
        a.mov(eax, 0xfee0_00f0u32)?;
        a.mov(dword_ptr(rax), 0x1ff)?;
        a.mov(eax, 0xfec0_0000u32)?;
        a.mov(dword_ptr(rax), 0x10 + 2 * GSI)?;
        a.mov(dword_ptr(rax + 0x10), VECTOR as u32)?;
        a.mov(dword_ptr(rax), 0x11 + 2 * GSI)?;
        a.mov(dword_ptr(rax + 0x10), 0)?;
        a.mov(al, 1)?;
        a.out(0x80, al)?;
        a.mov(ecx, 2_000_000)?;
        let mut spin = a.create_label();
        a.set_label(&mut spin)?;
        a.dec(ecx)?;
        a.jnz(spin)?;
        if block {
            a.mov(eax, 0xfee0_0080u32)?;
            a.mov(dword_ptr(rax), 0xf0)?;
        }
        // IF back on the way Linux's local_irq_restore does it.
        a.mov(rsp, IDT)?;
        a.pushfq()?;
        a.or(qword_ptr(rsp), 0x200)?;
        a.popfq()?;
        // A few blocks with IF set: where an interrupt that can be taken is taken.
        a.mov(ecx, 1000)?;
        let mut open = a.create_label();
        a.set_label(&mut open)?;
        a.dec(ecx)?;
        a.jnz(open)?;
        a.mov(al, 2)?;
        a.out(0x80, al)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.hlt()?;
        a.jmp(top)
    });
    let handler = assemble(HANDLER, |a| {
        a.mov(al, 0x42)?;
        a.out(0x80, al)?;
        a.mov(eax, 0xfee0_00b0u32)?;
        a.mov(dword_ptr(rax), 0)?;
        a.iretq()
    });
    guest(hv, &code, &handler)
}

#[test]
fn an_interrupt_blocked_while_if_is_clear_does_not_stall_the_cpu() {
    // Firmware left a line unmasked and Linux masks it with interrupts off: the interrupt
    // that was waiting can no longer be taken when IF is set again, and the CPU must go
    // on running (emu once kept asking for an interrupt window after the interrupt went
    // away, and returned from every `run` before the next instruction). emu only: the
    // window bookkeeping is its own, and PVM's KVM does not deliver this edge at all.
    {
        let hv = emu::EmuHypervisor::new();
        let name = hv.name();
        for (block, want) in [(false, vec![1, 0x42, 2]), (true, vec![1, 2])] {
            let (vm, mut vcpu) = window_guest(&hv, block);
            let io = RaiseOnSignal {
                vm: std::sync::OnceLock::new(),
                rec: Recorder::default(),
            };
            assert!(io.vm.set(vm).is_ok());
            let t0 = Instant::now();
            while io.rec.port_80.lock().unwrap().last() != Some(&2) {
                assert!(
                    t0.elapsed() < Duration::from_secs(20),
                    "{name} (blocked: {block}): the CPU stalled; port 0x80 saw {:?}",
                    io.rec.port_80.lock().unwrap()
                );
                match vcpu.run(&io).unwrap() {
                    VcpuExit::Io | VcpuExit::Interrupted | VcpuExit::Hlt => {}
                    other => panic!("{name}: unexpected exit {other:?}"),
                }
            }
            assert_eq!(
                *io.rec.port_80.lock().unwrap(),
                want,
                "{name} (blocked: {block})"
            );
        }
    }
}

fn page_dirty(log: &[u64], gpa: u64) -> bool {
    let pfn = gpa >> 12;
    log.get((pfn / 64) as usize)
        .is_some_and(|w| w >> (pfn % 64) & 1 == 1)
}

/// emu's dirty log holds the pages its platform writes on the guest's behalf (kvmclock's
/// time info and wall clock, the paused flag), not only the guest's own stores: a Diff
/// snapshot or a migration round that missed them would restore a stale clock page.
#[test]
fn emu_dirty_log_holds_the_pages_kvmclock_writes() {
    const TIME_INFO: u64 = 0x40_0000;
    const WALL_CLOCK: u64 = 0x40_2000;
    const UNTOUCHED: u64 = 0x40_1000;
    let hv = emu::EmuHypervisor::new();
    let code = assemble(CODE, |a| {
        a.mov(ecx, 0x4b56_4d01u32)?; // MSR_KVM_SYSTEM_TIME_NEW
        a.mov(eax, TIME_INFO as u32 | 1)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.mov(ecx, 0x4b56_4d00u32)?; // MSR_KVM_WALL_CLOCK_NEW
        a.mov(eax, WALL_CLOCK as u32)?;
        a.wrmsr()?;
        a.mov(al, 0xee)?;
        a.out(0x80, al)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.cli()?;
        a.hlt()?;
        a.jmp(top)
    });
    let (vm, mut vcpu) = guest(&hv, &code, &[]);
    // The first take starts the log (every page counts as written).
    assert!(page_dirty(&vm.take_dirty_log().unwrap(), TIME_INFO));
    assert!(!page_dirty(&vm.take_dirty_log().unwrap(), TIME_INFO));
    let io = Recorder::default();
    run_until("emu", &mut *vcpu, &io, Duration::from_secs(20), |io| {
        !io.port_80.lock().unwrap().is_empty()
    });
    let log = vm.take_dirty_log().unwrap();
    assert!(page_dirty(&log, TIME_INFO), "kvmclock's time info page");
    assert!(page_dirty(&log, WALL_CLOCK), "kvmclock's wall clock page");
    assert!(!page_dirty(&log, UNTOUCHED), "a page nothing wrote");
    // Telling the guest it was paused sets a flag in its time info page.
    vcpu.guest_paused().unwrap();
    let log = vm.take_dirty_log().unwrap();
    assert!(page_dirty(&log, TIME_INFO), "the paused flag's page");
    assert!(!page_dirty(&log, WALL_CLOCK));
}
