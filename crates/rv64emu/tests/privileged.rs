//! Privileged-architecture tests: bare-metal programs (assembled with Debian's riscv64
//! binutils) run on rv64emu from M-mode and record what they saw; the test checks the
//! record. Traps and their CSRs, delegation to S, Sv39 paging with A/D updates and
//! permission faults, and timer and software interrupts.

mod common;

use common::{build_bare, load_segments, require_tools, symbols, Scratch};
use rv64emu::{Bus, Cpu, GuestRam, RunExit};
use std::collections::HashMap;

const BASE: u64 = 0x8000_0000;
const FINISHER: u64 = 0x10_0000;
const CLINT: u64 = 0x200_0000;

/// Writing 1 or 0 here raises or lowers the platform's SEIP line.
const SEIP_LINE: u64 = 0x10_1000;

/// A platform with a test finisher (a write to it ends the run) and one external
/// interrupt line.
#[derive(Default)]
struct Finisher {
    done: bool,
    seip: bool,
}

impl Bus for Finisher {
    fn read(&mut self, _pa: u64, _size: u8) -> Option<u64> {
        None
    }
    fn write(&mut self, pa: u64, _size: u8, value: u64) -> bool {
        match pa {
            FINISHER => self.done = true,
            SEIP_LINE => self.seip = value != 0,
            _ => return false,
        }
        true
    }
    fn external_pending(&mut self) -> u64 {
        if self.seip {
            1 << 9
        } else {
            0
        }
    }
    fn stop_requested(&mut self) -> bool {
        self.done
    }
}

const PRELUDE: &str = "
.equ RES, 0x80100000
.equ FINISH, 0x100000
.equ CLINT, 0x2000000
.text
.globl _start
_start:
    li s11, RES
    la t0, mtrap
    csrw mtvec, t0
";

const FINISH: &str = "
finish:
    li t0, FINISH
    sw zero, 0(t0)
1:  j 1b
";

/// Runs a bare-metal program to its finisher write; returns the CPU and symbols.
fn run(name: &str, source: &str) -> (Cpu, HashMap<String, u64>) {
    require_tools();
    let dir = Scratch::new(name);
    let elf = build_bare(&dir.0, name, source, BASE);
    let syms = symbols(&elf);
    let mut ram = GuestRam::new();
    ram.add_owned(BASE, 0x20_0000).unwrap();
    let entry = load_segments(&elf, &ram);
    let mut cpu = Cpu::new(ram, entry);
    cpu.clint_base = Some(CLINT);
    let mut bus = Finisher::default();
    for _ in 0..10_000 {
        match cpu.run(&mut bus, 1_000_000) {
            RunExit::Stop => return (cpu, syms),
            RunExit::Wfi => std::thread::sleep(std::time::Duration::from_micros(20)),
            RunExit::Budget => {}
            RunExit::Exception(e) => panic!("{name}: unexpected exit {e:?}"),
        }
    }
    panic!("{name}: never reached the finisher; pc {:#x}", cpu.pc);
}

/// The `n`th 8-byte record the program wrote at RES.
fn rec(cpu: &Cpu, n: u64) -> u64 {
    let mut b = [0u8; 8];
    assert!(cpu.ram().read_bytes(0x8010_0000 + 8 * n, &mut b));
    u64::from_le_bytes(b)
}

fn mem(cpu: &Cpu, pa: u64) -> u64 {
    let mut b = [0u8; 8];
    assert!(cpu.ram().read_bytes(pa, &mut b));
    u64::from_le_bytes(b)
}

/// A handler that records (cause, epc, tval) and resumes after the instruction.
const MTRAP_SKIP: &str = "
.align 2
mtrap:
    csrr t0, mcause
    sd t0, 0(s11)
    csrr t0, mepc
    sd t0, 8(s11)
    csrr t0, mtval
    sd t0, 16(s11)
    addi s11, s11, 24
    csrr t0, mepc
    addi t0, t0, 4
    csrw mepc, t0
    mret
";

