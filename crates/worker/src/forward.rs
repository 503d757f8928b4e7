//! `tether sandbox-forward`: the first process inside a sandbox under `--sandbox-network api`.
//!
//! It binds the loopback address the program's `TETHER_API_URL` names (inside the sandbox's own
//! network namespace, where nothing else listens), leaves a forwarder behind that passes each
//! connection to the worker's API proxy through the Unix socket bound into the sandbox, and then
//! becomes the program (exec). The listener is bound before the program starts, so its first request
//! never races the forwarder.
//!
//! The forwarder is double-forked into a session of its own: it is not the program's child (a program
//! that waits for all its children does not wait for it), a stop's SIGTERM to the program's process
//! group does not reach it (the program may still post its last events during its grace period), and
//! it dies with the sandbox's PID namespace when the program ends. It is one thread (each sandboxed
//! thread counts against `--sandbox-pids`) and holds at most [`MAX_CONNECTIONS`] connections.
//!
//! It carries bytes only: what may pass is decided outside, by the worker's proxy.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::sync::Arc;

use nix::sys::wait::waitpid;
use nix::unistd::{fork, setsid, ForkResult};

/// Connections held at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 64;

/// The name of the subcommand the worker runs inside the sandbox; the binary that embeds the worker
/// (the `tether` command) answers it with [`main`].
pub const SUBCOMMAND: &str = "sandbox-forward";

/// Listens on `listen`, leaves the forwarder to `socket` behind, and execs `program` (which returns
/// only on failure).
pub fn main(listen: SocketAddr, socket: PathBuf, program: Vec<OsString>) -> std::io::Error {
    let Some((name, args)) = program.split_first() else {
        return std::io::Error::other("sandbox-forward: no program after --");
    };
    let listener = match std::net::TcpListener::bind(listen) {
        Ok(listener) => listener,
        Err(e) => return std::io::Error::other(format!("sandbox-forward: bind {listen}: {e}")),
    };
    // SAFETY: nothing else runs in this process yet (no thread has been started): the child may do
    // anything.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let _ = setsid();
            // SAFETY: as above, one thread.
            match unsafe { fork() } {
                Ok(ForkResult::Child) => {
                    serve(listener, socket);
                    std::process::exit(0)
                }
                _ => std::process::exit(0),
            }
        }
        Ok(ForkResult::Parent { child }) => {
            let _ = waitpid(child, None);
        }
        Err(e) => return std::io::Error::other(format!("sandbox-forward: fork: {e}")),
    }
    drop(listener);
    std::process::Command::new(name).args(args).exec()
}

fn serve(listener: std::net::TcpListener, socket: PathBuf) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    runtime.block_on(async move {
        let _ = listener.set_nonblocking(true);
        let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
            return;
        };
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok((mut inside, _)) = listener.accept().await else {
                // Out of descriptors, most likely: give the connections held a moment to end.
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue;
            };
            let socket = socket.clone();
            tokio::spawn(async move {
                if let Ok(mut outside) = tokio::net::UnixStream::connect(&socket).await {
                    let _ = tokio::io::copy_bidirectional(&mut inside, &mut outside).await;
                }
                drop(slot);
            });
        }
    });
}
