//! The manager's networks: definitions, bringing them up and down, the TAP devices of
//! domain interfaces, and what `domifaddr` reports. (A part of `Manager`, split out of
//! manager.rs.)

use serde::Serialize;

use super::{lock, Manager};
use crate::domain::{DomainDef, DomainState, Interface};
use crate::error::{Error, Result};
use crate::network::{self, NetworkDef};

/// One of a domain's interfaces, as `domifaddr` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct InterfaceInfo {
    pub network: Option<String>,
    pub bridge: Option<String>,
    /// The TAP device while the domain runs (it is removed when the domain stops).
    pub tap: Option<String>,
    pub mac: String,
    /// The DHCP lease for this MAC while the domain runs, when its network handed one
    /// out (a stopped domain's old lease is not its address).
    pub ip: Option<String>,
}

/// A DHCP lease dnsmasq handed out.
#[derive(Clone, Debug, Serialize)]
pub struct Lease {
    pub mac: String,
    pub ip: String,
    pub hostname: Option<String>,
    /// When it expires, in seconds since the epoch (None: never).
    pub expiry: Option<i64>,
    /// The client's DHCP client identifier, when it sent one.
    pub client_id: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct NetworkInfo {
    pub definition: NetworkDef,
    pub bridge: String,
    pub active: bool,
    pub leases: Vec<Lease>,
}

impl Manager {
    /// The definition the VMM gets: each interface becomes a TAP device on its network's
    /// (or the named) bridge, in `vm.nets`. Migrating in (`incoming`), a TAP the source's
    /// VMM holds on this host is kept for a VMM that takes its queues over with the VM
    /// (`takes_over_taps`), and another is made for one that opens its TAP by name.
    pub(super) fn attach_interfaces(
        &self,
        def: &DomainDef,
        incoming: bool,
        takes_over_taps: bool,
    ) -> Result<DomainDef> {
        let mut rt = def.clone();
        let mut made: Vec<String> = Vec::new();
        let r = (|| -> Result<()> {
            for (i, itf) in def.interfaces.iter().enumerate() {
                let Some(bridge) = self.bridge_of(itf)? else {
                    continue;
                };
                let mut tap = network::tap_name(def, i);
                if incoming && takes_over_taps {
                    if !network::take_over_tap(&tap, &bridge)? {
                        made.push(tap.clone());
                    }
                } else if incoming {
                    tap = network::fresh_tap_for_incoming(def, i, &bridge)?;
                    made.push(tap.clone());
                } else {
                    network::create_tap(&tap, &bridge)?;
                    made.push(tap.clone());
                }
                let mtu = self.interface_mtu(itf)?;
                if let Some(m) = mtu {
                    network::set_mtu(&tap, m)?;
                }
                rt.vm.nets.push(vmm::config::NetConfig {
                    tap,
                    mac: Some(network::mac_for(def, i)),
                    transport: itf.transport,
                    mtu: mtu.and_then(|m| u16::try_from(m).ok()),
                    queues: None,
                    rx_rate_limiter: None,
                    tx_rate_limiter: None,
                });
            }
            Ok(())
        })();
        if let Err(e) = r {
            for t in made {
                network::delete_tap(&t);
            }
            return Err(e);
        }
        Ok(rt)
    }

    /// The guest-facing MTU of this host's overlay networks (see [`network::overlay_mtu`]).
    pub(crate) fn overlay_mtu(&self) -> u32 {
        network::overlay_mtu(self.overlay_ip.get().copied())
    }

    /// The MTU an interface's TAP and virtio-net device get: an overlay network's; None
    /// (the default, 1500) elsewhere.
    pub(super) fn interface_mtu(&self, itf: &Interface) -> Result<Option<u32>> {
        Ok(match &itf.network {
            Some(n) if self.store.get_network(n)?.vni.is_some() => Some(self.overlay_mtu()),
            _ => None,
        })
    }

    /// The bridge an interface's TAP joins: its network's (which must be active) or the
    /// host bridge it names.
    pub(super) fn bridge_of(&self, itf: &Interface) -> Result<Option<String>> {
        Ok(Some(match (&itf.network, &itf.bridge) {
            (Some(n), _) => {
                let nd = self.store.get_network(n)?;
                if !network::is_active(&self.cfg.state_dir, &nd) {
                    return Err(Error::Conflict(format!(
                        "network {n:?} is not active: start it first (vessel net-start {n})"
                    )));
                }
                nd.bridge_name()
            }
            (None, Some(b)) => {
                if !network::link_exists(b) {
                    return Err(Error::invalid(
                        "interface",
                        format!("bridge {b} does not exist on this host"),
                    ));
                }
                b.clone()
            }
            (None, None) => return Ok(None),
        }))
    }

