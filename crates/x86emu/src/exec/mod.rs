//! Instruction execution: one file per instruction family, dispatched on the mnemonic.

pub(crate) mod alu;
pub(crate) mod atomic;
pub(crate) mod bits;
pub(crate) mod control;
pub(crate) mod fast;
pub(crate) mod flags;
pub(crate) mod gather;
pub(crate) mod hostexec;
pub(crate) mod mov;
pub(crate) mod muldiv;
pub(crate) mod operand;
pub(crate) mod shift;
pub(crate) mod softfloat;
pub(crate) mod sse;
pub(crate) mod sse_fp;

pub(crate) mod stack;
pub(crate) mod string;
pub(crate) mod system;
pub(crate) mod x87;
pub(crate) mod xsave;

use iced_x86::{Instruction, Mnemonic as M};

use crate::cpu::Core;
use crate::decode::Insn;
use crate::exceptions::{Fault, Result};
use crate::platform::Platform;

/// Executes one decoded instruction.
pub(crate) type Handler = fn(&mut Core, &mut dyn Platform, &Insn) -> Result<()>;

fn undefined(_: &mut Core, _: &mut dyn Platform, _: &Insn) -> Result<()> {
    Err(Fault::ud())
}

/// A family's `exec` (which works from the iced-x86 instruction alone) as a [`Handler`].
macro_rules! family {
    ($f:path) => {
        (|c: &mut Core, p: &mut dyn Platform, i: &Insn| $f(c, p, &i.instr)) as Handler
    };
}

/// Picks the handler that executes `ins`, chosen once per decode and cached with it, and
/// whether it is one of the specialised fast forms.
pub(crate) fn handler_for(ins: &Instruction) -> (Handler, bool) {
    if ins.is_invalid() {
        return (undefined, false);
    }
    if let Some(h) = fast::select(ins) {
        return (h, true);
    }
    (family_for(ins), false)
}

/// CMOVcc and SETcc.
pub(crate) fn is_cmov_or_setcc(m: M) -> bool {
    matches!(
        m,
        M::Cmovo
            | M::Cmovno
            | M::Cmovb
            | M::Cmovae
            | M::Cmove
            | M::Cmovne
            | M::Cmovbe
            | M::Cmova
            | M::Cmovs
            | M::Cmovns
            | M::Cmovp
            | M::Cmovnp
            | M::Cmovl
            | M::Cmovge
            | M::Cmovle
            | M::Cmovg
            | M::Seto
            | M::Setno
            | M::Setb
            | M::Setae
            | M::Sete
            | M::Setne
            | M::Setbe
            | M::Seta
            | M::Sets
            | M::Setns
            | M::Setp
            | M::Setnp
            | M::Setl
            | M::Setge
            | M::Setle
            | M::Setg
    )
}

