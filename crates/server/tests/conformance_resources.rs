//! Conformance of the resources around the queue over real HTTP: environments (§7.1), agents (§12.1),
//! sessions and their effect on work items (§7.2, §12.2), credentials (§11.1), and pagination of every
//! list (§1.8, D-3, D-4). Each test runs once per backend.

mod conformance;

use conformance::*;

async fn create_environment(server: &TestServer, body: Value) -> Reply {
    req(server, Method::POST, "/environments")
        .json(body)
        .send()
        .await
}

#[tokio::test]
async fn environments_create_and_validate() {
    each_backend(async |server| {
        let created = create_environment(
            server,
            json!({"name": "build farm", "config": {"type": "self_hosted"}}),
        )
        .await;
        let env = created.ok().clone();
        assert!(is_uuid7_id(&env["id"], "env"), "{env}");
        assert_eq!(env["type"], "environment");
        assert_eq!(env["name"], "build farm");
        assert_eq!(
            env["description"], "",
            "description defaults to the empty string"
        );
        assert_eq!(env["config"], json!({"type": "self_hosted"}));
        assert_eq!(env["metadata"], json!({}));
        assert!(env["archived_at"].is_null());
        assert_eq!(env["status"], "ready");
        assert_eq!(env["archived"], false);
        micros(&env["created_at"]);
        micros(&env["updated_at"]);
        let got = req(
            server,
            Method::GET,
            &format!("/environments/{}", env["id"].as_str().unwrap()),
        )
        .send()
        .await;
        assert_eq!(got.ok(), &env);

        // Accepted shapes.
        let script = "s".repeat(64 * 1024);
        let full = create_environment(
            server,
            json!({"name": "n", "description": "d", "config": {"type": "self_hosted", "setup_script": script}, "metadata": {"a": "b"}}),
        )
        .await;
        assert_eq!(
            full.ok()["config"]["setup_script"].as_str().map(str::len),
            Some(64 * 1024)
        );
        assert_eq!(full.ok()["metadata"], json!({"a": "b"}));
        let managed = create_environment(server, json!({"name": "m", "config": {"type": "managed", "networking": {"type": "unrestricted"}}})).await;
        assert_eq!(
            managed.ok()["config"]["type"],
            "cloud",
            "managed is stored and shown as cloud"
        );
        let cloud = create_environment(
            server,
            json!({"name": "c", "config": {"type": "cloud", "networking": {"type": "allowed_hosts", "allowed_hosts": ["example.com"]}, "packages": {"type": "packages", "pip": ["requests"]}}}),
        )
        .await;
        assert_eq!(
            cloud.ok()["config"]["networking"]["allowed_hosts"],
            json!(["example.com"])
        );
        // The Anthropic profile lets config be omitted.
        let v1 = req_v1(server, Method::POST, "/environments")
            .json(json!({"name": "anthropic"}))
            .send()
            .await;
        assert_eq!(v1.ok()["config"]["type"], "cloud");

        // Refused shapes, each naming its parameter.
        let cases = [
            (json!({"config": {"type": "self_hosted"}}), "name"),
            (
                json!({"name": "", "config": {"type": "self_hosted"}}),
                "name",
            ),
            (
                json!({"name": "   ", "config": {"type": "self_hosted"}}),
                "name",
            ),
            (
                json!({"name": 7, "config": {"type": "self_hosted"}}),
                "name",
            ),
            (json!({"name": "n"}), "config"),
            (json!({"name": "n", "config": "self_hosted"}), "config"),
            (json!({"name": "n", "config": {}}), "config"),
            (
                json!({"name": "n", "config": {"type": "kubernetes"}}),
                "config",
            ),
            (
                json!({"name": "n", "config": {"type": "self_hosted", "networking": {"type": "limited"}}}),
                "config",
            ),
            (
                json!({"name": "n", "config": {"type": "self_hosted", "packages": {"pip": []}}}),
                "config",
            ),
            (
                json!({"name": "n", "config": {"type": "self_hosted", "setup_script": "s".repeat(64 * 1024 + 1)}}),
                "config",
            ),
            (
                json!({"name": "n", "config": {"type": "self_hosted", "setup_script": 5}}),
                "config",
            ),
            (
                json!({"name": "n", "config": {"type": "cloud", "networking": {"type": "open"}}}),
                "config",
            ),
            (
                json!({"name": "n", "config": {"type": "cloud", "packages": {"pip": "requests"}}}),
                "config",
            ),
            (
                json!({"name": "n", "config": {"type": "self_hosted"}, "description": 5}),
                "description",
            ),
            (
                json!({"name": "n", "config": {"type": "self_hosted"}, "description": "d".repeat(64 * 1024 + 1)}),
                "description",
            ),
            (
                json!({"name": "n", "config": {"type": "self_hosted"}, "metadata": {"k": 5}}),
                "metadata",
            ),
            (
                json!({"name": "n", "config": {"type": "self_hosted"}, "metadata": "k"}),
                "metadata",
            ),
            (
                json!({"name": "n", "config": {"type": "self_hosted"}, "metadata": (0..17).map(|i| (format!("k{i}"), json!("v"))).collect::<serde_json::Map<_, _>>()}),
                "metadata",
            ),
        ];
        for (body, param) in cases {
            let reply = create_environment(server, body.clone()).await;
            assert_eq!(
                reply.status,
                StatusCode::BAD_REQUEST,
                "{body}: {}",
                reply.body
            );
            reply.bad_param(param);
        }
        let list = req(server, Method::GET, "/environments?limit=100")
            .send()
            .await;
        assert_eq!(
            list.ok()["data"].as_array().unwrap().len(),
            5,
            "refused creates stored nothing"
        );
    })
    .await;
}

