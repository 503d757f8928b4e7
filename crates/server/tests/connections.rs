//! The listener's connection limits, against a real client on a real socket.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tether_server::listener::{run, ConnectionLimits};
use tether_testkit::net::{h2_client, h2_client_that_may_stop_reading};
use tokio_util::sync::CancellationToken;

/// HTTP/2 with prior knowledge on the plain port: between requests the client may send PING,
/// SETTINGS or WINDOW_UPDATE frames, which start no request, so they must not start the header
/// clock. The connection is held to the idle timeout, as over TLS and on HTTP/1.
#[tokio::test]
async fn an_idle_http2_connection_on_the_plain_port_is_held_to_the_idle_timeout_only() {
    let router = Router::new().route("/", get(|| async { "ok" }));
    let (address, stop, server) =
        serve(router, Duration::from_millis(300), Duration::from_secs(60)).await;
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

/// On the plain port the server looks at a connection's first bytes to choose between HTTP/1 and
/// HTTP/2. A connection that says nothing is held to the header timeout while it looks; methods
/// that begin as the HTTP/2 preface does (`P…`), sent whole or a byte at a time, are served.
#[tokio::test]
async fn the_first_bytes_on_the_plain_port_are_awaited_within_the_header_timeout() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let router = Router::new().route("/", get(|| async { "ok" }).put(|| async { "put" }));
    let (address, stop, server) = serve(
        router,
        Duration::from_millis(1_000),
        Duration::from_secs(60),
    )
    .await;

    // Looked at from 200 to 500 ms, then from 1,000 ms on.
    let mut silent = tokio::net::TcpStream::connect(address).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !closed_by_server(&mut silent).await,
        "closed before its time"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        closed_by_server(&mut silent).await,
        "a silent connection outlived the header timeout"
    );

    for whole in [true, false] {
        let request =
            b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        if whole {
            stream.write_all(request).await.unwrap();
        } else {
            for byte in request {
                stream.write_all(&[*byte]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("put"),
            "sent whole: {whole}: {answer}"
        );
    }
    stop.cancel();
    server.await.unwrap();
}

/// A server on a fresh port with these timeouts, serving `router`: its address, its stop, and its
/// task.
async fn serve(
    router: impl Into<tether_server::http::Api>,
    header_timeout: Duration,
    idle_timeout: Duration,
) -> (
    std::net::SocketAddr,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let limits = ConnectionLimits {
        max_connections: 8,
        header_timeout,
        idle_timeout,
    };
    let stop = CancellationToken::new();
    let server = tokio::spawn(run(
        listener,
        router.into(),
        None,
        limits,
        stop.clone(),
        Duration::from_secs(1),
    ));
    (address, stop, server)
}

/// Sets its flag when dropped: whether a response body was let go.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// On HTTP/2 an answer the client stops taking shows as no stalled write: the client keeps the
/// stream's window shut, and the socket and the other streams go on. Such an answer must still be
/// given up after the idle timeout, with what it holds; one that is taken slowly is not.
#[tokio::test]
async fn an_http2_answer_the_client_stops_taking_is_given_up_after_the_idle_timeout() {
    use http_body_util::BodyExt as _;
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = dropped.clone();
    let router = Router::new()
        .route(
            "/endless",
            get(move || {
                let guard = DropFlag(flag.clone());
                let chunks = futures::stream::unfold(guard, |guard| async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Some((Ok::<_, std::io::Error>(vec![b'x'; 4096]), guard))
                });
                async move { axum::body::Body::from_stream(chunks) }
            }),
        )
        .route("/large", get(|| async { vec![b'y'; 256 * 1024] }));
    let (address, stop, _server) =
        serve(router, Duration::from_secs(10), Duration::from_secs(1)).await;

    // A client that asks for an endless answer and a large one, and reads neither.
    let (mut sender, conn) = h2_client(address, 16 * 1024).await;
    let mut unread = Vec::new();
    for path in ["/endless", "/large"] {
        let request = hyper::Request::get(format!("http://{address}{path}"))
            .body(String::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.version(), hyper::Version::HTTP_2);
        unread.push(response);
    }
    tokio::time::timeout(Duration::from_secs(20), conn)
        .await
        .expect("the connection of an answer nobody takes is closed")
        .unwrap();
    assert!(
        dropped.load(Ordering::Acquire),
        "the endless answer was let go"
    );

    // A client that takes a large answer slowly, a piece at a time, well within the idle timeout.
    let (mut sender, _conn) = h2_client(address, 16 * 1024).await;
    let request = hyper::Request::get(format!("http://{address}/large"))
        .body(String::new())
        .unwrap();
    let mut body = sender.send_request(request).await.unwrap().into_body();
    let mut taken = 0;
    while let Some(frame) = body.frame().await {
        taken += frame
            .expect("a slow reader is not cut")
            .into_data()
            .unwrap()
            .len();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(taken, 256 * 1024);
    drop(unread);
    stop.cancel();
}

/// Answer data alive in the server, counted from its making to the moment it is let go of.
#[derive(Clone, Default)]
struct Alive {
    now: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
}

/// A chunk of answer that [`Alive`] counts while anything holds it.
struct Counted(Vec<u8>, Alive);

impl AsRef<[u8]> for Counted {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.1.now.fetch_sub(self.0.len(), Ordering::AcqRel);
    }
}

