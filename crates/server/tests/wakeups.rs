//! Long-poll wake-ups cost the store a bounded number of queue scans: one enqueue with many polls
//! waiting makes each woken poll scan about once, instead of handing a fruitless wake-up round the
//! waiters for as long as they wait. On a shared database every scan is a round trip, so this is what
//! lets many workers wait on several servers.

mod counting;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use counting::counting_app;
use tether_core::resources::Environment;
use tether_core::{ManualClock, SystemClock, Timestamp};
use tether_server::service::agents::NewAgent;
use tether_server::service::sessions::NewSession;
use tether_server::service::tokens::NewCredential;
use tether_server::service::work::{ClaimAsk, KeyedTry, TrySent};
use tether_server::App;
use tether_testkit::backends;

// The queue is empty in most of these tests; agents and sessions are needed only where an item is.

/// In a cluster a notice often arrives for an item that a poll elsewhere has already taken: the
/// woken poll finds nothing. That wake-up must end with its scan, not travel on to the next waiter,
/// which would find nothing either and pass it on again, a query each time, until the polls end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fruitless_wake_up_costs_one_scan() {
    const WAITERS: u64 = 8;
    for backend in backends() {
        let (_location, app, counting, env) =
            counting_app(&backend, Arc::new(SystemClock), "wakeups").await;

        let polls: Vec<_> = (0..WAITERS)
            .map(|i| {
                let (app, env) = (app.clone(), env.clone());
                tokio::spawn(async move {
                    let worker = format!("w{i}");
                    app.poll(
                        &env,
                        Some(&worker),
                        None,
                        Some(Duration::from_millis(999)),
                        5_000,
                    )
                    .await
                    .expect("poll")
                })
            })
            .collect();
        // Until every poll is waiting (after one scan at least: those that came after a scan found
        // the queue empty wait without one of their own).
        while counting.scans.load(Ordering::SeqCst) < 1 || app.waiters.count() < WAITERS as usize {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let before = counting.scans.load(Ordering::SeqCst);
        assert_eq!(app.waiters.wake(&env.id, 1), 1);
        for poll in polls {
            assert!(poll.await.expect("poll task").is_none());
        }
        let scans = counting.scans.load(Ordering::SeqCst) - before;
        assert!(
            scans <= 2,
            "{}: one fruitless wake-up made {scans} queue scans with {WAITERS} polls waiting",
            backend.name()
        );
        app.begin_shutdown();
    }
}

/// Idle workers re-poll about once a second (`block_ms` is at most 999). A scan that found the queue
/// empty spares the re-polls after it a scan of their own until something is announced, and an
/// enqueue is still delivered to a parked poll at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_re_polls_wait_without_scanning() {
    const ROUNDS: u64 = 5;
    for backend in backends() {
        // The server's clock stands still, so a scan mark cannot age out during the test.
        let clock = ManualClock::new(Timestamp::from_micros(1_700_000_000_000_000));
        let (_location, app, counting, env) =
            counting_app(&backend, Arc::new(clock), "parked").await;
        for _ in 0..ROUNDS {
            let got = app
                .poll(
                    &env,
                    Some("idle"),
                    None,
                    Some(Duration::from_millis(20)),
                    5_000,
                )
                .await
                .expect("poll");
            assert!(got.is_none());
        }
        let scans = counting.scans.load(Ordering::SeqCst);
        // The server's clock stands still here, so the mark cannot age out between the rounds.
        assert_eq!(
            scans,
            1,
            "{}: {ROUNDS} idle polls in a row scanned {scans} times",
            backend.name()
        );
        // Anything that wakes the environment's waiters ends the mark: a woken parked poll scans.
        let waiting = {
            let (app, env) = (app.clone(), env.clone());
            tokio::spawn(async move {
                app.poll(
                    &env,
                    Some("idle"),
                    None,
                    Some(Duration::from_millis(999)),
                    5_000,
                )
                .await
                .expect("poll")
            })
        };
        for _ in 0..2_000 {
            if app.waiters.count() >= 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let before = counting.scans.load(Ordering::SeqCst);
        app.waiters.wake(&env.id, 1);
        assert!(waiting.await.expect("poll task").is_none());
        assert!(
            counting.scans.load(Ordering::SeqCst) > before,
            "{}: a woken poll scans",
            backend.name()
        );
        app.begin_shutdown();
    }
}