#[test]
fn exceptions_record_cause_epc_and_tval() {
    let src = format!(
        "{PRELUDE}
.option norvc
ill:   .word 0xffffffff
ecl:   ecall
brk:   ebreak
ldf:   ld t0, 1(zero)
csrf:  csrr t0, 0x7c0
mis:   li t1, 0x80100801
amof:  amoadd.d t0, t1, (t1)
    j finish
{MTRAP_SKIP}{FINISH}"
    );
    let (cpu, s) = run("exceptions", &src);
    let expect = [
        (2, s["ill"], 0xffff_ffff),
        (11, s["ecl"], 0),
        (3, s["brk"], s["brk"]),
        (5, s["ldf"], 1),
        (2, s["csrf"], 0x7c00_22f3),
        (6, s["amof"], 0x8010_0801),
    ];
    for (n, (cause, epc, tval)) in expect.into_iter().enumerate() {
        let n = n as u64;
        assert_eq!(
            (rec(&cpu, 3 * n), rec(&cpu, 3 * n + 1), rec(&cpu, 3 * n + 2)),
            (cause, epc, tval),
            "trap {n}"
        );
    }
}

/// Inside one decoded block the run loop keeps pc and instret at the block's start:
/// AUIPC, a CSR read of minstret and a fault in the middle of a block (after 2- and
/// 4-byte instructions) must still see their own.
#[test]
fn mid_block_instructions_see_their_own_pc_and_instret() {
    let src = format!(
        "{PRELUDE}
    li s10, 0x80100800
    j blk
.align 3
blk:
    csrr a0, minstret
    addi t1, zero, 1
    c.addi t1, 1
aui:
    auipc a1, 0
    c.addi t1, 1
    addi t1, t1, 1
    csrr a2, minstret
    sd a0, 0(s10)
    sd a1, 8(s10)
    sd a2, 16(s10)
    c.addi t1, 1
    addi t1, t1, 1
ldm:
    ld t0, 1(zero)
    sd t1, 24(s10)
    j finish
{MTRAP_SKIP}{FINISH}"
    );
    let (cpu, s) = run("midblock", &src);
    let at = |n: u64| rec(&cpu, 0x100 + n);
    assert_eq!(
        at(2).wrapping_sub(at(0)),
        6,
        "minstret counts the block's instructions"
    );
    assert_eq!(at(1), s["aui"], "auipc after a compressed instruction");
    assert_eq!(
        (rec(&cpu, 0), rec(&cpu, 1), rec(&cpu, 2)),
        (5, s["ldm"], 1),
        "a load fault in mid-block traps with its own pc"
    );
    assert_eq!(at(3), 6, "the instructions before the fault ran once");
}

