//! Who may do what (§11.1), as one table: every kind of credential against every endpoint.
//!
//! Rows are credentials: the admin token; an environment key of the environment under test and one of
//! another environment; the session token of the live item under test and that of another item of the
//! same environment; session tokens that died (item re-delivered, item stopped); a revoked key; garbage.
//! Columns are the endpoints, each with the target it names. Every cell is 200, 401 or 403.
//!
//! A key may use every work endpoint of its environment, read its environment (§2.1: the setup script
//! is shown to workers), read the sessions of its environment and the agents they use, and post
//! worker-side events to them; a session token may do the item calls of its own item (get, metadata,
//! ack — §2.3 names it —, heartbeat, history, stop), read its session, that session's events and agent,
//! and post worker-side events to it. Everything else is 403; a dead, revoked or unknown token is 401.

mod conformance;

use conformance::*;
use tether_server::http::routes::{Access, Verb};

/// Who holds the credential of a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cred {
    Admin,
    OwnKey,
    OtherEnvKey,
    LiveToken,
    OtherItemToken,
    RedeliveredToken,
    StoppedToken,
    RevokedKey,
    Garbage,
}

const CREDS: [Cred; 9] = [
    Cred::Admin,
    Cred::OwnKey,
    Cred::OtherEnvKey,
    Cred::LiveToken,
    Cred::OtherItemToken,
    Cred::RedeliveredToken,
    Cred::StoppedToken,
    Cred::RevokedKey,
    Cred::Garbage,
];

/// Which credentials an endpoint's target admits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    /// Admin only.
    Admin,
    /// Environment A as a whole (its queue, its session list, the environment itself): admin, A's key.
    EnvA,
    /// Item W1, its session S1, S1's events and S1's agent: admin, A's key, W1's session token.
    Item,
    /// Listing sessions without naming an environment: any key (it sees its own environment's).
    AnyKey,
}

fn expected(scope: Scope, cred: Cred) -> u16 {
    match cred {
        Cred::RedeliveredToken | Cred::StoppedToken | Cred::RevokedKey | Cred::Garbage => 401,
        Cred::Admin => 200,
        Cred::OwnKey => match scope {
            Scope::Admin => 403,
            _ => 200,
        },
        Cred::OtherEnvKey => match scope {
            Scope::AnyKey => 200,
            _ => 403,
        },
        Cred::LiveToken => match scope {
            Scope::Item => 200,
            _ => 403,
        },
        Cred::OtherItemToken => 403,
    }
}

/// Everything a row's requests point at, built through the public API.
struct World {
    env_a: String,
    env_to_archive: String,
    env_to_delete: String,
    agent_x: String,
    agent_to_archive: String,
    key_a: String,
    key_b: String,
    key_revoked: String,
    key_to_revoke: String,
    token_to_revoke: String,
    s1: String,
    w1: String,
    t1: String,
    t2: String,
    token_redelivered: String,
    token_stopped: String,
    session_to_archive: String,
    session_to_delete: String,
    tool_use_id: String,
    /// A stopped item whose session has no live item: what a requeue takes.
    w_stopped: String,
}

async fn ok(server: &TestServer, method: Method, path: &str, body: Option<Value>) -> Value {
    let mut r = req(server, method, path);
    if let Some(body) = body {
        r = r.json(body);
    }
    r.send().await.ok().clone()
}

async fn id_of(server: &TestServer, path: &str, body: Value) -> String {
    ok(server, Method::POST, path, Some(body)).await["id"]
        .as_str()
        .expect("id")
        .to_owned()
}

impl World {
    async fn build(server: &TestServer) -> World {
        let env = |name: &str| json!({"name": name, "config": {"type": "self_hosted"}});
        let env_a = id_of(server, "/environments", env("a")).await;
        let env_b = id_of(server, "/environments", env("b")).await;
        let env_to_archive = id_of(server, "/environments", env("archive-me")).await;
        let env_to_delete = id_of(server, "/environments", env("delete-me")).await;
        let agent = |name: &str| json!({"name": name, "model": "m"});
        let agent_x = id_of(server, "/agents", agent("x")).await;
        let agent_z = id_of(server, "/agents", agent("z")).await;
        let agent_y = id_of(server, "/agents", agent("y")).await;
        let agent_to_archive = id_of(server, "/agents", agent("archive-me")).await;

        let key = |env: String| async move {
            let k = ok(
                server,
                Method::POST,
                &format!("/environments/{env}/keys"),
                Some(json!({})),
            )
            .await;
            (
                k["id"].as_str().unwrap().to_owned(),
                k["token"].as_str().unwrap().to_owned(),
            )
        };
        let (_, key_a) = key(env_a.clone()).await;
        let (_, key_b) = key(env_b.clone()).await;
        let (revoked_id, key_revoked) = key(env_a.clone()).await;
        ok(
            server,
            Method::DELETE,
            &format!("/environments/{env_a}/keys/{revoked_id}"),
            None,
        )
        .await;
        let (key_to_revoke, _) = key(env_a.clone()).await;
        let token_to_revoke = id_of(server, "/tokens", json!({"name": "spare"})).await;

        let session = |agent: String, env: String| async move {
            id_of(
                server,
                "/sessions",
                json!({"agent": agent, "environment_id": env}),
            )
            .await
        };
        let poll = |query: &'static str| {
            let env_a = env_a.clone();
            async move {
                let item = ok(
                    server,
                    Method::GET,
                    &format!("/environments/{env_a}/work/poll{query}"),
                    None,
                )
                .await;
                let (token, _) = decode_secret(&item);
                (item["id"].as_str().unwrap().to_owned(), token)
            }
        };
        let ack = |work: String| {
            let env_a = env_a.clone();
            async move {
                ok(
                    server,
                    Method::POST,
                    &format!("/environments/{env_a}/work/{work}/ack"),
                    None,
                )
                .await;
            }
        };

