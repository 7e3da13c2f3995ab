//! Many hosts: daemons that share their state in etcd (`vessel daemon --cluster`).
//!
//! etcd holds, under [`PREFIX`]:
//! - `hosts/H`: each host's [`HostRecord`], under the host's lease (gone when it dies);
//! - `maintenance/H`: hosts drained by `host-maintenance H on` (no lease: it outlives them);
//! - `domains/N`: each cluster domain's [`DomainRecord`] (definition, host, wanted state);
//! - `running/N`: the host that runs N now, under that host's lease: the lock that keeps a
//!   domain from ever running on two hosts (a host starts N only after creating this key);
//! - `epoch`: rewritten by every placement, so that placements are serialized by etcd's
//!   compare-and-swap instead of a lock of our own.
//!
//! Each daemon watches the prefix and reconciles the domains placed on it (define, start,
//! stop, undefine) on one thread; placement, drains and evacuation are etcd transactions
//! any daemon may run. A daemon that cannot renew its lease in time stops its own VMMs
//! before etcd lets the lease expire (fencing), so an evacuated domain never runs twice.

pub mod api;
mod images;
pub mod overlay;
pub mod placement;
pub mod quorum;
mod store;
pub mod tls;
pub mod watchdog;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{EventType, WatchOptions};

use crate::error::{Error, Result};
use crate::manager::Manager;
pub use placement::{Address, DomainRecord, Group, HostRecord, Policy, Weigher};
use quorum::Quorum;
pub use store::{Migration, State};

/// Every key the cluster writes starts with this.
pub const PREFIX: &str = "/vessel/v1/";

/// How a daemon joins a cluster (`vessel daemon --cluster …`).
#[derive(Clone, Debug)]
pub struct ClusterOpts {
    /// etcd client URLs (http://127.0.0.1:2379, …).
    pub endpoints: Vec<String>,
    pub host: String,
    /// Seconds a host stays registered after its last heartbeat.
    pub lease_ttl: u64,
    pub weigher: Weigher,
    /// Capacity to announce instead of the machine's (several test hosts share one).
    pub vcpus: Option<u64>,
    pub memory_mib: Option<u64>,
    /// Where this daemon answers, as other hosts' errors name it.
    pub api: String,
    /// Its Unix socket, and its TCP API's `HOST:PORT` when it has one.
    pub socket: String,
    pub tcp: Option<String>,
    /// The TCP API token, which every host of a cluster shares: hosts send each other
    /// live migrations and drain requests with it.
    pub token: Option<String>,
    /// This host's address on the network between the hosts: its overlay networks'
    /// VXLAN packets leave from it and come to it.
    pub overlay_ip: Option<std::net::Ipv4Addr>,
    /// TLS to etcd (for `https://` endpoints).
    pub tls: tls::EtcdTls,
}

/// One domain a drain moved, and how.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Moved {
    pub domain: String,
    pub to: String,
    /// "live", "shut off" (nothing ran: only its record moved), or "cold" (stopped here
    /// and started there) with `reason` saying why it could not move live.
    pub how: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
}

/// What one lease renewal found.
enum Renewal {
    /// etcd holds the lease, for this many more seconds.
    Alive(i64),
    /// etcd has no such lease (it expired).
    Gone,
    /// No answer, or an error: try again, elsewhere.
    Failed(String),
}

/// Work for the reconcile thread.
enum Work {
    Domain(String),
    /// Everything again (after joining, a reconnect, or a new lease).
    Resync,
    /// This host's record and overlays (a network started or stopped here).
    Host,
}

pub struct Cluster {
    pub opts: ClusterOpts,
    rt: tokio::runtime::Runtime,
    client: etcd_client::Client,
    /// One client per endpoint (with its URL), for the heartbeat to try members one
    /// by one and for telling a lost quorum from a passing error.
    members: Vec<(String, etcd_client::Client)>,
    /// What lets this host keep its VMMs while etcd has no quorum (see [`quorum`]).
    pub quorum: Quorum,
    m: Arc<Manager>,
    /// This host's current lease (0 while it has none).
    lease: AtomicI64,
    /// Set while the host has stopped its VMMs for want of a lease renewal.
    fenced: AtomicBool,
    /// The domains the last fence stopped: if etcd still holds the lease when it answers
    /// again, they start again here (their `running/N` keys are still this host's).
    fenced_names: Mutex<BTreeSet<String>>,
    work: Mutex<mpsc::Sender<Work>>,
    /// Domains whose start waits for this host's promise to run out (None: an
    /// evacuation, which a whole pass does).
    after_promise: Mutex<BTreeSet<Option<String>>>,
    /// The record this host last wrote to etcd (it is written again when it changes).
    announced: Mutex<Option<HostRecord>>,
}

/// How long one etcd request may take before the API answers that the cluster is
/// unavailable (without quorum etcd does not answer at all).
const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an operation retries etcd errors that pass.
const RETRY_FOR: Duration = Duration::from_secs(8);

/// What etcd answers while it elects a leader or a member is going away: worth a retry
/// while [`RETRY_FOR`] lasts. A request that timed out is retried too: under load an
/// election can outlast one request's [`OP_TIMEOUT`] (without quorum the retries end,
/// and the error is clear, within `RETRY_FOR` plus one `OP_TIMEOUT`).
fn is_transient(e: &Error) -> bool {
    matches!(e, Error::Cluster(m) if [
            "leader changed",
            "no leader",
            "Unavailable",
            "transport error",
            "Connection refused",
            "timed out",
            "Timeout expired",
        ]
        .iter()
        .any(|t| m.contains(t)))
}

fn unavailable(endpoints: &[String], why: impl std::fmt::Display) -> Error {
    let why = why.to_string();
    // A certificate refused is no outage: say so, not that etcd lost its quorum.
    if tls::is_tls_failure(&why) {
        return Error::Cluster(format!(
            "the cluster's etcd ({}) refused the TLS connection: {why}",
            endpoints.join(",")
        ));
    }
    Error::Cluster(format!(
        "the cluster's etcd ({}) did not answer: {why}; without an etcd quorum the cluster \
         is read-only: placement, start and drain are refused until it is back",
        endpoints.join(",")
    ))
}

pub fn key(kind: &str, name: &str) -> String {
    format!("{PREFIX}{kind}/{name}")
}

