//! An operation on a work item that follows one made by the same server process starts from the item
//! (and its session) as that process wrote them, instead of reading them again; and a record another
//! process changed since never decides an answer: the conditional write is refused and the operation
//! is decided again from a fresh read. The same holds for the agent a new session copies, which a
//! server takes from a read up to a second old. So does a claim that takes a candidate an earlier
//! claim's read left over (`service::spare_candidates`), which it may for a few milliseconds only.

mod counting;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tether_server::service::work::StopAsk;

use counting::counting_app;
use serde_json::json;
use tether_core::events::Sender;
use tether_core::session::SessionStatus;
use tether_core::work::ExpectedHeartbeat;
use tether_core::{ManualClock, SystemClock, Timestamp, WorkState};
use tether_server::service::agents::{AgentChanges, NewAgent};
use tether_server::service::events::NewEvents;
use tether_server::service::sessions::NewSession;
use tether_server::service::spare_candidates;
use tether_server::service::tokens::Principal;
use tether_server::service::work::ClaimAsk;
use tether_server::{App, ServiceConfig};
use tether_store::Store;
use tether_testkit::backends;

/// The id of the item `worker` takes from `env` through `app` (there must be one).
async fn poll_one(app: &App, env: &tether_core::resources::Environment, worker: &str) -> String {
    app.poll(env, Some(worker), None, None, 5_000)
        .await
        .expect("poll")
        .expect("an item to take")
        .item
        .id
}

/// An operator's admin token, as the caller of a stop.
fn operator() -> Principal {
    Principal::Admin {
        credential_id: "tok_operator".into(),
    }
}

/// Worker `w`'s heartbeat of item `id` through `app`, asked for by the operator.
async fn heartbeat_of_w(
    app: &App,
    env: &tether_core::resources::Environment,
    id: &str,
    expected: ExpectedHeartbeat,
) -> Result<tether_core::work::HeartbeatReply, tether_server::service::Error> {
    app.heartbeat(env, id, expected, None, Some("w"), &operator())
        .await
}

/// A clock that moves only when told, from a fixed start.
fn manual_clock() -> ManualClock {
    ManualClock::new(Timestamp::from_micros(1_700_000_000_000_000))
}

/// A session running a turn in `env`, and its item taken and acknowledged by worker `w`, all through
/// `app`: (session id, item id).
async fn acked_item(app: &App, env: &tether_core::resources::Environment) -> (String, String) {
    let session_id = session_in(app, env).await;
    let id = poll_one(app, env, "w").await;
    app.ack(env, &id, Some("w"), &operator())
        .await
        .expect("ack");
    (session_id, id)
}

/// A session running a turn, with its queued item, in `env`, created through `app`.
async fn session_in(app: &App, env: &tether_core::resources::Environment) -> String {
    session_with(app, env, vec![user_message()]).await.id
}

/// An agent created through `app`, running `model`.
async fn agent_on(app: &App, model: &str) -> tether_core::resources::Agent {
    app.create_agent(NewAgent {
        name: "agent".into(),
        model: Some(json!(model)),
        ..NewAgent::default()
    })
    .await
    .expect("agent")
}

