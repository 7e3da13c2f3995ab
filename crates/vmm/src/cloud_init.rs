//! cloud-init's NoCloud seed, the way `cloud-localds` and libvirt users make it: a small
//! FAT volume labelled `cidata` whose root holds `user-data`, `meta-data` and, if given,
//! `network-config`. The VMM builds it in memory when the VM starts and attaches it as
//! a read-only virtio-blk disk after the configured ones; cloud-init's `ds-identify`
//! finds it by its label.
//!
//! When no meta-data file is given, the seed's says `instance-id` and `local-hostname`,
//! both the VM's name (so a VM keeps its identity across boots, and a renamed one is a
//! new instance to cloud-init).

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The NoCloud data a VM is given (`--cloud-init`): files on the host, read when the VM
/// starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudInitConfig {
    /// cloud-config (`#cloud-config ...`) or any user-data format cloud-init reads.
    pub user_data: PathBuf,
    /// Instance metadata (YAML); generated from the VM's name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_data: Option<PathBuf>,
    /// Network configuration (version 1 or 2), for cloud-init to render.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_config: Option<PathBuf>,
}

impl CloudInitConfig {
    /// The host files it names, in seed order.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.user_data.as_path())
            .chain(self.meta_data.as_deref())
            .chain(self.network_config.as_deref())
    }
}

impl std::str::FromStr for CloudInitConfig {
    type Err = String;
    /// `user-data=FILE[,meta-data=FILE][,network-config=FILE]`
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut user, mut meta, mut net) = (None, None, None);
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("--cloud-init: `{part}` is not KEY=FILE"))?;
            if value.is_empty() {
                return Err(format!("--cloud-init: {key}= needs a file"));
            }
            let slot = match key {
                "user-data" => &mut user,
                "meta-data" => &mut meta,
                "network-config" => &mut net,
                _ => {
                    return Err(format!(
                        "--cloud-init: unknown key `{key}` (user-data, meta-data, network-config)"
                    ))
                }
            };
            if slot.replace(PathBuf::from(value)).is_some() {
                return Err(format!("--cloud-init: {key} given twice"));
            }
        }
        Ok(CloudInitConfig {
            user_data: user.ok_or("--cloud-init needs user-data=FILE")?,
            meta_data: meta,
            network_config: net,
        })
    }
}

/// The largest file a seed takes: cloud-init's own limit for user-data is far lower.
pub const MAX_SEED_FILE: u64 = 16 << 20;

/// The volume label cloud-init's NoCloud datasource looks for.
pub const SEED_LABEL: &[u8; 11] = b"cidata     ";