#[test]
fn delegation_moves_traps_and_interrupts_to_s_mode() {
    let src = format!(
        "{PRELUDE}
.option norvc
    la t0, strap
    csrw stvec, t0
    li t0, 1 << 8          # ecall from U goes to S
    csrw medeleg, t0
    li t0, 1 << 1          # supervisor software interrupts go to S
    csrw mideleg, t0
    li t0, 3 << 11
    csrc mstatus, t0
    li t0, 1 << 11         # MPP = S
    csrs mstatus, t0
    la t0, smain
    csrw mepc, t0
    mret
smain:
    li t0, 1 << 8          # SPP = U
    csrc sstatus, t0
    la t0, umain
    csrw sepc, t0
    sret
umain:
    ecall
    j umain
s_after:
sill:
    csrr t0, mstatus       # not S's: illegal, not delegated, goes to M
    li t0, 2
    csrs sie, t0
    csrsi sstatus, 2       # SIE
    csrs sip, t0           # raise SSIP: taken in S at once
    nop
    nop
secall:
    ecall                  # from S: goes to M
    j finish

.align 2
strap:
    csrr t0, scause
    sd t0, 0(s11)
    csrr t0, sepc
    sd t0, 8(s11)
    csrr t0, sstatus
    sd t0, 16(s11)
    addi s11, s11, 24
    csrr t0, scause
    bltz t0, 1f
    la t0, s_after         # ecall from U: continue in S
    csrw sepc, t0
    li t0, 1 << 8
    csrs sstatus, t0
    sret
1:  li t0, 2
    csrc sip, t0
    sret

.align 2
mtrap:
    csrr t0, mcause
    sd t0, 0(s11)
    csrr t0, mepc
    sd t0, 8(s11)
    csrr t0, mstatus
    sd t0, 16(s11)
    addi s11, s11, 24
    csrr t0, mepc
    addi t0, t0, 4
    csrw mepc, t0
    mret
{FINISH}"
    );
    let (cpu, s) = run("delegation", &src);
    const SPP: u64 = 1 << 8;
    const MPP: u64 = 3 << 11;
    // 1: U's ecall, taken in S, from U.
    assert_eq!(rec(&cpu, 0), 8);
    assert_eq!(rec(&cpu, 1), s["umain"]);
    assert_eq!(rec(&cpu, 2) & SPP, 0);
    // 2: S reading mstatus: illegal, to M, from S.
    assert_eq!(rec(&cpu, 3), 2);
    assert_eq!(rec(&cpu, 4), s["sill"]);
    assert_eq!(rec(&cpu, 5) & MPP, 1 << 11);
    // 3: the delegated software interrupt, in S, from S.
    assert_eq!(rec(&cpu, 6), (1 << 63) | 1);
    assert_eq!(rec(&cpu, 8) & SPP, SPP);
    // 4: S's ecall, to M.
    assert_eq!(rec(&cpu, 9), 9);
    assert_eq!(rec(&cpu, 10), s["secall"]);
    assert_eq!(rec(&cpu, 11) & MPP, 1 << 11);
    assert_eq!(cpu.prv, rv64emu::Priv::Supervisor);
}

/// Writes a PTE at `table[index]` pointing to `target` with `flags`.
fn pte(table: &str, index: u64, target: &str, flags: u64) -> String {
    format!(
        "    la t0, {target}\n    srli t0, t0, 12\n    slli t0, t0, 10\n    ori t0, t0, {flags}\n    la t1, {table}\n    sd t0, {}(t1)\n",
        index * 8
    )
}

#[test]
fn sv39_paging_sets_accessed_and_dirty_and_faults_on_permissions() {
    paging(false);
}

#[test]
fn sv48_paging_sets_accessed_and_dirty_and_faults_on_permissions() {
    paging(true);
}

