//! A jailed VMM's own control group, with the limits its caller sets in it (`vessel run
//! --cgroup FILE=VALUE`, as Firecracker's jailer takes them): CPU bandwidth and memory
//! per VM, on cgroup v1 (one hierarchy per controller) or v2 (the unified hierarchy).
//!
//! The group is `<the caller's own group>/<parent>/<id>` in each hierarchy a setting
//! names. Firecracker's jailer puts it under the hierarchy's root instead; below the
//! caller's own group, a VMM stays under every limit its caller (the manager's service,
//! a container) is under, and needs no rights outside it.
//!
//! The jail creates the group, writes the values, then moves the process in, before it
//! forks the VMM: the VMM, every thread it starts and its waiter are in it. Nobody in
//! the jail can leave it or change its values (no file system outside the jail, no
//! capabilities). Who started the VMM removes the group once it has ended
//! ([`remove`]).

use std::io;
use std::path::{Path, PathBuf};

/// The folder below the caller's own group that holds VMMs' groups unless told
/// otherwise.
pub const DEFAULT_PARENT: &str = "vessel";

/// cgroup v2's swap limit: absent where the kernel does not account swap, so a start is
/// not refused for it ([`enter`] leaves it out there, with a warning).
const SWAP_MAX: &str = "memory.swap.max";

/// Which cgroup hierarchy holds the VMM's group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// cgroup v1: a hierarchy per controller (`/sys/fs/cgroup/memory`...).
    V1,
    /// cgroup v2: one unified hierarchy.
    V2,
}

impl std::str::FromStr for Version {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "1" => Ok(Version::V1),
            "2" => Ok(Version::V2),
            _ => Err(format!("{s:?}: expected 1 or 2")),
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Version::V1 => "1",
            Version::V2 => "2",
        })
    }
}

impl Version {
    /// The version this host's controllers are on: v2 when the unified hierarchy has
    /// the `cpu` and `memory` controllers, v1 when a v1 hierarchy has them, none else.
    pub fn detect() -> Option<Version> {
        let mounts = Mounts::read().ok()?;
        let has_v2 = mounts.v2.as_deref().is_some_and(|m| {
            std::fs::read_to_string(m.join("cgroup.controllers")).is_ok_and(|c| {
                let c: Vec<&str> = c.split_whitespace().collect();
                c.contains(&"cpu") && c.contains(&"memory")
            })
        });
        if has_v2 {
            Some(Version::V2)
        } else if mounts.v1_for("cpu").is_some() && mounts.v1_for("memory").is_some() {
            Some(Version::V1)
        } else {
            None
        }
    }
}

/// One value to write in the VMM's group: `FILE=VALUE` (`cpu.max=200000 100000`,
/// `memory.limit_in_bytes=1073741824`). The controller is the file's name up to its
/// first dot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    pub file: String,
    pub value: String,
}

impl std::str::FromStr for Setting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (file, value) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected FILE=VALUE (e.g. cpu.max=100000)"))?;
        let ok_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.';
        match file.split_once('.') {
            Some((ctl, rest))
                if !ctl.is_empty()
                    && !rest.is_empty()
                    && file.chars().all(ok_name)
                    // A group's own files, not the ones that move processes or
                    // hand out controllers.
                    && ctl != "cgroup"
                    && file != "tasks"
                    && !value.contains('\n') =>
            {
                Ok(Setting {
                    file: file.into(),
                    value: value.into(),
                })
            }
            _ => Err(format!(
                "{file:?}: not a controller's file (CONTROLLER.NAME, e.g. memory.max)"
            )),
        }
    }
}

impl Setting {
    fn controller(&self) -> &str {
        self.file.split('.').next().unwrap_or_default()
    }
}

