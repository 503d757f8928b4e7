//! The PostgreSQL executor against a real server: migrations under concurrent starts, value mapping,
//! the conflict rules, notices between processes, and clear failures when the server is absent.
//!
//! Needs `TETHER_TEST_POSTGRES_URL` (see `scripts/pg`); without it these tests say so and pass, except
//! under CI, where they must run.

mod common;

use std::time::Duration;

use tether_core::resources::CredentialKind;
use tether_core::Timestamp;
use tether_store::executor::Executor;
use tether_store::postgres::PostgresExecutor;
use tether_store::sql::{Expect, Statement, Value};
use tether_store::{postgres, ChangeSet, Notice, SqlStore, Store, StoreError, Write};

fn admin_url() -> Option<String> {
    match std::env::var("TETHER_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => {
            panic!(
                "CI must run the PostgreSQL tests: set TETHER_TEST_POSTGRES_URL (see scripts/pg)"
            )
        }
        _ => {
            eprintln!("skipped: TETHER_TEST_POSTGRES_URL is not set");
            None
        }
    }
}

async fn fresh() -> Option<String> {
    let admin = admin_url()?;
    Some(
        tether_testkit::postgres::create_test_database(&admin)
            .await
            .expect("create a test database"),
    )
}

/// A store on a fresh database, as one server process would have (`None` without PostgreSQL).
async fn store_on_a_fresh_database() -> Option<SqlStore<PostgresExecutor>> {
    let url = fresh().await?;
    Some(postgres::connect(&url).await.unwrap())
}

/// Two stores on one fresh database, as two server processes would have (`None` without PostgreSQL).
async fn two_stores_on_a_fresh_database(
) -> Option<(SqlStore<PostgresExecutor>, SqlStore<PostgresExecutor>)> {
    let url = fresh().await?;
    let a = postgres::connect(&url).await.unwrap();
    let b = postgres::connect(&url).await.unwrap();
    Some((a, b))
}

/// Every row `sql` (a statement without parameters) returns.
async fn query_all(executor: &PostgresExecutor, sql: &str) -> Vec<Vec<Value>> {
    executor.query(Statement::new(sql, vec![])).await.unwrap()
}

#[tokio::test]
async fn servers_starting_together_migrate_once() {
    let Some(url) = fresh().await else { return };
    let starts = (0..4).map(|_| postgres::connect(&url));
    let stores = futures::future::join_all(starts).await;
    for store in &stores {
        assert!(store.is_ok(), "{:?}", store.as_ref().err());
    }
    let store = stores.into_iter().next().unwrap().unwrap();
    let rows = query_all(store.executor(), "SELECT COUNT(*) FROM schema_migrations").await;
    assert_eq!(
        rows,
        vec![vec![Value::Int(tether_store::sql::MIGRATIONS.len() as i64)]]
    );
    store.ping().await.unwrap();
}

fn insert_worker(worker_id: &str) -> (Statement, Expect) {
    (
        Statement::new(
            "INSERT INTO workers (environment_id, worker_id, last_poll_at) VALUES ($1, $2, $3)",
            vec!["env_a".into(), worker_id.into(), Value::Int(1)],
        ),
        Expect::OneRow,
    )
}

