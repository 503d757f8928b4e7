//! TLS to PostgreSQL, against real clusters: one with `ssl=on` and a certificate for `localhost` signed
//! by a throwaway CA (`TETHER_PG_TLS=1 scripts/pg start`, named by `TETHER_TEST_POSTGRES_TLS_URL`), and
//! the suite's plain cluster (`TETHER_TEST_POSTGRES_URL`), which offers no TLS.
//!
//! Without those variables these tests say so and pass, except under CI, where they must run.

use std::path::PathBuf;

use tether_store::{postgres, tls, Store};

fn required(variable: &str) -> Option<String> {
    tether_testkit::required_url(variable, "the PostgreSQL TLS tests")
}

/// Why [`postgres::connect`] refuses `url`; panics when it connects.
async fn store_refusal(url: &str) -> String {
    match postgres::connect(url).await {
        Ok(_) => panic!("the store connected to {url}"),
        Err(error) => error.to_string(),
    }
}

/// The TLS cluster's URL, as `scripts/pg url` prints it: `localhost`, `verify-full`, the test CA.
fn tls_url() -> Option<String> {
    required("TETHER_TEST_POSTGRES_TLS_URL")
}

fn plain_url() -> Option<String> {
    required("TETHER_TEST_POSTGRES_URL")
}

/// The directory holding the test CA (`ca.crt`) and the unrelated one (`other-ca.crt`).
fn certificate_dir(url: &str) -> PathBuf {
    let (_, options) = tls::split_tls_options(url).expect("parses");
    match options.roots {
        tls::RootSource::File(path) => path.parent().expect("a directory").to_owned(),
        other => panic!("the TLS cluster's URL should name its CA, not {other:?}"),
    }
}

/// `url` with its query replaced by `query`.
fn with_query(url: &str, query: &str) -> String {
    let base = url.split_once('?').map_or(url, |(base, _)| base);
    format!("{base}?{query}")
}

/// Connects with the driver alone and says whether the session is encrypted.
async fn encrypted(url: &str) -> Result<bool, String> {
    let connection = tls::parse(url).map_err(|e| e.to_string())?;
    let (client, driver) = connection
        .config
        .connect(connection.tls)
        .await
        .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))?;
    let driver = tokio::spawn(driver);
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    drop(client);
    let _ = driver.await;
    Ok(row.get(0))
}

#[tokio::test]
async fn verify_full_runs_the_store_over_tls() {
    let Some(admin) = tls_url() else { return };
    assert_eq!(encrypted(&admin).await, Ok(true));
    // The whole store — migrations, the pool, the listener — on a database reached the same way.
    let url = tether_testkit::postgres::create_test_database(&admin)
        .await
        .expect("a test database over TLS");
    assert!(url.contains("sslmode=verify-full"), "{url}");
    let store = postgres::connect(&url).await.expect("the store over TLS");
    store.ping().await.expect("the store answers");
    assert_eq!(store.reconnections(), 0);
}

#[tokio::test]
async fn verify_full_checks_the_host_name_and_verify_ca_does_not() {
    let Some(admin) = tls_url() else { return };
    let by_address = admin.replace("@localhost:", "@127.0.0.1:");
    assert_ne!(by_address, admin, "the TLS URL names localhost");
    let refused = encrypted(&by_address).await.expect_err("wrong host name");
    assert!(refused.contains("NotValidForName"), "{refused}");
    let error = store_refusal(&by_address).await;
    assert!(error.contains("certificate"), "{error}");

    let verify_ca = by_address.replace("sslmode=verify-full", "sslmode=verify-ca");
    assert_eq!(encrypted(&verify_ca).await, Ok(true));
}

#[tokio::test]
async fn an_untrusted_ca_is_refused() {
    let Some(admin) = tls_url() else { return };
    let dir = certificate_dir(&admin);
    let other = with_query(
        &admin,
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            dir.join("other-ca.crt").display()
        ),
    );
    let refused = encrypted(&other).await.expect_err("untrusted CA");
    assert!(refused.contains("UnknownIssuer"), "{refused}");
    // `require` with a root file named authenticates the server as libpq does.
    let require = other.replace("sslmode=verify-full", "sslmode=require");
    let refused = encrypted(&require).await.expect_err("untrusted CA");
    assert!(refused.contains("UnknownIssuer"), "{refused}");
}

#[tokio::test]
async fn encryption_only_modes_connect_without_a_trusted_root() {
    let Some(admin) = tls_url() else { return };
    for mode in ["require", "prefer"] {
        let url = with_query(&admin, &format!("sslmode={mode}"));
        assert_eq!(encrypted(&url).await, Ok(true), "sslmode={mode}");
    }
    let disabled = with_query(&admin, "sslmode=disable");
    assert_eq!(encrypted(&disabled).await, Ok(false));
}

#[tokio::test]
async fn require_against_a_server_without_tls_is_a_clear_error() {
    let Some(plain) = plain_url() else { return };
    let prefer = with_query(&plain, "sslmode=prefer");
    assert_eq!(encrypted(&prefer).await, Ok(false), "prefer falls back");

    let require = with_query(&plain, "sslmode=require");
    let error = store_refusal(&require).await;
    assert!(error.contains("server does not support TLS"), "{error}");
}

#[tokio::test]
async fn unsupported_modes_are_refused_before_connecting() {
    let error = store_refusal("postgres://127.0.0.1:1/x?sslmode=allow").await;
    assert!(error.contains("sslmode=allow is not supported"), "{error}");
}