/// The instruction family's generic handler.
fn family_for(ins: &Instruction) -> Handler {
    match ins.mnemonic() {
        m if is_cmov_or_setcc(m) => family!(mov::exec),
        M::Add
        | M::Or
        | M::Adc
        | M::Sbb
        | M::And
        | M::Sub
        | M::Xor
        | M::Cmp
        | M::Test
        | M::Inc
        | M::Dec
        | M::Neg
        | M::Not => family!(alu::exec),
        M::Mov
        | M::Movzx
        | M::Movsx
        | M::Movsxd
        | M::Lea
        | M::Xchg
        | M::Bswap
        | M::Cbw
        | M::Cwde
        | M::Cdqe
        | M::Cwd
        | M::Cdq
        | M::Cqo
        | M::Lahf
        | M::Sahf
        | M::Clc
        | M::Stc
        | M::Cmc
        | M::Cld
        | M::Std
        | M::Xlatb
        | M::Nop
        | M::Pause
        | M::Endbr64
        | M::Endbr32 => family!(mov::exec),
        M::Cmpxchg | M::Cmpxchg8b | M::Cmpxchg16b | M::Xadd => family!(atomic::exec),
        M::Shl
        | M::Sal
        | M::Shr
        | M::Sar
        | M::Rol
        | M::Ror
        | M::Rcl
        | M::Rcr
        | M::Shld
        | M::Shrd => family!(shift::exec),
        M::Mul | M::Imul | M::Div | M::Idiv => family!(muldiv::exec),
        M::Bt | M::Bts | M::Btr | M::Btc | M::Bsf | M::Bsr | M::Tzcnt | M::Lzcnt => {
            family!(bits::exec)
        }
        M::Movsd | M::Cmpsd if !string::is_string_form(ins) => family!(sse::exec),
        M::Movsb
        | M::Movsw
        | M::Movsd
        | M::Movsq
        | M::Stosb
        | M::Stosw
        | M::Stosd
        | M::Stosq
        | M::Lodsb
        | M::Lodsw
        | M::Lodsd
        | M::Lodsq
        | M::Cmpsb
        | M::Cmpsw
        | M::Cmpsd
        | M::Cmpsq
        | M::Scasb
        | M::Scasw
        | M::Scasd
        | M::Scasq
        | M::Insb
        | M::Insw
        | M::Insd
        | M::Outsb
        | M::Outsw
        | M::Outsd => family!(string::exec),
        M::Jmp
        | M::Ja
        | M::Jae
        | M::Jb
        | M::Jbe
        | M::Je
        | M::Jne
        | M::Jg
        | M::Jge
        | M::Jl
        | M::Jle
        | M::Jo
        | M::Jno
        | M::Jp
        | M::Jnp
        | M::Js
        | M::Jns
        | M::Jcxz
        | M::Jecxz
        | M::Jrcxz
        | M::Loop
        | M::Loope
        | M::Loopne
        | M::Call
        | M::Ret
        | M::Retf
        | M::Iret
        | M::Iretd
        | M::Iretq
        | M::Int
        | M::Int3
        | M::Into
        | M::Int1 => family!(control::exec),
        M::Push
        | M::Pop
        | M::Pushf
        | M::Pushfd
        | M::Pushfq
        | M::Popf
        | M::Popfd
        | M::Popfq
        | M::Enter
        | M::Leave
        | M::Pusha
        | M::Pushad
        | M::Popa
        | M::Popad => family!(stack::exec),
        M::Cpuid
        | M::Rdtsc
        | M::Rdtscp
        | M::Rdmsr
        | M::Wrmsr
        | M::Syscall
        | M::Sysret
        | M::Sysretq
        | M::Swapgs
        | M::Hlt
        | M::Cli
        | M::Sti
        | M::In
        | M::Out
        | M::Lgdt
        | M::Lidt
        | M::Sgdt
        | M::Sidt
        | M::Ltr
        | M::Lldt
        | M::Str
        | M::Sldt
        | M::Smsw
        | M::Lmsw
        | M::Clts
        | M::Invlpg
        | M::Wbinvd
        | M::Invd
        | M::Lfence
        | M::Mfence
        | M::Sfence
        | M::Prefetch
        | M::Prefetchw
        | M::Prefetchnta
        | M::Prefetcht0
        | M::Prefetcht1
        | M::Prefetcht2
        | M::Clflush
        | M::Clflushopt
        | M::Rdpid
        | M::Lss
        | M::Lfs
        | M::Lgs
        | M::Lds
        | M::Les
        | M::Lsl
        | M::Lar
        | M::Verr
        | M::Verw => family!(system::exec),
        M::Fninit
        | M::Finit
        | M::Fldcw
        | M::Fnstcw
        | M::Fstcw
        | M::Fnstsw
        | M::Fstsw
        | M::Fnclex
        | M::Fclex
        | M::Wait
        | M::Fnstenv
        | M::Fstenv
        | M::Fldenv
        | M::Fxsave
        | M::Fxsave64
        | M::Fxrstor
        | M::Fxrstor64
        | M::Fnsave
        | M::Fsave
        | M::Frstor
        | M::Ldmxcsr
        | M::Stmxcsr => family!(x87::exec),
        M::Xsave
        | M::Xsave64
        | M::Xsaveopt
        | M::Xsaveopt64
        | M::Xsavec
        | M::Xsavec64
        | M::Xrstor
        | M::Xrstor64
        | M::Xgetbv
        | M::Xsetbv => family!(xsave::exec),
        M::Vzeroupper | M::Vzeroall | M::Vldmxcsr | M::Vstmxcsr => family!(xsave::exec_vex_state),
        M::Vpgatherdd
        | M::Vpgatherdq
        | M::Vpgatherqd
        | M::Vpgatherqq
        | M::Vgatherdps
        | M::Vgatherdpd
        | M::Vgatherqps
        | M::Vgatherqpd => family!(gather::exec),
        _ if hostexec::routes(ins) => hostexec::exec_insn as Handler,
        _ => family!(sse::exec),
    }
}