impl Cluster {
    /// Connects, registers this host under a fresh lease and starts the heartbeat, the
    /// watch and the reconcile thread.
    pub fn join(m: Arc<Manager>, opts: ClusterOpts) -> Result<Arc<Self>> {
        crate::domain::check_name("host", &opts.host)?;
        if opts.lease_ttl < 2 {
            return Err(Error::invalid("lease TTL", "use at least 2 seconds"));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("etcd")
            .enable_all()
            .build()
            .map_err(|e| Error::Cluster(format!("starting the etcd client's runtime: {e}")))?;
        let mut conn = etcd_client::ConnectOptions::new()
            .with_connect_timeout(OP_TIMEOUT)
            .with_timeout(OP_TIMEOUT);
        if let Some(t) = tls::options(&opts.endpoints, &opts.tls)? {
            conn = conn.with_tls(t);
        }
        let client = rt
            .block_on(async {
                tokio::time::timeout(
                    OP_TIMEOUT,
                    etcd_client::Client::connect(&opts.endpoints, Some(conn.clone())),
                )
                .await
            })
            .map_err(|_| unavailable(&opts.endpoints, "timed out connecting"))?
            .map_err(|e| unavailable(&opts.endpoints, tls::describe(&e)))?;
        // Channels connect lazily: a member that is down now costs nothing here.
        let members = opts
            .endpoints
            .iter()
            .filter_map(|ep| {
                rt.block_on(etcd_client::Client::connect([ep], Some(conn.clone())))
                    .ok()
                    .map(|c| (ep.clone(), c))
            })
            .collect();
        let quorum = Quorum::new(Duration::from_secs(opts.lease_ttl));
        let (tx, rx) = mpsc::channel();
        let c = Arc::new(Cluster {
            opts,
            rt,
            client,
            members,
            quorum,
            m,
            lease: AtomicI64::new(0),
            fenced: AtomicBool::new(false),
            fenced_names: Mutex::new(BTreeSet::new()),
            after_promise: Mutex::new(BTreeSet::new()),
            work: Mutex::new(tx),
            announced: Mutex::new(None),
        });
        if let Some(ip) = c.opts.overlay_ip {
            let _ = c.m.overlay_ip.set(ip);
        }
        // Before any VMM starts: none may outlive this daemon unwatched.
        watchdog::spawn(&c.m.cfg.programs.vessel, &c.m.cfg.state_dir.join("run"))?;
        if let Err(e) = c.register() {
            return Err(c.tls_refusal().unwrap_or(e));
        }
        tracing::info!(host = %c.opts.host, "joined the cluster");
        let me = c.clone();
        std::thread::Builder::new()
            .name("cluster-reconcile".into())
            .spawn(move || me.reconcile_loop(rx))
            .map_err(|e| Error::Cluster(format!("starting the reconcile thread: {e}")))?;
        let me = c.clone();
        std::thread::Builder::new()
            .name("cluster-events".into())
            .spawn(move || me.follow_events())
            .map_err(|e| Error::Cluster(format!("starting the events thread: {e}")))?;
        let me = c.clone();
        std::thread::Builder::new()
            .name("cluster-peers".into())
            .spawn(move || me.ask_peers_loop())
            .map_err(|e| Error::Cluster(format!("starting the peers thread: {e}")))?;
        let me = c.clone();
        c.rt.spawn(async move { me.heartbeat().await });
        let me = c.clone();
        c.rt.spawn(async move { me.watch_loop().await });
        Ok(c)
    }

    /// Why etcd refuses this host's TLS connections, if it does: a handshake of our own
    /// with each endpoint in turn (tonic hides the reason).
    fn tls_refusal(&self) -> Option<Error> {
        self.opts.tls.cacert.as_ref()?;
        self.opts.endpoints.iter().find_map(|ep| {
            let why = self.rt.block_on(tls::probe(ep, &self.opts.tls))?;
            tracing::error!(endpoint = %ep, "TLS to etcd: {why}");
            Some(Error::Cluster(format!(
                "the cluster's etcd ({ep}) refused the TLS connection: {why}"
            )))
        })
    }

    /// Runs one etcd request from a plain thread, bounded by [`OP_TIMEOUT`].
    fn call<T>(
        &self,
        f: impl std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        self.rt
            .block_on(async { tokio::time::timeout(OP_TIMEOUT, f).await })
            .map_err(|_| unavailable(&self.opts.endpoints, "timed out"))?
            .map_err(|e| unavailable(&self.opts.endpoints, tls::describe(&e)))
    }

    fn client(&self) -> etcd_client::Client {
        self.client.clone()
    }

    fn send(&self, w: Work) {
        if let Ok(tx) = self.work.lock() {
            let _ = tx.send(w);
        }
    }

    /// What this host announces: its capacity and what it can offer domains.
    fn record(&self) -> HostRecord {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        let mem = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .map_or(0, |kib| kib / 1024);
        let mut accelerators = vec!["emu".to_string()];
        if std::path::Path::new("/dev/kvm").exists() {
            accelerators.extend(["kvm".to_string(), "hybrid".to_string()]);
        }
        HostRecord {
            name: self.opts.host.clone(),
            // Nova's default CPU allocation ratio is 16; 4 keeps emu guests usable.
            vcpus: self.opts.vcpus.unwrap_or(cpus * 4),
            memory_mib: self.opts.memory_mib.unwrap_or(mem),
            accelerators,
            pools: self
                .m
                .store
                .list_pools()
                .map(|p| p.into_iter().map(|(n, _)| n).collect())
                .unwrap_or_default(),
            networks: self
                .m
                .store
                .list_networks()
                .map(|n| n.into_iter().map(|n| n.name).collect())
                .unwrap_or_default(),
            api: self.opts.api.clone(),
            socket: self.opts.socket.clone(),
            tcp: self.opts.tcp.clone(),
            overlay_ip: self.opts.overlay_ip,
            overlays: self
                .m
                .store
                .list_networks()
                .map(|n| n.into_iter().filter(|n| n.vni.is_some()).collect())
                .unwrap_or_default(),
        }
    }

    /// A fresh lease and this host's record under it.
    fn register(&self) -> Result<()> {
        self.rt.block_on(self.register_async())
    }

    async fn register_async(&self) -> Result<()> {
        let ttl = self.opts.lease_ttl as i64;
        let eps = &self.opts.endpoints;
        let mut c = self.client();
        let lease = tokio::time::timeout(OP_TIMEOUT, c.lease_grant(ttl, None))
            .await
            .map_err(|_| unavailable(eps, "timed out"))?
            .map_err(|e| unavailable(eps, tls::describe(&e)))?
            .id();
        let record = self.record();
        let rec = serde_json::to_vec(&record).unwrap_or_default();
        let put = etcd_client::PutOptions::new().with_lease(lease);
        tokio::time::timeout(
            OP_TIMEOUT,
            c.put(key("hosts", &self.opts.host), rec, Some(put)),
        )
        .await
        .map_err(|_| unavailable(eps, "timed out"))?
        .map_err(|e| unavailable(eps, tls::describe(&e)))?;
        if let Ok(mut a) = self.announced.lock() {
            *a = Some(record);
        }
        self.lease.store(lease, Ordering::SeqCst);
        self.quorum.registered();
        // Under a new lease the old `running/N` keys are stale and reconciling takes
        // them over as it would any.
        if let Ok(mut f) = self.fenced_names.lock() {
            f.clear();
        }
        self.fenced.store(false, Ordering::SeqCst);
        self.send(Work::Resync);
        Ok(())
    }

    /// Renews the lease every tenth of its TTL. A failed renewal is retried at once and
    /// often, each time on another etcd member (the one the stream used may be the one
    /// that went away, or may have no leader for a while), so losing one member of three
    /// changes nothing. Only when no renewal came through until shortly before the lease
    /// could expire does this host stop its VMMs (fencing: other hosts may start them once
    /// etcd expires the lease). The lease is dropped only when etcd says it is gone; if
    /// etcd still holds it when it answers again, the host carries on under it.
    async fn heartbeat(self: Arc<Self>) {
        let ttl = Duration::from_secs(self.opts.lease_ttl);
        let tick = self.quorum.tick();
        let retry = (ttl / 30).clamp(Duration::from_millis(100), Duration::from_millis(500));
        // Stopping the VMMs takes a moment; it must be over before etcd can expire the
        // lease, which is no sooner than a TTL after the last renewal was sent.
        let margin = self.quorum.margin();
        let mut holding = false;
        let mut via = 0usize;
        let mut keepalive: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)> =
            None;
        let mut held = self.lease.load(Ordering::SeqCst);
        // Registration has just renewed it.
        let mut expires = Instant::now() + ttl;
        loop {
            let lease = self.lease.load(Ordering::SeqCst);
            if lease != held {
                held = lease;
                expires = Instant::now() + ttl;
                keepalive = None;
            }
            let sent = Instant::now();
            let fence_at = expires.checked_sub(margin).unwrap_or(sent);
            let limit = tick
                .min(fence_at.saturating_duration_since(sent))
                .max(retry);
            match self.renew(lease, &mut keepalive, via, limit).await {
                Renewal::Alive(secs) => {
                    expires = sent + Duration::from_secs(secs.max(1) as u64);
                    self.quorum.renewed();
                    if holding {
                        tracing::warn!(
                            "etcd answers again and still holds this host's lease: the hold ends, its domains ran on throughout"
                        );
                        holding = false;
                    }
                    if self.fenced.load(Ordering::SeqCst) {
                        tracing::warn!(
                            "etcd answers again and still holds this host's lease: its domains start again"
                        );
                        self.fenced.store(false, Ordering::SeqCst);
                        self.send(Work::Resync);
                    }
                    tokio::time::sleep(tick).await;
                    continue;
                }
                Renewal::Gone => {
                    tracing::warn!("etcd says this host's lease expired");
                    self.lease.store(0, Ordering::SeqCst);
                    self.fence_and_rejoin().await;
                    continue;
                }
                Renewal::Failed(why) => {
                    tracing::info!(
                        "lease renewal through etcd endpoint #{via} failed ({why}): trying another"
                    );
                    keepalive = None;
                    via += 1;
                }
            }
            let hold = self.quorum.hold();
            if Instant::now() >= fence_at && hold.is_some() && !self.fenced.load(Ordering::SeqCst) {
                if !holding {
                    tracing::warn!(
                        "no lease renewal, but no other host reaches an etcd leader either and each \
                         promised to take nothing over: etcd has lost its quorum, this host keeps \
                         its domains running (the cluster is read-only)"
                    );
                    holding = true;
                }
            } else if Instant::now() >= fence_at && !self.fenced.load(Ordering::SeqCst) {
                holding = false;
                tracing::warn!(
                    "no lease renewal for {:?} (the lease may expire in {:?}): fencing this host",
                    Instant::now()
                        .saturating_duration_since(expires.checked_sub(ttl).unwrap_or(sent)),
                    expires.saturating_duration_since(Instant::now()),
                );
                let me = self.clone();
                let _ = tokio::task::spawn_blocking(move || me.fence()).await;
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// One renewal of `lease` over the open keep-alive stream, or a new stream through
    /// client `via` (round robin over the cluster client and one client per endpoint).
    async fn renew(
        &self,
        lease: i64,
        keepalive: &mut Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>,
        via: usize,
        limit: Duration,
    ) -> Renewal {
        if lease == 0 {
            return Renewal::Gone;
        }
        let r = tokio::time::timeout(limit, async {
            if let Some((keeper, stream)) = keepalive.as_mut() {
                keeper.keep_alive().await?;
                return stream.message().await.map(|m| m.map(|r| r.ttl()));
            }
            let mut c = match via % (self.members.len() + 1) {
                0 => self.client(),
                k => self.members[k - 1].1.clone(),
            };
            // Opening the stream renews the lease once (and fails if it is gone).
            let (keeper, stream) = c.lease_keep_alive(lease).await?;
            *keepalive = Some((keeper, stream));
            Ok(Some(self.opts.lease_ttl as i64))
        })
        .await;
        match r {
            Ok(Ok(Some(secs))) if secs > 0 => Renewal::Alive(secs),
            Ok(Ok(Some(_))) => Renewal::Gone,
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(m))) if m.contains("not found") => {
                Renewal::Gone
            }
            Ok(Err(e)) => Renewal::Failed(tls::describe(&e)),
            Ok(Ok(None)) => Renewal::Failed("the keep-alive stream ended".into()),
            Err(_) => Renewal::Failed(format!("no answer within {limit:?}")),
        }
    }

    /// While renewals fail, asks every other host, each tick, whether it reaches etcd
    /// (see [`quorum`]): only promises from all of them let this host keep its VMMs past
    /// the moment it would fence.
    fn ask_peers_loop(self: Arc<Self>) {
        let tick = self.quorum.tick();
        let mut last_refusal = String::new();
        loop {
            std::thread::sleep(tick);
            if self.quorum.reaches_etcd() {
                self.quorum.clear_hold();
                last_refusal.clear();
                continue;
            }
            let me = self.opts.host.clone();
            let why = self.quorum.ask_all(|h| {
                let body = serde_json::json!({"host": me});
                let v = self
                    .peer(h)
                    .with_timeout(quorum::ASK_TIMEOUT)
                    .post("/v1/cluster/promise", Some(&body))
                    .map_err(|e| e.to_string())?;
                serde_json::from_value(v).map_err(|e| e.to_string())
            });
            match why {
                Some(w) if w != last_refusal => {
                    tracing::info!("etcd does not answer, and not every other host promised: {w}");
                    last_refusal = w;
                }
                Some(_) => {}
                None => last_refusal.clear(),
            }
        }
    }

    /// Another host asks whether this one reaches etcd (and, if not, for its promise).
    pub fn promise(&self, asker: &str) -> quorum::Answer {
        self.quorum.answer(&self.opts.host, asker)
    }

    /// Asks each etcd member, briefly, whether it answers and knows a leader. Returns
    /// the message for a client when a majority lacks a leader (None while a majority
    /// has one, so that the error is worth retrying), and whether fewer than a majority
    /// answer at all (then no election can end either: no retry can help).
    pub fn no_quorum(&self) -> Option<(String, bool)> {
        let probe = Duration::from_secs(1);
        let answers: Vec<(String, std::result::Result<u64, String>)> = self.rt.block_on(async {
            let mut out = Vec::new();
            for (ep, c) in &self.members {
                let mut c = c.clone();
                let r = match tokio::time::timeout(probe, c.status()).await {
                    Ok(Ok(st)) => Ok(st.leader()),
                    Ok(Err(e)) => Err(tls::describe(&e)),
                    Err(_) => Err(format!("no answer within {probe:?}")),
                };
                out.push((ep.clone(), r));
            }
            out
        });
        let n = self.opts.endpoints.len();
        let answering = answers.iter().filter(|(_, r)| r.is_ok()).count();
        let with_leader = answers
            .iter()
            .filter(|(_, r)| matches!(r, Ok(l) if *l != 0))
            .count();
        if with_leader > n / 2 {
            return None;
        }
        let down: Vec<String> = answers
            .iter()
            .filter_map(|(ep, r)| match r {
                Ok(0) => Some(format!("{ep} answers but has no leader")),
                Ok(_) => None,
                Err(e) => Some(format!("{ep} does not answer: {e}")),
            })
            .collect();
        let msg = format!(
            "etcd has lost its quorum: {with_leader} of its {n} members answer with a leader \
             and a majority must ({}); the cluster is read-only until a majority is back: \
             placement, start, migration and drains are refused, running domains run on",
            down.join("; ")
        );
        Some((msg, answering <= n / 2))
    }

    async fn fence_and_rejoin(self: &Arc<Self>) {
        if !self.fenced.load(Ordering::SeqCst) {
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.fence()).await;
        }
        loop {
            match self.register_async().await {
                Ok(()) => {
                    tracing::info!("registered again under a new lease");
                    return;
                }
                Err(e) => tracing::debug!("registering again: {e}"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Stops every VMM of this host: its lease may be about to expire (or is gone), so
    /// other hosts may start its domains. The lease itself is kept until etcd says it is
    /// gone: a renewal that comes through after all ends the fence.
    pub fn fence(&self) {
        self.fenced.store(true, Ordering::SeqCst);
        let names: Vec<String> = self
            .m
            .list()
            .map(|l| l.into_iter().map(|d| d.name).collect())
            .unwrap_or_default();
        for n in names.iter().filter(|n| self.m.is_active(n)) {
            tracing::warn!(domain = %n, "fencing: stopping the domain, this host's lease may expire");
            if let Err(e) = self.m.destroy(n) {
                tracing::error!(domain = %n, "fencing failed: {e}");
            }
            if let Ok(mut f) = self.fenced_names.lock() {
                f.insert(n.clone());
            }
        }
    }

    /// On daemon shutdown: stop the VMMs (their lease ends with the daemon, and other
    /// hosts will start them) and hand the lease back so that they do so at once.
    pub fn leave(&self) {
        let lease = self.lease.swap(0, Ordering::SeqCst);
        self.fence();
        if lease != 0 {
            let mut c = self.client();
            let _ = self.call(c.lease_revoke(lease));
        }
    }

    /// Watches the prefix from a consistent read; on any break, reads again.
    async fn watch_loop(self: Arc<Self>) {
        loop {
            let mut c = self.client();
            let rev = match tokio::time::timeout(
                OP_TIMEOUT,
                c.get(PREFIX, Some(etcd_client::GetOptions::new().with_prefix())),
            )
            .await
            {
                Ok(Ok(r)) => r.header().map_or(0, |h| h.revision()),
                _ => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            self.send(Work::Resync);
            let opts = WatchOptions::new()
                .with_prefix()
                .with_start_revision(rev + 1);
            let (_watcher, mut stream) = match c.watch(PREFIX, Some(opts)).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::debug!("watch: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Ok(Some(resp)) = stream.message().await {
                if resp.canceled() {
                    break;
                }
                for ev in resp.events() {
                    let Some(k) = ev.kv().and_then(|kv| kv.key_str().ok()) else {
                        continue;
                    };
                    let Some(rest) = k.strip_prefix(PREFIX) else {
                        continue;
                    };
                    match rest.split_once('/') {
                        Some(("domains" | "running", n)) => self.send(Work::Domain(n.into())),
                        // A host gone (its domains go elsewhere) or come (one that did
                        // not fit anywhere may fit now).
                        Some(("hosts", h)) => {
                            let rec = (ev.event_type() == EventType::Put)
                                .then(|| {
                                    ev.kv()
                                        .and_then(|kv| serde_json::from_slice(kv.value()).ok())
                                })
                                .flatten();
                            self.quorum.watched(h, &self.opts.host, rec);
                            self.send(Work::Resync)
                        }
                        _ => {}
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A domain that starts or stops here (through the API, or a VMM that ends by
    /// itself) is reconciled too, so that its running lock follows it.
    fn follow_events(self: Arc<Self>) {
        let mut since = 0;
        loop {
            let (events, last) = self.m.events.wait(since, None, Duration::from_secs(60));
            since = last;
            for e in events {
                if e.event.starts_with("network-") {
                    self.send(Work::Host);
                } else {
                    self.send(Work::Domain(e.domain));
                }
            }
        }
    }

    fn reconcile_loop(self: Arc<Self>, rx: mpsc::Receiver<Work>) {
        loop {
            let w = match rx.recv_timeout(Duration::from_secs(5)) {
                Ok(w) => w,
                // Now and then anyway: a network defined here sends no event.
                Err(mpsc::RecvTimeoutError::Timeout) => Work::Host,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            // Coalesce a burst of events into one pass per name.
            let mut names = BTreeSet::new();
            let mut all = false;
            for w in std::iter::once(w).chain(rx.try_iter()) {
                match w {
                    Work::Domain(n) => {
                        names.insert(n);
                    }
                    Work::Resync => all = true,
                    Work::Host => {}
                }
            }
            if self.fenced.load(Ordering::SeqCst) {
                continue;
            }
            let state = match self.state() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("reconcile: {e}");
                    std::thread::sleep(Duration::from_millis(500));
                    if all {
                        self.send(Work::Resync);
                    }
                    for n in names {
                        self.send(Work::Domain(n));
                    }
                    continue;
                }
            };
            if all {
                self.evacuate(&state);
                names.extend(state.domains.keys().cloned());
            }
            self.sync_host(&state);
            let mut again = Vec::new();
            for n in names {
                if let Err(e) = self.reconcile(&n, &state) {
                    tracing::warn!(domain = %n, "reconcile: {e}");
                    if matches!(e, Error::Cluster(_)) {
                        again.push(n);
                    }
                }
            }
            // etcd did not answer: no event may come to bring these back, so try again.
            if !again.is_empty() {
                std::thread::sleep(Duration::from_millis(500));
                for n in again {
                    self.send(Work::Domain(n));
                }
            }
        }
    }

    /// Brings this host's side of one domain in line with etcd.
    /// `state` is the pass's one read: a change after it (this pass's own evacuation
    /// included) comes back as a watch event, and so as another pass. (Reading again for
    /// each domain made a full pass over n domains cost n reads of all n.)
    fn reconcile(self: &Arc<Self>, name: &str, state: &State) -> Result<()> {
        let me = self.opts.host.as_str();
        let lease = self.lease.load(Ordering::SeqCst);
        if let Some((m, _)) = state.migrations.get(name) {
            // Both ends are the migration's until it commits or gives up.
            tracing::debug!(domain = %name, "migrating from {} to {}: left alone", m.from, m.to);
            return Ok(());
        }
        let rec = state.domains.get(name).map(|(r, _)| r);
        let holder = state.running.get(name);
        // Ours under the current lease; a key of ours under an older lease (from before
        // this host fenced itself) may be taken over.
        let mine = holder.is_some_and(|h| h.host == me && h.lease == lease);
        let free = holder.is_none_or(|h| h.host == me && h.lease != lease);
        let defined = self.m.info(name).is_ok();
        let active = self.m.is_active(name);
        match rec {
            Some(r) if r.host == me => {
                if !defined {
                    images::fetch_missing(self, state, &r.def)?;
                    if r.files_recorded_on.as_deref() == Some(me) {
                        // The files this host's API checked the client's rights on:
                        // define records them again and must find the same files.
                        let recorded = r.def.clone();
                        self.m
                            .define_checked(r.def.clone(), &|now| same_files(&recorded, now))?;
                    } else {
                        self.m.define(r.def.clone())?;
                    }
                }
                if active && !mine && !free {
                    tracing::error!(domain = %name, "runs on {holder:?} too: stopping it here");
                    self.m.destroy(name)?;
                } else if active && free {
                    self.claim(name, holder.map(|h| h.mod_rev))?;
                } else if !active && mine && r.running && self.take_fenced(name) {
                    // The fence stopped it, and etcd kept the lease: it runs on here.
                    if let Err(e) = self.m.start(name) {
                        self.release(name);
                        return Err(e);
                    }
                    tracing::info!(domain = %name, "started again here after the fence");
                } else if !active && mine {
                    // It ended here (stopped through the API, or by itself). The record
                    // first: a key released before a failed record write would leave
                    // a domain wanted running and held by no one, which this host
                    // (or another) would start again.
                    if r.running {
                        self.set_running(name, false)?;
                    }
                    self.release(name);
                } else if r.running && !active && free && self.quorum.promised().is_some() {
                    // Another host may keep its VMMs on this host's promise: nothing is
                    // taken over here until it has run out.
                    tracing::info!(domain = %name, "not started yet: this host promised to take nothing over for a while");
                    self.retry_after_promise(Some(name));
                } else if r.running
                    && !active
                    && free
                    && self.claim(name, holder.map(|h| h.mod_rev))?
                {
                    if let Err(e) = self.m.start(name) {
                        self.release(name);
                        return Err(e);
                    }
                    tracing::info!(domain = %name, "started here");
                }
                // Otherwise another host still holds it: its key goes when that host
                // stops it or its lease ends, and that event brings us back.
            }
            _ => {
                // Placed elsewhere, or no longer in the cluster.
                if active {
                    tracing::info!(domain = %name, "placed on another host: stopping it here");
                    self.m.destroy(name)?;
                }
                if holder.is_some_and(|h| h.host == me) {
                    self.release(name);
                }
                if defined && self.m.info(name).is_ok() {
                    self.m.undefine(name)?;
                }
            }
        }
        Ok(())
    }

    /// Keeps this host's record (its networks and pools change) and its overlay
    /// networks in line with etcd: each VXLAN device floods to the other hosts that have
    /// the network, and each dnsmasq answers the domains placed here.
    fn sync_host(&self, state: &State) {
        let rec = self.record();
        let stale = self
            .announced
            .lock()
            .is_ok_and(|a| a.as_ref() != Some(&rec));
        let lease = self.lease.load(Ordering::SeqCst);
        if stale && lease != 0 {
            let mut c = self.client();
            let put = etcd_client::PutOptions::new().with_lease(lease);
            let body = serde_json::to_vec(&rec).unwrap_or_default();
            match self.call(c.put(key("hosts", &self.opts.host), body, Some(put))) {
                Ok(_) => {
                    tracing::info!("host record updated (networks or pools changed)");
                    if let Ok(mut a) = self.announced.lock() {
                        *a = Some(rec);
                    }
                }
                Err(e) => tracing::warn!("updating this host's record: {e}"),
            }
        }
        let nets = match self.m.store.list_networks() {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("overlays: {e}");
                return;
            }
        };
        let me = self.opts.host.as_str();
        let dir = &self.m.cfg.state_dir;
        for def in nets {
            let Some(vni) = def.vni else {
                continue;
            };
            if !crate::network::is_active(dir, &def) {
                overlay::remove(&def, vni);
                continue;
            }
            let Some(local) = self.opts.overlay_ip else {
                tracing::debug!(network = %def.name, "no --overlay-ip: the network stays on this host");
                continue;
            };
            let peers: BTreeSet<std::net::Ipv4Addr> = state
                .hosts
                .values()
                .filter(|h| h.name != me)
                .filter(|h| {
                    h.overlays
                        .iter()
                        .any(|o| o.name == def.name && o.vni == def.vni)
                })
                .filter_map(|h| h.overlay_ip)
                .collect();
            if let Err(e) = overlay::ensure(&def, vni, local, self.m.overlay_mtu(), &peers) {
                tracing::warn!(network = %def.name, "overlay: {e}");
            }
            let mut leases: Vec<(String, std::net::Ipv4Addr)> = state
                .domains
                .values()
                .filter(|(r, _)| r.host == me)
                .flat_map(|(r, _)| r.addresses.iter())
                .filter(|a| a.network == def.name)
                .map(|a| (a.mac.clone(), a.ip))
                .collect();
            leases.sort();
            match crate::network::set_cluster_leases(dir, &def, &leases) {
                Ok(true) => tracing::info!(
                    network = %def.name,
                    "DHCP here now answers the {} interface(s) placed here",
                    leases.len()
                ),
                Ok(false) => {}
                Err(e) => tracing::warn!(network = %def.name, "DHCP leases: {e}"),
            }
        }
    }

    /// Gives each interface of `def` on an overlay network of `host` its MAC (fixed
    /// from now on, wherever the domain runs) and an address unique in the cluster
    /// (placements are serialized by the epoch, so the read they start from is enough).
    fn allocate(
        state: &State,
        host: &str,
        def: &mut crate::domain::DomainDef,
    ) -> Result<Vec<Address>> {
        let Some(h) = state.hosts.get(host) else {
            return Ok(Vec::new());
        };
        let mut out: Vec<Address> = Vec::new();
        for i in 0..def.interfaces.len() {
            let Some(n) = def.interfaces[i].network.clone() else {
                continue;
            };
            let Some(net) = h.overlays.iter().find(|o| o.name == n) else {
                continue;
            };
            let mac = crate::network::mac_for(def, i);
            def.interfaces[i].mac = Some(mac.clone());
            let taken: BTreeSet<std::net::Ipv4Addr> = state
                .domains
                .values()
                .flat_map(|(r, _)| r.addresses.iter())
                .chain(out.iter())
                .filter(|a| a.network == n)
                .map(|a| a.ip)
                .collect();
            let ip = overlay::allocate(net, &mac, &taken)?;
            out.push(Address {
                network: n,
                mac,
                ip,
            });
        }
        Ok(out)
    }

    /// Reconciles `name` (None: everything) again once this host's promise has run out
    /// (one thread for all that waits on it).
    fn retry_after_promise(self: &Arc<Self>, name: Option<&str>) {
        let Some(until) = self.quorum.promised() else {
            return;
        };
        let Ok(mut waiting) = self.after_promise.lock() else {
            return;
        };
        let first = waiting.is_empty();
        waiting.insert(name.map(str::to_string));
        if !first {
            return;
        }
        let me = self.clone();
        let _ = std::thread::Builder::new()
            .name("cluster-promise".into())
            .spawn(move || {
                // A promise given meanwhile reaches further.
                let mut until = Some(until);
                while let Some(t) = until {
                    std::thread::sleep(t.saturating_duration_since(Instant::now()));
                    until = me.quorum.promised();
                }
                let names = me
                    .after_promise
                    .lock()
                    .map(|mut w| std::mem::take(&mut *w))
                    .unwrap_or_default();
                for n in names {
                    me.send(n.map_or(Work::Resync, Work::Domain));
                }
            });
    }

    /// Whether the last fence stopped `name` (forgetting it).
    fn take_fenced(&self, name: &str) -> bool {
        self.fenced_names.lock().is_ok_and(|mut f| f.remove(name))
    }

    /// Takes the `running/N` lock for this host (over a stale key of its own at
    /// `stale_rev`); false when another host got it first.
    fn claim(&self, name: &str, stale_rev: Option<i64>) -> Result<bool> {
        use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
        let lease = self.lease.load(Ordering::SeqCst);
        if lease == 0 {
            return Ok(false);
        }
        let k = key("running", name);
        let cmp = match stale_rev {
            None => Compare::create_revision(k.clone(), CompareOp::Equal, 0),
            Some(rev) => Compare::mod_revision(k.clone(), CompareOp::Equal, rev),
        };
        let txn = Txn::new().when(vec![cmp]).and_then(vec![TxnOp::put(
            k,
            self.opts.host.clone(),
            Some(PutOptions::new().with_lease(lease)),
        )]);
        let mut c = self.client();
        Ok(self.call(c.txn(txn))?.succeeded())
    }

    /// Drops the `running/N` lock if this host holds it.
    fn release(&self, name: &str) {
        use etcd_client::{Compare, CompareOp, Txn, TxnOp};
        let k = key("running", name);
        let txn = Txn::new()
            .when(vec![Compare::value(
                k.clone(),
                CompareOp::Equal,
                self.opts.host.clone(),
            )])
            .and_then(vec![TxnOp::delete(k, None)]);
        let mut c = self.client();
        if let Err(e) = self.call(c.txn(txn)) {
            tracing::warn!(domain = %name, "releasing its running key: {e}");
        }
    }

    /// Moves the domains of hosts that are gone (lease expired) to live ones. Every
    /// daemon may try; the compare-and-swap on each record lets one of them win.
    fn evacuate(self: &Arc<Self>, state: &State) {
        let mut promised = false;
        let mut lost: Vec<(String, DomainRecord, i64)> = state
            .domains
            .iter()
            .filter(|(_, (r, _))| !state.hosts.contains_key(&r.host))
            .filter(|(n, (r, _))| {
                if self.quorum.promised().is_some() {
                    promised = true;
                    return false;
                }
                let ok = self.quorum.may_take_over(&r.host);
                if !ok {
                    tracing::debug!(
                        domain = %n, host = %r.host,
                        "not evacuated by this host: it promised other hosts to take nothing \
                         over, or did not see that host alive a lease after joining"
                    );
                }
                ok
            })
            .map(|(n, (r, rev))| (n.clone(), r.clone(), *rev))
            .collect();
        if promised {
            // Nothing else brings evacuation back once the promise has run out.
            self.retry_after_promise(None);
        }
        // Each move is a transaction of its own: the domains that should run go first,
        // so that a host with many shut-off records does not hold its running ones back.
        lost.sort_by_key(|(_, r, _)| !r.running);
        for (name, rec, rev) in lost {
            match self.move_domain(state, &rec, rev) {
                Ok(to) => tracing::warn!(
                    domain = %name, from = %rec.host, to = %to,
                    "evacuated: its host's lease expired"
                ),
                // Usually another daemon moved it first.
                Err(e) => tracing::info!(domain = %name, "evacuating from {}: {e}", rec.host),
            }
        }
    }

    /// Reads everything under [`PREFIX`] in one consistent read.
    pub fn state(&self) -> Result<State> {
        let mut c = self.client();
        let t0 = Instant::now();
        let r = self.call(c.get(PREFIX, Some(etcd_client::GetOptions::new().with_prefix())))?;
        let s = State::from_response(&r);
        self.quorum.saw(&s, &self.opts.host, t0);
        Ok(s)
    }

    /// The live hosts a domain may go to now, leaving out `except`.
    fn candidates(state: &State, except: Option<&str>) -> Vec<HostRecord> {
        state
            .hosts
            .values()
            .filter(|h| !state.maintenance.contains(&h.name) && Some(h.name.as_str()) != except)
            .cloned()
            .collect()
    }

    fn records(state: &State) -> Vec<DomainRecord> {
        state.domains.values().map(|(r, _)| r.clone()).collect()
    }

    /// Places a new domain (joining server group `group`, if given) and records it; the
    /// chosen host's daemon defines it.
    pub fn define(
        &self,
        def: crate::domain::DomainDef,
        group: Option<String>,
    ) -> Result<DomainRecord> {
        self.define_recorded(def, group, None)
    }

    /// [`Cluster::define`] of a definition whose files host `recorded_on` recorded
    /// ([`DomainRecord::files_recorded_on`]).
    pub fn define_recorded(
        &self,
        def: crate::domain::DomainDef,
        group: Option<String>,
        recorded_on: Option<String>,
    ) -> Result<DomainRecord> {
        use etcd_client::{Compare, CompareOp, Txn, TxnOp};
        // Pool volumes are the chosen host's to resolve (and to fetch first when its
        // pool lacks them: see images): only the rest is checked here.
        let mut check = def.clone();
        check.vm.disks.retain(|d| {
            !d.path
                .to_str()
                .is_some_and(|p| p.starts_with(crate::domain::VOLUME_PREFIX))
        });
        check.validate()?;
        for _ in 0..10 {
            let state = self.state()?;
            if state.domains.contains_key(&def.name) {
                return Err(Error::Exists {
                    kind: "domain",
                    name: def.name,
                });
            }
            let g = match &group {
                None => None,
                Some(g) => Some(
                    state
                        .groups
                        .get(g)
                        .ok_or_else(|| Error::not_found("server group", g))?,
                ),
            };
            let host = placement::place(
                &def,
                g,
                &Self::candidates(&state, None),
                &Self::records(&state),
                self.opts.weigher,
            )
            .map_err(Error::Conflict)?;
            let mut d = def.clone();
            let addresses = Self::allocate(&state, &host, &mut d)?;
            let rec = DomainRecord {
                def: d,
                host: host.clone(),
                running: false,
                group: group.clone(),
                addresses,
                files_recorded_on: recorded_on.clone(),
            };
            let k = key("domains", &def.name);
            let mut when = vec![Compare::create_revision(k.clone(), CompareOp::Equal, 0)];
            if let Some(g) = &group {
                // The group may not go away between this read and the write.
                when.push(Compare::create_revision(
                    key("groups", g),
                    CompareOp::Greater,
                    0,
                ));
            }
            when.push(Compare::mod_revision(
                format!("{PREFIX}epoch"),
                CompareOp::Equal,
                state.epoch_rev,
            ));
            let txn = Txn::new().when(when).and_then(vec![
                TxnOp::put(k, serde_json::to_vec(&rec).unwrap_or_default(), None),
                TxnOp::put(format!("{PREFIX}epoch"), def.name.clone(), None),
            ]);
            let mut c = self.client();
            if self.call(c.txn(txn))?.succeeded() {
                tracing::info!(domain = %def.name, host = %host, "placed");
                return Ok(rec);
            }
        }
        Err(Error::Conflict(
            "placement kept racing with other placements: try again".into(),
        ))
    }

    /// Moves one recorded domain to the best other live host (evacuation and drain).
    fn move_domain(&self, state: &State, rec: &DomainRecord, rev: i64) -> Result<String> {
        use etcd_client::{Compare, CompareOp, Txn, TxnOp};
        if state.migrations.contains_key(&rec.def.name) {
            return Err(Error::Conflict(format!(
                "domain {:?} is migrating live: it moves with that migration",
                rec.def.name
            )));
        }
        let to = placement::place(
            &rec.def,
            Self::group_of(state, rec),
            &Self::candidates(state, Some(&rec.host)),
            &Self::records(state),
            self.opts.weigher,
        )
        .map_err(Error::Conflict)?;
        let k = key("domains", &rec.def.name);
        let moved = DomainRecord {
            host: to.clone(),
            ..rec.clone()
        };
        let txn = Txn::new()
            .when(vec![
                Compare::mod_revision(k.clone(), CompareOp::Equal, rev),
                Compare::create_revision(key("migrations", &rec.def.name), CompareOp::Equal, 0),
            ])
            .and_then(vec![
                TxnOp::put(k, serde_json::to_vec(&moved).unwrap_or_default(), None),
                TxnOp::put(format!("{PREFIX}epoch"), rec.def.name.clone(), None),
            ]);
        let mut c = self.client();
        if self.call(c.txn(txn))?.succeeded() {
            Ok(to)
        } else {
            Err(Error::Conflict(format!(
                "domain {:?} changed meanwhile (another daemon moved it)",
                rec.def.name
            )))
        }
    }

    /// Sets whether a recorded domain should run; None when it is not a cluster domain.
    pub fn set_running(&self, name: &str, running: bool) -> Result<Option<DomainRecord>> {
        use etcd_client::{Compare, CompareOp, Txn, TxnOp};
        for _ in 0..10 {
            let state = self.state()?;
            let Some((rec, rev)) = state.domains.get(name) else {
                return Ok(None);
            };
            if rec.running == running {
                return Ok(Some(rec.clone()));
            }
            if running {
                Self::check_group(&state, rec)?;
            }
            let k = key("domains", name);
            let next = DomainRecord {
                running,
                ..rec.clone()
            };
            let txn = Txn::new()
                .when(vec![Compare::mod_revision(
                    k.clone(),
                    CompareOp::Equal,
                    *rev,
                )])
                .and_then(vec![TxnOp::put(
                    k,
                    serde_json::to_vec(&next).unwrap_or_default(),
                    None,
                )]);
            let mut c = self.client();
            if self.call(c.txn(txn))?.succeeded() {
                return Ok(Some(next));
            }
        }
        Err(Error::Conflict(format!(
            "domain {name:?} kept changing: try again"
        )))
    }

    /// Waits until `running/N` names a host (the domain's owner started it).
    pub fn wait_running(&self, name: &str, within: Duration) -> Result<String> {
        let t0 = Instant::now();
        let k = key("running", name);
        let mut c = self.client();
        let r = self.call(c.get(k.clone(), None))?;
        if let Some(kv) = r.kvs().first() {
            return Ok(String::from_utf8_lossy(kv.value()).into_owned());
        }
        let rev = r.header().map_or(0, |h| h.revision());
        let opts = WatchOptions::new().with_start_revision(rev + 1);
        let (_w, mut stream) = self.call(c.watch(k, Some(opts)))?;
        let got = self.rt.block_on(async {
            tokio::time::timeout(within.saturating_sub(t0.elapsed()), async {
                while let Ok(Some(resp)) = stream.message().await {
                    for ev in resp.events() {
                        if ev.event_type() == EventType::Put {
                            if let Some(kv) = ev.kv() {
                                return Some(String::from_utf8_lossy(kv.value()).into_owned());
                            }
                        }
                    }
                }
                None
            })
            .await
        });
        match got {
            Ok(Some(h)) => Ok(h),
            _ => Err(Error::Conflict(format!(
                "domain {name:?} did not start within {} s: see its host's daemon log",
                within.as_secs()
            ))),
        }
    }

    /// Drains (or undrains) a host: its domains move to the others now. A running
    /// domain migrates live (its host's daemon sends it); one that cannot is stopped
    /// there and started elsewhere (cold), and the answer says why.
    pub fn set_maintenance(&self, host: &str, on: bool) -> Result<Vec<Moved>> {
        let mut c = self.client();
        let k = key("maintenance", host);
        if !on {
            self.call(c.delete(k, None))?;
            return Ok(Vec::new());
        }
        let state = self.state()?;
        // A host whose lease is gone, with domains still placed on it, which this host
        // did not evacuate (see `quorum`): whoever drains it says it is down, so its
        // records move (nothing runs there to migrate).
        let h = state.hosts.get(host).cloned();
        if h.is_none() && !state.domains.values().any(|(r, _)| r.host == host) {
            return Err(Error::not_found("host", host));
        }
        self.call(c.put(k, "on", None))?;
        let mut moved = Vec::new();
        let mut not_live = BTreeMap::new();
        let running: Vec<String> = state
            .domains
            .values()
            .filter(|(r, _)| {
                r.host == host
                    && state
                        .running
                        .get(&r.def.name)
                        .is_some_and(|x| x.host == host)
            })
            .map(|(r, _)| r.def.name.clone())
            .collect();
        for name in running {
            let live = match &h {
                _ if host == self.opts.host => self.migrate_live(&name, None),
                Some(h) => self.forward_migrate(h, &name, None),
                None => Err(Error::Conflict(format!("host {host}'s lease is gone"))),
            };
            match live {
                Ok(v) => moved.push(Moved {
                    domain: name,
                    to: v["to"].as_str().unwrap_or_default().to_string(),
                    how: "live".into(),
                    reason: None,
                    downtime_ms: v["downtime_ms"].as_f64(),
                }),
                Err(e) => {
                    tracing::warn!(domain = %name, "drain: no live migration ({e}): moving it cold");
                    not_live.insert(name, e.to_string());
                }
            }
        }
        let mut failed = Vec::new();
        for _ in 0..5 {
            let state = self.state()?;
            let todo: Vec<(DomainRecord, i64)> = state
                .domains
                .values()
                .filter(|(r, _)| r.host == host)
                .cloned()
                .collect();
            if todo.is_empty() {
                break;
            }
            failed.clear();
            for (rec, rev) in todo {
                let name = rec.def.name.clone();
                match self.move_domain(&state, &rec, rev) {
                    Ok(to) => {
                        // A domain of a host that is down and was to run starts anew
                        // on its new host: a cold move, not a shut-off one.
                        let reason = not_live.remove(&name).or_else(|| {
                            (h.is_none() && rec.running).then(|| {
                                format!("host {host} is down (its lease is gone): it starts again on {to}")
                            })
                        });
                        moved.push(Moved {
                            how: if reason.is_some() { "cold" } else { "shut off" }.into(),
                            domain: name,
                            to,
                            reason,
                            downtime_ms: None,
                        })
                    }
                    Err(e) => failed.push(e.to_string()),
                }
            }
        }
        if !failed.is_empty() {
            return Err(Error::Conflict(format!(
                "host {host} is in maintenance but some domains could not move: {}",
                failed.join("; ")
            )));
        }
        Ok(moved)
    }

    /// A client of another host's daemon: its TCP API with the cluster's token when both
    /// have one, else its Unix socket (hosts on one machine, as in the tests).
    fn peer(&self, h: &HostRecord) -> crate::client::Client {
        match (&h.tcp, &self.opts.token) {
            (Some(addr), Some(token)) => crate::client::Client::tcp(addr, token)
                .with_tls(self.m.tls.get().map(|t| t.client.clone())),
            _ => crate::client::Client::new(&h.socket),
        }
    }

    /// Asks the daemon of `h`, the domain's host, to migrate it live.
    pub fn forward_migrate(
        &self,
        h: &HostRecord,
        name: &str,
        to: Option<&str>,
    ) -> Result<serde_json::Value> {
        let body = serde_json::json!({"live": true, "to": to});
        self.peer(h)
            .post(
                &format!(
                    "/v1/domains/{}/migrate",
                    vmm::api::http::percent_encode(name)
                ),
                Some(&body),
            )
            .map_err(|e| Error::Conflict(format!("host {}'s daemon: {e}", h.name)))
    }

    fn group_of<'a>(state: &'a State, rec: &DomainRecord) -> Option<&'a Group> {
        rec.group.as_ref().and_then(|g| state.groups.get(g))
    }

    /// Refuses to start a domain where its server group forbids it (a placement made
    /// before the group's other members moved, or a record written by hand).
    fn check_group(state: &State, rec: &DomainRecord) -> Result<()> {
        let Some(g) = Self::group_of(state, rec) else {
            return Ok(());
        };
        let hosts: Vec<HostRecord> = state.hosts.values().cloned().collect();
        match placement::group_refusal(g, &rec.def.name, &rec.host, &hosts, &Self::records(state)) {
            Some(why) => Err(Error::Conflict(format!(
                "domain {:?} may not start on host {}: it would break its server group \
                 ({why}); move it (migrate, or drain the host) first",
                rec.def.name, rec.host
            ))),
            None => Ok(()),
        }
    }

    /// Live-migrates `name`, running here, to host `to` (or the one placement picks):
    /// the destination's daemon starts a VMM waiting for it, this host's VMM streams the
    /// domain to it (over TCP when both hosts have a TCP API), and once the destination
    /// runs it and the VMM here has ended, one transaction moves its record and its
    /// running lock to the destination. While `migrations/N` exists, neither host's
    /// reconciling touches the domain. Returns the VMM's report with `from` and `to`.
    pub fn migrate_live(&self, name: &str, to: Option<&str>) -> Result<serde_json::Value> {
        use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
        let me = self.opts.host.clone();
        let t0 = Instant::now();
        let state = self.state()?;
        let Some((rec, rev)) = state.domains.get(name).cloned() else {
            return Err(Error::not_found("domain", name));
        };
        if rec.host != me {
            return Err(Error::Conflict(format!(
                "domain {name:?} is placed on host {}: its daemon migrates it",
                rec.host
            )));
        }
        if !self.m.is_active(name) {
            return Err(Error::Conflict(format!(
                "domain {name:?} is not running: a shut-off domain moves with its record \
                 (host-maintenance), not live"
            )));
        }
        if state.migrations.contains_key(name) {
            return Err(Error::Conflict(format!(
                "domain {name:?} is migrating already"
            )));
        }
        let group = Self::group_of(&state, &rec);
        let records = Self::records(&state);
        let dest = match to {
            Some(h) if h == me => {
                return Err(Error::invalid(
                    "destination host",
                    format!("{name:?} runs on {h} already"),
                ))
            }
            Some(h) => {
                let Some(hr) = state.hosts.get(h) else {
                    return Err(Error::not_found("host", h));
                };
                if state.maintenance.contains(h) {
                    return Err(Error::Conflict(format!("host {h} is in maintenance")));
                }
                placement::place(
                    &rec.def,
                    group,
                    std::slice::from_ref(hr),
                    &records,
                    self.opts.weigher,
                )
                .map_err(Error::Conflict)?
            }
            None => placement::place(
                &rec.def,
                group,
                &Self::candidates(&state, Some(&me)),
                &records,
                self.opts.weigher,
            )
            .map_err(Error::Conflict)?,
        };
        let Some(dh) = state.hosts.get(&dest).cloned() else {
            return Err(Error::not_found("host", &dest));
        };
        let lease = self.lease.load(Ordering::SeqCst);
        if lease == 0 {
            return Err(Error::Cluster(format!(
                "host {me} has lost its etcd lease: no migration until it is back"
            )));
        }
        let mk = key("migrations", name);
        let mig = Migration {
            from: me.clone(),
            to: dest.clone(),
        };
        let txn = Txn::new()
            .when(vec![
                Compare::mod_revision(key("domains", name), CompareOp::Equal, rev),
                Compare::create_revision(mk.clone(), CompareOp::Equal, 0),
            ])
            .and_then(vec![TxnOp::put(
                mk.clone(),
                serde_json::to_vec(&mig).unwrap_or_default(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let mut c = self.client();
        if !self.call(c.txn(txn))?.succeeded() {
            return Err(Error::Conflict(format!(
                "domain {name:?} changed meanwhile: try again"
            )));
        }
        let (target, token) = match (&dh.tcp, &self.opts.token) {
            (Some(addr), Some(t)) => (format!("tcp://{addr}"), Some(t.as_str())),
            _ => (dh.socket.clone(), None),
        };
        tracing::info!(domain = %name, to = %dest, via = %target, "migrating live");
        let sent = self.m.migrate_out(name, &target, token, true, false);
        let report = match sent {
            Ok(r) => r,
            Err(e) => {
                let _ = self.call(c.delete(mk, None));
                let still = if self.m.is_active(name) {
                    "it runs on here"
                } else {
                    "it is no longer running here"
                };
                return Err(Error::Conflict(format!(
                    "live migration of {name:?} to host {dest} failed: {e}; {still}"
                )));
            }
        };
        self.commit_migration(name, &mig)?;
        tracing::info!(domain = %name, to = %dest, "migrated live");
        let mut out = serde_json::json!({"domain": name, "from": me, "to": dest});
        if let (Some(o), Some(r)) = (out.as_object_mut(), report.as_object()) {
            for (k, v) in r {
                o.entry(k.clone()).or_insert(v.clone());
            }
            o.insert(
                "cluster_ms".into(),
                serde_json::json!(t0.elapsed().as_secs_f64() * 1000.0),
            );
        }
        Ok(out)
    }

    /// After the destination runs the domain: its record, its running lock (under the
    /// destination's lease) and the end of the migration, in one transaction.
    fn commit_migration(&self, name: &str, mig: &Migration) -> Result<()> {
        const CHANGED: &str = "the cluster changed meanwhile";
        use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
        let mk = key("migrations", name);
        let mut last = String::new();
        // The destination runs the only copy now: an etcd that is away for a moment (a
        // leader election takes a second or two) must not make this give up, so waits
        // between tries double from 50 ms to 2 s (about 9 s in all).
        let mut wait = Duration::from_millis(50);
        for attempt in 0..10 {
            if attempt > 0 && !last.is_empty() && last != CHANGED {
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            let state = match self.state() {
                Ok(s) => s,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            let (Some((rec, rev)), Some((_, mrev))) =
                (state.domains.get(name), state.migrations.get(name))
            else {
                last = "its record or its migration key is gone".into();
                break;
            };
            let Some(&dest_lease) = state.leases.get(&mig.to) else {
                last = format!("host {} lost its lease", mig.to);
                break;
            };
            let moved = DomainRecord {
                host: mig.to.clone(),
                running: true,
                ..rec.clone()
            };
            let txn = Txn::new()
                .when(vec![
                    Compare::mod_revision(key("domains", name), CompareOp::Equal, *rev),
                    Compare::mod_revision(mk.clone(), CompareOp::Equal, *mrev),
                    Compare::lease(key("hosts", &mig.to), CompareOp::Equal, dest_lease),
                ])
                .and_then(vec![
                    TxnOp::put(
                        key("domains", name),
                        serde_json::to_vec(&moved).unwrap_or_default(),
                        None,
                    ),
                    TxnOp::put(
                        key("running", name),
                        mig.to.clone(),
                        Some(PutOptions::new().with_lease(dest_lease)),
                    ),
                    TxnOp::delete(mk.clone(), None),
                    TxnOp::put(format!("{PREFIX}epoch"), name.to_string(), None),
                ]);
            let mut c = self.client();
            match self.call(c.txn(txn)) {
                Ok(r) if r.succeeded() => return Ok(()),
                Ok(_) => last = CHANGED.into(),
                Err(e) => last = e.to_string(),
            }
        }
        let mut c = self.client();
        let _ = self.call(c.delete(mk, None));
        Err(Error::Conflict(format!(
            "domain {name:?} runs on host {} now, but recording it failed ({last}): the \
             cluster's reconciling settles it",
            mig.to
        )))
    }

    /// Creates a server group (Nova's): domains join it at define.
    pub fn create_group(&self, name: &str, policy: Policy) -> Result<Group> {
        use etcd_client::{Compare, CompareOp, Txn, TxnOp};
        crate::domain::check_name("server group", name)?;
        let g = Group {
            name: name.to_string(),
            policy,
        };
        let k = key("groups", name);
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                k.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(
                k,
                serde_json::to_vec(&g).unwrap_or_default(),
                None,
            )]);
        let mut c = self.client();
        if self.call(c.txn(txn))?.succeeded() {
            Ok(g)
        } else {
            Err(Error::Exists {
                kind: "server group",
                name: name.to_string(),
            })
        }
    }

    /// Deletes a server group that has no members left.
    pub fn delete_group(&self, name: &str) -> Result<()> {
        use etcd_client::{Compare, CompareOp, Txn, TxnOp};
        let state = self.state()?;
        if !state.groups.contains_key(name) {
            return Err(Error::not_found("server group", name));
        }
        let members = Self::members(&state, name);
        if !members.is_empty() {
            return Err(Error::Conflict(format!(
                "server group {name:?} still has members: {}",
                members.join(", ")
            )));
        }
        // The epoch: no define may join it meanwhile.
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(
                format!("{PREFIX}epoch"),
                CompareOp::Equal,
                state.epoch_rev,
            )])
            .and_then(vec![
                TxnOp::delete(key("groups", name), None),
                TxnOp::put(format!("{PREFIX}epoch"), name.to_string(), None),
            ]);
        let mut c = self.client();
        if self.call(c.txn(txn))?.succeeded() {
            Ok(())
        } else {
            Err(Error::Conflict(
                "the cluster changed meanwhile: try again".into(),
            ))
        }
    }

    fn members(state: &State, group: &str) -> Vec<String> {
        state
            .domains
            .values()
            .filter(|(r, _)| r.group.as_deref() == Some(group))
            .map(|(r, _)| r.def.name.clone())
            .collect()
    }

    /// Server groups with their policy and members (and the hosts these are on).
    pub fn groups(&self) -> Result<Vec<serde_json::Value>> {
        let state = self.state()?;
        Ok(state
            .groups
            .values()
            .map(|g| {
                let members: Vec<serde_json::Value> = state
                    .domains
                    .values()
                    .filter(|(r, _)| r.group.as_deref() == Some(g.name.as_str()))
                    .map(|(r, _)| serde_json::json!({"name": r.def.name, "host": r.host}))
                    .collect();
                serde_json::json!({"name": g.name, "policy": g.policy, "members": members})
            })
            .collect())
    }

    /// Forgets a cluster domain (after its host undefined it).
    pub fn forget(&self, name: &str) -> Result<()> {
        let mut c = self.client();
        self.call(c.delete(key("domains", name), None))?;
        Ok(())
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// Hosts with what is placed on them, for `host-list` and `host-info`.
    pub fn hosts(&self) -> Result<BTreeMap<String, serde_json::Value>> {
        let state = self.state()?;
        let records = Self::records(&state);
        let mut out = BTreeMap::new();
        for h in state.hosts.values() {
            let u = placement::usage(&h.name, &records);
            let domains: Vec<serde_json::Value> = state
                .domains
                .values()
                .filter(|(r, _)| r.host == h.name)
                .map(|(r, _)| {
                    serde_json::json!({
                        "name": r.def.name,
                        "running": state.running.get(&r.def.name).is_some_and(|x| x.host == h.name),
                        "wanted": if r.running { "running" } else { "shutoff" },
                        "addresses": r.addresses,
                    })
                })
                .collect();
            out.insert(
                h.name.clone(),
                serde_json::json!({
                    "host": h,
                    "maintenance": state.maintenance.contains(&h.name),
                    "used": u,
                    "domains": domains,
                }),
            );
        }
        // Hosts whose lease is gone while domains are still placed on them: evacuation
        // has not moved them (yet, or at all: see `quorum`), and the operator drains
        // such a host with `host-maintenance H on`.
        for r in records
            .iter()
            .filter(|r| !state.hosts.contains_key(&r.host))
        {
            let e = out.entry(r.host.clone()).or_insert_with(|| {
                serde_json::json!({
                    "host": {"name": r.host},
                    "down": true,
                    "maintenance": state.maintenance.contains(&r.host),
                    "used": placement::usage(&r.host, &records),
                    "domains": [],
                })
            });
            if let Some(d) = e["domains"].as_array_mut() {
                d.push(serde_json::json!({
                    "name": r.def.name,
                    "running": false,
                    "wanted": if r.running { "running" } else { "shutoff" },
                    "addresses": r.addresses,
                }));
            }
        }
        Ok(out)
    }
}

/// Refuses a definition whose files, as define recorded them now (`now`), are not the
/// ones recorded when the API checked the client's rights on them (`recorded`): each
/// boot file and each file of each disk's chain must lead to the same place and be the
/// same file (device, inode, birth time), as a single host's start compares them.
pub(crate) fn same_files(
    recorded: &crate::domain::DomainDef,
    now: &crate::domain::DomainDef,
) -> Result<()> {
    let differs = |what: &std::path::Path, why: &str| {
        Err(Error::Forbidden(format!(
            "{}: {why} since the cluster's API checked it: the definition's files must \
             stay put until its host has defined it",
            what.display()
        )))
    };
    for (key, was) in &recorded.boot_files {
        let Some(is) = now.boot_files.get(key) else {
            return differs(&was.real, "gone");
        };
        if is.real != was.real {
            return differs(&was.real, "another path");
        }
        if let (Some(a), Some(b)) = (&was.id, &is.id) {
            if !a.matches(b) {
                return differs(&was.real, a.difference(b));
            }
        }
    }
    for (key, was) in &recorded.chains {
        let Some(is) = now.chains.get(key) else {
            return differs(std::path::Path::new(key), "gone");
        };
        if is.len() != was.len() {
            return differs(std::path::Path::new(key), "another backing chain");
        }
        for (a, b) in was.iter().zip(is) {
            if a.real != b.real || a.format != b.format {
                return differs(&a.real, "another file or format");
            }
            if let (Some(x), Some(y)) = (&a.id, &b.id) {
                if !x.matches(y) {
                    return differs(&a.real, x.difference(y));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod same_files_tests {
    use super::*;

    /// Issue 22: the placed host's define must find the files the cluster's API recorded
    /// and checked: a kernel or disk renamed away and replaced by another file under the
    /// same name is refused; the same files pass.
    #[test]
    fn a_file_replaced_after_the_api_recorded_it_is_refused() {
        let dir = std::env::temp_dir().join(format!("vm-samefiles-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (kernel, disk) = (dir.join("vmlinuz"), dir.join("d.raw"));
        std::fs::write(&kernel, vec![1u8; 4096]).unwrap();
        std::fs::write(&disk, vec![0u8; 1 << 16]).unwrap();
        let mut def: crate::domain::DomainDef = serde_json::from_value(serde_json::json!({
            "name": "s", "vm": {"kernel": kernel, "memory_mib": 64, "accel": "emu",
                "disks": [{"path": disk, "format": "raw"}]}
        }))
        .unwrap();
        crate::disk_chain::record_all(&mut def).unwrap();
        crate::boot_files::record_all(&mut def).unwrap();
        assert!(!def.boot_files.is_empty() && !def.chains.is_empty());
        let recorded = def.clone();
        let again = |d: &crate::domain::DomainDef| {
            let mut now = d.clone();
            crate::disk_chain::record_all(&mut now).unwrap();
            crate::boot_files::record_all(&mut now).unwrap();
            now
        };
        same_files(&recorded, &again(&def)).unwrap();
        for f in [&kernel, &disk] {
            let away = f.with_extension("away");
            std::fs::rename(f, &away).unwrap();
            std::fs::copy(&away, f).unwrap();
            let e = same_files(&recorded, &again(&def)).unwrap_err();
            assert!(
                matches!(&e, Error::Forbidden(m) if m.contains("another file is there now")),
                "{}: {e}",
                f.display()
            );
            std::fs::rename(&away, f).unwrap();
            same_files(&recorded, &again(&def)).unwrap();
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
