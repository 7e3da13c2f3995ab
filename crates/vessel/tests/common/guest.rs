//! Tiny guest programs assembled with iced-x86, packaged as ELF kernels so they boot
//! through the real loader: 64-bit Linux protocol without a PVH note, PVH with one.

use iced_x86::code_asm::*;

/// Where test kernels are linked (the usual Linux load address).
pub const LOAD: u64 = 0x100_0000;
pub const COM1: u32 = 0x3f8;
pub const DEBUG_EXIT: u32 = 0x501;

/// Package 64-bit code as an ELF entered through the 64-bit Linux boot protocol.
pub fn linux64_elf(code: &[u8]) -> Vec<u8> {
    arch::elf::build_test_elf(LOAD, code, LOAD, None)
}

/// Package 32-bit code as an ELF entered through PVH.
pub fn pvh_elf(code: &[u8]) -> Vec<u8> {
    arch::elf::build_test_elf(LOAD, code, LOAD, Some(LOAD as u32))
}

/// Subroutines every 64-bit test guest can call.
pub struct Lib64 {
    /// puts: RSI points at a NUL-terminated string.
    pub puts: CodeLabel,
    /// puthex: prints RAX as 16 hex digits.
    pub puthex: CodeLabel,
    /// putc: prints AL.
    pub putc: CodeLabel,
}

impl Lib64 {
    pub fn new(a: &mut CodeAssembler) -> Self {
        Lib64 {
            puts: a.create_label(),
            puthex: a.create_label(),
            putc: a.create_label(),
        }
    }

    /// Print a literal string (embedded after a jump).
    pub fn print(&self, a: &mut CodeAssembler, s: &str) -> Result<(), IcedError> {
        let mut data = a.create_label();
        let mut after = a.create_label();
        a.jmp(after)?;
        a.set_label(&mut data)?;
        let mut bytes = s.as_bytes().to_vec();
        bytes.push(0);
        a.db(&bytes)?;
        a.set_label(&mut after)?;
        a.push(rsi)?;
        a.lea(rsi, ptr(data))?;
        a.call(self.puts)?;
        a.pop(rsi)?;
        Ok(())
    }

    pub fn emit(&mut self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        a.set_label(&mut self.puts)?;
        a.push(rax)?;
        a.push(rdx)?;
        a.mov(dx, COM1)?;
        let mut l = a.create_label();
        let mut d = a.create_label();
        a.set_label(&mut l)?;
        a.mov(al, byte_ptr(rsi))?;
        a.test(al, al)?;
        a.jz(d)?;
        a.out(dx, al)?;
        a.inc(rsi)?;
        a.jmp(l)?;
        a.set_label(&mut d)?;
        a.pop(rdx)?;
        a.pop(rax)?;
        a.ret()?;

        a.set_label(&mut self.putc)?;
        a.push(rdx)?;
        a.mov(dx, COM1)?;
        a.out(dx, al)?;
        a.pop(rdx)?;
        a.ret()?;

        a.set_label(&mut self.puthex)?;
        a.push(rbx)?;
        a.push(rcx)?;
        a.push(rdx)?;
        a.push(rax)?;
        a.mov(rbx, rax)?;
        a.mov(ecx, 16)?;
        a.mov(dx, COM1)?;
        let mut l = a.create_label();
        let mut dig = a.create_label();
        a.set_label(&mut l)?;
        a.rol(rbx, 4)?;
        a.mov(al, bl)?;
        a.and(al, 0xf)?;
        a.cmp(al, 10)?;
        a.jb(dig)?;
        a.add(al, (b'a' - 10 - b'0') as i32)?;
        a.set_label(&mut dig)?;
        a.add(al, b'0' as i32)?;
        a.out(dx, al)?;
        a.dec(ecx)?;
        a.jnz(l)?;
        a.pop(rax)?;
        a.pop(rdx)?;
        a.pop(rcx)?;
        a.pop(rbx)?;
        a.ret()?;
        Ok(())
    }
}

/// Write `value` to the debug-exit port: vessel exits with (value << 1) | 1.
pub fn debug_exit(a: &mut CodeAssembler, value: u8) -> Result<(), IcedError> {
    a.mov(dx, DEBUG_EXIT)?;
    a.mov(al, value as u32)?;
    a.out(dx, al)?;
    let mut spin = a.create_label();
    a.set_label(&mut spin)?;
    a.hlt()?;
    a.jmp(spin)
}

/// Subroutines for 32-bit (PVH) test guests.
pub struct Lib32 {
    /// puts: ESI points at a NUL-terminated string.
    pub puts: CodeLabel,
    /// puthex: prints EAX as 8 hex digits.
    pub puthex: CodeLabel,
}

impl Lib32 {
    pub fn new(a: &mut CodeAssembler) -> Self {
        Lib32 {
            puts: a.create_label(),
            puthex: a.create_label(),
        }
    }

    pub fn print(&self, a: &mut CodeAssembler, s: &str) -> Result<(), IcedError> {
        // No RIP-relative addressing in 32-bit code: `call` pushes the string's address.
        let mut after = a.create_label();
        a.push(esi)?;
        a.call(after)?;
        let mut bytes = s.as_bytes().to_vec();
        bytes.push(0);
        a.db(&bytes)?;
        a.set_label(&mut after)?;
        a.pop(esi)?;
        a.call(self.puts)?;
        a.pop(esi)?;
        Ok(())
    }

