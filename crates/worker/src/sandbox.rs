//! `--sandbox`: each item's PROGRAM runs confined by bubblewrap (`bwrap`, the sandbox Flatpak uses),
//! in fresh user, PID, IPC and UTS namespaces (and a network namespace unless the network is `full`).
//!
//! What the program sees:
//! * the system read-only (`/` bound read-only), with a fresh `/dev`, a `/proc` of its own PID namespace
//!   (no other process is visible, the worker's `environ` included), and private `/tmp` and `/var/tmp`;
//! * `/home`, `/root`, `/run`, `/mnt`, `/media` and `/srv` empty, and the same for the worker's own
//!   places (the root of the item directories, `--log-dir`, the worker's working directory), so the
//!   user's files, the worker's files and every other item's directory are invisible;
//! * its own item directory, the only writable place, as its working directory and `HOME`;
//! * PROGRAM itself (and `--ca-cert`) read-only where they are, and whatever `--sandbox-bind` adds;
//! * an environment built from scratch: `PATH`, `LANG`, `TZ` and the item's variables only, so the
//!   environment key cannot be inherited.
//!
//! bwrap sets `no_new_privs` and `--die-with-parent`; the PID namespace ends with its first process, so
//! whatever the program started (a double-forked daemon included) dies with it.
//!
//! Network: `full` shares the host's; `none` and `api` get a namespace with only a loopback of their
//! own. Under `api` the sandbox starts with `tether sandbox-forward` ([`crate::forward`]), which
//! listens on [`INSIDE_API_ADDR`] and carries each connection to the worker's API proxy
//! ([`crate::proxy`]) through a Unix socket bound at [`INSIDE_API_SOCKET`].
//!
//! Limits ([`crate::limits`]): a cgroup per item (v2 where delegated, else v1 where the worker may
//! create groups), else rlimits set by `prlimit` inside the sandbox, just before PROGRAM, inherited by
//! everything it starts and not raisable from inside (that needs a capability in the host's user
//! namespace). The kernel does not apply `RLIMIT_NPROC` to root, so a root worker without a pids
//! cgroup refuses `--sandbox-pids` rather than promise a cap it cannot keep.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::limits::{self, Caps, Mechanism};
use crate::program::find_in_path;
use crate::{Error, Result};

/// Where the program reaches the API under `--sandbox-network api`, inside its own network namespace.
pub const INSIDE_API_ADDR: &str = "127.0.0.1:4780";
/// Where the worker's API proxy socket is bound inside the sandbox.
pub const INSIDE_API_SOCKET: &str = "/run/tether/api.sock";

/// What the sandboxed program may reach on the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Network {
    /// The host's network, shared.
    Full,
    /// Only the Tether API, through the worker's proxy.
    Api,
    /// No network at all: a network namespace with only a loopback device of its own.
    None,
}

impl Network {
    pub fn as_str(self) -> &'static str {
        match self {
            Network::Full => "full",
            Network::Api => "api",
            Network::None => "none",
        }
    }
}

/// `--sandbox-bind PATH[:ro]`: a host path made visible at the same place, writable unless `:ro`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bind {
    pub path: PathBuf,
    pub read_only: bool,
}

impl std::str::FromStr for Bind {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Bind, String> {
        let (path, read_only) = match text.strip_suffix(":ro") {
            Some(path) => (path, true),
            None => (text.strip_suffix(":rw").unwrap_or(text), false),
        };
        if path.is_empty() {
            return Err("--sandbox-bind needs a path, e.g. /data or /data:ro".into());
        }
        Ok(Bind {
            path: PathBuf::from(path),
            read_only,
        })
    }
}

/// A size in bytes: `1048576`, `512K`, `256M`, `2G` (powers of 1024).
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let text = text.trim();
    let bad = || format!("{text:?} is not a size (e.g. 512M, 2G)");
    let upper = text.to_ascii_uppercase();
    let upper = upper
        .strip_suffix("IB")
        .or(upper.strip_suffix('B'))
        .unwrap_or(&upper);
    let (number, shift) = match upper.chars().last() {
        Some('K') => (&upper[..upper.len() - 1], 10),
        Some('M') => (&upper[..upper.len() - 1], 20),
        Some('G') => (&upper[..upper.len() - 1], 30),
        Some('T') => (&upper[..upper.len() - 1], 40),
        _ => (upper, 0),
    };
    let value: u64 = number.trim().parse().map_err(|_| bad())?;
    let bytes = value.checked_mul(1u64 << shift).ok_or_else(bad)?;
    if bytes == 0 {
        return Err(bad());
    }
    Ok(bytes)
}

/// What `--sandbox…` asks for.
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    pub network: Network,
    /// Bytes of address space (`--sandbox-memory`).
    pub memory: Option<u64>,
    /// Processes (`--sandbox-pids`).
    pub pids: Option<u32>,
    pub binds: Vec<Bind>,
}