/// A claim or a poll's delivery takes an item out of the queue; it puts none in. Neither may wake
/// the environment's waiters (nor tell other servers to), which would end the mark that spares
/// parked polls their scans: with 2,000 idle workers, every take would cost a scan of each re-poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_or_a_delivery_wakes_no_waiter() {
    for backend in backends() {
        let clock = ManualClock::new(Timestamp::from_micros(1_700_000_000_000_000));
        let (_location, app, counting, env) =
            counting_app(&backend, Arc::new(clock), "claimed").await;
        two_sessions(&app, &env).await;
        // Both delivered and not acknowledged: not claimable for the default reclaim window.
        let delivered = app.poll(&env, Some("w1"), None, None, 5_000).await;
        let item = delivered.expect("poll").expect("the first item").item;
        let delivered = app.poll(&env, Some("w1"), None, None, 5_000).await;
        let other = delivered.expect("poll").expect("the second item").item;
        let idle = async || {
            let block = Some(Duration::from_millis(20));
            let got = app.poll(&env, Some("idle"), None, block, 5_000).await;
            assert!(got.expect("poll").is_none());
        };
        idle().await;
        let before = counting.scans.load(Ordering::SeqCst);
        // A claim that reclaims at once takes the delivery over.
        let claimed = app
            .claim(&env, Some("w2"), None, None, 0, ClaimAsk::default())
            .await;
        let claimed = claimed.expect("claim").expect("the delivered item");
        assert_eq!(claimed.item.id, item.id);
        assert_eq!(
            counting.scans.load(Ordering::SeqCst),
            before + 1,
            "the claim's own scan"
        );
        idle().await;
        assert_eq!(
            counting.scans.load(Ordering::SeqCst),
            before + 1,
            "{}: a parked poll scanned again after a claim",
            backend.name()
        );
        // A poll that reclaims at once takes the other delivery over.
        let redelivered = app.poll(&env, Some("w3"), None, None, 0).await;
        let redelivered = redelivered.expect("poll").expect("the other item");
        assert_eq!(redelivered.item.id, other.id);
        idle().await;
        assert_eq!(
            counting.scans.load(Ordering::SeqCst),
            before + 2,
            "{}: a parked poll scanned again after a delivery",
            backend.name()
        );
        app.begin_shutdown();
    }
}

