//! Errors: the server's error envelope (§1.7) as a typed value, and everything that can go wrong before
//! a response arrives.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What every fallible call of this crate returns.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A refusal by the server, read from its error envelope:
/// `{"type":"error","request_id":…,"error":{"type","message","param"?,"code"?,"details"?}}`.
///
/// Decide on [`ApiError::status`] rather than on `kind`: the same status comes with different `type`
/// strings on different endpoints (a 409 is `invalid_request_error` on the work endpoints and
/// `conflict_error` elsewhere).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    /// The HTTP status code.
    pub status: u16,
    /// `error.type`, e.g. `not_found_error`, `precondition_failed_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `error.message`: human-readable text, not a contract.
    pub message: String,
    /// `error.param`: the request parameter to blame, when there is one.
    pub param: Option<String>,
    /// `error.code`: a stable snake_case machine code (`work_not_found`, `lease_mismatch`, …), when given.
    pub code: Option<String>,
    /// `error.details`: extra structure, e.g. `current_state` on a 412 heartbeat refusal.
    pub details: Option<Value>,
    /// The envelope's `request_id` (or the `x-request-id` response header), for correlating with server logs.
    pub request_id: Option<String>,
}

impl ApiError {
    /// Reads an error response. A body that is not the envelope (a proxy's HTML page, say) still yields
    /// an error carrying the status, with the start of the body as its message.
    pub(crate) fn from_response(
        status: u16,
        header_request_id: Option<String>,
        body: &[u8],
    ) -> Self {
        #[derive(Deserialize)]
        struct Envelope {
            request_id: Option<String>,
            error: Inner,
        }
        #[derive(Deserialize)]
        struct Inner {
            #[serde(rename = "type")]
            kind: Option<String>,
            message: Option<String>,
            param: Option<String>,
            code: Option<String>,
            details: Option<Value>,
        }
        match serde_json::from_slice::<Envelope>(body) {
            Ok(envelope) => ApiError {
                status,
                kind: envelope
                    .error
                    .kind
                    .unwrap_or_else(|| kind_for_status(status).to_owned()),
                message: envelope.error.message.unwrap_or_default(),
                param: envelope.error.param,
                code: envelope.error.code,
                details: envelope.error.details,
                request_id: envelope.request_id.or(header_request_id),
            },
            Err(_) => ApiError {
                status,
                kind: kind_for_status(status).to_owned(),
                message: describe_foreign_body(status, body),
                param: None,
                code: None,
                details: None,
                request_id: header_request_id,
            },
        }
    }
}

/// `html` without anything between `<` and `>`.
fn without_tags(html: &str) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                text.push(' ');
            }
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text
}

/// One line on an error answer that is not the envelope: a proxy's or another server's page, named
/// by its title rather than shown as markup, or the start of any other text on one line.
fn describe_foreign_body(status: u16, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let one_line = |text: &str, most: usize| -> String {
        let words: Vec<&str> = text.split_whitespace().collect();
        let line = words.join(" ");
        match line.char_indices().nth(most) {
            Some((end, _)) => format!("{}…", &line[..end]),
            None => line,
        }
    };
    let text = text.trim();
    if text.is_empty() {
        return format!("HTTP {status} with an empty body");
    }
    let lower = text.to_ascii_lowercase();
    if lower.starts_with('<') && (lower.contains("<html") || lower.contains("<!doctype html")) {
        let title = lower.find("<title>").and_then(|start| {
            let start = start + "<title>".len();
            let end = start + lower[start..].find("</title>")?;
            // `lower` keeps `text`'s byte offsets: only ASCII letters were changed.
            Some(one_line(&text[start..end], 100))
        });
        // Else its text without the markup.
        let title = title.or_else(|| Some(one_line(&without_tags(text), 100)));
        return match title {
            Some(title) if !title.is_empty() => {
                format!("HTTP {status} with an HTML page ({title:?}), not Tether's error envelope")
            }
            _ => format!("HTTP {status} with an HTML page, not Tether's error envelope"),
        };
    }
    format!(
        "HTTP {status}, not Tether's error envelope: {}",
        one_line(text, 200)
    )
}

