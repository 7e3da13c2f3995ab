//! F and D: not yet implemented; every FP instruction is illegal.

use crate::bus::Bus;
use crate::cpu::{Cpu, Flow};
use crate::decode::Insn;
use crate::trap::Exception;

impl Cpu {
    pub(crate) fn exec_fp(&mut self, i: &Insn, _bus: &mut dyn Bus) -> Result<Flow, Exception> {
        Err(Exception::IllegalInstruction(i.raw as u64))
    }
}
