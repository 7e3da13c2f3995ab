//! Exceptions, interrupts, system instructions and mode switches through the run API.

mod common;

use common::*;
use iced_x86::code_asm::*;
use x86emu::exceptions::vector;
use x86emu::state::{cr, flags, Seg};
use x86emu::testing::{PTE_U, PTE_W};
use x86emu::{NoDevices, Platform, RunExit};

const HANDLER: u64 = 0x18_0000;

/// A handler that stores [rsp], [rsp+8], [rsp+16], [rsp+24], CR2 and RSP to DATA and halts.
fn record_handler(g: &Guest) {
    let code = asm(64, HANDLER, |a| {
        a.mov(r15, DATA).unwrap();
        for i in 0..5 {
            a.mov(rax, qword_ptr(rsp + 8 * i)).unwrap();
            a.mov(qword_ptr(r15 + 8 * i), rax).unwrap();
        }
        a.mov(rax, cr2).unwrap();
        a.mov(qword_ptr(r15 + 40), rax).unwrap();
        a.mov(qword_ptr(r15 + 48), rsp).unwrap();
        a.hlt().unwrap();
    });
    g.load(HANDLER, &code);
}

#[test]
fn page_fault_is_delivered_through_the_idt_with_error_code() {
    let mut g = Guest::new();
    record_handler(&g);
    g.set_gate(vector::PF, HANDLER, 0, 0);
    g.load_code(|a| {
        a.mov(rbx, 0x7000_0000_0000u64).unwrap();
        a.mov(qword_ptr(rbx), rax).unwrap();
    });
    assert_eq!(g.cpu.run(&mut NoDevices, 100), RunExit::Halted);
    assert_eq!(g.read_u64(DATA), 2, "error code: not present, write");
    assert_eq!(g.read_u64(DATA + 8), CODE + 10, "faulting RIP");
    assert_eq!(g.read_u64(DATA + 16), 0x08, "CS");
    assert_eq!(g.read_u64(DATA + 40), 0x7000_0000_0000, "CR2");
    assert_eq!(
        g.read_u64(DATA + 48),
        0x70000 - 48,
        "same-privilege frame on the current stack"
    );
}

#[test]
fn ist_stack_and_interrupt_gate_clears_if() {
    let mut g = Guest::new();
    record_handler(&g);
    g.set_gate(vector::UD, HANDLER, 1, 0);
    g.load_code(|a| {
        a.sti().unwrap();
        a.ud2().unwrap();
    });
    assert_eq!(g.cpu.run(&mut NoDevices, 100), RunExit::Halted);
    assert_eq!(
        g.read_u64(DATA),
        CODE + 1,
        "#UD has no error code: RIP first"
    );
    assert_ne!(g.read_u64(DATA + 16) & flags::IF, 0, "pushed RFLAGS had IF");
    assert_eq!(g.read_u64(DATA + 48), IST1 - 40, "IST1 stack");
    assert_eq!(g.cpu.state().rflags & flags::IF, 0);
}

#[test]
fn user_interrupt_switches_to_rsp0_and_iretq_returns() {
    let mut g = Guest::new();
    // User code and stack pages.
    g.map4k(0x5000_0000, 0x31_0000, PTE_U);
    g.map4k(0x5000_1000, 0x31_1000, PTE_U | PTE_W);
    let user = asm(64, 0x5000_0000, |a| {
        a.mov(rax, 1u64).unwrap();
        a.int(0x80).unwrap();
        a.add(rax, 1).unwrap(); // rax = handler's value + 1
        a.int(0x81).unwrap(); // DPL0 gate: #GP from user mode
    });
    g.load(0x31_0000, &user);
    let handler = asm(64, HANDLER, |a| {
        a.mov(r15, DATA).unwrap();
        a.mov(qword_ptr(r15), rsp).unwrap();
        a.mov(rax, 41u64).unwrap();
        a.iretq().unwrap();
    });
    g.load(HANDLER, &handler);
    g.set_gate(0x80, HANDLER, 0, 3);
    g.set_gate(0x81, HANDLER, 0, 0);
    let gp = asm(64, HANDLER + 0x100, |a| {
        a.mov(r15, DATA).unwrap();
        a.mov(rcx, qword_ptr(rsp)).unwrap();
        a.mov(qword_ptr(r15 + 8), rcx).unwrap();
        a.hlt().unwrap();
    });
    g.load(HANDLER + 0x100, &gp);
    g.set_gate(vector::GP, HANDLER + 0x100, 0, 0);
    let mut st = g.cpu.state().clone();
    st.seg[Seg::Cs as usize] = x86emu::testing::code64(0x20, 3);
    st.seg[Seg::Ss as usize] = x86emu::testing::data(0x18, 3);
    st.rip = 0x5000_0000;
    st.gpr[4] = 0x5000_2000;
    g.cpu.set_state(st);
    assert_eq!(g.cpu.run(&mut NoDevices, 100), RunExit::Halted);
    assert_eq!(g.read_u64(DATA), RSP0 - 40, "RSP0 stack with SS:RSP frame");
    assert_eq!(g.cpu.state().gpr[0], 42);
    assert_eq!(
        g.read_u64(DATA + 8),
        0x81 * 8 + 2,
        "#GP error code names the IDT entry"
    );
}

