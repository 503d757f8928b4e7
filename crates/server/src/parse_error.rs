//! Hyper's own answer to an HTTP/1 request it cannot parse, and the enveloped answer that replaces it.
//!
//! When hyper cannot parse a request head (invalid bytes in the request line or a header, headers over
//! its limit, a target too long) it answers by itself, before any service runs, with a bare
//! `400`/`431`/`414` and `content-length: 0` (`role.rs`, `Server::on_error`), then closes the
//! connection; it offers no hook to shape that answer. The listener recognises those bytes on the way
//! out and writes [`enveloped`] instead, so this error too comes in the §1.7 envelope.
//!
//! The recognition cannot mistake one of our own answers for hyper's: every error response of the
//! router goes through the envelope middleware, which gives it a JSON body and a `request-id` header,
//! while hyper's head carries nothing but `content-length: 0` and `date`.
//!
//! [`raw_refusal`] writes such an answer whole; the listener also uses it for plain HTTP on its TLS
//! port, where no HTTP stack runs at all.

use axum::http::StatusCode;

use crate::error::ApiError;

/// Longest head hyper writes for a parse error (status line, `content-length`, `date`), with room.
pub(crate) const MAX_HEAD: usize = 256;

/// Hyper's answer to an unparsable request, found at the end of what is being written.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ParseErrorHead<'a> {
    /// Where the head starts in the bytes looked at.
    pub at: usize,
    pub status: StatusCode,
    /// Hyper's `date` value, kept in the replacement.
    pub date: Option<&'a [u8]>,
}

/// Whether `tail` (the last bytes of what is being written) ends with hyper's head for a parse error.
/// Hyper writes the head as the last thing on the connection and with no body, so it ends the bytes.
pub(crate) fn find(tail: &[u8]) -> Option<ParseErrorHead<'_>> {
    if !tail.ends_with(b"\r\n\r\n") {
        return None;
    }
    let at = tail.windows(9).rposition(|w| w == b"HTTP/1.1 ")?;
    let head = &tail[at..tail.len() - 2];
    let mut lines = head.split(|&b| b == b'\n').filter(|l| !l.is_empty());
    let status = match lines.next()? {
        b"HTTP/1.1 400 Bad Request\r" => StatusCode::BAD_REQUEST,
        b"HTTP/1.1 414 URI Too Long\r" => StatusCode::URI_TOO_LONG,
        b"HTTP/1.1 431 Request Header Fields Too Large\r" => {
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        }
        _ => return None,
    };
    let (mut empty_body, mut date) = (false, None);
    for line in lines {
        let line = line.strip_suffix(b"\r")?;
        let colon = line.iter().position(|&b| b == b':')?;
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"content-length") && value == b"0" {
            empty_body = true;
        } else if name.eq_ignore_ascii_case(b"date") {
            date = Some(value);
        } else if !(name.eq_ignore_ascii_case(b"connection") && value == b"close") {
            // Any other header (`request-id`, `content-type`) means the response is not hyper's.
            return None;
        }
    }
    empty_body.then_some(ParseErrorHead { at, status, date })
}

/// The §1.7 answer for hyper's head: same status, a JSON envelope with a fresh request id (the request
/// had no readable `x-request-id`), and `connection: close` because hyper closes the connection next.
pub(crate) fn enveloped(head: &ParseErrorHead<'_>) -> Vec<u8> {
    let message = match head.status {
        StatusCode::URI_TOO_LONG => "the request target is too long",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "the request headers are too large",
        _ => "the request is not valid HTTP: its request line or a header cannot be parsed",
    };
    let request_id = uuid::Uuid::new_v4().to_string();
    tracing::info!(
        target: "tether::access",
        request_id = %request_id,
        status = head.status.as_u16(),
        "unparsable request"
    );
    raw_refusal(head.status, message, &request_id, head.date)
}

/// A whole HTTP/1.1 refusal, written by the listener itself outside hyper (to a request hyper could
/// not parse, or plain HTTP on the TLS port): `status` with `message` in the §1.7 envelope, the
/// request id in the headers (D-18), `connection: close`, and `date` when there is one to keep.
pub(crate) fn raw_refusal(
    status: StatusCode,
    message: &str,
    request_id: &str,
    date: Option<&[u8]>,
) -> Vec<u8> {
    let body = serde_json::to_string(
        &ApiError::new(status, "invalid_request_error", message).body(request_id),
    )
    .expect("an error envelope always serializes");
    let mut response = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\nrequest-id: {request_id}\r\nx-request-id: {request_id}\r\n\
         x-should-retry: false\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes();
    if let Some(date) = date {
        response.extend_from_slice(b"date: ");
        response.extend_from_slice(date);
        response.extend_from_slice(b"\r\n");
    }
    response.extend_from_slice(b"\r\n");
    response.extend_from_slice(body.as_bytes());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYPER_400: &[u8] =
        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 23:00:00 GMT\r\n\r\n";

    #[test]
    fn hyper_heads_are_found_after_the_end_of_a_previous_response() {
        let mut bytes = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}".to_vec();
        bytes.extend_from_slice(HYPER_400);
        let head = find(&bytes).unwrap();
        assert_eq!(head.at, bytes.len() - HYPER_400.len());
        assert_eq!(head.status, StatusCode::BAD_REQUEST);
        assert_eq!(head.date, Some(&b"Tue, 01 Dec 2026 23:00:00 GMT"[..]));
        let found =
            find(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(found.unwrap().status, 431);
        let found = find(b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(found.unwrap().status, 414);
    }

    #[test]
    fn our_own_responses_are_not_taken_for_hyper_heads() {
        for bytes in [
            &b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nrequest-id: x\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ndate: x\r\n\r\n",
            &HYPER_400[..HYPER_400.len() - 2],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        ] {
            assert_eq!(find(bytes), None, "{}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn the_replacement_is_the_envelope_with_the_same_status() {
        let head = find(HYPER_400).unwrap();
        let response = String::from_utf8(enveloped(&head)).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
        assert!(head.contains(&format!("content-length: {}\r\n", body.len())));
        assert!(head.contains("\r\ndate: Tue, 01 Dec 2026 23:00:00 GMT"));
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        let id = body["request_id"].as_str().unwrap();
        assert!(head.contains(&format!("\r\nrequest-id: {id}\r\n")));
    }
}
