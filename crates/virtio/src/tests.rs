//! Transport and device tests, driven the way a guest driver drives them: registers on
//! the MMIO window, descriptors and rings in guest memory.

use std::io::Write;
use std::sync::{Arc, Mutex};

use crate::fuzzing::MemDisk;
use devices::BusDevice;
use hypervisor::IrqChip;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::blk::Block;
use crate::console::Console;
use crate::mmio::{status, MmioTransport, INT_CONFIG_CHANGE, INT_USED_RING};
use crate::rng::Rng;
use crate::transport::PROBE_EVERY;
use crate::VIRTIO_F_VERSION_1;

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const DATA: u64 = 0x10000;
const QSIZE: u16 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// Counts interrupts; with `moderating` set it stands for a chip that holds moderated
/// ones (the emu's): those are counted in `held` until released.
/// Edges asked for when a vCPU halts (`pulse_irq_line_at_halt`) are counted apart.
#[derive(Default)]
struct Pulses(
    Mutex<u32>,
    std::sync::atomic::AtomicBool,
    Mutex<(u32, u32)>,
    Mutex<u32>,
);
impl Pulses {
    fn moderating() -> Self {
        Pulses(
            Mutex::default(),
            true.into(),
            Mutex::default(),
            Mutex::default(),
        )
    }
    /// (held, released)
    fn held(&self) -> (u32, u32) {
        *self.2.lock().unwrap()
    }
    fn at_halt(&self) -> u32 {
        *self.3.lock().unwrap()
    }
}
impl IrqChip for Pulses {
    fn set_irq_line(&self, _gsi: u32, active: bool) -> hypervisor::Result<()> {
        if active {
            *self.0.lock().unwrap() += 1;
        }
        Ok(())
    }
    fn signal_msi(&self, _: u64, _: u32) -> hypervisor::Result<()> {
        Ok(())
    }
    fn moderates(&self) -> bool {
        self.1.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn pulse_irq_line_moderated(&self, _: u32, _: std::time::Duration) -> hypervisor::Result<()> {
        self.2.lock().unwrap().0 += 1;
        Ok(())
    }
    fn release_moderated(&self) {
        self.2.lock().unwrap().1 += 1;
    }
    fn pulse_irq_line_at_halt(&self, _: u32, _: std::time::Duration) -> hypervisor::Result<()> {
        *self.3.lock().unwrap() += 1;
        Ok(())
    }
}

struct Driver {
    t: MmioTransport,
    mem: GuestMemoryMmap,
    irq: Arc<Pulses>,
    avail_idx: u16,
}

impl Driver {
    fn new(dev: Box<dyn crate::VirtioDevice>) -> Self {
        Self::with_chip(dev, Pulses::default())
    }

    fn with_chip(dev: Box<dyn crate::VirtioDevice>, irq: Pulses) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        Self::on_memory(dev, irq, mem)
    }

    /// A device on memory another driver already set up (a restore's).
    fn on_memory(dev: Box<dyn crate::VirtioDevice>, irq: Pulses, mem: GuestMemoryMmap) -> Self {
        let irq = Arc::new(irq);
        let t = MmioTransport::new(dev, mem.clone(), irq.clone(), 5);
        Driver {
            t,
            mem,
            irq,
            avail_idx: 0,
        }
    }