impl Alive {
    fn chunk(&self, len: usize) -> bytes::Bytes {
        let now = self.now.fetch_add(len, Ordering::AcqRel) + len;
        self.most.fetch_max(now, Ordering::AcqRel);
        bytes::Bytes::from_owner(Counted(vec![b'z'; len], self.clone()))
    }
}

/// A client that opens a hundred HTTP/2 streams of large answers and stops reading the socket (or
/// keeps the windows shut, which is the same to the server) must not make the server hold a hundred
/// streams' send buffers: the connection's answers together hold at most `H2_MAX_UNSENT` and a piece
/// per runtime thread. Before that bound, the same client made it hold about 9 MiB. A client that
/// reads gets every byte of every stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_that_stops_reading_holds_no_more_than_its_bound() {
    use futures::StreamExt as _;
    use http_body_util::BodyExt as _;
    use tether_server::listener::H2_MAX_UNSENT;
    const ANSWER: usize = 1024 * 1024;
    const CHUNK: usize = 16 * 1024;
    let alive = Alive::default();
    let answers = alive.clone();
    let router = Router::new().route(
        "/large",
        get(move || {
            let alive = answers.clone();
            let chunks = futures::stream::iter(0..ANSWER / CHUNK)
                .map(move |_| Ok::<_, std::io::Error>(alive.chunk(CHUNK)));
            async move { axum::body::Body::from_stream(chunks) }
        }),
    );
    let (address, stop, _server) =
        serve(router, Duration::from_secs(10), Duration::from_secs(60)).await;
    let get_large = || {
        hyper::Request::get(format!("http://{address}/large"))
            .body(String::new())
            .unwrap()
    };

    let (mut sender, reading, _conn) = h2_client_that_may_stop_reading(address).await;
    // The first answer's head comes back; from then on the client reads nothing.
    let first = sender.send_request(get_large()).await.unwrap();
    reading.stop_reading();
    let rest: Vec<_> = (1..100).map(|_| sender.send_request(get_large())).collect();
    let rest = tokio::spawn(futures::future::join_all(rest));
    // Until the server has stopped making answer data for a while.
    let mut last = usize::MAX;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = alive.now.load(Ordering::Acquire);
        if now == last {
            break;
        }
        last = now;
    }
    let most = alive.most.load(Ordering::Acquire);
    assert!(
        most <= H2_MAX_UNSENT + 2 * CHUNK,
        "the server held {most} bytes of answers for a client that reads nothing"
    );
    assert!(
        most >= H2_MAX_UNSENT,
        "the answers were sent up to the bound: {most}"
    );
    drop((first, rest));

    // A client that reads: twenty streams at once, every byte of each.
    let (mut sender, _conn) = h2_client(address, 64 * 1024).await;
    let reads = (0..20).map(|_| {
        let answer = sender.send_request(get_large());
        async move {
            let body = answer.await.unwrap().into_body();
            body.collect().await.unwrap().to_bytes().len()
        }
    });
    let lengths = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(reads))
        .await
        .expect("every answer is read");
    assert_eq!(lengths, vec![ANSWER; 20]);
    stop.cancel();
}

