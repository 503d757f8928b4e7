//! A TCP proxy on 127.0.0.1 that misbehaves on command, to put a network between a worker and the server:
//! it forwards, delays every chunk, refuses (closes connections at once), drops (swallows every byte and
//! never answers) or freezes (stops reading: connections stay open, buffers fill). Leaving a dropping or
//! freezing mode closes the connections held through it, as a real partition would end them.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Forward,
    /// Forward, each chunk after this long.
    Delay(Duration),
    /// Close every connection at once: calls fail fast.
    Refuse,
    /// Read and discard everything: calls hang.
    Drop,
    /// Read nothing: calls hang.
    Freeze,
}

impl Mode {
    fn forwards(self) -> bool {
        matches!(self, Mode::Forward | Mode::Delay(_))
    }
}

pub struct Proxy {
    pub url: String,
    mode: watch::Sender<Mode>,
    /// Counts [`Proxy::forget_connections`]: a connection goes silent once it moves past the count
    /// at its accept.
    forgotten: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding to `upstream` (`http://127.0.0.1:port`).
    pub async fn start(upstream: &str) -> Proxy {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("server address");
        assert!(upstream.ip().is_loopback(), "tests stay on loopback");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().expect("proxy address"));
        let (mode, watcher) = watch::channel(Mode::Forward);
        let (forgotten, forgetting) = watch::channel(0);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let forgotten = Forgotten::at_accept(&forgetting);
                tokio::spawn(relay(client, upstream, watcher.clone(), forgotten));
            }
        });
        Proxy {
            url,
            mode,
            forgotten,
            task,
        }
    }

    /// Every connection open now goes silent for good, its sockets left open, as through a NAT that
    /// forgot them: what is sent on it is never delivered, and no error says so. New connections
    /// are forwarded as the mode says.
    pub fn forget_connections(&self) {
        self.forgotten.send_modify(|n| *n += 1);
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    forgotten: Forgotten,
) {
    let current = *mode.borrow_and_update();
    if !current.forwards() {
        misbehave(client, current, &mut mode).await;
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pipe(client_read, server_write, mode.clone(), forgotten.clone());
    let down = pipe(server_read, client_write, mode.clone(), forgotten);
    // Either direction ending (EOF, error, or a mode that ends the connection) ends both.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// Whether one connection has been forgotten ([`Proxy::forget_connections`]).
#[derive(Clone)]
struct Forgotten {
    count: watch::Receiver<u64>,
    at_accept: u64,
}

impl Forgotten {
    fn at_accept(count: &watch::Receiver<u64>) -> Forgotten {
        Forgotten {
            at_accept: *count.borrow(),
            count: count.clone(),
        }
    }

    /// Returns once the connection is forgotten.
    async fn happened(mut self) {
        let at_accept = self.at_accept;
        let _ = self.count.wait_for(|n| *n != at_accept).await;
    }
}

/// What a connection made while the proxy does not forward goes through.
async fn misbehave(mut client: TcpStream, current: Mode, mode: &mut watch::Receiver<Mode>) {
    match current {
        Mode::Refuse => {}
        Mode::Drop => {
            let mut sink = [0u8; 4096];
            loop {
                tokio::select! {
                    read = client.read(&mut sink) => if matches!(read, Ok(0) | Err(_)) { return },
                    _ = mode.wait_for(|m| m.forwards()) => return,
                }
            }
        }
        Mode::Freeze => {
            let _ = mode.wait_for(|m| m.forwards()).await;
        }
        Mode::Forward | Mode::Delay(_) => unreachable!("forwarding modes relay"),
    }
}

/// Copies one direction chunk by chunk, obeying the mode before each chunk is passed on.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    forgotten: Forgotten,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let forgotten = forgotten.happened();
    tokio::pin!(forgotten);
    loop {
        let n = tokio::select! {
            () = &mut forgotten => {
                // Silent for good, both sockets kept open: nothing passes, nothing is closed.
                let _open = (&from, &to);
                std::future::pending::<()>().await;
                return;
            },
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = *mode.borrow_and_update();
                match now {
                    Mode::Forward | Mode::Delay(_) => continue,
                    Mode::Refuse => return,
                    Mode::Drop | Mode::Freeze => {
                        hold(&mut from, &mut mode).await;
                        return;
                    }
                }
            }
        };
        let current = *mode.borrow_and_update();
        match current {
            Mode::Forward => {}
            Mode::Delay(d) => tokio::time::sleep(d).await,
            Mode::Refuse => return,
            Mode::Drop | Mode::Freeze => {
                hold(&mut from, &mut mode).await;
                return;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Holds an established connection silent until the proxy forwards again (then it is closed).
async fn hold(from: &mut tokio::net::tcp::OwnedReadHalf, mode: &mut watch::Receiver<Mode>) {
    let mut sink = [0u8; 4096];
    loop {
        let dropping = *mode.borrow() == Mode::Drop;
        tokio::select! {
            read = from.read(&mut sink), if dropping => if matches!(read, Ok(0) | Err(_)) {
                // The peer gave up; keep the other direction silent until the mode changes.
                let _ = mode.wait_for(|m| m.forwards()).await;
                return;
            },
            changed = mode.changed() => {
                let now = *mode.borrow_and_update();
                if changed.is_err() || now.forwards() || now == Mode::Refuse {
                    return;
                }
            }
        }
    }
}
