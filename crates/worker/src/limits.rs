//! The sandbox's memory and process caps, and what they can tell afterwards.
//!
//! Each cap picks the strongest mechanism this worker may use, once, at start-up:
//!
//! 1. **cgroup v2**, where the worker's own cgroup delegates the controller (it is listed in the
//!    group's `cgroup.subtree_control` and the worker may create groups under it);
//! 2. **cgroup v1**, where the controller has its own hierarchy and the worker may create groups in it
//!    (root, on hosts that still mount v1 controllers);
//! 3. **rlimits** (`RLIMIT_AS`, `RLIMIT_NPROC`, set by `prlimit` inside the sandbox) otherwise.
//!
//! With a cgroup every item gets a group of its own under `tether-worker-<pid>`, which bwrap joins
//! before it execs (so everything in the sandbox is in it, bwrap's own processes included), and which
//! is emptied (SIGKILL) and removed once the program is reaped. The group's counters say afterwards
//! whether a cap was hit: the kernel's OOM killer acted in the group (`memory_limit`), or a fork was
//! refused at `pids.max` (`pids_limit`). An rlimit leaves no such trace: an allocation or a fork past
//! it just fails inside the program, which reports it (or not) as it likes.

use std::ffi::CString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Which cgroup hierarchy a controller lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    V1,
    V2,
}

/// How one cap is enforced.
#[derive(Clone, Debug)]
pub enum Mechanism {
    /// A group per item under this worker's group `dir`.
    Cgroup { flavor: Flavor, dir: PathBuf },
    /// An rlimit set by `prlimit` inside the sandbox.
    Rlimit,
}

impl Mechanism {
    pub fn describe(&self, controller: &str) -> String {
        match self {
            Mechanism::Cgroup {
                flavor: Flavor::V1, ..
            } => format!("cgroup v1 {controller}"),
            Mechanism::Cgroup {
                flavor: Flavor::V2, ..
            } => format!("cgroup v2 {controller}"),
            Mechanism::Rlimit if controller == "memory" => "RLIMIT_AS".to_owned(),
            Mechanism::Rlimit => "RLIMIT_NPROC".to_owned(),
        }
    }

    pub fn is_cgroup(&self) -> bool {
        matches!(self, Mechanism::Cgroup { .. })
    }
}

/// Finds the best mechanism for `controller` (`memory` or `pids`) and, for a cgroup, creates this
/// worker's group in it.
pub fn choose(controller: &str) -> Mechanism {
    let own = own_cgroups();
    let mounts = cgroup_mounts();
    let worker_group = format!("tether-worker-{}", std::process::id());
    // v2: the controller must be delegated to the worker's own group.
    if let Some(path) = own.iter().find(|c| c.hierarchy == 0).map(|c| &c.path) {
        for mount in mounts.iter().filter(|m| m.flavor == Flavor::V2) {
            let Some(dir) = mount.dir_of(path) else {
                continue;
            };
            let delegated = fs::read_to_string(dir.join("cgroup.subtree_control"))
                .is_ok_and(|text| text.split_whitespace().any(|c| c == controller));
            if delegated {
                if let Some(dir) = create_group(&dir.join(&worker_group)) {
                    return Mechanism::Cgroup {
                        flavor: Flavor::V2,
                        dir,
                    };
                }
            }
        }
    }
    // v1: a hierarchy of the controller's own.
    let own_v1 = own
        .iter()
        .find(|c| c.hierarchy != 0 && c.controllers.iter().any(|n| n == controller));
    if let Some(own_v1) = own_v1 {
        let mount = mounts
            .iter()
            .find(|m| m.flavor == Flavor::V1 && m.controllers.iter().any(|n| n == controller));
        if let Some(dir) = mount.and_then(|m| m.dir_of(&own_v1.path)) {
            if let Some(dir) = create_group(&dir.join(&worker_group)) {
                return Mechanism::Cgroup {
                    flavor: Flavor::V1,
                    dir,
                };
            }
        }
    }
    Mechanism::Rlimit
}

/// Creates `dir` as a cgroup (or takes an existing one), if this process may.
fn create_group(dir: &Path) -> Option<PathBuf> {
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(_) => return None,
    }
    // A cgroup directory is populated by the kernel; a plain directory (a cgroup file system mounted
    // read-write but not ours) is not.
    dir.join("cgroup.procs").exists().then(|| dir.to_owned())
}