#[tokio::test]
async fn values_round_trip_and_conditions_conflict() {
    let Some(store) = store_on_a_fresh_database().await else {
        return;
    };
    let exec = store.executor();
    let insert = |version: i64| {
        (
            Statement::new(
                "INSERT INTO workers (environment_id, worker_id, last_poll_at) VALUES ($1, $2, $3)",
                vec!["env_a".into(), "w1".into(), Value::Int(version)],
            ),
            Expect::OneRow,
        )
    };
    exec.execute(vec![insert(7)]).await.unwrap();
    // A uniqueness violation is a lost race, and rolls the whole list back.
    let second = exec
        .execute(vec![
            (
                Statement::new(
                    "INSERT INTO workers (environment_id, worker_id, last_poll_at) VALUES ($1, $2, $3)",
                    vec!["env_a".into(), "w2".into(), Value::Int(1)],
                ),
                Expect::OneRow,
            ),
            insert(8),
        ])
        .await;
    assert!(matches!(second, Err(StoreError::Conflict)), "{second:?}");
    // A condition that matches no row is a conflict too.
    let stale = exec
        .execute(vec![
            (
                Statement::new(
                    "UPDATE workers SET last_poll_at = $2 WHERE worker_id = $1",
                    vec!["w1".into(), Value::Int(9)],
                ),
                Expect::OneRow,
            ),
            (
                Statement::new(
                    "UPDATE workers SET last_poll_at = $2 WHERE worker_id = $1",
                    vec!["nobody".into(), Value::Int(9)],
                ),
                Expect::OneRow,
            ),
        ])
        .await;
    assert!(matches!(stale, Err(StoreError::Conflict)), "{stale:?}");
    // The refused lists left no transaction open on their connection: the next list commits itself
    // only, not the update of w1 that came before the refusal.
    exec.execute(vec![insert_worker("w3"), insert_worker("w4")])
        .await
        .unwrap();
    exec.execute(vec![(
        Statement::new(
            "DELETE FROM workers WHERE worker_id IN ('w3', 'w4')",
            vec![],
        ),
        Expect::Any,
    )])
    .await
    .unwrap();
    // Nor does a list whose caller gave up while it ran: its connection leaves the pool. Lists then
    // run on every connection of the pool at once, one of which would be the abandoned list's, were
    // it back in the pool, and would commit what the abandoned list had done.
    let abandoned = tokio::time::timeout(
        Duration::from_millis(200),
        exec.execute(vec![
            insert_worker("w5"),
            (Statement::new("SELECT pg_sleep(2)", vec![]), Expect::Any),
        ]),
    )
    .await;
    assert!(abandoned.is_err(), "the list was still running");
    let everywhere = (0..postgres::POOL_SIZE).map(|i| {
        exec.execute(vec![
            insert_worker(&format!("x{i:02}")),
            insert_worker(&format!("y{i:02}")),
        ])
    });
    for list in futures::future::join_all(everywhere).await {
        list.unwrap();
    }
    let w5 = "SELECT COUNT(*) FROM workers WHERE worker_id = 'w5'";
    assert_eq!(query_all(exec, w5).await, vec![vec![Value::Int(0)]]);
    exec.execute(vec![(
        Statement::new(
            "DELETE FROM workers WHERE worker_id LIKE 'x%' OR worker_id LIKE 'y%'",
            vec![],
        ),
        Expect::Any,
    )])
    .await
    .unwrap();
    let rows = query_all(
        exec,
        "SELECT worker_id, last_poll_at, NULL, COUNT(*) OVER () FROM workers ORDER BY worker_id",
    )
    .await;
    assert_eq!(
        rows,
        vec![vec![
            Value::Text("w1".into()),
            Value::Int(7),
            Value::Null,
            Value::Int(1)
        ]]
    );
    // NULL parameters bind to whatever type the statement needs.
    let rows = exec
        .query(Statement::new(
            "SELECT COUNT(*) FROM credentials WHERE environment_id = $1 OR revoked_at = $2",
            vec![Value::Null, Value::Null],
        ))
        .await
        .unwrap();
    assert_eq!(rows, vec![vec![Value::Int(0)]]);

    // The store's own queries on an empty queue: SUM and COUNT arrive as integers.
    let counts = store.queue_counts("env_a").await.unwrap();
    assert_eq!((counts.depth, counts.pending), (0, 0));
    assert_eq!(counts.oldest_queued_at, None);
    assert_eq!(
        store
            .count_credentials(CredentialKind::Admin, true)
            .await
            .unwrap(),
        0
    );
    let now = Timestamp::from_micros(1_000_000);
    store
        .commit(ChangeSet::one(Write::TouchWorker {
            environment_id: "env_a".into(),
            worker_id: "w1".into(),
            at: now,
        }))
        .await
        .unwrap();
    let seen = store
        .workers_seen("env_a", Timestamp::from_micros(0), 100)
        .await
        .unwrap();
    assert_eq!(seen, vec![("w1".to_owned(), now)]);
    store
        .commit(ChangeSet::one(Write::ForgetWorkers { before: now }))
        .await
        .unwrap();
    assert_eq!(
        store
            .workers_seen("env_a", Timestamp::from_micros(0), 100)
            .await
            .unwrap()
            .len(),
        1,
        "a poll at the cutoff is kept"
    );
    store
        .commit(ChangeSet::one(Write::ForgetWorkers { before: now.next() }))
        .await
        .unwrap();
    assert!(store
        .workers_seen("env_a", Timestamp::from_micros(0), 100)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn notices_reach_other_processes_but_not_their_sender() {
    let Some((a, b)) = two_stores_on_a_fresh_database().await else {
        return;
    };
    let mut at_a = a.subscribe();
    let mut at_b = b.subscribe();
    let notice = Notice::WorkClaimable {
        environment_id: "env_x".into(),
    };
    // The listener connects in the background: announce until B hears it.
    let heard = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            a.announce(vec![notice.clone()]).await.unwrap();
            match tokio::time::timeout(Duration::from_millis(200), at_b.recv()).await {
                Ok(Ok(n)) => return n,
                _ => continue,
            }
        }
    })
    .await
    .expect("B hears A");
    assert_eq!(heard, notice);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), at_a.recv())
            .await
            .is_err(),
        "A does not wake itself twice"
    );
}