/// A session created through `app` in `env` with `initial_events`.
async fn session_with(
    app: &App,
    env: &tether_core::resources::Environment,
    initial_events: Vec<serde_json::Value>,
) -> tether_core::resources::Session {
    let agent = agent_on(app, "model").await;
    app.create_session(NewSession {
        environment_id: env.id.clone(),
        agent: agent.id,
        initial_events,
        ..NewSession::default()
    })
    .await
    .expect("session")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_work_cycle_on_one_server_reads_each_item_once() {
    for backend in backends() {
        let name = backend.name();
        let (_location, app, counting, env) =
            counting_app(&backend, Arc::new(SystemClock), "cycle").await;
        let session_id = session_in(&app, &env).await;
        let claimed = app
            .poll(&env, Some("w"), None, None, 5_000)
            .await
            .expect("poll")
            .expect("the session's item");
        let id = claimed.item.id.clone();
        let before = counting.reads();

        let acked = app
            .ack(&env, &id, Some("w"), &operator())
            .await
            .expect("ack");
        let first = heartbeat_of_w(&app, &env, &id, ExpectedHeartbeat::None)
            .await
            .expect("first heartbeat");
        let second = heartbeat_of_w(&app, &env, &id, ExpectedHeartbeat::At(first.last_heartbeat))
            .await
            .expect("second heartbeat");
        let reads = counting.reads();
        app.get_work(&env, &id).await.expect("get");
        assert_eq!(
            counting.reads() - reads,
            1,
            "{name}: a read that writes nothing is answered from the store, not from memory"
        );
        let stopped = app
            .stop(&env, &id, stop_ask(true, true), &operator())
            .await
            .expect("stop");
        assert_eq!(
            counting.reads() - before,
            1,
            "{name}: ack, two heartbeats and a stop after a delivery here read the item or its session"
        );

        // What the answers said is what the store holds.
        assert_eq!(acked.state, WorkState::Starting, "{name}");
        assert_eq!(second.state, WorkState::Active, "{name}");
        assert_eq!(stopped.state, WorkState::Stopped, "{name}");
        let stored = counting.get_work(&id).await.expect("read").expect("item");
        assert_eq!(stored.value, stopped, "{name}");
        assert_eq!(
            stored.version, 6,
            "{name}: insert, delivery, ack, 2 heartbeats, stop"
        );
        let session = counting
            .get_session(&session_id)
            .await
            .expect("read")
            .expect("session");
        assert!(
            session.version > 1 && session.value.status != SessionStatus::Running,
            "{name}: the stop ends the session's turn ({session:?})"
        );

        app.begin_shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_changed_by_another_server_is_decided_again_from_the_store() {
    for backend in backends() {
        let name = backend.name();
        let (_location, here, elsewhere, counting, env) =
            two_servers(&backend, Arc::new(SystemClock), "two").await;
        let (_, id) = acked_item(&here, &env).await;
        // Timestamps are in microseconds: keep two heartbeats from sharing one.
        let tick = || tokio::time::sleep(Duration::from_millis(2));

        // The other server takes the first heartbeat: what `here` remembers is one write behind,
        // and by it the heartbeat below would be refused (the lease has no heartbeat yet).
        let elsewhere_first = heartbeat_of_w(&elsewhere, &env, &id, ExpectedHeartbeat::None)
            .await
            .expect("heartbeat elsewhere");
        tick().await;
        let reads = counting.reads();
        let here_second = heartbeat_of_w(
            &here,
            &env,
            &id,
            ExpectedHeartbeat::At(elsewhere_first.last_heartbeat),
        )
        .await
        .expect("decided from the store, where the expected heartbeat is the last");
        assert!(counting.reads() > reads, "{name}: answered from memory");

        // Now `here` remembers its own write, and by it a heartbeat expecting that write is fine;
        // but the other server has written since, so the store refuses it.
        tick().await;
        heartbeat_of_w(
            &elsewhere,
            &env,
            &id,
            ExpectedHeartbeat::At(here_second.last_heartbeat),
        )
        .await
        .expect("heartbeat elsewhere");
        tick().await;
        let stale = heartbeat_of_w(
            &here,
            &env,
            &id,
            ExpectedHeartbeat::At(here_second.last_heartbeat),
        )
        .await;
        assert!(
            stale.is_err(),
            "{name}: a heartbeat expecting a superseded one was accepted"
        );

        // A stop elsewhere: `here` still remembers a live item, and must not renew its lease.
        elsewhere
            .stop(&env, &id, stop_ask(true, true), &operator())
            .await
            .expect("stop elsewhere");
        let renewed = heartbeat_of_w(&here, &env, &id, ExpectedHeartbeat::Any).await;
        assert!(
            renewed.is_err(),
            "{name}: a stopped item's lease was renewed"
        );
        let stored = counting.get_work(&id).await.expect("read").expect("item");
        assert_eq!(stored.value.state, WorkState::Stopped, "{name}");
        here.begin_shutdown();
        elsewhere.begin_shutdown();
    }
}

/// Two servers over one counting store of `backend` with `clock`, and an environment created
/// through the first: (its location, `here`, `elsewhere`, the store, the environment).
async fn two_servers(
    backend: &tether_testkit::Backend,
    clock: Arc<dyn tether_core::Clock>,
    name: &str,
) -> (
    tether_testkit::StoreLocation,
    App,
    App,
    Arc<counting::Counting>,
    tether_core::resources::Environment,
) {
    let (location, here, counting, env) = counting_app(backend, clock.clone(), name).await;
    let elsewhere = other_server(&counting, clock);
    (location, here, elsewhere, counting, env)
}

/// A second server over the same store, with no dispatcher tick of its own during the test.
fn other_server(counting: &Arc<counting::Counting>, clock: Arc<dyn tether_core::Clock>) -> App {
    App::new(
        counting.clone(),
        clock,
        ServiceConfig {
            tick: Duration::from_secs(3600),
            ..ServiceConfig::default()
        },
    )
}

/// A server over the same store whose marks hold for 5 s, as with the default tick, with no
/// dispatcher tick of its own during the test.
fn server_marking_every_second(
    counting: &Arc<counting::Counting>,
    clock: Arc<dyn tether_core::Clock>,
) -> App {
    App::new(
        counting.clone(),
        clock,
        ServiceConfig {
            tick: Duration::from_secs(1),
            ..ServiceConfig::default()
        },
    )
}

/// [`counting_app`] on a manual clock of its own: the store's location, the server, the
/// counting store, the environment, the clock to move and the same clock as the server sees it.
async fn on_manual_clock(
    backend: &tether_testkit::Backend,
    name: &str,
) -> (
    tether_testkit::StoreLocation,
    App,
    Arc<counting::Counting>,
    tether_core::resources::Environment,
    ManualClock,
    Arc<dyn tether_core::Clock>,
) {
    let manual = manual_clock();
    let clock: Arc<dyn tether_core::Clock> = Arc::new(manual.clone());
    let (location, app, counting, env) = counting_app(backend, clock.clone(), name).await;
    (location, app, counting, env, manual, clock)
}

/// Marks the leases kept through `here`, then cuts the database off (for every server on
/// `counting`) and asks `here` for something: what its 503s then promise (`lease_amnesty_ms`).
async fn cut_off_after_a_mark(
    here: &App,
    counting: &counting::Counting,
    env: &tether_core::resources::Environment,
) -> Option<i64> {
    here.mark_leases_kept().await.expect("mark");
    counting.down.store(true, Ordering::SeqCst);
    let unknown = tether_core::ids::new_id(tether_core::ids::IdKind::Work);
    assert!(here.get_work(env, &unknown).await.is_err(), "down");
    here.lease_amnesty_promise()
}

/// An event of type `kind` with one text block.
fn message(kind: &str, text: &str) -> serde_json::Value {
    json!({"type": kind, "content": [{"type": "text", "text": text}]})
}

fn user_message() -> serde_json::Value {
    message("user.message", "hi")
}

/// The session is what the coupling judges when an item stops; a turn started through another
/// server since `here` last wrote the session must still end with the item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_changed_by_another_server_is_coupled_as_it_is_now() {
    for backend in backends() {
        let name = backend.name();
        let (_location, here, elsewhere, counting, env) =
            two_servers(&backend, Arc::new(SystemClock), "turn").await;
        // Created here, idle: `here` remembers the session as idle.
        let session = session_with(&here, &env, Vec::new()).await;
        assert_eq!(session.status, SessionStatus::Idle, "{name}");
        // The user's message goes through the other server: the session runs a turn.
        elsewhere
            .post_events(
                &session,
                Sender::Admin,
                NewEvents {
                    events: vec![user_message()],
                },
            )
            .await
            .expect("message elsewhere");
        let id = poll_one(&here, &env, "w").await;
        here.ack(&env, &id, Some("w"), &operator())
            .await
            .expect("ack");
        let stopped = here
            .stop(&env, &id, stop_ask(true, true), &operator())
            .await
            .expect("stop");
        assert_eq!(stopped.state, WorkState::Stopped, "{name}");
        let session = counting
            .get_session(&session.id)
            .await
            .expect("read")
            .expect("session");
        assert_ne!(
            session.value.status,
            SessionStatus::Running,
            "{name}: the item of the turn stopped, and the session still runs it"
        );
        here.begin_shutdown();
        elsewhere.begin_shutdown();
    }
}

/// A lease settled by another server puts the session in `rescheduling`; the next ack here, or the
/// next claim (which acks), must bring it back to `running`, whatever `here` remembers of the
/// session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_settled_by_another_server_is_coupled_as_it_is_now() {
    for (backend, claims) in backends()
        .into_iter()
        .flat_map(|b| [(b.clone(), false), (b, true)])
    {
        let name = format!("{}{}", backend.name(), if claims { ", claim" } else { "" });
        let clock = manual_clock();
        let (_location, here, elsewhere, counting, env) =
            two_servers(&backend, Arc::new(clock.clone()), "lapsed").await;
        let (session_id, id) = acked_item(&here, &env).await;
        // The worker goes silent; the other server settles the lapsed lease.
        clock.advance_millis(3_600_000);
        assert!(elsewhere.expire_due_leases().await.expect("expiry") >= 1);
        let status = |counting: Arc<counting::Counting>| {
            let session_id = session_id.clone();
            async move {
                counting
                    .get_session(&session_id)
                    .await
                    .expect("read")
                    .expect("session")
                    .value
                    .status
            }
        };
        assert_eq!(
            status(counting.clone()).await,
            SessionStatus::Rescheduling,
            "{name}"
        );
        if claims {
            let again = here
                .claim(&env, Some("w2"), None, None, 5_000, ClaimAsk::default())
                .await
                .expect("claim")
                .expect("the item back");
            assert_eq!(again.item.id, id, "{name}");
        } else {
            let again = poll_one(&here, &env, "w2").await;
            assert_eq!(again, id, "{name}");
            here.ack(&env, &id, Some("w2"), &operator())
                .await
                .expect("ack");
        }
        assert_eq!(
            status(counting.clone()).await,
            SessionStatus::Running,
            "{name}: acked, and the session still says rescheduling"
        );
        here.begin_shutdown();
        elsewhere.begin_shutdown();
    }
}

/// A session token let in just before its item went to another worker, whose ack or heartbeat is
/// decided after, acts on nothing: the operation asks the item its write is conditional on whether
/// the token still holds it, as a stop does. (An ack would start the other worker's lease, a
/// heartbeat extend it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_whose_item_went_to_another_worker_acks_and_heartbeats_nothing() {
    for backend in backends() {
        let (_location, app, _counting, env, clock, _) = on_manual_clock(&backend, "stale").await;
        let session_id = session_in(&app, &env).await;
        let holder = |claimed: &tether_server::service::work::Claimed| Principal::SessionToken {
            work_id: claimed.item.id.clone(),
            environment_id: env.id.clone(),
            session_id: session_id.clone(),
            token_hash: tether_server::credentials::hash(&claimed.session_token),
        };
        let first = app.poll(&env, Some("w1"), None, None, 5_000).await;
        let first = first.expect("poll").expect("the item");
        let stale = holder(&first);
        // Never acked: past the reclaim window, another worker's poll takes it again.
        clock.advance_millis(6_000);
        let second = app.poll(&env, Some("w2"), None, None, 5_000).await;
        let second = second.expect("poll").expect("the item again");
        assert_eq!(second.item.id, first.item.id);
        let id = &first.item.id;
        let refused = app.ack(&env, id, Some("w1"), &stale).await;
        assert!(is_not_held(&refused), "{backend:?}: {refused:?}");
        let fresh = holder(&second);
        app.ack(&env, id, Some("w2"), &fresh).await.expect("ack");
        let refused = app
            .heartbeat(&env, id, ExpectedHeartbeat::None, None, None, &stale)
            .await;
        assert!(is_not_held(&refused), "{backend:?}: {refused:?}");
        let renewed = app
            .heartbeat(&env, id, ExpectedHeartbeat::None, None, Some("w2"), &fresh)
            .await;
        assert_eq!(renewed.expect("heartbeat").state, WorkState::Active);
        app.begin_shutdown();
    }
}

