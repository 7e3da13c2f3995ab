//! The manager's runtime table: per domain its libvirt state and reason (changed only
//! through [`state::next`]), its VMM while it has one, and what the manager is ending it
//! for, all under one lock with a condition variable that wakes every waiter at each
//! change.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{lock, Manager};
use crate::domain::DomainState;
use crate::driver::ProcId;
use crate::error::Result;
use crate::state::{self, End, Event, Reason};

/// A running VMM.
#[derive(Clone, Debug)]
pub(super) struct Vmm {
    pub(super) id: ProcId,
    /// Bumped at every start, so a stale supervisor cannot end a newer run.
    pub(super) generation: u64,
    pub(super) started: Instant,
}

/// One domain's row in the runtime table: its libvirt state and reason, changed only
/// through [`state::next`], and its VMM while it has one.
#[derive(Clone, Debug)]
pub(super) struct Runtime {
    pub(super) state: DomainState,
    pub(super) reason: Reason,
    pub(super) vmm: Option<Vmm>,
    /// Between a guest reboot and its VMM's restart: running, with no VMM.
    pub(super) restarting: bool,
    /// What the manager is ending the VMM for (destroy, save, migrate), so its end is
    /// recorded as that and not read from its exit status.
    pub(super) ending: Option<End>,
    /// Why it last stopped, in words (the state and reason are kept, never inferred from
    /// these).
    pub(super) why: Option<String>,
}

impl Runtime {
    pub(super) fn active(&self) -> bool {
        self.vmm.is_some() || self.restarting
    }
}

/// Every domain's runtime row under one lock, and a condition variable signalled at
/// every change, which waiters (destroy, shutdown --wait, reboot, migration) sleep on.
#[derive(Debug, Default)]
pub(super) struct Table {
    pub(super) rows: Mutex<HashMap<String, Runtime>>,
    pub(super) changed: Condvar,
}

impl Manager {
    /// The runtime table, for one short look or change (never held across a driver call).
    pub(super) fn rows(&self) -> MutexGuard<'_, HashMap<String, Runtime>> {
        lock(&self.table.rows)
    }

    /// Changes a domain's row and wakes whoever waits on the table.
    pub(super) fn update<T>(&self, name: &str, f: impl FnOnce(&mut Runtime) -> T) -> T {
        let mut rows = self.rows();
        let row = rows.entry(name.to_string()).or_insert_with(|| Runtime {
            state: DomainState::Shutoff,
            reason: Reason::Unknown,
            vmm: None,
            restarting: false,
            ending: None,
            why: None,
        });
        let out = f(row);
        drop(rows);
        self.table.changed.notify_all();
        out
    }

    /// Waits until `done` holds for the domain's row (None: no row), or `limit` passes;
    /// returns whether it held.
    pub(super) fn wait_for(
        &self,
        name: &str,
        limit: Duration,
        done: impl Fn(Option<&Runtime>) -> bool,
    ) -> bool {
        let deadline = Instant::now() + limit;
        let mut rows = self.rows();
        loop {
            if done(rows.get(name)) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            rows = self
                .table
                .changed
                .wait_timeout(rows, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Applies `event` to the domain's state through the state machine.
    pub(super) fn transition(&self, name: &str, event: Event) -> Result<(DomainState, Reason)> {
        self.update(name, |r| {
            let (state, reason) = state::next(r.state, event, name)?;
            r.state = state;
            r.reason = reason;
            Ok((state, reason))
        })
    }

    /// The names of the domains with a VMM.
    pub(crate) fn running_names(&self) -> Vec<String> {
        self.rows()
            .iter()
            .filter(|(_, r)| r.vmm.is_some())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Emits a state-changing event with the domain's state and reason as they are now.
    pub(super) fn announce(&self, name: &str, event: &str, detail: Option<String>) {
        let (state, reason) = self
            .rows()
            .get(name)
            .map_or((DomainState::Shutoff, Reason::Unknown), |r| {
                (r.state, r.reason)
            });
        self.events
            .emit_with(name, event, state.as_str(), Some(reason.as_str()), detail);
    }
}