/// Notices announced in a burst are sent together, and each is heard as often as it was announced: a
/// waiter elsewhere is woken per notice.
#[tokio::test]
async fn a_burst_of_notices_is_heard_once_per_announcement() {
    let Some((a, b)) = two_stores_on_a_fresh_database().await else {
        return;
    };
    let mut at_b = b.subscribe();
    let ready = Notice::Session {
        session_id: "sesn_ready".into(),
    };
    hears(&a, &mut at_b, &ready).await;
    while at_b.try_recv().is_ok() {}
    let notice = Notice::WorkClaimable {
        environment_id: "env_burst".into(),
    };
    let burst = (0..300).map(|_| a.announce(vec![notice.clone()]));
    for sent in futures::future::join_all(burst).await {
        sent.unwrap();
    }
    let mut heard = 0;
    while heard < 300 {
        match tokio::time::timeout(Duration::from_secs(10), at_b.recv()).await {
            Ok(Ok(n)) if n == notice => heard += 1,
            Ok(Ok(_)) => {}
            other => panic!("heard {heard} of 300 notices, then {other:?}"),
        }
    }
}

/// Announces from `a` until `at` hears it (listeners connect in the background).
async fn hears(
    a: &SqlStore<PostgresExecutor>,
    at: &mut tokio::sync::broadcast::Receiver<Notice>,
    notice: &Notice,
) {
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            a.announce(vec![notice.clone()]).await.unwrap();
            if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(200), at.recv()).await {
                if &n == notice {
                    return;
                }
            }
        }
    })
    .await
    .expect("the notice is heard");
}

/// Two stores on a fresh database, B hearing what A announces; `None` without PostgreSQL.
async fn a_listening_pair() -> Option<(
    SqlStore<PostgresExecutor>,
    SqlStore<PostgresExecutor>,
    tokio::sync::broadcast::Receiver<Notice>,
)> {
    let (a, b) = two_stores_on_a_fresh_database().await?;
    let mut at_b = b.subscribe();
    hears(&a, &mut at_b, &listened()).await;
    Some((a, b, at_b))
}

/// The notice the listening tests announce.
fn listened() -> Notice {
    Notice::Session {
        session_id: "sess_x".into(),
    }
}

/// Cuts every listening connection of the database `store` is on, as a network failure, a proxy or
/// an operator would. A listener's last statement is its `LISTEN`, or the empty probe it sends every
/// second; the pool's connections never send an empty statement.
async fn cut_the_listeners(store: &SqlStore<PostgresExecutor>) {
    query_all(
        store.executor(),
        "SELECT pg_terminate_backend(pid)::TEXT FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() \
             AND (query LIKE 'LISTEN%' OR query = '')",
    )
    .await;
}