        // W1: the live item under test, active.
        let s1 = session(agent_x.clone(), env_a.clone()).await;
        let (w1, t1) = poll("").await;
        ack(w1.clone()).await;
        ok(
            server,
            Method::POST,
            &format!(
                "/environments/{env_a}/work/{w1}/heartbeat?expected_last_heartbeat=NO_HEARTBEAT"
            ),
            None,
        )
        .await;
        // W2: another live item of the same environment, whose session uses another agent.
        session(agent_z, env_a.clone()).await;
        let (w2, t2) = poll("").await;
        ack(w2).await;
        // W4: delivered twice, so its first token is dead. It is the only claimable item here, so the
        // second poll (reclaiming at once) must hand out the same item.
        session(agent_x.clone(), env_a.clone()).await;
        let (w4, token_redelivered) = poll("").await;
        let (again, _) = poll("?reclaim_older_than_ms=0").await;
        assert_eq!(again, w4, "the re-delivery is of the same item");
        ack(w4).await;
        // W5: stopped, so its token is dead.
        session(agent_x.clone(), env_a.clone()).await;
        let (w5, token_stopped) = poll("").await;
        let w_stopped = w5.clone();
        ok(
            server,
            Method::POST,
            &format!("/environments/{env_a}/work/{w5}/stop"),
            Some(json!({"force": true})),
        )
        .await;
        // Environment B has a session of its own, with an agent nobody in A uses.
        session(agent_y, env_b.clone()).await;
        let session_to_archive = session(agent_x.clone(), env_a.clone()).await;
        let session_to_delete = session(agent_x.clone(), env_a.clone()).await;
        // A tool call in S1, so that a tool result has something to answer.
        let posted = ok(
            server,
            Method::POST,
            &format!("/sessions/{s1}/events"),
            Some(json!({"events": [{"type": "agent.tool_use", "name": "bash", "input": {"command": "true"}}]})),
        )
        .await;
        let tool_use_id = posted["data"][0]["id"].as_str().unwrap().to_owned();
        World {
            env_a,
            env_to_archive,
            env_to_delete,
            agent_x,
            agent_to_archive,
            key_a,
            key_b,
            key_revoked,
            key_to_revoke,
            token_to_revoke,
            s1,
            w1,
            t1,
            t2,
            token_redelivered,
            token_stopped,
            session_to_archive,
            session_to_delete,
            tool_use_id,
            w_stopped,
        }
    }

    fn secret(&self, cred: Cred, admin: &str) -> String {
        match cred {
            Cred::Admin => admin.to_owned(),
            Cred::OwnKey => self.key_a.clone(),
            Cred::OtherEnvKey => self.key_b.clone(),
            Cred::LiveToken => self.t1.clone(),
            Cred::OtherItemToken => self.t2.clone(),
            Cred::RedeliveredToken => self.token_redelivered.clone(),
            Cred::StoppedToken => self.token_stopped.clone(),
            Cred::RevokedKey => self.key_revoked.clone(),
            Cred::Garbage => "tth_env_not-a-key-anybody-minted".to_owned(),
        }
    }
}

/// One column of the table.
struct Endpoint {
    name: &'static str,
    scope: Scope,
    method: Method,
    path: String,
    body: Option<Value>,
}