/// Whether `result` is the refusal of a session token that no longer holds its item.
fn is_not_held<T>(result: &Result<T, tether_server::service::Error>) -> bool {
    matches!(
        result,
        Err(tether_server::service::Error::Refused(
            tether_core::work::WorkError::NotHeld
        ))
    )
}

/// A worker that could not reach the server while the database was away was promised that its
/// lease outlasts the outage. The first request after the database returns must not settle the
/// lease from what the server remembers before the amnesty is granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_lease_lapses_from_memory_right_after_an_outage() {
    for backend in backends() {
        let name = backend.name();
        let clock = manual_clock();
        let (_location, here, counting, env) =
            counting_app(&backend, Arc::new(clock.clone()), "outage").await;
        let (_, id) = acked_item(&here, &env).await;
        // Alone: its mark promises amnesty, should it lose the database.
        assert!(
            cut_off_after_a_mark(&here, &counting, &env).await.is_some(),
            "{name}: the worker is promised amnesty"
        );
        clock.advance_millis(61_000);
        counting.down.store(false, Ordering::SeqCst);
        let answered = here.get_work(&env, &id).await.expect("get");
        let stored = counting.get_work(&id).await.expect("read").expect("item");
        assert_eq!(
            stored.value.state,
            WorkState::Starting,
            "{name}: {stored:?}"
        );
        assert_eq!(answered.state, WorkState::Starting, "{name}");
        here.begin_shutdown();
    }
}

/// A server that loses its database promises its workers amnesty only when no other server was
/// keeping the leases when it last looked: the outage may be its own (a partition between it and
/// the database), and the other server would go on expiring the leases it promised. Alone, or on
/// an embedded store, it promises.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_amnesty_is_promised_while_another_server_keeps_the_leases() {
    for backend in backends() {
        let name = backend.name();
        let clock: Arc<dyn tether_core::Clock> = Arc::new(manual_clock());
        let (_location, here, counting, env) =
            counting_app(&backend, clock.clone(), "partition").await;
        let promise_in_an_outage = || async {
            counting.down.store(true, Ordering::SeqCst);
            let unknown = tether_core::ids::new_id(tether_core::ids::IdKind::Work);
            assert!(here.get_work(&env, &unknown).await.is_err(), "{name}: down");
            let promise = here.lease_amnesty_promise();
            counting.down.store(false, Ordering::SeqCst);
            counting.get_environment(&env.id).await.expect("back");
            promise
        };
        here.mark_leases_kept().await.expect("mark");
        assert!(promise_in_an_outage().await.is_some(), "{name}: alone");

        let elsewhere = other_server(&counting, clock.clone());
        elsewhere.mark_leases_kept().await.expect("mark elsewhere");
        here.mark_leases_kept().await.expect("mark");
        let promise = promise_in_an_outage().await;
        assert_eq!(
            promise.is_some(),
            !counting.shared(),
            "{name}: beside a server keeping the leases"
        );

        // A server that has just started, before its first tick's mark, knows it already.
        let newcomer = other_server(&counting, clock.clone());
        let started = newcomer.amnesty_at_start().await.expect("start");
        assert_eq!(
            started.is_none(),
            counting.shared(),
            "{name}: amnesty at start"
        );
        counting.down.store(true, Ordering::SeqCst);
        let unknown = tether_core::ids::new_id(tether_core::ids::IdKind::Work);
        assert!(
            newcomer.get_work(&env, &unknown).await.is_err(),
            "{name}: down"
        );
        assert_eq!(
            newcomer.lease_amnesty_promise().is_some(),
            !counting.shared(),
            "{name}: a newcomer beside a server keeping the leases"
        );
        counting.down.store(false, Ordering::SeqCst);
        here.begin_shutdown();
        elsewhere.begin_shutdown();
        newcomer.begin_shutdown();
    }
}

/// A server that loses its database promises its workers amnesty up to the end its last mark in
/// the database gave, and not past it however long the outage lasts: a server that keeps the
/// leases meanwhile (the loss may be a partition of this one's own) can honour only what it can
/// read. On an embedded store, which no other server shares, every answer promises the whole grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_promises_amnesty_up_to_the_end_the_last_mark_gave() {
    for backend in backends() {
        let name = backend.name();
        let (_location, here, counting, env, manual, _clock) =
            on_manual_clock(&backend, "promise").await;
        let grace = ServiceConfig::default().amnesty_grace_ms;
        assert_eq!(
            cut_off_after_a_mark(&here, &counting, &env).await,
            Some(grace),
            "{name}"
        );
        manual.advance_millis(grace - 1_000);
        let later = if counting.shared() { 1_000 } else { grace };
        assert_eq!(here.lease_amnesty_promise(), Some(later), "{name}");
        manual.advance_millis(1_000);
        let at_the_end = (!counting.shared()).then_some(grace);
        assert_eq!(here.lease_amnesty_promise(), at_the_end, "{name}");
        counting.down.store(false, Ordering::SeqCst);
        here.begin_shutdown();
    }
}

