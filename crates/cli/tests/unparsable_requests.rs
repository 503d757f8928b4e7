//! Requests hyper cannot parse, sent as raw bytes to the real `tether serve`: each is answered in the
//! §1.7 error envelope (not hyper's bare `400` with no body), with the status hyper chose, and the
//! server keeps serving. Loopback only; a few seconds.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;
use support::ServerProcess;

/// One HTTP/1 response: status, lower-cased headers, body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn connect(addr: &str) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
}

/// Reads one response with a `content-length` from `stream` (bytes past it stay in `buffered`).
fn read_answer(stream: &mut TcpStream, buffered: &mut Vec<u8>) -> Answer {
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buffered.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).expect("read the answer");
        assert!(
            n > 0,
            "connection closed before a full head: {:?}",
            String::from_utf8_lossy(buffered)
        );
        buffered.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buffered[..head_end].to_vec()).expect("an ASCII head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP/1.1 status line: {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (name, value) = l.split_once(':').expect("a header line");
            (name.trim().to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or_else(|| panic!("no content-length in {head:?}"));
    while buffered.len() < head_end + length {
        let n = stream.read(&mut chunk).expect("read the body");
        assert!(n > 0, "connection closed inside the body");
        buffered.extend_from_slice(&chunk[..n]);
    }
    let body = buffered[head_end..head_end + length].to_vec();
    buffered.drain(..head_end + length);
    Answer {
        status,
        headers,
        body,
    }
}

/// The answer must be the §1.7 envelope with `status`, a request id in body and header alike.
fn assert_enveloped(answer: &Answer, status: u16, what: &str) {
    assert_eq!(answer.status, status, "{what}");
    assert_eq!(
        answer.header("content-type"),
        Some("application/json"),
        "{what}"
    );
    let body: Value = serde_json::from_slice(&answer.body).unwrap_or_else(|e| {
        panic!(
            "{what}: the body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&answer.body)
        )
    });
    assert_eq!(body["type"], "error", "{what}: {body}");
    assert_eq!(
        body["error"]["type"], "invalid_request_error",
        "{what}: {body}"
    );
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    let id = body["request_id"].as_str().expect("a request id");
    assert!(!id.is_empty(), "{what}");
    assert_eq!(answer.header("request-id"), Some(id), "{what}");
}

/// Sends `request` on a fresh connection; the one answer, after which the server closes.
fn answer_to(addr: &str, request: &[u8]) -> Answer {
    let mut stream = connect(addr);
    stream.write_all(request).unwrap();
    let mut buffered = Vec::new();
    let answer = read_answer(&mut stream, &mut buffered);
    assert_eq!(answer.header("connection"), Some("close"));
    answer
}

fn healthz(addr: &str) {
    let mut stream = connect(addr);
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let answer = read_answer(&mut stream, &mut Vec::new());
    assert_eq!(
        answer.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&answer.body)
    );
}

#[test]
fn requests_hyper_cannot_parse_are_answered_in_the_error_envelope() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(data.path(), &[]);
    let addr = server.base.trim_start_matches("http://").to_owned();
    healthz(&addr);

    let answer = answer_to(&addr, b"GET /\x01\x02 HTTP/1.1\r\nhost: x\r\n\r\n");
    assert_enveloped(&answer, 400, "invalid bytes in the request line");

    let answer = answer_to(
        &addr,
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-bad\x01: y\r\n\r\n",
    );
    assert_enveloped(&answer, 400, "invalid bytes in a header name");

    // Over the 64 KiB a connection ever reads of a head (twice `H1_MAX_BUFFER`) before hyper's own
    // 64 KiB limit on the target itself could say 414: the head as a whole is too large.
    let long_target = format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(70_000));
    let answer = answer_to(&addr, long_target.as_bytes());
    assert_enveloped(
        &answer,
        431,
        "a request target over the connection's buffer",
    );

    let mut many_headers = String::from("GET /healthz HTTP/1.1\r\nhost: x\r\n");
    for i in 0..120 {
        many_headers.push_str(&format!("x-h{i}: v\r\n"));
    }
    many_headers.push_str("\r\n");
    let answer = answer_to(&addr, many_headers.as_bytes());
    assert_enveloped(&answer, 431, "more headers than hyper takes");

    // A good request, then a bad one on the same kept-alive connection, in one write (pipelined):
    // the first answer is the server's own, the second the envelope.
    let mut stream = connect(&addr);
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\nGET /\x7f HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let mut buffered = Vec::new();
    let first = read_answer(&mut stream, &mut buffered);
    assert_eq!(first.status, 200);
    assert_enveloped(
        &read_answer(&mut stream, &mut buffered),
        400,
        "a bad request after a good one, pipelined",
    );

    // The same, one after the other on a kept-alive connection.
    let mut stream = connect(&addr);
    let mut buffered = Vec::new();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    assert_eq!(read_answer(&mut stream, &mut buffered).status, 200);
    stream.write_all(b"G\x00T / HTTP/1.1\r\n\r\n").unwrap();
    assert_enveloped(
        &read_answer(&mut stream, &mut buffered),
        400,
        "a bad request after a good one, kept alive",
    );

    // Nothing of this harmed the server; its own errors are unchanged.
    healthz(&addr);
    let answer = answer_to(
        &addr,
        b"GET /api/v1/cloud/nothing-here HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(answer.status, 404);
    let body: Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(body["type"], "error");

    // An HTTP/1.1 request must name its host once (RFC 9112 §3.2).
    for request in [
        &b"GET /healthz HTTP/1.1\r\nconnection: close\r\n\r\n"[..],
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nhost: y\r\nconnection: close\r\n\r\n",
    ] {
        let answer = answer_to(&addr, request);
        assert_eq!(answer.status, 400, "{}", String::from_utf8_lossy(request));
        let body: Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains("Host"),
            "{body}"
        );
    }
    // A target that is a whole URL names its host there.
    let answer = answer_to(
        &addr,
        b"GET http://x/healthz HTTP/1.1\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(answer.status, 200);
}
