//! Request extractors that fail in the error envelope with the right status (D-32's order: the route's
//! authorization, `access::authorize`, authenticates and checks rights first; handlers then look
//! things up, then read parameters).

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use serde_json::Value;
use tether_core::ids::{self, IdKind};
use tether_store::{Cursor, PageRequest};

use crate::dialect::Dialect;
use crate::error::{ApiError, ApiResult};
use crate::service::tokens::Principal;
use crate::service::App;

/// The authenticated caller.
pub struct Caller(pub Principal);

impl FromRequestParts<App> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        if let Some(principal) = parts.extensions.get::<Principal>() {
            // Authenticated already, by the route's authorization (`access::authorize`).
            return Ok(Caller(principal.clone()));
        }
        let dialect = dialect_of(parts);
        one_credential_header(&parts.headers)?;
        if dialect.accepts_x_api_key() {
            one_credential_in_both_headers(&parts.headers)?;
        }
        let secret = presented_secret(&parts.headers, dialect)
            .ok_or_else(|| {
                let hint = if !dialect.accepts_x_api_key() && header(&parts.headers, "x-api-key").is_some() {
                    "send the token as Authorization: Bearer <token> (x-api-key is not accepted on this prefix)"
                } else if dialect.accepts_x_api_key() {
                    "an Authorization: Bearer <token> or an x-api-key header is required"
                } else {
                    "an Authorization: Bearer <token> header is required"
                };
                ApiError::unauthorized(hint)
            })?;
        // Boxed: inline, the credential's read would be part of every handler's future taking a
        // `Caller` all through the handler's run (a long poll's whole wait), although a guarded
        // route has always authenticated the caller above.
        let principal = Box::pin(app.authenticate(&secret)).await?;
        // The access log names the kind of credential and its id, never the secret.
        let span = tracing::Span::current();
        span.record("credential", principal.kind());
        if let Some(id) = principal.credential_id() {
            span.record("credential_id", id);
        }
        Ok(Caller(principal))
    }
}

/// Refuses a request that repeats a credential header: which of two the server took would be a
/// guess (a proxy that adds its own, a client that merges configurations), and a guess about who
/// is asking is not one to make quietly.
pub(super) fn one_credential_header(headers: &HeaderMap) -> Result<(), ApiError> {
    for name in ["authorization", "x-api-key"] {
        if headers.get_all(name).iter().nth(1).is_some() {
            return Err(ApiError::unauthorized(format!(
                "more than one {name} header: send one credential"
            )));
        }
    }
    Ok(())
}

/// Where both headers are taken (SPEC §11.1: `x-api-key` in the Anthropic dialect), they may name
/// one credential twice, but not two of Tether's: for the same reason as [`one_credential_header`].
/// An `x-api-key` that is no Tether credential beside a Bearer one (a gateway's own key passed on,
/// an `ANTHROPIC_API_KEY` an older client sends beside its token) is left alone, as before: the
/// Bearer credential is the caller.
fn one_credential_in_both_headers(headers: &HeaderMap) -> Result<(), ApiError> {
    let tethers = |token: &str| token.starts_with("tth_");
    match (bearer(headers), header(headers, "x-api-key")) {
        (Some(bearer), Some(api_key))
            if tethers(&bearer) && tethers(api_key.trim()) && bearer != api_key.trim() =>
        {
            Err(ApiError::unauthorized(
                "Authorization and x-api-key name different credentials: send one",
            ))
        }
        _ => Ok(()),
    }
}

/// The credential the request presents: its Bearer token, or where the dialect takes one, its
/// `x-api-key`.
fn presented_secret(headers: &HeaderMap, dialect: Dialect) -> Option<String> {
    bearer(headers).or_else(|| {
        if dialect.accepts_x_api_key() {
            header(headers, "x-api-key")
        } else {
            None
        }
    })
}

pub(super) fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = header(headers, "authorization")?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
        .filter(|t| !t.is_empty())
}

