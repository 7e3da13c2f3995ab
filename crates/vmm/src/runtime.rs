//! Changing devices while the guest runs, for the control API's PATCH requests: a disk's
//! backing file (Firecracker's `PATCH /drives`) and the rate limiters of disks and network
//! interfaces. Devices are found by their index in `VmConfig::disks` / `VmConfig::nets`.

use std::sync::{Arc, Mutex};

use virtio::balloon::{BalloonHandle, BalloonStats};
use virtio::blk::BlockHandle;
use virtio::net::NetLimiters;
use virtio::transport::DeviceCore;

use crate::config::{DiskConfig, RateLimiterConfig};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("no disk {0}")]
    NoDisk(usize),
    #[error("no network interface {0}")]
    NoNet(usize),
    #[error("the VM has no balloon device")]
    NoBalloon,
    #[error("Error manipulating the backing file: {source} {path}")]
    BackingFile {
        path: String,
        #[source]
        source: block::OpenError,
    },
}

/// Device counters summed over the VM's disks and interfaces, by Firecracker's metric
/// group and name (`block.read_bytes`, `net.rx_packets_count`, …).
pub type DeviceTotals = std::collections::BTreeMap<(&'static str, &'static str), u64>;

/// A disk as the VMM built it, with what is needed to change it.
#[derive(Debug)]
struct Disk {
    config: DiskConfig,
    handle: BlockHandle,
    core: Arc<DeviceCore>,
}

/// Firecracker's names of the balloon statistics, by virtio tag (`GET /balloon/statistics`).
pub const BALLOON_STAT_NAMES: [&str; virtio::balloon::STAT_TAGS] = virtio::balloon::STAT_NAMES;

/// The balloon as the VMM built it.
#[derive(Debug)]
struct Balloon {
    handle: BalloonHandle,
    core: Arc<DeviceCore>,
    /// The stats queue's doorbell on the device's I/O thread: written to make it look
    /// at the queue now (a poll asked for).
    stats_kick: Option<hypervisor::EventFd>,
}

/// What a running VM's changeable devices are.
#[derive(Debug, Default)]
pub struct RuntimeDevices {
    disks: Mutex<Vec<Disk>>,
    nets: Mutex<Vec<NetLimiters>>,
    balloon: Mutex<Option<Balloon>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A device to register, before its transport exists.
#[derive(Debug)]
pub(crate) enum Changeable {
    Disk(DiskConfig, BlockHandle),
    Net(NetLimiters),
    Balloon(BalloonHandle),
}

impl RuntimeDevices {
    /// Registers the next disk or interface (in `VmConfig` order) on its transport.
    pub(crate) fn add(&self, device: Changeable, core: Arc<DeviceCore>) {
        match device {
            Changeable::Disk(config, handle) => lock(&self.disks).push(Disk {
                config,
                handle,
                core,
            }),
            Changeable::Net(limiters) => lock(&self.nets).push(limiters),
            Changeable::Balloon(handle) => {
                *lock(&self.balloon) = Some(Balloon {
                    handle,
                    core,
                    stats_kick: None,
                })
            }
        }
    }

    /// The balloon's stats queue doorbell, once its I/O thread exists.
    pub(crate) fn set_balloon_kick(&self, fd: hypervisor::EventFd) {
        if let Some(b) = lock(&self.balloon).as_mut() {
            b.stats_kick = Some(fd);
        }
    }

    /// Asks the guest's balloon driver for a new size: `amount_mib` MiB given back.
    pub fn set_balloon_target(&self, amount_mib: u32) -> Result<(), RuntimeError> {
        let b = lock(&self.balloon);
        let b = b.as_ref().ok_or(RuntimeError::NoBalloon)?;
        b.handle.set_target_pages(amount_mib.saturating_mul(256));
        b.core.config_changed();
        tracing::info!(amount_mib, "balloon target set");
        Ok(())
    }