#[tokio::test]
async fn environments_update() {
    each_backend(async |server| {
        let env = create_environment(server, json!({"name": "a", "config": {"type": "self_hosted"}, "metadata": {"keep": "1", "drop": "2"}})).await;
        let env = env.ok().clone();
        let path = format!("/environments/{}", env["id"].as_str().unwrap());
        server.clock.advance_millis(1_000);
        let updated = req(server, Method::POST, &path)
            .json(json!({"name": "b", "description": "new", "metadata": {"drop": null, "add": "3"}, "config": {"type": "self_hosted", "setup_script": "echo"}}))
            .send()
            .await;
        let updated = updated.ok().clone();
        assert_eq!(updated["name"], "b");
        assert_eq!(updated["description"], "new");
        assert_eq!(
            updated["metadata"],
            json!({"keep": "1", "add": "3"}),
            "metadata is a merge patch"
        );
        assert_eq!(
            updated["config"],
            json!({"type": "self_hosted", "setup_script": "echo"}),
            "config is replaced whole"
        );
        assert_eq!(updated["created_at"], env["created_at"]);
        assert!(micros(&updated["updated_at"]) > micros(&env["updated_at"]));
        // An empty update changes nothing but is accepted.
        assert_eq!(
            req(server, Method::POST, &path)
                .json(json!({}))
                .send()
                .await
                .ok()["name"],
            "b"
        );

        // config.type is immutable (D-20); other refusals name their parameter; none changes anything.
        for (body, param) in [
            (json!({"config": {"type": "cloud"}}), "config"),
            (
                json!({"config": {"type": "self_hosted", "networking": {}}}),
                "config",
            ),
            (json!({"name": ""}), "name"),
            (json!({"description": "d".repeat(64 * 1024 + 1)}), "description"),
            (json!({"metadata": {"x": 1}}), "metadata"),
            (
                json!({"metadata": (0..15).map(|i| (format!("k{i}"), json!("v"))).collect::<serde_json::Map<_, _>>()}),
                "metadata",
            ),
        ] {
            let reply = req(server, Method::POST, &path)
                .json(body.clone())
                .send()
                .await;
            assert_eq!(
                reply.status,
                StatusCode::BAD_REQUEST,
                "{body}: {}",
                reply.body
            );
            reply.bad_param(param);
        }
        let now = req(server, Method::GET, &path).send().await;
        assert_eq!(now.ok()["metadata"], json!({"keep": "1", "add": "3"}));
        assert_eq!(now.ok()["config"]["type"], "self_hosted");

        for id in [unknown_id("env"), "env_bad".to_owned()] {
            let reply = req(server, Method::POST, &format!("/environments/{id}"))
                .json(json!({"name": "x"}))
                .send()
                .await;
            reply.error(404, "not_found_error");
            req(server, Method::GET, &format!("/environments/{id}"))
                .send()
                .await
                .error(404, "not_found_error");
        }
    })
    .await;
}