/// Every endpoint, in an order where those that change things come after those that need them
/// unchanged: W1 is stopped (gracefully, so its token lives on) only once its other calls are done, and
/// the destructive admin calls have targets of their own.
fn endpoints(w: &World) -> Vec<Endpoint> {
    let e = |name, scope, method: Method, path: String, body: Option<Value>| Endpoint {
        name,
        scope,
        method,
        path,
        body,
    };
    let env = &w.env_a;
    let w1 = |suffix: &str| format!("/environments/{env}/work/{}{suffix}", w.w1);
    let s1 = |suffix: &str| format!("/sessions/{}{suffix}", w.s1);
    use Scope::*;
    vec![
        // Work, queue-wide (§6).
        e(
            "work list",
            EnvA,
            Method::GET,
            format!("/environments/{env}/work"),
            None,
        ),
        e(
            "work poll",
            EnvA,
            Method::GET,
            format!("/environments/{env}/work/poll"),
            None,
        ),
        e(
            "work stats",
            EnvA,
            Method::GET,
            format!("/environments/{env}/work/stats"),
            None,
        ),
        e(
            "workers",
            EnvA,
            Method::GET,
            format!("/environments/{env}/workers"),
            None,
        ),
        // Work, one item.
        e("work get", Item, Method::GET, w1(""), None),
        e(
            "work metadata",
            Item,
            Method::POST,
            w1(""),
            Some(json!({"metadata": {"seen": "yes"}})),
        ),
        e("work ack", Item, Method::POST, w1("/ack"), None),
        e("work heartbeat", Item, Method::POST, w1("/heartbeat"), None),
        e("work history", Item, Method::GET, w1("/history"), None),
        // Environments and their keys.
        e(
            "environment get",
            EnvA,
            Method::GET,
            format!("/environments/{env}"),
            None,
        ),
        e(
            "environment list",
            Admin,
            Method::GET,
            "/environments".into(),
            None,
        ),
        e(
            "environment create",
            Admin,
            Method::POST,
            "/environments".into(),
            Some(json!({"name": "new", "config": {"type": "self_hosted"}})),
        ),
        e(
            "environment update",
            Admin,
            Method::POST,
            format!("/environments/{env}"),
            Some(json!({"description": "changed"})),
        ),
        e(
            "key list",
            Admin,
            Method::GET,
            format!("/environments/{env}/keys"),
            None,
        ),
        e(
            "key create",
            Admin,
            Method::POST,
            format!("/environments/{env}/keys"),
            Some(json!({})),
        ),
        // Agents.
        e(
            "agent get",
            Item,
            Method::GET,
            format!("/agents/{}", w.agent_x),
            None,
        ),
        e("agent list", Admin, Method::GET, "/agents".into(), None),
        e(
            "agent create",
            Admin,
            Method::POST,
            "/agents".into(),
            Some(json!({"name": "n", "model": "m"})),
        ),
        e(
            "agent update",
            Admin,
            Method::POST,
            format!("/agents/{}", w.agent_x),
            Some(json!({"description": "changed"})),
        ),
        // Sessions and events.
        e("session get", Item, Method::GET, s1(""), None),
        e(
            "session list",
            AnyKey,
            Method::GET,
            "/sessions".into(),
            None,
        ),
        e(
            "session list of A",
            EnvA,
            Method::GET,
            format!("/sessions?environment_id={env}"),
            None,
        ),
        e(
            "session create",
            Admin,
            Method::POST,
            "/sessions".into(),
            Some(json!({"agent": w.agent_x, "environment_id": env})),
        ),
        e(
            "session update",
            Admin,
            Method::POST,
            s1(""),
            Some(json!({"title": "t"})),
        ),
        e("session cancel", Admin, Method::POST, s1("/cancel"), None),
        e("events list", Item, Method::GET, s1("/events"), None),
        e(
            "events stream",
            Item,
            Method::GET,
            s1("/events/stream"),
            None,
        ),
        e(
            "post agent.message",
            Item,
            Method::POST,
            s1("/events"),
            Some(
                json!({"events": [{"type": "agent.message", "content": [{"type": "text", "text": "hi"}]}]}),
            ),
        ),
        e(
            "post user.tool_result",
            Item,
            Method::POST,
            s1("/events"),
            Some(
                json!({"events": [{"type": "user.tool_result", "tool_use_id": w.tool_use_id, "content": [{"type": "text", "text": "ok"}]}]}),
            ),
        ),
        e(
            "post user.message",
            Admin,
            Method::POST,
            s1("/events"),
            Some(
                json!({"events": [{"type": "user.message", "content": [{"type": "text", "text": "go"}]}]}),
            ),
        ),
        // Admin tokens.
        e("token list", Admin, Method::GET, "/tokens".into(), None),
        e(
            "token create",
            Admin,
            Method::POST,
            "/tokens".into(),
            Some(json!({})),
        ),
        // What destroys or ends something, each on a target of its own.
        e(
            "work stop",
            Item,
            Method::POST,
            w1("/stop"),
            Some(json!({})),
        ),
        e(
            "key revoke",
            Admin,
            Method::DELETE,
            format!("/environments/{env}/keys/{}", w.key_to_revoke),
            None,
        ),
        e(
            "token revoke",
            Admin,
            Method::DELETE,
            format!("/tokens/{}", w.token_to_revoke),
            None,
        ),
        e(
            "agent archive",
            Admin,
            Method::POST,
            format!("/agents/{}/archive", w.agent_to_archive),
            None,
        ),
        e(
            "session archive",
            Admin,
            Method::POST,
            format!("/sessions/{}/archive", w.session_to_archive),
            None,
        ),
        e(
            "session delete",
            Admin,
            Method::DELETE,
            format!("/sessions/{}", w.session_to_delete),
            None,
        ),
        e(
            "environment archive",
            Admin,
            Method::POST,
            format!("/environments/{}/archive", w.env_to_archive),
            None,
        ),
        e(
            "environment delete",
            Admin,
            Method::DELETE,
            format!("/environments/{}", w.env_to_delete),
            None,
        ),
    ]
}