/// A line of `/proc/self/cgroup`.
struct OwnCgroup {
    hierarchy: u32,
    controllers: Vec<String>,
    path: String,
}

fn own_cgroups() -> Vec<OwnCgroup> {
    let text = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let hierarchy = parts.next()?.parse().ok()?;
            let controllers = parts
                .next()?
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect();
            let path = parts.next()?.to_owned();
            Some(OwnCgroup {
                hierarchy,
                controllers,
                path,
            })
        })
        .collect()
}

/// A mounted cgroup file system, from `/proc/self/mountinfo`.
struct CgroupMount {
    flavor: Flavor,
    /// The group of the hierarchy that is mounted (not always its root: containers mount their own).
    root: String,
    mount_point: PathBuf,
    controllers: Vec<String>,
}

impl CgroupMount {
    /// The directory of the group at `path` (as `/proc/self/cgroup` names it), if it is under this
    /// mount.
    fn dir_of(&self, path: &str) -> Option<PathBuf> {
        let rest = if self.root == "/" {
            path
        } else {
            path.strip_prefix(self.root.as_str())?
        };
        let rest = rest.trim_start_matches('/');
        let dir = if rest.is_empty() {
            self.mount_point.clone()
        } else {
            self.mount_point.join(rest)
        };
        dir.is_dir().then_some(dir)
    }
}

fn cgroup_mounts() -> Vec<CgroupMount> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let _source = right.next();
            let options = right.next().unwrap_or_default();
            let flavor = match fstype {
                "cgroup" => Flavor::V1,
                "cgroup2" => Flavor::V2,
                _ => return None,
            };
            Some(CgroupMount {
                flavor,
                root: unescape(left.get(3)?),
                mount_point: PathBuf::from(unescape(left.get(4)?)),
                controllers: options.split(',').map(str::to_owned).collect(),
            })
        })
        .collect()
}