#[tokio::test]
async fn environments_archive_and_delete() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let item = q.enqueue().await;
        let path = format!("/environments/{}", q.env);

        let archived = req(server, Method::POST, &format!("{path}/archive"))
            .send()
            .await;
        let archived = archived.ok().clone();
        assert!(!archived["archived_at"].is_null());
        assert_eq!(archived["status"], "archived");
        assert_eq!(archived["archived"], true);
        let again = req(server, Method::POST, &format!("{path}/archive"))
            .send()
            .await;
        again.error(409, "conflict_error");
        assert_eq!(
            req(server, Method::GET, &path).send().await.ok()["archived_at"],
            archived["archived_at"]
        );

        // No new sessions (D-19d) …
        let refused = req(server, Method::POST, "/sessions")
            .json(json!({"agent": q.agent, "environment_id": q.env}))
            .send()
            .await;
        refused.bad_param("environment_id");
        // … but existing work carries on (D-19b).
        assert_eq!(q.poll("", Some("w")).await.ok()["id"], item.id.as_str());
        assert_eq!(q.ack(&item.id, Some("w")).await.ok()["state"], "starting");
        assert_eq!(q.heartbeat(&item.id, "").await.ok()["state"], "active");
        assert_eq!(q.stats().await["states"]["active"], 1);

        // Hidden from the list unless asked for.
        let list = req(server, Method::GET, "/environments").send().await;
        assert!(list.ok()["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["id"] != q.env.as_str()));
        let list = req(server, Method::GET, "/environments?include_archived=true")
            .send()
            .await;
        assert!(list.ok()["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["id"] == q.env.as_str()));
        req(server, Method::GET, "/environments?include_archived=maybe")
            .send()
            .await
            .bad_param("include_archived");

        // Delete refuses while a session references the environment (409 invalid_request_error, D-13).
        let refused = req(server, Method::DELETE, &path).send().await;
        refused.error(409, "invalid_request_error");
        assert_eq!(
            req(server, Method::GET, &path).send().await.ok()["id"],
            q.env.as_str()
        );
        assert_eq!(
            q.state(&item.id).await,
            "active",
            "the refused delete touched nothing"
        );

        req(
            server,
            Method::DELETE,
            &format!("/sessions/{}", item.session),
        )
        .send()
        .await
        .ok();
        let deleted = req(server, Method::DELETE, &path).send().await;
        assert_eq!(
            deleted.ok(),
            &json!({"id": q.env, "type": "environment_deleted"})
        );
        req(server, Method::GET, &path)
            .send()
            .await
            .error(404, "not_found_error");
        req(server, Method::DELETE, &path)
            .send()
            .await
            .error(404, "not_found_error");
        req(server, Method::GET, &q.path(""))
            .send()
            .await
            .error(404, "not_found_error");
        req(server, Method::GET, &q.item_path(&item.id, ""))
            .send()
            .await
            .error(404, "not_found_error");
        req(server, Method::POST, &format!("{path}/archive"))
            .send()
            .await
            .error(404, "not_found_error");
    })
    .await;
}

#[tokio::test]
async fn agents_create_update_archive() {
    each_backend(async |server| {
        let created = req(server, Method::POST, "/agents")
            .json(json!({"name": "coder", "model": "m-1", "system": "be brief", "tools": [{"type": "bash"}], "metadata": {"team": "x"}}))
            .send()
            .await;
        let agent = created.ok().clone();
        let id = agent["id"].as_str().unwrap().to_owned();
        assert!(is_uuid7_id(&agent["id"], "agent"));
        assert_eq!(agent["type"], "agent");
        assert_eq!(agent["version"], 1);
        assert_eq!(agent["model"], "m-1");
        assert_eq!(agent["tools"], json!([{"type": "bash"}]));
        assert_eq!(agent["skills"], json!([]));
        assert_eq!(agent["metadata"], json!({"team": "x"}));
        assert!(agent["archived_at"].is_null());
        let object_model = req(server, Method::POST, "/agents")
            .json(json!({"name": "o", "model": {"id": "m-2", "speed": "fast"}}))
            .send()
            .await;
        assert_eq!(
            object_model.ok()["model"],
            json!({"id": "m-2", "speed": "fast"}),
            "stored as given"
        );
        assert_eq!(
            req(server, Method::POST, "/agents")
                .json(json!({"name": "n".repeat(64), "model": "m"}))
                .send()
                .await
                .ok()["version"],
            1
        );

        for (body, param) in [
            (json!({"model": "m"}), "name"),
            (json!({"name": "", "model": "m"}), "name"),
            (json!({"name": "n".repeat(65), "model": "m"}), "name"),
            (json!({"name": "n"}), "model"),
            (json!({"name": "n", "model": ""}), "model"),
            (json!({"name": "n", "model": {}}), "model"),
            (json!({"name": "n", "model": {"id": 5}}), "model"),
            (json!({"name": "n", "model": 5}), "model"),
            (
                json!({"name": "n", "model": "m", "execution_identity": "service_account"}),
                "execution_identity",
            ),
            (
                json!({"name": "n", "model": "m", "execution_identity": {"type": ""}}),
                "execution_identity",
            ),
            (json!({"name": "n", "model": "m", "tools": "bash"}), "tools"),
            (json!({"name": "n", "model": "m", "tools": ["bash"]}), "tools"),
            (
                json!({"name": "n", "model": "m", "tools": [{"type": "bash"}, null]}),
                "tools",
            ),
            (
                json!({"name": "n", "model": "m", "metadata": {"k": ["v"]}}),
                "metadata",
            ),
        ] {
            let reply = req(server, Method::POST, "/agents")
                .json(body.clone())
                .send()
                .await;
            assert_eq!(
                reply.status,
                StatusCode::BAD_REQUEST,
                "{body}: {}",
                reply.body
            );
            reply.bad_param(param);
        }

        // Updates make new versions; sessions keep the version they were created with.
        let q = Queue {
            server,
            env: server.self_hosted_environment().await,
            agent: id.clone(),
        };
        let before = q.enqueue().await;
        let refused = req(server, Method::POST, &format!("/agents/{id}"))
            .json(json!({"tools": [{"type": "bash"}, "web"]}))
            .send()
            .await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.body);
        refused.bad_param("tools");
        let updated = req(server, Method::POST, &format!("/agents/{id}"))
            .json(json!({"name": "coder-2", "tools": []}))
            .send()
            .await;
        let updated = updated.ok().clone();
        assert_eq!(updated["version"], 2);
        assert_eq!(updated["name"], "coder-2");
        assert_eq!(updated["system"], "be brief", "untouched fields stay");
        assert_eq!(updated["created_at"], agent["created_at"]);
        let old_session = req(
            server,
            Method::GET,
            &format!("/sessions/{}", before.session),
        )
        .send()
        .await;
        assert_eq!(old_session.ok()["agent"]["version"], 1);
        assert_eq!(old_session.ok()["agent"]["name"], "coder");
        assert_eq!(
            old_session.ok()["agent"]["tools"],
            json!([{"type": "bash"}])
        );
        let after = q.enqueue().await;
        let new_session = req(
            server,
            Method::GET,
            &format!("/sessions/{}", after.session),
        )
        .send()
        .await;
        assert_eq!(new_session.ok()["agent"]["version"], 2);
        let pinned = req(server, Method::POST, "/sessions").json(json!({"agent": {"type": "agent", "id": id, "version": 1}, "environment_id": q.env})).send().await;
        assert_eq!(pinned.ok()["agent"]["name"], "coder");
        for version in [json!(99), json!(0), json!("1")] {
            let reply = req(server, Method::POST, "/sessions").json(json!({"agent": {"type": "agent", "id": id, "version": version}, "environment_id": q.env})).send().await;
            reply.bad_param("agent");
        }

        // Archive: once; afterwards no new sessions and no updates.
        let archived = req(server, Method::POST, &format!("/agents/{id}/archive"))
            .send()
            .await;
        assert!(!archived.ok()["archived_at"].is_null());
        assert_eq!(archived.ok()["version"], 2);
        req(server, Method::POST, &format!("/agents/{id}/archive"))
            .send()
            .await
            .error(409, "conflict_error");
        req(server, Method::POST, &format!("/agents/{id}"))
            .json(json!({"name": "x"}))
            .send()
            .await
            .error(400, "invalid_request_error");
        req(server, Method::POST, "/sessions")
            .json(json!({"agent": id, "environment_id": q.env}))
            .send()
            .await
            .bad_param("agent");
        assert_eq!(
            req(
                server,
                Method::GET,
                &format!("/sessions/{}", before.session)
            )
            .send()
            .await
            .ok()["agent_id"],
            id.as_str(),
            "existing sessions are unaffected"
        );

        let list = req(server, Method::GET, "/agents").send().await;
        assert_eq!(
            list.ok()["data"].as_array().unwrap().len(),
            2,
            "archived agents are hidden by default"
        );
        let list = req(server, Method::GET, "/agents?include_archived=true")
            .send()
            .await;
        assert_eq!(list.ok()["data"].as_array().unwrap().len(), 3);
        for bad in [unknown_id("agent"), "agent_x".to_owned(), q.env.clone()] {
            req(server, Method::GET, &format!("/agents/{bad}"))
                .send()
                .await
                .error(404, "not_found_error");
            req(server, Method::POST, &format!("/agents/{bad}"))
                .json(json!({}))
                .send()
                .await
                .error(404, "not_found_error");
            req(server, Method::POST, &format!("/agents/{bad}/archive"))
                .send()
                .await
                .error(404, "not_found_error");
        }
    })
    .await;
}