/// The same checks under Sv39 or Sv48; Sv48 puts one more table above the same tree.
fn paging(sv48: bool) {
    // V=1 R=2 W=4 X=8 U=16 G=32 A=64 D=128
    let mut setup = String::new();
    let top = if sv48 {
        setup += &pte("root", 0, "l2", 1);
        "l2"
    } else {
        "root"
    };
    setup += &format!(
        "    li t0, (0x80000000 >> 12) << 10 | 0xcf\n    la t1, {top}\n    sd t0, 16(t1)\n"
    );
    setup += "    li t0, 0xc7\n    sd t0, 0(t1)\n"; // identity gigapage 0 for the finisher
    setup += &pte(top, 1, "l1", 1);
    let mode = if sv48 { 9 } else { 8 };
    setup += &pte("l1", 0, "l0", 1);
    setup += &pte("l0", 0, "data", 1 | 2 | 4);
    setup += &pte("l0", 1, "data2", 1 | 2);
    setup += &pte("l0", 2, "upage", 1 | 2 | 4 | 16 | 64 | 128);
    let src = format!(
        "{PRELUDE}
.option norvc
{setup}
    la t0, strap
    csrw stvec, t0
    li t0, (1 << 13) | (1 << 15)   # page faults go to S
    csrw medeleg, t0
    la t0, root
    srli t0, t0, 12
    li t1, {mode} << 60
    or t0, t0, t1
    csrw satp, t0
    li t0, 3 << 11
    csrc mstatus, t0
    li t0, 1 << 11
    csrs mstatus, t0
    la t0, smain
    csrw mepc, t0
    mret
smain:
    sfence.vma
    li s0, 0x40000000
    li s2, 0x40001000
    li s3, 0x40002000
    li s4, 0x40003000
    la s1, l0
    ld t0, 0(s0)          # read: A set, D not
    sd t0, 0(s11)
    ld t0, 0(s1)
    sd t0, 8(s11)
    li t0, 0x55
    sd t0, 8(s0)          # write: D set
    ld t0, 0(s1)
    sd t0, 16(s11)
    addi s11, s11, 24
rofault:
    sd t0, 0(s2)     # read-only page: store page fault
ufault:
    ld t0, 0(s3)     # U page without SUM: load page fault
    li t0, 1 << 18
    csrs sstatus, t0
    ld t0, 0(s3)     # with SUM: allowed
    sd t0, 0(s11)
    addi s11, s11, 8
unmapped:
    ld t0, 0(s4)     # no PTE: load page fault
    la t0, data2          # remap page 0 to data2; sfence makes it visible
    srli t0, t0, 12
    slli t0, t0, 10
    ori t0, t0, 0x43
    sd t0, 0(s1)
    sfence.vma
    ld t0, 0(s0)
    sd t0, 0(s11)
    j finish

.align 2
strap:
    csrr t0, scause
    sd t0, 0(s11)
    csrr t0, sepc
    sd t0, 8(s11)
    csrr t0, stval
    sd t0, 16(s11)
    addi s11, s11, 24
    csrr t0, sepc
    addi t0, t0, 4
    csrw sepc, t0
    sret
{MTRAP_SKIP}{FINISH}
.data
.align 12
root: .space 4096
l2:   .space 4096
l1:   .space 4096
l0:   .space 4096
data: .dword 0x1111
      .space 4088
data2: .dword 0x2222
      .space 4088
upage: .dword 0x3333
      .space 4088
"
    );
    let (cpu, s) = run(if sv48 { "sv48" } else { "sv39" }, &src);
    const A: u64 = 64;
    const D: u64 = 128;
    assert_eq!(rec(&cpu, 0), 0x1111);
    assert_eq!(rec(&cpu, 1) & (A | D), A, "a load sets A only");
    assert_eq!(rec(&cpu, 2) & (A | D), A | D, "a store sets D");
    assert_eq!(mem(&cpu, s["data"] + 8), 0x55);
    assert_eq!(
        (rec(&cpu, 3), rec(&cpu, 4), rec(&cpu, 5)),
        (15, s["rofault"], 0x4000_1000)
    );
    assert_eq!(
        (rec(&cpu, 6), rec(&cpu, 7), rec(&cpu, 8)),
        (13, s["ufault"], 0x4000_2000)
    );
    assert_eq!(rec(&cpu, 9), 0x3333, "SUM opens U pages to S");
    assert_eq!(
        (rec(&cpu, 10), rec(&cpu, 11), rec(&cpu, 12)),
        (13, s["unmapped"], 0x4000_3000)
    );
    assert_eq!(
        rec(&cpu, 13),
        0x2222,
        "sfence.vma drops the old translation"
    );
    // The only access to the read-only page faulted: neither A nor D may be set.
    assert_eq!(mem(&cpu, s["l0"] + 8) & (A | D), 0);
}

#[test]
fn timer_and_software_interrupts_wake_wfi() {
    let src = format!(
        "{PRELUDE}
    li s10, 0
    li s9, 0
    li t0, CLINT + 0xbff8
    ld t1, 0(t0)
    addi t1, t1, 1000      # 100 us at 10 MHz
    li t0, CLINT + 0x4000
    sd t1, 0(t0)
    li t0, 1 << 7
    csrs mie, t0
    csrsi mstatus, 8
1:  wfi
    beqz s10, 1b
    li t0, 1 << 3
    csrs mie, t0
    li t0, CLINT
    li t1, 1
    sw t1, 0(t0)
2:  beqz s9, 2b
    j finish

.align 2
mtrap:
    csrr t0, mcause
    sd t0, 0(s11)
    addi s11, s11, 8
    li t1, (1 << 63) | 7
    bne t0, t1, 1f
    li s10, 1
    li t0, CLINT + 0x4000
    li t1, -1
    sd t1, 0(t0)
    mret
1:  li s9, 1
    li t0, CLINT
    sw zero, 0(t0)
    mret
{FINISH}"
    );
    let (cpu, _) = run("interrupts", &src);
    assert_eq!(rec(&cpu, 0), (1 << 63) | 7, "machine timer");
    assert_eq!(rec(&cpu, 1), (1 << 63) | 3, "machine software");
    assert_eq!(rec(&cpu, 2), 0, "no further interrupt");
}

