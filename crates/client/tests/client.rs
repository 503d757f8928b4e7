//! The client against a real server on a real socket, on every backend.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use serde_json::json;
use tether_client::{
    collect_all, paginate, ClaimOptions, ClaimTry, Client, CreateAgent, CreateEnvironment,
    CreateSession, Error, HeartbeatOptions, ListEvents, ListParams, ListResources, ListSessions,
    MetadataPatch, NewEvent, PollOptions, SessionStatus, StopWithClaim, UpdateAgent,
    UpdateEnvironment, UpdateSession, WorkItem, WorkState,
};
use tether_testkit::client::environment_agent_and_session;
use tether_testkit::{each_backend, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn admin(server: &TestServer) -> Client {
    Client::new(&server.base, &server.admin_token).expect("client")
}

fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Unwraps the envelope of an expected refusal.
fn refusal<T: std::fmt::Debug>(result: tether_client::Result<T>) -> tether_client::ApiError {
    match result {
        Err(Error::Api(e)) => *e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn environments_keys_and_tokens() {
    each_backend(async |server| {
        let client = admin(server);

        let mut create = CreateEnvironment::self_hosted("laptop");
        create.description = Some("my machine".into());
        create.metadata = meta(&[("team", "a"), ("drop", "me")]);
        let env = client.create_environment(&create).await.unwrap();
        assert!(env.id.starts_with("env_"));
        assert_eq!(env.kind(), Some("self_hosted"));
        assert_eq!(env.description.as_deref(), Some("my machine"));
        assert_eq!(env.status.as_deref(), Some("ready"));
        assert_eq!(
            client.get_environment(&env.id).await.unwrap().name,
            "laptop"
        );

        let cloud = client
            .create_environment(&CreateEnvironment::cloud("managed"))
            .await
            .unwrap();
        assert_eq!(cloud.kind(), Some("cloud"));

        let update = UpdateEnvironment {
            name: Some("desk".into()),
            metadata: Some(MetadataPatch::from([
                ("drop".to_owned(), None),
                ("new".to_owned(), Some("x".to_owned())),
            ])),
            ..Default::default()
        };
        let updated = client.update_environment(&env.id, &update).await.unwrap();
        assert_eq!(updated.name, "desk");
        assert_eq!(updated.metadata, meta(&[("new", "x"), ("team", "a")]));

        // A typed 400 names the parameter.
        let bad = UpdateEnvironment {
            config: Some(json!({"type": "cloud"})),
            ..Default::default()
        };
        let e = refusal(client.update_environment(&env.id, &bad).await);
        assert_eq!((e.status, e.kind.as_str()), (400, "invalid_request_error"));
        assert_eq!(e.param.as_deref(), Some("config"));

        // A typed 404 carries the whole envelope.
        let missing = "env_0000000000007000800000000000dead";
        let err = client.get_environment(missing).await.unwrap_err();
        assert!(err.is_not_found() && !err.is_retryable());
        let e = err.api().unwrap();
        assert_eq!(e.kind, "not_found_error");
        assert_eq!(e.code.as_deref(), Some("environment_not_found"));
        assert!(e.message.contains(missing), "{e}");
        assert!(e.request_id.as_deref().is_some_and(|r| !r.is_empty()));

        // Environment keys: minted once, listed without the secret, scoped to their environment.
        let key = client
            .create_environment_key(&env.id, Some("worker-1"))
            .await
            .unwrap();
        let secret = key.token.clone().expect("the secret is shown once");
        assert!(secret.starts_with("tth_env_"));
        let keys = client
            .list_environment_keys(&env.id, &ListParams::default())
            .await
            .unwrap();
        assert_eq!(keys.data.len(), 1);
        assert_eq!(keys.data[0].id, key.id);
        assert_eq!(keys.data[0].token, None);
        let worker = client.with_token(secret);
        assert_eq!(worker.work_stats(&env.id).await.unwrap().depth, 0);
        let e = refusal(worker.list_environments(&ListResources::default()).await);
        assert_eq!((e.status, e.kind.as_str()), (403, "permission_error"));
        let revoked = client
            .revoke_environment_key(&env.id, &key.id)
            .await
            .unwrap();
        assert!(revoked.revoked_at.is_some());
        assert!(worker
            .work_stats(&env.id)
            .await
            .unwrap_err()
            .is_unauthorized());

        // Admin tokens.
        let token = client.create_token(Some("ci")).await.unwrap();
        let other = client.with_token(token.token.clone().unwrap());
        assert!(other
            .list_tokens(&ListParams::default())
            .await
            .unwrap()
            .data
            .iter()
            .any(|t| t.id == token.id && t.name.as_deref() == Some("ci")));
        client.revoke_token(&token.id).await.unwrap();
        let e = refusal(other.get_environment(&env.id).await);
        assert_eq!((e.status, e.kind.as_str()), (401, "authentication_error"));

        // Archive, archive again (409), delete.
        let archived = client.archive_environment(&env.id).await.unwrap();
        assert!(archived.is_archived());
        let e = refusal(client.archive_environment(&env.id).await);
        assert_eq!((e.status, e.kind.as_str()), (409, "conflict_error"));
        let listed = client
            .list_environments(&ListResources::default())
            .await
            .unwrap();
        assert!(listed.data.iter().all(|e| e.id != env.id));
        let listed = client
            .list_environments(&ListResources {
                include_archived: true,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(listed.data.iter().any(|e| e.id == env.id));
        let deleted = client.delete_environment(&env.id).await.unwrap();
        assert_eq!(
            (deleted.id.as_str(), deleted.object.as_str()),
            (env.id.as_str(), "environment_deleted")
        );
        assert!(client
            .get_environment(&env.id)
            .await
            .unwrap_err()
            .is_not_found());
    })
    .await;
}

#[tokio::test]
async fn agents_and_sessions() {
    each_backend(async |server| {
        let client = admin(server);
        let env = client
            .create_environment(&CreateEnvironment::self_hosted("e"))
            .await
            .unwrap();

        let mut create = CreateAgent::new("helper", "model-a");
        create.system = Some("be brief".into());
        create.tools = Some(vec![json!({"type": "bash"})]);
        let agent = client.create_agent(&create).await.unwrap();
        assert_eq!((agent.version, agent.model_name()), (1, Some("model-a")));
        assert_eq!(agent.tools, vec![json!({"type": "bash"})]);
        let update = UpdateAgent {
            model: Some(json!({"id": "model-b", "temperature": 0})),
            ..Default::default()
        };
        let v2 = client.update_agent(&agent.id, &update).await.unwrap();
        assert_eq!((v2.version, v2.model_name()), (2, Some("model-b")));
        assert_eq!(client.get_agent(&agent.id).await.unwrap().version, 2);
        assert!(client
            .list_agents(&ListResources::default())
            .await
            .unwrap()
            .data
            .iter()
            .any(|a| a.id == agent.id));

        let mut create = CreateSession::new(agent.id.as_str(), env.id.as_str());
        create.title = Some("first".into());
        create.metadata = meta(&[("job", "report")]);
        create.environment_variables = meta(&[("MODE", "fast")]);
        let session = client.create_session(&create).await.unwrap();
        assert_eq!(session.status, SessionStatus::Idle);
        assert_eq!(session.agent.version, 2);
        assert_eq!(session.environment_variables, meta(&[("MODE", "fast")]));
        // Creating the session enqueued its work item, with the session's metadata.
        let work = client
            .list_work(&env.id, &ListParams::default())
            .await
            .unwrap();
        assert_eq!(work.data.len(), 1);
        assert_eq!(work.data[0].session_id(), Some(session.id.as_str()));
        assert_eq!(work.data[0].metadata, meta(&[("job", "report")]));

        let filtered = client
            .list_sessions(&ListSessions {
                environment_id: Some(env.id.clone()),
                statuses: vec![SessionStatus::Idle, SessionStatus::Running],
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(filtered.data.len(), 1);
        let none = client
            .list_sessions(&ListSessions {
                statuses: vec![SessionStatus::Terminated],
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(none.data.is_empty());

        let update = UpdateSession {
            title: Some("renamed".into()),
            metadata: Some(MetadataPatch::from([("job".to_owned(), None)])),
        };
        let updated = client.update_session(&session.id, &update).await.unwrap();
        assert_eq!(updated.title.as_deref(), Some("renamed"));
        assert!(updated.metadata.is_empty());
        assert_eq!(
            client
                .get_session(&session.id)
                .await
                .unwrap()
                .title
                .as_deref(),
            Some("renamed")
        );

        // Deleting the environment while the session references it is a 409 on the environment.
        let e = refusal(client.delete_environment(&env.id).await);
        assert_eq!((e.status, e.kind.as_str()), (409, "invalid_request_error"));

        let archived = client.archive_session(&session.id).await.unwrap();
        assert!(archived.archived_at.is_some());
        assert!(client
            .archive_session(&session.id)
            .await
            .unwrap_err()
            .is_conflict());
        // Archiving force-stopped the live item.
        let item = client.get_work(&env.id, &work.data[0].id).await.unwrap();
        assert_eq!(item.state, WorkState::Stopped);
        let deleted = client.delete_session(&session.id).await.unwrap();
        assert_eq!(deleted.object, "session_deleted");
        assert!(client
            .get_session(&session.id)
            .await
            .unwrap_err()
            .is_not_found());

        let archived = client.archive_agent(&agent.id).await.unwrap();
        assert!(archived.archived_at.is_some());
        // An archived agent takes no new sessions.
        let e = refusal(client.create_session(&create).await);
        assert_eq!((e.status, e.param.as_deref()), (400, Some("agent")));
    })
    .await;
}

#[tokio::test]
async fn tethers_own_cycle_claim_then_stop() {
    each_backend(async |server| {
        let client = admin(server);
        let (env, _agent, session) = environment_agent_and_session(&client, "e").await;
        let options = ClaimOptions {
            poll: PollOptions {
                block_ms: Some(500),
                worker_id: Some("w1".into()),
                ..Default::default()
            },
            desired_ttl_seconds: Some(30),
            idempotency_key: Some("tethers-own-cycle-claim-1".into()),
            retry: ClaimTry::First,
        };
        let claim = client
            .claim_work(&env.id, &options)
            .await
            .unwrap()
            .expect("an item");
        let item = &claim.work;
        assert_eq!(claim.object, "work_claim");
        assert_eq!(item.state, WorkState::Active);
        assert_eq!(item.session_id(), Some(session.id.as_str()));
        assert_eq!(
            (claim.lease.state.clone(), claim.lease.ttl_seconds),
            (WorkState::Active, 30)
        );
        let secret = item
            .decode_secret()
            .unwrap()
            .expect("a claim carries the secret");
        // Sent again with its key, the claim answers the same item; a new claim finds none.
        for retry in [ClaimTry::Again, ClaimTry::AgainTakingNothing] {
            let resent = ClaimOptions {
                retry,
                ..options.clone()
            };
            let again = client.claim_work(&env.id, &resent).await.unwrap();
            let again = again.expect("the item the first try took");
            assert!(!claim.earlier_try && again.earlier_try);
            assert_eq!((&again.work, &again.lease), (&claim.work, &claim.lease));
        }
        let mut next_claim = options.clone();
        next_claim.idempotency_key = Some("tethers-own-cycle-claim-2".into());
        assert_eq!(client.claim_work(&env.id, &next_claim).await.unwrap(), None);

        // The item's own token renews the lease from the claim's `last_heartbeat`, and ends it.
        let own = Client::for_work_secret(&secret, "http://unused.invalid").unwrap();
        let mut next = HeartbeatOptions::after(claim.lease.last_heartbeat.clone());
        next.worker_id = Some("w1".into());
        let beat = own.heartbeat(&env.id, &item.id, &next).await.unwrap();
        assert_eq!(beat.state, WorkState::Active);
        let stopped = own.stop_work(&env.id, &item.id, true).await.unwrap();
        assert_eq!(stopped.state, WorkState::Stopped);

        // Bad parameters are refused as a poll's are.
        let mut bad = options.clone();
        bad.poll.block_ms = Some(1_000);
        let e = refusal(client.claim_work(&env.id, &bad).await);
        assert_eq!((e.status, e.param.as_deref()), (400, Some("block_ms")));
    })
    .await;
}

/// A worker taking one item after another: each claim carries the stop of the item before it,
/// proven by that item's session token.
#[tokio::test]
async fn each_claim_stops_the_item_before_it() {
    each_backend(async |server| {
        let client = admin(server);
        let (env, agent, _session) = environment_agent_and_session(&client, "e").await;
        let new_session = async || {
            let create = CreateSession::new(agent.id.as_str(), env.id.as_str());
            client.create_session(&create).await.unwrap()
        };
        let second = new_session().await;
        let options = ClaimOptions {
            poll: PollOptions {
                worker_id: Some("w1".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let stop_of = |item: &WorkItem| {
            let secret = item.decode_secret().unwrap().expect("a secret");
            StopWithClaim::new(item.id.as_str(), secret.sessions_token)
        };
        let first = client.claim_work(&env.id, &options).await.unwrap();
        let first = first.expect("an item").work;
        let next = client
            .stop_then_claim_work(&env.id, &stop_of(&first), &options)
            .await
            .unwrap();
        assert!(next.stopped, "the server said it stopped the item");
        let next = next.claim.expect("the second item").work;
        assert_eq!(next.session_id(), Some(second.id.as_str()));
        let ended = client.get_work(&env.id, &first.id).await.unwrap();
        assert_eq!(ended.state, WorkState::Stopped);
        // The last stop rides on a claim that finds nothing.
        let last = client
            .stop_then_claim_work(&env.id, &stop_of(&next), &options)
            .await
            .unwrap();
        assert_eq!((last.stopped, last.claim), (true, None));
        let ended = client.get_work(&env.id, &next.id).await.unwrap();
        assert_eq!(ended.state, WorkState::Stopped);
        // A stop that is refused is the claim's error: the token of the item before does not hold
        // the next one, and nothing is claimed.
        new_session().await;
        new_session().await;
        let third = client.claim_work(&env.id, &options).await.unwrap();
        let third = third.expect("the third item").work;
        let mut forged = stop_of(&next);
        forged.work_id = third.id.clone();
        let e = refusal(
            client
                .stop_then_claim_work(&env.id, &forged, &options)
                .await,
        );
        assert_eq!((e.status, e.code.as_deref()), (409, Some("not_held")));
        let held = client.get_work(&env.id, &third.id).await.unwrap();
        assert_eq!(held.state, WorkState::Active);
        let stats = client.work_stats(&env.id).await.unwrap();
        assert_eq!(stats.depth, 1, "the fourth item is still queued");
    })
    .await;
}

#[tokio::test]
async fn the_work_lifecycle_with_typed_refusals() {
    each_backend(async |server| {
        let client = admin(server);
        let (env, _agent, session) = environment_agent_and_session(&client, "e").await;

        let poll = PollOptions {
            block_ms: Some(500),
            worker_id: Some("w1".into()),
            ..Default::default()
        };
        let item = client
            .poll_work(&env.id, &poll)
            .await
            .unwrap()
            .expect("an item");
        assert_eq!(item.state, WorkState::Queued);
        assert_eq!(item.session_id(), Some(session.id.as_str()));
        let secret = item
            .decode_secret()
            .unwrap()
            .expect("poll carries the secret");
        assert!(secret.sessions_token.starts_with("tth_ses_"));
        assert_eq!(
            secret.api_base_url.as_deref(),
            Some(format!("{}/api/v1/cloud", server.base).as_str())
        );
        // Nothing else is claimable: the body is `null`.
        let nothing = PollOptions {
            worker_id: Some("w1".into()),
            ..Default::default()
        };
        assert_eq!(client.poll_work(&env.id, &nothing).await.unwrap(), None);

        // Another worker may not take the delivery.
        let e = refusal(client.ack_work(&env.id, &item.id, Some("w2")).await);
        assert_eq!((e.status, e.kind.as_str()), (409, "invalid_request_error"));
        assert_eq!(e.code.as_deref(), Some("worker_mismatch"));
        let acked = client
            .ack_work(&env.id, &item.id, Some("w1"))
            .await
            .unwrap();
        assert_eq!(acked.state, WorkState::Starting);
        assert_eq!(acked.secret, None);

        // The item's own token, at the URL the secret names, drives the rest.
        let own = Client::for_work_secret(&secret, "http://unused.invalid").unwrap();
        let first = own
            .heartbeat(&env.id, &item.id, &HeartbeatOptions::first())
            .await
            .unwrap();
        assert_eq!(
            (first.state, first.lease_extended),
            (WorkState::Active, true)
        );

        // A stale expectation is a 412 with the current lease in `details`.
        let e = refusal(
            own.heartbeat(&env.id, &item.id, &HeartbeatOptions::first())
                .await,
        );
        assert_eq!(
            (e.status, e.kind.as_str()),
            (412, "precondition_failed_error")
        );
        let current = &e.details.as_ref().expect("details")["current_state"];
        assert_eq!(current["state"], "active");
        assert_eq!(current["last_heartbeat"], json!(first.last_heartbeat));

        let mut next = HeartbeatOptions::after(first.last_heartbeat.clone());
        next.desired_ttl_seconds = Some(30);
        next.worker_id = Some("w1".into());
        next.timeout = Some(Duration::from_secs(10));
        let second = own.heartbeat(&env.id, &item.id, &next).await.unwrap();
        assert_eq!(second.ttl_seconds, 30);
        assert_ne!(second.last_heartbeat, first.last_heartbeat);

        let patched = own
            .update_work_metadata(
                &env.id,
                &item.id,
                &MetadataPatch::from([("host".to_owned(), Some("box-1".to_owned()))]),
            )
            .await
            .unwrap();
        assert_eq!(patched.metadata, meta(&[("host", "box-1")]));
        assert_eq!(
            own.get_work(&env.id, &item.id).await.unwrap().state,
            WorkState::Active
        );
        assert_eq!(own.get_session(&session.id).await.unwrap().id, session.id);

        let stats = client.work_stats(&env.id).await.unwrap();
        assert_eq!((stats.depth, stats.pending), (0, 0));
        assert_eq!(stats.states.get("active"), Some(&1));
        let workers = client.list_workers(&env.id).await.unwrap();
        assert!(workers
            .iter()
            .any(|w| w.worker_id == "w1" && w.items.iter().any(|i| i.id == item.id)));

        // Graceful stop, the worker's confirmation, and a third stop refused.
        let stopping = client.stop_work(&env.id, &item.id, false).await.unwrap();
        assert_eq!(stopping.state, WorkState::Stopping);
        let hb = own
            .heartbeat(
                &env.id,
                &item.id,
                &HeartbeatOptions::after(second.last_heartbeat),
            )
            .await
            .unwrap();
        assert_eq!(hb.state, WorkState::Stopping);
        let stopped = own.stop_work(&env.id, &item.id, false).await.unwrap();
        assert_eq!(stopped.state, WorkState::Stopped);
        let e = refusal(client.stop_work(&env.id, &item.id, true).await);
        assert_eq!((e.status, e.kind.as_str()), (409, "invalid_request_error"));
        // The stopped item's token is dead.
        assert!(own
            .get_work(&env.id, &item.id)
            .await
            .unwrap_err()
            .is_unauthorized());

        let history = client
            .work_history(&env.id, &item.id, &ListParams::default())
            .await
            .unwrap();
        let causes: Vec<&str> = history.data.iter().map(|t| t.cause.as_str()).collect();
        for cause in [
            "enqueued",
            "delivered",
            "acked",
            "first_heartbeat",
            "stop_requested",
            "stop_confirmed",
        ] {
            assert!(causes.contains(&cause), "{cause} missing from {causes:?}");
        }
        assert_eq!(history.data.last().unwrap().to, WorkState::Stopped);
        assert!(history.heartbeat_count.is_some());
    })
    .await;
}

#[tokio::test]
async fn pagination_walks_every_page() {
    each_backend(async |server| {
        let client = admin(server);
        let mut made = Vec::new();
        for i in 0..5 {
            let env = client
                .create_environment(&CreateEnvironment::self_hosted(format!("env-{i}")))
                .await
                .unwrap();
            made.push(env.id);
        }
        let first = client
            .list_environments(&ListResources {
                list: ListParams::limit(2),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(first.data.len(), 2);
        assert!(first.has_more);
        assert_eq!(first.next_page, first.last_id);

        let all = collect_all(|cursor| {
            let client = client.clone();
            let mut params = ListResources {
                list: ListParams::limit(2),
                ..Default::default()
            };
            params.list.page = cursor;
            async move { client.list_environments(&params).await }
        })
        .await
        .unwrap();
        let ids: Vec<String> = all.into_iter().map(|e| e.id).collect();
        assert_eq!(ids, made);

        // The stream form stops at the first error and yields it.
        let mut stream = Box::pin(paginate(|_cursor| {
            let client = client.clone();
            async move {
                client
                    .list_environments(&ListResources {
                        list: ListParams {
                            limit: Some(0),
                            ..Default::default()
                        },
                        ..Default::default()
                    })
                    .await
            }
        }));
        let e = stream.try_next().await.unwrap_err();
        assert_eq!(e.api().unwrap().param.as_deref(), Some("limit"));
    })
    .await;
}

#[tokio::test]
async fn session_events_send_list_and_stream() {
    each_backend(async |server| {
        let client = admin(server);
        let (_env, _agent, session) = environment_agent_and_session(&client, "e").await;
        let sent = client
            .send_events(&session.id, &[NewEvent::user_message("hello")])
            .await
            .unwrap();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].kind, "user.message");
        assert_eq!(sent[0].text().as_deref(), Some("hello"));
        assert!(sent[0].id.starts_with("evt_"));

        // A second user.message while the turn runs is a 409.
        let e = refusal(
            client
                .send_events(&session.id, &[NewEvent::user_message("again")])
                .await,
        );
        assert_eq!(e.status, 409);

        let log = client
            .list_events(&session.id, &ListEvents::default())
            .await
            .unwrap();
        let kinds: Vec<&str> = log.data.iter().map(|e| e.kind.as_str()).collect();
        assert!(kinds.contains(&"user.message"), "{kinds:?}");

        // Resuming from before the first event replays the log, in order, then follows live.
        let agent_events = client
            .send_events(
                &session.id,
                &[
                    NewEvent::agent_message("hi there"),
                    NewEvent::status_idle("end_turn"),
                ],
            )
            .await
            .unwrap();
        let mut stream = client
            .stream_events(&session.id, Some(&sent[0].id))
            .await
            .unwrap();
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let next = tokio::time::timeout(Duration::from_secs(30), stream.next())
                .await
                .expect("the replay arrives")
                .expect("the stream is open")
                .unwrap();
            let event = next.clone().into_event().unwrap();
            assert_eq!(next.id.as_deref(), Some(event.id.as_str()));
            assert_eq!(next.event, event.kind);
            if event.kind.starts_with("agent.") || event.kind == "session.status_idle" {
                seen.push(event);
            }
        }
        assert_eq!(seen[0].id, agent_events[0].id);
        assert_eq!(seen[0].text().as_deref(), Some("hi there"));
        assert_eq!(seen[1].kind, "session.status_idle");
        assert!(stream.last_event_id().is_some());

        let cancel = client.cancel_session(&session.id).await.unwrap();
        assert_eq!(cancel.id, session.id);
    })
    .await;
}

#[tokio::test]
async fn transport_failures_are_typed() {
    // A port that was free a moment ago: nothing listens there.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let client = Client::new(format!("http://127.0.0.1:{port}"), "tth_adm_x").unwrap();
    let err = client
        .list_environments(&ListResources::default())
        .await
        .unwrap_err();
    assert!(err.is_connect(), "{err:?}");
    assert!(err.is_retryable());
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

/// A one-shot HTTP server that answers with `response` and hands back the request head it read.
async fn one_shot(response: &'static [u8]) -> (String, tokio::task::JoinHandle<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = socket.read(&mut buf).await.unwrap();
            assert!(n > 0, "the client closed before sending its request");
            head.extend_from_slice(&buf[..n]);
        }
        socket.write_all(response).await.unwrap();
        socket.shutdown().await.unwrap();
        String::from_utf8_lossy(&head).to_lowercase()
    });
    (base, task)
}

#[tokio::test]
async fn event_streams_decode_server_sent_events_and_resume() {
    let (base, request) = one_shot(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n\
          :keep-alive\n\n\
          id: evt_2\nevent: agent.message\ndata: {\"id\":\"evt_2\",\"type\":\"agent.message\",\"content\":[{\"type\":\"text\",\"text\":\"hi\"}]}\n\n\
          id: evt_3\nevent: odd\ndata: not json\n\n\
          id: evt_4\nevent: session.status_idle\ndata: {\"id\":\"evt_4\",\"type\":\"session.status_idle\",\"stop_reason\":{\"type\":\"end_turn\"}}\n\n",
    )
    .await;
    let client = Client::new(&base, "tth_adm_x").unwrap();
    let mut stream = client.stream_events("sess_1", Some("evt_1")).await.unwrap();
    assert_eq!(stream.last_event_id(), Some("evt_1"));

    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(
        (first.id.as_deref(), first.event.as_str()),
        (Some("evt_2"), "agent.message")
    );
    assert_eq!(first.into_event().unwrap().text().as_deref(), Some("hi"));
    // Data that is not JSON is an error for that event only.
    assert!(matches!(
        stream.next().await.unwrap(),
        Err(Error::Stream(_))
    ));
    let last = stream.next().await.unwrap().unwrap();
    assert_eq!(last.data["stop_reason"]["type"], "end_turn");
    assert!(stream.next().await.is_none());
    assert_eq!(stream.last_event_id(), Some("evt_4"));

    let head = request.await.unwrap();
    assert!(
        head.starts_with("get /api/v1/cloud/sessions/sess_1/events/stream "),
        "{head}"
    );
    assert!(head.contains("last-event-id: evt_1"), "{head}");
    assert!(head.contains("accept: text/event-stream"), "{head}");
    assert!(head.contains("authorization: bearer tth_adm_x"), "{head}");
}

#[tokio::test]
async fn error_bodies_that_are_not_the_envelope_still_carry_the_status() {
    let (base, _request) = one_shot(
        b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/html\r\ncontent-length: 21\r\nconnection: close\r\n\r\n<h1>bad gateway</h1>\n",
    )
    .await;
    let client = Client::new(&base, "t").unwrap();
    let err = client.get_environment("env_1").await.unwrap_err();
    assert_eq!(err.status(), Some(502));
    assert!(err.is_retryable());
    assert!(err.to_string().contains("bad gateway"), "{err}");
}