#[tokio::test]
async fn sessions_create_and_enqueue() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let created = req(server, Method::POST, "/sessions")
            .json(json!({"agent": q.agent, "environment_id": q.env, "title": "t", "metadata": {"job": "j"}, "environment_variables": {"A": "1"}, "resources": [{"type": "file", "id": "f"}], "unknown": true}))
            .send()
            .await;
        let session = created.ok().clone();
        let sid = session["id"].as_str().unwrap().to_owned();
        assert!(is_uuid7_id(&session["id"], "sess"));
        assert_eq!(session["type"], "session");
        assert_eq!(session["status"], "idle");
        assert_eq!(session["agent_id"], q.agent.as_str());
        assert_eq!(session["agent"]["id"], q.agent.as_str());
        assert_eq!(session["agent"]["type"], "agent");
        assert_eq!(session["environment_id"], q.env.as_str());
        assert_eq!(session["title"], "t");
        assert_eq!(session["metadata"], json!({"job": "j"}));
        assert_eq!(session["environment_variables"], json!({"A": "1"}));
        assert_eq!(session["resources"], json!([{"type": "file", "id": "f"}]));
        assert!(session["archived_at"].is_null());
        assert_eq!(
            req(server, Method::GET, &format!("/sessions/{sid}"))
                .send()
                .await
                .ok(),
            &session
        );

        // Exactly one queued item for it, carrying its metadata.
        let list = q.req(Method::GET, &q.path("")).send().await;
        let items = list.ok()["data"].as_array().unwrap().clone();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0]["data"], json!({"type": "session", "id": sid}));
        assert_eq!(items[0]["state"], "queued");
        assert_eq!(items[0]["metadata"], json!({"job": "j"}));
        assert_eq!(items[0]["environment_id"], q.env.as_str());

        // On a cloud environment a session is stored but nothing is enqueued anywhere.
        let cloud =
            create_environment(server, json!({"name": "c", "config": {"type": "cloud"}})).await;
        let cloud = cloud.ok()["id"].as_str().unwrap().to_owned();
        let on_cloud = req(server, Method::POST, "/sessions")
            .json(json!({"agent": q.agent, "environment_id": cloud}))
            .send()
            .await;
        assert_eq!(on_cloud.ok()["status"], "idle");
        assert_eq!(q.stats().await["depth"], 1);

        for (body, status, param) in [
            (json!({"environment_id": q.env}), 400, Some("agent")),
            (json!({"agent": q.agent}), 400, Some("environment_id")),
            (
                json!({"agent": 5, "environment_id": q.env}),
                400,
                Some("agent"),
            ),
            (
                json!({"agent": q.agent, "environment_id": 5}),
                400,
                Some("environment_id"),
            ),
            (
                json!({"agent": q.agent, "environment_id": q.env, "title": "t".repeat(513)}),
                400,
                Some("title"),
            ),
            (
                json!({"agent": q.agent, "environment_id": q.env, "metadata": {"k": 1}}),
                400,
                Some("metadata"),
            ),
            (
                json!({"agent": q.agent, "environment_id": q.env, "environment_variables": {"A": 1}}),
                400,
                Some("environment_variables"),
            ),
            (
                json!({"agent": q.agent, "environment_id": q.env, "resources": "x"}),
                400,
                Some("resources"),
            ),
            (
                json!({"agent": unknown_id("agent"), "environment_id": q.env}),
                404,
                None,
            ),
            (
                json!({"agent": "agent_bad", "environment_id": q.env}),
                404,
                None,
            ),
            (
                json!({"agent": q.agent, "environment_id": unknown_id("env")}),
                404,
                None,
            ),
            (
                json!({"agent": q.agent, "environment_id": "env_bad"}),
                404,
                None,
            ),
        ] {
            let reply = req(server, Method::POST, "/sessions")
                .json(body.clone())
                .send()
                .await;
            match param {
                Some(param) => reply.bad_param(param),
                None => {
                    assert_eq!(reply.status.as_u16(), status, "{body}: {}", reply.body);
                    reply.error(404, "not_found_error");
                }
            }
        }
        assert_eq!(
            q.stats().await["depth"],
            1,
            "refused creates enqueued nothing"
        );
        for bad in [unknown_id("sess"), "sess_bad".to_owned(), q.env.clone()] {
            req(server, Method::GET, &format!("/sessions/{bad}"))
                .send()
                .await
                .error(404, "not_found_error");
            req(server, Method::POST, &format!("/sessions/{bad}"))
                .json(json!({}))
                .send()
                .await
                .error(404, "not_found_error");
            req(server, Method::POST, &format!("/sessions/{bad}/archive"))
                .send()
                .await
                .error(404, "not_found_error");
            req(server, Method::DELETE, &format!("/sessions/{bad}"))
                .send()
                .await
                .error(404, "not_found_error");
        }

        // Update: title and a metadata merge patch.
        let updated = req(server, Method::POST, &format!("/sessions/{sid}"))
            .json(json!({"title": "t2", "metadata": {"job": null, "k": "v"}}))
            .send()
            .await;
        assert_eq!(updated.ok()["title"], "t2");
        assert_eq!(updated.ok()["metadata"], json!({"k": "v"}));
        req(server, Method::POST, &format!("/sessions/{sid}"))
            .json(json!({"metadata": {"k": 2}}))
            .send()
            .await
            .bad_param("metadata");
    })
    .await;
}

