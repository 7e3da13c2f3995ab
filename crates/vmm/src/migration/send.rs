//! The source's side: pre-copy rounds while the guest runs, then stop and copy.

use std::io::{BufWriter, Write};
use std::time::{Duration, Instant};

use devices::exit::ExitReason;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use super::{wire, Conn, Endpoint, Limits, MigrationError, Report};
use crate::snapshot::{Snapshotter, VirtioSnapshot};

/// Pages left that are not worth another round (1 MiB).
const SMALL_ROUND: u64 = 256;

/// How long the source waits for the destination to build and start the VM.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// How long one write of the stream may wait for the destination to take bytes before
/// the migration fails (SO_SNDTIMEO): a destination that stopped reading (hung, or a
/// link that went dead without a reset) would otherwise hold the request, and the guest
/// once stopped, for good. A write that got some bytes in before it waited returns
/// those first, so a stalled destination fails the migration after one to two limits.
pub(super) const STALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The guest's RAM regions, (gpa, len).
fn regions(memory: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    memory.iter().map(|r| (r.start_addr().0, r.len())).collect()
}

fn bit(map: &[u64], pfn: u64) -> bool {
    usize::try_from(pfn / 64)
        .ok()
        .and_then(|i| map.get(i))
        .is_some_and(|w| w >> (pfn % 64) & 1 == 1)
}

fn set_bit(map: &mut [u64], pfn: u64) {
    if let Some(w) = usize::try_from(pfn / 64).ok().and_then(|i| map.get_mut(i)) {
        *w |= 1 << (pfn % 64);
    }
}

fn clear_bit(map: &mut [u64], pfn: u64) {
    if let Some(w) = usize::try_from(pfn / 64).ok().and_then(|i| map.get_mut(i)) {
        *w &= !(1 << (pfn % 64));
    }
}

/// Clears from `map` the pages of `memory` the guest never touched, as a Full snapshot
/// leaves them out (`snapshot::untouched`): they are zero, as the destination's fresh
/// memory is, so the first round neither reads them (each read would fault in the zero
/// page) nor sends them. Asked after the dirty log's first take: a page written after
/// the question is marked by the next take. Returns how many it cleared.
fn skip_untouched(memory: &GuestMemoryMmap, map: &mut [u64]) -> u64 {
    let mut skipped = 0;
    for region in memory.iter() {
        let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) else {
            continue;
        };
        let Ok(len) = usize::try_from(region.len()) else {
            continue;
        };
        let backing = region.file_offset().map(|fo| (fo.file(), fo.start()));
        let Some(known) = crate::snapshot::untouched::known_zero(host.cast_const(), len, backing)
        else {
            continue;
        };
        let first = region.start_addr().0 / wire::PAGE as u64;
        for i in 0..len / wire::PAGE {
            let pfn = first + i as u64;
            if known.page(i) && bit(map, pfn) {
                clear_bit(map, pfn);
                skipped += 1;
            }
        }
    }
    skipped
}

/// Pages of `regions` marked in `map`.
/// A map with every page of `regions` (and whatever lies below them) set.
fn every_page(regions: &[(u64, u64)]) -> Vec<u64> {
    let end = regions
        .iter()
        .map(|&(gpa, len)| (gpa + len) / wire::PAGE as u64)
        .max()
        .unwrap_or(0);
    vec![u64::MAX; usize::try_from(end.div_ceil(64)).unwrap_or(0)]
}

fn count(map: &[u64], regions: &[(u64, u64)]) -> u64 {
    regions
        .iter()
        .map(|&(gpa, len)| {
            let first = gpa / wire::PAGE as u64;
            (first..first + len / wire::PAGE as u64)
                .filter(|&p| bit(map, p))
                .count() as u64
        })
        .sum()
}

/// Pages devices write without telling the accelerator: the used rings of the virtio
/// queues (virtio-queue writes them itself). Sent again with the guest stopped.
fn device_written(virtio: &[VirtioSnapshot], map: &mut [u64]) {
    for v in virtio {
        let core = match v {
            VirtioSnapshot::Mmio(m) => &m.core,
            VirtioSnapshot::Pci(p) => &p.core,
        };
        for q in core.queues.iter().filter(|q| q.ready) {
            let len = 6 + 8 * u64::from(q.size);
            let first = q.used_ring / wire::PAGE as u64;
            let last = q.used_ring.saturating_add(len - 1) / wire::PAGE as u64;
            for pfn in first..=last {
                set_bit(map, pfn);
            }
        }
    }
}