/// Why a seed could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("reading cloud-init file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cloud-init file {path} is {size} bytes (at most {MAX_SEED_FILE})")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("writing the cidata FAT volume")]
    Fat(#[source] std::io::Error),
    #[error("attaching the cidata volume")]
    Attach(#[source] block::BlockError),
}

/// Whether `name` can stand as instance-id and hostname in generated meta-data: a DNS
/// label (letters, digits, inner hyphens; 1..=63 bytes), so it cannot break the YAML.
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The meta-data written when none is given.
pub fn default_meta_data(name: &str) -> String {
    format!("instance-id: {name}\nlocal-hostname: {name}\n")
}

/// How a seed's files are opened: by name, or from descriptors handed over for them
/// (`VmConfig::open_named`).
pub type Opener<'a> = &'a dyn Fn(&Path) -> std::io::Result<std::fs::File>;

fn read_limited(path: &Path, open: Opener<'_>) -> Result<Vec<u8>, SeedError> {
    let read = |source| SeedError::Read {
        path: path.into(),
        source,
    };
    let file = open(path).map_err(read)?;
    let size = file.metadata().map_err(read)?.len();
    if size > MAX_SEED_FILE {
        return Err(SeedError::TooLarge {
            path: path.into(),
            size,
        });
    }
    crate::config::read_whole(&file).map_err(read)
}

/// The seed volume's bytes: a FAT file system labelled `cidata` with the files cloud-init
/// reads. `name` (a [`valid_hostname`]) fills in meta-data when there is no file for it.
pub fn seed_image(cfg: &CloudInitConfig, name: &str) -> Result<Vec<u8>, SeedError> {
    seed_image_from(cfg, name, &|p| std::fs::File::open(p))
}

/// [`seed_image`] with the files opened by `open`.
pub fn seed_image_from(
    cfg: &CloudInitConfig,
    name: &str,
    open: Opener<'_>,
) -> Result<Vec<u8>, SeedError> {
    let mut files: Vec<(&str, Vec<u8>)> = vec![("user-data", read_limited(&cfg.user_data, open)?)];
    files.push((
        "meta-data",
        match &cfg.meta_data {
            Some(p) => read_limited(p, open)?,
            None => default_meta_data(name).into_bytes(),
        },
    ));
    if let Some(p) = &cfg.network_config {
        files.push(("network-config", read_limited(p, open)?));
    }
    fat_volume(&files)
}

/// [`seed_image_from`] as a read-only disk held in memory.
pub fn seed_disk(
    cfg: &CloudInitConfig,
    name: &str,
    open: Opener<'_>,
) -> Result<Box<dyn block::BlockBackend>, SeedError> {
    let image = seed_image_from(cfg, name, open)?;
    tracing::info!(bytes = image.len(), "cloud-init: cidata seed built");
    let storage = block::storage::MemStorage::new(image);
    Ok(Box::new(
        block::Raw::new(Box::new(storage), true).map_err(SeedError::Attach)?,
    ))
}

/// A FAT volume labelled [`SEED_LABEL`] with `files` in its root directory.
fn fat_volume(files: &[(&str, Vec<u8>)]) -> Result<Vec<u8>, SeedError> {
    // Room for the data (whole clusters each), the FATs and the root directory, in
    // whole MiB: FAT12 up to 16 MiB of data or so, FAT16 beyond; fatfs picks.
    let data: u64 = files.iter().map(|(_, d)| d.len() as u64 + 4096).sum();
    let size = (data * 5 / 4 + (1 << 20)).next_multiple_of(1 << 20);
    let mut disk = Cursor::new(vec![0u8; size as usize]);
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new().volume_label(*SEED_LABEL),
    )
    .map_err(SeedError::Fat)?;
    disk.set_position(0);
    {
        let fs =
            fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).map_err(SeedError::Fat)?;
        {
            let root = fs.root_dir();
            for (name, bytes) in files {
                let mut f = root.create_file(name).map_err(SeedError::Fat)?;
                f.truncate().map_err(SeedError::Fat)?;
                f.write_all(bytes).map_err(SeedError::Fat)?;
                f.flush().map_err(SeedError::Fat)?;
            }
        }
        fs.unmount().map_err(SeedError::Fat)?;
    }
    Ok(disk.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn the_flag_parses_its_keys_and_rejects_the_rest() {
        let c: CloudInitConfig = "user-data=/a,meta-data=/b,network-config=/c"
            .parse()
            .unwrap();
        assert_eq!(c.user_data, PathBuf::from("/a"));
        assert_eq!(c.meta_data, Some(PathBuf::from("/b")));
        assert_eq!(c.network_config, Some(PathBuf::from("/c")));
        assert_eq!(c.files().count(), 3);
        let c: CloudInitConfig = "user-data=/a".parse().unwrap();
        assert_eq!((c.meta_data, c.network_config), (None, None));
        for bad in [
            "",
            "meta-data=/b",
            "user-data=",
            "user-data=/a,user-data=/b",
            "user-data=/a,vendor-data=/v",
            "user-data",
        ] {
            assert!(bad.parse::<CloudInitConfig>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn hostnames_that_could_break_the_yaml_are_refused() {
        for good in ["vessel", "web-1", "A9", &"x".repeat(63)] {
            assert!(valid_hostname(good), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "a b",
            "a:b",
            "a\nb",
            "a.b",
            &"x".repeat(64),
            "é",
        ] {
            assert!(!valid_hostname(bad), "{bad:?}");
        }
    }

    fn read_back(image: Vec<u8>) -> (String, Vec<(String, Vec<u8>)>) {
        let fs = fatfs::FileSystem::new(Cursor::new(image), fatfs::FsOptions::new()).unwrap();
        let label = fs.volume_label();
        let mut files = Vec::new();
        for e in fs.root_dir().iter() {
            let e = e.unwrap();
            if e.is_file() {
                let mut bytes = Vec::new();
                e.to_file().read_to_end(&mut bytes).unwrap();
                files.push((e.file_name(), bytes));
            }
        }
        files.sort();
        (label, files)
    }

    #[test]
    fn the_seed_is_a_cidata_fat_volume_with_the_files_and_generated_meta_data() {
        let dir = std::env::temp_dir().join(format!("vessel-seed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let user = dir.join("user");
        std::fs::write(&user, b"#cloud-config\nruncmd:\n - echo hi\n").unwrap();
        let net = dir.join("net");
        // Bigger than one cluster, to cross cluster boundaries.
        let net_bytes: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&net, &net_bytes).unwrap();
        let cfg = CloudInitConfig {
            user_data: user.clone(),
            meta_data: None,
            network_config: Some(net),
        };
        let (label, files) = read_back(seed_image(&cfg, "web-1").unwrap());
        assert_eq!(label.trim_end(), "cidata");
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["meta-data", "network-config", "user-data"]);
        assert_eq!(files[0].1, b"instance-id: web-1\nlocal-hostname: web-1\n");
        assert_eq!(files[1].1, net_bytes);
        assert_eq!(files[2].1, b"#cloud-config\nruncmd:\n - echo hi\n");

        // A meta-data file is taken as it is; a missing file is an error naming it.
        let meta = dir.join("meta");
        std::fs::write(&meta, b"instance-id: given\n").unwrap();
        let cfg = CloudInitConfig {
            user_data: user.clone(),
            meta_data: Some(meta),
            network_config: None,
        };
        let (_, files) = read_back(seed_image(&cfg, "ignored").unwrap());
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].1, b"instance-id: given\n");
        let cfg = CloudInitConfig {
            user_data: dir.join("absent"),
            meta_data: None,
            network_config: None,
        };
        let e = seed_image(&cfg, "x").unwrap_err();
        assert!(matches!(e, SeedError::Read { ref path, .. } if path.ends_with("absent")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
