//! The destination's side: listen, take the pages and the state into fresh guest
//! memory, check them as a snapshot load does, and answer once the VM is built.

use std::io::{BufReader, Read};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{wire, Conn, Endpoint, HandleKind, Handover, MigrationError};
use crate::snapshot::{Loaded, SnapshotError, VmSnapshot};

/// The most guest RAM a layout may ask for before its configuration arrives.
const MAX_RAM: u64 = 1 << 40;

/// Where a destination waits for its source.
#[derive(Debug)]
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    /// Binds `at` (a Unix socket path must not exist yet).
    pub fn bind(at: &Endpoint) -> std::io::Result<Listener> {
        Ok(match at {
            Endpoint::Unix(p) => Listener::Unix(crate::api::http::bind_listening(p)?, p.clone()),
            Endpoint::Tcp(a) => Listener::Tcp(TcpListener::bind(a.as_str())?),
        })
    }

    fn accept(&self) -> std::io::Result<Conn> {
        Ok(match self {
            Listener::Unix(l, _) => Conn::Unix(l.accept()?.0, Vec::new()),
            Listener::Tcp(l) => {
                let s = l.accept()?.0;
                s.set_nodelay(true)?;
                Conn::Tcp(s)
            }
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A VM received whole, to build with `Vmm::restore`; then [`Incoming::answer`].
#[derive(Debug)]
pub struct Incoming {
    pub loaded: Loaded,
    conn: Conn,
    /// Pages received (zero pages included), for the log.
    pub pages: u64,
    /// Without a configuration to compare with, the files the state names, opened once
    /// on arrival (`VmConfig::hold_files`): keep them open while the VM runs.
    pub held: Vec<std::fs::File>,
}

impl Incoming {
    /// Tells the source whether the VM runs here (it then ends) or not (it goes on).
    pub fn answer(mut self, result: &Result<(), String>) -> std::io::Result<()> {
        wire::write_answer(&mut self.conn, result)
    }
}

fn invalid(why: impl Into<String>) -> MigrationError {
    MigrationError::Wire(wire::WireError::Invalid(why.into()))
}

/// Memory for the layout a source announced, refused if it is not plausible RAM.
fn allocate(regions: &[(u64, u64)]) -> Result<GuestMemoryMmap, MigrationError> {
    let mut total: u64 = 0;
    for &(gpa, len) in regions {
        if len == 0 || gpa % wire::PAGE as u64 != 0 || len % wire::PAGE as u64 != 0 {
            return Err(invalid(format!(
                "a RAM region of {len:#x} bytes at {gpa:#x}"
            )));
        }
        total = total.saturating_add(len);
    }
    if total > MAX_RAM {
        return Err(invalid(format!("{total} bytes of RAM")));
    }
    let ranges: Vec<(GuestAddress, usize)> = regions
        .iter()
        .map(|&(gpa, len)| (GuestAddress(gpa), len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MigrationError::Memory(e.to_string()))
}

/// Reads the stream into memory until its end; the state it carried.
fn read_stream(
    r: &mut BufReader<Conn>,
    memory: &GuestMemoryMmap,
    pages: &mut u64,
    handover: &mut Handover,
) -> Result<VmSnapshot, MigrationError> {
    let mut state = None;
    let mut buf = vec![0u8; wire::PAGE * wire::MAX_RUN as usize];
    loop {
        match wire::read_record(r)? {
            wire::Record::Layout(_) => return Err(invalid("a second layout")),
            wire::Record::Pages { gpa, count } => {
                let len = count as usize * wire::PAGE;
                if !memory.check_range(GuestAddress(gpa), len) {
                    return Err(invalid(format!("pages at {gpa:#x} outside RAM")));
                }
                let data = buf.get_mut(..len).ok_or_else(|| invalid("overlong run"))?;
                r.read_exact(data)?;
                memory
                    .write_slice(data, GuestAddress(gpa))
                    .map_err(|e| MigrationError::Memory(e.to_string()))?;
                *pages += u64::from(count);
            }
            wire::Record::Zero { gpa, count } => {
                let len = count as usize * wire::PAGE;
                if !memory.check_range(GuestAddress(gpa), len) {
                    return Err(invalid(format!("pages at {gpa:#x} outside RAM")));
                }
                // Fresh memory reads as zero without being allocated: write only pages
                // an earlier round filled.
                let page = buf
                    .get_mut(..wire::PAGE)
                    .ok_or_else(|| invalid("no buffer"))?;
                for i in 0..u64::from(count) {
                    let at = GuestAddress(gpa + i * wire::PAGE as u64);
                    memory
                        .read_slice(page, at)
                        .map_err(|e| MigrationError::Memory(e.to_string()))?;
                    if !crate::snapshot::memory::all_zero(page) {
                        page.fill(0);
                        memory
                            .write_slice(page, at)
                            .map_err(|e| MigrationError::Memory(e.to_string()))?;
                    }
                }
                *pages += u64::from(count);
            }
            wire::Record::State(body) => {
                let snap: VmSnapshot = serde_json::from_slice(&body)
                    .map_err(|e| invalid(format!("its state does not parse: {e}")))?;
                state = Some(snap);
            }
            wire::Record::Handles(body) => {
                let kinds: Vec<HandleKind> = serde_json::from_slice(&body)
                    .map_err(|e| invalid(format!("its handle list does not parse: {e}")))?;
                // Every byte up to the record's end has been read from the socket, so
                // descriptors attached to it are in.
                let fds = r.get_mut().take_fds();
                let got = fds.len();
                match Handover::of(&kinds, fds) {
                    Some(h) => {
                        tracing::info!(handles = ?kinds, "host descriptors handed over");
                        *handover = h;
                    }
                    None => tracing::info!(
                        got,
                        "the source's host descriptors did not come through: the devices \
                         open theirs by name"
                    ),
                }
            }
            wire::Record::End => return state.ok_or_else(|| invalid("it ended without a state")),
        }
    }
}

/// Waits for a source on `listener` and takes the VM it sends, checked as a snapshot
/// load checks one. Nothing is started.
pub fn receive(listener: &Listener, from: &Endpoint) -> Result<Incoming, MigrationError> {
    receive_as(listener, from, None)
}

/// [`receive`], the VM's disks taking the files `expected` was handed
/// ([`VmConfig::adopt_files`]) before they are checked; refused (and the source told)
/// when `expected` is another VM.
pub fn receive_as(
    listener: &Listener,
    from: &Endpoint,
    expected: Option<&crate::config::VmConfig>,
) -> Result<Incoming, MigrationError> {
    let conn = listener
        .accept()
        .map_err(|source| MigrationError::Connect {
            to: from.to_string(),
            source,
        })?;
    tracing::info!(at = %from, "migration source connected");
    let mut r = BufReader::with_capacity(1 << 20, conn);
    let result = (|| {
        wire::read_header(&mut r)?;
        let wire::Record::Layout(regions) = wire::read_record(&mut r)? else {
            return Err(invalid("it does not begin with the RAM layout"));
        };
        let memory = allocate(&regions)?;
        let mut pages = 0;
        let mut handover = Handover::default();
        let mut snapshot = read_stream(&mut r, &memory, &mut pages, &mut handover)?;
        snapshot
            .config
            .adopt_files(expected)
            .map_err(SnapshotError::Mismatch)?;
        // Nothing to compare the state's configuration with (`vessel run --incoming`
        // without --config): its files are opened once, now, by the guest rules (disk
        // formats as recorded, never probed; backing chains as the guest rules allow),
        // and the checks and the VM read those, as `--restore` without --config does.
        let held = match expected {
            Some(_) => Vec::new(),
            None => snapshot
                .config
                .hold_files()
                .map_err(|e| SnapshotError::Invalid(format!("the VM's files: {e}")))?,
        };
        crate::snapshot::check_layout(&snapshot)?;
        let same = snapshot.memory.len() == regions.len()
            && snapshot
                .memory
                .iter()
                .zip(&regions)
                .all(|(m, &(gpa, len))| m.gpa == gpa && m.len == len);
        if !same {
            return Err(SnapshotError::Invalid(
                "its state's memory regions are not the ones it sent".into(),
            )
            .into());
        }
        crate::snapshot::check_host(&snapshot)?;
        Ok((snapshot, memory, pages, handover, held))
    })();
    let mut conn = r.into_inner();
    match result {
        Ok((snapshot, memory, pages, handover, held)) => Ok(Incoming {
            loaded: Loaded {
                snapshot,
                state_path: from.to_string().into(),
                mem_path: from.to_string().into(),
                received: Some(memory),
                handover: std::sync::Mutex::new(handover),
            },
            conn,
            pages,
            held,
        }),
        Err(e) => {
            // The source goes on running the VM.
            let _ = wire::write_answer(&mut conn, &Err(e.to_string()));
            Err(e)
        }
    }
}
