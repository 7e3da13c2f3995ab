//! What a snapshot keeps of a CPU beyond its registers: the event state between
//! instructions (halted, interrupt shadow, NMI pending/blocked, waiting for SIPI) and
//! the time-stamp counter. Caches (TLB, decoded and compiled blocks) are not state: a
//! restored CPU starts with them empty.

use serde::{Deserialize, Serialize};

use crate::cpu::Cpu;
use crate::state::CpuState;

/// A CPU's complete architectural state, as a snapshot keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuSnapshot {
    pub state: CpuState,
    /// Halted by HLT, waiting for an interrupt.
    pub halted: bool,
    /// STI / MOV SS interrupt shadow over the next instruction.
    pub shadow: bool,
    pub nmi_pending: bool,
    /// NMIs blocked until the next IRET.
    pub nmi_blocked: bool,
    /// An application processor waiting for a startup IPI.
    pub wait_for_sipi: bool,
    /// Triple-faulted.
    pub shutdown: bool,
    /// The time-stamp counter when the snapshot was taken.
    pub tsc: u64,
}

impl Cpu {
    /// The state a snapshot keeps. Take it between `run` calls.
    ///
    /// ```
    /// let ram = x86emu::GuestRam::new();
    /// let cpu = x86emu::Cpu::new(ram);
    /// let snap = cpu.snapshot();
    /// assert_eq!(snap.state.rip, 0xfff0);
    /// ```
    pub fn snapshot(&self) -> CpuSnapshot {
        CpuSnapshot {
            state: self.s.clone(),
            halted: self.halted,
            shadow: self.shadow,
            nmi_pending: self.nmi_pending,
            nmi_blocked: self.nmi_blocked,
            wait_for_sipi: self.wait_for_sipi,
            shutdown: self.shutdown,
            tsc: self.tsc(),
        }
    }

    /// Puts the CPU in the state `snap` describes, its TSC at `tsc` (the caller moves the
    /// saved value on by the time that passed, as its clock sees it). Cached translations
    /// are dropped.
    pub fn restore(&mut self, snap: &CpuSnapshot, tsc: u64) {
        self.s = snap.state.clone();
        self.halted = snap.halted;
        self.shadow = snap.shadow;
        self.new_shadow = false;
        self.nmi_pending = snap.nmi_pending;
        self.nmi_blocked = snap.nmi_blocked;
        self.wait_for_sipi = snap.wait_for_sipi;
        self.shutdown = snap.shutdown;
        self.set_tsc(tsc);
        self.flush_tlb();
        self.code_epoch += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_restores_registers_and_events() {
        let mut a = Cpu::new(crate::GuestRam::new());
        a.state_mut().gpr[3] = 0x1234;
        a.state_mut().rip = 0x5678;
        a.inject_nmi();
        a.init(true);
        a.state_mut().gpr[0] = 7;
        a.state_mut().fpu.xmm[3] = u128::MAX - 5;
        a.state_mut().fpu.ymm_hi[15] = 1 << 100;
        let snap = a.snapshot();
        let json = serde_json::to_string(&snap).unwrap();
        let back: CpuSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);
        let mut b = Cpu::new(crate::GuestRam::new());
        b.restore(&back, 1_000_000);
        let again = b.snapshot();
        assert_eq!(again.state, snap.state);
        assert!(again.wait_for_sipi);
        assert!(again.tsc >= 1_000_000 && again.tsc < 1_000_000 + 10_000_000_000);
    }
}