/// A set or clear of `mip` builds on SEIP's software bit, not on the interrupt
/// controller's line: OpenSBI's `csrc mip, STIP` while the PLIC asserts SEIP must not
/// latch SEIP (a Linux guest then takes that interrupt forever).
#[test]
fn mip_set_and_clear_keep_the_external_seip_line_out_of_the_software_bit() {
    let src = format!(
        "{PRELUDE}
    li t1, 0x101000
    li t2, 1
    sw t2, 0(t1)
    csrr t0, mip
    sd t0, 0(s11)
    li t2, 0x20
    csrs mip, t2
    csrc mip, t2
    sw zero, 0(t1)
    csrr t0, mip
    sd t0, 8(s11)
    li t2, 0x200
    csrs mip, t2
    csrr t0, mip
    sd t0, 16(s11)
    csrc mip, t2
    csrr t0, mip
    sd t0, 24(s11)
    j finish
{MTRAP_SKIP}{FINISH}"
    );
    let (cpu, _) = run("mip_seip", &src);
    let seip = 1u64 << 9;
    assert_ne!(rec(&cpu, 0) & seip, 0, "the line reads through mip");
    assert_eq!(
        rec(&cpu, 1) & (seip | 0x20),
        0,
        "the line was latched into mip"
    );
    assert_ne!(rec(&cpu, 2) & seip, 0, "software sets SEIP");
    assert_eq!(rec(&cpu, 3) & seip, 0, "software clears SEIP");
}

/// The same with compiled blocks that go from one to the next without the run loop: a
/// hot loop calls a routine until both are compiled and chained, the routine is rewritten
/// and fenced, and the loop must run the new routine from then on; a routine rewritten
/// without FENCE.I may run either way, but an unrelated FENCE.I then must pick it up.
#[test]
fn compiled_and_chained_blocks_follow_fence_i() {
    // Calls `patch` 200 times, summing what it returns into record `n`.
    let calls = |n: u32| {
        format!(
            "    li s1, 0
    li s2, 200
1:  jalr ra, 0(s0)
    add s1, s1, a0
    addi s2, s2, -1
    bnez s2, 1b
    sd s1, {}(s11)
",
            8 * n
        )
    };
    let (first, second, third) = (calls(0), calls(1), calls(2));
    let src = format!(
        "{PRELUDE}
.option norvc
    la s0, patch
{first}    li t0, 0x00500513     # addi a0, zero, 5
    sw t0, 0(s0)
    fence.i
{second}    li t0, 0x00700513     # addi a0, zero, 7
    sw t0, 0(s0)
    la t1, other
    jalr ra, 0(t1)        # a fence elsewhere
{third}    j finish
.align 2
patch:
    addi a0, zero, 1
    ret
other:
    fence.i
    ret
{MTRAP_SKIP}{FINISH}
"
    );
    let (cpu, _) = run("fencechain", &src);
    assert!(cpu.compiled_blocks() > 0, "nothing was compiled");
    assert_eq!(rec(&cpu, 0), 200);
    assert_eq!(
        rec(&cpu, 1),
        1000,
        "compiled code ran after FENCE.I changed it"
    );
    assert_eq!(
        rec(&cpu, 2),
        1400,
        "compiled code ran after a later FENCE.I"
    );
}

