//! Clients that misbehave on the socket.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

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