#[test]
fn double_fault_then_triple_fault_shutdown() {
    let mut g = Guest::new();
    record_handler(&g);
    // #PF gate not present -> #NP while delivering #PF -> #DF.
    g.set_gate(vector::DF, HANDLER, 0, 0);
    g.load_code(|a| {
        a.mov(rbx, 0x7000_0000_0000u64).unwrap();
        a.mov(rax, qword_ptr(rbx)).unwrap();
    });
    assert_eq!(g.cpu.run(&mut NoDevices, 100), RunExit::Halted);
    assert_eq!(g.read_u64(DATA), 0, "#DF error code 0");
    // Without a #DF handler the same fault shuts down.
    let mut g = Guest::new();
    g.load_code(|a| {
        a.mov(rbx, 0x7000_0000_0000u64).unwrap();
        a.mov(rax, qword_ptr(rbx)).unwrap();
    });
    assert_eq!(g.cpu.run(&mut NoDevices, 100), RunExit::Shutdown);
}

#[test]
fn divide_error_and_undefined_opcode_vectors() {
    let mut g = Guest::new();
    g.load_code(|a| {
        a.xor(ecx, ecx).unwrap();
        a.div(rcx).unwrap();
    });
    g.cpu.execute_one(&mut NoDevices).unwrap();
    assert_eq!(
        g.cpu.execute_one(&mut NoDevices).unwrap_err().vector,
        vector::DE
    );
    g.load(CODE, &[0x0f, 0x0b]);
    let mut st = g.cpu.state().clone();
    st.rip = CODE;
    g.cpu.set_state(st);
    assert_eq!(
        g.cpu.execute_one(&mut NoDevices).unwrap_err().vector,
        vector::UD
    );
    // Unknown MSR: #GP(0).
    g.load(CODE, &asm(64, CODE, |a| a.rdmsr().unwrap()));
    let mut st = g.cpu.state().clone();
    st.rip = CODE;
    st.gpr[1] = 0x1234_5678;
    g.cpu.set_state(st);
    let f = g.cpu.execute_one(&mut NoDevices).unwrap_err();
    assert_eq!((f.vector, f.error), (vector::GP, Some(0)));
}