/// The decoded-block cache and the jump cache from virtual PC to block must not outlive
/// what they were built from: code rewritten then FENCE.I runs anew, and a code page
/// remapped then SFENCE.VMA runs the new page at the same virtual address.
#[test]
fn code_caches_follow_fence_i_and_a_remapped_code_page() {
    let src = format!(
        "{PRELUDE}
.option norvc
    la s0, patch
    jalr ra, 0(s0)
    sd a0, 0(s11)
    li t0, 0x00200513     # addi a0, zero, 2
    sw t0, 0(s0)
    fence.i
    jalr ra, 0(s0)
    sd a0, 8(s11)
    j finish
.align 2
patch:
    addi a0, zero, 1
    ret
{MTRAP_SKIP}{FINISH}
"
    );
    let (cpu, _) = run("fencei", &src);
    assert_eq!(rec(&cpu, 0), 1);
    assert_eq!(rec(&cpu, 1), 2, "FENCE.I must drop the old decoded code");

    let mut setup = String::new();
    setup += "    li t0, (0x80000000 >> 12) << 10 | 0xcf\n    la t1, root\n    sd t0, 16(t1)\n";
    setup += "    li t0, 0xc7\n    sd t0, 0(t1)\n"; // identity gigapage 0 for the finisher
    setup += &pte("root", 1, "l1", 1);
    setup += &pte("l1", 0, "l0", 1);
    setup += &pte("l0", 0, "codea", 1 | 2 | 8 | 64);
    let src = format!(
        "{PRELUDE}
.option norvc
{setup}
    la t0, root
    srli t0, t0, 12
    li t1, 8 << 60
    or t0, t0, t1
    csrw satp, t0
    li t0, 3 << 11
    csrc mstatus, t0
    li t0, 1 << 11
    csrs mstatus, t0
    la t0, smain
    csrw mepc, t0
    mret
smain:
    sfence.vma
    li s0, 0x40000000
    jalr ra, 0(s0)
    sd a0, 0(s11)
    jalr ra, 0(s0)        # a second call: through the jump cache
    sd a0, 8(s11)
    la t0, codeb          # remap the code page; sfence makes it visible
    srli t0, t0, 12
    slli t0, t0, 10
    ori t0, t0, 0x4b
    la s1, l0
    sd t0, 0(s1)
    sfence.vma
    jalr ra, 0(s0)
    sd a0, 16(s11)
    j finish
{MTRAP_SKIP}{FINISH}
.align 12
codea:
    li a0, 0xa
    ret
.align 12
codeb:
    li a0, 0xb
    ret
.data
.align 12
root: .space 4096
l1:   .space 4096
l0:   .space 4096
"
    );
    let (cpu, _) = run("remap", &src);
    assert_eq!((rec(&cpu, 0), rec(&cpu, 1)), (0xa, 0xa));
    assert_eq!(
        rec(&cpu, 2),
        0xb,
        "after sfence.vma the same virtual PC must run the new page"
    );
}