#[tokio::test]
async fn sessions_list_filters() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let other_env = Queue {
            server,
            env: server.self_hosted_environment().await,
            agent: server.agent().await,
        };
        let s1 = q.enqueue().await;
        let s2 = q.enqueue().await;
        let s3 = other_env.enqueue().await;
        req(
            server,
            Method::POST,
            &format!("/sessions/{}/archive", s2.session),
        )
        .send()
        .await
        .ok();
        let ids = |reply: &Reply| listed_ids(reply.ok());

        assert_eq!(
            ids(&req(server, Method::GET, "/sessions").send().await),
            [s1.session.as_str(), s3.session.as_str()]
        );
        assert_eq!(
            ids(&req(server, Method::GET, "/sessions?include_archived=true")
                .send()
                .await),
            [
                s1.session.as_str(),
                s2.session.as_str(),
                s3.session.as_str()
            ]
        );
        assert_eq!(
            ids(&req(
                server,
                Method::GET,
                &format!("/sessions?environment_id={}", q.env)
            )
            .send()
            .await),
            [s1.session.as_str()]
        );
        assert_eq!(
            ids(&req(
                server,
                Method::GET,
                &format!("/sessions?agent_id={}", other_env.agent)
            )
            .send()
            .await),
            [s3.session.as_str()]
        );
        assert_eq!(
            ids(&req(server, Method::GET, "/sessions?statuses=idle")
                .send()
                .await)
            .len(),
            2
        );
        assert!(ids(&req(server, Method::GET, "/sessions?statuses=running")
            .send()
            .await)
        .is_empty());
        assert_eq!(
            ids(&req(server, Method::GET, "/sessions?statuses=running,idle")
                .send()
                .await)
            .len(),
            2
        );
        assert_eq!(
            ids(&req(
                server,
                Method::GET,
                "/sessions?statuses[]=running&statuses[]=idle"
            )
            .send()
            .await)
            .len(),
            2
        );
        assert_eq!(
            ids(&req(
                server,
                Method::GET,
                "/sessions?statuses=running&statuses=idle"
            )
            .send()
            .await)
            .len(),
            2
        );
        req(server, Method::GET, "/sessions?statuses=sleeping")
            .send()
            .await
            .bad_param("statuses");
        req(server, Method::GET, "/sessions?limit=0")
            .send()
            .await
            .bad_param("limit");
        req(
            server,
            Method::GET,
            "/sessions?after_id=work_0000000000000000000000000000abcd",
        )
        .send()
        .await
        .bad_param("after_id");
        let page = req(
            server,
            Method::GET,
            "/sessions?limit=1&include_archived=true",
        )
        .send()
        .await;
        let page = page.ok();
        assert_eq!(page["has_more"], true);
        assert_eq!(page["next_page"], json!(s1.session));
        let next = req(
            server,
            Method::GET,
            &format!(
                "/sessions?limit=1&include_archived=true&page={}",
                s1.session
            ),
        )
        .send()
        .await;
        assert_eq!(ids(&next), [s2.session.as_str()]);
    })
    .await;
}

#[tokio::test]
async fn session_archive_and_delete_force_stop_the_live_item() {
    each_backend(async |server| {
        let q = Queue::new(server).await;

        // Archive while a worker runs the item.
        let running = q.item_in("active").await;
        let archived = req(
            server,
            Method::POST,
            &format!("/sessions/{}/archive", running.session),
        )
        .send()
        .await;
        let archived = archived.ok().clone();
        assert!(!archived["archived_at"].is_null());
        assert_eq!(archived["status"], "idle", "archive does not change status");
        let item = q.get(&running.id).await;
        assert_eq!(item["state"], "stopped");
        assert_eq!(item["stop_requested_at"], item["stopped_at"]);
        assert_eq!(
            q.causes(&running.id).await.last().map(String::as_str),
            Some("session_archived")
        );
        // The worker learns it from a 409 on its next heartbeat.
        let beat = q
            .heartbeat(
                &running.id,
                &format!(
                    "?expected_last_heartbeat={}",
                    form_urlencoded::byte_serialize(
                        running.last_heartbeat.as_deref().unwrap().as_bytes()
                    )
                    .collect::<String>()
                ),
            )
            .await;
        beat.error(409, "invalid_request_error");
        req(
            server,
            Method::POST,
            &format!("/sessions/{}/archive", running.session),
        )
        .send()
        .await
        .error(409, "conflict_error");
        assert_eq!(
            req(
                server,
                Method::GET,
                &format!("/sessions/{}", running.session)
            )
            .send()
            .await
            .ok()["archived_at"],
            archived["archived_at"],
            "still readable"
        );

        // Archive and delete work from every live state, and on a session whose item already stopped.
        for state in ["queued", "starting", "stopping", "stopped"] {
            let item = q.item_in(state).await;
            let before = q.causes(&item.id).await;
            req(
                server,
                Method::POST,
                &format!("/sessions/{}/archive", item.session),
            )
            .send()
            .await
            .ok();
            let after = q.causes(&item.id).await;
            if state == "stopped" {
                assert_eq!(after, before, "a stopped item is left alone");
            } else {
                assert_eq!(
                    after.last().map(String::as_str),
                    Some("session_archived"),
                    "{state}"
                );
            }
            assert_eq!(q.state(&item.id).await, "stopped");
        }
        for state in ["queued", "starting", "active", "stopping", "stopped"] {
            let item = q.item_in(state).await;
            let deleted = req(
                server,
                Method::DELETE,
                &format!("/sessions/{}", item.session),
            )
            .send()
            .await;
            assert_eq!(
                deleted.ok(),
                &json!({"id": item.session, "type": "session_deleted"})
            );
            req(server, Method::GET, &format!("/sessions/{}", item.session))
                .send()
                .await
                .error(404, "not_found_error");
            req(
                server,
                Method::DELETE,
                &format!("/sessions/{}", item.session),
            )
            .send()
            .await
            .error(404, "not_found_error");
            // The item stays readable, stopped, with the reason in its history.
            assert_eq!(q.state(&item.id).await, "stopped", "{state}");
            if state != "stopped" {
                assert_eq!(
                    q.causes(&item.id).await.last().map(String::as_str),
                    Some("session_deleted"),
                    "{state}"
                );
            }
        }
        assert_eq!(
            q.poll("?reclaim_older_than_ms=0", None).await.ok(),
            &Value::Null,
            "nothing left to deliver"
        );
        let stats = q.stats().await;
        assert_eq!(
            stats["states"],
            json!({"queued": 0, "starting": 0, "active": 0, "stopping": 0}),
            "{stats}"
        );
    })
    .await;
}

