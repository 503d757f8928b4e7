//! `GET /openapi.json` (§11.4) describes what the server serves: every documented operation, under both
//! prefixes, reaches a handler. Requests go without a credential, so each documented API operation must
//! answer 401 (its handler ran and asked for one) and the operations surface 200; a 404 would mean a path
//! that is documented but not routed.

use reqwest::{Method, StatusCode};
use serde_json::Value;
use tether_testkit::{Backend, TestServer};

/// A well-formed id for a path parameter, so that nothing is refused for its shape.
fn sample(param: &str) -> &'static str {
    match param {
        "environment_id" => "env_019f3be4fd2475d9a784bf2c739e1194",
        "work_id" => "work_019f3be4fd2475d9a784bf2c739e1194",
        "agent_id" => "agent_019f3be4fd2475d9a784bf2c739e1194",
        "session_id" => "sess_019f3be4fd2475d9a784bf2c739e1194",
        "key_id" => "envkey_019f3be4fd2475d9a784bf2c739e1194",
        "file" => "app.js",
        _ => "tok_019f3be4fd2475d9a784bf2c739e1194",
    }
}

fn fill(path: &str) -> String {
    path.split('/')
        .map(
            |segment| match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(name) => sample(name).to_owned(),
                None => segment.to_owned(),
            },
        )
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test]
async fn every_documented_operation_is_served_under_both_prefixes() {
    let server = TestServer::start(&Backend::Sqlite).await;
    let http = reqwest::Client::new();
    let response = http
        .get(format!("{}/openapi.json", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let doc: Value = response.json().await.unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );

    let paths = doc["paths"].as_object().expect("paths");
    let mut seen = 0;
    let mut per_prefix = [0, 0];
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap();
            let public = operation["security"].as_array().is_some_and(Vec::is_empty);
            let mut request =
                http.request(method.clone(), format!("{}{}", server.base, fill(path)));
            if method == Method::POST {
                request = request
                    .header("content-type", "application/json")
                    .body("{}");
            }
            let response = request.send().await.unwrap();
            let status = response.status();
            assert_ne!(
                status,
                StatusCode::NOT_FOUND,
                "{method} {path} is documented but not served"
            );
            if public {
                assert_eq!(status, StatusCode::OK, "{method} {path}");
            } else {
                assert_eq!(
                    status,
                    StatusCode::UNAUTHORIZED,
                    "{method} {path} answered without a credential"
                );
                let body: Value = response.json().await.unwrap();
                assert_eq!(
                    body["error"]["type"], "authentication_error",
                    "{method} {path}"
                );
            }
            if path.starts_with("/api/v1/cloud/") {
                per_prefix[0] += 1;
            } else if path.starts_with("/v1/") {
                per_prefix[1] += 1;
            }
            seen += 1;
        }
    }
    assert_eq!(
        per_prefix[0], per_prefix[1],
        "both prefixes document the same operations"
    );
    assert!(
        per_prefix[0] >= 37,
        "only {} operations documented per prefix",
        per_prefix[0]
    );
    assert_eq!(
        seen,
        per_prefix[0] + per_prefix[1] + 6,
        "the operations surface: healthz, readyz, metrics, openapi.json, the dashboard and its files"
    );

    // And the converse sanity check: what is not documented is not served.
    let status = http
        .get(format!("{}/v1/nothing-here", server.base))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Authentication as documented: bearer on both prefixes; x-api-key on /v1 only.
    let env_list = |prefix: &str| format!("{}{prefix}/environments", server.base);
    let token = server.admin_token.clone();
    for prefix in ["/api/v1/cloud", "/v1"] {
        let status = http
            .get(env_list(prefix))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, StatusCode::OK, "bearer on {prefix}");
    }
    let with_key = |prefix: &str| {
        http.get(env_list(prefix))
            .header("x-api-key", &token)
            .send()
    };
    assert_eq!(with_key("/v1").await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        with_key("/api/v1/cloud").await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    assert_eq!(schemes["api_key"]["name"], "x-api-key");
    server.shutdown().await;
}
