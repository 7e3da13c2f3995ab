//! Riding out the loss of etcd's quorum without fencing healthy hosts, and without
//! split-brain.
//!
//! A host that cannot renew its lease cannot tell, from etcd alone, whether etcd has no
//! quorum at all (then no lease can expire: expiry is the leader's act, and a newly
//! elected leader gives every lease a whole TTL again) or whether it is cut off from a
//! majority that has a leader (then its lease expires there and other hosts take its
//! domains). So it asks the other hosts, over their APIs:
//!
//! - A host that cannot reach an etcd leader either answers with a **promise**: for one
//!   lease TTL from its answer it starts no domain it has to take over (an evacuated
//!   one, or any whose `running/N` key it would create anew) and moves no lost host's
//!   domains. A host that reaches etcd says so, and promises nothing.
//! - A host whose renewals fail keeps its VMMs past the moment it would fence only
//!   while it holds promises from **every** other host it last read in etcd, each at
//!   most a TTL (less the fencing margin) old; otherwise it fences as before.
//! - A host takes over the domains of a lost host only if, under its current
//!   registration, it read that host's key at least a TTL plus [`SEEN_MARGIN`] after
//!   registering: the lost host then renewed its lease after this host had joined, and
//!   so counted it among the hosts whose promises it needs. (A host that joins, or
//!   registers again, while another is cut off does not evacuate that one: drain it,
//!   `host-maintenance H on`, once it is known to be down.)
//!
//! Together: any host that could start a domain of the held host has either promised
//! (and waits out its promise, which outlasts the hold) or is not among the hosts the
//! held host asked (and may not take the domain over).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::placement::HostRecord;
use super::State;

/// How long after a host joined another host's key must still have been read for the
/// joined host to take over that host's domains once it is gone: covers the lost host
/// learning of the new one (a watch event and a read) while it still reached etcd.
pub const SEEN_MARGIN: Duration = Duration::from_secs(2);

/// How long a promise request to another host may take.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// What a host asked for its promise answered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Answer {
    /// The host that answered.
    pub host: String,
    /// Whether it reaches an etcd leader (then it promises nothing).
    pub etcd: bool,
    /// How long it promised to start nothing it would take over (when `etcd` is false).
    #[serde(default)]
    pub promise_ms: u64,
}

