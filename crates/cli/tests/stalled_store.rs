//! A SQLite store whose reads stall: each read ends in a 503 (a store that does not answer), not a
//! 500, and the server answers as before once the stall ends.
//!
//! The stall is real to SQLite: this test process holds, with `fcntl`, the write locks on every
//! read-mark of the database's shared memory (`<data-dir>/tether.db-shm`), as another process in the
//! middle of a recovery would. Every read of the server then waits in SQLite's own lock retries, on the
//! thread that runs it, for as long as a disk that has stopped answering would hold it. POSIX locks
//! belong to a process, so the server must be a process of its own.

mod support;

use std::fs::File;
use std::path::Path;
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg};
use nix::libc;
use reqwest::StatusCode;
use support::api::Api;
use support::ServerProcess;

/// Where SQLite's unix VFS keeps the locks of a WAL database's shared memory, and the first of the
/// five read-marks (`WAL_READ_LOCK(0)`, `120 + 3`; see SQLite's `os_unix.c` and `wal.c`).
const READ_MARKS: std::ops::Range<i64> = 123..128;

/// Write-locks every read-mark of `shm`, waiting while a read of the server holds one.
fn stall_every_read(shm: &Path) -> File {
    let file = File::options()
        .read(true)
        .write(true)
        .open(shm)
        .expect("open the shared memory");
    let lock = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: READ_MARKS.start,
        l_len: READ_MARKS.end - READ_MARKS.start,
        l_pid: 0,
    };
    for _ in 0..1_000 {
        if fcntl(&file, FcntlArg::F_SETLK(&lock)).is_ok() {
            return file;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the read-marks stayed locked by the server for 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_reads_end_in_503_and_the_server_answers_once_they_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = ServerProcess::start(dir.path(), &[]);
    let api = Api::of(&server);
    let env = api.self_hosted_environment("stalled").await;
    let held = stall_every_read(&dir.path().join("tether.db-shm"));

    // More reads than the server has runtime threads (one per core) or read connections (4).
    let reads: Vec<_> = (0..8)
        .map(|_| {
            let api = api.clone();
            let path = format!("/environments/{env}");
            tokio::spawn(async move { api.call(reqwest::Method::GET, &path, None).await })
        })
        .collect();
    // `/healthz` and `/readyz` are not asked here: which of them a stalled runtime thread can still
    // hold up depends on the scheduler (a task in that thread's LIFO slot waits for it), so their
    // answers vary from run to run. See ARCHITECTURE.md, "Bounded reads".
    // SQLite gives up on its lock retries while the locks are still held: each read is a store that
    // does not answer (503), not a server error.
    for read in reads {
        let (status, body) = read.await.expect("read task");
        assert_eq!(status, 503, "a stalled read: {body}");
        assert_eq!(body["error"]["type"], "overloaded_error", "{body}");
    }

    drop(held);
    api.get(&format!("/environments/{env}")).await;
    let http = reqwest::Client::new();
    let ready = http
        .get(format!("{}/readyz", server.base))
        .send()
        .await
        .expect("/readyz");
    assert_eq!(ready.status(), StatusCode::OK);
    server.terminate();
}