#[test]
fn syscall_sysret_swapgs_roundtrip() {
    let mut g = Guest::new();
    g.map4k(0x5000_0000, 0x31_0000, PTE_U);
    let user = asm(64, 0x5000_0000, |a| {
        a.mov(rax, 7u64).unwrap();
        a.syscall().unwrap();
        a.mov(rbx, rax).unwrap();
        a.hlt().unwrap(); // #GP at CPL3
    });
    g.load(0x31_0000, &user);
    let kernel = asm(64, HANDLER, |a| {
        a.swapgs().unwrap();
        a.mov(rax, qword_ptr(0u64).gs()).unwrap();
        a.swapgs().unwrap();
        a.sysretq().unwrap();
    });
    g.load(HANDLER, &kernel);
    g.load(DATA, &99u64.to_le_bytes());
    let mut st = g.cpu.state().clone();
    st.msr.lstar = HANDLER;
    st.msr.star = (0x08u64 << 32) | (0x10u64 << 48);
    st.msr.sfmask = flags::IF;
    st.msr.kernel_gs_base = DATA;
    st.seg[Seg::Cs as usize] = x86emu::testing::code64(0x20, 3);
    st.seg[Seg::Ss as usize] = x86emu::testing::data(0x18, 3);
    st.rflags |= flags::IF;
    st.rip = 0x5000_0000;
    g.cpu.set_state(st);
    for _ in 0..7 {
        g.cpu.execute_one(&mut NoDevices).unwrap();
    }
    let s = g.cpu.state();
    assert_eq!(s.gpr[3], 99);
    assert_eq!(s.seg[Seg::Cs as usize].selector, 0x23);
    assert_eq!(s.seg[Seg::Ss as usize].selector, 0x1b);
    assert_eq!(s.cpl(), 3);
    assert_ne!(s.rflags & flags::IF, 0, "RFLAGS restored from R11");
    assert_eq!(
        g.cpu.execute_one(&mut NoDevices).unwrap_err().vector,
        vector::GP
    );
}

/// Records port writes; asks to stop on port 0xf4.
#[derive(Default)]
struct Ports {
    out: Vec<(u16, u32)>,
    stop: bool,
}
impl Platform for Ports {
    fn mmio_read(&mut self, _gpa: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn mmio_write(&mut self, _gpa: u64, _data: &[u8]) {}
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        data.fill(port as u8);
    }
    fn pio_write(&mut self, port: u16, data: &[u8]) {
        let mut v = [0u8; 4];
        v[..data.len()].copy_from_slice(data);
        self.out.push((port, u32::from_le_bytes(v)));
        self.stop = port == 0xf4;
    }
    fn stop_requested(&mut self) -> bool {
        std::mem::take(&mut self.stop)
    }
    fn msr_read(&mut self, index: u32) -> Option<u64> {
        (index == 0x4b56_4d01).then_some(0x1234_5678_9abc)
    }
    fn msr_write(&mut self, index: u32, value: u64) -> Option<bool> {
        if index == 0x4b56_4d01 {
            self.out.push((0xffff, value as u32));
            self.stop = true;
            Some(true)
        } else {
            None
        }
    }
}

#[test]
fn platform_msrs_and_stop_request() {
    let mut g = Guest::new();
    g.load_code(|a| {
        a.mov(ecx, 0x4b56_4d01u32).unwrap();
        a.rdmsr().unwrap();
        a.mov(eax, 0x77).unwrap();
        a.wrmsr().unwrap();
        a.hlt().unwrap();
    });
    let mut ports = Ports::default();
    assert_eq!(g.cpu.run(&mut ports, 100), RunExit::StopRequested);
    let s = g.cpu.state();
    assert_eq!((s.gpr[0], s.gpr[2]), (0x77, 0x1234));
    assert_eq!(ports.out, vec![(0xffff, 0x77)]);
    assert_eq!(g.cpu.run(&mut ports, 100), RunExit::Halted);
}