/// A claim sent again with its key while work is queued goes for the oldest item, loses its write
/// (its token holds the item the earlier try took) and answers that item: one scan (none while the
/// candidate it goes for is one the first try's read left), not a scan for every attempt until it
/// gives up. One that says it is sent again (`retry=true`) answers it
/// without a scan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_sent_again_finds_its_item_at_its_first_lost_write() {
    for backend in backends() {
        let clock = ManualClock::new(Timestamp::from_micros(1_700_000_000_000_000));
        let (_location, app, counting, env) =
            counting_app(&backend, Arc::new(clock), "again").await;
        two_sessions(&app, &env).await;
        let (key, _) = app
            .create_environment_key(&env.id, NewCredential::default())
            .await
            .expect("a key");
        let claim_with = async |session_token: &str, sent: TrySent| {
            let ask = ClaimAsk {
                keyed: Some(KeyedTry {
                    session_token,
                    sent,
                }),
                ..ClaimAsk::default()
            };
            let claimed = app.claim(&env, Some("w1"), Some(&key.id), None, 5_000, ask);
            claimed.await.expect("claim")
        };
        let claim = async |sent: TrySent| {
            let claimed = claim_with("tth_ses_the-same-token-for-every-try", sent).await;
            claimed.expect("an item")
        };
        let first = claim(TrySent::First).await;
        let taken = (&first.item.id, &first.session_token);
        let before = counting.scans.load(Ordering::SeqCst);
        let again = claim(TrySent::First).await;
        assert_eq!((&again.item.id, &again.session_token), taken);
        assert_eq!(
            counting.scans.load(Ordering::SeqCst),
            before,
            "{}: the try again went for the candidate the first try's read left, and scanned nothing",
            backend.name()
        );
        // Nothing is left over now (a write that lost a race forgets its environment's left-overs):
        // a try again reads the queue for itself, once.
        let before = counting.scans.load(Ordering::SeqCst);
        let again = claim(TrySent::First).await;
        assert_eq!((&again.item.id, &again.session_token), taken);
        assert_eq!(
            counting.scans.load(Ordering::SeqCst),
            before + 1,
            "{}: the try again scanned once",
            backend.name()
        );
        for sent in [TrySent::Again, TrySent::AgainTakingNothing] {
            let resent = claim(sent).await;
            assert_eq!((&resent.item.id, &resent.session_token), taken);
            assert_eq!(
                counting.scans.load(Ordering::SeqCst),
                before + 1,
                "{}: the try sent again ({sent:?}) did not scan",
                backend.name()
            );
        }
        // A try that takes nothing new, of a claim whose tries took nothing, scans nothing
        // either, though an item is queued (a try sent again with `retry=true` would take it).
        let untaken = "tth_ses_a-token-no-try-took-anything-with";
        let nothing = claim_with(untaken, TrySent::AgainTakingNothing).await;
        assert!(nothing.is_none());
        assert_eq!(
            counting.scans.load(Ordering::SeqCst),
            before + 1,
            "{}: a try taking nothing new did not scan",
            backend.name()
        );
        app.begin_shutdown();
    }
}

/// A poll woken for an item that then answers an earlier try's item instead (its write for the new
/// item lost to the token the earlier try holds) has not spent the wake-up: the new item is still
/// queued, and the next waiter is woken for it rather than left waiting out its block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_up_answered_with_an_earlier_try_passes_on() {
    // Long enough that a waiter left asleep would still be waiting when the test looks.
    const BLOCK: Duration = Duration::from_secs(20);
    for backend in backends() {
        // No dispatcher runs here, so no tick wakes a waiter for the item the test queues.
        let (_location, app, _counting, env, key) = one_item_and_a_key(&backend, "passes").await;
        const TOKEN: &str = "tth_ses_one-claim-sent-twice-without-retry";
        let keyed_claim = {
            let (app, env, key) = (app.clone(), env.clone(), key.id.clone());
            move |block: Option<Duration>| {
                let (app, env, key) = (app.clone(), env.clone(), key.clone());
                async move {
                    let ask = ClaimAsk {
                        keyed: Some(KeyedTry {
                            session_token: TOKEN,
                            sent: TrySent::First,
                        }),
                        ..ClaimAsk::default()
                    };
                    let claimed = app.claim(&env, Some("w1"), Some(&key), block, 5_000, ask);
                    claimed.await.expect("claim")
                }
            }
        };
        let first = keyed_claim(None).await.expect("the queued item");
        // The same claim sent again without saying so waits, the queue being empty, and is the
        // oldest waiter; a worker's plain poll waits behind it.
        let again = tokio::spawn(keyed_claim(Some(BLOCK)));
        wait_for_waiters(&app, 1).await;
        let other = {
            let (app, env) = (app.clone(), env.clone());
            tokio::spawn(async move {
                let polled = app.poll(&env, Some("w2"), None, Some(BLOCK), 5_000);
                polled.await.expect("poll")
            })
        };
        wait_for_waiters(&app, 2).await;
        // One item queued: one waiter woken, the claim sent again.
        sessions(&app, &env, 1).await;
        let again = again
            .await
            .expect("claim task")
            .expect("the earlier try's item");
        assert!(again.earlier_try, "{}", backend.name());
        assert_eq!(again.item.id, first.item.id, "{}", backend.name());
        let polled = other.await.expect("poll task");
        let polled = polled.unwrap_or_else(|| {
            panic!(
                "{}: the waiter behind slept through its block with an item queued",
                backend.name()
            )
        });
        assert_ne!(polled.item.id, first.item.id, "{}", backend.name());
        app.begin_shutdown();
    }
}