    fn w(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }
    fn r(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// The driver initialization sequence of virtio spec 3.1.1, for every queue.
    fn init(self, queue_size: u16) -> Self {
        self.init_with(queue_size, u64::MAX)
    }

    /// As `init`, accepting only the offered features within `accept`.
    fn init_with(self, queue_size: u16, accept: u64) -> Self {
        let mut d = self.set_up(queue_size, accept);
        d.w(
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        d
    }

    /// The initialization sequence up to DRIVER_OK, not setting it.
    fn set_up(mut self, queue_size: u16, accept: u64) -> Self {
        assert_eq!(self.r(0x000), 0x7472_6976);
        assert_eq!(self.r(0x004), 2);
        self.w(0x070, status::ACKNOWLEDGE | status::DRIVER);
        self.w(0x014, 0);
        let lo = self.r(0x010);
        self.w(0x014, 1);
        let hi = self.r(0x010);
        let offered = u64::from(lo) | (u64::from(hi) << 32);
        assert_ne!(offered & VIRTIO_F_VERSION_1, 0);
        let offered = offered & (accept | VIRTIO_F_VERSION_1);
        self.w(0x024, 0);
        self.w(0x020, offered as u32);
        self.w(0x024, 1);
        self.w(0x020, (offered >> 32) as u32);
        self.w(
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_ne!(self.r(0x070) & status::FEATURES_OK, 0);
        // Every queue the device has (a queue past the last reads a max size of 0).
        for q in 0..8u64 {
            self.w(0x030, q as u32);
            if self.r(0x034) == 0 {
                continue;
            }
            let base = q * 0x4000;
            self.w(0x038, u32::from(queue_size));
            self.w(0x080, (DESC + base) as u32);
            self.w(0x084, 0);
            self.w(0x090, (AVAIL + base) as u32);
            self.w(0x094, 0);
            self.w(0x0a0, (USED + base) as u32);
            self.w(0x0a4, 0);
            self.w(0x044, 1);
        }
        self
    }

    /// Post one chain (addr, len, flags) on queue 0 and notify; returns the used length.
    fn submit(&mut self, chain: &[(u64, u32, u16)]) -> Option<u32> {
        self.submit_on(0, chain)
    }

    fn submit_on(&mut self, q: u64, chain: &[(u64, u32, u16)]) -> Option<u32> {
        let base = q * 0x4000;
        for (i, &(addr, len, flags)) in chain.iter().enumerate() {
            let d = DESC + base + i as u64 * 16;
            let next_flag = if i + 1 < chain.len() { F_NEXT } else { 0 };
            self.mem.write_obj(addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            self.mem
                .write_obj(flags | next_flag, GuestAddress(d + 12))
                .unwrap();
            self.mem
                .write_obj((i + 1) as u16, GuestAddress(d + 14))
                .unwrap();
        }
        let slot = AVAIL + base + 4 + u64::from(self.avail_idx % QSIZE) * 2;
        self.mem.write_obj(0u16, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + base + 2))
            .unwrap();
        let used_before: u16 = self.mem.read_obj(GuestAddress(USED + base + 2)).unwrap();
        self.w(0x050, q as u32);
        let used_after: u16 = self.mem.read_obj(GuestAddress(USED + base + 2)).unwrap();
        if used_after == used_before {
            return None;
        }
        let elem = USED + base + 4 + u64::from(used_before % QSIZE) * 8;
        Some(self.mem.read_obj(GuestAddress(elem + 4)).unwrap())
    }

    fn status(&mut self) -> u32 {
        self.r(0x070)
    }

    fn header(&self, at: u64, kind: u32, sector: u64) {
        self.mem.write_obj(kind, GuestAddress(at)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    fn byte(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }
}

fn blk(ro: bool) -> Driver {
    let mut data = vec![0u8; 1 << 20];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i / 512) as u8;
    }
    Driver::new(Box::new(Block::new(
        Box::new(MemDisk { data, ro }),
        "disk-serial-1",
        false,
    )))
    .init(QSIZE)
}

const HDR: u64 = DATA;
const BUF: u64 = DATA + 0x100;
const ST: u64 = DATA + 0x8000;

#[test]
fn blk_read_write_round_trip() {
    let mut d = blk(false);
    // Capacity in config space: 1 MiB / 512.
    let mut cap = [0u8; 8];
    d.t.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);

    d.header(HDR, 0, 3);
    let used = d.submit(&[(HDR, 16, 0), (BUF, 1024, F_WRITE), (ST, 1, F_WRITE)]);
    assert_eq!(used, Some(1025));
    assert_eq!(d.byte(ST), 0);
    assert_eq!(d.byte(BUF), 3);
    assert_eq!(d.byte(BUF + 600), 4);
    assert!(*d.irq.0.lock().unwrap() >= 1);
    assert_eq!(d.r(0x060) & INT_USED_RING, INT_USED_RING);

    d.mem.write_slice(&[0xab; 512], GuestAddress(BUF)).unwrap();
    d.header(HDR, 1, 10);
    assert!(d
        .submit(&[(HDR, 16, 0), (BUF, 512, 0), (ST, 1, F_WRITE)])
        .is_some());
    assert_eq!(d.byte(ST), 0);
    d.header(HDR, 0, 10);
    d.mem.write_slice(&[0; 512], GuestAddress(BUF)).unwrap();
    d.submit(&[(HDR, 16, 0), (BUF, 512, F_WRITE), (ST, 1, F_WRITE)]);
    assert_eq!(d.byte(BUF + 511), 0xab);
}

#[test]
fn blk_flush_id_discard_and_errors_in_the_status_byte() {
    let mut d = blk(false);
    d.header(HDR, 4, 0);
    d.submit(&[(HDR, 16, 0), (ST, 1, F_WRITE)]);
    assert_eq!(d.byte(ST), 0, "flush");

    d.header(HDR, 8, 0);
    d.submit(&[(HDR, 16, 0), (BUF, 20, F_WRITE), (ST, 1, F_WRITE)]);
    let mut id = [0u8; 13];
    d.mem.read_slice(&mut id, GuestAddress(BUF)).unwrap();
    assert_eq!(&id, b"disk-serial-1");

    // Discard sectors 0..2, then read zeros back.
    d.header(HDR, 11, 0);
    d.mem.write_obj(0u64, GuestAddress(BUF)).unwrap();
    d.mem.write_obj(2u32, GuestAddress(BUF + 8)).unwrap();
    d.mem.write_obj(0u32, GuestAddress(BUF + 12)).unwrap();
    d.submit(&[(HDR, 16, 0), (BUF, 16, 0), (ST, 1, F_WRITE)]);
    assert_eq!(d.byte(ST), 0);
    d.header(HDR, 0, 1);
    d.mem.write_slice(&[9; 512], GuestAddress(BUF)).unwrap();
    d.submit(&[(HDR, 16, 0), (BUF, 512, F_WRITE), (ST, 1, F_WRITE)]);
    assert_eq!(d.byte(BUF), 0);

    // Past the end: IOERR, device stays usable.
    d.header(HDR, 0, 4096);
    d.submit(&[(HDR, 16, 0), (BUF, 512, F_WRITE), (ST, 1, F_WRITE)]);
    assert_eq!(d.byte(ST), 1);
    // Unknown request type: UNSUPP.
    d.header(HDR, 77, 0);
    d.submit(&[(HDR, 16, 0), (ST, 1, F_WRITE)]);
    assert_eq!(d.byte(ST), 2);
    assert_eq!(d.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn blk_read_only_refuses_writes() {
    let mut d = blk(true);
    let mut f = [0u8; 4];
    d.w(0x014, 0);
    d.t.read(0x010, &mut f);
    assert_ne!(u32::from_le_bytes(f) & (1 << 5), 0, "VIRTIO_BLK_F_RO");
    d.header(HDR, 1, 0);
    d.submit(&[(HDR, 16, 0), (BUF, 512, 0), (ST, 1, F_WRITE)]);
    assert_eq!(d.byte(ST), 1);
}

#[test]
fn descriptor_outside_guest_memory_needs_reset() {
    let mut d = blk(false);
    d.header(HDR, 0, 0);
    let pulses = *d.irq.0.lock().unwrap();
    d.submit(&[
        (HDR, 16, 0),
        (0xffff_0000_0000, 512, F_WRITE),
        (ST, 1, F_WRITE),
    ]);
    assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    assert_ne!(d.r(0x060) & INT_CONFIG_CHANGE, 0);
    assert!(*d.irq.0.lock().unwrap() > pulses);
    // Reset brings it back.
    d.w(0x070, 0);
    assert_eq!(d.status(), 0);
}

#[test]
fn a_descriptor_loop_needs_reset() {
    let mut d = blk(false);
    d.header(HDR, 0, 0);
    // Two descriptors that point at each other.
    for (i, next) in [(0u64, 1u16), (1, 0)] {
        let at = DESC + i * 16;
        d.mem.write_obj(HDR, GuestAddress(at)).unwrap();
        d.mem.write_obj(16u32, GuestAddress(at + 8)).unwrap();
        d.mem.write_obj(F_NEXT, GuestAddress(at + 12)).unwrap();
        d.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }
    d.mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
    d.mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    d.w(0x050, 0);
    assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn length_overflow_needs_reset() {
    let mut d = blk(false);
    d.header(HDR, 0, 0);
    d.submit(&[(HDR, 16, 0), (BUF, u32::MAX, F_WRITE), (ST, 1, F_WRITE)]);
    assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn queue_size_not_a_power_of_two_needs_reset() {
    let d = Driver::new(Box::new(Rng));
    let mut d = d.init(12);
    d.submit(&[(BUF, 64, F_WRITE)]);
    assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn features_never_offered_are_refused() {
    let mut d = Driver::new(Box::new(Rng));
    d.w(0x070, status::ACKNOWLEDGE | status::DRIVER);
    d.w(0x024, 1);
    d.w(0x020, 1 | (1 << 30));
    d.w(
        0x070,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(d.r(0x070) & status::FEATURES_OK, 0);
}

#[test]
fn hostile_register_accesses_do_not_panic() {
    let mut d = blk(false);
    for off in (0..0x200u64).step_by(1) {
        for len in [1usize, 2, 3, 4, 8] {
            let mut b = vec![0xffu8; len];
            d.t.read(off, &mut b);
            d.t.write(off, &b);
        }
    }
    d.w(0x030, 99);
    d.w(0x038, 64);
    d.w(0x050, 12345);
}

#[test]
fn rng_fills_buffers() {
    let mut d = Driver::new(Box::new(Rng)).init(QSIZE);
    d.mem.write_slice(&[0; 256], GuestAddress(BUF)).unwrap();
    assert_eq!(d.submit(&[(BUF, 256, F_WRITE)]), Some(256));
    let mut b = [0u8; 256];
    d.mem.read_slice(&mut b, GuestAddress(BUF)).unwrap();
    assert!(b.iter().filter(|&&x| x != 0).count() > 200);
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);
impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn console_transmits_and_receives() {
    let sink = Sink::default();
    let console = Console::new(Box::new(sink.clone()));
    let input = console.input();
    let mut d = Driver::new(Box::new(console)).init(QSIZE);
    d.mem.write_slice(b"hello hvc0", GuestAddress(BUF)).unwrap();
    d.submit_on(1, &[(BUF, 10, 0)]);
    assert_eq!(&*sink.0.lock().unwrap(), b"hello hvc0");

    input.lock().unwrap().extend(b"typed".iter());
    let used = d.submit_on(0, &[(BUF + 0x100, 64, F_WRITE)]);
    assert_eq!(used, Some(5));
    let mut b = [0u8; 5];
    d.mem.read_slice(&mut b, GuestAddress(BUF + 0x100)).unwrap();
    assert_eq!(&b, b"typed");
}

/// A network namespace (and the TAP moved into it) that exists for one test.
struct NetNs(String);

impl NetNs {
    fn new() -> Self {
        let name = format!("vessel-vnet-{}", std::process::id());
        let st = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip (iproute2) is needed: apt-get install iproute2");
        assert!(st.success(), "ip netns add {name} failed (needs root)");
        NetNs(name)
    }

    fn exec(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[test]
fn net_frames_cross_a_real_tap_in_a_private_namespace() {
    use crate::net::{default_mac, Net};
    use crate::tap::Tap;

    let ns = NetNs::new();
    let tap_name = format!("vsltap{}", std::process::id() % 100_000);
    let tap = Tap::open(&tap_name).expect("TAP (needs /dev/net/tun and root)");
    let run = |args: &[&str]| {
        let o = std::process::Command::new("ip")
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    run(&["link", "set", &tap_name, "netns", &ns.0]);
    for cmd in [
        vec!["ip", "link", "set", "lo", "up"],
        vec!["ip", "addr", "add", "10.199.0.1/24", "dev", &tap_name],
        vec!["ip", "link", "set", &tap_name, "up"],
    ] {
        let o = ns.exec(&cmd);
        assert!(
            o.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    let mac = default_mac(&tap_name);
    let mut d = Driver::new(Box::new(Net::new(tap, mac))).init(QSIZE);
    let mut cfg = [0u8; 6];
    d.t.read(0x100, &mut cfg);
    assert_eq!(cfg, mac);

    // A datagram from the namespace to the "guest" address makes its kernel ARP for it.
    let o = ns.exec(&["bash", "-c", "echo hi > /dev/udp/10.199.0.2/9 || true"]);
    assert!(o.status.success());
    let mut got_arp = false;
    for _ in 0..100 {
        let used = d.submit_on(0, &[(BUF, 2048, F_WRITE)]);
        if let Some(len) = used {
            let mut frame = vec![0u8; len as usize];
            d.mem.read_slice(&mut frame, GuestAddress(BUF)).unwrap();
            let eth = &frame[12..];
            // Ethertype ARP, opcode request, target IP 10.199.0.2.
            if eth.len() >= 42 && eth[12..14] == [0x08, 0x06] && eth[20..22] == [0, 1] {
                assert_eq!(&eth[38..42], &[10, 199, 0, 2]);
                got_arp = true;
                break;
            }
        } else {
            // No frame yet: give the buffer back by not counting it, and wait.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    assert!(got_arp, "no ARP request reached the guest side");

    // The guest answers with an ARP reply from its MAC; the namespace's kernel learns it.
    let mut reply = vec![0u8; VNET_HDR + 42];
    let e = &mut reply[VNET_HDR..];
    e[0..6].copy_from_slice(&[0xff; 6]);
    e[6..12].copy_from_slice(&mac);
    e[12..14].copy_from_slice(&[0x08, 0x06]);
    e[14..22].copy_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 2]);
    e[22..28].copy_from_slice(&mac);
    e[28..32].copy_from_slice(&[10, 199, 0, 2]);
    e[32..38].copy_from_slice(&[0xff; 6]);
    e[38..42].copy_from_slice(&[10, 199, 0, 1]);
    d.mem
        .write_slice(&reply, GuestAddress(BUF + 0x1000))
        .unwrap();
    d.submit_on(1, &[(BUF + 0x1000, reply.len() as u32, 0)]);
    let want = mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let mut seen = String::new();
    for _ in 0..50 {
        seen = String::from_utf8_lossy(&ns.exec(&["ip", "neigh", "show", "10.199.0.2"]).stdout)
            .into_owned();
        if seen.contains(&want) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        seen.contains(&want),
        "neighbour table: {seen:?}, want {want}"
    );
}

const VNET_HDR: usize = crate::tap::VNET_HDR_LEN;

/// The host side of a virtio-net device, in memory: frames for the guest, frames from
/// it, and every TUNSETOFFLOAD the device made.
#[derive(Clone, Default)]
struct FakeNet(Arc<Mutex<FakeNetState>>);

#[derive(Default)]
struct FakeNetState {
    to_guest: std::collections::VecDeque<Vec<u8>>,
    from_guest: Vec<Vec<u8>>,
    offloads: Vec<u32>,
    /// What `set_enabled` was told, in order.
    enabled: Vec<bool>,
}

impl crate::net::NetBackend for FakeNet {
    fn name(&self) -> &str {
        "fake"
    }
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        Ok(self.0.lock().unwrap().to_guest.pop_front().map(|f| {
            buf[..f.len()].copy_from_slice(&f);
            f.len()
        }))
    }
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.0.lock().unwrap().from_guest.push(frame.to_vec());
        Ok(())
    }
    fn set_offload(&mut self, flags: u32) -> Result<(), crate::tap::TapError> {
        self.0.lock().unwrap().offloads.push(flags);
        Ok(())
    }
    fn set_enabled(&mut self, enabled: bool) -> Result<(), crate::tap::TapError> {
        self.0.lock().unwrap().enabled.push(enabled);
        Ok(())
    }
    fn poll_fd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

fn net(accept: u64) -> (Driver, FakeNet) {
    let fake = FakeNet::default();
    let dev = crate::net::Net::with_backend(Box::new(fake.clone()), [0x52, 0x54, 0, 0, 0, 1]);
    (Driver::new(Box::new(dev)).init_with(QSIZE, accept), fake)
}

/// A 12-byte virtio-net header followed by `payload_len` patterned bytes.
fn net_frame(flags: u8, gso_type: u8, payload_len: usize) -> Vec<u8> {
    let mut f = vec![flags, gso_type];
    f.extend_from_slice(&1448u16.to_le_bytes()); // hdr_len
    f.extend_from_slice(&1448u16.to_le_bytes()); // gso_size
    f.extend_from_slice(&34u16.to_le_bytes()); // csum_start
    f.extend_from_slice(&16u16.to_le_bytes()); // csum_offset
    f.extend_from_slice(&0u16.to_le_bytes()); // num_buffers
    f.extend((0..payload_len).map(|i| (i * 7 + i / 251) as u8));
    f
}

impl Driver {
    /// Post one single-descriptor chain per buffer on queue `q` (descriptor `first + i`)
    /// without notifying.
    fn post_buffers(&mut self, q: u64, first: u16, bufs: &[(u64, u32, u16)]) {
        let base = q * 0x4000;
        for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
            let head = first + i as u16;
            let d = DESC + base + u64::from(head) * 16;
            self.mem.write_obj(addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            let slot = AVAIL + base + 4 + u64::from(self.avail_idx % QSIZE) * 2;
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + base + 2))
            .unwrap();
    }

    /// Used elements (id, len) on queue `q` from index `from` up to the device's index.
    fn used_since(&self, q: u64, from: u16) -> Vec<(u32, u32)> {
        let base = q * 0x4000;
        let idx: u16 = self.mem.read_obj(GuestAddress(USED + base + 2)).unwrap();
        (from..idx)
            .map(|i| {
                let e = USED + base + 4 + u64::from(i % QSIZE) * 8;
                (
                    self.mem.read_obj(GuestAddress(e)).unwrap(),
                    self.mem.read_obj(GuestAddress(e + 4)).unwrap(),
                )
            })
            .collect()
    }
}

#[test]
fn net_offers_offloads_and_the_tap_gets_only_what_the_driver_accepted() {
    use crate::net::features::*;
    use crate::tap::offload;
    let (mut d, fake) = net(u64::MAX);
    d.w(0x014, 0);
    let offered = u64::from(d.r(0x010));
    for f in [
        CSUM, GUEST_CSUM, MAC, GUEST_TSO4, GUEST_TSO6, GUEST_ECN, HOST_TSO4, HOST_TSO6, HOST_ECN,
        MRG_RXBUF,
    ] {
        assert_ne!(offered & f, 0, "feature {f:#x} not offered");
    }
    assert_eq!(offered & (GUEST_UFO | HOST_UFO), 0);
    let all = offload::CSUM | offload::TSO4 | offload::TSO6 | offload::TSO_ECN;
    assert_eq!(fake.0.lock().unwrap().offloads, vec![all]);
    // A reset takes the offloads back; a driver without GUEST_CSUM gets none, one with
    // checksums only gets just that.
    d.w(0x070, 0);
    assert_eq!(fake.0.lock().unwrap().offloads.last(), Some(&0));
    let (_, fake) = net(MAC | CSUM | HOST_TSO4 | GUEST_TSO4);
    assert_eq!(fake.0.lock().unwrap().offloads, vec![0]);
    let (_, fake) = net(MAC | GUEST_CSUM);
    assert_eq!(fake.0.lock().unwrap().offloads, vec![offload::CSUM]);
    let (_, fake) = net(GUEST_CSUM | GUEST_TSO6 | GUEST_ECN);
    assert_eq!(
        fake.0.lock().unwrap().offloads,
        vec![offload::CSUM | offload::TSO6 | offload::TSO_ECN]
    );
}

#[test]
fn net_tx_passes_the_header_through_and_drops_offloads_not_negotiated() {
    use crate::net::{features::*, hdr};
    let (mut d, fake) = net(u64::MAX);
    let frame = net_frame(hdr::F_NEEDS_CSUM, hdr::GSO_TCPV4 | hdr::GSO_ECN, 3000);
    d.mem.write_slice(&frame, GuestAddress(BUF)).unwrap();
    // Header and payload in separate descriptors, as Linux sends them.
    assert_eq!(
        d.submit_on(1, &[(BUF, 12, 0), (BUF + 12, frame.len() as u32 - 12, 0)]),
        Some(0)
    );
    assert_eq!(fake.0.lock().unwrap().from_guest, vec![frame.clone()]);

    // Without HOST_TSO4/HOST_ECN the same frame is dropped, and the device carries on.
    let (mut d, fake) = net(MAC | CSUM | MRG_RXBUF);
    d.mem.write_slice(&frame, GuestAddress(BUF)).unwrap();
    assert_eq!(d.submit_on(1, &[(BUF, frame.len() as u32, 0)]), Some(0));
    assert!(fake.0.lock().unwrap().from_guest.is_empty());
    let plain = net_frame(hdr::F_NEEDS_CSUM, hdr::GSO_NONE, 100);
    d.mem.write_slice(&plain, GuestAddress(BUF)).unwrap();
    d.submit_on(1, &[(BUF, plain.len() as u32, 0)]);
    assert_eq!(fake.0.lock().unwrap().from_guest, vec![plain]);
    // DATA_VALID is the device's flag; a driver that sends it is wrong.
    let bad = net_frame(hdr::F_DATA_VALID, hdr::GSO_NONE, 100);
    d.mem.write_slice(&bad, GuestAddress(BUF)).unwrap();
    d.submit_on(1, &[(BUF, bad.len() as u32, 0)]);
    assert_eq!(fake.0.lock().unwrap().from_guest.len(), 1);
    assert_eq!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    // A buffer shorter than the header is no frame at all: the device needs a reset.
    d.submit_on(1, &[(BUF, 6, 0)]);
    assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn net_rx_spreads_a_gso_frame_over_mergeable_buffers() {
    use crate::net::hdr;
    let (mut d, fake) = net(u64::MAX);
    let frame = net_frame(hdr::F_NEEDS_CSUM, hdr::GSO_TCPV4, 5000);
    fake.0.lock().unwrap().to_guest.push_back(frame.clone());
    // One 2 KiB buffer is not enough: the frame waits, and the buffer stays available.
    d.post_buffers(0, 0, &[(BUF, 2048, F_WRITE)]);
    d.w(0x050, 0);
    assert!(d.used_since(0, 0).is_empty());
    d.post_buffers(
        0,
        1,
        &[(BUF + 0x1000, 2048, F_WRITE), (BUF + 0x2000, 2048, F_WRITE)],
    );
    d.w(0x050, 0);
    let used = d.used_since(0, 0);
    assert_eq!(used, vec![(0, 2048), (1, 2048), (2, 5012 - 4096)]);
    let mut got = Vec::new();
    for (i, &(_, len)) in used.iter().enumerate() {
        let mut b = vec![0u8; len as usize];
        d.mem
            .read_slice(&mut b, GuestAddress(BUF + i as u64 * 0x1000))
            .unwrap();
        got.extend(b);
    }
    // The header is the TAP's, with num_buffers filled in.
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3);
    let mut want = frame;
    want[10..12].copy_from_slice(&3u16.to_le_bytes());
    assert_eq!(got, want);
}

#[test]
fn net_rx_without_mergeable_buffers_and_offloads() {
    use crate::net::{features::*, hdr};
    let (mut d, fake) = net(MAC);
    {
        let mut f = fake.0.lock().unwrap();
        // Offloads the driver never accepted (a frame queued before it renegotiated).
        f.to_guest
            .push_back(net_frame(hdr::F_NEEDS_CSUM, hdr::GSO_TCPV4, 3000));
        // Too big for one buffer.
        f.to_guest
            .push_back(net_frame(hdr::F_DATA_VALID, hdr::GSO_NONE, 3000));
        // Fits; DATA_VALID means nothing without GUEST_CSUM and is cleared.
        f.to_guest
            .push_back(net_frame(hdr::F_DATA_VALID, hdr::GSO_NONE, 1000));
    }
    d.post_buffers(0, 0, &[(BUF, 2048, F_WRITE), (BUF + 0x1000, 2048, F_WRITE)]);
    d.w(0x050, 0);
    assert_eq!(d.used_since(0, 0), vec![(0, 0), (1, 1012)]);
    let mut h = [0u8; 12];
    d.mem
        .read_slice(&mut h, GuestAddress(BUF + 0x1000))
        .unwrap();
    assert_eq!(h[0], 0);
    assert_eq!(u16::from_le_bytes([h[10], h[11]]), 1);
    assert!(fake.0.lock().unwrap().to_guest.is_empty());
    // A receive buffer that cannot hold the header is a driver bug.
    fake.0
        .lock()
        .unwrap()
        .to_guest
        .push_back(net_frame(0, 0, 10));
    d.post_buffers(0, 2, &[(BUF, 8, F_WRITE)]);
    d.w(0x050, 0);
    assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    let _ = GUEST_CSUM;
}

#[test]
fn an_io_thread_runs_the_device_off_the_notifying_thread() {
    let mut d = blk(false);
    let io = d.t.io_thread("blk-test", None).unwrap();
    let exit = Arc::new(devices::ExitSignal::new());
    let gate = Arc::new(crate::mmio::IoGate::default());
    let thread = io.spawn(exit.clone(), gate.clone()).unwrap();
    let used_idx = |d: &Driver| -> u16 { d.mem.read_obj(GuestAddress(USED + 2)).unwrap() };
    for round in 0..20u16 {
        d.header(HDR, 0, u64::from(round));
        // The notify only rings the thread's doorbell; the request completes there.
        d.submit(&[(HDR, 16, 0), (BUF, 512, F_WRITE), (ST, 1, F_WRITE)]);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while used_idx(&d) != round + 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "request {round} never completed"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(d.byte(ST), 0);
        assert_eq!(d.byte(BUF), round as u8);
    }
    // Paused: a request waits, untouched, until the gate opens again.
    assert!(gate.close(std::time::Duration::from_secs(5)));
    d.header(HDR, 0, 99);
    d.submit(&[(HDR, 16, 0), (BUF, 512, F_WRITE), (ST, 1, F_WRITE)]);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(used_idx(&d), 20, "served while paused");
    gate.open();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while used_idx(&d) != 21 {
        assert!(
            std::time::Instant::now() < deadline,
            "not served after resume"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(d.r(0x060) & INT_USED_RING, INT_USED_RING);
    // A reset with the thread running: the device stops, a late notify does nothing.
    d.w(0x070, 0);
    assert_eq!(d.status(), 0);
    assert_eq!(d.r(0x060), 0);
    d.w(0x050, 0);
    std::thread::sleep(std::time::Duration::from_millis(20));
    exit.request(devices::ExitReason::Quit);
    thread.join().unwrap();
}

/// Where the split ring's event fields sit for queue 0 (virtio spec 2.7.10).
const USED_EVENT: u64 = AVAIL + 4 + 2 * QSIZE as u64;
const AVAIL_EVENT: u64 = USED + 4 + 8 * QSIZE as u64;

impl Driver {
    /// Put a chain on queue 0 starting at descriptor `first`, without notifying.
    fn post(&mut self, first: u16, chain: &[(u64, u32, u16)]) {
        for (i, &(addr, len, flags)) in chain.iter().enumerate() {
            let idx = first + i as u16;
            let d = DESC + u64::from(idx) * 16;
            let next_flag = if i + 1 < chain.len() { F_NEXT } else { 0 };
            self.mem.write_obj(addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            self.mem
                .write_obj(flags | next_flag, GuestAddress(d + 12))
                .unwrap();
            self.mem.write_obj(idx + 1, GuestAddress(d + 14)).unwrap();
        }
        let slot = AVAIL + 4 + u64::from(self.avail_idx % QSIZE) * 2;
        self.mem.write_obj(first, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn pulses(&self) -> u32 {
        *self.irq.0.lock().unwrap()
    }
}

#[test]
fn blk_negotiates_event_idx_and_honours_used_event_and_avail_event() {
    let mut d = blk(false);
    d.w(0x014, 0);
    assert_ne!(d.r(0x010) & (1 << 29), 0, "VIRTIO_RING_F_EVENT_IDX offered");
    // The driver wants an interrupt only once the used index passes 4.
    d.mem.write_obj(4u16, GuestAddress(USED_EVENT)).unwrap();
    let before = d.pulses();
    for n in 1..=5u16 {
        d.header(HDR, 0, u64::from(n));
        assert_eq!(
            d.submit(&[(HDR, 16, 0), (BUF, 512, F_WRITE), (ST, 1, F_WRITE)]),
            Some(513)
        );
        assert_eq!(d.byte(BUF), n as u8);
        // After each batch the device asks to be kicked for the next request.
        let avail_event: u16 = d.mem.read_obj(GuestAddress(AVAIL_EVENT)).unwrap();
        assert_eq!(avail_event, n);
        let expected = if n < 5 { before } else { before + 1 };
        assert_eq!(d.pulses(), expected, "interrupts after request {n}");
    }
}

#[test]
fn without_event_idx_every_batch_interrupts() {
    let mut d = Driver::new(Box::new(Block::new(
        Box::new(MemDisk {
            data: vec![7u8; 1 << 20],
            ro: false,
        }),
        "x",
        false,
    )))
    .init_with(QSIZE, !crate::VIRTIO_RING_F_EVENT_IDX);
    d.mem.write_obj(100u16, GuestAddress(USED_EVENT)).unwrap();
    let before = d.pulses();
    d.header(HDR, 0, 0);
    d.submit(&[(HDR, 16, 0), (BUF, 512, F_WRITE), (ST, 1, F_WRITE)]);
    assert_eq!(
        d.pulses(),
        before + 1,
        "used_event is ignored when not negotiated"
    );
    let avail_event: u16 = d.mem.read_obj(GuestAddress(AVAIL_EVENT)).unwrap();
    assert_eq!(avail_event, 0, "avail_event untouched when not negotiated");
}

#[test]
fn a_ring_of_requests_completes_in_one_batch_with_one_interrupt() {
    let mut d = blk(false);
    // used_event 0 with EVENT_IDX: interrupt as soon as anything is used.
    let before = d.pulses();
    for i in 0..4u64 {
        let hdr = HDR + i * 0x10;
        d.header(hdr, 0, 10 + i);
        d.post(
            (i * 3) as u16,
            &[
                (hdr, 16, 0),
                (BUF + i * 0x400, 1024, F_WRITE),
                (ST + i, 1, F_WRITE),
            ],
        );
    }
    d.mem.write_slice(&[0xff; 4], GuestAddress(ST)).unwrap();
    d.w(0x050, 0);
    assert_eq!(d.used_idx(), 4);
    assert_eq!(d.pulses(), before + 1, "one interrupt for the batch");
    for i in 0..4u64 {
        assert_eq!(d.byte(ST + i), 0);
        assert_eq!(d.byte(BUF + i * 0x400), 10 + i as u8);
        assert_eq!(d.byte(BUF + i * 0x400 + 600), 11 + i as u8);
        let elem = USED + 4 + i * 8;
        let head: u32 = d.mem.read_obj(GuestAddress(elem)).unwrap();
        let len: u32 = d.mem.read_obj(GuestAddress(elem + 4)).unwrap();
        assert_eq!((head, len), (i as u32 * 3, 1025));
    }
}

#[test]
fn header_data_and_status_may_share_descriptors() {
    let mut d = blk(false);
    // A write whose header and payload are one descriptor.
    d.header(HDR, 1, 5);
    d.mem
        .write_slice(&[0x5a; 1024], GuestAddress(HDR + 16))
        .unwrap();
    d.submit(&[(HDR, 16 + 1024, 0), (ST, 1, F_WRITE)]);
    assert_eq!(d.byte(ST), 0);
    // A read whose data and status byte are one descriptor.
    d.header(HDR, 0, 6);
    d.mem.write_obj(0xffu8, GuestAddress(BUF + 512)).unwrap();
    assert_eq!(
        d.submit(&[(HDR, 16, 0), (BUF, 256, F_WRITE), (BUF + 256, 257, F_WRITE)]),
        Some(513)
    );
    assert_eq!(d.byte(BUF + 512), 0, "status after the data");
    assert_eq!(d.byte(BUF), 0x5a);
    assert_eq!(d.byte(BUF + 511), 0x5a);
}

/// A disk whose reads wait until the test lets them go.
#[derive(Debug)]
struct GatedDisk {
    entered: std::sync::mpsc::SyncSender<()>,
    release: Arc<Mutex<std::sync::mpsc::Receiver<()>>>,
}

impl block::BlockBackend for GatedDisk {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&mut self, _: u64, b: &mut [u8]) -> Result<(), block::BlockError> {
        let _ = self.entered.send(());
        let _ = self.release.lock().unwrap().recv();
        b.fill(0x42);
        Ok(())
    }
    fn write_at(&mut self, _: u64, _: &[u8]) -> Result<(), block::BlockError> {
        Ok(())
    }
    fn flush(&mut self) -> Result<(), block::BlockError> {
        Ok(())
    }
    fn discard(&mut self, _: u64, _: u64) -> Result<(), block::BlockError> {
        Ok(())
    }
    fn write_zeroes(&mut self, _: u64, _: u64) -> Result<(), block::BlockError> {
        Ok(())
    }
    fn block_status(
        &mut self,
        _: u64,
        len: u64,
    ) -> Result<(block::BlockStatus, u64), block::BlockError> {
        Ok((block::BlockStatus::Data, len))
    }
}

/// A blk device on a disk that holds each request until told, with its I/O thread
/// running, and a write request posted and notified that has reached the disk.
struct Gated {
    d: Driver,
    release: std::sync::mpsc::Sender<()>,
    exit: Arc<devices::ExitSignal>,
    thread: std::thread::JoinHandle<()>,
}

fn gated_write(name: &str) -> Gated {
    let (entered_tx, entered) = std::sync::mpsc::sync_channel(4);
    let (release, release_rx) = std::sync::mpsc::channel();
    let disk = GatedDisk {
        entered: entered_tx,
        release: Arc::new(Mutex::new(release_rx)),
    };
    let mut d = Driver::new(Box::new(Block::new(Box::new(disk), "gated", false))).init(QSIZE);
    let io = d.t.io_thread(name, None).unwrap();
    let exit = Arc::new(devices::ExitSignal::new());
    let thread = io
        .spawn(exit.clone(), Arc::new(crate::mmio::IoGate::default()))
        .unwrap();
    d.header(HDR, 0, 0);
    d.post(0, &[(HDR, 16, 0), (BUF, 512, F_WRITE), (ST, 1, F_WRITE)]);
    d.w(0x050, 0);
    entered
        .recv_timeout(std::time::Duration::from_secs(5))
        .expect("the request reached the disk");
    Gated {
        d,
        release,
        exit,
        thread,
    }
}

#[test]
fn registers_stay_served_while_a_request_waits_on_the_disk() {
    let Gated {
        mut d,
        release,
        exit,
        thread,
    } = gated_write("blk-gated");
    // The disk is busy; the registers that take the device lock still answer.
    assert_eq!(d.r(0x070) & status::DRIVER_OK, status::DRIVER_OK);
    let mut cap = [0u8; 8];
    d.t.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);
    assert_eq!(d.used_idx(), 0);
    release.send(()).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while d.used_idx() != 1 {
        assert!(std::time::Instant::now() < deadline, "never completed");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(d.byte(BUF), 0x42);
    assert_eq!(d.byte(ST), 0);
    exit.request(devices::ExitReason::Quit);
    thread.join().unwrap();
}

#[test]
fn a_reset_waits_for_the_request_on_the_disk() {
    let Gated {
        mut d,
        release,
        exit,
        thread,
    } = gated_write("blk-reset");
    // Let the disk finish a while after the reset starts: the reset must not return
    // before the request is done with guest memory.
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(200));
        release.send(()).unwrap();
    });
    let t0 = std::time::Instant::now();
    d.w(0x070, 0);
    assert!(
        t0.elapsed() >= std::time::Duration::from_millis(150),
        "reset returned while the request was still writing guest memory"
    );
    assert_eq!(d.status(), 0);
    // The request finished, and was published, before the reset took effect.
    assert_eq!(d.byte(BUF), 0x42);
    assert_eq!(d.used_idx(), 1);
    releaser.join().unwrap();
    exit.request(devices::ExitReason::Quit);
    thread.join().unwrap();
}

#[test]
fn an_avail_index_past_the_ring_does_not_spin_the_device() {
    let mut d = blk(false);
    d.mem.write_obj(1000u16, GuestAddress(AVAIL + 2)).unwrap();
    // Returns (virtio-queue refuses the index); the device takes nothing.
    d.w(0x050, 0);
    assert_eq!(d.used_idx(), 0);
}

/// Where the split ring's event fields sit for queue `q` of a `Driver`.
fn used_event_of(q: u64) -> GuestAddress {
    GuestAddress(USED_EVENT + q * 0x4000)
}
fn avail_event_of(q: u64) -> GuestAddress {
    GuestAddress(AVAIL_EVENT + q * 0x4000)
}

#[test]
fn a_mergeable_frame_over_three_buffers_interrupts_when_used_event_is_its_first() {
    // add_used_batch publishes the three buffers with one index update; the interrupt
    // test must count all three (virtio-queue's own counted only the last one, so a
    // used_event at the batch's first entry never interrupted).
    use crate::net::hdr;
    let (mut d, fake) = net(u64::MAX);
    d.w(0x014, 0);
    assert_ne!(d.r(0x010) & (1 << 29), 0, "VIRTIO_RING_F_EVENT_IDX offered");
    d.mem.write_obj(0u16, used_event_of(0)).unwrap();
    let frame = net_frame(hdr::F_NEEDS_CSUM, hdr::GSO_TCPV4, 5000);
    fake.0.lock().unwrap().to_guest.push_back(frame);
    d.post_buffers(
        0,
        0,
        &[
            (BUF, 2048, F_WRITE),
            (BUF + 0x1000, 2048, F_WRITE),
            (BUF + 0x2000, 2048, F_WRITE),
        ],
    );
    let before = d.pulses();
    d.w(0x050, 0);
    assert_eq!(d.used_since(0, 0).len(), 3);
    assert_eq!(d.pulses(), before + 1, "used_event 0 lies within the batch");
    // A used_event past the next batch: no interrupt for it.
    d.mem.write_obj(9u16, used_event_of(0)).unwrap();
    fake.0
        .lock()
        .unwrap()
        .to_guest
        .push_back(net_frame(0, hdr::GSO_NONE, 100));
    d.post_buffers(0, 3, &[(BUF + 0x3000, 2048, F_WRITE)]);
    d.w(0x050, 0);
    assert_eq!(d.used_since(0, 3).len(), 1);
    assert_eq!(d.pulses(), before + 1);
}

#[test]
fn net_tx_sends_a_ring_of_frames_per_kick_with_one_interrupt() {
    use crate::net::hdr;
    let (mut d, fake) = net(u64::MAX);
    let frame = net_frame(0, hdr::GSO_NONE, 200);
    for i in 0..6u64 {
        d.mem
            .write_slice(&frame, GuestAddress(BUF + i * 0x400))
            .unwrap();
    }
    let bufs: Vec<_> = (0..6u64)
        .map(|i| (BUF + i * 0x400, frame.len() as u32, 0))
        .collect();
    d.post_buffers(1, 0, &bufs);
    let before = d.pulses();
    d.w(0x050, 1);
    assert_eq!(fake.0.lock().unwrap().from_guest.len(), 6);
    assert_eq!(d.used_since(1, 0).len(), 6);
    assert_eq!(d.pulses(), before + 1, "one interrupt for the six frames");
    let avail_event: u16 = d.mem.read_obj(avail_event_of(1)).unwrap();
    assert_eq!(avail_event, 6, "kick me for the seventh");
}

#[test]
fn a_starved_receive_queue_asks_for_a_kick_at_the_drivers_next_buffer() {
    use crate::net::hdr;
    let (mut d, fake) = net(u64::MAX);
    fake.0
        .lock()
        .unwrap()
        .to_guest
        .push_back(net_frame(hdr::F_NEEDS_CSUM, hdr::GSO_TCPV4, 5000));
    d.post_buffers(0, 0, &[(BUF, 2048, F_WRITE), (BUF + 0x1000, 2048, F_WRITE)]);
    d.w(0x050, 0);
    assert!(d.used_since(0, 0).is_empty(), "the frame waits");
    // The driver's next buffer moves its avail index from 2 to 3: the device must have
    // asked for a kick at 2, not at its own next_avail (0), which the driver never
    // crosses again (it would not kick, and the frame would wait forever).
    let avail_event: u16 = d.mem.read_obj(avail_event_of(0)).unwrap();
    assert_eq!(avail_event, 2);
    d.post_buffers(0, 2, &[(BUF + 0x2000, 2048, F_WRITE)]);
    d.w(0x050, 0);
    assert_eq!(d.used_since(0, 0).len(), 3);
}

#[test]
fn doorbells_and_interrupts_can_be_eventfds() {
    // What the VMM wires to the accelerator: the queue's notifier (an ioevent at the
    // doorbell) wakes the I/O thread; the completion writes the irqfd, not the chip.
    let mut d = blk(false);
    let irqfd = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    assert!(d.t.use_irqfd(irqfd.try_clone().unwrap()));
    let io = d.t.io_thread("blk-eventfds", None).unwrap();
    let doorbell: Vec<_> = io
        .queue_notifiers()
        .map(|(q, fd)| (q, fd.try_clone().unwrap()))
        .collect();
    assert_eq!(doorbell.len(), 1);
    let exit = Arc::new(devices::ExitSignal::new());
    let thread = io
        .spawn(exit.clone(), Arc::new(crate::mmio::IoGate::default()))
        .unwrap();
    d.header(HDR, 0, 3);
    d.post(0, &[(HDR, 16, 0), (BUF, 512, F_WRITE), (ST, 1, F_WRITE)]);
    let pulses = d.pulses();
    doorbell[0].1.write(1).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while d.used_idx() != 1 {
        assert!(std::time::Instant::now() < deadline, "never completed");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(d.byte(BUF), 3);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while irqfd.read().is_err() {
        assert!(std::time::Instant::now() < deadline, "no irqfd write");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(d.pulses(), pulses, "the chip is not called directly");
    assert_ne!(d.r(0x060) & INT_USED_RING, 0);
    // The thread ends on the exit signal alone: it waits on no timeout.
    exit.request(devices::ExitReason::Quit);
    thread.join().unwrap();
}

#[test]
fn refilling_a_receive_queue_that_is_not_starved_asks_for_no_notify() {
    use crate::net::hdr;
    let (mut d, fake) = net(u64::MAX);
    d.post_buffers(
        0,
        0,
        &[
            (BUF, 2048, F_WRITE),
            (BUF + 0x1000, 2048, F_WRITE),
            (BUF + 0x2000, 2048, F_WRITE),
            (BUF + 0x3000, 2048, F_WRITE),
        ],
    );
    d.w(0x050, 0);
    fake.0
        .lock()
        .unwrap()
        .to_guest
        .push_back(net_frame(0, hdr::GSO_NONE, 100));
    // As the TAP turning readable would.
    d.t.process_queue(0);
    assert_eq!(d.used_since(0, 0).len(), 1);
    // The driver refills from avail index 4 to 5: it kicks only if avail_event is in
    // [4, 5) (vring_need_event). The device needs no kick while it has buffers.
    let avail_event: u16 = d.mem.read_obj(avail_event_of(0)).unwrap();
    let (old, new) = (4u16, 5u16);
    let kick = new.wrapping_sub(avail_event).wrapping_sub(1) < new.wrapping_sub(old);
    assert!(!kick, "avail_event {avail_event} asks for a kick on refill");
    // Once a frame finds too few buffers, the next refill kicks again.
    fake.0
        .lock()
        .unwrap()
        .to_guest
        .push_back(net_frame(hdr::F_NEEDS_CSUM, hdr::GSO_TCPV4, 9000));
    d.t.process_queue(0);
    assert_eq!(d.used_since(0, 0).len(), 1, "the big frame waits");
    let avail_event: u16 = d.mem.read_obj(avail_event_of(0)).unwrap();
    assert_eq!(avail_event, 4);
}

/// Sends frames of `payload` bytes on a transmit queue moderated by `delay`, one notify
/// each right after the previous one was served; returns how long each took to leave.
fn moderated_sends(payload: usize, delay: std::time::Duration) -> Vec<std::time::Duration> {
    use crate::net::hdr;
    let (mut d, fake) = net(u64::MAX);
    let mut io = d.t.io_thread("net-coalesce", None).unwrap();
    io.coalesce(crate::net::TX_QUEUE, delay);
    let exit = Arc::new(devices::ExitSignal::new());
    let thread = io
        .spawn(exit.clone(), Arc::new(crate::mmio::IoGate::default()))
        .unwrap();
    let frame = net_frame(hdr::F_NEEDS_CSUM, hdr::GSO_NONE, payload);
    d.mem.write_slice(&frame, GuestAddress(BUF)).unwrap();
    let mut took = Vec::new();
    for i in 0..3u16 {
        d.post_buffers(1, i, &[(BUF, frame.len() as u32, 0)]);
        let t0 = std::time::Instant::now();
        d.w(0x050, 1);
        while fake.0.lock().unwrap().from_guest.len() < usize::from(i) + 1 {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(5),
                "never sent"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        took.push(t0.elapsed());
    }
    exit.request(devices::ExitReason::Quit);
    thread.join().unwrap();
    took
}

#[test]
fn a_moderated_transmit_queue_holds_back_bulk_but_never_small_frames() {
    let delay = std::time::Duration::from_millis(300);
    // Bulk: the first notify after a quiet spell is served at once, the next ones wait.
    let bulk = moderated_sends(1448, delay);
    assert!(bulk[0] < delay / 2, "the first frame waited: {bulk:?}");
    assert!(
        bulk[1] >= delay / 2 && bulk[2] >= delay / 2,
        "back-to-back bulk frames were not moderated: {bulk:?}"
    );
    // Request/response: small frames back to back all leave at once.
    let small = moderated_sends(64, delay);
    assert!(
        small.iter().all(|t| *t < delay / 2),
        "a small frame waited for the moderation: {small:?}"
    );
}

/// A blk driver whose disk is limited to one request per 100 ms.
fn limited_blk() -> Driver {
    let data = vec![7u8; 1 << 20];
    let limiter = crate::rate_limiter::RateLimiter::new(
        None,
        crate::rate_limiter::TokenBucket::new(1, 0, 100),
    );
    Driver::new(Box::new(
        Block::new(Box::new(MemDisk { data, ro: false }), "limited", false)
            .with_rate_limiter(limiter),
    ))
    .init(QSIZE)
}

#[test]
fn blk_rate_limiter_leaves_requests_on_the_ring_until_it_has_tokens() {
    let mut d = limited_blk();
    let read = [(HDR, 16, 0), (BUF, 512, F_WRITE), (ST, 1, F_WRITE)];
    d.header(HDR, 0, 0);
    assert_eq!(d.submit(&read), Some(513), "the first request has a token");
    // The second waits on the ring: no used entry, and the device is not broken.
    d.mem.write_obj(0xffu8, GuestAddress(ST)).unwrap();
    assert_eq!(d.submit(&read), None);
    assert_eq!(d.byte(ST), 0xff);
    assert_eq!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    let core = d.t.core();
    let o = core.process_queue(0).expect("the device runs");
    let wait = o.throttled.expect("still throttled");
    assert!(wait <= std::time::Duration::from_millis(100), "{wait:?}");
    // Once the bucket refilled, the same request is served without a new notify.
    std::thread::sleep(wait + std::time::Duration::from_millis(5));
    let o = core.process_queue(0).expect("the device runs");
    assert!(o.used && o.throttled.is_none(), "{o:?}");
    assert_eq!(d.byte(ST), 0);
    let used: u16 = d.mem.read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(used, 2);
}

#[test]
fn blk_backing_file_swap_changes_data_and_capacity_and_tells_the_driver() {
    let block = Block::new(
        Box::new(MemDisk {
            data: vec![1u8; 1 << 20],
            ro: false,
        }),
        "swap",
        false,
    );
    let handle = block.handle();
    let mut d = Driver::new(Box::new(block)).init(QSIZE);
    let generation = d.r(0x0fc);
    let bytes = handle.replace_backend(Box::new(MemDisk {
        data: vec![2u8; 2 << 20],
        ro: false,
    }));
    assert_eq!(bytes, 2 << 20);
    d.t.core().config_changed();
    assert_ne!(d.r(0x0fc), generation, "a new configuration generation");
    assert_eq!(d.r(0x060) & INT_CONFIG_CHANGE, INT_CONFIG_CHANGE);
    let mut cap = [0u8; 8];
    d.t.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 4096);
    // Reads come from the new file, including past the old end.
    d.header(HDR, 0, 3000);
    let used = d.submit(&[(HDR, 16, 0), (BUF, 512, F_WRITE), (ST, 1, F_WRITE)]);
    assert_eq!(used, Some(513));
    assert_eq!((d.byte(ST), d.byte(BUF)), (0, 2));
}

#[test]
fn an_io_thread_serves_throttled_requests_when_the_limiter_refills() {
    let mut d = limited_blk();
    let io = d.t.io_thread("blk-limited", None).unwrap();
    let exit = Arc::new(devices::ExitSignal::new());
    let thread = io
        .spawn(exit.clone(), Arc::new(crate::mmio::IoGate::default()))
        .unwrap();
    let used_idx = |d: &Driver| -> u16 { d.mem.read_obj(GuestAddress(USED + 2)).unwrap() };
    let start = std::time::Instant::now();
    for round in 0..3u16 {
        d.header(HDR, 0, u64::from(round));
        d.submit(&[(HDR, 16, 0), (BUF, 512, F_WRITE), (ST, 1, F_WRITE)]);
        // One notify only: a throttled request is served by the thread's timer.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while used_idx(&d) != round + 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "request {round} never served"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    // One operation per 100 ms: the first passes at once, the next two wait a refill each.
    let took = start.elapsed();
    assert!(took >= std::time::Duration::from_millis(190), "{took:?}");
    exit.request(devices::ExitReason::Quit);
    thread.join().unwrap();
}

#[test]
fn net_rate_limiters_hold_tx_frames_on_the_ring_and_rx_frames_in_the_device() {
    use crate::net::hdr;
    use crate::rate_limiter::{RateLimiter, TokenBucket};
    let fake = FakeNet::default();
    // Two frames per 100 ms each way.
    let dev = crate::net::Net::with_backend(Box::new(fake.clone()), [0x52, 0x54, 0, 0, 0, 1])
        .with_rate_limiters(
            RateLimiter::new(None, TokenBucket::new(2, 0, 100)),
            RateLimiter::new(None, TokenBucket::new(2, 0, 100)),
        );
    let limiters = dev.limiters();
    let mut d = Driver::new(Box::new(dev)).init(QSIZE);
    let frame = net_frame(0, hdr::GSO_NONE, 200);
    for i in 0..5u64 {
        d.mem
            .write_slice(&frame, GuestAddress(BUF + i * 0x400))
            .unwrap();
    }
    let bufs: Vec<_> = (0..5u64)
        .map(|i| (BUF + i * 0x400, frame.len() as u32, 0))
        .collect();
    d.post_buffers(1, 0, &bufs);
    d.w(0x050, 1);
    assert_eq!(
        fake.0.lock().unwrap().from_guest.len(),
        2,
        "two tokens, two frames"
    );
    assert_eq!(d.used_since(1, 0).len(), 2);
    let o = d.t.core().process_queue(1).unwrap();
    assert!(o.throttled.is_some(), "{o:?}");
    // Lifting the limit (a PATCH) lets the rest go at the next run.
    limiters.tx.lock().unwrap().update(
        crate::rate_limiter::BucketUpdate::Keep,
        crate::rate_limiter::BucketUpdate::Disable,
    );
    let o = d.t.core().process_queue(1).unwrap();
    assert!(o.throttled.is_none());
    assert_eq!(fake.0.lock().unwrap().from_guest.len(), 5);

    // Receive: the third frame waits in the device, not dropped.
    for _ in 0..3 {
        fake.0
            .lock()
            .unwrap()
            .to_guest
            .push_back(net_frame(0, hdr::GSO_NONE, 100));
    }
    let rx: Vec<_> = (0..3u64)
        .map(|i| (DATA + 0x4000 + i * 0x800, 2048, F_WRITE))
        .collect();
    d.post_buffers(0, 0, &rx);
    let o = d.t.core().process_queue(0).unwrap();
    assert_eq!(d.used_since(0, 0).len(), 2);
    let wait = o.throttled.expect("held by the limiter");
    std::thread::sleep(wait + std::time::Duration::from_millis(5));
    d.t.core().process_queue(0).unwrap();
    assert_eq!(
        d.used_since(0, 0).len(),
        3,
        "the held frame is delivered, not lost"
    );
    assert!(fake.0.lock().unwrap().to_guest.is_empty());
}

#[test]
fn a_limited_rng_leaves_requests_until_its_bucket_refills() {
    let limiter = crate::rate_limiter::RateLimiter::new(
        crate::rate_limiter::TokenBucket::new(64, 0, 100),
        None,
    );
    let mut d = Driver::new(Box::new(crate::rng::LimitedRng { limiter })).init(QSIZE);
    assert_eq!(d.submit(&[(BUF, 64, F_WRITE)]), Some(64));
    assert_eq!(
        d.submit(&[(BUF, 64, F_WRITE)]),
        None,
        "no bytes left in the bucket"
    );
    let o = d.t.core().process_queue(0).unwrap();
    let wait = o.throttled.expect("throttled");
    std::thread::sleep(wait + std::time::Duration::from_millis(5));
    let o = d.t.core().process_queue(0).unwrap();
    assert!(o.used);
}

#[test]
fn net_advertises_an_mtu_only_when_given_one() {
    use crate::net::features::MTU;
    let fake = FakeNet::default();
    let plain = crate::net::Net::with_backend(Box::new(fake.clone()), [0x52, 0x54, 0, 0, 0, 1]);
    let mut d = Driver::new(Box::new(plain));
    d.w(0x014, 0);
    assert_eq!(u64::from(d.r(0x010)) & MTU, 0);
    let with = crate::net::Net::with_backend(Box::new(fake), [0x52, 0x54, 0, 0, 0, 1])
        .with_mtu(Some(9000));
    let mut d = Driver::new(Box::new(with)).init(QSIZE);
    d.w(0x014, 0);
    assert_ne!(u64::from(d.r(0x010)) & MTU, 0);
    // virtio_net_config: the MAC, then status and max_virtqueue_pairs, then the MTU.
    let mut mtu = [0u8; 2];
    d.t.read(0x100 + 10, &mut mtu);
    assert_eq!(u16::from_le_bytes(mtu), 9000);
    let mut mac = [0u8; 6];
    d.t.read(0x100, &mut mac);
    assert_eq!(mac, [0x52, 0x54, 0, 0, 0, 1]);
}

#[test]
fn a_snapshot_restores_queues_into_a_new_transport_on_the_same_memory() {
    let mut d = blk(false);
    d.header(HDR, 0, 3);
    assert_eq!(
        d.submit(&[(HDR, 16, 0), (BUF, 512, F_WRITE), (ST, 1, F_WRITE)]),
        Some(513)
    );
    let snap = d.t.snapshot();
    let json = serde_json::to_string(&snap).unwrap();
    let snap: crate::mmio::MmioSnapshot = serde_json::from_str(&json).unwrap();
    assert_eq!(snap.core.queues[0].next_used, 1);
    assert!(snap.core.status & status::DRIVER_OK != 0);

    // The "restored VMM": the same guest memory, a device built from the config again.
    let irq = Arc::new(Pulses::default());
    let data = (0..1 << 20).map(|i| (i / 512) as u8).collect();
    let dev = Block::new(
        Box::new(MemDisk { data, ro: false }),
        "disk-serial-1",
        false,
    );
    let mut t = MmioTransport::new(Box::new(dev), d.mem.clone(), irq.clone(), 5);
    t.restore(&snap).unwrap();
    assert_eq!(t.snapshot(), snap);
    let mut d2 = Driver {
        t,
        mem: d.mem.clone(),
        irq,
        avail_idx: d.avail_idx,
    };
    assert_eq!(d2.status(), snap.core.status);
    // The next request goes on from the ring indices the snapshot kept.
    d2.header(HDR, 0, 7);
    assert_eq!(
        d2.submit(&[(HDR, 16, 0), (BUF, 512, F_WRITE), (ST, 1, F_WRITE)]),
        Some(513)
    );
    assert_eq!(d2.byte(BUF), 7);
    let used_idx: u16 = d2.mem.read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(used_idx, 2);

    // Refusals leave the transport as it was.
    let mut rng = Driver::new(Box::new(Rng)).init(QSIZE);
    let before = rng.t.snapshot();
    assert!(matches!(
        rng.t.restore(&snap),
        Err(crate::transport::RestoreError::DeviceType { .. })
    ));
    let mut bad = before.clone();
    bad.core.queues[0].size = 15;
    assert!(matches!(
        rng.t.restore(&bad),
        Err(crate::transport::RestoreError::Queue { .. })
    ));
    let mut bad = before.clone();
    bad.core.driver_features |= 1 << 60;
    assert!(matches!(
        rng.t.restore(&bad),
        Err(crate::transport::RestoreError::Features { .. })
    ));
    assert_eq!(rng.t.snapshot(), before);
}

#[test]
fn a_disk_at_queue_depth_one_is_interrupted_at_once_on_a_moderating_chip() {
    let disk = MemDisk {
        data: vec![3u8; 1 << 20],
        ro: false,
    };
    let mut d = Driver::with_chip(
        Box::new(Block::new(Box::new(disk), "m", false)),
        Pulses::moderating(),
    )
    .init(QSIZE);
    // One request at a time, the driver re-arming used_event at the used index after
    // each, as Linux does: each completion interrupts at once (one in 32 is a probe,
    // held until the guest halts).
    let mut now = 0;
    for n in 0..40u16 {
        d.mem.write_obj(n, GuestAddress(USED_EVENT)).unwrap();
        d.header(HDR, 0, u64::from(n));
        let before = d.pulses();
        assert_eq!(
            d.submit(&[(HDR, 16, 0), (BUF, 512, F_WRITE), (ST, 1, F_WRITE)]),
            Some(513)
        );
        now += d.pulses() - before;
    }
    let (held, _) = d.irq.held();
    assert_eq!((now, held), (39, 1));
    // The used ring bit is set for a held interrupt as for any other.
    assert_ne!(d.r(0x060) & INT_USED_RING, 0);
}

#[test]
fn a_disk_at_queue_depth_four_shares_one_interrupt_on_a_moderating_chip() {
    let disk = MemDisk {
        data: vec![3u8; 1 << 20],
        ro: false,
    };
    let mut d = Driver::with_chip(
        Box::new(Block::new(Box::new(disk), "m", false)),
        Pulses::moderating(),
    )
    .init(QSIZE);
    let mut used_event = 0u16;
    let submit = |d: &mut Driver, n: u16| {
        d.header(HDR, 0, u64::from(n % 64));
        d.submit(&[(HDR, 16, 0), (BUF, 512, F_WRITE), (ST, 1, F_WRITE)])
            .unwrap();
    };
    // Until the probe: one at a time.
    let mut n = 0;
    while d.irq.held().0 == 0 {
        d.mem
            .write_obj(used_event, GuestAddress(USED_EVENT))
            .unwrap();
        submit(&mut d, n);
        n += 1;
        used_event = d.used_idx();
    }
    // The probe's interrupt is held while three more requests complete; then the
    // guest halts and takes up all four.
    for _ in 0..3 {
        submit(&mut d, n);
        n += 1;
    }
    let pulses = d.pulses();
    // From now on four completions share one interrupt, released with the fourth.
    for round in 0..5 {
        used_event = d.used_idx();
        d.mem
            .write_obj(used_event, GuestAddress(USED_EVENT))
            .unwrap();
        for i in 0..4 {
            submit(&mut d, n);
            n += 1;
            let (held, released) = d.irq.held();
            assert_eq!(held, 2 + round, "round {round} request {i}");
            assert_eq!(released, if i == 3 { 1 + round } else { round });
        }
    }
    assert_eq!(d.pulses(), pulses, "no interrupt sent at once meanwhile");
}

/// A disk whose first `cached` bytes are in the "page cache": reads there can be served
/// without waiting ([`block::BlockBackend::try_read_vectored_at`]).
#[derive(Debug)]
struct CachedDisk {
    disk: MemDisk,
    cached: u64,
}

impl block::BlockBackend for CachedDisk {
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&mut self, o: u64, b: &mut [u8]) -> Result<(), block::BlockError> {
        self.disk.read_at(o, b)
    }
    fn write_at(&mut self, o: u64, b: &[u8]) -> Result<(), block::BlockError> {
        self.disk.write_at(o, b)
    }
    fn try_read_vectored_at(&mut self, o: u64, bufs: &mut [std::io::IoSliceMut<'_>]) -> bool {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        o + len <= self.cached && self.disk.read_vectored_at(o, bufs).is_ok()
    }
    fn flush(&mut self) -> Result<(), block::BlockError> {
        Ok(())
    }
    fn discard(&mut self, o: u64, l: u64) -> Result<(), block::BlockError> {
        self.disk.discard(o, l)
    }
    fn write_zeroes(&mut self, o: u64, l: u64) -> Result<(), block::BlockError> {
        self.disk.write_zeroes(o, l)
    }
    fn block_status(
        &mut self,
        o: u64,
        len: u64,
    ) -> Result<(block::BlockStatus, u64), block::BlockError> {
        self.disk.block_status(o, len)
    }
}

#[test]
fn a_notify_serves_cached_reads_on_the_vcpu_and_leaves_the_rest_to_the_io_thread() {
    let mut data = vec![0u8; 1 << 20];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i / 512) as u8;
    }
    let disk = CachedDisk {
        disk: MemDisk { data, ro: false },
        cached: 64 << 10,
    };
    let mut d = Driver::new(Box::new(Block::new(Box::new(disk), "c", false))).init(QSIZE);
    // Inline serving needs an I/O thread for what it leaves (not started here: its
    // rounds are run by hand below).
    assert!(!d.t.serve_inline(), "no I/O thread yet");
    let _io = d.t.io_thread("blk-inline", None).unwrap();
    assert!(d.t.serve_inline());
    // A read of cached sectors completes within the notify.
    d.header(HDR, 0, 3);
    d.post(0, &[(HDR, 16, 0), (BUF, 512, F_WRITE), (ST, 1, F_WRITE)]);
    d.w(0x050, 0);
    assert_eq!(d.used_idx(), 1);
    assert_eq!((d.byte(ST), d.byte(BUF)), (0, 3));
    // Then one past the cache, a cached one behind it, and a write: the first already
    // would wait, so all three are left for the I/O thread, in order.
    for (i, (kind, sector)) in [(0u32, 200u64), (0, 5), (1, 7)].into_iter().enumerate() {
        let i = i as u64 + 1;
        let hdr = HDR + i * 0x10;
        d.header(hdr, kind, sector);
        let flags = if kind == 0 { F_WRITE } else { 0 };
        d.mem.write_obj(0xffu8, GuestAddress(ST + i)).unwrap();
        d.post(
            (i * 3) as u16,
            &[
                (hdr, 16, 0),
                (BUF + i * 0x400, 512, flags),
                (ST + i, 1, F_WRITE),
            ],
        );
    }
    d.w(0x050, 0);
    assert_eq!(d.used_idx(), 1, "served on the notifying thread");
    assert_eq!(d.byte(ST + 1), 0xff);
    // The I/O thread's round finishes them.
    d.t.core().process_queue(0);
    assert_eq!(d.used_idx(), 4);
    for i in 1..=3 {
        assert_eq!(d.byte(ST + i), 0, "request {i}");
    }
    assert_eq!(d.byte(BUF + 0x400), 200);
    assert_eq!(d.byte(BUF + 0x800), 5);
    // Left work dies with a reset: a late I/O thread round serves nothing.
    d.header(HDR, 0, 300);
    d.post(9, &[(HDR, 16, 0), (BUF, 512, F_WRITE), (ST, 1, F_WRITE)]);
    d.w(0x050, 0);
    assert_eq!(d.used_idx(), 4);
    d.w(0x070, 0);
    assert!(d.t.core().process_queue(0).is_none());
    assert_eq!(d.used_idx(), 4);
}

/// A disk whose writes are one positioned write ([`block::BlockBackend::writes_in_place`],
/// as raw images), each sleeping `sleep` first (a host that makes writes wait).
#[derive(Debug)]
struct InPlaceDisk {
    disk: MemDisk,
    sleep: Option<std::time::Duration>,
}

impl block::BlockBackend for InPlaceDisk {
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&mut self, o: u64, b: &mut [u8]) -> Result<(), block::BlockError> {
        self.disk.read_at(o, b)
    }
    fn write_at(&mut self, o: u64, b: &[u8]) -> Result<(), block::BlockError> {
        if let Some(d) = self.sleep {
            std::thread::sleep(d);
        }
        self.disk.write_at(o, b)
    }
    fn writes_in_place(&self) -> bool {
        true
    }
    fn flush(&mut self) -> Result<(), block::BlockError> {
        Ok(())
    }
    fn discard(&mut self, o: u64, l: u64) -> Result<(), block::BlockError> {
        self.disk.discard(o, l)
    }
    fn write_zeroes(&mut self, o: u64, l: u64) -> Result<(), block::BlockError> {
        self.disk.write_zeroes(o, l)
    }
    fn block_status(
        &mut self,
        o: u64,
        len: u64,
    ) -> Result<(block::BlockStatus, u64), block::BlockError> {
        self.disk.block_status(o, len)
    }
}

/// A driver of `disk` whose notifies serve on the notifying thread what they can, with
/// an I/O thread made (not started: the tests run its rounds by hand).
fn inline_blk(disk: Box<dyn block::BlockBackend>) -> (Driver, crate::transport::IoThread) {
    let mut d = Driver::new(Box::new(Block::new(disk, "w", false))).init(QSIZE);
    let io = d.t.io_thread("blk-inline", None).unwrap();
    assert!(d.t.serve_inline());
    (d, io)
}

/// A disk written in place that serves small writes within the notify, on a chip that
/// moderates (the emu's).
fn moderated_inline_blk() -> (Driver, crate::transport::IoThread) {
    let disk = InPlaceDisk {
        disk: MemDisk {
            data: vec![0; 1 << 20],
            ro: false,
        },
        sleep: None,
    };
    let mut d = Driver::with_chip(
        Box::new(Block::new(Box::new(disk), "w", false)),
        Pulses::moderating(),
    )
    .init(QSIZE);
    let io = d.t.io_thread("blk-inline", None).unwrap();
    assert!(d.t.serve_inline());
    (d, io)
}

/// Posts a write of `len` bytes of `fill` at `sector` (status at `ST`) and notifies.
fn notify_write(d: &mut Driver, head: u16, sector: u64, len: u32, fill: u8) {
    d.header(HDR, 1, sector);
    d.mem
        .write_slice(&vec![fill; len as usize], GuestAddress(WRITE_BUF))
        .unwrap();
    d.mem.write_obj(0xffu8, GuestAddress(ST)).unwrap();
    d.post(head, &[(HDR, 16, 0), (WRITE_BUF, len, 0), (ST, 1, F_WRITE)]);
    d.w(0x050, 0);
}

/// Room for a write larger than [`crate::blk`]'s inline limit, clear of `HDR` and `ST`.
const WRITE_BUF: u64 = 0x40000;

#[test]
fn small_writes_to_an_image_written_in_place_complete_within_the_notify() {
    let disk = InPlaceDisk {
        disk: MemDisk {
            data: vec![0; 1 << 20],
            ro: false,
        },
        sleep: None,
    };
    let (mut d, _io) = inline_blk(Box::new(disk));
    notify_write(&mut d, 0, 8, 4096, 0x5a);
    assert_eq!(d.used_idx(), 1, "served on the notifying thread");
    assert_eq!(d.byte(ST), 0);
    // Read back through the device (this disk has no cache to read from on the vCPU):
    // the bytes reached the disk.
    d.header(HDR, 0, 8);
    d.post(3, &[(HDR, 16, 0), (BUF, 512, F_WRITE), (ST, 1, F_WRITE)]);
    d.w(0x050, 0);
    d.t.core().process_queue(0);
    assert_eq!((d.used_idx(), d.byte(BUF)), (2, 0x5a));
    // A large write waits for the I/O thread (it overlaps the guest's work there).
    notify_write(&mut d, 0, 16, 68 << 10, 0x77);
    assert_eq!(d.used_idx(), 2, "left to the I/O thread");
    d.t.core().process_queue(0);
    assert_eq!((d.used_idx(), d.byte(ST)), (3, 0));
}

#[test]
fn a_write_served_within_the_notify_interrupts_when_a_vcpu_halts() {
    let (mut d, _io) = moderated_inline_blk();
    // Linux issues a plugged write from a worker while the writer sleeps: its
    // completion waits for a vCPU to halt rather than land while the worker runs.
    d.mem.write_obj(0u16, GuestAddress(USED_EVENT)).unwrap();
    let pulses = d.pulses();
    notify_write(&mut d, 0, 8, 4096, 0x5a);
    assert_eq!(
        (d.used_idx(), d.byte(ST)),
        (1, 0),
        "served within the notify"
    );
    assert_eq!((d.irq.at_halt(), d.pulses()), (1, pulses));
    assert_ne!(d.r(0x060) & INT_USED_RING, 0);
    // One the I/O thread completes goes at once.
    d.mem.write_obj(1u16, GuestAddress(USED_EVENT)).unwrap();
    notify_write(&mut d, 3, 16, 68 << 10, 0x77);
    d.t.core().process_queue(0);
    assert_eq!((d.used_idx(), d.byte(ST)), (2, 0));
    assert_eq!((d.irq.at_halt(), d.pulses()), (1, pulses + 1));
}

#[test]
fn a_probe_of_a_write_served_within_the_notify_also_waits_for_a_halt() {
    let (mut d, _io) = moderated_inline_blk();
    // One request at a time, each waited for: every completion asks for an interrupt,
    // and one in PROBE_EVERY is a probe that the queue holds. A write's probe waits for
    // its vCPU's halt as the others do: held only while every vCPU ran, it went out at
    // once when another vCPU idled, into the guest's kernel thread that issued it.
    let writes = 2 * u32::from(PROBE_EVERY) + 3;
    for i in 0..writes {
        d.mem
            .write_obj(d.used_idx(), GuestAddress(USED_EVENT))
            .unwrap();
        notify_write(&mut d, 0, 8 * u64::from(i), 4096, i as u8);
        assert_eq!(d.used_idx(), (i + 1) as u16, "served within the notify");
    }
    assert_eq!(d.irq.at_halt(), writes);
    assert_eq!(d.irq.held(), (0, 0));
    assert_eq!(d.pulses(), 0);
}

#[test]
fn writes_to_images_with_metadata_are_left_to_the_io_thread() {
    let disk = CachedDisk {
        disk: MemDisk {
            data: vec![0; 1 << 20],
            ro: false,
        },
        cached: 1 << 20,
    };
    let (mut d, _io) = inline_blk(Box::new(disk));
    notify_write(&mut d, 0, 8, 4096, 0x5a);
    assert_eq!(d.used_idx(), 0);
    d.t.core().process_queue(0);
    assert_eq!((d.used_idx(), d.byte(ST)), (1, 0));
}

#[test]
fn after_a_write_on_the_vcpu_slept_writes_go_to_the_io_thread() {
    let disk = InPlaceDisk {
        disk: MemDisk {
            data: vec![0; 1 << 20],
            ro: false,
        },
        sleep: Some(std::time::Duration::from_millis(2)),
    };
    let (mut d, _io) = inline_blk(Box::new(disk));
    // The first is served where it was notified, and sleeps there.
    notify_write(&mut d, 0, 8, 4096, 1);
    assert_eq!(d.used_idx(), 1);
    // So the next ones are not, for a while.
    notify_write(&mut d, 3, 16, 4096, 2);
    assert_eq!(d.used_idx(), 1, "left to the I/O thread");
    d.t.core().process_queue(0);
    assert_eq!((d.used_idx(), d.byte(ST)), (2, 0));
}

/// A net device whose notifies reach an I/O thread (not started here) and that serves on
/// the notifying thread what it can.
fn inline_net() -> (Driver, FakeNet, crate::transport::IoThread) {
    let (mut d, fake) = net(u64::MAX);
    let io = d.t.io_thread("net-inline", None).unwrap();
    assert!(d.t.serve_inline());
    (d, fake, io)
}

/// Posts `frame` at `addr` as transmit descriptor `head`, the queue's `head`th buffer,
/// and notifies the transmit queue.
fn notify_tx(d: &mut Driver, head: u16, addr: u64, frame: &[u8]) {
    d.mem.write_slice(frame, GuestAddress(addr)).unwrap();
    // The driver's avail index is one for both queues: this one's is `head`.
    d.avail_idx = head;
    d.post_buffers(1, head, &[(addr, frame.len() as u32, 0)]);
    d.w(0x050, 1);
}

#[test]
fn small_frames_leave_within_the_transmit_notify_and_streams_go_to_the_io_thread() {
    use crate::net::{hdr, RX_QUEUE, TX_QUEUE};
    let (mut d, fake, _io) = inline_net();
    assert!(d.t.serves_inline(TX_QUEUE as u32));
    assert!(
        !d.t.serves_inline(RX_QUEUE as u32),
        "a receive refill must reach the I/O thread, which stops polling a starved TAP"
    );
    let sent = |fake: &FakeNet| fake.0.lock().unwrap().from_guest.len();
    // A request/response frame leaves before the notify returns, and is completed.
    let small = net_frame(0, hdr::GSO_NONE, 64);
    notify_tx(&mut d, 0, BUF, &small);
    assert_eq!(sent(&fake), 1, "sent on the notifying thread");
    assert_eq!(d.used_since(1, 0), vec![(0, 0)]);
    // A receive notify is left to the I/O thread.
    fake.0
        .lock()
        .unwrap()
        .to_guest
        .push_back(net_frame(0, hdr::GSO_NONE, 100));
    d.avail_idx = 0;
    d.post_buffers(0, 0, &[(BUF + 0x10000, 2048, F_WRITE)]);
    d.w(0x050, 0);
    assert!(d.used_since(0, 0).is_empty());
    d.t.process_queue(0);
    assert_eq!(d.used_since(0, 0).len(), 1);
    // A bulk frame after a quiet spell leaves at once too; the guest then streams, and
    // its next notifies wait for the I/O thread, which coalesces them.
    let bulk = net_frame(hdr::F_NEEDS_CSUM, hdr::GSO_TCPV4, 4000);
    notify_tx(&mut d, 1, BUF + 0x2000, &bulk);
    assert_eq!(sent(&fake), 2);
    notify_tx(&mut d, 2, BUF, &small);
    assert_eq!(
        sent(&fake),
        2,
        "a streaming guest's notify was served inline"
    );
    d.t.core().process_queue(TX_QUEUE);
    assert_eq!(sent(&fake), 3);
    assert_eq!(fake.0.lock().unwrap().from_guest[2], small);
}

#[test]
fn while_the_host_streams_to_the_guest_its_acks_go_through_the_io_thread() {
    use crate::net::hdr;
    let (mut d, fake, _io) = inline_net();
    // A bulk frame from the host (a TSO segment of a stream to the guest).
    fake.0
        .lock()
        .unwrap()
        .to_guest
        .push_back(net_frame(hdr::F_NEEDS_CSUM, hdr::GSO_TCPV4, 3000));
    d.post_buffers(
        0,
        0,
        &[
            (BUF + 0x10000, 4096, F_WRITE),
            (BUF + 0x11000, 4096, F_WRITE),
        ],
    );
    d.t.process_queue(0);
    assert_eq!(d.used_since(0, 0).len(), 1);
    // The guest's ACK: its host-side cost (the host's TCP sending more) stays off the
    // vCPU, which the guest needs to take up the stream.
    notify_tx(&mut d, 0, BUF, &net_frame(0, hdr::GSO_NONE, 54));
    assert!(fake.0.lock().unwrap().from_guest.is_empty());
    d.t.core().process_queue(crate::net::TX_QUEUE);
    assert_eq!(fake.0.lock().unwrap().from_guest.len(), 1);
}

impl Driver {
    /// Continue queue `q`'s avail ring where the driver left it (the helpers keep one
    /// index for all queues).
    fn on_queue(&mut self, q: u64) -> &mut Self {
        self.avail_idx = self
            .mem
            .read_obj(GuestAddress(AVAIL + q * 0x4000 + 2))
            .unwrap();
        self
    }
}

/// Where the multi-queue tests keep their buffers: past the rings of five queues.
const MQ_BUF: u64 = 0x40000;

#[test]
fn a_disk_with_several_queues_offers_mq_and_serves_every_queue() {
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i / 512) as u8).collect();
    let dev = Block::new(Box::new(MemDisk { data, ro: false }), "mq", false).with_queues(3);
    let mut d = Driver::new(Box::new(dev)).init(QSIZE);
    d.w(0x014, 0);
    assert_ne!(d.r(0x010) & (1 << 12), 0, "VIRTIO_BLK_F_MQ offered");
    let mut n = [0u8; 2];
    d.t.read(0x100 + 34, &mut n);
    assert_eq!(u16::from_le_bytes(n), 3, "num_queues");
    // A read of sector q + 5 on each queue q, answered on that queue.
    for q in 0..3u64 {
        let (hdr, buf, st) = (
            MQ_BUF + q * 0x2000,
            MQ_BUF + q * 0x2000 + 0x100,
            MQ_BUF + q * 0x2000 + 0x1000,
        );
        d.header(hdr, 0, q + 5);
        let used = d
            .on_queue(q)
            .submit_on(q, &[(hdr, 16, 0), (buf, 512, F_WRITE), (st, 1, F_WRITE)]);
        assert_eq!(used, Some(513), "queue {q}");
        assert_eq!(d.byte(st), 0);
        assert_eq!(d.byte(buf), (q + 5) as u8);
    }
    // One queue is the old device: no MQ.
    let one = Block::new(
        Box::new(MemDisk {
            data: vec![0; 4096],
            ro: false,
        }),
        "one",
        false,
    );
    assert_eq!(crate::VirtioDevice::features(&one) & (1 << 12), 0);
    assert_eq!(crate::VirtioDevice::queue_max_sizes(&one).len(), 1);
}

#[test]
fn a_multi_queue_nic_uses_the_pairs_the_driver_sets_each_on_its_own_tap_queue() {
    use crate::net::{features, hdr};
    let (a, b) = (FakeNet::default(), FakeNet::default());
    let dev = crate::net::Net::with_backends(
        vec![Box::new(a.clone()), Box::new(b.clone())],
        [0x52, 0x54, 0, 0, 0, 2],
    );
    // Until the driver says otherwise only the first pair is used.
    assert_eq!(b.0.lock().unwrap().enabled, vec![false]);
    let mut d = Driver::new(Box::new(dev)).init(QSIZE);
    d.w(0x014, 0);
    let offered = u64::from(d.r(0x010));
    assert_eq!(
        offered & (features::MQ | features::CTRL_VQ),
        features::MQ | features::CTRL_VQ
    );
    let mut pairs = [0u8; 2];
    d.t.read(0x100 + 8, &mut pairs);
    assert_eq!(u16::from_le_bytes(pairs), 2, "max_virtqueue_pairs");
    // rx0 tx0 rx1 tx1 ctrl.
    d.w(0x030, 4);
    assert_ne!(d.r(0x034), 0, "the control queue");
    d.w(0x030, 5);
    assert_eq!(d.r(0x034), 0, "no sixth queue");

    // Before the driver sets the pair count (or after a restore, which does not know
    // it) a frame on the second pair leaves through the first TAP queue: a detached
    // one refuses writes.
    let early = net_frame(0, hdr::GSO_NONE, 60);
    d.mem
        .write_slice(&early, GuestAddress(MQ_BUF + 0x3000))
        .unwrap();
    d.on_queue(3)
        .submit_on(3, &[(MQ_BUF + 0x3000, early.len() as u32, 0)]);
    assert_eq!(a.0.lock().unwrap().from_guest, vec![early]);
    assert!(b.0.lock().unwrap().from_guest.is_empty());
    // VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET 2: answered OK, and the second TAP queue attached.
    let (cmd, ack) = (MQ_BUF, MQ_BUF + 0x100);
    d.mem.write_slice(&[4, 0, 2, 0], GuestAddress(cmd)).unwrap();
    d.mem.write_obj(0xffu8, GuestAddress(ack)).unwrap();
    let used = d
        .on_queue(4)
        .submit_on(4, &[(cmd, 4, 0), (ack, 1, F_WRITE)]);
    assert_eq!(used, Some(1));
    assert_eq!(d.byte(ack), 0, "VIRTIO_NET_OK");
    assert_eq!(b.0.lock().unwrap().enabled, vec![false, true]);
    // Three pairs is more than there are; an unknown class is refused.
    for bad in [[4u8, 0, 3, 0], [0, 0, 1, 0]] {
        d.mem.write_slice(&bad, GuestAddress(cmd)).unwrap();
        d.on_queue(4)
            .submit_on(4, &[(cmd, 4, 0), (ack, 1, F_WRITE)]);
        assert_eq!(d.byte(ack), 1, "VIRTIO_NET_ERR for {bad:?}");
    }

    // A frame sent on the second pair's transmit queue leaves through its TAP queue.
    let frame = net_frame(0, hdr::GSO_NONE, 100);
    d.mem
        .write_slice(&frame, GuestAddress(MQ_BUF + 0x1000))
        .unwrap();
    d.on_queue(3)
        .submit_on(3, &[(MQ_BUF + 0x1000, frame.len() as u32, 0)]);
    assert_eq!(b.0.lock().unwrap().from_guest, vec![frame.clone()]);
    assert_eq!(
        a.0.lock().unwrap().from_guest.len(),
        1,
        "only the early frame"
    );
    // And one from the second TAP queue reaches the second receive queue.
    b.0.lock().unwrap().to_guest.push_back(frame.clone());
    let used = d
        .on_queue(2)
        .submit_on(2, &[(MQ_BUF + 0x2000, 2048, F_WRITE)]);
    assert_eq!(used, Some(frame.len() as u32));
    assert!(d.used_since(0, 0).is_empty(), "nothing on the first pair");

    // A reset goes back to one pair.
    d.w(0x070, 0);
    assert_eq!(b.0.lock().unwrap().enabled, vec![false, true, false]);
}

#[test]
fn a_restored_two_pair_nic_keeps_using_both_pairs() {
    use crate::net::hdr;
    let (a, b) = (FakeNet::default(), FakeNet::default());
    let dev = crate::net::Net::with_backends(
        vec![Box::new(a.clone()), Box::new(b.clone())],
        [0x52, 0x54, 0, 0, 0, 3],
    );
    let mut d = Driver::new(Box::new(dev)).init(QSIZE);
    let (cmd, ack) = (MQ_BUF, MQ_BUF + 0x100);
    d.mem.write_slice(&[4, 0, 2, 0], GuestAddress(cmd)).unwrap();
    d.on_queue(4)
        .submit_on(4, &[(cmd, 4, 0), (ack, 1, F_WRITE)]);
    assert_eq!(d.byte(ack), 0, "VIRTIO_NET_OK");
    let snap = d.t.core().snapshot();
    assert_eq!(snap.queue_pairs, Some(2));
    // Through the snapshot file's JSON, and one from before the field existed.
    let json = serde_json::to_value(&snap).unwrap();
    let snap: crate::transport::CoreSnapshot = serde_json::from_value(json.clone()).unwrap();
    let mut old = json;
    old.as_object_mut().unwrap().remove("queue_pairs");
    let old: crate::transport::CoreSnapshot = serde_json::from_value(old).unwrap();
    assert_eq!(old.queue_pairs, None);

    // The restored VMM opens its TAP queues afresh: only the first attached.
    let (a2, b2) = (FakeNet::default(), FakeNet::default());
    let dev = crate::net::Net::with_backends(
        vec![Box::new(a2.clone()), Box::new(b2.clone())],
        [0x52, 0x54, 0, 0, 0, 3],
    );
    let mut r = Driver::on_memory(Box::new(dev), Pulses::default(), d.mem.clone());
    let mut bad = snap.clone();
    bad.queue_pairs = Some(3);
    assert!(r.t.core().restore(&bad).is_err(), "three pairs of two");
    r.t.core().restore(&snap).unwrap();
    assert_eq!(b2.0.lock().unwrap().enabled, vec![false, true]);
    // The second pair's frames leave through its own TAP queue, and its TAP queue's
    // frames reach its receive queue.
    let frame = net_frame(0, hdr::GSO_NONE, 80);
    r.mem
        .write_slice(&frame, GuestAddress(MQ_BUF + 0x1000))
        .unwrap();
    r.on_queue(3)
        .submit_on(3, &[(MQ_BUF + 0x1000, frame.len() as u32, 0)]);
    assert_eq!(b2.0.lock().unwrap().from_guest, vec![frame.clone()]);
    assert!(a2.0.lock().unwrap().from_guest.is_empty());
    b2.0.lock().unwrap().to_guest.push_back(frame.clone());
    let used = r
        .on_queue(2)
        .submit_on(2, &[(MQ_BUF + 0x2000, 2048, F_WRITE)]);
    assert_eq!(used, Some(frame.len() as u32));
    // A snapshot of the restored device still says two.
    assert_eq!(r.t.core().snapshot().queue_pairs, Some(2));
    // A one-pair NIC saves no count.
    let (one, _) = net(u64::MAX);
    assert_eq!(one.t.core().snapshot().queue_pairs, None);
}

/// A file whose reads at offset 0 wait until the test lets them go; reads elsewhere
/// answer at once. Every byte read is its sector's number with the top bit set.
#[derive(Debug)]
struct GatedFile {
    entered: std::sync::mpsc::SyncSender<()>,
    release: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl block::Storage for GatedFile {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if offset == 0 {
            let _ = self.entered.send(());
            let _ = self.release.lock().unwrap().recv();
        }
        buf.fill((offset >> 9) as u8 | 0x80);
        Ok(())
    }
    fn write_at(&self, _: u64, _: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn file_len(&self) -> std::io::Result<u64> {
        Ok(1 << 20)
    }
    fn set_len(&self, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn punch_hole(&self, _: u64, _: u64) -> std::io::Result<bool> {
        Ok(false)
    }
    fn allocated_bytes(&self) -> std::io::Result<u64> {
        Ok(1 << 20)
    }
}

#[test]
fn a_raw_disks_queues_serve_requests_while_another_queue_waits_on_the_disk() {
    let (entered_tx, entered) = std::sync::mpsc::sync_channel(4);
    let (release, release_rx) = std::sync::mpsc::channel();
    let file = GatedFile {
        entered: entered_tx,
        release: Mutex::new(release_rx),
    };
    let raw = block::Raw::new(Box::new(file), false).unwrap();
    let dev = Block::new(Box::new(raw), "gated-mq", false).with_queues(2);
    let d = Driver::new(Box::new(dev)).init(QSIZE);
    // One read on each queue: queue 0's of sector 0 (held by the file), queue 1's of
    // sector 8. Each queue's ring has its own avail index.
    for (q, sector) in [(0u64, 0u64), (1, 8)] {
        let base = q * 0x4000;
        let (hdr, buf, st) = (HDR + q * 0x1000, BUF + q * 0x1000, ST + q * 0x100);
        d.header(hdr, 0, sector);
        d.mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
        for (i, (addr, len, flags)) in [(hdr, 16u32, 0u16), (buf, 512, F_WRITE), (st, 1, F_WRITE)]
            .into_iter()
            .enumerate()
        {
            let at = DESC + base + i as u64 * 16;
            let next = if i < 2 { F_NEXT } else { 0 };
            d.mem.write_obj(addr, GuestAddress(at)).unwrap();
            d.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            d.mem
                .write_obj(flags | next, GuestAddress(at + 12))
                .unwrap();
            d.mem
                .write_obj(i as u16 + 1, GuestAddress(at + 14))
                .unwrap();
        }
        d.mem
            .write_obj(0u16, GuestAddress(AVAIL + base + 4))
            .unwrap();
        d.mem
            .write_obj(1u16, GuestAddress(AVAIL + base + 2))
            .unwrap();
    }
    let core = d.t.core();
    let waiting = {
        let core = core.clone();
        std::thread::spawn(move || core.process_queue(0))
    };
    entered
        .recv_timeout(std::time::Duration::from_secs(5))
        .expect("queue 0's read reached the file");
    // Queue 0's request holds its queue; queue 1's runs beside it, on this thread.
    let (tx, rx) = std::sync::mpsc::channel();
    let other = {
        let core = core.clone();
        std::thread::spawn(move || tx.send(core.process_queue(1)).unwrap())
    };
    let done = rx.recv_timeout(std::time::Duration::from_secs(5));
    // Let queue 0 finish whatever happened, so the threads end.
    release.send(()).unwrap();
    let done = done.expect("queue 1 waited for queue 0's request on the disk");
    assert!(done.is_some_and(|o| o.used), "{done:?}");
    assert_eq!(d.used_since(1, 0), vec![(0, 513)]);
    assert_eq!(d.byte(BUF + 0x1000), 0x88);
    assert_eq!(d.byte(ST + 0x100), 0);
    assert!(waiting.join().unwrap().is_some_and(|o| o.used));
    other.join().unwrap();
    assert_eq!(d.used_since(0, 0), vec![(0, 513)]);
    assert_eq!(d.byte(BUF), 0x80);
}

/// Issue 17: a frame the NIC took from the host and held for want of a receive buffer
/// when the VM stopped goes into the snapshot (as hex), and the restored NIC gives it to
/// the driver: at once when a buffer was already posted (no notify comes for it), before
/// any frame the host sends later. A snapshot whose held frame does not fit the device
/// is refused, with nothing changed.
#[test]
fn a_frame_held_at_a_snapshot_reaches_the_restored_driver() {
    use crate::net::{features::*, hdr};
    let (mut d, fake) = net(MAC);
    let held = net_frame(0, hdr::GSO_NONE, 300);
    fake.0.lock().unwrap().to_guest.push_back(held.clone());
    // The TAP had a frame, the driver no buffer.
    d.w(0x050, 0);
    assert!(d.used_since(0, 0).is_empty());
    assert!(
        fake.0.lock().unwrap().to_guest.is_empty(),
        "the frame was taken"
    );
    // The driver posts a buffer; the VM stops before the device sees it.
    d.post_buffers(0, 0, &[(BUF, 2048, F_WRITE)]);
    let snap = d.t.core().snapshot();
    let json = serde_json::to_value(&snap).unwrap();
    assert!(json["held_frames"][0]["bytes"].is_string(), "{json}");
    let snap: crate::transport::CoreSnapshot = serde_json::from_value(json.clone()).unwrap();

    let restore_on = |snap: &crate::transport::CoreSnapshot| {
        let fake = FakeNet::default();
        let dev = crate::net::Net::with_backend(Box::new(fake.clone()), [0x52, 0x54, 0, 0, 0, 1]);
        let r = Driver::on_memory(Box::new(dev), Pulses::default(), d.mem.clone());
        let got = r.t.core().restore(snap);
        (r, fake, got)
    };
    // Refused: a pair the device lacks, two for one pair, a frame shorter than its header.
    for (what, change) in [
        (
            "pair",
            serde_json::json!([{"pair": 1, "bytes": "00".repeat(20)}]),
        ),
        (
            "two",
            serde_json::json!([{"pair": 0, "bytes": "00".repeat(20)}, {"pair": 0, "bytes": "00".repeat(20)}]),
        ),
        ("short", serde_json::json!([{"pair": 0, "bytes": "0000"}])),
    ] {
        let mut bad = json.clone();
        bad["held_frames"] = change;
        let bad: crate::transport::CoreSnapshot = serde_json::from_value(bad).unwrap();
        let (r, _, got) = restore_on(&bad);
        assert!(
            matches!(got, Err(crate::transport::RestoreError::HeldFrames { .. })),
            "{what}: {got:?}"
        );
        assert_eq!(
            r.t.core().snapshot().status,
            0,
            "{what}: the refusal changed the device"
        );
    }
    let mut odd = json.clone();
    odd["held_frames"][0]["bytes"] = "abc".into();
    assert!(serde_json::from_value::<crate::transport::CoreSnapshot>(odd).is_err());

    let (mut r, fake2, got) = restore_on(&snap);
    got.unwrap();
    let later = net_frame(0, hdr::GSO_NONE, 100);
    fake2.0.lock().unwrap().to_guest.push_back(later.clone());
    r.t.core().after_restore();
    assert_eq!(r.used_since(0, 0), vec![(0, held.len() as u32)]);
    let mut got = vec![0u8; held.len()];
    r.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert_eq!(got[..10], held[..10], "the header");
    assert_eq!(got[VNET_HDR..], held[VNET_HDR..], "the frame");
    // The host's next frame follows it.
    r.avail_idx = 1;
    r.post_buffers(0, 1, &[(BUF + 0x1000, 2048, F_WRITE)]);
    r.w(0x050, 0);
    assert_eq!(
        r.used_since(0, 0),
        vec![(0, held.len() as u32), (1, later.len() as u32)]
    );
    // Nothing held any more: the next snapshot has no frame.
    assert!(r.t.core().snapshot().held_frames.is_empty());
    let _ = GUEST_CSUM;
}

impl Driver {
    /// Post one chain on queue `q` and notify, with that queue's own avail index (read
    /// back from the ring); returns the used entries the notify produced.
    fn submit_q(&mut self, q: u64, chain: &[(u64, u32, u16)]) -> Vec<(u32, u32)> {
        let base = q * 0x4000;
        let idx: u16 = self.mem.read_obj(GuestAddress(AVAIL + base + 2)).unwrap();
        for (i, &(addr, len, flags)) in chain.iter().enumerate() {
            let d = DESC + base + i as u64 * 16;
            let next_flag = if i + 1 < chain.len() { F_NEXT } else { 0 };
            self.mem.write_obj(addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            self.mem
                .write_obj(flags | next_flag, GuestAddress(d + 12))
                .unwrap();
            self.mem
                .write_obj((i + 1) as u16, GuestAddress(d + 14))
                .unwrap();
        }
        let slot = AVAIL + base + 4 + u64::from(idx % QSIZE) * 2;
        self.mem.write_obj(0u16, GuestAddress(slot)).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + base + 2))
            .unwrap();
        let before: u16 = self.mem.read_obj(GuestAddress(USED + base + 2)).unwrap();
        self.w(0x050, q as u32);
        self.used_since(q, before)
    }
}

const BALLOON_PFNS: u64 = 0x20000;

fn balloon(interval: std::time::Duration) -> (Driver, crate::balloon::BalloonHandle) {
    // RAM is the guest memory's first 768 KiB; the rest stands for a firmware region.
    let b = crate::balloon::Balloon::new(vec![(0, 0xC_0000)], 16, false, interval);
    let h = b.handle();
    (Driver::new(Box::new(b)).init(QSIZE), h)
}

#[test]
fn balloon_inflate_discards_ram_pages_and_skips_hostile_frames() {
    let (mut d, h) = balloon(std::time::Duration::ZERO);
    // The target is in the config space.
    assert_eq!(d.r(0x100), 16);
    // Pages 0x80..0x88 hold data; 0xC0 is past RAM (the "firmware"), 0xFF past it too.
    for p in [0x80u64, 0x81, 0x83, 0x87, 0xC0, 0xFF] {
        d.mem
            .write_slice(&[0xAA; 4096], GuestAddress(p << 12))
            .unwrap();
    }
    let pfns: Vec<u8> = [
        0x80u32,
        0x81,
        0x83,
        u32::MAX,
        0xC0,
        0xFF,
        0x10_0000,
        0x7_FFFF,
    ]
    .iter()
    .flat_map(|p| p.to_le_bytes())
    .collect();
    d.mem
        .write_slice(&pfns, GuestAddress(BALLOON_PFNS))
        .unwrap();
    // The count need not be a multiple of four: the odd bytes are ignored.
    let used = d.submit_q(0, &[(BALLOON_PFNS, pfns.len() as u32 + 3, 0)]);
    assert_eq!(used.len(), 1);
    let page = |d: &Driver, p: u64| {
        let mut b = [0u8; 4096];
        d.mem.read_slice(&mut b, GuestAddress(p << 12)).unwrap();
        b
    };
    for p in [0x80, 0x81, 0x83] {
        assert!(page(&d, p).iter().all(|&x| x == 0), "page {p:#x} kept");
    }
    for p in [0x87, 0xC0, 0xFF] {
        assert!(page(&d, p).iter().all(|&x| x == 0xAA), "page {p:#x} lost");
    }
    let s = h.stats();
    assert_eq!((s.inflated_pages, s.bad_frames), (3, 5));
    // A descriptor as long as guest memory: every word a frame, read in pieces.
    let used = d.submit_q(0, &[(0, 1 << 20, 0)]);
    assert_eq!(used.len(), 1);
    assert_eq!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    // Deflate: counted only.
    let used = d.submit_q(1, &[(BALLOON_PFNS, 8, 0)]);
    assert_eq!(used.len(), 1);
    assert_eq!(h.stats().deflated_pages, 2);
    // A descriptor outside guest memory: the device needs a reset, the host goes on.
    d.submit_q(0, &[(u64::MAX - 8, 64, 0)]);
    assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn balloon_target_changes_interrupt_and_actual_is_the_drivers() {
    let (mut d, h) = balloon(std::time::Duration::ZERO);
    let before = d.pulses();
    h.set_target_pages(300);
    d.t.core().config_changed();
    assert_eq!(d.r(0x100), 300);
    assert!(d.pulses() > before);
    assert_ne!(d.r(0x060) & INT_CONFIG_CHANGE, 0);
    d.w(0x104, 120);
    assert_eq!(h.stats().actual_pages, 120);
    // Only two queues without statistics.
    d.w(0x030, 2);
    assert_eq!(d.r(0x034), 0);
}

#[test]
fn balloon_stats_buffer_is_kept_until_a_poll() {
    let (mut d, h) = balloon(std::time::Duration::from_secs(3600));
    let mut buf = Vec::new();
    for (tag, v) in [(4u16, 1000u64), (5, 4000), (6, 3000), (99, 7), (0, 12)] {
        buf.extend(tag.to_le_bytes());
        buf.extend(v.to_le_bytes());
    }
    d.mem.write_slice(&buf, GuestAddress(BALLOON_PFNS)).unwrap();
    // A poll was not asked for and the interval is long: the buffer is kept.
    let used = d.submit_q(2, &[(BALLOON_PFNS, buf.len() as u32, 0)]);
    assert!(used.is_empty(), "{used:?}");
    let s = h.stats();
    assert_eq!(s.values[4], Some(1000));
    assert_eq!(s.values[5], Some(4000));
    assert_eq!(s.values[6], Some(3000));
    assert_eq!(s.values[0], Some(12));
    assert_eq!(s.values[1], None);
    assert!(s.age.is_some());
    // The host asks for figures now: the kept buffer goes back at the next look.
    h.set_interval(std::time::Duration::from_secs(1));
    d.w(0x050, 2);
    assert_eq!(d.used_since(2, 0).len(), 1);
    // A hostile stats buffer far longer than any stats: read in part, no reset.
    let used = d.submit_q(2, &[(0, 1 << 20, 0)]);
    assert!(used.is_empty());
    assert_eq!(d.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn balloon_stats_primed_before_driver_ok_are_taken_at_driver_ok() {
    let b = crate::balloon::Balloon::new(
        vec![(0, 0xC_0000)],
        0,
        false,
        std::time::Duration::from_secs(3600),
    );
    let h = b.handle();
    let mut d = Driver::new(Box::new(b)).set_up(QSIZE, u64::MAX);
    let mut buf = Vec::new();
    buf.extend(5u16.to_le_bytes());
    buf.extend(123_456u64.to_le_bytes());
    d.mem.write_slice(&buf, GuestAddress(BALLOON_PFNS)).unwrap();
    // Linux primes the stats queue and notifies during probe, before DRIVER_OK.
    d.submit_q(2, &[(BALLOON_PFNS, buf.len() as u32, 0)]);
    assert_eq!(h.stats().values[5], None, "served before DRIVER_OK");
    d.w(
        0x070,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    assert_eq!(h.stats().values[5], Some(123_456));
}