#[tokio::test]
async fn admin_tokens_create_list_revoke() {
    each_backend(async |server| {
        let created = req(server, Method::POST, "/tokens")
            .json(json!({"name": "ci"}))
            .send()
            .await;
        let created = created.ok().clone();
        let secret = created["token"].as_str().unwrap().to_owned();
        assert!(
            secret.starts_with("tth_adm_") && secret.len() == "tth_adm_".len() + 43,
            "{secret}"
        );
        assert_eq!(created["name"], "ci");
        assert!(created["revoked_at"].is_null());
        let id = created["id"].as_str().unwrap().to_owned();

        // The new token is an admin token.
        req(server, Method::GET, "/environments")
            .bearer(&secret)
            .send()
            .await
            .ok();
        let made = req(server, Method::POST, "/tokens")
            .bearer(&secret)
            .json(json!({}))
            .send()
            .await;
        let made = made.ok().clone();
        assert!(made["name"].is_null());

        // The listing never shows a secret.
        let list = req(server, Method::GET, "/tokens").send().await;
        let text = list.ok().to_string();
        let listed = list.ok()["data"].as_array().unwrap();
        assert_eq!(listed.len(), 3, "bootstrap, ci and the unnamed one: {text}");
        assert!(listed.iter().all(|t| t.get("token").is_none()), "{text}");
        for s in [
            &secret,
            &server.admin_token,
            made["token"].as_str().unwrap(),
        ] {
            assert!(!text.contains(s), "a secret leaked into the listing");
        }
        assert!(listed.iter().any(|t| t["id"] == id.as_str()));

        // Revoke: the token stops working at once, the others keep working.
        let revoked = req(server, Method::DELETE, &format!("/tokens/{id}"))
            .send()
            .await;
        assert!(!revoked.ok()["revoked_at"].is_null());
        assert!(revoked.ok().get("token").is_none());
        req(server, Method::GET, "/environments")
            .bearer(&secret)
            .send()
            .await
            .error(401, "authentication_error");
        req(server, Method::GET, "/environments")
            .bearer(made["token"].as_str().unwrap())
            .send()
            .await
            .ok();
        req(
            server,
            Method::DELETE,
            &format!("/tokens/{}", unknown_id("tok")),
        )
        .send()
        .await
        .error(404, "not_found_error");
        // A token may revoke itself; it is dead afterwards.
        let own = made["id"].as_str().unwrap();
        req(server, Method::DELETE, &format!("/tokens/{own}"))
            .bearer(made["token"].as_str().unwrap())
            .send()
            .await
            .ok();
        req(server, Method::GET, "/tokens")
            .bearer(made["token"].as_str().unwrap())
            .send()
            .await
            .error(401, "authentication_error");

        // Environment keys are listed without secrets and scoped to one environment.
        let env = server.self_hosted_environment().await;
        let key = req(server, Method::POST, &format!("/environments/{env}/keys"))
            .json(json!({"name": "k"}))
            .send()
            .await;
        let key = key.ok().clone();
        assert_eq!(key["environment_id"], env.as_str());
        assert!(key["token"].as_str().unwrap().starts_with("tth_env_"));
        let keys = req(server, Method::GET, &format!("/environments/{env}/keys"))
            .send()
            .await;
        assert_eq!(keys.ok()["data"].as_array().unwrap().len(), 1);
        assert!(!keys
            .ok()
            .to_string()
            .contains(key["token"].as_str().unwrap()));
        let listed_tokens = req(server, Method::GET, "/tokens").send().await;
        assert!(
            listed_tokens.ok()["data"]
                .as_array()
                .unwrap()
                .iter()
                .all(|t| t["id"] != key["id"]),
            "keys are not admin tokens"
        );
        req(
            server,
            Method::POST,
            &format!("/environments/{}/keys", unknown_id("env")),
        )
        .send()
        .await
        .error(404, "not_found_error");
        // A key cannot be revoked through the token endpoint, nor a token through an environment.
        req(
            server,
            Method::DELETE,
            &format!("/tokens/{}", key["id"].as_str().unwrap()),
        )
        .send()
        .await
        .error(404, "not_found_error");
        req(
            server,
            Method::DELETE,
            &format!(
                "/environments/{env}/keys/{}",
                created["id"].as_str().unwrap()
            ),
        )
        .send()
        .await
        .error(404, "not_found_error");
        req(server, Method::GET, &format!("/environments/{env}/work"))
            .bearer(key["token"].as_str().unwrap())
            .send()
            .await
            .ok();
    })
    .await;
}

/// Creates `n` sessions on `q` concurrently, a few at a time; returns nothing (ids come from the list).
async fn enqueue_many(q: &Queue<'_>, n: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(8) {
        futures::future::join_all(chunk.iter().map(|_| async {
            let body = json!({"agent": q.agent, "environment_id": q.env});
            req(q.server, Method::POST, "/sessions")
                .json(body)
                .send()
                .await
                .ok();
        }))
        .await;
    }
}