#[tokio::test]
async fn a_dropped_listener_reconnects_and_asks_for_a_resync_without_an_outage() {
    let Some((a, b, mut at_b)) = a_listening_pair().await else {
        return;
    };
    let notice = listened();
    let before = b.reconnections();
    cut_the_listeners(&a).await;
    let resync = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let Ok(Notice::Resync) = at_b.recv().await {
                return;
            }
        }
    })
    .await;
    assert!(resync.is_ok(), "B asks for a resync after reconnecting");
    hears(&a, &mut at_b, &notice).await;
    // The database stayed up: a cut connection is no outage, and costs no lease an amnesty (the
    // service grants one per counted reconnection). Cuts repeated often enough would otherwise keep
    // an abandoned item from ever lapsing.
    assert_eq!(b.reconnections(), before, "a cut listener is not an outage");
    assert!(!b.in_outage());
}

/// A cut listener that cannot listen again at once is an outage after all: the reconnection that
/// follows is counted, so that the service grants lease amnesty. Here the database refuses new
/// connections while the ones already open (the pool's) go on.
#[tokio::test]
async fn a_cut_listener_that_cannot_listen_again_is_an_outage() {
    let Some((a, b, mut at_b)) = a_listening_pair().await else {
        return;
    };
    let notice = listened();
    let before = b.reconnections();
    let name = match &query_all(a.executor(), "SELECT current_database()").await[0][0] {
        Value::Text(name) => name.clone(),
        other => panic!("{other:?}"),
    };
    // From another database: a database cannot close its own door.
    let (admin, connection) = tokio_postgres::connect(&admin_url().unwrap(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let allow = |on: bool| format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS {on}");
    admin.batch_execute(&allow(false)).await.unwrap();
    cut_the_listeners(&a).await;
    let lost = tokio::time::timeout(Duration::from_secs(15), async {
        while !b.in_outage() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    admin.batch_execute(&allow(true)).await.unwrap();
    assert!(
        lost.is_ok(),
        "the cut that could not listen again is an outage"
    );
    hears(&a, &mut at_b, &notice).await;
    assert!(
        b.reconnections() > before,
        "the reconnection is counted, so that the service grants lease amnesty"
    );
}

#[tokio::test]
async fn an_absent_server_is_unavailable() {
    if admin_url().is_none() {
        return;
    }
    // Nothing listens on port 1.
    let outcome = postgres::connect("postgresql://postgres@127.0.0.1:1/postgres").await;
    assert!(
        matches!(outcome, Err(StoreError::Unavailable(_))),
        "{:?}",
        outcome.err()
    );
}

#[tokio::test]
async fn an_items_history_is_written_with_its_row_or_not_at_all() {
    let Some(store) = store_on_a_fresh_database().await else {
        return;
    };
    common::an_items_history_is_written_with_its_row_or_not_at_all(&store).await;
}

#[tokio::test]
async fn an_items_long_history_reads_whole_in_pages() {
    let Some(store) = store_on_a_fresh_database().await else {
        return;
    };
    let shapes = common::an_items_long_history_reads_whole_in_pages(&store).await;
    for shape in shapes {
        let rows = query_all(
            store.executor(),
            &format!(
                "SELECT CAST((SELECT COUNT(*) FROM work_transitions WHERE work_id = '{0}') AS BIGINT), \
                 (SELECT history FROM work_items WHERE id = '{0}')",
                shape.work_id
            ),
        )
        .await;
        assert_eq!(
            rows[0][0],
            Value::Int(shape.chunks as i64),
            "{}: chunk rows",
            shape.work_id
        );
        let Value::Text(lines) = &rows[0][1] else {
            panic!("{}: no history column", shape.work_id);
        };
        assert_eq!(
            lines.lines().count(),
            shape.lines,
            "{}: lines in the row",
            shape.work_id
        );
    }
}

#[tokio::test]
async fn an_item_is_read_with_its_session() {
    let Some(store) = store_on_a_fresh_database().await else {
        return;
    };
    common::an_item_is_read_with_its_session(&store).await;
}

#[tokio::test]
async fn a_sessions_insert_can_be_conditional_on_its_agent() {
    let Some(store) = store_on_a_fresh_database().await else {
        return;
    };
    common::a_sessions_insert_can_be_conditional_on_its_agent(&store).await;
}

#[tokio::test]
async fn an_items_write_can_be_conditional_on_its_session() {
    let Some(store) = store_on_a_fresh_database().await else {
        return;
    };
    common::an_items_write_can_be_conditional_on_its_session(&store).await;
}

#[tokio::test]
async fn lease_keeper_marks_are_kept_one_per_server() {
    let Some(store) = store_on_a_fresh_database().await else {
        return;
    };
    common::lease_keeper_marks_are_kept_one_per_server(&store).await;
}

#[tokio::test]
async fn a_session_token_holds_one_item_at_most() {
    let Some(store) = store_on_a_fresh_database().await else {
        return;
    };
    common::a_session_token_holds_one_item_at_most(&store).await;
}

#[tokio::test]
async fn workers_seen_are_the_most_recent_up_to_the_limit() {
    let Some(store) = store_on_a_fresh_database().await else {
        return;
    };
    common::workers_seen_are_the_most_recent_up_to_the_limit(&store).await;
}

/// A database that a newer build has migrated further is refused at connect, with the reason.
#[tokio::test]
async fn a_database_migrated_by_a_newer_build_is_refused() {
    let Some(url) = fresh().await else {
        return;
    };
    let store = postgres::connect(&url).await.unwrap();
    let inserted = store
        .executor()
        .execute(vec![(
            Statement::new(
                "INSERT INTO schema_migrations (version) VALUES (1000)",
                vec![],
            ),
            Expect::OneRow,
        )])
        .await;
    assert!(inserted.is_ok(), "{inserted:?}");
    drop(store);
    let refused = postgres::connect(&url)
        .await
        .err()
        .expect("a newer schema is refused");
    assert!(
        refused.to_string().contains("newer than this build knows"),
        "{refused}"
    );
}

/// A pooled connection cut while the database stays up (a firewall or NAT that forgot it, a proxy,
/// an operator) is no outage: the call that meets the cut is tried again on a fresh connection or
/// answered 503, but no lease gets an amnesty for it. Here every connection B has open goes through
/// [`Cutter`], which cuts them the way a middlebox that dropped their state does: silently, until B
/// next sends on one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_pooled_connections_are_no_outage() {
    let Some((cutter, b)) = a_busy_store_behind_a_cutter(8).await else {
        return;
    };
    let statement = a_read_that_takes_a_while;
    let write = || {
        vec![(
            Statement::new("UPDATE environments SET id = id WHERE id = 'none'", vec![]),
            Expect::Any,
        )]
    };
    b.executor().execute(write()).await.unwrap();
    let (losses, reconnections) = (b.losses(), b.reconnections());

    cutter.cut();
    // What meets a cut connection may fail (a write that may have committed is not tried again),
    // but the database answers the fresh connections at once. Looking into that, the store went
    // through its cut connections, so the reads after it find fresh ones.
    let _ = b.executor().execute(write()).await;
    let reads = (0..8).map(|_| b.executor().query(statement()));
    for read in futures::future::join_all(reads).await {
        read.expect("a read after the cut was seen");
    }
    b.executor().execute(write()).await.unwrap();
    assert!(cutter.cuts_met() > 0, "the pool met its cut connections");
    assert_eq!(b.losses(), losses, "a cut connection is no lost database");
    assert_eq!(b.reconnections(), reconnections, "so no lease amnesty");
    assert!(!b.in_outage());
}

/// The counterpart: cut connections whose database then refuses new ones are an outage, counted
/// by the call that met the cut, so that its 503 already promises lease amnesty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_pooled_connections_with_no_way_back_are_an_outage() {
    let Some((cutter, b)) = a_busy_store_behind_a_cutter(4).await else {
        return;
    };
    let statement = a_read_that_takes_a_while;
    let losses = b.losses();
    cutter.refuse();
    cutter.cut();
    let read = b.executor().query(statement()).await;
    assert!(matches!(read, Err(StoreError::Unavailable(_))), "{read:?}");
    assert!(b.in_outage(), "the outage is counted when the call returns");
    assert_eq!(b.losses(), losses + 1);
}

/// A connection lost after COMMIT went out leaves the write's outcome unknown: the store says so
/// (`OutcomeUnknown`), not `Unavailable`, which tells the caller nothing was written, and here the
/// write was applied. It is not tried again either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_commit_went_unanswered_is_of_unknown_outcome() {
    let Some((cutter, b)) = a_busy_store_behind_a_cutter(1).await else {
        return;
    };
    let lone = |sql: &str| vec![(Statement::new(sql, vec![]), Expect::Any)];
    b.executor()
        .execute(lone("CREATE TABLE answers_lost (n INTEGER)"))
        .await
        .unwrap();
    cutter.cut_at_commit();
    let two_rows = vec![
        (
            Statement::new("INSERT INTO answers_lost VALUES (1)", vec![]),
            Expect::Any,
        ),
        (
            Statement::new("INSERT INTO answers_lost VALUES (2)", vec![]),
            Expect::Any,
        ),
    ];
    let outcome = b.executor().execute(two_rows).await;
    assert!(
        matches!(outcome, Err(StoreError::OutcomeUnknown(_))),
        "{outcome:?}"
    );
    let rows = b
        .executor()
        .query(Statement::new("SELECT count(*) FROM answers_lost", vec![]))
        .await
        .unwrap();
    assert_eq!(rows, vec![vec![Value::Int(2)]], "both rows were committed");
}

/// A store on a fresh database behind a [`Cutter`], with `connections` pooled connections open, each
/// with its statement prepared, as on a busy server (`None` without PostgreSQL).
async fn a_busy_store_behind_a_cutter(
    connections: usize,
) -> Option<(Cutter, SqlStore<PostgresExecutor>)> {
    let url = fresh().await?;
    let cutter = Cutter::start(&url).await;
    let store = postgres::connect(&cutter.url).await.unwrap();
    let busy = (0..connections).map(|_| store.executor().query(a_read_that_takes_a_while()));
    for read in futures::future::join_all(busy).await {
        read.unwrap();
    }
    Some((cutter, store))
}

/// A read that holds its connection long enough for others to open beside it.
fn a_read_that_takes_a_while() -> Statement {
    Statement::new("SELECT pg_sleep(0.05)::TEXT", vec![])
}

/// A TCP proxy in front of the database whose [`Cutter::cut`] drops every connection open at that
/// moment without a word to either side; the client learns of it only when it next sends, and its
/// request is answered by the connection's end. Connections made after the cut are forwarded as usual.
struct Cutter {
    url: String,
    /// New connections are closed at once, as a database that is gone would refuse them.
    refusing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cuts: tokio::sync::watch::Sender<u64>,
    cuts_met: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// While set, a connection that sends COMMIT is cut once the database has answered it, the
    /// answer kept from the client.
    at_commit: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Cutter {
    async fn start(url: &str) -> Cutter {
        // postgresql://user@host:port/database…: the proxy takes the place of host:port.
        let authority_start = url.find('@').expect("a user in the URL") + 1;
        let authority_end = authority_start + url[authority_start..].find('/').expect("a path");
        let upstream = url[authority_start..authority_end].to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxied = format!(
            "{}{}{}",
            &url[..authority_start],
            listener.local_addr().unwrap(),
            &url[authority_end..]
        );
        let (cuts, _) = tokio::sync::watch::channel(0u64);
        let cuts_met = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (cuts_seen, cuts_met_counted) = (cuts.clone(), cuts_met.clone());
        let refusing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refuse = refusing.clone();
        let at_commit = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cut_at_commit = at_commit.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if refuse.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let cut = cuts_seen.subscribe();
                tokio::spawn(forward_until_cut(
                    client,
                    server,
                    cut,
                    cuts_met_counted.clone(),
                    cut_at_commit.clone(),
                ));
            }
        });
        Cutter {
            url: proxied,
            refusing,
            cuts,
            cuts_met,
            at_commit,
        }
    }

    /// From now on, cuts each connection right after the database answered a COMMIT on it.
    fn cut_at_commit(&self) {
        self.at_commit
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn refuse(&self) {
        self.refusing
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }

    fn cuts_met(&self) -> u64 {
        self.cuts_met.load(std::sync::atomic::Ordering::SeqCst)
    }
}

