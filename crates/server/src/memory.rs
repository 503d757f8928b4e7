//! What requests may hold in memory, by budget (request bodies: `--request-memory`; pages of events:
//! a quarter of it), and how much of each one caller may hold.
//!
//! Two kinds of request hold memory for as long as a client likes to make them: a body that is
//! arriving (paid for as it arrives: a `Content-Length` that lies holds nothing more), and an
//! answer the client does not take (an event page, a live stream's replay, any other read's answer
//! over 16 KiB; an HTTP/2 client can leave a hundred of them unread per connection until the idle
//! timeout closes it). Each pays from a budget, through its [`Share`], held until the memory is let
//! go: a request body until its answer is sent (`http::budget`), from `--request-memory`; a page of
//! events until it is handed out, a live stream's event until its text is written, and a read's
//! answer until its bytes are, from a budget of its own, a quarter of that ([`page_budget`]), so
//! that reads and bodies never compete.
//!
//! A request takes its share only when all of it is free, and never queues: one that does not fit
//! waits for memory to be given back and tries again, while a request that fits goes ahead at once.
//! A queue would be fairer to large requests, but one body of 32 MiB waiting for its 160 MiB at
//! the head of it would hold up every request behind it, however small, until its wait ran out: two
//! environment keys sending such bodies kept an admin's 24-byte request waiting 10 s, then refused.
//! A large request that keeps finding too little free is refused after [`BUDGET_WAIT`].
//!
//! One caller may hold at most [`CALLER_PART`] of the budget at once, over all its requests. A caller
//! is an environment (its key and the session tokens of its items together: claiming items gives no
//! more of the budget) or an admin token. So a caller that holds memory on purpose waits for its own
//! requests, and the rest of the budget stays for everyone else. The part is large enough for one
//! body of the default `--body-limit` at the default `--request-memory`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::service::tokens::Principal;

/// The default `--request-memory`: 256 MiB.
pub const DEFAULT_REQUEST_MEMORY: usize = 256 << 20;

/// The most of the budget one caller may hold at once, as a fraction: three quarters, so that a
/// quarter always stays for the others.
pub const CALLER_PART: (usize, usize) = (3, 4);

/// The budget of the answers being read or handed out (pages of events, and reads' answers over
/// 16 KiB), from `--request-memory`: a quarter of it (64 MiB by default: sixteen reads of a full
/// page at once, and many more pages being handed out).
pub fn page_budget(request_memory: usize) -> usize {
    request_memory / 4
}

/// How long a request waits for its share of the budget before it is refused.
pub const BUDGET_WAIT: Duration = Duration::from_secs(10);

/// The budget is counted in KiB, so that a semaphore's `u32` permits cover any size.
const UNIT: usize = 1024;

/// Request memory, shared by every request of the process, of which each caller may hold
/// [`CALLER_PART`].
#[derive(Clone)]
pub struct MemoryBudget {
    units: Arc<Semaphore>,
    caller_units: usize,
    /// The part of each caller that holds some of the budget now; a caller's entry goes when its
    /// last share does, so the map is bounded by the requests in flight.
    callers: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
    /// Woken whenever a share gives memory back, for the requests waiting for room.
    released: Arc<Notify>,
}

/// Why a request did not get its share.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// More than one caller may hold: it can never be served.
    TooLarge,
    /// The budget, or the caller's part of it, stayed spent by other requests for [`BUDGET_WAIT`].
    Busy,
}

impl MemoryBudget {
    pub fn new(bytes: usize) -> Self {
        let total_units = bytes.div_ceil(UNIT).max(1);
        let (part, whole) = CALLER_PART;
        MemoryBudget {
            units: Arc::new(Semaphore::new(total_units)),
            caller_units: (total_units * part / whole).max(1),
            callers: Arc::default(),
            released: Arc::default(),
        }
    }

    /// What no request holds now, in bytes (for metrics and tests).
    pub fn available(&self) -> usize {
        self.units.available_permits() * UNIT
    }

    /// `count` units of `pool` once that many are free at once, without queueing (see the module's
    /// doc), or [`Refusal::Busy`] at `deadline`.
    async fn acquire(
        &self,
        pool: &Arc<Semaphore>,
        count: u32,
        deadline: tokio::time::Instant,
    ) -> Result<OwnedSemaphorePermit, Refusal> {
        loop {
            // Listening before trying: memory given back between the try and the wait still wakes.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            match pool.clone().try_acquire_many_owned(count) {
                Ok(permit) => return Ok(permit),
                Err(TryAcquireError::NoPermits) => {}
                Err(TryAcquireError::Closed) => return Err(Refusal::Busy),
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return Err(Refusal::Busy);
            }
        }
    }

    /// The most one caller may hold, in bytes.
    pub fn caller_part(&self) -> usize {
        self.caller_units * UNIT
    }

    /// An empty share for one request of `principal` (`None`: a public route's caller).
    pub fn share_for(&self, principal: Option<&Principal>) -> Share {
        let caller = caller_of(principal);
        let part = self
            .callers
            .lock()
            .expect("no code panics holding the callers' map")
            .entry(caller.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(self.caller_units)))
            .clone();
        Share {
            budget: self.clone(),
            caller,
            part,
            held: None,
        }
    }
}