    /// Removes the TAPs of `def`'s interfaces that no VMM holds: under both of their
    /// names ([`network::other_tap_name`]).
    pub(super) fn detach_interfaces(&self, def: &DomainDef) {
        for i in 0..def.interfaces.len() {
            network::release_tap(&network::tap_name(def, i));
            network::release_tap(&network::other_tap_name(def, i));
        }
    }

    /// The TAP of a running domain's interface `i`: as its VMM got it (the live
    /// definition), else the domain's TAP name.
    pub(super) fn interface_tap(&self, def: &DomainDef, i: usize) -> String {
        self.live_definition(&def.name)
            .and_then(|l| l.vm.nets.get(def.vm.nets.len() + i).map(|n| n.tap.clone()))
            .unwrap_or_else(|| network::tap_name(def, i))
    }

    pub fn net_define(&self, mut n: NetworkDef) -> Result<NetworkInfo> {
        n.validate()?;
        if n.uuid.is_none() {
            n.uuid = Some(crate::domain::new_uuid());
        }
        // libvirt's habit: the bridge's MAC is made at define and kept in the definition.
        if n.mac.is_none() {
            n.mac = Some(network::new_bridge_mac());
        }
        let _g = lock(&self.net_lock);
        if let Some(other) = self
            .store
            .list_networks()?
            .into_iter()
            .find(|o| o.bridge_name() == n.bridge_name())
        {
            return Err(Error::Conflict(format!(
                "network {:?} already uses bridge {}",
                other.name,
                n.bridge_name()
            )));
        }
        self.store.insert_network(&n)?;
        Ok(self.net_info_of(&n))
    }