/// A server that keeps the leases settles none while another server's last mark says that server
/// may have promised its workers amnesty (it may have lost the database alone, and its workers
/// keep their programs on its word), until that promise's end and the skew two clocks may have.
/// Once the other has seen this one keeping the leases, its marks promise nothing, and the hold
/// ends. A server on an embedded store has no one else to wait for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_lease_is_settled_while_another_server_may_have_promised_it() {
    for backend in backends() {
        let name = backend.name();
        let (_location, here, counting, env, manual, clock) =
            on_manual_clock(&backend, "promised").await;
        let lease_ms = i64::from(ServiceConfig::default().lease.default_ttl_seconds) * 1_000;
        let grace = ServiceConfig::default().amnesty_grace_ms;
        let skew = tether_core::lease::LEASES_KEPT_FRESH_MILLIS;
        let (_, id) = acked_item(&here, &env).await;
        // Another server, alone when it last looked, marks the leases kept 40 s later: its mark
        // promises amnesty until 70 s, the lease's deadline is at 60 s.
        manual.advance_millis(40_000);
        let lone = other_server(&counting, clock.clone());
        lone.mark_leases_kept().await.expect("mark");
        // Then it falls silent. This server looks at the marks, as every tick does.
        here.mark_leases_kept().await.expect("mark");
        let state = || async { here.get_work(&env, &id).await.expect("item").state };
        manual.advance_millis(lease_ms - 40_000 + 1);
        if !counting.shared() {
            assert_eq!(here.expire_due_leases().await.expect("pass"), 1, "{name}");
            assert_eq!(state().await, WorkState::Queued, "{name}");
            here.begin_shutdown();
            lone.begin_shutdown();
            continue;
        }
        let promised_until = 40_000 + grace + skew;
        assert_eq!(here.expire_due_leases().await.expect("pass"), 0, "{name}");
        assert_eq!(
            state().await,
            WorkState::Starting,
            "{name}: lapsed, and held"
        );
        manual.advance_millis(promised_until - lease_ms - 1);
        assert_eq!(here.expire_due_leases().await.expect("pass"), 0, "{name}");
        assert_eq!(
            state().await,
            WorkState::Starting,
            "{name}: at the hold's end"
        );
        manual.advance_millis(1);
        assert_eq!(here.expire_due_leases().await.expect("pass"), 1, "{name}");
        assert_eq!(state().await, WorkState::Queued, "{name}: after it");

        // Both keep the leases now: the other marks once more, promising again (it has not seen
        // this one yet), and sees this one's mark; its next mark promises nothing.
        here.mark_leases_kept().await.expect("mark");
        lone.mark_leases_kept().await.expect("mark");
        here.mark_leases_kept().await.expect("mark");
        assert!(!here.expiry_allowed(here.now()), "{name}: held");
        lone.mark_leases_kept().await.expect("mark");
        here.mark_leases_kept().await.expect("mark");
        assert!(here.expiry_allowed(here.now()), "{name}: no longer");
        here.begin_shutdown();
        lone.begin_shutdown();
    }
}

/// A mark written after this server last read the marks may promise a lease that lapses after
/// that read: before settling such a lease, by an operation on its item or by the expiry pass, the
/// server reads the marks again, however long its tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promise_made_since_the_last_read_of_the_marks_holds_the_lease_too() {
    for backend in backends() {
        let name = backend.name();
        let (_location, here, counting, env, manual, clock) =
            on_manual_clock(&backend, "unread").await;
        let lease_ms = i64::from(ServiceConfig::default().lease.default_ttl_seconds) * 1_000;
        let grace = ServiceConfig::default().amnesty_grace_ms;
        let skew = tether_core::lease::LEASES_KEPT_FRESH_MILLIS;
        let (_, id) = acked_item(&here, &env).await;
        // This server reads the marks at 40 s (there are none), the other marks at 41 s: a promise
        // until 71 s. The lease's deadline is at 60 s; this server's next tick is an hour away.
        manual.advance_millis(40_000);
        here.mark_leases_kept().await.expect("mark");
        manual.advance_millis(1_000);
        let lone = other_server(&counting, clock.clone());
        lone.mark_leases_kept().await.expect("mark");
        manual.advance_millis(lease_ms - 41_000 + 1);
        let state = || async { here.get_work(&env, &id).await.expect("item").state };
        if !counting.shared() {
            assert_eq!(state().await, WorkState::Queued, "{name}: settled on sight");
        } else {
            assert_eq!(state().await, WorkState::Starting, "{name}: held on sight");
            assert_eq!(here.expire_due_leases().await.expect("pass"), 0, "{name}");
            // The clock is 1 ms past the deadline.
            manual.advance_millis(41_000 + grace + skew - lease_ms - 1);
            assert_eq!(
                state().await,
                WorkState::Starting,
                "{name}: at the hold's end"
            );
            manual.advance_millis(1);
            assert_eq!(here.expire_due_leases().await.expect("pass"), 1, "{name}");
            assert_eq!(state().await, WorkState::Queued, "{name}: after it");
        }
        here.begin_shutdown();
        lone.begin_shutdown();
    }
}

/// What [`a_newcomer_after_a_promise`] leaves.
struct ReplacedWhileAway {
    _location: tether_testkit::StoreLocation,
    counting: Arc<counting::Counting>,
    here: App,
    newcomer: App,
    /// The item `here` leased (due at 60 s).
    id: String,
}

/// A server whose marks hold for 5 s, as with the default tick (so that another's later mark says
/// the leases were kept while it was away, and only its promise makes the amnesty owed), acks an
/// item (due at 60 s), marks and is cut off, promising amnesty. At 20 s the database is back, and
/// another server starts and keeps the leases; at 40 s, when an amnesty would reach past the
/// lease's end (so that granting it is a write, and shows in the lease), it marks again.
async fn a_newcomer_after_a_promise(backend: &tether_testkit::Backend) -> ReplacedWhileAway {
    let name = backend.name();
    let (location, setup, counting, env, manual, clock) =
        on_manual_clock(backend, "replaced").await;
    setup.begin_shutdown();
    let here = server_marking_every_second(&counting, clock.clone());
    let (_, id) = acked_item(&here, &env).await;
    assert!(
        cut_off_after_a_mark(&here, &counting, &env).await.is_some(),
        "{name}: promised"
    );
    manual.advance_millis(20_000);
    counting.down.store(false, Ordering::SeqCst);
    let newcomer = other_server(&counting, clock);
    newcomer.amnesty_at_start().await.expect("start");
    newcomer.mark_leases_kept().await.expect("mark");
    manual.advance_millis(20_000);
    newcomer.mark_leases_kept().await.expect("mark");
    ReplacedWhileAway {
        _location: location,
        counting,
        here,
        newcomer,
        id,
    }
}

