//! The listener's connection limits, against a real client on a real socket.

use std::time::Duration;

use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tether_server::listener::{run, ConnectionLimits};
use tokio_util::sync::CancellationToken;

/// HTTP/2 with prior knowledge on the plain port: between requests the client may send PING,
/// SETTINGS or WINDOW_UPDATE frames, which start no request, so they must not start the header
/// clock. The connection is held to the idle timeout, as over TLS and on HTTP/1.
#[tokio::test]
async fn an_idle_http2_connection_on_the_plain_port_is_held_to_the_idle_timeout_only() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let router = Router::new().route("/", get(|| async { "ok" }));
    let limits = ConnectionLimits {
        max_connections: 8,
        header_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_secs(60),
    };
    let stop = CancellationToken::new();
    let server = tokio::spawn(run(
        listener,
        router,
        None,
        limits,
        stop.clone(),
        Duration::from_secs(1),
    ));
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(50))
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    for round in 0..3 {
        let request = hyper::Request::get(format!("http://{address}/"))
            .body(String::new())
            .unwrap();
        let response = sender
            .send_request(request)
            .await
            .unwrap_or_else(|e| panic!("request {round} on the same connection: {e}"));
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), hyper::Version::HTTP_2);
        // Idle, pinging, for several header timeouts.
        tokio::time::sleep(Duration::from_millis(1_000)).await;
    }
    assert!(!conn.is_finished(), "the connection is still open");
    stop.cancel();
    server.await.unwrap();
}
