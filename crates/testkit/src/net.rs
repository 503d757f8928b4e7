//! Clients that misbehave on the socket.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A client's end of a TCP connection whose reading can be stopped: once [`Pausable::stop_reading`]
/// is called, the client takes nothing more off the socket, while its writes still go out. To the
/// server, a client that no longer reads its answers.
pub struct Pausable {
    inner: TcpStream,
    reading: Arc<AtomicBool>,
}

/// Stops a [`Pausable`]'s reading from elsewhere (the stream itself is usually owned by a client
/// library's connection task).
#[derive(Clone)]
pub struct ReadSwitch(Arc<AtomicBool>);

impl ReadSwitch {
    pub fn stop_reading(&self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Pausable {
    pub fn new(inner: TcpStream) -> (Pausable, ReadSwitch) {
        let reading = Arc::new(AtomicBool::new(true));
        (
            Pausable {
                inner,
                reading: reading.clone(),
            },
            ReadSwitch(reading),
        )
    }
}

impl AsyncRead for Pausable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.reading.load(Ordering::Acquire) {
            // Never woken: this end reads nothing more, ever.
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Pausable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An HTTP/2 client connection (prior knowledge) over `io`, whose streams may each hold `window` bytes
/// unread (the connection as a whole 1 GiB), and its connection task, which runs until the server
/// closes the connection.
pub async fn h2_handshake<IO>(
    io: IO,
    window: u32,
) -> (
    hyper::client::conn::http2::SendRequest<String>,
    tokio::task::JoinHandle<()>,
)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(window)
        .initial_connection_window_size(1024 * 1024 * 1024)
        .handshake::<_, String>(TokioIo::new(io))
        .await
        .expect("an HTTP/2 handshake");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, conn)
}

/// [`h2_handshake`] on a fresh TCP connection to `address`.
pub async fn h2_client(
    address: impl tokio::net::ToSocketAddrs,
    window: u32,
) -> (
    hyper::client::conn::http2::SendRequest<String>,
    tokio::task::JoinHandle<()>,
) {
    let tcp = TcpStream::connect(address).await.expect("connect");
    h2_handshake(tcp, window).await
}

/// [`h2_handshake`] over a [`Pausable`] stream, with windows so large that flow control never holds
/// the server back: once its reading is stopped, only the socket does.
pub async fn h2_client_that_may_stop_reading(
    address: impl tokio::net::ToSocketAddrs,
) -> (
    hyper::client::conn::http2::SendRequest<String>,
    ReadSwitch,
    tokio::task::JoinHandle<()>,
) {
    let tcp = TcpStream::connect(address).await.expect("connect");
    let (io, reading) = Pausable::new(tcp);
    let (sender, conn) = h2_handshake(io, 16 * 1024 * 1024).await;
    (sender, reading, conn)
}