/// Real mode -> protected mode -> long mode, the path an AP trampoline takes.
#[test]
fn real_to_protected_to_long_mode() {
    let g = Guest::new();
    let mut cpu = g.cpu;
    cpu.init(true);
    assert_eq!(cpu.run(&mut NoDevices, 10), RunExit::WaitForSipi);
    // GDT at 0x8000: null, code32 0x08, data 0x10, code64 0x18.
    let gdt: [u64; 4] = [
        0,
        0x00cf_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00af_9b00_0000_ffff,
    ];
    for (i, e) in gdt.iter().enumerate() {
        cpu.ram().write(0x8000 + i as u64 * 8, &e.to_le_bytes());
    }
    // GDTR image at 0x8100.
    let mut gdtr = vec![0x1f, 0];
    gdtr.extend_from_slice(&0x8000u32.to_le_bytes());
    cpu.ram().write(0x8100, &gdtr);
    let real = asm(16, 0x7000, |a| {
        a.cli().unwrap();
        a.mov(ax, 0x55).unwrap();
        a.out(0x80, al).unwrap();
        a.lgdt(ptr(0x8100u64)).unwrap();
        a.mov(eax, cr0).unwrap();
        a.or(eax, 1).unwrap();
        a.mov(cr0, eax).unwrap();
        // jmp far 0x08:0x7100 (o32)
        a.db(&[0x66, 0xea]).unwrap();
        a.dd(&[0x7100]).unwrap();
        a.dw(&[0x08]).unwrap();
    });
    cpu.ram().write(0x7000, &real);
    let prot = asm(32, 0x7100, |a| {
        a.mov(ax, 0x10).unwrap();
        a.mov(ds, ax).unwrap();
        a.mov(ss, ax).unwrap();
        a.mov(esp, 0x7000).unwrap();
        a.push(0x1234_5678u32).unwrap();
        a.pop(ebx).unwrap();
        a.mov(eax, cr4).unwrap();
        a.or(eax, 1 << 5).unwrap();
        a.mov(cr4, eax).unwrap();
        a.mov(eax, PT_START as u32).unwrap();
        a.mov(cr3, eax).unwrap();
        a.mov(ecx, 0xc000_0080u32).unwrap();
        a.rdmsr().unwrap();
        a.or(eax, 1 << 8).unwrap();
        a.wrmsr().unwrap();
        a.mov(eax, cr0).unwrap();
        a.or(eax, 0x8000_0000u32).unwrap();
        a.mov(cr0, eax).unwrap();
        a.db(&[0xea]).unwrap();
        a.dd(&[0x7200]).unwrap();
        a.dw(&[0x18]).unwrap();
    });
    cpu.ram().write(0x7100, &prot);
    let long = asm(64, 0x7200, |a| {
        a.mov(rax, 0x1_0000_0000u64).unwrap();
        a.add(rax, rbx).unwrap();
        a.mov(qword_ptr(0x9000u64), rax).unwrap();
        a.out(0xf4, al).unwrap();
        a.hlt().unwrap();
    });
    cpu.ram().write(0x7200, &long);
    cpu.sipi(0x07);
    let mut ports = Ports::default();
    assert_eq!(cpu.run(&mut ports, 1000), RunExit::StopRequested);
    assert_eq!(ports.out, vec![(0x80, 0x55), (0xf4, 0x78)]);
    let s = cpu.state();
    assert!(s.in_64bit_mode());
    assert_ne!(s.efer & cr::EFER_LMA, 0);
    let mut b = [0u8; 8];
    cpu.ram().read(0x9000, &mut b);
    assert_eq!(u64::from_le_bytes(b), 0x1_1234_5678);
    assert_eq!(cpu.run(&mut ports, 1000), RunExit::Halted);
}

#[test]
fn external_interrupt_injection_and_sti_shadow() {
    let mut g = Guest::new();
    record_handler(&g);
    g.set_gate(0x30, HANDLER, 0, 0);
    g.load_code(|a| {
        a.sti().unwrap();
        a.nop().unwrap();
        a.hlt().unwrap();
    });
    assert!(!g.cpu.interrupts_enabled());
    assert!(!g.cpu.inject_external_interrupt(&mut NoDevices, 0x30));
    // The window opens after the instruction STI's shadow covers (here after the HLT: the
    // block runs on, and the interrupt then wakes the HLT), never right after the STI.
    g.cpu.request_interrupt_window(true);
    assert_eq!(g.cpu.run(&mut NoDevices, 1), RunExit::InterruptWindow);
    assert!(g.cpu.state().rip > CODE + 1, "not inside STI's shadow");
    assert!(g.cpu.interrupts_enabled());
    g.cpu.request_interrupt_window(false);
    assert!(g.cpu.inject_external_interrupt(&mut NoDevices, 0x30));
    assert_eq!(g.cpu.run(&mut NoDevices, 100), RunExit::Halted);
    assert_eq!(g.read_u64(DATA), CODE + 3, "return address after HLT");
}