    /// A new statistics polling interval, with a poll now.
    pub fn set_balloon_interval(&self, seconds: u16) -> Result<(), RuntimeError> {
        let b = lock(&self.balloon);
        let b = b.as_ref().ok_or(RuntimeError::NoBalloon)?;
        b.handle
            .set_interval(std::time::Duration::from_secs(seconds.into()));
        if let Some(k) = &b.stats_kick {
            if let Err(e) = k.write(1) {
                tracing::warn!("balloon statistics poll: {e}");
            }
        }
        Ok(())
    }

    /// The balloon's size and the guest's last statistics.
    pub fn balloon_stats(&self) -> Result<BalloonStats, RuntimeError> {
        let b = lock(&self.balloon);
        Ok(b.as_ref().ok_or(RuntimeError::NoBalloon)?.handle.stats())
    }

    /// Serves disk `index` from the file at `path` from now on (its format and
    /// read-only setting stay), and tells the driver its capacity may have changed.
    pub fn replace_disk(&self, index: usize, path: &str) -> Result<u64, RuntimeError> {
        let mut disks = lock(&self.disks);
        let d = disks.get_mut(index).ok_or(RuntimeError::NoDisk(index))?;
        if d.config.path == std::path::Path::new(path) {
            // The file it already serves (and holds the lock on).
            return Ok(d.handle.capacity());
        }
        let config = DiskConfig {
            path: path.into(),
            ..d.config.clone()
        };
        let backend = config.open().map_err(|source| RuntimeError::BackingFile {
            path: path.to_string(),
            source,
        })?;
        let bytes = d.handle.replace_backend(backend);
        d.config = config;
        d.core.config_changed();
        tracing::info!(disk = index, path, bytes, "disk backing file replaced");
        Ok(bytes)
    }

    /// What the disks and interfaces have served so far.
    pub fn totals(&self) -> DeviceTotals {
        use std::sync::atomic::Ordering::Relaxed;
        let mut t = DeviceTotals::new();
        let mut add = |group, name, v: u64| *t.entry((group, name)).or_default() += v;
        for d in lock(&self.disks).iter() {
            let c = d.handle.counters();
            add("block", "read_count", c.read_count.load(Relaxed));
            add("block", "read_bytes", c.read_bytes.load(Relaxed));
            add("block", "write_count", c.write_count.load(Relaxed));
            add("block", "write_bytes", c.write_bytes.load(Relaxed));
            add("block", "flush_count", c.flush_count.load(Relaxed));
        }
        for n in lock(&self.nets).iter() {
            let c = &n.counters;
            add("net", "rx_packets_count", c.rx_packets.load(Relaxed));
            add("net", "rx_bytes_count", c.rx_bytes.load(Relaxed));
            add("net", "tx_packets_count", c.tx_packets.load(Relaxed));
            add("net", "tx_bytes_count", c.tx_bytes.load(Relaxed));
        }
        t
    }

    /// Applies a PATCH to disk `index`'s rate limiter.
    pub fn update_disk_limiter(
        &self,
        index: usize,
        update: &RateLimiterConfig,
    ) -> Result<(), RuntimeError> {
        let disks = lock(&self.disks);
        let d = disks.get(index).ok_or(RuntimeError::NoDisk(index))?;
        let (bw, ops) = update.update();
        lock(d.handle.limiter()).update(bw, ops);
        Ok(())
    }

    /// Applies a PATCH to interface `index`'s receive and transmit limiters.
    pub fn update_net_limiters(
        &self,
        index: usize,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) -> Result<(), RuntimeError> {
        let nets = lock(&self.nets);
        let n = nets.get(index).ok_or(RuntimeError::NoNet(index))?;
        for (limiter, update) in [(&n.rx, rx), (&n.tx, tx)] {
            if let Some(u) = update {
                let (bw, ops) = u.update();
                lock(limiter).update(bw, ops);
            }
        }
        Ok(())
    }
}
