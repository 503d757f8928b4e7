//! The error envelope (§1.7) and the mapping from every refusal to its status code.
//!
//! The service answers in its own terms (`service::Error`); this is the only place that maps them to
//! HTTP. Handlers return [`ApiError`]; it travels to the request-id middleware inside the response's
//! extensions, and the middleware writes the envelope with the request's id. Responses that are errors
//! but were not made by us (a panic caught by the panic layer, a method the router does not serve) are
//! rewritten into the same envelope there, so a client never sees any other error shape.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tether_core::work::WorkError;

use crate::service::{self, Error, Missing};

/// `error.code` of a 503 whose request wrote nothing because the database is away: it may be sent
/// again (heartbeats' 503s carry the lease amnesty promise besides, `details.lease_amnesty_ms`).
pub const STORE_UNAVAILABLE: &str = "store_unavailable";
/// `error.code` of a 503 whose write went out for its commit before the database's connection was
/// lost: it may have been applied. Answered with `x-should-retry: false`, so that the official SDKs
/// do not send it again by themselves.
pub const STORE_OUTCOME_UNKNOWN: &str = "store_outcome_unknown";

#[derive(Clone, Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub details: Option<Value>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
            details: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn bad_param(param: &str, message: impl Into<String>) -> Self {
        Self::bad_request(message).with_param(param)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
    }

    /// 409 on the work endpoints and environment delete (D-13).
    pub fn state_conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "invalid_request_error", message)
    }

    /// 409 elsewhere, e.g. archiving twice (D-13, D-19c).
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict_error", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "api_error", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded_error", message)
    }

    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_owned());
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// The envelope body for a request id.
    pub fn body(&self, request_id: &str) -> tether_api::ErrorEnvelope {
        tether_api::ErrorEnvelope {
            object: "error".into(),
            request_id: request_id.to_owned(),
            error: tether_api::ErrorBody {
                kind: self.kind.to_owned(),
                message: self.message.clone(),
                param: self.param.clone(),
                code: self.code.map(str::to_owned),
                details: self.details.clone(),
            },
        }
    }

    /// The envelope for a bare error status we did not produce ourselves.
    pub fn for_status(status: StatusCode) -> Self {
        let (kind, message) = match status.as_u16() {
            400 | 413 | 415 | 422 => ("invalid_request_error", "the request is malformed"),
            401 => ("authentication_error", "authentication is required"),
            403 => ("permission_error", "not allowed"),
            404 => ("not_found_error", "no such resource"),
            405 => (
                "invalid_request_error",
                "this method is not allowed on this path",
            ),
            408 => ("invalid_request_error", "the request timed out"),
            429 => ("rate_limit_error", "too many requests"),
            503 => ("overloaded_error", "the server is unavailable"),
            _ => ("api_error", "internal error"),
        };
        // Oversized or unparsable bodies are a 400 in this API (§1.3).
        let status = if matches!(status.as_u16(), 413 | 415 | 422) {
            StatusCode::BAD_REQUEST
        } else {
            status
        };
        ApiError::new(status, kind, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = self.status.into_response();
        response.extensions_mut().insert(self);
        response
    }
}

/// The one place a service error becomes a status, an error type, a code and a message (§1.7, D-13,
/// D-14). Handlers use `?` on service calls and get this.
impl From<service::Error> for ApiError {
    fn from(e: service::Error) -> Self {
        let message = e.to_string();
        match e {
            Error::NotFound { kind, .. } => {
                let error = ApiError::not_found(message);
                match kind {
                    Missing::Environment => error.with_code("environment_not_found"),
                    Missing::Agent => error.with_code("agent_not_found"),
                    Missing::AgentVersion(_) => error.with_code("agent_version_not_found"),
                    Missing::Session => error.with_code("session_not_found"),
                    Missing::Work => error.with_code("work_not_found"),
                    Missing::Credential(_) => error,
                }
            }
            Error::Invalid { param, .. } => {
                let error = ApiError::bad_request(message);
                match param {
                    Some(param) => error.with_param(&param),
                    None => error,
                }
            }
            Error::EventTooLarge { param, .. } => {
                ApiError::bad_param(&param, message).with_code("event_too_large")
            }
            Error::Unauthenticated => ApiError::unauthorized(message),
            Error::LeaseLapsed => ApiError::unauthorized(message).with_code("lease_lapsed"),
            Error::Forbidden { param, .. } => {
                let error = ApiError::forbidden(message);
                match param {
                    Some(param) => error.with_param(&param),
                    None => error,
                }
            }
            Error::Refused(refusal) => refusal.into(),
            Error::EventRefused(refusal) => {
                ApiError::state_conflict(message).with_code(refusal.code)
            }
            Error::InvalidState { .. } => {
                ApiError::state_conflict(message).with_code("invalid_state")
            }
            Error::EnvironmentInUse { .. } => ApiError::state_conflict(message),
            Error::AlreadyArchived { .. } => ApiError::conflict(message),
            Error::VersionMismatch { .. } => ApiError::conflict(message)
                .with_param("version")
                .with_code("version_mismatch"),
            Error::Contended => ApiError::unavailable(message),
            Error::TooManyStreams { .. } => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
            }
            Error::StoreUnavailable {
                lease_amnesty_ms,
                outcome_unknown,
            } => {
                let error = ApiError::unavailable(message).with_code(if outcome_unknown {
                    STORE_OUTCOME_UNKNOWN
                } else {
                    STORE_UNAVAILABLE
                });
                match lease_amnesty_ms {
                    Some(ms) => error.with_details(json!({ "lease_amnesty_ms": ms })),
                    None => error,
                }
            }
            Error::StoreFull => ApiError::unavailable(message).with_code("store_full"),
            Error::DiskLow { .. } => ApiError::unavailable(message).with_code("disk_low"),
            Error::Internal => ApiError::internal(message),
        }
    }
}

impl From<WorkError> for ApiError {
    fn from(e: WorkError) -> Self {
        match &e {
            WorkError::InvalidState { .. } => {
                ApiError::state_conflict(e.to_string()).with_code("invalid_state")
            }
            WorkError::WorkerMismatch => {
                ApiError::state_conflict(e.to_string()).with_code("worker_mismatch")
            }
            WorkError::Held { .. } => {
                ApiError::state_conflict(e.to_string()).with_code("work_held")
            }
            WorkError::NotHeld => ApiError::state_conflict(e.to_string()).with_code("not_held"),
            WorkError::TurnOpen {
                session_updated_at,
                turn,
            } => ApiError::state_conflict(e.to_string())
                .with_code("turn_open")
                .with_details(json!({
                    "session_updated_at": session_updated_at.to_rfc3339(),
                    "turn": turn,
                })),
            WorkError::NotClaimable => {
                ApiError::state_conflict(e.to_string()).with_code("invalid_state")
            }
            WorkError::PreconditionFailed { reason, current } => ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "precondition_failed_error",
                *reason,
            )
            .with_code("lease_mismatch")
            .with_details(json!({
                "error_code": "heartbeat_precondition_failed",
                "current_state": {
                    "state": current.state.as_str(),
                    "ttl_seconds": current.ttl_seconds,
                    "last_heartbeat": current.last_heartbeat.map(|t| t.to_rfc3339()),
                    // The Anthropic SDK's model of this object requires the field; nothing was extended.
                    "lease_extended": false,
                }
            })),
            WorkError::Metadata(m) => service::Error::from(m.clone()).into(),
        }
    }
}