#[test]
fn cpuid_rdtsc_and_msrs() {
    let mut g = Guest::new();
    g.load_code(|a| {
        a.xor(eax, eax).unwrap();
        a.cpuid().unwrap();
        a.mov(eax, 0x8000_0001u32).unwrap();
        a.cpuid().unwrap();
        a.rdtsc().unwrap();
        a.mov(ecx, 0xc000_0100u32).unwrap();
        a.mov(eax, DATA as u32).unwrap();
        a.xor(edx, edx).unwrap();
        a.wrmsr().unwrap();
        a.mov(rax, qword_ptr(0u64).fs()).unwrap();
    });
    g.load(DATA, &0xfeedu64.to_le_bytes());
    g.cpu.execute_one(&mut NoDevices).unwrap();
    g.cpu.execute_one(&mut NoDevices).unwrap();
    let s = g.cpu.state();
    assert_eq!(
        s.gpr[3].to_le_bytes()[..4],
        *b"Genu",
        "a real vendor: GenuineIntel"
    );
    g.cpu.execute_one(&mut NoDevices).unwrap();
    g.cpu.execute_one(&mut NoDevices).unwrap();
    assert_ne!(g.cpu.state().gpr[2] & (1 << 29), 0, "LM advertised");
    for _ in 0..6 {
        let r = g.cpu.execute_one(&mut NoDevices);
        assert!(
            r.is_ok(),
            "{r:?} at {:#x} efer {:#x}",
            g.cpu.state().rip,
            g.cpu.state().efer
        );
    }
    assert_eq!(g.cpu.state().gpr[0], 0xfeed);
    assert_eq!(g.cpu.read_msr(x86emu::msr::FS_BASE), Some(DATA));
}

#[test]
fn real_mode_int_uses_the_ivt_and_iret_returns() {
    let g = Guest::new();
    let mut cpu = g.cpu;
    let mut s = x86emu::CpuState::reset();
    s.seg[Seg::Cs as usize] = x86emu::Segment::real_mode(0x0700, true);
    s.seg[Seg::Ss as usize] = x86emu::Segment::real_mode(0, false);
    s.rip = 0;
    s.gpr[4] = 0x6000;
    cpu.set_state(s);
    // IVT entry 0x21 -> 0800:0010.
    cpu.ram().write(0x21 * 4, &[0x10, 0x00, 0x00, 0x08]);
    let handler = asm(16, 0x10, |a| {
        a.mov(bx, 0x4242).unwrap();
        a.iret().unwrap();
    });
    cpu.ram().write(0x8010, &handler);
    let main = asm(16, 0, |a| {
        a.sti().unwrap();
        a.int(0x21).unwrap();
        a.mov(cx, bx).unwrap();
        a.hlt().unwrap();
    });
    cpu.ram().write(0x7000, &main);
    assert_eq!(cpu.run(&mut NoDevices, 100), RunExit::Halted);
    let s = cpu.state();
    assert_eq!(s.gpr[1] & 0xffff, 0x4242);
    assert_eq!(s.gpr[4], 0x6000, "IRET popped the 3-word frame");
    assert_ne!(s.rflags & flags::IF, 0, "IRET restored IF");
    assert_eq!(s.seg[Seg::Cs as usize].selector, 0x0700);
}

#[test]
fn a_16bit_ret_imm16_pops_a_2_byte_address_then_releases_the_arguments() {
    // `ret 2` moves SP by 4 but returns to a 2-byte IP: popping 4 bytes (the argument
    // taken for the IP's high half) went astray; a 32-bit `ret 4` in GRUB hit the same.
    let g = Guest::new();
    let mut cpu = g.cpu;
    let mut s = x86emu::CpuState::reset();
    s.seg[Seg::Cs as usize] = x86emu::Segment::real_mode(0x0700, true);
    s.seg[Seg::Ss as usize] = x86emu::Segment::real_mode(0, false);
    s.rip = 0;
    s.gpr[4] = 0x6000;
    cpu.set_state(s);
    let main = asm(16, 0, |a| {
        let mut f = a.create_label();
        a.push(0x1234).unwrap();
        a.call(f).unwrap();
        a.mov(bx, 0x4242).unwrap();
        a.hlt().unwrap();
        a.set_label(&mut f).unwrap();
        a.mov(cx, 7).unwrap();
        a.ret_1(2).unwrap();
    });
    cpu.ram().write(0x7000, &main);
    assert_eq!(cpu.run(&mut NoDevices, 100), RunExit::Halted);
    let s = cpu.state();
    assert_eq!(s.gpr[1] & 0xffff, 7);
    assert_eq!(s.gpr[3] & 0xffff, 0x4242, "returned after the call");
    assert_eq!(s.gpr[4], 0x6000, "the argument was released");
}

