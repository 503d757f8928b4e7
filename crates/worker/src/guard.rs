//! `tether program-guard`: the process between the worker and an unconfined program, so that nothing
//! the program starts outlives the worker.
//!
//! A program's process group is killed by the worker when the program ends or is stopped. But a worker
//! that dies without a chance to act (SIGKILL, a crash, or its dead man's switch while it was stopped)
//! kills nothing, and `PR_SET_PDEATHSIG` takes only the worker's own child with it: a program's
//! children would go on running, and with them a session the server hands to another worker once the
//! lease expires. So the worker's child is this guard, the leader of the group, with the program as
//! its child in the same group. The guard's death signal is SIGHUP, on which it kills the whole group,
//! itself with it, unless the worker is still its parent (a SIGHUP someone else sent).
//!
//! Otherwise it stays out of the way:
//! - the program gets the guard's stdin, stdout, stderr, environment and working directory;
//! - SIGTERM and SIGINT, which the worker sends the group to stop the program gracefully, reach the
//!   program; the guard catches them (a caught signal, unlike an ignored one, is the default again in
//!   the program after its `exec`) and goes on waiting;
//! - when the program ends, the guard ends the same way: the same exit code, or killed by the same
//!   signal, so the worker reads the program's status from the guard's.
//!
//! Sandboxed programs need no guard: they run in a PID namespace of their own, which the kernel
//! empties when its first process, which dies with the worker, ends.

use std::ffi::OsString;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::sys::signal::{killpg, raise, signal, SigHandler, Signal};
use nix::unistd::{getpgrp, getppid, Pid};

/// The name of the subcommand; the binary that embeds the worker (the `tether` command) answers it with
/// [`main`].
pub const SUBCOMMAND: &str = "program-guard";

/// The worker's process id, for the SIGHUP handler (set before the handler is installed).
static WORKER: AtomicI32 = AtomicI32::new(0);

extern "C" fn kill_the_group(_: nix::libc::c_int) {
    // Only async-signal-safe calls here: killpg and _exit. The SIGKILL ends this process too.
    let _ = killpg(getpgrp(), Signal::SIGKILL);
    // SAFETY: `_exit` is async-signal-safe.
    unsafe { nix::libc::_exit(137) }
}

/// SIGHUP: the worker's death, or a SIGHUP sent by someone else while the worker lives (an operator's
/// `kill -HUP` to every `tether` process after renewing a certificate). Only the first may end the
/// program, so the guard asks whether the worker is still its parent.
extern "C" fn on_hangup(signal: nix::libc::c_int) {
    // Only async-signal-safe calls: getppid, an atomic load, and what `kill_the_group` makes.
    if getppid().as_raw() != WORKER.load(Ordering::SeqCst) {
        kill_the_group(signal);
    }
}

extern "C" fn go_on_waiting(_: nix::libc::c_int) {}

/// Runs `program` (its path, its `argv[0]`, its arguments) as described above, for the worker whose
/// process id is `worker`; returns only on failure, with the error to report.
pub fn main(worker: u32, program: Vec<OsString>) -> std::io::Error {
    let [path, name, args @ ..] = &program[..] else {
        return std::io::Error::other("program-guard: expected PATH ARGV0 [ARG...] after --");
    };
    WORKER.store(worker as i32, Ordering::SeqCst);
    // SAFETY: the handlers make async-signal-safe calls only; this runs before any thread exists.
    unsafe {
        for (sig, handler) in [
            (Signal::SIGHUP, SigHandler::Handler(on_hangup)),
            (Signal::SIGTERM, SigHandler::Handler(go_on_waiting)),
            (Signal::SIGINT, SigHandler::Handler(go_on_waiting)),
        ] {
            if let Err(e) = signal(sig, handler) {
                return std::io::Error::from(e);
            }
        }
    }
    // The worker started this process with SIGHUP as its death signal. If the worker died before the
    // handler above was in place, that SIGHUP either ended this process or, under a worker whose
    // SIGHUP is ignored (`nohup`), was ignored with it: what is left to check is the parent.
    if getppid() != Pid::from_raw(worker as i32) {
        kill_the_group(0);
    }
    let status = match std::process::Command::new(path)
        .arg0(name)
        .args(args)
        .status()
    {
        Ok(status) => status,
        Err(e) => return e,
    };
    if let Some(code) = status.code() {
        std::process::exit(code);
    }
    if let Some(Ok(sig)) = status.signal().map(Signal::try_from) {
        // Ended the way the program ended; no core file for a signal that would write one.
        let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
        // SAFETY: restoring the default action, before any thread exists.
        let _ = unsafe { signal(sig, SigHandler::SigDfl) };
        let _ = raise(sig);
        std::process::exit(128 + sig as i32);
    }
    std::process::exit(1)
}
