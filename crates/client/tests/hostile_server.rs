//! The client against a server that does not behave: what it reads stays bounded.

use std::time::Duration;

use tether_client::{Client, Error, MAX_RESPONSE_BYTES};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A server that answers the first request on its first connection with `head`, then `body_bytes`
/// bytes of `x` (chunked when `chunked`); then it holds the connection open without a word.
async fn server(head: String, body_bytes: usize, chunked: bool) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut request = [0u8; 4096];
        let _ = stream.read(&mut request).await;
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let piece = vec![b'x'; 1 << 20];
        let mut left = body_bytes;
        while left > 0 {
            let n = left.min(piece.len());
            let written = if chunked {
                let mut chunk = format!("{n:x}\r\n").into_bytes();
                chunk.extend_from_slice(&piece[..n]);
                chunk.extend_from_slice(b"\r\n");
                stream.write_all(&chunk).await
            } else {
                stream.write_all(&piece[..n]).await
            };
            if written.is_err() {
                return;
            }
            left -= n;
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
    });
    base
}

#[tokio::test]
async fn a_body_past_the_bound_is_refused_whether_declared_or_streamed() {
    // Declared: refused before anything is read.
    let declared = 1usize << 30;
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {declared}\r\n\r\n"
    );
    let base = server(head, 0, false).await;
    let client = Client::new(base, "tth_adm_test").unwrap();
    let refused = client.get_environment("env_1").await.unwrap_err();
    assert!(matches!(refused, Error::TooLarge { .. }), "{refused}");

    // Streamed without a length: read up to the bound, then refused.
    let head =
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
    let base = server(head.to_owned(), MAX_RESPONSE_BYTES + (1 << 20), true).await;
    let client = Client::new(base, "tth_adm_test").unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(60), client.get_environment("env_1"))
        .await
        .expect("refused in time")
        .unwrap_err();
    assert!(matches!(refused, Error::TooLarge { .. }), "{refused}");
}

#[tokio::test]
async fn an_error_is_read_from_the_start_of_a_body_that_does_not_end() {
    let head = "HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/html\r\ntransfer-encoding: chunked\r\n\r\n";
    let base = server(head.to_owned(), 1 << 20, true).await;
    let client = Client::new(base, "tth_adm_test").unwrap();
    let error = tokio::time::timeout(Duration::from_secs(60), client.get_environment("env_1"))
        .await
        .expect("answered in time")
        .unwrap_err();
    match error {
        Error::Api(api) => {
            assert_eq!(api.status, 500);
            assert!(api.message.contains("xxx"), "{}", api.message);
        }
        other => panic!("{other}"),
    }
}

/// A server each of whose connections answers its first request and then reads on without a word:
/// a pooled connection dropped on the way, as a NAT or a failover drops it. Counts the connections.
async fn answers_once_per_connection() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&accepted);
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request).await;
                let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 4\r\n\r\nnull";
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                while matches!(stream.read(&mut request).await, Ok(n) if n > 0) {}
            });
        }
    });
    (base, accepted)
}

#[tokio::test]
async fn a_client_on_fresh_connections_never_lands_on_a_pooled_one_that_went_silent() {
    use std::sync::atomic::Ordering;
    let (base, accepted) = answers_once_per_connection().await;
    let client = Client::builder(base)
        .token("tth_adm_test")
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    client.health().await.unwrap();
    // The pooled connection went silent: a request on it gets no answer.
    let stuck = client.health().await.unwrap_err();
    assert!(matches!(stuck, Error::Timeout { .. }), "{stuck}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    // Each request of the client on fresh connections opens its own, and is answered.
    let fresh = client.on_fresh_connections();
    for opened in 2..5 {
        fresh.health().await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), opened);
    }
}
