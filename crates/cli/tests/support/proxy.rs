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
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(relay(client, upstream, watcher.clone()));
            }
        });
        Proxy { url, mode, task }
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

async fn relay(client: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<Mode>) {
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
    let up = pipe(client_read, server_write, mode.clone());
    let down = pipe(server_read, client_write, mode.clone());
    // Either direction ending (EOF, error, or a mode that ends the connection) ends both.
    tokio::select! {
        _ = up => {}
        _ = down => {}
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
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
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
