//! Smoke test on a real kernel: loads a vmlinux ELF with the 64-bit boot protocol and a
//! bare platform (a 8250 transmitter on 0x3f8, everything else reads as zero), runs a
//! fixed number of instructions and prints the serial console. It shows how far Linux
//! gets on the CPU alone; timers and interrupt controllers are the VMM's job.
//!
//! `cargo run --release -p x86emu --example boot_linux -- [vmlinux] [millions] [initrd]`
//! (default vmlinux: ~/.cache/vessel/assets/vmlinux, from scripts/guest-assets.sh)

use std::io::Write;
use std::time::Instant;

use x86emu::state::Seg;
use x86emu::testing::{code64, data, long_mode_state, PageTableBuilder, PTE_W};
use x86emu::{Cpu, GuestRam, Platform, RunExit};

const RAM: usize = 512 << 20;
const GDT: u64 = 0x500;
const BOOT_PARAMS: u64 = 0x7000;
const CMDLINE: u64 = 0x2_0000;
const PT_START: u64 = 0x9_0000;
const PT_END: u64 = 0x9_f000;

#[derive(Default)]
struct Serial {
    out: Vec<u8>,
}

impl Platform for Serial {
    fn mmio_read(&mut self, _gpa: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn mmio_write(&mut self, _gpa: u64, _data: &[u8]) {}
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        data.fill(0);
        // Line status: transmitter empty, so console writes never wait.
        if port == 0x3fd {
            data[0] = 0x60;
        }
    }
    fn pio_write(&mut self, port: u16, data: &[u8]) {
        if port == 0x3f8 {
            self.out.push(data[0]);
            let _ = std::io::stdout().write_all(&data[..1]);
        }
    }
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| {
        format!(
            "{}/.cache/vessel/assets/vmlinux",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let millions: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let initrd = args
        .next()
        .map(|p| std::fs::read(&p).unwrap_or_else(|e| panic!("{p}: {e}")));
    let elf = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");

    let mut ram = GuestRam::new();
    ram.add_owned(0, RAM).expect("RAM");
    // PT_LOAD segments at their physical addresses.
    let phoff = u64_at(&elf, 32) as usize;
    let phnum = u16_at(&elf, 56) as usize;
    for i in 0..phnum {
        let ph = &elf[phoff + i * 56..phoff + (i + 1) * 56];
        if u32_at(ph, 0) != 1 {
            continue;
        }
        let (off, paddr, filesz) = (
            u64_at(ph, 8) as usize,
            u64_at(ph, 24),
            u64_at(ph, 32) as usize,
        );
        assert!(
            ram.write(paddr, &elf[off..off + filesz]),
            "segment outside RAM"
        );
    }
    let entry = u64_at(&elf, 24);

    // Identity map the first GiB with 2 MiB pages.
    let mut pt = PageTableBuilder::new(&ram, PT_START, PT_END);
    for i in 0..512u64 {
        pt.map(&ram, i << 21, i << 21, 2, PTE_W);
    }
    // GDT: __BOOT_CS = 0x10, __BOOT_DS = 0x18.
    let gdt: [u64; 4] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    for (i, e) in gdt.iter().enumerate() {
        ram.write(GDT + i as u64 * 8, &e.to_le_bytes());
    }
    // Zero page: setup header, command line, E820 map.
    let cmdline =
        b"console=ttyS0 earlyprintk=serial,ttyS0,115200 lpj=1000000 tsc=reliable panic=-1\0";
    ram.write(CMDLINE, cmdline);
    let mut bp = vec![0u8; 4096];
    bp[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    bp[0x202..0x206].copy_from_slice(b"HdrS");
    bp[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    bp[0x210] = 0xff; // type_of_loader: undefined
    bp[0x211] = 0x01; // LOADED_HIGH
    bp[0x228..0x22c].copy_from_slice(&(CMDLINE as u32).to_le_bytes());
    bp[0x238..0x23c].copy_from_slice(&(cmdline.len() as u32).to_le_bytes());
    if let Some(rd) = &initrd {
        const INITRD: u64 = 0x1000_0000;
        assert!(ram.write(INITRD, rd), "initrd outside RAM");
        bp[0x218..0x21c].copy_from_slice(&(INITRD as u32).to_le_bytes());
        bp[0x21c..0x220].copy_from_slice(&(rd.len() as u32).to_le_bytes());
    }
    let e820 = [
        (0u64, 0x9_fc00u64, 1u32),
        (0x10_0000, RAM as u64 - 0x10_0000, 1),
    ];
    bp[0x1e8] = e820.len() as u8;
    for (i, (addr, size, ty)) in e820.iter().enumerate() {
        let o = 0x2d0 + i * 20;
        bp[o..o + 8].copy_from_slice(&addr.to_le_bytes());
        bp[o + 8..o + 16].copy_from_slice(&size.to_le_bytes());
        bp[o + 16..o + 20].copy_from_slice(&ty.to_le_bytes());
    }
    ram.write(BOOT_PARAMS, &bp);

    let mut cpu = Cpu::new(ram);
    let mut s = long_mode_state(pt.root, GDT, 0, 0);
    s.gdtr.limit = 4 * 8 - 1;
    s.idtr.limit = 0;
    for sg in Seg::ALL {
        s.seg[sg as usize] = data(0x18, 0);
    }
    s.seg[Seg::Cs as usize] = code64(0x10, 0);
    s.efer &= !x86emu::state::cr::EFER_SCE;
    s.rip = entry;
    s.gpr[6] = BOOT_PARAMS;
    cpu.set_state(s);

    let mut serial = Serial::default();
    let start = Instant::now();
    let mut left = millions * 1_000_000;
    // Sample the privilege level between 100k-instruction slices to show how much of the
    // run is user space.
    let (mut samples, mut user_samples) = (0u64, 0u64);
    let exit = loop {
        let chunk = left.min(100_000);
        let e = cpu.run(&mut serial, chunk);
        left = left.saturating_sub(chunk.max(1));
        samples += 1;
        if cpu.state().cpl() == 3 {
            user_samples += 1;
        }
        match e {
            RunExit::InstructionLimit if left > 0 => continue,
            other => break other,
        }
    };
    if std::env::var_os("X86EMU_HOT_RIPS").is_some() {
        // Where is the time going? Sample the RIPs of the next million instructions.
        let mut hist = std::collections::HashMap::<u64, u64>::new();
        for _ in 0..1_000_000 {
            *hist.entry(cpu.state().rip).or_default() += 1;
            cpu.run(&mut serial, 1);
        }
        let mut v: Vec<_> = hist.into_iter().collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        for (rip, n) in v.iter().take(25) {
            println!("{rip:#x} {n}");
        }
    }
    let s = cpu.state();
    println!(
        "\n--- {exit:?} after {} instructions in {:.1} s; RIP {:#x}, CR2 {:#x}; {user_samples} of {samples} samples in user mode",
        cpu.retired_instructions(),
        start.elapsed().as_secs_f64(),
        s.rip,
        s.cr2
    );
}
