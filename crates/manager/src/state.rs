//! A domain's runtime state as libvirt names it: a state and the reason it was entered
//! (`virsh domstate --reason`: "running (booted)", "paused (user)", "shut off
//! (destroyed)" …), changed only through [`next`], which refuses an event the state does
//! not allow with an error naming both. The manager keeps one such pair per domain in
//! its runtime table and waits for changes on a condition variable.

use serde::Serialize;

use crate::domain::DomainState;
use crate::error::{Error, Result};

/// Why a domain is in its state: libvirt's reasons (`virDomainRunningReason`,
/// `virDomainPausedReason`, `virDomainShutdownReason`, `virDomainShutoffReason`), as
/// `virsh domstate --reason` words them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Running: started from nothing.
    Booted,
    /// Running: resumed after a pause.
    Unpaused,
    /// Running: loaded from a save (restore, managedsave).
    Restored,
    /// Running: arrived from another host.
    Migrated,
    /// Running: a snapshot reverted to.
    FromSnapshot,
    /// Paused, or in shutdown: a user asked.
    User,
    /// Shut off: the guest powered off (asked or by itself).
    Shutdown,
    /// Shut off: stopped at once (destroy).
    Destroyed,
    /// Shut off / crashed: the VMM ended on an error or a signal.
    Crashed,
    /// Shut off: its state was saved (save, managedsave).
    Saved,
    /// Shut off: it went on at another host (migrate).
    MigratedAway,
    /// Shut off: the VMM ended while no daemon watched it.
    Daemon,
    /// No reason known (never started since the daemon began).
    Unknown,
}

impl Reason {
    /// libvirt's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Booted => "booted",
            Reason::Unpaused => "unpaused",
            Reason::Restored => "restored",
            Reason::Migrated | Reason::MigratedAway => "migrated",
            Reason::FromSnapshot => "from snapshot",
            Reason::User => "user",
            Reason::Shutdown => "shutdown",
            Reason::Destroyed => "destroyed",
            Reason::Crashed => "crashed",
            Reason::Saved => "saved",
            Reason::Daemon => "daemon",
            Reason::Unknown => "unknown",
        }
    }
}

impl Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// How a VMM came to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    Boot,
    Restore,
    Incoming,
    Snapshot,
}

/// How a VMM ended, as its driver reads the exit status plus what the manager asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The guest powered off (exit 0).
    PoweredOff,
    /// The guest rebooted: the VMM ended to be started again (on_reboot=restart).
    Rebooted,
    /// An error status or a signal the manager did not send.
    Failed,
    /// The manager stopped it (destroy).
    Destroyed,
    /// Its state was saved first.
    Saved,
    /// It went on at another host.
    MigratedAway,
    /// Ended with no status to read (not our child, no status file).
    Unknown,
}

/// What happens to a domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Started(Start),
    Paused,
    Resumed,
    ShutdownRequested,
    Ended(End),
}

/// The state and reason after `event` in `state`, or the refusal (a conflict: the
/// domain is not in a state that allows it).
pub fn next(state: DomainState, event: Event, name: &str) -> Result<(DomainState, Reason)> {
    use DomainState as S;
    let active = state.is_active();
    let refused = |why: &str| Err(Error::Conflict(format!("domain {name:?} {why}")));
    match event {
        Event::Started(_) if active => refused("is already running"),
        Event::Started(how) => Ok((
            S::Running,
            match how {
                Start::Boot => Reason::Booted,
                Start::Restore => Reason::Restored,
                Start::Incoming => Reason::Migrated,
                Start::Snapshot => Reason::FromSnapshot,
            },
        )),
        Event::Paused => match state {
            S::Running | S::InShutdown => Ok((S::Paused, Reason::User)),
            S::Paused => refused("is already paused"),
            _ => refused("is not running"),
        },
        Event::Resumed => match state {
            S::Paused => Ok((S::Running, Reason::Unpaused)),
            _ if active => refused("is not paused"),
            _ => refused("is not running"),
        },
        Event::ShutdownRequested if active => Ok((S::InShutdown, Reason::User)),
        Event::ShutdownRequested => refused("is not running"),
        Event::Ended(_) if !active => refused("is not running"),
        Event::Ended(end) => Ok(match end {
            End::PoweredOff | End::Rebooted => (S::Shutoff, Reason::Shutdown),
            End::Failed => (S::Crashed, Reason::Crashed),
            End::Destroyed => (S::Shutoff, Reason::Destroyed),
            End::Saved => (S::Shutoff, Reason::Saved),
            End::MigratedAway => (S::Shutoff, Reason::MigratedAway),
            End::Unknown => (S::Shutoff, Reason::Unknown),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DomainState as S;

    #[test]
    fn every_state_and_event_gives_libvirts_state_and_reason_or_a_conflict() {
        let ok = |s, e| next(s, e, "d").unwrap();
        let refused = |s, e| next(s, e, "d").unwrap_err().to_string();
        for (how, reason) in [
            (Start::Boot, Reason::Booted),
            (Start::Restore, Reason::Restored),
            (Start::Incoming, Reason::Migrated),
            (Start::Snapshot, Reason::FromSnapshot),
        ] {
            assert_eq!(ok(S::Shutoff, Event::Started(how)), (S::Running, reason));
            assert_eq!(ok(S::Crashed, Event::Started(how)), (S::Running, reason));
            for active in [S::Running, S::Paused, S::InShutdown] {
                assert!(refused(active, Event::Started(how)).contains("already running"));
            }
        }
        assert_eq!(ok(S::Running, Event::Paused), (S::Paused, Reason::User));
        assert_eq!(ok(S::InShutdown, Event::Paused), (S::Paused, Reason::User));
        assert!(refused(S::Paused, Event::Paused).contains("already paused"));
        assert!(refused(S::Shutoff, Event::Paused).contains("not running"));
        assert_eq!(
            ok(S::Paused, Event::Resumed),
            (S::Running, Reason::Unpaused)
        );
        assert!(refused(S::Running, Event::Resumed).contains("not paused"));
        assert!(refused(S::Crashed, Event::Resumed).contains("not running"));
        for active in [S::Running, S::Paused, S::InShutdown] {
            assert_eq!(
                ok(active, Event::ShutdownRequested),
                (S::InShutdown, Reason::User)
            );
        }
        assert!(refused(S::Shutoff, Event::ShutdownRequested).contains("not running"));
        for (end, want) in [
            (End::PoweredOff, (S::Shutoff, Reason::Shutdown)),
            (End::Rebooted, (S::Shutoff, Reason::Shutdown)),
            (End::Failed, (S::Crashed, Reason::Crashed)),
            (End::Destroyed, (S::Shutoff, Reason::Destroyed)),
            (End::Saved, (S::Shutoff, Reason::Saved)),
            (End::MigratedAway, (S::Shutoff, Reason::MigratedAway)),
            (End::Unknown, (S::Shutoff, Reason::Unknown)),
        ] {
            for active in [S::Running, S::Paused, S::InShutdown] {
                assert_eq!(ok(active, Event::Ended(end)), want);
            }
            assert!(refused(S::Shutoff, Event::Ended(end)).contains("not running"));
        }
        assert_eq!(Reason::MigratedAway.as_str(), "migrated");
        assert_eq!(Reason::FromSnapshot.as_str(), "from snapshot");
    }
}