impl ReplacedWhileAway {
    /// Asserts that the item's lease reaches at least a whole amnesty past now: past its own end.
    async fn assert_amnesty_granted(&self, name: &str) {
        let item = self.counting.get_work(&self.id).await.expect("read");
        let deadline = item.expect("item").value.lease_expires_at;
        let grace = ServiceConfig::default().amnesty_grace_ms;
        assert!(
            deadline >= Some(self.here.now().plus_millis(grace)),
            "{name}: {deadline:?}"
        );
    }

    fn shut_down(&self) {
        self.here.begin_shutdown();
        self.newcomer.begin_shutdown();
    }
}

/// The amnesty owed after an outage follows from what the outage's 503s promised, noted as they
/// were answered: a server that appears meanwhile, read of before the amnesty is decided (by a
/// request judging a lapsed lease, or the tick's mark), does not take the promise back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promise_made_during_an_outage_is_kept_whatever_is_read_after_it() {
    for backend in backends() {
        let name = backend.name();
        let replaced = a_newcomer_after_a_promise(&backend).await;
        let here = &replaced.here;
        // This server reads the marks before anything has asked for the amnesty.
        here.amnesty_at_start().await.expect("a read of the marks");
        assert!(
            here.amnesty_after_outage().await.expect("amnesty"),
            "{name}: owed, as promised"
        );
        replaced.assert_amnesty_granted(name).await;
        replaced.shut_down();
    }
}

/// The amnesty after an outage is decided inside whatever request comes first, and that request
/// may be dropped halfway (a worker's timeout, a closed connection): the promises the outage's
/// 503s made stay owed to the next decision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promise_outlives_an_amnesty_decision_dropped_halfway() {
    for backend in backends() {
        let name = backend.name();
        let replaced = a_newcomer_after_a_promise(&backend).await;
        if !replaced.counting.shared() {
            replaced.shut_down();
            continue;
        }
        // The decision's grant is held before it reaches the database, and dropped there.
        let counting::HeldCommit { arrived, release } = replaced.counting.hold_next_commit();
        let mut deciding = Box::pin(replaced.here.amnesty_after_outage());
        tokio::select! {
            decided = &mut deciding => panic!("{name}: the grant was not held: {decided:?}"),
            came = arrived => came.expect("the grant's commit"),
        }
        drop(deciding);
        drop(release);
        assert!(
            replaced.here.amnesty_after_outage().await.expect("amnesty"),
            "{name}: still owed, as promised"
        );
        replaced.assert_amnesty_granted(name).await;
        replaced.shut_down();
    }
}

/// A 503 answered while its outage's reconnection is being counted (the count grown, the outage
/// not yet over) promises nothing: the amnesty decided for that outage may already have read the
/// promises made, and would not keep this one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_promise_is_made_once_the_outages_reconnection_is_counted() {
    for backend in backends() {
        let name = backend.name();
        let (_location, here, counting, env, _manual, _clock) =
            on_manual_clock(&backend, "counted").await;
        assert!(
            cut_off_after_a_mark(&here, &counting, &env).await.is_some(),
            "{name}: promised"
        );
        counting.count_the_reconnection_only();
        assert_eq!(here.lease_amnesty_promise(), None, "{name}");
        here.begin_shutdown();
    }
}

/// A server's mark tells the others what it may promise, and they honour it until it is replaced
/// or taken back. So after an outage whose 503s promised amnesty, the server grants it, into the
/// leases, before its first mark (another server reading the mark first would take it for leases
/// kept meanwhile, and owe none itself) and before a graceful stop takes its mark back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mark_after_an_outage_is_written_or_taken_back_only_after_its_amnesty() {
    for backend in backends() {
        for taken_back in [false, true] {
            let name = format!("{}, mark taken back: {taken_back}", backend.name());
            let (_location, here, counting, env, manual, _clock) =
                on_manual_clock(&backend, "after-outage").await;
            if !counting.shared() {
                here.begin_shutdown();
                continue;
            }
            let (_, id) = acked_item(&here, &env).await;
            assert!(
                cut_off_after_a_mark(&here, &counting, &env).await.is_some(),
                "{name}: promised"
            );
            // Back at 40 s, before the lease's end (60 s) and with an amnesty reaching past it;
            // the mark's change is the first call to reach the database again.
            manual.advance_millis(40_000);
            counting.down.store(false, Ordering::SeqCst);
            if taken_back {
                here.unmark_leases_kept().await.expect("unmark");
            } else {
                here.mark_leases_kept().await.expect("mark");
            }
            let item = counting.get_work(&id).await.expect("read").expect("item");
            let grace = ServiceConfig::default().amnesty_grace_ms;
            assert_eq!(
                item.value.lease_expires_at,
                Some(here.now().plus_millis(grace)),
                "{name}"
            );
            here.begin_shutdown();
        }
    }
}

/// A server restarted under the same name replaces its earlier run's mark with its own, and the
/// earlier run may have promised its workers amnesty from it (cut off from the database, then
/// killed). Before the new run settles any lease or writes its mark, it keeps that promise, into
/// the leases, even beside another server keeping them, and whether or not its start got as far.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_keeps_its_earlier_runs_promise() {
    for backend in backends() {
        let name = backend.name();
        let (_location, setup, counting, env, manual, clock) =
            on_manual_clock(&backend, "restart").await;
        setup.begin_shutdown();
        if !counting.shared() {
            continue;
        }
        let named = || {
            App::new(
                counting.clone(),
                clock.clone(),
                ServiceConfig {
                    tick: Duration::from_secs(3600),
                    server_name: Some("host-a/127.0.0.1:4780/boot-0123456789ab".into()),
                    ..ServiceConfig::default()
                },
            )
        };
        let lease_ms = i64::from(ServiceConfig::default().lease.default_ttl_seconds) * 1_000;
        let grace = ServiceConfig::default().amnesty_grace_ms;
        // The earlier run acks an item (due at 60 s) and, alone, marks at 40 s: a promise until
        // 70 s. Then it is killed.
        let earlier = named();
        let (_, id) = acked_item(&earlier, &env).await;
        manual.advance_millis(40_000);
        earlier.mark_leases_kept().await.expect("mark");
        earlier.begin_shutdown();
        let promised_until = tether_core::Clock::now(&manual_clock()).plus_millis(40_000 + grace);
        // Another server starts at 42 s and keeps the leases.
        manual.advance_millis(2_000);
        let other = other_server(&counting, clock.clone());
        other.amnesty_at_start().await.expect("start");
        other.mark_leases_kept().await.expect("mark");
        // The restart comes at 44 s, and its start does nothing: the database was away then (an
        // outage's own amnesty is not what this test is about, so none is simulated).
        manual.advance_millis(2_000);
        let restarted = named();
        manual.advance_millis(lease_ms - 44_000 + 1);
        // Its first pass, before any mark of its own, settles nothing the earlier run promised.
        assert_eq!(
            restarted.expire_due_leases().await.expect("pass"),
            0,
            "{name}"
        );
        restarted.mark_leases_kept().await.expect("mark");
        other.mark_leases_kept().await.expect("mark");
        assert_eq!(other.expire_due_leases().await.expect("pass"), 0, "{name}");
        let item = counting.get_work(&id).await.expect("read").expect("item");
        assert_eq!(item.value.state, WorkState::Starting, "{name}");
        // The others held it for the skew two clocks may have too: so does the restart.
        assert!(
            item.value.lease_expires_at
                >= Some(promised_until.plus_millis(tether_core::lease::LEASES_KEPT_FRESH_MILLIS)),
            "{name}: {:?}",
            item.value.lease_expires_at
        );
        restarted.begin_shutdown();
        other.begin_shutdown();
    }
}