/// Whether the server has closed `stream`: its read ends (or fails) within a moment.
async fn closed_by_server(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt as _;
    let mut byte = [0u8; 1];
    match tokio::time::timeout(Duration::from_millis(300), stream.read(&mut byte)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

/// `request` on a fresh HTTP/1.1 connection: the answer's status line, or `None` if the server closed
/// the connection without one.
async fn status_line(address: std::net::SocketAddr, request: &[u8]) -> Option<String> {
    status_line_in_pieces(address, &[request]).await
}

/// [`status_line`] for a request sent in `pieces`, a moment apart.
async fn status_line_in_pieces(address: std::net::SocketAddr, pieces: &[&[u8]]) -> Option<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    for (i, piece) in pieces.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Written as far as the server takes it: one that answers early may close before the end.
        let _ = stream.write_all(piece).await;
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    answer.lines().next().map(str::to_owned)
}

/// A plain HTTP/1.1 GET of `path` on a fresh connection (see [`status_line`]).
async fn get_status(address: std::net::SocketAddr, path: &str) -> Option<String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    status_line(address, request.as_bytes()).await
}

/// At the cap (8 here), connections that say nothing do not keep others out: a new connection takes
/// the place of the one that has waited longest without a request in flight, and the others stay.
/// Connections with a request in flight are never displaced: when all have one, a new connection is
/// closed at once.
#[tokio::test]
async fn at_the_cap_a_new_connection_displaces_the_longest_waiting_idle_one_never_a_busy_one() {
    use tokio::io::AsyncWriteExt as _;
    let release = Arc::new(tokio::sync::Notify::new());
    let held = release.clone();
    let router = Router::new().route("/", get(|| async { "ok" })).route(
        "/busy",
        get(move || {
            let held = held.clone();
            async move {
                held.notified().await;
                "done"
            }
        }),
    );
    let (address, stop, server) =
        serve(router, Duration::from_secs(30), Duration::from_secs(30)).await;

    // Eight connections that say nothing, one after the other; the last has sent half a request.
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(tokio::net::TcpStream::connect(address).await.unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    silent[7].write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    // A real client still gets in, in place of the oldest. Once the cap is full again, the next one
    // gets in in place of the next oldest.
    let status = get_status(address, "/").await;
    assert_eq!(status.as_deref(), Some("HTTP/1.1 200 OK"));
    silent.push(tokio::net::TcpStream::connect(address).await.unwrap());
    tokio::time::sleep(Duration::from_millis(20)).await;
    let status = get_status(address, "/").await;
    assert_eq!(status.as_deref(), Some("HTTP/1.1 200 OK"));
    for (i, stream) in silent.iter_mut().enumerate() {
        let closed = closed_by_server(stream).await;
        assert_eq!(closed, i < 2, "silent connection {i}: closed {closed}");
    }
    drop(silent);

    // Eight connections each with a request in flight: none is displaced, the newcomer is refused.
    let mut busy = Vec::new();
    for _ in 0..8 {
        busy.push(tokio::spawn(get_status(address, "/busy")));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get_status(address, "/").await, None, "refused at the cap");
    release.notify_waiters();
    for answer in busy {
        assert_eq!(answer.await.unwrap().as_deref(), Some("HTTP/1.1 200 OK"));
    }
    // And once they are done, there is room again.
    assert_eq!(
        get_status(address, "/").await.as_deref(),
        Some("HTTP/1.1 200 OK")
    );
    stop.cancel();
    server.await.unwrap();
}

/// At the cap, HTTP/2 connections whose answers have waited `STALLED_AFTER` for clients that
/// never take them (each stream's window left shut, nothing read) give their places to new
/// clients, the one stalled longest first: their requests are done, and a client with no
/// credential at all could otherwise hold every place until the idle timeout, and take it again at
/// once. Before that an answer may be being read, and its connection keeps its place.
#[tokio::test]
async fn at_the_cap_answers_nobody_takes_give_their_places_to_new_clients() {
    let router = ok_and_large(1024 * 1024);
    let (address, stop, server) =
        serve(router, Duration::from_secs(30), Duration::from_secs(30)).await;
    let mut held = Vec::new();
    for _ in 0..8 {
        // A 64 KiB window that the client never opens again: it never reads the body.
        let (mut sender, conn) = h2_client(address, 64 * 1024).await;
        let request = hyper::Request::get(format!("http://{address}/large"))
            .body(String::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        held.push((sender, response, conn));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stalled = std::time::Instant::now();
    refused_then_let_in_once_stalled(address, stalled, Duration::from_millis(200)).await;
    let closed: Vec<bool> = held.iter().map(|(_, _, conn)| conn.is_finished()).collect();
    assert_eq!(
        closed,
        [true, false, false, false, false, false, false, false]
    );
    stop.cancel();
    server.await.unwrap();
}

/// At the cap (the connections' answers untaken since `stalled`): a new client is refused while the
/// answers may still be being read, and let in once they have waited [`STALLED_AFTER`] (and
/// `margin`); then a moment for the connection that gave its place to close.
async fn refused_then_let_in_once_stalled(
    address: std::net::SocketAddr,
    stalled: std::time::Instant,
    margin: Duration,
) {
    use tether_server::listener::STALLED_AFTER;
    assert_eq!(
        get_status(address, "/").await,
        None,
        "refused while the answers may still be being read"
    );
    tokio::time::sleep((STALLED_AFTER + margin).saturating_sub(stalled.elapsed())).await;
    assert_eq!(
        get_status(address, "/").await.as_deref(),
        Some("HTTP/1.1 200 OK"),
        "a new client gets in beside answers nobody takes"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// At the cap, a client that keeps every stream's window shut and resets each stream a second after
/// asking, having asked again first, has a request in flight at every moment, none of whose answers
/// waits long; together its answers have waited since its first (answers with nothing to take,
/// a HEAD's, taken between them change nothing), and its connections give their places to new
/// clients all the same.
#[tokio::test]
async fn at_the_cap_answers_reset_before_they_stall_do_not_keep_their_places() {
    let router = Router::new().route("/", get(|| async { "ok" }));
    let (address, stop, server) =
        serve(router, Duration::from_secs(30), Duration::from_secs(30)).await;
    let started = std::time::Instant::now();
    let mut askers = Vec::new();
    let mut connections = Vec::new();
    for _ in 0..8 {
        // A window of nothing: the server may send heads, never a byte of a body.
        let (mut sender, conn) = h2_client(address, 0).await;
        connections.push(conn);
        askers.push(tokio::spawn(async move {
            let mut unread = None;
            loop {
                let request = hyper::Request::get(format!("http://{address}/"))
                    .body(String::new())
                    .unwrap();
                let Ok(response) = sender.send_request(request).await else {
                    return;
                };
                // The answer before is reset (dropped unread) once this one's head is in: a
                // request is in flight at every moment.
                drop(unread.replace(response));
                // And one with nothing to take (a HEAD's), which takes nothing of the others.
                let head = hyper::Request::head(format!("http://{address}/"))
                    .body(String::new())
                    .unwrap();
                if sender.send_request(head).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    refused_then_let_in_once_stalled(address, started, Duration::from_millis(500)).await;
    let closed: Vec<bool> = connections.iter().map(|conn| conn.is_finished()).collect();
    assert_eq!(
        closed,
        [true, false, false, false, false, false, false, false],
        "the place of the one that has taken nothing longest given, the others kept"
    );
    for asker in askers {
        asker.abort();
    }
    stop.cancel();
    server.await.unwrap();
}

/// At the cap, a connection whose client takes its answer, slowly but steadily, keeps its place;
/// those whose clients take nothing give theirs, each in turn.
#[tokio::test]
async fn at_the_cap_a_client_reading_slowly_keeps_its_place() {
    use http_body_util::BodyExt as _;
    use tether_server::listener::STALLED_AFTER;
    let router = ok_and_large(8 * 1024 * 1024);
    let (address, stop, server) =
        serve(router, Duration::from_secs(30), Duration::from_secs(30)).await;
    let started = std::time::Instant::now();
    // The reader: a frame of 16 KiB every 50 ms, well under what the answer could go at.
    let (mut sender, reader_conn) = h2_client(address, 64 * 1024).await;
    let request = hyper::Request::get(format!("http://{address}/large"))
        .body(String::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let reading = tokio::spawn(async move {
        let mut body = response.into_body();
        let mut read = 0;
        while let Some(frame) = body.frame().await {
            read += frame.unwrap().into_data().map_or(0, |d| d.len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        read
    });
    // Seven that take nothing.
    let mut idle = Vec::new();
    for _ in 0..7 {
        let (mut sender, conn) = h2_client(address, 0).await;
        let request = hyper::Request::get(format!("http://{address}/"))
            .body(String::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        idle.push((sender, response, conn));
    }
    tokio::time::sleep(
        (STALLED_AFTER + Duration::from_millis(500)).saturating_sub(started.elapsed()),
    )
    .await;
    // The reader's answer began first: were its connection judged by that, it would go first.
    assert_eq!(
        get_status(address, "/").await.as_deref(),
        Some("HTTP/1.1 200 OK"),
        "a new client gets in"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let closed = idle
        .iter()
        .filter(|(_, _, conn)| conn.is_finished())
        .count();
    assert_eq!(closed, 1, "one of those taking nothing gave its place");
    assert!(!reader_conn.is_finished(), "the reader kept its place");
    assert!(!reading.is_finished(), "still reading");
    reading.abort();
    stop.cancel();
    server.await.unwrap();
}

/// HTTP/2 written frame by frame, for a client hyper's would not be: every stream's window shut,
/// opened a byte at a time where it likes. What the server sends is read and thrown away.
struct RawH2 {
    writer: tokio::net::tcp::OwnedWriteHalf,
    reader: tokio::task::JoinHandle<()>,
}

impl RawH2 {
    /// The preface and SETTINGS with `SETTINGS_INITIAL_WINDOW_SIZE` = 0.
    async fn connect(address: std::net::SocketAddr) -> RawH2 {
        use tokio::io::AsyncReadExt as _;
        let (mut read, writer) = tokio::net::TcpStream::connect(address)
            .await
            .unwrap()
            .into_split();
        let reader = tokio::spawn(async move {
            let mut buffer = vec![0u8; 64 * 1024];
            while matches!(read.read(&mut buffer).await, Ok(n) if n > 0) {}
        });
        let mut h2 = RawH2 { writer, reader };
        h2.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        h2.frame(0x4, 0, 0, &[0, 4, 0, 0, 0, 0]).await;
        h2
    }

    async fn write(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt as _;
        let _ = self.writer.write_all(bytes).await;
    }

    async fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        frame.extend_from_slice(&[kind, flags]);
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        self.write(&frame).await;
    }

    /// A GET of `path` on `stream` (odd, rising), its headers as HPACK literals without indexing.
    async fn get(&mut self, stream: u32, path: &str) {
        let mut block = Vec::new();
        for (name, value) in [
            (":method", "GET"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "x"),
        ] {
            block.push(0);
            block.push(name.len() as u8);
            block.extend_from_slice(name.as_bytes());
            block.push(value.len() as u8);
            block.extend_from_slice(value.as_bytes());
        }
        // HEADERS with END_STREAM and END_HEADERS.
        self.frame(0x1, 0x5, stream, &block).await;
    }

    /// RST_STREAM (CANCEL).
    async fn reset(&mut self, stream: u32) {
        self.frame(0x3, 0, stream, &8u32.to_be_bytes()).await;
    }

    /// WINDOW_UPDATE of `bytes` on `stream`.
    async fn open_window(&mut self, stream: u32, bytes: u32) {
        self.frame(0x8, 0, stream, &bytes.to_be_bytes()).await;
    }

    fn closed(&self) -> bool {
        self.reader.is_finished()
    }
}

/// At the cap, a connection whose client lets a byte of one answer through now and then, never a
/// whole frame, while it resets and asks again for the others, has taken nothing worth its place.
#[tokio::test]
async fn at_the_cap_a_byte_let_through_now_and_then_keeps_no_place() {
    let router = ok_and_large(1024 * 1024);
    let (address, stop, server) =
        serve(router, Duration::from_secs(30), Duration::from_secs(30)).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut clients = Vec::new();
    for _ in 0..8 {
        let tx = tx.clone();
        clients.push(tokio::spawn(async move {
            let mut h2 = RawH2::connect(address).await;
            h2.get(1, "/large").await;
            let mut stream = 3;
            h2.get(stream, "/").await;
            let _ = tx.send(());
            while !h2.closed() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                // Ask again, then reset the answer before; and a byte of the large answer.
                h2.get(stream + 2, "/").await;
                h2.reset(stream).await;
                stream += 2;
                h2.open_window(1, 1).await;
            }
        }));
    }
    for _ in 0..8 {
        rx.recv().await.unwrap();
    }
    let started = std::time::Instant::now();
    assert_eq!(get_status(address, "/").await, None, "refused at first");
    // Once the large answer stops being asked for more (what hyper holds of it is full), within a
    // few seconds, and the stall mark after that.
    let mut let_in = None;
    while let_in.is_none() && started.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if get_status(address, "/").await.is_some() {
            let_in = Some(started.elapsed());
        }
    }
    assert!(let_in.is_some(), "a new client was refused for 20 s");
    for client in clients {
        client.abort();
    }
    stop.cancel();
    server.await.unwrap();
}

/// At the cap, a connection whose client takes one answer whole, frame by frame, keeps its place
/// though another of its answers waits unread meanwhile: what it takes is not judged by what it
/// leaves.
#[tokio::test]
async fn at_the_cap_a_client_taking_whole_frames_keeps_its_place_beside_an_unread_answer() {
    use tether_server::listener::STALLED_AFTER;
    let router = ok_and_large(8 * 1024 * 1024);
    let (address, stop, server) =
        serve(router, Duration::from_secs(30), Duration::from_secs(30)).await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(tokio::spawn(async move {
            let mut h2 = RawH2::connect(address).await;
            h2.get(1, "/large").await;
            h2.get(3, "/").await;
            while !h2.closed() {
                // One frame of the large answer at a time; the other answer never.
                h2.open_window(1, 16 * 1024).await;
                h2.open_window(0, 16 * 1024).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
    }
    tokio::time::sleep(STALLED_AFTER + Duration::from_secs(1)).await;
    assert_eq!(
        get_status(address, "/").await,
        None,
        "refused: every connection is taking its answer"
    );
    for client in clients {
        client.abort();
    }
    stop.cancel();
    server.await.unwrap();
}

/// At the cap, long polls give their places to new clients: one environment's key could otherwise
/// hold every place with polls sent back to back, and keep out every other client, admins included.
/// The worker whose poll is cut polls again.
#[tokio::test]
async fn at_the_cap_long_polls_give_their_places_to_new_clients() {
    let backend = tether_testkit::backends().remove(0);
    let tether = tether_testkit::TestServer::start(&backend).await;
    let env = tether.self_hosted_environment().await;
    let router = tether_server::http::router(tether.app.clone(), 1 << 20);
    let (address, stop, server) =
        serve(router, Duration::from_secs(30), Duration::from_secs(30)).await;
    let polls = Arc::new(AtomicUsize::new(0));
    let cut = Arc::new(AtomicUsize::new(0));
    let mut pollers = Vec::new();
    for w in 0..8 {
        let client = reqwest::Client::builder()
            .http1_only()
            .pool_max_idle_per_host(1)
            .build()
            .unwrap();
        let url =
            format!("http://{address}/api/v1/cloud/environments/{env}/work/poll?block_ms=999");
        let (token, polls, cut) = (tether.admin_token.clone(), polls.clone(), cut.clone());
        pollers.push(tokio::spawn(async move {
            loop {
                let answer = client
                    .get(&url)
                    .bearer_auth(&token)
                    .header("Worker-ID", format!("w{w}"))
                    .send()
                    .await;
                match answer {
                    Ok(answer) if answer.status() == 200 => polls.fetch_add(1, Ordering::Relaxed),
                    _ => cut.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        get_status(address, "/healthz").await.as_deref(),
        Some("HTTP/1.1 200 OK"),
        "a new client gets in beside eight long polls"
    );
    let before = polls.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert!(cut.load(Ordering::Relaxed) >= 1, "a poll gave its place");
    assert!(
        polls.load(Ordering::Relaxed) >= before + 8,
        "the workers poll on, the one cut included"
    );
    for poller in pollers {
        poller.abort();
    }
    stop.cancel();
    server.await.unwrap();
    tether.shutdown().await;
}

/// A router answering `/` with "ok" and `/large` with `bytes` bytes.
fn ok_and_large(bytes: usize) -> Router {
    Router::new()
        .route("/", get(|| async { "ok" }))
        .route("/large", get(move || async move { vec![b'x'; bytes] }))
}

/// A GET with `header_bytes` of extra headers on HTTP/1.1 (see [`status_line`]).
async fn status_with_headers(address: std::net::SocketAddr, header_bytes: usize) -> String {
    status_with_headers_sniffed(address, header_bytes, false).await
}

/// [`status_with_headers`]; `sniffed`: a `POST` whose `P` arrives alone, which could still begin
/// HTTP/2's preface, so that the connection is served by hyper's connection that may speak either
/// (whose HTTP/1 bounds are set apart) rather than by its HTTP/1 connection alone.
async fn status_with_headers_sniffed(
    address: std::net::SocketAddr,
    header_bytes: usize,
    sniffed: bool,
) -> String {
    let method = if sniffed { "POST" } else { "GET" };
    let mut request =
        format!("{method} / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n")
            .into_bytes();
    for i in 0..header_bytes / 1024 {
        request.extend_from_slice(format!("X-Filler-{i:04}: ").as_bytes());
        request.extend_from_slice(&[b'a'; 1024 - 17]);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"\r\n");
    let pieces: &[&[u8]] = match sniffed {
        true => &[&request[..1], &request[1..]],
        false => &[&request],
    };
    status_line_in_pieces(address, pieces)
        .await
        .unwrap_or_default()
}

/// A connection buffers at most twice `H1_MAX_BUFFER` on HTTP/1: headers within it are served,
/// headers over twice it are refused with 431 (hyper's default let a client that never ends its
/// headers make the server hold about 400 KB per connection). Between the two, it depends on how the
/// bytes arrive.
#[tokio::test]
async fn http1_headers_are_bounded_by_the_connection_buffer() {
    use tether_server::listener::H1_MAX_BUFFER;
    let router = Router::new().route("/", get(|| async { "ok" }).post(|| async { "ok" }));
    let (address, stop, _server) =
        serve(router, Duration::from_secs(10), Duration::from_secs(10)).await;
    assert_eq!(
        status_with_headers(address, H1_MAX_BUFFER - 2 * 1024).await,
        "HTTP/1.1 200 OK"
    );
    let refused = status_with_headers(address, 2 * H1_MAX_BUFFER + 4 * 1024).await;
    assert!(refused.starts_with("HTTP/1.1 431"), "{refused}");
    // The same bounds on a connection whose first bytes left HTTP/2 open.
    assert_eq!(
        status_with_headers_sniffed(address, H1_MAX_BUFFER - 2 * 1024, true).await,
        "HTTP/1.1 200 OK"
    );
    let refused = status_with_headers_sniffed(address, 2 * H1_MAX_BUFFER + 4 * 1024, true).await;
    assert!(refused.starts_with("HTTP/1.1 431"), "{refused}");
    stop.cancel();
}

/// Opens `request` on a fresh HTTP/1.1 connection and returns it once the answer's head (or, for a
/// request whose body is still to come, nothing) has had a moment to arrive.
async fn opened(address: std::net::SocketAddr, request: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt as _;
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(request).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stream
}

/// Whether the server has closed `stream`, once what it had sent (an answer's head) is read.
async fn closed_after_what_was_sent(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt as _;
    let mut buffer = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// Fills the cap (8) with connections that each sent `request`, one after the other, then checks
/// that a new client still gets an answer; returns the eight, oldest first.
async fn fill_the_cap_then_get_in(
    address: std::net::SocketAddr,
    request: &[u8],
    what: &str,
) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(opened(address, request).await);
    }
    assert_eq!(
        get_status(address, "/healthz").await.as_deref(),
        Some("HTTP/1.1 200 OK"),
        "a new client gets in beside eight {what}"
    );
    held
}

/// At the cap, event streams (which resume from their Last-Event-ID) and bodies that trickle in
/// give their places to new clients: neither a worker credential's streams nor a body sent a byte at
/// a time by a client with no credential at all (to an endpoint that takes none, or to one that
/// refuses it) keeps everyone else out. The real application, on
/// the real listener.
#[tokio::test]
async fn at_the_cap_streams_and_trickling_bodies_give_their_places_to_new_clients() {
    let server = tether_testkit::TestServer::start(&tether_testkit::Backend::Sqlite).await;
    let (_env, _agent, session) = server.environment_agent_and_session().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let options = tether_server::ServeOptions {
        body_limit: 1024 * 1024,
        tls: None,
        limits: ConnectionLimits {
            max_connections: 8,
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
        },
    };
    let shutdown = stop.clone();
    let serving = tokio::spawn(tether_server::serve_with(
        server.app.clone(),
        listener,
        options,
        async move { shutdown.cancelled().await },
    ));

    // Eight event streams fill the cap.
    let stream_request = format!(
        "GET /v1/sessions/{session}/events/stream HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {}\r\n\r\n",
        server.admin_token
    );
    let mut streams = fill_the_cap_then_get_in(address, stream_request.as_bytes(), "streams").await;
    assert!(
        closed_after_what_was_sent(&mut streams[0]).await,
        "the oldest stream gave its place"
    );
    for (i, stream) in streams.iter_mut().enumerate().skip(1) {
        assert!(
            !closed_after_what_was_sent(stream).await,
            "stream {i} stays"
        );
    }
    drop(streams);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Eight bodies that trickle in, without any credential, to an endpoint that takes none.
    let trickle =
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n";
    let mut trickling = fill_the_cap_then_get_in(address, trickle, "trickling bodies").await;
    assert!(
        closed_after_what_was_sent(&mut trickling[0]).await,
        "the oldest trickle gave its place"
    );
    drop(trickling);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Eight bodies that trickle in to an endpoint that wants a credential, without one: each is
    // refused, its body drained for up to a second first, and the new client need not wait for
    // that second.
    let refused =
        b"POST /v1/agents HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n";
    drop(fill_the_cap_then_get_in(address, refused, "refused bodies draining").await);
    stop.cancel();
    serving.await.unwrap().unwrap();
}
