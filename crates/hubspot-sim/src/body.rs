//! HubSpot-shaped answers: JSON responses and the error bodies HubSpot sends.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Response, StatusCode};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::faults::RetryAfter;
use super::state::RateOutcome;

/// What every simulator handler returns.
pub(crate) type SimResponse = Response<Full<Bytes>>;

/// HubSpot's JSON content type, exactly as it sends it.
pub(crate) const JSON: &str = "application/json;charset=utf-8";

/// A response with the given bytes as a HubSpot JSON body.
pub(crate) fn raw(status: StatusCode, body: impl Into<Bytes>) -> SimResponse {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
    response
}

/// A response with `value` serialized as the body.
pub(crate) fn json(status: StatusCode, value: &impl serde::Serialize) -> SimResponse {
    // Serializing a `Value` or a plain struct of strings and numbers cannot fail.
    let body = serde_json::to_vec(value).unwrap_or_default();
    raw(status, body)
}

/// An empty answer (e.g. `POST /__sim/reset`).
pub(crate) fn empty(status: StatusCode) -> SimResponse {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

/// Adds HubSpot's rate-limit headers to an answer.
pub(crate) fn with_rate_headers(
    mut response: SimResponse,
    rate: Option<RateOutcome>,
) -> SimResponse {
    if let Some(rate) = rate {
        let headers = response.headers_mut();
        let interval = u64::try_from(rate.interval.as_millis()).unwrap_or(u64::MAX);
        headers.insert(
            "x-hubspot-ratelimit-interval-milliseconds",
            HeaderValue::from(interval),
        );
        headers.insert("x-hubspot-ratelimit-max", HeaderValue::from(rate.max));
        headers.insert(
            "x-hubspot-ratelimit-remaining",
            HeaderValue::from(rate.remaining),
        );
    }
    response
}

/// HubSpot's standard error body: `status: "error"`, `message`, `correlationId`, `category`,
/// and optionally `context`, `errors`, `links` (the spec's `Error` schema).
#[derive(Debug)]
pub(crate) struct HubSpotError {
    status: StatusCode,
    body: Map<String, Value>,
}

impl HubSpotError {
    /// An error with HubSpot's usual fields.
    pub fn new(status: StatusCode, category: &str, message: impl Into<String>) -> Self {
        let mut body = Map::new();
        body.insert("status".into(), json!("error"));
        body.insert("message".into(), json!(message.into()));
        body.insert("category".into(), json!(category));
        Self { status, body }
    }

    /// Adds or replaces one top-level field.
    pub fn field(mut self, name: &str, value: Value) -> Self {
        self.body.insert(name.into(), value);
        self
    }

    /// The answer, with `correlationId` set to the id the header carries.
    pub fn into_response(mut self, correlation: Uuid) -> SimResponse {
        self.body
            .insert("correlationId".into(), json!(correlation.to_string()));
        json(self.status, &self.body)
    }

    /// 401: no token, an unknown one, or an expired one (HubSpot says which in `message`).
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "INVALID_AUTHENTICATION", message)
    }

    /// 403 as HubSpot sends it: the scopes of which ANY ONE would do are listed in
    /// `errors[0].context.requiredGranularScopes`.
    pub fn missing_scopes(any_of: &[&str]) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "MISSING_SCOPES",
            "This app hasn't been granted all required scopes to make this call. Read more about required scopes here: https://developers.hubspot.com/scopes.",
        )
        .field(
            "errors",
            json!([{
                "message": "One or more of the following scopes are required.",
                "context": { "requiredGranularScopes": any_of },
            }]),
        )
        .field("links", json!({ "scopes": "https://developers.hubspot.com/scopes" }))
    }

    /// 404 for a missing object or an unknown route.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "OBJECT_NOT_FOUND", message)
    }

    /// 400 for a malformed request.
    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "VALIDATION_ERROR", message)
    }

    /// The OAuth endpoints' 400: `status` names what was wrong (`BAD_REFRESH_TOKEN`, ...).
    /// HubSpot's own bodies lack `category`; the spec's `Error` requires it, so it is added.
    pub fn oauth(status: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "VALIDATION_ERROR", message)
            .field("status", json!(status))
    }

    /// HubSpot's 429 body for the ten-secondly limit. Real ones carry `errorType` and
    /// `policyName` but no `category`; the spec's `Error` requires one, so `RATE_LIMITS`
    /// (HubSpot's category name) is added.
    pub fn rate_limited() -> Self {
        Self::rate_limited_by("TEN_SECONDLY_ROLLING")
    }

    /// HubSpot's 429 body for the limit `policy` (`DAILY`: "You have reached your daily
    /// limit.").
    pub fn rate_limited_by(policy: &str) -> Self {
        let message = match policy {
            "DAILY" => "You have reached your daily limit.".to_owned(),
            other => format!("You have reached your {} limit.", other.to_lowercase()),
        };
        Self::new(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITS", message)
            .field("errorType", json!("RATE_LIMIT"))
            .field("policyName", json!(policy))
    }

    /// Any status with a HubSpot body whose category fits it (injected faults).
    pub fn for_status(status: StatusCode) -> Self {
        let (category, message) = match status.as_u16() {
            401 => return Self::unauthenticated("Authentication credentials not found."),
            403 => return Self::missing_scopes(&super::files::STATUS_SCOPES),
            404 => return Self::not_found("Resource not found"),
            429 => return Self::rate_limited(),
            400 => ("VALIDATION_ERROR", "Invalid request"),
            423 => (
                "LOCKED",
                "The resource is locked; try again in a few seconds.",
            ),
            477 => ("MIGRATION_IN_PROGRESS", "Account migration in progress."),
            502 => (
                "BAD_GATEWAY",
                "The request timed out while processing; try again later.",
            ),
            503 => (
                "SERVICE_UNAVAILABLE",
                "HubSpot is temporarily unavailable; try again later.",
            ),
            504 => (
                "GATEWAY_TIMEOUT",
                "The request timed out while processing; try again later.",
            ),
            s if s >= 500 => ("INTERNAL_ERROR", "An internal error occurred."),
            _ => ("ERROR", "The request could not be completed."),
        };
        Self::new(status, category, message)
    }
}

/// Adds `Retry-After` (seconds, or text verbatim) to an answer.
pub(crate) fn with_retry_after(
    mut response: SimResponse,
    value: Option<&RetryAfter>,
) -> SimResponse {
    let value = match value {
        Some(RetryAfter::Seconds(seconds)) => Some(HeaderValue::from(*seconds)),
        // Validated when the fault was set; a value that is not a header is not sent.
        Some(RetryAfter::Raw(text)) => HeaderValue::from_str(text).ok(),
        None => None,
    };
    if let Some(value) = value {
        response.headers_mut().insert(RETRY_AFTER, value);
    }
    response
}