pub fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// The dialect of the prefix the request came in on (Qoder's for paths of neither).
pub fn dialect_of(parts: &Parts) -> Dialect {
    Dialect::of_path(parts.uri.path()).unwrap_or(Dialect::Qoder)
}

/// The dialect, as an extractor.
pub struct Wire(pub Dialect);

impl<S: Send + Sync> FromRequestParts<S> for Wire {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Wire(dialect_of(parts)))
    }
}

/// The worker identity header (D-24): empty or blank means absent; over 256 characters or non-printable → 400.
pub struct WorkerId(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for WorkerId {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let dialect = dialect_of(parts);
        for name in dialect.worker_headers() {
            let Some(raw) = parts.headers.get(*name) else {
                continue;
            };
            let bad = || {
                ApiError::bad_param(
                    name,
                    "the worker id must be 1 to 256 printable ASCII characters",
                )
            };
            let text = raw.to_str().map_err(|_| bad())?;
            let text = text.trim();
            if text.is_empty() {
                return Ok(WorkerId(None));
            }
            if text.len() > 256 || !text.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                return Err(bad());
            }
            return Ok(WorkerId(Some(text.to_owned())));
        }
        Ok(WorkerId(None))
    }
}

/// The `Idempotency-Key` header of a claim (Tether's claim): absent, or 16 to 255 printable ASCII
/// characters without spaces, bare or as a quoted string (the IETF draft's form). Every try of one
/// claim sends the same key; a client sends a random one (16 bytes or more, say). With it, the
/// credential the request presents, from which with the key only its holder can derive the
/// claim's session token (`credentials::claim_token`).
pub struct IdempotencyKey(pub Option<KeyedClaim>);

pub struct KeyedClaim {
    pub key: String,
    /// The key or admin token the claim was sent with, as presented.
    pub claimant_secret: String,
}

impl IdempotencyKey {
    pub const HEADER: &'static str = "idempotency-key";
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let mut values = parts.headers.get_all(Self::HEADER).iter();
        let Some(raw) = values.next() else {
            return Ok(IdempotencyKey(None));
        };
        let bad = |why: &str| ApiError::bad_param("Idempotency-Key", why.to_owned());
        if values.next().is_some() {
            return Err(bad("send one Idempotency-Key header, not several"));
        }
        let text = raw.to_str().unwrap_or("\u{7f}").trim();
        let text = text
            .strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .unwrap_or(text);
        if !(16..=255).contains(&text.len()) || !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad(
                "the Idempotency-Key must be 16 to 255 printable ASCII characters without spaces",
            ));
        }
        // Only on a route that authenticates: the credential is there, and valid.
        let claimant_secret = presented_secret(&parts.headers, dialect_of(parts))
            .ok_or_else(|| ApiError::unauthorized("a credential is required"))?;
        Ok(IdempotencyKey(Some(KeyedClaim {
            key: text.to_owned(),
            claimant_secret,
        })))
    }
}

/// The query string as ordered pairs, so that parameters can be validated one by one with clear errors.
pub struct Params(pub Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Params::parse(parts.uri.query().unwrap_or("")))
    }
}

impl Params {
    /// The pairs of a query string, `+` and `%XX` decoded.
    pub fn parse(query: &str) -> Params {
        Params(
            form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect(),
        )
    }

    /// A parameter that takes one value; 400 when it is given more than once, since which of
    /// `limit=2&limit=3` a client meant is a guess (the repeatable ones are read with [`Self::all`]).
    pub fn get(&self, name: &str) -> ApiResult<Option<&str>> {
        let mut values = self.0.iter().filter(|(k, _)| k == name).map(|(_, v)| v);
        match (values.next(), values.next()) {
            (None, _) => Ok(None),
            (Some(value), None) => Ok(Some(value.as_str())),
            (Some(_), Some(_)) => Err(ApiError::bad_param(
                name,
                format!("{name} may be given only once"),
            )),
        }
    }