/// Sends one cell's request and returns the status and the error envelope's type (if any). A 200 on the
/// event stream is not read: it never ends.
async fn call(server: &TestServer, endpoint: &Endpoint, secret: &str) -> (u16, String) {
    let mut request = server
        .http()
        .request(endpoint.method.clone(), server.url(&endpoint.path))
        .bearer_auth(secret)
        .timeout(std::time::Duration::from_secs(30));
    if let Some(body) = &endpoint.body {
        request = request.json(body);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    if status == 200 {
        return (status, String::new());
    }
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let kind = body["error"]["type"].as_str().unwrap_or("?").to_owned();
    (status, kind)
}

#[tokio::test]
async fn every_credential_against_every_endpoint() {
    each_backend(async |server| {
        let mut wrong = Vec::new();
        let mut cells = 0;
        for cred in CREDS {
            // A world per row, so that what one row changes cannot decide another row's answers.
            let world = World::build(server).await;
            let secret = world.secret(cred, &server.admin_token);
            for endpoint in endpoints(&world) {
                let want = expected(endpoint.scope, cred);
                let (got, kind) = call(server, &endpoint, &secret).await;
                cells += 1;
                let want_kind = match want {
                    401 => "authentication_error",
                    403 => "permission_error",
                    _ => "",
                };
                if got != want || kind != want_kind {
                    wrong.push(format!(
                        "{:?} × {} ({} {}): want {want} {want_kind}, got {got} {kind}",
                        cred, endpoint.name, endpoint.method, endpoint.path
                    ));
                }
            }
        }
        assert!(
            wrong.is_empty(),
            "[{}] {} of {cells} cells disagree with §11.1:\n{}",
            server.backend.name(),
            wrong.len(),
            wrong.join("\n")
        );
    })
    .await;
}

/// The calls the `anthropic` SDK's EnvironmentWorker makes with an item's session token, in its order, on
/// the `/v1` prefix (tests/sdk/WIRE_NOTES.md §5): all allowed while the item lives; the token is dead
/// (401, before any 409) once the item stops.
#[tokio::test]
async fn a_session_token_serves_the_environment_worker() {
    each_backend(async |server| {
        let world = World::build(server).await;
        let env = &world.env_a;
        let work = |suffix: &str| format!("/environments/{env}/work/{}{suffix}", world.w1);
        let session = |suffix: &str| format!("/sessions/{}{suffix}", world.s1);
        let v1 = |method: Method, path: String| req_v1(server, method, &path).bearer(&world.t1);
        v1(Method::GET, session("")).send().await.ok();
        let beat = v1(Method::POST, work("/heartbeat")).send().await;
        let last = beat.ok()["last_heartbeat"].as_str().unwrap().to_owned();
        let stream = server
            .http()
            .get(server.v1(&session("/events/stream")))
            .bearer_auth(&world.t1)
            .header("accept", "application/json")
            .send()
            .await
            .expect("stream");
        assert_eq!(stream.status(), 200);
        drop(stream);
        v1(Method::GET, session("/events?limit=1000"))
            .send()
            .await
            .ok();
        v1(Method::POST, session("/events"))
            .json(json!({"events": [{"type": "user.tool_result", "tool_use_id": world.tool_use_id, "content": [{"type": "text", "text": "done"}]}]}))
            .send()
            .await
            .ok();
        v1(
            Method::POST,
            work(&format!(
                "/heartbeat?expected_last_heartbeat={}",
                urlencode(&last)
            )),
        )
        .send()
        .await
        .ok();
        // x-api-key is the same credential on this prefix.
        req_v1(server, Method::GET, &session(""))
            .anonymous()
            .header("x-api-key", &world.t1)
            .send()
            .await
            .ok();
        let stopped = v1(Method::POST, work("/stop"))
            .json(json!({"force": true}))
            .send()
            .await;
        assert_eq!(stopped.ok()["state"], "stopped");
        for (method, path) in [
            (Method::POST, work("/heartbeat")),
            (Method::POST, work("/stop")),
            (Method::GET, session("")),
            (Method::GET, session("/events")),
        ] {
            v1(method, path)
                .send()
                .await
                .error(401, "authentication_error");
        }
    })
    .await;
}

/// A session token is its lease's credential: once the lease has lapsed it is dead (401), before
/// any pass has settled the lease. Through the request that settles it, a worker that lost its
/// lease (the `anthropic` SDK's force-stops its item on any refused heartbeat but a 412) would
/// otherwise stop the item that went back to the queue, and end the session's retry.
#[tokio::test]
async fn a_session_token_dies_with_its_lease() {
    let mut no_pass = Options::default();
    no_pass.config.tick = std::time::Duration::from_secs(3600);
    each_backend_with(no_pass, async |server| {
        let world = World::build(server).await;
        let env = &world.env_a;
        let work = |suffix: &str| format!("/environments/{env}/work/{}{suffix}", world.w1);
        let token = |method: Method, path: String| req_v1(server, method, &path).bearer(&world.t1);
        token(Method::GET, work("")).send().await.ok();
        // Past the lease's deadline: nothing has looked at the item since.
        server.clock.advance_millis(61_000);
        let refused = token(Method::POST, work("/stop"))
            .json(json!({"force": true}))
            .send()
            .await;
        let error = refused.error(401, "authentication_error");
        // Saying why: the worker is to know its item will be served again.
        assert_eq!(error["code"], "lease_lapsed", "{error}");
        for (method, path) in [
            (Method::POST, work("/heartbeat")),
            (Method::GET, work("")),
            (Method::GET, format!("/sessions/{}", world.s1)),
        ] {
            token(method, path)
                .send()
                .await
                .error(401, "authentication_error");
        }
        // The lease is settled as ever: the item went back to the queue.
        let item = req(server, Method::GET, &work("")).send().await;
        assert_eq!(item.ok()["state"], "queued");
    })
    .await;
}

fn urlencode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// A session token names its environment as well as its item: the item's calls under another
/// environment's path are the wrong environment (403), not an unknown item.
#[tokio::test]
async fn a_session_token_is_bound_to_its_environment() {
    each_backend(async |server| {
        let world = World::build(server).await;
        let other = server.self_hosted_environment().await;
        for (method, suffix) in [
            (Method::GET, ""),
            (Method::POST, "/heartbeat"),
            (Method::POST, "/ack"),
            (Method::GET, "/history"),
            (Method::POST, "/stop"),
        ] {
            let path = format!("/environments/{other}/work/{}{suffix}", world.w1);
            req(server, method, &path)
                .bearer(&world.t1)
                .send()
                .await
                .error(403, "permission_error");
        }
    })
    .await;
}

/// Revoking an environment key ends the session tokens minted for the polls it made (issue 10, defect
/// 6): the worker that held it can no longer renew, so its items go back to the queue by the ordinary
/// lease expiry. Tokens minted under another key of the same environment live on.
#[tokio::test]
async fn revoking_a_key_ends_the_session_tokens_minted_under_it() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let mut keys = Vec::new();
        for _ in 0..2 {
            keys.push(new_key(server, &q.env).await);
        }
        // One item polled, acked and renewed under each key, each with its own session token.
        let mut items = Vec::new();
        for (_, secret) in &keys {
            q.enqueue().await;
            let polled = q
                .req(Method::GET, &q.path("/poll"))
                .bearer(secret)
                .worker("w")
                .send()
                .await;
            let polled = polled.ok().clone();
            let work = polled["id"].as_str().expect("polled item").to_owned();
            let (token, _) = decode_secret(&polled);
            q.req(Method::POST, &q.item_path(&work, "/ack"))
                .bearer(&token)
                .worker("w")
                .send()
                .await
                .ok();
            let beat = |token: String, work: String| {
                let q = &q;
                async move {
                    q.req(Method::POST, &q.item_path(&work, "/heartbeat"))
                        .bearer(&token)
                        .worker("w")
                        .send()
                        .await
                }
            };
            assert_eq!(
                beat(token.clone(), work.clone()).await.ok()["state"],
                "active"
            );
            items.push((work, token, beat));
        }

        let (revoked_id, _) = &keys[0];
        req(
            server,
            Method::DELETE,
            &format!("/environments/{}/keys/{revoked_id}", q.env),
        )
        .send()
        .await
        .ok();

        let (cut_off, cut_token, beat) = &items[0];
        beat(cut_token.clone(), cut_off.clone())
            .await
            .error(401, "authentication_error");
        q.req(
            Method::GET,
            &format!(
                "/sessions/{}",
                q.get(cut_off).await["data"]["id"].as_str().unwrap()
            ),
        )
        .bearer(cut_token)
        .send()
        .await
        .error(401, "authentication_error");
        let (kept, kept_token, beat) = &items[1];
        assert_eq!(
            beat(kept_token.clone(), kept.clone()).await.ok()["state"],
            "active"
        );

        // Nobody can renew the cut-off item: at the end of its lease it is queued again.
        server.clock.advance_millis(61_000);
        assert_eq!(q.state(cut_off).await, "queued");
        assert_eq!(
            q.causes(cut_off).await.last().map(String::as_str),
            Some("lease_expired_requeued")
        );
    })
    .await;
}