async fn forward_until_cut(
    mut client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    mut cut: tokio::sync::watch::Receiver<u64>,
    cuts_met: std::sync::Arc<std::sync::atomic::AtomicU64>,
    at_commit: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let before = *cut.borrow_and_update();
    let (mut from_client, mut to_client) = client.split();
    let (mut from_server, mut to_server) = server.into_split();
    let to_database = async {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = match from_client.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            if to_server.write_all(&chunk[..n]).await.is_err() {
                return false;
            }
            let commit = chunk[..n].windows(6).any(|w| w == b"COMMIT");
            if commit && at_commit.load(std::sync::atomic::Ordering::SeqCst) {
                return true;
            }
        }
    };
    let forwarding = async {
        tokio::select! {
            committing = to_database => committing,
            _ = tokio::io::copy(&mut from_server, &mut to_client) => false,
        }
    };
    let cut_now = tokio::select! {
        committing = forwarding => match committing {
            true => false,
            false => return,
        },
        _ = cut.wait_for(|n| *n > before) => true,
    };
    if !cut_now {
        // At a COMMIT: the database's answer (it has committed once it answers) is read and kept
        // from the client, whose connection then ends.
        let mut answer = [0u8; 256];
        let _ = from_server.read(&mut answer).await;
        let _ = client.shutdown().await;
        return;
    }
    // The server side goes away unseen (the database sees its connection end); the client is left
    // waiting until it sends, and then sees the connection end under its request.
    drop(from_server);
    drop(to_server);
    let mut byte = [0u8; 1];
    if tokio::io::AsyncReadExt::read(&mut from_client, &mut byte)
        .await
        .is_ok_and(|n| n > 0)
    {
        cuts_met.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    let _ = client.shutdown().await;
}