/// A run of pages of one kind being gathered into a record.
struct Run {
    zero: bool,
    gpa: u64,
    count: u32,
    data: Vec<u8>,
}

struct Stream {
    w: BufWriter<Conn>,
    run: Option<Run>,
    report: Report,
}

impl Drop for Stream {
    fn drop(&mut self) {
        // Before the buffer's own drop, which writes what it still holds: after a
        // failed write (a stalled destination) that would wait out the stall limit again.
        self.w.get_ref().shutdown();
    }
}

impl Stream {
    fn flush_run(&mut self) -> std::io::Result<()> {
        let Some(run) = self.run.take() else {
            return Ok(());
        };
        if run.zero {
            wire::write_zero(&mut self.w, run.gpa, run.count)?;
            self.report.bytes += 13;
        } else {
            wire::write_pages_head(&mut self.w, run.gpa, run.count)?;
            self.w.write_all(&run.data)?;
            self.report.bytes += 13 + run.data.len() as u64;
        }
        Ok(())
    }

    fn page(&mut self, gpa: u64, bytes: &[u8]) -> std::io::Result<()> {
        let zero = crate::snapshot::memory::all_zero(bytes);
        let extends = self.run.as_ref().is_some_and(|r| {
            r.zero == zero
                && r.count < wire::MAX_RUN
                && r.gpa + u64::from(r.count) * wire::PAGE as u64 == gpa
        });
        if !extends {
            self.flush_run()?;
            self.run = Some(Run {
                zero,
                gpa,
                count: 0,
                data: Vec::new(),
            });
        }
        if let Some(r) = &mut self.run {
            r.count += 1;
            if !zero {
                r.data.extend_from_slice(bytes);
            }
        }
        self.report.pages += 1;
        if zero {
            self.report.zero_pages += 1;
        }
        Ok(())
    }

    /// Sends the pages of `regions` marked in `map`, read from `memory` now.
    fn pages(
        &mut self,
        memory: &GuestMemoryMmap,
        regions: &[(u64, u64)],
        map: &[u64],
    ) -> Result<u64, MigrationError> {
        let mut page = vec![0u8; wire::PAGE];
        let mut sent = 0;
        for &(gpa, len) in regions {
            let first = gpa / wire::PAGE as u64;
            for pfn in first..first + len / wire::PAGE as u64 {
                if !bit(map, pfn) {
                    continue;
                }
                let at = pfn * wire::PAGE as u64;
                memory
                    .read_slice(&mut page, GuestAddress(at))
                    .map_err(|e| MigrationError::Memory(format!("{at:#x}: {e}")))?;
                self.page(at, &page)?;
                sent += 1;
            }
        }
        self.flush_run()?;
        Ok(sent)
    }
}

impl Snapshotter {
    /// Moves the VM to the VMM listening at `to` (`vessel run --incoming`). On success
    /// the VM runs there and this VMM's ends with [`ExitReason::Migrated`] once the
    /// caller calls [`Snapshotter::finish_migration`]; on failure the VM goes on here,
    /// running if it was.
    pub fn migrate(&self, to: &Endpoint, limits: Limits) -> Result<Report, MigrationError> {
        let _one = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let was_paused = self.control.is_paused();
        let r = self.migrate_inner(to, limits);
        if r.is_err() {
            self.vm.stop_dirty_log();
            if !was_paused {
                let _ = self.control.resume();
            }
        }
        r
    }

    /// Ends this VMM after a migration that succeeded: the VM runs elsewhere now.
    pub fn finish_migration(&self) {
        self.control.exit_signal().request(ExitReason::Migrated);
    }