/// The VMM's group: where (`parent`/`id` below the caller's own group) and what in it.
#[derive(Clone, Debug)]
pub struct Spec {
    pub version: Version,
    /// A relative path below the caller's group (Firecracker's `--parent-cgroup`).
    pub parent: PathBuf,
    /// The group's own name (Firecracker's `--id`).
    pub id: String,
    pub settings: Vec<Setting>,
}

/// Why the group could not be made or entered.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("reading the cgroup mounts and this process's groups: {0}")]
    Mounts(#[source] io::Error),
    #[error("no cgroup v{version} hierarchy has the {controller:?} controller")]
    NoController {
        version: Version,
        controller: String,
    },
    #[error("{0:?}: a cgroup id is 1-64 letters, digits, '-', '_' or '.' (not starting with '.')")]
    Id(String),
    #[error("{0}: the parent cgroup must be a relative path without '..'")]
    Parent(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { what, path, source }
}

/// Where the hierarchies are mounted, and this process's place in each.
struct Mounts {
    /// (mount point, controllers) of each v1 hierarchy.
    v1: Vec<(PathBuf, Vec<String>)>,
    v2: Option<PathBuf>,
    /// (controllers, path) from /proc/self/cgroup; v2's has no controllers.
    own: Vec<(Vec<String>, PathBuf)>,
}

impl Mounts {
    fn read() -> io::Result<Mounts> {
        let mounts = std::fs::read_to_string("/proc/self/mounts")?;
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        Ok(Mounts::parse(&mounts, &own))
    }

    fn parse(mounts: &str, own: &str) -> Mounts {
        let mut m = Mounts {
            v1: Vec::new(),
            v2: None,
            own: Vec::new(),
        };
        for line in mounts.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(point), Some(fstype), Some(opts)) = (f.get(1), f.get(2), f.get(3)) else {
                continue;
            };
            match *fstype {
                "cgroup" => m.v1.push((
                    PathBuf::from(point),
                    opts.split(',').map(String::from).collect(),
                )),
                "cgroup2" if m.v2.is_none() => m.v2 = Some(PathBuf::from(point)),
                _ => {}
            }
        }
        for line in own.lines() {
            let mut f = line.splitn(3, ':');
            let (Some(_), Some(ctls), Some(path)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            let ctls = ctls
                .split(',')
                .filter(|c| !c.is_empty())
                .map(String::from)
                .collect();
            m.own.push((ctls, PathBuf::from(path)));
        }
        m
    }

    fn v1_for(&self, controller: &str) -> Option<&Path> {
        self.v1
            .iter()
            .find(|(_, opts)| opts.iter().any(|o| o == controller))
            .map(|(p, _)| p.as_path())
    }

    /// This process's group in the hierarchy of `controller` (v1), or the unified one.
    fn own_group(&self, controller: Option<&str>) -> PathBuf {
        self.own
            .iter()
            .find(|(ctls, _)| match controller {
                Some(c) => ctls.iter().any(|x| x == c),
                None => ctls.is_empty(),
            })
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| PathBuf::from("/"))
    }

    /// (the caller's group's folder, the VMM's group's folder) for `controller`.
    fn folders(&self, spec: &Spec, controller: &str) -> Result<(PathBuf, PathBuf), CgroupError> {
        let (mount, own) = match spec.version {
            Version::V1 => (self.v1_for(controller), self.own_group(Some(controller))),
            Version::V2 => (self.v2.as_deref(), self.own_group(None)),
        };
        let mount = mount.ok_or_else(|| CgroupError::NoController {
            version: spec.version,
            controller: controller.into(),
        })?;
        let base = mount.join(own.strip_prefix("/").unwrap_or(&own));
        let group = base.join(&spec.parent).join(&spec.id);
        Ok((base, group))
    }
}

fn check(spec: &Spec) -> Result<(), CgroupError> {
    let id_ok = !spec.id.is_empty()
        && spec.id.len() <= 64
        && !spec.id.starts_with('.')
        && spec
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !id_ok {
        return Err(CgroupError::Id(spec.id.clone()));
    }
    let parent_ok = spec
        .parent
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !parent_ok {
        return Err(CgroupError::Parent(spec.parent.clone()));
    }
    Ok(())
}