/// A checked sandbox: bwrap found and working on this kernel.
#[derive(Clone, Debug)]
pub struct Sandbox {
    bwrap: PathBuf,
    /// `env`, which gives the program back the default SIGTERM and SIGINT.
    env: PathBuf,
    /// `prlimit`, when a cap is enforced by an rlimit.
    prlimit: Option<PathBuf>,
    /// The caps and how each is enforced.
    caps: Caps,
    /// The worker's own executable, run inside as `sandbox-forward` under `api`.
    forwarder: Option<PathBuf>,
    version: String,
    config: SandboxConfig,
    /// Host places the program must not see (made empty inside).
    hidden: Vec<PathBuf>,
}

/// Places of the host that are emptied inside the sandbox: the users' files and the system's runtime
/// sockets.
const HIDDEN_SYSTEM: [&str; 8] = [
    "/home", "/root", "/run", "/mnt", "/media", "/srv", "/tmp", "/var/tmp",
];

/// Variables of the worker's environment the program keeps; everything else is dropped.
const KEPT_ENV: [&str; 5] = ["PATH", "LANG", "LC_ALL", "TZ", "TERM"];

impl Sandbox {
    /// Finds bwrap and checks that it can build the sandbox on this kernel (unprivileged user
    /// namespaces): the worker refuses to start otherwise, and never runs a program unconfined.
    /// `hidden` are the worker's own places.
    pub fn check(config: SandboxConfig, hidden: Vec<PathBuf>) -> Result<Sandbox> {
        let forwarder = match config.network {
            Network::Api => Some(std::env::current_exe().map_err(|e| {
                Error::config(format!(
                    "--sandbox-network api: cannot find the worker's own executable: {e}"
                ))
            })?),
            _ => None,
        };
        for bind in &config.binds {
            if !bind.path.is_absolute() || !bind.path.exists() {
                return Err(Error::config(format!(
                    "--sandbox-bind {}: needs an absolute path that exists",
                    bind.path.display()
                )));
            }
        }
        let bwrap = find_in_path("bwrap").ok_or_else(|| {
            Error::config(
                "--sandbox needs bubblewrap: no `bwrap` in PATH (Debian/Ubuntu: apt-get install \
                 bubblewrap; Fedora: dnf install bubblewrap)",
            )
        })?;
        let version = std::process::Command::new(&bwrap)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .unwrap_or_default();
        let env = find_in_path("env")
            .ok_or_else(|| Error::config("--sandbox needs `env` (coreutils) in PATH"))?;
        // Only existing directories can be emptied, and `/` never is (a home or working directory of
        // `/` would hide the whole system; its files stay read-only like the rest).
        let hidden = hidden
            .into_iter()
            .filter(|place| place.is_absolute() && place.parent().is_some() && place.is_dir())
            .collect();
        let mut sandbox = Sandbox {
            bwrap,
            env,
            prlimit: None,
            caps: Caps::default(),
            forwarder,
            version,
            config,
            hidden,
        };
        // The same namespaces an item gets, with `true` inside.
        let probe = std::process::Command::new(&sandbox.bwrap)
            .args(sandbox.namespace_args())
            .args([
                "--ro-bind",
                "/",
                "/",
                "--proc",
                "/proc",
                "--dev",
                "/dev",
                "--",
            ])
            .arg(find_in_path("true").unwrap_or_else(|| PathBuf::from("/bin/true")))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                Error::config(format!(
                    "--sandbox: cannot run {}: {e}",
                    sandbox.bwrap.display()
                ))
            })?;
        if !probe.status.success() {
            return Err(Error::config(format!(
                "--sandbox does not work on this machine: bwrap could not create its namespaces \
                 ({}). Unprivileged user namespaces must be enabled (sysctl \
                 kernel.unprivileged_userns_clone=1, or user.max_user_namespaces > 0; on Ubuntu \
                 24.04+ an AppArmor profile for bwrap), and nothing around the worker may forbid \
                 them: a container's seccomp profile, or a systemd unit's RestrictNamespaces= (see \
                 deploy/systemd/tether-worker@.service). The worker does not run programs unconfined.",
                String::from_utf8_lossy(&probe.stderr).trim()
            )));
        }
        // The caps last: choosing a cgroup creates the worker's group in it, undone if it is refused.
        let memory = sandbox
            .config
            .memory
            .map(|bytes| (bytes, limits::choose("memory")));
        let pids = sandbox.config.pids.map(|n| (n, limits::choose("pids")));
        sandbox.caps = Caps {
            memory,
            pids,
            // bwrap, its init in the PID namespace, and the API forwarder.
            overhead_pids: if sandbox.config.network == Network::Api {
                3
            } else {
                2
            },
        };
        let refused = if matches!(sandbox.caps.pids, Some((_, Mechanism::Rlimit)))
            && running_as_root()
        {
            Some(
                "--sandbox-pids cannot be enforced for this worker: it runs as root, where the \
                 kernel does not apply RLIMIT_NPROC, and it may not create a pids cgroup (v2 \
                 delegated, or v1): run the worker as an ordinary user, or where it may use cgroups",
            )
        } else if !sandbox.caps.rlimit_args().is_empty() {
            sandbox.prlimit = find_in_path("prlimit");
            sandbox.prlimit.is_none().then_some(
                "--sandbox-memory and --sandbox-pids need `prlimit` (util-linux) in PATH where no \
                 cgroup can enforce them",
            )
        } else {
            None
        };
        if let Some(why) = refused {
            limits::remove_worker_groups(&sandbox.caps);
            return Err(Error::config(why));
        }
        Ok(sandbox)
    }

    /// What is confined, for the start-up log.
    pub fn describe(&self) -> String {
        let memory = match &self.caps.memory {
            Some((bytes, how)) => {
                format!("memory {} MiB ({})", bytes >> 20, how.describe("memory"))
            }
            None => "memory unlimited".to_owned(),
        };
        let pids = match &self.caps.pids {
            Some((n, how)) => format!("{n} processes ({})", how.describe("pids")),
            None => "processes unlimited".to_owned(),
        };
        let binds: Vec<String> = self
            .config
            .binds
            .iter()
            .map(|b| {
                format!(
                    "{}{}",
                    b.path.display(),
                    if b.read_only { ":ro" } else { "" }
                )
            })
            .collect();
        format!(
            "{}: read-only system, writable item directory, private /tmp, home and worker files \
             hidden, own user/pid/ipc/uts namespaces, no_new_privs, network {}, {memory}, {pids}{}",
            if self.version.is_empty() {
                "bubblewrap"
            } else {
                &self.version
            },
            match self.config.network {
                Network::Api => format!("api (only {INSIDE_API_ADDR}, proxied to the server)"),
                other => other.as_str().to_owned(),
            },
            if binds.is_empty() {
                String::new()
            } else {
                format!(", bound: {}", binds.join(" "))
            }
        )
    }

    fn namespace_args(&self) -> Vec<&'static str> {
        let mut args = vec![
            "--unshare-user",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--die-with-parent",
        ];
        if self.config.network != Network::Full {
            args.push("--unshare-net");
        }
        args
    }

    /// The command that runs `program` confined, in `workdir`, with exactly `env` as its environment;
    /// under `api`, `api_socket` is the item's proxy socket.
    pub fn command(
        &self,
        program: &Path,
        args: &[OsString],
        workdir: &Path,
        env: &[(&str, String)],
        extra_ro: &[&Path],
        api_socket: Option<&Path>,
    ) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(&self.bwrap);
        command.env_clear();
        for name in KEPT_ENV {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        for (k, v) in env {
            command.env(k, v);
        }
        command.env("HOME", workdir);
        command.args(self.namespace_args());
        command.args(["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]);
        for place in HIDDEN_SYSTEM {
            if Path::new(place).is_dir() {
                command.args(["--tmpfs", place]);
            }
        }
        for place in &self.hidden {
            command.arg("--tmpfs").arg(place);
        }
        for bind in &self.config.binds {
            command
                .arg(if bind.read_only {
                    "--ro-bind"
                } else {
                    "--bind"
                })
                .arg(&bind.path)
                .arg(&bind.path);
        }
        for path in std::iter::once(program)
            .chain(extra_ro.iter().copied())
            .chain(self.forwarder.as_deref())
        {
            command.arg("--ro-bind").arg(path).arg(path);
        }
        if let Some(socket) = api_socket {
            command.arg("--bind").arg(socket).arg(INSIDE_API_SOCKET);
        }
        command.arg("--bind").arg(workdir).arg(workdir);
        command.arg("--chdir").arg(workdir);
        // The worker's own SIGTERM reaches bwrap and the program alike (one process group); bwrap
        // ignores it (see `pre_exec` in `program`) and `env` gives the program the default back, so
        // the program gets its grace period instead of dying with bwrap.
        command.arg("--");
        if let (Some(forwarder), Some(_)) = (&self.forwarder, api_socket) {
            command
                .arg(forwarder)
                .arg(crate::forward::SUBCOMMAND)
                .args([
                    "--listen",
                    INSIDE_API_ADDR,
                    "--socket",
                    INSIDE_API_SOCKET,
                    "--",
                ]);
        }
        command.arg(&self.env).arg("--default-signal=TERM,INT");
        // The rlimits are set inside, in the sandbox's own user namespace: RLIMIT_NPROC then counts
        // the sandbox's processes only, not every process of the user.
        if let Some(prlimit) = &self.prlimit {
            command.arg(prlimit).args(self.caps.rlimit_args()).arg("--");
        }
        command.arg(program).args(args);
        command
    }

    pub fn network(&self) -> Network {
        self.config.network
    }

    pub fn caps(&self) -> &Caps {
        &self.caps
    }

    /// `TETHER_API_URL` inside the sandbox under `api`: the forwarder's address and the API's path.
    pub fn inside_api_url(prefix: &str) -> String {
        format!("http://{INSIDE_API_ADDR}{prefix}")
    }
}

/// `/proc/self` belongs to the effective user.
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_binds_read_as_documented() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
        let bind: Bind = "/data:ro".parse().unwrap();
        assert_eq!(bind.path, PathBuf::from("/data"));
        assert!(bind.read_only);
        let bind: Bind = "/cache".parse().unwrap();
        assert!(!bind.read_only);
        assert!("".parse::<Bind>().is_err());
    }
}