    fn migrate_inner(&self, to: &Endpoint, limits: Limits) -> Result<Report, MigrationError> {
        let t0 = Instant::now();
        let conn = Conn::connect(to).map_err(|source| MigrationError::Connect {
            to: to.to_string(),
            source,
        })?;
        conn.set_write_timeout(Some(STALL_TIMEOUT))?;
        let mut s = Stream {
            w: BufWriter::with_capacity(1 << 20, conn),
            run: None,
            report: Report::default(),
        };
        let regions = regions(&self.memory);
        wire::write_header(&mut s.w)?;
        wire::write_layout(&mut s.w, &regions)?;
        // The first take after a stop counts every page written: all of RAM goes in
        // round one. A snapshot leaves the log running (the base of the next Diff), and a
        // take then gives only what changed since it.
        self.vm.stop_dirty_log();
        // An accelerator without a dirty log (hybrid: its user code writes RAM natively,
        // unseen) is migrated by stop-and-copy alone: every page, the VM paused, as one
        // round.
        let precopy = match self.vm.take_dirty_log() {
            Ok(d) => Some(d),
            Err(hypervisor::Error::Unsupported { what }) => {
                tracing::warn!(
                    "no {what}: the VM stays paused while all its memory is sent (no pre-copy)"
                );
                None
            }
            Err(e) => return Err(MigrationError::Accel(e)),
        };
        let mut dirty = precopy.clone().unwrap_or_else(|| every_page(&regions));
        s.report.untouched_pages = skip_untouched(&self.memory, &mut dirty);
        let mut before = u64::MAX;
        while precopy.is_some() {
            s.report.rounds += 1;
            let (t, bytes) = (Instant::now(), s.report.bytes);
            s.pages(&self.memory, &regions, &dirty)?;
            s.w.flush()?;
            let rate = (s.report.bytes - bytes) as f64 / t.elapsed().as_secs_f64().max(1e-6);
            dirty = self.vm.take_dirty_log().map_err(MigrationError::Accel)?;
            let left = count(&dirty, &regions);
            let eta = Duration::from_secs_f64(left as f64 * wire::PAGE as f64 / rate.max(1.0));
            tracing::info!(round = s.report.rounds, left, ?eta, "migration round sent");
            // Within the limit, another round is still worth its time while the pages
            // left shrink by a quarter or more: the stop then sends fewer (QEMU stops at
            // the limit; this gets the downtime well under it for a guest whose writes
            // converge, at the cost of a few short rounds).
            let converging = left > SMALL_ROUND && left < before - before / 4;
            before = left;
            if (eta <= limits.downtime_limit && !converging) || s.report.rounds >= limits.max_rounds
            {
                break;
            }
        }

        let paused_at = Instant::now();
        self.control
            .pause()
            .map_err(|e| MigrationError::Pause(e.to_string()))?;
        let answer = self
            .control
            .while_paused(|| -> Result<Result<(), String>, MigrationError> {
                if precopy.is_some() {
                    let last = self.vm.take_dirty_log().map_err(MigrationError::Accel)?;
                    for (d, l) in dirty.iter_mut().zip(&last) {
                        *d |= l;
                    }
                } else {
                    s.report.rounds = 1;
                }
                let state = self.state()?;
                device_written(&state.virtio, &mut dirty);
                let before = s.report.pages;
                s.pages(&self.memory, &regions, &dirty)?;
                s.report.last_pages = s.report.pages - before;
                let body = serde_json::to_vec(&state)
                    .map_err(|e| crate::snapshot::SnapshotError::Encode(e.to_string()))?;
                wire::write_state(&mut s.w, &body)?;
                // TAP queues and vsock's listener go along to a destination on this host
                // (a Unix socket), which takes them over as they are: frames and
                // connections that come meanwhile wait in them. Over TCP the destination
                // opens its own by name.
                let (kinds, fds) = self.host_handles()?;
                if !kinds.is_empty() && matches!(s.w.get_ref(), Conn::Unix(..)) {
                    let list = serde_json::to_vec(&kinds)
                        .map_err(|e| crate::snapshot::SnapshotError::Encode(e.to_string()))?;
                    s.w.flush()?;
                    s.w.get_mut()
                        .write_with_fds(&wire::handles_record(&list), &fds)?;
                    s.report.bytes += 9 + list.len() as u64;
                }
                drop(fds);
                // The destination opens the disks next: this VMM, stopped, lets go of its
                // image locks (QEMU inactivates its block devices here), and takes them
                // back if the VM stays.
                let released = block::lock::release_all();
                let answer = (|| -> Result<Result<(), String>, MigrationError> {
                    wire::write_end(&mut s.w)?;
                    s.report.bytes += 10 + body.len() as u64;
                    s.w.flush()?;
                    let conn = s.w.get_mut();
                    conn.set_read_timeout(Some(ANSWER_TIMEOUT))?;
                    Ok(wire::read_answer(conn)?)
                })();
                if !matches!(answer, Ok(Ok(()))) {
                    block::lock::retake(&released);
                }
                answer
            })
            .ok_or_else(|| MigrationError::Pause("the VM was resumed meanwhile".into()))??;
        answer.map_err(MigrationError::Refused)?;
        s.report.downtime_ms = paused_at.elapsed().as_secs_f64() * 1e3;
        s.report.total_ms = t0.elapsed().as_secs_f64() * 1e3;
        tracing::info!(to = %to, report = ?s.report, "VM migrated");
        Ok(std::mem::take(&mut s.report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first round leaves out pages the guest never touched, in each region at its
    /// own address, and keeps every page that was written or read.
    #[test]
    fn untouched_pages_are_left_out_of_the_first_round() {
        let ram = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 32), 1 << 20),
        ])
        .unwrap();
        ram.write_slice(&[1], GuestAddress(0x3000)).unwrap();
        ram.write_slice(&[2], GuestAddress((1 << 32) + 0x5000))
            .unwrap();
        let mut b = [0u8];
        ram.read_slice(&mut b, GuestAddress(0x7000)).unwrap();
        let regions = regions(&ram);
        let mut map = vec![u64::MAX; ((1u64 << 32) / 4096 / 64 + 8) as usize];
        let skipped = skip_untouched(&ram, &mut map);
        assert_eq!(count(&map, &regions), 3, "the written and the read pages");
        assert_eq!(skipped, 2 * 256 - 3);
        assert!(bit(&map, 3) && bit(&map, 7) && bit(&map, (1 << 20) + 5));
        assert!(!bit(&map, 4) && !bit(&map, (1 << 20) + 4));
        // Pages outside RAM are not its business.
        assert!(bit(&map, 300));
    }

    #[test]
    fn every_page_covers_each_region_to_its_last_page() {
        let regions = [(0, 1 << 20), (1 << 32, 64 << 12)];
        let map = every_page(&regions);
        assert_eq!(count(&map, &regions), 256 + 64);
        assert!(bit(&map, (1 << 20) + 63) && !bit(&map, (1 << 20) + 64));
    }

    #[test]
    fn used_rings_are_marked_and_counted_in_ram_only() {
        let mut map = vec![0u64; 4];
        set_bit(&mut map, 3);
        set_bit(&mut map, 200);
        set_bit(&mut map, 10_000); // outside the map: ignored
        assert!(bit(&map, 3) && bit(&map, 200) && !bit(&map, 4));
        assert_eq!(count(&map, &[(0, 64 * 4096)]), 1);
        assert_eq!(count(&map, &[(0, 256 * 4096)]), 2);
        let mut core: virtio::transport::CoreSnapshot = serde_json::from_value(serde_json::json!({
            "device_type": 2, "queues": [], "signalled": [], "driver_features": 0,
            "status": 0, "config_generation": 0, "interrupt_status": 0
        }))
        .unwrap();
        core.queues.push(virtio::transport::QueueSnapshot {
            max_size: 256,
            size: 256,
            ready: true,
            desc_table: 0x10_000,
            avail_ring: 0x11_000,
            // 6 + 8 * 256 bytes from 0x12ff0: two pages.
            used_ring: 0x12_ff0,
            next_avail: 0,
            next_used: 0,
            event_idx: false,
        });
        let snap = VirtioSnapshot::Mmio(virtio::mmio::MmioSnapshot {
            core,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
        });
        let mut map = vec![0u64; 1];
        device_written(&[snap], &mut map);
        assert_eq!(map[0], (1 << 0x12) | (1 << 0x13));
    }
}