/// The credential kinds of the route-table walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// No credential at all.
    None,
    Admin,
    /// A key of the environment the request names (or of the session's or agent's environment).
    ThisEnvKey,
    OtherEnvKey,
    /// The session token of the item (and so of the session and its agent) the request names.
    ThisItemToken,
    OtherItemToken,
    Revoked,
}

const KINDS: [Kind; 7] = [
    Kind::None,
    Kind::Admin,
    Kind::ThisEnvKey,
    Kind::OtherEnvKey,
    Kind::ThisItemToken,
    Kind::OtherItemToken,
    Kind::Revoked,
];

/// §11.1 for every operation, written here independently of the route table, so that a route declared
/// with the wrong access fails the walk as surely as a declaration the server does not enforce.
fn spec_access(operation: &str) -> Access {
    match operation {
        "healthz" | "readyz" | "dashboard" | "dashboardFile" | "openapi" => Access::Public,
        // No credential unless the server has a metrics token (`--metrics-token`), then only it.
        "metrics" => Access::Metrics,
        "getEnvironment" | "listWorkers" | "listWork" | "pollWork" | "claimWork" | "workStats"
        | "workStatsHistory" => Access::Environment,
        "getWork" | "updateWork" | "ackWork" | "heartbeatWork" | "stopWork" | "workHistory" => {
            Access::WorkItem
        }
        "getSession" | "listEvents" | "postEvents" | "streamEvents" => Access::Session,
        "getAgent" => Access::Agent,
        "listSessions" => Access::SessionList,
        "listEnvironments"
        | "createEnvironment"
        | "updateEnvironment"
        | "deleteEnvironment"
        | "archiveEnvironment"
        | "listEnvironmentKeys"
        | "createEnvironmentKey"
        | "revokeEnvironmentKey"
        | "requeueWork"
        | "listAgents"
        | "createAgent"
        | "updateAgent"
        | "archiveAgent"
        | "createSession"
        | "updateSession"
        | "deleteSession"
        | "archiveSession"
        | "cancelSession"
        | "listTokens"
        | "createToken"
        | "revokeToken" => Access::Admin,
        other => panic!("{other}: a route §11.1 (and this walk) does not know"),
    }
}

