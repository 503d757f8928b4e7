//! `/metrics` takes no credential, and its queue gauges cost the database a count over each
//! environment's live items: scrapes that come together, or within a second of each other, share one
//! reading, so that a client flooding it cannot load the database that every worker needs.

mod counting;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use counting::counting_app;
use tether_core::SystemClock;
use tether_server::telemetry::{queue_gauges, QUEUE_GAUGES_TTL};
use tether_testkit::backends;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_of_one_second_share_one_reading_of_the_queue() {
    const SCRAPES: usize = 32;
    for backend in backends() {
        let (_location, app, counting, env) =
            counting_app(&backend, Arc::new(SystemClock), "scraped").await;
        let scrapes: Vec<_> = (0..SCRAPES)
            .map(|_| {
                let app = app.clone();
                tokio::spawn(async move { queue_gauges(&app).await })
            })
            .collect();
        let mut readings = Vec::new();
        for scrape in scrapes {
            readings.push(scrape.await.expect("scrape"));
        }
        assert!(readings.iter().all(|r| r == &readings[0]));
        assert!(readings[0].contains(&format!(
            "tether_queue_depth{{environment_id=\"{}\"}} 0",
            env.id
        )));
        assert_eq!(
            counting.queue_counts.load(Ordering::SeqCst),
            1,
            "{SCRAPES} scrapes at once read the one environment's counts once"
        );
        // A scrape after the reading has aged reads again.
        tokio::time::sleep(QUEUE_GAUGES_TTL).await;
        queue_gauges(&app).await;
        assert_eq!(counting.queue_counts.load(Ordering::SeqCst), 2);

        // While a reading waits for a slow store, a scrape takes the reading before it instead of
        // queueing behind it.
        tokio::time::sleep(QUEUE_GAUGES_TTL).await;
        counting.queue_counts_stalled.store(true, Ordering::SeqCst);
        let slow = tokio::spawn({
            let app = app.clone();
            async move { queue_gauges(&app).await }
        });
        while counting.queue_counts.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let meanwhile =
            tokio::time::timeout(std::time::Duration::from_secs(10), queue_gauges(&app))
                .await
                .expect("a scrape does not wait for a reading under way");
        assert_eq!(meanwhile, readings[0]);
        counting.queue_counts_stalled.store(false, Ordering::SeqCst);
        slow.await.expect("the slow reading ends");
    }
}

/// Cloud environments have no queue, so they take no place among the environments that get queue
/// gauges: with a few cloud environments first (the oldest), all 200 self-hosted ones still get
/// theirs, and the gauges are not truncated.
#[tokio::test]
async fn cloud_environments_take_no_place_among_the_gauged() {
    use reqwest::Method;
    use serde_json::json;
    use tether_server::telemetry::GAUGE_ENVIRONMENTS;
    use tether_testkit::TestServer;
    let server = TestServer::start(&tether_testkit::Backend::Sqlite).await;
    let kinds = std::iter::repeat_n("cloud", 5).chain(std::iter::repeat_n(
        "self_hosted",
        GAUGE_ENVIRONMENTS as usize,
    ));
    for (i, kind) in kinds.enumerate() {
        let (status, body) = server
            .call(
                Method::POST,
                "/environments",
                Some(json!({"name": format!("{kind}-{i}"), "config": {"type": kind}})),
            )
            .await;
        assert!(status.is_success(), "{body}");
    }
    let text = queue_gauges(&server.app).await;
    let gauged = text
        .lines()
        .filter(|l| l.starts_with("tether_queue_depth{"))
        .count();
    assert_eq!(
        gauged, GAUGE_ENVIRONMENTS as usize,
        "every self-hosted environment"
    );
    assert!(
        text.contains("tether_queue_gauges_truncated 0"),
        "not truncated:\n{}",
        text.lines()
            .filter(|l| l.contains("truncated"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
