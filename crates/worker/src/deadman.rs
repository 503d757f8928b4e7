//! The worker's dead man's switch: a kernel timer that SIGKILLs the whole worker process when a program
//! outlives its lease by half the kill margin, for when the worker itself cannot act — stopped
//! (`SIGSTOP`, a frozen VM), or starved. A SIGKILL ends even a stopped process, and the programs die with
//! the worker (each is spawned with `PR_SET_PDEATHSIG = SIGKILL`), so no program survives into the time
//! the server may hand its session to another worker. A healthy worker never lets it fire: its own
//! deadline timer ([`super::heartbeat`]) kills the program at the deadline and disarms its entry.
//! The timer counts on `CLOCK_BOOTTIME`, so time spent suspended counts against the lease as it does on
//! the server.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use nix::sys::signal::{SigEvent, SigevNotify, Signal};
use nix::sys::time::TimeSpec;
use nix::sys::timer::{Expiration, Timer, TimerSetTimeFlags};
use nix::time::ClockId;
use tokio::sync::watch;
use tokio::time::Instant;

/// One armed deadline per running program, and the one kernel timer set to the earliest.
struct Switch {
    timer: Option<Timer>,
    deadlines: BTreeMap<u64, Instant>,
}

// SAFETY: `Timer` wraps a `timer_t`, a kernel timer id (a pointer type in libc on Linux) that any thread
// may use; it is only ever used under the mutex.
unsafe impl Send for Switch {}

fn switch() -> &'static Mutex<Switch> {
    static SWITCH: OnceLock<Mutex<Switch>> = OnceLock::new();
    SWITCH.get_or_init(|| {
        let event = SigEvent::new(SigevNotify::SigevSignal {
            signal: Signal::SIGKILL,
            si_value: 0,
        });
        // CLOCK_BOOTTIME, unlike the monotonic clock, runs while the machine is suspended: a laptop
        // that sleeps through its lease wakes to a switch that fires at once, before the program can
        // act on a lease the server has already given away.
        let timer = match Timer::new(ClockId::CLOCK_BOOTTIME, event) {
            Ok(timer) => Some(timer),
            Err(error) => {
                tracing::warn!(
                    %error,
                    "cannot create the dead man's switch: a worker that is stopped or starved \
                     could keep a program past its lease"
                );
                None
            }
        };
        Mutex::new(Switch {
            timer,
            deadlines: BTreeMap::new(),
        })
    })
}

impl Switch {
    fn rearm(&mut self) {
        let Some(timer) = self.timer.as_mut() else {
            return;
        };
        let spec = match self.deadlines.values().min() {
            // At least a nanosecond: zero would disarm.
            Some(at) => TimeSpec::from_duration(
                at.saturating_duration_since(Instant::now())
                    .max(std::time::Duration::from_nanos(1)),
            ),
            None => TimeSpec::new(0, 0),
        };
        let _ = timer.set(Expiration::OneShot(spec), TimerSetTimeFlags::empty());
    }
}

/// Keeps the switch armed at the latest value of `last_resort` while it lives; disarms on drop.
pub struct Guard {
    id: u64,
    armed: Arc<AtomicBool>,
    follower: tokio::task::JoinHandle<()>,
}

impl Guard {
    pub fn arm(mut last_resort: watch::Receiver<Instant>) -> Guard {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let armed = Arc::new(AtomicBool::new(true));
        set(id, &armed, *last_resort.borrow_and_update());
        let follower = {
            let armed = armed.clone();
            tokio::spawn(async move {
                while last_resort.changed().await.is_ok() {
                    set(id, &armed, *last_resort.borrow_and_update());
                }
            })
        };
        Guard {
            id,
            armed,
            follower,
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.follower.abort();
        // Under the lock, so that a follower caught mid-update cannot arm the entry again.
        let Ok(mut switch) = switch().lock() else {
            return;
        };
        self.armed.store(false, Ordering::SeqCst);
        switch.deadlines.remove(&self.id);
        switch.rearm();
    }
}

fn set(id: u64, armed: &AtomicBool, at: Instant) {
    let Ok(mut switch) = switch().lock() else {
        return;
    };
    if armed.load(Ordering::SeqCst) {
        switch.deadlines.insert(id, at);
        switch.rearm();
    }
}