    /// Every value of a repeatable parameter (`name` or `name[]`), comma-separated values split.
    pub fn all(&self, name: &str) -> Vec<String> {
        let bracketed = format!("{name}[]");
        self.0
            .iter()
            .filter(|(k, _)| k == name || *k == bracketed)
            .flat_map(|(_, v)| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// An integer parameter (see [`integer`]); 400 when present but not an integer.
    pub fn int(&self, name: &str) -> ApiResult<Option<i64>> {
        match self.get(name)? {
            None => Ok(None),
            Some(raw) => integer(raw)
                .map(Some)
                .ok_or_else(|| ApiError::bad_param(name, format!("{name} must be an integer"))),
        }
    }

    pub fn bool(&self, name: &str) -> ApiResult<Option<bool>> {
        match self.get(name)? {
            None => Ok(None),
            Some("true" | "1") => Ok(Some(true)),
            Some("false" | "0") => Ok(Some(false)),
            Some(_) => Err(ApiError::bad_param(
                name,
                format!("{name} must be true or false"),
            )),
        }
    }

    pub fn timestamp(&self, name: &str) -> ApiResult<Option<tether_core::Timestamp>> {
        match self.get(name)? {
            None => Ok(None),
            Some(raw) => tether_core::Timestamp::parse_rfc3339(raw)
                .map(Some)
                .ok_or_else(|| {
                    ApiError::bad_param(name, format!("{name} must be an RFC 3339 timestamp"))
                }),
        }
    }

    /// Pagination (§1.8). `max` is the largest `limit`; above it → 400, or clamped when `clamp`.
    /// `cursor_kind` is the kind of id the cursors must be shaped like (`None`: any non-empty string).
    pub fn page(
        &self,
        max: u32,
        clamp: bool,
        cursor_kind: Option<IdKind>,
    ) -> ApiResult<PageRequest> {
        let limit = match self.int("limit")? {
            None => 20,
            Some(n) if n < 1 => {
                return Err(ApiError::bad_param("limit", "limit must be at least 1"))
            }
            Some(n) if n > i64::from(max) && !clamp => {
                return Err(ApiError::bad_param(
                    "limit",
                    format!("limit may be at most {max}"),
                ))
            }
            Some(n) => n.min(i64::from(max)) as u32,
        };
        let mut cursors: Vec<(&str, &str)> = Vec::new();
        for name in ["page", "after_id", "before_id"] {
            if let Some(value) = self.get(name)? {
                cursors.push((name, value));
            }
        }
        if cursors.len() > 1 {
            return Err(ApiError::bad_request(
                "use at most one of page, after_id and before_id",
            ));
        }
        let cursor = match cursors.first() {
            None => Cursor::Start,
            Some((name, value)) => {
                let ok = match cursor_kind {
                    Some(kind) => ids::is_well_formed(kind, value),
                    None => !value.is_empty(),
                };
                if !ok {
                    return Err(ApiError::bad_param(
                        name,
                        format!("{name} is not a valid cursor"),
                    ));
                }
                if *name == "before_id" {
                    Cursor::Before((*value).to_owned())
                } else {
                    Cursor::After((*value).to_owned())
                }
            }
        };
        let descending = match self.get("order")? {
            None | Some("asc") => false,
            Some("desc") => true,
            Some(_) => {
                return Err(ApiError::bad_param(
                    "order",
                    "order must be \"asc\" or \"desc\"",
                ))
            }
        };
        Ok(PageRequest {
            cursor,
            limit,
            descending,
        })
    }
}

/// An optional JSON body: none, empty, or a JSON value (§1.3). The content type is not required.
pub struct JsonBody(pub Option<Value>);

impl JsonBody {
    /// The body as a JSON object (absent or empty reads as `{}`). Handlers take the extraction's
    /// `Result` and call this after their lookups, so a bad body (400) never outranks 403/404 (D-32).
    /// Any other JSON value, `null` included, is refused: §1.3 lets an optional body be absent, empty
    /// or `{}`, and a `null` that stood for "graceful" or "no change" would hide a client's bug.
    pub fn object(body: Result<JsonBody, ApiError>) -> ApiResult<serde_json::Map<String, Value>> {
        match body? {
            JsonBody(None) => Ok(serde_json::Map::new()),
            JsonBody(Some(Value::Object(map))) => Ok(map),
            JsonBody(Some(_)) => Err(ApiError::bad_request(
                "the request body must be a JSON object",
            )),
        }
    }

    /// Like [`JsonBody::object`], for a body that must be there (updates): an absent body is a
    /// client's mistake, not an update that changes nothing.
    pub fn required_object(
        body: Result<JsonBody, ApiError>,
    ) -> ApiResult<serde_json::Map<String, Value>> {
        match body? {
            JsonBody(None) => Err(ApiError::bad_request(
                "this request needs a JSON object body",
            )),
            some => JsonBody::object(Ok(some)),
        }
    }
}

impl FromRequest<App> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, app: &App) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, app).await.map_err(|rejection| {
            if rejection.status().as_u16() == 413 {
                ApiError::bad_request("the request body is larger than the server accepts")
            } else {
                ApiError::bad_request("the request body could not be read")
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(JsonBody(None));
        }
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::bad_request(format!("the request body is not valid JSON: {e}"))
        })?;
        if nests_deeper_than(&value, MAX_BODY_DEPTH) {
            return Err(ApiError::bad_request(format!(
                "the request body nests arrays and objects more than {MAX_BODY_DEPTH} deep"
            )));
        }
        Ok(JsonBody(Some(value)))
    }
}