/// The distinct controllers `spec` names, in order.
fn controllers(spec: &Spec) -> Vec<&str> {
    let mut v: Vec<&str> = Vec::new();
    for s in &spec.settings {
        if !v.contains(&s.controller()) {
            v.push(s.controller());
        }
    }
    v
}

/// Makes the group in every hierarchy a setting needs, writes the values, and moves
/// this process into it. Returns the group's folders.
pub fn enter(spec: &Spec) -> Result<Vec<PathBuf>, CgroupError> {
    enter_process(spec, std::process::id())
}

/// [`enter`] for the process `pid` (this one, or in tests a child).
fn enter_process(spec: &Spec, pid: u32) -> Result<Vec<PathBuf>, CgroupError> {
    check(spec)?;
    let mounts = Mounts::read().map_err(CgroupError::Mounts)?;
    let mut groups: Vec<PathBuf> = Vec::new();
    for ctl in controllers(spec) {
        let (base, group) = mounts.folders(spec, ctl)?;
        if spec.version == Version::V2 {
            enable_v2(&base, &group, ctl)?;
        }
        create(&group)?;
        if !groups.contains(&group) {
            groups.push(group);
        }
    }
    // The values first, then the process: it never runs in the group without its
    // limits (and v1's cpuset needs its CPUs and nodes before a task may join).
    for s in &spec.settings {
        let (_, group) = mounts.folders(spec, s.controller())?;
        let file = group.join(&s.file);
        if spec.version == Version::V2 && s.file == SWAP_MAX && !file.exists() {
            // A kernel that does not account swap (`swapaccount=0`, no
            // CONFIG_MEMCG_SWAP) has no swap limit to set: memory.max still holds.
            tracing::warn!(file = %file.display(), "no cgroup v2 swap accounting: the swap limit is not set");
            continue;
        }
        std::fs::write(&file, &s.value).map_err(io_err("writing", &file))?;
    }
    let pid = pid.to_string();
    for group in &groups {
        let procs = group.join("cgroup.procs");
        std::fs::write(&procs, &pid).map_err(io_err("joining", &procs))?;
    }
    tracing::debug!(?groups, "in the VMM's cgroup");
    Ok(groups)
}

/// Makes `group` and its parents. Another VMM's starter may remove an empty parent
/// ([`remove`]) between the two: then again.
fn create(group: &Path) -> Result<(), CgroupError> {
    let mut tries = 0;
    loop {
        match std::fs::create_dir_all(group) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 8 => tries += 1,
            r => return r.map_err(io_err("creating the cgroup", group)),
        }
    }
}

/// cgroup v2: a controller works in a group only when every ancestor below the
/// caller's group hands it down (`cgroup.subtree_control`).
fn enable_v2(base: &Path, group: &Path, controller: &str) -> Result<(), CgroupError> {
    let Ok(rel) = group.strip_prefix(base) else {
        return Ok(());
    };
    let mut dir = base.to_path_buf();
    for c in rel.components() {
        let control = dir.join("cgroup.subtree_control");
        let on = std::fs::read_to_string(&control)
            .map(|s| s.split_whitespace().any(|x| x == controller))
            .unwrap_or(false);
        if !on {
            std::fs::write(&control, format!("+{controller}"))
                .map_err(io_err("handing down the controller in", &control))?;
        }
        dir.push(c);
        create(&dir)?;
    }
    Ok(())
}

