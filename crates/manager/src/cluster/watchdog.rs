//! A cluster host's VMMs must not outlive its daemon: once the daemon is gone its lease
//! runs out and other hosts start its domains. A small process (`vessel
//! cluster-watchdog`) holds the read end of a pipe whose write end only the daemon has;
//! when the daemon ends in any way, `kill -9` included, the read sees end-of-file and the
//! watchdog kills the host's VMMs, well before the lease can expire.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::driver::ProcId;
use crate::error::{Error, Result};

/// Starts the watchdog for the VMMs under `run_root` (STATE/run).
pub fn spawn(vessel: &Path, run_root: &Path) -> Result<()> {
    // Both ends are close-on-exec: the VMMs the daemon starts do not keep the pipe open.
    let (reader, writer) =
        std::io::pipe().map_err(|e| Error::io("creating the watchdog's pipe", run_root, e))?;
    let mut cmd = Command::new(vessel);
    cmd.arg("cluster-watchdog")
        .arg(run_root)
        .stdin(Stdio::from(reader))
        .stdout(Stdio::null());
    // Its own process group: a Ctrl-C meant for the daemon does not end it.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = cmd.spawn().map_err(|e| Error::Spawn {
        what: "the cluster watchdog".into(),
        why: e.to_string(),
    })?;
    // It ends only after the daemon: nothing here waits for it.
    tracing::info!(pid = child.id(), "cluster watchdog started");
    // The write end lives as long as this process; its end is the signal.
    std::mem::forget(writer);
    Ok(())
}

/// The watchdog itself: waits for end-of-file on stdin, then kills every live VMM
/// recorded under `run_root`. Returns how many it killed.
pub fn run(run_root: &Path) -> usize {
    let mut buf = [0u8; 64];
    let mut stdin = std::io::stdin();
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let mut killed = 0;
    for entry in std::fs::read_dir(run_root).into_iter().flatten().flatten() {
        let Some(id) = ProcId::read(&entry.path().join("vmm.pid")) else {
            continue;
        };
        if id.alive() {
            // SAFETY: kill(2) on a PID whose start time matches the pidfile: our VMM.
            unsafe {
                libc::kill(id.pid, libc::SIGKILL);
            }
            killed += 1;
        }
    }
    killed
}