/// An operator's stop of an item whose lease lapsed while another server's promise holds it must
/// hold the session's next item until that promise ends: the worker's program may still run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_under_a_promise_holds_the_sessions_next_item_until_it_ends() {
    for backend in backends() {
        let name = backend.name();
        let (_location, here, counting, env, manual, clock) =
            on_manual_clock(&backend, "stopped").await;
        if !counting.shared() {
            here.begin_shutdown();
            continue;
        }
        let lease_ms = i64::from(ServiceConfig::default().lease.default_ttl_seconds) * 1_000;
        let (session_id, id) = acked_item(&here, &env).await;
        manual.advance_millis(40_000);
        let lone = other_server(&counting, clock.clone());
        lone.mark_leases_kept().await.expect("mark");
        here.mark_leases_kept().await.expect("mark");
        manual.advance_millis(lease_ms - 40_000 + 1);
        here.stop(&env, &id, stop_ask(true, true), &operator())
            .await
            .expect("stop");
        let session = counting
            .get_session(&session_id)
            .await
            .expect("read")
            .expect("session")
            .value;
        // The other server marked at 40 s, promising for the grace after it.
        let promised_until = tether_core::Clock::now(&manual_clock())
            .plus_millis(40_000 + ServiceConfig::default().amnesty_grace_ms);
        assert_eq!(
            session.next_item_not_before,
            Some(promised_until.plus_millis(tether_core::lease::LEASES_KEPT_FRESH_MILLIS)),
            "{name}"
        );
        here.begin_shutdown();
        lone.begin_shutdown();
    }
}

/// A session token judged live when its request came in may find, by the time the request is
/// decided, that its lease lapsed meanwhile: the request settles the lease (the item goes back to
/// the queue) and the token's stop or metadata patch is refused (409 `not_held`) rather than
/// stopping, or writing an outcome into, the item that now waits for another worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_token_whose_lease_lapses_before_its_request_is_decided_acts_on_nothing() {
    for backend in backends() {
        let name = backend.name();
        let manual = manual_clock();
        let clock: Arc<dyn tether_core::Clock> = Arc::new(manual.clone());
        let (_location, here, _counting, env) = counting_app(&backend, clock, "lapse").await;
        for stop in [true, false] {
            let session_id = session_in(&here, &env).await;
            let claimed = here
                .poll(&env, Some("w"), None, None, 5_000)
                .await
                .expect("poll")
                .expect("an item");
            let work_id = claimed.item.id.clone();
            here.ack(&env, &work_id, Some("w"), &operator())
                .await
                .expect("ack");
            // As the token's request was let in: its item live, its lease not yet lapsed.
            let caller = Principal::SessionToken {
                work_id: work_id.clone(),
                environment_id: env.id.clone(),
                session_id,
                token_hash: tether_server::credentials::hash(&claimed.session_token),
            };
            // Then its turn comes after the deadline.
            manual.advance_millis(61_000);
            let refused = if stop {
                here.stop(&env, &work_id, stop_ask(true, false), &caller)
                    .await
            } else {
                let mut patch = tether_core::metadata::MetadataPatch::new();
                patch.insert("tether.exit_code".into(), Some("0".into()));
                here.patch_work_metadata(&env, &work_id, &patch, &caller)
                    .await
            };
            let refused = refused.expect_err("the token no longer holds the item");
            assert!(
                matches!(
                    refused,
                    tether_server::service::Error::Refused(tether_core::work::WorkError::NotHeld)
                ),
                "{name}: {refused:?}"
            );
            let item = here.get_work(&env, &work_id).await.expect("item");
            assert_eq!(
                item.state,
                WorkState::Queued,
                "{name}: requeued, not stopped"
            );
            assert!(item.metadata.is_empty(), "{name}: {:?}", item.metadata);
            // The next worker takes it.
            let again = poll_one(&here, &env, "w2").await;
            assert_eq!(again, work_id);
            here.stop(&env, &work_id, stop_ask(true, false), &operator())
                .await
                .expect("stop");
        }
        here.begin_shutdown();
    }
}

/// After an outage of its database, a server grants lease amnesty unless it promised its workers
/// none and another server kept the leases meanwhile: an outage of every server (the database
/// restarting) is made up for, and a server cut off alone does not push back the requeue of
/// abandoned items at each reconnection. An embedded store's server always grants it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_amnesty_is_granted_unless_another_server_kept_the_leases_meanwhile() {
    for backend in backends() {
        let name = backend.name();
        let (_location, setup, counting, env, manual, clock) =
            on_manual_clock(&backend, "outage").await;
        setup.begin_shutdown();
        let server = || server_marking_every_second(&counting, clock.clone());
        for (kept_meanwhile, owed) in [(false, true), (true, !counting.shared())] {
            let (here, elsewhere) = (server(), server());
            elsewhere.mark_leases_kept().await.expect("mark elsewhere");
            here.mark_leases_kept().await.expect("mark");
            // The database goes away for here, which promises nothing beside a keeper.
            counting.down.store(true, Ordering::SeqCst);
            let unknown = tether_core::ids::new_id(tether_core::ids::IdKind::Work);
            assert!(here.get_work(&env, &unknown).await.is_err(), "{name}: down");
            assert_eq!(
                here.lease_amnesty_promise().is_some(),
                !counting.shared(),
                "{name}"
            );
            manual.advance_millis(15_000);
            counting.down.store(false, Ordering::SeqCst);
            counting.get_work(&unknown).await.expect("back");
            if kept_meanwhile {
                elsewhere.mark_leases_kept().await.expect("mark elsewhere");
            }
            assert_eq!(
                here.amnesty_after_outage().await.expect("amnesty"),
                owed,
                "{name}: another server kept the leases meanwhile: {kept_meanwhile}"
            );
            // Decided once per reconnection.
            assert!(
                !here.amnesty_after_outage().await.expect("amnesty"),
                "{name}"
            );
            here.begin_shutdown();
            elsewhere.begin_shutdown();
        }
    }
}

