//! Boots the riscv64 `virt` machine straight from the library:
//! `cargo run -p rv64emu --example virt_boot -- FW_DYNAMIC IMAGE [INITRD] [CMDLINE]`.
//! `vessel run --arch riscv64` is the real entry point; this one skips the VMM (and has
//! no console input).

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: virt_boot FW_DYNAMIC IMAGE [INITRD] [CMDLINE]");
        std::process::exit(2);
    }
    let cfg = rv64emu::virt::VirtConfig {
        memory_mib: 512,
        harts: 1,
        firmware: args[1].clone().into(),
        kernel: args[2].clone().into(),
        initrd: args.get(3).filter(|s| !s.is_empty()).map(Into::into),
        cmdline: args
            .get(4)
            .cloned()
            .unwrap_or_else(|| "console=ttyS0 earlycon=sbi".into()),
        disks: Vec::new(),
        devices: Vec::new(),
        serial_out: Box::new(std::io::stdout()),
        exit: Default::default(),
        io_gate: Default::default(),
    };
    match rv64emu::virt::boot(cfg) {
        Ok(exit) => {
            eprintln!("virt_boot: {exit:?}");
        }
        Err(e) => {
            eprintln!("virt_boot: {e}");
            std::process::exit(1);
        }
    }
}