/// Who pays for a request (see the module's doc).
fn caller_of(principal: Option<&Principal>) -> String {
    match principal {
        Some(Principal::EnvironmentKey { environment_id, .. })
        | Some(Principal::SessionToken { environment_id, .. }) => format!("env:{environment_id}"),
        Some(Principal::Admin { credential_id }) => format!("admin:{credential_id}"),
        // Public routes neither take a body nor answer with events; were one added, its callers
        // would share one part.
        None => "public".to_owned(),
    }
}

/// What one request holds of the budget and of its caller's part, given back when it drops.
pub struct Share {
    budget: MemoryBudget,
    caller: String,
    part: Arc<Semaphore>,
    /// What this request holds of the caller's part, and the same of the whole.
    held: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

impl Share {
    /// Adds `bytes` to what the request holds: from its caller's part first, then from the whole,
    /// each within [`BUDGET_WAIT`].
    pub async fn take(&mut self, bytes: usize) -> Result<(), Refusal> {
        self.take_within(bytes, BUDGET_WAIT).await
    }

    /// [`Share::take`], waiting at most `wait` (a request that already waited for part of what it
    /// holds: `BUDGET_WAIT` is for all its waits together).
    pub async fn take_within(&mut self, bytes: usize, wait: Duration) -> Result<(), Refusal> {
        self.take_by(bytes, tokio::time::Instant::now() + wait)
            .await
    }

    /// [`Share::take`] without waiting: for memory already spent (an answer made), which a wait
    /// would keep spent while it lasts.
    pub async fn take_now(&mut self, bytes: usize) -> Result<(), Refusal> {
        self.take_by(bytes, tokio::time::Instant::now()).await
    }

    async fn take_by(
        &mut self,
        bytes: usize,
        deadline: tokio::time::Instant,
    ) -> Result<(), Refusal> {
        let units = bytes.div_ceil(UNIT);
        if units == 0 {
            return Ok(());
        }
        let total = self.units().saturating_add(units);
        if total > self.budget.caller_units {
            return Err(Refusal::TooLarge);
        }
        let count = u32::try_from(units).map_err(|_| Refusal::TooLarge)?;
        let of_part = self.budget.acquire(&self.part, count, deadline).await?;
        let of_whole = match self
            .budget
            .acquire(&self.budget.units, count, deadline)
            .await
        {
            Ok(of_whole) => of_whole,
            Err(refusal) => {
                // What was taken of the part goes back: a request of the caller that found the
                // part short meanwhile may fit now.
                drop(of_part);
                self.budget.released.notify_waiters();
                return Err(refusal);
            }
        };
        match &mut self.held {
            Some((part, whole)) => {
                part.merge(of_part);
                whole.merge(of_whole);
            }
            None => self.held = Some((of_part, of_whole)),
        }
        Ok(())
    }

    /// What the request holds, in units (the same of its caller's part and of the whole).
    fn units(&self) -> usize {
        self.held.as_ref().map_or(0, |(part, _)| part.num_permits())
    }

    /// Gives back what the request holds beyond `bytes` (a reservation for the most a read could
    /// bring, once the read has said what it brought; what is left of a page as it is handed out).
    pub fn shrink_to(&mut self, bytes: usize) {
        let keep = bytes.div_ceil(UNIT);
        let Some((part, whole)) = &mut self.held else {
            return;
        };
        if keep >= part.num_permits() {
            return;
        }
        let release = part.num_permits() - keep;
        drop(part.split(release));
        drop(whole.split(release));
        debug_assert_eq!(whole.num_permits(), keep);
        self.budget.released.notify_waiters();
    }

    pub fn is_empty(&self) -> bool {
        self.units() == 0
    }

