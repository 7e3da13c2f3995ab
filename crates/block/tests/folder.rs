//! A pool's images and their backing chains stay in the pool (issue 22): a qcow2 header
//! naming a host file as backing, a `..` escape, or a link swapped in for a volume or a
//! backing file is refused, never opened, by the folder-confined opens.

mod common;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use block::{BlockBackend, CreateOptions, Folder, FolderError, Format, OpenError};
use common::*;

const SECRET: &[u8] = b"host secret outside the pool: never to be read";
const DISK: u64 = 1 << 20;

/// A pool folder next to a secret file outside it.
fn pool(tag: &str) -> (TempDir, PathBuf, PathBuf) {
    let dir = TempDir::new(tag);
    let secret = dir.path("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let pool = dir.path("pool");
    std::fs::create_dir(&pool).unwrap();
    (dir, pool, secret)
}

/// A qcow2 image at `path` whose backing file is `name` (raw), made with the unconfined
/// tools: what a hostile upload or a local user could leave in a pool.
fn overlay(path: &Path, name: &str) {
    block::create(
        path,
        Format::Qcow2,
        Some(DISK),
        Some((name, Some(Format::Raw))),
    )
    .unwrap();
}

fn first_bytes(d: &mut dyn BlockBackend) -> Vec<u8> {
    let mut b = vec![0u8; SECRET.len()];
    d.read_at(0, &mut b).unwrap();
    b
}

fn folder_error(e: OpenError) -> FolderError {
    match e {
        OpenError::Folder(f) => f,
        OpenError::Backing { source, .. } => folder_error(*source),
        other => panic!("expected a folder refusal, got {other:?}"),
    }
}

#[test]
fn a_backing_file_outside_the_folder_is_never_opened() {
    let (_dir, pool, secret) = pool("folder-outside");
    let folder = Folder::open(&pool).unwrap();
    let rel_escape = "../secret".to_string();
    for name in [secret.to_str().unwrap().to_string(), rel_escape] {
        let top = pool.join("top.qcow2");
        overlay(&top, &name);
        // The attack is real: the unconfined guest open follows the header.
        let mut d = block::open_guest_disk(&top, Some(Format::Qcow2), true).unwrap();
        assert_eq!(first_bytes(&mut *d), SECRET, "{name}");
        drop(d);
        let e = block::open_guest_disk_in(&folder, &top, Some(Format::Qcow2), true, true)
            .expect_err(&name);
        assert!(
            matches!(folder_error(e), FolderError::Outside { .. }),
            "{name}"
        );
        assert_eq!(
            block::guest_disk_files_in(&folder, &top, Some(Format::Qcow2)),
            vec![top.clone()],
            "the jail gets no file outside the folder"
        );
        std::fs::remove_file(&top).unwrap();
    }
}

#[test]
fn links_swapped_in_for_a_volume_or_a_backing_file_are_refused() {
    let (_dir, pool, secret) = pool("folder-links");
    let folder = Folder::open(&pool).unwrap();
    // A volume replaced by a link to a host file.
    let vol = pool.join("vol.raw");
    symlink(&secret, &vol).unwrap();
    let mut d = block::open_guest_disk(&vol, Some(Format::Raw), true).unwrap();
    assert_eq!(
        first_bytes(&mut *d),
        SECRET,
        "by path, the link is followed"
    );
    drop(d);
    let e = block::open_guest_disk_in(&folder, &vol, Some(Format::Raw), true, true).unwrap_err();
    assert!(matches!(folder_error(e), FolderError::Link { .. }));
    assert!(block::info_in(&folder, &vol, Format::Raw).is_err());
    assert!(block::resize_in(&folder, &vol, Format::Raw, 2 * DISK).is_err());
    assert_eq!(std::fs::read(&secret).unwrap(), SECRET, "not grown");
    // A backing file in the folder that is a link out of it.
    let link = pool.join("base.raw");
    symlink(&secret, &link).unwrap();
    let top = pool.join("top.qcow2");
    overlay(&top, "base.raw");
    let e = block::open_guest_disk_in(&folder, &top, Some(Format::Qcow2), true, true).unwrap_err();
    assert!(matches!(folder_error(e), FolderError::Link { .. }));
    // A link in a folder on the way, and the folder itself a link.
    std::fs::create_dir(pool.join("real")).unwrap();
    symlink(pool.join("real"), pool.join("sub")).unwrap();
    std::fs::write(pool.join("real/disk.raw"), vec![1u8; 4096]).unwrap();
    let e = block::open_guest_disk_in(&folder, &pool.join("sub/disk.raw"), None, true, true)
        .unwrap_err();
    assert!(matches!(folder_error(e), FolderError::Link { .. }));
    assert!(matches!(
        Folder::open(&pool.join("sub")),
        Err(FolderError::Link { .. })
    ));
    // A FIFO is not an image (and opening it does not block).
    let fifo = pool.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid path and mode.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let e = block::open_guest_disk_in(&folder, &fifo, Some(Format::Raw), true, true).unwrap_err();
    assert!(matches!(folder_error(e), FolderError::NotRegular { .. }));
}

#[test]
fn a_chain_inside_the_folder_opens_and_new_images_never_follow_links() {
    let (_dir, pool, secret) = pool("folder-chain");
    let folder = Folder::open(&pool).unwrap();
    let base = pool.join("base.raw");
    std::fs::write(&base, vec![7u8; DISK as usize]).unwrap();
    let opts = |backing: Option<(&str, Format)>| CreateOptions {
        format: if backing.is_some() {
            Format::Qcow2
        } else {
            Format::Raw
        },
        size: backing.is_none().then_some(DISK),
        backing: backing.map(|(n, f)| (n.to_string(), Some(f))),
        cluster_size: None,
    };
    let mid = pool.join("mid.qcow2");
    block::create_in(&folder, &mid, &opts(Some(("base.raw", Format::Raw)))).unwrap();
    // An absolute name inside the folder is as good as a relative one.
    let top = pool.join("top.qcow2");
    let abs = mid.to_str().unwrap();
    block::create_in(&folder, &top, &opts(Some((abs, Format::Qcow2)))).unwrap();
    let mut d =
        block::open_guest_disk_in(&folder, &top, Some(Format::Qcow2), false, false).unwrap();
    let mut b = [0u8; 4];
    d.read_at(0, &mut b).unwrap();
    assert_eq!(b, [7; 4]);
    drop(d);
    assert_eq!(
        block::guest_disk_files_in(&folder, &top, Some(Format::Qcow2)),
        vec![top.clone(), mid.clone(), base.clone()]
    );
    assert_eq!(
        block::info_in(&folder, &top, Format::Qcow2)
            .unwrap()
            .virtual_size,
        DISK
    );
    // Creating over an existing name, or a dangling link planted there, fails and
    // leaves the link's target uncreated.
    assert!(block::create_in(&folder, &base, &opts(None)).is_err());
    let target = secret.with_file_name("created-through-a-link");
    symlink(&target, pool.join("new.raw")).unwrap();
    assert!(block::create_in(&folder, &pool.join("new.raw"), &opts(None)).is_err());
    assert!(!target.exists());
    // A backing file outside the folder is not even opened to size a new overlay.
    let e = block::create_in(
        &folder,
        &pool.join("evil.qcow2"),
        &opts(Some((secret.to_str().unwrap(), Format::Raw))),
    )
    .unwrap_err();
    assert!(e.to_string().contains("backing"), "{e}");
    assert!(!pool.join("evil.qcow2").exists());
}
