//! Instruction-set extensions beyond SSE2 (run through `exec::hostexec`) and the XSAVE
//! state: results checked against values computed here on the host.

mod common;

use common::*;
use iced_x86::code_asm::*;
use x86emu::state::cr;
use x86emu::{NoDevices, RunExit};

fn avx_guest() -> Guest {
    let mut g = Guest::new();
    let s = g.cpu.state_mut();
    s.cr4 |= cr::CR4_OSFXSR | cr::CR4_OSXMMEXCPT | cr::CR4_OSXSAVE;
    s.xcr0 = 7;
    g
}

fn run(g: &mut Guest) {
    let r = g.cpu.run(&mut NoDevices, 10_000);
    assert_eq!(r, RunExit::Halted, "rip {:#x}", g.cpu.state().rip);
}

#[test]
fn vmovdqu_ymm_load_and_store() {
    let mut g = avx_guest();
    let src: Vec<u8> = (0u8..32).collect();
    g.load(DATA, &src);
    g.load_code(|a| {
        a.mov(rsi, DATA).unwrap();
        a.vmovdqu(ymm0, ymmword_ptr(rsi)).unwrap();
        a.vpaddb(ymm1, ymm0, ymm0).unwrap();
        a.vmovdqu(ymmword_ptr(rsi + 64), ymm1).unwrap();
        a.hlt().unwrap();
    });
    run(&mut g);
    let s = g.cpu.state();
    assert_eq!(s.fpu.xmm[0].to_le_bytes().to_vec(), src[..16].to_vec());
    assert_eq!(s.fpu.ymm_hi[0].to_le_bytes().to_vec(), src[16..].to_vec());
    let mut out = [0u8; 32];
    assert!(g.cpu.ram().read(DATA + 64, &mut out));
    let want: Vec<u8> = src.iter().map(|b| b * 2).collect();
    assert_eq!(out.to_vec(), want);
}