/// The quorum-loss bookkeeping of one host.
pub struct Quorum {
    ttl: Duration,
    /// The other hosts as this host last read them from etcd: whom it asks.
    peers: Mutex<BTreeMap<String, HostRecord>>,
    /// When a read under the current registration last showed each host (the read's
    /// start: the key was there no earlier than that).
    seen: Mutex<BTreeMap<String, Instant>>,
    registered_at: Mutex<Instant>,
    last_renewed: Mutex<Instant>,
    /// Until when this host promised to take nothing over.
    promised_until: Mutex<Option<Instant>>,
    /// Until when the promises of every other host let this host keep its VMMs without
    /// a renewal.
    hold_until: Mutex<Option<Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Quorum {
    pub fn new(ttl: Duration) -> Quorum {
        let now = Instant::now();
        Quorum {
            ttl,
            peers: Mutex::new(BTreeMap::new()),
            seen: Mutex::new(BTreeMap::new()),
            registered_at: Mutex::new(now),
            last_renewed: Mutex::new(now),
            promised_until: Mutex::new(None),
            hold_until: Mutex::new(None),
        }
    }

    /// The fencing margin: the VMMs must have stopped this long before a lease (or a
    /// promise) could run out.
    pub fn margin(&self) -> Duration {
        (self.ttl / 4).max(Duration::from_secs(1)).min(self.ttl / 2)
    }

    /// Renewals (and the heartbeat's retries) come this often.
    pub fn tick(&self) -> Duration {
        (self.ttl / 10).max(Duration::from_millis(200))
    }

    /// A fresh lease: hosts seen under the old one no longer count.
    pub fn registered(&self) {
        let now = Instant::now();
        *lock(&self.registered_at) = now;
        *lock(&self.last_renewed) = now;
        lock(&self.seen).clear();
    }

    pub fn renewed(&self) {
        *lock(&self.last_renewed) = Instant::now();
    }

    /// Whether renewals come through (the last within three ticks).
    pub fn reaches_etcd(&self) -> bool {
        lock(&self.last_renewed).elapsed() < self.tick() * 3
    }

    /// A read of the whole prefix, started at `t0`, succeeded.
    pub fn saw(&self, state: &State, me: &str, t0: Instant) {
        let mut seen = lock(&self.seen);
        for h in state.hosts.keys() {
            seen.insert(h.clone(), t0);
        }
        *lock(&self.peers) = state
            .hosts
            .iter()
            .filter(|(n, _)| n.as_str() != me)
            .map(|(n, r)| (n.clone(), r.clone()))
            .collect();
    }

    /// A watch event on a host's key: `rec` is its new record, None when it went.
    pub fn watched(&self, name: &str, me: &str, rec: Option<HostRecord>) {
        if name == me {
            return;
        }
        let mut peers = lock(&self.peers);
        match rec {
            Some(r) => {
                peers.insert(name.to_string(), r);
            }
            None => {
                peers.remove(name);
            }
        }
    }

    pub fn peers(&self) -> Vec<HostRecord> {
        lock(&self.peers).values().cloned().collect()
    }

    /// Whether a promise this host gave still binds it.
    pub fn promised(&self) -> Option<Instant> {
        lock(&self.promised_until).filter(|t| *t > Instant::now())
    }

    /// Whether this host may take over the domains of `host`, whose key is gone.
    pub fn may_take_over(&self, host: &str) -> bool {
        if self.promised().is_some() {
            return false;
        }
        let since = *lock(&self.registered_at) + self.ttl + SEEN_MARGIN;
        lock(&self.seen).get(host).is_some_and(|t| *t >= since)
    }

    /// Answers another host's request for a promise (`POST /v1/cluster/promise`).
    pub fn answer(&self, me: &str, asker: &str) -> Answer {
        if self.reaches_etcd() {
            return Answer {
                host: me.to_string(),
                etcd: true,
                promise_ms: 0,
            };
        }
        let until = Instant::now() + self.ttl;
        let mut p = lock(&self.promised_until);
        if p.is_none_or(|t| t < until) {
            *p = Some(until);
        }
        tracing::info!(
            asker = %asker,
            "no etcd leader here either: promised to take no domain over for {:?}",
            self.ttl
        );
        Answer {
            host: me.to_string(),
            etcd: false,
            promise_ms: self.ttl.as_millis() as u64,
        }
    }

    /// Until when this host may keep its VMMs without a renewal, if every other host
    /// promised.
    pub fn hold(&self) -> Option<Instant> {
        lock(&self.hold_until).filter(|t| *t > Instant::now())
    }

    pub fn clear_hold(&self) {
        *lock(&self.hold_until) = None;
    }

    /// One round of asking: `ask` puts the question to one host. Every other host must
    /// promise for the hold to reach further; an answer that does not (a host that
    /// reaches etcd, or no answer) leaves the hold to run out. Returns why it did not
    /// extend, if it did not.
    pub fn ask_all(
        &self,
        ask: impl Fn(&HostRecord) -> Result<Answer, String> + Sync,
    ) -> Option<String> {
        let round = Instant::now();
        let peers = self.peers();
        let answers: Vec<(String, Result<Answer, String>)> = std::thread::scope(|s| {
            let handles: Vec<_> = peers
                .iter()
                .map(|h| (h.name.clone(), s.spawn(|| ask(h))))
                .collect();
            handles
                .into_iter()
                .map(|(n, j)| {
                    (
                        n,
                        j.join()
                            .unwrap_or_else(|_| Err("the request panicked".into())),
                    )
                })
                .collect()
        });
        let mut refused = Vec::new();
        for (n, a) in answers {
            match a {
                Ok(a)
                    if !a.etcd
                        && a.host == n
                        && Duration::from_millis(a.promise_ms) >= self.ttl => {}
                Ok(a) if a.etcd => refused.push(format!("host {n} reaches etcd")),
                Ok(a) => refused.push(format!("host {n} answered {a:?}")),
                Err(e) => refused.push(format!("host {n} did not answer ({e})")),
            }
        }
        if !refused.is_empty() {
            return Some(refused.join("; "));
        }
        if let Some(until) = (round + self.ttl).checked_sub(self.margin()) {
            let mut h = lock(&self.hold_until);
            if h.is_none_or(|t| t < until) {
                *h = Some(until);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(n: &str) -> HostRecord {
        HostRecord {
            name: n.into(),
            vcpus: 1,
            memory_mib: 1,
            accelerators: vec![],
            pools: vec![],
            networks: vec![],
            api: String::new(),
            socket: String::new(),
            tcp: None,
            overlay_ip: None,
            overlays: vec![],
        }
    }

    fn state(hosts: &[&str]) -> State {
        State {
            hosts: hosts.iter().map(|h| (h.to_string(), host(h))).collect(),
            ..State::default()
        }
    }

    #[test]
    fn a_hold_needs_every_peer_to_promise() {
        let q = Quorum::new(Duration::from_secs(6));
        q.saw(&state(&["a", "b", "c"]), "a", Instant::now());
        assert_eq!(q.peers().len(), 2);
        let promise = |h: &HostRecord| {
            Ok(Answer {
                host: h.name.clone(),
                etcd: false,
                promise_ms: 6000,
            })
        };
        assert_eq!(q.ask_all(promise), None);
        let held = q.hold().expect("held");
        // A TTL from the round, less the margin.
        assert!(held > Instant::now() + Duration::from_secs(4));
        assert!(held <= Instant::now() + Duration::from_millis(4500));
        q.clear_hold();
        let one_reaches = |h: &HostRecord| {
            Ok(Answer {
                host: h.name.clone(),
                etcd: h.name == "c",
                promise_ms: 6000,
            })
        };
        assert!(q
            .ask_all(one_reaches)
            .unwrap()
            .contains("host c reaches etcd"));
        assert_eq!(q.hold(), None);
        let one_silent = |h: &HostRecord| {
            if h.name == "b" {
                Err("refused".into())
            } else {
                promise(h)
            }
        };
        assert!(q
            .ask_all(one_silent)
            .unwrap()
            .contains("host b did not answer"));
        // A short promise, or one for another host, does not count.
        let short = |h: &HostRecord| {
            Ok(Answer {
                host: h.name.clone(),
                etcd: false,
                promise_ms: 10,
            })
        };
        assert!(q.ask_all(short).is_some());
        assert_eq!(q.hold(), None);
    }

    #[test]
    fn a_host_that_reaches_etcd_promises_nothing() {
        let q = Quorum::new(Duration::from_secs(6));
        q.renewed();
        let a = q.answer("a", "b");
        assert!(a.etcd);
        assert_eq!(q.promised(), None);
        // Renewals stopped three ticks ago.
        *lock(&q.last_renewed) = Instant::now() - Duration::from_secs(2);
        let a = q.answer("a", "b");
        assert!(!a.etcd && a.promise_ms == 6000, "{a:?}");
        assert!(q.promised().is_some());
        // Bound by it: no takeover, even of a host seen long after joining.
        *lock(&q.registered_at) = Instant::now() - Duration::from_secs(60);
        q.saw(&state(&["a", "b"]), "a", Instant::now());
        assert!(!q.may_take_over("b"));
        *lock(&q.promised_until) = None;
        assert!(q.may_take_over("b"));
    }

    #[test]
    fn only_hosts_seen_a_lease_after_joining_are_taken_over() {
        let q = Quorum::new(Duration::from_secs(6));
        q.registered();
        q.saw(&state(&["a", "b"]), "a", Instant::now());
        assert!(!q.may_take_over("b"), "seen only right after joining");
        assert!(!q.may_take_over("z"), "never seen");
        *lock(&q.registered_at) = Instant::now() - Duration::from_secs(9);
        assert!(q.may_take_over("b"));
        // Registering again forgets what was seen before.
        q.registered();
        assert!(!q.may_take_over("b"));
        q.watched("b", "a", None);
        assert!(q.peers().is_empty());
    }
}