/// A fresh store in `backend` with an environment named `name`, and a server on it whose reads of
/// credentials, environments and agents stay usable for an hour: whatever it then learns of a change
/// made elsewhere, a conditional write taught it, not an expiry.
async fn long_memory_server(
    backend: &tether_testkit::Backend,
    name: &str,
) -> (
    tether_testkit::StoreLocation,
    App,
    Arc<counting::Counting>,
    tether_core::resources::Environment,
) {
    let (location, setup, counting, env) = counting_app(backend, Arc::new(SystemClock), name).await;
    setup.begin_shutdown();
    let here = App::new(
        counting.clone(),
        Arc::new(SystemClock),
        ServiceConfig {
            tick: Duration::from_secs(3600),
            record_ttl: Duration::from_secs(3600),
            ..ServiceConfig::default()
        },
    );
    (location, here, counting, env)
}

/// A session copies its agent from a recent read (up to a second old by default; an hour here), and
/// its insert is conditional on the agent's row being at the version read: an agent changed or
/// archived through another server since is read again, and the session runs the agent as it is now,
/// or is refused as archived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_session_runs_its_agent_as_it_is_now() {
    for backend in backends() {
        let name = backend.name();
        let (_location, here, counting, env) = long_memory_server(&backend, "agents").await;
        let elsewhere = other_server(&counting, Arc::new(SystemClock));
        let agent = agent_on(&here, "first").await;
        let create = || {
            here.create_session(NewSession {
                environment_id: env.id.clone(),
                agent: agent.id.clone(),
                ..NewSession::default()
            })
        };
        let agent_reads = || counting.agent_reads.load(Ordering::SeqCst);
        create().await.expect("first session");
        let reads = agent_reads();
        let second = create().await.expect("second session");
        assert_eq!(agent_reads(), reads, "{name}: the agent was read again");
        assert_eq!(second.agent.model, json!("first"), "{name}");

        elsewhere
            .update_agent(
                &agent.id,
                AgentChanges {
                    model: Some(json!("second")),
                    ..AgentChanges::default()
                },
            )
            .await
            .expect("update elsewhere");
        let third = create().await.expect("a session after the update");
        assert_eq!(
            (third.agent.version, &third.agent.model),
            (2, &json!("second")),
            "{name}: created from the agent as it was before the update"
        );
        let stored = counting
            .get_session(&third.id)
            .await
            .expect("read")
            .expect("session");
        assert_eq!(stored.value.agent, third.agent, "{name}");

        elsewhere
            .archive_agent(&agent.id)
            .await
            .expect("archive elsewhere");
        let refused = create().await;
        assert!(
            matches!(&refused, Err(e) if e.to_string().contains("archived")),
            "{name}: a session on an archived agent: {refused:?}"
        );
        here.begin_shutdown();
    }
}

/// The agents read for new sessions are bounded in bytes: one too large to keep (here a 64 KB system
/// prompt) is read for every new session, however long reads may be used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_agent_is_read_for_each_new_session() {
    for backend in backends() {
        let name = backend.name();
        let (_location, here, counting, env) = long_memory_server(&backend, "large").await;
        let agent = here
            .create_agent(NewAgent {
                name: "large".into(),
                model: Some(json!("model")),
                system: Some("x".repeat(64 * 1024)),
                ..NewAgent::default()
            })
            .await
            .expect("agent");
        let agent_reads = || counting.agent_reads.load(Ordering::SeqCst);
        let mut reads = Vec::new();
        for _ in 0..3 {
            let before = agent_reads();
            here.create_session(NewSession {
                environment_id: env.id.clone(),
                agent: agent.id.clone(),
                ..NewSession::default()
            })
            .await
            .expect("session");
            reads.push(agent_reads() - before);
        }
        assert_eq!(reads, [1, 1, 1], "{name}: agent reads per new session");
        here.begin_shutdown();
    }
}

/// Requests that change a session take turns at it within one server (`service/turns.rs`), so that
/// many clients posting to a session do not race each other into 503s. A work item operation that
/// changes the session too (here a stop) joins the queue once it has lost a race for the session;
/// before, it kept racing the posts and, under a flood of them, now and then lost every try (503).
/// Deterministic: the post holds the session's turn at a held commit while the stop loses its race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_operation_that_loses_a_race_for_its_session_waits_for_the_session_turn() {
    for backend in backends() {
        let name = backend.name();
        let (_location, here, elsewhere, counting, env) =
            two_servers(&backend, Arc::new(SystemClock), "turns").await;
        let (session_id, id) = acked_item(&here, &env).await;
        // The first stop leaves the session as it is; the second, to `stopped`, ends its turn.
        let stopping = here
            .stop(&env, &id, stop_ask(false, true), &operator())
            .await
            .expect("first stop");
        assert_eq!(stopping.state, WorkState::Stopping, "{name}");
        // Another server changes the session: what `here` remembers of it is one write behind, so
        // the second stop's first try, made from memory, loses its race.
        elsewhere
            .update_session(
                &session_id,
                tether_server::service::sessions::SessionChanges {
                    title: Some("renamed elsewhere".into()),
                    metadata: None,
                },
            )
            .await
            .expect("update elsewhere");
        // A client's post takes the session's turn here and stops at its commit.
        let held = counting.hold_next_commit();
        let session = here.session(&session_id).await.expect("session");
        let post = tokio::spawn({
            let here = here.clone();
            async move {
                here.post_events(
                    &session,
                    Sender::Admin,
                    NewEvents {
                        events: vec![message("agent.message", "working")],
                    },
                )
                .await
            }
        });
        held.arrived.await.expect("the post's commit arrives");
        let stop = tokio::spawn({
            let (here, env, id) = (here.clone(), env.clone(), id.clone());
            async move {
                here.stop(&env, &id, stop_ask(false, true), &operator())
                    .await
            }
        });
        // Without turns the stop, re-reading after its loss, would finish now, before the post.
        let early = tokio::time::timeout(Duration::from_millis(500), async {
            while !stop.is_finished() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(
            early.is_err(),
            "{name}: the stop went past a post that held the session's turn"
        );
        held.release.send(()).expect("release the post");
        post.await.expect("post task").expect("the post succeeds");
        let stopped = stop.await.expect("stop task").expect("the stop succeeds");
        assert_eq!(stopped.state, WorkState::Stopped, "{name}");
        let session = counting
            .get_session(&session_id)
            .await
            .expect("read")
            .expect("session");
        assert_ne!(session.value.status, SessionStatus::Running, "{name}");
        assert_eq!(
            session.value.title.as_deref(),
            Some("renamed elsewhere"),
            "{name}"
        );
        here.begin_shutdown();
        elsewhere.begin_shutdown();
    }
}

/// A stop's ask: `force`, and whether it holds the session's next item.
fn stop_ask(force: bool, hold_next_item: bool) -> StopAsk {
    StopAsk {
        force,
        hold_next_item,
        ..StopAsk::default()
    }
}

/// `n` sessions created through `app` in `env`, a millisecond apart on `clock`: their items, oldest
/// first.
async fn items_a_millisecond_apart(
    app: &App,
    env: &tether_core::resources::Environment,
    clock: &ManualClock,
    n: usize,
) -> Vec<String> {
    let mut items = Vec::new();
    for _ in 0..n {
        let session = session_in(app, env).await;
        let item = app
            .store
            .live_work_for_session(&session)
            .await
            .expect("read")
            .expect("the session's item");
        items.push(item.value.id);
        clock.advance_millis(1);
    }
    items
}

/// A claim reads the queue's first candidates and takes one; the claims after it take the rest, in
/// queue order, without a read of their own while the read is fresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_in_a_row_take_the_candidates_an_earlier_read_left() {
    for backend in backends() {
        let name = backend.name();
        let (_location, app, counting, env, clock, _) = on_manual_clock(&backend, "spares").await;
        let items = items_a_millisecond_apart(&app, &env, &clock, 6).await;
        let before = counting.scans.load(Ordering::SeqCst);
        let mut taken = Vec::new();
        for _ in 0..6 {
            taken.push(poll_one(&app, &env, "w").await);
        }
        assert_eq!(taken, items, "{name}: oldest first");
        // The embedded store's reads are cheap and every claim is this process's: it reads two
        // candidates at a time, PostgreSQL eight (`work::CLAIM_SPARE_ALONE`, `CLAIM_SPARE`).
        let reads = if app.store.shared() { 1 } else { 3 };
        assert_eq!(
            counting.scans.load(Ordering::SeqCst) - before,
            reads,
            "{name}: six claims in a row"
        );
        let nothing = app.poll(&env, Some("w"), None, None, 5_000).await;
        assert!(nothing.expect("poll").is_none(), "{name}: each item once");
        app.begin_shutdown();
    }
}