/// mountinfo writes spaces and a few other bytes as octal escapes (`\040`).
fn unescape(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(n) = u8::from_str_radix(digits, 8) {
                out.push(n);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The caps of one sandbox and how each is enforced.
#[derive(Clone, Debug, Default)]
pub struct Caps {
    pub memory: Option<(u64, Mechanism)>,
    /// The program's processes, and the sandbox's own (bwrap, its init, the API forwarder) on top.
    pub pids: Option<(u32, Mechanism)>,
    pub overhead_pids: u32,
}

impl Caps {
    /// The rlimits `prlimit` must set inside the sandbox (the caps no cgroup enforces).
    pub fn rlimit_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some((bytes, Mechanism::Rlimit)) = &self.memory {
            args.push(format!("--as={bytes}"));
        }
        if let Some((pids, Mechanism::Rlimit)) = &self.pids {
            args.push(format!("--nproc={pids}"));
        }
        args
    }

    /// The cgroups of one item, with their limits written; none when no cap uses a cgroup.
    pub fn item_groups(&self, work_id: &str) -> io::Result<ItemGroups> {
        let mut groups = ItemGroups::default();
        if let Some((bytes, Mechanism::Cgroup { flavor, dir })) = &self.memory {
            let group = Group::create(dir.join(work_id), *flavor)?;
            groups.members.push(group);
            let group = groups.members.last().expect("just pushed");
            match flavor {
                Flavor::V1 => {
                    group.write("memory.limit_in_bytes", &bytes.to_string())?;
                    // Swap must not stretch the cap (memsw is memory plus swap; absent without swap
                    // accounting).
                    if group.dir.join("memory.memsw.limit_in_bytes").exists() {
                        group.write("memory.memsw.limit_in_bytes", &bytes.to_string())?;
                    }
                }
                Flavor::V2 => {
                    group.write("memory.max", &bytes.to_string())?;
                    if group.dir.join("memory.swap.max").exists() {
                        group.write("memory.swap.max", "0")?;
                    }
                }
            }
            groups.memory = Some(groups.members.len() - 1);
        }
        if let Some((pids, Mechanism::Cgroup { flavor, dir })) = &self.pids {
            let group = Group::create(dir.join(work_id), *flavor)?;
            group.write("pids.max", &(pids + self.overhead_pids).to_string())?;
            groups.members.push(group);
            groups.pids = Some(groups.members.len() - 1);
        }
        Ok(groups)
    }
}

/// One item's cgroups (one per v1 hierarchy, or the same v2 group twice at most).
#[derive(Debug, Default)]
pub struct ItemGroups {
    members: Vec<Group>,
    memory: Option<usize>,
    pids: Option<usize>,
}

#[derive(Debug)]
struct Group {
    dir: PathBuf,
    flavor: Flavor,
    /// `cgroup.procs`, ready for the child between fork and exec (which must not allocate).
    procs: CString,
}

impl Group {
    fn create(dir: PathBuf, flavor: Flavor) -> io::Result<Group> {
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let procs = CString::new(
            dir.join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .map_err(io::Error::other)?;
        Ok(Group { dir, flavor, procs })
    }

    fn write(&self, file: &str, value: &str) -> io::Result<()> {
        fs::write(self.dir.join(file), value)
            .map_err(|e| io::Error::new(e.kind(), format!("{}/{file}: {e}", self.dir.display())))
    }

    /// The number after `key` in a flat-keyed counter file (`oom_kill 1`, `max 3`).
    fn counter(&self, file: &str, key: &str) -> u64 {
        let text = fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        text.lines()
            .filter_map(|line| line.split_once(' '))
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0)
    }

    fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// SIGKILL to whatever is left in the group, then the group removed; bounded, since a process in
    /// uninterruptible sleep can take a moment to go.
    fn empty_and_remove(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = self.pids();
            for pid in &left {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
            if (left.is_empty() && fs::remove_dir(&self.dir).is_ok()) || !self.dir.exists() {
                return;
            }
            if Instant::now() > deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl ItemGroups {
    /// The `cgroup.procs` files the sandbox joins between fork and exec.
    pub fn procs_files(&self) -> Vec<CString> {
        self.members.iter().map(|g| g.procs.clone()).collect()
    }

    /// Which cap ended the program, as far as the kernel's counters tell: the OOM killer acted in the
    /// group, or a fork was refused at the process cap.
    pub fn exit_reason(&self) -> Option<&'static str> {
        if let Some(group) = self.memory.map(|i| &self.members[i]) {
            let killed = match group.flavor {
                Flavor::V1 => group.counter("memory.oom_control", "oom_kill"),
                Flavor::V2 => group.counter("memory.events", "oom_kill"),
            };
            if killed > 0 {
                return Some("memory_limit");
            }
        }
        if let Some(group) = self.pids.map(|i| &self.members[i]) {
            if group.counter("pids.events", "max") > 0 {
                return Some("pids_limit");
            }
        }
        None
    }

    /// Kills whatever is left in the groups and removes them.
    pub fn remove(&mut self) {
        for group in self.members.drain(..) {
            group.empty_and_remove();
        }
        self.memory = None;
        self.pids = None;
    }
}

impl Drop for ItemGroups {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Joins the groups named by `procs` (the calling process, `0`): for the child between fork and
/// exec, so it makes system calls only.
pub fn join(procs: &[CString]) -> io::Result<()> {
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::Mode;
    for file in procs {
        let fd = open(file.as_c_str(), OFlag::O_WRONLY, Mode::empty()).map_err(io::Error::from)?;
        nix::unistd::write(&fd, b"0").map_err(io::Error::from)?;
    }
    Ok(())
}

/// Removes this worker's own groups (at the end of the run; empty by then).
pub fn remove_worker_groups(caps: &Caps) {
    for mechanism in [
        caps.memory.as_ref().map(|m| &m.1),
        caps.pids.as_ref().map(|p| &p.1),
    ]
    .into_iter()
    .flatten()
    {
        if let Mechanism::Cgroup { dir, .. } = mechanism {
            let _ = fs::remove_dir(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped_and_groups_found_under_their_mount() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        let mount = CgroupMount {
            flavor: Flavor::V1,
            root: "/".into(),
            mount_point: PathBuf::from("/"),
            controllers: vec!["pids".into()],
        };
        assert_eq!(mount.dir_of("/"), Some(PathBuf::from("/")));
        let nested = CgroupMount {
            root: "/container".into(),
            ..mount
        };
        assert_eq!(nested.dir_of("/elsewhere"), None);
    }
}