/// §11.1 for a route declared `access`, with targets chosen as [`route_request`] chooses them: `Some`
/// status of a refusal, `None` when the call is allowed (any 2xx).
fn refusal(access: Access, kind: Kind) -> Option<u16> {
    use Access as A;
    // The servers of this walk have no metrics token: `/metrics` is open to all. With one, it
    // answers that token only (`crates/cli/tests/operations.rs`).
    if matches!(access, A::Public | A::Metrics) {
        return None;
    }
    match kind {
        Kind::None | Kind::Revoked => Some(401),
        Kind::Admin => None,
        Kind::ThisEnvKey => match access {
            A::Environment | A::WorkItem | A::Session | A::Agent | A::SessionList => None,
            _ => Some(403),
        },
        // Environment B's key: it may list sessions (its own), nothing of A.
        Kind::OtherEnvKey => match access {
            A::SessionList => None,
            _ => Some(403),
        },
        Kind::ThisItemToken => match access {
            A::WorkItem | A::Session | A::Agent => None,
            _ => Some(403),
        },
        Kind::OtherItemToken => Some(403),
    }
}

/// The concrete request for one route of the table: each `{param}` of the path gets a target of the
/// world (those that end or destroy something get targets of their own), and a body that is valid for
/// every caller allowed to send it. A route the walk does not know fails the test.
fn route_request(w: &World, operation: &str, path: &str) -> (String, Option<Value>) {
    let mut concrete = path.to_owned();
    let fill = |name: &str| -> String {
        match (name, operation) {
            ("environment_id", "deleteEnvironment") => w.env_to_delete.clone(),
            ("environment_id", "archiveEnvironment") => w.env_to_archive.clone(),
            ("environment_id", _) => w.env_a.clone(),
            ("work_id", "requeueWork") => w.w_stopped.clone(),
            ("work_id", _) => w.w1.clone(),
            ("key_id", _) => w.key_to_revoke.clone(),
            ("token_id", _) => w.token_to_revoke.clone(),
            ("agent_id", "archiveAgent") => w.agent_to_archive.clone(),
            ("agent_id", _) => w.agent_x.clone(),
            ("session_id", "archiveSession") => w.session_to_archive.clone(),
            ("session_id", "deleteSession") => w.session_to_delete.clone(),
            ("session_id", _) => w.s1.clone(),
            ("file", _) => "app.js".into(),
            (other, _) => panic!("{operation}: the walk has no target for {{{other}}}"),
        }
    };
    while let Some(start) = concrete.find('{') {
        let end = concrete[start..].find('}').expect("closing brace") + start;
        let name = concrete[start + 1..end].to_owned();
        concrete.replace_range(start..=end, &fill(&name));
    }
    let body = match operation {
        "createEnvironment" => Some(json!({"name": "new", "config": {"type": "self_hosted"}})),
        "updateEnvironment" | "updateAgent" => Some(json!({"description": "changed"})),
        "createEnvironmentKey" | "createToken" | "requeueWork" => Some(json!({})),
        // A graceful stop keeps the item's token alive for the routes after it.
        "stopWork" => Some(json!({})),
        "updateWork" => Some(json!({"metadata": {"seen": "yes"}})),
        "createAgent" => Some(json!({"name": "n", "model": "m"})),
        "createSession" => Some(json!({"agent": w.agent_x, "environment_id": w.env_a})),
        "updateSession" => Some(json!({"title": "t"})),
        // Agent-side: every sender the route admits may send it.
        "postEvents" => Some(
            json!({"events": [{"type": "agent.message", "content": [{"type": "text", "text": "hi"}]}]}),
        ),
        _ => None,
    };
    (concrete, body)
}