/// An item older than the candidates left over can become claimable by time alone (here a poll's
/// delivery that became reclaimable): left-overs older than `spare_candidates::KEEP_FOR_MS` are not
/// taken, and the claim reads the queue again and takes the oldest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candidates_left_over_go_stale_and_the_oldest_is_taken_again() {
    for backend in backends() {
        let name = backend.name();
        let (_location, app, counting, env, clock, _) = on_manual_clock(&backend, "stale").await;
        let items = items_a_millisecond_apart(&app, &env, &clock, 3).await;
        let reclaim_ms = spare_candidates::KEEP_FOR_MS + 5;
        let poll = async || {
            let polled = app.poll(&env, Some("w"), None, None, reclaim_ms).await;
            polled.expect("poll").expect("an item").item.id
        };
        assert_eq!(poll().await, items[0], "{name}");
        clock.advance_millis(5);
        let scans = counting.scans.load(Ordering::SeqCst);
        assert_eq!(poll().await, items[1], "{name}: the next, left over");
        assert_eq!(counting.scans.load(Ordering::SeqCst), scans, "{name}");
        clock.advance_millis(reclaim_ms - 5);
        assert_eq!(
            poll().await,
            items[0],
            "{name}: its delivery is reclaimable now, and it is older than the one left over"
        );
        app.begin_shutdown();
    }
}

/// A poll's own delivery makes its item claimable again once the reclaim window has passed: with a
/// window that short, a read leaves nothing over, and each poll takes the oldest item again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_that_reclaim_at_once_take_the_oldest_each_time() {
    for backend in backends() {
        let name = backend.name();
        let (_location, app, _counting, env, clock, _) = on_manual_clock(&backend, "at-once").await;
        let items = items_a_millisecond_apart(&app, &env, &clock, 3).await;
        for _ in 0..3 {
            let polled = app.poll(&env, Some("w"), None, None, 0).await;
            let polled = polled.expect("poll").expect("an item").item.id;
            assert_eq!(polled, items[0], "{name}");
        }
        app.begin_shutdown();
    }
}

/// A candidate left over that another server took since is refused by the conditional write; the
/// claim goes on to the next item, and every item is taken once, oldest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_left_over_that_another_server_took_is_passed_over() {
    for backend in backends() {
        let name = backend.name();
        let manual = manual_clock();
        let clock: Arc<dyn tether_core::Clock> = Arc::new(manual.clone());
        let (_location, here, elsewhere, _counting, env) =
            two_servers(&backend, clock, "taken-elsewhere").await;
        let items = items_a_millisecond_apart(&here, &env, &manual, 4).await;
        // `here` reads and keeps the second item for its next claim; `elsewhere` reads for itself
        // and takes that item; each then goes for a candidate the other took.
        let taken = vec![
            poll_one(&here, &env, "here").await,
            poll_one(&elsewhere, &env, "elsewhere").await,
            poll_one(&here, &env, "here").await,
            poll_one(&elsewhere, &env, "elsewhere").await,
        ];
        assert_eq!(taken, items, "{name}: each item once, oldest first");
        for app in [&here, &elsewhere] {
            let nothing = app.poll(&env, Some("w"), None, None, 5_000).await;
            assert!(nothing.expect("poll").is_none(), "{name}");
        }
        here.begin_shutdown();
        elsewhere.begin_shutdown();
    }
}

/// A claim whose write fails gives its candidate back: reads made while it held it passed it over
/// and left younger candidates, which no claim takes now; the next claim reads, and takes it. (On
/// PostgreSQL, whose reads leave several candidates: the embedded store's leave one here, which the
/// failed claim took.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_whose_write_failed_goes_before_the_ones_left_over() {
    for backend in backends() {
        let name = backend.name();
        let (_location, app, counting, env, clock, _) = on_manual_clock(&backend, "failed").await;
        let items = items_a_millisecond_apart(&app, &env, &clock, 4).await;
        assert_eq!(poll_one(&app, &env, "w").await, items[0], "{name}");
        counting.down.store(true, Ordering::SeqCst);
        let failed = app.poll(&env, Some("w"), None, None, 5_000).await;
        assert!(
            failed.is_err(),
            "{name}: the write of the item left over failed"
        );
        counting.down.store(false, Ordering::SeqCst);
        assert_eq!(
            poll_one(&app, &env, "w").await,
            items[1],
            "{name}: the oldest claimable item, not the next one left over"
        );
        app.begin_shutdown();
    }
}

/// Claims of one queue take turns at reading it only loosely: while one claim's read is slow (held
/// here), the claims after it wait a few milliseconds at most, then read beside it, and take other
/// items; the slow one takes what is left once its read is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_read_beside_a_slow_read_of_their_queue() {
    for backend in backends() {
        let name = backend.name();
        let (_location, app, counting, env, clock, _) = on_manual_clock(&backend, "slow").await;
        let items = items_a_millisecond_apart(&app, &env, &clock, 4).await;
        let held = counting.hold_next_scan();
        let slow = {
            let (app, env) = (app.clone(), env.clone());
            tokio::spawn(async move { poll_one(&app, &env, "slow").await })
        };
        held.arrived.await.expect("the slow claim's read");
        let mut taken = Vec::new();
        for _ in 0..3 {
            let beside = tokio::time::timeout(Duration::from_secs(5), poll_one(&app, &env, "w"));
            taken.push(
                beside
                    .await
                    .expect("a claim beside the slow read is answered"),
            );
        }
        held.release.send(()).expect("release");
        taken.push(slow.await.expect("the slow claim"));
        taken.sort();
        let mut all = items.clone();
        all.sort();
        assert_eq!(taken, all, "{name}: each item once");
        app.begin_shutdown();
    }
}