#[test]
fn protected_mode_32bit_gate_with_privilege_change() {
    let g = Guest::new();
    let mut cpu = g.cpu;
    // Flat 32-bit GDT: null, code0 0x08, data0 0x10, code3 0x1b, data3 0x23, TSS32 0x28.
    let tss: u64 = 0x9000;
    let tss_desc = 0x67 | ((tss & 0xff_ffff) << 16) | (0x89u64 << 40) | ((tss >> 24) << 56);
    let gdt: [u64; 6] = [
        0,
        0x00cf_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00cf_fb00_0000_ffff,
        0x00cf_f300_0000_ffff,
        tss_desc,
    ];
    for (i, e) in gdt.iter().enumerate() {
        cpu.ram().write(0x8000 + i as u64 * 8, &e.to_le_bytes());
    }
    // TSS32: ESP0 = 0x7000, SS0 = 0x10.
    cpu.ram().write(tss + 4, &0x7000u32.to_le_bytes());
    cpu.ram().write(tss + 8, &0x10u32.to_le_bytes());
    // IDT at 0xa000, vector 0x80: 32-bit trap gate, DPL3, 0x08:0x3000.
    let gate: u64 = 0x3000 | (0x08 << 16) | (0xefu64 << 40);
    cpu.ram().write(0xa000 + 0x80 * 8, &gate.to_le_bytes());
    let handler = asm(32, 0x3000, |a| {
        a.mov(ebx, esp).unwrap();
        a.mov(ecx, dword_ptr(esp + 4)).unwrap(); // CS pushed
        a.iretd().unwrap();
    });
    cpu.ram().write(0x3000, &handler);
    let user = asm(32, 0x4000, |a| {
        a.int(0x80).unwrap();
        a.mov(edx, 1).unwrap();
        a.hlt().unwrap(); // #GP at CPL3: no handler -> shutdown
    });
    cpu.ram().write(0x4000, &user);
    let mut s = x86emu::CpuState::reset();
    s.cr0 = cr::CR0_PE | cr::CR0_ET;
    s.gdtr = x86emu::DescriptorTable {
        base: 0x8000,
        limit: 0x2f,
    };
    s.idtr = x86emu::DescriptorTable {
        base: 0xa000,
        limit: 0x7ff,
    };
    s.tr = x86emu::Segment {
        selector: 0x28,
        base: tss,
        limit: 0x67,
        attr: 0x8b,
    };
    let code3 = x86emu::Segment::from_descriptor(0x1b, gdt[3]);
    let data3 = x86emu::Segment::from_descriptor(0x23, gdt[4]);
    for sg in Seg::ALL {
        s.seg[sg as usize] = data3;
    }
    s.seg[Seg::Cs as usize] = code3;
    s.rip = 0x4000;
    s.gpr[4] = 0x5000;
    cpu.set_state(s);
    assert_eq!(cpu.run(&mut NoDevices, 4), RunExit::InstructionLimit);
    // int 0x80 delivered: handler ran on the ring-0 stack (SS:ESP, EFLAGS, CS, EIP pushed).
    let s = cpu.state();
    assert_eq!(s.gpr[3], 0x7000 - 20);
    assert_eq!(s.gpr[1], 0x1b);
    // Back at CPL3 after IRETD, on the user stack.
    assert_eq!(s.cpl(), 3);
    assert_eq!(s.gpr[4], 0x5000);
    cpu.execute_one(&mut NoDevices).unwrap();
    assert_eq!(cpu.state().gpr[2], 1);
}