    pub fn emit(&mut self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        a.set_label(&mut self.puts)?;
        a.push(eax)?;
        a.push(edx)?;
        a.mov(dx, COM1)?;
        let mut l = a.create_label();
        let mut d = a.create_label();
        a.set_label(&mut l)?;
        a.mov(al, byte_ptr(esi))?;
        a.test(al, al)?;
        a.jz(d)?;
        a.out(dx, al)?;
        a.inc(esi)?;
        a.jmp(l)?;
        a.set_label(&mut d)?;
        a.pop(edx)?;
        a.pop(eax)?;
        a.ret()?;

        a.set_label(&mut self.puthex)?;
        a.push(ebx)?;
        a.push(ecx)?;
        a.push(edx)?;
        a.push(eax)?;
        a.mov(ebx, eax)?;
        a.mov(ecx, 8)?;
        a.mov(dx, COM1)?;
        let mut l = a.create_label();
        let mut dig = a.create_label();
        a.set_label(&mut l)?;
        a.rol(ebx, 4)?;
        a.mov(al, bl)?;
        a.and(al, 0xf)?;
        a.cmp(al, 10)?;
        a.jb(dig)?;
        a.add(al, (b'a' - 10 - b'0') as i32)?;
        a.set_label(&mut dig)?;
        a.add(al, b'0' as i32)?;
        a.out(dx, al)?;
        a.dec(ecx)?;
        a.jnz(l)?;
        a.pop(eax)?;
        a.pop(edx)?;
        a.pop(ecx)?;
        a.pop(ebx)?;
        a.ret()?;
        Ok(())
    }
}

/// The test guests' IDT (256 gates) and the IDTR image that points at it.
pub const IDT: u64 = 0x4000;
const IDTR: u64 = 0x5000;

/// Write a 64-bit interrupt gate (CS 0x10, DPL 0) for `vector` pointing at `handler`
/// into the IDT at [`IDT`]. Clobbers RAX, RDX, RDI, R8, R9.
pub fn set_idt_gate(
    a: &mut CodeAssembler,
    vector: u8,
    handler: CodeLabel,
) -> Result<(), IcedError> {
    a.lea(rax, ptr(handler))?;
    a.mov(rdx, rax)?;
    a.and(edx, 0xffff)?;
    a.mov(r8, rax)?;
    a.shr(r8, 16)?;
    a.and(r8d, 0xffff)?;
    a.shl(r8, 48)?;
    a.or(rdx, r8)?;
    a.mov(r9, 0x0000_8e00_0010_0000u64)?;
    a.or(rdx, r9)?;
    a.mov(rdi, IDT + u64::from(vector) * 16)?;
    a.mov(qword_ptr(rdi), rdx)?;
    a.shr(rax, 32)?;
    a.mov(qword_ptr(rdi + 8), rax)
}

/// LIDT the full 256-gate table at [`IDT`].
pub fn load_idt(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(rdi, IDTR)?;
    a.mov(word_ptr(rdi), 0xfff)?;
    a.mov(rax, IDT)?;
    a.mov(qword_ptr(rdi + 2), rax)?;
    a.lidt(ptr(rdi))
}

/// Install an IDT (at 0x4000) whose vectors 0..32 print "EXC <vector> <error> <rip> <cs>
/// rbx=<rbx>" and
/// end the run with debug-exit 0x7f, and set TSS.RSP0 (the boot TSS is at address 0) so
/// faults at CPL3 land on a kernel stack. Turns a silent triple fault into a diagnosis.
pub fn install_exception_handlers(a: &mut CodeAssembler, lib: &Lib64) -> Result<(), IcedError> {
    let mut stubs: Vec<CodeLabel> = (0..32).map(|_| a.create_label()).collect();
    let mut common = a.create_label();
    let mut after = a.create_label();
    // Vectors that push an error code themselves.
    let with_error = [8, 10, 11, 12, 13, 14, 17, 21, 29, 30];
    for (v, stub) in stubs.iter().enumerate() {
        set_idt_gate(a, v as u8, *stub)?;
    }
    load_idt(a)?;
    a.xor(edi, edi)?;
    a.mov(rax, 0x7f00u64)?;
    a.mov(qword_ptr(rdi + 4), rax)?;
    a.jmp(after)?;
    for (v, stub) in stubs.iter_mut().enumerate() {
        a.set_label(stub)?;
        if !with_error.contains(&v) {
            a.push(0)?;
        }
        a.push(v as i32)?;
        a.jmp(common)?;
    }
    a.set_label(&mut common)?;
    lib.print(a, "EXC ")?;
    a.pop(rax)?;
    a.call(lib.puthex)?;
    lib.print(a, " ")?;
    a.pop(rax)?;
    a.call(lib.puthex)?;
    lib.print(a, " ")?;
    a.pop(rax)?;
    a.call(lib.puthex)?;
    lib.print(a, " ")?;
    a.mov(rax, qword_ptr(rsp))?;
    a.call(lib.puthex)?;
    lib.print(a, " rbx=")?;
    a.mov(rax, rbx)?;
    a.call(lib.puthex)?;
    lib.print(a, "\n")?;
    a.mov(dx, DEBUG_EXIT)?;
    a.mov(al, 0x7f)?;
    a.out(dx, al)?;
    a.hlt()?;
    a.set_label(&mut after)?;
    a.nop()?;
    Ok(())
}