/// The error type the spec assigns to a status, for responses that did not say.
fn kind_for_status(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        409 => "conflict_error",
        412 => "precondition_failed_error",
        429 => "rate_limit_error",
        503 => "overloaded_error",
        _ => "api_error",
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, self.kind, self.message)?;
        if let Some(param) = &self.param {
            write!(f, " (param: {param})")?;
        }
        if let Some(code) = &self.code {
            write!(f, " [{code}]")?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiError {}

/// Everything a call can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server answered with an error status and (usually) the error envelope.
    #[error("{0}")]
    Api(Box<ApiError>),
    /// No connection could be made (refused, unresolvable host, connect timeout).
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The URL that was being called.
        url: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The server's TLS certificate was refused (unknown issuer, wrong host name, expired …) or the TLS
    /// handshake failed (say, `https://` to a plain-HTTP port). Not retryable: trying again meets the
    /// same certificate.
    #[error("TLS error calling {url}: {reason}")]
    Tls {
        /// The URL that was being called.
        url: String,
        /// What was wrong, in words.
        reason: String,
    },
    /// The request or a read from the response took longer than allowed.
    #[error("the request to {url} timed out")]
    Timeout {
        /// The URL that was being called.
        url: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// Any other transport failure (connection reset, malformed HTTP, …).
    #[error("HTTP transport error calling {url}: {source}")]
    Transport {
        /// The URL that was being called.
        url: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// A success response whose body is not the JSON this client expects.
    #[error("cannot decode the response of {url} (HTTP {status}): {source}")]
    Decode {
        /// The URL that was called.
        url: String,
        /// The HTTP status of the response.
        status: u16,
        /// Why decoding failed.
        #[source]
        source: serde_json::Error,
    },
    /// A setting given to the client builder is unusable (a base URL that does not parse, say).
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// A work item's `secret` is not URL-safe base64 of `{sessions_token, api_base_url}`.
    #[error("invalid work secret: {0}")]
    Secret(String),
    /// The response's body is longer than this client reads ([`crate::MAX_RESPONSE_BYTES`]).
    #[error("the response of {url} is longer than {limit} bytes")]
    TooLarge {
        /// The URL that was called.
        url: String,
        /// The most this client reads.
        limit: usize,
    },
    /// The server-sent event stream carried something that is not an event of this API.
    #[error("malformed event stream: {0}")]
    Stream(String),
}

impl Error {
    /// The innermost error of the source chain, in words: for a refused connection or an unknown
    /// host, the operating system's (`Connection refused`), which this error's own message leaves out.
    pub fn root_cause(&self) -> String {
        let mut current: &dyn std::error::Error = self;
        while let Some(source) = current.source() {
            current = source;
        }
        current.to_string()
    }

    /// The envelope, when the server refused the request.
    pub fn api(&self) -> Option<&ApiError> {
        match self {
            Error::Api(e) => Some(e),
            _ => None,
        }
    }

    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        self.api().map(|e| e.status)
    }

    /// `error.code` of a refusal.
    pub fn code(&self) -> Option<&str> {
        self.api().and_then(|e| e.code.as_deref())
    }

    /// 401: the credential is missing, unknown, revoked or dead.
    pub fn is_unauthorized(&self) -> bool {
        self.status() == Some(401)
    }

    /// 403: the credential may not do this.
    pub fn is_forbidden(&self) -> bool {
        self.status() == Some(403)
    }

    /// 404: the resource does not exist (or is invisible to this credential).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// 409: a state conflict. On a work heartbeat it means "this item is no longer yours".
    pub fn is_conflict(&self) -> bool {
        self.status() == Some(409)
    }

    /// 412: a heartbeat's `expected_last_heartbeat` did not match (the lease is lost).
    pub fn is_precondition_failed(&self) -> bool {
        self.status() == Some(412)
    }

    /// No connection could be made: the server is not running or not reachable at that address.
    pub fn is_connect(&self) -> bool {
        matches!(self, Error::Connect { .. })
    }

    /// Whether trying again later may succeed: transport failures, timeouts, 408, 429 and 5xx
    /// (the worker protocol, §8, backs off on exactly these).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Timeout { .. } | Error::Transport { .. } => true,
            Error::Api(e) => matches!(e.status, 408 | 429) || e.status >= 500,
            _ => false,
        }
    }

    /// A stop sent with `unless_turn_open` refused because the session has a turn open
    /// ([`crate::Client::stop_work_unless_turn_open`]): which turn (the count of turns input has
    /// started; 0 from a server that does not say).
    pub fn turn_left_open(&self) -> Option<u64> {
        match self {
            Error::Api(e) if e.status == 409 && e.code.as_deref() == Some("turn_open") => Some(
                e.details
                    .as_ref()
                    .and_then(|d| d.get("turn"))
                    .and_then(|t| t.as_u64())
                    .unwrap_or(0),
            ),
            _ => None,
        }
    }

    /// A refused certificate or a failed TLS handshake.
    pub fn is_tls(&self) -> bool {
        matches!(self, Error::Tls { .. })
    }

    pub(crate) fn transport(url: &str, source: reqwest::Error) -> Error {
        let url = url.to_owned();
        // This error names the URL once; reqwest's own message would name it again, query and all.
        let source = source.without_url();
        if let Some(tls) = find_tls_error(&source) {
            return Error::Tls {
                reason: describe_tls_error(tls, &url),
                url,
            };
        }
        if source.is_timeout() {
            Error::Timeout { url, source }
        } else if source.is_connect() {
            Error::Connect { url, source }
        } else {
            Error::Transport { url, source }
        }
    }
}