#[test]
fn fxsave_fxrstor_layout_and_checks() {
    let mut g = Guest::new();
    g.load_code(|a| {
        a.mov(rbx, DATA).unwrap();
        a.fxsave64(ptr(rbx)).unwrap();
        a.fxrstor64(ptr(rbx + 512)).unwrap();
        a.fxrstor64(ptr(rbx + 1024)).unwrap(); // reserved MXCSR bits: #GP
        a.fxsave64(ptr(rbx + 8)).unwrap(); // misaligned: #GP
    });
    let mut st = g.cpu.state().clone();
    st.fpu.xmm[3] = 0x0011_2233_4455_6677_8899_aabb_ccdd_eeffu128;
    st.fpu.mxcsr = 0x1fa0;
    g.cpu.set_state(st);
    g.cpu.execute_one(&mut NoDevices).unwrap();
    g.cpu.execute_one(&mut NoDevices).unwrap();
    let mut img = [0u8; 512];
    g.cpu.ram().read(DATA, &mut img);
    assert_eq!(u16::from_le_bytes([img[0], img[1]]), 0x37f, "FCW");
    assert_eq!(
        u32::from_le_bytes(img[24..28].try_into().unwrap()),
        0x1fa0,
        "MXCSR"
    );
    assert_eq!(
        u128::from_le_bytes(img[160 + 48..160 + 64].try_into().unwrap()),
        0x0011_2233_4455_6677_8899_aabb_ccdd_eeff
    );
    // Restore an image with a different XMM5 and MXCSR.
    let mut img2 = img;
    img2[24..28].copy_from_slice(&0x3f80u32.to_le_bytes());
    img2[160 + 80..160 + 96].copy_from_slice(&[0x5a; 16]);
    g.load(DATA + 512, &img2);
    let mut bad = img;
    bad[24..28].copy_from_slice(&0xffff_0000u32.to_le_bytes());
    g.load(DATA + 1024, &bad);
    g.cpu.execute_one(&mut NoDevices).unwrap();
    assert_eq!(g.cpu.state().fpu.mxcsr, 0x3f80);
    assert_eq!(g.cpu.state().fpu.xmm[5], u128::from_le_bytes([0x5a; 16]));
    assert_eq!(
        g.cpu.execute_one(&mut NoDevices).unwrap_err().vector,
        vector::GP
    );
    assert_eq!(
        g.cpu.state().fpu.mxcsr,
        0x3f80,
        "a faulting FXRSTOR changes nothing"
    );
    // Skip the faulting FXRSTOR.
    let mut st = g.cpu.state().clone();
    let mut b = [0u8; 15];
    g.cpu.ram().read(st.rip, &mut b);
    st.rip += iced_x86::Decoder::with_ip(64, &b, st.rip, 0).decode().len() as u64;
    g.cpu.set_state(st);
    assert_eq!(
        g.cpu.execute_one(&mut NoDevices).unwrap_err().vector,
        vector::GP
    );
}

#[test]
fn unmasked_simd_exception_raises_xm_and_keeps_the_destination() {
    let mut g = Guest::new();
    g.load_code(|a| {
        a.divsd(xmm0, xmm1).unwrap();
    });
    let mut st = g.cpu.state().clone();
    st.fpu.xmm[0] = u128::from(1.0f64.to_bits());
    st.fpu.xmm[1] = 0;
    st.fpu.mxcsr = 0x1f80 & !(1 << 9); // divide-by-zero unmasked
    g.cpu.set_state(st);
    let f = g.cpu.execute_one(&mut NoDevices).unwrap_err();
    assert_eq!(f.vector, vector::XM);
    let s = g.cpu.state();
    assert_eq!(
        s.fpu.xmm[0],
        u128::from(1.0f64.to_bits()),
        "destination unchanged"
    );
    assert_ne!(s.fpu.mxcsr & 0x4, 0, "ZE recorded");
}

