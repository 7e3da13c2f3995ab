//! The loader against Debian's real cloud kernel (fetched by scripts/guest-assets.sh).

use std::path::PathBuf;

use arch::bzimage::BzImage;
use arch::elf::ElfKernel;
use arch::{bootparams, layout, BootConfig, BootProtocol};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn asset(name: &str) -> Vec<u8> {
    let dir = std::env::var_os("VESSEL_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/vessel/assets")
        });
    let p = dir.join(name);
    std::fs::read(&p).unwrap_or_else(|e| {
        panic!(
            "guest asset {} missing ({e}): run scripts/guest-assets.sh",
            p.display()
        )
    })
}

fn memory(size: u64) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
}

#[test]
fn debian_bzimage_header() {
    let img = asset("vmlinuz");
    let bz = BzImage::parse(&img).unwrap();
    assert!(bz.header.version >= 0x020c, "{:#x}", bz.header.version);
    assert_eq!(bz.header.pref_address, 0x100_0000);
    assert!(bz.header.relocatable);
    assert!(bz.header.init_size > bz.kernel.len() as u32);
    assert!(bz.header.cmdline_size >= 2047);
    // Debian's cloud kernels carry a compressed payload the header points at exactly.
    let payload = bz.payload().expect("payload inside the image");
    let magics: [&[u8]; 4] = [
        b"\x02\x21\x4c\x18",
        b"\x1f\x8b",
        b"\xfd7zXZ",
        b"\x28\xb5\x2f\xfd",
    ];
    assert!(magics.iter().any(|m| payload.starts_with(m)));
}

#[test]
fn debian_bzimage_loads_with_a_filled_zero_page() {
    let img = asset("vmlinuz");
    let mem = memory(512 << 20);
    let initrd = vec![7u8; 100_000];
    let cmdline = "console=ttyS0 root=/dev/vda";
    let loaded = arch::load_kernel(
        &mem,
        &BootConfig {
            kernel: &img,
            initrd: Some(&initrd),
            cmdline,
            mem_size: 512 << 20,
            acpi: Default::default(),
        },
    )
    .unwrap();
    assert_eq!(loaded.protocol, BootProtocol::Linux64);
    // The LZ4 payload is unpacked on the host: entry at startup_64 of the vmlinux, which
    // is byte for byte the vmlinux the assets script extracts.
    let vmlinux = asset("vmlinux");
    let elf = ElfKernel::parse(&vmlinux).unwrap();
    assert_eq!(loaded.entry, elf.entry);
    let mut zp = vec![0u8; 4096];
    mem.read_slice(&mut zp, GuestAddress(layout::ZERO_PAGE_START))
        .unwrap();
    assert_eq!(&zp[0x202..0x206], b"HdrS");
    assert_eq!(zp[0x210], 0xff, "type_of_loader");
    let (addr, size) = bootparams::read::initrd(&zp);
    assert_eq!(size, 100_000);
    assert_eq!(u64::from(addr), loaded.initrd.unwrap().0);
    assert!(u64::from(addr) >= loaded.kernel_end);
    let ptr = bootparams::read::cmdline_ptr(&zp);
    let mut got = vec![0u8; cmdline.len() + 1];
    mem.read_slice(&mut got, GuestAddress(u64::from(ptr)))
        .unwrap();
    assert_eq!(&got[..cmdline.len()], cmdline.as_bytes());
    assert_eq!(got[cmdline.len()], 0);
    assert_eq!(
        bootparams::read::e820(&zp),
        arch::e820::memory_map(512 << 20)
    );
    let seg = &elf.segments[0];
    let mut head = vec![0u8; 4096];
    mem.read_slice(&mut head, GuestAddress(seg.paddr)).unwrap();
    let off = seg.file_offset as usize;
    assert_eq!(&head[..], &vmlinux[off..off + 4096]);
    let bz = BzImage::parse(&img).unwrap();
    assert_eq!(bz.decompress_lz4_payload().unwrap(), vmlinux);
}

#[test]
fn debian_bzimage_in_too_little_memory_is_a_clean_error() {
    let img = asset("vmlinuz");
    let mem = memory(32 << 20);
    let err = arch::load_kernel(
        &mem,
        &BootConfig {
            kernel: &img,
            initrd: None,
            cmdline: "",
            mem_size: 32 << 20,
            acpi: Default::default(),
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, arch::LoadError::MemoryTooSmall { .. }),
        "{err}"
    );
}

#[test]
fn debian_bzimage_rejects_an_overlong_cmdline() {
    let img = asset("vmlinuz");
    let mem = memory(256 << 20);
    let long = "x".repeat(5000);
    let err = arch::load_kernel(
        &mem,
        &BootConfig {
            kernel: &img,
            initrd: None,
            cmdline: &long,
            mem_size: 256 << 20,
            acpi: Default::default(),
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, arch::LoadError::CmdlineTooLong { .. }),
        "{err}"
    );
}

#[test]
fn debian_vmlinux_has_a_pvh_entry() {
    let img = asset("vmlinux");
    let k = ElfKernel::parse(&img).unwrap();
    assert_eq!(k.entry, 0x100_0000);
    let pvh = k
        .pvh_entry
        .expect("Debian's kernel is built with CONFIG_PVH");
    assert!((0x100_0000..0x400_0000).contains(&pvh), "{pvh:#x}");
    let mem = memory(512 << 20);
    let loaded = arch::load_kernel(
        &mem,
        &BootConfig {
            kernel: &img,
            initrd: None,
            cmdline: "console=ttyS0",
            mem_size: 512 << 20,
            acpi: Default::default(),
        },
    )
    .unwrap();
    assert_eq!(loaded.protocol, BootProtocol::Pvh);
    assert_eq!(loaded.entry, u64::from(pvh));
    let mut si = [0u8; 4];
    mem.read_slice(&mut si, GuestAddress(layout::PVH_INFO_START))
        .unwrap();
    assert_eq!(u32::from_le_bytes(si), arch::pvh::XEN_HVM_START_MAGIC);
}

#[test]
fn corrupted_debian_images_are_errors_not_panics() {
    let img = asset("vmlinuz");
    let mem = memory(256 << 20);
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut refused = 0;
    for _ in 0..300 {
        let mut bad = img[..img.len().min(64 << 10)].to_vec();
        // Flip bytes in the setup header, where the loader's decisions come from.
        for _ in 0..4 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let at = 0x1f1 + (rng as usize % 0x80);
            bad[at] = (rng >> 32) as u8;
        }
        let r = arch::load_kernel(
            &mem,
            &BootConfig {
                kernel: &bad,
                initrd: None,
                cmdline: "",
                mem_size: 256 << 20,
                acpi: Default::default(),
            },
        );
        refused += usize::from(r.is_err());
    }
    // The image is cut to 64 KiB, so anything that parses must fail the size checks.
    assert_eq!(refused, 300);
}
