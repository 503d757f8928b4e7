//! Wake-ups for live session streams. A stream never polls the store on a timer: it waits here for a
//! change to its session (written by this process, or announced by another), then reads what is new.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

#[derive(Clone, Default)]
pub struct SessionHub {
    inner: Arc<Mutex<HashMap<String, watch::Sender<u64>>>>,
    closed: Arc<watch::Sender<bool>>,
}

impl SessionHub {
    /// A receiver that changes whenever the session does.
    pub fn subscribe(&self, session_id: &str) -> watch::Receiver<u64> {
        let mut map = self.inner.lock().expect("hub lock");
        map.retain(|_, tx| tx.receiver_count() > 0);
        map.entry(session_id.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    pub fn notify(&self, session_id: &str) {
        let map = self.inner.lock().expect("hub lock");
        if let Some(tx) = map.get(session_id) {
            tx.send_modify(|n| *n += 1);
        }
    }

    /// Wakes every stream, to read whatever it may have missed.
    pub fn notify_all(&self) {
        let map = self.inner.lock().expect("hub lock");
        for tx in map.values() {
            tx.send_modify(|n| *n += 1);
        }
    }

    /// Ends every stream (shutdown).
    pub fn close_all(&self) {
        self.closed.send_replace(true);
    }

    pub fn closed(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }

    /// Streams currently open (for metrics).
    pub fn streams(&self) -> usize {
        self.inner
            .lock()
            .expect("hub lock")
            .values()
            .map(|tx| tx.receiver_count())
            .sum()
    }
}