#[tokio::test]
async fn work_list_pagination() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        enqueue_many(&q, 105).await;
        // Another environment's items never show up.
        let other = Queue {
            server,
            env: server.self_hosted_environment().await,
            agent: q.agent.clone(),
        };
        other.enqueue().await;
        let list = |query: String| {
            let q = &q;
            async move { q.req(Method::GET, &q.path(&query)).send().await }
        };

        // The whole list, in ascending id order, via pages of 100 (and `limit` above 100 is clamped, D-4).
        let first = list("?limit=100".into()).await.ok().clone();
        assert_eq!(first["data"].as_array().unwrap().len(), 100);
        assert_eq!(first["has_more"], true);
        let second = list(format!(
            "?limit=100&page={}",
            first["next_page"].as_str().unwrap()
        ))
        .await
        .ok()
        .clone();
        assert_eq!(second["has_more"], false);
        assert!(second["next_page"].is_null());
        let all: Vec<String> = listed_ids(&first).into_iter().chain(listed_ids(&second)).collect();
        assert_eq!(all.len(), 105);
        let mut sorted = all.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(all, sorted, "ascending id order, no repeats");
        for limit in ["101", "500", "100000"] {
            let page = list(format!("?limit={limit}")).await;
            assert_eq!(
                listed_ids(page.ok()),
                all[..100],
                "limit={limit} is clamped to 100"
            );
            assert_eq!(page.ok()["has_more"], true);
        }

        // Default limit 20; the envelope.
        let page = list(String::new()).await.ok().clone();
        assert_eq!(listed_ids(&page), all[..20]);
        assert_eq!(page["first_id"], json!(all[0]));
        assert_eq!(page["last_id"], json!(all[19]));
        assert_eq!(page["has_more"], true);
        assert_eq!(
            page["next_page"],
            json!(all[19]),
            "next_page is the last id (D-3)"
        );
        // `page` ≡ `after_id`.
        let by_page = list(format!("?page={}", all[19])).await.ok().clone();
        let by_after = list(format!("?after_id={}", all[19])).await.ok().clone();
        assert_eq!(by_page, by_after);
        assert_eq!(listed_ids(&by_page), all[20..40]);
        let last = list(format!("?limit=5&after_id={}", all[99]))
            .await
            .ok()
            .clone();
        assert_eq!(listed_ids(&last), all[100..]);
        assert_eq!(last["has_more"], false);
        assert!(last["next_page"].is_null());
        let empty = list(format!("?after_id={}", all[104])).await.ok().clone();
        assert_eq!(
            empty,
            json!({"data": [], "first_id": null, "last_id": null, "has_more": false, "next_page": null})
        );

        // before_id: the items just before the cursor, still in ascending order (D-4).
        let before = list(format!("?limit=5&before_id={}", all[50]))
            .await
            .ok()
            .clone();
        assert_eq!(listed_ids(&before), all[45..50]);
        assert_eq!(before["first_id"], json!(all[45]));
        assert_eq!(before["last_id"], json!(all[49]));
        // `has_more` and `next_page` say what follows the page in list order (§1.8, D-3), whichever
        // way it was asked for: here the cursor's own item and on.
        assert_eq!(before["has_more"], true);
        assert_eq!(before["next_page"], json!(all[49]));
        let start = list(format!("?limit=5&before_id={}", all[3]))
            .await
            .ok()
            .clone();
        assert_eq!(listed_ids(&start), all[..3]);
        assert_eq!(start["has_more"], true, "nothing precedes it, but all[3] follows");
        assert_eq!(start["next_page"], json!(all[2]));
        let newest = list("?limit=2&before_id=work_ffffffffffffffffffffffffffffffff".into())
            .await
            .ok()
            .clone();
        assert_eq!(listed_ids(&newest), all[103..]);
        assert_eq!(newest["has_more"], false, "nothing follows the newest page");
        assert!(newest["next_page"].is_null());
        let none = list(format!("?before_id={}", all[0])).await.ok().clone();
        assert!(listed_ids(&none).is_empty());
        assert!(none["first_id"].is_null() && none["last_id"].is_null());
        assert_eq!(none["has_more"], false);

        // Unknown but well-formed cursors are positions in id order (D-4).
        let between = id_after(&all[9]);
        assert!(!all.contains(&between));
        assert_eq!(
            listed_ids(list(format!("?limit=3&after_id={between}")).await.ok()),
            all[10..13]
        );
        assert_eq!(
            listed_ids(list(format!("?limit=3&page={between}")).await.ok()),
            all[10..13]
        );
        assert_eq!(
            listed_ids(list(format!("?limit=3&before_id={between}")).await.ok()),
            all[7..10]
        );
        assert_eq!(
            listed_ids(
                list("?limit=3&after_id=work_00000000000000000000000000000000".into())
                    .await
                    .ok()
            ),
            all[..3]
        );
        assert!(listed_ids(
            list("?after_id=work_ffffffffffffffffffffffffffffffff".into())
                .await
                .ok()
        )
        .is_empty());

        // Refusals.
        for bad in ["0", "-1", "abc", "1.5", ""] {
            list(format!("?limit={bad}")).await.bad_param("limit");
        }
        for two in [
            format!("?page={0}&after_id={0}", all[1]),
            format!("?after_id={0}&before_id={0}", all[1]),
            format!("?page={0}&before_id={0}", all[1]),
            format!("?page={0}&after_id={0}&before_id={0}", all[1]),
        ] {
            let reply = list(two.clone()).await;
            assert_eq!(
                reply.status,
                StatusCode::BAD_REQUEST,
                "{two}: {}",
                reply.body
            );
            reply.error(400, "invalid_request_error");
        }
        for (name, value) in [
            ("page", "garbage"),
            ("after_id", q.env.as_str()),
            ("before_id", "work_XYZ"),
            ("page", ""),
            ("after_id", "WORK_00000000000000000000000000000000"),
        ] {
            list(format!("?{name}={value}")).await.bad_param(name);
        }

        // Every state is listed (D-4, D-25).
        q.stop(&all[0], json!({"force": true})).await.ok();
        q.ack(&all[1], None).await.ok();
        let states: Vec<Value> = list("?limit=2".into()).await.ok()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["state"].clone())
            .collect();
        assert_eq!(states, [json!("stopped"), json!("starting")]);
    })
    .await;
}