/// Every route of the route table — both surfaces, every verb — against every kind of credential: the
/// table's declared access is what the server enforces (401 before 403, and a 2xx where allowed).
#[tokio::test]
async fn every_route_of_the_table_with_every_credential_kind() {
    let api = tether_server::http::routes::api();
    let ops = tether_server::http::routes::ops();
    for endpoint in api.iter().chain(&ops) {
        assert_eq!(
            endpoint.access,
            spec_access(endpoint.operation),
            "the route table declares {} with the wrong access",
            endpoint.operation
        );
    }
    each_backend(async |server| {
        let base = server
            .url("")
            .strip_suffix("/api/v1/cloud")
            .expect("the Qoder prefix")
            .to_owned();
        let mut wrong = Vec::new();
        let mut cells = 0;
        for kind in KINDS {
            // A world per credential kind, so that what one row changes cannot decide another's.
            let w = World::build(server).await;
            let secret = match kind {
                Kind::None => None,
                Kind::Admin => Some(server.admin_token.clone()),
                Kind::ThisEnvKey => Some(w.key_a.clone()),
                Kind::OtherEnvKey => Some(w.key_b.clone()),
                Kind::ThisItemToken => Some(w.t1.clone()),
                Kind::OtherItemToken => Some(w.t2.clone()),
                Kind::Revoked => Some(w.key_revoked.clone()),
            };
            // API routes under the Qoder prefix, the operations surface at the root.
            let routes = api
                .iter()
                .map(|e| (e, true))
                .chain(ops.iter().map(|e| (e, false)));
            for (endpoint, prefixed) in routes {
                let (path, body) = route_request(&w, endpoint.operation, endpoint.path);
                let url = if prefixed {
                    server.url(&path)
                } else {
                    format!("{base}{path}")
                };
                let method = match endpoint.verb {
                    Verb::Get => Method::GET,
                    Verb::Post => Method::POST,
                    Verb::Delete => Method::DELETE,
                };
                let mut request = server
                    .http()
                    .request(method.clone(), &url)
                    .timeout(std::time::Duration::from_secs(30));
                if let Some(secret) = &secret {
                    request = request.bearer_auth(secret);
                }
                if let Some(body) = &body {
                    request = request.json(body);
                }
                let response = request.send().await.expect("request");
                let status = response.status().as_u16();
                // A stream that was allowed never ends: its status is all there is to read.
                let error_type = if response.status().is_success() {
                    String::new()
                } else {
                    let body: Value = response.json().await.unwrap_or(Value::Null);
                    body["error"]["type"].as_str().unwrap_or("?").to_owned()
                };
                cells += 1;
                let ok = match refusal(endpoint.access, kind) {
                    None => (200..300).contains(&status),
                    Some(401) => status == 401 && error_type == "authentication_error",
                    Some(403) => status == 403 && error_type == "permission_error",
                    Some(other) => unreachable!("{other}"),
                };
                if !ok {
                    wrong.push(format!(
                        "{kind:?} × {} ({method} {path}, {:?}): want {}, got {status} {error_type}",
                        endpoint.operation,
                        endpoint.access,
                        refusal(endpoint.access, kind).map_or("2xx".into(), |s| s.to_string()),
                    ));
                }
            }
        }
        assert_eq!(cells, KINDS.len() * (api.len() + ops.len()));
        assert!(
            wrong.is_empty(),
            "[{}] {} of {cells} cells disagree with the route table:\n{}",
            server.backend.name(),
            wrong.len(),
            wrong.join("\n")
        );
    })
    .await;
}

/// A new key of environment `env`: its id and its secret.
async fn new_key(server: &TestServer, env: &str) -> (String, String) {
    let key = req(server, Method::POST, &format!("/environments/{env}/keys"))
        .json(json!({}))
        .send()
        .await;
    let key = key.ok();
    (
        key["id"].as_str().expect("key id").to_owned(),
        key["token"].as_str().expect("key secret").to_owned(),
    )
}

/// A long poll that began before its key was revoked claims nothing it is woken for afterwards: it is
/// answered 401, and the item stays queued for a caller that may have it.
#[tokio::test]
async fn a_long_poll_whose_key_is_revoked_meanwhile_claims_nothing() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let (key_id, secret) = new_key(server, &q.env).await;
        let poll = q
            .req(Method::GET, &format!("{}?block_ms=999", q.path("/poll")))
            .bearer(&secret)
            .worker("w")
            .send();
        let revoke_then_enqueue = async {
            // Once the poll waits: a poll sent after the revocation would be refused at its start,
            // and show nothing of what happens to one woken afterwards.
            while server.app.waiters.count() == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            // A waiter registers just before its first scan of the empty queue: past that scan.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            req(
                server,
                Method::DELETE,
                &format!("/environments/{}/keys/{key_id}", q.env),
            )
            .send()
            .await
            .ok();
            q.enqueue().await
        };
        let (polled, enqueued) = tokio::join!(poll, revoke_then_enqueue);
        polled.error(401, "authentication_error");
        let item = q
            .req(Method::GET, &q.item_path(&enqueued.id, ""))
            .send()
            .await;
        assert_eq!(
            item.ok()["state"],
            "queued",
            "the item is still there to claim"
        );
    })
    .await;
}