#[tokio::test]
async fn a_held_item_is_a_claim_candidate_from_its_moment_on() {
    let Some(store) = store_on_a_fresh_database().await else {
        return;
    };
    common::a_held_item_is_a_claim_candidate_from_its_moment_on(&store).await;
}

/// The reads on the queue's busy paths can each be served by the index meant for them, on a
/// database migrated from scratch; the planner is told to avoid a sequential scan, which on a
/// near-empty table it would otherwise pick for anything (a setting of the database, so that the
/// store's own connections, binding the reads' parameters as they always do, take it). The SQLite
/// store's unit test checks the same list there, where a partial index's predicate must be
/// repeated word for word.
#[tokio::test]
async fn hot_reads_use_their_indexes() {
    let Some(url) = fresh().await else {
        return;
    };
    let migrated = postgres::connect(&url).await.unwrap();
    let name = match &query_all(migrated.executor(), "SELECT current_database()").await[0][0] {
        Value::Text(name) => name.clone(),
        other => panic!("{other:?}"),
    };
    let no_scans = format!("ALTER DATABASE \"{name}\" SET enable_seqscan = off");
    query_all(migrated.executor(), &no_scans).await;
    drop(migrated);
    let store = postgres::connect(&url).await.unwrap();
    for (read, index) in tether_store::sql::busy_reads_and_their_indexes() {
        let explain = Statement::new(
            format!("EXPLAIN (COSTS OFF) {}", read.sql),
            read.params.clone(),
        );
        let rows = store.executor().query(explain).await.unwrap();
        let plan: Vec<String> = rows
            .iter()
            .map(|row| match &row[0] {
                Value::Text(step) => step.clone(),
                other => panic!("a plan step is text, not {other:?}"),
            })
            .collect();
        let plan = plan.join("\n");
        assert!(
            plan.split_whitespace().any(|word| word == index),
            "{} is not served by {index}:\n{plan}",
            read.sql
        );
        // A page of the work list is read in the index's order, as on SQLite, not sorted after.
        // (Other reads PostgreSQL may plan as a bitmap scan and a sort of the few rows it finds,
        // which it does on these empty tables.)
        let sorts = plan.lines().any(|step| {
            step.trim_start()
                .trim_start_matches("-> ")
                .starts_with("Sort")
        });
        let page_by_id = index == "work_by_environment";
        assert!(
            !(page_by_id && sorts),
            "{} is sorted after its read:\n{plan}",
            read.sql
        );
    }
}

#[tokio::test]
async fn a_deleted_sessions_events_go_a_batch_at_a_time() {
    let Some(store) = store_on_a_fresh_database().await else {
        return;
    };
    common::a_deleted_sessions_events_go_a_batch_at_a_time(&store).await;
}