#[test]
fn speculation_controls_are_advertised_and_accept_only_their_bits() {
    use x86emu::msr::{ARCH_CAPABILITIES, PRED_CMD, SPEC_CTRL};
    let mut g = Guest::new();
    // Subleaf 0 into R8 (EAX) and R9 (EDX), then subleaf 2.
    g.load_code(|a| {
        a.mov(eax, 7u32).unwrap();
        a.xor(ecx, ecx).unwrap();
        a.cpuid().unwrap();
        a.mov(r8d, eax).unwrap();
        a.mov(r9d, edx).unwrap();
        a.mov(eax, 7u32).unwrap();
        a.mov(ecx, 2u32).unwrap();
        a.cpuid().unwrap();
    });
    for _ in 0..8 {
        g.cpu.execute_one(&mut NoDevices).unwrap();
    }
    let s = g.cpu.state();
    let (max_sub, edx7, edx2) = (s.gpr[8], s.gpr[9], s.gpr[2]);
    assert!(max_sub >= 2, "CPUID.7.0:EAX {max_sub}: subleaf 2 exists");
    assert_ne!(edx7 & (1 << 26), 0, "CPUID.7.0:EDX[26] IBRS/IBPB");
    assert_ne!(edx7 & (1 << 29), 0, "CPUID.7.0:EDX[29] ARCH_CAPABILITIES");
    assert_ne!(edx2 & (1 << 4), 0, "CPUID.7.2:EDX[4] BHI_CTRL");

    let caps = g.cpu.read_msr(ARCH_CAPABILITIES).unwrap();
    for (bit, name) in [
        (0, "RDCL_NO"),
        (1, "IBRS_ALL"),
        (20, "BHI_NO"),
        (62, "ITS_NO"),
    ] {
        assert_ne!(caps & (1 << bit), 0, "ARCH_CAPABILITIES {name} {caps:#x}");
    }

    assert_eq!(g.cpu.read_msr(SPEC_CTRL), Some(0), "0 at reset");
    g.cpu.write_msr(SPEC_CTRL, 1 | (1 << 10)).unwrap();
    assert_eq!(g.cpu.read_msr(SPEC_CTRL), Some(1 | (1 << 10)));
    // STIBP and SSBD are not offered: #GP, the value kept.
    assert!(g.cpu.write_msr(SPEC_CTRL, 1 << 1).is_err());
    assert!(g.cpu.write_msr(SPEC_CTRL, 1 << 2).is_err());
    assert_eq!(g.cpu.read_msr(SPEC_CTRL), Some(1 | (1 << 10)));

    // IA32_PRED_CMD takes IBPB and nothing else, and is write-only.
    g.cpu.write_msr(PRED_CMD, 1).unwrap();
    assert!(g.cpu.write_msr(PRED_CMD, 2).is_err());
    assert_eq!(g.cpu.read_msr(PRED_CMD), None);
}

#[test]
fn tsc_adjust_is_advertised_and_moves_with_the_tsc() {
    use x86emu::msr::{TSC, TSC_ADJUST};
    let mut g = Guest::new();
    g.load_code(|a| {
        a.mov(eax, 7u32).unwrap();
        a.xor(ecx, ecx).unwrap();
        a.cpuid().unwrap();
    });
    for _ in 0..3 {
        g.cpu.execute_one(&mut NoDevices).unwrap();
    }
    assert_ne!(
        g.cpu.state().gpr[3] & (1 << 1),
        0,
        "CPUID.7.0:EBX[1] TSC_ADJUST"
    );
    assert_eq!(g.cpu.read_msr(TSC_ADJUST), Some(0), "0 at reset");

    // A TSC_ADJUST write moves the TSC by the difference.
    let before = g.cpu.read_msr(TSC).unwrap();
    g.cpu.write_msr(TSC_ADJUST, 1 << 40).unwrap();
    let after = g.cpu.read_msr(TSC).unwrap();
    assert!(
        after.wrapping_sub(before) >= 1 << 40 && after.wrapping_sub(before) < (1 << 40) + (1 << 36),
        "TSC {before:#x} -> {after:#x}"
    );
    assert_eq!(g.cpu.read_msr(TSC_ADJUST), Some(1 << 40));

    // A TSC write moves TSC_ADJUST by what it moved the TSC.
    let now = g.cpu.read_msr(TSC).unwrap();
    g.cpu.write_msr(TSC, now.wrapping_sub(1 << 41)).unwrap();
    let adjust = g.cpu.read_msr(TSC_ADJUST).unwrap();
    let moved = (1u64 << 40).wrapping_sub(adjust);
    assert!(
        moved > 1 << 40 && moved <= (1 << 41) + (1 << 36),
        "TSC_ADJUST {adjust:#x} after the TSC went back 2^41"
    );
}
