//! SSE/SSE2 integer and floating-point instructions.

use iced_x86::Instruction;

use crate::cpu::Cpu;
use crate::exceptions::{Fault, Result};
use crate::platform::Platform;

pub(crate) fn exec(cpu: &mut Cpu, p: &mut dyn Platform, ins: &Instruction) -> Result<()> {
    let _ = (cpu, p, ins);
    Err(Fault::ud())
}