/// The rustls error somewhere in a transport error's chain. An `io::Error` does not list the error it
/// wraps as its source, so each link is also looked into.
fn find_tls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(tls) = find_tls_error(inner) {
                return Some(tls);
            }
        }
        current = e.source();
    }
    None
}

/// A certificate refusal in words that say what to do.
fn describe_tls_error(error: &rustls::Error, url: &str) -> String {
    use rustls::CertificateError as C;
    let host = url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split(['/', '?']).next())
        .unwrap_or(url);
    match error {
        rustls::Error::InvalidCertificate(cert) => match cert {
            C::UnknownIssuer | C::BadSignature => format!(
                "the server's certificate is not signed by an authority this client trusts \
                 (for a private CA, pass its certificate with --ca-cert or TETHER_CA_CERT): {error}"
            ),
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                format!("the server's certificate is not valid for {host}: {error}")
            }
            C::Expired | C::ExpiredContext { .. } => {
                format!("the server's certificate has expired: {error}")
            }
            C::NotValidYet | C::NotValidYetContext { .. } => {
                format!("the server's certificate is not valid yet (check the clocks): {error}")
            }
            C::Other(other)
                if matches!(
                    other.0.downcast_ref::<webpki::Error>(),
                    Some(webpki::Error::CaUsedAsEndEntity)
                ) =>
            {
                // What `openssl req -x509` makes by default, and so the first certificate many try.
                "the server's certificate is a CA's, not a server's (a self-signed certificate made \
                 with `openssl req -x509` is one): sign a server certificate with that CA, serve \
                 it, and keep passing the CA's certificate with --ca-cert or TETHER_CA_CERT"
                    .to_owned()
            }
            _ => format!("the server's certificate was refused: {error}"),
        },
        rustls::Error::InvalidMessage(_) => format!(
            "the server did not answer the TLS handshake ({error}); does it serve HTTPS on that \
             port? (use http:// for a plain-HTTP server)"
        ),
        _ => format!("the TLS handshake failed: {error}"),
    }
}