/// The most arrays and objects a request body may nest. The parser itself stops at 128, but what a
/// client sends is stored and answered a level or two deeper (a session holds its agent, tools
/// and all), and every reader of those answers — the official SDKs, `tether-client`, anyone's
/// serde_json — must be able to read them within that same common limit.
pub const MAX_BODY_DEPTH: usize = 100;

/// Whether `value` nests arrays and objects more than `max` deep (a scalar is depth 0, `[]` depth 1).
fn nests_deeper_than(value: &Value, max: usize) -> bool {
    match value {
        Value::Array(items) => max == 0 || items.iter().any(|v| nests_deeper_than(v, max - 1)),
        Value::Object(fields) => max == 0 || fields.values().any(|v| nests_deeper_than(v, max - 1)),
        _ => false,
    }
}

/// A decimal integer, held to `i64`'s range: one beyond it is still an integer, and the contract's
/// integer parameters are either clamped (`limit`, `desired_ttl_seconds`) or ranges whose end it is
/// as good as (`reclaim_older_than_ms`), so it answers as the range's end would, not as if it were
/// not a number. `None` for anything that is not an integer.
pub fn integer(raw: &str) -> Option<i64> {
    use std::num::IntErrorKind;
    match raw.trim().parse::<i64>() {
        Ok(n) => Some(n),
        Err(e) => match e.kind() {
            IntErrorKind::PosOverflow => Some(i64::MAX),
            IntErrorKind::NegOverflow => Some(i64::MIN),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> Value {
        let text = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        serde_json::from_str(&text).expect("within the parser's limit")
    }

    #[test]
    fn depth_counts_arrays_and_objects_not_scalars() {
        let cases = [
            (serde_json::json!(1), 0),
            (serde_json::json!([]), 1),
            (serde_json::json!({"a": [1, {"b": "c"}]}), 3),
            (serde_json::json!([[], [[[]]], 2]), 4),
            (nested(MAX_BODY_DEPTH), MAX_BODY_DEPTH),
        ];
        for (value, depth) in cases {
            assert!(!nests_deeper_than(&value, depth), "{value} within {depth}");
            if depth > 0 {
                assert!(
                    nests_deeper_than(&value, depth - 1),
                    "{value} beyond {}",
                    depth - 1
                );
            }
        }
    }
}