/// Two tries of one claim reach the server at once, the first still committing the item it took
/// when the second looks at the queue. The second must not answer that it found nothing (the item
/// it would go for is reserved by the first, again and again while that commits): it waits for the
/// first and answers its item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_try_racing_another_of_its_claim_answers_its_item() {
    for backend in backends() {
        let (_location, app, counting, env, key) = one_item_and_a_key(&backend, "racing").await;
        let try_of_the_claim = || {
            let (app, env, key) = (app.clone(), env.clone(), key.id.clone());
            tokio::spawn(async move {
                let ask = ClaimAsk {
                    keyed: Some(KeyedTry {
                        session_token: "tth_ses_one-claim-two-tries-at-once",
                        sent: TrySent::First,
                    }),
                    ..ClaimAsk::default()
                };
                let claimed = app.claim(&env, Some("w1"), Some(&key), None, 5_000, ask);
                claimed.await.expect("claim")
            })
        };
        let held = counting.hold_next_commit();
        let first = try_of_the_claim();
        held.arrived.await.expect("the first try's commit");
        let second = try_of_the_claim();
        // Long enough for the second to have lost every race it could run meanwhile.
        tokio::time::sleep(Duration::from_millis(200)).await;
        held.release.send(()).expect("release");
        let first = first.await.expect("first task").expect("the item");
        let second = second.await.expect("second task");
        let second =
            second.unwrap_or_else(|| panic!("{}: the second try answered nothing", backend.name()));
        assert_eq!(second.item.id, first.item.id, "{}", backend.name());
        assert!(second.earlier_try, "{}", backend.name());
        app.begin_shutdown();
    }
}

/// A counting app on the system's clock, its environment `name` with one queued item, and a key of
/// that environment.
async fn one_item_and_a_key(
    backend: &tether_testkit::Backend,
    name: &str,
) -> (
    tether_testkit::StoreLocation,
    App,
    Arc<counting::Counting>,
    Environment,
    tether_core::resources::Credential,
) {
    let (location, app, counting, env) = counting_app(backend, Arc::new(SystemClock), name).await;
    sessions(&app, &env, 1).await;
    let (key, _) = app
        .create_environment_key(&env.id, NewCredential::default())
        .await
        .expect("a key");
    (location, app, counting, env, key)
}

/// Until `count` polls wait on `app` (failing after 30 s, rather than hanging).
async fn wait_for_waiters(app: &App, count: usize) {
    let waiting = async {
        while app.waiters.count() < count {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let waited = tokio::time::timeout(Duration::from_secs(30), waiting).await;
    waited.unwrap_or_else(|_| panic!("{count} polls never waited"));
}

/// Two sessions of one agent in `env`, so two queued items.
async fn two_sessions(app: &App, env: &Environment) {
    sessions(app, env, 2).await
}

/// `count` sessions of a new agent in `env`, so `count` more queued items.
async fn sessions(app: &App, env: &Environment, count: usize) {
    let agent = app
        .create_agent(NewAgent {
            name: "agent".into(),
            model: Some(serde_json::json!("model")),
            ..NewAgent::default()
        })
        .await
        .expect("agent");
    for _ in 0..count {
        let session = NewSession {
            environment_id: env.id.clone(),
            agent: agent.id.clone(),
            ..NewSession::default()
        };
        app.create_session(session).await.expect("session");
    }
}