impl From<ApiError> for Error {
    fn from(e: ApiError) -> Self {
        Error::Api(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_envelope() {
        let body = br#"{"type":"error","request_id":"r1","error":{"type":"precondition_failed_error","message":"no","code":"lease_mismatch","details":{"current_state":{"state":"active"}}}}"#;
        let e = ApiError::from_response(412, Some("header".into()), body);
        assert_eq!(e.kind, "precondition_failed_error");
        assert_eq!(e.code.as_deref(), Some("lease_mismatch"));
        assert_eq!(e.request_id.as_deref(), Some("r1"));
        assert_eq!(e.details.unwrap()["current_state"]["state"], "active");
    }

    #[test]
    fn an_answer_that_is_not_the_envelope_is_said_in_one_line() {
        let page = b"<!DOCTYPE HTML>\n<html lang=\"en\">\n<head>\n<title>Error response</title>\n</head>\n<body><h1>Error 404</h1></body></html>\n";
        let e = ApiError::from_response(404, None, page);
        assert_eq!(
            e.message,
            "HTTP 404 with an HTML page (\"Error response\"), not Tether's error envelope"
        );
        assert_eq!(e.kind, "not_found_error", "the status's type, for callers");
        let e = ApiError::from_response(502, None, b"<html><body>Bad Gateway</body></html>");
        assert_eq!(
            e.message,
            "HTTP 502 with an HTML page (\"Bad Gateway\"), not Tether's error envelope"
        );
        let e = ApiError::from_response(502, None, b"<html><body></body></html>");
        assert_eq!(
            e.message,
            "HTTP 502 with an HTML page, not Tether's error envelope"
        );
        let e = ApiError::from_response(500, None, "upstream\n\n  went   away é".as_bytes());
        assert_eq!(
            e.message,
            "HTTP 500, not Tether's error envelope: upstream went away é"
        );
        let long = "é".repeat(300);
        let e = ApiError::from_response(500, None, long.as_bytes());
        assert!(
            e.message.ends_with(&format!("{}…", "é".repeat(200))),
            "{}",
            e.message
        );
        let e = ApiError::from_response(503, None, b"  ");
        assert_eq!(e.message, "HTTP 503 with an empty body");
    }

    #[test]
    fn tls_explanations_are_single_spaced_sentences() {
        use rustls::{CertificateError, InvalidMessage};
        let url = "https://127.0.0.1:4780/api/v1/cloud/environments";
        for error in [
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
            rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
            rustls::Error::InvalidCertificate(CertificateError::Expired),
            rustls::Error::InvalidCertificate(CertificateError::NotValidYet),
            rustls::Error::InvalidCertificate(CertificateError::Revoked),
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                std::sync::Arc::new(webpki::Error::CaUsedAsEndEntity),
            ))),
            rustls::Error::InvalidMessage(InvalidMessage::InvalidContentType),
            rustls::Error::HandshakeNotComplete,
        ] {
            let text = describe_tls_error(&error, url);
            assert!(!text.contains("  "), "a run of spaces in {text:?}");
            assert!(!text.contains('\n'), "a line break in {text:?}");
        }
        let text = describe_tls_error(
            &rustls::Error::InvalidMessage(InvalidMessage::InvalidContentType),
            url,
        );
        assert!(text.contains("does it serve HTTPS on that port?"), "{text}");
    }

    #[test]
    fn tolerates_a_body_that_is_not_the_envelope() {
        let e = ApiError::from_response(502, Some("h".into()), b"<html>Bad Gateway</html>");
        assert_eq!(e.status, 502);
        assert_eq!(e.kind, "api_error");
        assert!(e.message.contains("Bad Gateway"));
        assert_eq!(e.request_id.as_deref(), Some("h"));
        assert!(Error::from(e).is_retryable());
    }
}