#[tokio::test]
async fn environment_and_agent_list_pagination() {
    each_backend(async |server| {
        let mut envs = Vec::new();
        for i in 0..25 {
            let env = create_environment(
                server,
                json!({"name": format!("e{i}"), "config": {"type": "self_hosted"}}),
            )
            .await;
            envs.push(env.ok()["id"].as_str().unwrap().to_owned());
        }
        for archived in [&envs[2], &envs[7], &envs[24]] {
            req(
                server,
                Method::POST,
                &format!("/environments/{archived}/archive"),
            )
            .send()
            .await
            .ok();
        }
        let visible: Vec<String> = envs
            .iter()
            .enumerate()
            .filter(|(i, _)| ![2, 7, 24].contains(i))
            .map(|(_, e)| e.clone())
            .collect();

        let page = req(server, Method::GET, "/environments")
            .send()
            .await
            .ok()
            .clone();
        assert_eq!(listed_ids(&page), visible[..20]);
        assert_eq!(page["has_more"], true);
        assert_eq!(page["next_page"], json!(visible[19]));
        let rest = req(
            server,
            Method::GET,
            &format!("/environments?page={}", visible[19]),
        )
        .send()
        .await
        .ok()
        .clone();
        assert_eq!(listed_ids(&rest), visible[20..]);
        assert_eq!(rest["has_more"], false);
        let all = req(
            server,
            Method::GET,
            "/environments?include_archived=true&limit=100",
        )
        .send()
        .await;
        assert_eq!(listed_ids(all.ok()), envs);
        let before = req(
            server,
            Method::GET,
            &format!(
                "/environments?include_archived=true&limit=3&before_id={}",
                envs[10]
            ),
        )
        .send()
        .await;
        assert_eq!(listed_ids(before.ok()), envs[7..10]);

        // Above 100 is refused here (unlike the work list), on the Qoder prefix; the Anthropic prefix
        // allows up to 1000.
        req(server, Method::GET, "/environments?limit=101")
            .send()
            .await
            .bad_param("limit");
        req(server, Method::GET, "/environments?limit=100")
            .send()
            .await
            .ok();
        let v1 = req_v1(server, Method::GET, "/environments?limit=101")
            .send()
            .await;
        assert_eq!(listed_ids(v1.ok()), visible);
        req_v1(server, Method::GET, "/environments?limit=1001")
            .send()
            .await
            .bad_param("limit");
        for bad in ["0", "-3", "x"] {
            req(server, Method::GET, &format!("/environments?limit={bad}"))
                .send()
                .await
                .bad_param("limit");
        }
        let two = req(
            server,
            Method::GET,
            &format!("/environments?page={0}&before_id={0}", envs[3]),
        )
        .send()
        .await;
        two.error(400, "invalid_request_error");
        req(
            server,
            Method::GET,
            "/environments?after_id=work_00000000000000000000000000000000",
        )
        .send()
        .await
        .bad_param("after_id");
        req(
            server,
            Method::GET,
            "/environments?created_at[gte]=yesterday",
        )
        .send()
        .await
        .bad_param("created_at[gte]");
        let future = req(
            server,
            Method::GET,
            "/environments?created_at[gte]=2999-01-01T00:00:00Z",
        )
        .send()
        .await;
        assert!(listed_ids(future.ok()).is_empty());
        let past = req(
            server,
            Method::GET,
            "/environments?created_at[gte]=2000-01-01T00:00:00%2B02:00&limit=100",
        )
        .send()
        .await;
        assert_eq!(listed_ids(past.ok()), visible);

        // Agents page the same way.
        let mut agents = Vec::new();
        for _ in 0..3 {
            agents.push(server.agent().await);
        }
        let page = req(server, Method::GET, "/agents?limit=2")
            .send()
            .await
            .ok()
            .clone();
        assert_eq!(listed_ids(&page), agents[..2]);
        assert_eq!(page["next_page"], json!(agents[1]));
        let rest = req(
            server,
            Method::GET,
            &format!("/agents?limit=2&after_id={}", agents[1]),
        )
        .send()
        .await;
        assert_eq!(listed_ids(rest.ok()), agents[2..]);
        req(server, Method::GET, "/agents?limit=101")
            .send()
            .await
            .bad_param("limit");

        // Every list's `before_id` page says what follows it in list order (§1.8, D-3), as the work
        // list's does (`work_list_pagination`).
        let env = &visible[0];
        for _ in 0..3 {
            server.session(env, &agents[0]).await;
            req(server, Method::POST, &format!("/environments/{env}/keys"))
                .json(json!({"name": "k"}))
                .send()
                .await
                .ok();
            req(server, Method::POST, "/tokens")
                .json(json!({"name": "t"}))
                .send()
                .await
                .ok();
        }
        for (path, prefix) in [
            ("/environments?include_archived=true".to_owned(), "env"),
            ("/agents".to_owned(), "agent"),
            ("/sessions".to_owned(), "sess"),
            (format!("/environments/{env}/keys"), "envkey"),
            ("/tokens".to_owned(), "tok"),
        ] {
            before_pages_look_forward(server, &path, prefix).await;
        }
    })
    .await;
}

/// On the list at `path` (3 items or more): the page before its last item says that item follows it,
/// and the page before a cursor past every id says nothing does.
async fn before_pages_look_forward(server: &TestServer, path: &str, prefix: &str) {
    let sep = if path.contains('?') { '&' } else { '?' };
    let get = |query: String| async move {
        req(server, Method::GET, &format!("{path}{sep}{query}"))
            .send()
            .await
            .ok()
            .clone()
    };
    let ids = listed_ids(&get("limit=100".into()).await);
    let n = ids.len();
    assert!(n >= 3, "{path}: {ids:?}");
    let before_last = get(format!("limit=2&before_id={}", ids[n - 1])).await;
    assert_eq!(listed_ids(&before_last), ids[n - 3..n - 1], "{path}");
    assert_eq!(
        before_last["has_more"], true,
        "{path}: the last item follows"
    );
    assert_eq!(before_last["next_page"], json!(ids[n - 2]), "{path}");
    let newest = get(format!("limit=2&before_id={prefix}_{}", "f".repeat(32))).await;
    assert_eq!(listed_ids(&newest), ids[n - 2..], "{path}");
    assert_eq!(
        newest["has_more"], false,
        "{path}: nothing follows the newest"
    );
    assert!(newest["next_page"].is_null(), "{path}");
}
