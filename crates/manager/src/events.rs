//! State-change events a client can watch: a bounded in-memory log with sequence numbers
//! and a long-poll wait (`GET /v1/events?since=N&timeout=S`).

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

const KEEP: usize = 4096;

#[derive(Clone, Debug, Serialize)]
pub struct Event {
    pub seq: u64,
    /// Seconds since the Unix epoch.
    pub time: f64,
    pub domain: String,
    /// defined, undefined, started, shutdown-requested, stopped, suspended, resumed, rebooted,
    /// crashed, adopted.
    pub event: String,
    /// The domain's state after the event.
    pub state: String,
    /// libvirt's reason for that state ("booted", "destroyed", "migrated" …), for the
    /// events that change it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Default)]
pub struct Events {
    log: Mutex<(u64, VecDeque<Event>)>,
    cv: Condvar,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

impl Events {
    pub fn emit(&self, domain: &str, event: &str, state: &str, detail: Option<String>) {
        self.emit_with(domain, event, state, None, detail)
    }

    /// [`Events::emit`] for an event that changed the domain's state, with its reason.
    pub fn emit_with(
        &self,
        domain: &str,
        event: &str,
        state: &str,
        reason: Option<&'static str>,
        detail: Option<String>,
    ) {
        let mut g = self.log.lock().unwrap_or_else(|p| p.into_inner());
        g.0 += 1;
        let e = Event {
            seq: g.0,
            time: now(),
            domain: domain.to_string(),
            event: event.to_string(),
            state: state.to_string(),
            reason,
            detail,
        };
        tracing::info!(domain, event, state, "event");
        g.1.push_back(e);
        while g.1.len() > KEEP {
            g.1.pop_front();
        }
        self.cv.notify_all();
    }

    /// The sequence number of the latest event.
    pub fn last_seq(&self) -> u64 {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    /// Events after `since` (for `domain` when given), waiting up to `timeout` for one.
    pub fn wait(&self, since: u64, domain: Option<&str>, timeout: Duration) -> (Vec<Event>, u64) {
        let deadline = Instant::now() + timeout;
        let mut g = self.log.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let found: Vec<Event> =
                g.1.iter()
                    .filter(|e| e.seq > since && domain.is_none_or(|d| d == e.domain))
                    .cloned()
                    .collect();
            let now = Instant::now();
            if !found.is_empty() || now >= deadline {
                return (found, g.0);
            }
            g = self
                .cv
                .wait_timeout(g, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn long_poll_wakes_on_an_event() {
        let ev = Arc::new(Events::default());
        ev.emit("a", "defined", "shut off", None);
        let (got, last) = ev.wait(0, None, Duration::ZERO);
        assert_eq!((got.len(), last), (1, 1));
        let e2 = ev.clone();
        let t = std::thread::spawn(move || e2.wait(1, Some("b"), Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(50));
        ev.emit("a", "started", "running", None);
        ev.emit("b", "started", "running", None);
        let (got, _) = t.join().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].domain, "b");
        let (none, _) = ev.wait(3, None, Duration::from_millis(10));
        assert!(none.is_empty());
    }
}
