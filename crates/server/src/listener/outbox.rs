//! What one HTTP/2 connection's answers have handed to hyper and hyper still holds, and the bound on
//! it.
//!
//! h2 buffers up to its send buffer (`H2_MAX_SEND_BUFFER`) and a piece for each stream, and a
//! connection carries up to `H2_MAX_STREAMS` streams. A client that stops reading the socket, or keeps
//! its streams' windows shut, could so make the server hold some 10 MB per connection, and could do it
//! without a credential: `/openapi.json` is public and larger than a send buffer. So the answers of a
//! connection share one bound, [`MAX_UNSENT`]. A body hands hyper its next data frame only while the
//! connection's count is below it, and waits otherwise.
//!
//! The count is exact and cannot leak: each data frame handed out owns a [`Held`] that adds its size
//! when it is made and takes it off when hyper lets the frame go, whether written to the socket or
//! thrown away with a stream the client reset. No byte the client has not taken is forgotten, and no
//! byte is counted after its memory is free.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

use super::H2_MAX_UNSENT as MAX_UNSENT;

/// One connection's count and the bodies waiting for room.
#[derive(Default)]
pub(super) struct Outbox {
    unsent: AtomicUsize,
    /// Bodies waiting for the count to fall below the bound (at most one per stream).
    waiting: Mutex<Vec<Waker>>,
}

impl Outbox {
    /// Ready when a body may hand out its next data frame; otherwise the body is woken when hyper has
    /// let go of enough.
    pub(super) fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.unsent.load(Ordering::Acquire) < MAX_UNSENT {
            return Poll::Ready(());
        }
        {
            let mut waiting = self
                .waiting
                .lock()
                .expect("no code panics holding the list");
            if !waiting.iter().any(|w| w.will_wake(cx.waker())) {
                waiting.push(cx.waker().clone());
            }
        }
        // Looked at again after registering: a frame let go of in between found no one to wake.
        if self.unsent.load(Ordering::Acquire) < MAX_UNSENT {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// `data` as handed to hyper: counted until hyper lets go of it.
    pub(super) fn hand(self: &Arc<Self>, data: Bytes) -> Bytes {
        if data.is_empty() {
            return data;
        }
        self.unsent.fetch_add(data.len(), Ordering::AcqRel);
        Bytes::from_owner(Held {
            data,
            outbox: self.clone(),
        })
    }

    fn let_go(&self, bytes: usize) {
        let before = self.unsent.fetch_sub(bytes, Ordering::AcqRel);
        assert!(bytes <= before, "more let go of than was handed out");
        if before - bytes < MAX_UNSENT {
            let waiting = std::mem::take(
                &mut *self
                    .waiting
                    .lock()
                    .expect("no code panics holding the list"),
            );
            for waker in waiting {
                waker.wake();
            }
        }
    }

    #[cfg(test)]
    fn unsent(&self) -> usize {
        self.unsent.load(Ordering::Acquire)
    }
}

/// A data frame handed to hyper, counted in its connection's [`Outbox`] for as long as it lives.
struct Held {
    data: Bytes,
    outbox: Arc<Outbox>,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.outbox.let_go(self.data.len());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;
    use std::task::Wake;

    use super::*;

    struct Count(AtomicU32);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_frame_is_counted_until_it_and_every_slice_of_it_are_gone() {
        let outbox = Arc::new(Outbox::default());
        let frame = outbox.hand(Bytes::from(vec![7u8; 1000]));
        assert_eq!(&frame[..], &[7u8; 1000][..]);
        assert_eq!(outbox.unsent(), 1000);
        let slice = frame.slice(10..20);
        drop(frame);
        assert_eq!(outbox.unsent(), 1000, "a slice keeps the frame alive");
        drop(slice);
        assert_eq!(outbox.unsent(), 0);
        assert_eq!(outbox.hand(Bytes::new()).len(), 0);
        assert_eq!(outbox.unsent(), 0);
    }

    #[test]
    fn a_body_waits_while_the_connection_holds_the_bound_and_is_woken_when_hyper_lets_go() {
        let outbox = Arc::new(Outbox::default());
        let woken = Arc::new(Count(AtomicU32::new(0)));
        let waker = Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(outbox.poll_room(&mut cx).is_ready());
        let most = outbox.hand(Bytes::from(vec![0u8; MAX_UNSENT - 1]));
        assert!(outbox.poll_room(&mut cx).is_ready(), "below the bound");
        let small = outbox.hand(Bytes::from(vec![0u8; 1024]));
        let piece = outbox.hand(Bytes::from(vec![0u8; 16 * 1024]));
        assert!(outbox.poll_room(&mut cx).is_pending());
        assert!(outbox.poll_room(&mut cx).is_pending());
        // Letting go of less than what brings the count below the bound wakes no one.
        drop(small);
        assert_eq!(woken.0.load(Ordering::Relaxed), 0);
        drop(piece);
        assert_eq!(woken.0.load(Ordering::Relaxed), 1, "woken once");
        assert!(outbox.poll_room(&mut cx).is_ready());
        drop(most);
        assert_eq!(outbox.unsent(), 0);
    }
}