    /// Moves what covers `bytes` of what this share holds (at most all of it) into a share of its
    /// own: the memory of one piece of an answer, held until whoever ends up holding that piece (a
    /// buffer of hyper's, a socket's queue) lets it go.
    pub fn split_off(&mut self, bytes: usize) -> Share {
        let mut piece = Share {
            budget: self.budget.clone(),
            caller: self.caller.clone(),
            part: self.part.clone(),
            held: None,
        };
        let units = bytes.div_ceil(UNIT).min(self.units());
        if let (Some((part, whole)), true) = (&mut self.held, units > 0) {
            let of_part = part.split(units).expect("no more than is held");
            let of_whole = whole.split(units).expect("no more than is held");
            piece.held = Some((of_part, of_whole));
        }
        piece
    }
}

impl Share {
    /// `data` as bytes that keep this share until the last of them is let go: memory that an
    /// answer hands to hyper stays paid for while hyper's buffers (or a socket's queue) hold it,
    /// however long a client that reads nothing makes that.
    pub fn paying_for<T>(self, data: T) -> bytes::Bytes
    where
        T: AsRef<[u8]> + Send + 'static,
    {
        bytes::Bytes::from_owner(Paid { data, _share: self })
    }
}

/// Bytes and the share that pays for them ([`Share::paying_for`]).
struct Paid<T> {
    data: T,
    _share: Share,
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for Paid<T> {
    fn as_ref(&self) -> &[u8] {
        self.data.as_ref()
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        if self.held.take().is_some() {
            self.budget.released.notify_waiters();
        }
        let mut callers = self
            .budget
            .callers
            .lock()
            .expect("no code panics holding the callers' map");
        // Only the map and this share still know the part: no other request of the caller holds or
        // waits for it (each got its handle under this lock), so the entry can go.
        if Arc::strong_count(&self.part) == 2 {
            debug_assert_eq!(self.part.available_permits(), self.budget.caller_units);
            callers.remove(&self.caller);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(id: &str) -> Principal {
        Principal::EnvironmentKey {
            credential_id: format!("key_{id}"),
            environment_id: id.to_owned(),
        }
    }

    #[tokio::test]
    async fn a_share_larger_than_a_callers_part_is_refused_at_once() {
        let budget = MemoryBudget::new(64 * 1024);
        assert_eq!(budget.caller_part(), 48 * 1024);
        let mut share = budget.share_for(Some(&env("a")));
        assert_eq!(share.take(49 * 1024).await, Err(Refusal::TooLarge));
        share.take(40 * 1024).await.unwrap();
        // The request's own shares add up.
        assert_eq!(share.take(9 * 1024).await, Err(Refusal::TooLarge));
        share.take(8 * 1024).await.unwrap();
        assert!(!share.is_empty());
        let mut nothing = budget.share_for(Some(&env("a")));
        nothing.take(0).await.unwrap();
        assert!(nothing.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_waits_for_its_own_requests_and_leaves_the_rest_to_others() {
        let budget = MemoryBudget::new(64 * 1024);
        let mut first = budget.share_for(Some(&env("a")));
        first.take(40 * 1024).await.unwrap();
        // The same caller again, by a session token of its environment: its part is spent.
        let token = Principal::SessionToken {
            work_id: "work_1".into(),
            environment_id: "a".into(),
            session_id: "sesn_1".into(),
            token_hash: "h".into(),
        };
        let mut second = budget.share_for(Some(&token));
        let started = tokio::time::Instant::now();
        assert_eq!(second.take(16 * 1024).await, Err(Refusal::Busy));
        assert_eq!(started.elapsed(), BUDGET_WAIT);
        // Another caller gets what is left of the whole at once.
        let mut other = budget.share_for(Some(&env("b")));
        other.take(24 * 1024).await.unwrap();
        // The whole is spent now, for everyone.
        let admin = Principal::Admin {
            credential_id: "tok_1".into(),
        };
        let mut third = budget.share_for(Some(&admin));
        assert_eq!(third.take(1024).await, Err(Refusal::Busy));
        drop((first, second, third));
        let mut again = budget.share_for(Some(&env("a")));
        again.take(40 * 1024).await.unwrap();
        drop((again, other));
        assert!(
            budget.callers.lock().unwrap().is_empty(),
            "a caller's entry goes with its last share"
        );
        assert_eq!(budget.units.available_permits(), 64);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_fits_never_waits_behind_one_that_does_not() {
        let budget = MemoryBudget::new(64 * 1024);
        let mut big = budget.share_for(Some(&env("a")));
        big.take(40 * 1024).await.unwrap();
        // Another caller's large request waits for room it cannot have yet.
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move {
                let mut share = budget.share_for(Some(&env("b")));
                share.take(40 * 1024).await.map(|()| share)
            }
        });
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert!(!waiting.is_finished());
        // A small one of a third caller goes ahead of it at once.
        let admin = Principal::Admin {
            credential_id: "tok_1".into(),
        };
        let mut small = budget.share_for(Some(&admin));
        let started = tokio::time::Instant::now();
        small.take(1024).await.unwrap();
        assert_eq!(started.elapsed(), std::time::Duration::ZERO);
        drop(small);
        // Once the memory is given back, the waiting one gets it, well before its wait runs out.
        drop(big);
        let share = waiting.await.unwrap().expect("room was given back");
        assert!(!share.is_empty());
        assert!(started.elapsed() < BUDGET_WAIT);
    }

    #[tokio::test]
    async fn a_share_gives_back_what_it_holds_beyond_what_it_keeps() {
        let budget = MemoryBudget::new(64 * 1024);
        let mut share = budget.share_for(Some(&env("a")));
        share.take(40 * 1024).await.unwrap();
        share.shrink_to(10 * 1024 + 1);
        assert_eq!(budget.units.available_permits(), 64 - 11);
        // Never grows by shrinking.
        share.shrink_to(30 * 1024);
        assert_eq!(budget.units.available_permits(), 64 - 11);
        // What was given back can be taken again, by this caller or another.
        share.take(30 * 1024).await.unwrap();
        assert_eq!(budget.units.available_permits(), 64 - 41);
        share.shrink_to(0);
        assert!(share.is_empty());
        assert_eq!(budget.units.available_permits(), 64);
    }
}