/// Ids that are not shaped like ids, a NUL among them (which PostgreSQL text cannot hold), name no
/// credential and no agent alike on both stores: 404 for a revocation, 403 for a key's agent read.
#[tokio::test]
async fn malformed_ids_name_no_credential_and_no_agent() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let (key_id, secret) = new_key(server, &q.env).await;
        for id in ["%00", "tok_%00", &format!("{key_id}%00"), "envkey_x"] {
            req(server, Method::DELETE, &format!("/tokens/{id}"))
                .send()
                .await
                .error(404, "not_found_error");
            req(
                server,
                Method::DELETE,
                &format!("/environments/{}/keys/{id}", q.env),
            )
            .send()
            .await
            .error(404, "not_found_error");
            q.req(Method::GET, &format!("/agents/{id}"))
                .bearer(&secret)
                .send()
                .await
                .error(403, "permission_error");
        }
    })
    .await;
}

/// Two credential headers are refused, whichever they name: which one the server took would be a
/// guess.
#[tokio::test]
async fn a_request_with_two_credential_headers_is_refused() {
    each_backend(async |server| {
        let spare = ok(
            server,
            Method::POST,
            "/tokens",
            Some(json!({"name": "spare"})),
        )
        .await;
        let spare = spare["token"].as_str().unwrap().to_owned();
        for (prefix, name, value) in [
            ("/api/v1/cloud", "authorization", format!("Bearer {spare}")),
            ("/v1", "x-api-key", spare.clone()),
        ] {
            let mut headers = reqwest::header::HeaderMap::new();
            headers.append(
                name,
                format!("Bearer {}", server.admin_token).parse().unwrap(),
            );
            if name == "x-api-key" {
                headers.insert(name, server.admin_token.parse().unwrap());
            }
            headers.append(name, value.parse().unwrap());
            let response = server
                .http()
                .get(format!("{}{prefix}/environments", server.base))
                .headers(headers)
                .send()
                .await
                .unwrap();
            assert_eq!(
                response.status(),
                StatusCode::UNAUTHORIZED,
                "{prefix} {name}"
            );
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["type"], "authentication_error", "{body}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("more than one {name} header")),
                "{body}"
            );
        }
        // On /v1, where both headers are taken, one credential in each is two as well; the same
        // one in both is one, and an x-api-key that is no Tether credential (a gateway's own key)
        // is not one of Tether's to weigh.
        for (api_key, status) in [
            (spare.as_str(), StatusCode::UNAUTHORIZED),
            ("tth_env_unknown", StatusCode::UNAUTHORIZED),
            (server.admin_token.as_str(), StatusCode::OK),
            ("sk-gateway-key", StatusCode::OK),
        ] {
            let response = server
                .http()
                .get(format!("{}/v1/environments", server.base))
                .bearer_auth(&server.admin_token)
                .header("x-api-key", api_key)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), status, "x-api-key {api_key}");
        }
    })
    .await;
}

/// Servers starting together on one empty database make one admin token between them, minted by
/// one of them; and once every admin token is revoked, a start that would adopt one of them again
/// (`TETHER_ADMIN_TOKEN` left in its settings) is refused, rather than starting with no way in.
#[tokio::test]
async fn the_first_admin_token_is_made_once_and_a_revoked_one_is_not_taken_back() {
    use tether_core::resources::CredentialKind;
    use tether_server::{App, ServiceConfig};
    for backend in backends() {
        for round in 0..5 {
            let location = StoreLocation::fresh(&backend).await.unwrap();
            let clock = std::sync::Arc::new(tether_core::OffsetClock::new());
            let mut servers = Vec::new();
            for _ in 0..4 {
                let store = location.open().await.unwrap();
                servers.push(App::new(store, clock.clone(), ServiceConfig::default()));
            }
            let minted = futures::future::join_all(
                servers.iter().map(|app| app.bootstrap_admin_token(None)),
            )
            .await;
            let secrets: Vec<String> = minted
                .into_iter()
                .filter_map(|m| m.expect("a start"))
                .collect();
            assert_eq!(secrets.len(), 1, "{backend:?}, round {round}: {secrets:?}");
            let store = location.open().await.unwrap();
            assert_eq!(
                store
                    .count_credentials(CredentialKind::Admin, true)
                    .await
                    .unwrap(),
                1,
                "{backend:?}, round {round}"
            );

            if round > 0 {
                continue;
            }
            // The token is revoked, and the next start is given it again.
            let app = &servers[0];
            let principal = app
                .authenticate(&secrets[0])
                .await
                .expect("the token works");
            let id = match principal {
                tether_server::service::tokens::Principal::Admin { credential_id } => credential_id,
                other => panic!("{other:?}"),
            };
            app.revoke_credential(CredentialKind::Admin, None, &id)
                .await
                .unwrap();
            let refused = app
                .bootstrap_admin_token(Some(secrets[0].clone()))
                .await
                .expect_err("a revoked token taken back");
            assert!(
                refused.to_string().contains("revoked"),
                "{backend:?}: {refused}"
            );
            // Without it, a new one is minted, beside the revoked one.
            let fresh = app.bootstrap_admin_token(None).await.unwrap();
            assert!(fresh.is_some_and(|s| s != secrets[0]), "{backend:?}");
        }
    }
}
