//! An operation on a work item that follows one made by the same server process starts from the item
//! (and its session) as that process wrote them, instead of reading them again; and a record another
//! process changed since never decides an answer: the conditional write is refused and the operation
//! is decided again from a fresh read. The same holds for the agent a new session copies, which a
//! server takes from a read up to a second old.

mod counting;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use counting::counting_app;
use serde_json::json;
use tether_core::events::Sender;
use tether_core::session::SessionStatus;
use tether_core::work::ExpectedHeartbeat;
use tether_core::{ManualClock, SystemClock, Timestamp, WorkState};
use tether_server::service::agents::{AgentChanges, NewAgent};
use tether_server::service::events::NewEvents;
use tether_server::service::sessions::NewSession;
use tether_server::service::tokens::Principal;
use tether_server::{App, ServiceConfig};
use tether_store::Store;
use tether_testkit::backends;

/// The id of the item `worker` takes from `env` through `app` (there must be one).
async fn claim(app: &App, env: &tether_core::resources::Environment, worker: &str) -> String {
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

/// A clock that moves only when told, from a fixed start.
fn manual_clock() -> ManualClock {
    ManualClock::new(Timestamp::from_micros(1_700_000_000_000_000))
}

/// A session running a turn in `env`, and its item taken and acknowledged by worker `w`, all through
/// `app`: (session id, item id).
async fn acked_item(app: &App, env: &tether_core::resources::Environment) -> (String, String) {
    let session_id = session_in(app, env).await;
    let id = claim(app, env, "w").await;
    app.ack(env, &id, Some("w")).await.expect("ack");
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

        let acked = app.ack(&env, &id, Some("w")).await.expect("ack");
        let first = app
            .heartbeat(&env, &id, ExpectedHeartbeat::None, None, Some("w"))
            .await
            .expect("first heartbeat");
        let second = app
            .heartbeat(
                &env,
                &id,
                ExpectedHeartbeat::At(first.last_heartbeat),
                None,
                Some("w"),
            )
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
            .stop(&env, &id, true, true, &operator())
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
        let elsewhere_first = elsewhere
            .heartbeat(&env, &id, ExpectedHeartbeat::None, None, Some("w"))
            .await
            .expect("heartbeat elsewhere");
        tick().await;
        let reads = counting.reads();
        let here_second = here
            .heartbeat(
                &env,
                &id,
                ExpectedHeartbeat::At(elsewhere_first.last_heartbeat),
                None,
                Some("w"),
            )
            .await
            .expect("decided from the store, where the expected heartbeat is the last");
        assert!(counting.reads() > reads, "{name}: answered from memory");

        // Now `here` remembers its own write, and by it a heartbeat expecting that write is fine;
        // but the other server has written since, so the store refuses it.
        tick().await;
        elsewhere
            .heartbeat(
                &env,
                &id,
                ExpectedHeartbeat::At(here_second.last_heartbeat),
                None,
                Some("w"),
            )
            .await
            .expect("heartbeat elsewhere");
        tick().await;
        let stale = here
            .heartbeat(
                &env,
                &id,
                ExpectedHeartbeat::At(here_second.last_heartbeat),
                None,
                Some("w"),
            )
            .await;
        assert!(
            stale.is_err(),
            "{name}: a heartbeat expecting a superseded one was accepted"
        );

        // A stop elsewhere: `here` still remembers a live item, and must not renew its lease.
        elsewhere
            .stop(&env, &id, true, true, &operator())
            .await
            .expect("stop elsewhere");
        let renewed = here
            .heartbeat(&env, &id, ExpectedHeartbeat::Any, None, Some("w"))
            .await;
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
        let id = claim(&here, &env, "w").await;
        here.ack(&env, &id, Some("w")).await.expect("ack");
        let stopped = here
            .stop(&env, &id, true, true, &operator())
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

/// A lease settled by another server puts the session in `rescheduling`; the next ack here must
/// bring it back to `running`, whatever `here` remembers of the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_settled_by_another_server_is_coupled_as_it_is_now() {
    for backend in backends() {
        let name = backend.name();
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
        let again = claim(&here, &env, "w2").await;
        assert_eq!(again, id, "{name}");
        here.ack(&env, &id, Some("w2")).await.expect("ack");
        assert_eq!(
            status(counting.clone()).await,
            SessionStatus::Running,
            "{name}: acked, and the session still says rescheduling"
        );
        here.begin_shutdown();
        elsewhere.begin_shutdown();
    }
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
        counting.down.store(true, Ordering::SeqCst);
        assert!(here.get_work(&env, &id).await.is_err(), "{name}: down");
        assert!(
            here.lease_amnesty_promise().is_some(),
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
            here.ack(&env, &work_id, Some("w")).await.expect("ack");
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
                here.stop(&env, &work_id, true, false, &caller).await
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
            let again = claim(&here, &env, "w2").await;
            assert_eq!(again, work_id);
            here.stop(&env, &work_id, true, false, &operator())
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
        let manual = manual_clock();
        let clock: Arc<dyn tether_core::Clock> = Arc::new(manual.clone());
        let (_location, setup, counting, env) =
            counting_app(&backend, clock.clone(), "outage").await;
        setup.begin_shutdown();
        // Servers whose marks hold for 5 s, as with the default tick.
        let server = || {
            App::new(
                counting.clone(),
                clock.clone(),
                ServiceConfig {
                    tick: Duration::from_secs(1),
                    ..ServiceConfig::default()
                },
            )
        };
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
            .stop(&env, &id, false, true, &operator())
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
            async move { here.stop(&env, &id, false, true, &operator()).await }
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