/// Two harts on one RAM and one CLINT: hart 0 wakes hart 1 from WFI by writing its
/// MSIP word (an IPI), and an SC fails when the other hart stored to the reserved word
/// between the LR and the SC (and succeeds without one).
#[test]
fn a_clint_ipi_wakes_the_other_hart_and_its_store_breaks_a_reservation() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    const FLAG: &str = "0x80180000"; // hart 1: 1 = woken, 3 = stored; hart 0: 2 = store now
    let src = format!(
        "{PRELUDE}
    li s1, {FLAG}
    li s2, {FLAG} + 0x100      # the reserved word
    csrr t0, mhartid
    bnez t0, hart1
    # Hart 0: wait until hart 1 sleeps (its flag at -1), then interrupt it.
0:  ld t1, 0(s1)
    li t2, -1
    bne t1, t2, 0b
    li t0, CLINT + 4
    li t1, 1
    sw t1, 0(t0)
1:  ld t1, 0(s1)
    li t2, 1
    bne t1, t2, 1b
    # LR, then the other hart stores to the word, then SC: must fail.
    lr.d t3, (s2)
    li t1, 2
    sd t1, 0(s1)
2:  ld t1, 0(s1)
    li t2, 3
    bne t1, t2, 2b
    li t4, 0x1234
    sc.d t5, t4, (s2)
    sd t5, 0(s11)
    # Undisturbed: must succeed.
    lr.d t3, (s2)
    sc.d t5, t4, (s2)
    sd t5, 8(s11)
    ld t1, 0(s2)
    sd t1, 16(s11)
    j finish

hart1:
    la t0, mtrap1
    csrw mtvec, t0
    li t0, 1 << 3
    csrs mie, t0
    csrsi mstatus, 8
    li t1, -1
    sd t1, 0(s1)
    # Sleep until the handler has run: hart 0 may already have moved the flag on
    # from 1 to 2 by the time this hart reads it.
3:  wfi
    ld t1, 0(s1)
    li t2, -1
    beq t1, t2, 3b
4:  ld t1, 0(s1)
    li t2, 2
    bne t1, t2, 4b
    li t1, 0x5678
    sd t1, 0(s2)
    li t1, 3
    sd t1, 0(s1)
5:  j 5b

.align 2
mtrap1:
    csrr t0, mcause
    sd t0, 24(s11)
    li t0, CLINT + 4
    sw zero, 0(t0)
    li t1, 1
    sd t1, 0(s1)
    mret
.align 2
mtrap:
    j mtrap
{FINISH}"
    );
    require_tools();
    let dir = Scratch::new("two_harts");
    let elf = build_bare(&dir.0, "two_harts", &src, BASE);
    // One RAM for both harts.
    let mut backing = vec![0u64; 0x20_0000 / 8];
    let host = backing.as_mut_ptr().cast::<u8>();
    let clint = Arc::new(rv64emu::clint::Clint::new(2));
    let mut cpus: Vec<Cpu> = (0..2)
        .map(|hart| {
            let mut ram = GuestRam::new();
            // SAFETY: `backing` outlives both CPUs (dropped at the end of this test,
            // after the hart threads are joined) and is only used through them.
            unsafe { ram.add_region(BASE, host, 0x20_0000) }.unwrap();
            let entry = load_segments(&elf, &ram);
            let mut cpu = Cpu::new(ram, entry);
            cpu.hartid = hart;
            cpu.clint = clint.clone();
            cpu.clint_base = Some(CLINT);
            cpu
        })
        .collect();
    let hart1 = cpus.pop().unwrap();
    let mut hart0 = cpus.pop().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let other = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut cpu = hart1;
            let mut bus = Finisher::default();
            while !done.load(Ordering::SeqCst) {
                if let RunExit::Wfi = cpu.run(&mut bus, 10_000) {
                    std::thread::sleep(std::time::Duration::from_micros(20));
                }
            }
            cpu
        })
    };
    let mut bus = Finisher::default();
    let t0 = std::time::Instant::now();
    while !bus.done && t0.elapsed() < std::time::Duration::from_secs(20) {
        if let RunExit::Wfi = hart0.run(&mut bus, 10_000) {
            std::thread::sleep(std::time::Duration::from_micros(20));
        }
    }
    // Join before asserting: hart 1's thread uses `backing`, which a panic here
    // would free under it.
    done.store(true, Ordering::SeqCst);
    let hart1 = other.join().unwrap();
    assert!(
        bus.done,
        "hart 0 never finished; pc {:#x}, hart 1 at {:#x}, flag {:#x}",
        hart0.pc,
        hart1.pc,
        mem(&hart0, 0x8018_0000)
    );
    assert_eq!(
        rec(&hart0, 0),
        1,
        "SC after the other hart's store must fail"
    );
    assert_eq!(rec(&hart0, 1), 0, "an undisturbed SC succeeds");
    assert_eq!(rec(&hart0, 2), 0x1234, "the successful SC's value");
    assert_eq!(
        rec(&hart0, 3),
        (1 << 63) | 3,
        "hart 1 took a software interrupt"
    );
    drop((hart0, hart1));
    drop(backing);
}