/// Whether this process may make VMM groups below its own in `parent` for the cpu and
/// memory controllers: makes one (handing the controllers down on v2) and removes it.
/// A host can have the controllers and still refuse (a read-only cgroup mount in a
/// container; on v2, a group of the caller's with processes in it).
pub fn probe(version: Version, parent: &Path) -> Result<(), CgroupError> {
    let spec = Spec {
        version,
        parent: parent.to_path_buf(),
        id: format!("probe-{}", std::process::id()),
        settings: vec![
            Setting {
                file: "cpu.max".into(),
                value: String::new(),
            },
            Setting {
                file: "memory.max".into(),
                value: String::new(),
            },
        ],
    };
    check(&spec)?;
    let mounts = Mounts::read().map_err(CgroupError::Mounts)?;
    let made = controllers(&spec).into_iter().try_for_each(|ctl| {
        let (base, group) = mounts.folders(&spec, ctl)?;
        if version == Version::V2 {
            enable_v2(&base, &group, ctl)?;
        }
        create(&group)
    });
    let removed = remove(&spec);
    made.and(removed)
}

/// Removes the group `spec` describes once nothing runs in it (the VMM and its waiter
/// have ended), and its parent folder if no other VMM's group is there (any more).
/// Groups that do not exist are not an error.
pub fn remove(spec: &Spec) -> Result<(), CgroupError> {
    check(spec)?;
    let mounts = Mounts::read().map_err(CgroupError::Mounts)?;
    for ctl in controllers(spec) {
        let (_, group) = mounts.folders(spec, ctl)?;
        match std::fs::remove_dir(&group) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err("removing the cgroup", &group)(e))
            }
            _ => {}
        }
        // Fails while another VMM's group is there (never the caller's own group: the
        // parent is a relative path of one component or more).
        if let Some(parent) = group
            .parent()
            .filter(|_| spec.parent.components().count() > 0)
        {
            let _ = std::fs::remove_dir(parent);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";
    const OWN: &str = "\
4:memory:/svc/a
2:cpu,cpuacct:/
0::/svc.slice/vessel.service
";

    fn spec(version: Version, settings: &[&str]) -> Spec {
        Spec {
            version,
            parent: PathBuf::from("vessel"),
            id: "vm1".into(),
            settings: settings.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn groups_go_below_the_callers_own_in_each_hierarchy() {
        let m = Mounts::parse(MOUNTS, OWN);
        let s = spec(
            Version::V1,
            &[
                "cpu.cfs_quota_us=200000",
                "memory.limit_in_bytes=1073741824",
            ],
        );
        assert_eq!(
            m.folders(&s, "memory").unwrap().1,
            PathBuf::from("/sys/fs/cgroup/memory/svc/a/vessel/vm1")
        );
        assert_eq!(
            m.folders(&s, "cpu").unwrap().1,
            PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/vessel/vm1")
        );
        assert!(matches!(
            m.folders(&s, "pids"),
            Err(CgroupError::NoController { .. })
        ));
        let s2 = spec(Version::V2, &["memory.max=1G"]);
        assert_eq!(
            m.folders(&s2, "memory").unwrap().1,
            PathBuf::from("/sys/fs/cgroup/unified/svc.slice/vessel.service/vessel/vm1")
        );
    }

    #[test]
    fn settings_name_a_controllers_file_and_ids_are_names() {
        for bad in [
            "memory.max",
            "cgroup.procs=1",
            "cgroup.subtree_control=+cpu",
            "tasks=1",
            "../x.y=1",
            "memory=1",
            "memory.max=1\n2",
        ] {
            assert!(bad.parse::<Setting>().is_err(), "{bad}");
        }
        let s: Setting = "cpu.max=200000 100000".parse().unwrap();
        assert_eq!((s.controller(), s.value.as_str()), ("cpu", "200000 100000"));
        let mut sp = spec(Version::V1, &[]);
        sp.id = "../x".into();
        assert!(matches!(check(&sp), Err(CgroupError::Id(_))));
        sp.id = "ok".into();
        sp.parent = PathBuf::from("/abs");
        assert!(matches!(check(&sp), Err(CgroupError::Parent(_))));
        sp.parent = PathBuf::from("a/../b");
        assert!(check(&sp).is_err());
    }

    /// The v2 code path on this host, for real: hosts here mount the cpu and memory
    /// controllers on v1, where the VMM tests run the v1 path; a controller v1 leaves
    /// free (hugetlb on these hosts; pids on many v2 ones) is on the unified hierarchy,
    /// so a group is made there, the controller handed down through each
    /// `cgroup.subtree_control`, its value written and a process moved in, then removed.
    #[test]
    fn the_v2_path_makes_a_group_hands_its_controller_down_and_removes_it() {
        let mounts = Mounts::read().unwrap();
        let root = mounts
            .v2
            .clone()
            .expect("no cgroup2 mount on this host (mount -t cgroup2 none /sys/fs/cgroup/unified)");
        let own = mounts.own_group(None);
        let base = root.join(own.strip_prefix("/").unwrap());
        let free = std::fs::read_to_string(base.join("cgroup.controllers")).unwrap();
        let free: Vec<&str> = free.split_whitespace().collect();
        let setting = if free.contains(&"pids") {
            "pids.max=64"
        } else if free.contains(&"hugetlb") {
            "hugetlb.2MB.max=2097152"
        } else {
            panic!(
                "the unified hierarchy at {} offers neither pids nor hugetlb ({free:?}): \
                 free one from cgroup v1 to test the v2 path",
                base.display()
            )
        };
        let (file, value) = setting.split_once('=').unwrap();
        let ctl = file.split('.').next().unwrap();
        let parent = PathBuf::from(format!("vessel-v2-test-{}", std::process::id()));
        let spec = Spec {
            version: Version::V2,
            parent: parent.clone(),
            id: "vm1".into(),
            settings: vec![setting.parse().unwrap()],
        };
        let control = base.join("cgroup.subtree_control");
        let was_on = std::fs::read_to_string(&control)
            .unwrap()
            .split_whitespace()
            .any(|c| c == ctl);
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let entered = enter_process(&spec, child.id());
        let in_group = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id()));
        let written = std::fs::read_to_string(base.join(&parent).join("vm1").join(file));
        let handed = std::fs::read_to_string(base.join(&parent).join("cgroup.subtree_control"));
        let _ = child.kill();
        let _ = child.wait();
        let removed = remove(&spec);
        if !was_on {
            // Leave the host's hierarchy as it was.
            let _ = std::fs::write(&control, format!("-{ctl}"));
        }
        let groups = entered.expect("the v2 group");
        assert_eq!(groups, vec![base.join(&parent).join("vm1")]);
        let want = format!("0::{}\n", own.join(&parent).join("vm1").display());
        assert!(
            in_group.unwrap().lines().any(|l| format!("{l}\n") == want),
            "{want}"
        );
        assert_eq!(written.unwrap().trim(), value);
        assert!(handed.unwrap().split_whitespace().any(|c| c == ctl));
        removed.unwrap();
        assert!(!base.join(&parent).exists(), "the groups are removed");
    }

    /// The daemon's check before it gives VMMs groups: on this host (root, writable
    /// cgroups, as the sandbox tests need) it succeeds and leaves nothing behind.
    #[test]
    fn a_probe_makes_and_removes_a_group_below_this_process() {
        let v = Version::detect()
            .expect("no cgroup hierarchy with the cpu and memory controllers on this host");
        let parent = PathBuf::from(format!("vessel-probe-test-{}", std::process::id()));
        probe(v, &parent).expect("root may make cgroups below its own");
        let mounts = Mounts::read().unwrap();
        let s = Spec {
            version: v,
            parent: parent.clone(),
            id: "x".into(),
            settings: vec![
                "cpu.max=1".parse().unwrap(),
                "memory.max=1".parse().unwrap(),
            ],
        };
        for ctl in ["cpu", "memory"] {
            let (base, _) = mounts.folders(&s, ctl).unwrap();
            assert!(
                !base.join(&parent).exists(),
                "{ctl}: the probe's group stays"
            );
        }
    }
}