    pub(super) fn net_info_of(&self, n: &NetworkDef) -> NetworkInfo {
        let leases = std::fs::read_to_string(
            self.cfg
                .state_dir
                .join("run-net")
                .join(&n.name)
                .join("leases"),
        )
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            // dnsmasq's lease file: EXPIRY MAC IP HOSTNAME CLIENT-ID ("*" for none;
            // an expiry of 0 never ends).
            let f: Vec<&str> = l.split_whitespace().collect();
            let given = |i: usize| f.get(i).map(|s| s.to_string()).filter(|s| s != "*");
            Some(Lease {
                mac: f.get(1)?.to_string(),
                ip: f.get(2)?.to_string(),
                hostname: given(3),
                expiry: f.first().and_then(|e| e.parse().ok()).filter(|e| *e != 0),
                client_id: given(4),
            })
        })
        .collect();
        NetworkInfo {
            active: network::is_active(&self.cfg.state_dir, n),
            bridge: n.bridge_name(),
            definition: n.clone(),
            leases,
        }
    }

    pub fn net_list(&self) -> Result<Vec<NetworkInfo>> {
        Ok(self
            .store
            .list_networks()?
            .iter()
            .map(|n| self.net_info_of(n))
            .collect())
    }

    /// Announces where a domain that has just migrated in now is, for each of its
    /// interfaces (see [`network::announce`]).
    pub(super) fn announce_interfaces(&self, name: &str) {
        let Ok(def) = self.store.get_domain(name) else {
            return;
        };
        for (i, itf) in def.interfaces.iter().enumerate() {
            let Ok(Some(br)) = self.bridge_of(itf) else {
                continue;
            };
            let (tap, mac) = (self.interface_tap(&def, i), network::mac_for(&def, i));
            match network::announce(&br, &tap, &mac) {
                Ok(()) => {
                    tracing::info!(domain = name, %mac, bridge = %br, "announced after migrating in")
                }
                Err(e) => tracing::warn!(domain = name, %mac, "announcing after migrating in: {e}"),
            }
        }
    }

    pub fn net_info(&self, name: &str) -> Result<NetworkInfo> {
        Ok(self.net_info_of(&self.store.get_network(name)?))
    }

    pub fn net_start(&self, name: &str) -> Result<NetworkInfo> {
        let _g = lock(&self.net_lock);
        let mut n = self.store.get_network(name)?;
        if network::is_active(&self.cfg.state_dir, &n) {
            return Err(Error::Conflict(format!(
                "network {name:?} is already active"
            )));
        }
        // A network defined before bridges got their MAC at define gets one now, kept.
        if n.mac.is_none() {
            n.mac = Some(network::new_bridge_mac());
            self.store.update_network(&n)?;
        }
        // Half-up leftovers (dnsmasq gone, bridge still there) are cleared first.
        if network::link_exists(&n.bridge_name()) {
            network::stop(&self.cfg.state_dir, &n)?;
        }
        let mtu = n.vni.map(|_| self.overlay_mtu());
        if let Some(mut child) = network::start(&self.cfg.state_dir, &n, mtu)? {
            let nm = name.to_string();
            let _ = std::thread::Builder::new()
                .name(format!("dnsmasq-{nm}"))
                .spawn(move || {
                    if let Ok(st) = child.wait() {
                        tracing::info!(network = %nm, "dnsmasq ended: {st}");
                    }
                });
        }
        self.events.emit(name, "network-started", "active", None);
        Ok(self.net_info_of(&n))
    }

    /// Domains running with an interface on network `name`.
    fn net_users(&self, name: &str) -> Result<Vec<String>> {
        Ok(self
            .store
            .list_domains()?
            .into_iter()
            .filter(|d| {
                d.interfaces
                    .iter()
                    .any(|i| i.network.as_deref() == Some(name))
                    && self.is_active(&d.name)
            })
            .map(|d| d.name)
            .collect())
    }

    pub fn net_stop(&self, name: &str) -> Result<NetworkInfo> {
        let _g = lock(&self.net_lock);
        let n = self.store.get_network(name)?;
        let users = self.net_users(name)?;
        if !users.is_empty() {
            return Err(Error::Conflict(format!(
                "network {name:?} is in use by running domain(s) {}: stop them first",
                users.join(", ")
            )));
        }
        if !network::link_exists(&n.bridge_name()) {
            return Err(Error::Conflict(format!("network {name:?} is not active")));
        }
        network::stop(&self.cfg.state_dir, &n)?;
        self.events.emit(name, "network-stopped", "inactive", None);
        Ok(self.net_info_of(&n))
    }

    pub fn net_undefine(&self, name: &str) -> Result<()> {
        let _g = lock(&self.net_lock);
        let n = self.store.get_network(name)?;
        if network::link_exists(&n.bridge_name()) {
            return Err(Error::Conflict(format!(
                "network {name:?} is active: stop it first (vessel net-destroy {name})"
            )));
        }
        self.store.delete_network(name)
    }

    pub fn net_autostart(&self, name: &str, on: bool) -> Result<NetworkInfo> {
        let _g = lock(&self.net_lock);
        let mut n = self.store.get_network(name)?;
        n.autostart = on;
        self.store.update_network(&n)?;
        Ok(self.net_info_of(&n))
    }

    /// A domain's interfaces: where each is attached, its TAP and MAC, and the address
    /// its network's DHCP server leased to that MAC (`virsh domifaddr`).
    pub fn interfaces(&self, name: &str) -> Result<Vec<InterfaceInfo>> {
        let stored = self.store.get_domain(name)?;
        let live = !matches!(
            self.state_of(name),
            DomainState::Shutoff | DomainState::Crashed
        );
        // A running domain's interfaces as they are now (attached or detached live).
        let now = live.then(|| self.live_definition(name)).flatten();
        let def = now.as_ref().unwrap_or(&stored);
        let mut out = Vec::new();
        for (i, itf) in def.interfaces.iter().enumerate() {
            let net = now.as_ref().and_then(|d| d.vm.nets.get(i));
            let mac = net
                .and_then(|n| n.mac.clone())
                .unwrap_or_else(|| network::mac_for(def, i));
            let ip = match &itf.network {
                Some(n) if live => self.store.get_network(n).ok().and_then(|nd| {
                    self.net_info_of(&nd)
                        .leases
                        .into_iter()
                        .find(|l| l.mac.eq_ignore_ascii_case(&mac))
                        .map(|l| l.ip)
                }),
                _ => None,
            };
            out.push(InterfaceInfo {
                network: itf.network.clone(),
                bridge: itf.bridge.clone(),
                tap: live.then(|| {
                    net.map(|n| n.tap.clone())
                        .unwrap_or_else(|| network::tap_name(def, i))
                }),
                mac,
                ip,
            });
        }
        Ok(out)
    }
}
